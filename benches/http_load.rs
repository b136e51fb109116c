//! HTTP load benchmark: the layer against its baselines, in one run on one machine.
//!
//! `cargo bench --bench http_load` (options after `--`: `--seconds 2 --rounds 10
//! --connections 32 --memory-requests 200000`, `--http2` for the load over HTTP/2
//! with prior knowledge, and `--rate N` to send at most N requests/s in all, so that
//! CPU per request is compared at a rate every side sustains).
//!
//! - (a) a handler returning pre-rendered bytes;
//! - (b) the same route behind the layer, every request a memory hit; (b‴) the same
//!   with stale-while-revalidate on and tagged responses (label `hits-swr-tags`);
//! - (c) the job_match example's search handler, under unique URLs;
//! - (d) the same behind the layer under the same all-miss load (every response
//!   stored, the memory tier evicting once full);
//! - (c′)/(d′) the same pair with a handler that costs about as much as the cache's
//!   own miss path (3 KB of JSON rendered per request): the worst case;
//! - (e) a handler doing one fred GET of the pre-rendered body (the Redis round-trip
//!   limit) and (f) the layer serving Redis hits, every request for one URL;
//!   (e′)/(f′) the same over 1 000 keys (label `redis-spread`);
//! - (g) an all-miss load on a memory-only layer and (h) the same with Redis on, with
//!   the cheap handler of (c′); (g″)/(h″) the same pair with job_match's search
//!   handler of (c) (label `writes-search`), and (h‴) the same with no entry sent to
//!   Redis, so that only the misses' Redis reads remain (label `writes-search-reads`;
//!   `writes-reads` is the same beside (g), with the cheap handler);
//!   (h) against (h′), the same with the cross-replica fill lease (label
//!   `writes-lease`); (g) against (k), (h) with the written keys tracked, so that no
//!   miss reads Redis (label `writes-tracked`);
//! - (i) memory hits on a memory-only layer and (j) the same on a layer whose Redis
//!   was killed (breaker open): the degraded mode;
//! - memory: resident size before and after a load of unique URLs that stores far
//!   more than the configured capacity (`--memory-body BYTES`, default 4096, and
//!   `--memory-json` for axum `Json` bodies; run it alone, `--only memory`, in a
//!   process of its own for each size).
//!
//! The Redis pairs start their own `redis-server` (it must be on PATH);
//! `BENCH_REDIS_STATS=1` prints its `INFO commandstats` after the rounds. `--side 0|1`
//! loads one side of each pair only and prints its own figures (for profiling).
//! `--redis-body BYTES` sets the body of the Redis hit pairs (e)/(f) and (e′)/(f′)
//! (default: the pre-rendered document, about 3 KiB). `--redis-cpu N` pins that
//! redis-server to CPU N; run the bench itself under
//! `taskset -c` on the other CPUs to measure as if Redis had a host of its own.
//!
//! Each scenario runs `rounds` times, interleaved, and the table shows the median
//! requests/s and each ratio against its baseline in the same round.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Query;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use tower_hybrid_cache::HybridCache;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/job_match/main.rs"]
mod job_match;

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/redis.rs"]
mod redis_support;
mod support;
// `Run::requests` is read by the peer comparison only.
#[allow(dead_code)]
#[path = "support/load.rs"]
mod load;

#[path = "support/document.rs"]
mod document;

use document::{render, Seed};
use load::{load, median, Run, Urls, HTTP2, RATE};

struct Args {
    /// Pairs to run (`hits`, `hits-swr-tags`, `search`, `misses`, `redis`,
    /// `redis-spread`, `writes`, `writes-reads`, `writes-lease`, `writes-search`, `writes-search-reads`,
    /// `degraded`, `memory`); empty: all.
    only: Vec<String>,
    seconds: f64,
    rounds: usize,
    connections: usize,
    memory_requests: usize,
    /// The body size of the memory run's responses (`--memory-body`, bytes).
    memory_body: usize,
    /// The memory run's handler answers with axum's `Json` (a buffer grown while
    /// serialising, with room to spare) instead of an exact `Vec` (`--memory-json`).
    memory_json: bool,
    side: Option<usize>,
    /// The body size of the Redis hit pairs (e)/(f) and (e′)/(f′) (`--redis-body`,
    /// bytes; default: the pre-rendered document, about 3 KiB).
    redis_body: Option<usize>,
    /// Pins the bench's redis-server to this CPU (`taskset`), for runs where the bench
    /// itself is pinned to others: Redis then takes no CPU from the server under test,
    /// as on a host of its own.
    redis_cpu: Option<usize>,
}

