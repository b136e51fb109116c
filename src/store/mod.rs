//! Where entries live: the memory tier (quick_cache) and, when configured, the shared Redis
//! tier, routed by the hybrid store.
//!
//! The Redis tier is a `tower::Service<StoreRequest>`, so that resilience (a breaker
//! outside a deadline outside a retry) is stacked around it as ordinary layers, and
//! an application can add its own with
//! [`HybridCacheBuilder::redis_layer`](crate::HybridCacheBuilder::redis_layer). This
//! module's public items are what such a layer sees, and how Redis is configured and
//! observed.

mod coherence;
pub(crate) mod hybrid;
pub(crate) mod memory;
mod operation;
mod pending;
mod read_flights;
pub(crate) mod redis;
pub(crate) mod redis_tier;
mod replay;
mod reseed;
mod writer;

pub(crate) use hybrid::HybridStore;
pub use operation::{
    RedisTierService, StoreError, StoreErrorKind, StoreOperation, StoreOutcome, StoreRequest,
    StoreResponse,
};
pub(crate) use operation::{StoreAnswer, StoreOp};
pub use redis::{RedisConfig, RedisHealth};

/// Resolves once the Redis store says it is closing (`true`) or is gone (the sender
/// dropped): the tasks that follow its connections end on it.
pub(crate) async fn until_closed(closed: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = closed.wait_for(|closed| *closed).await;
}

/// The tier that answered a lookup; named in `Cache-Status` as `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    /// The in-process cache.
    Memory,
    /// The shared Redis tier.
    Redis,
}

impl Tier {
    /// The name used in `Cache-Status` (`detail=memory`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Redis => "redis",
        }
    }
}
