//! What the benches share: reading their `--name value` options, the runtime they run
//! on, and waiting for their fills to reach Redis.

use std::future::Future;
use std::time::{Duration, Instant};

use tower_hybrid_cache::HybridCache;

/// The value after `--name` on the command line, if given.
pub(crate) fn option(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Runs `future` on a tokio runtime of two workers, as the server under test would
/// have on these two-core machines.
pub(crate) fn run_on_two_workers<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

/// Waits until `cache` has settled `n` writes to Redis, within two minutes: written,
/// or dropped because its write queue was full (a load that stores faster than Redis
/// takes the writes). Returns how many were dropped; a bench that needs every entry
/// in Redis asserts none was.
pub(crate) async fn redis_written(cache: &HybridCache, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stats = cache.stats();
        if stats.redis_writes + stats.redis_writes_dropped >= n {
            return stats.redis_writes_dropped;
        }
        assert!(
            Instant::now() < deadline,
            "the fills did not reach Redis: {} written, {} dropped of {n}",
            stats.redis_writes,
            stats.redis_writes_dropped
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
