//! Resilience layers for the Redis tier's service stack: the circuit breaker outside,
//! then one deadline for the whole operation, then retries of transient errors.

pub(crate) mod breaker;
pub(crate) mod retry;
