//! The background writer: what goes to Redis off the response path, in the order it
//! was queued (runs of entries as one pipeline each, a delete after the writes queued
//! before it, a lease's release after its fill's write); what Redis cannot take goes
//! to the replay.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;
use tower::ServiceExt;

use super::pending::PendingWrites;
use super::redis_tier::{count_failure, counts_against_redis, RedisStack};
use super::replay::Replay;
use super::{StoreAnswer, StoreRequest};
use crate::entry::Entry;
use crate::key::CacheKey;
use crate::telemetry::{Counter, Counters, TARGET};

/// Most queued writes sent to Redis in one pipeline.
const WRITE_BATCH: usize = 64;

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

/// Starts the writer task: it sends what `queue` receives through `writer` (no
/// deadline beyond each attempt's), keeping what fails for `replay`. The task ends
/// when the last sender is gone.
pub(crate) fn spawn_writer(
    mut queue: mpsc::Receiver<QueuedWrite>,
    writer: RedisStack,
    replay: Replay,
    (pending, counters): (Arc<PendingWrites>, Arc<Counters>),
) {
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while queue.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            // Runs of sets go out as one pipeline each; a delete waits for the sets
            // before it.
            let mut sets = Vec::new();
            for write in batch.drain(..) {
                if !matches!(write, QueuedWrite::Set(..)) {
                    send_sets(
                        &writer,
                        std::mem::take(&mut sets),
                        (&pending, &counters),
                        &replay,
                    )
                    .await;
                }
                match write {
                    QueuedWrite::Set(key, entry, started) => sets.push((key, entry, started)),
                    QueuedWrite::Release(key, token) => {
                        let _ = writer
                            .clone()
                            .oneshot(StoreRequest::release(key, token))
                            .await;
                    }
                    QueuedWrite::Delete(key) => {
                        let request = StoreRequest::delete(key);
                        if let Err(e) = writer.clone().oneshot(request.clone()).await {
                            count_failure(&counters, &e);
                            replay.keep(request, &counters);
                        }
                    }
                }
            }
            send_sets(&writer, sets, (&pending, &counters), &replay).await;
        }
    });
}

/// Sends a run of queued sets as one pipeline and counts the outcome.
async fn send_sets(
    writer: &RedisStack,
    sets: Vec<(CacheKey, Entry, SystemTime)>,
    (pending, counters): (&PendingWrites, &Counters),
    replay: &Replay,
) {
    let count = sets.len();
    if count == 0 {
        return;
    }
    let keys: Vec<CacheKey> = sets.iter().map(|(key, ..)| *key).collect();
    // Whatever Redis answers (or if it does not), the lookups waiting on these keys
    // ask it again.
    struct Answered<'a>(&'a PendingWrites, Vec<CacheKey>);
    impl Drop for Answered<'_> {
        fn drop(&mut self) {
            self.0.done(&self.1);
        }
    }
    let _answered = Answered(pending, keys);
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
