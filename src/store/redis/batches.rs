//! Reads of different keys gathered into one command while others are on their way.
//!
//! Most of a Redis read's cost on this side is fred's work for one command (building
//! it, a hop to its router task, encoding, the reply's parsing and the wake-up), not
//! the bytes it reads. A lookup that finds fewer than [`ALONE_AT_ONCE`] reads of its
//! kind on their way sends its own at once; the lookups that arrive while that many
//! are on their way queue, and when one ends their keys are read together ([`heads`](super::heads): one script call of `GETRANGE`s;
//! [`values`](super::values): one `MGET`), up to [`MAX_BATCH`] keys a command, by a
//! task that goes on while lookups keep queueing. Every lookup still gets an answer
//! from a read sent after it arrived, and waits at most its own bound. Not on a Redis
//! Cluster (one command's keys must share a slot), nor where Redis refuses the
//! batch's command (the queued keys are then read one by one, once, and lookups
//! read alone until a capability check finds the command allowed again).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::{Client, WithOptions};
use fred::interfaces::{ClientLike, KeysInterface};
use fred::types::config::Options;
use tokio::sync::oneshot;

use super::health::HealthState;
use super::{heads, values, StoreError};

/// Keys one command reads at most: Redis runs nothing else while it answers one,
/// and 64 `GETRANGE`s (about 1.2 µs each, `INFO commandstats`) or a 64-key `MGET` of
/// entries of a few KiB hold it for well under a millisecond.
pub(super) const MAX_BATCH: usize = 64;

/// Reads of one kind that go alone at once before lookups queue: with fewer in
/// flight a batch would hold one or two keys, and its hop through a task of its own
/// cost more than it saved (`redis_instructions` at 2 requests in flight: a Redis hit
/// 43 483 instructions queueing behind one read, 34 143 with four alone; a miss's read
/// 50 130 against 40 934), while at 16 and more nearly every read still goes in a
/// batch (BENCHMARKS.md, "Whole-value reads in batches").
const ALONE_AT_ONCE: usize = 4;

/// Lookups that may queue at most; past it a lookup reads alone (a frozen Redis
/// must not grow the queue without bound).
const MAX_WAITING: usize = 4096;

/// What a queued lookup is answered.
pub(super) type Answer = Result<KeyRead, StoreError>;

/// What a read of one key found: its bytes (the value's head, or the whole value;
/// `None`: Redis holds no value under it), and whether a command that read other
/// keys' too found them.
#[derive(Debug)]
pub(crate) struct KeyRead {
    bytes: Option<Bytes>,
    batched: bool,
}

impl KeyRead {
    /// Bytes read by a command of the key's own (or a value read whole and cut).
    pub(crate) fn alone(bytes: Option<Bytes>) -> Self {
        KeyRead {
            bytes,
            batched: false,
        }
    }

    /// Bytes read by a batch's command.
    pub(super) fn batched(bytes: Option<Bytes>) -> Self {
        KeyRead {
            bytes,
            batched: true,
        }
    }

    /// Whether a command that read other keys' too found them.
    pub(crate) fn was_batched(&self) -> bool {
        self.batched
    }

    /// The bytes read, `None` if Redis holds no value.
    pub(crate) fn into_bytes(self) -> Option<Bytes> {
        self.bytes
    }
}

/// What a batch reads of each key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadKind {
    /// The value's head (its first `VERSION_HEAD` bytes), in a script call.
    Heads,
    /// The whole value, in an `MGET`.
    Values,
}

impl ReadKind {
    /// Whether this Redis lets this kind of read go in batches now.
    fn allowed(self, health: &HealthState) -> bool {
        match self {
            ReadKind::Heads => health.head_batches_allowed(),
            ReadKind::Values => health.value_batches_allowed(),
        }
    }
}

/// The queue of one kind of read, and how many are on their way.
pub(crate) struct ReadBatches {
    state: Mutex<Queue>,
    kind: ReadKind,
    /// False on a Redis Cluster.
    batching: bool,
    /// A batch's command's limits: the command timeout, whatever the deadline left
    /// to the lookup that led (each waiter is bounded by its own).
    options: Options,
}

/// How many reads (lookups' own, and batches) are on their way, and the lookups that
/// wait for the next batch.
#[derive(Default)]
struct Queue {
    on_their_way: usize,
    waiting: Vec<Waiter>,
}

/// A queued lookup: its key's name in Redis, and where its answer goes.
pub(super) struct Waiter {
    key: String,
    answer: oneshot::Sender<Answer>,
}

impl Waiter {
    /// The key's name in Redis.
    pub(super) fn key(&self) -> &str {
        &self.key
    }

    /// Hands the lookup its answer (a lookup that gave up is gone: nothing to do).
    pub(super) fn answer(self, answer: Answer) {
        let _ = self.answer.send(answer);
    }
}

