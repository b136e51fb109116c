//! The peer comparison: the same axum handlers with no cache, behind this crate, and
//! behind tower-http-cache, axum-response-cache, http-cache-tower and hitbox, in one
//! run on one machine, sides interleaved round by round.
//!
//! `cd benches/peers && cargo run --release -- --rounds 6` (from this folder: its
//! `.cargo/config.toml` puts the build under the library's `target/peers`)
//! (options: `--seconds 2 --rounds 6 --connections 32 --only hits,misses-2ms,…`;
//! scenarios: `hits`, `misses-2ms`, `misses-cheap`, `redis-hits`, `redis-misses-2ms`).
//!
//! - `hits`: one URL, a handler returning pre-rendered bytes (3 KB of JSON); no cache
//!   is the limit, each cache serves memory hits.
//! - `misses-2ms`: unique URLs, a handler that waits 2 ms and renders the JSON; every
//!   response stored.
//! - `misses-cheap`: the same without the wait: the worst case for a cache's own cost.
//! - `redis-hits`: 1 000 URLs, each stored in Redis before the rounds, served from
//!   Redis by the caches that have a Redis backend (this crate with its memory tier as
//!   the fallback only, as it is by default with Redis; the peers' Redis backends on
//!   their own); no cache is the pre-rendered handler.
//! - `redis-misses-2ms`: `misses-2ms` with the Redis backends.
//!
//! Every handler counts its calls: the table's "origin calls/req" shows that a cache
//! hits where it should (about 0 for hits) and stores where it should (1 for misses).
//! Each peer is configured as its README shows, with a TTL of an hour and room for
//! about 10 000 of these entries; what differs is written in `SIDES`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::error_handling::HandleErrorLayer;
use axum::extract::Query;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{StatusCode, Uri};
use tower::{BoxError, ServiceBuilder};

#[allow(dead_code)]
#[path = "../../support/document.rs"]
mod document;
#[allow(dead_code)]
#[path = "../../support/load.rs"]
mod load;
#[allow(dead_code, unreachable_pub)]
#[path = "../../../tests/support/redis.rs"]
mod redis_support;
#[allow(dead_code)]
#[path = "../../support/mod.rs"]
mod support;

use document::{render, Seed};
use load::{load, median, Run, Urls};

const TTL: Duration = Duration::from_secs(3600);
/// Entries each peer may hold (they count entries; this crate counts bytes).
const ENTRIES: u64 = 10_000;
/// This crate's memory capacity: about `ENTRIES` of these 3 KB responses at its
/// weigher's charge (body, fields and bookkeeping: ~4.6 KB an entry).
const CAPACITY_BYTES: u64 = 46 << 20;
/// The URLs of `redis-hits`.
const SPREAD: u64 = 1_000;

/// Who serves a side.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    NoCache,
    Ours,
    TowerHttpCache,
    AxumResponseCache,
    HttpCacheTower,
    Hitbox,
    OursRedis,
    TowerHttpCacheRedis,
    HitboxRedis,
}

impl Side {
    /// The side's name on the command line (`--sides`, `--instructions`).
    fn key(self) -> &'static str {
        match self {
            Side::NoCache => "none",
            Side::Ours => "ours",
            Side::TowerHttpCache => "tower-http-cache",
            Side::AxumResponseCache => "axum-response-cache",
            Side::HttpCacheTower => "http-cache-tower",
            Side::Hitbox => "hitbox",
            Side::OursRedis => "ours-redis",
            Side::TowerHttpCacheRedis => "tower-http-cache-redis",
            Side::HitboxRedis => "hitbox-redis",
        }
    }
}

