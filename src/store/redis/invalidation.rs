//! Removals in Redis and how every replica hears of them: a key's delete, a tag's
//! invalidation and a purge each leave a mark (so that no fill which started before
//! is written after), publish a message (so that every replica's memory forgets it),
//! and log it (so that a replica whose subscriber was away catches up).

use std::time::{Duration, SystemTime};

use fred::clients::Client;
use fred::prelude::*;
use fred::types::Expiration;

use super::{millis_i64, RedisStore};
use crate::entry::codec::millis_since_epoch;
use crate::key::CacheKey;
use crate::store::StoreError;
use crate::telemetry::TARGET;

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

/// Whether a log kept for `ttl` and trimmed at `now` still holds everything logged
/// since `since` (both in milliseconds since the epoch).
fn log_reaches(since: u64, now: u64, ttl: Duration) -> bool {
    now.saturating_sub(since) < duration_millis(ttl)
}

fn duration_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl RedisStore {
    /// How long marks live and the log reaches back, in milliseconds.
    fn invalidation_millis(&self) -> u64 {
        duration_millis(self.invalidation_ttl)
    }

    /// Sets an invalidation mark to now, for as long as a fill may still be running.
    async fn mark(&self, client: &Client, mark: String) -> Result<(), StoreError> {
        let now = millis_i64(millis_since_epoch(SystemTime::now()));
        let millis = millis_i64(self.invalidation_millis());
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
        self.mark(client, self.keys.gone_tag(tag)).await?;
        let index = self.keys.tag_index(tag);
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
            if let Some(key) = key.as_str().filter(|key| **key != purged) {
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
        let _: Result<(), _> = pipeline.pexpire(&log, millis_i64(keep), None).await;
        let _: Result<(), _> = pipeline
            .publish(self.keys.invalidation_channel(), message)
            .await;
        let sent: Result<Vec<Value>, _> = pipeline.try_all().await.into_iter().collect();
        if let Err(e) = sent {
            tracing::debug!(target: TARGET, error = %e, outcome = "invalidation-not-published");
        }
    }

    /// The invalidations logged since `since`; `None` when the log no longer reaches
    /// back that far (everything may have been invalidated).
    pub(crate) async fn logged_since(
        &self,
        since: SystemTime,
    ) -> Result<Option<Vec<Invalidation>>, StoreError> {
        let since = millis_since_epoch(since);
        let now = millis_since_epoch(SystemTime::now());
        if !log_reaches(since, now, self.invalidation_ttl) {
            return Ok(None);
        }
        let messages: Vec<String> = self
            .client()?
            .zrangebyscore(
                self.keys.invalidation_log(),
                millis_i64(since),
                "+inf",
                false,
                None,
            )
            .await
            .map_err(StoreError::command)?;
        Ok(Some(
            messages
                .iter()
                .filter_map(|message| Invalidation::parse(message))
                .collect(),
        ))
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
                Invalidation::parse(&invalidation.message()),
                Some(invalidation)
            );
        }
        for junk in ["", "k", "k 12", "t ", "x y", "pp"] {
            assert_eq!(Invalidation::parse(junk), None, "{junk:?}");
        }
    }
}
