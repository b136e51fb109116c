//! The in-process tier: a quick_cache (S3-FIFO) bounded by bytes, each entry expiring
//! when it can no longer be served.
//!
//! Why not moka, which the design started from: under an all-unique load every miss
//! asks the tier for a key it does not hold and then inserts one, and moka spent about
//! 7 800 instructions on that pair (its read and write logs, the frequency sketch, the
//! deques and timer wheel, a segment's rehash as evicted entries leave tombstones),
//! against about 1 000 for quick_cache, whose entries sit in a slab under one lock a
//! shard and whose lookup is a hash probe and one bit set (BENCHMARKS.md, "The memory
//! tier's engine"). quick_cache has no timer wheel: an entry past its time is refused
//! when read, and swept by the maintenance task.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use quick_cache::sync::Cache;
use quick_cache::{OptionsBuilder, Weighter};

use crate::entry::Entry;
use crate::key::{CacheKey, KeyHasher};

/// The least a shard holds, so that one entry of up to a few MiB (bodies are bounded
/// by the layer's `max_body_bytes`, 1 MiB by default) fits in the shard its key falls
/// in: quick_cache splits the capacity evenly between shards and refuses an entry over
/// a shard's share.
const MIN_SHARD_BYTES: u64 = 8 << 20;

/// The average weight assumed to size the tier's bookkeeping of keys recently
/// evicted (its ghosts: half as many as this estimate of entries).
const TYPICAL_ENTRY_BYTES: u64 = 4 << 10;

/// What the tier keeps under a key: the entry, when it stops being servable here, and
/// its weight (counted once, when stored).
#[derive(Clone)]
struct Slot {
    entry: Entry,
    /// An `Instant`, not a count from the epoch: a lookup compares it with the
    /// clock, without a subtraction.
    expires: Instant,
    weight: u64,
}

#[derive(Clone)]
struct SlotWeigher;

impl Weighter<CacheKey, Slot> for SlotWeigher {
    fn weight(&self, _key: &CacheKey, slot: &Slot) -> u64 {
        slot.weight
    }
}

struct Inner {
    cache: Cache<CacheKey, Slot, SlotWeigher, KeyHasher>,
    /// As a near cache in front of Redis, the most an entry lives here (bounding how
    /// stale it can be against the shared tier).
    local_ttl: Option<Duration>,
    /// The origin of the slots' expiry times.
    epoch: Instant,
    /// No slot expires before this (nanoseconds after `epoch`): a sweep before it
    /// would find nothing.
    next_expiry: AtomicU64,
}

/// The memory tier. Cloning shares the same cache.
#[derive(Clone)]
pub(crate) struct MemoryStore {
    inner: Arc<Inner>,
}

impl MemoryStore {
    /// A memory tier of `capacity_bytes`; with `local_ttl`, a near cache whose
    /// entries live at most that long.
    pub(crate) fn new(capacity_bytes: u64, local_ttl: Option<Duration>) -> Self {
        let parallelism = std::thread::available_parallelism().map_or(1, usize::from);
        let most_shards = u64::try_from(parallelism.saturating_mul(4)).unwrap_or(u64::MAX);
        let shards = (capacity_bytes / MIN_SHARD_BYTES).clamp(1, most_shards);
        // A power of two no larger than asked: quick_cache rounds up, which would make
        // a shard smaller than `MIN_SHARD_BYTES`.
        let shards = 1_u64 << shards.ilog2();
        let estimated_entries = (capacity_bytes / TYPICAL_ENTRY_BYTES).max(32);
        let options = OptionsBuilder::new()
            .shards(usize::try_from(shards).unwrap_or(1))
            .estimated_items_capacity(usize::try_from(estimated_entries).unwrap_or(usize::MAX))
            .weight_capacity(capacity_bytes)
            .build();
        let cache = match options {
            Ok(options) => Cache::with_options(
                options,
                SlotWeigher,
                KeyHasher::default(),
                Default::default(),
            ),
            // Only invalid fractions fail, and none is set: fall back to the defaults.
            Err(_) => Cache::with(
                usize::try_from(estimated_entries).unwrap_or(usize::MAX),
                capacity_bytes,
                SlotWeigher,
                KeyHasher::default(),
                Default::default(),
            ),
        };
        MemoryStore {
            inner: Arc::new(Inner {
                cache,
                local_ttl,
                epoch: Instant::now(),
                next_expiry: AtomicU64::new(u64::MAX),
            }),
        }
    }

