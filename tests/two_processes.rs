//! Two `caching_proxy` processes (the example binary, as a user runs it) against one
//! Redis: a miss stored through one is a hit with `detail=redis` through the other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::process::{example_binary, free_port, listening, Running};
use support::redis::RedisServer;
use support::{eventually, fetch, Origin};

#[tokio::test]
async fn two_proxy_processes_share_entries_through_redis() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let upstream = origin.spawn().await;
    let ports = [free_port(), free_port()];
    let _proxies: Vec<Running> = ports
        .iter()
        .map(|port| {
            Running::new(
                Command::new(example_binary("caching_proxy"))
                    .args(["--listen", &format!("127.0.0.1:{port}")])
                    .args(["--upstream", &format!("http://{upstream}")])
                    .args(["--redis-url", &redis.url()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    for port in ports {
        eventually("the proxy to listen", Duration::from_secs(20), || {
            listening(port)
        })
        .await;
    }
    let client = support::client();
    let host = [("host", "jobs.example")];
    let url = |port: u16, i: u32| {
        format!("http://127.0.0.1:{port}/jobs/{i}?h=cache-control:public,max-age%3D120")
    };
    let stored_keys = || {
        redis
            .cli(&["--scan", "--pattern", "caching_proxy/v2:*"])
            .lines()
            .count()
    };
    // A proxy may still be connecting to Redis when it first answers (its write then
    // stays in its memory): each round asks a new URL until one has reached Redis.
    let mut shared = false;
    for i in 0..20 {
        let before = stored_keys();
        let miss = fetch(&client, "GET", &url(ports[0], i), &host).await;
        assert!(
            miss.cache_status().ends_with("stored"),
            "{}",
            miss.cache_status()
        );
        let reached = async {
            while stored_keys() == before {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), reached)
            .await
            .is_err()
        {
            continue;
        }
        let hit = fetch(&client, "GET", &url(ports[1], i), &host).await;
        assert!(
            hit.cache_status().ends_with("detail=redis"),
            "{}",
            hit.cache_status()
        );
        assert_eq!(hit.body, miss.body, "the response the other process stored");
        assert_eq!(
            origin
                .log
                .calls_to(&format!("/jobs/{i}?h=cache-control:public,max-age%3D120")),
            1
        );
        shared = true;
        break;
    }
    assert!(shared, "no entry reached Redis through the first process");
    // The second process's own metrics, scraped as Prometheus would: the Redis hit.
    let metrics = fetch(
        &client,
        "GET",
        &format!("http://127.0.0.1:{}/metrics", ports[1]),
        &[],
    )
    .await;
    assert_eq!(metrics.status, http::StatusCode::OK);
    assert!(metrics.cache_status().is_empty(), "never through the cache");
    let text = metrics.text();
    for line in [
        "tower_hybrid_cache_hits_total 1",
        "tower_hybrid_cache_lookup_seconds_count{tier=\"redis\"}",
        "tower_hybrid_cache_breaker_state 0",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "{line} in:\n{text}"
        );
    }
}
