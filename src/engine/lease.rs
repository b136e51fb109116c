//! The cross-replica fill lease as a fill uses it: taken with a token of its own (and
//! given back if the attempt is cut off before Redis answers), held for the length of
//! a flight.

use std::time::Duration;

use tower::util::rng::{HasherRng, Rng};

use super::{Engine, FlightGuard, Lease};
use crate::key::CacheKey;

/// Runs its action when dropped, unless disarmed first.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(action) = self.0.take() {
            action();
        }
    }
}

impl Engine {
    /// The cross-replica fill lease's time to live, when on.
    pub(crate) fn fill_lease(&self) -> Option<Duration> {
        self.fill_lease
    }

    /// Tries to take the cross-replica fill lease of `key` for `ttl`. Cancel-safe: a
    /// caller that stops waiting (a deadline) gives back whatever the attempt may
    /// have taken in Redis, so no lease outlives the wait that asked for it.
    pub(crate) async fn try_lease(&self, key: &CacheKey, ttl: Duration) -> Lease {
        let token = HasherRng::default().next_u64();
        let mut unanswered = OnDrop(Some(|| self.store.release_lease(*key, token)));
        let lease = self.store.try_lease(key, token, ttl).await;
        unanswered.disarm();
        lease
    }

    /// Gives the lease (`token`) back when the flight `guard` ends.
    pub(crate) fn hold_lease(&self, guard: &mut FlightGuard, key: CacheKey, token: u64) {
        let store = self.store.clone();
        guard.on_release(move || store.release_lease(key, token));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn the_action_runs_when_dropped_armed_and_not_once_disarmed() {
        let runs = AtomicUsize::new(0);
        drop(OnDrop(Some(|| {
            runs.fetch_add(1, Ordering::SeqCst);
        })));
        let mut disarmed = OnDrop(Some(|| {
            runs.fetch_add(1, Ordering::SeqCst);
        }));
        disarmed.disarm();
        drop(disarmed);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
