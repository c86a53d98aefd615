//! Test harness: the real server on 127.0.0.1:0 with a config built in the
//! test, and a real TLS acquirer (rcgen CA, rustls) that records what it
//! receives.

#![allow(dead_code)]

pub mod binary;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokenrelay::auth::{ApiKey, KeyHash, Scope};
use tokenrelay::config::{ComplianceLevel, Config, DestScheme, DestinationRule, HostPattern};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Plaintext of the all-scopes key every test server accepts.
pub const KEY: &str = "test-key-all-scopes";
/// A key with only the `tokens` scope.
pub const TOKENS_ONLY_KEY: &str = "test-key-tokens-only";

pub const VISA: &str = "4111111111111111";
pub const MASTERCARD: &str = "5555555555554444";
pub const AMEX: &str = "378282246310005";
pub const DISCOVER: &str = "6011111111111117";

/// A config with test keys and the given compliance level.
pub fn config(level: ComplianceLevel) -> Config {
    let mut c = Config::defaults();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.admin_listen = "127.0.0.1:0".parse().unwrap();
    c.compliance_level = level;
    c.redact_responses = level == ComplianceLevel::SaqA;
    c.api_keys = vec![
        ApiKey {
            name: "all".into(),
            hash: KeyHash::of(KEY.as_bytes()),
            scopes: vec![
                Scope::Tokens,
                Scope::Cryptograms,
                Scope::Forward,
                Scope::Admin,
            ],
        },
        ApiKey {
            name: "tokens-only".into(),
            hash: KeyHash::of(TOKENS_ONLY_KEY.as_bytes()),
            scopes: vec![Scope::Tokens],
        },
    ];
    c
}

/// A running tokenrelay.
pub struct TestServer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub http: reqwest::Client,
    pub state: Arc<tokenrelay::AppState>,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        TestServer::start_with_clock(config, tokenrelay::clock::SystemClock::shared()).await
    }

    /// As [`TestServer::start`], with every TTL on `clock` (a
    /// `ManualClock` the test moves by hand).
    pub async fn start_with_clock(
        config: Config,
        clock: tokenrelay::clock::SharedClock,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let state = tokenrelay::AppState::build_with_clock(config, clock)
            .await
            .unwrap();
        let (tx, rx) = watch::channel(false);
        let s = state.clone();
        let task = tokio::spawn(async move {
            tokenrelay::run(s, listener, admin, rx).await.unwrap();
        });
        TestServer {
            addr,
            admin: admin_addr,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            state,
            shutdown: tx,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A request with the all-scopes key.
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("x-api-key", KEY)
    }

    /// A network-token forward with its two headers.
    pub fn forward(&self, token: &str, reference: &str, dest: &str) -> reqwest::RequestBuilder {
        self.req(
            reqwest::Method::POST,
            &format!("/api/network/tokens/{token}/forward"),
        )
        .header("x-cryptogram-reference", reference)
        .header("x-destination-url", dest)
    }

    /// Provisions a token from a PAN; returns the token object.
    pub async fn provision(&self, pan: &str) -> Value {
        self.provision_with(json!({
            "source": {"type": "pan", "number": pan, "expiry_month": 12, "expiry_year": 2031}
        }))
        .await
    }

    pub async fn provision_with(&self, body: Value) -> Value {
        let r = self
            .req(reqwest::Method::POST, "/api/network/tokens")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "provision failed: {}",
            r.text().await.unwrap()
        );
        r.json().await.unwrap()
    }

    /// A fresh cryptogram reference for `token_id`.
    /// An inline cryptogram for `token_id` (saq-d and up): the TPAN is in
    /// `number`, so tests can look for it where it must or must not be.
    pub async fn inline_cryptogram(&self, token_id: &str) -> Value {
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("/api/network/tokens/{token_id}/cryptograms"),
            )
            .json(&json!({"type": "ecom", "mode": "inline"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "inline cryptogram failed");
        r.json().await.unwrap()
    }

    pub async fn reference(&self, token_id: &str) -> String {
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("/api/network/tokens/{token_id}/cryptograms"),
            )
            .json(&json!({"type": "ecom", "mode": "reference", "amount": "10.00"}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "reference failed: {}",
            r.text().await.unwrap()
        );
        let v: Value = r.json().await.unwrap();
        v["cryptogram_reference"].as_str().unwrap().to_owned()
    }

    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Asserts a tokenrelay error: status, classifier in body and header.
pub async fn assert_error(resp: reqwest::Response, status: u16, classifier: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status for {classifier}");
    assert_eq!(
        resp.headers()
            .get("x-relay-error")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some(classifier.to_owned()),
        "x-relay-error header"
    );
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], status, "{body}");
    assert_eq!(body["classifier"], classifier, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// What the acquirer received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

pub type AcqBody = BoxBody<Bytes, Infallible>;
pub type Handler = Arc<
    dyn Fn(Recorded) -> Pin<Box<dyn std::future::Future<Output = Response<AcqBody>> + Send>>
        + Send
        + Sync,
>;

pub fn full(status: u16, body: impl Into<Bytes>) -> Response<AcqBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// Test CA and a leaf for localhost / 127.0.0.1.
pub struct Pki {
    pub ca_pem: String,
    pub leaf: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
    pub dir: tempfile::TempDir,
    pub ca_file: PathBuf,
}

pub fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().unwrap()),
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
    ];
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    Pki {
        ca_pem: ca.pem(),
        leaf: vec![leaf.der().clone()],
        key_der: leaf_key.serialize_der(),
        dir,
        ca_file,
    }
}

