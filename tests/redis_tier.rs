//! The Redis tier against real `redis-server` processes: entries shared between
//! replicas, Redis-side expiry, garbage under our keys, and Redis down at start or
//! killed under load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::redis::{command_stat_in, RedisServer};
use support::{alive_tasks, call, capabilities_checked, eventually, get, Origin};
use tower_hybrid_cache::{HybridCache, KeyAuthority, RedisConfig};

const WAIT: Duration = Duration::from_secs(15);

async fn replica(redis_url: &str) -> HybridCache {
    HybridCache::builder()
        .namespace("jobs")
        .redis(
            RedisConfig::new(redis_url)
                .command_timeout(Duration::from_millis(200))
                .deadline(Duration::from_millis(200)),
        )
        .build()
        .await
        .unwrap()
}

fn app(origin: &Origin, cache: &HybridCache) -> axum::Router {
    origin
        .router()
        .layer(cache.layer().ttl(Duration::from_secs(60)))
}

#[tokio::test]
async fn a_response_stored_by_one_replica_is_a_redis_hit_on_another() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let (one, two) = (replica(&redis.url()).await, replica(&redis.url()).await);
    // A small value goes to Redis in the write script's arguments; a large one is
    // staged under a name of its own and renamed into place by the script.
    let urls = [
        "http://api.test/jobs/42",
        "http://api.test/jobs/43?size=20000",
    ];
    for (written, url) in (1..).zip(urls) {
        let first = call(app(&origin, &one), get(url)).await;
        assert!(first.cache_status().contains("stored"));
        eventually("the write to reach Redis", WAIT, || async {
            one.stats().redis_writes == written
        })
        .await;

        let second = call(app(&origin, &two), get(url)).await;
        assert_eq!(
            second.cache_status().split("ttl=").next().unwrap(),
            "tower-hybrid-cache; hit; ",
            "{url}"
        );
        assert!(
            second.cache_status().ends_with("detail=redis"),
            "{url}: {}",
            second.cache_status()
        );
        assert_eq!(second.body, first.body, "{url}");
        assert_eq!(origin.log.calls(), usize::try_from(written).unwrap());
    }

    // Stored under the namespace, with Redis's own expiry at the entry's lifetime.
    let keys = redis.cli(&["--scan", "--pattern", "jobs/v2:*"]);
    assert_eq!(keys.lines().count(), urls.len(), "{keys}");
    for key in keys.lines() {
        let pttl: i64 = redis.cli(&["PTTL", key]).parse().unwrap();
        assert!((55_000..=60_000).contains(&pttl), "{key}: PTTL {pttl}");
    }
    // Nothing is left staged.
    let staged = redis.cli(&["--scan", "--pattern", "jobs/staging:*"]);
    assert!(staged.trim().is_empty(), "staged values left: {staged}");
}

#[tokio::test]
async fn garbage_under_our_key_is_a_miss_and_is_overwritten() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url()).await;
    let app = app(&origin, &cache);
    let url = "http://api.test/garbage";
    call(app.clone(), get(url)).await;
    eventually("the write", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    let key = redis.cli(&["--scan", "--pattern", "jobs/v2:*"]);
    for (written, garbage) in [(2, "not an entry"), (3, "{\"json\": true}")] {
        assert_eq!(redis.cli(&["SET", key.trim(), garbage]), "OK");
        let got = call(app.clone(), get(url)).await;
        assert_eq!(got.status, http::StatusCode::OK);
        assert!(
            got.cache_status().contains("fwd=uri-miss"),
            "{}",
            got.cache_status()
        );
        // Overwritten before the next garbage goes in (a lookup waits for this
        // replica's own pending write of the key, which would find the fill).
        eventually("the overwrite", WAIT, || async {
            cache.stats().redis_writes == written
        })
        .await;
    }
    let hit = call(app, get(url)).await;
    assert!(
        hit.cache_status().ends_with("detail=redis"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(origin.log.calls(), 3);
}

#[tokio::test]
async fn redis_down_at_start_serves_from_memory_then_uses_redis_once_up() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let origin = Origin::new();
    // Nothing listens: building must not wait for Redis.
    let cache = tokio::time::timeout(
        Duration::from_secs(5),
        replica(&format!("redis://127.0.0.1:{port}")),
    )
    .await
    .expect("build returns without Redis");
    let app = app(&origin, &cache);
    call(app.clone(), get("http://api.test/before")).await;
    eventually("a store in memory", WAIT, || async {
        cache.stats().stores == 1
    })
    .await;
    let hit = call(app.clone(), get("http://api.test/before")).await;
    assert!(
        hit.cache_status().ends_with("detail=memory"),
        "{}",
        hit.cache_status()
    );
    assert!(cache.stats().redis_errors > 0);

    let redis = RedisServer::start_on(port, &[]);
    // Once fred has reconnected, new entries reach Redis and are read from it.
    eventually("a new entry served from Redis", WAIT, || {
        let app = app.clone();
        async move {
            let url = format!("http://api.test/after/{}", rand_suffix());
            call(app.clone(), get(&url)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            call(app, get(&url))
                .await
                .cache_status()
                .ends_with("detail=redis")
        }
    })
    .await;
    assert!(!redis.cli(&["--scan", "--pattern", "jobs/v2:*"]).is_empty());
}

#[tokio::test]
async fn a_write_made_while_redis_was_away_reaches_it_once_back() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("redis://127.0.0.1:{port}");
    let a = replica(&url).await;
    a.set("matches:7", &vec![42_u32], Duration::from_secs(60))
        .await
        .unwrap();
    eventually("the write kept for later", WAIT, || async {
        a.pending_redis_operations() == 1
    })
    .await;
    let _redis = RedisServer::start_on(port, &[]);
    eventually("the write replayed", WAIT, || async {
        a.pending_redis_operations() == 0 && a.stats().redis_replays == 1
    })
    .await;
    // Another replica, with nothing in memory, finds it in Redis.
    let b = replica(&url).await;
    assert_eq!(b.get::<Vec<u32>>("matches:7").await, Some(vec![42]));
}

#[tokio::test]
async fn redis_killed_under_load_fails_no_request() {
    let mut redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url()).await;
    let app = app(&origin, &cache);
    let urls: Vec<String> = (0..20)
        .map(|i| format!("http://api.test/load/{i}"))
        .collect();
    for url in &urls {
        call(app.clone(), get(url)).await;
    }
    eventually("20 writes", WAIT, || async {
        cache.stats().redis_writes == 20
    })
    .await;
    redis.kill();
    // Every request is answered, from the memory tier the Redis hits warmed.
    for round in 0..3 {
        for url in &urls {
            let got = call(app.clone(), get(url)).await;
            assert_eq!(got.status, http::StatusCode::OK, "round {round}");
            if round > 0 {
                assert!(
                    got.cache_status().ends_with("detail=memory"),
                    "{}",
                    got.cache_status()
                );
            }
        }
    }
    assert!(cache.stats().redis_errors > 0);
    assert_eq!(
        origin.log.calls(),
        20,
        "the memory tier answered during the outage"
    );
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test]
async fn a_frozen_redis_does_not_hang_requests() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url()).await;
    let app = app(&origin, &cache);
    call(app.clone(), get("http://api.test/frozen")).await;
    eventually("the write", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    redis.freeze();
    // With SIGSTOP the connection stays open and nothing answers: each Redis read
    // gives up after its command timeout and the memory tier answers. A hang would
    // trip the guard (which is a bound on a hang, not a measure of speed).
    let requests = async {
        for _ in 0..10 {
            let got = call(app.clone(), get("http://api.test/frozen")).await;
            assert!(
                got.cache_status().ends_with("detail=memory"),
                "{}",
                got.cache_status()
            );
        }
    };
    tokio::time::timeout(Duration::from_secs(30), requests)
        .await
        .expect("no request hangs");
    assert!(cache.stats().redis_errors >= 10);
    redis.resume();
    assert_eq!(origin.log.calls(), 1);
}

