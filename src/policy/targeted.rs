//! Targeted cache-control fields (RFC 9213): `CDN-Cache-Control` and its kind, which
//! replace `Cache-Control` for the caches they target. A route lists the fields it
//! obeys, in order; the first one present that parses as a Structured Fields
//! dictionary (RFC 8941, through `sfv`) decides, and one that does not parse, or is
//! empty, is ignored as if absent (RFC 9213 §2.1).

use http::{HeaderMap, HeaderName};
use sfv::{BareItem, Dictionary, ListEntry};

use super::cache_control::{CacheControl, DELTA_SECONDS_CAP};
use super::presence::has_field;
use super::structured::parse_field;

/// The directives of the first targeted field in `names` that `headers` carries and
/// that parses; `None` when there is none (then `Cache-Control` decides).
pub(crate) fn targeted_cache_control(
    headers: &HeaderMap,
    names: &[HeaderName],
) -> Option<CacheControl> {
    names.iter().find_map(|name| read_field(headers, name))
}

fn read_field(headers: &HeaderMap, name: &HeaderName) -> Option<CacheControl> {
    if !has_field(headers, name) {
        return None;
    }
    let dictionary: Dictionary = parse_field(headers, name)?;
    if dictionary.is_empty() {
        return None;
    }
    let mut cc = CacheControl::default();
    for (key, member) in &dictionary {
        let value = match member {
            ListEntry::Item(item) => Some(&item.bare_item),
            ListEntry::InnerList(_) => None,
        };
        apply(&mut cc, key.as_str(), value);
    }
    Some(cc)
}

/// One directive: a delta-seconds one wants a non-negative integer (anything else
/// counts as 0, stale at once, as `Cache-Control` reads a bad value); a flag is set
/// by any value but `?0`. Parameters are ignored.
fn apply(cc: &mut CacheControl, name: &str, value: Option<&BareItem>) {
    let seconds = || match value {
        Some(BareItem::Integer(n)) => u64::try_from(i64::from(*n))
            .unwrap_or(0)
            .min(DELTA_SECONDS_CAP),
        _ => 0,
    };
    let flag = !matches!(value, Some(BareItem::Boolean(false)));
    match name {
        "max-age" => cc.max_age = Some(seconds()),
        "s-maxage" => cc.s_maxage = Some(seconds()),
        "stale-while-revalidate" => cc.stale_while_revalidate = Some(seconds()),
        "stale-if-error" => cc.stale_if_error = Some(seconds()),
        "no-store" => cc.no_store |= flag,
        "no-cache" => cc.no_cache |= flag,
        "private" => cc.private |= flag,
        "public" => cc.public |= flag,
        "must-revalidate" => cc.must_revalidate |= flag,
        "proxy-revalidate" => cc.proxy_revalidate |= flag,
        "immutable" => cc.immutable |= flag,
        "must-understand" => cc.must_understand |= flag,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cdn() -> HeaderName {
        HeaderName::from_static("cdn-cache-control")
    }

    fn read(lines: &[&'static str]) -> Option<CacheControl> {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(cdn(), HeaderValue::from_static(line));
        }
        targeted_cache_control(&headers, &[cdn()])
    }

    #[test]
    fn directives_are_read_from_a_dictionary() {
        let cc = read(&["max-age=3600, stale-if-error=60", "must-revalidate"]).unwrap();
        assert_eq!(cc.max_age, Some(3600));
        assert_eq!(cc.stale_if_error, Some(60));
        assert!(cc.must_revalidate && !cc.no_store);
        let cc = read(&["no-store, private=?0, foo, no-cache=\"set-cookie\""]).unwrap();
        assert!(cc.no_store && !cc.private && cc.no_cache);
        assert_eq!(
            read(&["max-age=99999999999"]).unwrap().max_age,
            Some(DELTA_SECONDS_CAP)
        );
    }

    #[test]
    fn a_bad_value_is_stale_and_a_bad_field_is_ignored() {
        assert_eq!(read(&["max-age=\"10000\""]).unwrap().max_age, Some(0));
        assert_eq!(read(&["max-age=-1"]).unwrap().max_age, Some(0));
        assert_eq!(read(&["max-age=1.5"]).unwrap().max_age, Some(0));
        assert_eq!(read(&["max-age=10000, &&&&&"]), None);
        assert_eq!(read(&["MaX-aGe=3600"]), None);
        assert_eq!(read(&[""]), None);
        assert_eq!(read(&[]), None);
    }

    #[test]
    fn the_first_field_present_in_the_route_order_decides() {
        let ours = HeaderName::from_static("tower-hybrid-cache-control");
        let mut headers = HeaderMap::new();
        headers.insert(cdn(), HeaderValue::from_static("max-age=10"));
        let both = [ours.clone(), cdn()];
        let cc = targeted_cache_control(&headers, &both).unwrap();
        assert_eq!(cc.max_age, Some(10));
        headers.insert(ours.clone(), HeaderValue::from_static("max-age=20"));
        assert_eq!(
            targeted_cache_control(&headers, &both).unwrap().max_age,
            Some(20)
        );
        // An unparseable first choice falls through to the next.
        headers.insert(ours, HeaderValue::from_static("max-age=20, ;;"));
        assert_eq!(
            targeted_cache_control(&headers, &both).unwrap().max_age,
            Some(10)
        );
        assert_eq!(targeted_cache_control(&headers, &[]), None);
    }
}
