//! What other replicas invalidate reaches this replica's memory: every invalidation
//! message heard on the subscription is forgotten at once, and after each window the
//! subscriber was cut off or its listener fell behind, what the invalidation log holds
//! for that window (or, past its reach, everything).

use std::sync::Weak;
use std::time::{Duration, SystemTime};

use super::memory::MemoryStore;
use super::redis::{Invalidation, MissedWindows, RedisStore, WindowReporter};
use super::until_closed;
use crate::entry::codec::millis_since_epoch;
use crate::telemetry::{INVALIDATION_DELAY, TARGET};

/// Forgets in memory what any replica invalidated (published on `channel`): a near
/// cache serves memory first, and any cache answers from memory while Redis cannot.
/// When it falls behind the subscriber's messages (more unread than the subscriber
/// keeps), it reports a window to `lag` from the last time it had read everything,
/// for the catch-up to read back from the log, or, without a catch-up, forgets all
/// of memory. The task ends when the store closes or is dropped.
pub(crate) fn spawn_listener(
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    channel: String,
    mut closed: tokio::sync::watch::Receiver<bool>,
    memory: MemoryStore,
    lag: Option<WindowReporter>,
) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    // Every message this receiver can miss is sent after it exists.
    let mut drained_at = SystemTime::now();
    tokio::spawn(async move {
        loop {
            let received = match messages.try_recv() {
                Ok(message) => Ok(message),
                Err(TryRecvError::Lagged(missed)) => Err(RecvError::Lagged(missed)),
                Err(TryRecvError::Closed) => return,
                Err(TryRecvError::Empty) => {
                    // Everything sent until now is read: whatever this listener misses
                    // later was sent after now.
                    drained_at = SystemTime::now();
                    tokio::select! {
                        received = messages.recv() => received,
                        () = until_closed(&mut closed) => return,
                    }
                }
            };
            match received {
                // Another channel of the same subscriber (written keys).
                Ok(message) if *message.channel != *channel => {}
                Ok(message) => {
                    let text = message.value.as_string().unwrap_or_default();
                    if let Some((invalidation, sent_at)) = Invalidation::parse_published(&text) {
                        forget(&memory, invalidation);
                        if let Some(sent_at) = sent_at {
                            let now = millis_since_epoch(SystemTime::now());
                            let delay = Duration::from_millis(now.saturating_sub(sent_at));
                            metrics::histogram!(INVALIDATION_DELAY).record(delay.as_secs_f64());
                        }
                    }
                }
                // Messages were missed: each is in the log, and was sent after the
                // last time this listener had read everything. Without a catch-up,
                // forget everything rather than serve what one of them invalidated.
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(target: TARGET, missed, outcome = "invalidations-listener-behind");
                    match &lag {
                        Some(lag) => lag.report(drained_at),
                        None => memory.remove_all(),
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
}

/// Removes from memory what one invalidation names.
fn forget(memory: &MemoryStore, invalidation: Invalidation) {
    match invalidation {
        Invalidation::Key(key) => memory.remove(&key),
        Invalidation::Tag(tag) => memory.remove_tagged(&tag),
        Invalidation::All => memory.remove_all(),
    }
}

/// Removes from memory what a catch-up read, in the log's order (what follows a
/// purge still counts: an entry may have been stored again since).
fn forget_every(memory: &MemoryStore, invalidations: Vec<Invalidation>) {
    for invalidation in invalidations {
        forget(memory, invalidation);
    }
}

/// How much earlier than this replica's own clock says the catch-up reads the
/// invalidation log: other replicas' clocks stamp it.
const CLOCK_MARGIN: Duration = Duration::from_secs(5);

/// After each window in which this replica's subscriber was cut off (or its listener
/// fell behind and missed messages), memory forgets what was invalidated meanwhile
/// (read back from Redis's log, in pages), so that a later outage cannot serve it. A
/// log Redis cannot give now is asked for again after a backoff that starts at
/// `every` and doubles (with jitter) up to 32 times that; once the log no longer
/// reaches back to the window, or holds more than the catch-up reads, memory forgets
/// everything. Ends with the store.
pub(crate) fn spawn_catch_up(
    store: Weak<RedisStore>,
    memory: MemoryStore,
    mut missed: MissedWindows,
    every: Duration,
) {
    use tower::retry::backoff::{Backoff, ExponentialBackoffMaker, MakeBackoff};
    use tower::util::rng::HasherRng;
    let every = every.max(Duration::from_millis(1));
    // Saturating: the interval is the user's, and may be absurd.
    let most = every.saturating_mul(32);
    let mut backoffs = ExponentialBackoffMaker::new(every, most, 0.5, HasherRng::default()).ok();
    tokio::spawn(async move {
        while let Some(since) = missed.next().await {
            let since = since
                .checked_sub(CLOCK_MARGIN)
                .unwrap_or(std::time::UNIX_EPOCH);
            let mut backoff = backoffs.as_mut().map(MakeBackoff::make_backoff);
            loop {
                let Some(store) = store.upgrade() else {
                    return;
                };
                match store.logged_since(since).await {
                    Ok(Some(invalidations)) => {
                        tracing::debug!(target: TARGET, missed = invalidations.len(), outcome = "invalidations-caught-up");
                        forget_every(&memory, invalidations);
                        break;
                    }
                    Ok(None) => {
                        tracing::debug!(target: TARGET, outcome = "invalidations-out-of-reach");
                        memory.remove_all();
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(target: TARGET, error = %e, outcome = "invalidation-log-unreadable");
                    }
                }
                drop(store);
                match backoff.as_mut() {
                    Some(backoff) => backoff.next_backoff().await,
                    None => tokio::time::sleep(every).await,
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{CachedResponse, Entry};
    use crate::key::CacheKey;
    use crate::store::redis::subscription_windows;
    use bytes::Bytes;
    use fred::types::config::Server;
    use fred::types::{Message, MessageKind, Value};
    use http::{HeaderMap, StatusCode};
    use std::sync::Arc;
    use tokio::sync::{broadcast, watch};

    const CHANNEL: &str = "ns/invalidations";

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    fn entry() -> Entry {
        tagged(&[])
    }

    fn tagged(tags: &[&str]) -> Entry {
        let response = CachedResponse::builder(StatusCode::OK, HeaderMap::new(), Bytes::new())
            .fresh_until(SystemTime::now() + Duration::from_secs(600))
            .tags(tags)
            .build();
        Entry::Response(Arc::new(response))
    }

    #[test]
    fn a_catch_up_forgets_the_keys_and_tags_it_read_and_nothing_else() {
        let memory = MemoryStore::new(1 << 20, None);
        memory.insert(key(1), entry());
        memory.insert(key(2), entry());
        memory.insert(key(3), tagged(&["jobs"]));
        memory.insert(key(4), tagged(&["berlin", "remote"]));
        memory.insert(key(5), tagged(&["paris"]));
        forget_every(
            &memory,
            vec![
                Invalidation::Key(key(1)),
                Invalidation::Tag("jobs".to_owned()),
                Invalidation::Tag("remote".to_owned()),
                Invalidation::Tag("unheard-of".to_owned()),
            ],
        );
        let held: Vec<u8> = (1..=5).filter(|n| memory.get(&key(*n)).is_some()).collect();
        assert_eq!(held, [2, 5]);
        forget_every(&memory, vec![Invalidation::All, Invalidation::Key(key(9))]);
        assert!((1..=5).all(|n| memory.get(&key(n)).is_none()));
    }

    fn invalidation(key: CacheKey) -> Message {
        let sent_at = millis_since_epoch(SystemTime::now());
        Message {
            channel: CHANNEL.into(),
            value: Value::from(Invalidation::Key(key).stamped(sent_at)),
            kind: MessageKind::Message,
            server: Server::new("127.0.0.1", 6379),
        }
    }

    /// Yields to the listener until `done` holds, for at most 10 s.
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::task::yield_now().await;
        }
    }

    /// When a listener fell behind, and what it could have known of its window.
    struct FellBehind {
        memory: MemoryStore,
        /// Just after the listener was spawned, before it first read the channel.
        spawned: SystemTime,
        /// Just before the messages it missed were sent.
        sending: SystemTime,
        _closing: watch::Sender<bool>,
    }

    /// A memory tier holding keys 0 to 9, and a listener on a subscriber that keeps
    /// four messages; ten invalidations (keys 0 to 9) are sent while it does not run,
    /// so it misses the first six.
    async fn a_listener_falls_behind(lag: Option<WindowReporter>) -> FellBehind {
        let memory = MemoryStore::new(1 << 20, None);
        for n in 0..10 {
            memory.insert(key(n), entry());
        }
        let (sender, messages) = broadcast::channel(4);
        let (closing, closed) = watch::channel(false);
        spawn_listener(messages, CHANNEL.to_owned(), closed, memory.clone(), lag);
        let spawned = SystemTime::now();
        // The listener reads the empty channel and waits.
        tokio::task::yield_now().await;
        let sending = SystemTime::now();
        for n in 0..10 {
            sender.send(invalidation(key(n))).unwrap();
        }
        eventually("the messages still held to be read", || {
            (6..10).all(|n| memory.get(&key(n)).is_none())
        })
        .await;
        drop(sender);
        FellBehind {
            memory,
            spawned,
            sending,
            _closing: closing,
        }
    }

    #[tokio::test]
    async fn a_listener_behind_reports_the_window_it_missed_and_keeps_the_rest_of_memory() {
        let (reporter, mut windows) = subscription_windows();
        let behind = a_listener_falls_behind(Some(reporter)).await;
        // What it missed is left to the catch-up: memory still holds keys 0 to 5.
        for n in 0..6 {
            assert!(behind.memory.get(&key(n)).is_some(), "key {n} forgotten");
        }
        let since = windows.next().await.expect("a window reported");
        let (spawned, sending) = (behind.spawned, behind.sending);
        assert!(
            since >= spawned && since <= sending,
            "the window starts when the listener last had read everything \
             ({since:?}, not within {spawned:?}..={sending:?})"
        );
    }

    #[tokio::test]
    async fn a_listener_behind_without_a_catch_up_forgets_all_of_memory() {
        let behind = a_listener_falls_behind(None).await;
        eventually("memory emptied", || {
            (0..6).all(|n| behind.memory.get(&key(n)).is_none())
        })
        .await;
    }
}
