//! [`ResponseFuture`] of [`HybridCacheService`](super::HybridCacheService).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use super::body::CacheBody;
use crate::policy::settings::RouteSettings;

pub(crate) type BoxedResponse<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, E>> + Send + 'static>>;

pin_project! {
    /// The response future of [`HybridCacheService`](super::HybridCacheService).
    ///
    /// A hit is ready at once; a request the cache does not handle is the inner
    /// future plus a header; a miss runs single-flight and the origin call in one
    /// boxed future.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Bypass { #[pin] future: F, cache_status: Option<HeaderValue>, strip: Option<Arc<RouteSettings>>, span: tracing::Span },
        Cached { future: BoxedResponse<B, E> },
        Ready { response: Option<Response<CacheBody<B>>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    /// The inner future (polled in the request's `span`), plus `cache_status`;
    /// `strip` is the route when it hides fields from the client (its tag header, its
    /// targeted cache-control fields).
    pub(crate) fn bypass(
        future: F,
        cache_status: Option<HeaderValue>,
        strip: Option<Arc<RouteSettings>>,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            kind: Kind::Bypass {
                future,
                cache_status,
                strip,
                span,
            },
        }
    }

    pub(crate) fn ready(response: Response<CacheBody<B>>) -> Self {
        ResponseFuture {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    /// `future` boxed, polled in the request's `span` when it is on; when it is off
    /// (no subscriber wants it), not wrapped at all: the wrapper is a move of the
    /// whole future (a miss's is large) for nothing.
    pub(crate) fn cached<Fut>(future: Fut, span: &tracing::Span) -> Self
    where
        Fut: Future<Output = Result<Response<CacheBody<B>>, E>> + Send + 'static,
    {
        let future: BoxedResponse<B, E> = if span.is_disabled() {
            Box::pin(future)
        } else {
            Box::pin(tracing::Instrument::instrument(future, span.clone()))
        };
        ResponseFuture {
            kind: Kind::Cached { future },
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CacheBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Bypass {
                future,
                cache_status,
                strip,
                span,
            } => {
                let _entered = span.enter();
                let response = std::task::ready!(future.poll(cx))?;
                let (mut parts, body) = response.into_parts();
                if let Some(route) = strip.take() {
                    route.hide_fields(&mut parts.headers);
                }
                if let Some(value) = cache_status.take() {
                    let _ = parts.headers.try_append(super::status::CACHE_STATUS, value);
                }
                Poll::Ready(Ok(Response::from_parts(
                    parts,
                    CacheBody::passthrough(body),
                )))
            }
            KindProj::Cached { future } => future.as_mut().poll(cx),
            KindProj::Ready { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled again after completion: a caller bug, as for any future.
                None => Poll::Pending,
            },
        }
    }
}
