//! Which memory entries carry each tag, so that invalidating a tag visits its entries
//! alone: a pass over every entry instead cost about 70 ns an entry held, 7 ms a tag
//! at 100 000 entries and 120 ms at a million, each shard's lookups waiting while it
//! was read (BENCHMARKS.md, "How cost grows").
//!
//! The index may name more than memory holds, never less: an entry's pairs (its key
//! and the stamp it was stored with) go in before the entry is stored, and come out
//! only when that very entry leaves memory, whichever way (evicted, replaced,
//! removed, expired). A stamp, not the key alone, because two stores of one key race:
//! the one that loses may leave after the winner was indexed, and must not take the
//! winner's pair with it.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::entry::Tags;
use crate::key::{CacheKey, KeyHasher};

/// An entry in memory: its key, and the stamp of the store that put it there.
type Holder = (CacheKey, u64);

/// The entries holding one tag. Most tags name one entry (an item's own): those
/// cost no table of their own.
enum Holders {
    One(Holder),
    Many(HashSet<Holder, KeyHasher>),
}

impl Holders {
    fn insert(&mut self, holder: Holder) {
        match self {
            Holders::One(one) if *one == holder => {}
            Holders::One(one) => {
                let mut many = HashSet::with_capacity_and_hasher(2, KeyHasher::default());
                many.insert(*one);
                many.insert(holder);
                *self = Holders::Many(many);
            }
            Holders::Many(many) => {
                many.insert(holder);
            }
        }
    }

    /// Takes `holder` out; `true` when none is left.
    fn remove(&mut self, holder: &Holder) -> bool {
        match self {
            Holders::One(one) => one == holder,
            Holders::Many(many) => {
                many.remove(holder);
                many.is_empty()
            }
        }
    }

    fn keys(&self) -> Vec<CacheKey> {
        match self {
            Holders::One((key, _)) => vec![*key],
            Holders::Many(many) => many.iter().map(|(key, _)| *key).collect(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Holders::One(_) => 1,
            Holders::Many(many) => many.len(),
        }
    }
}

/// What the index holds for a tag no other entry carries (its slot in a shard's
/// table: hash and holder, 56 bytes in a table that grows by doubling), charged to
/// the entry that brings it. `tests/entry_weight.rs` checks
/// both figures against what the heap holds.
pub(super) const NEW_TAG_BYTES: usize = 120;

/// What the index holds for an entry carrying a tag others carry too: a slot in that
/// tag's set (40 bytes, in a table that grows by doubling).
pub(super) const SHARED_TAG_BYTES: usize = 80;

/// Shards of the index, so that stores of tagged entries seldom wait on each other.
const SHARDS: usize = 16;

/// A tag's holders, under the tag's hash: no copy of its name to allocate, compare
/// or free. Two tags of one hash share their holders, which only makes a removal
/// visit entries it then leaves (each is checked for the tag itself).
type Shard = HashMap<u64, Holders, KeyHasher>;

/// Tag → the entries in memory that carry it.
pub(super) struct TagIndex {
    /// Tags come from origins and from other replicas' messages: hashed with a
    /// seed this process picks at random, so that no one can aim two at one hash.
    hasher: foldhash::quality::RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl TagIndex {
    pub(super) fn new() -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        TagIndex {
            hasher: foldhash::quality::RandomState::default(),
            shards,
        }
    }

    /// `tag`'s hash, and its shard, locked.
    fn shard(&self, tag: &str) -> (u64, MutexGuard<'_, Shard>) {
        let hash = self.hasher.hash_one(tag);
        let at = usize::try_from(hash % SHARDS as u64).unwrap_or(0);
        // In range: `at` is below the shard count.
        let shard = self.shards[at]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (hash, shard)
    }

    /// Notes that the entry about to be stored under `key` with `stamp` carries
    /// `tags`; returns what that costs the index, in bytes.
    pub(super) fn add(&self, key: CacheKey, stamp: u64, tags: &Tags) -> usize {
        let mut bytes = 0;
        for tag in tags {
            let (hash, mut shard) = self.shard(tag);
            match shard.get_mut(&hash) {
                Some(holders) => {
                    holders.insert((key, stamp));
                    bytes += SHARED_TAG_BYTES;
                }
                None => {
                    shard.insert(hash, Holders::One((key, stamp)));
                    bytes += NEW_TAG_BYTES;
                }
            }
        }
        bytes
    }

    /// Notes that the entry stored under `key` with `stamp`, carrying `tags`, has
    /// left memory.
    pub(super) fn remove(&self, key: CacheKey, stamp: u64, tags: &Tags) {
        for tag in tags {
            let (hash, mut shard) = self.shard(tag);
            let emptied = shard
                .get_mut(&hash)
                .is_some_and(|holders| holders.remove(&(key, stamp)));
            if emptied {
                shard.remove(&hash);
            }
        }
    }

    /// Forgets every pair (memory was emptied).
    pub(super) fn clear(&self) {
        for shard in self.shards.iter() {
            // Dropped outside the lock: a million pairs take a while to free.
            let emptied =
                std::mem::take(&mut *shard.lock().unwrap_or_else(PoisonError::into_inner));
            drop(emptied);
        }
    }

    /// The keys of the entries that may carry `tag` now.
    pub(super) fn keys(&self, tag: &str) -> Vec<CacheKey> {
        let (hash, shard) = self.shard(tag);
        shard.get(&hash).map(Holders::keys).unwrap_or_default()
    }

    /// How many (tag, entry) pairs the index holds.
    #[cfg(test)]
    pub(super) fn pairs(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                shard.values().map(Holders::len).sum::<usize>()
            })
            .sum()
    }
}
