//! Revalidating a stale stored response (RFC 9111 §4.3): the request carries its
//! validators, and a 304 updates the stored fields.

use http::header::{
    CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED,
};
use http::{HeaderMap, HeaderName};

use super::stored_fields::storable_headers;

/// Fields a 304 may not change in the stored response (RFC 9111 §3.2): they describe
/// the stored body.
const KEPT_ON_304: [HeaderName; 4] = [
    CONTENT_LENGTH,
    CONTENT_ENCODING,
    CONTENT_RANGE,
    CONTENT_TYPE,
];

/// Puts the stored validators on a request the client made unconditional; `true` if
/// there were any.
pub(crate) fn add_validators(request: &mut HeaderMap, stored: &HeaderMap) -> bool {
    if request.contains_key(IF_NONE_MATCH) || request.contains_key(IF_MODIFIED_SINCE) {
        return false;
    }
    let mut added = false;
    if let Some(etag) = stored.get(ETAG) {
        request.insert(IF_NONE_MATCH, etag.clone());
        added = true;
    }
    if let Some(modified) = stored.get(LAST_MODIFIED) {
        request.insert(IF_MODIFIED_SINCE, modified.clone());
        added = true;
    }
    added
}

/// The stored fields updated by a 304 (RFC 9111 §4.3.4): each storable field it
/// carries replaces the stored ones of the same name, but for those that describe
/// the stored body.
pub(crate) fn headers_after_304(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let mut headers = stored.clone();
    let updates = storable_headers(not_modified);
    for name in updates.keys() {
        if KEPT_ON_304.contains(name) {
            continue;
        }
        headers.remove(name);
        for value in updates.get_all(name) {
            // Fallible: a 304 from the origin may carry any number of fields.
            let _ = headers.try_append(name.clone(), value.clone());
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn validators_go_only_on_an_unconditional_request() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Fri, 01 May 2026 00:00:00 GMT"),
        ]);
        let mut request = HeaderMap::new();
        assert!(add_validators(&mut request, &stored));
        assert_eq!(request["if-none-match"], "\"v1\"");
        assert!(request.contains_key("if-modified-since"));
        let mut conditional = headers(&[("if-none-match", "\"mine\"")]);
        assert!(!add_validators(&mut conditional, &stored));
        assert_eq!(conditional["if-none-match"], "\"mine\"");
        assert!(!add_validators(&mut HeaderMap::new(), &HeaderMap::new()));
    }

    #[test]
    fn a_304_updates_all_but_the_body_fields() {
        let stored = headers(&[
            ("content-type", "text/plain"),
            ("content-length", "10"),
            ("cache-control", "max-age=1"),
            ("x-a", "1"),
            ("x-a", "2"),
        ]);
        let not_modified = headers(&[
            ("content-type", "text/html"),
            ("content-encoding", "gzip"),
            ("cache-control", "max-age=60"),
            ("x-a", "3"),
            ("connection", "close"),
            ("age", "4"),
        ]);
        let after = headers_after_304(&stored, &not_modified);
        assert_eq!(after["content-type"], "text/plain");
        assert_eq!(after["content-length"], "10");
        assert!(!after.contains_key("content-encoding"));
        assert_eq!(after["cache-control"], "max-age=60");
        assert_eq!(after.get_all("x-a").iter().collect::<Vec<_>>(), ["3"]);
        assert!(!after.contains_key("connection") && !after.contains_key("age"));
    }
}
