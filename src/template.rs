//! Placeholder templates: `<< name >>` or `<< name | filter | … >>` (or the
//! same with `{{ … }}`) in a request body, a header value, or the path and
//! query of the destination URL, replaced by card-token values.
//!
//! This module owns:
//!
//! - parsing: [`Template::parse`] scans the input once with
//!   `memchr::memmem`, validates every placeholder name, key and filter
//!   against a [`Namespace`], and records where each hole is and how its
//!   value must be escaped;
//! - rendering: [`Template::render`] copies every literal byte unchanged and
//!   writes each value escaped for where it lands:
//!   - JSON (`application/json`, `*/*+json`): inside a string literal the
//!     text is JSON-escaped (no quotes added); outside one, the value is
//!     always written as a JSON value (a string quoted and escaped, as with
//!     `| unwrap`), so no value can add keys or end the document.
//!     With `| unwrap` the native JSON value is written, and when the
//!     placeholder is the whole content of a string literal the two quotes
//!     go too (`"exp": "<< expiry_month | unwrap >>"` → `"exp": 12`, as
//!     Hellgate writes requests);
//!   - form bodies, URL path and query: percent-encoded (only the RFC 3986
//!     unreserved bytes pass); in the path a value made only of dots has
//!     them encoded (`%2E`), so it cannot act as a `.`/`..` segment;
//!   - XML (`application/xml`, `text/xml`, `*/*+xml`): entity-escaped, and
//!     the characters XML 1.0 forbids (C0 controls but tab, LF, CR; U+FFFE,
//!     U+FFFF) are dropped;
//!   - header values: raw, with control bytes dropped so CR/LF cannot occur;
//!   - anything else (raw): only values from a fixed alphabet (numbers,
//!     cryptograms, ids, enums) are allowed; merchant-controlled free text
//!     (`metadata…`, `scheme_metadata…`, `cardholder_name`) is refused at
//!     parse time, because it cannot be escaped for an unknown type.
//!
//! Each parse also computes [`Template::max_rendered_len`], an upper bound
//! on the rendered size whatever the values, so a caller can refuse an
//! amplifying template before it spends anything.
//!
//! It must never: re-serialise or otherwise touch a byte outside a
//! placeholder; do I/O or log; put a value into an error, a `Debug` string
//! or anything else that outlives the rendered output (errors name
//! placeholders, filters and byte offsets only, and [`Value`]'s `Debug`
//! is redacted); panic on any input.

use std::collections::BTreeMap;
use std::fmt;

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

/// Where a template's text lands, which decides how values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// A JSON body: values are JSON-escaped inside string literals.
    Json,
    /// An `application/x-www-form-urlencoded` body: values are
    /// percent-encoded.
    Form,
    /// An XML body: values are entity-escaped.
    Xml,
    /// Any other body: values are written as they are.
    Raw,
    /// A header value: values are written with control bytes dropped.
    Header,
    /// The URL path: values are percent-encoded.
    UrlPath,
    /// The URL query: values are percent-encoded.
    UrlQuery,
}

impl Context {
    /// The body context for a `Content-Type` header value: case-insensitive,
    /// parameters after `;` and surrounding whitespace ignored.
    /// `application/json` and `*/*+json` are [`Context::Json`],
    /// `application/x-www-form-urlencoded` is [`Context::Form`],
    /// `application/xml`, `text/xml` and `*/*+xml` are [`Context::Xml`];
    /// anything else, or no header, is [`Context::Raw`].
    pub fn for_content_type(ct: Option<&[u8]>) -> Context {
        let Some(ct) = ct else {
            return Context::Raw;
        };
        let essence = match memchr::memchr(b';', ct) {
            Some(i) => ct.get(..i).unwrap_or(ct),
            None => ct,
        };
        let essence = essence.trim_ascii();
        let is = |s: &str| essence.eq_ignore_ascii_case(s.as_bytes());
        let has_suffix = |suffix: &str| {
            let n = suffix.len();
            essence.len() > n
                && essence
                    .get(essence.len() - n..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix.as_bytes()))
                && memchr::memchr(b'/', essence).is_some()
        };
        if is("application/json") || has_suffix("+json") {
            Context::Json
        } else if is("application/x-www-form-urlencoded") {
            Context::Form
        } else if is("application/xml") || is("text/xml") || has_suffix("+xml") {
            Context::Xml
        } else {
            Context::Raw
        }
    }
}

