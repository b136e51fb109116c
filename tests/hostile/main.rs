//! The cache against an attacker: a hostile value in Redis, a GET with a body, `QUERY`,
//! repeated or disagreeing `Host` fields, a flooded invalidation log, namespaces that
//! prefix each other, and a write's invalidations with Redis frozen. Each test fails
//! if the defence it names is taken away.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/fault_proxy.rs"]
mod fault_proxy;
#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use axum::body::Body;
use fault_proxy::FaultProxy;
use http::{Request, StatusCode};
use support::redis::RedisServer;
use support::{call, eventually, get, get_with, Origin};
use tower_hybrid_cache::entry::FORMAT_VERSION;
use tower_hybrid_cache::{CacheOverrides, HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(15);

async fn memory_cache() -> HybridCache {
    HybridCache::builder().build().await.unwrap()
}

async fn replica(redis_url: &str, namespace: &str) -> HybridCache {
    HybridCache::builder()
        .namespace(namespace)
        .redis(
            RedisConfig::new(redis_url)
                .command_timeout(Duration::from_millis(500))
                .deadline(Duration::from_millis(500)),
        )
        .build()
        .await
        .unwrap()
}

fn app(origin: &Origin, cache: &HybridCache) -> axum::Router {
    origin
        .router()
        .layer(cache.layer().ttl(Duration::from_secs(60)))
}

/// A response entry in the stored format (see `entry/codec.rs`) with `fields` distinct
/// header names: what a hostile writer of Redis could leave under a key.
fn entry_with_fields(fields: u32) -> Vec<u8> {
    let mut out = b"\xF0THC".to_vec();
    out.extend_from_slice(&[FORMAT_VERSION, 1]);
    // Its edition: one no fill draws.
    out.extend_from_slice(&0x5eed_u64.to_be_bytes());
    out.extend_from_slice(&200u16.to_be_bytes());
    out.push(2);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let later = now + 600_000;
    for time in [now, 0, later, later, later, later] {
        out.extend_from_slice(&time.to_be_bytes());
    }
    out.extend_from_slice(&fields.to_be_bytes());
    for i in 0..fields {
        let name = format!("x-{i}");
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
        out.push(b'1');
    }
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    let body = b"poisoned";
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[tokio::test]
async fn a_redis_value_with_too_many_fields_is_a_miss_and_is_overwritten() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url(), "hostile").await;
    let app = app(&origin, &cache);
    let url = "http://api.test/fields";
    call(app.clone(), get(url)).await;
    eventually("the write", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    let key = redis.cli(&["--scan", "--pattern", "hostile/v2:*"]);
    assert_eq!(key.lines().count(), 1, "{key}");
    // 24 576 names is where `http`'s map gives up (the hit path's `Age` then panics);
    // past it, appending the names panics; 1 025 is one past the store path's bound.
    for (writes, fields) in (2..).zip([1_025, 24_576, 30_000]) {
        let value = entry_with_fields(fields);
        assert_eq!(redis.cli_with_input(&["SET", key.trim()], &value), "OK");
        let got = call(app.clone(), get(url)).await;
        assert_eq!(got.status, StatusCode::OK, "{fields}");
        assert!(
            got.cache_status().contains("fwd=uri-miss"),
            "{fields}: {}",
            got.cache_status()
        );
        assert_ne!(got.text(), "poisoned");
        eventually("the overwrite", WAIT, || async {
            cache.stats().redis_writes == writes
        })
        .await;
        let hit = call(app.clone(), get(url)).await;
        assert!(hit.cache_status().ends_with("detail=redis"), "{fields}");
        assert_eq!(hit.body, got.body);
    }
    // One under the bound is a stored entry like any other.
    let value = entry_with_fields(1_000);
    assert_eq!(redis.cli_with_input(&["SET", key.trim()], &value), "OK");
    let kept = call(app.clone(), get(url)).await;
    assert_eq!(kept.text(), "poisoned", "{}", kept.cache_status());
    assert_eq!(kept.headers["x-999"], "1");
}

#[tokio::test]
async fn a_response_with_too_many_fields_is_served_and_not_stored() {
    let cache = memory_cache().await;
    let handler = || async {
        let mut response = http::Response::new(Body::from("many"));
        for i in 0..1_100 {
            response.headers_mut().insert(
                http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                http::HeaderValue::from_static("1"),
            );
        }
        response
    };
    let app = axum::Router::new()
        .route("/many", axum::routing::get(handler))
        .layer(cache.layer().ttl(Duration::from_secs(60)));
    let got = call(app.clone(), get("http://api.test/many")).await;
    assert_eq!(got.text(), "many");
    assert!(
        got.cache_status().ends_with("detail=too-many-fields"),
        "{}",
        got.cache_status()
    );
    assert!(!call(app, get("http://api.test/many")).await.is_hit());
}

fn with_body(
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn a_get_or_head_with_a_body_is_neither_served_nor_stored() {
    let (origin, cache) = (Origin::new(), memory_cache().await);
    let app = app(&origin, &cache);
    let url = "http://api.test/fat";
    let shapes = [
        ("GET", ("content-length", "6")),
        ("GET", ("transfer-encoding", "chunked")),
        ("HEAD", ("content-length", "6")),
        ("GET", ("content-length", "junk")),
    ];
    // Nothing stored: a fat GET does not become the entry.
    for (method, header) in shapes {
        let got = call(app.clone(), with_body(method, url, &[header], "poison")).await;
        assert_eq!(
            got.cache_status(),
            "tower-hybrid-cache; fwd=bypass; detail=request-body",
            "{method} {header:?}"
        );
    }
    assert_eq!(cache.stats().stores, 0);
    // Something stored: a fat GET is not served it, and does not replace it.
    let stored = call(app.clone(), get(url)).await;
    assert!(stored.cache_status().ends_with("stored"));
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    let calls = origin.log.calls();
    for (method, header) in shapes {
        let got = call(app.clone(), with_body(method, url, &[header], "poison")).await;
        assert!(got.cache_status().contains("fwd=bypass"), "{method}");
    }
    assert_eq!(origin.log.calls(), calls + shapes.len());
    let hit = call(app, get_with(url, &[("content-length", "0")])).await;
    assert!(hit.is_hit(), "{}", hit.cache_status());
    assert_eq!(hit.body, stored.body);
    assert_eq!(cache.stats().stores, 1);
}

#[tokio::test]
async fn a_successful_query_invalidates_nothing() {
    let (origin, cache) = (Origin::new(), memory_cache().await);
    let app = app(&origin, &cache);
    let url = "http://api.test/search";
    call(app.clone(), get(url)).await;
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    let query = call(app.clone(), with_body("QUERY", url, &[], "q=rust")).await;
    assert_eq!(query.status, StatusCode::OK);
    // Cached under its own key (tests/http_conformance), never invalidating.
    assert_eq!(
        query.cache_status(),
        "tower-hybrid-cache; fwd=uri-miss; fwd-status=200; stored"
    );
    let hit = call(app.clone(), get(url)).await;
    assert!(hit.is_hit(), "{}", hit.cache_status());
    // An unsafe method still does.
    call(app.clone(), with_body("POST", url, &[], "{}")).await;
    assert!(!call(app, get(url)).await.is_hit());
}

#[tokio::test]
async fn a_repeated_or_disagreeing_host_is_neither_served_nor_stored() {
    let (origin, cache) = (Origin::new(), memory_cache().await);
    let app = app(&origin, &cache);
    let stored = call(app.clone(), get_with("/page", &[("host", "api.test")])).await;
    assert!(stored.cache_status().ends_with("stored"));
    eventually("stored", WAIT, || async { cache.stats().stores == 1 }).await;
    let invalid = [
        get_with("/page", &[("host", "api.test"), ("host", "evil.test")]),
        get_with("/page", &[("host", "evil.test"), ("host", "api.test")]),
        get_with("/page", &[("host", "api.test"), ("host", "api.test")]),
        get_with("http://api.test/page", &[("host", "evil.test")]),
    ];
    let calls = origin.log.calls();
    for request in invalid {
        let got = call(app.clone(), request).await;
        assert_eq!(
            got.cache_status(),
            "tower-hybrid-cache; fwd=bypass; detail=invalid-host"
        );
    }
    assert_eq!(origin.log.calls(), calls + 4);
    assert_eq!(cache.stats().stores, 1, "none of them stored");
    // One Host, or one that agrees with the URI: the entry.
    for request in [
        get_with("/page", &[("host", "API.test")]),
        get_with("http://api.test/page", &[("host", "api.test")]),
        get("http://api.test/page"),
    ] {
        let hit = call(app.clone(), request).await;
        assert!(hit.is_hit(), "{}", hit.cache_status());
        assert_eq!(hit.body, stored.body);
    }
}

#[tokio::test]
async fn a_namespace_never_reaches_into_one_it_starts() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let (short, long) = (
        replica(&redis.url(), "jobs").await,
        replica(&redis.url(), "jobs:prod").await,
    );
    let urls = [
        "http://api.test/a?h=cache-tag:t",
        "http://api.test/b?h=cache-tag:t",
        "http://api.test/c",
    ];
    for cache in [&short, &long] {
        for url in urls {
            call(app(&origin, cache), get(url)).await;
        }
        eventually("the writes", WAIT, || async {
            cache.stats().redis_writes == 3
        })
        .await;
    }
    let count = |pattern: &str| redis.cli(&["--scan", "--pattern", pattern]).lines().count();
    assert_eq!((count("jobs/v2:*"), count("jobs:prod/v2:*")), (3, 3));
    // A key, a tag, then everything, each through the shorter namespace.
    assert!(
        short
            .invalidate(&"http://api.test/c".parse().unwrap())
            .await
    );
    assert_eq!((count("jobs/v2:*"), count("jobs:prod/v2:*")), (2, 3));
    assert!(short.invalidate_tag("t").await);
    assert_eq!((count("jobs/v2:*"), count("jobs:prod/v2:*")), (0, 3));
    assert!(short.purge_all().await);
    assert_eq!(count("jobs/v2:*") + count("jobs/tag:*"), 0);
    assert_eq!(count("jobs:prod/v2:*"), 3);
    assert_eq!(count("jobs:prod/tag:*"), 1);
    // And the other way round.
    assert!(long.purge_all().await);
    assert_eq!(count("jobs:prod/v2:*"), 0);
    let hit = call(app(&origin, &long), get(urls[0])).await;
    assert!(!hit.is_hit(), "{}", hit.cache_status());
}

#[tokio::test]
async fn a_writes_invalidations_with_redis_frozen_share_one_deadline() {
    let redis = RedisServer::start();
    // Through a proxy that only counts: what the cache sends to the frozen Redis.
    let proxy = FaultProxy::start(redis.port());
    let deadline = Duration::from_secs(2);
    let cache = HybridCache::builder()
        .namespace("frozen")
        .redis(
            RedisConfig::new(proxy.url())
                .command_timeout(deadline)
                .deadline(deadline),
        )
        .build()
        .await
        .unwrap();
    let create = || async {
        let tags = ["search:berlin", "search:any-location", "matches"];
        (
            StatusCode::CREATED,
            axum::Extension(CacheOverrides::new().invalidate_tags(tags)),
        )
    };
    let app = axum::Router::new().route("/jobs", axum::routing::post(create).layer(cache.layer()));
    eventually("connected", WAIT, || async {
        cache.redis_health().unwrap().connected == 4
    })
    .await;
    redis.freeze();
    // Every invalidation starts with its mark (the script that raises it): the URI's
    // and the three tags'.
    let marks = || proxy.count("EVAL") + proxy.count("SET");
    let before = marks();
    let post = tokio::spawn(call(
        app,
        with_body("POST", "http://api.test/jobs", &[], "{}"),
    ));
    eventually("all four marks sent", WAIT, || async {
        marks() >= before + 4
    })
    .await;
    assert_eq!(
        cache.stats().redis_deadline_hits,
        0,
        "all four were sent before the first deadline ran out"
    );
    let got = post.await.unwrap();
    assert_eq!(got.status, StatusCode::CREATED);
    // What Redis could not take waits for it, in order (the key's delete is kept by
    // the writer, behind the writes queued before it).
    eventually("all four kept for replay", WAIT, || async {
        cache.pending_redis_operations() == 4
    })
    .await;
    redis.resume();
    eventually("replayed", WAIT, || async {
        cache.pending_redis_operations() == 0
    })
    .await;
}
