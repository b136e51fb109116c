//! Operations Redis could not take, kept (bounded) and replayed once it can.
//!
//! Removals (a key's delete, a tag's invalidation, a purge) are kept apart from write
//! batches. They are small, acknowledged to a caller, and never dropped for room: past
//! their cap they fold into one purge, which removes more than was asked and nothing
//! less. They are replayed first, each marking its key, tag or the namespace at the
//! time it lands, so that every kept write it covers is refused when replayed after
//! it. Write batches are dropped oldest first past their caps. A kept removal that
//! Redis refuses (an error reply, not an outage) is tried again behind the others and
//! given up after a few refusals; a refused write batch is given up at once (a later
//! fill writes it again): one poisoned operation never blocks the rest.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tower::ServiceExt;

use super::redis_tier::{counts_against_redis, RedisStack};
use super::{StoreOp, StoreRequest};
use crate::entry::Tags;
use crate::key::CacheKey;
use crate::telemetry::{Counter, Counters, TARGET};

/// Most removals kept: as many as the invalidation log holds, past which a replica
/// catching up forgets everything anyway.
const MAX_REMOVALS: usize = crate::store::redis::MAX_LOGGED;

/// Most bytes the kept removals hold (tags are the caller's strings).
const MAX_REMOVAL_BYTES: usize = 4 << 20;

/// Most write batches kept; past it the oldest is dropped (and counted).
const MAX_WRITES: usize = 1024;

/// Most bytes of entries kept: a long outage under a miss-heavy load must not hold
/// more than this beyond the memory tier's own capacity.
const MAX_WRITE_BYTES: usize = 16 << 20;

/// Error replies after which a kept removal is given up.
const MAX_REFUSALS: u8 = 5;

/// Operations Redis could not take, replayed once it can. Clones share them.
#[derive(Clone, Default)]
pub(crate) struct Replay {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Removals waiting, readable without the lock: a Redis hit checks it.
    removals: AtomicUsize,
}

/// One kept operation.
struct Kept {
    /// Its place in the order operations were kept.
    seq: u64,
    request: StoreRequest,
    /// Error replies so far.
    refusals: u8,
}

#[derive(Default)]
struct Pending {
    removals: VecDeque<Kept>,
    /// The waiting removal of each key, and of each tag, by `seq`.
    keys: HashMap<CacheKey, u64>,
    tags: HashMap<String, u64>,
    /// The waiting purge.
    purge: Option<u64>,
    removal_bytes: usize,
    writes: VecDeque<Kept>,
    write_bytes: usize,
    next_seq: u64,
    /// The operation being replayed: a removal that equals it is kept again, since
    /// its mark may already be older than the removal asked for now.
    in_flight: Option<u64>,
}

/// How replaying one operation ended.
enum Replayed {
    Done,
    /// Redis is away: try again later, in the same order.
    Away,
    /// Redis answered with an error reply.
    Refused,
}

impl Replay {
    /// Keeps an operation for the replay task, within the caps.
    pub(crate) fn keep(&self, request: StoreRequest, counters: &Counters) {
        let Ok(mut pending) = self.shared.pending.lock() else {
            return;
        };
        pending.keep(request, counters);
        self.shared
            .removals
            .store(pending.removals.len(), Ordering::Release);
    }

    /// Whether a removal waiting here (of `key`, of one of `tags`, or a purge) would
    /// remove the entry stored under `key`: until it is replayed, Redis's copy is one
    /// this replica already invalidated.
    pub(crate) fn invalidates(&self, key: &CacheKey, tags: &Tags) -> bool {
        if self.shared.removals.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Ok(pending) = self.shared.pending.lock() else {
            return false;
        };
        pending.purge.is_some()
            || pending.keys.contains_key(key)
            || tags.iter().any(|tag| pending.tags.contains_key(tag))
    }

    /// Operations waiting.
    pub(crate) fn len(&self) -> usize {
        self.shared
            .pending
            .lock()
            .map(|p| p.removals.len() + p.writes.len())
            .unwrap_or(0)
    }

