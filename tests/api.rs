//! The token and cryptogram API as a merchant sees it (contract §2–§5):
//! authentication, errors, network tokens, cryptograms, idempotency, the
//! compliance matrix, and the `check-config` / `hash-key` commands.

// Tests are where panicking on the unexpected is the point (STYLE.md §3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use reqwest::Method;
use serde_json::{json, Map, Value};
use support::*;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokenrelay::card::Brand;
use tokenrelay::config::ComplianceLevel;
use tokenrelay::references::{ReferenceId, TakeError, TakeFailure};
use tokenrelay::tsp::sandbox::{SandboxTsp, DEFAULT_SANDBOX_KEY};
use tokenrelay::vault::TokenId;

const TOKENS: &str = "/api/network/tokens";

fn cryptograms_path(id: &str) -> String {
    format!("{TOKENS}/{id}/cryptograms")
}

fn pan_source(pan: &str) -> Value {
    json!({"type": "pan", "number": pan, "expiry_month": 12, "expiry_year": 2031})
}

async fn provision_raw(s: &TestServer, body: Value) -> reqwest::Response {
    s.req(Method::POST, TOKENS)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn cryptogram(s: &TestServer, id: &str, body: Value) -> reqwest::Response {
    s.req(Method::POST, &cryptograms_path(id))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// An inline cryptogram (saq-d/roc only); asserts 200.
async fn inline(s: &TestServer, id: &str, body: Value) -> Value {
    let r = cryptogram(s, id, body).await;
    assert_eq!(r.status(), 200, "inline cryptogram");
    assert_eq!(r.headers()["content-type"], "application/json");
    r.json().await.unwrap()
}

/// The token's TPAN, learnt the way a SAQ-D merchant can: from an inline
/// cryptogram.
async fn tpan_of(s: &TestServer, id: &str) -> String {
    let c = inline(
        s,
        id,
        json!({"type": "ecom", "mode": "inline", "amount": "1.00"}),
    )
    .await;
    c["number"].as_str().unwrap().to_owned()
}

async fn get_token(s: &TestServer, id: &str) -> reqwest::Response {
    s.req(Method::GET, &format!("{TOKENS}/{id}"))
        .send()
        .await
        .unwrap()
}

/// Runs of 13 or more ASCII digits: anything shaped like a PAN or TPAN.
fn long_digit_runs(text: &str) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur = String::new();
    for ch in text.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_digit() {
            cur.push(ch);
        } else {
            if cur.len() >= 13 {
                runs.push(cur.clone());
            }
            cur.clear();
        }
    }
    runs
}

fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0;
    for (i, b) in digits.bytes().rev().enumerate() {
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && sum % 10 == 0
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn rfc3339(v: &Value) -> OffsetDateTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("{s} is not RFC 3339: {e}"))
}

// ---------------------------------------------------------------------------
// §2 Authentication

#[tokio::test]
async fn request_without_api_key_is_unauthorized() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let r = s
        .http
        .post(s.url(TOKENS))
        .json(&json!({"source": pan_source(VISA)}))
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "unauthorized").await;
    // Reading a token that exists is refused just the same.
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let r = s
        .http
        .get(s.url(&format!("{TOKENS}/{id}")))
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "unauthorized").await;
    s.stop().await;
}

#[tokio::test]
async fn unknown_api_key_is_unauthorized() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    for key in [
        "not-a-configured-key",
        "",
        "TEST-KEY-ALL-SCOPES",
        "test-key-all-scopes2",
    ] {
        let r = s
            .http
            .post(s.url(TOKENS))
            .header("x-api-key", key)
            .json(&json!({"source": pan_source(VISA)}))
            .send()
            .await
            .unwrap();
        let body = assert_error(r, 401, "unauthorized").await;
        assert!(!body.to_string().contains(KEY), "{body}");
    }
    s.stop().await;
}

#[tokio::test]
async fn key_without_cryptograms_scope_is_forbidden() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    // The tokens-only key may provision and read...
    let r = s
        .http
        .post(s.url(TOKENS))
        .header("x-api-key", TOKENS_ONLY_KEY)
        .json(&json!({"source": pan_source(VISA)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let token: Value = r.json().await.unwrap();
    let id = token["id"].as_str().unwrap();
    // ...but not ask for a cryptogram.
    let r = s
        .http
        .post(s.url(&cryptograms_path(id)))
        .header("x-api-key", TOKENS_ONLY_KEY)
        .json(&json!({"type": "ecom", "mode": "reference"}))
        .send()
        .await
        .unwrap();
    let body = assert_error(r, 403, "forbidden").await;
    assert!(
        body["message"].as_str().unwrap().contains("cryptograms"),
        "{body}"
    );
    s.stop().await;
}

#[tokio::test]
async fn unknown_api_route_is_not_found_after_auth() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    // Unauthenticated callers learn nothing about routes.
    let r = s.http.get(s.url("/api/nope")).send().await.unwrap();
    assert_error(r, 401, "unauthorized").await;
    for path in [
        "/api/nope",
        "/api/network/tokens/x/nope",
        "/api/network/tokensx",
    ] {
        let r = s.req(Method::GET, path).send().await.unwrap();
        assert_error(r, 404, "not_found").await;
    }
    s.stop().await;
}

#[tokio::test]
async fn wrong_method_on_a_route_is_method_not_allowed() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    // RFC 9110 §15.5.6: a 405 names the methods the route takes.
    for (method, path, allow) in [
        (Method::GET, "/api/network/tokens", "POST"),
        (
            Method::PUT,
            "/api/network/tokens/6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11",
            "GET, DELETE",
        ),
        (
            Method::GET,
            "/api/network/tokens/6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11/cryptograms",
            "POST",
        ),
        (Method::PATCH, "/api/pci/tokens", "POST"),
        (
            Method::POST,
            "/api/pci/tokens/6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11",
            "GET, DELETE",
        ),
        (Method::POST, "/openapi.json", "GET"),
    ] {
        let r = s.req(method, path).send().await.unwrap();
        assert_eq!(r.headers()["allow"], allow, "{path}");
        assert_error(r, 405, "method_not_allowed").await;
    }
    s.stop().await;
}

