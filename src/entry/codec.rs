//! The binary envelope of a stored entry.
//!
//! ```text
//! magic "\xF0THC" | format u8 | kind u8 | payload
//! kind 1, response: edition u64 | status u16 | version u8 | stored_at u64 ms | initial_age u64 ms
//!                   | fresh_until u64 ms | stale_until u64 ms
//!                   | swr_until u64 ms | sie_until u64 ms
//!                   | headers: u32 count × (name u16-len bytes, value u32-len bytes)
//!                   | vary: u16 count × (name u16-len bytes, present u8, [value u32-len bytes])
//!                   | tags: u16 count × (u16-len UTF-8) | body u64-len bytes
//! kind 2, variants: stale_until u64 ms | generation u64 | names: u16 count × (u16-len bytes)
//! kind 3, value:    stale_until u64 ms | bytes u64-len
//! ```
//! A response's first 14 bytes (up to its edition) are its head: they say which
//! version a key holds, so a replica holding that version reads no more of it.
//! Integers are big-endian. Decoding checks every length against what is left and
//! every count against the bound the store path keeps (header fields, `Vary` names,
//! tags), so a truncated, foreign or hostile value is an error, never a panic or a
//! huge allocation; header names and values are validated as `http` would on the wire.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};

use super::{
    is_valid_tag, CachedResponse, Entry, StoredValue, TagsBuilder, VaryIndex, FORMAT_VERSION,
    HIT_FIELDS, MAX_HEADER_FIELDS, MAX_TAGS, MAX_VARY_NAMES,
};

const MAGIC: &[u8; 4] = b"\xF0THC";
const KIND_RESPONSE: u8 = 1;
const KIND_VARIANTS: u8 = 2;
const KIND_VALUE: u8 = 3;

/// Why a stored value could not be read as an entry. The value is then a miss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    kind: DecodeErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DecodeErrorKind {
    Truncated,
    BadMagic,
    UnsupportedFormat(u8),
    UnknownKind(u8),
    WrongKind,
    BadStatus,
    BadVersion,
    BadHeader,
    BadTag,
    TooMany(&'static str),
    TrailingBytes,
}

impl DecodeError {
    fn new(kind: DecodeErrorKind) -> Self {
        DecodeError { kind }
    }

    pub(crate) fn wrong_kind() -> Self {
        Self::new(DecodeErrorKind::WrongKind)
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DecodeErrorKind::Truncated => f.write_str("stored entry is truncated"),
            DecodeErrorKind::BadMagic => f.write_str("value is not a stored entry (bad magic)"),
            DecodeErrorKind::UnsupportedFormat(v) => {
                write!(f, "stored entry has unsupported format version {v}")
            }
            DecodeErrorKind::UnknownKind(k) => write!(f, "stored entry has unknown kind {k}"),
            DecodeErrorKind::WrongKind => f.write_str("stored entry is not a response"),
            DecodeErrorKind::BadStatus => f.write_str("stored entry has an invalid status"),
            DecodeErrorKind::BadVersion => f.write_str("stored entry has an invalid HTTP version"),
            DecodeErrorKind::BadHeader => f.write_str("stored entry has an invalid header"),
            DecodeErrorKind::BadTag => f.write_str("stored entry has an invalid tag"),
            DecodeErrorKind::TooMany(what) => write!(f, "stored entry has too many {what}"),
            DecodeErrorKind::TrailingBytes => f.write_str("stored entry has trailing bytes"),
        }
    }
}

impl std::error::Error for DecodeError {}

