//! Reading request JSON without ever echoing it.
//!
//! serde's typed errors quote the offending input ("invalid type: string
//! \"4111…\""), which would put card numbers into error messages. So bodies
//! are parsed into a `serde_json::Value` (syntax errors quote nothing) and
//! fields are taken out by these helpers, whose errors name the field only.
//! Timestamps go out through [`rfc3339`], shared by every resource.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::ApiError;
use crate::vault::Metadata;
/// The limits [`metadata`] enforces, defined beside [`Metadata`].
pub use crate::vault::{METADATA_MAX_KEY, METADATA_MAX_PAIRS, METADATA_MAX_VALUE};

/// RFC 3339 text of a timestamp, the one form every response writes.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Parses a body as a JSON object.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::InvalidRequest(
            "request body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidRequest(format!(
            "request body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))),
    }
}

/// Refuses fields outside `allowed`, naming the first stranger.
pub fn only_fields(obj: &Map<String, Value>, allowed: &[&str], at: &str) -> Result<(), ApiError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::InvalidRequest(format!(
            "unknown field `{at}{}`",
            truncate(k, 40)
        ))),
        None => Ok(()),
    }
}

/// A field name cut for use in messages. It is client input: echoed so the
/// merchant can find its mistake, unless it holds a digit run as long as a
/// card number (spaces and dashes ignored), which is never echoed.
fn truncate(s: &str, n: usize) -> String {
    let mut run = 0;
    for c in s.chars() {
        match c {
            '0'..='9' => run += 1,
            ' ' | '-' => {}
            _ => run = 0,
        }
        if run >= 12 {
            return "(redacted)".to_owned();
        }
    }
    s.chars().take(n).collect()
}

/// A field is present with the wrong JSON type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrongType;

/// An optional string field; `Err(WrongType)` when present but not a string.
pub fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, WrongType> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(WrongType),
    }
}

/// An optional integer given as a number or a decimal string.
pub fn opt_int(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, WrongType> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or(WrongType),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map(Some).map_err(|_| WrongType)
        }
        Some(_) => Err(WrongType),
    }
}

/// An optional boolean.
pub fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, WrongType> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(WrongType),
    }
}

/// Validates `metadata` (absent → empty): at most 20 pairs, keys ≤ 20
/// characters, values ≤ 80 characters, strings only.
pub fn metadata(obj: &Map<String, Value>) -> Result<Metadata, ApiError> {
    let m = match obj.get("metadata") {
        None | Some(Value::Null) => return Ok(Metadata::new()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::InvalidMetadata(
                "metadata must be an object of strings".into(),
            ))
        }
    };
    if m.len() > METADATA_MAX_PAIRS {
        return Err(ApiError::InvalidMetadata(format!(
            "at most {METADATA_MAX_PAIRS} pairs allowed, got {}",
            m.len()
        )));
    }
    let mut out = Metadata::new();
    for (k, v) in m {
        let kname = truncate(k, METADATA_MAX_KEY);
        if k.is_empty() || k.chars().count() > METADATA_MAX_KEY {
            return Err(ApiError::InvalidMetadata(format!(
                "keys must be 1 to {METADATA_MAX_KEY} characters (`{kname}…`)"
            )));
        }
        let Value::String(v) = v else {
            return Err(ApiError::InvalidMetadata(format!(
                "value of `{kname}` must be a string"
            )));
        };
        if v.chars().count() > METADATA_MAX_VALUE {
            return Err(ApiError::InvalidMetadata(format!(
                "value of `{kname}` exceeds {METADATA_MAX_VALUE} characters"
            )));
        }
        out.insert(k.clone(), v.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn md(v: Value) -> Result<Metadata, ApiError> {
        metadata(json!({ "metadata": v }).as_object().unwrap())
    }

    #[test]
    fn metadata_limits_at_and_beyond_the_edge() {
        let twenty: Map<String, Value> = (0..20)
            .map(|i| (format!("k{i}"), Value::String("v".into())))
            .collect();
        assert_eq!(md(Value::Object(twenty.clone())).unwrap().len(), 20);
        let mut twenty_one = twenty;
        twenty_one.insert("k20".into(), "v".into());
        assert!(md(Value::Object(twenty_one)).is_err());

        assert!(md(json!({ "a".repeat(20): "v" })).is_ok());
        assert!(md(json!({ "a".repeat(21): "v" })).is_err());
        assert!(md(json!({ "k": "é".repeat(80) })).is_ok());
        assert!(md(json!({ "k": "v".repeat(81) })).is_err());
        assert!(md(json!({ "k": 1 })).is_err());
        assert!(md(json!({ "": "v" })).is_err());
        assert!(md(json!(["k"])).is_err());
    }

    #[test]
    fn json_errors_never_quote_input() {
        let e = object(br#"{"number": "4111111111111111""#).unwrap_err();
        assert!(!e.to_string().contains("4111"), "{e}");
        let o = json!({ "4111 1111 1111 1111": "v" });
        let e = only_fields(o.as_object().unwrap(), &["source"], "").unwrap_err();
        assert!(!e.to_string().contains("1111"), "{e}");
        let e = md(json!({ "4111111111111111": 1 })).unwrap_err();
        assert!(!e.to_string().contains("1111"), "{e}");
        assert!(
            only_fields(json!({ "sourse": 1 }).as_object().unwrap(), &[], "")
                .unwrap_err()
                .to_string()
                .contains("sourse")
        );
    }
}