    /// Replays what waits every `every`, removals first, through `admin`; ends with
    /// the last clone of this queue.
    pub(crate) fn spawn(&self, admin: RedisStack, every: Duration, counters: Arc<Counters>) {
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                replay_round(&shared, &admin, &counters).await;
            }
        });
    }
}

/// Sends what waits, one operation at a time, until Redis is away again or each
/// operation waiting when the round began had its turn.
async fn replay_round(shared: &Shared, admin: &RedisStack, counters: &Counters) {
    let turns = shared.pending.lock().map_or(0, |p| p.len());
    for _ in 0..turns {
        let next = shared.pending.lock().ok().and_then(|mut p| p.start_next());
        let Some((seq, request)) = next else {
            return;
        };
        let outcome = match admin.clone().oneshot(request).await {
            Ok(_) => Replayed::Done,
            Err(e) if counts_against_redis(&e) => Replayed::Away,
            Err(e) => {
                tracing::debug!(target: TARGET, error = %e, outcome = "replay-refused");
                Replayed::Refused
            }
        };
        let away = matches!(outcome, Replayed::Away);
        if let Ok(mut pending) = shared.pending.lock() {
            pending.finish(seq, outcome, counters);
            shared
                .removals
                .store(pending.removals.len(), Ordering::Release);
        }
        if away {
            return;
        }
    }
}

/// The bytes a kept removal holds (its tag twice: in the queue and the index).
fn removal_bytes(request: &StoreRequest) -> usize {
    let tag = match &request.op {
        StoreOp::InvalidateTag(tag) => tag.len(),
        _ => 0,
    };
    std::mem::size_of::<Kept>() + 2 * tag
}

/// The bytes of entries a kept write batch holds.
fn write_bytes(request: &StoreRequest) -> usize {
    match &request.op {
        StoreOp::Set(entries) => entries.iter().map(|(_, entry, _)| entry.weight()).sum(),
        _ => 0,
    }
}

impl Pending {
    fn len(&self) -> usize {
        self.removals.len() + self.writes.len()
    }

    fn keep(&mut self, request: StoreRequest, counters: &Counters) {
        match &request.op {
            StoreOp::Set(_) => self.keep_write(request, counters),
            StoreOp::Delete(key) => {
                if !self.waits(self.keys.get(key).copied()) {
                    let key = *key;
                    if let Some(seq) = self.push_removal(request, counters) {
                        self.keys.insert(key, seq);
                    }
                }
            }
            StoreOp::InvalidateTag(tag) => {
                if !self.waits(self.tags.get(tag.as_str()).copied()) {
                    let tag = tag.clone();
                    if let Some(seq) = self.push_removal(request, counters) {
                        self.tags.insert(tag, seq);
                    }
                }
            }
            StoreOp::PurgeAll => {
                if !self.waits(self.purge) {
                    self.keep_purge(request);
                }
            }
            // Reads, leases and releases are not worth replaying.
            StoreOp::Get(_) | StoreOp::Lease(..) | StoreOp::Release(..) => {}
        }
    }

