//! `tokenrelay demo --browser`: the card typed into a real checkout page.
//!
//! Starts the [`Sandbox`] with tokenrelay at **SAQ-A** and, beside it on
//! 127.0.0.1, a small *merchant backend stand-in* that serves the example
//! page of `sdk/js/example/` (compiled in) and does what a merchant's server
//! does:
//!
//! | route | what the stand-in does |
//! |---|---|
//! | `GET /` | the checkout page; `/checkout.js`, `/tokenrelay.min.js`, `/tokenrelay.js` its scripts |
//! | `POST /checkout/session` | `POST /api/sessions` on tokenrelay, hands the public key to the page |
//! | `POST /checkout/pay` | `{session_id, data}` from the page → provisions a network token from the session, takes a cryptogram reference, forwards an authorisation to the sandbox acquirer; answers every step, masked |
//! | `GET /checkout/received` | every request body the stand-in received, so a person (or a test) can see it never held a card number |
//!
//! The stand-in holds the API key; the page never sees it. Nothing here is
//! for production: it binds loopback only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::{pretty, DemoError, Merchant, Sandbox};
use crate::config::ComplianceLevel;

const INDEX_HTML: &str = include_str!("../../sdk/js/example/index.html");
const CHECKOUT_JS: &str = include_str!("../../sdk/js/example/checkout.js");
const SDK_JS: &str = include_str!("../../sdk/js/tokenrelay.js");
const SDK_MIN_JS: &str = include_str!("../../sdk/js/tokenrelay.min.js");

/// The authorisation the stand-in forwards: placeholders, no card data.
const TEMPLATE: &str = r#"{"amount": "10.00", "currency": "EUR", "card": {"number": "<< number >>", "expiry_month": "<< expiry_month | unwrap >>", "expiry_year": "<< expiry_year | unwrap >>", "cryptogram": "<< cryptogram >>", "eci": "<< eci >>"}}"#;

/// One request the stand-in received, as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    /// Method and path.
    pub request: String,
    /// The body, verbatim.
    pub body: Bytes,
}

struct StandIn {
    sandbox_base: String,
    merchant: Merchant,
    acquirer_url: String,
    acquirer: crate::sandbox_acquirer::SandboxAcquirer,
    received: Mutex<Vec<Received>>,
    /// Echo each step on stdout (the CLI) or not (tests).
    print: bool,
}

/// A running checkout demo.
pub struct Checkout {
    /// The stand-in's address (the page is at `/`).
    pub addr: SocketAddr,
    /// tokenrelay's API, `http://127.0.0.1:<port>`.
    pub tokenrelay: String,
    shared: Arc<StandIn>,
    sandbox: Sandbox,
    task: tokio::task::JoinHandle<()>,
}

