//! The cache's knobs as command-line flags, each also read from an environment
//! variable, shared by the examples: [`CacheFlags`] builds the `HybridCache` (memory,
//! Redis, breaker), [`RouteFlags`] the layer every route starts from. A flag left
//! out keeps the library's default, which its help text gives.

use std::time::Duration;

use http::HeaderName;
use tower_hybrid_cache::breaker::CircuitBreakerLayer;
use tower_hybrid_cache::layer::KeyAuthority;
use tower_hybrid_cache::{BuildError, HybridCache, HybridCacheLayer, RedisConfig};

/// How the cache is built: its memory tier, its Redis tier, its breaker.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Cache")]
pub struct CacheFlags {
    /// Redis to share entries through (`redis://`, `rediss://`, `redis-sentinel://`,
    /// `redis-cluster://`); unset or empty: memory only.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel: replicas that share entries use the
    /// same one.
    #[arg(long, env = "CACHE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Memory tier's capacity in bytes (entries weighed by what they hold).
    #[arg(long, env = "CACHE_MEMORY_BYTES", default_value_t = 256 << 20)]
    pub memory_capacity_bytes: u64,
    /// Serve Redis hits from memory for this long before asking Redis again (a
    /// replica may serve another's replacement that late); 0: always ask Redis.
    #[arg(long, env = "CACHE_NEAR_CACHE", value_parser = duration, default_value = "0s")]
    pub near_cache: Duration,
    /// Across replicas, one fetches a missed URL and the others wait up to this long
    /// for its entry; 0: off.
    #[arg(long, env = "CACHE_FILL_LEASE", value_parser = duration, default_value = "0s")]
    pub fill_lease: Duration,
    /// With Redis away, serve nothing from memory out of touch for longer than this;
    /// unset: no bound.
    #[arg(long, env = "CACHE_FALLBACK_MAX_STALENESS", value_parser = duration)]
    pub fallback_max_staleness: Option<Duration>,
    /// Longest a request waits for another's origin call to the same URL (library
    /// default 5s).
    #[arg(long, env = "CACHE_SINGLE_FLIGHT_TIMEOUT", value_parser = duration)]
    pub single_flight_timeout: Option<Duration>,
    /// The cache's name in `Cache-Status` (library default `tower-hybrid-cache`).
    #[arg(long, env = "CACHE_STATUS_NAME")]
    pub cache_status_name: Option<String>,
    /// Most a request waits on one Redis operation, retries included (library
    /// default 50ms).
    #[arg(long, env = "REDIS_DEADLINE", value_parser = duration)]
    pub redis_deadline: Option<Duration>,
    /// Most fred waits for one command's reply (library default 50ms).
    #[arg(long, env = "REDIS_COMMAND_TIMEOUT", value_parser = duration)]
    pub redis_command_timeout: Option<Duration>,
    /// Longest a connection attempt may take (library default 500ms).
    #[arg(long, env = "REDIS_CONNECT_TIMEOUT", value_parser = duration)]
    pub redis_connect_timeout: Option<Duration>,
    /// Retries after a transient Redis error (library default 1).
    #[arg(long, env = "REDIS_RETRIES")]
    pub redis_retries: Option<u32>,
    /// Share of the last 10 s of operations retries may add (library default 0.2).
    #[arg(long, env = "REDIS_RETRY_BUDGET")]
    pub redis_retry_budget: Option<f32>,
    /// Connections in the pool (library default 4).
    #[arg(long, env = "REDIS_POOL_SIZE")]
    pub redis_pool_size: Option<usize>,
    /// Largest encoded entry sent to Redis; larger ones stay in memory (library
    /// default 1 MiB).
    #[arg(long, env = "REDIS_MAX_VALUE_BYTES")]
    pub redis_max_value_bytes: Option<usize>,
    /// Operations queued for the background writer before one is dropped (library
    /// default 1024).
    #[arg(long, env = "REDIS_WRITE_QUEUE")]
    pub redis_write_queue: Option<usize>,
    /// How often each connection is sent a PING (library default 250ms).
    #[arg(long, env = "REDIS_PROBE_INTERVAL", value_parser = duration)]
    pub redis_probe_interval: Option<Duration>,
    /// How long invalidations are remembered in Redis (library default 5m).
    #[arg(long, env = "REDIS_INVALIDATION_TTL", value_parser = duration)]
    pub redis_invalidation_ttl: Option<Duration>,
    /// Failures in a row that open the breaker around Redis (library default 5).
    #[arg(long, env = "BREAKER_CONSECUTIVE_FAILURES")]
    pub breaker_consecutive_failures: Option<u32>,
    /// How long the breaker stays open at first, doubling up to 30x (library
    /// default 1s, at most 30s).
    #[arg(long, env = "BREAKER_OPEN_FOR", value_parser = duration)]
    pub breaker_open_for: Option<Duration>,
}