    /// Whether the removal `seq` already waits (and is not being replayed).
    fn waits(&self, seq: Option<u64>) -> bool {
        seq.is_some_and(|seq| self.in_flight != Some(seq))
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn keep_write(&mut self, request: StoreRequest, counters: &Counters) {
        let bytes = write_bytes(&request);
        if bytes > MAX_WRITE_BYTES {
            counters.add(Counter::RedisWriteDropped);
            return;
        }
        // Entries written since Redis went away: the newest are worth the most.
        while self.writes.len() >= MAX_WRITES || self.write_bytes + bytes > MAX_WRITE_BYTES {
            let Some(oldest) = self.writes.pop_front() else {
                break;
            };
            self.write_bytes = self
                .write_bytes
                .saturating_sub(write_bytes(&oldest.request));
            counters.add(Counter::RedisWriteDropped);
        }
        let seq = self.next_seq();
        self.write_bytes += bytes;
        self.writes.push_back(Kept {
            seq,
            request,
            refusals: 0,
        });
    }

    /// Queues a key's or a tag's removal and returns its `seq`; past the caps every
    /// removal waiting, and this one, fold into a purge instead (`None`).
    fn push_removal(&mut self, request: StoreRequest, counters: &Counters) -> Option<u64> {
        let bytes = removal_bytes(&request);
        if self.removals.len() >= MAX_REMOVALS || self.removal_bytes + bytes > MAX_REMOVAL_BYTES {
            counters.add_n(Counter::RedisRemovalFolded, self.removals.len() + 1);
            tracing::warn!(
                target: TARGET,
                removals = self.removals.len() + 1,
                "removals kept for Redis fold into a purge of the namespace"
            );
            self.keep_purge(StoreRequest::purge_all());
            return None;
        }
        let seq = self.next_seq();
        self.removal_bytes += bytes;
        self.removals.push_back(Kept {
            seq,
            request,
            refusals: 0,
        });
        Some(seq)
    }

    /// Queues a purge in place of everything waiting: it removes all they would, and
    /// its mark refuses every write kept before it lands.
    fn keep_purge(&mut self, request: StoreRequest) {
        self.removals.clear();
        self.keys.clear();
        self.tags.clear();
        self.removal_bytes = 0;
        self.writes.clear();
        self.write_bytes = 0;
        let seq = self.next_seq();
        self.purge = Some(seq);
        self.removal_bytes = removal_bytes(&request);
        self.removals.push_back(Kept {
            seq,
            request,
            refusals: 0,
        });
    }

    /// The next operation to replay: the oldest removal, else the oldest write.
    fn start_next(&mut self) -> Option<(u64, StoreRequest)> {
        let next = self.removals.front().or_else(|| self.writes.front())?;
        let started = (next.seq, next.request.clone());
        self.in_flight = Some(started.0);
        Some(started)
    }

    fn finish(&mut self, seq: u64, outcome: Replayed, counters: &Counters) {
        self.in_flight = None;
        match outcome {
            Replayed::Away => {}
            Replayed::Done => {
                if self.take(seq).is_some() {
                    counters.add(Counter::RedisReplay);
                }
            }
            Replayed::Refused => {
                let Some(mut kept) = self.take(seq) else {
                    return;
                };
                kept.refusals += 1;
                let removal = !matches!(kept.request.op, StoreOp::Set(_));
                if removal && kept.refusals < MAX_REFUSALS {
                    self.requeue_removal(kept);
                } else {
                    tracing::warn!(
                        target: TARGET,
                        operation = ?kept.request.operation(),
                        refusals = kept.refusals,
                        "an operation kept for Redis was refused; given up"
                    );
                    counters.add(Counter::RedisReplayRefused);
                }
            }
        }
    }

    /// Takes the operation `seq` out, wherever it is (usually at a front).
    fn take(&mut self, seq: u64) -> Option<Kept> {
        if let Some(at) = self.removals.iter().position(|k| k.seq == seq) {
            let kept = self.removals.remove(at)?;
            self.removal_bytes = self
                .removal_bytes
                .saturating_sub(removal_bytes(&kept.request));
            self.forget_removal(&kept);
            return Some(kept);
        }
        let at = self.writes.iter().position(|k| k.seq == seq)?;
        let kept = self.writes.remove(at)?;
        self.write_bytes = self.write_bytes.saturating_sub(write_bytes(&kept.request));
        Some(kept)
    }

    /// Drops a removal from the index, unless a newer one of the same took its place.
    fn forget_removal(&mut self, kept: &Kept) {
        match &kept.request.op {
            StoreOp::Delete(key) if self.keys.get(key) == Some(&kept.seq) => {
                self.keys.remove(key);
            }
            StoreOp::InvalidateTag(tag) if self.tags.get(tag.as_str()) == Some(&kept.seq) => {
                self.tags.remove(tag.as_str());
            }
            StoreOp::PurgeAll if self.purge == Some(kept.seq) => self.purge = None,
            _ => {}
        }
    }

    /// Puts a refused removal behind the others, unless a newer one of the same
    /// already waits there.
    fn requeue_removal(&mut self, kept: Kept) {
        let newer = match &kept.request.op {
            StoreOp::Delete(key) => self.keys.contains_key(key),
            StoreOp::InvalidateTag(tag) => self.tags.contains_key(tag.as_str()),
            _ => self.purge.is_some(),
        };
        if newer {
            return;
        }
        match &kept.request.op {
            StoreOp::Delete(key) => {
                self.keys.insert(*key, kept.seq);
            }
            StoreOp::InvalidateTag(tag) => {
                self.tags.insert(tag.clone(), kept.seq);
            }
            _ => self.purge = Some(kept.seq),
        }
        self.removal_bytes += removal_bytes(&kept.request);
        self.removals.push_back(kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    fn pending_ops(p: &Pending) -> Vec<crate::store::StoreOperation> {
        p.removals
            .iter()
            .chain(&p.writes)
            .map(|k| k.request.operation())
            .collect()
    }

    #[test]
    fn a_removal_waiting_is_kept_once_unless_it_is_being_replayed() {
        let counters = Counters::default();
        let mut p = Pending::default();
        p.keep(StoreRequest::delete(key(1)), &counters);
        p.keep(StoreRequest::delete(key(1)), &counters);
        p.keep(StoreRequest::invalidate_tag("jobs"), &counters);
        p.keep(StoreRequest::invalidate_tag("jobs"), &counters);
        assert_eq!(p.len(), 2);
        let (seq, _) = p.start_next().unwrap();
        // Asked again while its first replay is on its way: kept again.
        p.keep(StoreRequest::delete(key(1)), &counters);
        assert_eq!(p.len(), 3);
        p.finish(seq, Replayed::Done, &counters);
        assert_eq!(p.len(), 2);
        assert!(p.keys.contains_key(&key(1)), "the newer one still waits");
    }

    #[test]
    fn removals_past_the_cap_fold_into_one_purge_that_replaces_the_writes_too() {
        let counters = Counters::default();
        let mut p = Pending::default();
        p.keep(StoreRequest::set(Vec::new()), &counters);
        for n in 0..=MAX_REMOVALS {
            p.keep(StoreRequest::invalidate_tag(&format!("t{n}")), &counters);
        }
        assert_eq!(pending_ops(&p), [crate::store::StoreOperation::PurgeAll]);
        assert_eq!(
            counters.snapshot().redis_removals_folded,
            MAX_REMOVALS as u64 + 1
        );
        assert!(p.tags.is_empty() && p.keys.is_empty() && p.purge.is_some());
        // Removals after the purge, before it is replayed, are covered by it.
        p.keep(StoreRequest::delete(key(2)), &counters);
        assert_eq!(p.len(), 2, "a key's removal after the purge still waits");
    }

    #[test]
    fn a_refused_removal_goes_behind_the_others_and_is_given_up_after_its_refusals() {
        use crate::store::StoreOperation;
        let counters = Counters::default();
        let mut p = Pending::default();
        p.keep(StoreRequest::invalidate_tag("poisoned"), &counters);
        p.keep(StoreRequest::delete(key(3)), &counters);
        let mut order = Vec::new();
        while let Some((seq, request)) = p.start_next() {
            order.push(request.operation());
            let outcome = match request.operation() {
                StoreOperation::Delete => Replayed::Done,
                _ => Replayed::Refused,
            };
            p.finish(seq, outcome, &counters);
        }
        // Refused once, then the delete behind it went through, then four more.
        assert_eq!(order.len(), 1 + MAX_REFUSALS as usize);
        assert_eq!(order[1], StoreOperation::Delete);
        assert_eq!(counters.snapshot().redis_replays_refused, 1);
        assert_eq!(counters.snapshot().redis_replays, 1);
    }

    #[test]
    fn a_refused_write_is_given_up_at_once() {
        let counters = Counters::default();
        let mut p = Pending::default();
        p.keep(StoreRequest::set(Vec::new()), &counters);
        let (seq, _) = p.start_next().unwrap();
        p.finish(seq, Replayed::Refused, &counters);
        assert_eq!(p.len(), 0);
        assert_eq!(counters.snapshot().redis_replays_refused, 1);
    }
}
