//! Counters, metric names and tracing fields in one place.
//!
//! Every decision is a `tracing` event at `debug` level with the target
//! `tower_hybrid_cache` and the fields `key`, `outcome` and, where it applies,
//! `detail`, inside a span per request ([`request_span`]) that carries the outcome.
//! Every counter is both a plain atomic read through
//! [`HybridCache::stats`](crate::HybridCache::stats) and a counter of the `metrics`
//! facade (for the recorder the application installed before building the cache:
//! the handles are registered then), named
//! `tower_hybrid_cache_<field>_total` after the [`CacheStats`] field; the circuit
//! breaker reports `tower_hybrid_cache_breaker_state` (0 closed, 1 half-open, 2 open)
//! and `tower_hybrid_cache_breaker_transitions_total`; `tower_hybrid_cache_lookup_seconds`
//! (label `tier`) times each tier's lookups, through handles registered when the
//! cache is built (the recorder must be installed first).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The `tracing` target of every event the crate emits.
pub(crate) const TARGET: &str = "tower_hybrid_cache";

/// Counters of what the cache did since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Requests answered from a stored response (a stale one served because the
    /// origin failed included).
    pub hits: u64,
    /// Cacheable requests the origin answered (revalidations included).
    pub misses: u64,
    /// Requests the cache did not handle (unsafe methods, `Range`).
    pub bypasses: u64,
    /// Responses written to the store.
    pub stores: u64,
    /// Responses to cacheable requests that were not stored (policy or size).
    pub not_stored: u64,
    /// Requests that waited for another request's origin call instead of making their
    /// own.
    pub coalesced: u64,
    /// Entries written to Redis.
    pub redis_writes: u64,
    /// Redis operations that failed, timed out or were refused by the open breaker
    /// (the request went on without Redis); the last two are also counted apart, in
    /// `redis_deadline_hits` and `redis_breaker_rejections`.
    pub redis_errors: u64,
    /// Writes dropped because the Redis write queue was full.
    pub redis_writes_dropped: u64,
    /// Redis operations sent again after a transient error.
    pub redis_retries: u64,
    /// Retries not made because the retry budget was spent.
    pub retry_budget_exhausted: u64,
    /// Redis operations cut off by the deadline (retries included), and lookups that
    /// waited that long for a read they shared.
    pub redis_deadline_hits: u64,
    /// Redis operations refused at once because the circuit breaker was open.
    pub redis_breaker_rejections: u64,
    /// Lookups the memory tier answered because Redis failed, timed out or was
    /// refused by the breaker.
    pub fallback_hits: u64,
    /// Lookups that shared a Redis read of their key with other lookups instead of
    /// sending their own (hot keys: at most one read in flight and one waiting per
    /// key).
    pub redis_reads_shared: u64,
    /// Lookups that did not read Redis because no replica wrote their key (with
    /// [`RedisConfig::track_written_keys`](crate::RedisConfig::track_written_keys)):
    /// a miss known without a round trip.
    pub redis_reads_skipped: u64,
    /// Keys invalidated: by a successful unsafe request (POST, PUT, PATCH, DELETE …)
    /// through the layer, or by `HybridCache::invalidate`.
    pub invalidations: u64,
    /// Operations (write batches, invalidations, tag invalidations, purges) that
    /// Redis could not take when asked, replayed once it could.
    pub redis_replays: u64,
    /// Removals kept for Redis that were folded into one purge of the namespace,
    /// because more were waiting than the replay keeps (10 000, or 4 MiB of tags).
    pub redis_removals_folded: u64,
    /// Kept operations given up because Redis refused them with an error reply
    /// (`NOPERM`, `WRONGTYPE`, `OOM`): a write batch at once, a removal after five.
    pub redis_replays_refused: u64,
    /// Entries this replica wrote back from memory to a Redis that lost its data.
    pub redis_reseeds: u64,
}

