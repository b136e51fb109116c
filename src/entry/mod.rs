//! The stored entry: a complete response with the timestamps and `Vary` data needed to
//! serve it again, and its versioned binary codec.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ETAG, LAST_MODIFIED};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};

pub(crate) mod codec;
mod decimal;
mod tags;

pub use codec::DecodeError;
pub(crate) use codec::{decode_entry, encode_entry, encodes_version_of};
pub(crate) use decimal::decimal_value;
pub(crate) use tags::TagsBuilder;
pub use tags::{TagIter, Tags};

/// The version of the stored-entry format; part of every storage key, so a new format
/// never reads an old one.
pub const FORMAT_VERSION: u8 = 2;

/// Most header fields a stored response holds: a response with more is not stored, and
/// a stored value with more is corrupt (a miss), so that no value read from Redis can
/// grow a `HeaderMap` past what `http` allows.
pub(crate) const MAX_HEADER_FIELDS: usize = crate::policy::storable::MAX_HEADER_FIELDS;
/// Most `Vary` names an entry or a Vary index holds (as at store time).
pub(crate) const MAX_VARY_NAMES: usize = crate::policy::storable::MAX_VARY_NAMES;
/// Most tags kept per response.
pub(crate) const MAX_TAGS: usize = 64;
/// Longest tag kept, in bytes.
pub(crate) const MAX_TAG_BYTES: usize = 256;

/// Whether a tag is kept: not empty, at most [`MAX_TAG_BYTES`], and no newline (what
/// [`Tags`] puts between tags).
pub(crate) fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() <= MAX_TAG_BYTES && !tag.as_bytes().contains(&b'\n')
}

/// A response as the cache stores it.
///
/// Bodies are [`Bytes`]: a hit hands out a reference-counted view, never a copy.
/// Each built response is an edition of its own: two are equal (`==`) when one is the
/// other's copy or decoded from its encoding, not when they were built alike.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use bytes::Bytes;
/// use http::{HeaderMap, StatusCode};
/// use tower_hybrid_cache::entry::CachedResponse;
///
/// let now = SystemTime::now();
/// let entry = CachedResponse::builder(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"hi"))
///     .stored_at(now)
///     .fresh_until(now + Duration::from_secs(60))
///     .build();
/// let bytes = entry.encode();
/// let back = CachedResponse::decode(bytes).unwrap();
/// assert_eq!(back.body(), &Bytes::from_static(b"hi"));
/// assert!(back.is_fresh(now + Duration::from_secs(59)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedResponse {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) stored_at: SystemTime,
    pub(crate) initial_age: Duration,
    pub(crate) fresh_until: SystemTime,
    pub(crate) stale_until: SystemTime,
    /// Until when a stale entry may be served while it is refreshed in the background
    /// (`stale-while-revalidate`); at most `stale_until`.
    pub(crate) swr_until: SystemTime,
    /// Until when a stale entry may be served when the origin fails
    /// (`stale-if-error`); at most `stale_until`.
    pub(crate) sie_until: SystemTime,
    /// The `Vary` names and the storing request's values (`None`: header absent).
    pub(crate) vary: Vec<(HeaderName, Option<Bytes>)>,
    pub(crate) tags: Tags,
    /// Names this stored version: drawn when the entry is built, kept through encoding
    /// and decoding. Two entries of one edition hold the same bytes, so a replica that
    /// holds the edition Redis holds need not read more of it than its head.
    pub(crate) edition: u64,
}

impl CachedResponse {
    /// Starts an entry; it is stored now and stale at once unless the builder says
    /// otherwise.
    pub fn builder(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> CachedResponseBuilder {
        room_for_hit_fields(&mut headers);
        let now = SystemTime::now();
        CachedResponseBuilder(CachedResponse {
            status,
            version: Version::HTTP_11,
            headers,
            body,
            stored_at: now,
            initial_age: Duration::ZERO,
            fresh_until: now,
            stale_until: now,
            swr_until: now,
            sie_until: now,
            vary: Vec::new(),
            tags: Tags::default(),
            edition: new_edition(),
        })
    }

    /// Returns the status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Returns the HTTP version the origin answered with.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Returns the stored header fields (hop-by-hop fields removed, `Content-Length` exact).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Returns the body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Returns when the response was received from the origin.
    pub fn stored_at(&self) -> SystemTime {
        self.stored_at
    }

    /// Returns until when the entry may be served without asking the origin.
    pub fn fresh_until(&self) -> SystemTime {
        self.fresh_until
    }

    /// Returns until when the entry is kept at all (equal to `fresh_until` unless a stale
    /// window applies).
    pub fn stale_until(&self) -> SystemTime {
        self.stale_until
    }

    /// Returns the `ETag` validator, if the origin sent one.
    pub fn etag(&self) -> Option<&HeaderValue> {
        self.headers.get(ETAG)
    }

    /// Returns the `Last-Modified` validator, if the origin sent one.
    pub fn last_modified(&self) -> Option<&HeaderValue> {
        self.headers.get(LAST_MODIFIED)
    }

    /// Returns the `Vary` field names the response was selected by, with the storing
    /// request's values (`None` where the request lacked the header).
    pub fn vary(&self) -> &[(HeaderName, Option<Bytes>)] {
        &self.vary
    }

    /// Returns the tags (surrogate keys) the entry carries.
    pub fn tags(&self) -> &Tags {
        &self.tags
    }

    /// Returns whether the entry is fresh at `now`.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        now < self.fresh_until
    }

