//! RFC 9111 behaviour of the layer, through axum `oneshot` over the scriptable origin.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http::{Request, Response, StatusCode};
use support::{call, eventually, get, get_with, Got, Origin};
use tower::ServiceExt;
use tower_hybrid_cache::layer::RequestBody;
use tower_hybrid_cache::{HybridCache, HybridCacheLayer, RequestDirectives, TtlMode};

const WAIT: Duration = Duration::from_secs(10);

async fn new_cache() -> HybridCache {
    HybridCache::builder().build().await.unwrap()
}

fn app(origin: &Origin, layer: HybridCacheLayer) -> Router {
    origin.router().layer(layer)
}

/// Waits until the cache has written `n` entries (stores happen off the response path).
async fn stored(cache: &HybridCache, n: u64) {
    eventually(&format!("{n} stores"), WAIT, || async {
        cache.stats().stores >= n
    })
    .await;
}

#[tokio::test]
async fn a_miss_is_stored_then_served_with_age_and_cache_status() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer());
    let url = "http://api.test/a?h=cache-control:max-age%3D60";
    let first = call(app.clone(), get(url)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.cache_status(),
        "tower-hybrid-cache; fwd=uri-miss; fwd-status=200; stored"
    );
    assert_eq!(first.age(), None);
    stored(&cache, 1).await;

    let second = call(app, get(url)).await;
    assert_eq!(second.body, first.body, "the stored body");
    assert_eq!(origin.log.calls(), 1);
    let status = second.cache_status();
    assert!(
        status.starts_with("tower-hybrid-cache; hit; ttl="),
        "{status}"
    );
    assert!(status.ends_with("; detail=memory"), "{status}");
    let ttl: u64 = status
        .split("ttl=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((58..=60).contains(&ttl), "ttl {ttl}");
    assert!(second.age().unwrap() <= 2);
    assert_eq!(
        second.headers["content-length"],
        first.body.len().to_string()
    );
    assert_eq!(cache.stats().hits, 1);
}

#[tokio::test]
async fn age_counts_the_age_the_origin_reported() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer());
    let url = "http://api.test/aged?h=cache-control:max-age%3D600&h=age:100";
    call(app.clone(), get(url)).await;
    stored(&cache, 1).await;
    let hit = call(app, get(url)).await;
    let age = hit.age().unwrap();
    assert!((100..=102).contains(&age), "age {age}");
    assert_eq!(hit.headers.get_all("age").iter().count(), 1);
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer());
    let url = "http://api.test/h?h=cache-control:max-age%3D60";
    let full = call(app.clone(), get(url)).await;
    stored(&cache, 1).await;
    let head = call(app.clone(), Request::head(url).body(Body::empty()).unwrap()).await;
    assert!(head.is_hit(), "{}", head.cache_status());
    assert!(head.body.is_empty());
    assert_eq!(head.headers["content-length"], full.body.len().to_string());
    assert_eq!(origin.log.calls(), 1);

    // A HEAD miss goes to the origin and stores nothing.
    let other = "http://api.test/h2?h=cache-control:max-age%3D60";
    let head = call(
        app.clone(),
        Request::head(other).body(Body::empty()).unwrap(),
    )
    .await;
    assert!(head.cache_status().contains("fwd=uri-miss"));
    assert!(!head.cache_status().contains("stored"));
    let get_after = call(app, get(other)).await;
    assert!(!get_after.is_hit());
}

#[tokio::test]
async fn vary_keeps_variants_apart() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer());
    let url = "http://api.test/v?h=cache-control:max-age%3D60&h=vary:accept-language&echo=accept-language";
    let en = call(app.clone(), get_with(url, &[("accept-language", "en")])).await;
    stored(&cache, 1).await;
    let fr = call(app.clone(), get_with(url, &[("accept-language", "fr")])).await;
    assert!(
        fr.cache_status().contains("fwd=vary-miss"),
        "{}",
        fr.cache_status()
    );
    stored(&cache, 2).await;
    let none = call(app.clone(), get(url)).await;
    assert!(none.cache_status().contains("fwd=vary-miss"));
    stored(&cache, 3).await;
    assert_eq!(origin.log.calls(), 3);

    let en2 = call(app.clone(), get_with(url, &[("accept-language", "en")])).await;
    let fr2 = call(app.clone(), get_with(url, &[("accept-language", " fr ")])).await;
    let none2 = call(app.clone(), get(url)).await;
    assert!(en2.is_hit() && fr2.is_hit() && none2.is_hit());
    assert_eq!(en2.body, en.body);
    assert_eq!(fr2.body, fr.body);
    assert_eq!(none2.body, none.body);
    assert!(en2.text().contains("Some(\"en\")"));
    assert!(fr2.text().contains("Some(\"fr\")"));
    assert_eq!(origin.log.calls(), 3);
}

