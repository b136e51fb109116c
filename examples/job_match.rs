//! A job-matching API on axum with per-route caching.
//!
//! ```text
//! cargo run --release --example job_match          # listens on ADDR, default 127.0.0.1:3000
//! curl -i 'http://127.0.0.1:3000/jobs/search?q=rust&location=Berlin&page=1'
//! curl -i 'http://127.0.0.1:3000/jobs/42'
//! curl -i 'http://127.0.0.1:3000/candidates/7/matches'
//! curl -i -X POST 'http://127.0.0.1:3000/jobs' -H 'content-type: application/json' \
//!      -d '{"title":"Rust engineer","company":"Acme","location":"Berlin","skills":["rust","tokio"]}'
//! ADMIN_TOKEN=s3cret cargo run --release --example job_match
//! curl -i -X POST -H 'authorization: Bearer s3cret' 'http://127.0.0.1:3000/admin/purge?tag=matches'
//! ```
//!
//! Search results are tagged by location (`search:location:berlin`, or
//! `search:any-location` without a location filter) and match lists `matches`; a new
//! job invalidates the searches it can appear in and every match list, on every replica
//! that shares the Redis, all at once through the layer on `POST /jobs` (one Redis
//! deadline at most, whatever Redis does). `/admin/purge` (a tag, or without one
//! everything) answers only when `ADMIN_TOKEN` is set, to requests that carry it as a
//! bearer token; any other gets 401 and changes nothing.
//!
//! The data set (a few thousand generated jobs and candidates) lives in memory; the
//! match route scores every job against a candidate, which takes tens of
//! milliseconds, so its cache hits are easy to see in `Cache-Status` and timings.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tower_hybrid_cache::{CacheOverrides, HybridCache};

const SKILLS: &[&str] = &[
    "rust",
    "go",
    "python",
    "java",
    "kotlin",
    "typescript",
    "react",
    "postgres",
    "redis",
    "kafka",
    "kubernetes",
    "terraform",
    "aws",
    "gcp",
    "ml",
    "pytorch",
    "spark",
    "tokio",
    "grpc",
    "graphql",
];
const TITLES: &[&str] = &[
    "Backend engineer",
    "Platform engineer",
    "Data engineer",
    "Site reliability engineer",
    "Frontend engineer",
    "ML engineer",
    "Engineering manager",
    "Security engineer",
];
const COMPANIES: &[&str] = &[
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
];
const LOCATIONS: &[&str] = &[
    "Berlin",
    "London",
    "Paris",
    "Remote",
    "Madrid",
    "Warsaw",
    "Lisbon",
    "Amsterdam",
];
/// Dimensions of the profile vectors the matcher compares.
const DIMS: usize = 1024;
const PAGE_SIZE: usize = 20;

/// A job offer.
#[derive(Clone, Serialize)]
pub struct Job {
    id: u64,
    title: String,
    company: String,
    location: String,
    skills: Vec<String>,
    salary: u32,
    #[serde(skip)]
    profile: Vec<f32>,
}

/// A candidate looking for a job.
#[derive(Clone)]
pub struct Candidate {
    skills: Vec<String>,
    profile: Vec<f32>,
}

/// The in-memory data set.
pub struct Data {
    jobs: RwLock<Vec<Job>>,
    candidates: Vec<Candidate>,
}

/// A small deterministic generator, so every run serves the same data.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
    fn unit(&mut self) -> f32 {
        (self.next() % 10_000) as f32 / 10_000.0
    }
}

fn profile(skills: &[String], rng: &mut XorShift) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIMS).map(|_| rng.unit() * 0.1).collect();
    for skill in skills {
        let seed = skill.bytes().fold(1469598103934665603u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(1099511628211)
        });
        let mut srng = XorShift(seed | 1);
        for x in v.iter_mut() {
            *x += srng.unit();
        }
    }
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn skills(rng: &mut XorShift) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for _ in 0..(2 + rng.next() % 4) {
        let skill = rng.pick(SKILLS).to_owned();
        if !out.contains(&skill) {
            out.push(skill);
        }
    }
    out
}

