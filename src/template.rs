//! Placeholder templates: `<< name >>`, `<< name | filter | … >>` (or
//! `{{ … }}`) in a request body, a header value, or the path and query of
//! the destination URL.
//!
//! Pure: no I/O, no allocation per byte, no re-serialisation. [`Template::parse`]
//! scans once with `memchr::memmem` and records literal ranges and holes;
//! [`Template::render`] copies the literals and writes each value escaped
//! for where it lands:
//!
//! - JSON (`application/json`, `*+json`): inside a string literal the value
//!   is JSON-escaped (no quotes added); outside, it is written raw. With
//!   `| unwrap` the native JSON value is written, and when the placeholder is
//!   the whole content of a string literal the two quotes go too
//!   (`"exp": "<< expiry_month | unwrap >>"` → `"exp": 12`, as Hellgate
//!   writes requests);
//! - form bodies, URL path and query: percent-encoded (RFC 3986 unreserved
//!   bytes pass);
//! - XML (`application/xml`, `text/xml`, `*+xml`): entity-escaped;
//! - header values: raw, with control bytes dropped so CR/LF cannot occur;
//! - anything else: raw.
//!
//! This module never sees where values come from and never logs; its errors
//! name placeholders, filters and byte offsets, never values.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use memchr::memmem;

/// Placeholder delimiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// `<< name >>`
    Angle,
    /// `{{ name }}`
    Braces,
}

impl Syntax {
    /// The open and close delimiters.
    pub fn delimiters(self) -> (&'static [u8], &'static [u8]) {
        match self {
            Syntax::Angle => (b"<<", b">>"),
            Syntax::Braces => (b"{{", b"}}"),
        }
    }
}

/// Where the template's text lands, which decides escaping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// A JSON body.
    Json,
    /// An `application/x-www-form-urlencoded` body.
    Form,
    /// An XML body.
    Xml,
    /// Any other body.
    Raw,
    /// A header value.
    Header,
    /// The destination URL's path.
    UrlPath,
    /// The destination URL's query.
    UrlQuery,
}

impl Context {
    /// The body context for a `content-type` header value.
    pub fn for_content_type(ct: Option<&[u8]>) -> Context {
        let Some(ct) = ct else {
            return Context::Raw;
        };
        let essence = ct.split(|b| *b == b';').next().unwrap_or(ct);
        let essence = String::from_utf8_lossy(essence).trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Context::Json,
            "application/x-www-form-urlencoded" => Context::Form,
            "application/xml" | "text/xml" => Context::Xml,
            e if e.ends_with("+json") => Context::Json,
            e if e.ends_with("+xml") => Context::Xml,
            _ => Context::Raw,
        }
    }
}

/// Which set of names a template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// Network-token forwards (contract §6).
    NetworkToken,
    /// PCI-token forwards (contract §4a).
    PciToken,
}

/// A value a placeholder can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// The TAVV (null for dynamic CVV).
    Cryptogram,
    /// The dynamic CVV (null for TAVV).
    DynamicCvv,
    /// ECI.
    Eci,
    /// Expiry month.
    ExpiryMonth,
    /// Expiry year.
    ExpiryYear,
    /// The TPAN.
    Number,
    /// `tavv` or `dynamic_cvv`.
    Type,
    /// Cryptogram (or PCI token) metadata.
    Metadata,
    /// Token service reference.
    SchemeReference,
    /// Token service metadata.
    SchemeMetadata,
    /// Token status.
    Status,
    /// Device binding support.
    SupportsDeviceBinding,
    /// Network token id.
    NetworkTokenId,
    /// `vts|mdes|tms|hgts`.
    NetworkTokenType,
    /// Network token metadata.
    NetworkTokenMetadata,
    /// The FPAN.
    AccountNumber,
    /// Cardholder name.
    CardholderName,
    /// The CVC.
    SecurityCode,
    /// First six digits.
    Bin,
    /// Last four digits.
    Last4,
    /// PCI token id.
    PciTokenId,
}

