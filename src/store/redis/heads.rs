//! A batch of head reads: one `EVAL` of a script that runs a `GETRANGE` a key, and
//! what is done when Redis refuses it or answers it with an error.

use bytes::Bytes;
use fred::clients::{Client, WithOptions};
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, Value};

use super::batches::{self, KeyRead, Waiter};
use super::capabilities::refused;
use super::health::HealthState;
use super::StoreError;
use crate::entry::codec::VERSION_HEAD;
use crate::store::StoreErrorKind;
use crate::telemetry::TARGET;

/// The script: the first `VERSION_HEAD` bytes of each key, empty for an absent one.
const HEADS: &str =
    "local r = {} for i, k in ipairs(KEYS) do r[i] = redis.call('GETRANGE', k, 0, ARGV[1]) end return r";

/// Answers each waiter with its key's head, read by one script call (or one by one,
/// if Redis refuses the script or answers it with an error).
pub(super) async fn read(client: &WithOptions<Client>, health: &HealthState, batch: Vec<Waiter>) {
    let mut args = Vec::with_capacity(batch.len() + 3);
    args.push(Value::Bytes(Bytes::from_static(HEADS.as_bytes())));
    args.push(Value::Integer(
        i64::try_from(batch.len()).unwrap_or(i64::MAX),
    ));
    args.extend(batch.iter().map(|waiter| Value::from(waiter.key())));
    args.push(Value::Integer(i64::try_from(VERSION_HEAD - 1).unwrap_or(0)));
    let eval = CustomCommand::new_static("EVAL", ClusterHash::Offset(2), false);
    match client.custom::<Vec<Bytes>, _>(eval, args).await {
        Ok(heads) if heads.len() == batch.len() => {
            for (waiter, head) in batch.into_iter().zip(heads) {
                // Redis answers an absent key's range as empty; no stored value is.
                waiter.answer(Ok(KeyRead::batched((!head.is_empty()).then_some(head))));
            }
        }
        Ok(heads) => {
            // Not what the script returns: no waiter is given another key's head.
            tracing::warn!(target: TARGET, keys = batch.len(), heads = heads.len(), "redis: a head batch came back with the wrong count");
            batches::fail_all(batch, StoreError::unavailable);
        }
        Err(error) if refused(&error) => {
            // `EVAL`, or the `GETRANGE` in it: the values are read whole, once, and
            // their heads answered (lookups read alone from now on).
            tracing::warn!(target: TARGET, error = %error, "redis refuses the head script: lookups read heads alone");
            health.refuse_head_batches();
            let head = |value: Bytes| value.slice(..value.len().min(VERSION_HEAD));
            batches::read_each_whole(client, batch, head).await;
        }
        Err(error) if StoreError::command(error.clone()).kind() == StoreErrorKind::Reply => {
            // An error reply for the call as a whole (a key holding another type, say):
            // each key read alone, so that one key's error is its own lookup's only.
            let last = VERSION_HEAD - 1;
            let reads = batch
                .iter()
                .map(|waiter| Box::pin(client.getrange::<Bytes, _>(waiter.key(), 0, last)));
            let heads = futures_util::future::join_all(reads).await;
            for (waiter, head) in batch.into_iter().zip(heads) {
                let answer = head
                    .map(|head| KeyRead::alone((!head.is_empty()).then_some(head)))
                    .map_err(StoreError::command);
                waiter.answer(answer);
            }
        }
        // Redis unreachable, slow or busy: every lookup of the batch would be.
        Err(error) => batches::fail_all(batch, || StoreError::command(error.clone())),
    }
}
