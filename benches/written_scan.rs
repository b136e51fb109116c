//! How long a replica tracking the written keys (`RedisConfig::track_written_keys`)
//! takes to complete its set, against the number of entries Redis holds (BENCHMARKS.md,
//! "Written keys: misses without the read"): a real `redis-server` it starts is filled
//! with `N` entries named as the cache names them, then
//!
//! - a new replica is built and timed until its set is complete (its first scan);
//! - its subscriber is cut (`CLIENT KILL TYPE pubsub`), and it is timed from the cut
//!   until its set is complete again (the reconnection, the echo, the rescan).
//!
//! Until then the replica reads Redis on every miss, as an untracked one does. Printed
//! beside each time: this process's CPU time and Redis's (`INFO cpu`) over the scan.
//!
//! ```text
//! cargo bench --bench written_scan                       # 10 000, 100 000 and 1 000 000 entries
//! cargo bench --bench written_scan -- --keys 10000,50000
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use tower_hybrid_cache::{HybridCache, RedisConfig};

#[allow(dead_code)]
#[path = "support/load.rs"]
mod load;
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/redis.rs"]
mod redis_support;
#[allow(dead_code)]
mod support;

use redis_support::RedisServer;

/// How long a scan may take before the bench gives up.
const WAIT: Duration = Duration::from_secs(300);

/// Fills Redis with entries `from..to`, their names spread as digests are (a SHA-1 of
/// the number, padded to 64 hex digits), each with 10 minutes to live.
const FILL: &str = "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do \
    redis.call('SET', 'jobs/v2:' .. redis.sha1hex(tostring(i)) .. '000000000000000000000000', 'x', 'PX', 600000) \
  end return 0";

/// Redis's CPU time so far (user and system), in seconds.
fn redis_cpu(redis: &RedisServer) -> f64 {
    let info = redis.cli(&["INFO", "cpu"]);
    ["used_cpu_sys:", "used_cpu_user:"]
        .iter()
        .filter_map(|field| {
            info.lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .sum()
}

/// Waits until `cache`'s set of written keys is complete (`true`) or not, and
/// returns when it was seen so.
async fn until_complete(cache: &HybridCache, complete: bool) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        let health = cache.redis_health().expect("a Redis tier");
        if health.written_keys_complete == Some(complete) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "the set never became {complete}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One line of the table: how long, this process's CPU, Redis's.
struct Timed {
    took: Duration,
    cpu: f64,
    redis_cpu: f64,
}

impl std::fmt::Display for Timed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>8.0} ms (CPU {:>6.0} ms here, {:>6.0} ms Redis)",
            self.took.as_secs_f64() * 1e3,
            self.cpu * 1e3,
            self.redis_cpu * 1e3
        )
    }
}

async fn measure(redis: &RedisServer, keys: u64) -> (Timed, Timed) {
    redis.cli(&["FLUSHALL"]);
    let step = 100_000;
    let mut from = 0;
    while from < keys {
        let to = (from + step).min(keys);
        redis.cli(&["EVAL", FILL, "0", &from.to_string(), &to.to_string()]);
        from = to;
    }
    let held: u64 = redis.cli(&["DBSIZE"]).trim().parse().unwrap();
    assert_eq!(held, keys, "Redis holds every entry");

    let (cpu, redis_before, started) = (load::cpu_seconds(), redis_cpu(redis), Instant::now());
    let cache = HybridCache::builder()
        .namespace("jobs")
        .redis(RedisConfig::new(redis.url()).track_written_keys(2 << 20))
        .build()
        .await
        .unwrap();
    let done = until_complete(&cache, true).await;
    let first = Timed {
        took: done - started,
        cpu: load::cpu_seconds() - cpu,
        redis_cpu: redis_cpu(redis) - redis_before,
    };

    let (cpu, redis_before, cut) = (load::cpu_seconds(), redis_cpu(redis), Instant::now());
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    until_complete(&cache, false).await;
    let done = until_complete(&cache, true).await;
    let again = Timed {
        took: done - cut,
        cpu: load::cpu_seconds() - cpu,
        redis_cpu: redis_cpu(redis) - redis_before,
    };
    cache.shutdown().await;
    (first, again)
}

fn main() {
    let sizes: Vec<u64> = support::option("--keys")
        .unwrap_or_else(|| "10000,100000,1000000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    support::run_on_two_workers(async {
        let redis = RedisServer::start();
        println!(
            "| entries in Redis | first scan, from build | rescan, from the subscriber's cut |"
        );
        println!("|---|---|---|");
        for keys in sizes {
            let (first, again) = measure(&redis, keys).await;
            println!("| {keys} | {first} | {again} |");
        }
    });
}