/// Each side with its name and its configuration, as the table prints them.
const SIDES: &[(Side, &str, &str)] = &[
    (Side::NoCache, "no cache", "the handler alone"),
    (
        Side::Ours,
        "tower-hybrid-cache 0.1 (memory)",
        "`HybridCache::builder().memory_capacity_bytes(46 MiB)`, `.layer().ttl(1 h)`",
    ),
    (
        Side::TowerHttpCache,
        "tower-http-cache 0.6.1 (memory)",
        "`CacheLayer::builder(InMemoryBackend::new(10 000)).ttl(1 h)`; errors mapped by `HandleErrorLayer`",
    ),
    (
        Side::AxumResponseCache,
        "axum-response-cache 0.5.0 (memory)",
        "`CacheLayer::with(LruTtlCache::with_size_and_ttl(10 000, 1 h)).add_response_headers()` (without it a hit loses `Content-Type`)",
    ),
    (
        Side::HttpCacheTower,
        "http-cache-tower 1.0.0-alpha.9 (memory)",
        "`HttpCacheLayer::new(MokaManager::new(MokaCache::new(10 000)))`, RFC 9111 rules (the handler sends `max-age=3600`); the URI made absolute first (it parses it as a URL), errors mapped",
    ),
    (
        Side::Hitbox,
        "hitbox-tower 0.2.0 (memory)",
        "`MokaBackend::builder().max_entries(10 000).value_format(BincodeFormat)` (its default, JSON, costs ~8× the CPU a hit), key `Method + path + query i`, neutral predicates, `ttl(1 h)`; no concurrency manager (the default)",
    ),
    (
        Side::OursRedis,
        "tower-hybrid-cache 0.1 (Redis)",
        "`.redis_url(…)`: Redis the shared tier, memory the fallback only (the default)",
    ),
    (
        Side::TowerHttpCacheRedis,
        "tower-http-cache 0.6.1 (Redis)",
        "`RedisBackend::new(ConnectionManager)`, as above otherwise",
    ),
    (
        Side::HitboxRedis,
        "hitbox-tower 0.2.0 (Redis)",
        "`hitbox_redis::RedisBackend` (single node, bincode), as above otherwise",
    ),
];

const MEMORY_SIDES: &[Side] = &[
    Side::NoCache,
    Side::Ours,
    Side::TowerHttpCache,
    Side::AxumResponseCache,
    Side::HttpCacheTower,
    Side::Hitbox,
];
const REDIS_SIDES: &[Side] = &[
    Side::NoCache,
    Side::OursRedis,
    Side::TowerHttpCacheRedis,
    Side::HitboxRedis,
];

struct Scenario {
    label: &'static str,
    what: &'static str,
    path: &'static str,
    urls: Urls,
    sides: &'static [Side],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        label: "hits",
        what: "memory hits: one URL, pre-rendered 3 KB of JSON",
        path: "/pre",
        urls: Urls::Same,
        sides: MEMORY_SIDES,
    },
    Scenario {
        label: "misses-2ms",
        what: "all misses, memory: unique URLs, a 2 ms handler rendering 3 KB of JSON, every response stored",
        path: "/slow",
        urls: Urls::Unique,
        sides: MEMORY_SIDES,
    },
    Scenario {
        label: "misses-cheap",
        what: "all misses, memory: unique URLs, the same handler without the wait",
        path: "/cheap",
        urls: Urls::Unique,
        sides: MEMORY_SIDES,
    },
    Scenario {
        label: "redis-hits",
        what: "Redis hits over 1 000 URLs (no cache: the pre-rendered handler)",
        path: "/pre",
        urls: Urls::Spread(SPREAD),
        sides: REDIS_SIDES,
    },
    Scenario {
        label: "redis-misses-2ms",
        what: "all misses with Redis: unique URLs, the 2 ms handler, every response stored",
        path: "/slow",
        urls: Urls::Unique,
        sides: REDIS_SIDES,
    },
];

/// A side's server, the count of its handlers' calls and of the URLs it was asked.
struct Server {
    addr: SocketAddr,
    origin_calls: Arc<AtomicU64>,
    urls: Arc<AtomicU64>,
}

fn main() {
    if let Some(n) = support::option("--instructions") {
        let side = support::option("--side").expect("--side NAME with --instructions");
        let side = *MEMORY_SIDES.iter().find(|s| s.key() == side).expect(
            "--side: none, ours, tower-http-cache, axum-response-cache, http-cache-tower or hitbox",
        );
        let misses = support::option("--scenario").as_deref() != Some("hits");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(instructions(
                side,
                misses,
                n.parse().expect("--instructions N"),
            ));
        return;
    }
    support::run_on_two_workers(run());
}

/// Calls `side`'s routes `n` times in this thread, no sockets: unique URLs of the cheap
/// handler (`misses`) or the pre-rendered URL (hits), for an instruction count under
/// callgrind: (Ir(12 000) − Ir(2 000)) / 10 000 a request; the `none` side's count is
/// the handler's and axum's share.
async fn instructions(side: Side, misses: bool, n: u64) {
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};
    let calls = Arc::new(AtomicU64::new(0));
    let mut service = cached_routes(side, None, &calls).await;
    for i in 0..n {
        let uri = if misses {
            format!("/cheap?i={i}")
        } else {
            "/pre".to_owned()
        };
        let request = http::Request::get(uri)
            .header("host", "bench")
            .body(axum::body::Body::empty())
            .unwrap();
        let ready = ServiceExt::<http::Request<axum::body::Body>>::ready(&mut service);
        let response = ready.await.unwrap().call(request).await.unwrap();
        assert!(response.status().is_success());
        response.into_body().collect().await.unwrap();
        // Let whatever a cache spawned run now, as a server's runtime would.
        tokio::task::yield_now().await;
    }
    let expected = if misses || side == Side::NoCache {
        n
    } else {
        1
    };
    assert_eq!(calls.load(Ordering::Relaxed), expected, "origin calls");
}

