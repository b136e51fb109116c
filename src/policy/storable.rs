//! Whether a response may be stored by a shared cache (RFC 9111 §3), decided from
//! the status and headers alone, before any body byte is read.

use std::time::{Duration, SystemTime};

use http::header::{ETAG, LAST_MODIFIED, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderName, StatusCode};

use super::cache_control::CacheControl;
use super::freshness::{self, LifetimeSource};
use super::presence::has_field;
use super::settings::RouteSettings;
use super::targeted::targeted_cache_control;

/// Most `Vary` names a storable response may list. More is not stored: each name
/// costs a header lookup on every hit, and hundreds of them are a sign of a broken or
/// hostile origin.
pub(crate) const MAX_VARY_NAMES: usize = 32;

/// Most header fields a storable response may carry. More is not stored: `http`
/// refuses maps past 24 576 names, and no honest response needs a thousand fields.
pub(crate) const MAX_HEADER_FIELDS: usize = 1024;

/// What the request contributes to the decision.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RequestFacts {
    pub(crate) has_authorization: bool,
    pub(crate) no_store: bool,
    pub(crate) request_time: Option<SystemTime>,
}

/// Why a response was not stored; reported in `Cache-Status` as `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStored {
    NoStore,
    Private,
    NoCache,
    SetCookie,
    Authorization,
    VaryStar,
    VaryTooLong,
    Status,
    NoFreshness,
    AlreadyStale,
    MalformedCacheControl,
    TooLarge,
    TooManyFields,
}

impl NotStored {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::NoCache => "no-cache",
            NotStored::SetCookie => "set-cookie",
            NotStored::Authorization => "authorization",
            NotStored::VaryStar => "vary-star",
            NotStored::VaryTooLong => "vary-too-long",
            NotStored::Status => "status",
            NotStored::NoFreshness => "no-freshness",
            NotStored::AlreadyStale => "already-stale",
            NotStored::MalformedCacheControl => "malformed-cache-control",
            NotStored::TooLarge => "too-large",
            NotStored::TooManyFields => "too-many-fields",
        }
    }
}

/// How to store a response that may be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorePlan {
    pub(crate) stored_at: SystemTime,
    pub(crate) initial_age: Duration,
    pub(crate) fresh_until: SystemTime,
    /// End of the `stale-while-revalidate` window (`fresh_until` when none).
    pub(crate) swr_until: SystemTime,
    /// End of the `stale-if-error` window (`fresh_until` when none).
    pub(crate) sie_until: SystemTime,
    /// How long the entry is kept: past both windows, and, with a validator (`ETag`
    /// or `Last-Modified`), long enough to be revalidated instead of refetched.
    pub(crate) stale_until: SystemTime,
    pub(crate) vary: Vec<HeaderName>,
    /// `must-revalidate`, `proxy-revalidate` or `no-cache`: never served stale, by
    /// no window (the route's, the response's or the handler's).
    pub(crate) never_stale: bool,
}

/// A response with a validator is kept past its freshness for as long as it was
/// fresh, within these bounds, so that it can be revalidated (a 304) instead of
/// fetched again.
pub(crate) const REVALIDATION_KEEP_MIN: Duration = Duration::from_secs(60);
/// See [`REVALIDATION_KEEP_MIN`].
pub(crate) const REVALIDATION_KEEP_MAX: Duration = Duration::from_secs(3600);

