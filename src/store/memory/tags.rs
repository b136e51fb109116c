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
/// table: name and holder, 64 bytes in a table that grows by doubling; the name's
/// allocation), charged to the entry that brings it. `tests/entry_weight.rs` checks
/// both figures against what the heap holds.
pub(super) const NEW_TAG_BYTES: usize = 160;

/// What the index holds for an entry carrying a tag others carry too: a slot in that
/// tag's set (40 bytes, in a table that grows by doubling).
pub(super) const SHARED_TAG_BYTES: usize = 80;

/// Shards of the index, so that stores of tagged entries seldom wait on each other.
const SHARDS: usize = 16;

type Shard = HashMap<Box<str>, Holders, foldhash::quality::RandomState>;

/// Tag → the entries in memory that carry it.
pub(super) struct TagIndex {
    /// Tags come from origins and from other replicas' messages: a hasher with a
    /// random seed a process picks their shard and slot.
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

    fn shard(&self, tag: &str) -> MutexGuard<'_, Shard> {
        let at = usize::try_from(self.hasher.hash_one(tag) % SHARDS as u64).unwrap_or(0);
        // In range: `at` is below the shard count.
        self.shards[at]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that the entry about to be stored under `key` with `stamp` carries
    /// `tags`; returns what that costs the index, in bytes.
    pub(super) fn add(&self, key: CacheKey, stamp: u64, tags: &[String]) -> usize {
        let mut bytes = 0;
        for tag in tags {
            let mut shard = self.shard(tag);
            match shard.get_mut(tag.as_str()) {
                Some(holders) => {
                    holders.insert((key, stamp));
                    bytes += SHARED_TAG_BYTES;
                }
                None => {
                    shard.insert(tag.as_str().into(), Holders::One((key, stamp)));
                    bytes += NEW_TAG_BYTES;
                }
            }
        }
        bytes
    }

    /// Notes that the entry stored under `key` with `stamp`, carrying `tags`, has
    /// left memory.
    pub(super) fn remove(&self, key: CacheKey, stamp: u64, tags: &[String]) {
        for tag in tags {
            let mut shard = self.shard(tag);
            let emptied = shard
                .get_mut(tag.as_str())
                .is_some_and(|holders| holders.remove(&(key, stamp)));
            if emptied {
                shard.remove(tag.as_str());
            }
        }
    }

    /// The keys of the entries that may carry `tag` now.
    pub(super) fn keys(&self, tag: &str) -> Vec<CacheKey> {
        self.shard(tag)
            .get(tag)
            .map(Holders::keys)
            .unwrap_or_default()
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
