//! [`HybridCache`], the shared handle, and its builder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use tokio::sync::watch;

use crate::entry::{CachedResponse, Entry, VaryIndex};
use crate::error::BuildError;
use crate::key::normalised_value;
use crate::layer::HybridCacheLayer;
use crate::resilience::breaker::{CircuitBreaker, CircuitBreakerLayer};
use crate::store::hybrid::RedisLayerFn;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisConfig, RedisStore};
use crate::store::{HybridStore, RedisTierService, StoreRequest, StoreResponse, Tier};
use crate::telemetry::{CacheStats, Counter, Counters};
use crate::CacheKey;
use tower::{BoxError, Layer, Service};

/// Default memory-tier capacity: 64 MiB.
pub const DEFAULT_MEMORY_CAPACITY_BYTES: u64 = 64 << 20;
/// Background refreshes (`stale-while-revalidate`) running at once, at most; past it a
/// stale hit is served without starting another.
pub const MAX_REFRESHES: usize = 64;
/// Default namespace: the first part of every storage key.
pub const DEFAULT_NAMESPACE: &str = "thc";
/// Default name in `Cache-Status` (RFC 9211).
pub const DEFAULT_CACHE_STATUS_NAME: &str = "tower-hybrid-cache";

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
    pub(crate) inner: Arc<CacheInner>,
}

pub(crate) struct CacheInner {
    pub(crate) store: HybridStore,
    pub(crate) flights: SingleFlight,
    pub(crate) invalidations: Invalidations,
    /// Background refreshes (stale-while-revalidate) running at once, at most.
    pub(crate) refreshes: Arc<tokio::sync::Semaphore>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) cache_status_name: String,
    pub(crate) single_flight_timeout: Duration,
    pub(crate) namespace: String,
    /// The cross-replica fill lease's time to live, when on.
    pub(crate) fill_lease: Option<Duration>,
}

impl std::fmt::Debug for HybridCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridCache")
            .field("cache_status_name", &self.inner.cache_status_name)
            .field("memory_bytes", &self.inner.store.memory().weighted_size())
            .finish_non_exhaustive()
    }
}

/// Builds a [`HybridCache`]. Every knob has a default; `HybridCache::builder().build()`
/// is a working memory-only cache.
#[derive(Debug, Clone)]
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
            memory_capacity_bytes: DEFAULT_MEMORY_CAPACITY_BYTES,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            cache_status_name: DEFAULT_CACHE_STATUS_NAME.to_owned(),
            single_flight_timeout: Duration::from_secs(5),
            maintenance_interval: Duration::from_secs(1),
            redis: None,
            near_cache: None,
            redis_breaker: None,
            redis_layers: RedisLayers::default(),
            fill_lease: None,
        }
    }
}

impl HybridCacheBuilder {
    /// The most bytes the memory tier holds: bodies, headers and a fixed per-entry
    /// overhead, as its weigher counts them. Least recently and least frequently used
    /// entries are evicted past it (moka's TinyLFU). Default 64 MiB.
    pub fn memory_capacity_bytes(mut self, bytes: u64) -> Self {
        self.memory_capacity_bytes = bytes;
        self
    }

    /// The namespace that starts every storage key (`{namespace}:v1:{digest}`), so
    /// several applications can share one store. ASCII letters, digits and `-_.:`,
    /// 1 to 64 characters. Default `thc`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The cache's name in `Cache-Status` (an RFC 8941 token: a letter or `*`, then
    /// letters, digits and `_-.:%*/!#$&'+^|~`). Default `tower-hybrid-cache`.
    pub fn cache_status_name(mut self, name: impl Into<String>) -> Self {
        self.cache_status_name = name.into();
        self
    }

    /// How long a request that finds another request already fetching the same URL
    /// waits for it before going to the origin itself. Default 5 s.
    pub fn single_flight_timeout(mut self, timeout: Duration) -> Self {
        self.single_flight_timeout = timeout;
        self
    }

    /// How often moka's pending housekeeping runs, so that expired and evicted
    /// entries free their memory even when the cache is idle. Default 1 s.
    pub fn maintenance_interval(mut self, interval: Duration) -> Self {
        self.maintenance_interval = interval;
        self
    }

    /// Shares entries through Redis at `url` (`redis://[user:password@]host:port[/db]`
    /// or `rediss://`), with the default [`RedisConfig`]. Without it the cache is
    /// memory-only.
    pub fn redis_url(self, url: impl Into<String>) -> Self {
        self.redis(RedisConfig::new(url))
    }

