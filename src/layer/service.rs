//! [`HybridCacheService`]: the request path of the cache.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{
    AGE, AUTHORIZATION, CONNECTION, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RANGE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use tower::Service;

use super::body::{CacheBody, Capture};
use super::future::ResponseFuture;
use super::overrides::{is_valid_tag, CacheOverrides, MAX_TAGS};
use crate::cache::{wait_for_leader, Flight, FlightGuard, Lookup, MissKind};
use crate::entry::CachedResponse;
use crate::key::normalised_value;
use crate::policy::cache_control::CacheControl;
use crate::policy::conditional::{has_origin_preconditions, is_not_modified};
use crate::policy::settings::RouteSettings;
use crate::policy::storable::{store_plan, NotStored, RequestFacts, StorePlan};
use crate::policy::RequestDirectives;
use crate::policy::TtlMode;
use crate::store::hybrid::Lease;
use crate::store::Tier;
use crate::telemetry::{Counter, TARGET};
use crate::{CacheKey, HybridCache};

/// The `Cache-Status` field name (RFC 9211).
pub(crate) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Hop-by-hop fields (RFC 9110 §7.6.1), never stored.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Caches the responses of `S`. Made by [`HybridCacheLayer`](crate::HybridCacheLayer).
///
/// GET requests are answered from the cache when a fresh response is stored, and
/// their storable responses are stored; HEAD requests are answered from the GET
/// entry. Unsafe requests (POST, PUT, PATCH, DELETE, …) pass through, and when they
/// succeed (2xx, 3xx) they invalidate what is stored for their URI and for the
/// same-authority URIs in `Location` and `Content-Location`, in both tiers, before the
/// response goes back (RFC 9111 §4.4). Any other request, and any request with
/// `Range`, passes through. Errors of `S` pass through untouched.
#[derive(Clone)]
pub struct HybridCacheService<S> {
    inner: S,
    cache: HybridCache,
    settings: Arc<RouteSettings>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for HybridCacheService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridCacheService")
            .field("inner", &self.inner)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<S> HybridCacheService<S> {
    pub(crate) fn new(inner: S, cache: HybridCache, settings: Arc<RouteSettings>) -> Self {
        HybridCacheService {
            inner,
            cache,
            settings,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> HybridCacheService<S> {
    /// Counts a request the cache does not answer; its `Cache-Status`, if on.
    fn bypass(&self) -> Option<HeaderValue> {
        self.cache.count(Counter::Bypass);
        self.settings
            .cache_status_header
            .then(|| status_value(&self.cache, "fwd=bypass"))
            .flatten()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HybridCacheService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let method = request.method();
        if !is_safe(method) {
            // A write: once it succeeds, what is stored for its URI is out of date.
            let status = self.bypass();
            let target = WriteTarget::of(&request, &self.settings);
            let future = self.inner.call(request);
            return ResponseFuture::cached(Box::pin(invalidate_after(
                future,
                self.cache.clone(),
                target,
                status,
            )));
        }
        if (method != Method::GET && method != Method::HEAD)
            || request.headers().contains_key(RANGE)
        {
            let status = self.bypass();
            let strip = self.settings.hidden_tag_header().cloned();
            return ResponseFuture::bypass(self.inner.call(request), status, strip);
        }
        let request_cc = CacheControl::from_headers(request.headers());
        let primary = CacheKey::primary(
            request.method(),
            request.uri(),
            request.headers(),
            &self.settings,
        );
        let ask = Ask::new(&self.cache, &self.settings, &primary, &request_cc);
        let known = if ask.must_forward() {
            Some((MissKind::Request, None))
        } else if !self.cache.inner.store.reads_are_local() {
            // A Redis read is polled once only where it can finish: in the future.
            None
        } else {
            // The memory tier answers without suspending: a hit is built here, with no
            // boxed future and no clone of the inner service.
            match ask.serve_now(&RequestHead::of(&request)) {
                Some(Answer::Hit(response)) => return ResponseFuture::ready(response),
                Some(Answer::Refresh(response, stale)) => {
                    let clone = self.inner.clone();
                    let inner = std::mem::replace(&mut self.inner, clone);
                    spawn_refresh(
                        inner,
                        self.cache.clone(),
                        Arc::clone(&self.settings),
                        (primary, request_cc),
                        request,
                        stale,
                    );
                    return ResponseFuture::ready(response);
                }
                Some(Answer::Miss(miss, stale)) => Some((miss, stale)),
                None => None,
            }
        };
        // The ready service goes into the future; a clone stays for the next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let lookup = Prepared {
            primary,
            request_cc,
            known,
        };
        ResponseFuture::cached(Box::pin(handle(
            inner,
            self.cache.clone(),
            Arc::clone(&self.settings),
            request,
            lookup,
        )))
    }
}

/// Safe methods (RFC 9110 §9.2.1) change nothing at the origin; every other method
/// may, and invalidates when it succeeds.
fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// What an unsafe request may invalidate: its own URI, and the URIs its response
/// names in `Location` and `Content-Location` when they share its authority.
struct WriteTarget {
    key: CacheKey,
    /// Scheme and authority of an absolute-form request, to resolve path-only URIs.
    base: Option<(String, String)>,
    /// The request's authority (from the URI or `Host`), lower case.
    authority: String,
    headers: HeaderMap,
    settings: Arc<RouteSettings>,
}

impl WriteTarget {
    fn of<B>(request: &Request<B>, settings: &Arc<RouteSettings>) -> Self {
        let uri = request.uri();
        let authority = match uri.authority() {
            Some(authority) => authority.as_str(),
            None => request
                .headers()
                .get(http::header::HOST)
                .and_then(|host| host.to_str().ok())
                .unwrap_or_default(),
        };
        WriteTarget {
            key: CacheKey::primary(&Method::GET, uri, request.headers(), settings),
            base: uri.authority().map(|authority| {
                let scheme = uri.scheme_str().unwrap_or("http").to_owned();
                (scheme, authority.as_str().to_owned())
            }),
            authority: authority.to_ascii_lowercase(),
            headers: request.headers().clone(),
            settings: Arc::clone(settings),
        }
    }

    /// The key of a URI reference from `Location` or `Content-Location`: an absolute
    /// URI with the request's authority, or an absolute path. Anything else (another
    /// host, a relative path, junk) invalidates nothing.
    fn key_for(&self, value: &HeaderValue) -> Option<CacheKey> {
        let text = value.to_str().ok()?;
        let uri: http::Uri = text.parse().ok()?;
        let uri = match uri.authority() {
            Some(authority) => {
                if !authority.as_str().eq_ignore_ascii_case(&self.authority) {
                    return None;
                }
                uri
            }
            None if text.starts_with('/') && !text.starts_with("//") => match &self.base {
                Some((scheme, authority)) => {
                    format!("{scheme}://{authority}{text}").parse().ok()?
                }
                None => uri,
            },
            None => return None,
        };
        Some(CacheKey::primary(
            &Method::GET,
            &uri,
            &self.headers,
            &self.settings,
        ))
    }
}

/// Forwards an unsafe request; after a success (2xx or 3xx), invalidates its URI and
/// the same-authority URIs in `Location` and `Content-Location` (RFC 9111 §4.4)
/// before the response goes back, so the client's next read misses.
async fn invalidate_after<F, B, E>(
    future: F,
    cache: HybridCache,
    target: WriteTarget,
    cache_status: Option<HeaderValue>,
) -> Result<Response<CacheBody<B>>, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    let response = future.await?;
    let (mut parts, body) = response.into_parts();
    if let Some(name) = target.settings.hidden_tag_header() {
        parts.headers.remove(name);
    }
    if parts.status.is_success() || parts.status.is_redirection() {
        let mut keys = vec![target.key];
        for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
            if let Some(key) = parts.headers.get(name).and_then(|v| target.key_for(v)) {
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        for key in keys {
            cache.invalidate_key(key).await;
        }
    }
    if let Some(value) = cache_status {
        parts.headers.append(CACHE_STATUS, value);
    }
    Ok(Response::from_parts(parts, CacheBody::passthrough(body)))
}

/// What `call` already worked out about a request it could not answer at once.
struct Prepared {
    primary: CacheKey,
    request_cc: CacheControl,
    /// Why the cache cannot answer (and the stale entry, if one is stored), when the
    /// lookup has run; `None` when it would have had to wait and must run in the
    /// future.
    known: Option<(MissKind, Option<Arc<CachedResponse>>)>,
}

/// What a lookup gives the request.
enum Answer<B> {
    /// A fresh stored response.
    Hit(Response<CacheBody<B>>),
    /// A stale one within its `stale-while-revalidate` window: served now, refreshed
    /// in the background.
    Refresh(Response<CacheBody<B>>, Arc<CachedResponse>),
    /// Nothing usable; the stale entry, if any, for revalidation and
    /// `stale-if-error`.
    Miss(MissKind, Option<Arc<CachedResponse>>),
}

async fn handle<S, ReqBody, ResBody>(
    inner: S,
    cache: HybridCache,
    settings: Arc<RouteSettings>,
    request: Request<ReqBody>,
    prepared: Prepared,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    let Prepared {
        primary,
        request_cc,
        known,
    } = prepared;
    let ask = Ask::new(&cache, &settings, &primary, &request_cc);
    let (miss, stale) = match known {
        Some(known) => known,
        None => match ask.serve(&RequestHead::of(&request)).await {
            Answer::Hit(response) => return Ok(response),
            Answer::Refresh(response, stale) => {
                spawn_refresh(
                    inner,
                    cache.clone(),
                    Arc::clone(&settings),
                    (primary, request_cc.clone()),
                    request,
                    stale,
                );
                return Ok(response);
            }
            Answer::Miss(miss, stale) => (miss, stale),
        },
    };
    if ask.honour && request_cc.only_if_cached {
        return Ok(only_if_cached_miss(&cache, &settings, miss));
    }
    if request.method() == Method::HEAD || ask.must_forward() {
        // A HEAD response has no body to store; a forced forward does not wait for
        // others' fetches.
        return Box::pin(forward(inner, &ask, request, miss, None, stale)).await;
    }
    let guard = match cache.inner.flights.join(primary) {
        Flight::Leader(mut guard) => {
            if let Some(ttl) = cache.inner.fill_lease {
                match cache.inner.store.try_lease(&primary, ttl).await {
                    Lease::Taken(token) => hold_lease(&mut guard, &cache, primary, token),
                    Lease::Held => {
                        // Another replica is fetching: wait for its entry in Redis.
                        let limit = ttl.min(cache.inner.single_flight_timeout);
                        let head = RequestHead::of(&request);
                        match wait_for_replica(&ask, &head, limit).await {
                            Waited::Served(response) => {
                                cache.count(Counter::Coalesced);
                                return Ok(response);
                            }
                            Waited::Leased(token) => {
                                hold_lease(&mut guard, &cache, primary, token);
                            }
                            Waited::GaveUp => {
                                tracing::debug!(target: TARGET, key = %primary, outcome = "lease-wait-expired");
                            }
                        }
                    }
                    Lease::Unavailable => {}
                }
            }
            Some(guard)
        }
        Flight::Follower(rx) => {
            cache.count(Counter::Coalesced);
            let released = wait_for_leader(rx, cache.inner.single_flight_timeout).await;
            if let Answer::Hit(response) | Answer::Refresh(response, _) =
                ask.serve(&RequestHead::of(&request)).await
            {
                return Ok(response);
            }
            tracing::debug!(target: TARGET, key = %primary, outcome = "collapsed-miss", released);
            None
        }
    };
    // Boxed so that the future of a request that waited on a lookup stays small.
    Box::pin(forward(inner, &ask, request, miss, guard, stale)).await
}

/// Gives the fill lease back when the flight ends.
fn hold_lease(guard: &mut FlightGuard, cache: &HybridCache, key: CacheKey, token: u64) {
    let store = cache.inner.store.clone();
    guard.on_release(move || store.release_lease(key, token));
}

/// How waiting for another replica's fill ended (short-lived, on the stack once).
#[allow(clippy::large_enum_variant)]
enum Waited<B> {
    /// Its entry landed.
    Served(Response<CacheBody<B>>),
    /// It gave the lease back without an entry (not storable, failed): this replica
    /// took the lease and fetches.
    Leased(u64),
    /// Neither within the limit, or Redis stopped answering: fetch anyway.
    GaveUp,
}

/// Polls the cache (Redis first) every 10–30 ms, jittered so replicas do not poll in
/// step, until another replica's fill lands, its lease is free again, or `limit`
/// passes.
async fn wait_for_replica<ResBody>(
    ask: &Ask<'_>,
    request: &RequestHead<'_>,
    limit: Duration,
) -> Waited<ResBody> {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        let jitter = crate::cache::random_u64() % 20;
        tokio::time::sleep(Duration::from_millis(10 + jitter)).await;
        if let Answer::Hit(response) | Answer::Refresh(response, _) = ask.serve(request).await {
            return Waited::Served(response);
        }
        match ask.cache.inner.store.try_lease(ask.primary, limit).await {
            Lease::Held => {}
            Lease::Taken(token) => return Waited::Leased(token),
            Lease::Unavailable => return Waited::GaveUp,
        }
    }
    Waited::GaveUp
}

/// Refreshes a stale entry in a task the layer owns (it outlives the client's
/// request): at most one per key at a time, and at most `MAX_REFRESHES` at once.
fn spawn_refresh<S, ReqBody, ResBody>(
    inner: S,
    cache: HybridCache,
    settings: Arc<RouteSettings>,
    (primary, request_cc): (CacheKey, CacheControl),
    mut request: Request<ReqBody>,
    stale: Arc<CachedResponse>,
) where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Ok(permit) = Arc::clone(&cache.inner.refreshes).try_acquire_owned() else {
        tracing::debug!(target: TARGET, key = %primary, outcome = "refresh-skipped", detail = "too-many");
        return;
    };
    let Flight::Leader(guard) = cache.inner.flights.join(primary) else {
        return; // already being fetched
    };
    // The refresh stores a GET's response (a HEAD's has no body to store), and the
    // client's own conditions were answered from the stale entry: it asks with the
    // stored validators instead.
    *request.method_mut() = Method::GET;
    request.headers_mut().remove(IF_NONE_MATCH);
    request.headers_mut().remove(IF_MODIFIED_SINCE);
    runtime.spawn(async move {
        let _permit = permit;
        let ask = Ask::new(&cache, &settings, &primary, &request_cc);
        let refreshed = forward(
            inner,
            &ask,
            request,
            MissKind::Stale,
            Some(guard),
            Some(stale),
        );
        if let Ok(response) = Box::pin(refreshed).await {
            // Reading the body to its end is what stores it.
            let mut body = std::pin::pin!(response.into_body());
            while let Some(Ok(_)) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {}
        }
        tracing::debug!(target: TARGET, key = %primary, outcome = "refreshed");
    });
}

/// What serving from the cache needs of the request (borrowed apart from the body,
/// which need not be `Sync`).
struct RequestHead<'a> {
    headers: &'a HeaderMap,
    head: bool,
    version: Version,
}

