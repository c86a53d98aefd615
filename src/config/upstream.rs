//! Where forwards go: `[upstream]` (connect and response timeouts, the
//! connection pool) and `[[destinations]]`, the allow-list — empty means
//! nothing is allowed. Certificate files are checked to exist here and read
//! when the forwarder is built.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration::{
    UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_POOL_IDLE_TIMEOUT, UPSTREAM_RESPONSE_TIMEOUT,
};
use super::raw::{RawDestination, RawUpstream};
use super::{readable_file, ConfigError};

/// Scheme allowed for a destination rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DestScheme {
    /// TLS, the default.
    Https,
    /// Plain HTTP, only where a rule says so.
    Http,
}

impl DestScheme {
    /// The URL scheme string.
    pub fn as_str(self) -> &'static str {
        match self {
            DestScheme::Https => "https",
            DestScheme::Http => "http",
        }
    }
}

/// Host pattern of a destination rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Matches exactly this host (lower-cased).
    Exact(String),
    /// `*.suffix`: matches any host with at least one more label before
    /// `.suffix`; stored as `.suffix`.
    Wildcard(String),
}

impl HostPattern {
    /// Whether `host` (already lower-cased) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

/// One allow-list rule.
#[derive(Debug, Clone)]
pub struct DestinationRule {
    /// Hosts this rule admits.
    pub host: HostPattern,
    /// The only port it admits.
    pub port: u16,
    /// The only scheme it admits.
    pub scheme: DestScheme,
    /// Whether private, loopback and link-local addresses may be reached.
    pub allow_private: bool,
    /// Extra trust anchors (PEM) for this destination.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mTLS.
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    pub client_key: Option<PathBuf>,
}

/// Upstream (acquirer) connection settings.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Wait for the response head once the request is sent.
    pub response_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per host.
    pub pool_max_idle_per_host: usize,
}

/// `[upstream]`; no table takes every default.
pub(super) fn upstream(raw: Option<&RawUpstream>) -> Result<UpstreamConfig, ConfigError> {
    let none = RawUpstream::default();
    let up = raw.unwrap_or(&none);
    Ok(UpstreamConfig {
        connect_timeout: UPSTREAM_CONNECT_TIMEOUT.parse(up.connect_timeout.as_deref())?,
        response_timeout: UPSTREAM_RESPONSE_TIMEOUT.parse(up.response_timeout.as_deref())?,
        pool_idle_timeout: UPSTREAM_POOL_IDLE_TIMEOUT.parse(up.pool_idle_timeout.as_deref())?,
        pool_max_idle_per_host: up.pool_max_idle_per_host.unwrap_or(32) as usize,
    })
}

/// `[[destinations]]`: host patterns, ports and schemes, TLS files.
pub(super) fn destinations(raw: &[RawDestination]) -> Result<Vec<DestinationRule>, ConfigError> {
    let mut destinations = Vec::with_capacity(raw.len());
    for (i, d) in raw.iter().enumerate() {
        let key = |field: &str| format!("destinations[{i}].{field}");
        let host = d.host.trim().to_ascii_lowercase();
        let pattern = if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(ConfigError::new(key("host"), "invalid wildcard pattern"));
            }
            HostPattern::Wildcard(format!(".{suffix}"))
        } else {
            if host.is_empty() || host.contains('*') || host.contains('/') {
                return Err(ConfigError::new(
                    key("host"),
                    "expected a host name, an IP address or \"*.domain\"",
                ));
            }
            HostPattern::Exact(host.trim_matches(['[', ']']).to_owned())
        };
        let scheme = d.scheme.unwrap_or(DestScheme::Https);
        let port = d.port.unwrap_or(match scheme {
            DestScheme::Https => 443,
            DestScheme::Http => 80,
        });
        readable_file(&key("ca_file"), d.ca_file.as_deref())?;
        readable_file(&key("client_cert"), d.client_cert.as_deref())?;
        readable_file(&key("client_key"), d.client_key.as_deref())?;
        if d.client_cert.is_some() != d.client_key.is_some() {
            return Err(ConfigError::new(
                key("client_key"),
                "client_cert and client_key must be given together",
            ));
        }
        if scheme == DestScheme::Http && (d.ca_file.is_some() || d.client_cert.is_some()) {
            return Err(ConfigError::new(
                key("scheme"),
                "TLS settings given for a plain-http rule",
            ));
        }
        destinations.push(DestinationRule {
            host: pattern,
            port,
            scheme,
            allow_private: d.allow_private,
            ca_file: d.ca_file.clone(),
            client_cert: d.client_cert.clone(),
            client_key: d.client_key.clone(),
        });
    }
    Ok(destinations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn bad_values_name_their_key() {
        for (doc, key) in [
            (
                "[upstream]\nconnect_timeout = \"0s\"",
                "upstream.connect_timeout",
            ),
            ("[[destinations]]\nhost = \"*.\"", "destinations[0].host"),
            ("[[destinations]]\nhost = \"a/b\"", "destinations[0].host"),
            (
                "[[destinations]]\nhost = \"a.example\"\nca_file = \"/nonexistent\"",
                "destinations[0].ca_file",
            ),
            (
                "[[destinations]]\nhost = \"a.example\"\nclient_cert = \"Cargo.toml\"",
                "destinations[0].client_key",
            ),
            (
                "[[destinations]]\nhost = \"a.example\"\nscheme = \"http\"\nca_file = \"Cargo.toml\"",
                "destinations[0].scheme",
            ),
        ] {
            let e = Config::parse(doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
        }
    }

    #[test]
    fn a_rule_defaults_to_https_on_its_port() {
        let c = Config::parse(
            "[[destinations]]\nhost = \"API.Acquirer.example\"\n[[destinations]]\nhost = \"*.psp.example\"\nscheme = \"http\"",
        )
        .unwrap();
        let [a, b] = &c.destinations[..] else {
            panic!("two rules: {:?}", c.destinations)
        };
        assert_eq!(a.host, HostPattern::Exact("api.acquirer.example".into()));
        assert_eq!((a.scheme, a.port), (DestScheme::Https, 443));
        assert_eq!(b.host, HostPattern::Wildcard(".psp.example".into()));
        assert_eq!((b.scheme, b.port), (DestScheme::Http, 80));
    }

    #[test]
    fn wildcard_needs_one_more_label() {
        let p = HostPattern::Wildcard(".acquirer.example".into());
        assert!(p.matches("api.acquirer.example"));
        assert!(!p.matches("acquirer.example"));
        assert!(!p.matches("evilacquirer.example"));
    }
}
