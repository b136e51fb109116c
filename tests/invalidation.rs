//! Invalidation by writes (RFC 9111 §4.4) and `HybridCache::invalidate`, in memory and
//! across replicas sharing a real `redis-server`, with the race of a fill in flight.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "support/fault_proxy.rs"]
mod fault_proxy;

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use fault_proxy::{Fault, FaultProxy};
use support::redis::RedisServer;
use support::{call, eventually, get as get_request, get_with, Origin};
use tower_hybrid_cache::breaker::CircuitBreakerLayer;
use tower_hybrid_cache::{HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(15);

/// A jobs API: `GET /jobs/{id}` counts its calls; `POST`/`PUT`/`DELETE /jobs/{id}` answer
/// with the status and headers the test sets.
#[derive(Clone, Default)]
struct Jobs {
    reads: Arc<AtomicUsize>,
    write_status: Arc<AtomicU16>,
    write_headers: Arc<Mutex<Vec<(&'static str, String)>>>,
}

impl Jobs {
    fn new() -> Self {
        let jobs = Jobs::default();
        jobs.write_status.store(201, Ordering::SeqCst);
        jobs
    }

    fn router(&self, cache: &HybridCache) -> Router {
        let (reads, jobs) = (Arc::clone(&self.reads), self.clone());
        let read = move |Path(id): Path<String>, headers: HeaderMap| {
            let n = reads.fetch_add(1, Ordering::SeqCst) + 1;
            let lang = headers
                .get("accept-language")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            async move {
                (
                    [
                        ("cache-control", "max-age=300"),
                        ("vary", "accept-language"),
                    ],
                    format!("job {id} {lang} #{n}"),
                )
            }
        };
        let write = move || {
            let jobs = jobs.clone();
            async move {
                let status =
                    StatusCode::from_u16(jobs.write_status.load(Ordering::SeqCst)).unwrap();
                let mut response = axum::response::Response::new(Body::empty());
                *response.status_mut() = status;
                for (name, value) in jobs.write_headers.lock().unwrap().iter() {
                    response.headers_mut().insert(*name, value.parse().unwrap());
                }
                response
            }
        };
        Router::new()
            .route(
                "/jobs/{id}",
                get(read)
                    .post(write.clone())
                    .put(write.clone())
                    .delete(write.clone()),
            )
            .route("/jobs", axum::routing::post(write))
            .layer(cache.layer())
    }

    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

fn request(method: &str, uri: &str) -> http::Request<Body> {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap()
}

async fn memory_cache() -> HybridCache {
    HybridCache::builder().build().await.unwrap()
}

#[tokio::test]
async fn a_successful_write_invalidates_its_uri() {
    let cache = memory_cache().await;
    let jobs = Jobs::new();
    let app = jobs.router(&cache);
    let url = "http://api.test/jobs/42";
    call(app.clone(), get_request(url)).await;
    assert!(call(app.clone(), get_request(url)).await.is_hit());
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        // Stores run in the background: wait for the last miss's entry.
        eventually("the entry stored", WAIT, || async {
            call(app.clone(), get_request(url)).await.is_hit()
        })
        .await;
        // PATCH has no route here (405): an error invalidates nothing.
        let before = jobs.reads();
        let written = call(app.clone(), request(method, url)).await;
        assert!(written.cache_status().contains("fwd=bypass"), "{method}");
        let after = call(app.clone(), get_request(url)).await;
        if method == "PATCH" {
            assert_eq!(written.status, StatusCode::METHOD_NOT_ALLOWED);
            assert!(after.is_hit(), "a failed write leaves the entry");
        } else {
            assert!(
                !after.is_hit(),
                "{method} invalidated: {}",
                after.cache_status()
            );
            assert_eq!(jobs.reads(), before + 1);
        }
    }
    assert_eq!(cache.stats().invalidations, 3);
}

#[tokio::test]
async fn a_layer_invalidates_with_its_own_key_settings() {
    let cache = memory_cache().await;
    let search = cache
        .layer()
        .ttl(Duration::from_secs(300))
        .ignore_query_params(["utm_*"])
        .key_headers([http::HeaderName::from_static("x-tenant")]);
    let origin = Origin::new();
    let app = origin.router().layer(search.clone());
    let url = "http://api.test/jobs/search?q=rust&utm_source=mail";
    for tenant in ["acme", "globex"] {
        call(app.clone(), get_with(url, &[("x-tenant", tenant)])).await;
        eventually("the entry stored", WAIT, || async {
            call(app.clone(), get_with(url, &[("x-tenant", tenant)]))
                .await
                .is_hit()
        })
        .await;
    }
    let uri: http::Uri = "http://api.test/jobs/search?q=rust".parse().unwrap();
    // The cache's own `invalidate` keys with default settings: not this route's entry.
    assert!(cache.invalidate(&uri).await);
    let acme = || get_with(url, &[("x-tenant", "acme")]);
    assert!(call(app.clone(), acme()).await.is_hit());
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", "acme".parse().unwrap());
    assert!(search.invalidate(&uri, &headers).await);
    assert!(!call(app.clone(), acme()).await.is_hit());
    let globex = call(app.clone(), get_with(url, &[("x-tenant", "globex")])).await;
    assert!(globex.is_hit(), "another tenant's entry stays");
}

#[tokio::test]
async fn error_statuses_invalidate_nothing() {
    let cache = memory_cache().await;
    let jobs = Jobs::new();
    let app = jobs.router(&cache);
    let url = "http://api.test/jobs/1";
    call(app.clone(), get_request(url)).await;
    for status in [400, 404, 409, 500, 503] {
        jobs.write_status.store(status, Ordering::SeqCst);
        call(app.clone(), request("POST", url)).await;
        assert!(
            call(app.clone(), get_request(url)).await.is_hit(),
            "{status}"
        );
    }
    assert_eq!(jobs.reads(), 1);
}

#[tokio::test]
async fn location_and_content_location_of_the_same_authority_are_invalidated() {
    let cache = memory_cache().await;
    let jobs = Jobs::new();
    let app = jobs.router(&cache);
    let urls = [
        "http://api.test/jobs/7",
        "http://api.test/jobs/8",
        "http://api.test/jobs/9",
    ];
    for url in urls {
        call(app.clone(), get_request(url)).await;
        assert!(call(app.clone(), get_request(url)).await.is_hit());
    }
    *jobs.write_headers.lock().unwrap() = vec![
        ("location", "http://API.test/jobs/7".to_owned()),
        ("content-location", "/jobs/8".to_owned()),
    ];
    call(app.clone(), request("POST", "http://api.test/jobs")).await;
    assert!(!call(app.clone(), get_request(urls[0])).await.is_hit());
    assert!(!call(app.clone(), get_request(urls[1])).await.is_hit());
    assert!(call(app.clone(), get_request(urls[2])).await.is_hit());

    // Another authority, a relative path and junk invalidate nothing.
    for location in ["http://other.test/jobs/9", "jobs/9", "::not a uri::"] {
        *jobs.write_headers.lock().unwrap() = vec![("location", location.to_owned())];
        call(app.clone(), request("POST", "http://api.test/jobs")).await;
        assert!(
            call(app.clone(), get_request(urls[2])).await.is_hit(),
            "{location}"
        );
    }
}

#[tokio::test]
async fn every_vary_variant_is_invalidated_and_stays_so() {
    let cache = memory_cache().await;
    let jobs = Jobs::new();
    let app = jobs.router(&cache);
    let url = "http://api.test/jobs/5";
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    for lang in [&en, &fr] {
        call(app.clone(), get_with(url, lang)).await;
        assert!(call(app.clone(), get_with(url, lang)).await.is_hit());
    }
    call(app.clone(), request("PUT", url)).await;
    // The English variant is stored again first: the French one from before the
    // write must not come back with the new index.
    let en_again = call(app.clone(), get_with(url, &en)).await;
    assert!(!en_again.is_hit());
    let fr_again = call(app.clone(), get_with(url, &fr)).await;
    assert!(!fr_again.is_hit(), "{}", fr_again.cache_status());
    assert_eq!(jobs.reads(), 4);
}

#[tokio::test]
async fn a_fill_in_flight_cannot_resurrect_an_invalidated_entry() {
    let cache = memory_cache().await;
    let origin = Origin::new();
    let app = origin.behind(&cache);
    let url = "http://api.test/slow?gate=1";
    let fill = tokio::spawn(call(app.clone(), get_request(url)));
    eventually("the origin call", WAIT, || async {
        origin.log.calls() == 1
    })
    .await;
    // The write lands while the old response is on its way.
    assert!(cache.invalidate(&url.parse().unwrap()).await);
    origin.gate.add_permits(2);
    assert_eq!(fill.await.unwrap().status, StatusCode::OK);
    cache.run_pending_tasks().await;
    let next = call(app.clone(), get_request(url)).await;
    assert!(!next.is_hit(), "{}", next.cache_status());
    assert_eq!(origin.log.calls(), 2);
    // Fills that start after the invalidation are stored as usual.
    eventually("the new fill stored", WAIT, || async {
        call(app.clone(), get_request(url)).await.is_hit()
    })
    .await;
}

/// A replica of the `inval` namespace, with a 500 ms deadline; its PINGs may take
/// 500 ms too, so that a busy test machine cannot make a healthy connection look cut
/// off.
fn replica_builder(url: &str) -> tower_hybrid_cache::HybridCacheBuilder {
    HybridCache::builder().namespace("inval").redis(
        RedisConfig::new(url)
            .deadline(Duration::from_millis(500))
            .probe_timeout(Duration::from_millis(500)),
    )
}

async fn replica(url: &str) -> HybridCache {
    replica_builder(url).build().await.unwrap()
}

#[tokio::test]
async fn a_write_through_one_replica_invalidates_for_every_replica() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let jobs = Jobs::new();
    let (app_a, app_b) = (jobs.router(&a), jobs.router(&b));
    let url = "http://api.test/jobs/77";
    call(app_a.clone(), get_request(url)).await;
    eventually("the entry in Redis", WAIT, || async {
        a.stats().redis_writes >= 2 // the Vary index and the variant
    })
    .await;
    let from_b = call(app_b.clone(), get_request(url)).await;
    assert!(
        from_b.is_hit() && from_b.cache_status().ends_with("detail=redis"),
        "{}",
        from_b.cache_status()
    );

    call(app_a.clone(), request("DELETE", url)).await;
    // B's memory still holds the entry, but Redis answers first: a miss.
    let after = call(app_b.clone(), get_request(url)).await;
    assert!(!after.is_hit(), "{}", after.cache_status());
    assert_eq!(jobs.reads(), 2);
}

/// An invalidation never lowers a mark a later one set: a command held in a hung
/// link's socket buffer reaches Redis late, and a fill that started between the two
/// invalidations would be written over the newer one (the chaos soak caught plain
/// Redis hits older than an acknowledged write that way, with a black-holed link).
#[tokio::test]
async fn a_late_invalidation_never_lowers_a_later_mark() {
    let redis = RedisServer::start();
    let cache = replica(&redis.url()).await;
    eventually("connected", WAIT, || async {
        cache.redis_health().unwrap().connected > 0
    })
    .await;
    let mark = || redis.cli(&["GET", "inval/purged"]).parse::<u64>().unwrap();
    // An earlier mark is raised to now.
    redis.cli(&["SET", "inval/purged", "1000"]);
    assert!(cache.purge_all().await);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(mark() > now - 60_000, "{}", mark());
    // A later one stays, and so does its lifetime.
    let later = now + 600_000;
    redis.cli(&["SET", "inval/purged", &later.to_string(), "PX", "900000"]);
    assert!(cache.purge_all().await);
    assert_eq!(mark(), later);
    let left: u64 = redis.cli(&["PTTL", "inval/purged"]).parse().unwrap();
    assert!(left > 800_000, "{left}");
}

/// A replica whose breaker, once forced open, stays open: it then answers from memory
/// alone.
async fn replica_held_open_once_forced(url: &str) -> HybridCache {
    replica_builder(url)
        .redis_breaker(
            CircuitBreakerLayer::new().open_for(Duration::from_secs(60), Duration::from_secs(60)),
        )
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_replica_never_serves_from_redis_what_it_invalidated_while_redis_was_away() {
    let redis = RedisServer::start();
    // Replays wait 30 s (the probe interval), so Redis is back before they run.
    let a = HybridCache::builder()
        .namespace("inval")
        .redis(
            RedisConfig::new(redis.url())
                .deadline(Duration::from_millis(500))
                .probe_interval(Duration::from_secs(30)),
        )
        .redis_breaker(
            CircuitBreakerLayer::new().open_for(Duration::from_secs(60), Duration::from_secs(60)),
        )
        .build()
        .await
        .unwrap();
    let origin = Origin::new();
    let (by_key, by_tag) = (
        "http://api.test/jobs/queued",
        "http://api.test/jobs/tagged?h=cache-tag:feed",
    );
    for url in [by_key, by_tag] {
        call(origin.behind(&a), get_request(url)).await;
    }
    eventually("both in Redis", WAIT, || async {
        a.stats().redis_writes == 2
    })
    .await;
    // Redis away: both invalidations wait for replay.
    a.redis_breaker().unwrap().force_open();
    assert!(!a.invalidate(&by_key.parse().unwrap()).await);
    assert!(!a.invalidate_tag("feed").await);
    // The key's delete is kept by the writer, behind the writes queued before it.
    eventually("both kept for replay", WAIT, || async {
        a.pending_redis_operations() == 2
    })
    .await;
    // Redis back, the old entries still in it, the replays not run yet.
    a.redis_breaker().unwrap().force_half_open();
    for url in [by_key, by_tag] {
        let got = call(origin.behind(&a), get_request(url)).await;
        assert!(!got.is_hit(), "{url}: {}", got.cache_status());
    }
    assert_eq!(origin.log.calls(), 4);
    assert_eq!(a.pending_redis_operations(), 2, "read before the replays");
}

#[tokio::test]
async fn memory_forgets_what_another_replica_invalidated_so_an_outage_cannot_serve_it() {
    let redis = RedisServer::start();
    let a = replica_held_open_once_forced(&redis.url()).await;
    let b = replica(&redis.url()).await;
    let origin = Origin::new();
    let url = "http://api.test/jobs/outage";
    call(origin.behind(&a), get_request(url)).await;
    eventually("the entry in Redis", WAIT, || async {
        a.stats().redis_writes == 1
    })
    .await;
    assert!(b.invalidate(&url.parse().unwrap()).await);
    // Redis is now unreachable for A: memory alone answers, and must not hold what B
    // invalidated (the message reaches A's memory through Redis pub/sub).
    a.redis_breaker().unwrap().force_open();
    eventually("A's memory to forget the entry", WAIT, || async {
        !call(origin.behind(&a), get_request(url)).await.is_hit()
    })
    .await;
    assert_eq!(origin.log.calls(), 2);
}

/// How many subscribers Redis counts on the `inval` namespace's invalidations.
fn subscribers(redis: &RedisServer) -> String {
    redis.cli(&["PUBSUB", "NUMSUB", "inval/invalidations"])
}

/// Replica A reaching Redis through a fault proxy, replica B straight, both
/// subscribed, and two of A's entries in Redis: `gone` (which B will invalidate while
/// A is cut off) and `kept`.
struct CutOff {
    redis: RedisServer,
    proxy: FaultProxy,
    a: HybridCache,
    b: HybridCache,
    origin: Origin,
    gone: &'static str,
    kept: &'static str,
}

impl CutOff {
    async fn start(gone: &'static str) -> Self {
        let redis = RedisServer::start();
        let proxy = FaultProxy::start(redis.port());
        let a = replica_held_open_once_forced(&proxy.url()).await;
        let b = replica(&redis.url()).await;
        let cut_off = CutOff {
            origin: Origin::new(),
            kept: "http://api.test/jobs/kept",
            gone,
            redis,
            proxy,
            a,
            b,
        };
        for url in [cut_off.gone, cut_off.kept] {
            call(cut_off.origin.behind(&cut_off.a), get_request(url)).await;
        }
        eventually("both entries in Redis", WAIT, || async {
            cut_off.a.stats().redis_writes == 2
        })
        .await;
        eventually("A and B subscribed", WAIT, || async {
            subscribers(&cut_off.redis).ends_with('2')
        })
        .await;
        cut_off
    }

    /// Resets A's connections and keeps them down, until Redis counts A's
    /// subscription gone.
    async fn cut(&self) {
        self.proxy.set(Fault::Reset);
        eventually("A's subscription gone", WAIT, || async {
            subscribers(&self.redis).ends_with('1')
        })
        .await;
    }

    /// Lifts the fault; once A is subscribed and connected again, Redis is put out of
    /// A's reach, so that memory alone answers: it must have forgotten `gone`, and
    /// only that.
    async fn lift_and_expect_caught_up(&self) {
        let a = &self.a;
        self.proxy.set(Fault::None);
        eventually("A subscribed again", WAIT, || async {
            subscribers(&self.redis).ends_with('2')
        })
        .await;
        // Every pooled connection back too: one coming back later would let the
        // forced-open breaker's probe through, and Redis answer instead of memory.
        eventually("A's connections back", WAIT, || async {
            a.redis_health().unwrap().connected == 4
        })
        .await;
        a.redis_breaker().unwrap().force_open();
        eventually(
            "A's memory to forget the invalidated entry",
            WAIT,
            || async {
                !call(self.origin.behind(a), get_request(self.gone))
                    .await
                    .is_hit()
            },
        )
        .await;
        let still = call(self.origin.behind(a), get_request(self.kept)).await;
        assert!(
            still.cache_status().ends_with("detail=memory"),
            "{}",
            still.cache_status()
        );
        assert_eq!(self.origin.log.calls(), 3);
    }
}

#[tokio::test]
async fn memory_catches_up_on_what_was_invalidated_while_its_subscriber_was_cut_off() {
    let cut_off = CutOff::start("http://api.test/jobs/cut-off").await;
    let redis = &cut_off.redis;
    // A is cut off: B's invalidation message cannot reach it.
    cut_off.cut().await;
    assert!(cut_off.b.invalidate(&cut_off.gone.parse().unwrap()).await);
    // The log that keeps it for A holds each message once, for as long as the marks.
    assert_eq!(redis.cli(&["ZCARD", "inval/invalidation-log"]), "1");
    let kept_for: u64 = redis
        .cli(&["PTTL", "inval/invalidation-log"])
        .parse()
        .unwrap();
    assert!(kept_for > 0 && kept_for <= 300_000, "{kept_for}");
    // Memory forgets what B invalidated meanwhile, read back from the log.
    cut_off.lift_and_expect_caught_up().await;
}

/// Adds `count` junk messages to the `inval` namespace's invalidation log, scored now
/// (by Redis's clock), each a microsecond apart: what anonymous writes to distinct
/// URLs leave there.
fn flood_the_log(redis: &RedisServer, count: usize) {
    flood_the_log_apart(redis, count, 1);
}

/// As `flood_the_log`, each message `apart` microseconds after the one before (0:
/// all in one millisecond, as a replica scores them, in whole milliseconds).
fn flood_the_log_apart(redis: &RedisServer, count: usize, apart: u32) {
    let script = "local t = redis.call('TIME') \
                  local now = t[1] * 1000 + math.floor(t[2] / 1000) \
                  for i = 1, tonumber(ARGV[1]) do \
                    redis.call('ZADD', KEYS[1], now + i * tonumber(ARGV[2]) / 1000, 'k junk' .. i) \
                  end \
                  return redis.call('ZCARD', KEYS[1])";
    let size = redis.cli(&[
        "EVAL",
        script,
        "1",
        "inval/invalidation-log",
        &count.to_string(),
        &apart.to_string(),
    ]);
    assert!(size.parse::<usize>().unwrap() >= count, "{size}");
}

#[tokio::test]
async fn a_catch_up_reads_the_log_in_pages() {
    let cut_off = CutOff::start("http://api.test/jobs/paged").await;
    let redis = &cut_off.redis;
    cut_off.cut().await;
    flood_the_log(redis, 2_500);
    let before = cut_off.proxy.count("ZRANGEBYSCORE");
    // Last in the log: read only if every page before it was.
    assert!(cut_off.b.invalidate(&cut_off.gone.parse().unwrap()).await);
    cut_off.lift_and_expect_caught_up().await;
    let reads = cut_off.proxy.count("ZRANGEBYSCORE") - before;
    assert!(reads >= 3, "{reads} reads of 1 000 for 2 501 messages");
}

#[tokio::test]
async fn a_catch_up_reads_a_millisecond_of_more_than_a_page_and_goes_on() {
    let cut_off = CutOff::start("http://api.test/jobs/one-millisecond").await;
    let redis = &cut_off.redis;
    cut_off.cut().await;
    // 2 500 messages of one score: no page of 1 000 gets past it by score alone.
    flood_the_log_apart(redis, 2_500, 0);
    // After them in the log: read only if the catch-up got past that millisecond,
    // and `kept` stays in memory only if it did not give up and forget everything.
    assert!(cut_off.b.invalidate(&cut_off.gone.parse().unwrap()).await);
    cut_off.lift_and_expect_caught_up().await;
}

#[tokio::test]
async fn a_log_too_long_to_catch_up_on_makes_memory_forget_everything() {
    let cut_off = CutOff::start("http://api.test/jobs/flooded").await;
    let redis = &cut_off.redis;
    cut_off.cut().await;
    // More than the catch-up reads, none of them about A's entries.
    flood_the_log(redis, 10_001);
    // A's reads alone (B, on its own connections, may catch up too).
    let reads = cut_off.proxy.count("ZRANGEBYSCORE");
    cut_off.proxy.set(Fault::None);
    eventually("A subscribed again", WAIT, || async {
        subscribers(redis).ends_with('2')
    })
    .await;
    eventually("A's connections back", WAIT, || async {
        cut_off.a.redis_health().unwrap().connected == 4
    })
    .await;
    cut_off.a.redis_breaker().unwrap().force_open();
    // Neither entry is left in memory, and the log was never read.
    eventually("A's memory to forget everything", WAIT, || async {
        cut_off.a.run_pending_tasks().await;
        cut_off.a.memory_entry_count() == 0
    })
    .await;
    for url in [cut_off.gone, cut_off.kept] {
        let got = call(cut_off.origin.behind(&cut_off.a), get_request(url)).await;
        assert!(!got.is_hit(), "{url}: {}", got.cache_status());
    }
    assert_eq!(cut_off.proxy.count("ZRANGEBYSCORE"), reads);
}

#[tokio::test]
async fn a_log_trimmed_into_the_window_makes_memory_forget_everything() {
    let cut_off = CutOff::start("http://api.test/jobs/trimmed").await;
    let redis = &cut_off.redis;
    cut_off.cut().await;
    // B's invalidation of `gone` is pushed out of the full log by later ones.
    assert!(cut_off.b.invalidate(&cut_off.gone.parse().unwrap()).await);
    flood_the_log(redis, 10_000);
    assert!(
        cut_off
            .b
            .invalidate(&"http://api.test/other".parse().unwrap())
            .await
    );
    assert_eq!(redis.cli(&["ZCARD", "inval/invalidation-log"]), "10000");
    cut_off.proxy.set(Fault::None);
    eventually("A subscribed again", WAIT, || async {
        subscribers(redis).ends_with('2')
    })
    .await;
    eventually("A's connections back", WAIT, || async {
        cut_off.a.redis_health().unwrap().connected == 4
    })
    .await;
    cut_off.a.redis_breaker().unwrap().force_open();
    eventually("A's memory to forget everything", WAIT, || async {
        cut_off.a.run_pending_tasks().await;
        cut_off.a.memory_entry_count() == 0
    })
    .await;
    let got = call(cut_off.origin.behind(&cut_off.a), get_request(cut_off.gone)).await;
    assert!(!got.is_hit(), "{}", got.cache_status());
}

#[tokio::test]
async fn an_unreadable_log_is_asked_for_again_with_a_growing_backoff() {
    let cut_off = CutOff::start("http://api.test/jobs/unreadable").await;
    let redis = &cut_off.redis;
    cut_off.cut().await;
    // Every read of the log now fails (WRONGTYPE).
    assert_eq!(redis.cli(&["SET", "inval/invalidation-log", "junk"]), "OK");
    // A's attempts alone (B, on its own connections, may catch up too).
    let asked = || cut_off.proxy.count("ZCOUNT");
    let before = asked();
    cut_off.proxy.set(Fault::None);
    eventually("A's first attempt", WAIT, || async { asked() > before }).await;
    let first = std::time::Instant::now();
    // Asked again after 250 ms, 500 ms, 1 s, 2 s, … (each at least that): a slower
    // machine only asks less. Every 250 ms, as before, would be 12 or more.
    eventually("3 s since the first attempt", WAIT, || async {
        first.elapsed() >= Duration::from_secs(3)
    })
    .await;
    let attempts = asked() - before;
    assert!((2..=6).contains(&attempts), "{attempts} attempts in 3 s");
}

#[tokio::test]
async fn the_invalidation_log_is_capped_in_size() {
    let redis = RedisServer::start();
    let cache = replica(&redis.url()).await;
    flood_the_log(&redis, 12_000);
    assert!(
        cache
            .invalidate(&"http://api.test/any".parse().unwrap())
            .await
    );
    assert_eq!(redis.cli(&["ZCARD", "inval/invalidation-log"]), "10000");
    // The newest is kept.
    let newest = redis.cli(&["ZRANGE", "inval/invalidation-log", "-1", "-1"]);
    assert!(newest.starts_with("k "), "{newest}");
    assert!(!newest.contains("junk"), "{newest}");
}

#[tokio::test]
async fn a_subscriber_connection_that_silently_drops_messages_is_reconnected_and_caught_up() {
    let cut_off = CutOff::start("http://api.test/jobs/half-open").await;
    let proxy = &cut_off.proxy;
    // PINGs on a healthy subscriber are answered: it is not reconnected (each
    // reconnection subscribes again).
    let pings = proxy.count("PING");
    eventually("A's connections PINGed", WAIT, || async {
        proxy.count("PING") >= pings + 20
    })
    .await;
    assert_eq!(proxy.count("SUBSCRIBE"), 1, "{:?}", proxy.command_counts());
    // A's connections stay open, but what they carry is lost: Redis still counts A's
    // subscriber and sends it B's message, which never arrives.
    proxy.set(Fault::Discard);
    assert!(cut_off.b.invalidate(&cut_off.gone.parse().unwrap()).await);
    // Only PINGs going unanswered show that A's subscriber is cut off.
    eventually("A's subscriber reconnected away", WAIT, || async {
        subscribers(&cut_off.redis).ends_with('1')
    })
    .await;
    cut_off.lift_and_expect_caught_up().await;
}

#[tokio::test]
async fn invalidate_reaches_redis_and_beats_a_fill_in_flight() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let origin = Origin::new();
    let app = |cache: &HybridCache| origin.behind(cache);
    let url = "http://api.test/report?gate=1";
    let fill = tokio::spawn(call(app(&a), get_request(url)));
    eventually("the origin call", WAIT, || async {
        origin.log.calls() == 1
    })
    .await;
    assert!(a.invalidate(&url.parse().unwrap()).await);
    origin.gate.add_permits(2);
    fill.await.unwrap();
    // Whatever A's writer does with the late fill, Redis ends up without the entry:
    // B misses and calls the origin itself.
    let from_b = call(app(&b), get_request(url)).await;
    assert!(!from_b.is_hit(), "{}", from_b.cache_status());
    assert_eq!(origin.log.calls(), 2);
}

#[tokio::test]
async fn a_fill_on_another_replica_cannot_resurrect_an_invalidated_entry() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let origin = Origin::new();
    let app = |cache: &HybridCache| origin.behind(cache);
    for (url, by_tag) in [
        ("http://api.test/feed?gate=1", false),
        ("http://api.test/tagged?gate=1&h=cache-tag:feed", true),
    ] {
        let calls = origin.log.calls();
        let before = b.stats();
        // B's fill is at the origin when A invalidates.
        let fill = tokio::spawn(call(app(&b), get_request(url)));
        eventually("B at the origin", WAIT, || async {
            origin.log.calls() == calls + 1
        })
        .await;
        if by_tag {
            assert!(a.invalidate_tag("feed").await);
        } else {
            assert!(a.invalidate(&url.parse().unwrap()).await);
        }
        origin.gate.add_permits(2);
        fill.await.unwrap();
        eventually("B's store", WAIT, || async {
            b.stats().stores > before.stores
        })
        .await;
        // B's writer is first in, first out: once a later write reached Redis, B's
        // entry was written or found superseded.
        b.set(&format!("sentinel:{url}"), &1_u8, Duration::from_secs(60))
            .await
            .unwrap();
        eventually("B's writer past the entry", WAIT, || async {
            b.stats().redis_writes > before.redis_writes
        })
        .await;
        // Redis never got B's stale response: A misses, and so does B (Redis first).
        let from_a = call(app(&a), get_request(url)).await;
        assert!(!from_a.is_hit(), "{url}: {}", from_a.cache_status());
        // Nor is its value left staged: the write script deletes what it does not
        // rename into place.
        let staged = redis.cli(&["--scan", "--pattern", "*/staging:*"]);
        assert!(
            staged.trim().is_empty(),
            "{url}: staged values left: {staged}"
        );
    }
}

