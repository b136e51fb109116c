//! The keys any replica wrote to Redis, as this replica heard of them, so that a
//! lookup of a key nobody wrote need not ask Redis (`track_written_keys`).
//!
//! Writers announce what they wrote: the write script publishes each run's written
//! keys (the first 16 hex digits of each, and its time to live) on `{ns}/written`;
//! a write without the script publishes its batch in the same pipeline. What was
//! written before this replica listened is found by a `SCAN` of the namespace's
//! entries (a script call a page, where scripts are allowed) that starts after the
//! subscription is up, as proved by an echo: a random number this replica publishes
//! on the channel and hears back (a `SUBSCRIBE` the server refused, to an ACL user
//! not allowed the channel, can look like a success to the client). Only then is the
//! set complete, and a key absent from it (or past its time to live) absent from
//! Redis.
//!
//! Anything that may have lost an announcement makes the set incomplete until a new
//! scan ends: the subscriber's connection lost or re-made, the listener lagging
//! behind, more keys than the set may hold. While incomplete, every lookup reads
//! Redis, as without the set. A wrong "absent" (an announcement not yet arrived, a
//! writer that cannot publish) costs one origin call, never a stale response: a
//! miss only ever goes to the origin. A wrong "present" costs the read it would
//! have cost anyway.
//!
//! This file owns the set, its state and the announcements' format and listener;
//! `scan.rs` the scan that completes it.

mod scan;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use super::RedisStore;
use crate::entry::codec::millis_since_epoch;
use crate::key::CacheKey;
use crate::telemetry::TARGET;

/// Announcements longer than this are not read (another writer's junk): a run of the
/// write script announces at most 16 keys, a batch without it one pipeline's worth.
const MAX_ANNOUNCEMENT_BYTES: usize = 256 * 1024;

/// The state's bit: the subscription is up since the epoch began.
const SUBSCRIBED: u64 = 0b10;
/// The state's bit: a scan completed the set in this epoch.
const COMPLETE: u64 = 0b01;

/// Shards of the set, each behind its own lock, by a fingerprint's top four bits: a
/// shard's sweep (below) holds up only the lookups of its sixteenth.
const SHARDS: usize = 16;

/// One shard: fingerprints, and until when (ms since the epoch) Redis may hold each.
type Shard = HashMap<u64, u64, foldhash::fast::RandomState>;

/// The set of written keys: each key's fingerprint (`CacheKey::fingerprint`) and
/// until when Redis may hold it, in `SHARDS` shards.
pub(crate) struct WrittenKeys {
    /// The most fingerprints a shard holds (`max_keys` spread over the shards).
    shard_max: usize,
    /// `epoch << 2 | SUBSCRIBED | COMPLETE`: each loss of announcements starts a new
    /// epoch, and a scan completes the set only if it started subscribed and no loss
    /// came while it ran.
    state: AtomicU64,
    shards: [RwLock<Shard>; SHARDS],
    /// Asks the scanner for a scan (a permit is kept if it is busy).
    rescan: Notify,
    /// The last echo heard on the channel (`echo`): a scan starts only once its own
    /// has come back, which proves the subscription up (a refused `SUBSCRIBE` can
    /// look like a success to the client).
    echoes: tokio::sync::watch::Sender<u64>,
}

/// What recording one key came to.
enum Recorded {
    Held,
    /// Its shard is full of live keys.
    Full,
}

