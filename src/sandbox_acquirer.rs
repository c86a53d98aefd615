//! The sandbox acquirer: a TLS endpoint that behaves like a card acquirer
//! for the sandbox token service. Used by `tokenrelay demo`,
//! `tokenrelay sandbox-acquirer`, and tests.
//!
//! `POST /v1/authorizations` with a JSON body:
//!
//! ```json
//! {"amount": "10.00", "currency": "EUR",
//!  "card": {"number": "…", "expiry_month": 12, "expiry_year": 2029,
//!           "cryptogram": "…", "eci": "07"}}
//! ```
//!
//! Rules, in order:
//! - the card number must be Luhn-valid → else `declined`, `invalid_card`;
//! - a `cryptogram` must verify under the sandbox key for that number and
//!   amount → else `declined`, `invalid_cryptogram`; each cryptogram
//!   approves once → a replay is `declined`, `cryptogram_replayed` (as the
//!   schemes decline reuse);
//! - decline triggers: amount `51.00` → `declined`, `insufficient_funds`
//!   (any card); amount `62.00` on a network-token payment (one with a
//!   cryptogram) → `declined`, `token_declined`, while the same amount on
//!   the card number (FPAN) approves — the case FPAN fallback exists for;
//! - otherwise `approved` with a six-digit authorisation code.
//!
//! The same rules answer the formats of the fixture routes
//! (`fixtures/routes/`), each at its API's path and in its API's shape:
//! `POST /v71/payments` (Adyen Checkout v71, `paymentMethod.type =
//! networkToken`, TAVV in `mpiData.tokenAuthenticationVerificationValue`),
//! `POST /payments` (Checkout.com, `source.type = network_token`),
//! `POST /api/transact.php` (NMI Payment API, form-encoded, `ccnumber`,
//! `cavv`) and `POST /jsp/merchant/xml/paymentService.jsp` (Worldpay XML
//! 1.4, `EMVCO_TOKEN-SSL`). Amounts in minor units are read with their
//! exponent (2 unless the XML says otherwise), so the cryptogram check binds
//! the same decimal amount the cryptogram was minted for. Each answer echoes
//! the merchant's reference.
//!
//! The acquirer keeps the last request it received, masked, for the demo.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::card::{luhn_valid, CardNumber};
use crate::crypto::random_digits;
use crate::tsp::sandbox::SandboxTsp;

/// A generated CA and a server certificate for `localhost` / `127.0.0.1`.
pub struct SandboxPki {
    /// The CA certificate, PEM: the trust anchor to configure.
    pub ca_pem: String,
    /// The server's TLS configuration.
    pub server_config: Arc<rustls::ServerConfig>,
}

/// Generates a fresh CA and server certificate.
pub fn generate_pki() -> Result<SandboxPki, Box<dyn std::error::Error + Send + Sync>> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(Vec::<String>::new())?;
    leaf_params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
    ];
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(leaf.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(SandboxPki {
        ca_pem: ca.pem(),
        server_config: Arc::new(config),
    })
}

struct Shared {
    tsp: SandboxTsp,
    seen: Mutex<HashSet<String>>,
    last: Mutex<Option<Value>>,
}

