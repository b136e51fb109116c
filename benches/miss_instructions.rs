//! Stored misses through the layer, N of them (first argument, default 10 000), each on
//! a URL of its own, for an instruction-count A/B under callgrind (BENCHMARKS.md,
//! "Miss path, instructions"): the key, the single-flight entry, the origin call, the
//! body's tee, the entry built and stored in memory, the memory tier's insert. A
//! second argument sets the memory capacity in bytes (default 64 MiB, which holds
//! every miss): at 4194304, about 900 entries fit and every later miss evicts one. A
//! third tags each response with that many tags (`Cache-Tag`), every response the
//! same ones; a fourth, `own`, makes them each response's own (`item-{n}-{t}`, as an
//! item's tags are), so that each tag names one entry.
//!
//! ```text
//! cargo bench --bench miss_instructions --no-run   # prints the binary's path
//! valgrind --tool=callgrind <binary> 2000; valgrind --tool=callgrind <binary> 12000
//! # per miss: (Ir(12000) - Ir(2000)) / 10000
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let misses: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let capacity: u64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(tower_hybrid_cache::HybridCacheBuilder::DEFAULT_MEMORY_CAPACITY_BYTES);
    let cache = tower_hybrid_cache::HybridCache::builder()
        .memory_capacity_bytes(capacity)
        .build()
        .await
        .unwrap();
    let tags: usize = std::env::args()
        .nth(3)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let own = std::env::args().nth(4).is_some_and(|a| a == "own");
    let shared = (tags > 0 && !own).then(|| {
        let names: Vec<String> = (0..tags).map(|t| format!("tag-{t}")).collect();
        http::HeaderValue::try_from(names.join(" ")).unwrap()
    });
    let responses = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let body = Bytes::from(vec![b'j'; 3 * 1024]);
    let origin = tower::service_fn(
        move |_request: Request<tower_hybrid_cache::layer::RequestBody<Full<Bytes>>>| {
            let body = body.clone();
            let tags = shared.clone().or_else(|| {
                (tags > 0).then(|| {
                    // Written by hand: a `format!` a tag would cost more than the cache.
                    let n = responses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (mut item, mut number) = (itoa::Buffer::new(), itoa::Buffer::new());
                    let item = item.format(n);
                    let mut text = String::with_capacity(tags * (item.len() + 8));
                    for t in 0..tags {
                        if t > 0 {
                            text.push(' ');
                        }
                        text.push_str("item-");
                        text.push_str(item);
                        text.push('-');
                        text.push_str(number.format(t));
                    }
                    http::HeaderValue::try_from(text).unwrap()
                })
            });
            async move {
                let mut response = Response::new(Full::new(body));
                if let Some(tags) = tags {
                    response.headers_mut().insert("cache-tag", tags);
                }
                Ok::<_, Infallible>(response)
            }
        },
    );
    let mut service = tower::Layer::layer(&cache.layer().ttl(Duration::from_secs(3600)), origin);
    for page in 0..misses {
        let request = Request::get(format!("http://api.test/jobs/search?q=rust&page={page}"))
            .header("accept", "*/*")
            .header("user-agent", "bench")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = service.ready().await.unwrap().call(request).await.unwrap();
        response.into_body().collect().await.unwrap();
        // Let the background store run now, as a server's runtime would.
        tokio::task::yield_now().await;
    }
    cache.run_pending_tasks().await;
    assert_eq!(cache.stats().stores, misses as u64, "every miss stored");
}
