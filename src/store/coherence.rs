//! What other replicas invalidate reaches this replica's memory: every invalidation
//! message heard on the subscription is forgotten at once, and after each window the
//! subscriber was cut off, what the invalidation log holds for that window (or, past
//! its reach, everything).

use std::sync::Weak;
use std::time::{Duration, SystemTime};

use super::memory::MemoryStore;
use super::redis::{Invalidation, MissedWindows, RedisStore};
use super::until_closed;
use crate::entry::codec::millis_since_epoch;
use crate::telemetry::{INVALIDATION_DELAY, TARGET};

/// Forgets in memory what any replica invalidated (published on `channel`): a near
/// cache serves memory first, and any cache answers from memory while Redis cannot.
/// The task ends when the store closes or is dropped.
pub(crate) fn spawn_listener(
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    channel: String,
    mut closed: tokio::sync::watch::Receiver<bool>,
    memory: MemoryStore,
) {
    use tokio::sync::broadcast::error::RecvError;
    tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                received = messages.recv() => received,
                () = until_closed(&mut closed) => return,
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
                // Messages were missed: forget everything rather than serve what one
                // of them invalidated.
                Err(RecvError::Lagged(_)) => memory.remove_all(),
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

/// How much earlier than this replica's own clock says the catch-up reads the
/// invalidation log: other replicas' clocks stamp it.
const CLOCK_MARGIN: Duration = Duration::from_secs(5);

/// After each window in which this replica's subscriber was cut off, memory forgets
/// what was invalidated meanwhile (read back from Redis's log, in pages), so that a
/// later outage cannot serve it. A log Redis cannot give now is asked for again after
/// a backoff that starts at `every` and doubles (with jitter) up to 32 times that;
/// once the log no longer reaches back to the window, or holds more than the catch-up
/// reads, memory forgets everything. Ends with the store.
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
                        for invalidation in invalidations {
                            forget(&memory, invalidation);
                        }
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
