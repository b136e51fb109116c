//! A stored response's tags (surrogate keys), in one allocation: their text one
//! after another, a newline between each (no kept tag holds one). A `Vec<String>`
//! cost an allocation a tag to make and to free, and 24 bytes a tag more.
//!
//! Tags are kept once each: comparing each new tag with every one kept cost the
//! square of their number in string comparisons (a stored miss with 64 tags spent
//! more on them than on everything else it did: BENCHMARKS.md, "Tags per entry").
//! The builder keeps each tag's hash beside it, and compares a new tag with a kept
//! one only when their hashes are equal.

use std::fmt;
use std::hash::BuildHasher;

use smallvec::SmallVec;

use super::{is_valid_tag, MAX_TAGS};

/// The tags (surrogate keys) a stored response carries: each once, in the order
/// first given, at most 64, each a valid tag (not empty, at most 256 bytes, no
/// newline).
///
/// ```
/// use tower_hybrid_cache::entry::Tags;
///
/// let tags: Tags = ["jobs", "job:42", "", "jobs"].into_iter().collect();
/// assert_eq!(tags.len(), 2);
/// assert!(tags.contains("job:42"));
/// assert_eq!(tags.iter().collect::<Vec<_>>(), ["jobs", "job:42"]);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tags(Option<Box<str>>);

/// No tags, for the entries that are not responses.
pub(crate) static NO_TAGS: Tags = Tags(None);

impl Tags {
    /// Makes the list from tags joined by newlines, as [`TagsBuilder`] joins them.
    fn from_joined(joined: String) -> Self {
        if joined.is_empty() {
            Tags(None)
        } else {
            Tags(Some(joined.into_boxed_str()))
        }
    }

    /// Returns an iterator over the tags, in order.
    pub fn iter(&self) -> TagIter<'_> {
        TagIter(self.0.as_deref())
    }

    /// Returns how many tags there are.
    pub fn len(&self) -> usize {
        self.0.as_deref().map_or(0, |joined| {
            joined.bytes().filter(|b| *b == b'\n').count() + 1
        })
    }

    /// Returns whether there are no tags.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Returns whether `tag` is one of the tags.
    pub fn contains(&self, tag: &str) -> bool {
        self.iter().any(|held| held == tag)
    }

    /// The heap the tags hold, in bytes: their text and the separators, in one block
    /// (and the allocator's word beside it).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.0.as_deref().map_or(0, |joined| joined.len() + 16)
    }
}

impl fmt::Debug for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Keeps each valid tag once, in the order first given, at most 64; others are left
/// out.
impl<S: AsRef<str>> FromIterator<S> for Tags {
    fn from_iter<I: IntoIterator<Item = S>>(tags: I) -> Self {
        let mut builder = TagsBuilder::default();
        for tag in tags {
            if builder.is_full() {
                break;
            }
            builder.add(tag.as_ref());
        }
        builder.finish()
    }
}

/// Compares the tags with a list of them, in order.
impl<S: AsRef<str>> PartialEq<[S]> for Tags {
    fn eq(&self, other: &[S]) -> bool {
        self.iter().eq(other.iter().map(AsRef::as_ref))
    }
}

/// Compares the tags with a list of them, in order.
impl<S: AsRef<str>, const N: usize> PartialEq<[S; N]> for Tags {
    fn eq(&self, other: &[S; N]) -> bool {
        *self == other[..]
    }
}

impl<'a> IntoIterator for &'a Tags {
    type Item = &'a str;
    type IntoIter = TagIter<'a>;

    fn into_iter(self) -> TagIter<'a> {
        self.iter()
    }
}

/// An iterator over a response's [`Tags`].
#[derive(Clone, Debug)]
pub struct TagIter<'a>(Option<&'a str>);

impl<'a> Iterator for TagIter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        // Byte by byte: tags are short, and `str::split` set up a `memchr` for each.
        let rest = self.0?;
        match rest.bytes().position(|b| b == b'\n') {
            Some(at) => {
                // An ASCII newline: both sides lie on character boundaries.
                self.0 = rest.get(at + 1..);
                rest.get(..at)
            }
            None => {
                self.0 = None;
                Some(rest)
            }
        }
    }
}

