//! Network tokens: provision, read, delete (contract §4).
//!
//! The API view of a token ([`TokenView`]) is built from the token's public
//! fields only; the TPAN has no path into it.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use time::OffsetDateTime;

use super::json::{self, rfc3339};
use super::pci;
use super::ApiError;
use crate::audit::{Audit, Subject};
use crate::auth::ApiKey;
use crate::body::{check_content_length, empty_response, json_response, read_body};
use crate::card::validate_expiry;
use crate::idempotency::{self, Pending, Stored};
use crate::tsp::ProvisionRequest;
use crate::vault::{
    Inserted, Metadata, NetworkToken, NetworkTokenType, PciToken, TokenChange, TokenId, TokenStatus,
};
use crate::{AppState, Body};

/// The token as the API shows it: never the TPAN or the PAN.
#[derive(Serialize)]
pub struct TokenView<'a> {
    id: TokenId,
    status: TokenStatus,
    network_token_type: NetworkTokenType,
    scheme: &'static str,
    last4: &'a str,
    expiry_month: u8,
    expiry_year: u16,
    pci_token_id: Option<uuid::Uuid>,
    supports_device_binding: bool,
    scheme_reference: &'a str,
    scheme_metadata: &'a Metadata,
    metadata: &'a Metadata,
    created_at: String,
    updated_at: String,
}

impl<'a> From<&'a NetworkToken> for TokenView<'a> {
    fn from(t: &'a NetworkToken) -> Self {
        TokenView {
            id: t.id,
            status: t.status,
            network_token_type: t.network_token_type,
            scheme: t.scheme.as_str(),
            last4: &t.card_last4,
            expiry_month: t.expiry_month,
            expiry_year: t.expiry_year,
            pci_token_id: t.pci_token_id,
            supports_device_binding: t.supports_device_binding,
            scheme_reference: &t.scheme_reference,
            scheme_metadata: &t.scheme_metadata,
            metadata: &t.metadata,
            created_at: rfc3339(t.created_at),
            updated_at: rfc3339(t.updated_at),
        }
    }
}

