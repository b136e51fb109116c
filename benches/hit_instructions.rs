//! Memory hits through the layer, N of them (first argument, default 10 000), for an
//! instruction-count A/B under callgrind: instruction counts do not depend on what
//! else the machine is doing, so two builds compare exactly (BENCHMARKS.md, "Hit
//! path, instructions").
//!
//! ```text
//! cargo bench --bench hit_instructions --no-run   # prints the binary's path
//! valgrind --tool=callgrind <binary> 2000; valgrind --tool=callgrind <binary> 12000
//! # per hit: (Ir(12000) - Ir(2000)) / 10000
//! ```
//!
//! A second argument puts that many more header fields on the stored response.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let hits: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let cache = tower_hybrid_cache::HybridCache::builder()
        .build()
        .await
        .unwrap();
    // More header fields on the stored response (second argument, default none).
    let fields: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let origin = tower::service_fn(
        move |_request: Request<tower_hybrid_cache::layer::RequestBody<Full<Bytes>>>| async move {
            let mut response = Response::new(Full::new(Bytes::from_static(b"hello world")));
            response.headers_mut().insert(
                "cache-control",
                http::HeaderValue::from_static("max-age=600"),
            );
            for i in 0..fields {
                response.headers_mut().insert(
                    http::HeaderName::try_from(format!("x-field-{i}")).unwrap(),
                    http::HeaderValue::from_static("a value of 20 bytes."),
                );
            }
            Ok::<_, Infallible>(response)
        },
    );
    let mut service = tower::Layer::layer(&cache.layer(), origin);
    let request = || {
        Request::get("http://api.test/jobs/42?q=rust")
            .header("accept", "*/*")
            .header("user-agent", "bench")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // The miss that stores the entry, then the hits.
    let stored = service
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap();
    stored.into_body().collect().await.unwrap();
    cache.run_pending_tasks().await;
    for _ in 0..hits {
        let hit = service
            .ready()
            .await
            .unwrap()
            .call(request())
            .await
            .unwrap();
        hit.into_body().collect().await.unwrap();
    }
}
