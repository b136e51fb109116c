//! Counters and tracing fields in one place.
//!
//! Every decision is a `tracing` event at `debug` level with the target
//! `tower_hybrid_cache` and the fields `key`, `outcome` and, where it applies,
//! `detail`; counters are plain atomics read through
//! [`HybridCache::stats`](crate::HybridCache::stats).

use std::sync::atomic::{AtomicU64, Ordering};

/// The `tracing` target of every event the crate emits.
pub(crate) const TARGET: &str = "tower_hybrid_cache";

/// Counters of what the cache did since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Requests answered from a stored response.
    pub hits: u64,
    /// Cacheable requests that went to the origin.
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
    /// Redis operations that failed or timed out (the request went on without Redis).
    pub redis_errors: u64,
    /// Writes dropped because the Redis write queue was full.
    pub redis_writes_dropped: u64,
    /// Redis operations sent again after a transient error.
    pub redis_retries: u64,
    /// Retries not made because the retry budget was spent.
    pub retry_budget_exhausted: u64,
    /// Redis operations cut off by the deadline (retries included).
    pub redis_deadline_hits: u64,
    /// Redis operations refused at once because the circuit breaker was open.
    pub redis_breaker_rejections: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
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
}

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
}

impl Counters {
    pub(crate) fn add_n(&self, counter: Counter, n: usize) {
        if n > 0 {
            self.cell(counter).fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn add(&self, counter: Counter) {
        self.cell(counter).fetch_add(1, Ordering::Relaxed);
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
        }
    }
}
