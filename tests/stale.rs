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
use support::{call, eventually, get, get_with, Got, Origin};
use tower_hybrid_cache::{HybridCache, HybridCacheLayer, RequestDirectives};

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
    /// The `Cache-Control` of its answers; `max-age=1, stale-if-error=60` when unset.
    cache_control: Arc<Mutex<Option<&'static str>>>,
}

impl Flaky {
    fn layered(&self, layer: HybridCacheLayer) -> Router {
        let flaky = self.clone();
        let service = tower::service_fn(
            move |_request: http::Request<tower_hybrid_cache::layer::RequestBody<Body>>| {
                let flaky = flaky.clone();
                async move {
                    let n = flaky.calls.fetch_add(1, Ordering::SeqCst) + 1;
                    let cache_control = flaky
                        .cache_control
                        .lock()
                        .unwrap()
                        .unwrap_or("max-age=1, stale-if-error=60");
                    match flaky.status.load(Ordering::SeqCst) {
                        0 => Err(std::io::Error::other("origin down")),
                        status => Ok::<_, std::io::Error>(
                            Response::builder()
                                .status(status)
                                .header("cache-control", cache_control)
                                .body(Body::from(format!("report #{n}")))
                                .unwrap(),
                        ),
                    }
                }
            },
        );
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

    for (status, why) in [
        (503, "503"),
        (500, "500"),
        (502, "502"),
        (504, "504"),
        (0, "error"),
    ] {
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
    /// Adds `no-cache` to its `Cache-Control`.
    no_cache: Arc<std::sync::atomic::AtomicBool>,
}

impl Versioned {
    fn router(&self, cache: &HybridCache) -> Router {
        let origin = self.clone();
        let handler = move |headers: HeaderMap| {
            let origin = origin.clone();
            async move {
                let etag = origin.etag.lock().unwrap().clone();
                let mut cache_control =
                    format!("max-age={}", origin.max_age.load(Ordering::SeqCst));
                if origin.no_cache.load(Ordering::SeqCst) {
                    cache_control.push_str(", no-cache");
                }
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
async fn a_no_cache_response_is_stored_and_revalidated_on_every_use() {
    let cache = new_cache().await;
    let origin = Versioned::default();
    *origin.etag.lock().unwrap() = "\"v1\"".to_owned();
    // Fresh for an hour, but no-cache: never used without a successful validation.
    origin.max_age.store(3600, Ordering::SeqCst);
    origin.no_cache.store(true, Ordering::SeqCst);
    let app = origin.router(&cache);
    let url = "http://api.test/doc";
    let first = call(app.clone(), get(url)).await;
    assert!(
        first.cache_status().ends_with("stored"),
        "{}",
        first.cache_status()
    );
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    for n in 1..=3 {
        let got = call(app.clone(), get(url)).await;
        assert_eq!(got.body, first.body, "the stored body");
        assert!(
            got.cache_status().contains("fwd=stale; fwd-status=304"),
            "{}",
            got.cache_status()
        );
        assert_eq!(origin.not_modified.load(Ordering::SeqCst), n);
    }
    assert_eq!(origin.full.load(Ordering::SeqCst), 1);
    // Changed: the next use gets the new document at once.
    *origin.etag.lock().unwrap() = "\"v2\"".to_owned();
    let changed = call(app.clone(), get(url)).await;
    assert_eq!(changed.text(), "document \"v2\" #2");
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

#[tokio::test]
async fn the_route_stale_if_error_window_serves_when_the_origin_fails() {
    let cache = new_cache().await;
    let flaky = Flaky::default();
    *flaky.cache_control.lock().unwrap() = Some("max-age=1");
    flaky.status.store(200, Ordering::SeqCst);
    let app = flaky.layered(cache.layer().stale_if_error(Duration::from_secs(60)));
    let url = "http://api.test/route-sie";
    let first = call(app.clone(), get(url)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    flaky.status.store(503, Ordering::SeqCst);
    let got = until_stale(&app, url).await;
    assert_eq!(got.body, first.body);
    assert!(
        got.cache_status().contains("detail=stale-if-error"),
        "{}",
        got.cache_status()
    );
}

#[tokio::test]
async fn stale_if_error_keeps_to_the_request_s_limits_where_they_are_honoured() {
    let cache = new_cache().await;
    let flaky = Flaky::default();
    flaky.status.store(200, Ordering::SeqCst);
    let app = flaky.layered(
        cache
            .layer()
            .request_directives(tower_hybrid_cache::RequestDirectives::Honour),
    );
    let url = "http://api.test/limits";
    let first = call(app.clone(), get(url)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    flaky.status.store(503, Ordering::SeqCst);
    until_stale(&app, url).await;
    // One that takes anything up to an hour old gets the stale copy.
    let easy = call(
        app.clone(),
        get_with(url, &[("cache-control", "max-age=3600")]),
    )
    .await;
    assert_eq!(easy.body, first.body, "{}", easy.cache_status());
    assert!(easy.cache_status().contains("detail=stale-if-error"));
    // A client that wants at least 10 s of freshness gets the origin's 503, not stale.
    let picky = call(
        app.clone(),
        get_with(url, &[("cache-control", "min-fresh=10")]),
    )
    .await;
    assert_eq!(
        picky.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        picky.cache_status()
    );
}

#[tokio::test]
async fn s_maxage_turns_the_route_windows_off_but_keeps_its_own() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = origin.router().layer(
        cache
            .layer()
            .stale_while_revalidate(Duration::from_secs(60)),
    );
    // s-maxage alone: the route's window does not apply.
    let shared = "http://api.test/smax?h=cache-control:s-maxage%3D1";
    call(app.clone(), get(shared)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    let stale = until_stale(&app, shared).await;
    assert!(!stale.is_hit(), "{}", stale.cache_status());
    // s-maxage with a window of its own: that window applies.
    let granted =
        "http://api.test/smax-swr?h=cache-control:s-maxage%3D1,%20stale-while-revalidate%3D60";
    call(app.clone(), get(granted)).await;
    eventually("stored", WAIT, || async { cache.stats().stores >= 3 }).await;
    let stale = until_stale(&app, granted).await;
    assert!(
        stale
            .cache_status()
            .contains("detail=stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
}

#[tokio::test]
async fn proxy_revalidate_rules_out_every_stale_window() {
    let cache = new_cache().await;
    let flaky = Flaky::default();
    *flaky.cache_control.lock().unwrap() =
        Some("max-age=1, proxy-revalidate, stale-while-revalidate=60, stale-if-error=60");
    flaky.status.store(200, Ordering::SeqCst);
    let app = flaky.layered(
        cache
            .layer()
            .stale_while_revalidate(Duration::from_secs(60))
            .stale_if_error(Duration::from_secs(60)),
    );
    let url = "http://api.test/proxy-revalidate";
    call(app.clone(), get(url)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    // Neither served while refreshed, nor in place of an error.
    let stale = until_stale(&app, url).await;
    assert!(!stale.is_hit(), "{}", stale.cache_status());
    eventually("stored again", WAIT, || async { cache.stats().stores == 2 }).await;
    flaky.status.store(503, Ordering::SeqCst);
    let failed = until_stale(&app, url).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
}

/// A handler that grants its own stale windows (and sets the lifetime) through
/// `CacheOverrides`, over headers that grant none.
async fn overridden() -> (
    axum::Extension<tower_hybrid_cache::CacheOverrides>,
    [(&'static str, &'static str); 1],
    &'static str,
) {
    let overrides = tower_hybrid_cache::CacheOverrides::new()
        .ttl(Duration::from_secs(1))
        .stale_while_revalidate(Duration::from_secs(60));
    (
        axum::Extension(overrides),
        [("cache-control", "max-age=600")],
        "overridden",
    )
}

#[tokio::test]
async fn handler_overrides_grant_stale_windows() {
    let cache = new_cache().await;
    let app = Router::new().route("/o", axum::routing::get(overridden).layer(cache.layer()));
    let url = "http://api.test/o";
    call(app.clone(), get(url)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    let stale = until_stale(&app, url).await;
    assert!(
        stale
            .cache_status()
            .contains("detail=stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    assert_eq!(stale.text(), "overridden");
}

#[tokio::test]
async fn the_request_max_age_and_min_fresh_apply_to_stale_serving() {
    for directive in ["min-fresh=1", "max-age=10"] {
        let (origin, cache) = (Origin::new(), new_cache().await);
        let app = origin
            .router()
            .layer(cache.layer().request_directives(RequestDirectives::Honour));
        // 30 s old on arrival, fresh for about 1 s more, then within its window.
        let url = "http://api.test/swr-limits?gate=1&h=age:30\
                   &h=cache-control:max-age%3D31,%20stale-while-revalidate%3D600";
        origin.gate.add_permits(1);
        call(app.clone(), get(url)).await;
        eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
        // A plain request is served the stale entry at once (its refresh waits at
        // the gate, so the entry stays stale).
        let stale = until_stale(&app, url).await;
        assert!(
            stale
                .cache_status()
                .contains("detail=stale-while-revalidate"),
            "{}",
            stale.cache_status()
        );
        // One whose directive refuses it goes to the origin instead.
        let refused = tokio::spawn(call(
            app.clone(),
            support::get_with(url, &[("cache-control", directive)]),
        ));
        eventually("the refused request waiting", WAIT, || async {
            cache.stats().coalesced == 1
        })
        .await;
        origin.gate.add_permits(2);
        let refused = refused.await.unwrap();
        assert!(
            refused.cache_status().contains("fwd="),
            "{directive}: {}",
            refused.cache_status()
        );
        assert!(
            !refused.cache_status().contains("stale-while-revalidate"),
            "{directive}: {}",
            refused.cache_status()
        );
    }
}

#[tokio::test]
async fn a_304_keeps_the_stored_content_fields() {
    let cache = new_cache().await;
    let revalidations = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&revalidations);
    let handler = move |headers: HeaderMap| {
        let counted = Arc::clone(&counted);
        async move {
            let mut response = if headers.contains_key("if-none-match") {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut r = Response::new(Body::empty());
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                // Fields that describe another body: a 304 may not change them.
                let h = r.headers_mut();
                h.insert("content-type", "text/html".parse().unwrap());
                h.insert("content-encoding", "gzip".parse().unwrap());
                h.insert("content-length", "999".parse().unwrap());
                h.insert("x-version", "2".parse().unwrap());
                r
            } else {
                let mut r = Response::new(Body::from("plain text"));
                let h = r.headers_mut();
                h.insert("content-type", "text/plain".parse().unwrap());
                h.insert("x-version", "1".parse().unwrap());
                r
            };
            let h = response.headers_mut();
            h.insert("etag", "\"same\"".parse().unwrap());
            h.insert("cache-control", "max-age=1".parse().unwrap());
            response
        }
    };
    let app = Router::new()
        .route("/typed", axum::routing::get(handler))
        .layer(cache.layer());
    let url = "http://api.test/typed";
    call(app.clone(), get(url)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    let revalidated = until_stale(&app, url).await;
    assert!(
        revalidated.cache_status().contains("fwd-status=304"),
        "{}",
        revalidated.cache_status()
    );
    assert_eq!(revalidations.load(Ordering::SeqCst), 1);
    let kept = |got: &Got| {
        assert_eq!(got.text(), "plain text");
        assert_eq!(got.headers["content-type"], "text/plain");
        assert!(!got.headers.contains_key("content-encoding"));
        assert_eq!(got.headers["content-length"], "10");
        assert_eq!(got.headers["x-version"], "2", "other fields are updated");
    };
    kept(&revalidated);
    eventually("the refreshed entry stored", WAIT, || async {
        cache.stats().stores == 2
    })
    .await;
    // Fresh for 1 s: a hit may still come too late, and then it is revalidated again.
    eventually("a hit of the refreshed entry", WAIT, || async {
        let got = call(app.clone(), get(url)).await;
        kept(&got);
        got.is_hit()
    })
    .await;
}

#[tokio::test]
async fn a_304_sets_its_cookie_for_the_client_that_asked_and_stores_none() {
    let cache = new_cache().await;
    let handler = |headers: HeaderMap| async move {
        let mut response = if headers.contains_key("if-none-match") {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r.headers_mut()
                .append("set-cookie", "session=for-you".parse().unwrap());
            r.headers_mut()
                .append("set-cookie", "seen=1".parse().unwrap());
            r
        } else {
            Response::new(Body::from("shared"))
        };
        let h = response.headers_mut();
        h.insert("etag", "\"same\"".parse().unwrap());
        h.insert("cache-control", "max-age=1".parse().unwrap());
        response
    };
    let app = Router::new()
        .route("/cookie", axum::routing::get(handler))
        .layer(cache.layer());
    let url = "http://api.test/cookie";
    let first = call(app.clone(), get(url)).await;
    assert!(!first.headers.contains_key("set-cookie"));
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    let revalidated = until_stale(&app, url).await;
    assert!(
        revalidated
            .cache_status()
            .contains("fwd-status=304; stored"),
        "{}",
        revalidated.cache_status()
    );
    assert_eq!(revalidated.text(), "shared");
    let cookies: Vec<_> = revalidated.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["session=for-you", "seen=1"]);
    eventually("the refreshed entry stored", WAIT, || async {
        cache.stats().stores == 2
    })
    .await;
    // The refreshed entry (fresh for 1 s) is everyone's: no cookie in it.
    eventually("a hit of the refreshed entry", WAIT, || async {
        let got = call(app.clone(), get(url)).await;
        assert_eq!(got.text(), "shared");
        if got.is_hit() {
            assert!(!got.headers.contains_key("set-cookie"), "a stored cookie");
        }
        got.is_hit()
    })
    .await;
}

#[tokio::test]
async fn at_most_max_refreshes_run_at_once() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = origin.router().layer(cache.layer());
    let count = HybridCache::MAX_REFRESHES + 6;
    let url = |i: usize| {
        format!("http://api.test/many/{i}?gate=1&h=cache-control:max-age%3D1,%20stale-while-revalidate%3D600")
    };
    origin.gate.add_permits(count);
    for i in 0..count {
        call(app.clone(), get(&url(i))).await;
    }
    eventually("all stored", WAIT, || async {
        cache.stats().stores == count as u64
    })
    .await;
    // Each was stored before now, fresh for 1 s: past this, every one is stale (asking
    // each until it is would start refreshes out of order).
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    // The first one stale starts its refresh (held at the gate), and so does each of
    // the next ones, until MAX_REFRESHES are running: past that a stale hit is served
    // without one.
    until_stale(&app, &url(0)).await;
    for i in 1..count {
        let got = call(app.clone(), get(&url(i))).await;
        assert!(
            got.cache_status().contains("detail=stale-while-revalidate"),
            "{i}: {}",
            got.cache_status()
        );
    }
    let refreshes = count + HybridCache::MAX_REFRESHES;
    eventually("MAX_REFRESHES refreshes at the origin", WAIT, || async {
        origin.log.calls() == refreshes
    })
    .await;
    for i in HybridCache::MAX_REFRESHES..count {
        let path = url(i).trim_start_matches("http://api.test").to_owned();
        assert_eq!(origin.log.calls_to(&path), 1, "{i}: no refresh started");
    }
    // Once they are done, a stale hit starts a refresh again.
    origin.gate.add_permits(HybridCache::MAX_REFRESHES);
    eventually("the refreshes stored", WAIT, || async {
        cache.stats().stores == (count + HybridCache::MAX_REFRESHES) as u64
    })
    .await;
    origin.gate.add_permits(1);
    let last = url(count - 1);
    call(app.clone(), get(&last)).await;
    let path = last.trim_start_matches("http://api.test").to_owned();
    eventually("a refresh of the last one", WAIT, || async {
        origin.log.calls_to(&path) == 2
    })
    .await;
}
