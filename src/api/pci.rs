//! PCI tokens (contract §4a): the card itself, kept for FPAN fallback.
//!
//! Creating one from card fields needs a compliance level that may handle
//! card data; from a `session` source (a card encrypted in the browser) it
//! works at every level. The same card (by keyed fingerprint) is stored
//! once: creating it again answers 200 with the existing token's id (201
//! when new), and a later expiry in the new request — the card was
//! reissued — replaces the stored one (with the cardholder name, if
//! given); an earlier or equal one changes nothing (see
//! [`PciToken::reissue_from`]). The CVC, if given, goes to the [`crate::cvc::CvcStore`] only
//! (memory, or sealed in Redis). The API view never
//! holds the PAN or the CVC.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroize;

use super::json::rfc3339;
use super::{json, ApiError};
use crate::audit::{Audit, Subject};
use crate::body::{check_content_length, empty_response, json_response, read_body};
use crate::card::{validate_card, Brand, CardNumber, Secret};
use crate::session::SessionId;
use crate::vault::{Metadata, PciToken, PciTokenId};
use crate::{AppState, Body};

/// A card as submitted, validated.
pub struct CardInput {
    /// The number.
    pub pan: CardNumber,
    /// Its brand.
    pub brand: Brand,
    /// Expiry month.
    pub expiry_month: u8,
    /// Expiry year.
    pub expiry_year: u16,
    /// The CVC, for memory only.
    pub cvc: Option<Secret>,
    /// Cardholder name.
    pub cardholder_name: Option<String>,
}

/// Reads and validates the card fields of `obj` (a PAN source or a PCI
/// token request); errors are 422 `invalid_card` naming the field.
pub fn card_input(obj: &Map<String, Value>) -> Result<CardInput, ApiError> {
    let bad = |field: &'static str, reason: &'static str| ApiError::InvalidCard { field, reason };
    let number = json::opt_str(obj, "number")
        .map_err(|_| bad("number", "must be a string of digits"))?
        .ok_or(bad("number", "is required"))?;
    let month = json::opt_int(obj, "expiry_month")
        .map_err(|_| bad("expiry_month", "must be an integer"))?
        .ok_or(bad("expiry_month", "is required"))?;
    let year = json::opt_int(obj, "expiry_year")
        .map_err(|_| bad("expiry_year", "must be an integer"))?
        .ok_or(bad("expiry_year", "is required"))?;
    let cvc = match json::opt_str(obj, "cvc").map_err(|_| bad("cvc", "must be a string"))? {
        None => None,
        Some(c) if (3..=4).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_digit()) => {
            Some(Secret::new(c.to_owned()))
        }
        Some(_) => return Err(bad("cvc", "must be 3 or 4 digits")),
    };
    let cardholder_name = match json::opt_str(obj, "cardholder_name")
        .map_err(|_| bad("cardholder_name", "must be a string"))?
    {
        Some(n) if n.chars().count() > 100 => {
            return Err(bad("cardholder_name", "must be at most 100 characters"))
        }
        n => n.map(str::to_owned),
    };
    let now = OffsetDateTime::now_utc();
    let (pan, brand) = validate_card(number, month, year, (now.year(), u8::from(now.month())))
        .map_err(|e| ApiError::InvalidCard {
            field: e.field,
            reason: e.reason,
        })?;
    Ok(CardInput {
        pan,
        brand,
        expiry_month: month as u8,
        expiry_year: year as u16,
        cvc,
        cardholder_name,
    })
}

/// Stores the card once (by fingerprint) and holds its CVC in memory.
pub async fn store_card(
    state: &AppState,
    card: CardInput,
    metadata: Metadata,
) -> Result<(Arc<PciToken>, bool), ApiError> {
    let fingerprint = state.tokens.fingerprint(&card.pan);
    let (token, created) = state
        .tokens
        .insert_pci(PciToken {
            id: Uuid::new_v4(),
            pan: card.pan,
            scheme: card.brand,
            expiry_month: card.expiry_month,
            expiry_year: card.expiry_year,
            cardholder_name: card.cardholder_name,
            metadata,
            fingerprint,
            created_at: OffsetDateTime::now_utc(),
        })
        .await?;
    if let Some(cvc) = card.cvc {
        if !state.cvcs.hold(token.id, cvc).await? {
            tracing::warn!(pci_token_id = %token.id, "CVC store full; security code not held");
        }
    }
    Ok((token, created))
}

