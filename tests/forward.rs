#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! The forward proxy against a real TLS acquirer (contract §6).

mod support;

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;
use tokenrelay::config::{ComplianceLevel, DestScheme, DestinationRule, HostPattern};
use tokenrelay::tsp::sandbox::{SandboxTsp, DEFAULT_SANDBOX_KEY};

const AUTH_BODY: &str = r#"{"card":{"number":"<< number >>","exp_month":"<< expiry_month | unwrap >>","exp_year":<< expiry_year | unwrap >>,"cryptogram":"<< cryptogram >>","eci":"<< eci >>"},"amount":"10.00"}"#;

/// A token whose TPAN is known (from an inline cryptogram, allowed at saq-d).
async fn token_with_tpan(s: &TestServer) -> (String, String) {
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap().to_owned();
    let inline = s.inline_cryptogram(&id).await;
    (id, inline["number"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn json_authorisation_reaches_the_acquirer_rendered_and_verifiable() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let (id, tpan) = token_with_tpan(&s).await;
    let r = s.reference(&id).await;
    let resp = s
        .forward(&id, &r, &acq.url("/v1/payments?x=1"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer acquirer-secret")
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-relay-error").is_none());
    let ms: u64 = resp.headers()["x-relay-upstream-duration-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms < 60_000);
    assert_eq!(resp.text().await.unwrap(), r#"{"approved":true}"#);

    let got = acq.last();
    assert_eq!(got.method, "POST");
    assert_eq!(got.path_and_query, "/v1/payments?x=1");
    let body: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["card"]["number"], tpan.as_str());
    let token: Value = s
        .req(Method::GET, &format!("/api/network/tokens/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["card"]["exp_month"], token["expiry_month"]);
    assert_eq!(body["card"]["exp_year"], token["expiry_year"]);
    assert_eq!(body["card"]["eci"], "07");
    let cryptogram = body["card"]["cryptogram"].as_str().unwrap();
    assert!(
        SandboxTsp::new(DEFAULT_SANDBOX_KEY)
            .verify_tavv(&tpan, Some("10.00"), cryptogram)
            .is_some(),
        "the acquirer got a genuine sandbox cryptogram"
    );
    // Headers: the merchant's Authorization passes; tokenrelay's do not.
    assert_eq!(got.headers["authorization"], "Bearer acquirer-secret");
    for h in ["x-api-key", "x-cryptogram-reference", "x-destination-url"] {
        assert!(!got.headers.contains_key(h), "{h} leaked to the acquirer");
    }
    assert_eq!(
        got.headers["content-length"].to_str().unwrap(),
        got.body.len().to_string()
    );
    s.stop().await;
}

#[tokio::test]
async fn every_placeholder_in_json_form_xml_and_headers() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s
        .provision_with(json!({
            "source": {"type": "pan", "number": VISA, "expiry_month": 3, "expiry_year": 2031},
            "metadata": {"merchant_ref": "m-1"}
        }))
        .await;
    let id = t["id"].as_str().unwrap();

    // JSON: every name, unwrap for non-strings.
    let r = s.reference(id).await;
    let body = r#"{"n":"<< number >>","c":"<< cryptogram >>","d":<< dynamic_cvv | unwrap >>,"e":"<< eci >>","m":<< expiry_month | unwrap >>,"y":<< expiry_year | unwrap >>,"t":"<< type >>","md":<< metadata | unwrap >>,"sr":"<< scheme_reference >>","sm":<< scheme_metadata | unwrap >>,"smk":"<< scheme_metadata.token_service >>","st":"<< status >>","db":<< supports_device_binding | unwrap >>,"id":"<< network_token_id >>","tt":"<< network_token_type >>","ntm":<< network_token_metadata | unwrap >>,"ntmk":"<< network_token_metadata.merchant_ref >>"}"#;
    let resp = s
        .forward(id, &r, &acq.url("/json"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got: Value = serde_json::from_slice(&acq.last().body).unwrap();
    assert_eq!(got["n"].as_str().unwrap().len(), 16);
    assert_eq!(got["c"].as_str().unwrap().len(), 28);
    assert_eq!(got["d"], Value::Null);
    assert_eq!(got["e"], "07");
    assert_eq!(got["m"], t["expiry_month"]);
    assert_eq!(got["y"], t["expiry_year"]);
    assert_eq!(got["t"], "tavv");
    assert_eq!(got["md"], json!({}));
    assert_eq!(got["sr"], t["scheme_reference"]);
    assert_eq!(got["sm"], t["scheme_metadata"]);
    assert_eq!(got["smk"], "sandbox");
    assert_eq!(got["st"], "active");
    assert_eq!(got["db"], true);
    assert_eq!(got["id"], t["id"]);
    assert_eq!(got["tt"], "vts");
    assert_eq!(got["ntm"], json!({"merchant_ref": "m-1"}));
    assert_eq!(got["ntmk"], "m-1");

    // Form: percent-encoded.
    let r = s.reference(id).await;
    let resp = s.forward(id, &r, &acq.url("/form"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("pan=<< number >>&cavv=<< cryptogram >>&ref=<< network_token_metadata.merchant_ref >>&x=a+b%20")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let form = String::from_utf8(acq.last().body.to_vec()).unwrap();
    assert!(form.ends_with("&ref=m-1&x=a+b%20"), "{form}");
    let cavv = form
        .split("cavv=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    assert!(
        !cavv.contains('+') && !cavv.contains('/') && !cavv.contains('='),
        "{cavv}"
    );

    // XML: entity-escaped; literal bytes untouched.
    let r = s.reference(id).await;
    let resp = s.forward(id, &r, &acq.url("/xml"))
        .header("content-type", "application/xml")
        .body("<?xml version=\"1.0\"?><auth><pan><< number >></pan><sm><< scheme_metadata >></sm></auth>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let xml = String::from_utf8(acq.last().body.to_vec()).unwrap();
    assert!(
        xml.starts_with("<?xml version=\"1.0\"?><auth><pan>4"),
        "{xml}"
    );
    assert!(xml.contains("<sm>{&quot;"), "{xml}");

    // Headers.
    let r = s.reference(id).await;
    let resp = s
        .forward(id, &r, &acq.url("/hdr"))
        .header("x-card", "<< number | last4 >>")
        .header("x-eci", "<< eci >>")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = acq.last().headers;
    assert_eq!(h["x-card"].len(), 4);
    assert_eq!(h["x-eci"], "07");
    s.stop().await;
}

#[tokio::test]
async fn header_and_destination_classifiers() {
    let acq = Acquirer::start().await;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![
        acq.rule(),
        DestinationRule {
            host: HostPattern::Exact("localhost".into()),
            port: 443,
            scheme: DestScheme::Https,
            allow_private: false,
            ca_file: None,
            client_cert: None,
            client_key: None,
        },
    ];
    c.max_body_bytes = 1024;
    let s = TestServer::start(c).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let path = format!("/api/network/tokens/{id}/forward");

    let resp = s
        .req(Method::POST, &path)
        .header("x-destination-url", acq.url("/"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "missing_header").await;
    let resp = s
        .req(Method::POST, &path)
        .header("x-cryptogram-reference", &r)
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "missing_header").await;

    for bad in [
        "not a url",
        "ftp://127.0.0.1/x",
        "https://<< number >>/x",
        "https://user@127.0.0.1/",
    ] {
        let resp = s.forward(id, &r, bad).send().await.unwrap();
        assert_error(resp, 400, "invalid_destination").await;
    }
    for refused in [
        "https://api.elsewhere.example/pay".to_owned(),
        format!("http://127.0.0.1:{}/", acq.addr.port()),
        format!("https://127.0.0.1:{}/", acq.addr.port() ^ 1),
        // On the list by name, but resolves to loopback without allow_private.
        "https://localhost/pay".to_owned(),
    ] {
        let resp = s.forward(id, &r, &refused).send().await.unwrap();
        assert_error(resp, 403, "destination_not_allowed").await;
    }

    let resp = s
        .forward(id, &r, &acq.url("/"))
        .body(vec![b'a'; 1025])
        .send()
        .await
        .unwrap();
    assert_error(resp, 413, "body_too_large").await;

    for (body, needle) in [
        ("{\"n\":\"<< numbr >>\"}", "numbr"),
        ("{\"n\":\"<< number | upper >>\"}", "upper"),
        ("{\"n\":\"<< number \"}", "unclosed"),
    ] {
        let resp = s
            .forward(id, &r, &acq.url("/"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let e = assert_error(resp, 422, "invalid_template").await;
        assert!(e["message"].as_str().unwrap().contains(needle), "{e}");
    }
    // None of the refusals consumed the reference or reached the acquirer.
    assert_eq!(acq.count(), 0);
    let resp = s.forward(id, &r, &acq.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn reference_classifiers() {
    let acq = Acquirer::start().await;
    let mut c = config(ComplianceLevel::SaqA);
    // The default TTL (minutes): the forwards below take what they take on
    // a loaded machine; expiry has its own test.
    c.destinations = vec![acq.rule()];
    let s = TestServer::start(c).await;
    let a = seed_token(&s, VISA, tokenrelay::card::Brand::Visa).await;
    let b = seed_token(&s, VISA, tokenrelay::card::Brand::Visa).await;

    let resp = s
        .forward(&a, "cref_nonexistent", &acq.url("/"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "reference_not_found").await;

    // Bound to another token: 422 and not consumed.
    let r = s.reference(&a).await;
    let resp = s.forward(&b, &r, &acq.url("/")).send().await.unwrap();
    assert_error(resp, 422, "reference_token_mismatch").await;
    let resp = s.forward(&a, &r, &acq.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // Used.
    let resp = s.forward(&a, &r, &acq.url("/")).send().await.unwrap();
    assert_error(resp, 409, "reference_already_used").await;
    assert_eq!(acq.count(), 1);

    // Token deleted: its references die, the token is not active.
    let r = s.reference(&b).await;
    let del = s
        .req(Method::DELETE, &format!("/api/network/tokens/{b}"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    let resp = s.forward(&b, &r, &acq.url("/")).send().await.unwrap();
    assert_error(resp, 424, "token_not_active").await;
    assert_eq!(acq.count(), 1);
    s.stop().await;
}

/// Only a lower bound on time: the wait is longer than the TTL, so the
/// reference has expired however slow the machine is.
#[tokio::test]
async fn an_expired_reference_is_not_found_and_nothing_is_sent() {
    let acq = Acquirer::start().await;
    let mut c = config(ComplianceLevel::SaqA);
    c.destinations = vec![acq.rule()];
    c.reference_ttl = Duration::from_millis(200);
    let s = TestServer::start(c).await;
    let a = seed_token(&s, VISA, tokenrelay::card::Brand::Visa).await;
    let r = s.reference(&a).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resp = s.forward(&a, &r, &acq.url("/")).send().await.unwrap();
    assert_error(resp, 404, "reference_not_found").await;
    assert_eq!(acq.count(), 0);
    s.stop().await;
}

#[tokio::test]
async fn concurrent_forwards_with_one_reference_deliver_exactly_once() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap().to_owned();
    let r = s.reference(&id).await;
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let s = s.clone();
        let (id, r, url) = (id.clone(), r.clone(), acq.url("/pay"));
        tasks.push(tokio::spawn(async move {
            s.forward(&id, &r, &url)
                .body(AUTH_BODY)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut ok = 0;
    let mut conflict = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            409 => conflict += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, conflict), (1, 199));
    assert_eq!(acq.count(), 1);
}

#[tokio::test]
async fn connection_refused_restores_the_reference() {
    let acq = Acquirer::start().await;
    // A port bound but not listening: connecting is refused, and while the
    // socket is held nothing else can take the port.
    let dead = tokio::net::TcpSocket::new_v4().unwrap();
    dead.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    let mut dead_rule = acq.rule();
    dead_rule.port = dead_port;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule(), dead_rule];
    let s = TestServer::start(c).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let resp = s
        .forward(id, &r, &format!("https://127.0.0.1:{dead_port}/pay"))
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_error(resp, 502, "destination_unreachable").await;
    // Never attempted, so the same reference still pays.
    let resp = s
        .forward(id, &r, &acq.url("/pay"))
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(acq.count(), 1);
}

#[tokio::test]
async fn tls_failure_restores_the_reference() {
    let acq = Acquirer::start().await;
    let mut untrusted = acq.rule();
    untrusted.ca_file = None; // the test CA is not trusted without it
    untrusted.host = HostPattern::Exact("localhost".into());
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule(), untrusted];
    let s = TestServer::start(c).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let resp = s
        .forward(
            id,
            &r,
            &format!("https://localhost:{}/pay", acq.addr.port()),
        )
        .send()
        .await
        .unwrap();
    assert_error(resp, 502, "destination_unreachable").await;
    assert_eq!(acq.count(), 0);
    let resp = s.forward(id, &r, &acq.url("/pay")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// A TLS "acquirer" that reads the request head and hangs up without an
/// answer: the request left, so the reference must stay consumed.
async fn hang_up_acquirer() -> (
    std::net::SocketAddr,
    Pki,
    Arc<std::sync::atomic::AtomicUsize>,
) {
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
    let heads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
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
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
            }
            drop(tls);
        }
    });
    (addr, pki, heads)
}

#[tokio::test]
async fn a_connection_lost_after_sending_is_destination_failed_and_stays_consumed() {
    let (addr, pki, heads) = hang_up_acquirer().await;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![DestinationRule {
        host: HostPattern::Exact("127.0.0.1".into()),
        port: addr.port(),
        scheme: DestScheme::Https,
        allow_private: true,
        ca_file: Some(pki.ca_file.clone()),
        client_cert: None,
        client_key: None,
    }];
    let s = TestServer::start(c).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let url = format!("https://127.0.0.1:{}/pay", addr.port());
    let resp = s
        .forward(id, &r, &url)
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_error(resp, 502, "destination_failed").await;
    assert!(
        heads.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the request head reached the acquirer"
    );
    let resp = s
        .forward(id, &r, &url)
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_error(resp, 409, "reference_already_used").await;
}

#[tokio::test]
async fn response_timeout_is_504_and_the_reference_stays_consumed() {
    // `/warm` answers at once; anything else is never answered, so the
    // timeout fires however slow the machine is.
    let acq = Acquirer::with(Arc::new(|r| {
        Box::pin(async move {
            if r.path_and_query != "/warm" {
                std::future::pending::<()>().await;
            }
            full(200, "warm")
        })
    }))
    .await;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule()];
    c.upstream.response_timeout = Duration::from_millis(300);
    // Not what is tested: a handshake may take long on a loaded machine,
    // and the first forward leaves a pooled connection for the timed one.
    c.upstream.connect_timeout = Duration::from_secs(5);
    let s = TestServer::start(c).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let warm = s.reference(id).await;
    let resp = s
        .forward(id, &warm, &acq.url("/warm"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = s.reference(id).await;
    let resp = s.forward(id, &r, &acq.url("/slow")).send().await.unwrap();
    assert_error(resp, 504, "destination_timeout").await;
    assert_eq!(acq.count(), 2, "the request was sent");
    let resp = s.forward(id, &r, &acq.url("/slow")).send().await.unwrap();
    assert_error(resp, 409, "reference_already_used").await;
}

/// An acquirer that accepts TCP connections and never says a word: the TLS
/// handshake cannot finish, so `connect_timeout` fires however fast or slow
/// the machine is. Returns its port; the connections are held open.
async fn black_hole() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    (port, task)
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_504_and_restores_the_reference() {
    let acq = Acquirer::start().await;
    let (hole_port, hole) = black_hole().await;
    let mut hole_rule = acq.rule();
    hole_rule.port = hole_port;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule(), hole_rule];
    c.upstream.connect_timeout = Duration::from_millis(300);
    let s = TestServer::start(c).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let resp = s
        .forward(id, &r, &format!("https://127.0.0.1:{hole_port}/pay"))
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_error(resp, 504, "destination_timeout").await;
    // Nothing was sent, so the same reference still pays.
    let resp = s
        .forward(id, &r, &acq.url("/pay"))
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(acq.count(), 1);
    hole.abort();
}

#[tokio::test]
async fn acquirer_errors_and_redirects_pass_through_unchanged() {
    let acq = Acquirer::with(Arc::new(|r| {
        Box::pin(async move {
            match r.path_and_query.as_str() {
                "/decline" => {
                    let mut resp = full(402, r#"{"declined":"insufficient funds"}"#);
                    // An acquirer cannot pass itself off as tokenrelay.
                    resp.headers_mut()
                        .insert("x-relay-error", "token_not_active".parse().unwrap());
                    resp
                }
                "/broken" => full(503, "upstream maintenance"),
                _ => {
                    let mut resp = full(302, "");
                    resp.headers_mut()
                        .insert("location", "https://elsewhere.example/".parse().unwrap());
                    resp
                }
            }
        })
    }))
    .await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    for (path, status, body) in [
        ("/decline", 402, r#"{"declined":"insufficient funds"}"#),
        ("/broken", 503, "upstream maintenance"),
        ("/redirect", 302, ""),
    ] {
        let r = s.reference(id).await;
        let resp = s.forward(id, &r, &acq.url(path)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status);
        assert!(resp.headers().get("x-relay-error").is_none());
        assert!(resp.headers().contains_key("x-relay-upstream-duration-ms"));
        if status == 302 {
            assert_eq!(resp.headers()["location"], "https://elsewhere.example/");
        }
        assert_eq!(resp.text().await.unwrap(), body);
    }
    assert_eq!(acq.count(), 3, "the redirect was not followed");
}

#[tokio::test]
async fn large_response_streams_before_the_acquirer_finishes() {
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    const CHUNK: usize = 1 << 20;
    let acq = Acquirer::with(Arc::new(move |_r| {
        let g = g.clone();
        Box::pin(async move {
            // First 8 MiB, then wait until the client has seen bytes, then
            // 92 MiB more: 100 MiB that tokenrelay must not buffer.
            let stream = futures_util::stream::unfold(0usize, move |i| {
                let g = g.clone();
                async move {
                    if i == 100 {
                        return None;
                    }
                    if i == 8 {
                        g.notified().await;
                    }
                    Some((
                        Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from(
                            vec![b'x'; CHUNK],
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
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let resp = s.forward(id, &r, &acq.url("/big")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut total = 0usize;
    let mut released = false;
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len();
        if !released && total > 0 {
            // Bytes arrived while the acquirer is still holding 92 MiB back:
            // the relay streams.
            gate.notify_one();
            released = true;
        }
    }
    assert_eq!(total, 100 * CHUNK);
}

#[tokio::test]
async fn http2_is_negotiated_by_alpn() {
    let acq = Acquirer::start().await;
    let s = server_for(&acq, ComplianceLevel::SaqD).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    let resp = s.forward(id, &r, &acq.url("/h2")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(acq.last().version, http::Version::HTTP_2);
}
