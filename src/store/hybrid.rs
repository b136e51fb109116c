//! Routing between tiers: reads go to Redis first and to memory when Redis errs or
//! times out; a Redis hit also fills memory; writes go to memory at once and to Redis
//! through a bounded queue, off the response path.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::entry::Entry;
use crate::telemetry::{Counter, Counters, TARGET};
use crate::CacheKey;

use tower::retry::RetryLayer;
use tower::timeout::error::Elapsed;
use tower::timeout::TimeoutLayer;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};

use super::redis::RedisConfig;
use crate::error::BuildError;
use crate::resilience::breaker::CircuitOpen;
use crate::resilience::retry::RedisRetry;
use tower::retry::Policy;

use crate::resilience::breaker::{CircuitBreaker, CircuitBreakerLayer};
use crate::BreakerState;

use super::memory::MemoryStore;
use super::read_flights::ReadFlights;
use super::redis::{Invalidation, RedisService, RedisStore};
use super::subscription::MissedWindows;
use super::until_closed;
use super::{
    RedisTierService, StoreAnswer, StoreError, StoreOp, StoreRequest, StoreResponse, Tier,
};

/// Most queued writes sent to Redis in one pipeline.
const WRITE_BATCH: usize = 64;

/// The tiers behind one [`HybridCache`](crate::HybridCache).
#[derive(Clone)]
pub(crate) struct HybridStore {
    memory: MemoryStore,
    redis: Option<RedisTier>,
    /// Near-cache mode: memory is read first (its entries live at most the local TTL).
    memory_first: bool,
}

/// The Redis tier's service stack (breaker around the store), shared by every clone.
type RedisStack = BoxCloneSyncService<StoreRequest, StoreResponse, BoxError>;

/// A user's layer on the Redis tier, applied to the store.
pub(crate) type RedisLayerFn = Arc<dyn Fn(RedisTierService) -> RedisTierService + Send + Sync>;

#[derive(Clone)]
struct RedisTier {
    /// Deletes and leases (and reads, when the application added layers around the
    /// store): breaker, deadline, retries, store.
    service: RedisStack,
    /// The store itself, for what is not an operation (health, shutdown).
    store: Arc<RedisStore>,
    breaker: CircuitBreaker,
    writes: mpsc::Sender<QueuedWrite>,
    /// Writes, tag invalidations, purges and key deletions Redis could not take:
    /// replayed, oldest first, once it can.
    pending: Arc<Mutex<VecDeque<StoreRequest>>>,
    /// Operations off the response path (no deadline): the writer's stack.
    admin: RedisStack,
    /// How a lookup reads Redis.
    reader: Arc<RedisReader>,
    /// Reads of a key on their way, shared by the lookups that arrive meanwhile.
    reads: ReadFlights<RedisRead>,
}

/// A lookup's Redis read, in the stack's order: the breaker (while open, Redis is not
/// asked), one deadline for the whole read, retries of transient errors, the store.
/// Written out rather than as boxed layers (a read is the hot path of a Redis hit),
/// unless the application wrapped the store in layers of its own, which must see
/// every attempt: then the reads go through that stack.
struct RedisReader {
    store: Arc<RedisStore>,
    breaker: CircuitBreaker,
    /// The bound on a read, and on a lookup's wait for one it shares.
    deadline: Duration,
    retry: RedisRetry,
    layered: Option<RedisStack>,
    /// A hit is also kept in memory, so that an outage finds it warm.
    memory: MemoryStore,
    counters: Arc<Counters>,
}

impl RedisReader {
    /// Reads `key`, fills memory with a hit, and counts a failure.
    async fn read_and_keep(self: Arc<Self>, key: CacheKey) -> RedisRead {
        match self.read(key).await {
            Ok(Some(entry)) => {
                // Most hits find the same version in memory already and skip moka's
                // insert; the lookup also tells moka the key is in use, so that
                // memory keeps what Redis serves most.
                let held = self.memory.get(&key).await;
                if !held.is_some_and(|held| held.same_version(&entry)) {
                    self.memory.insert(key, entry.clone()).await;
                }
                RedisRead::Found(entry)
            }
            Ok(None) => RedisRead::Absent,
            Err(e) => {
                count_failure(&self.counters, &e);
                tracing::debug!(target: TARGET, key = %key, error = %e, outcome = "redis-read-failed");
                RedisRead::Failed
            }
        }
    }

