#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! Routes (contract §10) through the real server: every fixture template in
//! `fixtures/routes/` against the TLS sandbox acquirer, which parses the
//! format, verifies the cryptogram for the TPAN and amount, and echoes the
//! merchant's reference; every classifier; routes_only; a route that fails
//! to render consumes nothing; bad routes stop the start.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;
use tokenrelay::config::{
    ComplianceLevel, Config, DestScheme, DestinationRule, HostPattern, RouteConfig, RouteSubject,
};
use tokenrelay::sandbox_acquirer::{generate_pki, SandboxAcquirer};
use tokenrelay::tsp::sandbox::DEFAULT_SANDBOX_KEY;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/routes")
        .join(name)
}

/// The sandbox acquirer on TLS, with its CA in a temp dir.
struct Sandbox {
    acq: SandboxAcquirer,
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
}

impl Sandbox {
    async fn start() -> Sandbox {
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

    fn rule(&self) -> DestinationRule {
        DestinationRule {
            host: HostPattern::Exact("127.0.0.1".into()),
            port: self.acq.addr.port(),
            scheme: DestScheme::Https,
            allow_private: true,
            ca_file: Some(self.ca_file.clone()),
            client_cert: None,
            client_key: None,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.acq.addr.port())
    }
}

fn route(
    name: &str,
    destination: String,
    template: PathBuf,
    subjects: &[RouteSubject],
) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        destination,
        method: http::Method::POST,
        template,
        subjects: subjects.to_vec(),
    }
}

const BOTH: &[RouteSubject] = &[RouteSubject::NetworkToken, RouteSubject::PciToken];
const NETWORK: &[RouteSubject] = &[RouteSubject::NetworkToken];

/// The four fixture routes against `sb`.
fn fixture_routes(sb: &Sandbox) -> Vec<RouteConfig> {
    vec![
        route(
            "adyen-payments",
            sb.url("/v71/payments"),
            fixture("adyen-payments.json.j2"),
            BOTH,
        ),
        route(
            "checkout-payments",
            sb.url("/payments"),
            fixture("checkout-payments.json.j2"),
            NETWORK,
        ),
        route(
            "nmi-sale",
            sb.url("/api/transact.php"),
            fixture("nmi-sale.form.j2"),
            NETWORK,
        ),
        route(
            "worldpay-order",
            sb.url("/jsp/merchant/xml/paymentService.jsp"),
            fixture("worldpay-order.xml.j2"),
            NETWORK,
        ),
    ]
}

async fn server(sb: &Sandbox, f: impl FnOnce(&mut Config)) -> TestServer {
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![sb.rule()];
    c.routes = fixture_routes(sb);
    f(&mut c);
    TestServer::start(c).await
}

/// `POST /api/network/tokens/{id}/forward/{route}` with a reference.
fn route_forward(
    s: &TestServer,
    token: &str,
    reference: &str,
    route: &str,
) -> reqwest::RequestBuilder {
    s.req(
        Method::POST,
        &format!("/api/network/tokens/{token}/forward/{route}"),
    )
    .header("x-cryptogram-reference", reference)
}

/// The merchant's input: amount as the reference was minted for (10.00),
/// and a reference with characters every format must escape.
fn input(reference: &str) -> Value {
    json!({
        "merchant_account": "TokenrelayECOM",
        "merchant_code": "TOKENRELAY",
        "security_key": "nmi-test-key",
        "reference": reference,
        "amount": {"value": 1000, "currency": "EUR"},
    })
}

const AWKWARD: &str = "order-1 \"a\" <b> & c=d+e/f";

#[tokio::test]
async fn every_fixture_reaches_the_sandbox_acquirer_parsed_and_approved() {
    let sb = Sandbox::start().await;
    let s = server(&sb, |_| {}).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();

    // Adyen: JSON, the TAVV in mpiData.
    let r = s.reference(id).await;
    let resp = route_forward(&s, id, &r, "adyen-payments")
        .json(&input(AWKWARD))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-relay-error").is_none());
    assert!(resp.headers().contains_key("x-relay-upstream-duration-ms"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["resultCode"], "Authorised", "{v}");
    assert_eq!(v["merchantReference"], AWKWARD);

    // Checkout.com: JSON, a network_token source.
    let r = s.reference(id).await;
    let resp = route_forward(&s, id, &r, "checkout-payments")
        .json(&input(AWKWARD))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["approved"].as_bool(), v["reference"].as_str()),
        (Some(true), Some(AWKWARD)),
        "{v}"
    );

    // NMI: form-encoded, every value percent-encoded.
    let r = s.reference(id).await;
    let resp = route_forward(&s, id, &r, "nmi-sale")
        .json(&input(AWKWARD))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let answer: std::collections::HashMap<String, String> = form_urlencoded::parse(text.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(answer["response"], "1", "{text}");
    assert_eq!(answer["orderid"], AWKWARD);

    // Worldpay: XML, every value entity-escaped.
    let r = s.reference(id).await;
    let resp = route_forward(&s, id, &r, "worldpay-order")
        .json(&input(AWKWARD))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    let status = doc
        .descendants()
        .find(|n| n.has_tag_name("orderStatus"))
        .unwrap();
    assert_eq!(status.attribute("orderCode"), Some(AWKWARD), "{text}");
    let event = doc
        .descendants()
        .find(|n| n.has_tag_name("lastEvent"))
        .unwrap();
    assert_eq!(event.attribute("status"), Some("AUTHORISED"), "{text}");

    // What the acquirer parsed last: the real TPAN (masked by the acquirer
    // for its record), never a placeholder.
    let last = sb.acq.last_received_masked().unwrap();
    let number = last["card"]["number"].as_str().unwrap();
    assert_eq!(number.chars().count(), 11, "first6…last4: {number}");
    s.stop().await;
}