/// A TLS acquirer on 127.0.0.1:0 recording every request.
pub struct Acquirer {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Recorded>>>,
    pub pki: Pki,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Acquirer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Acquirer {
    /// Answers every request with 200 `{"approved":true}`.
    pub async fn start() -> Acquirer {
        Acquirer::with(Arc::new(|_r| {
            Box::pin(async { full(200, r#"{"approved":true}"#) })
        }))
        .await
    }

    pub async fn with(handler: Handler) -> Acquirer {
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut sc = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            pki.leaf.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone())),
        )
        .unwrap();
        sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let rec = rec.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let rec = rec.clone();
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let r = Recorded {
                                method: parts.method.to_string(),
                                path_and_query: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: parts.headers,
                                body,
                                version: parts.version,
                            };
                            rec.lock().unwrap().push(r.clone());
                            Ok::<_, Infallible>(handler(r).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Acquirer {
            addr,
            received,
            pki,
            task,
        }
    }

    /// An allow-list rule admitting this acquirer.
    pub fn rule(&self) -> DestinationRule {
        DestinationRule {
            host: HostPattern::Exact("127.0.0.1".into()),
            port: self.addr.port(),
            scheme: DestScheme::Https,
            allow_private: true,
            ca_file: Some(self.pki.ca_file.clone()),
            client_cert: None,
            client_key: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.addr.port(), path)
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn last(&self) -> Recorded {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("acquirer received nothing")
    }
}

/// A server at `level` whose allow-list admits `acq`.
pub async fn server_for(acq: &Acquirer, level: ComplianceLevel) -> TestServer {
    let mut c = config(level);
    c.destinations = vec![acq.rule()];
    TestServer::start(c).await
}

/// A token placed in the vault through the library, as the sandbox token
/// service would provision it: the only way to have a token on a SAQ-A
/// instance, which refuses PAN sources.
pub async fn seed_token(s: &TestServer, pan: &str, brand: tokenrelay::card::Brand) -> String {
    use tokenrelay::card::CardNumber;
    use tokenrelay::tsp::ProvisionRequest;
    use tokenrelay::vault::{Metadata, NetworkToken, TokenId, TokenStatus};
    let card = CardNumber::parse(pan).unwrap();
    let p = s
        .state
        .tsp
        .provision(&ProvisionRequest {
            pan: &card,
            brand,
            expiry_month: 12,
            expiry_year: 2031,
        })
        .unwrap_or_else(|e| panic!("sandbox provision: {e}"));
    let now = time::OffsetDateTime::now_utc();
    let id = TokenId::new();
    s.state
        .tokens
        .insert(
            NetworkToken {
                id,
                status: TokenStatus::Active,
                network_token_type: p.network_token_type,
                scheme: brand,
                card_last4: card.last4().to_owned(),
                expiry_month: p.expiry_month,
                expiry_year: p.expiry_year,
                pci_token_id: None,
                supports_device_binding: p.supports_device_binding,
                scheme_reference: p.scheme_reference,
                scheme_metadata: p.scheme_metadata,
                metadata: Metadata::new(),
                dauth_activated: false,
                created_at: now,
                updated_at: now,
                tpan: p.tpan,
            },
            None,
        )
        .await
        .unwrap();
    id.to_string()
}

/// The raw bytes of every file in `dir` whose name starts with `prefix`
/// (a SQLite database and its `-wal`, `-shm` and journal files). SQLite
/// removes the `-wal` and `-shm` files when its last connection closes,
/// which may happen between the listing and the read: a file gone by then
/// is skipped (its pages were checkpointed into the database file, which
/// is read).
pub fn files_named(dir: &std::path::Path, prefix: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        match std::fs::read(&path) {
            Ok(bytes) => out.push((path, bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("reading {}: {e}", path.display()),
        }
    }
    out
}

pub const POSTGRES_ENV: &str = "TOKENRELAY_TEST_POSTGRES_URL";
pub const REDIS_ENV: &str = "TOKENRELAY_TEST_REDIS_URL";

/// The URL an environment variable names: `None` (with a line saying so)
/// when unset, a panic when set but unusable.
pub fn env_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) => Some(url),
        Err(std::env::VarError::NotPresent) => {
            println!("{test}: skipped because {var} is unset");
            None
        }
        Err(e) => panic!("{var} is set but unusable: {e}"),
    }
}

/// A fresh PostgreSQL schema for one test, dropped at the end (on
/// success and on panic alike).
pub struct PgSchema {
    /// The database URL with the schema as its search path.
    pub url: String,
    base: String,
    schema: String,
}

/// A small pool on the test database, bounded in its waits.
async fn pg_pool(base: &str) -> Result<sqlx::AnyPool, sqlx::Error> {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(base)
        .await
}

impl PgSchema {
    /// `None` (with a line saying so) when the variable is unset; a panic
    /// when it is set and the database cannot be reached.
    pub async fn create(test: &str) -> Option<PgSchema> {
        Some(PgSchema::create_in(&env_url(POSTGRES_ENV, test)?).await)
    }

    /// A fresh schema in the database `base` names; a panic when it
    /// cannot be reached.
    pub async fn create_in(base: &str) -> PgSchema {
        let schema = format!("tokenrelay_test_{}", uuid::Uuid::new_v4().simple());
        let pool = pg_pool(base).await.unwrap_or_else(|e| {
            panic!("{POSTGRES_ENV} is set but PostgreSQL cannot be reached: {e}")
        });
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("creating schema {schema}: {e}"));
        pool.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        PgSchema {
            url: format!("{base}{sep}options[search_path]={schema}"),
            base: base.to_owned(),
            schema,
        }
    }
}

impl Drop for PgSchema {
    /// Best effort and bounded, on a runtime of its own (drop cannot
    /// await); a failure is printed, not raised.
    fn drop(&mut self) {
        let (base, schema) = (self.base.clone(), self.schema.clone());
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    let pool = pg_pool(&base).await?;
                    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                        .execute(&pool)
                        .await?;
                    pool.close().await;
                    Ok::<_, sqlx::Error>(())
                })
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map_err(|e| format!("dropping schema {schema}: {e}"))
            })
        })
        .join();
        if let Ok(Err(e)) = done {
            eprintln!("{e}");
        }
    }
}