fn args() -> Args {
    let mut args = Args {
        only: Vec::new(),
        seconds: 2.0,
        rounds: 10,
        connections: 32,
        memory_requests: 200_000,
        memory_body: 4096,
        memory_json: false,
        side: None,
        redis_body: None,
        redis_cpu: None,
    };
    let value = support::option;
    if let Some(v) = value("--seconds") {
        args.seconds = v.parse().expect("--seconds N");
    }
    if let Some(v) = value("--rounds") {
        args.rounds = v.parse().expect("--rounds N");
    }
    if let Some(v) = value("--connections") {
        args.connections = v.parse().expect("--connections N");
    }
    if let Some(v) = value("--only") {
        args.only = v.split(',').map(str::to_owned).collect();
    }
    if let Some(v) = value("--side") {
        args.side = Some(v.parse::<usize>().expect("--side 0|1").min(1));
    }
    if let Some(v) = value("--redis-body") {
        args.redis_body = Some(v.parse().expect("--redis-body BYTES"));
    }
    if let Some(v) = value("--redis-cpu") {
        args.redis_cpu = Some(v.parse().expect("--redis-cpu N"));
    }
    if std::env::args().any(|a| a == "--http2") {
        HTTP2.store(true, Ordering::Relaxed);
    }
    if let Some(v) = value("--rate") {
        RATE.store(v.parse().expect("--rate N"), Ordering::Relaxed);
    }
    if let Some(v) = value("--memory-requests") {
        args.memory_requests = v.parse().expect("--memory-requests N");
    }
    if let Some(v) = value("--memory-body") {
        args.memory_body = v.parse().expect("--memory-body BYTES");
    }
    args.memory_json = std::env::args().any(|a| a == "--memory-json");
    args
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    support::run_on_two_workers(run(args()));
}

