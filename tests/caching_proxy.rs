//! The caching proxy example on a real socket, in front of a real origin server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/caching_proxy.rs"]
mod caching_proxy;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use support::{eventually, fetch, pattern, Origin};
use tower_hybrid_cache::HybridCache;

const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    origin: Origin,
    cache: HybridCache,
    proxy: SocketAddr,
}

/// The layer `caching_proxy` builds when given no flags but `--upstream`.
fn default_layer(cache: &HybridCache) -> tower_hybrid_cache::HybridCacheLayer {
    caching_proxy::Args::try_parse_from(["caching_proxy", "--upstream", "http://upstream.test"])
        .unwrap()
        .route
        .layer(cache)
        .unwrap()
}

async fn setup() -> Setup {
    let origin = Origin::new();
    let upstream = origin.spawn().await;
    let cache = HybridCache::builder().build().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let upstream = format!("http://{upstream}").parse().unwrap();
    let layer = default_layer(&cache);
    tokio::spawn(caching_proxy::serve(listener, upstream, layer));
    Setup {
        origin,
        cache,
        proxy,
    }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    async fn stored(&self, n: u64) {
        eventually(&format!("{n} stores"), WAIT, || async {
            self.cache.stats().stores >= n
        })
        .await;
    }
}

#[tokio::test]
async fn the_proxy_serves_stale_while_its_upstream_is_down() {
    let origin = Origin::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream: http::Uri = format!("http://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    let router = origin.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let cache = HybridCache::builder().build().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let layer = default_layer(&cache);
    tokio::spawn(caching_proxy::serve(listener, upstream, layer));
    let client = support::client();
    // `Connection: close`: no pooled connection outlives the server.
    let url = format!("http://{proxy}/down?h=cache-control:max-age%3D1&h=connection:close");
    let first = fetch(&client, "GET", &url, &[]).await;
    // must-revalidate forbids it.
    let strict = format!(
        "http://{proxy}/strict?h=cache-control:max-age%3D1,must-revalidate&h=connection:close"
    );
    fetch(&client, "GET", &strict, &[]).await;
    eventually("the stores", WAIT, || async { cache.stats().stores >= 2 }).await;
    server.abort();
    let _ = server.await;
    eventually("stale-if-error", WAIT, || async {
        let got = fetch(&client, "GET", &url, &[]).await;
        got.status == http::StatusCode::OK
            && got.body == first.body
            && got.cache_status().contains("detail=stale-if-error")
    })
    .await;
    let got = fetch(&client, "GET", &strict, &[]).await;
    assert_eq!(
        got.status,
        http::StatusCode::BAD_GATEWAY,
        "{}",
        got.cache_status()
    );
}

#[tokio::test]
async fn the_proxy_obeys_cdn_cache_control_and_forwards_it() {
    let s = setup().await;
    let client = support::client();
    let url = s.url("/cdn?h=cache-control:no-store&h=cdn-cache-control:max-age%3D120");
    let miss = fetch(&client, "GET", &url, &[]).await;
    assert!(
        miss.cache_status().ends_with("stored"),
        "{}",
        miss.cache_status()
    );
    s.stored(1).await;
    let hit = fetch(&client, "GET", &url, &[]).await;
    assert!(hit.is_hit(), "{}", hit.cache_status());
    for got in [&miss, &hit] {
        assert_eq!(got.header("cache-control"), Some("no-store"));
        assert_eq!(got.header("cdn-cache-control"), Some("max-age=120"));
    }
}

#[tokio::test]
async fn the_proxy_caches_by_the_origin_headers() {
    let s = setup().await;
    let client = support::client();
    let url = s.url("/jobs/1?h=cache-control:public,max-age%3D120&h=content-type:application/json");
    let miss = fetch(&client, "GET", &url, &[]).await;
    assert_eq!(
        miss.cache_status(),
        "tower-hybrid-cache; fwd=uri-miss; fwd-status=200; stored"
    );
    assert!(miss
        .headers
        .get_all("via")
        .iter()
        .any(|v| v == "1.1 tower-hybrid-cache"));
    s.stored(1).await;
    let hit = fetch(&client, "GET", &url, &[]).await;
    assert!(hit.is_hit(), "{}", hit.cache_status());
    assert_eq!(hit.body, miss.body);
    assert_eq!(hit.headers["content-type"], "application/json");
    assert!(hit.age().is_some());
    let head = fetch(&client, "HEAD", &url, &[]).await;
    assert!(head.is_hit());
    assert!(head.body.is_empty());
    assert_eq!(head.headers["content-length"], miss.body.len().to_string());
    assert_eq!(s.origin.log.calls(), 1);

    // Without freshness from the origin (and no route TTL) nothing is stored.
    let plain = s.url("/plain");
    fetch(&client, "GET", &plain, &[]).await;
    let again = fetch(&client, "GET", &plain, &[]).await;
    assert!(
        again.cache_status().ends_with("detail=no-freshness"),
        "{}",
        again.cache_status()
    );
    assert_eq!(s.origin.log.calls_to("/plain"), 2);
    // The proxy forwards with its own Host to the origin.
    let seen = s.origin.log.last_headers().unwrap();
    assert!(seen.get("via").is_some());
}

#[tokio::test]
async fn a_204_is_stored_and_replayed_without_a_length() {
    let s = setup().await;
    let client = support::client();
    let url = s.url("/empty?status=204&h=cache-control:max-age%3D60");
    let miss = fetch(&client, "GET", &url, &[]).await;
    assert_eq!(miss.status, http::StatusCode::NO_CONTENT);
    s.stored(1).await;
    let hit = fetch(&client, "GET", &url, &[]).await;
    assert!(hit.is_hit(), "{}", hit.cache_status());
    assert_eq!(hit.status, http::StatusCode::NO_CONTENT);
    assert!(hit.body.is_empty());
    assert!(hit.headers.get("content-length").is_none());
}

#[tokio::test]
async fn vary_variants_through_the_proxy() {
    let s = setup().await;
    let client = support::client();
    let url = s.url("/v?h=cache-control:max-age%3D60&h=vary:accept-encoding,accept-language&echo=accept-language");
    let langs = ["en", "fr", "de"];
    for (i, lang) in langs.iter().enumerate() {
        let got = fetch(&client, "GET", &url, &[("accept-language", lang)]).await;
        assert!(!got.is_hit());
        s.stored(i as u64 + 1).await;
    }
    for lang in langs {
        let got = fetch(&client, "GET", &url, &[("accept-language", lang)]).await;
        assert!(got.is_hit(), "{lang}");
        assert!(
            got.text().contains(&format!("Some(\"{lang}\")")),
            "{}",
            got.text()
        );
    }
    assert_eq!(s.origin.log.calls(), 3);
}

#[tokio::test]
async fn a_5_mb_body_streams_intact_and_is_not_stored() {
    let s = setup().await;
    let client = support::client();
    let five_mb = 5 * 1024 * 1024;
    for query in ["size=5242880", "size=5242880&chunked=1"] {
        let url = s.url(&format!("/big?{query}&h=cache-control:max-age%3D60"));
        for _ in 0..2 {
            let got = fetch(&client, "GET", &url, &[]).await;
            assert_eq!(got.body.len(), five_mb, "{query}");
            assert!(got.body == pattern(five_mb), "{query}: bytes differ");
            assert!(!got.is_hit(), "{query}");
        }
    }
    assert_eq!(s.origin.log.calls(), 4);
    assert_eq!(s.cache.stats().stores, 0);
    // A known length is refused before a byte is read; a streamed one once it passes
    // the limit.
    let known = fetch(
        &client,
        "GET",
        &s.url("/big?size=5242880&h=cache-control:max-age%3D60"),
        &[],
    )
    .await;
    assert!(
        known.cache_status().ends_with("detail=too-large"),
        "{}",
        known.cache_status()
    );
}

#[tokio::test]
async fn thirty_two_concurrent_misses_over_tcp_make_one_origin_call() {
    let s = setup().await;
    let client = support::client();
    let url = s.url("/hot?gate=1&h=cache-control:max-age%3D60");
    let requests: Vec<_> = (0..32)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move { fetch(&client, "GET", &url, &[]).await })
        })
        .collect();
    eventually("31 followers", WAIT, || async {
        s.cache.stats().coalesced == 31
    })
    .await;
    s.origin.gate.add_permits(1);
    let mut hits = 0;
    for request in requests {
        let got = request.await.unwrap();
        assert!(got.text().starts_with("body of /hot"));
        hits += usize::from(got.is_hit());
    }
    assert_eq!(hits, 31);
    assert_eq!(s.origin.log.calls(), 1);
}