#[tokio::test]
async fn each_lookup_costs_redis_one_read_of_the_head_of_what_memory_holds() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let (one, two) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let url = "http://api.test/counted?size=20000";
    let stored = call(app(&origin, &one), get(url)).await;
    eventually("the write", WAIT, || async {
        one.stats().redis_writes == 1
    })
    .await;
    capabilities_checked(&one, WAIT).await;
    capabilities_checked(&two, WAIT).await;
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    // The replica that filled it holds the edition Redis holds: a head a lookup.
    for _ in 0..10 {
        let got = call(app(&origin, &one), get(url)).await;
        assert!(got.cache_status().ends_with("detail=redis"));
        assert_eq!(got.body, stored.body);
    }
    assert_eq!(redis.command_stat("getrange", "calls"), 10);
    assert_eq!(redis.command_stat("get", "calls"), 0);
    assert_eq!(one.stats().redis_head_hits, 10);
    // Another replica reads the value whole once, and its head from then on.
    for _ in 0..10 {
        let got = call(app(&origin, &two), get(url)).await;
        assert!(got.cache_status().ends_with("detail=redis"));
        assert_eq!(got.body, stored.body);
    }
    assert_eq!(redis.command_stat("get", "calls"), 1);
    assert_eq!(redis.command_stat("getrange", "calls"), 19);
    assert_eq!(two.stats().redis_head_hits, 9);
    assert_eq!(origin.log.calls(), 1);
}

/// Fills `count` URLs through `cache` and waits for their writes to reach Redis and
/// for its capability check; answers the URLs and their bodies.
async fn filled(origin: &Origin, cache: &HybridCache, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut stored = Vec::new();
    for n in 0..count {
        let url = format!("http://api.test/batch/{n}?size=3000");
        let response = call(app(origin, cache), get(&url)).await;
        stored.push((url, response.body.to_vec()));
    }
    eventually("the writes", WAIT, || async {
        cache.stats().redis_writes == count as u64
    })
    .await;
    capabilities_checked(cache, WAIT).await;
    stored
}

/// Every URL looked up at once, and what each got; each body checked against what
/// was stored.
async fn at_once(
    origin: &Origin,
    cache: &HybridCache,
    stored: &[(String, Vec<u8>)],
) -> Vec<support::Got> {
    let lookups = stored
        .iter()
        .map(|(url, _)| call(app(origin, cache), get(url)));
    let answers = futures_util::future::join_all(lookups).await;
    for ((url, body), got) in stored.iter().zip(&answers) {
        assert_eq!(got.body.as_ref(), body.as_slice(), "{url}");
    }
    answers
}

/// How many of `answers` came from `tier`.
fn from_tier(answers: &[support::Got], tier: &str) -> usize {
    let detail = format!("detail={tier}");
    answers
        .iter()
        .filter(|got| got.cache_status().ends_with(&detail))
        .count()
}

/// Every URL looked up at once; each answer checked against what was stored, and
/// the tier that answered.
async fn looked_up_at_once(
    origin: &Origin,
    cache: &HybridCache,
    stored: &[(String, Vec<u8>)],
    tier: &str,
) {
    let answers = at_once(origin, cache, stored).await;
    for ((url, _), got) in stored.iter().zip(&answers) {
        assert!(
            got.cache_status().ends_with(&format!("detail={tier}")),
            "{url}: {}",
            got.cache_status()
        );
    }
}

/// Lookups of different keys that arrive while a head read is on its way are read
/// together, by one script call a batch: one `GETRANGE` a lookup still (the script's
/// count in `INFO commandstats`), in far fewer commands, each answer its own key's.
#[tokio::test]
async fn concurrent_lookups_of_different_keys_read_their_heads_in_batches() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url()).await;
    let stored = filled(&origin, &cache, 150).await;
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    looked_up_at_once(&origin, &cache, &stored, "redis").await;
    assert_eq!(cache.stats().redis_head_hits, 150);
    assert_eq!(redis.command_stat("getrange", "calls"), 150);
    let scripts = redis.command_stat("eval", "calls");
    assert!(
        (1..=10).contains(&scripts),
        "150 lookups at once, in {scripts} script calls"
    );
    // Counted apart: every lookup but the first four, which read alone (and any
    // that found fewer on their way again), was read in a batch.
    let batched = cache.stats().redis_reads_batched;
    assert!((100..150).contains(&batched), "{batched} heads batched");
    assert_eq!(cache.stats().redis_errors, 0);
    assert_eq!(origin.log.calls(), 150);
}

/// A few lookups at once read alone: up to four reads of a kind go at once before
/// lookups queue (a batch of one or two keys would cost more than it saves).
#[tokio::test]
async fn four_lookups_at_once_read_alone() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url()).await;
    let stored = filled(&origin, &cache, 4).await;
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    looked_up_at_once(&origin, &cache, &stored, "redis").await;
    assert_eq!(redis.command_stat("getrange", "calls"), 4);
    assert_eq!(redis.command_stat("eval", "calls"), 0);
    assert_eq!(cache.stats().redis_reads_batched, 0);
}

/// A key holding another type (a hash, written by something else) fails its own
/// lookup's head read only (memory answers it): the batch it is in is read again
/// key by key, and every other lookup is a Redis hit.
#[tokio::test]
async fn a_key_of_another_type_in_a_batch_fails_only_its_own_lookup() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url()).await;
    let stored = filled(&origin, &cache, 40).await;
    // Five: the first four lookups read alone, so at least one is in a batch.
    let keys = redis.cli(&["--scan", "--pattern", "jobs/v2:*"]);
    for clobbered in keys.lines().take(5) {
        assert_eq!(redis.cli(&["DEL", clobbered]), "1");
        assert_eq!(redis.cli(&["HSET", clobbered, "not", "ours"]), "1");
    }
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    let answers = at_once(&origin, &cache, &stored).await;
    assert_eq!(
        from_tier(&answers, "redis"),
        35,
        "every lookup but the clobbered keys'"
    );
    assert!(
        redis.command_stat("eval", "calls") >= 1,
        "the batch was tried"
    );
}

