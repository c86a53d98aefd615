//! The one bounded duration type every duration key is read through, and
//! the table of those keys: each with its default and the range it must
//! fall in, so a value that would overflow a clock (`now + 9000 years`) or
//! a cache (moka's TTL) is refused by name at `check-config`, never met as
//! a panic on a request.

use std::time::Duration;

use super::ConfigError;

/// `vault.cache_ttl` when not set.
pub const DEFAULT_VAULT_CACHE_TTL: Duration = Duration::from_secs(5);

/// A duration key: its default and the range it must fall in. Every
/// duration the config accepts has one, so a value that would overflow a
/// clock (`now + 9000 years`) or a cache (moka's TTL) is refused by name
/// at `check-config`, never met as a panic on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationKey {
    /// Dotted key name, as errors name it.
    pub key: &'static str,
    /// Used when the key is absent.
    pub default: Duration,
    /// Smallest value accepted (zero: `"0s"` is allowed).
    pub min: Duration,
    /// Largest value accepted.
    pub max: Duration,
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// `reference_ttl`: a cryptogram reference outliving a day would outlive
/// the cryptogram it stands for.
pub const REFERENCE_TTL: DurationKey = DurationKey {
    key: "reference_ttl",
    default: secs(15 * 60),
    min: secs(1),
    max: secs(24 * 3600),
};
/// `cvc_ttl`: a CVC is held for one forward, never longer than an hour.
pub const CVC_TTL: DurationKey = DurationKey {
    key: "cvc_ttl",
    default: secs(15 * 60),
    min: secs(1),
    max: secs(3600),
};
/// `session_ttl`: a checkout page open longer than an hour should ask for
/// a new session; a long-lived key pair is what a single-use session exists
/// to avoid.
pub const SESSION_TTL: DurationKey = DurationKey {
    key: "session_ttl",
    default: secs(15 * 60),
    min: secs(1),
    max: secs(3600),
};
/// `idempotency_ttl`: retries come within hours; a week at most.
pub const IDEMPOTENCY_TTL: DurationKey = DurationKey {
    key: "idempotency_ttl",
    default: secs(24 * 3600),
    min: secs(1),
    max: secs(7 * 24 * 3600),
};
/// `header_read_timeout`.
pub const HEADER_READ_TIMEOUT: DurationKey = DurationKey {
    key: "header_read_timeout",
    default: secs(10),
    min: Duration::from_millis(1),
    max: secs(300),
};
/// `idle_timeout`: a client connection with no request in flight after
/// its first one; pooled clients reconnect, so an hour at most.
pub const IDLE_TIMEOUT: DurationKey = DurationKey {
    key: "idle_timeout",
    default: secs(60),
    min: Duration::from_millis(1),
    max: secs(3600),
};
/// `shutdown_grace`: Kubernetes' own grace is 30 s by default.
pub const SHUTDOWN_GRACE: DurationKey = DurationKey {
    key: "shutdown_grace",
    default: secs(30),
    min: Duration::from_millis(1),
    max: secs(600),
};
/// `upstream.connect_timeout`.
pub const UPSTREAM_CONNECT_TIMEOUT: DurationKey = DurationKey {
    key: "upstream.connect_timeout",
    default: secs(5),
    min: Duration::from_millis(1),
    max: secs(300),
};
/// `upstream.response_timeout`.
pub const UPSTREAM_RESPONSE_TIMEOUT: DurationKey = DurationKey {
    key: "upstream.response_timeout",
    default: secs(30),
    min: Duration::from_millis(1),
    max: secs(600),
};
/// `upstream.pool_idle_timeout`.
pub const UPSTREAM_POOL_IDLE_TIMEOUT: DurationKey = DurationKey {
    key: "upstream.pool_idle_timeout",
    default: secs(90),
    min: Duration::from_millis(1),
    max: secs(3600),
};
/// `vault.cache_ttl`: another replica's changes show only after it; zero
/// turns the cache off.
pub const VAULT_CACHE_TTL: DurationKey = DurationKey {
    key: "vault.cache_ttl",
    default: DEFAULT_VAULT_CACHE_TTL,
    min: Duration::ZERO,
    max: secs(3600),
};

