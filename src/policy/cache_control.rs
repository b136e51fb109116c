//! A tolerant `Cache-Control` parser (RFC 9111 §5.2).
//!
//! Every `Cache-Control` field line of a message is read as one list. Directive names
//! are case-insensitive, whitespace around tokens is ignored, quoted strings may
//! contain commas, and unknown directives are skipped. Where a value is malformed the
//! parser takes the reading that caches less: a bad or negative delta-seconds counts
//! as `0` (stale at once), two different values of one directive count as `0`, a value
//! too large to represent is capped at 2^31 seconds (RFC 9111 §1.2.2), and a header
//! value that is not visible ASCII marks the whole field as malformed so the response
//! is not stored.

use std::borrow::Cow;

use http::header::CACHE_CONTROL;
use http::HeaderMap;

/// The largest delta-seconds a cache must be able to represent (RFC 9111 §1.2.2).
pub(crate) const DELTA_SECONDS_CAP: u64 = 1 << 31;

/// The directives of one message's `Cache-Control` field lines that a cache acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CacheControl {
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
    pub(crate) min_fresh: Option<u64>,
    /// `Some(None)` for a bare `max-stale` (any staleness).
    pub(crate) max_stale: Option<Option<u64>>,
    pub(crate) stale_while_revalidate: Option<u64>,
    pub(crate) stale_if_error: Option<u64>,
    pub(crate) no_store: bool,
    /// Bare or field-qualified (`no-cache="Set-Cookie"`); both are treated alike.
    pub(crate) no_cache: bool,
    /// Bare or field-qualified (`private="X"`); both are treated alike.
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) proxy_revalidate: bool,
    pub(crate) only_if_cached: bool,
    pub(crate) immutable: bool,
    /// `must-understand`: `no-store` yields to a status whose rules the cache knows.
    pub(crate) must_understand: bool,
    /// A field line held bytes that are not visible ASCII or the field could not be
    /// split into directives.
    pub(crate) malformed: bool,
}

impl CacheControl {
    /// Parses every `Cache-Control` field line in `headers`.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Self {
        let mut cc = CacheControl::default();
        let mut seen = Seen::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let bytes = value.as_bytes();
            if !bytes.iter().all(|b| matches!(b, b'\t' | b' '..=b'~')) {
                cc.malformed = true;
            }
            cc.parse_line(bytes, &mut seen);
        }
        cc
    }

    /// Parses a single field value, as if it were the only line.
    pub(crate) fn parse(value: &str) -> Self {
        let mut cc = CacheControl::default();
        cc.parse_line(value.as_bytes(), &mut Seen::default());
        cc
    }

    fn parse_line(&mut self, line: &[u8], seen: &mut Seen) {
        let mut rest = line;
        loop {
            rest = trim_start(rest);
            if rest.is_empty() {
                return;
            }
            if rest[0] == b',' {
                rest = &rest[1..];
                continue;
            }
            let name_end = rest
                .iter()
                .position(|&b| matches!(b, b',' | b'=' | b' ' | b'\t'))
                .unwrap_or(rest.len());
            let name = &rest[..name_end];
            rest = trim_start(&rest[name_end..]);
            // Borrowed from the line unless quoted (a quoted string may hold escapes):
            // most arguments are numbers, and a copy each cost an allocation.
            let mut arg: Option<Cow<'_, [u8]>> = None;
            if let Some((&b'=', after)) = rest.split_first() {
                let after = trim_start(after);
                let (value, remaining) = if after.first() == Some(&b'"') {
                    match read_quoted(&after[1..]) {
                        Some((value, remaining)) => (Cow::Owned(value), remaining),
                        None => {
                            // An unterminated quote: nothing after it can be trusted.
                            self.malformed = true;
                            (Cow::Borrowed(&after[1..]), &after[after.len()..])
                        }
                    }
                } else {
                    let end = after.iter().position(|&b| b == b',').unwrap_or(after.len());
                    (Cow::Borrowed(trim_end(&after[..end])), &after[end..])
                };
                arg = Some(value);
                rest = remaining;
            }
            // Skip anything up to the next comma (junk after a value).
            let next = rest.iter().position(|&b| b == b',').unwrap_or(rest.len());
            if !trim_end(&rest[..next]).is_empty() {
                self.malformed = true;
            }
            rest = &rest[next..];
            self.apply(name, arg.as_deref(), seen);
        }
    }

    fn apply(&mut self, name: &[u8], arg: Option<&[u8]>, seen: &mut Seen) {
        let is = |d: &str| name.eq_ignore_ascii_case(d.as_bytes());
        if is("max-age") {
            merge_delta(&mut self.max_age, &mut seen.max_age, arg);
        } else if is("s-maxage") {
            merge_delta(&mut self.s_maxage, &mut seen.s_maxage, arg);
        } else if is("min-fresh") {
            merge_delta(&mut self.min_fresh, &mut seen.min_fresh, arg);
        } else if is("stale-while-revalidate") {
            merge_delta(&mut self.stale_while_revalidate, &mut seen.swr, arg);
        } else if is("stale-if-error") {
            merge_delta(&mut self.stale_if_error, &mut seen.sie, arg);
        } else if is("max-stale") {
            self.max_stale = match (self.max_stale, arg) {
                // The bare form is the more permissive; a value narrows it. Keep the
                // narrowest seen.
                (None, None) => Some(None),
                (None, Some(v)) => Some(Some(parse_delta(v))),
                (Some(None), Some(v)) => Some(Some(parse_delta(v))),
                (Some(Some(old)), Some(v)) => Some(Some(old.min(parse_delta(v)))),
                (keep, None) => keep,
            };
        } else if is("no-store") {
            self.no_store = true;
        } else if is("no-cache") {
            self.no_cache = true;
        } else if is("private") {
            self.private = true;
        } else if is("public") {
            self.public = true;
        } else if is("must-revalidate") {
            self.must_revalidate = true;
        } else if is("proxy-revalidate") {
            self.proxy_revalidate = true;
        } else if is("only-if-cached") {
            self.only_if_cached = true;
        } else if is("immutable") {
            self.immutable = true;
        } else if is("must-understand") {
            self.must_understand = true;
        }
    }
}

