//! Health of the Redis connections, from fred's events and our own PING probe.
//!
//! fred's connection state lags a dropped connection by up to a second, and nothing in
//! fred notices a frozen server under load (see `shared/notes/fred-under-faults.md`).
//! So each pooled client is marked down on a lost connection (`on_error` with a
//! server), up on a reconnection, and down after two PINGs in a row go unanswered
//! within the probe timeout, which also forces a reconnection. Commands go only to
//! clients marked up; with none up, the tier fails at once without touching Redis.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use std::time::{Duration, SystemTime};

use fred::clients::Client;
use fred::prelude::*;
use fred::types::config::Options;

use super::capabilities::{self, Findings};
use super::keys::RedisKeys;
use super::outage;
use crate::breaker::CircuitBreaker;
use crate::entry::codec::millis_since_epoch;
use crate::store::until_closed;
use crate::telemetry::{MISSING_COMMANDS, TARGET};

/// What the Redis tier knows of its connections, from
/// [`HybridCache::redis_health`](crate::HybridCache::redis_health).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisHealth {
    /// Pooled connections believed healthy.
    pub connected: usize,
    /// Pooled connections in all.
    pub clients: usize,
    /// The last connection error, if any.
    pub last_error: Option<String>,
    /// When the last error happened.
    pub last_error_at: Option<SystemTime>,
    /// Since when at least one connection has been healthy; `None` while none is.
    pub up_since: Option<SystemTime>,
    /// Commands (and options) the cache relies on that this Redis refused, as found
    /// by the check run on connecting and after each outage: not permitted to the
    /// ACL user, renamed away, or too new for the server (`pexpire nx|gt (Redis 7)`).
    /// Empty when everything was allowed, or before the first check.
    pub missing_commands: Vec<String>,
    /// The server's version (`redis 7.0.15`, `valkey 8.0.1`), when `INFO` is allowed.
    pub server_version: Option<String>,
    /// With [`RedisConfig::track_written_keys`](crate::RedisConfig::track_written_keys),
    /// whether the set of written keys is complete (a lookup of a key no replica
    /// wrote skips Redis); `None` when they are not tracked (not asked for, or on a
    /// Redis Cluster).
    pub written_keys_complete: Option<bool>,
}

/// Per-call options of a command that fails at once rather than wait for a
/// reconnection, is sent once (our callers retry or fall back), and waits at most
/// `timeout` for its answer.
pub(crate) fn one_attempt(timeout: Duration) -> Options {
    Options {
        timeout: Some(timeout),
        fail_fast: true,
        max_attempts: Some(1),
        ..Options::default()
    }
}

/// Pings in a row without an answer before a connection is marked down.
pub(crate) const FAILED_PINGS_TO_DOWN: u32 = 2;

#[derive(Default)]
struct ClientHealth {
    up: AtomicBool,
    failed_pings: AtomicU32,
}

#[derive(Default)]
struct Errors {
    last: Option<(String, SystemTime)>,
    up_since: Option<SystemTime>,
    /// The last capability check, and the `up_since` it was made for.
    checked: Option<(SystemTime, Findings)>,
}

