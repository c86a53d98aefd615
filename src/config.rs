//! Configuration: raw TOML → validation → the typed [`Config`] the rest of
//! the crate uses.
//!
//! Parsing never binds a port or opens a file other than the config itself
//! and the files it names for validation, so `check-config` and `serve` fail
//! the same way, before anything starts. Every error names the key at fault.
//! Secrets (the master key, database passwords) are never read from the TOML:
//! they come from the environment or from files the TOML names.
//!
//! | module | owns |
//! |---|---|
//! | `raw` | the TOML document's structs, unknown keys refused |
//! | `duration` | [`DurationKey`], the bounded type every duration key is read through, and the table of them |
//! | `listeners` | `listen`, `admin_listen`, `[tls]`, connections, workers, connection timeouts |
//! | `limits` | body, rendered-request, forward-record and log-buffer sizes |
//! | `merchant` | compliance level, token service, placeholders, redaction, TTLs |
//! | `api_keys` | `[[api_keys]]` |
//! | `vault` | `[vault]` |
//! | `references` | `[references]` |
//! | `upstream` | `[upstream]` and the `[[destinations]]` allow-list |
//! | `routes` | `[[routes]]` and `routes_only` |
//! | `surfaces` | `[surfaces]` |
//!
//! Each section module validates its own keys from the raw document into
//! its typed values; `validate` puts the sections together. The modules
//! are private: everything public is re-exported here, so `crate::config::X`
//! is the only path.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::auth::ApiKey;

mod api_keys;
mod duration;
mod limits;
mod listeners;
mod merchant;
mod raw;
mod references;
mod routes;
mod surfaces;
mod upstream;
mod vault;

pub use duration::{
    DurationKey, CVC_TTL, DEFAULT_VAULT_CACHE_TTL, DURATION_KEYS, HEADER_READ_TIMEOUT,
    IDEMPOTENCY_TTL, IDLE_TIMEOUT, MAX_DURATION, REFERENCE_TTL, SESSION_TTL, SHUTDOWN_GRACE,
    UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_POOL_IDLE_TIMEOUT, UPSTREAM_RESPONSE_TIMEOUT,
    VAULT_CACHE_TTL,
};
pub use listeners::ListenTls;
pub use merchant::{ComplianceLevel, PlaceholderSyntax};
pub use references::{
    RedisConfig, ReferenceBackend, DEFAULT_REDIS_KEY_PREFIX, DEFAULT_REDIS_TIMEOUT,
};
pub use routes::{RouteConfig, RouteSubject};
pub use surfaces::Surfaces;
pub use upstream::{DestScheme, DestinationRule, HostPattern, UpstreamConfig};
pub use vault::{VaultBackend, VaultConfig};

