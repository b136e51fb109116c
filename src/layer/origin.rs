//! Asking the origin: the request goes to the inner service (with the stale entry's
//! validators when it has any); a 304 refreshes the stale entry, an error may be
//! answered by it (`stale-if-error`), and a storable response is teed into the store
//! as it streams to the client.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use tower::Service;

use super::body::{CacheBody, Capture};
use super::overrides::CacheOverrides;
use super::response::{self, Served};
use super::serve::Serving;
use super::status::{CacheStatus, Detail, Forward};
use super::tags::response_tags;
use crate::engine::{Fill, FillStart, FlightGuard};
use crate::entry::{CachedResponse, Tags};
use crate::key::normalised_value;
use crate::policy::groups::{group_tags, CACHE_GROUPS};
use crate::policy::presence::has_field;
use crate::policy::range::Part;
use crate::policy::revalidation::{add_validators, headers_after_304};
use crate::policy::settings::{RouteSettings, TtlMode};
use crate::policy::stale::{is_origin_error, with_windows};
use crate::policy::storable::{store_plan, NotStored, RequestFacts, StorePlan};
use crate::policy::stored_fields::storable_headers;
use crate::telemetry::{Counter, TARGET};

/// How a forwarded request is answered: as a HEAD or not, in which version.
type ServedAs = (bool, Version);

/// Sends the request to the origin and, when the response may be stored, tees its
/// body into the store. With a stale entry: asks with its validators (when the client
/// set none) and takes a 304 as a refresh of it; serves it when the origin fails
/// within its `stale-if-error` window. `guard` is the fill's single-flight guard,
/// released once the fill is stored or known not to be.
#[allow(clippy::manual_async_fn)] // an `async fn` would keep its arguments twice (below)
pub(crate) fn forward<'a, S, ReqBody, ResBody>(
    mut inner: S,
    serving: &'a Serving<'a>,
    mut request: Request<ReqBody>,
    miss: Forward,
    guard: Option<FlightGuard>,
    stale: Option<Arc<CachedResponse>>,
) -> impl Future<Output = Result<Response<CacheBody<ResBody>>, S::Error>> + 'a
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + 'a,
    ReqBody: 'a,
    ResBody: Body + 'a,
{
    // Not an `async fn`, which keeps its arguments twice in its future (the request
    // among them): the block uses what it captured in place.
    async move {
        let engine = serving.engine;
        // A HEAD's response has no body to store; a QUERY's is stored like a GET's.
        let storing = request.method() == Method::GET || request.method().as_str() == "QUERY";
        let start = engine.fill_start();
        let facts = RequestFacts {
            has_authorization: has_field(request.headers(), &AUTHORIZATION),
            no_store: serving.request_cc.no_store,
            request_time: Some(start.at()),
        };
        // The request's values of the response's `Vary` names are known only once the
        // response is in; keep the fields for that, on the miss path only.
        let request_headers = storing.then(|| RequestFields::of(request.headers()));
        // The origin its cache groups belong to, if it names any (a cheap clone).
        let uri_authority = request.uri().authority().cloned();
        let revalidating = match &stale {
            Some(entry) if storing => add_validators(request.headers_mut(), &entry.headers),
            _ => false,
        };
        let served_as = (request.method() == Method::HEAD, request.version());
        // Counted as a miss once the origin answered, unless a stale entry is served in
        // its place: that is a hit (as its `Cache-Status` says), not both.
        let response = match inner.call(request).await {
            Ok(response) => response,
            Err(error) => {
                let failed = CacheStatus::with_origin_error;
                return match stale_on_error(serving, stale.as_deref(), served_as, failed) {
                    Some(response) => Ok(response),
                    None => {
                        engine.count(Counter::Miss);
                        Err(error)
                    }
                };
            }
        };
        let response_time = SystemTime::now();
        let origin_status = response.status();
        if is_origin_error(origin_status) {
            let failed = |status: CacheStatus| status.with_origin_status(origin_status);
            if let Some(response) = stale_on_error(serving, stale.as_deref(), served_as, failed) {
                return Ok(response);
            }
        }
        engine.count(Counter::Miss);
        if revalidating && origin_status == StatusCode::NOT_MODIFIED {
            if let Some(entry) = stale.as_deref() {
                let not_modified = response.headers();
                let when = (facts, response_time, start);
                return Ok(revalidated(
                    serving,
                    entry,
                    not_modified,
                    when,
                    served_as,
                    guard,
                ));
            }
        }
        let (mut parts, body) = response.into_parts();
        // The handler's overrides and the tag header are for the cache, not the client.
        let overrides = parts.extensions.remove::<CacheOverrides>();
        let handler_tags = overrides.as_ref().map_or(&[][..], |o| o.tags.as_slice());
        let groups = if has_field(&parts.headers, &CACHE_GROUPS) {
            let request_authority = match (&uri_authority, &request_headers) {
                (Some(authority), _) => authority.as_str().to_ascii_lowercase(),
                (None, Some(fields)) => fields
                    .first(&HOST)
                    .and_then(|host| host.to_str().ok())
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
                (None, None) => String::new(),
            };
            let scope = serving.settings.group_scope(&request_authority);
            group_tags(&parts.headers, &CACHE_GROUPS, scope)
        } else {
            Vec::new()
        };
        let tags = response_tags(&mut parts.headers, serving.settings, handler_tags, &groups);
        let status = CacheStatus::forward(miss).with_origin_status(parts.status);
        // A HEAD's response has no body to store: no plan.
        let planned = request_headers.map(|request_headers| {
            let when = (facts, response_time);
            let size = body.size_hint().lower();
            let plan = plan_for(when, &parts, serving.settings, overrides.as_ref(), size);
            (plan, request_headers)
        });
        // The targeted fields were read by the plan; they are for this cache alone.
        serving.settings.hide_targeted_fields(&mut parts.headers);
        let (status, body) = match planned {
            None => (status, CacheBody::passthrough(body)),
            Some((Err(reason), _)) => {
                engine.count(Counter::NotStored);
                tracing::debug!(target: TARGET, key = %serving.primary, outcome = "not-stored", detail = reason.as_str());
                let status = status.with_detail(Detail::NotStored(reason));
                (status, CacheBody::passthrough(body))
            }
            Some((Ok(plan), request_headers)) => {
                let entry = stored_entry(&parts, &plan, &request_headers, tags);
                let fill = Fill {
                    key: *serving.primary,
                    entry,
                    start,
                    guard,
                    detail: None,
                };
                let max_bytes = serving.settings.max_body_bytes;
                let capture = Capture::new(Arc::clone(engine), fill, max_bytes);
                let body = if body.is_end_stream() {
                    // Nothing to read (a 204, an empty body): a server may never poll it,
                    // so store now.
                    capture.finish();
                    CacheBody::passthrough(body)
                } else {
                    CacheBody::capturing(body, capture)
                };
                (status.stored(), body)
            }
        };
        serving.stamp().status(&mut parts.headers, status);
        Ok(Response::from_parts(parts, body))
    }
}

