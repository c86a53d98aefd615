#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! What the logs hold: no secret (the whole API and forward flow runs with a
//! capturing subscriber at TRACE, and every line is searched for the PAN,
//! the TPAN, the cryptogram, the CVC and the API key), and one line per
//! request, with its request id and what the request did.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde_json::{json, Value};
use support::*;
use tokenrelay::config::ComplianceLevel;

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
    /// Captures this thread's events, in the product's own line format (the
    /// one that must not leak), until the guard drops. The tests run on a
    /// current-thread runtime, so the server's tasks log on this thread.
    fn start() -> (Capture, tracing::subscriber::DefaultGuard) {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(tokenrelay::telemetry::JsonLine)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        (capture, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test]
async fn no_secret_in_any_log_line() {
    let (capture, _guard) = Capture::start();

    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let pan = MASTERCARD;
    let cvc = "737";
    let t = s
        .provision_with(json!({"source": {"type": "pan", "number": pan, "expiry_month": 12, "expiry_year": 2031, "cvc": cvc}}))
        .await;
    let id = t["id"].as_str().unwrap();
    let inline = s.inline_cryptogram(id).await;
    let tpan = inline["number"].as_str().unwrap().to_owned();
    let inline_cryptogram = inline["cryptogram"].as_str().unwrap().to_owned();
    let r = s.reference(id).await;
    let resp = s
        .forward(id, &r, &acq.url("/pay"))
        .header("content-type", "application/json")
        .body(r#"{"n":"<< number >>","c":"<< cryptogram >>"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent: Value = serde_json::from_slice(&acq.last().body).unwrap();
    let forwarded_cryptogram = sent["c"].as_str().unwrap().to_owned();
    // Errors too: a bad card and a reused reference.
    let _ = s
        .req(Method::POST, "/api/network/tokens")
        .json(&json!({"source": {"type": "pan", "number": "4111111111111112", "expiry_month": 12, "expiry_year": 2031}}))
        .send()
        .await
        .unwrap();
    let _ = s
        .forward(id, &r, &acq.url("/pay"))
        .body("<< number >>")
        .send()
        .await
        .unwrap();
    s.stop().await;

    let logs = capture.text();
    assert!(
        logs.contains("tokenrelay::access"),
        "the capture saw the access log"
    );
    for (what, secret) in [
        ("PAN", pan),
        ("bad PAN", "4111111111111112"),
        ("TPAN", tpan.as_str()),
        ("inline cryptogram", inline_cryptogram.as_str()),
        ("forwarded cryptogram", forwarded_cryptogram.as_str()),
        ("API key", KEY),
        ("reference", r.as_str()),
    ] {
        assert!(!logs.contains(secret), "{what} found in logs");
    }
    assert!(!logs.contains(&format!("\"{cvc}\"")), "CVC found in logs");
}

#[tokio::test]
async fn one_line_per_request_with_its_id_and_what_it_did() {
    let (capture, _guard) = Capture::start();
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s.provision(MASTERCARD).await;
    let id = t["id"].as_str().unwrap().to_owned();
    let r = s.reference(&id).await;
    let forward = |request_id: &'static str| {
        s.forward(&id, &r, &acq.url("/pay"))
            .header("x-request-id", request_id)
            .body("<< number >>")
            .send()
    };
    assert_eq!(forward("merchant-req-1").await.unwrap().status(), 200);
    // The reference is spent: the retry fails, and its line says so.
    let spent = forward("merchant-req-2").await.unwrap();
    assert_eq!(spent.status(), 409);
    let relay_error = spent.headers()["x-relay-error"]
        .to_str()
        .unwrap()
        .to_owned();
    s.stop().await;

    let lines: Vec<Value> = capture
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &Value| {
            let target = l["target"].as_str().unwrap();
            target.starts_with("tokenrelay::access") || target.starts_with("tokenrelay::audit")
        })
        .collect();
    // Four requests (provision, cryptogram, two forwards), four lines: no
    // separate audit line, and every line is the request's.
    let routes: Vec<&str> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["target"], "tokenrelay::access", "{l}");
            assert!(
                l["fields"]["request_id"]
                    .as_str()
                    .is_some_and(|i| !i.is_empty()),
                "{l}"
            );
            l["fields"]["route"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        routes,
        ["provision_token", "create_cryptogram", "forward", "forward"]
    );
    let subject = format!("network_token:{id}");
    let f = &lines[0]["fields"];
    assert_eq!(
        (f["status"].as_u64(), f["subject"].as_str()),
        (Some(201), Some(subject.as_str()))
    );
    assert_eq!(f["scheme"], "mastercard");
    assert_eq!(
        f["card"],
        format!("{}…{}", &MASTERCARD[..6], &MASTERCARD[12..])
    );
    let f = &lines[1]["fields"];
    assert_eq!(
        (f["subject"].as_str(), f["mode"].as_str()),
        (Some(subject.as_str()), Some("reference"))
    );
    let f = &lines[2]["fields"];
    assert_eq!(f["request_id"], "merchant-req-1");
    assert_eq!(
        (f["status"].as_u64(), f["subject"].as_str()),
        (Some(200), Some(subject.as_str()))
    );
    assert_eq!(f["destination_host"], "127.0.0.1");
    assert!(f.get("relay_error").is_none(), "{f}");
    let f = &lines[3]["fields"];
    assert_eq!(f["request_id"], "merchant-req-2");
    assert_eq!(
        (f["status"].as_u64(), f["subject"].as_str()),
        (Some(409), Some(subject.as_str()))
    );
    assert_eq!(f["destination_host"], "127.0.0.1");
    assert_eq!(f["relay_error"], relay_error);
}