#[tokio::test]
async fn near_caches_forget_what_another_replica_invalidated() {
    let redis = RedisServer::start();
    let near = || async {
        HybridCache::builder()
            .namespace("near")
            .redis(RedisConfig::new(redis.url()).deadline(Duration::from_millis(500)))
            .near_cache(Duration::from_secs(600))
            .build()
            .await
            .unwrap()
    };
    let (a, b) = (near().await, near().await);
    // Both replicas listen on the namespace's channel.
    eventually("both subscribed", WAIT, || async {
        redis
            .cli(&["PUBSUB", "NUMSUB", "near/invalidations"])
            .lines()
            .nth(1)
            .is_some_and(|n| n.trim() == "2")
    })
    .await;
    let origin = Origin::new();
    let app = |cache: &HybridCache| origin.behind(cache);
    let (app_a, app_b) = (app(&a), app(&b));
    for (url, by_tag) in [
        ("http://api.test/near/1", false),
        ("http://api.test/near/2?h=cache-tag:near", true),
    ] {
        call(app_a.clone(), get_request(url)).await;
        // B fills its memory from Redis, and then reads memory first.
        eventually("B holds it in memory", WAIT, || async {
            call(app_b.clone(), get_request(url))
                .await
                .cache_status()
                .ends_with("detail=memory")
        })
        .await;
        if by_tag {
            assert!(a.invalidate_tag("near").await);
        } else {
            assert!(a.invalidate(&url.parse().unwrap()).await);
        }
        // Without the message B would serve its copy for its 10-minute local TTL.
        eventually("B forgets it", WAIT, || async {
            !call(app_b.clone(), get_request(url)).await.is_hit()
        })
        .await;
    }
}