pub(crate) fn encode_entry(entry: &Entry) -> Bytes {
    let mut out = BytesMut::with_capacity(match entry {
        Entry::Response(r) => r.weight() + 64,
        Entry::Variants(_) => 128,
        Entry::Value(v) => v.bytes.len() + 32,
    });
    out.put_slice(MAGIC);
    out.put_u8(FORMAT_VERSION);
    match entry {
        Entry::Response(r) => {
            out.put_u8(KIND_RESPONSE);
            out.put_u64(r.edition);
            out.put_u16(r.status.as_u16());
            out.put_u8(version_code(r.version));
            out.put_u64(millis_since_epoch(r.stored_at));
            out.put_u64(u64::try_from(r.initial_age.as_millis()).unwrap_or(u64::MAX));
            out.put_u64(millis_since_epoch(r.fresh_until));
            out.put_u64(millis_since_epoch(r.stale_until));
            out.put_u64(millis_since_epoch(r.swr_until));
            out.put_u64(millis_since_epoch(r.sie_until));
            // Counts are bounded by the type's limits when encoding: http's HeaderMap
            // holds at most 32 768 entries and names are under 64 KiB.
            out.put_u32(u32::try_from(r.headers.len()).unwrap_or(u32::MAX));
            for (name, value) in &r.headers {
                put_short(&mut out, name.as_str().as_bytes());
                put_long(&mut out, value.as_bytes());
            }
            out.put_u16(u16::try_from(r.vary.len()).unwrap_or(u16::MAX));
            for (name, value) in r.vary.iter().take(usize::from(u16::MAX)) {
                put_short(&mut out, name.as_str().as_bytes());
                match value {
                    Some(v) => {
                        out.put_u8(1);
                        put_long(&mut out, v);
                    }
                    None => out.put_u8(0),
                }
            }
            // Within the bounds decoding checks, as the store path keeps them.
            // `Tags` holds valid tags only, at most `MAX_TAGS`.
            out.put_u16(r.tags.len() as u16);
            for tag in &r.tags {
                put_short(&mut out, tag.as_bytes());
            }
            out.put_u64(r.body.len() as u64);
            out.put_slice(&r.body);
        }
        Entry::Variants(v) => {
            out.put_u8(KIND_VARIANTS);
            out.put_u64(millis_since_epoch(v.stale_until));
            out.put_u64(v.generation);
            out.put_u16(u16::try_from(v.names.len()).unwrap_or(u16::MAX));
            for name in v.names.iter().take(usize::from(u16::MAX)) {
                put_short(&mut out, name.as_str().as_bytes());
            }
        }
        Entry::Value(v) => {
            out.put_u8(KIND_VALUE);
            out.put_u64(millis_since_epoch(v.stale_until));
            out.put_u64(v.bytes.len() as u64);
            out.put_slice(&v.bytes);
        }
    }
    out.freeze()
}

pub(crate) fn decode_entry(bytes: Bytes) -> Result<Entry, DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(4)? != MAGIC[..] {
        return Err(DecodeError::new(DecodeErrorKind::BadMagic));
    }
    let format = r.u8()?;
    if format != FORMAT_VERSION {
        return Err(DecodeError::new(DecodeErrorKind::UnsupportedFormat(format)));
    }
    let entry = match r.u8()? {
        KIND_RESPONSE => Entry::Response(Arc::new(decode_response(&mut r)?)),
        KIND_VARIANTS => {
            let stale_until = time_from_millis(r.u64()?);
            let generation = r.u64()?;
            let count = r.count(MAX_VARY_NAMES, "vary names")?;
            let mut names = Vec::with_capacity(count);
            for _ in 0..count {
                names.push(header_name(&r.short()?)?);
            }
            Entry::Variants(Arc::new(VaryIndex {
                names,
                stale_until,
                generation,
            }))
        }
        KIND_VALUE => {
            let stale_until = time_from_millis(r.u64()?);
            let len = usize::try_from(r.u64()?)
                .map_err(|_| DecodeError::new(DecodeErrorKind::Truncated))?;
            let bytes = r.take(len)?;
            Entry::Value(Arc::new(StoredValue { bytes, stale_until }))
        }
        other => return Err(DecodeError::new(DecodeErrorKind::UnknownKind(other))),
    };
    if r.pos != r.bytes.len() {
        return Err(DecodeError::new(DecodeErrorKind::TrailingBytes));
    }
    Ok(entry)
}

