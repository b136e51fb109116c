//! [`HybridCacheBuilder`]: every cache-wide knob, checked, and the cache it builds.

use std::sync::Arc;
use std::time::Duration;

use tower::{BoxError, Layer, Service};

use super::HybridCache;
use crate::breaker::CircuitBreakerLayer;
use crate::engine::{Engine, EngineSettings};
use crate::error::BuildError;
use crate::store::hybrid::HybridStore;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::redis_tier::{RedisLayerFn, TierParts};
use crate::store::{RedisConfig, RedisTierService, StoreRequest, StoreResponse};
use crate::telemetry::Counters;

/// Builds a [`HybridCache`]. Every knob has a default; `HybridCache::builder().build()`
/// is a working memory-only cache.
#[derive(Debug, Clone)]
#[must_use]
pub struct HybridCacheBuilder {
    memory_capacity_bytes: u64,
    namespace: String,
    cache_status_name: String,
    single_flight_timeout: Duration,
    maintenance_interval: Duration,
    redis: Option<RedisConfig>,
    near_cache: Option<Duration>,
    redis_breaker: Option<CircuitBreakerLayer>,
    redis_layers: RedisLayers,
    fill_lease: Option<Duration>,
    fallback_max_staleness: Option<Duration>,
}

/// The user's layers on the Redis tier, in the order they were added.
#[derive(Clone, Default)]
struct RedisLayers(Vec<RedisLayerFn>);

impl std::fmt::Debug for RedisLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} layer(s)", self.0.len())
    }
}

impl Default for HybridCacheBuilder {
    fn default() -> Self {
        HybridCacheBuilder {
            memory_capacity_bytes: Self::DEFAULT_MEMORY_CAPACITY_BYTES,
            namespace: Self::DEFAULT_NAMESPACE.to_owned(),
            cache_status_name: Self::DEFAULT_CACHE_STATUS_NAME.to_owned(),
            single_flight_timeout: Duration::from_secs(5),
            maintenance_interval: Duration::from_secs(1),
            redis: None,
            near_cache: None,
            redis_breaker: None,
            redis_layers: RedisLayers::default(),
            fill_lease: None,
            fallback_max_staleness: None,
        }
    }
}

impl HybridCacheBuilder {
    /// The memory tier's capacity unless set: 64 MiB.
    pub const DEFAULT_MEMORY_CAPACITY_BYTES: u64 = 64 << 20;
    /// The namespace unless set: the first part of every storage key.
    pub const DEFAULT_NAMESPACE: &'static str = "thc";
    /// The cache's name in `Cache-Status` unless set (RFC 9211).
    pub const DEFAULT_CACHE_STATUS_NAME: &'static str = "tower-hybrid-cache";

