//! The Redis key schema, whole: every key and channel the Redis tier reads or
//! writes is named here, under the cache's namespace.
//!
//! ```text
//! {ns}/v{format}:{64 hex}        an entry (response, Vary index or value), by its CacheKey
//! {ns}/gone:{64 hex}             a key's invalidation mark: when it was invalidated (ms)
//! {ns}/gonetag:{blake3 of tag}   a tag's invalidation mark
//! {ns}/purged                    the last purge's mark
//! {ns}/tag:{blake3 of tag}       a tag's index: the entry keys stored with it
//! {ns}/lease:{64 hex}            a key's fill lease: the holder's token
//! {ns}/staging:{64 hex}:{writer}:{n}  a large entry's value on its way in (10 s at
//!                                most): the write script renames it into place or
//!                                deletes it
//! {ns}/invalidation-log          recent invalidation messages, scored by their time
//! {ns}/invalidations             the pub/sub channel of invalidation messages
//! {ns}/written                   the pub/sub channel of written keys' announcements
//!                                (`track_written_keys`)
//! {ns}/outages                   scores: `recovered`, when Redis last came back after an
//!                                outage (ms); `epoch`, set once (gone: Redis lost its data)
//! {ns}/probe:{value|set|log|none} throwaway keys of the capability check (10 s at most)
//! ```
//!
//! Keys are digests (tags hashed too), so no URL, tag or application key can reach a
//! key's syntax, its length, or a Redis Cluster hash tag. The namespace ends at `/`,
//! which a namespace cannot hold: no namespace's keys (or its purge's SCAN pattern)
//! reach into another's, even when one namespace starts with another (`jobs`,
//! `jobs:prod`).

use crate::entry::FORMAT_VERSION;
use crate::key::CacheKey;

/// Where a namespace ends in every key: a character no namespace may hold.
pub(crate) const NAMESPACE_END: char = '/';

/// The names of one namespace's keys.
#[derive(Debug, Clone)]
pub(crate) struct RedisKeys {
    /// The namespace and its end, `{ns}/`.
    namespace: String,
    /// `{ns}/v{format}:`, `{ns}/gone:`, `{ns}/lease:`, `{ns}/staging:`,
    /// `{ns}/gonetag:`, `{ns}/tag:`, made once: these keys are made for every command,
    /// every entry written or every tag of one.
    entry_prefix: String,
    gone_prefix: String,
    lease_prefix: String,
    staging_prefix: String,
    gone_tag_prefix: String,
    tag_prefix: String,
    /// `{ns}/purged`, named in every write script's call.
    purged: String,
}

impl RedisKeys {
    pub(crate) fn new(namespace: &str) -> Self {
        let namespace = format!("{namespace}{NAMESPACE_END}");
        RedisKeys {
            entry_prefix: format!("{namespace}v{FORMAT_VERSION}:"),
            gone_prefix: format!("{namespace}gone:"),
            lease_prefix: format!("{namespace}lease:"),
            staging_prefix: format!("{namespace}staging:"),
            gone_tag_prefix: format!("{namespace}gonetag:"),
            tag_prefix: format!("{namespace}tag:"),
            purged: format!("{namespace}purged"),
            namespace,
        }
    }

    /// `{prefix}{hex}`, in one allocation.
    fn keyed(prefix: &str, key: &CacheKey) -> String {
        let mut name = String::with_capacity(prefix.len() + 64);
        name.push_str(prefix);
        key.push_hex(&mut name);
        name
    }

    /// Where an entry lives: `{ns}/v{format}:{hex}`, so a new format never reads an
    /// old one.
    pub(crate) fn entry(&self, key: &CacheKey) -> String {
        Self::keyed(&self.entry_prefix, key)
    }

    pub(crate) fn gone(&self, key: &CacheKey) -> String {
        Self::keyed(&self.gone_prefix, key)
    }

    pub(crate) fn gone_tag(&self, tag: &str) -> String {
        Self::keyed(&self.gone_tag_prefix, &tag_digest(tag))
    }

    pub(crate) fn purged(&self) -> String {
        self.purged.clone()
    }

    pub(crate) fn tag_index(&self, tag: &str) -> String {
        Self::keyed(&self.tag_prefix, &tag_digest(tag))
    }

    /// A tag's mark and its index ([`gone_tag`](Self::gone_tag),
    /// [`tag_index`](Self::tag_index)), from one digest: a write script names both.
    pub(crate) fn tag_names(&self, tag: &str) -> (String, String) {
        let digest = tag_digest(tag);
        (
            Self::keyed(&self.gone_tag_prefix, &digest),
            Self::keyed(&self.tag_prefix, &digest),
        )
    }