async fn run() {
    let seconds: f64 = support::option("--seconds").map_or(2.0, |v| v.parse().unwrap());
    let rounds: usize = support::option("--rounds").map_or(6, |v| v.parse().unwrap());
    let connections: usize = support::option("--connections").map_or(32, |v| v.parse().unwrap());
    let only: Vec<String> = support::option("--only")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| o == s.label))
        .collect();
    // `--sides ours,hitbox`: only these (and no cache), e.g. to profile one.
    let wanted_sides: Vec<String> = support::option("--sides")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let keep = |side: &Side| {
        *side == Side::NoCache
            || wanted_sides.is_empty()
            || wanted_sides.iter().any(|w| w == side.key())
    };
    let redis = scenarios
        .iter()
        .any(|s| s.label.starts_with("redis"))
        .then(redis_support::RedisServer::start);
    let url = redis.as_ref().map(redis_support::RedisServer::url);

    println!("## Against other caches\n");
    println!("| side | configuration |\n|---|---|");
    for (_, name, config) in SIDES {
        println!("| {name} | {config} |");
    }

    for scenario in scenarios {
        // A server per side, each with its own cache (a Redis namespace of its own
        // for the Redis sides: they share one redis-server).
        let sides: Vec<Side> = scenario.sides.iter().copied().filter(keep).collect();
        let mut servers = Vec::new();
        for side in &sides {
            let server = serve(*side, url.as_deref()).await;
            if scenario.label == "redis-hits" && *side != Side::NoCache {
                warm(&server, scenario.path, SPREAD).await;
            }
            servers.push(server);
        }
        let mut runs: Vec<Vec<Run>> = sides.iter().map(|_| Vec::new()).collect();
        let mut calls: Vec<Vec<f64>> = sides.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            // Rotate who goes first: no side always gets the warmest or coldest slot.
            for k in 0..servers.len() {
                let i = (k + round) % servers.len();
                let server = &servers[i];
                let before = server.origin_calls.load(Ordering::Relaxed);
                let run = load(
                    server.addr,
                    scenario.path,
                    scenario.urls,
                    seconds,
                    connections,
                    server.urls.clone(),
                )
                .await;
                let made = server.origin_calls.load(Ordering::Relaxed) - before;
                calls[i].push(made as f64 / run.requests.max(1) as f64);
                runs[i].push(run);
            }
        }
        print_table(scenario, &sides, &runs, &mut calls);
    }
}

