//! Card-capture sessions over HTTP (contract §11): `POST /api/sessions`,
//! and the `session` provisioning source that network tokens and PCI tokens
//! accept at every compliance level.
//!
//! The decrypted card goes through the same rules as a PAN
//! ([`pci::card_input`]); until then it is bytes in a zeroizing buffer, and
//! whatever is wrong with it is answered with a fixed text — never a value,
//! a length or a field name taken from the plaintext.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value};
use zeroize::Zeroize;

use super::json::rfc3339;
use super::{json, pci, ApiError, Audit};
use crate::body::{check_content_length, json_response, read_body};
use crate::session::SessionId;
use crate::{AppState, Body};

/// The fields the browser may encrypt.
const CARD_FIELDS: &[&str] = &[
    "number",
    "expiry_month",
    "expiry_year",
    "cvc",
    "cardholder_name",
];

/// `POST /api/sessions` → 201 `{id, public_key, expires_at}`. The body is
/// empty or `{}`.
pub async fn create(
    state: &AppState,
    req: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, ApiError> {
    check_content_length(&req, state.config.max_body_bytes)?;
    let body = read_body(req.into_body(), state.config.max_body_bytes).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        json::only_fields(&json::object(&body)?, &[], "")?;
    }
    let session = state.sessions.open().await?;
    audit.session = Some(session.id.clone());
    Ok(json_response(
        StatusCode::CREATED,
        &serde_json::json!({
            "id": session.id.as_str(),
            "public_key": session.jwk(),
            "expires_at": rfc3339(session.expires_at),
        }),
    )?)
}

/// A `{"type": "session", "id", "data"}` source: spends the session,
/// decrypts its JWE, and validates the card in it as a PAN would be.
pub async fn card_from_source(
    state: &AppState,
    source: &Map<String, Value>,
    audit: &mut Audit,
) -> Result<pci::CardInput, ApiError> {
    json::only_fields(source, &["type", "id", "data"], "source.")?;
    let field = |k: &'static str| {
        json::opt_str(source, k)
            .ok()
            .flatten()
            .ok_or_else(|| ApiError::InvalidRequest(format!("`source.{k}` must be a string")))
    };
    let (id, data) = (field("id")?, field("data")?);
    audit.session = SessionId::parse(id);
    let plain = state.sessions.open_card(id, data).await?;
    let mut card = Scrubbed(match serde_json::from_slice::<Value>(&plain) {
        Ok(Value::Object(m)) => m,
        _ => return Err(NOT_A_CARD),
    });
    if card.0.keys().any(|k| !CARD_FIELDS.contains(&k.as_str())) {
        return Err(NOT_A_CARD);
    }
    let input = pci::card_input(&card.0);
    card.scrub();
    input
}

const NOT_A_CARD: ApiError =
    ApiError::InvalidSessionData("the decrypted data is not a card object");

/// The decrypted card as JSON, its strings zeroized when it goes.
struct Scrubbed(Map<String, Value>);

impl Scrubbed {
    fn scrub(&mut self) {
        for v in self.0.values_mut() {
            if let Value::String(s) = v {
                s.zeroize();
            }
        }
    }
}

impl Drop for Scrubbed {
    fn drop(&mut self) {
        self.scrub();
    }
}
