//! The subscription to a namespace's invalidations, and the windows it was cut off.
//!
//! Pub/sub keeps nothing for a subscriber that is not there: a message published while
//! a replica's subscriber reconnects never reaches it. So every invalidation is also
//! logged in Redis (a sorted set scored by its time, kept as long as the invalidation
//! marks), and each (re)subscription reports since when this replica may have missed
//! messages; the hybrid store then reads the log from then on and its memory forgets
//! those too.
//!
//! A subscriber connection can also die without a word (a peer or a middlebox gone,
//! the socket half-open): fred would wait on it forever, and every message published
//! meanwhile would be lost. So the subscriber is PINGed like the pooled connections;
//! two PINGs in a row unanswered force a reconnection, and the window reaches back
//! to the last PING answered.
//!
//! The same connection carries the written keys' announcements when they are
//! tracked, subscribed apart (a user not allowed that channel keeps the
//! invalidations): each loss and each subscription is told to their set, which is
//! complete only after a scan that began subscribed. The probe subscribes it again
//! whenever the set waits for a subscription on a connection that answers (a
//! subscription refused, or a loss reported after the subscription that followed
//! it).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use super::health::{one_attempt, FAILED_PINGS_TO_DOWN};
use super::written::WrittenKeys;
use crate::store::until_closed;
use crate::telemetry::TARGET;

/// How the subscriber connection is watched, and until when.
pub(crate) struct SubscriberProbe {
    /// How often it is sent a PING.
    pub(crate) every: Duration,
    /// How long a PING may go unanswered.
    pub(crate) timeout: Duration,
    /// The subscription's tasks end once this says `true` or its sender is dropped
    /// (the store that owns the subscriber is closing or gone).
    pub(crate) closed: watch::Receiver<bool>,
    /// The written keys, if tracked, and the channel they are announced on.
    pub(crate) written: Option<(Arc<WrittenKeys>, String)>,
}

/// Subscribes to the written keys' channel, and tells their set once it is.
async fn subscribe_written(
    subscriber: &SubscriberClient,
    (written, channel): &(Arc<WrittenKeys>, String),
) {
    match subscriber.subscribe(channel.clone()).await {
        Ok(()) => written.subscribed(),
        Err(e) => {
            tracing::debug!(target: TARGET, error = %e, outcome = "written-keys-unsubscribed");
        }
    }
}

/// The earliest start of the windows not yet caught up on, and a signal per new one.
pub(crate) struct MissedWindows {
    since: Arc<Mutex<Option<SystemTime>>>,
    signal: mpsc::Receiver<()>,
}

/// Reports a window in which messages may have been missed, to be caught up on: kept
/// by the subscription (each time it is back) and by the invalidation listener (each
/// time it falls behind the subscriber's messages).
#[derive(Clone)]
pub(crate) struct WindowReporter {
    since: Arc<Mutex<Option<SystemTime>>>,
    signal: mpsc::Sender<()>,
}

impl WindowReporter {
    /// Reports that messages sent after `since` may have been missed.
    pub(crate) fn report(&self, since: SystemTime) {
        keep_earliest(&self.since, since);
        // Full: a window is already signalled, and `since` holds the earliest.
        let _ = self.signal.try_send(());
    }
}

/// A reporter and the windows it reports; the windows end once every reporter is
/// dropped.
pub(crate) fn missed_windows() -> (WindowReporter, MissedWindows) {
    let since = Arc::new(Mutex::new(None));
    let (signal, windows) = mpsc::channel(1);
    let reporter = WindowReporter {
        since: Arc::clone(&since),
        signal,
    };
    (
        reporter,
        MissedWindows {
            since,
            signal: windows,
        },
    )
}

impl MissedWindows {
    /// Waits until the subscriber is back after a window, and returns since when it
    /// may have missed messages (the earliest, when several windows came first).
    /// `None` once the subscriber is gone.
    pub(crate) async fn next(&mut self) -> Option<SystemTime> {
        loop {
            self.signal.recv().await?;
            if let Some(since) = take(&self.since) {
                return Some(since);
            }
        }
    }
}

fn take(slot: &Mutex<Option<SystemTime>>) -> Option<SystemTime> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

fn keep_earliest(slot: &Mutex<Option<SystemTime>>, at: SystemTime) {
    let mut held = slot.lock().unwrap_or_else(PoisonError::into_inner);
    *held = Some(held.map_or(at, |held| held.min(at)));
}