/// What the cache counts: atomics for [`CacheStats`], and a `metrics` handle per
/// counter, registered with the recorder installed when the cache is built (one
/// `counter!` per count builds and hashes its key: about 200 instructions a hit).
pub(crate) struct Counters {
    handles: [metrics::Counter; COUNTERS],
    hits: AtomicU64,
    misses: AtomicU64,
    bypasses: AtomicU64,
    stores: AtomicU64,
    not_stored: AtomicU64,
    coalesced: AtomicU64,
    redis_writes: AtomicU64,
    redis_errors: AtomicU64,
    redis_writes_dropped: AtomicU64,
    redis_retries: AtomicU64,
    retry_budget_exhausted: AtomicU64,
    redis_deadline_hits: AtomicU64,
    redis_breaker_rejections: AtomicU64,
    fallback_hits: AtomicU64,
    redis_reads_shared: AtomicU64,
    redis_reads_skipped: AtomicU64,
    invalidations: AtomicU64,
    redis_replays: AtomicU64,
    redis_removals_folded: AtomicU64,
    redis_replays_refused: AtomicU64,
    redis_reseeds: AtomicU64,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Counters").field(&self.snapshot()).finish()
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            handles: ALL.map(|counter| metrics::counter!(counter.metric_name())),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            bypasses: AtomicU64::new(0),
            stores: AtomicU64::new(0),
            not_stored: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            redis_writes: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
            redis_writes_dropped: AtomicU64::new(0),
            redis_retries: AtomicU64::new(0),
            retry_budget_exhausted: AtomicU64::new(0),
            redis_deadline_hits: AtomicU64::new(0),
            redis_breaker_rejections: AtomicU64::new(0),
            fallback_hits: AtomicU64::new(0),
            redis_reads_shared: AtomicU64::new(0),
            redis_reads_skipped: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            redis_replays: AtomicU64::new(0),
            redis_removals_folded: AtomicU64::new(0),
            redis_replays_refused: AtomicU64::new(0),
            redis_reseeds: AtomicU64::new(0),
        }
    }
}

/// How many counters there are.
const COUNTERS: usize = 21;

/// Every counter, in declaration order (its index in `Counters::handles`).
const ALL: [Counter; COUNTERS] = [
    Counter::Hit,
    Counter::Miss,
    Counter::Bypass,
    Counter::Store,
    Counter::NotStored,
    Counter::Coalesced,
    Counter::RedisWrite,
    Counter::RedisError,
    Counter::RedisWriteDropped,
    Counter::RedisRetry,
    Counter::RetryBudgetExhausted,
    Counter::RedisDeadlineHit,
    Counter::RedisBreakerRejection,
    Counter::FallbackHit,
    Counter::RedisReadShared,
    Counter::RedisReadSkipped,
    Counter::Invalidation,
    Counter::RedisReplay,
    Counter::RedisRemovalFolded,
    Counter::RedisReplayRefused,
    Counter::RedisReseed,
];

#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Hit,
    Miss,
    Bypass,
    Store,
    NotStored,
    Coalesced,
    RedisWrite,
    RedisError,
    RedisWriteDropped,
    RedisRetry,
    RetryBudgetExhausted,
    RedisDeadlineHit,
    RedisBreakerRejection,
    FallbackHit,
    RedisReadShared,
    RedisReadSkipped,
    Invalidation,
    RedisReplay,
    RedisRemovalFolded,
    RedisReplayRefused,
    RedisReseed,
}

impl Counter {
    /// The name of the counter in the `metrics` facade.
    pub(crate) fn metric_name(self) -> &'static str {
        match self {
            Counter::Hit => "tower_hybrid_cache_hits_total",
            Counter::Miss => "tower_hybrid_cache_misses_total",
            Counter::Bypass => "tower_hybrid_cache_bypasses_total",
            Counter::Store => "tower_hybrid_cache_stores_total",
            Counter::NotStored => "tower_hybrid_cache_not_stored_total",
            Counter::Coalesced => "tower_hybrid_cache_coalesced_total",
            Counter::RedisWrite => "tower_hybrid_cache_redis_writes_total",
            Counter::RedisError => "tower_hybrid_cache_redis_errors_total",
            Counter::RedisWriteDropped => "tower_hybrid_cache_redis_writes_dropped_total",
            Counter::RedisRetry => "tower_hybrid_cache_redis_retries_total",
            Counter::RetryBudgetExhausted => "tower_hybrid_cache_retry_budget_exhausted_total",
            Counter::RedisDeadlineHit => "tower_hybrid_cache_redis_deadline_hits_total",
            Counter::RedisBreakerRejection => "tower_hybrid_cache_redis_breaker_rejections_total",
            Counter::FallbackHit => "tower_hybrid_cache_fallback_hits_total",
            Counter::RedisReadShared => "tower_hybrid_cache_redis_reads_shared_total",
            Counter::RedisReadSkipped => "tower_hybrid_cache_redis_reads_skipped_total",
            Counter::Invalidation => "tower_hybrid_cache_invalidations_total",
            Counter::RedisReplay => "tower_hybrid_cache_redis_replays_total",
            Counter::RedisRemovalFolded => "tower_hybrid_cache_redis_removals_folded_total",
            Counter::RedisReplayRefused => "tower_hybrid_cache_redis_replays_refused_total",
            Counter::RedisReseed => "tower_hybrid_cache_redis_reseeds_total",
        }
    }
}