#[tokio::test]
async fn the_openapi_document_is_served_without_a_key() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let r = reqwest::get(s.url("/openapi.json")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/network/tokens/{id}/forward"]["post"].is_object());
    s.stop().await;
}

#[tokio::test]
async fn an_event_refuses_expiry_fields_it_does_not_use() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let t = s.provision("4111111111111111").await;
    let id = t["id"].as_str().unwrap();
    let r = s
        .req(Method::POST, &format!("/api/network/tokens/{id}/events"))
        .json(&json!({"event": "activate_dauth", "expiry_month": 20}))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request").await;
    let after: Value = s
        .req(Method::GET, &format!("/api/network/tokens/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(after["updated_at"], t["updated_at"], "nothing was applied");
    s.stop().await;
}

#[tokio::test]
async fn session_source_needs_an_id_and_data() {
    // The session source itself is tested in tests/sessions.rs.
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let r = s
        .req(Method::POST, TOKENS)
        .json(&json!({"source": {"type": "session", "id": "sess_1"}}))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request").await;
}

// ---------------------------------------------------------------------------
// §4 Provisioning

#[tokio::test]
async fn provisioning_each_brand_returns_the_contract_token_object() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let today = OffsetDateTime::now_utc();
    for (pan, scheme, token_type) in [
        (VISA, "visa", "vts"),
        (MASTERCARD, "mastercard", "mdes"),
        (AMEX, "amex", "tms"),
        (DISCOVER, "discover", "hgts"),
    ] {
        let r = provision_raw(
            &s,
            json!({"source": pan_source(pan), "metadata": {"order": "A-1"}}),
        )
        .await;
        assert_eq!(r.status(), 201, "{scheme}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let text = r.text().await.unwrap();
        let t: Value = serde_json::from_str(&text).unwrap();

        let expected: BTreeSet<&str> = [
            "id",
            "status",
            "network_token_type",
            "scheme",
            "last4",
            "expiry_month",
            "expiry_year",
            "pci_token_id",
            "supports_device_binding",
            "scheme_reference",
            "scheme_metadata",
            "metadata",
            "created_at",
            "updated_at",
        ]
        .into_iter()
        .collect();
        assert_eq!(keys(&t), expected, "{scheme}: {t}");
        let id = t["id"].as_str().unwrap();
        assert!(uuid::Uuid::try_parse(id).is_ok(), "{id}");
        assert_eq!(t["status"], "active");
        assert_eq!(t["network_token_type"], token_type);
        assert_eq!(t["scheme"], scheme);
        assert_eq!(t["last4"], &pan[pan.len() - 4..]);
        let month = t["expiry_month"].as_u64().unwrap();
        let year = t["expiry_year"].as_u64().unwrap() as i32;
        assert!((1..=12).contains(&month), "{t}");
        assert!(
            (year, month as u8) >= (today.year(), u8::from(today.month())),
            "token expiry in the past: {t}"
        );
        // A PAN source also keeps the card as a PCI token, for fallback.
        assert!(
            t["pci_token_id"]
                .as_str()
                .is_some_and(|p| uuid::Uuid::try_parse(p).is_ok()),
            "{t}"
        );
        assert!(t["supports_device_binding"].is_boolean(), "{t}");
        assert!(
            t["scheme_reference"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{t}"
        );
        assert!(
            t["scheme_metadata"]
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string)),
            "{t}"
        );
        assert_eq!(t["metadata"], json!({"order": "A-1"}));
        let created = rfc3339(&t["created_at"]);
        let updated = rfc3339(&t["updated_at"]);
        assert!(updated >= created);

        // Never the PAN, never the TPAN, nothing shaped like a card number.
        let tpan = tpan_of(&s, id).await;
        assert!(!text.contains(pan), "PAN in {text}");
        assert!(!text.contains(&tpan), "TPAN in {text}");
        // The sandbox's scheme_reference is random hex and may by chance
        // hold a long digit run; it is covered by the two checks above.
        let mut rest = t.clone();
        rest.as_object_mut().unwrap().remove("scheme_reference");
        assert_eq!(
            long_digit_runs(&rest.to_string()),
            Vec::<String>::new(),
            "{text}"
        );

        // GET shows the same token.
        let got: Value = get_token(&s, id).await.json().await.unwrap();
        assert_eq!(got, t, "{scheme}");
    }
    s.stop().await;
}

