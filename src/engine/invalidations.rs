//! Recent invalidations in this process, so that a fill whose origin call started
//! before one is not stored after it (other replicas' are caught by the marks in
//! Redis).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::entry::Tags;
use crate::key::CacheKey;

/// Invalidations by key, by tag and the last purge, each with its sequence number.
pub(crate) struct Invalidations {
    seq: AtomicU64,
    /// The sequence number of the last `purge_all`.
    purged: AtomicU64,
    /// Tag → the sequence number of its last invalidation.
    tags: moka::future::Cache<String, u64>,
    /// Key → the sequence number of its last invalidation. Bounded: a fill that runs
    /// longer than the time-to-live after an invalidation is not caught.
    marks: moka::future::Cache<CacheKey, u64>,
}

/// How many invalidations by key, and by tag, are remembered at most, and how long.
const REMEMBERED: u64 = 100_000;
const REMEMBERED_FOR: Duration = Duration::from_secs(300);

fn remembered<K>() -> moka::future::Cache<K, u64>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
{
    moka::future::Cache::builder()
        .max_capacity(REMEMBERED)
        .time_to_live(REMEMBERED_FOR)
        .build()
}

impl Invalidations {
    pub(crate) fn new() -> Self {
        Invalidations {
            seq: AtomicU64::new(0),
            purged: AtomicU64::new(0),
            tags: remembered(),
            marks: remembered(),
        }
    }

    /// The sequence number now; a fill notes it before calling the origin.
    pub(crate) fn now(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// The next sequence number, for an invalidation happening now.
    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub(crate) async fn mark(&self, key: CacheKey) {
        self.marks.insert(key, self.next()).await;
    }

    pub(crate) async fn mark_tag(&self, tag: &str) {
        self.tags.insert(tag.to_owned(), self.next()).await;
    }

    pub(crate) fn mark_all(&self) {
        self.purged.store(self.next(), Ordering::SeqCst);
    }

    /// Whether nothing at all was invalidated after `since`: every invalidation takes a
    /// new sequence number before it is recorded, so none taken since means none to
    /// look up (the usual fill asks no table at all).
    pub(crate) fn none_since(&self, since: u64) -> bool {
        self.seq.load(Ordering::SeqCst) <= since
    }

    /// Whether `key`, or one of `tags`, or everything, was invalidated after `since`.
    pub(crate) async fn since(&self, key: &CacheKey, tags: &Tags, since: u64) -> bool {
        if self.none_since(since) {
            return false;
        }
        if self.purged.load(Ordering::SeqCst) > since {
            return true;
        }
        // Boxed: inline, the tables' lookups would enlarge every fill's future.
        Box::pin(self.recorded_since(key, tags, since)).await
    }

    /// Whether the tables record `key`, or one of `tags`, as invalidated after `since`.
    async fn recorded_since(&self, key: &CacheKey, tags: &Tags, since: u64) -> bool {
        if self.marks.get(key).await.is_some_and(|seq| seq > since) {
            return true;
        }
        for tag in tags {
            if self.tags.get(tag).await.is_some_and(|seq| seq > since) {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_invalidations_after_the_start_count() {
        let invalidations = Invalidations::new();
        let (a, b) = (CacheKey::from_bytes([1; 32]), CacheKey::from_bytes([2; 32]));
        invalidations.mark(a).await;
        let since = invalidations.now();
        assert!(
            !invalidations.since(&a, &Tags::default(), since).await,
            "before the start"
        );
        invalidations.mark_tag("jobs").await;
        assert!(
            !invalidations.since(&a, &Tags::default(), since).await,
            "another tag"
        );
        assert!(
            invalidations
                .since(&b, &["jobs"].into_iter().collect(), since)
                .await
        );
        let since = invalidations.now();
        invalidations.mark_all();
        assert!(
            invalidations.since(&b, &Tags::default(), since).await,
            "a purge"
        );
    }
}
