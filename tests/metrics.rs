//! The `metrics` facade sees what `CacheStats` counts. A test binary of its own: the
//! recorder is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use support::{call, eventually, get, Origin};
use tower_hybrid_cache::{CircuitBreakerLayer, HybridCache};

#[tokio::test]
async fn counters_and_the_breaker_reach_the_metrics_recorder() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let cache = HybridCache::builder().build().await.unwrap();
    let origin = Origin::new();
    let app = origin
        .router()
        .layer(cache.layer().ttl(Duration::from_secs(60)));
    call(app.clone(), get("http://api.test/m")).await;
    eventually("a store", Duration::from_secs(10), || async {
        cache.stats().stores == 1
    })
    .await;
    call(app, get("http://api.test/m")).await;
    CircuitBreakerLayer::new().breaker().force_open();

    let values: Vec<(String, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| (key.key().name().to_owned(), value))
        .collect();
    let value = |name: &str| values.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    assert_eq!(
        value("tower_hybrid_cache_hits_total"),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        value("tower_hybrid_cache_misses_total"),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        value("tower_hybrid_cache_stores_total"),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        value("tower_hybrid_cache_breaker_transitions_total"),
        Some(&DebugValue::Counter(1))
    );
    assert!(
        matches!(value("tower_hybrid_cache_breaker_state"), Some(DebugValue::Gauge(g)) if g.into_inner() == 2.0)
    );
}
