//! After an outage, against a real `redis-server` (replica A behind the fault proxy,
//! replica B straight on Redis, B never losing it): what was stored before Redis came
//! back is served once more and refreshed, with one refresh per key for the cluster,
//! so an invalidation that died with its replica outlives the outage by one refresh,
//! not by the TTL; and the replica that never saw the outage learns of it from Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/fault_proxy.rs"]
mod fault_proxy;
#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use fault_proxy::{Fault, FaultProxy};
use support::redis::RedisServer;
use support::{call, connected, eventually, get, Origin};
use tower_hybrid_cache::{HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(15);

async fn replica(url: &str) -> HybridCache {
    HybridCache::builder()
        .namespace("outage")
        .redis(
            RedisConfig::new(url)
                .command_timeout(Duration::from_millis(200))
                .deadline(Duration::from_millis(200))
                .connect_timeout(Duration::from_millis(200)),
        )
        .build()
        .await
        .unwrap()
}

/// Stores `url` through `cache` and waits until it is in Redis.
async fn stored(origin: &Origin, cache: &HybridCache, url: &str) {
    let writes = cache.stats().redis_writes;
    let got = call(origin.behind(cache), get(url)).await;
    assert!(
        got.cache_status().contains("stored"),
        "{}",
        got.cache_status()
    );
    eventually("the write in Redis", WAIT, || async {
        cache.stats().redis_writes > writes
    })
    .await;
}

#[tokio::test]
async fn an_invalidation_lost_with_its_replica_outlives_the_outage_by_one_refresh() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let origin = Origin::new();
    let b = replica(&redis.url()).await;
    connected(&b, WAIT).await;
    let url = "http://api.test/jobs/42";
    stored(&origin, &b, url).await;
    let before = call(origin.behind(&b), get(url)).await;
    assert!(before.text().ends_with("#1"), "{}", before.text());

    // Redis out of A's reach; A invalidates (kept for replay), then dies with it.
    proxy.set(Fault::Reset);
    let a = replica(&proxy.url()).await;
    let post = http::Request::post(url)
        .body(axum::body::Body::empty())
        .unwrap();
    call(origin.behind(&a), post).await;
    assert_eq!(a.pending_redis_operations(), 1);
    drop(a);
    // Its successor starts while Redis is still away, and reaches it later.
    let a = replica(&proxy.url()).await;
    proxy.set(Fault::None);
    connected(&a, WAIT).await;
    eventually("the recovery recorded in Redis", WAIT, || async {
        !redis
            .cli(&["ZSCORE", "outage/outages", "recovered"])
            .is_empty()
    })
    .await;

    // B never lost Redis, and still holds the entry the lost invalidation was for:
    // once it reads the recovery, it serves that entry once more and refreshes it.
    let refreshing = std::sync::atomic::AtomicUsize::new(0);
    eventually("B refreshes what predates the recovery", WAIT, || async {
        let got = call(origin.behind(&b), get(url)).await;
        assert!(got.is_hit(), "{}", got.cache_status());
        if got.cache_status().ends_with("detail=refresh-after-outage") {
            assert!(got.text().ends_with("#1"), "{}", got.text());
            refreshing.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        !got.text().ends_with("#1")
    })
    .await;
    assert!(
        refreshing.into_inner() >= 1,
        "served once more, then refreshed"
    );
    // The refresh (the origin's third call: B's fill, A's POST, the refresh) is now
    // what every replica serves, as a plain hit.
    let b_now = call(origin.behind(&b), get(url)).await;
    assert!(b_now.text().ends_with("#3"), "{}", b_now.text());
    assert!(
        b_now.cache_status().ends_with("detail=redis"),
        "{}",
        b_now.cache_status()
    );
    let a_now = call(origin.behind(&a), get(url)).await;
    assert_eq!(a_now.text(), b_now.text());
    assert!(
        a_now.cache_status().ends_with("detail=redis"),
        "{}",
        a_now.cache_status()
    );
    assert_eq!(origin.log.calls(), 3);
}

#[tokio::test]
async fn after_an_outage_each_key_is_refreshed_once_for_the_cluster() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let origin = Origin::new();
    let (a, b) = (replica(&proxy.url()).await, replica(&redis.url()).await);
    connected(&a, WAIT).await;
    connected(&b, WAIT).await;
    let (first, marker, held) = (
        "http://api.test/jobs/first",
        "http://api.test/jobs/marker",
        "http://api.test/jobs/held?gate=1",
    );
    stored(&origin, &b, first).await;
    stored(&origin, &b, marker).await;
    origin.gate.add_permits(1);
    stored(&origin, &b, held).await;

    // A loses Redis, and gets it back.
    proxy.set(Fault::Reset);
    eventually("A cut off", WAIT, || async {
        a.redis_health().unwrap().connected == 0
    })
    .await;
    proxy.set(Fault::None);
    connected(&a, WAIT).await;

    // A serves what predates its recovery once more, and refreshes it.
    let got = call(origin.behind(&a), get(first)).await;
    assert!(
        got.is_hit() && got.cache_status().ends_with("detail=refresh-after-outage"),
        "{}",
        got.cache_status()
    );
    eventually(
        "the refreshed entry served as a plain hit",
        WAIT,
        || async {
            call(origin.behind(&a), get(first))
                .await
                .cache_status()
                .ends_with("detail=redis")
        },
    )
    .await;
    assert_eq!(origin.log.calls_to("/jobs/first"), 2, "one refresh");

    // B, which never lost Redis, learns of A's recovery from it.
    eventually("B reads the recovery", WAIT, || async {
        call(origin.behind(&b), get(marker))
            .await
            .cache_status()
            .ends_with("detail=refresh-after-outage")
    })
    .await;

    // A's refresh of the held entry waits at the origin's gate; B serves the entry
    // meanwhile and, finding the refresh lease taken, leaves the refresh to A.
    let from_a = call(origin.behind(&a), get(held)).await;
    assert!(
        from_a
            .cache_status()
            .ends_with("detail=refresh-after-outage"),
        "{}",
        from_a.cache_status()
    );
    eventually("A's refresh at the origin", WAIT, || async {
        origin.log.calls_to("/jobs/held?gate=1") == 2
    })
    .await;
    for _ in 0..5 {
        let from_b = call(origin.behind(&b), get(held)).await;
        assert!(
            from_b
                .cache_status()
                .ends_with("detail=refresh-after-outage"),
            "{}",
            from_b.cache_status()
        );
    }
    origin.gate.add_permits(10);
    eventually(
        "the refreshed entry served as a plain hit",
        WAIT,
        || async {
            call(origin.behind(&b), get(held))
                .await
                .cache_status()
                .ends_with("detail=redis")
        },
    )
    .await;
    assert_eq!(
        origin.log.calls_to("/jobs/held?gate=1"),
        2,
        "one refresh for both replicas"
    );
}