    async fn read(&self, key: CacheKey) -> Result<Option<Entry>, BoxError> {
        if let Some(stack) = &self.layered {
            let response = stack.clone().oneshot(StoreRequest::get(key)).await?;
            return Ok(match response.answer {
                StoreAnswer::Found(found) => found,
                _ => None,
            });
        }
        self.breaker
            .guard(|| async {
                tokio::time::timeout(self.deadline, self.attempts(key))
                    .await
                    .unwrap_or_else(|_| Err(Elapsed::new().into()))
            })
            .await
    }

    /// The store's answer, retried as the retry policy says (asked only once an
    /// attempt failed; a success tells it as `tower::retry` would).
    async fn attempts(&self, key: CacheKey) -> Result<Option<Entry>, BoxError> {
        let mut request = StoreRequest::get(key);
        let mut policy: Option<RedisRetry> = None;
        loop {
            let error = match self.store.get(&key, request.attempt).await {
                Ok(found) => {
                    self.retry.succeeded();
                    return Ok(found);
                }
                Err(error) => error,
            };
            let mut failed: Result<StoreResponse, BoxError> = Err(error.into());
            let policy = policy.get_or_insert_with(|| self.retry.clone());
            match policy.retry(&mut request, &mut failed) {
                Some(backoff) => backoff.await,
                None => return failed.map(|_| None),
            }
        }
    }
}

/// The outcome of asking for a fill lease.
pub(crate) enum Lease {
    /// This replica fetches; the token gives it back.
    Taken(u64),
    /// Another replica is fetching.
    Held,
    /// Redis cannot say (no Redis, breaker open, error).
    Unavailable,
}

/// Most operations (a write batch counts one) kept for replay; past it the oldest is
/// dropped (and counted).
const MAX_PENDING: usize = 1024;

/// Most bytes of entries kept for replay: a long outage under a miss-heavy load must
/// not hold more than this beyond the memory tier's own capacity.
const MAX_PENDING_WRITE_BYTES: usize = 16 << 20;

/// The bytes of entries a kept operation holds.
fn write_weight(request: &StoreRequest) -> usize {
    match &request.op {
        StoreOp::Set(entries) => entries.iter().map(|(_, entry, _)| entry.weight()).sum(),
        _ => 0,
    }
}

/// Keeps an operation Redis could not take, for the replay task.
fn keep_for_replay(
    pending: &Mutex<VecDeque<StoreRequest>>,
    request: StoreRequest,
    counters: &Counters,
) {
    let Ok(mut pending) = pending.lock() else {
        return;
    };
    let weight = write_weight(&request);
    if weight > 0
        && pending.iter().map(write_weight).sum::<usize>() + weight > MAX_PENDING_WRITE_BYTES
    {
        // Entries written since Redis went away: the first ones are kept, these not.
        counters.add(Counter::RedisWriteDropped);
        return;
    }
    if pending.len() == MAX_PENDING {
        pending.pop_front();
        counters.add(Counter::RedisWriteDropped);
    }
    pending.push_back(request);
}

/// What the background writer sends to Redis, in order.
enum QueuedWrite {
    /// An entry, and when its origin call started.
    Set(CacheKey, Entry, std::time::SystemTime),
    /// Sent after every write queued before it, so an invalidation cannot be undone
    /// by a fill that was already on its way.
    Delete(CacheKey),
    /// Gives a fill lease back after the fill's own write, so that a waiting replica
    /// finds the entry rather than a free lease.
    Release(CacheKey, u64),
}

impl HybridStore {
    pub(crate) fn new(memory: MemoryStore) -> Self {
        HybridStore {
            memory,
            redis: None,
            memory_first: false,
        }
    }

