//! The shared tier: entries in Redis, through a fred connection pool set up so that it
//! never blocks start-up and never lets a command wait past its timeout (the settings
//! measured in `shared/notes/fred-under-faults.md`).
//!
//! `RedisStore` owns the connections (the pool, the invalidations subscriber) and
//! their closing; its operations are split by job: `writes` (batches and marks),
//! `invalidation` (removals, pub/sub and the log), `lease` (fill leases). The
//! whole key schema is in `keys`; connection health in `health`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fred::bytes_utils::Str;
use fred::clients::{Client, WithOptions};
use fred::prelude::*;
use fred::types::config::Options;

mod batches;
mod capabilities;
mod config;
mod heads;
pub(crate) mod health;
mod invalidation;
mod keys;
mod lease;
mod outage;
pub(crate) mod retry;
mod subscription;
mod values;
mod writes;
mod written;

pub(crate) use invalidation::MAX_LOGGED;

pub use config::RedisConfig;
pub use health::RedisHealth;
pub(crate) use invalidation::Invalidation;
#[cfg(test)]
pub(crate) use subscription::missed_windows as subscription_windows;
pub(crate) use subscription::{MissedWindows, WindowReporter};
pub(crate) use written::WrittenKeys;

pub(crate) use self::batches::KeyRead;
use self::batches::{ReadBatches, ReadKind, Turn};
use self::health::{one_attempt, spawn_probe, watch_events, HealthState};
use self::keys::RedisKeys;
use self::subscription::SubscriberProbe;
use super::{StoreAnswer, StoreError, StoreOp, StoreRequest, StoreResponse};
use crate::breaker::CircuitBreaker;
use crate::entry::codec::VERSION_HEAD;
use crate::entry::{decode_entry, Entry};
use crate::error::BuildError;
use crate::key::CacheKey;
use crate::telemetry::TARGET;

/// The entry `bytes` (read under `key`) encode; `None` (logged) when they encode
/// none: a foreign or damaged value is a miss, and is overwritten by the next fill.
pub(crate) fn decoded(key: &CacheKey, bytes: Bytes) -> Option<Entry> {
    match decode_entry(bytes) {
        Ok(entry) => Some(entry),
        Err(e) => {
            tracing::debug!(target: TARGET, key = %key, error = %e, outcome = "redis-decode-error");
            None
        }
    }
}

/// Messages the subscriber's listeners may be behind by before one of them is told
/// it missed some (the invalidation listener then has the log read back from when it
/// had last read everything; the written keys' listener rescans). fred
/// makes each of a client's event channels this long (about 0.4 MB a 1 000 here).
const SUBSCRIBER_MESSAGES: usize = 2048;

/// Milliseconds as Redis takes them (`PX`, scores), saturating.
fn millis_i64(millis: u64) -> i64 {
    i64::try_from(millis).unwrap_or(i64::MAX)
}

/// The Redis tier: a fred pool, the invalidations subscriber, and the key schema of
/// this cache's namespace.
pub(crate) struct RedisStore {
    pool: Pool,
    /// A connection subscribed to the namespace's invalidations.
    subscriber: fred::clients::SubscriberClient,
    /// Since when the subscriber may have missed messages, taken once by the hybrid
    /// store.
    missed: std::sync::Mutex<Option<(MissedWindows, WindowReporter)>>,
    health: Arc<HealthState>,
    keys: RedisKeys,
    /// Names this process's staged values (`writes.rs`).
    writer: writes::StagingWriter,
    options: Options,
    max_value_bytes: usize,
    /// How long invalidation marks live, and the invalidation log reaches back.
    invalidation_ttl: Duration,
    /// The keys any replica wrote, when tracked; writes announce theirs on
    /// `written_channel`.
    written: Option<Arc<WrittenKeys>>,
    written_channel: Str,
    /// `true` once `quit` was called (dropping the store then has nothing left to
    /// close); dropped with the store. Our tasks that follow the subscriber end on it
    /// (fred's event streams end only with a client that quit).
    closing: tokio::sync::watch::Sender<bool>,
    /// fred's connection tasks: a client that never connected cannot take a QUIT, and
    /// would otherwise go on reconnecting after the store is gone.
    connections: Vec<tokio::task::AbortHandle>,
    /// How long closing may wait for the QUITs.
    close_within: Duration,
    /// Lookups' head reads, gathered while one is on its way.
    heads: Arc<ReadBatches>,
    /// Lookups' whole-value reads, gathered while one is on its way.
    values: Arc<ReadBatches>,
}

