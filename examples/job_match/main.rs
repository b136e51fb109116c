//! A job-matching API on axum with per-route caching, its data in SQLite shared by
//! every replica on the host, its cache shared through Redis.
//!
//! ```text
//! cargo run --release --example job_match          # listens on 127.0.0.1:3000
//! cargo run --release --example job_match -- --help
//! curl -i 'http://127.0.0.1:3000/jobs/search?q=rust&location=Berlin&page=1'
//! curl -i 'http://127.0.0.1:3000/jobs/42'
//! curl -i 'http://127.0.0.1:3000/candidates/7/matches'
//! curl -i -X POST 'http://127.0.0.1:3000/jobs' -H 'content-type: application/json' \
//!      -d '{"title":"Rust engineer","company":"Acme","location":"Berlin","skills":["rust","tokio"]}'
//! curl -s 'http://127.0.0.1:3000/metrics' | grep tower_hybrid_cache_hits_total
//! ADMIN_TOKEN=s3cret cargo run --release --example job_match
//! curl -i -X POST -H 'authorization: Bearer s3cret' 'http://127.0.0.1:3000/admin/purge?tag=matches'
//! ```
//!
//! The jobs and candidates live in SQLite (`DATABASE_URL`, default `job_match.db` in
//! the working directory, seeded with generated data on first start); replicas on one
//! host given the same file and the same `REDIS_URL` serve one data set, and a job
//! posted through any of them is in the next search through every one.
//!
//! Search results are tagged by location (`search:location:berlin`, or
//! `search:any-location` without a location filter) and match lists `matches`; a new
//! job invalidates the searches it can appear in and every match list, on every replica
//! that shares the Redis, all at once through the layer on `POST /jobs` (one Redis
//! deadline at most, whatever Redis does). `/admin/purge` (a tag, or without one
//! everything) answers only when `ADMIN_TOKEN` is set, to requests that carry it as a
//! bearer token; any other gets 401 and changes nothing. `/metrics` (Prometheus text)
//! and `/healthz` are never cached. SIGTERM or Ctrl-C: requests in flight finish,
//! then the Redis connections close.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use clap::Parser;
use serde::Deserialize;
use tower_hybrid_cache::{CacheOverrides, HybridCache, HybridCacheLayer};

// Their `pub` items are this example's API for the tests and benchmarks that include it.
#[allow(unreachable_pub)]
#[path = "../shared/cache_flags.rs"]
mod cache_flags;
#[allow(unreachable_pub)]
#[path = "data.rs"]
mod data;
#[allow(unreachable_pub, dead_code)]
#[path = "../shared/metrics_endpoint.rs"]
mod metrics_endpoint;
#[allow(unreachable_pub)]
#[path = "../shared/shutdown.rs"]
mod shutdown;

pub use cache_flags::{CacheFlags, RouteFlags};
pub use data::{database_path, Data, DataError, NewJob, Seed, DEFAULT_SEED};
pub use shutdown::ShutdownFlags;

#[derive(Deserialize)]
struct SearchParams {
    q: Option<String>,
    location: Option<String>,
    page: Option<usize>,
}

/// The tag of the searches a job in `location` can appear in.
fn location_tag(location: &str) -> String {
    format!("search:location:{}", location.to_lowercase())
}

/// The tag of the searches with no location filter: every new job can appear in them.
const ANY_LOCATION_TAG: &str = "search:any-location";
/// The tag of every candidate's match list.
const MATCHES_TAG: &str = "matches";

