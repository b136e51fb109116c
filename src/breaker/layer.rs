//! [`CircuitBreakerLayer`]: the breaker as a tower layer.

use std::sync::Arc;
use std::time::Duration;

use tower::{BoxError, Layer};

use super::{BreakerConfig, CircuitBreaker, CircuitBreakerService};

/// Wraps a service in a circuit breaker. Clones share one breaker.
///
/// ```
/// use std::time::Duration;
/// use tower::{Layer, ServiceExt};
/// use tower_hybrid_cache::breaker::{BreakerState, CircuitBreakerLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = CircuitBreakerLayer::new().consecutive_failures(2).open_for(Duration::from_secs(1), Duration::from_secs(30));
/// let failing = tower::service_fn(|_: ()| async { Err::<(), _>("redis is down") });
/// let service = layer.layer(failing);
/// for _ in 0..2 {
///     assert!(service.clone().oneshot(()).await.is_err());
/// }
/// assert_eq!(layer.breaker().state(), BreakerState::Open);
/// let refused = service.oneshot(()).await.unwrap_err();
/// assert!(refused.is::<tower_hybrid_cache::breaker::CircuitOpen>());
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct CircuitBreakerLayer {
    breaker: CircuitBreaker,
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CircuitBreakerLayer {
    /// Creates a breaker with the defaults: opens after 5 consecutive failures or 50 % of the
    /// last 20 calls; open 1 s, doubling on each trip in a row up to 30 s, ± 10 %
    /// jitter; one probe call half-open; slow calls do not count.
    pub fn new() -> Self {
        CircuitBreakerLayer {
            breaker: CircuitBreaker::new(BreakerConfig::default()),
        }
    }

    fn with(self, change: impl FnOnce(&mut BreakerConfig)) -> Self {
        // Settings are fixed before the breaker is shared: a changed setting makes a
        // new breaker (clones made before it keep the old one).
        let mut config = self.breaker.config().clone();
        change(&mut config);
        CircuitBreakerLayer {
            breaker: CircuitBreaker::new(config),
        }
    }

    /// Sets the failures in a row that open the breaker. Default 5.
    pub fn consecutive_failures(self, n: u32) -> Self {
        self.with(|c| c.consecutive_failures = n.max(1))
    }

    /// Opens when at least `rate` (0.0 to 1.0) of the last `window` calls failed, once
    /// `min_calls` calls are in the window. Default 0.5 of 20, from 20 calls.
    pub fn failure_rate(self, rate: f64, window: usize, min_calls: usize) -> Self {
        self.with(|c| {
            c.failure_rate = if rate.is_finite() {
                rate.clamp(0.0, 1.0)
            } else {
                1.0
            };
            c.window = window.max(1);
            c.min_calls = min_calls.clamp(1, window.max(1));
        })
    }

    /// Counts calls slower than this as failures, even when they succeed. Default: off.
    pub fn slow_call(self, threshold: Duration) -> Self {
        self.with(|c| c.slow_call = Some(threshold))
    }

    /// Sets how long the breaker stays open: `base` on the first trip, doubling on each
    /// trip in a row, never more than `max`. Default 1 s and 30 s.
    pub fn open_for(self, base: Duration, max: Duration) -> Self {
        self.with(|c| {
            c.open_for = base;
            c.max_open_for = max.max(base);
        })
    }

    /// Moves the open duration by up to ± this fraction, so replicas do not probe in
    /// step. Default 0.1.
    pub fn jitter(self, fraction: f64) -> Self {
        self.with(|c| {
            c.jitter = if fraction.is_finite() {
                fraction.clamp(0.0, 1.0)
            } else {
                0.0
            }
        })
    }

    /// Sets the calls let through while half-open; all must succeed to close. Default 1.
    pub fn half_open_probes(self, n: u32) -> Self {
        self.with(|c| c.probes = n.max(1))
    }

    /// Counts only the errors `counts` says are the dependency's failure (by default
    /// every error counts). The Redis tier uses this so that error replies (`OOM`,
    /// `WRONGTYPE`) do not trip it, while lost connections and timeouts do.
    pub fn count_errors_if<F>(self, counts: F) -> Self
    where
        F: Fn(&BoxError) -> bool + Send + Sync + 'static,
    {
        self.with(|c| c.counts = Some(Arc::new(counts)))
    }

    /// Whether an error filter was set.
    pub(crate) fn filters_errors(&self) -> bool {
        self.breaker.config().counts.is_some()
    }

    /// Returns the breaker every service from this layer (and its clones) shares.
    pub fn breaker(&self) -> CircuitBreaker {
        self.breaker.clone()
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreakerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService::new(inner, self.breaker.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    use crate::breaker::{BreakerState, CircuitOpen};

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_does_not_touch_the_inner_service() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let inner = tower::service_fn(move |fail: bool| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if fail {
                    Err("down")
                } else {
                    Ok(())
                }
            }
        });
        let layer = CircuitBreakerLayer::new()
            .consecutive_failures(3)
            .jitter(0.0);
        let service = layer.layer(inner);
        for _ in 0..3 {
            assert!(service.clone().oneshot(true).await.is_err());
        }
        assert_eq!(layer.breaker().state(), BreakerState::Open);
        for _ in 0..10 {
            let err = service.clone().oneshot(false).await.unwrap_err();
            assert!(err.is::<CircuitOpen>());
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "refused calls never reached it"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        service.clone().oneshot(false).await.unwrap();
        assert_eq!(layer.breaker().state(), BreakerState::Closed);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_its_place() {
        let inner = tower::service_fn(|wait: bool| async move {
            if wait {
                std::future::pending::<()>().await;
            }
            Ok::<_, BoxError>(())
        });
        let layer = CircuitBreakerLayer::new().jitter(0.0);
        let breaker = layer.breaker();
        breaker.force_open();
        breaker.force_half_open();
        let service = layer.layer(inner);
        let stuck = service.clone().oneshot(true);
        // The probe is in flight; dropping it must not wedge the breaker half-open.
        assert!(tokio::time::timeout(Duration::from_millis(10), stuck)
            .await
            .is_err());
        service.clone().oneshot(false).await.unwrap();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;
    use tower::ServiceExt;

    use crate::breaker::BreakerState;

    #[tokio::test(start_paused = true)]
    async fn errors_the_filter_excuses_do_not_trip_the_breaker() {
        let inner = tower::service_fn(|reply: &'static str| async move { Err::<(), _>(reply) });
        let layer = CircuitBreakerLayer::new()
            .consecutive_failures(2)
            .count_errors_if(|e| !e.to_string().starts_with("OOM"));
        let service = layer.layer(inner);
        for _ in 0..10 {
            assert!(service
                .clone()
                .oneshot("OOM command not allowed")
                .await
                .is_err());
        }
        assert_eq!(layer.breaker().state(), BreakerState::Closed);
        for _ in 0..2 {
            assert!(service.clone().oneshot("connection reset").await.is_err());
        }
        assert_eq!(layer.breaker().state(), BreakerState::Open);
    }
}