#[derive(Default)]
struct Seen {
    max_age: bool,
    s_maxage: bool,
    min_fresh: bool,
    swr: bool,
    sie: bool,
}

/// Merges one occurrence of a delta-seconds directive: a second, different value
/// makes the directive `0` (RFC 9111 §4.2.1: "considered stale").
fn merge_delta(slot: &mut Option<u64>, seen: &mut bool, arg: Option<&[u8]>) {
    let value = arg.map(parse_delta).unwrap_or(0);
    if *seen && *slot != Some(value) {
        *slot = Some(0);
    } else {
        *slot = Some(value);
    }
    *seen = true;
}

/// Reads delta-seconds: digits only; anything else is `0`; too large is 2^31.
pub(crate) fn parse_delta(arg: &[u8]) -> u64 {
    if arg.is_empty() || !arg.iter().all(u8::is_ascii_digit) {
        return 0;
    }
    let mut value: u64 = 0;
    for &digit in arg {
        value = value * 10 + u64::from(digit - b'0');
        if value >= DELTA_SECONDS_CAP {
            return DELTA_SECONDS_CAP;
        }
    }
    value
}

/// Reads a quoted string whose opening quote was consumed; returns the unescaped
/// content and the rest after the closing quote.
fn read_quoted(input: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'\\' if i + 1 < input.len() => {
                out.push(input[i + 1]);
                i += 2;
            }
            b'"' => return Some((out, &input[i + 1..])),
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    None
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let Some((&b, rest)) = s.split_first() {
        if b == b' ' || b == b'\t' {
            s = rest;
        } else {
            break;
        }
    }
    s
}