/// Asks each of the first `n` URLs once and waits until asking them again calls no
/// handler: every one is then stored where the side keeps entries.
async fn warm(server: &Server, path: &'static str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = server.origin_calls.load(Ordering::Relaxed);
        let counter = Arc::new(AtomicU64::new(0));
        while counter.load(Ordering::Relaxed) < n {
            load(server.addr, path, Urls::Spread(n), 0.05, 1, counter.clone()).await;
        }
        if server.origin_calls.load(Ordering::Relaxed) == before {
            return;
        }
        assert!(Instant::now() < deadline, "the spread URLs were not stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_table(scenario: &Scenario, sides: &[Side], runs: &[Vec<Run>], calls: &mut [Vec<f64>]) {
    println!("\n### {} (`{}`)\n", scenario.what, scenario.label);
    println!(
        "| side | req/s | CPU µs/req | p50 µs | p99 µs | ratio by req/s | ratio by CPU | origin calls/req |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let rounds = runs[0].len();
    // Ratios against no cache, round by round, then the median of them.
    let ratio = |i: usize, f: &dyn Fn(&Run) -> f64| {
        let mut r: Vec<f64> = (0..rounds)
            .map(|k| f(&runs[i][k]) / f(&runs[0][k]))
            .collect();
        median(&mut r)
    };
    for (i, side) in sides.iter().enumerate() {
        let name = SIDES.iter().find(|s| s.0 == *side).map_or("?", |s| s.1);
        let med = |f: &dyn Fn(&Run) -> f64| {
            let mut v: Vec<f64> = runs[i].iter().map(f).collect();
            median(&mut v)
        };
        let rps_ratio = ratio(i, &|r| r.rps);
        // CPU: less is better, so the ratio is baseline over side.
        let cpu_ratio = 1.0 / ratio(i, &|r| r.cpu_us);
        println!(
            "| {name} | {:.0} | {:.1} | {:.0} | {:.0} | {} | {} | {:.3} |",
            med(&|r| r.rps),
            med(&|r| r.cpu_us),
            med(&|r| f64::from(r.p50_us)),
            med(&|r| f64::from(r.p99_us)),
            if i == 0 {
                "baseline".to_owned()
            } else {
                format!("**{rps_ratio:.3}**")
            },
            if i == 0 {
                "baseline".to_owned()
            } else {
                format!("**{cpu_ratio:.3}**")
            },
            median(&mut calls[i]),
        );
    }
    println!("\nThe ratios by req/s of each round, sorted:\n");
    for (i, side) in sides.iter().enumerate().skip(1) {
        let name = SIDES.iter().find(|s| s.0 == *side).map_or("?", |s| s.1);
        let mut r: Vec<f64> = (0..rounds)
            .map(|k| runs[i][k].rps / runs[0][k].rps)
            .collect();
        r.sort_by(f64::total_cmp);
        let r: Vec<String> = r.iter().map(|x| format!("{x:.3}")).collect();
        println!("- {name}: {}", r.join(" "));
    }
}

/// The routes every side serves: `/pre` (pre-rendered), `/slow` (2 ms, then rendered),
/// `/cheap` (rendered), all with `Cache-Control: public, max-age=3600` so that a cache
/// that follows RFC 9111 stores them as the others do.
fn routes(calls: &Arc<AtomicU64>) -> Router {
    let pre_rendered = Bytes::from(render(0));
    let headers = || {
        [
            (CONTENT_TYPE, "application/json"),
            (CACHE_CONTROL, "public, max-age=3600"),
        ]
    };
    let pre = {
        let calls = calls.clone();
        move || {
            calls.fetch_add(1, Ordering::Relaxed);
            let body = pre_rendered.clone();
            async move { (headers(), body) }
        }
    };
    let slow = {
        let calls = calls.clone();
        move |Query(seed): Query<Seed>| {
            calls.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                (headers(), render(seed.i.unwrap_or(0)))
            }
        }
    };
    let cheap = {
        let calls = calls.clone();
        move |Query(seed): Query<Seed>| {
            calls.fetch_add(1, Ordering::Relaxed);
            async move { (headers(), render(seed.i.unwrap_or(0))) }
        }
    };
    Router::new()
        .route("/pre", get(pre))
        .route("/slow", get(slow))
        .route("/cheap", get(cheap))
}

/// Answers a peer's error (none is expected: the load generator fails on a non-2xx).
async fn internal_error<E: std::fmt::Display>(error: E) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
}

/// `router` behind tower-http-cache's `layer`, with what it needs around it: its
/// errors answered (axum's routes take none) and the inner body made `Sync`.
fn behind_tower_http_cache<B>(router: Router, layer: tower_http_cache::CacheLayer<B>) -> Router
where
    B: tower_http_cache::backend::CacheBackend,
{
    router.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(internal_error::<BoxError>))
            .layer(layer)
            .map_response(sync_body),
    )
}

/// Wraps a response body so that it is `Sync`, as tower-http-cache requires of the
/// service it wraps (axum's `Body` is `Send` only).
fn sync_body(response: Response) -> http::Response<SyncBody> {
    response.map(|body| SyncBody {
        hint: http_body::Body::size_hint(&body),
        body: sync_wrapper::SyncWrapper::new(body),
    })
}

/// axum's `Body`, `Sync` (`SyncWrapper` hands it out through `&mut` only), with its
/// size hint kept beside it, since it cannot be asked through `&`: tower-http-cache
/// stores only bodies whose size is bounded.
struct SyncBody {
    body: sync_wrapper::SyncWrapper<axum::body::Body>,
    hint: http_body::SizeHint,
}

impl http_body::Body for SyncBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(this.body.get_mut()).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let len = data.len() as u64;
                let lower = this.hint.lower().saturating_sub(len);
                let upper = this.hint.upper().map(|u| u.saturating_sub(len));
                this.hint = http_body::SizeHint::new();
                this.hint.set_lower(lower);
                if let Some(upper) = upper {
                    this.hint.set_upper(upper);
                }
            }
        }
        polled
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.hint
    }
}

/// Makes the request's URI absolute, as http-cache parses it into a URL.
fn absolute(mut request: http::Request<axum::body::Body>) -> http::Request<axum::body::Body> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    if let Ok(uri) = format!("http://bench{path}").parse::<Uri>() {
        *request.uri_mut() = uri;
    }
    request
}

