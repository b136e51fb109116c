//! Cache keys: what makes two requests ask for the same stored response.

use std::fmt;

use http::header::{ACCEPT, ACCEPT_ENCODING, ACCEPT_LANGUAGE};
use http::{HeaderMap, HeaderName, Method, Uri};

use crate::policy::settings::{KeyAuthority, RouteSettings};

pub(crate) mod canonical;

use canonical::{write_canonical_path, write_canonical_query};

/// The hasher of the in-process tables keyed by [`CacheKey`] on the request path (the
/// memory tier, the fill and Redis read flights, the pending writes): foldhash with
/// a random seed. A key is a digest
/// of a URL a client chose, so the seed is what keeps keys from being picked to
/// collide; SipHash, the standard one, cost about 1 400 instructions a miss here.
pub(crate) type KeyHasher = foldhash::fast::RandomState;

/// A `HashMap` keyed by [`CacheKey`], with [`KeyHasher`].
pub(crate) type KeyMap<V> = std::collections::HashMap<CacheKey, V, KeyHasher>;

/// The identity of a stored response: a BLAKE3 digest of the method (HEAD counts as
/// GET), the authority, the path and query in canonical form, the route's extra key
/// headers and, for a variant, the request's values of the headers the response
/// `Vary`s on.
///
/// Being a digest, a key has a fixed size whatever the URL, and no byte of a URL can
/// reach a storage key (no Redis hash tag, no separator, no unbounded length).
///
/// ```
/// use tower_hybrid_cache::key::CacheKey;
///
/// let key = CacheKey::from_bytes([7; 32]);
/// assert_eq!(key.to_string(), "07".repeat(32));
/// assert_ne!(CacheKey::for_value("matches:7"), CacheKey::for_value("matches:8"));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

/// Hashes the digest's first eight bytes as one word: a digest is already uniform,
/// so the in-process tables need no more of it (equal keys still compare all 32
/// bytes), and a word costs the hasher one multiply where the whole slice cost a
/// length and a loop.
impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        state.write_u64(u64::from_le_bytes([a, b, c, d, e, f, g, h]));
    }
}

