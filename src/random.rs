//! Random numbers for the request path: cheap, per thread, and never the same twice
//! on one thread (an entry's edition, the retry budget's sampled deposits).

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

thread_local! {
    static NEXT: Cell<u64> = Cell::new(
        std::collections::hash_map::RandomState::new().build_hasher().finish(),
    );
}

/// Returns a random `u64`. Each thread steps a counter from a random start and mixes
/// it (SplitMix64, a bijection), so a thread never draws one twice and two threads or
/// processes share one with odds of about one in 2⁶⁴ a pair of draws; a hasher a
/// draw cost about 150 instructions more (BENCHMARKS, "A Redis hit reads the head of
/// what memory holds").
pub(crate) fn next_u64() -> u64 {
    let step = NEXT.with(|next| {
        let step = next.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        next.set(step);
        step
    });
    let mut z = step;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