    /// Nanoseconds from the store's epoch to `at`.
    fn since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.inner.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The entry under `key`, unless it is past its time here.
    pub(crate) fn get(&self, key: &CacheKey) -> Option<Entry> {
        let slot = self.inner.cache.get(key)?;
        let now = Instant::now();
        if slot.expires > now {
            return Some(slot.entry);
        }
        self.inner.cache.remove_if(key, |slot| slot.expires <= now);
        None
    }

    /// Stores `entry` under `key` until it can no longer be served (or, as a near
    /// cache, at most the local TTL); one already past that replaces nothing it
    /// would shadow: the key is removed.
    pub(crate) fn insert(&self, key: CacheKey, entry: Entry) {
        let servable = entry
            .stale_until()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let lifetime = match self.inner.local_ttl {
            Some(local) => servable.min(local),
            None => servable,
        };
        if lifetime.is_zero() {
            self.inner.cache.remove(&key);
            return;
        }
        // Past what an `Instant` holds (a lifetime of centuries): a year is as good.
        let now = Instant::now();
        let expires = now
            .checked_add(lifetime)
            .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
            .unwrap_or(now);
        // Never 0: quick_cache never evicts an entry of no weight.
        let weight = u64::try_from(entry.weight()).unwrap_or(u64::MAX).max(1);
        self.inner
            .next_expiry
            .fetch_min(self.since_epoch(expires), Ordering::Relaxed);
        self.inner.cache.insert(
            key,
            Slot {
                entry,
                expires,
                weight,
            },
        );
    }

    pub(crate) fn remove(&self, key: &CacheKey) {
        self.inner.cache.remove(key);
    }

    /// Removes every response tagged `tag`, before it returns.
    pub(crate) fn remove_tagged(&self, tag: &str) {
        self.inner.cache.retain(|_, slot| match &slot.entry {
            Entry::Response(response) => !response.tags.iter().any(|t| t == tag),
            _ => true,
        });
    }

    /// Removes every entry.
    pub(crate) fn remove_all(&self) {
        self.inner.cache.clear();
    }

    /// Frees the entries past their time, so that their memory is returned even when
    /// nothing reads them; a pass over every entry, skipped while none can have
    /// expired.
    pub(crate) fn remove_expired(&self) {
        let now = Instant::now();
        if self.inner.next_expiry.load(Ordering::Relaxed) > self.since_epoch(now) {
            return;
        }
        // Inserts during the pass lower the mark themselves; the survivors' earliest
        // time joins them after it.
        self.inner.next_expiry.store(u64::MAX, Ordering::Relaxed);
        let earliest = Cell::new(u64::MAX);
        self.inner.cache.retain(|_, slot| {
            let keep = slot.expires > now;
            if keep {
                earliest.set(earliest.get().min(self.since_epoch(slot.expires)));
            }
            keep
        });
        self.inner
            .next_expiry
            .fetch_min(earliest.get(), Ordering::Relaxed);
    }

    /// Every entry held now (their bodies shared, not copied), for a re-seed.
    pub(crate) fn entries(&self) -> Vec<(CacheKey, Entry)> {
        let now = Instant::now();
        self.inner
            .cache
            .iter()
            .filter(|(_, slot)| slot.expires > now)
            .map(|(key, slot)| (key, slot.entry))
            .collect()
    }

