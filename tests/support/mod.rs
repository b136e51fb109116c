//! Shared test support: a scriptable origin on a real socket, an HTTP client, and
//! polling with a deadline (never sleep-and-hope).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

/// Polls `check` until it is true or `within` has passed; panics with `what` then.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the origin saw.
#[derive(Default)]
pub struct OriginLog {
    calls: AtomicUsize,
    by_target: Mutex<HashMap<String, usize>>,
    last_headers: Mutex<Option<HeaderMap>>,
}

impl OriginLog {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn calls_to(&self, path_and_query: &str) -> usize {
        self.by_target
            .lock()
            .unwrap()
            .get(path_and_query)
            .copied()
            .unwrap_or(0)
    }

    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.last_headers.lock().unwrap().clone()
    }
}

/// Waits (up to `wait`) until every pooled Redis connection of `cache` is up: four,
/// the pool's default.
pub async fn connected(cache: &tower_hybrid_cache::HybridCache, wait: Duration) {
    eventually("every Redis connection up", wait, || async {
        cache.redis_health().is_some_and(|h| h.connected == 4)
    })
    .await;
}

/// Tasks alive on the current tokio runtime (to see that nothing outlives a cache).
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits (up to `wait`) for `cache`'s capability check on connecting, which sends
/// commands of its own (a GET among its probes): done once the server's version is
/// known (read after the probes). Seen: 11 GETs for 10 lookups when the check ran
/// late, under load.
pub async fn capabilities_checked(cache: &tower_hybrid_cache::HybridCache, wait: Duration) {
    eventually("the capability check", wait, || async {
        cache
            .redis_health()
            .is_some_and(|h| h.server_version.is_some())
    })
    .await;
}

/// A scriptable origin. The query says what to answer:
/// - `status=N` (default 200)
/// - `h=name:value` (repeatable) adds a response header
/// - `size=N` a body of N bytes (default: "body of <path?query> #<call>")
/// - `chunked=1` streams the body in 64 KiB chunks without a length
/// - `echo=name` puts the request's value of a header into the body
/// - `gate=1` waits on the gate semaphore before answering
#[derive(Clone)]
pub struct Origin {
    pub log: Arc<OriginLog>,
    pub gate: Arc<Semaphore>,
}

impl Origin {
    pub fn new() -> Self {
        Origin {
            log: Arc::new(OriginLog::default()),
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    pub fn router(&self) -> Router {
        Router::new().fallback(answer).with_state(self.clone())
    }

    /// The origin behind a layer of `cache` with a 300 s route TTL.
    pub fn behind(&self, cache: &tower_hybrid_cache::HybridCache) -> Router {
        self.router()
            .layer(cache.layer().ttl(Duration::from_secs(300)))
    }

    /// Serves the origin on a free loopback port.
    pub async fn spawn(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = self.router();
        tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        addr
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn answer(State(origin): State<Origin>, request: Request) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let call = origin.log.calls.fetch_add(1, Ordering::SeqCst) + 1;
    *origin
        .log
        .by_target
        .lock()
        .unwrap()
        .entry(target.clone())
        .or_default() += 1;
    *origin.log.last_headers.lock().unwrap() = Some(request.headers().clone());
    let mut status = StatusCode::OK;
    let mut headers = HeaderMap::new();
    let mut size = None;
    let mut chunked = false;
    let mut body_text = format!("body of {target} #{call}");
    for pair in request.uri().query().unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(value);
        match name {
            "status" => status = StatusCode::from_u16(value.parse().unwrap()).unwrap(),
            "h" => {
                let (n, v) = value.split_once(':').unwrap();
                headers.append(
                    HeaderName::from_bytes(n.trim().as_bytes()).unwrap(),
                    HeaderValue::from_str(v.trim()).unwrap(),
                );
            }
            "size" => size = Some(value.parse::<usize>().unwrap()),
            "chunked" => chunked = true,
            "echo" => {
                let got = request
                    .headers()
                    .get(value.as_str())
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                body_text = format!("{value}={got:?} #{call}");
            }
            "gate" => {
                origin.gate.acquire().await.unwrap().forget();
            }
            _ => {}
        }
    }
    let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let body = match (size, chunked) {
        _ if bodiless => Body::empty(),
        (Some(n), false) => Body::from(pattern(n)),
        (Some(n), true) => {
            let data = pattern(n);
            let chunks: Vec<Result<Bytes, std::io::Error>> = data
                .chunks(64 * 1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Body::from_stream(futures_util::stream::iter(chunks))
        }
        (None, _) => Body::from(body_text),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().extend(headers);
    response
}

/// Deterministic body bytes of length `n`.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// A response as a test reads it.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn cache_status(&self) -> String {
        self.headers
            .get_all("cache-status")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn is_hit(&self) -> bool {
        self.cache_status().contains("; hit")
    }

    /// The `ttl` of a hit's `Cache-Status` (negative when served stale).
    pub fn ttl(&self) -> Option<i64> {
        self.cache_status()
            .split("ttl=")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .and_then(|ttl| ttl.trim().parse().ok())
    }

    pub fn age(&self) -> Option<u64> {
        self.headers
            .get("age")
            .map(|v| v.to_str().unwrap().parse().unwrap())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first value of `name`, when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP/1.1 client over real sockets.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn fetch(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut builder = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    send(client, builder.body(Full::new(Bytes::new())).unwrap()).await
}

/// Sends `request` over a real socket and reads the answer whole.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    request: http::Request<Full<Bytes>>,
) -> Got {
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Sends a request through any service (e.g. an axum router) and reads it whole.
pub async fn call<S, B>(service: S, request: http::Request<Body>) -> Got
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    use tower::ServiceExt;
    let response = service.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

pub fn get(uri: &str) -> http::Request<Body> {
    http::Request::get(uri).body(Body::empty()).unwrap()
}

pub fn get_with(uri: &str, headers: &[(&str, &str)]) -> http::Request<Body> {
    let mut builder = http::Request::get(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::empty()).unwrap()
}
pub mod process;
pub mod redis;
