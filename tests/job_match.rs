//! The job-matching example: its routes answer, and its read routes are cached with
//! their own TTLs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/job_match.rs"]
mod job_match;

use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode};
use support::{call, eventually, get};
use tower_hybrid_cache::HybridCache;

#[tokio::test]
async fn read_routes_are_cached_with_their_ttls_and_writes_pass_through() {
    let cache = HybridCache::builder().build().await.unwrap();
    let admin = job_match::AdminToken::new(Some("s3cret".to_owned()));
    let app = job_match::app(&cache, job_match::Data::generate(2_000, 50), admin);

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
    assert!(
        again.cache_status().contains("hit; ttl=29")
            || again.cache_status().contains("hit; ttl=30")
    );
    assert_eq!(again.body, first.body);
    assert!(call(app.clone(), get("/candidates/7/matches"))
        .await
        .cache_status()
        .contains("hit; ttl=59"));
    assert!(call(app.clone(), get("/jobs/42"))
        .await
        .cache_status()
        .contains("hit; ttl=299"));
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
        let app = job_match::app(&cache, job_match::Data::generate(100, 10), admin);
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
    assert_eq!(job_match::redis_url(None), None);
    assert_eq!(job_match::redis_url(Some(String::new())), None);
    assert_eq!(job_match::redis_url(Some("  ".to_owned())), None);
    assert_eq!(
        job_match::redis_url(Some("redis://127.0.0.1:6379".to_owned())).as_deref(),
        Some("redis://127.0.0.1:6379")
    );
}
