//! [`Call`]: a call the breaker let through, whose outcome it records (or whose
//! place it gets back, if the call is dropped before it ends).

use std::borrow::Borrow;
use std::time::Duration;

use tokio::time::Instant;
use tower::BoxError;

use super::{CircuitBreaker, CircuitOpen, Permit};

impl CircuitBreaker {
    /// Asks to make a call: its guard, to be told the outcome, or `CircuitOpen`.
    ///
    /// Borrows the breaker: for a call made within the caller's own future, where a
    /// clone would cost a shared count's increment and decrement.
    pub(crate) fn call(&self) -> Result<Call<&CircuitBreaker>, CircuitOpen> {
        Call::start(self)
    }

    /// Asks to make a call whose guard outlives the borrow (a service's future).
    pub(crate) fn owned_call(&self) -> Result<Call<CircuitBreaker>, CircuitOpen> {
        Call::start(self.clone())
    }
}

/// A permitted call; given back uncounted if dropped before [`Call::finish`].
pub(crate) struct Call<B: Borrow<CircuitBreaker>> {
    breaker: B,
    permit: Permit,
    /// When the call started, if its time is needed (`slow_call`).
    started: Option<Instant>,
    finished: bool,
}

impl<B: Borrow<CircuitBreaker>> Call<B> {
    fn start(breaker: B) -> Result<Self, CircuitOpen> {
        let permit = breaker.borrow().acquire()?;
        Ok(Call {
            // The clock is read only for a breaker that counts slow calls.
            started: breaker.borrow().config().slow_call.map(|_| Instant::now()),
            breaker,
            permit,
            finished: false,
        })
    }

    /// Records the call's outcome: an error counts as a failure unless the breaker's
    /// filter says it does not.
    pub(crate) fn finish<T>(mut self, outcome: &Result<T, BoxError>) {
        let breaker = self.breaker.borrow();
        let failed = match (outcome, &breaker.config().counts) {
            (Ok(_), _) => false,
            (Err(error), Some(counts)) => counts(error),
            (Err(_), None) => true,
        };
        let took = self
            .started
            .map_or(Duration::ZERO, |started| started.elapsed());
        breaker.record(self.permit, !failed, took);
        self.finished = true;
    }
}

impl<B: Borrow<CircuitBreaker>> Drop for Call<B> {
    fn drop(&mut self) {
        if !self.finished {
            self.breaker.borrow().release(self.permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{BreakerConfig, BreakerState};
    use super::*;

    fn half_open(probes: u32) -> CircuitBreaker {
        let breaker = CircuitBreaker::new(BreakerConfig {
            probes,
            jitter: 0.0,
            ..BreakerConfig::default()
        });
        breaker.force_open();
        breaker.force_half_open();
        breaker
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_before_it_finished_gives_its_place_back() {
        let breaker = half_open(1);
        let probe = breaker.call().unwrap();
        assert!(breaker.call().is_err(), "one probe at a time");
        drop(probe);
        let probe = breaker.call().unwrap();
        probe.finish(&Ok::<(), BoxError>(()));
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_the_filter_does_not_count_is_recorded_as_a_success() {
        let breaker = CircuitBreaker::new(BreakerConfig {
            probes: 1,
            jitter: 0.0,
            counts: Some(Arc::new(|error: &BoxError| error.to_string() != "reply")),
            ..BreakerConfig::default()
        });
        breaker.force_open();
        breaker.force_half_open();
        let reply: BoxError = "reply".into();
        breaker.call().unwrap().finish(&Err::<(), _>(reply));
        assert_eq!(breaker.state(), BreakerState::Closed);

        let breaker = half_open(1);
        let lost: BoxError = "connection lost".into();
        breaker.owned_call().unwrap().finish(&Err::<(), _>(lost));
        assert_eq!(breaker.state(), BreakerState::Open);
    }
}
