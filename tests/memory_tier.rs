//! The memory tier: bounded by bytes, expired entries freed by scheduled housekeeping,
//! hits sharing the stored body.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use support::eventually;
use tower::{Layer, ServiceExt};
use tower_hybrid_cache::layer::RequestBody;
use tower_hybrid_cache::HybridCache;

const WAIT: Duration = Duration::from_secs(10);

fn origin(
    size: usize,
) -> impl tower::Service<
    Request<RequestBody<Body>>,
    Response = Response<Body>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |request: Request<RequestBody<Body>>| async move {
        // A fresh body per response, as a real handler makes.
        let fill = request.uri().path().len() as u8;
        Ok(Response::new(Body::from(vec![fill; size])))
    })
}

#[tokio::test]
async fn the_memory_tier_stays_within_its_capacity() {
    let capacity: u64 = 1 << 20;
    let cache = HybridCache::builder()
        .memory_capacity_bytes(capacity)
        .build()
        .await
        .unwrap();
    let service = cache
        .layer()
        .ttl(Duration::from_secs(600))
        .layer(origin(16 * 1024));
    // 200 × 16 KiB = 3.2 MiB offered to a 1 MiB tier.
    for i in 0..200 {
        let response = service
            .clone()
            .oneshot(
                Request::get(format!("/item/{i}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
    }
    eventually("200 stores", WAIT, || async { cache.stats().stores == 200 }).await;
    cache.run_pending_tasks().await;
    assert!(
        cache.memory_weighted_size() <= capacity,
        "{} > {capacity}",
        cache.memory_weighted_size()
    );
    assert!(cache.memory_entry_count() < 200);
    assert!(
        cache.memory_entry_count() > 10,
        "it still caches: {}",
        cache.memory_entry_count()
    );
}

#[tokio::test]
async fn expired_entries_are_freed_without_any_access() {
    let cache = HybridCache::builder()
        .maintenance_interval(Duration::from_millis(20))
        .build()
        .await
        .unwrap();
    let service = cache
        .layer()
        .ttl(Duration::from_secs(1))
        .layer(origin(64 * 1024));
    for i in 0..10 {
        let response = service
            .clone()
            .oneshot(Request::get(format!("/e/{i}")).body(Body::empty()).unwrap())
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
    }
    eventually("10 stores", WAIT, || async { cache.stats().stores == 10 }).await;
    eventually("the entries to be held", WAIT, || async {
        cache.run_pending_tasks().await;
        cache.memory_entry_count() == 10
    })
    .await;
    // Nothing touches the cache from here: only the scheduled housekeeping runs.
    eventually("expired entries freed", WAIT, || async {
        cache.memory_entry_count() == 0 && cache.memory_weighted_size() == 0
    })
    .await;
}

#[tokio::test]
async fn a_hit_shares_the_stored_body_instead_of_copying_it() {
    let cache = HybridCache::builder().build().await.unwrap();
    let service = cache
        .layer()
        .ttl(Duration::from_secs(60))
        .layer(origin(256 * 1024));
    let first = service
        .clone()
        .oneshot(Request::get("/shared").body(Body::empty()).unwrap())
        .await
        .unwrap();
    first.into_body().collect().await.unwrap();
    eventually("a store", WAIT, || async { cache.stats().stores == 1 }).await;

    let mut pointers = Vec::new();
    for _ in 0..2 {
        let response = service
            .clone()
            .oneshot(Request::get("/shared").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let mut body = response.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        let data: Bytes = frame.into_data().unwrap();
        assert_eq!(data.len(), 256 * 1024, "the whole body in one frame");
        pointers.push(data.as_ptr());
        assert!(body.frame().await.is_none());
    }
    assert_eq!(
        pointers[0], pointers[1],
        "both hits point at the same stored bytes"
    );
}