#[tokio::test]
async fn a_key_invalidation_during_an_outage_is_replayed_when_redis_is_back() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let origin = Origin::new();
    let url = "http://api.test/jobs/replayed";
    call(origin.behind(&a), get_request(url)).await;
    eventually("the entry in Redis", WAIT, || async {
        a.stats().redis_writes == 1
    })
    .await;
    // Frozen, Redis keeps its data but answers nothing.
    redis.freeze();
    assert!(
        !a.invalidate(&url.parse().unwrap()).await,
        "Redis could not take it now"
    );
    eventually("the invalidation kept for Redis", WAIT, || async {
        a.pending_redis_operations() == 1
    })
    .await;
    redis.resume();
    eventually("the replay", WAIT, || async {
        a.pending_redis_operations() == 0 && a.stats().redis_replays >= 1
    })
    .await;
    let from_b = call(origin.behind(&b), get_request(url)).await;
    assert!(
        from_b.cache_status().contains("fwd=uri-miss"),
        "{}",
        from_b.cache_status()
    );
    assert_eq!(origin.log.calls(), 2);
}

#[tokio::test]
async fn a_subscriber_away_longer_than_the_log_reaches_makes_memory_forget_everything() {
    // The log reaches back 7 s: a replica's first catch-up (5 s of clock margin
    // before its start) is within reach; one after a cut of more than 2 s is not.
    const LOG: Duration = Duration::from_secs(7);
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let a = HybridCache::builder()
        .namespace("inval")
        .redis(
            RedisConfig::new(proxy.url())
                .deadline(Duration::from_millis(500))
                .probe_timeout(Duration::from_millis(500))
                .invalidation_ttl(LOG),
        )
        .redis_breaker(
            CircuitBreakerLayer::new().open_for(Duration::from_secs(60), Duration::from_secs(60)),
        )
        .build()
        .await
        .unwrap();
    eventually("A subscribed", WAIT, || async {
        subscribers(&redis).ends_with('1')
    })
    .await;
    let origin = Origin::new();
    let url = "http://api.test/jobs/untouched";
    call(origin.behind(&a), get_request(url)).await;
    eventually("the entry in Redis", WAIT, || async {
        a.stats().redis_writes == 1
    })
    .await;
    proxy.set(Fault::Reset);
    eventually("A's subscription gone", WAIT, || async {
        subscribers(&redis).ends_with('0')
    })
    .await;
    // Longer than the log reaches back: what was invalidated meanwhile cannot be known.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    proxy.set(Fault::None);
    eventually("A subscribed again", WAIT, || async {
        subscribers(&redis).ends_with('1')
    })
    .await;
    eventually("A's connections back", WAIT, || async {
        a.redis_health().unwrap().connected == 4
    })
    .await;
    a.redis_breaker().unwrap().force_open();
    // Nobody invalidated it, but memory cannot tell: it forgot everything.
    eventually("A's memory to forget everything", WAIT, || async {
        !call(origin.behind(&a), get_request(url)).await.is_hit()
    })
    .await;
    assert_eq!(origin.log.calls(), 2);
}