/// Which placeholder names a template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Namespace {
    /// Network-token requests: `number`, `cryptogram`, `eci`, ….
    NetworkToken,
    /// PCI-token requests: `account_number`, `security_code`, ….
    PciToken,
}

/// A value a placeholder names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// `cryptogram` (network token).
    Cryptogram,
    /// `dynamic_cvv` (network token).
    DynamicCvv,
    /// `eci` (network token).
    Eci,
    /// `expiry_month` (both namespaces).
    ExpiryMonth,
    /// `expiry_year` (both namespaces).
    ExpiryYear,
    /// `number` (network token).
    Number,
    /// `type` (network token).
    Type,
    /// `metadata` or `metadata.<key>` (both namespaces).
    Metadata,
    /// `scheme_reference` (network token).
    SchemeReference,
    /// `scheme_metadata` or `scheme_metadata.<key>` (network token).
    SchemeMetadata,
    /// `status` (network token).
    Status,
    /// `supports_device_binding` (network token).
    SupportsDeviceBinding,
    /// `network_token_id` (network token).
    NetworkTokenId,
    /// `network_token_type` (network token).
    NetworkTokenType,
    /// `network_token_metadata` or `network_token_metadata.<key>` (network
    /// token).
    NetworkTokenMetadata,
    /// `account_number` (PCI token).
    AccountNumber,
    /// `cardholder_name` (PCI token).
    CardholderName,
    /// `security_code` (PCI token).
    SecurityCode,
    /// `bin` (PCI token).
    Bin,
    /// `last4` (PCI token).
    Last4,
    /// `pci_token_id` (PCI token).
    PciTokenId,
}

impl Field {
    /// Every field, in declaration order.
    pub const ALL: [Field; 21] = [
        Field::Cryptogram,
        Field::DynamicCvv,
        Field::Eci,
        Field::ExpiryMonth,
        Field::ExpiryYear,
        Field::Number,
        Field::Type,
        Field::Metadata,
        Field::SchemeReference,
        Field::SchemeMetadata,
        Field::Status,
        Field::SupportsDeviceBinding,
        Field::NetworkTokenId,
        Field::NetworkTokenType,
        Field::NetworkTokenMetadata,
        Field::AccountNumber,
        Field::CardholderName,
        Field::SecurityCode,
        Field::Bin,
        Field::Last4,
        Field::PciTokenId,
    ];

    /// The placeholder name, e.g. `"dynamic_cvv"`.
    pub fn name(self) -> &'static str {
        match self {
            Field::Cryptogram => "cryptogram",
            Field::DynamicCvv => "dynamic_cvv",
            Field::Eci => "eci",
            Field::ExpiryMonth => "expiry_month",
            Field::ExpiryYear => "expiry_year",
            Field::Number => "number",
            Field::Type => "type",
            Field::Metadata => "metadata",
            Field::SchemeReference => "scheme_reference",
            Field::SchemeMetadata => "scheme_metadata",
            Field::Status => "status",
            Field::SupportsDeviceBinding => "supports_device_binding",
            Field::NetworkTokenId => "network_token_id",
            Field::NetworkTokenType => "network_token_type",
            Field::NetworkTokenMetadata => "network_token_metadata",
            Field::AccountNumber => "account_number",
            Field::CardholderName => "cardholder_name",
            Field::SecurityCode => "security_code",
            Field::Bin => "bin",
            Field::Last4 => "last4",
            Field::PciTokenId => "pci_token_id",
        }
    }

    /// Whether the field may be used in `ns`.
    pub fn in_namespace(self, ns: Namespace) -> bool {
        match self {
            Field::ExpiryMonth | Field::ExpiryYear | Field::Metadata => true,
            Field::Cryptogram
            | Field::DynamicCvv
            | Field::Eci
            | Field::Number
            | Field::Type
            | Field::SchemeReference
            | Field::SchemeMetadata
            | Field::Status
            | Field::SupportsDeviceBinding
            | Field::NetworkTokenId
            | Field::NetworkTokenType
            | Field::NetworkTokenMetadata => ns == Namespace::NetworkToken,
            Field::AccountNumber
            | Field::CardholderName
            | Field::SecurityCode
            | Field::Bin
            | Field::Last4
            | Field::PciTokenId => ns == Namespace::PciToken,
        }
    }

    /// Whether the value is free text a merchant (or a token service)
    /// chose, which only a known body type can escape.
    pub fn is_free_text(self) -> bool {
        matches!(
            self,
            Field::Metadata
                | Field::SchemeMetadata
                | Field::NetworkTokenMetadata
                | Field::CardholderName
        )
    }

    /// Most bytes of the value's string form (a map's: its JSON form).
    fn max_text_bytes(self, keyed: bool) -> usize {
        match self {
            Field::Metadata | Field::SchemeMetadata | Field::NetworkTokenMetadata => {
                if keyed {
                    4 * crate::vault::METADATA_MAX_VALUE
                } else {
                    MAX_MAP_BYTES
                }
            }
            Field::CardholderName => 4 * 100,
            Field::SchemeReference => 128,
            Field::Cryptogram => 64,
            Field::NetworkTokenId | Field::PciTokenId => 36,
            // Integers are at most 20 characters (`i64::MIN`).
            Field::ExpiryMonth | Field::ExpiryYear => 20,
            Field::Number | Field::AccountNumber => 19,
            Field::Type | Field::Status | Field::NetworkTokenType => 16,
            Field::DynamicCvv | Field::Eci => 8,
            Field::Bin | Field::SecurityCode | Field::Last4 | Field::SupportsDeviceBinding => 6,
        }
    }

    /// Whether the field takes a `.key` (the three metadata maps).
    pub fn takes_key(self) -> bool {
        matches!(
            self,
            Field::Metadata | Field::SchemeMetadata | Field::NetworkTokenMetadata
        )
    }

    /// The field named `name` in `ns`, if any.
    pub fn from_name(name: &[u8], ns: Namespace) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|f| f.name().as_bytes() == name && f.in_namespace(ns))
    }
}

