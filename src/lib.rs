//! tokenrelay: a network-token vault and forward-injection reverse proxy.
//!
//! A merchant provisions network tokens, asks for cryptograms (or, at SAQ-A,
//! single-use cryptogram references), and sends its acquirer requests
//! through the forward proxy with `<< placeholders >>` that tokenrelay fills
//! in. The contract is `shared/CONTRACT.md`.
//!
//! Where a request goes:
//!
//! - [`server`] accepts connections on both listeners;
//! - [`api`] authenticates, routes, and holds one file per resource, with
//!   [`api::error`] the one place errors become HTTP;
//! - [`forward`] is the proxy pipeline (checks → consume → render → relay),
//!   rendering with [`template`]; its own [`forward::Error`] says whose
//!   fault a failure is, and [`api::error`] makes it HTTP (`api` calls
//!   `forward`, never the other way);
//! - [`audit`] holds what a request is about and did ([`audit::Subject`],
//!   [`audit::Audit`]), filled in by [`api`] and [`forward`] for the access
//!   line; [`idempotency`] holds the `x-idempotency-key` records both use;
//! - [`vault`] keeps tokens behind the `TokenStore` trait, [`references`]
//!   keeps cryptogram references behind `ReferenceStore`, [`tsp`] mints
//!   tokens and cryptograms behind `TokenServiceProvider`;
//! - [`admin`] serves health and metrics; [`telemetry`] owns logs and
//!   metrics; [`config`] turns TOML into a validated [`config::Config`];
//! - [`openapi`] holds the OpenAPI 3.1 documents of both listeners;
//! - [`session`] keeps card-capture sessions (browser-encrypted cards,
//!   JWE) beside the references;
//! - [`body`] reads request bodies under a limit and builds JSON
//!   responses, for both [`api`] and [`forward`];
//! - [`auth`] holds the API-key types and the constant-time key check
//!   (below [`api`] and [`config`], which both use it);
//! - [`card`] and [`crypto`] hold the card rules, secret types and crypto
//!   helpers; [`clock`] is the one source of "now" for every TTL.
//!
//! [`run`] wires config → state → listeners; it never binds a port itself.

#![forbid(unsafe_code)]

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod admin;
pub mod api;
pub mod audit;
pub mod auth;
pub mod body;
pub mod card;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod cvc;
pub mod demo;
pub mod forward;
pub mod idempotency;
pub mod openapi;
pub mod references;
pub mod sandbox_acquirer;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod template;
pub mod tsp;
pub mod vault;

use clock::{SharedClock, SystemClock};
use config::{Config, ConfigError, ReferenceBackend, VaultBackend};
use references::ReferenceStore;
use tsp::TokenServiceProvider;
use vault::TokenStore;

/// Any error a response body may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type of every handler.
pub type Body = BoxBody<Bytes, BoxError>;

/// Marks an error produced by tokenrelay itself (contract §3).
pub static X_RELAY_ERROR: HeaderName = HeaderName::from_static("x-relay-error");
/// Request id, passed through or generated.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything a request needs, built once at start-up and shared read-only.
pub struct AppState {
    /// The validated configuration.
    pub config: Config,
    /// Token vault.
    pub tokens: Arc<dyn TokenStore>,
    /// Cryptogram references.
    pub references: Arc<dyn ReferenceStore>,
    /// Card-capture sessions, in the same backend as the references.
    pub sessions: session::Sessions,
    /// Token service provider.
    pub tsp: Arc<dyn TokenServiceProvider>,
    /// Idempotency records.
    pub idempotency: idempotency::Idempotency,
    /// CVCs held in memory for one forward.
    pub cvcs: cvc::CvcStore,
    /// Allow-list, resolver and upstream client.
    pub forwarder: forward::Forwarder,
    /// Metrics registry.
    pub metrics: Arc<telemetry::Metrics>,
    /// TLS of the main listener, loaded before anything else starts.
    pub listen_tls: Option<tokio_rustls::TlsAcceptor>,
    /// Access lines: one per request, written when it ends.
    pub access: Arc<telemetry::access::AccessLog>,
    /// The main listener's OpenAPI document: [`openapi`] describes [`api`],
    /// which serves what this gives without knowing how it was made. It is
    /// built on first use and kept (serialising it at start-up left ~5 MiB
    /// of the builder's freed memory in the idle process).
    pub openapi: fn() -> Bytes,
    /// What every TTL (references in memory, CVCs, idempotency records,
    /// sessions) reads "now" from: the system clock, unless a test built
    /// the state with another.
    pub clock: SharedClock,
}

