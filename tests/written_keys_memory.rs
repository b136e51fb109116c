//! What `track_written_keys` holds a key, measured: every allocation of this test
//! binary is counted (`stats_alloc`), and the heap a replica holds once its scan has
//! found `KEYS` entries in a real `redis-server` is set against the same replica
//! without tracking. README says "at most about 40 bytes a key".
//!
//! One test in its own binary: the counts are of the whole process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::alloc::System;
use std::time::Duration;

use fred::prelude::*;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use support::redis::RedisServer;
use support::{capabilities_checked, eventually};
use tower_hybrid_cache::{HybridCache, RedisConfig};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KEYS: u64 = 100_000;
const WAIT: Duration = Duration::from_secs(60);

/// The heap a new replica, `tracked` or not, holds once it is connected and,
/// tracked, once its set is complete; the replica is returned, so that nothing it
/// holds is freed inside another's count.
async fn held(url: &str, tracked: bool) -> (f64, HybridCache) {
    let region = Region::new(GLOBAL);
    let mut config = RedisConfig::new(url);
    if tracked {
        config = config.track_written_keys(1 << 20);
    }
    let cache = HybridCache::builder()
        .namespace("jobs")
        .redis(config)
        .build()
        .await
        .unwrap();
    capabilities_checked(&cache, WAIT).await;
    if tracked {
        eventually("the scan to complete the set", WAIT, || async {
            cache.redis_health().unwrap().written_keys_complete == Some(true)
        })
        .await;
    }
    let change = region.change();
    let held = change.bytes_allocated as f64 - change.bytes_deallocated as f64;
    (held, cache)
}

#[tokio::test(flavor = "current_thread")]
async fn a_tracked_key_costs_at_most_about_forty_bytes() {
    let redis = RedisServer::start();
    let pool = Builder::from_config(Config::from_url(&redis.url()).unwrap())
        .build_pool(2)
        .unwrap();
    pool.init().await.unwrap();
    // Entries as the cache names them, fingerprints spread (the first 16 digits).
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(10_000) {
        let pipeline = pool.next().pipeline();
        for i in chunk {
            let name = format!(
                "jobs/v2:{:016x}{}",
                i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                "0".repeat(48)
            );
            let _: () = pipeline
                .set(name, "x", Some(Expiration::PX(600_000)), None, false)
                .await
                .unwrap();
        }
        let _: Vec<Value> = pipeline.all().await.unwrap();
    }
    let _ = pool.quit().await;
    // Warm up what is made once (the runtime's, fred's, rustls' first structures).
    let (_, warm) = held(&redis.url(), false).await;
    let (untracked, plain) = held(&redis.url(), false).await;
    let (tracked, tracking) = held(&redis.url(), true).await;
    let per_key = (tracked - untracked) / KEYS as f64;
    println!("tracked {tracked:.0} B, untracked {untracked:.0} B: {per_key:.1} B a key");
    assert!(
        per_key > 8.0,
        "the set holds the keys: {per_key:.1} B a key"
    );
    assert!(per_key <= 40.0, "{per_key:.1} B a key");
    for cache in [warm, plain, tracking] {
        cache.shutdown().await;
    }
}
