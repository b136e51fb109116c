//! [`HybridCacheLayer`]: one route's settings, and the middleware it builds.
//!
//! The request path, a file per job: [`HybridCacheService`] classifies each request
//! (`service`); a cacheable one is served from the cache (`serve`, responses built in
//! `response`, `Cache-Status` typed in `status`) or filled from the origin through
//! single-flight and the fill lease (`fill`), whose call, stale-if-error and 304
//! handling are in `origin`; a `QUERY` has its content read and keyed first
//! (`query`); a write invalidates what it changed (`write`). Bodies being stored are
//! teed by [`CacheBody`]; the wrapped service receives [`RequestBody`]; tags come
//! from `tags`, handler settings from [`CacheOverrides`].

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower::Layer;

use crate::engine::Engine;
use crate::key::CacheKey;
use crate::policy::settings::{self, NamePattern, QueryFilter, RouteSettings};

mod body;
mod fill;
mod future;
mod origin;
mod overrides;
mod query;
mod request_body;
mod response;
mod serve;
mod service;
mod status;
mod tags;
mod write;

pub use crate::policy::{KeyAuthority, RequestDirectives, TtlMode};
pub use body::CacheBody;
pub use future::ResponseFuture;
pub use overrides::CacheOverrides;
pub use request_body::{BodyError, RequestBody};
pub use service::HybridCacheService;

/// Caches the responses of the service it wraps, with one route's settings, in a
/// [`HybridCache`](crate::HybridCache).
///
/// Made by [`HybridCache::layer`](crate::HybridCache::layer); every builder method
/// takes and returns the layer.
/// Clones share the cache and the settings.
///
/// ```
/// use std::time::Duration;
/// use axum::{body::Body, routing::get, Router};
/// use http::Request;
/// use tower::ServiceExt;
/// use tower_hybrid_cache::{HybridCache, TtlMode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cache = HybridCache::builder().build().await?;
/// let layer = cache
///     .layer()
///     .ttl(Duration::from_secs(30))
///     .ttl_mode(TtlMode::Fallback)
///     .ignore_query_params(["utm_*"]);
/// let app = Router::new().route("/jobs/search", get(|| async { "results" }).layer(layer));
///
/// let request = || Request::get("http://api.example/jobs/search?q=rust&utm_source=mail").body(Body::empty());
/// let first = app.clone().oneshot(request()?).await?;
/// assert!(first.headers()["cache-status"].to_str()?.contains("fwd=uri-miss"));
/// // The entry is stored once the body has been read, off the response path.
/// axum::body::to_bytes(first.into_body(), usize::MAX).await?;
/// # while cache.stats().stores == 0 { tokio::task::yield_now().await; }
/// let second = app.oneshot(request()?).await?;
/// assert!(second.headers()["cache-status"].to_str()?.contains("hit"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[must_use]
pub struct HybridCacheLayer {
    engine: Arc<Engine>,
    settings: Arc<RouteSettings>,
}

impl std::fmt::Debug for HybridCacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridCacheLayer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl HybridCacheLayer {
    /// The largest body a route stores unless set: 1 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = settings::DEFAULT_MAX_BODY_BYTES;
    /// The response header a route takes tags from unless set.
    pub const DEFAULT_TAG_HEADER: &'static str = settings::DEFAULT_TAG_HEADER;

    pub(crate) fn new(engine: Arc<Engine>) -> Self {
        HybridCacheLayer {
            engine,
            settings: Arc::new(RouteSettings::default()),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut RouteSettings)) -> Self {
        change(Arc::make_mut(&mut self.settings));
        self
    }

