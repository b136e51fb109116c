//! Removals in Redis and how every replica hears of them: a key's delete, a tag's
//! invalidation and a purge each leave a mark (so that no fill which started before
//! is written after), publish a message (so that every replica's memory forgets it),
//! and log it (so that a replica whose subscriber was away catches up).

use std::time::{Duration, SystemTime};

use fred::clients::Client;
use fred::prelude::*;
use fred::types::sorted_sets::{ZRange, ZRangeBound, ZRangeKind};
use fred::types::{ClusterHash, CustomCommand, Expiration};

use super::{millis_i64, RedisStore};
use crate::entry::codec::millis_since_epoch;
use crate::key::CacheKey;
use crate::store::StoreError;
use crate::telemetry::TARGET;

/// Sets the mark `KEYS[1]` to `ARGV[1]` for `ARGV[2]` ms unless it holds a later
/// time. A command that reaches Redis late (held in a socket buffer while a link
/// hung, then sent) must not lower a mark another replica raised since: a fill that
/// started in between would be written over the newer invalidation.
const RAISE_MARK: &str = "\
local held = tonumber(redis.pcall('GET', KEYS[1])) or 0
if held >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1";

/// What an invalidation message says to forget.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Invalidation {
    Key(CacheKey),
    Tag(String),
    All,
}

impl Invalidation {
    pub(crate) fn message(&self) -> String {
        match self {
            Invalidation::Key(key) => format!("k {}", key.to_hex()),
            Invalidation::Tag(tag) => format!("t {tag}"),
            Invalidation::All => "p".to_owned(),
        }
    }

    /// The message as published: stamped with when it was sent (ms since the epoch),
    /// so that a listener can tell how long it took to arrive. The log keeps the
    /// plain message (its score is the time).
    pub(crate) fn stamped(&self, sent_at: u64) -> String {
        format!("@{sent_at} {}", self.message())
    }

    /// Reads a published message, stamped or not: the invalidation and when it was
    /// sent, if it says; `None` for anything else (another writer's junk).
    pub(crate) fn parse_published(message: &str) -> Option<(Self, Option<u64>)> {
        let stamped = message
            .strip_prefix('@')
            .and_then(|rest| rest.split_once(' '))
            .and_then(|(at, rest)| at.parse::<u64>().ok().map(|at| (at, rest)));
        match stamped {
            Some((at, rest)) => Self::parse(rest).map(|i| (i, Some(at))),
            None => Self::parse(message).map(|i| (i, None)),
        }
    }

    /// Reads a message; `None` for anything else (another writer's junk).
    pub(crate) fn parse(message: &str) -> Option<Self> {
        match message.split_once(' ') {
            Some(("k", hex)) => CacheKey::from_hex(hex).map(Invalidation::Key),
            Some(("t", tag)) if !tag.is_empty() => Some(Invalidation::Tag(tag.to_owned())),
            None if message == "p" => Some(Invalidation::All),
            _ => None,
        }
    }
}

/// Most messages the invalidation log holds: each publish trims the oldest past it,
/// so anonymous writes to distinct URLs cannot grow it without bound. A replica that
/// would need more than this to catch up forgets all of its memory instead (always
/// correct, and cheaper than reading them).
pub(crate) const MAX_LOGGED: usize = 10_000;
/// Messages read per command while catching up: each read stays small enough for the
/// command timeout.
const PAGE: usize = 1_000;

/// Whether a log kept for `ttl` and trimmed at `now` still holds everything logged
/// since `since` (both in milliseconds since the epoch).
fn log_reaches(since: u64, now: u64, ttl: Duration) -> bool {
    now.saturating_sub(since) < duration_millis(ttl)
}

/// The invalidations a page of the log names (anything else in it is junk, skipped).
fn invalidations(page: &[(String, f64)]) -> impl Iterator<Item = Invalidation> + '_ {
    page.iter()
        .filter_map(|(message, _)| Invalidation::parse(message))
}

