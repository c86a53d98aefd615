//! The J.P. Morgan surface (seed 001, contract §12): `POST /cryptograms`.
//!
//! The token is named by `paymentInstrument.tokenReferenceIdentifier` (a
//! network token id) or by `tokenNumber` (the TPAN itself, only where the
//! compliance level lets the merchant hold one). The seed's brand table
//! ([`crate::tsp::brand_rules`]) is enforced with JPMC's field names, and
//! `tokenCryptogramType` must be one the token's brand issues
//! ([`crate::tsp::scheme_cryptogram_name`]). The answer is the request
//! echoed with the cryptogram (or its `cref_…` reference) in
//! `tokenAuthenticationValue`, the ECI, the token's expiry and number
//! (masked where required), and the response identifiers. The device block
//! is echoed, never stored.
//!
//! Amounts: `paymentOrder.amounts.amount` is in minor units of `currency`
//! (JPMC's convention: `1234` USD is 12.34), turned into the decimal the
//! cryptogram is bound to by the currency's ISO 4217 exponent.

use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use super::{body_object, token_number, Operation, OperationKind, SurfaceError};
use crate::api::cryptograms::{self, Mode};
use crate::api::{json, ApiError, Matched};
use crate::audit::{Audit, Subject};
use crate::card::{Brand, CardNumber};
use crate::tsp::{
    brand_rules, scheme_cryptogram_name, CryptogramKind, CryptogramParams, CryptogramType,
    SchemeRule,
};
use crate::vault::{Metadata, NetworkToken, TokenId, TokenLookup};
use crate::{AppState, Body};

/// The media type of every answer.
pub const CONTENT_TYPE: &str = "application/json";

/// Header whose value the answer echoes as `requestIdentifier`.
const REQUEST_ID: &str = "request-id";

/// Matches `/cryptograms`.
pub fn route(method: &Method, path: &str) -> Result<Matched<OperationKind, Operation>, ApiError> {
    match (path, method) {
        ("/cryptograms", &Method::POST) => Ok(Matched {
            kind: OperationKind::JpmcCryptogram,
            route: Ok(Operation::JpmcCryptogram),
        }),
        ("/cryptograms", _) => Err(ApiError::MethodNotAllowed("POST")),
        _ => Err(ApiError::RouteNotFound),
    }
}

/// `request-id` when the client sent a sane one, else a fresh UUID.
pub fn request_identifier(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

fn bad(field: &'static str, msg: &str) -> SurfaceError {
    SurfaceError::at(ApiError::InvalidRequest(format!("`{field}` {msg}")), field)
}

fn missing(field: &'static str, brand: Brand) -> SurfaceError {
    SurfaceError::at(
        ApiError::InvalidCryptogramRequest(format!(
            "`{field}` is required for {} tokens",
            brand.as_str()
        )),
        field,
    )
}

/// An optional member that must be an object when present.
fn object<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<&'a Map<String, Value>>, SurfaceError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(bad(field, "must be an object")),
    }
}

/// A present, non-empty string of at most 64 characters.
fn short_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<&'a str>, SurfaceError> {
    match json::opt_str(obj, key) {
        Ok(None) => Ok(None),
        Ok(Some(s)) if !s.is_empty() && s.chars().count() <= 64 => Ok(Some(s)),
        _ => Err(bad(field, "must be a string of 1 to 64 characters")),
    }
}

