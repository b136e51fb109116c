//! A tower middleware that caches HTTP responses as a correct shared cache
//! (RFC 9111). Entries are shared across replicas through Redis
//! ([fred](https://docs.rs/fred)), behind a circuit breaker, one deadline and budgeted
//! retries, with a bounded in-process tier ([quick_cache](https://docs.rs/quick_cache))
//! that answers when Redis cannot (or alone, without Redis).
//!
//! Build one [`HybridCache`] per process, then put a [`HybridCacheLayer`] on each
//! route (or a whole router) with that route's settings:
//!
//! ```
//! use std::time::Duration;
//! use axum::{body::Body, routing::get, Router};
//! use http::Request;
//! use tower::ServiceExt;
//! use tower_hybrid_cache::HybridCache;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = HybridCache::builder().memory_capacity_bytes(64 << 20).build().await?;
//! let app = Router::new().route(
//!     "/jobs/{id}",
//!     get(|| async { "a job" }).layer(cache.layer().ttl(Duration::from_secs(300))),
//! );
//!
//! let response = app.oneshot(Request::get("/jobs/42").body(Body::empty())?).await?;
//! let status = response.headers()["cache-status"].to_str()?;
//! assert_eq!(status, "tower-hybrid-cache; fwd=uri-miss; fwd-status=200; stored");
//! # Ok(())
//! # }
//! ```
//!
//! What is stored and for how long follows RFC 9111 for a shared cache: only GET
//! (HEAD is answered from the GET entry), never `no-store`, `private`, `Set-Cookie`,
//! `Vary: *`, or a response to a request with `Authorization` unless the response
//! allows it; freshness from `s-maxage`, `max-age`, `Expires`, `Date` and `Age`, with
//! the route TTL where the origin says nothing. Every response says what the cache
//! did in `Cache-Status` (RFC 9211), and every hit carries `Age`.
//!
//! With `HybridCacheBuilder::redis_url`, reads go to Redis first and to memory when
//! Redis errs, times out or is known to be down (lookups of one key that arrive while
//! a read of it is on its way share the next read); writes go to memory at once and to
//! Redis in the background. Building never waits on Redis for longer than its connect
//! timeout, and never fails because Redis is down.
//!
//! Stale entries are revalidated with their validators, served at once while a
//! background refresh runs (`stale-while-revalidate`) or when the origin fails
//! (`stale-if-error`). A successful POST, PUT, PATCH or DELETE through the layer
//! invalidates what it made out of date (RFC 9111 §4.4); responses can carry tags
//! (a `Cache-Tag` header or [`CacheOverrides`]) for [`HybridCache::invalidate_tag`],
//! and [`HybridCache::purge_all`] forgets everything, on every replica sharing the
//! Redis.
//!
//! The layer needs a tokio runtime: a store that cannot finish at once (a `Vary`
//! index, the invalidation tables) goes on in a task, and Redis writes are a background
//! task's, so the client never waits for them.
//!
//! The crate root holds what most applications type; the rest is by area:
//! [`layer`] (the middleware and its types), [`store`] (what a layer of yours on the
//! Redis tier sees, and Redis's settings and health), [`breaker`] (the circuit breaker,
//! a generic tower layer), [`entry`] (the stored response and its format), [`key`]
//! (cache keys) and [`error`].

#![cfg_attr(docsrs, feature(doc_cfg))]

mod cache;
mod engine;
mod policy;
mod random;
mod telemetry;

pub mod breaker;
pub mod entry;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod key;
pub mod layer;
pub mod store;

pub use cache::{HybridCache, HybridCacheBuilder};
pub use error::BuildError;
pub use layer::{CacheOverrides, HybridCacheLayer, KeyAuthority, RequestDirectives, TtlMode};
pub use store::RedisConfig;
pub use telemetry::CacheStats;

/// The README's examples, compiled as doc tests so they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[doc(hidden)]
pub mod __bench {
    //! Internals exposed for the benchmarks only; not part of the API.

    use http::{HeaderMap, Method, Uri};

    /// Parses a `Cache-Control` value.
    pub fn parse_cache_control(value: &str) -> impl std::fmt::Debug {
        crate::policy::cache_control::CacheControl::parse(value)
    }

    /// Derives the primary key of a GET with every parameter kept.
    pub fn primary_key(uri: &Uri, headers: &HeaderMap) -> crate::key::CacheKey {
        crate::key::CacheKey::primary(&Method::GET, uri, headers, &Default::default())
    }
}
