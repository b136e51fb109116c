//! Stale entries: stale-while-revalidate (RFC 5861, directive or route setting) with a
//! background refresh the layer owns, stale-if-error, and revalidation with the
//! stored validators (RFC 9111 §4.3), through the layer against a real origin.
//!
//! Freshness is in whole seconds of the wall clock, so each test stores a response
//! with `max-age=1` and polls (with a deadline) until the cache treats it as stale.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http::{HeaderMap, Response, StatusCode};
use support::{call, eventually, get, Got, Origin};
use tower_hybrid_cache::{HybridCache, HybridCacheLayer};

const WAIT: Duration = Duration::from_secs(10);

async fn new_cache() -> HybridCache {
    HybridCache::builder().build().await.unwrap()
}

/// Polls `url` until the cache no longer serves it fresh (the first such response is
/// returned).
async fn until_stale(app: &Router, url: &str) -> Got {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let response = call(app.clone(), get(url)).await;
        let status = response.cache_status();
        if !status.contains("; hit; ttl=") || status.contains("ttl=-") {
            return response;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still fresh after {WAIT:?}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once_in_the_background() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = origin.router().layer(cache.layer());
    // Every origin call waits at the gate: the first is let through at once.
    let url =
        "http://api.test/swr?gate=1&h=cache-control:max-age%3D1,%20stale-while-revalidate%3D60";
    origin.gate.add_permits(1);
    let first = call(app.clone(), get(url)).await;
    assert!(first.text().ends_with("#1"));
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;

    // Stale now: served at once from the cache although the origin is held at the
    // gate, and refreshed by one background call however many requests come.
    let stale = until_stale(&app, url).await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.body, first.body);
    assert!(
        stale
            .cache_status()
            .contains("detail=stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    for _ in 0..5 {
        let again = call(app.clone(), get(url)).await;
        assert_eq!(again.body, first.body);
    }
    eventually("the refresh to reach the origin", WAIT, || async {
        origin.log.calls() == 2
    })
    .await;
    assert_eq!(origin.log.calls(), 2, "one refresh for all the stale hits");

    origin.gate.add_permits(1);
    eventually("the refreshed entry", WAIT, || async {
        let got = call(app.clone(), get(url)).await;
        got.text().ends_with("#2") && !got.cache_status().contains("ttl=-")
    })
    .await;
}

#[tokio::test]
async fn the_route_setting_grants_the_window_unless_the_origin_forbids_stale() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let layer = || {
        cache
            .layer()
            .stale_while_revalidate(Duration::from_secs(60))
    };
    let app = origin.router().layer(layer());
    let url = "http://api.test/route?h=cache-control:max-age%3D1";
    call(app.clone(), get(url)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    let stale = until_stale(&app, url).await;
    assert!(
        stale.cache_status().contains("stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );

    // must-revalidate: a stale entry is never served.
    let strict = "http://api.test/strict?h=cache-control:max-age%3D1,%20must-revalidate";
    call(app.clone(), get(strict)).await;
    eventually("stored", WAIT, || async { cache.stats().stores >= 2 }).await;
    let stale = until_stale(&app, strict).await;
    assert!(!stale.is_hit(), "{}", stale.cache_status());
    assert!(!stale.cache_status().contains("stale-while-revalidate"));
}

/// An origin whose status can be switched, and that can fail outright.
#[derive(Clone, Default)]
struct Flaky {
    calls: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
}

impl Flaky {
    fn layered(&self, layer: HybridCacheLayer) -> Router {
        let flaky = self.clone();
        let service = tower::service_fn(move |_request: http::Request<Body>| {
            let flaky = flaky.clone();
            async move {
                let n = flaky.calls.fetch_add(1, Ordering::SeqCst) + 1;
                match flaky.status.load(Ordering::SeqCst) {
                    0 => Err(std::io::Error::other("origin down")),
                    status => Ok::<_, std::io::Error>(
                        Response::builder()
                            .status(status)
                            .header("cache-control", "max-age=1, stale-if-error=60")
                            .body(Body::from(format!("report #{n}")))
                            .unwrap(),
                    ),
                }
            }
        });
        let service = tower::ServiceExt::map_err(
            tower::ServiceBuilder::new().layer(layer).service(service),
            |e: std::io::Error| -> Infallible {
                panic!("the origin failed through the cache: {e}")
            },
        );
        Router::new().fallback_service(service)
    }
}

#[tokio::test]
async fn stale_if_error_serves_the_stale_entry_when_the_origin_fails() {
    let cache = new_cache().await;
    let flaky = Flaky::default();
    flaky.status.store(200, Ordering::SeqCst);
    let app = flaky.layered(cache.layer());
    let url = "http://api.test/report";
    let first = call(app.clone(), get(url)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;

    for (status, why) in [(503, "503"), (500, "500"), (0, "error")] {
        flaky.status.store(status, Ordering::SeqCst);
        let got = until_stale(&app, url).await;
        assert_eq!(got.status, StatusCode::OK, "{why}");
        assert_eq!(got.body, first.body, "{why}");
        assert!(
            got.cache_status().contains(&format!(
                "fwd=stale; fwd-status={why}; detail=stale-if-error"
            )),
            "{}",
            got.cache_status()
        );
    }
    // Served in the origin's place: counted as a hit (as Cache-Status says), not as a
    // miss too.
    let before = cache.stats();
    let got = call(app.clone(), get(url)).await;
    assert!(got.cache_status().contains("detail=stale-if-error"));
    let after = cache.stats();
    assert_eq!((after.hits, after.misses), (before.hits + 1, before.misses));
    // A 404 is an answer, not an error: it goes through.
    flaky.status.store(404, Ordering::SeqCst);
    let before = cache.stats();
    let got = call(app.clone(), get(url)).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(cache.stats().misses, before.misses + 1);
}

#[tokio::test]
async fn without_a_window_a_stale_entry_is_refetched_not_served() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = origin.router().layer(cache.layer());
    let url = "http://api.test/plain?h=cache-control:max-age%3D1";
    call(app.clone(), get(url)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    // Neither the response nor the route grants a stale window: once stale, the
    // entry is refetched, never served.
    let stale = until_stale(&app, url).await;
    assert!(!stale.is_hit(), "{}", stale.cache_status());
    assert_eq!(origin.log.calls(), 2);
}

/// An origin with an ETag that answers conditional requests.
#[derive(Clone, Default)]
struct Versioned {
    etag: Arc<Mutex<String>>,
    max_age: Arc<AtomicU16>,
    full: Arc<AtomicUsize>,
    not_modified: Arc<AtomicUsize>,
}

impl Versioned {
    fn router(&self, cache: &HybridCache) -> Router {
        let origin = self.clone();
        let handler = move |headers: HeaderMap| {
            let origin = origin.clone();
            async move {
                let etag = origin.etag.lock().unwrap().clone();
                let cache_control = format!("max-age={}", origin.max_age.load(Ordering::SeqCst));
                let matches = headers
                    .get("if-none-match")
                    .is_some_and(|v| v.to_str().unwrap() == etag);
                let mut response = if matches {
                    origin.not_modified.fetch_add(1, Ordering::SeqCst);
                    let mut r = Response::new(Body::empty());
                    *r.status_mut() = StatusCode::NOT_MODIFIED;
                    r
                } else {
                    let n = origin.full.fetch_add(1, Ordering::SeqCst) + 1;
                    Response::new(Body::from(format!("document {etag} #{n}")))
                };
                let h = response.headers_mut();
                h.insert("etag", etag.parse().unwrap());
                h.insert("cache-control", cache_control.parse().unwrap());
                response
            }
        };
        Router::new()
            .route("/doc", axum::routing::get(handler))
            .layer(cache.layer())
    }
}

#[tokio::test]
async fn a_stale_entry_is_revalidated_a_200_replaces_it_and_a_304_refreshes_it() {
    let cache = new_cache().await;
    let origin = Versioned::default();
    *origin.etag.lock().unwrap() = "\"v1\"".to_owned();
    origin.max_age.store(1, Ordering::SeqCst);
    let app = origin.router(&cache);
    let url = "http://api.test/doc";
    call(app.clone(), get(url)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;

    // A changed document: asked with "v1", the origin answers 200 with v2, which
    // replaces the entry.
    *origin.etag.lock().unwrap() = "\"v2\"".to_owned();
    let replaced = until_stale(&app, url).await;
    assert_eq!(replaced.text(), "document \"v2\" #2");
    assert!(replaced
        .cache_status()
        .contains("fwd=stale; fwd-status=200; stored"));
    eventually("v2 stored", WAIT, || async { cache.stats().stores == 2 }).await;

    // Unchanged, but the 304 changes Cache-Control: the entry is refreshed with the
    // new headers and is fresh for two minutes, with the stored body.
    origin.max_age.store(120, Ordering::SeqCst);
    let revalidated = until_stale(&app, url).await;
    assert_eq!(revalidated.status, StatusCode::OK);
    assert_eq!(
        revalidated.body, replaced.body,
        "the stored body, not refetched"
    );
    assert!(
        revalidated
            .cache_status()
            .contains("fwd=stale; fwd-status=304; stored"),
        "{}",
        revalidated.cache_status()
    );
    assert_eq!(origin.not_modified.load(Ordering::SeqCst), 1);
    assert_eq!(origin.full.load(Ordering::SeqCst), 2);
    eventually("the refreshed entry", WAIT, || async {
        let got = call(app.clone(), get(url)).await;
        got.is_hit() && got.headers["cache-control"] == "max-age=120"
    })
    .await;
    let hit = call(app.clone(), get(url)).await;
    assert!(hit.ttl().unwrap() > 60, "{}", hit.cache_status());
}
