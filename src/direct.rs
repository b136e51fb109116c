//! The direct cache API: application values (not HTTP responses) in the same tiers,
//! with the same fallback and namespace.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cache::{wait_for_leader, Flight};
use crate::entry::{Entry, StoredValue};
use crate::telemetry::TARGET;
use crate::{CacheKey, HybridCache};

/// A value could not be stored: it does not serialise (as JSON).
#[derive(Debug)]
pub struct ValueError {
    source: serde_json::Error,
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "value does not serialise: {}", self.source)
    }
}

impl std::error::Error for ValueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl CacheKey {
    /// The key of an application value: a digest of the caller's key, so no caller
    /// key can reach a storage key's syntax (length, separators, Redis hash tags).
    pub fn for_value(key: &str) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"value\0");
        hasher.update(key.as_bytes());
        CacheKey::from_bytes(*hasher.finalize().as_bytes())
    }
}

impl HybridCache {
    /// The value stored under `key`, if there is a fresh one that deserialises into
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
        let cache_key = CacheKey::for_value(key);
        let (entry, _) = self
            .inner
            .store
            .get(&cache_key, &self.inner.counters)
            .await?;
        let Entry::Value(value) = entry else {
            return None;
        };
        if value.stale_until <= SystemTime::now() {
            return None;
        }
        match serde_json::from_slice(&value.bytes) {
            Ok(value) => Some(value),
            Err(e) => {
                tracing::debug!(target: TARGET, key = %cache_key, error = %e, outcome = "value-of-another-type");
                None
            }
        }
    }

    /// Stores `value` under `key` for `ttl`, in memory at once and in Redis in the
    /// background.
    pub async fn set<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), ValueError> {
        let bytes = serde_json::to_vec(value).map_err(|source| ValueError { source })?;
        let stale_until = SystemTime::now()
            .checked_add(ttl)
            .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)));
        let entry = Entry::Value(Arc::new(StoredValue {
            bytes: Bytes::from(bytes),
            stale_until,
        }));
        self.inner
            .store
            .put(
                CacheKey::for_value(key),
                entry,
                SystemTime::now(),
                &self.inner.counters,
            )
            .await;
        Ok(())
    }

    /// Deletes the value under `key` from both tiers. Returns `false` when Redis could
    /// not be reached (the memory tier is cleared regardless).
    pub async fn delete(&self, key: &str) -> bool {
        self.inner
            .store
            .delete(&CacheKey::for_value(key), &self.inner.counters)
            .await
    }

    /// The value under `key`, or the one `produce` makes (then stored for `ttl`).
    /// Concurrent callers for one key wait for a single `produce` (up to the
    /// single-flight timeout); an error of `produce` is returned and nothing is stored.
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
        if let Some(value) = self.get(key).await {
            return Ok(value);
        }
        let guard = match self.inner.flights.join(CacheKey::for_value(key)) {
            Flight::Leader(guard) => Some(guard),
            Flight::Follower(rx) => {
                wait_for_leader(rx, self.inner.single_flight_timeout).await;
                if let Some(value) = self.get(key).await {
                    return Ok(value);
                }
                None
            }
        };
        let value = produce().await?;
        if let Err(e) = self.set(key, &value, ttl).await {
            tracing::warn!(target: TARGET, error = %e, "produced value not stored");
        }
        drop(guard);
        Ok(value)
    }
}
