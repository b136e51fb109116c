//! Routing between tiers. With the memory tier alone, every operation goes to it.

use crate::entry::Entry;
use crate::CacheKey;

use super::memory::MemoryStore;
use super::Tier;

/// The tiers behind one [`HybridCache`](crate::HybridCache).
#[derive(Clone)]
pub(crate) struct HybridStore {
    memory: MemoryStore,
}

impl HybridStore {
    pub(crate) fn new(memory: MemoryStore) -> Self {
        HybridStore { memory }
    }

    pub(crate) fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    pub(crate) async fn get(&self, key: &CacheKey) -> Option<(Entry, Tier)> {
        self.memory
            .get(key)
            .await
            .map(|entry| (entry, Tier::Memory))
    }

    pub(crate) async fn put(&self, key: CacheKey, entry: Entry) {
        self.memory.insert(key, entry).await;
    }
}
