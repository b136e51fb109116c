//! Serving from the cache: a cacheable request's lookup, and what the stored response
//! can give it (RFC 9111 §4): a fresh hit (or a 304 for its conditions, or the byte
//! range it asks for), a stale one
//! within its `stale-while-revalidate` window, or nothing usable and why.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

use http::header::{CACHE_CONTROL, RANGE};
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode, Version};

use super::body::CacheBody;
use super::response::{self, Served, Stamp};
use super::status::{CacheStatus, Detail, Forward};
use crate::engine::{Engine, Lookup};
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::policy::cache_control::CacheControl;
use crate::policy::conditional::{has_origin_preconditions, is_not_modified, is_precondition};
use crate::policy::range::{requested_part, Part};
use crate::policy::settings::{RequestDirectives, RouteSettings};
use crate::telemetry::{Counter, TARGET};

/// A cacheable request being served: the route, the request's key and directives.
pub(crate) struct Serving<'a> {
    pub(crate) engine: &'a Arc<Engine>,
    pub(crate) settings: &'a RouteSettings,
    pub(crate) primary: &'a CacheKey,
    pub(crate) request_cc: &'a CacheControl,
    /// Whether the request's directives count (`RequestDirectives::Honour`).
    pub(crate) honour: bool,
}

/// What the service's one pass over a request's fields found that the steps after it
/// ask about (each a hash lookup otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FieldsSeen {
    /// A `Range` field.
    pub(crate) range: bool,
    /// A precondition (`If-None-Match`, `If-Modified-Since`, `If-Match`,
    /// `If-Unmodified-Since`).
    pub(crate) precondition: bool,
    /// A `Cache-Control` field.
    pub(crate) cache_control: bool,
}

impl FieldsSeen {
    /// Notes `name`, one of a request's field names.
    pub(crate) fn see(&mut self, name: &HeaderName) {
        if name == RANGE {
            self.range = true;
        } else if name == CACHE_CONTROL {
            self.cache_control = true;
        } else if is_precondition(name) {
            self.precondition = true;
        }
    }

    /// What `headers` hold, read name by name.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let mut seen = FieldsSeen::default();
        for name in headers.keys() {
            seen.see(name);
        }
        seen
    }

    /// The request's `Cache-Control`, parsed only when it has one.
    pub(crate) fn cache_control(self, headers: &HeaderMap) -> CacheControl {
        if self.cache_control {
            CacheControl::from_headers(headers)
        } else {
            CacheControl::default()
        }
    }
}

/// What serving from the cache needs of the request (borrowed apart from the body,
/// which need not be `Sync`).
pub(crate) struct RequestHead<'a> {
    pub(crate) headers: &'a HeaderMap,
    pub(crate) head: bool,
    pub(crate) version: Version,
    /// It has a `Range` field.
    pub(crate) ranged: bool,
    /// It has a precondition (`If-None-Match`, `If-Modified-Since`, `If-Match`,
    /// `If-Unmodified-Since`).
    pub(crate) conditional: bool,
}

impl<'a> RequestHead<'a> {
    /// The request's head, with what the service's pass over its fields saw.
    pub(crate) fn new<B>(request: &'a Request<B>, seen: FieldsSeen) -> Self {
        RequestHead {
            headers: request.headers(),
            head: request.method() == Method::HEAD,
            version: request.version(),
            ranged: seen.range,
            conditional: seen.precondition,
        }
    }
}

/// What a lookup gives the request.
pub(crate) enum Answer<B> {
    /// A fresh stored response.
    Hit(Response<CacheBody<B>>),
    /// A stale one within its `stale-while-revalidate` window, or a fresh one stored
    /// before Redis last came back after an outage: served now, refreshed in the
    /// background.
    Refresh(Response<CacheBody<B>>, Arc<CachedResponse>),
    /// Nothing usable; the stale entry, if any, for revalidation and
    /// `stale-if-error`.
    Miss(Forward, Option<Arc<CachedResponse>>),
}

