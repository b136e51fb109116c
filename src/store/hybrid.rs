//! Routing between tiers: reads go to Redis first and to memory when Redis errs or
//! times out (a near cache reads memory first); a Redis hit also fills memory; writes
//! go to memory at once and to Redis through the background writer, off the response
//! path; removals go to both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::memory::MemoryStore;
use super::redis::{RedisHealth, RedisStore};
use super::redis_tier::{Lease, RedisRead, RedisTier, TierParts};
use super::writer::QueuedWrite;
use super::{StoreRequest, Tier};
use crate::breaker::CircuitBreaker;
use crate::entry::codec::millis_since_epoch;
use crate::entry::Entry;
use crate::key::CacheKey;
use crate::telemetry::{Counter, Counters, LookupTimers, TARGET};

/// The tiers behind one cache. Clones share them.
#[derive(Clone)]
pub(crate) struct HybridStore {
    memory: MemoryStore,
    redis: Option<RedisTier>,
    /// Near-cache mode: memory is read first (its entries live at most the local TTL).
    memory_first: bool,
    /// With Redis failing, how long since this replica got a response (or since
    /// Redis began failing, for one it held before) memory may still serve it.
    fallback_bound: Option<Duration>,
    /// Since when (ms since the epoch) Redis reads have failed in a row; 0 while they
    /// answer.
    failing_since: Arc<AtomicU64>,
    counters: Arc<Counters>,
    timers: LookupTimers,
}

impl HybridStore {
    /// A memory-only store.
    pub(crate) fn new(memory: MemoryStore, counters: Arc<Counters>) -> Self {
        HybridStore {
            memory,
            redis: None,
            memory_first: false,
            fallback_bound: None,
            failing_since: Arc::new(AtomicU64::new(0)),
            counters,
            timers: LookupTimers::register(),
        }
    }

    /// Bounds what memory serves while Redis fails (`fallback_max_staleness`).
    pub(crate) fn with_fallback_bound(mut self, bound: Option<Duration>) -> Self {
        self.fallback_bound = bound;
        self
    }

    /// Adds the Redis tier and starts its tasks on the current runtime; with
    /// `memory_first`, reads try the (near-cache) memory tier before Redis.
    pub(crate) fn with_redis(
        mut self,
        store: RedisStore,
        parts: TierParts<'_>,
        memory_first: bool,
    ) -> Self {
        let counters = Arc::clone(&self.counters);
        self.redis = Some(RedisTier::start(store, parts, &self.memory, counters));
        self.memory_first = memory_first;
        self
    }

    /// Whether a read completes without waiting on the network: true when memory is
    /// the only tier.
    pub(crate) fn reads_are_local(&self) -> bool {
        self.redis.is_none()
    }

