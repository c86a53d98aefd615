//! The sandbox acquirer: a TLS endpoint that behaves like a card acquirer
//! for the sandbox token service. Used by `tokenrelay demo`,
//! `tokenrelay sandbox-acquirer`, and tests.
//!
//! `POST /v1/authorizations` with a JSON body:
//!
//! ```json
//! {"amount": "10.00", "currency": "EUR",
//!  "card": {"number": "…", "expiry_month": 12, "expiry_year": 2029,
//!           "cryptogram": "…", "eci": "07"}}
//! ```
//!
//! Rules, in order:
//! - the card number must be Luhn-valid → else `declined`, `invalid_card`;
//! - a `cryptogram` must verify under the sandbox key for that number and
//!   amount → else `declined`, `invalid_cryptogram`; each cryptogram
//!   approves once → a replay is `declined`, `cryptogram_replayed` (as the
//!   schemes decline reuse);
//! - decline triggers: amount `51.00` → `declined`, `insufficient_funds`
//!   (any card); amount `62.00` on a network-token payment (one with a
//!   cryptogram) → `declined`, `token_declined`, while the same amount on
//!   the card number (FPAN) approves — the case FPAN fallback exists for;
//! - otherwise `approved` with a six-digit authorisation code.
//!
//! The acquirer keeps the last request it received, masked, for the demo.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::card::{luhn_valid, CardNumber};
use crate::crypto::random_digits;
use crate::tsp::sandbox::SandboxTsp;

/// A generated CA and a server certificate for `localhost` / `127.0.0.1`.
pub struct SandboxPki {
    /// The CA certificate, PEM: the trust anchor to configure.
    pub ca_pem: String,
    /// The server's TLS configuration.
    pub server_config: Arc<rustls::ServerConfig>,
}

/// Generates a fresh CA and server certificate.
pub fn generate_pki() -> Result<SandboxPki, Box<dyn std::error::Error + Send + Sync>> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(Vec::<String>::new())?;
    leaf_params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
    ];
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(leaf.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(SandboxPki {
        ca_pem: ca.pem(),
        server_config: Arc::new(config),
    })
}

struct Shared {
    tsp: SandboxTsp,
    seen: Mutex<HashSet<String>>,
    last: Mutex<Option<Value>>,
}

/// A running sandbox acquirer.
#[derive(Clone)]
pub struct SandboxAcquirer {
    shared: Arc<Shared>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl SandboxAcquirer {
    /// Serves on `listener` with `tls` until the task is dropped; `key` is
    /// the sandbox token service key.
    pub fn spawn(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        key: [u8; 32],
    ) -> std::io::Result<SandboxAcquirer> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            tsp: SandboxTsp::new(key),
            seen: Mutex::new(HashSet::new()),
            last: Mutex::new(None),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(&s, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(SandboxAcquirer { shared, addr })
    }

    /// The last authorisation received, with card values masked.
    pub fn last_received_masked(&self) -> Option<Value> {
        self.shared.last.lock().ok().and_then(|l| l.clone())
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn decline(reason: &str) -> Response<Full<Bytes>> {
    reply(
        StatusCode::PAYMENT_REQUIRED,
        json!({"status": "declined", "reason": reason}),
    )
}

/// Replaces card values with masks (first6…last4 for numbers, `***` for
/// cryptograms and codes).
pub fn mask(mut v: Value) -> Value {
    if let Some(card) = v.get_mut("card").and_then(Value::as_object_mut) {
        for (k, val) in card.iter_mut() {
            match (k.as_str(), val.as_str()) {
                ("number", Some(n)) => {
                    *val = Value::String(
                        CardNumber::parse(n).map_or_else(|| "***".to_owned(), |c| c.to_string()),
                    )
                }
                ("cryptogram" | "security_code" | "cvc" | "dynamic_cvv", Some(_)) => {
                    *val = Value::String("***".into())
                }
                _ => {}
            }
        }
    }
    v
}

async fn handle(s: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != http::Method::POST || req.uri().path() != "/v1/authorizations" {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "POST /v1/authorizations"}),
        );
    }
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, json!({"error": "unreadable body"})),
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "body must be JSON"}),
        );
    };
    if let Ok(mut last) = s.last.lock() {
        *last = Some(mask(v.clone()));
    }
    let amount = match &v["amount"] {
        Value::String(a) => a.clone(),
        Value::Number(n) => n.to_string(),
        _ => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "amount is required"}),
            )
        }
    };
    let number = v["card"]["number"].as_str().unwrap_or("");
    if !luhn_valid(number) {
        return decline("invalid_card");
    }
    let cryptogram = v["card"]["cryptogram"].as_str();
    if let Some(cryptogram) = cryptogram {
        if s.tsp
            .verify_tavv(number, Some(&amount), cryptogram)
            .is_none()
        {
            return decline("invalid_cryptogram");
        }
        let fresh = s
            .seen
            .lock()
            .map(|mut seen| seen.insert(cryptogram.to_owned()))
            .unwrap_or(false);
        if !fresh {
            return decline("cryptogram_replayed");
        }
    }
    if amount == "51.00" {
        return decline("insufficient_funds");
    }
    if amount == "62.00" && cryptogram.is_some() {
        return decline("token_declined");
    }
    reply(
        StatusCode::OK,
        json!({"status": "approved", "authorization_code": random_digits(6)}),
    )
}
