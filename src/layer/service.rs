//! [`HybridCacheService`]: the request path. `call` only classifies the request and
//! hands it to the step that owns it: a write (invalidates once it succeeds), a
//! request the cache does not handle (passes through), or a cacheable one (served
//! from memory at once when it can, else looked up and filled in the future).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body::Body;
use tower::Service;

use super::body::CacheBody;
use super::fill::{serve_or_fill, spawn_refresh, Prepared};
use super::future::ResponseFuture;
use super::query::serve_query;
use super::request_body::RequestBody;
use super::response::Stamp;
use super::serve::{Answer, FieldsSeen, RequestHead, Serving};
use super::status::{CacheStatus, Detail};
use super::write::{invalidate_after, WriteTarget};
use crate::engine::Engine;
use crate::key::CacheKey;
use crate::policy::settings::RouteSettings;
use crate::telemetry::{request_span, Counter};

/// Caches the responses of `S`. Made by [`HybridCacheLayer`](super::HybridCacheLayer).
///
/// GET requests are answered from the cache when a fresh response is stored, and
/// their storable responses are stored; HEAD requests are answered from the GET
/// entry. Unsafe requests (POST, PUT, PATCH, DELETE, …) pass through, and when they
/// succeed (2xx, 3xx) they invalidate what is stored for their URI and for the
/// same-authority URIs in `Location` and `Content-Location`, in both tiers, before the
/// response goes back (RFC 9111 §4.4). Any other request passes through without
/// touching the cache: other safe methods (`OPTIONS`, `TRACE`, `QUERY`), `Range`, a
/// GET or HEAD that carries a body (the key does not cover it), and a request whose
/// `Host` is repeated or disagrees with its URI's authority. Errors of `S` pass
/// through untouched.
#[derive(Clone)]
pub struct HybridCacheService<S> {
    inner: S,
    route: Arc<Route>,
}

/// What every clone of a route's service shares, behind one reference count: axum
/// clones a layered route's service for each request, and each count is a cache
/// line the cores contend for (one count instead of two saved about 13 ns a request
/// over HTTP, `perf`).
struct Route {
    engine: Arc<Engine>,
    settings: Arc<RouteSettings>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for HybridCacheService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridCacheService")
            .field("inner", &self.inner)
            .field("settings", &self.route.settings)
            .finish_non_exhaustive()
    }
}

impl<S> HybridCacheService<S> {
    pub(crate) fn new(inner: S, engine: Arc<Engine>, settings: Arc<RouteSettings>) -> Self {
        HybridCacheService {
            inner,
            route: Arc::new(Route { engine, settings }),
        }
    }

    /// Returns the wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Returns the wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Counts a request the cache does not answer; its `Cache-Status` (with why, when
    /// that is not plain from the method), if on.
    fn bypass(&self, why: Option<Detail>) -> Option<http::HeaderValue> {
        self.route.engine.count(Counter::Bypass);
        let status = match why {
            Some(detail) => CacheStatus::bypass().with_detail(detail),
            None => CacheStatus::bypass(),
        };
        Stamp::new(&self.route.engine, &self.route.settings).value(status)
    }

    /// The ready inner service, for a future; a clone stays for the next call.
    fn take_inner(&mut self) -> S
    where
        S: Clone,
    {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

/// What the cache does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    /// An unsafe method: forwarded, and invalidates once it succeeds.
    Write,
    /// A safe request the cache does not handle: other methods, and
    /// requests it must not answer or store for others (the detail says why).
    Bypass(Option<Detail>),
    /// A GET or HEAD: served from the cache or stored (with what its fields hold
    /// that the later steps ask about).
    Cacheable(FieldsSeen),
    /// A `QUERY` (RFC 10008): its content is read, then served from the cache or
    /// stored under a key that covers it.
    Query,
}

fn classify<B>(request: &Request<B>, caches_query: bool) -> RequestKind {
    let method = request.method();
    if !is_safe(method) {
        return RequestKind::Write;
    }
    let query = method.as_str() == "QUERY";
    if method != Method::GET && method != Method::HEAD && !(query && caches_query) {
        return RequestKind::Bypass(None);
    }
    let head = HeadFields::of(request.headers());
    if query {
        // Its content is read and keyed.
        if head.names_one_host(request.uri()) {
            RequestKind::Query
        } else {
            RequestKind::Bypass(Some(Detail::InvalidHost))
        }
    } else if head.body {
        // The origin may read the body, the key does not cover it: storing would let
        // one client's body decide what everyone gets.
        RequestKind::Bypass(Some(Detail::RequestBody))
    } else if !head.names_one_host(request.uri()) {
        RequestKind::Bypass(Some(Detail::InvalidHost))
    } else {
        RequestKind::Cacheable(head.seen)
    }
}

/// What a GET's or HEAD's fields say about whether the cache may handle it, read in
/// one pass over the fields (cheaper than a lookup per name on the hit path).
struct HeadFields<'a> {
    /// `Range`, the preconditions, `Cache-Control`.
    seen: FieldsSeen,
    /// A `Content-Length` other than 0 (junk included) or any `Transfer-Encoding`
    /// (RFC 9112 §6.1).
    body: bool,
    /// The first `Host`, and whether another follows it.
    host: Option<&'a http::HeaderValue>,
    repeated_host: bool,
}

