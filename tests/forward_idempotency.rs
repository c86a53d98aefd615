#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! Retry-safe forwards (contract §9): `x-idempotency-key` on a forward,
//! through the real server and a real TLS acquirer.
//!
//! PostgreSQL runs only when `TOKENRELAY_TEST_POSTGRES_URL` is set (and then
//! must work); it uses a fresh schema of its own.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;
use tokenrelay::config::{ComplianceLevel, Config, DestScheme, DestinationRule, HostPattern};
use tokenrelay::config::{VaultBackend, VaultConfig};
use tokenrelay::forward::claim::Answer;

const AUTH_BODY: &str = r#"{"card":{"number":"<< number >>","exp_month":"<< expiry_month | unwrap >>","cryptogram":"<< cryptogram >>","eci":"<< eci >>"},"amount":"10.00"}"#;
const REPLAY: &str = "x-relay-idempotent-replay";

/// An acquirer answering each request with a body of its own (a counter),
/// so one answer given to many is visible.
async fn counting_acquirer(delay: Duration) -> Acquirer {
    let n = Arc::new(AtomicUsize::new(0));
    Acquirer::with(Arc::new(move |_r| {
        let n = n.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let mut resp = full(201, format!(r#"{{"approved":true,"authorisation":{n}}}"#));
            resp.headers_mut()
                .insert("x-acquirer-request", n.to_string().parse().unwrap());
            resp
        })
    }))
    .await
}

/// A SQLite vault in `dir` (with its key file).
fn sqlite_vault(dir: &Path) -> VaultConfig {
    VaultConfig {
        backend: VaultBackend::Sqlite {
            path: dir.join("vault.db"),
        },
        key_file: Some(dir.join("master.key")),
        create_key_file: true,
        cache_ttl: Duration::from_secs(5),
    }
}

fn saq_d_for(acq: &Acquirer) -> Config {
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule()];
    c
}

async fn token(s: &TestServer) -> String {
    s.provision(VISA).await["id"].as_str().unwrap().to_owned()
}