/// How to store a response, or why not: the route's rules with the handler's TTL and
/// stale windows where it set them, and the body's announced size against the limit.
fn plan_for(
    (facts, response_time): (RequestFacts, SystemTime),
    parts: &http::response::Parts,
    route: &RouteSettings,
    overrides: Option<&CacheOverrides>,
    body_at_least: u64,
) -> Result<StorePlan, NotStored> {
    let settings = with_handler_ttl(route, overrides);
    let plan = store_plan(
        facts,
        parts.status,
        &parts.headers,
        &settings,
        response_time,
    )?;
    let plan = match overrides {
        Some(o) => with_windows(plan, o.stale_while_revalidate, o.stale_if_error),
        None => plan,
    };
    if body_at_least > route.max_body_bytes as u64 {
        return Err(NotStored::TooLarge);
    }
    Ok(plan)
}

/// The route's settings, with the handler's TTL (when it set one) in place of every
/// other freshness.
fn with_handler_ttl<'a>(
    settings: &'a RouteSettings,
    overrides: Option<&CacheOverrides>,
) -> Cow<'a, RouteSettings> {
    match overrides.and_then(|o| o.ttl) {
        Some(ttl) => Cow::Owned(RouteSettings {
            ttl: Some(ttl),
            ttl_mode: TtlMode::Override,
            ..settings.clone()
        }),
        None => Cow::Borrowed(settings),
    }
}

/// The entry a storable response becomes, with an empty body (the captured body is
/// put in at the end): its storable fields, times, the request's `Vary`'d values and
/// its tags.
fn stored_entry(
    parts: &http::response::Parts,
    plan: &StorePlan,
    request_fields: &RequestFields,
    tags: Tags,
) -> CachedResponse {
    let request_headers = &request_fields.only(&plan.vary);
    let vary = plan
        .vary
        .iter()
        .map(|name| {
            let value = request_headers
                .contains_key(name)
                .then(|| Bytes::from(normalised_value(request_headers, name)));
            (name.clone(), value)
        })
        .collect();
    CachedResponse::builder(parts.status, storable_headers(&parts.headers), Bytes::new())
        .version(parts.version)
        .times(plan)
        .vary(vary)
        .with_tags(tags)
        .build()
}

/// A request's fields, kept past the origin call for the response's `Vary`: clones
/// in one list, where a clone of the map took a second allocation for its index (a
/// storing miss about 150 instructions more).
struct RequestFields(Vec<(HeaderName, HeaderValue)>);

impl RequestFields {
    fn of(headers: &HeaderMap) -> Self {
        RequestFields(
            headers
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        )
    }

