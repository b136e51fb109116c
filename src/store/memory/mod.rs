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
//! when read, and swept by the maintenance task. Responses' tags are indexed
//! (`tags.rs`), so that a tag's invalidation visits only its entries.

use std::cell::{Cell, RefCell};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use quick_cache::sync::Cache;
use quick_cache::{Lifecycle, OptionsBuilder, Weighter};

use crate::entry::{Entry, Tags};
use crate::key::{CacheKey, KeyHasher};

mod tags;

use tags::TagIndex;

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
    /// Which store put it, for the tag index (`tags.rs`): unique in this tier.
    stamp: u64,
}

impl Slot {
    /// The tags of the response it holds (none for other entries).
    fn tags(&self) -> &Tags {
        self.entry.tags()
    }
}

/// Takes out of the tag index what leaves a shard by quick_cache's own doing (an
/// eviction, a replacement, an entry refused for its size), once the shard's lock
/// is released.
#[derive(Clone)]
struct Unindex(Arc<TagIndex>);

/// What left a shard during one quick_cache call: one slot without an allocation,
/// the rest in a `Vec`.
#[derive(Default)]
struct Departed {
    first: Option<(CacheKey, Slot)>,
    more: Vec<(CacheKey, Slot)>,
}

impl Lifecycle<CacheKey, Slot> for Unindex {
    type RequestState = Departed;

    fn begin_request(&self) -> Departed {
        Departed::default()
    }

    fn on_evict(&self, departed: &mut Departed, key: CacheKey, slot: Slot) {
        if departed.first.is_none() {
            departed.first = Some((key, slot));
        } else {
            departed.more.push((key, slot));
        }
    }

    fn end_request(&self, departed: Departed) {
        // Most stores evict nothing; `more` fills only after `first`.
        let Some((key, slot)) = departed.first else {
            return;
        };
        self.0.remove(key, slot.stamp, slot.tags());
        for (key, slot) in departed.more {
            self.0.remove(key, slot.stamp, slot.tags());
        }
    }
}

#[derive(Clone)]
struct SlotWeigher;

impl Weighter<CacheKey, Slot> for SlotWeigher {
    fn weight(&self, _key: &CacheKey, slot: &Slot) -> u64 {
        slot.weight
    }
}

