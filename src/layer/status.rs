//! [`CacheStatus`]: what the cache did with a request, as a typed value rendered once
//! into the `Cache-Status` field (RFC 9211).
//!
//! ```text
//! {name}; hit; ttl=42; detail=memory
//! {name}; hit; ttl=-12; detail=stale-while-revalidate
//! {name}; hit; ttl=42; detail=refresh-after-outage
//! {name}; hit; ttl=-12; fwd=stale; fwd-status=503; detail=stale-if-error
//! {name}; fwd=uri-miss; fwd-status=200; stored
//! {name}; fwd=uri-miss; fwd-status=200; detail=private
//! {name}; fwd=stale; fwd-status=304; stored
//! {name}; fwd=uri-miss; detail=only-if-cached
//! {name}; fwd=bypass
//! {name}; fwd=bypass; detail=request-body
//! {name}; fwd=bypass; detail=invalidation-queued
//! ```
//! Parameters always come in this order: `hit`, `ttl`, `fwd`, `fwd-status`, `stored`,
//! `detail`.

use std::cell::RefCell;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use crate::engine::{LookupMiss, Tier};
use crate::policy::storable::NotStored;

/// The `Cache-Status` field name (RFC 9211).
pub(crate) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How many rendered values a thread keeps (a power of two).
const RECENT_SLOTS: usize = 16;

thread_local! {
    /// The values this thread rendered lately, by [`CacheStatus::slot`]: a response's
    /// `Cache-Status` is then a reference count, not an allocation and a render
    /// (BENCHMARKS, "Hit path, instructions").
    static RECENT: RefCell<[Option<Rendered>; RECENT_SLOTS]> =
        const { RefCell::new([const { None }; RECENT_SLOTS]) };
}

/// A status rendered after a cache's name.
struct Rendered {
    status: CacheStatus,
    name_len: usize,
    value: HeaderValue,
}

impl Rendered {
    /// Whether it was rendered after `name`: the value is the name, then what the
    /// status renders to, so the same status after the same name is the same value.
    fn is_for(&self, name: &str) -> bool {
        self.name_len == name.len() && self.value.as_bytes().starts_with(name.as_bytes())
    }
}

/// What the cache did with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheStatus {
    hit: bool,
    ttl: Option<Ttl>,
    fwd: Option<Forward>,
    fwd_status: Option<ForwardStatus>,
    stored: bool,
    detail: Option<Detail>,
}

/// How long a served response stays fresh (whole seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ttl {
    /// Fresh for this many more seconds.
    Fresh(u64),
    /// Stale for this many seconds already (`ttl=-N`; `ttl=-0` within its first
    /// second).
    Stale(u64),
}

/// Why the request went to the origin (`fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forward {
    /// The cache does not handle it (an unsafe method, `Range`).
    Bypass,
    /// Nothing stored for the URL.
    UriMiss,
    /// Stored for the URL, not for this request's `Vary`'d values.
    VaryMiss,
    /// The stored response is stale.
    Stale,
    /// The request's directives or preconditions forbade the stored one.
    Request,
}

/// The origin's answer (`fwd-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForwardStatus {
    Code(StatusCode),
    /// The call failed without a response (`fwd-status=error`).
    Error,
}

/// More about what happened (`detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detail {
    /// The tier a fresh hit came from.
    Tier(Tier),
    /// Why a response was not stored.
    NotStored(NotStored),
    /// A stale response served while it is refreshed.
    StaleWhileRevalidate,
    /// A stale response served because the origin failed.
    StaleIfError,
    /// `only-if-cached` found nothing usable: a 504.
    OnlyIfCached,
    /// A 304 refreshed the stale response, which may no longer be stored.
    NotStoredAfter304,
    /// A GET or HEAD with a body: passed through, neither looked up nor stored.
    RequestBody,
    /// A repeated `Host`, or one that disagrees with the URI: passed through.
    InvalidHost,
    /// A write whose invalidations Redis could not all take yet: they are kept and
    /// replayed, and until then other replicas may serve what it invalidated.
    InvalidationQueued,
    /// A fresh response stored before Redis last came back after an outage: served,
    /// and refreshed in the background.
    RefreshAfterOutage,
}