    /// Near-cache mode (with Redis): reads try memory first, and memory keeps an
    /// entry at most `local_ttl`, so a replica may serve an entry up to that long
    /// after another replica replaced it in Redis. Invalidations (of a key, a tag, or
    /// a purge) by any replica are published on `{namespace}:invalidations`, and every
    /// cache's memory forgets them as the message arrives (`local_ttl` still bounds what
    /// a lost message costs a near cache). Without it (the default) every read asks
    /// Redis first, and memory answers only when Redis cannot.
    pub fn near_cache(mut self, local_ttl: Duration) -> Self {
        self.near_cache = Some(local_ttl);
        self
    }

    /// The circuit breaker around the Redis tier. Default:
    /// [`CircuitBreakerLayer::new`] (5 failures in a row or 50 % of 20 calls; open
    /// 1 s doubling to 30 s). The connections also drive it: all lost opens it at
    /// once, one back lets its probe through.
    pub fn redis_breaker(mut self, breaker: CircuitBreakerLayer) -> Self {
        self.redis_breaker = Some(breaker);
        self
    }

    /// Adds a tower layer around the Redis store, inside the retry: it sees every
    /// attempt as a [`StoreRequest`] and answers with a [`StoreResponse`] or an error
    /// (the store's are [`StoreError`](crate::StoreError); the retry resends only
    /// those that [are transient](crate::StoreError::is_transient), the breaker counts
    /// those that [are an outage](crate::StoreError::is_outage) and any error of the layer's own).
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
    /// use tower_hybrid_cache::{HybridCache, StoreOperation, StoreRequest};
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

    /// Cross-replica single-flight (with Redis): the first replica to miss a URL takes
    /// a lease on it in Redis (`SET NX PX`, a random token, held at most `ttl`) and
    /// fetches it; a replica that misses the same URL meanwhile does not call the
    /// origin but polls Redis (every 10–30 ms, jittered) for the entry, at most `ttl` or
    /// the single-flight timeout, and calls the origin itself only if none comes. The
    /// lease is given back when the fill ends. While the breaker is open, or Redis
    /// cannot answer, only the in-process single-flight applies. Default off: each
    /// replica fetches its own misses.
    pub fn redis_fill_lease(mut self, ttl: Duration) -> Self {
        self.fill_lease = Some(ttl);
        self
    }

    /// Shares entries through Redis, configured in full.
    pub fn redis(mut self, config: RedisConfig) -> Self {
        self.redis = Some(config);
        self
    }

    /// Builds the cache and starts its housekeeping task on the current tokio runtime.
    ///
    /// Fails only on an invalid setting, never because a store is unreachable: with
    /// Redis down, the cache serves from memory and starts using Redis once it is up.
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
        let mut store = HybridStore::new(MemoryStore::new(self.memory_capacity_bytes, local_ttl));
        if let Some(config) = &self.redis {
            // Settings first: a bad one must not wait on a connection to be reported.
            config.retry_policy(Arc::clone(&counters))?;
            let redis = RedisStore::connect(config, &self.namespace).await?;
            store = store.with_redis(
                redis,
                config,
                self.redis_breaker.clone().unwrap_or_default(),
                &self.redis_layers.0,
                Arc::clone(&counters),
                local_ttl.is_some(),
            )?;
        }
        let inner = Arc::new(CacheInner {
            store,
            flights: SingleFlight::default(),
            invalidations: Invalidations::new(),
            refreshes: Arc::new(tokio::sync::Semaphore::new(MAX_REFRESHES)),
            counters,
            cache_status_name: self.cache_status_name,
            single_flight_timeout: self.single_flight_timeout,
            namespace: self.namespace,
            fill_lease: self.fill_lease.filter(|ttl| !ttl.is_zero()),
        });
        spawn_maintenance(Arc::downgrade(&inner), self.maintenance_interval);
        Ok(HybridCache { inner })
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

fn spawn_maintenance(inner: Weak<CacheInner>, every: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(target: crate::telemetry::TARGET, "no tokio runtime: memory housekeeping runs only on access");
        return;
    };
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            // Holding only a weak reference: the task ends with the last handle.
            let Some(inner) = inner.upgrade() else { return };
            inner.store.memory().run_pending_tasks().await;
        }
    });
}

impl HybridCache {
    /// A builder with every default.
    pub fn builder() -> HybridCacheBuilder {
        HybridCacheBuilder::default()
    }

    /// A layer for one route (or a whole router), with the default route settings:
    /// no route TTL (only the origin's freshness counts), 1 MiB body limit,
    /// `Cache-Status` and `Age` on.
    pub fn layer(&self) -> HybridCacheLayer {
        HybridCacheLayer::new(self.clone())
    }

