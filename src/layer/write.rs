//! Invalidation by writes (RFC 9111 §4.4): an unsafe request goes to the origin, and
//! once it succeeds (2xx, 3xx), what is stored for its URI, and for the
//! same-authority URIs its response names in `Location` and `Content-Location`, is
//! invalidated before the response goes back.

use std::future::Future;
use std::sync::Arc;

use http::header::{CONTENT_LOCATION, HOST, LOCATION};
use http::{HeaderMap, HeaderValue, Method, Request, Response};

use super::body::CacheBody;
use super::overrides::CacheOverrides;
use super::response::Stamp;
use super::status::{CacheStatus, Detail};
use crate::engine::Engine;
use crate::key::CacheKey;
use crate::policy::groups::{group_tags, CACHE_GROUP_INVALIDATION};
use crate::policy::settings::RouteSettings;

/// What an unsafe request may invalidate: its own URI, and the URIs its response
/// names in `Location` and `Content-Location` when they share its authority.
pub(crate) struct WriteTarget {
    key: CacheKey,
    /// Scheme and authority of an absolute-form request, to resolve path-only URIs.
    base: Option<(String, String)>,
    /// The request's authority (from the URI or `Host`), lower case.
    authority: String,
    headers: HeaderMap,
    settings: Arc<RouteSettings>,
}

impl WriteTarget {
    pub(crate) fn of<B>(request: &Request<B>, settings: &Arc<RouteSettings>) -> Self {
        let uri = request.uri();
        let authority = match uri.authority() {
            Some(authority) => authority.as_str(),
            None => request
                .headers()
                .get(HOST)
                .and_then(|host| host.to_str().ok())
                .unwrap_or_default(),
        };
        WriteTarget {
            key: CacheKey::primary(&Method::GET, uri, request.headers(), settings),
            base: uri.authority().map(|authority| {
                let scheme = uri.scheme_str().unwrap_or("http").to_owned();
                (scheme, authority.as_str().to_owned())
            }),
            authority: authority.to_ascii_lowercase(),
            headers: request.headers().clone(),
            settings: Arc::clone(settings),
        }
    }

    /// The key of a URI reference from `Location` or `Content-Location`: an absolute
    /// URI with the request's authority, or an absolute path. Anything else (another
    /// host, a relative path, junk) invalidates nothing.
    fn key_for(&self, value: &HeaderValue) -> Option<CacheKey> {
        let text = value.to_str().ok()?;
        let uri: http::Uri = text.parse().ok()?;
        let uri = match uri.authority() {
            Some(authority) => {
                if !authority.as_str().eq_ignore_ascii_case(&self.authority) {
                    return None;
                }
                uri
            }
            None if text.starts_with('/') && !text.starts_with("//") => match &self.base {
                Some((scheme, authority)) => {
                    format!("{scheme}://{authority}{text}").parse().ok()?
                }
                None => uri,
            },
            None => return None,
        };
        Some(CacheKey::primary(
            &Method::GET,
            &uri,
            &self.headers,
            &self.settings,
        ))
    }

    /// The keys a successful response to this request invalidates, each once.
    fn keys(self, response: &HeaderMap) -> Vec<CacheKey> {
        let mut keys = vec![self.key];
        for name in [LOCATION, CONTENT_LOCATION] {
            if let Some(key) = response.get(name).and_then(|v| self.key_for(v)) {
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        keys
    }
}

/// Forwards an unsafe request; after a success (2xx or 3xx), invalidates its targets
/// and the tags its handler named, all at once, before the response goes back, so the
/// client's next read misses. Its `Cache-Status` says `detail=invalidation-queued`
/// when Redis could not take one of them yet (other replicas may serve what it
/// invalidated until the replay lands).
pub(crate) async fn invalidate_after<F, B, E>(
    future: F,
    engine: Arc<Engine>,
    target: WriteTarget,
) -> Result<Response<CacheBody<B>>, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    let response = future.await?;
    let (mut parts, body) = response.into_parts();
    target.settings.hide_fields(&mut parts.headers);
    // The handler's overrides are for the cache, not the client.
    let overrides = parts.extensions.remove::<CacheOverrides>();
    let settings = Arc::clone(&target.settings);
    let mut status = CacheStatus::bypass();
    if parts.status.is_success() || parts.status.is_redirection() {
        let mut tags = overrides.map(|o| o.invalidate_tags).unwrap_or_default();
        // Cache-Group-Invalidation (RFC 9875): the groups of this origin.
        let scope = target.settings.group_scope(&target.authority);
        tags.extend(group_tags(&parts.headers, &CACHE_GROUP_INVALIDATION, scope));
        let reached = engine
            .invalidate_all_of(&target.keys(&parts.headers), &tags)
            .await;
        if !reached {
            status = status.with_detail(Detail::InvalidationQueued);
        }
    }
    Stamp::new(&engine, &settings).status(&mut parts.headers, status);
    Ok(Response::from_parts(parts, body).map(CacheBody::passthrough))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str, host: Option<&str>) -> WriteTarget {
        let mut request = Request::post(uri);
        if let Some(host) = host {
            request = request.header("host", host);
        }
        WriteTarget::of(
            &request.body(()).unwrap(),
            &Arc::new(RouteSettings::default()),
        )
    }

    fn key(uri: &str) -> CacheKey {
        let uri: http::Uri = uri.parse().unwrap();
        CacheKey::primary(
            &Method::GET,
            &uri,
            &HeaderMap::new(),
            &RouteSettings::default(),
        )
    }

    fn response(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_write_invalidates_its_uri_and_same_authority_locations() {
        let write = target("http://api.test/jobs", None);
        let keys = write.keys(&response(&[
            ("location", "/jobs/42"),
            ("content-location", "http://API.test/jobs/42?v=1"),
        ]));
        assert_eq!(
            keys,
            [
                key("http://api.test/jobs"),
                key("http://api.test/jobs/42"),
                key("http://api.test/jobs/42?v=1")
            ]
        );
    }

    #[test]
    fn other_hosts_relative_paths_and_junk_invalidate_nothing_more() {
        for location in [
            "http://elsewhere.test/jobs/1",
            "jobs/1",
            "//elsewhere.test/x",
            "::junk",
        ] {
            let write = target("http://api.test/jobs", None);
            let keys = write.keys(&response(&[("location", location)]));
            assert_eq!(keys, [key("http://api.test/jobs")], "{location}");
        }
        // An origin-form request takes its authority from `Host`.
        let write = target("/jobs", Some("api.test"));
        let keys = write.keys(&response(&[("location", "http://api.test/jobs/7")]));
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1], key("http://api.test/jobs/7"));
    }
}
