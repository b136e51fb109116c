//! The shared tier: entries in Redis, through a fred connection pool set up so that it
//! never blocks start-up and never lets a command wait past its timeout (the settings
//! measured in `shared/notes/fred-under-faults.md`).

use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fred::prelude::*;
use fred::types::config::{ConnectionConfig, Options, PerformanceConfig};
use fred::types::{Expiration, ExpireOptions};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use fred::clients::{Client, WithOptions};

use super::redis_health::{one_attempt, spawn_probe, watch_events, HealthState, RedisHealth};
use super::subscription::{self, MissedWindows, SubscriberProbe};
use super::{StoreAnswer, StoreError, StoreOp, StoreRequest, StoreResponse};
use crate::entry::codec::millis_since_epoch;
use crate::entry::{decode_entry, encode_entry, Entry};
use crate::error::BuildError;
use crate::resilience::breaker::CircuitBreaker;
use crate::telemetry::TARGET;
use crate::CacheKey;

/// A tag as it appears in keys: hashed, so that no tag can reach a key's syntax (or a
/// Redis Cluster hash tag).
fn tag_digest(tag: &str) -> blake3::Hash {
    blake3::hash(tag.as_bytes())
}

/// The pub/sub channel of a namespace's invalidations.
fn invalidation_channel(namespace: &str) -> String {
    format!("{namespace}:invalidations")
}

/// What an invalidation message says to forget.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Invalidation {
    Key(CacheKey),
    Tag(String),
    All,
}

impl Invalidation {
    pub(crate) fn message(&self) -> String {
        match self {
            Invalidation::Key(key) => format!("k {}", key.to_hex()),
            Invalidation::Tag(tag) => format!("t {tag}"),
            Invalidation::All => "p".to_owned(),
        }
    }

    /// Reads a message; `None` for anything else (another writer's junk).
    pub(crate) fn parse(message: &str) -> Option<Self> {
        match message.split_once(' ') {
            Some(("k", hex)) => CacheKey::from_hex(hex).map(Invalidation::Key),
            Some(("t", tag)) if !tag.is_empty() => Some(Invalidation::Tag(tag.to_owned())),
            None if message == "p" => Some(Invalidation::All),
            _ => None,
        }
    }
}

/// How long invalidation marks live: a fill whose origin call started before an
/// invalidation and that is written later than this is not caught.
const MARK_TTL: Duration = Duration::from_secs(300);

/// How long marks live, and the invalidation log reaches back.
fn mark_ttl_millis() -> u64 {
    u64::try_from(MARK_TTL.as_millis()).unwrap_or(u64::MAX)
}

/// Whether the log, trimmed at `now`, still holds everything logged since `since`
/// (both in milliseconds since the epoch).
fn log_reaches(since: u64, now: u64) -> bool {
    now.saturating_sub(since) < mark_ttl_millis()
}

fn millis_i64(millis: u64) -> i64 {
    i64::try_from(millis).unwrap_or(i64::MAX)
}

/// What one result of a write batch's pipeline answers.
enum Slot {
    /// The `SET` of the batch's entry at this index.
    Write(usize),
    /// A tag index's `SADD` or `PEXPIRE` (its outcome changes nothing).
    Index,
    /// The mark at this index (a cluster reads each with its own `GET`).
    Mark(usize),
    /// Every mark, in order (one `MGET`).
    Marks,
}

/// The time a mark holds; 0 (supersedes nothing) when it holds anything else.
fn mark_time(value: Value) -> i64 {
    value
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or(0)
}

/// An entry ready to send.
struct Outgoing<'a> {
    key: &'a CacheKey,
    entry: &'a Entry,
    /// When its origin call started, in ms since the epoch (the marks' unit).
    started: i64,
    storage_key: String,
    value: Bytes,
    /// Its time to live in Redis.
    millis: i64,
}

/// The distinct tags of a write batch, in first-seen order, each with the storage
/// keys of its entries and the longest time to live among them.
#[derive(Default)]
struct BatchTags<'a> {
    tags: Vec<BatchTag<'a>>,
    /// Where each tag is in `tags`.
    positions: std::collections::HashMap<&'a str, usize>,
}

struct BatchTag<'a> {
    name: &'a str,
    keys: Vec<&'a str>,
    millis: i64,
}

impl<'a> BatchTags<'a> {
    fn add(&mut self, out: &'a Outgoing<'a>) {
        for tag in out.entry.tags() {
            let next = self.tags.len();
            let at = *self.positions.entry(tag.as_str()).or_insert(next);
            match self.tags.get_mut(at) {
                Some(known) => {
                    known.keys.push(&out.storage_key);
                    known.millis = known.millis.max(out.millis);
                }
                None => self.tags.push(BatchTag {
                    name: tag,
                    keys: vec![&out.storage_key],
                    millis: out.millis,
                }),
            }
        }
    }