/// Every duration key with its own bounds (the tests walk this list).
pub const DURATION_KEYS: &[DurationKey] = &[
    REFERENCE_TTL,
    CVC_TTL,
    SESSION_TTL,
    IDEMPOTENCY_TTL,
    HEADER_READ_TIMEOUT,
    IDLE_TIMEOUT,
    SHUTDOWN_GRACE,
    UPSTREAM_CONNECT_TIMEOUT,
    UPSTREAM_RESPONSE_TIMEOUT,
    UPSTREAM_POOL_IDLE_TIMEOUT,
    VAULT_CACHE_TTL,
];

/// The bound of a duration key that has none of its own: 30 days, far
/// from any overflow.
pub const MAX_DURATION: Duration = secs(30 * 24 * 3600);

impl DurationKey {
    /// Parses `value` (humantime) or takes the default; out of range is an
    /// error naming the key and the range.
    pub fn parse(&self, value: Option<&str>) -> Result<Duration, ConfigError> {
        let Some(v) = value else {
            return Ok(self.default);
        };
        let d = humantime::parse_duration(v)
            .map_err(|e| ConfigError::new(self.key, format!("not a duration ({e}): {v:?}")))?;
        if d < self.min || d > self.max {
            let min = if self.min.is_zero() {
                "0s".to_owned()
            } else {
                humantime::format_duration(self.min).to_string()
            };
            return Err(ConfigError::new(
                self.key,
                format!(
                    "{v:?} is out of range: must be between {min} and {}",
                    humantime::format_duration(self.max)
                ),
            ));
        }
        Ok(d)
    }
}

/// A duration key without bounds of its own (`references.timeout`, whose
/// tighter limit its section checks with its own reason): greater than
/// zero, at most [`MAX_DURATION`].
pub(super) fn duration(
    key: &'static str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    DurationKey {
        key,
        default,
        min: Duration::from_millis(1),
        max: MAX_DURATION,
    }
    .parse(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// `key = value` placed where the key lives (top level or its table).
    fn doc_with(key: &str, value: &str) -> String {
        match key.split_once('.') {
            None => format!("{key} = \"{value}\"\n[vault]\nbackend = \"memory\"\n"),
            Some(("vault", k)) => format!("[vault]\nbackend = \"memory\"\n{k} = \"{value}\"\n"),
            Some((table, k)) => {
                format!("[vault]\nbackend = \"memory\"\n[{table}]\n{k} = \"{value}\"\n")
            }
        }
    }

    #[test]
    fn every_duration_is_bounded_and_named() {
        for d in DURATION_KEYS {
            for ok in [d.min, d.max, d.default] {
                let text = humantime::format_duration(ok).to_string();
                let text = if ok.is_zero() { "0s".into() } else { text };
                assert!(
                    Config::parse(&doc_with(d.key, &text)).is_ok(),
                    "{} = {text}",
                    d.key
                );
            }
            let mut bad = vec![
                humantime::format_duration(d.max + Duration::from_millis(1)).to_string(),
                "9000years".to_owned(),
                "600000000000000000000years".to_owned(),
            ];
            if !d.min.is_zero() {
                bad.push("0s".into());
            }
            for text in bad {
                let e = Config::parse(&doc_with(d.key, &text)).unwrap_err();
                assert_eq!(e.key, d.key, "{} = {text}: {e}", d.key);
            }
        }
        // The keys and their defaults as the config uses them.
        let c = Config::defaults();
        assert_eq!(
            [
                c.reference_ttl,
                c.cvc_ttl,
                c.idempotency_ttl,
                c.header_read_timeout,
                c.shutdown_grace
            ],
            [
                REFERENCE_TTL,
                CVC_TTL,
                IDEMPOTENCY_TTL,
                HEADER_READ_TIMEOUT,
                SHUTDOWN_GRACE
            ]
            .map(|d| d.default)
        );
        assert_eq!(
            [
                c.upstream.connect_timeout,
                c.upstream.response_timeout,
                c.upstream.pool_idle_timeout,
                c.vault.cache_ttl
            ],
            [
                UPSTREAM_CONNECT_TIMEOUT,
                UPSTREAM_RESPONSE_TIMEOUT,
                UPSTREAM_POOL_IDLE_TIMEOUT,
                VAULT_CACHE_TTL
            ]
            .map(|d| d.default)
        );
        assert_eq!(
            Config::parse("[vault]\ncache_ttl = \"0s\"")
                .unwrap()
                .vault
                .cache_ttl,
            Duration::ZERO
        );
    }
}