/// Name table: (name, field, takes a `.key`).
const NETWORK_TOKEN_NAMES: &[(&str, Field, bool)] = &[
    ("cryptogram", Field::Cryptogram, false),
    ("dynamic_cvv", Field::DynamicCvv, false),
    ("eci", Field::Eci, false),
    ("expiry_month", Field::ExpiryMonth, false),
    ("expiry_year", Field::ExpiryYear, false),
    ("number", Field::Number, false),
    ("type", Field::Type, false),
    ("metadata", Field::Metadata, true),
    ("scheme_reference", Field::SchemeReference, false),
    ("scheme_metadata", Field::SchemeMetadata, true),
    ("status", Field::Status, false),
    (
        "supports_device_binding",
        Field::SupportsDeviceBinding,
        false,
    ),
    ("network_token_id", Field::NetworkTokenId, false),
    ("network_token_type", Field::NetworkTokenType, false),
    ("network_token_metadata", Field::NetworkTokenMetadata, true),
];

const PCI_TOKEN_NAMES: &[(&str, Field, bool)] = &[
    ("account_number", Field::AccountNumber, false),
    ("expiry_month", Field::ExpiryMonth, false),
    ("expiry_year", Field::ExpiryYear, false),
    ("cardholder_name", Field::CardholderName, false),
    ("security_code", Field::SecurityCode, false),
    ("bin", Field::Bin, false),
    ("last4", Field::Last4, false),
    ("metadata", Field::Metadata, true),
    ("pci_token_id", Field::PciTokenId, false),
];

impl Field {
    /// The placeholder name.
    pub fn name(self) -> &'static str {
        NETWORK_TOKEN_NAMES
            .iter()
            .chain(PCI_TOKEN_NAMES)
            .find(|(_, f, _)| *f == self)
            .map_or("?", |(n, _, _)| n)
    }
}

/// A filter after `|`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// The native JSON value.
    Unwrap,
    /// Month as two digits.
    Mm,
    /// Year as two digits.
    Yy,
    /// Year as four digits.
    Yyyy,
    /// Last four characters.
    Last4,
    /// First six characters.
    First6,
}

impl Filter {
    fn parse(s: &str) -> Option<Filter> {
        Some(match s {
            "unwrap" => Filter::Unwrap,
            "mm" => Filter::Mm,
            "yy" => Filter::Yy,
            "yyyy" => Filter::Yyyy,
            "last4" => Filter::Last4,
            "first6" => Filter::First6,
            _ => return None,
        })
    }
}

/// A value to inject.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// Text.
    Str(&'a str),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// Absent.
    Null,
    /// String metadata.
    Map(&'a BTreeMap<String, String>),
}

/// The source of values for a render.
pub trait Values {
    /// The value of `field` (with `key` for the metadata names).
    fn get(&self, field: Field, key: Option<&str>) -> Value<'_>;
}

/// One parsed placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    /// What it names.
    pub field: Field,
    /// The metadata key, if any.
    pub key: Option<Box<str>>,
    /// Filters, left to right.
    pub filters: Vec<Filter>,
}

/// A template error; names the placeholder, never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    kind: ErrorKind,
    offset: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ErrorKind {
    Unclosed,
    Empty,
    UnknownName(String),
    UnknownFilter { filter: String, name: String },
    KeyNotAllowed(String),
    BadKey(String),
}

/// Cuts client text for an error message.
fn shown(s: &str) -> String {
    s.chars().take(40).collect()
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self.offset;
        match &self.kind {
            ErrorKind::Unclosed => write!(f, "unclosed placeholder at byte {at}"),
            ErrorKind::Empty => write!(f, "empty placeholder at byte {at}"),
            ErrorKind::UnknownName(n) => {
                write!(f, "unknown placeholder `{}` at byte {at}", shown(n))
            }
            ErrorKind::UnknownFilter { filter, name } => write!(
                f,
                "unknown filter `{}` in placeholder `{}` at byte {at}",
                shown(filter),
                shown(name)
            ),
            ErrorKind::KeyNotAllowed(n) => write!(f, "`{}` takes no key (byte {at})", shown(n)),
            ErrorKind::BadKey(n) => write!(
                f,
                "bad key in `{}` at byte {at}: keys are 1-20 characters [A-Za-z0-9_-]",
                shown(n)
            ),
        }
    }
}