    /// The first value of `name`.
    fn first(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.0
            .iter()
            .find_map(|(field, value)| (field == name).then_some(value))
    }

    /// The fields of `names` as a map, each name's values in the request's order; an
    /// empty map, which allocates nothing, when there are no names.
    fn only(&self, names: &[HeaderName]) -> HeaderMap {
        let mut map = HeaderMap::new();
        if names.is_empty() {
            return map;
        }
        for (name, value) in &self.0 {
            if names.contains(name) {
                // No more fields than the request's own map held: never refused.
                let _ = map.try_append(name.clone(), value.clone());
            }
        }
        map
    }
}

/// The stale entry, when the origin failed (`failed` says how) within its
/// `stale-if-error` window.
fn stale_on_error<B>(
    serving: &Serving<'_>,
    stale: Option<&CachedResponse>,
    served_as: ServedAs,
    failed: impl FnOnce(CacheStatus) -> CacheStatus,
) -> Option<Response<CacheBody<B>>> {
    let now = SystemTime::now();
    let entry = stale
        .filter(|entry| entry.may_serve_on_error(now) && serving.request_allows(entry, now))?;
    serving.engine.count(Counter::Hit);
    tracing::debug!(target: TARGET, key = %serving.primary, outcome = "hit", detail = "stale-if-error");
    Some(response::stale(
        entry,
        served_as,
        now,
        serving.stamp(),
        |status| {
            failed(
                status
                    .forwarded(Forward::Stale)
                    .with_detail(Detail::StaleIfError),
            )
        },
    ))
}

/// The origin said the stale entry is still good (304): store it refreshed and serve
/// it whole (the client's request had no conditions of its own), with the 304's
/// `Set-Cookie` for this client alone (never stored). One that may no longer be
/// stored is served refreshed, not stored.
fn revalidated<B>(
    serving: &Serving<'_>,
    stale: &CachedResponse,
    not_modified: &HeaderMap,
    (facts, response_time, start): (RequestFacts, SystemTime, FillStart),
    (head, version): ServedAs,
    guard: Option<FlightGuard>,
) -> Response<CacheBody<B>> {
    let served = Served {
        head,
        not_modified: false,
        version,
        part: Part::Whole,
    };
    let status = CacheStatus::forward(Forward::Stale).with_origin_status(StatusCode::NOT_MODIFIED);
    let mut headers = headers_after_304(&stale.headers, not_modified);
    // A cookie is for the client that asked; the stored response is everyone's.
    headers.remove(SET_COOKIE);
    let with_cookies = |mut response: Response<CacheBody<B>>| {
        for cookie in not_modified.get_all(SET_COOKIE) {
            let _ = response
                .headers_mut()
                .try_append(SET_COOKIE, cookie.clone());
        }
        response
    };
    let plan = store_plan(
        facts,
        stale.status,
        &headers,
        serving.settings,
        response_time,
    );
    serving.settings.hide_targeted_fields(&mut headers);
    let refreshed = CachedResponse::builder(stale.status, headers, stale.body.clone())
        .version(stale.version)
        .vary(stale.vary.clone())
        .with_tags(stale.tags.clone());
    let Ok(plan) = plan else {
        let entry = refreshed.build();
        let status = status.with_detail(Detail::NotStoredAfter304);
        let response =
            response::from_stored(&entry, status, served, response_time, serving.stamp());
        return with_cookies(response);
    };
    let entry = refreshed.times(&plan).build();
    let response = with_cookies(response::from_stored(
        &entry,
        status.stored(),
        served,
        response_time,
        serving.stamp(),
    ));
    serving.engine.commit(Fill {
        key: *serving.primary,
        entry,
        start,
        guard,
        detail: Some("revalidated"),
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{ACCEPT_LANGUAGE, USER_AGENT};

    #[test]
    fn kept_fields_give_the_vary_values_the_request_map_gave() {
        let mut headers = HeaderMap::new();
        headers.append(ACCEPT_LANGUAGE, HeaderValue::from_static("de"));
        headers.append(HOST, HeaderValue::from_static("jobs.example"));
        headers.append(ACCEPT_LANGUAGE, HeaderValue::from_static("en;q=0.5"));
        headers.append(USER_AGENT, HeaderValue::from_static("probe"));
        let fields = RequestFields::of(&headers);
        assert_eq!(fields.first(&HOST).unwrap(), "jobs.example");
        assert!(fields.first(&AUTHORIZATION).is_none());
        let vary = [ACCEPT_LANGUAGE, AUTHORIZATION];
        let only = fields.only(&vary);
        assert_eq!(only.len(), 2, "the two lines of the one name, nothing else");
        for name in &vary {
            assert_eq!(only.contains_key(name), headers.contains_key(name));
            assert_eq!(
                normalised_value(&only, name),
                normalised_value(&headers, name)
            );
        }
        assert!(fields.only(&[]).is_empty());
    }
}
