//! The scan that completes a set of written keys: a task that scans Redis whenever
//! the set asks for it (once subscribed, after each loss), first proving the
//! subscription up with an echo; each page one script call (`scan_page.lua`) where
//! scripts are allowed, a `SCAN` and a pipeline of `PTTL`s where they are not.

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::scan::Scanner;
use fred::types::{ClusterHash, CustomCommand};

use super::{fingerprint_of_entry, fingerprint_of_hex, WrittenKeys, ECHO};
use crate::store::redis::RedisStore;
use crate::store::StoreError;
use crate::telemetry::TARGET;

/// Keys SCAN asks for a page (and PTTLs sent in one pipeline).
const SCAN_PAGE: u32 = 1000;
/// Keys a scripted page's SCAN asks for: Redis runs nothing else while a script
/// runs, and a page of 250 holds it about 0.4 ms (1.8 ms a page of 1 000: Redis's
/// CPU time over a scan of a million entries, `benches/written_scan.rs`).
const SCRIPTED_SCAN_PAGE: u32 = 250;

/// How a scripted scan failed: Redis answered the script with an error (not allowed
/// `EVAL`, or a command inside it; a server whose scripts must name their keys), and
/// an unscripted scan may do; or Redis did not answer.
enum ScanError {
    Refused(StoreError),
    Failed(StoreError),
}

/// One page of the scripted scan (`scan_page.lua`): `EVAL script 0 cursor pattern
/// count from`, answering the next cursor, then each entry's digits and `PTTL`.
const SCAN_PAGE_SCRIPT: &str = include_str!("scan_page.lua");

/// A scan page's reply read: the next cursor, and each entry's fingerprint and time
/// to live (`u64::MAX`: none). `None` when it is not such a reply (a cursor that is
/// not a number, a pair cut short); an entry whose digits are not 16 hex digits is
/// skipped, as the unscripted scan skips a name that is not an entry's.
fn scan_page(reply: Value) -> Option<(String, Vec<(u64, u64)>)> {
    let Value::Array(items) = reply else {
        return None;
    };
    let mut items = items.into_iter();
    let cursor = items.next()?.into_string()?;
    if cursor.is_empty() || !cursor.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut found = Vec::with_capacity(items.len() / 2);
    while let Some(digits) = items.next() {
        let ttl = items.next()?.as_i64()?;
        let Some(fingerprint) = digits.as_str().as_deref().and_then(fingerprint_of_hex) else {
            continue;
        };
        match ttl {
            // No time to live: not ours to expire.
            -1 => found.push((fingerprint, u64::MAX)),
            millis => {
                if let Ok(millis) = u64::try_from(millis) {
                    found.push((fingerprint, millis));
                }
            }
        }
    }
    Some((cursor, found))
}