/// Shared by the store, fred's event listeners and the probe task.
pub(crate) struct HealthState {
    clients: Vec<ClientHealth>,
    next: AtomicUsize,
    errors: Mutex<Errors>,
    /// Driven by the connections: all lost → open at once; one back → half-open.
    breaker: Mutex<Option<CircuitBreaker>>,
    /// Whether every connection has been lost since Redis was last up (from the
    /// start, when it was not reachable then).
    down: AtomicBool,
    /// When Redis last came back after an outage, here or as another replica
    /// recorded it (ms since the epoch; 0: never).
    recovered_at: AtomicU64,
    /// A recovery seen here that Redis has not recorded yet.
    unpublished: AtomicBool,
    /// The epoch this replica last read (see `outage`).
    epoch: Mutex<Option<u64>>,
    /// Told when Redis is found to have lost its data (the re-seed waits on it).
    data_lost: Arc<tokio::sync::Notify>,
    /// While memory re-seeds a Redis that lost its data: a Redis miss is not yet the
    /// shared truth.
    reseeding: AtomicBool,
    /// Whether writes check their marks in a script: until a capability check finds
    /// `EVAL` or a command the scripts run refused, or a script is refused as it runs
    /// (its batch is then written again without it).
    scripts: AtomicBool,
    /// Whether a lookup holding a response in memory reads only the head of Redis's
    /// value (`GETRANGE`): until a capability check finds it refused, or Redis refuses
    /// one as it runs (lookups then read values whole).
    head_reads: AtomicBool,
    /// Whether lookups' head reads go in batches (a script of `GETRANGE`s): until a
    /// capability check finds `EVAL` or `GETRANGE` refused, or Redis refuses the
    /// script as it runs.
    head_batches: AtomicBool,
    /// Whether lookups' whole-value reads go in batches (`MGET`): until a capability
    /// check finds `MGET` refused, or Redis refuses one as it runs.
    value_batches: AtomicBool,
}

impl HealthState {
    pub(crate) fn new(clients: usize, all_up: bool) -> Arc<Self> {
        let state = HealthState {
            clients: (0..clients).map(|_| ClientHealth::default()).collect(),
            next: AtomicUsize::new(0),
            errors: Mutex::new(Errors::default()),
            breaker: Mutex::new(None),
            down: AtomicBool::new(!all_up),
            recovered_at: AtomicU64::new(0),
            unpublished: AtomicBool::new(false),
            epoch: Mutex::new(None),
            data_lost: Arc::new(tokio::sync::Notify::new()),
            reseeding: AtomicBool::new(false),
            scripts: AtomicBool::new(true),
            head_reads: AtomicBool::new(true),
            head_batches: AtomicBool::new(true),
            value_batches: AtomicBool::new(true),
        };
        for client in &state.clients {
            client.up.store(all_up, Ordering::Relaxed);
        }
        if all_up {
            state.lock().up_since = Some(SystemTime::now());
        }
        Arc::new(state)
    }

