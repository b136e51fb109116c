//! [`HybridCache`]: the public handle of one cache. It holds the engine and documents
//! what an application does with it: make a layer per route, invalidate, purge, read
//! and write application values, observe, shut down. Its builder is in `builder`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

mod builder;

pub use builder::HybridCacheBuilder;

use crate::breaker::CircuitBreaker;
use crate::engine::Engine;
use crate::error::ValueError;
use crate::key::CacheKey;
use crate::layer::HybridCacheLayer;
use crate::policy::settings::RouteSettings;
use crate::store::RedisHealth;
use crate::telemetry::CacheStats;

/// The shared cache: its stores, settings and counters.
///
/// Cheap to clone; every clone, and every [`HybridCacheLayer`] made from it, shares
/// the same stores. Build one per process and make a layer per route from it.
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use tower_hybrid_cache::HybridCache;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cache = HybridCache::builder()
///     .memory_capacity_bytes(256 << 20)
///     .build()
///     .await?;
///
/// let app: Router = Router::new()
///     .route("/jobs/search", get(|| async { "results" }).layer(cache.layer().ttl(Duration::from_secs(30))))
///     .route("/jobs/{id}", get(|| async { "a job" }).layer(cache.layer().ttl(Duration::from_secs(300))));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HybridCache {
    engine: Arc<Engine>,
}

impl std::fmt::Debug for HybridCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridCache")
            .field("namespace", &self.engine.namespace())
            .field("memory_bytes", &self.engine.memory_weighted_size())
            .finish_non_exhaustive()
    }
}

impl HybridCache {
    /// Background refreshes (`stale-while-revalidate`) running at once, at most, per
    /// cache; past it a stale hit is served without starting another.
    pub const MAX_REFRESHES: usize = crate::engine::MAX_REFRESHES;

    /// Returns a builder with every default.
    pub fn builder() -> HybridCacheBuilder {
        HybridCacheBuilder::default()
    }

    pub(crate) fn from_engine(engine: Arc<Engine>) -> Self {
        HybridCache { engine }
    }

    /// Returns a layer for one route (or a whole router), with the default route settings:
    /// no route TTL (only the origin's freshness counts), 1 MiB body limit,
    /// `Cache-Status` and `Age` on.
    pub fn layer(&self) -> HybridCacheLayer {
        HybridCacheLayer::new(Arc::clone(&self.engine))
    }

    /// Returns the namespace that starts this cache's storage keys.
    pub fn namespace(&self) -> &str {
        self.engine.namespace()
    }

    /// Returns counters of what the cache did since it was built.
    pub fn stats(&self) -> CacheStats {
        self.engine.stats()
    }

    /// Returns bytes held by the memory tier, as its weigher counts them (entries past
    /// their time count until a lookup or the maintenance sweep removes them).
    pub fn memory_weighted_size(&self) -> u64 {
        self.engine.memory_weighted_size()
    }

    /// Returns entries held by the memory tier (entries past their time count until a
    /// lookup or the maintenance sweep removes them).
    pub fn memory_entry_count(&self) -> u64 {
        self.engine.memory_entry_count()
    }

    /// Returns the circuit breaker around the Redis tier; `None` for a memory-only cache.
    pub fn redis_breaker(&self) -> Option<CircuitBreaker> {
        self.engine.redis_breaker()
    }

    /// Returns the Redis tier's connections as it sees them; `None` for a memory-only cache.
    pub fn redis_health(&self) -> Option<RedisHealth> {
        self.engine.redis_health()
    }

    /// Closes the Redis connections (a memory-only cache has nothing to close) and
    /// waits until they are closed. Requests after this are served from memory. A
    /// cache whose last clone is dropped without this closes them in the background
    /// (on the runtime it is dropped in), and its tasks end.
    pub async fn shutdown(&self) {
        self.engine.shutdown().await;
    }

    /// Sweeps the memory tier's expired entries now, as the maintenance task does every
    /// `maintenance_interval` (evictions happen as entries are stored).
    pub async fn run_pending_tasks(&self) {
        self.engine.run_pending_tasks();
    }