impl CacheKey {
    /// Makes a key from a digest made elsewhere.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        CacheKey(bytes)
    }

    /// Returns the digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Returns the key of an application value: a digest of the caller's key, so no caller
    /// key can reach a storage key's syntax (length, separators, Redis hash tags).
    pub fn for_value(key: &str) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"value\0");
        hasher.update(key.as_bytes());
        CacheKey(*hasher.finalize().as_bytes())
    }

    /// The digest's first eight bytes as one number, big-endian: what the first 16
    /// of its hex digits say, as announced on Redis (`store::redis::written`).
    pub(crate) fn fingerprint(&self) -> u64 {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        u64::from_be_bytes([a, b, c, d, e, f, g, h])
    }

    /// The key written as 64 lower-case hex digits (as in storage keys); `None` for
    /// anything else.
    pub(crate) fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let digit = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        let mut out = [0_u8; 32];
        // Read from pub/sub messages: no indexing, whatever the input.
        for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let [high, low] = pair else { return None };
            *slot = digit(*high)? << 4 | digit(*low)?;
        }
        Some(CacheKey(out))
    }

    /// The key as 64 lower-case hex digits.
    pub(crate) fn to_hex(self) -> String {
        let mut hex = String::with_capacity(64);
        self.push_hex(&mut hex);
        hex
    }

    /// Appends the 64 hex digits to `out`.
    pub(crate) fn push_hex(&self, out: &mut String) {
        // Written on the stack, two digits a byte from one table, and appended once: a
        // `push` a digit checked the capacity and encoded a `char` 64 times (about 500
        // instructions a key name), and a lookup a digit about 320 more than this.
        let mut hex = [0_u8; 64];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(self.0) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
        }
        out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    }

    /// The key of a request's URL, before any `Vary`.
    pub(crate) fn primary(
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        settings: &RouteSettings,
    ) -> Self {
        with_scratch(|input| {
            field(input, |b| b.extend_from_slice(b"primary"));
            // HEAD is answered from the GET entry.
            let method = if method == Method::HEAD {
                &Method::GET
            } else {
                method
            };
            field(input, |b| b.extend_from_slice(method.as_str().as_bytes()));
            field(input, |b| {
                let raw = match (&settings.key_authority, uri.authority()) {
                    (KeyAuthority::Fixed(fixed), _) => fixed.as_bytes(),
                    (KeyAuthority::None, _) => &[],
                    (KeyAuthority::Request, Some(authority)) => authority.as_str().as_bytes(),
                    (KeyAuthority::Request, None) => headers
                        .get(http::header::HOST)
                        .map(|h| h.as_bytes())
                        .unwrap_or_default(),
                };
                b.extend(raw.iter().map(u8::to_ascii_lowercase));
            });
            field(input, |b| write_canonical_path(uri.path(), b));
            field(input, |b| {
                write_canonical_query(uri.query(), &settings.query, b)
            });
            header_values(input, &settings.key_headers, headers);
            CacheKey(*blake3::hash(input).as_bytes())
        })
    }

    /// The key of a `QUERY`: its primary key, the content's `Content-Type` and
    /// `Content-Encoding`, and a digest of the content itself (RFC 10008 §2.7).
    pub(crate) fn with_content(&self, headers: &HeaderMap, content: &[u8]) -> Self {
        let digest = blake3::hash(content);
        with_scratch(|input| {
            field(input, |b| b.extend_from_slice(b"content"));
            field(input, |b| b.extend_from_slice(&self.0));
            header_values(
                input,
                &[http::header::CONTENT_TYPE, http::header::CONTENT_ENCODING],
                headers,
            );
            field(input, |b| b.extend_from_slice(digest.as_bytes()));
            CacheKey(*blake3::hash(input).as_bytes())
        })
    }

    /// The key of one variant of this URL: the primary key plus the request's values
    /// of the `Vary` names.
    pub(crate) fn variant(
        &self,
        generation: u64,
        vary: &[HeaderName],
        headers: &HeaderMap,
    ) -> Self {
        with_scratch(|input| {
            field(input, |b| b.extend_from_slice(b"variant"));
            field(input, |b| b.extend_from_slice(&self.0));
            field(input, |b| b.extend_from_slice(&generation.to_be_bytes()));
            header_values(input, vary, headers);
            CacheKey(*blake3::hash(input).as_bytes())
        })
    }
}

/// Each byte's two lower-case hex digits.
static HEX_PAIRS: [[u8; 2]; 256] = hex_pairs();

const fn hex_pairs() -> [[u8; 2]; 256] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0_u8; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [HEX[byte >> 4], HEX[byte & 0xf]];
        byte += 1;
    }
    pairs
}

thread_local! {
    /// The key's input, reused: deriving a key allocates nothing for common URLs.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn with_scratch<T>(derive: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut input) => {
            input.clear();
            let out = derive(&mut input);
            // Do not keep a huge URL's buffer alive for the thread's lifetime.
            if input.capacity() > 64 * 1024 {
                *input = Vec::new();
            }
            out
        }
        // Unreachable (derivation does not re-enter), but never worth a panic.
        Err(_) => derive(&mut Vec::new()),
    })
}

/// Writes one length-prefixed field, so that no two different field lists give the
/// same input. The length is a LEB128 varint (prefix-free, so still unambiguous):
/// one byte for a field under 128 bytes, which keeps a common URL's input within
/// one 64-byte BLAKE3 block (eight-byte lengths took two, about 450 instructions
/// more a key).
fn field(input: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = input.len();
    input.push(0);
    write(input);
    let len = input.len() - at - 1;
    if let (Ok(short @ 0..=0x7f), Some(slot)) = (u8::try_from(len), input.get_mut(at)) {
        *slot = short;
        return;
    }
    let mut prefix = [0_u8; 10];
    let used = leb128(len as u64, &mut prefix);
    // Rare (a field of 128 bytes or more): the field moves up to make room.
    input.splice(at..=at, prefix.iter().take(used).copied());
}

/// Writes `value` as LEB128 into `out` and returns how many bytes it took.
fn leb128(mut value: u64, out: &mut [u8; 10]) -> usize {
    let mut used = 0;
    for slot in out.iter_mut() {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        used += 1;
        if value == 0 {
            *slot = low;
            break;
        }
        *slot = low | 0x80;
    }
    used
}

