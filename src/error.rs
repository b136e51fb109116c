//! The errors of the public API: building a cache, storing an application value,
//! decoding a stored entry.

use std::fmt;

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

/// A value could not be stored: it does not serialise (as JSON).
#[derive(Debug)]
pub struct ValueError {
    source: serde_json::Error,
}

impl ValueError {
    pub(crate) fn new(source: serde_json::Error) -> Self {
        ValueError { source }
    }
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "value does not serialise: {}", self.source)
    }
}

impl std::error::Error for ValueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}
