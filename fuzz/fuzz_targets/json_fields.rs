//! The request-JSON field readers (src/api/json.rs: `object`,
//! `only_fields`, `opt_str`, `opt_int`, `opt_bool`, `metadata`) and the
//! card reader built on them (src/api/pci.rs `card_input`), on any bytes
//! as a request body (and its `source` object, as provisioning reads it).
//!
//! Invariants: nothing panics; each reader's answer agrees with the JSON
//! value it read; metadata that is accepted is within its limits; a card
//! that is accepted has a valid month, a 3- or 4-digit CVC and a name of at
//! most 100 characters, and neither its `Debug` nor any error shows a
//! card number: no message (`Display` or `Debug`) holds a run of 12 or
//! more digits (spaces and dashes ignored), and a body that is not an
//! object gets one of two fixed messages that quote nothing.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use tokenrelay::api::json::{
    metadata, object, only_fields, opt_bool, opt_int, opt_str, WrongType, METADATA_MAX_KEY,
    METADATA_MAX_PAIRS, METADATA_MAX_VALUE,
};
use tokenrelay::api::pci::card_input;

/// The longest digit run in `s`, spaces and dashes ignored (the rule
/// `api::json` masks field names by).
fn digit_run(s: &str) -> usize {
    let (mut run, mut max) = (0, 0);
    for c in s.chars() {
        match c {
            '0'..='9' => run += 1,
            ' ' | '-' => {}
            _ => run = 0,
        }
        max = max.max(run);
    }
    max
}

fn quotes_no_card_number(e: &impl std::fmt::Display, d: &impl std::fmt::Debug) {
    for text in [e.to_string(), format!("{d:?}")] {
        assert!(
            digit_run(&text) < 12,
            "an error shows a digit run: {text:?}"
        );
    }
}

const FIELDS: [&str; 9] = [
    "number",
    "expiry_month",
    "expiry_year",
    "cvc",
    "cardholder_name",
    "metadata",
    "type",
    "source",
    "dauth_activated",
];

fn readers(obj: &Map<String, Value>) {
    let keys: Vec<&str> = obj.keys().map(String::as_str).chain(FIELDS).collect();
    for key in keys {
        let v = obj.get(key);
        let absent = matches!(v, None | Some(Value::Null));
        match opt_str(obj, key) {
            Ok(None) => assert!(absent),
            Ok(Some(s)) => assert_eq!(v, Some(&Value::String(s.to_owned()))),
            Err(WrongType) => assert!(!absent && !matches!(v, Some(Value::String(_)))),
        }
        match opt_bool(obj, key) {
            Ok(None) => assert!(absent),
            Ok(Some(b)) => assert_eq!(v, Some(&Value::Bool(b))),
            Err(WrongType) => assert!(!absent && !matches!(v, Some(Value::Bool(_)))),
        }
        match (opt_int(obj, key), v) {
            (Ok(None), _) => assert!(absent),
            (Ok(Some(n)), Some(Value::Number(m))) => assert_eq!(m.as_i64(), Some(n)),
            (Ok(Some(n)), Some(Value::String(s))) => {
                assert!(s.bytes().all(|b| b.is_ascii_digit()));
                assert_eq!(s.parse::<i64>().ok(), Some(n));
            }
            (Ok(Some(_)), _) => panic!("an integer from neither a number nor a string"),
            (Err(WrongType), _) => assert!(!absent),
        }
    }
    match only_fields(obj, &FIELDS, "source.") {
        Ok(()) => assert!(obj.keys().all(|k| FIELDS.contains(&k.as_str()))),
        Err(e) => {
            assert!(obj.keys().any(|k| !FIELDS.contains(&k.as_str())));
            quotes_no_card_number(&e, &e);
        }
    }
    match metadata(obj) {
        Ok(m) => {
            assert!(m.len() <= METADATA_MAX_PAIRS);
            for (k, v) in &m {
                assert!((1..=METADATA_MAX_KEY).contains(&k.chars().count()));
                assert!(v.chars().count() <= METADATA_MAX_VALUE);
                assert_eq!(obj["metadata"][k], Value::String(v.clone()));
            }
        }
        Err(e) => quotes_no_card_number(&e, &e),
    }
    match card_input(obj) {
        Ok(card) => {
            assert!((1..=12).contains(&card.expiry_month));
            let number = obj["number"].as_str().unwrap_or_default();
            assert!(
                !format!("{:?}", card.pan).contains(number),
                "Debug shows the PAN"
            );
            if let Some(cvc) = &card.cvc {
                let given = obj["cvc"].as_str().unwrap_or_default();
                assert!(
                    (3..=4).contains(&given.len()) && given.bytes().all(|b| b.is_ascii_digit())
                );
                assert!(!format!("{cvc:?}").contains(given), "Debug shows the CVC");
            }
            if let Some(name) = &card.cardholder_name {
                assert!(name.chars().count() <= 100);
            }
        }
        Err(e) => quotes_no_card_number(&e, &e),
    }
}

fuzz_target!(|data: &[u8]| {
    match object(data) {
        Ok(obj) => {
            readers(&obj);
            if let Some(Value::Object(source)) = obj.get("source") {
                readers(source);
            }
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                text == "request body must be a JSON object"
                    || text.starts_with("request body is not valid JSON (line "),
                "{text:?}"
            );
            quotes_no_card_number(&e, &e);
        }
    }
});
