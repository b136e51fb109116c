//! The errors of the public API: building a cache, storing an application value,
//! decoding a stored entry.

use std::fmt;

pub use crate::engine::ValueError;
pub use crate::entry::DecodeError;

/// Why a [`HybridCache`](crate::HybridCache) could not be built: a setting is invalid.
///
/// Building never fails because a store is unreachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    message: String,
}

impl BuildError {
    pub(crate) fn invalid(setting: &str, why: impl fmt::Display) -> Self {
        BuildError {
            message: format!("invalid {setting}: {why}"),
        }
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BuildError {}