fn trim_end(mut s: &[u8]) -> &[u8] {
    while let Some((&b, rest)) = s.split_last() {
        if b == b' ' || b == b'\t' {
            s = rest;
        } else {
            break;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn reads_common_directives_case_insensitively() {
        let cc = CacheControl::parse("Public, MAX-AGE=60 ,s-maxage=120,no-transform");
        assert!(cc.public);
        assert_eq!(cc.max_age, Some(60));
        assert_eq!(cc.s_maxage, Some(120));
        assert!(!cc.malformed);
    }

    #[test]
    fn every_known_directive_is_read_in_any_case_and_only_whole() {
        let cc = CacheControl::parse(
            "Stale-While-Revalidate=5, STALE-IF-ERROR=6, Min-Fresh=7, no-STORE, No-Cache, \
             PRIVATE, must-REVALIDATE, Proxy-Revalidate, Only-If-Cached, IMMUTABLE, \
             Must-Understand, Max-Stale",
        );
        assert_eq!(cc.stale_while_revalidate, Some(5));
        assert_eq!(cc.stale_if_error, Some(6));
        assert_eq!(cc.min_fresh, Some(7));
        assert_eq!(cc.max_stale, Some(None));
        assert!(cc.no_store && cc.no_cache && cc.private && cc.must_revalidate);
        assert!(cc.proxy_revalidate && cc.only_if_cached && cc.immutable && cc.must_understand);
        // A prefix, a longer name and a name past the longest known one are unknown.
        let cc = CacheControl::parse(
            "max-ag=1, max-ages=2, stale-while-revalidates=3, x-stale-while-revalidate-x=4",
        );
        assert_eq!(cc, CacheControl::default());
    }

    #[test]
    fn quoted_values_may_hold_commas() {
        let cc = CacheControl::parse(r#"private="Set-Cookie, X-Foo", max-age=5"#);
        assert!(cc.private);
        assert_eq!(cc.max_age, Some(5));
        let cc = CacheControl::parse(r#"max-age="30""#);
        assert_eq!(cc.max_age, Some(30));
    }

    #[test]
    fn bad_numbers_read_as_stale() {
        assert_eq!(CacheControl::parse("max-age=-1").max_age, Some(0));
        assert_eq!(CacheControl::parse("max-age=abc").max_age, Some(0));
        assert_eq!(CacheControl::parse("max-age").max_age, Some(0));
        assert_eq!(CacheControl::parse("max-age=1.5").max_age, Some(0));
        assert_eq!(CacheControl::parse("max-age=").max_age, Some(0));
    }

    #[test]
    fn absurd_numbers_are_capped() {
        let cc = CacheControl::parse("max-age=99999999999999999999999999999");
        assert_eq!(cc.max_age, Some(DELTA_SECONDS_CAP));
    }

    #[test]
    fn conflicting_duplicates_read_as_stale_and_equal_ones_stand() {
        assert_eq!(
            CacheControl::parse("max-age=60, max-age=120").max_age,
            Some(0)
        );
        assert_eq!(
            CacheControl::parse("max-age=60, max-age=60").max_age,
            Some(60)
        );
    }

    #[test]
    fn several_field_lines_form_one_list() {
        let mut headers = HeaderMap::new();
        headers.append(CACHE_CONTROL, HeaderValue::from_static("max-age=10"));
        headers.append(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let cc = CacheControl::from_headers(&headers);
        assert_eq!(cc.max_age, Some(10));
        assert!(cc.no_store);
    }

    #[test]
    fn non_ascii_bytes_mark_the_field_malformed() {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_bytes(b"max-age=60, \xffprivate").unwrap();
        headers.insert(CACHE_CONTROL, value);
        let cc = CacheControl::from_headers(&headers);
        assert!(cc.malformed);
    }

    #[test]
    fn junk_and_empty_elements_are_tolerated() {
        let cc = CacheControl::parse(",, ,max-age=5,,unknown=\"x,y\", foo bar, no-store");
        assert_eq!(cc.max_age, Some(5));
        assert!(cc.no_store);
        assert!(cc.malformed, "`foo bar` is not a directive");
    }

    #[test]
    fn unterminated_quote_is_malformed() {
        let cc = CacheControl::parse("max-age=5, private=\"x");
        assert!(cc.malformed);
        assert!(cc.private);
    }

    #[test]
    fn max_stale_bare_and_valued() {
        assert_eq!(CacheControl::parse("max-stale").max_stale, Some(None));
        assert_eq!(CacheControl::parse("max-stale=7").max_stale, Some(Some(7)));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut cc = CacheControl::default();
            cc.parse_line(&bytes, &mut Seen::default());
        }
    }
}
