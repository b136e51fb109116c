//! The engine: the one owner of a cache's state (its stores, single-flight, the Vary
//! index, recent invalidations, counters and cache-wide settings) and of the
//! operations on it: look up, commit a fill, invalidate, values of the direct API.
//!
//! The public handle ([`HybridCache`](crate::HybridCache)) and the layer hold an
//! `Arc<Engine>` and call its methods; nothing outside reads its fields. The engine
//! knows no HTTP route settings and writes no `Cache-Status`: it answers what is
//! stored and why not.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod fill;
mod flight;
mod invalidations;
mod lease;
mod values;
mod vary;

pub(crate) use crate::store::redis_tier::Lease;
pub(crate) use crate::store::Tier;
pub(crate) use fill::{Fill, FillStart};
pub(crate) use flight::{Flight, FlightGuard};

use self::flight::SingleFlight;
use self::invalidations::Invalidations;
use crate::breaker::CircuitBreaker;
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::store::{HybridStore, RedisHealth};
use crate::telemetry::{CacheStats, Counter, Counters, TARGET};

/// Background refreshes (`stale-while-revalidate`) running at once, at most, per
/// cache; past it a stale hit is served without starting another.
pub(crate) const MAX_REFRESHES: usize = 64;

/// What a lookup found.
pub(crate) enum Lookup {
    Hit(Arc<CachedResponse>, Tier),
    Miss(LookupMiss),
}

/// Why a lookup found nothing to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LookupMiss {
    /// Nothing stored for the URL.
    Uri,
    /// Something stored for the URL, not for these `Vary`'d header values.
    Vary,
}

/// The cache-wide settings the engine applies.
#[derive(Debug, Clone)]
pub(crate) struct EngineSettings {
    pub(crate) namespace: String,
    pub(crate) cache_status_name: String,
    pub(crate) single_flight_timeout: Duration,
    /// The cross-replica fill lease's time to live, when on.
    pub(crate) fill_lease: Option<Duration>,
    /// How often the memory tier sweeps its expired entries.
    pub(crate) maintenance_interval: Duration,
}

/// A cache's state and its operations.
pub(crate) struct Engine {
    store: HybridStore,
    flights: SingleFlight,
    invalidations: Invalidations,
    /// Background refreshes (stale-while-revalidate) running at once, at most.
    refreshes: Arc<Semaphore>,
    counters: Arc<Counters>,
    namespace: String,
    cache_status_name: String,
    single_flight_timeout: Duration,
    fill_lease: Option<Duration>,
}

impl Engine {
    /// An engine over `store`, with its housekeeping task started on the current
    /// runtime (it ends with the engine).
    pub(crate) fn start(
        store: HybridStore,
        counters: Arc<Counters>,
        settings: EngineSettings,
    ) -> Arc<Self> {
        let engine = Arc::new(Engine {
            store,
            flights: SingleFlight::default(),
            invalidations: Invalidations::new(),
            refreshes: Arc::new(Semaphore::new(MAX_REFRESHES)),
            counters,
            namespace: settings.namespace,
            cache_status_name: settings.cache_status_name,
            single_flight_timeout: settings.single_flight_timeout,
            fill_lease: settings.fill_lease.filter(|ttl| !ttl.is_zero()),
        });
        spawn_maintenance(Arc::downgrade(&engine), settings.maintenance_interval);
        engine
    }

    /// Whether a lookup completes without waiting on the network (memory only).
    pub(crate) fn reads_are_local(&self) -> bool {
        self.store.reads_are_local()
    }

    /// This request's place in the single-flight of `key`.
    pub(crate) fn join_flight(&self, key: CacheKey) -> Flight {
        self.flights.join(key)
    }

    /// How long a follower waits for its leader.
    pub(crate) fn single_flight_timeout(&self) -> Duration {
        self.single_flight_timeout
    }