impl WrittenKeys {
    pub(crate) fn new(max_keys: usize) -> Self {
        WrittenKeys {
            shard_max: max_keys.div_ceil(SHARDS).max(1),
            state: AtomicU64::new(0),
            shards: std::array::from_fn(|_| RwLock::new(Shard::default())),
            rescan: Notify::new(),
            echoes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The shard a fingerprint belongs to.
    fn shard(&self, fingerprint: u64) -> &RwLock<Shard> {
        let [first, ..] = &self.shards;
        // The top four bits: always a shard.
        let at = usize::try_from(fingerprint >> 60).unwrap_or(0);
        self.shards.get(at).unwrap_or(first)
    }

    /// Whether Redis surely holds no entry under `key`: the set is complete and has
    /// no live fingerprint of it.
    pub(crate) fn surely_absent(&self, key: &CacheKey) -> bool {
        let fingerprint = key.fingerprint();
        // The state is read under the shard's lock, which a loss holds (with every
        // other shard's) while it clears them: a lookup never sees a cleared shard
        // as complete.
        let shard = self
            .shard(fingerprint)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if self.state.load(Ordering::Acquire) & COMPLETE == 0 {
            return false;
        }
        match shard.get(&fingerprint) {
            None => true,
            Some(until) => *until <= millis_since_epoch(SystemTime::now()),
        }
    }

    /// Whether the set is complete.
    pub(crate) fn complete(&self) -> bool {
        self.state.load(Ordering::Acquire) & COMPLETE != 0
    }

    /// Records keys written, each with its time to live in ms. A shard full of live
    /// keys makes the set incomplete, and asks for a scan.
    pub(crate) fn heard(&self, written: impl IntoIterator<Item = (u64, u64)>) {
        let now = millis_since_epoch(SystemTime::now());
        for (fingerprint, millis) in written {
            let until = now.saturating_add(millis);
            let recorded = {
                let mut shard = self
                    .shard(fingerprint)
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                self.record(&mut shard, fingerprint, until, now)
            };
            if let Recorded::Full = recorded {
                tracing::warn!(target: TARGET, max_keys = self.shard_max * SHARDS, "redis: more written keys than the set may hold; reading every key until a scan finds fewer");
                self.lost_announcements();
                return;
            }
        }
    }

    /// Adds one key to its shard. A full shard first drops its expired keys; if more
    /// than seven eighths of it are still live, it is full: so a sweep, which visits
    /// the whole shard, comes at most once every eighth of a shard's keys recorded.
    fn record(&self, shard: &mut Shard, fingerprint: u64, until: u64, now: u64) -> Recorded {
        if shard.len() >= self.shard_max && !shard.contains_key(&fingerprint) {
            shard.retain(|_, held| *held > now);
            let room = (self.shard_max / 8).max(1);
            if shard.len() + room > self.shard_max {
                return Recorded::Full;
            }
        }
        let held = shard.entry(fingerprint).or_insert(until);
        *held = (*held).max(until);
        Recorded::Held
    }

    /// Records an announcement as published; junk is ignored.
    pub(crate) fn heard_announcement(&self, message: &[u8]) {
        if message.len() > MAX_ANNOUNCEMENT_BYTES {
            return;
        }
        let Ok(text) = std::str::from_utf8(message) else {
            return;
        };
        if let Some(echo) = text.strip_prefix(ECHO).and_then(|n| n.parse().ok()) {
            self.echoes.send_replace(echo);
            return;
        }
        self.heard(parse_announcement(text));
    }

    /// The subscription was lost (or is being made again): announcements may be
    /// lost until it is back, and the set is incomplete until a scan started after
    /// that ends.
    pub(crate) fn lost_subscription(&self) {
        self.lose(0);
    }

    /// Announcements were dropped while the subscription stayed up: the set is
    /// incomplete until the scan this asks for ends.
    pub(crate) fn lost_announcements(&self) {
        self.lose(SUBSCRIBED);
        self.rescan.notify_one();
    }

    /// Whether the set waits for a subscription (lost, or never made).
    pub(crate) fn awaiting_subscription(&self) -> bool {
        self.state.load(Ordering::Acquire) & SUBSCRIBED == 0
    }

    /// The subscription is (back) up: a scan started now completes the set.
    pub(crate) fn subscribed(&self) {
        self.state.fetch_or(SUBSCRIBED, Ordering::AcqRel);
        self.rescan.notify_one();
    }

    /// Forgets every key and starts a new epoch, incomplete, keeping of the
    /// subscription's bit what `keep` says. Every shard's lock is held meanwhile
    /// (taken in order, as nothing else takes two).
    fn lose(&self, keep: u64) {
        let mut shards: Vec<_> = self
            .shards
            .iter()
            .map(|shard| shard.write().unwrap_or_else(PoisonError::into_inner))
            .collect();
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                Some(((state >> 2).wrapping_add(1)) << 2 | (state & keep & SUBSCRIBED))
            });
        for shard in &mut shards {
            shard.clear();
            shard.shrink_to(0);
        }
    }