/// A database failure as the client sees it: 503, not cached (a 5xx is not stored
/// without an explicit lifetime; a stored response may be served stale instead).
fn unavailable(e: &DataError) -> axum::response::Response {
    tracing::warn!(error = %e, "database");
    (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
}

async fn search(
    State(data): State<Arc<Data>>,
    Query(params): Query<SearchParams>,
) -> axum::response::Response {
    // Tagged so that a new job invalidates exactly the searches it can appear in.
    let tag = params
        .location
        .as_deref()
        .map_or_else(|| ANY_LOCATION_TAG.to_owned(), location_tag);
    let overrides = CacheOverrides::new().tags([tag]);
    let q = params.q.unwrap_or_default();
    match data
        .search(q, params.location, params.page.unwrap_or(1))
        .await
    {
        Ok(results) => (Extension(overrides), Json(results)).into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn job(State(data): State<Arc<Data>>, Path(id): Path<i64>) -> axum::response::Response {
    match data.job(id).await {
        Ok(Some(job)) => Json(job).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no such job").into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn matches(State(data): State<Arc<Data>>, Path(id): Path<i64>) -> axum::response::Response {
    match data.matches(id, 20).await {
        Ok(Some(found)) => (
            Extension(CacheOverrides::new().tags([MATCHES_TAG])),
            Json(found),
        )
            .into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no such candidate").into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn create_job(
    State(data): State<Arc<Data>>,
    Json(new): Json<NewJob>,
) -> axum::response::Response {
    let location = new.location.clone();
    let id = match data.add_job(new).await {
        Ok(id) => id,
        Err(e) => return unavailable(&e),
    };
    // The searches the new job can appear in, and every match list, are out of date
    // (on every replica sharing the Redis): the layer invalidates them together, with
    // the URIs the POST invalidates anyway, before the response goes back.
    let stale = [
        location_tag(&location),
        ANY_LOCATION_TAG.to_owned(),
        MATCHES_TAG.to_owned(),
    ];
    (
        StatusCode::CREATED,
        [(header::LOCATION, format!("/jobs/{id}"))],
        Extension(CacheOverrides::new().invalidate_tags(stale)),
        Json(serde_json::json!({ "id": id })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct Purge {
    tag: Option<String>,
}

/// The token the admin routes require, from `ADMIN_TOKEN`; without one they are off.
#[derive(Clone)]
pub struct AdminToken(Option<Arc<str>>);

impl AdminToken {
    /// Guards the admin routes with `token`; `None` or empty turns them off.
    pub fn new(token: Option<String>) -> Self {
        AdminToken(token.filter(|t| !t.is_empty()).map(Arc::from))
    }

    /// Whether `headers` carry the token as `Authorization: Bearer …`, compared in time
    /// independent of where they differ.
    fn admits(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(token) = &self.0 else { return false };
        let Some(offered) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        else {
            return false;
        };
        offered.len() == token.len()
            && offered
                .iter()
                .zip(token.as_bytes())
                .fold(0, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// `POST /admin/purge?tag=search:location:berlin` forgets one tag; without `tag`,
/// everything. 404 when no token is configured, 401 without the right one.
async fn purge(
    Extension(cache): Extension<HybridCache>,
    Extension(admin): Extension<AdminToken>,
    headers: axum::http::HeaderMap,
    Query(purge): Query<Purge>,
) -> StatusCode {
    if admin.0.is_none() {
        return StatusCode::NOT_FOUND;
    }
    if !admin.admits(&headers) {
        return StatusCode::UNAUTHORIZED;
    }
    let reached_redis = match purge.tag {
        Some(tag) => cache.invalidate_tag(&tag).await,
        None => cache.purge_all().await,
    };
    // Accepted: Redis was down, the purge is replayed when it is back.
    if reached_redis {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::ACCEPTED
    }
}

/// The application: each read route cached with its own TTL on top of `base` (a
/// layer of `cache`'s), in one shared cache; the admin routes guarded by `admin`.
pub fn app(
    cache: &HybridCache,
    base: &HybridCacheLayer,
    data: Arc<Data>,
    admin: AdminToken,
) -> Router {
    Router::new()
        .route(
            "/jobs/search",
            get(search).layer(
                base.clone()
                    .ttl(Duration::from_secs(30))
                    .ignore_query_params(["utm_*"]),
            ),
        )
        .route("/jobs", post(create_job).layer(base.clone()))
        .route("/admin/purge", post(purge))
        .route(
            "/jobs/{id}",
            get(job).layer(base.clone().ttl(Duration::from_secs(300))),
        )
        .route(
            "/candidates/{id}/matches",
            get(matches).layer(base.clone().ttl(Duration::from_secs(60))),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(Extension(cache.clone()))
        .layer(Extension(admin))
        .with_state(data)
}

/// `/metrics`, rendering what `handle` holds (never cached).
pub fn metrics_route(handle: metrics_exporter_prometheus::PrometheusHandle) -> Router {
    Router::new().route(
        metrics_endpoint::METRICS_PATH,
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, metrics_endpoint::CONTENT_TYPE)],
                    handle.render(),
                )
            }
        }),
    )
}

/// The search route alone, cached or not (for the load benchmark).
pub fn search_router(data: Arc<Data>, cache: Option<&HybridCache>) -> Router {
    let route = match cache {
        Some(cache) => get(search).layer(cache.layer().ttl(Duration::from_secs(30))),
        None => get(search),
    };
    Router::new().route("/jobs/search", route).with_state(data)
}

/// The job-matching API, cached; every flag can also be set by its variable.
#[derive(Debug, Parser)]
#[command(name = "job_match", version)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "ADDR", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// The SQLite database (`sqlite://path` or a path), shared by the replicas on a
    /// host; created and seeded when absent. Default `job_match.db`.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Bearer token of `/admin/purge`; unset or empty: the route answers 404.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How a stop goes.
    #[command(flatten)]
    pub shutdown: ShutdownFlags,
    /// How the cache is built.
    #[command(flatten)]
    pub cache: CacheFlags,
    /// What every route's layer starts from.
    #[command(flatten)]
    pub route: RouteFlags,
}

#[allow(dead_code)] // Tests include this file as a module and do not call `main`.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    // Before the cache is built: what it emits from then on reaches the exporter.
    let metrics = metrics_endpoint::install()?;
    let path: PathBuf = database_path(args.database_url.as_deref())?;
    let data = Data::open(&path, DEFAULT_SEED)?;
    let cache = args.cache.build("job_match").await?;
    let base = args.route.layer(&cache)?;
    let router = app(
        &cache,
        &base,
        data,
        AdminToken::new(args.admin_token.clone()),
    )
    .merge(metrics_route(metrics));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "job_match listening on http://{} (data {}, {})",
        listener.local_addr()?,
        path.display(),
        args.cache
            .redis_url()
            .map_or("memory only", |_| "shared through Redis"),
    );
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown::signal().await;
        let _ = stopping.send(());
    });
    let server = tokio::spawn(std::future::IntoFuture::into_future(server));
    // Once the signal came, requests in flight get the grace period, no more.
    let drained = async {
        let _ = stopped.await;
        tokio::time::sleep(args.shutdown.shutdown_grace).await;
    };
    tokio::select! {
        served = server => served??,
        () = drained => eprintln!("job_match: grace period over, closing"),
    }
    cache.shutdown().await;
    eprintln!("job_match stopped");
    Ok(())
}
