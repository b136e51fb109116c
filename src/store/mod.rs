//! Where entries live: the memory tier (moka) and, when configured, the shared Redis
//! tier, routed by [`HybridStore`].
//!
//! The Redis tier is a `tower::Service<StoreRequest>`, so that resilience (a breaker
//! outside a retry outside a deadline) can be stacked around it as ordinary layers.

pub(crate) mod hybrid;
pub(crate) mod memory;
pub(crate) mod redis;
pub(crate) mod redis_health;

pub(crate) use hybrid::HybridStore;

use crate::entry::Entry;
use crate::CacheKey;

/// An operation on a store tier. Cloned when retried.
#[derive(Debug, Clone)]
pub(crate) enum StoreRequest {
    /// The entry under a key.
    Get(CacheKey),
    /// Write entries (a batch goes out as one pipeline).
    Set(Vec<(CacheKey, Entry)>),
    /// Remove the entry under a key.
    Delete(CacheKey),
}

/// The answer to a [`StoreRequest`].
#[derive(Debug)]
pub(crate) enum StoreResponse {
    /// What `Get` found; `None` for absent or unreadable.
    Found(Option<Entry>),
    /// How many of a `Set` batch were written, and how many failed.
    Written { written: usize, failed: usize },
    /// `Delete` is done.
    Deleted,
}

/// The tier that answered a lookup; named in `Cache-Status` as `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Tier {
    /// The in-process moka cache.
    Memory,
    /// The shared Redis tier.
    Redis,
}

impl Tier {
    /// The name used in `Cache-Status` (`detail=memory`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Redis => "redis",
        }
    }
}
