#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! PCI tokens and FPAN fallback end to end, against the product's sandbox
//! acquirer over TLS (contract §4a): it verifies network-token cryptograms,
//! approves each once, and declines on documented triggers.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use reqwest::Method;
use serde_json::{json, Value};
use support::*;
use tokenrelay::config::{ComplianceLevel, Config, DestScheme, DestinationRule, HostPattern};
use tokenrelay::sandbox_acquirer::{generate_pki, SandboxAcquirer};
use tokenrelay::tsp::sandbox::DEFAULT_SANDBOX_KEY;

struct Sandbox {
    acq: SandboxAcquirer,
    ca_pem: String,
    _dir: tempfile::TempDir,
    ca_file: std::path::PathBuf,
}

async fn sandbox() -> Sandbox {
    let pki = generate_pki().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let acq = SandboxAcquirer::spawn(listener, pki.server_config, DEFAULT_SANDBOX_KEY).unwrap();
    Sandbox {
        acq,
        ca_pem: pki.ca_pem,
        _dir: dir,
        ca_file,
    }
}

impl Sandbox {
    fn url(&self) -> String {
        format!(
            "https://127.0.0.1:{}/v1/authorizations",
            self.acq.addr.port()
        )
    }

    fn config(&self, level: ComplianceLevel) -> Config {
        let mut c = config(level);
        c.destinations = vec![DestinationRule {
            host: HostPattern::Exact("127.0.0.1".into()),
            port: self.acq.addr.port(),
            scheme: DestScheme::Https,
            allow_private: true,
            ca_file: Some(self.ca_file.clone()),
            client_cert: None,
            client_key: None,
        }];
        c
    }

    /// Posts straight to the acquirer, bypassing tokenrelay.
    async fn direct(&self, body: Value) -> (u16, Value) {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.acq.addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("/v1/authorizations")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }
}

const TPAN_AUTH: &str = r#"{"amount": "<< metadata.amount >>", "currency": "EUR", "card": {"number": "<< number >>", "expiry_month": "<< expiry_month | unwrap >>", "expiry_year": "<< expiry_year | unwrap >>", "cryptogram": "<< cryptogram >>", "eci": "<< eci >>"}}"#;

fn fpan_auth(amount: &str) -> String {
    format!(
        r#"{{"amount": "{amount}", "currency": "EUR", "card": {{"number": "<< account_number >>", "expiry_month": "<< expiry_month | unwrap >>", "expiry_year": "<< expiry_year | unwrap >>", "security_code": "<< security_code >>"}}}}"#
    )
}

