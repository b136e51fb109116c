//! The job-matching example: its routes answer, and its read routes are cached with
//! their own TTLs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/job_match/main.rs"]
mod job_match;

use std::time::Duration;

use axum::body::Body;
use clap::Parser;
use http::{Request, StatusCode};
use support::{call, eventually, get};
use tower_hybrid_cache::HybridCache;

/// A database of its own, seeded with `jobs` jobs and `candidates` candidates.
fn seeded(jobs: usize, candidates: usize) -> std::sync::Arc<job_match::Data> {
    job_match::Data::temporary(job_match::Seed { jobs, candidates }).unwrap()
}

#[tokio::test]
async fn read_routes_are_cached_with_their_ttls_and_writes_pass_through() {
    let cache = HybridCache::builder().build().await.unwrap();
    let admin = job_match::AdminToken::new(Some("s3cret".to_owned()));
    let app = job_match::app(&cache, &cache.layer(), seeded(2_000, 50), admin);

    // A hit's `ttl` is its route's TTL less the seconds since it was stored: bounded by
    // the time since the first request, however slow the machine.
    let started = std::time::Instant::now();
    let fresh_for = |response: &support::Got, route_ttl: i64| {
        let elapsed = i64::try_from(started.elapsed().as_secs()).unwrap();
        let ttl = response.ttl();
        assert!(response.is_hit(), "{}", response.cache_status());
        assert!(
            ttl.is_some_and(|ttl| ttl <= route_ttl && ttl >= route_ttl - elapsed - 1),
            "ttl {ttl:?} for a route of {route_ttl} s, {elapsed} s in"
        );
    };
    let search = "/jobs/search?q=engineer&location=Berlin&page=1&utm_source=mail";
    let first = call(app.clone(), get(search)).await;
    assert_eq!(first.status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert!(json["total"].as_u64().unwrap() > 0);
    assert!(json["facets"]["company"].as_array().unwrap().len() > 1);

    let matches = call(app.clone(), get("/candidates/7/matches")).await;
    let list: serde_json::Value = serde_json::from_slice(&matches.body).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 20);
    call(app.clone(), get("/jobs/42")).await;
    eventually("three stores", Duration::from_secs(10), || async {
        cache.stats().stores == 3
    })
    .await;

    let again = call(
        app.clone(),
        get("/jobs/search?page=1&location=Berlin&q=engineer"),
    )
    .await;
    fresh_for(&again, 30);
    assert_eq!(again.body, first.body);
    fresh_for(&call(app.clone(), get("/candidates/7/matches")).await, 60);
    fresh_for(&call(app.clone(), get("/jobs/42")).await, 300);
    assert_eq!(
        call(app.clone(), get("/jobs/999999")).await.status,
        StatusCode::NOT_FOUND
    );

    let post = Request::post("/jobs")
        .header("content-type", "application/json")
        .body(Body::from(
            r#"{"title":"Rust engineer","company":"Acme","location":"Berlin","skills":["rust"]}"#,
        ))
        .unwrap();
    let paris = "/jobs/search?q=engineer&location=Paris";
    call(app.clone(), get(paris)).await;
    eventually(
        "the Paris search stored",
        Duration::from_secs(10),
        || async { call(app.clone(), get(paris)).await.is_hit() },
    )
    .await;
    let created = call(app.clone(), post).await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.headers["location"], "/jobs/2000");
    // The new Berlin job invalidated the Berlin searches and the match lists, not the
    // Paris search.
    let berlin = call(
        app.clone(),
        get("/jobs/search?q=engineer&location=Berlin&page=1"),
    )
    .await;
    assert!(!berlin.is_hit(), "{}", berlin.cache_status());
    let json: serde_json::Value = serde_json::from_slice(&berlin.body).unwrap();
    assert_eq!(
        json["total"].as_u64().unwrap(),
        serde_json::from_slice::<serde_json::Value>(&first.body).unwrap()["total"]
            .as_u64()
            .unwrap()
            + 1,
        "the new job is found"
    );
    assert!(!call(app.clone(), get("/candidates/7/matches"))
        .await
        .is_hit());
    assert!(call(app.clone(), get(paris)).await.is_hit());

    // The admin route purges by tag, for the token alone.
    let purge = |token: Option<&str>| {
        let mut request = Request::post("/admin/purge?tag=search:location:paris");
        if let Some(token) = token {
            request = request.header("authorization", token);
        }
        request.body(Body::empty()).unwrap()
    };
    for wrong in [
        None,
        Some("Bearer s3cre"),
        Some("Bearer s3cret2"),
        Some("s3cret"),
        Some("Basic s3cret"),
    ] {
        assert_eq!(
            call(app.clone(), purge(wrong)).await.status,
            StatusCode::UNAUTHORIZED,
            "{wrong:?}"
        );
        assert!(call(app.clone(), get(paris)).await.is_hit(), "{wrong:?}");
    }
    assert_eq!(
        call(app.clone(), purge(Some("Bearer s3cret"))).await.status,
        StatusCode::NO_CONTENT
    );
    assert!(!call(app, get(paris)).await.is_hit());
}

