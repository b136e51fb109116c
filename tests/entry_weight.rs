//! The memory tier's weigher counts what its entries really cost: every allocation of
//! this test binary is counted (`stats_alloc`), and the heap that stored responses
//! hold, per entry, is checked against the weight the tier charges for them, for
//! small, middling and large bodies, from an exact `Vec` and from axum's `Json` (a
//! buffer grown while serialising), with more fields, and with tags (which the
//! memory tier also indexes). A capacity in bytes is only a bound on memory if
//! the weights are true.
//!
//! One test in its own binary: the counts are of the whole process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::IntoResponse;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{Layer, ServiceExt};
use tower_hybrid_cache::layer::RequestBody;
use tower_hybrid_cache::HybridCache;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// How many responses each case stores.
const ENTRIES: usize = 4_000;

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// The body as an exact `Vec`.
    Exact,
    /// axum's `Json`: serialised into a `BytesMut` that grew as it went.
    Json,
}

/// Stores `ENTRIES` responses of `size` bytes with `fields` header fields besides
/// axum's two and `tags.0` tags every response carries and `tags.1` of each one's own,
/// and returns (heap bytes held per entry, the weight charged per entry).
async fn held_and_charged(
    size: usize,
    shape: Shape,
    fields: usize,
    (shared, own): (usize, usize),
) -> (f64, f64) {
    let cache = HybridCache::builder()
        .memory_capacity_bytes(1 << 40)
        .build()
        .await
        .unwrap();
    let origin = tower::service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
        let byte = request.uri().query().map_or(0, str::len) as u8 % 26 + b'a';
        let page = request.uri().query().unwrap_or_default().to_owned();
        async move {
            let mut response = match shape {
                Shape::Exact => vec![byte; size].into_response(),
                Shape::Json => {
                    let data = String::from_utf8(vec![byte; size.saturating_sub(8)]).unwrap();
                    axum::Json(serde_json::json!({ "d": data })).into_response()
                }
            };
            for i in 0..fields {
                let name = http::HeaderName::try_from(format!("x-field-{i}")).unwrap();
                let value = http::HeaderValue::from_static("a value of 20 bytes.");
                response.headers_mut().insert(name, value);
            }
            if shared + own > 0 {
                let shared = (0..shared).map(|t| format!("shared-{t}"));
                let own = (0..own).map(|t| format!("own-{t}-{page}"));
                let list: Vec<String> = shared.chain(own).collect();
                let value = http::HeaderValue::try_from(list.join(" ")).unwrap();
                response.headers_mut().insert("cache-tag", value);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let service = cache.layer().ttl(Duration::from_secs(3600)).layer(origin);
    let ask = |i: usize| {
        let request = Request::get(format!("http://api.test/jobs/search?q=rust&page={i}"))
            .header("accept", "application/json")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let service = service.clone();
        async move {
            let response = service.oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
    };
    // Warm up what is made once (the runtime's, moka's first structures).
    for i in 0..64 {
        ask(1_000_000 + i).await;
    }
    cache.run_pending_tasks().await;
    let weighed_before = cache.memory_weighted_size();
    let region = Region::new(GLOBAL);
    for i in 0..ENTRIES {
        ask(i).await;
    }
    cache.run_pending_tasks().await;
    let change = region.change();
    assert_eq!(
        cache.memory_entry_count(),
        (ENTRIES + 64) as u64,
        "all held"
    );
    let held = change.bytes_allocated as f64 - change.bytes_deallocated as f64;
    let charged = (cache.memory_weighted_size() - weighed_before) as f64;
    drop(service);
    (held / ENTRIES as f64, charged / ENTRIES as f64)
}

#[tokio::test(flavor = "current_thread")]
async fn the_weigher_charges_what_entries_hold() {
    let mut report = Vec::new();
    let mut wrong = Vec::new();
    let cases = [
        (200, Shape::Exact, 0, (0, 0)),
        (200, Shape::Json, 0, (0, 0)),
        (200, Shape::Exact, 16, (0, 0)),
        (200, Shape::Exact, 0, (16, 0)),
        (200, Shape::Exact, 0, (0, 16)),
        (200, Shape::Exact, 0, (2, 2)),
        (4096, Shape::Exact, 0, (0, 0)),
        (4096, Shape::Json, 0, (0, 0)),
        (4096, Shape::Exact, 4, (0, 0)),
        (4096, Shape::Exact, 0, (2, 2)),
        (64 * 1024, Shape::Exact, 0, (0, 0)),
        (64 * 1024, Shape::Json, 0, (0, 0)),
    ];
    for (size, shape, fields, (shared, own)) in cases {
        let (held, charged) = held_and_charged(size, shape, fields, (shared, own)).await;
        let line = format!(
            "{size} B {shape:?}, {fields} more fields, tags {shared} shared and {own} own: held {held:.0} B an entry, charged {charged:.0} B ({:.2})",
            held / charged
        );
        // Charged at least what is held (within 5 %), and not far more (the
        // capacity would then hold fewer entries than it could).
        if !(held <= charged * 1.05 && charged <= held * 1.25) {
            wrong.push(line.clone());
        }
        report.push(line);
    }
    println!("{}", report.join("\n"));
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