    /// The namespace that starts this cache's storage keys.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// Counters of what the cache did since it was built.
    pub fn stats(&self) -> CacheStats {
        self.inner.counters.snapshot()
    }

    /// Bytes held by the memory tier, as its weigher counts them (may lag by the
    /// pending housekeeping).
    pub fn memory_weighted_size(&self) -> u64 {
        self.inner.store.memory().weighted_size()
    }

    /// Entries held by the memory tier (may lag by the pending housekeeping).
    pub fn memory_entry_count(&self) -> u64 {
        self.inner.store.memory().entry_count()
    }

    /// The circuit breaker around the Redis tier; `None` for a memory-only cache.
    pub fn redis_breaker(&self) -> Option<CircuitBreaker> {
        self.inner.store.redis_breaker()
    }

    /// The Redis tier's connections as it sees them; `None` for a memory-only cache.
    pub fn redis_health(&self) -> Option<crate::RedisHealth> {
        self.inner.store.redis_health()
    }

    /// Closes the Redis connections (a memory-only cache has nothing to close) and
    /// waits until they are closed. Requests after this are served from memory. A
    /// cache whose last clone is dropped without this closes them in the background
    /// (on the runtime it is dropped in), and its tasks end.
    pub async fn shutdown(&self) {
        self.inner.store.shutdown().await;
    }

    /// Runs the memory tier's pending housekeeping now.
    pub async fn run_pending_tasks(&self) {
        self.inner.store.memory().run_pending_tasks().await;
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
    /// when Redis could not be told now (it is still told through the write queue
    /// when it comes back, if the queue had room).
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
            &crate::policy::settings::RouteSettings::default(),
        );
        self.invalidate_key(key).await
    }

    /// Forgets every response stored with `tag` (exact match), in both tiers and so
    /// for every replica sharing the Redis. Tags come from the response's tag header
    /// (`Cache-Tag` by default, see `HybridCacheLayer::tag_header`) or the handler's
    /// [`CacheOverrides`](crate::CacheOverrides). Returns `false` when Redis could not
    /// take it now: it is kept (up to 1024 removals) and replayed, in order, once Redis
    /// can.
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
        self.inner.invalidations.mark_tag(tag).await;
        self.count(Counter::Invalidation);
        tracing::debug!(target: crate::telemetry::TARGET, tag, outcome = "tag-invalidated");
        self.inner
            .store
            .invalidate_tag(tag, &self.inner.counters)
            .await
    }

    /// Forgets everything this cache stored, in both tiers (in Redis: every key of its
    /// namespace), and so for every replica sharing the Redis. Returns `false` when
    /// Redis could not take it now: it is replayed once Redis can, as
    /// [`invalidate_tag`](Self::invalidate_tag).
    pub async fn purge_all(&self) -> bool {
        self.inner.invalidations.mark_all();
        self.count(Counter::Invalidation);
        tracing::debug!(target: crate::telemetry::TARGET, outcome = "purged");
        self.inner.store.purge_all(&self.inner.counters).await
    }

    /// Operations waiting for Redis to come back: write batches made while it was
    /// away, invalidations, tag invalidations and purges. They are replayed in order
    /// (up to 1024 kept; the oldest is dropped first).
    pub fn pending_redis_operations(&self) -> usize {
        self.inner.store.pending_operations()
    }

    /// Marks `key` invalidated (fills that started before are not stored), then
    /// removes it from both tiers.
    pub(crate) async fn invalidate_key(&self, key: CacheKey) -> bool {
        self.inner.invalidations.mark(key).await;
        self.count(Counter::Invalidation);
        tracing::debug!(target: crate::telemetry::TARGET, key = %key, outcome = "invalidated");
        self.inner
            .store
            .invalidate(&key, &self.inner.counters)
            .await
    }

    pub(crate) fn count(&self, counter: Counter) {
        self.inner.counters.add(counter);
    }

    /// Finds the stored response for a request: the entry under the primary key, or
    /// the variant its `Vary` index selects.
    pub(crate) async fn lookup(&self, primary: &CacheKey, headers: &HeaderMap) -> Lookup {
        let counters = &self.inner.counters;
        let Some((entry, tier)) = self.inner.store.get(primary, counters).await else {
            return Lookup::Miss(MissKind::Uri);
        };
        let response = match entry {
            Entry::Response(response) => response,
            Entry::Variants(index) => {
                let variant = primary.variant(index.generation, &index.names, headers);
                match self.inner.store.get(&variant, counters).await {
                    Some((Entry::Response(response), _)) => response,
                    _ => return Lookup::Miss(MissKind::Vary),
                }
            }
            // The direct API's values live under keys of their own kind.
            Entry::Value(_) => return Lookup::Miss(MissKind::Uri),
        };
        // The stored request values must match: a variant is never served to a
        // request that would not have selected it.
        let matches = response.vary.iter().all(|(name, stored)| {
            let present = headers.contains_key(name);
            match stored {
                Some(value) => present && normalised_value(headers, name) == value.as_ref(),
                None => !present,
            }
        });
        if !matches {
            return Lookup::Miss(MissKind::Vary);
        }
        Lookup::Hit(response, tier)
    }

    /// Stores a response under its primary key, or as a variant with its index.
    /// `started`: when the response's origin call started.
    pub(crate) async fn store(
        &self,
        primary: CacheKey,
        response: CachedResponse,
        started: SystemTime,
    ) {
        let store = &self.inner.store;
        let counters = &self.inner.counters;
        if response.vary.is_empty() {
            store
                .put(
                    primary,
                    Entry::Response(Arc::new(response)),
                    started,
                    counters,
                )
                .await;
            return;
        }
        let names: Vec<HeaderName> = response.vary.iter().map(|(name, _)| name.clone()).collect();
        let mut stale_until = response.stale_until;
        let mut generation = random_u64();
        // Keep the index (and the variants under it) alive as long as the
        // longest-lived variant. With no index (never stored, or invalidated), the
        // new generation leaves every earlier variant unreachable.
        if let Some((Entry::Variants(old), _)) = store.get(&primary, counters).await {
            if old.names == names {
                stale_until = stale_until.max(old.stale_until);
                generation = old.generation;
            }
        }
        let variant = variant_key(&primary, generation, &response.vary);
        store
            .put(
                variant,
                Entry::Response(Arc::new(response)),
                started,
                counters,
            )
            .await;
        store
            .put(
                primary,
                Entry::Variants(Arc::new(VaryIndex {
                    names,
                    stale_until,
                    generation,
                })),
                started,
                counters,
            )
            .await;
    }
}