#[tokio::test]
async fn the_acquirer_declines_what_is_not_the_real_cryptogram_or_amount() {
    let sb = Sandbox::start().await;
    let s = server(&sb, |_| {}).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    // The cryptogram was minted for 10.00: another amount cannot pass.
    let r = s.reference(id).await;
    let mut body = input("order-2");
    body["amount"]["value"] = json!(1100);
    let v: Value = route_forward(&s, id, &r, "adyen-payments")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v["resultCode"].as_str(), v["refusalReason"].as_str()),
        (Some("Refused"), Some("invalid_cryptogram"))
    );
    s.stop().await;
}

#[tokio::test]
async fn a_pci_token_uses_the_same_route_as_a_card_payment() {
    let sb = Sandbox::start().await;
    let s = server(&sb, |_| {}).await;
    let card: Value = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&json!({"number": VISA, "expiry_month": 12, "expiry_year": 2031, "cardholder_name": "A. Shopper"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = card["id"].as_str().unwrap();
    let resp = s
        .req(
            Method::POST,
            &format!("/api/pci/tokens/{id}/forward/adyen-payments"),
        )
        .json(&input("order-fpan"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["resultCode"], "Authorised", "{v}");
    let last = sb.acq.last_received_masked().unwrap();
    assert_eq!(
        last["card"]["number"],
        format!("{}…{}", &VISA[..6], &VISA[12..])
    );
    assert_eq!(last["card"]["cryptogram"], Value::Null);

    // A route open to network tokens only.
    let resp = s
        .req(
            Method::POST,
            &format!("/api/pci/tokens/{id}/forward/checkout-payments"),
        )
        .json(&input("order-fpan"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 403, "route_not_permitted").await;
    s.stop().await;
}

#[tokio::test]
async fn route_classifiers_and_nothing_consumed_before_the_render() {
    let sb = Sandbox::start().await;
    let s = server(&sb, |_| {}).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;

    let resp = route_forward(&s, id, &r, "no-such-route")
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "route_not_found").await;

    // A missing input field: 422 naming it; the reference is untouched.
    let mut body = input("x");
    body.as_object_mut().unwrap().remove("amount");
    let resp = route_forward(&s, id, &r, "checkout-payments")
        .json(&body)
        .send()
        .await
        .unwrap();
    let e = assert_error(resp, 422, "invalid_route_input").await;
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("input.amount"), "{message}");
    assert!(message.contains("checkout-payments.json.j2"), "{message}");

    let resp = route_forward(&s, id, &r, "checkout-payments")
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "invalid_request").await;

    let resp = route_forward(&s, id, &r, "checkout-payments")
        .header("x-destination-url", sb.url("/elsewhere"))
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "invalid_destination").await;

    let resp = s
        .req(
            Method::PUT,
            &format!("/api/network/tokens/{id}/forward/checkout-payments"),
        )
        .header("x-cryptogram-reference", &r)
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 405, "method_not_allowed").await;

    let resp = s
        .req(
            Method::POST,
            &format!("/api/network/tokens/{id}/forward/checkout-payments"),
        )
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "missing_header").await;

    let resp = route_forward(&s, id, "not-a-reference", "checkout-payments")
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "reference_not_found").await;

    let resp = s
        .http
        .post(s.url(&format!(
            "/api/network/tokens/{id}/forward/checkout-payments"
        )))
        .header("x-api-key", TOKENS_ONLY_KEY)
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 403, "forbidden").await;

    // After all of that the reference still works, once.
    let resp = route_forward(&s, id, &r, "checkout-payments")
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = route_forward(&s, id, &r, "checkout-payments")
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 409, "reference_already_used").await;
    s.stop().await;
}