#[tokio::test]
async fn responses_a_shared_cache_must_not_store_go_to_the_origin_every_time() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("h=cache-control:no-store,max-age%3D60", &[], "no-store"),
        ("h=cache-control:private,max-age%3D60", &[], "private"),
        (
            "h=cache-control:max-age%3D60&h=set-cookie:s%3D1",
            &[],
            "set-cookie",
        ),
        (
            "h=cache-control:max-age%3D60",
            &[("authorization", "Bearer x")],
            "authorization",
        ),
        ("h=cache-control:max-age%3D60&h=vary:*", &[], "vary-star"),
        ("h=cache-control:no-cache,max-age%3D60", &[], "no-cache"),
        ("h=content-type:text/plain", &[], "no-freshness"),
        ("status=500&h=content-type:text/plain", &[], "no-freshness"),
        (
            "h=cache-control:max-age%3D60",
            &[("cache-control", "no-store")],
            "no-store",
        ),
        ("status=206&h=cache-control:max-age%3D60", &[], "status"),
    ];
    for (query, request_headers, reason) in cases {
        let (origin, cache) = (Origin::new(), new_cache().await);
        let app = app(&origin, cache.layer());
        let url = format!("http://api.test/n?{query}");
        for _ in 0..3 {
            let got = call(app.clone(), get_with(&url, request_headers)).await;
            assert!(!got.is_hit(), "{query}: {}", got.cache_status());
            assert!(
                got.cache_status().ends_with(&format!("detail={reason}")),
                "{query}: {}",
                got.cache_status()
            );
        }
        assert_eq!(origin.log.calls(), 3, "{query}");
        assert_eq!(cache.stats().stores, 0, "{query}");
        assert_eq!(cache.stats().not_stored, 3, "{query}");
    }
}

#[tokio::test]
async fn authorization_is_shared_only_when_the_response_allows_it() {
    for cc in [
        "public,max-age%3D60",
        "s-maxage%3D60",
        "must-revalidate,max-age%3D60",
    ] {
        let (origin, cache) = (Origin::new(), new_cache().await);
        let app = app(&origin, cache.layer());
        let url = format!("http://api.test/auth?h=cache-control:{cc}");
        call(
            app.clone(),
            get_with(&url, &[("authorization", "Bearer a")]),
        )
        .await;
        stored(&cache, 1).await;
        assert!(
            call(app, get_with(&url, &[("authorization", "Bearer b")]))
                .await
                .is_hit(),
            "{cc}"
        );
    }
}

#[tokio::test]
async fn route_ttl_fills_in_for_the_origin_or_overrides_it() {
    let origin = Origin::new();
    // No origin freshness: the route TTL applies.
    let cache = new_cache().await;
    let app1 = app(&origin, cache.layer().ttl(Duration::from_secs(300)));
    call(app1.clone(), get("http://api.test/plain")).await;
    stored(&cache, 1).await;
    let hit = call(app1.clone(), get("http://api.test/plain")).await;
    assert!(
        hit.cache_status().contains("ttl=299") || hit.cache_status().contains("ttl=300"),
        "{}",
        hit.cache_status()
    );

    // The origin's max-age wins by default...
    let url = "http://api.test/short?h=cache-control:max-age%3D5";
    call(app1.clone(), get(url)).await;
    stored(&cache, 2).await;
    let hit = call(app1, get(url)).await;
    let status = hit.cache_status();
    assert!(
        status.contains("ttl=4") || status.contains("ttl=5"),
        "{status}"
    );

    // ...and the route's, when it overrides.
    let cache = new_cache().await;
    let app2 = app(
        &origin,
        cache
            .layer()
            .ttl(Duration::from_secs(300))
            .ttl_mode(TtlMode::Override),
    );
    call(app2.clone(), get(url)).await;
    stored(&cache, 1).await;
    let hit = call(app2.clone(), get(url)).await;
    assert!(
        hit.cache_status().contains("ttl=299") || hit.cache_status().contains("ttl=300"),
        "{}",
        hit.cache_status()
    );

    // Overriding never stores what the origin forbids.
    let private = "http://api.test/p?h=cache-control:private";
    call(app2.clone(), get(private)).await;
    assert!(!call(app2, get(private)).await.is_hit());

    // A route TTL alone does not store a 500.
    let cache = new_cache().await;
    let app3 = app(&origin, cache.layer().ttl(Duration::from_secs(300)));
    let error = "http://api.test/e?status=500";
    call(app3.clone(), get(error)).await;
    assert!(!call(app3, get(error)).await.is_hit());
}

