//! Where entries live. The memory tier is moka; the shared Redis tier slots in beside
//! it behind [`HybridStore`]'s get / put / delete, so the layer does not change when
//! it lands.

pub(crate) mod hybrid;
pub(crate) mod memory;

pub(crate) use hybrid::HybridStore;

/// The tier that answered a lookup; named in `Cache-Status` as `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Tier {
    /// The in-process moka cache.
    Memory,
}

impl Tier {
    /// The name used in `Cache-Status` (`detail=memory`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
        }
    }
}