impl<'a> RequestHead<'a> {
    fn of<B>(request: &'a Request<B>) -> Self {
        RequestHead {
            headers: request.headers(),
            head: request.method() == Method::HEAD,
            version: request.version(),
        }
    }
}

/// What a lookup needs to know of the request and route.
struct Ask<'a> {
    cache: &'a HybridCache,
    settings: &'a RouteSettings,
    primary: &'a CacheKey,
    request_cc: &'a CacheControl,
    honour: bool,
}

impl<'a> Ask<'a> {
    fn new(
        cache: &'a HybridCache,
        settings: &'a RouteSettings,
        primary: &'a CacheKey,
        request_cc: &'a CacheControl,
    ) -> Self {
        Ask {
            cache,
            settings,
            primary,
            request_cc,
            honour: settings.request_directives == RequestDirectives::Honour,
        }
    }

    /// `no-cache` and `max-age=0` must reach the origin (RFC 9111 §5.2.1).
    fn must_forward(&self) -> bool {
        self.honour && (self.request_cc.no_cache || self.request_cc.max_age == Some(0))
    }

    /// The lookup, if it completes without waiting (the memory tier's always does,
    /// but for moka's rare housekeeping hand-offs).
    fn serve_now<ResBody>(&self, request: &RequestHead<'_>) -> Option<Answer<ResBody>> {
        let lookup = std::pin::pin!(self.cache.lookup(self.primary, request.headers));
        match lookup.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(found) => Some(self.respond(found, request)),
            Poll::Pending => None,
        }
    }

    /// A response from the cache, or why there is none.
    async fn serve<ResBody>(&self, request: &RequestHead<'_>) -> Answer<ResBody> {
        let found = self.cache.lookup(self.primary, request.headers).await;
        self.respond(found, request)
    }

    fn respond<ResBody>(&self, found: Lookup, request: &RequestHead<'_>) -> Answer<ResBody> {
        let (entry, tier) = match found {
            Lookup::Hit(entry, tier) => (entry, tier),
            Lookup::Miss(miss) => return Answer::Miss(miss, None),
        };
        let now = SystemTime::now();
        let fresh = entry.is_fresh(now);
        let allowed = !self.honour || {
            let too_old = self
                .request_cc
                .max_age
                .is_some_and(|max| entry.age(now).as_secs() > max);
            let too_close = self
                .request_cc
                .min_fresh
                .is_some_and(|min| entry.time_to_live(now).as_secs() < min);
            !(too_old || too_close)
        };
        if !fresh {
            if allowed
                && entry.may_serve_while_revalidating(now)
                && !has_origin_preconditions(request.headers)
            {
                self.cache.count(Counter::Hit);
                tracing::debug!(target: TARGET, key = %self.primary, outcome = "hit", detail = "stale-while-revalidate");
                let response = stale_response(
                    &entry,
                    (request.head, request.version),
                    now,
                    (self.settings, self.cache),
                    "detail=stale-while-revalidate",
                );
                return Answer::Refresh(response, entry);
            }
            return Answer::Miss(MissKind::Stale, Some(entry));
        }
        if !allowed || has_origin_preconditions(request.headers) {
            return Answer::Miss(MissKind::Request, None);
        }
        // Only a stored 200 is a representation the conditions can be about.
        let not_modified = entry.status == StatusCode::OK
            && is_not_modified(request.headers, &entry.headers, entry.stored_at);
        self.cache.count(Counter::Hit);
        tracing::debug!(target: TARGET, key = %self.primary, outcome = "hit", detail = tier.as_str(), not_modified);
        Answer::Hit(hit_response(
            &entry,
            HitStatus::Fresh(tier),
            Served {
                head: request.head,
                not_modified,
                version: request.version,
            },
            now,
            self.settings,
            self.cache,
        ))
    }
}