/// Writes a request's values of `names`, each normalised as one list
/// ([`write_normalised_value`]); an absent header differs from an empty one.
fn header_values(input: &mut Vec<u8>, names: &[HeaderName], headers: &HeaderMap) {
    for name in names {
        field(input, |b| b.extend_from_slice(name.as_str().as_bytes()));
        if headers.contains_key(name) {
            input.push(1);
            field(input, |b| write_normalised_value(headers, name, b));
        } else {
            input.push(0);
        }
    }
}

/// All field lines of `name` read as one list, normalised (see
/// [`write_normalised_value`]).
pub(crate) fn normalised_value(headers: &HeaderMap, name: &HeaderName) -> Vec<u8> {
    let mut joined = Vec::new();
    write_normalised_value(headers, name, &mut joined);
    joined
}

/// Writes all field lines of `name` as one list: members trimmed, empty ones
/// dropped, joined with `,`, so that `1, 2`, ` 1,2 ` and two lines `1` and `2`
/// match. For the fields whose syntax is known and whose members' order and case
/// select nothing (`Accept`, `Accept-Encoding`, `Accept-Language`: the weights
/// do), members are also lower-cased, stripped of the spaces around their
/// parameters, and sorted.
fn write_normalised_value(headers: &HeaderMap, name: &HeaderName, out: &mut Vec<u8>) {
    let members = || {
        headers
            .get_all(name)
            .iter()
            .flat_map(|value| value.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|member| !member.is_empty())
    };
    let negotiated = [ACCEPT, ACCEPT_ENCODING, ACCEPT_LANGUAGE].contains(name);
    if !negotiated {
        for (i, member) in members().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(member);
        }
        return;
    }
    // Common values (`gzip, deflate, br`) are already lower case with no spaces
    // inside members: sorted as slices, without allocating.
    let mut slices: [&[u8]; 16] = [&[]; 16];
    let mut count = 0;
    let plain = |m: &[u8]| {
        !m.iter()
            .any(|b| b.is_ascii_uppercase() || matches!(b, b' ' | b'\t'))
    };
    for member in members() {
        match slices.get_mut(count) {
            Some(slot) if plain(member) => {
                *slot = member;
                count += 1;
            }
            _ => {
                count = usize::MAX;
                break;
            }
        }
    }
    if let Some(plain) = slices.get_mut(..count) {
        plain.sort_unstable();
        let mut last: Option<&[u8]> = None;
        for member in plain.iter() {
            if last == Some(member) {
                continue;
            }
            if last.is_some() {
                out.push(b',');
            }
            out.extend_from_slice(member);
            last = Some(member);
        }
        return;
    }
    let mut sorted: Vec<Vec<u8>> = members()
        .map(|member| {
            member
                .iter()
                .filter(|b| !matches!(b, b' ' | b'\t'))
                .map(u8::to_ascii_lowercase)
                .collect()
        })
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    for (i, member) in sorted.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(member);
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hex = String::with_capacity(64);
        self.push_hex(&mut hex);
        f.write_str(&hex)
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::settings::{NamePattern, QueryFilter};
    use http::HeaderValue;

    fn key(uri: &str, settings: &RouteSettings) -> CacheKey {
        let uri: Uri = uri.parse().unwrap();
        CacheKey::primary(&Method::GET, &uri, &HeaderMap::new(), settings)
    }

    /// Reads back a list of fields as `field` wrote them; `None` if it is not one.
    fn fields_of(mut input: &[u8]) -> Option<Vec<Vec<u8>>> {
        let mut fields = Vec::new();
        while !input.is_empty() {
            let (mut len, mut shift) = (0_u64, 0);
            loop {
                let (&byte, rest) = input.split_first()?;
                input = rest;
                len |= u64::from(byte & 0x7f) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            let len = usize::try_from(len).ok()?;
            fields.push(input.get(..len)?.to_vec());
            input = input.get(len..)?;
        }
        Some(fields)
    }

    #[test]
    fn field_lengths_take_one_byte_below_128_and_read_back_at_any_size() {
        for len in [0, 1, 127, 128, 255, 300, 16_383, 16_384, 70_000] {
            let mut input = vec![];
            field(&mut input, |b| b.extend(std::iter::repeat_n(b'x', len)));
            let prefix = input.len() - len;
            let expected = match len {
                0..=127 => 1,
                128..=16_383 => 2,
                _ => 3,
            };
            assert_eq!(prefix, expected, "{len}");
            assert_eq!(fields_of(&input), Some(vec![vec![b'x'; len]]));
        }
    }

    proptest::proptest! {
        #[test]
        fn any_list_of_fields_reads_back_as_written(
            fields in proptest::collection::vec(proptest::collection::vec(0_u8.., 0..400), 0..6)
        ) {
            let mut input = vec![];
            for written in &fields {
                field(&mut input, |b| b.extend_from_slice(written));
            }
            proptest::prop_assert_eq!(fields_of(&input), Some(fields));
        }
    }

    #[test]
    fn equivalent_urls_share_a_key() {
        let s = RouteSettings::default();
        assert_eq!(
            key("http://A.example/x?b=2&a=1", &s),
            key("http://a.example/x?a=1&b=2", &s)
        );
        assert_eq!(
            key("http://a/%7euser?q=%4a", &s),
            key("http://a/~user?q=J", &s)
        );
        assert_eq!(key("http://a/x?q=%2f", &s), key("http://a/x?q=%2F", &s));
        assert_eq!(key("http://a/x?&a=1&&", &s), key("http://a/x?a=1", &s));
    }

    #[test]
    fn different_urls_do_not() {
        let s = RouteSettings::default();
        let distinct = [
            "http://a/x",
            "http://b/x",
            "http://a/y",
            "http://a/x?a=1",
            "http://a/x?a=2",
            "http://a/x?a=1&a=2",
            "http://a/x?a=2&a=1",
            "http://a/x?q=%2F",
            "http://a/x?q=/",
            "http://a/x?q=a+b",
            "http://a/x?q=a%20b",
        ];
        let keys: std::collections::HashSet<_> = distinct.iter().map(|u| key(u, &s)).collect();
        assert_eq!(keys.len(), distinct.len());
    }

    #[test]
    fn host_header_stands_for_a_missing_authority() {
        let s = RouteSettings::default();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("A.Example"));
        let from_host = CacheKey::primary(&Method::GET, &"/x".parse().unwrap(), &headers, &s);
        assert_eq!(from_host, key("http://a.example/x", &s));
    }

    #[test]
    fn head_is_keyed_as_get() {
        let s = RouteSettings::default();
        let uri: Uri = "http://a/x".parse().unwrap();
        assert_eq!(
            CacheKey::primary(&Method::HEAD, &uri, &HeaderMap::new(), &s),
            CacheKey::primary(&Method::GET, &uri, &HeaderMap::new(), &s)
        );
    }

    #[test]
    fn ignored_query_params_do_not_count() {
        let s = RouteSettings {
            query: QueryFilter::Ignore(vec![NamePattern::new("utm_*")]),
            ..RouteSettings::default()
        };
        assert_eq!(
            key("http://a/x?q=1&utm_source=mail&utm_medium=x", &s),
            key("http://a/x?q=1", &s)
        );
        assert_ne!(key("http://a/x?q=1", &s), key("http://a/x?q=2", &s));
        let s = RouteSettings {
            query: QueryFilter::Keep(vec![NamePattern::new("q")]),
            ..RouteSettings::default()
        };
        assert_eq!(key("http://a/x?q=1&page=3", &s), key("http://a/x?q=1", &s));
    }

    #[test]
    fn key_headers_and_vary_values_split_keys() {
        let s = RouteSettings {
            key_headers: vec![HeaderName::from_static("x-tenant")],
            ..RouteSettings::default()
        };
        let uri: Uri = "http://a/x".parse().unwrap();
        let mut one = HeaderMap::new();
        one.insert("x-tenant", HeaderValue::from_static("one"));
        let mut two = HeaderMap::new();
        two.insert("x-tenant", HeaderValue::from_static("two"));
        let k1 = CacheKey::primary(&Method::GET, &uri, &one, &s);
        let k2 = CacheKey::primary(&Method::GET, &uri, &two, &s);
        assert_ne!(k1, k2);

        let vary = [HeaderName::from_static("accept-language")];
        let mut en = HeaderMap::new();
        en.insert("accept-language", HeaderValue::from_static("en"));
        let mut en_spaced = HeaderMap::new();
        en_spaced.insert("accept-language", HeaderValue::from_static("  en "));
        let none = HeaderMap::new();
        let mut empty = HeaderMap::new();
        empty.insert("accept-language", HeaderValue::from_static(""));
        assert_eq!(k1.variant(0, &vary, &en), k1.variant(0, &vary, &en_spaced));
        assert_ne!(k1.variant(0, &vary, &en), k1.variant(0, &vary, &none));
        assert_ne!(k1.variant(0, &vary, &none), k1.variant(0, &vary, &empty));
        assert_ne!(k1.variant(0, &vary, &en), k1);
        // A new index generation reaches none of the old variants.
        assert_ne!(k1.variant(0, &vary, &en), k1.variant(1, &vary, &en));
    }

    #[test]
    fn selecting_values_are_compared_as_normalised_lists() {
        let value = |name: &'static str, lines: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(name, HeaderValue::from_static(line));
            }
            normalised_value(&headers, &HeaderName::from_static(name))
        };
        // Any field: lines and spacing around commas.
        assert_eq!(value("foo", &["1, 2"]), value("foo", &["1", "2"]));
        assert_eq!(value("foo", &["1,2"]), value("foo", &[" 1, 2 "]));
        assert_eq!(value("foo", &["1,,2"]), b"1,2");
        assert_ne!(value("foo", &["1, 2"]), value("foo", &["2, 1"]));
        assert_ne!(value("foo", &["a"]), value("foo", &["A"]));
        // Negotiation fields: case, order, and spaces around parameters too.
        let lang = value("accept-language", &["en, de"]);
        assert_eq!(lang, value("accept-language", &["de, en"]));
        assert_eq!(lang, value("accept-language", &["eN, De"]));
        assert_eq!(lang, value("accept-language", &[" en ,   de"]));
        assert_ne!(lang, value("accept-language", &["en"]));
        assert_eq!(
            value("accept", &["text/html; q=0.9, application/json"]),
            value("accept", &["Application/JSON", "text/html;q=0.9"])
        );
        assert_ne!(
            value("accept-encoding", &["gzip;q=1"]),
            value("accept-encoding", &["gzip;q=0"])
        );
        // More members than the slices kept on the stack: the same answer.
        let many: Vec<String> = (0..20).map(|i| format!("l{i:02}")).collect();
        let forward = many.join(", ");
        let backward: Vec<&str> = many.iter().rev().map(String::as_str).collect();
        let mut a = HeaderMap::new();
        a.insert("accept-language", HeaderValue::from_str(&forward).unwrap());
        let mut b = HeaderMap::new();
        b.insert(
            "accept-language",
            HeaderValue::from_str(&backward.join(",")).unwrap(),
        );
        let name = HeaderName::from_static("accept-language");
        assert_eq!(normalised_value(&a, &name), normalised_value(&b, &name));
        assert_eq!(normalised_value(&a, &name), many.join(",").into_bytes());
    }

    #[test]
    fn hex_roundtrips_and_junk_is_refused() {
        let key = CacheKey::from_bytes([0xab; 32]);
        assert_eq!(CacheKey::from_hex(&key.to_hex()), Some(key));
        assert_eq!(CacheKey::from_hex("zz"), None);
        assert_eq!(CacheKey::from_hex(&"G".repeat(64)), None);
        assert_eq!(
            CacheKey::from_hex(&"AB".repeat(32)),
            None,
            "lower case only"
        );
        for start in (0..=224_u8).step_by(32) {
            let bytes: [u8; 32] = std::array::from_fn(|i| start + i as u8);
            let key = CacheKey::from_bytes(bytes);
            let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(key.to_hex(), expected);
            assert_eq!(CacheKey::from_hex(&expected), Some(key));
        }
    }
}