impl From<LookupMiss> for Forward {
    fn from(miss: LookupMiss) -> Self {
        match miss {
            LookupMiss::Uri => Forward::UriMiss,
            LookupMiss::Vary => Forward::VaryMiss,
        }
    }
}

impl CacheStatus {
    const EMPTY: CacheStatus = CacheStatus {
        hit: false,
        ttl: None,
        fwd: None,
        fwd_status: None,
        stored: false,
        detail: None,
    };

    /// A fresh response from `tier`.
    pub(crate) fn hit(tier: Tier, ttl: u64) -> Self {
        CacheStatus {
            hit: true,
            ttl: Some(Ttl::Fresh(ttl)),
            detail: Some(Detail::Tier(tier)),
            ..Self::EMPTY
        }
    }

    /// A stale response served whole, stale for `stale_for` seconds.
    pub(crate) fn stale_hit(stale_for: u64) -> Self {
        CacheStatus {
            hit: true,
            ttl: Some(Ttl::Stale(stale_for)),
            ..Self::EMPTY
        }
    }

    /// A request that went (or goes) to the origin, and why.
    pub(crate) fn forward(why: Forward) -> Self {
        CacheStatus {
            fwd: Some(why),
            ..Self::EMPTY
        }
    }

    /// The request the cache does not handle.
    pub(crate) fn bypass() -> Self {
        Self::forward(Forward::Bypass)
    }

    /// Also went to the origin, for `why` (a stale hit served because the origin
    /// failed).
    pub(crate) fn forwarded(mut self, why: Forward) -> Self {
        self.fwd = Some(why);
        self
    }

    /// With what the origin answered.
    pub(crate) fn with_origin_status(mut self, status: StatusCode) -> Self {
        self.fwd_status = Some(ForwardStatus::Code(status));
        self
    }

    /// The origin's call failed.
    pub(crate) fn with_origin_error(mut self) -> Self {
        self.fwd_status = Some(ForwardStatus::Error);
        self
    }

    /// The response is being stored.
    pub(crate) fn stored(mut self) -> Self {
        self.stored = true;
        self
    }

    pub(crate) fn with_detail(mut self, detail: Detail) -> Self {
        self.detail = Some(detail);
        self
    }

