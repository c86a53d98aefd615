//! Card-capture sessions, black-box (contract §11): a merchant at SAQ-A
//! opens a session, the "browser" (here `tokenrelay::session::jwe`, the
//! same profile as `sdk/js/tokenrelay.js`) encrypts a card to its key, and
//! the merchant provisions network and PCI tokens from the ciphertext, then
//! forwards a payment. Every refusal is checked for its status, classifier
//! and `x-relay-error`, and for never echoing the card.
//!
//! The Redis test (a session opened on one replica, finished on another)
//! runs only when `TOKENRELAY_TEST_REDIS_URL` is set, and fails when it is
//! set and Redis is unreachable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod support;

use std::time::Duration;

use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};
use support::*;
use tokenrelay::config::{ComplianceLevel, RedisConfig, ReferenceBackend};
use tokenrelay::session::jwe;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The card the cardholder types.
fn card(number: &str) -> Value {
    json!({"number": number, "expiry_month": 12, "expiry_year": 2031, "cvc": "737", "cardholder_name": "Ada Lovelace"})
}

/// `POST /api/sessions` → (id, public JWK).
async fn open(s: &TestServer) -> (String, Value) {
    let r = s.req(Method::POST, "/api/sessions").send().await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["public_key"].clone(),
    )
}

/// What the browser does: the card as a JWE to the session's key.
fn encrypt(jwk: &Value, plaintext: &Value) -> String {
    let key = jwe::public_key_from_jwk(jwk).unwrap();
    jwe::encrypt(
        &key,
        jwk["kid"].as_str().unwrap(),
        plaintext.to_string().as_bytes(),
    )
}

fn source(id: &str, data: &str) -> Value {
    json!({"type": "session", "id": id, "data": data})
}

async fn provision(s: &TestServer, id: &str, data: &str) -> reqwest::Response {
    s.req(Method::POST, "/api/network/tokens")
        .json(&json!({ "source": source(id, data) }))
        .send()
        .await
        .unwrap()
}

async fn pci_token(s: &TestServer, id: &str, data: &str) -> reqwest::Response {
    s.req(Method::POST, "/api/pci/tokens")
        .json(&json!({ "source": source(id, data), "metadata": {"order": "o-1"} }))
        .send()
        .await
        .unwrap()
}

/// An error that says nothing of the card or the ciphertext.
async fn assert_refused(resp: reqwest::Response, status: u16, classifier: &str, data: &str) {
    let body = assert_error(resp, status, classifier).await.to_string();
    for secret in [VISA, "737", "Ada Lovelace"] {
        assert!(!body.contains(secret), "{classifier}: {body}");
    }
    if data.len() > 20 {
        for part in data.split('.').filter(|p| p.len() > 8) {
            assert!(!body.contains(part), "{classifier} echoes the JWE: {body}");
        }
    }
}

#[tokio::test]
async fn saq_a_provisions_a_network_token_from_a_session_and_forwards_a_payment() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqA).await;
    let (id, jwk) = open(&s).await;
    let data = encrypt(&jwk, &card(VISA));

    let r = provision(&s, &id, &data).await;
    assert_eq!(r.status(), 201);
    let token: Value = r.json().await.unwrap();
    assert_eq!(token["status"], "active");
    assert_eq!(token["scheme"], "visa");
    assert_eq!(token["last4"], "1111");
    assert!(token["pci_token_id"].is_string(), "{token}");
    assert!(!token.to_string().contains(VISA));

    // The PCI token made beside it (for fallback) holds the card.
    let pci = s
        .req(
            Method::GET,
            &format!(
                "/api/pci/tokens/{}",
                token["pci_token_id"].as_str().unwrap()
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(pci.status(), 200);
    let pci: Value = pci.json().await.unwrap();
    assert_eq!(
        (pci["bin"].as_str(), pci["last4"].as_str()),
        (Some("411111"), Some("1111"))
    );
    assert_eq!(pci["cardholder_name"], "Ada Lovelace");

    // And the token pays: reference, forward, approved.
    let tid = token["id"].as_str().unwrap();
    let reference = s.reference(tid).await;
    let resp = s
        .forward(tid, &reference, &acq.url("/authorize"))
        .header("content-type", "application/json")
        .body(r#"{"pan":"<< number >>","cryptogram":"<< cryptogram >>"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), r#"{"approved":true}"#);
    let sent: Value = serde_json::from_slice(&acq.last().body).unwrap();
    let tpan = sent["pan"].as_str().unwrap();
    assert_eq!(tpan.len(), 16);
    assert_ne!(
        tpan, VISA,
        "the acquirer gets the network token, not the PAN"
    );
    assert!(!sent["cryptogram"].as_str().unwrap().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn saq_a_makes_a_pci_token_from_a_session_but_not_from_card_fields() {
    let s = TestServer::start(config(ComplianceLevel::SaqA)).await;
    let (id, jwk) = open(&s).await;
    let r = pci_token(&s, &id, &encrypt(&jwk, &card(MASTERCARD))).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["scheme"], "mastercard");
    assert_eq!(v["last4"], "4444");
    assert_eq!(v["metadata"]["order"], "o-1");
    assert!(!v.to_string().contains(MASTERCARD));

    // The card fields themselves stay refused at SAQ-A.
    let r = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&json!({"number": VISA, "expiry_month": 12, "expiry_year": 2031}))
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "source_not_permitted").await;
    // A source that is not a session, on the PCI route.
    let r = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&json!({"source": {"type": "pan", "number": VISA}}))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request").await;
    s.stop().await;
}

