//! The VGS Card Management Platform surface (seed 003, contract §12):
//! network tokens and cryptograms by card, in JSON:API
//! (`application/vnd.api+json`).
//!
//! A VGS "card" is a PCI token (`card_id` = PCI token id); its network
//! tokens are the vault's tokens made for that card, by either API. The
//! resource is `NetworkTokenResource` (`data.type = "network_tokens"`); the
//! payment account reference is derived from the card's keyed fingerprint,
//! so it is the same for every token of the card and says nothing about the
//! number; `exp_year` has two digits as the seed's schema says (0–99);
//! `bin`/`last4` are the token number's, as the seed titles them.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::{body_object, token_number, Operation, OperationKind, SurfaceError};
use crate::api::cryptograms::{self, Issued, Mode};
use crate::api::json::rfc3339;
use crate::api::tokens;
use crate::api::{json, pci, ApiError, Matched};
use crate::audit::{Audit, Subject};
use crate::config::ComplianceLevel;
use crate::tsp::{brand_rules, CryptogramKind, CryptogramParams, CryptogramType, SchemeRule};
use crate::vault::{
    IdempotencyRecord, Inserted, Metadata, NetworkToken, PciToken, PciTokenId, TokenId,
    TokenLookup, TokenStatus,
};
use crate::{AppState, Body};

/// The JSON:API media type every answer carries.
pub const CONTENT_TYPE: &str = "application/vnd.api+json";

/// Matches a `/cards/…` path; a malformed card id is not found, as an
/// unknown one.
pub fn route(method: &Method, path: &str) -> Result<Matched<OperationKind, Operation>, ApiError> {
    let rest = path
        .strip_prefix("/cards/")
        .ok_or(ApiError::RouteNotFound)?;
    let (card, action) = rest.split_once('/').ok_or(ApiError::RouteNotFound)?;
    if card.is_empty() {
        return Err(ApiError::RouteNotFound);
    }
    let card = pci::parse_id(card);
    let (kind, route) = match (action, method) {
        ("network-tokens", &Method::POST) => (
            OperationKind::VgsProvision,
            card.map(Operation::VgsProvision),
        ),
        ("network-tokens", &Method::DELETE) => {
            (OperationKind::VgsDelete, card.map(Operation::VgsDelete))
        }
        ("cryptogram", &Method::POST) => (
            OperationKind::VgsCryptogram,
            card.map(Operation::VgsCryptogram),
        ),
        ("network-tokens", _) => return Err(ApiError::MethodNotAllowed("POST, DELETE")),
        ("cryptogram", _) => return Err(ApiError::MethodNotAllowed("POST")),
        _ => return Err(ApiError::RouteNotFound),
    };
    Ok(Matched { kind, route })
}

/// The card named by the path; unknown → 404.
async fn card(
    state: &AppState,
    id: PciTokenId,
    audit: &mut Audit,
) -> Result<std::sync::Arc<PciToken>, SurfaceError> {
    audit.subject = Some(Subject::PciToken(id));
    Ok(state
        .tokens
        .get_pci(id)
        .await?
        .ok_or(ApiError::PciTokenNotFound)?)
}

/// The card's newest token with `status`.
fn newest(tokens: &[std::sync::Arc<NetworkToken>], status: TokenStatus) -> Option<&NetworkToken> {
    tokens
        .iter()
        .rev()
        .find(|t| t.status == status)
        .map(AsRef::as_ref)
}

