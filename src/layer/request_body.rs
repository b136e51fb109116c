//! [`RequestBody`]: the request body the wrapped service receives. Every request's
//! own body, but for a `QUERY` the cache had to read (its content is part of the
//! key): that one is handed on as the bytes read, followed by whatever the cache did
//! not read.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The body of a request the layer passes to the service it wraps: the client's
    /// own, or, for a `QUERY` whose content the cache read to key it, that content
    /// again (then the rest, when it stopped reading at its limit).
    pub struct RequestBody<B> {
        // Sent first: what the cache read.
        read: Option<Bytes>,
        // Sent after, if the client sent them and nothing follows.
        trailers: Option<HeaderMap>,
        #[pin]
        rest: Option<B>,
        // An error the client's body gave while the cache read it, given again.
        failed: Option<BodyError>,
    }
}

/// The error the client's request body gave while the cache read it.
#[derive(Debug)]
pub struct BodyError(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body: {}", self.0)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl<B> RequestBody<B> {
    /// Wraps a client's body, untouched (what the layer does to every request but a
    /// `QUERY` it keys).
    pub fn new(body: B) -> Self {
        RequestBody {
            read: None,
            trailers: None,
            rest: Some(body),
            failed: None,
        }
    }

    /// What the cache read of a body, then `rest` (none when it read it all).
    pub(crate) fn replay(read: Bytes, trailers: Option<HeaderMap>, rest: Option<B>) -> Self {
        RequestBody {
            read: Some(read).filter(|read| !read.is_empty()),
            trailers,
            rest,
            failed: None,
        }
    }

    /// What the cache read of a body before it failed, then the failure.
    pub(crate) fn failed(read: Bytes, error: BodyError) -> Self {
        RequestBody {
            read: Some(read).filter(|read| !read.is_empty()),
            trailers: None,
            rest: None,
            failed: Some(error),
        }
    }
}

impl BodyError {
    pub(crate) fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BodyError(error.into())
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Some(read) = this.read.take() {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        if let Some(error) = this.failed.take() {
            return Poll::Ready(Some(Err(error)));
        }
        if let Some(rest) = this.rest.as_pin_mut() {
            return rest.poll_frame(cx).map_err(BodyError::new);
        }
        Poll::Ready(
            this.trailers
                .take()
                .map(|trailers| Ok(Frame::trailers(trailers))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_none()
            && self.failed.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read = self.read.as_ref().map_or(0, |read| read.len() as u64);
        match &self.rest {
            Some(rest) => {
                let hint = rest.size_hint();
                let mut sum = SizeHint::new();
                sum.set_lower(hint.lower().saturating_add(read));
                if let Some(upper) = hint.upper() {
                    sum.set_upper(upper.saturating_add(read));
                }
                sum
            }
            None => SizeHint::with_exact(read),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn what_was_read_comes_first_then_the_rest_or_the_failure() {
        let body = RequestBody::replay(
            Bytes::from_static(b"ab"),
            None,
            Some(Full::new(Bytes::from_static(b"cd"))),
        );
        assert_eq!(body.size_hint().exact(), Some(4));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcd");

        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("1"));
        let body =
            RequestBody::<Full<Bytes>>::replay(Bytes::from_static(b"ab"), Some(trailers), None);
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-sum"], "1");
        assert_eq!(collected.to_bytes(), "ab");

        let mut body = RequestBody::<Full<Bytes>>::failed(
            Bytes::from_static(b"ab"),
            BodyError::new("client went away"),
        );
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "ab");
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("client went away"), "{error}");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());

        let untouched = RequestBody::new(Full::new(Bytes::from_static(b"xyz")));
        assert!(!untouched.is_end_stream());
        assert_eq!(untouched.collect().await.unwrap().to_bytes(), "xyz");
    }
}
