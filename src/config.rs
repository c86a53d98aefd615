//! Configuration: raw TOML → validation → the typed [`Config`] the rest of
//! the crate uses.
//!
//! Parsing never binds a port or opens a file other than the config itself
//! and the files it names for validation, so `check-config` and `serve` fail
//! the same way, before anything starts. Every error names the key at fault.
//! Secrets (the master key, database passwords) are never read from the TOML:
//! they come from the environment or from files the TOML names.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::auth::{ApiKey, KeyHash, Scope};

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

/// PCI DSS compliance level of the merchant; decides what may leave the vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComplianceLevel {
    /// The merchant never sees card data: references only, no PAN input.
    SaqA,
    /// The merchant handles card data.
    SaqD,
    /// Report on compliance: the merchant is fully assessed.
    Roc,
}

impl ComplianceLevel {
    /// Whether the merchant may send or receive raw card data.
    pub fn handles_card_data(self) -> bool {
        !matches!(self, ComplianceLevel::SaqA)
    }
}

/// Placeholder delimiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlaceholderSyntax {
    /// `<< name >>`
    Angle,
    /// `{{ name }}`, as Hellgate writes them.
    Braces,
}

/// Where network tokens are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultBackend {
    /// In-process only; lost on restart. For tests and throwaway tries.
    Memory,
    /// A SQLite file: the embedded default.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// PostgreSQL, for several replicas sharing one vault.
    Postgres {
        /// Connection URL without a password.
        url: String,
        /// File holding the password (else `TOKENRELAY_POSTGRES_PASSWORD`).
        password_file: Option<PathBuf>,
    },
}

/// The vault: backend and master key source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultConfig {
    /// The backend.
    pub backend: VaultBackend,
    /// Key file (unless `TOKENRELAY_MASTER_KEY` is set).
    pub key_file: Option<PathBuf>,
    /// Create a development key file when missing (local tries only).
    pub create_key_file: bool,
    /// How long a SQL vault's tokens stay cached in this process
    /// (`vault.cache_ttl`, default 5 s; zero turns the cache off). Another
    /// replica's changes show here after at most this long.
    pub cache_ttl: Duration,
}

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

/// Which forward endpoint may use a route (`routes[].subjects`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteSubject {
    /// `POST /api/network/tokens/{id}/forward/{route}`
    NetworkToken,
    /// `POST /api/pci/tokens/{id}/forward/{route}`
    PciToken,
}

/// One `[[routes]]` entry (contract §10). Its destination is checked
/// against the allow-list and its template compiled when the forwarder is
/// built (`forward::route::Routes`), which `serve` and `check-config` both do.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// `[a-z0-9-]+`, the `{route}` path segment.
    pub name: String,
    /// The fixed destination URL.
    pub destination: String,
    /// The outbound method.
    pub method: http::Method,
    /// The template file, resolved against the config file's folder.
    pub template: PathBuf,
    /// Which forward endpoints may use it.
    pub subjects: Vec<RouteSubject>,
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