/// A configuration error, naming the key that caused it.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending key, e.g. `destinations[0].host`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// API and forward listener.
    pub listen: SocketAddr,
    /// Health and metrics listener.
    pub admin_listen: SocketAddr,
    /// TLS for `listen`, if configured.
    pub listen_tls: Option<ListenTls>,
    /// Compliance level of the merchant.
    pub compliance_level: ComplianceLevel,
    /// Lifetime of a cryptogram reference.
    pub reference_ttl: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Largest rendered request (body, headers, URL) a forward may send,
    /// by the template's upper bound; beyond it, 413 before anything is
    /// consumed. Default 4 × `max_body_bytes`.
    pub max_rendered_bytes: usize,
    /// How long a CVC is held in memory for one forward.
    pub cvc_ttl: Duration,
    /// Lifetime of a card-capture session (contract §11).
    pub session_ttl: Duration,
    /// Placeholder delimiters.
    pub placeholder_syntax: PlaceholderSyntax,
    /// Mask injected values echoed back by the acquirer.
    pub redact_responses: bool,
    /// How long idempotency records are kept.
    pub idempotency_ttl: Duration,
    /// Most response body bytes a keyed forward records for its replay
    /// (contract §9); a longer body is recorded as its head, marked
    /// truncated.
    pub forward_record_max_bytes: usize,
    /// Most concurrent client connections.
    pub max_connections: usize,
    /// Threads serving `listen`, each with its own single-threaded runtime
    /// (`crate::server::Workers`); by default one per core.
    pub workers: usize,
    /// Bound of the log lines waiting for stdout; past it lines are
    /// dropped and counted (`crate::telemetry::LogBuffer`).
    pub log_buffer_bytes: usize,
    /// Time a client has to send its request head, and from accept to its
    /// first request.
    pub header_read_timeout: Duration,
    /// How long a client connection may stay open with no request in
    /// flight after its first one.
    pub idle_timeout: Duration,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// API keys, hashed.
    pub api_keys: Vec<ApiKey>,
    /// Token vault.
    pub vault: VaultConfig,
    /// Reference store backend.
    pub references: ReferenceBackend,
    /// Most references alive at once; beyond it, 503 `reference_store_full`.
    pub reference_max_entries: u64,
    /// Upstream settings.
    pub upstream: UpstreamConfig,
    /// The allow-list.
    pub destinations: Vec<DestinationRule>,
    /// Operator-defined forwards (`[[routes]]`).
    pub routes: Vec<RouteConfig>,
    /// Refuse free-form forwards: card data leaves only through routes.
    pub routes_only: bool,
    /// Which compatible surfaces (contract §12) are served.
    pub surfaces: Surfaces,
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("(file)", format!("cannot read {}: {e}", path.display()))
        })?;
        // Route templates are named relative to the config file.
        let base = path.parent().unwrap_or(Path::new(""));
        Config::parse_in(&text, base)
    }

    /// Parses and validates a TOML document; relative route template paths
    /// are taken from the current directory.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_in(text, Path::new(""))
    }

    /// Parses and validates a TOML document whose relative route template
    /// paths start at `base` (the config file's folder).
    pub fn parse_in(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message names the unknown or mistyped key; keep it.
            ConfigError::new("(document)", e.message().to_owned())
        })?;
        validate(&raw, base)
    }

    /// A configuration with every default, no API keys or destinations,
    /// and the vault in memory (asked for by name, as a TOML file would
    /// have to): the starting point for tests and the demo, which leave no
    /// files behind. An empty TOML document means a SQLite vault instead.
    pub fn defaults() -> Config {
        // This document always validates.
        match Config::parse("[vault]\nbackend = \"memory\"\n") {
            Ok(c) => c,
            Err(e) => unreachable!("the defaults must validate: {e}"),
        }
    }
}

/// The raw document, section by section, into a [`Config`]; the first
/// error wins. Relative route template paths start at `base`.
fn validate(raw: &raw::RawConfig, base: &Path) -> Result<Config, ConfigError> {
    let listeners = listeners::validate(raw)?;
    let limits = limits::validate(raw)?;
    let merchant = merchant::validate(raw)?;
    let api_keys = api_keys::validate(&raw.api_keys)?;
    // No `[vault]` means the same as an empty one: SQLite. Tokens are
    // never kept in memory only unless `backend = "memory"` says so.
    let vault = vault::validate(raw.vault.as_ref().unwrap_or(&raw::RawVault::default()))?;
    let (references, reference_max_entries) = references::validate(raw.references.as_ref())?;
    let upstream = upstream::upstream(raw.upstream.as_ref())?;
    let destinations = upstream::destinations(&raw.destinations)?;
    let routes = routes::validate(&raw.routes, base)?;
    Ok(Config {
        listen: listeners.listen,
        admin_listen: listeners.admin_listen,
        listen_tls: listeners.listen_tls,
        compliance_level: merchant.compliance_level,
        reference_ttl: merchant.reference_ttl,
        max_body_bytes: limits.max_body_bytes,
        max_rendered_bytes: limits.max_rendered_bytes,
        cvc_ttl: merchant.cvc_ttl,
        session_ttl: merchant.session_ttl,
        placeholder_syntax: merchant.placeholder_syntax,
        redact_responses: merchant.redact_responses,
        idempotency_ttl: merchant.idempotency_ttl,
        forward_record_max_bytes: limits.forward_record_max_bytes,
        max_connections: listeners.max_connections,
        workers: listeners.workers,
        log_buffer_bytes: limits.log_buffer_bytes,
        header_read_timeout: listeners.header_read_timeout,
        idle_timeout: listeners.idle_timeout,
        shutdown_grace: listeners.shutdown_grace,
        api_keys,
        vault,
        references,
        reference_max_entries,
        upstream,
        destinations,
        routes,
        routes_only: raw.routes_only.unwrap_or(false),
        surfaces: surfaces::validate(raw.surfaces.as_ref()),
    })
}