#[tokio::test]
async fn the_admin_routes_are_off_without_a_token() {
    let cache = HybridCache::builder().build().await.unwrap();
    for token in [None, Some(String::new())] {
        let admin = job_match::AdminToken::new(token);
        let app = job_match::app(&cache, &cache.layer(), seeded(100, 10), admin);
        call(app.clone(), get("/jobs/1")).await;
        eventually("stored", Duration::from_secs(10), || async {
            call(app.clone(), get("/jobs/1")).await.is_hit()
        })
        .await;
        let purge = Request::post("/admin/purge")
            .header("authorization", "Bearer ")
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(app.clone(), purge).await.status, StatusCode::NOT_FOUND);
        assert!(call(app, get("/jobs/1")).await.is_hit());
    }
}

#[test]
fn an_empty_redis_url_means_memory_only() {
    let parse = |args: &[&str]| {
        let mut argv = vec!["job_match"];
        argv.extend_from_slice(args);
        job_match::Args::try_parse_from(argv).unwrap()
    };
    assert_eq!(parse(&[]).cache.redis_url(), None);
    assert_eq!(parse(&["--redis-url", ""]).cache.redis_url(), None);
    assert_eq!(parse(&["--redis-url", "  "]).cache.redis_url(), None);
    assert_eq!(
        parse(&["--redis-url", "redis://127.0.0.1:6379"])
            .cache
            .redis_url(),
        Some("redis://127.0.0.1:6379")
    );
}

#[test]
fn the_database_is_sqlite_in_a_file() {
    use std::path::PathBuf;
    let path = |url: Option<&str>| job_match::database_path(url).ok();
    assert_eq!(path(None), Some(PathBuf::from("job_match.db")));
    assert_eq!(path(Some("")), Some(PathBuf::from("job_match.db")));
    assert_eq!(
        path(Some("sqlite:///var/lib/jobs.db")),
        Some(PathBuf::from("/var/lib/jobs.db"))
    );
    assert_eq!(path(Some("sqlite:jobs.db")), Some(PathBuf::from("jobs.db")));
    assert_eq!(
        path(Some("data/jobs.db")),
        Some(PathBuf::from("data/jobs.db"))
    );
    let refused = job_match::database_path(Some("postgres://db/jobs")).unwrap_err();
    assert!(refused.to_string().contains("SQLite only"), "{refused}");
}

