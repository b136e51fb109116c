//! Write batches: a run of entries sent as one pipeline, each with its tags' indexes,
//! checked against the invalidation marks so that an entry whose origin call started
//! before an invalidation (on any replica) is never stored.
//!
//! On one Redis (standalone or behind Sentinel) one script for a run of entries reads
//! each entry's marks and writes it only if none supersedes it, indexing it under its
//! tags in the same step, atomically: no replica ever sees an invalidated entry, and a
//! tag's invalidation finds every entry written before its mark. A small value goes
//! to the script in its arguments; a large one is set under a staging key of its own
//! first and renamed into place (or deleted), so that it never passes through Lua. A
//! Redis Cluster (whose marks live in other slots than the entry) or an ACL user
//! without `EVAL` gets the marks read in the same round trip instead, and an entry
//! they supersede deleted again: another replica may see it for about that round
//! trip.

use std::time::SystemTime;

use bytes::Bytes;
use fred::bytes_utils::Str;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, Expiration, ExpireOptions, SetOptions};

use super::{millis_i64, RedisStore};
use crate::entry::codec::millis_since_epoch;
use crate::entry::{encode_entry, Entry};
use crate::key::CacheKey;
use crate::store::StoreError;
use crate::telemetry::TARGET;

/// Writes a run of entries in one call (Lua's fixed cost, about 7 µs a call, is paid
/// once a run), each only if no mark supersedes it, and indexes each written entry
/// under its tags in the same atomic step: a tag's invalidation either comes first
/// (its mark supersedes the entry) or finds the entry in the tag's index.
///
/// `KEYS[1]` is the purge mark; then, for each entry: its key, its staged value (only
/// for an entry staged, below), its key's mark, its tags' marks, its tags' indexes.
/// `ARGV[1]` = 1 writes only where the key holds nothing; `ARGV[2]` is the channel the
/// written keys are announced on (`written/`), or empty; then, for each entry: its
/// tag count, its time to live in ms, its fill's start (ms since the epoch), and its
/// value, or an empty string for a value staged under a name of its own beforehand
/// (an encoded entry is never empty). A small value passes through the arguments (one
/// command a run for this process to send); a large one is staged, since a value
/// copied into a script and out again costs Redis about 1.7 µs a KB (BENCHMARKS.md).
/// A mark holding a time at or after the start supersedes the entry; one that is not
/// a number supersedes nothing. A staged value not renamed is deleted. Returns one
/// code per entry: 1 (written), 0 (superseded), 2 (a value was there) or 3 (the staged
/// value is not there: its `SET` failed). Each tag's index gets the run's written keys
/// in one `SADD`, and lives at least as long as the longest-lived of them (`NX` sets a
/// first expiry, `GT` extends). An index that cannot take the keys (another
/// type, a Redis older than 7 refusing `PEXPIRE NX`) does not stop the write, as an
/// index command's error reply did not when they were sent apart.
const GUARDED_WRITE: &str = include_str!("guarded_write.lua");

/// The largest value the write script takes in its arguments; a larger one is staged
/// by a `SET` of its own first. Measured on 3 KB entries in runs of 16 (BENCHMARKS.md,
/// "Redis path, instructions"): inline, a write costs this process one command fewer,
/// and Redis the same CPU within the runs' spread.
const INLINE_VALUE_BYTES: usize = 4 * 1024;

/// Entries per call of the write script: enough to spread its fixed cost, few enough
/// that one call does not hold Redis (which runs a script to its end) for long.
const GUARDED_RUN: usize = 16;

/// This process's name among the writers of staged values, and the count of its
/// writes: with the key, they make each staged value's name its own.
pub(crate) struct StagingWriter {
    id: u64,
    writes: std::sync::atomic::AtomicU64,
}