    fn position(&self, tag: &str) -> Option<usize> {
        self.positions.get(tag).copied()
    }
}

/// What became of a batch's entries.
#[derive(Default)]
struct WriteTally {
    written: usize,
    refused: usize,
    /// The first error reply, returned when nothing was written.
    first_refusal: Option<StoreError>,
}

impl WriteTally {
    /// Counts an entry refused by an error reply (`OOM`); a lost connection or a
    /// timeout fails the batch instead, for the retry to see.
    fn failed(&mut self, error: StoreError) -> Result<(), StoreError> {
        if error.is_transient() {
            return Err(error);
        }
        tracing::debug!(target: TARGET, error = %error, outcome = "redis-write-refused");
        self.refused += 1;
        self.first_refusal.get_or_insert(error);
        Ok(())
    }

    /// Written and refused counts; a batch refused whole is an error reply, for a
    /// breaker configured to count those.
    fn result(self) -> Result<(usize, usize), StoreError> {
        match self.first_refusal {
            Some(error) if self.written == 0 => Err(error),
            _ => Ok((self.written, self.refused)),
        }
    }
}

/// How to reach Redis, and how hard to try.
///
/// ```
/// use std::time::Duration;
/// use tower_hybrid_cache::RedisConfig;
///
/// let config = RedisConfig::new("redis://127.0.0.1:6379/0")
///     .pool_size(4)
///     .command_timeout(Duration::from_millis(50));
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    url: String,
    pool_size: usize,
    command_timeout: Duration,
    connect_timeout: Duration,
    max_value_bytes: usize,
    write_queue: usize,
    probe_interval: Duration,
    probe_timeout: Duration,
    deadline: Duration,
    retries: u32,
    retry_backoff: (Duration, Duration),
    retry_budget: f32,
    reconnect_backoff: (Duration, Duration),
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password.
        f.debug_struct("RedisConfig")
            .field("pool_size", &self.pool_size)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("write_queue", &self.write_queue)
            .field("probe_interval", &self.probe_interval)
            .field("probe_timeout", &self.probe_timeout)
            .field("deadline", &self.deadline)
            .field("retries", &self.retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("retry_budget", &self.retry_budget)
            .field("reconnect_backoff", &self.reconnect_backoff)
            .finish_non_exhaustive()
    }
}

impl RedisConfig {
    /// A config for `url`: `redis://[user:password@]host:port[/db]`, or `rediss://`
    /// for TLS (rustls).
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            pool_size: 4,
            command_timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_millis(500),
            max_value_bytes: 1 << 20,
            write_queue: 1024,
            probe_interval: Duration::from_millis(250),
            probe_timeout: Duration::from_millis(100),
            deadline: Duration::from_millis(50),
            retries: 1,
            retry_backoff: (Duration::from_millis(1), Duration::from_millis(5)),
            retry_budget: 0.2,
            reconnect_backoff: (Duration::from_millis(50), Duration::from_secs(1)),
        }
    }

    /// The delay before each attempt to reconnect a lost connection: exponential from
    /// `min` to `max`, with up to 50 ms of jitter. `max` bounds how long the cache
    /// goes on without a Redis that has come back. Default 50 ms to 1 s.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_backoff = (min, max);
        self
    }

    /// The most a read or delete may take, retries included; past it the request goes
    /// on without Redis. Writes, off the response path, are bounded by
    /// `command_timeout` per attempt instead. Default 50 ms.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Attempts after the first for an operation that failed with a transient error
    /// (IO, timeout, `LOADING`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`). Default 1.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The backoff before a retry: exponential from `min` to `max`, with jitter.
    /// Default 1 ms to 5 ms.
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_backoff = (min, max);
        self
    }

    /// Retries may add at most this share of the operations of the last 10 s (plus 10
    /// a second), so a sick Redis never sees a retry storm. Default 0.2 (20 %).
    pub fn retry_budget(mut self, share: f32) -> Self {
        self.retry_budget = share;
        self
    }

    pub(crate) fn probe_interval_value(&self) -> Duration {
        self.probe_interval
    }

    pub(crate) fn deadline_value(&self) -> Duration {
        self.deadline
    }

    pub(crate) fn retry_policy(
        &self,
        counters: Arc<crate::telemetry::Counters>,
    ) -> Result<crate::resilience::retry::RedisRetry, BuildError> {
        crate::resilience::retry::RedisRetry::new(
            self.retries,
            self.retry_backoff.0,
            self.retry_backoff.1,
            self.retry_budget,
            counters,
        )
    }

    /// How often every pooled connection, and the invalidations subscriber, is sent a
    /// PING. Default 250 ms.
    pub fn probe_interval(mut self, every: Duration) -> Self {
        self.probe_interval = every;
        self
    }

    /// How long a PING may go unanswered; two in a row mark the connection down and
    /// force a reconnection (a frozen server or a half-open connection is found this
    /// way; a reconnected subscriber catches up on what it missed). Default 100 ms.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// Connections in the pool. Default 4. Reads share the first one up (a retry takes
    /// the next); write batches and removals go round-robin over the others.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Longest a Redis command may take before the request goes on without Redis.
    /// Default 50 ms.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Longest a connection attempt (TCP, TLS, `AUTH`, `SELECT`) may take. Default
    /// 500 ms.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Largest encoded entry sent to Redis; larger ones stay in memory only.
    /// Default 1 MiB.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// Writes waiting for Redis; past this, a write is dropped (and counted) rather
    /// than queued without bound. Default 1024.
    pub fn write_queue(mut self, len: usize) -> Self {
        self.write_queue = len;
        self
    }

    pub(crate) fn write_queue_len(&self) -> usize {
        self.write_queue.max(1)
    }
}

