//! `template::Template` parse + render (src/template.rs), three ways:
//!
//! - mode 0, free: the input bytes are the template (any bytes, any
//!   context, syntax and namespace). Parse and render never panic; the
//!   output never exceeds `max_rendered_len()` (values within the vault's
//!   limits); without an open delimiter the output is the input; a
//!   render appends; and no value adds a byte that would end its context:
//!   CR/LF in a header, `<`, `>`, quotes in XML, URL delimiters in a form,
//!   path or query (the output holds at most as many as the input).
//! - mode 1, JSON: a JSON object with each placeholder inside a string
//!   literal, as a whole string with `| unwrap`, or as a bare value, and
//!   arbitrary values. The output is valid JSON with exactly the keys
//!   written (no value adds a key or ends the document); a string keeps
//!   its literal prefix and suffix; without format filters each value
//!   comes back exactly (as text in a string, as its JSON value outside).
//! - mode 2, the other contexts: literals and placeholders in a row. The
//!   output is each literal unchanged and each placeholder as it renders
//!   alone, and what a placeholder renders to stays in its context's
//!   alphabet: percent-encoding only (never a bare `.`/`..` in the path),
//!   well-formed XML text and attribute values, a valid header value;
//!   free text is refused in a raw body.
//!
//! Input: byte 0 picks the mode; mode 0 reads byte 1 as flags, the
//! template up to the first 0xFF byte and values from the rest; modes 1
//! and 2 build everything from the bytes after byte 0.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tokenrelay::template::{Context, Field, Filter, Namespace, Syntax, Template, Value, Values};

const CONTEXTS: [Context; 7] = [
    Context::Json,
    Context::Form,
    Context::Xml,
    Context::Raw,
    Context::Header,
    Context::UrlPath,
    Context::UrlQuery,
];

/// A value the fuzzer chose, owned.
#[derive(Debug, Clone)]
enum Owned {
    Str(String),
    Int(i64),
    Bool(bool),
    Null,
    Map(BTreeMap<String, String>),
}

/// One value per field; a metadata map answers its keys too.
struct Vals(Vec<(Field, Owned)>);

impl Values for Vals {
    fn get(&self, field: Field, key: Option<&str>) -> Value<'_> {
        let Some((_, v)) = self.0.iter().find(|(f, _)| *f == field) else {
            return Value::Null;
        };
        match (v, key) {
            (Owned::Map(m), Some(k)) => m.get(k).map_or(Value::Null, |s| Value::Str(s)),
            (_, Some(_)) => Value::Null,
            (Owned::Str(s), None) => Value::Str(s),
            (Owned::Int(n), None) => Value::Int(*n),
            (Owned::Bool(b), None) => Value::Bool(*b),
            (Owned::Null, None) => Value::Null,
            (Owned::Map(m), None) => Value::Map(m),
        }
    }
}

/// A string of at most `max` bytes.
fn short_string(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let s: String = u.arbitrary()?;
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    Ok(s[..cut].to_owned())
}

/// Values for every field. Strings have at most `max` bytes and maps at
/// most 3 pairs, which is within every limit `max_rendered_len` assumes
/// when `max` is 6 (the shortest: `bin`, `last4`, `security_code`).
fn values(u: &mut Unstructured<'_>, max: usize) -> Result<Vals> {
    let mut out = Vec::new();
    for field in Field::ALL {
        let v = match u.int_in_range(0..=4u8)? {
            0 => Owned::Null,
            1 => Owned::Int(u.arbitrary()?),
            2 => Owned::Bool(u.arbitrary()?),
            3 if field.takes_key() => {
                let mut m = BTreeMap::new();
                for _ in 0..u.int_in_range(0..=3u8)? {
                    let k = if u.arbitrary()? {
                        // A key a template can name.
                        ["k", "order_id", "a-b_1"][usize::from(u.int_in_range(0..=2u8)?)].to_owned()
                    } else {
                        short_string(u, max)?
                    };
                    m.insert(k, short_string(u, max)?);
                }
                Owned::Map(m)
            }
            _ => Owned::Str(short_string(u, max)?),
        };
        // What the forward's `Values` gives: a map only for a map field.
        let v = match v {
            Owned::Map(_) | Owned::Null if field.takes_key() => v,
            _ if field.takes_key() => Owned::Null,
            v => v,
        };
        out.push((field, v));
    }
    Ok(out).map(Vals)
}