/// Bytes of a stored value that say which version of a response it is: magic, format,
/// kind and edition. A read of only these many (`GETRANGE`) is enough to tell that a
/// replica holds the version Redis does.
pub(crate) const VERSION_HEAD: usize = 4 + 1 + 1 + 8;

/// Whether `raw`, as read from a store (the whole value, or at least its first
/// [`VERSION_HEAD`] bytes), is the version of `held`: a response of its edition.
pub(crate) fn encodes_version_of(raw: &[u8], held: &Entry) -> bool {
    let Entry::Response(held) = held else {
        return false;
    };
    let mut head = [0; VERSION_HEAD];
    head[..4].copy_from_slice(MAGIC);
    head[4] = FORMAT_VERSION;
    head[5] = KIND_RESPONSE;
    head[6..].copy_from_slice(&held.edition.to_be_bytes());
    raw.get(..VERSION_HEAD) == Some(&head[..])
}

fn decode_response(r: &mut Reader) -> Result<CachedResponse, DecodeError> {
    let edition = r.u64()?;
    let status =
        StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError::new(DecodeErrorKind::BadStatus))?;
    let version = version_from_code(r.u8()?)?;
    let stored_at = time_from_millis(r.u64()?);
    let initial_age = Duration::from_millis(r.u64()?);
    let fresh_until = time_from_millis(r.u64()?);
    let stale_until = time_from_millis(r.u64()?);
    let swr_until = time_from_millis(r.u64()?);
    let sie_until = time_from_millis(r.u64()?);
    let header_count = r.u32().and_then(|n| {
        bounded(
            usize::try_from(n).unwrap_or(usize::MAX),
            MAX_HEADER_FIELDS,
            "header fields",
        )
    })?;
    // Room for the fields a hit adds, as a stored map made here has (`HIT_FIELDS`).
    let mut headers = HeaderMap::try_with_capacity(header_count.saturating_add(HIT_FIELDS))
        .map_err(|_| DecodeError::new(DecodeErrorKind::TooMany("header fields")))?;
    for _ in 0..header_count {
        let name = header_name(&r.short()?)?;
        let value = HeaderValue::from_maybe_shared(r.long()?)
            .map_err(|_| DecodeError::new(DecodeErrorKind::BadHeader))?;
        headers
            .try_append(name, value)
            .map_err(|_| DecodeError::new(DecodeErrorKind::TooMany("header fields")))?;
    }
    let vary_count = r.count(MAX_VARY_NAMES, "vary names")?;
    let mut vary = Vec::with_capacity(vary_count);
    for _ in 0..vary_count {
        let name = header_name(&r.short()?)?;
        let value = match r.u8()? {
            0 => None,
            1 => Some(r.long()?),
            _ => return Err(DecodeError::new(DecodeErrorKind::BadHeader)),
        };
        vary.push((name, value));
    }
    let tag_count = r.count(MAX_TAGS, "tags")?;
    let mut tags = TagsBuilder::default();
    for _ in 0..tag_count {
        let bytes = r.short()?;
        let tag = std::str::from_utf8(&bytes)
            .ok()
            .filter(|tag| is_valid_tag(tag))
            .ok_or(DecodeError::new(DecodeErrorKind::BadTag))?;
        tags.add(tag);
    }
    let tags = tags.finish();
    let body_len = r.u64()?;
    let body = r.take(
        usize::try_from(body_len).map_err(|_| DecodeError::new(DecodeErrorKind::Truncated))?,
    )?;
    Ok(CachedResponse {
        status,
        version,
        headers,
        body,
        stored_at,
        initial_age,
        fresh_until,
        stale_until,
        swr_until,
        sie_until,
        vary,
        tags,
        edition,
    })
}