/// Statuses a cache may store with a route TTL or heuristic freshness
/// (RFC 9110 §15.1 "heuristically cacheable", less 206: ranges are not cached).
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Decides whether a response to a GET may be stored, and for how long it is fresh.
pub(crate) fn store_plan(
    request: RequestFacts,
    status: StatusCode,
    headers: &HeaderMap,
    settings: &RouteSettings,
    response_time: SystemTime,
) -> Result<StorePlan, NotStored> {
    // A targeted field (RFC 9213) the route obeys replaces `Cache-Control`.
    let cc = targeted_cache_control(headers, &settings.targeted_fields)
        .unwrap_or_else(|| CacheControl::from_headers(headers));
    if cc.malformed {
        return Err(NotStored::MalformedCacheControl);
    }
    // `must-understand` (RFC 9111 §5.2.2.3): a status whose caching rules this cache
    // knows may be stored despite `no-store`; one it does not know, never.
    let understood = status.canonical_reason().is_some();
    if cc.must_understand && !understood {
        return Err(NotStored::Status);
    }
    if (cc.no_store && !cc.must_understand) || request.no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    // `no-cache` (bare or listing fields, treated alike): stored to be revalidated on
    // every use (RFC 9111 §5.2.2.4), so only with a validator to revalidate with.
    let has_validator = has_field(headers, &ETAG) || has_field(headers, &LAST_MODIFIED);
    if cc.no_cache && !has_validator {
        return Err(NotStored::NoCache);
    }
    if has_field(headers, &SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    if headers.len() > MAX_HEADER_FIELDS {
        return Err(NotStored::TooManyFields);
    }
    if request.has_authorization && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return Err(NotStored::Authorization);
    }
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Err(NotStored::Status);
    }
    let vary = vary_names(headers)?;
    let found = freshness::lifetime(&cc, headers, response_time, settings.ttl, settings.ttl_mode);
    let (lifetime, source) = match found {
        Some(found) => found,
        // Stale at once anyway: stored for a status that may be stored without one.
        None if cc.no_cache => (Duration::ZERO, LifetimeSource::Heuristic),
        None => return Err(NotStored::NoFreshness),
    };
    if source != LifetimeSource::Explicit && !heuristically_cacheable(status) {
        return Err(NotStored::Status);
    }
    let request_time = request.request_time.unwrap_or(response_time);
    let initial_age = freshness::initial_age(headers, request_time, response_time);
    let fresh_until = if cc.no_cache {
        // Never used without a successful validation.
        response_time
    } else {
        let remaining = lifetime
            .checked_sub(initial_age)
            .filter(|d| !d.is_zero())
            .ok_or(NotStored::AlreadyStale)?;
        response_time
            .checked_add(remaining)
            .ok_or(NotStored::NoFreshness)?
    };
    // must-revalidate and proxy-revalidate forbid serving stale, and no-cache any use
    // without validation; s-maxage implies proxy-revalidate for a shared cache unless
    // the response grants a window itself.
    let window = |granted: Option<u64>, route: Option<Duration>| {
        if cc.must_revalidate || cc.proxy_revalidate || cc.no_cache {
            return fresh_until;
        }
        let route = route.filter(|_| cc.s_maxage.is_none());
        let window = granted
            .map(|secs| {
                Duration::from_secs(secs.min(crate::policy::cache_control::DELTA_SECONDS_CAP))
            })
            .or(route)
            .unwrap_or(Duration::ZERO);
        fresh_until.checked_add(window).unwrap_or(fresh_until)
    };
    let swr_until = window(cc.stale_while_revalidate, settings.stale_while_revalidate);
    let sie_until = window(cc.stale_if_error, settings.stale_if_error);
    let keep_until = if has_validator {
        let keep = lifetime.clamp(REVALIDATION_KEEP_MIN, REVALIDATION_KEEP_MAX);
        fresh_until.checked_add(keep).unwrap_or(fresh_until)
    } else {
        fresh_until
    };
    Ok(StorePlan {
        stored_at: response_time,
        initial_age,
        fresh_until,
        swr_until,
        sie_until,
        stale_until: swr_until.max(sie_until).max(keep_until),
        vary,
        never_stale: cc.must_revalidate || cc.proxy_revalidate || cc.no_cache,
    })
}

