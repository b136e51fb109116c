//! Filling a miss: a cacheable request the cache could not answer at once is looked
//! up (if it was not yet), then goes to the origin as the leader of its key's
//! single-flight (taking the cross-replica lease, or waiting for the replica that
//! holds it), or waits for the leader and looks again. A stale entry within its
//! `stale-while-revalidate` window is refreshed in a task the layer owns.

use std::future::Future;
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
use super::serve::{Answer, FieldsSeen, RequestHead, Serving};
use super::status::Forward;
use crate::engine::{Engine, Flight, FlightGuard, Lease};
use crate::entry::CachedResponse;
use crate::key::CacheKey;
use crate::policy::cache_control::CacheControl;
use crate::policy::settings::RouteSettings;
use crate::telemetry::{Counter, TARGET};

/// What the service already worked out about a cacheable request it could not answer
/// at once.
pub(crate) struct Prepared {
    pub(crate) primary: CacheKey,
    pub(crate) request_cc: CacheControl,
    /// Why the cache cannot answer (and the stale entry, if one is stored), when the
    /// lookup has run; `None` when it would have had to wait and must run here.
    pub(crate) known: Option<(Forward, Option<Arc<CachedResponse>>)>,
    /// What the service's pass over its fields saw.
    pub(crate) seen: FieldsSeen,
}