    /// Adds the Redis tier and starts its writer task on the current runtime; with
    /// `memory_first`, reads try the (near-cache) memory tier before Redis.
    pub(crate) fn with_redis(
        mut self,
        store: RedisStore,
        config: &RedisConfig,
        breaker: CircuitBreakerLayer,
        layers: &[RedisLayerFn],
        counters: Arc<Counters>,
        memory_first: bool,
    ) -> Result<Self, BuildError> {
        self.memory_first = memory_first;
        // Error replies (OOM, WRONGTYPE) say Redis is up and answering: by default
        // they do not trip the breaker; a breaker given its own filter keeps it.
        let breaker = if breaker.filters_errors() {
            breaker
        } else {
            breaker.count_errors_if(counts_against_redis)
        };
        store.drive(breaker.breaker());
        spawn_listener(store.invalidations(), store.closed(), self.memory.clone());
        let store = Arc::new(store);
        if let Some(missed) = store.missed_windows() {
            spawn_catch_up(
                Arc::downgrade(&store),
                self.memory.clone(),
                missed,
                config.probe_interval_value(),
            );
        }
        let policy = config.retry_policy(Arc::clone(&counters))?;
        let retry = RetryLayer::new(policy.clone());
        // The user's layers wrap the store itself, so they see every attempt; the
        // first added is the outermost, as with `ServiceBuilder`.
        let inner = layers.iter().rev().fold(
            RedisTierService::new(RedisService(Arc::clone(&store))),
            |service, layer| layer(service),
        );
        // Outside in: the breaker (while open, nothing touches Redis), one deadline
        // for the whole operation, retries of transient errors, the store.
        let service = BoxCloneSyncService::new(
            ServiceBuilder::new()
                .layer(breaker.clone())
                .layer(TimeoutLayer::new(config.deadline_value()))
                .layer(retry.clone())
                .service(inner.clone()),
        );
        // Writes are off the response path: no deadline beyond each attempt's.
        let writer: RedisStack = BoxCloneSyncService::new(
            ServiceBuilder::new()
                .layer(breaker.clone())
                .layer(retry)
                .service(inner),
        );
        let pending_removals = Arc::new(Mutex::new(VecDeque::new()));
        spawn_replay(
            Arc::downgrade(&pending_removals),
            writer.clone(),
            config.probe_interval_value(),
            Arc::clone(&counters),
        );
        let admin = writer.clone();
        let replay = Arc::clone(&pending_removals);
        let (writes, mut pending) = mpsc::channel::<QueuedWrite>(config.write_queue_len());
        let reader = Arc::new(RedisReader {
            store: Arc::clone(&store),
            breaker: breaker.breaker(),
            deadline: config.deadline_value(),
            retry: policy,
            layered: (!layers.is_empty()).then(|| service.clone()),
            memory: self.memory.clone(),
            counters: Arc::clone(&counters),
        });
        // The task ends when the last sender (the last HybridStore clone) is gone.
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(WRITE_BATCH);
            while pending.recv_many(&mut batch, WRITE_BATCH).await > 0 {
                // Runs of sets go out as one pipeline each; a delete waits for the
                // sets before it.
                let mut sets = Vec::new();
                for write in batch.drain(..) {
                    match write {
                        QueuedWrite::Set(key, entry, started) => sets.push((key, entry, started)),
                        QueuedWrite::Release(key, token) => {
                            send_sets(&writer, std::mem::take(&mut sets), &counters, &replay).await;
                            let _ = writer
                                .clone()
                                .oneshot(StoreRequest::release(key, token))
                                .await;
                        }
                        QueuedWrite::Delete(key) => {
                            send_sets(&writer, std::mem::take(&mut sets), &counters, &replay).await;
                            let request = StoreRequest::delete(key);
                            if let Err(e) = writer.clone().oneshot(request.clone()).await {
                                count_failure(&counters, &e);
                                keep_for_replay(&replay, request, &counters);
                            }
                        }
                    }
                }
                send_sets(&writer, sets, &counters, &replay).await;
            }
        });
        self.redis = Some(RedisTier {
            service,
            store,
            breaker: breaker.breaker(),
            writes,
            pending: pending_removals,
            admin,
            reader,
            reads: ReadFlights::new(),
        });
        Ok(self)
    }

    /// Whether a read completes without waiting on the network: true when memory is
    /// the only tier.
    pub(crate) fn reads_are_local(&self) -> bool {
        self.redis.is_none()
    }

    pub(crate) fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    pub(crate) async fn get(&self, key: &CacheKey, counters: &Counters) -> Option<(Entry, Tier)> {
        if self.memory_first {
            if let Some(entry) = self.memory.get(key).await {
                return Some((entry, Tier::Memory));
            }
        }
        if let Some(redis) = &self.redis {
            let outcome = if redis.breaker.state() == BreakerState::Open {
                // What the stack would answer at once, without its allocations: the
                // hot path of an outage.
                counters.add(Counter::RedisError);
                counters.add(Counter::RedisBreakerRejection);
                RedisRead::Failed
            } else {
                self.read_redis_shared(redis, key, counters).await
            };
            match outcome {
                RedisRead::Found(entry) => return Some((entry, Tier::Redis)),
                RedisRead::Absent => return None,
                RedisRead::Failed => {
                    let held = self.memory.get(key).await;
                    if held.is_some() {
                        counters.add(Counter::FallbackHit);
                    }
                    return held.map(|entry| (entry, Tier::Memory));
                }
            }
        }
        self.memory
            .get(key)
            .await
            .map(|entry| (entry, Tier::Memory))
    }

    /// A Redis read of `key` sent after this call, shared with the lookups of the same
    /// key that arrive while it waits.
    async fn read_redis_shared(
        &self,
        redis: &RedisTier,
        key: &CacheKey,
        counters: &Counters,
    ) -> RedisRead {
        let read = {
            let (reader, key) = (Arc::clone(&redis.reader), *key);
            move || reader.read_and_keep(key)
        };
        let joined = redis.reads.join(*key, read);
        if joined.shared {
            counters.add(Counter::RedisReadShared);
        }
        if joined.after_another() {
            // Two reads' time at most; the lookup's own bound stays one deadline.
            match tokio::time::timeout(redis.reader.deadline, joined.read).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    counters.add(Counter::RedisDeadlineHit);
                    RedisRead::Failed
                }
            }
        } else {
            joined.read.await
        }
    }

    /// Stores in memory at once and queues the Redis write; `started` is when the
    /// response's origin call started.
    pub(crate) async fn put(
        &self,
        key: CacheKey,
        entry: Entry,
        started: std::time::SystemTime,
        counters: &Counters,
    ) {
        if let Some(redis) = &self.redis {
            if redis
                .writes
                .try_send(QueuedWrite::Set(key, entry.clone(), started))
                .is_err()
            {
                counters.add(Counter::RedisWriteDropped);
            }
        }
        self.memory.insert(key, entry).await;
    }

    /// Removes a key from both tiers: from Redis at once, and again behind every
    /// write already queued (one of which may hold the key). `false` when Redis could
    /// not be told now.
    pub(crate) async fn invalidate(&self, key: &CacheKey, counters: &Counters) -> bool {
        if let Some(redis) = &self.redis {
            if redis.writes.try_send(QueuedWrite::Delete(*key)).is_err() {
                counters.add(Counter::RedisWriteDropped);
            }
        }
        self.delete(key, counters).await
    }

    /// Deletes from both tiers; a Redis failure is counted and reported.
    pub(crate) async fn delete(&self, key: &CacheKey, counters: &Counters) -> bool {
        self.memory.remove(key).await;
        if let Some(redis) = &self.redis {
            if let Err(e) = redis
                .service
                .clone()
                .oneshot(StoreRequest::delete(*key))
                .await
            {
                count_failure(counters, &e);
                tracing::debug!(target: TARGET, key = %key, error = %e, outcome = "redis-delete-failed");
                return false;
            }
        }
        true
    }

    /// Removes every response tagged `tag` from both tiers; `false` when Redis could
    /// not take it now (it is replayed once Redis can).
    pub(crate) async fn invalidate_tag(&self, tag: &str, counters: &Counters) -> bool {
        self.memory.remove_tagged(tag);
        self.remove_in_redis(StoreRequest::invalidate_tag(tag), counters)
            .await
    }

    /// Removes every entry from both tiers, as `invalidate_tag`.
    pub(crate) async fn purge_all(&self, counters: &Counters) -> bool {
        self.memory.remove_all();
        self.remove_in_redis(StoreRequest::purge_all(), counters)
            .await
    }

    async fn remove_in_redis(&self, request: StoreRequest, counters: &Counters) -> bool {
        let Some(redis) = &self.redis else {
            return true;
        };
        match redis.admin.clone().oneshot(request.clone()).await {
            Ok(_) => true,
            Err(e) => {
                count_failure(counters, &e);
                tracing::debug!(target: TARGET, error = %e, outcome = "redis-removal-queued");
                keep_for_replay(&redis.pending, request, counters);
                false
            }
        }
    }

    /// Tries to take the cross-replica fill lease of `key`.
    pub(crate) async fn try_lease(&self, key: &CacheKey, ttl: std::time::Duration) -> Lease {
        let Some(redis) = &self.redis else {
            return Lease::Unavailable;
        };
        let token = crate::cache::random_u64();
        match redis
            .service
            .clone()
            .oneshot(StoreRequest::lease(*key, token, ttl))
            .await
        {
            Ok(response) => match response.answer {
                StoreAnswer::Leased(true) => Lease::Taken(token),
                StoreAnswer::Leased(false) => Lease::Held,
                _ => Lease::Unavailable,
            },
            // Breaker open, timeout, no connection: local single-flight only.
            Err(_) => Lease::Unavailable,
        }
    }

    /// Gives a lease back through the write queue, behind the fill's own write (a
    /// full queue leaves it to expire).
    pub(crate) fn release_lease(&self, key: CacheKey, token: u64) {
        if let Some(redis) = &self.redis {
            let _ = redis.writes.try_send(QueuedWrite::Release(key, token));
        }
    }

    /// Operations waiting for Redis.
    pub(crate) fn pending_operations(&self) -> usize {
        self.redis
            .as_ref()
            .and_then(|redis| redis.pending.lock().ok().map(|p| p.len()))
            .unwrap_or(0)
    }

    pub(crate) fn redis_breaker(&self) -> Option<CircuitBreaker> {
        self.redis.as_ref().map(|redis| redis.breaker.clone())
    }

    pub(crate) fn redis_health(&self) -> Option<super::redis_health::RedisHealth> {
        self.redis.as_ref().map(|redis| redis.store.health())
    }

    pub(crate) async fn shutdown(&self) {
        if let Some(redis) = &self.redis {
            redis.store.quit().await;
        }
    }
}

