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
    /// One success in this many, drawn at random, deposits in the budget, which is
    /// made to count each deposit as this many (1: every success deposits).
    deposit_every: u64,
    counters: Arc<Counters>,
}

/// How many successes a sampled deposit stands for. tower's budget takes a lock every
/// thread shares and reads the clock on each deposit, which every successful Redis
/// operation made; one in sixteen (at random, so that no pattern of calls always or
/// never deposits) keeps the budget's share within 0.2 % of itself at the default
/// 20 % (the budget rounds what a retry costs to whole thousandths of a deposit).
const DEPOSIT_EVERY: u64 = 16;

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
        let share = budget_percent.clamp(0.0, 1000.0);
        // Sampled only where the budget keeps the scaled share within 1 %: a scaled
        // share up to 1 is rounded to a whole number of deposits a retry, and one
        // above it to whole thousandths of a deposit a retry, at least 100 of them
        // up to a scaled share of 10 (a share of 5/8).
        let scaled = share * DEPOSIT_EVERY as f32;
        let deposit_every = if scaled > 1.0 && scaled <= 10.0 {
            DEPOSIT_EVERY
        } else {
            1
        };
        Ok(RedisRetry {
            attempts_left: retries,
            backoff,
            budget: Arc::new(TpsBudget::new(
                Duration::from_secs(10),
                10,
                share * deposit_every as f32,
            )),
            deposit_every,
            counters,
        })
    }

    /// What `retry` does with a success (it earns retries for the budget), for a
    /// caller that only asks the policy once an attempt has failed.
    pub(crate) fn succeeded(&self) {
        if self.deposit_every == 1 || crate::random::next_u64() % self.deposit_every == 0 {
            self.budget.deposit();
        }
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

    /// A policy with `retries` and `share`, backing off 1 to 4 ms.
    fn retry_policy(retries: u32, share: f32, counters: &Arc<Counters>) -> RedisRetry {
        RedisRetry::new(
            retries,
            (Duration::from_millis(1), Duration::from_millis(4)),
            share,
            Arc::clone(counters),
        )
        .unwrap()
    }

    fn command(kind: ErrorKind, details: &'static str) -> Result<StoreResponse, BoxError> {
        Err(Box::new(StoreError::command(Error::new(kind, details))))
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_capped_and_successes_are_not_retried() {
        let counters = Arc::new(Counters::default());
        let mut policy = retry_policy(2, 0.2, &counters);
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
        let mut fresh = retry_policy(2, 0.2, &counters);
        assert!(fresh.retry(&mut request, &mut oom).is_none());
        assert_eq!(counters.snapshot().redis_retries, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_stops_a_retry_storm() {
        let counters = Arc::new(Counters::default());
        let policy = retry_policy(1, 0.0, &counters);
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

    #[tokio::test(start_paused = true)]
    async fn successes_earn_the_budget_its_share_of_retries() {
        let counters = Arc::new(Counters::default());
        let policy = retry_policy(1, 0.2, &counters);
        assert_eq!(
            policy.deposit_every, DEPOSIT_EVERY,
            "the default share is sampled"
        );
        for _ in 0..20_000 {
            policy.succeeded();
        }
        let mut request = StoreRequest::delete(crate::key::CacheKey::from_bytes([0; 32]));
        let mut retried = 0;
        while retried < 10_000 {
            let mut per_call = policy.clone();
            let mut failed = command(ErrorKind::IO, "reset");
            if per_call.retry(&mut request, &mut failed).is_none() {
                break;
            }
            retried += 1;
        }
        // 20 % of 20 000 successes, and 10 a second over the 10 s window: 4 100. The
        // sampled deposits (1 250 expected) are off by more than 150 once in 10⁵ runs.
        assert!(
            (3_500..=4_700).contains(&retried),
            "{retried} retries earned by 20 000 successes"
        );
    }

    #[test]
    fn a_share_the_budget_cannot_scale_exactly_is_deposited_on_every_success() {
        let counters = Arc::new(Counters::default());
        let new = |share| retry_policy(1, share, &counters).deposit_every;
        assert_eq!(new(0.0), 1);
        assert_eq!(new(0.05), 1, "16 × 0.05 rounds to a retry a success");
        assert_eq!(new(0.1), DEPOSIT_EVERY);
        assert_eq!(new(0.625), DEPOSIT_EVERY);
        assert_eq!(new(1.0), 1, "16 × 1 would cost a retry 62.5 thousandths");
        assert_eq!(new(100.0), 1, "16 × 100 is past the budget's largest share");
    }
}