    /// The state a scan starting now would complete: `None` when the set is complete
    /// already, or the subscription is not up (a scan then could miss what is
    /// announced before it is).
    fn scan_start(&self) -> Option<u64> {
        let state = self.state.load(Ordering::Acquire);
        (state & (SUBSCRIBED | COMPLETE) == SUBSCRIBED).then_some(state)
    }

    /// The subscription turned out not to be up for the scan that began in `start`
    /// (its echo never came back): the set waits for a subscription again, which
    /// the subscriber's probe makes.
    fn unconfirmed(&self, start: u64) {
        let _ = self.state.compare_exchange(
            start,
            start & !SUBSCRIBED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Whether the state is still `start`: nothing lost, not completed.
    fn unchanged_since(&self, start: u64) -> bool {
        self.state.load(Ordering::Acquire) == start
    }

    /// Completes the set if nothing was lost since the scan that began in `start`.
    fn scanned(&self, start: u64) -> bool {
        self.state
            .compare_exchange(start, start | COMPLETE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// What an echo on the channel starts with; the rest is a random number.
const ECHO: &str = "echo:";

/// One written key as announced: its first 16 hex digits, `:`, its time to live in
/// ms.
pub(crate) fn announce(out: &mut String, key: &CacheKey, millis: u64) {
    use std::fmt::Write;
    if !out.is_empty() {
        out.push(' ');
    }
    let _ = write!(out, "{:016x}:{millis}", key.fingerprint());
}

/// The keys an announcement names, with their times to live; malformed words are
/// skipped.
fn parse_announcement(text: &str) -> impl Iterator<Item = (u64, u64)> + '_ {
    text.split(' ').filter_map(|word| {
        let (hex, millis) = word.split_once(':')?;
        Some((fingerprint_of_hex(hex)?, millis.parse().ok()?))
    })
}

/// The fingerprint 16 hex digits (the start of a key's) say.
fn fingerprint_of_hex(hex: &str) -> Option<u64> {
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The fingerprint in an entry's name: the 16 hex digits after the prefix.
fn fingerprint_of_entry(name: &str, prefix: &str) -> Option<u64> {
    fingerprint_of_hex(name.strip_prefix(prefix)?.get(..16)?)
}

/// Follows the announcements on the subscription into `written`; a listener that
/// fell behind (messages dropped) makes the set incomplete. Ends with the store.
fn spawn_listener(
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    channel: String,
    mut closed: tokio::sync::watch::Receiver<bool>,
    written: std::sync::Arc<WrittenKeys>,
) {
    use tokio::sync::broadcast::error::RecvError;
    tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                received = messages.recv() => received,
                () = crate::store::until_closed(&mut closed) => return,
            };
            match received {
                Ok(message) if *message.channel == *channel => {
                    if let Some(bytes) = message.value.as_bytes() {
                        written.heard_announcement(bytes);
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => written.lost_announcements(),
                Err(RecvError::Closed) => return,
            }
        }
    });
}

impl RedisStore {
    /// Starts following the written keys, when they are tracked: the announcements
    /// into the set, and a scan each time the set asks for one (the first once
    /// subscribed). `every` starts the backoff after a failed scan.
    pub(crate) fn follow_written(self: &std::sync::Arc<Self>, every: Duration) {
        let Some(written) = &self.written else {
            return;
        };
        spawn_listener(
            self.invalidations(),
            self.written_channel.to_string(),
            self.closed(),
            std::sync::Arc::clone(written),
        );
        scan::spawn_scanner(
            std::sync::Arc::downgrade(self),
            std::sync::Arc::clone(written),
            every,
            self.closed(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(first: u8) -> CacheKey {
        CacheKey::from_bytes([first; 32])
    }

    fn announced(keys: &[(CacheKey, u64)]) -> String {
        let mut text = String::new();
        for (key, millis) in keys {
            announce(&mut text, key, *millis);
        }
        text
    }

    /// A set subscribed and scanned, holding nothing.
    fn complete(max_keys: usize) -> WrittenKeys {
        let written = WrittenKeys::new(max_keys);
        written.subscribed();
        assert!(written.scanned(written.scan_start().unwrap()));
        written
    }

    #[test]
    fn nothing_is_absent_until_a_scan_started_subscribed_completes_the_set() {
        let written = WrittenKeys::new(100);
        assert!(!written.surely_absent(&key(1)));
        assert_eq!(
            written.scan_start(),
            None,
            "no scan before the subscription"
        );
        written.subscribed();
        let start = written.scan_start().unwrap();
        written.heard([(key(2).fingerprint(), 60_000)]);
        assert!(!written.surely_absent(&key(1)));
        assert!(written.scanned(start));
        assert!(written.surely_absent(&key(1)));
        assert!(!written.surely_absent(&key(2)));
        assert_eq!(written.scan_start(), None, "complete: nothing to scan");
    }

    #[test]
    fn a_loss_while_a_scan_runs_keeps_the_set_incomplete() {
        for subscription in [true, false] {
            let written = WrittenKeys::new(100);
            written.subscribed();
            let start = written.scan_start().unwrap();
            written.heard([(key(2).fingerprint(), 60_000)]);
            if subscription {
                written.lost_subscription();
            } else {
                written.lost_announcements();
            }
            assert!(!written.scanned(start));
            assert!(!written.surely_absent(&key(1)));
            assert_eq!(written.len(), 0, "a loss forgets what it held");
            if subscription {
                // No scan until the subscription is back.
                assert_eq!(written.scan_start(), None);
                written.subscribed();
            }
            assert!(written.scanned(written.scan_start().unwrap()));
            assert!(written.surely_absent(&key(2)));
        }
    }

    #[test]
    fn an_echo_is_heard_apart_and_a_scan_whose_echo_never_came_waits_for_a_subscription() {
        let written = WrittenKeys::new(100);
        written.heard_announcement(b"echo:77");
        assert_eq!(*written.echoes.borrow(), 77);
        assert_eq!(written.len(), 0);
        written.subscribed();
        let start = written.scan_start().unwrap();
        assert!(!written.awaiting_subscription());
        written.unconfirmed(start);
        assert!(written.awaiting_subscription());
        assert_eq!(written.scan_start(), None);
        assert!(!written.scanned(start));
        written.subscribed();
        assert!(written.scanned(written.scan_start().unwrap()));
    }

    #[test]
    fn a_lost_subscription_completes_nothing_until_it_is_back() {
        let written = complete(100);
        written.lost_subscription();
        assert!(!written.complete());
        assert!(!written.surely_absent(&key(1)));
        assert_eq!(written.scan_start(), None);
        written.subscribed();
        assert!(written.scan_start().is_some());
    }

    #[test]
    fn an_expired_key_is_absent() {
        let written = complete(100);
        written.heard([(key(2).fingerprint(), 0), (key(3).fingerprint(), 60_000)]);
        assert!(written.surely_absent(&key(2)));
        assert!(!written.surely_absent(&key(3)));
        // A later write of the same key lives on.
        written.heard([(key(2).fingerprint(), 60_000)]);
        assert!(!written.surely_absent(&key(2)));
    }

    #[test]
    fn more_keys_than_a_shard_holds_make_the_set_incomplete() {
        // Three keys a shard; `key(i)` for i < 16 is in the first shard.
        let written = complete(3 * SHARDS);
        // Expired ones make room first.
        written.heard((0..3).map(|i| (key(i).fingerprint(), 0)));
        written.heard((3..6).map(|i| (key(i).fingerprint(), 60_000)));
        assert!(written.complete());
        assert_eq!(written.len(), 3);
        written.heard([(key(9).fingerprint(), 60_000)]);
        assert!(!written.complete());
        assert!(!written.surely_absent(&key(7)));
        assert_eq!(written.len(), 0);
        // The subscription is still up: a scan may complete it again.
        assert!(written.scan_start().is_some());
    }

    #[test]
    fn a_shard_still_seven_eighths_live_after_its_sweep_is_full() {
        // Sixteen keys a shard; fingerprints under 2^60 are in the first shard.
        let written = complete(16 * SHARDS);
        written.heard([(100, 0)]);
        written.heard((0..15).map(|fingerprint| (fingerprint, 60_000)));
        assert_eq!(written.len(), 16);
        // The sweep drops the expired key, but leaves room for one key, not two: a
        // sweep on every insert from here would visit the shard each time.
        written.heard([(200, 60_000)]);
        assert!(!written.complete());
        // One expired key more would have left room enough.
        let written = complete(16 * SHARDS);
        written.heard([(100, 0), (101, 0)]);
        written.heard((0..14).map(|fingerprint| (fingerprint, 60_000)));
        written.heard([(200, 60_000)]);
        assert!(written.complete());
        assert_eq!(written.len(), 15);
    }

    #[test]
    fn keys_in_every_shard_are_found() {
        let written = complete(100 * SHARDS);
        let keys: Vec<CacheKey> = (0..=255).map(key).collect();
        written.heard(keys.iter().map(|key| (key.fingerprint(), 60_000)));
        assert_eq!(written.len(), 256);
        for key in &keys {
            assert!(!written.surely_absent(key));
        }
        let mut other = [1; 32];
        other[0] = 0xf0;
        assert!(written.surely_absent(&CacheKey::from_bytes(other)));
    }

    #[test]
    fn announcements_roundtrip_and_junk_is_skipped() {
        let written = complete(100);
        let keys = [(key(0xab), 5_000), (key(0x01), u64::MAX)];
        let text = announced(&keys);
        assert_eq!(
            text,
            format!("{}:5000 {}:{}", "ab".repeat(8), "01".repeat(8), u64::MAX)
        );
        let junk = format!(
            "{text} zz{h}:1 {h}:x {h} :5 {short}:1 {long}:1 {plus}:1  \u{e9}",
            h = "cd".repeat(8),
            short = "cd".repeat(7),
            long = "cd".repeat(9),
            plus = format_args!("+{}", "c".repeat(15)),
        );
        written.heard_announcement(junk.as_bytes());
        written.heard_announcement(&[0xff, 0xfe, b' ']);
        written.heard_announcement(" ".repeat(MAX_ANNOUNCEMENT_BYTES + 1).as_bytes());
        assert_eq!(written.len(), 2);
        assert!(!written.surely_absent(&key(0xab)));
        assert!(!written.surely_absent(&key(0x01)));
        assert!(written.surely_absent(&key(0xcd)));
    }

    #[test]
    fn an_entry_name_gives_its_fingerprint() {
        let name = format!("ns/v2:{}", key(0x5a).to_hex());
        assert_eq!(
            fingerprint_of_entry(&name, "ns/v2:"),
            Some(key(0x5a).fingerprint())
        );
        assert_eq!(fingerprint_of_entry("ns/v2:5a5a", "ns/v2:"), None);
        assert_eq!(fingerprint_of_entry(&name, "other/v2:"), None);
        let accented = format!("ns/v2:{}", "\u{e9}".repeat(8));
        assert_eq!(fingerprint_of_entry(&accented, "ns/v2:"), None);
    }
}