async fn keyed(
    s: &TestServer,
    id: &str,
    reference: &str,
    url: &str,
    key: &str,
    body: &str,
) -> reqwest::Response {
    s.forward(id, reference, url)
        .header("x-idempotency-key", key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// Status, headers and body of a response, for comparing a replay.
async fn parts(resp: reqwest::Response) -> (u16, reqwest::header::HeaderMap, String) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

fn is_replay(h: &reqwest::header::HeaderMap) -> bool {
    h.get(REPLAY).is_some_and(|v| v == "true")
}

#[tokio::test]
async fn a_retry_gets_the_recorded_answer_and_spends_nothing() {
    let acq = counting_acquirer(Duration::ZERO).await;
    let s = TestServer::start(saq_d_for(&acq)).await;
    let id = token(&s).await;
    let r = s.reference(&id).await;
    let url = acq.url("/pay");

    let (status, headers, body) = parts(keyed(&s, &id, &r, &url, "order-1", AUTH_BODY).await).await;
    assert_eq!(
        (status, body.as_str()),
        (201, r#"{"approved":true,"authorisation":1}"#)
    );
    assert!(!is_replay(&headers), "the first answer is not a replay");
    assert_eq!(acq.count(), 1);

    for _ in 0..2 {
        let (s2, h2, b2) = parts(keyed(&s, &id, &r, &url, "order-1", AUTH_BODY).await).await;
        assert_eq!((s2, b2.as_str()), (status, body.as_str()));
        assert!(is_replay(&h2));
        assert_eq!(h2["x-acquirer-request"], "1");
        assert_eq!(h2["content-type"], "application/json");
        assert!(h2.get("x-relay-idempotent-body").is_none());
        assert!(h2.get("x-relay-error").is_none());
    }
    assert_eq!(acq.count(), 1, "the retries sent nothing");

    // Same key, another request: another body, another reference, another
    // destination, another token. Refused, and nothing is consumed: the
    // fresh reference still pays.
    let fresh = s.reference(&id).await;
    let other_token = token(&s).await;
    let other_ref = s.reference(&other_token).await;
    for resp in [
        keyed(
            &s,
            &id,
            &r,
            &url,
            "order-1",
            &AUTH_BODY.replace("10.00", "11.00"),
        )
        .await,
        keyed(&s, &id, &fresh, &url, "order-1", AUTH_BODY).await,
        keyed(&s, &id, &r, &acq.url("/pay2"), "order-1", AUTH_BODY).await,
        keyed(&s, &other_token, &other_ref, &url, "order-1", AUTH_BODY).await,
    ] {
        let body = assert_error(resp, 422, "idempotency_key_reused").await;
        assert!(!body.to_string().contains(&r));
    }
    let resp = s
        .forward(&id, &fresh, &url)
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "the refused retry consumed nothing");
    assert_eq!(acq.count(), 2);

    // A key is one payment whichever endpoint it went through; and a
    // malformed key is refused before anything happens.
    let resp = s
        .forward(&id, &r, &url)
        .header("x-idempotency-key", "k".repeat(256))
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "invalid_request").await;
    assert!(s.state.forwarder.flights.is_empty());
}

#[tokio::test]
async fn both_forward_endpoints_take_a_key() {
    let acq = counting_acquirer(Duration::ZERO).await;
    let s = TestServer::start(saq_d_for(&acq)).await;
    let p: Value = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&json!({"number": MASTERCARD, "expiry_month": 7, "expiry_year": 2030}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pci_id = p["id"].as_str().unwrap();
    let send = || {
        s.req(Method::POST, &format!("/api/pci/tokens/{pci_id}/forward"))
            .header("x-destination-url", acq.url("/pay"))
            .header("x-idempotency-key", "pci-order")
            .body(r#"{"pan":"<< account_number >>"}"#)
            .send()
    };
    let first = parts(send().await.unwrap()).await;
    let again = parts(send().await.unwrap()).await;
    assert_eq!((first.0, &first.2), (again.0, &again.2));
    assert!(!is_replay(&first.1) && is_replay(&again.1));
    assert_eq!(acq.count(), 1);
    // The same key on the network-token endpoint is another request.
    let id = token(&s).await;
    let r = s.reference(&id).await;
    let resp = keyed(&s, &id, &r, &acq.url("/pay"), "pci-order", AUTH_BODY).await;
    assert_error(resp, 422, "idempotency_key_reused").await;
}

/// A TLS "acquirer" that reads the request head and hangs up without an
/// answer; counts the heads it saw.
async fn hang_up_acquirer() -> (DestinationRule, String, Arc<AtomicUsize>, Pki) {
    use tokio::io::AsyncReadExt;
    let pki = pki();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sc = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        pki.leaf.clone(),
        rustls::pki_types::PrivateKeyDer::Pkcs8(pki.key_der.clone().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let heads = Arc::new(AtomicUsize::new(0));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = tls.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if memchr::memmem::find(&buf, b"\r\n\r\n").is_some() {
                    seen.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
        }
    });
    let rule = DestinationRule {
        host: HostPattern::Exact("127.0.0.1".into()),
        port: addr.port(),
        scheme: DestScheme::Https,
        allow_private: true,
        ca_file: Some(pki.ca_file.clone()),
        client_cert: None,
        client_key: None,
    };
    (
        rule,
        format!("https://127.0.0.1:{}/pay", addr.port()),
        heads,
        pki,
    )
}

#[tokio::test]
async fn destination_failed_and_timeout_are_recorded_and_replayed() {
    let (rule, url, heads, _pki) = hang_up_acquirer().await;
    let slow = Acquirer::with(Arc::new(|_r| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            full(200, "late")
        })
    }))
    .await;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![rule, slow.rule()];
    c.upstream.response_timeout = Duration::from_millis(300);
    let s = TestServer::start(c).await;
    let id = token(&s).await;

    let r = s.reference(&id).await;
    let first = assert_error(
        keyed(&s, &id, &r, &url, "f", AUTH_BODY).await,
        502,
        "destination_failed",
    )
    .await;
    assert_eq!(heads.load(Ordering::SeqCst), 1);
    let resp = keyed(&s, &id, &r, &url, "f", AUTH_BODY).await;
    assert!(is_replay(resp.headers()));
    let again = assert_error(resp, 502, "destination_failed").await;
    assert_eq!(first, again);
    assert_eq!(heads.load(Ordering::SeqCst), 1, "the retry sent nothing");

    let r = s.reference(&id).await;
    let slow_url = slow.url("/slow");
    let first = assert_error(
        keyed(&s, &id, &r, &slow_url, "t", AUTH_BODY).await,
        504,
        "destination_timeout",
    )
    .await;
    let resp = keyed(&s, &id, &r, &slow_url, "t", AUTH_BODY).await;
    assert!(is_replay(resp.headers()));
    assert_eq!(first, assert_error(resp, 504, "destination_timeout").await);
    assert_eq!(slow.count(), 1);
}

