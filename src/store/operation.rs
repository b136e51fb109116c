//! What passes through the Redis tier's tower stack: [`StoreRequest`] in,
//! [`StoreResponse`] or [`StoreError`] out. Public so that an application can put its
//! own tower layers on that stack (`HybridCacheBuilder::redis_layer`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service};

use crate::entry::Entry;
use crate::key::CacheKey;

/// One operation on the Redis tier. Every operation is idempotent (`GET`, a whole
/// value `SET … PX`, `DEL`), so the retry layer may send it again; it clones the
/// request to do so.
#[derive(Debug, Clone)]
pub struct StoreRequest {
    pub(crate) op: StoreOp,
    /// Attempts made before this one (the retry policy counts them), so that a retried
    /// read goes to another connection.
    pub(crate) attempt: u8,
}

#[derive(Debug, Clone)]
pub(crate) enum StoreOp {
    Get(CacheKey),
    /// A batch of writes, sent as one pipeline; each with the time its origin call
    /// started (an invalidation after it, on any replica, supersedes it).
    Set(Vec<(CacheKey, Entry, std::time::SystemTime)>),
    Delete(CacheKey),
    /// Remove every entry stored with this tag, and the tag's index.
    InvalidateTag(String),
    /// Remove every entry of this cache's namespace.
    PurgeAll,
    /// Take the cross-replica fill lease of a key (`SET NX PX` with a token).
    Lease(CacheKey, u64, std::time::Duration),
    /// Give a lease back, if it is still ours.
    Release(CacheKey, u64),
}

/// The kind of a [`StoreRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreOperation {
    /// Read the entry under one key.
    Get,
    /// Write a batch of entries (the background writer's pipeline).
    Set,
    /// Remove the entry under one key.
    Delete,
    /// Remove the entries stored with a tag (`HybridCache::invalidate_tag`).
    InvalidateTag,
    /// Remove every entry of the namespace (`HybridCache::purge_all`).
    PurgeAll,
    /// Take a key's fill lease (`HybridCacheBuilder::redis_fill_lease`).
    Lease,
    /// Give a fill lease back.
    Release,
}

impl StoreRequest {
    pub(crate) fn get(key: CacheKey) -> Self {
        StoreRequest {
            op: StoreOp::Get(key),
            attempt: 0,
        }
    }

    pub(crate) fn set(entries: Vec<(CacheKey, Entry, std::time::SystemTime)>) -> Self {
        StoreRequest {
            op: StoreOp::Set(entries),
            attempt: 0,
        }
    }

    pub(crate) fn delete(key: CacheKey) -> Self {
        StoreRequest {
            op: StoreOp::Delete(key),
            attempt: 0,
        }
    }

    pub(crate) fn invalidate_tag(tag: &str) -> Self {
        StoreRequest {
            op: StoreOp::InvalidateTag(tag.to_owned()),
            attempt: 0,
        }
    }

    pub(crate) fn purge_all() -> Self {
        StoreRequest {
            op: StoreOp::PurgeAll,
            attempt: 0,
        }
    }

    pub(crate) fn lease(key: CacheKey, token: u64, ttl: std::time::Duration) -> Self {
        StoreRequest {
            op: StoreOp::Lease(key, token, ttl),
            attempt: 0,
        }
    }

    pub(crate) fn release(key: CacheKey, token: u64) -> Self {
        StoreRequest {
            op: StoreOp::Release(key, token),
            attempt: 0,
        }
    }

    /// Returns what the request does.
    pub fn operation(&self) -> StoreOperation {
        match self.op {
            StoreOp::Get(_) => StoreOperation::Get,
            StoreOp::Set(_) => StoreOperation::Set,
            StoreOp::Delete(_) => StoreOperation::Delete,
            StoreOp::InvalidateTag(_) => StoreOperation::InvalidateTag,
            StoreOp::PurgeAll => StoreOperation::PurgeAll,
            StoreOp::Lease(..) => StoreOperation::Lease,
            StoreOp::Release(..) => StoreOperation::Release,
        }
    }

    /// Returns the keys it names: one for `Get` and `Delete`, the batch's for `Set`, none for
    /// the operations that find their keys in Redis.
    pub fn keys(&self) -> Vec<CacheKey> {
        match &self.op {
            StoreOp::Get(key)
            | StoreOp::Delete(key)
            | StoreOp::Lease(key, ..)
            | StoreOp::Release(key, _) => vec![*key],
            StoreOp::Set(entries) => entries.iter().map(|(key, ..)| *key).collect(),
            StoreOp::InvalidateTag(_) | StoreOp::PurgeAll => Vec::new(),
        }
    }
}

