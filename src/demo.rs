//! `tokenrelay demo`: the whole flow on one machine with no setup.
//!
//! Starts a sandbox acquirer on a local TLS port (fresh CA), starts
//! tokenrelay on loopback ports with a throwaway API key and an allow-list
//! naming only that acquirer, then walks a merchant's session over HTTP:
//! provision a Visa token, take a cryptogram reference, forward a JSON
//! authorisation with placeholders, and a replayed forward. Every step is
//! printed with secrets masked.
//!
//! `tokenrelay demo --browser` ([`browser`]) does the same at SAQ-A with the
//! card typed into the example checkout page and encrypted in the browser.

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::auth::{ApiKey, KeyHash, Scope};
use crate::config::{ComplianceLevel, Config, DestScheme, DestinationRule, HostPattern};
use crate::sandbox_acquirer::{generate_pki, SandboxAcquirer};
use crate::tsp::sandbox::DEFAULT_SANDBOX_KEY;

pub mod browser;

/// Why the demo or the sandbox failed.
pub type DemoError = Box<dyn std::error::Error + Send + Sync>;

struct Merchant {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    key: String,
}

impl Merchant {
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> Result<(u16, Value), DemoError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("x-api-key", &self.key)
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }
}

fn show(step: &str, detail: &str) {
    println!("\n== {step}\n{detail}");
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// A sandbox deployment on loopback: a sandbox acquirer with a fresh CA
/// and a tokenrelay (SAQ-D, memory stores) whose allow-list names only
/// that acquirer. The demo walks it; `benches/forward.rs` measures it.
pub struct Sandbox {
    /// The acquirer.
    pub acquirer: SandboxAcquirer,
    /// `http://127.0.0.1:<port>` of tokenrelay's API listener.
    pub base: String,
    /// An API key with every scope.
    pub key: String,
    dir: std::path::PathBuf,
    shutdown: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), crate::config::ConfigError>>,
}

impl Sandbox {
    /// Starts both on ephemeral loopback ports (tokenrelay at SAQ-D).
    pub async fn start() -> Result<Sandbox, DemoError> {
        Self::start_at(ComplianceLevel::SaqD).await
    }

    /// Starts both, tokenrelay at compliance `level`.
    pub async fn start_at(level: ComplianceLevel) -> Result<Sandbox, DemoError> {
        Self::start_inner(level, |_| {}).await
    }

    /// As [`Sandbox::start`] (SAQ-D), with `adjust` applied to tokenrelay's
    /// config last (e.g. a SQLite vault for a benchmark).
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Result<Sandbox, DemoError> {
        Self::start_inner(ComplianceLevel::SaqD, adjust).await
    }

