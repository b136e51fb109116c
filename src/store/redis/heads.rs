//! Head reads of different keys gathered into one script call while one is on its
//! way.
//!
//! Most of a Redis hit's cost on this side is fred's work for one command (building
//! it, a hop to its router task, encoding, the reply's parsing and the wake-up), not
//! the 14 bytes it reads. A lookup that finds no head read on its way sends its own
//! at once, as before; the lookups that arrive meanwhile queue, and when it ends
//! their heads are read in one `EVAL` of a script that runs a `GETRANGE` a key (up to
//! [`MAX_BATCH`] keys a call), by a task that goes on while lookups keep queueing.
//! Every lookup still gets an answer from a read sent after it arrived; a lookup
//! waits at most its own bound. Not on a Redis Cluster (a script's keys must share a
//! slot), nor where `EVAL` is refused (then the queued keys' values are read whole,
//! once, and lookups read alone until a check finds scripts allowed again).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::{Client, WithOptions};
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, Value};
use tokio::sync::oneshot;

use super::capabilities::refused;
use super::health::HealthState;
use super::StoreError;
use crate::entry::codec::VERSION_HEAD;
use crate::store::StoreErrorKind;
use crate::telemetry::TARGET;

/// The script: the first `VERSION_HEAD` bytes of each key, empty for an absent one.
const HEADS: &str =
    "local r = {} for i, k in ipairs(KEYS) do r[i] = redis.call('GETRANGE', k, 0, ARGV[1]) end return r";

/// Keys a script call reads at most: Redis runs nothing else during a call, and a
/// `GETRANGE` takes it about 1.2 µs (`INFO commandstats`), so a call holds it for
/// less than 0.1 ms.
const MAX_BATCH: usize = 64;

/// Lookups that may queue at most; past it a lookup reads alone (a frozen Redis
/// must not grow the queue without bound).
const MAX_WAITING: usize = 4096;

type Answer = Result<HeadRead, StoreError>;

/// A head read's answer: the value's head (`None`: Redis holds no value), and
/// whether a script call read it with other keys'.
#[derive(Debug)]
pub(crate) struct HeadRead {
    head: Option<Bytes>,
    batched: bool,
}

impl HeadRead {
    /// A head read by a command of its own (or a value read whole, and cut).
    pub(crate) fn alone(head: Option<Bytes>) -> Self {
        HeadRead {
            head,
            batched: false,
        }
    }

    /// Whether the head came from a script call that read other keys' heads too.
    pub(crate) fn batched(&self) -> bool {
        self.batched
    }

    /// The value's head, `None` if Redis holds no value.
    pub(crate) fn into_head(self) -> Option<Bytes> {
        self.head
    }
}

/// The queue of head reads, and whether a read is on its way.
pub(crate) struct HeadReads {
    state: Mutex<Queue>,
    /// False on a Redis Cluster.
    batching: bool,
}

/// Whether a head read (a lookup's own, or a batch) is on its way, and the lookups
/// that wait for the next batch.
#[derive(Default)]
struct Queue {
    on_its_way: bool,
    waiting: Vec<Waiter>,
}

/// A queued lookup: its key's name in Redis, and where its head goes.
struct Waiter {
    key: String,
    answer: oneshot::Sender<Answer>,
}

/// How a lookup reads its head; the key's name comes back with a turn to read alone.
pub(crate) enum Turn<'a> {
    /// Alone, now; the lookups that queue meanwhile are read when `Lead` is dropped.
    Lead(Lead<'a>, String),
    /// Queued: the answer comes from a script call sent after it arrived.
    Wait(oneshot::Receiver<Answer>),
    /// Alone, outside the queue (no batching here, or the queue is full).
    Alone(String),
}

/// The lookup whose read is on its way: dropped (answered or not), it hands the
/// queue, if any lookup waits, to a task that reads it. Borrows what that task needs
/// and clones it only then: most reads have nobody queued behind them.
pub(crate) struct Lead<'a> {
    heads: &'a Arc<HeadReads>,
    client: &'a WithOptions<Client>,
    health: &'a Arc<HealthState>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let Some(first) = self.heads.next_batch() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let task = Arc::clone(self.heads).read_batches(
                    first,
                    self.client.clone(),
                    Arc::clone(self.health),
                );
                runtime.spawn(task);
            }
            // No runtime left to read them on: the waiters are told so at once.
            Err(_) => self.heads.forget(),
        }
    }
}

impl HeadReads {
    pub(crate) fn new(clustered: bool) -> Self {
        HeadReads {
            state: Mutex::new(Queue::default()),
            batching: !clustered,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every change is a push or a take: a panic elsewhere leaves it consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where a head read of `key` (its name in Redis) goes: `client` is the reader it
    /// would use alone.
    pub(crate) fn turn<'a>(
        self: &'a Arc<Self>,
        key: String,
        client: &'a WithOptions<Client>,
        health: &'a Arc<HealthState>,
    ) -> Turn<'a> {
        if !self.batching || !health.scripts_allowed() {
            return Turn::Alone(key);
        }
        let mut queue = self.lock();
        if !queue.on_its_way {
            queue.on_its_way = true;
            let lead = Lead {
                heads: self,
                client,
                health,
            };
            return Turn::Lead(lead, key);
        }
        if queue.waiting.len() >= MAX_WAITING {
            return Turn::Alone(key);
        }
        let (answer, receiver) = oneshot::channel();
        queue.waiting.push(Waiter { key, answer });
        Turn::Wait(receiver)
    }

