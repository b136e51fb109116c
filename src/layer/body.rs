//! The response body: a stored body, the origin's body untouched, or the origin's body
//! teed into a capture that is stored once the last byte has gone to the client.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::engine::{Engine, Fill};
use crate::telemetry::{Counter, TARGET};

pin_project! {
    /// The body of every response from [`HybridCacheService`](super::HybridCacheService).
    ///
    /// A hit's body is the stored [`Bytes`] (no copy); a response that will not be
    /// stored is the origin's body, polled straight through; a response being stored
    /// is the origin's body with each chunk also kept (a reference count) until the
    /// end, when the body is copied into one buffer of its size and the entry stored
    /// (in memory at once, its Redis write queued for the background writer).
    pub struct CacheBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { data: Option<Bytes> },
        Passthrough { #[pin] inner: B },
        Capturing { #[pin] inner: B, capture: Option<Box<Capture>> },
    }
}

impl<B> CacheBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        CacheBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn empty() -> Self {
        CacheBody {
            kind: Kind::Full { data: None },
        }
    }

    pub(crate) fn passthrough(inner: B) -> Self {
        CacheBody {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(crate) fn capturing(inner: B, capture: Capture) -> Self {
        CacheBody {
            kind: Kind::Capturing {
                inner,
                // Boxed: inline, it made every response the cache hands out (a
                // hit's too) several hundred bytes larger, and a response is moved
                // several times on its way out.
                capture: Some(Box::new(capture)),
            },
        }
    }
}

impl<B> std::fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Full { .. } => "Full",
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Capturing { .. } => "Capturing",
        };
        f.debug_tuple("CacheBody").field(&kind).finish()
    }
}

/// A response on its way into the store: the fill (everything but the body), the
/// body so far, and its limit.
pub(crate) struct Capture {
    engine: Arc<Engine>,
    /// The fill, with an empty body: the captured body is put in at the end.
    fill: Fill,
    max_bytes: usize,
    chunks: Vec<Bytes>,
    len: usize,
}

impl Capture {
    pub(crate) fn new(engine: Arc<Engine>, fill: Fill, max_bytes: usize) -> Self {
        Capture {
            engine,
            fill,
            max_bytes,
            chunks: Vec::new(),
            len: 0,
        }
    }

    /// Keeps a chunk; `false` when the body has outgrown the limit.
    fn push(&mut self, chunk: &Bytes) -> bool {
        self.len = self.len.saturating_add(chunk.len());
        if self.len > self.max_bytes {
            return false;
        }
        if !chunk.is_empty() {
            self.chunks.push(chunk.clone());
        }
        true
    }

    /// Puts the body in and commits the fill; the client does not wait for it.
    pub(crate) fn finish(self) {
        let Capture {
            engine,
            mut fill,
            chunks,
            len,
            ..
        } = self;
        // Copied into one buffer of the body's size, even from a single chunk: a chunk
        // may be a slice of a larger buffer (axum's `Json` grows one as it
        // serialises, twice the body at worst; hyper reads a socket into one), all of
        // which storing the chunk would keep, unweighed, for the entry's life.
        let mut body = BytesMut::with_capacity(len);
        for chunk in chunks {
            body.extend_from_slice(&chunk);
        }
        let body = body.freeze();
        fill.entry.complete(body);
        engine.commit(fill);
    }

    fn abandon(self, why: &'static str) {
        self.engine.count(Counter::NotStored);
        tracing::debug!(target: TARGET, key = %self.fill.key, outcome = "not-stored", detail = why);
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Passthrough { inner } => inner.poll_frame(cx),
            KindProj::Capturing { mut inner, capture } => {
                let polled = std::task::ready!(inner.as_mut().poll_frame(cx));
                match &polled {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            if let Some(c) = capture.as_mut() {
                                if !c.push(data) {
                                    if let Some(c) = capture.take() {
                                        c.abandon("too-large");
                                    }
                                }
                            }
                            // Some servers stop polling once the body says it has
                            // ended; store without waiting for the final `None`.
                            if inner.is_end_stream() {
                                if let Some(c) = capture.take() {
                                    c.finish();
                                }
                            }
                        } else if let Some(c) = capture.take() {
                            // Trailers would be lost on a hit: do not store.
                            c.abandon("trailers");
                        }
                    }
                    Some(Err(_)) => {
                        if let Some(c) = capture.take() {
                            c.abandon("body-error");
                        }
                    }
                    None => {
                        if let Some(c) = capture.take() {
                            c.finish();
                        }
                    }
                }
                Poll::Ready(polled)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Passthrough { inner } => inner.is_end_stream(),
            // Until the capture is finished, the end must be polled for, so that an
            // empty body is stored too.
            Kind::Capturing { inner, capture } => capture.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Passthrough { inner } | Kind::Capturing { inner, .. } => inner.size_hint(),
        }
    }
}