/// How a hit is answered.
struct Served {
    /// A HEAD request: no body.
    head: bool,
    /// The request's conditions matched: 304 Not Modified.
    not_modified: bool,
    version: Version,
}

/// The fields a 304 carries from the stored response (RFC 9110 §15.4.5).
const NOT_MODIFIED_FIELDS: [HeaderName; 6] = [
    http::header::CACHE_CONTROL,
    http::header::CONTENT_LOCATION,
    http::header::DATE,
    http::header::ETAG,
    http::header::EXPIRES,
    http::header::VARY,
];

/// What a response from the cache says in `Cache-Status`.
enum HitStatus<'a> {
    /// A fresh hit from this tier: `hit; ttl=…; detail=…`.
    Fresh(Tier),
    /// Anything else, given whole after the cache's name.
    Said(&'a str),
}

fn hit_response<B>(
    entry: &CachedResponse,
    status: HitStatus<'_>,
    served: Served,
    now: SystemTime,
    settings: &RouteSettings,
    cache: &HybridCache,
) -> Response<CacheBody<B>> {
    let body = if served.head || served.not_modified {
        CacheBody::empty()
    } else {
        CacheBody::full(entry.body.clone())
    };
    let mut response = Response::new(body);
    *response.version_mut() = served.version;
    if served.not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        let headers = response.headers_mut();
        for name in NOT_MODIFIED_FIELDS {
            for value in entry.headers.get_all(&name) {
                headers.append(name.clone(), value.clone());
            }
        }
    } else {
        *response.status_mut() = entry.status;
        *response.headers_mut() = entry.headers.clone();
    }
    let headers = response.headers_mut();
    if settings.age_header {
        headers.insert(AGE, HeaderValue::from(entry.age(now).as_secs()));
    }
    if settings.cache_status_header {
        let value = match status {
            HitStatus::Fresh(tier) => {
                // Written by hand, in one allocation: this runs on every hit.
                let name = cache.inner.cache_status_name.as_bytes();
                let ttl = entry.time_to_live(now).as_secs().to_string();
                let detail = tier.as_str().as_bytes();
                let mut value = Vec::with_capacity(name.len() + ttl.len() + detail.len() + 24);
                value.extend_from_slice(name);
                value.extend_from_slice(b"; hit; ttl=");
                value.extend_from_slice(ttl.as_bytes());
                value.extend_from_slice(b"; detail=");
                value.extend_from_slice(detail);
                HeaderValue::from_maybe_shared(Bytes::from(value)).ok()
            }
            HitStatus::Said(params) => status_value(cache, params),
        };
        if let Some(value) = value {
            headers.append(CACHE_STATUS, value);
        }
    }
    response
}

