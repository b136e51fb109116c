//! Tags (surrogate keys) from a header or the handler's `CacheOverrides`,
//! `invalidate_tag` and `purge_all` in both tiers and across replicas sharing a real
//! `redis-server`, replayed after an outage, and racing a background refresh.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Router};
use http::StatusCode;
use support::redis::RedisServer;
use support::{call, eventually, get as get_request, Origin};
use tower::ServiceExt;
use tower_hybrid_cache::{CacheOverrides, HybridCache, RedisConfig};

const WAIT: Duration = Duration::from_secs(15);

async fn memory_cache() -> HybridCache {
    HybridCache::builder().build().await.unwrap()
}

/// Waits until `url` is a hit through `app`.
async fn stored(app: &Router, url: &str) {
    eventually("the entry stored", WAIT, || async {
        call(app.clone(), get_request(url)).await.is_hit()
    })
    .await;
}

#[tokio::test]
async fn tags_from_the_header_are_stored_hidden_and_invalidated_exactly() {
    let (origin, cache) = (Origin::new(), memory_cache().await);
    let app = origin.behind(&cache);
    let tagged = "http://api.test/jobs/42?h=cache-tag:job:42%20company:7";
    let other = "http://api.test/jobs/43?h=cache-tag:job:43,company:70";
    let first = call(app.clone(), get_request(tagged)).await;
    assert!(
        !first.headers.contains_key("cache-tag"),
        "not for the client"
    );
    stored(&app, tagged).await;
    stored(&app, other).await;
    let hit = call(app.clone(), get_request(tagged)).await;
    assert!(!hit.headers.contains_key("cache-tag"), "not stored either");

    assert!(cache.invalidate_tag("company:7").await);
    assert!(!call(app.clone(), get_request(tagged)).await.is_hit());
    assert!(
        call(app.clone(), get_request(other)).await.is_hit(),
        "company:70 is another tag"
    );
    stored(&app, tagged).await;
    assert!(cache.invalidate_tag("job:43").await);
    assert!(!call(app.clone(), get_request(other)).await.is_hit());
    assert!(call(app.clone(), get_request(tagged)).await.is_hit());
}

#[tokio::test]
async fn a_route_may_keep_the_tag_header_or_name_another() {
    let (origin, cache) = (Origin::new(), memory_cache().await);
    let app = origin.router().layer(
        cache
            .layer()
            .ttl(Duration::from_secs(300))
            .tag_header(http::HeaderName::from_static("surrogate-key"))
            .keep_tag_header(true),
    );
    let url = "http://api.test/k?h=surrogate-key:a%20b";
    let first = call(app.clone(), get_request(url)).await;
    assert_eq!(first.headers["surrogate-key"], "a b");
    stored(&app, url).await;
    assert_eq!(
        call(app.clone(), get_request(url)).await.headers["surrogate-key"],
        "a b"
    );
    cache.invalidate_tag("b").await;
    assert!(!call(app.clone(), get_request(url)).await.is_hit());
}

async fn job() -> (
    Extension<CacheOverrides>,
    [(&'static str, &'static str); 1],
    &'static str,
) {
    let overrides = CacheOverrides::new()
        .ttl(Duration::from_secs(600))
        .tags(["job:1", "company:9"]);
    // The handler's TTL wins over its own header.
    (
        Extension(overrides),
        [("cache-control", "max-age=5")],
        "a job",
    )
}

#[tokio::test]
async fn handler_overrides_set_ttl_and_tags_and_never_leave_the_layer() {
    let cache = memory_cache().await;
    let app = Router::new().route("/jobs/{id}", get(job).layer(cache.layer()));
    let url = "http://api.test/jobs/1";
    let response = app
        .clone()
        .oneshot(
            http::Request::get(url)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.extensions().get::<CacheOverrides>().is_none());
    drop(response);
    stored(&app, url).await;
    let hit = call(app.clone(), get_request(url)).await;
    assert!(hit.ttl().unwrap() > 500, "{}", hit.cache_status());
    cache.invalidate_tag("company:9").await;
    assert!(!call(app.clone(), get_request(url)).await.is_hit());
}

#[tokio::test]
async fn purge_all_forgets_everything() {
    let (origin, cache) = (Origin::new(), memory_cache().await);
    let app = origin.behind(&cache);
    let urls = ["http://api.test/a", "http://api.test/b?h=cache-tag:x"];
    for url in urls {
        call(app.clone(), get_request(url)).await;
        stored(&app, url).await;
    }
    assert!(cache.purge_all().await);
    for url in urls {
        assert!(!call(app.clone(), get_request(url)).await.is_hit());
    }
}

