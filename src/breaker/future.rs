//! [`ResponseFuture`] of a call through the breaker: the call's permit is recorded
//! with its outcome (and how long it took, for a breaker that counts slow calls), or
//! given back if the call is dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::BoxError;

use super::call::Call;
use super::{CircuitBreaker, CircuitOpen};

impl CircuitBreaker {
    /// A call through the breaker: `make` starts it if the breaker lets it through
    /// (refused: `CircuitOpen`, and `make` is not run), and its outcome is recorded
    /// (a call dropped before it ends gives its place back).
    pub(crate) fn guard<F>(&self, make: impl FnOnce() -> F) -> ResponseFuture<F> {
        match self.owned_call() {
            Ok(call) => ResponseFuture {
                kind: Kind::Running {
                    future: make(),
                    call: Some(call),
                },
            },
            Err(open) => ResponseFuture {
                kind: Kind::Refused { error: Some(open) },
            },
        }
    }
}

pin_project! {
    /// The response future of [`CircuitBreakerService`].
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Running { #[pin] future: F, call: Option<Call<CircuitBreaker>> },
        Refused { error: Option<CircuitOpen> },
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Running { future, call } => {
                let result = std::task::ready!(future.poll(cx)).map_err(Into::into);
                if let Some(call) = call.take() {
                    call.finish(&result);
                }
                Poll::Ready(result)
            }
            KindProj::Refused { error } => Poll::Ready(Err(match error.take() {
                Some(open) => open.into(),
                None => CircuitOpen { _private: () }.into(),
            })),
        }
    }
}