/// The variant key from stored request values (as the lookup computes it from the
/// request's headers).
/// A number unlikely to repeat within a process or across replicas (`RandomState` is
/// seeded from the OS per process); for generations and lease tokens.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

fn variant_key(
    primary: &CacheKey,
    generation: u64,
    vary: &[(HeaderName, Option<Bytes>)],
) -> CacheKey {
    let mut headers = HeaderMap::new();
    let mut names = Vec::with_capacity(vary.len());
    for (name, value) in vary {
        names.push(name.clone());
        if let Some(value) = value {
            if let Ok(value) = http::HeaderValue::from_maybe_shared(value.clone()) {
                headers.insert(name.clone(), value);
            }
        }
    }
    primary.variant(generation, &names, &headers)
}

/// Recent invalidations, so that a fill whose origin call started before one is not
/// stored after it.
pub(crate) struct Invalidations {
    seq: std::sync::atomic::AtomicU64,
    /// The sequence number of the last `purge_all`.
    purged: std::sync::atomic::AtomicU64,
    /// Tag → the sequence number of its last invalidation.
    tags: moka::future::Cache<String, u64>,
    /// Key → the sequence number of its last invalidation. Bounded: a fill that runs
    /// longer than the time-to-live after an invalidation is not caught.
    marks: moka::future::Cache<CacheKey, u64>,
}

impl Invalidations {
    fn new() -> Self {
        Invalidations {
            seq: std::sync::atomic::AtomicU64::new(0),
            purged: std::sync::atomic::AtomicU64::new(0),
            tags: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
            marks: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
        }
    }

    /// The sequence number now; a fill notes it before calling the origin.
    pub(crate) fn now(&self) -> u64 {
        self.seq.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The next sequence number, for an invalidation happening now.
    fn next(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    async fn mark(&self, key: CacheKey) {
        self.marks.insert(key, self.next()).await;
    }

    async fn mark_tag(&self, tag: &str) {
        self.tags.insert(tag.to_owned(), self.next()).await;
    }

    fn mark_all(&self) {
        self.purged
            .store(self.next(), std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether `key`, or one of `tags`, or everything, was invalidated after `since`.
    pub(crate) async fn since(&self, key: &CacheKey, tags: &[String], since: u64) -> bool {
        if self.purged.load(std::sync::atomic::Ordering::SeqCst) > since {
            return true;
        }
        if self.marks.get(key).await.is_some_and(|seq| seq > since) {
            return true;
        }
        for tag in tags {
            if self.tags.get(tag).await.is_some_and(|seq| seq > since) {
                return true;
            }
        }
        false
    }
}

/// What a lookup found.
pub(crate) enum Lookup {
    Hit(Arc<CachedResponse>, Tier),
    Miss(MissKind),
}

/// Why a lookup missed, as `Cache-Status` `fwd` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MissKind {
    /// Nothing stored for the URL.
    Uri,
    /// Something stored for the URL, not for these `Vary`'d header values.
    Vary,
    /// The stored response is stale.
    Stale,
    /// The request's directives forbade using what is stored.
    Request,
}

impl MissKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MissKind::Uri => "uri-miss",
            MissKind::Vary => "vary-miss",
            MissKind::Stale => "stale",
            MissKind::Request => "request",
        }
    }
}

