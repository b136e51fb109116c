//! The Redis tier of a hybrid store, started: its service stacks and tasks, and the
//! operations the hybrid store routes to it.
//!
//! The stacks, outside in: the breaker (while open, nothing touches Redis), one
//! deadline for the whole operation, retries of transient errors, the application's
//! own layers, the store. Writes and removals off the response path run the same
//! stack without the deadline. A lookup's read, the hot path of a Redis hit, runs the
//! same steps written out, shared by the lookups of its key that arrive meanwhile.

use std::pin::Pin;

use tokio::sync::futures::OwnedNotified;

use super::pending::PendingWrites;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::retry::{Policy, RetryLayer};
use tower::timeout::error::Elapsed;
use tower::timeout::TimeoutLayer;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};

use super::coherence::{spawn_catch_up, spawn_listener};
use super::memory::MemoryStore;
use super::read_flights::{Joined, ReadFlights};
use super::redis::retry::RedisRetry;
use super::redis::{decoded, KeyRead, RedisConfig, RedisHealth, RedisService, RedisStore};
use super::replay::Replay;
use super::reseed::spawn_reseed;
use super::writer::{spawn_writer, QueuedWrite};
use super::{
    RedisTierService, StoreAnswer, StoreError, StoreErrorKind, StoreRequest, StoreResponse,
};
use crate::breaker::{BreakerState, CircuitBreaker, CircuitBreakerLayer, CircuitOpen};
use crate::entry::{encodes_version_of, Entry};
use crate::key::CacheKey;
use crate::telemetry::{Counter, Counters, TARGET};

/// A Redis tier's service stack, shared by every clone.
pub(crate) type RedisStack = BoxCloneSyncService<StoreRequest, StoreResponse, BoxError>;

/// A user's layer on the Redis tier, applied to the store.
pub(crate) type RedisLayerFn = Arc<dyn Fn(RedisTierService) -> RedisTierService + Send + Sync>;

/// The Redis tier of a hybrid store, started. Clones share everything.
#[derive(Clone)]
pub(crate) struct RedisTier {
    /// Deletes and leases (and reads, when the application added layers around the
    /// store): breaker, deadline, retries, store.
    service: RedisStack,
    /// The store itself, for what is not an operation (health, shutdown).
    store: Arc<RedisStore>,
    breaker: CircuitBreaker,
    /// The background writer's queue.
    writes: mpsc::Sender<QueuedWrite>,
    /// What Redis could not take, for the replay task.
    replay: Replay,
    /// Operations off the response path (no deadline): the writer's stack.
    admin: RedisStack,
    /// How a lookup reads Redis.
    reader: Arc<RedisReader>,
    /// Reads of a key on their way, shared by the lookups that arrive meanwhile.
    reads: ReadFlights<RedisRead>,
    /// Entries the writer holds that Redis has not answered for yet.
    pending: Arc<PendingWrites>,
    counters: Arc<Counters>,
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

/// How the tier is put together: its settings, the breaker, the retry policy (built,
/// and so checked, before anything connects) and the application's layers.
pub(crate) struct TierParts<'a> {
    pub(crate) config: &'a RedisConfig,
    pub(crate) breaker: CircuitBreakerLayer,
    pub(crate) retry: RedisRetry,
    pub(crate) layers: &'a [RedisLayerFn],
}

