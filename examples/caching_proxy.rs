//! A caching reverse proxy: every request is forwarded to one upstream, and the
//! layer caches what the upstream's own headers allow (no route TTL).
//!
//! Not forwarded: 1xx interim responses (`103 Early Hints`): hyper 1 gives a service
//! no way to send one, and its client does not pass them on. None is ever stored.
//!
//! ```text
//! cargo run --release --example caching_proxy -- --listen 127.0.0.1:8080 --upstream http://127.0.0.1:3000
//! cargo run --release --example caching_proxy -- --help     # every cache and Redis knob
//! curl -i http://127.0.0.1:8080/jobs/42
//! curl -s http://127.0.0.1:8080/metrics
//! ```
//!
//! The proxy answers `/healthz` and `/metrics` (Prometheus text) itself, never
//! through the cache. On SIGTERM or Ctrl-C it stops accepting, lets requests in
//! flight finish (`--shutdown-grace`), then closes the cache's Redis connections.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderName, HeaderValue, HOST, VIA};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tower_hybrid_cache::layer::RequestBody;
use tower_hybrid_cache::HybridCacheLayer;

// Their `pub` items are this example's API for the tests that include it.
#[allow(unreachable_pub)]
#[path = "shared/cache_flags.rs"]
mod cache_flags;
#[allow(unreachable_pub, dead_code)]
#[path = "shared/metrics_endpoint.rs"]
mod metrics_endpoint;
#[allow(unreachable_pub)]
#[path = "shared/shutdown.rs"]
mod shutdown;

pub use cache_flags::{CacheFlags, RouteFlags};
pub use metrics_endpoint::METRICS_PATH;
pub use shutdown::ShutdownFlags;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body the forwarder answers with: the upstream's, or a short error text.
pub type ProxyBody = BoxBody<Bytes, BoxError>;
/// The body the forwarder sends upstream: the client's, as the cache layer hands it
/// on (with a `QUERY`'s content it read to key it).
pub type UpstreamBody = RequestBody<Incoming>;

/// How long the accept loop waits after `accept` fails before it tries again.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Fields that concern one connection only (RFC 9110 §7.6.1), in either direction.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop fields and those `Connection` names. Returns whether the
/// message had a `Transfer-Encoding` (its body's framing was that, not a length).
fn strip_hop_by_hop(headers: &mut http::HeaderMap) -> bool {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    let chunked = headers.contains_key(http::header::TRANSFER_ENCODING);
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    chunked
}

/// Forwards a request to `upstream` as HTTP/1.1 (whatever the client spoke): same
/// path and query, `Host` set to the upstream, hop-by-hop fields removed both ways,
/// `Via` added. An unreachable upstream is a `502`.
pub async fn forward(
    client: Client<HttpConnector, UpstreamBody>,
    upstream: Uri,
    request: Request<UpstreamBody>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let target = match Uri::builder()
        .scheme(upstream.scheme_str().unwrap_or("http"))
        .authority(upstream.authority().map_or("", |a| a.as_str()))
        .path_and_query(path)
        .build()
    {
        Ok(uri) => uri,
        Err(e) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                format!("bad request target: {e}"),
            ))
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    // The upstream client speaks HTTP/1.1; an h2c client's request goes out as that.
    parts.version = http::Version::HTTP_11;
    if let Some(authority) = upstream.authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(HOST, host);
        }
    }
    parts
        .headers
        .append(VIA, HeaderValue::from_static("1.1 tower-hybrid-cache"));
    parts.uri = target;
    match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            // The upstream's framing is undone (the body is decoded); a length beside
            // a `Transfer-Encoding` means nothing (RFC 9112 §6.3), and passed on it
            // would make the client read the wrong body.
            if strip_hop_by_hop(&mut parts.headers) {
                parts.headers.remove(http::header::CONTENT_LENGTH);
            }
            parts
                .headers
                .append(VIA, HeaderValue::from_static("1.1 tower-hybrid-cache"));
            Ok(Response::from_parts(
                parts,
                body.map_err(BoxError::from).boxed(),
            ))
        }
        Err(e) => Ok(error_response(
            StatusCode::BAD_GATEWAY,
            format!("upstream error: {e}"),
        )),
    }
}

