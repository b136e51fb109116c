//! Rules the public HTTP cache test suite (http-tests/cache-tests) checks, each
//! covered here against the layer itself: targeted cache-control fields (RFC 9213),
//! `Age` lists, byte ranges of stored responses, dates, and `QUERY` (RFC 10008). `scripts/cache-tests` runs the suite against `caching_proxy`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{HeaderName, Request};
use support::{call, eventually, get, Origin};
use tower_hybrid_cache::{HybridCache, HybridCacheLayer};

const WAIT: Duration = Duration::from_secs(10);

async fn new_cache() -> HybridCache {
    HybridCache::builder().build().await.unwrap()
}

/// Asks `url` twice through `layer`: whether the second answer was a hit, and both.
async fn twice(
    layer: HybridCacheLayer,
    cache: &HybridCache,
    url: &str,
) -> (bool, support::Got, support::Got) {
    let origin = Origin::new();
    let app = origin.router().layer(layer);
    let first = call(app.clone(), get(url)).await;
    if first.cache_status().contains("stored") {
        eventually("the store", WAIT, || async { cache.stats().stores >= 1 }).await;
    }
    let second = call(app, get(url)).await;
    (second.is_hit(), first, second)
}

#[tokio::test]
async fn the_route_s_targeted_field_replaces_cache_control_and_is_hidden() {
    let cache = new_cache().await;
    // Browsers are told not to store it; this cache, to keep it 60 s.
    let url =
        "http://api.test/t?h=cache-control:no-store&h=tower-hybrid-cache-control:max-age%3D60";
    let (hit, first, second) = twice(cache.layer(), &cache, url).await;
    assert!(hit, "{}", second.cache_status());
    for got in [&first, &second] {
        assert_eq!(got.header("cache-control"), Some("no-store"));
        assert_eq!(got.header("tower-hybrid-cache-control"), None, "hidden");
    }
}

#[tokio::test]
async fn a_targeted_field_can_forbid_what_cache_control_allows() {
    for (targeted, detail) in [
        ("max-age%3D0", "already-stale"),
        ("private", "private"),
        ("no-store", "no-store"),
        ("no-cache", "no-cache"),
    ] {
        let cache = new_cache().await;
        let url = format!(
            "http://api.test/f?h=cache-control:max-age%3D3600&h=tower-hybrid-cache-control:{targeted}"
        );
        let (hit, first, _) = twice(cache.layer(), &cache, &url).await;
        assert!(!hit, "{targeted}");
        assert!(
            first.cache_status().ends_with(&format!("detail={detail}")),
            "{targeted}: {}",
            first.cache_status()
        );
    }
}

#[tokio::test]
async fn a_targeted_field_that_does_not_parse_is_ignored() {
    for junk in ["max-age%3D3600,%20%26%26%26", "MaX-aGe%3D3600", ""] {
        let cache = new_cache().await;
        let url = format!(
            "http://api.test/j?h=cache-control:no-store&h=tower-hybrid-cache-control:{junk}"
        );
        let (hit, first, _) = twice(cache.layer(), &cache, &url).await;
        assert!(!hit, "{junk}");
        assert!(first.cache_status().ends_with("detail=no-store"), "{junk}");
    }
}