#[tokio::test]
async fn an_unreachable_origin_is_a_502_not_a_dropped_connection() {
    let cache = HybridCache::builder().build().await.unwrap();
    // A port that was free a moment ago: nothing listens there.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(caching_proxy::serve(
        listener,
        format!("http://{dead}").parse().unwrap(),
        cache.layer(),
    ));
    let got = fetch(&support::client(), "GET", &format!("http://{proxy}/x"), &[]).await;
    assert_eq!(got.status, http::StatusCode::BAD_GATEWAY);
    assert_eq!(
        got.cache_status(),
        "tower-hybrid-cache; fwd=uri-miss; fwd-status=502; detail=no-freshness"
    );
}

#[tokio::test]
async fn two_proxies_on_one_redis_share_entries() {
    let redis = support::redis::RedisServer::start();
    let origin = Origin::new();
    let upstream: http::Uri = format!("http://{}", origin.spawn().await).parse().unwrap();
    let mut proxies = Vec::new();
    let mut caches = Vec::new();
    for _ in 0..2 {
        let cache = HybridCache::builder()
            .redis_url(redis.url())
            .build()
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        proxies.push(listener.local_addr().unwrap());
        tokio::spawn(caching_proxy::serve(
            listener,
            upstream.clone(),
            cache.layer(),
        ));
        caches.push(cache);
    }
    let client = support::client();
    let path = "/shared?h=cache-control:public,max-age%3D120";
    // Behind a load balancer both replicas see the same Host.
    let host = [("host", "jobs.example")];
    let miss = fetch(
        &client,
        "GET",
        &format!("http://{}{path}", proxies[0]),
        &host,
    )
    .await;
    assert!(
        miss.cache_status().ends_with("stored"),
        "{}",
        miss.cache_status()
    );
    eventually("the write to reach Redis", WAIT, || async {
        caches[0].stats().redis_writes == 1
    })
    .await;
    let hit = fetch(
        &client,
        "GET",
        &format!("http://{}{path}", proxies[1]),
        &host,
    )
    .await;
    assert!(
        hit.cache_status().ends_with("detail=redis"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(hit.body, miss.body);
    assert_eq!(origin.log.calls(), 1);
}

#[tokio::test]
async fn through_the_proxy_304s_writes_invalidate_and_tags_purge() {
    let s = setup().await;
    let client = support::client();
    let url = s.url("/doc?h=cache-control:max-age%3D120&h=etag:%22d1%22&h=cache-tag:doc%20site");
    let miss = fetch(&client, "GET", &url, &[]).await;
    assert!(
        !miss.headers.contains_key("cache-tag"),
        "tags stay in the cache"
    );
    s.stored(1).await;
    let not_modified = fetch(&client, "GET", &url, &[("if-none-match", "\"d1\"")]).await;
    assert_eq!(not_modified.status, http::StatusCode::NOT_MODIFIED);
    assert!(not_modified.is_hit());

    // A successful POST to the URL invalidates it.
    let posted = fetch(&client, "POST", &url, &[]).await;
    assert!(posted.status.is_success());
    assert!(!fetch(&client, "GET", &url, &[]).await.is_hit());
    s.stored(2).await;
    assert!(fetch(&client, "GET", &url, &[]).await.is_hit());

    // A tag invalidation forgets it again.
    assert!(s.cache.invalidate_tag("site").await);
    assert!(!fetch(&client, "GET", &url, &[]).await.is_hit());
}

#[tokio::test]
async fn through_the_proxy_stale_while_revalidate_answers_at_once() {
    let s = setup().await;
    let client = support::client();
    let url = s.url("/feed?h=cache-control:max-age%3D1,%20stale-while-revalidate%3D60");
    let first = fetch(&client, "GET", &url, &[]).await;
    s.stored(1).await;
    eventually("a stale-while-revalidate hit", WAIT, || async {
        let got = fetch(&client, "GET", &url, &[]).await;
        got.cache_status().contains("detail=stale-while-revalidate") && got.body == first.body
    })
    .await;
    eventually("the background refresh", WAIT, || async {
        s.origin.log.calls() == 2 && s.cache.stats().stores >= 2
    })
    .await;
}

#[tokio::test]
async fn an_h2c_client_is_forwarded_over_http_1_1() {
    let s = setup().await;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let url = s.url("/h2c?h=cache-control:max-age%3D60");
    for _ in 0..2 {
        let response = client
            .request(
                http::Request::get(&url)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(response.version(), http::Version::HTTP_2);
        s.stored(1).await;
    }
    assert_eq!(s.origin.log.calls(), 1);
}

#[tokio::test]
async fn hop_by_hop_fields_of_the_upstream_stop_at_the_proxy() {
    let s = setup().await;
    let client = support::client();
    let url = s.url("/hop?h=connection:x-hop&h=x-hop:1&h=keep-alive:timeout%3D5&h=x-end:1");
    let got = fetch(&client, "GET", &url, &[]).await;
    assert_eq!(got.status, http::StatusCode::OK);
    assert_eq!(got.header("x-end"), Some("1"));
    assert_eq!(got.header("x-hop"), None);
    assert_eq!(got.header("keep-alive"), None);
}

#[tokio::test]
async fn an_upstream_framing_its_body_two_ways_is_answered_by_its_chunks() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that sends both Transfer-Encoding and Content-Length (RFC 9112
    // §6.3: the chunks count, the length does not).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream: http::Uri = format!("http://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buffer = [0_u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buffer[..n]),
                    }
                }
                let answer =
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\
                              Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    let cache = HybridCache::builder().build().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(caching_proxy::serve(listener, upstream, cache.layer()));
    let got = fetch(
        &support::client(),
        "GET",
        &format!("http://{proxy}/both"),
        &[],
    )
    .await;
    assert!(
        got.status == http::StatusCode::OK && got.body.as_ref() == b"hello"
            || got.status == http::StatusCode::BAD_GATEWAY,
        "{} {:?}",
        got.status,
        got.body
    );
}

#[tokio::test]
async fn the_health_check_is_answered_by_the_proxy_itself() {
    let s = setup().await;
    let client = support::client();
    for _ in 0..2 {
        let got = fetch(&client, "GET", &s.url(caching_proxy::HEALTH_PATH), &[]).await;
        assert_eq!(got.status, http::StatusCode::OK);
        assert_eq!(got.text(), "ok\n");
        assert!(got.cache_status().is_empty());
    }
    assert_eq!(s.origin.log.calls(), 0);
}

#[tokio::test]
async fn on_stop_the_proxy_finishes_requests_in_flight_then_returns() {
    let origin = Origin::new();
    let upstream: http::Uri = format!("http://{}", origin.spawn().await).parse().unwrap();
    let cache = HybridCache::builder().build().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(caching_proxy::serve_until(
        listener,
        upstream,
        default_layer(&cache),
        None,
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(30),
    ));
    // A request the origin holds until its gate opens.
    let in_flight = tokio::spawn(async move {
        fetch(
            &support::client(),
            "GET",
            &format!("http://{proxy}/slow?gate=1"),
            &[],
        )
        .await
    });
    eventually(
        "the request at the origin",
        Duration::from_secs(10),
        || async { origin.log.calls() == 1 },
    )
    .await;
    stop.send(()).unwrap();
    // No longer accepting: a new connection is refused (polled: the accept loop
    // ends on its next turn).
    eventually(
        "new connections refused",
        Duration::from_secs(10),
        || async { tokio::net::TcpStream::connect(proxy).await.is_err() },
    )
    .await;
    // Still draining: a proxy that returned now would let its process exit under the
    // request. (The wait can only make a broken drain pass, never a sound one fail:
    // the drain waits up to its 30 s grace.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!server.is_finished(), "returned with a request in flight");
    origin.gate.add_permits(1);
    let got = in_flight.await.unwrap();
    assert_eq!(got.status, http::StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve_until returned after the drain")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_proxy_serves_its_metrics_beside_the_cache() {
    // A recorder local to this test's proxy: the process-wide one is not installed.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let origin = Origin::new();
    let upstream: http::Uri = format!("http://{}", origin.spawn().await).parse().unwrap();
    let cache = HybridCache::builder().build().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(caching_proxy::serve_until(
        listener,
        upstream,
        default_layer(&cache),
        Some(handle),
        std::future::pending(),
        Duration::ZERO,
    ));
    let got = fetch(
        &support::client(),
        "GET",
        &format!("http://{proxy}{}", caching_proxy::METRICS_PATH),
        &[],
    )
    .await;
    assert_eq!(got.status, http::StatusCode::OK);
    assert!(got
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert!(
        got.header("cache-status").is_none(),
        "not through the cache"
    );
    assert_eq!(origin.log.calls(), 0);
}