impl<'a> HeadFields<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let mut fields = HeadFields {
            seen: FieldsSeen::default(),
            body: false,
            host: None,
            repeated_host: false,
        };
        for (name, value) in headers {
            if name == TRANSFER_ENCODING
                || (name == CONTENT_LENGTH && value.as_bytes().trim_ascii() != b"0")
            {
                fields.body = true;
            } else if name == HOST {
                fields.repeated_host |= fields.host.is_some();
                fields.host.get_or_insert(value);
            } else {
                fields.seen.see(name);
            }
        }
        fields
    }

    /// Whether the request names one authority: at most one `Host`, which agrees with
    /// an absolute-form URI's authority (RFC 9112 §3.2: anything else is invalid, and
    /// which host it meant is a guess).
    fn names_one_host(&self, uri: &Uri) -> bool {
        match (self.host, uri.authority()) {
            _ if self.repeated_host => false,
            (Some(host), Some(authority)) => host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes()),
            _ => true,
        }
    }
}

/// Safe methods (RFC 9110 §9.2.1, and `QUERY`) change nothing at the origin; every
/// other method may, and invalidates when it succeeds.
fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) || method.as_str() == "QUERY"
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HybridCacheService<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Unpin + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let span = request_span();
        let _entered = span.enter();
        match classify(&request, self.route.settings.max_query_bytes > 0) {
            RequestKind::Write => {
                self.route.engine.count(Counter::Bypass);
                CacheStatus::bypass().trace();
                let target = WriteTarget::of(&request, &self.route.settings);
                let future = self.inner.call(request.map(RequestBody::new));
                let engine = Arc::clone(&self.route.engine);
                let future = invalidate_after(future, engine, target);
                ResponseFuture::cached(future, &span)
            }
            RequestKind::Bypass(why) => {
                let status = self.bypass(why);
                let strip = self
                    .route
                    .settings
                    .hides_fields()
                    .then(|| Arc::clone(&self.route.settings));
                ResponseFuture::bypass(
                    self.inner.call(request.map(RequestBody::new)),
                    status,
                    strip,
                    span.clone(),
                )
            }
            RequestKind::Cacheable(seen) => self.cacheable(request, seen, &span),
            RequestKind::Query => {
                let inner = self.take_inner();
                let (engine, settings) = (
                    Arc::clone(&self.route.engine),
                    Arc::clone(&self.route.settings),
                );
                let future = serve_query(inner, engine, settings, request);
                ResponseFuture::cached(future, &span)
            }
        }
    }
}