/// What a Redis read found, shared by the lookups that waited for it.
#[derive(Clone)]
enum RedisRead {
    Found(Entry),
    Absent,
    /// Failed, timed out or refused (counted once, by the read): memory answers.
    Failed,
}

/// Forgets in memory what any replica invalidated: a near cache serves memory first,
/// and any cache answers from memory while Redis cannot. The task ends when the
/// store closes or is dropped.
fn spawn_listener(
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    mut closed: tokio::sync::watch::Receiver<bool>,
    memory: MemoryStore,
) {
    use tokio::sync::broadcast::error::RecvError;
    tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                received = messages.recv() => received,
                () = until_closed(&mut closed) => return,
            };
            match received {
                Ok(message) => {
                    let text = message.value.as_string().unwrap_or_default();
                    if let Some(invalidation) = Invalidation::parse(&text) {
                        forget(&memory, invalidation).await;
                    }
                }
                // Messages were missed: forget everything rather than serve what one
                // of them invalidated.
                Err(RecvError::Lagged(_)) => memory.remove_all(),
                Err(RecvError::Closed) => return,
            }
        }
    });
}

/// Removes from memory what one invalidation names.
async fn forget(memory: &MemoryStore, invalidation: Invalidation) {
    match invalidation {
        Invalidation::Key(key) => memory.remove(&key).await,
        Invalidation::Tag(tag) => memory.remove_tagged(&tag),
        Invalidation::All => memory.remove_all(),
    }
}

