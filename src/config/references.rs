//! `[references]`: where cryptogram references are kept — in process
//! (moka) or in Redis for several replicas — and how many may be alive at
//! once. A Redis URL is checked without connecting and never carries a
//! password.

use std::path::PathBuf;
use std::time::Duration;

use super::duration::duration;
use super::raw::RawReferences;
use super::{no_password_in_url, readable_file, ConfigError};

/// Where cryptogram references are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceBackend {
    /// In-process TTL cache (moka).
    Memory,
    /// Redis, for several replicas sharing references.
    Redis(RedisConfig),
}

/// The Redis reference backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://…`, never with a password.
    pub url: String,
    /// File holding the password (`TOKENRELAY_REDIS_PASSWORD` wins).
    pub password_file: Option<PathBuf>,
    /// Prefix of every key tokenrelay writes.
    pub key_prefix: String,
    /// Extra trust anchor (PEM) for `rediss://`, e.g. a private CA; the
    /// public web roots when absent.
    pub ca_file: Option<PathBuf>,
    /// Longest wait for one Redis command (and for a new connection);
    /// past it the connection is dropped and the next command dials
    /// afresh (`references.timeout`, default 2 s).
    pub timeout: Duration,
}

/// Default [`RedisConfig::timeout`].
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(2);

impl Default for RedisConfig {
    /// `redis://127.0.0.1:6379` with every other key at its default.
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            password_file: None,
            key_prefix: DEFAULT_REDIS_KEY_PREFIX.into(),
            ca_file: None,
            timeout: DEFAULT_REDIS_TIMEOUT,
        }
    }
}

/// Default [`RedisConfig::key_prefix`].
pub const DEFAULT_REDIS_KEY_PREFIX: &str = "tokenrelay:";

/// `[references]`, and the most references alive at once. No
/// `[references]` is the in-process store.
pub(super) fn validate(
    raw: Option<&RawReferences>,
) -> Result<(ReferenceBackend, u64), ConfigError> {
    let Some(r) = raw else {
        return Ok((ReferenceBackend::Memory, DEFAULT_MAX_ENTRIES));
    };
    let backend = match r.backend.as_deref().unwrap_or("memory") {
        "memory" => {
            for (key, given) in [
                ("references.url", r.url.is_some()),
                ("references.password_file", r.password_file.is_some()),
                ("references.key_prefix", r.key_prefix.is_some()),
                ("references.ca_file", r.ca_file.is_some()),
                ("references.timeout", r.timeout.is_some()),
            ] {
                if given {
                    return Err(ConfigError::new(key, "applies to backend \"redis\" only"));
                }
            }
            ReferenceBackend::Memory
        }
        "redis" => ReferenceBackend::Redis(redis(r)?),
        other => {
            return Err(ConfigError::new(
                "references.backend",
                format!("unknown backend {other:?} (memory, redis)"),
            ))
        }
    };
    let max = r.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES);
    if max == 0 {
        return Err(ConfigError::new(
            "references.max_entries",
            "must be greater than zero",
        ));
    }
    Ok((backend, max))
}

/// `references.max_entries` when not set.
const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;

/// The keys of `backend = "redis"`.
fn redis(r: &RawReferences) -> Result<RedisConfig, ConfigError> {
    let url = r
        .url
        .clone()
        .ok_or_else(|| ConfigError::new("references.url", "required for backend \"redis\""))?;
    redis_url("references.url", &url)?;
    readable_file("references.password_file", r.password_file.as_deref())?;
    let key_prefix = r
        .key_prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_REDIS_KEY_PREFIX.to_owned());
    if key_prefix.is_empty()
        || key_prefix.len() > 64
        || !key_prefix.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ConfigError::new(
            "references.key_prefix",
            "must be 1-64 printable ASCII characters without spaces",
        ));
    }
    readable_file("references.ca_file", r.ca_file.as_deref())?;
    if r.ca_file.is_some() && !url.starts_with("rediss://") {
        return Err(ConfigError::new(
            "references.ca_file",
            "applies to rediss:// URLs only",
        ));
    }
    let timeout = duration(
        "references.timeout",
        r.timeout.as_deref(),
        DEFAULT_REDIS_TIMEOUT,
    )?;
    if timeout > Duration::from_secs(60) {
        return Err(ConfigError::new(
            "references.timeout",
            "must be at most 60s (a replica waits that long on a dead connection)",
        ));
    }
    Ok(RedisConfig {
        url,
        password_file: r.password_file.clone(),
        key_prefix,
        ca_file: r.ca_file.clone(),
        timeout,
    })
}

