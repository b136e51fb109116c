//! [`CircuitBreakerService`]: a service behind the breaker.

use std::task::{Context, Poll};

use tower::{BoxError, Service};

use super::{CircuitBreaker, ResponseFuture};

/// A service behind a circuit breaker. Errors are boxed: the inner service's, or
/// [`CircuitOpen`](super::CircuitOpen) when the call was refused.
#[derive(Clone, Debug)]
pub struct CircuitBreakerService<S> {
    inner: S,
    breaker: CircuitBreaker,
}

impl<S> CircuitBreakerService<S> {
    pub(crate) fn new(inner: S, breaker: CircuitBreaker) -> Self {
        CircuitBreakerService { inner, breaker }
    }
}

impl<S, R> Service<R> for CircuitBreakerService<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let inner = &mut self.inner;
        self.breaker.guard(|| inner.call(request))
    }
}
