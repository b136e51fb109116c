//! A caching reverse proxy: every request is forwarded to one upstream, and the
//! layer caches what the upstream's own headers allow (no route TTL).
//!
//! Not forwarded: 1xx interim responses (`103 Early Hints`): hyper 1 gives a service
//! no way to send one, and its client does not pass them on. None is ever stored.
//!
//! ```text
//! cargo run --release --example caching_proxy -- --listen 127.0.0.1:8080 --upstream http://127.0.0.1:3000
//! curl -i http://127.0.0.1:8080/jobs/42
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST, VIA};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tower_hybrid_cache::layer::RequestBody;
use tower_hybrid_cache::{HybridCache, HybridCacheLayer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body the forwarder answers with: the upstream's, or a short error text.
pub type ProxyBody = BoxBody<Bytes, BoxError>;
/// The body the forwarder sends upstream: the client's, as the cache layer hands it
/// on (with a `QUERY`'s content it read to key it).
pub type UpstreamBody = RequestBody<Incoming>;

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

/// The targeted cache-control fields a gateway cache obeys by default (RFC 9213
/// §2.1): `CDN-Cache-Control`, then the library's own.
pub const DEFAULT_TARGETED_FIELDS: [&str; 2] = ["cdn-cache-control", "tower-hybrid-cache-control"];

/// How long past its freshness the proxy serves a stored response when the upstream
/// fails or cannot be reached, unless the response says otherwise (`must-revalidate`,
/// its own `stale-if-error`, …): a gateway keeps answering through an origin outage.
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(60);

/// The proxy's layer: what the upstream's headers allow (no route TTL), obeying the
/// `targeted` cache-control fields in order, serving stale for `stale_if_error` when
/// the upstream fails (none when zero).
pub fn proxy_layer(
    cache: &HybridCache,
    targeted: &[HeaderName],
    stale_if_error: Duration,
) -> HybridCacheLayer {
    let layer = cache
        .layer()
        .targeted_cache_control(targeted.iter().cloned());
    if stale_if_error.is_zero() {
        layer
    } else {
        layer.stale_if_error(stale_if_error)
    }
}

/// The default targeted fields, as header names.
pub fn default_targeted_fields() -> Vec<HeaderName> {
    DEFAULT_TARGETED_FIELDS
        .iter()
        .map(|name| HeaderName::from_static(name))
        .collect()
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
        let cached = cached.clone();
        async move {
            if request.uri().path() == HEALTH_PATH {
                return Ok::<_, Infallible>(health_response());
            }
            let response = cached.oneshot(request).await?;
            Ok(response.map(BodyExt::boxed))
        }
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

struct Args {
    listen: SocketAddr,
    upstream: Uri,
    redis_url: Option<String>,
    targeted: Vec<HeaderName>,
    stale_if_error: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut upstream = None;
    let mut redis_url = None;
    let mut targeted = default_targeted_fields();
    let mut stale_if_error = DEFAULT_STALE_IF_ERROR;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => {
                listen = Some(
                    value()?
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("--listen: {e}"))?,
                )
            }
            "--upstream" => {
                upstream = Some(
                    value()?
                        .parse::<Uri>()
                        .map_err(|e| format!("--upstream: {e}"))?,
                )
            }
            "--redis-url" => redis_url = Some(value()?),
            "--stale-if-error" => {
                let secs = value()?
                    .parse::<u64>()
                    .map_err(|e| format!("--stale-if-error: {e}"))?;
                stale_if_error = Duration::from_secs(secs);
            }
            "--targeted-cache-control" => {
                // Comma-separated names; empty turns targeted fields off.
                let names = value()?;
                targeted = names
                    .split(',')
                    .map(str::trim)
                    .filter(|name| !name.is_empty())
                    .map(|name| {
                        HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                            .map_err(|e| format!("--targeted-cache-control {name}: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let upstream = upstream.ok_or("--upstream is required")?;
    if upstream.authority().is_none() {
        return Err("--upstream must be an absolute http:// URL".to_owned());
    }
    Ok(Args {
        listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
        upstream,
        redis_url,
        targeted,
        stale_if_error,
    })
}

#[allow(dead_code)] // Tests include this file as a module and do not call `main`.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("{message}");
            }
            eprintln!("usage: caching_proxy --listen ADDR --upstream URL [--redis-url URL] [--targeted-cache-control NAME,NAME (default cdn-cache-control,tower-hybrid-cache-control; empty: none)] [--stale-if-error SECS (default 60; 0: none)]");
            std::process::exit(2);
        }
    };
    let mut builder = HybridCache::builder().namespace("caching_proxy");
    // Several proxies given one --redis-url share their entries.
    if let Some(url) = args.redis_url {
        builder = builder.redis_url(url);
    }
    let cache = builder.build().await?;
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!(
        "caching {} on http://{}",
        args.upstream,
        listener.local_addr()?
    );
    let layer = proxy_layer(&cache, &args.targeted, args.stale_if_error);
    serve(listener, args.upstream, layer).await?;
    Ok(())
}
