//! The stored-entry decoder: never panics; what decodes re-encodes to itself.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tower_hybrid_cache::fuzz::entry_codec(data);
});