async fn run(args: Args) {
    let wanted = |label: &str| args.only.is_empty() || args.only.iter().any(|o| o == label);
    // Memory first, while the process has allocated nothing else.
    if wanted("memory") {
        memory(&args).await;
    }
    if args.only.iter().all(|o| o == "memory") && !args.only.is_empty() {
        return;
    }

    let pre_rendered = Bytes::from(render(0));
    let cache = HybridCache::builder()
        .memory_capacity_bytes(64 << 20)
        .build()
        .await
        .unwrap();
    let layer = || cache.layer().ttl(Duration::from_secs(3600));

    let pre = {
        let body = pre_rendered.clone();
        move || {
            let body = body.clone();
            async move { ([(CONTENT_TYPE, "application/json")], body) }
        }
    };
    let tagged = {
        let body = pre_rendered.clone();
        move || {
            let body = body.clone();
            async move {
                (
                    [
                        (CONTENT_TYPE, "application/json"),
                        (
                            http::header::HeaderName::from_static("cache-tag"),
                            "job:42 company:7 search:berlin",
                        ),
                    ],
                    body,
                )
            }
        }
    };
    let rendered = |Query(seed): Query<Seed>| async move {
        (
            [(CONTENT_TYPE, "application/json")],
            render(seed.i.unwrap_or(0)),
        )
    };
    let data = job_match::Data::temporary(job_match::Seed {
        jobs: 5_000,
        candidates: 100,
    })
    .expect("a database");
    let search_cache = HybridCache::builder()
        .memory_capacity_bytes(64 << 20)
        .build()
        .await
        .unwrap();

    // Pairs of (baseline, the same behind the layer).
    let pairs = [
        Pair {
            label: "hits",
            names: [
                "(a) pre-rendered bytes",
                "(b) (a) behind the layer, memory hits",
            ],
            path: "/pre",
            urls: Urls::Same,
            servers: [
                serve(Router::new().route("/pre", get(pre.clone()))).await,
                serve(Router::new().route("/pre", get(pre.clone()).layer(layer()))).await,
            ],
        },
        Pair {
            label: "hits-swr-tags",
            names: [
                "(a) pre-rendered bytes",
                "(b‴) (a) behind a layer with stale-while-revalidate, every response tagged, memory hits",
            ],
            path: "/pre",
            urls: Urls::Same,
            servers: [
                serve(Router::new().route("/pre", get(pre.clone()))).await,
                serve(Router::new().route(
                    "/pre",
                    get(tagged).layer(layer().stale_while_revalidate(Duration::from_secs(60))),
                ))
                .await,
            ],
        },
        Pair {
            label: "search",
            names: [
                "(c) job_match's search handler (5 000 jobs, facets), unique URLs",
                "(d) (c) behind the layer, all misses, all stored",
            ],
            path: "/jobs/search?q=engineer",
            urls: Urls::Unique,
            servers: [
                serve(job_match::search_router(data.clone(), None)).await,
                serve(job_match::search_router(data, Some(&search_cache))).await,
            ],
        },
        Pair {
            label: "misses",
            names: [
                "(c′) a cheap handler: 3 KB of JSON rendered per request, unique URLs",
                "(d′) (c′) behind the layer, all misses, all stored",
            ],
            path: "/render",
            urls: Urls::Unique,
            servers: [
                serve(Router::new().route("/render", get(rendered))).await,
                serve(Router::new().route("/render", get(rendered).layer(layer()))).await,
            ],
        },
    ];
    let mut pairs: Vec<Pair> = pairs.into_iter().filter(|p| wanted(p.label)).collect();

    // The Redis pairs need a redis-server; it lives until the end of the run.
    let _redis = if [
        "redis",
        "redis-spread",
        "writes",
        "writes-reads",
        "writes-search",
        "writes-search-reads",
        "writes-lease",
        "writes-tracked",
    ]
    .iter()
    .any(|pair| wanted(pair))
    {
        let redis = redis_support::RedisServer::start();
        if let (Some(cpu), Some(pid)) = (args.redis_cpu, redis.pid()) {
            let pinned = std::process::Command::new("taskset")
                .args(["-cp", &cpu.to_string(), &pid.to_string()])
                .output()
                .expect("run taskset");
            assert!(pinned.status.success(), "taskset failed: {pinned:?}");
        }
        // The document repeated to the size asked for, if one was.
        let redis_body = args.redis_body.map_or_else(
            || pre_rendered.clone(),
            |n| {
                Bytes::from(
                    pre_rendered
                        .iter()
                        .copied()
                        .cycle()
                        .take(n)
                        .collect::<Vec<u8>>(),
                )
            },
        );
        pairs.extend(
            redis_pairs(
                &redis.url(),
                redis_body,
                wanted("redis"),
                wanted("redis-spread"),
                wanted("writes"),
                wanted("writes-reads"),
            )
            .await,
        );
        if wanted("writes-search-reads") {
            // (h‴): what the misses' Redis reads cost alone; no entry is small enough
            // to be sent.
            let config = tower_hybrid_cache::RedisConfig::new(redis.url()).max_value_bytes(1);
            pairs.push(
                search_miss_pair(
                    "writes-search-reads",
                    "(h‴) (g″) with Redis on, no entry sent: the misses' Redis reads alone",
                    config,
                )
                .await,
            );
        }
        if wanted("writes-lease") {
            pairs.push(lease_pair(&redis.url()).await);
        }
        if wanted("writes-tracked") {
            pairs.push(tracked_pair(&redis.url()).await);
        }
        if wanted("writes-search") {
            let config = tower_hybrid_cache::RedisConfig::new(redis.url());
            pairs.push(
                search_miss_pair(
                    "writes-search",
                    "(h″) (g″) with Redis on: every store also written to Redis",
                    config,
                )
                .await,
            );
        }
        Some(redis)
    } else {
        None
    };
    // Its CPU is read beside each side's run: what a request costs in redis-server.
    let redis_pid: Option<String> = _redis
        .as_ref()
        .and_then(redis_support::RedisServer::pid)
        .map(|pid| pid.to_string());

    // Killed before the rounds start; the handle keeps its directory until the end.
    let dead_redis = if wanted("degraded") {
        let (pair, redis, cache) = degraded_pair(pre_rendered.clone()).await;
        pairs.push(pair);
        Some((redis, cache))
    } else {
        None
    };

    let counter = Arc::new(AtomicU64::new(0));
    for pair in &pairs {
        for addr in pair.servers {
            load(addr, pair.path, pair.urls, 0.3, 4, counter.clone()).await;
        }
    }
    let hits_before = cache.stats().hits;

    let mut results: Vec<PairResult> = pairs.iter().map(|_| PairResult::default()).collect();
    for round in 0..args.rounds {
        let mut line = format!("round {}:", round + 1);
        for (pair, result) in pairs.iter().zip(&mut results) {
            // Alternate which side goes first, so drift in the machine's speed during
            // a round does not favour one side.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            // For profiling one side: `--side 1` loads only the layered side (the
            // table's ratios are then meaningless).
            let order = match args.side {
                Some(side) => [side, side],
                None => order,
            };
            let mut runs: [Option<Run>; 2] = [None, None];
            for side in order {
                let redis_before = redis_pid.as_deref().map(load::process_cpu_seconds);
                let mut run = load(
                    pair.servers[side],
                    pair.path,
                    pair.urls,
                    args.seconds,
                    args.connections,
                    counter.clone(),
                )
                .await;
                if let (Some(before), Some(pid)) = (redis_before, redis_pid.as_deref()) {
                    let spent = load::process_cpu_seconds(pid) - before;
                    run.redis_cpu_us = Some(spent * 1e6 / run.requests.max(1) as f64);
                }
                runs[side] = Some(run);
            }
            let [Some(base), Some(layered)] = runs else {
                // One side only (--side): its own figures.
                for run in runs.iter().flatten() {
                    line.push_str(&format!(
                        " {} {:.0} req/s at {:.1} CPU µs/req{};",
                        pair.label,
                        run.rps,
                        run.cpu_us,
                        run.redis_cpu_us
                            .map_or(String::new(), |us| format!(" (Redis {us:.1})"))
                    ));
                }
                continue;
            };
            line.push_str(&format!(
                " {} {:.0}/{:.0} req/s",
                pair.label, base.rps, layered.rps
            ));
            result.rps_ratio.push(layered.rps / base.rps);
            // The throughput ratio implied by CPU cost: base cost / layered cost.
            result.cpu_ratio.push(base.cpu_us / layered.cpu_us);
            result.runs.push([base, layered]);
        }
        eprintln!("{line}");
    }
    // Which commands the Redis pairs sent, and how many (`BENCH_REDIS_STATS=1`).
    if std::env::var_os("BENCH_REDIS_STATS").is_some() {
        if let Some(redis) = &_redis {
            println!("{}", redis.cli(&["info", "commandstats"]));
        }
    }
    if args.side.is_some() {
        println!("one side only (--side): no table");
        return;
    }
    if pairs.iter().any(|p| p.label == "hits") {
        assert!(
            cache.stats().hits > hits_before,
            "(b) was served from the cache"
        );
    }
    println!("| scenario | req/s | CPU µs/req | Redis CPU µs/req | p50 µs | p99 µs | ratio by req/s | ratio by CPU |");
    println!("|---|---|---|---|---|---|---|---|");
    for (pair, result) in pairs.iter().zip(&mut results) {
        for side in 0..2 {
            let mut rps: Vec<f64> = result.runs.iter().map(|r| r[side].rps).collect();
            let mut cpu: Vec<f64> = result.runs.iter().map(|r| r[side].cpu_us).collect();
            // Over every run, or none: a run without the bench's Redis shows a dash.
            let mut redis_cpu: Vec<f64> = result
                .runs
                .iter()
                .filter_map(|r| r[side].redis_cpu_us)
                .collect();
            let redis_cpu = if redis_cpu.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}", median(&mut redis_cpu))
            };
            let mut p50: Vec<f64> = result
                .runs
                .iter()
                .map(|r| f64::from(r[side].p50_us))
                .collect();
            let mut p99: Vec<f64> = result
                .runs
                .iter()
                .map(|r| f64::from(r[side].p99_us))
                .collect();
            let ratios = if side == 0 {
                "baseline | baseline".to_owned()
            } else {
                format!(
                    "**{:.3}** | **{:.3}**",
                    median(&mut result.rps_ratio),
                    median(&mut result.cpu_ratio)
                )
            };
            println!(
                "| {} | {:.0} | {:.1} | {redis_cpu} | {:.0} | {:.0} | {ratios} |",
                pair.names[side],
                median(&mut rps),
                median(&mut cpu),
                median(&mut p50),
                median(&mut p99)
            );
        }
    }
    println!();
    println!(
        "Medians of {} rounds of {} s per side, {} connections.",
        args.rounds, args.seconds, args.connections
    );
    for (pair, result) in pairs.iter().zip(&results) {
        let show = |v: &Vec<f64>| {
            v.iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "per-round {}: req/s {} | CPU {}",
            pair.label,
            show(&result.rps_ratio),
            show(&result.cpu_ratio)
        );
    }
    println!("cache: {:?}", cache.stats());
    if let Some(tracked) = TRACKED.get() {
        // Writes dropped for a full queue would make (k) look cheaper than it is.
        println!("tracked cache (k): {:?}", tracked.stats());
    }
    if let Some((_, degraded)) = &dead_redis {
        // Every hit of (j) came from memory without a Redis attempt: the breaker
        // refused each at once.
        let stats = degraded.stats();
        println!("degraded cache: {stats:?}");
        assert!(stats.redis_breaker_rejections + 100 >= stats.fallback_hits);
    }
}

