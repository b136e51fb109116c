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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Redis reads answered by the value's head alone (`GETRANGE`, 14 bytes): memory
    /// held the edition Redis holds and served its copy (a read shared by several
    /// lookups counts once). Other Redis hits read the value whole: another edition,
    /// or nothing in memory.
    pub redis_head_hits: u64,
    /// Redis reads sent with other keys' in one command (a script call of
    /// `GETRANGE`s for heads, an `MGET` for whole values): lookups that arrived while
    /// four reads of the same kind were on their way, and queued for the next batch
    /// instead of sending a command each (not on a Redis Cluster, nor where Redis
    /// refuses the batch's command). Lookups through
    /// [`HybridCacheBuilder::redis_layer`](crate::HybridCacheBuilder::redis_layer)
    /// layers are batched but not counted here.
    pub redis_reads_batched: u64,
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
///
/// The atomics are striped: each thread adds to a stripe of its own (threads are
/// dealt stripes in turn), a cache line apart from the others, and a snapshot sums
/// them. One atomic per counter made every hit on two cores bounce its line between
/// them (about 20 ns a hit over HTTP, `perf`).
pub(crate) struct Counters {
    handles: [metrics::Counter; COUNTERS],
    stripes: Box<[Stripe; STRIPES]>,
}

/// How many stripes the counters are split into (a power of two).
const STRIPES: usize = 8;

/// One stripe of every counter, alone on its cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Stripe([AtomicU64; COUNTERS]);

thread_local! {
    /// This thread's stripe, dealt on its first count.
    static STRIPE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The next stripe to deal to a thread.
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

/// The stripe the calling thread adds to.
fn this_threads_stripe() -> usize {
    STRIPE
        .try_with(|stripe| match stripe.get() {
            Some(at) => at,
            None => {
                let at = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) & (STRIPES - 1);
                stripe.set(Some(at));
                at
            }
        })
        // A thread tearing down its locals adds to the first stripe.
        .unwrap_or(0)
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
            stripes: Box::default(),
        }
    }
}

/// How many counters there are.
const COUNTERS: usize = 23;

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
    Counter::RedisHeadHit,
    Counter::RedisReadBatched,
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
    RedisHeadHit,
    RedisReadBatched,
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
            Counter::RedisHeadHit => "tower_hybrid_cache_redis_head_hits_total",
            Counter::RedisReadBatched => "tower_hybrid_cache_redis_reads_batched_total",
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
            self.add_to_stripe(counter, n as u64);
            self.handle(counter).increment(n as u64);
        }
    }

    pub(crate) fn add(&self, counter: Counter) {
        self.add_to_stripe(counter, 1);
        self.handle(counter).increment(1);
    }

    fn add_to_stripe(&self, counter: Counter, n: u64) {
        // `ALL` lists every variant in declaration order: the discriminant is the
        // index (checked by the tests), and the stripe is masked into range.
        if let Some(cell) = self
            .stripes
            .get(this_threads_stripe())
            .and_then(|stripe| stripe.0.get(counter as usize))
        {
            cell.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn handle(&self, counter: Counter) -> &metrics::Counter {
        match self.handles.get(counter as usize) {
            Some(handle) => handle,
            None => &NOOP,
        }
    }

    /// The sum of `counter` over the stripes.
    fn total(&self, counter: Counter) -> u64 {
        self.stripes
            .iter()
            .filter_map(|stripe| stripe.0.get(counter as usize))
            .map(|cell| cell.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    pub(crate) fn snapshot(&self) -> CacheStats {
        CacheStats {
            hits: self.total(Counter::Hit),
            misses: self.total(Counter::Miss),
            bypasses: self.total(Counter::Bypass),
            stores: self.total(Counter::Store),
            not_stored: self.total(Counter::NotStored),
            coalesced: self.total(Counter::Coalesced),
            redis_writes: self.total(Counter::RedisWrite),
            redis_errors: self.total(Counter::RedisError),
            redis_writes_dropped: self.total(Counter::RedisWriteDropped),
            redis_retries: self.total(Counter::RedisRetry),
            retry_budget_exhausted: self.total(Counter::RetryBudgetExhausted),
            redis_deadline_hits: self.total(Counter::RedisDeadlineHit),
            redis_breaker_rejections: self.total(Counter::RedisBreakerRejection),
            fallback_hits: self.total(Counter::FallbackHit),
            redis_reads_shared: self.total(Counter::RedisReadShared),
            redis_reads_skipped: self.total(Counter::RedisReadSkipped),
            redis_head_hits: self.total(Counter::RedisHeadHit),
            redis_reads_batched: self.total(Counter::RedisReadBatched),
            invalidations: self.total(Counter::Invalidation),
            redis_replays: self.total(Counter::RedisReplay),
            redis_removals_folded: self.total(Counter::RedisRemovalFolded),
            redis_replays_refused: self.total(Counter::RedisReplayRefused),
            redis_reseeds: self.total(Counter::RedisReseed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn counts_from_many_threads_add_up_across_the_stripes() {
        let counters = Counters::default();
        // More threads than stripes: some share one.
        let threads = STRIPES + 4;
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        counters.add(Counter::Hit);
                    }
                    counters.add_n(Counter::Store, 3);
                });
            }
        });
        let stats = counters.snapshot();
        assert_eq!(stats.hits, threads as u64 * 1_000);
        assert_eq!(stats.stores, threads as u64 * 3);
        assert_eq!(stats.misses, 0);
    }

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
            ("redis_head_hits", s.redis_head_hits),
            ("redis_reads_batched", s.redis_reads_batched),
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
