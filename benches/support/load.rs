//! The HTTP benches' load generator: keep-alive connections over HTTP/1.1 or HTTP/2
//! that ask for a URL pattern for a while, and what they measure (requests/s, the
//! process's CPU per request, latency percentiles).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Whether the load generator speaks HTTP/2 with prior knowledge (`--http2`) instead
/// of HTTP/1.1: one stream at a time on each connection, as HTTP/1.1 does, so that the
/// two protocols see the same concurrency.
pub(crate) static HTTP2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The most requests a second the load generator sends, over all its connections
/// (`--rate N`); 0: as fast as the answers come. A paced load measures CPU per request
/// at a rate every side sustains (a side whose Redis falls behind drops writes, and
/// looks cheaper for it).
pub(crate) static RATE: AtomicU64 = AtomicU64::new(0);

pub(crate) struct Run {
    /// Responses received.
    pub(crate) requests: u64,
    pub(crate) rps: f64,
    /// CPU µs the whole process (server and load generator) spent per request.
    pub(crate) cpu_us: f64,
    /// CPU µs the bench's redis-server spent per request, for runs beside one.
    pub(crate) redis_cpu_us: Option<f64>,
    pub(crate) p50_us: u32,
    pub(crate) p99_us: u32,
}

/// One connection of the load generator, HTTP/1.1 or (`--http2`) HTTP/2.
pub(crate) enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    pub(crate) async fn connect(stream: tokio::net::TcpStream) -> Self {
        let io = TokioIo::new(stream);
        if HTTP2.load(Ordering::Relaxed) {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Sender::Http2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Sender::Http1(sender)
        }
    }

    pub(crate) async fn send(
        &mut self,
        request: Request<Empty<Bytes>>,
    ) -> http::Response<hyper::body::Incoming> {
        match self {
            Sender::Http1(sender) => {
                sender.ready().await.unwrap();
                sender.send_request(request).await.unwrap()
            }
            Sender::Http2(sender) => {
                sender.ready().await.unwrap();
                sender.send_request(request).await.unwrap()
            }
        }
    }
}

/// Drives `connections` keep-alive HTTP/1.1 (or HTTP/2) connections for `seconds`. With
/// `urls` saying which URL each request asks for.
pub(crate) async fn load(
    addr: SocketAddr,
    path: &'static str,
    urls: Urls,
    seconds: f64,
    connections: usize,
    counter: Arc<AtomicU64>,
) -> Run {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let cpu_started = cpu_seconds();
    // Each connection's share of the rate, as the time between its sends.
    let every = match RATE.load(Ordering::Relaxed) {
        0 => None,
        rate => Some(Duration::from_secs_f64(connections as f64 / rate as f64)),
    };
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let counter = counter.clone();
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let mut sender = Sender::connect(stream).await;
                let mut latencies = Vec::with_capacity(100_000);
                let mut ticks = every.map(|every| {
                    let mut ticks = tokio::time::interval(every);
                    // Behind schedule, send at once and keep the pace from there
                    // (no burst to catch up).
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    ticks
                });
                while Instant::now() < deadline {
                    if let Some(ticks) = ticks.as_mut() {
                        ticks.tick().await;
                    }
                    let sep = if path.contains('?') { '&' } else { '?' };
                    let uri = match urls {
                        Urls::Same => path.to_owned(),
                        Urls::Unique => {
                            format!("{path}{sep}i={}", counter.fetch_add(1, Ordering::Relaxed))
                        }
                        Urls::Spread(n) => format!(
                            "{path}{sep}i={}",
                            counter.fetch_add(1, Ordering::Relaxed) % n
                        ),
                    };
                    let request = Request::get(uri)
                        .header("host", "bench")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let sent = Instant::now();
                    let response = sender.send(request).await;
                    assert!(response.status().is_success());
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    assert!(!body.is_empty());
                    latencies.push(sent.elapsed().as_micros() as u32);
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_started;
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Run {
        requests: all.len() as u64,
        rps: all.len() as f64 / elapsed,
        cpu_us: cpu * 1e6 / all.len().max(1) as f64,
        redis_cpu_us: None,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// CPU time (user + system) this process has used: steadier than wall time on a
/// shared machine, since time stolen by other processes does not count.
pub(crate) fn cpu_seconds() -> f64 {
    process_cpu_seconds("self")
}

/// CPU time (user + system) process `pid` (or `"self"`) has used, 0 if unreadable:
/// the Redis pairs read their redis-server's beside their own.
pub(crate) fn process_cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Which URLs a load asks for.
#[derive(Clone, Copy)]
pub(crate) enum Urls {
    /// `path` every time.
    Same,
    /// A URL never asked before every time (`?i=` a counter).
    Unique,
    /// `?i=` the counter modulo this many: a spread of keys, each asked again.
    Spread(u64),
}
