//! A circuit breaker: stop calling a sick dependency, and find out by itself when it is
//! well again.
//!
//! Closed → Open after `consecutive_failures` failures in a row, or when the failure
//! rate over the last `window` calls reaches the threshold (once `min_calls` were
//! seen). Open: calls fail at once with [`CircuitOpen`], the inner service is not
//! touched. After the open duration (doubling on each trip in a row, up to a
//! maximum, with jitter) → HalfOpen: `probes` calls go through; all succeed → Closed,
//! one fails → Open again.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::util::rng::{HasherRng, Rng};

use crate::telemetry::{BREAKER_STATE, BREAKER_TRANSITIONS, TARGET};

mod call;
mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::CircuitBreakerLayer;
pub use service::CircuitBreakerService;

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls fail at once with [`CircuitOpen`].
    Open,
    /// A few probe calls go through to test the dependency.
    HalfOpen,
}

/// The error of a call the breaker refused because it is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitOpen {
    _private: (),
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("circuit open: the call was not attempted")
    }
}

impl std::error::Error for CircuitOpen {}

/// Decides whether an error counts against the dependency.
pub(crate) type FailureFilter = Arc<dyn Fn(&tower::BoxError) -> bool + Send + Sync>;

/// The settings of a breaker; see [`CircuitBreakerLayer`]'s builder methods.
#[derive(Clone)]
pub(crate) struct BreakerConfig {
    pub(crate) consecutive_failures: u32,
    pub(crate) failure_rate: f64,
    pub(crate) window: usize,
    pub(crate) min_calls: usize,
    pub(crate) slow_call: Option<Duration>,
    pub(crate) open_for: Duration,
    pub(crate) max_open_for: Duration,
    pub(crate) jitter: f64,
    pub(crate) probes: u32,
    /// `None`: every error counts.
    pub(crate) counts: Option<FailureFilter>,
}

impl fmt::Debug for BreakerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerConfig")
            .field("consecutive_failures", &self.consecutive_failures)
            .field("failure_rate", &self.failure_rate)
            .field("window", &self.window)
            .field("min_calls", &self.min_calls)
            .field("slow_call", &self.slow_call)
            .field("open_for", &self.open_for)
            .field("max_open_for", &self.max_open_for)
            .field("jitter", &self.jitter)
            .field("probes", &self.probes)
            .field("filters_errors", &self.counts.is_some())
            .finish()
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: 20,
            min_calls: 20,
            slow_call: None,
            open_for: Duration::from_secs(1),
            max_open_for: Duration::from_secs(30),
            jitter: 0.1,
            probes: 1,
            counts: None,
        }
    }
}

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, succeeded: u32 },
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive: u32,
    window: VecDeque<bool>,
    /// Failures in `window`, kept as calls come and go so that no call counts the
    /// whole window (which a user may make large).
    window_failures: usize,
    /// Trips in a row without a successful close: the open duration doubles on each.
    trips: u32,
    transitions: u64,
}

/// The shared state of one breaker: every clone of its layer and services uses it.
///
/// ```
/// use tower_hybrid_cache::breaker::{BreakerState, CircuitBreakerLayer};
///
/// let layer = CircuitBreakerLayer::new().consecutive_failures(3);
/// let breaker = layer.breaker();
/// assert_eq!(breaker.state(), BreakerState::Closed);
/// breaker.force_open();
/// assert_eq!(layer.clone().breaker().state(), BreakerState::Open, "clones share one breaker");
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    /// One allocation for all of it: a call clones the breaker into its guard, and
    /// each `Arc` cloned is a count every thread's calls write.
    shared: Arc<Shared>,
}

struct Shared {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    /// Whether the state is Closed, kept beside the lock (written under it) so that
    /// asking while closed, which is every call of a healthy dependency, takes no lock.
    closed: AtomicBool,
    /// Whether the breaker is closed with a full window of successes (written under
    /// the lock): a success then changes nothing, and is recorded without taking
    /// the lock, which every call of a healthy dependency would otherwise take from
    /// every thread.
    settled: AtomicBool,
}