/// A running sandbox acquirer.
#[derive(Clone)]
pub struct SandboxAcquirer {
    shared: Arc<Shared>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl SandboxAcquirer {
    /// Serves on `listener` with `tls` until the task is dropped; `key` is
    /// the sandbox token service key.
    pub fn spawn(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        key: [u8; 32],
    ) -> std::io::Result<SandboxAcquirer> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            tsp: SandboxTsp::new(key),
            seen: Mutex::new(HashSet::new()),
            last: Mutex::new(None),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(&s, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(SandboxAcquirer { shared, addr })
    }

    /// The last authorisation received, with card values masked.
    pub fn last_received_masked(&self) -> Option<Value> {
        self.shared.last.lock().ok().and_then(|l| l.clone())
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn decline(reason: &str) -> Response<Full<Bytes>> {
    reply(
        StatusCode::PAYMENT_REQUIRED,
        json!({"status": "declined", "reason": reason}),
    )
}

/// Replaces card values with masks (first6…last4 for numbers, `***` for
/// cryptograms and codes).
pub fn mask(mut v: Value) -> Value {
    if let Some(card) = v.get_mut("card").and_then(Value::as_object_mut) {
        for (k, val) in card.iter_mut() {
            match (k.as_str(), val.as_str()) {
                ("number", Some(n)) => {
                    *val = Value::String(
                        CardNumber::parse(n).map_or_else(|| "***".to_owned(), |c| c.to_string()),
                    )
                }
                ("cryptogram" | "security_code" | "cvc" | "dynamic_cvv", Some(_)) => {
                    *val = Value::String("***".into())
                }
                _ => {}
            }
        }
    }
    v
}

/// One authorisation request, whatever format it came in.
struct Authorisation {
    /// The card or token number.
    number: String,
    /// The TAVV, for a network-token payment.
    cryptogram: Option<String>,
    /// The amount as a decimal string (`"10.00"`), as the cryptogram binds it.
    amount: String,
    /// The merchant's own reference, echoed in the answer.
    reference: Option<String>,
}

/// The acquirer's decision.
enum Decision {
    Approved(String),
    Declined(&'static str),
}

/// A request body in a format the acquirer does not accept.
struct BadRequest(&'static str);

/// The formats the acquirer speaks, by path: its own, and those of the
/// fixture routes under `fixtures/routes/`.
#[derive(Clone, Copy)]
enum Format {
    /// `POST /v1/authorizations`: the sandbox's own JSON.
    Sandbox,
    /// `POST /v71/payments`: Adyen Checkout API v71, `networkToken` method.
    Adyen,
    /// `POST /payments`: Checkout.com, `network_token` source.
    Checkout,
    /// `POST /api/transact.php`: NMI Payment API, form-encoded.
    Nmi,
    /// `POST /jsp/merchant/xml/paymentService.jsp`: Worldpay XML 1.4.
    WorldpayXml,
}

impl Format {
    fn for_path(path: &str) -> Option<Format> {
        Some(match path {
            "/v1/authorizations" => Format::Sandbox,
            "/v71/payments" => Format::Adyen,
            "/payments" => Format::Checkout,
            "/api/transact.php" => Format::Nmi,
            "/jsp/merchant/xml/paymentService.jsp" => Format::WorldpayXml,
            _ => return None,
        })
    }
}

/// `"1000"` minor units with exponent 2 → `"10.00"`.
fn decimal(minor: &str, exponent: usize) -> Option<String> {
    if minor.is_empty() || !minor.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let padded = format!("{minor:0>width$}", width = exponent + 1);
    let (units, fraction) = padded.split_at(padded.len() - exponent);
    let units = match units.trim_start_matches('0') {
        "" => "0",
        u => u,
    };
    Some(if exponent == 0 {
        units.to_owned()
    } else {
        format!("{units}.{fraction}")
    })
}

fn json_amount(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn parse(format: Format, body: &[u8]) -> Result<Authorisation, BadRequest> {
    let json =
        || serde_json::from_slice::<Value>(body).map_err(|_| BadRequest("body must be JSON"));
    let text = |v: &Value| v.as_str().map(str::to_owned);
    match format {
        Format::Sandbox => {
            let v = json()?;
            Ok(Authorisation {
                number: text(&v["card"]["number"]).unwrap_or_default(),
                cryptogram: text(&v["card"]["cryptogram"]),
                amount: json_amount(&v["amount"]).ok_or(BadRequest("amount is required"))?,
                reference: None,
            })
        }
        Format::Adyen => {
            let v = json()?;
            // A network token carries its TAVV; a card ("scheme") none.
            let cryptogram = match v["paymentMethod"]["type"].as_str() {
                Some("networkToken") => text(&v["mpiData"]["tokenAuthenticationVerificationValue"]),
                Some("scheme") => None,
                _ => {
                    return Err(BadRequest(
                        "paymentMethod.type must be networkToken or scheme",
                    ))
                }
            };
            let minor =
                json_amount(&v["amount"]["value"]).ok_or(BadRequest("amount.value is required"))?;
            Ok(Authorisation {
                number: text(&v["paymentMethod"]["number"]).unwrap_or_default(),
                cryptogram,
                amount: decimal(&minor, 2).ok_or(BadRequest("amount.value must be minor units"))?,
                reference: text(&v["reference"]),
            })
        }
        Format::Checkout => {
            let v = json()?;
            if v["source"]["type"] != "network_token" {
                return Err(BadRequest("source.type must be network_token"));
            }
            let minor = json_amount(&v["amount"]).ok_or(BadRequest("amount is required"))?;
            Ok(Authorisation {
                number: text(&v["source"]["token"]).unwrap_or_default(),
                cryptogram: text(&v["source"]["cryptogram"]),
                amount: decimal(&minor, 2).ok_or(BadRequest("amount must be minor units"))?,
                reference: text(&v["reference"]),
            })
        }
        Format::Nmi => {
            let mut a = Authorisation {
                number: String::new(),
                cryptogram: None,
                amount: String::new(),
                reference: None,
            };
            for (k, v) in form_urlencoded::parse(body) {
                match &*k {
                    "ccnumber" => a.number = v.into_owned(),
                    "cavv" => a.cryptogram = Some(v.into_owned()),
                    "amount" => a.amount = v.into_owned(),
                    "orderid" => a.reference = Some(v.into_owned()),
                    _ => {}
                }
            }
            if a.amount.is_empty() {
                return Err(BadRequest("amount is required"));
            }
            Ok(a)
        }
        Format::WorldpayXml => {
            let text =
                std::str::from_utf8(body).map_err(|_| BadRequest("body must be UTF-8 XML"))?;
            let opts = roxmltree::ParsingOptions {
                allow_dtd: true,
                ..roxmltree::ParsingOptions::default()
            };
            let doc = roxmltree::Document::parse_with_options(text, opts)
                .map_err(|_| BadRequest("body must be XML"))?;
            let find = |name: &str| doc.descendants().find(|n| n.has_tag_name(name));
            let token = find("EMVCO_TOKEN-SSL").ok_or(BadRequest("EMVCO_TOKEN-SSL is required"))?;
            let child = |name: &str| {
                token
                    .descendants()
                    .find(|n| n.has_tag_name(name))
                    .and_then(|n| n.text())
                    .map(str::to_owned)
            };
            let amount = find("amount").ok_or(BadRequest("amount is required"))?;
            let exponent = amount
                .attribute("exponent")
                .and_then(|e| e.parse().ok())
                .unwrap_or(2);
            let minor = amount.attribute("value").unwrap_or("");
            Ok(Authorisation {
                number: child("tokenNumber").unwrap_or_default(),
                cryptogram: child("cryptogram"),
                amount: decimal(minor, exponent)
                    .ok_or(BadRequest("amount value must be minor units"))?,
                reference: find("order")
                    .and_then(|o| o.attribute("orderCode"))
                    .map(str::to_owned),
            })
        }
    }
}

fn decide(s: &Shared, a: &Authorisation) -> Decision {
    if !luhn_valid(&a.number) {
        return Decision::Declined("invalid_card");
    }
    if let Some(cryptogram) = &a.cryptogram {
        if s.tsp
            .verify_tavv(&a.number, Some(&a.amount), cryptogram)
            .is_none()
        {
            return Decision::Declined("invalid_cryptogram");
        }
        let fresh = s
            .seen
            .lock()
            .map(|mut seen| seen.insert(cryptogram.clone()))
            .unwrap_or(false);
        if !fresh {
            return Decision::Declined("cryptogram_replayed");
        }
    }
    if a.amount == "51.00" {
        return Decision::Declined("insufficient_funds");
    }
    if a.amount == "62.00" && a.cryptogram.is_some() {
        return Decision::Declined("token_declined");
    }
    Decision::Approved(random_digits(6))
}

fn typed(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// The answer in the format's own shape.
fn answer(format: Format, a: &Authorisation, d: &Decision) -> Response<Full<Bytes>> {
    let reference = a.reference.as_deref().unwrap_or("");
    match (format, d) {
        (Format::Sandbox, Decision::Approved(code)) => reply(
            StatusCode::OK,
            json!({"status": "approved", "authorization_code": code}),
        ),
        (Format::Sandbox, Decision::Declined(reason)) => decline(reason),
        (Format::Adyen, Decision::Approved(code)) => reply(
            StatusCode::OK,
            json!({"resultCode": "Authorised", "authCode": code, "merchantReference": reference,
                   "pspReference": random_digits(16)}),
        ),
        (Format::Adyen, Decision::Declined(reason)) => reply(
            StatusCode::OK,
            json!({"resultCode": "Refused", "refusalReason": reason, "merchantReference": reference}),
        ),
        (Format::Checkout, Decision::Approved(code)) => reply(
            StatusCode::CREATED,
            json!({"approved": true, "status": "Authorized", "auth_code": code, "reference": reference}),
        ),
        (Format::Checkout, Decision::Declined(reason)) => reply(
            StatusCode::CREATED,
            json!({"approved": false, "status": "Declined", "response_summary": reason, "reference": reference}),
        ),
        (Format::Nmi, d) => {
            let (response, text, code) = match d {
                Decision::Approved(code) => ("1", "SUCCESS", code.as_str()),
                Decision::Declined(reason) => ("2", *reason, ""),
            };
            let body = form_urlencoded::Serializer::new(String::new())
                .append_pair("response", response)
                .append_pair("responsetext", text)
                .append_pair("authcode", code)
                .append_pair("orderid", reference)
                .finish();
            typed(StatusCode::OK, "application/x-www-form-urlencoded", body)
        }
        (Format::WorldpayXml, d) => {
            let event = match d {
                Decision::Approved(_) => "AUTHORISED".to_owned(),
                Decision::Declined(reason) => format!("REFUSED\" reason=\"{reason}"),
            };
            let mut order = Vec::new();
            crate::template::xml_escape(reference.as_bytes(), &mut order);
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<paymentService version=\"1.4\"><reply><orderStatus orderCode=\"{}\"><payment><lastEvent status=\"{event}\"/></payment></orderStatus></reply></paymentService>",
                String::from_utf8_lossy(&order)
            );
            typed(StatusCode::OK, "text/xml", body)
        }
    }
}

async fn handle(s: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let format = match Format::for_path(req.uri().path()) {
        Some(f) if req.method() == http::Method::POST => f,
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                json!({"error": "POST /v1/authorizations (or a fixture route's path)"}),
            )
        }
    };
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, json!({"error": "unreadable body"})),
    };
    let a = match parse(format, &body) {
        Ok(a) => a,
        Err(BadRequest(m)) => return reply(StatusCode::BAD_REQUEST, json!({"error": m})),
    };
    if let Ok(mut last) = s.last.lock() {
        *last = Some(match format {
            Format::Sandbox => serde_json::from_slice(&body)
                .map(mask)
                .unwrap_or(Value::Null),
            _ => mask(json!({"amount": a.amount, "reference": a.reference,
                             "card": {"number": a.number, "cryptogram": a.cryptogram}})),
        });
    }
    let d = decide(s, &a);
    answer(format, &a, &d)
}

#[cfg(test)]
mod tests {
    use super::decimal;

    #[test]
    fn minor_units_to_decimal() {
        assert_eq!(decimal("1000", 2).as_deref(), Some("10.00"));
        assert_eq!(decimal("5", 2).as_deref(), Some("0.05"));
        assert_eq!(decimal("6200", 2).as_deref(), Some("62.00"));
        assert_eq!(decimal("7", 0).as_deref(), Some("7"));
        assert_eq!(decimal("", 2), None);
        assert_eq!(decimal("1.5", 2), None);
    }
}