    /// Returns the entry's age at `now` (RFC 9111 §4.2.3 `current_age`).
    pub fn age(&self, now: SystemTime) -> Duration {
        self.initial_age + now.duration_since(self.stored_at).unwrap_or(Duration::ZERO)
    }

    /// Whether, stale at `now`, it may be served while it is refreshed.
    pub(crate) fn may_serve_while_revalidating(&self, now: SystemTime) -> bool {
        now < self.swr_until
    }

    /// Whether, stale at `now`, it may be served because the origin failed.
    pub(crate) fn may_serve_on_error(&self, now: SystemTime) -> bool {
        now < self.sie_until
    }

    /// Returns how long the entry stays fresh after `now` (zero when stale).
    pub fn time_to_live(&self, now: SystemTime) -> Duration {
        self.fresh_until
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }

    /// Encodes the entry in the versioned binary format.
    pub fn encode(&self) -> Bytes {
        encode_entry(&Entry::Response(std::sync::Arc::new(self.clone())))
    }

    /// Decodes an entry; anything but a well-formed response entry of this format
    /// version is an error.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        match decode_entry(bytes)? {
            Entry::Response(response) => Ok(std::sync::Arc::unwrap_or_clone(response)),
            Entry::Variants(_) | Entry::Value(_) => Err(DecodeError::wrong_kind()),
        }
    }

    /// Puts in the body captured from the origin: `Content-Length` is then its exact
    /// length (a 204 carries none, RFC 9110 §8.6).
    pub(crate) fn complete(&mut self, body: Bytes) {
        if self.status == StatusCode::NO_CONTENT {
            self.headers.remove(http::header::CONTENT_LENGTH);
        } else {
            self.headers.insert(
                http::header::CONTENT_LENGTH,
                decimal_value(body.len() as u64),
            );
        }
        room_for_hit_fields(&mut self.headers);
        self.body = body;
    }

    /// Heap bytes the response holds, as the memory tier's weigher counts them
    /// (beside [`PER_ENTRY`]). Measured, not guessed: `tests/entry_weight.rs` counts
    /// every allocation of stored responses against these weights.
    pub(crate) fn weight(&self) -> usize {
        // The struct behind its `Arc`, the header map's own tables.
        const RESPONSE: usize = 384;
        // A field's slot in the map (name, value, hash, links; the map grows by
        // doubling, so a slot costs more than its size), besides its bytes.
        const FIELD: usize = 192;
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| FIELD + name.as_str().len() + value.len())
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .map(|(name, value)| 64 + name.as_str().len() + value.as_ref().map_or(0, Bytes::len))
            .sum();
        RESPONSE + headers + vary + self.tags.heap_bytes() + self.body.len()
    }
}

/// A new entry's edition: random ([`crate::random::next_u64`]), so that replicas draw
/// different ones and a thread never draws one twice.
fn new_edition() -> u64 {
    crate::random::next_u64()
}

/// The fields every response from the cache adds to the stored ones: `Age` and
/// `Cache-Status`.
pub(crate) const HIT_FIELDS: usize = 2;

/// Makes room in a stored map's table for [`HIT_FIELDS`]: a clone keeps its table's
/// size, so each hit then adds them without rebuilding the table (a tight map was
/// rebuilt twice a hit, about 1 500 instructions; BENCHMARKS, "Redis path,
/// instructions").
fn room_for_hit_fields(headers: &mut HeaderMap) {
    // An empty map has no table yet: its first field makes one of eight slots, as
    // a hit's first would (a table of two made here would be rebuilt at once).
    if headers.is_empty() {
        return;
    }
    // Fails only past http's limit of 32 768 fields; the map then stays as it was.
    let _ = headers.try_reserve(HIT_FIELDS);
}

/// Builds a [`CachedResponse`].
#[derive(Debug, Clone)]
#[must_use]
pub struct CachedResponseBuilder(CachedResponse);

impl CachedResponseBuilder {
    /// Sets the HTTP version the origin answered with (default HTTP/1.1).
    pub fn version(mut self, version: Version) -> Self {
        self.0.version = version;
        self
    }

    /// Sets when the response was received (default: when the builder was made).
    pub fn stored_at(mut self, at: SystemTime) -> Self {
        self.0.stored_at = at;
        self
    }

    /// Sets the age the response already had when it was received.
    pub fn initial_age(mut self, age: Duration) -> Self {
        self.0.initial_age = age;
        self
    }

    /// Sets until when the entry is fresh; also moves `stale_until` if that was earlier.
    pub fn fresh_until(mut self, at: SystemTime) -> Self {
        self.0.fresh_until = at;
        self.0.stale_until = self.0.stale_until.max(at);
        self
    }