/// `POST /cards/{card_id}/network-tokens`: 201 with a new token, or 200
/// with the card's active one ("provisioning is skipped if an active
/// network token already exists").
pub async fn provision(
    state: &AppState,
    card_id: PciTokenId,
    audit: &mut Audit,
) -> Result<Response<Body>, SurfaceError> {
    let card = card(state, card_id, audit).await?;
    let tokens = state.tokens.find_tokens(TokenLookup::Card(card.id)).await?;
    if let Some(active) = newest(&tokens, TokenStatus::Active) {
        return Ok(resource(state, StatusCode::OK, active, &card, None));
    }
    tokens::check_card_expiry(&card)?;
    let token = tokens::new_token(state, &card, Metadata::new(), false)?;
    // Two requests racing to provision the same card (on any replica) both
    // see the same newest token; the insert records a guard named after it
    // in the same transaction, so only one new token is stored and the
    // other request answers with it.
    let guard = IdempotencyRecord {
        key: format!(
            "vgs_cmp/provision/{}/after/{}",
            card.id,
            tokens
                .last()
                .map_or("none".to_owned(), |t| t.id.to_string())
        ),
        fingerprint: [0; 32],
        status: StatusCode::CREATED.as_u16(),
        body: token.id.to_string().into_bytes(),
        created_at: state.clock.now(),
    };
    // A guard past the idempotency TTL is no race any more: it gives way.
    let horizon = state.idempotency.horizon(state.config.idempotency_ttl);
    match state
        .tokens
        .insert(token.clone(), Some((guard, horizon)))
        .await?
    {
        Inserted::Stored => {
            audit.scheme = Some(token.scheme.as_str());
            audit.card = Some(card.pan.to_string());
            Ok(resource(state, StatusCode::CREATED, &token, &card, None))
        }
        Inserted::IdempotencyExists(winner) => {
            let winner = std::str::from_utf8(&winner.body)
                .ok()
                .and_then(TokenId::parse)
                .ok_or_else(|| ApiError::Internal("provision guard unreadable".into()))?;
            let token = state
                .tokens
                .get(winner)
                .await?
                .ok_or_else(|| ApiError::Internal("provision guard names no token".into()))?;
            Ok(resource(state, StatusCode::OK, &token, &card, None))
        }
    }
}

/// `DELETE /cards/{card_id}/network-tokens`: 204; the card's tokens become
/// `deleted` on the native API too, and their references die. A card
/// without a live token → 404.
pub async fn delete(
    state: &AppState,
    card_id: PciTokenId,
    audit: &mut Audit,
) -> Result<Response<Body>, SurfaceError> {
    let card = card(state, card_id, audit).await?;
    let tokens = state.tokens.find_tokens(TokenLookup::Card(card.id)).await?;
    let live: Vec<_> = tokens
        .iter()
        .filter(|t| t.status != TokenStatus::Deleted)
        .collect();
    if live.is_empty() {
        return Err(ApiError::TokenNotFound.into());
    }
    for t in live {
        tokens::delete_token(state, t.id).await?;
    }
    audit.change = Some("delete");
    Ok(crate::body::empty_response(StatusCode::NO_CONTENT))
}

/// `CryptoFetchRequest`, read into the native parameters.
#[derive(Debug)]
struct Fetch {
    params: CryptogramParams,
    account_funding: bool,
}

fn bad(field: &'static str, msg: &str) -> SurfaceError {
    SurfaceError::at(ApiError::InvalidRequest(format!("`{field}` {msg}")), field)
}

fn parse_fetch(body: Option<Map<String, Value>>) -> Result<Fetch, SurfaceError> {
    let empty = Map::new();
    let attrs = match &body {
        None => &empty,
        Some(obj) => {
            json::only_fields(obj, &["data"], "")?;
            let data = match obj.get("data") {
                Some(Value::Object(d)) => d,
                _ => return Err(bad("data", "is required and must be an object")),
            };
            json::only_fields(data, &["attributes"], "data.")?;
            match data.get("attributes") {
                Some(Value::Object(a)) => a,
                _ => return Err(bad("data.attributes", "is required and must be an object")),
            }
        }
    };
    json::only_fields(
        attrs,
        &[
            "currency_code",
            "amount",
            "transaction_type",
            "cryptogram_type",
        ],
        "data.attributes.",
    )?;
    let currency = match json::opt_str(attrs, "currency_code") {
        Ok(None) => "USD".to_owned(),
        Ok(Some(c)) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
            c.to_ascii_uppercase()
        }
        _ => {
            return Err(bad(
                "data.attributes.currency_code",
                "must be an ISO 4217 alpha-3 code",
            ))
        }
    };
    let amount = match attrs.get("amount") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(decimal_amount(n).ok_or_else(|| {
            bad(
                "data.attributes.amount",
                "must be a non-negative number in steps of 0.01",
            )
        })?),
        Some(_) => return Err(bad("data.attributes.amount", "must be a number")),
    };
    let account_funding = match json::opt_str(attrs, "transaction_type") {
        Ok(None | Some("ECOM")) => false,
        Ok(Some("AFT")) => true,
        _ => {
            return Err(bad(
                "data.attributes.transaction_type",
                "must be ECOM or AFT",
            ))
        }
    };
    let cryptogram_type = match json::opt_str(attrs, "cryptogram_type") {
        Ok(None | Some("TAVV")) => CryptogramType::Tavv,
        Ok(Some("DTVV")) => CryptogramType::DynamicCvv,
        _ => {
            return Err(bad(
                "data.attributes.cryptogram_type",
                "must be TAVV or DTVV",
            ))
        }
    };
    Ok(Fetch {
        params: CryptogramParams {
            kind: CryptogramKind::Ecom,
            cryptogram_type,
            amount,
            currency: Some(currency),
        },
        account_funding,
    })
}