    /// What the request came to: `hit` (fresh), `stale` (served stale), `bypass`
    /// (not handled), `miss` (went to the origin).
    fn outcome(&self) -> &'static str {
        match (self.hit, self.ttl, self.fwd) {
            (true, Some(Ttl::Stale(_)), _) => "stale",
            (true, _, _) => "hit",
            (false, _, Some(Forward::Bypass)) => "bypass",
            (false, _, _) => "miss",
        }
    }

    /// Records this status on the current span (the request's, see
    /// `telemetry::request_span`) when a subscriber listens at `debug`: a field it
    /// does not declare (another span's) is ignored.
    pub(crate) fn trace(&self) {
        if !tracing::level_enabled!(tracing::Level::DEBUG) {
            return;
        }
        let span = tracing::Span::current();
        span.record("cache.outcome", self.outcome());
        if let Some(fwd) = self.fwd {
            span.record("cache.fwd", fwd.as_str());
        }
        match self.fwd_status {
            Some(ForwardStatus::Code(status)) => {
                span.record("cache.fwd_status", status.as_u16());
            }
            Some(ForwardStatus::Error) => {
                span.record("cache.fwd_status", "error");
            }
            None => {}
        }
        if self.stored {
            span.record("cache.stored", true);
        }
        if let Some(detail) = self.detail {
            span.record("cache.detail", detail.as_str());
        }
    }

    /// The field value, after the cache's `name`: from this thread's recent values
    /// when it rendered the same one lately (every miss of a route renders the same
    /// value; the hits on an entry, the same one for a second), else rendered.
    pub(crate) fn render(&self, name: &str) -> Option<HeaderValue> {
        let held = RECENT.try_with(|recent| {
            let recent = recent.try_borrow().ok()?;
            match recent.get(self.slot()) {
                Some(Some(held)) if held.status == *self && held.is_for(name) => {
                    Some(held.value.clone())
                }
                _ => None,
            }
        });
        if let Ok(Some(value)) = held {
            return Some(value);
        }
        let value = self.render_new(name)?;
        // A thread tearing down its locals keeps nothing.
        let _ = RECENT.try_with(|recent| {
            if let Ok(mut recent) = recent.try_borrow_mut() {
                if let Some(slot) = recent.get_mut(self.slot()) {
                    *slot = Some(Rendered {
                        status: *self,
                        name_len: name.len(),
                        value: value.clone(),
                    });
                }
            }
        });
        Some(value)
    }

    /// Where this status is kept among a thread's recent values.
    fn slot(&self) -> usize {
        let secs = match self.ttl {
            Some(Ttl::Fresh(secs)) => secs,
            Some(Ttl::Stale(secs)) => secs ^ 0x55,
            None => 0,
        };
        let fwd = self.fwd.map_or(0, |fwd| fwd as u64 + 1);
        let fwd_status = match self.fwd_status {
            Some(ForwardStatus::Code(code)) => u64::from(code.as_u16()),
            Some(ForwardStatus::Error) => 1,
            None => 0,
        };
        let mixed = secs
            ^ (fwd << 3)
            ^ (fwd_status << 1)
            ^ (u64::from(self.hit) << 6)
            ^ (u64::from(self.stored) << 7);
        // `RECENT_SLOTS` is a power of two: the mask keeps the index in range.
        (mixed as usize) & (RECENT_SLOTS - 1)
    }

    /// The field value rendered afresh.
    fn render_new(&self, name: &str) -> Option<HeaderValue> {
        let mut out = String::with_capacity(name.len() + 64);
        out.push_str(name);
        let mut number = itoa::Buffer::new();
        if self.hit {
            out.push_str("; hit");
        }
        match self.ttl {
            Some(Ttl::Fresh(secs)) => {
                out.push_str("; ttl=");
                out.push_str(number.format(secs));
            }
            Some(Ttl::Stale(secs)) => {
                out.push_str("; ttl=-");
                out.push_str(number.format(secs));
            }
            None => {}
        }
        if let Some(fwd) = self.fwd {
            out.push_str("; fwd=");
            out.push_str(fwd.as_str());
        }
        match self.fwd_status {
            Some(ForwardStatus::Code(status)) => {
                out.push_str("; fwd-status=");
                out.push_str(number.format(status.as_u16()));
            }
            Some(ForwardStatus::Error) => out.push_str("; fwd-status=error"),
            None => {}
        }
        if self.stored {
            out.push_str("; stored");
        }
        if let Some(detail) = self.detail {
            out.push_str("; detail=");
            out.push_str(detail.as_str());
        }
        HeaderValue::from_maybe_shared(Bytes::from(out)).ok()
    }
}

impl Forward {
    fn as_str(self) -> &'static str {
        match self {
            Forward::Bypass => "bypass",
            Forward::UriMiss => "uri-miss",
            Forward::VaryMiss => "vary-miss",
            Forward::Stale => "stale",
            Forward::Request => "request",
        }
    }
}