#[tokio::test]
async fn a_tag_invalidation_during_a_background_refresh_wins() {
    let (origin, cache) = (Origin::new(), memory_cache().await);
    let app = origin.router().layer(cache.layer());
    let url = "http://api.test/feed?gate=1&h=cache-tag:feed\
               &h=cache-control:max-age%3D1,%20stale-while-revalidate%3D60";
    origin.gate.add_permits(1);
    call(app.clone(), get_request(url)).await;
    stored(&app, url).await;
    // Once stale, a hit starts the refresh, which waits at the gate.
    eventually("a stale hit", WAIT, || async {
        call(app.clone(), get_request(url))
            .await
            .cache_status()
            .contains("stale-while-revalidate")
    })
    .await;
    eventually("the refresh at the origin", WAIT, || async {
        origin.log.calls() == 2
    })
    .await;
    assert!(cache.invalidate_tag("feed").await);
    origin.gate.add_permits(1);
    // The refresh's response predates the invalidation: it is not stored.
    eventually("the refresh done", WAIT, || async {
        cache.stats().not_stored >= 1
    })
    .await;
    origin.gate.add_permits(1);
    let next = call(app.clone(), get_request(url)).await;
    assert!(!next.is_hit(), "{}", next.cache_status());
    assert_eq!(origin.log.calls(), 3);
}

async fn replica(url: &str) -> HybridCache {
    HybridCache::builder()
        .namespace("tags")
        .redis(
            RedisConfig::new(url)
                .command_timeout(Duration::from_millis(100))
                .deadline(Duration::from_millis(500))
                .probe_interval(Duration::from_millis(50)),
        )
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn tag_invalidation_and_purge_reach_every_replica_through_redis() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let origin = Origin::new();
    let app = |cache: &HybridCache| origin.behind(cache);
    let (app_a, app_b) = (app(&a), app(&b));
    let tagged = "http://api.test/jobs/5?h=cache-tag:company:5";
    let plain = "http://api.test/jobs/6";
    for url in [tagged, plain] {
        call(app_a.clone(), get_request(url)).await;
    }
    eventually("both in Redis", WAIT, || async {
        a.stats().redis_writes >= 2
    })
    .await;
    for url in [tagged, plain] {
        assert!(call(app_b.clone(), get_request(url)).await.is_hit());
    }
    assert!(a.invalidate_tag("company:5").await);
    // B's memory still holds it, but Redis answers first.
    assert!(!call(app_b.clone(), get_request(tagged)).await.is_hit());
    assert!(call(app_b.clone(), get_request(plain)).await.is_hit());

    assert!(a.purge_all().await);
    assert!(!call(app_b.clone(), get_request(plain)).await.is_hit());
    eventually("Redis emptied of the namespace", WAIT, || async {
        redis.cli(&["KEYS", "tags:*"]).split_whitespace().count() <= 2
    })
    .await;
}

#[tokio::test]
async fn a_tag_invalidation_during_an_outage_is_replayed_when_redis_is_back() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let origin = Origin::new();
    let app = |cache: &HybridCache| origin.behind(cache);
    let url = "http://api.test/jobs/8?h=cache-tag:job:8";
    call(app(&a), get_request(url)).await;
    eventually("in Redis", WAIT, || async { a.stats().redis_writes >= 1 }).await;

    // Frozen, Redis keeps its data but answers nothing.
    redis.freeze();
    assert!(
        !a.invalidate_tag("job:8").await,
        "Redis could not take it now"
    );
    assert_eq!(a.pending_redis_operations(), 1);
    redis.resume();
    eventually("the replay", WAIT, || async {
        a.pending_redis_operations() == 0 && a.stats().redis_replays >= 1
    })
    .await;
    let from_b = call(app(&b), get_request(url)).await;
    assert!(!from_b.is_hit(), "{}", from_b.cache_status());
}

#[tokio::test]
async fn the_tag_header_never_reaches_the_client_whatever_the_request() {
    let (origin, cache) = (Origin::new(), memory_cache().await);
    let app = origin.behind(&cache);
    let url = "http://api.test/x?h=cache-tag:secret";
    for (method, range) in [
        ("POST", false),
        ("DELETE", false),
        ("GET", true),
        ("OPTIONS", false),
    ] {
        let mut request = http::Request::builder().method(method).uri(url);
        if range {
            request = request.header("range", "bytes=0-1");
        }
        let got = call(
            app.clone(),
            request.body(axum::body::Body::empty()).unwrap(),
        )
        .await;
        assert!(
            !got.headers.contains_key("cache-tag"),
            "{method} range={range}"
        );
        // A range is looked up (and stored when its origin answers whole).
        assert_eq!(
            got.cache_status().contains("fwd=bypass"),
            !range,
            "{}",
            got.cache_status()
        );
    }
}