impl StagingWriter {
    /// A writer with a random name: replicas never share one.
    pub(crate) fn new() -> Self {
        use tower::util::rng::{HasherRng, Rng};
        StagingWriter {
            id: HasherRng::default().next_u64(),
            writes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// How long a staged value lives if its script never runs (the connection dropped
/// between the two): the script runs right after it in the same pipeline.
const STAGING_MILLIS: i64 = 10_000;

/// What one result of a write batch's pipeline answers.
enum Slot {
    /// The `SET` of the batch's entry at this index.
    Write(usize),
    /// The script for the run of the batch's entries that starts at this index.
    Guarded(usize),
    /// The `SET` of an entry's staged value: its error reply is the entry's.
    Staged,
    /// A tag index's `SADD` or `PEXPIRE` (its outcome changes nothing).
    Index,
    /// The mark at this index (a cluster reads each with its own `GET`).
    Mark(usize),
    /// Every mark, in order (one `MGET`).
    Marks,
    /// The announcement of the batch's keys (its outcome changes nothing).
    Announce,
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
    /// Where it goes: shared, not copied, by each command that names it.
    storage_key: Str,
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
            let at = *self.positions.entry(tag).or_insert(next);
            match self.tags.get_mut(at) {
                Some(known) => {
                    known.keys.push(&*out.storage_key);
                    known.millis = known.millis.max(out.millis);
                }
                None => self.tags.push(BatchTag {
                    name: tag,
                    keys: vec![&*out.storage_key],
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

impl RedisStore {
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
        self.write_many(entries, false).await
    }

    /// As `set_many`, but only where Redis holds nothing (`SET NX`): a re-seed from
    /// memory never replaces what a replica wrote since.
    pub(crate) async fn seed_many(
        &self,
        entries: &[(CacheKey, Entry, SystemTime)],
    ) -> Result<(usize, usize), StoreError> {
        self.write_many(entries, true).await
    }

    /// Writes with the script where it can; a Redis that refuses the script (an ACL
    /// user without `EVAL`, or without a command it runs) gets the batch again without
    /// it, and no script after (until a capability check finds them all allowed).
    async fn write_many(
        &self,
        entries: &[(CacheKey, Entry, SystemTime)],
        only_if_absent: bool,
    ) -> Result<(usize, usize), StoreError> {
        let guarded = self.health.scripts_allowed();
        match self.write_batch(entries, only_if_absent, guarded).await? {
            Some(written) => Ok(written),
            None => {
                self.health.refuse_scripts();
                Ok(self
                    .write_batch(entries, only_if_absent, false)
                    .await?
                    .unwrap_or((0, 0)))
            }
        }
    }

    /// One batch, `guarded` by the script or not; `None` when Redis refused the
    /// script itself.
    async fn write_batch(
        &self,
        entries: &[(CacheKey, Entry, SystemTime)],
        only_if_absent: bool,
        guarded: bool,
    ) -> Result<Option<(usize, usize)>, StoreError> {
        let client = self.healthy()?;
        let outgoing = self.outgoing(entries);
        if outgoing.is_empty() {
            return Ok(Some((0, 0)));
        }
        let guarded = guarded && !client.is_clustered();
        let pipeline = client.pipeline();
        // What each result of the pipeline answers, for the commands it took.
        let mut slots = Vec::new();
        let mut sent = Vec::with_capacity(outgoing.len());
        // The unguarded path's tags: the script indexes each entry it writes itself.
        let mut tags = BatchTags::default();
        // Each sent entry's staged value's name, if it was staged: the script's keys,
        // and what to delete should Redis refuse the script (they would wait out their
        // 10 s).
        let mut staging: Vec<Option<Str>> = Vec::new();
        for out in &outgoing {
            let queued: Result<(), _> = if guarded && out.value.len() <= INLINE_VALUE_BYTES {
                // The value goes in the script's arguments.
                staging.push(None);
                Ok(())
            } else if guarded {
                // The value under a name of this write's own; the script, after the
                // loop, checks the marks and renames it into place.
                let write = self.writer.next();
                let name = Str::from(self.keys.staging(out.key, self.writer.id, write));
                let staged = pipeline
                    .set(
                        &name,
                        out.value.clone(),
                        Some(Expiration::PX(STAGING_MILLIS)),
                        None,
                        false,
                    )
                    .await;
                if staged.is_ok() {
                    staging.push(Some(name));
                    slots.push(Slot::Staged);
                }
                staged
            } else {
                let set = pipeline
                    .set(
                        out.storage_key.clone(),
                        out.value.clone(),
                        Some(Expiration::PX(out.millis)),
                        only_if_absent.then_some(SetOptions::NX),
                        false,
                    )
                    .await;
                if set.is_ok() {
                    slots.push(Slot::Write(sent.len()));
                    tags.add(out);
                }
                set
            };
            if queued.is_err() {
                continue;
            }
            sent.push(out);
        }
        if sent.is_empty() {
            return Ok(Some((0, 0)));
        }
        if guarded {
            let runs = sent.chunks(GUARDED_RUN).zip(staging.chunks(GUARDED_RUN));
            for (run, (entries, staged)) in runs.enumerate() {
                let args = self.guarded_args(entries, staged, only_if_absent);
                let eval = CustomCommand::new_static("EVAL", ClusterHash::Offset(2), false);
                if pipeline.custom::<(), _>(eval, args).await.is_ok() {
                    slots.push(Slot::Guarded(run * GUARDED_RUN));
                }
            }
        }
        // Without the script, each tag's index lists the keys stored with it, and lives
        // at least as long as the longest-lived of them (NX sets a first expiry, GT
        // extends): one SADD and one expiry per tag and batch, however many entries
        // carry it. A key indexed but not written (superseded, below) is harmless: an
        // invalidation of the tag deletes nothing then.
        for tag in &tags.tags {
            let index = self.keys.tag_index(tag.name);
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
        // The script checked the marks already.
        let marks = if guarded {
            Vec::new()
        } else {
            self.mark_keys(&sent, &tags)
        };
        let mark_count = marks.len();
        // One MGET on one Redis; a cluster spreads the marks over its slots.
        if client.is_clustered() {
            for (i, mark) in marks.into_iter().enumerate() {
                if pipeline.get::<(), _>(mark).await.is_ok() {
                    slots.push(Slot::Mark(i));
                }
            }
        } else if !guarded && pipeline.mget::<(), _>(marks).await.is_ok() {
            slots.push(Slot::Marks);
        }
        // The script announces what it writes; without it, what is sent is announced
        // (an entry superseded below then reads as present: a read, as untracked).
        if !guarded && self.written.is_some() && !client.is_clustered() {
            let mut announcement = String::with_capacity(sent.len() * 32);
            for out in &sent {
                super::written::announce(&mut announcement, out.key, out.millis.unsigned_abs());
            }
            let published = pipeline
                .publish::<(), _, _>(self.written_channel.clone(), announcement)
                .await;
            if published.is_ok() {
                slots.push(Slot::Announce);
            }
        }
        let results = pipeline.try_all::<Value>().await;

        let mut tally = WriteTally::default();
        let mut written = vec![false; sent.len()];
        // What this replica wrote, for its own set of written keys: its lookups must
        // find it as soon as the write is answered, announced or not.
        let mut own = Vec::new();
        // A mark that cannot be read (another type, not a number) supersedes nothing.
        let mut times = vec![0_i64; mark_count];
        for (slot, result) in slots.into_iter().zip(results) {
            match (slot, result) {
                (Slot::Guarded(first), Ok(Value::Array(codes))) => {
                    for (i, code) in (first..).zip(codes) {
                        let key = sent.get(i).map(|out| out.key);
                        match code {
                            // The script checked its marks: nothing to undo below.
                            Value::Integer(1) => {
                                tally.written += 1;
                                if let Some(out) = sent.get(i) {
                                    own.push((out.key.fingerprint(), out.millis.unsigned_abs()));
                                }
                            }
                            Value::Integer(0) => {
                                tracing::debug!(target: TARGET, key = ?key, outcome = "not-stored", detail = "invalidated");
                            }
                            // Its staged value did not arrive (its `SET` failed,
                            // counted there): nothing written.
                            Value::Integer(3) => {
                                tracing::debug!(target: TARGET, key = ?key, outcome = "not-stored", detail = "staging-lost");
                            }
                            // `2`: a value was there (a re-seed); nothing written.
                            _ => {}
                        }
                    }
                }
                (Slot::Guarded(_), Err(e)) if super::capabilities::refused(&e) => {
                    // Redis's words for what it refused: `EVAL`, or a command the
                    // script runs (an ACL user without `RENAME`).
                    tracing::warn!(target: TARGET, error = %e, "redis refuses the write script: write batches check their marks after writing instead");
                    // Best effort: what is left expires within its 10 s.
                    let staged: Vec<Str> = staging.drain(..).flatten().collect();
                    if !staged.is_empty() {
                        let _: Result<i64, _> = client.del(staged).await;
                    }
                    return Ok(None);
                }
                // Refused whole (`OOM`, a script error): each of its entries is.
                (Slot::Guarded(first), Err(e)) => {
                    let run = sent.len().saturating_sub(first).min(GUARDED_RUN);
                    for _ in 0..run {
                        tally.failed(StoreError::command(e.clone()))?;
                    }
                }
                (Slot::Guarded(_), Ok(_)) => {}
                // `SET NX` where a value was: nothing written.
                (Slot::Write(_), Ok(Value::Null)) => {}
                (Slot::Write(i), Ok(_)) => {
                    tally.written += 1;
                    if let Some(written) = written.get_mut(i) {
                        *written = true;
                    }
                    if let Some(out) = sent.get(i) {
                        own.push((out.key.fingerprint(), out.millis.unsigned_abs()));
                    }
                }
                (Slot::Write(_), Err(e)) => tally.failed(StoreError::command(e))?,
                (Slot::Staged, Err(e)) => tally.failed(StoreError::command(e))?,
                (Slot::Staged | Slot::Index | Slot::Announce, _) => {}
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
        if let Some(set) = &self.written {
            if !own.is_empty() {
                set.heard(own);
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
                let _: Result<(), _> = undo.del(&out.storage_key).await;
            }
            // Failing here would leave an invalidated entry in Redis: the whole batch
            // is then an error, retried or replayed (and checked) again.
            let _: Vec<i64> = undo.all().await.map_err(StoreError::command)?;
            tally.written = tally.written.saturating_sub(superseded.len());
        }
        tally.result().map(Some)
    }

    /// The write script's arguments for a run of entries and, for each, the name its
    /// value was staged under, if it was: the script's text, its keys, its numbers and
    /// the values it takes.
    fn guarded_args(
        &self,
        entries: &[&Outgoing<'_>],
        staging: &[Option<Str>],
        only_if_absent: bool,
    ) -> Vec<Value> {
        let run = || entries.iter().zip(staging);
        let tag_count = |out: &Outgoing<'_>| out.entry.tags().len();
        let key_count: usize = 1 + run()
            .map(|(out, staged)| 2 + usize::from(staged.is_some()) + 2 * tag_count(out))
            .sum::<usize>();
        // EVAL script numkeys keys… args…
        let mut args: Vec<Value> = Vec::with_capacity(3 + key_count + 4 * entries.len());
        // The script's text shared, not copied into each call (2.3 KB).
        args.push(Value::Bytes(Bytes::from_static(GUARDED_WRITE.as_bytes())));
        args.push(Value::Integer(i64::try_from(key_count).unwrap_or(i64::MAX)));
        args.push(Value::from(self.keys.purged()));
        for (out, staged) in run() {
            args.push(Value::from(out.storage_key.clone()));
            if let Some(name) = staged {
                args.push(Value::from(name.clone()));
            }
            args.push(Value::from(self.keys.gone(out.key)));
            // Each tag's mark, then each tag's index.
            let tags = out.entry.tags();
            let mut indexes = Vec::with_capacity(tags.len());
            for tag in tags {
                let (mark, index) = self.keys.tag_names(tag);
                args.push(Value::from(mark));
                indexes.push(Value::from(index));
            }
            args.extend(indexes);
        }
        args.push(Value::Integer(i64::from(only_if_absent)));
        args.push(match &self.written {
            Some(_) => Value::from(self.written_channel.clone()),
            None => Value::Bytes(Bytes::new()),
        });
        for (out, staged) in run() {
            args.push(Value::Integer(
                i64::try_from(tag_count(out)).unwrap_or(i64::MAX),
            ));
            args.push(Value::Integer(out.millis));
            args.push(Value::Integer(out.started));
            args.push(match staged {
                Some(_) => Value::Bytes(Bytes::new()),
                None => Value::Bytes(out.value.clone()),
            });
        }
        args
    }

    /// The marks that can supersede a batch, in the order `set_many` reads them: the
    /// purge, each entry's key's mark, then each of the batch's tags' marks.
    fn mark_keys(&self, sent: &[&Outgoing<'_>], tags: &BatchTags<'_>) -> Vec<String> {
        let mut keys = Vec::with_capacity(1 + sent.len() + tags.tags.len());
        keys.push(self.keys.purged());
        keys.extend(sent.iter().map(|out| self.keys.gone(out.key)));
        keys.extend(tags.tags.iter().map(|tag| self.keys.gone_tag(tag.name)));
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
                    storage_key: Str::from(self.keys.entry(key)),
                    value,
                    millis: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redis::keys::RedisKeys;
    use std::sync::Arc;

    #[test]
    fn a_batch_indexes_each_tag_once_with_all_its_keys_and_the_longest_ttl() {
        use crate::entry::CachedResponse;
        let tagged = |tags: &[&str]| {
            Entry::Response(Arc::new(
                CachedResponse::builder(http::StatusCode::OK, http::HeaderMap::new(), Bytes::new())
                    .tags(tags)
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
                storage_key: Str::from(RedisKeys::new("ns").entry(key)),
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
            [&*outgoing[0].storage_key, &*outgoing[1].storage_key]
        );
        assert_eq!(jobs.millis, 5_000);
        assert_eq!(tags.tags[1].keys, [&*outgoing[0].storage_key]);
        assert_eq!(tags.tags[1].millis, 1_000);
        assert_eq!(tags.position("berlin"), Some(1));
        assert_eq!(tags.position("paris"), None);
    }
}
