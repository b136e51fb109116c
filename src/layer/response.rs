//! Responses the cache makes: a stored response served (whole, as a 304, for a
//! HEAD, or a byte range of it), a stale one served with how long it has been stale, the 504 of
//! `only-if-cached`, and the route's stamp (`Cache-Status`, `Age`) on each.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{AGE, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Version};

use super::body::CacheBody;
use super::status::{CacheStatus, Detail, Forward, CACHE_STATUS};
use crate::engine::Engine;
use crate::entry::{decimal_value, CachedResponse, HIT_FIELDS};
use crate::policy::range::Part;
use crate::policy::settings::RouteSettings;

/// What a route puts on the responses its cache handles: `Cache-Status` (when on,
/// after the cache's name) and, on hits, `Age` (when on).
#[derive(Clone, Copy)]
pub(crate) struct Stamp<'a> {
    name: &'a str,
    cache_status: bool,
    age: bool,
}

impl<'a> Stamp<'a> {
    pub(crate) fn new(engine: &'a Engine, settings: &RouteSettings) -> Self {
        Stamp {
            name: engine.cache_status_name(),
            cache_status: settings.cache_status_header,
            age: settings.age_header,
        }
    }

    /// Adds `status` to `headers`, when the route says so.
    pub(crate) fn status(&self, headers: &mut HeaderMap, status: CacheStatus) {
        status.trace();
        if self.cache_status {
            if let Some(value) = status.render(self.name) {
                // Fallible: the map may hold what an origin or a stored value put in.
                let _ = headers.try_append(CACHE_STATUS, value);
            }
        }
    }

    /// `status` rendered for later, when the route says so.
    pub(crate) fn value(&self, status: CacheStatus) -> Option<HeaderValue> {
        status.trace();
        self.cache_status
            .then(|| status.render(self.name))
            .flatten()
    }
}

/// How a stored response answers a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served {
    /// A HEAD request: no body.
    pub(crate) head: bool,
    /// The request's conditions matched: 304 Not Modified.
    pub(crate) not_modified: bool,
    pub(crate) version: Version,
    /// The part of the body the request's `Range` selects.
    pub(crate) part: Part,
}

/// The fields a 304 carries from the stored response (RFC 9110 §15.4.5).
const NOT_MODIFIED_FIELDS: [HeaderName; 6] = [
    http::header::CACHE_CONTROL,
    http::header::CONTENT_LOCATION,
    http::header::DATE,
    http::header::ETAG,
    http::header::EXPIRES,
    http::header::VARY,
];

/// A stored response served as `served` says, with `Age` at `now` and `status`.
pub(crate) fn from_stored<B>(
    entry: &CachedResponse,
    status: CacheStatus,
    served: Served,
    now: SystemTime,
    stamp: Stamp<'_>,
) -> Response<CacheBody<B>> {
    if let Part::Bytes { .. } | Part::Unsatisfiable = served.part {
        if let Some(response) = partial(entry, served) {
            let mut response = response;
            stamp_hit(&mut response, entry, status, now, stamp);
            return response;
        }
    }
    let body = if served.head || served.not_modified {
        CacheBody::empty()
    } else {
        CacheBody::full(entry.body.clone())
    };
    let mut response = Response::new(body);
    *response.version_mut() = served.version;
    if served.not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        let headers = response.headers_mut();
        for name in NOT_MODIFIED_FIELDS {
            for value in entry.headers.get_all(&name) {
                let _ = headers.try_append(name.clone(), value.clone());
            }
        }
    } else {
        *response.status_mut() = entry.status;
        *response.headers_mut() = hit_headers(&entry.headers);
    }
    stamp_hit(&mut response, entry, status, now, stamp);
    response
}

/// Most fields a stored map has for a hit to copy it by appends rather than clone
/// it (BENCHMARKS, "A hit's header map", under HTTP load).
const APPENDED_FIELDS: usize = 8;

/// A copy of `stored` with room for the fields a hit adds. A clone has none: its
/// list of fields is exactly full, and `Age` moves them all to a larger one. Appends
/// hash every name again (about 150 instructions a field more than a clone), yet a
/// hit of a two-field entry over HTTP served 3-5 % more requests a second with them;
/// past a few fields the hashing costs more than the move saves.
fn hit_headers(stored: &HeaderMap) -> HeaderMap {
    if stored.len() > APPENDED_FIELDS {
        return stored.clone();
    }
    let Ok(mut headers) = HeaderMap::try_with_capacity(stored.len() + HIT_FIELDS) else {
        return stored.clone();
    };
    for (name, value) in stored {
        // Fails only past http's limit of 32 768 fields, far above this map's.
        let _ = headers.try_append(name.clone(), value.clone());
    }
    headers
}