#[tokio::test]
async fn an_entry_expires_when_its_freshness_runs_out() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer().ttl(Duration::from_secs(1)));
    let url = "http://api.test/expiring";
    call(app.clone(), get(url)).await;
    stored(&cache, 1).await;
    // Served from the cache until it is stale, then fetched again.
    eventually("the entry to go stale", WAIT, || {
        let app = app.clone();
        async move { !call(app, get(url)).await.is_hit() }
    })
    .await;
    assert_eq!(origin.log.calls_to("/expiring"), 2);
}

#[tokio::test]
async fn request_directives_are_honoured_or_ignored_as_configured() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let honour = app(
        &origin,
        cache
            .layer()
            .ttl(Duration::from_secs(60))
            .request_directives(RequestDirectives::Honour),
    );
    let url = "http://api.test/r";
    // Nothing stored yet: a miss, whatever the request asks.
    let first = call(
        honour.clone(),
        get_with(url, &[("cache-control", "no-cache")]),
    )
    .await;
    assert!(
        first.cache_status().contains("fwd=uri-miss"),
        "{}",
        first.cache_status()
    );
    stored(&cache, 1).await;
    let reload = call(
        honour.clone(),
        get_with(url, &[("cache-control", "no-cache")]),
    )
    .await;
    assert!(
        reload.cache_status().contains("fwd=request"),
        "{}",
        reload.cache_status()
    );
    let max_age_0 = call(
        honour.clone(),
        get_with(url, &[("cache-control", "max-age=0")]),
    )
    .await;
    assert!(max_age_0.cache_status().contains("fwd=request"));
    let min_fresh = call(
        honour.clone(),
        get_with(url, &[("cache-control", "min-fresh=3600")]),
    )
    .await;
    assert!(min_fresh.cache_status().contains("fwd=request"));
    assert_eq!(origin.log.calls(), 4);
    // A forced refetch refreshes the entry for everyone.
    stored(&cache, 4).await;
    let refreshed = call(honour.clone(), get(url)).await;
    assert!(refreshed.is_hit());
    assert!(refreshed.text().ends_with("#4"), "{}", refreshed.text());

    let only_cached = call(
        honour.clone(),
        get_with(
            "http://api.test/none",
            &[("cache-control", "only-if-cached")],
        ),
    )
    .await;
    assert_eq!(only_cached.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(origin.log.calls_to("/none"), 0);

    // The default ignores what a client asks, but for `no-store` and
    // `only-if-cached`, which ask for less.
    let ignore = app(&origin, cache.layer().ttl(Duration::from_secs(60)));
    let before = origin.log.calls();
    for cc in [
        "no-cache",
        "max-age=0",
        "min-fresh=3600",
        "no-cache, max-age=0",
    ] {
        let hit = call(ignore.clone(), get_with(url, &[("cache-control", cc)])).await;
        assert!(hit.is_hit(), "{cc}: {}", hit.cache_status());
        assert_eq!(hit.text(), refreshed.text(), "{cc}");
    }
    let pragma = call(ignore.clone(), get_with(url, &[("pragma", "no-cache")])).await;
    assert!(pragma.is_hit());
    assert_eq!(origin.log.calls(), before);
    let only_cached = call(
        ignore.clone(),
        get_with(
            "http://api.test/none",
            &[("cache-control", "only-if-cached")],
        ),
    )
    .await;
    assert_eq!(only_cached.status, StatusCode::GATEWAY_TIMEOUT);
    let no_store = call(
        ignore.clone(),
        get_with("http://api.test/kept-out", &[("cache-control", "no-store")]),
    )
    .await;
    assert!(
        no_store.cache_status().ends_with("detail=no-store"),
        "{}",
        no_store.cache_status()
    );
    assert!(!call(ignore, get("http://api.test/kept-out")).await.is_hit());
}

