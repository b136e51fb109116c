//! Redis Sentinel, against a real group (one primary, one replica, three sentinels
//! from `redis-server --sentinel`): entries shared through `redis-sentinel://`, a
//! failover followed, and handled as the fault it is: what was stored before is
//! refreshed once, and a new primary that lacks what the old one acknowledged is
//! re-seeded from memory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use support::redis::{RedisSentinelGroup, RedisServer};
use support::{call, connected, eventually, get, Origin};
use tower_hybrid_cache::{HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(30);

async fn replica(url: &str) -> HybridCache {
    HybridCache::builder()
        .namespace("sentinel")
        .redis(
            RedisConfig::new(url)
                .command_timeout(Duration::from_millis(300))
                .deadline(Duration::from_millis(300)),
        )
        .build()
        .await
        .unwrap()
}

fn entries(server: &RedisServer) -> usize {
    server
        .cli(&["--scan", "--pattern", "sentinel/v2:*"])
        .lines()
        .count()
}

/// Stores `url` through `cache` and waits until the write reached Redis.
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
async fn entries_are_shared_through_sentinel_and_follow_a_failover() {
    let group = RedisSentinelGroup::start();
    let origin = Origin::new();
    let (a, b) = (replica(&group.url()).await, replica(&group.url()).await);
    connected(&a, WAIT).await;
    connected(&b, WAIT).await;
    let before = "http://api.test/jobs/before";
    stored(&origin, &a, before).await;
    let hit = call(origin.behind(&b), get(before)).await;
    assert!(
        hit.cache_status().ends_with("detail=redis"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(entries(&group.primary), 1);

    group.fail_over();
    // Both replicas follow the sentinels to the new primary.
    let after = "http://api.test/jobs/after";
    eventually("A writes to the new primary", WAIT, || async {
        call(origin.behind(&a), get(after)).await;
        entries(&group.replica) == 2
    })
    .await;
    eventually("B reads the new primary", WAIT, || async {
        call(origin.behind(&b), get(after))
            .await
            .cache_status()
            .ends_with("detail=redis")
    })
    .await;
    // A failover is an outage: what was stored before it is served once more and
    // refreshed.
    eventually("the entry from before refreshed", WAIT, || async {
        call(origin.behind(&b), get(before))
            .await
            .cache_status()
            .ends_with("detail=refresh-after-outage")
    })
    .await;
}

#[tokio::test]
async fn a_new_primary_missing_acknowledged_writes_is_reseeded_from_memory() {
    let group = RedisSentinelGroup::start();
    let origin = Origin::new();
    let a = replica(&group.url()).await;
    connected(&a, WAIT).await;
    for i in 0..10 {
        stored(&origin, &a, &format!("http://api.test/jobs/{i}")).await;
    }
    eventually("the replica caught up", WAIT, || async {
        entries(&group.replica) == 10
    })
    .await;
    // The replica loses what the primary acknowledged (as when replication lags a
    // failover), then is promoted.
    assert_eq!(group.replica.cli(&["FLUSHALL"]), "OK");
    group.fail_over();
    eventually(
        "the new primary re-seeded from A's memory",
        WAIT,
        || async { entries(&group.replica) == 10 && a.stats().redis_reseeds == 10 },
    )
    .await;
    assert_eq!(origin.log.calls(), 10, "nothing refetched to re-seed");
}
