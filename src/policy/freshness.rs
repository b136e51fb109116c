//! Freshness lifetime and age (RFC 9111 §4.2).

use std::time::{Duration, SystemTime};

use http::header::{AGE, DATE, EXPIRES, LAST_MODIFIED};
use http::HeaderMap;

use super::cache_control::{parse_delta, CacheControl, DELTA_SECONDS_CAP};
use super::http_date::parse_http_date;
use super::presence::{first_value, has_field};
use super::settings::TtlMode;

/// Longest lifetime the Last-Modified heuristic may give (Squid and Varnish use a
/// similar bound; RFC 9111 §4.2.2 only suggests 10 % of the age of the resource).
const HEURISTIC_CAP: Duration = Duration::from_secs(24 * 60 * 60);

/// Where a freshness lifetime came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LifetimeSource {
    /// `s-maxage`, `max-age` or `Expires` from the origin.
    Explicit,
    /// The route's TTL.
    Route,
    /// 10 % of the time since `Last-Modified` (RFC 9111 §4.2.2).
    Heuristic,
}

/// The freshness lifetime of a response, or `None` when it has none at all.
pub(crate) fn lifetime(
    cc: &CacheControl,
    headers: &HeaderMap,
    response_time: SystemTime,
    route_ttl: Option<Duration>,
    mode: TtlMode,
) -> Option<(Duration, LifetimeSource)> {
    if let (Some(ttl), TtlMode::Override) = (route_ttl, mode) {
        return Some((ttl, LifetimeSource::Route));
    }
    if let Some(explicit) = explicit_lifetime(cc, headers, response_time) {
        return Some((explicit, LifetimeSource::Explicit));
    }
    if let Some(ttl) = route_ttl {
        return Some((ttl, LifetimeSource::Route));
    }
    let date = header_date(headers, DATE).unwrap_or(response_time);
    let last_modified = header_date(headers, LAST_MODIFIED)?;
    let since = date.duration_since(last_modified).ok()?;
    Some(((since / 10).min(HEURISTIC_CAP), LifetimeSource::Heuristic))
}

/// `s-maxage`, then `max-age`, then `Expires` minus `Date` (RFC 9111 §4.2.1).
fn explicit_lifetime(
    cc: &CacheControl,
    headers: &HeaderMap,
    response_time: SystemTime,
) -> Option<Duration> {
    if let Some(secs) = cc.s_maxage.or(cc.max_age) {
        return Some(Duration::from_secs(secs));
    }
    if !has_field(headers, &EXPIRES) {
        return None;
    }
    let mut lines = headers.get_all(EXPIRES).iter();
    let first = lines.next()?;
    // An invalid Expires, "0" above all, means "already expired" (§5.3); so do two
    // lines (which is a list, and no date).
    let expires = match (parse_http_date(first.as_bytes()), lines.next()) {
        (Some(expires), None) => expires,
        _ => return Some(Duration::ZERO),
    };
    let date = header_date(headers, DATE).unwrap_or(response_time);
    Some(
        expires
            .duration_since(date)
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(DELTA_SECONDS_CAP)),
    )
}

/// `corrected_initial_age` of RFC 9111 §4.2.3: the age the response already had when
/// it reached us.
pub(crate) fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let date = header_date(headers, DATE).unwrap_or(response_time);
    let apparent_age = response_time.duration_since(date).unwrap_or(Duration::ZERO);
    let age_value = first_value(headers, &AGE)
        .map(|v| Duration::from_secs(age_seconds(v.as_bytes())))
        .unwrap_or(Duration::ZERO);
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    apparent_age.max(age_value.saturating_add(response_delay))
}

/// The `Age` a field line says: its first list member (a cache that joined two lines,
/// or an origin that sent a list, put the oldest first, as HTTP caches read it), 0
/// when that is not a plain number (RFC 9111 §5.1).
fn age_seconds(line: &[u8]) -> u64 {
    let first = line.split(|b| *b == b',').next().unwrap_or_default();
    parse_delta(first.trim_ascii())
}

