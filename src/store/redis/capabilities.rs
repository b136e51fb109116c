//! What the Redis the cache connected to lets it do: each command the tier relies
//! on, tried once per connection (after start and after every return from an outage)
//! on throwaway keys of the namespace, and the server's version.
//!
//! A Redis older than 7 refuses `PEXPIRE … NX|GT` (tag indexes would never expire);
//! an ACL user without `GETRANGE` reads every Redis hit's value whole;
//! an ACL user without `MGET`, `PUBLISH` or the sorted-set commands turns the
//! invalidation marks, pub/sub or the invalidation log off. Each is an error reply
//! the tier tolerates as it runs, so without this check nothing would say so: what is
//! missing is reported in `RedisHealth::missing_commands`, a warning and the
//! `tower_hybrid_cache_redis_missing_commands` gauge.

use fred::interfaces::ClientLike;
use fred::types::{ClusterHash, CustomCommand, Value};

use super::keys::RedisKeys;
use crate::store::StoreError;

/// A command probe: its name as reported, the command and its arguments.
struct Probe {
    name: &'static str,
    command: &'static str,
    hash: ClusterHash,
    args: Vec<String>,
}

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Findings {
    /// The commands (and options) Redis refused, in the order tried.
    pub(crate) missing: Vec<&'static str>,
    /// `redis_version` (or `valkey_version`) from `INFO server`, when allowed.
    pub(crate) version: Option<String>,
}

/// The name under which a Redis without `PEXPIRE … NX|GT` (older than 7) is reported.
pub(crate) const PEXPIRE_NX_GT: &str = "pexpire nx|gt (Redis 7)";

fn probes(keys: &RedisKeys) -> Vec<Probe> {
    let (value, set, log, none) = (
        keys.probe("value"),
        keys.probe("set"),
        keys.probe("log"),
        keys.probe("none"),
    );
    let first = || ClusterHash::FirstKey;
    let probe = |name, command, args: &[&str]| Probe {
        name,
        command,
        hash: first(),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
    };
    vec![
        probe("set", "SET", &[&value, "1", "PX", "10000"]),
        probe("get", "GET", &[&value]),
        probe(GETRANGE, "GETRANGE", &[&value, "0", "13"]),
        probe(MGET, "MGET", &[&value, &value]),
        probe("pexpire", "PEXPIRE", &[&value, "10000"]),
        probe("exists", "EXISTS", &[&value]),
        // Onto itself: allowed, it changes nothing (and needs no second slot).
        probe("rename", "RENAME", &[&value, &value]),
        probe(PEXPIRE_NX_GT, "PEXPIRE", &[&value, "10000", "GT"]),
        probe("sadd", "SADD", &[&set, "x"]),
        // Neither probe key outlives a check cut short.
        probe("pexpire", "PEXPIRE", &[&set, "10000"]),
        probe("smembers", "SMEMBERS", &[&set]),
        probe("zadd", "ZADD", &[&log, "0", "x"]),
        probe("pexpire", "PEXPIRE", &[&log, "10000"]),
        probe("zmscore", "ZMSCORE", &[&log, "x", "y"]),
        probe("zcount", "ZCOUNT", &[&log, "-inf", "+inf"]),
        probe("zcard", "ZCARD", &[&log]),
        probe("zrangebyscore", "ZRANGEBYSCORE", &[&log, "0", "0"]),
        probe("zremrangebyscore", "ZREMRANGEBYSCORE", &[&log, "1", "1"]),
        probe("zremrangebyrank", "ZREMRANGEBYRANK", &[&log, "1", "1"]),
        // A message no replica reads as an invalidation, named like the probe keys.
        probe("publish", "PUBLISH", &[&keys.invalidation_channel(), &none]),
        Probe {
            name: "scan",
            command: "SCAN",
            hash: ClusterHash::Random,
            args: ["0", "MATCH", &none, "COUNT", "1"]
                .iter()
                .map(|a| (*a).to_owned())
                .collect(),
        },
        probe("unlink", "UNLINK", &[&none]),
        Probe {
            name: "eval",
            command: "EVAL",
            hash: ClusterHash::Random,
            args: vec!["return 1".to_owned(), "0".to_owned()],
        },
        // One key each: in a cluster the probe keys live in different slots.
        probe("del", "DEL", &[&value]),
        probe("del", "DEL", &[&set]),
        probe("del", "DEL", &[&log]),
    ]
}

/// The command a lookup reads a value's head with; without it, lookups read values
/// whole.
pub(crate) const GETRANGE: &str = "getrange";

/// The name under which `MGET` is reported: lookups' whole-value reads go in batches
/// with it.
pub(crate) const MGET: &str = "mget";

/// The commands the head script runs (`EVAL`, and a `GETRANGE` a key): with either
/// refused, lookups read their heads alone.
pub(crate) const HEAD_SCRIPT_COMMANDS: [&str; 2] = ["eval", GETRANGE];

