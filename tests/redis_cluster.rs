//! The Redis tier on a real three-master Redis Cluster (and `track_written_keys`,
//! which does nothing there).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::redis::RedisCluster;
use support::{call, eventually, get, Origin};
use tower_hybrid_cache::{HybridCache, RedisConfig};

#[tokio::test]
async fn entries_spread_over_the_masters_and_are_shared() {
    let cluster = RedisCluster::start();
    let origin = Origin::new();
    let one = HybridCache::builder()
        .namespace("jobs")
        .redis_url(cluster.url())
        .build()
        .await
        .unwrap();
    // Asked to track the written keys, which a cluster does not support (one scan
    // would not cover its masters): nothing is tracked, and every lookup reads.
    let two = HybridCache::builder()
        .namespace("jobs")
        .redis(RedisConfig::new(cluster.url()).track_written_keys(1000))
        .build()
        .await
        .unwrap();
    let app_one = origin
        .router()
        .layer(one.layer().ttl(Duration::from_secs(60)));
    let app_two = origin
        .router()
        .layer(two.layer().ttl(Duration::from_secs(60)));
    // URLs full of hash-tag syntax: none may pin keys to one slot.
    let urls: Vec<String> = (0..30)
        .map(|i| format!("http://api.test/{{user{i}}}/x?tag={{same}}"))
        .collect();
    for url in &urls {
        call(app_one.clone(), get(url)).await;
    }
    eventually("30 writes", Duration::from_secs(15), || async {
        one.stats().redis_writes == 30
    })
    .await;
    for url in &urls {
        let hit = call(app_two.clone(), get(url)).await;
        assert!(
            hit.cache_status().ends_with("detail=redis"),
            "{url}: {}",
            hit.cache_status()
        );
    }
    // The replica that filled them holds each edition: it reads only the values'
    // heads, each from the master that holds its key.
    for url in &urls {
        let hit = call(app_one.clone(), get(url)).await;
        assert!(
            hit.cache_status().ends_with("detail=redis"),
            "{url}: {}",
            hit.cache_status()
        );
    }
    assert_eq!(one.stats().redis_head_hits, 30);
    assert_eq!(one.stats().redis_errors, 0);
    assert_eq!(origin.log.calls(), 30);
    assert_eq!(two.stats().redis_reads_skipped, 0);
    assert_eq!(two.redis_health().unwrap().written_keys_complete, None);
    // The capability checks (on connecting) leave nothing behind once done.
    for cache in [&one, &two] {
        eventually("the capability check", Duration::from_secs(15), || async {
            cache.redis_health().unwrap().server_version.is_some()
        })
        .await;
    }
    let per_node: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["--scan", "--pattern", "jobs/v2:*"]).lines().count())
        .collect();
    assert_eq!(per_node.iter().sum::<usize>(), 30);
    assert!(
        per_node.iter().all(|&n| n > 0),
        "keys spread over every master: {per_node:?}"
    );
    for node in &cluster.nodes {
        for key in node.cli(&["--scan"]).lines() {
            // Entries, and the record of outages and this Redis's epoch.
            let ours = key.starts_with("jobs/v2:") || key == "jobs/outages";
            assert!(ours && !key.contains('{'), "{key}");
        }
    }
}
