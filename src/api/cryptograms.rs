//! Cryptograms (contract §5): inline at SAQ-D/ROC, or as a single-use
//! reference that only the forward proxy can redeem.
//!
//! [`issue`] is the one path to a cryptogram (checks, counter, minting,
//! reference); the native handler here and the compatible surfaces
//! (`api::surfaces`) only translate requests into it and its answer back.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::json::rfc3339;
use super::{json, ApiError};
use crate::audit::Audit;
use crate::auth::ApiKey;
use crate::config::ComplianceLevel;
use crate::idempotency::{self, Pending, Stored};
use crate::references::{Payload, Reference, ReferenceId};
use crate::tsp::{check_scheme_rules, CryptogramKind, CryptogramParams, CryptogramType, Minted};
use crate::vault::{Metadata, NetworkToken, TokenId, TokenStatus};
use crate::{AppState, Body};

/// How the cryptogram is handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The cryptogram and the TPAN themselves (SAQ-D / ROC only).
    Inline,
    /// A single-use reference only the forward proxy can redeem.
    Reference,
}

impl Mode {
    /// The mode a request gets at `level`: `requested`, or the level's
    /// default; inline at SAQ-A is refused (contract §5).
    pub fn resolve(requested: Option<Mode>, level: ComplianceLevel) -> Result<Mode, ApiError> {
        match (requested, level.handles_card_data()) {
            (None, false) | (Some(Mode::Reference), _) => Ok(Mode::Reference),
            (None, true) | (Some(Mode::Inline), true) => Ok(Mode::Inline),
            (Some(Mode::Inline), false) => Err(ApiError::InlineNotPermitted),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Mode::Inline => "inline",
            Mode::Reference => "reference",
        }
    }
}

/// A cryptogram as handed out: the values themselves, or a reference.
pub enum Issued {
    /// Inline: the minted values.
    Inline(Minted),
    /// By reference: the reference and what a merchant may see about it.
    Reference {
        /// The reference id (`cref_…`).
        id: ReferenceId,
        /// When it expires.
        expires_at: OffsetDateTime,
        /// What was minted.
        cryptogram_type: CryptogramType,
        /// The ECI that goes with it.
        eci: &'static str,
    },
}

impl Issued {
    /// What was minted.
    pub fn cryptogram_type(&self) -> CryptogramType {
        match self {
            Issued::Inline(m) => m.cryptogram_type,
            Issued::Reference {
                cryptogram_type, ..
            } => *cryptogram_type,
        }
    }

    /// The ECI.
    pub fn eci(&self) -> &'static str {
        match self {
            Issued::Inline(m) => m.eci,
            Issued::Reference { eci, .. } => eci,
        }
    }

    /// The value that stands for the cryptogram: the TAVV or dynamic CVV
    /// inline, else the reference id.
    pub fn value(&self) -> &str {
        match self {
            Issued::Inline(m) => m
                .cryptogram
                .as_ref()
                .or(m.dynamic_cvv.as_ref())
                .map_or("", |c| c.expose()),
            Issued::Reference { id, .. } => id.as_str(),
        }
    }
}

/// The one path to a cryptogram, for the native API and the compatible
/// surfaces alike: the token must be active, `dauth` activated where asked,
/// the brand table's common rows kept; then the counter moves, the token
/// service mints, and in reference mode the reference is issued.
pub async fn issue(
    state: &AppState,
    token: &NetworkToken,
    params: &CryptogramParams,
    mode: Mode,
    metadata: Metadata,
    audit: &mut Audit,
) -> Result<Issued, ApiError> {
    if token.status != TokenStatus::Active {
        return Err(ApiError::TokenNotActive(token.status.as_str()));
    }
    if params.kind == CryptogramKind::Dauth && !token.dauth_activated {
        return Err(ApiError::DauthNotActivated);
    }
    check_scheme_rules(token.scheme, params)?;

    let counter = state.tokens.next_counter(token.id).await?;
    let minted = state.tsp.cryptogram(token, counter, params)?;
    audit.kind = Some(params.kind.as_str());
    audit.mode = Some(mode.as_str());
    match mode {
        Mode::Inline => Ok(Issued::Inline(minted)),
        Mode::Reference => {
            let expires_at = state.clock.now() + state.config.reference_ttl;
            let (cryptogram_type, eci) = (minted.cryptogram_type, minted.eci);
            let id = state
                .references
                .issue(Reference {
                    token_id: token.id,
                    expires_at,
                    payload: Arc::new(Payload {
                        cryptogram: minted.cryptogram,
                        dynamic_cvv: minted.dynamic_cvv,
                        cryptogram_type,
                        eci,
                        metadata,
                    }),
                })
                .await?;
            state.metrics.references_issued.inc();
            Ok(Issued::Reference {
                id,
                expires_at,
                cryptogram_type,
                eci,
            })
        }
    }
}

