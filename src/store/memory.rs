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
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// One of the tier's shards: a quick_cache of a single shard, so that the maintenance
/// task can sweep one shard a tick (a `retain` over the whole tier cost 38 ms at a
/// million entries, every lookup of a shard waiting while it was swept).
struct Shard {
    cache: Cache<CacheKey, Slot, SlotWeigher, KeyHasher>,
    /// No slot of this shard expires before this (nanoseconds after the epoch): a
    /// sweep before it would find nothing.
    next_expiry: AtomicU64,
}

struct Inner {
    /// Never empty.
    shards: Box<[Shard]>,
    /// Picks a key's shard.
    router: KeyHasher,
    /// The shard the next maintenance tick sweeps.
    next_sweep: AtomicUsize,
    /// As a near cache in front of Redis, the most an entry lives here (bounding how
    /// stale it can be against the shared tier).
    local_ttl: Option<Duration>,
    /// The origin of the slots' expiry times.
    epoch: Instant,
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
        let shard_bytes = capacity_bytes / shards;
        let shard_entries = (shard_bytes / TYPICAL_ENTRY_BYTES).max(32);
        let shard = || {
            let options = OptionsBuilder::new()
                .shards(1)
                .estimated_items_capacity(usize::try_from(shard_entries).unwrap_or(usize::MAX))
                .weight_capacity(shard_bytes)
                .build();
            let cache = match options {
                Ok(options) => Cache::with_options(
                    options,
                    SlotWeigher,
                    KeyHasher::default(),
                    Default::default(),
                ),
                // Only invalid fractions fail, and none is set: the defaults then.
                Err(_) => Cache::with(
                    usize::try_from(shard_entries).unwrap_or(usize::MAX),
                    shard_bytes,
                    SlotWeigher,
                    KeyHasher::default(),
                    Default::default(),
                ),
            };
            Shard {
                cache,
                next_expiry: AtomicU64::new(u64::MAX),
            }
        };
        MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..shards).map(|_| shard()).collect(),
                router: KeyHasher::default(),
                next_sweep: AtomicUsize::new(0),
                local_ttl,
                epoch: Instant::now(),
            }),
        }
    }

    /// The shard `key` lives in.
    fn shard(&self, key: &CacheKey) -> &Shard {
        let shards = &self.inner.shards;
        // In range: the shards are never empty.
        let at =
            usize::try_from(self.inner.router.hash_one(key) % shards.len() as u64).unwrap_or(0);
        &shards[at]
    }

    /// Nanoseconds from the store's epoch to `at`.
    fn since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.inner.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The entry under `key`, unless it is past its time here.
    pub(crate) fn get(&self, key: &CacheKey) -> Option<Entry> {
        let cache = &self.shard(key).cache;
        let slot = cache.get(key)?;
        let now = Instant::now();
        if slot.expires > now {
            return Some(slot.entry);
        }
        cache.remove_if(key, |slot| slot.expires <= now);
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
        let shard = self.shard(&key);
        if lifetime.is_zero() {
            shard.cache.remove(&key);
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
        shard
            .next_expiry
            .fetch_min(self.since_epoch(expires), Ordering::Relaxed);
        shard.cache.insert(
            key,
            Slot {
                entry,
                expires,
                weight,
            },
        );
    }

    pub(crate) fn remove(&self, key: &CacheKey) {
        self.shard(key).cache.remove(key);
    }

    /// Removes every response tagged `tag`, before it returns.
    pub(crate) fn remove_tagged(&self, tag: &str) {
        for shard in &self.inner.shards {
            shard.cache.retain(|_, slot| match &slot.entry {
                Entry::Response(response) => !response.tags.iter().any(|t| t == tag),
                _ => true,
            });
        }
    }

    /// Removes every response tagged with any of `tags`, in one pass over memory
    /// (a pass a tag costs as much for each).
    pub(crate) fn remove_tagged_any(&self, tags: &HashSet<String>) {
        if tags.is_empty() {
            return;
        }
        for shard in &self.inner.shards {
            shard.cache.retain(|_, slot| match &slot.entry {
                Entry::Response(response) => !response.tags.iter().any(|t| tags.contains(t)),
                _ => true,
            });
        }
    }

    /// Removes every entry.
    pub(crate) fn remove_all(&self) {
        for shard in &self.inner.shards {
            shard.cache.clear();
        }
    }

    /// Frees the entries past their time in every shard.
    pub(crate) fn remove_expired(&self) {
        for shard in &self.inner.shards {
            self.sweep(shard);
        }
    }

    /// Frees the entries past their time in the next shard (round the shards, one a
    /// call), so that their memory is returned even when nothing reads them, a shard
    /// at a time.
    pub(crate) fn remove_expired_step(&self) {
        let shards = &self.inner.shards;
        let at = self.inner.next_sweep.fetch_add(1, Ordering::Relaxed) % shards.len();
        if let Some(shard) = shards.get(at) {
            self.sweep(shard);
        }
    }

    /// A pass over `shard`'s entries, skipped while none can have expired.
    fn sweep(&self, shard: &Shard) {
        let now = Instant::now();
        if shard.next_expiry.load(Ordering::Relaxed) > self.since_epoch(now) {
            return;
        }
        // Inserts during the pass lower the mark themselves; the survivors' earliest
        // time joins them after it.
        shard.next_expiry.store(u64::MAX, Ordering::Relaxed);
        let earliest = Cell::new(u64::MAX);
        shard.cache.retain(|_, slot| {
            let keep = slot.expires > now;
            if keep {
                earliest.set(earliest.get().min(self.since_epoch(slot.expires)));
            }
            keep
        });
        shard
            .next_expiry
            .fetch_min(earliest.get(), Ordering::Relaxed);
    }

    /// Every entry held now (their bodies shared, not copied), for a re-seed.
    pub(crate) fn entries(&self) -> Vec<(CacheKey, Entry)> {
        let now = Instant::now();
        self.inner
            .shards
            .iter()
            .flat_map(|shard| shard.cache.iter())
            .filter(|(_, slot)| slot.expires > now)
            .map(|(key, slot)| (key, slot.entry))
            .collect()
    }

    pub(crate) fn weighted_size(&self) -> u64 {
        self.inner.shards.iter().map(|s| s.cache.weight()).sum()
    }

    pub(crate) fn entry_count(&self) -> u64 {
        let entries: usize = self.inner.shards.iter().map(|s| s.cache.len()).sum();
        u64::try_from(entries).unwrap_or(u64::MAX)
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
    fn a_maintenance_step_sweeps_one_shard_and_a_round_of_steps_all() {
        let store = MemoryStore::new(64 << 20, Some(Duration::from_millis(30)));
        let shards = store.inner.shards.len();
        assert!(shards > 1, "{shards} shards");
        for i in 0..64 {
            store.insert(
                CacheKey::from_bytes([i; 32]),
                entry(Duration::from_secs(600), &[]),
            );
        }
        let held = |store: &MemoryStore| {
            store
                .inner
                .shards
                .iter()
                .filter(|shard| !shard.cache.is_empty())
                .count()
        };
        let occupied = held(&store);
        assert!(occupied > 1, "64 keys in {occupied} shard(s)");
        let expired = Instant::now() + Duration::from_millis(30);
        while Instant::now() <= expired {
            std::thread::sleep(Duration::from_millis(5));
        }
        store.remove_expired_step();
        assert!(store.entry_count() > 0, "one step sweeps one shard");
        for _ in 1..shards {
            store.remove_expired_step();
        }
        assert_eq!(store.entry_count(), 0, "a round of steps sweeps them all");
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
            let shard = store
                .inner
                .shards
                .iter()
                .map(|s| s.cache.capacity())
                .min()
                .unwrap_or(0);
            assert!(
                shard >= MIN_SHARD_BYTES.min(capacity),
                "{capacity}: a shard of {shard}"
            );
        }
    }
}
