#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The compatible surfaces (contract §12) through the real server: VGS CMP
//! `/cards/{card_id}/network-tokens` and `/cryptogram` (seed 003) and J.P.
//! Morgan `POST /cryptograms` (seed 001). Every answer is validated against
//! the JSON Schemas in `openapi/schemas/`, written from the seeds' facts.

mod support;

use reqwest::{Method, Response};
use serde_json::{json, Value};
use support::*;
use tokenrelay::card::{Brand, CardNumber};
use tokenrelay::config::{ComplianceLevel, Config, DestScheme, DestinationRule, HostPattern};
use tokenrelay::sandbox_acquirer::{generate_pki, SandboxAcquirer};
use tokenrelay::tsp::sandbox::DEFAULT_SANDBOX_KEY;
use tokenrelay::vault::{Metadata, PciToken};

const VND: &str = "application/vnd.api+json";

/// Validates `instance` against `tests/schemas/<name>.json`, formats on.
fn conforms(name: &str, instance: &Value) {
    let path = format!("{}/openapi/schemas/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let v = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{name}: schema does not compile: {e}"));
    let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{name}: {errors:?}\n{}",
        serde_json::to_string_pretty(instance).unwrap()
    );
}

/// A card (PCI token) through the native API (SAQ-D / ROC).
async fn card(s: &TestServer, pan: &str) -> String {
    let r = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&json!({"number": pan, "expiry_month": 12, "expiry_year": 2031}))
        .send()
        .await
        .unwrap();
    assert!(r.status() == 201 || r.status() == 200, "{}", r.status());
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A card placed in the vault through the library: at SAQ-A the merchant
/// cannot send a PAN (cards arrive through browser sessions, §11).
async fn seed_card(s: &TestServer, pan: &str, brand: Brand) -> String {
    let number = CardNumber::parse(pan).unwrap();
    let (card, _) = s
        .state
        .tokens
        .insert_pci(PciToken {
            id: uuid::Uuid::new_v4(),
            fingerprint: s.state.tokens.fingerprint(&number),
            pan: number,
            scheme: brand,
            expiry_month: 12,
            expiry_year: 2031,
            cardholder_name: None,
            metadata: Metadata::new(),
            created_at: time::OffsetDateTime::now_utc(),
        })
        .await
        .unwrap();
    card.id.to_string()
}

/// A VGS call with the key as `Authorization: Bearer`, as VGS clients send it.
fn vgs(s: &TestServer, method: Method, path: &str, key: &str) -> reqwest::RequestBuilder {
    s.http
        .request(method, s.url(path))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", VND)
}

async fn vgs_ok(r: Response, status: u16, schema: &str) -> Value {
    assert_eq!(r.status().as_u16(), status);
    assert_eq!(r.headers()["content-type"], VND);
    assert!(r.headers().get("x-relay-error").is_none());
    let v: Value = r.json().await.unwrap();
    conforms(schema, &v);
    v
}

/// A VGS error: status, `x-relay-error`, the seed's error shape with the
/// native classifier as `error_code`, and the field's path where named.
async fn vgs_error(r: Response, status: u16, classifier: &str, path: Option<&str>) -> Value {
    assert_eq!(r.status().as_u16(), status, "status for {classifier}");
    assert_eq!(r.headers()["x-relay-error"], classifier);
    assert_eq!(r.headers()["content-type"], VND);
    let v: Value = r.json().await.unwrap();
    conforms("vgs_error_response", &v);
    assert_eq!(v["errors"][0]["error_code"], classifier, "{v}");
    assert_eq!(v["errors"][0]["path"].as_str(), path, "{v}");
    v
}

async fn provision(s: &TestServer, card: &str) -> Value {
    let r = vgs(
        s,
        Method::POST,
        &format!("/cards/{card}/network-tokens"),
        KEY,
    )
    .send()
    .await
    .unwrap();
    vgs_ok(r, 201, "vgs_network_token_response").await
}