/// The answer to a [`StoreRequest`].
#[derive(Debug)]
pub struct StoreResponse {
    pub(crate) answer: StoreAnswer,
}

#[derive(Debug)]
pub(crate) enum StoreAnswer {
    /// What `Get` found; `None` for absent or unreadable.
    Found(Option<Entry>),
    Written {
        written: usize,
        failed: usize,
    },
    Deleted,
    Removed(usize),
    Leased(bool),
}

/// What a [`StoreResponse`] says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreOutcome {
    /// `Get` found a readable entry.
    Hit,
    /// `Get` found nothing, or a value that is not ours (counted as a miss).
    Miss,
    /// `Set`: how many entries Redis took, and how many it refused with an error
    /// reply (`OOM`). Entries already expired or over the size limit are in neither.
    Written {
        /// Entries stored.
        written: usize,
        /// Entries refused by an error reply.
        failed: usize,
    },
    /// `Delete` is done (whether or not the key existed).
    Deleted,
    /// `InvalidateTag` or `PurgeAll`: how many keys were removed.
    Removed {
        /// Keys removed.
        count: usize,
    },
    /// `Lease`: whether this replica took it (`false`: another holds it); `Release`
    /// answers `Deleted`.
    Leased {
        /// Taken.
        taken: bool,
    },
}

impl StoreResponse {
    pub(crate) fn new(answer: StoreAnswer) -> Self {
        StoreResponse { answer }
    }

    /// Returns what happened.
    pub fn outcome(&self) -> StoreOutcome {
        match &self.answer {
            StoreAnswer::Found(Some(_)) => StoreOutcome::Hit,
            StoreAnswer::Found(None) => StoreOutcome::Miss,
            StoreAnswer::Written { written, failed } => StoreOutcome::Written {
                written: *written,
                failed: *failed,
            },
            StoreAnswer::Deleted => StoreOutcome::Deleted,
            StoreAnswer::Removed(count) => StoreOutcome::Removed { count: *count },
            StoreAnswer::Leased(taken) => StoreOutcome::Leased { taken: *taken },
        }
    }
}

/// Why an operation on the Redis tier failed. The cache then goes on without Redis
/// (memory for reads, memory only for writes).
///
/// Errors reach the layers around the store boxed (`tower::BoxError`); find this one
/// with `error.downcast_ref::<StoreError>()`.
#[derive(Debug)]
pub struct StoreError {
    repr: Repr,
}

#[derive(Debug)]
enum Repr {
    /// No pooled connection is believed healthy: Redis was not asked.
    Unavailable,
    /// Redis or fred answered with an error (timeouts included).
    Command(fred::error::Error),
}

/// The kind of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// No connection is believed healthy, so Redis was not asked.
    Unavailable,
    /// The connection failed under the command (IO error, closed, reconnecting).
    Connection,
    /// No answer within the per-command timeout.
    Timeout,
    /// Redis is loading, failing over or resharding (`LOADING`, `TRYAGAIN`,
    /// `CLUSTERDOWN`, `MASTERDOWN`, and `READONLY` from a primary just demoted).
    Busy,
    /// Redis refused the command (`OOM`, `WRONGTYPE`, `NOPERM`, auth errors): it is up
    /// and answering.
    Reply,
}

/// Reply prefixes that say Redis will take the command again shortly.
const BUSY_REPLIES: [&str; 5] = [
    "LOADING",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
];

impl StoreError {
    pub(crate) fn unavailable() -> Self {
        StoreError {
            repr: Repr::Unavailable,
        }
    }

    pub(crate) fn command(error: fred::error::Error) -> Self {
        StoreError {
            repr: Repr::Command(error),
        }
    }