/// A filter in a placeholder's `| …` chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// Write the native JSON value (number, `true`, `null`, object, or a
    /// quoted string).
    Unwrap,
    /// A month `1..=12` as two digits.
    Mm,
    /// A year of two or more digits as its last two.
    Yy,
    /// A two-digit year as `20YY`.
    Yyyy,
    /// The last four characters.
    Last4,
    /// The first six characters.
    First6,
}

impl Filter {
    /// Every filter.
    pub const ALL: [Filter; 6] = [
        Filter::Unwrap,
        Filter::Mm,
        Filter::Yy,
        Filter::Yyyy,
        Filter::Last4,
        Filter::First6,
    ];

    /// The filter's name as written in a template.
    pub fn name(self) -> &'static str {
        match self {
            Filter::Unwrap => "unwrap",
            Filter::Mm => "mm",
            Filter::Yy => "yy",
            Filter::Yyyy => "yyyy",
            Filter::Last4 => "last4",
            Filter::First6 => "first6",
        }
    }

    /// The filter named `name`, if any.
    pub fn from_name(name: &[u8]) -> Option<Filter> {
        Filter::ALL
            .into_iter()
            .find(|f| f.name().as_bytes() == name)
    }
}

/// A value to put in place of a placeholder.
///
/// `Debug` never shows the value itself.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// A string.
    Str(&'a str),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// No value: empty text, or JSON `null` with `unwrap`.
    Null,
    /// A string map, written as a compact JSON object.
    Map(&'a BTreeMap<String, String>),
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(_) => f.write_str("Str(<redacted>)"),
            Value::Int(_) => f.write_str("Int(<redacted>)"),
            Value::Bool(_) => f.write_str("Bool(<redacted>)"),
            Value::Null => f.write_str("Null"),
            Value::Map(m) => write!(f, "Map(<{} redacted entries>)", m.len()),
        }
    }
}

/// The source of placeholder values for one render.
pub trait Values {
    /// The value of `field`, with `key` for the metadata maps
    /// (`metadata.<key>`); [`Value::Null`] when there is none.
    fn get(&self, field: Field, key: Option<&str>) -> Value<'_>;
}

/// One parsed placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    /// The named field.
    pub field: Field,
    /// The `.key` of a metadata field.
    pub key: Option<Box<str>>,
    /// The filters, applied left to right.
    pub filters: Vec<Filter>,
}

/// How a hole's text is escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    JsonString,
    Percent,
    /// Percent-encoding in the URL path: all-dot values encoded too.
    PercentPath,
    Xml,
    Header,
}

impl Escape {
    fn for_context(ctx: Context) -> Escape {
        match ctx {
            Context::Json | Context::Raw => Escape::None,
            Context::Form | Context::UrlQuery => Escape::Percent,
            Context::UrlPath => Escape::PercentPath,
            Context::Xml => Escape::Xml,
            Context::Header => Escape::Header,
        }
    }
}