    pub(crate) fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    /// The entry under `key`, and the tier that answered.
    pub(crate) async fn get(&self, key: &CacheKey) -> Option<(Entry, Tier)> {
        if self.memory_first {
            if let Some(entry) = self.timed_memory_get(key) {
                return Some((entry, Tier::Memory));
            }
        }
        if let Some(redis) = &self.redis {
            // This replica's own fill may not be in Redis yet (its write follows the
            // response): on a miss, or on an answer that may be the version this
            // fill replaces (a refresh's, a revalidation's), wait for that write's
            // answer, within a deadline, and ask again. Without that, the next
            // lookup after a refresh read the version it replaced and refreshed it
            // again. Redis stays the truth: a write an invalidation refused, or one
            // removed since, is still a miss. Taken before the read, so that a write
            // answered in between still counts.
            let started = Instant::now();
            let written = redis.pending_write(key);
            let mut read = redis.read(key).await;
            if let (RedisRead::Absent | RedisRead::Found(_), Some(written)) = (&read, written) {
                if tokio::time::timeout(redis.deadline(), written)
                    .await
                    .is_ok()
                {
                    read = redis.read(key).await;
                }
            }
            self.timers.redis(started);
            if matches!(read, RedisRead::Failed) {
                let now = millis_since_epoch(SystemTime::now());
                let _ = self.failing_since.compare_exchange(
                    0,
                    now.max(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            } else if self.failing_since.load(Ordering::Relaxed) != 0 {
                self.failing_since.store(0, Ordering::Relaxed);
            }
            match read {
                // This replica invalidated it while Redis was away, and the removal
                // is not replayed yet: Redis's copy is stale to us (memory forgot it).
                RedisRead::Found(entry) if redis.awaits_invalidation(key, &entry) => {
                    tracing::debug!(target: TARGET, key = %key, outcome = "invalidation-queued");
                    return None;
                }
                RedisRead::Found(entry) => return Some((entry, Tier::Redis)),
                // Redis lost its data and memory is putting it back: memory answers
                // what Redis does not hold yet.
                RedisRead::Absent if redis.reseeding() => {}
                // Redis is the shared truth: its miss is a miss, whatever memory holds.
                RedisRead::Absent => return None,
                RedisRead::Failed => {
                    let held = self
                        .timed_memory_get(key)
                        .filter(|entry| self.within_fallback_bound(entry));
                    if held.is_some() {
                        self.counters.add(Counter::FallbackHit);
                    }
                    return held.map(|entry| (entry, Tier::Memory));
                }
            }
        }
        self.timed_memory_get(key)
            .map(|entry| (entry, Tier::Memory))
    }

    /// The memory tier's entry under `key`, its lookup time recorded.
    fn timed_memory_get(&self, key: &CacheKey) -> Option<Entry> {
        let started = Instant::now();
        let found = self.memory.get_at(key, started);
        self.timers.memory(started);
        found
    }

    /// Whether memory may serve `entry` while Redis fails: always, unless a bound is
    /// set and this replica has been out of touch with it for longer (since it got
    /// the response, or since Redis began failing if it got it before).
    fn within_fallback_bound(&self, entry: &Entry) -> bool {
        let (Some(bound), Entry::Response(response)) = (self.fallback_bound, entry) else {
            return true;
        };
        let failing_since = self.failing_since.load(Ordering::Relaxed);
        let since = millis_since_epoch(response.stored_at()).max(failing_since);
        let now = millis_since_epoch(SystemTime::now());
        let bound = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        let within = now.saturating_sub(since) <= bound;
        if !within {
            tracing::debug!(target: TARGET, outcome = "fallback-too-stale");
        }
        within
    }

    /// Stores in memory at once and queues the Redis write; `started` is when the
    /// response's origin call started.
    pub(crate) fn put(&self, key: CacheKey, entry: Entry, started: SystemTime) {
        if let Some(redis) = &self.redis {
            redis.queue(QueuedWrite::Set(key, entry.clone(), started));
        }
        self.memory.insert(key, entry);
    }

    /// Removes a key from both tiers: from Redis at once, and again behind every
    /// write already queued (one of which may hold the key). `false` when Redis could
    /// not be told now (the delete is kept and replayed once it can).
    pub(crate) async fn invalidate(&self, key: &CacheKey) -> bool {
        self.memory.remove(key);
        match &self.redis {
            Some(redis) => {
                redis.queue(QueuedWrite::Delete(*key));
                redis.delete(key).await
            }
            None => true,
        }
    }

    /// Removes every response tagged `tag` from both tiers; `false` when Redis could
    /// not take it now (it is replayed once Redis can).
    pub(crate) async fn invalidate_tag(&self, tag: &str) -> bool {
        self.memory.remove_tagged(tag);
        match &self.redis {
            Some(redis) => redis.remove(StoreRequest::invalidate_tag(tag)).await,
            None => true,
        }
    }

    /// Removes every entry from both tiers, as `invalidate_tag`.
    pub(crate) async fn purge_all(&self) -> bool {
        self.memory.remove_all();
        match &self.redis {
            Some(redis) => redis.remove(StoreRequest::purge_all()).await,
            None => true,
        }
    }

    /// Tries to take the cross-replica fill lease of `key` as `token`.
    pub(crate) async fn try_lease(&self, key: &CacheKey, token: u64, ttl: Duration) -> Lease {
        match &self.redis {
            Some(redis) => redis.lease(key, token, ttl).await,
            None => Lease::Unavailable,
        }
    }

    /// Gives a lease back through the write queue, behind the fill's own write (a
    /// full queue leaves it to expire).
    pub(crate) fn release_lease(&self, key: CacheKey, token: u64) {
        if let Some(redis) = &self.redis {
            redis.queue(QueuedWrite::Release(key, token));
        }
    }

    /// Operations waiting for Redis.
    pub(crate) fn pending_operations(&self) -> usize {
        self.redis.as_ref().map_or(0, RedisTier::pending)
    }

    pub(crate) fn redis_breaker(&self) -> Option<CircuitBreaker> {
        self.redis.as_ref().map(|redis| redis.breaker().clone())
    }

    /// Whether a response stored at `stored_at` predates Redis's last return from an
    /// outage (here, or recorded by another replica): it may have missed an
    /// invalidation Redis never got, so it is refreshed on its next use.
    /// While Redis fails, the fallback's rules apply instead: a refresh then would be
    /// refused by Redis, and asked again once it is back.
    pub(crate) fn stored_before_recovery(&self, stored_at: SystemTime) -> bool {
        let Some(redis) = &self.redis else {
            return false;
        };
        if self.failing_since.load(Ordering::Relaxed) != 0 {
            return false;
        }
        let recovered = redis.recovered_at();
        recovered != 0 && millis_since_epoch(stored_at) < recovered
    }

    pub(crate) fn redis_health(&self) -> Option<RedisHealth> {
        self.redis.as_ref().map(RedisTier::health)
    }

    pub(crate) async fn shutdown(&self) {
        if let Some(redis) = &self.redis {
            redis.shutdown().await;
        }
    }
}