/// The Redis tier: a fred pool and the namespace of this cache's keys.
pub(crate) struct RedisStore {
    pool: Pool,
    /// A connection subscribed to the namespace's invalidations.
    subscriber: fred::clients::SubscriberClient,
    /// Since when the subscriber may have missed messages, taken once by the hybrid
    /// store.
    missed: std::sync::Mutex<Option<MissedWindows>>,
    health: Arc<HealthState>,
    namespace: String,
    options: Options,
    max_value_bytes: usize,
    /// `true` once `quit` was called (dropping the store then has nothing left to
    /// close); dropped with the store. Our tasks that follow the subscriber end on it
    /// (fred's event streams end only with a client that quit).
    closing: tokio::sync::watch::Sender<bool>,
    /// fred's connection tasks: a client that never connected cannot take a QUIT, and
    /// would otherwise go on reconnecting after the store is gone.
    connections: Vec<tokio::task::AbortHandle>,
    /// How long closing may wait for the QUITs.
    close_within: Duration,
}

impl RedisStore {
    /// Builds the pool, starts its connection tasks and waits for them at most the
    /// connect timeout: whether or not Redis is up, it returns (fred reconnects in the
    /// background).
    /// Also starts a subscriber to the namespace's invalidations, so that memory
    /// forgets what any replica invalidated (a near cache at once; any cache before
    /// an outage makes it answer from memory).
    pub(crate) async fn connect(config: &RedisConfig, namespace: &str) -> Result<Self, BuildError> {
        // fred reads a zero timeout as "none": a command could then wait forever.
        for (name, value) in [
            ("redis command_timeout", config.command_timeout),
            ("redis connect_timeout", config.connect_timeout),
            ("redis probe_interval", config.probe_interval),
            ("redis probe_timeout", config.probe_timeout),
            ("redis deadline", config.deadline),
        ] {
            if value.is_zero() {
                return Err(BuildError::invalid(name, "must be more than zero"));
            }
        }
        let mut fred_config =
            Config::from_url(&config.url).map_err(|e| BuildError::invalid("redis url", e))?;
        // With fail_fast on, a failed first connection ignores the reconnect policy
        // and the client stays dead.
        fred_config.fail_fast = false;
        let (min, max) = config.reconnect_backoff;
        if min.is_zero() || max < min {
            return Err(BuildError::invalid(
                "redis reconnect_backoff",
                "min must be more than zero and max at least min",
            ));
        }
        let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        let mut policy = ReconnectPolicy::new_exponential(0, millis(min), millis(max), 2);
        policy.set_jitter(50);
        let performance = PerformanceConfig {
            default_command_timeout: config.command_timeout,
            ..PerformanceConfig::default()
        };
        let connection = ConnectionConfig {
            connection_timeout: config.connect_timeout,
            internal_command_timeout: config.connect_timeout,
            // Our callers fall back or retry; fred must not replay commands late.
            max_command_attempts: 1,
            max_command_buffer_len: 1024,
            ..ConnectionConfig::default()
        };
        let subscriber = {
            let mut builder = fred::types::Builder::from_config(fred_config.clone());
            builder
                .set_performance_config(performance.clone())
                .set_connection_config(connection.clone())
                .set_policy(policy.clone());
            builder
                .build_subscriber_client()
                .map_err(|e| BuildError::invalid("redis subscriber", e))?
        };
        let pool = Pool::new(
            fred_config,
            Some(performance),
            Some(connection),
            Some(policy),
            config.pool_size.max(1),
        )
        .map_err(|e| BuildError::invalid("redis pool", e))?;
        // `connect` spawns the connection tasks; unlike `init` it does not wait.
        let mut connections: Vec<_> = pool
            .connect_pool()
            .iter()
            .map(tokio::task::JoinHandle::abort_handle)
            .collect();
        let connected = tokio::time::timeout(config.connect_timeout, pool.wait_for_connect()).await;
        let connected = matches!(connected, Ok(Ok(())));
        if !connected {
            tracing::warn!(target: TARGET, "redis is not reachable yet: serving from memory until it is");
        }
        let health = HealthState::new(pool.size(), connected);
        watch_events(pool.clients(), &health);
        let (closing, closed) = tokio::sync::watch::channel(false);
        spawn_probe(
            pool.clients().to_vec(),
            Arc::downgrade(&health),
            (config.probe_interval, config.probe_timeout),
            closed.clone(),
        );
        // Subscribes after every reconnection, without blocking start-up.
        let (missed, subscription) = subscription::subscribe(
            &subscriber,
            invalidation_channel(namespace),
            SubscriberProbe {
                every: config.probe_interval,
                timeout: config.probe_timeout,
                closed,
            },
        );
        connections.push(subscription);
        Ok(RedisStore {
            pool,
            subscriber,
            missed: std::sync::Mutex::new(Some(missed)),
            health,
            namespace: namespace.to_owned(),
            options: one_attempt(config.command_timeout),
            max_value_bytes: config.max_value_bytes,
            closing,
            connections,
            // Three commands (UNSUBSCRIBE, then the QUITs), each bounded by the
            // command timeout.
            close_within: config.command_timeout.saturating_mul(3),
        })
    }