/// Optional TLS on the API listener.
#[derive(Debug, Clone)]
pub struct ListenTls {
    /// Certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Private key (PEM).
    pub key_file: PathBuf,
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

/// The compatible surfaces switches (`[surfaces]`); both on by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Surfaces {
    /// VGS Card Management Platform network tokens (`/cards/…`).
    pub vgs_cmp: bool,
    /// J.P. Morgan `POST /cryptograms`.
    pub jpmc: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSurfaces {
    vgs_cmp: Option<bool>,
    jpmc: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    compliance_level: Option<ComplianceLevel>,
    reference_ttl: Option<String>,
    cvc_ttl: Option<String>,
    session_ttl: Option<String>,
    max_body_bytes: Option<u64>,
    max_rendered_bytes: Option<u64>,
    placeholder_syntax: Option<PlaceholderSyntax>,
    redact_responses: Option<bool>,
    idempotency_ttl: Option<String>,
    forward_record_max_bytes: Option<u64>,
    max_connections: Option<u64>,
    workers: Option<u64>,
    log_buffer_bytes: Option<u64>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    shutdown_grace: Option<String>,
    tsp: Option<String>,
    tls: Option<RawTls>,
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
    vault: Option<RawVault>,
    references: Option<RawReferences>,
    upstream: Option<RawUpstream>,
    #[serde(default)]
    destinations: Vec<RawDestination>,
    surfaces: Option<RawSurfaces>,
    routes_only: Option<bool>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    destination: String,
    method: Option<String>,
    template: PathBuf,
    subjects: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    name: String,
    hash: String,
    scopes: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVault {
    backend: Option<String>,
    path: Option<PathBuf>,
    key_file: Option<PathBuf>,
    create_key_file: Option<bool>,
    url: Option<String>,
    password_file: Option<PathBuf>,
    cache_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReferences {
    backend: Option<String>,
    url: Option<String>,
    password_file: Option<PathBuf>,
    key_prefix: Option<String>,
    ca_file: Option<PathBuf>,
    timeout: Option<String>,
    max_entries: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    pool_max_idle_per_host: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    host: String,
    port: Option<u16>,
    scheme: Option<DestScheme>,
    #[serde(default)]
    allow_private: bool,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message names the unknown or mistyped key; keep it.
            ConfigError::new("(document)", e.message().to_owned())
        })?;
        raw.validate(base)
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
    pub fn parse(&self, value: Option<String>) -> Result<Duration, ConfigError> {
        let Some(v) = value else {
            return Ok(self.default);
        };
        let d = humantime::parse_duration(&v)
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

/// A duration key without bounds of its own (kept for keys other issues
/// add before giving them a [`DurationKey`]): greater than zero, at most
/// [`MAX_DURATION`].
#[allow(dead_code)]
fn duration(
    key: &'static str,
    value: Option<String>,
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

fn socket_addr(key: &str, value: Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    let v = value.unwrap_or_else(|| default.to_owned());
    v.parse()
        .map_err(|_| ConfigError::new(key, format!("not an IP:port address: {v:?}")))
}

fn readable_file(key: &str, path: &Option<PathBuf>) -> Result<(), ConfigError> {
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

/// Validates `[[routes]]`: names, methods, subjects; template paths resolved
/// against `base`. The destination and the template itself are checked
/// where they are used (`forward::route`).
fn routes(raw: Vec<RawRoute>, base: &Path) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut seen = HashSet::new();
    let mut routes = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("routes[{i}].{field}");
        if r.name.is_empty()
            || r.name.len() > 64
            || !r
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ConfigError::new(
                key("name"),
                format!("{:?} must be 1-64 characters of a-z 0-9 -", r.name),
            ));
        }
        if !seen.insert(r.name.clone()) {
            return Err(ConfigError::new(
                key("name"),
                format!("route {:?} is defined twice", r.name),
            ));
        }
        let method = match r.method.as_deref() {
            None => http::Method::POST,
            Some(m) => {
                let m = m.to_ascii_uppercase();
                match m.as_str() {
                    "GET" | "POST" | "PUT" | "PATCH" | "DELETE" => {}
                    _ => {
                        return Err(ConfigError::new(
                            key("method"),
                            format!("{m:?} is not one of GET, POST, PUT, PATCH, DELETE"),
                        ))
                    }
                }
                http::Method::from_bytes(m.as_bytes())
                    .map_err(|_| ConfigError::new(key("method"), "not an HTTP method"))?
            }
        };
        if r.subjects.is_empty() {
            return Err(ConfigError::new(
                key("subjects"),
                "name at least one of \"network_token\", \"pci_token\"",
            ));
        }
        let mut subjects = Vec::with_capacity(r.subjects.len());
        for s in &r.subjects {
            let subject = match s.as_str() {
                "network_token" => RouteSubject::NetworkToken,
                "pci_token" => RouteSubject::PciToken,
                other => {
                    return Err(ConfigError::new(
                        key("subjects"),
                        format!("unknown subject {other:?} (network_token, pci_token)"),
                    ))
                }
            };
            if !subjects.contains(&subject) {
                subjects.push(subject);
            }
        }
        routes.push(RouteConfig {
            name: r.name,
            destination: r.destination,
            method,
            template: base.join(r.template),
            subjects,
        });
    }
    Ok(routes)
}

/// `[vault]`: backend, key source, cache.
fn vault(v: RawVault) -> Result<VaultConfig, ConfigError> {
    let backend = match v.backend.as_deref().unwrap_or("sqlite") {
        "memory" => {
            if v.path.is_some() || v.url.is_some() {
                return Err(ConfigError::new(
                    "vault",
                    "path and url do not apply to backend \"memory\"",
                ));
            }
            VaultBackend::Memory
        }
        "sqlite" => {
            if v.url.is_some() || v.password_file.is_some() {
                return Err(ConfigError::new(
                    "vault.url",
                    "url and password_file apply to backend \"postgres\" only",
                ));
            }
            VaultBackend::Sqlite {
                path: v
                    .path
                    .unwrap_or_else(|| PathBuf::from("data/tokenrelay.db")),
            }
        }
        "postgres" => {
            let url = v.url.ok_or_else(|| {
                ConfigError::new("vault.url", "required for backend \"postgres\"")
            })?;
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::new("vault.url", "must start with postgres://"));
            }
            no_password_in_url(
                "vault.url",
                &url,
                "vault.password_file or TOKENRELAY_POSTGRES_PASSWORD",
            )?;
            if v.path.is_some() {
                return Err(ConfigError::new(
                    "vault.path",
                    "applies to backend \"sqlite\" only",
                ));
            }
            readable_file("vault.password_file", &v.password_file)?;
            VaultBackend::Postgres {
                url,
                password_file: v.password_file,
            }
        }
        other => {
            return Err(ConfigError::new(
                "vault.backend",
                format!("unknown backend {other:?} (memory, sqlite, postgres)"),
            ))
        }
    };
    let cache_ttl = VAULT_CACHE_TTL.parse(v.cache_ttl)?;
    Ok(VaultConfig {
        backend,
        key_file: v.key_file,
        create_key_file: v.create_key_file.unwrap_or(false),
        cache_ttl,
    })
}

