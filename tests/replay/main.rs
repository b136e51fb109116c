//! What Redis could not take, kept and replayed, against a real `redis-server` (behind
//! the fault proxy where an outage must end with the data still there): removals go
//! first and refuse the kept writes they cover; removals are never dropped for room
//! (past the cap they fold into a purge); writes are dropped oldest first; a removal
//! Redis refuses does not block the rest; a delete finds room when the write queue
//! is full; the direct API's delete is kept like any invalidation; a write whose
//! invalidation is only kept says so in its `Cache-Status`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/fault_proxy.rs"]
mod fault_proxy;
#[path = "../support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fault_proxy::{Fault, FaultProxy};
use support::redis::RedisServer;
use support::{call, eventually, get, Origin};
use tower_hybrid_cache::key::CacheKey;
use tower_hybrid_cache::store::{RedisTierService, StoreOperation, StoreRequest, StoreResponse};
use tower_hybrid_cache::{HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(15);

fn config(url: &str) -> RedisConfig {
    RedisConfig::new(url)
        .command_timeout(Duration::from_millis(200))
        .deadline(Duration::from_millis(200))
}

async fn replica(url: &str) -> HybridCache {
    HybridCache::builder()
        .namespace("replay")
        .redis(config(url))
        .build()
        .await
        .unwrap()
}

fn app(origin: &Origin, cache: &HybridCache) -> axum::Router {
    origin
        .router()
        .layer(cache.layer().ttl(Duration::from_secs(60)))
}

/// A Redis, a proxy in front of it for replica A, and replica B straight on Redis.
struct Cluster {
    redis: RedisServer,
    proxy: FaultProxy,
    a: HybridCache,
    b: HybridCache,
}

impl Cluster {
    async fn start() -> Self {
        let redis = RedisServer::start();
        let proxy = FaultProxy::start(redis.port());
        let a = replica(&proxy.url()).await;
        let b = replica(&redis.url()).await;
        eventually("A connected", WAIT, || async {
            a.redis_health().unwrap().connected > 0
        })
        .await;
        Cluster { redis, proxy, a, b }
    }

    /// Cuts A off from Redis, and waits until A knows.
    async fn cut_a(&self) {
        self.proxy.set(Fault::Reset);
        eventually("A cut off", WAIT, || async {
            self.a.redis_health().unwrap().connected == 0
        })
        .await;
    }

    fn heal_a(&self) {
        self.proxy.set(Fault::None);
    }
}

/// B stores `url` (tagged `tag`) and waits until it is in Redis.
async fn stored_by_b(cluster: &Cluster, origin: &Origin, url: &str) {
    let writes = cluster.b.stats().redis_writes;
    let got = call(app(origin, &cluster.b), get(url)).await;
    assert!(
        got.cache_status().contains("stored"),
        "{}",
        got.cache_status()
    );
    eventually("B's write in Redis", WAIT, || async {
        cluster.b.stats().redis_writes == writes + 1
    })
    .await;
}

/// Whether a fresh replica finds `url` in Redis.
async fn in_redis(redis: &RedisServer, origin: &Origin, url: &str) -> bool {
    let reader = replica(&redis.url()).await;
    eventually("the reader connected", WAIT, || async {
        reader.redis_health().unwrap().connected > 0
    })
    .await;
    call(app(origin, &reader), get(url)).await.is_hit()
}

type Seen = Arc<Mutex<Vec<(StoreOperation, Vec<CacheKey>)>>>;

/// Notes each operation Redis carried out, as a layer around the store.
#[derive(Clone)]
struct Recording {
    inner: RedisTierService,
    seen: Seen,
}

impl tower::Service<StoreRequest> for Recording {
    type Response = StoreResponse;
    type Error = tower::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: StoreRequest) -> Self::Future {
        let what = (request.operation(), request.keys());
        let (future, seen) = (self.inner.call(request), Arc::clone(&self.seen));
        Box::pin(async move {
            let response = future.await?;
            seen.lock().unwrap().push(what);
            Ok(response)
        })
    }
}

