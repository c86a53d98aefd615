#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! No secret reaches the logs: the whole API and forward flow runs with a
//! capturing subscriber at TRACE, and every line is searched for the PAN,
//! the TPAN, the cryptogram, the CVC and the API key.

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

#[tokio::test]
async fn no_secret_in_any_log_line() {
    let capture = Capture::default();
    let writer = capture.clone();
    // The product's own line format: the one that must not leak.
    let subscriber = tracing_subscriber::fmt()
        .event_format(tokenrelay::telemetry::JsonLine)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

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

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
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
