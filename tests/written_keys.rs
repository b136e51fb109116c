//! `RedisConfig::track_written_keys` against real `redis-server` processes: a lookup of
//! a key no replica wrote skips Redis; a key another replica wrote (announced, or
//! found by the scan of a replica started later, or written while its subscriber was
//! cut off) is read; junk on the channel, more keys than the set holds and a user not
//! allowed the channel cost reads, never a wrong answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "support/fault_proxy.rs"]
mod fault_proxy;

use std::time::Duration;

use fault_proxy::{Fault, FaultProxy};
use support::redis::RedisServer;
use support::{alive_tasks, call, capabilities_checked, eventually, get, get_with, Origin};
use tower_hybrid_cache::{HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(20);

async fn replica(redis_url: &str, max_keys: Option<usize>) -> HybridCache {
    let mut config = RedisConfig::new(redis_url)
        .command_timeout(Duration::from_millis(200))
        .deadline(Duration::from_millis(200))
        .probe_interval(Duration::from_millis(50))
        .probe_timeout(Duration::from_millis(50));
    if let Some(max_keys) = max_keys {
        config = config.track_written_keys(max_keys);
    }
    HybridCache::builder()
        .namespace("jobs")
        .redis(config)
        .build()
        .await
        .unwrap()
}

/// Makes the user `noscripts` (password `pw`): every command but `EVAL` and
/// `EVALSHA`, on the namespace's keys and every channel.
fn no_scripts_user(redis: &RedisServer) {
    let made = redis.cli(&[
        "ACL",
        "SETUSER",
        "noscripts",
        "on",
        ">pw",
        "~jobs/*",
        "&*",
        "+@all",
        "-eval",
        "-evalsha",
    ]);
    assert_eq!(made, "OK");
}

/// Waits until `cache`'s set of written keys is complete (or, with `false`, not).
async fn written_keys_complete(cache: &HybridCache, complete: bool) {
    eventually("the written keys' set", WAIT, || async {
        cache
            .redis_health()
            .is_some_and(|h| h.written_keys_complete == Some(complete))
    })
    .await;
}

fn app(origin: &Origin, cache: &HybridCache) -> axum::Router {
    origin
        .router()
        .layer(cache.layer().ttl(Duration::from_secs(60)))
}

/// Asks `cache` for `url` without letting it call the origin: what it holds, or 504.
async fn only_if_cached(origin: &Origin, cache: &HybridCache, url: &str) -> support::Got {
    call(
        app(origin, cache),
        get_with(url, &[("cache-control", "only-if-cached")]),
    )
    .await
}

/// Asks `cache` for `url` (only if cached) until it is a hit, within `WAIT`.
async fn hit_eventually(origin: &Origin, cache: &HybridCache, url: &str) -> support::Got {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = only_if_cached(origin, cache, url).await;
        if got.is_hit() {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never a hit: {}",
            got.cache_status()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stores `url` through `cache` and waits until Redis has it.
async fn store(origin: &Origin, cache: &HybridCache, url: &str) -> support::Got {
    let written = cache.stats().redis_writes;
    let got = call(app(origin, cache), get(url)).await;
    assert!(
        got.cache_status().contains("stored"),
        "{}",
        got.cache_status()
    );
    eventually("the write to reach Redis", WAIT, || async {
        cache.stats().redis_writes > written
    })
    .await;
    got
}

#[tokio::test]
async fn a_key_no_replica_wrote_is_a_miss_without_a_redis_read() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url(), Some(1000)).await;
    capabilities_checked(&cache, WAIT).await;
    written_keys_complete(&cache, true).await;
    let gets = redis.command_stat("get", "calls");
    for n in 0..5 {
        // Not stored: no write script (whose mark reads are GETs) runs after it.
        let url = format!("http://api.test/jobs/{n}?h=cache-control:no-store");
        let got = call(app(&origin, &cache), get(&url)).await;
        assert!(
            got.cache_status().contains("fwd=uri-miss"),
            "{}",
            got.cache_status()
        );
    }
    assert_eq!(cache.stats().redis_reads_skipped, 5);
    assert_eq!(
        redis.command_stat("get", "calls"),
        gets,
        "no GET for unwritten keys"
    );
    assert_eq!(origin.log.calls(), 5);

    // Untracked, every lookup reads.
    let untracked = replica(&redis.url(), None).await;
    capabilities_checked(&untracked, WAIT).await;
    assert_eq!(
        untracked.redis_health().unwrap().written_keys_complete,
        None
    );
    let gets = redis.command_stat("get", "calls");
    call(
        app(&origin, &untracked),
        get("http://api.test/jobs/9?h=cache-control:no-store"),
    )
    .await;
    assert_eq!(untracked.stats().redis_reads_skipped, 0);
    assert_eq!(redis.command_stat("get", "calls"), gets + 1);
}

#[tokio::test]
async fn a_key_another_replica_wrote_is_read_once_announced() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let (one, two) = (
        replica(&redis.url(), Some(1000)).await,
        replica(&redis.url(), Some(1000)).await,
    );
    written_keys_complete(&one, true).await;
    written_keys_complete(&two, true).await;
    // Inline in the script's arguments, and staged (a large value).
    for url in [
        "http://api.test/jobs/7",
        "http://api.test/jobs/8?size=20000",
    ] {
        let first = store(&origin, &one, url).await;
        let calls = origin.log.calls();
        // Before the announcement arrives, `two` answers 504 without asking Redis.
        let found = hit_eventually(&origin, &two, url).await;
        assert!(
            found.cache_status().ends_with("detail=redis"),
            "{}",
            found.cache_status()
        );
        assert_eq!(found.body, first.body, "{url}");
        assert_eq!(
            origin.log.calls(),
            calls,
            "only-if-cached never calls the origin"
        );
    }
}

