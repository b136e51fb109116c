//! HTTP caching policy: what may be stored, for how long, what a request may be
//! served from the cache, and how stale responses are revalidated or served (RFC 9111,
//! RFC 5861, RFC 9213, RFC 9875). Pure functions over `http` types: no I/O, no state, no dependency on the
//! rest of the crate.

pub(crate) mod cache_control;
pub(crate) mod conditional;
pub(crate) mod freshness;
pub(crate) mod groups;
pub(crate) mod http_date;
pub(crate) mod presence;
pub(crate) mod range;
pub(crate) mod revalidation;
pub(crate) mod settings;
pub(crate) mod stale;
pub(crate) mod storable;
pub(crate) mod stored_fields;
pub(crate) mod structured;
pub(crate) mod targeted;

pub use settings::{KeyAuthority, RequestDirectives, TtlMode};
