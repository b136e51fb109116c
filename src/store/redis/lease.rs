//! Fill leases: cross-replica single-flight. The first replica to miss a key takes
//! its lease (`SET NX PX` with a random token); the others wait for its entry.

use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};

use super::RedisStore;
use crate::key::CacheKey;
use crate::store::StoreError;

impl RedisStore {
    /// Takes the fill lease of `key` for `ttl` unless another replica holds it.
    pub(crate) async fn lease(
        &self,
        key: &CacheKey,
        token: u64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let set: Option<String> = self
            .client()?
            .set(
                self.keys.lease(key),
                token.to_string(),
                Some(Expiration::PX(millis)),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(StoreError::command)?;
        Ok(set.is_some())
    }

    /// Gives the lease back if it is still ours (it may have expired and been taken
    /// by another replica since).
    pub(crate) async fn release(&self, key: &CacheKey, token: u64) -> Result<(), StoreError> {
        let client = self.client()?;
        let lease = self.keys.lease(key);
        let holder: Option<String> = client
            .get(lease.clone())
            .await
            .map_err(StoreError::command)?;
        if holder.as_deref() == Some(token.to_string().as_str()) {
            let _: i64 = client.del(lease).await.map_err(StoreError::command)?;
        }
        Ok(())
    }
}
