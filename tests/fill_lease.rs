//! Cross-replica single-flight through a Redis lease, against a real `redis-server`:
//! two replicas missing the same URL make one origin call; an uncacheable response
//! frees the lease for the next; without Redis, each replica fetches for itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::redis::RedisServer;
use support::{call, eventually, get, Origin};
use tower_hybrid_cache::{HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(15);

/// How long a lease is held at most (and a replica waits for another's fill): long
/// enough that a test finishing well before it shows that nothing waited it out.
const LEASE: Duration = Duration::from_secs(60);

async fn replica(url: &str, lease: bool) -> HybridCache {
    let mut builder = HybridCache::builder()
        .namespace("lease")
        .single_flight_timeout(LEASE)
        .redis(RedisConfig::new(url).deadline(Duration::from_millis(500)));
    if lease {
        builder = builder.redis_fill_lease(LEASE);
    }
    builder.build().await.unwrap()
}

fn app(origin: &Origin, cache: &HybridCache) -> axum::Router {
    origin
        .router()
        .layer(cache.layer().ttl(Duration::from_secs(300)))
}

/// Replica A starts fetching `url` (held at the origin's gate); then replica B asks
/// for it. Returns B's response and the origin's call count.
async fn race(lease: bool, url: &'static str) -> (support::Got, usize) {
    // A guard against a hang, not a measure of speed: a lease never given back would
    // keep the waiting replica waiting the whole minute.
    tokio::time::timeout(Duration::from_secs(20), race_unbounded(lease, url))
        .await
        .expect("the race ended well before a lease would expire")
}

async fn race_unbounded(lease: bool, url: &'static str) -> (support::Got, usize) {
    let redis = RedisServer::start();
    let (a, b) = (
        replica(&redis.url(), lease).await,
        replica(&redis.url(), lease).await,
    );
    let origin = Origin::new();
    let (app_a, app_b) = (app(&origin, &a), app(&origin, &b));
    let first = tokio::spawn(call(app_a, get(url)));
    eventually("A at the origin", WAIT, || async {
        origin.log.calls() == 1
    })
    .await;
    let second = tokio::spawn(call(app_b, get(url)));
    if !lease {
        eventually("B at the origin too", WAIT, || async {
            origin.log.calls() == 2
        })
        .await;
    }
    origin.gate.add_permits(2);
    first.await.unwrap();
    let from_b = second.await.unwrap();
    (from_b, origin.log.calls())
}

#[tokio::test]
async fn with_a_lease_two_replicas_make_one_origin_call() {
    let (from_b, calls) = race(true, "http://api.test/hot?gate=1").await;
    assert_eq!(calls, 1, "{}", from_b.cache_status());
    assert!(
        from_b.is_hit() && from_b.cache_status().ends_with("detail=redis"),
        "{}",
        from_b.cache_status()
    );
}

#[tokio::test]
async fn without_a_lease_each_replica_fetches() {
    let (from_b, calls) = race(false, "http://api.test/hot?gate=1").await;
    assert_eq!(calls, 2);
    assert!(!from_b.is_hit());
}

#[tokio::test]
async fn an_uncacheable_fill_frees_the_lease_for_the_waiting_replica() {
    // A's response may not be stored: B takes the lease once A gives it back and
    // fetches for itself, well before the lease would expire.
    let (from_b, calls) = race(
        true,
        "http://api.test/private?gate=1&h=cache-control:private",
    )
    .await;
    assert_eq!(calls, 2);
    assert!(!from_b.is_hit());
}

#[tokio::test]
async fn with_redis_down_the_lease_is_skipped_and_nothing_waits() {
    let mut redis = RedisServer::start();
    let (a, b) = (
        replica(&redis.url(), true).await,
        replica(&redis.url(), true).await,
    );
    redis.kill();
    let origin = Origin::new();
    let url = "http://api.test/alone";
    let requests = async {
        call(app(&origin, &a), get(url)).await;
        call(app(&origin, &b), get(url)).await;
    };
    // A guard against a hang, not a measure of speed: the lease would make B wait.
    tokio::time::timeout(Duration::from_secs(20), requests)
        .await
        .expect("no wait on a lease nobody holds");
    assert_eq!(origin.log.calls(), 2);
}

#[tokio::test]
async fn a_fill_gives_its_lease_back_long_before_the_lease_would_expire() {
    let redis = RedisServer::start();
    let a = replica(&redis.url(), true).await;
    let origin = Origin::new();
    let leases = || redis.cli(&["--scan", "--pattern", "lease/lease:*"]);
    for (n, url) in [
        "http://api.test/stored?gate=1",
        "http://api.test/private?gate=1&h=cache-control:private",
    ]
    .into_iter()
    .enumerate()
    {
        let fill = tokio::spawn(call(app(&origin, &a), get(url)));
        eventually("A at the origin, holding the lease", WAIT, || async {
            origin.log.calls() == n + 1 && !leases().trim().is_empty()
        })
        .await;
        let held: i64 = redis.cli(&["PTTL", leases().trim()]).parse().unwrap();
        assert!(held > 45_000, "the lease lives a minute: {held} ms left");
        origin.gate.add_permits(1);
        fill.await.unwrap();
        // WAIT is a quarter of the lease: only a release ends it this soon.
        eventually("the lease given back", WAIT, || async {
            leases().trim().is_empty()
        })
        .await;
    }
}