    /// Returns what went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        use fred::error::ErrorKind;
        let Repr::Command(error) = &self.repr else {
            return StoreErrorKind::Unavailable;
        };
        match error.kind() {
            ErrorKind::IO | ErrorKind::Canceled => StoreErrorKind::Connection,
            ErrorKind::Timeout => StoreErrorKind::Timeout,
            _ if BUSY_REPLIES
                .iter()
                .any(|prefix| error.details().starts_with(prefix)) =>
            {
                StoreErrorKind::Busy
            }
            _ => StoreErrorKind::Reply,
        }
    }

    /// Returns whether the same operation may succeed if sent again in a moment: connection
    /// failures, timeouts and a busy server. Not: no healthy connection (a retry within
    /// milliseconds will not find one) and error replies.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind(),
            StoreErrorKind::Connection | StoreErrorKind::Timeout | StoreErrorKind::Busy
        )
    }

    /// Returns whether it says Redis is unreachable or unwell, as opposed to an error reply
    /// from a Redis that is up; what the Redis tier's breaker counts by default.
    pub fn is_outage(&self) -> bool {
        self.kind() != StoreErrorKind::Reply
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.repr {
            Repr::Unavailable => None,
            Repr::Command(e) => Some(e),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Unavailable => f.write_str("redis: no healthy connection"),
            Repr::Command(e) => write!(f, "redis: {e}"),
        }
    }
}

/// The Redis tier as the layers added with `HybridCacheBuilder::redis_layer` see it: the
/// store, wrapped in the layers added after theirs. Errors are boxed; the store's own
/// are [`StoreError`].
#[derive(Clone)]
pub struct RedisTierService {
    inner: BoxCloneSyncService<StoreRequest, StoreResponse, BoxError>,
}

impl RedisTierService {
    pub(crate) fn new<S>(service: S) -> Self
    where
        S: Service<StoreRequest, Response = StoreResponse> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        use tower::ServiceExt;
        RedisTierService {
            inner: BoxCloneSyncService::new(service.map_err(Into::into)),
        }
    }
}

impl fmt::Debug for RedisTierService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTierService").finish_non_exhaustive()
    }
}

impl Service<StoreRequest> for RedisTierService {
    type Response = StoreResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<StoreResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: StoreRequest) -> Self::Future {
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::error::{Error, ErrorKind};

    fn command(kind: ErrorKind, details: &'static str) -> StoreError {
        StoreError::command(Error::new(kind, details))
    }

    #[test]
    fn errors_are_classified_by_kind_and_reply() {
        let cases = [
            (command(ErrorKind::IO, "reset"), StoreErrorKind::Connection),
            (
                command(ErrorKind::Canceled, "fail fast"),
                StoreErrorKind::Connection,
            ),
            (
                command(ErrorKind::Timeout, "timed out"),
                StoreErrorKind::Timeout,
            ),
            (
                command(ErrorKind::Unknown, "LOADING dataset"),
                StoreErrorKind::Busy,
            ),
            (
                command(ErrorKind::Unknown, "TRYAGAIN keys"),
                StoreErrorKind::Busy,
            ),
            (
                command(ErrorKind::Unknown, "CLUSTERDOWN down"),
                StoreErrorKind::Busy,
            ),
            (
                command(ErrorKind::Unknown, "MASTERDOWN link"),
                StoreErrorKind::Busy,
            ),
            (
                command(
                    ErrorKind::Unknown,
                    "READONLY You can't write against a read only replica.",
                ),
                StoreErrorKind::Busy,
            ),
            (
                command(ErrorKind::Unknown, "OOM not allowed"),
                StoreErrorKind::Reply,
            ),
            (command(ErrorKind::Auth, "WRONGPASS"), StoreErrorKind::Reply),
            (
                command(ErrorKind::InvalidCommand, "ERR unknown"),
                StoreErrorKind::Reply,
            ),
            (StoreError::unavailable(), StoreErrorKind::Unavailable),
        ];
        for (error, kind) in cases {
            assert_eq!(error.kind(), kind, "{error}");
            let transient = matches!(
                kind,
                StoreErrorKind::Connection | StoreErrorKind::Timeout | StoreErrorKind::Busy
            );
            assert_eq!(error.is_transient(), transient, "{error}");
            assert_eq!(error.is_outage(), kind != StoreErrorKind::Reply, "{error}");
        }
    }

    #[test]
    fn requests_name_their_operation_and_keys() {
        let key = CacheKey::from_bytes([7; 32]);
        assert_eq!(StoreRequest::get(key).operation(), StoreOperation::Get);
        assert_eq!(StoreRequest::delete(key).keys(), vec![key]);
        let batch = StoreRequest::set(Vec::new());
        assert_eq!(batch.operation(), StoreOperation::Set);
        assert!(batch.keys().is_empty());
        assert_eq!(
            StoreResponse::new(StoreAnswer::Found(None)).outcome(),
            StoreOutcome::Miss
        );
    }
}