impl std::error::Error for TemplateError {}

/// How a hole's value is escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// Inside a JSON string literal.
    JsonString,
    /// Percent-encoding.
    Percent,
    /// XML entities.
    Xml,
    /// Control bytes dropped.
    Header,
    /// As is.
    Raw,
}

#[derive(Debug, Clone)]
struct Hole {
    placeholder: Placeholder,
    escape: Escape,
    unwrap: bool,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(usize, usize),
    Hole(Hole),
}

/// A parsed template over some input bytes.
#[derive(Debug, Clone)]
pub struct Template {
    segments: Vec<Segment>,
    holes: usize,
    input_len: usize,
}

/// Tracks whether a JSON scan position is inside a string literal.
struct JsonScan {
    in_string: bool,
    /// Offset of the quote that opened the current string.
    opened_at: usize,
    /// Scanned up to here.
    pos: usize,
}

impl JsonScan {
    fn advance(&mut self, input: &[u8], to: usize) {
        let mut i = self.pos;
        while i < to {
            if self.in_string {
                match memchr::memchr2(b'"', b'\\', &input[i..to]) {
                    None => i = to,
                    Some(j) => {
                        let at = i + j;
                        if input[at] == b'\\' {
                            i = at + 2;
                        } else {
                            self.in_string = false;
                            i = at + 1;
                        }
                    }
                }
            } else {
                match memchr::memchr(b'"', &input[i..to]) {
                    None => i = to,
                    Some(j) => {
                        self.in_string = true;
                        self.opened_at = i + j;
                        i += j + 1;
                    }
                }
            }
        }
        // An escape at the very end skips into the next region.
        self.pos = i.max(to);
    }
}

fn parse_inner(inner: &[u8], offset: usize, ns: Namespace) -> Result<Placeholder, TemplateError> {
    let err = |kind| TemplateError { kind, offset };
    let text = String::from_utf8_lossy(inner);
    let mut parts = text.split('|').map(|p| p.trim_matches([' ', '\t']));
    let head = parts.next().unwrap_or("");
    if head.is_empty() {
        return Err(err(if text.trim_matches([' ', '\t']).is_empty() {
            ErrorKind::Empty
        } else {
            ErrorKind::UnknownName(String::new())
        }));
    }
    let (name, key) = match head.split_once('.') {
        Some((n, k)) => (n, Some(k)),
        None => (head, None),
    };
    let table = match ns {
        Namespace::NetworkToken => NETWORK_TOKEN_NAMES,
        Namespace::PciToken => PCI_TOKEN_NAMES,
    };
    let (_, field, keyed) = table
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| err(ErrorKind::UnknownName(head.to_owned())))?;
    let key = match key {
        None => None,
        Some(_) if !keyed => return Err(err(ErrorKind::KeyNotAllowed(name.to_owned()))),
        Some(k)
            if k.is_empty()
                || k.len() > 20
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            return Err(err(ErrorKind::BadKey(name.to_owned())))
        }
        Some(k) => Some(Box::from(k)),
    };
    let mut filters = Vec::new();
    for f in parts {
        filters.push(Filter::parse(f).ok_or_else(|| {
            err(ErrorKind::UnknownFilter {
                filter: f.to_owned(),
                name: head.to_owned(),
            })
        })?);
    }
    Ok(Placeholder {
        field: *field,
        key,
        filters,
    })
}