/// A placeholder and the input range it replaces.
#[derive(Debug, Clone)]
struct Hole {
    /// First replaced byte (the open delimiter, or the opening quote when
    /// the quotes are removed).
    start: usize,
    /// One past the last replaced byte.
    end: usize,
    placeholder: Placeholder,
    escape: Escape,
    /// Write the JSON form: `unwrap` is in the chain, or the hole stands
    /// outside a JSON string literal.
    unwrap: bool,
    /// No format filter in the chain: the value is written straight out.
    plain: bool,
}

/// What a byte sequence expands to at most, per placeholder, when sizing
/// the output (a PAN is 19 digits; a cryptogram 28 base64 characters).
const ESTIMATE_PER_HOLE: usize = 32;

/// Most bytes one byte of a value can become once escaped, whatever the
/// context: a control byte is `\u0001` in JSON, and that percent-encoded
/// is `%5Cu0001` (8).
const MAX_EXPANSION: usize = 8;

/// Most bytes of a metadata map's compact JSON form before escaping:
/// braces, and per pair two quoted strings, a colon and a comma (limits of
/// `api::json::metadata`, four UTF-8 bytes per character).
const MAX_MAP_BYTES: usize = 2 + crate::vault::METADATA_MAX_PAIRS
    * (4 * (crate::vault::METADATA_MAX_KEY + crate::vault::METADATA_MAX_VALUE) + 6);

/// A parsed template: literal ranges of the input and the holes between
/// them. Holds no input bytes: render with the same input given to parse.
#[derive(Debug, Clone)]
pub struct Template {
    holes: Vec<Hole>,
    max_len: usize,
}

impl Template {
    /// Parse `input`, checking every placeholder against `ns`. `ctx` decides
    /// how values will be escaped.
    pub fn parse(
        input: &[u8],
        syntax: Syntax,
        ctx: Context,
        ns: Namespace,
    ) -> Result<Template, TemplateError> {
        let (open, close) = syntax.delimiters();
        let open_finder = memmem::Finder::new(open);
        let close_finder = memmem::Finder::new(close);
        let escape = Escape::for_context(ctx);
        let mut json = JsonScan::default();
        let mut holes = Vec::new();
        // Start of the literal run not yet scanned for JSON strings.
        let mut literal = 0;

        while let Some(rel) = input.get(literal..).and_then(|rest| open_finder.find(rest)) {
            let at = literal + rel;
            let content_start = at + open.len();
            let close_rel = input
                .get(content_start..)
                .and_then(|tail| close_finder.find(tail))
                .ok_or(TemplateError::new(TemplateErrorKind::Unclosed, at))?;
            let content_end = content_start + close_rel;
            let close_end = content_end + close.len();
            let content = input.get(content_start..content_end).unwrap_or_default();
            let placeholder = parse_placeholder(content, ns, at)?;
            if ctx == Context::Raw && placeholder.field.is_free_text() {
                return Err(TemplateError::new(
                    TemplateErrorKind::FreeTextInRaw {
                        name: placeholder.field.name(),
                    },
                    at,
                ));
            }
            let mut unwrap = placeholder.filters.contains(&Filter::Unwrap);
            let plain = placeholder.filters.iter().all(|f| *f == Filter::Unwrap);

            let (start, end, escape) = if ctx == Context::Json {
                json.scan(input.get(literal..at).unwrap_or_default(), literal);
                let whole = unwrap
                    && json.in_string
                    && at.checked_sub(1) == json.string_start
                    && input.get(close_end) == Some(&b'"');
                if whole {
                    json.in_string = false;
                    json.string_start = None;
                    (at - 1, close_end + 1, Escape::None)
                } else if json.in_string {
                    (at, close_end, Escape::JsonString)
                } else {
                    // Outside a string literal only a JSON value may go:
                    // a string is quoted, never written raw.
                    unwrap = true;
                    (at, close_end, Escape::None)
                }
            } else {
                (at, close_end, escape)
            };
            holes.push(Hole {
                start,
                end,
                placeholder,
                escape,
                unwrap,
                plain,
            });
            literal = end;
        }
        let replaced: usize = holes.iter().map(|h| h.end - h.start).sum();
        let max_len = holes
            .iter()
            .map(|h| hole_bound(&h.placeholder))
            .fold(input.len().saturating_sub(replaced), usize::saturating_add);
        Ok(Template { holes, max_len })
    }