#[tokio::test]
async fn a_route_names_the_fields_it_obeys_in_order_and_forwards_all_but_its_own() {
    let cdn = HeaderName::from_static("cdn-cache-control");
    let ours = HeaderName::from_static("tower-hybrid-cache-control");
    let url = "http://api.test/o?h=cache-control:no-store&h=cdn-cache-control:max-age%3D60&h=tower-hybrid-cache-control:no-store";
    // Only CDN-Cache-Control: obeyed and forwarded (RFC 9213 §3); this cache's own
    // field is an ordinary header now.
    let cache = new_cache().await;
    let layer = cache.layer().targeted_cache_control([cdn.clone()]);
    let (hit, first, second) = twice(layer, &cache, url).await;
    assert!(hit);
    for got in [&first, &second] {
        assert_eq!(got.header("cdn-cache-control"), Some("max-age=60"));
        assert_eq!(got.header("tower-hybrid-cache-control"), Some("no-store"));
    }
    // Both, ours first: ours decides, and only ours is removed.
    let cache = new_cache().await;
    let layer = cache
        .layer()
        .targeted_cache_control([ours.clone(), cdn.clone()]);
    let (hit, first, _) = twice(layer, &cache, url).await;
    assert!(!hit);
    assert_eq!(first.header("tower-hybrid-cache-control"), None);
    assert_eq!(first.header("cdn-cache-control"), Some("max-age=60"));
    // None: Cache-Control decides, and nothing is removed.
    let cache = new_cache().await;
    let layer = cache.layer().targeted_cache_control([]);
    let (hit, first, _) = twice(layer, &cache, url).await;
    assert!(!hit);
    assert_eq!(first.header("tower-hybrid-cache-control"), Some("no-store"));
    // Told: every listed field forwarded, or none.
    let url = "http://api.test/k?h=cache-control:no-store&h=cdn-cache-control:max-age%3D60&h=tower-hybrid-cache-control:max-age%3D60";
    for forward in [true, false] {
        let cache = new_cache().await;
        let layer = cache
            .layer()
            .targeted_cache_control([ours.clone(), cdn.clone()])
            .forward_targeted_cache_control(forward);
        let (hit, first, second) = twice(layer, &cache, url).await;
        assert!(hit);
        for got in [&first, &second] {
            let seen = |name| got.header(name).is_some();
            assert_eq!(seen("cdn-cache-control"), forward);
            assert_eq!(seen("tower-hybrid-cache-control"), forward);
        }
    }
}

#[tokio::test]
async fn targeted_fields_are_hidden_on_responses_the_cache_does_not_store() {
    let cache = new_cache().await;
    let origin = Origin::new();
    let app = origin.router().layer(cache.layer());
    let url = "http://api.test/p?h=tower-hybrid-cache-control:max-age%3D60";
    let post = Request::post(url).body(Body::empty()).unwrap();
    // A GET with a body passes through, neither looked up nor stored.
    let with_body = Request::get(url)
        .header("content-length", "3")
        .body(Body::from("abc"))
        .unwrap();
    for request in [post, with_body] {
        let got = call(app.clone(), request).await;
        assert_eq!(got.header("tower-hybrid-cache-control"), None);
    }
}

#[tokio::test]
async fn an_age_list_counts_its_first_member() {
    for (age, fresh) in [("7200,%200", false), ("0,%207200", true), ("abc", true)] {
        let cache = new_cache().await;
        let url = format!("http://api.test/a?h=cache-control:max-age%3D3600&h=age:{age}");
        let (hit, first, _) = twice(cache.layer(), &cache, &url).await;
        assert_eq!(hit, fresh, "{age}: {}", first.cache_status());
    }
}

/// `url` stored whole, then asked for with `headers`.
async fn stored_then(url: &str, headers: &[(&str, &str)]) -> (support::Got, Origin) {
    let cache = new_cache().await;
    let origin = Origin::new();
    let app = origin.router().layer(cache.layer());
    call(app.clone(), get(url)).await;
    eventually("the store", WAIT, || async { cache.stats().stores >= 1 }).await;
    let got = call(app, support::get_with(url, headers)).await;
    (got, origin)
}

#[tokio::test]
async fn a_range_of_a_stored_response_is_a_206_from_the_cache() {
    let url = "http://api.test/r?h=cache-control:max-age%3D3600&h=etag:%22v1%22&h=a:1";
    let (whole, _) = stored_then(url, &[]).await;
    let body = whole.body.clone();
    let len = body.len();
    for (range, first, last) in [
        ("bytes=0-1", 0, 1),
        ("bytes=1-", 1, len - 1),
        ("bytes=-1", len - 1, len - 1),
        ("bytes=2-100000", 2, len - 1),
    ] {
        let (got, origin) = stored_then(url, &[("range", range)]).await;
        assert_eq!(got.status, http::StatusCode::PARTIAL_CONTENT, "{range}");
        assert!(got.is_hit(), "{range}: {}", got.cache_status());
        assert_eq!(got.body, body.slice(first..=last), "{range}");
        assert_eq!(
            got.header("content-range"),
            Some(format!("bytes {first}-{last}/{len}").as_str())
        );
        assert_eq!(
            got.header("content-length"),
            Some((last - first + 1).to_string().as_str())
        );
        // The stored fields come with it.
        assert_eq!(got.header("a"), Some("1"));
        assert_eq!(origin.log.calls(), 1, "{range}");
    }
}