impl<S> HybridCacheService<S> {
    /// A GET or HEAD: with memory the only tier, the lookup completes here, and a hit
    /// is built with no boxed future and no clone of the inner service; otherwise
    /// the lookup (a Redis read is polled only where it can finish) and the fill run
    /// in the future.
    fn cacheable<ReqBody, ResBody>(
        &mut self,
        request: Request<ReqBody>,
        seen: FieldsSeen,
        span: &tracing::Span,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqBody: Send + 'static,
        ResBody: Body<Data = Bytes> + Send + 'static,
    {
        let request_cc = seen.cache_control(request.headers());
        let primary = CacheKey::primary(
            request.method(),
            request.uri(),
            request.headers(),
            &self.route.settings,
        );
        let serving = Serving::new(
            &self.route.engine,
            &self.route.settings,
            &primary,
            &request_cc,
        );
        let known = if serving.must_forward() {
            // Why it goes there, for `Cache-Status` (looked up in the fill when the
            // lookup must wait).
            serving
                .forward_reason_now(&RequestHead::new(&request, seen))
                .map(|why| (why, None))
        } else if !self.route.engine.reads_are_local() {
            None
        } else {
            match serving.serve_now(&RequestHead::new(&request, seen)) {
                Some(Answer::Hit(response)) => return ResponseFuture::ready(response),
                Some(Answer::Refresh(response, stale)) => {
                    let inner = self.take_inner();
                    let (engine, settings) = (
                        Arc::clone(&self.route.engine),
                        Arc::clone(&self.route.settings),
                    );
                    spawn_refresh(
                        inner,
                        engine,
                        settings,
                        (primary, request_cc),
                        request.map(RequestBody::new),
                        stale,
                    );
                    return ResponseFuture::ready(response);
                }
                Some(Answer::Miss(miss, stale)) => Some((miss, stale)),
                None => None,
            }
        };
        let prepared = Prepared {
            primary,
            request_cc,
            known,
            seen,
        };
        let inner = self.take_inner();
        let (engine, settings) = (
            Arc::clone(&self.route.engine),
            Arc::clone(&self.route.settings),
        );
        let request = request.map(RequestBody::new);
        let future = serve_or_fill(inner, engine, settings, request, prepared);
        ResponseFuture::cached(future, span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri("http://api.test/x");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn requests_are_classified_by_method_range_body_and_host() {
        let seen = |seen: FieldsSeen| RequestKind::Cacheable(seen);
        let cacheable = seen(FieldsSeen::default());
        let conditional = seen(FieldsSeen {
            precondition: true,
            ..FieldsSeen::default()
        });
        let body = RequestKind::Bypass(Some(Detail::RequestBody));
        let host = RequestKind::Bypass(Some(Detail::InvalidHost));
        let cases = [
            ("GET", &[][..], cacheable),
            ("HEAD", &[], cacheable),
            ("GET", &[("content-length", "0")], cacheable),
            ("GET", &[("host", "API.test")], cacheable),
            // Answered from a stored response when one is fresh.
            (
                "GET",
                &[("range", "bytes=0-1")],
                seen(FieldsSeen {
                    range: true,
                    ..FieldsSeen::default()
                }),
            ),
            // Parsed only when present.
            (
                "GET",
                &[("cache-control", "no-cache")],
                seen(FieldsSeen {
                    cache_control: true,
                    ..FieldsSeen::default()
                }),
            ),
            // Checked against a fresh entry (or left to the origin) only when present.
            ("GET", &[("if-none-match", "\"v1\"")], conditional),
            ("GET", &[("if-modified-since", "junk")], conditional),
            ("HEAD", &[("if-match", "*")], conditional),
            ("GET", &[("if-unmodified-since", "x")], conditional),
            ("GET", &[("if-range", "\"v1\"")], cacheable),
            ("OPTIONS", &[], RequestKind::Bypass(None)),
            ("TRACE", &[], RequestKind::Bypass(None)),
            ("QUERY", &[], RequestKind::Query),
            ("QUERY", &[("content-length", "5")], RequestKind::Query),
            ("QUERY", &[("host", "evil.test")], host),
            ("GET", &[("content-length", "5")], body),
            ("HEAD", &[("content-length", "junk")], body),
            ("GET", &[("transfer-encoding", "chunked")], body),
            ("GET", &[("host", "api.test"), ("host", "api.test")], host),
            ("GET", &[("host", "evil.test")], host),
            ("POST", &[], RequestKind::Write),
            ("PUT", &[], RequestKind::Write),
            ("PATCH", &[], RequestKind::Write),
            ("DELETE", &[], RequestKind::Write),
            ("PURGE", &[], RequestKind::Write),
            ("POST", &[("host", "evil.test")], RequestKind::Write),
        ];
        for (method, headers, kind) in cases {
            assert_eq!(
                classify(&request(method, headers), true),
                kind,
                "{method} {headers:?}"
            );
        }
        // A route that does not cache QUERY passes it through.
        assert_eq!(
            classify(&request("QUERY", &[]), false),
            RequestKind::Bypass(None)
        );
    }
}
