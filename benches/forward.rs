//! The whole forward in one process: a merchant's HTTP/1.1 keep-alive
//! request to tokenrelay with a fresh cryptogram reference, checks, consume,
//! render, rustls relay to the sandbox acquirer (which verifies the
//! cryptogram), and the answer streamed back. Logs are on (`info`, the
//! product's JSON lines, written to a sink), as in production.
//!
//! Everything runs on one current-thread runtime, so a figure is the CPU
//! cost of one forward — client and acquirer included — without the
//! cross-process scheduling noise of `scripts/load.py`. References are
//! minted before each timed batch and are not part of the figure.
//!
//! `json_fresh_reference_redacted` streams the answer through response
//! redaction (on by default at SAQ-A). `json_fresh_reference_keyed` adds a fresh `x-idempotency-key` to each
//! forward (contract §9), the `_sqlite` pair runs on a SQLite vault, where
//! the key's claim and record are two durable writes.
//!
//! `cargo bench --bench forward`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokenrelay::demo::Sandbox;
use tokenrelay::telemetry::{JsonLine, LogBuffer};

/// The binary's allocator, so the figure is the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TEMPLATE: &str = r#"{"amount": "10.00", "currency": "EUR", "card": {"number": "<< number >>", "expiry_month": "<< expiry_month | unwrap >>", "expiry_year": "<< expiry_year | unwrap >>", "cryptogram": "<< cryptogram >>", "eci": "<< eci >>"}}"#;

struct Merchant {
    client: Client<HttpConnector, Full<Bytes>>,
    sandbox: Sandbox,
    token: String,
    destination: String,
}

impl Merchant {
    async fn call(&self, req: http::request::Builder, body: &str) -> (u16, Bytes) {
        let req = req
            .header("x-api-key", &self.sandbox.key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    async fn mint(&self) -> String {
        let uri = format!(
            "{}/api/network/tokens/{}/cryptograms",
            self.sandbox.base, self.token
        );
        let (status, body) = self
            .call(
                Request::post(uri),
                r#"{"type": "ecom", "mode": "reference", "amount": "10.00", "currency": "EUR"}"#,
            )
            .await;
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["cryptogram_reference"].as_str().unwrap().to_owned()
    }

    /// One forward; with `key`, under that `x-idempotency-key`.
    async fn forward(&self, reference: &str, key: Option<&str>) {
        let uri = format!(
            "{}/api/network/tokens/{}/forward",
            self.sandbox.base, self.token
        );
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("x-cryptogram-reference", reference)
            .header("x-destination-url", &self.destination);
        if let Some(key) = key {
            req = req.header("x-idempotency-key", key);
        }
        let (status, body) = self.call(req, TEMPLATE).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
}

fn forward(c: &mut Criterion) {
    let (logs, _flush) = LogBuffer::spawn(
        std::io::sink(),
        tokenrelay::telemetry::DEFAULT_LOG_BUFFER_BYTES,
    );
    let _ = tracing_subscriber::fmt()
        .event_format(JsonLine)
        .with_env_filter("info")
        .with_writer(logs)
        .try_init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let memory = rt.block_on(merchant(Sandbox::start()));
    let sqlite = rt.block_on(merchant(Sandbox::start_with(|c| {
        c.vault.backend = tokenrelay::config::VaultBackend::Sqlite {
            path: dir.path().join("vault.db"),
        };
        c.vault.key_file = Some(dir.path().join("master.key"));
        c.vault.create_key_file = true;
    })));

    // SAQ-A's default: the answer streamed through response redaction.
    let redacted = rt.block_on(merchant(Sandbox::start_with(|c| {
        c.redact_responses = true;
    })));

    let mut g = c.benchmark_group("forward");
    g.throughput(Throughput::Elements(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    // Keyed: each forward a first request under a fresh key (claim, send,
    // record), the extra cost a merchant pays for retry safety.
    for (name, merchant, keyed) in [
        ("json_fresh_reference", &memory, false),
        ("json_fresh_reference_keyed", &memory, true),
        ("json_fresh_reference_redacted", &redacted, false),
        ("json_fresh_reference_sqlite", &sqlite, false),
        ("json_fresh_reference_sqlite_keyed", &sqlite, true),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut refs = Vec::with_capacity(iters as usize);
                    for _ in 0..iters {
                        let key = keyed.then(|| uuid::Uuid::new_v4().to_string());
                        refs.push((merchant.mint().await, key));
                    }
                    let started = Instant::now();
                    for (r, key) in &refs {
                        merchant.forward(r, key.as_deref()).await;
                    }
                    started.elapsed()
                })
            })
        });
    }
    g.finish();
    rt.block_on(memory.sandbox.stop());
    rt.block_on(redacted.sandbox.stop());
    rt.block_on(sqlite.sandbox.stop());
}

/// A merchant of `sandbox` with one provisioned token.
async fn merchant(
    sandbox: impl std::future::Future<Output = Result<Sandbox, tokenrelay::demo::DemoError>>,
) -> Merchant {
    let sandbox = sandbox.await.unwrap();
    let destination = format!(
        "https://127.0.0.1:{}/v1/authorizations",
        sandbox.acquirer.addr.port()
    );
    let mut m = Merchant {
        client: Client::builder(TokioExecutor::new()).build_http(),
        sandbox,
        token: String::new(),
        destination,
    };
    let (status, body) = m
        .call(
            Request::post(format!("{}/api/network/tokens", m.sandbox.base)),
            r#"{"source": {"type": "pan", "number": "4111111111111111", "expiry_month": 12, "expiry_year": 2031}}"#,
        )
        .await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    m.token = v["id"].as_str().unwrap().to_owned();
    m
}

criterion_group!(benches, forward);
criterion_main!(benches);