impl AppState {
    /// Builds stores and clients from `config`: loads the master keys once
    /// (the vault and a Redis reference store seal under the same keyring),
    /// opens (and migrates) the vault, connects the reference store, loads
    /// TLS material. Fails, naming the key where it can. Time is the
    /// system clock's.
    pub async fn build(config: Config) -> Result<Arc<AppState>, StartError> {
        AppState::build_with_clock(config, SystemClock::shared()).await
    }

    /// As [`AppState::build`], with every TTL on `clock`: how tests move
    /// time by hand ([`clock::ManualClock`]). The binary always uses
    /// [`AppState::build`].
    pub async fn build_with_clock(
        config: Config,
        clock: SharedClock,
    ) -> Result<Arc<AppState>, StartError> {
        let metrics = Arc::new(telemetry::Metrics::new());
        // Everything `check-config` builds comes first: a bad TLS file or
        // template stops the start before a store is opened.
        let front = Front::build(&config, metrics.clone())?;
        let keys = match needs_keys(&config) {
            false => None,
            true => Some(vault::load_keys(&config.vault)?),
        };
        let tokens: Arc<dyn TokenStore> = vault::open(&config.vault, keys.clone()).await?;
        let cvcs = cvc::CvcStore::new(config.cvc_ttl, config.reference_max_entries, clock.clone());
        let (references, cvcs, session_store): (
            Arc<dyn ReferenceStore>,
            _,
            Arc<dyn session::SessionStore>,
        ) = match &config.references {
            ReferenceBackend::Memory => (
                Arc::new(
                    references::memory::MemoryReferenceStore::with_clock(
                        config.reference_max_entries,
                        clock.clone(),
                    )
                    .map_err(StartError::Sweeper)?,
                ),
                cvcs,
                Arc::new(session::memory::MemorySessionStore::new(
                    config.reference_max_entries,
                    clock.clone(),
                )),
            ),
            ReferenceBackend::Redis(redis) => {
                let keys = match keys {
                    Some(k) => k,
                    None => vault::load_keys(&config.vault)?,
                };
                let store = Arc::new(
                    references::redis::RedisReferenceStore::open(
                        redis,
                        keys.clone(),
                        config.reference_max_entries,
                    )
                    .await?,
                );
                // Sessions and CVCs follow the references, so every
                // replica sees them.
                let sessions =
                    session::redis::RedisSessionStore::new(store.clone(), keys, &redis.key_prefix);
                (
                    store.clone(),
                    cvc::CvcStore::shared(config.cvc_ttl, store, clock.clone()),
                    Arc::new(sessions),
                )
            }
        };
        let tsp: Arc<dyn TokenServiceProvider> = Arc::new(tsp::sandbox::SandboxTsp::new(
            tsp::sandbox::DEFAULT_SANDBOX_KEY,
        ));
        let Front {
            listen_tls,
            forwarder,
        } = front;
        Ok(Arc::new(AppState {
            listen_tls,
            cvcs,
            idempotency: idempotency::Idempotency::new(config.idempotency_ttl, clock.clone()),
            sessions: session::Sessions::new(session_store, config.session_ttl, clock.clone()),
            clock,
            config,
            tokens,
            references,
            tsp,
            forwarder,
            access: telemetry::access::AccessLog::new(metrics.clone()),
            openapi: openapi::main_document,
            metrics,
        }))
    }
}

/// Whether the stores seal anything, so master keys must be loaded.
fn needs_keys(config: &Config) -> bool {
    !matches!(
        (&config.vault.backend, &config.references),
        (VaultBackend::Memory, ReferenceBackend::Memory)
    )
}

/// What `serve` builds from the config before it opens a store or binds a
/// port — the same for [`check`], so "ok" means the server will start as
/// far as files and settings go.
struct Front {
    listen_tls: Option<tokio_rustls::TlsAcceptor>,
    forwarder: forward::Forwarder,
}

impl Front {
    fn build(config: &Config, metrics: Arc<telemetry::Metrics>) -> Result<Front, StartError> {
        let listen_tls = listen_tls(config)?;
        // Allow-list, trust anchors and client certificates.
        let forwarder = forward::Forwarder::new(config, metrics)?;
        // Issue 19: compile the `[[routes]]` templates here, so both
        // `serve` and `check-config` refuse one that does not compile.
        Ok(Front {
            listen_tls,
            forwarder,
        })
    }
}