    fn key(&self, key: &CacheKey) -> String {
        key.storage_key(&self.namespace)
    }

    /// A connection believed healthy; none: fail at once, without asking Redis.
    fn healthy(&self) -> Result<&Client, StoreError> {
        let index = self.health.pick().ok_or_else(StoreError::unavailable)?;
        self.pool
            .clients()
            .get(index)
            .ok_or_else(StoreError::unavailable)
    }

    /// A healthy connection with the per-call limits (timeout, one attempt, fail fast).
    fn client(&self) -> Result<WithOptions<Client>, StoreError> {
        Ok(self.healthy()?.with_options(&self.options))
    }

    /// The readers' connection (another one for a retry), with the per-call limits.
    fn reader(&self, attempt: u8) -> Result<WithOptions<Client>, StoreError> {
        let index = self
            .health
            .pick_reader(attempt)
            .ok_or_else(StoreError::unavailable)?;
        let client = self
            .pool
            .clients()
            .get(index)
            .ok_or_else(StoreError::unavailable)?;
        Ok(client.with_options(&self.options))
    }

    pub(crate) fn health(&self) -> RedisHealth {
        self.health.view()
    }

    /// Lets the connections' health drive `breaker`.
    pub(crate) fn drive(&self, breaker: CircuitBreaker) {
        self.health.drive(breaker);
    }

    /// The entry under `key`: `Ok(None)` when absent or unreadable (a foreign or
    /// corrupt value is a miss, overwritten by the next store).
    pub(crate) async fn get(
        &self,
        key: &CacheKey,
        attempt: u8,
    ) -> Result<Option<Entry>, StoreError> {
        let value: Option<Bytes> = self
            .reader(attempt)?
            .get(self.key(key))
            .await
            .map_err(StoreError::command)?;
        Ok(value.and_then(|bytes| match decode_entry(bytes) {
            Ok(entry) => Some(entry),
            Err(e) => {
                tracing::debug!(target: TARGET, key = %key, error = %e, outcome = "redis-decode-error");
                None
            }
        }))
    }