/// Permission for one call; `probe` when the breaker is half-open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Permit {
    probe: bool,
}

/// The gauge's value of `state`: 0 closed, 1 half-open, 2 open.
fn gauge_value(state: &State) -> f64 {
    match state {
        State::Closed => 0.0,
        State::HalfOpen { .. } => 1.0,
        State::Open { .. } => 2.0,
    }
}

impl CircuitBreaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        CircuitBreaker {
            shared: Arc::new(Shared {
                config,
                inner: Mutex::new(Inner {
                    state: State::Closed,
                    consecutive: 0,
                    window: VecDeque::new(),
                    window_failures: 0,
                    trips: 0,
                    transitions: 0,
                }),
                closed: AtomicBool::new(true),
                settled: AtomicBool::new(false),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn config(&self) -> &BreakerConfig {
        &self.shared.config
    }

    /// Returns the state now (an Open breaker whose time is up reads as HalfOpen).
    pub fn state(&self) -> BreakerState {
        if self.shared.closed.load(Ordering::Acquire) {
            return BreakerState::Closed;
        }
        let now = Instant::now();
        match self.lock().state {
            State::Closed => BreakerState::Closed,
            State::Open { until } if now < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Returns state changes since the breaker was made.
    pub fn transitions(&self) -> u64 {
        self.lock().transitions
    }

    /// Asks to make a call.
    pub(crate) fn acquire(&self) -> Result<Permit, CircuitOpen> {
        // A breaker opening meanwhile lets this call through as if it had asked just
        // before; its outcome is then not counted (see `record`).
        if self.shared.closed.load(Ordering::Acquire) {
            return Ok(Permit { probe: false });
        }
        let now = Instant::now();
        let mut inner = self.lock();
        if let State::Open { until } = inner.state {
            if now < until {
                return Err(CircuitOpen { _private: () });
            }
            self.half_open(&mut inner);
        }
        match &mut inner.state {
            State::Closed => Ok(Permit { probe: false }),
            State::HalfOpen {
                in_flight,
                succeeded,
            } => {
                if *in_flight + *succeeded < self.shared.config.probes {
                    *in_flight += 1;
                    Ok(Permit { probe: true })
                } else {
                    Err(CircuitOpen { _private: () })
                }
            }
            State::Open { .. } => Err(CircuitOpen { _private: () }),
        }
    }

    /// Gives back a permit whose call never finished (cancelled): it counts neither way.
    pub(crate) fn release(&self, permit: Permit) {
        if permit.probe {
            if let State::HalfOpen { in_flight, .. } = &mut self.lock().state {
                *in_flight = in_flight.saturating_sub(1);
            }
        }
    }

    /// Records how a permitted call went.
    /// `took` counts only with `slow_call` set (the guard reads the clock only then).
    pub(crate) fn record(&self, permit: Permit, ok: bool, took: Duration) {
        let failed = !ok || self.shared.config.slow_call.is_some_and(|slow| took > slow);
        if !failed && !permit.probe && self.shared.settled.load(Ordering::Acquire) {
            // A success pushed into a window of successes drops one: nothing changes.
            // One racing a failure that clears the flag counts as before it.
            return;
        }
        let mut inner = self.lock();
        if permit.probe {
            let State::HalfOpen {
                in_flight,
                succeeded,
            } = &mut inner.state
            else {
                return;
            };
            *in_flight = in_flight.saturating_sub(1);
            if failed {
                self.trip(&mut inner, Instant::now());
            } else {
                *succeeded += 1;
                if *succeeded >= self.shared.config.probes {
                    inner.trips = 0;
                    inner.consecutive = 0;
                    inner.window.clear();
                    inner.window_failures = 0;
                    self.enter(&mut inner, State::Closed, "closed");
                }
            }
            return;
        }
        if !matches!(inner.state, State::Closed) {
            // A call started before the breaker opened: it no longer counts.
            return;
        }
        inner.consecutive = if failed { inner.consecutive + 1 } else { 0 };
        inner.window.push_back(failed);
        inner.window_failures += usize::from(failed);
        while inner.window.len() > self.shared.config.window.max(1) {
            if inner.window.pop_front() == Some(true) {
                inner.window_failures -= 1;
            }
        }
        let settled =
            inner.window_failures == 0 && inner.window.len() >= self.shared.config.window.max(1);
        self.shared.settled.store(settled, Ordering::Release);
        let rate_tripped = inner.window.len() >= self.shared.config.min_calls.max(1)
            && inner.window_failures as f64
                >= self.shared.config.failure_rate * inner.window.len() as f64;
        if inner.consecutive >= self.shared.config.consecutive_failures.max(1) || rate_tripped {
            self.trip(&mut inner, Instant::now());
        }
    }

    /// Opens the breaker at once (e.g. every connection was lost).
    pub fn force_open(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        if !matches!(inner.state, State::Open { .. }) {
            self.trip(&mut inner, now);
        }
    }

    /// Lets probes through at once (e.g. a connection came back).
    pub fn force_half_open(&self) {
        let mut inner = self.lock();
        if matches!(inner.state, State::Open { .. }) {
            self.half_open(&mut inner);
        }
    }

    fn trip(&self, inner: &mut Inner, now: Instant) {
        inner.trips = inner.trips.saturating_add(1);
        let doubling = 2u32.saturating_pow(inner.trips.saturating_sub(1).min(16));
        let base = self
            .shared
            .config
            .open_for
            .saturating_mul(doubling)
            .min(self.shared.config.max_open_for);
        let open_for =
            with_jitter(base, self.shared.config.jitter).min(self.shared.config.max_open_for);
        inner.consecutive = 0;
        inner.window.clear();
        inner.window_failures = 0;
        self.enter(
            inner,
            State::Open {
                until: now + open_for,
            },
            "open",
        );
        tracing::warn!(target: TARGET, trips = inner.trips, open_for_ms = open_for.as_millis() as u64, "circuit breaker opened");
    }

    fn half_open(&self, inner: &mut Inner) {
        let state = State::HalfOpen {
            in_flight: 0,
            succeeded: 0,
        };
        self.enter(inner, state, "half-open");
    }

    /// Sets the state gauge to the state now: a scrape shows the breaker from the
    /// start, not only after its first transition.
    pub(crate) fn report_state(&self) {
        metrics::gauge!(BREAKER_STATE).set(gauge_value(&self.lock().state));
    }

    fn enter(&self, inner: &mut Inner, state: State, name: &'static str) {
        self.shared.settled.store(false, Ordering::Release);
        self.shared
            .closed
            .store(matches!(state, State::Closed), Ordering::Release);
        metrics::gauge!(BREAKER_STATE).set(gauge_value(&state));
        metrics::counter!(BREAKER_TRANSITIONS).increment(1);
        inner.state = state;
        inner.transitions += 1;
        tracing::info!(target: TARGET, state = name, "circuit breaker transition");
    }
}

/// `base` moved by up to ± `fraction` of itself.
fn with_jitter(base: Duration, fraction: f64) -> Duration {
    if fraction <= 0.0 || base.is_zero() {
        return base;
    }
    let unit = HasherRng::default().next_f64(); // [0, 1)
    let factor = 1.0 + fraction.min(1.0) * (2.0 * unit - 1.0);
    base.mul_f64(factor.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            jitter: 0.0,
            ..config
        })
    }

    fn call(b: &CircuitBreaker, ok: bool) -> Result<(), CircuitOpen> {
        let permit = b.acquire()?;
        b.record(permit, ok, Duration::from_millis(1));
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_rejects_without_calling() {
        let b = breaker(BreakerConfig::default());
        for _ in 0..4 {
            call(&b, false).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        call(&b, true).unwrap(); // a success resets the run
        for _ in 0..5 {
            call(&b, false).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.acquire().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_the_failure_rate_once_enough_calls_were_seen() {
        let b = breaker(BreakerConfig {
            consecutive_failures: 100,
            ..BreakerConfig::default()
        });
        // Alternating: never 2 failures in a row, but 50 % of 20.
        for i in 0..19 {
            call(&b, i % 2 == 0).unwrap();
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "19 calls are fewer than min_calls"
        );
        call(&b, false).unwrap();
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_of_successes_records_the_next_without_the_lock_and_counts_failures_as_before()
    {
        let b = breaker(BreakerConfig {
            consecutive_failures: 100,
            ..BreakerConfig::default()
        });
        for _ in 0..20 {
            call(&b, true).unwrap();
        }
        // With the lock held here, a success recorded on another thread still returns.
        let held = b.lock();
        let (done, recorded) = std::sync::mpsc::channel();
        let other = b.clone();
        std::thread::spawn(move || {
            other.record(Permit { probe: false }, true, Duration::ZERO);
            let _ = done.send(());
        });
        let returned = recorded.recv_timeout(Duration::from_secs(10));
        drop(held);
        assert!(returned.is_ok(), "a success waited for the lock");
        // The window is still the last 20 calls: failures trip it at half of them.
        for _ in 0..9 {
            call(&b, false).unwrap();
            call(&b, true).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Closed, "9 failures of 20");
        call(&b, false).unwrap();
        assert_eq!(b.state(), BreakerState::Open, "10 failures of 20");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_that_slid_out_of_the_window_no_longer_count() {
        let b = breaker(BreakerConfig {
            consecutive_failures: 100,
            failure_rate: 0.75,
            window: 4,
            min_calls: 4,
            ..BreakerConfig::default()
        });
        // F F S S S S: the two failures have left the window; then one more failure
        // is 1 of 4.
        for ok in [false, false, true, true, true, true, false] {
            call(&b, ok).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // S F F F: 3 of 4.
        call(&b, false).unwrap();
        assert_eq!(b.state(), BreakerState::Closed);
        call(&b, false).unwrap();
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probe_closes_or_reopens_with_a_doubled_duration() {
        let b = breaker(BreakerConfig::default());
        for _ in 0..5 {
            call(&b, false).unwrap();
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // One probe at a time.
        let probe = b.acquire().unwrap();
        assert!(b.acquire().is_err());
        b.record(probe, false, Duration::from_millis(1));
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "second trip: open twice as long"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        call(&b, true).unwrap();
        assert_eq!(b.state(), BreakerState::Closed);
        // Closing resets the doubling.
        for _ in 0..5 {
            call(&b, false).unwrap();
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn the_open_duration_is_capped() {
        let b = breaker(BreakerConfig {
            max_open_for: Duration::from_secs(3),
            ..BreakerConfig::default()
        });
        for _ in 0..5 {
            call(&b, false).unwrap();
        }
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(3)).await;
            let probe = b.acquire().unwrap();
            b.record(probe, false, Duration::ZERO);
        }
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "never open longer than the cap"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_count_as_failures_when_configured() {
        let b = breaker(BreakerConfig {
            slow_call: Some(Duration::from_millis(100)),
            ..BreakerConfig::default()
        });
        for _ in 0..5 {
            let permit = b.acquire().unwrap();
            b.record(permit, true, Duration::from_millis(150));
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_through_the_guard_are_timed_only_when_slow_calls_count() {
        let slow = |b: CircuitBreaker| async move {
            for _ in 0..5 {
                let call = b.guard(|| async {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    Ok::<(), tower::BoxError>(())
                });
                let _ = call.await;
            }
            b.state()
        };
        let counting = breaker(BreakerConfig {
            slow_call: Some(Duration::from_millis(100)),
            ..BreakerConfig::default()
        });
        assert_eq!(slow(counting).await, BreakerState::Open);
        let not_counting = breaker(BreakerConfig::default());
        assert_eq!(slow(not_counting).await, BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn forced_transitions_follow_the_connection_manager() {
        let b = breaker(BreakerConfig::default());
        b.force_open();
        assert_eq!(b.state(), BreakerState::Open);
        b.force_half_open();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        call(&b, true).unwrap();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.transitions(), 3);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        for _ in 0..1000 {
            let d = with_jitter(Duration::from_secs(10), 0.1);
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
        assert_eq!(
            with_jitter(Duration::from_secs(10), 0.0),
            Duration::from_secs(10)
        );
    }
}