    pub(crate) fn lease(&self, key: &CacheKey) -> String {
        Self::keyed(&self.lease_prefix, key)
    }

    /// Where one write stages an entry's value: named by the key, the writing
    /// process and its write, so that no two writes (on any replica) share one.
    pub(crate) fn staging(&self, key: &CacheKey, writer: u64, write: u64) -> String {
        let mut name = Self::keyed(&self.staging_prefix, key);
        let mut number = itoa::Buffer::new();
        name.push(':');
        name.push_str(number.format(writer));
        name.push(':');
        name.push_str(number.format(write));
        name
    }

    pub(crate) fn invalidation_log(&self) -> String {
        format!("{}invalidation-log", self.namespace)
    }

    pub(crate) fn invalidation_channel(&self) -> String {
        format!("{}invalidations", self.namespace)
    }

    pub(crate) fn written_channel(&self) -> String {
        format!("{}written", self.namespace)
    }

    /// `{ns}/v{format}:`, what every entry's name starts with.
    pub(crate) fn entry_prefix(&self) -> &str {
        &self.entry_prefix
    }

    pub(crate) fn outages(&self) -> String {
        format!("{}outages", self.namespace)
    }

    /// A throwaway key of the capability check.
    pub(crate) fn probe(&self, name: &str) -> String {
        format!("{}probe:{name}", self.namespace)
    }

    /// Matches every key of the namespace (for a purge's SCAN).
    pub(crate) fn every_key(&self) -> String {
        format!("{}*", self.namespace)
    }
}

/// A tag as it appears in keys: hashed, so that no tag can reach a key's syntax. Its
/// BLAKE3 digest in hex, written as a key's is (`format!` with the digest's `Display`
/// cost about 1 400 instructions a name, and a tagged write names two a tag).
fn tag_digest(tag: &str) -> CacheKey {
    CacheKey::from_bytes(*blake3::hash(tag.as_bytes()).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_keys_are_bounded_and_plain() {
        let keys = RedisKeys::new("thc");
        let key = CacheKey::from_bytes([7; 32]);
        assert_eq!(keys.entry(&key), format!("thc/v2:{}", "07".repeat(32)));
        let long = format!("{}:{}", "x".repeat(8000), "{tag}".repeat(200));
        let entry = keys.entry(&CacheKey::for_value(&long));
        assert_eq!(entry.len(), "thc/v2:".len() + 64);
        assert!(!entry.contains('{'));
    }

    #[test]
    fn every_kind_of_key_has_its_own_prefix() {
        let keys = RedisKeys::new("ns");
        let key = CacheKey::from_bytes([1; 32]);
        let names = [
            keys.entry(&key),
            keys.gone(&key),
            keys.gone_tag("t"),
            keys.purged(),
            keys.tag_index("t"),
            keys.lease(&key),
            keys.staging(&key, 7, 0),
            keys.invalidation_log(),
            keys.invalidation_channel(),
            keys.written_channel(),
        ];
        for (i, a) in names.iter().enumerate() {
            assert!(a.starts_with("ns/"), "{a}");
            for b in names.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
        assert!(!keys.tag_index("{t}").contains('{'));
        // Tags' names as the schema says, unchanged from one version to the next (a
        // tag's index and mark written before must be found after): the tag's BLAKE3
        // digest in lower-case hex.
        let hex = blake3::hash(b"t").to_hex();
        assert_eq!(keys.gone_tag("t"), format!("ns/gonetag:{hex}"));
        assert_eq!(keys.tag_index("t"), format!("ns/tag:{hex}"));
        assert_eq!(
            keys.tag_names("t"),
            (keys.gone_tag("t"), keys.tag_index("t"))
        );
        // Each write stages under a name of its own.
        assert_ne!(keys.staging(&key, 7, 0), keys.staging(&key, 7, 1));
        assert_ne!(keys.staging(&key, 7, 0), keys.staging(&key, 8, 0));
    }

    #[test]
    fn no_namespace_reaches_into_another_that_it_starts() {
        let (short, long) = (RedisKeys::new("jobs"), RedisKeys::new("jobs:prod"));
        let pattern = short.every_key();
        let prefix = pattern.trim_end_matches('*');
        let key = CacheKey::from_bytes([1; 32]);
        for name in [
            long.entry(&key),
            long.gone(&key),
            long.gone_tag("t"),
            long.purged(),
            long.tag_index("t"),
            long.lease(&key),
            long.staging(&key, 7, 0),
            long.invalidation_log(),
        ] {
            assert!(!name.starts_with(prefix), "{name} matches {pattern}");
        }
        assert!(!long.invalidation_channel().starts_with(prefix));
        assert!(!long.written_channel().starts_with(prefix));
    }
}
