//! The `metrics` facade sees what `CacheStats` counts, under the names the README
//! gives. A test binary of its own: the recorder is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use axum::body::Body;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::redis::RedisServer;
use support::{call, eventually, get, Origin};
use tower_hybrid_cache::breaker::CircuitBreakerLayer;
use tower_hybrid_cache::{CacheStats, HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(15);

/// Every field of `CacheStats` with its value, by the name its metric carries.
fn fields(stats: &CacheStats) -> [(&'static str, u64); 23] {
    [
        ("hits", stats.hits),
        ("misses", stats.misses),
        ("bypasses", stats.bypasses),
        ("stores", stats.stores),
        ("not_stored", stats.not_stored),
        ("coalesced", stats.coalesced),
        ("redis_writes", stats.redis_writes),
        ("redis_errors", stats.redis_errors),
        ("redis_writes_dropped", stats.redis_writes_dropped),
        ("redis_retries", stats.redis_retries),
        ("retry_budget_exhausted", stats.retry_budget_exhausted),
        ("redis_deadline_hits", stats.redis_deadline_hits),
        ("redis_breaker_rejections", stats.redis_breaker_rejections),
        ("fallback_hits", stats.fallback_hits),
        ("redis_reads_shared", stats.redis_reads_shared),
        ("redis_reads_skipped", stats.redis_reads_skipped),
        ("redis_head_hits", stats.redis_head_hits),
        ("redis_reads_batched", stats.redis_reads_batched),
        ("invalidations", stats.invalidations),
        ("redis_replays", stats.redis_replays),
        ("redis_removals_folded", stats.redis_removals_folded),
        ("redis_replays_refused", stats.redis_replays_refused),
        ("redis_reseeds", stats.redis_reseeds),
    ]
}

/// A snapshot's values by name (a snapshot drains what it reads: take one).
fn recorded(snapshotter: &Snapshotter) -> Vec<(String, DebugValue)> {
    named(snapshotter.snapshot().into_vec())
}

fn named(
    snapshot: Vec<(
        metrics_util::CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        DebugValue,
    )>,
) -> Vec<(String, DebugValue)> {
    snapshot
        .into_iter()
        .map(|(key, _, _, value)| (key.key().name().to_owned(), value))
        .collect()
}

#[tokio::test]
async fn counters_and_the_breaker_reach_the_metrics_recorder() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    // One cache (the only one in this process) made to move as many counters as a
    // short run can: misses, stores, hits, a bypass that invalidates, a response not
    // stored, followers, Redis writes, errors, breaker rejections, fallback hits, a
    // replay.
    let redis = RedisServer::start();
    let cache = HybridCache::builder()
        .namespace("metrics")
        .redis(RedisConfig::new(redis.url()).deadline(Duration::from_millis(500)))
        .redis_breaker(
            CircuitBreakerLayer::new().open_for(Duration::from_secs(60), Duration::from_secs(60)),
        )
        .build()
        .await
        .unwrap();
    let origin = Origin::new();
    let app = origin
        .router()
        .layer(cache.layer().ttl(Duration::from_secs(60)));
    call(app.clone(), get("http://api.test/m")).await;
    eventually("a Redis write", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    call(app.clone(), get("http://api.test/m")).await;
    call(
        app.clone(),
        get("http://api.test/n?h=cache-control:no-store"),
    )
    .await;
    let gated = "http://api.test/g?gate=1";
    let both = [
        tokio::spawn(call(app.clone(), get(gated))),
        tokio::spawn(call(app.clone(), get(gated))),
    ];
    eventually("a follower", WAIT, || async {
        cache.stats().coalesced == 1
    })
    .await;
    origin.gate.add_permits(2);
    for request in both {
        request.await.unwrap();
    }
    let post = http::Request::post("http://api.test/m")
        .body(Body::empty())
        .unwrap();
    call(app.clone(), post).await;
    call(app.clone(), get("http://api.test/m")).await;
    eventually("the refill in memory", WAIT, || async {
        cache.stats().stores >= 3
    })
    .await;
    // Redis out of reach: a lookup memory answers, a tag invalidation kept and
    // replayed once the breaker lets Redis be asked again.
    let breaker = cache.redis_breaker().unwrap();
    breaker.force_open();
    call(app.clone(), get("http://api.test/m")).await;
    assert!(!cache.invalidate_tag("t").await);
    breaker.force_half_open();
    eventually("the replay", WAIT, || async {
        cache.stats().redis_replays == 1
    })
    .await;

    // A stale response served while it is refreshed: how stale, as a histogram.
    let swr = "http://api.test/swr?h=cache-control:max-age%3D1,%20stale-while-revalidate%3D60";
    call(app.clone(), get(swr)).await;
    eventually("served stale", WAIT, || async {
        call(app.clone(), get(swr))
            .await
            .cache_status()
            .ends_with("detail=stale-while-revalidate")
    })
    .await;
    // Lookup latency per tier: Redis asked on every lookup, memory when Redis could
    // not answer (the breaker forced open above).
    let drained = snapshotter.snapshot().into_vec();
    for tier in ["memory", "redis"] {
        let samples = drained
            .iter()
            .find(|(key, _, _, _)| {
                key.key().name() == "tower_hybrid_cache_lookup_seconds"
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "tier" && l.value() == tier)
            })
            .map(|(_, _, _, value)| value);
        assert!(
            matches!(samples, Some(DebugValue::Histogram(h)) if !h.is_empty()),
            "{tier}: {samples:?}"
        );
    }
    let stats = cache.stats();
    let values = named(drained);
    let value = |name: &str| values.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    for (field, count) in fields(&stats) {
        let name = format!("tower_hybrid_cache_{field}_total");
        match value(&name) {
            Some(DebugValue::Counter(recorded)) => {
                assert_eq!(*recorded, count, "{name}");
            }
            Some(other) => panic!("{name} is not a counter: {other:?}"),
            None => assert_eq!(count, 0, "{name} never reached the recorder"),
        }
    }
    // The rest (dropped writes, retries, deadline hits, shared reads) need a sick
    // Redis: the fault tests count them; the unit tests check every name.
    for (field, count) in fields(&stats) {
        let moved = [
            "hits",
            "misses",
            "bypasses",
            "stores",
            "not_stored",
            "coalesced",
            "redis_writes",
            "redis_errors",
            "redis_breaker_rejections",
            "fallback_hits",
            "invalidations",
            "redis_replays",
        ];
        if moved.contains(&field) {
            assert!(count > 0, "{field} did not move: {stats:?}");
        }
    }
    assert!(
        matches!(value("tower_hybrid_cache_breaker_transitions_total"), Some(DebugValue::Counter(n)) if *n >= 2)
    );
    assert!(value("tower_hybrid_cache_breaker_state").is_some());
    // The write's invalidation came back to this replica's own subscriber, stamped
    // with its sending time (heard long before: the replay above waited a probe
    // interval at least).
    assert!(
        matches!(value("tower_hybrid_cache_invalidation_delay_seconds"), Some(DebugValue::Histogram(h)) if !h.is_empty()),
        "{:?}",
        value("tower_hybrid_cache_invalidation_delay_seconds")
    );
    assert!(
        matches!(value("tower_hybrid_cache_stale_served_seconds"), Some(DebugValue::Histogram(h)) if !h.is_empty()),
        "{:?}",
        value("tower_hybrid_cache_stale_served_seconds")
    );
    // The capability check ran on connecting, and found nothing missing.
    assert!(
        matches!(value("tower_hybrid_cache_redis_missing_commands"), Some(DebugValue::Gauge(g)) if g.into_inner() == 0.0),
        "{:?}",
        value("tower_hybrid_cache_redis_missing_commands")
    );
    CircuitBreakerLayer::new().breaker().force_open();
    let values = recorded(&snapshotter);
    assert!(values
        .iter()
        .any(|(n, v)| n == "tower_hybrid_cache_breaker_state"
            && matches!(v, DebugValue::Gauge(g) if g.into_inner() == 2.0)));
}