impl RedisTier {
    /// Builds the stacks around `store` and starts the tier's tasks on the current
    /// runtime: the writer, the replay, the invalidation listener and catch-up (which
    /// forget in `memory` what other replicas invalidated).
    pub(crate) fn start(
        store: RedisStore,
        parts: TierParts<'_>,
        memory: &MemoryStore,
        counters: Arc<Counters>,
    ) -> Self {
        let TierParts {
            config,
            breaker,
            retry: policy,
            layers,
        } = parts;
        // Error replies (OOM, WRONGTYPE) say Redis is up and answering: by default
        // they do not trip the breaker; a breaker given its own filter keeps it.
        let breaker = if breaker.filters_errors() {
            breaker
        } else {
            breaker.count_errors_if(counts_against_redis)
        };
        let driven = breaker.breaker();
        driven.report_state();
        store.drive(driven);
        let missed = store.missed_windows();
        spawn_listener(
            store.invalidations(),
            store.invalidation_channel(),
            store.closed(),
            memory.clone(),
            missed.as_ref().map(|(_, reporter)| reporter.clone()),
        );
        let store = Arc::new(store);
        store.follow_written(config.probe_interval_value());
        spawn_reseed(
            Arc::downgrade(&store),
            memory.clone(),
            Arc::clone(&counters),
        );
        if let Some((missed, _)) = missed {
            spawn_catch_up(
                Arc::downgrade(&store),
                memory.clone(),
                missed,
                config.probe_interval_value(),
            );
        }
        let retry = RetryLayer::new(policy.clone());
        // The user's layers wrap the store itself, so they see every attempt; the
        // first added is the outermost, as with `ServiceBuilder`.
        let inner = layers.iter().rev().fold(
            RedisTierService::new(RedisService(Arc::clone(&store))),
            |service, layer| layer(service),
        );
        let service = BoxCloneSyncService::new(
            ServiceBuilder::new()
                .layer(breaker.clone())
                .layer(TimeoutLayer::new(config.deadline_value()))
                .layer(retry.clone())
                .service(inner.clone()),
        );
        // Writes are off the response path: no deadline beyond each attempt's.
        let admin: RedisStack = BoxCloneSyncService::new(
            ServiceBuilder::new()
                .layer(breaker.clone())
                .layer(retry)
                .service(inner),
        );
        let replay = Replay::default();
        replay.spawn(
            admin.clone(),
            config.probe_interval_value(),
            Arc::clone(&counters),
        );
        let (writes, queue) = mpsc::channel::<QueuedWrite>(config.write_queue_len());
        let pending = Arc::new(PendingWrites::default());
        spawn_writer(
            queue,
            admin.clone(),
            replay.clone(),
            (Arc::clone(&pending), Arc::clone(&counters)),
        );
        let reader = Arc::new(RedisReader {
            store: Arc::clone(&store),
            breaker: breaker.breaker(),
            deadline: config.deadline_value(),
            retry: policy,
            layered: (!layers.is_empty()).then(|| service.clone()),
            memory: memory.clone(),
            counters: Arc::clone(&counters),
        });
        RedisTier {
            service,
            store,
            breaker: breaker.breaker(),
            writes,
            replay,
            admin,
            reader,
            reads: ReadFlights::new(),
            pending,
            counters,
        }
    }

    /// A wake-up for when the writes of `key` this replica queued are answered;
    /// `None` when there are none.
    pub(crate) fn pending_write(&self, key: &CacheKey) -> Option<Pin<Box<OwnedNotified>>> {
        self.pending.wait_for(key)
    }

    /// How long a lookup may wait on Redis.
    pub(crate) fn deadline(&self) -> Duration {
        self.reader.deadline
    }