    /// Stores entries, each with `PX` set to the time it can still be served, so Redis
    /// expires it by itself; an entry already past that, or too large, is not sent.
    /// Returns how many were written and how many were refused by an error reply
    /// (`OOM`); a lost connection, a timeout, or a batch refused whole is an error,
    /// for the breaker and the retry to see (the batch is idempotent).
    ///
    /// One pipeline, one round trip: the writes, then the invalidation marks (of each
    /// entry's key and tags, and the purge). An entry whose origin call started before
    /// one of them is deleted again at once. No invalidation can be lost this way:
    /// an invalidation sets its mark before it deletes, so a write that lands before
    /// the delete is deleted by it, and one that lands after is followed by a read of
    /// the mark. Such an entry can be seen by another replica for about a round trip.
    pub(crate) async fn set_many(
        &self,
        entries: &[(CacheKey, Entry, SystemTime)],
    ) -> Result<(usize, usize), StoreError> {
        let client = self.healthy()?;
        let outgoing = self.outgoing(entries);
        if outgoing.is_empty() {
            return Ok((0, 0));
        }
        let pipeline = client.pipeline();
        // What each result of the pipeline answers, for the commands it took.
        let mut slots = Vec::new();
        let mut sent = Vec::with_capacity(outgoing.len());
        let mut tags = BatchTags::default();
        for out in &outgoing {
            let queued: Result<(), _> = pipeline
                .set(
                    out.storage_key.clone(),
                    out.value.clone(),
                    Some(Expiration::PX(out.millis)),
                    None,
                    false,
                )
                .await;
            if queued.is_err() {
                continue;
            }
            slots.push(Slot::Write(sent.len()));
            tags.add(out);
            sent.push(out);
        }
        if sent.is_empty() {
            return Ok((0, 0));
        }
        // Each tag's index lists the keys stored with it, and lives at least as long
        // as the longest-lived of them (NX sets a first expiry, GT extends): one
        // SADD and one expiry per tag and batch, however many entries carry it.
        for tag in &tags.tags {
            let index = self.tag_key(tag.name);
            let queued = [
                pipeline
                    .sadd::<(), _, _>(index.clone(), tag.keys.clone())
                    .await,
                pipeline
                    .pexpire::<(), _>(index.clone(), tag.millis, Some(ExpireOptions::NX))
                    .await,
                pipeline
                    .pexpire::<(), _>(index, tag.millis, Some(ExpireOptions::GT))
                    .await,
            ];
            slots.extend(queued.iter().filter(|q| q.is_ok()).map(|_| Slot::Index));
        }
        let marks = self.mark_keys(&sent, &tags);
        let mark_count = marks.len();
        // One MGET on one Redis; a cluster spreads the marks over its slots.
        if client.is_clustered() {
            for (i, mark) in marks.into_iter().enumerate() {
                if pipeline.get::<(), _>(mark).await.is_ok() {
                    slots.push(Slot::Mark(i));
                }
            }
        } else if pipeline.mget::<(), _>(marks).await.is_ok() {
            slots.push(Slot::Marks);
        }
        let results = pipeline.try_all::<Value>().await;

        let mut tally = WriteTally::default();
        let mut written = vec![false; sent.len()];
        // A mark that cannot be read (another type, not a number) supersedes nothing.
        let mut times = vec![0_i64; mark_count];
        for (slot, result) in slots.into_iter().zip(results) {
            match (slot, result) {
                (Slot::Write(i), Ok(_)) => {
                    tally.written += 1;
                    written[i] = true;
                }
                (Slot::Write(_), Err(e)) => tally.failed(StoreError::command(e))?,
                (Slot::Index, _) => {}
                (Slot::Mark(i), Ok(value)) => times[i] = mark_time(value),
                (Slot::Marks, Ok(Value::Array(values))) => {
                    for (time, value) in times.iter_mut().zip(values) {
                        *time = mark_time(value);
                    }
                }
                (Slot::Marks, Ok(_)) => {}
                // A lost connection or a timeout: the batch is sent again, and
                // checked again; an error reply reads as no mark.
                (Slot::Mark(_) | Slot::Marks, Err(e)) => {
                    let error = StoreError::command(e);
                    if error.is_transient() {
                        return Err(error);
                    }
                }
            }
        }
        // In `mark_keys` order: the purge, each entry's key, each tag of the batch.
        let purged = times.first().copied().unwrap_or(0);
        let key_marks = times.get(1..).unwrap_or_default();
        let tag_marks = times.get(1 + sent.len()..).unwrap_or_default();
        let superseded: Vec<&Outgoing<'_>> = sent
            .iter()
            .zip(written)
            .enumerate()
            .filter_map(|(i, (out, written))| {
                let mut newest = purged.max(key_marks.get(i).copied().unwrap_or(0));
                for tag in out.entry.tags() {
                    let mark = tags.position(tag).and_then(|t| tag_marks.get(t));
                    newest = newest.max(mark.copied().unwrap_or(0));
                }
                (written && newest >= out.started).then_some(*out)
            })
            .collect();
        if !superseded.is_empty() {
            let undo = client.pipeline();
            for out in &superseded {
                tracing::debug!(target: TARGET, key = %out.key, outcome = "not-stored", detail = "invalidated");
                let _: Result<(), _> = undo.del(out.storage_key.as_str()).await;
            }
            // Failing here would leave an invalidated entry in Redis: the whole batch
            // is then an error, retried or replayed (and checked) again.
            let _: Vec<i64> = undo.all().await.map_err(StoreError::command)?;
            tally.written = tally.written.saturating_sub(superseded.len());
        }
        tally.result()
    }