/// A Redis that refuses the head script as it runs (the ACL changed since the
/// check): the queued lookups' values are read whole and each gets its own, with no
/// error; from then on lookups read their heads alone.
#[tokio::test]
async fn a_refused_head_script_answers_its_lookups_and_lookups_read_alone_after() {
    let redis = acl_redis(&[("late", "+eval")]);
    let admin = |args: &[&str]| admin(&redis, args);
    let stat = |command: &str, field: &str| {
        command_stat_in(&admin(&["INFO", "commandstats"]), command, field)
    };
    let origin = Origin::new();
    let cache = checked_replica(&format!("redis://late:pw@127.0.0.1:{}", redis.port())).await;
    let stored = filled(&origin, &cache, 100).await;
    assert_eq!(admin(&["ACL", "SETUSER", "late", "-eval"]), "OK");
    looked_up_at_once(&origin, &cache, &stored, "redis").await;
    assert_eq!(cache.stats().redis_errors, 0);
    let refused = stat("eval", "rejected_calls");
    assert!(refused >= 1, "the script was tried and refused");
    looked_up_at_once(&origin, &cache, &stored, "redis").await;
    assert_eq!(stat("eval", "rejected_calls"), refused, "not tried again");
    assert_eq!(cache.stats().redis_errors, 0);
    // The refused batch's values were read one by one: no head came from a script.
    assert_eq!(cache.stats().redis_reads_batched, 0);
    assert_eq!(origin.log.calls(), 100);
}

/// Head batching needs only `EVAL` and `GETRANGE`: an ACL user without `rename`
/// (whose writes go without the write script) still reads the heads of lookups at
/// once in script calls.
#[tokio::test]
async fn an_acl_user_without_rename_still_reads_heads_in_batches() {
    let redis = acl_redis(&[("norename", "-rename")]);
    let admin = |args: &[&str]| admin(&redis, args);
    let origin = Origin::new();
    let cache = checked_replica(&format!("redis://norename:pw@127.0.0.1:{}", redis.port())).await;
    assert_eq!(cache.redis_health().unwrap().missing_commands, ["rename"]);
    let stored = filled(&origin, &cache, 60).await;
    let scripts = command_stat_in(&admin(&["INFO", "commandstats"]), "eval", "calls");
    looked_up_at_once(&origin, &cache, &stored, "redis").await;
    let after = command_stat_in(&admin(&["INFO", "commandstats"]), "eval", "calls");
    assert!(after > scripts, "no head script sent");
    assert!(cache.stats().redis_reads_batched > 0);
    assert_eq!(cache.stats().redis_errors, 0);
}

/// Lookups queued behind a read that a frozen Redis never answers wait no longer
/// than their own bound, are served from memory, and the queue is not left stuck:
/// once Redis is back, lookups at once are Redis hits again.
#[tokio::test]
async fn a_frozen_redis_bounds_queued_head_reads_and_leaves_no_queue_behind() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url()).await;
    let stored = filled(&origin, &cache, 60).await;
    redis.freeze();
    tokio::time::timeout(
        Duration::from_secs(30),
        looked_up_at_once(&origin, &cache, &stored, "memory"),
    )
    .await
    .expect("no lookup hangs");
    redis.resume();
    eventually("Redis hits again", WAIT, || async {
        let answers = at_once(&origin, &cache, &stored).await;
        from_tier(&answers, "redis") == stored.len()
    })
    .await;
    looked_up_at_once(&origin, &cache, &stored, "redis").await;
    assert_eq!(origin.log.calls(), 60);
}

/// A replica whose memory holds none of them reads other replicas' entries whole:
/// lookups that arrive while one such read is on its way are read together, one
/// `MGET` a batch, each answer its own key's value.
#[tokio::test]
async fn concurrent_whole_reads_of_different_keys_go_in_one_mget() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let writer = replica(&redis.url()).await;
    let stored = filled(&origin, &writer, 150).await;
    let reader = checked_replica(&redis.url()).await;
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    looked_up_at_once(&origin, &reader, &stored, "redis").await;
    let (mgets, gets) = (
        redis.command_stat("mget", "calls"),
        redis.command_stat("get", "calls"),
    );
    assert!(
        (1..=10).contains(&mgets),
        "150 whole reads at once, in {mgets} MGETs"
    );
    assert!(gets < 10, "{gets} GETs: one a lookup that read alone");
    let batched = reader.stats().redis_reads_batched;
    assert!((100..150).contains(&batched), "{batched} reads batched");
    assert_eq!(reader.stats().redis_errors, 0);
    assert_eq!(origin.log.calls(), 150);
}

/// Misses at once ask Redis in batches too (an absent key is a nil in the `MGET`'s
/// answer): each is still a miss, its own origin's answer is served and stored.
#[tokio::test]
async fn concurrent_misses_ask_redis_in_batches_and_each_is_stored() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = checked_replica(&redis.url()).await;
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    let urls: Vec<String> = (0..120)
        .map(|n| format!("http://api.test/miss/{n}"))
        .collect();
    let lookups = urls.iter().map(|url| call(app(&origin, &cache), get(url)));
    let answers = futures_util::future::join_all(lookups).await;
    for (n, got) in answers.iter().enumerate() {
        assert!(
            got.text().starts_with(&format!("body of /miss/{n} #")),
            "{n}: {}",
            got.text()
        );
        assert!(!got.is_hit(), "{}", got.cache_status());
    }
    assert!(redis.command_stat("mget", "calls") >= 1, "no MGET sent");
    assert!(cache.stats().redis_reads_batched >= 100);
    assert_eq!(origin.log.calls(), 120);
    eventually("the writes", WAIT, || async {
        cache.stats().redis_writes == 120
    })
    .await;
}

/// Whole reads queued behind one that a frozen Redis never answers wait no longer
/// than their own bound (the origin answers them: memory holds nothing), and the
/// queue is not left stuck: once Redis is back, whole reads at once are Redis hits.
#[tokio::test]
async fn a_frozen_redis_bounds_queued_whole_reads_and_leaves_no_queue_behind() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let writer = replica(&redis.url()).await;
    let stored = filled(&origin, &writer, 120).await;
    let (first, second) = stored.split_at(60);
    let reader = checked_replica(&redis.url()).await;
    redis.freeze();
    let lookups = first
        .iter()
        .map(|(url, _)| call(app(&origin, &reader), get(url)));
    let answers = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(lookups),
    )
    .await
    .expect("no lookup hangs");
    assert_eq!(from_tier(&answers, "redis"), 0);
    redis.resume();
    eventually("Redis hits again", WAIT, || async {
        let got = call(app(&origin, &reader), get(&second[0].0)).await;
        got.cache_status().ends_with("detail=redis")
    })
    .await;
    looked_up_at_once(&origin, &reader, &second[1..], "redis").await;
    assert!(reader.stats().redis_reads_batched > 0);
}