/// Connects `subscriber` and subscribes it to `channel` (and the written keys'
/// channel, when tracked) after every (re)connection.
/// Each subscription reports the window before it: from when a live connection was
/// lost (or, with no loss seen, from the previous subscription; for the first, from
/// now, as nothing can be in memory from before the cache existed).
/// Also returns the connection task, for the store to stop once it closes, and a
/// reporter of the same windows for the listeners of the subscriber's messages.
pub(crate) fn subscribe(
    subscriber: &SubscriberClient,
    channel: String,
    probe: SubscriberProbe,
) -> (MissedWindows, WindowReporter, AbortHandle) {
    let started = SystemTime::now();
    // When the connection that carried the subscription was lost; cleared by each
    // subscription.
    let lost = Arc::new(Mutex::new(Some(started)));
    let on_error = Arc::clone(&lost);
    let written = probe.written.clone();
    let written_on_error = written.clone();
    // Dropping the handle detaches the listener; it ends with the client.
    drop(subscriber.on_error(move |(_error, server)| {
        // `Some(server)`: a live connection was lost (a failed reconnection attempt
        // says `None`, and changes nothing).
        if server.is_some() {
            keep_earliest(&on_error, SystemTime::now());
            if let Some((written, _)) = &written_on_error {
                written.lost_subscription();
            }
        }
        async { Ok(()) }
    }));
    // Taken before connecting, so that the first connection's event is not missed.
    let mut reconnections = subscriber.reconnect_rx();
    let connection = subscriber.connect().abort_handle();
    let mut closed = probe.closed.clone();
    spawn_probe(subscriber.clone(), Arc::clone(&lost), probe);
    let (reporter, windows) = missed_windows();
    let report = reporter.clone();
    let subscribing = subscriber.clone();
    tokio::spawn(async move {
        let mut subscribed_at = started;
        loop {
            let reconnected = tokio::select! {
                reconnected = reconnections.recv() => reconnected,
                () = until_closed(&mut closed) => return,
            };
            match reconnected {
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
            let attempted = SystemTime::now();
            // Whatever was announced while the connection was away is lost.
            if let Some((written, _)) = &written {
                written.lost_subscription();
            }
            let invalidations = subscribing.subscribe(channel.clone()).await;
            if let Some(written) = &written {
                subscribe_written(&subscribing, written).await;
            }
            if let Err(e) = invalidations {
                // The next reconnection tries again; the window stays open meanwhile.
                tracing::warn!(target: TARGET, error = %e, "redis: no subscription to invalidations");
                continue;
            }
            let window = take(&lost).unwrap_or(subscribed_at);
            subscribed_at = attempted;
            report.report(window);
        }
    });
    (windows, reporter, connection)
}

/// PINGs the subscriber while it is connected; after two PINGs in a row unanswered,
/// records the connection lost since the last PING answered was sent, and forces a
/// reconnection (which resubscribes and reports that window).
fn spawn_probe(
    subscriber: SubscriberClient,
    lost: Arc<Mutex<Option<SystemTime>>>,
    mut probe: SubscriberProbe,
) {
    let options = one_attempt(probe.timeout);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(probe.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answered_at = SystemTime::now();
        let mut unanswered = 0;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = until_closed(&mut probe.closed) => return,
            }
            // Not connected: fred is reconnecting already (or the store quit).
            if !subscriber.is_connected() {
                unanswered = 0;
                continue;
            }
            let sent = SystemTime::now();
            let pinged: Result<(), _> = subscriber.with_options(&options).ping(None).await;
            if pinged.is_ok() {
                answered_at = sent;
                unanswered = 0;
                if let Some(written) = &probe.written {
                    if written.0.awaiting_subscription() {
                        subscribe_written(&subscriber, written).await;
                    }
                }
                continue;
            }
            unanswered += 1;
            if unanswered >= FAILED_PINGS_TO_DOWN {
                unanswered = 0;
                tracing::warn!(target: TARGET, "redis: the invalidations subscriber does not answer; reconnecting it");
                keep_earliest(&lost, answered_at);
                if let Some((written, _)) = &probe.written {
                    written.lost_subscription();
                }
                let _ = subscriber.force_reconnection().await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_earliest_window_is_kept_until_taken() {
        let slot = Mutex::new(None);
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        keep_earliest(&slot, t);
        keep_earliest(&slot, t + Duration::from_secs(5));
        keep_earliest(&slot, t - Duration::from_secs(5));
        assert_eq!(take(&slot), Some(t - Duration::from_secs(5)));
        assert_eq!(take(&slot), None);
    }
}
