//! Where entries live: the memory tier (moka) and, when configured, the shared Redis
//! tier, routed by [`HybridStore`].

pub(crate) mod hybrid;
pub(crate) mod memory;
pub(crate) mod redis;
pub(crate) mod redis_health;

pub(crate) use hybrid::HybridStore;

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