#[tokio::test]
async fn unsafe_methods_pass_through() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer().ttl(Duration::from_secs(60)));
    for _ in 0..2 {
        let post = call(
            app.clone(),
            Request::post("http://api.test/x")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(post.cache_status(), "tower-hybrid-cache; fwd=bypass");
    }
    assert_eq!(origin.log.calls(), 2);
    assert_eq!(cache.stats().bypasses, 2);
}

#[tokio::test]
async fn ignored_query_params_and_key_headers_shape_the_key() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(
        &origin,
        cache
            .layer()
            .ttl(Duration::from_secs(60))
            .ignore_query_params(["utm_*", "fbclid"])
            .key_headers([http::HeaderName::from_static("x-tenant")]),
    );
    call(
        app.clone(),
        get_with(
            "http://api.test/s?q=rust&utm_source=mail",
            &[("x-tenant", "a")],
        ),
    )
    .await;
    stored(&cache, 1).await;
    let same = call(
        app.clone(),
        get_with("http://api.test/s?fbclid=1&q=rust", &[("x-tenant", "a")]),
    )
    .await;
    assert!(same.is_hit());
    let other_tenant = call(
        app.clone(),
        get_with("http://api.test/s?q=rust", &[("x-tenant", "b")]),
    )
    .await;
    assert!(!other_tenant.is_hit());
    let other_query = call(
        app,
        get_with("http://api.test/s?q=go", &[("x-tenant", "a")]),
    )
    .await;
    assert!(!other_query.is_hit());
}

#[tokio::test]
async fn headers_can_be_turned_off() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(
        &origin,
        cache
            .layer()
            .ttl(Duration::from_secs(60))
            .cache_status_header(false)
            .age_header(false),
    );
    call(app.clone(), get("http://api.test/quiet")).await;
    stored(&cache, 1).await;
    let hit = call(app, get("http://api.test/quiet")).await;
    assert!(hit.headers.get("cache-status").is_none());
    assert!(hit.headers.get("age").is_none());
    assert_eq!(cache.stats().hits, 1);
}

