//! When Redis last came back after an outage, as this replica saw it or as any
//! replica sharing the namespace told it: an entry stored before then may have missed
//! an invalidation that was never replayed (its replica restarted while Redis was
//! away), so it is served once more and refreshed, not trusted for its whole TTL.
//!
//! A replica that regains Redis (or first reaches it, having started without it)
//! records the time in `{ns}/outages` (`ZADD GT`: the score only moves forward); every
//! replica reads it back about once a second and adopts the latest.

use fred::interfaces::ClientLike;
use fred::types::{ClusterHash, CustomCommand, Value};

use super::keys::RedisKeys;

/// The member of `{ns}/outages` whose score is the latest recovery (ms since the epoch).
const MEMBER: &str = "recovered";

/// Records a recovery at `at` (ms since the epoch) unless a later one is recorded.
pub(crate) async fn publish<C: ClientLike>(client: &C, keys: &RedisKeys, at: u64) -> bool {
    let command = CustomCommand::new_static("ZADD", ClusterHash::FirstKey, false);
    let args = vec![
        keys.outages(),
        "GT".to_owned(),
        at.to_string(),
        MEMBER.to_owned(),
    ];
    client.custom::<Value, _>(command, args).await.is_ok()
}

/// The latest recovery any replica recorded, if one is.
pub(crate) async fn latest<C: ClientLike>(client: &C, keys: &RedisKeys) -> Option<u64> {
    let command = CustomCommand::new_static("ZSCORE", ClusterHash::FirstKey, false);
    let args = vec![keys.outages(), MEMBER.to_owned()];
    let score: Option<f64> = client.custom(command, args).await.ok()?;
    score
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| s as u64)
}