#[tokio::test]
async fn a_session_is_a_fresh_p256_key_with_kid_alg_use_and_an_expiry() {
    let mut c = config(ComplianceLevel::SaqA);
    c.api_keys[1].scopes = vec![tokenrelay::auth::Scope::Forward];
    let s = TestServer::start(c).await;
    let before = time::OffsetDateTime::now_utc();
    let r = s.req(Method::POST, "/api/sessions").send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("sess_") && id.len() == 27, "{id}");
    let jwk = &v["public_key"];
    assert_eq!(
        (
            jwk["kty"].as_str(),
            jwk["crv"].as_str(),
            jwk["alg"].as_str(),
            jwk["use"].as_str()
        ),
        (Some("EC"), Some("P-256"), Some("ECDH-ES"), Some("enc"))
    );
    assert_eq!(jwk["kid"], id);
    assert!(jwk.get("d").is_none(), "the private key never leaves");
    assert!(jwe::public_key_from_jwk(jwk).is_some(), "a point on P-256");
    let expires = time::OffsetDateTime::parse(
        v["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ttl = expires - before;
    assert!(
        ttl > time::Duration::minutes(14)
            && ttl <= time::Duration::minutes(15) + time::Duration::seconds(5),
        "{ttl}"
    );
    // Every session has its own key.
    let (_, other) = open(&s).await;
    assert_ne!(other["x"], jwk["x"]);

    // `{}` is accepted; fields are not; other methods are 405; the scope is tokens.
    let r = s
        .req(Method::POST, "/api/sessions")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = s
        .req(Method::POST, "/api/sessions")
        .json(&json!({"ttl": "1h"}))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request").await;
    let r = s.req(Method::GET, "/api/sessions").send().await.unwrap();
    assert_error(r, 405, "method_not_allowed").await;
    let r = s
        .http
        .post(s.url("/api/sessions"))
        .header("x-api-key", TOKENS_ONLY_KEY) // here: forward scope only
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "forbidden").await;
    let r = s.http.post(s.url("/api/sessions")).send().await.unwrap();
    assert_error(r, 401, "unauthorized").await;
    s.stop().await;
}

#[tokio::test]
async fn unknown_reused_and_expired_sessions() {
    let clock = tokenrelay::clock::ManualClock::starting_now();
    let s = TestServer::start_with_clock(config(ComplianceLevel::SaqA), clock.clone()).await;
    let (id, jwk) = open(&s).await;
    let data = encrypt(&jwk, &card(VISA));

    // Unknown (well-formed) and malformed ids: 404 on both routes.
    let unknown = tokenrelay::session::SessionId::generate();
    for bad in [unknown.as_str(), "sess_nope", "cref_x", ""] {
        assert_refused(
            provision(&s, bad, &data).await,
            404,
            "session_not_found",
            &data,
        )
        .await;
        assert_refused(
            pci_token(&s, bad, &data).await,
            404,
            "session_not_found",
            &data,
        )
        .await;
    }

    // Used once; the second time is 409 on either route, even with a
    // ciphertext that would decrypt.
    assert_eq!(provision(&s, &id, &data).await.status(), 201);
    assert_refused(
        provision(&s, &id, &data).await,
        409,
        "session_already_used",
        &data,
    )
    .await;
    assert_refused(
        pci_token(&s, &id, &data).await,
        409,
        "session_already_used",
        &data,
    )
    .await;

    // Expiry, on the server's clock moved by hand (not slept through):
    // two sessions opened now; a millisecond before the 15-minute
    // session_ttl one still works, at it the other is not found.
    let (live_id, live_jwk) = open(&s).await;
    let (old_id, old_jwk) = open(&s).await;
    let ms = time::Duration::milliseconds(1);
    clock.advance(time::Duration::minutes(15) - ms);
    let r = pci_token(&s, &live_id, &encrypt(&live_jwk, &card(VISA))).await;
    assert!(r.status().is_success(), "{}", r.status());
    clock.advance(ms);
    let old_data = encrypt(&old_jwk, &card(VISA));
    assert_refused(
        provision(&s, &old_id, &old_data).await,
        404,
        "session_not_found",
        &old_data,
    )
    .await;
    s.stop().await;
}

