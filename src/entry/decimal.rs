//! Header values of decimal numbers (`Age`, `Content-Length`): a number below 10 000
//! is a slice of one static string (39 KB), so it costs no allocation to make, and
//! cloning it (as every hit clones a stored response's fields) costs no reference
//! count, which every worker thread would otherwise share on a hot entry.

use bytes::Bytes;
use http::HeaderValue;

/// Numbers below this are served from [`DIGITS`].
const STATIC_BELOW: u64 = 10_000;

/// How long [`DIGITS`] is: ten numbers of one digit, 90 of two, 900 of three, 9 000
/// of four.
const DIGITS_LEN: usize = 10 + 90 * 2 + 900 * 3 + 9_000 * 4;

/// Every number from 0 to 9 999 written out, one after another.
static DIGITS: [u8; DIGITS_LEN] = digits();

const fn digits() -> [u8; DIGITS_LEN] {
    let mut out = [0u8; DIGITS_LEN];
    let mut n = 0;
    let mut at = 0;
    while n < STATIC_BELOW as usize {
        if n >= 1_000 {
            out[at] = b'0' + (n / 1_000) as u8;
            at += 1;
        }
        if n >= 100 {
            out[at] = b'0' + (n / 100 % 10) as u8;
            at += 1;
        }
        if n >= 10 {
            out[at] = b'0' + (n / 10 % 10) as u8;
            at += 1;
        }
        out[at] = b'0' + (n % 10) as u8;
        at += 1;
        n += 1;
    }
    out
}

/// Where `n` (below [`STATIC_BELOW`]) starts in [`DIGITS`], and how long it is.
fn span(n: usize) -> (usize, usize) {
    match n {
        0..=9 => (n, 1),
        10..=99 => (10 + (n - 10) * 2, 2),
        100..=999 => (190 + (n - 100) * 3, 3),
        _ => (2_890 + (n - 1_000) * 4, 4),
    }
}

/// `n` as a header value.
pub(crate) fn decimal_value(n: u64) -> HeaderValue {
    if n < STATIC_BELOW {
        let (start, len) = span(n as usize);
        if let Some(text) = DIGITS.get(start..start + len) {
            if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from_static(text)) {
                return value;
            }
        }
    }
    // One allocation of the number's own length (`From<u64>` grows a buffer, then
    // shrinks it).
    let mut text = itoa::Buffer::new();
    let text = text.format(n);
    HeaderValue::from_maybe_shared(Bytes::copy_from_slice(text.as_bytes()))
        .unwrap_or_else(|_| HeaderValue::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_number_reads_as_itself() {
        let around = [10_000, 10_001, 65_536, u64::from(u32::MAX), u64::MAX];
        for n in (0..STATIC_BELOW).chain(around) {
            assert_eq!(decimal_value(n).to_str().unwrap(), n.to_string(), "{n}");
        }
    }

    #[test]
    fn small_numbers_are_static() {
        let digits = DIGITS.as_ptr_range();
        for n in [0, 42, 999, 1_000, 9_999] {
            let value = decimal_value(n);
            assert!(
                digits.contains(&value.as_bytes().as_ptr()),
                "{n}: a slice of DIGITS"
            );
        }
        let value = decimal_value(10_000);
        assert!(
            !digits.contains(&value.as_bytes().as_ptr()),
            "10 000 is not"
        );
    }
}
