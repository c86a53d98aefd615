#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Forward, beyond the anchors: dry run, response redaction, format
//! filters, placeholders in the destination URL, the reserved-header escape.

mod support;

use std::sync::Arc;

use serde_json::{json, Value};
use support::*;
use tokenrelay::config::ComplianceLevel;

/// The TPAN of a token, read through the library (tests may; merchants can't).
async fn tpan_of(s: &TestServer, id: &str) -> String {
    let t = s
        .state
        .tokens
        .get(tokenrelay::vault::TokenId::parse(id).unwrap())
        .await
        .unwrap()
        .unwrap();
    t.tpan.expose().to_owned()
}

#[tokio::test]
async fn dry_run_checks_everything_and_spends_nothing() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let tpan = tpan_of(&s, id).await;
    let r = s.reference(id).await;
    let body = r#"{"pan":"<< number >>","c":"<< cryptogram >>","m":"<< expiry_month | unwrap >>"}"#;
    let resp = s
        .forward(id, &r, &acq.url("/v1/<< number | last4 >>/pay?e=<< eci >>"))
        .header("x-relay-dry-run", "true")
        .header("content-type", "application/json")
        .header("x-card", "<< number >>")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-relay-error").is_none());
    let text = resp.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["method"], "POST");
    assert!(
        v["url"].as_str().unwrap().starts_with(&acq.url("/v1/")),
        "{v}"
    );
    assert!(v["headers"]["x-card"].is_string());
    assert!(v["headers"].get("x-api-key").is_none());
    assert!(v["body"].as_str().unwrap().starts_with("{\"pan\":\""));
    for secret in [tpan.as_str(), &tpan[tpan.len() - 4..]] {
        assert!(
            !text.contains(secret),
            "dry run output shows an injected value"
        );
    }
    // Every injected value is masked, the ECI too.
    assert!(
        v["url"].as_str().unwrap().ends_with("/pay?e=%2A%2A%2A"),
        "{v}"
    );
    assert_eq!(acq.count(), 0, "nothing was sent");
    // The reference is still good.
    let resp = s
        .forward(id, &r, &acq.url("/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A dry run still refuses what a real forward would.
    let resp = s
        .forward(id, &r, &acq.url("/pay"))
        .header("x-relay-dry-run", "true")
        .send()
        .await
        .unwrap();
    assert_error(resp, 409, "reference_already_used").await;
    let resp = s
        .forward(id, &s.reference(id).await, &acq.url("/pay"))
        .header("x-relay-dry-run", "true")
        .body("<< nope >>")
        .send()
        .await
        .unwrap();
    assert_error(resp, 422, "invalid_template").await;
}

#[tokio::test]
async fn filters_and_unwrap_through_the_proxy() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let tpan = tpan_of(&s, id).await;
    let r = s.reference(id).await;
    let body = r#"{"mm":"<< expiry_month | mm >>","yy":"<< expiry_year | yy >>","yyyy":"<< expiry_year | yy | yyyy >>","l4":"<< number | last4 >>","f6":"<< number | first6 >>","m":"<< expiry_month | unwrap >>","b":"<< supports_device_binding | unwrap >>","n":"<< dynamic_cvv | unwrap >>","o":"<< scheme_metadata | unwrap >>"}"#;
    let resp = s
        .forward(id, &r, &acq.url("/f"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got: Value = serde_json::from_slice(&acq.last().body).unwrap();
    let month = t["expiry_month"].as_u64().unwrap();
    let year = t["expiry_year"].as_u64().unwrap();
    assert_eq!(got["mm"], format!("{month:02}"));
    assert_eq!(got["yy"], format!("{:02}", year % 100));
    assert_eq!(got["yyyy"], year.to_string());
    assert_eq!(got["l4"], &tpan[12..]);
    assert_eq!(got["f6"], &tpan[..6]);
    assert_eq!(got["m"], month);
    assert_eq!(got["b"], true);
    assert_eq!(got["n"], Value::Null);
    assert_eq!(got["o"], t["scheme_metadata"]);
}

#[tokio::test]
async fn destination_path_placeholders_are_percent_encoded() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s
        .provision_with(json!({
            "source": {"type": "pan", "number": VISA, "expiry_month": 12, "expiry_year": 2031},
            "metadata": {"ref": "a b/c?d"}
        }))
        .await;
    let id = t["id"].as_str().unwrap();
    let tpan = tpan_of(&s, id).await;
    let r = s.reference(id).await;
    let resp = s
        .forward(
            id,
            &r,
            &acq.url("/cards/<< number >>/<< network_token_metadata.ref >>?c=<< cryptogram >>&x=1"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let pq = acq.last().path_and_query;
    let (path, query) = pq.split_once('?').unwrap();
    assert_eq!(path, format!("/cards/{tpan}/a%20b%2Fc%3Fd"));
    let c = query
        .strip_prefix("c=")
        .unwrap()
        .strip_suffix("&x=1")
        .unwrap();
    assert_eq!(
        c.len(),
        28 + 2 * c.matches('%').count(),
        "base64 escaped: {c}"
    );
    assert!(!c.contains('+') && !c.contains('/') && !c.contains('='));
}

#[tokio::test]
async fn reserved_header_escape_sends_the_merchants_own_api_key() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let resp = s
        .forward(id, &r, &acq.url("/k"))
        .header("x-relay-header-name", "x-api-key")
        .header("x-relay-header-value", "acquirer-key-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = acq.last().headers;
    assert_eq!(h["x-api-key"], "acquirer-key-123");
    assert!(!h.contains_key("x-relay-header-name"));
    assert!(!h.contains_key("x-relay-header-value"));
    // Half of the pair is refused before anything is spent.
    let resp = s
        .forward(id, &s.reference(id).await, &acq.url("/k"))
        .header("x-relay-header-name", "x-api-key")
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "missing_header").await;
}

/// An acquirer that echoes the card number back: whole in a header and the
/// body, and split across chunk boundaries deep inside a 5 MB body.
async fn echoing_acquirer() -> Acquirer {
    use futures_util::stream;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    Acquirer::with(Arc::new(|r| {
        Box::pin(async move {
            let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let pan = body["pan"].as_str().unwrap_or("").to_owned();
            let (a, b) = pan.split_at(pan.len() / 2);
            let filler = vec![b'.'; 1 << 20];
            let mut chunks: Vec<bytes::Bytes> =
                vec![format!("{{\"echo\":\"{pan}\",\"pad\":\"").into()];
            for _ in 0..5 {
                chunks.push(bytes::Bytes::from(filler.clone()));
                chunks.push(a.to_owned().into());
                chunks.push(b.to_owned().into());
            }
            chunks.push("\"}".into());
            let frames = stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
            );
            let mut resp = http::Response::new(BodyExt::boxed(StreamBody::new(frames)));
            resp.headers_mut()
                .insert("x-echo-pan", pan.parse().unwrap());
            resp
        })
    }))
    .await
}

#[tokio::test]
async fn echoed_card_numbers_are_masked_at_saq_a() {
    let acq = echoing_acquirer().await;
    let s = server_for(&acq, ComplianceLevel::SaqA).await;
    let id = seed_token(&s, VISA, tokenrelay::card::Brand::Visa).await;
    let tpan = tpan_of(&s, &id).await;
    let r = s.reference(&id).await;
    let resp = s
        .forward(&id, &r, &acq.url("/echo"))
        .header("content-type", "application/json")
        .body(r#"{"pan":"<< number >>"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-echo-pan"], "*".repeat(16));
    let body = resp.bytes().await.unwrap();
    assert!(body.len() > 5 << 20);
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains(&tpan), "TPAN reached the SAQ-A merchant");
    assert!(text.starts_with(&format!("{{\"echo\":\"{}\"", "*".repeat(16))));
    assert_eq!(
        text.matches(&"*".repeat(16)).count(),
        6,
        "whole and split echoes all masked"
    );
}

#[tokio::test]
async fn redaction_is_off_by_default_above_saq_a() {
    let acq = echoing_acquirer().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let tpan = tpan_of(&s, id).await;
    let r = s.reference(id).await;
    let resp = s
        .forward(id, &r, &acq.url("/echo"))
        .header("content-type", "application/json")
        .body(r#"{"pan":"<< number >>"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-echo-pan"], tpan.as_str());
    let text = resp.text().await.unwrap();
    assert_eq!(text.matches(&tpan).count(), 6);
}
