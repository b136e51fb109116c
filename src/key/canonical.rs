//! Canonical forms of a path and a query, so equivalent URLs share a key.

use std::borrow::Cow;

use crate::policy::settings::QueryFilter;

/// The path with percent-encoding normalised (RFC 3986 §6.2.2): escapes of unreserved
/// characters decoded, other escapes upper-cased. An invalid escape (`%zz`, a lone
/// `%`) is kept as it is, so it stays distinct from its valid spellings.
pub(crate) fn canonical_path(path: &str) -> Cow<'_, str> {
    normalise_escapes(path)
}

/// The query with empty pairs dropped, the pairs the route ignores removed, escapes
/// normalised, and pairs sorted by name. The sort is stable: repeated names keep their
/// order, since `a=1&a=2` and `a=2&a=1` may mean different lists to the origin.
pub(crate) fn canonical_query(query: Option<&str>, filter: &QueryFilter) -> String {
    let Some(query) = query else {
        return String::new();
    };
    let mut pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) => (normalise_escapes(name), Some(value)),
            None => (normalise_escapes(pair), None),
        })
        .filter(|(name, _)| filter.keeps(&percent_decode(name.as_bytes())))
        .map(|(name, value)| {
            let value = match value {
                Some(v) => Cow::Owned(format!("={}", normalise_escapes(v))),
                None => Cow::Borrowed(""),
            };
            (name, value)
        })
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::with_capacity(query.len());
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push_str(value);
    }
    out
}

fn normalise_escapes(input: &str) -> Cow<'_, str> {
    if !input.contains('%') {
        return Cow::Borrowed(input);
    }
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                let byte = hi << 4 | lo;
                if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                    out.push(char::from(byte));
                } else {
                    out.push('%');
                    out.push(char::from(HEX_UPPER[usize::from(hi)]));
                    out.push(char::from(HEX_UPPER[usize::from(lo)]));
                }
                i += 3;
                continue;
            }
        }
        // `input` is a &str and only ASCII is ever split here, so pushing the
        // byte's char keeps multi-byte sequences intact.
        let ch_len = utf8_len(bytes[i]);
        out.push_str(&input[i..i + ch_len]);
        i += ch_len;
    }
    Cow::Owned(out)
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

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Fully decodes escapes (for matching parameter names); invalid escapes stay literal.
fn percent_decode(input: &[u8]) -> Cow<'_, [u8]> {
    if !input.contains(&b'%') {
        return Cow::Borrowed(input);
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            if let (Some(hi), Some(lo)) = (hex(input.get(i + 1)), hex(input.get(i + 2))) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::settings::NamePattern;

    #[test]
    fn escapes_are_normalised() {
        assert_eq!(canonical_path("/a%7Eb%2fc%41"), "/a~b%2FcA");
        assert_eq!(canonical_path("/plain"), "/plain");
        assert_eq!(canonical_path("/bad%zz%4"), "/bad%zz%4");
        assert_eq!(canonical_path("/%"), "/%");
    }

    #[test]
    fn query_is_sorted_stably_and_filtered() {
        let all = QueryFilter::All;
        assert_eq!(
            canonical_query(Some("b=2&a=1&a=0&c"), &all),
            "a=1&a=0&b=2&c"
        );
        assert_eq!(canonical_query(None, &all), "");
        let ignore = QueryFilter::Ignore(vec![NamePattern::new("utm_*")]);
        // The name is matched decoded: an escaped `utm_` is still ignored.
        assert_eq!(canonical_query(Some("utm%5Fsource=x&q=1"), &ignore), "q=1");
    }

    #[test]
    fn non_ascii_survives() {
        assert_eq!(canonical_path("/caf\u{e9}%41"), "/caf\u{e9}A");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_is_idempotent(s in "\\PC{0,64}") {
            let once = canonical_path(&s).into_owned();
            proptest::prop_assert_eq!(canonical_path(&once).into_owned(), once.clone());
            let q = canonical_query(Some(&s), &QueryFilter::All);
            let _ = q;
        }
    }
}