    /// A Redis read of `key` sent after this call, shared with the lookups of the same
    /// key that arrive while it waits; with the breaker open, a failure at once.
    pub(crate) async fn read(&self, key: &CacheKey) -> RedisRead {
        if self.breaker.state() == BreakerState::Open {
            // What the stack would answer at once, without its allocations: the hot
            // path of an outage.
            self.counters.add(Counter::RedisError);
            self.counters.add(Counter::RedisBreakerRejection);
            return RedisRead::Failed;
        }
        if self.store.surely_absent(key) {
            // No replica wrote it: what the read would answer, without the round trip.
            self.counters.add(Counter::RedisReadSkipped);
            return RedisRead::Absent;
        }
        let reader = &self.reader;
        match self
            .reads
            .join(*key, || Arc::clone(reader).read_and_keep(*key))
        {
            Joined::Own(end) => {
                let outcome = reader.look_up(*key).await;
                // At once, not when the caller drops this future: the next read may go.
                drop(end);
                outcome
            }
            Joined::Shared { read, joined } => {
                if joined {
                    self.counters.add(Counter::RedisReadShared);
                }
                // Two reads' time at most; the lookup's own bound stays one deadline.
                match tokio::time::timeout(self.reader.deadline, read).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        self.counters.add(Counter::RedisDeadlineHit);
                        RedisRead::Failed
                    }
                }
            }
        }
    }

    /// Queues a write for the background writer. An entry too large for Redis is not
    /// queued; a full queue drops an entry or a lease's release (counted), and hands a
    /// delete to the replay: an invalidation is never dropped for room.
    pub(crate) fn queue(&self, write: QueuedWrite) {
        use mpsc::error::TrySendError;
        if let QueuedWrite::Set(key, entry, _) = &write {
            // Not encoded, nor queued, only to be found too large by the writer.
            if self.store.surely_too_large(entry) {
                return;
            }
            self.pending.add(*key);
        }
        match self.writes.try_send(write) {
            Ok(()) => {}
            Err(TrySendError::Full(QueuedWrite::Delete(key))) => {
                self.replay.keep(StoreRequest::delete(key), &self.counters);
            }
            Err(
                TrySendError::Full(QueuedWrite::Set(key, ..))
                | TrySendError::Closed(QueuedWrite::Set(key, ..)),
            ) => {
                self.pending.done([&key]);
                self.counters.add(Counter::RedisWriteDropped);
            }
            Err(_) => self.counters.add(Counter::RedisWriteDropped),
        }
    }

    /// Deletes `key` now, within the deadline; `false` (counted) when Redis could not:
    /// the delete is then kept for the replay.
    pub(crate) async fn delete(&self, key: &CacheKey) -> bool {
        let request = StoreRequest::delete(*key);
        match self.service.clone().oneshot(request.clone()).await {
            Ok(_) => true,
            Err(e) => {
                count_failure(&self.counters, &e);
                tracing::debug!(target: TARGET, key = %key, error = %e, outcome = "redis-delete-queued");
                self.replay.keep(request, &self.counters);
                false
            }
        }
    }

    /// Sends a removal (a tag invalidation, a purge) off the response path; `false`
    /// when Redis could not take it now: it is kept for the replay.
    pub(crate) async fn remove(&self, request: StoreRequest) -> bool {
        match self.admin.clone().oneshot(request.clone()).await {
            Ok(_) => true,
            Err(e) => {
                count_failure(&self.counters, &e);
                tracing::debug!(target: TARGET, error = %e, outcome = "redis-removal-queued");
                self.replay.keep(request, &self.counters);
                false
            }
        }
    }

    /// Tries to take the cross-replica fill lease of `key` for `ttl`, as `token`.
    pub(crate) async fn lease(&self, key: &CacheKey, token: u64, ttl: Duration) -> Lease {
        match self
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

    /// Operations waiting for Redis to come back.
    pub(crate) fn pending(&self) -> usize {
        self.replay.len()
    }

    /// Whether `entry`, read from Redis under `key`, was invalidated here by an
    /// operation Redis has not taken yet (it waits for replay).
    pub(crate) fn awaits_invalidation(&self, key: &CacheKey, entry: &Entry) -> bool {
        self.replay.invalidates(key, entry.tags())
    }

    pub(crate) fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    pub(crate) fn health(&self) -> RedisHealth {
        self.store.health()
    }

    /// When Redis last came back after an outage (ms since the epoch; 0: never).
    pub(crate) fn recovered_at(&self) -> u64 {
        self.store.recovered_at()
    }

    /// Whether memory is re-seeding a Redis that lost its data: until it is done, a
    /// Redis miss is not the shared truth.
    pub(crate) fn reseeding(&self) -> bool {
        self.store.reseeding()
    }

    /// Closes the connections.
    pub(crate) async fn shutdown(&self) {
        self.store.quit().await;
    }
}

/// What a Redis read found, shared by the lookups that waited for it.
#[derive(Clone)]
pub(crate) enum RedisRead {
    Found(Entry),
    Absent,
    /// Failed, timed out or refused (counted once, by the read): memory answers.
    Failed,
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

/// What a lookup's read of Redis found.
enum Fetched {
    /// Through the application's layers, whose store answers decoded entries.
    Decoded(Entry),
    /// Straight from the store, as Redis holds it.
    Encoded(Bytes),
    /// The edition memory holds, told by the value's head alone.
    Held,
}

impl RedisReader {
    /// [`RedisReader::look_up`] in a future of its own, for a read shared by lookups.
    async fn read_and_keep(self: Arc<Self>, key: CacheKey) -> RedisRead {
        self.look_up(key).await
    }