/// Answers a cacheable request the service could not answer at once: from the cache
/// if the lookup (run here when it had to wait) finds it, else from the origin,
/// through single-flight.
#[allow(clippy::manual_async_fn)] // an `async fn` would keep its arguments twice (below)
pub(crate) fn serve_or_fill<S, ReqBody, ResBody>(
    inner: S,
    engine: Arc<Engine>,
    settings: Arc<RouteSettings>,
    request: Request<ReqBody>,
    prepared: Prepared,
) -> impl Future<Output = Result<Response<CacheBody<ResBody>>, S::Error>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    // Not an `async fn`: one keeps its arguments twice in its future (as arguments,
    // and as the body's locals), and a miss's future is moved into its box. The
    // block uses what it captured in place.
    async move {
        let Prepared {
            primary,
            ref request_cc,
            known,
            seen,
        } = prepared;
        let serving = Serving::new(&engine, &settings, &primary, request_cc);
        // The awaits that only some requests reach (a lookup that had to wait, the fill
        // lease, a follower's look again) are boxed: inline, each would make every
        // miss's future larger (about 3 KB), and a miss moves its future twice.
        let (miss, stale) = match known {
            Some(known) => known,
            None if serving.must_forward() => (
                Box::pin(serving.forward_reason(&RequestHead::new(&request, seen))).await,
                None,
            ),
            None => match Box::pin(serving.serve(&RequestHead::new(&request, seen))).await {
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
        // Honoured in either mode: it only asks for less than a miss would do.
        if request_cc.only_if_cached {
            return Ok(response::only_if_cached_miss(miss, serving.stamp()));
        }
        if request.method() == Method::HEAD || serving.must_forward() {
            // A HEAD response has no body to store; a forced forward does not wait for
            // others' fetches.
            return Box::pin(forward(inner, &serving, request, miss, None, stale)).await;
        }
        let guard = match engine.join_flight(primary) {
            Flight::Leader(guard) => match engine.fill_lease() {
                None => Some(guard),
                Some(ttl) => {
                    match Box::pin(lead(
                        &serving,
                        guard,
                        ttl,
                        &RequestHead::new(&request, seen),
                    ))
                    .await
                    {
                        Led::Fetch(guard) => Some(guard),
                        Led::Served(response) => return Ok(response),
                    }
                }
            },
            Flight::Follower(follower) => {
                engine.count(Counter::Coalesced);
                let released = Box::pin(follower.wait(engine.single_flight_timeout())).await;
                if let Answer::Hit(response) | Answer::Refresh(response, _) =
                    Box::pin(serving.serve(&RequestHead::new(&request, seen))).await
                {
                    return Ok(response);
                }
                tracing::debug!(target: TARGET, key = %primary, outcome = "collapsed-miss", released);
                None
            }
        };
        // Boxed for the same reason.
        Box::pin(forward(inner, &serving, request, miss, guard, stale)).await
    }
}

/// What the leader of a key's flight does.
#[allow(clippy::large_enum_variant)]
enum Led<B> {
    /// Fetches from the origin, holding the flight (and the lease, when it took one).
    Fetch(FlightGuard),
    /// Another replica's fill landed while it waited: served from it.
    Served(Response<CacheBody<B>>),
}

/// With the cross-replica lease on (`ttl`), the leader takes it, or waits for the
/// replica that holds it.
async fn lead<ResBody>(
    serving: &Serving<'_>,
    mut guard: FlightGuard,
    ttl: Duration,
    request: &RequestHead<'_>,
) -> Led<ResBody> {
    let engine = serving.engine;
    let primary = *serving.primary;
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

/// Polls the cache (Redis first) until another replica's fill lands or its lease is
/// free again; gives up after `limit`, which bounds the whole wait (a lookup or a
/// lease attempt on its way when it runs out is cut off).
async fn wait_for_replica<ResBody>(
    serving: &Serving<'_>,
    request: &RequestHead<'_>,
    limit: Duration,
) -> Waited<ResBody> {
    let polled = poll_within(limit, || async {
        if let Answer::Hit(response) | Answer::Refresh(response, _) = serving.serve(request).await {
            return Some(Waited::Served(response));
        }
        match serving.engine.try_lease(serving.primary, limit).await {
            Lease::Held => None,
            Lease::Taken(token) => Some(Waited::Leased(token)),
            Lease::Unavailable => Some(Waited::GaveUp),
        }
    });
    polled.await.unwrap_or(Waited::GaveUp)
}

/// Runs `round` after pauses of 2 ms doubling to 32 ms (each jittered by up to half,
/// so that replicas do not poll in step) until it answers; `None` once `limit` has
/// passed, wherever the round is. A fill that takes a few milliseconds is found a few
/// milliseconds after it lands; a slow one costs Redis a read every 32 ms or so.
async fn poll_within<T, F, Fut>(limit: Duration, mut round: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let mut jitter = HasherRng::default();
    let rounds = async {
        let mut pause_ms: u64 = 2;
        loop {
            let jittered = pause_ms + jitter.next_u64() % (pause_ms / 2 + 1);
            tokio::time::sleep(Duration::from_millis(jittered)).await;
            if let Some(answer) = round().await {
                return answer;
            }
            pause_ms = (pause_ms * 2).min(32);
        }
    };
    tokio::time::timeout(limit, rounds).await.ok()
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
    if request.method() == Method::HEAD {
        *request.method_mut() = Method::GET;
    }
    request.headers_mut().remove(IF_NONE_MATCH);
    request.headers_mut().remove(IF_MODIFIED_SINCE);
    runtime.spawn(async move {
        let _permit = permit;
        let mut guard = guard;
        // One refresh for the whole cluster: off the response path, the lease costs
        // no client anything, whether or not misses take it.
        let ttl = engine
            .fill_lease()
            .unwrap_or_else(|| engine.single_flight_timeout());
        match engine.try_lease(&primary, ttl).await {
            Lease::Taken(token) => engine.hold_lease(&mut guard, primary, token),
            Lease::Held => {
                tracing::debug!(target: TARGET, key = %primary, outcome = "refresh-skipped", detail = "another-replica");
                return;
            }
            Lease::Unavailable => {}
        }
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::StatusCode;
    use http_body_util::{BodyExt, Full};
    use tokio::sync::Semaphore;
    use tower::ServiceExt;

    use super::*;
    use crate::engine::tests::memory_engine;
    use crate::layer::HybridCacheLayer;

    /// What the layer hands the test origin.
    type OriginBody = crate::layer::RequestBody<Full<Bytes>>;

    /// A memory-only cache's layer around an origin that counts its calls (`calls`)
    /// and answers each once `gate` lets it (`permits` at first), with a response a
    /// shared cache may store for a minute.
    fn cached_origin(
        permits: usize,
    ) -> CachedOrigin<
        impl Service<
                Request<OriginBody>,
                Response = Response<Full<Bytes>>,
                Error = Infallible,
                Future = impl Send,
            > + Clone
            + Send
            + 'static,
    > {
        let engine = memory_engine();
        let (calls, gate) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(Semaphore::new(permits)),
        );
        let (counted, gated) = (Arc::clone(&calls), Arc::clone(&gate));
        let origin = tower::service_fn(
            move |_request: Request<crate::layer::RequestBody<Full<Bytes>>>| {
                let (calls, gate) = (Arc::clone(&counted), Arc::clone(&gated));
                async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    gate.acquire().await.map(|permit| permit.forget()).ok();
                    let mut response = Response::new(Full::new(Bytes::from(format!("call {n}"))));
                    response.headers_mut().insert(
                        "cache-control",
                        http::HeaderValue::from_static("max-age=60"),
                    );
                    Ok(response)
                }
            },
        );
        // The clients here are trusted: their `no-cache` reaches the origin.
        let layer = HybridCacheLayer::new(Arc::clone(&engine))
            .request_directives(crate::policy::RequestDirectives::Honour);
        let service = tower::Layer::layer(&layer, origin);
        CachedOrigin {
            engine,
            calls,
            gate,
            service,
        }
    }

    struct CachedOrigin<S> {
        engine: Arc<Engine>,
        calls: Arc<AtomicUsize>,
        gate: Arc<Semaphore>,
        service: crate::layer::HybridCacheService<S>,
    }

    /// Lets other tasks run until `done`; a panic, not a hang, when it never is.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::task::yield_now().await;
            }
        });
        waited.await.unwrap_or_else(|_| panic!("never: {what}"));
    }

    fn request(method: &str, headers: &[(&'static str, &'static str)]) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(method)
            .uri("http://api.test/fill");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Full::new(Bytes::new())).unwrap()
    }

    async fn text<B: Body<Data = Bytes>>(response: Response<CacheBody<B>>) -> (String, String)
    where
        B::Error: std::fmt::Debug,
    {
        let status = response
            .headers()
            .get("cache-status")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn only_if_cached_on_a_miss_is_a_504_without_the_origin() {
        let CachedOrigin { calls, service, .. } = cached_origin(10);
        let response = service
            .oneshot(request("GET", &[("cache-control", "only-if-cached")]))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let (status, _) = text(response).await;
        assert_eq!(status, "test; fwd=uri-miss; detail=only-if-cached");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_head_miss_goes_to_the_origin_and_stores_nothing() {
        let CachedOrigin { calls, service, .. } = cached_origin(10);
        let (status, _) = text(service.clone().oneshot(request("HEAD", &[])).await.unwrap()).await;
        assert_eq!(status, "test; fwd=uri-miss; fwd-status=200");
        let (status, _) = text(service.oneshot(request("GET", &[])).await.unwrap()).await;
        assert!(status.contains("fwd=uri-miss"), "{status}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn followers_wait_for_their_leader_and_are_served_its_fill() {
        let CachedOrigin {
            engine,
            calls,
            gate,
            service,
        } = cached_origin(0);
        let requests: Vec<_> = (0..5)
            .map(|_| tokio::spawn(service.clone().oneshot(request("GET", &[]))))
            .collect();
        until("four followers", || engine.stats().coalesced == 4).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "only the leader asks");
        gate.add_permits(1);
        let mut hits = 0;
        for request in requests {
            let (status, body) = text(request.await.unwrap().unwrap()).await;
            assert_eq!(body, "call 1");
            hits += usize::from(status.contains("; hit;"));
        }
        assert_eq!(hits, 4);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_forced_refetch_does_not_wait_for_anyone() {
        let CachedOrigin {
            engine,
            calls,
            gate,
            service,
        } = cached_origin(0);
        // A leader held at the origin.
        let leader = tokio::spawn(service.clone().oneshot(request("GET", &[])));
        until("the leader at the origin", || {
            calls.load(Ordering::SeqCst) == 1
        })
        .await;
        let reload = tokio::spawn(
            service
                .clone()
                .oneshot(request("GET", &[("cache-control", "no-cache")])),
        );
        until("the reload at the origin", || {
            calls.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(engine.stats().coalesced, 0);
        gate.add_permits(2);
        let (status, _) = text(reload.await.unwrap().unwrap()).await;
        // Nothing was stored yet.
        assert!(status.contains("fwd=uri-miss"), "{status}");
        leader.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_limit_even_in_the_middle_of_a_round() {
        let started = tokio::time::Instant::now();
        let rounds = std::sync::atomic::AtomicUsize::new(0);
        // Each round (a lookup and a lease attempt) takes 100 ms: the third is on its
        // way when the 250 ms run out.
        let answer: Option<()> = poll_within(Duration::from_millis(250), || async {
            rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        })
        .await;
        assert_eq!(answer, None);
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert!(rounds.into_inner() >= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_with_the_first_round_that_answers() {
        let started = tokio::time::Instant::now();
        let mut left = 3;
        let answer = poll_within(Duration::from_secs(60), || {
            left -= 1;
            let done = left == 0;
            async move { done.then_some("served") }
        })
        .await;
        assert_eq!(answer, Some("served"));
        assert!(
            started.elapsed() <= Duration::from_millis(21),
            "pauses of 2, 4 and 8 ms, each jittered by up to half"
        );
    }
}
