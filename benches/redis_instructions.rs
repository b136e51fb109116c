//! Requests through the Redis path, N of them (second argument, default 10 000), for an
//! instruction-count A/B under callgrind against a real `redis-server` it starts (BENCHMARKS.md, "Redis
//! path, instructions"). The first argument picks what is counted:
//!
//! - `bare`: one fred `GET` of a 3 KiB value per request, in a handler (the limit a
//!   Redis hit cannot beat);
//! - `hits`: the same bytes behind the layer with Redis, every request a Redis hit
//!   over 1 000 keys;
//! - `memory-misses`: every request a miss on a URL of its own behind a memory-only
//!   layer, each response stored (the baseline of the two below);
//! - `read-misses`: the same behind the layer with Redis, no entry small enough to be
//!   sent (`max_value_bytes(1)`): a miss's Redis read, without the write;
//! - `misses`: the same with every entry written to Redis (the write path whole);
//! - `tagged-misses`: `misses` with four tags on every response (`Cache-Tag`), each
//!   indexed in Redis as the entry is written;
//! - `tracked-misses`: `misses` with `track_written_keys`: no miss reads Redis (its
//!   key is known unwritten), and each write is announced and heard back;
//!   `tracked-hits`: `hits` with it (each hit's key looked up in the set first).
//!
//! ```text
//! cargo bench --bench redis_instructions --no-run   # prints the binary's path
//! valgrind --tool=callgrind <binary> hits 2000; valgrind --tool=callgrind <binary> hits 12000
//! # per request: (Ir(12000) - Ir(2000)) / 10000
//! ```
//!
//! A third argument sends that many requests at once (default 1): concurrent misses
//! share the writer's batches, as they do under load, but how full each batch is then
//! depends on when the writer task runs, so such counts vary from run to run; compare
//! builds one request at a time.
//!
//! redis-server runs outside valgrind: only this process's instructions are counted.
//! With `BENCH_REDIS_STATS=1`, the run ends by printing what Redis was sent (`INFO
//! commandstats`) and the CPU time it used (`INFO cpu`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_hybrid_cache::layer::RequestBody;
use tower_hybrid_cache::{HybridCache, RedisConfig};

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/redis.rs"]
mod redis_support;
// The command-line and runtime helpers are the HTTP benches'.
#[allow(dead_code)]
mod support;

const KEYS: usize = 1_000;

fn request(i: usize) -> Request<Full<Bytes>> {
    Request::get(format!("http://api.test/jobs/search?q=rust&page={i}"))
        .header("accept", "*/*")
        .header("user-agent", "bench")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// The page a request asks for (its URL's last number), as one of the `KEYS` keys.
fn page(request: &Request<Full<Bytes>>) -> usize {
    request
        .uri()
        .query()
        .and_then(|query| query.rsplit('=').next())
        .and_then(|page| page.parse::<usize>().ok())
        .unwrap_or(0)
        % KEYS
}

/// Sends a request for each page of `pages` through clones of `service`, `in_flight`
/// at a time (each group sent together and awaited whole), each body read.
macro_rules! drive {
    ($service:expr, $pages:expr, $in_flight:expr) => {{
        let pages: Vec<usize> = $pages.collect();
        for group in pages.chunks($in_flight) {
            let calls = group.iter().map(|&page| {
                let mut service = $service.clone();
                async move {
                    let response = service
                        .ready()
                        .await
                        .unwrap()
                        .call(request(page))
                        .await
                        .unwrap();
                    response.into_body().collect().await.unwrap();
                }
            });
            futures_util::future::join_all(calls).await;
            // Let background work run now, as a server's runtime would.
            tokio::task::yield_now().await;
        }
    }};
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "hits".into());
    let requests: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let in_flight: usize = std::env::args()
        .nth(3)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
        .max(1);
    let redis = redis_support::RedisServer::start();
    let body = Bytes::from(vec![b'j'; 3 * 1024]);
    match mode.as_str() {
        "bare" => {
            let pool = Builder::from_config(Config::from_url(&redis.url()).unwrap())
                .build_pool(4)
                .unwrap();
            pool.init().await.unwrap();
            for i in 0..KEYS {
                let _: () = pool
                    .set(format!("bench:{i}"), body.clone(), None, None, false)
                    .await
                    .unwrap();
            }
            let origin = tower::service_fn(move |request: Request<Full<Bytes>>| {
                let pool = pool.clone();
                async move {
                    let key = format!("bench:{}", page(&request));
                    let body: Bytes = pool.get(key).await.unwrap();
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                }
            });
            drive!(origin, 0..requests, in_flight);
        }
        "hits" | "memory-misses" | "read-misses" | "misses" | "tagged-misses"
        | "tracked-misses" | "tracked-hits" => {
            let mut config = RedisConfig::new(redis.url());
            if mode == "read-misses" {
                config = config.max_value_bytes(1);
            }
            let tracked = mode.starts_with("tracked-");
            if tracked {
                config = config.track_written_keys(1 << 20);
            }
            let builder = HybridCache::builder();
            let builder = match mode.as_str() {
                "memory-misses" => builder,
                _ => builder.redis(config),
            };
            let cache = builder.build().await.unwrap();
            while tracked && cache.redis_health().unwrap().written_keys_complete != Some(true) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let tagged = mode == "tagged-misses";
            let origin = tower::service_fn(move |_request: Request<RequestBody<Full<Bytes>>>| {
                let body = body.clone();
                async move {
                    let mut response = Response::new(Full::new(body));
                    if tagged {
                        let tags = http::HeaderValue::from_static("jobs berlin rust remote");
                        response.headers_mut().insert("cache-tag", tags);
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let service =
                tower::Layer::layer(&cache.layer().ttl(Duration::from_secs(3600)), origin);
            if mode.ends_with("hits") {
                drive!(service, 0..KEYS, 1);
                let dropped = support::redis_written(&cache, KEYS as u64).await;
                assert_eq!(dropped, 0, "every key in Redis before the hits");
                let before = cache.stats();
                drive!(service, (0..requests).map(|i| i % KEYS), in_flight);
                let after = cache.stats();
                assert_eq!(
                    after.hits - before.hits,
                    requests as u64,
                    "every request a hit"
                );
                assert_eq!(after.redis_errors, 0, "every hit from Redis");
            } else {
                drive!(service, KEYS..KEYS + requests, in_flight);
                cache.run_pending_tasks().await;
                let stats = cache.stats();
                assert_eq!(stats.stores, requests as u64, "every miss stored");
                assert_eq!(stats.redis_errors, 0, "every Redis read answered");
                if tracked {
                    assert_eq!(stats.redis_reads_skipped, requests as u64, "no miss read");
                }
                if mode == "misses" || tagged || tracked {
                    // The writes' answers, before the counts are read.
                    let dropped = support::redis_written(&cache, requests as u64).await;
                    assert_eq!(dropped, 0, "every write counted");
                }
            }
        }
        other => panic!(
            "unknown mode {other}: bare, hits, memory-misses, read-misses, misses, tagged-misses, tracked-misses or tracked-hits"
        ),
    }
    if std::env::var_os("BENCH_REDIS_STATS").is_some() {
        println!("{}", redis.cli(&["INFO", "commandstats"]));
        // Redis's own CPU time for the whole run, what a command's `usec` leaves out
        // (reading and parsing it) and counts twice (a script's and its commands').
        println!("{}", redis.cli(&["INFO", "cpu"]));
    }
}