#[tokio::test]
async fn no_card_or_ciphertext_in_any_log_line_of_a_session_provisioning() {
    use tokenrelay::session::jwe;
    let (capture, _guard) = Capture::start();
    let s = TestServer::start(config(ComplianceLevel::SaqA)).await;
    let (pan, cvc, name) = (AMEX, "4321", "Grace Hopper");
    let plain = json!({"number": pan, "expiry_month": 12, "expiry_year": 2031, "cvc": cvc, "cardholder_name": name});
    let open = || async {
        let v: Value = s
            .req(Method::POST, "/api/sessions")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let key = jwe::public_key_from_jwk(&v["public_key"]).unwrap();
        let id = v["id"].as_str().unwrap().to_owned();
        (id, key)
    };
    let provision = |path: &'static str, id: String, data: String| {
        s.req(Method::POST, path)
            .json(&json!({"source": {"type": "session", "id": id, "data": data}}))
            .send()
    };
    let mut ciphertexts = Vec::new();
    // A network token and a PCI token, each from its own session.
    let (id, key) = open().await;
    let data = jwe::encrypt(&key, &id, plain.to_string().as_bytes());
    ciphertexts.push(data.clone());
    let ok = provision("/api/network/tokens", id.clone(), data.clone())
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    // The same session again: 409.
    assert_eq!(
        provision("/api/network/tokens", id.clone(), data)
            .await
            .unwrap()
            .status(),
        409
    );
    let (id2, key2) = open().await;
    let data2 = jwe::encrypt(&key2, &id2, plain.to_string().as_bytes());
    ciphertexts.push(data2.clone());
    assert_eq!(
        provision("/api/pci/tokens", id2, data2)
            .await
            .unwrap()
            .status(),
        200
    );
    // A tampered ciphertext and a bad card inside.
    let (id3, key3) = open().await;
    let mut data3 = jwe::encrypt(&key3, &id3, plain.to_string().as_bytes());
    data3.replace_range(data3.len() - 3.., "AAA");
    ciphertexts.push(data3.clone());
    assert_eq!(
        provision("/api/network/tokens", id3, data3)
            .await
            .unwrap()
            .status(),
        422
    );
    let (id4, key4) = open().await;
    let bad =
        json!({"number": "378282246310006", "expiry_month": 12, "expiry_year": 2031, "cvc": cvc});
    let data4 = jwe::encrypt(&key4, &id4, bad.to_string().as_bytes());
    ciphertexts.push(data4.clone());
    assert_eq!(
        provision("/api/network/tokens", id4, data4)
            .await
            .unwrap()
            .status(),
        422
    );
    s.stop().await;

    let logs = capture.text();
    assert!(
        logs.contains("create_session"),
        "the capture saw the sessions"
    );
    // The access line names the session a provisioning spent (an id, not a
    // secret) and the card only masked.
    assert!(logs.contains(&format!("\"session\":\"{id}\"")), "{logs}");
    assert!(
        // A 15-digit card is masked to its last four only.
        logs.contains(&format!("\"…{}\"", &pan[11..])),
        "masked card"
    );
    for (what, secret) in [
        ("PAN", pan),
        ("bad PAN", "378282246310006"),
        ("name", name),
        ("API key", KEY),
    ] {
        assert!(!logs.contains(secret), "{what} found in logs");
    }
    assert!(!logs.contains(&format!("\"{cvc}\"")), "CVC found in logs");
    for data in &ciphertexts {
        for part in data.split('.').filter(|p| p.len() > 8) {
            assert!(!logs.contains(part), "a JWE part found in logs");
        }
    }
}

#[tokio::test]
async fn a_route_forward_line_names_the_route_and_no_secret() {
    let (capture, _guard) = Capture::start();
    let acq = Acquirer::start().await;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule()];
    c.routes = vec![tokenrelay::config::RouteConfig {
        name: "checkout-payments".into(),
        destination: acq.url("/payments"),
        method: http::Method::POST,
        template: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/routes/checkout-payments.json.j2"),
        subjects: vec![tokenrelay::config::RouteSubject::NetworkToken],
    }];
    let s = TestServer::start(c).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap().to_owned();
    let tpan = s.inline_cryptogram(&id).await["number"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = s.reference(&id).await;
    let resp = s
        .req(
            Method::POST,
            &format!("/api/network/tokens/{id}/forward/checkout-payments"),
        )
        .header("x-cryptogram-reference", &r)
        .json(&json!({"reference": "order-log", "amount": {"value": 1000, "currency": "EUR"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    s.stop().await;
    let text = capture.text();
    assert!(!text.contains(&tpan) && !text.contains(VISA));
    let line: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["fields"]["route"] == "forward_route")
        .unwrap_or_else(|| panic!("no access line for the route forward"));
    let f = &line["fields"];
    assert_eq!(f["forward_route"], "checkout-payments");
    assert_eq!(f["destination_host"], "127.0.0.1");
    assert_eq!(f["status"], 200);
}

#[tokio::test]
async fn short_card_numbers_are_logged_as_last4_only() {
    let (capture, _guard) = Capture::start();
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    for pan in ["4222222222222", AMEX, VISA] {
        s.provision(pan).await;
    }
    s.stop().await;
    let cards: Vec<String> = capture
        .text()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["fields"]["route"] == "provision_token")
        .map(|l| l["fields"]["card"].as_str().unwrap().to_owned())
        .collect();
    // 13 and 15 digits: first6 + last4 would show 10 of 13 and 10 of 15.
    assert_eq!(cards, ["…2222", "…0005", "411111…1111"]);
    let text = capture.text();
    assert!(!text.contains("422222"), "{text}");
    assert!(!text.contains("378282"), "{text}");
}