    /// An upper bound on the rendered size, whatever the values (within
    /// the vault's limits on them): what an amplification check compares.
    pub fn max_rendered_len(&self) -> usize {
        self.max_len
    }

    /// Whether the template has no placeholders, so the input can be passed
    /// through untouched.
    pub fn is_static(&self) -> bool {
        self.holes.is_empty()
    }

    /// The placeholders, in input order.
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.holes.iter().map(|h| &h.placeholder)
    }

    /// A capacity that fits the rendered output in the common case.
    pub fn size_hint(&self, input_len: usize) -> usize {
        input_len.saturating_add(self.holes.len().saturating_mul(ESTIMATE_PER_HOLE))
    }

    /// Append the rendered `input` to `out`. `input` must be the bytes given
    /// to [`Template::parse`]; given other bytes, the output is unspecified
    /// (but this never panics).
    pub fn render(&self, input: &[u8], values: &dyn Values, out: &mut Vec<u8>) {
        out.reserve(self.size_hint(input.len()));
        let mut pos = 0;
        for hole in &self.holes {
            out.extend_from_slice(input.get(pos..hole.start).unwrap_or_default());
            render_hole(
                hole,
                values,
                &mut Out {
                    buf: out,
                    escape: hole.escape,
                },
            );
            pos = hole.end;
        }
        out.extend_from_slice(input.get(pos..).unwrap_or_default());
    }

    /// The rendered `input` in a new, pre-sized vector. `input` must be the
    /// bytes given to [`Template::parse`].
    pub fn render_to_vec(&self, input: &[u8], values: &dyn Values) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size_hint(input.len()));
        self.render(input, values, &mut out);
        out
    }
}

/// JSON string-literal tracking over the literal bytes of a template.
#[derive(Debug, Default)]
struct JsonScan {
    in_string: bool,
    /// Input offset of the opening quote of the current string literal.
    string_start: Option<usize>,
}

impl JsonScan {
    /// Advance over `bytes`, which start at input offset `base`.
    fn scan(&mut self, bytes: &[u8], base: usize) {
        let mut i = 0;
        while let Some(rest) = bytes.get(i..) {
            if rest.is_empty() {
                break;
            }
            if self.in_string {
                let Some(r) = memchr::memchr2(b'"', b'\\', rest) else {
                    break;
                };
                if rest.get(r) == Some(&b'\\') {
                    i += r + 2;
                } else {
                    self.in_string = false;
                    self.string_start = None;
                    i += r + 1;
                }
            } else {
                let Some(r) = memchr::memchr(b'"', rest) else {
                    break;
                };
                self.in_string = true;
                self.string_start = Some(base + i + r);
                i += r + 1;
            }
        }
    }
}