#[tokio::test]
async fn every_knob_is_a_flag_and_builds_a_cache() {
    let redis = support::redis::RedisServer::start();
    let url = redis.url();
    let args = job_match::Args::try_parse_from([
        "job_match",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        "sqlite:unused.db",
        "--redis-url",
        &url,
        "--namespace",
        "flags",
        "--memory-capacity-bytes",
        "1048576",
        "--near-cache",
        "2s",
        "--fill-lease",
        "1s",
        "--fallback-max-staleness",
        "10s",
        "--single-flight-timeout",
        "3s",
        "--cache-status-name",
        "edge",
        "--redis-deadline",
        "40ms",
        "--redis-command-timeout",
        "40ms",
        "--redis-connect-timeout",
        "300ms",
        "--redis-retries",
        "2",
        "--redis-retry-budget",
        "0.1",
        "--redis-pool-size",
        "2",
        "--redis-max-value-bytes",
        "65536",
        "--redis-write-queue",
        "64",
        "--redis-probe-interval",
        "200ms",
        "--redis-invalidation-ttl",
        "2m",
        "--breaker-consecutive-failures",
        "3",
        "--breaker-open-for",
        "500ms",
        "--max-body-bytes",
        "65536",
        "--max-query-bytes",
        "1024",
        "--stale-if-error",
        "30s",
        "--stale-while-revalidate",
        "5s",
        "--targeted-cache-control",
        "cdn-cache-control",
        "--forward-targeted-cache-control",
        "true",
        "--key-authority",
        "jobs.example.com",
        "--ignore-query-params",
        "utm_*,ref",
        "--key-headers",
        "accept-language",
        "--shutdown-grace",
        "1s",
    ])
    .unwrap();
    assert_eq!(args.cache.near_cache, Duration::from_millis(2_000));
    assert_eq!(args.route.ignore_query_params, ["utm_*", "ref"]);
    let cache = args.cache.build("job_match").await.unwrap();
    assert_eq!(cache.namespace(), "flags");
    // The pool size taken: two connections.
    eventually(
        "two Redis connections up",
        Duration::from_secs(10),
        || async { cache.redis_health().is_some_and(|h| h.connected == 2) },
    )
    .await;
    let base = args.route.layer(&cache).unwrap();
    let app = job_match::app(
        &cache,
        &base,
        seeded(10, 2),
        job_match::AdminToken::new(None),
    );
    let got = call(app, get("http://other.test/jobs/1?utm_source=x")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(
        got.cache_status().starts_with("edge; fwd=uri-miss"),
        "{}",
        got.cache_status()
    );
    // A flag that does not read is an error, not a default.
    for bad in [
        ["--near-cache", "soon"],
        ["--redis-retries", "-1"],
        ["--listen", "nowhere"],
    ] {
        let mut argv = vec!["job_match"];
        argv.extend_from_slice(&bad);
        assert!(job_match::Args::try_parse_from(argv).is_err(), "{bad:?}");
    }
    let bad_authority =
        job_match::Args::try_parse_from(["job_match", "--key-authority", "a b"]).unwrap();
    assert!(bad_authority.route.layer(&cache).is_err());
}

#[test]
fn a_replica_that_finds_the_database_locked_for_long_still_starts() {
    let path = std::env::temp_dir().join(format!("job_match-locked-{}.db", std::process::id()));
    let remove = || {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    };
    remove();
    // Another process's long write (a replica seeding): held past SQLite's busy wait.
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE;").unwrap();
    let opening = {
        let path = path.clone();
        std::thread::spawn(move || {
            job_match::Data::open(
                &path,
                job_match::Seed {
                    jobs: 20,
                    candidates: 2,
                },
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
    };
    let held_until = std::time::Instant::now() + Duration::from_millis(1_500);
    while std::time::Instant::now() < held_until && !opening.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    holder.execute_batch("COMMIT;").unwrap();
    assert_eq!(opening.join().unwrap(), Ok(()));
    remove();
}

#[tokio::test]
async fn the_search_in_sqlite_matches_titles_and_skills_by_location_with_its_facets() {
    let data = seeded(300, 2);
    // Every job, page by page.
    let mut all: Vec<serde_json::Value> = Vec::new();
    for page in 1.. {
        let found =
            serde_json::to_value(data.search(String::new(), None, page).await.unwrap()).unwrap();
        let jobs = found["jobs"].as_array().unwrap().clone();
        if jobs.is_empty() {
            break;
        }
        all.extend(jobs);
    }
    assert_eq!(all.len(), 300);
    let queries = [
        "rust", "ENGINEER", "go", "manager", "zz", "%", "_", "ru,st", "",
    ];
    let locations = [None, Some("berlin"), Some("BERLIN"), Some("Nowhere")];
    for q in queries {
        for location in locations {
            let q_lower = q.to_lowercase();
            let expected: Vec<&serde_json::Value> = all
                .iter()
                .filter(|job| {
                    let title = job["title"].as_str().unwrap().to_lowercase();
                    let skills = job["skills"].as_array().unwrap();
                    q_lower.is_empty()
                        || title.contains(&q_lower)
                        || skills
                            .iter()
                            .any(|s| s.as_str().unwrap().contains(&q_lower))
                })
                .filter(|job| {
                    location
                        .is_none_or(|l| job["location"].as_str().unwrap().eq_ignore_ascii_case(l))
                })
                .collect();
            let found = data
                .search(q.to_owned(), location.map(str::to_owned), 1)
                .await
                .unwrap();
            let found = serde_json::to_value(found).unwrap();
            let case = format!("q={q:?} location={location:?}");
            assert_eq!(
                found["total"].as_u64().unwrap() as usize,
                expected.len(),
                "{case}"
            );
            let ids: Vec<&serde_json::Value> = found["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| &j["id"])
                .collect();
            let expected_ids: Vec<&serde_json::Value> =
                expected.iter().take(20).map(|j| &j["id"]).collect();
            assert_eq!(ids, expected_ids, "{case}");
            let facet_total: u64 = found["facets"]["company"]
                .as_array()
                .unwrap()
                .iter()
                .map(|pair| pair[1].as_u64().unwrap())
                .sum();
            assert_eq!(facet_total as usize, expected.len(), "{case}");
        }
    }
    // An absurd page is an empty page, not an error.
    let far =
        serde_json::to_value(data.search(String::new(), None, usize::MAX).await.unwrap()).unwrap();
    assert!(far["jobs"].as_array().unwrap().is_empty());
}
