//! The subscription to a namespace's invalidations, and the windows it was cut off.
//!
//! Pub/sub keeps nothing for a subscriber that is not there: a message published while
//! a replica's subscriber reconnects never reaches it. So every invalidation is also
//! logged in Redis (a sorted set scored by its time, kept as long as the invalidation
//! marks), and each (re)subscription reports since when this replica may have missed
//! messages; the hybrid store then reads the log from then on and its memory forgets
//! those too.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::telemetry::TARGET;

/// The earliest start of the windows not yet caught up on, and a signal per new one.
pub(crate) struct MissedWindows {
    since: Arc<Mutex<Option<SystemTime>>>,
    signal: mpsc::Receiver<()>,
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

/// Connects `subscriber` and subscribes it to `channel` after every (re)connection.
/// Each subscription reports the window before it: from when a live connection was
/// lost (or, with no loss seen, from the previous subscription; for the first, from
/// now, as nothing can be in memory from before the cache existed).
pub(crate) fn subscribe(subscriber: &SubscriberClient, channel: String) -> MissedWindows {
    let started = SystemTime::now();
    // When the connection that carried the subscription was lost; cleared by each
    // subscription.
    let lost = Arc::new(Mutex::new(Some(started)));
    let on_error = Arc::clone(&lost);
    // Dropping the handle detaches the listener; it ends with the client.
    drop(subscriber.on_error(move |(_error, server)| {
        // `Some(server)`: a live connection was lost (a failed reconnection attempt
        // says `None`, and changes nothing).
        if server.is_some() {
            keep_earliest(&on_error, SystemTime::now());
        }
        async { Ok(()) }
    }));
    // Taken before connecting, so that the first connection's event is not missed.
    let mut reconnections = subscriber.reconnect_rx();
    let _connection = subscriber.connect();
    let since = Arc::new(Mutex::new(None));
    let (signal, windows) = mpsc::channel(1);
    let subscribing = subscriber.clone();
    let missed = Arc::clone(&since);
    tokio::spawn(async move {
        let mut subscribed_at = started;
        loop {
            match reconnections.recv().await {
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
            let attempted = SystemTime::now();
            if let Err(e) = subscribing.subscribe(channel.clone()).await {
                // The next reconnection tries again; the window stays open meanwhile.
                tracing::warn!(target: TARGET, error = %e, "redis: no subscription to invalidations");
                continue;
            }
            let window = take(&lost).unwrap_or(subscribed_at);
            subscribed_at = attempted;
            keep_earliest(&missed, window);
            // Full: a window is already signalled, and `since` holds the earliest.
            let _ = signal.try_send(());
        }
    });
    MissedWindows {
        since,
        signal: windows,
    }
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