#[tokio::test]
async fn a_render_that_fails_on_the_real_values_restores_the_reference() {
    let sb = Sandbox::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The masked render has `***` under any metadata key; the real token
    // has no `order` key, so only the real render fails — after the take.
    let template = dir.path().join("needs-metadata.json.j2");
    std::fs::write(
        &template,
        r#"{"pan": {{ number }}, "order": {{ network_token_metadata.order }}}"#,
    )
    .unwrap();
    let s = server(&sb, |c| {
        c.routes.push(route(
            "needs-metadata",
            sb.url("/payments"),
            template,
            NETWORK,
        ));
    })
    .await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let resp = route_forward(&s, id, &r, "needs-metadata")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let e = assert_error(resp, 422, "invalid_route_input").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("network_token_metadata.order"),
        "{e}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", s.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tokenrelay_references_restored_total 1"),
        "{metrics}"
    );
    // Nothing was sent, and the reference is usable again.
    let resp = route_forward(&s, id, &r, "checkout-payments")
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    s.stop().await;
}

#[tokio::test]
async fn dry_run_shows_the_rendered_route_masked_and_consumes_nothing() {
    let sb = Sandbox::start().await;
    let s = server(&sb, |_| {}).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let inline = s.inline_cryptogram(id).await;
    let tpan = inline["number"].as_str().unwrap().to_owned();
    let r = s.reference(id).await;
    let resp = route_forward(&s, id, &r, "adyen-payments")
        .header("x-relay-dry-run", "true")
        .json(&input("order-dry"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["url"], sb.url("/v71/payments"));
    assert_eq!(v["headers"]["content-type"], "application/json");
    let body: Value = serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["paymentMethod"]["number"], "***");
    assert_eq!(
        body["mpiData"]["tokenAuthenticationVerificationValue"],
        "***"
    );
    assert_eq!(body["reference"], "order-dry");
    assert!(!v.to_string().contains(&tpan));
    let resp = route_forward(&s, id, &r, "adyen-payments")
        .json(&input("order-dry"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the dry run consumed nothing");
    s.stop().await;
}

#[tokio::test]
async fn routes_only_refuses_free_form_forwards_but_not_routes() {
    let sb = Sandbox::start().await;
    let s = server(&sb, |c| c.routes_only = true).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let resp = s
        .forward(id, &r, &sb.url("/v1/authorizations"))
        .body(r#"{"amount":"10.00","card":{"number":"<< number >>","cryptogram":"<< cryptogram >>"}}"#)
        .send()
        .await
        .unwrap();
    assert_error(resp, 403, "free_form_forward_disabled").await;
    let card: Value = s
        .req(Method::POST, "/api/pci/tokens")
        .json(&json!({"number": MASTERCARD, "expiry_month": 1, "expiry_year": 2032}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let resp = s
        .req(
            Method::POST,
            &format!("/api/pci/tokens/{}/forward", card["id"].as_str().unwrap()),
        )
        .header("x-destination-url", sb.url("/v1/authorizations"))
        .body("<< account_number >>")
        .send()
        .await
        .unwrap();
    assert_error(resp, 403, "free_form_forward_disabled").await;
    // The reference was not touched by the refused forward.
    let resp = route_forward(&s, id, &r, "checkout-payments")
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    s.stop().await;
}

#[tokio::test]
async fn redaction_timing_and_metrics_on_a_route() {
    // An acquirer that echoes what it got: redaction must mask the TPAN.
    let acq = Acquirer::with(Arc::new(|r: Recorded| {
        Box::pin(async move { full(200, r.body) })
    }))
    .await;
    let mut c = config(ComplianceLevel::SaqD);
    c.redact_responses = true;
    c.destinations = vec![acq.rule()];
    c.routes = vec![route(
        "echo",
        acq.url("/echo"),
        fixture("checkout-payments.json.j2"),
        NETWORK,
    )];
    let s = TestServer::start(c).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let inline = s.inline_cryptogram(id).await;
    let tpan = inline["number"].as_str().unwrap().to_owned();
    let r = s.reference(id).await;
    let resp = route_forward(&s, id, &r, "echo")
        .header("authorization", "Bearer acquirer-secret")
        .json(&input("order-echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-relay-upstream-duration-ms"));
    let echoed = resp.text().await.unwrap();
    assert!(!echoed.contains(&tpan), "{echoed}");
    let got = acq.last();
    let sent: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(sent["source"]["token"], tpan.as_str());
    assert_eq!(sent["reference"], "order-echo");
    assert_eq!(got.headers["content-type"], "application/json");
    assert_eq!(got.headers["authorization"], "Bearer acquirer-secret");
    assert!(!got.headers.contains_key("x-cryptogram-reference"));

    let resp = route_forward(&s, id, "nope", "echo")
        .json(&input("x"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "reference_not_found").await;
    let metrics = reqwest::get(format!("http://{}/metrics", s.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"tokenrelay_route_forwards_total{route="echo",status="2xx"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tokenrelay_route_forwards_total{route="echo",status="4xx"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tokenrelay_requests_total{route="forward_route",status="2xx"} 1"#),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_broken_template_or_a_destination_off_the_allow_list_stops_the_start() {
    let sb = Sandbox::start().await;
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.json.j2");
    std::fs::write(
        &broken,
        "{\n  \"amount\": {{ input.amount }},\n  \"x\": {% if %}\n}",
    )
    .unwrap();
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![sb.rule()];
    c.routes = vec![route(
        "broken",
        sb.url("/payments"),
        broken.clone(),
        NETWORK,
    )];
    let e = tokenrelay::AppState::build(c)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("routes[0].template"), "{e}");
    assert!(e.contains(&format!("{} line 3", broken.display())), "{e}");

    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![sb.rule()];
    c.routes = vec![route(
        "elsewhere",
        "https://api.elsewhere.example/payments".into(),
        fixture("checkout-payments.json.j2"),
        NETWORK,
    )];
    let e = tokenrelay::AppState::build(c)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("routes[0].destination"), "{e}");
    assert!(e.contains("api.elsewhere.example"), "{e}");
}

#[test]
fn check_config_reports_the_same_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("routes")).unwrap();
    std::fs::write(dir.path().join("routes/pay.json.j2"), "{{ input.amount }\n").unwrap();
    let config = dir.path().join("tokenrelay.toml");
    let toml = r#"
[vault]
backend = "memory"

[[destinations]]
host = "api.acquirer.example"

[[routes]]
name = "pay"
destination = "https://api.acquirer.example/payments"
template = "routes/pay.json.j2"
subjects = ["network_token"]
"#;
    std::fs::write(&config, toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("routes[0].template"), "{stderr}");
    assert!(stderr.contains("routes/pay.json.j2 line 1"), "{stderr}");

    // Fixed, relative to the config file: ok.
    std::fs::write(
        dir.path().join("routes/pay.json.j2"),
        "{{ input.amount }}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Off the allow-list.
    std::fs::write(
        &config,
        toml.replace(
            "https://api.acquirer.example/payments",
            "https://evil.example/payments",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("routes[0].destination") && stderr.contains("evil.example"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_shipped_config_documents_a_route_that_checks() {
    // The commented route in config/tokenrelay.toml, uncommented, is valid
    // against the shipped fixtures.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tokenrelay.toml"),
    )
    .unwrap();
    let block: String = shipped
        .lines()
        .skip_while(|l| !l.starts_with("# [[routes]]"))
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches("# ").trim_start_matches('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        block.contains("[[routes]]"),
        "no commented route in the shipped config"
    );
    let doc = format!("[[destinations]]\nhost = \"checkout-test.adyen.com\"\n\n{block}\n");
    let c = Config::parse_in(
        &doc,
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .as_path(),
    )
    .unwrap();
    assert_eq!(c.routes.len(), 1);
    let metrics = Arc::new(tokenrelay::telemetry::Metrics::new());
    let f = tokenrelay::forward::Forwarder::new(&c, metrics).unwrap();
    assert_eq!(f.routes.len(), 1);
}

/// Contract §9 on a route: `x-idempotency-key` makes a route forward
/// retry-safe, as it does a free-form one.
#[tokio::test]
async fn a_keyed_route_forward_is_answered_once_and_replayed() {
    let sb = Sandbox::start().await;
    let s = server(&sb, |_| {}).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let keyed = |reference: &str, key: &str, body: &Value| {
        route_forward(&s, id, reference, "checkout-payments")
            .header("x-idempotency-key", key)
            .json(body)
    };

    let first = keyed(&r, "route-order-1", &input("k1"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("x-relay-idempotent-replay").is_none());
    let body = first.text().await.unwrap();

    // The retry gets the same answer, marked, and spends nothing: without
    // the key the reference is already used.
    let again = keyed(&r, "route-order-1", &input("k1"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["x-relay-idempotent-replay"], "true");
    assert_eq!(again.text().await.unwrap(), body);

    // The same key with other input, or with another reference: refused,
    // and the fresh reference is not consumed.
    let fresh = s.reference(id).await;
    let resp = keyed(&r, "route-order-1", &input("k2"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 422, "idempotency_key_reused").await;
    let resp = keyed(&fresh, "route-order-1", &input("k1"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 422, "idempotency_key_reused").await;
    let resp = keyed(&fresh, "", &input("k1")).send().await.unwrap();
    assert_error(resp, 400, "invalid_request").await;

    let resp = route_forward(&s, id, &fresh, "checkout-payments")
        .json(&input("k1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "the fresh reference still pays");
    let resp = route_forward(&s, id, &r, "checkout-payments")
        .json(&input("k1"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 409, "reference_already_used").await;
    s.stop().await;
}