impl Template {
    /// Parses `input`; every placeholder must be closed and known.
    pub fn parse(
        input: &[u8],
        syntax: Syntax,
        ctx: Context,
        ns: Namespace,
    ) -> Result<Template, TemplateError> {
        let (open, close) = syntax.delimiters();
        let opener = memmem::Finder::new(open);
        let closer = memmem::Finder::new(close);
        let mut segments = Vec::new();
        let mut holes = 0;
        let mut lit_start = 0;
        let mut pos = 0;
        let mut json = JsonScan {
            in_string: false,
            opened_at: 0,
            pos: 0,
        };
        while let Some(i) = opener.find(&input[pos..]) {
            let start = pos + i;
            let inner_start = start + open.len();
            let close_at = closer.find(&input[inner_start..]).ok_or(TemplateError {
                kind: ErrorKind::Unclosed,
                offset: start,
            })?;
            let inner_end = inner_start + close_at;
            let end = inner_end + close.len();
            let placeholder = parse_inner(&input[inner_start..inner_end], start, ns)?;
            let unwrap = placeholder.filters.contains(&Filter::Unwrap);
            let mut lit_end = start;
            let mut next_lit = end;
            let escape = match ctx {
                Context::Json => {
                    json.advance(input, start);
                    json.pos = end;
                    if !json.in_string {
                        Escape::Raw
                    } else if unwrap
                        && start > 0
                        && json.opened_at == start - 1
                        && input.get(end) == Some(&b'"')
                    {
                        // Whole content of a string literal: the quotes go.
                        lit_end = start - 1;
                        next_lit = end + 1;
                        json.in_string = false;
                        json.pos = end + 1;
                        Escape::Raw
                    } else {
                        Escape::JsonString
                    }
                }
                Context::Form | Context::UrlPath | Context::UrlQuery => Escape::Percent,
                Context::Xml => Escape::Xml,
                Context::Header => Escape::Header,
                Context::Raw => Escape::Raw,
            };
            if lit_end > lit_start {
                segments.push(Segment::Literal(lit_start, lit_end));
            }
            segments.push(Segment::Hole(Hole {
                placeholder,
                escape,
                unwrap,
            }));
            holes += 1;
            lit_start = next_lit;
            pos = next_lit;
        }
        if lit_start < input.len() {
            segments.push(Segment::Literal(lit_start, input.len()));
        }
        Ok(Template {
            segments,
            holes,
            input_len: input.len(),
        })
    }

    /// Whether there is no placeholder: the input can pass untouched.
    pub fn is_static(&self) -> bool {
        self.holes == 0
    }

    /// The placeholders, in order.
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Hole(h) => Some(&h.placeholder),
            Segment::Literal(..) => None,
        })
    }

    /// Renders into `out`. `input` must be the bytes given to `parse`.
    pub fn render(&self, input: &[u8], values: &dyn Values, out: &mut Vec<u8>) {
        debug_assert_eq!(input.len(), self.input_len);
        out.reserve(input.len() + self.holes * 24);
        let mut scratch = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Literal(a, b) => out.extend_from_slice(&input[*a..*b]),
                Segment::Hole(h) => render_hole(h, values, &mut scratch, out),
            }
        }
    }

    /// Renders into a new, pre-sized buffer.
    pub fn render_to_vec(&self, input: &[u8], values: &dyn Values) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + self.holes * 24);
        self.render(input, values, &mut out);
        out
    }
}

/// A value after format filters.
enum Filtered<'a> {
    Value(Value<'a>),
    Text(String),
}

fn string_form(v: &Value<'_>, out: &mut String) {
    match v {
        Value::Str(s) => out.push_str(s),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Null => {}
        Value::Map(m) => json_map(m, out),
    }
}

fn json_map(m: &BTreeMap<String, String>, out: &mut String) {
    out.push('{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_quoted(k, out);
        out.push(':');
        json_quoted(v, out);
    }
    out.push('}');
}

fn json_quoted(s: &str, out: &mut String) {
    out.push('"');
    let mut bytes = Vec::new();
    json_escape(s.as_bytes(), &mut bytes);
    out.push_str(&String::from_utf8_lossy(&bytes));
    out.push('"');
}