/// A decimal amount with at most two fraction digits as the two-digit
/// string the rest of tokenrelay (and the acquirer's check) uses: `10` →
/// `10.00`.
fn decimal_amount(n: &serde_json::Number) -> Option<String> {
    let cents = if let Some(u) = n.as_u64() {
        u.checked_mul(100)?
    } else {
        let f = n.as_f64()?;
        let c = (f * 100.0).round();
        if !(0.0..=1e15).contains(&c) || (c - f * 100.0).abs() > 1e-6 {
            return None;
        }
        c as u64
    };
    (cents <= 100_000_000_000_000_000).then(|| format!("{}.{:02}", cents / 100, cents % 100))
}

/// Which request field a broken brand rule is about.
fn rule_field(rule: SchemeRule) -> &'static str {
    match rule {
        SchemeRule::DynamicCvvVisaOnly => "data.attributes.cryptogram_type",
        SchemeRule::AccountFundingVisaOnly
        | SchemeRule::TransactionTypeRequired
        | SchemeRule::InitiatedByRequired => "data.attributes.transaction_type",
        SchemeRule::AmountRequired | SchemeRule::RandomNumberRequired => "data.attributes.amount",
    }
}

/// `POST /cards/{card_id}/cryptogram` → 200 `NetworkTokenAndCryptogramResource`.
pub async fn cryptogram(
    state: &AppState,
    card_id: PciTokenId,
    req: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, SurfaceError> {
    let card = card(state, card_id, audit).await?;
    let fetch = parse_fetch(body_object(state, req).await?)?;
    let tokens = state.tokens.find_tokens(TokenLookup::Card(card.id)).await?;
    // The card's active token; else its newest, whose status says why not.
    let token = newest(&tokens, TokenStatus::Active)
        .or_else(|| tokens.last().map(AsRef::as_ref))
        .ok_or(ApiError::TokenNotActive("unprovisioned"))?;
    let brand = brand_rules(token.scheme);
    if token.status == TokenStatus::Active && fetch.account_funding && !brand.account_funding {
        return Err(ApiError::SchemeRule(SchemeRule::AccountFundingVisaOnly).into());
    }
    let mode = Mode::resolve(None, state.config.compliance_level)?;
    let issued =
        cryptograms::issue(state, token, &fetch.params, mode, Metadata::new(), audit).await?;
    Ok(resource(state, StatusCode::OK, token, &card, Some(&issued)))
}

/// The seed's fixed sandbox card art: colours, texts, and one image as a
/// `data:` URL, so nothing points at a host that does not exist.
fn card_art() -> Value {
    const SVG: &str = "data:image/svg+xml;base64,PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAwMC9zdmciIHdpZHRoPSI1MzYiIGhlaWdodD0iMzM4Ij48cmVjdCB3aWR0aD0iNTM2IiBoZWlnaHQ9IjMzOCIgcng9IjI0IiBmaWxsPSIjMUYzQTVGIi8+PHRleHQgeD0iMzIiIHk9IjMwMCIgZmlsbD0iI0ZGRkZGRiIgZm9udC1zaXplPSIyOCI+dG9rZW5yZWxheSBzYW5kYm94PC90ZXh0Pjwvc3ZnPg==";
    json!({
        "background_color": "#1F3A5F",
        "foreground_color": "#FFFFFF",
        "label_color": "#C9D6E3",
        "issuer_name": "tokenrelay sandbox issuer",
        "contact_website": "https://tokenrelay.invalid/sandbox",
        "contact_number": "+1-000-000-0000",
        "contact_name": "tokenrelay sandbox",
        "short_description": "Sandbox card",
        "long_description": "Card art returned by the tokenrelay sandbox token service for every card.",
        "assets": [{
            "type": "DIGITAL_CARD_ART",
            "mime_type": "image/svg+xml",
            "width": 536,
            "height": 338,
            "download_url": SVG,
        }],
    })
}

/// The sandbox payment account reference of a card: 29 characters, a
/// four-character sandbox "BIN controller" prefix and 25 from a hash of
/// the card's keyed fingerprint (stable per card, reveals nothing).
fn payment_account_reference(card: &PciToken) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"tokenrelay/par/v1/".as_slice(), &card.fingerprint].concat(),
    );
    let mut par = String::with_capacity(29);
    par.push_str("SBX1");
    par.extend(
        d.as_ref()[..25]
            .iter()
            .map(|b| ALPHABET[usize::from(b % 32)] as char),
    );
    par
}

