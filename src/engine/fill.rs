//! Committing a fill: the one place a response from the origin enters the store.
//! A fill is checked against the invalidations made since its origin call started,
//! stored, and checked again (an invalidation may land between the two), off the
//! response path; the followers waiting on its flight are released once it is in.

use std::sync::Arc;
use std::time::SystemTime;

use super::flight::FlightGuard;
use super::Engine;
use crate::entry::CachedResponse;
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

impl Engine {
    /// Notes that a fill's origin call starts now.
    pub(crate) fn fill_start(&self) -> FillStart {
        FillStart {
            seq: self.invalidations.now(),
            at: SystemTime::now(),
        }
    }

    /// Stores `fill` in a background task, unless what it stores was invalidated since
    /// its origin call started; the client does not wait for it.
    pub(crate) fn commit(self: &Arc<Self>, fill: Fill) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(target: TARGET, key = %fill.key, "no tokio runtime: response not stored");
            return;
        };
        let engine = Arc::clone(self);
        runtime.spawn(async move { engine.store_fill(fill).await });
    }

    pub(super) async fn store_fill(&self, fill: Fill) {
        let Fill {
            key,
            entry,
            start,
            guard,
            detail,
        } = fill;
        let tags = entry.tags.clone();
        if self.invalidations.since(&key, &tags, start.seq).await {
            self.not_stored_after_invalidation(&key);
            return;
        }
        self.store_response(key, entry, start.at).await;
        // An invalidation between the check and the store may have removed the key
        // before it was written: remove it again.
        if self.invalidations.since(&key, &tags, start.seq).await {
            self.store.invalidate(&key).await;
            self.not_stored_after_invalidation(&key);
            return;
        }
        self.count(Counter::Store);
        tracing::debug!(target: TARGET, key = %key, outcome = "stored", detail);
        // Followers look again only once the entry is in.
        drop(guard);
    }

    fn not_stored_after_invalidation(&self, key: &CacheKey) {
        self.count(Counter::NotStored);
        tracing::debug!(target: TARGET, key = %key, outcome = "not-stored", detail = "invalidated");
    }
}