/// (e)/(f): one fred GET per request against the layer serving Redis hits; (g)/(h):
/// all-miss load memory-only against the same with Redis on (every store also queued
/// for Redis).
/// Keys of the spread pair (e′)/(f′).
const SPREAD: u64 = 1000;

/// A connected pool of four fred clients, as the baselines use.
async fn fred_pool(url: &str) -> fred::prelude::Pool {
    use fred::prelude::*;
    let pool = Builder::from_config(Config::from_url(url).unwrap())
        .build_pool(4)
        .unwrap();
    pool.init().await.unwrap();
    pool
}

/// The pre-rendered route (a) behind a layer of `cache` with a one-hour TTL.
async fn serve_pre_behind(cache: &HybridCache, body: Bytes) -> SocketAddr {
    let pre = move || {
        let body = body.clone();
        async move { ([(CONTENT_TYPE, "application/json")], body) }
    };
    serve(Router::new().route(
        "/pre",
        get(pre).layer(cache.layer().ttl(Duration::from_secs(3600))),
    ))
    .await
}

async fn redis_pairs(
    url: &str,
    pre_rendered: Bytes,
    hits: bool,
    spread: bool,
    writes: bool,
    writes_reads: bool,
) -> Vec<Pair> {
    use fred::prelude::*;
    let mut pairs = Vec::new();
    if hits {
        let pool = fred_pool(url).await;
        let _: () = pool
            .set("bench:pre", pre_rendered.clone(), None, None, false)
            .await
            .unwrap();
        let fred_handler = move || {
            let pool = pool.clone();
            async move {
                let body: Bytes = pool.get("bench:pre").await.unwrap();
                ([(CONTENT_TYPE, "application/json")], body)
            }
        };
        let cache = HybridCache::builder().redis_url(url).build().await.unwrap();
        pairs.push(Pair {
            label: "redis",
            names: [
                "(e) one fred GET of the pre-rendered body per request",
                "(f) (a) behind the layer with Redis, every request a Redis hit",
            ],
            path: "/pre",
            urls: Urls::Same,
            servers: [
                serve(Router::new().route("/pre", get(fred_handler))).await,
                serve_pre_behind(&cache, pre_rendered.clone()).await,
            ],
        });
    }
    if spread {
        // (e′)/(f′): the same over SPREAD keys, so that no two requests in flight are
        // likely to ask for the same one.
        let pool = fred_pool(url).await;
        for i in 0..SPREAD {
            let _: () = pool
                .set(
                    format!("bench:pre:{i}"),
                    pre_rendered.clone(),
                    None,
                    None,
                    false,
                )
                .await
                .unwrap();
        }
        let fred_handler = move |Query(seed): Query<Seed>| {
            let pool = pool.clone();
            async move {
                let key = format!("bench:pre:{}", seed.i.unwrap_or(0));
                let body: Bytes = pool.get(key).await.unwrap();
                ([(CONTENT_TYPE, "application/json")], body)
            }
        };
        let cache = HybridCache::builder().redis_url(url).build().await.unwrap();
        let layered = serve_pre_behind(&cache, pre_rendered.clone()).await;
        // Every key stored once, and in Redis, before the rounds.
        let sent = Arc::new(AtomicU64::new(0));
        while sent.load(Ordering::Relaxed) < SPREAD {
            load(layered, "/pre", Urls::Unique, 0.05, 1, sent.clone()).await;
        }
        let dropped = support::redis_written(&cache, SPREAD).await;
        assert_eq!(dropped, 0, "every URL in Redis before the rounds");
        pairs.push(Pair {
            label: "redis-spread",
            names: [
                "(e′) one fred GET per request, 1 000 keys",
                "(f′) (a) behind the layer with Redis, Redis hits over 1 000 keys",
            ],
            path: "/pre",
            urls: Urls::Spread(SPREAD),
            servers: [
                serve(Router::new().route("/pre", get(fred_handler))).await,
                layered,
            ],
        });
    }
    const MEMORY_ONLY: &str = "(g) (c′) behind a memory-only layer, all misses, all stored";
    if writes_reads {
        // (h⁗): what the misses' Redis reads cost alone; no entry is small enough to be
        // sent.
        let reads_only = HybridCache::builder()
            .redis(tower_hybrid_cache::RedisConfig::new(url).max_value_bytes(1))
            .build()
            .await
            .unwrap();
        let memory_only = HybridCache::builder().build().await.unwrap();
        pairs.push(
            render_pair(
                "writes-reads",
                [
                    MEMORY_ONLY,
                    "(h⁗) (g) with Redis on, no entry sent: the misses' Redis reads alone",
                ],
                [&memory_only, &reads_only],
            )
            .await,
        );
    }
    if writes {
        let memory_only = HybridCache::builder().build().await.unwrap();
        let with_redis = HybridCache::builder().redis_url(url).build().await.unwrap();
        pairs.push(
            render_pair(
                "writes",
                [
                    MEMORY_ONLY,
                    "(h) (g) with Redis on: every store also written to Redis",
                ],
                [&memory_only, &with_redis],
            )
            .await,
        );
    }
    pairs
}