#[tokio::test]
async fn without_a_tag_header_tags_come_only_from_the_handler() {
    let (origin, cache) = (Origin::new(), memory_cache().await);
    let app = origin
        .router()
        .layer(cache.layer().ttl(Duration::from_secs(300)).no_tag_header());
    let url = "http://api.test/untagged?h=cache-tag:job:5";
    let first = call(app.clone(), get_request(url)).await;
    // Not a tag header here: an ordinary field, passed on and stored.
    assert_eq!(first.headers["cache-tag"], "job:5");
    stored(&app, url).await;
    assert!(cache.invalidate_tag("job:5").await);
    let hit = call(app.clone(), get_request(url)).await;
    assert!(hit.is_hit(), "{}", hit.cache_status());
    assert_eq!(hit.headers["cache-tag"], "job:5");
}

/// A handler whose overrides ask for storing, over headers that forbid it.
async fn forbidden(
    axum::extract::Path(why): axum::extract::Path<String>,
) -> (Extension<CacheOverrides>, axum::response::Response) {
    let overrides = CacheOverrides::new()
        .ttl(Duration::from_secs(600))
        .stale_while_revalidate(Duration::from_secs(600))
        .tags(["t"]);
    let mut response = axum::response::Response::new(axum::body::Body::from("secret"));
    let (name, value) = match why.as_str() {
        "no-store" => ("cache-control", "no-store"),
        "private" => ("cache-control", "private, max-age=60"),
        _ => ("set-cookie", "session=1"),
    };
    response.headers_mut().insert(name, value.parse().unwrap());
    (Extension(overrides), response)
}

#[tokio::test]
async fn headers_that_forbid_storing_win_over_handler_overrides() {
    let cache = memory_cache().await;
    let app = Router::new().route("/f/{why}", get(forbidden).layer(cache.layer()));
    for why in ["no-store", "private", "set-cookie"] {
        let url = format!("http://api.test/f/{why}");
        for _ in 0..2 {
            let got = call(app.clone(), get_request(&url)).await;
            assert!(
                got.cache_status().ends_with(&format!("detail={why}")),
                "{}",
                got.cache_status()
            );
        }
    }
    assert_eq!(cache.stats().stores, 0);
    assert_eq!(cache.stats().not_stored, 6);
}

/// A GET or POST of `url` as a client of origin `host` sends it.
fn at_host(method: &str, host: &str, path: &str) -> http::Request<axum::body::Body> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(axum::body::Body::empty())
        .unwrap()
}

#[tokio::test]
async fn cache_groups_are_invalidated_across_replicas_within_their_origin() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis.url()).await, replica(&redis.url()).await);
    let origin = Origin::new();
    let (app_a, app_b) = (origin.behind(&a), origin.behind(&b));
    let grouped = "/jobs/1?h=cache-groups:%22jobs%22,%20%22berlin%22";
    let other_group = "/jobs/2?h=cache-groups:%22companies%22";
    for (host, path) in [
        ("api.test", grouped),
        ("api.test", other_group),
        ("other.test", grouped),
    ] {
        call(app_a.clone(), at_host("GET", host, path)).await;
    }
    eventually("in Redis", WAIT, || async { a.stats().redis_writes >= 3 }).await;
    // A write through the other replica names the group to invalidate.
    let write = call(
        app_b.clone(),
        at_host(
            "POST",
            "api.test",
            "/jobs?h=cache-group-invalidation:%22jobs%22",
        ),
    )
    .await;
    assert!(write.status.is_success());
    let hit = |host: &'static str, path: &'static str| {
        let (app_a, app_b) = (app_a.clone(), app_b.clone());
        async move {
            let from_a = call(app_a, at_host("GET", host, path)).await.is_hit();
            let from_b = call(app_b, at_host("GET", host, path)).await.is_hit();
            (from_a, from_b)
        }
    };
    // The group's member is gone for both replicas; another group, and the same
    // group name of another origin, stay.
    assert!(!hit("api.test", grouped).await.0);
    eventually("the refill", WAIT, || async { a.stats().redis_writes >= 4 }).await;
    assert_eq!(hit("api.test", other_group).await, (true, true));
    assert_eq!(hit("other.test", grouped).await, (true, true));
    // Junk in the field invalidates nothing.
    call(
        app_b.clone(),
        at_host(
            "POST",
            "api.test",
            "/jobs?h=cache-group-invalidation:companies,%20(((",
        ),
    )
    .await;
    assert_eq!(hit("api.test", other_group).await, (true, true));
}

