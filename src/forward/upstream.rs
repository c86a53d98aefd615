//! The connection to the acquirer: a pool per worker thread ([`Clients`],
//! [`pool`]) over rustls, HTTP/1.1 or HTTP/2 by ALPN, with per-rule trust
//! anchors and client certificates.
//!
//! The [`Connector`] dials only addresses the [`Resolver`] pinned and the
//! allow-list checked, and bounds TCP connect plus TLS handshake by
//! `connect_timeout`. Its errors ([`ConnectError`]), and a request a
//! connection gave back unwritten ([`SendError::Unsent`]), are how the
//! forward knows that no request byte left — the condition for restoring a
//! reference.

mod pool;

pub use pool::{Pool, PooledBody, SendError, UpstreamRequest};

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::destination::{check_addresses, Resolver};
use crate::config::{ConfigError, DestScheme, DestinationRule, UpstreamConfig};
use crate::telemetry::{HostLabels, Metrics};

/// Why a connection could not be made. No request byte was written.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Connect or handshake exceeded `connect_timeout`.
    #[error("connect timed out")]
    Timeout,
    /// DNS failed.
    #[error("could not resolve host: {0}")]
    Resolve(io::Error),
    /// TCP connect failed on every address.
    #[error("connection failed: {0}")]
    Tcp(io::Error),
    /// TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// No rule admits the URI, or its addresses are not allowed (the
    /// forward checks first, so this means DNS changed in between).
    #[error("destination refused at connect: {0}")]
    Refused(String),
    /// The HTTP connection could not be set up over the stream.
    #[error("HTTP handshake failed: {0}")]
    Handshake(String),
}

