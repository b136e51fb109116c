//! Byte ranges answered from a stored complete response (RFC 9110 §14): one range
//! of `bytes` as a 206, an unsatisfiable one as a 416, and everything else (several
//! ranges, another unit, junk, an `If-Range` that does not match) as the whole
//! response, which a server may always send instead.

use std::time::SystemTime;

use http::header::{ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use http::HeaderMap;

use super::http_date::parse_http_date;

/// What part of a stored body of `len` bytes a request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The whole response (no `Range`, or one the cache answers whole).
    Whole,
    /// Bytes `first..=last` (a 206).
    Bytes { first: u64, last: u64 },
    /// No byte of the range exists (a 416).
    Unsatisfiable,
}

/// The part of a stored 200 with `stored` headers and a body of `len` bytes that the
/// request's `Range` and `If-Range` select.
pub(crate) fn requested_part(request: &HeaderMap, stored: &HeaderMap, len: u64) -> Part {
    let mut lines = request.get_all(RANGE).iter();
    let (Some(range), None) = (lines.next(), lines.next()) else {
        return Part::Whole;
    };
    if !if_range_holds(request, stored) {
        return Part::Whole;
    }
    let Some(spec) = single_byte_range(range.as_bytes()) else {
        return Part::Whole;
    };
    match spec {
        Spec::From { first, last } => {
            if first >= len {
                return Part::Unsatisfiable;
            }
            let last = last.map_or(len - 1, |last| last.min(len - 1));
            Part::Bytes { first, last }
        }
        Spec::Suffix(0) => Part::Unsatisfiable,
        Spec::Suffix(_) if len == 0 => Part::Unsatisfiable,
        Spec::Suffix(n) => Part::Bytes {
            first: len - n.min(len),
            last: len - 1,
        },
    }
}

/// One range-spec of a `bytes` range.
#[derive(Debug, PartialEq, Eq)]
enum Spec {
    /// `first-last` or `first-`.
    From { first: u64, last: Option<u64> },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// The one range of `bytes=…`; `None` for another unit, several ranges, or junk.
fn single_byte_range(value: &[u8]) -> Option<Spec> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (unit, set) = text.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return None;
    };
    let (first, last) = spec.split_once('-')?;
    let number = |digits: &str| -> Option<u64> {
        let digits = digits.trim();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Past u64: beyond any stored body, so as large as it gets.
        Some(digits.parse().unwrap_or(u64::MAX))
    };
    if first.trim().is_empty() {
        return number(last).map(Spec::Suffix);
    }
    let first = number(first)?;
    let last = if last.trim().is_empty() {
        None
    } else {
        Some(number(last)?)
    };
    if last.is_some_and(|last| last < first) {
        return None;
    }
    Some(Spec::From { first, last })
}

/// `If-Range` (RFC 9110 §13.1.5): absent, or a strong entity tag equal to the
/// stored one, or a date equal to the stored `Last-Modified`.
fn if_range_holds(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(condition) = request.get(IF_RANGE).and_then(|v| v.to_str().ok()) else {
        return request.get(IF_RANGE).is_none();
    };
    let condition = condition.trim();
    if condition.starts_with('"') || condition.starts_with("W/") {
        // The strong comparison: neither tag weak, the same characters.
        let stored = stored.get(ETAG).and_then(|v| v.to_str().ok());
        return !condition.starts_with("W/")
            && stored.is_some_and(|tag| !tag.starts_with("W/") && tag.trim() == condition);
    }
    let modified: Option<SystemTime> = stored
        .get(LAST_MODIFIED)
        .and_then(|v| parse_http_date(v.as_bytes()));
    matches!(
        (parse_http_date(condition.as_bytes()), modified),
        (Some(a), Some(b)) if a == b
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn part(range: &'static str, len: u64) -> Part {
        requested_part(&request(&[("range", range)]), &HeaderMap::new(), len)
    }

    #[test]
    fn one_byte_range_is_a_part_of_the_body() {
        assert_eq!(part("bytes=0-1", 11), Part::Bytes { first: 0, last: 1 });
        assert_eq!(part("bytes=1-", 11), Part::Bytes { first: 1, last: 10 });
        assert_eq!(
            part("bytes=-1", 11),
            Part::Bytes {
                first: 10,
                last: 10
            }
        );
        assert_eq!(part("bytes=-100", 11), Part::Bytes { first: 0, last: 10 });
        assert_eq!(part("bytes=5-100", 11), Part::Bytes { first: 5, last: 10 });
        assert_eq!(part("Bytes = 2-3 ", 11), Part::Bytes { first: 2, last: 3 });
        assert_eq!(
            part("bytes=0-99999999999999999999999", 11),
            Part::Bytes { first: 0, last: 10 }
        );
    }

    #[test]
    fn a_range_past_the_end_is_unsatisfiable() {
        assert_eq!(part("bytes=11-", 11), Part::Unsatisfiable);
        assert_eq!(
            part("bytes=99999999999999999999999-", 11),
            Part::Unsatisfiable
        );
        assert_eq!(part("bytes=-0", 11), Part::Unsatisfiable);
        assert_eq!(part("bytes=0-0", 0), Part::Unsatisfiable);
        assert_eq!(part("bytes=-5", 0), Part::Unsatisfiable);
    }

    #[test]
    fn anything_else_is_answered_whole() {
        for junk in [
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=3-1",
            "bytes=a-b",
            "bytes=-",
            "bytes=1",
            "bytes=+1-2",
            "0-1",
            "",
        ] {
            assert_eq!(part(junk, 11), Part::Whole, "{junk:?}");
        }
        let two = request(&[("range", "bytes=0-1"), ("range", "bytes=2-3")]);
        assert_eq!(requested_part(&two, &HeaderMap::new(), 11), Part::Whole);
        assert_eq!(
            requested_part(&HeaderMap::new(), &HeaderMap::new(), 11),
            Part::Whole
        );
    }

    #[test]
    fn if_range_needs_the_same_strong_tag_or_date() {
        let stored = request(&[
            ("etag", "\"v1\""),
            ("last-modified", "Fri, 01 May 2026 00:00:00 GMT"),
        ]);
        let ranged = |if_range: &'static str| {
            requested_part(
                &request(&[("range", "bytes=0-1"), ("if-range", if_range)]),
                &stored,
                11,
            )
        };
        let partial = Part::Bytes { first: 0, last: 1 };
        assert_eq!(ranged("\"v1\""), partial);
        assert_eq!(ranged("Fri, 01 May 2026 00:00:00 GMT"), partial);
        assert_eq!(ranged("\"v2\""), Part::Whole);
        assert_eq!(ranged("W/\"v1\""), Part::Whole);
        assert_eq!(ranged("Sat, 02 May 2026 00:00:00 GMT"), Part::Whole);
        assert_eq!(ranged("junk"), Part::Whole);
        let weak = request(&[("etag", "W/\"v1\"")]);
        let request = request(&[("range", "bytes=0-1"), ("if-range", "\"v1\"")]);
        assert_eq!(requested_part(&request, &weak, 11), Part::Whole);
    }
}
