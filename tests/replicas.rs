//! Two `job_match` processes (the example binary, as a user runs it) on one SQLite
//! database and one Redis: a job posted through one is in a search through the
//! other at once; and each one's `/metrics` shows every metric the README lists
//! moving as it should through a scripted load (Redis frozen and back included).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::process::{example_binary, free_port, listening, Running, TempDatabase};
use support::redis::RedisServer;
use support::{eventually, fetch, send, Got};

const WAIT: Duration = Duration::from_secs(60);

/// One scrape: each sample's value by its name and labels as written.
type Scrape = BTreeMap<String, f64>;

fn parse(text: &str) -> Scrape {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name` (all labels), if it has any.
fn total(scrape: &Scrape, name: &str) -> Option<f64> {
    let samples: Vec<f64> = scrape
        .iter()
        .filter(|(series, _)| {
            series
                .strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        })
        .map(|(_, v)| *v)
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

struct Replica {
    port: u16,
    process: Running,
    /// Where its stderr goes, shown when it fails to start.
    log: std::path::PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Replica {
    fn start(database: &str, redis: &str) -> Self {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("replicas-{}-{port}.log", std::process::id()));
        let stderr = std::fs::File::create(&log).unwrap();
        let process = Command::new(example_binary("job_match"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", database])
            .args(["--redis-url", redis])
            // A breaker that opens after two failures and probes again soon: the
            // frozen-Redis phase below stays short.
            .args(["--breaker-consecutive-failures", "2"])
            .args(["--breaker-open-for", "200ms"])
            // A read of a frozen Redis times out at 30 ms, is retried, and is cut at
            // the 60 ms deadline: retries and deadline hits both move.
            .args(["--redis-command-timeout", "30ms"])
            .args(["--redis-deadline", "60ms"])
            .args(["--redis-retries", "3"])
            .env_remove("ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Replica {
            port,
            process: Running::new(process),
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn get(&self, path: &str) -> Got {
        fetch(&support::client(), "GET", &self.url(path), &[]).await
    }

    async fn post_job(&self, location: &str) -> Got {
        let body = format!(
            r#"{{"title":"Zig wrangler","company":"Acme","location":"{location}","skills":["zig"]}}"#
        );
        let request = http::Request::post(self.url("/jobs"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        send(&support::client(), request).await
    }

    async fn scrape(&self) -> Scrape {
        let got = self.get("/metrics").await;
        assert_eq!(got.status, http::StatusCode::OK);
        parse(&got.text())
    }

    /// Waits until it answers and its Redis capability check ran (its connections
    /// are up).
    async fn ready(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.process.exited() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("job_match exited ({status}) before it was ready:\n{log}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
                && total(
                    &self.scrape().await,
                    "tower_hybrid_cache_redis_missing_commands",
                )
                .is_some()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job_match not ready in {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn total_of(got: &Got) -> u64 {
    let json: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    json["total"].as_u64().unwrap()
}

/// What a metric should have done by the end of the scripted load.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Counted at least once (a histogram: at least one sample).
    Moved,
    /// Never counted in this load (absent, or zero).
    Zero,
    /// A gauge with this value at the end.
    Gauge(f64),
}

/// Every metric the README lists, and what the load below makes of it on the
/// replica that took the writes while Redis was frozen.
const EXPECTED: [(&str, Expect); 29] = [
    ("tower_hybrid_cache_hits_total", Expect::Moved),
    ("tower_hybrid_cache_misses_total", Expect::Moved),
    ("tower_hybrid_cache_bypasses_total", Expect::Moved),
    ("tower_hybrid_cache_stores_total", Expect::Moved),
    // A malformed job id's 400 is not a status a route TTL may store.
    ("tower_hybrid_cache_not_stored_total", Expect::Moved),
    ("tower_hybrid_cache_coalesced_total", Expect::Moved),
    ("tower_hybrid_cache_redis_writes_total", Expect::Moved),
    ("tower_hybrid_cache_redis_errors_total", Expect::Moved),
    (
        "tower_hybrid_cache_redis_writes_dropped_total",
        Expect::Zero,
    ),
    ("tower_hybrid_cache_redis_retries_total", Expect::Moved),
    (
        "tower_hybrid_cache_retry_budget_exhausted_total",
        Expect::Zero,
    ),
    (
        "tower_hybrid_cache_redis_deadline_hits_total",
        Expect::Moved,
    ),
    (
        "tower_hybrid_cache_redis_breaker_rejections_total",
        Expect::Moved,
    ),
    ("tower_hybrid_cache_fallback_hits_total", Expect::Moved),
    ("tower_hybrid_cache_redis_reads_shared_total", Expect::Moved),
    // job_match does not track written keys.
    ("tower_hybrid_cache_redis_reads_skipped_total", Expect::Zero),
    ("tower_hybrid_cache_redis_head_hits_total", Expect::Moved),
    (
        "tower_hybrid_cache_redis_reads_batched_total",
        Expect::Moved,
    ),
    ("tower_hybrid_cache_invalidations_total", Expect::Moved),
    ("tower_hybrid_cache_redis_replays_total", Expect::Moved),
    (
        "tower_hybrid_cache_redis_removals_folded_total",
        Expect::Zero,
    ),
    (
        "tower_hybrid_cache_redis_replays_refused_total",
        Expect::Zero,
    ),
    ("tower_hybrid_cache_redis_reseeds_total", Expect::Zero),
    (
        "tower_hybrid_cache_breaker_transitions_total",
        Expect::Moved,
    ),
    ("tower_hybrid_cache_breaker_state", Expect::Gauge(0.0)),
    (
        "tower_hybrid_cache_redis_missing_commands",
        Expect::Gauge(0.0),
    ),
    ("tower_hybrid_cache_lookup_seconds_count", Expect::Moved),
    (
        "tower_hybrid_cache_invalidation_delay_seconds_count",
        Expect::Moved,
    ),
    // No route of job_match serves stale unless its windows are set: tests/metrics.rs
    // moves it.
    (
        "tower_hybrid_cache_stale_served_seconds_count",
        Expect::Zero,
    ),
];

/// The metric names in the README's metrics table.
fn readme_metrics() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .lines()
        .filter(|line| line.starts_with("| `tower_hybrid_cache_"))
        .filter_map(|line| line.split('`').nth(1).map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn two_replicas_share_one_database_and_one_redis_and_report_every_metric() {
    let redis = RedisServer::start();
    // Declared before the replicas: removed after they are stopped.
    let scratch = TempDatabase::new("replicas");
    let database = scratch.url();
    let mut a = Replica::start(&database, &redis.url());
    let mut b = Replica::start(&database, &redis.url());
    a.ready().await;
    b.ready().await;

    // A write through one replica is in the next read through the other.
    let search = "/jobs/search?q=zig&location=Lisbon";
    let before = b.get(search).await;
    assert_eq!(before.status, http::StatusCode::OK);
    let cached = b.get(search).await;
    assert!(cached.is_hit(), "{}", cached.cache_status());
    let created = a.post_job("Lisbon").await;
    assert_eq!(created.status, http::StatusCode::CREATED);
    let after = b.get(search).await;
    assert!(!after.is_hit(), "{}", after.cache_status());
    assert_eq!(
        total_of(&after),
        total_of(&before) + 1,
        "the job posted through A"
    );
    let through_a = a.get(search).await;
    assert_eq!(total_of(&through_a), total_of(&before) + 1);
    // Again through A: its memory holds the edition Redis holds now, and Redis is
    // asked for the value's head only.
    let again = a.get(search).await;
    assert!(again.is_hit(), "{}", again.cache_status());

    // The rest of the load, on A: a malformed job id (a 400, not stored), concurrent
    // misses of one match list (coalesced, sharing one Redis read).
    let malformed = a.get("/jobs/not-a-number").await;
    assert_eq!(malformed.status, http::StatusCode::BAD_REQUEST);
    assert!(
        malformed.cache_status().ends_with("detail=status"),
        "{}",
        malformed.cache_status()
    );
    let matches: Vec<_> = (0..6)
        .map(|_| {
            let url = a.url("/candidates/3/matches");
            tokio::spawn(async move { fetch(&support::client(), "GET", &url, &[]).await })
        })
        .collect();
    for request in matches {
        assert_eq!(request.await.unwrap().status, http::StatusCode::OK);
    }
    // Hits of different searches at once: heads read while another is on its way
    // go together in one script call (as many bursts as it takes to overlap).
    let searches: Vec<String> = (0..16)
        .map(|i| format!("/jobs/search?q=burst{i}&location=Lisbon"))
        .collect();
    for search in &searches {
        assert_eq!(a.get(search).await.status, http::StatusCode::OK);
    }
    eventually("head reads batched", WAIT, || async {
        let burst: Vec<_> = searches
            .iter()
            .map(|search| {
                let url = a.url(search);
                tokio::spawn(async move { fetch(&support::client(), "GET", &url, &[]).await })
            })
            .collect();
        for request in burst {
            assert_eq!(request.await.unwrap().status, http::StatusCode::OK);
        }
        total(
            &a.scrape().await,
            "tower_hybrid_cache_redis_reads_batched_total",
        )
        .is_some_and(|n| n > 0.0)
    })
    .await;
    // Redis frozen: lookups time out (retried, cut at the deadline), the breaker
    // opens and refuses, memory answers; a write's invalidation is kept.
    redis.freeze();
    for _ in 0..6 {
        let got = a.get("/candidates/3/matches").await;
        assert_eq!(got.status, http::StatusCode::OK);
    }
    assert_eq!(a.post_job("Paris").await.status, http::StatusCode::CREATED);
    redis.resume();
    eventually("the kept invalidation replayed", WAIT, || async {
        total(&a.scrape().await, "tower_hybrid_cache_redis_replays_total").is_some_and(|n| n > 0.0)
    })
    .await;
    eventually("the breaker closed again", WAIT, || async {
        a.get("/jobs/1").await;
        total(&a.scrape().await, "tower_hybrid_cache_breaker_state") == Some(0.0)
    })
    .await;

    let listed = readme_metrics();
    let expected: BTreeSet<String> = EXPECTED
        .iter()
        .map(|(name, _)| name.strip_suffix("_count").unwrap_or(name).to_owned())
        .collect();
    assert_eq!(
        listed, expected,
        "the README's metrics table and this test's list"
    );
    let scrape = a.scrape().await;
    for (name, expect) in EXPECTED {
        let value = total(&scrape, name);
        match expect {
            Expect::Moved => assert!(
                value.is_some_and(|v| v > 0.0),
                "{name} did not move: {value:?}"
            ),
            Expect::Zero => assert!(value.unwrap_or(0.0) == 0.0, "{name} moved: {value:?}"),
            Expect::Gauge(g) => assert_eq!(value, Some(g), "{name}"),
        }
    }
    // Lookups are timed in both tiers (memory answered while Redis was frozen).
    for tier in ["memory", "redis"] {
        let series = format!("tower_hybrid_cache_lookup_seconds_count{{tier=\"{tier}\"}}");
        assert!(scrape.get(&series).is_some_and(|n| *n > 0.0), "{series}");
    }
}

#[tokio::test]
async fn replicas_started_together_on_a_new_database_all_come_up_on_one_seed() {
    let redis = RedisServer::start();
    for round in 0..3 {
        let database = TempDatabase::new(&format!("together-{round}"));
        let url = database.url();
        let mut replicas: Vec<Replica> =
            (0..4).map(|_| Replica::start(&url, &redis.url())).collect();
        for replica in &mut replicas {
            replica.ready().await;
        }
        // One data set: every replica finds the same jobs (seeded once, not twice).
        let totals: Vec<u64> = futures_util::future::join_all(
            replicas
                .iter()
                .map(|r| async { total_of(&r.get("/jobs/search?q=engineer").await) }),
        )
        .await;
        assert!(
            totals.iter().all(|t| *t == totals[0] && *t > 0),
            "round {round}: {totals:?}"
        );
    }
}

#[tokio::test]
async fn the_replicas_script_balances_replicas_that_see_each_others_writes() {
    let (balancer, redis_port) = (free_port(), free_port());
    // The script numbers its replicas' ports from the first: two free in a row.
    let first = loop {
        let port = free_port();
        if std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            break port;
        }
    };
    let work = std::env::temp_dir().join(format!("replicas-script-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let script = Running::group(
        Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/replicas"))
            .arg("2")
            .env("PORT", balancer.to_string())
            .env("REPLICA_PORT", first.to_string())
            .env("REDIS_PORT", redis_port.to_string())
            .env("JOB_MATCH", example_binary("job_match"))
            .env("WORK", &work)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let client = support::client();
    let at = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    eventually("the balancer up", WAIT, || async {
        listening(balancer).await
            && fetch(&client, "GET", &at(balancer, "/healthz"), &[])
                .await
                .status
                == http::StatusCode::OK
    })
    .await;

    // Through the balancer, round robin: searches answered by both replicas.
    let search = "/jobs/search?q=zig&location=Lisbon";
    let replica_of = |got: &Got| got.header("x-replica").unwrap().to_owned();
    let one = fetch(&client, "GET", &at(balancer, search), &[]).await;
    let mut answered = BTreeSet::from([replica_of(&one)]);
    for _ in 0..5 {
        answered.insert(replica_of(
            &fetch(&client, "GET", &at(balancer, search), &[]).await,
        ));
    }
    assert_eq!(
        answered.len(),
        2,
        "both replicas behind the balancer: {answered:?}"
    );
    let before = total_of(&one);
    let request = http::Request::post(at(balancer, "/jobs"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"title":"Zig wrangler","company":"Acme","location":"Lisbon","skills":["zig"]}"#,
        )))
        .unwrap();
    assert_eq!(
        send(&client, request).await.status,
        http::StatusCode::CREATED
    );
    // Each replica, straight and through the balancer, finds the job at once.
    for port in [first, first + 1] {
        let got = fetch(&client, "GET", &at(port, search), &[]).await;
        assert_eq!(total_of(&got), before + 1, "replica on {port}");
    }
    for _ in 0..2 {
        let got = fetch(&client, "GET", &at(balancer, search), &[]).await;
        assert_eq!(total_of(&got), before + 1, "through {}", replica_of(&got));
    }

    // SIGTERM to the script stops everything it started.
    script.terminate();
    for port in [balancer, first, first + 1, redis_port] {
        eventually("everything stopped", WAIT, || async move {
            !listening(port).await
        })
        .await;
    }
    drop(script);
    // What it started may still be writing its last files as it exits: tried again
    // for a while (a cleanup, not a check).
    for _ in 0..50 {
        if std::fs::remove_dir_all(&work).is_ok() || !work.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn on_sigterm_a_replica_finishes_its_requests_in_flight_then_exits() {
    let redis = RedisServer::start();
    let database = TempDatabase::new("drain");
    let mut replica = Replica::start(&database.url(), &redis.url());
    replica.ready().await;
    // A POST whose body is half sent: its handler waits for the rest, so the request
    // is in flight for as long as this test says (the layer counted it on arrival).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = br#"{"title":"Zig wrangler","company":"Acme","location":"Lisbon","skills":["zig"]}"#;
    let (first, rest) = body.split_at(body.len() / 2);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", replica.port))
        .await
        .unwrap();
    let head = format!(
        "POST /jobs HTTP/1.1\r\nhost: replica\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    eventually("the request in flight", WAIT, || async {
        total(&replica.scrape().await, "tower_hybrid_cache_bypasses_total").is_some()
    })
    .await;
    replica.process.terminate();
    // Still running: the drain waits for the request. (The wait can only make a
    // broken drain pass, never a sound one fail.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        replica.process.exited().is_none(),
        "exited with a request in flight"
    );
    stream.write_all(rest).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "answered, not cut off: {answer}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = replica.process.exited() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still running after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(&replica.log).unwrap();
    assert!(log.contains("job_match stopped"), "{log}");
}