#[tokio::test]
async fn a_replica_started_after_a_write_finds_it_by_its_scan() {
    let redis = RedisServer::start();
    no_scripts_user(&redis);
    // Ten thousand more entries than the test writes, so that a scan takes pages.
    let fill = "for i = 1, 10000 do redis.call('SET', 'jobs/v2:' .. \
        redis.sha1hex(tostring(i)) .. '000000000000000000000000', 'x', 'PX', 600000) end";
    redis.cli(&["EVAL", fill, "0"]);
    let origin = Origin::new();
    let one = replica(&redis.url(), Some(100_000)).await;
    let url = "http://api.test/jobs/11";
    let first = store(&origin, &one, url).await;
    // A page a script call where the user may run scripts; a `SCAN` and a pipeline
    // of `PTTL`s where it may not.
    let no_scripts = format!("redis://noscripts:pw@127.0.0.1:{}", redis.port());
    for (user, scripted) in [(redis.url(), true), (no_scripts, false)] {
        let evals = redis.command_stat("eval", "calls");
        let later = replica(&user, Some(100_000)).await;
        written_keys_complete(&later, true).await;
        let scan_evals = redis.command_stat("eval", "calls") - evals;
        if scripted {
            // About forty pages of 250; the capability check's own probe is one call.
            assert!(scan_evals >= 6, "{scan_evals} script calls");
        } else {
            assert_eq!(scan_evals, 0);
        }
        let found = only_if_cached(&origin, &later, url).await;
        assert!(found.is_hit(), "{}", found.cache_status());
        assert_eq!(found.body, first.body);
        // A key nobody wrote is still skipped.
        let none = only_if_cached(&origin, &later, "http://api.test/jobs/12").await;
        assert_eq!(none.status, 504);
        assert_eq!(later.stats().redis_reads_skipped, 1);
        later.shutdown().await;
    }
}

