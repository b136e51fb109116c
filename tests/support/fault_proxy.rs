//! A TCP proxy between the cache and a real `redis-server` that injects network faults
//! on demand: latency, a black hole (accepts, never answers), connection resets, a cut
//! after N bytes. The fault can be switched while a test runs; the proxy also counts
//! the Redis commands it sees, by name.
//!
//! It runs on a runtime of its own, so a test's runtime cannot stall it, and it stops
//! (closing every connection) when dropped.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Passes bytes through untouched.
    None,
    /// Holds each chunk of commands this long before passing it on.
    Latency(Duration),
    /// Accepts connections but passes nothing on either way, as a network that drops
    /// every packet: bytes wait (as TCP would keep retransmitting them) and flow again,
    /// in order, once the fault is lifted.
    BlackHole,
    /// Resets every open connection (RST) and every new one at once.
    Reset,
    /// Keeps every connection open but throws away what it carries either way, as a
    /// connection whose peer vanished without a word (half-open): what is sent
    /// meanwhile is lost for good, and neither side is told.
    Discard,
    /// Passes at most this many bytes of replies per connection (counted from when
    /// the fault is set), then closes it.
    CutAfter(usize),
}

struct Shared {
    fault: watch::Sender<Fault>,
    commands: Mutex<HashMap<String, u64>>,
    /// Every command seen, in order, with the number of the connection that sent it
    /// (connections are numbered from 0 as they are accepted).
    sent: Mutex<Vec<(u64, String)>>,
    /// Connections accepted so far.
    accepted: std::sync::atomic::AtomicU64,
    /// A command name: the next connection that sends it is reset before it passes.
    trap: Mutex<Option<String>>,
}