/// The commands the cache's write scripts run: with any of them refused (or `EVAL`), writes
/// and invalidation marks go without the scripts.
pub(crate) const SCRIPT_COMMANDS: [&str; 7] =
    ["eval", "get", "set", "del", "exists", "rename", "pexpire"];

/// Whether an error reply says the command (or this form of it) is not available to
/// us: not permitted (also inside a script), unknown (renamed, disabled, too new), or
/// not understood.
pub(crate) fn refused(error: &fred::error::Error) -> bool {
    let details = error.details().to_ascii_lowercase();
    [
        "noperm",
        // Redis 7's reply when a script calls a command the user may not run.
        "can't run this command",
        "unknown command",
        "wrong number of arguments",
        "syntax error",
    ]
    .iter()
    .any(|sign| details.contains(sign))
}

/// Tries every command the tier relies on; `None` when Redis stopped answering
/// midway (the check is tried again later).
pub(crate) async fn check<C: ClientLike>(client: &C, keys: &RedisKeys) -> Option<Findings> {
    let mut findings = Findings::default();
    for probe in probes(keys) {
        let command = CustomCommand::new_static(probe.command, probe.hash, false);
        let answer: Result<Value, _> = client.custom(command, probe.args).await;
        match answer {
            Ok(_) => {}
            Err(error) if !StoreError::command(error.clone()).is_outage() => {
                // An error reply: refused, or something else (`OOM`, `WRONGTYPE` on a
                // foreign value) that says nothing about the command.
                if refused(&error) && !findings.missing.contains(&probe.name) {
                    findings.missing.push(probe.name);
                }
            }
            Err(_) => return None,
        }
    }
    findings.version = version(client).await;
    Some(findings)
}

/// The server's version, if `INFO server` is allowed.
async fn version<C: ClientLike>(client: &C) -> Option<String> {
    let command = CustomCommand::new_static("INFO", ClusterHash::Random, false);
    let info: String = client
        .custom(command, vec!["server".to_owned()])
        .await
        .ok()?;
    parse_version(&info)
}

/// `valkey_version` when present (Valkey also reports the Redis version it is
/// compatible with), else `redis_version`.
fn parse_version(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|version| version.trim().to_owned())
            .filter(|version| !version.is_empty())
    };
    field("valkey_version:")
        .map(|v| format!("valkey {v}"))
        .or_else(|| field("redis_version:").map(|v| format!("redis {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::mocks::{MockCommand, Mocks};
    use fred::prelude::*;
    use std::sync::Arc;

    /// Answers as Redis 6.2 does: `PEXPIRE` takes no options.
    #[derive(Debug)]
    struct Redis6;

    impl Mocks for Redis6 {
        fn process_command(&self, command: MockCommand) -> Result<Value, Error> {
            match (&*command.cmd, command.args.len()) {
                ("PEXPIRE", n) if n > 2 => Err(Error::new(
                    ErrorKind::Unknown,
                    "ERR wrong number of arguments for 'pexpire' command",
                )),
                ("INFO", _) => Ok(Value::from("# Server\r\nredis_version:6.2.14\r\n")),
                _ => Ok(Value::Queued),
            }
        }
    }

    #[tokio::test]
    async fn a_redis_6_is_reported_missing_pexpire_options() {
        let config = Config {
            mocks: Some(Arc::new(Redis6)),
            ..Config::default()
        };
        let client = Builder::from_config(config).build().unwrap();
        client.init().await.unwrap();
        let findings = check(&client, &RedisKeys::new("jobs")).await.unwrap();
        assert_eq!(findings.missing, [PEXPIRE_NX_GT]);
        assert_eq!(findings.version.as_deref(), Some("redis 6.2.14"));
    }

    #[test]
    fn a_command_refused_inside_a_script_reads_as_refused() {
        let reply = |text: &str| Error::new(ErrorKind::Unknown, text.to_owned());
        for text in [
            // Redis 7.0.15's reply, captured from a real ACL user without `RENAME`.
            "ERR The user executing the script can't run this command or subcommand script: cc72eda6, on @user_script:1.",
            // A `NOPERM` wrapped in a script's error, in the shape older Redis uses
            // (written here, not captured).
            "ERR Error running script (call to f_cc72eda6): @user_script:1: @user_script: 1: NOPERM this user has no permissions to run the 'rename' command or its subcommand",
            "NOPERM this user has no permissions to run the 'eval' command",
        ] {
            assert!(refused(&reply(text)), "{text}");
        }
        assert!(!refused(&reply(
            "OOM command not allowed when used memory > 'maxmemory'."
        )));
    }

    #[test]
    fn valkey_is_named_by_its_own_version() {
        let info = "# Server\r\nredis_version:7.2.4\r\nvalkey_version:8.0.1\r\n";
        assert_eq!(parse_version(info).as_deref(), Some("valkey 8.0.1"));
        assert_eq!(parse_version("nothing"), None);
    }
}