fn header_name(bytes: &[u8]) -> Result<HeaderName, DecodeError> {
    HeaderName::from_bytes(bytes).map_err(|_| DecodeError::new(DecodeErrorKind::BadHeader))
}

fn put_short(out: &mut BytesMut, bytes: &[u8]) {
    let len = bytes.len().min(usize::from(u16::MAX));
    out.put_u16(len as u16);
    out.put_slice(&bytes[..len]);
}

fn put_long(out: &mut BytesMut, bytes: &[u8]) {
    let len = bytes.len().min(u32::MAX as usize);
    out.put_u32(len as u32);
    out.put_slice(&bytes[..len]);
}

fn version_code(version: Version) -> u8 {
    match version {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    }
}

fn version_from_code(code: u8) -> Result<Version, DecodeError> {
    Ok(match code {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        2 => Version::HTTP_11,
        3 => Version::HTTP_2,
        4 => Version::HTTP_3,
        _ => return Err(DecodeError::new(DecodeErrorKind::BadVersion)),
    })
}

pub(crate) fn millis_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn time_from_millis(millis: u64) -> SystemTime {
    // Far-future values saturate instead of overflowing SystemTime.
    UNIX_EPOCH
        .checked_add(Duration::from_millis(millis))
        .unwrap_or(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)) * 4)
}

/// `count`, or an error if it is past `max`.
fn bounded(count: usize, max: usize, what: &'static str) -> Result<usize, DecodeError> {
    if count > max {
        return Err(DecodeError::new(DecodeErrorKind::TooMany(what)));
    }
    Ok(count)
}