async fn fetch(s: &TestServer, card: &str, attributes: Value) -> Response {
    let body = json!({"data": {"attributes": attributes}});
    conforms("vgs_crypto_fetch_request", &body);
    vgs(s, Method::POST, &format!("/cards/{card}/cryptogram"), KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn vgs_provision_is_201_then_200_with_the_same_token_and_par() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let card = card(&s, VISA).await;
    let first = provision(&s, &card).await;
    let d = &first["data"];
    assert_eq!(d["type"], "network_tokens");
    let a = &d["attributes"];
    let number = a["network_token"].as_str().unwrap();
    // SAQ-D may hold the token number: whole, Luhn-valid, Visa range.
    assert_eq!(number.len(), 16);
    assert!(tokenrelay::card::luhn_valid(number));
    assert_eq!(&number[..6], a["bin"].as_str().unwrap());
    assert_eq!(&number[12..], a["last4"].as_str().unwrap());
    assert_ne!(number, VISA);
    assert!(a["exp_year"].as_u64().unwrap() < 100);
    assert_eq!(a["state"], "ACTIVE");
    let par = a["payment_account_reference"].as_str().unwrap().to_owned();
    assert_eq!(par.len(), 29);
    assert!(d["meta"]["card_art"]["assets"][0]["download_url"]
        .as_str()
        .unwrap()
        .starts_with("data:image/svg+xml;base64,"));

    // Skipped when an active token exists: 200, the same token.
    let r = vgs(
        &s,
        Method::POST,
        &format!("/cards/{card}/network-tokens"),
        KEY,
    )
    .send()
    .await
    .unwrap();
    let again = vgs_ok(r, 200, "vgs_network_token_response").await;
    assert_eq!(again["data"]["id"], d["id"]);

    // The token is the native API's token, made for this card.
    let id = d["id"].as_str().unwrap();
    let native: Value = s
        .req(Method::GET, &format!("/api/network/tokens/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(native["pci_token_id"], card.as_str());
    assert_eq!(native["status"], "active");

    // After a delete a new token is provisioned; the PAR stays the card's.
    let r = vgs(
        &s,
        Method::DELETE,
        &format!("/cards/{card}/network-tokens"),
        KEY,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    let next = provision(&s, &card).await;
    assert_ne!(next["data"]["id"], d["id"]);
    assert_eq!(next["data"]["attributes"]["payment_account_reference"], par);

    // Another card, another PAR.
    let other = card_for(&s, MASTERCARD).await;
    let o = provision(&s, &other).await;
    assert_ne!(o["data"]["attributes"]["payment_account_reference"], par);
}

async fn card_for(s: &TestServer, pan: &str) -> String {
    card(s, pan).await
}

#[tokio::test]
async fn vgs_concurrent_provisions_of_one_card_make_one_token() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let card = card(&s, VISA).await;
    let calls = (0..8).map(|_| {
        vgs(
            &s,
            Method::POST,
            &format!("/cards/{card}/network-tokens"),
            KEY,
        )
        .send()
    });
    let mut ids = Vec::new();
    let mut created = 0;
    for r in futures_util::future::join_all(calls).await {
        let r = r.unwrap();
        let status = r.status().as_u16();
        created += usize::from(status == 201);
        let v = vgs_ok(r, status, "vgs_network_token_response").await;
        ids.push(v["data"]["id"].clone());
    }
    assert_eq!(created, 1, "exactly one request provisions");
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
}

#[tokio::test]
async fn vgs_delete_deletes_the_token_on_the_native_api_too() {
    let sb = sandbox().await;
    let s = TestServer::start(sb.config(ComplianceLevel::SaqA)).await;
    let card = seed_card(&s, VISA, Brand::Visa).await;
    let id = provision(&s, &card).await["data"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let reference = s.reference(&id).await;

    let r = vgs(
        &s,
        Method::DELETE,
        &format!("/cards/{card}/network-tokens"),
        KEY,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers().get("x-relay-error").is_none());

    let native: Value = s
        .req(Method::GET, &format!("/api/network/tokens/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(native["status"], "deleted");
    // It can no longer pay: the forward refuses it as on a native delete.
    let r = s
        .forward(&id, &reference, &sb.url())
        .body(payment("10.00"))
        .send()
        .await
        .unwrap();
    assert_error(r, 424, "token_not_active").await;

    // None left: 404; a cryptogram: 424 (not active).
    let r = vgs(
        &s,
        Method::DELETE,
        &format!("/cards/{card}/network-tokens"),
        KEY,
    )
    .send()
    .await
    .unwrap();
    vgs_error(r, 404, "token_not_found", None).await;
    let r = fetch(&s, &card, json!({})).await;
    vgs_error(r, 424, "token_not_active", None).await;
}

#[tokio::test]
async fn vgs_cryptograms_inline_at_saq_d_with_the_brand_rules() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let visa = card(&s, VISA).await;
    provision(&s, &visa).await;

    // No body at all: the defaults (ECOM, TAVV, USD).
    let r = vgs(&s, Method::POST, &format!("/cards/{visa}/cryptogram"), KEY)
        .send()
        .await
        .unwrap();
    let v = vgs_ok(r, 200, "vgs_cryptogram_response").await;
    let c = &v["data"]["attributes"]["cryptogram"];
    assert_eq!(c["type"], "TAVV");
    assert_eq!(c["value"].as_str().unwrap().len(), 28);
    assert_eq!(c["eci"], "07");
    assert_eq!(
        v["data"]["attributes"]["network_token"]
            .as_str()
            .unwrap()
            .len(),
        16
    );

    let r = fetch(
        &s,
        &visa,
        json!({"amount": 10.5, "currency_code": "EUR", "transaction_type": "AFT", "cryptogram_type": "DTVV"}),
    )
    .await;
    let v = vgs_ok(r, 200, "vgs_cryptogram_response").await;
    let c = &v["data"]["attributes"]["cryptogram"];
    assert_eq!(c["type"], "DTVV");
    let dtvv = c["value"].as_str().unwrap();
    assert!(dtvv.len() == 3 && dtvv.bytes().all(|b| b.is_ascii_digit()));

    // DTVV and AFT are Visa only (422); Amex needs an amount (422).
    let mc = card(&s, MASTERCARD).await;
    provision(&s, &mc).await;
    let r = fetch(&s, &mc, json!({"cryptogram_type": "DTVV"})).await;
    vgs_error(
        r,
        422,
        "invalid_cryptogram_request",
        Some("data.attributes.cryptogram_type"),
    )
    .await;
    let r = fetch(&s, &mc, json!({"transaction_type": "AFT"})).await;
    vgs_error(
        r,
        422,
        "invalid_cryptogram_request",
        Some("data.attributes.transaction_type"),
    )
    .await;
    let r = fetch(&s, &mc, json!({"transaction_type": "ECOM"})).await;
    let v = vgs_ok(r, 200, "vgs_cryptogram_response").await;
    assert_eq!(v["data"]["attributes"]["cryptogram"]["eci"], "06");

    let amex = card(&s, AMEX).await;
    provision(&s, &amex).await;
    let r = fetch(&s, &amex, json!({})).await;
    vgs_error(
        r,
        422,
        "invalid_cryptogram_request",
        Some("data.attributes.amount"),
    )
    .await;
    let r = fetch(&s, &amex, json!({"amount": 25})).await;
    let v = vgs_ok(r, 200, "vgs_cryptogram_response").await;
    assert_eq!(
        v["data"]["attributes"]["network_token"]
            .as_str()
            .unwrap()
            .len(),
        15
    );
}

#[tokio::test]
async fn vgs_errors_in_the_seed_shape_with_native_classifiers() {
    let mut c = config(ComplianceLevel::SaqD);
    c.max_body_bytes = 1024;
    let s = TestServer::start(c).await;
    let card = card(&s, VISA).await;
    let nt = format!("/cards/{card}/network-tokens");
    let crypto = format!("/cards/{card}/cryptogram");

    // 401: no key, an unknown Bearer key; `Authorization: Basic` is no key.
    for auth in [None, Some("Bearer nope"), Some("Basic dGVzdDp0ZXN0")] {
        let mut r = s.http.post(s.url(&nt));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        vgs_error(r.send().await.unwrap(), 401, "unauthorized", None).await;
    }
    // x-api-key works as on the native API.
    let r = s
        .http
        .post(s.url(&nt))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    vgs_ok(r, 201, "vgs_network_token_response").await;
    // 403: the same scopes as the native API.
    let r = vgs(&s, Method::POST, &crypto, TOKENS_ONLY_KEY)
        .send()
        .await
        .unwrap();
    vgs_error(r, 403, "forbidden", None).await;
    // The scope comes before the card: a malformed one is still 403.
    let r = vgs(
        &s,
        Method::POST,
        "/cards/not-a-card/cryptogram",
        TOKENS_ONLY_KEY,
    )
    .send()
    .await
    .unwrap();
    vgs_error(r, 403, "forbidden", None).await;
    // 404: an unknown or malformed card, on every operation.
    for path in [
        "/cards/6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11/network-tokens",
        "/cards/not-a-card/network-tokens",
    ] {
        for m in [Method::POST, Method::DELETE] {
            let r = vgs(&s, m, path, KEY).send().await.unwrap();
            vgs_error(r, 404, "pci_token_not_found", None).await;
        }
    }
    for card in ["6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11", "not-a-card"] {
        let r = fetch(&s, card, json!({})).await;
        vgs_error(r, 404, "pci_token_not_found", None).await;
    }
    // 400: what CryptoFetchRequest does not allow.
    for (body, path) in [
        (
            json!({"data": {"attributes": {"cryptogram_type": "CVV"}}}),
            Some("data.attributes.cryptogram_type"),
        ),
        (
            json!({"data": {"attributes": {"amount": "10"}}}),
            Some("data.attributes.amount"),
        ),
        (
            json!({"data": {"attributes": {"amount": 1.001}}}),
            Some("data.attributes.amount"),
        ),
        (
            json!({"data": {"attributes": {"currency_code": "EURO"}}}),
            Some("data.attributes.currency_code"),
        ),
        (json!({"data": {}}), Some("data.attributes")),
        (json!({"data": {"attributes": {}}, "extra": 1}), None),
    ] {
        let r = vgs(&s, Method::POST, &crypto, KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        vgs_error(r, 400, "invalid_request", path).await;
    }
    let r = vgs(&s, Method::POST, &crypto, KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    vgs_error(r, 400, "invalid_request", None).await;
    let r = vgs(&s, Method::POST, &crypto, KEY)
        .body(vec![b' '; 2048])
        .send()
        .await
        .unwrap();
    vgs_error(r, 413, "body_too_large", None).await;
    // 405 for a method the route does not have; 404 for no route.
    let r = vgs(&s, Method::GET, &nt, KEY).send().await.unwrap();
    vgs_error(r, 405, "method_not_allowed", None).await;
    let r = vgs(&s, Method::POST, &format!("/cards/{card}/other"), KEY)
        .send()
        .await
        .unwrap();
    vgs_error(r, 404, "not_found", None).await;

    // 424: a card whose token is suspended, or that has none.
    let other = card_for(&s, MASTERCARD).await;
    let r = fetch(&s, &other, json!({})).await;
    vgs_error(r, 424, "token_not_active", None).await;
    let id = provision(&s, &other).await["data"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = s
        .req(Method::POST, &format!("/api/network/tokens/{id}/events"))
        .json(&json!({"event": "suspend"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = fetch(&s, &other, json!({})).await;
    vgs_error(r, 424, "token_not_active", None).await;
}

#[tokio::test]
async fn vgs_expired_card_is_a_bad_request() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let number = CardNumber::parse(VISA).unwrap();
    let (expired, _) = s
        .state
        .tokens
        .insert_pci(PciToken {
            id: uuid::Uuid::new_v4(),
            fingerprint: s.state.tokens.fingerprint(&number),
            pan: number,
            scheme: Brand::Visa,
            expiry_month: 1,
            expiry_year: 2020,
            cardholder_name: None,
            metadata: Metadata::new(),
            created_at: time::OffsetDateTime::now_utc(),
        })
        .await
        .unwrap();
    let r = vgs(
        &s,
        Method::POST,
        &format!("/cards/{}/network-tokens", expired.id),
        KEY,
    )
    .send()
    .await
    .unwrap();
    vgs_error(r, 400, "invalid_card", None).await;
}

struct Sandbox {
    acq: SandboxAcquirer,
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
}

/// The payment the merchant writes, placeholders for what it never sees.
fn payment(amount: &str) -> String {
    format!(
        r#"{{"amount": "{amount}", "currency": "EUR", "card": {{"number": "<< number >>", "expiry_month": << expiry_month | unwrap >>, "expiry_year": << expiry_year | unwrap >>, "cryptogram": "<< cryptogram >>", "eci": "<< eci >>"}}}}"#
    )
}

async fn pay(s: &TestServer, sb: &Sandbox, token: &str, reference: &str, amount: &str) -> Value {
    let r = s
        .forward(token, reference, &sb.url())
        .header("content-type", "application/json")
        .body(payment(amount))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn vgs_at_saq_a_a_reference_in_the_cryptogram_pays_through_the_forward() {
    let sb = sandbox().await;
    let s = TestServer::start(sb.config(ComplianceLevel::SaqA)).await;
    let card = seed_card(&s, VISA, Brand::Visa).await;
    let p = provision(&s, &card).await;
    let token = p["data"]["id"].as_str().unwrap().to_owned();
    // The token number is masked: first six, `*`s, last four, same length.
    let masked = p["data"]["attributes"]["network_token"].as_str().unwrap();
    assert_eq!(masked.len(), 16);
    assert_eq!(&masked[6..12], "******");
    assert_eq!(
        &masked[..6],
        p["data"]["attributes"]["bin"].as_str().unwrap()
    );

    let r = fetch(&s, &card, json!({"amount": 10, "currency_code": "EUR"})).await;
    let v = vgs_ok(r, 200, "vgs_cryptogram_response").await;
    let c = &v["data"]["attributes"]["cryptogram"];
    let reference = c["value"].as_str().unwrap();
    assert!(reference.starts_with("cref_"), "{reference}");
    assert_eq!(c["eci"], "07");
    assert_eq!(v["data"]["attributes"]["network_token"], masked);

    // The sandbox acquirer verifies the TAVV the reference stood for.
    let answer = pay(&s, &sb, &token, reference, "10.00").await;
    assert_eq!(answer["status"], "approved", "{answer}");
    // Single use, as on the native API.
    let r = s
        .forward(&token, reference, &sb.url())
        .body(payment("10.00"))
        .send()
        .await
        .unwrap();
    assert_error(r, 409, "reference_already_used").await;
}

#[tokio::test]
async fn surfaces_switched_off_are_not_routed() {
    let mut c = config(ComplianceLevel::SaqD);
    c.surfaces.vgs_cmp = false;
    let s = TestServer::start(c).await;
    let r = vgs(&s, Method::POST, "/cards/x/network-tokens", KEY)
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not_found").await;
    let r = jpmc(&s, &json!({})).send().await.unwrap();
    assert_eq!(r.status(), 400, "jpmc stays on");

    let mut c = config(ComplianceLevel::SaqD);
    c.surfaces.jpmc = false;
    let s = TestServer::start(c).await;
    let r = jpmc(&s, &json!({})).send().await.unwrap();
    assert_error(r, 404, "not_found").await;
}

// ---- J.P. Morgan POST /cryptograms (seed 001) ----

fn jpmc(s: &TestServer, body: &Value) -> reqwest::RequestBuilder {
    s.http
        .post(s.url("/cryptograms"))
        .header("authorization", format!("Bearer {KEY}"))
        .json(body)
}

/// The seed's Visa example request, naming `token`.
fn seed_request(token: &str) -> Value {
    json!({
        "paymentOrder": {
            "amounts": {"amount": 1234, "currency": "USD"},
            "device": {
                "deviceType": "PHONE", "deviceIPAddress": "192.168.1.78", "deviceLocale": "en-US",
                "deviceLatLong": "40, -73", "deviceMake": "Samsung", "deviceOS": "ANDROID",
                "deviceOsVersion": "12.0", "digitalDeviceIdentifier": "ahd896384d",
                "deviceGeoLocationCaptureTimestamp": "2021-09-08T21:01:20.945Z",
                "deviceName": "Samsung_Android", "walletId": "123"
            },
            "initiatedBy": "CARDHOLDER",
            "transactionType": "ECOMMERCE"
        },
        "paymentInstrument": {
            "accountholderName": "Jane Doe",
            "tokenReferenceIdentifier": token,
            "tokenNumber": "XXXXXXXXXXXX1111",
            "electronicCommerceIndicator": "02",
            "expiry": {"month": 12, "year": 2022},
            "tokenAuthenticationValue": "AgAAABBBBq1IZrIDlcLmQD4AAAA=",
            "tokenType": "NETWORK"
        }
    })
}

async fn jpmc_ok(r: Response) -> Value {
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    conforms("jpmc_cryptogram_response", &v);
    v
}

async fn jpmc_error(r: Response, status: u16, classifier: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "status for {classifier}");
    assert_eq!(r.headers()["x-relay-error"], classifier);
    let v: Value = r.json().await.unwrap();
    conforms("jpmc_error_response", &v);
    assert_eq!(v["responseCode"], classifier.to_ascii_uppercase());
    v
}

#[tokio::test]
async fn jpmc_the_seed_example_works_unchanged_and_is_echoed() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let token = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let req = seed_request(&token);
    let r = jpmc(&s, &req)
        .header("request-id", "1162bba1-d14e-4e49-b870-0d30d599245f")
        .send()
        .await
        .unwrap();
    let v = jpmc_ok(r).await;
    assert_eq!(
        v["requestIdentifier"],
        "1162bba1-d14e-4e49-b870-0d30d599245f"
    );
    assert_eq!(v["responseStatus"], "SUCCESS");
    assert_eq!(v["responseCode"], "ACCEPTED");
    assert_eq!(
        v["paymentOrder"], req["paymentOrder"],
        "device block echoed"
    );
    let pi = &v["paymentInstrument"];
    assert_eq!(pi["accountholderName"], "Jane Doe");
    assert_eq!(pi["tokenReferenceIdentifier"], token.as_str());
    assert_eq!(pi["tokenCryptogramType"], "TAVV");
    assert_eq!(pi["electronicCommerceIndicator"], "07");
    assert_eq!(pi["tokenAuthenticationValue"].as_str().unwrap().len(), 28);
    assert_ne!(
        pi["tokenAuthenticationValue"],
        req["paymentInstrument"]["tokenAuthenticationValue"]
    );
    // SAQ-D: the whole, current token number and expiry.
    let number = pi["tokenNumber"].as_str().unwrap();
    assert!(tokenrelay::card::luhn_valid(number) && number.len() == 16);
    assert!(pi["expiry"]["year"].as_u64().unwrap() >= 2026);

    // Without `request-id` one is generated.
    let v = jpmc_ok(jpmc(&s, &req).send().await.unwrap()).await;
    assert!(uuid::Uuid::try_parse(v["requestIdentifier"].as_str().unwrap()).is_ok());

    // x-api-key works too.
    let r = s
        .http
        .post(s.url("/cryptograms"))
        .header("x-api-key", KEY)
        .json(&req)
        .send()
        .await
        .unwrap();
    jpmc_ok(r).await;
}

#[tokio::test]
async fn jpmc_brand_table_row_by_row() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let visa = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let mc = s.provision(MASTERCARD).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let amex = s.provision(AMEX).await["id"].as_str().unwrap().to_owned();
    let body = |token: &str, order: Value, instrument: Value| {
        let mut pi = json!({"tokenReferenceIdentifier": token});
        pi.as_object_mut()
            .unwrap()
            .extend(instrument.as_object().unwrap().clone());
        json!({"paymentOrder": order, "paymentInstrument": pi})
    };
    let full_visa = json!({"transactionType": "ECOMMERCE", "initiatedBy": "CARDHOLDER"});
    // Each case: token, paymentOrder, paymentInstrument extras, then Ok(the
    // cryptogram type answered) or Err(the field the 400 names).
    let cases: Vec<(&str, Value, Value, Result<&str, &str>)> = vec![
        // Visa: transactionType and initiatedBy required; TAVV or DTVV.
        (
            &visa,
            json!({"initiatedBy": "CARDHOLDER"}),
            json!({}),
            Err("paymentOrder.transactionType"),
        ),
        (
            &visa,
            json!({"transactionType": "ECOMMERCE"}),
            json!({}),
            Err("paymentOrder.initiatedBy"),
        ),
        (&visa, full_visa.clone(), json!({}), Ok("TAVV")),
        (
            &visa,
            full_visa.clone(),
            json!({"tokenCryptogramType": "TAVV"}),
            Ok("TAVV"),
        ),
        (
            &visa,
            full_visa.clone(),
            json!({"tokenCryptogramType": "DTVV"}),
            Ok("DTVV"),
        ),
        (
            &visa,
            full_visa.clone(),
            json!({"tokenCryptogramType": "UCAF"}),
            Err("paymentInstrument.tokenCryptogramType"),
        ),
        (
            &visa,
            full_visa.clone(),
            json!({"tokenCryptogramType": "DCSC"}),
            Err("paymentInstrument.tokenCryptogramType"),
        ),
        // Mastercard: randomNumber required; UCAF only.
        (
            &mc,
            json!({}),
            json!({}),
            Err("paymentInstrument.randomNumber"),
        ),
        (
            &mc,
            json!({}),
            json!({"randomNumber": "8A1F20C3"}),
            Ok("UCAF"),
        ),
        (
            &mc,
            json!({}),
            json!({"randomNumber": 12345678, "tokenCryptogramType": "UCAF"}),
            Ok("UCAF"),
        ),
        (
            &mc,
            json!({}),
            json!({"randomNumber": "8A1F20C3", "tokenCryptogramType": "DTVV"}),
            Err("paymentInstrument.tokenCryptogramType"),
        ),
        (
            &mc,
            json!({}),
            json!({"randomNumber": "8A1F20C3", "tokenCryptogramType": "TAVV"}),
            Err("paymentInstrument.tokenCryptogramType"),
        ),
        // American Express: amount required; DCSC only.
        (
            &amex,
            json!({}),
            json!({}),
            Err("paymentOrder.amounts.amount"),
        ),
        (
            &amex,
            json!({"amounts": {"currency": "USD"}}),
            json!({}),
            Err("paymentOrder.amounts.amount"),
        ),
        (
            &amex,
            json!({"amounts": {"amount": 1234, "currency": "USD"}}),
            json!({}),
            Ok("DCSC"),
        ),
        (
            &amex,
            json!({"amounts": {"amount": 1234}}),
            json!({"tokenCryptogramType": "UCAF"}),
            Err("paymentInstrument.tokenCryptogramType"),
        ),
    ];
    for (token, order, instrument, expected) in cases {
        let req = body(token, order.clone(), instrument.clone());
        let r = jpmc(&s, &req).send().await.unwrap();
        match expected {
            Ok(kind) => {
                let v = jpmc_ok(r).await;
                let pi = &v["paymentInstrument"];
                assert_eq!(pi["tokenCryptogramType"], kind, "{req}");
                let tav = pi["tokenAuthenticationValue"].as_str().unwrap();
                assert_eq!(tav.len(), if kind == "DTVV" { 3 } else { 28 }, "{req}");
            }
            Err(field) => {
                let v = jpmc_error(r, 400, "invalid_cryptogram_request").await;
                let m = v["responseMessage"].as_str().unwrap();
                assert!(m.contains(field), "{req}: {m}");
            }
        }
    }
}

#[tokio::test]
async fn jpmc_token_number_only_where_the_merchant_may_hold_it() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let inline = {
        let id = s.provision(MASTERCARD).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        s.inline_cryptogram(&id).await
    };
    let number = inline["number"].as_str().unwrap();
    let req = json!({"paymentInstrument": {"tokenNumber": number, "randomNumber": "01020304"}});
    let v = jpmc_ok(jpmc(&s, &req).send().await.unwrap()).await;
    assert_eq!(v["paymentInstrument"]["tokenNumber"], number);
    assert_eq!(v["paymentInstrument"]["tokenCryptogramType"], "UCAF");
    // An unknown number, an unknown id: 404.
    let req =
        json!({"paymentInstrument": {"tokenNumber": "5204730000000000", "randomNumber": "1"}});
    jpmc_error(jpmc(&s, &req).send().await.unwrap(), 404, "token_not_found").await;
    let req = json!({"paymentInstrument": {"tokenReferenceIdentifier": "6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11"}});
    jpmc_error(jpmc(&s, &req).send().await.unwrap(), 404, "token_not_found").await;

    // SAQ-A: a token number is card data the merchant may not send.
    let s = TestServer::start(config(ComplianceLevel::SaqA)).await;
    let token = seed_token(&s, MASTERCARD, Brand::Mastercard).await;
    let tpan = s
        .state
        .tokens
        .get(tokenrelay::vault::TokenId::parse(&token).unwrap())
        .await
        .unwrap()
        .unwrap()
        .tpan
        .expose()
        .to_owned();
    for pi in [
        json!({"tokenNumber": tpan, "randomNumber": "1"}),
        json!({"tokenReferenceIdentifier": token, "tokenNumber": tpan, "randomNumber": "1"}),
    ] {
        let r = jpmc(&s, &json!({"paymentInstrument": pi}))
            .send()
            .await
            .unwrap();
        let v = jpmc_error(r, 403, "source_not_permitted").await;
        assert!(!v.to_string().contains(&tpan));
    }
}

#[tokio::test]
async fn jpmc_at_saq_a_a_reference_and_a_masked_number_then_the_forward_pays() {
    let sb = sandbox().await;
    let s = TestServer::start(sb.config(ComplianceLevel::SaqA)).await;
    let token = seed_token(&s, VISA, Brand::Visa).await;
    // A client echoing a masked number (as this API answers) is fine.
    let mut req = seed_request(&token);
    req["paymentOrder"]["amounts"] = json!({"amount": 1000, "currency": "EUR"});
    let v = jpmc_ok(jpmc(&s, &req).send().await.unwrap()).await;
    let pi = &v["paymentInstrument"];
    let masked = pi["tokenNumber"].as_str().unwrap();
    assert_eq!((masked.len(), &masked[6..12]), (16, "******"));
    let reference = pi["tokenAuthenticationValue"].as_str().unwrap();
    assert!(reference.starts_with("cref_"), "{reference}");
    // 1000 minor units of EUR is the 10.00 the cryptogram is bound to.
    let answer = pay(&s, &sb, &token, reference, "10.00").await;
    assert_eq!(answer["status"], "approved", "{answer}");
}

#[tokio::test]
async fn jpmc_errors_in_its_shape_with_native_classifiers() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let token = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let req = seed_request(&token);
    // 401 without a key or with an unknown one; the request id is echoed.
    let r = s
        .http
        .post(s.url("/cryptograms"))
        .header("request-id", "abc-1")
        .json(&req)
        .send()
        .await
        .unwrap();
    let v = jpmc_error(r, 401, "unauthorized").await;
    assert_eq!(v["requestIdentifier"], "abc-1");
    let r = s
        .http
        .post(s.url("/cryptograms"))
        .header("authorization", "Bearer wrong")
        .json(&req)
        .send()
        .await
        .unwrap();
    jpmc_error(r, 401, "unauthorized").await;
    // 403 without the cryptograms scope.
    let r = s
        .http
        .post(s.url("/cryptograms"))
        .header("authorization", format!("Bearer {TOKENS_ONLY_KEY}"))
        .json(&req)
        .send()
        .await
        .unwrap();
    jpmc_error(r, 403, "forbidden").await;
    // 400: not JSON, no instrument, no token named, a bad amount.
    let r = s
        .http
        .post(s.url("/cryptograms"))
        .header("authorization", format!("Bearer {KEY}"))
        .body("{")
        .send()
        .await
        .unwrap();
    jpmc_error(r, 400, "invalid_request").await;
    for body in [
        json!({}),
        json!({"paymentInstrument": {"tokenNumber": "XXXXXXXXXXXX1111"}}),
        json!({"paymentOrder": {"amounts": {"amount": 12.5}}, "paymentInstrument": {"tokenReferenceIdentifier": token}}),
        json!({"paymentOrder": "x", "paymentInstrument": {"tokenReferenceIdentifier": token}}),
    ] {
        let r = jpmc(&s, &body).send().await.unwrap();
        jpmc_error(r, 400, "invalid_request").await;
    }
    // 424: the token is suspended.
    let r = s
        .req(Method::POST, &format!("/api/network/tokens/{token}/events"))
        .json(&json!({"event": "suspend"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    jpmc_error(
        jpmc(&s, &req).send().await.unwrap(),
        424,
        "token_not_active",
    )
    .await;
    // 405 on another method.
    let r = s
        .http
        .get(s.url("/cryptograms"))
        .header("authorization", format!("Bearer {KEY}"))
        .send()
        .await
        .unwrap();
    jpmc_error(r, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn the_native_api_still_ignores_authorization() {
    // Bearer is for the surfaces only: on /api/ `Authorization` belongs to
    // the acquirer (contract §2).
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let r = s
        .http
        .get(s.url("/api/network/tokens/6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11"))
        .header("authorization", format!("Bearer {KEY}"))
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "unauthorized").await;
}

// ---- The lookups behind both surfaces on the SQL vaults ----

/// A fresh SQLite file, and (when the environment names one) a fresh
/// PostgreSQL schema: `(label, url, schema to drop)`.
async fn sql_databases(dir: &std::path::Path) -> Vec<(&'static str, String, Option<String>)> {
    let mut dbs = vec![(
        "sqlite",
        format!("sqlite://{}?mode=rwc", dir.join("vault.db").display()),
        None,
    )];
    match std::env::var("TOKENRELAY_TEST_POSTGRES_URL") {
        Ok(base) => {
            sqlx::any::install_default_drivers();
            let pool = sqlx::any::AnyPoolOptions::new()
                .max_connections(1)
                .connect(&base)
                .await
                .unwrap_or_else(|e| {
                    panic!("TOKENRELAY_TEST_POSTGRES_URL set but unreachable: {e}")
                });
            let schema = format!("tokenrelay_surfaces_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&pool)
                .await
                .unwrap();
            let sep = if base.contains('?') { '&' } else { '?' };
            dbs.push((
                "postgres",
                format!("{base}{sep}options[search_path]={schema}"),
                Some(schema),
            ));
        }
        Err(_) => println!("PostgreSQL run skipped: TOKENRELAY_TEST_POSTGRES_URL is unset"),
    }
    dbs
}

#[tokio::test]
async fn sql_vaults_find_tokens_by_card_and_by_number_including_older_rows() {
    use tokenrelay::vault::keyring::Keyring;
    use tokenrelay::vault::sql::SqlTokenStore;
    use tokenrelay::vault::{NetworkToken, TokenId, TokenLookup, TokenStatus, TokenStore};
    let dir = tempfile::tempdir().unwrap();
    let keys = format!(
        "k1:{}\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32])
    );
    for (label, url, schema) in sql_databases(dir.path()).await {
        let store =
            SqlTokenStore::connect(&url, std::sync::Arc::new(Keyring::parse(&keys).unwrap()))
                .await
                .unwrap_or_else(|e| panic!("{label}: {e}"));
        let card = uuid::Uuid::new_v4();
        let now = time::OffsetDateTime::now_utc();
        let token = |tpan: &str, card: Option<uuid::Uuid>, at: time::OffsetDateTime| NetworkToken {
            id: TokenId::new(),
            status: TokenStatus::Active,
            network_token_type: tokenrelay::vault::NetworkTokenType::Vts,
            scheme: Brand::Visa,
            card_last4: "1111".into(),
            expiry_month: 12,
            expiry_year: 2031,
            pci_token_id: card,
            supports_device_binding: true,
            scheme_reference: "sbx".into(),
            scheme_metadata: Metadata::new(),
            metadata: Metadata::new(),
            dauth_activated: false,
            created_at: at,
            updated_at: at,
            tpan: CardNumber::parse(tpan).unwrap(),
        };
        let older = token(
            "4895370000000018",
            Some(card),
            now - time::Duration::minutes(1),
        );
        let newer = token("4895370000000026", Some(card), now);
        let loose = token("4895370000000034", None, now);
        let ids = (older.id, newer.id, loose.id);
        for t in [newer, older, loose] {
            store.insert(t, None).await.unwrap();
        }
        let found = store.find_tokens(TokenLookup::Card(card)).await.unwrap();
        assert_eq!(
            found.iter().map(|t| t.id).collect::<Vec<_>>(),
            vec![ids.0, ids.1],
            "{label}: the card's tokens, oldest first"
        );
        let n = CardNumber::parse("4895370000000034").unwrap();
        let found = store.find_tokens(TokenLookup::Number(&n)).await.unwrap();
        assert_eq!(found.len(), 1, "{label}");
        assert_eq!(found[0].id, ids.2, "{label}");
        let none = CardNumber::parse("4895370000000042").unwrap();
        assert!(store
            .find_tokens(TokenLookup::Number(&none))
            .await
            .unwrap()
            .is_empty());

        // Rows written before the lookup columns existed are filled in when
        // the store opens.
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        sqlx::query("UPDATE network_tokens SET pci_token_id = NULL, tpan_fingerprint = NULL")
            .execute(&pool)
            .await
            .unwrap();
        drop(store);
        let store =
            SqlTokenStore::connect(&url, std::sync::Arc::new(Keyring::parse(&keys).unwrap()))
                .await
                .unwrap();
        assert_eq!(
            store
                .find_tokens(TokenLookup::Card(card))
                .await
                .unwrap()
                .len(),
            2,
            "{label}: backfilled"
        );
        assert_eq!(
            store
                .find_tokens(TokenLookup::Number(&n))
                .await
                .unwrap()
                .len(),
            1
        );
        if let Some(schema) = schema {
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&pool)
                .await
                .unwrap();
        }
    }
}

// ---- Our own failures (the seeds' 500 and 503) and the config switches ----

#[tokio::test]
async fn a_full_reference_store_is_503_on_both_surfaces() {
    let mut c = config(ComplianceLevel::SaqA);
    c.reference_max_entries = 1;
    let s = TestServer::start(c).await;
    let card = seed_card(&s, VISA, Brand::Visa).await;
    let token = provision(&s, &card).await["data"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The one reference the store holds.
    vgs_ok(
        fetch(&s, &card, json!({})).await,
        200,
        "vgs_cryptogram_response",
    )
    .await;
    let r = fetch(&s, &card, json!({})).await;
    vgs_error(r, 503, "reference_store_full", None).await;
    let r = jpmc(&s, &seed_request(&token)).send().await.unwrap();
    jpmc_error(r, 503, "reference_store_full").await;
}

#[tokio::test]
async fn an_unreadable_vault_row_is_500_without_its_detail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vault.db");
    let mut c = config(ComplianceLevel::SaqD);
    c.vault.backend = tokenrelay::config::VaultBackend::Sqlite { path: path.clone() };
    c.vault.key_file = Some(dir.path().join("master.key"));
    c.vault.create_key_file = true;
    let s = TestServer::start(c).await;
    let card = card(&s, VISA).await;
    let token = provision(&s, &card).await["data"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE network_tokens SET secret = 'AAAA' WHERE id = $1")
        .bind(&token)
        .execute(&pool)
        .await
        .unwrap();
    let r = vgs(
        &s,
        Method::POST,
        &format!("/cards/{card}/network-tokens"),
        KEY,
    )
    .send()
    .await
    .unwrap();
    let v = vgs_error(r, 500, "internal_error", None).await;
    assert_eq!(v["errors"][0]["detail"], "internal error");
    let r = jpmc(&s, &seed_request(&token)).send().await.unwrap();
    let v = jpmc_error(r, 500, "internal_error").await;
    assert_eq!(v["responseMessage"], "internal error");
}

#[test]
fn check_config_checks_the_surfaces_switches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenrelay.toml");
    let run = |doc: &str| {
        std::fs::write(&path, doc).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
            .args(["check-config", "--config"])
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let memory = "[vault]\nbackend = \"memory\"\n";
    let ok = run(&format!(
        "{memory}[surfaces]\nvgs_cmp = false\njpmc = true\n"
    ));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (bad, named) in [
        ("[surfaces]\nstripe = true\n", "stripe"),
        ("[surfaces]\njpmc = \"yes\"\n", "boolean"),
    ] {
        let out = run(&format!("{memory}{bad}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {stderr}");
        assert!(stderr.contains(named), "{stderr}");
    }
    // The shipped profile documents and sets both.
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/tokenrelay.toml"
    ))
    .unwrap();
    assert!(
        shipped.contains("[surfaces]\n")
            && shipped.contains("vgs_cmp = true")
            && shipped.contains("jpmc = true")
    );
}