/// Builds the rustls client config for a rule: webpki roots plus the rule's
/// CA file, its client certificate if any, ALPN h2 and http/1.1.
pub fn tls_config(
    rule: &DestinationRule,
    index: usize,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let key = |field: &str| format!("destinations[{index}].{field}");
    let bad = |field: &str, e: String| ConfigError {
        key: key(field),
        message: e,
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &rule.ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| bad("ca_file", format!("cannot read PEM: {e}")))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad("ca_file", format!("bad PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad("ca_file", "no certificate in file".into()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| bad("ca_file", format!("unusable certificate: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("host", format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (&rule.client_cert, &rule.client_key) {
        (Some(cert), Some(k)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| bad("client_cert", format!("cannot read PEM: {e}")))?
                .collect::<Result<_, _>>()
                .map_err(|e| bad("client_cert", format!("bad PEM: {e}")))?;
            let pk = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| bad("client_key", format!("cannot read private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, pk)
                .map_err(|e| bad("client_key", format!("unusable key pair: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The stream to an acquirer, plain or TLS.
pub enum Stream {
    /// Plain TCP, only where a rule allows `http`.
    Plain(TokioIo<TcpStream>),
    /// TLS.
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Stream {
    /// Whether ALPN chose HTTP/2.
    fn negotiated_h2(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(s) => s.inner().get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

struct ConnectorInner {
    rules: Arc<[DestinationRule]>,
    tls: Vec<Option<TlsConnector>>,
    resolver: Resolver,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// Dials pinned, checked addresses; TLS per rule.
#[derive(Clone)]
pub struct Connector(Arc<ConnectorInner>);

impl Connector {
    /// A stream to `uri`'s host, within `connect_timeout`.
    async fn dial(&self, uri: Uri) -> Result<Stream, ConnectError> {
        match tokio::time::timeout(self.0.connect_timeout, self.0.connect(uri)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout),
        }
    }
}

impl ConnectorInner {
    async fn connect(&self, uri: Uri) -> Result<Stream, ConnectError> {
        let host = uri
            .host()
            .ok_or_else(|| ConnectError::Refused("no host".into()))?
            .trim_matches(['[', ']']);
        let scheme = match uri.scheme_str() {
            Some("http") => DestScheme::Http,
            _ => DestScheme::Https,
        };
        let port = uri.port_u16().unwrap_or(match scheme {
            DestScheme::Https => 443,
            DestScheme::Http => 80,
        });
        let index = self
            .rules
            .iter()
            .position(|r| r.host.matches(host) && r.port == port && r.scheme == scheme)
            .ok_or_else(|| ConnectError::Refused(format!("{host}:{port} not on the allow-list")))?;
        let addrs = self
            .resolver
            .resolve(host, port)
            .await
            .map_err(ConnectError::Resolve)?;
        check_addresses(&addrs, self.rules[index].allow_private)
            .map_err(|e| ConnectError::Refused(format!("{e:?}")))?;
        let mut last = None;
        let mut tcp = None;
        for addr in addrs.iter() {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = match tcp {
            Some(t) => t,
            None => {
                return Err(ConnectError::Tcp(
                    last.unwrap_or_else(|| io::Error::other("no address")),
                ))
            }
        };
        let _ = tcp.set_nodelay(true);
        match (&self.tls[index], scheme) {
            (Some(tls), DestScheme::Https) => {
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| ConnectError::Refused(format!("bad server name: {e}")))?;
                match tls.connect(name, tcp).await {
                    Ok(s) => Ok(Stream::Tls(Box::new(TokioIo::new(s)))),
                    Err(e) => {
                        self.metrics
                            .tls_failures
                            .get_or_create(&HostLabels {
                                host: host.to_owned(),
                            })
                            .inc();
                        Err(ConnectError::Tls(e))
                    }
                }
            }
            _ => Ok(Stream::Plain(TokioIo::new(tcp))),
        }
    }
}

/// One pool per worker thread (`crate::server::Workers`), plus one for
/// every other thread (tests and tools that run the server on their own
/// runtime). A connection's task lives on the runtime that dialled it: a
/// pool per worker keeps a request, its connection and the pool on the
/// worker's thread.
pub struct Clients {
    per_worker: Box<[Arc<Pool>]>,
}

impl Clients {
    /// `workers` pools over one connector (rules, TLS configs, resolver).
    pub fn new(
        rules: Arc<[DestinationRule]>,
        config: &UpstreamConfig,
        resolver: Resolver,
        metrics: Arc<Metrics>,
        workers: usize,
    ) -> Result<Clients, ConfigError> {
        let connector = connector(rules, config, resolver, metrics)?;
        let per_worker = (0..=workers)
            .map(|_| {
                Pool::new(
                    connector.clone(),
                    config.pool_idle_timeout,
                    config.pool_max_idle_per_host,
                )
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        Ok(Clients { per_worker })
    }

    /// The calling thread's pool.
    pub fn get(&self) -> &Arc<Pool> {
        let last = self.per_worker.len() - 1;
        let i = crate::server::current_worker().map_or(last, |w| w.min(last));
        &self.per_worker[i]
    }
}

/// The connector for the allow-list `rules`: their TLS configs, the
/// resolver, the connect timeout.
fn connector(
    rules: Arc<[DestinationRule]>,
    config: &UpstreamConfig,
    resolver: Resolver,
    metrics: Arc<Metrics>,
) -> Result<Connector, ConfigError> {
    let mut tls = Vec::with_capacity(rules.len());
    for (i, r) in rules.iter().enumerate() {
        tls.push(match r.scheme {
            DestScheme::Https => Some(TlsConnector::from(tls_config(r, i)?)),
            DestScheme::Http => None,
        });
    }
    Ok(Connector(Arc::new(ConnectorInner {
        rules,
        tls,
        resolver,
        connect_timeout: config.connect_timeout,
        metrics,
    })))
}

/// Whether the acquirer's TLS layer refused the connection (a fatal alert
/// about our certificate, or a handshake failure). With TLS 1.3 a server
/// checks the client certificate only after the client has finished its
/// side of the handshake, so the refusal arrives after the request was
/// written to the socket — but the server never accepted the connection,
/// so no application ever read the request: as good as not sent.
pub fn tls_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return is_refusal(r);
        }
        // `io::Error::source` skips the error it wraps; look inside. Over
        // HTTP/2 the h2 crate keeps only the kind and the message of an
        // I/O error, so the rustls error is recognised by its text.
        if let Some(inner) = err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return is_refusal(r);
            }
            let text = inner.to_string();
            return REFUSALS
                .iter()
                .any(|a| text == rustls::Error::AlertReceived(*a).to_string());
        }
        cur = err.source();
    }
    false
}

/// The alerts by which a server's TLS layer refuses the client.
const REFUSALS: [rustls::AlertDescription; 9] = [
    rustls::AlertDescription::CertificateRequired,
    rustls::AlertDescription::BadCertificate,
    rustls::AlertDescription::UnsupportedCertificate,
    rustls::AlertDescription::CertificateRevoked,
    rustls::AlertDescription::CertificateExpired,
    rustls::AlertDescription::CertificateUnknown,
    rustls::AlertDescription::UnknownCA,
    rustls::AlertDescription::AccessDenied,
    rustls::AlertDescription::HandshakeFailure,
];

fn is_refusal(r: &rustls::Error) -> bool {
    matches!(r, rustls::Error::AlertReceived(a) if REFUSALS.contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{current_worker, Workers};

    #[test]
    fn each_worker_has_its_own_pool_and_other_threads_share_the_last() {
        let config = UpstreamConfig {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_host: 1,
        };
        let clients = Arc::new(
            Clients::new(
                Arc::from([]),
                &config,
                Resolver::new(Duration::from_secs(1)),
                Arc::new(Metrics::new()),
                2,
            )
            .unwrap(),
        );
        let address = |c: &Arc<Pool>| Arc::as_ptr(c) as usize;
        let workers = Workers::start(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..2 {
            let (clients, tx) = (clients.clone(), tx.clone());
            workers.spawn(async move {
                let _ = tx.send((current_worker(), address(clients.get())));
            });
        }
        let mut seen: Vec<_> = (0..2).map(|_| rx.recv().unwrap()).collect();
        seen.sort();
        let pools = &clients.per_worker;
        assert_eq!(pools.len(), 3);
        assert_eq!(
            seen,
            [(Some(0), address(&pools[0])), (Some(1), address(&pools[1]))]
        );
        assert_eq!(current_worker(), None);
        assert_eq!(address(clients.get()), address(&pools[2]));
        workers.stop();
    }
}