fn header_date(headers: &HeaderMap, name: http::HeaderName) -> Option<SystemTime> {
    parse_http_date(first_value(headers, &name)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn two_expires_lines_are_already_expired() {
        let mut h = headers(&[("expires", httpdate::fmt_http_date(at(500)))]);
        let cc = CacheControl::default();
        let one = lifetime(&cc, &h, at(0), None, TtlMode::Fallback);
        assert_eq!(one.map(|(d, _)| d), Some(Duration::from_secs(500)));
        h.append(
            "expires",
            HeaderValue::from_str(&httpdate::fmt_http_date(at(600))).unwrap(),
        );
        let two = lifetime(&cc, &h, at(0), None, TtlMode::Fallback);
        assert_eq!(two, Some((Duration::ZERO, LifetimeSource::Explicit)));
    }

    #[test]
    fn an_age_list_counts_its_first_member_and_junk_counts_nothing() {
        for (line, secs) in [
            ("7200, 0", 7200),
            ("0, 7200", 0),
            (" 30 ", 30),
            ("abc", 0),
            ("-7200", 0),
            ("7200.0", 0),
            (",", 0),
            ("", 0),
            ("99999999999999999999", DELTA_SECONDS_CAP),
        ] {
            assert_eq!(age_seconds(line.as_bytes()), secs, "{line:?}");
        }
    }

    #[test]
    fn s_maxage_beats_max_age_beats_expires() {
        let h = headers(&[
            ("date", httpdate::fmt_http_date(at(0))),
            ("expires", httpdate::fmt_http_date(at(500))),
        ]);
        let cc = CacheControl::parse("max-age=60, s-maxage=90");
        let got = lifetime(&cc, &h, at(0), None, TtlMode::Fallback);
        assert_eq!(
            got,
            Some((Duration::from_secs(90), LifetimeSource::Explicit))
        );
        let cc = CacheControl::parse("max-age=60");
        let got = lifetime(&cc, &h, at(0), None, TtlMode::Fallback);
        assert_eq!(
            got,
            Some((Duration::from_secs(60), LifetimeSource::Explicit))
        );
        let cc = CacheControl::default();
        let got = lifetime(&cc, &h, at(0), None, TtlMode::Fallback);
        assert_eq!(
            got,
            Some((Duration::from_secs(500), LifetimeSource::Explicit))
        );
    }

    #[test]
    fn invalid_expires_is_already_expired() {
        let h = headers(&[("expires", "0".to_owned())]);
        let got = lifetime(&CacheControl::default(), &h, at(0), None, TtlMode::Fallback);
        assert_eq!(got, Some((Duration::ZERO, LifetimeSource::Explicit)));
    }

    #[test]
    fn route_ttl_fills_in_or_overrides() {
        let ttl = Some(Duration::from_secs(30));
        let cc = CacheControl::parse("max-age=5");
        let h = HeaderMap::new();
        assert_eq!(
            lifetime(&cc, &h, at(0), ttl, TtlMode::Fallback),
            Some((Duration::from_secs(5), LifetimeSource::Explicit))
        );
        assert_eq!(
            lifetime(&cc, &h, at(0), ttl, TtlMode::Override),
            Some((Duration::from_secs(30), LifetimeSource::Route))
        );
        assert_eq!(
            lifetime(&CacheControl::default(), &h, at(0), ttl, TtlMode::Fallback),
            Some((Duration::from_secs(30), LifetimeSource::Route))
        );
    }

    #[test]
    fn heuristic_is_a_tenth_of_last_modified_age_capped() {
        let h = headers(&[
            ("date", httpdate::fmt_http_date(at(1000))),
            ("last-modified", httpdate::fmt_http_date(at(0))),
        ]);
        let got = lifetime(
            &CacheControl::default(),
            &h,
            at(1000),
            None,
            TtlMode::Fallback,
        );
        assert_eq!(
            got,
            Some((Duration::from_secs(100), LifetimeSource::Heuristic))
        );
        let h = headers(&[("last-modified", "Thu, 01 Jan 1970 00:00:00 GMT".to_owned())]);
        let got = lifetime(&CacheControl::default(), &h, at(0), None, TtlMode::Fallback);
        assert_eq!(got, Some((HEURISTIC_CAP, LifetimeSource::Heuristic)));
        assert_eq!(
            lifetime(
                &CacheControl::default(),
                &HeaderMap::new(),
                at(0),
                None,
                TtlMode::Fallback
            ),
            None
        );
    }

    #[test]
    fn initial_age_takes_the_larger_of_apparent_and_corrected_age() {
        // Date 10 s before the response arrived, Age 3, 2 s in flight.
        let h = headers(&[
            ("date", httpdate::fmt_http_date(at(90))),
            ("age", "3".to_owned()),
        ]);
        assert_eq!(initial_age(&h, at(98), at(100)), Duration::from_secs(10));
        let h = headers(&[("age", "30".to_owned())]);
        assert_eq!(initial_age(&h, at(98), at(100)), Duration::from_secs(32));
        // A Date in the future (clock skew) gives no negative age.
        let h = headers(&[("date", httpdate::fmt_http_date(at(500)))]);
        assert_eq!(initial_age(&h, at(100), at(100)), Duration::ZERO);
        // Garbage Age is ignored.
        let h = headers(&[("age", "-5".to_owned())]);
        assert_eq!(initial_age(&h, at(100), at(100)), Duration::ZERO);
    }
}