    /// The lookups queued so far; none left: nothing is on its way any more.
    fn next_batch(&self) -> Option<Vec<Waiter>> {
        let mut queue = self.lock();
        // A lookup that gave up needs no read.
        queue.waiting.retain(|waiter| !waiter.answer.is_closed());
        if queue.waiting.is_empty() {
            queue.on_its_way = false;
            return None;
        }
        Some(std::mem::take(&mut queue.waiting))
    }

    /// Drops the queue: its lookups read alone (their receivers end).
    fn forget(&self) {
        let mut queue = self.lock();
        queue.waiting.clear();
        queue.on_its_way = false;
    }

    /// Reads the queued heads, batch after batch, until no lookup is waiting.
    async fn read_batches(
        self: Arc<Self>,
        first: Vec<Waiter>,
        client: WithOptions<Client>,
        health: Arc<HealthState>,
    ) {
        let mut next = Some(first);
        while let Some(mut waiting) = next {
            // More than a call's worth: the calls go together (fred pipelines them).
            let mut calls = Vec::with_capacity(waiting.len().div_ceil(MAX_BATCH));
            while !waiting.is_empty() {
                let rest = waiting.split_off(waiting.len().min(MAX_BATCH));
                calls.push(read_batch(&client, &health, waiting));
                waiting = rest;
            }
            futures_util::future::join_all(calls).await;
            next = self.next_batch();
        }
    }
}

/// Answers each waiter with its key's head, read by one script call (or one by one,
/// if Redis refuses the script).
async fn read_batch(client: &WithOptions<Client>, health: &HealthState, batch: Vec<Waiter>) {
    let mut args = Vec::with_capacity(batch.len() + 3);
    args.push(Value::Bytes(Bytes::from_static(HEADS.as_bytes())));
    args.push(Value::Integer(
        i64::try_from(batch.len()).unwrap_or(i64::MAX),
    ));
    args.extend(batch.iter().map(|waiter| Value::from(waiter.key.as_str())));
    args.push(Value::Integer(i64::try_from(VERSION_HEAD - 1).unwrap_or(0)));
    let eval = CustomCommand::new_static("EVAL", ClusterHash::Offset(2), false);
    match client.custom::<Vec<Bytes>, _>(eval, args).await {
        Ok(heads) if heads.len() == batch.len() => {
            for (waiter, head) in batch.into_iter().zip(heads) {
                // Redis answers an absent key's range as empty; no stored value is.
                let _ = waiter.answer.send(Ok(HeadRead {
                    head: (!head.is_empty()).then_some(head),
                    batched: true,
                }));
            }
        }
        Ok(heads) => {
            // Not what the script returns: no waiter is given another key's head.
            tracing::warn!(target: TARGET, keys = batch.len(), heads = heads.len(), "redis: a head batch came back with the wrong count");
            for waiter in batch {
                let _ = waiter.answer.send(Err(StoreError::unavailable()));
            }
        }
        Err(error) if refused(&error) => {
            // `EVAL`, or the `GETRANGE` in it: the values are read whole, once, and
            // their heads answered (lookups read alone from now on).
            tracing::warn!(target: TARGET, error = %error, "redis refuses the head script: lookups read heads alone");
            health.refuse_scripts();
            let reads = batch
                .iter()
                .map(|waiter| Box::pin(client.get::<Option<Bytes>, _>(waiter.key.as_str())));
            let values = futures_util::future::join_all(reads).await;
            for (waiter, value) in batch.into_iter().zip(values) {
                let answer = value
                    .map(|value| value.map(|value| value.slice(..value.len().min(VERSION_HEAD))))
                    .map(HeadRead::alone)
                    .map_err(StoreError::command);
                let _ = waiter.answer.send(answer);
            }
        }
        Err(error) if StoreError::command(error.clone()).kind() == StoreErrorKind::Reply => {
            // An error reply for the call as a whole (a key holding another type, say):
            // each key read alone, so that one key's error is its own lookup's only.
            let last = VERSION_HEAD - 1;
            let reads = batch
                .iter()
                .map(|waiter| Box::pin(client.getrange::<Bytes, _>(waiter.key.as_str(), 0, last)));
            let heads = futures_util::future::join_all(reads).await;
            for (waiter, head) in batch.into_iter().zip(heads) {
                let answer = head
                    .map(|head| HeadRead::alone((!head.is_empty()).then_some(head)))
                    .map_err(StoreError::command);
                let _ = waiter.answer.send(answer);
            }
        }
        Err(error) => {
            // Redis unreachable, slow or busy: every lookup of the batch would be.
            for waiter in batch {
                let _ = waiter.answer.send(Err(StoreError::command(error.clone())));
            }
        }
    }
}

/// A queued lookup's answer, or a timeout once `bound` passed (the read it waits on
/// is then late: its lookup's deadline, or the command timeout, is what it would
/// have waited alone).
pub(crate) async fn wait(receiver: oneshot::Receiver<Answer>, bound: Duration) -> Answer {
    match tokio::time::timeout(bound, receiver).await {
        Ok(Ok(answer)) => answer,
        // The batch's task ended without answering (its runtime shut down).
        Ok(Err(_)) => Err(StoreError::unavailable()),
        Err(_) => Err(StoreError::command(fred::error::Error::new(
            fred::error::ErrorKind::Timeout,
            "timed out waiting for a head batch",
        ))),
    }
}
