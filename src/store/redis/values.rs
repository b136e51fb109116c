//! A batch of whole-value reads: one `MGET`, and what is done when Redis refuses it.
//!
//! Where a key holds another type (written by something else), `MGET` answers it as
//! absent where a `GET` of its own fails with `WRONGTYPE`: the lookup misses, and the
//! next store overwrites the key, as with a value that does not decode.

use bytes::Bytes;
use fred::clients::{Client, WithOptions};
use fred::prelude::*;

use super::batches::{self, KeyRead, Waiter};
use super::capabilities::refused;
use super::health::HealthState;
use super::StoreError;
use crate::telemetry::TARGET;

/// Answers each waiter with its key's value, read by one `MGET` (or one by one, if
/// Redis refuses it).
pub(super) async fn read(client: &WithOptions<Client>, health: &HealthState, batch: Vec<Waiter>) {
    let keys: Vec<&str> = batch.iter().map(Waiter::key).collect();
    match client.mget::<Vec<Option<Bytes>>, _>(keys).await {
        Ok(values) if values.len() == batch.len() => {
            for (waiter, value) in batch.into_iter().zip(values) {
                waiter.answer(Ok(KeyRead::batched(value)));
            }
        }
        Ok(values) => {
            // Not what `MGET` returns: no waiter is given another key's value.
            tracing::warn!(target: TARGET, keys = batch.len(), values = values.len(), "redis: a value batch came back with the wrong count");
            batches::fail_all(batch, StoreError::unavailable);
        }
        Err(error) if refused(&error) => {
            // The values are read one by one, once (lookups read alone from now on).
            tracing::warn!(target: TARGET, error = %error, "redis refuses MGET: lookups read values alone");
            health.refuse_value_batches();
            batches::read_each_whole(client, batch, |value| value).await;
        }
        // Redis unreachable, slow or busy: every lookup of the batch would be.
        Err(error) => batches::fail_all(batch, || StoreError::command(error.clone())),
    }
}
