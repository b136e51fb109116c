//! A replica's invalidation listener that falls behind its subscriber (a burst of
//! messages larger than the subscriber keeps for it) has the invalidation log read
//! back, and forgets what that names, not all of memory. Against a real
//! `redis-server`; the listener is held still by the metrics recorder it reports to
//! (each message it reads records how long it took to arrive), so that the burst
//! piles up behind it whatever the machine's speed. A test binary of its own: the
//! recorder is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "support/fault_proxy.rs"]
mod fault_proxy;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fault_proxy::FaultProxy;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use support::redis::RedisServer;
use support::{call, capabilities_checked, eventually, get as get_request, Origin};
use tower_hybrid_cache::breaker::CircuitBreakerLayer;
use tower_hybrid_cache::{HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(15);

/// Holds whoever records into it while closed.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }

    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }
}

impl HistogramFn for Gate {
    fn record(&self, _value: f64) {
        // Blocking on purpose: the listener waits here. `block_in_place` hands the
        // worker's other tasks (its queue) to another thread meanwhile, so that the
        // subscriber's connection goes on reading.
        tokio::task::block_in_place(|| {
            let closed = self.closed.lock().unwrap();
            let _open = self.opened.wait_while(closed, |closed| *closed).unwrap();
        });
    }
}

/// A recorder that drops everything, except that the invalidation listener's
/// histogram goes through `gate`.
struct GateRecorder(Arc<Gate>);

impl Recorder for GateRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if key.name() == "tower_hybrid_cache_invalidation_delay_seconds" {
            Histogram::from_arc(Arc::clone(&self.0))
        } else {
            Histogram::noop()
        }
    }
}

/// Publishes, in one script, `before` invalidations of tags nothing holds, then one
/// of `tag`, then `after` more, each logged and stamped as a replica does (scored a
/// microsecond apart in the log, as a page of its catch-up holds 1 000): a burst of
/// writes elsewhere.
fn burst_around(redis: &RedisServer, tag: &str, before: usize, after: usize) {
    let script = "local t = redis.call('TIME') \
                  local now = t[1] * 1000 + math.floor(t[2] / 1000) \
                  local total = tonumber(ARGV[1]) + 1 + tonumber(ARGV[2]) \
                  for i = 1, total do \
                    local m = 't burst-' .. i \
                    if i == tonumber(ARGV[1]) + 1 then m = 't ' .. ARGV[3] end \
                    redis.call('ZADD', KEYS[1], now + i / 1000, m) \
                    redis.call('PUBLISH', KEYS[2], '@' .. now .. ' ' .. m) \
                  end \
                  return total";
    let published = redis.cli(&[
        "EVAL",
        script,
        "2",
        "lag/invalidation-log",
        "lag/invalidations",
        &before.to_string(),
        &after.to_string(),
        tag,
    ]);
    assert_eq!(published, (before + 1 + after).to_string());
}

/// Whether every byte sent on a TCP connection to or from one of `ports` on this
/// machine has been read (`/proc/net/tcp`: empty send and receive queues), and
/// Redis holds nothing back for its subscribers (`omem=0`).
fn all_delivered(redis: &RedisServer, ports: &[u16]) -> bool {
    let buffered = redis
        .cli(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .split_whitespace()
        .filter(|field| field.starts_with("omem="))
        .any(|field| field != "omem=0");
    if buffered {
        return false;
    }
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port_of = |address: &str| {
        let hex = address.rsplit(':').next().unwrap();
        u16::from_str_radix(hex, 16).unwrap()
    };
    table.lines().skip(1).all(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, queues) = (fields[1], fields[2], fields[4]);
        let ours = ports.contains(&port_of(local)) || ports.contains(&port_of(remote));
        !ours || queues == "00000000:00000000"
    })
}

// Two workers: one may be held by the listener while the other reads the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_falls_behind_catches_up_from_the_log_and_keeps_the_rest_of_memory() {
    let gate = Arc::new(Gate::default());
    metrics::set_global_recorder(GateRecorder(Arc::clone(&gate))).unwrap();
    let redis = Arc::new(RedisServer::start());
    // Passes everything; counts the replica's commands.
    let proxy = FaultProxy::start(redis.port());
    let cache = HybridCache::builder()
        .namespace("lag")
        .redis(RedisConfig::new(proxy.url()).deadline(Duration::from_millis(500)))
        // Once forced open, it stays open: memory alone answers.
        .redis_breaker(
            CircuitBreakerLayer::new().open_for(Duration::from_secs(60), Duration::from_secs(60)),
        )
        .build()
        .await
        .unwrap();
    let origin = Origin::new();
    let gone = "http://api.test/jobs/behind?h=cache-tag:gone";
    let kept = "http://api.test/jobs/kept?h=cache-tag:kept";
    for url in [gone, kept] {
        call(origin.behind(&cache), get_request(url)).await;
    }
    capabilities_checked(&cache, WAIT).await;
    // Subscribed, and caught up after its first subscription.
    eventually("the first catch-up", WAIT, || async {
        redis
            .cli(&["PUBSUB", "NUMSUB", "lag/invalidations"])
            .ends_with('1')
            && proxy.count("ZCOUNT") == 1
    })
    .await;
    let connections = proxy.connections();
    // The listener is held at the first message it reads while the burst, with the
    // invalidation of `gone` in its middle, reaches the subscriber: more than it
    // keeps (2 048), so `gone`'s message is dropped before the listener reads it.
    gate.close();
    // From a thread of its own: a task of the runtime may be queued behind the held
    // worker until the gate opens.
    let burst = {
        let (gate, redis) = (Arc::clone(&gate), Arc::clone(&redis));
        let ports = [redis.port(), proxy.port()];
        std::thread::spawn(move || {
            burst_around(&redis, "gone", 3_000, 3_000);
            let deadline = std::time::Instant::now() + WAIT;
            let mut delivered = all_delivered(&redis, &ports);
            while !delivered && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                delivered = all_delivered(&redis, &ports);
            }
            gate.open();
            delivered
        })
    };
    let delivered = tokio::task::spawn_blocking(move || burst.join().unwrap())
        .await
        .unwrap();
    assert!(delivered, "the burst never read off every socket");
    // The listener, behind, has the log read back from when it last had read
    // everything: a catch-up, on the same connections (no resubscription).
    eventually("a catch-up after falling behind", WAIT, || async {
        // More than one when it fell behind again before the first was read.
        proxy.count("ZCOUNT") >= 2
    })
    .await;
    assert_eq!(proxy.connections(), connections, "the replica reconnected");
    // Memory alone answers: it forgot `gone` (read back from the log), and kept
    // `kept` (nothing named it).
    cache.redis_breaker().unwrap().force_open();
    eventually("memory to forget the invalidated entry", WAIT, || async {
        !call(origin.behind(&cache), get_request(gone))
            .await
            .is_hit()
    })
    .await;
    let still = call(origin.behind(&cache), get_request(kept)).await;
    assert!(
        still.cache_status().ends_with("detail=memory"),
        "{}",
        still.cache_status()
    );
    assert_eq!(origin.log.calls(), 3);
}
