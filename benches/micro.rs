//! Micro-benchmarks of the per-request work that is ours: key derivation,
//! `Cache-Control` parsing and the stored-entry codec.
//!
//! `cargo bench --bench micro`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use tower_hybrid_cache::__bench::{parse_cache_control, primary_key};
use tower_hybrid_cache::entry::CachedResponse;

fn keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("api.example.com"));
    let short: Uri = "/jobs/42".parse().unwrap();
    let search: Uri =
        "/jobs/search?q=rust%20engineer&location=Berlin&page=2&utm_source=mail&sort=date"
            .parse()
            .unwrap();
    let long: Uri = format!(
        "/p/{}?{}",
        "x".repeat(2000),
        (0..50)
            .map(|i| format!("k{i}=v{i}"))
            .collect::<Vec<_>>()
            .join("&")
    )
    .parse()
    .unwrap();
    group.bench_function("path only", |b| {
        b.iter(|| primary_key(black_box(&short), black_box(&headers)))
    });
    group.bench_function("search query, 5 params", |b| {
        b.iter(|| primary_key(black_box(&search), black_box(&headers)))
    });
    group.bench_function("2 KB path, 50 params", |b| {
        b.iter(|| primary_key(black_box(&long), black_box(&headers)))
    });
    group.finish();
}

fn cache_control(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache-control");
    group.bench_function("max-age=60", |b| {
        b.iter(|| parse_cache_control(black_box("max-age=60")))
    });
    group.bench_function("typical CDN value", |b| {
        b.iter(|| parse_cache_control(black_box("public, max-age=300, s-maxage=600, stale-while-revalidate=30, stale-if-error=86400")))
    });
    group.bench_function("quoted and unknown", |b| {
        b.iter(|| parse_cache_control(black_box(r#"private="Set-Cookie, X-Foo", no-cache="x", ext="a,b", max-age=5, MUST-REVALIDATE"#)))
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for size in [2 * 1024, 64 * 1024] {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert(
            "cache-control",
            HeaderValue::from_static("public, max-age=300"),
        );
        headers.insert("etag", HeaderValue::from_static("\"abc123\""));
        headers.insert(
            "date",
            HeaderValue::from_static("Sun, 29 Nov 2026 12:00:00 GMT"),
        );
        headers.insert("content-length", HeaderValue::from(size));
        let now = SystemTime::now();
        let entry = CachedResponse::builder(StatusCode::OK, headers, Bytes::from(vec![b'x'; size]))
            .stored_at(now)
            .fresh_until(now + Duration::from_secs(300))
            .build();
        let encoded = entry.encode();
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_function(format!("encode {} KiB", size / 1024), |b| {
            b.iter(|| black_box(&entry).encode())
        });
        group.bench_function(format!("decode {} KiB", size / 1024), |b| {
            b.iter(|| CachedResponse::decode(black_box(encoded.clone())).unwrap())
        });
    }
    group.finish();
}

/// The layer's own cost per request, without sockets: an inner service that answers
/// pre-rendered bytes, alone and behind the layer (hits; misses that store).
fn layer(c: &mut Criterion) {
    use http::Request;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicU64, Ordering};
    use tower::{Layer, ServiceExt};
    use tower_hybrid_cache::HybridCache;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = Bytes::from(vec![b'j'; 3 * 1024]);
    let inner = tower::service_fn(
        move |_req: Request<tower_hybrid_cache::layer::RequestBody<Full<Bytes>>>| {
            let body = body.clone();
            async move { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body))) }
        },
    );
    let cache = rt.block_on(HybridCache::builder().build()).unwrap();
    let cached = cache
        .layer()
        .ttl(Duration::from_secs(3600))
        .layer(inner.clone());
    let request = |uri: String| {
        Request::get(uri)
            .header("host", "bench")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let counter = AtomicU64::new(0);
    let mut group = c.benchmark_group("layer");
    group.bench_function("inner service alone", |b| {
        b.to_async(&rt).iter(|| async {
            let response = inner
                .clone()
                .oneshot(
                    request("/jobs/search?q=rust".into())
                        .map(tower_hybrid_cache::layer::RequestBody::new),
                )
                .await
                .unwrap();
            response.into_body().collect().await.unwrap()
        })
    });
    rt.block_on(async {
        let response = cached
            .clone()
            .oneshot(request("/jobs/search?q=rust".into()))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        while cache.stats().stores == 0 {
            tokio::task::yield_now().await;
        }
    });
    group.bench_function("memory hit", |b| {
        b.to_async(&rt).iter(|| async {
            let response = cached
                .clone()
                .oneshot(request("/jobs/search?q=rust".into()))
                .await
                .unwrap();
            response.into_body().collect().await.unwrap()
        })
    });
    group.bench_function("miss, stored", |b| {
        b.to_async(&rt).iter(|| async {
            let uri = format!(
                "/jobs/search?q=rust&page={}",
                counter.fetch_add(1, Ordering::Relaxed)
            );
            let response = cached.clone().oneshot(request(uri)).await.unwrap();
            let body = response.into_body().collect().await.unwrap();
            // Let the background store run now, as a server's runtime would, instead
            // of piling up for the whole batch.
            tokio::task::yield_now().await;
            body
        })
    });
    group.finish();
}

criterion_group!(benches, keys, cache_control, codec, layer);
criterion_main!(benches);
