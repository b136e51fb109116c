//! Hostile and malformed input: every request is served, nothing panics, and nothing
//! unsafe is stored.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use axum::body::Body;
use http::{HeaderValue, Request, StatusCode};
use support::{call, eventually, Origin};
use tower_hybrid_cache::{HybridCache, RequestDirectives};

const WAIT: Duration = Duration::from_secs(10);

async fn setup(ttl: Option<u64>) -> (Origin, HybridCache, axum::Router) {
    let origin = Origin::new();
    let cache = HybridCache::builder().build().await.unwrap();
    // Trusted clients: the directives beside the junk are read and obeyed.
    let mut layer = cache.layer().request_directives(RequestDirectives::Honour);
    if let Some(ttl) = ttl {
        layer = layer.ttl(Duration::from_secs(ttl));
    }
    let app = origin.router().layer(layer);
    (origin, cache, app)
}

#[tokio::test]
async fn non_utf8_cache_control_from_the_origin_is_not_stored() {
    let (origin, cache, _) = setup(Some(60)).await;
    // The origin script cannot send raw bytes; wrap a handler that does.
    let app = axum::Router::new()
        .route(
            "/raw",
            axum::routing::get(|| async {
                let mut response = axum::response::Response::new(Body::from("raw"));
                response.headers_mut().insert(
                    "cache-control",
                    HeaderValue::from_bytes(b"max-age=60, \xffprivate").unwrap(),
                );
                response
            }),
        )
        .layer(cache.layer().ttl(Duration::from_secs(60)));
    for _ in 0..2 {
        let got = call(app.clone(), support::get("/raw")).await;
        assert_eq!(got.text(), "raw");
        assert!(
            got.cache_status()
                .ends_with("detail=malformed-cache-control"),
            "{}",
            got.cache_status()
        );
    }
    assert_eq!(cache.stats().stores, 0);
    drop(origin);
}