#[tokio::test]
async fn one_cache_serves_routes_with_different_settings() {
    let cache = new_cache().await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = |c: std::sync::Arc<std::sync::atomic::AtomicUsize>| {
        move || {
            let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { format!("call {n}") }
        }
    };
    let app = Router::new()
        .route(
            "/short",
            axum::routing::get(counter(calls.clone()))
                .layer(cache.layer().ttl(Duration::from_secs(5))),
        )
        .route(
            "/long",
            axum::routing::get(counter(calls.clone()))
                .layer(cache.layer().ttl(Duration::from_secs(500))),
        )
        .merge(
            Router::new()
                .route("/routed", axum::routing::get(counter(calls.clone())))
                .route_layer(cache.layer().ttl(Duration::from_secs(50))),
        );
    for path in ["/short", "/long", "/routed"] {
        call(app.clone(), get(path)).await;
    }
    stored(&cache, 3).await;
    let short = call(app.clone(), get("/short")).await.cache_status();
    let long = call(app.clone(), get("/long")).await.cache_status();
    assert!(
        short.contains("hit; ttl=4") || short.contains("hit; ttl=5"),
        "{short}"
    );
    assert!(long.contains("hit; ttl=49"), "{long}");
    let routed = call(app.clone(), get("/routed")).await.cache_status();
    assert!(routed.contains("hit; ttl=4"), "{routed}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_hit_keeps_every_stored_field_line_in_order() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer());
    let url = "http://api.test/lines?h=cache-control:max-age%3D60\
        &h=link:%3C%2Fa%3E%3B%20rel%3Dpreload&h=x-one:1&h=link:%3C%2Fb%3E%3B%20rel%3Dpreload\
        &h=x-two:2&h=x-three:3&h=x-four:4&h=x-five:5";
    let first = call(app.clone(), get(url)).await;
    stored(&cache, 1).await;
    let hit = call(app, get(url)).await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    let lines = |got: &Got, name: &str| -> Vec<String> {
        got.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        lines(&hit, "link"),
        ["</a>; rel=preload", "</b>; rel=preload"]
    );
    for name in [
        "x-one",
        "x-two",
        "x-three",
        "x-four",
        "x-five",
        "cache-control",
    ] {
        assert_eq!(lines(&hit, name), lines(&first, name), "{name}");
    }
    assert_eq!(hit.headers.get_all("age").iter().count(), 1);
    assert_eq!(hit.headers.get_all("cache-status").iter().count(), 1);
}

#[tokio::test]
async fn errors_of_the_inner_service_pass_through_untouched() {
    #[derive(Debug, PartialEq)]
    struct OriginDown(u32);
    let cache = new_cache().await;
    let failing = tower::service_fn(|_req: Request<RequestBody<Body>>| async {
        Err::<Response<Body>, _>(OriginDown(7))
    });
    let service = tower::Layer::layer(&cache.layer().ttl(Duration::from_secs(60)), failing);
    for _ in 0..2 {
        let err = service
            .clone()
            .oneshot(get("http://api.test/down"))
            .await
            .unwrap_err();
        assert_eq!(err, OriginDown(7));
    }
    // And the failure stored nothing nor left anyone waiting.
    let ok = tower::service_fn(|_req: Request<RequestBody<Body>>| async {
        Ok::<_, Infallible>(Response::new(Body::from("up")))
    });
    let service = tower::Layer::layer(&cache.layer().ttl(Duration::from_secs(60)), ok);
    let got = call(service, get("http://api.test/down")).await;
    assert_eq!(got.text(), "up");
    stored(&cache, 1).await;
    assert_eq!(cache.stats().stores, 1, "the failures stored nothing");
}

#[tokio::test]
async fn thirty_two_concurrent_misses_make_one_origin_call() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer().ttl(Duration::from_secs(60)));
    let url = "http://api.test/popular?gate=1";
    let requests: Vec<_> = (0..32)
        .map(|_| tokio::spawn(call(app.clone(), get(url))))
        .collect();
    // Every follower is waiting on the leader before the origin answers.
    eventually("31 followers", WAIT, || async {
        cache.stats().coalesced == 31
    })
    .await;
    assert_eq!(origin.log.calls(), 1);
    origin.gate.add_permits(1);
    let mut bodies = Vec::new();
    for request in requests {
        bodies.push(request.await.unwrap());
    }
    assert_eq!(origin.log.calls(), 1);
    assert!(bodies.iter().all(|b| b.body == bodies[0].body));
    assert_eq!(bodies.iter().filter(|b| b.is_hit()).count(), 31);
}

#[tokio::test]
async fn an_uncacheable_leader_releases_its_followers_at_once() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer().ttl(Duration::from_secs(60)));
    let url = "http://api.test/nostore?gate=1&h=cache-control:no-store";
    let requests: Vec<_> = (0..8)
        .map(|_| tokio::spawn(call(app.clone(), get(url))))
        .collect();
    eventually("7 followers", WAIT, || async {
        cache.stats().coalesced == 7
    })
    .await;
    // The followers go to the origin themselves once the leader's answer proves
    // uncacheable: 8 permits for 8 calls, well before the 5 s follower timeout.
    origin.gate.add_permits(8);
    let started = std::time::Instant::now();
    for request in requests {
        assert!(!request.await.unwrap().is_hit());
    }
    assert_eq!(origin.log.calls(), 8);
    // Not a timing assertion of the machine's speed: a follower that missed the
    // release would wait the whole 5 s timeout.
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn followers_stop_waiting_for_a_slow_leader() {
    let (origin, cache) = (
        Origin::new(),
        HybridCache::builder()
            .single_flight_timeout(Duration::from_secs(2))
            .build()
            .await
            .unwrap(),
    );
    let app = app(&origin, cache.layer().ttl(Duration::from_secs(60)));
    let url = "http://api.test/slow?gate=1";
    let leader = tokio::spawn(call(app.clone(), get(url)));
    eventually("the leader at the origin", WAIT, || async {
        origin.log.calls() == 1
    })
    .await;
    let follower = tokio::spawn(call(app.clone(), get(url)));
    eventually("the follower waiting", WAIT, || async {
        cache.stats().coalesced == 1
    })
    .await;
    // The follower gives up after 2 s (virtual time) and makes its own call.
    eventually("the follower at the origin", WAIT, || async {
        origin.log.calls() == 2
    })
    .await;
    origin.gate.add_permits(2);
    assert!(!follower.await.unwrap().is_hit());
    assert!(!leader.await.unwrap().is_hit());
}