/// What the stored response may give a request, at `now`: the decision alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Fresh: served (as a 304 when the request's conditions match it).
    Fresh { not_modified: bool },
    /// Stale within its `stale-while-revalidate` window: served, refreshed.
    StaleWhileRevalidate,
    /// Stale otherwise: the origin is asked (with the stored validators).
    Stale,
    /// The request's directives or preconditions refuse it.
    Refused,
}

/// `fwd=request` when something is stored (the request's directives refused it),
/// else the miss.
fn forward_reason(found: Lookup) -> Forward {
    match found {
        Lookup::Hit(..) => Forward::Request,
        Lookup::Miss(miss) => miss.into(),
    }
}

impl<'a> Serving<'a> {
    pub(crate) fn new(
        engine: &'a Arc<Engine>,
        settings: &'a RouteSettings,
        primary: &'a CacheKey,
        request_cc: &'a CacheControl,
    ) -> Self {
        Serving {
            engine,
            settings,
            primary,
            request_cc,
            honour: settings.request_directives == RequestDirectives::Honour,
        }
    }

    /// How this route stamps its responses.
    pub(crate) fn stamp(&self) -> Stamp<'a> {
        Stamp::new(self.engine, self.settings)
    }

    /// `no-cache` and `max-age=0` must reach the origin (RFC 9111 §5.2.1).
    pub(crate) fn must_forward(&self) -> bool {
        self.honour && (self.request_cc.no_cache || self.request_cc.max_age == Some(0))
    }

    /// The lookup, if it completes without waiting (a memory-only lookup always
    /// does).
    pub(crate) fn serve_now<B>(&self, request: &RequestHead<'_>) -> Option<Answer<B>> {
        self.lookup_now(request)
            .map(|found| self.answer(found, request))
    }

    /// Why a request that must reach the origin (`must_forward`) goes there: a
    /// stored response it may not use (`fwd=request`), or none (`uri-miss`,
    /// `vary-miss`); `None` while the lookup waits (on Redis).
    pub(crate) fn forward_reason_now(&self, request: &RequestHead<'_>) -> Option<Forward> {
        self.lookup_now(request).map(forward_reason)
    }

    /// The lookup, polled once: `None` if it must wait.
    fn lookup_now(&self, request: &RequestHead<'_>) -> Option<Lookup> {
        let lookup = std::pin::pin!(self.engine.lookup(self.primary, request.headers));
        match lookup.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(found) => Some(found),
            Poll::Pending => None,
        }
    }

    /// As `forward_reason_now`, waiting for the lookup.
    pub(crate) async fn forward_reason(&self, request: &RequestHead<'_>) -> Forward {
        forward_reason(self.engine.lookup(self.primary, request.headers).await)
    }

    /// A response from the cache, or why there is none.
    pub(crate) async fn serve<B>(&self, request: &RequestHead<'_>) -> Answer<B> {
        let found = self.engine.lookup(self.primary, request.headers).await;
        self.answer(found, request)
    }

    /// Whether the request's `max-age` and `min-fresh` (when the route honours them)
    /// let `entry` be used at `now`, fresh or stale: too old, or fresh for too short a
    /// time (a stale entry is fresh for none), and it is not.
    pub(crate) fn request_allows(&self, entry: &CachedResponse, now: SystemTime) -> bool {
        if !self.honour {
            return true;
        }
        let too_old = self
            .request_cc
            .max_age
            .is_some_and(|max| entry.age(now).as_secs() > max);
        let too_close = self
            .request_cc
            .min_fresh
            .is_some_and(|min| entry.time_to_live(now).as_secs() < min);
        !(too_old || too_close)
    }

    /// What a stored `entry` may give this request at `now` (RFC 9111 §4.2, §5.2.1;
    /// RFC 5861 §3).
    pub(crate) fn verdict(
        &self,
        entry: &CachedResponse,
        request: &RequestHead<'_>,
        now: SystemTime,
    ) -> Verdict {
        let allowed = self.request_allows(entry, now);
        let origin_preconditions =
            || request.conditional && has_origin_preconditions(request.headers);
        if !entry.is_fresh(now) {
            if allowed && entry.may_serve_while_revalidating(now) && !origin_preconditions() {
                return Verdict::StaleWhileRevalidate;
            }
            return Verdict::Stale;
        }
        if !allowed || origin_preconditions() {
            return Verdict::Refused;
        }
        // Only a stored 200 is a representation the conditions can be about.
        let not_modified = request.conditional
            && entry.status == StatusCode::OK
            && is_not_modified(request.headers, &entry.headers, entry.stored_at);
        Verdict::Fresh { not_modified }
    }

    fn answer<B>(&self, found: Lookup, request: &RequestHead<'_>) -> Answer<B> {
        let (entry, tier) = match found {
            Lookup::Hit(entry, tier) => (entry, tier),
            Lookup::Miss(miss) => return Answer::Miss(miss.into(), None),
        };
        let now = SystemTime::now();
        match self.verdict(&entry, request, now) {
            Verdict::Fresh { not_modified } => {
                self.engine.count(Counter::Hit);
                tracing::debug!(target: TARGET, key = %self.primary, outcome = "hit", detail = tier.as_str(), not_modified);
                // Only a stored 200 is a representation a range can be of; a 304
                // and a HEAD come first.
                let part = if !request.ranged
                    || request.head
                    || not_modified
                    || entry.status != StatusCode::OK
                {
                    Part::Whole
                } else {
                    requested_part(request.headers, &entry.headers, entry.body.len() as u64)
                };
                let served = Served {
                    head: request.head,
                    not_modified,
                    version: request.version,
                    part,
                };
                let status = CacheStatus::hit(tier, entry.time_to_live(now).as_secs());
                if self.engine.stored_before_recovery(&entry) {
                    // It may have missed an invalidation Redis never got: served
                    // once more, and refreshed.
                    tracing::debug!(target: TARGET, key = %self.primary, outcome = "refresh-after-outage");
                    let status = status.with_detail(Detail::RefreshAfterOutage);
                    let response = response::from_stored(&entry, status, served, now, self.stamp());
                    return Answer::Refresh(response, entry);
                }
                Answer::Hit(response::from_stored(
                    &entry,
                    status,
                    served,
                    now,
                    self.stamp(),
                ))
            }
            Verdict::StaleWhileRevalidate => {
                self.engine.count(Counter::Hit);
                tracing::debug!(target: TARGET, key = %self.primary, outcome = "hit", detail = "stale-while-revalidate");
                let response = response::stale(
                    &entry,
                    (request.head, request.version),
                    now,
                    self.stamp(),
                    |status| status.with_detail(Detail::StaleWhileRevalidate),
                );
                Answer::Refresh(response, entry)
            }
            Verdict::Stale => Answer::Miss(Forward::Stale, Some(entry)),
            Verdict::Refused => Answer::Miss(Forward::Request, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use bytes::Bytes;
    use http::HeaderValue;

    use crate::engine::tests::memory_engine;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    /// Stored at 0, fresh until 60, served while revalidating until 120.
    fn entry(status: u16, headers: &[(&'static str, &'static str)]) -> CachedResponse {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_static(value));
        }
        CachedResponse::builder(StatusCode::from_u16(status).unwrap(), map, Bytes::new())
            .stored_at(at(0))
            .fresh_until(at(60))
            .stale_while_revalidate_until(at(120))
            .build()
    }

    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn verdict(
        directives: RequestDirectives,
        request_headers: &[(&'static str, &'static str)],
        entry: &CachedResponse,
        now: u64,
    ) -> Verdict {
        let engine = memory_engine();
        let settings = RouteSettings {
            request_directives: directives,
            ..RouteSettings::default()
        };
        let headers = request(request_headers);
        let cc = CacheControl::from_headers(&headers);
        let key = CacheKey::from_bytes([0; 32]);
        let head = RequestHead {
            headers: &headers,
            head: false,
            version: Version::HTTP_11,
            ranged: false,
            conditional: FieldsSeen::of(&headers).precondition,
        };
        Serving::new(&engine, &settings, &key, &cc).verdict(entry, &head, at(now))
    }

    #[tokio::test]
    async fn fresh_stale_and_windowed_entries_get_their_verdicts() {
        let honour = RequestDirectives::Honour;
        let stored = entry(200, &[]);
        let fresh = Verdict::Fresh {
            not_modified: false,
        };
        assert_eq!(verdict(honour, &[], &stored, 10), fresh);
        assert_eq!(
            verdict(honour, &[], &stored, 90),
            Verdict::StaleWhileRevalidate
        );
        assert_eq!(verdict(honour, &[], &stored, 130), Verdict::Stale);
    }

    #[tokio::test]
    async fn the_request_directives_refuse_fresh_and_windowed_entries_alike() {
        let honour = RequestDirectives::Honour;
        let stored = entry(200, &[]);
        let max_age = [("cache-control", "max-age=5")];
        let min_fresh = [("cache-control", "min-fresh=100")];
        assert_eq!(verdict(honour, &max_age, &stored, 10), Verdict::Refused);
        assert_eq!(verdict(honour, &min_fresh, &stored, 10), Verdict::Refused);
        assert_eq!(verdict(honour, &max_age, &stored, 90), Verdict::Stale);
        assert_eq!(verdict(honour, &min_fresh, &stored, 90), Verdict::Stale);
        // Ignored, they change nothing.
        let ignore = RequestDirectives::Ignore;
        let fresh = Verdict::Fresh {
            not_modified: false,
        };
        assert_eq!(verdict(ignore, &max_age, &stored, 10), fresh);
        assert_eq!(
            verdict(ignore, &min_fresh, &stored, 90),
            Verdict::StaleWhileRevalidate
        );
    }

    #[tokio::test]
    async fn conditions_make_a_304_of_a_stored_200_only() {
        let honour = RequestDirectives::Honour;
        let ok = entry(200, &[("etag", "\"v1\"")]);
        let gone = entry(404, &[("etag", "\"v1\"")]);
        let matching = [("if-none-match", "\"v1\"")];
        assert_eq!(
            verdict(honour, &matching, &ok, 10),
            Verdict::Fresh { not_modified: true }
        );
        assert_eq!(
            verdict(honour, &matching, &gone, 10),
            Verdict::Fresh {
                not_modified: false
            }
        );
        // Preconditions only the origin can judge: refused fresh, never served stale.
        let if_match = [("if-match", "\"v1\"")];
        assert_eq!(verdict(honour, &if_match, &ok, 10), Verdict::Refused);
        assert_eq!(verdict(honour, &if_match, &ok, 90), Verdict::Stale);
    }

    #[tokio::test]
    async fn no_cache_and_max_age_0_must_reach_the_origin_unless_ignored() {
        let engine = memory_engine();
        let key = CacheKey::from_bytes([0; 32]);
        for (value, forward) in [
            ("no-cache", true),
            ("max-age=0", true),
            ("max-age=1", false),
            ("only-if-cached", false),
        ] {
            let cc = CacheControl::parse(value);
            for (directives, expected) in [
                (RequestDirectives::Honour, forward),
                (RequestDirectives::Ignore, false),
            ] {
                let settings = RouteSettings {
                    request_directives: directives,
                    ..RouteSettings::default()
                };
                let serving = Serving::new(&engine, &settings, &key, &cc);
                assert_eq!(serving.must_forward(), expected, "{value} {directives:?}");
            }
        }
    }
}