/// `Age` and `Cache-Status` on a response from the cache.
fn stamp_hit<B>(
    response: &mut Response<B>,
    entry: &CachedResponse,
    status: CacheStatus,
    now: SystemTime,
    stamp: Stamp<'_>,
) {
    let headers = response.headers_mut();
    if stamp.age {
        let _ = headers.try_insert(AGE, decimal_value(entry.age(now).as_secs()));
    }
    stamp.status(headers, status);
}

/// A 206 of the stored body's bytes the request's range selects, or a 416 when it
/// selects none (RFC 9110 §14.4, §15.5.17); `None` if the part is not in the body.
fn partial<B>(entry: &CachedResponse, served: Served) -> Option<Response<CacheBody<B>>> {
    let len = entry.body.len();
    let (status, body, content_range) = match served.part {
        Part::Bytes { first, last } => {
            let first = usize::try_from(first).ok()?;
            let end = usize::try_from(last).ok()?.checked_add(1)?;
            if first >= end || end > len {
                return None;
            }
            let range = format!("bytes {first}-{}/{len}", end - 1);
            (
                StatusCode::PARTIAL_CONTENT,
                entry.body.slice(first..end),
                range,
            )
        }
        Part::Unsatisfiable => (
            StatusCode::RANGE_NOT_SATISFIABLE,
            Bytes::new(),
            format!("bytes */{len}"),
        ),
        Part::Whole => return None,
    };
    let mut headers = entry.headers.clone();
    if status == StatusCode::RANGE_NOT_SATISFIABLE {
        headers.remove(CONTENT_TYPE);
    }
    headers.insert(CONTENT_LENGTH, decimal_value(body.len() as u64));
    headers.insert(CONTENT_RANGE, HeaderValue::from_str(&content_range).ok()?);
    let mut response = Response::new(CacheBody::full(body));
    *response.status_mut() = status;
    *response.version_mut() = served.version;
    *response.headers_mut() = headers;
    Some(response)
}

/// A stale entry served whole (within its `stale-while-revalidate` or
/// `stale-if-error` window); `Cache-Status` says how long it has been stale, and
/// `why` (its detail, and what the origin said).
pub(crate) fn stale<B>(
    entry: &CachedResponse,
    (head, version): (bool, Version),
    now: SystemTime,
    stamp: Stamp<'_>,
    why: impl FnOnce(CacheStatus) -> CacheStatus,
) -> Response<CacheBody<B>> {
    let served = Served {
        head,
        not_modified: false,
        version,
        part: Part::Whole,
    };
    let stale_for = now.duration_since(entry.fresh_until).unwrap_or_default();
    metrics::histogram!(crate::telemetry::STALE_SERVED).record(stale_for.as_secs_f64());
    let status = why(CacheStatus::stale_hit(stale_for.as_secs()));
    from_stored(entry, status, served, now, stamp)
}

/// `504` for `only-if-cached` when nothing usable is stored (RFC 9111 §5.2.1.7).
pub(crate) fn only_if_cached_miss<B>(miss: Forward, stamp: Stamp<'_>) -> Response<CacheBody<B>> {
    let mut response = Response::new(CacheBody::empty());
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    let status = CacheStatus::forward(miss).with_detail(Detail::OnlyIfCached);
    stamp.status(response.headers_mut(), status);
    response
}

#[cfg(test)]
mod tests {
    use http::header::{CACHE_CONTROL, CONTENT_TYPE, LINK};
    use http::{HeaderMap, HeaderName, HeaderValue};

    use super::{hit_headers, APPENDED_FIELDS};

    /// The fields of `map` in the order they go on the wire.
    fn lines(map: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
        map.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
    }

    #[test]
    fn a_hit_copies_every_field_in_order_by_appends_or_by_a_clone() {
        let mut small = HeaderMap::new();
        small.append(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        small.append(LINK, HeaderValue::from_static("</a>; rel=preload"));
        small.append(CACHE_CONTROL, HeaderValue::from_static("max-age=60"));
        small.append(LINK, HeaderValue::from_static("</b>; rel=preload"));
        let mut large = small.clone();
        for i in 0..APPENDED_FIELDS {
            large.append(
                HeaderName::try_from(format!("x-field-{i}")).unwrap(),
                HeaderValue::from(i),
            );
        }
        for stored in [HeaderMap::new(), small, large] {
            let copy = hit_headers(&stored);
            assert_eq!(lines(&copy), lines(&stored));
        }
    }
}