#[tokio::test]
async fn kept_removals_go_first_and_refuse_the_kept_writes_they_cover() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let seen = Seen::default();
    let a = HybridCache::builder()
        .namespace("replay")
        .redis(config(&proxy.url()))
        .redis_layer({
            let seen = Arc::clone(&seen);
            tower::layer::layer_fn(move |inner| Recording {
                inner,
                seen: Arc::clone(&seen),
            })
        })
        .build()
        .await
        .unwrap();
    let origin = Origin::new();
    let app_a = app(&origin, &a);
    let (covered, other) = ("http://api.test/jobs/covered", "http://api.test/jobs/other");
    eventually("A connected", WAIT, || async {
        a.redis_health().unwrap().connected > 0
    })
    .await;
    proxy.set(Fault::Reset);
    // Two fills, then a write that invalidates the first, all while Redis is away.
    for (n, url) in [covered, other].into_iter().enumerate() {
        call(app_a.clone(), get(url)).await;
        eventually("the fill kept", WAIT, || async {
            a.pending_redis_operations() == n + 1
        })
        .await;
    }
    let post = http::Request::post(covered)
        .body(axum::body::Body::empty())
        .unwrap();
    call(app_a.clone(), post).await;
    eventually("the invalidation kept after them", WAIT, || async {
        a.pending_redis_operations() == 3
    })
    .await;
    proxy.set(Fault::None);
    eventually("all replayed", WAIT, || async {
        a.pending_redis_operations() == 0
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let replayed: Vec<_> = seen
        .iter()
        .filter(|(operation, _)| matches!(operation, StoreOperation::Set | StoreOperation::Delete))
        .collect();
    assert_eq!(
        replayed.first().unwrap().0,
        StoreOperation::Delete,
        "{seen:?}"
    );
    assert!(replayed
        .iter()
        .skip(1)
        .all(|(op, _)| *op == StoreOperation::Set));
    // The delete's mark refused the fill it covers; the other fill landed.
    assert!(!in_redis(&redis, &origin, covered).await);
    assert!(in_redis(&redis, &origin, other).await);
}

#[tokio::test]
async fn removals_past_the_cap_fold_into_one_purge_and_none_is_lost() {
    let cluster = Cluster::start().await;
    let origin = Origin::new();
    let url = "http://api.test/jobs/kept-by-b";
    stored_by_b(&cluster, &origin, url).await;
    cluster.cut_a().await;
    // More tag invalidations than the replay keeps: none may be lost.
    for i in 0..10_001 {
        assert!(!cluster.a.invalidate_tag(&format!("tag:{i}")).await);
    }
    assert_eq!(cluster.a.pending_redis_operations(), 1, "one purge");
    assert_eq!(cluster.a.stats().redis_removals_folded, 10_001);
    cluster.heal_a();
    eventually("the purge replayed", WAIT, || async {
        cluster.a.pending_redis_operations() == 0 && cluster.a.stats().redis_replays == 1
    })
    .await;
    // It removed more than was asked (B's untagged entry too), and so nothing less.
    assert!(!in_redis(&cluster.redis, &origin, url).await);
}

#[tokio::test]
async fn kept_writes_past_their_cap_drop_the_oldest() {
    let cluster = Cluster::start().await;
    let origin = Origin::new();
    let app_a = app(&origin, &cluster.a);
    cluster.cut_a().await;
    let mut kept = 0;
    for i in 0..30 {
        call(
            app_a.clone(),
            get(&format!("http://api.test/big/{i}?size=700000")),
        )
        .await;
        eventually("the write kept or dropped", WAIT, || async {
            let a = &cluster.a;
            a.pending_redis_operations() + a.stats().redis_writes_dropped as usize == i + 1
        })
        .await;
        kept = cluster.a.pending_redis_operations();
    }
    // 23 entries of 700 000 bytes are 16.1 MB: 16 MiB holds 23 at most.
    assert!((20..=23).contains(&kept), "{kept} kept");
    assert_eq!(cluster.a.stats().redis_writes_dropped, (30 - kept) as u64);
    cluster.heal_a();
    eventually("the writes replayed", WAIT, || async {
        cluster.a.pending_redis_operations() == 0
    })
    .await;
    // The newest made it to Redis; the oldest were the ones dropped.
    assert!(
        in_redis(
            &cluster.redis,
            &origin,
            "http://api.test/big/29?size=700000"
        )
        .await
    );
    assert!(!in_redis(&cluster.redis, &origin, "http://api.test/big/0?size=700000").await);
}

#[tokio::test]
async fn a_removal_redis_refuses_does_not_block_the_ones_behind_it() {
    let cluster = Cluster::start().await;
    let origin = Origin::new();
    let poisoned = "http://api.test/jobs/p?h=cache-tag:poisoned";
    let good = "http://api.test/jobs/g?h=cache-tag:good";
    stored_by_b(&cluster, &origin, poisoned).await;
    // The poisoned tag's index becomes a string: its invalidation's SMEMBERS is
    // refused with WRONGTYPE, every time.
    let indexes = cluster.redis.cli(&["--scan", "--pattern", "replay/tag:*"]);
    let index = indexes.lines().next().unwrap().to_owned();
    assert_eq!(indexes.lines().count(), 1, "{indexes}");
    cluster.redis.cli(&["SET", &index, "not a set"]);
    stored_by_b(&cluster, &origin, good).await;

    cluster.cut_a().await;
    assert!(!cluster.a.invalidate_tag("poisoned").await);
    assert!(!cluster.a.invalidate_tag("good").await);
    assert_eq!(cluster.a.pending_redis_operations(), 2);
    cluster.heal_a();
    eventually(
        "the good one replayed, the poisoned given up",
        WAIT,
        || async { cluster.a.pending_redis_operations() == 0 },
    )
    .await;
    let stats = cluster.a.stats();
    assert_eq!(stats.redis_replays, 1, "{stats:?}");
    assert_eq!(stats.redis_replays_refused, 1, "{stats:?}");
    assert!(!in_redis(&cluster.redis, &origin, good).await);
}

/// Holds every write batch until the gate opens, as a writer stuck behind a slow
/// Redis would be, while everything else goes through.
#[derive(Clone)]
struct HeldWrites {
    inner: RedisTierService,
    gate: Arc<tokio::sync::Semaphore>,
}

impl tower::Service<StoreRequest> for HeldWrites {
    type Response = StoreResponse;
    type Error = tower::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: StoreRequest) -> Self::Future {
        let held = request.operation() == StoreOperation::Set;
        let gate = Arc::clone(&self.gate);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            if held {
                let _ = gate.acquire().await;
            }
            inner.call(request).await
        })
    }
}

