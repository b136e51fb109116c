//! Filling a miss: a cacheable request the cache could not answer at once is looked
//! up (if it was not yet), then goes to the origin as the leader of its key's
//! single-flight (taking the cross-replica lease, or waiting for the replica that
//! holds it), or waits for the leader and looks again. A stale entry within its
//! `stale-while-revalidate` window is refreshed in a task the layer owns.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH};
use http::{Method, Request, Response};
use http_body::Body;
use tower::util::rng::{HasherRng, Rng};
use tower::Service;

use super::body::CacheBody;
use super::origin::forward;
use super::response;
use super::serve::{Answer, RequestHead, Serving};
use super::status::Forward;
use crate::engine::{Engine, Flight, FlightGuard};
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::policy::cache_control::CacheControl;
use crate::policy::settings::RouteSettings;
use crate::store::redis_tier::Lease;
use crate::telemetry::{Counter, TARGET};

/// What the service already worked out about a cacheable request it could not answer
/// at once.
pub(crate) struct Prepared {
    pub(crate) primary: CacheKey,
    pub(crate) request_cc: CacheControl,
    /// Why the cache cannot answer (and the stale entry, if one is stored), when the
    /// lookup has run; `None` when it would have had to wait and must run here.
    pub(crate) known: Option<(Forward, Option<Arc<CachedResponse>>)>,
}

/// Answers a cacheable request the service could not answer at once: from the cache
/// if the lookup (run here when it had to wait) finds it, else from the origin,
/// through single-flight.
pub(crate) async fn serve_or_fill<S, ReqBody, ResBody>(
    inner: S,
    engine: Arc<Engine>,
    settings: Arc<RouteSettings>,
    request: Request<ReqBody>,
    prepared: Prepared,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    let Prepared {
        primary,
        request_cc,
        known,
    } = prepared;
    let serving = Serving::new(&engine, &settings, &primary, &request_cc);
    let (miss, stale) = match known {
        Some(known) => known,
        None => match serving.serve(&RequestHead::of(&request)).await {
            Answer::Hit(response) => return Ok(response),
            Answer::Refresh(response, stale) => {
                let key = (primary, request_cc.clone());
                spawn_refresh(
                    inner,
                    Arc::clone(&engine),
                    Arc::clone(&settings),
                    key,
                    request,
                    stale,
                );
                return Ok(response);
            }
            Answer::Miss(miss, stale) => (miss, stale),
        },
    };
    if serving.honour && request_cc.only_if_cached {
        return Ok(response::only_if_cached_miss(miss, serving.stamp()));
    }
    if request.method() == Method::HEAD || serving.must_forward() {
        // A HEAD response has no body to store; a forced forward does not wait for
        // others' fetches.
        return Box::pin(forward(inner, &serving, request, miss, None, stale)).await;
    }
    let guard = match engine.join_flight(primary) {
        Flight::Leader(guard) => match lead(&serving, guard, &RequestHead::of(&request)).await {
            Led::Fetch(guard) => Some(guard),
            Led::Served(response) => return Ok(response),
        },
        Flight::Follower(follower) => {
            engine.count(Counter::Coalesced);
            let released = follower.wait(engine.single_flight_timeout()).await;
            if let Answer::Hit(response) | Answer::Refresh(response, _) =
                serving.serve(&RequestHead::of(&request)).await
            {
                return Ok(response);
            }
            tracing::debug!(target: TARGET, key = %primary, outcome = "collapsed-miss", released);
            None
        }
    };
    // Boxed so that the future of a request that waited on a lookup stays small.
    Box::pin(forward(inner, &serving, request, miss, guard, stale)).await
}

/// What the leader of a key's flight does.
#[allow(clippy::large_enum_variant)]
enum Led<B> {
    /// Fetches from the origin, holding the flight (and the lease, when it took one).
    Fetch(FlightGuard),
    /// Another replica's fill landed while it waited: served from it.
    Served(Response<CacheBody<B>>),
}