fn apply_format(f: Filter, v: Filtered<'_>) -> Filtered<'_> {
    let text = match &v {
        Filtered::Value(Value::Null) => return v,
        Filtered::Value(val) => {
            let mut s = String::new();
            string_form(val, &mut s);
            s
        }
        Filtered::Text(t) => t.clone(),
    };
    let out = match f {
        Filter::Mm => match text.parse::<u8>() {
            Ok(m @ 1..=12) => format!("{m:02}"),
            _ => text,
        },
        Filter::Yy if text.len() >= 2 && text.bytes().all(|b| b.is_ascii_digit()) => {
            text[text.len() - 2..].to_owned()
        }
        Filter::Yyyy if text.len() == 2 && text.bytes().all(|b| b.is_ascii_digit()) => {
            format!("20{text}")
        }
        Filter::Last4 => {
            let n = text.chars().count();
            text.chars().skip(n.saturating_sub(4)).collect()
        }
        Filter::First6 => text.chars().take(6).collect(),
        Filter::Unwrap | Filter::Yy | Filter::Yyyy => text,
    };
    Filtered::Text(out)
}

fn render_hole(h: &Hole, values: &dyn Values, scratch: &mut String, out: &mut Vec<u8>) {
    let raw = values.get(h.placeholder.field, h.placeholder.key.as_deref());
    // Fast path: a plain string value, no filters.
    if let (Value::Str(s), true) = (raw, h.placeholder.filters.is_empty()) {
        escape_into(h.escape, s.as_bytes(), out);
        return;
    }
    let mut v = Filtered::Value(raw);
    for f in &h.placeholder.filters {
        if *f != Filter::Unwrap {
            v = apply_format(*f, v);
        }
    }
    scratch.clear();
    match (&v, h.unwrap) {
        (Filtered::Text(t), false) => scratch.push_str(t),
        (Filtered::Text(t), true) => json_quoted(t, scratch),
        (Filtered::Value(val), false) => string_form(val, scratch),
        (Filtered::Value(val), true) => match val {
            Value::Str(s) => json_quoted(s, scratch),
            Value::Null => scratch.push_str("null"),
            other => string_form(other, scratch),
        },
    }
    escape_into(h.escape, scratch.as_bytes(), out);
}

fn escape_into(e: Escape, s: &[u8], out: &mut Vec<u8>) {
    match e {
        Escape::Raw => out.extend_from_slice(s),
        Escape::JsonString => json_escape(s, out),
        Escape::Percent => {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            for &b in s {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    out.push(b);
                } else {
                    out.extend_from_slice(&[b'%', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
                }
            }
        }
        Escape::Xml => {
            for &b in s {
                match b {
                    b'&' => out.extend_from_slice(b"&amp;"),
                    b'<' => out.extend_from_slice(b"&lt;"),
                    b'>' => out.extend_from_slice(b"&gt;"),
                    b'"' => out.extend_from_slice(b"&quot;"),
                    b'\'' => out.extend_from_slice(b"&apos;"),
                    _ => out.push(b),
                }
            }
        }
        Escape::Header => out.extend(
            s.iter()
                .filter(|&&b| (b >= 0x20 || b == b'\t') && b != 0x7f),
        ),
    }
}

fn json_escape(s: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut run = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                out.extend_from_slice(&s[run..i]);
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 15) as usize],
                ]);
                run = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&s[run..i]);
        out.extend_from_slice(esc);
        run = i + 1;
    }
    out.extend_from_slice(&s[run..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct V(BTreeMap<String, String>);

    impl Values for V {
        fn get(&self, field: Field, key: Option<&str>) -> Value<'_> {
            match field {
                Field::Number | Field::AccountNumber => Value::Str("4895370012345678"),
                Field::Cryptogram => Value::Str("AgAAAAAAAIR8CQrXcIhbQAAAAAA="),
                Field::DynamicCvv | Field::SecurityCode => Value::Null,
                Field::Eci => Value::Str("07"),
                Field::ExpiryMonth => Value::Int(3),
                Field::ExpiryYear => Value::Int(2029),
                Field::SupportsDeviceBinding => Value::Bool(true),
                Field::CardholderName => Value::Str("Jane \"JD\" Doe\n<&>"),
                Field::Metadata | Field::SchemeMetadata | Field::NetworkTokenMetadata => {
                    match key {
                        None => Value::Map(&self.0),
                        Some(k) => self.0.get(k).map_or(Value::Null, |v| Value::Str(v)),
                    }
                }
                _ => Value::Str("x"),
            }
        }
    }

    fn values() -> V {
        let mut m = BTreeMap::new();
        m.insert("order".to_owned(), "o-1".to_owned());
        m.insert("q".to_owned(), "a\"b".to_owned());
        V(m)
    }

    fn render(input: &str, ctx: Context) -> String {
        render_ns(input, ctx, Namespace::NetworkToken, Syntax::Angle)
    }

    fn render_ns(input: &str, ctx: Context, ns: Namespace, syntax: Syntax) -> String {
        let t = Template::parse(input.as_bytes(), syntax, ctx, ns).unwrap();
        String::from_utf8(t.render_to_vec(input.as_bytes(), &values())).unwrap()
    }

    fn error(input: &str, ns: Namespace) -> String {
        Template::parse(input.as_bytes(), Syntax::Angle, Context::Raw, ns)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn every_name_parses_in_its_namespace_only() {
        for (name, field, keyed) in NETWORK_TOKEN_NAMES {
            let t = Template::parse(
                format!("<< {name} >>").as_bytes(),
                Syntax::Angle,
                Context::Raw,
                Namespace::NetworkToken,
            )
            .unwrap();
            assert_eq!(t.placeholders().next().unwrap().field, *field);
            assert_eq!(field.name(), *name);
            if *keyed {
                assert!(Template::parse(
                    format!("<< {name}.k_1 >>").as_bytes(),
                    Syntax::Angle,
                    Context::Raw,
                    Namespace::NetworkToken
                )
                .is_ok());
            }
        }
        for (name, _, _) in PCI_TOKEN_NAMES {
            assert!(Template::parse(
                format!("<<{name}>>").as_bytes(),
                Syntax::Angle,
                Context::Raw,
                Namespace::PciToken
            )
            .is_ok());
        }
        assert!(error("<< account_number >>", Namespace::NetworkToken)
            .contains("unknown placeholder `account_number`"));
        assert!(error("<< cryptogram >>", Namespace::PciToken).contains("`cryptogram`"));
    }

    #[test]
    fn errors_name_the_offender() {
        let ns = Namespace::NetworkToken;
        assert_eq!(
            error("ab << numbr >>", ns),
            "unknown placeholder `numbr` at byte 3"
        );
        assert!(error("<< number | upper >>", ns)
            .contains("unknown filter `upper` in placeholder `number`"));
        assert!(error("{\"a\": \"<< number \"}", ns).contains("unclosed placeholder at byte 7"));
        assert!(error("<<  >>", ns).contains("empty placeholder"));
        assert!(error("<< number.x >>", ns).contains("`number` takes no key"));
        assert!(error("<< metadata.a b >>", ns).contains("bad key"));
        assert!(error("<< metadata.aaaaaaaaaaaaaaaaaaaaa >>", ns).contains("bad key"));
    }

    #[test]
    fn syntaxes_and_whitespace() {
        assert_eq!(
            render("<<number>>|<<  eci|unwrap  >>", Context::Raw),
            "4895370012345678|\"07\""
        );
        assert_eq!(
            render_ns(
                "{{ number }} << eci >>",
                Context::Raw,
                Namespace::NetworkToken,
                Syntax::Braces
            ),
            "4895370012345678 << eci >>"
        );
    }

    #[test]
    fn json_inside_and_outside_strings() {
        let out = render(
            r#"{"a\"b": "<< number >>", "n": << number >>, "e": "x<< eci >>y", "c": "<< metadata.q >>"}"#,
            Context::Json,
        );
        assert_eq!(
            out,
            r#"{"a\"b": "4895370012345678", "n": 4895370012345678, "e": "x07y", "c": "a\"b"}"#
        );
    }

    #[test]
    fn unwrap_whole_string_drops_the_quotes() {
        let out = render(
            r#"{"m": "<< expiry_month | unwrap >>", "b": "<<supports_device_binding|unwrap>>", "d": "<< dynamic_cvv | unwrap >>", "md": "<< metadata | unwrap >>", "s": "<< eci | unwrap >>", "y": << expiry_year | unwrap >>}"#,
            Context::Json,
        );
        assert_eq!(
            out,
            r#"{"m": 3, "b": true, "d": null, "md": {"order":"o-1","q":"a\"b"}, "s": "07", "y": 2029}"#
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["md"]["q"], "a\"b");
    }

    #[test]
    fn unwrap_inside_a_longer_string_is_escaped_json() {
        let out = render(r#"{"x": "v=<< eci | unwrap >>"}"#, Context::Json);
        assert_eq!(out, r#"{"x": "v=\"07\""}"#);
    }

    #[test]
    fn values_are_escaped_for_each_context() {
        let pci = |input: &str, ctx| render_ns(input, ctx, Namespace::PciToken, Syntax::Angle);
        assert_eq!(
            pci(r#"{"n": "<< cardholder_name >>"}"#, Context::Json),
            r#"{"n": "Jane \"JD\" Doe\n<&>"}"#
        );
        assert_eq!(
            pci("n=<< cardholder_name >>&x=1", Context::Form),
            "n=Jane%20%22JD%22%20Doe%0A%3C%26%3E&x=1"
        );
        assert_eq!(
            pci("<n><< cardholder_name >></n>", Context::Xml),
            "<n>Jane &quot;JD&quot; Doe\n&lt;&amp;&gt;</n>"
        );
        assert_eq!(
            pci("Name << cardholder_name >>", Context::Header),
            "Name Jane \"JD\" Doe<&>"
        );
        assert_eq!(
            render("/v1/<< cryptogram >>/x", Context::UrlPath),
            "/v1/AgAAAAAAAIR8CQrXcIhbQAAAAAA%3D/x"
        );
    }

    #[test]
    fn format_filters_and_chains() {
        assert_eq!(render("<< expiry_month | mm >>", Context::Raw), "03");
        assert_eq!(render("<< expiry_year | yy >>", Context::Raw), "29");
        assert_eq!(
            render("<< expiry_year | yy | yyyy >>", Context::Raw),
            "2029"
        );
        assert_eq!(render("<< number | last4 >>", Context::Raw), "5678");
        assert_eq!(render("<< number | first6 >>", Context::Raw), "489537");
        assert_eq!(
            render(
                r#"{"m": "<< expiry_month | mm | unwrap >>"}"#,
                Context::Json
            ),
            r#"{"m": "03"}"#
        );
        assert_eq!(render("[<< dynamic_cvv | last4 >>]", Context::Raw), "[]");
    }

    #[test]
    fn content_types() {
        let c = |s: &str| Context::for_content_type(Some(s.as_bytes()));
        assert_eq!(c("application/json; charset=utf-8"), Context::Json);
        assert_eq!(c("Application/Vnd.API+JSON"), Context::Json);
        assert_eq!(c("application/x-www-form-urlencoded"), Context::Form);
        assert_eq!(c("text/xml"), Context::Xml);
        assert_eq!(c("application/soap+xml"), Context::Xml);
        assert_eq!(c("text/plain"), Context::Raw);
        assert_eq!(Context::for_content_type(None), Context::Raw);
    }

    proptest! {
        #[test]
        fn bytes_without_delimiters_pass_through(input in proptest::collection::vec(any::<u8>(), 0..512)) {
            prop_assume!(memmem::find(&input, b"<<").is_none());
            for ctx in [Context::Json, Context::Raw, Context::Form] {
                let t = Template::parse(&input, Syntax::Angle, ctx, Namespace::NetworkToken).unwrap();
                prop_assert!(t.is_static());
                prop_assert_eq!(t.render_to_vec(&input, &values()), input.clone());
            }
        }

        #[test]
        fn bytes_outside_placeholders_never_change(
            chunks in proptest::collection::vec("[a-zA-Z0-9 ,:;{}\\[\\]\n\t=&/.-]{0,40}", 1..8),
            picks in proptest::collection::vec(any::<bool>(), 8),
        ) {
            let mut input = String::new();
            let mut expected = String::new();
            for (i, c) in chunks.iter().enumerate() {
                input.push_str(c);
                expected.push_str(c);
                if i + 1 < chunks.len() {
                    if picks[i] {
                        input.push_str("<< number >>");
                        expected.push_str("4895370012345678");
                    } else {
                        input.push_str("<<eci>>");
                        expected.push_str("07");
                    }
                }
            }
            let t = Template::parse(input.as_bytes(), Syntax::Angle, Context::Raw, Namespace::NetworkToken).unwrap();
            prop_assert_eq!(String::from_utf8(t.render_to_vec(input.as_bytes(), &values())).unwrap(), expected);
        }
    }
}