/// A reference whose cryptogram is bound to `amount` (also in its metadata,
/// so the template can send the same amount).
async fn reference_for(s: &TestServer, id: &str, amount: &str) -> String {
    let r = s
        .req(Method::POST, &format!("/api/network/tokens/{id}/cryptograms"))
        .json(&json!({"type": "ecom", "mode": "reference", "amount": amount, "metadata": {"amount": amount}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["cryptogram_reference"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn provision_with_cvc(s: &TestServer) -> Value {
    s.provision_with(json!({
        "source": {"type": "pan", "number": VISA, "expiry_month": 12, "expiry_year": 2031, "cvc": "737", "cardholder_name": "Jane Doe"}
    }))
    .await
}

async fn forward_nt(s: &TestServer, id: &str, reference: &str, url: &str) -> reqwest::Response {
    s.forward(id, reference, url)
        .header("content-type", "application/json")
        .body(TPAN_AUTH)
        .send()
        .await
        .unwrap()
}

async fn forward_pci(s: &TestServer, pci_id: &str, url: &str, amount: &str) -> reqwest::Response {
    s.req(Method::POST, &format!("/api/pci/tokens/{pci_id}/forward"))
        .header("x-destination-url", url)
        .header("content-type", "application/json")
        .body(fpan_auth(amount))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn tpan_payment_is_approved_and_a_replayed_cryptogram_is_declined() {
    let sb = sandbox().await;
    let s = TestServer::start(sb.config(ComplianceLevel::SaqD)).await;
    let t = provision_with_cvc(&s).await;
    let id = t["id"].as_str().unwrap();
    let r = reference_for(&s, id, "10.00").await;
    let resp = forward_nt(&s, id, &r, &sb.url()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "approved");

    // An inline cryptogram sent straight to the acquirer twice.
    let inline: Value = s
        .req(
            Method::POST,
            &format!("/api/network/tokens/{id}/cryptograms"),
        )
        .json(&json!({"type": "ecom", "mode": "inline", "amount": "10.00"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let auth = json!({"amount": "10.00", "currency": "EUR", "card": {
        "number": inline["number"], "expiry_month": inline["expiry_month"], "expiry_year": inline["expiry_year"],
        "cryptogram": inline["cryptogram"], "eci": inline["eci"]}});
    let (status, body) = sb.direct(auth.clone()).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("approved")));
    let (status, body) = sb.direct(auth).await;
    assert_eq!(status, 402);
    assert_eq!(body["reason"], "cryptogram_replayed");
}

#[tokio::test]
async fn token_decline_then_fallback_to_the_card_number_is_approved() {
    let sb = sandbox().await;
    let s = TestServer::start(sb.config(ComplianceLevel::SaqD)).await;
    let t = provision_with_cvc(&s).await;
    let id = t["id"].as_str().unwrap();
    let pci_id = t["pci_token_id"].as_str().unwrap();
    let r = reference_for(&s, id, "62.00").await;
    let resp = forward_nt(&s, id, &r, &sb.url()).await;
    // The acquirer's own decline passes through, not marked as ours.
    assert_eq!(resp.status(), 402);
    assert!(resp.headers().get("x-relay-error").is_none());
    assert_eq!(
        resp.json::<Value>().await.unwrap()["reason"],
        "token_declined"
    );

    let resp = forward_pci(&s, pci_id, &sb.url(), "62.00").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "approved");
    let seen = sb.acq.last_received_masked().unwrap();
    assert_eq!(seen["card"]["number"], "411111…1111", "the FPAN went out");
    assert_eq!(seen["card"]["security_code"], "***");
}

#[tokio::test]
async fn suspended_token_is_424_then_fallback_is_approved() {
    let sb = sandbox().await;
    let s = TestServer::start(sb.config(ComplianceLevel::SaqD)).await;
    let t = provision_with_cvc(&s).await;
    let id = t["id"].as_str().unwrap();
    let pci_id = t["pci_token_id"].as_str().unwrap();
    let r = reference_for(&s, id, "10.00").await;
    let ev = s
        .req(Method::POST, &format!("/api/network/tokens/{id}/events"))
        .json(&json!({"event": "suspend"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ev.status(), 200);
    assert_eq!(ev.json::<Value>().await.unwrap()["status"], "inactive");
    let resp = forward_nt(&s, id, &r, &sb.url()).await;
    assert_error(resp, 424, "token_not_active").await;
    let resp = s
        .req(
            Method::POST,
            &format!("/api/network/tokens/{id}/cryptograms"),
        )
        .json(&json!({"type": "ecom", "mode": "reference"}))
        .send()
        .await
        .unwrap();
    assert_error(resp, 424, "token_not_active").await;
    let resp = forward_pci(&s, pci_id, &sb.url(), "10.00").await;
    assert_eq!(resp.status(), 200);
    // Resume brings the token back.
    let ev = s
        .req(Method::POST, &format!("/api/network/tokens/{id}/events"))
        .json(&json!({"event": "resume"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ev.status(), 200);
    let r = reference_for(&s, id, "10.00").await;
    assert_eq!(forward_nt(&s, id, &r, &sb.url()).await.status(), 200);
    // Lifecycle events need the admin scope.
    let resp = s
        .http
        .post(s.url(&format!("/api/network/tokens/{id}/events")))
        .header("x-api-key", TOKENS_ONLY_KEY)
        .json(&json!({"event": "suspend"}))
        .send()
        .await
        .unwrap();
    assert_error(resp, 403, "forbidden").await;
}

#[tokio::test]
async fn the_cvc_is_injected_once() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = provision_with_cvc(&s).await;
    let pci_id = t["pci_token_id"].as_str().unwrap();
    let resp = forward_pci(&s, pci_id, &acq.url("/pay"), "10.00").await;
    assert_eq!(resp.status(), 200);
    let sent: Value = serde_json::from_slice(&acq.last().body).unwrap();
    assert_eq!(sent["card"]["security_code"], "737");
    assert_eq!(sent["card"]["number"], VISA);
    let resp = forward_pci(&s, pci_id, &acq.url("/pay"), "10.00").await;
    assert_error(resp, 422, "security_code_unavailable").await;
    assert_eq!(acq.count(), 1);
    // Without `security_code` in the template the card still forwards.
    let resp = s
        .req(Method::POST, &format!("/api/pci/tokens/{pci_id}/forward"))
        .header("x-destination-url", acq.url("/pay"))
        // Free text (the name) needs a body type it can be escaped for.
        .header("content-type", "application/json")
        .body(r#"{"n":"<< account_number | last4 >>","b":"<< bin >>","h":"<< cardholder_name >>"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        &acq.last().body[..],
        br#"{"n":"1111","b":"411111","h":"Jane Doe"}"#
    );
    // Network-token names are not PCI-token names.
    let resp = s
        .req(Method::POST, &format!("/api/pci/tokens/{pci_id}/forward"))
        .header("x-destination-url", acq.url("/pay"))
        .body("<< cryptogram >>")
        .send()
        .await
        .unwrap();
    assert_error(resp, 422, "invalid_template").await;
}

#[tokio::test]
async fn pci_token_lifecycle_and_network_token_from_a_pci_token() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let create = |body: Value| s.req(Method::POST, "/api/pci/tokens").json(&body).send();
    let card = json!({"number": MASTERCARD, "expiry_month": 7, "expiry_year": 2030, "cardholder_name": "A B", "metadata": {"k": "v"}});
    let r = create(card.clone()).await.unwrap();
    assert_eq!(r.status(), 201);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["last4"], "4444");
    assert_eq!(p["bin"], "555555");
    assert_eq!(p["scheme"], "mastercard");
    assert_eq!(p["cardholder_name"], "A B");
    assert_eq!(p["metadata"], json!({"k": "v"}));
    assert!(!p.to_string().contains(MASTERCARD));
    // The same card again: the same PCI token, 200 — and knowing the number
    // buys back nothing else that was stored with it (issue 15). Its
    // expiry is earlier, so nothing stored changes (the GET below).
    let mut other = card.clone();
    other["cardholder_name"] = json!("Someone Else");
    other["expiry_month"] = json!(5);
    let again = create(other).await.unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], p["id"]);
    let keys: Vec<&str> = again
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["bin", "created_at", "id", "last4", "scheme"]);
    assert!(!again.to_string().contains("A B"));
    let pci_id = p["id"].as_str().unwrap();
    // A network token from it.
    let t = s
        .provision_with(json!({"source": {"type": "pci_token", "id": pci_id}}))
        .await;
    assert_eq!(t["pci_token_id"], p["id"]);
    assert_eq!(t["scheme"], "mastercard");
    assert_eq!(t["last4"], "4444");
    let get = s
        .req(Method::GET, &format!("/api/pci/tokens/{pci_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.json::<Value>().await.unwrap(), p);
    let del = s
        .req(Method::DELETE, &format!("/api/pci/tokens/{pci_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    let get = s
        .req(Method::GET, &format!("/api/pci/tokens/{pci_id}"))
        .send()
        .await
        .unwrap();
    assert_error(get, 404, "pci_token_not_found").await;
    let resp = s
        .req(Method::POST, "/api/network/tokens")
        .json(&json!({"source": {"type": "pci_token", "id": pci_id}}))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "pci_token_not_found").await;
    // The network token lives on: lifecycles are independent.
    let nt = s
        .req(
            Method::GET,
            &format!("/api/network/tokens/{}", t["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(nt.status(), 200);
    let bad = create(json!({"number": "4111111111111112", "expiry_month": 7, "expiry_year": 2030}))
        .await
        .unwrap();
    assert_error(bad, 422, "invalid_card").await;
}

/// The answer to a PCI token request for a card already stored: 200 with
/// the id and what the number itself gives, nothing stored with it.
async fn create_again(s: &TestServer, card: Value, id: &str) {
    let r = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&card)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the same card again");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], id);
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["bin", "created_at", "id", "last4", "scheme"]);
}

/// The stored expiry and name: read back, and as a forward renders them to
/// a TLS acquirer.
async fn stored_card(s: &TestServer, acq: &Acquirer, id: &str) -> (Value, Value) {
    let get: Value = s
        .req(Method::GET, &format!("/api/pci/tokens/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let read = json!([
        get["expiry_month"],
        get["expiry_year"],
        get["cardholder_name"]
    ]);
    let r = s
        .req(Method::POST, &format!("/api/pci/tokens/{id}/forward"))
        .header("x-destination-url", acq.url("/pay"))
        .header("content-type", "application/json")
        .body(r#"{"mm": "<< expiry_month | mm >>", "yyyy": "<< expiry_year >>", "name": "<< cardholder_name >>"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sent: Value = serde_json::from_slice(&acq.last().body).unwrap();
    (read, sent)
}

/// A reissued card (same PAN, later expiry) updates the stored expiry and
/// name; an older card presented again rolls nothing back; concurrent
/// reissues end with the latest expiry (issue 15).
async fn a_reissued_card_updates_the_stored_expiry(vault: Option<tokenrelay::config::VaultConfig>) {
    let acq = Acquirer::start().await;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule()];
    if let Some(v) = vault {
        c.vault = v;
    }
    let s = TestServer::start(c).await;
    let card = |month: u8, year: u16, name: Option<&str>| {
        let mut v = json!({"number": MASTERCARD, "expiry_month": month, "expiry_year": year});
        if let Some(n) = name {
            v["cardholder_name"] = json!(n);
        }
        v
    };
    let r = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&card(7, 2030, Some("Ada Lovelace")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Reissued: later expiry, new name.
    create_again(&s, card(3, 2032, Some("Ada King")), &id).await;
    let (read, sent) = stored_card(&s, &acq, &id).await;
    assert_eq!(read, json!([3, 2032, "Ada King"]));
    assert_eq!(
        sent,
        json!({"mm": "03", "yyyy": "2032", "name": "Ada King"})
    );

    // The old card again (earlier expiry, old name), and the same expiry
    // with another name: nothing changes.
    create_again(&s, card(7, 2030, Some("Ada Lovelace")), &id).await;
    create_again(&s, card(3, 2032, Some("Someone Else")), &id).await;
    let (read, sent) = stored_card(&s, &acq, &id).await;
    assert_eq!(read, json!([3, 2032, "Ada King"]));
    assert_eq!(
        sent,
        json!({"mm": "03", "yyyy": "2032", "name": "Ada King"})
    );

    // Reissued without a name: the expiry moves, the name stays.
    create_again(&s, card(4, 2032, None), &id).await;
    let (read, _) = stored_card(&s, &acq, &id).await;
    assert_eq!(read, json!([4, 2032, "Ada King"]));

    // Concurrent reissues: whatever the order of commits, the latest
    // expiry wins (a lost update would leave an earlier one).
    let years = [2035u16, 2038, 2033, 2040, 2036, 2034, 2039, 2037];
    let all = years
        .iter()
        .map(|&y| create_again(&s, card(1, y, None), &id));
    futures_util::future::join_all(all).await;
    let (read, sent) = stored_card(&s, &acq, &id).await;
    assert_eq!(read, json!([1, 2040, "Ada King"]));
    assert_eq!(
        sent,
        json!({"mm": "01", "yyyy": "2040", "name": "Ada King"})
    );
    s.stop().await;
}

#[tokio::test]
async fn a_reissued_card_updates_the_stored_expiry_in_memory() {
    a_reissued_card_updates_the_stored_expiry(None).await;
}

#[tokio::test]
async fn a_reissued_card_updates_the_stored_expiry_in_sqlite_behind_the_cache() {
    use tokenrelay::config::{VaultBackend, VaultConfig};
    let dir = tempfile::tempdir().unwrap();
    a_reissued_card_updates_the_stored_expiry(Some(VaultConfig {
        backend: VaultBackend::Sqlite {
            path: dir.path().join("vault.db"),
        },
        key_file: Some(dir.path().join("master.key")),
        create_key_file: true,
        cache_ttl: tokenrelay::config::DEFAULT_VAULT_CACHE_TTL,
    }))
    .await;
    // The rewritten row stays sealed: neither name nor number in the files.
    for (_, bytes) in files_named(dir.path(), "") {
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("Ada King") && !text.contains(MASTERCARD));
    }
}

/// Runs when `TOKENRELAY_TEST_POSTGRES_URL` is set (in a fresh schema,
/// dropped after); set but unreachable is a failure, not a skip.
#[tokio::test]
async fn a_reissued_card_updates_the_stored_expiry_in_postgres_behind_the_cache() {
    use tokenrelay::config::{VaultBackend, VaultConfig};
    let test = "a_reissued_card_updates_the_stored_expiry_in_postgres_behind_the_cache";
    let Some(db) = PgSchema::create(test).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    a_reissued_card_updates_the_stored_expiry(Some(VaultConfig {
        backend: VaultBackend::Postgres {
            url: db.url.clone(),
            password_file: None,
        },
        key_file: Some(dir.path().join("master.key")),
        create_key_file: true,
        cache_ttl: tokenrelay::config::DEFAULT_VAULT_CACHE_TTL,
    }))
    .await;
}

#[tokio::test]
async fn saq_a_cannot_create_pci_tokens() {
    let s = TestServer::start(config(ComplianceLevel::SaqA)).await;
    let r = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&json!({"number": VISA, "expiry_month": 7, "expiry_year": 2030}))
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "source_not_permitted").await;
}

#[tokio::test]
async fn the_cvc_never_reaches_the_database() {
    use tokenrelay::config::{VaultBackend, VaultConfig};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("vault.db");
    let key_file = dir.path().join("master.key");
    let mut c = config(ComplianceLevel::SaqD);
    c.vault = VaultConfig {
        backend: VaultBackend::Sqlite { path: db.clone() },
        key_file: Some(key_file.clone()),
        create_key_file: true,
        cache_ttl: tokenrelay::config::DEFAULT_VAULT_CACHE_TTL,
    };
    let s = TestServer::start(c).await;
    let cvc = "7319";
    for pan in [VISA, MASTERCARD] {
        s.provision_with(json!({"source": {"type": "pan", "number": pan, "expiry_month": 12, "expiry_year": 2031, "cvc": cvc}}))
            .await;
    }
    let r = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&json!({"number": AMEX, "expiry_month": 7, "expiry_year": 2030, "cvc": cvc}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    s.stop().await;

    // Every stored value, decrypted where sealed, holds no CVC.
    let keys =
        tokenrelay::vault::keyring::Keyring::parse(&std::fs::read_to_string(&key_file).unwrap())
            .unwrap();
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    use sqlx::Row;
    for (table, prefix) in [
        ("network_tokens", "tokenrelay/network_token/"),
        ("pci_tokens", "tokenrelay/pci_token/"),
    ] {
        let rows = sqlx::query(&format!(
            "SELECT id, public_json, key_id, secret FROM {table}"
        ))
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(!rows.is_empty(), "{table} is empty");
        for row in rows {
            let id: String = row.get(0);
            let public: String = row.get(1);
            let key_id: String = row.get(2);
            let secret: String = row.get(3);
            use base64::Engine;
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(secret)
                .unwrap();
            let plain = keys
                .open(&key_id, format!("{prefix}{id}").as_bytes(), &sealed)
                .unwrap();
            // Structure, not substrings: the TPAN, timestamps, UUIDs and
            // references are random and contain "7319" now and then.
            let public: Value = serde_json::from_str(&public).unwrap();
            let plain: Value = serde_json::from_slice(&plain).unwrap();
            for (what, value) in [("public_json", &public), ("secret", &plain)] {
                assert_holds_no_cvc(value, cvc, &format!("{table}.{what}"));
            }
        }
    }
    pool.close().await;
    // And no CVC-bearing JSON anywhere in the raw files.
    let mut scanned = 0;
    for (_, bytes) in files_named(dir.path(), "") {
        scanned += 1;
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(&format!("\"{cvc}\"")));
        assert!(!text.contains("\"cvc\""));
    }
    assert!(scanned >= 2, "the database and the key file were scanned");
}

/// Fails when `value` has a CVC-named key anywhere, or a string (or number)
/// equal to `cvc`.
fn assert_holds_no_cvc(value: &Value, cvc: &str, at: &str) {
    match value {
        Value::Object(fields) => {
            for (key, v) in fields {
                let k = key.to_ascii_lowercase();
                assert!(
                    !(k.contains("cvc") || k.contains("cvv") || k.contains("security_code")),
                    "{at}: CVC-named key {key:?}"
                );
                assert_holds_no_cvc(v, cvc, &format!("{at}.{key}"));
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                assert_holds_no_cvc(v, cvc, &format!("{at}[{i}]"));
            }
        }
        Value::String(s) => assert_ne!(s.trim(), cvc, "{at}: the CVC as a value"),
        Value::Number(n) => assert_ne!(n.to_string(), cvc, "{at}: the CVC as a number"),
        Value::Bool(_) | Value::Null => {}
    }
}

#[test]
fn the_cvc_check_sees_structure_not_substrings() {
    let cvc = "7319";
    // A TPAN, a timestamp and a reference that merely contain the digits.
    assert_holds_no_cvc(
        &json!({"tpan": "5204731900001234", "at": 1_733_190_000_007_319_u64, "r": "sbx_a7319"}),
        cvc,
        "ok",
    );
    for bad in [
        json!({"card": {"cvc": "000"}}),
        json!({"Security_Code": 1}),
        json!({"x": ["a", " 7319"]}),
        json!({"x": 7319}),
    ] {
        let caught = std::panic::catch_unwind(|| assert_holds_no_cvc(&bad, cvc, "bad"));
        assert!(caught.is_err(), "{bad} passed");
    }
}