    /// Reads `key`, fills memory with a hit, and counts a failure.
    ///
    /// Memory is looked up first: when it holds a response, Redis is asked for the
    /// head of its value only (`GETRANGE`, 14 bytes), and memory's copy serves when
    /// Redis holds the same edition, as it does on most hits; the value is read whole
    /// only when Redis holds another. The lookup also tells memory the key is in use,
    /// so that memory keeps what Redis serves most.
    async fn look_up(&self, key: CacheKey) -> RedisRead {
        let held = self.memory.get(&key);
        let found = match self.read(key, held.as_ref()).await {
            Ok(Some(found)) => found,
            Ok(None) => return RedisRead::Absent,
            Err(e) => {
                count_failure(&self.counters, &e);
                tracing::debug!(target: TARGET, key = %key, error = %e, outcome = "redis-read-failed");
                return RedisRead::Failed;
            }
        };
        let entry = match found {
            Fetched::Held => {
                self.counters.add(Counter::RedisHeadHit);
                return held.map_or(RedisRead::Absent, RedisRead::Found);
            }
            Fetched::Decoded(entry) => entry,
            Fetched::Encoded(bytes) => match &held {
                Some(held) if encodes_version_of(&bytes, held) => {
                    return RedisRead::Found(held.clone());
                }
                _ => match decoded(&key, bytes) {
                    Some(entry) => entry,
                    None => return RedisRead::Absent,
                },
            },
        };
        if !held.is_some_and(|held| held.same_version(&entry)) {
            self.memory.insert(key, entry.clone());
        }
        RedisRead::Found(entry)
    }

    async fn read(&self, key: CacheKey, held: Option<&Entry>) -> Result<Option<Fetched>, BoxError> {
        if let Some(stack) = &self.layered {
            let response = stack.clone().oneshot(StoreRequest::get(key)).await?;
            return Ok(match response.answer {
                StoreAnswer::Found(found) => found.map(Fetched::Decoded),
                _ => None,
            });
        }
        let call = self.breaker.call()?;
        let found = self.attempts(key, held).await;
        call.finish(&found);
        found
    }

    /// The store's answer within the deadline, retried as the retry policy says. With
    /// a response `held` in memory, the value's head is read first, and the whole
    /// value only if it is another edition.
    ///
    /// The first attempt is written out, and the policy asked (in a boxed future of
    /// its own) only once it failed: most reads succeed at once, and what only a
    /// retry needs (the policy, the request it counts, the backoff) stays out of
    /// their future.
    async fn attempts(
        &self,
        key: CacheKey,
        held: Option<&Entry>,
    ) -> Result<Option<Fetched>, BoxError> {
        let until = after(self.deadline);
        let mut head_of = held
            .filter(|held| matches!(held, Entry::Response(_)))
            .filter(|_| self.store.head_reads_allowed());
        // The whole deadline is left: `until` was taken just now.
        let first = self.cut(self.deadline);
        match self.attempt(key, &mut head_of, 0, first, until).await {
            Ok(found) => {
                self.retry.succeeded();
                Ok(found)
            }
            Err(error) if error.is::<Elapsed>() => Err(error),
            Err(error) => Box::pin(self.retried(key, head_of, until, error)).await,
        }
    }

    /// Attempts after a first that failed with `error`, while the policy allows and
    /// the deadline `until` lasts.
    async fn retried(
        &self,
        key: CacheKey,
        mut head_of: Option<&Entry>,
        until: Instant,
        error: BoxError,
    ) -> Result<Option<Fetched>, BoxError> {
        let mut request = StoreRequest::get(key);
        let mut policy = self.retry.clone();
        let mut failed: Result<StoreResponse, BoxError> = Err(error);
        loop {
            let Some(backoff) = policy.retry(&mut request, &mut failed) else {
                return failed.map(|_| None);
            };
            if tokio::time::timeout_at(until, backoff).await.is_err() {
                return Err(Elapsed::new().into());
            }
            let cut = self.cut(until.saturating_duration_since(Instant::now()));
            match self
                .attempt(key, &mut head_of, request.attempt, cut, until)
                .await
            {
                Ok(found) => {
                    self.retry.succeeded();
                    return Ok(found);
                }
                Err(error) if error.is::<Elapsed>() => return Err(error),
                Err(error) => failed = Err(error),
            }
        }
    }