/// With the cross-replica lease on, the leader takes it, or waits for the replica
/// that holds it; without, it fetches.
async fn lead<ResBody>(
    serving: &Serving<'_>,
    mut guard: FlightGuard,
    request: &RequestHead<'_>,
) -> Led<ResBody> {
    let engine = serving.engine;
    let primary = *serving.primary;
    let Some(ttl) = engine.fill_lease() else {
        return Led::Fetch(guard);
    };
    match engine.try_lease(&primary, ttl).await {
        Lease::Taken(token) => engine.hold_lease(&mut guard, primary, token),
        Lease::Held => {
            // Another replica is fetching: wait for its entry in Redis.
            let limit = ttl.min(engine.single_flight_timeout());
            match wait_for_replica(serving, request, limit).await {
                Waited::Served(response) => {
                    engine.count(Counter::Coalesced);
                    return Led::Served(response);
                }
                Waited::Leased(token) => engine.hold_lease(&mut guard, primary, token),
                Waited::GaveUp => {
                    tracing::debug!(target: TARGET, key = %primary, outcome = "lease-wait-expired");
                }
            }
        }
        Lease::Unavailable => {}
    }
    Led::Fetch(guard)
}

/// How waiting for another replica's fill ended.
#[allow(clippy::large_enum_variant)]
enum Waited<B> {
    /// Its entry landed.
    Served(Response<CacheBody<B>>),
    /// It gave the lease back without an entry (not storable, failed): this replica
    /// took the lease and fetches.
    Leased(u64),
    /// Neither within the limit, or Redis stopped answering: fetch anyway.
    GaveUp,
}

/// Polls the cache (Redis first) every 10–30 ms, jittered so replicas do not poll in
/// step, until another replica's fill lands, its lease is free again, or `limit`
/// passes.
async fn wait_for_replica<ResBody>(
    serving: &Serving<'_>,
    request: &RequestHead<'_>,
    limit: Duration,
) -> Waited<ResBody> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut jitter = HasherRng::default();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10 + jitter.next_u64() % 20)).await;
        if let Answer::Hit(response) | Answer::Refresh(response, _) = serving.serve(request).await {
            return Waited::Served(response);
        }
        match serving.engine.try_lease(serving.primary, limit).await {
            Lease::Held => {}
            Lease::Taken(token) => return Waited::Leased(token),
            Lease::Unavailable => return Waited::GaveUp,
        }
    }
    Waited::GaveUp
}

/// Refreshes a stale entry in a task the layer owns (it outlives the client's
/// request): at most one per key at a time, and at most `MAX_REFRESHES` at once.
pub(crate) fn spawn_refresh<S, ReqBody, ResBody>(
    inner: S,
    engine: Arc<Engine>,
    settings: Arc<RouteSettings>,
    (primary, request_cc): (CacheKey, CacheControl),
    mut request: Request<ReqBody>,
    stale: Arc<CachedResponse>,
) where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Some(permit) = engine.refresh_permit() else {
        tracing::debug!(target: TARGET, key = %primary, outcome = "refresh-skipped", detail = "too-many");
        return;
    };
    let Flight::Leader(guard) = engine.join_flight(primary) else {
        return; // already being fetched
    };
    // The refresh stores a GET's response (a HEAD's has no body to store), and the
    // client's own conditions were answered from the stale entry: it asks with the
    // stored validators instead.
    *request.method_mut() = Method::GET;
    request.headers_mut().remove(IF_NONE_MATCH);
    request.headers_mut().remove(IF_MODIFIED_SINCE);
    runtime.spawn(async move {
        let _permit = permit;
        let serving = Serving::new(&engine, &settings, &primary, &request_cc);
        let refreshed = forward(
            inner,
            &serving,
            request,
            Forward::Stale,
            Some(guard),
            Some(stale),
        );
        if let Ok(response) = Box::pin(refreshed).await {
            // Reading the body to its end is what stores it.
            let mut body = std::pin::pin!(response.into_body());
            while let Some(Ok(_)) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {}
        }
        tracing::debug!(target: TARGET, key = %primary, outcome = "refreshed");
    });
}
