//! Fault injection against real `redis-server` processes, directly and through a TCP
//! fault proxy: Redis killed, restarted, frozen, black-holed, slow, flapping and out
//! of memory, under load. Each scenario asserts its numbers: no failed request, the
//! breaker's state, the commands Redis saw, and a bound on how long any request waited.
//!
//! About the wait bound: the cache promises that Redis adds at most its deadline (50 ms
//! here) to a request. These tests set the per-command timeout to 5 s, so that only
//! the deadline stands between a sick Redis and a 5 s wait, and check every request
//! against the deadline plus a margin of 950 ms: wide enough for a loaded shared
//! machine, five times short of what a missing deadline would cost. That margin
//! cannot tell one deadline from several: `each_request_waits_one_deadline_not_several`
//! does, with a deadline longer than the margin.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "support/fault_proxy.rs"]
mod fault_proxy;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fault_proxy::{Fault, FaultProxy};
use support::redis::RedisServer;
use support::{call, eventually, get, Origin};
use tower_hybrid_cache::breaker::{BreakerState, CircuitBreakerLayer};
use tower_hybrid_cache::store::{StoreError, StoreErrorKind};
use tower_hybrid_cache::{HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(15);
/// What Redis may add to a request: the default deadline.
const DEADLINE: Duration = Duration::from_millis(50);
/// Scheduling noise on a shared machine; far below the 5 s command timeout.
const MARGIN: Duration = Duration::from_millis(950);
/// Concurrent clients of the load.
const CLIENTS: usize = 8;

/// A config in which only the deadline bounds a Redis call.
fn config(url: &str) -> RedisConfig {
    RedisConfig::new(url)
        .command_timeout(Duration::from_secs(5))
        .deadline(DEADLINE)
}

async fn cache(config: RedisConfig, breaker: CircuitBreakerLayer) -> HybridCache {
    HybridCache::builder()
        .namespace("faults")
        .redis(config)
        .redis_breaker(breaker)
        .build()
        .await
        .unwrap()
}

fn app(origin: &Origin, cache: &HybridCache) -> axum::Router {
    axum::Router::new()
        .fallback_service(origin.router())
        .layer(cache.layer().ttl(Duration::from_secs(300)))
}

fn urls(n: usize) -> Arc<Vec<String>> {
    Arc::new(
        (0..n)
            .map(|i| format!("http://api.test/jobs/{i}"))
            .collect(),
    )
}

/// Stores every URL through `app` and waits until Redis holds them all.
async fn warm(app: &axum::Router, cache: &HybridCache, urls: &[String]) {
    for url in urls {
        assert_eq!(call(app.clone(), get(url)).await.status, 200);
    }
    let n = urls.len() as u64;
    eventually("the entries to reach Redis", WAIT, || async {
        cache.stats().redis_writes >= n
    })
    .await;
}

/// One request as the load saw it.
#[derive(Debug)]
struct Sample {
    took: Duration,
    status: u16,
    cache_status: String,
    /// The body is the one the origin made for this URL.
    right_body: bool,
}

/// `CLIENTS` tasks requesting `urls` round-robin until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

impl Load {
    fn start(app: &axum::Router, urls: &Arc<Vec<String>>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let tasks = (0..CLIENTS)
            .map(|client| {
                let (app, urls) = (app.clone(), Arc::clone(urls));
                let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    let mut i = client;
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let url = &urls[i % urls.len()];
                        let got = call(app.clone(), get(url)).await;
                        let path = url.trim_start_matches("http://api.test");
                        samples.push(Sample {
                            took: started.elapsed(),
                            status: got.status.as_u16(),
                            cache_status: got.cache_status(),
                            right_body: got.text().starts_with(&format!("body of {path} #")),
                        });
                        done.fetch_add(1, Ordering::Relaxed);
                        i += CLIENTS;
                        // A memory hit never waits: without a yield the clients would
                        // keep the workers from the timer (and the test's polling).
                        tokio::task::yield_now().await;
                    }
                    samples
                })
            })
            .collect();
        Load { stop, done, tasks }
    }

    /// Requests answered so far.
    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests were answered.
    async fn run_for(&self, n: u64) {
        let target = self.done() + n;
        eventually("the load to make progress", WAIT, || async {
            self.done() >= target
        })
        .await;
    }

    async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.unwrap());
        }
        all
    }
}