/// A JWE for `jwk`'s session with `header` (an `epk` is added if absent).
fn sealed(jwk: &Value, header: Value, plaintext: &Value) -> String {
    jwe::seal(
        header,
        &tokenrelay::session::generate_key(),
        &jwe::public_key_from_jwk(jwk).unwrap(),
        plaintext.to_string().as_bytes(),
    )
}

fn edit_part(data: &str, i: usize, f: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut parts: Vec<String> = data.split('.').map(str::to_owned).collect();
    let mut bytes = B64.decode(&parts[i]).unwrap();
    f(&mut bytes);
    parts[i] = B64.encode(bytes);
    parts.join(".")
}

#[tokio::test]
async fn ciphertext_that_is_not_for_this_session_is_invalid_session_data() {
    let s = TestServer::start(config(ComplianceLevel::SaqA)).await;
    let plain = card(VISA);
    let (_, other_jwk) = open(&s).await;

    // Each case gets a fresh session: a failed attempt spends it.
    type Case = Box<dyn Fn(&str, &Value) -> String>;
    let other = other_jwk.clone();
    let cases: Vec<(&str, Case)> = vec![
        (
            "tampered ciphertext",
            Box::new(|_, jwk: &Value| edit_part(&encrypt(jwk, &card(VISA)), 3, |b| b[0] ^= 0x80)),
        ),
        (
            "tampered tag",
            Box::new(|_, jwk: &Value| edit_part(&encrypt(jwk, &card(VISA)), 4, |b| b[15] ^= 1)),
        ),
        (
            "tampered iv",
            Box::new(|_, jwk: &Value| edit_part(&encrypt(jwk, &card(VISA)), 2, |b| b[0] ^= 1)),
        ),
        (
            "truncated",
            Box::new(|_, jwk: &Value| {
                let d = encrypt(jwk, &card(VISA));
                d[..d.rfind('.').unwrap()].to_owned()
            }),
        ),
        (
            "another session's key",
            Box::new(move |id, _| {
                // Encrypted to the other session's key, but naming this one.
                let key = jwe::public_key_from_jwk(&other).unwrap();
                jwe::encrypt(&key, id, card(VISA).to_string().as_bytes())
            }),
        ),
        (
            "another session's kid",
            Box::new(|_, jwk: &Value| {
                sealed(
                    jwk,
                    json!({"alg": "ECDH-ES", "enc": "A256GCM", "kid": "sess_AAAAAAAAAAAAAAAAAAAAAA"}),
                    &card(VISA),
                )
            }),
        ),
        (
            "no kid",
            Box::new(|_, jwk: &Value| {
                sealed(
                    jwk,
                    json!({"alg": "ECDH-ES", "enc": "A256GCM"}),
                    &card(VISA),
                )
            }),
        ),
        (
            "alg ECDH-ES+A256KW",
            Box::new(|id, jwk: &Value| {
                sealed(
                    jwk,
                    json!({"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "kid": id}),
                    &card(VISA),
                )
            }),
        ),
        (
            "alg dir",
            Box::new(|id, jwk: &Value| {
                sealed(
                    jwk,
                    json!({"alg": "dir", "enc": "A256GCM", "kid": id}),
                    &card(VISA),
                )
            }),
        ),
        (
            "enc A128GCM",
            Box::new(|id, jwk: &Value| {
                sealed(
                    jwk,
                    json!({"alg": "ECDH-ES", "enc": "A128GCM", "kid": id}),
                    &card(VISA),
                )
            }),
        ),
        (
            "enc A256CBC-HS512",
            Box::new(|id, jwk: &Value| {
                sealed(
                    jwk,
                    json!({"alg": "ECDH-ES", "enc": "A256CBC-HS512", "kid": id}),
                    &card(VISA),
                )
            }),
        ),
        (
            "zip",
            Box::new(|id, jwk: &Value| {
                sealed(
                    jwk,
                    json!({"alg": "ECDH-ES", "enc": "A256GCM", "kid": id, "zip": "DEF"}),
                    &card(VISA),
                )
            }),
        ),
        (
            "crit",
            Box::new(|id, jwk: &Value| {
                sealed(
                    jwk,
                    json!({"alg": "ECDH-ES", "enc": "A256GCM", "kid": id, "crit": ["b64"], "b64": false}),
                    &card(VISA),
                )
            }),
        ),
        (
            "epk off the curve",
            Box::new(|_, jwk: &Value| {
                let d = encrypt(jwk, &card(VISA));
                let mut parts: Vec<String> = d.split('.').map(str::to_owned).collect();
                let mut h: Value = serde_json::from_slice(&B64.decode(&parts[0]).unwrap()).unwrap();
                let mut y = B64.decode(h["epk"]["y"].as_str().unwrap()).unwrap();
                y[31] ^= 1;
                h["epk"]["y"] = json!(B64.encode(y));
                parts[0] = B64.encode(h.to_string());
                parts.join(".")
            }),
        ),
        (
            "epk on P-384",
            Box::new(|id, jwk: &Value| {
                sealed(
                    jwk,
                    json!({"alg": "ECDH-ES", "enc": "A256GCM", "kid": id,
                "epk": {"kty": "EC", "crv": "P-384", "x": "AAAA", "y": "AAAA"}}),
                    &card(VISA),
                )
            }),
        ),
        ("not a JWE", Box::new(|_, _| "hello".to_owned())),
        (
            "a JSON array inside",
            Box::new(|_, jwk: &Value| encrypt(jwk, &json!([VISA]))),
        ),
        (
            "an unknown field inside",
            Box::new(|_, jwk: &Value| {
                let mut c = card(VISA);
                c["track2"] = json!("x");
                encrypt(jwk, &c)
            }),
        ),
    ];
    for (what, make) in &cases {
        for pci in [false, true] {
            let (id, jwk) = open(&s).await;
            let data = make(&id, &jwk);
            let r = if pci {
                pci_token(&s, &id, &data).await
            } else {
                provision(&s, &id, &data).await
            };
            println!("{what} (pci {pci})");
            assert_refused(r, 422, "invalid_session_data", &data).await;
            // The failed attempt spent the session.
            assert_refused(
                provision(&s, &id, &encrypt(&jwk, &plain)).await,
                409,
                "session_already_used",
                &data,
            )
            .await;
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn the_card_in_a_session_follows_the_pan_rules() {
    let s = TestServer::start(config(ComplianceLevel::SaqA)).await;
    for (what, card, field) in [
        (
            "Luhn",
            json!({"number": "4111111111111112", "expiry_month": 12, "expiry_year": 2031}),
            "number",
        ),
        (
            "brand",
            json!({"number": "9999999999999995", "expiry_month": 12, "expiry_year": 2031}),
            "number",
        ),
        (
            "expired",
            json!({"number": VISA, "expiry_month": 1, "expiry_year": 2020}),
            "expiry",
        ),
        (
            "month",
            json!({"number": VISA, "expiry_month": 13, "expiry_year": 2031}),
            "expiry_month",
        ),
        (
            "no number",
            json!({"expiry_month": 12, "expiry_year": 2031}),
            "number",
        ),
        (
            "cvc",
            json!({"number": VISA, "expiry_month": 12, "expiry_year": 2031, "cvc": "12"}),
            "cvc",
        ),
    ] {
        let (id, jwk) = open(&s).await;
        let data = encrypt(&jwk, &card);
        let body = assert_error(provision(&s, &id, &data).await, 422, "invalid_card").await;
        assert!(
            body["message"].as_str().unwrap().contains(field),
            "{what}: {body}"
        );
        assert!(
            !body.to_string().contains("411111111111111"),
            "{what}: {body}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn a_malformed_source_is_refused_without_spending_the_session() {
    let s = TestServer::start(config(ComplianceLevel::SaqA)).await;
    let (id, jwk) = open(&s).await;
    for bad in [
        json!({"type": "session", "id": id}),
        json!({"type": "session", "data": "x"}),
        json!({"type": "session", "id": id, "data": 7}),
        json!({"type": "session", "id": id, "data": "x", "number": VISA}),
    ] {
        let r = s
            .req(Method::POST, "/api/network/tokens")
            .json(&json!({ "source": bad }))
            .send()
            .await
            .unwrap();
        assert_error(r, 400, "invalid_request").await;
    }
    // Bad metadata on the PCI route is refused before the session is spent.
    let r = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&json!({"source": source(&id, "x"), "metadata": {"k": 1}}))
        .send()
        .await
        .unwrap();
    assert_error(r, 422, "invalid_metadata").await;
    assert_eq!(
        provision(&s, &id, &encrypt(&jwk, &card(VISA)))
            .await
            .status(),
        201
    );
    s.stop().await;
}

#[tokio::test]
async fn an_idempotent_retry_replays_instead_of_spending_again() {
    let s = TestServer::start(config(ComplianceLevel::SaqA)).await;
    let (id, jwk) = open(&s).await;
    let body = json!({"source": source(&id, &encrypt(&jwk, &card(VISA)))});
    let send = || {
        s.req(Method::POST, "/api/network/tokens")
            .header("x-idempotency-key", "checkout-42")
            .json(&body)
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    s.stop().await;
}

#[tokio::test]
async fn a_session_opened_on_one_replica_is_finished_on_another_with_redis() {
    let url = match std::env::var("TOKENRELAY_TEST_REDIS_URL") {
        Ok(url) => url,
        Err(_) => {
            println!("skipped: TOKENRELAY_TEST_REDIS_URL is unset");
            return;
        }
    };
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap_or_else(|e| {
            panic!("TOKENRELAY_TEST_REDIS_URL is set but Redis is unreachable: {e}")
        });
    let prefix = format!(
        "tokenrelay-test:sessions:{}:",
        uuid::Uuid::new_v4().simple()
    );
    let key_dir = tempfile::tempdir().unwrap();
    let replica = |create: bool| {
        let mut c = config(ComplianceLevel::SaqA);
        c.vault.key_file = Some(key_dir.path().join("master.key"));
        c.vault.create_key_file = create;
        c.references = ReferenceBackend::Redis(RedisConfig {
            url: url.clone(),
            password_file: None,
            key_prefix: prefix.clone(),
            ..RedisConfig::default()
        });
        c
    };
    // Both replicas on one clock, moved by hand below.
    let clock = tokenrelay::clock::ManualClock::starting_now();
    let a = TestServer::start_with_clock(replica(true), clock.clone()).await;
    let b = TestServer::start_with_clock(replica(false), clock.clone()).await;

    let (id, jwk) = open(&a).await;
    let data = encrypt(&jwk, &card(VISA));
    // Redis holds a sealed key under a hash of the id: neither the id nor
    // anything of the key pair in the clear.
    let keys: Vec<String> = redis::Commands::scan_match(&mut con, format!("{prefix}*"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(!keys[0].contains(&id[5..]));
    let fields: Vec<Vec<u8>> = redis::cmd("HGETALL").arg(&keys[0]).query(&mut con).unwrap();
    assert_eq!(fields.len(), 6, "e, k, p");
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut con).unwrap();
    assert!(ttl > 14 * 60 * 1000 && ttl <= 15 * 60 * 1000, "{ttl}");

    let r = provision(&b, &id, &data).await;
    assert_eq!(r.status(), 201, "replica B finishes A's session");
    assert_eq!(r.json::<Value>().await.unwrap()["last4"], "1111");
    assert_refused(
        provision(&a, &id, &data).await,
        409,
        "session_already_used",
        &data,
    )
    .await;
    assert_refused(
        pci_token(&b, &id, &data).await,
        409,
        "session_already_used",
        &data,
    )
    .await;
    // The spent session keeps only its expiry, as the 409's tombstone.
    let fields: Vec<String> = redis::cmd("HKEYS").arg(&keys[0]).query(&mut con).unwrap();
    assert_eq!(fields, ["e"]);

    // Expiry across replicas, on the clock they share (Redis's own PXAT,
    // kept as it is, is 15 real minutes away): of two sessions opened on
    // A, one still finishes on B a millisecond before session_ttl, the
    // other is not found at it.
    let (live_id, live_jwk) = open(&a).await;
    let (old_id, old_jwk) = open(&a).await;
    let ms = time::Duration::milliseconds(1);
    clock.advance(time::Duration::minutes(15) - ms);
    let r = pci_token(&b, &live_id, &encrypt(&live_jwk, &card(VISA))).await;
    assert!(r.status().is_success(), "{}", r.status());
    clock.advance(ms);
    let old_data = encrypt(&old_jwk, &card(VISA));
    assert_refused(
        provision(&b, &old_id, &old_data).await,
        404,
        "session_not_found",
        &old_data,
    )
    .await;

    a.stop().await;
    b.stop().await;
    let keys: Vec<String> = redis::Commands::scan_match(&mut con, format!("{prefix}*"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    if !keys.is_empty() {
        let _: u64 = redis::cmd("DEL").arg(keys).query(&mut con).unwrap();
    }
}