/// Scans Redis whenever the set asks for it (a subscription up, a loss): each scan
/// that ends with nothing lost since it started completes the set. A scan that fails
/// or ends incomplete is followed by the next one after a backoff that starts at
/// `every` and doubles up to 64 times that. Ends with the store (told by `closed`,
/// as it may wait for a scan to be asked for long after the store is gone).
pub(super) fn spawn_scanner(
    store: std::sync::Weak<RedisStore>,
    written: std::sync::Arc<WrittenKeys>,
    every: Duration,
    mut closed: tokio::sync::watch::Receiver<bool>,
) {
    use tower::retry::backoff::{Backoff, ExponentialBackoffMaker, MakeBackoff};
    use tower::util::rng::HasherRng;
    let every = every.max(Duration::from_millis(1));
    let most = every.saturating_mul(64);
    let mut backoffs = ExponentialBackoffMaker::new(every, most, 0.5, HasherRng::default()).ok();
    tokio::spawn(async move {
        let mut backoff = backoffs.as_mut().map(MakeBackoff::make_backoff);
        loop {
            tokio::select! {
                () = written.rescan.notified() => {}
                () = crate::store::until_closed(&mut closed) => return,
            }
            // Until complete, or the subscription is lost (its return asks again).
            while let Some(start) = written.scan_start() {
                let Some(store) = store.upgrade() else {
                    return;
                };
                let scanned = match store.echo(&written, every).await {
                    Ok(true) => store.scan_written(&written, start).await,
                    Ok(false) => {
                        tracing::debug!(target: TARGET, outcome = "written-keys-not-subscribed");
                        written.unconfirmed(start);
                        continue;
                    }
                    Err(e) => Err(e),
                };
                drop(store);
                match scanned {
                    Ok(()) if written.scanned(start) => {
                        tracing::debug!(target: TARGET, outcome = "written-keys-complete");
                        backoff = backoffs.as_mut().map(MakeBackoff::make_backoff);
                        break;
                    }
                    // Something was lost meanwhile (too many keys, most likely).
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(target: TARGET, error = %e, outcome = "written-keys-scan-failed");
                    }
                }
                match backoff.as_mut() {
                    Some(backoff) => backoff.next_backoff().await,
                    None => tokio::time::sleep(every).await,
                }
            }
        }
    });
}
impl RedisStore {
    /// Publishes an echo on the written keys' channel and waits, at most `wait`, for
    /// the listener to hear it: whether this replica's subscription is up.
    async fn echo(&self, written: &WrittenKeys, wait: Duration) -> Result<bool, StoreError> {
        use tower::util::rng::{HasherRng, Rng};
        let echo = HasherRng::default().next_u64().max(1);
        let mut heard = written.echoes.subscribe();
        let client = self.client()?;
        let _: i64 = client
            .publish(self.written_channel.clone(), format!("{ECHO}{echo}"))
            .await
            .map_err(StoreError::command)?;
        Ok(
            tokio::time::timeout(wait, heard.wait_for(|last| *last == echo))
                .await
                .is_ok_and(|heard| heard.is_ok()),
        )
    }

    /// Records every entry Redis holds in `written`, with its time to live: a `SCAN`
    /// of the namespace's entries, page by page. Stops early once something was lost
    /// since `start` (more keys than the set holds, most likely): the scan could not
    /// complete the set then.
    ///
    /// Each page is one script call (`SCAN`, then a `PTTL` an entry, inside Redis)
    /// that answers each entry's 16 digits: a scan of a million entries cost this
    /// process 3.3 s of CPU as a `SCAN` and a pipeline of `PTTL`s a page, with fred
    /// handling each command and each name whole (BENCHMARKS.md, "Written keys").
    /// A Redis that refuses the script (an ACL user without `EVAL`) is scanned that
    /// way still.
    async fn scan_written(&self, written: &WrittenKeys, start: u64) -> Result<(), StoreError> {
        // Never a cluster's client: a cluster tracks nothing (`RedisStore::new`).
        let client = self.healthy()?;
        match self.scan_written_scripted(client, written, start).await {
            Err(ScanError::Refused(e)) => {
                tracing::debug!(target: TARGET, error = %e, outcome = "written-keys-scan-unscripted");
                self.scan_written_unscripted(client, written, start).await
            }
            Err(ScanError::Failed(e)) => Err(e),
            Ok(()) => Ok(()),
        }
    }

    /// [`scan_written`](Self::scan_written), a script call a page.
    async fn scan_written_scripted(
        &self,
        client: &Client,
        written: &WrittenKeys,
        start: u64,
    ) -> Result<(), ScanError> {
        let prefix = self.keys.entry_prefix();
        let pattern = Value::from(format!("{prefix}*"));
        // Where the digits start in a name, as Lua counts (from 1).
        let from = Value::Integer(
            i64::try_from(prefix.len())
                .unwrap_or(i64::MAX)
                .saturating_add(1),
        );
        let eval = CustomCommand::new_static("EVAL", ClusterHash::Random, false);
        let mut cursor = Value::from("0");
        loop {
            if *self.closing.borrow() {
                return Err(ScanError::Failed(StoreError::unavailable()));
            }
            if !written.unchanged_since(start) {
                return Ok(());
            }
            let args = vec![
                Value::Bytes(Bytes::from_static(SCAN_PAGE_SCRIPT.as_bytes())),
                Value::Integer(0),
                cursor,
                pattern.clone(),
                Value::Integer(i64::from(SCRIPTED_SCAN_PAGE)),
                from.clone(),
            ];
            let reply: Value = client.custom(eval.clone(), args).await.map_err(|e| {
                let error = StoreError::command(e);
                if error.is_outage() {
                    ScanError::Failed(error)
                } else {
                    ScanError::Refused(error)
                }
            })?;
            let (next, found) = scan_page(reply).ok_or_else(|| {
                ScanError::Failed(StoreError::command(fred::error::Error::new(
                    fred::error::ErrorKind::Parse,
                    "a scan page's reply is not a cursor and pairs of digits and times",
                )))
            })?;
            written.heard(found);
            if next == "0" {
                return Ok(());
            }
            cursor = Value::from(next);
        }
    }

