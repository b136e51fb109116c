//! Per-key single-flight: the first miss for a key leads, the rest wait for its store
//! (or its failure) and look again.

use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::key::{CacheKey, KeyMap};

/// The keys being fetched, each with the signal its followers wait on.
#[derive(Default)]
pub(crate) struct SingleFlight {
    flights: Arc<Mutex<KeyMap<watch::Receiver<()>>>>,
}

/// A request's place in the flight of its key.
pub(crate) enum Flight {
    /// This request fetches; dropping the guard releases the followers.
    Leader(FlightGuard),
    /// Another request fetches; this one waits with [`Follower::wait`].
    Follower(Follower),
}

impl SingleFlight {
    pub(crate) fn join(&self, key: CacheKey) -> Flight {
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = match flights.entry(key) {
            Entry::Occupied(flight) => return Flight::Follower(Follower(flight.get().clone())),
            Entry::Vacant(slot) => slot,
        };
        let (tx, rx) = watch::channel(());
        slot.insert(rx);
        Flight::Leader(FlightGuard {
            key,
            tx: Some(tx),
            flights: Arc::clone(&self.flights),
            on_release: None,
        })
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.flights.lock().map(|f| f.len()).unwrap_or(0)
    }
}

/// Held by a leader until its response is stored or known not to be; its drop wakes
/// every follower (their `changed()` ends when the sender goes).
pub(crate) struct FlightGuard {
    key: CacheKey,
    tx: Option<watch::Sender<()>>,
    flights: Arc<Mutex<KeyMap<watch::Receiver<()>>>>,
    /// Gives back the cross-replica fill lease, when this flight holds one.
    on_release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl FlightGuard {
    /// Runs `release` when the flight ends (stored, not storable, or abandoned).
    pub(crate) fn on_release(&mut self, release: impl FnOnce() + Send + Sync + 'static) {
        self.on_release = Some(Box::new(release));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Some(release) = self.on_release.take() {
            release();
        }
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The key's flight may be a later one (this one abandoned and replaced).
        if let (Entry::Occupied(flight), Some(tx)) = (flights.entry(self.key), self.tx.as_ref()) {
            if flight.get().same_channel(&tx.subscribe()) {
                flight.remove();
            }
        }
        drop(flights);
        self.tx.take();
    }
}

/// A request waiting for another's fetch of the same key.
pub(crate) struct Follower(watch::Receiver<()>);

impl Follower {
    /// Waits for the leader at most `timeout`; returns whether the leader finished in
    /// time.
    pub(crate) async fn wait(mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.0.changed())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_are_released_when_the_leader_drops() {
        let flights = SingleFlight::default();
        let key = CacheKey::from_bytes([1; 32]);
        let Flight::Leader(guard) = flights.join(key) else {
            panic!("first is leader")
        };
        let Flight::Follower(follower) = flights.join(key) else {
            panic!("second follows")
        };
        let waiter = tokio::spawn(follower.wait(Duration::from_secs(60)));
        drop(guard);
        assert!(waiter.await.unwrap(), "released, not timed out");
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.join(key), Flight::Leader(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn followers_give_up_after_the_timeout() {
        let flights = SingleFlight::default();
        let key = CacheKey::from_bytes([2; 32]);
        let _guard = flights.join(key);
        let Flight::Follower(follower) = flights.join(key) else {
            panic!("second follows")
        };
        assert!(!follower.wait(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn a_release_runs_when_the_flight_ends() {
        let flights = SingleFlight::default();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let Flight::Leader(mut guard) = flights.join(CacheKey::from_bytes([3; 32])) else {
            panic!("first is leader")
        };
        let flag = Arc::clone(&released);
        guard.on_release(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
        assert!(!released.load(std::sync::atomic::Ordering::SeqCst));
        drop(guard);
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
    }
}