    /// Sets the most bytes the memory tier holds: every entry's heap, as its weigher
    /// counts it (the body, about 200 bytes a header field, about 500 bytes of
    /// bookkeeping an entry; checked against the allocator's count of what stored
    /// responses hold). Bodies are stored in buffers of their own size, never as
    /// slices of larger ones. Least recently and least frequently used entries are
    /// evicted past it (quick_cache's S3-FIFO). The capacity is split evenly over up
    /// to four shards a core, none under 8 MiB (one shard below that): an entry
    /// over 97 % of a shard's share is not kept in memory. Default 64 MiB.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = HybridCache::builder().memory_capacity_bytes(256 << 20).build().await?;
    /// assert_eq!(cache.memory_weighted_size(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn memory_capacity_bytes(mut self, bytes: u64) -> Self {
        self.memory_capacity_bytes = bytes;
        self
    }

    /// Sets the namespace that starts every storage key (`{namespace}/v2:{digest}`), so
    /// several applications can share one store. ASCII letters, digits and `-_.:`,
    /// 1 to 64 characters. Default `thc`. The namespace ends at `/`, which it cannot
    /// hold, so no two namespaces share a key, even when one starts with the other
    /// (`jobs` and `jobs:prod`): a purge of one never touches the other.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = HybridCache::builder().namespace("jobs-api:prod").build().await?;
    /// assert_eq!(cache.namespace(), "jobs-api:prod");
    /// // A namespace that could reach a key's syntax is refused.
    /// assert!(HybridCache::builder().namespace("a{b}").build().await.is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the cache's name in `Cache-Status` (an RFC 8941 token: a letter or `*`, then
    /// letters, digits and `_-.:%*/!#$&'+^|~`). Default `tower-hybrid-cache`.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache = HybridCache::builder().cache_status_name("edge-7").build().await?;
    /// # let _ = cache;
    /// # Ok(())
    /// # }
    /// ```
    pub fn cache_status_name(mut self, name: impl Into<String>) -> Self {
        self.cache_status_name = name.into();
        self
    }

    /// Sets how long a request that finds another request already fetching the same URL
    /// waits for it before going to the origin itself. Default 5 s.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// // A slow report: followers wait up to 30 s for the first request's answer.
    /// let builder = HybridCache::builder().single_flight_timeout(Duration::from_secs(30));
    /// # let _ = builder;
    /// ```
    pub fn single_flight_timeout(mut self, timeout: Duration) -> Self {
        self.single_flight_timeout = timeout;
        self
    }

    /// Sets how often the memory tier sweeps expired entries, so that they free their
    /// memory even when the cache is idle (a lookup never serves one). Each tick
    /// sweeps one of the tier's shards (up to four a core, none under 8 MiB), a pass
    /// over its entries skipped while none of them can have expired: an expired entry
    /// is freed within as many ticks as there are shards. Default 1 s.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// let builder = HybridCache::builder().maintenance_interval(Duration::from_millis(250));
    /// # let _ = builder;
    /// ```
    pub fn maintenance_interval(mut self, interval: Duration) -> Self {
        self.maintenance_interval = interval;
        self
    }

    /// Shares entries through Redis at `url` (`redis://[user:password@]host:port[/db]`
    /// or `rediss://`), with the default [`RedisConfig`]. Without it the cache is
    /// memory-only.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Building never waits on a Redis that is not there for longer than its connect
    /// // timeout: the cache serves from memory until Redis is up.
    /// let cache = HybridCache::builder().redis_url("redis://127.0.0.1:1").build().await?;
    /// assert!(cache.redis_health().is_some());
    /// # Ok(())
    /// # }
    /// ```
    pub fn redis_url(self, url: impl Into<String>) -> Self {
        self.redis(RedisConfig::new(url))
    }

    /// Turns on near-cache mode (with Redis): reads try memory first, and memory keeps an
    /// entry at most `local_ttl`, so a replica may serve an entry up to that long
    /// after another replica replaced it in Redis. Invalidations (of a key, a tag, or
    /// a purge) by any replica are published on `{namespace}/invalidations`, and every
    /// cache's memory forgets them as the message arrives (`local_ttl` still bounds what
    /// a lost message costs a near cache). Without it (the default) every read asks
    /// Redis first, and memory answers only when Redis cannot.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// // Memory first; a replica serves another's replacement at most 2 s late.
    /// let builder = HybridCache::builder()
    ///     .redis_url("redis://127.0.0.1:6379")
    ///     .near_cache(Duration::from_secs(2));
    /// # let _ = builder;
    /// ```
    pub fn near_cache(mut self, local_ttl: Duration) -> Self {
        self.near_cache = Some(local_ttl);
        self
    }

    /// Sets the circuit breaker around the Redis tier. Default:
    /// [`CircuitBreakerLayer::new`] (5 failures in a row or 50 % of 20 calls; open
    /// 1 s doubling to 30 s). The connections also drive it: all lost opens it at
    /// once, one back lets its probe through.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_hybrid_cache::breaker::CircuitBreakerLayer;
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// let builder = HybridCache::builder()
    ///     .redis_url("redis://127.0.0.1:6379")
    ///     .redis_breaker(CircuitBreakerLayer::new().consecutive_failures(3).slow_call(Duration::from_millis(20)));
    /// # let _ = builder;
    /// ```
    pub fn redis_breaker(mut self, breaker: CircuitBreakerLayer) -> Self {
        self.redis_breaker = Some(breaker);
        self
    }

    /// Adds a tower layer around the Redis store, inside the retry: it sees every
    /// attempt as a [`StoreRequest`] and answers with a [`StoreResponse`] or an error
    /// (the store's are [`StoreError`](crate::store::StoreError); the retry resends only
    /// those that [are transient](crate::store::StoreError::is_transient), the breaker counts
    /// those that [are an outage](crate::store::StoreError::is_outage) and any error of the layer's own).
    /// For metrics or logs per Redis command, or faults in a test. The layered
    /// service must be `Clone + Send + Sync` (it is shared by every request).
    /// Called more than once, the first layer added is the outermost.
    ///
    /// The whole stack, outside in: breaker, deadline (reads and deletes), retry,
    /// these layers, the store.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    /// use tower::util::MapRequestLayer;
    /// use tower_hybrid_cache::store::{StoreOperation, StoreRequest};
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// let redis_gets = Arc::new(AtomicU64::new(0));
    /// let counted = Arc::clone(&redis_gets);
    /// let builder = HybridCache::builder()
    ///     .redis_url("redis://127.0.0.1:6379")
    ///     .redis_layer(MapRequestLayer::new(move |request: StoreRequest| {
    ///         if request.operation() == StoreOperation::Get {
    ///             counted.fetch_add(1, Ordering::Relaxed);
    ///         }
    ///         request
    ///     }));
    /// # let _ = builder;
    /// ```
    pub fn redis_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<RedisTierService> + Send + Sync + 'static,
        L::Service: Service<StoreRequest, Response = StoreResponse> + Clone + Send + Sync + 'static,
        <L::Service as Service<StoreRequest>>::Error: Into<BoxError>,
        <L::Service as Service<StoreRequest>>::Future: Send + 'static,
    {
        self.redis_layers.0.push(Arc::new(move |inner| {
            RedisTierService::new(layer.layer(inner))
        }));
        self
    }

    /// Turns on cross-replica single-flight (with Redis): the first replica to miss a URL takes
    /// a lease on it in Redis (`SET NX PX`, a random token, held at most `ttl`) and
    /// fetches it; a replica that misses the same URL meanwhile does not call the
    /// origin but polls Redis (after 2 ms, doubling to 32 ms, jittered) for the entry, at most `ttl` or
    /// the single-flight timeout, and calls the origin itself only if none comes. The
    /// lease is given back when the fill ends. While the breaker is open, or Redis
    /// cannot answer, only the in-process single-flight applies. Default off: each
    /// replica fetches its own misses.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// // One replica fetches a missed URL; the others wait up to 2 s for its entry.
    /// let builder = HybridCache::builder()
    ///     .redis_url("redis://127.0.0.1:6379")
    ///     .redis_fill_lease(Duration::from_secs(2));
    /// # let _ = builder;
    /// ```
    pub fn redis_fill_lease(mut self, ttl: Duration) -> Self {
        self.fill_lease = Some(ttl);
        self
    }

    /// Bounds what memory serves while Redis cannot answer: a stored response is
    /// served from memory then only if this replica got it less than `bound` ago,
    /// counted from when Redis stopped answering for a copy it held before (what it
    /// cannot know during an outage is another replica's invalidation). Past it the
    /// request goes to the origin, and the copy it stores is served for `bound` in
    /// turn. Default: none (memory serves each copy within its own freshness and stale
    /// windows, as when Redis is up). A team that prefers origin load to staleness
    /// during an outage sets it. Application values (`HybridCache::get`) are not
    /// bounded by it.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_hybrid_cache::HybridCache;
    ///
    /// // With Redis away, nothing served from memory is more than 10 s out of touch.
    /// let builder = HybridCache::builder()
    ///     .redis_url("redis://127.0.0.1:6379")
    ///     .fallback_max_staleness(Duration::from_secs(10));
    /// # let _ = builder;
    /// ```
    pub fn fallback_max_staleness(mut self, bound: Duration) -> Self {
        self.fallback_max_staleness = Some(bound);
        self
    }

    /// Shares entries through Redis, configured in full.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_hybrid_cache::{HybridCache, RedisConfig};
    ///
    /// let builder = HybridCache::builder().redis(
    ///     RedisConfig::new("redis://cache:6379/0")
    ///         .pool_size(8)
    ///         .deadline(Duration::from_millis(20)),
    /// );
    /// # let _ = builder;
    /// ```
    pub fn redis(mut self, config: RedisConfig) -> Self {
        self.redis = Some(config);
        self
    }

    /// Builds the cache and starts its housekeeping task on the current tokio runtime.
    /// Its `metrics` counters and histograms are registered here, with the recorder
    /// installed now: install yours (Prometheus, StatsD, …) before this.
    ///
    /// # Errors
    ///
    /// Fails only on an invalid setting (a namespace or name out of their syntax, a
    /// zero interval or timeout, an unreadable Redis URL), never because a store is
    /// unreachable: with Redis down, the cache serves from memory and starts using
    /// Redis once it is up.
    pub async fn build(self) -> Result<HybridCache, BuildError> {
        validate_namespace(&self.namespace)?;
        validate_token(&self.cache_status_name)?;
        if self.maintenance_interval.is_zero() {
            return Err(BuildError::invalid(
                "maintenance_interval",
                "must be more than zero",
            ));
        }
        let counters = Arc::new(Counters::default());
        // The local TTL bounds staleness against Redis; memory-only, there is nothing
        // to be stale against.
        let local_ttl = self.near_cache.filter(|_| self.redis.is_some());
        let memory = MemoryStore::new(self.memory_capacity_bytes, local_ttl);
        let mut store = HybridStore::new(memory, Arc::clone(&counters));
        if let Some(config) = &self.redis {
            // Settings first (connecting checks the rest before it connects): a bad
            // one must not wait on a connection to be reported.
            let retry = config.retry_policy(Arc::clone(&counters))?;
            let redis = RedisStore::connect(config, &self.namespace).await?;
            let parts = TierParts {
                config,
                breaker: self.redis_breaker.clone().unwrap_or_default(),
                retry,
                layers: &self.redis_layers.0,
            };
            store = store
                .with_redis(redis, parts, local_ttl.is_some())
                .with_fallback_bound(self.fallback_max_staleness);
        }
        let engine = Engine::start(
            store,
            counters,
            EngineSettings {
                namespace: self.namespace,
                cache_status_name: self.cache_status_name,
                single_flight_timeout: self.single_flight_timeout,
                fill_lease: self.fill_lease,
                maintenance_interval: self.maintenance_interval,
            },
        );
        Ok(HybridCache::from_engine(engine))
    }
}

fn validate_namespace(namespace: &str) -> Result<(), BuildError> {
    if namespace.is_empty() || namespace.len() > 64 {
        return Err(BuildError::invalid(
            "namespace",
            "must be 1 to 64 characters",
        ));
    }
    if !namespace
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(BuildError::invalid(
            "namespace",
            format_args!("{namespace:?} may hold only ASCII letters, digits and -_.:"),
        ));
    }
    Ok(())
}

fn validate_token(name: &str) -> Result<(), BuildError> {
    let mut bytes = name.bytes();
    let first_ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'*');
    let rest_ok = bytes.all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'_' | b'-'
                    | b'.'
                    | b':'
                    | b'%'
                    | b'*'
                    | b'/'
                    | b'!'
                    | b'#'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'+'
                    | b'^'
                    | b'|'
                    | b'~'
            )
    });
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(BuildError::invalid(
            "cache_status_name",
            format_args!("{name:?} is not an RFC 8941 token"),
        ))
    }
}