    /// [`scan_written`](Self::scan_written) without a script: a `SCAN` a page, and
    /// its entries' `PTTL`s in one pipeline.
    async fn scan_written_unscripted(
        &self,
        client: &Client,
        written: &WrittenKeys,
        start: u64,
    ) -> Result<(), StoreError> {
        use futures_util::StreamExt;
        let prefix = self.keys.entry_prefix();
        let mut pages = client.scan(format!("{prefix}*"), Some(SCAN_PAGE), None);
        while let Some(page) = pages.next().await {
            let mut page = page.map_err(StoreError::command)?;
            if *self.closing.borrow() {
                page.cancel();
                return Err(StoreError::unavailable());
            }
            if !written.unchanged_since(start) {
                page.cancel();
                return Ok(());
            }
            let names: Vec<Key> = page.take_results().unwrap_or_default();
            let found: Vec<(u64, &Key)> = names
                .iter()
                .filter_map(|name| Some((fingerprint_of_entry(name.as_str()?, prefix)?, name)))
                .collect();
            if !found.is_empty() {
                let pipeline = client.pipeline();
                for (_, name) in &found {
                    let _: Result<(), _> = pipeline.pttl(*name).await;
                }
                let ttls: Vec<Value> = pipeline.all().await.map_err(StoreError::command)?;
                written.heard(
                    found
                        .iter()
                        .zip(ttls)
                        .filter_map(|((fingerprint, _), ttl)| {
                            match ttl.as_i64()? {
                                // No time to live: not ours to expire.
                                -1 => Some((*fingerprint, u64::MAX)),
                                millis => Some((*fingerprint, u64::try_from(millis).ok()?)),
                            }
                        }),
                );
            }
            page.next();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::CacheKey;

    fn key(first: u8) -> CacheKey {
        CacheKey::from_bytes([first; 32])
    }

    #[test]
    fn a_scan_page_reply_is_read_and_junk_in_it_skipped_or_refused() {
        let digits = |k: u8| Value::from(key(k).to_hex()[..16].to_owned());
        let page = |items: Vec<Value>| scan_page(Value::Array(items));
        let read = page(vec![
            Value::from("17"),
            digits(1),
            Value::Integer(5_000),
            digits(2),
            Value::Integer(-1),
            // Not 16 hex digits, a negative time other than "none": skipped.
            Value::from("zz"),
            Value::Integer(5),
            Value::from("\u{e9}".repeat(8)),
            Value::Integer(5),
            digits(3),
            Value::Integer(-7),
        ]);
        assert_eq!(
            read,
            Some((
                "17".to_owned(),
                vec![
                    (key(1).fingerprint(), 5_000),
                    (key(2).fingerprint(), u64::MAX)
                ]
            ))
        );
        assert_eq!(page(vec![Value::from("0")]), Some(("0".to_owned(), vec![])));
        for junk in [
            vec![],
            vec![Value::from("")],
            vec![Value::from("-1")],
            vec![Value::from("1x")],
            vec![Value::from("0"), digits(1)],
            vec![Value::from("0"), digits(1), Value::from("soon")],
            vec![Value::Array(vec![])],
        ] {
            assert_eq!(page(junk.clone()), None, "{junk:?}");
        }
        assert_eq!(scan_page(Value::from("0")), None);
        assert_eq!(scan_page(Value::Null), None);
    }
}