/// A file the config names must exist when it is named.
fn readable_file(key: &str, path: Option<&Path>) -> Result<(), ConfigError> {
    if let Some(p) = path {
        if !p.is_file() {
            return Err(ConfigError::new(
                key,
                format!("file not found: {}", p.display()),
            ));
        }
    }
    Ok(())
}

/// Refuses a URL that carries a password, in its user info
/// (`scheme://user:secret@host`) or in a query parameter (`?password=`,
/// `?sslpassword=`, …): secrets never live in the TOML, nor in `Config`'s
/// `Debug`. The message never repeats the URL. `secret_source` names
/// where the password goes instead.
fn no_password_in_url(key: &str, url: &str, secret_source: &str) -> Result<(), ConfigError> {
    let refuse = || {
        ConfigError::new(
            key,
            format!("must not contain a password; use {secret_source}"),
        )
    };
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split('#').next().unwrap_or("");
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Err(refuse());
        }
    }
    for pair in query.split('&') {
        let name = pair.split('=').next().unwrap_or("").to_ascii_lowercase();
        if name.contains("pass") || name.contains("pwd") || name.contains("secret") {
            return Err(refuse());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_takes_every_default() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.compliance_level, ComplianceLevel::SaqA);
        assert_eq!(c.reference_ttl, Duration::from_secs(900));
        assert_eq!(c.session_ttl, Duration::from_secs(900));
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert!(c.redact_responses);
        assert_eq!(c.forward_record_max_bytes, 64 << 10);
        assert!(c.destinations.is_empty());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("listen = \"127.0.0.1:1\"\nlisten_port = 3\n").unwrap_err();
        assert!(e.to_string().contains("listen_port"), "{e}");
    }

    #[test]
    fn no_password_in_any_url() {
        for (doc, key) in [
            ("[vault]\nbackend = \"postgres\"\nurl = \"postgres://app:hunter2@db/vault\"", "vault.url"),
            ("[vault]\nbackend = \"postgres\"\nurl = \"postgresql://app@db/vault?password=hunter2\"", "vault.url"),
            ("[vault]\nbackend = \"postgres\"\nurl = \"postgres://app@db/vault?sslmode=require&PassWord=hunter2\"", "vault.url"),
            ("[vault]\nbackend = \"postgres\"\nurl = \"postgres://app@db/vault?sslpassword=hunter2\"", "vault.url"),
            ("[references]\nbackend = \"redis\"\nurl = \"redis://cache/0?password=hunter2\"", "references.url"),
            ("[references]\nbackend = \"redis\"\nurl = \"rediss://u:hunter2@cache/0\"", "references.url"),
        ] {
            let e = Config::parse(doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        let ok = Config::parse(
            "[vault]\nbackend = \"postgres\"\nurl = \"postgres://app@db:5432/vault?sslmode=verify-full\"",
        )
        .unwrap();
        assert!(!format!("{ok:?}").contains("hunter2"));
    }
}