#[tokio::test]
async fn conditional_requests_on_a_fresh_entry_get_304_from_the_cache() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer());
    let url = "http://api.test/cond?h=cache-control:max-age%3D60&h=etag:W/%22v1%22\
               &h=last-modified:Fri,%2001%20May%202026%2000:00:00%20GMT&h=x-extra:1";
    call(app.clone(), get(url)).await;
    stored(&cache, 1).await;
    for condition in ["\"v1\"", "W/\"v1\"", "\"v0\", \"v1\"", "*"] {
        let got = call(app.clone(), get_with(url, &[("if-none-match", condition)])).await;
        assert_eq!(got.status, StatusCode::NOT_MODIFIED, "{condition}");
        assert!(got.body.is_empty());
        assert!(got.is_hit(), "{}", got.cache_status());
        assert_eq!(got.headers["etag"], "W/\"v1\"");
        assert_eq!(got.headers["cache-control"], "max-age=60");
        assert!(got.headers.contains_key("age"));
        assert!(!got.headers.contains_key("x-extra"), "only the 304 fields");
    }
    let changed = call(app.clone(), get_with(url, &[("if-none-match", "\"v2\"")])).await;
    assert_eq!(changed.status, StatusCode::OK);
    assert!(changed.is_hit() && !changed.body.is_empty());

    let since = |date: &'static str| get_with(url, &[("if-modified-since", date)]);
    let later = call(app.clone(), since("Mon, 01 Jun 2026 00:00:00 GMT")).await;
    assert_eq!(later.status, StatusCode::NOT_MODIFIED);
    let earlier = call(app.clone(), since("Wed, 01 Apr 2026 00:00:00 GMT")).await;
    assert_eq!(earlier.status, StatusCode::OK);
    // If-None-Match wins over If-Modified-Since.
    let both = call(
        app.clone(),
        get_with(
            url,
            &[
                ("if-none-match", "\"v2\""),
                ("if-modified-since", "Mon, 01 Jun 2026 00:00:00 GMT"),
            ],
        ),
    )
    .await;
    assert_eq!(both.status, StatusCode::OK);
    // Preconditions only the origin can judge go to it.
    let if_match = call(app.clone(), get_with(url, &[("if-match", "\"v9\"")])).await;
    assert!(
        if_match.cache_status().contains("fwd=request"),
        "{}",
        if_match.cache_status()
    );
    assert_eq!(origin.log.calls(), 2);
}

#[tokio::test]
async fn a_stored_error_status_never_becomes_304() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer());
    let url = "http://api.test/gone?status=404&h=cache-control:max-age%3D60&h=etag:%22x%22";
    call(app.clone(), get(url)).await;
    stored(&cache, 1).await;
    let got = call(app.clone(), get_with(url, &[("if-none-match", "\"x\"")])).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert!(got.is_hit());
}

