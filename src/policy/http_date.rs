//! HTTP dates as caches read them in practice (RFC 9110 §5.6.7): the preferred form
//! through `httpdate`, and then the same three forms (IMF-fixdate, the obsolete
//! RFC 850 and asctime) exactly as laid out, but in any letter case and with a
//! weekday that does not match the date (it is redundant, and origins get it
//! wrong). Any other layout (no comma, extra spaces, a one-digit hour, another zone)
//! is no date.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The time an HTTP date field value names.
pub(crate) fn parse_http_date(bytes: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    // Longer than any date form: not one (and no work on junk).
    if text.len() > 64 || !text.is_ascii() {
        return None;
    }
    httpdate::parse_http_date(text)
        .ok()
        .or_else(|| lenient(&text.to_ascii_lowercase()))
}

const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// A lower-cased date in one of the three layouts, the weekday unchecked.
fn lenient(text: &str) -> Option<SystemTime> {
    let at = |from: usize, to: usize| text.get(from..to);
    let is = |from: usize, what: &str| at(from, from + what.len()) == Some(what);
    let short_weekday =
        |w: Option<&str>| w.is_some_and(|w| WEEKDAYS.iter().any(|d| d.get(..3) == Some(w)));
    let (day, month, year, clock) = if text.len() == 29 && is(3, ", ") {
        // `sun, 06 nov 1994 08:49:37 gmt`
        let laid_out = is(7, " ") && is(11, " ") && is(16, " ") && is(25, " gmt");
        if !(short_weekday(at(0, 3)) && laid_out) {
            return None;
        }
        (
            digits(at(5, 7)?)?,
            month_number(at(8, 11)?)?,
            digits(at(12, 16)?)?,
            at(17, 25)?,
        )
    } else if text.len() == 24 && !text.contains(',') {
        // `sun nov  6 08:49:37 1994`
        let laid_out = is(3, " ") && is(7, " ") && is(10, " ") && is(19, " ");
        if !(short_weekday(at(0, 3)) && laid_out) {
            return None;
        }
        let day = at(8, 10)?;
        let day = day.strip_prefix(' ').unwrap_or(day);
        (
            digits(day)?,
            month_number(at(4, 7)?)?,
            digits(at(20, 24)?)?,
            at(11, 19)?,
        )
    } else {
        // `sunday, 06-nov-94 08:49:37 gmt`
        let (weekday, rest) = text.split_once(", ")?;
        if !WEEKDAYS.contains(&weekday) || rest.len() != 22 {
            return None;
        }
        let rest_at = |from: usize, to: usize| rest.get(from..to);
        let rest_is = |from: usize, what: &str| rest_at(from, from + what.len()) == Some(what);
        if !(rest_is(2, "-") && rest_is(6, "-") && rest_is(9, " ") && rest_is(18, " gmt")) {
            return None;
        }
        // A two-digit year more than 50 years ahead is in the past (§5.6.7): read
        // as within 1970-2069.
        let yy = digits(rest_at(7, 9)?)?;
        let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
        (
            digits(rest_at(0, 2)?)?,
            month_number(rest_at(3, 6)?)?,
            year,
            rest_at(10, 18)?,
        )
    };
    // `08:49:37`
    if clock.len() != 8 || clock.get(2..3) != Some(":") || clock.get(5..6) != Some(":") {
        return None;
    }
    let (hour, minute, second) = (
        digits(clock.get(0..2)?)?,
        digits(clock.get(3..5)?)?,
        digits(clock.get(6..8)?)?,
    );
    if hour > 23 || minute > 59 || second > 60 || !(1970..=9999).contains(&year) {
        return None;
    }
    if day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_since_epoch(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second.min(59);
    UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// Digits only (at most four, as every field of a date).
fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 4 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn month_number(name: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let at = MONTHS.iter().position(|m| *m == name)?;
    u64::try_from(at).ok().map(|at| at + 1)
}

fn is_leap(year: u64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the date (`year` ≥ 1970, `month` 1-12, `day` ≥ 1), in
/// closed form: the year counted from March, so that February's length comes last.
fn days_since_epoch(year: u64, month: u64, day: u64) -> u64 {
    let (year, month) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = year / 400;
    let year_of_era = year % 400;
    let day_of_year = (153 * month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719 468: days from 0000-03-01 to 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Option<SystemTime> {
        parse_http_date(text.as_bytes())
    }

    #[test]
    fn the_three_forms_name_the_same_time() {
        let expected = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        for form in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "SUN, 06 NOV 1994 08:49:37 gmt",
            "Thu, 06 Nov 1994 08:49:37 GMT",
            "Mon Nov  6 08:49:37 1994",
            "  Sun, 06 Nov 1994 08:49:37 GMT  ",
        ] {
            assert_eq!(at(form), Some(expected), "{form:?}");
        }
        assert_eq!(
            at("Thu Aug  8 02:01:18 2050"),
            httpdate::parse_http_date("Mon, 08 Aug 2050 02:01:18 GMT").ok()
        );
        assert_eq!(
            at("Friday, 01-Jan-27 00:00:00 GMT"),
            httpdate::parse_http_date("Fri, 01 Jan 2027 00:00:00 GMT").ok()
        );
    }

    #[test]
    fn junk_is_no_date() {
        for junk in [
            "0",
            "-1",
            "",
            "tomorrow",
            "Sun, 31 Feb 2026 00:00:00 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Nov 19945 08:49:37 GMT",
            "1, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06-Nov-94-1 08:49:37 GMT",
            "Sun, 06 Nov 1969 08:49:37 GMT",
            // The layouts the public cache test suite calls invalid.
            "Thu, 18 Aug 2050 02:01:18 UTC",
            "Thu, 18 Aug 2050 02:01:18 AEST",
            "Thu, 18 Aug 50 02:01:18 GMT",
            "Thu 18 Aug 2050 02:01:18 GMT",
            "Thu, 18  Aug  2050 02:01:18 GMT",
            "Thu, 18-Aug-2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02.01.18 GMT",
            "Thu, 18 Aug 2050 2:01:18 GMT",
            "Thursday, 18-Aug-2050 02:01:18 GMT",
            "Thu, 18-Aug-50 02:01:18 GMT",
            "Thu Aug 8 02:01:18 2050",
            "Thu, 18 Aug 2050 02:01:18 GMT junk",
        ] {
            assert_eq!(at(junk), None, "{junk:?}");
        }
        assert_eq!(at(&"x".repeat(10_000)), None);
        assert_eq!(parse_http_date(&[0xff, 0xfe]), None);
    }

    #[test]
    fn day_counts_match_the_strict_formatter_across_years() {
        let names = ["Jan", "Feb", "Mar", "Dec"];
        for year in [1970, 1999, 2000, 2024, 2100, 2400] {
            for name in names {
                let time = at(&format!("Mon {name} 28 12:00:00 {year}")).unwrap();
                let formatted = httpdate::fmt_http_date(time);
                assert!(
                    formatted.ends_with(&format!("28 {name} {year} 12:00:00 GMT")),
                    "{formatted}"
                );
            }
        }
        let leap = at("Thu Feb 29 00:00:00 2024").unwrap();
        assert!(httpdate::fmt_http_date(leap).contains("29 Feb 2024"));
        assert_eq!(at("Wed Feb 29 00:00:00 2023"), None);
    }
}
