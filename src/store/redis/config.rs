//! [`RedisConfig`]: how to reach Redis and how hard to try, and the fred settings it
//! makes (those measured in `shared/notes/fred-under-faults.md`: no blocking start-up,
//! no command waiting past its timeout, no retries of fred's own).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Config, ReconnectPolicy};
use fred::types::config::{ConnectionConfig, PerformanceConfig};

use super::retry::RedisRetry;
use crate::error::BuildError;
use crate::telemetry::Counters;

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
#[must_use]
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
    invalidation_ttl: Duration,
    written_keys: Option<usize>,
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
            .field("invalidation_ttl", &self.invalidation_ttl)
            .field("written_keys", &self.written_keys)
            .finish_non_exhaustive()
    }
}

impl RedisConfig {
    /// Creates a config for `url`: `redis://[user:password@]host:port[/db]`, `rediss://`
    /// for TLS (rustls), `redis-cluster://host:port?node=host:port…` for a Redis Cluster,
    /// or `redis-sentinel://host:port?sentinelServiceName=name&node=host:port…` for a
    /// primary found through Redis Sentinel.
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
            invalidation_ttl: Duration::from_secs(300),
            written_keys: None,
        }
    }

    /// Sets the delay before each attempt to reconnect a lost connection: exponential from
    /// `min` to `max`, with up to 50 ms of jitter. `max` bounds how long the cache
    /// goes on without a Redis that has come back. Default 50 ms to 1 s.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_backoff = (min, max);
        self
    }

    /// Sets the most a request waits on one Redis operation (a lookup's read, a write's
    /// delete, a fill lease), every attempt and backoff included; past it the request
    /// goes on without Redis. Default 50 ms.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the attempts after the first for an operation that failed with a transient error
    /// (IO, timeout, `LOADING`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`). Default 1.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Sets the backoff before a retry: exponential from `min` to `max`, with jitter.
    /// Default 1 ms to 5 ms.
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_backoff = (min, max);
        self
    }

    /// Lets retries add at most this share of the operations of the last 10 s (plus 10
    /// a second), so a sick Redis never sees a retry storm. Default 0.2 (20 %). For a
    /// share above 1/16 and up to 5/8, successes are counted by a random sixteenth of
    /// them, each worth sixteen, so that they take no lock every thread shares.
    pub fn retry_budget(mut self, share: f32) -> Self {
        self.retry_budget = share;
        self
    }

    /// Sets how often every pooled connection, and the invalidations subscriber, is sent a
    /// PING. Default 250 ms.
    pub fn probe_interval(mut self, every: Duration) -> Self {
        self.probe_interval = every;
        self
    }

    /// Sets how long a PING may go unanswered; two in a row mark the connection down and
    /// force a reconnection (a frozen server or a half-open connection is found this
    /// way; a reconnected subscriber catches up on what it missed). Default 100 ms.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// Sets the connections in the pool. Default 4. Reads share the first one up (a retry takes
    /// the next); write batches and removals go round-robin over the others.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Sets the most fred waits for the reply to one command, on any connection; past it
    /// that attempt fails (and may be retried within the deadline). It alone bounds
    /// each attempt of what runs off the response path: write batches, replays, tag
    /// invalidations and purges. Default 50 ms.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets the longest a connection attempt (TCP, TLS, `AUTH`, `SELECT`) may take. Default
    /// 500 ms.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the largest encoded entry sent to Redis; larger ones stay in memory only.
    /// Default 1 MiB.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// Sets the operations queued for the background writer (write batches' entries, the
    /// deletes behind an invalidation, lease releases); past this, one is dropped (and
    /// counted in `redis_writes_dropped`) rather than queued without bound. Default
    /// 1024.
    pub fn write_queue(mut self, len: usize) -> Self {
        self.write_queue = len;
        self
    }

    /// Tracks which keys any replica wrote to Redis, so that a lookup of a key no
    /// replica wrote is a miss at once, without a Redis read: the write path of a
    /// miss-heavy load (unique URLs, expired entries) costs one round trip fewer.
    /// Holds at most `max_keys` keys (about 28 bytes each, 40 at most), in 16
    /// shards by the key's digest; more keys in Redis than a shard holds (once its
    /// expired keys are gone, seven eighths of it) and every lookup reads Redis
    /// again, as without it, until a scan finds fewer. Size it a quarter above the
    /// keys you expect. Off by default.
    ///
    /// Writers announce what they write on a pub/sub channel, and each replica scans
    /// the namespace's entries once subscribed (a `SCAN` and a `PTTL` per entry: a
    /// script call a page of 250, or without `EVAL` a pipeline a page of 1 000), and
    /// again after each reconnection of its subscriber: until a
    /// scan ends, every lookup reads Redis. A key announced late (a writer's message
    /// not arrived yet) costs one origin call, never a stale response. Every replica
    /// sharing the namespace should turn it on: a replica without it announces
    /// nothing, and the others then miss what it wrote. Not on a Redis Cluster (its
    /// scans would span the primaries): there the setting does nothing (a warning at
    /// build), and lookups always read Redis.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_hybrid_cache::RedisConfig;
    ///
    /// // Search pages: most URLs are asked for once; up to a million live in Redis.
    /// let config = RedisConfig::new("redis://127.0.0.1:6379").track_written_keys(1_000_000);
    /// # let _ = config;
    /// ```
    pub fn track_written_keys(mut self, max_keys: usize) -> Self {
        self.written_keys = Some(max_keys);
        self
    }

    /// Sets how long invalidations are remembered in Redis: the marks that keep a fill
    /// which started before an invalidation from being written after it (by any
    /// replica), and the log a reconnected subscriber catches up from. A fill written
    /// later than this after the invalidation is not caught; a subscriber away for
    /// longer than this (less 5 s for clock skew) makes its memory forget everything.
    /// Default 5 min.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_hybrid_cache::RedisConfig;
    ///
    /// // Fills that can take up to 20 minutes (a slow report) must still be caught.
    /// let config = RedisConfig::new("redis://127.0.0.1:6379").invalidation_ttl(Duration::from_secs(1800));
    /// # let _ = config;
    /// ```
    pub fn invalidation_ttl(mut self, ttl: Duration) -> Self {
        self.invalidation_ttl = ttl;
        self
    }
}

