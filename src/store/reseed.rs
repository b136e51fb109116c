//! Re-seeding a Redis that lost its data (restarted empty, failed over to a replica
//! that had not caught up) from this replica's memory, instead of sending every
//! replica back to the origin at once.
//!
//! Entries go back only where Redis holds nothing (`SET NX`), in the writer's pipelines
//! (64 entries, 4 MiB of bodies at most), with their tags' indexes. Each was stored before Redis came back, so every replica
//! serves it once more and refreshes it (`detail=refresh-after-outage`, one refresh
//! per URL for the cluster): the origin sees one refresh per URL spread over the
//! requests' arrivals, not a stampede, and nothing invalidated during the outage is
//! trusted for its TTL. While the re-seed runs, a Redis miss falls back to memory.

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::until_closed;
use super::writer::SetRun;
use crate::entry::Entry;
use crate::telemetry::{Counter, Counters, TARGET};

/// Re-seeds Redis from `memory` each time the store finds it lost its data; ends when
/// the store closes or is gone.
pub(crate) fn spawn_reseed(store: Weak<RedisStore>, memory: MemoryStore, counters: Arc<Counters>) {
    let Some((signal, mut closed)) = store.upgrade().map(|s| (s.data_lost(), s.closed())) else {
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = signal.notified() => {}
                () = until_closed(&mut closed) => return,
            }
            let Some(store) = store.upgrade() else {
                return;
            };
            store.set_reseeding(true);
            let written = reseed(&store, &memory, &counters).await;
            store.set_reseeding(false);
            tracing::info!(target: TARGET, written, "re-seeded redis from memory");
        }
    });
}

/// Writes what memory holds where Redis holds nothing; returns how many entries were
/// written (stops early if Redis stops answering).
async fn reseed(store: &RedisStore, memory: &MemoryStore, counters: &Counters) -> usize {
    // When each entry's origin call started, as far as memory knows: an invalidation
    // marked since supersedes it.
    let sets = memory.entries().into_iter().map(|(key, entry)| {
        let started = match &entry {
            Entry::Response(response) => response.stored_at(),
            _ => SystemTime::UNIX_EPOCH,
        };
        (key, entry, started)
    });
    let mut run = SetRun::default();
    let mut batches = sets.filter_map(|set| run.push(set)).collect::<Vec<_>>();
    batches.push(run.take());
    let mut written = 0;
    for batch in batches.into_iter().filter(|batch| !batch.is_empty()) {
        match store.seed_many(&batch).await {
            Ok((count, _refused)) => {
                written += count;
                counters.add_n(Counter::RedisReseed, count);
            }
            Err(e) => {
                tracing::debug!(target: TARGET, error = %e, outcome = "reseed-stopped");
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    written
}