#[tokio::test]
async fn invalid_cards_are_refused_naming_the_field() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let cases = [
        // Luhn failure: last digit off by one.
        (
            json!({"type": "pan", "number": "4111111111111112", "expiry_month": 12, "expiry_year": 2031}),
            "number",
        ),
        // Luhn-valid JCB: a brand tokenrelay does not take.
        (
            json!({"type": "pan", "number": "3530111333300000", "expiry_month": 12, "expiry_year": 2031}),
            "number",
        ),
        // Expired.
        (
            json!({"type": "pan", "number": VISA, "expiry_month": 1, "expiry_year": 2020}),
            "expir",
        ),
        // Month 13.
        (
            json!({"type": "pan", "number": VISA, "expiry_month": 13, "expiry_year": 2031}),
            "expiry_month",
        ),
        // Missing number.
        (
            json!({"type": "pan", "expiry_month": 12, "expiry_year": 2031}),
            "number",
        ),
    ];
    for (source, field) in cases {
        let r = provision_raw(&s, json!({ "source": source })).await;
        let body = assert_error(r, 422, "invalid_card").await;
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains(field), "{source} → {msg}");
        // The message names the field, never the number.
        assert!(long_digit_runs(msg).is_empty(), "{msg}");
        assert!(!msg.contains("411111111111111"), "{msg}");
    }
    s.stop().await;
}

