//! Resilience layers for the store stack. So far: the circuit breaker.

pub(crate) mod breaker;