/// How much earlier than this replica's own clock says the catch-up reads the
/// invalidation log: other replicas' clocks stamp it.
const CLOCK_MARGIN: Duration = Duration::from_secs(5);

/// After each window in which this replica's subscriber was cut off, memory forgets
/// what was invalidated meanwhile (read back from Redis's log), so that a later outage
/// cannot serve it. A log Redis cannot give now is asked for again each `every`; once
/// the log no longer reaches back to the window, memory forgets everything. Ends with
/// the store.
fn spawn_catch_up(
    store: Weak<RedisStore>,
    memory: MemoryStore,
    mut missed: MissedWindows,
    every: Duration,
) {
    tokio::spawn(async move {
        while let Some(since) = missed.next().await {
            let since = since
                .checked_sub(CLOCK_MARGIN)
                .unwrap_or(std::time::UNIX_EPOCH);
            loop {
                let Some(store) = store.upgrade() else {
                    return;
                };
                match store.logged_since(since).await {
                    Ok(Some(invalidations)) => {
                        tracing::debug!(target: TARGET, missed = invalidations.len(), outcome = "invalidations-caught-up");
                        for invalidation in invalidations {
                            forget(&memory, invalidation).await;
                        }
                        break;
                    }
                    Ok(None) => {
                        tracing::debug!(target: TARGET, outcome = "invalidations-out-of-reach");
                        memory.remove_all();
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(target: TARGET, error = %e, outcome = "invalidation-log-unreadable");
                    }
                }
                drop(store);
                tokio::time::sleep(every).await;
            }
        }
    });
}