/// A stale entry served whole (within its `stale-while-revalidate` or
/// `stale-if-error` window); `Cache-Status` gives how long it has been stale and why.
fn stale_response<B>(
    entry: &CachedResponse,
    (head, version): (bool, Version),
    now: SystemTime,
    (settings, cache): (&RouteSettings, &HybridCache),
    why: &str,
) -> Response<CacheBody<B>> {
    let served = Served {
        head,
        not_modified: false,
        version,
    };
    let stale_for = now
        .duration_since(entry.fresh_until)
        .unwrap_or_default()
        .as_secs();
    let status = format!("hit; ttl=-{stale_for}; {why}");
    hit_response(
        entry,
        HitStatus::Said(&status),
        served,
        now,
        settings,
        cache,
    )
}

/// Statuses that let a stale entry be served instead (RFC 5861 §4: an error).
fn is_origin_error(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// Fields a 304 may not change in the stored response (RFC 9111 §3.2): they describe
/// the stored body.
const KEPT_ON_304: [HeaderName; 4] = [
    http::header::CONTENT_LENGTH,
    http::header::CONTENT_ENCODING,
    http::header::CONTENT_RANGE,
    http::header::CONTENT_TYPE,
];

/// The stored response updated by a 304 (RFC 9111 §4.3.4): its fields replace the
/// stored ones of the same name; freshness is worked out again. `None` when the
/// updated response may no longer be stored.
fn refreshed_by_304(
    stale: &CachedResponse,
    not_modified: &HeaderMap,
    facts: RequestFacts,
    settings: &RouteSettings,
    response_time: SystemTime,
) -> Option<CachedResponse> {
    let mut headers = stale.headers.clone();
    let updates = storable_headers(not_modified);
    for name in updates.keys() {
        if KEPT_ON_304.contains(name) {
            continue;
        }
        headers.remove(name);
        for value in updates.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let plan = store_plan(facts, stale.status, &headers, settings, response_time).ok()?;
    Some(
        CachedResponse::builder(stale.status, headers, stale.body.clone())
            .version(stale.version)
            .times(&plan)
            .vary(stale.vary.clone())
            .tags(stale.tags.clone())
            .build(),
    )
}

/// Sends the request to the origin and, when the response may be stored, tees its
/// body into the store. With a stale entry: asks with its validators (when the client
/// set none) and takes a 304 as a refresh of it; serves it when the origin fails
/// within its `stale-if-error` window.
async fn forward<S, ReqBody, ResBody>(
    mut inner: S,
    ask: &Ask<'_>,
    mut request: Request<ReqBody>,
    miss: MissKind,
    guard: Option<FlightGuard>,
    stale: Option<Arc<CachedResponse>>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    let cache = ask.cache;
    let settings = ask.settings;
    let storing = request.method() == Method::GET;
    let facts = RequestFacts {
        has_authorization: request.headers().contains_key(AUTHORIZATION),
        no_store: ask.request_cc.no_store,
        request_time: Some(SystemTime::now()),
    };
    // The request's values of the response's `Vary` names are known only once the
    // response is in; keep the headers for that, on the miss path only.
    let request_headers = storing.then(|| request.headers().clone());
    let revalidating = match &stale {
        Some(entry) if storing => add_validators(request.headers_mut(), entry),
        _ => false,
    };
    let served_as = (request.method() == Method::HEAD, request.version());
    let since = cache.inner.invalidations.now();
    // Counted as a miss once the origin answered, unless a stale entry is served in
    // its place: that is a hit (as its `Cache-Status` says), not both.
    let response = match inner.call(request).await {
        Ok(response) => response,
        Err(error) => {
            return match stale_on_error(ask, stale.as_deref(), served_as, "error") {
                Some(response) => Ok(response),
                None => {
                    cache.count(Counter::Miss);
                    Err(error)
                }
            };
        }
    };
    let response_time = SystemTime::now();
    if is_origin_error(response.status()) {
        let status = response.status().as_u16().to_string();
        if let Some(response) = stale_on_error(ask, stale.as_deref(), served_as, &status) {
            return Ok(response);
        }
    }
    cache.count(Counter::Miss);
    if revalidating && response.status() == StatusCode::NOT_MODIFIED {
        if let Some(entry) = stale.as_deref() {
            return Ok(revalidated(
                ask,
                entry,
                response.headers(),
                (facts, response_time, since),
                served_as,
                guard,
            ));
        }
    }
    let (mut parts, body) = response.into_parts();
    // The handler's overrides and the tag header are for the cache, not the client.
    let overrides = parts.extensions.remove::<CacheOverrides>();
    let mut tags = response_tags(&mut parts.headers, settings);
    for tag in overrides.iter().flat_map(|o| &o.tags) {
        if tags.len() < MAX_TAGS && !tags.contains(tag) {
            tags.push(tag.clone());
        }
    }
    let overridden;
    let settings = match overrides.as_ref().and_then(|o| o.ttl) {
        Some(ttl) => {
            overridden = RouteSettings {
                ttl: Some(ttl),
                ttl_mode: TtlMode::Override,
                ..settings.clone()
            };
            &overridden
        }
        None => settings,
    };
    let fwd = format!(
        "fwd={}; fwd-status={}",
        miss.as_str(),
        parts.status.as_u16()
    );

    let plan = match request_headers {
        None => None,
        Some(request_headers) => {
            let plan = store_plan(facts, parts.status, &parts.headers, settings, response_time)
                .map(|plan| with_windows(plan, overrides.as_ref()))
                .and_then(|plan| {
                    if body.size_hint().lower() > settings.max_body_bytes as u64 {
                        Err(NotStored::TooLarge)
                    } else {
                        Ok(plan)
                    }
                });
            Some(plan.map(|plan| (plan, request_headers)))
        }
    };
    let (status, body) = match plan {
        None => (fwd, CacheBody::passthrough(body)),
        Some(Err(reason)) => {
            cache.count(Counter::NotStored);
            tracing::debug!(target: TARGET, key = %ask.primary, outcome = "not-stored", detail = reason.as_str());
            (
                format!("{fwd}; detail={}", reason.as_str()),
                CacheBody::passthrough(body),
            )
        }
        Some(Ok((plan, request_headers))) => {
            let vary = plan
                .vary
                .iter()
                .map(|name| {
                    let value = request_headers
                        .contains_key(name)
                        .then(|| Bytes::from(normalised_value(&request_headers, name)));
                    (name.clone(), value)
                })
                .collect();
            let entry = CachedResponse::builder(
                parts.status,
                storable_headers(&parts.headers),
                Bytes::new(),
            )
            .version(parts.version)
            .times(&plan)
            .vary(vary)
            .tags(tags)
            .build();
            let capture = Capture {
                cache: cache.clone(),
                key: *ask.primary,
                entry,
                max_bytes: settings.max_body_bytes,
                chunks: Vec::new(),
                len: 0,
                guard,
                since,
                started: facts.request_time.unwrap_or(response_time),
            };
            let body = if body.is_end_stream() {
                // Nothing to read (a 204, an empty body): a server may never poll it,
                // so store now.
                capture.finish();
                CacheBody::passthrough(body)
            } else {
                CacheBody::capturing(body, capture)
            };
            (format!("{fwd}; stored"), body)
        }
    };
    if settings.cache_status_header {
        if let Some(value) = status_value(cache, &status) {
            parts.headers.append(CACHE_STATUS, value);
        }
    }
    Ok(Response::from_parts(parts, body))
}

/// The tags in the route's tag header (separated by spaces or commas), which is
/// removed unless the route keeps it.
fn response_tags(headers: &mut HeaderMap, settings: &RouteSettings) -> Vec<String> {
    let Some(name) = &settings.tag_header else {
        return Vec::new();
    };
    let mut tags: Vec<String> = Vec::new();
    for value in headers.get_all(name) {
        let Ok(text) = value.to_str() else {
            continue;
        };
        for tag in text.split([' ', ',']).filter(|tag| is_valid_tag(tag)) {
            if tags.len() < MAX_TAGS && !tags.iter().any(|t| t == tag) {
                tags.push(tag.to_owned());
            }
        }
    }
    if let Some(name) = settings.hidden_tag_header() {
        headers.remove(name);
    }
    tags
}

/// The handler's stale windows, in place of the response's and the route's.
fn with_windows(mut plan: StorePlan, overrides: Option<&CacheOverrides>) -> StorePlan {
    let Some(overrides) = overrides else {
        return plan;
    };
    let after = |window: Duration| {
        plan.fresh_until
            .checked_add(window)
            .unwrap_or(plan.fresh_until)
    };
    if let Some(window) = overrides.stale_while_revalidate {
        plan.swr_until = after(window);
    }
    if let Some(window) = overrides.stale_if_error {
        plan.sie_until = after(window);
    }
    plan.stale_until = plan.stale_until.max(plan.swr_until).max(plan.sie_until);
    plan
}

/// Puts the stored validators on a request the client made unconditional; `true` if
/// there were any.
fn add_validators(headers: &mut HeaderMap, entry: &CachedResponse) -> bool {
    if headers.contains_key(IF_NONE_MATCH) || headers.contains_key(IF_MODIFIED_SINCE) {
        return false;
    }
    let mut added = false;
    if let Some(etag) = entry.headers.get(ETAG) {
        headers.insert(IF_NONE_MATCH, etag.clone());
        added = true;
    }
    if let Some(modified) = entry.headers.get(LAST_MODIFIED) {
        headers.insert(IF_MODIFIED_SINCE, modified.clone());
        added = true;
    }
    added
}

/// The stale entry, when the origin failed (`why`: `error` or the status) within its
/// `stale-if-error` window.
fn stale_on_error<B>(
    ask: &Ask<'_>,
    stale: Option<&CachedResponse>,
    served_as: (bool, Version),
    why: &str,
) -> Option<Response<CacheBody<B>>> {
    let now = SystemTime::now();
    let entry = stale.filter(|entry| entry.may_serve_on_error(now))?;
    ask.cache.count(Counter::Hit);
    tracing::debug!(target: TARGET, key = %ask.primary, outcome = "hit", detail = "stale-if-error", origin = why);
    Some(stale_response(
        entry,
        served_as,
        now,
        (ask.settings, ask.cache),
        &format!("fwd=stale; fwd-status={why}; detail=stale-if-error"),
    ))
}

/// The origin said the stale entry is still good (304): store it refreshed and serve
/// it whole (the client's request had no conditions of its own).
fn revalidated<B>(
    ask: &Ask<'_>,
    stale: &CachedResponse,
    not_modified: &HeaderMap,
    (facts, response_time, since): (RequestFacts, SystemTime, u64),
    served_as: (bool, Version),
    guard: Option<FlightGuard>,
) -> Response<CacheBody<B>> {
    let cache = ask.cache;
    let refreshed = refreshed_by_304(stale, not_modified, facts, ask.settings, response_time);
    let (entry, note) = match refreshed {
        Some(entry) => (entry, "stored"),
        None => (stale.clone(), "detail=not-stored"),
    };
    let served = Served {
        head: served_as.0,
        not_modified: false,
        version: served_as.1,
    };
    let status = format!("fwd=stale; fwd-status=304; {note}");
    let response = hit_response(
        &entry,
        HitStatus::Said(&status),
        served,
        response_time,
        ask.settings,
        cache,
    );
    if note == "stored" {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (cache, key) = (cache.clone(), *ask.primary);
            runtime.spawn(async move {
                let invalidations = &cache.inner.invalidations;
                if invalidations.since(&key, &entry.tags, since).await {
                    cache.count(Counter::NotStored);
                    return;
                }
                let tags = entry.tags.clone();
                let started = facts.request_time.unwrap_or(response_time);
                cache.store(key, entry, started).await;
                if invalidations.since(&key, &tags, since).await {
                    cache.inner.store.invalidate(&key, &cache.inner.counters).await;
                    cache.count(Counter::NotStored);
                    return;
                }
                cache.count(Counter::Store);
                tracing::debug!(target: TARGET, key = %key, outcome = "stored", detail = "revalidated");
                drop(guard);
            });
        }
    }
    response
}

/// `504` for `only-if-cached` when nothing usable is stored (RFC 9111 §5.2.1.7).
fn only_if_cached_miss<B>(
    cache: &HybridCache,
    settings: &RouteSettings,
    miss: MissKind,
) -> Response<CacheBody<B>> {
    let mut response = Response::new(CacheBody::empty());
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    if settings.cache_status_header {
        if let Some(value) = status_value(
            cache,
            &format!("fwd={}; detail=only-if-cached", miss.as_str()),
        ) {
            response.headers_mut().append(CACHE_STATUS, value);
        }
    }
    response
}

/// The headers worth storing: all but hop-by-hop fields, those `Connection` names,
/// and `Age` (recomputed on every hit).
fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut stored = headers.clone();
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().copied() {
        stored.remove(name);
    }
    for name in named {
        stored.remove(name);
    }
    stored.remove(AGE);
    stored
}

fn status_value(cache: &HybridCache, params: &str) -> Option<HeaderValue> {
    HeaderValue::try_from(format!("{}; {params}", cache.inner.cache_status_name)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_not_stored() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("close, x-private-hop"),
        );
        headers.insert("x-private-hop", HeaderValue::from_static("1"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("age", HeaderValue::from_static("5"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        let stored = storable_headers(&headers);
        assert_eq!(stored.len(), 1);
        assert!(stored.contains_key("content-type"));
    }
}