/// How a lookup reads its key; the key's name comes back with a turn to read alone.
pub(crate) enum Turn<'a> {
    /// Alone, now; the lookups that queue meanwhile are read when `Lead` is dropped.
    Lead(Lead<'a>, String),
    /// Queued: the answer comes from a batch sent after it arrived.
    Wait(oneshot::Receiver<Answer>),
    /// Alone, outside the queue (no batching here, or the queue is full).
    Alone(String),
}

/// The lookup whose read is on its way: dropped (answered or not), it hands the
/// queue, if any lookup waits, to a task that reads it. Borrows what that task needs
/// and clones it only then: most reads have nobody queued behind them.
pub(crate) struct Lead<'a> {
    batches: &'a Arc<ReadBatches>,
    client: &'a Client,
    health: &'a Arc<HealthState>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let Some(first) = self.batches.next_batch() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let task = Arc::clone(self.batches).read_batches(
                    first,
                    self.client.with_options(&self.batches.options),
                    Arc::clone(self.health),
                );
                runtime.spawn(task);
            }
            // No runtime left to read them on: the waiters are told so at once.
            Err(_) => self.batches.forget(),
        }
    }
}

impl ReadBatches {
    /// A queue for `kind`; `options`: a batch's command's limits.
    pub(crate) fn new(kind: ReadKind, clustered: bool, options: Options) -> Self {
        ReadBatches {
            state: Mutex::new(Queue::default()),
            kind,
            batching: !clustered,
            options,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every change is a push or a take: a panic elsewhere leaves it consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where a read of `key` (its name in Redis) goes: `client` is the readers'
    /// connection it would use alone.
    pub(crate) fn turn<'a>(
        self: &'a Arc<Self>,
        key: String,
        client: &'a Client,
        health: &'a Arc<HealthState>,
    ) -> Turn<'a> {
        if !self.batching || !self.kind.allowed(health) {
            return Turn::Alone(key);
        }
        let mut queue = self.lock();
        if queue.on_their_way < ALONE_AT_ONCE {
            queue.on_their_way += 1;
            let lead = Lead {
                batches: self,
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

    /// The lookups queued so far, for the read that just ended to hand on; none left:
    /// that read's place is free.
    fn next_batch(&self) -> Option<Vec<Waiter>> {
        let mut queue = self.lock();
        // A lookup that gave up needs no read.
        queue.waiting.retain(|waiter| !waiter.answer.is_closed());
        if queue.waiting.is_empty() {
            queue.on_their_way = queue.on_their_way.saturating_sub(1);
            return None;
        }
        Some(std::mem::take(&mut queue.waiting))
    }

    /// Drops the queue (its lookups' receivers end) and frees the place of the read
    /// that ended.
    fn forget(&self) {
        let mut queue = self.lock();
        queue.waiting.clear();
        queue.on_their_way = queue.on_their_way.saturating_sub(1);
    }

    /// Reads the queued keys, batch after batch, until no lookup is waiting.
    async fn read_batches(
        self: Arc<Self>,
        first: Vec<Waiter>,
        client: WithOptions<Client>,
        health: Arc<HealthState>,
    ) {
        let mut next = Some(first);
        while let Some(mut waiting) = next {
            // More than a command's worth: the commands go together (fred pipelines
            // them).
            let mut reads = Vec::with_capacity(waiting.len().div_ceil(MAX_BATCH));
            while !waiting.is_empty() {
                let rest = waiting.split_off(waiting.len().min(MAX_BATCH));
                reads.push(read_batch(self.kind, &client, &health, waiting));
                waiting = rest;
            }
            futures_util::future::join_all(reads).await;
            next = self.next_batch();
        }
    }
}

/// Reads one batch of `kind`, answering each of its waiters.
async fn read_batch(
    kind: ReadKind,
    client: &WithOptions<Client>,
    health: &HealthState,
    batch: Vec<Waiter>,
) {
    match kind {
        ReadKind::Heads => heads::read(client, health, batch).await,
        ReadKind::Values => values::read(client, health, batch).await,
    }
}

/// Answers every waiter of `batch` with `error()`: what failed the batch's command
/// would have failed each read of it.
pub(super) fn fail_all(batch: Vec<Waiter>, error: impl Fn() -> StoreError) {
    for waiter in batch {
        waiter.answer(Err(error()));
    }
}

/// Reads each waiter's value whole by a `GET` of its own (Redis refused the batch's
/// command), and answers it with `keep` of the value.
pub(super) async fn read_each_whole(
    client: &WithOptions<Client>,
    batch: Vec<Waiter>,
    keep: impl Fn(Bytes) -> Bytes,
) {
    let reads = batch
        .iter()
        .map(|waiter| Box::pin(client.get::<Option<Bytes>, _>(waiter.key())));
    let values = futures_util::future::join_all(reads).await;
    for (waiter, value) in batch.into_iter().zip(values) {
        let answer = value
            .map(|value| KeyRead::alone(value.map(&keep)))
            .map_err(StoreError::command);
        waiter.answer(answer);
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
            "timed out waiting for a batch read",
        ))),
    }
}
