//! Canonical forms of a path and a query, so equivalent URLs share a key. Both are
//! written straight into the key's input buffer: the common URL costs no allocation.

use std::borrow::Cow;

use smallvec::SmallVec;

use crate::policy::settings::QueryFilter;

/// Writes the path with percent-encoding normalised (RFC 3986 §6.2.2): escapes of
/// unreserved characters decoded, other escapes upper-cased. An invalid escape
/// (`%zz`, a lone `%`) is kept as it is, so it stays distinct from its valid
/// spellings; an escape of a hex digit right after one stays escaped (`%%35` is
/// kept, not made `%5`), so that no canonical form holds an escape that was not in
/// the URL, and canonicalising twice changes nothing.
pub(crate) fn write_canonical_path(path: &str, out: &mut Vec<u8>) {
    normalise_escapes_into(path.as_bytes(), out);
}

/// A query parameter: its normalised name and raw value.
type Pair<'a> = (Cow<'a, [u8]>, Option<&'a [u8]>);

/// Writes the query with empty pairs dropped, the pairs the route ignores removed,
/// escapes normalised, and pairs sorted by name. The sort is stable: repeated names
/// keep their order, since `a=1&a=2` and `a=2&a=1` may mean different lists to the
/// origin. `+` is kept apart from `%20`: only form decoding equates them.
pub(crate) fn write_canonical_query(query: Option<&str>, filter: &QueryFilter, out: &mut Vec<u8>) {
    let Some(query) = query else { return };
    // A query of one plain pair is copied as it is, without the pairs' list and its
    // sort (about 170 instructions a key).
    if is_canonical(query.as_bytes(), filter) {
        out.extend_from_slice(query.as_bytes());
        return;
    }
    write_sorted_query(query, filter, out);
}

/// Whether `write_sorted_query` would surely write the query unchanged: every
/// parameter kept, and one pair without escapes.
fn is_canonical(query: &[u8], filter: &QueryFilter) -> bool {
    // One plain pair only: telling that several are in order cost an unsorted
    // query (the usual several) more than sorting saved a sorted one.
    matches!(filter, QueryFilter::All)
        && !query.is_empty()
        && query.iter().all(|&b| b != b'&' && b != b'%')
}

/// The query's pairs filtered, normalised and sorted by name, written out.
fn write_sorted_query(query: &str, filter: &QueryFilter, out: &mut Vec<u8>) {
    // One look for `%` over the whole query: without one, no name or value needs
    // decoding or normalising, and each pair is taken as it is (three searches a
    // pair fewer).
    let escaped = query.as_bytes().contains(&b'%');
    // On the stack for the usual few pairs: every request's key is made here.
    let mut pairs: SmallVec<[Pair<'_>; 8]> = SmallVec::new();
    for pair in query.as_bytes().split(|&b| b == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => {
                let (name, rest) = pair.split_at(at);
                (name, rest.get(1..))
            }
            None => (pair, None),
        };
        let kept = match filter {
            QueryFilter::All => true,
            _ if escaped => filter.keeps(&percent_decode(name)),
            _ => filter.keeps(name),
        };
        if !kept {
            continue;
        }
        let name = if escaped {
            normalised(name)
        } else {
            Cow::Borrowed(name)
        };
        pairs.push((name, value));
    }
    if pairs.len() > 1 {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
    }
    out.reserve(query.len());
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        out.extend_from_slice(name);
        if let Some(value) = value {
            out.push(b'=');
            if escaped {
                normalise_escapes_into(value, out);
            } else {
                out.extend_from_slice(value);
            }
        }
    }
}

fn normalised(input: &[u8]) -> Cow<'_, [u8]> {
    if !input.contains(&b'%') {
        return Cow::Borrowed(input);
    }
    let mut out = Vec::with_capacity(input.len());
    normalise_escapes_into(input, &mut out);
    Cow::Owned(out)
}

fn normalise_escapes_into(input: &[u8], out: &mut Vec<u8>) {
    // Unreserved characters are decoded; every other escape stays, upper-cased. A hex
    // digit stays escaped where, decoded, it would turn an invalid escape kept before
    // it (`%`, `%5`) into a valid one.
    transcode(input, out, |byte, before| {
        let unreserved = byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~');
        !unreserved || (byte.is_ascii_hexdigit() && completes_an_escape(before))
    });
}

/// Whether `out` ends as an escape in the making: `%`, or `%` and one hex digit.
fn completes_an_escape(out: &[u8]) -> bool {
    match out {
        [.., b'%'] => true,
        [.., b'%', digit] => digit.is_ascii_hexdigit(),
        _ => false,
    }
}