/// Per-key single-flight: the first miss for a key leads, the rest wait for its store
/// (or its failure) and look again.
#[derive(Default)]
pub(crate) struct SingleFlight {
    flights: Arc<Mutex<HashMap<CacheKey, watch::Receiver<()>>>>,
}

pub(crate) enum Flight {
    /// This request fetches; dropping the guard releases the followers.
    Leader(FlightGuard),
    /// Another request fetches; this one waits on the receiver.
    Follower(watch::Receiver<()>),
}

impl SingleFlight {
    pub(crate) fn join(&self, key: CacheKey) -> Flight {
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(rx) = flights.get(&key) {
            return Flight::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(());
        flights.insert(key, rx);
        Flight::Leader(FlightGuard {
            key,
            tx: Some(tx),
            flights: Arc::clone(&self.flights),
            on_release: None,
        })
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.flights.lock().map(|f| f.len()).unwrap_or(0)
    }
}

/// Held by a leader until its response is stored or known not to be; its drop wakes
/// every follower (their `changed()` ends when the sender goes).
pub(crate) struct FlightGuard {
    key: CacheKey,
    tx: Option<watch::Sender<()>>,
    flights: Arc<Mutex<HashMap<CacheKey, watch::Receiver<()>>>>,
    /// Gives back the cross-replica fill lease, when this flight holds one.
    on_release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl FlightGuard {
    /// Runs `release` when the flight ends (stored, not storable, or abandoned).
    pub(crate) fn on_release(&mut self, release: impl FnOnce() + Send + Sync + 'static) {
        self.on_release = Some(Box::new(release));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Some(release) = self.on_release.take() {
            release();
        }
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let (Some(rx), Some(tx)) = (flights.get(&self.key), self.tx.as_ref()) {
            if rx.same_channel(&tx.subscribe()) {
                flights.remove(&self.key);
            }
        }
        drop(flights);
        self.tx.take();
    }
}

/// Waits for a leader at most `timeout`; returns whether the leader finished in time.
pub(crate) async fn wait_for_leader(mut rx: watch::Receiver<()>, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, rx.changed()).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lookup_future_stays_small() {
        // Every request through a layer with Redis allocates one: a read's own future
        // (fred's command, the breaker, the deadline) is boxed, not held inline.
        let cache = HybridCache::builder().build().await.unwrap();
        let (key, headers) = (CacheKey::from_bytes([1; 32]), HeaderMap::new());
        let lookup = cache.lookup(&key, &headers);
        let size = std::mem::size_of_val(&lookup);
        assert!(size < 4096, "a lookup's future takes {size} bytes");
    }

    #[tokio::test]
    async fn followers_are_released_when_the_leader_drops() {
        let flights = SingleFlight::default();
        let key = CacheKey::from_bytes([1; 32]);
        let Flight::Leader(guard) = flights.join(key) else {
            panic!("first is leader")
        };
        let Flight::Follower(rx) = flights.join(key) else {
            panic!("second follows")
        };
        let waiter = tokio::spawn(wait_for_leader(rx, Duration::from_secs(60)));
        drop(guard);
        assert!(waiter.await.unwrap(), "released, not timed out");
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.join(key), Flight::Leader(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn followers_give_up_after_the_timeout() {
        let flights = SingleFlight::default();
        let key = CacheKey::from_bytes([2; 32]);
        let _guard = flights.join(key);
        let Flight::Follower(rx) = flights.join(key) else {
            panic!("second follows")
        };
        assert!(!wait_for_leader(rx, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn invalid_settings_are_clear_errors() {
        let err = HybridCache::builder()
            .namespace("a{b}")
            .build()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("namespace"), "{err}");
        let err = HybridCache::builder()
            .cache_status_name("1bad name")
            .build()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cache_status_name"), "{err}");
        assert!(HybridCache::builder()
            .namespace("jobs-api:prod")
            .build()
            .await
            .is_ok());
    }
}