/// A placeholder's text for `field` (with a metadata key sometimes), with
/// up to three filters and padding, plus whether it names a map key.
fn placeholder(u: &mut Unstructured<'_>, ns: Namespace) -> Result<(Field, String, Vec<Filter>)> {
    let fields: Vec<Field> = Field::ALL
        .into_iter()
        .filter(|f| f.in_namespace(ns))
        .collect();
    let field = *u.choose(&fields)?;
    let mut text = String::from(if u.arbitrary()? { " " } else { "" });
    text.push_str(field.name());
    if field.takes_key() && u.arbitrary()? {
        text.push('.');
        text.push_str(*u.choose(&["k", "order_id", "a-b_1", "nope"])?);
    }
    let mut filters = Vec::new();
    for _ in 0..u.int_in_range(0..=3u8)? {
        let f = *u.choose(&Filter::ALL)?;
        filters.push(f);
        text.push_str(if u.arbitrary()? { " | " } else { "|" });
        text.push_str(f.name());
    }
    if u.arbitrary()? {
        text.push('\t');
    }
    Ok((field, text, filters))
}

fn count(hay: &[u8], b: u8) -> usize {
    memchr::memchr_iter(b, hay).count()
}

/// Mode 0: any bytes as a template.
fn free(data: &[u8]) -> Result<()> {
    let Some((&flags, rest)) = data.split_first() else {
        return Ok(());
    };
    let (input, tail) = match memchr::memchr(0xff, rest) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let syntax = if flags & 1 == 0 {
        Syntax::Angle
    } else {
        Syntax::Braces
    };
    let ns = if flags & 2 == 0 {
        Namespace::NetworkToken
    } else {
        Namespace::PciToken
    };
    let ctx = CONTEXTS[usize::from(flags >> 2) % CONTEXTS.len()];
    let Ok(t) = Template::parse(input, syntax, ctx, ns) else {
        return Ok(());
    };
    let vals = values(&mut Unstructured::new(tail), 6)?;
    let mut out = b"prefix".to_vec();
    t.render(input, &vals, &mut out);
    assert!(out.starts_with(b"prefix"), "render must append");
    let out = &out[6..];
    assert!(
        out.len() <= t.max_rendered_len(),
        "{} bytes rendered, bound {}",
        out.len(),
        t.max_rendered_len()
    );
    if memchr::memmem::find(input, syntax.delimiters().0).is_none() {
        assert!(t.is_static());
        assert_eq!(out, input);
    }
    if ctx == Context::Raw {
        assert!(t.placeholders().all(|p| !p.field.is_free_text()));
    }
    // Bytes that end a value's context: a value never writes one, so the
    // output has at most the input's (the placeholders' own text is gone).
    let enders: &[u8] = match ctx {
        Context::Header => b"\r\n\0\x7f",
        Context::Xml => b"<>\"'",
        Context::Form | Context::UrlQuery => b"&=+ #?/",
        Context::UrlPath => b"/?# ",
        Context::Json | Context::Raw => b"",
    };
    for &b in enders {
        assert!(
            count(out, b) <= count(input, b),
            "{ctx:?}: byte {b:#04x} added by a value"
        );
    }
    // Given other bytes than it parsed, render never panics either.
    let _ = t.render_to_vec(&input[..input.len() / 2], &vals);
    Ok(())
}

/// `s` without the delimiters' characters, so it cannot open or close a
/// placeholder next to one.
fn literal(s: &[u8], syntax: Syntax) -> Vec<u8> {
    let (open, close) = syntax.delimiters();
    s.iter()
        .copied()
        .filter(|b| *b != open[0] && *b != close[0])
        .collect()
}

/// What a value is as text (a map: its JSON).
fn text_of(v: &Value<'_>) -> serde_json::Value {
    match v {
        Value::Str(s) => serde_json::Value::String((*s).to_owned()),
        Value::Int(n) => serde_json::Value::String(n.to_string()),
        Value::Bool(b) => serde_json::Value::String(b.to_string()),
        Value::Null => serde_json::Value::String(String::new()),
        Value::Map(m) => serde_json::Value::String(serde_json::to_string(m).unwrap_or_default()),
    }
}

