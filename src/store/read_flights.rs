//! Coalescing of Redis reads of one key (collapsed forwarding to the shared tier).
//!
//! Under a hot key, every lookup would send its own `GET` of the same value. Instead,
//! a lookup that arrives while a read of its key is on its way waits for the *next*
//! read, which starts once that one ends and is shared by every lookup that arrived
//! meanwhile: at most one read in flight and one waiting per key, whatever the
//! concurrency. Each lookup still gets an answer from a read sent after it arrived,
//! so nothing another replica wrote or invalidated before the lookup arrived can be
//! missed, as with a read of its own.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use futures_util::future::{BoxFuture, FutureExt, Shared, WeakShared};
use tokio::sync::Notify;

use crate::key::{CacheKey, KeyMap};

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
    by_key: KeyMap<Flight<V>>,
    /// Size past which flights nobody waits for any more are swept out.
    sweep_at: usize,
}

/// The newest read of a key.
struct Flight<V> {
    id: u64,
    kind: FlightKind<V>,
}

enum FlightKind<V> {
    /// Sent at once by the lookup that found no read of its key, and awaited by it
    /// alone (a lookup arriving now needs a later read): no shared future, the
    /// common case. Its end is signalled only if a later read waits for it: the
    /// signal is made by that read, so a read nobody follows allocates nothing.
    Own(Option<Arc<ReadEnded>>),
    /// Waits for the read before it, and is shared by the lookups that arrive until
    /// it is sent.
    Waiting {
        /// Set just before the read is sent: from then on, a lookup that arrives
        /// needs a later read.
        sent: Arc<AtomicBool>,
        /// Weak, so that a read every waiter gave up on is dropped, not kept by the
        /// map.
        read: WeakShared<BoxFuture<'static, V>>,
        /// The own read this one waits for, by flight id, and the signal its end
        /// gives: the own read's record was replaced by this one, and its end finds
        /// the signal here.
        after_own: Option<(u64, Arc<ReadEnded>)>,
    },
}

/// Said by a lookup's own read when it ends (or is dropped).
#[derive(Default)]
struct ReadEnded {
    ended: AtomicBool,
    notify: Notify,
}

