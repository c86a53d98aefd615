//! The listeners and their connections: `listen`, `admin_listen`, `[tls]`,
//! `max_connections`, `workers` and the connection timeouts. Nothing is
//! bound here; the addresses are only parsed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::duration::{HEADER_READ_TIMEOUT, IDLE_TIMEOUT, SHUTDOWN_GRACE};
use super::raw::RawConfig;
use super::{readable_file, ConfigError};

/// Optional TLS on the API listener.
#[derive(Debug, Clone)]
pub struct ListenTls {
    /// Certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Private key (PEM).
    pub key_file: PathBuf,
}

/// The listener keys, validated (fields as in [`super::Config`]).
pub(super) struct Listeners {
    pub(super) listen: SocketAddr,
    pub(super) admin_listen: SocketAddr,
    pub(super) listen_tls: Option<ListenTls>,
    pub(super) max_connections: usize,
    pub(super) workers: usize,
    pub(super) header_read_timeout: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) shutdown_grace: Duration,
}

pub(super) fn validate(raw: &RawConfig) -> Result<Listeners, ConfigError> {
    let listen = socket_addr("listen", raw.listen.as_deref(), "127.0.0.1:8080")?;
    let admin_listen = socket_addr(
        "admin_listen",
        raw.admin_listen.as_deref(),
        "127.0.0.1:9090",
    )?;
    let max_connections = raw.max_connections.unwrap_or(4096);
    if max_connections == 0 {
        return Err(ConfigError::new(
            "max_connections",
            "must be greater than zero",
        ));
    }
    let workers = match raw.workers {
        None => std::thread::available_parallelism().map_or(1, usize::from),
        Some(n @ 1..=256) => n as usize,
        Some(_) => {
            return Err(ConfigError::new("workers", "must be between 1 and 256"));
        }
    };
    let listen_tls = match &raw.tls {
        None => None,
        Some(t) => {
            readable_file("tls.cert_file", Some(&t.cert_file))?;
            readable_file("tls.key_file", Some(&t.key_file))?;
            Some(ListenTls {
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
            })
        }
    };
    Ok(Listeners {
        listen,
        admin_listen,
        listen_tls,
        max_connections: max_connections as usize,
        workers,
        header_read_timeout: HEADER_READ_TIMEOUT.parse(raw.header_read_timeout.as_deref())?,
        idle_timeout: IDLE_TIMEOUT.parse(raw.idle_timeout.as_deref())?,
        shutdown_grace: SHUTDOWN_GRACE.parse(raw.shutdown_grace.as_deref())?,
    })
}

fn socket_addr(key: &str, value: Option<&str>, default: &str) -> Result<SocketAddr, ConfigError> {
    let v = value.unwrap_or(default);
    v.parse()
        .map_err(|_| ConfigError::new(key, format!("not an IP:port address: {v:?}")))
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn bad_values_name_their_key() {
        for (doc, key) in [
            ("listen = \"localhost\"", "listen"),
            ("admin_listen = \"127.0.0.1\"", "admin_listen"),
            ("max_connections = 0", "max_connections"),
            ("workers = 0", "workers"),
            ("workers = 257", "workers"),
            (
                "[tls]\ncert_file = \"/nonexistent\"\nkey_file = \"/nonexistent\"",
                "tls.cert_file",
            ),
        ] {
            let e = Config::parse(doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
        }
    }
}