#[tokio::test]
async fn an_unsatisfiable_range_is_a_416_and_anything_else_the_whole_response() {
    let url = "http://api.test/u?h=cache-control:max-age%3D3600&h=etag:%22v1%22";
    let (whole, _) = stored_then(url, &[]).await;
    let len = whole.body.len();
    let (got, _) = stored_then(url, &[("range", "bytes=100000-")]).await;
    assert_eq!(got.status, http::StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        got.header("content-range"),
        Some(format!("bytes */{len}").as_str())
    );
    assert!(got.body.is_empty());
    for headers in [
        &[("range", "bytes=0-1,3-4")][..],
        &[("range", "items=0-1")],
        &[("range", "bytes=0-1"), ("if-range", "\"v2\"")],
        &[("range", "bytes=0-1"), ("if-range", "W/\"v1\"")],
    ] {
        let (got, _) = stored_then(url, headers).await;
        assert_eq!(got.status, http::StatusCode::OK, "{headers:?}");
        assert!(got.is_hit());
        assert_eq!(got.body, whole.body, "{headers:?}");
    }
    let (got, _) = stored_then(url, &[("range", "bytes=0-1"), ("if-range", "\"v1\"")]).await;
    assert_eq!(got.status, http::StatusCode::PARTIAL_CONTENT);
}

#[tokio::test]
async fn a_range_that_misses_goes_to_the_origin_as_asked() {
    let cache = new_cache().await;
    let origin = Origin::new();
    let app = origin.router().layer(cache.layer());
    let url = "http://api.test/m?h=cache-control:max-age%3D3600";
    let got = call(
        app.clone(),
        support::get_with(url, &[("range", "bytes=0-1")]),
    )
    .await;
    assert!(
        got.cache_status().contains("fwd=uri-miss"),
        "{}",
        got.cache_status()
    );
    assert_eq!(origin.log.last_headers().unwrap()["range"], "bytes=0-1");
    // This origin ignores ranges: its whole 200 is stored, and answers the next range.
    eventually("the store", WAIT, || async { cache.stats().stores >= 1 }).await;
    let again = call(app, support::get_with(url, &[("range", "bytes=0-1")])).await;
    assert_eq!(again.status, http::StatusCode::PARTIAL_CONTENT);
    assert_eq!(origin.log.calls(), 1);
}

#[tokio::test]
async fn expires_in_the_obsolete_forms_and_any_case_gives_freshness() {
    // A date far ahead, so each is fresh; the weekdays are wrong on purpose.
    for expires in [
        "Thu%20Aug%20%208%2002:01:18%202050",
        "THU,%2018%20AUG%202050%2002:01:18%20gmt",
        "Thursday,%2018-Aug-50%2002:01:18%20GMT",
    ] {
        let cache = new_cache().await;
        let url = format!("http://api.test/e?h=expires:{expires}");
        let (hit, first, _) = twice(cache.layer(), &cache, &url).await;
        assert!(hit, "{expires}: {}", first.cache_status());
    }
    // Unreadable: already expired.
    let cache = new_cache().await;
    let (hit, ..) = twice(cache.layer(), &cache, "http://api.test/e?h=expires:soon").await;
    assert!(!hit);
}

/// An origin that answers any method with its content echoed, fresh for a minute,
/// counting its calls.
fn echo_origin(calls: Arc<AtomicUsize>) -> axum::Router {
    axum::Router::new().fallback(move |method: http::Method, body: bytes::Bytes| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let mut text = format!("{method} #{n}: ").into_bytes();
            text.extend_from_slice(&body);
            ([("cache-control", "max-age=60")], text)
        }
    })
}

fn query(url: &str, content_type: &str, content: &'static str) -> Request<Body> {
    Request::builder()
        .method("QUERY")
        .uri(url)
        .header("content-type", content_type)
        .body(Body::from(content))
        .unwrap()
}

