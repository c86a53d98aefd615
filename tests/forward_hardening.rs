#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! The forward path fails closed where a request or an answer is merely
//! unusual (issue 15): compressed or escaped echoes, the reserved-header
//! escape, template injections, amplification, methods, the dry-run switch,
//! malformed upstream framing, mutual TLS and the request id. Each refusal
//! checks status, classifier, `x-relay-error`, what the acquirer received
//! and that the reference was not spent.

mod support;

use std::sync::{Arc, Mutex};

use http::Response;
use reqwest::Method;
use serde_json::{json, Value};
use support::*;
use tokenrelay::config::ComplianceLevel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A SAQ-D server (PAN provisioning available) with redaction on.
async fn redacting_server(acq: &Acquirer) -> TestServer {
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule()];
    c.redact_responses = true;
    TestServer::start(c).await
}

/// A token with `metadata` (network_token_metadata) and a fresh reference.
async fn token_and_reference(s: &TestServer, metadata: Value) -> (String, String) {
    let t = s
        .provision_with(json!({
            "source": {"type": "pan", "number": VISA, "expiry_month": 12, "expiry_year": 2031},
            "metadata": metadata,
        }))
        .await;
    let id = t["id"].as_str().unwrap().to_owned();
    let r = s.reference(&id).await;
    (id, r)
}

