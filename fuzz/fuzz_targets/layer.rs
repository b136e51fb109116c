//! The whole layer over scripted requests and origin answers: never panics, never serves a body of another key.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tower_hybrid_cache::fuzz::layer(data);
});
