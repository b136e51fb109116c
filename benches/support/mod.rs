//! What the HTTP benches share: reading their `--name value` options, and the runtime
//! they run on.

use std::future::Future;

/// The value after `--name` on the command line, if given.
pub(crate) fn option(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Runs `future` on a tokio runtime of two workers, as the server under test would
/// have on these two-core machines.
pub(crate) fn run_on_two_workers<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}
