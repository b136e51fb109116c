//! When Redis last came back after an outage, as this replica saw it or as any
//! replica sharing the namespace told it: an entry stored before then may have missed
//! an invalidation that was never replayed (its replica restarted while Redis was
//! away), so it is served once more and refreshed, not trusted for its whole TTL.
//!
//! A replica that regains Redis (or first reaches it, having started without it)
//! records the time as the score of `recovered` in `{ns}/outages` (`ZADD GT`: it only
//! moves forward); every replica reads it back about once a second and adopts the
//! latest.
//!
//! A Redis that came back empty (restarted without persistence, a failover to a
//! replica that had not caught up) is told by the score of `epoch` in the same set: a
//! random number the first replica to find it absent sets (`ZADD NX`); a replica that
//! knew another one, or finds none where it knew one, knows Redis lost its data. Both
//! are read with one `ZMSCORE`.

use fred::interfaces::ClientLike;
use fred::types::{ClusterHash, CustomCommand, Value};
use tower::util::rng::{HasherRng, Rng};

use super::keys::RedisKeys;

/// The member whose score is the latest recovery (ms since the epoch).
const RECOVERED: &str = "recovered";
/// The member whose score is this Redis's epoch.
const EPOCH: &str = "epoch";

/// Records a recovery at `at` (ms since the epoch) unless a later one is recorded.
pub(crate) async fn publish<C: ClientLike>(client: &C, keys: &RedisKeys, at: u64) -> bool {
    let command = CustomCommand::new_static("ZADD", ClusterHash::FirstKey, false);
    let args = vec![
        keys.outages(),
        "GT".to_owned(),
        at.to_string(),
        RECOVERED.to_owned(),
    ];
    client.custom::<Value, _>(command, args).await.is_ok()
}

/// What `{ns}/outages` holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recorded {
    /// The latest recovery any replica recorded (ms since the epoch).
    pub(crate) recovered: Option<u64>,
    /// This Redis's epoch.
    pub(crate) epoch: Option<u64>,
}

/// A score as a whole number; anything else (junk, a negative, not finite) is none.
fn whole(score: Option<f64>) -> Option<u64> {
    score
        .filter(|s| s.is_finite() && *s >= 1.0 && *s < 9.0e15)
        .map(|s| s as u64)
}

/// Reads both scores in one command; `None` when Redis did not answer.
async fn read<C: ClientLike>(client: &C, keys: &RedisKeys) -> Option<Recorded> {
    let command = CustomCommand::new_static("ZMSCORE", ClusterHash::FirstKey, false);
    let args = vec![keys.outages(), RECOVERED.to_owned(), EPOCH.to_owned()];
    let scores: Vec<Option<f64>> = client.custom(command, args).await.ok()?;
    Some(Recorded {
        recovered: whole(scores.first().copied().flatten()),
        epoch: whole(scores.get(1).copied().flatten()),
    })
}

/// Reads what is recorded, setting an epoch if there is none (the first replica to
/// find it absent wins); `None` when Redis did not answer.
pub(crate) async fn read_and_keep_epoch<C: ClientLike>(
    client: &C,
    keys: &RedisKeys,
) -> Option<Recorded> {
    let recorded = read(client, keys).await?;
    if recorded.epoch.is_some() {
        return Some(recorded);
    }
    // Below 2^53: exact as a score.
    let fresh = 1 + HasherRng::default().next_u64() % (1 << 52);
    let command = CustomCommand::new_static("ZADD", ClusterHash::FirstKey, false);
    let args = vec![
        keys.outages(),
        "NX".to_owned(),
        fresh.to_string(),
        EPOCH.to_owned(),
    ];
    client.custom::<Value, _>(command, args).await.ok()?;
    read(client, keys).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_positive_scores_count() {
        assert_eq!(whole(Some(1_764_000_000_000.0)), Some(1_764_000_000_000));
        for junk in [
            None,
            Some(0.0),
            Some(-5.0),
            Some(f64::NAN),
            Some(f64::INFINITY),
            Some(1e300),
        ] {
            assert_eq!(whole(junk), None, "{junk:?}");
        }
    }
}