/// `check-config`: builds everything `serve` builds short of opening the
/// stores and binding the ports — TLS files, the allow-list's
/// certificates, the master keys (read, never created: a missing key file
/// that `vault.create_key_file` would create passes).
pub async fn check(config: &Config) -> Result<(), StartError> {
    Front::build(config, Arc::new(telemetry::Metrics::new()))?;
    if needs_keys(config) {
        vault::check_keys(&config.vault)?;
    }
    Ok(())
}

/// Why tokenrelay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration or a file it names is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The vault could not be opened.
    #[error("vault")]
    Vault(#[from] vault::OpenError),
    /// The reference store could not be opened.
    #[error("reference store")]
    References(#[from] references::redis::OpenError),
    /// The in-process reference store's sweeper thread did not start.
    #[error("reference store sweeper thread")]
    Sweeper(#[source] std::io::Error),
}

/// Loads the listener's TLS acceptor when `[tls]` is configured.
fn listen_tls(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(t) = &config.listen_tls else {
        return Ok(None);
    };
    let bad = |key: &str, m: String| ConfigError {
        key: key.to_owned(),
        message: m,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
        .map_err(|e| bad("tls.cert_file", e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("tls.cert_file", e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file)
        .map_err(|e| bad("tls.key_file", e.to_string()))?;
    let mut sc = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("tls", e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad("tls.key_file", e.to_string()))?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(sc))))
}

/// Runs both listeners until `shutdown` turns true, then drains them, on
/// the caller's runtime.
pub async fn run(
    state: Arc<AppState>,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConfigError> {
    run_on(state, listener, admin_listener, None, shutdown).await
}

/// The same with `listen`'s connections served on `workers` (the binary's
/// way, `config.workers` of them); accepting, the admin listener and the
/// stores' background tasks stay on the caller's runtime.
pub async fn run_on(
    state: Arc<AppState>,
    listener: TcpListener,
    admin_listener: TcpListener,
    workers: Option<Arc<server::Workers>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConfigError> {
    let tls = state.listen_tls.clone();
    let limits = server::Limits {
        max_connections: state.config.max_connections,
        header_read_timeout: state.config.header_read_timeout,
        idle_timeout: state.config.idle_timeout,
        shutdown_grace: state.config.shutdown_grace,
    };
    let admin_limits = server::Limits {
        max_connections: 64,
        ..limits
    };
    let api_state = state.clone();
    let api = server::serve(
        listener,
        tls,
        limits,
        move |req| handle_api(api_state.clone(), req),
        workers,
        shutdown.clone(),
    );
    let admin_state = state.clone();
    let admin = server::serve(
        admin_listener,
        None,
        admin_limits,
        move |req| admin::handle(admin_state.clone(), req),
        None,
        shutdown,
    );
    tokio::join!(api, admin);
    // The listeners stopped waiting: whatever is still running is cut off
    // when the runtime goes, and its access line says so.
    state.access.drain_deadline_passed();
    Ok(())
}

/// Request id from the client when it is sane, else a fresh one.
fn request_id(req: &Request<Incoming>) -> HeaderValue {
    req.headers()
        .get(&X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string())
                .unwrap_or(HeaderValue::from_static("unknown"))
        })
}

/// One API request. The handler runs in its own task, so a client that
/// leaves mid-forward does not cancel the exchange with the acquirer
/// half-way: it completes, and its access line says what the acquirer
/// answered and that the client was gone (`telemetry::access`).
async fn handle_api(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    match tokio::spawn(respond(state, req)).await {
        Ok(response) => response,
        // The task panicked (its record wrote `handler_panicked`) or the
        // runtime is shutting down.
        Err(_) => api::ApiError::Internal("the request handler failed".into()).into_response(),
    }
}

/// Runs the handler with the request's access record; the response body
/// carries the record and writes its line when it ends.
async fn respond(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let mut record = state.access.start(request_id(&req), req.method().clone());
    let mut response = api::handle(state.clone(), req, &mut record.trace).await;
    record.responded(
        response.status().as_u16(),
        response.headers().get(&X_RELAY_ERROR).cloned(),
    );
    // Ours always in x-relay-request-id; x-request-id too unless the
    // response is an acquirer's answer carrying its own, which passes.
    let id = record.request_id().clone();
    let headers = response.headers_mut();
    headers.insert(forward::headers::X_RELAY_REQUEST_ID.clone(), id.clone());
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID.clone(), id);
    }
    response.map(|body| telemetry::access::RecordedBody::new(body, record).boxed())
}