fn error_response(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        HeaderName::from_static("content-type"),
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The path the proxy answers itself, for a balancer's health check: never
/// forwarded, never cached.
pub const HEALTH_PATH: &str = "/healthz";

/// `200 ok`, for the health check: the proxy answers (with Redis down too: it serves
/// from memory and the upstream).
fn health_response() -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(b"ok\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

/// Serves the caching proxy on `listener`, through `layer`, until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    upstream: Uri,
    layer: HybridCacheLayer,
) -> std::io::Result<()> {
    serve_until(
        listener,
        upstream,
        layer,
        None,
        std::future::pending(),
        Duration::ZERO,
    )
    .await
}

/// Serves the caching proxy on `listener`, through `layer`, answering
/// [`METRICS_PATH`] from `metrics` when given, until `stop` completes; then lets the
/// connections finish what they are doing, for `grace` at most.
pub async fn serve_until(
    listener: TcpListener,
    upstream: Uri,
    layer: HybridCacheLayer,
    metrics: Option<PrometheusHandle>,
    stop: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()> {
    // Idle upstream connections are dropped before the 5 s after which Node's (and
    // many other) servers close them: a request sent on a connection the server is
    // closing fails (a 502) and, with a body, is not retried.
    // Without TCP_NODELAY a request's head and body leave in two packets, and the
    // second waits for the upstream's delayed ACK (about 40 ms on Linux).
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, UpstreamBody> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(4))
        .build(connector);
    let forwarder = tower::service_fn(move |request: Request<UpstreamBody>| {
        forward(client.clone(), upstream.clone(), request)
    });
    let cached = layer.layer(forwarder);
    let service = tower::service_fn(move |request: Request<Incoming>| {
        // The proxy's own answers are made here, before anything is cloned for the
        // request: a forwarded request pays two string compares for them.
        let own = match request.uri().path() {
            HEALTH_PATH => Some(health_response()),
            METRICS_PATH => metrics.as_ref().map(metrics_response),
            _ => None,
        };
        let cached = cached.clone();
        async move {
            if let Some(response) = own {
                return Ok::<_, Infallible>(response);
            }
            let response = cached.oneshot(request).await?;
            Ok(response.map(BodyExt::boxed))
        }
    });
    let connections = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors (EMFILE, ENFILE) or a connection gone before
                    // it was taken: the listener is still good. A pause, so that a full
                    // descriptor table is not spun on until connections close.
                    eprintln!("accept failed ({error}); retrying");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(service.clone());
        let connection = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    // Idle connections close at once, busy ones after their response.
    let _ = tokio::time::timeout(grace, connections.shutdown()).await;
    Ok(())
}

/// What `/metrics` answers: the recorder's text.
fn metrics_response(metrics: &PrometheusHandle) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(metrics.render()))
            .map_err(|never| match never {})
            .boxed(),
    );
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(metrics_endpoint::CONTENT_TYPE),
    );
    response
}

/// A caching reverse proxy for one upstream; every flag can also be set by its
/// variable.
#[derive(Debug, Parser)]
#[command(name = "caching_proxy", version)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The upstream every request goes to (an absolute `http://` URL).
    #[arg(long, env = "UPSTREAM", value_parser = upstream)]
    pub upstream: Uri,
    /// How a stop goes.
    #[command(flatten)]
    pub shutdown: ShutdownFlags,
    /// How the cache is built.
    #[command(flatten)]
    pub cache: CacheFlags,
    /// How requests are cached (what the upstream's headers allow, no route TTL).
    #[command(flatten)]
    pub route: RouteFlags,
}

fn upstream(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|e| format!("{e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(uri),
        _ => Err("an absolute http:// URL".to_owned()),
    }
}

#[allow(dead_code)] // Tests include this file as a module and do not call `main`.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // Before the cache is built: what it emits from then on reaches the exporter.
    let metrics = metrics_endpoint::install()?;
    // Several proxies given one --redis-url share their entries.
    let cache = args.cache.build("caching_proxy").await?;
    let layer = args.route.layer(&cache)?;
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!(
        "caching {} on http://{}",
        args.upstream,
        listener.local_addr()?
    );
    serve_until(
        listener,
        args.upstream,
        layer,
        Some(metrics),
        shutdown::signal(),
        args.shutdown.shutdown_grace,
    )
    .await?;
    cache.shutdown().await;
    eprintln!("caching_proxy stopped");
    Ok(())
}