fn state_name(status: TokenStatus) -> &'static str {
    match status {
        TokenStatus::Active => "ACTIVE",
        TokenStatus::Inactive => "INACTIVE",
        TokenStatus::Deleted => "DELETED",
        TokenStatus::Unprovisioned => "UNPROVISIONED",
    }
}

/// `NetworkTokenAttributes`.
fn attributes(token: &NetworkToken, card: &PciToken, level: ComplianceLevel) -> Map<String, Value> {
    let mut a = Map::new();
    a.insert(
        "payment_account_reference".into(),
        payment_account_reference(card).into(),
    );
    a.insert(
        "network_token".into(),
        token_number(&token.tpan, level).into(),
    );
    a.insert("last4".into(), token.tpan.last4().into());
    a.insert("bin".into(), token.tpan.first6().into());
    a.insert("exp_month".into(), token.expiry_month.into());
    a.insert("exp_year".into(), (token.expiry_year % 100).into());
    a.insert("created_at".into(), rfc3339(token.created_at).into());
    a.insert("updated_at".into(), rfc3339(token.updated_at).into());
    a.insert("state".into(), state_name(token.status).into());
    a
}

/// A `NetworkTokenResourceResponse`, or with `issued` a
/// `NetworkTokenAndCryptogramResource`.
fn resource(
    state: &AppState,
    status: StatusCode,
    token: &NetworkToken,
    card: &PciToken,
    issued: Option<&Issued>,
) -> Response<Body> {
    let mut attrs = attributes(token, card, state.config.compliance_level);
    let body = match issued {
        None => json!({"data": {
            "id": token.id,
            "type": "network_tokens",
            "attributes": attrs,
            "meta": {"card_art": card_art()},
        }}),
        Some(issued) => {
            let kind = match issued.cryptogram_type() {
                CryptogramType::Tavv => "TAVV",
                CryptogramType::DynamicCvv => "DTVV",
            };
            // Inline: the TAVV or DTVV itself; by reference: the `cref_…`
            // the forward redeems.
            attrs.insert(
                "cryptogram".into(),
                json!({"type": kind, "value": issued.value(), "eci": issued.eci()}),
            );
            json!({"data": {
                "id": token.id,
                "type": "network_tokens",
                "attributes": attrs,
            }})
        }
    };
    super::response(status, CONTENT_TYPE, &body)
}

/// The status an error answers with on this surface: the native one, but
/// an invalid card is a 400 (the seed's provisioning answers list no 422: a
/// stored card that has expired is "the request was invalid" there).
pub fn status(e: &ApiError) -> StatusCode {
    match e {
        ApiError::InvalidCard { .. } => StatusCode::BAD_REQUEST,
        other => other.status_and_classifier().0,
    }
}