impl RawConfig {
    fn validate(self, base: &Path) -> Result<Config, ConfigError> {
        let listen = socket_addr("listen", self.listen, "127.0.0.1:8080")?;
        let admin_listen = socket_addr("admin_listen", self.admin_listen, "127.0.0.1:9090")?;
        let compliance_level = self.compliance_level.unwrap_or(ComplianceLevel::SaqA);
        let reference_ttl = REFERENCE_TTL.parse(self.reference_ttl)?;
        let max_body_bytes = self.max_body_bytes.unwrap_or(1 << 20);
        if max_body_bytes == 0 || max_body_bytes > (64 << 20) {
            return Err(ConfigError::new(
                "max_body_bytes",
                "must be between 1 and 67108864",
            ));
        }
        let forward_record_max_bytes = self.forward_record_max_bytes.unwrap_or(64 << 10);
        if forward_record_max_bytes == 0 || forward_record_max_bytes > (16 << 20) {
            return Err(ConfigError::new(
                "forward_record_max_bytes",
                "must be between 1 and 16777216",
            ));
        }
        let log_buffer_bytes = self
            .log_buffer_bytes
            .unwrap_or(crate::telemetry::DEFAULT_LOG_BUFFER_BYTES as u64);
        if !(64 << 10..=256 << 20).contains(&log_buffer_bytes) {
            return Err(ConfigError::new(
                "log_buffer_bytes",
                "must be between 65536 and 268435456",
            ));
        }
        let max_rendered_bytes = self.max_rendered_bytes.unwrap_or(4 * max_body_bytes);
        if max_rendered_bytes < max_body_bytes || max_rendered_bytes > (256 << 20) {
            return Err(ConfigError::new(
                "max_rendered_bytes",
                "must be at least max_body_bytes and at most 268435456",
            ));
        }
        let max_connections = self.max_connections.unwrap_or(4096);
        if max_connections == 0 {
            return Err(ConfigError::new(
                "max_connections",
                "must be greater than zero",
            ));
        }
        let workers = match self.workers {
            None => std::thread::available_parallelism().map_or(1, usize::from),
            Some(n @ 1..=256) => n as usize,
            Some(_) => {
                return Err(ConfigError::new("workers", "must be between 1 and 256"));
            }
        };
        if let Some(tsp) = &self.tsp {
            if tsp != "sandbox" {
                return Err(ConfigError::new(
                    "tsp",
                    format!("unknown token service provider {tsp:?} (supported: \"sandbox\")"),
                ));
            }
        }
        let listen_tls = match self.tls {
            None => None,
            Some(t) => {
                readable_file("tls.cert_file", &Some(t.cert_file.clone()))?;
                readable_file("tls.key_file", &Some(t.key_file.clone()))?;
                Some(ListenTls {
                    cert_file: t.cert_file,
                    key_file: t.key_file,
                })
            }
        };

        let mut api_keys = Vec::with_capacity(self.api_keys.len());
        let mut names = HashSet::new();
        for (i, k) in self.api_keys.into_iter().enumerate() {
            let key = |field: &str| format!("api_keys[{i}].{field}");
            if k.name.trim().is_empty() {
                return Err(ConfigError::new(key("name"), "must not be empty"));
            }
            if !names.insert(k.name.clone()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("duplicate key name {:?}", k.name),
                ));
            }
            let hash = KeyHash::parse(&k.hash).ok_or_else(|| {
                ConfigError::new(
                    key("hash"),
                    "expected \"sha256:<64 hex digits>\" as printed by `tokenrelay hash-key`",
                )
            })?;
            let mut scopes = Vec::with_capacity(k.scopes.len());
            for s in &k.scopes {
                scopes.push(Scope::parse(s).ok_or_else(|| {
                    ConfigError::new(
                        key("scopes"),
                        format!(
                            "unknown scope {s:?} (expected tokens, cryptograms, forward, admin)"
                        ),
                    )
                })?);
            }
            api_keys.push(ApiKey {
                name: k.name,
                hash,
                scopes,
            });
        }

        // No `[vault]` means the same as an empty one: SQLite. Tokens are
        // never kept in memory only unless `backend = "memory"` says so.
        let vault = vault(self.vault.unwrap_or_default())?;

        let (references, reference_max_entries) = match self.references {
            None => (ReferenceBackend::Memory, 1_000_000),
            Some(r) => {
                let backend = r.backend.as_deref().unwrap_or("memory");
                let backend = match backend {
                    "memory" => {
                        for (key, given) in [
                            ("references.url", r.url.is_some()),
                            ("references.password_file", r.password_file.is_some()),
                            ("references.key_prefix", r.key_prefix.is_some()),
                            ("references.ca_file", r.ca_file.is_some()),
                            ("references.timeout", r.timeout.is_some()),
                        ] {
                            if given {
                                return Err(ConfigError::new(
                                    key,
                                    "applies to backend \"redis\" only",
                                ));
                            }
                        }
                        ReferenceBackend::Memory
                    }
                    "redis" => {
                        let url = r.url.ok_or_else(|| {
                            ConfigError::new("references.url", "required for backend \"redis\"")
                        })?;
                        redis_url("references.url", &url)?;
                        readable_file("references.password_file", &r.password_file)?;
                        let key_prefix = r
                            .key_prefix
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
                        readable_file("references.ca_file", &r.ca_file)?;
                        if r.ca_file.is_some() && !url.starts_with("rediss://") {
                            return Err(ConfigError::new(
                                "references.ca_file",
                                "applies to rediss:// URLs only",
                            ));
                        }
                        let timeout =
                            duration("references.timeout", r.timeout, DEFAULT_REDIS_TIMEOUT)?;
                        if timeout > Duration::from_secs(60) {
                            return Err(ConfigError::new(
                                "references.timeout",
                                "must be at most 60s (a replica waits that long on a dead connection)",
                            ));
                        }
                        ReferenceBackend::Redis(RedisConfig {
                            url,
                            password_file: r.password_file,
                            key_prefix,
                            ca_file: r.ca_file,
                            timeout,
                        })
                    }
                    other => {
                        return Err(ConfigError::new(
                            "references.backend",
                            format!("unknown backend {other:?} (memory, redis)"),
                        ))
                    }
                };
                let max = r.max_entries.unwrap_or(1_000_000);
                if max == 0 {
                    return Err(ConfigError::new(
                        "references.max_entries",
                        "must be greater than zero",
                    ));
                }
                (backend, max)
            }
        };

        let up = self.upstream.unwrap_or(RawUpstream {
            connect_timeout: None,
            response_timeout: None,
            pool_idle_timeout: None,
            pool_max_idle_per_host: None,
        });
        let upstream = UpstreamConfig {
            connect_timeout: UPSTREAM_CONNECT_TIMEOUT.parse(up.connect_timeout)?,
            response_timeout: UPSTREAM_RESPONSE_TIMEOUT.parse(up.response_timeout)?,
            pool_idle_timeout: UPSTREAM_POOL_IDLE_TIMEOUT.parse(up.pool_idle_timeout)?,
            pool_max_idle_per_host: up.pool_max_idle_per_host.unwrap_or(32) as usize,
        };

        let mut destinations = Vec::with_capacity(self.destinations.len());
        for (i, d) in self.destinations.into_iter().enumerate() {
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
            readable_file(&key("ca_file"), &d.ca_file)?;
            readable_file(&key("client_cert"), &d.client_cert)?;
            readable_file(&key("client_key"), &d.client_key)?;
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
                ca_file: d.ca_file,
                client_cert: d.client_cert,
                client_key: d.client_key,
            });
        }

        Ok(Config {
            listen,
            admin_listen,
            listen_tls,
            compliance_level,
            reference_ttl,
            max_body_bytes: max_body_bytes as usize,
            max_rendered_bytes: max_rendered_bytes as usize,
            cvc_ttl: CVC_TTL.parse(self.cvc_ttl)?,
            session_ttl: SESSION_TTL.parse(self.session_ttl)?,
            placeholder_syntax: self.placeholder_syntax.unwrap_or(PlaceholderSyntax::Angle),
            redact_responses: self
                .redact_responses
                .unwrap_or(compliance_level == ComplianceLevel::SaqA),
            idempotency_ttl: IDEMPOTENCY_TTL.parse(self.idempotency_ttl)?,
            forward_record_max_bytes: forward_record_max_bytes as usize,
            max_connections: max_connections as usize,
            workers,
            log_buffer_bytes: log_buffer_bytes as usize,
            header_read_timeout: HEADER_READ_TIMEOUT.parse(self.header_read_timeout)?,
            idle_timeout: IDLE_TIMEOUT.parse(self.idle_timeout)?,
            shutdown_grace: SHUTDOWN_GRACE.parse(self.shutdown_grace)?,
            api_keys,
            vault,
            references,
            reference_max_entries,
            upstream,
            destinations,
            routes: routes(self.routes, base)?,
            routes_only: self.routes_only.unwrap_or(false),
            surfaces: {
                let raw = self.surfaces.unwrap_or_default();
                Surfaces {
                    vgs_cmp: raw.vgs_cmp.unwrap_or(true),
                    jpmc: raw.jpmc.unwrap_or(true),
                }
            },
        })
    }
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
    fn bad_values_name_their_key() {
        for (doc, key) in [
            ("reference_ttl = \"soon\"", "reference_ttl"),
            ("session_ttl = \"2h\"", "session_ttl"),
            ("session_ttl = \"0s\"", "session_ttl"),
            ("listen = \"localhost\"", "listen"),
            (
                "[upstream]\nconnect_timeout = \"0s\"",
                "upstream.connect_timeout",
            ),
            (
                "[[api_keys]]\nname = \"a\"\nhash = \"plain\"\nscopes = []",
                "api_keys[0].hash",
            ),
            ("[[destinations]]\nhost = \"*.\"", "destinations[0].host"),
            (
                "[[destinations]]\nhost = \"a.example\"\nca_file = \"/nonexistent\"",
                "destinations[0].ca_file",
            ),
            ("[vault]\nbackend = \"oracle\"", "vault.backend"),
            ("[vault]\ncache_ttl = \"soon\"", "vault.cache_ttl"),
            ("[vault]\ncache_ttl = \"2h\"", "vault.cache_ttl"),
            ("forward_record_max_bytes = 0", "forward_record_max_bytes"),
            (
                "forward_record_max_bytes = 16777217",
                "forward_record_max_bytes",
            ),
        ] {
            let e = Config::parse(doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
        }
    }

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

    #[test]
    fn no_vault_table_means_sqlite_as_an_empty_one_does() {
        let sqlite = VaultBackend::Sqlite {
            path: PathBuf::from("data/tokenrelay.db"),
        };
        assert_eq!(Config::parse("").unwrap().vault.backend, sqlite);
        assert_eq!(
            Config::parse("[vault]").unwrap().vault,
            Config::parse("").unwrap().vault
        );
        assert_eq!(
            Config::parse("[vault]\nbackend = \"memory\"")
                .unwrap()
                .vault
                .backend,
            VaultBackend::Memory,
            "memory only when asked for by name"
        );
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

    #[test]
    fn routes_are_checked_and_their_templates_found_beside_the_config() {
        let ok = "[[routes]]\nname = \"adyen-payments\"\ndestination = \"https://a.example/p\"\ntemplate = \"routes/a.json.j2\"\nsubjects = [\"network_token\", \"pci_token\"]";
        let c = Config::parse_in(ok, Path::new("/etc/tokenrelay")).unwrap();
        let r = &c.routes[0];
        assert_eq!(r.method, http::Method::POST);
        assert_eq!(r.template, Path::new("/etc/tokenrelay/routes/a.json.j2"));
        assert_eq!(
            r.subjects,
            [RouteSubject::NetworkToken, RouteSubject::PciToken]
        );
        assert!(!c.routes_only);
        assert!(Config::parse("routes_only = true").unwrap().routes_only);
        for (doc, key) in [
            (ok.replace("adyen-payments", "Adyen"), "routes[0].name"),
            (ok.replace("adyen-payments", "a/b"), "routes[0].name"),
            (format!("{ok}\nmethod = \"CONNECT\""), "routes[0].method"),
            (
                ok.replace("\"network_token\", \"pci_token\"", ""),
                "routes[0].subjects",
            ),
            (ok.replace("pci_token", "card"), "routes[0].subjects"),
            (format!("{ok}\n{ok}"), "routes[1].name"),
        ] {
            let e = Config::parse(&doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
        }
    }

    #[test]
    fn wildcard_needs_one_more_label() {
        let p = HostPattern::Wildcard(".acquirer.example".into());
        assert!(p.matches("api.acquirer.example"));
        assert!(!p.matches("acquirer.example"));
        assert!(!p.matches("evilacquirer.example"));
    }

    #[test]
    fn surfaces_default_on_switch_off_and_refuse_strangers() {
        let c = Config::parse("").unwrap();
        assert_eq!(
            c.surfaces,
            Surfaces {
                vgs_cmp: true,
                jpmc: true
            }
        );
        let c = Config::parse("[surfaces]\nvgs_cmp = false\n").unwrap();
        assert!(!c.surfaces.vgs_cmp && c.surfaces.jpmc);
        let c = Config::parse("[surfaces]\njpmc = false\n").unwrap();
        assert!(c.surfaces.vgs_cmp && !c.surfaces.jpmc);
        let e = Config::parse("[surfaces]\nstripe = true\n").unwrap_err();
        assert!(e.to_string().contains("stripe"), "{e}");
        let e = Config::parse("[surfaces]\njpmc = \"yes\"\n").unwrap_err();
        assert!(e.to_string().contains("boolean"), "{e}");
    }
}
