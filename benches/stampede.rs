//! Cross-replica stampede: how many origin calls three replicas sharing one Redis make
//! for a URL asked of each, with the fill lease off (the default) and on.
//!
//! `cargo bench --bench stampede` (options after `--`: `--urls 300`, `--origin-ms 2`).
//! For each URL the three replicas are asked at once, then (for other URLs) 1 ms apart
//! and 5 ms apart. Prints origin calls per URL, the share of URLs fetched more than
//! once, and the slowest of the three answers (median over URLs), per setting.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use http::Request;
use tower::ServiceExt;
use tower_hybrid_cache::HybridCache;

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/redis.rs"]
mod redis_support;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Three replicas, each an app behind its own cache, over one origin that counts.
async fn replicas(
    url: &str,
    lease: bool,
    namespace: &str,
    origin_ms: u64,
) -> (Vec<Router>, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let mut apps = Vec::new();
    for _ in 0..3 {
        let mut builder = HybridCache::builder().namespace(namespace).redis_url(url);
        if lease {
            builder = builder.redis_fill_lease(Duration::from_secs(2));
        }
        let cache = builder.build().await.unwrap();
        let counted = Arc::clone(&calls);
        let handler = move || {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(origin_ms)).await;
                "a job list, rendered"
            }
        };
        apps.push(
            Router::new()
                .route("/jobs/{id}", get(handler))
                .layer(cache.layer().ttl(Duration::from_secs(300))),
        );
    }
    (apps, calls)
}

/// Asks each replica for `path`, `apart` after the one before; returns the slowest
/// answer's time.
async fn ask_all(apps: &[Router], path: &str, apart: Duration) -> Duration {
    let started = Instant::now();
    let mut asks = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let app = app.clone();
        let request = Request::get(format!("http://api.test{path}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let delay = apart * i as u32;
        asks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let asked = Instant::now();
            let response = app.oneshot(request).await.unwrap();
            let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
            asked.elapsed()
        }));
    }
    let mut slowest = Duration::ZERO;
    for ask in asks {
        slowest = slowest.max(ask.await.unwrap());
    }
    let _ = started;
    slowest
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let urls = arg("--urls", 300);
    let origin_ms = arg("--origin-ms", 2);
    let redis = redis_support::RedisServer::start();
    println!("| setting | asked | origin calls per URL | URLs fetched more than once | slowest answer, median |");
    println!("|---|---|---|---|---|");
    for lease in [false, true] {
        for apart_ms in [0_u64, 1, 5] {
            let namespace = format!("stampede-{lease}-{apart_ms}");
            let (apps, calls) = replicas(&redis.url(), lease, &namespace, origin_ms).await;
            let mut more_than_once = 0;
            let mut slowest = Vec::new();
            for i in 0..urls {
                let before = calls.load(Ordering::Relaxed);
                slowest.push(
                    ask_all(
                        &apps,
                        &format!("/jobs/{i}"),
                        Duration::from_millis(apart_ms),
                    )
                    .await,
                );
                if calls.load(Ordering::Relaxed) - before > 1 {
                    more_than_once += 1;
                }
            }
            slowest.sort();
            let median = slowest[slowest.len() / 2];
            println!(
                "| lease {} | {} | {:.2} | {:.0} % | {:.1} ms |",
                if lease { "on" } else { "off" },
                if apart_ms == 0 {
                    "at once".to_owned()
                } else {
                    format!("{apart_ms} ms apart")
                },
                calls.load(Ordering::Relaxed) as f64 / urls as f64,
                100.0 * more_than_once as f64 / urls as f64,
                median.as_secs_f64() * 1000.0,
            );
        }
    }
}
