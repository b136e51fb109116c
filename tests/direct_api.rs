//! The direct cache API (values that are not HTTP responses), memory-only and shared
//! through a real Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use support::eventually;
use support::redis::RedisServer;
use tower_hybrid_cache::HybridCache;

const WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Matches {
    candidate: u64,
    jobs: Vec<(u64, f32)>,
}

fn matches() -> Matches {
    Matches {
        candidate: 7,
        jobs: vec![(42, 0.93), (17, 0.88)],
    }
}

#[tokio::test]
async fn typed_values_roundtrip_and_a_wrong_type_is_a_miss() {
    let cache = HybridCache::builder().build().await.unwrap();
    assert_eq!(cache.get::<Matches>("m:7").await, None);
    cache
        .set("m:7", &matches(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get::<Matches>("m:7").await, Some(matches()));
    assert_eq!(
        cache.get::<Vec<String>>("m:7").await,
        None,
        "another shape is a miss"
    );
    assert_eq!(cache.get::<Matches>("m:8").await, None);
    assert!(cache.delete("m:7").await);
    assert_eq!(cache.get::<Matches>("m:7").await, None);
}

#[tokio::test]
async fn values_expire_after_their_ttl() {
    let cache = HybridCache::builder().build().await.unwrap();
    cache
        .set("short", &1_u8, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(cache.get::<u8>("short").await, Some(1));
    eventually("the value to expire", WAIT, || async {
        cache.get::<u8>("short").await.is_none()
    })
    .await;
}

#[tokio::test]
async fn values_are_shared_through_redis_and_deleted_in_both_tiers() {
    let redis = RedisServer::start();
    let one = HybridCache::builder()
        .namespace("app")
        .redis_url(redis.url())
        .build()
        .await
        .unwrap();
    let two = HybridCache::builder()
        .namespace("app")
        .redis_url(redis.url())
        .build()
        .await
        .unwrap();
    // A key a user controls cannot shape the storage key.
    let key = "candidate:{7}:matches\r\n*";
    one.set(key, &matches(), Duration::from_secs(60))
        .await
        .unwrap();
    eventually("the write", WAIT, || async {
        one.stats().redis_writes == 1
    })
    .await;
    assert_eq!(two.get::<Matches>(key).await, Some(matches()));
    let stored = redis.cli(&["--scan", "--pattern", "app/v2:*"]);
    assert_eq!(stored.len(), "app/v2:".len() + 64, "{stored}");
    let pttl: i64 = redis.cli(&["PTTL", &stored]).parse().unwrap();
    assert!((55_000..=60_000).contains(&pttl), "{pttl}");

    assert!(two.delete(key).await);
    assert_eq!(redis.cli(&["EXISTS", &stored]), "0");
    assert_eq!(two.get::<Matches>(key).await, None);
    // The other replica's memory copy is not reachable either: reads go to Redis first.
    assert_eq!(one.get::<Matches>(key).await, None);
}

#[tokio::test]
async fn concurrent_get_or_insert_with_runs_the_producer_once() {
    let cache = HybridCache::builder().build().await.unwrap();
    let produced = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (cache, produced, gate) = (cache.clone(), produced.clone(), gate.clone());
            tokio::spawn(async move {
                cache
                    .get_or_insert_with("expensive", Duration::from_secs(60), || async move {
                        produced.fetch_add(1, Ordering::SeqCst);
                        gate.acquire().await.unwrap().forget();
                        Ok::<_, std::convert::Infallible>(matches())
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    eventually("the producer to start", WAIT, || async {
        produced.load(Ordering::SeqCst) == 1
    })
    .await;
    gate.add_permits(16);
    for task in tasks {
        assert_eq!(task.await.unwrap(), matches());
    }
    assert_eq!(produced.load(Ordering::SeqCst), 1);
    // An error is returned and nothing is stored.
    let failed: Result<Matches, &str> = cache
        .get_or_insert_with("failing", Duration::from_secs(60), || async {
            Err("origin down")
        })
        .await;
    assert_eq!(failed, Err("origin down"));
    assert_eq!(cache.get::<Matches>("failing").await, None);
}
