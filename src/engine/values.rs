//! Application values (the direct cache API): serialised as JSON with serde, kept in
//! the same tiers as responses, under keys of their own kind, with the same fallback
//! and single-flight.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::flight::Flight;
use super::Engine;
use crate::entry::{Entry, StoredValue};
use crate::error::ValueError;
use crate::key::CacheKey;
use crate::telemetry::TARGET;

impl Engine {
    /// The fresh value under `key` that deserialises into `T`.
    pub(crate) async fn value<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let cache_key = CacheKey::for_value(key);
        let (entry, _) = self.store.get(&cache_key).await?;
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

    /// Stores `value` under `key` for `ttl`.
    pub(crate) async fn set_value<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), ValueError> {
        let bytes = serde_json::to_vec(value).map_err(ValueError::new)?;
        let now = SystemTime::now();
        let stale_until = now
            .checked_add(ttl)
            .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)));
        let entry = Entry::Value(Arc::new(StoredValue {
            bytes: Bytes::from(bytes),
            stale_until,
        }));
        self.store.put(CacheKey::for_value(key), entry, now);
        Ok(())
    }

    /// Deletes the value under `key` from both tiers, as an invalidation: a
    /// `produce` that started before it does not store its value, and a delete Redis
    /// cannot take now is kept and replayed.
    pub(crate) async fn delete_value(&self, key: &str) -> bool {
        self.invalidate_key(CacheKey::for_value(key)).await
    }

    /// The value under `key`, or the one `produce` makes (then stored for `ttl`), one
    /// `produce` at a time per key.
    pub(crate) async fn value_or_insert_with<T, E, F, Fut>(
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
        if let Some(value) = self.value(key).await {
            return Ok(value);
        }
        let guard = match self.flights.join(CacheKey::for_value(key)) {
            Flight::Leader(guard) => Some(guard),
            Flight::Follower(follower) => {
                follower.wait(self.single_flight_timeout).await;
                if let Some(value) = self.value(key).await {
                    return Ok(value);
                }
                None
            }
        };
        let value = produce().await?;
        if let Err(e) = self.set_value(key, &value, ttl).await {
            tracing::warn!(target: TARGET, error = %e, "produced value not stored");
        }
        drop(guard);
        Ok(value)
    }
}