/// A counter that records nothing (for an index `ALL` would not have).
static NOOP: metrics::Counter = metrics::Counter::noop();

/// The breaker's state as a gauge value.
pub(crate) const BREAKER_STATE: &str = "tower_hybrid_cache_breaker_state";
/// How long an invalidation took from the replica that published it to this one's
/// memory (seconds, by the two replicas' clocks).
pub(crate) const INVALIDATION_DELAY: &str = "tower_hybrid_cache_invalidation_delay_seconds";
/// How far past its freshness a stale response was when served (stale-while-revalidate,
/// stale-if-error), in seconds.
pub(crate) const STALE_SERVED: &str = "tower_hybrid_cache_stale_served_seconds";
/// Commands the connected Redis refused (see `RedisHealth::missing_commands`).
pub(crate) const MISSING_COMMANDS: &str = "tower_hybrid_cache_redis_missing_commands";
/// Breaker state changes.
pub(crate) const BREAKER_TRANSITIONS: &str = "tower_hybrid_cache_breaker_transitions_total";
/// How long one tier took to answer a lookup (found or not), in seconds, labelled
/// `tier` (`memory`, `redis`).
pub(crate) const LOOKUP_SECONDS: &str = "tower_hybrid_cache_lookup_seconds";

/// The span of one request through a cache layer (`debug` level, target
/// `tower_hybrid_cache`), with the fields [`CacheStatus`](crate::layer) records once
/// the cache has decided: `cache.outcome` (`hit`, `stale`, `miss`, `bypass`) and,
/// where they apply, `cache.fwd`, `cache.fwd_status`, `cache.stored`, `cache.detail`.
/// A disabled span (no subscriber wants it) costs a level check.
pub(crate) fn request_span() -> tracing::Span {
    // Checked first: with `tracing`'s `log` feature on (axum turns it on), a
    // disabled span is still offered to `log`, at a cost on every hit.
    if !tracing::level_enabled!(tracing::Level::DEBUG) {
        return tracing::Span::none();
    }
    tracing::debug_span!(
        target: TARGET,
        "tower_hybrid_cache",
        cache.outcome = tracing::field::Empty,
        cache.fwd = tracing::field::Empty,
        cache.fwd_status = tracing::field::Empty,
        cache.stored = tracing::field::Empty,
        cache.detail = tracing::field::Empty,
    )
}

/// The lookup-latency histograms of one cache, one per tier: registered with the
/// recorder installed when the cache is built, so that a lookup records into a
/// handle instead of building and hashing a key (as `histogram!` does per call:
/// about 200 instructions on a memory hit, measured).
#[derive(Clone)]
pub(crate) struct LookupTimers {
    memory: metrics::Histogram,
    redis: metrics::Histogram,
}

impl std::fmt::Debug for LookupTimers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupTimers").finish_non_exhaustive()
    }
}

impl LookupTimers {
    pub(crate) fn register() -> Self {
        LookupTimers {
            memory: metrics::histogram!(LOOKUP_SECONDS, "tier" => "memory"),
            redis: metrics::histogram!(LOOKUP_SECONDS, "tier" => "redis"),
        }
    }

    /// Records a memory lookup that began at `started`.
    pub(crate) fn memory(&self, started: Instant) {
        self.memory.record(started.elapsed().as_secs_f64());
    }

    /// Records a Redis lookup that began at `started`.
    pub(crate) fn redis(&self, started: Instant) {
        self.redis.record(started.elapsed().as_secs_f64());
    }
}

impl Counters {
    pub(crate) fn add_n(&self, counter: Counter, n: usize) {
        if n > 0 {
            self.cell(counter).fetch_add(n as u64, Ordering::Relaxed);
            self.handle(counter).increment(n as u64);
        }
    }

    pub(crate) fn add(&self, counter: Counter) {
        self.cell(counter).fetch_add(1, Ordering::Relaxed);
        self.handle(counter).increment(1);
    }

    fn handle(&self, counter: Counter) -> &metrics::Counter {
        // `ALL` lists every variant in declaration order: the discriminant is the
        // index (checked by the tests).
        match self.handles.get(counter as usize) {
            Some(handle) => handle,
            None => &NOOP,
        }
    }