#[tokio::test]
async fn errors_before_anything_was_sent_leave_the_key_free() {
    let acq = counting_acquirer(Duration::ZERO).await;
    // A port with nothing listening, on the allow-list: connection refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut c = saq_d_for(&acq);
    let mut refused = acq.rule();
    refused.port = closed_port;
    c.destinations.push(refused);
    let s = TestServer::start(c).await;
    let id = token(&s).await;
    let r = s.reference(&id).await;
    let url = acq.url("/pay");

    let resp = keyed(&s, &id, "no-such-reference", &url, "k", AUTH_BODY).await;
    assert_error(resp, 404, "reference_not_found").await;
    let resp = keyed(&s, &id, &r, &url, "k", "<< nope >>").await;
    assert_error(resp, 422, "invalid_template").await;
    let dead = format!("https://127.0.0.1:{closed_port}/pay");
    let resp = keyed(&s, &id, &r, &dead, "k", AUTH_BODY).await;
    assert_error(resp, 502, "destination_unreachable").await;
    let resp = keyed(&s, &id, &r, &url, "k", &format!("{AUTH_BODY} ")).await;
    assert!(!is_replay(resp.headers()));
    assert_eq!(
        resp.status(),
        201,
        "the restored reference and the free key pay"
    );
    assert_eq!(acq.count(), 1);
    // The same failing request twice runs twice (nothing was recorded).
    let r2 = s.reference(&id).await;
    for _ in 0..2 {
        let resp = keyed(&s, &id, &r2, &dead, "k2", AUTH_BODY).await;
        assert!(!is_replay(resp.headers()));
        assert_error(resp, 502, "destination_unreachable").await;
    }
    // A dry run with a key records nothing either.
    let resp = s
        .forward(&id, &r2, &url)
        .header("x-idempotency-key", "k3")
        .header("x-relay-dry-run", "true")
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = keyed(&s, &id, &r2, &url, "k3", AUTH_BODY).await;
    assert_eq!(resp.status(), 201);
    assert!(!is_replay(resp.headers()));
}

#[tokio::test]
async fn fifty_concurrent_requests_with_one_key_send_one() {
    let acq = counting_acquirer(Duration::from_millis(500)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = saq_d_for(&acq);
    c.vault = sqlite_vault(dir.path());
    let s = Arc::new(TestServer::start(c).await);
    let id = token(&s).await;
    let r = s.reference(&id).await;
    let url = acq.url("/pay");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (s, id, r, url) = (s.clone(), id.clone(), r.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            parts(keyed(&s, &id, &r, &url, "concurrent", AUTH_BODY).await).await
        }));
    }
    let mut firsts = 0;
    for t in tasks {
        let (status, headers, body) = t.await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (201, r#"{"approved":true,"authorisation":1}"#)
        );
        if !is_replay(&headers) {
            firsts += 1;
        }
    }
    assert_eq!(acq.count(), 1, "exactly one request reached the acquirer");
    assert_eq!(firsts, 1, "one answer first-hand, 49 replays");
    assert!(s.state.forwarder.flights.is_empty());
}