    pub(crate) fn weighted_size(&self) -> u64 {
        self.inner.cache.weight()
    }

    pub(crate) fn entry_count(&self) -> u64 {
        u64::try_from(self.inner.cache.len()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::CachedResponse;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn entry(servable_for: Duration, tags: &[&str]) -> Entry {
        let now = SystemTime::now();
        let response = CachedResponse::builder(StatusCode::OK, HeaderMap::new(), Bytes::new())
            .fresh_until(now + servable_for)
            .tags(tags.iter().map(|t| (*t).to_owned()).collect())
            .build();
        Entry::Response(Arc::new(response))
    }

    /// Polls `done` until it holds, for at most 10 s.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn an_entry_past_its_local_ttl_is_not_served_and_then_swept() {
        let store = MemoryStore::new(1 << 20, Some(Duration::from_millis(30)));
        let key = CacheKey::from_bytes([1; 32]);
        store.insert(key, entry(Duration::from_secs(600), &[]));
        assert!(store.get(&key).is_some(), "served within its time");
        eventually("the entry to expire", || store.get(&key).is_none());
        // Read past its time: removed by that read.
        assert_eq!(store.entry_count(), 0);

        let other = CacheKey::from_bytes([2; 32]);
        store.insert(other, entry(Duration::from_secs(600), &[]));
        eventually("the sweep to free it", || {
            store.remove_expired();
            store.entry_count() == 0
        });
        assert_eq!(store.weighted_size(), 0);
    }

    #[test]
    fn a_sweep_keeps_the_earliest_expiry_of_what_it_keeps_and_of_later_inserts() {
        let store = MemoryStore::new(1 << 20, None);
        let short = CacheKey::from_bytes([1; 32]);
        let long = CacheKey::from_bytes([2; 32]);
        let later = CacheKey::from_bytes([3; 32]);
        store.insert(long, entry(Duration::from_secs(600), &[]));
        store.insert(short, entry(Duration::from_millis(30), &[]));
        eventually("the short entry to be swept", || {
            store.remove_expired();
            store.entry_count() == 1
        });
        assert!(store.get(&long).is_some());
        // After a sweep, an entry stored with an earlier time than the survivors'
        // is swept at its own time, not theirs.
        store.insert(later, entry(Duration::from_millis(30), &[]));
        eventually("the later entry to be swept", || {
            store.remove_expired();
            store.entry_count() == 1
        });
        assert!(store.get(&long).is_some());
    }

    #[test]
    fn storing_an_entry_already_past_its_time_removes_the_one_it_replaces() {
        let store = MemoryStore::new(1 << 20, None);
        let key = CacheKey::from_bytes([1; 32]);
        store.insert(key, entry(Duration::from_secs(600), &[]));
        store.insert(key, entry(Duration::ZERO, &[]));
        assert!(store.get(&key).is_none());
        assert_eq!(store.entry_count(), 0);
    }

    #[test]
    fn a_tag_removes_only_the_responses_it_names_at_once() {
        let store = MemoryStore::new(1 << 20, None);
        let (a, b) = (CacheKey::from_bytes([1; 32]), CacheKey::from_bytes([2; 32]));
        store.insert(a, entry(Duration::from_secs(600), &["jobs"]));
        store.insert(b, entry(Duration::from_secs(600), &["users"]));
        store.remove_tagged("jobs");
        assert!(store.get(&a).is_none());
        assert!(store.get(&b).is_some());
    }

    #[test]
    fn shards_never_hold_less_than_their_minimum_unless_the_tier_is_smaller() {
        for capacity in [1 << 20, 8 << 20, 24 << 20, 64 << 20, 1 << 30] {
            let store = MemoryStore::new(capacity, None);
            let shard = store.inner.cache.shard_capacity();
            assert!(
                shard >= MIN_SHARD_BYTES.min(capacity),
                "{capacity}: a shard of {shard}"
            );
        }
    }
}
