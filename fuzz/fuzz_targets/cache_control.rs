//! The Cache-Control parser: never panics; every delta within the cap.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tower_hybrid_cache::fuzz::cache_control(data);
});
