//! Conditional requests answered from a fresh stored response (RFC 9110 §13,
//! RFC 9111 §4.3.2): `If-None-Match` with the weak comparison, else
//! `If-Modified-Since`.

use std::time::SystemTime;

use http::header::{
    DATE, ETAG, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_UNMODIFIED_SINCE, LAST_MODIFIED,
};
use http::{HeaderMap, HeaderName};

use super::http_date::parse_http_date;

/// Whether `name` is one of the four preconditions (RFC 9110 §13.1) the cache
/// looks at; a request with none of them skips every check below (the hit path reads
/// the fields once, where each check here is a lookup).
pub(crate) fn is_precondition(name: &HeaderName) -> bool {
    name == IF_NONE_MATCH
        || name == IF_MODIFIED_SINCE
        || name == IF_MATCH
        || name == IF_UNMODIFIED_SINCE
}

/// Preconditions the cache leaves to the origin: their failure is a 412 only the origin
/// may decide. (`If-Range` is the cache's to judge against a stored response: it only
/// chooses between a range and the whole.)
pub(crate) fn has_origin_preconditions(request: &HeaderMap) -> bool {
    request.contains_key(IF_MATCH) || request.contains_key(IF_UNMODIFIED_SINCE)
}

/// Whether a stored response with `stored` headers, received at `stored_at`, answers
/// the request's conditions with 304 Not Modified.
pub(crate) fn is_not_modified(
    request: &HeaderMap,
    stored: &HeaderMap,
    stored_at: SystemTime,
) -> bool {
    if request.contains_key(IF_NONE_MATCH) {
        // With If-None-Match, If-Modified-Since is ignored (RFC 9110 §13.1.3).
        let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) else {
            // `*` matches any current representation; this one has no tag to compare.
            return request
                .get_all(IF_NONE_MATCH)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.split(',').any(|tag| tag.trim() == "*"));
        };
        let etag = opaque(etag);
        return request
            .get_all(IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(|tag| tag == "*" || (!tag.is_empty() && opaque(tag) == etag));
    }
    let Some(since) = request
        .get(IF_MODIFIED_SINCE)
        .and_then(|v| parse_http_date(v.as_bytes()))
    else {
        return false;
    };
    // The stored validator: Last-Modified, else Date, else when it was received.
    let modified = [LAST_MODIFIED, DATE]
        .iter()
        .find_map(|name| stored.get(name).and_then(|v| parse_http_date(v.as_bytes())))
        .unwrap_or(stored_at);
    modified <= since
}

/// The opaque tag of an entity tag, for the weak comparison: `W/"x"` and `"x"` match.
fn opaque(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    const MAY_2026: &str = "Fri, 01 May 2026 00:00:00 GMT";
    const JUNE_2026: &str = "Mon, 01 Jun 2026 00:00:00 GMT";

    #[test]
    fn if_none_match_uses_the_weak_comparison() {
        let at = UNIX_EPOCH;
        let stored = headers(&[("etag", "W/\"v1\"")]);
        for (condition, hit) in [
            ("\"v1\"", true),
            ("W/\"v1\"", true),
            ("\"v0\", W/\"v1\"", true),
            ("*", true),
            ("\"v2\"", false),
            ("", false),
            ("v1", false),
        ] {
            let request = headers(&[("if-none-match", condition)]);
            assert_eq!(is_not_modified(&request, &stored, at), hit, "{condition}");
        }
        // No ETag stored: only `*` matches.
        let untagged = headers(&[]);
        assert!(is_not_modified(
            &headers(&[("if-none-match", "*")]),
            &untagged,
            at
        ));
        assert!(!is_not_modified(
            &headers(&[("if-none-match", "\"v1\"")]),
            &untagged,
            at
        ));
    }

    #[test]
    fn if_modified_since_compares_last_modified_then_date_then_arrival() {
        let may = httpdate::parse_http_date(MAY_2026).unwrap();
        let since_june = headers(&[("if-modified-since", JUNE_2026)]);
        let since_may = headers(&[("if-modified-since", MAY_2026)]);
        let stored = headers(&[("last-modified", MAY_2026), ("date", JUNE_2026)]);
        assert!(is_not_modified(&since_june, &stored, may));
        assert!(is_not_modified(&since_may, &stored, may));
        let later = headers(&[("last-modified", JUNE_2026)]);
        assert!(!is_not_modified(&since_may, &later, may));
        // Date when there is no Last-Modified; the arrival time when neither.
        assert!(!is_not_modified(
            &since_may,
            &headers(&[("date", JUNE_2026)]),
            may
        ));
        assert!(is_not_modified(&since_june, &headers(&[]), may));
        assert!(!is_not_modified(
            &since_may,
            &headers(&[]),
            may + Duration::from_secs(1)
        ));
        // Unreadable dates are ignored: a full response.
        assert!(!is_not_modified(
            &headers(&[("if-modified-since", "yesterday")]),
            &stored,
            may
        ));
    }

    #[test]
    fn if_none_match_wins_over_if_modified_since() {
        let stored = headers(&[("etag", "\"v1\""), ("last-modified", MAY_2026)]);
        let request = headers(&[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", JUNE_2026),
        ]);
        assert!(!is_not_modified(&request, &stored, UNIX_EPOCH));
    }
}