/// Every request answered 200 from the cache, none waiting past the bound.
fn assert_served_within_bound(samples: &[Sample]) {
    assert!(!samples.is_empty());
    let failed: Vec<_> = samples
        .iter()
        .filter(|s| s.status != 200 || !s.right_body)
        .collect();
    assert!(failed.is_empty(), "failed or wrong responses: {failed:?}");
    let slowest = samples.iter().map(|s| s.took).max().unwrap();
    assert!(
        slowest <= DEADLINE + MARGIN,
        "a request waited {slowest:?} (bound {:?})",
        DEADLINE + MARGIN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_then_restarted() {
    let mut redis = RedisServer::start();
    let origin = Origin::new();
    let threshold = 5;
    let cache = cache(
        config(&redis.url()),
        CircuitBreakerLayer::new()
            .consecutive_failures(threshold)
            .open_for(Duration::from_secs(1), Duration::from_secs(1)),
    )
    .await;
    let breaker = cache.redis_breaker().unwrap();
    let app = app(&origin, &cache);
    let urls = urls(40);
    warm(&app, &cache, &urls).await;

    let load = Load::start(&app, &urls);
    load.run_for(200).await;
    let before = cache.stats();
    redis.kill();
    eventually("the breaker to open", WAIT, || async {
        breaker.state() == BreakerState::Open
    })
    .await;
    load.run_for(500).await;
    let during = cache.stats();
    // Calls that went to a dead Redis (or found no connection) before the breaker
    // stopped them: the threshold, plus what the clients had in flight, plus one
    // half-open probe per reopening.
    let failed_calls = (during.redis_errors - before.redis_errors)
        - (during.redis_breaker_rejections - before.redis_breaker_rejections);
    let reopenings = breaker.transitions();
    assert!(
        failed_calls <= u64::from(threshold) + CLIENTS as u64 + reopenings,
        "{failed_calls} calls reached a dead Redis; {during:?}"
    );
    assert!(during.fallback_hits > before.fallback_hits);

    assert_eq!(origin.log.calls(), urls.len(), "memory served the outage");

    // The restarted Redis is empty; when it answers, its miss is the shared truth,
    // so the replicas fill it again from the origin.
    redis.restart();
    let restarted = Instant::now();
    eventually("the breaker to close after a probe", WAIT, || async {
        breaker.state() == BreakerState::Closed
    })
    .await;
    let samples = load.stop().await;
    // Closed within the open duration (1 s) and one probe, once a connection is back
    // (reconnect attempts back off to at most 1 s, plus jitter, while Redis is down).
    let to_close = restarted.elapsed();
    assert!(to_close <= Duration::from_secs(2) + MARGIN, "{to_close:?}");
    assert_served_within_bound(&samples);

    // New entries reach the restarted (empty) Redis.
    let writes = cache.stats().redis_writes;
    call(app.clone(), get("http://api.test/after-restart")).await;
    eventually("a new entry in Redis", WAIT, || async {
        cache.stats().redis_writes > writes
    })
    .await;
    assert!(redis.cli(&["DBSIZE"]).parse::<u64>().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_costs_no_request_more_than_the_deadline() {
    frozen_redis_within_the_deadline(|url| config(url).probe_interval(Duration::from_millis(100)))
        .await;
}

/// With the default command timeout (the deadline), fred's timeout ends a read's
/// first attempt, and the deadline what follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_costs_no_request_more_than_the_deadline_with_default_timeouts() {
    frozen_redis_within_the_deadline(|url| {
        RedisConfig::new(url)
            .deadline(DEADLINE)
            .probe_interval(Duration::from_millis(100))
    })
    .await;
}

async fn frozen_redis_within_the_deadline(config: impl FnOnce(&str) -> RedisConfig) {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = cache(config(&redis.url()), CircuitBreakerLayer::new()).await;
    let breaker = cache.redis_breaker().unwrap();
    let app = app(&origin, &cache);
    let urls = urls(20);
    warm(&app, &cache, &urls).await;

    let load = Load::start(&app, &urls);
    load.run_for(100).await;
    redis.freeze();
    eventually("the breaker to open", WAIT, || async {
        breaker.state() == BreakerState::Open
    })
    .await;
    load.run_for(300).await;
    let samples = load.stop().await;
    redis.resume();
    assert_served_within_bound(&samples);
    let stats = cache.stats();
    assert!(stats.redis_deadline_hits > 0, "{stats:?}");
    assert!(stats.fallback_hits > 0, "{stats:?}");
    assert_eq!(origin.log.calls(), urls.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holing_network_costs_no_request_more_than_the_deadline() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let origin = Origin::new();
    let cache = cache(config(&proxy.url()), CircuitBreakerLayer::new()).await;
    let breaker = cache.redis_breaker().unwrap();
    let app = app(&origin, &cache);
    let urls = urls(20);
    warm(&app, &cache, &urls).await;

    let load = Load::start(&app, &urls);
    load.run_for(100).await;
    proxy.set(Fault::BlackHole);
    eventually("the breaker to open", WAIT, || async {
        breaker.state() == BreakerState::Open
    })
    .await;
    load.run_for(300).await;
    proxy.set(Fault::None);
    // The probe finds the way open again (it forces reconnections through the hole).
    eventually("the breaker to close", WAIT, || async {
        breaker.state() == BreakerState::Closed
    })
    .await;
    load.run_for(100).await;
    let samples = load.stop().await;
    assert_served_within_bound(&samples);
    assert!(cache.stats().redis_deadline_hits > 0);
    assert!(
        samples
            .iter()
            .rev()
            .take(20)
            .any(|s| s.cache_status.ends_with("detail=redis")),
        "Redis serves again"
    );
    assert_eq!(origin.log.calls(), urls.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_trips_the_slow_call_threshold_and_memory_serves() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let origin = Origin::new();
    // Calls succeed but take 40 ms; anything over 10 ms counts as a failure.
    let cache = cache(
        config(&proxy.url()).deadline(Duration::from_millis(500)),
        CircuitBreakerLayer::new()
            .slow_call(Duration::from_millis(10))
            .open_for(Duration::from_secs(30), Duration::from_secs(30)),
    )
    .await;
    let breaker = cache.redis_breaker().unwrap();
    let app = app(&origin, &cache);
    let urls = urls(10);
    warm(&app, &cache, &urls).await;

    proxy.set(Fault::Latency(Duration::from_millis(40)));
    let mut slow = 0;
    while breaker.state() != BreakerState::Open {
        let got = call(app.clone(), get(&urls[slow % urls.len()])).await;
        assert_eq!(got.status, 200);
        slow += 1;
        assert!(slow <= 20, "the breaker stayed {:?}", breaker.state());
    }
    // Open: memory answers, Redis is not asked.
    let gets = proxy.count("GET");
    for url in urls.iter() {
        let got = call(app.clone(), get(url)).await;
        assert_eq!(got.status, 200);
        assert!(got.cache_status().ends_with("detail=memory"));
    }
    assert_eq!(proxy.count("GET"), gets, "no GET while open");
    assert_eq!(origin.log.calls(), urls.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_redis_gets_no_retry_storm_and_fails_no_request() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let origin = Origin::new();
    let cache = cache(
        config(&proxy.url()).retries(2),
        CircuitBreakerLayer::new().open_for(Duration::from_millis(200), Duration::from_secs(1)),
    )
    .await;
    let app = app(&origin, &cache);
    let urls = urls(20);
    warm(&app, &cache, &urls).await;

    let commands = proxy.commands();
    let load = Load::start(&app, &urls);
    let requests = load.done();
    // Down 300 ms, up 300 ms, five times over.
    for _ in 0..5 {
        proxy.set(Fault::Reset);
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.set(Fault::None);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    load.run_for(100).await;
    let samples = load.stop().await;
    let requests = samples.len() as u64 - requests;
    let commands = proxy.commands() - commands;
    assert!(
        commands * 10 <= requests * 12,
        "{commands} commands for {requests} requests: {:?}; {:?}",
        proxy.command_counts(),
        cache.stats()
    );
    assert_served_within_bound(&samples);
    // Nothing refetched but the one refresh per URL after each of the five returns
    // (what was stored before Redis came back may have missed an invalidation).
    assert!(
        origin.log.calls() <= urls.len() * 6,
        "{} origin calls for {} URLs, by URL: {:?}",
        origin.log.calls(),
        urls.len(),
        urls.iter()
            .map(|url| origin
                .log
                .calls_to(url.trim_start_matches("http://api.test")))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_reply_cut_short_is_never_served_corrupted() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let origin = Origin::new();
    let cache = cache(config(&proxy.url()), CircuitBreakerLayer::new()).await;
    let app = app(&origin, &cache);
    let url = "http://api.test/jobs/big?size=20000";
    let first = call(app.clone(), get(url)).await;
    assert_eq!(first.body.len(), 20_000);
    eventually("the entry in Redis", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    // Every connection now closes after 512 bytes of replies: the 20 KB value never
    // arrives whole. This replica holds the edition Redis holds, so the value's head
    // (14 bytes) is all it reads: a Redis hit served from its whole copy.
    proxy.set(Fault::CutAfter(512));
    for _ in 0..5 {
        let got = call(app.clone(), get(url)).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, first.body, "the whole body, from memory's copy");
        assert!(
            got.cache_status().ends_with("detail=redis"),
            "{}",
            got.cache_status()
        );
    }
    assert_eq!(origin.log.calls(), 1);
    // A replica that holds nothing must read the value whole, which never arrives:
    // it answers from the origin, never with what was cut.
    let empty = self::cache(config(&proxy.url()), CircuitBreakerLayer::new()).await;
    let empty_app = self::app(&origin, &empty);
    for _ in 0..5 {
        let got = call(empty_app.clone(), get(url)).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, first.body, "the whole body");
        assert!(
            !got.cache_status().ends_with("detail=redis"),
            "{}",
            got.cache_status()
        );
    }
    assert!(empty.stats().redis_errors >= 1, "{:?}", empty.stats());
    assert!(origin.log.calls() >= 2);
}

/// A cache reaching Redis through `proxy`, making `retries` retries, once every pooled
/// connection is up.
async fn reader_through(proxy: &FaultProxy, retries: u32) -> HybridCache {
    let reader = HybridCache::builder()
        .namespace("faults")
        .redis(config(&proxy.url()).retries(retries))
        .build()
        .await
        .unwrap();
    eventually("every connection up", WAIT, || async {
        reader.redis_health().unwrap().connected == 4
    })
    .await;
    reader
}

#[tokio::test]
async fn a_transient_error_is_retried_on_another_connection() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let writer = HybridCache::builder()
        .namespace("faults")
        .redis_url(redis.url())
        .build()
        .await
        .unwrap();
    writer
        .set("match-list", &vec![42_u32, 7], Duration::from_secs(60))
        .await
        .unwrap();
    eventually("the value in Redis", WAIT, || async {
        writer.stats().redis_writes == 1
    })
    .await;
    // A replica with an empty memory tier: only Redis can answer it.
    let reader = reader_through(&proxy, 3).await;
    let open_before = proxy.connections();
    let gets_before = proxy.senders_of("GET").len();
    proxy.reset_next("GET");
    let found: Option<Vec<u32>> = reader.get("match-list").await;
    assert_eq!(found, Some(vec![42, 7]), "{:?}", reader.stats());
    let stats = reader.stats();
    assert_eq!(stats.redis_retries, 1, "{stats:?}");
    // The GET reset with its connection, then the same GET on another of the pooled
    // connections, open before (not the reset one reconnected).
    let senders = proxy.senders_of("GET");
    let gets = senders.get(gets_before..).unwrap_or_default();
    assert_eq!(gets.len(), 2, "{:?}", proxy.command_counts());
    assert_ne!(gets[0], gets[1], "retried on the connection that was reset");
    assert!(
        gets[1] < open_before,
        "retried on a new connection: {gets:?}"
    );
}

#[tokio::test]
async fn fred_sends_a_command_once_and_leaves_retries_to_the_cache() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let reader = reader_through(&proxy, 0).await;
    let gets_before = proxy.senders_of("GET").len();
    proxy.reset_next("GET");
    assert_eq!(reader.get::<u8>("anything").await, None);
    // The connection comes back; fred, left to itself, would send the GET again on it.
    eventually("the connection back", WAIT, || async {
        reader.redis_health().unwrap().connected == 4
    })
    .await;
    let pings = proxy.count("PING");
    eventually("the connections PINGed since", WAIT, || async {
        proxy.count("PING") >= pings + 8
    })
    .await;
    let gets = proxy.senders_of("GET").len() - gets_before;
    assert_eq!(gets, 1, "{:?}", proxy.command_counts());
    assert_eq!(reader.stats().redis_retries, 0);
}

#[tokio::test]
async fn error_replies_trip_the_breaker_only_when_configured_to() {
    for count_replies in [false, true] {
        let redis =
            RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
        let mut breaker = CircuitBreakerLayer::new().consecutive_failures(3);
        if count_replies {
            breaker = breaker.count_errors_if(|error| {
                error
                    .downcast_ref::<StoreError>()
                    .is_none_or(|e| e.is_outage() || e.kind() == StoreErrorKind::Reply)
            });
        }
        let cache = cache(config(&redis.url()), breaker).await;
        cache
            .set("small", &1_u8, Duration::from_secs(60))
            .await
            .unwrap();
        eventually("the small value in Redis", WAIT, || async {
            cache.stats().redis_writes == 1
        })
        .await;
        // Fill Redis with large values until it refuses them (OOM), then refuse six
        // more.
        let big = "x".repeat(256 * 1024);
        let mut i = 0;
        eventually("writes to fail with OOM", WAIT, || {
            i += 1;
            let (cache, big) = (cache.clone(), big.clone());
            async move {
                let errors = cache.stats().redis_errors;
                cache
                    .set(&format!("fill{i}"), &big, Duration::from_secs(60))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                cache.stats().redis_errors > errors
            }
        })
        .await;
        for i in 0..6 {
            let errors = cache.stats().redis_errors;
            cache
                .set(&format!("big{i}"), &big, Duration::from_secs(60))
                .await
                .unwrap();
            eventually("the write to be refused", WAIT, || async {
                cache.stats().redis_errors > errors
            })
            .await;
        }
        let breaker = cache.redis_breaker().unwrap();
        if count_replies {
            assert_eq!(breaker.state(), BreakerState::Open, "OOM counted");
        } else {
            assert_eq!(
                breaker.state(),
                BreakerState::Closed,
                "OOM is not an outage"
            );
            // Reads keep working from Redis.
            let other = HybridCache::builder()
                .namespace("faults")
                .redis_url(redis.url())
                .build()
                .await
                .unwrap();
            assert_eq!(other.get::<u8>("small").await, Some(1));
        }
    }
}

#[tokio::test]
async fn a_user_layer_sees_every_attempt() {
    use tower::util::MapRequestLayer;
    use tower_hybrid_cache::store::{StoreOperation, StoreRequest};

    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let cache = HybridCache::builder()
        .namespace("faults")
        .redis(config(&proxy.url()).retries(3))
        .redis_layer(MapRequestLayer::new(move |request: StoreRequest| {
            log.lock().unwrap().push(request.operation());
            request
        }))
        .build()
        .await
        .unwrap();
    eventually("every connection up", WAIT, || async {
        cache.redis_health().unwrap().connected == 4
    })
    .await;
    cache
        .set("k", &1_u8, Duration::from_secs(60))
        .await
        .unwrap();
    eventually("the write", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    proxy.reset_next("GET");
    assert_eq!(cache.get::<u8>("k").await, Some(1));
    cache.delete("k").await;
    let seen = seen.lock().unwrap().clone();
    // The write, the GET that was reset and its retry, the delete.
    assert_eq!(seen[0], StoreOperation::Set);
    let gets = seen.iter().filter(|op| **op == StoreOperation::Get).count();
    assert_eq!(gets as u64, 1 + cache.stats().redis_retries, "{seen:?}");
    assert!(gets >= 2, "{seen:?}");
    assert_eq!(seen.last(), Some(&StoreOperation::Delete));
}

/// A cache behind `proxy` that only `deadline` can cut short: its commands, probes
/// and breaker wait seconds for a slow Redis.
async fn patient_cache(proxy: &FaultProxy, deadline: Duration) -> HybridCache {
    cache(
        RedisConfig::new(proxy.url())
            .command_timeout(Duration::from_secs(5))
            .probe_timeout(Duration::from_secs(5))
            .deadline(deadline),
        CircuitBreakerLayer::new().slow_call(Duration::from_secs(5)),
    )
    .await
}

#[tokio::test]
async fn a_hot_key_on_a_slow_redis_costs_two_reads_not_one_per_lookup() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    // A slow Redis, but within every bound: only sharing can save reads here.
    let cache = patient_cache(&proxy, Duration::from_secs(5)).await;
    let origin = Origin::new();
    let app = app(&origin, &cache);
    let url = "http://api.test/jobs/hot";
    warm(&app, &cache, &[url.to_owned()]).await;
    let stored = call(app.clone(), get(url)).await.body;
    proxy.set(Fault::Latency(Duration::from_millis(300)));
    // This replica holds the edition: each read is of the value's head.
    let gets = proxy.count("GETRANGE");
    let lookups: Vec<_> = (0..40)
        .map(|_| tokio::spawn(call(app.clone(), get(url))))
        .collect();
    for lookup in lookups {
        let got = lookup.await.unwrap();
        assert!(
            got.cache_status().ends_with("detail=redis"),
            "{}",
            got.cache_status()
        );
        assert_eq!(got.body, stored);
    }
    // One read on its way when the lookups arrived, one shared by all of them after.
    let reads = proxy.count("GETRANGE") - gets;
    assert!((1..=3).contains(&reads), "{reads} reads for 40 lookups");
    assert!(
        cache.stats().redis_reads_shared >= 37,
        "{:?}",
        cache.stats()
    );
    assert_eq!(origin.log.calls(), 1);
}

#[tokio::test]
async fn a_lookup_waiting_behind_another_read_still_waits_at_most_the_deadline() {
    const SLOW_DEADLINE: Duration = Duration::from_millis(300);
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let cache = patient_cache(&proxy, SLOW_DEADLINE).await;
    let origin = Origin::new();
    let app = app(&origin, &cache);
    let url = "http://api.test/jobs/behind";
    warm(&app, &cache, &[url.to_owned()]).await;
    // Every read takes longer than the deadline: the first lookup's read is cut at
    // the deadline, and the next read (which the others share) starts only then.
    proxy.set(Fault::Latency(Duration::from_secs(2)));
    let lookups: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let got = call(app, get(url)).await;
                (started.elapsed(), got)
            })
        })
        .collect();
    for lookup in lookups {
        let (waited, got) = lookup.await.unwrap();
        assert!(
            got.cache_status().ends_with("detail=memory"),
            "{}",
            got.cache_status()
        );
        // Two deadlines would be 600 ms: each lookup's own bound holds.
        assert!(
            waited < SLOW_DEADLINE + Duration::from_millis(250),
            "waited {waited:?}"
        );
    }
    assert!(
        cache.stats().redis_reads_shared >= 18,
        "{:?}",
        cache.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_waits_one_deadline_not_several() {
    // A deadline longer than the margin: one deadline plus the margin is less than two.
    const LONG_DEADLINE: Duration = Duration::from_secs(1);
    const LONG_MARGIN: Duration = Duration::from_millis(900);
    let redis = RedisServer::start();
    let origin = Origin::new();
    // No probe and a breaker slow to open: each request meets the frozen Redis and
    // only the deadline ends its wait.
    let cache = cache(
        config(&redis.url())
            .deadline(LONG_DEADLINE)
            .probe_interval(Duration::from_secs(3600)),
        CircuitBreakerLayer::new().consecutive_failures(100),
    )
    .await;
    let app = app(&origin, &cache);
    let warm_url = "http://api.test/jobs/warm";
    warm(&app, &cache, &[warm_url.to_owned()]).await;
    redis.freeze();
    let requests = [
        ("a hit memory answers", get(warm_url)),
        ("a miss", get("http://api.test/jobs/cold")),
        (
            "a write that invalidates",
            http::Request::post(warm_url)
                .body(axum::body::Body::empty())
                .unwrap(),
        ),
        ("a miss after the write", get(warm_url)),
    ];
    for (what, request) in requests {
        let started = Instant::now();
        let got = call(app.clone(), request).await;
        let took = started.elapsed();
        assert_eq!(got.status, 200, "{what}");
        assert!(
            took <= LONG_DEADLINE + LONG_MARGIN,
            "{what} waited {took:?}: more than one deadline"
        );
    }
    let stats = cache.stats();
    assert_eq!(stats.redis_deadline_hits, 4, "one deadline each: {stats:?}");
    redis.resume();
}

#[tokio::test]
async fn fallback_max_staleness_bounds_how_long_memory_serves_through_an_outage() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port());
    let bound = Duration::from_secs(2);
    let cache = HybridCache::builder()
        .namespace("faults")
        .redis(config(&proxy.url()))
        .fallback_max_staleness(bound)
        .build()
        .await
        .unwrap();
    let origin = Origin::new();
    let app = app(&origin, &cache);
    let url = "http://api.test/jobs/bounded";
    call(app.clone(), get(url)).await;
    eventually("the fill in Redis", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    proxy.set(Fault::Reset);
    // Redis away: memory serves what it holds, for the bound.
    let first = call(app.clone(), get(url)).await;
    assert!(
        first.is_hit() && first.cache_status().ends_with("detail=memory"),
        "{}",
        first.cache_status()
    );
    assert_eq!(origin.log.calls(), 1);
    // Past the bound (counted from when Redis stopped answering), the origin answers.
    eventually("the copy too long out of touch", WAIT, || async {
        !call(app.clone(), get(url)).await.is_hit()
    })
    .await;
    assert_eq!(origin.log.calls(), 2);
    // The copy it stored is this replica's newest word: served in turn.
    let again = call(app.clone(), get(url)).await;
    assert!(again.is_hit(), "{}", again.cache_status());
    assert_eq!(origin.log.calls(), 2);
}