/// Replays the operations Redis could not take, oldest first, every `every`; ends
/// with the store.
fn spawn_replay(
    pending: Weak<Mutex<VecDeque<StoreRequest>>>,
    admin: RedisStack,
    every: std::time::Duration,
    counters: Arc<Counters>,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(pending) = pending.upgrade() else {
                return;
            };
            loop {
                let next = pending.lock().ok().and_then(|p| p.front().cloned());
                let Some(request) = next else {
                    break;
                };
                if admin.clone().oneshot(request).await.is_err() {
                    break; // Redis still cannot: try again later, in the same order
                }
                if let Ok(mut p) = pending.lock() {
                    p.pop_front();
                }
                counters.add(Counter::RedisReplay);
            }
        }
    });
}

/// Sends a run of queued sets as one pipeline and counts the outcome.
async fn send_sets(
    writer: &RedisStack,
    sets: Vec<(CacheKey, Entry, std::time::SystemTime)>,
    counters: &Counters,
    replay: &Mutex<VecDeque<StoreRequest>>,
) {
    let count = sets.len();
    if count == 0 {
        return;
    }
    let request = StoreRequest::set(sets);
    match writer.clone().oneshot(request.clone()).await {
        Ok(response) => match response.answer {
            StoreAnswer::Written { written, failed } => {
                counters.add_n(Counter::RedisWrite, written);
                counters.add_n(Counter::RedisError, failed);
            }
            _ => counters.add_n(Counter::RedisError, count),
        },
        Err(e) => {
            count_failure(counters, &e);
            counters.add_n(Counter::RedisError, count.saturating_sub(1));
            tracing::debug!(target: TARGET, entries = count, error = %e, outcome = "redis-write-failed");
            // Redis is away (not refusing): the batch waits for it, in order with the
            // removals (marks drop what an invalidation has since superseded, and
            // entries that expire meanwhile are not sent).
            if counts_against_redis(&e) {
                keep_for_replay(replay, request, counters);
            }
        }
    }
}

/// Whether an error says Redis is unreachable or unwell (lost connection, timeout,
/// loading, failing over), as opposed to answering with an error reply.
fn counts_against_redis(error: &BoxError) -> bool {
    error
        .downcast_ref::<StoreError>()
        .is_none_or(StoreError::is_outage)
}

/// Counts a failed Redis operation, and why when the stack itself refused or cut it.
fn count_failure(counters: &Counters, error: &BoxError) {
    counters.add(Counter::RedisError);
    if error.is::<CircuitOpen>() {
        counters.add(Counter::RedisBreakerRejection);
    } else if error.is::<Elapsed>() {
        counters.add(Counter::RedisDeadlineHit);
    }
}