    /// Sets how long a response of this route stays fresh when the origin says nothing
    /// (or always, with [`TtlMode::Override`]). Only statuses RFC 9110 calls
    /// heuristically cacheable are stored on a route TTL alone: 200, 203, 204, 300,
    /// 301, 308, 404, 405, 410, 414, 501. Default: none.
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|s| s.ttl = Some(ttl))
    }

    /// Sets whether the origin's freshness or the route TTL wins. Default
    /// [`TtlMode::Fallback`]: the origin's.
    pub fn ttl_mode(self, mode: TtlMode) -> Self {
        self.with(|s| s.ttl_mode = mode)
    }

    /// Leaves query parameters out of the key, by name; a trailing `*` matches a prefix
    /// (`utm_*`). Replaces any earlier [`keep_query_params`](Self::keep_query_params).
    pub fn ignore_query_params<I, T>(self, names: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let patterns = patterns(names);
        self.with(|s| s.query = QueryFilter::Ignore(patterns))
    }

    /// Sets the only query parameters that count in the key, by name; a trailing `*`
    /// matches a prefix. Replaces any earlier
    /// [`ignore_query_params`](Self::ignore_query_params).
    pub fn keep_query_params<I, T>(self, names: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let patterns = patterns(names);
        self.with(|s| s.query = QueryFilter::Keep(patterns))
    }

    /// Makes request headers part of the key for every response of this
    /// route, as if the origin always sent `Vary` with them (e.g. a tenant header).
    pub fn key_headers<I>(self, names: I) -> Self
    where
        I: IntoIterator<Item = HeaderName>,
    {
        let names = names.into_iter().collect();
        self.with(|s| s.key_headers = names)
    }

    /// Sets the largest body stored. A larger one streams to the client untouched and is
    /// not stored. Default 1 MiB.
    pub fn max_body_bytes(self, bytes: usize) -> Self {
        self.with(|s| s.max_body_bytes = bytes)
    }

    /// Sets the largest `QUERY` content (RFC 10008) the route reads to key it: a
    /// `QUERY` is cached under a key that covers its content, `Content-Type` and
    /// `Content-Encoding`; a larger one (or one with trailers) passes through, read
    /// only as far as the limit and handed on whole. 0 passes every `QUERY` through.
    /// Default 64 KiB.
    pub fn max_query_bytes(self, bytes: usize) -> Self {
        self.with(|s| s.max_query_bytes = bytes)
    }

    /// Sets whether responses carry a `Cache-Status` field (RFC 9211). Default on.
    pub fn cache_status_header(self, on: bool) -> Self {
        self.with(|s| s.cache_status_header = on)
    }

    /// Sets whether hits carry an `Age` field. Default on. (RFC 9111 requires it of a
    /// cache; turn it off only behind another cache that sets it.)
    pub fn age_header(self, on: bool) -> Self {
        self.with(|s| s.age_header = on)
    }

    /// Sets how long past its freshness a response may still be served at once while a
    /// background task refreshes it, when the response itself has no
    /// `stale-while-revalidate` (RFC 5861). Not applied to responses with
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`. Default none.
    pub fn stale_while_revalidate(self, window: Duration) -> Self {
        self.with(|s| s.stale_while_revalidate = Some(window))
    }

    /// Sets how long past its freshness a response may still be served when the origin
    /// fails (an error, or a 500, 502, 503 or 504), when the response itself has no
    /// `stale-if-error` (RFC 5861). Not applied to responses with `must-revalidate`,
    /// `proxy-revalidate` or `s-maxage`. Default none.
    pub fn stale_if_error(self, window: Duration) -> Self {
        self.with(|s| s.stale_if_error = Some(window))
    }

    /// Sets the response header whose tags (separated by spaces or commas) are stored with
    /// the response, for [`HybridCache::invalidate_tag`](crate::HybridCache::invalidate_tag).
    /// Default `Cache-Tag`.
    pub fn tag_header(self, name: HeaderName) -> Self {
        self.with(|s| s.tag_header = Some(name))
    }

    /// Takes tags only from the handler's [`CacheOverrides`], never from a header.
    pub fn no_tag_header(self) -> Self {
        self.with(|s| s.tag_header = None)
    }

    /// Sets whether the tag header reaches the client (and is stored with the response).
    /// Default off: it is removed.
    pub fn keep_tag_header(self, keep: bool) -> Self {
        self.with(|s| s.keep_tag_header = keep)
    }

    /// Sets which authority the route's cache keys are made with (default: the
    /// request's URI authority, else its `Host`). Invalidation by writes and
    /// [`HybridCacheLayer::invalidate`] key the same way.
    pub fn key_authority(self, authority: KeyAuthority) -> Self {
        self.with(|s| s.key_authority = authority)
    }

    /// Sets the targeted cache-control fields (RFC 9213) the route obeys, in order of
    /// precedence: the first present that parses (a Structured Fields dictionary)
    /// replaces `Cache-Control` for this cache's decisions, and `Cache-Control` still
    /// goes to the client. Default `Tower-Hybrid-Cache-Control`; add
    /// `CDN-Cache-Control` for a cache that stands where a CDN's would; none turns
    /// them off.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use http::HeaderName;
    /// let cache = tower_hybrid_cache::HybridCache::builder().build().await?;
    /// // The handler answers `Cache-Control: max-age=0` for browsers and
    /// // `Tower-Hybrid-Cache-Control: max-age=60` for this cache.
    /// let layer = cache.layer().targeted_cache_control([
    ///     HeaderName::from_static("tower-hybrid-cache-control"),
    ///     HeaderName::from_static("cdn-cache-control"),
    /// ]);
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn targeted_cache_control<I>(self, names: I) -> Self
    where
        I: IntoIterator<Item = HeaderName>,
    {
        let names: Vec<HeaderName> = names.into_iter().collect();
        self.with(|s| s.targeted_fields = names)
    }

    /// Sets whether the targeted cache-control fields the route obeys reach the client
    /// (and are stored with the response). Default: each but
    /// `Tower-Hybrid-Cache-Control` is forwarded, as RFC 9213 §3 expects of a cache
    /// using `CDN-Cache-Control` (a cache further down may use it too); this crate's
    /// own field is for this cache alone, and removed.
    pub fn forward_targeted_cache_control(self, forward: bool) -> Self {
        self.with(|s| s.forward_targeted_fields = Some(forward))
    }

    /// Sets what to do with the client's `no-cache`, `max-age` and `min-fresh`.
    /// Default [`RequestDirectives::Ignore`]: any client could otherwise send every
    /// request to the origin and replace a fresh entry with what it asked for. Use
    /// [`RequestDirectives::Honour`] on routes whose clients you trust.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn run() -> Result<(), tower_hybrid_cache::BuildError> {
    /// use tower_hybrid_cache::{HybridCache, RequestDirectives};
    ///
    /// let cache = HybridCache::builder().build().await?;
    /// // An internal route: a client's `Cache-Control: no-cache` reaches the origin.
    /// let layer = cache.layer().request_directives(RequestDirectives::Honour);
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn request_directives(self, directives: RequestDirectives) -> Self {
        self.with(|s| s.request_directives = directives)
    }

    /// Forgets the response this route stored for `uri` (all its `Vary` variants), in
    /// both tiers, as [`HybridCache::invalidate`](crate::HybridCache::invalidate) does,
    /// but keyed with this layer's
    /// settings: its dropped or kept query parameters, and its key headers, whose
    /// values are read from `headers` (pass an empty map when the route has none).
    /// Returns `false` when Redis could not be told now.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = tower_hybrid_cache::HybridCache::builder().build().await?;
    /// let search = cache
    ///     .layer()
    ///     .ignore_query_params(["utm_*"])
    ///     .key_headers([http::HeaderName::from_static("x-tenant")]);
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("x-tenant", "acme".parse()?);
    /// // The entry stored for `?q=rust&utm_source=mail` with `x-tenant: acme`.
    /// let uri: http::Uri = "http://api.example/jobs/search?q=rust".parse()?;
    /// assert!(search.invalidate(&uri, &headers).await);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn invalidate(&self, uri: &http::Uri, headers: &http::HeaderMap) -> bool {
        let key = CacheKey::primary(&http::Method::GET, uri, headers, &self.settings);
        self.engine.invalidate_key(key).await
    }
}

fn patterns<I, T>(names: I) -> Vec<NamePattern>
where
    I: IntoIterator<Item = T>,
    T: AsRef<str>,
{
    names
        .into_iter()
        .map(|n| NamePattern::new(n.as_ref()))
        .collect()
}

impl<S> Layer<S> for HybridCacheLayer {
    type Service = HybridCacheService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HybridCacheService::new(inner, Arc::clone(&self.engine), Arc::clone(&self.settings))
    }
}
