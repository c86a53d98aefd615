//! `[vault]`: where network tokens are kept (memory, SQLite, PostgreSQL),
//! where the master key comes from, and how long a SQL vault's rows stay
//! cached. No `[vault]` is the same as an empty one: SQLite.

use std::path::PathBuf;
use std::time::Duration;

use super::duration::VAULT_CACHE_TTL;
use super::raw::RawVault;
use super::{no_password_in_url, readable_file, ConfigError};

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

/// `[vault]`: backend, key source, cache.
pub(super) fn validate(v: &RawVault) -> Result<VaultConfig, ConfigError> {
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
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("data/tokenrelay.db")),
            }
        }
        "postgres" => {
            let url = v.url.clone().ok_or_else(|| {
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
            readable_file("vault.password_file", v.password_file.as_deref())?;
            VaultBackend::Postgres {
                url,
                password_file: v.password_file.clone(),
            }
        }
        other => {
            return Err(ConfigError::new(
                "vault.backend",
                format!("unknown backend {other:?} (memory, sqlite, postgres)"),
            ))
        }
    };
    let cache_ttl = VAULT_CACHE_TTL.parse(v.cache_ttl.as_deref())?;
    Ok(VaultConfig {
        backend,
        key_file: v.key_file.clone(),
        create_key_file: v.create_key_file.unwrap_or(false),
        cache_ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn bad_values_name_their_key() {
        for (doc, key) in [
            ("[vault]\nbackend = \"oracle\"", "vault.backend"),
            ("[vault]\ncache_ttl = \"soon\"", "vault.cache_ttl"),
            ("[vault]\ncache_ttl = \"2h\"", "vault.cache_ttl"),
            ("[vault]\nbackend = \"memory\"\npath = \"a.db\"", "vault"),
            ("[vault]\nurl = \"postgres://db/vault\"", "vault.url"),
            ("[vault]\nbackend = \"postgres\"", "vault.url"),
            ("[vault]\nbackend = \"postgres\"\nurl = \"mysql://db\"", "vault.url"),
            (
                "[vault]\nbackend = \"postgres\"\nurl = \"postgres://db/vault\"\npath = \"a.db\"",
                "vault.path",
            ),
            (
                "[vault]\nbackend = \"postgres\"\nurl = \"postgres://db/vault\"\npassword_file = \"/nonexistent\"",
                "vault.password_file",
            ),
        ] {
            let e = Config::parse(doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
        }
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
}