/// A key holding another type, read in a batch, is absent to `MGET`: its lookup
/// misses (the origin answers, and the store writes over it), and every other
/// lookup of the batch is a Redis hit.
#[tokio::test]
async fn a_key_of_another_type_in_a_value_batch_misses_alone() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let writer = replica(&redis.url()).await;
    let stored = filled(&origin, &writer, 40).await;
    let keys = redis.cli(&["--scan", "--pattern", "jobs/v2:*"]);
    // Five: the first four lookups read alone, so at least one is in a batch.
    for clobbered in keys.lines().take(5) {
        assert_eq!(redis.cli(&["DEL", clobbered]), "1");
        assert_eq!(redis.cli(&["HSET", clobbered, "not", "ours"]), "1");
    }
    let reader = checked_replica(&redis.url()).await;
    let lookups = stored
        .iter()
        .map(|(url, _)| call(app(&origin, &reader), get(url)));
    let answers = futures_util::future::join_all(lookups).await;
    assert_eq!(from_tier(&answers, "redis"), 35, "every lookup but five");
    assert!(reader.stats().redis_reads_batched >= 30, "read in batches");
    assert_eq!(
        origin.log.calls(),
        40 + 5,
        "the clobbered keys' origin calls"
    );
}

/// An ACL user whose `MGET` is refused: found by the check, lookups read alone and
/// no `MGET` is sent; refused as it runs (the ACL changed since the check), the
/// queued lookups are read one by one with no error, and `MGET` is not tried again.
#[tokio::test]
async fn a_refused_mget_reads_values_alone() {
    let redis = acl_redis(&[("nomget", "-mget"), ("late", "+mget")]);
    let admin = |args: &[&str]| admin(&redis, args);
    let stat = |command: &str, field: &str| {
        command_stat_in(&admin(&["INFO", "commandstats"]), command, field)
    };
    let origin = Origin::new();
    let writer = checked_replica(&format!("redis://late:pw@127.0.0.1:{}", redis.port())).await;
    let stored = filled(&origin, &writer, 120).await;
    let (first, second) = stored.split_at(60);

    let checked = checked_replica(&format!("redis://nomget:pw@127.0.0.1:{}", redis.port())).await;
    assert!(checked
        .redis_health()
        .unwrap()
        .missing_commands
        .contains(&"mget".to_owned()));
    let rejected = stat("mget", "rejected_calls");
    looked_up_at_once(&origin, &checked, first, "redis").await;
    assert_eq!(stat("mget", "rejected_calls"), rejected, "no MGET tried");
    assert_eq!(checked.stats().redis_errors, 0);

    let late = checked_replica(&format!("redis://late:pw@127.0.0.1:{}", redis.port())).await;
    assert_eq!(admin(&["ACL", "SETUSER", "late", "-mget"]), "OK");
    looked_up_at_once(&origin, &late, first, "redis").await;
    let refused = stat("mget", "rejected_calls");
    assert!(refused > rejected, "the batch was tried and refused");
    assert_eq!(late.stats().redis_errors, 0);
    assert_eq!(late.stats().redis_reads_batched, 0);
    // Entries its memory does not hold yet: read whole again, each alone.
    looked_up_at_once(&origin, &late, second, "redis").await;
    assert_eq!(stat("mget", "rejected_calls"), refused, "not tried again");
    assert_eq!(late.stats().redis_errors, 0);
    assert_eq!(origin.log.calls(), 120);
}

/// What a replica serves is the edition Redis names: another response with the same
/// times and body length is read whole and served, and one under the held edition's
/// name is not read past its head.
#[tokio::test]
async fn a_redis_hit_serves_the_edition_redis_holds() {
    use std::time::SystemTime;
    use tower_hybrid_cache::entry::CachedResponse;

    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url()).await;
    let app = app(&origin, &cache);
    let url = "http://api.test/editions";
    call(app.clone(), get(url)).await;
    eventually("the write", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    let key = redis.cli(&["--scan", "--pattern", "jobs/v2:*"]);
    let key = key.trim();
    let now = SystemTime::now();
    let response = |body: &'static [u8]| {
        CachedResponse::builder(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            bytes::Bytes::from_static(body),
        )
        .stored_at(now)
        .fresh_until(now + Duration::from_secs(60))
        .build()
        .encode()
    };
    let (first, second) = (response(b"first"), response(b"other"));
    // The same times and length; only the editions (bytes 6 to 13) and bodies differ.
    assert_eq!(first.len(), second.len());
    assert_ne!(first[6..14], second[6..14]);
    for (value, body) in [(&first, "first"), (&second, "other")] {
        assert_eq!(redis.cli_with_input(&["SET", key], value), "OK");
        let got = call(app.clone(), get(url)).await;
        assert!(
            got.cache_status().ends_with("detail=redis"),
            "{}",
            got.cache_status()
        );
        assert_eq!(got.text(), body);
    }
    // Other bytes under the edition memory holds: the head says it is memory's.
    let mut renamed = first.to_vec();
    renamed[6..14].copy_from_slice(&second[6..14]);
    assert_eq!(redis.cli_with_input(&["SET", key], &renamed), "OK");
    let got = call(app.clone(), get(url)).await;
    assert_eq!(got.text(), "other");
    assert_eq!(origin.log.calls(), 1);
}

#[tokio::test]
async fn invalidation_marks_holding_garbage_supersede_nothing() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = replica(&redis.url()).await;
    let app = app(&origin, &cache);
    // The purge mark every write reads: another type, then not a number.
    assert_eq!(redis.cli(&["RPUSH", "jobs/purged", "junk"]), "1");
    call(app.clone(), get("http://api.test/marks/1")).await;
    eventually("a write past a mark of another type", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    assert_eq!(redis.cli(&["SET", "jobs/purged", "yesterday"]), "OK");
    call(app, get("http://api.test/marks/2")).await;
    eventually("a write past a mark that is not a time", WAIT, || async {
        cache.stats().redis_writes == 2
    })
    .await;
    let keys = redis.cli(&["--scan", "--pattern", "jobs/v2:*"]);
    assert_eq!(keys.lines().count(), 2, "{keys}");
}