impl ReadEnded {
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    async fn wait(&self) {
        let mut notified = std::pin::pin!(self.notify.notified());
        // Registered before the check, so that an end in between is not missed.
        notified.as_mut().enable();
        if self.ended.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

/// What a waiting read waits for before it is sent.
enum Before<V> {
    Own(Arc<ReadEnded>),
    Shared(Shared<BoxFuture<'static, V>>),
}

impl<V: Clone> Before<V> {
    async fn ended(self) {
        match self {
            Before::Own(ended) => ended.wait().await,
            Before::Shared(read) => {
                read.await;
            }
        }
    }
}

const FIRST_SWEEP: usize = 1024;

/// A lookup's place in the reads of its key.
pub(crate) enum Joined<V> {
    /// No read of the key was on its way: the lookup sends its own at once, in its
    /// own future (no shared future, no allocation: the common case), and drops the
    /// end once it has the answer, which lets the next read go.
    Own(OwnReadEnd<V>),
    /// A read that waits for the one on its way, shared by the lookups that arrive
    /// until it is sent: the lookup may wait up to two reads' time.
    Shared {
        read: Shared<BoxFuture<'static, V>>,
        /// Whether another lookup started it.
        joined: bool,
    },
}

/// Ends a lookup's own read when dropped: the key is forgotten (unless a later read
/// is waiting) and that later read is let go.
pub(crate) struct OwnReadEnd<V> {
    state: Weak<FlightState<V>>,
    key: CacheKey,
    id: u64,
}

impl<V> Drop for OwnReadEnd<V> {
    fn drop(&mut self) {
        // With the state gone, its map's drop has ended every signal it held.
        if let Some(state) = self.state.upgrade() {
            if let Some(ended) = state.finish_own(&self.key, self.id) {
                ended.end();
            }
        }
    }
}

impl<V: Clone + Send + Sync + 'static> ReadFlights<V> {
    pub(crate) fn new() -> Self {
        ReadFlights {
            state: Arc::new(FlightState {
                flights: Mutex::new(Flights {
                    by_key: KeyMap::default(),
                    sweep_at: FIRST_SWEEP,
                }),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// A read of `key` sent after this call: the lookup's own, sent at once when no
    /// read of the key is on its way; else a waiting read another lookup started, or
    /// a new one made with `read` (called only then), sent once the read on its way
    /// ends.
    pub(crate) fn join<F, Fut>(&self, key: CacheKey, read: F) -> Joined<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let mut flights = self.state.lock();
        let mut after_own = None;
        let before = match flights.by_key.get_mut(&key) {
            Some(flight) => match &mut flight.kind {
                FlightKind::Own(ended) => {
                    let ended = Arc::clone(ended.get_or_insert_with(Arc::default));
                    after_own = Some((flight.id, Arc::clone(&ended)));
                    Some(Before::Own(ended))
                }
                FlightKind::Waiting { sent, read, .. } => match read.upgrade() {
                    Some(waiting) if !sent.load(Ordering::Acquire) => {
                        return Joined::Shared {
                            read: waiting,
                            joined: true,
                        }
                    }
                    on_its_way => on_its_way.map(Before::Shared),
                },
            },
            None => None,
        };
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed);
        flights.sweep();
        let Some(before) = before else {
            flights.by_key.insert(
                key,
                Flight {
                    id,
                    kind: FlightKind::Own(None),
                },
            );
            drop(flights);
            return Joined::Own(OwnReadEnd {
                state: Arc::downgrade(&self.state),
                key,
                id,
            });
        };
        let sent = Arc::new(AtomicBool::new(false));
        let state = Arc::downgrade(&self.state);
        let sending = Arc::clone(&sent);
        // Not polled, so not sent, before the read on its way ended.
        let read = read();
        let shared = async move {
            before.ended().await;
            sending.store(true, Ordering::Release);
            let value = read.await;
            if let Some(state) = state.upgrade() {
                state.finish(&key, id);
            }
            value
        }
        .boxed()
        .shared();
        if let Some(weak) = shared.downgrade() {
            flights.by_key.insert(
                key,
                Flight {
                    id,
                    kind: FlightKind::Waiting {
                        sent,
                        read: weak,
                        after_own,
                    },
                },
            );
        }
        Joined::Shared {
            read: shared,
            joined: false,
        }
    }

    /// Keys with a flight on record (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().by_key.len()
    }
}

impl<V> Flights<V> {
    /// Drops the waiting reads every lookup gave up on, once the map has grown (own
    /// reads leave it when they end or are dropped).
    fn sweep(&mut self) {
        if self.by_key.len() < self.sweep_at {
            return;
        }
        self.by_key.retain(|_, flight| match &flight.kind {
            FlightKind::Own(_) => true,
            FlightKind::Waiting { read, .. } => read.upgrade().is_some(),
        });
        self.sweep_at = (self.by_key.len() * 2).max(FIRST_SWEEP);
    }
}

impl<V> Drop for Flights<V> {
    /// Ends the signals still held, so that no read waits on an own read whose end
    /// can no longer find its signal here.
    fn drop(&mut self) {
        for flight in self.by_key.values() {
            match &flight.kind {
                FlightKind::Own(Some(ended))
                | FlightKind::Waiting {
                    after_own: Some((_, ended)),
                    ..
                } => ended.end(),
                _ => {}
            }
        }
    }
}

impl<V> FlightState<V> {
    fn lock(&self) -> MutexGuard<'_, Flights<V>> {
        // A poisoned lock only means another lookup panicked while holding it; the
        // map is still consistent (every change is one insert or remove).
        self.flights
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets the key once its own read `id` ended (a later one, waiting, stays),
    /// and hands back the signal a later read waits on, if one was made.
    fn finish_own(&self, key: &CacheKey, id: u64) -> Option<Arc<ReadEnded>> {
        let mut flights = self.lock();
        let flight = flights.by_key.get_mut(key)?;
        if flight.id == id {
            return match flights.by_key.remove(key)?.kind {
                FlightKind::Own(ended) => ended,
                FlightKind::Waiting { .. } => None,
            };
        }
        match &mut flight.kind {
            FlightKind::Waiting { after_own, .. }
                if after_own.as_ref().is_some_and(|(own, _)| *own == id) =>
            {
                after_own.take().map(|(_, ended)| ended)
            }
            _ => None,
        }
    }

    /// Forgets the key once its newest read ended (a later one, waiting, stays).
    fn finish(&self, key: &CacheKey, id: u64) {
        let mut flights = self.lock();
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
    ) -> impl FnOnce() -> BoxFuture<'static, usize> + Clone + Send + 'static {
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

    /// Yields until `reads` reads were sent.
    async fn until_sent(sent: &AtomicUsize, reads: usize) {
        while sent.load(Ordering::SeqCst) < reads {
            tokio::task::yield_now().await;
        }
    }

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    /// Lets every other task run as far as it can.
    async fn let_others_run() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
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

    /// Which read a lookup took its answer from.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Took {
        /// Its own, sent at once.
        Own,
        /// A shared read it started, after the one on its way.
        Started,
        /// A shared read another lookup started.
        Joined,
    }

    /// The answer a lookup of `key` gets, and which read it came from.
    async fn look_up(
        flights: &ReadFlights<usize>,
        key: CacheKey,
        read: impl FnOnce() -> BoxFuture<'static, usize> + Clone,
    ) -> (Took, usize) {
        match flights.join(key, read.clone()) {
            Joined::Own(end) => {
                let value = read().await;
                drop(end);
                (Took::Own, value)
            }
            Joined::Shared { read, joined } => {
                let took = if joined { Took::Joined } else { Took::Started };
                (took, read.await)
            }
        }
    }

    /// A lookup of `key` on its own task.
    fn spawn_lookup(
        flights: &ReadFlights<usize>,
        key: CacheKey,
        read: impl FnOnce() -> BoxFuture<'static, usize> + Clone + Send + 'static,
    ) -> tokio::task::JoinHandle<usize> {
        let flights = flights.clone();
        tokio::spawn(async move { look_up(&flights, key, read).await.1 })
    }

    /// `future`'s output; a panic, not a hang, when it never ends (time is paused: the
    /// bound passes as soon as nothing else can run).
    async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(5), future)
            .await
            .unwrap_or_else(|_| panic!("{what} never ended"))
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_during_a_read_share_the_next_one_which_starts_after_them() {
        let flights = ReadFlights::<usize>::new();
        let (sent, source, gate) = redis_holding(1);
        let first = spawn_lookup(&flights, key(1), read(&sent, &source, &gate));
        until_sent(&sent, 1).await;
        // What Redis holds changes after the first read was sent: the lookups that
        // arrive now must not get the first read's answer.
        source.store(2, Ordering::SeqCst);
        let later: Vec<_> = (0..10)
            .map(|_| {
                let flights = flights.clone();
                let read = read(&sent, &source, &gate);
                tokio::spawn(async move { look_up(&flights, key(1), read).await })
            })
            .collect();
        let_others_run().await;
        assert_eq!(
            sent.load(Ordering::SeqCst),
            1,
            "the next read waits for the first"
        );
        gate.add_permits(100);
        assert_eq!(bounded("the first read", first).await.unwrap(), 1);
        let mut took = Vec::new();
        for lookup in later {
            let (read, value) = bounded("a later lookup", lookup).await.unwrap();
            assert_eq!(value, 2);
            took.push(read);
        }
        took.sort_by_key(|read| *read == Took::Joined);
        assert_eq!(
            took,
            [[Took::Started].as_slice(), &[Took::Joined; 9]].concat(),
            "one lookup started the second read, nine joined it"
        );
        assert_eq!(sent.load(Ordering::SeqCst), 2, "ten lookups, one read");
        assert_eq!(flights.len(), 0, "finished keys are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_do_not_wait_for_each_other() {
        let flights = ReadFlights::<usize>::new();
        let (sent, source, gate) = redis_holding(7);
        let lookups: Vec<_> = (0..5)
            .map(|n| spawn_lookup(&flights, key(n), read(&sent, &source, &gate)))
            .collect();
        until_sent(&sent, 5).await;
        gate.add_permits(5);
        for lookup in lookups {
            assert_eq!(bounded("a lookup", lookup).await.unwrap(), 7);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_dropped_during_its_own_read_lets_the_next_read_go() {
        let flights = ReadFlights::<usize>::new();
        let (sent, source, gate) = redis_holding(4);
        let own = spawn_lookup(&flights, key(8), read(&sent, &source, &gate));
        until_sent(&sent, 1).await;
        let next = spawn_lookup(&flights, key(8), read(&sent, &source, &gate));
        let_others_run().await;
        assert_eq!(sent.load(Ordering::SeqCst), 1, "the next read waits");
        own.abort();
        let _ = own.await;
        gate.add_permits(1);
        let value = bounded("the next read", next).await.unwrap();
        assert_eq!(value, 4);
        assert_eq!(sent.load(Ordering::SeqCst), 2);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_every_lookup_gave_up_on_is_replaced_not_awaited() {
        let flights = ReadFlights::<usize>::new();
        let (sent, source, gate) = redis_holding(3);
        let abandoned = spawn_lookup(&flights, key(9), read(&sent, &source, &gate));
        until_sent(&sent, 1).await;
        abandoned.abort();
        let _ = abandoned.await;
        // Its gate never opens; a new lookup must not wait for it.
        gate.add_permits(1);
        let (_, value) = bounded(
            "the new lookup",
            look_up(&flights, key(9), read(&sent, &source, &gate)),
        )
        .await;
        assert_eq!(value, 3);
        assert_eq!(sent.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_waiting_on_an_own_read_is_let_go_when_the_flights_are_dropped() {
        let flights = ReadFlights::<usize>::new();
        let (sent, source, gate) = redis_holding(5);
        let own = flights.join(key(4), read(&sent, &source, &gate));
        assert!(matches!(own, Joined::Own(_)));
        let Joined::Shared { read: next, .. } = flights.join(key(4), read(&sent, &source, &gate))
        else {
            panic!("a lookup during an own read shares the next read");
        };
        // The own read never ends while the cache that made it is dropped: the
        // read after it must not wait for an end nobody can signal any more.
        drop(flights);
        gate.add_permits(1);
        assert_eq!(bounded("the next read", next).await, 5);
        drop(own);
    }

    #[tokio::test(start_paused = true)]
    async fn an_own_read_nobody_follows_leaves_no_signal_behind() {
        let flights = ReadFlights::<usize>::new();
        let (sent, source, gate) = redis_holding(6);
        gate.add_permits(3);
        for _ in 0..3 {
            let (took, value) = bounded(
                "an own read",
                look_up(&flights, key(5), read(&sent, &source, &gate)),
            )
            .await;
            assert_eq!((took, value), (Took::Own, 6));
            assert_eq!(flights.len(), 0);
        }
        assert_eq!(sent.load(Ordering::SeqCst), 3);
    }
}
