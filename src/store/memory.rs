//! The in-process tier: a moka cache bounded by bytes, each entry expiring when it can
//! no longer be served.

use std::time::{Duration, Instant, SystemTime};

use moka::future::Cache;
use moka::Expiry;

use crate::entry::Entry;
use crate::key::{CacheKey, KeyHasher};

/// The memory tier. Cloning shares the same cache.
#[derive(Clone)]
pub(crate) struct MemoryStore {
    cache: Cache<CacheKey, Entry, KeyHasher>,
}

/// An entry lives until it can no longer be served, or, as a near cache in front of
/// Redis, at most `local_ttl` (bounding how stale it can be against the shared tier).
struct EntryExpiry {
    local_ttl: Option<Duration>,
}

impl EntryExpiry {
    fn remaining(&self, entry: &Entry) -> Duration {
        let servable = entry
            .stale_until()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        match self.local_ttl {
            Some(local) => servable.min(local),
            None => servable,
        }
    }
}

impl Expiry<CacheKey, Entry> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Entry,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(self.remaining(entry))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        entry: &Entry,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.remaining(entry))
    }
}

impl MemoryStore {
    /// A memory tier of `capacity_bytes`; with `local_ttl`, a near cache whose
    /// entries live at most that long.
    pub(crate) fn new(capacity_bytes: u64, local_ttl: Option<Duration>) -> Self {
        let cache = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_key: &CacheKey, entry: &Entry| {
                u32::try_from(entry.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry { local_ttl })
            // For `invalidate_tag`: entries are found by their tags, not their keys.
            .support_invalidation_closures()
            .build_with_hasher(KeyHasher::default());
        MemoryStore { cache }
    }

    pub(crate) async fn get(&self, key: &CacheKey) -> Option<Entry> {
        self.cache.get(key).await
    }

    pub(crate) async fn insert(&self, key: CacheKey, entry: Entry) {
        self.cache.insert(key, entry).await;
    }

    pub(crate) async fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(key).await;
    }

    /// Removes every response tagged `tag` (the removal completes in moka's
    /// housekeeping; lookups stop finding them at once).
    pub(crate) fn remove_tagged(&self, tag: &str) {
        let tag = tag.to_owned();
        let removed = self
            .cache
            .invalidate_entries_if(move |_, entry| match entry {
                Entry::Response(response) => response.tags.contains(&tag),
                _ => false,
            });
        if let Err(e) = removed {
            tracing::warn!(target: crate::telemetry::TARGET, error = %e, "tag invalidation failed in memory");
        }
    }

    /// Removes every entry.
    pub(crate) fn remove_all(&self) {
        self.cache.invalidate_all();
    }

    /// Runs moka's pending housekeeping: evictions and expirations free their memory.
    pub(crate) async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// Every entry held now (their bodies shared, not copied), for a re-seed.
    pub(crate) fn entries(&self) -> Vec<(CacheKey, Entry)> {
        self.cache
            .iter()
            .map(|(key, entry)| (*key, entry))
            .collect()
    }

    pub(crate) fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }
}
