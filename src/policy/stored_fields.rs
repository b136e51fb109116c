//! Which header fields a stored response keeps (RFC 9111 §3.1): all but the
//! hop-by-hop fields (RFC 9110 §7.6.1), those `Connection` names, and `Age`
//! (recomputed on every hit).

use http::header::{AGE, CONNECTION};
use http::{HeaderMap, HeaderName};

/// Hop-by-hop fields, never stored.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The fields of `headers` worth storing.
pub(crate) fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut stored = headers.clone();
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().copied() {
        stored.remove(name);
    }
    for name in named {
        stored.remove(name);
    }
    stored.remove(AGE);
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
}
