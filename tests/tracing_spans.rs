//! Each request through the layer has a `tower_hybrid_cache` span whose fields say
//! what the cache did (`cache.outcome`, `cache.fwd`, `cache.stored`, `cache.detail`):
//! a miss stored, a memory hit, a Redis hit on another replica, a write, a response not stored.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use support::redis::RedisServer;
use support::{call, eventually, get, Origin};
use tower_hybrid_cache::{HybridCache, RedisConfig};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

type Fields = BTreeMap<String, String>;

/// Keeps the fields of every closed `tower_hybrid_cache` span, in closing order.
#[derive(Clone, Default)]
struct Closed(Arc<Mutex<Vec<Fields>>>);

impl Closed {
    fn take(&self) -> Vec<Fields> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Closed {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(&mut Visitor(fields));
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        if span.name() == "tower_hybrid_cache" {
            let fields = span
                .extensions()
                .get::<Fields>()
                .cloned()
                .unwrap_or_default();
            self.0.lock().unwrap().push(fields);
        }
    }
}

fn fields(pairs: &[(&str, &str)]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

// One thread: the subscriber set for this test sees the layer's futures and tasks.
#[tokio::test(flavor = "current_thread")]
async fn each_request_has_a_span_with_what_the_cache_did() {
    let closed = Closed::default();
    let subscriber = tracing_subscriber::registry().with(closed.clone());
    let _default = tracing::subscriber::set_default(subscriber);

    let redis = RedisServer::start();
    let replica = || async {
        HybridCache::builder()
            .namespace("spans")
            .redis(RedisConfig::new(redis.url()))
            .build()
            .await
            .unwrap()
    };
    let (a, b) = (replica().await, replica().await);
    let origin = Origin::new();
    let (app_a, app_b) = (origin.behind(&a), origin.behind(&b));
    closed.take();

    call(
        app_a.clone(),
        get("http://api.test/s?h=cache-control:max-age%3D60"),
    )
    .await;
    assert_eq!(
        closed.take(),
        [fields(&[
            ("cache.outcome", "miss"),
            ("cache.fwd", "uri-miss"),
            ("cache.fwd_status", "200"),
            ("cache.stored", "true"),
        ])]
    );
    eventually("the write in Redis", Duration::from_secs(10), || async {
        a.stats().redis_writes == 1
    })
    .await;
    // Memory only: the second request is a memory hit.
    let memory = HybridCache::builder().build().await.unwrap();
    let app_m = origin.behind(&memory);
    call(
        app_m.clone(),
        get("http://api.test/m?h=cache-control:max-age%3D60"),
    )
    .await;
    closed.take();
    eventually("the memory hit", Duration::from_secs(10), || async {
        call(
            app_m.clone(),
            get("http://api.test/m?h=cache-control:max-age%3D60"),
        )
        .await
        .is_hit()
    })
    .await;
    // Again: a memory hit is answered in `call` itself (its future is ready), the
    // first one after a store may have waited on moka's housekeeping.
    for _ in 0..3 {
        call(
            app_m.clone(),
            get("http://api.test/m?h=cache-control:max-age%3D60"),
        )
        .await;
    }
    let spans = closed.take();
    assert_eq!(spans.len(), 4);
    for span in spans {
        assert_eq!(
            span,
            fields(&[("cache.outcome", "hit"), ("cache.detail", "memory")])
        );
    }
    call(
        app_b.clone(),
        get("http://api.test/s?h=cache-control:max-age%3D60"),
    )
    .await;
    assert_eq!(
        closed.take(),
        [fields(&[
            ("cache.outcome", "hit"),
            ("cache.detail", "redis")
        ])]
    );
    let post = http::Request::post("http://api.test/s")
        .body(Body::empty())
        .unwrap();
    call(app_a.clone(), post).await;
    let spans = closed.take();
    assert_eq!(
        spans,
        [fields(&[
            ("cache.outcome", "bypass"),
            ("cache.fwd", "bypass")
        ])]
    );
    call(
        app_a.clone(),
        get("http://api.test/o?h=cache-control:no-store"),
    )
    .await;
    assert_eq!(
        closed.take(),
        [fields(&[
            ("cache.outcome", "miss"),
            ("cache.fwd", "uri-miss"),
            ("cache.fwd_status", "200"),
            ("cache.detail", "no-store"),
        ])]
    );
}