#[tokio::test]
async fn password_and_acl_user_limited_to_the_namespace() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    assert_eq!(
        redis.cli(&[
            "-a",
            "s3cret",
            "--no-auth-warning",
            "ACL",
            "SETUSER",
            "cache",
            "on",
            ">pw",
            "~jobs/*",
            "+get",
            "+set",
            "+del",
            "+ping",
            "+hello",
            "+client",
            "+info",
            "+select",
            "+quit"
        ]),
        "OK"
    );
    let origin = Origin::new();
    for url in [
        format!("redis://:s3cret@127.0.0.1:{}", redis.port()),
        format!("redis://cache:pw@127.0.0.1:{}", redis.port()),
    ] {
        let cache = replica(&url).await;
        let app = app(&origin, &cache);
        let path = format!("http://api.test/auth/{}", url.len());
        call(app.clone(), get(&path)).await;
        eventually("the write", WAIT, || async {
            cache.stats().redis_writes == 1
        })
        .await;
        assert!(call(app, get(&path))
            .await
            .cache_status()
            .ends_with("detail=redis"));
        assert_eq!(cache.stats().redis_errors, 0, "{url}");
        // What the ACL user may not run is reported, not silently lived without.
        eventually("the check", WAIT, || async {
            cache.redis_health().unwrap().server_version.is_some()
        })
        .await;
        let health = cache.redis_health().unwrap();
        let expected: &[&str] = if url.contains("cache:pw") {
            &[
                "getrange",
                "mget",
                "pexpire",
                "exists",
                "rename",
                "pexpire nx|gt (Redis 7)",
                "sadd",
                "smembers",
                "zadd",
                "zmscore",
                "zcount",
                "zcard",
                "zrangebyscore",
                "zremrangebyscore",
                "zremrangebyrank",
                "publish",
                "scan",
                "unlink",
                "eval",
            ]
        } else {
            &[]
        };
        assert_eq!(health.missing_commands, expected, "{url}");
        assert!(
            health
                .server_version
                .as_deref()
                .unwrap()
                .starts_with("redis 7"),
            "{health:?}"
        );
    }
    // A wrong password is not an error of the request: memory serves.
    let cache = replica(&format!("redis://:wrong@127.0.0.1:{}", redis.port())).await;
    let app = app(&origin, &cache);
    call(app.clone(), get("http://api.test/auth/wrong")).await;
    eventually("a store", WAIT, || async { cache.stats().stores == 1 }).await;
    assert!(call(app, get("http://api.test/auth/wrong"))
        .await
        .cache_status()
        .ends_with("detail=memory"));
}

/// A Redis that needs the password `s3cret`, with each user (password `pw`, keys
/// `jobs/*`, every channel) allowed every command and then `rule` (`-rename`).
fn acl_redis(users: &[(&str, &str)]) -> RedisServer {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    for (user, rule) in users {
        let acl = [
            "ACL", "SETUSER", user, "on", ">pw", "~jobs/*", "&*", "+@all", rule,
        ];
        assert_eq!(admin(&redis, &acl), "OK");
    }
    redis
}

/// `redis-cli` as the default user of an [`acl_redis`].
fn admin(redis: &RedisServer, args: &[&str]) -> String {
    let mut full = vec!["-a", "s3cret", "--no-auth-warning"];
    full.extend_from_slice(args);
    redis.cli(&full)
}

/// An ACL user allowed `EVAL` but not a command the write script runs: the script
/// would fail every write. Found by the check, writes go without the script; refused
/// as it runs (the ACL changed since the check), the batch is written again without it.
#[tokio::test]
async fn an_acl_user_without_rename_writes_without_the_script() {
    let redis = acl_redis(&[("norename", "-rename"), ("late", "+rename")]);
    let admin = |args: &[&str]| admin(&redis, args);
    let origin = Origin::new();
    let staged = || admin(&["--scan", "--pattern", "jobs/staging:*"]);

    let cache = checked_replica(&format!("redis://norename:pw@127.0.0.1:{}", redis.port())).await;
    assert_eq!(cache.redis_health().unwrap().missing_commands, ["rename"]);
    stored_in_redis_without_errors(&origin, &cache, "http://api.test/acl/checked").await;
    assert_eq!(staged(), "", "nothing staged");

    let cache = checked_replica(&format!("redis://late:pw@127.0.0.1:{}", redis.port())).await;
    assert!(cache.redis_health().unwrap().missing_commands.is_empty());
    assert_eq!(admin(&["ACL", "SETUSER", "late", "-rename"]), "OK");
    // The script is refused as it runs: the batch is written again without it.
    stored_in_redis_without_errors(&origin, &cache, "http://api.test/acl/late").await;
    // The refused batch's staged value is deleted, not left for its 10 s.
    assert_eq!(staged(), "", "nothing staged");
}

