//! [`RedisRetry`]: the retry policy of Redis operations, on `tower::retry`: only transient errors, at most a few
//! attempts, exponential backoff with jitter, and a budget so that retries never add
//! more than a share of the load (a sick Redis gets no retry storm).

use std::sync::Arc;
use std::time::Duration;

use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::Policy;
use tower::util::rng::HasherRng;

use crate::error::BuildError;
use crate::store::{StoreError, StoreRequest, StoreResponse};
use crate::telemetry::{Counter, Counters, TARGET};
use tower::BoxError;

/// The retry policy of the Redis tier. Every store operation is idempotent (`GET`,
/// `SET … PX` of a whole value, `DEL`), so each may be sent again.
#[derive(Clone)]
pub(crate) struct RedisRetry {
    attempts_left: u32,
    backoff: ExponentialBackoff<HasherRng>,
    budget: Arc<TpsBudget>,
    counters: Arc<Counters>,
}

impl RedisRetry {
    /// `retries` more attempts at most per operation, each after an exponential
    /// backoff between `min_backoff` and `max_backoff`; retries are also capped at
    /// `budget_percent` of the calls over the last 10 s (plus 10 a second).
    pub(crate) fn new(
        retries: u32,
        (min_backoff, max_backoff): (Duration, Duration),
        budget_percent: f32,
        counters: Arc<Counters>,
    ) -> Result<Self, BuildError> {
        let backoff =
            ExponentialBackoffMaker::new(min_backoff, max_backoff, 0.5, HasherRng::default())
                .map_err(|e| BuildError::invalid("redis retry backoff", e))?
                .make_backoff();
        Ok(RedisRetry {
            attempts_left: retries,
            backoff,
            budget: Arc::new(TpsBudget::new(
                Duration::from_secs(10),
                10,
                budget_percent.clamp(0.0, 1000.0),
            )),
            counters,
        })
    }

    /// What `retry` does with a success (it earns retries for the budget), for a
    /// caller that only asks the policy once an attempt has failed.
    pub(crate) fn succeeded(&self) {
        self.budget.deposit();
    }
}

impl Policy<StoreRequest, StoreResponse, BoxError> for RedisRetry {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut StoreRequest,
        result: &mut Result<StoreResponse, BoxError>,
    ) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.succeeded();
                None
            }
            Err(error) => {
                // Only the store's own transient errors: an error a user layer made up is
                // its own decision, not a flaky connection.
                let transient = error
                    .downcast_ref::<StoreError>()
                    .is_some_and(StoreError::is_transient);
                if self.attempts_left == 0 || !transient {
                    return None;
                }
                if !self.budget.withdraw() {
                    self.counters.add(Counter::RetryBudgetExhausted);
                    tracing::debug!(target: TARGET, outcome = "retry-budget-exhausted");
                    return None;
                }
                self.attempts_left -= 1;
                // The next attempt's request: it goes to another connection.
                request.attempt = request.attempt.saturating_add(1);
                self.counters.add(Counter::RedisRetry);
                Some(self.backoff.next_backoff())
            }
        }
    }

    fn clone_request(&mut self, request: &StoreRequest) -> Option<StoreRequest> {
        Some(request.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::error::{Error, ErrorKind};

    fn command(kind: ErrorKind, details: &'static str) -> Result<StoreResponse, BoxError> {
        Err(Box::new(StoreError::command(Error::new(kind, details))))
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_capped_and_successes_are_not_retried() {
        let counters = Arc::new(Counters::default());
        let mut policy = RedisRetry::new(
            2,
            (Duration::from_millis(1), Duration::from_millis(4)),
            0.2,
            counters.clone(),
        )
        .unwrap();
        let mut request = StoreRequest::delete(crate::key::CacheKey::from_bytes([0; 32]));
        let mut ok: Result<StoreResponse, BoxError> =
            Ok(StoreResponse::new(crate::store::StoreAnswer::Deleted));
        assert!(policy.retry(&mut request, &mut ok).is_none());
        let mut failed = command(ErrorKind::IO, "reset");
        assert!(policy.retry(&mut request, &mut failed).is_some());
        assert!(policy.retry(&mut request, &mut failed).is_some());
        assert_eq!(request.attempt, 2, "each retry goes to another connection");
        assert!(
            policy.retry(&mut request, &mut failed).is_none(),
            "two retries at most"
        );
        let mut oom = command(ErrorKind::Unknown, "OOM");
        let mut fresh = RedisRetry::new(
            2,
            (Duration::from_millis(1), Duration::from_millis(4)),
            0.2,
            counters.clone(),
        )
        .unwrap();
        assert!(fresh.retry(&mut request, &mut oom).is_none());
        assert_eq!(counters.snapshot().redis_retries, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_stops_a_retry_storm() {
        let counters = Arc::new(Counters::default());
        let policy = RedisRetry::new(
            1,
            (Duration::from_millis(1), Duration::from_millis(4)),
            0.0,
            counters.clone(),
        )
        .unwrap();
        let mut request = StoreRequest::delete(crate::key::CacheKey::from_bytes([0; 32]));
        // Every call fails: the budget (10 a second, no share of calls) runs dry.
        let mut retried = 0;
        for _ in 0..1000 {
            let mut per_call = policy.clone();
            let mut failed = command(ErrorKind::IO, "reset");
            if per_call.retry(&mut request, &mut failed).is_some() {
                retried += 1;
            }
        }
        assert!(retried <= 110, "{retried} retries for 1000 failing calls");
        assert!(counters.snapshot().retry_budget_exhausted >= 890);
    }
}
