//! The background writer: what goes to Redis off the response path, in the order it
//! was queued (runs of entries as one pipeline each, a delete after the writes queued
//! before it, a lease's release after its fill's write), and what Redis could not
//! take, kept (bounded) and replayed, oldest first, once it can.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tower::ServiceExt;

use super::redis_tier::{count_failure, counts_against_redis, RedisStack};
use super::{StoreAnswer, StoreOp, StoreRequest};
use crate::entry::Entry;
use crate::key::CacheKey;
use crate::telemetry::{Counter, Counters, TARGET};

/// Most queued writes sent to Redis in one pipeline.
const WRITE_BATCH: usize = 64;

/// Most operations (a write batch counts one) kept for replay; past it the oldest is
/// dropped (and counted).
const MAX_PENDING: usize = 1024;

/// Most bytes of entries kept for replay: a long outage under a miss-heavy load must
/// not hold more than this beyond the memory tier's own capacity.
const MAX_PENDING_WRITE_BYTES: usize = 16 << 20;

/// What the background writer sends to Redis, in order.
pub(crate) enum QueuedWrite {
    /// An entry, and when its origin call started.
    Set(CacheKey, Entry, SystemTime),
    /// Sent after every write queued before it, so an invalidation cannot be undone
    /// by a fill that was already on its way.
    Delete(CacheKey),
    /// Gives a fill lease back after the fill's own write, so that a waiting replica
    /// finds the entry rather than a free lease.
    Release(CacheKey, u64),
}

/// Operations Redis could not take (write batches, key deletions, tag invalidations,
/// purges), replayed oldest first once it can. Clones share the queue.
#[derive(Clone, Default)]
pub(crate) struct Replay {
    pending: Arc<Mutex<VecDeque<StoreRequest>>>,
}

impl Replay {
    /// Keeps an operation for the replay task, within the caps.
    pub(crate) fn keep(&self, request: StoreRequest, counters: &Counters) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let weight = write_weight(&request);
        if weight > 0
            && pending.iter().map(write_weight).sum::<usize>() + weight > MAX_PENDING_WRITE_BYTES
        {
            // Entries written since Redis went away: the first ones are kept, these not.
            counters.add(Counter::RedisWriteDropped);
            return;
        }
        if pending.len() == MAX_PENDING {
            pending.pop_front();
            counters.add(Counter::RedisWriteDropped);
        }
        pending.push_back(request);
    }

    /// Whether an invalidation waiting here (of `key`, of one of `tags`, or a purge)
    /// would remove the entry stored under `key`: until it is replayed, Redis's copy
    /// is one this replica already invalidated.
    pub(crate) fn invalidates(&self, key: &CacheKey, tags: &[String]) -> bool {
        let Ok(pending) = self.pending.lock() else {
            return false;
        };
        pending.iter().any(|request| match &request.op {
            StoreOp::Delete(deleted) => deleted == key,
            StoreOp::InvalidateTag(tag) => tags.contains(tag),
            StoreOp::PurgeAll => true,
            _ => false,
        })
    }

    /// Operations waiting.
    pub(crate) fn len(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Replays what waits, oldest first, every `every`, through `admin`; ends with the
    /// last clone of this queue.
    pub(crate) fn spawn(&self, admin: RedisStack, every: Duration, counters: Arc<Counters>) {
        let pending: Weak<Mutex<VecDeque<StoreRequest>>> = Arc::downgrade(&self.pending);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pending) = pending.upgrade() else {
                    return;
                };
                loop {
                    let next = pending.lock().ok().and_then(|p| p.front().cloned());
                    let Some(request) = next else {
                        break;
                    };
                    if admin.clone().oneshot(request).await.is_err() {
                        break; // Redis still cannot: try again later, in the same order
                    }
                    if let Ok(mut p) = pending.lock() {
                        p.pop_front();
                    }
                    counters.add(Counter::RedisReplay);
                }
            }
        });
    }
}

/// The bytes of entries a kept operation holds.
fn write_weight(request: &StoreRequest) -> usize {
    match &request.op {
        StoreOp::Set(entries) => entries.iter().map(|(_, entry, _)| entry.weight()).sum(),
        _ => 0,
    }
}

/// Starts the writer task: it sends what `queue` receives through `writer` (no
/// deadline beyond each attempt's), keeping what fails for `replay`. The task ends
/// when the last sender is gone.
pub(crate) fn spawn_writer(
    mut queue: mpsc::Receiver<QueuedWrite>,
    writer: RedisStack,
    replay: Replay,
    counters: Arc<Counters>,
) {
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while queue.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            // Runs of sets go out as one pipeline each; a delete waits for the sets
            // before it.
            let mut sets = Vec::new();
            for write in batch.drain(..) {
                match write {
                    QueuedWrite::Set(key, entry, started) => sets.push((key, entry, started)),
                    QueuedWrite::Release(key, token) => {
                        send_sets(&writer, std::mem::take(&mut sets), &counters, &replay).await;
                        let _ = writer
                            .clone()
                            .oneshot(StoreRequest::release(key, token))
                            .await;
                    }
                    QueuedWrite::Delete(key) => {
                        send_sets(&writer, std::mem::take(&mut sets), &counters, &replay).await;
                        let request = StoreRequest::delete(key);
                        if let Err(e) = writer.clone().oneshot(request.clone()).await {
                            count_failure(&counters, &e);
                            replay.keep(request, &counters);
                        }
                    }
                }
            }
            send_sets(&writer, sets, &counters, &replay).await;
        }
    });
}

/// Sends a run of queued sets as one pipeline and counts the outcome.
async fn send_sets(
    writer: &RedisStack,
    sets: Vec<(CacheKey, Entry, SystemTime)>,
    counters: &Counters,
    replay: &Replay,
) {
    let count = sets.len();
    if count == 0 {
        return;
    }
    let request = StoreRequest::set(sets);
    match writer.clone().oneshot(request.clone()).await {
        Ok(response) => match response.answer {
            StoreAnswer::Written { written, failed } => {
                counters.add_n(Counter::RedisWrite, written);
                counters.add_n(Counter::RedisError, failed);
            }
            _ => counters.add_n(Counter::RedisError, count),
        },
        Err(e) => {
            count_failure(counters, &e);
            counters.add_n(Counter::RedisError, count.saturating_sub(1));
            tracing::debug!(target: TARGET, entries = count, error = %e, outcome = "redis-write-failed");
            // Redis is away (not refusing): the batch waits for it, in order with the
            // removals (marks drop what an invalidation has since superseded, and
            // entries that expire meanwhile are not sent).
            if counts_against_redis(&e) {
                replay.keep(request, counters);
            }
        }
    }
}
