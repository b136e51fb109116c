//! How a hit's and a miss's cost grows as the work grows: entries held, body size,
//! `Vary` variants per URL, tags per entry; beside the limits measured in the same
//! run (the handler alone returning the same bytes; one bare fred `GET` of them), and
//! the Redis commands each request sent (BENCHMARKS.md, "How cost grows").
//!
//! ```text
//! cargo bench --bench scaling                 # about seven minutes
//! cargo bench --bench scaling -- --seconds 0.5 --max-entries 100000   # quicker
//! cargo bench --bench scaling -- --tables entries --min-entries 1000000  # one row, to profile
//! ```
//!
//! `--tables` takes a comma-separated list of `entries`, `body`, `vary`, `tags`,
//! `invalidations`, `commands` (default all).
//!
//! Everything runs on one thread (a current-thread runtime: the layer, the handler,
//! fred's connections), and each figure is that thread's CPU time per request
//! (`/proc/thread-self/schedstat`, in nanoseconds): what the request cost this
//! process, whatever else the machine does. Requests go through `oneshot` on a clone
//! of the service, as a server calls it, and each body is read to its end.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

use std::convert::Infallible;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_hybrid_cache::layer::RequestBody;
use tower_hybrid_cache::{HybridCache, RedisConfig};

#[allow(dead_code)]
#[path = "../tests/support/redis.rs"]
mod redis_support;
#[allow(dead_code)]
mod support;

type Req = Request<RequestBody<Full<Bytes>>>;

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = stat
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// Requests `op(i)` for i = 0, 1, … for about `seconds` of wall time, three rounds;
/// the median round's CPU µs per request.
async fn per_request<F, Fut>(seconds: f64, mut op: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut rounds = Vec::new();
    let mut i = 0;
    for _ in 0..3 {
        let (wall, cpu) = (Instant::now(), thread_cpu());
        let mut n = 0u64;
        while wall.elapsed().as_secs_f64() < seconds / 3.0 {
            for _ in 0..64 {
                op(i).await;
                i += 1;
                n += 1;
            }
        }
        rounds.push((thread_cpu() - cpu).as_secs_f64() * 1e6 / n as f64);
    }
    rounds.sort_by(f64::total_cmp);
    rounds[1]
}

/// This thread's CPU time so far, to the nanosecond: `schedstat` moves at the
/// scheduler's ticks, too coarse for a few milliseconds of calls.
fn thread_cpu_now() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    Duration::from(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("a thread CPU clock"))
}

/// `op(i)` for i = 0 to `count` - 1; this thread's CPU µs per call.
async fn per_call<F, Fut>(count: u64, mut op: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let cpu = thread_cpu_now();
    for i in 0..count {
        op(i).await;
    }
    (thread_cpu_now() - cpu).as_secs_f64() * 1e6 / count as f64
}

/// What the origin answers: `size` bytes (one shared buffer, as pre-rendered bytes
/// are), with `Vary: accept-language` when asked, and `tags` tags.
#[derive(Clone)]
struct Origin {
    body: Bytes,
    vary: bool,
    tags: Option<HeaderValue>,
    /// Also tags each response `item-{n}` after its URL's last segment.
    own_tag: bool,
}

impl Origin {
    fn new(size: usize) -> Self {
        Origin {
            body: Bytes::from(vec![b'x'; size]),
            vary: false,
            tags: None,
            own_tag: false,
        }
    }

    fn own_tag(mut self) -> Self {
        self.own_tag = true;
        self
    }

    fn varying(mut self) -> Self {
        self.vary = true;
        self
    }

    fn tagged(mut self, tags: usize) -> Self {
        let list: Vec<String> = (0..tags).map(|t| format!("tag-{t}")).collect();
        self.tags = (tags > 0).then(|| HeaderValue::try_from(list.join(" ")).unwrap());
        self
    }

    fn service(
        &self,
    ) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
           + Clone
           + Send
           + 'static {
        let origin = self.clone();
        tower::service_fn(move |request: Req| {
            let origin = origin.clone();
            async move {
                let mut response = Response::new(Full::new(origin.body));
                let headers = response.headers_mut();
                headers.insert("content-type", HeaderValue::from_static("application/json"));
                if origin.vary {
                    headers.insert("vary", HeaderValue::from_static("accept-language"));
                }
                if let Some(tags) = origin.tags {
                    headers.insert("cache-tag", tags);
                }
                if origin.own_tag {
                    let item = request.uri().path().rsplit('/').next().unwrap_or_default();
                    let tag = HeaderValue::try_from(format!("item-{item}")).unwrap();
                    headers.append("cache-tag", tag);
                }
                Ok::<_, Infallible>(response)
            }
        })
    }
}

