//! The example binaries as child processes, as a user runs them: where `cargo test`
//! built them, free ports to give them, a handle that kills the process on drop, and
//! a scratch SQLite database removed on drop.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;

/// A SQLite database file of this test process's under the temp directory, with its
/// `-wal` and `-shm` files: none there when made, removed again when dropped (each
/// run of the replica tests used to leave over 200 MB behind).
pub struct TempDatabase(PathBuf);

impl TempDatabase {
    /// `{temp}/{name}-{pid}.db`.
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{name}-{}.db", std::process::id()));
        let database = TempDatabase(path);
        database.remove();
        database
    }

    /// Its `sqlite://` URL.
    pub fn url(&self) -> String {
        format!("sqlite://{}", self.0.display())
    }

    fn remove(&self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A child process, killed (and reaped) when dropped; with [`Running::group`], its
/// whole process group (a script and what it started).
pub struct Running {
    child: Child,
    /// Whether the child leads a process group of its own.
    group: bool,
}

impl Running {
    /// A spawned child.
    pub fn new(child: Child) -> Self {
        Running {
            child,
            group: false,
        }
    }

    /// `command` spawned as the leader of a process group of its own.
    pub fn group(command: &mut std::process::Command) -> Self {
        use std::os::unix::process::CommandExt;
        Running {
            child: command.process_group(0).spawn().unwrap(),
            group: true,
        }
    }

    /// How it exited, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Sends SIGTERM, as a process manager does to stop it.
    pub fn terminate(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.group {
            // The group, so that nothing the script started outlives a failed test.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example `name`, which `cargo test` builds beside the test binaries' `deps`.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let binary = profile_dir.join("examples").join(name);
    assert!(
        binary.exists(),
        "{} is missing: run through `cargo test`",
        binary.display()
    );
    binary
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether something listens on loopback `port`.
pub async fn listening(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}