struct Parsed {
    params: CryptogramParams,
    mode: Mode,
    metadata: Metadata,
}

#[derive(Serialize)]
struct InlineView<'a> {
    cryptogram: Option<&'a str>,
    dynamic_cvv: Option<&'a str>,
    #[serde(rename = "type")]
    cryptogram_type: &'static str,
    eci: &'static str,
    expiry_month: u8,
    expiry_year: u16,
    number: &'a str,
    metadata: &'a Metadata,
}

#[derive(Serialize)]
struct ReferenceView<'a> {
    cryptogram_reference: &'a str,
    expires_at: String,
    #[serde(rename = "type")]
    cryptogram_type: &'static str,
    eci: &'static str,
    metadata: &'a Metadata,
}

/// `POST /api/network/tokens/{id}/cryptograms`
pub async fn create(
    state: &AppState,
    key: &ApiKey,
    token_id: TokenId,
    req: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, ApiError> {
    idempotency::respond(
        state,
        key,
        "create_cryptogram",
        req,
        |body, pending| async move { create_inner(state, token_id, &body, pending, audit).await },
    )
    .await
}

fn invalid(msg: &str) -> ApiError {
    ApiError::InvalidCryptogramRequest(msg.to_owned())
}

fn parse(obj: &Map<String, Value>, level: ComplianceLevel) -> Result<Parsed, ApiError> {
    json::only_fields(
        obj,
        &[
            "type",
            "mode",
            "metadata",
            "amount",
            "currency",
            "transaction_type",
            "cryptogram_type",
        ],
        "",
    )?;
    let kind = match json::opt_str(obj, "type") {
        Ok(Some("ecom")) => CryptogramKind::Ecom,
        Ok(Some("dauth")) => CryptogramKind::Dauth,
        Ok(None) => return Err(invalid("`type` is required (ecom or dauth)")),
        _ => return Err(invalid("`type` must be ecom or dauth")),
    };
    let mode = match json::opt_str(obj, "mode") {
        Ok(None) => Mode::resolve(None, level)?,
        Ok(Some("reference")) => Mode::resolve(Some(Mode::Reference), level)?,
        Ok(Some("inline")) => Mode::resolve(Some(Mode::Inline), level)?,
        _ => return Err(invalid("`mode` must be inline or reference")),
    };
    let cryptogram_type = match json::opt_str(obj, "cryptogram_type") {
        Ok(None) | Ok(Some("tavv")) => CryptogramType::Tavv,
        Ok(Some("dynamic_cvv")) => CryptogramType::DynamicCvv,
        _ => return Err(invalid("`cryptogram_type` must be tavv or dynamic_cvv")),
    };
    let amount = match obj.get("amount") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid("`amount` must be a number or a decimal string")),
    };
    if let Some(a) = &amount {
        if !valid_amount(a) {
            return Err(invalid(
                "`amount` must be a non-negative decimal with at most 3 fraction digits",
            ));
        }
    }
    let currency = match json::opt_str(obj, "currency") {
        Ok(None) => None,
        Ok(Some(c)) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
            Some(c.to_ascii_uppercase())
        }
        _ => return Err(invalid("`currency` must be an ISO 4217 code")),
    };
    match json::opt_str(obj, "transaction_type") {
        Ok(None) => {}
        Ok(Some(t)) if !t.is_empty() && t.len() <= 32 => {}
        _ => {
            return Err(invalid(
                "`transaction_type` must be a string of 1 to 32 characters",
            ))
        }
    }
    Ok(Parsed {
        params: CryptogramParams {
            kind,
            cryptogram_type,
            amount,
            currency,
        },
        mode,
        metadata: json::metadata(obj)?,
    })
}