    async fn start_inner(
        level: ComplianceLevel,
        adjust: impl FnOnce(&mut Config),
    ) -> Result<Sandbox, DemoError> {
        let pki = generate_pki()?;
        let dir = std::env::temp_dir().join(format!("tokenrelay-demo-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let ca_file = dir.join("sandbox-ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem)?;
        let acq_listener = TcpListener::bind("127.0.0.1:0").await?;
        let acquirer =
            SandboxAcquirer::spawn(acq_listener, pki.server_config, DEFAULT_SANDBOX_KEY)?;

        let key = format!("demo-{}", uuid::Uuid::new_v4().simple());
        let mut config = Config::defaults();
        config.compliance_level = level;
        config.redact_responses = level == ComplianceLevel::SaqA;
        config.api_keys = vec![ApiKey {
            name: "demo".into(),
            hash: KeyHash::of(key.as_bytes()),
            scopes: vec![
                Scope::Tokens,
                Scope::Cryptograms,
                Scope::Forward,
                Scope::Admin,
            ],
        }];
        config.destinations = vec![DestinationRule {
            host: HostPattern::Exact("127.0.0.1".into()),
            port: acquirer.addr.port(),
            scheme: DestScheme::Https,
            allow_private: true,
            ca_file: Some(ca_file),
            client_cert: None,
            client_key: None,
        }];
        adjust(&mut config);
        let state = crate::AppState::build(config).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(crate::run(state, listener, admin, rx));
        Ok(Sandbox {
            acquirer,
            base: format!("http://{addr}"),
            key,
            dir,
            shutdown,
            server,
        })
    }

    /// Drains tokenrelay and removes the CA file.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the demo; prints to stdout.
pub async fn run() -> Result<(), DemoError> {
    let sandbox = Sandbox::start().await?;
    show(
        "sandbox acquirer",
        &format!(
            "listening on https://127.0.0.1:{} (TLS, fresh CA)",
            sandbox.acquirer.addr.port()
        ),
    );
    show(
        "tokenrelay",
        &format!(
            "listening on {} (compliance saq-d, allow-list: the sandbox acquirer only)",
            sandbox.base
        ),
    );
    let acquirer = &sandbox.acquirer;
    let merchant = Merchant {
        client: Client::builder(TokioExecutor::new()).build_http(),
        base: sandbox.base.clone(),
        key: sandbox.key.clone(),
    };

    // 3. Provision.
    let (status, token) = merchant
        .call(
            Method::POST,
            "/api/network/tokens",
            &[],
            json!({"source": {"type": "pan", "number": "4111111111111111", "expiry_month": 12, "expiry_year": 2030}})
                .to_string(),
        )
        .await?;
    show(
        "POST /api/network/tokens  (source: pan 411111…1111, 12/2030)",
        &format!("{status}\n{}", pretty(&token)),
    );
    let id = token["id"]
        .as_str()
        .ok_or("provisioning failed")?
        .to_owned();

    // 4. Reference.
    let (status, reference) = merchant
        .call(
            Method::POST,
            &format!("/api/network/tokens/{id}/cryptograms"),
            &[],
            json!({"type": "ecom", "mode": "reference", "amount": "10.00", "currency": "EUR"})
                .to_string(),
        )
        .await?;
    let cref = reference["cryptogram_reference"]
        .as_str()
        .ok_or("no reference")?
        .to_owned();
    let mut shown = reference.clone();
    shown["cryptogram_reference"] = Value::String(format!("{}…", &cref[..11]));
    show(
        "POST /api/network/tokens/{id}/cryptograms  (mode: reference)",
        &format!("{status}\n{}", pretty(&shown)),
    );

    // 5. Forward.
    let template = r#"{"amount": "10.00", "currency": "EUR", "card": {"number": "<< number >>", "expiry_month": "<< expiry_month | unwrap >>", "expiry_year": "<< expiry_year | unwrap >>", "cryptogram": "<< cryptogram >>", "eci": "<< eci >>"}}"#;
    let dest = format!(
        "https://127.0.0.1:{}/v1/authorizations",
        acquirer.addr.port()
    );
    let headers = [
        ("x-cryptogram-reference", cref.as_str()),
        ("x-destination-url", dest.as_str()),
    ];
    let (status, answer) = merchant
        .call(
            Method::POST,
            &format!("/api/network/tokens/{id}/forward"),
            &headers,
            template.to_owned(),
        )
        .await?;
    show(
        "the merchant's request body (placeholders, no card data)",
        template,
    );
    show(
        "what the acquirer received (masked here for display)",
        &pretty(&acquirer.last_received_masked().unwrap_or(Value::Null)),
    );
    show(
        "POST /api/network/tokens/{id}/forward → acquirer's answer",
        &format!("{status}\n{}", pretty(&answer)),
    );

    // 6. Replay.
    let (status, replay) = merchant
        .call(
            Method::POST,
            &format!("/api/network/tokens/{id}/forward"),
            &headers,
            template.to_owned(),
        )
        .await?;
    show(
        "the same forward again (the reference is single use)",
        &format!("{status}\n{}", pretty(&replay)),
    );

    sandbox.stop().await;
    println!("\ndone.");
    Ok(())
}