/// (h) against (h′): all misses with Redis on, without and with the cross-replica fill
/// lease (a `SET NX` before each origin call, a release after its write): what the
/// lease costs a miss.
async fn lease_pair(url: &str) -> Pair {
    let without = HybridCache::builder().redis_url(url).build().await.unwrap();
    let with = HybridCache::builder()
        .redis_url(url)
        .redis_fill_lease(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    render_pair(
        "writes-lease",
        [
            "(h) all misses with Redis on, no fill lease",
            "(h′) (h) with the fill lease: a SET NX per miss, a release after its write",
        ],
        [&without, &with],
    )
    .await
}

/// (g) against (k): all misses memory-only, and with Redis on and the written keys
/// tracked (no miss reads Redis; each write is announced): with (h), what tracking
/// takes off a miss's Redis cost.
/// (k)'s cache, for its counts at the end.
static TRACKED: std::sync::OnceLock<HybridCache> = std::sync::OnceLock::new();

async fn tracked_pair(url: &str) -> Pair {
    let memory_only = HybridCache::builder().build().await.unwrap();
    let tracked = HybridCache::builder()
        .redis(tower_hybrid_cache::RedisConfig::new(url).track_written_keys(1 << 22))
        .build()
        .await
        .unwrap();
    while tracked.redis_health().and_then(|h| h.written_keys_complete) != Some(true) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = TRACKED.set(tracked.clone());
    render_pair(
        "writes-tracked",
        [
            "(g) (c′) behind a memory-only layer, all misses, all stored",
            "(k) (h) with track_written_keys: no miss reads Redis",
        ],
        [&memory_only, &tracked],
    )
    .await
}

/// (c′)'s cheap handler on unique URLs (all misses) behind each of `caches`, 60 s TTL.
async fn render_pair(
    label: &'static str,
    names: [&'static str; 2],
    caches: [&HybridCache; 2],
) -> Pair {
    let rendered = |Query(seed): Query<Seed>| async move {
        (
            [(CONTENT_TYPE, "application/json")],
            render(seed.i.unwrap_or(0)),
        )
    };
    let route = |cache: &HybridCache| {
        Router::new().route(
            "/render",
            get(rendered).layer(cache.layer().ttl(Duration::from_secs(60))),
        )
    };
    let [base, layered] = caches;
    Pair {
        label,
        names,
        path: "/render",
        urls: Urls::Unique,
        servers: [serve(route(base)).await, serve(route(layered)).await],
    }
}

/// (i)/(j): memory hits on a memory-only layer against the same on a layer whose
/// Redis is dead and whose breaker is open.
/// The job search's all-miss load behind a memory-only layer, (g″), against the same
/// behind a layer with Redis as `redis` says.
async fn search_miss_pair(
    label: &'static str,
    layered: &'static str,
    redis: tower_hybrid_cache::RedisConfig,
) -> Pair {
    let data = job_match::Data::temporary(job_match::Seed {
        jobs: 5_000,
        candidates: 100,
    })
    .expect("a database");
    let memory_only = HybridCache::builder().build().await.unwrap();
    let with_redis = HybridCache::builder().redis(redis).build().await.unwrap();
    Pair {
        label,
        names: [
            "(g″) (c) behind a memory-only layer, all misses, all stored",
            layered,
        ],
        path: "/jobs/search?q=engineer",
        urls: Urls::Unique,
        servers: [
            serve(job_match::search_router(data.clone(), Some(&memory_only))).await,
            serve(job_match::search_router(data, Some(&with_redis))).await,
        ],
    }
}

async fn degraded_pair(pre_rendered: Bytes) -> (Pair, redis_support::RedisServer, HybridCache) {
    let mut redis = redis_support::RedisServer::start();
    let memory_only = HybridCache::builder().build().await.unwrap();
    let degraded = HybridCache::builder()
        .redis_url(redis.url())
        .build()
        .await
        .unwrap();
    let pre = move || {
        let body = pre_rendered.clone();
        async move { ([(CONTENT_TYPE, "application/json")], body) }
    };
    let servers = [
        serve(Router::new().route(
            "/pre",
            get(pre.clone()).layer(memory_only.layer().ttl(Duration::from_secs(3600))),
        ))
        .await,
        serve(Router::new().route(
            "/pre",
            get(pre).layer(degraded.layer().ttl(Duration::from_secs(3600))),
        ))
        .await,
    ];
    // Warm both, then kill Redis and wait for the breaker to open.
    let counter = Arc::new(AtomicU64::new(0));
    for addr in servers {
        load(addr, "/pre", Urls::Same, 0.2, 1, counter.clone()).await;
    }
    redis.kill();
    let breaker = degraded.redis_breaker().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while breaker.state() != tower_hybrid_cache::breaker::BreakerState::Open {
        assert!(Instant::now() < deadline, "the breaker did not open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pair = Pair {
        label: "degraded",
        names: [
            "(i) (a) behind a memory-only layer, memory hits",
            "(j) (i) with Redis killed and the breaker open, memory hits",
        ],
        path: "/pre",
        urls: Urls::Same,
        servers,
    };
    (pair, redis, degraded)
}

struct Pair {
    label: &'static str,
    names: [&'static str; 2],
    path: &'static str,
    urls: Urls,
    servers: [SocketAddr; 2],
}

#[derive(Default)]
struct PairResult {
    runs: Vec<[Run; 2]>,
    rps_ratio: Vec<f64>,
    cpu_ratio: Vec<f64>,
}

/// Resident size under a load of unique URLs against a small capacity.
async fn memory(args: &Args) {
    const CAPACITY: u64 = 32 << 20;
    let (requests, size, json) = (args.memory_requests, args.memory_body, args.memory_json);
    let cache = HybridCache::builder()
        .memory_capacity_bytes(CAPACITY)
        .build()
        .await
        .unwrap();
    // A fresh body per response, as a real handler makes: an exact `Vec`, or JSON
    // serialised into a growing buffer (axum's `Json`).
    let handler = move |Query(seed): Query<Seed>| async move {
        let byte = (seed.i.unwrap_or(0) % 26) as u8 + b'a';
        if json {
            // `{"d":"…"}`: 8 bytes around the string.
            let data = String::from_utf8(vec![byte; size.saturating_sub(8)]).unwrap();
            axum::Json(serde_json::json!({ "d": data })).into_response()
        } else {
            vec![byte; size].into_response()
        }
    };
    let addr = serve(Router::new().route(
        "/m",
        get(handler).layer(cache.layer().ttl(Duration::from_secs(3600))),
    ))
    .await;
    let counter = Arc::new(AtomicU64::new(0));
    // Before anything is stored: the growth below is what the cache holds plus what
    // the allocator keeps.
    let before = rss_bytes();
    let started = Instant::now();
    let mut peak = before;
    while (counter.load(Ordering::Relaxed) as usize) < requests {
        load(addr, "/m", Urls::Unique, 0.25, 8, counter.clone()).await;
        peak = peak.max(rss_bytes());
    }
    cache.run_pending_tasks().await;
    let after = rss_bytes();
    let stored = cache.stats().stores;
    println!();
    println!(
        "| memory: {size} B bodies{}, unique URLs, capacity {} MiB | value |",
        if json { " (axum `Json`)" } else { "" },
        CAPACITY >> 20
    );
    println!("|---|---|");
    println!(
        "| requests sent | {} in {:.1} s |",
        counter.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    println!(
        "| responses stored | {stored} ({:.0} MiB of bodies) |",
        stored as f64 * size as f64 / 1048576.0
    );
    println!(
        "| entries held at the end | {} |",
        cache.memory_entry_count()
    );
    println!(
        "| weighted size at the end | {:.1} MiB |",
        cache.memory_weighted_size() as f64 / 1048576.0
    );
    println!(
        "| RSS before the load | {:.1} MiB |",
        before as f64 / 1048576.0
    );
    println!("| RSS at the end | {:.1} MiB |", after as f64 / 1048576.0);
    println!(
        "| RSS peak (sampled every 0.25 s) | {:.1} MiB |",
        peak.max(after) as f64 / 1048576.0
    );
    let growth = (peak.max(after) as f64 - before as f64) / 1048576.0;
    println!(
        "| RSS peak growth | {growth:.1} MiB (capacity {} MiB) |",
        CAPACITY >> 20
    );
    let capacity = (CAPACITY >> 20) as f64;
    println!(
        "| growth against the target, 1.15 × capacity + 8 MiB = {:.1} MiB | {:.2} |",
        1.15 * capacity + 8.0,
        growth / (1.15 * capacity + 8.0)
    );
    println!(
        "| bytes of RSS growth per entry held, against the weigher's | {:.0} against {:.0} |",
        growth * 1048576.0 / cache.memory_entry_count().max(1) as f64,
        cache.memory_weighted_size() as f64 / cache.memory_entry_count().max(1) as f64
    );
}