impl Data {
    /// `jobs` generated jobs and `candidates` generated candidates.
    pub fn generate(jobs: usize, candidates: usize) -> Arc<Self> {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let jobs = (0..jobs as u64)
            .map(|id| {
                let skills = skills(&mut rng);
                Job {
                    id,
                    title: rng.pick(TITLES).to_owned(),
                    company: rng.pick(COMPANIES).to_owned(),
                    location: rng.pick(LOCATIONS).to_owned(),
                    salary: 40_000 + (rng.next() % 80) as u32 * 1_000,
                    profile: profile(&skills, &mut rng),
                    skills,
                }
            })
            .collect();
        let candidates = (0..candidates)
            .map(|_| {
                let skills = skills(&mut rng);
                Candidate {
                    profile: profile(&skills, &mut rng),
                    skills,
                }
            })
            .collect();
        Arc::new(Data {
            jobs: RwLock::new(jobs),
            candidates,
        })
    }
}

#[derive(Deserialize)]
struct SearchParams {
    q: Option<String>,
    location: Option<String>,
    page: Option<usize>,
}

#[derive(Serialize)]
struct SearchResults {
    total: usize,
    page: usize,
    jobs: Vec<Job>,
    facets: Facets,
}

#[derive(Serialize)]
struct Facets {
    location: Vec<(String, usize)>,
    company: Vec<(String, usize)>,
}

