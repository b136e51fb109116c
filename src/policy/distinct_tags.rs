//! Distinct tags in the order first seen, up to a bound: what a response's tag
//! fields, its handler's tags and its cache groups are read into.
//!
//! Comparing each new tag with every one kept cost the square of their number in
//! string comparisons: a stored miss with 64 tags spent more on them than on
//! everything else it did (BENCHMARKS.md, "Tags per entry"). Each tag's hash is kept
//! beside it, and a new tag is compared with a kept one only when their hashes are
//! equal.

use std::hash::BuildHasher;

use smallvec::SmallVec;

/// Distinct tags in first-seen order, at most `limit`.
pub(crate) struct DistinctTags {
    tags: Vec<String>,
    /// The hash of each tag in `tags`, at the same place.
    hashes: SmallVec<[u64; 16]>,
    limit: usize,
}

/// A fixed seed: tags that share a hash, by chance or by design, are told apart
/// by comparing them, which costs what finding a tag cost before the hashes.
const HASHER: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x7461_6773);

impl DistinctTags {
    /// An empty list that keeps at most `limit` tags.
    pub(crate) fn with_limit(limit: usize) -> Self {
        DistinctTags {
            tags: Vec::new(),
            hashes: SmallVec::new(),
            limit,
        }
    }

    /// Whether the list holds as many tags as it may.
    pub(crate) fn is_full(&self) -> bool {
        self.tags.len() >= self.limit
    }

    /// Keeps `tag` unless it is kept already or the list is full.
    pub(crate) fn add(&mut self, tag: &str) {
        if let Some(hash) = self.admits(tag) {
            self.keep(hash, tag.to_owned());
        }
    }

    /// Keeps `tag`, made by the caller, unless it is kept already or the list is full.
    pub(crate) fn add_owned(&mut self, tag: String) {
        if let Some(hash) = self.admits(&tag) {
            self.keep(hash, tag);
        }
    }

    /// `tag`'s hash when it is to be kept: the list has room and holds no such tag.
    fn admits(&self, tag: &str) -> Option<u64> {
        if self.is_full() {
            return None;
        }
        let hash = HASHER.hash_one(tag);
        let kept = holds(&self.hashes, hash)
            && self
                .hashes
                .iter()
                .zip(&self.tags)
                .any(|(held, kept)| *held == hash && kept == tag);
        (!kept).then_some(hash)
    }

    fn keep(&mut self, hash: u64, tag: String) {
        self.hashes.push(hash);
        self.tags.push(tag);
    }

    /// The tags, in the order first seen.
    pub(crate) fn into_vec(self) -> Vec<String> {
        self.tags
    }
}

/// Whether `hashes` holds `hash`: eight compared at a time with no branch between
/// them, which the compiler does in vector registers.
fn holds(hashes: &[u64], hash: u64) -> bool {
    let mut eights = hashes.chunks_exact(8);
    let found = eights.by_ref().any(|eight| {
        eight
            .iter()
            .fold(false, |found, held| found | (*held == hash))
    });
    found || eights.remainder().contains(&hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distinct(limit: usize, tags: &[&str]) -> Vec<String> {
        let mut list = DistinctTags::with_limit(limit);
        tags.iter().for_each(|tag| list.add(tag));
        list.into_vec()
    }

    #[test]
    fn tags_are_kept_once_in_first_seen_order_up_to_the_limit() {
        assert_eq!(distinct(64, &["b", "a", "b", "c", "a"]), ["b", "a", "c"]);
        assert_eq!(distinct(2, &["b", "a", "b", "c"]), ["b", "a"]);
        assert!(distinct(0, &["a"]).is_empty());

        let names: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        let mut input: Vec<&str> = names.iter().map(String::as_str).collect();
        // Each once more, in reverse, and the first ones a third time.
        input.extend(names.iter().rev().map(String::as_str));
        input.extend(names.iter().take(20).map(String::as_str));
        assert_eq!(distinct(64, &input), names[..64]);
        assert_eq!(distinct(1000, &input), names);
    }

    #[test]
    fn a_tag_sharing_another_ones_hash_is_still_kept() {
        let mut list = DistinctTags::with_limit(64);
        list.add("a");
        // A kept tag under "new"'s hash: as if their hashes collided.
        list.keep(HASHER.hash_one("new"), "other".to_owned());
        list.add("new");
        list.add("new");
        list.add_owned("a".to_owned());
        assert_eq!(list.into_vec(), ["a", "other", "new"]);
    }
}