/// The API view of a PCI token.
#[derive(Serialize)]
pub struct PciView<'a> {
    id: PciTokenId,
    last4: &'a str,
    bin: &'a str,
    scheme: &'static str,
    expiry_month: u8,
    expiry_year: u16,
    cardholder_name: Option<&'a str>,
    metadata: &'a Metadata,
    created_at: String,
}

impl<'a> From<&'a PciToken> for PciView<'a> {
    fn from(t: &'a PciToken) -> Self {
        PciView {
            id: t.id,
            last4: t.pan.last4(),
            bin: t.pan.first6(),
            scheme: t.scheme.as_str(),
            expiry_month: t.expiry_month,
            expiry_year: t.expiry_year,
            cardholder_name: t.cardholder_name.as_deref(),
            metadata: &t.metadata,
            created_at: rfc3339(t.created_at),
        }
    }
}

/// Parses a PCI token id; a malformed one is simply not found.
pub fn parse_id(id: &str) -> Result<PciTokenId, ApiError> {
    Uuid::try_parse(id).map_err(|_| ApiError::PciTokenNotFound)
}

/// `POST /api/pci/tokens`
pub async fn create(
    state: &AppState,
    req: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, ApiError> {
    check_content_length(&req, state.config.max_body_bytes)?;
    let body = read_body(req.into_body(), state.config.max_body_bytes).await?;
    let obj = json::object(&body)?;
    let metadata = json::metadata(&obj)?;
    let card = match obj.get("source") {
        // A card encrypted in the browser: every compliance level.
        Some(source) => {
            json::only_fields(&obj, &["source", "metadata"], "")?;
            let source = match source {
                Value::Object(s) if json::opt_str(s, "type") == Ok(Some("session")) => s,
                _ => {
                    return Err(ApiError::InvalidRequest(
                        "`source` must be {\"type\": \"session\", \"id\", \"data\"}; \
                         send a card's fields at the top level instead"
                            .into(),
                    ))
                }
            };
            card_from_source(state, source, audit).await?
        }
        None => {
            if !state.config.compliance_level.handles_card_data() {
                return Err(ApiError::SourceNotPermitted("pan", "saq-a"));
            }
            json::only_fields(
                &obj,
                &[
                    "number",
                    "expiry_month",
                    "expiry_year",
                    "cardholder_name",
                    "cvc",
                    "metadata",
                ],
                "",
            )?;
            card_input(&obj)?
        }
    };
    let (token, created) = store_card(state, card, metadata).await?;
    audit.subject = Some(Subject::PciToken(token.id));
    audit.created = Some(created);
    if created {
        return Ok(json_response(
            StatusCode::CREATED,
            &PciView::from(token.as_ref()),
        )?);
    }
    // The card was stored before (and, if this request carried a later
    // expiry, now holds it). Knowing its number proves nothing about the
    // rest of what was stored with it, so the answer carries only what the
    // number itself gives (and the id), never the stored expiry or
    // cardholder name.
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "id": token.id,
            "last4": token.pan.last4(),
            "bin": token.pan.first6(),
            "scheme": token.scheme.as_str(),
            "created_at": rfc3339(token.created_at),
        }),
    )?)
}

/// `GET /api/pci/tokens/{id}`
pub async fn get(state: &AppState, id: PciTokenId) -> Result<Response<Body>, ApiError> {
    let token = state
        .tokens
        .get_pci(id)
        .await?
        .ok_or(ApiError::PciTokenNotFound)?;
    Ok(json_response(
        StatusCode::OK,
        &PciView::from(token.as_ref()),
    )?)
}

/// `DELETE /api/pci/tokens/{id}`: the card data is destroyed.
pub async fn delete(state: &AppState, id: PciTokenId) -> Result<Response<Body>, ApiError> {
    if !state.tokens.delete_pci(id).await? {
        return Err(ApiError::PciTokenNotFound);
    }
    state.cvcs.forget(id).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

/// The fields the browser may encrypt.
const CARD_FIELDS: &[&str] = &[
    "number",
    "expiry_month",
    "expiry_year",
    "cvc",
    "cardholder_name",
];

/// A `{"type": "session", "id", "data"}` source, which network tokens and
/// PCI tokens accept at every compliance level (contract §11): spends the
/// session, decrypts its JWE, and validates the card in it as a PAN would
/// be ([`card_input`]). Until then the card is bytes in a zeroizing
/// buffer, and whatever is wrong with it is answered with a fixed text —
/// never a value, a length or a field name taken from the plaintext.
pub async fn card_from_source(
    state: &AppState,
    source: &Map<String, Value>,
    audit: &mut Audit,
) -> Result<CardInput, ApiError> {
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
    let input = card_input(&card.0);
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