/// A score as a range's bound for `ZRANGEBYSCORE`, from it (`Inclusive`) or past it
/// (`Exclusive`); an error for NaN, which no sorted set holds.
fn score_bound(score: f64, kind: ZRangeKind) -> Result<ZRange, StoreError> {
    let range = ZRangeBound::try_from(score).map_err(StoreError::command)?;
    Ok(ZRange { kind, range })
}

fn duration_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl RedisStore {
    /// How long marks live and the log reaches back, in milliseconds.
    fn invalidation_millis(&self) -> u64 {
        duration_millis(self.invalidation_ttl)
    }

    /// Sets an invalidation mark to now, for as long as a fill may still be running;
    /// a mark already later stays (by a script where Redis allows one).
    async fn mark(&self, client: &Client, mark: String) -> Result<(), StoreError> {
        let now = millis_i64(millis_since_epoch(SystemTime::now()));
        let millis = millis_i64(self.invalidation_millis());
        if self.health.scripts_allowed() {
            let args = vec![
                Value::Bytes(bytes::Bytes::from_static(RAISE_MARK.as_bytes())),
                Value::Integer(1),
                Value::from(mark.as_str()),
                Value::Integer(now),
                Value::Integer(millis),
            ];
            let eval = CustomCommand::new_static("EVAL", ClusterHash::Offset(2), false);
            match client.custom::<Value, _>(eval, args).await {
                Ok(_) => return Ok(()),
                Err(e) if super::capabilities::refused(&e) => {
                    tracing::warn!(target: TARGET, error = %e, "redis refuses the mark script: invalidation marks are set without their check");
                    self.health.refuse_scripts();
                }
                Err(e) => return Err(StoreError::command(e)),
            }
        }
        client
            .set::<(), _, _>(mark, now, Some(Expiration::PX(millis)), None, false)
            .await
            .map_err(StoreError::command)
    }

    /// Deletes the entry under `key`, and marks it invalidated so that no replica's
    /// fill that started earlier writes it back.
    pub(crate) async fn delete(&self, key: &CacheKey) -> Result<(), StoreError> {
        let client = self.healthy()?;
        self.mark(client, self.keys.gone(key)).await?;
        let _: i64 = client
            .with_options(&self.options)
            .del(self.keys.entry(key))
            .await
            .map_err(StoreError::command)?;
        self.publish(client, Invalidation::Key(*key).message())
            .await;
        Ok(())
    }

    /// Removes every key in the tag's index, then the index. Returns how many keys
    /// were removed.
    pub(crate) async fn invalidate_tag(&self, tag: &str) -> Result<usize, StoreError> {
        let client = self.healthy()?;
        let (mark, index) = self.keys.tag_names(tag);
        self.mark(client, mark).await?;
        let members: Vec<String> = client
            .smembers(index.clone())
            .await
            .map_err(StoreError::command)?;
        let removed = self.unlink(client, members).await?;
        let _: i64 = client.del(index).await.map_err(StoreError::command)?;
        self.publish(client, Invalidation::Tag(tag.to_owned()).message())
            .await;
        Ok(removed)
    }

    /// Removes every key of the namespace (entries and tag indexes), found with SCAN
    /// (on every primary of a cluster).
    pub(crate) async fn purge_all(&self) -> Result<usize, StoreError> {
        use futures_util::StreamExt;
        let client = self.healthy()?;
        // Marked first, as a key's or a tag's invalidation: a fill that started before
        // now either landed before the mark (and the SCAN finds it) or is refused by it.
        let purged = self.keys.purged();
        self.mark(client, purged.clone()).await?;
        // What says whether Redis lost its data, and when it last came back, is not
        // the cache's content.
        let kept = [purged.clone(), self.keys.outages()];
        let pattern = self.keys.every_key();
        let mut keys = if client.is_clustered() {
            client
                .scan_cluster_buffered(pattern, Some(1000), None)
                .boxed()
        } else {
            client.scan_buffered(pattern, Some(1000), None).boxed()
        };
        let mut batch = Vec::new();
        let mut removed = 0;
        while let Some(key) = keys.next().await {
            let key = key.map_err(StoreError::command)?;
            if let Some(key) = key.as_str().filter(|key| !kept.iter().any(|k| k == &**key)) {
                batch.push(key.to_owned());
            }
            if batch.len() >= 500 {
                removed += self.unlink(client, std::mem::take(&mut batch)).await?;
            }
        }
        removed += self.unlink(client, batch).await?;
        self.publish(client, Invalidation::All.message()).await;
        Ok(removed)
    }

    /// UNLINKs keys one command each (they may live in different cluster slots), in
    /// one pipeline.
    async fn unlink(&self, client: &Client, keys: Vec<String>) -> Result<usize, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let pipeline = client.pipeline();
        for key in keys {
            let _: Result<(), _> = pipeline.unlink(key).await;
        }
        let results: Vec<i64> = pipeline.all().await.map_err(StoreError::command)?;
        Ok(results.iter().filter(|n| **n > 0).count())
    }

    /// Tells every replica's memory what to forget (best effort: a near cache's local
    /// TTL bounds what a lost message costs), and logs it for replicas whose
    /// subscriber is reconnecting (read back by `logged_since`).
    async fn publish(&self, client: &Client, message: String) {
        let now = millis_since_epoch(SystemTime::now());
        let keep = self.invalidation_millis();
        let log = self.keys.invalidation_log();
        let pipeline = client.pipeline();
        // The message is the member: repeating an invalidation moves it, the log holds
        // each at most once.
        let _: Result<(), _> = pipeline
            .zadd(
                &log,
                None,
                None,
                false,
                false,
                (now as f64, message.as_str()),
            )
            .await;
        let _: Result<(), _> = pipeline
            .zremrangebyscore(&log, "-inf", millis_i64(now.saturating_sub(keep)))
            .await;
        let _: Result<(), _> = pipeline
            .zremrangebyrank(&log, 0, -(MAX_LOGGED as i64) - 1)
            .await;
        let _: Result<(), _> = pipeline.pexpire(&log, millis_i64(keep), None).await;
        let stamped = match Invalidation::parse(&message) {
            Some(invalidation) => invalidation.stamped(now),
            None => message,
        };
        let _: Result<(), _> = pipeline
            .publish(self.keys.invalidation_channel(), stamped)
            .await;
        let sent: Result<Vec<Value>, _> = pipeline.try_all().await.into_iter().collect();
        if let Err(e) = sent {
            tracing::debug!(target: TARGET, error = %e, outcome = "invalidation-not-published");
        }
    }

    /// The invalidations logged since `since`, read in pages of at most 1 000; `None`
    /// when the log no longer reaches back that far (by age, or because it was trimmed
    /// to its size), or holds more than [`MAX_LOGGED`] since then: everything may have
    /// been invalidated.
    pub(crate) async fn logged_since(
        &self,
        since: SystemTime,
    ) -> Result<Option<Vec<Invalidation>>, StoreError> {
        let since = millis_since_epoch(since);
        let now = millis_since_epoch(SystemTime::now());
        if !log_reaches(since, now, self.invalidation_ttl) {
            return Ok(None);
        }
        let client = self.client()?;
        let log = self.keys.invalidation_log();
        // How much there is to read, and whether the size trim reached into the window.
        let pipeline = client.pipeline();
        let _: () = pipeline
            .zcount(&log, millis_i64(since) as f64, f64::INFINITY)
            .await
            .map_err(StoreError::command)?;
        let _: () = pipeline.zcard(&log).await.map_err(StoreError::command)?;
        let _: () = pipeline
            .zrange(&log, 0, 0, None, false, None, true)
            .await
            .map_err(StoreError::command)?;
        let (count, size, oldest): (u64, u64, Vec<(String, f64)>) =
            pipeline.all().await.map_err(StoreError::command)?;
        let trimmed_into_window = size >= MAX_LOGGED as u64
            && oldest
                .first()
                .is_some_and(|(_, score)| *score > since as f64);
        if count > MAX_LOGGED as u64 || trimmed_into_window {
            return Ok(None);
        }
        let mut found = Vec::new();
        let mut from = score_bound(since as f64, ZRangeKind::Inclusive)?;
        // Pages by score, each from the last one's score (inclusive: a message read
        // twice is forgotten twice, which is harmless); bounded even if the log grows
        // while it is read.
        for _ in 0..=MAX_LOGGED / PAGE {
            let page: Vec<(String, f64)> = client
                .zrangebyscore(&log, from, f64::INFINITY, true, Some((0, PAGE as i64)))
                .await
                .map_err(StoreError::command)?;
            found.extend(invalidations(&page));
            let first = page.first().map(|(_, score)| *score);
            let last = page.last().map(|(_, score)| *score);
            from = match (first, last) {
                // A full page all of one score (a millisecond of more than a page of
                // messages): that score read whole, then on past it. Bounded: the
                // log held at most `MAX_LOGGED` since the window.
                (Some(first), Some(last)) if page.len() == PAGE && first == last => {
                    let same: Vec<(String, f64)> = client
                        .zrangebyscore(&log, last, last, true, None)
                        .await
                        .map_err(StoreError::command)?;
                    found.extend(invalidations(&same));
                    score_bound(last, ZRangeKind::Exclusive)?
                }
                (_, Some(last)) if page.len() == PAGE => score_bound(last, ZRangeKind::Inclusive)?,
                _ => return Ok(Some(found)),
            };
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_invalidation_log_reaches_back_as_long_as_it_is_kept() {
        let now = 1_000_000_000;
        let ttl = Duration::from_secs(300);
        let keep = duration_millis(ttl);
        assert!(log_reaches(now, now, ttl));
        assert!(log_reaches(now - keep + 1, now, ttl));
        assert!(!log_reaches(now - keep, now, ttl));
        assert!(!log_reaches(0, now, ttl));
        // A clock that went back: the window is in the future, the log holds it.
        assert!(log_reaches(now + 10, now, ttl));
    }

    #[test]
    fn invalidation_messages_roundtrip_and_junk_is_ignored() {
        for invalidation in [
            Invalidation::Key(CacheKey::from_bytes([7; 32])),
            Invalidation::Tag("company:7".to_owned()),
            Invalidation::All,
        ] {
            assert_eq!(
                Invalidation::parse_published(&invalidation.stamped(1_764_000_000_000)),
                Some((
                    Invalidation::parse(&invalidation.message()).unwrap(),
                    Some(1_764_000_000_000)
                ))
            );
            assert_eq!(
                Invalidation::parse_published(&invalidation.message()),
                Some((Invalidation::parse(&invalidation.message()).unwrap(), None)),
                "an unstamped message (an older replica's) still counts"
            );
            assert_eq!(
                Invalidation::parse(&invalidation.message()),
                Some(invalidation)
            );
        }
        // A tag may hold spaces: the stamp comes first.
        let spaced = Invalidation::Tag("search: berlin".to_owned());
        assert_eq!(
            Invalidation::parse_published(&spaced.stamped(5)),
            Some((Invalidation::Tag("search: berlin".to_owned()), Some(5)))
        );
        for junk in [
            "", "k", "k 12", "t ", "x y", "pp", "@", "@12", "@12 ", "@x k 00",
        ] {
            assert_eq!(Invalidation::parse(junk), None, "{junk:?}");
            assert_eq!(Invalidation::parse_published(junk), None, "{junk:?}");
        }
    }
}