/// A running proxy in front of `upstream`.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `127.0.0.1:upstream_port`.
    pub fn start(upstream_port: u16) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("proxy runtime");
        // Bound here, not with `block_on`: the caller may itself be on a runtime.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port));
        let shared = Arc::new(Shared {
            fault: watch::channel(Fault::None).0,
            commands: Mutex::new(HashMap::new()),
            sent: Mutex::new(Vec::new()),
            accepted: std::sync::atomic::AtomicU64::new(0),
            trap: Mutex::new(None),
        });
        let accepting = Arc::clone(&shared);
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("proxy listener");
            while let Ok((client, _)) = listener.accept().await {
                let number = accepting
                    .accepted
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(serve(client, number, upstream, Arc::clone(&accepting)));
            }
        });
        FaultProxy {
            addr,
            shared,
            runtime: Some(runtime),
        }
    }

    /// The URL that reaches Redis through the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Switches the fault; open connections follow at once.
    pub fn set(&self, fault: Fault) {
        self.shared.fault.send_replace(fault);
    }

    /// Resets the next connection that sends a `command` (e.g. `GET`), before the
    /// command reaches Redis; once.
    pub fn reset_next(&self, command: &str) {
        *self.shared.trap.lock().unwrap() = Some(command.to_ascii_uppercase());
    }

    /// Commands seen so far (sent on or not), all names.
    pub fn commands(&self) -> u64 {
        self.shared.commands.lock().unwrap().values().sum()
    }

    /// Commands named `name` seen so far.
    pub fn count(&self, name: &str) -> u64 {
        let commands = self.shared.commands.lock().unwrap();
        commands
            .get(&name.to_ascii_uppercase())
            .copied()
            .unwrap_or(0)
    }

    /// The connections (numbered as accepted, from 0) that sent each `name` command,
    /// in order.
    pub fn senders_of(&self, name: &str) -> Vec<u64> {
        let name = name.to_ascii_uppercase();
        let sent = self.shared.sent.lock().unwrap();
        sent.iter()
            .filter(|(_, command)| *command == name)
            .map(|(connection, _)| *connection)
            .collect()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every command name with its count, for failure messages.
    pub fn command_counts(&self) -> HashMap<String, u64> {
        self.shared.commands.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// How a connection ends.
enum End {
    Close,
    Reset,
}

async fn serve(mut client: TcpStream, number: u64, upstream: SocketAddr, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let end = match TcpStream::connect(upstream).await {
        Ok(mut server) => {
            let _ = server.set_nodelay(true);
            pump(&mut client, number, &mut server, &shared).await
        }
        // Redis is down: the client sees what it would without the proxy.
        Err(_) => End::Reset,
    };
    if let End::Reset = end {
        // Linger zero: closing sends RST instead of FIN.
        let _ = client.set_zero_linger();
    }
}

async fn pump(client: &mut TcpStream, number: u64, server: &mut TcpStream, shared: &Shared) -> End {
    let mut faults = shared.fault.subscribe();
    let mut fault = faults.borrow_and_update().clone();
    let mut reply_budget = budget(&fault);
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut commands = RespCommands::default();
    let mut from_client = vec![0_u8; 64 * 1024];
    let mut from_server = vec![0_u8; 64 * 1024];
    loop {
        if fault == Fault::Reset {
            return End::Reset;
        }
        if fault == Fault::BlackHole {
            // Read nothing: what was sent stays in the socket buffers.
            if faults.changed().await.is_err() {
                return End::Close;
            }
            fault = faults.borrow_and_update().clone();
            reply_budget = budget(&fault);
            continue;
        }
        tokio::select! {
            read = client_read.read(&mut from_client) => {
                let n = match read {
                    Ok(0) | Err(_) => return End::Close,
                    Ok(n) => n,
                };
                let names = commands.push(&from_client[..n]);
                let trapped = {
                    let mut trap = shared.trap.lock().unwrap();
                    let hit = trap.as_ref().is_some_and(|name| names.contains(name));
                    if hit {
                        *trap = None;
                    }
                    hit
                };
                {
                    let mut counts = shared.commands.lock().unwrap();
                    let mut sent = shared.sent.lock().unwrap();
                    for name in names {
                        *counts.entry(name.clone()).or_default() += 1;
                        sent.push((number, name));
                    }
                }
                if trapped {
                    return End::Reset;
                }
                // A fault set while these bytes were on their way applies to them:
                // the select above may have taken the read before the change.
                if faults.has_changed().unwrap_or(false) {
                    fault = faults.borrow_and_update().clone();
                    reply_budget = budget(&fault);
                }
                while fault == Fault::BlackHole {
                    if faults.changed().await.is_err() {
                        return End::Close;
                    }
                    fault = faults.borrow_and_update().clone();
                    reply_budget = budget(&fault);
                }
                if fault == Fault::Reset {
                    return End::Reset;
                }
                if fault == Fault::Discard {
                    continue;
                }
                if let Fault::Latency(delay) = &fault {
                    tokio::time::sleep(*delay).await;
                }
                if server_write.write_all(&from_client[..n]).await.is_err() {
                    return End::Close;
                }
            }
            read = server_read.read(&mut from_server) => {
                let n = match read {
                    Ok(0) | Err(_) => return End::Close,
                    Ok(n) => n,
                };
                if faults.has_changed().unwrap_or(false) {
                    fault = faults.borrow_and_update().clone();
                    reply_budget = budget(&fault);
                }
                if fault == Fault::Discard {
                    continue;
                }
                let pass = reply_budget.map_or(n, |left| left.min(n));
                if client_write.write_all(&from_server[..pass]).await.is_err() {
                    return End::Close;
                }
                if let Some(left) = reply_budget.as_mut() {
                    *left -= pass;
                    if *left == 0 {
                        return End::Close;
                    }
                }
            }
            changed = faults.changed() => {
                if changed.is_err() {
                    return End::Close;
                }
                fault = faults.borrow_and_update().clone();
                reply_budget = budget(&fault);
            }
        }
    }
}

fn budget(fault: &Fault) -> Option<usize> {
    match fault {
        Fault::CutAfter(n) => Some(*n),
        _ => None,
    }
}

/// Splits the client's byte stream into RESP commands and names them.
#[derive(Default)]
struct RespCommands {
    pending: Vec<u8>,
}

impl RespCommands {
    /// Adds bytes; returns the names (upper case) of the commands they complete,
    /// leaving out the cache's own housekeeping (the capability check on `…/probe:…`,
    /// the recorded recoveries and epoch on `…/outages`): the tests count what the cache does
    /// for requests and invalidations.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut names = Vec::new();
        let mut at = 0;
        while let Some((name, probe, used)) = command(&self.pending[at..]) {
            if !probe {
                names.push(name);
            }
            at += used;
        }
        self.pending.drain(..at);
        names
    }
}

/// One whole command at the start of `bytes`: its name, whether it is the capability
/// check's, and its length; `None` until the bytes hold a whole one.
fn command(bytes: &[u8]) -> Option<(String, bool, usize)> {
    let (first, mut at) = line(bytes, 0)?;
    let Some(count) = first.strip_prefix(b"*") else {
        // An inline command: one line.
        let name = first.split(|b| *b == b' ').next().unwrap_or_default();
        return Some((
            String::from_utf8_lossy(name).to_ascii_uppercase(),
            false,
            at,
        ));
    };
    let count: usize = std::str::from_utf8(count).ok()?.parse().ok()?;
    let mut name = String::new();
    let mut probe = false;
    for i in 0..count {
        let (header, next) = line(bytes, at)?;
        let len: usize = std::str::from_utf8(header.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        let end = next + len;
        if bytes.len() < end + 2 {
            return None;
        }
        let arg = &bytes[next..end];
        if i == 0 {
            name = String::from_utf8_lossy(arg).to_ascii_uppercase();
        } else if (i == 1 && housekeeping(arg)) || arg.windows(7).any(|w| w == b"/probe:") {
            probe = true;
        }
        at = end + 2;
    }
    Some((name, probe, at))
}

/// Whether a command's first argument is one of the cache's housekeeping keys.
fn housekeeping(key: &[u8]) -> bool {
    key.ends_with(b"/outages")
}

/// The line starting at `from` (without its CRLF) and where the next one starts.
fn line(bytes: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let rest = bytes.get(from..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], from + end + 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_named_across_chunk_boundaries() {
        let mut commands = RespCommands::default();
        let get = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n";
        let set = b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$4\r\n\r\n\r\n\r\n";
        let mut stream = get.to_vec();
        stream.extend_from_slice(set);
        assert_eq!(commands.push(&stream[..10]), Vec::<String>::new());
        assert_eq!(commands.push(&stream[10..30]), vec!["GET"]);
        assert_eq!(commands.push(&stream[30..]), vec!["SET"]);
        assert!(commands.pending.is_empty());
        let probe = b"*2\r\n$3\r\nGET\r\n$15\r\njobs/probe:none\r\n";
        assert_eq!(commands.push(probe), Vec::<String>::new(), "the check's");
    }
}