#[tokio::test]
async fn the_cache_status_name_names_this_cache() {
    let origin = Origin::new();
    let cache = HybridCache::builder()
        .cache_status_name("edge-7")
        .build()
        .await
        .unwrap();
    let app = app(&origin, cache.layer().ttl(Duration::from_secs(60)));
    let miss = call(app.clone(), get("http://api.test/named")).await;
    assert_eq!(
        miss.cache_status(),
        "edge-7; fwd=uri-miss; fwd-status=200; stored"
    );
    stored(&cache, 1).await;
    let hit = call(app.clone(), get("http://api.test/named")).await;
    assert!(
        hit.cache_status().starts_with("edge-7; hit; ttl="),
        "{}",
        hit.cache_status()
    );
    let bypass = call(
        app,
        Request::post("http://api.test/named")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(bypass.cache_status(), "edge-7; fwd=bypass");
}

#[tokio::test]
async fn public_gives_no_lifetime_immutable_no_transform_change_nothing_and_must_understand_yields_no_store(
) {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(
        &origin,
        cache.layer().request_directives(RequestDirectives::Honour),
    );
    // `public` alone: nothing says how long it is fresh.
    let public = "http://api.test/pub?h=cache-control:public";
    let got = call(app.clone(), get(public)).await;
    assert!(
        got.cache_status().ends_with("detail=no-freshness"),
        "{}",
        got.cache_status()
    );
    // The others beside max-age: stored and served as max-age alone would be.
    let mut stores = 0;
    for cc in [
        "max-age%3D60,%20immutable",
        "max-age%3D60,%20no-transform",
        "max-age%3D60,%20must-understand",
    ] {
        let url = format!("http://api.test/same?h=cache-control:{cc}");
        let miss = call(app.clone(), get(&url)).await;
        assert!(miss.cache_status().ends_with("stored"), "{cc}");
        stores += 1;
        stored(&cache, stores).await;
        let hit = call(app.clone(), get(&url)).await;
        assert!(hit.is_hit(), "{cc}: {}", hit.cache_status());
        assert_eq!(hit.body, miss.body, "{cc}: the body untransformed");
        // `immutable` does not stop a reload from reaching the origin.
        let reload = call(
            app.clone(),
            get_with(&url, &[("cache-control", "no-cache")]),
        )
        .await;
        assert!(reload.cache_status().contains("fwd=request"), "{cc}");
        stores += 1;
        stored(&cache, stores).await;
    }
    // `must-understand` beside `no-store` (RFC 9111 §5.2.2.3): a status this cache
    // knows is stored; one it does not is not.
    let url = "http://api.test/mu?h=cache-control:must-understand,%20no-store,%20max-age%3D60";
    let got = call(app.clone(), get(url)).await;
    assert!(
        got.cache_status().ends_with("stored"),
        "{}",
        got.cache_status()
    );
    let url =
        "http://api.test/mu?status=599&h=cache-control:must-understand,%20no-store,%20max-age%3D60";
    let got = call(app.clone(), get(url)).await;
    assert!(
        got.cache_status().ends_with("detail=status"),
        "{}",
        got.cache_status()
    );
}

#[tokio::test]
async fn a_request_max_age_refuses_entries_older_than_it() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(
        &origin,
        cache.layer().request_directives(RequestDirectives::Honour),
    );
    // Already 100 s old when it arrived, fresh for 500 s more.
    let url = "http://api.test/old?h=cache-control:max-age%3D600&h=age:100";
    call(app.clone(), get(url)).await;
    stored(&cache, 1).await;
    let too_old = call(
        app.clone(),
        get_with(url, &[("cache-control", "max-age=50")]),
    )
    .await;
    assert!(
        too_old.cache_status().contains("fwd=request"),
        "{}",
        too_old.cache_status()
    );
    stored(&cache, 2).await;
    let young_enough = call(
        app.clone(),
        get_with(url, &[("cache-control", "max-age=300")]),
    )
    .await;
    assert!(young_enough.is_hit(), "{}", young_enough.cache_status());
    assert_eq!(origin.log.calls(), 2);
}

#[tokio::test]
async fn pragma_and_max_stale_are_ignored() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer());
    let url = "http://api.test/pragma?h=cache-control:max-age%3D1";
    call(app.clone(), get(url)).await;
    stored(&cache, 1).await;
    // `Pragma: no-cache` (deprecated) does not force a refetch.
    let pragma = call(app.clone(), get_with(url, &[("pragma", "no-cache")])).await;
    assert!(pragma.is_hit(), "{}", pragma.cache_status());
    // Once stale, `max-stale` does not make the cache serve it: no window granted.
    eventually("the entry to go stale", WAIT, || {
        let app = app.clone();
        async move {
            let got = call(app, get_with(url, &[("cache-control", "max-stale=3600")])).await;
            assert!(
                !got.cache_status().contains("ttl=-"),
                "{}",
                got.cache_status()
            );
            !got.is_hit()
        }
    })
    .await;
}

#[tokio::test]
async fn requests_with_cookies_are_cached_like_any_other() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer().ttl(Duration::from_secs(60)));
    let url = "http://api.test/cookie";
    let first = call(app.clone(), get_with(url, &[("cookie", "session=a")])).await;
    assert!(
        first.cache_status().ends_with("stored"),
        "{}",
        first.cache_status()
    );
    stored(&cache, 1).await;
    let other = call(app.clone(), get_with(url, &[("cookie", "session=b")])).await;
    assert!(other.is_hit(), "{}", other.cache_status());
    assert_eq!(other.body, first.body);
    assert_eq!(origin.log.calls(), 1);
}