#[tokio::test]
async fn non_json_body_is_invalid_request() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    for body in [
        "number=4111111111111111",
        r#"{"source": {"type": "pan", "number": "4111111111111111""#,
        "[1, 2]",
        "",
    ] {
        let r = s
            .req(Method::POST, TOKENS)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let err = assert_error(r, 400, "invalid_request").await;
        assert!(!err.to_string().contains("4111"), "{err}");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_card_number_used_as_a_field_name_is_not_echoed() {
    // Contract §3: no error message ever contains a PAN, whatever field of
    // the request it was put in, names included.
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let mut source = pan_source(VISA);
    source[MASTERCARD] = json!(1);
    let cases = [
        (
            json!({"source": pan_source(VISA), AMEX: "x"}),
            400,
            "invalid_request",
        ),
        (json!({ "source": source }), 400, "invalid_request"),
        (
            json!({"source": pan_source(VISA), "metadata": {DISCOVER: 1}}),
            422,
            "invalid_metadata",
        ),
        (
            json!({"source": pan_source(VISA), "metadata": {"4111 1111 1111 1111": 1}}),
            422,
            "invalid_metadata",
        ),
    ];
    for (body, status, classifier) in cases {
        let r = provision_raw(&s, body.clone()).await;
        let err = assert_error(r, status, classifier).await;
        let msg = err["message"].as_str().unwrap();
        for pan in [MASTERCARD, AMEX, DISCOVER, "1111 1111"] {
            assert!(!msg.contains(pan), "{body} → {msg}");
        }
    }
    // An ordinary misspelt name is still named, so the merchant can fix it.
    let r = provision_raw(&s, json!({"sourse": pan_source(VISA)})).await;
    let err = assert_error(r, 400, "invalid_request").await;
    assert!(err["message"].as_str().unwrap().contains("sourse"), "{err}");
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Compliance matrix

#[tokio::test]
async fn saq_a_refuses_a_pan_source() {
    let s = TestServer::start(config(ComplianceLevel::SaqA)).await;
    let r = provision_raw(&s, json!({"source": pan_source(VISA)})).await;
    let body = assert_error(r, 403, "source_not_permitted").await;
    assert!(!body.to_string().contains(VISA));
    s.stop().await;
}

#[tokio::test]
async fn saq_d_and_roc_accept_a_pan_source() {
    for level in [ComplianceLevel::SaqD, ComplianceLevel::Roc] {
        let s = TestServer::start(config(level)).await;
        let r = provision_raw(&s, json!({"source": pan_source(VISA)})).await;
        assert_eq!(r.status(), 201, "{level:?}");
        let t: Value = r.json().await.unwrap();
        assert_eq!(t["status"], "active");
        s.stop().await;
    }
}

#[tokio::test]
async fn cryptogram_modes_follow_the_compliance_level() {
    for level in [
        ComplianceLevel::SaqA,
        ComplianceLevel::SaqD,
        ComplianceLevel::Roc,
    ] {
        let s = TestServer::start(config(level)).await;
        let id = if level == ComplianceLevel::SaqA {
            seed_token(&s, VISA, Brand::Visa).await
        } else {
            s.provision(VISA).await["id"].as_str().unwrap().to_owned()
        };

        // Explicit reference: 201 everywhere.
        let r = cryptogram(&s, &id, json!({"type": "ecom", "mode": "reference"})).await;
        assert_eq!(r.status(), 201, "{level:?} reference");
        let v: Value = r.json().await.unwrap();
        assert!(v["cryptogram_reference"]
            .as_str()
            .unwrap()
            .starts_with("cref_"));

        let explicit_inline = cryptogram(&s, &id, json!({"type": "ecom", "mode": "inline"})).await;
        let default_mode = cryptogram(&s, &id, json!({"type": "ecom"})).await;
        if level == ComplianceLevel::SaqA {
            assert_error(explicit_inline, 403, "inline_not_permitted").await;
            assert_eq!(default_mode.status(), 201, "saq-a default is reference");
            let v: Value = default_mode.json().await.unwrap();
            assert!(v["cryptogram_reference"]
                .as_str()
                .unwrap()
                .starts_with("cref_"));
            assert!(
                v.get("cryptogram").is_none() && v.get("number").is_none(),
                "{v}"
            );
        } else {
            assert_eq!(explicit_inline.status(), 200, "{level:?} inline");
            let v: Value = explicit_inline.json().await.unwrap();
            assert_eq!(v["cryptogram"].as_str().unwrap().len(), 28);
            assert_eq!(default_mode.status(), 200, "{level:?} default is inline");
            let v: Value = default_mode.json().await.unwrap();
            assert_eq!(v["cryptogram"].as_str().unwrap().len(), 28);
            assert!(v.get("cryptogram_reference").is_none(), "{v}");
        }
        s.stop().await;
    }
}

// ---------------------------------------------------------------------------
// Metadata limits

/// Metadata at and beyond each limit; `true` = accepted.
fn metadata_cases() -> Vec<(&'static str, Value, bool)> {
    let pairs = |n: usize| -> Value {
        Value::Object(
            (0..n)
                .map(|i| (format!("k{i}"), Value::String(format!("v{i}"))))
                .collect::<Map<String, Value>>(),
        )
    };
    vec![
        ("20 pairs", pairs(20), true),
        ("21 pairs", pairs(21), false),
        ("key of 20", json!({ "k".repeat(20): "v" }), true),
        ("key of 21", json!({ "k".repeat(21): "v" }), false),
        ("value of 80", json!({ "k": "v".repeat(80) }), true),
        (
            "value of 80 multibyte",
            json!({ "k": "é".repeat(80) }),
            true,
        ),
        ("value of 81", json!({ "k": "v".repeat(81) }), false),
        ("number value", json!({ "k": 1 }), false),
        ("boolean value", json!({ "k": true }), false),
        ("object value", json!({ "k": {"a": "b"} }), false),
        ("array as metadata", json!(["k", "v"]), false),
    ]
}

#[tokio::test]
async fn metadata_limits_on_provisioning() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    for (name, metadata, ok) in metadata_cases() {
        let r = provision_raw(
            &s,
            json!({"source": pan_source(VISA), "metadata": metadata}),
        )
        .await;
        if ok {
            assert_eq!(r.status(), 201, "{name}");
            let t: Value = r.json().await.unwrap();
            assert_eq!(t["metadata"], metadata, "{name}");
            // Stored, not just echoed.
            let got: Value = get_token(&s, t["id"].as_str().unwrap())
                .await
                .json()
                .await
                .unwrap();
            assert_eq!(got["metadata"], metadata, "{name}");
        } else {
            assert_error(r, 422, "invalid_metadata").await;
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn metadata_limits_on_cryptogram_requests() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    for mode in ["inline", "reference"] {
        for (name, metadata, ok) in metadata_cases() {
            let r = cryptogram(
                &s,
                &id,
                json!({"type": "ecom", "mode": mode, "metadata": metadata}),
            )
            .await;
            if ok {
                assert!(r.status().is_success(), "{mode} {name}: {}", r.status());
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["metadata"], metadata, "{mode} {name}");
            } else {
                assert_error(r, 422, "invalid_metadata").await;
            }
        }
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Idempotency

#[tokio::test]
async fn same_idempotency_key_and_body_replays_the_same_token() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let body = json!({"source": pan_source(VISA), "metadata": {"order": "7"}});
    let send = |key: Option<&'static str>| {
        let mut rb = s.req(Method::POST, TOKENS).json(&body);
        if let Some(k) = key {
            rb = rb.header("x-idempotency-key", k);
        }
        rb.send()
    };
    let first = send(Some("order-7")).await.unwrap();
    assert_eq!(first.status(), 201);
    let first = first.text().await.unwrap();
    let again = send(Some("order-7")).await.unwrap();
    assert_eq!(again.status(), 201);
    let again = again.text().await.unwrap();
    // Byte for byte the same answer: one token, not two.
    assert_eq!(first, again);
    let id = serde_json::from_str::<Value>(&first).unwrap()["id"].clone();

    // Without the header, or with another key, it is a new token.
    let other: Value = send(None).await.unwrap().json().await.unwrap();
    assert_ne!(other["id"], id);
    let other: Value = send(Some("order-8")).await.unwrap().json().await.unwrap();
    assert_ne!(other["id"], id);
    s.stop().await;
}

#[tokio::test]
async fn same_idempotency_key_with_another_body_is_refused() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let first = s
        .req(Method::POST, TOKENS)
        .header("x-idempotency-key", "k-1")
        .json(&json!({"source": pan_source(VISA)}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let r = s
        .req(Method::POST, TOKENS)
        .header("x-idempotency-key", "k-1")
        .json(&json!({"source": pan_source(MASTERCARD)}))
        .send()
        .await
        .unwrap();
    let body = assert_error(r, 422, "idempotency_key_reused").await;
    assert!(!body.to_string().contains(MASTERCARD));
    // The original is still what the key stands for.
    let replay: Value = s
        .req(Method::POST, TOKENS)
        .header("x-idempotency-key", "k-1")
        .json(&json!({"source": pan_source(VISA)}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replay["id"], first["id"]);
    s.stop().await;
}

#[tokio::test]
async fn an_idempotency_record_lives_for_idempotency_ttl_on_the_clock() {
    // Time moved by hand on the server's clock, not slept through: a
    // millisecond before the TTL the key replays, at it the request runs
    // again and the key stands for the new answer.
    let clock = tokenrelay::clock::ManualClock::starting_now();
    let mut c = config(ComplianceLevel::SaqD);
    c.idempotency_ttl = std::time::Duration::from_secs(3600);
    let s = TestServer::start_with_clock(c, clock.clone()).await;
    let token = s.provision(VISA).await;
    let path = cryptograms_path(token["id"].as_str().unwrap());
    let send = || async {
        let r = s
            .req(Method::POST, &path)
            .header("x-idempotency-key", "ttl-1")
            .json(&json!({"type": "ecom", "mode": "reference", "amount": "10.00"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()
    };
    let first = send().await;
    let ms = time::Duration::milliseconds(1);
    clock.advance(time::Duration::hours(1) - ms);
    assert_eq!(send().await, first, "replayed until the TTL");
    clock.advance(ms);
    let fresh = send().await;
    assert_ne!(
        fresh["cryptogram_reference"], first["cryptogram_reference"],
        "at the TTL the key is free again"
    );
    assert_eq!(send().await, fresh, "and now stands for the new answer");
    s.stop().await;
}

#[tokio::test]
async fn a_refused_request_does_not_bind_its_idempotency_key() {
    // "A failed request records nothing" (src/idempotency.rs): a merchant
    // that fixes a typo retries with the same key and gets its token.
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let send = |source: Value| {
        s.req(Method::POST, TOKENS)
            .header("x-idempotency-key", "checkout-42")
            .json(&json!({ "source": source }))
            .send()
    };
    let typo = json!({"type": "pan", "number": "4111111111111112", "expiry_month": 12, "expiry_year": 2031});
    assert_error(send(typo.clone()).await.unwrap(), 422, "invalid_card").await;
    let fixed = send(pan_source(VISA)).await.unwrap();
    assert_eq!(fixed.status(), 201);
    let fixed: Value = fixed.json().await.unwrap();
    // Now the key is bound to the successful request.
    let replay: Value = send(pan_source(VISA)).await.unwrap().json().await.unwrap();
    assert_eq!(replay["id"], fixed["id"]);
    assert_error(send(typo).await.unwrap(), 422, "idempotency_key_reused").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_idempotency_key_share_one_token() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let url = s.url(TOKENS);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let http = s.http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .header("x-api-key", KEY)
                .header("x-idempotency-key", "burst")
                .json(&json!({"source": pan_source(DISCOVER)}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    s.stop().await;
}

#[tokio::test]
async fn idempotent_cryptogram_request_replays_the_same_reference() {
    let s = TestServer::start(config(ComplianceLevel::SaqA)).await;
    let id = seed_token(&s, VISA, Brand::Visa).await;
    let send = |amount: &'static str| {
        s.req(Method::POST, &cryptograms_path(&id))
            .header("x-idempotency-key", "pay-1")
            .json(&json!({"type": "ecom", "amount": amount}))
            .send()
    };
    let a = send("10.00").await.unwrap();
    assert_eq!(a.status(), 201);
    let a: Value = a.json().await.unwrap();
    let b = send("10.00").await.unwrap();
    assert_eq!(b.status(), 201);
    let b: Value = b.json().await.unwrap();
    assert_eq!(a, b);
    assert_error(send("11.00").await.unwrap(), 422, "idempotency_key_reused").await;
    s.stop().await;
}

// ---------------------------------------------------------------------------
// GET / DELETE

#[tokio::test]
async fn unknown_or_malformed_token_id_is_token_not_found() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    for id in [unknown.as_str(), "not-a-uuid", "4111111111111111"] {
        assert_error(get_token(&s, id).await, 404, "token_not_found").await;
        let r = s
            .req(Method::DELETE, &format!("{TOKENS}/{id}"))
            .send()
            .await
            .unwrap();
        assert_error(r, 404, "token_not_found").await;
        let r = cryptogram(&s, id, json!({"type": "ecom"})).await;
        assert_error(r, 404, "token_not_found").await;
    }
    s.stop().await;
}

#[tokio::test]
async fn a_malformed_id_is_not_found_on_every_route_after_the_scope_check() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    for id in ["not-a-uuid", "4111111111111111"] {
        let network = format!("{TOKENS}/{id}");
        let pci = format!("/api/pci/tokens/{id}");
        // No route is configured: the id is judged before the route name.
        for (method, path, classifier) in [
            (Method::POST, format!("{network}/events"), "token_not_found"),
            (
                Method::POST,
                format!("{network}/forward"),
                "token_not_found",
            ),
            (Method::GET, format!("{network}/forward"), "token_not_found"),
            (
                Method::POST,
                format!("{network}/forward/no-such-route"),
                "token_not_found",
            ),
            (Method::GET, pci.clone(), "pci_token_not_found"),
            (Method::DELETE, pci.clone(), "pci_token_not_found"),
            (
                Method::POST,
                format!("{pci}/forward"),
                "pci_token_not_found",
            ),
            (
                Method::POST,
                format!("{pci}/forward/no-such-route"),
                "pci_token_not_found",
            ),
        ] {
            let r = s.req(method.clone(), &path).send().await.unwrap();
            let body = assert_error(r, 404, classifier).await;
            assert!(!body.to_string().contains(id), "{method} {path}: {body}");
        }
        // A key without the route's scope learns nothing about the id.
        for path in [
            format!("{network}/cryptograms"),
            format!("{network}/events"),
            format!("{network}/forward"),
            format!("{network}/forward/no-such-route"),
            format!("{pci}/forward"),
        ] {
            let r = s
                .http
                .post(s.url(&path))
                .header("x-api-key", TOKENS_ONLY_KEY)
                .send()
                .await
                .unwrap();
            assert_error(r, 403, "forbidden").await;
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn deleting_a_token_marks_it_deleted_and_kills_its_references() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let other = s.provision(MASTERCARD).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = s.reference(&id).await;
    let other_ref = s.reference(&other).await;
    let (tid, oid) = (
        TokenId::parse(&id).unwrap(),
        TokenId::parse(&other).unwrap(),
    );
    let rid = ReferenceId::parse(&before).unwrap();
    assert!(s.state.references.peek(&rid, tid).await.is_ok());

    let r = s
        .req(Method::DELETE, &format!("{TOKENS}/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.bytes().await.unwrap().is_empty());

    let r = get_token(&s, &id).await;
    assert_eq!(r.status(), 200);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["status"], "deleted");
    assert_eq!(t["id"], id.as_str());

    // The reference taken before the delete is dead; the other token's lives.
    assert!(matches!(
        s.state.references.peek(&rid, tid).await,
        Err(TakeFailure::Refused(TakeError::NotFound))
    ));
    assert!(s
        .state
        .references
        .peek(&ReferenceId::parse(&other_ref).unwrap(), oid)
        .await
        .is_ok());

    // No new cryptograms for a deleted token, in either mode.
    for mode in ["reference", "inline"] {
        let r = cryptogram(&s, &id, json!({"type": "ecom", "mode": mode})).await;
        let body = assert_error(r, 424, "token_not_active").await;
        assert!(
            body["message"].as_str().unwrap().contains("deleted"),
            "{body}"
        );
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------
// §5 Cryptograms

#[tokio::test]
async fn inline_visa_ecom_cryptogram_carries_a_verifiable_tavv_and_the_tpan() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let token = s.provision(VISA).await;
    let id = token["id"].as_str().unwrap();
    let c = inline(
        &s,
        id,
        json!({"type": "ecom", "mode": "inline", "amount": "10.00", "currency": "EUR",
               "metadata": {"cart": "c-9"}}),
    )
    .await;
    let expected: BTreeSet<&str> = [
        "cryptogram",
        "dynamic_cvv",
        "type",
        "eci",
        "expiry_month",
        "expiry_year",
        "number",
        "metadata",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys(&c), expected, "{c}");
    let cryptogram = c["cryptogram"].as_str().unwrap();
    assert_eq!(cryptogram.len(), 28, "{cryptogram}");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(cryptogram)
        .unwrap();
    assert_eq!(raw.len(), 20);
    assert!(c["dynamic_cvv"].is_null());
    assert_eq!(c["type"], "tavv");
    assert_eq!(c["eci"], "07");
    let number = c["number"].as_str().unwrap();
    assert_eq!(number.len(), 16, "{number}");
    assert!(luhn_valid(number), "{number}");
    assert!(number.starts_with('4'), "visa range: {number}");
    assert_ne!(number, VISA);
    assert_eq!(c["expiry_month"], token["expiry_month"]);
    assert_eq!(c["expiry_year"], token["expiry_year"]);
    assert_eq!(c["metadata"], json!({"cart": "c-9"}));
    // The sandbox acquirer can verify it for this TPAN and amount.
    let tsp = SandboxTsp::new(DEFAULT_SANDBOX_KEY);
    assert!(tsp.verify_tavv(number, Some("10.00"), cryptogram).is_some());
    assert!(tsp.verify_tavv(number, Some("10.01"), cryptogram).is_none());

    // Each request mints a fresh cryptogram for the same TPAN.
    let again = inline(&s, id, json!({"type": "ecom", "amount": "10.00"})).await;
    assert_eq!(again["number"], number);
    assert_ne!(again["cryptogram"], cryptogram);
    assert_eq!(again["metadata"], json!({}));
    s.stop().await;
}

#[tokio::test]
async fn dynamic_cvv_is_visa_only() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let visa = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let c = inline(
        &s,
        &visa,
        json!({"type": "ecom", "mode": "inline", "cryptogram_type": "dynamic_cvv"}),
    )
    .await;
    let cvv = c["dynamic_cvv"].as_str().unwrap();
    assert_eq!(cvv.len(), 3, "{cvv}");
    assert!(cvv.bytes().all(|b| b.is_ascii_digit()), "{cvv}");
    assert!(c["cryptogram"].is_null(), "{c}");
    assert_eq!(c["type"], "dynamic_cvv");

    let mc = s.provision(MASTERCARD).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = cryptogram(
        &s,
        &mc,
        json!({"type": "ecom", "mode": "inline", "cryptogram_type": "dynamic_cvv"}),
    )
    .await;
    let body = assert_error(r, 422, "invalid_cryptogram_request").await;
    assert!(
        body["message"].as_str().unwrap().contains("dynamic_cvv"),
        "{body}"
    );
    s.stop().await;
}

#[tokio::test]
async fn amex_cryptograms_need_an_amount() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let id = s.provision(AMEX).await["id"].as_str().unwrap().to_owned();
    for mode in ["inline", "reference"] {
        let r = cryptogram(&s, &id, json!({"type": "ecom", "mode": mode})).await;
        let body = assert_error(r, 422, "invalid_cryptogram_request").await;
        assert!(
            body["message"].as_str().unwrap().contains("amount"),
            "{body}"
        );
    }
    let c = inline(
        &s,
        &id,
        json!({"type": "ecom", "mode": "inline", "amount": "25.50"}),
    )
    .await;
    let number = c["number"].as_str().unwrap();
    assert_eq!(number.len(), 15, "{number}");
    assert!(luhn_valid(number) && number.starts_with('3'), "{number}");
    assert_eq!(c["cryptogram"].as_str().unwrap().len(), 28);
    let r = cryptogram(
        &s,
        &id,
        json!({"type": "ecom", "mode": "reference", "amount": 25.5}),
    )
    .await;
    assert_eq!(r.status(), 201);
    s.stop().await;
}

#[tokio::test]
async fn mastercard_eci_by_type() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let id = s.provision(MASTERCARD).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let c = inline(&s, &id, json!({"type": "ecom"})).await;
    assert_eq!(c["eci"], "06");
    assert_eq!(c["cryptogram"].as_str().unwrap().len(), 28);
    let number = c["number"].as_str().unwrap();
    assert!(number.starts_with('5') && luhn_valid(number), "{number}");

    let activated = s
        .provision_with(json!({"source": pan_source(MASTERCARD), "dauth_activated": true}))
        .await;
    let c = inline(
        &s,
        activated["id"].as_str().unwrap(),
        json!({"type": "dauth"}),
    )
    .await;
    assert_eq!(c["eci"], "02");
    s.stop().await;
}

#[tokio::test]
async fn dauth_needs_delegated_authentication_activation() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let plain = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    for mode in ["inline", "reference"] {
        let r = cryptogram(&s, &plain, json!({"type": "dauth", "mode": mode})).await;
        assert_error(r, 422, "dauth_not_activated").await;
    }
    // An ecom cryptogram on the same token is fine.
    assert_eq!(
        inline(&s, &plain, json!({"type": "ecom"})).await["eci"],
        "07"
    );

    let activated = s
        .provision_with(json!({"source": pan_source(VISA), "dauth_activated": true}))
        .await;
    let id = activated["id"].as_str().unwrap();
    let c = inline(&s, id, json!({"type": "dauth", "mode": "inline"})).await;
    assert_eq!(c["eci"], "05");
    assert_eq!(c["type"], "tavv");
    assert_eq!(c["cryptogram"].as_str().unwrap().len(), 28);
    let r = cryptogram(&s, id, json!({"type": "dauth", "mode": "reference"})).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["eci"], "05");
    s.stop().await;
}

#[tokio::test]
async fn malformed_cryptogram_requests_are_refused() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    for body in [
        json!({"type": "moto"}),
        json!({"type": 1}),
        json!({}),
        json!({"type": "ecom", "mode": "later"}),
        json!({"type": "ecom", "cryptogram_type": "cvv2"}),
        json!({"type": "ecom", "amount": "-1"}),
        json!({"type": "ecom", "currency": "EURO"}),
    ] {
        let r = cryptogram(&s, &id, body.clone()).await;
        let err = assert_error(r, 422, "invalid_cryptogram_request").await;
        assert!(!err["message"].as_str().unwrap().is_empty(), "{body}");
    }
    let r = s
        .req(Method::POST, &cryptograms_path(&id))
        .body("type=ecom")
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request").await;
    s.stop().await;
}

#[tokio::test]
async fn reference_response_holds_no_secret_and_expires_after_the_ttl() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let tpan = tpan_of(&s, &id).await;
    let ttl = s.state.config.reference_ttl;
    assert_eq!(ttl, Duration::from_secs(15 * 60), "contract default");

    let before = OffsetDateTime::now_utc();
    let r = cryptogram(
        &s,
        &id,
        json!({"type": "ecom", "mode": "reference", "amount": "10.00", "metadata": {"cart": "c-1"}}),
    )
    .await;
    let after = OffsetDateTime::now_utc();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["content-type"], "application/json");
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let expected: BTreeSet<&str> = [
        "cryptogram_reference",
        "expires_at",
        "type",
        "eci",
        "metadata",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys(&v), expected, "{v}");
    let reference = v["cryptogram_reference"].as_str().unwrap();
    let opaque = reference.strip_prefix("cref_").unwrap();
    assert!(opaque.len() >= 43, "{reference}");
    assert!(
        opaque
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{reference}"
    );
    let expires = rfc3339(&v["expires_at"]);
    let slack = time::Duration::seconds(1);
    assert!(
        expires >= before + ttl - slack && expires <= after + ttl + slack,
        "expires_at {expires} not ~{ttl:?} after {before}"
    );
    assert_eq!(v["type"], "tavv");
    assert_eq!(v["eci"], "07");
    assert_eq!(v["metadata"], json!({"cart": "c-1"}));
    assert!(!text.contains(&tpan), "TPAN in {text}");
    assert!(!text.contains(VISA), "PAN in {text}");
    assert!(long_digit_runs(&text).is_empty(), "{text}");

    // The reference stands for that token and can be redeemed.
    let stored = s
        .state
        .references
        .peek(
            &ReferenceId::parse(reference).unwrap(),
            TokenId::parse(&id).unwrap(),
        )
        .await
        .unwrap();
    assert!(stored.payload.cryptogram.is_some());
    assert!(!text.contains(stored.payload.cryptogram.as_ref().unwrap().expose()));

    // Every reference is new.
    let second = s.reference(&id).await;
    assert_ne!(second, reference);
    s.stop().await;
}

#[tokio::test]
async fn reference_ttl_comes_from_the_config() {
    let mut c = config(ComplianceLevel::SaqA);
    c.reference_ttl = Duration::from_secs(1);
    let s = TestServer::start(c).await;
    let id = seed_token(&s, VISA, Brand::Visa).await;
    let before = OffsetDateTime::now_utc();
    let r = cryptogram(&s, &id, json!({"type": "ecom"})).await;
    let after = OffsetDateTime::now_utc();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert!(v["cryptogram_reference"]
        .as_str()
        .unwrap()
        .starts_with("cref_"));
    let expires = rfc3339(&v["expires_at"]);
    let one = time::Duration::seconds(1);
    // Sub-second slack for RFC 3339 rounding only.
    let slack = time::Duration::milliseconds(500);
    assert!(
        expires >= before + one - slack && expires <= after + one + slack,
        "expires_at {expires} not ~1s after {before}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_full_reference_store_refuses_and_keeps_what_it_issued() {
    let mut c = config(ComplianceLevel::SaqD);
    c.reference_max_entries = 2;
    let s = TestServer::start(c).await;
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let first = s.reference(&id).await;
    let second = s.reference(&id).await;
    let r = cryptogram(&s, &id, json!({"type": "ecom", "mode": "reference"})).await;
    assert_error(r, 503, "reference_store_full").await;

    let token_id = TokenId::parse(&id).unwrap();
    for reference in [&first, &second] {
        let got = s
            .state
            .references
            .peek(&ReferenceId::parse(reference).unwrap(), token_id)
            .await;
        assert!(
            got.is_ok_and(|r| r.token_id == token_id),
            "{reference} lost"
        );
    }
    // Inline cryptograms need no reference slot.
    assert_eq!(
        cryptogram(&s, &id, json!({"type": "ecom", "mode": "inline"}))
            .await
            .status(),
        200
    );
    // Deleting the token frees its slots.
    let r = s
        .req(Method::DELETE, &format!("{TOKENS}/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let other = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    s.reference(&other).await;
    s.stop().await;
}

// ---------------------------------------------------------------------------
// The binary's config commands

const BIN: &str = env!("CARGO_BIN_EXE_tokenrelay");
const SHIPPED_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tokenrelay.toml");

#[test]
fn check_config_accepts_the_shipped_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config", SHIPPED_CONFIG])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_names_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenrelay.toml");
    let shipped = std::fs::read_to_string(SHIPPED_CONFIG).unwrap();
    std::fs::write(&path, format!("reference_tll = \"5m\"\n{shipped}")).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reference_tll"), "{stderr}");
}

#[test]
fn hash_key_prints_the_hash_in_the_shipped_config() {
    use std::io::Write;
    let shipped = std::fs::read_to_string(SHIPPED_CONFIG).unwrap();
    let expected = shipped
        .lines()
        .find_map(|l| l.trim().strip_prefix("hash = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap();
    let mut child = std::process::Command::new(BIN)
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"dev-key-change-me\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), expected);
}

/// Provisions with one key across `idempotency_ttl` on the server's clock:
/// a millisecond before it the key replays the first token (and refuses
/// another body); at it the key makes a new token. `vault` picks the
/// backend the record lives in.
async fn a_provision_key_past_its_ttl_makes_a_new_token(vault: tokenrelay::config::VaultConfig) {
    let clock = tokenrelay::clock::ManualClock::starting_now();
    let mut c = config(ComplianceLevel::SaqD);
    c.vault = vault;
    let ttl = time::Duration::try_from(c.idempotency_ttl).unwrap();
    assert_eq!(ttl, time::Duration::hours(24), "the default TTL");
    let s = TestServer::start_with_clock(c, clock.clone()).await;
    let send = |pan: &str| {
        s.req(Method::POST, TOKENS)
            .header("x-idempotency-key", "provision-ttl")
            .json(&json!({ "source": pan_source(pan) }))
            .send()
    };
    let created = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()
    };
    let first = created(send(VISA).await.unwrap()).await;
    let ms = time::Duration::milliseconds(1);

    clock.advance(ttl - ms);
    let replay = created(send(VISA).await.unwrap()).await;
    assert_eq!(replay["id"], first["id"], "replayed until the TTL");
    let body = assert_error(
        send(MASTERCARD).await.unwrap(),
        422,
        "idempotency_key_reused",
    )
    .await;
    assert!(!body.to_string().contains(MASTERCARD));

    clock.advance(ms);
    let fresh = created(send(VISA).await.unwrap()).await;
    assert_ne!(fresh["id"], first["id"], "at the TTL the key is free again");
    let again = created(send(VISA).await.unwrap()).await;
    assert_eq!(again["id"], fresh["id"], "and now stands for the new token");
    assert_error(
        send(MASTERCARD).await.unwrap(),
        422,
        "idempotency_key_reused",
    )
    .await;
    s.stop().await;
}

fn vault_config(
    backend: tokenrelay::config::VaultBackend,
    dir: &std::path::Path,
) -> tokenrelay::config::VaultConfig {
    tokenrelay::config::VaultConfig {
        backend,
        key_file: Some(dir.join("master.key")),
        create_key_file: true,
        cache_ttl: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn a_provision_key_past_its_ttl_makes_a_new_token_on_memory() {
    let dir = tempfile::tempdir().unwrap();
    let vault = vault_config(tokenrelay::config::VaultBackend::Memory, dir.path());
    a_provision_key_past_its_ttl_makes_a_new_token(vault).await;
}

#[tokio::test]
async fn a_provision_key_past_its_ttl_makes_a_new_token_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let backend = tokenrelay::config::VaultBackend::Sqlite {
        path: dir.path().join("vault.db"),
    };
    a_provision_key_past_its_ttl_makes_a_new_token(vault_config(backend, dir.path())).await;
}

/// Runs when `TOKENRELAY_TEST_POSTGRES_URL` is set (in a fresh schema,
/// dropped after); set but unreachable is a failure, not a skip.
#[tokio::test]
async fn a_provision_key_past_its_ttl_makes_a_new_token_on_postgres() {
    let test = "a_provision_key_past_its_ttl_makes_a_new_token_on_postgres";
    let Some(db) = PgSchema::create(test).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let backend = tokenrelay::config::VaultBackend::Postgres {
        url: db.url.clone(),
        password_file: None,
    };
    a_provision_key_past_its_ttl_makes_a_new_token(vault_config(backend, dir.path())).await;
}