/// Hitbox's layer over `backend`, configured as its README shows with a key of the
/// method, the path and the query's `i` (a macro: the layer's type names its whole
/// configuration).
macro_rules! hitbox_layer {
    ($backend:expr) => {{
        use hitbox::policy::PolicyConfig;
        use hitbox::Config;
        use hitbox_http::extractors::path::PathExtractor;
        use hitbox_http::extractors::query::QueryExtractor;
        use hitbox_http::extractors::Method;
        use hitbox_http::predicates::{NeutralRequestPredicate, NeutralResponsePredicate};
        let config = Config::builder()
            .request_predicate(NeutralRequestPredicate::<axum::body::Body>::new())
            .response_predicate(NeutralResponsePredicate::<axum::body::Body>::new())
            .extractor(
                Method::<hitbox_http::extractors::NeutralExtractor<axum::body::Body>>::new()
                    .path("/{route}")
                    .query("i".to_owned()),
            )
            .policy(PolicyConfig::builder().ttl(TTL).build())
            .build();
        hitbox_tower::Cache::builder()
            .backend($backend)
            .config(config)
            .build()
    }};
}

async fn serve(side: Side, redis_url: Option<&str>) -> Server {
    let origin_calls = Arc::new(AtomicU64::new(0));
    let router = cached_routes(side, redis_url, &origin_calls).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server {
        addr,
        origin_calls,
        urls: Arc::new(AtomicU64::new(unique() * 1_000_000_000)),
    }
}

/// The routes behind `side`'s cache, counting their calls in `origin_calls`.
async fn cached_routes(
    side: Side,
    redis_url: Option<&str>,
    origin_calls: &Arc<AtomicU64>,
) -> Router {
    let router = routes(origin_calls);
    match side {
        Side::NoCache => router,
        Side::Ours => {
            let cache = tower_hybrid_cache::HybridCache::builder()
                .memory_capacity_bytes(CAPACITY_BYTES)
                .build()
                .await
                .unwrap();
            router.layer(cache.layer().ttl(TTL))
        }
        Side::OursRedis => {
            let cache = tower_hybrid_cache::HybridCache::builder()
                .redis_url(redis_url.expect("Redis"))
                .namespace(format!("ours{}", unique()))
                .build()
                .await
                .unwrap();
            router.layer(cache.layer().ttl(TTL))
        }
        Side::TowerHttpCache => {
            use tower_http_cache::prelude::*;
            let layer = CacheLayer::builder(InMemoryBackend::new(ENTRIES))
                .ttl(TTL)
                .build();
            behind_tower_http_cache(router, layer)
        }
        Side::TowerHttpCacheRedis => {
            use tower_http_cache::prelude::*;
            let client = redis::Client::open(redis_url.expect("Redis")).unwrap();
            let manager = client.get_connection_manager().await.unwrap();
            let prefix = format!("thc{}:", unique());
            let layer = CacheLayer::builder(RedisBackend::new(manager))
                .ttl(TTL)
                .key_extractor(KeyExtractor::custom(move |method, uri| {
                    (method == http::Method::GET).then(|| format!("{prefix}{uri}"))
                }))
                .build();
            behind_tower_http_cache(router, layer)
        }
        Side::AxumResponseCache => {
            let store = cached::stores::LruTtlCache::with_size_and_ttl(ENTRIES as usize, TTL);
            router.layer(axum_response_cache::CacheLayer::with(store).add_response_headers())
        }
        Side::HttpCacheTower => {
            let manager = http_cache::MokaManager::new(http_cache::MokaCache::new(ENTRIES));
            router.layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(
                        internal_error::<http_cache_tower::HttpCacheError>,
                    ))
                    .map_request(absolute)
                    .layer(http_cache_tower::HttpCacheLayer::new(manager)),
            )
        }
        Side::Hitbox => {
            // Bincode, as hitbox's Redis backend has by default: the moka backend's
            // default, JSON, writes a body as an array of numbers (a smoke run: ~500 µs
            // of CPU a hit, against ~60 for the others).
            let backend = hitbox_moka::MokaBackend::builder()
                .max_entries(ENTRIES)
                .value_format(hitbox_backend::format::BincodeFormat)
                .build();
            router.layer(hitbox_layer!(backend))
        }
        Side::HitboxRedis => {
            use hitbox_redis::{ConnectionMode, RedisBackend};
            let backend = RedisBackend::builder()
                .connection(ConnectionMode::single(redis_url.expect("Redis")))
                .build()
                .unwrap();
            router.layer(hitbox_layer!(backend))
        }
    }
}

/// A number no other side of this process was given: the Redis sides' key prefixes and
/// each side's first URL, so that no side finds another's entries.
fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