    /// The marks that can supersede a batch, in the order `set_many` reads them: the
    /// purge, each entry's key's mark, then each of the batch's tags' marks.
    fn mark_keys(&self, sent: &[&Outgoing<'_>], tags: &BatchTags<'_>) -> Vec<String> {
        let mut keys = Vec::with_capacity(1 + sent.len() + tags.tags.len());
        keys.push(self.purged_key());
        keys.extend(sent.iter().map(|out| self.gone_key(out.key)));
        keys.extend(tags.tags.iter().map(|tag| self.gone_tag_key(tag.name)));
        keys
    }

    /// The entries worth sending, encoded, with their time to live.
    fn outgoing<'a>(&self, entries: &'a [(CacheKey, Entry, SystemTime)]) -> Vec<Outgoing<'a>> {
        let now = SystemTime::now();
        entries
            .iter()
            .filter_map(|(key, entry, started)| {
                let ttl = entry
                    .stale_until()
                    .duration_since(now)
                    .ok()
                    .filter(|d| d.as_millis() > 0)?;
                let value = encode_entry(entry);
                if value.len() > self.max_value_bytes {
                    return None;
                }
                Some(Outgoing {
                    key,
                    entry,
                    started: millis_i64(millis_since_epoch(*started)),
                    storage_key: self.key(key),
                    value,
                    millis: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
                })
            })
            .collect()
    }

    /// Marks of invalidations, read by every replica's writes: key, tag, purge.
    fn gone_key(&self, key: &CacheKey) -> String {
        format!("{}:gone:{}", self.namespace, key.to_hex())
    }

    fn gone_tag_key(&self, tag: &str) -> String {
        format!("{}:gonetag:{}", self.namespace, tag_digest(tag))
    }

    fn purged_key(&self) -> String {
        format!("{}:purged", self.namespace)
    }

    /// Sets an invalidation mark to now, for as long as a fill may still be running.
    async fn mark(&self, client: &Client, mark: String) -> Result<(), StoreError> {
        let now = millis_i64(millis_since_epoch(SystemTime::now()));
        let millis = millis_i64(mark_ttl_millis());
        client
            .set::<(), _, _>(mark, now, Some(Expiration::PX(millis)), None, false)
            .await
            .map_err(StoreError::command)
    }

    /// The key of a tag's index.
    fn tag_key(&self, tag: &str) -> String {
        format!("{}:tag:{}", self.namespace, tag_digest(tag))
    }

    /// Removes every key in the tag's index, then the index. Returns how many keys
    /// were removed.
    pub(crate) async fn invalidate_tag(&self, tag: &str) -> Result<usize, StoreError> {
        let client = self.healthy()?;
        self.mark(client, self.gone_tag_key(tag)).await?;
        let index = self.tag_key(tag);
        let members: Vec<String> = client
            .smembers(index.clone())
            .await
            .map_err(StoreError::command)?;
        let removed = self.unlink(client, members).await?;
        let _: i64 = client.del(index).await.map_err(StoreError::command)?;
        self.publish(client, Invalidation::Tag(tag.to_owned()).message())
            .await;
        Ok(removed)
    }

    /// Removes every key of the namespace (entries and tag indexes), found with SCAN
    /// (on every primary of a cluster).
    pub(crate) async fn purge_all(&self) -> Result<usize, StoreError> {
        use futures_util::StreamExt;
        let client = self.healthy()?;
        // Marked first, as a key's or a tag's invalidation: a fill that started before
        // now either landed before the mark (and the SCAN finds it) or is refused by it.
        let purged = self.purged_key();
        self.mark(client, purged.clone()).await?;
        let pattern = format!("{}:*", self.namespace);
        let mut keys = if client.is_clustered() {
            client
                .scan_cluster_buffered(pattern, Some(1000), None)
                .boxed()
        } else {
            client.scan_buffered(pattern, Some(1000), None).boxed()
        };
        let mut batch = Vec::new();
        let mut removed = 0;
        while let Some(key) = keys.next().await {
            let key = key.map_err(StoreError::command)?;
            if let Some(key) = key.as_str().filter(|key| **key != purged) {
                batch.push(key.to_owned());
            }
            if batch.len() >= 500 {
                removed += self.unlink(client, std::mem::take(&mut batch)).await?;
            }
        }
        removed += self.unlink(client, batch).await?;
        self.publish(client, Invalidation::All.message()).await;
        Ok(removed)
    }

    /// UNLINKs keys one command each (they may live in different cluster slots), in
    /// one pipeline.
    async fn unlink(&self, client: &Client, keys: Vec<String>) -> Result<usize, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let pipeline = client.pipeline();
        for key in keys {
            let _: Result<(), _> = pipeline.unlink(key).await;
        }
        let results: Vec<i64> = pipeline.all().await.map_err(StoreError::command)?;
        Ok(results.iter().filter(|n| **n > 0).count())
    }

    fn lease_key(&self, key: &CacheKey) -> String {
        let mut lease = String::with_capacity(self.namespace.len() + 80);
        lease.push_str(&self.namespace);
        lease.push_str(":lease:");
        lease.push_str(&key.to_hex());
        lease
    }

    /// Takes the fill lease of `key` for `ttl` unless another replica holds it.
    pub(crate) async fn lease(
        &self,
        key: &CacheKey,
        token: u64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let set: Option<String> = self
            .client()?
            .set(
                self.lease_key(key),
                token.to_string(),
                Some(Expiration::PX(millis)),
                Some(fred::types::SetOptions::NX),
                false,
            )
            .await
            .map_err(StoreError::command)?;
        Ok(set.is_some())
    }

    /// Gives the lease back if it is still ours (it may have expired and been taken
    /// by another replica since).
    pub(crate) async fn release(&self, key: &CacheKey, token: u64) -> Result<(), StoreError> {
        let client = self.client()?;
        let lease = self.lease_key(key);
        let holder: Option<String> = client
            .get(lease.clone())
            .await
            .map_err(StoreError::command)?;
        if holder.as_deref() == Some(token.to_string().as_str()) {
            let _: i64 = client.del(lease).await.map_err(StoreError::command)?;
        }
        Ok(())
    }

    /// Deletes the entry under `key`, and marks it invalidated so that no replica's
    /// fill that started earlier writes it back.
    pub(crate) async fn delete(&self, key: &CacheKey) -> Result<(), StoreError> {
        let client = self.healthy()?;
        self.mark(client, self.gone_key(key)).await?;
        let _: i64 = client
            .with_options(&self.options)
            .del(self.key(key))
            .await
            .map_err(StoreError::command)?;
        self.publish(client, Invalidation::Key(*key).message())
            .await;
        Ok(())
    }

    /// Tells every replica's memory what to forget (best effort: a near cache's local
    /// TTL bounds what a lost message costs), and logs it for replicas whose
    /// subscriber is reconnecting (read back by `logged_since`).
    async fn publish(&self, client: &Client, message: String) {
        let now = millis_since_epoch(SystemTime::now());
        let log = self.log_key();
        let pipeline = client.pipeline();
        // The message is the member: repeating an invalidation moves it, the log holds
        // each at most once.
        let _: Result<(), _> = pipeline
            .zadd(
                &log,
                None,
                None,
                false,
                false,
                (now as f64, message.as_str()),
            )
            .await;
        let _: Result<(), _> = pipeline
            .zremrangebyscore(
                &log,
                "-inf",
                millis_i64(now.saturating_sub(mark_ttl_millis())),
            )
            .await;
        let _: Result<(), _> = pipeline
            .pexpire(&log, millis_i64(mark_ttl_millis()), None)
            .await;
        let _: Result<(), _> = pipeline
            .publish(invalidation_channel(&self.namespace), message)
            .await;
        let sent: Result<Vec<Value>, _> = pipeline.try_all().await.into_iter().collect();
        if let Err(e) = sent {
            tracing::debug!(target: TARGET, error = %e, outcome = "invalidation-not-published");
        }
    }

    /// The sorted set of recent invalidations' messages, scored by their time.
    fn log_key(&self) -> String {
        format!("{}:invalidation-log", self.namespace)
    }

    /// The invalidations logged since `since`; `None` when the log no longer reaches
    /// back that far (everything may have been invalidated).
    pub(crate) async fn logged_since(
        &self,
        since: SystemTime,
    ) -> Result<Option<Vec<Invalidation>>, StoreError> {
        let since = millis_since_epoch(since);
        if !log_reaches(since, millis_since_epoch(SystemTime::now())) {
            return Ok(None);
        }
        let messages: Vec<String> = self
            .client()?
            .zrangebyscore(self.log_key(), millis_i64(since), "+inf", false, None)
            .await
            .map_err(StoreError::command)?;
        Ok(Some(
            messages
                .iter()
                .filter_map(|message| Invalidation::parse(message))
                .collect(),
        ))
    }

    /// Since when the subscriber may have missed invalidations, each time it is back;
    /// `None` after the first call.
    pub(crate) fn missed_windows(&self) -> Option<MissedWindows> {
        self.missed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Invalidations published by any replica.
    pub(crate) fn invalidations(&self) -> tokio::sync::broadcast::Receiver<fred::types::Message> {
        self.subscriber.message_rx()
    }

    /// Says when the store is closing or gone, for tasks that follow the subscriber.
    pub(crate) fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Closes every connection.
    pub(crate) async fn quit(&self) {
        self.closing.send_replace(true);
        self.close().await;
    }

    fn close(&self) -> impl Future<Output = ()> + Send + 'static {
        let (subscriber, pool) = (self.subscriber.clone(), self.pool.clone());
        let connections = self.connections.clone();
        let within = self.close_within;
        async move {
            let quit = async {
                // fred gets no answer to a QUIT sent in subscribed mode (it waits out
                // the command timeout and the client lives on): leave the channel
                // first.
                let _ = subscriber.unsubscribe_all().await;
                let _ = subscriber.quit().await;
                let _ = pool.quit().await;
            };
            let _ = tokio::time::timeout(within, quit).await;
            // The clients are no longer used: their connection tasks stop, also
            // where no QUIT could be answered (Redis never came up).
            for connection in connections {
                connection.abort();
            }
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if *self.closing.borrow() {
            return;
        }
        // Dropped without `shutdown`: close in the background (outside a runtime
        // there is nothing to close them with, and nothing left running either).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.close());
        }
    }
}