    /// Sets until when the entry is kept at all; never earlier than `fresh_until`.
    pub fn stale_until(mut self, at: SystemTime) -> Self {
        self.0.stale_until = at.max(self.0.fresh_until);
        self
    }

    /// Sets until when it may be served stale while a refresh runs in the background
    /// (`stale-while-revalidate`); also moves `stale_until` if that was earlier.
    pub fn stale_while_revalidate_until(mut self, at: SystemTime) -> Self {
        self.0.swr_until = at;
        self.0.stale_until = self.0.stale_until.max(at);
        self
    }

    /// Sets until when it may be served stale when the origin fails (`stale-if-error`);
    /// also moves `stale_until` if that was earlier.
    pub fn stale_if_error_until(mut self, at: SystemTime) -> Self {
        self.0.sie_until = at;
        self.0.stale_until = self.0.stale_until.max(at);
        self
    }

    /// Every time of a store plan: stored, initial age, fresh, stale windows, kept.
    pub(crate) fn times(self, plan: &crate::policy::storable::StorePlan) -> Self {
        self.stored_at(plan.stored_at)
            .initial_age(plan.initial_age)
            .fresh_until(plan.fresh_until)
            .stale_while_revalidate_until(plan.swr_until)
            .stale_if_error_until(plan.sie_until)
            .stale_until(plan.stale_until)
    }

    /// Sets the `Vary` names and the storing request's values.
    pub fn vary(mut self, vary: Vec<(HeaderName, Option<Bytes>)>) -> Self {
        self.0.vary = vary;
        self
    }

    /// Sets the tags (surrogate keys): each valid one once, at most 64 (see [`Tags`]).
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.0.tags = tags.into_iter().collect();
        self
    }

    /// Sets tags already made.
    pub(crate) fn with_tags(mut self, tags: Tags) -> Self {
        self.0.tags = tags;
        self
    }

    /// Returns the entry.
    pub fn build(self) -> CachedResponse {
        self.0
    }
}

/// The `Vary` names under which a URL's variants are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VaryIndex {
    pub(crate) names: Vec<HeaderName>,
    pub(crate) stale_until: SystemTime,
    /// Part of every variant's key: an index written after an invalidation has a new
    /// one, so the variants stored before it can never be reached again.
    pub(crate) generation: u64,
}

/// An application value stored through the direct API: its serialised bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredValue {
    pub(crate) bytes: Bytes,
    pub(crate) stale_until: SystemTime,
}

/// What the memory tier spends on any entry besides what it holds: its slot in
/// quick_cache's slab (the key, the entry's pointer, its expiry and weight, the
/// links of its queue) and in the shard's hash table, and its share of the keys
/// remembered after eviction. Measured at 44 bytes an entry with the slab nearly full
/// (`tests/entry_weight.rs`); a slab just doubled holds about twice its entries' share.
const PER_ENTRY: usize = 128;

/// What a store holds under one key: a response, or, under a URL's primary key when
/// its responses vary, the names that select the variant, or a value of the direct
/// API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Response(std::sync::Arc<CachedResponse>),
    Variants(std::sync::Arc<VaryIndex>),
    Value(std::sync::Arc<StoredValue>),
}

impl Entry {
    /// Whether two entries are the same stored version.
    pub(crate) fn same_version(&self, other: &Entry) -> bool {
        match (self, other) {
            (Entry::Response(a), Entry::Response(b)) => a.edition == b.edition,
            (Entry::Variants(a), Entry::Variants(b)) => a == b,
            (Entry::Value(a), Entry::Value(b)) => {
                a.stale_until == b.stale_until && a.bytes == b.bytes
            }
            _ => false,
        }
    }

    /// The tags of a stored response (none for the other kinds).
    pub(crate) fn tags(&self) -> &Tags {
        match self {
            Entry::Response(response) => &response.tags,
            _ => &tags::NO_TAGS,
        }
    }

    pub(crate) fn stale_until(&self) -> SystemTime {
        match self {
            Entry::Response(r) => r.stale_until,
            Entry::Variants(v) => v.stale_until,
            Entry::Value(v) => v.stale_until,
        }
    }

    /// The bytes of its body (a response's, a stored value's): less than its encoded
    /// size, so an entry whose body alone is over a bound is over it encoded too.
    pub(crate) fn body_len(&self) -> usize {
        match self {
            Entry::Response(r) => r.body.len(),
            Entry::Variants(_) => 0,
            Entry::Value(v) => v.bytes.len(),
        }
    }

    /// Bytes the entry costs the memory tier, as its weigher counts them.
    pub(crate) fn weight(&self) -> usize {
        PER_ENTRY
            + match self {
                Entry::Response(r) => r.weight(),
                Entry::Variants(v) => {
                    128 + v.names.iter().map(|n| n.as_str().len() + 32).sum::<usize>()
                }
                Entry::Value(v) => 64 + v.bytes.len(),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::new_edition;

    #[test]
    fn editions_drawn_on_several_threads_are_all_distinct() {
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..10_000).map(|_| new_edition()).collect::<Vec<_>>()))
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap())
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 40_000);
    }
}