/// Digits of the currency's minor unit (ISO 4217); 2 unless listed.
fn minor_unit_digits(currency: &str) -> usize {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// `1234` minor units of a two-digit currency → `12.34`.
fn decimal(minor: u64, digits: usize) -> String {
    if digits == 0 {
        return minor.to_string();
    }
    let s = format!("{minor:0>width$}", width = digits + 1);
    let (int, frac) = s.split_at(s.len() - digits);
    format!("{int}.{frac}")
}

/// The token the instrument names.
async fn token(
    state: &AppState,
    instrument: &Map<String, Value>,
) -> Result<std::sync::Arc<NetworkToken>, SurfaceError> {
    const REF: &str = "paymentInstrument.tokenReferenceIdentifier";
    const NUMBER: &str = "paymentInstrument.tokenNumber";
    let reference = short_str(instrument, "tokenReferenceIdentifier", REF)?;
    // A masked number (as this API answers with) names nothing; only
    // digits are a token number.
    let number = match json::opt_str(instrument, "tokenNumber") {
        Ok(Some(n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => Some(n),
        Ok(_) => None,
        Err(_) => return Err(bad(NUMBER, "must be a string")),
    };
    if number.is_some() && !state.config.compliance_level.handles_card_data() {
        return Err(SurfaceError::at(
            ApiError::SourceNotPermitted("tokenNumber", "saq-a"),
            NUMBER,
        ));
    }
    let number = number
        .map(|n| CardNumber::parse(n).ok_or_else(|| bad(NUMBER, "must be 12 to 19 digits")))
        .transpose()?;
    match (reference, number) {
        (Some(id), number) => {
            let token = state
                .tokens
                .get(TokenId::parse(id).ok_or(ApiError::TokenNotFound)?)
                .await?
                .ok_or(ApiError::TokenNotFound)?;
            if number.is_some_and(|n| n != token.tpan) {
                return Err(bad(NUMBER, "does not belong to tokenReferenceIdentifier"));
            }
            Ok(token)
        }
        (None, Some(number)) => Ok(state
            .tokens
            .find_tokens(TokenLookup::Number(&number))
            .await?
            .pop()
            .ok_or(ApiError::TokenNotFound)?),
        (None, None) => Err(bad(REF, "or tokenNumber is required")),
    }
}

/// `POST /cryptograms` → 200, the request echoed with the cryptogram.
pub async fn cryptogram(
    state: &AppState,
    request_id: &str,
    req: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, SurfaceError> {
    let mut body = body_object(state, req)
        .await?
        .ok_or_else(|| bad("paymentInstrument", "is required"))?;
    let empty = Map::new();
    let order = object(&body, "paymentOrder", "paymentOrder")?.unwrap_or(&empty);
    let amounts = object(order, "amounts", "paymentOrder.amounts")?.unwrap_or(&empty);
    let instrument = object(&body, "paymentInstrument", "paymentInstrument")?
        .ok_or_else(|| bad("paymentInstrument", "is required"))?;

    let token = token(state, instrument).await?;
    audit.subject = Some(Subject::NetworkToken(token.id));
    let brand = token.scheme;

    // The seed's brand table, row by row, in this API's names.
    let rules = brand_rules(brand);
    let transaction_type = short_str(order, "transactionType", "paymentOrder.transactionType")?;
    let initiated_by = short_str(order, "initiatedBy", "paymentOrder.initiatedBy")?;
    let random_number = match instrument.get("randomNumber") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 64 => Some(()),
        Some(Value::Number(n)) if n.is_u64() => Some(()),
        Some(_) => {
            return Err(bad(
                "paymentInstrument.randomNumber",
                "must be a string or a non-negative integer",
            ))
        }
    };
    let currency = match short_str(amounts, "currency", "paymentOrder.amounts.currency")? {
        None => "USD".to_owned(),
        Some(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
            c.to_ascii_uppercase()
        }
        Some(_) => {
            return Err(bad(
                "paymentOrder.amounts.currency",
                "must be an ISO 4217 alpha-3 code",
            ))
        }
    };
    let amount = match amounts.get("amount") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(minor) if minor <= 999_999_999_999_999 => {
                Some(decimal(minor, minor_unit_digits(&currency)))
            }
            _ => {
                return Err(bad(
                    "paymentOrder.amounts.amount",
                    "must be a non-negative integer in minor units",
                ))
            }
        },
        Some(_) => return Err(bad("paymentOrder.amounts.amount", "must be a number")),
    };
    if rules.transaction_type && transaction_type.is_none() {
        return Err(missing("paymentOrder.transactionType", brand));
    }
    if rules.initiated_by && initiated_by.is_none() {
        return Err(missing("paymentOrder.initiatedBy", brand));
    }
    if rules.random_number && random_number.is_none() {
        return Err(missing("paymentInstrument.randomNumber", brand));
    }
    if rules.amount && amount.is_none() {
        return Err(missing("paymentOrder.amounts.amount", brand));
    }

    const TYPE: &str = "paymentInstrument.tokenCryptogramType";
    let cryptogram_type = match json::opt_str(instrument, "tokenCryptogramType") {
        Ok(None) => CryptogramType::Tavv,
        Ok(Some(name)) => [CryptogramType::Tavv, CryptogramType::DynamicCvv]
            .into_iter()
            .find(|t| scheme_cryptogram_name(brand, *t) == Some(name))
            .ok_or_else(|| {
                SurfaceError::at(
                    ApiError::InvalidCryptogramRequest(format!(
                        "`{TYPE}` must be one that {} tokens issue ({})",
                        brand.as_str(),
                        [CryptogramType::Tavv, CryptogramType::DynamicCvv]
                            .into_iter()
                            .filter_map(|t| scheme_cryptogram_name(brand, t))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    TYPE,
                )
            })?,
        Err(_) => return Err(bad(TYPE, "must be a string")),
    };
    let type_name = scheme_cryptogram_name(brand, cryptogram_type).unwrap_or("TAVV");

    let params = CryptogramParams {
        kind: CryptogramKind::Ecom,
        cryptogram_type,
        amount,
        currency: Some(currency),
    };
    let mode = Mode::resolve(None, state.config.compliance_level)?;
    let issued = cryptograms::issue(state, &token, &params, mode, Metadata::new(), audit).await?;

    // The echo: the request as sent, with the token's values in place.
    let mut instrument = instrument.clone();
    let level = state.config.compliance_level;
    instrument.insert(
        "tokenReferenceIdentifier".into(),
        token.id.to_string().into(),
    );
    instrument.insert(
        "tokenNumber".into(),
        token_number(&token.tpan, level).into(),
    );
    instrument.insert("tokenAuthenticationValue".into(), issued.value().into());
    instrument.insert("electronicCommerceIndicator".into(), issued.eci().into());
    instrument.insert(
        "expiry".into(),
        json!({"month": token.expiry_month, "year": token.expiry_year}),
    );
    instrument.insert("tokenCryptogramType".into(), type_name.into());
    instrument
        .entry("tokenType")
        .or_insert_with(|| "NETWORK".into());
    let now = OffsetDateTime::now_utc();
    let timestamp = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    );
    let mut out = Map::new();
    out.insert("identifier".into(), uuid::Uuid::new_v4().to_string().into());
    out.insert("timestamp".into(), timestamp.into());
    out.insert("paymentInstrument".into(), Value::Object(instrument));
    if let Some(order) = body.remove("paymentOrder") {
        out.insert("paymentOrder".into(), order);
    }
    out.insert("requestIdentifier".into(), request_id.into());
    out.insert("responseStatus".into(), "SUCCESS".into());
    out.insert("responseCode".into(), "ACCEPTED".into());
    out.insert(
        "responseMessage".into(),
        "The request is well received.".into(),
    );
    Ok(super::response(
        StatusCode::OK,
        CONTENT_TYPE,
        &Value::Object(out),
    ))
}

/// A brand rule broken below this surface, in this API's field names.
fn rule_message(rule: SchemeRule) -> &'static str {
    match rule {
        SchemeRule::DynamicCvvVisaOnly => {
            "invalid cryptogram request: `paymentInstrument.tokenCryptogramType` DTVV is issued for visa tokens only"
        }
        SchemeRule::AccountFundingVisaOnly => {
            "invalid cryptogram request: account funding is supported for visa tokens only"
        }
        SchemeRule::AmountRequired => {
            "invalid cryptogram request: `paymentOrder.amounts.amount` is required for amex tokens"
        }
        SchemeRule::TransactionTypeRequired => {
            "invalid cryptogram request: `paymentOrder.transactionType` is required for visa tokens"
        }
        SchemeRule::InitiatedByRequired => {
            "invalid cryptogram request: `paymentOrder.initiatedBy` is required for visa tokens"
        }
        SchemeRule::RandomNumberRequired => {
            "invalid cryptogram request: `paymentInstrument.randomNumber` is required for mastercard tokens"
        }
    }
}

/// The status an error answers with on this surface: the native one, but
/// the seed's table answers a broken brand rule or a missing field with a
/// bad request.
pub fn status(e: &ApiError) -> StatusCode {
    match e {
        ApiError::SchemeRule(_) | ApiError::InvalidCryptogramRequest(_) => StatusCode::BAD_REQUEST,
        other => other.status_and_classifier().0,
    }
}

/// An error in this API's shape: `{"responseStatus": "FAILURE",
/// "responseCode": <CLASSIFIER>, "responseMessage", "requestIdentifier"}`.
pub fn error_response(e: SurfaceError, request_id: &str) -> Response<Body> {
    let (_, classifier, message) = e.error.describe();
    let status = status(&e.error);
    let message = match e.error {
        ApiError::SchemeRule(rule) => rule_message(rule).to_owned(),
        _ => message,
    };
    super::error(
        &e.error,
        status,
        CONTENT_TYPE,
        &json!({
            "responseStatus": "FAILURE",
            "responseCode": classifier.to_ascii_uppercase(),
            "responseMessage": message,
            "requestIdentifier": request_id,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_units_by_currency_exponent() {
        assert_eq!(decimal(1234, 2), "12.34");
        assert_eq!(decimal(5, 2), "0.05");
        assert_eq!(decimal(1000, 2), "10.00");
        assert_eq!(decimal(1234, 0), "1234");
        assert_eq!(decimal(1234, 3), "1.234");
        assert_eq!(minor_unit_digits("JPY"), 0);
        assert_eq!(minor_unit_digits("KWD"), 3);
        assert_eq!(minor_unit_digits("USD"), 2);
    }

    #[test]
    fn routes() {
        let m = route(&Method::POST, "/cryptograms").unwrap();
        assert_eq!(m.kind, OperationKind::JpmcCryptogram);
        assert_eq!(m.route.unwrap(), Operation::JpmcCryptogram);
        assert!(matches!(
            route(&Method::GET, "/cryptograms"),
            Err(ApiError::MethodNotAllowed(_))
        ));
        assert!(matches!(
            route(&Method::POST, "/cryptograms/x"),
            Err(ApiError::RouteNotFound)
        ));
    }
}
