#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Operations (contract §7): health, readiness, metrics, slow clients,
//! graceful shutdown of the real binary.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use support::binary::Binary;
use support::*;
use tokenrelay::auth::KeyHash;
use tokenrelay::config::ComplianceLevel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn health_and_readiness() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    for path in ["/healthz", "/readyz"] {
        let r = s
            .http
            .get(format!("http://{}{path}", s.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = s
        .http
        .get(format!("http://{}/nope", s.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// The value of the first sample line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_parse_and_move_with_traffic() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let metrics = || async {
        let r = s
            .http
            .get(format!("http://{}/metrics", s.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    };
    let before = metrics().await;
    // Every non-comment line is `name{labels} value`.
    for line in before
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line: {line}");
        assert!(line.starts_with("tokenrelay_"), "{line}");
    }
    assert!(before.ends_with("# EOF\n"));
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let resp = s
        .req(Method::POST, &format!("/api/network/tokens/{id}/forward"))
        .header("x-cryptogram-reference", &r)
        .header("x-destination-url", acq.url("/pay"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = s
        .req(
            Method::GET,
            "/api/network/tokens/00000000-0000-0000-0000-000000000000",
        )
        .send()
        .await
        .unwrap();
    let after = metrics().await;
    assert_eq!(
        sample(
            &after,
            "tokenrelay_requests_total{route=\"provision_token\",status=\"2xx\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "tokenrelay_requests_total{route=\"get_token\",status=\"4xx\"}"
        ),
        1.0
    );
    assert_eq!(sample(&after, "tokenrelay_references_issued_total"), 1.0);
    assert_eq!(sample(&after, "tokenrelay_references_consumed_total"), 1.0);
    assert_eq!(
        sample(&after, "tokenrelay_forward_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        sample(&after, "tokenrelay_upstream_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        sample(&after, "tokenrelay_reference_cache_size"),
        0.0,
        "a used reference is a tombstone, not a held reference"
    );
}

#[tokio::test]
async fn request_id_is_passed_through_or_generated() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let r = s
        .req(Method::GET, "/api/network/tokens/nope")
        .header("x-request-id", "merchant-req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "merchant-req-42");
    let r = s
        .req(Method::GET, "/api/network/tokens/nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"].len(), 32);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let mut c = config(ComplianceLevel::SaqD);
    c.header_read_timeout = Duration::from_millis(300);
    let s = TestServer::start(c).await;
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    conn.write_all(b"GET /api/network/tokens/x HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The server closes the connection (possibly after a 408); bounded wait.
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "connection still open after the header timeout"
    );
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_forward_finish_then_exits_zero() {
    // The acquirer holds its answer until the test has seen tokenrelay
    // start draining: the forward is in flight during the drain however
    // slow the machine is.
    let received = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let acq = Acquirer::with(Arc::new({
        let (received, release) = (received.clone(), release.clone());
        move |_r| {
            let (received, release) = (received.clone(), release.clone());
            Box::pin(async move {
                received.notify_one();
                release.notified().await;
                full(200, r#"{"approved":true}"#)
            })
        }
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
compliance_level = "saq-d"
shutdown_grace = "10s"
[[api_keys]]
name = "ops"
hash = "{hash}"
scopes = ["tokens", "cryptograms", "forward"]
[vault]
backend = "memory"
[[destinations]]
host = "127.0.0.1"
port = {acq_port}
allow_private = true
ca_file = "{ca}"
"#,
        hash = KeyHash::of(b"ops-key").to_config_string(),
        acq_port = acq.addr.port(),
        ca = acq.pki.ca_file.display(),
    );
    let path = dir.path().join("tokenrelay.toml");
    std::fs::write(&path, config).unwrap();
    let mut bin = Binary::serve(&path, &dir.path().join("tokenrelay.log")).await;
    let http = reqwest::Client::new();
    let base = bin.base.clone();
    let (id, reference) = bin.token_and_reference(&http, "ops-key", VISA).await;
    let in_flight = tokio::spawn({
        let http = http.clone();
        let url = format!("{base}/api/network/tokens/{id}/forward");
        let dest = acq.url("/slow");
        async move {
            http.post(url)
                .header("x-api-key", "ops-key")
                .header("x-cryptogram-reference", reference)
                .header("x-destination-url", dest)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    // Wait until the acquirer holds the request, then ask tokenrelay to stop.
    tokio::time::timeout(Duration::from_secs(60), received.notified())
        .await
        .expect("the forward never reached the acquirer");
    assert_eq!(acq.count(), 1);
    let pid = bin.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    bin.logged("shutdown signal received; draining").await;
    release.notify_one();
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "the in-flight forward finished"
    );
    // Bounded by shutdown_grace (10 s) in the binary; generous here.
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let status = bin.child.wait();
            (bin, status)
        }),
    )
    .await
    .expect("tokenrelay did not exit after SIGTERM")
    .unwrap()
    .1
    .unwrap();
    assert_eq!(status.code(), Some(0));
    // New connections are refused once it has stopped.
    assert!(http.get(format!("{base}/api/x")).send().await.is_err());
}