/// Most bytes a placeholder can render to: its text, quoted, each byte
/// escaped at worst.
fn hole_bound(p: &Placeholder) -> usize {
    (p.field.max_text_bytes(p.key.is_some()) + 2).saturating_mul(MAX_EXPANSION)
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_blank(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_blank(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_blank(*last) {
            break;
        }
        s = rest;
    }
    s
}

const MAX_KEY_LEN: usize = 20;

fn valid_key(key: &[u8]) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

/// Parse the text between the delimiters of the placeholder at `at`.
fn parse_placeholder(
    content: &[u8],
    ns: Namespace,
    at: usize,
) -> Result<Placeholder, TemplateError> {
    let content = trim_blank(content);
    if content.is_empty() {
        return Err(TemplateError::new(TemplateErrorKind::Empty, at));
    }
    let mut parts = content.split(|b| *b == b'|');
    let name = trim_blank(parts.next().unwrap_or_default());
    if name.is_empty() {
        return Err(TemplateError::new(TemplateErrorKind::Empty, at));
    }
    let (base, key) = match memchr::memchr(b'.', name) {
        Some(dot) => (
            name.get(..dot).unwrap_or_default(),
            Some(name.get(dot + 1..).unwrap_or_default()),
        ),
        None => (name, None),
    };
    let field = Field::from_name(base, ns).ok_or_else(|| {
        TemplateError::new(
            TemplateErrorKind::UnknownPlaceholder { name: shown(name) },
            at,
        )
    })?;
    let key = match key {
        None => None,
        Some(_) if !field.takes_key() => {
            return Err(TemplateError::new(
                TemplateErrorKind::KeyNotAllowed { name: field.name() },
                at,
            ));
        }
        Some(k) if !valid_key(k) => {
            return Err(TemplateError::new(
                TemplateErrorKind::InvalidKey {
                    name: field.name(),
                    key: shown(k),
                },
                at,
            ));
        }
        // `valid_key` admits ASCII only, so this is always `Ok`.
        Some(k) => std::str::from_utf8(k).ok().map(Box::from),
    };
    let mut filters = Vec::new();
    for part in parts {
        let part = trim_blank(part);
        if part.is_empty() {
            return Err(TemplateError::new(
                TemplateErrorKind::EmptyFilter {
                    placeholder: shown(name),
                },
                at,
            ));
        }
        let filter = Filter::from_name(part).ok_or_else(|| {
            TemplateError::new(
                TemplateErrorKind::UnknownFilter {
                    filter: shown(part),
                    placeholder: shown(name),
                },
                at,
            )
        })?;
        filters.push(filter);
    }
    Ok(Placeholder {
        field,
        key,
        filters,
    })
}

/// Template text for an error message: lossy UTF-8, control characters
/// escaped, digit runs long enough to be a card number masked, and cut to
/// a bounded length.
fn shown(raw: &[u8]) -> Box<str> {
    const MAX_CHARS: usize = 40;
    const MASK_DIGITS: usize = 10;
    fn flush(run: &mut String, out: &mut String) {
        if run.len() >= MASK_DIGITS {
            out.extend(std::iter::repeat_n('*', run.len()));
        } else {
            out.push_str(run);
        }
        run.clear();
    }
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(raw.len().min(MAX_CHARS * 2));
    let mut run = String::new();
    for ch in text.chars() {
        if ch.is_ascii_digit() {
            run.push(ch);
            continue;
        }
        flush(&mut run, &mut out);
        if ch.is_control() {
            out.extend(ch.escape_default());
        } else {
            out.push(ch);
        }
    }
    flush(&mut run, &mut out);
    if out.chars().count() > MAX_CHARS {
        let mut cut: String = out.chars().take(MAX_CHARS).collect();
        cut.push('…');
        cut.into_boxed_str()
    } else {
        out.into_boxed_str()
    }
}

/// What went wrong in a template.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TemplateErrorKind {
    /// An open delimiter with no close delimiter after it.
    Unclosed,
    /// Nothing but whitespace between the delimiters (or before the first
    /// `|`).
    Empty,
    /// A name that is not a field of the namespace.
    UnknownPlaceholder {
        /// The name as written (sanitised).
        name: Box<str>,
    },
    /// A filter that does not exist.
    UnknownFilter {
        /// The filter as written (sanitised).
        filter: Box<str>,
        /// The placeholder name as written (sanitised).
        placeholder: Box<str>,
    },
    /// `||` or a trailing `|`.
    EmptyFilter {
        /// The placeholder name as written (sanitised).
        placeholder: Box<str>,
    },
    /// A `.key` on a field that is not a metadata map.
    KeyNotAllowed {
        /// The field's name.
        name: &'static str,
    },
    /// Free text in a body whose content type tokenrelay cannot escape for.
    FreeTextInRaw {
        /// The field's name.
        name: &'static str,
    },
    /// A metadata key that is empty, too long or has other characters than
    /// `[A-Za-z0-9_-]`.
    InvalidKey {
        /// The field's name.
        name: &'static str,
        /// The key as written (sanitised).
        key: Box<str>,
    },
}

/// A template that cannot be parsed. Its message names the offending
/// placeholder or filter and the byte offset of the placeholder; it never
/// holds a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    kind: TemplateErrorKind,
    offset: usize,
}

impl TemplateError {
    fn new(kind: TemplateErrorKind, offset: usize) -> TemplateError {
        TemplateError { kind, offset }
    }

    /// What went wrong.
    pub fn kind(&self) -> &TemplateErrorKind {
        &self.kind
    }

    /// Byte offset of the placeholder's open delimiter in the input.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self.offset;
        match &self.kind {
            TemplateErrorKind::Unclosed => write!(f, "unclosed placeholder at byte {at}"),
            TemplateErrorKind::Empty => write!(f, "empty placeholder at byte {at}"),
            TemplateErrorKind::UnknownPlaceholder { name } => {
                write!(f, "unknown placeholder `{name}` at byte {at}")
            }
            TemplateErrorKind::UnknownFilter {
                filter,
                placeholder,
            } => write!(
                f,
                "unknown filter `{filter}` in placeholder `{placeholder}` at byte {at}"
            ),
            TemplateErrorKind::EmptyFilter { placeholder } => {
                write!(
                    f,
                    "empty filter in placeholder `{placeholder}` at byte {at}"
                )
            }
            TemplateErrorKind::KeyNotAllowed { name } => {
                write!(f, "`{name}` takes no key (placeholder at byte {at})")
            }
            TemplateErrorKind::FreeTextInRaw { name } => write!(
                f,
                "`{name}` (placeholder at byte {at}) is free text and the body's content type \
                 is not JSON, form or XML, so it cannot be escaped; send content-type \
                 application/json, application/x-www-form-urlencoded or application/xml"
            ),
            TemplateErrorKind::InvalidKey { name, key } => write!(
                f,
                "invalid key `{key}` for `{name}` at byte {at}: \
                 1 to {MAX_KEY_LEN} characters of A-Z a-z 0-9 _ -"
            ),
        }
    }
}

