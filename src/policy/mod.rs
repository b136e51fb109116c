//! HTTP caching policy: what may be stored, for how long, and what a request may be
//! served from the cache (RFC 9111).

pub(crate) mod cache_control;
pub(crate) mod conditional;
pub(crate) mod freshness;
pub(crate) mod settings;
pub(crate) mod storable;

pub use settings::{RequestDirectives, TtlMode, DEFAULT_MAX_BODY_BYTES, DEFAULT_TAG_HEADER};
