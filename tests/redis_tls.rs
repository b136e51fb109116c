//! The Redis tier over TLS (`rediss://`, rustls) against a TLS-only redis-server.
//! A test binary of its own: it points `SSL_CERT_FILE` at the test CA, which rustls'
//! native certificate loader reads, and no other test should see that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::redis::RedisServer;
use support::{call, eventually, get, Origin};
use tower_hybrid_cache::HybridCache;

#[tokio::test]
async fn entries_are_shared_over_tls() {
    let redis = RedisServer::start_tls();
    let url = format!("rediss://localhost:{}", redis.port());
    // The server's certificate is verified: without its CA, no connection.
    let untrusting = HybridCache::builder()
        .redis_url(&url)
        .build()
        .await
        .unwrap();
    assert_eq!(untrusting.redis_health().unwrap().connected, 0);
    untrusting.shutdown().await;
    std::env::set_var("SSL_CERT_FILE", redis.tls_ca().unwrap());
    let one = HybridCache::builder()
        .redis_url(&url)
        .build()
        .await
        .unwrap();
    let two = HybridCache::builder()
        .redis_url(&url)
        .build()
        .await
        .unwrap();
    assert_eq!(
        one.redis_health().unwrap().connected,
        4,
        "{:?}",
        one.redis_health()
    );
    let origin = Origin::new();
    let page = "http://api.test/tls";
    call(
        origin
            .router()
            .layer(one.layer().ttl(Duration::from_secs(60))),
        get(page),
    )
    .await;
    eventually("the write", Duration::from_secs(15), || async {
        one.stats().redis_writes == 1
    })
    .await;
    let hit = call(
        origin
            .router()
            .layer(two.layer().ttl(Duration::from_secs(60))),
        get(page),
    )
    .await;
    assert!(
        hit.cache_status().ends_with("detail=redis"),
        "{}",
        hit.cache_status()
    );
    // The capability checks (on connecting) leave nothing behind once done.
    for cache in [&one, &two] {
        eventually("the capability check", Duration::from_secs(15), || async {
            cache.redis_health().unwrap().server_version.is_some()
        })
        .await;
    }
    // The entry, and the record of outages and this Redis's epoch.
    assert_eq!(redis.cli(&["DBSIZE"]), "2");
    assert_eq!(redis.cli(&["TYPE", "thc/outages"]), "zset");
}