impl Checkout {
    /// Starts the sandbox (tokenrelay at SAQ-A) and the stand-in on
    /// `listen`, which must be a loopback address.
    pub async fn start(listen: SocketAddr, print: bool) -> Result<Checkout, DemoError> {
        if !listen.ip().is_loopback() {
            return Err("the demo's merchant stand-in binds a loopback address only".into());
        }
        let sandbox = Sandbox::start_at(ComplianceLevel::SaqA).await?;
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(StandIn {
            sandbox_base: sandbox.base.clone(),
            merchant: Merchant {
                client: Client::builder(TokioExecutor::new()).build_http(),
                base: sandbox.base.clone(),
                key: sandbox.key.clone(),
            },
            acquirer_url: format!(
                "https://127.0.0.1:{}/v1/authorizations",
                sandbox.acquirer.addr.port()
            ),
            acquirer: sandbox.acquirer.clone(),
            received: Mutex::new(Vec::new()),
            print,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(serve(&s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Checkout {
            addr,
            tokenrelay: shared.sandbox_base.clone(),
            shared,
            sandbox,
            task,
        })
    }

    /// The checkout page.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Every request the stand-in received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Stops the stand-in and the sandbox.
    pub async fn stop(self) {
        self.task.abort();
        self.sandbox.stop().await;
    }
}

/// Runs the browser demo until Ctrl-C; prints the URL and each step.
pub async fn run(listen: SocketAddr) -> Result<(), DemoError> {
    let checkout = Checkout::start(listen, true).await?;
    println!(
        "tokenrelay (compliance saq-a) on {}; sandbox acquirer on https://127.0.0.1:{}",
        checkout.tokenrelay,
        checkout.sandbox.acquirer.addr.port()
    );
    println!(
        "checkout page (merchant backend stand-in): {}",
        checkout.url()
    );
    println!("type a test card, e.g. 4111 1111 1111 1111, any future expiry; Ctrl-C stops.");
    tokio::signal::ctrl_c().await?;
    checkout.stop().await;
    Ok(())
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn json_reply(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", v.to_string())
}

async fn serve(s: &StandIn, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return json_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                &json!({"error": "too large"}),
            )
        }
    };
    let path = parts.uri.path().to_owned();
    if let Ok(mut r) = s.received.lock() {
        r.push(Received {
            request: format!("{} {path}", parts.method),
            body: body.clone(),
        });
    }
    let js = "text/javascript; charset=utf-8";
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/" | "/index.html") => {
            respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)
        }
        (&Method::GET, "/checkout.js") => respond(StatusCode::OK, js, CHECKOUT_JS),
        (&Method::GET, "/tokenrelay.js") => respond(StatusCode::OK, js, SDK_JS),
        (&Method::GET, "/tokenrelay.min.js") => respond(StatusCode::OK, js, SDK_MIN_JS),
        // Browsers ask; there is none.
        (&Method::GET, "/favicon.ico") => respond(StatusCode::NO_CONTENT, "image/x-icon", ""),
        (&Method::POST, "/checkout/session") => match session(s).await {
            Ok(v) => json_reply(StatusCode::OK, &v),
            Err(e) => json_reply(StatusCode::BAD_GATEWAY, &json!({"error": e.to_string()})),
        },
        (&Method::POST, "/checkout/pay") => {
            let v = pay(s, &body).await;
            json_reply(StatusCode::OK, &v)
        }
        (&Method::GET, "/checkout/received") => {
            let all: Vec<Value> = s
                .received
                .lock()
                .map(|r| {
                    r.iter()
                        .map(|x| json!({"request": x.request, "body": String::from_utf8_lossy(&x.body)}))
                        .collect()
                })
                .unwrap_or_default();
            json_reply(StatusCode::OK, &Value::Array(all))
        }
        _ => json_reply(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

fn say(s: &StandIn, step: &str, detail: &str) {
    if s.print {
        super::show(step, detail);
    }
}

async fn session(s: &StandIn) -> Result<Value, DemoError> {
    let (status, v) = s
        .merchant
        .call(Method::POST, "/api/sessions", &[], String::new())
        .await?;
    if status != 201 {
        return Err(format!("POST /api/sessions answered {status}: {v}").into());
    }
    say(
        s,
        "POST /api/sessions → 201 (the page gets the public key)",
        &pretty(&v),
    );
    Ok(v)
}

/// A step for the page: what happened, masked.
fn step(name: &str, title: &str, detail: String) -> Value {
    json!({"step": name, "title": title, "detail": detail})
}

async fn pay(s: &StandIn, body: &[u8]) -> Value {
    let mut steps = Vec::new();
    let outcome = pay_steps(s, body, &mut steps).await;
    let (approved, error) = match outcome {
        Ok(approved) => (approved, None),
        Err(e) => (false, Some(e.to_string())),
    };
    json!({"approved": approved, "steps": steps, "error": error})
}

async fn pay_steps(s: &StandIn, body: &[u8], steps: &mut Vec<Value>) -> Result<bool, DemoError> {
    let req: Value = serde_json::from_slice(body).map_err(|_| "the page sent no JSON")?;
    let (Some(session_id), Some(data)) = (req["session_id"].as_str(), req["data"].as_str()) else {
        return Err("the page must send session_id and data".into());
    };
    say(
        s,
        "the merchant backend received (ciphertext only)",
        &format!(
            "session_id {session_id}\ndata {}… ({} characters)",
            &data[..data.len().min(32)],
            data.len()
        ),
    );

    // Provision from the session.
    let (status, token) = s
        .merchant
        .call(
            Method::POST,
            "/api/network/tokens",
            &[],
            json!({"source": {"type": "session", "id": session_id, "data": data}}).to_string(),
        )
        .await?;
    let shown = format!(
        "POST /api/network/tokens (source: session) → {status}\n{}",
        pretty(&token)
    );
    say(s, "provisioning", &shown);
    steps.push(step(
        "provision",
        "Network token provisioned from the session",
        shown,
    ));
    let Some(id) = token["id"].as_str().filter(|_| status == 201) else {
        return Err(format!("provisioning answered {status}").into());
    };

    // A cryptogram reference.
    let amount = "10.00";
    let (status, reference) = s
        .merchant
        .call(
            Method::POST,
            &format!("/api/network/tokens/{id}/cryptograms"),
            &[],
            json!({"type": "ecom", "mode": "reference", "amount": amount, "currency": "EUR"})
                .to_string(),
        )
        .await?;
    let Some(cref) = reference["cryptogram_reference"]
        .as_str()
        .filter(|_| status == 201)
    else {
        let shown = format!("→ {status}\n{}", pretty(&reference));
        steps.push(step("reference", "Cryptogram reference", shown));
        return Err(format!("the cryptogram request answered {status}").into());
    };
    let cref = cref.to_owned();
    let mut masked = reference.clone();
    masked["cryptogram_reference"] = Value::String(format!("{}…", &cref[..cref.len().min(11)]));
    let shown = format!(
        "POST /api/network/tokens/{{id}}/cryptograms (mode: reference) → {status}\n{}",
        pretty(&masked)
    );
    say(s, "reference", &shown);
    steps.push(step(
        "reference",
        "Cryptogram reference (single use)",
        shown,
    ));

    // The forward.
    let headers = [
        ("x-cryptogram-reference", cref.as_str()),
        ("x-destination-url", s.acquirer_url.as_str()),
    ];
    let (status, answer) = s
        .merchant
        .call(
            Method::POST,
            &format!("/api/network/tokens/{id}/forward"),
            &headers,
            TEMPLATE.to_owned(),
        )
        .await?;
    let sent = s.acquirer.last_received_masked().unwrap_or(Value::Null);
    let shown = format!(
        "the merchant's body (placeholders only):\n{TEMPLATE}\n\nwhat the acquirer received (masked here):\n{}",
        pretty(&sent)
    );
    say(s, "forward", &shown);
    steps.push(step("forward", "Forwarded through tokenrelay", shown));
    let approved = status == 200 && answer["status"] == "approved";
    let shown = format!("{status}\n{}", pretty(&answer));
    say(s, "the acquirer's answer", &shown);
    steps.push(step(
        "answer",
        if approved { "Approved" } else { "Declined" },
        shown,
    ));
    Ok(approved)
}