#[tokio::test]
async fn a_full_write_queue_hands_an_invalidation_to_the_replay() {
    let redis = RedisServer::start();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let cache = HybridCache::builder()
        .namespace("replay")
        .redis(config(&redis.url()).write_queue(2))
        .redis_layer({
            let gate = Arc::clone(&gate);
            tower::layer::layer_fn(move |inner| HeldWrites {
                inner,
                gate: Arc::clone(&gate),
            })
        })
        .build()
        .await
        .unwrap();
    // The writer holds the first value; the queue fills with the next two; the rest
    // are dropped.
    for i in 0..10 {
        cache
            .set(&format!("k{i}"), &i, Duration::from_secs(60))
            .await
            .unwrap();
        tokio::task::yield_now().await;
    }
    let dropped = cache.stats().redis_writes_dropped;
    assert!(dropped >= 5, "{dropped}");
    let uri: http::Uri = "http://api.test/jobs/1".parse().unwrap();
    assert!(
        cache.invalidate(&uri).await,
        "the delete itself went through"
    );
    assert_eq!(
        cache.stats().redis_writes_dropped,
        dropped,
        "the queued delete is not dropped"
    );
    assert_eq!(
        cache.pending_redis_operations(),
        1,
        "it waits for the replay"
    );
    eventually("replayed", WAIT, || async {
        cache.pending_redis_operations() == 0 && cache.stats().redis_replays == 1
    })
    .await;
    gate.add_permits(1 << 20);
}

#[tokio::test]
async fn a_value_deleted_during_an_outage_is_deleted_in_redis_once_back() {
    let cluster = Cluster::start().await;
    cluster
        .a
        .set("candidate:7", &[1, 2, 3], Duration::from_secs(60))
        .await
        .unwrap();
    eventually("the value in Redis", WAIT, || async {
        cluster.b.get::<Vec<u32>>("candidate:7").await.is_some()
    })
    .await;
    cluster.cut_a().await;
    assert!(!cluster.a.delete("candidate:7").await);
    assert_eq!(cluster.a.pending_redis_operations(), 1);
    assert_eq!(cluster.a.get::<Vec<u32>>("candidate:7").await, None);
    cluster.heal_a();
    eventually("the delete replayed", WAIT, || async {
        cluster.a.pending_redis_operations() == 0
    })
    .await;
    assert_eq!(cluster.b.get::<Vec<u32>>("candidate:7").await, None);
}

#[tokio::test]
async fn a_write_whose_invalidation_is_only_kept_says_so() {
    let cluster = Cluster::start().await;
    let origin = Origin::new();
    let app_a = app(&origin, &cluster.a);
    let post = || {
        http::Request::post("http://api.test/jobs/9")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let status = call(app_a.clone(), post()).await.cache_status();
    assert_eq!(status, "tower-hybrid-cache; fwd=bypass", "Redis took it");
    cluster.cut_a().await;
    let status = call(app_a.clone(), post()).await.cache_status();
    assert_eq!(
        status, "tower-hybrid-cache; fwd=bypass; detail=invalidation-queued",
        "kept for the replay"
    );
    cluster.heal_a();
    eventually("replayed", WAIT, || async {
        cluster.a.pending_redis_operations() == 0
    })
    .await;
    let status = call(app_a.clone(), post()).await.cache_status();
    assert_eq!(status, "tower-hybrid-cache; fwd=bypass");
}