#[tokio::test]
async fn a_merchant_that_hangs_up_still_gets_the_answer_on_retry() {
    let acq = counting_acquirer(Duration::from_millis(400)).await;
    let s = TestServer::start(saq_d_for(&acq)).await;
    let id = token(&s).await;
    let r = s.reference(&id).await;
    let url = acq.url("/pay");
    // The first request hangs up while the acquirer is still answering.
    let lost = tokio::spawn(
        s.forward(&id, &r, &url)
            .header("x-idempotency-key", "lost")
            .header("content-type", "application/json")
            .body(AUTH_BODY)
            .send(),
    );
    while acq.count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    lost.abort();
    assert!(lost.await.is_err(), "the first answer was lost");
    // The retry waits for the answer the first request is still getting.
    let (status, headers, body) = parts(keyed(&s, &id, &r, &url, "lost", AUTH_BODY).await).await;
    assert_eq!(
        (status, body.as_str()),
        (201, r#"{"approved":true,"authorisation":1}"#)
    );
    assert!(is_replay(&headers));
    assert_eq!(acq.count(), 1);
}

#[tokio::test]
async fn a_long_answer_streams_whole_and_is_recorded_as_its_head() {
    let big = "x".repeat(10_000);
    let answer = format!(r#"{{"approved":true,"pad":"{big}"}}"#);
    let a = answer.clone();
    let acq = Acquirer::with(Arc::new(move |_r| {
        let a = a.clone();
        Box::pin(async move { full(200, a) })
    }))
    .await;
    let mut c = saq_d_for(&acq);
    c.forward_record_max_bytes = 1024;
    let s = TestServer::start(c).await;
    let id = token(&s).await;
    let r = s.reference(&id).await;
    let url = acq.url("/pay");
    let (status, headers, body) = parts(keyed(&s, &id, &r, &url, "big", AUTH_BODY).await).await;
    assert_eq!(
        (status, body.len()),
        (200, answer.len()),
        "the first answer is whole"
    );
    assert!(headers.get("x-relay-idempotent-body").is_none());
    let (status, headers, body) = parts(keyed(&s, &id, &r, &url, "big", AUTH_BODY).await).await;
    assert_eq!(status, 200);
    assert!(is_replay(&headers));
    assert_eq!(headers["x-relay-idempotent-body"], "truncated");
    assert_eq!(body, answer[..1024]);
    assert_eq!(headers["content-length"], "1024");
    assert_eq!(acq.count(), 1);
}

/// An acquirer echoing the card number and cryptogram it received.
async fn echoing_acquirer() -> Acquirer {
    Acquirer::with(Arc::new(|r| {
        Box::pin(async move {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let number = v["card"]["number"].as_str().unwrap_or("").to_owned();
            let cryptogram = v["card"]["cryptogram"].as_str().unwrap_or("").to_owned();
            let mut resp = full(
                200,
                json!({"approved": true, "echo": {"number": number, "cryptogram": cryptogram}})
                    .to_string(),
            );
            resp.headers_mut()
                .insert("x-echo-number", number.parse().unwrap());
            resp
        })
    }))
    .await
}

/// The TPAN and cryptogram the acquirer received last.
fn secrets_sent(acq: &Acquirer) -> [String; 2] {
    let v: Value = serde_json::from_slice(&acq.last().body).unwrap();
    let number = v["card"]["number"].as_str().unwrap().to_owned();
    let cryptogram = v["card"]["cryptogram"].as_str().unwrap().to_owned();
    assert!(number.len() >= 13 && cryptogram.len() >= 8);
    [number, cryptogram]
}

#[tokio::test]
async fn at_saq_a_the_replay_is_redacted_and_the_record_holds_no_secret() {
    let acq = echoing_acquirer().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(ComplianceLevel::SaqA);
    c.destinations = vec![acq.rule()];
    c.vault = sqlite_vault(dir.path());
    let s = TestServer::start(c).await;
    let id = seed_token(&s, VISA, tokenrelay::card::Brand::Visa).await;
    let r = s.reference(&id).await;
    let url = acq.url("/pay");
    let first = parts(keyed(&s, &id, &r, &url, "saq-a", AUTH_BODY).await).await;
    let secrets = secrets_sent(&acq);
    let replay = parts(keyed(&s, &id, &r, &url, "saq-a", AUTH_BODY).await).await;
    assert!(is_replay(&replay.1));
    assert_eq!(first.2, replay.2);
    for (status, headers, body) in [&first, &replay] {
        assert_eq!(*status, 200);
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["approved"], true);
        assert_eq!(v["echo"]["number"], "*".repeat(secrets[0].len()));
        assert_eq!(
            headers["x-echo-number"],
            "*".repeat(secrets[0].len()).as_str()
        );
        for secret in &secrets {
            assert!(
                !body.contains(secret.as_str()),
                "a secret reached the SAQ-A merchant"
            );
        }
    }

    // The record, decrypted: the redacted answer, nothing else.
    let record = s
        .state
        .tokens
        .get_idempotency(
            "all\0forward\0saq-a",
            time::OffsetDateTime::now_utc() - Duration::from_secs(3600),
        )
        .await
        .unwrap()
        .expect("the answer is recorded in the vault");
    assert_eq!(record.status, 200);
    let Some(Answer::Response {
        body,
        headers,
        truncated,
        ..
    }) = Answer::decode(&record.body)
    else {
        panic!("not a recorded response")
    };
    assert!(!truncated);
    assert_eq!(body, first.2.as_bytes());
    let plain = [record.body.as_slice(), &record.key.clone().into_bytes()].concat();
    for secret in secrets.iter().chain([&r]) {
        assert!(
            memchr::memmem::find(&plain, secret.as_bytes()).is_none(),
            "a secret (or the reference) is in the decrypted record"
        );
    }
    assert!(headers.get("x-echo-number").is_some());
    s.stop().await;

    // The raw files: no secret, and the answer itself is sealed.
    let files = files_named(dir.path(), "vault.db");
    assert!(!files.is_empty());
    for (path, bytes) in &files {
        for needle in secrets
            .iter()
            .map(String::as_str)
            .chain([r#""approved""#, "x-echo-number"])
        {
            assert!(
                memchr::memmem::find(bytes, needle.as_bytes()).is_none(),
                "{} holds a plaintext the record should seal",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn a_retry_after_a_restart_gets_the_answer_from_the_sqlite_file() {
    let acq = counting_acquirer(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = saq_d_for(&acq);
    c.vault = sqlite_vault(dir.path());
    let s = TestServer::start(c.clone()).await;
    let id = token(&s).await;
    let r = s.reference(&id).await;
    let url = acq.url("/pay");
    let first = parts(keyed(&s, &id, &r, &url, "restart", AUTH_BODY).await).await;
    assert_eq!(first.0, 201);
    s.stop().await;

    // A new process on the same file: its reference store is empty, so
    // only the record can answer.
    let s = TestServer::start(c).await;
    let again = parts(keyed(&s, &id, &r, &url, "restart", AUTH_BODY).await).await;
    assert_eq!((again.0, &again.2), (first.0, &first.2));
    assert!(is_replay(&again.1));
    assert_eq!(acq.count(), 1);
}

/// Starts a server on a runtime of its own, which the test can kill as a
/// crash would: every task of the server stops where it is.
fn server_on_own_runtime(c: Config) -> (tokio::runtime::Runtime, std::net::SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = std::thread::scope(|t| {
        t.spawn(|| {
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let state = tokenrelay::AppState::build(c).await.unwrap();
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    let _keep = tx;
                    tokenrelay::run(state, listener, admin, rx).await.unwrap();
                });
                addr
            })
        })
        .join()
        .unwrap()
    });
    (rt, addr)
}

#[tokio::test]
async fn a_claim_whose_owner_died_is_answered_as_unknown_never_resent() {
    let received = Arc::new(tokio::sync::Notify::new());
    let rx = received.clone();
    let acq = Acquirer::with(Arc::new(move |_r| {
        rx.notify_one();
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            full(200, "never")
        })
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = saq_d_for(&acq);
    c.vault = sqlite_vault(dir.path());
    // Replica B waits at most its own bound: small timeouts.
    let mut fast = c.clone();
    fast.upstream.connect_timeout = Duration::from_millis(200);
    fast.upstream.response_timeout = Duration::from_millis(300);
    let b = TestServer::start(fast).await;
    let id = token(&b).await;
    let url = acq.url("/pay");

    // Replica A takes the request and dies while the acquirer holds it.
    let (rt, a_addr) = server_on_own_runtime(c);
    let client = reqwest::Client::new();
    let minted: Value = client
        .post(format!(
            "http://{a_addr}/api/network/tokens/{id}/cryptograms"
        ))
        .header("x-api-key", KEY)
        .json(&json!({"type": "ecom", "mode": "reference", "amount": "10.00"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = minted["cryptogram_reference"].as_str().unwrap().to_owned();
    let in_flight = tokio::spawn(
        client
            .post(format!("http://{a_addr}/api/network/tokens/{id}/forward"))
            .header("x-api-key", KEY)
            .header("x-cryptogram-reference", &r)
            .header("x-destination-url", &url)
            .header("x-idempotency-key", "crash")
            .header("content-type", "application/json")
            .body(AUTH_BODY)
            .send(),
    );
    tokio::time::timeout(Duration::from_secs(30), received.notified())
        .await
        .expect("the request reached the acquirer");
    rt.shutdown_background();
    assert!(in_flight.await.unwrap().is_err(), "A died mid-flight");

    // B waits out the bound, then says the outcome is unknown; later
    // retries say the same at once. Nothing is sent again.
    for _ in 0..2 {
        let resp = keyed(&b, &id, &r, &url, "crash", AUTH_BODY).await;
        assert!(is_replay(resp.headers()));
        let body = assert_error(resp, 502, "forward_outcome_unknown").await;
        assert!(body["message"].as_str().unwrap().contains("acquirer"));
    }
    assert_eq!(acq.count(), 1, "a dead claim is never sent again");
    // A different request under the key is still refused.
    let resp = keyed(&b, &id, &r, &url, "crash", "{}").await;
    assert_error(resp, 422, "idempotency_key_reused").await;
}

#[tokio::test]
async fn two_replicas_on_one_postgres_share_the_answer() {
    let Some(db) = PgSchema::create("two_replicas_on_one_postgres_share_the_answer").await else {
        return;
    };
    let acq = counting_acquirer(Duration::from_millis(700)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = saq_d_for(&acq);
    c.vault = VaultConfig {
        backend: VaultBackend::Postgres {
            url: db.url.clone(),
            password_file: None,
        },
        key_file: Some(dir.path().join("master.key")),
        create_key_file: true,
        cache_ttl: Duration::from_secs(5),
    };
    let a = Arc::new(TestServer::start(c.clone()).await);
    let b = TestServer::start(c).await;
    let id = token(&a).await;
    let r = a.reference(&id).await;
    let url = acq.url("/pay");

    let (a2, id2, r2, url2) = (a.clone(), id.clone(), r.clone(), url.clone());
    let first =
        tokio::spawn(
            async move { parts(keyed(&a2, &id2, &r2, &url2, "pg", AUTH_BODY).await).await },
        );
    // While A's request is with the acquirer, the retry reaches B (which
    // never saw the reference): B waits for A's answer.
    while acq.count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let during = parts(keyed(&b, &id, &r, &url, "pg", AUTH_BODY).await).await;
    let first = first.await.unwrap();
    let after = parts(keyed(&b, &id, &r, &url, "pg", AUTH_BODY).await).await;
    assert_eq!(first.0, 201);
    assert!(!is_replay(&first.1));
    for replay in [&during, &after] {
        assert_eq!((replay.0, &replay.2), (first.0, &first.2));
        assert!(is_replay(&replay.1));
    }
    assert_eq!(acq.count(), 1);
    let resp = keyed(&b, &id, &r, &url, "pg", "{}").await;
    assert_error(resp, 422, "idempotency_key_reused").await;
    drop(db);
}

#[tokio::test]
async fn a_keyed_answer_streams_while_it_is_recorded() {
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    const CHUNK: usize = 64 << 10;
    let acq = Acquirer::with(Arc::new(move |_r| {
        let g = g.clone();
        Box::pin(async move {
            // Two chunks, then nothing until the merchant has seen bytes:
            // a tee that buffered before relaying would never get there.
            let stream = futures_util::stream::unfold(0u8, move |i| {
                let g = g.clone();
                async move {
                    if i == 6 {
                        return None;
                    }
                    if i == 2 {
                        g.notified().await;
                    }
                    Some((
                        Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from(
                            vec![b'a' + i; CHUNK],
                        ))),
                        i + 1,
                    ))
                }
            });
            let mut resp = http::Response::new(BodyExt::boxed(StreamBody::new(stream)));
            *resp.status_mut() = http::StatusCode::OK;
            resp
        })
    }))
    .await;
    let mut c = saq_d_for(&acq);
    c.forward_record_max_bytes = CHUNK + 10;
    let s = TestServer::start(c).await;
    let id = token(&s).await;
    let r = s.reference(&id).await;
    let url = acq.url("/stream");
    let resp = keyed(&s, &id, &r, &url, "stream", AUTH_BODY).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the answer streams")
    {
        if got.is_empty() {
            gate.notify_one();
        }
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got.len(), 6 * CHUNK);
    let (status, headers, body) = parts(keyed(&s, &id, &r, &url, "stream", AUTH_BODY).await).await;
    assert_eq!(status, 200);
    assert!(is_replay(&headers));
    assert_eq!(headers["x-relay-idempotent-body"], "truncated");
    assert_eq!(body.as_bytes(), &got[..CHUNK + 10]);
    assert_eq!(acq.count(), 1);
}