/// A fixed seed: tags that share a hash, by chance or by design, are told apart
/// by comparing them, which costs what finding a tag cost before the hashes.
const HASHER: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x7461_6773);

/// Joins distinct tags into [`Tags`].
#[derive(Default)]
pub(crate) struct TagsBuilder {
    joined: String,
    /// The hash of each tag kept, in order.
    hashes: SmallVec<[u64; 16]>,
    /// Where each tag kept starts and ends in `joined`.
    spans: SmallVec<[(u32, u32); 16]>,
}

impl TagsBuilder {
    /// Makes room for `bytes` of tags (a tag field's length holds its tags and the
    /// separators between them): the text grows once, not by doubling as it goes.
    pub(crate) fn reserve(&mut self, bytes: usize) {
        self.joined
            .reserve(bytes.min(super::MAX_TAGS * (super::MAX_TAG_BYTES + 1)));
    }

    /// Whether the builder holds as many tags as a response may.
    pub(crate) fn is_full(&self) -> bool {
        self.spans.len() >= MAX_TAGS
    }

    /// Keeps `tag` when it is valid, new, and there is room.
    pub(crate) fn add(&mut self, tag: &str) {
        if self.is_full() || !is_valid_tag(tag) {
            return;
        }
        let hash = HASHER.hash_one(tag);
        let kept = holds(&self.hashes, hash)
            && self
                .hashes
                .iter()
                .zip(&self.spans)
                .any(|(held, &(start, end))| {
                    *held == hash && self.joined.get(start as usize..end as usize) == Some(tag)
                });
        if kept {
            return;
        }
        if !self.joined.is_empty() {
            self.joined.push('\n');
        }
        // At most 64 tags of 256 bytes: far within `u32`.
        let start = u32::try_from(self.joined.len()).unwrap_or(u32::MAX);
        self.joined.push_str(tag);
        let end = u32::try_from(self.joined.len()).unwrap_or(u32::MAX);
        self.hashes.push(hash);
        self.spans.push((start, end));
    }

    /// The tags kept, in order.
    pub(crate) fn finish(self) -> Tags {
        Tags::from_joined(self.joined)
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

    #[test]
    fn tags_are_kept_once_in_order_leaving_out_what_no_tag_may_be() {
        let long = "x".repeat(257);
        let tags: Tags = ["b", "", "a\nc", &long, "a", "b"].into_iter().collect();
        assert_eq!(tags.iter().collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(tags.len(), 2);
        assert!(tags.contains("a") && !tags.contains("c") && !tags.contains(""));
        assert_eq!(format!("{tags:?}"), r#"["b", "a"]"#);
        assert_eq!(tags.heap_bytes(), "b\na".len() + 16);

        let none: Tags = std::iter::empty::<&str>().collect();
        assert!(none.is_empty() && none.iter().next().is_none());
        assert_eq!(none.len(), 0);
        assert_eq!(none, NO_TAGS);
        assert_eq!(none.heap_bytes(), 0);
    }

    #[test]
    fn many_tags_are_told_apart_up_to_the_limit() {
        let names: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        let mut input: Vec<&str> = names.iter().map(String::as_str).collect();
        // Each once more, in reverse, and the first ones a third time.
        input.extend(names.iter().rev().map(String::as_str));
        input.extend(names.iter().take(20).map(String::as_str));
        let tags: Tags = input.iter().collect();
        assert_eq!(tags.iter().collect::<Vec<_>>(), names[..MAX_TAGS]);
    }

    #[test]
    fn a_tag_sharing_another_ones_hash_is_still_kept() {
        let mut builder = TagsBuilder::default();
        builder.add("a");
        builder.add("other");
        // "other" filed under "new"'s hash: as if their hashes collided.
        if let Some(held) = builder.hashes.get_mut(1) {
            *held = HASHER.hash_one("new");
        }
        builder.add("new");
        builder.add("new");
        builder.add("a");
        assert_eq!(
            builder.finish().iter().collect::<Vec<_>>(),
            ["a", "other", "new"]
        );
    }
}
