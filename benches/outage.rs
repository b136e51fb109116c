//! Outage benchmark: per-request latency through a Redis kill and a restart, with the
//! circuit breaker's state, under a steady load of cache hits over real HTTP.
//!
//! `cargo bench --bench outage` (options after `--`: `--phase 2` seconds per phase,
//! `--connections 16`, `--out docs/outage.svg`). Three phases: Redis up, Redis killed,
//! Redis restarted (empty). Prints a table per phase and draws the chart to `--out`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use plotters::prelude::*;
use tower_hybrid_cache::breaker::BreakerState;
use tower_hybrid_cache::HybridCache;

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/redis.rs"]
mod redis_support;
mod support;

const URLS: usize = 200;
/// The cache's default deadline for a Redis operation.
const DEADLINE_MS: f64 = 50.0;
/// Width of a time bucket on the chart.
const BUCKET: Duration = Duration::from_millis(20);

struct Args {
    phase: f64,
    connections: usize,
    out: String,
}

fn args() -> Args {
    let value = support::option;
    Args {
        phase: value("--phase").map_or(2.0, |v| v.parse().expect("--phase SECONDS")),
        connections: value("--connections").map_or(16, |v| v.parse().expect("--connections N")),
        out: value("--out").unwrap_or_else(|| "docs/outage.svg".to_owned()),
    }
}