impl Detail {
    fn as_str(self) -> &'static str {
        match self {
            Detail::Tier(tier) => tier.as_str(),
            Detail::NotStored(reason) => reason.as_str(),
            Detail::StaleWhileRevalidate => "stale-while-revalidate",
            Detail::StaleIfError => "stale-if-error",
            Detail::OnlyIfCached => "only-if-cached",
            Detail::NotStoredAfter304 => "not-stored",
            Detail::RequestBody => "request-body",
            Detail::InvalidHost => "invalid-host",
            Detail::InvalidationQueued => "invalidation-queued",
            Detail::RefreshAfterOutage => "refresh-after-outage",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(status: CacheStatus) -> String {
        status.render("thc").unwrap().to_str().unwrap().to_owned()
    }

    #[test]
    fn every_shape_renders_in_the_documented_order() {
        let ok = StatusCode::OK;
        let cases = [
            (
                CacheStatus::hit(Tier::Memory, 42),
                "thc; hit; ttl=42; detail=memory",
            ),
            (
                CacheStatus::hit(Tier::Redis, 0),
                "thc; hit; ttl=0; detail=redis",
            ),
            (
                CacheStatus::stale_hit(12).with_detail(Detail::StaleWhileRevalidate),
                "thc; hit; ttl=-12; detail=stale-while-revalidate",
            ),
            (
                CacheStatus::stale_hit(0)
                    .forwarded(Forward::Stale)
                    .with_detail(Detail::StaleIfError)
                    .with_origin_status(StatusCode::SERVICE_UNAVAILABLE),
                "thc; hit; ttl=-0; fwd=stale; fwd-status=503; detail=stale-if-error",
            ),
            (
                CacheStatus::forward(Forward::UriMiss)
                    .with_origin_status(ok)
                    .stored(),
                "thc; fwd=uri-miss; fwd-status=200; stored",
            ),
            (
                CacheStatus::forward(Forward::VaryMiss)
                    .with_origin_status(ok)
                    .with_detail(Detail::NotStored(NotStored::Private)),
                "thc; fwd=vary-miss; fwd-status=200; detail=private",
            ),
            (
                CacheStatus::forward(Forward::Stale)
                    .with_origin_status(StatusCode::NOT_MODIFIED)
                    .with_detail(Detail::NotStoredAfter304),
                "thc; fwd=stale; fwd-status=304; detail=not-stored",
            ),
            (
                CacheStatus::forward(Forward::Request).with_detail(Detail::OnlyIfCached),
                "thc; fwd=request; detail=only-if-cached",
            ),
            (CacheStatus::bypass(), "thc; fwd=bypass"),
            (
                CacheStatus::hit(Tier::Redis, 42).with_detail(Detail::RefreshAfterOutage),
                "thc; hit; ttl=42; detail=refresh-after-outage",
            ),
            (
                CacheStatus::bypass().with_detail(Detail::InvalidationQueued),
                "thc; fwd=bypass; detail=invalidation-queued",
            ),
            (
                CacheStatus::stale_hit(3)
                    .forwarded(Forward::Stale)
                    .with_detail(Detail::StaleIfError)
                    .with_origin_error(),
                "thc; hit; ttl=-3; fwd=stale; fwd-status=error; detail=stale-if-error",
            ),
        ];
        for (status, text) in cases {
            assert_eq!(rendered(status), text);
        }
    }

    #[test]
    fn a_value_rendered_lately_is_shared_and_only_for_its_status_and_name() {
        let hit = CacheStatus::hit(Tier::Memory, 42);
        let first = hit.render("thc").unwrap();
        let again = hit.render("thc").unwrap();
        assert_eq!(first, again);
        assert_eq!(
            first.as_bytes().as_ptr(),
            again.as_bytes().as_ptr(),
            "one buffer"
        );
        // Same status, another cache's name (one a prefix of the other).
        assert_eq!(rendered_as(hit, "thc2"), "thc2; hit; ttl=42; detail=memory");
        assert_eq!(rendered_as(hit, "th"), "th; hit; ttl=42; detail=memory");
        // Statuses that share a slot (ttls 16 apart) take turns in it.
        for _ in 0..3 {
            for ttl in [0, 16, 32] {
                let status = CacheStatus::hit(Tier::Redis, ttl);
                assert_eq!(
                    rendered(status),
                    format!("thc; hit; ttl={ttl}; detail=redis")
                );
            }
            assert_eq!(rendered(CacheStatus::stale_hit(16)), "thc; hit; ttl=-16");
        }
    }

    fn rendered_as(status: CacheStatus, name: &str) -> String {
        status.render(name).unwrap().to_str().unwrap().to_owned()
    }

    #[test]
    fn a_miss_converts_to_its_forward_reason() {
        assert_eq!(Forward::from(LookupMiss::Uri), Forward::UriMiss);
        assert_eq!(Forward::from(LookupMiss::Vary), Forward::VaryMiss);
    }
}