#[tokio::test]
async fn a_query_is_cached_under_a_key_that_covers_its_content() {
    let cache = new_cache().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = echo_origin(Arc::clone(&calls)).layer(cache.layer());
    let url = "http://api.test/jobs/search";
    let first = call(
        app.clone(),
        query(url, "application/json", r#"{"q":"rust"}"#),
    )
    .await;
    assert!(
        first.cache_status().ends_with("stored"),
        "{}",
        first.cache_status()
    );
    assert_eq!(
        first.text(),
        r#"QUERY #1: {"q":"rust"}"#,
        "the origin got the content"
    );
    eventually("the store", WAIT, || async { cache.stats().stores >= 1 }).await;
    let again = call(
        app.clone(),
        query(url, "application/json", r#"{"q":"rust"}"#),
    )
    .await;
    assert!(again.is_hit(), "{}", again.cache_status());
    assert_eq!(again.body, first.body);
    // A range is of a GET's response only: a QUERY gets the whole answer.
    let mut ranged = query(url, "application/json", r#"{"q":"rust"}"#);
    ranged
        .headers_mut()
        .insert("range", http::HeaderValue::from_static("bytes=0-1"));
    let whole = call(app.clone(), ranged).await;
    assert_eq!(whole.status, http::StatusCode::OK);
    assert_eq!(whole.body, first.body);
    // Other content, or the same bytes of another type: other keys.
    let other = call(app.clone(), query(url, "application/json", r#"{"q":"go"}"#)).await;
    assert!(!other.is_hit());
    assert_eq!(other.text(), r#"QUERY #2: {"q":"go"}"#);
    let typed = call(app.clone(), query(url, "text/plain", r#"{"q":"rust"}"#)).await;
    assert!(!typed.is_hit());
    // A QUERY never invalidates, and is no GET: a stored GET stays a hit.
    call(app.clone(), get(url)).await;
    eventually("the GET stored", WAIT, || async {
        cache.stats().stores >= 4
    })
    .await;
    call(app.clone(), query(url, "application/json", "{}")).await;
    assert!(call(app.clone(), get(url)).await.is_hit());
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_query_larger_than_the_limit_passes_through_whole() {
    let cache = new_cache().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = echo_origin(Arc::clone(&calls)).layer(cache.layer().max_query_bytes(8));
    let url = "http://api.test/big";
    let content = "0123456789abcdef";
    for n in 1..=2 {
        let got = call(app.clone(), query(url, "text/plain", content)).await;
        assert_eq!(
            got.text(),
            format!("QUERY #{n}: {content}"),
            "handed on whole"
        );
        assert_eq!(
            got.cache_status(),
            "tower-hybrid-cache; fwd=bypass; detail=request-body"
        );
    }
    // Streamed, with no length: read up to the limit, then handed on with the rest.
    let chunks =
        ["01234", "56789", "abcdef"].map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c)));
    let streamed = Request::builder()
        .method("QUERY")
        .uri(url)
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let got = call(app.clone(), streamed).await;
    assert_eq!(
        got.text(),
        format!("QUERY #3: {content}"),
        "handed on whole"
    );
    assert_eq!(
        got.cache_status(),
        "tower-hybrid-cache; fwd=bypass; detail=request-body"
    );
    // Within the limit: cached. A route that caches no QUERY passes every one through.
    let small = call(app.clone(), query(url, "text/plain", "tiny")).await;
    assert!(small.cache_status().ends_with("stored"));
    let off = echo_origin(Arc::new(AtomicUsize::new(0))).layer(cache.layer().max_query_bytes(0));
    let got = call(off, query(url, "text/plain", "tiny")).await;
    assert_eq!(got.cache_status(), "tower-hybrid-cache; fwd=bypass");
}

#[tokio::test]
async fn a_query_stored_by_one_replica_is_a_redis_hit_on_another() {
    let redis = support::redis::RedisServer::start();
    let replica = || async {
        HybridCache::builder()
            .namespace("query")
            .redis_url(redis.url())
            .build()
            .await
            .unwrap()
    };
    let (one, two) = (replica().await, replica().await);
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, b) = (
        echo_origin(Arc::clone(&calls)).layer(one.layer()),
        echo_origin(Arc::clone(&calls)).layer(two.layer()),
    );
    let url = "http://api.test/shared";
    call(a, query(url, "application/json", r#"{"q":"rust"}"#)).await;
    eventually("in Redis", WAIT, || async { one.stats().redis_writes >= 1 }).await;
    let got = call(b, query(url, "application/json", r#"{"q":"rust"}"#)).await;
    assert!(
        got.cache_status().ends_with("detail=redis"),
        "{}",
        got.cache_status()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
