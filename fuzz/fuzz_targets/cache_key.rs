//! Key canonicalisation: canonical paths and queries are fixed points.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tower_hybrid_cache::fuzz::cache_key(data);
});