/// Copies `input`, decoding each valid `%XX` escape unless `stays_escaped` (given the
/// byte and what was written so far) says the byte keeps its (upper-cased) escape.
/// Invalid escapes are copied as they are.
fn transcode(input: &[u8], out: &mut Vec<u8>, stays_escaped: impl Fn(u8, &[u8]) -> bool) {
    if !input.contains(&b'%') {
        out.extend_from_slice(input);
        return;
    }
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            if let (Some(hi), Some(lo)) = (hex(input.get(i + 1)), hex(input.get(i + 2))) {
                let byte = (hi << 4) | lo;
                if stays_escaped(byte, out) {
                    out.extend_from_slice(&[
                        b'%',
                        HEX_UPPER[usize::from(hi)],
                        HEX_UPPER[usize::from(lo)],
                    ]);
                } else {
                    out.push(byte);
                }
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex(byte: Option<&u8>) -> Option<u8> {
    match byte? {
        b @ b'0'..=b'9' => Some(b - b'0'),
        b @ b'a'..=b'f' => Some(b - b'a' + 10),
        b @ b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Fully decodes escapes (for matching parameter names); invalid escapes stay literal.
fn percent_decode(input: &[u8]) -> Cow<'_, [u8]> {
    if !input.contains(&b'%') {
        return Cow::Borrowed(input);
    }
    let mut out = Vec::with_capacity(input.len());
    transcode(input, &mut out, |_, _| false);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::settings::NamePattern;

    fn path(p: &str) -> String {
        let mut out = Vec::new();
        write_canonical_path(p, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn query(q: Option<&str>, filter: &QueryFilter) -> String {
        let mut out = Vec::new();
        write_canonical_query(q, filter, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escapes_are_normalised() {
        assert_eq!(path("/a%7Eb%2fc%41"), "/a~b%2FcA");
        assert_eq!(path("/plain"), "/plain");
        assert_eq!(path("/bad%zz%4"), "/bad%zz%4");
        // Found by fuzzing: decoding `%35` after a lone `%` made an escape (`%55`)
        // that the next canonicalisation decoded again.
        assert_eq!(path("/%%3550"), "/%%3550");
        assert_eq!(path("/%5%35x"), "/%5%35x");
        assert_eq!(path("/%%47"), "/%G", "not a hex digit: decoded");
        assert_eq!(path(&path("/%%3550")), path("/%%3550"));
        assert_eq!(path("/%"), "/%");
    }

    #[test]
    fn query_is_sorted_stably_and_filtered() {
        let all = QueryFilter::All;
        assert_eq!(query(Some("b=2&a=1&a=0&c"), &all), "a=1&a=0&b=2&c");
        assert_eq!(query(Some("b=%7e&%61=1"), &all), "a=1&b=~");
        assert_eq!(query(None, &all), "");
        // More pairs than are kept on the stack.
        assert_eq!(
            query(Some("k=1&j&i=1&h=1&g=1&f=1&e=1&d=1&c=1&b=1&a=1&a=0"), &all),
            "a=1&a=0&b=1&c=1&d=1&e=1&f=1&g=1&h=1&i=1&j&k=1"
        );
        let ignore = QueryFilter::Ignore(vec![NamePattern::new("utm_*")]);
        // The name is matched decoded: an escaped `utm_` is still ignored.
        assert_eq!(query(Some("utm%5Fsource=x&q=1"), &ignore), "q=1");
    }

    #[test]
    fn non_ascii_survives() {
        assert_eq!(path("/caf\u{e9}%41"), "/caf\u{e9}A");
    }

    #[test]
    fn a_plain_single_pair_is_copied_and_other_queries_are_not() {
        let all = QueryFilter::All;
        for canonical in ["q=rust", "a", "a=1=2", "a="] {
            assert!(is_canonical(canonical.as_bytes(), &all), "{canonical}");
        }
        for other in ["b=1&a=2", "a=1&b=2", "&a", "a=1&", "q=%41", "", "b&a"] {
            assert!(!is_canonical(other.as_bytes(), &all), "{other}");
        }
        let ignore = QueryFilter::Ignore(vec![NamePattern::new("utm_*")]);
        assert!(!is_canonical(b"a=1&utm_source=x", &ignore));
        assert_eq!(query(Some("a=1&utm_source=x"), &ignore), "a=1");
    }

    /// The canonical query written the plain way: every pair's name decoded for the
    /// filter and normalised, every value normalised, then sorted.
    fn reference_query(query: &str, filter: &QueryFilter) -> Vec<u8> {
        let mut pairs: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for pair in query.as_bytes().split(|&b| b == b'&') {
            if pair.is_empty() {
                continue;
            }
            let mut parts = pair.splitn(2, |&b| b == b'=');
            let name = parts.next().unwrap_or_default();
            if !filter.keeps(&percent_decode(name)) {
                continue;
            }
            let value = parts.next().map(|value| {
                let mut out = Vec::new();
                normalise_escapes_into(value, &mut out);
                out
            });
            pairs.push((normalised(name).into_owned(), value));
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (i, (name, value)) in pairs.iter().enumerate() {
            if i > 0 {
                out.push(b'&');
            }
            out.extend_from_slice(name);
            if let Some(value) = value {
                out.push(b'=');
                out.extend_from_slice(value);
            }
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn the_query_is_written_as_the_plain_way_writes_it(s in "[abu_=&%5F4]{0,24}") {
            let ignore = QueryFilter::Ignore(vec![NamePattern::new("u_*")]);
            for filter in [QueryFilter::All, ignore] {
                proptest::prop_assert_eq!(
                    query(Some(&s), &filter).into_bytes(),
                    reference_query(&s, &filter)
                );
            }
        }

        #[test]
        fn the_copied_form_is_the_sorted_form(s in "[ab=&%4]{0,16}") {
            let mut sorted = Vec::new();
            write_sorted_query(&s, &QueryFilter::All, &mut sorted);
            proptest::prop_assert_eq!(query(Some(&s), &QueryFilter::All).into_bytes(), sorted);
        }

        #[test]
        fn never_panics_and_is_idempotent(s in "\\PC{0,64}") {
            let once = path(&s);
            proptest::prop_assert_eq!(path(&once), once.clone());
            let q = query(Some(&s), &QueryFilter::All);
            proptest::prop_assert_eq!(query(Some(&q), &QueryFilter::All), q.clone());
        }
    }
}
