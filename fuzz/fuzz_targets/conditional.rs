//! Conditional requests: never panics; no 304 without a condition.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tower_hybrid_cache::fuzz::conditional(data);
});