/// Checks a Redis URL without connecting: scheme, parseable by the client,
/// and no password (secrets never live in the TOML).
fn redis_url(key: &str, url: &str) -> Result<(), ConfigError> {
    use redis::IntoConnectionInfo;
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(ConfigError::new(
            key,
            "must start with redis:// or rediss:// (TLS)",
        ));
    }
    const WHERE: &str = "references.password_file or TOKENRELAY_REDIS_PASSWORD";
    no_password_in_url(key, url, WHERE)?;
    if url.contains('#') {
        // `#insecure` would turn certificate checks off.
        return Err(ConfigError::new(key, "must not contain a #fragment"));
    }
    let info = url
        .into_connection_info()
        // The client's message names what is wrong, never a password:
        // passwords are refused below, before anything could echo one.
        .map_err(|e| ConfigError::new(key, format!("not a usable Redis URL ({e})")))?;
    if info.redis_settings().password().is_some() {
        return Err(ConfigError::new(
            key,
            format!("must not contain a password; use {WHERE}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn redis_references_need_a_url_without_a_password() {
        let c = Config::parse(
            "[references]\nbackend = \"redis\"\nurl = \"redis://cache.internal:6379/2\"",
        )
        .unwrap();
        assert_eq!(
            c.references,
            ReferenceBackend::Redis(RedisConfig {
                url: "redis://cache.internal:6379/2".into(),
                password_file: None,
                key_prefix: DEFAULT_REDIS_KEY_PREFIX.into(),
                ca_file: None,
                timeout: DEFAULT_REDIS_TIMEOUT,
            })
        );
        assert!(Config::parse(
            "[references]\nbackend = \"redis\"\nurl = \"rediss://tokenrelay@cache.internal\"\nkey_prefix = \"tr-eu:\""
        )
        .is_ok());
        for (doc, key) in [
            (
                "url = \"redis://c\"\nca_file = \"Cargo.toml\"",
                "references.ca_file",
            ),
            (
                "url = \"rediss://c\"\nca_file = \"no/such.pem\"",
                "references.ca_file",
            ),
            (
                "url = \"redis://c\"\ntimeout = \"61s\"",
                "references.timeout",
            ),
            (
                "url = \"redis://c\"\ntimeout = \"0s\"",
                "references.timeout",
            ),
        ] {
            let e =
                Config::parse(&format!("[references]\nbackend = \"redis\"\n{doc}")).unwrap_err();
            assert_eq!(e.key, key, "{doc}");
        }
        for (doc, key) in [
            ("[references]\nbackend = \"redis\"", "references.url"),
            (
                "[references]\nbackend = \"redis\"\nurl = \"redis://:hunter2@cache.internal\"",
                "references.url",
            ),
            (
                "[references]\nbackend = \"redis\"\nurl = \"redis://tokenrelay:hunter2@cache.internal/0\"",
                "references.url",
            ),
            (
                "[references]\nbackend = \"redis\"\nurl = \"rediss://cache.internal#insecure\"",
                "references.url",
            ),
            (
                "[references]\nbackend = \"redis\"\nurl = \"unix:///run/redis.sock\"",
                "references.url",
            ),
            (
                "[references]\nbackend = \"redis\"\nurl = \"redis://cache.internal/db\"",
                "references.url",
            ),
            (
                "[references]\nbackend = \"redis\"\nurl = \"redis://cache.internal\"\npassword_file = \"/nonexistent\"",
                "references.password_file",
            ),
            (
                "[references]\nbackend = \"redis\"\nurl = \"redis://cache.internal\"\nkey_prefix = \"a b\"",
                "references.key_prefix",
            ),
            (
                "[references]\nbackend = \"memory\"\nurl = \"redis://cache.internal\"",
                "references.url",
            ),
            (
                "[references]\nbackend = \"memory\"\npassword_file = \"/etc/hosts\"",
                "references.password_file",
            ),
            ("[references]\nbackend = \"memcached\"", "references.backend"),
        ] {
            let e = Config::parse(doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }
}