/// The reference was not spent: a plain forward with it still succeeds.
async fn assert_unspent(s: &TestServer, acq: &Acquirer, id: &str, r: &str) {
    let before = acq.count();
    let resp = s.forward(id, r, &acq.url("/after")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the reference was spent by a refusal");
    assert_eq!(acq.count(), before + 1);
}

/// The reference was spent: a second use is 409.
async fn assert_spent(s: &TestServer, acq: &Acquirer, id: &str, r: &str) {
    let resp = s.forward(id, r, &acq.url("/again")).send().await.unwrap();
    assert_error(resp, 409, "reference_already_used").await;
}

fn echo_handler() -> Handler {
    Arc::new(|r: Recorded| {
        Box::pin(async move {
            let mut resp = full(200, r.body.clone());
            resp.headers_mut().insert(
                "x-echo-accept-encoding",
                r.headers
                    .get("accept-encoding")
                    .cloned()
                    .unwrap_or(http::HeaderValue::from_static("none")),
            );
            resp
        })
    })
}

#[tokio::test]
async fn redaction_asks_for_identity_and_refuses_compressed_answers() {
    // Asked: the merchant sends accept-encoding: gzip; the acquirer would
    // gzip for it, but is asked for identity, so the echo comes back plain
    // and masked.
    let acq = Acquirer::with(echo_handler()).await;
    let s = redacting_server(&acq).await;
    let (id, r) = token_and_reference(&s, json!({})).await;
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, br")
        .body(r#"{"pan":"<< number >>","cavv":"<< cryptogram >>"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-relay-error").is_none());
    assert_eq!(resp.headers()["x-echo-accept-encoding"], "identity");
    let sent: Value = serde_json::from_slice(&acq.last().body).unwrap();
    assert_eq!(acq.last().headers["accept-encoding"], "identity");
    let echoed = resp.text().await.unwrap();
    for secret in [&sent["pan"], &sent["cavv"]] {
        assert!(!echoed.contains(secret.as_str().unwrap()), "{echoed}");
    }
    assert!(echoed.contains("\"pan\":\"****************\""), "{echoed}");

    // Unasked: an acquirer that gzips although identity was asked for.
    let gz = Acquirer::with(Arc::new(|r: Recorded| {
        Box::pin(async move {
            let mut resp = full(200, r.body.clone());
            resp.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
            resp
        })
    }))
    .await;
    let s2 = redacting_server(&gz).await;
    let (id2, r2) = token_and_reference(&s2, json!({})).await;
    let resp = s2
        .forward(&id2, &r2, &gz.url("/pay"))
        .header("content-type", "application/json")
        .body(r#"{"pan":"<< number >>"}"#)
        .send()
        .await
        .unwrap();
    let e = assert_error(resp, 502, "response_not_redactable").await;
    assert!(!e.to_string().contains(
        serde_json::from_slice::<Value>(&gz.last().body).unwrap()["pan"]
            .as_str()
            .unwrap()
    ));
    assert_eq!(gz.count(), 1);
    assert_eq!(gz.last().headers["accept-encoding"], "identity");
    // The request reached the acquirer: the reference stays spent.
    assert_spent(&s2, &gz, &id2, &r2).await;

    // Without redaction the merchant's accept-encoding passes and a
    // compressed answer is relayed as it is.
    let plain = Acquirer::with(Arc::new(|_r: Recorded| {
        Box::pin(async move {
            let mut resp = full(200, "x");
            resp.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
            resp
        })
    }))
    .await;
    let s3 = server_for(&plain, ComplianceLevel::SaqD).await;
    let (id3, r3) = token_and_reference(&s3, json!({})).await;
    let resp = s3
        .forward(&id3, &r3, &plain.url("/pay"))
        .header("accept-encoding", "gzip")
        .body("n=<< number >>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert_eq!(plain.last().headers["accept-encoding"], "gzip");
    for s in [s, s2, s3] {
        s.stop().await;
    }
}

#[tokio::test]
async fn percent_encoded_and_json_escaped_echoes_are_masked() {
    // The acquirer echoes the cryptogram it received in every usual form.
    let acq = Acquirer::with(Arc::new(|r: Recorded| {
        Box::pin(async move {
            let form = String::from_utf8(r.body.to_vec()).unwrap();
            let sent = form.split("cavv=").nth(1).unwrap().to_owned(); // percent-encoded
            let raw = percent_decode(&sent);
            let slash = raw.replace('/', "\\/");
            let unicode: String = raw
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_string()
                    } else {
                        format!("\\u{:04x}", c as u32)
                    }
                })
                .collect();
            let lower = sent
                .replace("%2B", "%2b")
                .replace("%2F", "%2f")
                .replace("%3D", "%3d");
            let body = format!(
                r#"{{"form":"cavv={sent}","lower":"{lower}","json":"{slash}","u":"{unicode}","raw":"{raw}"}}"#
            );
            let mut resp = full(200, body);
            resp.headers_mut()
                .insert("x-echo", format!("cavv={sent}").parse().unwrap());
            resp
        })
    }))
    .await;
    let s = redacting_server(&acq).await;
    let (id, r) = token_and_reference(&s, json!({})).await;
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("cavv=<< cryptogram >>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let form = String::from_utf8(acq.last().body.to_vec()).unwrap();
    let raw = percent_decode(form.split("cavv=").nth(1).unwrap());
    assert_eq!(raw.len(), 28, "a TAVV was injected");
    let header = resp.headers()["x-echo"].to_str().unwrap().to_owned();
    assert!(header.starts_with("cavv=***"), "{header}");
    let body = resp.text().await.unwrap();
    let echoed: Value = serde_json::from_str(&body).unwrap();
    for field in ["form", "lower", "json", "u", "raw"] {
        let v = echoed[field].as_str().unwrap();
        assert!(
            !v.is_empty() && v.trim_start_matches("cavv=").chars().all(|c| c == '*'),
            "{field}: {v}"
        );
    }
    assert!(!body.contains(&raw[..12]), "{body}");
    s.stop().await;
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' && tail.len() >= 2 {
            out.push(u8::from_str_radix(std::str::from_utf8(&tail[..2]).unwrap(), 16).unwrap());
            rest = &tail[2..];
        } else {
            out.push(b);
            rest = tail;
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn the_header_escape_sends_only_tokenrelays_own_names() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let (id, r) = token_and_reference(&s, json!({})).await;
    for name in [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "expect",
        "proxy-authorization",
        // Not reserved: a merchant sends it directly, not through the escape.
        "authorization",
    ] {
        let resp = s
            .forward(&id, &r, &acq.url("/pay"))
            .header("x-relay-header-name", name)
            .header("x-relay-header-value", "5")
            .body("abcdefghij")
            .send()
            .await
            .unwrap();
        let e = assert_error(resp, 400, "header_not_allowed").await;
        assert!(e["message"].as_str().unwrap().contains(name), "{e}");
    }
    assert_eq!(acq.count(), 0);
    // tokenrelay's own name still goes through the escape.
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("x-relay-header-name", "x-api-key")
        .header("x-relay-header-value", "acquirer-key")
        .body("abcdefghij")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = acq.last();
    assert_eq!(got.headers["x-api-key"], "acquirer-key");
    // HTTP/2 to the acquirer: the authority is the URL's, no host header.
    assert_eq!(got.version, http::Version::HTTP_2);
    assert!(!got.headers.contains_key("host"));
    assert_eq!(got.body.as_ref(), b"abcdefghij");
    assert_spent(&s, &acq, &id, &r).await;

    // Hop-by-hop headers sent directly are this hop's: they never cross.
    let r = s.reference(&id).await;
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("te", "trailers")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("upgrade", "websocket")
        .header("proxy-connection", "keep-alive")
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = acq.last();
    for h in [
        "te",
        "x-hop",
        "upgrade",
        "proxy-connection",
        "transfer-encoding",
    ] {
        assert!(!got.headers.contains_key(h), "{h} crossed");
    }
    assert_eq!(got.headers["content-length"], "1");
    s.stop().await;
}

#[tokio::test]
async fn template_injections_are_escaped_or_refused() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let (id, r) = token_and_reference(
        &s,
        json!({
            "x": "1, \"amount\": 999999, \"z\": \"",
            "ctl": "a\u{0}b\u{7}c\u{1b}d",
            "dots": "..",
            "dot": "."
        }),
    )
    .await;

    // JSON: a placeholder outside a string literal is quoted.
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("content-type", "application/json")
        .body(r#"{"amount": 100, "note": << network_token_metadata.x >>}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got: Value = serde_json::from_slice(&acq.last().body).unwrap();
    assert_eq!(
        got,
        json!({"amount": 100, "note": "1, \"amount\": 999999, \"z\": \""})
    );

    // Raw (unknown content type): free text refused before anything is spent.
    for ct in [
        None,
        Some("text/plain"),
        Some("multipart/form-data; boundary=x"),
    ] {
        let r = s.reference(&id).await;
        let mut req = s
            .forward(&id, &r, &acq.url("/pay"))
            .body("amount=100&note=<< network_token_metadata.x >>");
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let before = acq.count();
        let e = assert_error(req.send().await.unwrap(), 422, "invalid_template").await;
        assert!(
            e["message"].as_str().unwrap().contains("content-type"),
            "{e}"
        );
        assert_eq!(acq.count(), before);
        assert_unspent(&s, &acq, &id, &r).await;
    }

    // XML: characters XML 1.0 forbids are dropped.
    let r = s.reference(&id).await;
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("content-type", "application/xml")
        .body("<a><< network_token_metadata.ctl >></a>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(acq.last().body.as_ref(), b"<a>abcd</a>");

    // Path: `.` and `..` values cannot act as dot segments.
    let r = s.reference(&id).await;
    let resp = s
        .forward(
            &id,
            &r,
            &acq.url("/v1/<< network_token_metadata.dots >>/<< network_token_metadata.dot >>/pay"),
        )
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(acq.last().path_and_query, "/v1/%2E%2E/%2E/pay");
    s.stop().await;
}

#[tokio::test]
async fn amplification_is_refused_before_anything_is_spent() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let (id, r) = token_and_reference(&s, json!({"k": "v"})).await;
    // 1 MiB of map placeholders (the issue's 88.8 MB render).
    let body = "<<network_token_metadata>>".repeat(40_327);
    assert!(body.len() <= 1 << 20);
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let e = assert_error(resp, 413, "rendered_too_large").await;
    assert!(e["message"].as_str().unwrap().contains("4194304"), "{e}");
    assert_eq!(acq.count(), 0);
    assert_unspent(&s, &acq, &id, &r).await;

    // A lower bound in config refuses smaller renders too; the body limit
    // is unchanged.
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule()];
    c.max_body_bytes = 4096;
    c.max_rendered_bytes = 4096;
    let s2 = TestServer::start(c).await;
    let (id, r) = token_and_reference(&s2, json!({})).await;
    let resp = s2
        .forward(&id, &r, &acq.url("/pay"))
        .header("content-type", "application/json")
        .body(r#"{"m": << network_token_metadata >>}"#)
        .send()
        .await
        .unwrap();
    assert_error(resp, 413, "rendered_too_large").await;
    let resp = s2
        .forward(&id, &r, &acq.url("/pay"))
        .header("content-type", "application/json")
        .body(r#"{"n": "<< number >>"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    s.stop().await;
    s2.stop().await;
}

#[tokio::test]
async fn connect_trace_and_track_are_refused_before_anything_is_spent() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let (id, r) = token_and_reference(&s, json!({})).await;
    for m in ["TRACE", "TRACK", "QUERY", "PROPFIND"] {
        let resp = s
            .forward(&id, &r, &acq.url("/pay"))
            .header("content-type", "application/json")
            .body(r#"{"n":"<< number >>"}"#);
        let resp = resp.build().unwrap();
        let mut resp = resp;
        *resp.method_mut() = Method::from_bytes(m.as_bytes()).unwrap();
        let resp = s.http.execute(resp).await.unwrap();
        assert_eq!(
            resp.headers()["allow"],
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        );
        assert_error(resp, 405, "method_not_allowed").await;
    }
    // CONNECT, written by hand (clients send it to proxies in authority
    // form; here it names the forward route).
    let body = r#"{"n":"<< number >>"}"#;
    let raw = format!(
        "CONNECT /api/network/tokens/{id}/forward HTTP/1.1\r\nhost: {}\r\nx-api-key: {KEY}\r\n\
         x-cryptogram-reference: {r}\r\nx-destination-url: {}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        s.addr,
        acq.url("/pay"),
        body.len()
    );
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(raw.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 405"), "{head}");
    assert!(head.contains("x-relay-error: method_not_allowed"), "{head}");
    assert_eq!(acq.count(), 0);
    assert_unspent(&s, &acq, &id, &r).await;
    s.stop().await;
}

#[tokio::test]
async fn dry_run_is_true_or_false_only() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let (id, r) = token_and_reference(&s, json!({})).await;
    for v in ["1", "yes", "on", "", "t", "truee", "0", "no", "true,false"] {
        let resp = s
            .forward(&id, &r, &acq.url("/pay"))
            .header("x-relay-dry-run", v)
            .body("n=<< number >>")
            .send()
            .await
            .unwrap();
        let e = assert_error(resp, 400, "invalid_request").await;
        assert!(
            e["message"].as_str().unwrap().contains("x-relay-dry-run"),
            "{e}"
        );
    }
    // Twice, even if both say true.
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("x-relay-dry-run", "true")
        .header("x-relay-dry-run", "true")
        .body("")
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "invalid_request").await;
    assert_eq!(acq.count(), 0);
    // `TRUE` is a dry run: nothing sent, nothing spent.
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("x-relay-dry-run", "TRUE")
        .body("n=<< number >>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let dry: Value = resp.json().await.unwrap();
    assert_eq!(dry["body"], "n=***");
    assert_eq!(acq.count(), 0);
    // `false` is a real forward.
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("x-relay-dry-run", "false")
        .body("n=<< number >>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(acq.count(), 1);
    assert_spent(&s, &acq, &id, &r).await;
    s.stop().await;
}

/// A TLS acquirer that answers every connection with `response` verbatim
/// (HTTP/1.1 only), recording the request bytes.
async fn raw_acquirer(response: &'static [u8]) -> (Acquirer, Arc<Mutex<Vec<Vec<u8>>>>) {
    // Borrow the harness's PKI and rule from a stand-in acquirer; serve on
    // a listener of our own.
    let stand_in = Acquirer::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut sc = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        stand_in.pki.leaf.clone(),
        rustls::pki_types::PrivateKeyDer::Pkcs8(stand_in.pki.key_der.clone().into()),
    )
    .unwrap();
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let rec = rec.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                rec.lock().unwrap().push(got);
                let _ = tls.write_all(response).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let mut acq = stand_in;
    acq.addr = addr;
    (acq, seen)
}

#[tokio::test]
async fn an_answer_with_both_framing_headers_is_refused() {
    let (acq, seen) = raw_acquirer(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n",
    )
    .await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let (id, r) = token_and_reference(&s, json!({})).await;
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .body("n=<< number >>")
        .send()
        .await
        .unwrap();
    let e = assert_error(resp, 502, "invalid_upstream_response").await;
    assert!(
        e["message"].as_str().unwrap().contains("transfer-encoding"),
        "{e}"
    );
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    assert!(requests[0].starts_with(b"POST /pay HTTP/1.1\r\n"));
    // The request was sent: the reference stays spent.
    let resp = s.forward(&id, &r, &acq.url("/pay")).send().await.unwrap();
    assert_error(resp, 409, "reference_already_used").await;
    s.stop().await;
}

#[tokio::test]
async fn the_acquirers_request_id_passes_and_ours_is_x_relay_request_id() {
    let acq = Acquirer::with(Arc::new(|_r: Recorded| {
        Box::pin(async move {
            let mut resp: Response<AcqBody> = full(200, "{}");
            resp.headers_mut()
                .insert("x-request-id", "acq-7f3a".parse().unwrap());
            resp.headers_mut()
                .insert("x-relay-request-id", "forged".parse().unwrap());
            resp
        })
    }))
    .await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let (id, r) = token_and_reference(&s, json!({})).await;
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("x-request-id", "merchant-42")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "acq-7f3a");
    assert_eq!(resp.headers()["x-relay-request-id"], "merchant-42");
    // The merchant's id reaches the acquirer.
    assert_eq!(acq.last().headers["x-request-id"], "merchant-42");
    // tokenrelay's own answers carry ours under both names.
    let resp = s
        .forward(&id, &r, &acq.url("/pay"))
        .header("x-request-id", "merchant-43")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "merchant-43");
    assert_eq!(resp.headers()["x-relay-request-id"], "merchant-43");
    assert_error(resp, 409, "reference_already_used").await;
    s.stop().await;
}

/// A TLS acquirer that requires a client certificate signed by its own
/// client CA; answers 200 and records the request.
struct MtlsAcquirer {
    port: u16,
    received: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

async fn mtls_acquirer() -> MtlsAcquirer {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |san: Option<SanType>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = san.into_iter().collect();
        (p.signed_by(&key, &ca, &ca_key).unwrap(), key)
    };
    let (server, server_key) = leaf(Some(SanType::IpAddress("127.0.0.1".parse().unwrap())));
    let (client, client_key) = leaf(Some(SanType::DnsName("merchant".try_into().unwrap())));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("client.pem"), client.pem()).unwrap();
    std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let rec = received.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let rec = rec.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let rec = rec.clone();
                        async move {
                            rec.lock().unwrap().push(req.uri().path().to_owned());
                            Ok::<_, std::convert::Infallible>(full(200, r#"{"approved":true}"#))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    MtlsAcquirer {
        port,
        received,
        dir,
    }
}

impl MtlsAcquirer {
    fn rule(&self, with_cert: bool) -> tokenrelay::config::DestinationRule {
        let p = |f: &str| self.dir.path().join(f);
        tokenrelay::config::DestinationRule {
            host: tokenrelay::config::HostPattern::Exact("127.0.0.1".into()),
            port: self.port,
            scheme: tokenrelay::config::DestScheme::Https,
            allow_private: true,
            ca_file: Some(p("ca.pem")),
            client_cert: with_cert.then(|| p("client.pem")),
            client_key: with_cert.then(|| p("client.key")),
        }
    }
}

#[tokio::test]
async fn mutual_tls_with_the_configured_pair_and_without_it() {
    let acq = mtls_acquirer().await;
    let url = format!("https://127.0.0.1:{}/pay", acq.port);
    for with_cert in [true, false] {
        let mut c = config(ComplianceLevel::SaqD);
        c.destinations = vec![acq.rule(with_cert)];
        let s = TestServer::start(c).await;
        let (id, r) = token_and_reference(&s, json!({})).await;
        let before = acq.received.lock().unwrap().len();
        let resp = s
            .forward(&id, &r, &url)
            .body("n=<< number >>")
            .send()
            .await
            .unwrap();
        if with_cert {
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.text().await.unwrap(), r#"{"approved":true}"#);
            assert_eq!(acq.received.lock().unwrap().len(), before + 1);
            let resp = s.forward(&id, &r, &url).send().await.unwrap();
            assert_error(resp, 409, "reference_already_used").await;
        } else {
            let e = assert_error(resp, 502, "destination_unreachable").await;
            assert!(e["message"].as_str().unwrap().contains("127.0.0.1"), "{e}");
            assert_eq!(
                acq.received.lock().unwrap().len(),
                before,
                "the acquirer served it"
            );
            // Restored: the same reference is usable again (a spent one
            // would be 409 before any connection), and it still is not served.
            let resp = s
                .forward(&id, &r, &url)
                .body("n=<< number >>")
                .send()
                .await
                .unwrap();
            assert_error(resp, 502, "destination_unreachable").await;
            assert_eq!(acq.received.lock().unwrap().len(), before);
        }
        s.stop().await;
    }
}

#[tokio::test]
async fn addresses_embedding_private_ipv4_are_refused_before_anything_is_spent() {
    let acq = Acquirer::start().await;
    let mut c = config(ComplianceLevel::SaqD);
    let mut rules = vec![acq.rule()];
    for host in [
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::1",
        "::7f00:1",
        "::ffff:0:7f00:1",
        "2001::1",
        "fec0::1",
        "64:ff9b::7f00:1",
    ] {
        rules.push(tokenrelay::config::DestinationRule {
            host: tokenrelay::config::HostPattern::Exact(host.into()),
            port: 443,
            scheme: tokenrelay::config::DestScheme::Https,
            allow_private: false,
            ca_file: None,
            client_cert: None,
            client_key: None,
        });
    }
    c.destinations = rules;
    let s = TestServer::start(c).await;
    let (id, r) = token_and_reference(&s, json!({})).await;
    for host in [
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::1",
        "::7f00:1",
        "::ffff:0:7f00:1",
        "2001::1",
        "fec0::1",
        "64:ff9b::7f00:1",
    ] {
        let resp = s
            .forward(&id, &r, &format!("https://[{host}]/pay"))
            .body("n=<< number >>")
            .send()
            .await
            .unwrap();
        assert_error(resp, 403, "destination_not_allowed").await;
    }
    assert_eq!(acq.count(), 0);
    assert_unspent(&s, &acq, &id, &r).await;
    s.stop().await;
}
