//! Which header fields a stored response keeps (RFC 9111 §3.1): all but the
//! hop-by-hop fields (RFC 9110 §7.6.1), those `Connection` names, and `Age`
//! (recomputed on every hit).

use http::header::{AGE, CONNECTION};
use http::{HeaderMap, HeaderName};

use super::presence::has_field;

/// Whether `name` is a hop-by-hop field, never stored.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The fields of `headers` worth storing: one pass over the names finds those to
/// drop (the usual response has none).
pub(crate) fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<HeaderName> = if has_field(headers, &CONNECTION) {
        headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let dropped = |name: &HeaderName| is_hop_by_hop(name) || name == AGE || named.contains(name);
    // Empty, and so no allocation, for the usual response.
    let names: Vec<HeaderName> = headers.keys().filter(|n| dropped(n)).cloned().collect();
    let mut stored = headers.clone();
    for name in names {
        stored.remove(name);
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_not_stored() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("close, x-private-hop"),
        );
        headers.insert("x-private-hop", HeaderValue::from_static("1"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("age", HeaderValue::from_static("5"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        let stored = storable_headers(&headers);
        assert_eq!(stored.len(), 1);
        assert!(stored.contains_key("content-type"));
    }

    #[test]
    fn a_response_with_nothing_to_drop_is_kept_whole() {
        let mut headers = HeaderMap::new();
        headers.append("vary", HeaderValue::from_static("accept"));
        headers.append("vary", HeaderValue::from_static("accept-language"));
        headers.insert("etag", HeaderValue::from_static("\"v1\""));
        let stored = storable_headers(&headers);
        assert_eq!(stored, headers);
        let mut with_age = headers.clone();
        with_age.insert("age", HeaderValue::from_static("3"));
        assert_eq!(storable_headers(&with_age), headers, "only Age dropped");
    }
}