    /// Lets the connections drive `breaker`.
    pub(crate) fn drive(&self, breaker: CircuitBreaker) {
        *self
            .breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(breaker);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Errors> {
        self.errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The connection for a read: the first believed up, or for a retry (`attempt`
    /// 1, 2, …) the next ones. Reads share one connection so that the lookups in
    /// flight at once go out in one write, and come back in one read.
    pub(crate) fn pick_reader(&self, attempt: u8) -> Option<usize> {
        let up = |i: &usize| self.clients[*i].up.load(Ordering::Relaxed);
        let count = (0..self.clients.len()).filter(up).count();
        if count == 0 {
            return None;
        }
        (0..self.clients.len())
            .filter(up)
            .nth(usize::from(attempt) % count)
    }

    /// The connection for anything but a read: round-robin over those believed up,
    /// leaving the readers' connection alone while another one is up (a write batch
    /// is large, and reads must not queue behind it).
    pub(crate) fn pick(&self) -> Option<usize> {
        let n = self.clients.len();
        let reader = self.pick_reader(0)?;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| i != reader && self.clients[i].up.load(Ordering::Relaxed))
            .or(Some(reader))
    }

    fn set_up(&self, index: usize, up: bool) {
        let Some(client) = self.clients.get(index) else {
            return;
        };
        let was = client.up.swap(up, Ordering::Relaxed);
        if up {
            client.failed_pings.store(0, Ordering::Relaxed);
        }
        if was != up {
            let connected = self.connected();
            let breaker = self
                .breaker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mut errors = self.lock();
            match (up, connected) {
                (true, 1) => {
                    errors.up_since = Some(SystemTime::now());
                    if self.down.swap(false, Ordering::Relaxed) {
                        self.adopt_recovery(millis_since_epoch(SystemTime::now()));
                        self.unpublished.store(true, Ordering::Relaxed);
                    }
                    if let Some(breaker) = &breaker {
                        breaker.force_half_open();
                    }
                }
                (false, 0) => {
                    errors.up_since = None;
                    self.down.store(true, Ordering::Relaxed);
                    if let Some(breaker) = &breaker {
                        breaker.force_open();
                    }
                }
                _ => {}
            }
            tracing::info!(target: TARGET, client = index, up, connected, "redis connection state");
        }
    }

    fn record_error(&self, error: &fred::error::Error) {
        self.lock().last = Some((error.to_string(), SystemTime::now()));
    }

    fn connected(&self) -> usize {
        self.clients
            .iter()
            .filter(|c| c.up.load(Ordering::Relaxed))
            .count()
    }

    pub(crate) fn view(&self) -> RedisHealth {
        let errors = self.lock();
        let findings = errors.checked.as_ref().map(|(_, findings)| findings);
        RedisHealth {
            connected: self.connected(),
            clients: self.clients.len(),
            last_error: errors.last.as_ref().map(|(e, _)| e.clone()),
            last_error_at: errors.last.as_ref().map(|(_, at)| *at),
            up_since: errors.up_since,
            missing_commands: findings
                .map(|f| f.missing.iter().map(|name| (*name).to_owned()).collect())
                .unwrap_or_default(),
            server_version: findings.and_then(|f| f.version.clone()),
            // The store that tracks them says.
            written_keys_complete: None,
        }
    }

    /// When Redis last came back after an outage (ms since the epoch; 0: never): what
    /// was stored before may have missed an invalidation.
    pub(crate) fn recovered_at(&self) -> u64 {
        self.recovered_at.load(Ordering::Relaxed)
    }

    /// Told each time Redis is found to have lost its data.
    pub(crate) fn data_lost(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.data_lost)
    }

    /// Whether writes check their marks in a script (no capability check found `EVAL`
    /// or a command the scripts run refused, and no script was refused since).
    pub(crate) fn scripts_allowed(&self) -> bool {
        self.scripts.load(Ordering::Relaxed)
    }

    /// Stops writes using the script (Redis refused it), until a check finds it allowed.
    pub(crate) fn refuse_scripts(&self) {
        self.scripts.store(false, Ordering::Relaxed);
    }

    /// Whether lookups may read only the head of a value (`GETRANGE` not refused).
    pub(crate) fn head_reads_allowed(&self) -> bool {
        self.head_reads.load(Ordering::Relaxed)
    }

    /// Stops head reads (Redis refused `GETRANGE`), until a check finds it allowed.
    pub(crate) fn refuse_head_reads(&self) {
        self.head_reads.store(false, Ordering::Relaxed);
    }

    /// Whether lookups' head reads may go in batches (the head script not refused).
    pub(crate) fn head_batches_allowed(&self) -> bool {
        self.head_batches.load(Ordering::Relaxed)
    }

    /// Stops head batches (Redis refused the head script), until a check finds
    /// `EVAL` and `GETRANGE` allowed.
    pub(crate) fn refuse_head_batches(&self) {
        self.head_batches.store(false, Ordering::Relaxed);
    }

    /// Whether lookups' whole-value reads may go in batches (`MGET` not refused).
    pub(crate) fn value_batches_allowed(&self) -> bool {
        self.value_batches.load(Ordering::Relaxed)
    }

    /// Stops value batches (Redis refused `MGET`), until a check finds it allowed.
    pub(crate) fn refuse_value_batches(&self) {
        self.value_batches.store(false, Ordering::Relaxed);
    }

    /// Whether memory is re-seeding a Redis that lost its data.
    pub(crate) fn reseeding(&self) -> bool {
        self.reseeding.load(Ordering::Relaxed)
    }

    pub(crate) fn set_reseeding(&self, on: bool) {
        self.reseeding.store(on, Ordering::Relaxed);
    }

    /// Reads what Redis records of outages: adopts the latest recovery, and compares
    /// the epoch with the one last read. A change means Redis lost its data:
    /// everything stored before now is refreshed on its next use (here and, once
    /// recorded, on every replica), and memory re-seeds Redis.
    async fn read_outages<C: fred::interfaces::ClientLike>(&self, client: &C, keys: &RedisKeys) {
        let Some(recorded) = outage::read_and_keep_epoch(client, keys).await else {
            return;
        };
        if let Some(at) = recorded.recovered {
            self.adopt_recovery(at);
        }
        let Some(epoch) = recorded.epoch else {
            return;
        };
        let known = self
            .epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(epoch);
        if known.is_some_and(|known| known != epoch) {
            tracing::warn!(target: TARGET, "redis lost its data: re-seeding it from memory; what was stored before is refreshed on its next use");
            self.adopt_recovery(millis_since_epoch(SystemTime::now()));
            self.unpublished.store(true, Ordering::Relaxed);
            self.data_lost.notify_one();
        }
    }

    /// Takes a recovery at `at` (ms) if it is the latest known.
    fn adopt_recovery(&self, at: u64) {
        let before = self.recovered_at.fetch_max(at, Ordering::Relaxed);
        if at > before {
            tracing::info!(target: TARGET, recovered_at = at, "redis came back after an outage: what was stored before is refreshed on its next use");
        }
    }

    /// Since when Redis has been up, if it has not been checked since then.
    fn unchecked_since(&self) -> Option<SystemTime> {
        let errors = self.lock();
        let up_since = errors.up_since?;
        match &errors.checked {
            Some((checked, _)) if *checked == up_since => None,
            _ => Some(up_since),
        }
    }

    /// Keeps what a check made for `up_since` found, and says what is missing.
    fn record_findings(&self, up_since: SystemTime, findings: Findings) {
        metrics::gauge!(MISSING_COMMANDS).set(findings.missing.len() as f64);
        let scripts = !capabilities::SCRIPT_COMMANDS
            .iter()
            .any(|command| findings.missing.contains(command));
        self.scripts.store(scripts, Ordering::Relaxed);
        self.head_reads.store(
            !findings.missing.contains(&capabilities::GETRANGE),
            Ordering::Relaxed,
        );
        self.head_batches.store(
            !capabilities::HEAD_SCRIPT_COMMANDS
                .iter()
                .any(|command| findings.missing.contains(command)),
            Ordering::Relaxed,
        );
        self.value_batches.store(
            !findings.missing.contains(&capabilities::MGET),
            Ordering::Relaxed,
        );
        if !findings.missing.is_empty() {
            tracing::warn!(
                target: TARGET,
                missing = ?findings.missing,
                version = ?findings.version,
                "redis refuses commands the cache relies on: what needs them is off (see the README's Redis requirements)"
            );
        }
        self.lock().checked = Some((up_since, findings));
    }
}

/// Subscribes to each client's connection events.
/// The listeners hold the state weakly: the store owns it, and dropping the store ends
/// the probe.
pub(crate) fn watch_events(clients: &[Client], health: &Arc<HealthState>) {
    for (index, client) in clients.iter().enumerate() {
        let on_error = Arc::downgrade(health);
        // Dropping the handle detaches the listener; it ends with the client.
        drop(client.on_error(move |(error, server)| {
            if let Some(health) = on_error.upgrade() {
                health.record_error(&error);
                // `Some(server)`: a live connection was lost; `None`: a reconnection
                // attempt failed, and the client is down already.
                if server.is_some() {
                    health.set_up(index, false);
                }
            }
            async { Ok(()) }
        }));
        let on_reconnect = Arc::downgrade(health);
        drop(client.on_reconnect(move |_server| {
            if let Some(health) = on_reconnect.upgrade() {
                health.set_up(index, true);
            }
            async { Ok(()) }
        }));
    }
}

/// PINGs every client each `every`; two unanswered in a row within `timeout` mark it
/// down and force a reconnection. Once Redis is up (at start, and after each outage)
/// it checks what Redis allows (`capabilities`). Ends when the store closes or is
/// dropped.
pub(crate) fn spawn_probe(
    clients: Vec<Client>,
    health: Weak<HealthState>,
    ((every, timeout), keys): ((Duration, Duration), RedisKeys),
    mut closed: tokio::sync::watch::Receiver<bool>,
) {
    let options = one_attempt(timeout);
    // The recorded recovery is read about once a second (at least every tick).
    let read_recovery_every =
        (Duration::from_secs(1).as_millis() / every.as_millis().max(1)).max(1);
    tokio::spawn(async move {
        let mut tick: u128 = 0;
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = until_closed(&mut closed) => return,
            }
            let Some(health) = health.upgrade() else {
                return;
            };
            for (index, client) in clients.iter().enumerate() {
                let answered: Result<(), _> = client.with_options(&options).ping(None).await;
                match answered {
                    Ok(()) => {
                        if client.is_connected() {
                            health.set_up(index, true);
                        }
                    }
                    Err(error) => {
                        let Some(state) = health.clients.get(index) else {
                            continue;
                        };
                        let failed = state.failed_pings.fetch_add(1, Ordering::Relaxed) + 1;
                        if failed >= FAILED_PINGS_TO_DOWN && state.up.load(Ordering::Relaxed) {
                            health.record_error(&error);
                            health.set_up(index, false);
                            // A frozen server keeps the socket open: only a new
                            // connection finds out whether it came back.
                            let client = client.clone();
                            tokio::spawn(async move {
                                let _ = client.force_reconnection().await;
                            });
                        }
                    }
                }
            }
            let Some(client) = health.pick().and_then(|index| clients.get(index)) else {
                continue;
            };
            let client = client.with_options(&options);
            if let Some(up_since) = health.unchecked_since() {
                if let Some(findings) = capabilities::check(&client, &keys).await {
                    health.record_findings(up_since, findings);
                }
            }
            // About once a second, and at once after a return: did Redis lose its
            // data, and when did it (for any replica) last come back?
            let every_second = tick % read_recovery_every == 0;
            tick += 1;
            if every_second || health.unpublished.load(Ordering::Relaxed) {
                health.read_outages(&client, &keys).await;
            }
            if health.unpublished.swap(false, Ordering::Relaxed)
                && !outage::publish(&client, &keys, health.recovered_at()).await
            {
                health.unpublished.store(true, Ordering::Relaxed);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_share_the_first_connection_up_and_a_retry_takes_the_next() {
        let health = HealthState::new(4, true);
        assert_eq!(health.pick_reader(0), Some(0));
        assert_eq!(health.pick_reader(0), Some(0));
        assert_eq!(health.pick_reader(1), Some(1));
        health.set_up(0, false);
        assert_eq!(health.pick_reader(0), Some(1));
        assert_eq!(health.pick_reader(3), Some(1), "wraps over the ones up");
        for i in 1..4 {
            health.set_up(i, false);
        }
        assert_eq!(health.pick_reader(0), None);
    }

    #[test]
    fn other_operations_leave_the_readers_connection_alone_while_another_is_up() {
        let health = HealthState::new(3, true);
        let picked: Vec<_> = (0..6).filter_map(|_| health.pick()).collect();
        assert!(picked.iter().all(|&i| i != 0), "{picked:?}");
        assert!(picked.contains(&1) && picked.contains(&2), "{picked:?}");
        health.set_up(1, false);
        health.set_up(2, false);
        assert_eq!(health.pick(), Some(0), "alone, it takes everything");
        health.set_up(0, false);
        assert_eq!(health.pick(), None);
    }
}
