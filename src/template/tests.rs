//! The template's unit tests and properties: parsing and its errors,
//! each context's escaping, filters, the size bound, and literal bytes
//! passing through unchanged.

use std::collections::BTreeMap;

use memchr::memmem;
use proptest::prelude::*;

use super::*;

/// Fixed test values; `overrides` replaces single fields.
struct V {
    meta: BTreeMap<String, String>,
    overrides: Vec<(Field, Value<'static>)>,
}

impl V {
    fn new() -> V {
        let mut meta = BTreeMap::new();
        meta.insert("order_id".to_owned(), "ord-1".to_owned());
        meta.insert("note".to_owned(), "a\"b\nc".to_owned());
        V {
            meta,
            overrides: Vec::new(),
        }
    }

    fn with(mut self, field: Field, value: Value<'static>) -> V {
        self.overrides.push((field, value));
        self
    }
}

impl Values for V {
    fn get(&self, field: Field, key: Option<&str>) -> Value<'_> {
        if let Some((_, v)) = self.overrides.iter().find(|(f, _)| *f == field) {
            return *v;
        }
        match field {
            Field::Number | Field::AccountNumber => Value::Str("4111111111111111"),
            Field::Cryptogram => Value::Str("AgAAAAAAAIR8CQrXcIhbQAAAAAA="),
            Field::Eci => Value::Str("05"),
            Field::ExpiryMonth => Value::Int(3),
            Field::ExpiryYear => Value::Int(2029),
            Field::SupportsDeviceBinding => Value::Bool(true),
            Field::DynamicCvv => Value::Null,
            Field::Metadata | Field::SchemeMetadata | Field::NetworkTokenMetadata => match key {
                None => Value::Map(&self.meta),
                Some(k) => self.meta.get(k).map_or(Value::Null, |v| Value::Str(v)),
            },
            Field::CardholderName => Value::Str("Zoë O'Brien <z>"),
            _ => Value::Str("x"),
        }
    }
}

fn render_with(input: &str, syntax: Syntax, ctx: Context, values: &V) -> String {
    let t = Template::parse(input.as_bytes(), syntax, ctx, Namespace::NetworkToken)
        .unwrap_or_else(|e| panic!("parse {input:?}: {e}"));
    String::from_utf8(t.render_to_vec(input.as_bytes(), values)).unwrap()
}

fn render(input: &str, ctx: Context) -> String {
    render_with(input, Syntax::Angle, ctx, &V::new())
}

fn render_pci(input: &str, ctx: Context) -> String {
    let t = Template::parse(input.as_bytes(), Syntax::Angle, ctx, Namespace::PciToken).unwrap();
    String::from_utf8(t.render_to_vec(input.as_bytes(), &V::new())).unwrap()
}

fn err(input: &str, ns: Namespace) -> String {
    match Template::parse(input.as_bytes(), Syntax::Angle, Context::Raw, ns) {
        Ok(_) => panic!("{input:?} parsed"),
        Err(e) => e.to_string(),
    }
}

const NT_NAMES: &[&str] = &[
    "cryptogram",
    "dynamic_cvv",
    "eci",
    "expiry_month",
    "expiry_year",
    "number",
    "type",
    "metadata",
    "metadata.order_id",
    "scheme_reference",
    "scheme_metadata",
    "scheme_metadata.k",
    "status",
    "supports_device_binding",
    "network_token_id",
    "network_token_type",
    "network_token_metadata",
    "network_token_metadata.A-z_09",
];

const PCI_NAMES: &[&str] = &[
    "account_number",
    "expiry_month",
    "expiry_year",
    "cardholder_name",
    "security_code",
    "bin",
    "last4",
    "metadata",
    "metadata.order_id",
    "pci_token_id",
];

#[test]
fn every_name_parses_in_its_namespace_only() {
    for (ns, names, other) in [
        (Namespace::NetworkToken, NT_NAMES, PCI_NAMES),
        (Namespace::PciToken, PCI_NAMES, NT_NAMES),
    ] {
        for name in names {
            let input = format!("<< {name} >>");
            let t = Template::parse(input.as_bytes(), Syntax::Angle, Context::Json, ns)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let p = t.placeholders().next().unwrap();
            let base = name.split('.').next().unwrap();
            assert_eq!(p.field.name(), base);
            assert_eq!(p.key.as_deref(), name.split_once('.').map(|(_, k)| k));
        }
        for name in other.iter().filter(|n| !names.contains(n)) {
            let e = err(&format!("<< {name} >>"), ns);
            assert_eq!(e, format!("unknown placeholder `{name}` at byte 0"));
        }
    }
    // Every field is reachable in some namespace, with a distinct name.
    for f in Field::ALL {
        let ns = if f.in_namespace(Namespace::NetworkToken) {
            Namespace::NetworkToken
        } else {
            Namespace::PciToken
        };
        assert_eq!(Field::from_name(f.name().as_bytes(), ns), Some(f));
    }
}