/// Reads `250ms`, `5s`, `2m`, `1h 30m`.
fn duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

impl CacheFlags {
    /// The Redis URL, if one is set and not empty (an empty variable means unset).
    pub fn redis_url(&self) -> Option<&str> {
        self.redis_url
            .as_deref()
            .filter(|url| !url.trim().is_empty())
    }

    /// Builds the cache these flags describe, in `default_namespace` unless
    /// `--namespace` says otherwise.
    pub async fn build(&self, default_namespace: &str) -> Result<HybridCache, BuildError> {
        let mut builder = HybridCache::builder()
            .namespace(self.namespace.as_deref().unwrap_or(default_namespace))
            .memory_capacity_bytes(self.memory_capacity_bytes);
        if let Some(timeout) = self.single_flight_timeout {
            builder = builder.single_flight_timeout(timeout);
        }
        if let Some(name) = &self.cache_status_name {
            builder = builder.cache_status_name(name.clone());
        }
        if let Some(url) = self.redis_url() {
            builder = builder.redis(self.redis_config(url));
            if !self.near_cache.is_zero() {
                builder = builder.near_cache(self.near_cache);
            }
            if !self.fill_lease.is_zero() {
                builder = builder.redis_fill_lease(self.fill_lease);
            }
            if let Some(bound) = self.fallback_max_staleness {
                builder = builder.fallback_max_staleness(bound);
            }
            if let Some(breaker) = self.breaker() {
                builder = builder.redis_breaker(breaker);
            }
        }
        builder.build().await
    }

    fn redis_config(&self, url: &str) -> RedisConfig {
        let mut config = RedisConfig::new(url);
        if let Some(deadline) = self.redis_deadline {
            config = config.deadline(deadline);
        }
        if let Some(timeout) = self.redis_command_timeout {
            config = config.command_timeout(timeout);
        }
        if let Some(timeout) = self.redis_connect_timeout {
            config = config.connect_timeout(timeout);
        }
        if let Some(retries) = self.redis_retries {
            config = config.retries(retries);
        }
        if let Some(share) = self.redis_retry_budget {
            config = config.retry_budget(share);
        }
        if let Some(size) = self.redis_pool_size {
            config = config.pool_size(size);
        }
        if let Some(bytes) = self.redis_max_value_bytes {
            config = config.max_value_bytes(bytes);
        }
        if let Some(len) = self.redis_write_queue {
            config = config.write_queue(len);
        }
        if let Some(every) = self.redis_probe_interval {
            config = config.probe_interval(every);
        }
        if let Some(ttl) = self.redis_invalidation_ttl {
            config = config.invalidation_ttl(ttl);
        }
        config
    }

    /// The breaker the flags ask for; `None` keeps the library's.
    fn breaker(&self) -> Option<CircuitBreakerLayer> {
        if self.breaker_consecutive_failures.is_none() && self.breaker_open_for.is_none() {
            return None;
        }
        let mut breaker = CircuitBreakerLayer::new();
        if let Some(n) = self.breaker_consecutive_failures {
            breaker = breaker.consecutive_failures(n);
        }
        if let Some(base) = self.breaker_open_for {
            breaker = breaker.open_for(base, base.saturating_mul(30));
        }
        Some(breaker)
    }
}

