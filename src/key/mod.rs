//! Cache keys: what makes two requests ask for the same stored response.

use std::fmt;

use http::{HeaderMap, HeaderName, Method, Uri};

use crate::policy::settings::RouteSettings;

pub(crate) mod canonical;

use canonical::{write_canonical_path, write_canonical_query};

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
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

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
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for byte in self.0 {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
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
                let raw = match uri.authority() {
                    Some(authority) => authority.as_str().as_bytes(),
                    None => headers
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
/// same input.
fn field(input: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = input.len();
    input.extend_from_slice(&[0; 8]);
    write(input);
    let len = (input.len() - at - 8) as u64;
    input[at..at + 8].copy_from_slice(&len.to_le_bytes());
}

/// Writes a request's values of `names`: all field lines of a name, trimmed and joined
/// with ", ", so `a, b` and two lines `a` and `b` match; an absent header differs from
/// an empty one.
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

/// All field lines of `name`, each trimmed, joined with ", ".
pub(crate) fn normalised_value(headers: &HeaderMap, name: &HeaderName) -> Vec<u8> {
    let mut joined = Vec::new();
    write_normalised_value(headers, name, &mut joined);
    joined
}

fn write_normalised_value(headers: &HeaderMap, name: &HeaderName, out: &mut Vec<u8>) {
    for (i, value) in headers.get_all(name).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(value.as_bytes().trim_ascii());
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
    }
}
