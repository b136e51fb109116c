//! Per-route settings of a [`HybridCacheLayer`](crate::HybridCacheLayer).

use std::time::Duration;

use http::HeaderName;

use super::presence::has_field;

/// The default largest `QUERY` content the layer reads to key it: 64 KiB.
pub(crate) const DEFAULT_MAX_QUERY_BYTES: usize = 64 << 10;

/// The default largest body the layer captures and stores: 1 MiB.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// How a route's TTL relates to the freshness the origin states.
///
/// Whatever the mode, what the origin forbids (`no-store`, `private`, `Set-Cookie`, …)
/// is never stored: the TTL only decides *how long* a storable response stays fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TtlMode {
    /// The origin's `s-maxage`, `max-age` or `Expires` wins; the route TTL applies
    /// only where the origin states none (the default).
    #[default]
    Fallback,
    /// The route TTL wins over anything the origin states.
    Override,
}

/// What the layer does with a client's `Cache-Control` request directives
/// `no-cache`, `max-age` and `min-fresh`.
///
/// In either mode `no-store` in a request is honoured (its response is never stored)
/// and `only-if-cached` answers `504` on a miss: neither asks the cache to do more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RequestDirectives {
    /// Follow RFC 9111: `no-cache` and `max-age=0` go to the origin (and the fresh
    /// response is stored for the next client), `max-age=N` and `min-fresh=N` refuse
    /// entries that are too old. For trusted clients only: anyone who can send these
    /// can send every request to the origin, and replace a fresh entry at will.
    Honour,
    /// Serve from the cache whatever the client asks, as Varnish, nginx and CDNs do
    /// by default: a reload in a browser, or a cache-busting load, cannot push load
    /// onto the origin or replace a fresh entry. The default.
    #[default]
    Ignore,
}

/// Which authority (host and port) a route's cache keys are made with.
///
/// # Examples
///
/// A balancer that rewrites `Host` per backend (`app-1:8080`, `app-2:8080`) would
/// give each replica keys of its own, and no entry would be shared:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_hybrid_cache::{HybridCache, KeyAuthority};
/// let cache = HybridCache::builder().build().await?;
/// let layer = cache.layer().key_authority(KeyAuthority::fixed("jobs.example.com"));
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyAuthority {
    /// The request's: its URI's authority, else its `Host` (lower-cased). The default.
    #[default]
    Request,
    /// This one, whatever the request says: one site behind a balancer that
    /// rewrites `Host`.
    Fixed(String),
    /// None: the cache serves one site, and the path and query are the key.
    None,
}

impl KeyAuthority {
    /// Keys on `authority` (lower-cased) whatever the request says.
    pub fn fixed(authority: impl Into<String>) -> Self {
        KeyAuthority::Fixed(authority.into().to_ascii_lowercase())
    }
}

/// Which query parameters take part in the cache key.
#[derive(Debug, Clone, Default)]
pub(crate) enum QueryFilter {
    /// Every parameter counts.
    #[default]
    All,
    /// Parameters whose names match are dropped from the key.
    Ignore(Vec<NamePattern>),
    /// Only parameters whose names match count.
    Keep(Vec<NamePattern>),
}

impl QueryFilter {
    /// Whether a parameter of this (percent-decoded) name takes part in the key.
    pub(crate) fn keeps(&self, name: &[u8]) -> bool {
        match self {
            QueryFilter::All => true,
            QueryFilter::Ignore(patterns) => !patterns.iter().any(|p| p.matches(name)),
            QueryFilter::Keep(patterns) => patterns.iter().any(|p| p.matches(name)),
        }
    }
}

/// A parameter name, or a prefix when written with a trailing `*` (`utm_*`).
#[derive(Debug, Clone)]
pub(crate) struct NamePattern {
    text: Box<[u8]>,
    prefix: bool,
}

impl NamePattern {
    pub(crate) fn new(pattern: &str) -> Self {
        match pattern.strip_suffix('*') {
            Some(prefix) => NamePattern {
                text: prefix.as_bytes().into(),
                prefix: true,
            },
            None => NamePattern {
                text: pattern.as_bytes().into(),
                prefix: false,
            },
        }
    }

    fn matches(&self, name: &[u8]) -> bool {
        if self.prefix {
            name.starts_with(&self.text)
        } else {
            *name == *self.text
        }
    }
}