/// What a value is as JSON.
fn json_of(v: &Value<'_>) -> serde_json::Value {
    match v {
        Value::Str(s) => serde_json::Value::String((*s).to_owned()),
        Value::Int(n) => serde_json::Value::from(*n),
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Null => serde_json::Value::Null,
        Value::Map(m) => serde_json::to_value(m).unwrap_or_default(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    /// `"pre<< x >>post"`
    Inside,
    /// `"<< x | unwrap >>"`
    Whole,
    /// `<< x >>`
    Bare,
}

/// Mode 1: placeholders in a JSON object.
fn json(u: &mut Unstructured<'_>) -> Result<()> {
    let syntax = if u.arbitrary()? {
        Syntax::Angle
    } else {
        Syntax::Braces
    };
    let ns = if u.arbitrary()? {
        Namespace::NetworkToken
    } else {
        Namespace::PciToken
    };
    let (open, close) = syntax.delimiters();
    let mut input = b"{".to_vec();
    let mut slots = Vec::new();
    for i in 0..u.int_in_range(0..=6u8)? {
        if i > 0 {
            input.extend_from_slice(b", ");
        }
        input.extend_from_slice(format!("\"k{i}\": ").as_bytes());
        let slot = *u.choose(&[Slot::Inside, Slot::Whole, Slot::Bare])?;
        let (field, mut text, mut filters) = placeholder(u, ns)?;
        if slot == Slot::Whole && !filters.contains(&Filter::Unwrap) {
            text.push_str(" | unwrap");
            filters.push(Filter::Unwrap);
        }
        let key = text
            .split('|')
            .next()
            .and_then(|name| name.trim().split_once('.'))
            .map(|(_, k)| k.to_owned());
        // A prefix and suffix as a JSON encoder writes them.
        let mut edge = || -> Result<Vec<u8>> {
            let s: String = u.arbitrary()?;
            let enc = serde_json::to_string(&s).unwrap_or_default();
            Ok(literal(enc[1..enc.len() - 1].as_bytes(), syntax))
        };
        let (pre, post) = if slot == Slot::Inside {
            (edge()?, edge()?)
        } else {
            (Vec::new(), Vec::new())
        };
        // `"<< x | unwrap >>"` with nothing around it is a whole string.
        let slot = match slot {
            Slot::Inside
                if pre.is_empty() && post.is_empty() && filters.contains(&Filter::Unwrap) =>
            {
                Slot::Whole
            }
            s => s,
        };
        let hole = [open, text.as_bytes(), close].concat();
        match slot {
            Slot::Bare => input.extend_from_slice(&hole),
            Slot::Inside | Slot::Whole => {
                input.push(b'"');
                input.extend_from_slice(&pre);
                input.extend_from_slice(&hole);
                input.extend_from_slice(&post);
                input.push(b'"');
            }
        }
        slots.push((slot, field, key, filters, pre, post));
    }
    input.push(b'}');
    let vals = values(u, 64)?;
    let t = match Template::parse(&input, syntax, Context::Json, ns) {
        Ok(t) => t,
        Err(e) => panic!("a well-formed template was refused: {e}"),
    };
    let out = t.render_to_vec(&input, &vals);
    // serde_json reserves object keys that start with this for its own
    // types (RawValue, and Number under arbitrary_precision; sqlx turns
    // the features on): such a key, rendered from metadata, is valid JSON
    // that `serde_json::Value` cannot read back. The checker's limit, not
    // the renderer's: the acquirer gets the same valid JSON either way.
    if memchr::memmem::find(&out, b"$serde_json::private::").is_some() {
        return Ok(());
    }
    let doc: serde_json::Value = match serde_json::from_slice(&out) {
        Ok(d) => d,
        Err(e) => panic!(
            "rendered JSON does not parse ({e}): {}",
            String::from_utf8_lossy(&out)
        ),
    };
    let obj = doc.as_object().expect("an object stays an object");
    assert_eq!(obj.len(), slots.len(), "a value added or removed a key");
    for (i, (slot, field, key, filters, pre, post)) in slots.iter().enumerate() {
        let got = &obj[&format!("k{i}")];
        let value = vals.get(*field, key.as_deref());
        let formatted = filters.iter().any(|f| *f != Filter::Unwrap);
        let unwrap = filters.contains(&Filter::Unwrap);
        match slot {
            Slot::Inside => {
                let s = got.as_str().expect("a string literal stays a string");
                // The literal text, decoded as the document decodes it.
                let dec = |b: &[u8]| -> String {
                    serde_json::from_slice(&[b"\"", b, b"\""].concat()).unwrap_or_default()
                };
                let (pre, post) = (dec(pre), dec(post));
                assert!(
                    s.starts_with(&pre) && s.ends_with(&post),
                    "literal text changed"
                );
                if !formatted {
                    let middle = &s[pre.len()..s.len() - post.len()];
                    let want = if unwrap {
                        serde_json::Value::String(json_of(&value).to_string())
                    } else {
                        text_of(&value)
                    };
                    if let (Value::Map(_), false) = (&value, unwrap) {
                        // A map's text is its JSON: compare as JSON.
                        let m: serde_json::Value =
                            serde_json::from_str(middle).expect("a map renders as JSON");
                        assert_eq!(m, json_of(&value));
                    } else if let (Value::Map(_), true) = (&value, unwrap) {
                        let m: serde_json::Value =
                            serde_json::from_str(middle).expect("a map renders as JSON");
                        assert_eq!(m, json_of(&value));
                    } else {
                        assert_eq!(Some(middle), want.as_str(), "value changed");
                    }
                }
            }
            Slot::Whole | Slot::Bare => {
                if !formatted {
                    assert_eq!(got, &json_of(&value), "value changed");
                }
            }
        }
    }
    Ok(())
}

/// Whether `r` is percent-encoding only: unreserved bytes and `%XX`.
fn percent_only(r: &[u8]) -> bool {
    let mut i = 0;
    while let Some(&b) = r.get(i) {
        if b == b'%' {
            let hex = |x: Option<&u8>| x.is_some_and(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F'));
            if !(hex(r.get(i + 1)) && hex(r.get(i + 2))) {
                return false;
            }
            i += 3;
        } else if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// Mode 2: literals and placeholders in a non-JSON context.
fn contexts(u: &mut Unstructured<'_>) -> Result<()> {
    let ctx = *u.choose(&CONTEXTS[1..])?;
    let syntax = if u.arbitrary()? {
        Syntax::Angle
    } else {
        Syntax::Braces
    };
    let ns = if u.arbitrary()? {
        Namespace::NetworkToken
    } else {
        Namespace::PciToken
    };
    let (open, close) = syntax.delimiters();
    let mut parts = Vec::new();
    for _ in 0..u.int_in_range(0..=6u8)? {
        let lit = literal(u.arbitrary::<&[u8]>()?, syntax);
        let (field, text, _) = placeholder(u, ns)?;
        parts.push((lit, field, [open, text.as_bytes(), close].concat()));
    }
    let tail = literal(u.arbitrary::<&[u8]>()?, syntax);
    let vals = values(u, 64)?;

    let mut input = Vec::new();
    for (lit, _, hole) in &parts {
        input.extend_from_slice(lit);
        input.extend_from_slice(hole);
    }
    input.extend_from_slice(&tail);
    let t = Template::parse(&input, syntax, ctx, ns);
    if ctx == Context::Raw && parts.iter().any(|(_, f, _)| f.is_free_text()) {
        assert!(t.is_err(), "free text accepted in a raw body");
        return Ok(());
    }
    let t = match t {
        Ok(t) => t,
        Err(e) => panic!("a well-formed template was refused: {e}"),
    };
    let out = t.render_to_vec(&input, &vals);

    let mut want = Vec::new();
    for (lit, _, hole) in &parts {
        let alone = Template::parse(hole, syntax, ctx, ns).expect("it parsed in the whole");
        let r = alone.render_to_vec(hole, &vals);
        match ctx {
            Context::Form | Context::UrlQuery => {
                assert!(percent_only(&r), "{ctx:?}: not percent-encoded");
            }
            Context::UrlPath => {
                assert!(percent_only(&r), "path: not percent-encoded");
                assert!(
                    r.is_empty() || r.iter().any(|b| *b != b'.'),
                    "a value made a dot segment"
                );
            }
            Context::Xml => {
                let text = std::str::from_utf8(&r).expect("XML text stays UTF-8");
                let doc = format!("<a v=\"{text}\" w='{text}'>{text}</a>");
                let parsed = roxmltree::Document::parse(&doc)
                    .unwrap_or_else(|e| panic!("value broke the XML ({e})"));
                let root = parsed.root_element();
                assert_eq!(root.children().filter(|n| n.is_element()).count(), 0);
                assert_eq!(root.attributes().len(), 2);
            }
            Context::Header => {
                assert!(
                    http::HeaderValue::from_bytes(&r).is_ok(),
                    "not a valid header value"
                );
            }
            Context::Raw | Context::Json => {}
        }
        want.extend_from_slice(lit);
        want.extend_from_slice(&r);
    }
    want.extend_from_slice(&tail);
    assert_eq!(
        out, want,
        "a literal changed, or a value depends on its neighbours"
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let _ = match mode % 3 {
        0 => free(rest),
        1 => json(&mut Unstructured::new(rest)),
        _ => contexts(&mut Unstructured::new(rest)),
    };
});