/// What an entry costs this tier: its own weight, and `indexed` bytes of the tag
/// index. Never 0: quick_cache never evicts an entry of no weight.
fn entry_weight(entry: &Entry, indexed: usize) -> u64 {
    u64::try_from(entry.weight().saturating_add(indexed))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// One of the tier's shards: a quick_cache of a single shard, so that the maintenance
/// task can sweep one shard a tick (a `retain` over the whole tier cost 38 ms at a
/// million entries, every lookup of a shard waiting while it was swept).
struct Shard {
    cache: Cache<CacheKey, Slot, SlotWeigher, KeyHasher, Unindex>,
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
    /// Which entries carry each tag.
    tags: Arc<TagIndex>,
    /// Held (shared) by a tagged entry's store from its indexing to its insert, and
    /// (alone) by a purge: a purge clears the index wholesale, and must not clear the
    /// pairs of an entry it did not remove.
    purging: RwLock<()>,
    /// The next slot's stamp.
    next_stamp: AtomicU64,
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
        let tags = Arc::new(TagIndex::new());
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
                    Unindex(Arc::clone(&tags)),
                ),
                // Only invalid fractions fail, and none is set: the defaults then.
                Err(_) => Cache::with(
                    usize::try_from(shard_entries).unwrap_or(usize::MAX),
                    shard_bytes,
                    SlotWeigher,
                    KeyHasher::default(),
                    Unindex(Arc::clone(&tags)),
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
                tags,
                purging: RwLock::new(()),
                next_stamp: AtomicU64::new(0),
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
        self.get_at(key, Instant::now())
    }

    /// The entry under `key`, unless it is past its time here at `now` (a caller
    /// that has just read the clock passes that reading: a read costs about 20 ns,
    /// as much as the lookup).
    pub(crate) fn get_at(&self, key: &CacheKey, now: Instant) -> Option<Entry> {
        let cache = &self.shard(key).cache;
        let slot = cache.get(key)?;
        if slot.expires > now {
            return Some(slot.entry);
        }
        self.unindex(cache.remove_if(key, |slot| slot.expires <= now));
        None
    }

    /// Takes a slot removed by this tier's own call out of the tag index.
    fn unindex(&self, removed: Option<(CacheKey, Slot)>) {
        if let Some((key, slot)) = removed {
            self.inner.tags.remove(key, slot.stamp, slot.tags());
        }
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
            self.unindex(shard.cache.remove(&key));
            return;
        }
        // Past what an `Instant` holds (a lifetime of centuries): a year is as good.
        let now = Instant::now();
        let expires = now
            .checked_add(lifetime)
            .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
            .unwrap_or(now);
        let stamp = self.inner.next_stamp.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            entry,
            expires,
            weight: 0,
            stamp,
        };
        let tags = slot.tags();
        // Indexed before it is stored: the index never misses an entry memory holds.
        let (indexed, _purge_waits) = if tags.is_empty() {
            (0, None)
        } else {
            let purge_waits = self
                .inner
                .purging
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            (self.inner.tags.add(key, stamp, tags), Some(purge_waits))
        };
        // The index's share is the entry's too.
        let weight = entry_weight(&slot.entry, indexed);
        shard
            .next_expiry
            .fetch_min(self.since_epoch(expires), Ordering::Relaxed);
        shard.cache.insert(key, Slot { weight, ..slot });
    }

    pub(crate) fn remove(&self, key: &CacheKey) {
        self.unindex(self.shard(key).cache.remove(key));
    }

    /// Removes every response tagged `tag`, before it returns; visits only the
    /// entries the index names.
    pub(crate) fn remove_tagged(&self, tag: &str) {
        for key in self.inner.tags.keys(tag) {
            let removed = self
                .shard(&key)
                .cache
                .remove_if(&key, |slot| slot.tags().contains(tag));
            self.unindex(removed);
        }
    }

    /// Removes every entry, and empties the tag index with them: no tagged entry is
    /// stored meanwhile (one indexed before and stored after would be left out of
    /// the index). Taking each entry's pairs out instead cost 4 s at a million
    /// entries of three tags.
    pub(crate) fn remove_all(&self) {
        let _stores_wait = self
            .inner
            .purging
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for shard in &self.inner.shards {
            shard.cache.clear();
        }
        self.inner.tags.clear();
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
        let removed = RefCell::new(Vec::new());
        shard.cache.retain(|key, slot| {
            let keep = slot.expires > now;
            if keep {
                earliest.set(earliest.get().min(self.since_epoch(slot.expires)));
            } else if !slot.tags().is_empty() {
                removed.borrow_mut().push((*key, slot.clone()));
            }
            keep
        });
        shard
            .next_expiry
            .fetch_min(earliest.get(), Ordering::Relaxed);
        for (key, slot) in removed.into_inner() {
            self.unindex(Some((key, slot)));
        }
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
            .tags(tags)
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

    impl MemoryStore {
        /// Checks the tag index against what memory holds: every tag of every entry
        /// is indexed, and (nothing being stored meanwhile) nothing else is.
        fn assert_indexed(&self) {
            let mut pairs = 0;
            for shard in &self.inner.shards {
                for (key, slot) in shard.cache.iter() {
                    for tag in slot.tags() {
                        pairs += 1;
                        assert!(
                            self.inner.tags.keys(tag).contains(&key),
                            "{key} holds {tag} unindexed"
                        );
                    }
                }
            }
            assert_eq!(self.inner.tags.pairs(), pairs, "pairs of entries gone");
        }
    }

    #[test]
    fn the_tag_index_follows_entries_out_whichever_way_they_leave() {
        let key = |n: u32| {
            let mut bytes = [0; 32];
            bytes[..4].copy_from_slice(&n.to_le_bytes());
            CacheKey::from_bytes(bytes)
        };
        let tags = |n: u32| [format!("own-{n}"), "shared".to_owned()];
        let tagged = |n: u32, servable_for: Duration| {
            let [own, shared] = tags(n);
            entry(servable_for, &[&own, &shared])
        };
        // Evicted: 2 000 entries of ~700 bytes in 1 MiB.
        let store = MemoryStore::new(1 << 20, None);
        for n in 0..2_000 {
            store.insert(key(n), tagged(n, Duration::from_secs(600)));
        }
        assert!(store.entry_count() < 2_000, "nothing evicted");
        store.assert_indexed();
        // Replaced: the old tags leave with the old entry, the new ones name it.
        let last = key(1_999);
        store.insert(last, entry(Duration::from_secs(600), &["renamed"]));
        store.assert_indexed();
        store.remove_tagged("own-1999");
        assert!(
            store.get(&last).is_some(),
            "removed by a tag it no longer has"
        );
        // Removed by key, by a tag, by a read past its time, by a sweep.
        store.remove(&key(1_998));
        store.remove_tagged("own-1997");
        store.assert_indexed();
        store.insert(key(5_000), tagged(5_000, Duration::from_millis(20)));
        store.insert(key(5_001), tagged(5_001, Duration::from_millis(20)));
        store.assert_indexed();
        std::thread::sleep(Duration::from_millis(30));
        assert!(store.get(&key(5_000)).is_none());
        store.remove_expired();
        store.assert_indexed();
        // Stored already past its time: the entry it replaces leaves.
        store.insert(key(1_996), tagged(1_996, Duration::ZERO));
        store.assert_indexed();
        // A tag shared by every entry removes every one of them.
        store.remove_tagged("shared");
        assert_eq!(store.entry_count(), 1, "only the renamed entry left");
        store.assert_indexed();
        store.remove_all();
        assert_eq!(store.entry_count(), 0);
        assert_eq!(store.inner.tags.pairs(), 0);
    }

    #[test]
    fn racing_stores_of_a_key_leave_the_one_memory_holds_indexed() {
        let store = MemoryStore::new(1 << 20, None);
        let key = CacheKey::from_bytes([9; 32]);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    for _ in 0..20_000 {
                        store.insert(key, entry(Duration::from_secs(600), &["jobs"]));
                    }
                });
            }
            scope.spawn(|| {
                for _ in 0..20_000 {
                    store.remove_tagged("jobs");
                }
            });
        });
        store.assert_indexed();
        if store.get(&key).is_some() {
            store.remove_tagged("jobs");
            assert!(store.get(&key).is_none(), "an entry its tag cannot remove");
        }
    }

    #[test]
    fn a_purge_racing_stores_leaves_every_entry_it_spared_indexed() {
        let store = MemoryStore::new(64 << 20, None);
        std::thread::scope(|scope| {
            for thread in 0..3_u8 {
                let store = &store;
                scope.spawn(move || {
                    for n in 0..3_000_u32 {
                        let mut bytes = [thread; 32];
                        bytes[..4].copy_from_slice(&n.to_le_bytes());
                        let tag = format!("item-{thread}-{n}");
                        let entry = entry(Duration::from_secs(600), &["jobs", &tag]);
                        store.insert(CacheKey::from_bytes(bytes), entry);
                    }
                });
            }
            scope.spawn(|| {
                for _ in 0..100 {
                    store.remove_all();
                }
            });
        });
        store.assert_indexed();
        store.remove_tagged("jobs");
        assert_eq!(store.entry_count(), 0, "an entry its tag cannot remove");
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
