//! The TOML document as written: every table and key the config accepts,
//! and nothing else (`deny_unknown_fields` everywhere, so a misspelt key is
//! an error naming it, never silently a default). No checks here beyond
//! TOML's types: the section modules validate, [`super::validate`] builds.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ComplianceLevel, DestScheme, PlaceholderSyntax};

/// The whole document. Top-level keys of several sections sit side by side
/// here (serde's `flatten` cannot be combined with `deny_unknown_fields`);
/// the module table in [`super`] says which module checks each. The order
/// is the one an unknown key's "expected one of …" message lists them in.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) compliance_level: Option<ComplianceLevel>,
    pub(super) reference_ttl: Option<String>,
    pub(super) cvc_ttl: Option<String>,
    pub(super) session_ttl: Option<String>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) max_rendered_bytes: Option<u64>,
    pub(super) placeholder_syntax: Option<PlaceholderSyntax>,
    pub(super) redact_responses: Option<bool>,
    pub(super) idempotency_ttl: Option<String>,
    pub(super) forward_record_max_bytes: Option<u64>,
    pub(super) max_connections: Option<u64>,
    pub(super) workers: Option<u64>,
    pub(super) log_buffer_bytes: Option<u64>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) tsp: Option<String>,
    pub(super) tls: Option<RawTls>,
    #[serde(default)]
    pub(super) api_keys: Vec<RawApiKey>,
    pub(super) vault: Option<RawVault>,
    pub(super) references: Option<RawReferences>,
    pub(super) upstream: Option<RawUpstream>,
    #[serde(default)]
    pub(super) destinations: Vec<RawDestination>,
    pub(super) surfaces: Option<RawSurfaces>,
    pub(super) routes_only: Option<bool>,
    #[serde(default)]
    pub(super) routes: Vec<RawRoute>,
}

/// `[tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
}

/// `[[api_keys]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApiKey {
    pub(super) name: String,
    pub(super) hash: String,
    pub(super) scopes: Vec<String>,
}

/// `[vault]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVault {
    pub(super) backend: Option<String>,
    pub(super) path: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) create_key_file: Option<bool>,
    pub(super) url: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) cache_ttl: Option<String>,
}

/// `[references]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReferences {
    pub(super) backend: Option<String>,
    pub(super) url: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) key_prefix: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) timeout: Option<String>,
    pub(super) max_entries: Option<u64>,
}

/// `[upstream]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) connect_timeout: Option<String>,
    pub(super) response_timeout: Option<String>,
    pub(super) pool_idle_timeout: Option<String>,
    pub(super) pool_max_idle_per_host: Option<u64>,
}

/// `[[destinations]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDestination {
    pub(super) host: String,
    pub(super) port: Option<u16>,
    pub(super) scheme: Option<DestScheme>,
    #[serde(default)]
    pub(super) allow_private: bool,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
}

/// `[[routes]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: String,
    pub(super) destination: String,
    pub(super) method: Option<String>,
    pub(super) template: PathBuf,
    pub(super) subjects: Vec<String>,
}

/// `[surfaces]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSurfaces {
    pub(super) vgs_cmp: Option<bool>,
    pub(super) jpmc: Option<bool>,
}
