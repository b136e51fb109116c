//! The in-process tier: a moka cache bounded by bytes, each entry expiring when it can
//! no longer be served.

use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::future::Cache;
use moka::Expiry;

use crate::entry::{CachedResponse, Entry};
use crate::CacheKey;

/// The memory tier. Cloning shares the same cache.
#[derive(Clone)]
pub(crate) struct MemoryStore {
    cache: Cache<CacheKey, Entry>,
    held: Arc<HeldVersions>,
}

/// Bytes of memory per slot of `HeldVersions`, and the bounds on its slots: about
/// one slot per entry of a few KB, so that few hot keys share one.
const HELD_BYTES_PER_SLOT: u64 = 4096;
const HELD_SLOTS: (usize, usize) = (1 << 10, 1 << 16);

/// Which version of a response memory was last given for a key, as fingerprints in a
/// small direct-mapped table, so that a Redis hit of a version memory holds costs
/// neither a moka lookup nor an insert. A slot is cleared when moka drops the entry it
/// describes (evicted, expired, replaced or removed), so it never claims more than
/// memory holds for long; keys sharing a slot just take the slower path.
struct HeldVersions {
    /// A power of two.
    slots: Box<[AtomicU64]>,
    hasher: RandomState,
}

impl HeldVersions {
    fn new(capacity_bytes: u64) -> Self {
        let wanted = usize::try_from(capacity_bytes / HELD_BYTES_PER_SLOT).unwrap_or(usize::MAX);
        let count = wanted.clamp(HELD_SLOTS.0, HELD_SLOTS.1).next_power_of_two();
        HeldVersions {
            slots: (0..count).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
        }
    }

    fn slot(&self, key: &CacheKey) -> Option<&AtomicU64> {
        let [a, b, c, d, e, f, g, h, ..] = *key.as_bytes();
        let mask = self.slots.len().wrapping_sub(1);
        self.slots
            .get(u64::from_le_bytes([a, b, c, d, e, f, g, h]) as usize & mask)
    }

    /// Never 0 (an empty slot); equal for two versions `Entry::same_version` equates.
    fn fingerprint(&self, key: &CacheKey, response: &CachedResponse) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        key.hash(&mut hasher);
        response.stored_at.hash(&mut hasher);
        response.stale_until.hash(&mut hasher);
        response.body.len().hash(&mut hasher);
        hasher.finish() | 1
    }

    /// Memory dropped this version: its slot no longer says it is held.
    fn dropped(&self, key: &CacheKey, entry: &Entry) {
        if let (Entry::Response(response), Some(slot)) = (entry, self.slot(key)) {
            let gone = self.fingerprint(key, response);
            let _ = slot.compare_exchange(gone, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
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
        let held = Arc::new(HeldVersions::new(capacity_bytes));
        let on_drop = Arc::clone(&held);
        let cache = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_key: &CacheKey, entry: &Entry| {
                u32::try_from(entry.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry { local_ttl })
            // For `invalidate_tag`: entries are found by their tags, not their keys.
            .support_invalidation_closures()
            .eviction_listener(move |key, entry, _cause| on_drop.dropped(&key, &entry))
            .build();
        MemoryStore { cache, held }
    }

    /// Makes memory hold `entry`, a version of `key` just read from Redis, so that an
    /// outage finds it; nearly free when memory holds that version already.
    pub(crate) async fn keep(&self, key: CacheKey, entry: &Entry) {
        if let (Entry::Response(response), Some(slot)) = (entry, self.held.slot(&key)) {
            let version = self.held.fingerprint(&key, response);
            if slot.load(Ordering::Relaxed) == version {
                return;
            }
            // Said before memory is checked: a drop from now on clears it again.
            slot.store(version, Ordering::Relaxed);
        }
        let held = self.cache.get(&key).await;
        if !held.is_some_and(|held| held.same_version(entry)) {
            self.cache.insert(key, entry.clone()).await;
        }
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

    pub(crate) fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn response(stored_at: SystemTime, body: &'static str) -> Entry {
        Entry::Response(Arc::new(
            CachedResponse::builder(StatusCode::OK, HeaderMap::new(), Bytes::from(body))
                .stored_at(stored_at)
                .stale_until(stored_at + Duration::from_secs(600))
                .build(),
        ))
    }

    fn body_of(entry: Option<Entry>) -> Option<Bytes> {
        match entry {
            Some(Entry::Response(response)) => Some(response.body.clone()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn keep_fills_memory_and_a_newer_version_replaces_the_held_one() {
        let memory = MemoryStore::new(1 << 20, None);
        let key = CacheKey::from_bytes([3; 32]);
        let now = SystemTime::now();
        memory.keep(key, &response(now, "one")).await;
        memory.keep(key, &response(now, "one")).await;
        assert_eq!(
            body_of(memory.get(&key).await).as_deref(),
            Some(&b"one"[..])
        );
        memory
            .keep(key, &response(now + Duration::from_secs(1), "two"))
            .await;
        assert_eq!(
            body_of(memory.get(&key).await).as_deref(),
            Some(&b"two"[..])
        );
    }

    #[tokio::test]
    async fn a_version_memory_dropped_is_kept_again() {
        let memory = MemoryStore::new(1 << 20, None);
        let key = CacheKey::from_bytes([4; 32]);
        let entry = response(SystemTime::now(), "body");
        memory.keep(key, &entry).await;
        memory.remove(&key).await;
        memory.run_pending_tasks().await;
        assert!(memory.get(&key).await.is_none());
        // The slot was cleared with the entry: the same version goes back in.
        memory.keep(key, &entry).await;
        assert_eq!(
            body_of(memory.get(&key).await).as_deref(),
            Some(&b"body"[..])
        );
        memory.remove_all();
        memory.run_pending_tasks().await;
        memory.keep(key, &entry).await;
        assert!(memory.get(&key).await.is_some());
    }

    #[test]
    fn the_version_table_grows_with_memory_within_bounds() {
        assert_eq!(HeldVersions::new(0).slots.len(), 1 << 10);
        assert_eq!(HeldVersions::new(64 << 20).slots.len(), 1 << 14);
        assert_eq!(HeldVersions::new(u64::MAX).slots.len(), 1 << 16);
        assert_eq!(HeldVersions::new(5_000_000).slots.len(), 2048);
    }

    #[test]
    fn versions_the_store_equates_have_one_fingerprint() {
        let held = HeldVersions::new(0);
        let key = CacheKey::from_bytes([5; 32]);
        let at = SystemTime::now();
        let (a, b, c) = (
            response(at, "same"),
            response(at, "same"),
            response(at, "longer"),
        );
        let print = |entry: &Entry| match entry {
            Entry::Response(response) => held.fingerprint(&key, response),
            _ => 0,
        };
        assert!(a.same_version(&b));
        assert_eq!(print(&a), print(&b));
        assert_ne!(print(&a), print(&c));
        assert_ne!(print(&a), 0);
        let other = CacheKey::from_bytes([6; 32]);
        match &a {
            Entry::Response(response) => assert_ne!(held.fingerprint(&other, response), print(&a)),
            _ => unreachable!(),
        }
    }
}