#[test]
fn errors_name_the_offender() {
    let nt = Namespace::NetworkToken;
    assert_eq!(
        err(r#"{"card": {"number": "<< numbr >>"}}"#, nt),
        "unknown placeholder `numbr` at byte 21"
    );
    assert_eq!(
        err("<< number | upper >>", nt),
        "unknown filter `upper` in placeholder `number` at byte 0"
    );
    assert_eq!(err("ab << number", nt), "unclosed placeholder at byte 3");
    assert_eq!(
        err("<< number >> <<", nt),
        "unclosed placeholder at byte 13"
    );
    assert_eq!(err("abc<<  >>", nt), "empty placeholder at byte 3");
    assert_eq!(err("<<>>", nt), "empty placeholder at byte 0");
    assert_eq!(err("<< | unwrap >>", nt), "empty placeholder at byte 0");
    assert!(err("<< number.x >>", nt).starts_with("`number` takes no key"));
    assert!(err("<< metadata. >>", nt).starts_with("invalid key `` for `metadata`"));
    assert!(err("<< metadata.a.b >>", nt).starts_with("invalid key `a.b` for `metadata`"));
    assert!(err("<< metadata.abcdefghijklmnopqrstu >>", nt).contains("invalid key"));
    assert!(err("<< metadata.a b >>", nt).contains("invalid key `a b`"));
    assert_eq!(
        err("<< number | unwrap | >>", nt),
        "empty filter in placeholder `number` at byte 0"
    );
    assert_eq!(
        err("<< account_number >>", nt),
        "unknown placeholder `account_number` at byte 0"
    );
    assert_eq!(
        err("<< number >>", Namespace::PciToken),
        "unknown placeholder `number` at byte 0"
    );
    // A card number written where a name goes is not echoed back.
    let e = err("<< 4111111111111111 >>", nt);
    assert!(!e.contains("4111111111111111"), "{e}");
    assert!(e.contains("****************"), "{e}");
    // Long garbage is cut; control characters are escaped.
    let long = format!("<< {} >>", "z".repeat(500));
    assert!(err(&long, nt).len() < 120);
    assert!(!err("<< a\nb >>", nt).contains('\n'));
    // The error type is a std error.
    let e: Box<dyn std::error::Error> =
        Box::new(Template::parse(b"<<", Syntax::Angle, Context::Raw, nt).unwrap_err());
    assert_eq!(e.to_string(), "unclosed placeholder at byte 0");
}

#[test]
fn both_syntaxes_and_whitespace() {
    for input in [
        "<<number>>",
        "<<  number|unwrap  >>",
        "<<\tnumber\t|\tunwrap>>",
    ] {
        let t = Template::parse(
            input.as_bytes(),
            Syntax::Angle,
            Context::Raw,
            Namespace::NetworkToken,
        )
        .unwrap();
        assert_eq!(t.placeholders().next().unwrap().field, Field::Number);
    }
    assert_eq!(
        render_with(
            "n={{number}}&e={{ eci | unwrap }}",
            Syntax::Braces,
            Context::Raw,
            &V::new()
        ),
        "n=4111111111111111&e=\"05\""
    );
    // The other syntax's delimiters are literal text.
    assert_eq!(
        render_with(
            "<< number >> {{ number }}",
            Syntax::Braces,
            Context::Raw,
            &V::new()
        ),
        "<< number >> 4111111111111111"
    );
    let t = Template::parse(
        b"{{ number }}",
        Syntax::Angle,
        Context::Raw,
        Namespace::NetworkToken,
    )
    .unwrap();
    assert!(t.is_static());
    // Close is the first close delimiter after the open one.
    assert_eq!(render("[<<eci>>>]", Context::Raw), "[05>]");
    assert_eq!(
        render("<<number>><<eci>>", Context::Raw),
        "411111111111111105"
    );
}

#[test]
fn json_inside_and_outside_strings() {
    let c = Context::Json;
    // Outside a string literal a string value is quoted.
    assert_eq!(
        render(r#"{"n": "<< number >>", "e": << eci >>}"#, c),
        r#"{"n": "4111111111111111", "e": "05"}"#
    );
    // Escaped quotes before the placeholder do not end the string.
    let v = V::new().with(Field::Number, Value::Str("q\"\n"));
    assert_eq!(
        render_with(r#"{"a\"b": "<< number >>"}"#, Syntax::Angle, c, &v),
        r#"{"a\"b": "q\"\n"}"#
    );
    assert_eq!(
        render_with(r#"{"k": "x\\", "n": "<< number >>"}"#, Syntax::Angle, c, &v),
        r#"{"k": "x\\", "n": "q\"\n"}"#
    );
    // Partial content of a string.
    assert_eq!(
        render_with(r#"{"n": "pre <<number>> post"}"#, Syntax::Angle, c, &v),
        r#"{"n": "pre q\"\n post"}"#
    );
    // Outside a string: quoted and escaped, never raw.
    assert_eq!(
        render_with(r#"{"n": <<number>>}"#, Syntax::Angle, c, &v),
        r#"{"n": "q\"\n"}"#
    );
    // The injection the issue showed: a value that would add keys
    // stays one string.
    let v = V::new().with(
        Field::Metadata,
        Value::Str(r#"1, "amount": 999999, "z": ""#),
    );
    let out = render_with(
        r#"{"amount": 100, "note": << metadata.x >>}"#,
        Syntax::Angle,
        c,
        &v,
    );
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed["amount"], 100);
    assert_eq!(parsed["note"], r#"1, "amount": 999999, "z": ""#);
    assert_eq!(parsed.as_object().unwrap().len(), 2);
    // Numbers, booleans and maps keep their JSON form; no value is null.
    assert_eq!(
        render(
            r#"[<< expiry_month >>, << supports_device_binding >>, << dynamic_cvv >>, << metadata.nope >>]"#,
            c
        ),
        r#"[3, true, null, null]"#
    );
    assert_eq!(
        render(r#"{"y": << expiry_year | yy >>}"#, c),
        r#"{"y": "29"}"#
    );
    let v = V::new().with(Field::Number, Value::Str("\u{1}\t\r\u{8}\u{c}\\"));
    assert_eq!(
        render_with(r#""<<number>>""#, Syntax::Angle, c, &v),
        r#""\u0001\t\r\b\f\\""#
    );
}

#[test]
fn json_unwrap() {
    let c = Context::Json;
    let t = |v: Value<'static>| {
        render_with(
            r#"{"exp": "<< expiry_month | unwrap >>"}"#,
            Syntax::Angle,
            c,
            &V::new().with(Field::ExpiryMonth, v),
        )
    };
    assert_eq!(t(Value::Int(12)), r#"{"exp": 12}"#);
    assert_eq!(t(Value::Int(-7)), r#"{"exp": -7}"#);
    assert_eq!(t(Value::Bool(false)), r#"{"exp": false}"#);
    assert_eq!(t(Value::Null), r#"{"exp": null}"#);
    assert_eq!(t(Value::Str("abc")), r#"{"exp": "abc"}"#);
    assert_eq!(t(Value::Str("a\"b")), r#"{"exp": "a\"b"}"#);
    assert_eq!(
        render(r#"{"m": "<< metadata | unwrap >>"}"#, c),
        r#"{"m": {"note":"a\"b\nc","order_id":"ord-1"}}"#
    );
    // Outside quotes.
    assert_eq!(
        render(r#"{"exp": << expiry_month | unwrap >>}"#, c),
        r#"{"exp": 3}"#
    );
    // Partial content: the JSON form, escaped as string content.
    assert_eq!(
        render(r#"{"x": "e=<< eci | unwrap >>"}"#, c),
        r#"{"x": "e=\"05\""}"#
    );
    assert_eq!(
        render(r#"{"x": "<< eci | unwrap >>!"}"#, c),
        r#"{"x": "\"05\"!"}"#
    );
    assert_eq!(
        render(r#"{"x": "<< metadata | unwrap >> "}"#, c),
        r#"{"x": "{\"note\":\"a\\\"b\\nc\",\"order_id\":\"ord-1\"} "}"#
    );
    // Two whole-content placeholders back to back.
    assert_eq!(
        render(
            r#"["<< expiry_month | unwrap >>","<< expiry_year | unwrap >>"]"#,
            c
        ),
        "[3,2029]"
    );
    // A quote before the open delimiter that closes a string is not an
    // opening quote.
    assert_eq!(
        render(r#"{"a":"b"<< expiry_month | unwrap >>"}"#, c),
        r#"{"a":"b"3"}"#
    );
    // Without unwrap the quotes stay.
    assert_eq!(
        render(r#"{"exp": "<< expiry_month >>"}"#, c),
        r#"{"exp": "3"}"#
    );
    // Map without unwrap inside a string: escaped JSON text.
    assert_eq!(
        render(r#"{"m": "<< metadata >>"}"#, c),
        r#"{"m": "{\"note\":\"a\\\"b\\nc\",\"order_id\":\"ord-1\"}"}"#
    );
    assert_eq!(
        render(r#"{"o": "<< metadata.order_id | unwrap >>"}"#, c),
        r#"{"o": "ord-1"}"#
    );
    assert_eq!(
        render(r#"{"o": "<< metadata.nope | unwrap >>"}"#, c),
        r#"{"o": null}"#
    );
    assert_eq!(render(r#"{"o": "<< metadata.nope >>"}"#, c), r#"{"o": ""}"#);
    assert_eq!(
        render(r#"{"b": "<< supports_device_binding | unwrap >>"}"#, c),
        r#"{"b": true}"#
    );
}

#[test]
fn rendered_json_is_valid_json() {
    let v = V::new()
        .with(Field::Number, Value::Str("\"\\\n\u{0}é"))
        .with(Field::Cryptogram, Value::Null);
    let input = r#"{"a\"\\": "<< number >>", "b": "<< number | unwrap >>", "c": "x<< number | unwrap >>", "d": "<< metadata >>", "e": << metadata | unwrap >>, "f": "<< cryptogram | unwrap >>", "g": "<< expiry_month | unwrap >>"}"#;
    let out = render_with(input, Syntax::Angle, Context::Json, &v);
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed["b"], "\"\\\n\u{0}é");
    assert_eq!(parsed["a\"\\"], "\"\\\n\u{0}é");
    assert_eq!(parsed["e"]["order_id"], "ord-1");
    assert_eq!(parsed["f"], serde_json::Value::Null);
    assert_eq!(parsed["g"], 3);
}

#[test]
fn form_xml_header_url_escaping() {
    let v = V::new().with(Field::Number, Value::Str("a b&c=d/é~.-_\r\n\t\u{7f}<'\">"));
    assert_eq!(
        render_with("n=<< number >>&x=1", Syntax::Angle, Context::Form, &v),
        "n=a%20b%26c%3Dd%2F%C3%A9~.-_%0D%0A%09%7F%3C%27%22%3E&x=1"
    );
    assert_eq!(
        render_with("/v1/<< number >>/x", Syntax::Angle, Context::UrlPath, &v),
        "/v1/a%20b%26c%3Dd%2F%C3%A9~.-_%0D%0A%09%7F%3C%27%22%3E/x"
    );
    assert_eq!(
        render_with("q=<< number >>", Syntax::Angle, Context::UrlQuery, &v),
        "q=a%20b%26c%3Dd%2F%C3%A9~.-_%0D%0A%09%7F%3C%27%22%3E"
    );
    assert_eq!(
        render_with("<p a=\"<< number >>\"/>", Syntax::Angle, Context::Xml, &v),
        "<p a=\"a b&amp;c=d/é~.-_\r\n\t\u{7f}&lt;&apos;&quot;&gt;\"/>"
    );
    assert_eq!(
        render_with(
            "Bearer << number >>\r\n",
            Syntax::Angle,
            Context::Header,
            &v
        ),
        "Bearer a b&c=d/é~.-_\t<'\">\r\n"
    );
    assert_eq!(
        render_with("<< number >>", Syntax::Angle, Context::Raw, &v),
        "a b&c=d/é~.-_\r\n\t\u{7f}<'\">"
    );
    // unwrap in a non-JSON context: the JSON form, escaped there.
    assert_eq!(render("e=<< eci | unwrap >>", Context::Form), "e=%2205%22");
    assert_eq!(
        render("<e><< metadata | unwrap >></e>", Context::Xml),
        "<e>{&quot;note&quot;:&quot;a\\&quot;b\\nc&quot;,&quot;order_id&quot;:&quot;ord-1&quot;}</e>"
    );
    let header = render("X: << metadata | unwrap >>", Context::Header);
    assert!(!header.contains('\n') && !header.contains('\r'));
    assert_eq!(
        render_pci("n=<< cardholder_name >>", Context::Form),
        "n=Zo%C3%AB%20O%27Brien%20%3Cz%3E"
    );
}

#[test]
fn raw_context_refuses_free_text() {
    for name in [
        "metadata",
        "metadata.k",
        "scheme_metadata",
        "network_token_metadata.k",
    ] {
        let e = err(&format!("x=<< {name} >>"), Namespace::NetworkToken);
        assert!(e.contains("is free text"), "{e}");
        assert!(e.contains("application/json"), "{e}");
    }
    let e = err("<< cardholder_name >>", Namespace::PciToken);
    assert!(
        e.contains("`cardholder_name` (placeholder at byte 0) is free text"),
        "{e}"
    );
    // Fixed-alphabet values are fine in raw.
    assert_eq!(
        render("n=<< number >>&c=<< cryptogram >>", Context::Raw),
        "n=4111111111111111&c=AgAAAAAAAIR8CQrXcIhbQAAAAAA="
    );
    // The same free text is fine where it can be escaped.
    for ctx in [Context::Json, Context::Form, Context::Xml, Context::Header] {
        Template::parse(
            b"<< metadata >>",
            Syntax::Angle,
            ctx,
            Namespace::NetworkToken,
        )
        .unwrap();
    }
}

#[test]
fn xml_drops_forbidden_characters() {
    let v = V::new().with(
        Field::Metadata,
        Value::Str("a\u{0}b\u{7}c\u{1b}d\te\nf\rg\u{fffe}h\u{ffff}i\u{fffd}&"),
    );
    let out = render_with("<n><< metadata.x >></n>", Syntax::Angle, Context::Xml, &v);
    assert_eq!(out, "<n>abcd\te\nf\rghi\u{fffd}&amp;</n>");
    // Inside the JSON form of a map, controls are already \u escapes.
    let out = render_with(
        "<n><< metadata | unwrap >></n>",
        Syntax::Angle,
        Context::Xml,
        &v,
    );
    assert!(!out.bytes().any(|b| b < 0x20), "{out:?}");
}

#[test]
fn dot_values_cannot_be_path_segments() {
    for (value, expected) in [
        (".", "/v1/%2E/pay"),
        ("..", "/v1/%2E%2E/pay"),
        ("...", "/v1/%2E%2E%2E/pay"),
        ("a.b", "/v1/a.b/pay"),
        ("../x", "/v1/..%2Fx/pay"),
    ] {
        let v = V::new().with(Field::Metadata, Value::Str(value));
        assert_eq!(
            render_with(
                "/v1/<< metadata.k >>/pay",
                Syntax::Angle,
                Context::UrlPath,
                &v
            ),
            expected
        );
    }
    // Through a filter as well; the query keeps dots (no segments there).
    let v = V::new().with(Field::Number, Value::Str("9...."));
    assert_eq!(
        render_with("/<< number | last4 >>", Syntax::Angle, Context::UrlPath, &v),
        "/%2E%2E%2E%2E"
    );
    let v = V::new().with(Field::Metadata, Value::Str(".."));
    assert_eq!(
        render_with("q=<< metadata.k >>", Syntax::Angle, Context::UrlQuery, &v),
        "q=.."
    );
}

#[test]
fn max_rendered_len_bounds_every_render() {
    let long = "\u{1}\"é".repeat(26); // 80 characters, the worst bytes
    let mut meta = BTreeMap::new();
    for i in 0..crate::vault::METADATA_MAX_PAIRS {
        meta.insert(format!("{i:0>20}"), long.clone());
    }
    let meta: &'static BTreeMap<String, String> = Box::leak(Box::new(meta));
    let v = V::new()
        .with(Field::Metadata, Value::Map(meta))
        .with(Field::NetworkTokenMetadata, Value::Map(meta));
    for (input, ctx) in [
        (
            r#"{"a": "<< metadata >>", "b": << metadata >>, "c": "x<< number >>"}"#,
            Context::Json,
        ),
        (
            "m=<< metadata | unwrap >>&n=<< network_token_metadata >>",
            Context::Form,
        ),
        ("<m><< metadata >></m>", Context::Xml),
        ("/<< metadata | unwrap >>/<< number >>", Context::UrlPath),
        ("<< metadata >>", Context::Header),
        ("<< number >><< cryptogram | unwrap >>", Context::Raw),
    ] {
        let t = Template::parse(
            input.as_bytes(),
            Syntax::Angle,
            ctx,
            Namespace::NetworkToken,
        )
        .unwrap();
        let out = t.render_to_vec(input.as_bytes(), &v);
        assert!(
            out.len() <= t.max_rendered_len(),
            "{ctx:?}: {} > {}",
            out.len(),
            t.max_rendered_len()
        );
    }
    // Without placeholders the bound is the input.
    let t = Template::parse(
        b"abc",
        Syntax::Angle,
        Context::Json,
        Namespace::NetworkToken,
    )
    .unwrap();
    assert_eq!(t.max_rendered_len(), 3);
    // The amplification of the issue: 40,327 map placeholders in 1 MiB.
    let input = "<< network_token_metadata >>".repeat(40_327);
    let t = Template::parse(
        input.as_bytes(),
        Syntax::Angle,
        Context::Json,
        Namespace::NetworkToken,
    )
    .unwrap();
    assert!(t.max_rendered_len() > 1 << 30);
}

#[test]
fn filters() {
    // Bare placeholders render in a header (a JSON body would quote
    // them); those inside quotes in a JSON body.
    let r = |input: &str, field: Field, v: Value<'static>| {
        let ctx = if input.starts_with(['"', '{']) {
            Context::Json
        } else {
            Context::Header
        };
        render_with(input, Syntax::Angle, ctx, &V::new().with(field, v))
    };
    let m = Field::ExpiryMonth;
    assert_eq!(r("<< expiry_month | mm >>", m, Value::Int(3)), "03");
    assert_eq!(r("<< expiry_month | mm >>", m, Value::Str("3")), "03");
    assert_eq!(r("<< expiry_month | mm >>", m, Value::Str("03")), "03");
    assert_eq!(r("<< expiry_month | mm >>", m, Value::Int(12)), "12");
    assert_eq!(r("<< expiry_month | mm >>", m, Value::Int(13)), "13");
    assert_eq!(r("<< expiry_month | mm >>", m, Value::Int(0)), "0");
    assert_eq!(r("<< expiry_month | mm >>", m, Value::Str("ab")), "ab");
    assert_eq!(r("<< expiry_month | mm >>", m, Value::Str("+3")), "+3");
    assert_eq!(r("\"<< expiry_month | mm >>\"", m, Value::Null), "\"\"");
    assert_eq!(
        r("\"<< expiry_month | mm | unwrap >>\"", m, Value::Null),
        "null"
    );
    assert_eq!(
        r("\"<< expiry_month | mm | unwrap >>\"", m, Value::Int(3)),
        "\"03\""
    );
    assert_eq!(
        r("\"<< expiry_month | unwrap | mm >>\"", m, Value::Int(3)),
        "\"03\""
    );
    let y = Field::ExpiryYear;
    assert_eq!(r("<< expiry_year | yy >>", y, Value::Int(2029)), "29");
    assert_eq!(r("<< expiry_year | yy >>", y, Value::Int(29)), "29");
    assert_eq!(r("<< expiry_year | yy >>", y, Value::Int(9)), "9");
    assert_eq!(r("<< expiry_year | yy >>", y, Value::Int(-2029)), "-2029");
    assert_eq!(r("<< expiry_year | yyyy >>", y, Value::Int(29)), "2029");
    assert_eq!(r("<< expiry_year | yyyy >>", y, Value::Int(2029)), "2029");
    assert_eq!(r("<< expiry_year | yyyy >>", y, Value::Str("x9")), "x9");
    assert_eq!(
        r("<< expiry_year | yy | yyyy >>", y, Value::Int(2031)),
        "2031"
    );
    assert_eq!(
        r("<< expiry_year | yyyy | unwrap >>", y, Value::Str("31")),
        "\"2031\""
    );
    let n = Field::Number;
    assert_eq!(
        r("<< number | last4 >>", n, Value::Str("4111111111111234")),
        "1234"
    );
    assert_eq!(
        r("<< number | first6 >>", n, Value::Str("4111111111111234")),
        "411111"
    );
    assert_eq!(r("<< number | last4 >>", n, Value::Str("12")), "12");
    assert_eq!(r("<< number | first6 >>", n, Value::Str("12")), "12");
    assert_eq!(r("<< number | last4 >>", n, Value::Str("ééééé")), "éééé");
    assert_eq!(
        r("<< number | first6 >>", n, Value::Str("éééééééé")),
        "éééééé"
    );
    assert_eq!(
        r("<< number | first6 | last4 >>", n, Value::Str("4111119999")),
        "1111"
    );
    assert_eq!(r("<< number | last4 >>", n, Value::Int(123456)), "3456");
    assert_eq!(r("<< number | last4 >>", n, Value::Bool(false)), "alse");
    // Through a format filter the value is a string; with unwrap, a JSON string.
    assert_eq!(
        r(
            "{\"n\": \"<< number | last4 | unwrap >>\"}",
            n,
            Value::Int(123456)
        ),
        "{\"n\": \"3456\"}"
    );
    // Inside a JSON string, the filtered text is escaped.
    assert_eq!(
        r("\"x<< number | last4 >>\"", n, Value::Str("zab\"\n")),
        "\"xab\\\"\\n\""
    );
    assert_eq!(
        r("<< metadata | last4 >>", Field::Metadata, Value::Null),
        ""
    );
}

#[test]
fn content_types() {
    let ct = |s: &str| Context::for_content_type(Some(s.as_bytes()));
    assert_eq!(ct("application/json"), Context::Json);
    assert_eq!(ct("  Application/JSON ; charset=utf-8"), Context::Json);
    assert_eq!(ct("application/vnd.api+json"), Context::Json);
    assert_eq!(ct("application/problem+JSON;x=y"), Context::Json);
    assert_eq!(ct("application/x-www-form-urlencoded"), Context::Form);
    assert_eq!(
        ct("application/x-www-form-urlencoded; charset=UTF-8"),
        Context::Form
    );
    assert_eq!(ct("application/xml"), Context::Xml);
    assert_eq!(ct("TEXT/XML; charset=iso-8859-1"), Context::Xml);
    assert_eq!(ct("application/soap+xml"), Context::Xml);
    assert_eq!(ct("text/plain"), Context::Raw);
    assert_eq!(ct("+json"), Context::Raw);
    assert_eq!(ct("application/jsonx"), Context::Raw);
    assert_eq!(ct("multipart/form-data; boundary=x"), Context::Raw);
    assert_eq!(ct(""), Context::Raw);
    assert_eq!(Context::for_content_type(None), Context::Raw);
}

#[test]
fn render_appends_and_value_debug_is_redacted() {
    let input = b"n=<< number >>";
    let t = Template::parse(input, Syntax::Angle, Context::Raw, Namespace::NetworkToken).unwrap();
    let mut out = b"prefix:".to_vec();
    t.render(input, &V::new(), &mut out);
    assert_eq!(out, b"prefix:n=4111111111111111");
    let dbg = format!(
        "{:?} {:?} {:?}",
        Value::Str("4111111111111111"),
        Value::Int(123),
        Value::Map(&V::new().meta)
    );
    assert!(
        !dbg.contains("4111") && !dbg.contains("123") && !dbg.contains("ord"),
        "{dbg}"
    );
    // A template is Send + Sync (shared across requests).
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Template>();
    assert_send_sync::<TemplateError>();
}

#[test]
fn integers_render_in_decimal() {
    for n in [0, 1, -1, 9, 10, i64::MAX, i64::MIN, 1234567890] {
        let v = V::new().with(Field::ExpiryYear, Value::Int(n));
        let out = render_with("<< expiry_year >>", Syntax::Angle, Context::Header, &v);
        assert_eq!(out, n.to_string());
        let out = render_with(
            "<< expiry_year | last4 >>",
            Syntax::Angle,
            Context::Header,
            &v,
        );
        let digits = n.to_string();
        let tail: String = digits
            .chars()
            .skip(digits.chars().count().saturating_sub(4))
            .collect();
        assert_eq!(out, tail);
    }
}

/// The escapers as they were written before they walked runs: one byte
/// at a time, by index. What the run-walking ones must equal.
mod reference {
    pub fn json(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                0x00..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
                _ => out.push(b),
            }
        }
        out
    }

    pub fn percent(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b);
            } else {
                out.extend_from_slice(format!("%{b:02X}").as_bytes());
            }
        }
        out
    }

    pub fn xml(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match b {
                b'&' => out.extend_from_slice(b"&amp;"),
                b'<' => out.extend_from_slice(b"&lt;"),
                b'>' => out.extend_from_slice(b"&gt;"),
                b'"' => out.extend_from_slice(b"&quot;"),
                b'\'' => out.extend_from_slice(b"&apos;"),
                b'\t' | b'\n' | b'\r' => out.push(b),
                0x00..=0x1f => {}
                0xef if matches!(bytes.get(i + 1..i + 3), Some([0xbf, 0xbe | 0xbf])) => i += 2,
                _ => out.push(b),
            }
            i += 1;
        }
        out
    }

    pub fn header(bytes: &[u8]) -> Vec<u8> {
        bytes
            .iter()
            .copied()
            .filter(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t')
            .collect()
    }
}

#[test]
fn escapers_match_the_reference_on_every_byte_and_noncharacter() {
    let every_byte: Vec<u8> = (0..=255).collect();
    let mut cases = vec![every_byte];
    for case in [
        &b"\xef\xbf\xbe"[..],
        b"\xef\xbf\xbf",
        b"\xef\xbf\xbd",
        b"a\xef\xef\xbf\xbeb",
        b"\xef\xbf",
        b"\xef",
        b"\xef\xbf\xbe\xef\xbf\xbf<",
        b"\xef\xbf\xbe\x01&",
        b"",
    ] {
        cases.push(case.to_vec());
    }
    for case in cases {
        check_escapers(&case);
    }
}

fn check_escapers(bytes: &[u8]) {
    let run = |f: fn(&[u8], &mut Vec<u8>)| {
        let mut out = b"prefix".to_vec();
        f(bytes, &mut out);
        out.split_off(6)
    };
    assert_eq!(
        run(escape::json_escape),
        reference::json(bytes),
        "{bytes:x?}"
    );
    assert_eq!(run(percent_encode), reference::percent(bytes), "{bytes:x?}");
    assert_eq!(run(xml_escape), reference::xml(bytes), "{bytes:x?}");
    assert_eq!(
        run(escape::header_clean),
        reference::header(bytes),
        "{bytes:x?}"
    );
}

fn chunk(delims: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..40).prop_map(move |mut v| {
        v.retain(|b| !delims.contains(b) && *b != b'"' && *b != b'\\');
        v
    })
}

proptest! {
    #[test]
    fn without_open_delimiter_is_byte_identical(
        input in proptest::collection::vec(any::<u8>(), 0..512),
        braces in any::<bool>(),
        ctx in prop_oneof![
            Just(Context::Json), Just(Context::Form), Just(Context::Xml),
            Just(Context::Raw), Just(Context::Header), Just(Context::UrlPath),
        ],
    ) {
        let syntax = if braces { Syntax::Braces } else { Syntax::Angle };
        let open = syntax.delimiters().0;
        prop_assume!(memmem::find(&input, open).is_none());
        let t = Template::parse(&input, syntax, ctx, Namespace::NetworkToken).unwrap();
        prop_assert!(t.is_static());
        prop_assert_eq!(t.render_to_vec(&input, &V::new()), input);
    }

    #[test]
    fn literals_pass_through_unchanged(
        parts in proptest::collection::vec(
            (chunk(b"<>{}"), any::<bool>(), 0usize..3), 0..12),
        tail in chunk(b"<>{}"),
        braces in any::<bool>(),
    ) {
        let syntax = if braces { Syntax::Braces } else { Syntax::Angle };
        let (open, close) = syntax.delimiters();
        let mut input = Vec::new();
        let mut expected = Vec::new();
        for (lit, is_number, ws) in &parts {
            input.extend_from_slice(lit);
            expected.extend_from_slice(lit);
            let pad = &b"  \t"[..*ws];
            input.extend_from_slice(open);
            input.extend_from_slice(pad);
            input.extend_from_slice(if *is_number { b"number" } else { b"eci" });
            input.extend_from_slice(pad);
            input.extend_from_slice(close);
            expected.extend_from_slice(if *is_number { b"4111111111111111" } else { b"05" });
        }
        input.extend_from_slice(&tail);
        expected.extend_from_slice(&tail);
        let t = Template::parse(&input, syntax, Context::Raw, Namespace::NetworkToken).unwrap();
        prop_assert_eq!(t.placeholders().count(), parts.len());
        prop_assert_eq!(t.is_static(), parts.is_empty());
        prop_assert_eq!(t.render_to_vec(&input, &V::new()), expected);
    }

    #[test]
    fn escapers_match_the_reference(
        bytes in proptest::collection::vec(
            prop_oneof![Just(0xefu8), Just(0xbf), Just(0xbe), Just(b'&'), any::<u8>()], 0..64),
    ) {
        check_escapers(&bytes);
    }

    #[test]
    fn parse_never_panics(
        input in proptest::collection::vec(
            prop_oneof![Just(b'<'), Just(b'>'), Just(b'"'), Just(b'\\'), Just(b'|'),
                        Just(b' '), Just(b'.'), any::<u8>()], 0..200),
    ) {
        for ctx in [Context::Json, Context::Raw] {
            if let Ok(t) = Template::parse(&input, Syntax::Angle, ctx, Namespace::NetworkToken) {
                let _ = t.render_to_vec(&input, &V::new());
                // A shorter input must not panic either.
                let _ = t.render_to_vec(&input[..input.len() / 2], &V::new());
            }
        }
    }
}