/// Announcements lost while a replica's connections were cut (reset at once, or
/// silently discarding) are made up for by the scan after its subscriber is back.
#[tokio::test]
async fn a_write_announced_while_the_subscriber_was_cut_off_is_found_by_the_next_scan() {
    for fault in [Fault::Reset, Fault::Discard] {
        let redis = RedisServer::start();
        let proxy = FaultProxy::start(redis.port());
        let origin = Origin::new();
        let one = replica(&redis.url(), Some(1000)).await;
        let two = replica(&proxy.url(), Some(1000)).await;
        written_keys_complete(&two, true).await;
        proxy.set(fault.clone());
        written_keys_complete(&two, false).await;
        let url = "http://api.test/jobs/13";
        let first = store(&origin, &one, url).await;
        proxy.set(Fault::None);
        written_keys_complete(&two, true).await;
        // Read (the connection the reads use may take a moment longer to be back),
        // never skipped: the scan found it.
        let skipped = two.stats().redis_reads_skipped;
        let found = hit_eventually(&origin, &two, url).await;
        assert_eq!(found.body, first.body, "{fault:?}");
        assert_eq!(two.stats().redis_reads_skipped, skipped, "{fault:?}");
    }
}

#[tokio::test]
async fn junk_on_the_channel_is_ignored() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url(), Some(1000)).await;
    written_keys_complete(&cache, true).await;
    for junk in [
        "",
        " ",
        "hello",
        "ffffffffffffffff",
        "ffffffffffffffff:",
        "ffffffffffffffff:-1",
        "ffffffffffffffff:99999999999999999999999",
        "fffffffffffffff:1 :1 :: ::::",
    ] {
        redis.cli(&["PUBLISH", "jobs/written", junk]);
    }
    // Over the most an announcement may be, and not text.
    let huge = format!("{}:1 ", "9".repeat(16)).repeat(1 << 15);
    for bytes in [huge.as_bytes(), &[0xff, 0xfe, 0x00, b':']] {
        redis.cli_with_input(&["PUBLISH", "jobs/written"], bytes);
    }
    // The set is still complete, and a key nobody wrote still skipped.
    let announced = "http://api.test/jobs/14";
    let skipped = cache.stats().redis_reads_skipped;
    let miss = only_if_cached(&origin, &cache, announced).await;
    assert_eq!(miss.status, 504);
    assert_eq!(cache.stats().redis_reads_skipped, skipped + 1);
    assert!(cache.redis_health().unwrap().written_keys_complete == Some(true));
}

#[tokio::test]
async fn more_keys_in_redis_than_the_set_holds_read_every_key() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let writer = replica(&redis.url(), None).await;
    let small = replica(&redis.url(), Some(2)).await;
    written_keys_complete(&small, true).await;
    // The writer announces nothing (untracked): `small` learns of its keys only by
    // scanning. `small` holds a key a shard (two spread over 16): its own 17 writes
    // fill one shard twice, and so does every scan after.
    for n in 0..3 {
        store(&origin, &writer, &format!("http://api.test/jobs/2{n}")).await;
    }
    for n in 3..20 {
        store(&origin, &small, &format!("http://api.test/jobs/2{n}")).await;
    }
    written_keys_complete(&small, false).await;
    let skipped = small.stats().redis_reads_skipped;
    for n in 0..20 {
        let found = only_if_cached(&origin, &small, &format!("http://api.test/jobs/2{n}")).await;
        assert!(found.is_hit(), "{n}: {}", found.cache_status());
    }
    assert_eq!(small.stats().redis_reads_skipped, skipped);
    // Scans go on (backing off) and keep finding too many.
    assert_eq!(
        small.redis_health().unwrap().written_keys_complete,
        Some(false)
    );
}

/// A replica whose Redis user may not run scripts writes without the script, and
/// announces its batch in the same pipeline.
#[tokio::test]
async fn a_write_without_the_script_is_announced_too() {
    let redis = RedisServer::start();
    no_scripts_user(&redis);
    let origin = Origin::new();
    let url = format!("redis://noscripts:pw@127.0.0.1:{}", redis.port());
    let writer = replica(&url, Some(1000)).await;
    let reader = replica(&redis.url(), Some(1000)).await;
    written_keys_complete(&writer, true).await;
    written_keys_complete(&reader, true).await;
    let page = "http://api.test/jobs/30";
    let first = store(&origin, &writer, page).await;
    capabilities_checked(&writer, WAIT).await;
    let missing = writer.redis_health().unwrap().missing_commands;
    assert!(missing.iter().any(|c| c == "eval"), "{missing:?}");
    let found = hit_eventually(&origin, &reader, page).await;
    assert_eq!(found.body, first.body);
}

