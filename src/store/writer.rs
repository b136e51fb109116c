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

/// Most body bytes sent to Redis in one pipeline (one larger entry goes alone): 64
/// entries of 1 MiB made one pipeline of 64 MiB, and some of those writes failed
/// and waited in the replay (`benches/scaling.rs`, Redis misses with 1 MiB bodies).
const PIPELINE_BYTES: usize = 4 << 20;

/// An entry to write: its key, itself, and when its origin call started.
pub(super) type QueuedSet = (CacheKey, Entry, SystemTime);

/// A run of sets to send as one pipeline, bounded by `WRITE_BATCH` entries and
/// `PIPELINE_BYTES` of bodies; the writer's and the re-seed's.
#[derive(Default)]
pub(super) struct SetRun {
    sets: Vec<QueuedSet>,
    bytes: usize,
}

impl SetRun {
    /// Adds a set; returns the run before it when the set would take it past a
    /// bound (that run is to be sent first).
    pub(super) fn push(&mut self, set: QueuedSet) -> Option<Vec<QueuedSet>> {
        let len = set.1.body_len();
        let full = !self.sets.is_empty()
            && (self.sets.len() >= WRITE_BATCH || self.bytes.saturating_add(len) > PIPELINE_BYTES);
        let full = full.then(|| self.take());
        self.bytes = self.bytes.saturating_add(len);
        self.sets.push(set);
        full
    }

    /// The run so far, leaving an empty one.
    pub(super) fn take(&mut self) -> Vec<QueuedSet> {
        self.bytes = 0;
        std::mem::take(&mut self.sets)
    }
}

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
            let mut run = SetRun::default();
            for write in batch.drain(..) {
                if !matches!(write, QueuedWrite::Set(..)) {
                    send_sets(&writer, run.take(), (&pending, &counters), &replay).await;
                }
                match write {
                    QueuedWrite::Set(key, entry, started) => {
                        if let Some(full) = run.push((key, entry, started)) {
                            send_sets(&writer, full, (&pending, &counters), &replay).await;
                        }
                    }
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
            send_sets(&writer, run.take(), (&pending, &counters), &replay).await;
        }
    });
}

/// Sends a run of queued sets as one pipeline and counts the outcome.
async fn send_sets(
    writer: &RedisStack,
    sets: Vec<QueuedSet>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::CachedResponse;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn set(i: u8, body_bytes: usize) -> QueuedSet {
        let body = Bytes::from(vec![b'x'; body_bytes]);
        let response = CachedResponse::builder(StatusCode::OK, HeaderMap::new(), body).build();
        (
            CacheKey::from_bytes([i; 32]),
            Entry::Response(Arc::new(response)),
            SystemTime::now(),
        )
    }

    #[test]
    fn runs_of_large_entries_are_split_and_an_oversized_one_goes_alone() {
        let mut run = SetRun::default();
        let mut sent = Vec::new();
        for i in 0..64 {
            if let Some(full) = run.push(set(i, 1 << 20)) {
                sent.push(full.len());
            }
        }
        sent.push(run.take().len());
        assert_eq!(sent, vec![4; 16], "64 entries of 1 MiB, 4 MiB a pipeline");

        let mut run = SetRun::default();
        assert!(run.push(set(1, 100)).is_none());
        let before = run.push(set(2, 8 << 20)).map(|r| r.len());
        assert_eq!(
            before,
            Some(1),
            "what came before an oversized entry goes first"
        );
        let after = run.push(set(3, 100)).map(|r| r.len());
        assert_eq!(after, Some(1), "the oversized entry goes alone");
        // Small entries fill one run up to the batch.
        let mut run = SetRun::default();
        assert!((0..64).all(|i| run.push(set(i, 3 << 10)).is_none()));
        assert_eq!(run.push(set(64, 3 << 10)).map(|r| r.len()), Some(64));
        assert_eq!(run.take().len(), 1);
    }
}
