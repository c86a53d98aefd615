#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! Every payment attempt leaves a record: the access line is written when
//! the request ends, whichever way it ends — a client that leaves while
//! the acquirer is answering, an acquirer that cuts its answer half-way, a
//! shutdown whose grace runs out — with the outcome, the bytes relayed, and
//! the acquirer's status where there was one.

mod support;

use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::binary::Binary;
use support::*;
use tokenrelay::auth::KeyHash;
use tokenrelay::config::{ComplianceLevel, DestScheme, DestinationRule, HostPattern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// This thread's events in the product's line format. The tests run on
    /// a current-thread runtime, so the server's tasks log on this thread.
    fn start() -> (Capture, tracing::subscriber::DefaultGuard) {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(tokenrelay::telemetry::JsonLine)
            .with_writer(move || writer.clone())
            .finish();
        (capture, tracing::subscriber::set_default(subscriber))
    }

    /// The access lines of request `id`.
    fn access_lines(&self, id: &str) -> Vec<Value> {
        access_lines(
            &String::from_utf8(self.0.lock().unwrap().clone()).unwrap(),
            id,
        )
    }

    /// Waits (bounded) until request `id` has its line.
    async fn line_of(&self, id: &str) -> Value {
        for _ in 0..1000 {
            if let Some(l) = self.access_lines(id).first() {
                return l["fields"].clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("request {id} never got its access line");
    }
}

fn access_lines(text: &str, id: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "tokenrelay::access" && l["fields"]["request_id"] == id)
        .collect()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(s: &TestServer) -> String {
    s.http
        .get(format!("http://{}/metrics", s.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_client_that_leaves_mid_forward_leaves_one_line_with_the_acquirers_answer() {
    let (capture, _guard) = Capture::start();
    let release = Arc::new(tokio::sync::Notify::new());
    let acq = Acquirer::with(Arc::new({
        let release = release.clone();
        move |_r| {
            let release = release.clone();
            Box::pin(async move {
                release.notified().await;
                // Many frames: the relay cannot hand it over in one piece.
                full(200, vec![b'a'; 1 << 20])
            })
        }
    }))
    .await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let reference = s.reference(&id).await;

    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let body = r#"{"pan":"<< number >>"}"#;
    let head = format!(
        "POST /api/network/tokens/{id}/forward HTTP/1.1\r\nhost: relay\r\nx-api-key: {KEY}\r\n\
         x-cryptogram-reference: {reference}\r\nx-destination-url: {}\r\n\
         x-request-id: merchant-gone-1\r\ncontent-length: {}\r\n\r\n{body}",
        acq.url("/pay"),
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..1000 {
        if acq.count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(acq.count(), 1, "the acquirer holds the authorisation");
    // The merchant's connection goes (a reset, as a crashed client's does)
    // while the acquirer is still deciding.
    conn.set_zero_linger().unwrap();
    drop(conn);
    release.notify_one();

    let line = capture.line_of("merchant-gone-1").await;
    assert_eq!(line["outcome"], "client_gone_after_send", "{line}");
    assert_eq!(line["route"], "forward");
    assert_eq!(line["status"], 200, "the acquirer's answer: {line}");
    assert_eq!(line["destination_host"], "127.0.0.1");
    assert_eq!(line["sent_upstream"], true);
    assert_eq!(line["subject"], format!("network_token:{id}"));
    assert!(line["bytes"].as_u64().unwrap() < 1 << 20, "{line}");
    let m = metrics(&s).await;
    assert_eq!(
        metric(
            &m,
            "tokenrelay_requests_unfinished_total{route=\"forward\",outcome=\"client_gone_after_send\"}"
        ),
        1.0,
        "{m}"
    );
    s.stop().await;
    assert_eq!(
        capture.access_lines("merchant-gone-1").len(),
        1,
        "exactly one line"
    );
}

/// A TLS "acquirer" that answers with a content-length it does not honour:
/// ten bytes of a thousand, then it closes.
async fn cutting_acquirer() -> (DestinationRule, String, Pki, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let pki = pki();
    let sc = rustls::ServerConfig::builder_with_provider(Arc::new(
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
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut tls) = acceptor.accept(stream).await else {
                continue;
            };
            // Read the request head and its (small) body.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = tls.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if got.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let _ = tls
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"approved\"")
                .await;
            let _ = tls.flush().await;
            let _ = tls.shutdown().await;
        }
    });
    let rule = DestinationRule {
        host: HostPattern::Exact("127.0.0.1".into()),
        port,
        scheme: DestScheme::Https,
        allow_private: true,
        ca_file: Some(pki.ca_file.clone()),
        client_cert: None,
        client_key: None,
    };
    (rule, format!("https://127.0.0.1:{port}/pay"), pki, task)
}

#[tokio::test]
async fn a_relay_cut_mid_body_is_logged_as_incomplete() {
    let (capture, _guard) = Capture::start();
    let (rule, url, _pki, acq) = cutting_acquirer().await;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![rule];
    let s = TestServer::start(c).await;
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let reference = s.reference(&id).await;
    let resp = s
        .forward(&id, &reference, &url)
        .header("x-request-id", "cut-1")
        .body("<< number >>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the head came through");
    assert!(resp.bytes().await.is_err(), "the client sees the cut too");

    let line = capture.line_of("cut-1").await;
    assert_eq!(line["outcome"], "body_incomplete", "{line}");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes"], 11, "what was relayed before the cut: {line}");
    assert_eq!(line["destination_host"], "127.0.0.1");
    let m = metrics(&s).await;
    assert_eq!(
        metric(
            &m,
            "tokenrelay_requests_unfinished_total{route=\"forward\",outcome=\"body_incomplete\"}"
        ),
        1.0,
        "{m}"
    );
    s.stop().await;
    acq.abort();
    assert_eq!(capture.access_lines("cut-1").len(), 1);
}

#[tokio::test]
async fn a_whole_response_is_complete_with_its_bytes() {
    let (capture, _guard) = Capture::start();
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let reference = s.reference(&id).await;
    let resp = s
        .forward(&id, &reference, &acq.url("/pay"))
        .header("x-request-id", "whole-1")
        .body("<< number >>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().len(), 17);
    let line = capture.line_of("whole-1").await;
    assert_eq!(line["outcome"], "complete", "{line}");
    assert_eq!(line["bytes"], 17);
    // An error tokenrelay makes is a whole response too.
    let resp = s
        .forward(&id, &reference, &acq.url("/pay"))
        .header("x-request-id", "whole-2")
        .send()
        .await
        .unwrap();
    assert_error(resp, 409, "reference_already_used").await;
    let line = capture.line_of("whole-2").await;
    assert_eq!(
        (line["outcome"].as_str(), line["relay_error"].as_str()),
        (Some("complete"), Some("reference_already_used")),
        "{line}"
    );
    s.stop().await;
}

#[tokio::test]
async fn sigterm_with_a_forward_outlasting_the_grace_still_writes_its_line() {
    let acq = Acquirer::with(Arc::new(|_r| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            full(200, r#"{"approved":true}"#)
        })
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
compliance_level = "saq-d"
shutdown_grace = "1s"
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
    // The binary's stdout (its JSON log) is appended here.
    let log_path = dir.path().join("stdout.log");
    let mut bin = Binary::serve(&path, &log_path).await;
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
                .header("x-request-id", "outlasts-grace")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    for _ in 0..1000 {
        if acq.count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(acq.count(), 1);
    let pid = bin.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut status = None;
    for _ in 0..600 {
        if let Some(s) = bin.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("tokenrelay did not exit after SIGTERM and its grace");
    assert_eq!(status.code(), Some(0));
    assert!(
        in_flight.await.unwrap().is_err(),
        "the cut forward got no answer"
    );
    // Every line up to the last one has been copied into the log file.
    bin.logged("stopped").await;
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let lines = access_lines(&logs, "outlasts-grace");
    assert_eq!(lines.len(), 1, "{logs}");
    let f = &lines[0]["fields"];
    assert_eq!(f["outcome"], "drain_cut", "{f}");
    assert_eq!(f["route"], "forward");
    assert_eq!(f["destination_host"], "127.0.0.1");
    assert_eq!(f["sent_upstream"], true);
    assert!(f.get("status").is_none(), "no answer came: {f}");
}