impl std::error::Error for TemplateError {}

// ---------------------------------------------------------------------------
// Rendering

/// The output buffer with the escaping of the hole being written.
struct Out<'a> {
    buf: &'a mut Vec<u8>,
    escape: Escape,
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";
const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";

impl Out<'_> {
    /// Write `bytes`, escaped for where they land.
    fn put(&mut self, bytes: &[u8]) {
        match self.escape {
            Escape::None => self.buf.extend_from_slice(bytes),
            Escape::JsonString => json_escape(bytes, self.buf),
            Escape::Percent | Escape::PercentPath => percent_encode(bytes, self.buf),
            Escape::Xml => xml_escape(bytes, self.buf),
            Escape::Header => header_clean(bytes, self.buf),
        }
    }

    /// Write `s` as a JSON string literal (quotes included), escaped for
    /// where it lands.
    fn put_json_str(&mut self, s: &str) {
        self.put(b"\"");
        if self.escape == Escape::None {
            json_escape(s.as_bytes(), self.buf);
        } else {
            json_escape_with(s.as_bytes(), |chunk| self.put(chunk));
        }
        self.put(b"\"");
    }

    fn put_int(&mut self, n: i64) {
        let mut buf = [0u8; 20];
        self.put(format_int(n, &mut buf));
    }

    fn put_bool(&mut self, b: bool) {
        self.put(if b { b"true" } else { b"false" });
    }

    fn put_map(&mut self, map: &BTreeMap<String, String>) {
        self.put(b"{");
        for (i, (k, v)) in map.iter().enumerate() {
            if i > 0 {
                self.put(b",");
            }
            self.put_json_str(k);
            self.put(b":");
            self.put_json_str(v);
        }
        self.put(b"}");
    }

    /// Write `value` in its string form, or its JSON form with `json`.
    fn put_value(&mut self, value: Value<'_>, json: bool) {
        match value {
            Value::Str(s) if json => self.put_json_str(s),
            // `.` and `..` would be dot segments; `%2E` is not one.
            Value::Str(s)
                if self.escape == Escape::PercentPath
                    && !s.is_empty()
                    && s.bytes().all(|b| b == b'.') =>
            {
                for _ in 0..s.len() {
                    self.buf.extend_from_slice(b"%2E");
                }
            }
            Value::Str(s) => self.put(s.as_bytes()),
            Value::Int(n) => self.put_int(n),
            Value::Bool(b) => self.put_bool(b),
            Value::Null if json => self.put(b"null"),
            Value::Null => {}
            Value::Map(m) => self.put_map(m),
        }
    }
}