/// An ACL user without `GETRANGE`: found by the check, lookups read values whole;
/// refused as it runs (the ACL changed since the check), the lookup reads the value
/// whole and so do the ones after it. Redis hits either way, no error.
#[tokio::test]
async fn an_acl_user_without_getrange_reads_values_whole() {
    let redis = acl_redis(&[("nogetrange", "-getrange"), ("late", "+getrange")]);
    let admin = |args: &[&str]| admin(&redis, args);
    let origin = Origin::new();
    let url = |user: &str| format!("redis://{user}:pw@127.0.0.1:{}", redis.port());
    // A field of `INFO commandstats`: `calls` ran, `rejected_calls` refused.
    let stat = |command: &str, field: &str| {
        command_stat_in(&admin(&["INFO", "commandstats"]), command, field)
    };

    let cache = checked_replica(&url("nogetrange")).await;
    assert_eq!(cache.redis_health().unwrap().missing_commands, ["getrange"]);
    stored_in_redis_without_errors(&origin, &cache, "http://api.test/acl/whole").await;
    // The check's probe was refused; no lookup tried one.
    assert_eq!(stat("getrange", "rejected_calls"), 1);
    assert_eq!(stat("getrange", "calls"), 0);

    let cache = checked_replica(&url("late")).await;
    assert!(cache.redis_health().unwrap().missing_commands.is_empty());
    let app = app(&origin, &cache);
    let path = "http://api.test/acl/late";
    let stored = call(app.clone(), get(path)).await;
    eventually("the write", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    assert_eq!(admin(&["ACL", "SETUSER", "late", "-getrange"]), "OK");
    let gets = stat("get", "calls");
    for _ in 0..3 {
        let hit = call(app.clone(), get(path)).await;
        assert!(
            hit.cache_status().ends_with("detail=redis"),
            "{}",
            hit.cache_status()
        );
        assert_eq!(hit.body, stored.body);
    }
    assert_eq!(cache.stats().redis_errors, 0);
    // One head read refused (besides the first user's probe), then every lookup
    // reads the value whole.
    assert_eq!(stat("getrange", "rejected_calls"), 2);
    assert_eq!(stat("get", "calls") - gets, 3);
}

/// A replica whose first capability check is done.
async fn checked_replica(redis_url: &str) -> HybridCache {
    let cache = replica(redis_url).await;
    eventually("the check", WAIT, || async {
        cache.redis_health().unwrap().server_version.is_some()
    })
    .await;
    cache
}

/// Asks `url` twice through `cache`: the miss is written to Redis, the second
/// request is a Redis hit, and no Redis operation failed.
async fn stored_in_redis_without_errors(origin: &Origin, cache: &HybridCache, url: &str) {
    let app = app(origin, cache);
    call(app.clone(), get(url)).await;
    eventually("the write", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    let hit = call(app, get(url)).await;
    assert!(
        hit.cache_status().ends_with("detail=redis"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(cache.stats().redis_errors, 0);
}

#[tokio::test]
async fn a_full_redis_fails_writes_not_reads() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let origin = Origin::new();
    let cache = replica(&redis.url()).await;
    let app = app(&origin, &cache);
    call(app.clone(), get("http://api.test/small")).await;
    eventually("the first write", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    // Fill Redis past maxmemory with our own large entries until writes fail.
    let mut i = 0;
    eventually("writes to fail with OOM", WAIT, || {
        i += 1;
        let app = app.clone();
        let cache = cache.clone();
        let url = format!("http://api.test/big/{i}?size=262144");
        async move {
            call(app, get(&url)).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            cache.stats().redis_errors > 0
        }
    })
    .await;
    // Reads of what Redis holds still work, and error replies do not trip the
    // breaker: Redis is up, only full.
    let hit = call(app, get("http://api.test/small")).await;
    assert!(
        hit.cache_status().ends_with("detail=redis"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(
        cache.redis_breaker().unwrap().state(),
        tower_hybrid_cache::breaker::BreakerState::Closed
    );
}

#[tokio::test]
async fn health_follows_a_kill_and_a_restart() {
    let mut redis = RedisServer::start();
    let cache = HybridCache::builder()
        .redis(RedisConfig::new(redis.url()).pool_size(3))
        .build()
        .await
        .unwrap();
    let health = cache.redis_health().unwrap();
    assert_eq!((health.connected, health.clients), (3, 3));
    assert!(health.up_since.is_some());

    redis.kill();
    eventually("every connection marked down", WAIT, || async {
        let health = cache.redis_health().unwrap();
        health.connected == 0 && health.up_since.is_none() && health.last_error.is_some()
    })
    .await;
    // With no healthy connection the tier fails at once, without asking Redis.
    cache
        .set("k", &1_u8, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get::<u8>("k").await, Some(1), "served from memory");

    redis.restart();
    eventually("every connection back up", WAIT, || async {
        cache.redis_health().unwrap().connected == 3
    })
    .await;
    cache
        .set("after", &2_u8, Duration::from_secs(60))
        .await
        .unwrap();
    eventually("the write to reach Redis", WAIT, || async {
        !redis.cli(&["--scan", "--pattern", "thc/v2:*"]).is_empty()
    })
    .await;
}

#[tokio::test]
async fn the_probe_finds_a_frozen_redis_and_its_return() {
    let redis = RedisServer::start();
    let cache = HybridCache::builder()
        .redis(
            RedisConfig::new(redis.url())
                .pool_size(2)
                .probe_interval(Duration::from_millis(50))
                .probe_timeout(Duration::from_millis(50)),
        )
        .build()
        .await
        .unwrap();
    assert_eq!(cache.redis_health().unwrap().connected, 2);
    redis.freeze();
    eventually("the frozen connections marked down", WAIT, || async {
        cache.redis_health().unwrap().connected == 0
    })
    .await;
    let errors_before = cache.stats().redis_errors;
    cache
        .set("frozen", &3_u8, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get::<u8>("frozen").await, Some(3));
    assert!(
        cache.stats().redis_errors > errors_before,
        "the read failed (no healthy connection)"
    );
    redis.resume();
    eventually("the connections back up", WAIT, || async {
        cache.redis_health().unwrap().connected == 2
    })
    .await;
}

#[tokio::test]
async fn a_memory_only_cache_has_no_redis_health() {
    let cache = HybridCache::builder().build().await.unwrap();
    assert!(cache.redis_health().is_none());
}

#[tokio::test]
async fn near_cache_reads_memory_first_with_bounded_staleness() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let writer = replica(&redis.url()).await;
    let near = HybridCache::builder()
        .namespace("jobs")
        .redis_url(redis.url())
        .near_cache(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let url = "http://api.test/near";
    call(app(&origin, &writer), get(url)).await;
    eventually("the write", WAIT, || async {
        writer.stats().redis_writes == 1
    })
    .await;

    let near_app = app(&origin, &near);
    let first = call(near_app.clone(), get(url)).await;
    assert!(
        first.cache_status().ends_with("detail=redis"),
        "{}",
        first.cache_status()
    );
    capabilities_checked(&writer, WAIT).await;
    capabilities_checked(&near, WAIT).await;
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    let again = call(near_app.clone(), get(url)).await;
    assert!(
        again.cache_status().ends_with("detail=memory"),
        "{}",
        again.cache_status()
    );
    assert!(
        !redis
            .cli(&["INFO", "commandstats"])
            .contains("cmdstat_get:"),
        "no Redis read"
    );

    // Deleted in Redis: the near cache may serve it only until its local TTL ends.
    let key = redis.cli(&["--scan", "--pattern", "jobs/v2:*"]);
    assert_eq!(redis.cli(&["DEL", key.trim()]), "1");
    eventually("the local copy to expire", WAIT, || {
        let near_app = near_app.clone();
        async move {
            call(near_app, get(url))
                .await
                .cache_status()
                .contains("fwd=uri-miss")
        }
    })
    .await;
}

#[tokio::test]
async fn invalid_redis_settings_are_clear_errors_not_panics() {
    for (config, what) in [
        (RedisConfig::new("not a url"), "redis url"),
        (
            RedisConfig::new("redis://127.0.0.1:1").command_timeout(Duration::ZERO),
            "command_timeout",
        ),
        (
            RedisConfig::new("redis://127.0.0.1:1").probe_interval(Duration::ZERO),
            "probe_interval",
        ),
        (
            RedisConfig::new("redis://127.0.0.1:1")
                .pool_size(0)
                .connect_timeout(Duration::ZERO),
            "connect_timeout",
        ),
        (
            RedisConfig::new("redis://127.0.0.1:1")
                .reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1)),
            "reconnect_backoff",
        ),
    ] {
        let err = HybridCache::builder()
            .redis(config)
            .build()
            .await
            .unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
    // A pool size of 0 is read as 1, not an error.
    let cache = HybridCache::builder()
        .redis(
            RedisConfig::new("redis://127.0.0.1:1")
                .pool_size(0)
                .connect_timeout(Duration::from_millis(10)),
        )
        .build()
        .await
        .unwrap();
    assert_eq!(cache.redis_health().unwrap().clients, 1);
}

#[tokio::test]
async fn a_full_write_queue_drops_and_counts_instead_of_blocking() {
    let redis = RedisServer::start();
    let cache = HybridCache::builder()
        .redis(
            RedisConfig::new(redis.url())
                .write_queue(2)
                .command_timeout(Duration::from_secs(2))
                // No probe during the test: the writer must find Redis "up" and wait.
                .probe_interval(Duration::from_secs(3600)),
        )
        .build()
        .await
        .unwrap();
    redis.freeze();
    // The writer takes the first batch and waits on the frozen server; the queue
    // holds two more; the rest are dropped. No `set` waits for any of it.
    let sets = async {
        for i in 0..50 {
            cache
                .set(&format!("k{i}"), &i, Duration::from_secs(60))
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(1), sets)
        .await
        .expect("sets never wait for Redis");
    assert!(
        cache.stats().redis_writes_dropped >= 40,
        "{:?}",
        cache.stats()
    );
    // Memory holds every value regardless (a Redis miss would still win over it once
    // Redis answers: Redis is the shared truth).
    cache.run_pending_tasks().await;
    assert_eq!(cache.memory_entry_count(), 50);
    redis.resume();
}

#[tokio::test]
async fn binary_bodies_and_multi_valued_headers_roundtrip_through_redis() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let (one, two) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let url = "http://api.test/bin?size=70000&h=x-multi:a&h=x-multi:b&h=link:%3C/a%3E;rel%3Dnext&h=content-type:application/octet-stream";
    let first = call(app(&origin, &one), get(url)).await;
    assert_eq!(first.body, support::pattern(70_000));
    eventually("the write", WAIT, || async {
        one.stats().redis_writes == 1
    })
    .await;
    let hit = call(app(&origin, &two), get(url)).await;
    assert!(
        hit.cache_status().ends_with("detail=redis"),
        "{}",
        hit.cache_status()
    );
    assert_eq!(hit.body, first.body, "every byte, non-UTF-8 included");
    let multi: Vec<_> = hit.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"], "both values, in order");
    assert_eq!(hit.headers["link"], "</a>;rel=next");
    assert_eq!(hit.headers["content-type"], "application/octet-stream");
}

#[tokio::test]
async fn the_breaker_opens_on_timeouts_and_closes_after_a_probe() {
    use tower_hybrid_cache::breaker::{BreakerState, CircuitBreakerLayer};
    let redis = RedisServer::start();
    let cache = HybridCache::builder()
        .redis(
            RedisConfig::new(redis.url())
                .command_timeout(Duration::from_millis(50))
                // Only the breaker reacts here: the probe is out of the way.
                .probe_interval(Duration::from_secs(3600)),
        )
        .redis_breaker(
            CircuitBreakerLayer::new()
                .consecutive_failures(3)
                .open_for(Duration::from_millis(300), Duration::from_secs(5)),
        )
        .build()
        .await
        .unwrap();
    let breaker = cache.redis_breaker().unwrap();
    assert_eq!(breaker.state(), BreakerState::Closed);
    redis.freeze();
    for _ in 0..3 {
        assert_eq!(cache.get::<u8>("absent").await, None);
    }
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "three timeouts in a row"
    );
    let errors = cache.stats().redis_errors;
    // While open, reads fail at once without waiting on Redis (still counted).
    assert_eq!(cache.get::<u8>("absent").await, None);
    assert_eq!(cache.stats().redis_errors, errors + 1);
    redis.resume();
    eventually("the probe to close the breaker", WAIT, || async {
        let _ = cache.get::<u8>("absent").await;
        breaker.state() == BreakerState::Closed
    })
    .await;
}

#[tokio::test]
async fn losing_every_connection_opens_the_breaker_at_once() {
    use tower_hybrid_cache::breaker::BreakerState;
    let mut redis = RedisServer::start();
    let cache = replica(&redis.url()).await;
    let breaker = cache.redis_breaker().unwrap();
    redis.kill();
    eventually("the breaker to open", WAIT, || async {
        breaker.state() == BreakerState::Open
    })
    .await;
    redis.restart();
    eventually("the breaker to close again", WAIT, || async {
        let _ = cache.get::<u8>("absent").await;
        breaker.state() == BreakerState::Closed
    })
    .await;
}

#[tokio::test]
async fn one_deadline_bounds_a_read_whatever_the_command_timeout() {
    let redis = RedisServer::start();
    let cache = HybridCache::builder()
        .redis(
            RedisConfig::new(redis.url())
                .command_timeout(Duration::from_secs(5))
                .deadline(Duration::from_millis(30))
                .probe_interval(Duration::from_secs(3600)),
        )
        .build()
        .await
        .unwrap();
    redis.freeze();
    // The frozen server would hold each GET for the 5 s command timeout; the 30 ms
    // deadline cuts it (the guard only catches a hang, it measures nothing).
    let reads = async {
        for _ in 0..3 {
            assert_eq!(cache.get::<u8>("k").await, None);
        }
    };
    tokio::time::timeout(Duration::from_secs(4), reads)
        .await
        .expect("reads cut by the deadline");
    assert_eq!(cache.stats().redis_deadline_hits, 3, "{:?}", cache.stats());
    redis.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_dropped_leaves_no_task_or_connection_behind() {
    let redis = RedisServer::start();
    let before = alive_tasks();
    // Shut down, then dropped; or dropped alone.
    for (i, shut_down) in [(0, true), (1, true), (2, false), (3, false)] {
        let cache = replica(&redis.url()).await;
        let origin = Origin::new();
        call(
            app(&origin, &cache),
            get(&format!("http://api.test/leak/{i}")),
        )
        .await;
        eventually("the entry in Redis", WAIT, || async {
            cache.stats().redis_writes == 1
        })
        .await;
        if shut_down {
            cache.shutdown().await;
        }
    }
    eventually("every task of the dropped caches ended", WAIT, || async {
        alive_tasks() <= before
    })
    .await;
    eventually("every connection closed", WAIT, || async {
        let clients = redis.cli(&["CLIENT", "LIST"]);
        clients.lines().count() == 1 // the query's own
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_whose_redis_never_came_up_stops_reconnecting_once_dropped() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let before = alive_tasks();
    for shut_down in [true, false] {
        let cache = replica(&format!("redis://127.0.0.1:{port}")).await;
        let origin = Origin::new();
        call(app(&origin, &cache), get("http://api.test/never")).await;
        if shut_down {
            cache.shutdown().await;
        }
    }
    eventually("every task of the dropped caches ended", WAIT, || async {
        alive_tasks() <= before
    })
    .await;
}

#[tokio::test]
async fn entries_over_max_value_bytes_stay_in_memory_only() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let cache = HybridCache::builder()
        .namespace("jobs")
        .redis(
            RedisConfig::new(redis.url())
                .deadline(Duration::from_millis(200))
                .max_value_bytes(4096),
        )
        .redis_breaker(
            tower_hybrid_cache::breaker::CircuitBreakerLayer::new()
                .open_for(Duration::from_secs(60), Duration::from_secs(60)),
        )
        .build()
        .await
        .unwrap();
    let app = app(&origin, &cache);
    let big = "http://api.test/big?size=20000";
    call(app.clone(), get(big)).await;
    // Queued after it: once this one is in Redis, the big one would be too, were it
    // sent.
    call(app.clone(), get("http://api.test/small")).await;
    eventually("the small entry in Redis", WAIT, || async {
        cache.stats().redis_writes == 1
    })
    .await;
    let keys = redis.cli(&["--scan", "--pattern", "jobs/v2:*"]);
    assert_eq!(keys.lines().count(), 1, "{keys}");
    assert_eq!(cache.stats().stores, 2);
    // Redis is asked first and has no copy; with Redis out of reach, memory has one.
    cache.redis_breaker().unwrap().force_open();
    let got = call(app.clone(), get(big)).await;
    assert!(
        got.cache_status().ends_with("detail=memory"),
        "{}",
        got.cache_status()
    );
    assert_eq!(got.body.len(), 20000);
    assert_eq!(origin.log.calls(), 2);
}

#[tokio::test]
async fn a_reload_names_why_it_reached_the_origin_after_a_redis_lookup() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let (one, two) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let honour = |cache: &HybridCache| {
        origin.router().layer(
            cache
                .layer()
                .ttl(Duration::from_secs(60))
                .request_directives(tower_hybrid_cache::RequestDirectives::Honour),
        )
    };
    let url = "http://api.test/reload";
    let reload = [("cache-control", "no-cache")];
    let first = call(honour(&one), support::get_with(url, &reload)).await;
    assert!(
        first.cache_status().contains("fwd=uri-miss"),
        "{}",
        first.cache_status()
    );
    eventually("in Redis", WAIT, || async { one.stats().redis_writes >= 1 }).await;
    // The other replica's memory is empty: only Redis knows it is stored.
    let second = call(honour(&two), support::get_with(url, &reload)).await;
    assert!(
        second.cache_status().contains("fwd=request"),
        "{}",
        second.cache_status()
    );
}

/// What a balancer that rewrites `Host` per backend sends each replica.
fn behind_balancer(method: &str, host: &str) -> http::Request<axum::body::Body> {
    http::Request::builder()
        .method(method)
        .uri("/jobs/9")
        .header("host", host)
        .body(axum::body::Body::empty())
        .unwrap()
}

#[tokio::test]
async fn a_fixed_key_authority_shares_entries_across_rewritten_hosts_and_invalidates_them() {
    let redis = RedisServer::start();
    let origin = Origin::new();
    let (one, two) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let routed = |cache: &HybridCache, authority: KeyAuthority| {
        origin.router().layer(
            cache
                .layer()
                .ttl(Duration::from_secs(60))
                .key_authority(authority),
        )
    };
    // Keyed on the request's Host: each backend name its own entry.
    let (a, b) = (
        routed(&one, KeyAuthority::Request),
        routed(&two, KeyAuthority::Request),
    );
    call(a, behind_balancer("GET", "app-1:8080")).await;
    eventually("in Redis", WAIT, || async { one.stats().redis_writes >= 1 }).await;
    let other = call(b, behind_balancer("GET", "app-2:8080")).await;
    assert!(!other.is_hit(), "{}", other.cache_status());
    // Keyed on one authority: shared.
    let fixed = || KeyAuthority::fixed("Jobs.Example.com");
    let (a, b) = (routed(&one, fixed()), routed(&two, fixed()));
    call(a.clone(), behind_balancer("GET", "app-1:8080")).await;
    eventually("in Redis", WAIT, || async { one.stats().redis_writes >= 2 }).await;
    let shared = call(b.clone(), behind_balancer("GET", "app-2:8080")).await;
    assert!(
        shared.cache_status().ends_with("detail=redis"),
        "{}",
        shared.cache_status()
    );
    // A write through the other backend invalidates it for both.
    call(b.clone(), behind_balancer("DELETE", "app-2:8080")).await;
    let after = call(a, behind_balancer("GET", "app-1:8080")).await;
    assert!(!after.is_hit(), "{}", after.cache_status());
    // None: the path alone.
    let (a, b) = (
        routed(&one, KeyAuthority::None),
        routed(&two, KeyAuthority::None),
    );
    call(a, behind_balancer("GET", "app-1:8080")).await;
    eventually("shared with any host", WAIT, || async {
        call(b.clone(), behind_balancer("GET", "app-3:8080"))
            .await
            .is_hit()
    })
    .await;
}

#[tokio::test]
async fn a_replica_s_own_fill_and_refill_are_hits_before_their_writes_reach_redis() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::sync::Semaphore;
    use tower::ServiceExt;
    use tower_hybrid_cache::store::{RedisTierService, StoreOperation, StoreRequest};

    let redis = RedisServer::start();
    // Writes wait at a gate the test opens; reads are counted.
    let gate = Arc::new(Semaphore::new(0));
    let gets = Arc::new(AtomicUsize::new(0));
    let (held, counted) = (Arc::clone(&gate), Arc::clone(&gets));
    let cache = HybridCache::builder()
        .namespace("own-fill")
        .redis(RedisConfig::new(redis.url()).deadline(Duration::from_secs(5)))
        .redis_layer(tower::layer::layer_fn(move |inner: RedisTierService| {
            let (held, counted) = (Arc::clone(&held), Arc::clone(&counted));
            tower::service_fn(move |request: StoreRequest| {
                let (inner, held, counted) =
                    (inner.clone(), Arc::clone(&held), Arc::clone(&counted));
                async move {
                    match request.operation() {
                        // Each write takes a permit for good.
                        StoreOperation::Set => {
                            if let Ok(permit) = held.acquire().await {
                                permit.forget();
                            }
                        }
                        StoreOperation::Get => {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                    inner.oneshot(request).await
                }
            })
        }))
        .build()
        .await
        .unwrap();
    eventually("connected", WAIT, || async {
        cache.redis_health().unwrap().connected > 0
    })
    .await;
    let origin = Origin::new();
    let app = app(&origin, &cache);
    let url = "http://api.test/own";
    let first = call(app.clone(), get(url)).await;
    assert!(first.cache_status().ends_with("stored"));
    eventually("in memory", WAIT, || async { cache.stats().stores >= 1 }).await;
    // A lookup that has read Redis while the write is held; then the write goes.
    let lookup_while_held = || async {
        let before = gets.load(Ordering::SeqCst);
        let lookup = tokio::spawn(call(app.clone(), get(url)));
        eventually("the lookup read Redis", WAIT, || async {
            gets.load(Ordering::SeqCst) > before
        })
        .await;
        gate.add_permits(1);
        lookup.await.unwrap()
    };
    // Redis does not hold it yet: the lookup waits for the write, then finds it.
    let second = lookup_while_held().await;
    assert!(
        second.cache_status().ends_with("detail=redis"),
        "{}",
        second.cache_status()
    );
    assert_eq!(second.body, first.body);
    assert_eq!(origin.log.calls(), 1);

    // A refill (the client asks for `no-cache`) replaces the entry, its write held:
    // a lookup meanwhile finds the replaced version in Redis, and waits for the write
    // rather than serving it.
    let refill = http::Request::get(url)
        .header("cache-control", "no-cache")
        .body(axum::body::Body::empty())
        .unwrap();
    let honouring = origin.router().layer(
        cache
            .layer()
            .ttl(Duration::from_secs(60))
            .request_directives(tower_hybrid_cache::RequestDirectives::Honour),
    );
    let refilled = call(honouring, refill).await;
    assert_ne!(refilled.body, first.body);
    eventually("in memory", WAIT, || async { cache.stats().stores >= 2 }).await;
    let third = lookup_while_held().await;
    assert_eq!(third.body, refilled.body, "{}", third.cache_status());
    assert!(
        third.cache_status().ends_with("detail=redis"),
        "{}",
        third.cache_status()
    );
    assert_eq!(origin.log.calls(), 2);
}