/// An error as the seed's `ErrorResponse`: `{"errors": [{"summary",
/// "detail", "error_code", "path"?}]}`, `error_code` the native classifier.
pub fn error_response(e: SurfaceError) -> Response<Body> {
    let (_, classifier, detail) = e.error.describe();
    let status = status(&e.error);
    let field = e.field.or(match e.error {
        ApiError::SchemeRule(rule) => Some(rule_field(rule)),
        _ => None,
    });
    let mut item = json!({
        "summary": status.canonical_reason().unwrap_or("Error"),
        "detail": detail,
        "error_code": classifier,
    });
    if let (Some(field), Some(obj)) = (field, item.as_object_mut()) {
        obj.insert("path".into(), field.into());
    }
    super::error(&e.error, status, CONTENT_TYPE, &json!({ "errors": [item] }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operation `method` and `path` reach; its kind agrees.
    fn routed(method: &Method, path: &str) -> Operation {
        let m = route(method, path).unwrap();
        let op = m.route.unwrap();
        assert_eq!(op.kind(), m.kind, "{method} {path}");
        op
    }

    #[test]
    fn routes() {
        let card = "6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11";
        let id = pci::parse_id(card).unwrap();
        let p = format!("/cards/{card}/network-tokens");
        assert_eq!(routed(&Method::POST, &p), Operation::VgsProvision(id));
        assert_eq!(routed(&Method::DELETE, &p), Operation::VgsDelete(id));
        assert!(matches!(
            route(&Method::GET, &p),
            Err(ApiError::MethodNotAllowed(_))
        ));
        assert_eq!(
            routed(&Method::POST, &format!("/cards/{card}/cryptogram")),
            Operation::VgsCryptogram(id)
        );
        for bad in [
            "/cards/",
            "/cards//cryptogram",
            "/cards/x/other",
            "/cards/x",
        ] {
            assert!(
                matches!(route(&Method::POST, bad), Err(ApiError::RouteNotFound)),
                "{bad}"
            );
        }
        // A malformed card keeps its operation and is not found.
        for (method, path, kind) in [
            (
                Method::POST,
                "/cards/x/network-tokens",
                OperationKind::VgsProvision,
            ),
            (
                Method::DELETE,
                "/cards/x/network-tokens",
                OperationKind::VgsDelete,
            ),
            (
                Method::POST,
                "/cards/x/cryptogram",
                OperationKind::VgsCryptogram,
            ),
        ] {
            let m = route(&method, path).unwrap();
            assert_eq!(m.kind, kind, "{method} {path}");
            assert!(
                matches!(m.route, Err(ApiError::PciTokenNotFound)),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn amounts_become_two_digit_decimals() {
        let n = |v: Value| match v {
            Value::Number(n) => decimal_amount(&n),
            _ => None,
        };
        assert_eq!(n(json!(10)).as_deref(), Some("10.00"));
        assert_eq!(n(json!(10.5)).as_deref(), Some("10.50"));
        assert_eq!(n(json!(0.01)).as_deref(), Some("0.01"));
        assert_eq!(n(json!(19.99)).as_deref(), Some("19.99"));
        assert_eq!(n(json!(10.001)), None);
        assert_eq!(n(json!(-1)), None);
        assert_eq!(n(json!(-0.5)), None);
    }

    #[test]
    fn fetch_defaults_to_an_ecom_tavv_in_usd() {
        let f = parse_fetch(None).ok().unwrap();
        assert_eq!(f.params.cryptogram_type, CryptogramType::Tavv);
        assert_eq!(f.params.currency.as_deref(), Some("USD"));
        assert!(!f.account_funding && f.params.amount.is_none());
        let body = json!({"data": {"attributes": {"transaction_type": "PURCHASE"}}});
        let e = parse_fetch(body.as_object().cloned()).unwrap_err();
        assert_eq!(e.field, Some("data.attributes.transaction_type"));
        let body = json!({"data": {}});
        assert_eq!(
            parse_fetch(body.as_object().cloned()).unwrap_err().field,
            Some("data.attributes")
        );
    }
}
