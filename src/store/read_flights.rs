//! Coalescing of Redis reads of one key (collapsed forwarding to the shared tier).
//!
//! Under a hot key, every lookup would send its own `GET` of the same value. Instead,
//! a lookup that arrives while a read of its key is on its way waits for the *next*
//! read, which starts once that one ends and is shared by every lookup that arrived
//! meanwhile: at most one read in flight and one waiting per key, whatever the
//! concurrency. Each lookup still gets an answer from a read sent after it arrived,
//! so nothing another replica wrote or invalidated before the lookup arrived can be
//! missed, as with a read of its own.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared, WeakShared};

use crate::CacheKey;

/// Keys with a read on its way or waiting. Cloning shares the state.
pub(crate) struct ReadFlights<V> {
    state: Arc<FlightState<V>>,
}

impl<V> Clone for ReadFlights<V> {
    fn clone(&self) -> Self {
        ReadFlights {
            state: Arc::clone(&self.state),
        }
    }
}

struct FlightState<V> {
    flights: Mutex<Flights<V>>,
    next_id: AtomicU64,
}

struct Flights<V> {
    by_key: HashMap<CacheKey, Flight<V>>,
    /// Size past which flights nobody waits for any more are swept out.
    sweep_at: usize,
}

/// The newest read of a key.
struct Flight<V> {
    id: u64,
    /// Set just before the read is sent: from then on, a lookup that arrives needs a
    /// later read.
    sent: Arc<AtomicBool>,
    /// Whether it waits for an earlier read before it is sent.
    after_another: bool,
    /// Weak, so that a read every waiter gave up on is dropped, not kept by the map.
    read: WeakShared<BoxFuture<'static, V>>,
}

const FIRST_SWEEP: usize = 1024;

/// A lookup's place in the reads of its key.
pub(crate) struct Joined<V> {
    /// The read whose answer it takes.
    pub(crate) read: Shared<BoxFuture<'static, V>>,
    /// Whether another lookup started that read.
    pub(crate) shared: bool,
    /// Whether that read waits for an earlier one: the lookup may then wait up to two
    /// reads' time.
    pub(crate) after_another: bool,
}

