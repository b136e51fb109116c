//! When the examples stop: on SIGTERM (what a process manager or Kubernetes sends)
//! or Ctrl-C, they stop accepting, let requests in flight finish (for
//! [`ShutdownFlags::shutdown_grace`] at most), then close the cache's Redis
//! connections (`HybridCache::shutdown`).

use std::time::Duration;

/// How a stop goes.
#[derive(Debug, Clone, clap::Args)]
pub struct ShutdownFlags {
    /// How long requests in flight may take to finish after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn signal() {
    let interrupt = async {
        // No handler to install: wait for the other signal only.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