struct Reader {
    bytes: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(DecodeError::new(DecodeErrorKind::Truncated))?;
        let out = self.bytes.slice(self.pos..end);
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        let mut out = [0; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A u16 count of `what`, refused past `max`.
    fn count(&mut self, max: usize, what: &'static str) -> Result<usize, DecodeError> {
        bounded(usize::from(self.u16()?), max, what)
    }

    fn short(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn long(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()?;
        self.take(len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header_name_strategy() -> impl Strategy<Value = HeaderName> {
        "[a-z][a-z0-9-]{0,20}".prop_map(|s| HeaderName::from_bytes(s.as_bytes()).unwrap())
    }

    fn header_value_strategy() -> impl Strategy<Value = HeaderValue> {
        // Any bytes http accepts in a value, non-UTF-8 (0x80..=0xFF) included.
        proptest::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..40)
            .prop_map(|b| HeaderValue::from_bytes(&b).unwrap())
    }

    fn time_strategy() -> impl Strategy<Value = SystemTime> {
        (0u64..4_000_000_000_000).prop_map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// A map of `fields` distinct fields, its table as small as it can be.
    fn tight_map(fields: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(fields);
        for i in 0..fields {
            let name = HeaderName::from_bytes(format!("x-field-{i}").as_bytes()).unwrap();
            map.insert(name, HeaderValue::from_static("v"));
        }
        map
    }

    /// Whether a hit's clone of `stored` takes `Age` and `Cache-Status` without
    /// rebuilding its table (an empty map has none: its first field makes one).
    fn hit_fields_fit(stored: &HeaderMap) -> bool {
        let mut hit = stored.clone();
        let table = hit.capacity();
        hit.insert(http::header::AGE, HeaderValue::from_static("1"));
        let first = hit.capacity();
        hit.append(
            "cache-status",
            HeaderValue::from_static("tower-hybrid-cache; hit"),
        );
        hit.capacity() == first && (table == 0 || first == table)
    }

    #[test]
    fn stored_maps_have_room_for_the_fields_a_hit_adds() {
        for fields in 0..70 {
            let built =
                CachedResponse::builder(StatusCode::OK, tight_map(fields), Bytes::new()).build();
            assert!(hit_fields_fit(&built.headers), "built, {fields} fields");
            let mut completed = built.clone();
            completed.complete(Bytes::from_static(b"body"));
            assert!(
                hit_fields_fit(&completed.headers),
                "completed, {fields} fields"
            );
            let decoded = CachedResponse::decode(completed.encode()).unwrap();
            assert!(hit_fields_fit(&decoded.headers), "decoded, {fields} fields");
        }
    }

    prop_compose! {
        fn response_strategy()(
            status in 100u16..1000,
            version in 0u8..5,
            headers in proptest::collection::vec((header_name_strategy(), header_value_strategy()), 0..12),
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            stored_at in time_strategy(),
            initial_age in 0u64..1_000_000_000,
            fresh in time_strategy(),
            stale in time_strategy(),
            swr in time_strategy(),
            sie in time_strategy(),
            vary in proptest::collection::vec((header_name_strategy(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20))), 0..4),
            tags in proptest::collection::vec("\\PC{1,12}", 0..4),
            edition in any::<u64>(),
        ) -> CachedResponse {
            let mut map = HeaderMap::new();
            for (n, v) in headers { map.append(n, v); }
            CachedResponse {
                status: StatusCode::from_u16(status).unwrap(),
                version: version_from_code(version).unwrap(),
                headers: map,
                body: Bytes::from(body),
                stored_at,
                initial_age: Duration::from_millis(initial_age),
                fresh_until: fresh,
                stale_until: stale,
                swr_until: swr,
                sie_until: sie,
                vary: vary.into_iter().map(|(n, v)| (n, v.map(Bytes::from))).collect(),
                tags: tags.into_iter().collect(),
                edition,
            }
        }
    }

    proptest! {
        #[test]
        fn responses_roundtrip(entry in response_strategy()) {
            let decoded = CachedResponse::decode(entry.encode()).unwrap();
            prop_assert_eq!(decoded, entry);
        }

        #[test]
        fn variant_indexes_roundtrip(names in proptest::collection::vec(header_name_strategy(), 0..=MAX_VARY_NAMES), stale in time_strategy(), generation in any::<u64>()) {
            let entry = Entry::Variants(Arc::new(VaryIndex { names, stale_until: stale, generation }));
            prop_assert_eq!(decode_entry(encode_entry(&entry)).unwrap(), entry);
        }

        #[test]
        fn values_roundtrip(bytes in proptest::collection::vec(any::<u8>(), 0..512), stale in time_strategy()) {
            let entry = Entry::Value(Arc::new(StoredValue { bytes: Bytes::from(bytes), stale_until: stale }));
            prop_assert_eq!(decode_entry(encode_entry(&entry)).unwrap(), entry);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_entry(Bytes::from(bytes));
        }

        /// The peek at an encoded version, at the whole value or its head alone, says
        /// what decoding it and comparing would: whether it is the held edition.
        #[test]
        fn the_version_peek_agrees_with_a_decode(
            stored in response_strategy(),
            held in response_strategy(),
            same_edition in any::<bool>(),
        ) {
            let mut held = held;
            if same_edition {
                held.edition = stored.edition;
            }
            let raw = encode_entry(&Entry::Response(Arc::new(stored)));
            let held = Entry::Response(Arc::new(held));
            let decoded = decode_entry(raw.clone()).unwrap();
            prop_assert_eq!(decoded.same_version(&held), same_edition);
            prop_assert_eq!(encodes_version_of(&raw, &held), same_edition);
            prop_assert_eq!(encodes_version_of(&raw[..VERSION_HEAD], &held), same_edition);
        }

        #[test]
        fn the_version_peek_at_garbage_never_panics_or_matches(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            held in response_strategy(),
        ) {
            let held = Entry::Response(Arc::new(held));
            prop_assert!(!encodes_version_of(&bytes, &held) || decode_entry(Bytes::from(bytes)).is_ok());
        }

        #[test]
        fn every_truncation_is_an_error(entry in response_strategy(), cut in any::<prop::sample::Index>()) {
            let bytes = entry.encode();
            let cut = cut.index(bytes.len());
            prop_assert!(decode_entry(bytes.slice(..cut)).is_err());
        }

        #[test]
        fn corrupted_entries_never_panic(entry in response_strategy(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = entry.encode().to_vec();
            let at = at.index(bytes.len());
            bytes[at] = byte;
            let _ = decode_entry(Bytes::from(bytes));
        }
    }

    #[test]
    fn the_version_peek_reads_only_responses_heads() {
        let build = || {
            CachedResponse::builder(
                StatusCode::OK,
                HeaderMap::new(),
                Bytes::from_static(b"body"),
            )
            .build()
        };
        let response = Entry::Response(Arc::new(build()));
        let raw = encode_entry(&response);
        assert!(encodes_version_of(&raw, &response));
        // The head alone says it; less than the head does not.
        for cut in 0..raw.len() {
            assert_eq!(
                encodes_version_of(&raw[..cut], &response),
                cut >= VERSION_HEAD,
                "cut at {cut}"
            );
        }
        // Another magic, format, kind or edition in the same bytes.
        for at in 0..VERSION_HEAD {
            let mut other = raw.to_vec();
            other[at] ^= 0x7f;
            assert!(!encodes_version_of(&other, &response), "byte {at}");
        }
        // The same response built again is another edition: its bytes differ only
        // there, and say it.
        let again = Entry::Response(Arc::new(build()));
        assert!(!encodes_version_of(&encode_entry(&again), &response));
        assert!(!again.same_version(&response));
        let value = Entry::Value(Arc::new(StoredValue {
            bytes: Bytes::from_static(b"body"),
            stale_until: UNIX_EPOCH,
        }));
        assert!(!encodes_version_of(&encode_entry(&value), &value));
        assert!(!encodes_version_of(&encode_entry(&value), &response));
    }

    #[test]
    fn foreign_values_are_clear_errors() {
        let err = decode_entry(Bytes::from_static(b"{\"json\":true}")).unwrap_err();
        assert_eq!(err.to_string(), "value is not a stored entry (bad magic)");
        let mut v2 = MAGIC.to_vec();
        v2.extend_from_slice(&[9, 1]);
        let err = decode_entry(Bytes::from(v2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stored entry has unsupported format version 9"
        );
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[FORMAT_VERSION, KIND_RESPONSE]);
        huge.extend_from_slice(&[0; 8]);
        huge.extend_from_slice(&[0, 200, 2]);
        huge.extend_from_slice(&[0; 32]);
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode_entry(Bytes::from(huge)).unwrap_err().kind,
            DecodeErrorKind::Truncated
        );
    }

    #[test]
    fn a_stored_tag_no_tag_may_be_is_an_error() {
        let entry = CachedResponse::builder(StatusCode::OK, HeaderMap::new(), Bytes::new())
            .tags(["tagtag"])
            .build();
        let bytes = entry.encode().to_vec();
        let at = bytes
            .windows(6)
            .position(|w| w == b"tagtag")
            .expect("the tag is in the value");
        // A newline (what `Tags` puts between tags), and bytes that are not UTF-8.
        for bad in [&b"tag\ntg"[..], &b"tag\xfftg"[..]] {
            let mut value = bytes.clone();
            value[at..at + 6].copy_from_slice(bad);
            assert_eq!(
                decode_entry(Bytes::from(value)).unwrap_err().kind,
                DecodeErrorKind::BadTag
            );
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let entry = CachedResponse::builder(StatusCode::OK, HeaderMap::new(), Bytes::new()).build();
        let mut bytes = entry.encode().to_vec();
        bytes.push(0);
        assert_eq!(
            decode_entry(Bytes::from(bytes)).unwrap_err().kind,
            DecodeErrorKind::TrailingBytes
        );
    }
}