impl RedisStore {
    /// Builds the pool, starts its connection tasks and waits for them at most the
    /// connect timeout: whether or not Redis is up, it returns (fred reconnects in the
    /// background).
    /// Also starts a subscriber to the namespace's invalidations, so that memory
    /// forgets what any replica invalidated (a near cache at once; any cache before
    /// an outage makes it answer from memory).
    pub(crate) async fn connect(config: &RedisConfig, namespace: &str) -> Result<Self, BuildError> {
        config.validate()?;
        let fred_config = config.fred_config()?;
        let (performance, connection, policy) = (
            config.performance_config(),
            config.connection_config(),
            config.reconnect_policy(),
        );
        let subscriber = {
            let mut builder = fred::types::Builder::from_config(fred_config.clone());
            // fred's broadcast of messages holds 32 by default: a burst read at once
            // (measured: 1 500 announcements) overran it, and the invalidation
            // listener, behind, forgot all of memory.
            let subscriber_performance = fred::types::config::PerformanceConfig {
                broadcast_channel_capacity: SUBSCRIBER_MESSAGES,
                ..performance.clone()
            };
            builder
                .set_performance_config(subscriber_performance)
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
            config.pool_size_value(),
        )
        .map_err(|e| BuildError::invalid("redis pool", e))?;
        // `connect` spawns the connection tasks; unlike `init` it does not wait.
        let mut connections: Vec<_> = pool
            .connect_pool()
            .iter()
            .map(tokio::task::JoinHandle::abort_handle)
            .collect();
        let connected =
            tokio::time::timeout(config.connect_timeout_value(), pool.wait_for_connect()).await;
        let connected = matches!(connected, Ok(Ok(())));
        if !connected {
            tracing::warn!(target: TARGET, "redis is not reachable yet: serving from memory until it is");
        }
        let health = HealthState::new(pool.size(), connected);
        watch_events(pool.clients(), &health);
        let (closing, closed) = tokio::sync::watch::channel(false);
        let probe = (config.probe_interval_value(), config.probe_timeout_value());
        let keys = RedisKeys::new(namespace);
        // Not on a cluster: one scan would not cover its primaries, and its writes
        // announce nothing; there every lookup reads Redis, as untracked.
        let clustered = pool.clients().iter().any(ClientLike::is_clustered);
        if clustered && config.written_keys_value().is_some() {
            tracing::warn!(target: TARGET, "redis: track_written_keys does nothing on a Redis Cluster; every lookup reads Redis");
        }
        let written = config
            .written_keys_value()
            .filter(|_| !clustered)
            .map(|max_keys| Arc::new(WrittenKeys::new(max_keys)));
        let written_channel = Str::from(keys.written_channel());
        spawn_probe(
            pool.clients().to_vec(),
            Arc::downgrade(&health),
            (probe, keys.clone()),
            closed.clone(),
        );
        // Subscribes after every reconnection, without blocking start-up.
        let (missed, reporter, subscription) = subscription::subscribe(
            &subscriber,
            keys.invalidation_channel(),
            SubscriberProbe {
                every: probe.0,
                timeout: probe.1,
                closed,
                written: written
                    .clone()
                    .map(|written| (written, keys.written_channel())),
            },
        );
        connections.push(subscription);
        let command_timeout = config.command_timeout_value();
        Ok(RedisStore {
            pool,
            subscriber,
            missed: std::sync::Mutex::new(Some((missed, reporter))),
            health,
            keys,
            writer: writes::StagingWriter::new(),
            options: one_attempt(command_timeout),
            max_value_bytes: config.max_value_bytes_value(),
            invalidation_ttl: config.invalidation_ttl_value(),
            written,
            written_channel,
            closing,
            connections,
            // Three commands (UNSUBSCRIBE, then the QUITs), each bounded by the
            // command timeout.
            close_within: command_timeout.saturating_mul(3),
            heads: Arc::new(ReadBatches::new(
                ReadKind::Heads,
                clustered,
                one_attempt(command_timeout),
            )),
            values: Arc::new(ReadBatches::new(
                ReadKind::Values,
                clustered,
                one_attempt(command_timeout),
            )),
        })
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

    /// How long fred waits for the reply to one command.
    pub(crate) fn command_timeout(&self) -> Duration {
        self.options.timeout.unwrap_or(Duration::MAX)
    }

    /// `connection` with the per-call limits; `timeout`, when given, in place of the
    /// command timeout.
    fn limited(&self, connection: &Client, timeout: Option<Duration>) -> WithOptions<Client> {
        match timeout {
            None => connection.with_options(&self.options),
            Some(timeout) => connection.with_options(&Options {
                timeout: Some(timeout),
                ..self.options.clone()
            }),
        }
    }

    /// The readers' connection (another one for a retry).
    fn reader_connection(&self, attempt: u8) -> Result<&Client, StoreError> {
        let index = self
            .health
            .pick_reader(attempt)
            .ok_or_else(StoreError::unavailable)?;
        self.pool
            .clients()
            .get(index)
            .ok_or_else(StoreError::unavailable)
    }

    /// Whether `entry` is too large to be sent, known without encoding it: its body
    /// alone is over `max_value_bytes` (the writer checks the encoded size).
    pub(crate) fn surely_too_large(&self, entry: &Entry) -> bool {
        entry.body_len() > self.max_value_bytes
    }

    pub(crate) fn health(&self) -> RedisHealth {
        let mut view = self.health.view();
        view.written_keys_complete = self.written.as_ref().map(|written| written.complete());
        view
    }

    /// When Redis last came back after an outage (ms since the epoch; 0: never).
    pub(crate) fn recovered_at(&self) -> u64 {
        self.health.recovered_at()
    }

    /// Told each time Redis is found to have lost its data.
    pub(crate) fn data_lost(&self) -> Arc<tokio::sync::Notify> {
        self.health.data_lost()
    }

    /// Whether memory is re-seeding a Redis that lost its data.
    pub(crate) fn reseeding(&self) -> bool {
        self.health.reseeding()
    }

    pub(crate) fn set_reseeding(&self, on: bool) {
        self.health.set_reseeding(on);
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
        let value = self.get_encoded(key, attempt, None).await?.into_bytes();
        Ok(value.and_then(|bytes| decoded(key, bytes)))
    }

    /// The value under `key` as Redis holds it, not decoded yet: a lookup that finds
    /// the same version in memory need not decode it (`decoded`, otherwise).
    /// `timeout`, when given, replaces the command timeout for this attempt.
    pub(crate) async fn get_encoded(
        &self,
        key: &CacheKey,
        attempt: u8,
        timeout: Option<Duration>,
    ) -> Result<KeyRead, StoreError> {
        let connection = self.reader_connection(attempt)?;
        let (_lead, name) = match self.turn(&self.values, key, attempt, connection) {
            Turn::Wait(answer) => return batches::wait(answer, self.bound(timeout)).await,
            Turn::Lead(lead, name) => (Some(lead), name),
            Turn::Alone(name) => (None, name),
        };
        // Boxed: fred's `GET` future is about 7 KB, and every future that awaits a
        // read (the attempts, the read flight, the lookup) would hold it inline and be
        // moved with it.
        Box::pin(self.limited(connection, timeout).get(name))
            .await
            .map(KeyRead::alone)
            .map_err(StoreError::command)
    }

    /// Where a lookup's read of `key` goes: into `batches`' queue, or alone (a retry
    /// reads alone, on another connection).
    fn turn<'a>(
        &'a self,
        batches: &'a Arc<ReadBatches>,
        key: &CacheKey,
        attempt: u8,
        connection: &'a Client,
    ) -> Turn<'a> {
        let name = self.keys.entry(key);
        if attempt == 0 {
            batches.turn(name, connection, &self.health)
        } else {
            Turn::Alone(name)
        }
    }

    /// How long a queued lookup waits for its batch: its own attempt's bound.
    fn bound(&self, timeout: Option<Duration>) -> Duration {
        timeout.unwrap_or_else(|| self.command_timeout())
    }

    /// At least the head of the value under `key` (its first [`VERSION_HEAD`] bytes,
    /// `GETRANGE`): enough to tell which version Redis holds without reading it all;
    /// no head when absent. Where Redis refuses `GETRANGE` (an ACL user without it),
    /// the value is read whole, and so are the lookups' from then on (until a
    /// capability check finds it allowed). `timeout` as for
    /// [`get_encoded`](Self::get_encoded).
    pub(crate) async fn get_head(
        &self,
        key: &CacheKey,
        attempt: u8,
        timeout: Option<Duration>,
    ) -> Result<KeyRead, StoreError> {
        let last = VERSION_HEAD - 1;
        let connection = self.reader_connection(attempt)?;
        let (_lead, name) = match self.turn(&self.heads, key, attempt, connection) {
            Turn::Wait(answer) => return batches::wait(answer, self.bound(timeout)).await,
            Turn::Lead(lead, name) => (Some(lead), name),
            Turn::Alone(name) => (None, name),
        };
        let reader = self.limited(connection, timeout);
        match Box::pin(reader.getrange::<Bytes, _>(name, 0, last)).await {
            // Redis answers an absent key's range as empty; no stored value is empty.
            Ok(head) => Ok(KeyRead::alone((!head.is_empty()).then_some(head))),
            Err(error) if capabilities::refused(&error) => {
                self.health.refuse_head_reads();
                tracing::warn!(target: TARGET, error = %error, "redis refuses GETRANGE: lookups read values whole");
                Box::pin(reader.get(self.keys.entry(key)))
                    .await
                    .map(KeyRead::alone)
                    .map_err(StoreError::command)
            }
            Err(error) => Err(StoreError::command(error)),
        }
    }

    /// Whether lookups may read only the head of a value.
    pub(crate) fn head_reads_allowed(&self) -> bool {
        self.health.head_reads_allowed()
    }

    /// Whether Redis surely holds nothing under `key` (the written keys are tracked,
    /// complete, and hold no live one of it): a read would find nothing.
    pub(crate) fn surely_absent(&self, key: &CacheKey) -> bool {
        self.written
            .as_ref()
            .is_some_and(|written| written.surely_absent(key))
    }

    /// Since when the subscriber may have missed invalidations, each time it is back
    /// (and a reporter of windows, for its listener to report falling behind);
    /// `None` after the first call.
    pub(crate) fn missed_windows(&self) -> Option<(MissedWindows, WindowReporter)> {
        self.missed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The channel invalidations are published on.
    pub(crate) fn invalidation_channel(&self) -> String {
        self.keys.invalidation_channel()
    }

    /// Messages on the subscriber's channels: invalidations published by any
    /// replica, and the written keys' announcements when they are tracked.
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