    /// Forgets the response stored for `uri` (and all its `Vary` variants) in both
    /// tiers: what a successful POST, PUT, PATCH or DELETE through the layer does to
    /// its own URI (RFC 9111 §4.4). Redis is told at once, bounded by its deadline,
    /// and again behind any write already queued; other replicas reading Redis first
    /// miss from then on (in near-cache mode, after at most the local TTL). A
    /// response whose origin call started before this is not stored.
    ///
    /// `uri` as clients request it, with its authority
    /// (`http://api.example/jobs/42?lang=en`); parameter order does not matter. The
    /// key is made with every query parameter kept and no extra key headers: entries
    /// of a route whose layer drops or keeps parameters, or adds key headers, are
    /// forgotten through that layer ([`HybridCacheLayer::invalidate`]) or by an unsafe
    /// request through that route instead. Returns `false`
    /// when Redis could not be told now: the delete is kept and replayed once Redis
    /// can (removals are never dropped for room, see
    /// [`pending_redis_operations`](Self::pending_redis_operations)).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = tower_hybrid_cache::HybridCache::builder().build().await?;
    /// let uri: http::Uri = "http://api.example/jobs/42".parse()?;
    /// assert!(cache.invalidate(&uri).await);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn invalidate(&self, uri: &http::Uri) -> bool {
        let key = CacheKey::primary(
            &http::Method::GET,
            uri,
            &HeaderMap::new(),
            &RouteSettings::default(),
        );
        self.engine.invalidate_key(key).await
    }

    /// Forgets every response stored with `tag` (exact match), in both tiers and so
    /// for every replica sharing the Redis. Tags come from the response's tag header
    /// (`Cache-Tag` by default, see `HybridCacheLayer::tag_header`) or the handler's
    /// [`CacheOverrides`](crate::CacheOverrides). Returns `false` when Redis could not
    /// take it now: it is kept and replayed once Redis can (see
    /// [`pending_redis_operations`](Self::pending_redis_operations)).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = tower_hybrid_cache::HybridCache::builder().build().await?;
    /// assert!(cache.invalidate_tag("company:7").await);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn invalidate_tag(&self, tag: &str) -> bool {
        self.engine.invalidate_tag(tag).await
    }

    /// Forgets every response stored with any of `tags`, as
    /// [`invalidate_tag`](Self::invalidate_tag) does for each, but all at once: with
    /// Redis slow or away, the call takes one deadline, not one per tag. Returns
    /// `false` when Redis could not take one of them now (it is replayed).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = tower_hybrid_cache::HybridCache::builder().build().await?;
    /// assert!(cache.invalidate_tags(["search:berlin", "matches"]).await);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn invalidate_tags<I, T>(&self, tags: I) -> bool
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let tags: Vec<String> = tags.into_iter().map(|t| t.as_ref().to_owned()).collect();
        self.engine.invalidate_all_of(&[], &tags).await
    }

    /// Forgets everything this cache stored, in both tiers (in Redis: every key of its
    /// namespace), and so for every replica sharing the Redis. Returns `false` when
    /// Redis could not take it now: it is replayed once Redis can, as
    /// [`invalidate_tag`](Self::invalidate_tag).
    pub async fn purge_all(&self) -> bool {
        self.engine.purge_all().await
    }

    /// Returns operations waiting for Redis to come back: invalidations, tag
    /// invalidations and purges, and write batches made while it was away.
    ///
    /// Removals are replayed first, and never dropped for room: past 10 000 (or 4 MiB
    /// of tags) they fold into one purge of the namespace, which removes more than
    /// was asked and nothing less (`CacheStats::redis_removals_folded`). Write batches
    /// are kept up to 1 024 and 16 MiB of entries, the oldest dropped first
    /// (`redis_writes_dropped`). An operation Redis refuses with an error reply is
    /// given up (`redis_replays_refused`): a write batch at once, a removal after five
    /// refusals, each tried behind the others so that it blocks none of them.
    pub fn pending_redis_operations(&self) -> usize {
        self.engine.pending_redis_operations()
    }

    /// Returns the value stored under `key`, if there is a fresh one that deserialises into
    /// `T`; a value of another shape is a miss, not an error.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = HybridCache::builder().build().await?;
    /// cache.set("candidate:7:matches", &vec![42_u64, 17, 3], Duration::from_secs(60)).await?;
    /// let matches: Option<Vec<u64>> = cache.get("candidate:7:matches").await;
    /// assert_eq!(matches, Some(vec![42, 17, 3]));
    /// let wrong: Option<String> = cache.get("candidate:7:matches").await;
    /// assert_eq!(wrong, None);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.engine.value(key).await
    }

    /// Stores `value` under `key` for `ttl`, in memory at once and in Redis in the
    /// background.
    ///
    /// # Errors
    ///
    /// [`ValueError`] when `value` does not serialise as JSON.
    pub async fn set<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), ValueError> {
        self.engine.set_value(key, value, ttl).await
    }

    /// Deletes the value under `key` from both tiers, as an invalidation: a
    /// [`get_or_insert_with`](Self::get_or_insert_with) that started producing before
    /// it does not store its value. Returns `false` when Redis could not be told now
    /// (the memory tier is cleared regardless; the delete is kept and replayed).
    pub async fn delete(&self, key: &str) -> bool {
        self.engine.delete_value(key).await
    }

    /// Returns the value under `key`, or the one `produce` makes (then stored for `ttl`).
    /// Concurrent callers for one key wait for a single `produce` (up to the
    /// single-flight timeout).
    ///
    /// # Errors
    ///
    /// An error of `produce` is returned, and nothing is stored.
    pub async fn get_or_insert_with<T, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        produce: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.engine.value_or_insert_with(key, ttl, produce).await
    }
}