    /// One attempt: the value's head when memory holds `head_of` (forgotten if Redis
    /// holds another edition, which is then read whole by `until`), else the whole
    /// value. `cut` is the attempt's [`RedisReader::cut`]; a timeout it caused is the
    /// deadline's `Elapsed`, which ends the read.
    async fn attempt(
        &self,
        key: CacheKey,
        head_of: &mut Option<&Entry>,
        attempt: u8,
        cut: Result<Option<Duration>, Elapsed>,
        until: Instant,
    ) -> Result<Option<Fetched>, BoxError> {
        let mut cut = cut?;
        if let Some(held) = *head_of {
            let read = self.store.get_head(&key, attempt, cut).await;
            match self.counted(read).map(KeyRead::into_bytes) {
                Ok(Some(head)) if !encodes_version_of(&head, held) => {
                    // Another edition: read it whole, within the same deadline.
                    *head_of = None;
                    cut = self.cut(until.saturating_duration_since(Instant::now()))?;
                }
                head => {
                    return head
                        .map(|head| head.map(|_| Fetched::Held))
                        .map_err(|error| cut_off(error, cut));
                }
            }
        }
        let read = self.store.get_encoded(&key, attempt, cut).await;
        self.counted(read)
            .map(|found| found.into_bytes().map(Fetched::Encoded))
            .map_err(|error| cut_off(error, cut))
    }

    /// `read`, counted if a batch read it.
    fn counted(&self, read: Result<KeyRead, StoreError>) -> Result<KeyRead, StoreError> {
        if read.as_ref().is_ok_and(KeyRead::was_batched) {
            self.counters.add(Counter::RedisReadBatched);
        }
        read
    }

    /// How an attempt with `left` of the deadline is bounded: `Some(left)` when the
    /// deadline cuts it before the command timeout would (its timeout is then the
    /// deadline, rather than a timer of its own around the attempt: one timer a read,
    /// not two, about 800 instructions a Redis hit; BENCHMARKS, "Redis path,
    /// instructions"), `None` when the command timeout comes first, `Elapsed` when
    /// nothing is left.
    fn cut(&self, left: Duration) -> Result<Option<Duration>, Elapsed> {
        if left.is_zero() {
            return Err(Elapsed::new());
        }
        Ok((left <= self.store.command_timeout()).then_some(left))
    }
}

/// A failed attempt's error: the deadline's `Elapsed` when the attempt timed out
/// under its `cut`, the store's error otherwise.
fn cut_off(error: StoreError, cut: Option<Duration>) -> BoxError {
    if cut.is_some() && error.kind() == StoreErrorKind::Timeout {
        Elapsed::new().into()
    } else {
        error.into()
    }
}

/// `wait` from now; a wait too long to be told from forever (`Duration::MAX` is a
/// valid deadline) is 30 years, as tokio's own timeouts take it.
fn after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

/// Whether an error says Redis is unreachable or unwell (lost connection, timeout,
/// loading, failing over), as opposed to answering with an error reply.
pub(crate) fn counts_against_redis(error: &BoxError) -> bool {
    error
        .downcast_ref::<StoreError>()
        .is_none_or(StoreError::is_outage)
}

/// Counts a failed Redis operation, and why when the stack itself refused or cut it.
pub(crate) fn count_failure(counters: &Counters, error: &BoxError) {
    counters.add(Counter::RedisError);
    if error.is::<CircuitOpen>() {
        counters.add(Counter::RedisBreakerRejection);
    } else if error.is::<Elapsed>() {
        counters.add(Counter::RedisDeadlineHit);
    }
}