/// Everything a route can set; shared behind an `Arc` by the layer's clones.
#[derive(Debug, Clone)]
pub(crate) struct RouteSettings {
    pub(crate) ttl: Option<Duration>,
    pub(crate) ttl_mode: TtlMode,
    pub(crate) query: QueryFilter,
    pub(crate) key_headers: Vec<HeaderName>,
    pub(crate) max_body_bytes: usize,
    pub(crate) cache_status_header: bool,
    pub(crate) age_header: bool,
    pub(crate) request_directives: RequestDirectives,
    pub(crate) stale_while_revalidate: Option<Duration>,
    pub(crate) stale_if_error: Option<Duration>,
    /// The response header that carries tags; `None`: tags only from the extension.
    pub(crate) tag_header: Option<HeaderName>,
    /// Whether the tag header reaches the client (and is stored).
    pub(crate) keep_tag_header: bool,
    /// The largest `QUERY` content read to key it (RFC 10008); larger ones, and
    /// every `QUERY` when 0, pass through.
    pub(crate) max_query_bytes: usize,
    /// The authority the route's keys are made with.
    pub(crate) key_authority: KeyAuthority,
    /// The targeted cache-control fields this route obeys, in order (RFC 9213).
    pub(crate) targeted_fields: Vec<HeaderName>,
    /// Whether the targeted fields reach the client (and are stored); `None`: all
    /// but this crate's own.
    pub(crate) forward_targeted_fields: Option<bool>,
}

impl RouteSettings {
    /// The tag header, when the client must not see it.
    pub(crate) fn hidden_tag_header(&self) -> Option<&HeaderName> {
        self.tag_header.as_ref().filter(|_| !self.keep_tag_header)
    }

    /// The origin a response's cache groups belong to (RFC 9875), as the route keys
    /// it: `request` (the request's authority, lower case) unless the key authority
    /// is fixed or none.
    pub(crate) fn group_scope<'a>(&'a self, request: &'a str) -> &'a str {
        match &self.key_authority {
            KeyAuthority::Request => request,
            KeyAuthority::Fixed(fixed) => fixed,
            KeyAuthority::None => "",
        }
    }

    /// Whether the route removes any field from what the client sees.
    pub(crate) fn hides_fields(&self) -> bool {
        self.hidden_tag_header().is_some()
            || self.targeted_fields.iter().any(|name| !self.forwards(name))
    }

    /// Whether the targeted field `name` reaches the client.
    fn forwards(&self, name: &HeaderName) -> bool {
        self.forward_targeted_fields
            .unwrap_or(name.as_str() != DEFAULT_TARGETED_FIELD)
    }

    /// Removes the fields meant for this cache alone: the tag header and the targeted
    /// fields the route does not forward.
    pub(crate) fn hide_fields(&self, headers: &mut http::HeaderMap) {
        if let Some(name) = self.hidden_tag_header() {
            if has_field(headers, name) {
                headers.remove(name);
            }
        }
        self.hide_targeted_fields(headers);
    }

    /// Removes the targeted fields the route does not forward.
    pub(crate) fn hide_targeted_fields(&self, headers: &mut http::HeaderMap) {
        for name in &self.targeted_fields {
            if !self.forwards(name) && has_field(headers, name) {
                headers.remove(name);
            }
        }
    }
}

/// The targeted cache-control field a route obeys by default: its own, so that an
/// application can tell this cache one thing and browsers (`Cache-Control`) another.
pub(crate) const DEFAULT_TARGETED_FIELD: &str = "tower-hybrid-cache-control";

/// The default tag header.
pub(crate) const DEFAULT_TAG_HEADER: &str = "cache-tag";

impl Default for RouteSettings {
    fn default() -> Self {
        RouteSettings {
            ttl: None,
            ttl_mode: TtlMode::Fallback,
            query: QueryFilter::All,
            key_headers: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            cache_status_header: true,
            age_header: true,
            request_directives: RequestDirectives::Ignore,
            stale_while_revalidate: None,
            stale_if_error: None,
            tag_header: Some(HeaderName::from_static(DEFAULT_TAG_HEADER)),
            keep_tag_header: false,
            max_query_bytes: DEFAULT_MAX_QUERY_BYTES,
            key_authority: KeyAuthority::Request,
            targeted_fields: vec![HeaderName::from_static(DEFAULT_TARGETED_FIELD)],
            forward_targeted_fields: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_and_prefixes() {
        let filter =
            QueryFilter::Ignore(vec![NamePattern::new("utm_*"), NamePattern::new("fbclid")]);
        assert!(!filter.keeps(b"utm_source"));
        assert!(!filter.keeps(b"fbclid"));
        assert!(filter.keeps(b"fbclid2"));
        assert!(filter.keeps(b"q"));
        let filter = QueryFilter::Keep(vec![NamePattern::new("q")]);
        assert!(filter.keeps(b"q"));
        assert!(!filter.keeps(b"page"));
    }
}