    /// A place among the background refreshes, if one is free.
    pub(crate) fn refresh_permit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.refreshes).try_acquire_owned().ok()
    }

    /// Marks `key` invalidated (fills that started before are not stored), then
    /// removes it from both tiers; `false` when Redis could not be told now.
    pub(crate) async fn invalidate_key(&self, key: CacheKey) -> bool {
        self.invalidations.mark(key).await;
        self.count(Counter::Invalidation);
        tracing::debug!(target: TARGET, key = %key, outcome = "invalidated");
        self.store.invalidate(&key).await
    }

    /// Marks `tag` invalidated, then removes what carries it from both tiers.
    pub(crate) async fn invalidate_tag(&self, tag: &str) -> bool {
        self.invalidations.mark_tag(tag).await;
        self.count(Counter::Invalidation);
        tracing::debug!(target: TARGET, tag, outcome = "tag-invalidated");
        self.store.invalidate_tag(tag).await
    }

    /// Invalidates `keys` and `tags` all at once, so that together they take one
    /// deadline, not one each; `false` when Redis could not be told one of them now.
    pub(crate) async fn invalidate_all_of(&self, keys: &[CacheKey], tags: &[String]) -> bool {
        use futures_util::future::join_all;
        let (keys, tags) = futures_util::future::join(
            join_all(keys.iter().map(|key| self.invalidate_key(*key))),
            join_all(tags.iter().map(|tag| self.invalidate_tag(tag))),
        )
        .await;
        keys.into_iter().chain(tags).all(|reached| reached)
    }

    /// Marks everything invalidated, then removes it from both tiers.
    pub(crate) async fn purge_all(&self) -> bool {
        self.invalidations.mark_all();
        self.count(Counter::Invalidation);
        tracing::debug!(target: TARGET, outcome = "purged");
        self.store.purge_all().await
    }

    /// Whether `entry` was stored before Redis last came back after an outage: served
    /// once more, it is refreshed in the background (one refresh for the cluster).
    pub(crate) fn stored_before_recovery(&self, entry: &CachedResponse) -> bool {
        self.store.stored_before_recovery(entry.stored_at())
    }

    /// Operations waiting for Redis to come back.
    pub(crate) fn pending_redis_operations(&self) -> usize {
        self.store.pending_operations()
    }

    pub(crate) fn count(&self, counter: Counter) {
        self.counters.add(counter);
    }

    pub(crate) fn stats(&self) -> CacheStats {
        self.counters.snapshot()
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The cache's name in `Cache-Status`.
    pub(crate) fn cache_status_name(&self) -> &str {
        &self.cache_status_name
    }

    pub(crate) fn memory_weighted_size(&self) -> u64 {
        self.store.memory().weighted_size()
    }

    pub(crate) fn memory_entry_count(&self) -> u64 {
        self.store.memory().entry_count()
    }

    pub(crate) fn run_pending_tasks(&self) {
        self.store.memory().remove_expired();
    }

    /// One maintenance tick: the memory tier's next shard swept.
    fn maintain(&self) {
        self.store.memory().remove_expired_step();
    }

    pub(crate) fn redis_breaker(&self) -> Option<CircuitBreaker> {
        self.store.redis_breaker()
    }

    pub(crate) fn redis_health(&self) -> Option<RedisHealth> {
        self.store.redis_health()
    }

    pub(crate) async fn shutdown(&self) {
        self.store.shutdown().await;
    }
}