/// A user allowed the invalidations' channel but not the written keys' keeps its
/// invalidations subscribed and reads every key; allowed it later, the probe
/// subscribes and the set completes.
#[tokio::test]
async fn a_user_not_allowed_the_channel_keeps_its_invalidations_and_reads() {
    let redis = RedisServer::start();
    assert_eq!(
        redis.cli(&[
            "ACL",
            "SETUSER",
            "limited",
            "on",
            ">pw",
            "~jobs/*",
            "&jobs/invalidations",
            "+@all",
        ]),
        "OK"
    );
    let origin = Origin::new();
    let url = format!("redis://limited:pw@127.0.0.1:{}", redis.port());
    let cache = replica(&url, Some(1000)).await;
    eventually("the invalidations subscribed", WAIT, || async {
        redis
            .cli(&["PUBSUB", "NUMSUB", "jobs/invalidations"])
            .ends_with('1')
    })
    .await;
    capabilities_checked(&cache, WAIT).await;
    let none = only_if_cached(&origin, &cache, "http://api.test/jobs/40").await;
    assert_eq!(none.status, 504);
    assert_eq!(cache.stats().redis_reads_skipped, 0, "incomplete: read");
    assert_eq!(
        cache.redis_health().unwrap().written_keys_complete,
        Some(false)
    );

    assert_eq!(
        redis.cli(&["ACL", "SETUSER", "limited", "&jobs/written"]),
        "OK"
    );
    written_keys_complete(&cache, true).await;
    only_if_cached(&origin, &cache, "http://api.test/jobs/41").await;
    assert_eq!(cache.stats().redis_reads_skipped, 1);
}

/// A burst of announcements (a pipeline of 1 500 `PUBLISH`es, read by the subscriber
/// at once, under the 2 048 it may be behind by) does not make the listeners fall behind fred's broadcast: an invalidation
/// published after it still finds this replica's memory whole (a listener that fell
/// behind forgets all of memory), and the set stays complete.
#[tokio::test]
async fn a_burst_of_announcements_is_heard_without_falling_behind() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let (one, two) = (
        replica(&redis.url(), Some(100_000)).await,
        replica(&redis.url(), Some(100_000)).await,
    );
    written_keys_complete(&one, true).await;
    store(&origin, &one, "http://api.test/jobs/60").await;
    store(&origin, &one, "http://api.test/jobs/61").await;
    one.run_pending_tasks().await;
    assert_eq!(one.memory_entry_count(), 2);
    let burst: String = (0..1_500_u64)
        .map(|i| {
            let word = format!("{:016x}:60000", i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            format!(
                "*3\r\n$7\r\nPUBLISH\r\n$12\r\njobs/written\r\n${}\r\n{word}\r\n",
                word.len()
            )
        })
        .collect();
    let piped = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "--pipe"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        piped
            .stdin
            .as_ref()
            .unwrap()
            .write_all(burst.as_bytes())
            .unwrap();
    }
    let out = piped.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("replies: 1500"));
    // Published after the burst: heard after it.
    assert!(
        two.invalidate(&"http://api.test/jobs/61".parse().unwrap())
            .await
    );
    eventually("the invalidation heard", WAIT, || async {
        one.run_pending_tasks().await;
        one.memory_entry_count() < 2
    })
    .await;
    assert_eq!(
        one.memory_entry_count(),
        1,
        "memory kept what was not invalidated"
    );
    assert_eq!(
        one.redis_health().unwrap().written_keys_complete,
        Some(true)
    );
}

/// The tracking's tasks (the listener, the scanner waiting for a scan to be asked
/// for) end with the cache, shut down or dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracking_cache_dropped_leaves_no_task_behind() {
    let redis = RedisServer::start();
    let before = alive_tasks();
    for shut_down in [true, false] {
        let cache = replica(&redis.url(), Some(1000)).await;
        written_keys_complete(&cache, true).await;
        if shut_down {
            cache.shutdown().await;
        }
    }
    eventually("every task of the dropped caches ended", WAIT, || async {
        alive_tasks() <= before
    })
    .await;
}