/// What every route's layer starts from (a route's own TTL goes on top).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Routes")]
pub struct RouteFlags {
    /// Largest response body stored; larger ones stream through (library default
    /// 1 MiB).
    #[arg(long, env = "CACHE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest `QUERY` content read to key it; 0: `QUERY` passes through (library
    /// default 64 KiB).
    #[arg(long, env = "CACHE_MAX_QUERY_BYTES")]
    pub max_query_bytes: Option<usize>,
    /// Serve a stored response this long past its freshness when the origin fails,
    /// unless it says otherwise; 0: not at all.
    #[arg(long, env = "CACHE_STALE_IF_ERROR", value_parser = duration, default_value = "60s")]
    pub stale_if_error: Duration,
    /// Serve a stale response this long past its freshness while it is refreshed
    /// in the background; 0: not at all.
    #[arg(long, env = "CACHE_STALE_WHILE_REVALIDATE", value_parser = duration, default_value = "0s")]
    pub stale_while_revalidate: Duration,
    /// Targeted cache-control fields obeyed in this order (RFC 9213), comma
    /// separated; empty: none.
    #[arg(
        long,
        env = "CACHE_TARGETED_CACHE_CONTROL",
        value_delimiter = ',',
        default_value = "cdn-cache-control,tower-hybrid-cache-control"
    )]
    pub targeted_cache_control: Vec<String>,
    /// `true`: pass every targeted field on to clients; `false`: none. Unset: all
    /// but `Tower-Hybrid-Cache-Control`, which is for this cache alone.
    #[arg(long, env = "CACHE_FORWARD_TARGETED_CACHE_CONTROL")]
    pub forward_targeted_cache_control: Option<bool>,
    /// Whose the keys are: `request` (the request's `Host`), `none` (every host
    /// shares entries), or a fixed authority such as `api.example.com`.
    #[arg(long, env = "CACHE_KEY_AUTHORITY", default_value = "request")]
    pub key_authority: String,
    /// Query parameters left out of the key (`utm_*` patterns allowed), comma
    /// separated.
    #[arg(long, env = "CACHE_IGNORE_QUERY_PARAMS", value_delimiter = ',')]
    pub ignore_query_params: Vec<String>,
    /// Request headers added to the key (beyond what `Vary` asks), comma separated.
    #[arg(long, env = "CACHE_KEY_HEADERS", value_delimiter = ',')]
    pub key_headers: Vec<String>,
    /// Leave out the `Cache-Status` field.
    #[arg(long, env = "CACHE_NO_CACHE_STATUS")]
    pub no_cache_status: bool,
}

/// A flag that does not read.
#[derive(Debug)]
pub struct FlagError(String);

impl std::fmt::Display for FlagError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FlagError {}

fn header_names(names: &[String], flag: &str) -> Result<Vec<HeaderName>, FlagError> {
    names
        .iter()
        .map(|name| name.trim())
        .filter(|name| !name.is_empty())
        .map(|name| {
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|e| FlagError(format!("--{flag} {name}: {e}")))
        })
        .collect()
}

impl RouteFlags {
    /// `cache`'s layer with these flags applied.
    pub fn layer(&self, cache: &HybridCache) -> Result<HybridCacheLayer, FlagError> {
        let mut layer = cache
            .layer()
            .targeted_cache_control(header_names(
                &self.targeted_cache_control,
                "targeted-cache-control",
            )?)
            .key_authority(self.key_authority()?)
            .cache_status_header(!self.no_cache_status);
        if let Some(forward) = self.forward_targeted_cache_control {
            layer = layer.forward_targeted_cache_control(forward);
        }
        if let Some(bytes) = self.max_body_bytes {
            layer = layer.max_body_bytes(bytes);
        }
        if let Some(bytes) = self.max_query_bytes {
            layer = layer.max_query_bytes(bytes);
        }
        if !self.stale_if_error.is_zero() {
            layer = layer.stale_if_error(self.stale_if_error);
        }
        if !self.stale_while_revalidate.is_zero() {
            layer = layer.stale_while_revalidate(self.stale_while_revalidate);
        }
        let ignored: Vec<&str> = self
            .ignore_query_params
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .collect();
        if !ignored.is_empty() {
            layer = layer.ignore_query_params(ignored);
        }
        let keyed = header_names(&self.key_headers, "key-headers")?;
        if !keyed.is_empty() {
            layer = layer.key_headers(keyed);
        }
        Ok(layer)
    }

    fn key_authority(&self) -> Result<KeyAuthority, FlagError> {
        match self.key_authority.trim() {
            "request" => Ok(KeyAuthority::Request),
            "none" => Ok(KeyAuthority::None),
            fixed => fixed
                .parse::<http::uri::Authority>()
                .map(|authority| KeyAuthority::fixed(authority.as_str()))
                .map_err(|e| FlagError(format!("--key-authority {fixed}: {e}"))),
        }
    }
}