/// A replica whose Redis commands outwait a `CLIENT PAUSE` of the test's making.
async fn patient_replica(url: &str) -> HybridCache {
    HybridCache::builder()
        .namespace("tags")
        .redis(
            RedisConfig::new(url)
                .command_timeout(Duration::from_secs(10))
                .deadline(Duration::from_secs(10)),
        )
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn each_entry_of_a_write_run_is_checked_against_its_own_marks() {
    let redis = RedisServer::start();
    let (a, b) = (
        patient_replica(&redis.url()).await,
        patient_replica(&redis.url()).await,
    );
    let origin = Origin::new();
    // A mark on `feed` later than any fill's start: whatever carries the tag is
    // superseded when written. B heard of the invalidation before its fills began,
    // so only the write script can refuse them.
    assert!(a.invalidate_tag("feed").await);
    let mark = redis.cli(&["--scan", "--pattern", "*gonetag:*"]);
    assert_eq!(mark.lines().count(), 1, "{mark}");
    redis.cli(&["SET", mark.trim(), "99999999999999"]);

    // Entries with different counts of marks, side by side in one run of the script;
    // the 20 000-byte ones are staged apart, the others go in the script's arguments.
    let urls = [
        (
            "http://api.test/run/1?gate=1&size=20000&h=cache-tag:x,y",
            true,
        ),
        ("http://api.test/run/2?gate=1&h=cache-tag:feed", false),
        ("http://api.test/run/3?gate=1&h=cache-tag:z", true),
        ("http://api.test/run/4?gate=1", true),
        (
            "http://api.test/run/5?gate=1&size=20000&h=cache-tag:x,feed,z",
            false,
        ),
        ("http://api.test/run/6?gate=1&h=cache-tag:y", true),
    ];
    let fills: Vec<_> = urls
        .iter()
        .map(|(url, _)| tokio::spawn(call(origin.behind(&b), get_request(url))))
        .collect();
    eventually("B's fills at the origin", WAIT, || async {
        origin.log.calls() == urls.len()
    })
    .await;
    // Redis holds every write until unpaused: B's writer waits on a first one while
    // the fills queue theirs behind it.
    redis.cli(&["CLIENT", "PAUSE", "20000", "WRITE"]);
    let before = b.stats();
    b.set("hold", &1_u8, Duration::from_secs(60)).await.unwrap();
    eventually("B's writer held by the pause", WAIT, || async {
        redis
            .cli(&["INFO", "clients"])
            .contains("blocked_clients:1")
    })
    .await;
    origin.gate.add_permits(urls.len());
    for fill in fills {
        fill.await.unwrap();
    }
    eventually("B's fills stored and queued", WAIT, || async {
        b.stats().stores >= before.stores + urls.len() as u64
    })
    .await;
    redis.cli(&["CLIENT", "UNPAUSE"]);
    let written = 1 + urls.iter().filter(|(_, written)| *written).count() as u64;
    eventually("B's writes through", WAIT, || async {
        b.pending_redis_operations() == 0 && b.stats().redis_writes >= before.redis_writes + written
    })
    .await;

    let c = patient_replica(&redis.url()).await;
    origin.gate.add_permits(urls.len());
    for (url, written) in urls {
        let got = call(origin.behind(&c), get_request(url)).await;
        assert_eq!(got.is_hit(), written, "{url}: {}", got.cache_status());
    }
    let staged = redis.cli(&["--scan", "--pattern", "*staging:*"]);
    assert!(staged.trim().is_empty(), "staged values left: {staged}");
    // Each written entry is in its tags' indexes (x: 1, y: 1 and 6, z: 3), indexed
    // with it by the script; a superseded one (2 and 5) is in none, and an index
    // expires.
    let indexes = redis.cli(&["--scan", "--pattern", "tags/tag:*"]);
    let mut sizes = Vec::new();
    for index in indexes.lines() {
        let members = redis.cli(&["SMEMBERS", index]);
        for member in members.lines() {
            assert_eq!(
                redis.cli(&["EXISTS", member]).trim(),
                "1",
                "{index}: {member}"
            );
        }
        sizes.push(members.lines().count());
        let ttl: i64 = redis.cli(&["PTTL", index]).trim().parse().unwrap();
        assert!(ttl > 0, "{index} expires: PTTL {ttl}");
    }
    sizes.sort_unstable();
    assert_eq!(sizes, [1, 1, 2], "{indexes}");

    // The same for the purge's mark, which every entry of a run reads.
    assert!(a.purge_all().await);
    let mark = redis.cli(&["--scan", "--pattern", "*purged"]);
    assert_eq!(mark.lines().count(), 1, "{mark}");
    redis.cli(&["SET", mark.trim(), "99999999999999"]);
    let scripts = || {
        let stats = redis.cli(&["INFO", "commandstats"]);
        let calls = stats
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_eval:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse::<u64>().ok());
        calls.unwrap_or(0)
    };
    let ran = scripts();
    let url = "http://api.test/run/after-purge";
    let filled = call(origin.behind(&b), get_request(url)).await;
    assert!(
        filled.cache_status().contains("stored"),
        "{}",
        filled.cache_status()
    );
    eventually("B's write script ran", WAIT, || async { scripts() > ran }).await;
    let got = call(origin.behind(&c), get_request(url)).await;
    assert!(!got.is_hit(), "{}", got.cache_status());
}
