//! Throwaway `redis-server` processes on free loopback ports, torn down on drop (also
//! when a test panics).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` this test owns.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra_args: Vec<String>,
    /// The CA that signed the server's certificate, for a TLS-only server.
    tls_ca: Option<PathBuf>,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

fn require_redis() {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!(
            "redis-server is not on PATH: these tests need a real one. Install it with \
             `apt-get install -y redis-server` (scripts/test does this when run as root)."
        );
    }
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `--requirepass x`).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    /// Starts a server on `port`.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        require_redis();
        let dir = std::env::temp_dir().join(format!("thc-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut server = RedisServer {
            port,
            child: None,
            dir,
            extra_args: extra.iter().map(|s| (*s).to_owned()).collect(),
            tls_ca: None,
        };
        server.spawn();
        server
    }

    /// Starts a TLS-only server (plain port off) with a certificate for `localhost`
    /// and 127.0.0.1 signed by a throwaway CA; `tls_ca()` is that CA's PEM file.
    pub fn start_tls() -> Self {
        require_redis();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("thc-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run openssl (apt-get install -y openssl)");
            assert!(status.success(), "openssl {args:?} failed");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=thc-test-ca",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext.cnf");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ]);
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let extra = vec![
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            path("server.crt"),
            "--tls-key-file".to_owned(),
            path("server.key"),
            "--tls-ca-cert-file".to_owned(),
            path("ca.crt"),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        let mut server = RedisServer {
            port,
            child: None,
            dir: dir.clone(),
            extra_args: extra,
            tls_ca: Some(dir.join("ca.crt")),
        };
        server.spawn();
        server
    }

    /// The CA file of a TLS server.
    pub fn tls_ca(&self) -> Option<&std::path::Path> {
        self.tls_ca.as_deref()
    }

    fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        // A TLS server's ports come in `extra_args`.
        if self.tls_ca.is_none() {
            command.args(["--port", &self.port.to_string()]);
        }
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(command.spawn().expect("spawn redis-server"));
        self.wait_until_up();
    }

    fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status();
        }
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }

    /// Starts the server again on the same port (after `kill`), empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A field of `command`'s line in `INFO commandstats` (`calls`, `rejected_calls`,
    /// `failed_calls`), under the name Redis gives it (`get`, `script|load`); 0 when
    /// the command was never called.
    pub fn command_stat(&self, command: &str, field: &str) -> u64 {
        command_stat_in(&self.cli(&["INFO", "commandstats"]), command, field)
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command.args(["-p", &self.port.to_string()]);
        if let Some(ca) = &self.tls_ca {
            command.arg("--tls").arg("--cacert").arg(ca);
        }
        let output = command.args(args).output().expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Runs `redis-cli -x` (its last argument read from `input`, byte for byte).
    pub fn cli_with_input(&self, args: &[&str], input: &[u8]) -> String {
        use std::io::Write;
        use std::process::Stdio;
        let mut command = Command::new("redis-cli");
        command.args(["-p", &self.port.to_string()]);
        if let Some(ca) = &self.tls_ca {
            command.arg("--tls").arg("--cacert").arg(ca);
        }
        let mut child = command
            .arg("-x")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run redis-cli");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let output = child.wait_with_output().expect("redis-cli output");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters (no replicas), built with
/// `redis-cli --cluster create`, torn down on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let port = free_port();
                let conf = format!("nodes-{port}.conf");
                RedisServer::start_on(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach state ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes }
    }

    /// A fred cluster URL naming every node.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port());
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", node.port()));
        }
        url
    }
}

/// A sentinel watching the primary on `primary_port` as `mymaster`, on a free port,
/// its configuration in `dir`.
fn spawn_sentinel(dir: &Path, primary_port: u16) -> (u16, Child) {
    let port = free_port();
    let conf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor mymaster 127.0.0.1 {primary_port} 2\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 5000\n",
            dir.display(),
        ),
    )
    .expect("sentinel conf");
    let child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server --sentinel");
    (port, child)
}

/// A primary, one replica and three sentinels (`redis-server --sentinel`) watching
/// them as `mymaster` (quorum 2), torn down on drop.
pub struct RedisSentinelGroup {
    pub primary: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<(u16, Child)>,
    dir: PathBuf,
}