fn count_by<'a>(values: impl Iterator<Item = &'a str>) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for value in values {
        match counts.iter_mut().find(|(v, _)| v == value) {
            Some((_, n)) => *n += 1,
            None => counts.push((value.to_owned(), 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
}

/// The tag of the searches a job in `location` can appear in.
fn location_tag(location: &str) -> String {
    format!("search:location:{}", location.to_lowercase())
}

/// The tag of the searches with no location filter: every new job can appear in them.
const ANY_LOCATION_TAG: &str = "search:any-location";
/// The tag of every candidate's match list.
const MATCHES_TAG: &str = "matches";

async fn search(
    State(data): State<Arc<Data>>,
    Query(params): Query<SearchParams>,
) -> impl IntoResponse {
    // Tagged so that a new job invalidates exactly the searches it can appear in.
    let tag = params
        .location
        .as_deref()
        .map_or_else(|| ANY_LOCATION_TAG.to_owned(), location_tag);
    let overrides = CacheOverrides::new().tags([tag]);
    let jobs = data.jobs.read().unwrap_or_else(|p| p.into_inner());
    let q = params.q.unwrap_or_default().to_lowercase();
    let hits: Vec<&Job> = jobs
        .iter()
        .filter(|j| {
            q.is_empty()
                || j.title.to_lowercase().contains(&q)
                || j.skills.iter().any(|s| s.contains(&q))
        })
        .filter(|j| {
            params
                .location
                .as_ref()
                .is_none_or(|l| j.location.eq_ignore_ascii_case(l))
        })
        .collect();
    let page = params.page.unwrap_or(1).max(1);
    let results = SearchResults {
        total: hits.len(),
        page,
        jobs: hits
            .iter()
            .skip((page - 1).saturating_mul(PAGE_SIZE))
            .take(PAGE_SIZE)
            .map(|j| (*j).clone())
            .collect(),
        facets: Facets {
            location: count_by(hits.iter().map(|j| j.location.as_str())),
            company: count_by(hits.iter().map(|j| j.company.as_str())),
        },
    };
    (Extension(overrides), Json(results))
}

async fn job(State(data): State<Arc<Data>>, Path(id): Path<u64>) -> impl IntoResponse {
    let jobs = data.jobs.read().unwrap_or_else(|p| p.into_inner());
    match jobs.iter().find(|j| j.id == id) {
        Some(job) => Json(job.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no such job").into_response(),
    }
}

#[derive(Serialize)]
struct Match {
    job_id: u64,
    title: String,
    company: String,
    score: f32,
}

/// Scores every job against the candidate: profile similarity plus shared skills.
fn best_matches(data: &Data, candidate: &Candidate, top: usize) -> Vec<Match> {
    let jobs = data.jobs.read().unwrap_or_else(|p| p.into_inner());
    let mut scored: Vec<Match> = jobs
        .iter()
        .map(|job| {
            let similarity: f32 = job
                .profile
                .iter()
                .zip(&candidate.profile)
                .map(|(a, b)| a * b)
                .sum();
            let shared = job
                .skills
                .iter()
                .filter(|s| candidate.skills.contains(s))
                .count() as f32;
            Match {
                job_id: job.id,
                title: job.title.clone(),
                company: job.company.clone(),
                score: similarity + 0.05 * shared,
            }
        })
        .collect();
    scored.sort_by(|a, b| b.score.total_cmp(&a.score));
    scored.truncate(top);
    scored
}

async fn matches(State(data): State<Arc<Data>>, Path(id): Path<usize>) -> impl IntoResponse {
    let Some(candidate) = data.candidates.get(id).cloned() else {
        return (StatusCode::NOT_FOUND, "no such candidate").into_response();
    };
    let work = tokio::task::spawn_blocking(move || best_matches(&data, &candidate, 20));
    match work.await {
        Ok(found) => (
            Extension(CacheOverrides::new().tags([MATCHES_TAG])),
            Json(found),
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[derive(Deserialize)]
struct NewJob {
    title: String,
    company: String,
    location: String,
    #[serde(default)]
    skills: Vec<String>,
    #[serde(default)]
    salary: u32,
}

async fn create_job(State(data): State<Arc<Data>>, Json(new): Json<NewJob>) -> impl IntoResponse {
    let mut rng = XorShift(0xDEAD_BEEF);
    let profile = profile(&new.skills, &mut rng);
    let location = new.location.clone();
    let id = {
        let mut jobs = data.jobs.write().unwrap_or_else(|p| p.into_inner());
        let id = jobs.last().map_or(0, |j| j.id + 1);
        jobs.push(Job {
            id,
            title: new.title,
            company: new.company,
            location: new.location,
            skills: new.skills,
            salary: new.salary,
            profile,
        });
        id
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
}

#[derive(Deserialize)]
struct Purge {
    tag: Option<String>,
}

/// The token the admin routes require, from `ADMIN_TOKEN`; without one they are off.
#[derive(Clone)]
pub struct AdminToken(Option<Arc<str>>);

impl AdminToken {
    /// Reads `ADMIN_TOKEN`; unset or empty turns the admin routes off.
    pub fn from_env() -> Self {
        Self::new(std::env::var("ADMIN_TOKEN").ok())
    }

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

/// The application: each read route cached with its own TTL, in one shared cache;
/// the admin routes guarded by `admin`.
pub fn app(cache: &HybridCache, data: Arc<Data>, admin: AdminToken) -> Router {
    Router::new()
        .route(
            "/jobs/search",
            get(search).layer(
                cache
                    .layer()
                    .ttl(Duration::from_secs(30))
                    .ignore_query_params(["utm_*"]),
            ),
        )
        .route(
            "/jobs",
            axum::routing::post(create_job).layer(cache.layer()),
        )
        .route("/admin/purge", axum::routing::post(purge))
        .route(
            "/jobs/{id}",
            get(job).layer(cache.layer().ttl(Duration::from_secs(300))),
        )
        .route(
            "/candidates/{id}/matches",
            get(matches).layer(cache.layer().ttl(Duration::from_secs(60))),
        )
        .layer(Extension(cache.clone()))
        .layer(Extension(admin))
        .with_state(data)
}

/// The search route alone, cached or not (for the load benchmark).
pub fn search_router(data: Arc<Data>, cache: Option<&HybridCache>) -> Router {
    let route = match cache {
        Some(cache) => get(search).layer(cache.layer().ttl(Duration::from_secs(30))),
        None => get(search),
    };
    Router::new().route("/jobs/search", route).with_state(data)
}

/// The Redis URL a `REDIS_URL` value names: none when unset or empty (as most tools
/// read an empty variable).
pub fn redis_url(var: Option<String>) -> Option<String> {
    var.filter(|url| !url.trim().is_empty())
}

#[allow(dead_code)] // Tests include this file as a module and do not call `main`.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let addr: SocketAddr = std::env::var("ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
        .parse()?;
    let mut builder = HybridCache::builder()
        .memory_capacity_bytes(256 << 20)
        .namespace("job_match");
    // With REDIS_URL, replicas share entries through Redis; without it, memory only.
    if let Some(url) = redis_url(std::env::var("REDIS_URL").ok()) {
        builder = builder.redis_url(url);
    }
    let cache = builder.build().await?;
    let data = Data::generate(5_000, 1_000);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("job_match listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(&cache, data, AdminToken::from_env())).await?;
    Ok(())
}
