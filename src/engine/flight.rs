//! Per-key single-flight: the first miss for a key leads, the rest wait for its store
//! (or its failure) and look again.

use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::key::{CacheKey, KeyMap};

/// The keys being fetched.
#[derive(Default)]
pub(crate) struct SingleFlight {
    flights: Arc<Mutex<Flights>>,
}

#[derive(Default)]
struct Flights {
    by_key: KeyMap<Slot>,
    /// Numbers the flights, so that a leader removes only its own.
    next: u64,
}

/// A key's flight: which one, and the signal its followers wait on, made by the first
/// follower (most misses have none, and then a flight allocates nothing).
struct Slot {
    flight: u64,
    signal: Option<Arc<Signal>>,
}

/// Set and notified when the leader ends.
#[derive(Default)]
struct Signal {
    done: AtomicBool,
    notify: Notify,
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
        let flight = flights.next;
        let slot = match flights.by_key.entry(key) {
            Entry::Occupied(mut slot) => {
                let signal = slot.get_mut().signal.get_or_insert_with(Arc::default);
                return Flight::Follower(Follower(Arc::clone(signal)));
            }
            Entry::Vacant(slot) => slot,
        };
        slot.insert(Slot {
            flight,
            signal: None,
        });
        flights.next = flight.wrapping_add(1);
        Flight::Leader(FlightGuard {
            key,
            flight,
            flights: Arc::clone(&self.flights),
            on_release: None,
        })
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.flights.lock().map(|f| f.by_key.len()).unwrap_or(0)
    }
}

/// Held by a leader until its response is stored or known not to be; its drop wakes
/// every follower.
pub(crate) struct FlightGuard {
    key: CacheKey,
    flight: u64,
    flights: Arc<Mutex<Flights>>,
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
        let signal = match flights.by_key.entry(self.key) {
            Entry::Occupied(slot) if slot.get().flight == self.flight => slot.remove().signal,
            _ => None,
        };
        drop(flights);
        if let Some(signal) = signal {
            signal.done.store(true, Ordering::Release);
            signal.notify.notify_waiters();
        }
    }
}

/// A request waiting for another's fetch of the same key.
pub(crate) struct Follower(Arc<Signal>);

impl Follower {
    /// Waits for the leader at most `timeout`; returns whether the leader finished in
    /// time.
    pub(crate) async fn wait(self, timeout: Duration) -> bool {
        let notified = self.0.notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the flag is read: a leader that ends in between is seen
        // either way.
        notified.as_mut().enable();
        if self.0.done.load(Ordering::Acquire) {
            return true;
        }
        tokio::time::timeout(timeout, notified).await.is_ok()
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
    async fn a_follower_that_waits_after_its_leader_ended_is_released_at_once() {
        let flights = SingleFlight::default();
        let key = CacheKey::from_bytes([4; 32]);
        let Flight::Leader(guard) = flights.join(key) else {
            panic!("first is leader")
        };
        let followers: Vec<_> = (0..2)
            .map(|_| match flights.join(key) {
                Flight::Follower(follower) => follower,
                Flight::Leader(_) => panic!("later ones follow"),
            })
            .collect();
        drop(guard);
        // Time is paused: a wait that missed the release would time out instead.
        for follower in followers {
            assert!(follower.wait(Duration::from_secs(60)).await);
        }
        // The next miss leads a flight of its own.
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