/// `POST /api/network/tokens`
pub async fn provision(
    state: &AppState,
    key: &ApiKey,
    req: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, ApiError> {
    idempotency::respond(
        state,
        key,
        "provision_token",
        req,
        |body, pending| async move { provision_inner(state, &body, pending, audit).await },
    )
    .await
}

async fn provision_inner(
    state: &AppState,
    body: &[u8],
    pending: Option<Pending>,
    audit: &mut Audit,
) -> Result<Stored, ApiError> {
    let obj = json::object(body)?;
    json::only_fields(&obj, &["source", "metadata", "dauth_activated"], "")?;
    let metadata = json::metadata(&obj)?;
    let dauth_activated = json::opt_bool(&obj, "dauth_activated")
        .map_err(|_| ApiError::InvalidRequest("`dauth_activated` must be a boolean".into()))?
        .unwrap_or(false);
    let source = match obj.get("source") {
        Some(serde_json::Value::Object(s)) => s,
        _ => {
            return Err(ApiError::InvalidRequest(
                "`source` must be an object with a `type`".into(),
            ))
        }
    };
    let source_type = json::opt_str(source, "type")
        .ok()
        .flatten()
        .ok_or_else(|| ApiError::InvalidRequest("`source.type` is required".into()))?;
    let card = match source_type {
        "pan" => {
            if !state.config.compliance_level.handles_card_data() {
                return Err(ApiError::SourceNotPermitted("pan", "saq-a"));
            }
            json::only_fields(
                source,
                &[
                    "type",
                    "number",
                    "expiry_month",
                    "expiry_year",
                    "cvc",
                    "cardholder_name",
                ],
                "source.",
            )?;
            // The card is kept as a PCI token too (once, by fingerprint),
            // so FPAN fallback is always possible.
            let (card, _) =
                pci::store_card(state, pci::card_input(source)?, Metadata::new()).await?;
            card
        }
        "pci_token" => {
            json::only_fields(source, &["type", "id"], "source.")?;
            let id = json::opt_str(source, "id")
                .ok()
                .flatten()
                .ok_or_else(|| ApiError::InvalidRequest("`source.id` is required".into()))?;
            let card = state
                .tokens
                .get_pci(pci::parse_id(id)?)
                .await?
                .ok_or(ApiError::PciTokenNotFound)?;
            check_card_expiry(&card)?;
            card
        }
        "session" => {
            // Every compliance level: the merchant only ever held ciphertext.
            let card = pci::card_from_source(state, source, audit).await?;
            let (card, _) = pci::store_card(state, card, Metadata::new()).await?;
            card
        }
        _ => {
            return Err(ApiError::InvalidRequest(
                "`source.type` must be one of pan, pci_token, session".into(),
            ))
        }
    };
    let token = new_token(state, &card, metadata, dauth_activated)?;
    let body = serde_json::to_vec(&TokenView::from(&token))
        .map_err(|e| ApiError::Internal(format!("serialising a token: {e}")))?;
    let id = token.id;
    let stored = Stored {
        status: StatusCode::CREATED,
        body: body.into(),
    };
    let horizon = state.idempotency.horizon(state.config.idempotency_ttl);
    let record = pending.as_ref().map(|p| (p.record(&stored), horizon));
    match (state.tokens.insert(token, record).await?, pending) {
        (Inserted::IdempotencyExists(existing), Some(p)) => return Ok(p.replay(existing)?),
        (Inserted::IdempotencyExists(_), None) => {
            return Err(ApiError::Internal(
                "idempotency conflict without a key".into(),
            ))
        }
        (Inserted::Stored, _) => {}
    }
    audit.subject = Some(Subject::NetworkToken(id));
    audit.scheme = Some(card.scheme.as_str());
    audit.card = Some(card.pan.to_string());
    Ok(stored)
}

/// Refuses a stored card whose expiry has passed (422 `invalid_card`).
pub fn check_card_expiry(card: &PciToken) -> Result<(), ApiError> {
    let now = OffsetDateTime::now_utc();
    validate_expiry(
        i64::from(card.expiry_month),
        i64::from(card.expiry_year),
        (now.year(), u8::from(now.month())),
    )
    .map_err(|e| ApiError::InvalidCard {
        field: e.field,
        reason: e.reason,
    })
}

/// A new active network token for `card`, from the token service; not yet
/// stored. The one place a token is made, for the native API and the
/// compatible surfaces alike.
pub fn new_token(
    state: &AppState,
    card: &PciToken,
    metadata: Metadata,
    dauth_activated: bool,
) -> Result<NetworkToken, ApiError> {
    let (pan, brand) = (&card.pan, card.scheme);
    let now = OffsetDateTime::now_utc();
    let provisioned = state.tsp.provision(&ProvisionRequest {
        pan,
        brand,
        expiry_month: card.expiry_month,
        expiry_year: card.expiry_year,
    })?;
    Ok(NetworkToken {
        id: TokenId::new(),
        status: TokenStatus::Active,
        network_token_type: provisioned.network_token_type,
        scheme: brand,
        card_last4: pan.last4().to_owned(),
        expiry_month: provisioned.expiry_month,
        expiry_year: provisioned.expiry_year,
        pci_token_id: Some(card.id),
        supports_device_binding: provisioned.supports_device_binding,
        scheme_reference: provisioned.scheme_reference,
        scheme_metadata: provisioned.scheme_metadata,
        metadata,
        dauth_activated,
        created_at: now,
        updated_at: now,
        tpan: provisioned.tpan,
    })
}

/// `GET /api/network/tokens/{id}`
pub async fn get(state: &AppState, id: TokenId) -> Result<Response<Body>, ApiError> {
    let token = state.tokens.get(id).await?.ok_or(ApiError::TokenNotFound)?;
    Ok(json_response(
        StatusCode::OK,
        &TokenView::from(token.as_ref()),
    )?)
}

/// `DELETE /api/network/tokens/{id}`: the token becomes `deleted` (kept as a
/// tombstone so `GET` can say so) and its outstanding references die.
pub async fn delete(state: &AppState, id: TokenId) -> Result<Response<Body>, ApiError> {
    delete_token(state, id).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

/// Marks a token `deleted` and kills its outstanding references; the one
/// delete path, for the native API and the compatible surfaces alike.
pub async fn delete_token(state: &AppState, id: TokenId) -> Result<(), ApiError> {
    state
        .tokens
        .set_status(id, TokenStatus::Deleted)
        .await?
        .ok_or(ApiError::TokenNotFound)?;
    state.references.revoke_token(id).await?;
    Ok(())
}

/// `POST /api/network/tokens/{id}/events` (admin scope): sandbox lifecycle
/// events, as a token service would send them. Body `{"event": "suspend" |
/// "resume" | "delete" | "update_expiry" | "activate_dauth",
/// "expiry_month"?, "expiry_year"?}` → 200 with the token.
pub async fn event(
    state: &AppState,
    id: TokenId,
    req: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, ApiError> {
    check_content_length(&req, state.config.max_body_bytes)?;
    let body = read_body(req.into_body(), state.config.max_body_bytes).await?;
    let obj = json::object(&body)?;
    json::only_fields(&obj, &["event", "expiry_month", "expiry_year"], "")?;
    // The body is validated whole before the token is read, so a bad
    // request is a 400 whatever state the token is in.
    let event = json::opt_str(&obj, "event").ok().flatten().unwrap_or("");
    if event != "update_expiry"
        && (obj.contains_key("expiry_month") || obj.contains_key("expiry_year"))
    {
        return Err(ApiError::InvalidRequest(
            "`expiry_month` and `expiry_year` belong to update_expiry only".into(),
        ));
    }
    let (name, change) = match event {
        "suspend" => ("suspend", TokenChange::Status(TokenStatus::Inactive)),
        "resume" => ("resume", TokenChange::Status(TokenStatus::Active)),
        "delete" => ("delete", TokenChange::Status(TokenStatus::Deleted)),
        "activate_dauth" => ("activate_dauth", TokenChange::ActivateDauth),
        "update_expiry" => {
            let month = json::opt_int(&obj, "expiry_month").ok().flatten();
            let year = json::opt_int(&obj, "expiry_year").ok().flatten();
            let now = OffsetDateTime::now_utc();
            match (month, year) {
                (Some(m), Some(y))
                    if validate_expiry(m, y, (now.year(), u8::from(now.month()))).is_ok() =>
                {
                    (
                        "update_expiry",
                        TokenChange::Expiry {
                            month: m as u8,
                            year: y as u16,
                        },
                    )
                }
                _ => {
                    return Err(ApiError::InvalidRequest(
                        "update_expiry needs a future expiry_month and expiry_year".into(),
                    ))
                }
            }
        }
        _ => {
            return Err(ApiError::InvalidRequest(
                "`event` must be suspend, resume, delete, update_expiry or activate_dauth".into(),
            ))
        }
    };
    let current = state.tokens.get(id).await?.ok_or(ApiError::TokenNotFound)?;
    if current.status == TokenStatus::Deleted && name != "delete" {
        return Err(ApiError::TokenNotActive("deleted"));
    }
    let token = state
        .tokens
        .update(id, change)
        .await?
        .ok_or(ApiError::TokenNotFound)?;
    if token.status != TokenStatus::Active {
        // A suspended or deleted token's outstanding references die.
        state.references.revoke_token(id).await?;
    }
    audit.change = Some(name);
    Ok(json_response(
        StatusCode::OK,
        &TokenView::from(token.as_ref()),
    )?)
}