/// Sweeps one shard of the memory tier's expired entries every `every` (each shard
/// once every as many ticks as there are shards), so that they free their memory while
/// the cache is idle; holds the engine weakly and ends with it.
fn spawn_maintenance(engine: Weak<Engine>, every: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(target: TARGET, "no tokio runtime: expired memory entries are removed only when read");
        return;
    };
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(engine) = engine.upgrade() else {
                return;
            };
            engine.maintain();
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use http::HeaderMap;

    pub(crate) fn memory_engine() -> Arc<Engine> {
        let counters = Arc::new(Counters::default());
        let store = HybridStore::new(MemoryStore::new(1 << 20, None), Arc::clone(&counters));
        Engine::start(
            store,
            counters,
            EngineSettings {
                namespace: "test".to_owned(),
                cache_status_name: "test".to_owned(),
                single_flight_timeout: Duration::from_secs(5),
                fill_lease: None,
                maintenance_interval: Duration::from_secs(1),
            },
        )
    }

    #[tokio::test]
    async fn a_lookup_future_stays_small() {
        // Every request through a layer with Redis allocates one: a read's own future
        // (fred's command, the breaker, the deadline) is boxed, not held inline.
        let engine = memory_engine();
        let (key, headers) = (CacheKey::from_bytes([1; 32]), HeaderMap::new());
        let lookup = engine.lookup(&key, &headers);
        let size = std::mem::size_of_val(&lookup);
        assert!(size < 4096, "a lookup's future takes {size} bytes");
    }

    #[tokio::test]
    async fn a_fill_started_before_an_invalidation_is_not_stored() {
        let engine = memory_engine();
        let key = CacheKey::from_bytes([5; 32]);
        let response = || {
            CachedResponse::builder(http::StatusCode::OK, HeaderMap::new(), bytes::Bytes::new())
                .fresh_until(std::time::SystemTime::now() + Duration::from_secs(60))
                .build()
        };
        let fill = |start| Fill {
            key,
            entry: response(),
            start,
            guard: None,
            detail: None,
        };
        let before = engine.fill_start();
        engine.invalidate_key(key).await;
        engine.store_fill(fill(before)).await;
        assert!(matches!(
            engine.lookup(&key, &HeaderMap::new()).await,
            Lookup::Miss(_)
        ));
        assert_eq!(engine.stats().not_stored, 1);
        // One that started after it is.
        engine.store_fill(fill(engine.fill_start())).await;
        assert!(matches!(
            engine.lookup(&key, &HeaderMap::new()).await,
            Lookup::Hit(..)
        ));
        assert_eq!(engine.stats().stores, 1);
    }

    #[tokio::test]
    async fn a_committed_fill_is_stored_at_once_unless_invalidated_since_it_started() {
        use std::future::Future;
        let engine = memory_engine();
        let response = || {
            CachedResponse::builder(http::StatusCode::OK, HeaderMap::new(), bytes::Bytes::new())
                .fresh_until(std::time::SystemTime::now() + Duration::from_secs(60))
                .build()
        };
        let fill = |key, start| Fill {
            key,
            entry: response(),
            start,
            guard: None,
            detail: None,
        };
        let headers = HeaderMap::new();
        let found = |key| {
            let lookup = engine.lookup(&key, &headers);
            let mut lookup = std::pin::pin!(lookup);
            let waker = std::task::Waker::noop();
            match lookup
                .as_mut()
                .poll(&mut std::task::Context::from_waker(waker))
            {
                std::task::Poll::Ready(found) => matches!(found, Lookup::Hit(..)),
                std::task::Poll::Pending => panic!("a memory lookup waited"),
            }
        };
        // Nothing invalidated: in memory when `commit` returns, no task run.
        let (a, b, c) = (
            CacheKey::from_bytes([6; 32]),
            CacheKey::from_bytes([7; 32]),
            CacheKey::from_bytes([8; 32]),
        );
        engine.commit(fill(a, engine.fill_start()));
        assert!(found(a));
        assert_eq!(engine.stats().stores, 1);
        // Started before an invalidation of its own key: not stored.
        let before = engine.fill_start();
        engine.invalidate_key(b).await;
        engine.commit(fill(b, before));
        tokio::task::yield_now().await;
        assert!(!found(b));
        assert_eq!(engine.stats().not_stored, 1);
        // Started before an invalidation of another key: stored.
        engine.commit(fill(c, before));
        for _ in 0..100 {
            if engine.stats().stores == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(engine.stats().stores, 2);
        assert!(found(c));
    }
}