fn render_hole(hole: &Hole, values: &dyn Values, out: &mut Out<'_>) {
    let p = &hole.placeholder;
    let value = values.get(p.field, p.key.as_deref());
    if hole.plain {
        out.put_value(value, hole.unwrap);
        return;
    }
    // Format filters work on the string form; `Null` stays `Null`.
    if value == Value::Null {
        out.put_value(Value::Null, hole.unwrap);
        return;
    }
    let mut text = {
        let mut buf = Vec::new();
        Out {
            buf: &mut buf,
            escape: Escape::None,
        }
        .put_value(value, false);
        // Only UTF-8 (`&str`, digits, ASCII punctuation) was written.
        String::from_utf8(buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    };
    for filter in &p.filters {
        apply_filter(*filter, &mut text);
    }
    out.put_value(Value::Str(&text), hole.unwrap);
}

/// Apply a format filter to `text` in place; `unwrap` changes nothing here.
/// (Also the route templates' `mm`, `yy`, … filters.)
pub fn apply_filter(filter: Filter, text: &mut String) {
    let all_digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    match filter {
        Filter::Unwrap => {}
        Filter::Mm => {
            if all_digits {
                if let Ok(month @ 1..=12) = text.parse::<u8>() {
                    text.clear();
                    text.push(char::from(b'0' + month / 10));
                    text.push(char::from(b'0' + month % 10));
                }
            }
        }
        Filter::Yy => {
            if all_digits && text.len() >= 2 {
                text.drain(..text.len() - 2);
            }
        }
        Filter::Yyyy => {
            if all_digits && text.len() == 2 {
                text.insert_str(0, "20");
            }
        }
        Filter::Last4 => {
            let count = text.chars().count();
            if count > 4 {
                if let Some((at, _)) = text.char_indices().nth(count - 4) {
                    text.drain(..at);
                }
            }
        }
        Filter::First6 => {
            if let Some((at, _)) = text.char_indices().nth(6) {
                text.truncate(at);
            }
        }
    }
}

/// `n` in decimal, written at the end of `buf`.
fn format_int(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut v = n.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        // `v % 10` < 10, so the cast cannot truncate.
        if let Some(slot) = buf.get_mut(i) {
            *slot = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    if n < 0 && i > 0 {
        i -= 1;
        if let Some(slot) = buf.get_mut(i) {
            *slot = b'-';
        }
    }
    buf.get(i..).unwrap_or_default()
}

/// Write `bytes` as JSON string content: `"`, `\` and control bytes
/// escaped.
fn json_escape(bytes: &[u8], out: &mut Vec<u8>) {
    json_escape_with(bytes, |chunk| out.extend_from_slice(chunk));
}

/// JSON-escape `bytes`, handing the output to `emit` in chunks.
fn json_escape_with(bytes: &[u8], mut emit: impl FnMut(&[u8])) {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        emit(bytes.get(start..i).unwrap_or_default());
        if short.is_empty() {
            let hi = HEX_LOWER.get(usize::from(b >> 4)).copied().unwrap_or(b'0');
            let lo = HEX_LOWER.get(usize::from(b & 0xf)).copied().unwrap_or(b'0');
            emit(&[b'\\', b'u', b'0', b'0', hi, lo]);
        } else {
            emit(short);
        }
        start = i + 1;
    }
    emit(bytes.get(start..).unwrap_or_default());
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Percent-encode every byte outside the RFC 3986 unreserved set.
pub fn percent_encode(bytes: &[u8], out: &mut Vec<u8>) {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if is_unreserved(b) {
            continue;
        }
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        let hi = HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0');
        let lo = HEX.get(usize::from(b & 0xf)).copied().unwrap_or(b'0');
        out.extend_from_slice(&[b'%', hi, lo]);
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
}

/// Escape the five XML special characters and drop what XML 1.0 forbids
/// (C0 controls other than tab, LF and CR; U+FFFE and U+FFFF, which are
/// `EF BF BE` / `EF BF BF` in UTF-8).
pub fn xml_escape(bytes: &[u8], out: &mut Vec<u8>) {
    let mut start = 0;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let (entity, skip): (&[u8], usize) = match b {
            b'&' => (b"&amp;", 1),
            b'<' => (b"&lt;", 1),
            b'>' => (b"&gt;", 1),
            b'"' => (b"&quot;", 1),
            b'\'' => (b"&apos;", 1),
            b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            0x00..=0x1f => (b"", 1),
            0xef if matches!(bytes.get(i + 1..i + 3), Some([0xbf, 0xbe | 0xbf])) => (b"", 3),
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        out.extend_from_slice(entity);
        i += skip;
        start = i;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
}

/// Copy `bytes` without control bytes other than tab (so no CR or LF).
fn header_clean(bytes: &[u8], out: &mut Vec<u8>) {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if (b >= 0x20 && b != 0x7f) || b == b'\t' {
            continue;
        }
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
                Field::Metadata | Field::SchemeMetadata | Field::NetworkTokenMetadata => {
                    match key {
                        None => Value::Map(&self.meta),
                        Some(k) => self.meta.get(k).map_or(Value::Null, |v| Value::Str(v)),
                    }
                }
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
        let t =
            Template::parse(input, Syntax::Angle, Context::Raw, Namespace::NetworkToken).unwrap();
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
    fn format_int_extremes() {
        let mut buf = [0u8; 20];
        for n in [0, 1, -1, 9, 10, i64::MAX, i64::MIN, 1234567890] {
            assert_eq!(format_int(n, &mut buf), n.to_string().as_bytes());
        }
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
}