/// What the Redis tier's parts read of the config.
impl RedisConfig {
    pub(crate) fn probe_interval_value(&self) -> Duration {
        self.probe_interval
    }

    pub(crate) fn probe_timeout_value(&self) -> Duration {
        self.probe_timeout
    }

    pub(crate) fn deadline_value(&self) -> Duration {
        self.deadline
    }

    pub(crate) fn command_timeout_value(&self) -> Duration {
        self.command_timeout
    }

    pub(crate) fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }

    pub(crate) fn pool_size_value(&self) -> usize {
        self.pool_size.max(1)
    }

    pub(crate) fn max_value_bytes_value(&self) -> usize {
        self.max_value_bytes
    }

    pub(crate) fn write_queue_len(&self) -> usize {
        self.write_queue.max(1)
    }

    /// The most written keys tracked, if they are.
    pub(crate) fn written_keys_value(&self) -> Option<usize> {
        self.written_keys
    }

    pub(crate) fn invalidation_ttl_value(&self) -> Duration {
        self.invalidation_ttl
    }

    /// The retry policy these settings describe.
    pub(crate) fn retry_policy(&self, counters: Arc<Counters>) -> Result<RedisRetry, BuildError> {
        RedisRetry::new(
            self.retries,
            self.retry_backoff,
            self.retry_budget,
            counters,
        )
    }

    /// Checks every setting that could make a command wait forever or the pool
    /// misbehave, before anything connects (the URL is read, and checked, by
    /// `fred_config`).
    pub(crate) fn validate(&self) -> Result<(), BuildError> {
        // fred reads a zero timeout as "none": a command could then wait forever.
        for (name, value) in [
            ("redis command_timeout", self.command_timeout),
            ("redis connect_timeout", self.connect_timeout),
            ("redis probe_interval", self.probe_interval),
            ("redis probe_timeout", self.probe_timeout),
            ("redis deadline", self.deadline),
            ("redis invalidation_ttl", self.invalidation_ttl),
        ] {
            if value.is_zero() {
                return Err(BuildError::invalid(name, "must be more than zero"));
            }
        }
        let (min, max) = self.reconnect_backoff;
        if min.is_zero() || max < min {
            return Err(BuildError::invalid(
                "redis reconnect_backoff",
                "min must be more than zero and max at least min",
            ));
        }
        Ok(())
    }

    /// The URL as fred reads it, with fail-fast off: with it on, a failed first
    /// connection ignores the reconnect policy and the client stays dead.
    pub(crate) fn fred_config(&self) -> Result<Config, BuildError> {
        let mut config =
            Config::from_url(&self.url).map_err(|e| BuildError::invalid("redis url", e))?;
        config.fail_fast = false;
        Ok(config)
    }

    /// Reconnects with exponential backoff and up to 50 ms of jitter, forever.
    pub(crate) fn reconnect_policy(&self) -> ReconnectPolicy {
        let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        let (min, max) = self.reconnect_backoff;
        let mut policy = ReconnectPolicy::new_exponential(0, millis(min), millis(max), 2);
        policy.set_jitter(50);
        policy
    }

    pub(crate) fn performance_config(&self) -> PerformanceConfig {
        PerformanceConfig {
            default_command_timeout: self.command_timeout,
            ..PerformanceConfig::default()
        }
    }

    pub(crate) fn connection_config(&self) -> ConnectionConfig {
        ConnectionConfig {
            connection_timeout: self.connect_timeout,
            internal_command_timeout: self.connect_timeout,
            // Our callers fall back or retry; fred must not replay commands late.
            max_command_attempts: 1,
            max_command_buffer_len: 1024,
            ..ConnectionConfig::default()
        }
    }
}