/// `12`, `12.5`, `12.50`, `0.001`; no sign, no exponent.
fn valid_amount(a: &str) -> bool {
    let (int, frac) = a.split_once('.').unwrap_or((a, ""));
    !int.is_empty()
        && int.len() <= 15
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.len() <= 3
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !(a.contains('.') && frac.is_empty())
}

async fn create_inner(
    state: &AppState,
    token_id: TokenId,
    body: &[u8],
    pending: Option<Pending>,
    audit: &mut Audit,
) -> Result<Stored, ApiError> {
    let obj = json::object(body)?;
    let token = state
        .tokens
        .get_current(token_id)
        .await?
        .ok_or(ApiError::TokenNotFound)?;
    let parsed = parse(&obj, state.config.compliance_level)?;
    let issued = issue(
        state,
        &token,
        &parsed.params,
        parsed.mode,
        parsed.metadata.clone(),
        audit,
    )
    .await?;
    let (status, body) = match &issued {
        Issued::Inline(minted) => {
            let view = InlineView {
                cryptogram: minted.cryptogram.as_ref().map(|c| c.expose()),
                dynamic_cvv: minted.dynamic_cvv.as_ref().map(|c| c.expose()),
                cryptogram_type: minted.cryptogram_type.as_str(),
                eci: minted.eci,
                expiry_month: token.expiry_month,
                expiry_year: token.expiry_year,
                number: token.tpan.expose(),
                metadata: &parsed.metadata,
            };
            (StatusCode::OK, serde_json::to_vec(&view))
        }
        Issued::Reference {
            id,
            expires_at,
            cryptogram_type,
            eci,
        } => {
            let view = ReferenceView {
                cryptogram_reference: id.as_str(),
                expires_at: rfc3339(*expires_at),
                cryptogram_type: cryptogram_type.as_str(),
                eci,
                metadata: &parsed.metadata,
            };
            (StatusCode::CREATED, serde_json::to_vec(&view))
        }
    };
    let body = body.map_err(|e| ApiError::Internal(format!("serialising a cryptogram: {e}")))?;
    let stored = Stored {
        status,
        body: body.into(),
    };
    if let Some(p) = pending {
        let horizon = state.idempotency.horizon(state.config.idempotency_ttl);
        if let Some(existing) = state
            .tokens
            .put_idempotency(p.record(&stored), horizon)
            .await?
        {
            // Another replica answered this key first; its answer stands.
            return Ok(p.replay(existing)?);
        }
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts() {
        for ok in ["0", "10", "10.5", "10.50", "0.001"] {
            assert!(valid_amount(ok), "{ok}");
        }
        for bad in ["", "-1", "1e3", "10.", ".5", "10.0001", "1,00"] {
            assert!(!valid_amount(bad), "{bad}");
        }
    }

    #[test]
    fn mode_defaults_by_compliance_level() {
        let obj = serde_json::json!({"type": "ecom"});
        let o = obj.as_object().unwrap();
        assert_eq!(
            parse(o, ComplianceLevel::SaqA).ok().unwrap().mode,
            Mode::Reference
        );
        assert_eq!(
            parse(o, ComplianceLevel::SaqD).ok().unwrap().mode,
            Mode::Inline
        );
        assert_eq!(
            parse(o, ComplianceLevel::Roc).ok().unwrap().mode,
            Mode::Inline
        );
        let inline = serde_json::json!({"type": "ecom", "mode": "inline"});
        assert!(matches!(
            parse(inline.as_object().unwrap(), ComplianceLevel::SaqA),
            Err(ApiError::InlineNotPermitted)
        ));
    }
}
