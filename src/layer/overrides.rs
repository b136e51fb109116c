//! [`CacheOverrides`]: what a handler decides for its own response.

use crate::entry::is_valid_tag;

use std::time::Duration;

/// Cache settings a handler sets for its own response, as a response extension. The
/// layer takes it out before the response leaves (it never reaches the client) and
/// applies it when the response is stored:
///
/// - `ttl`: the freshness lifetime, in place of the origin's `max-age`, `s-maxage`
///   or `Expires` and of the route TTL (what the headers forbid, such as `no-store`
///   or `private`, still is not stored);
/// - `stale_while_revalidate`, `stale_if_error`: the stale windows, in place of the
///   response's directives and the route's settings;
/// - `tags`: added to those of the tag header, for `HybridCache::invalidate_tag`;
/// - `invalidate_tags`: on the successful response to an unsafe request (POST, PUT,
///   …), tags to invalidate with the request's own URIs, all at once and within one
///   Redis deadline, before the response goes back (ignored on other responses).
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Extension, Router};
/// use tower_hybrid_cache::{CacheOverrides, HybridCache};
///
/// async fn job() -> (Extension<CacheOverrides>, &'static str) {
///     let overrides = CacheOverrides::new()
///         .ttl(Duration::from_secs(600))
///         .stale_while_revalidate(Duration::from_secs(60))
///         .tags(["job:42", "company:7"]);
///     (Extension(overrides), "a job")
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cache = HybridCache::builder().build().await?;
/// let app: Router = Router::new().route("/jobs/{id}", get(job).layer(cache.layer()));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct CacheOverrides {
    pub(crate) ttl: Option<Duration>,
    pub(crate) stale_while_revalidate: Option<Duration>,
    pub(crate) stale_if_error: Option<Duration>,
    pub(crate) tags: Vec<String>,
    pub(crate) invalidate_tags: Vec<String>,
}

impl CacheOverrides {
    /// Creates overrides that change nothing.
    pub fn new() -> Self {
        CacheOverrides::default()
    }

    /// Sets the freshness lifetime of this response.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets how long past its freshness it may be served while refreshed in the background.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_while_revalidate = Some(window);
        self
    }

    /// Sets how long past its freshness it may be served when the origin fails.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = Some(window);
        self
    }

    /// Adds tags (surrogate keys) to this response. Empty tags, tags over 256 bytes
    /// and tags with a newline are dropped.
    pub fn tags<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.tags.extend(valid_tags(tags));
        self
    }

    /// Adds tags to invalidate once this response to an unsafe request succeeds (2xx,
    /// 3xx), with the URIs the request invalidates anyway: all of them concurrently,
    /// so that a sick Redis costs the request one deadline, not one per tag. What
    /// Redis could not take is queued and replayed, as with
    /// `HybridCache::invalidate_tag`. Empty tags, tags over 256 bytes
    /// and tags with a newline are dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::{http::StatusCode, routing::post, Extension, Router};
    /// use tower_hybrid_cache::{CacheOverrides, HybridCache};
    ///
    /// async fn create_job() -> (StatusCode, Extension<CacheOverrides>) {
    ///     // Every search a job in Berlin can appear in, and every match list.
    ///     let overrides = CacheOverrides::new().invalidate_tags(["search:berlin", "matches"]);
    ///     (StatusCode::CREATED, Extension(overrides))
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = HybridCache::builder().build().await?;
    /// let app: Router = Router::new().route("/jobs", post(create_job).layer(cache.layer()));
    /// # Ok(())
    /// # }
    /// ```
    pub fn invalidate_tags<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.invalidate_tags.extend(valid_tags(tags));
        self
    }
}

/// The tags worth keeping: not empty, at most 256 bytes, no newline.
fn valid_tags<I, T>(tags: I) -> impl Iterator<Item = String>
where
    I: IntoIterator<Item = T>,
    T: Into<String>,
{
    tags.into_iter()
        .map(Into::into)
        .filter(|tag| is_valid_tag(tag))
}