/// One request: when it was sent (since the start), how long it took, who answered.
#[derive(Clone, Copy)]
struct Sample {
    at: Duration,
    micros: u32,
    tier: Tier,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tier {
    Redis,
    Memory,
    Origin,
}

fn main() {
    support::run_on_two_workers(run(args()));
}

async fn run(args: Args) {
    let mut redis = redis_support::RedisServer::start();
    let cache = HybridCache::builder()
        .redis_url(redis.url())
        .build()
        .await
        .unwrap();
    let body = Bytes::from(vec![b'x'; 3 * 1024]);
    let handler = move || {
        let body = body.clone();
        async move { body }
    };
    let router = Router::new().route(
        "/jobs/{id}",
        get(handler).layer(cache.layer().ttl(Duration::from_secs(3600))),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    // Warm: every URL stored, and in Redis.
    let warm_until = Instant::now() + Duration::from_secs(1);
    load(addr, 4, warm_until, Instant::now()).await;
    let dropped = support::redis_written(&cache, URLS as u64).await;
    assert_eq!(dropped, 0, "every URL in Redis before the outage");

    let phase = Duration::from_secs_f64(args.phase);
    let start = Instant::now();
    let end = start + phase * 3;
    let states = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (breaker, states) = (cache.redis_breaker().unwrap(), Arc::clone(&states));
        tokio::spawn(async move {
            while Instant::now() < end {
                states
                    .lock()
                    .unwrap()
                    .push((start.elapsed(), breaker.state()));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let requests = tokio::spawn(load(addr, args.connections, end, start));
    tokio::time::sleep_until((start + phase).into()).await;
    redis.kill();
    let killed = start.elapsed();
    tokio::time::sleep_until((start + phase * 2).into()).await;
    let redis = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    })
    .await
    .unwrap();
    let restarted = start.elapsed();
    let samples = requests.await.unwrap();
    sampler.await.unwrap();
    let states = states.lock().unwrap().clone();
    drop(redis);

    report(&samples, killed, restarted, phase * 3);
    println!("cache: {:?}", cache.stats());
    draw(&args.out, &samples, &states, killed, restarted, phase * 3);
    println!("chart: {}", args.out);
}

/// Closed-loop load of `connections` keep-alive connections over the URLs until `end`.
async fn load(addr: SocketAddr, connections: usize, end: Instant, start: Instant) -> Vec<Sample> {
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let mut samples = Vec::new();
                let mut i = c;
                while Instant::now() < end {
                    let request = Request::get(format!("/jobs/{}", i % URLS))
                        .header("host", "bench")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    i += connections;
                    let sent = Instant::now();
                    sender.ready().await.unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    assert!(response.status().is_success(), "no failed request");
                    let status = response.headers()["cache-status"]
                        .to_str()
                        .unwrap()
                        .to_owned();
                    response.into_body().collect().await.unwrap();
                    let tier = if status.ends_with("detail=redis") {
                        Tier::Redis
                    } else if status.ends_with("detail=memory") {
                        Tier::Memory
                    } else {
                        Tier::Origin
                    };
                    samples.push(Sample {
                        at: sent.saturating_duration_since(start),
                        micros: sent.elapsed().as_micros() as u32,
                        tier,
                    });
                }
                samples
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

fn report(samples: &[Sample], killed: Duration, restarted: Duration, total: Duration) {
    println!("| phase | requests | req/s | p50 µs | p99 µs | max µs | from Redis | from memory | from origin |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let phases = [
        ("Redis up", Duration::ZERO, killed),
        ("Redis killed", killed, restarted),
        ("Redis restarted (empty)", restarted, total),
    ];
    for (name, from, to) in phases {
        let in_phase: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .collect();
        let mut micros: Vec<u32> = in_phase.iter().map(|s| s.micros).collect();
        micros.sort_unstable();
        let share = |tier: Tier| {
            let n = in_phase.iter().filter(|s| s.tier == tier).count();
            format!("{:.1} %", 100.0 * n as f64 / in_phase.len().max(1) as f64)
        };
        println!(
            "| {name} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            in_phase.len(),
            in_phase.len() as f64 / (to - from).as_secs_f64(),
            percentile(&micros, 0.5),
            percentile(&micros, 0.99),
            micros.last().copied().unwrap_or(0),
            share(Tier::Redis),
            share(Tier::Memory),
            share(Tier::Origin),
        );
    }
}

/// A time bucket: start (s), p50, p99 and max latency (ms).
type Bucket = (f64, f64, f64, f64);

fn buckets(samples: &[Sample], total: Duration) -> Vec<Bucket> {
    let n = (total.as_nanos() / BUCKET.as_nanos()) as usize + 1;
    let mut by_bucket: Vec<Vec<u32>> = vec![Vec::new(); n];
    for sample in samples {
        let i = (sample.at.as_nanos() / BUCKET.as_nanos()) as usize;
        if let Some(bucket) = by_bucket.get_mut(i) {
            bucket.push(sample.micros);
        }
    }
    by_bucket
        .into_iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .map(|(i, mut b)| {
            b.sort_unstable();
            let ms = |us: u32| f64::from(us.max(1)) / 1000.0;
            (
                (BUCKET * i as u32).as_secs_f64(),
                ms(percentile(&b, 0.5)),
                ms(percentile(&b, 0.99)),
                ms(*b.last().unwrap()),
            )
        })
        .collect()
}

fn draw(
    out: &str,
    samples: &[Sample],
    states: &[(Duration, BreakerState)],
    killed: Duration,
    restarted: Duration,
    total: Duration,
) {
    if let Some(dir) = std::path::Path::new(out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let root = SVGBackend::new(out, (960, 480)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let seconds = total.as_secs_f64();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency of cache hits through a Redis kill and restart",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..seconds, (0.01..1000.0).log_scale())
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("latency per request (ms, log)")
        .draw()
        .unwrap();

    // Breaker state as background bands: open red, half-open amber.
    let mut bands = Vec::new();
    for window in states.windows(2) {
        let (at, state) = window[0];
        let colour = match state {
            BreakerState::Open => RGBColor(244, 67, 54).mix(0.18),
            BreakerState::HalfOpen => RGBColor(255, 193, 7).mix(0.35),
            _ => continue,
        };
        bands.push(Rectangle::new(
            [
                (at.as_secs_f64(), 0.01),
                (window[1].0.as_secs_f64(), 1000.0),
            ],
            colour.filled(),
        ));
    }
    chart.draw_series(bands).unwrap();
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(0.0, 0.01), (0.0, 0.01)],
            RGBColor(244, 67, 54).mix(0.18).filled(),
        )))
        .unwrap()
        .label("breaker open")
        .legend(|(x, y)| {
            Rectangle::new(
                [(x, y - 5), (x + 16, y + 5)],
                RGBColor(244, 67, 54).mix(0.3).filled(),
            )
        });

    let series = buckets(samples, total);
    type Line = (&'static str, RGBColor, fn(&Bucket) -> f64);
    let lines: [Line; 3] = [
        ("max per 20 ms", RGBColor(183, 28, 28), |b| b.3),
        ("p99 per 20 ms", RGBColor(25, 118, 210), |b| b.2),
        ("p50 per 20 ms", RGBColor(46, 125, 50), |b| b.1),
    ];
    for (label, colour, pick) in lines {
        chart
            .draw_series(LineSeries::new(
                series.iter().map(|b| (b.0, pick(b))),
                colour.stroke_width(2),
            ))
            .unwrap()
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(
            [(0.0, DEADLINE_MS), (seconds, DEADLINE_MS)],
            BLACK.mix(0.6).stroke_width(1),
        ))
        .unwrap()
        .label("Redis deadline (50 ms)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.6)));
    for (at, text) in [(killed, "Redis killed"), (restarted, "Redis restarted")] {
        let x = at.as_secs_f64();
        chart
            .draw_series(LineSeries::new(
                [(x, 0.01), (x, 1000.0)],
                BLACK.stroke_width(1),
            ))
            .unwrap();
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (x + seconds * 0.005, 400.0),
                ("sans-serif", 14),
            )))
            .unwrap();
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .unwrap();
    root.present().unwrap();
}