impl<V: Clone + Send + Sync + 'static> ReadFlights<V> {
    pub(crate) fn new() -> Self {
        ReadFlights {
            state: Arc::new(FlightState {
                flights: Mutex::new(Flights {
                    by_key: HashMap::new(),
                    sweep_at: FIRST_SWEEP,
                }),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// A read of `key` sent after this call: a waiting read another lookup started,
    /// or a new one made with `read` (sent at once, or once the read on its way
    /// ends).
    pub(crate) fn join<F, Fut>(&self, key: CacheKey, read: F) -> Joined<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = V> + Send + 'static,
    {
        // A poisoned lock only means another lookup panicked while holding it; the
        // map is still consistent (every change is one insert or remove).
        let mut flights = match self.state.flights.lock() {
            Ok(flights) => flights,
            Err(poisoned) => poisoned.into_inner(),
        };
        let before = match flights.by_key.get(&key) {
            Some(flight) => match flight.read.upgrade() {
                Some(waiting) if !flight.sent.load(Ordering::Acquire) => {
                    return Joined {
                        read: waiting,
                        shared: true,
                        after_another: flight.after_another,
                    }
                }
                on_its_way => on_its_way,
            },
            None => None,
        };
        let after_another = before.is_some();
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed);
        let sent = Arc::new(AtomicBool::new(false));
        let state = Arc::downgrade(&self.state);
        let sending = Arc::clone(&sent);
        let shared = async move {
            if let Some(before) = before {
                before.await;
            }
            sending.store(true, Ordering::Release);
            let value = read().await;
            if let Some(state) = state.upgrade() {
                state.finish(&key, id);
            }
            value
        }
        .boxed()
        .shared();
        if let Some(weak) = shared.downgrade() {
            if flights.by_key.len() >= flights.sweep_at {
                flights
                    .by_key
                    .retain(|_, flight| flight.read.upgrade().is_some());
                flights.sweep_at = (flights.by_key.len() * 2).max(FIRST_SWEEP);
            }
            flights.by_key.insert(
                key,
                Flight {
                    id,
                    sent,
                    after_another,
                    read: weak,
                },
            );
        }
        Joined {
            read: shared,
            shared: false,
            after_another,
        }
    }

    /// Keys with a flight on record (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state
            .flights
            .lock()
            .map(|f| f.by_key.len())
            .unwrap_or(0)
    }
}

impl<V> FlightState<V> {
    /// Forgets the key once its newest read ended (a later one, waiting, stays).
    fn finish(&self, key: &CacheKey, id: u64) {
        let mut flights = match self.flights.lock() {
            Ok(flights) => flights,
            Err(poisoned) => poisoned.into_inner(),
        };
        if flights
            .by_key
            .get(key)
            .is_some_and(|flight| flight.id == id)
        {
            flights.by_key.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::Semaphore;

    /// A read that counts itself, returns the value of `source` when it is sent, and
    /// answers once the gate lets it.
    fn read(
        sent: &Arc<AtomicUsize>,
        source: &Arc<AtomicUsize>,
        gate: &Arc<Semaphore>,
    ) -> impl FnOnce() -> BoxFuture<'static, usize> + Send + 'static {
        let (sent, source, gate) = (Arc::clone(sent), Arc::clone(source), Arc::clone(gate));
        move || {
            async move {
                sent.fetch_add(1, Ordering::SeqCst);
                let value = source.load(Ordering::SeqCst);
                let _permit = gate.acquire().await;
                value
            }
            .boxed()
        }
    }

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    /// Reads sent so far, what Redis holds, and the gate every read answers through
    /// (closed).
    fn redis_holding(value: usize) -> (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<Semaphore>) {
        (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(value)),
            Arc::new(Semaphore::new(0)),
        )
    }

    /// A lookup of `key` on its own task.
    fn spawn_lookup(
        flights: &ReadFlights<usize>,
        key: CacheKey,
        read: impl FnOnce() -> BoxFuture<'static, usize> + Send + 'static,
    ) -> tokio::task::JoinHandle<usize> {
        let flights = flights.clone();
        tokio::spawn(async move { flights.join(key, read).read.await })
    }

    #[tokio::test]
    async fn lookups_during_a_read_share_the_next_one_which_starts_after_them() {
        let flights = ReadFlights::<usize>::new();
        let (sent, source, gate) = redis_holding(1);
        let first = spawn_lookup(&flights, key(1), read(&sent, &source, &gate));
        while sent.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // What Redis holds changes after the first read was sent: the lookups that
        // arrive now must not get the first read's answer.
        source.store(2, Ordering::SeqCst);
        let later: Vec<_> = (0..10)
            .map(|_| {
                let flights = flights.clone();
                let read = read(&sent, &source, &gate);
                tokio::spawn(async move {
                    let joined = flights.join(key(1), read);
                    assert!(joined.after_another);
                    (joined.shared, joined.read.await)
                })
            })
            .collect();
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            sent.load(Ordering::SeqCst),
            1,
            "the next read waits for the first"
        );
        gate.add_permits(100);
        assert_eq!(first.await.unwrap(), 1);
        let mut shared = 0;
        for lookup in later {
            let (joined, value) = lookup.await.unwrap();
            assert_eq!(value, 2);
            shared += usize::from(joined);
        }
        assert_eq!(
            shared, 9,
            "one lookup started the second read, nine joined it"
        );
        assert_eq!(sent.load(Ordering::SeqCst), 2, "ten lookups, one read");
        assert_eq!(flights.len(), 0, "finished keys are forgotten");
    }

    #[tokio::test]
    async fn keys_do_not_wait_for_each_other() {
        let flights = ReadFlights::<usize>::new();
        let (sent, source, gate) = redis_holding(7);
        let lookups: Vec<_> = (0..5)
            .map(|n| spawn_lookup(&flights, key(n), read(&sent, &source, &gate)))
            .collect();
        while sent.load(Ordering::SeqCst) < 5 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(5);
        for lookup in lookups {
            assert_eq!(lookup.await.unwrap(), 7);
        }
    }

    #[tokio::test]
    async fn a_read_every_lookup_gave_up_on_is_replaced_not_awaited() {
        let flights = ReadFlights::<usize>::new();
        let (sent, source, gate) = redis_holding(3);
        let abandoned = spawn_lookup(&flights, key(9), read(&sent, &source, &gate));
        while sent.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        abandoned.abort();
        let _ = abandoned.await;
        // Its gate never opens; a new lookup must not wait for it.
        gate.add_permits(1);
        let value = flights.join(key(9), read(&sent, &source, &gate)).read.await;
        assert_eq!(value, 3);
        assert_eq!(sent.load(Ordering::SeqCst), 2);
    }
}