/// GET `/items/{url}`, with `accept-language: l{variant}`.
fn request(url: u64, variant: u64) -> Request<Full<Bytes>> {
    Request::get(format!("http://api.test/items/{url}"))
        .header("accept-language", format!("l{variant}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Calls `service` with `request` and reads the body to its end.
async fn ask<S, B>(service: &S, request: Request<B>)
where
    S: Service<Request<B>, Response = Response<tower_hybrid_cache::layer::CacheBody<Full<Bytes>>>>
        + Clone,
    S::Error: std::fmt::Debug,
{
    let response = service.clone().oneshot(request).await.unwrap();
    response.into_body().collect().await.unwrap();
}

/// The handler alone: the limit of both a hit and a miss.
async fn bare(seconds: f64, origin: &Origin) -> f64 {
    let service = origin.service();
    per_request(seconds, |i| {
        let service = service.clone();
        async move {
            let response = service
                .oneshot(request(i, 0).map(RequestBody::new))
                .await
                .unwrap();
            response.into_body().collect().await.unwrap();
        }
    })
    .await
}

/// One bare fred `GET` of a body of `size` bytes: the limit of a Redis hit.
async fn bare_get(seconds: f64, url: &str, size: usize) -> f64 {
    use fred::prelude::*;
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    let _: () = client
        .set("bench:scaling", vec![b'x'; size], None, None, false)
        .await
        .unwrap();
    per_request(seconds, |_| {
        let client = client.clone();
        async move {
            let body: Bytes = client.get("bench:scaling").await.unwrap();
            assert_eq!(body.len(), size);
        }
    })
    .await
}

/// A cache: memory only, or on the Redis at `redis` (every lookup asks Redis first),
/// sending entries up to 2 MiB (the default, 1 MiB, keeps a 1 MiB body's entry in
/// memory only).
async fn cache(redis: Option<&str>) -> HybridCache {
    let builder = HybridCache::builder().memory_capacity_bytes(8 << 30);
    match redis {
        Some(url) => builder.redis(RedisConfig::new(url).max_value_bytes(2 << 20)),
        None => builder,
    }
    .build()
    .await
    .unwrap()
}

/// Redis's count of commands it processed so far.
fn redis_commands(redis: &redis_support::RedisServer) -> u64 {
    redis
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Hit and stored-miss cost through a layer over `origin`: `urls` URLs of `variants`
/// variants each stored first, then hits spread over them, then misses on new URLs.
/// Returns (hit µs, miss µs, Redis commands per hit, per miss).
async fn layer_costs(
    seconds: f64,
    origin: &Origin,
    urls: u64,
    variants: u64,
    redis: Option<&redis_support::RedisServer>,
) -> (f64, f64, f64, f64) {
    let url = redis.map(redis_support::RedisServer::url);
    let cache = cache(url.as_deref()).await;
    let service = cache
        .layer()
        .ttl(Duration::from_secs(3600))
        .layer(origin.service());
    for u in 0..urls {
        for v in 0..variants {
            ask(&service, request(u, v)).await;
        }
    }
    // A store that had to wait goes on in a task: wait for the last ones.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cache.stats().stores < urls * variants {
        assert!(Instant::now() < deadline, "not all stored");
        cache.run_pending_tasks().await;
        tokio::task::yield_now().await;
    }
    let dropped =
        support::redis_written(&cache, if redis.is_some() { urls * variants } else { 0 }).await;
    assert_eq!(dropped, 0, "every URL in Redis before the hits");
    let commands = || redis.map_or(0, redis_commands);
    // Hits in an order no cache line predicts (a multiplicative hash of the count).
    let (before, asked) = (commands(), std::cell::Cell::new(0u64));
    let hit = per_request(seconds, |i| {
        asked.set(asked.get() + 1);
        let spread = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
        ask(&service, request(spread % urls, (spread >> 20) % variants))
    })
    .await;
    let hits = cache.stats().hits;
    assert!(
        hits >= asked.get(),
        "every request a hit: {hits} < {}",
        asked.get()
    );
    let per_hit = (commands() - before) as f64 / asked.get() as f64;
    let (before, asked) = (commands(), std::cell::Cell::new(0u64));
    let miss = per_request(seconds, |i| {
        asked.set(asked.get() + 1);
        ask(&service, request(urls + i, 0))
    })
    .await;
    cache.run_pending_tasks().await;
    // Misses may store faster than Redis takes the writes (large bodies): the queue
    // then drops some, as it would under any such load.
    let dropped = support::redis_written(
        &cache,
        if redis.is_some() {
            urls * variants + asked.get()
        } else {
            0
        },
    )
    .await;
    if dropped > 0 {
        eprintln!(
            "{dropped} of {} Redis writes dropped (the write queue was full)",
            asked.get()
        );
    }
    let per_miss = (commands() - before) as f64 / asked.get() as f64;
    cache.shutdown().await;
    (hit, miss, per_hit, per_miss)
}

fn main() {
    let seconds: f64 = support::option("--seconds").map_or(1.5, |v| v.parse().unwrap());
    let max_entries: u64 =
        support::option("--max-entries").map_or(1_000_000, |v| v.parse().unwrap());
    let min_entries: u64 = support::option("--min-entries").map_or(1_000, |v| v.parse().unwrap());
    let tables: Option<Vec<String>> =
        support::option("--tables").map(|v| v.split(',').map(str::to_owned).collect());
    let wanted = move |table: &str| tables.as_ref().is_none_or(|t| t.iter().any(|n| n == table));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let redis = redis_support::RedisServer::start();
        let small = Origin::new(200);
        let limit = bare(seconds, &small).await;
        if wanted("entries") {
            println!("\n### Entries held (200 B bodies, memory only)\n");
            println!("| entries held | hit µs | stored miss µs | handler alone µs | hit / handler | miss / handler |");
            println!("|---|---|---|---|---|---|");
            let mut held = min_entries;
            while held <= max_entries {
                let (hit, miss, _, _) = layer_costs(seconds, &small, held, 1, None).await;
                println!(
                    "| {held} | {hit:.2} | {miss:.2} | {limit:.2} | {:.2} | {:.2} |",
                    hit / limit,
                    miss / limit
                );
                held *= 10;
            }
        }

        if wanted("body") {
            println!("\n### Body size (1 000 URLs held)\n");
            println!("| body | handler alone µs | memory hit µs | memory miss µs | bare fred GET µs | Redis hit µs | Redis miss µs | Redis commands per hit / miss |");
            println!("|---|---|---|---|---|---|---|---|");
            for size in [1 << 10, 16 << 10, 256 << 10, 1 << 20] {
                let origin = Origin::new(size);
                let limit = bare(seconds, &origin).await;
                let (hit, miss, _, _) = layer_costs(seconds, &origin, 1_000, 1, None).await;
                let get = bare_get(seconds, &redis.url(), size).await;
                let (rhit, rmiss, per_hit, per_miss) =
                    layer_costs(seconds, &origin, 1_000, 1, Some(&redis)).await;
                println!(
                    "| {} KiB | {limit:.2} | {hit:.2} | {miss:.2} | {get:.2} | {rhit:.2} | {rmiss:.2} | {per_hit:.2} / {per_miss:.2} |",
                    size >> 10
                );
                let _ = redis.cli(&["FLUSHALL"]);
            }
        }

        if wanted("vary") {
            println!("\n### Vary variants per URL (200 B bodies, 1 000 URLs)\n");
            println!("| variants | memory hit µs | Redis hit µs | Redis commands per hit |");
            println!("|---|---|---|---|");
            for variants in [1, 4, 16, 64] {
                let origin = Origin::new(200).varying();
                let (hit, _, _, _) = layer_costs(seconds, &origin, 1_000, variants, None).await;
                let (rhit, _, per_hit, _) =
                    layer_costs(seconds, &origin, 1_000, variants, Some(&redis)).await;
                println!("| {variants} | {hit:.2} | {rhit:.2} | {per_hit:.2} |");
                let _ = redis.cli(&["FLUSHALL"]);
            }
        }

        if wanted("tags") {
            println!("\n### Tags per entry (200 B bodies, 1 000 URLs)\n");
            println!("| tags | memory hit µs | memory miss µs | Redis hit µs | Redis miss µs | Redis commands per miss |");
            println!("|---|---|---|---|---|---|");
            for tags in [0, 1, 8, 32] {
                let origin = Origin::new(200).tagged(tags);
                let (hit, miss, _, _) = layer_costs(seconds, &origin, 1_000, 1, None).await;
                let (rhit, rmiss, _, per_miss) =
                    layer_costs(seconds, &origin, 1_000, 1, Some(&redis)).await;
                println!("| {tags} | {hit:.2} | {miss:.2} | {rhit:.2} | {rmiss:.2} | {per_miss:.2} |");
                let _ = redis.cli(&["FLUSHALL"]);
            }
        }

        if wanted("invalidations") {
            println!("\n### Invalidations against entries held (200 B bodies, memory only)\n");
            println!("Each entry tagged `tag-0`, `tag-1` and `item-{{n}}` (its own); a key's");
            println!("invalidation (`invalidate`), a tag naming one entry (`item-{{n}}`), a tag");
            println!("naming none, each timed over min(entries / 2, 1 000) calls; then one");
            println!("`purge_all` of what is left.\n");
            println!("| entries held | key µs | tag naming one µs | tag naming none µs | purge ms |");
            println!("|---|---|---|---|---|");
            let origin = Origin::new(200).tagged(2).own_tag();
            let mut held = min_entries;
            while held <= max_entries {
                let cache = cache(None).await;
                let service = cache
                    .layer()
                    .ttl(Duration::from_secs(3600))
                    .layer(origin.service());
                for u in 0..held {
                    ask(&service, request(u, 0)).await;
                }
                cache.run_pending_tasks().await;
                assert_eq!(cache.memory_entry_count(), held, "every entry held");
                let calls = (held / 2).min(1_000);
                let key = per_call(calls, |i| {
                    let uri: http::Uri = format!("http://api.test/items/{i}").parse().unwrap();
                    let cache = cache.clone();
                    async move {
                        cache.invalidate(&uri).await;
                    }
                })
                .await;
                let one = per_call(calls, |i| {
                    let cache = cache.clone();
                    async move {
                        cache.invalidate_tag(&format!("item-{}", held - 1 - i)).await;
                    }
                })
                .await;
                let none = per_call(calls, |i| {
                    let cache = cache.clone();
                    async move {
                        cache.invalidate_tag(&format!("nothing-{i}")).await;
                    }
                })
                .await;
                assert_eq!(cache.memory_entry_count(), held - 2 * calls, "each named one");
                let purge = per_call(1, |_| {
                    let cache = cache.clone();
                    async move {
                        cache.purge_all().await;
                    }
                })
                .await;
                assert_eq!(cache.memory_entry_count(), 0, "purged");
                println!("| {held} | {key:.2} | {one:.2} | {none:.2} | {:.1} |", purge / 1000.0);
                cache.shutdown().await;
                held *= 10;
            }
        }

        if wanted("commands") {
            println!("\n### Redis commands by name (200 B bodies, 4 tags; per request)\n");
            let origin = Origin::new(200).tagged(4);
            let cache = cache(Some(&redis.url())).await;
            let service = cache
                .layer()
                .ttl(Duration::from_secs(3600))
                .layer(origin.service());
            const N: u64 = 2_000;
            let _ = redis.cli(&["CONFIG", "RESETSTAT"]);
            for u in 0..N {
                ask(&service, request(u, 0)).await;
            }
            let dropped = support::redis_written(&cache, N).await;
            assert_eq!(dropped, 0, "every write counted");
            let misses = redis.cli(&["INFO", "commandstats"]);
            let _ = redis.cli(&["CONFIG", "RESETSTAT"]);
            for u in 0..N {
                ask(&service, request(u, 0)).await;
            }
            let hits = redis.cli(&["INFO", "commandstats"]);
            println!("| command | per stored miss | per hit |");
            println!("|---|---|---|");
            let calls = |stats: &str, name: &str| {
                stats
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let mut names: Vec<String> = misses
                .lines()
                .chain(hits.lines())
                .filter_map(|l| l.strip_prefix("cmdstat_"))
                .filter_map(|l| l.split(':').next())
                .map(str::to_owned)
                .filter(|n| n != "config" && n != "info")
                .collect();
            names.sort();
            names.dedup();
            for name in names {
                println!(
                    "| `{name}` | {:.2} | {:.2} |",
                    calls(&misses, &name) as f64 / N as f64,
                    calls(&hits, &name) as f64 / N as f64
                );
            }
            cache.shutdown().await;
        }
    });
}
