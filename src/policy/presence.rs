//! Whether a message has a field, and its first value: the checks the request path
//! makes for fields most messages lack (the tag header, the targeted cache-control
//! fields, `Cache-Groups`, `Vary`, `Set-Cookie`, `Date`, `Age`, `Expires`, …).

use http::{HeaderMap, HeaderName, HeaderValue};

/// The most distinct names for which [`has_field`] scans rather than looks up.
const SCANNED_NAMES: usize = 8;

/// Whether `headers` holds a field `name`. A lookup hashes the name (every byte of a
/// name outside the standard set); a few names compare faster one by one, a
/// standard name against another name by its tag alone.
pub(crate) fn has_field(headers: &HeaderMap, name: &HeaderName) -> bool {
    if headers.keys_len() <= SCANNED_NAMES {
        headers.keys().any(|held| held == name)
    } else {
        headers.contains_key(name)
    }
}

/// The first value of `name` in `headers`, found as [`has_field`] finds it.
pub(crate) fn first_value<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Option<&'a HeaderValue> {
    if headers.keys_len() <= SCANNED_NAMES {
        headers
            .iter()
            .find_map(|(held, value)| (held == name).then_some(value))
    } else {
        headers.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_maps_answer_alike() {
        let custom = HeaderName::from_static("cache-tag");
        for fields in [0_usize, 1, 7, 8, 9, 40] {
            let mut headers = HeaderMap::new();
            for i in 0..fields {
                let name = HeaderName::from_bytes(format!("x-field-{i}").as_bytes()).unwrap();
                headers.insert(name, HeaderValue::from_static("1"));
            }
            assert!(!has_field(&headers, &custom), "{fields} fields");
            assert!(!has_field(&headers, &http::header::VARY), "{fields} fields");
            headers.append(custom.clone(), HeaderValue::from_static("a"));
            headers.append(http::header::VARY, HeaderValue::from_static("accept"));
            assert!(has_field(&headers, &custom), "{fields} fields");
            assert!(has_field(&headers, &http::header::VARY), "{fields} fields");
            // Names compare case-insensitively, as parsed.
            let upper = HeaderName::from_bytes(b"Cache-Tag").unwrap();
            assert!(has_field(&headers, &upper), "{fields} fields");
            // The first value of several, as `get` gives it.
            headers.append(custom.clone(), HeaderValue::from_static("b"));
            assert_eq!(
                first_value(&headers, &custom),
                headers.get(&custom),
                "{fields} fields"
            );
            assert_eq!(first_value(&headers, &custom).unwrap(), "a");
            assert_eq!(first_value(&headers, &http::header::AGE), None);
        }
    }
}