/// The field names a response varies on, lower-cased, in order, without repeats.
pub(crate) fn vary_names(headers: &HeaderMap) -> Result<Vec<HeaderName>, NotStored> {
    let mut names: Vec<HeaderName> = Vec::new();
    if !has_field(headers, &VARY) {
        return Ok(names);
    }
    for value in headers.get_all(VARY) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() {
                continue;
            }
            if item == b"*" {
                return Err(NotStored::VaryStar);
            }
            // An unreadable name could match nothing; storing would serve one
            // client's variant to another.
            let name = HeaderName::from_bytes(item).map_err(|_| NotStored::VaryStar)?;
            if !names.contains(&name) {
                if names.len() == MAX_VARY_NAMES {
                    return Err(NotStored::VaryTooLong);
                }
                names.push(name);
            }
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn plan(
        request: RequestFacts,
        status: u16,
        pairs: &[(&'static str, &'static str)],
        ttl: Option<u64>,
    ) -> Result<StorePlan, NotStored> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        let settings = RouteSettings {
            ttl: ttl.map(Duration::from_secs),
            ..RouteSettings::default()
        };
        store_plan(
            request,
            StatusCode::from_u16(status).unwrap(),
            &headers,
            &settings,
            now(),
        )
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let r = RequestFacts::default();
        let cases: &[(&[(&'static str, &'static str)], NotStored)] = &[
            (
                &[("cache-control", "no-store, max-age=60")],
                NotStored::NoStore,
            ),
            (
                &[("cache-control", "private, max-age=60")],
                NotStored::Private,
            ),
            (
                &[("cache-control", "private=\"x\", max-age=60")],
                NotStored::Private,
            ),
            (
                &[("cache-control", "no-cache, max-age=60")],
                NotStored::NoCache,
            ),
            (
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
                NotStored::SetCookie,
            ),
            (
                &[("cache-control", "max-age=60"), ("vary", "accept, *")],
                NotStored::VaryStar,
            ),
            (&[("cache-control", "max-age=0")], NotStored::AlreadyStale),
            (
                &[("cache-control", "max-age=60"), ("age", "60")],
                NotStored::AlreadyStale,
            ),
            (&[], NotStored::NoFreshness),
        ];
        for (headers, reason) in cases {
            assert_eq!(plan(r, 200, headers, None), Err(*reason), "{headers:?}");
        }
    }

    #[test]
    fn request_no_store_forbids_storing() {
        let r = RequestFacts {
            no_store: true,
            ..RequestFacts::default()
        };
        assert_eq!(
            plan(r, 200, &[("cache-control", "max-age=60")], None),
            Err(NotStored::NoStore)
        );
    }

    #[test]
    fn authorization_needs_public_s_maxage_or_must_revalidate() {
        let r = RequestFacts {
            has_authorization: true,
            ..RequestFacts::default()
        };
        assert_eq!(
            plan(r, 200, &[("cache-control", "max-age=60")], None),
            Err(NotStored::Authorization)
        );
        assert_eq!(plan(r, 200, &[], Some(60)), Err(NotStored::Authorization));
        for cc in [
            "public, max-age=60",
            "s-maxage=60",
            "must-revalidate, max-age=60",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("cache-control", HeaderValue::from_static(cc));
            let settings = RouteSettings::default();
            assert!(
                store_plan(r, StatusCode::OK, &headers, &settings, now()).is_ok(),
                "{cc}"
            );
        }
    }

    #[test]
    fn route_ttl_stores_only_heuristically_cacheable_statuses() {
        let r = RequestFacts::default();
        assert!(plan(r, 200, &[], Some(30)).is_ok());
        assert!(plan(r, 404, &[], Some(30)).is_ok());
        assert_eq!(plan(r, 500, &[], Some(30)), Err(NotStored::Status));
        assert_eq!(plan(r, 302, &[], Some(30)), Err(NotStored::Status));
        // Explicit freshness makes any final status storable...
        assert!(plan(r, 500, &[("cache-control", "max-age=5")], None).is_ok());
        assert!(plan(r, 302, &[("cache-control", "max-age=5")], None).is_ok());
        // ...but never a partial or a 304.
        assert_eq!(
            plan(r, 206, &[("cache-control", "max-age=5")], None),
            Err(NotStored::Status)
        );
        assert_eq!(
            plan(r, 304, &[("cache-control", "max-age=5")], None),
            Err(NotStored::Status)
        );
    }

    #[test]
    fn fresh_until_subtracts_the_age_already_spent() {
        let p = plan(
            RequestFacts::default(),
            200,
            &[("cache-control", "max-age=60"), ("age", "20")],
            None,
        )
        .unwrap();
        assert_eq!(p.initial_age, Duration::from_secs(20));
        assert_eq!(p.fresh_until, now() + Duration::from_secs(40));
    }

    #[test]
    fn vary_names_are_normalised_and_bounded() {
        let mut headers = HeaderMap::new();
        headers.append(
            VARY,
            HeaderValue::from_static("Accept-Encoding, accept-language"),
        );
        headers.append(VARY, HeaderValue::from_static("ACCEPT-ENCODING,,"));
        assert_eq!(
            vary_names(&headers).unwrap(),
            vec![
                HeaderName::from_static("accept-encoding"),
                HeaderName::from_static("accept-language")
            ]
        );
        let many: String = (0..300)
            .map(|i| format!("x-h{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut headers = HeaderMap::new();
        headers.insert(VARY, HeaderValue::from_str(&many).unwrap());
        assert_eq!(vary_names(&headers), Err(NotStored::VaryTooLong));
        let mut headers = HeaderMap::new();
        headers.insert(VARY, HeaderValue::from_bytes(b"acc\xffept").unwrap());
        assert_eq!(vary_names(&headers), Err(NotStored::VaryStar));
    }
}