#[tokio::test]
async fn a_redis_that_lost_its_data_is_reseeded_from_memory_not_refetched() {
    let mut redis = RedisServer::start();
    let origin = Origin::new();
    let a = replica(&redis.url()).await;
    connected(&a, WAIT).await;
    // More than one of the re-seed's pipelines (64 entries).
    const URLS: usize = 150;
    let urls: Vec<String> = (0..URLS)
        .map(|i| format!("http://api.test/jobs/seed/{i}"))
        .collect();
    for url in &urls {
        stored(&origin, &a, url).await;
    }
    eventually("A read the epoch", WAIT, || async {
        !redis.cli(&["ZSCORE", "outage/outages", "epoch"]).is_empty()
    })
    .await;
    let entries = |redis: &RedisServer| {
        redis
            .cli(&["--scan", "--pattern", "outage/v2:*"])
            .lines()
            .count()
    };
    assert_eq!(entries(&redis), URLS);

    // Redis comes back empty: A finds its epoch gone and puts its memory back.
    redis.restart();
    assert_eq!(entries(&redis), 0);
    eventually("Redis re-seeded from A's memory", WAIT, || async {
        entries(&redis) == URLS && a.stats().redis_reseeds == URLS as u64
    })
    .await;
    assert_eq!(origin.log.calls(), URLS, "nothing refetched to re-seed");

    // A replica with an empty memory finds every URL in Redis: hits, not misses; each
    // refreshed at most once.
    let c = replica(&redis.url()).await;
    connected(&c, WAIT).await;
    for url in &urls {
        let got = call(origin.behind(&c), get(url)).await;
        assert!(got.is_hit(), "{url}: {}", got.cache_status());
    }
    assert!(
        origin.log.calls() <= 2 * URLS,
        "{} origin calls",
        origin.log.calls()
    );
}
