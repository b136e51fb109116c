//! `QUERY` (RFC 10008): a safe request whose content says what it asks, so its
//! responses are cacheable under a key that covers the content. The content is read
//! before the lookup, up to the route's limit; a larger one, one with trailers, or
//! one the client failed to send passes through untouched (what was read is handed
//! on first), neither looked up nor stored. A `QUERY` never invalidates.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use http_body::Body;
use tower::{Service, ServiceExt};

use super::body::CacheBody;
use super::fill::{serve_or_fill, Prepared};
use super::request_body::{BodyError, RequestBody};
use super::response::Stamp;
use super::serve::FieldsSeen;
use super::status::{CacheStatus, Detail};
use crate::engine::Engine;
use crate::key::CacheKey;
use crate::policy::settings::RouteSettings;
use crate::telemetry::Counter;

/// What reading a `QUERY`'s content gave.
enum Content<B> {
    /// All of it, within the limit.
    Whole(Bytes),
    /// Not all of it (too large, trailers, a failure): the body to pass on.
    PassOn(RequestBody<B>),
}

/// Reads a body up to `limit` bytes.
async fn read_content<B>(mut body: B, limit: usize) -> Content<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if body.size_hint().lower() > limit as u64 {
        return Content::PassOn(RequestBody::new(body));
    }
    let mut read = BytesMut::new();
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx));
        match frame.await {
            None => return Content::Whole(read.freeze()),
            Some(Err(error)) => {
                let body = RequestBody::failed(read.freeze(), BodyError::new(error));
                return Content::PassOn(body);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    read.extend_from_slice(&data);
                    if read.len() > limit {
                        let body = RequestBody::replay(read.freeze(), None, Some(body));
                        return Content::PassOn(body);
                    }
                }
                Err(frame) => {
                    // Trailers: the key would not cover them.
                    let trailers: Option<HeaderMap> = frame.into_trailers().ok();
                    let body = RequestBody::replay(read.freeze(), trailers, Some(body));
                    return Content::PassOn(body);
                }
            },
        }
    }
}

/// Reads a `QUERY`'s content, then serves it from the cache or fills it under a key
/// that covers the content; passes it through when the content cannot be keyed.
pub(crate) async fn serve_query<S, ReqBody, ResBody>(
    mut inner: S,
    engine: Arc<Engine>,
    settings: Arc<RouteSettings>,
    request: Request<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
    ReqBody: Body<Data = Bytes> + Unpin + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    let (parts, body) = request.into_parts();
    match read_content(body, settings.max_query_bytes).await {
        Content::Whole(content) => {
            let seen = FieldsSeen {
                // A range is of a GET's response only (RFC 9110 §14.2).
                range: false,
                ..FieldsSeen::of(&parts.headers)
            };
            let request_cc = seen.cache_control(&parts.headers);
            let primary = CacheKey::primary(&parts.method, &parts.uri, &parts.headers, &settings)
                .with_content(&parts.headers, &content);
            let request = Request::from_parts(parts, RequestBody::replay(content, None, None));
            let prepared = Prepared {
                primary,
                request_cc,
                known: None,
                seen,
            };
            serve_or_fill(inner, engine, settings, request, prepared).await
        }
        Content::PassOn(body) => {
            engine.count(Counter::Bypass);
            let request = Request::from_parts(parts, body);
            let response = inner.ready().await?.call(request).await?;
            let (mut parts, body) = response.into_parts();
            settings.hide_fields(&mut parts.headers);
            let status = CacheStatus::bypass().with_detail(Detail::RequestBody);
            Stamp::new(&engine, &settings).status(&mut parts.headers, status);
            Ok(Response::from_parts(parts, CacheBody::passthrough(body)))
        }
    }
}