    fn cell(&self, counter: Counter) -> &AtomicU64 {
        match counter {
            Counter::Hit => &self.hits,
            Counter::Miss => &self.misses,
            Counter::Bypass => &self.bypasses,
            Counter::Store => &self.stores,
            Counter::NotStored => &self.not_stored,
            Counter::Coalesced => &self.coalesced,
            Counter::RedisWrite => &self.redis_writes,
            Counter::RedisError => &self.redis_errors,
            Counter::RedisWriteDropped => &self.redis_writes_dropped,
            Counter::RedisRetry => &self.redis_retries,
            Counter::RetryBudgetExhausted => &self.retry_budget_exhausted,
            Counter::RedisDeadlineHit => &self.redis_deadline_hits,
            Counter::RedisBreakerRejection => &self.redis_breaker_rejections,
            Counter::FallbackHit => &self.fallback_hits,
            Counter::RedisReadShared => &self.redis_reads_shared,
            Counter::RedisReadSkipped => &self.redis_reads_skipped,
            Counter::Invalidation => &self.invalidations,
            Counter::RedisReplay => &self.redis_replays,
            Counter::RedisRemovalFolded => &self.redis_removals_folded,
            Counter::RedisReplayRefused => &self.redis_replays_refused,
            Counter::RedisReseed => &self.redis_reseeds,
        }
    }

    pub(crate) fn snapshot(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bypasses: self.bypasses.load(Ordering::Relaxed),
            stores: self.stores.load(Ordering::Relaxed),
            not_stored: self.not_stored.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            redis_writes: self.redis_writes.load(Ordering::Relaxed),
            redis_errors: self.redis_errors.load(Ordering::Relaxed),
            redis_writes_dropped: self.redis_writes_dropped.load(Ordering::Relaxed),
            redis_retries: self.redis_retries.load(Ordering::Relaxed),
            retry_budget_exhausted: self.retry_budget_exhausted.load(Ordering::Relaxed),
            redis_deadline_hits: self.redis_deadline_hits.load(Ordering::Relaxed),
            redis_breaker_rejections: self.redis_breaker_rejections.load(Ordering::Relaxed),
            fallback_hits: self.fallback_hits.load(Ordering::Relaxed),
            redis_reads_shared: self.redis_reads_shared.load(Ordering::Relaxed),
            redis_reads_skipped: self.redis_reads_skipped.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            redis_replays: self.redis_replays.load(Ordering::Relaxed),
            redis_removals_folded: self.redis_removals_folded.load(Ordering::Relaxed),
            redis_replays_refused: self.redis_replays_refused.load(Ordering::Relaxed),
            redis_reseeds: self.redis_reseeds.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn every_counter_has_its_own_field_and_metric_named_after_it() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // Counter i is added i + 1 times, so that each field's value names its counter.
        // The handles are registered when the counters are made: with the recorder.
        let counters = metrics::with_local_recorder(&recorder, || {
            let counters = Counters::default();
            for (i, counter) in ALL.iter().enumerate() {
                assert_eq!(*counter as usize, i, "ALL is in declaration order");
                counters.add_n(*counter, i + 1);
            }
            counters
        });
        let s = counters.snapshot();
        let fields = [
            ("hits", s.hits),
            ("misses", s.misses),
            ("bypasses", s.bypasses),
            ("stores", s.stores),
            ("not_stored", s.not_stored),
            ("coalesced", s.coalesced),
            ("redis_writes", s.redis_writes),
            ("redis_errors", s.redis_errors),
            ("redis_writes_dropped", s.redis_writes_dropped),
            ("redis_retries", s.redis_retries),
            ("retry_budget_exhausted", s.retry_budget_exhausted),
            ("redis_deadline_hits", s.redis_deadline_hits),
            ("redis_breaker_rejections", s.redis_breaker_rejections),
            ("fallback_hits", s.fallback_hits),
            ("redis_reads_shared", s.redis_reads_shared),
            ("redis_reads_skipped", s.redis_reads_skipped),
            ("invalidations", s.invalidations),
            ("redis_replays", s.redis_replays),
            ("redis_removals_folded", s.redis_removals_folded),
            ("redis_replays_refused", s.redis_replays_refused),
            ("redis_reseeds", s.redis_reseeds),
        ];
        let recorded: Vec<(String, DebugValue)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| (key.key().name().to_owned(), value))
            .collect();
        for (i, ((field, value), counter)) in fields.iter().zip(ALL).enumerate() {
            let expected = i as u64 + 1;
            assert_eq!(*value, expected, "{field}");
            let name = format!("tower_hybrid_cache_{field}_total");
            assert_eq!(counter.metric_name(), name);
            assert!(
                recorded
                    .iter()
                    .any(|(n, v)| *n == name && *v == DebugValue::Counter(expected)),
                "{name}"
            );
        }
    }
}