#[tokio::test]
async fn if_unmodified_since_and_if_match_go_to_the_origin_with_the_request() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(&origin, cache.layer());
    let url = "http://api.test/pre?h=cache-control:max-age%3D60&h=etag:%22v1%22";
    call(app.clone(), get(url)).await;
    stored(&cache, 1).await;
    // (`If-Range` is judged against the stored response: tests/http_conformance.)
    for (name, value) in [
        ("if-unmodified-since", "Mon, 01 Jun 2026 00:00:00 GMT"),
        ("if-match", "\"v1\""),
    ] {
        let got = call(app.clone(), get_with(url, &[(name, value)])).await;
        assert!(
            got.cache_status().contains("fwd=request"),
            "{name}: {}",
            got.cache_status()
        );
        let seen = origin.log.last_headers().unwrap();
        assert_eq!(seen[name], value, "{name} reached the origin");
    }
    assert_eq!(origin.log.calls(), 3);
}

#[tokio::test]
async fn keep_query_params_keys_on_the_named_parameters_only() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(
        &origin,
        cache
            .layer()
            .ttl(Duration::from_secs(60))
            .keep_query_params(["q", "page*"]),
    );
    call(
        app.clone(),
        get("http://api.test/k?q=rust&page=2&session=1"),
    )
    .await;
    stored(&cache, 1).await;
    let same = call(
        app.clone(),
        get("http://api.test/k?session=9&page=2&q=rust"),
    )
    .await;
    assert!(same.is_hit(), "{}", same.cache_status());
    let other_page = call(app.clone(), get("http://api.test/k?q=rust&page=3")).await;
    assert!(!other_page.is_hit());
    let other_prefixed = call(app, get("http://api.test/k?q=rust&page=2&page_size=9")).await;
    assert!(!other_prefixed.is_hit());
}

#[tokio::test]
async fn ignoring_request_directives_still_honours_no_store() {
    let (origin, cache) = (Origin::new(), new_cache().await);
    let app = app(
        &origin,
        cache
            .layer()
            .ttl(Duration::from_secs(60))
            .request_directives(RequestDirectives::Ignore),
    );
    let url = "http://api.test/ns";
    let got = call(app.clone(), get_with(url, &[("cache-control", "no-store")])).await;
    assert!(
        got.cache_status().ends_with("detail=no-store"),
        "{}",
        got.cache_status()
    );
    let next = call(app.clone(), get(url)).await;
    assert!(
        next.cache_status().contains("fwd=uri-miss"),
        "{}",
        next.cache_status()
    );
    assert_eq!(cache.stats().not_stored, 1);
    // Stored now; a no-store request may still be answered by it.
    stored(&cache, 1).await;
    let hit = call(app, get_with(url, &[("cache-control", "no-store")])).await;
    assert!(hit.is_hit(), "{}", hit.cache_status());
}

#[tokio::test]
async fn a_body_with_trailers_is_served_whole_and_not_stored() {
    use http_body_util::StreamBody;
    let cache = new_cache().await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let origin = tower::service_fn(move |_request: Request<RequestBody<Body>>| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-checksum", "abc".parse().unwrap());
            let frames: Vec<Result<http_body::Frame<bytes::Bytes>, Infallible>> = vec![
                Ok(http_body::Frame::data(bytes::Bytes::from_static(
                    b"part one, ",
                ))),
                Ok(http_body::Frame::data(bytes::Bytes::from_static(
                    b"part two",
                ))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = StreamBody::new(futures_util::stream::iter(frames));
            Ok::<_, Infallible>(Response::new(body))
        }
    });
    let service = tower::Layer::layer(&cache.layer().ttl(Duration::from_secs(60)), origin);
    for _ in 0..2 {
        let response = service
            .clone()
            .oneshot(get("http://api.test/trailers"))
            .await
            .unwrap();
        let collected = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
        assert_eq!(&collected.to_bytes()[..], b"part one, part two");
    }
    eventually("both captures dropped", WAIT, || async {
        cache.stats().not_stored == 2
    })
    .await;
    assert_eq!(cache.stats().stores, 0);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}