/// The Redis tier as a tower service; clones share the store.
#[derive(Clone)]
pub(crate) struct RedisService(pub(crate) Arc<RedisStore>);

impl tower::Service<StoreRequest> for RedisService {
    type Response = StoreResponse;
    type Error = StoreError;
    type Future = Pin<Box<dyn Future<Output = Result<StoreResponse, StoreError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StoreError>> {
        // fred queues commands itself (bounded); health is checked per command.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: StoreRequest) -> Self::Future {
        let store = Arc::clone(&self.0);
        Box::pin(async move {
            let answer = match request.op {
                StoreOp::Get(key) => StoreAnswer::Found(store.get(&key, request.attempt).await?),
                StoreOp::Set(entries) => {
                    let (written, failed) = store.set_many(&entries).await?;
                    StoreAnswer::Written { written, failed }
                }
                StoreOp::Delete(key) => {
                    store.delete(&key).await?;
                    StoreAnswer::Deleted
                }
                StoreOp::InvalidateTag(tag) => {
                    StoreAnswer::Removed(store.invalidate_tag(&tag).await?)
                }
                StoreOp::PurgeAll => StoreAnswer::Removed(store.purge_all().await?),
                StoreOp::Lease(key, token, ttl) => {
                    StoreAnswer::Leased(store.lease(&key, token, ttl).await?)
                }
                StoreOp::Release(key, token) => {
                    store.release(&key, token).await?;
                    StoreAnswer::Deleted
                }
            };
            Ok(StoreResponse::new(answer))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_indexes_each_tag_once_with_all_its_keys_and_the_longest_ttl() {
        use crate::entry::CachedResponse;
        let tagged = |tags: &[&str]| {
            Entry::Response(Arc::new(
                CachedResponse::builder(http::StatusCode::OK, http::HeaderMap::new(), Bytes::new())
                    .tags(tags.iter().map(|t| (*t).to_owned()).collect())
                    .build(),
            ))
        };
        let keys = [CacheKey::from_bytes([1; 32]), CacheKey::from_bytes([2; 32])];
        let entries = [tagged(&["jobs", "berlin"]), tagged(&["jobs"])];
        let outgoing: Vec<Outgoing<'_>> = keys
            .iter()
            .zip(&entries)
            .zip([1_000, 5_000])
            .map(|((key, entry), millis)| Outgoing {
                key,
                entry,
                started: 0,
                storage_key: key.storage_key("ns"),
                value: Bytes::new(),
                millis,
            })
            .collect();
        let mut tags = BatchTags::default();
        for out in &outgoing {
            tags.add(out);
        }
        let names: Vec<&str> = tags.tags.iter().map(|t| t.name).collect();
        assert_eq!(names, ["jobs", "berlin"]);
        let jobs = &tags.tags[0];
        assert_eq!(
            jobs.keys,
            [outgoing[0].storage_key.as_str(), &outgoing[1].storage_key]
        );
        assert_eq!(jobs.millis, 5_000);
        assert_eq!(tags.tags[1].keys, [outgoing[0].storage_key.as_str()]);
        assert_eq!(tags.tags[1].millis, 1_000);
        assert_eq!(tags.position("berlin"), Some(1));
        assert_eq!(tags.position("paris"), None);
    }

    #[test]
    fn the_invalidation_log_reaches_back_as_long_as_the_marks_live() {
        let now = 1_000_000_000;
        let keep = mark_ttl_millis();
        assert!(log_reaches(now, now));
        assert!(log_reaches(now - keep + 1, now));
        assert!(!log_reaches(now - keep, now));
        assert!(!log_reaches(0, now));
        // A clock that went back: the window is in the future, the log holds it.
        assert!(log_reaches(now + 10, now));
    }

    #[test]
    fn invalidation_messages_roundtrip_and_junk_is_ignored() {
        for invalidation in [
            Invalidation::Key(CacheKey::from_bytes([7; 32])),
            Invalidation::Tag("company:7".to_owned()),
            Invalidation::All,
        ] {
            assert_eq!(
                Invalidation::parse(&invalidation.message()),
                Some(invalidation)
            );
        }
        for junk in ["", "k", "k 12", "t ", "x y", "pp"] {
            assert_eq!(Invalidation::parse(junk), None, "{junk:?}");
        }
    }
}