impl RedisSentinelGroup {
    pub fn start() -> Self {
        let primary = RedisServer::start();
        // Read-only off, so that a test can make it lag (`FLUSHALL` on it alone).
        let replica = RedisServer::start_with(&[
            "--replicaof",
            "127.0.0.1",
            &primary.port().to_string(),
            "--replica-read-only",
            "no",
        ]);
        let group_dir = std::env::temp_dir().join(format!(
            "thc-sentinels-{}-{}",
            std::process::id(),
            primary.port()
        ));
        std::fs::create_dir_all(&group_dir).expect("sentinel dir");
        let sentinels = (0..3)
            .map(|_| spawn_sentinel(&group_dir, primary.port()))
            .collect();
        let mut group = RedisSentinelGroup {
            primary,
            replica,
            sentinels,
            dir: group_dir,
        };
        // Every sentinel knows the replica and the two other sentinels.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A sentinel that exited lost its port between `free_port` and its bind
            // (to another test's connection): again on another port. The others find
            // it through the primary.
            for sentinel in &mut group.sentinels {
                if let Ok(Some(_)) = sentinel.1.try_wait() {
                    *sentinel = spawn_sentinel(&group.dir, group.primary.port());
                }
            }
            let ready = group.sentinels.iter().all(|(port, _)| {
                let replicas = sentinel_cli(*port, &["SENTINEL", "REPLICAS", "mymaster"]);
                let others = sentinel_cli(*port, &["SENTINEL", "SENTINELS", "mymaster"]);
                replicas.contains(&group.replica.port().to_string())
                    && others.matches("127.0.0.1").count() >= 2
            });
            let linked = group
                .replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up");
            if ready && linked {
                break;
            }
            assert!(Instant::now() < deadline, "the sentinels did not settle");
            std::thread::sleep(Duration::from_millis(100));
        }
        group
    }

    /// A fred sentinel URL naming every sentinel.
    pub fn url(&self) -> String {
        let mut url = format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName=mymaster",
            self.sentinels[0].0
        );
        for (port, _) in self.sentinels.iter().skip(1) {
            url.push_str(&format!("&node=127.0.0.1:{port}"));
        }
        url
    }

    /// The port the sentinels name as the primary now.
    pub fn primary_port(&self) -> u16 {
        let answer = sentinel_cli(
            self.sentinels[0].0,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        );
        answer
            .lines()
            .nth(1)
            .and_then(|port| port.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The server that is the replica now (the roles swap at each failover).
    pub fn current_replica(&self) -> &RedisServer {
        if self.primary_port() == self.primary.port() {
            &self.replica
        } else {
            &self.primary
        }
    }

    /// Fails the primary over to the replica and waits until the sentinels and the
    /// promoted server agree it is the primary, and the demoted one follows it.
    pub fn fail_over(&self) {
        let before = self.primary_port();
        let promoted = self.current_replica();
        let deadline = Instant::now() + Duration::from_secs(60);
        // A sentinel that took part in a failover lately may not start another
        // (twice the failover timeout): ask each in turn until one does.
        let mut asked_at: Option<Instant> = None;
        let mut asking = 0;
        while !(self.primary_port() != before
            && promoted
                .cli(&["INFO", "replication"])
                .contains("role:master"))
        {
            assert!(Instant::now() < deadline, "the failover did not happen");
            if asked_at.is_none_or(|at| at.elapsed() > Duration::from_secs(2)) {
                let sentinel = self.sentinels[asking % self.sentinels.len()].0;
                sentinel_cli(sentinel, &["SENTINEL", "FAILOVER", "mymaster"]);
                asked_at = Some(Instant::now());
                asking += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The sentinels refuse a new failover until the demoted server replicates.
        let demoted = self.current_replica();
        while !demoted
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(
                Instant::now() < deadline,
                "the demoted primary did not follow"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn sentinel_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

impl Drop for RedisSentinelGroup {
    fn drop(&mut self) {
        for (_, child) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A field of `command`'s line in the text of `INFO commandstats`, as
/// [`RedisServer::command_stat`] reads it (for a server that needs a password).
pub fn command_stat_in(stats: &str, command: &str, field: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|fields| {
            fields.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == field).then(|| v.parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}
