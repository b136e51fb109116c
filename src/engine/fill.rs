//! Committing a fill: the one place a response from the origin enters the store.
//! A fill is checked against the invalidations made since its origin call started,
//! stored, and checked again (an invalidation may land between the two), as the
//! response's last chunk goes out, never waiting on Redis; the followers waiting on
//! its flight are released once it is in.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::SystemTime;

use tokio::runtime::Handle;

use super::flight::FlightGuard;
use super::Engine;
use crate::entry::{CachedResponse, Entry, Tags};
use crate::key::CacheKey;
use crate::telemetry::{Counter, TARGET};

/// When a fill's origin call started: by this process's invalidation sequence (for
/// its own invalidations) and by the wall clock (for other replicas', through the
/// marks in Redis).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FillStart {
    seq: u64,
    at: SystemTime,
}

impl FillStart {
    /// When the origin call started, by the wall clock.
    pub(crate) fn at(&self) -> SystemTime {
        self.at
    }
}

/// A response ready to be stored under its primary key.
pub(crate) struct Fill {
    pub(crate) key: CacheKey,
    pub(crate) entry: CachedResponse,
    pub(crate) start: FillStart,
    /// The single-flight guard its followers wait on, released once it is stored.
    pub(crate) guard: Option<FlightGuard>,
    /// What the fill was, for the trace (`revalidated`).
    pub(crate) detail: Option<&'static str>,
}

/// Polls `work` once here, and spawns it on `runtime` only if it is not done.
fn run_or_spawn(runtime: &Handle, work: impl Future<Output = ()> + Send + 'static) {
    let mut work = Box::pin(work);
    // A future polled again registers its waker again: the task's first poll
    // replaces the no-op one.
    let mut cx = Context::from_waker(Waker::noop());
    if work.as_mut().poll(&mut cx).is_pending() {
        runtime.spawn(work);
    }
}

impl Engine {
    /// Notes that a fill's origin call starts now.
    pub(crate) fn fill_start(&self) -> FillStart {
        FillStart {
            seq: self.invalidations.now(),
            at: SystemTime::now(),
        }
    }

    /// Stores `fill`, unless what it stores was invalidated since its origin call
    /// started. The usual fill (no `Vary`, nothing invalidated since it started) is
    /// stored here and now: into memory, the Redis write only queued, with no future
    /// and no task. Any other is polled once here and, if it has to wait (the
    /// invalidation tables, a `Vary` index read from Redis), goes on in a task (a
    /// task for every fill cost each miss about 2 500 instructions), so the client
    /// never waits on it.
    pub(crate) fn commit(self: &Arc<Self>, fill: Fill) {
        if fill.entry.vary.is_empty() && self.invalidations.none_since(fill.start.seq) {
            self.commit_plain(fill);
            return;
        }
        let Ok(runtime) = Handle::try_current() else {
            tracing::warn!(target: TARGET, key = %fill.key, "no tokio runtime: response not stored");
            return;
        };
        let engine = Arc::clone(self);
        run_or_spawn(&runtime, async move { engine.store_fill(fill).await });
    }

    pub(super) async fn store_fill(&self, fill: Fill) {
        let Fill {
            key,
            entry,
            start,
            guard,
            detail,
        } = fill;
        if self.invalidations.since(&key, &entry.tags, start.seq).await {
            self.not_stored_after_invalidation(&key);
            return;
        }
        let entry = Arc::new(entry);
        self.store_response(key, Arc::clone(&entry), start.at).await;
        self.settle(key, &entry.tags, start.seq, guard, detail)
            .await;
    }

    /// Stores a fill with no `Vary` that nothing was invalidated since: `put` waits
    /// on nothing then.
    fn commit_plain(self: &Arc<Self>, fill: Fill) {
        let (key, start, guard, detail) = (fill.key, fill.start, fill.guard, fill.detail);
        let entry = Arc::new(fill.entry);
        self.store
            .put(key, Entry::Response(Arc::clone(&entry)), start.at);
        if self.invalidations.none_since(start.seq) {
            self.stored(&key, guard, detail);
            return;
        }
        // One landed since the check: settled as `store_fill` settles.
        let Ok(runtime) = Handle::try_current() else {
            self.store.memory().remove(&key);
            self.not_stored_after_invalidation(&key);
            return;
        };
        let engine = Arc::clone(self);
        run_or_spawn(&runtime, async move {
            engine
                .settle(key, &entry.tags, start.seq, guard, detail)
                .await;
        });
    }

    /// Finishes a fill just stored: an invalidation between the check before the
    /// store and the store may have removed the key before it was written, so it is
    /// removed again; otherwise it counts as stored.
    async fn settle(
        &self,
        key: CacheKey,
        tags: &Tags,
        seq: u64,
        guard: Option<FlightGuard>,
        detail: Option<&'static str>,
    ) {
        if self.invalidations.since(&key, tags, seq).await {
            Box::pin(self.store.invalidate(&key)).await;
            self.not_stored_after_invalidation(&key);
            return;
        }
        self.stored(&key, guard, detail);
    }

    /// Counts a fill as stored and releases its followers, who look again only once
    /// the entry is in.
    fn stored(&self, key: &CacheKey, guard: Option<FlightGuard>, detail: Option<&'static str>) {
        self.count(Counter::Store);
        tracing::debug!(target: TARGET, key = %key, outcome = "stored", detail);
        drop(guard);
    }

    fn not_stored_after_invalidation(&self, key: &CacheKey) {
        self.count(Counter::NotStored);
        tracing::debug!(target: TARGET, key = %key, outcome = "not-stored", detail = "invalidated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn work_done_at_once_needs_no_task_and_the_rest_goes_on_in_one() {
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        run_or_spawn(&Handle::current(), async move {
            flag.store(true, Ordering::SeqCst)
        });
        assert!(done.load(Ordering::SeqCst), "done in place");

        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        run_or_spawn(&Handle::current(), async move {
            tokio::task::yield_now().await;
            flag.store(true, Ordering::SeqCst);
        });
        assert!(!done.load(Ordering::SeqCst), "waiting, not done yet");
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the spawned rest never ran");
    }
}