#[tokio::test]
async fn malformed_request_cache_control_is_tolerated() {
    let (origin, cache, app) = setup(Some(60)).await;
    let junk = |then: &str| {
        let mut request = support::get("http://t/m");
        let mut value = b"\xfe\xff, =, \xe9t\xe9, ".to_vec();
        value.extend_from_slice(then.as_bytes());
        request
            .headers_mut()
            .insert("cache-control", HeaderValue::from_bytes(&value).unwrap());
        request
    };
    let got = call(app.clone(), junk("")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(
        got.cache_status().ends_with("stored"),
        "{}",
        got.cache_status()
    );
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    // The junk is ignored: the stored response answers it.
    let again = call(app.clone(), junk("")).await;
    assert!(again.is_hit(), "{}", again.cache_status());
    assert_eq!(origin.log.calls(), 1);
    // The readable directives beside the junk still count.
    let reload = call(app.clone(), junk("no-cache")).await;
    assert!(
        reload.cache_status().contains("fwd=request"),
        "{}",
        reload.cache_status()
    );
    assert_eq!(origin.log.calls(), 2);
    // An unterminated quote gets the reading that caches less: `max-age` is 0.
    let mut unterminated = support::get("http://t/m");
    unterminated.headers_mut().insert(
        "cache-control",
        HeaderValue::from_bytes(b"\xfe\xff, max-age=\"").unwrap(),
    );
    let got = call(app.clone(), unterminated).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(
        got.cache_status().contains("fwd=request"),
        "{}",
        got.cache_status()
    );
}

#[tokio::test]
async fn absurd_and_negative_numbers_get_safe_readings() {
    let (origin, cache, app) = setup(None).await;
    // Too large: capped at 2^31 s, so stored and fresh.
    let huge = "http://t/huge?h=cache-control:max-age%3D99999999999999999999";
    call(app.clone(), support::get(huge)).await;
    eventually("a store", WAIT, || async { cache.stats().stores == 1 }).await;
    let hit = call(app.clone(), support::get(huge)).await;
    assert!(
        hit.cache_status().contains("ttl=2147483"),
        "{}",
        hit.cache_status()
    );
    // Negative or garbage: stale at once, so not stored.
    for bad in [
        "max-age%3D-1",
        "max-age%3Dabc",
        "max-age%3D1e9",
        "s-maxage%3D-5",
    ] {
        let url = format!("http://t/neg?h=cache-control:{bad}");
        let got = call(app.clone(), support::get(&url)).await;
        assert!(
            got.cache_status().ends_with("detail=already-stale"),
            "{bad}: {}",
            got.cache_status()
        );
    }
    // A garbage Age from the origin is read as 0.
    let url = "http://t/age?h=cache-control:max-age%3D60&h=age:-30";
    call(app.clone(), support::get(url)).await;
    eventually("a store", WAIT, || async { cache.stats().stores == 2 }).await;
    assert!(call(app, support::get(url)).await.age().unwrap() <= 1);
    assert_eq!(origin.log.calls(), 6);
}

#[tokio::test]
async fn hundreds_of_vary_names_are_served_and_not_stored() {
    let (origin, cache, app) = setup(Some(60)).await;
    let names: Vec<String> = (0..300).map(|i| format!("x-h{i}")).collect();
    let url = format!("http://t/vary?h=vary:{}", names.join(","));
    for _ in 0..2 {
        let got = call(app.clone(), support::get(&url)).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(
            got.cache_status().ends_with("detail=vary-too-long"),
            "{}",
            got.cache_status()
        );
    }
    assert_eq!(origin.log.calls(), 2);
    assert_eq!(cache.stats().stores, 0);
}

#[tokio::test]
async fn an_8_kb_uri_is_cached_under_a_bounded_key() {
    let (origin, cache, app) = setup(Some(60)).await;
    let url = format!(
        "http://t/{}?q={}&{{tag}}=1",
        "p".repeat(4096),
        "x".repeat(4096)
    );
    assert!(url.len() > 8192);
    call(app.clone(), support::get(&url)).await;
    eventually("a store", WAIT, || async { cache.stats().stores == 1 }).await;
    assert!(call(app, support::get(&url)).await.is_hit());
    assert_eq!(origin.log.calls(), 1);
}

#[tokio::test]
async fn invalid_percent_encoding_is_served_and_kept_distinct() {
    let (origin, cache, app) = setup(Some(60)).await;
    for url in [
        "http://t/bad%zz?q=%",
        "http://t/bad%zz?q=%4",
        "http://t/bad%25zz?q=%25",
    ] {
        let got = call(app.clone(), Request::get(url).body(Body::empty()).unwrap()).await;
        assert_eq!(got.status, StatusCode::OK, "{url}");
    }
    // Three distinct keys: three origin calls, three entries.
    eventually("three stores", WAIT, || async { cache.stats().stores == 3 }).await;
    assert_eq!(origin.log.calls(), 3);
    // Equivalent spellings of valid escapes share one.
    call(app.clone(), support::get("http://t/ok%7e?q=%41")).await;
    eventually("four stores", WAIT, || async { cache.stats().stores == 4 }).await;
    assert!(call(app, support::get("http://t/ok~?q=A")).await.is_hit());
}

#[tokio::test]
async fn a_garbage_expires_or_date_is_handled() {
    let (origin, cache, app) = setup(None).await;
    let expired = "http://t/exp?h=expires:0";
    let got = call(app.clone(), support::get(expired)).await;
    assert!(
        got.cache_status().ends_with("detail=already-stale"),
        "{}",
        got.cache_status()
    );
    let bad_date = "http://t/date?h=date:yesterday&h=cache-control:max-age%3D60";
    call(app.clone(), support::get(bad_date)).await;
    eventually("a store", WAIT, || async { cache.stats().stores == 1 }).await;
    assert!(call(app, support::get(bad_date)).await.is_hit());
    assert_eq!(origin.log.calls(), 2);
}
