//! Placeholder templates: `<< name >>` or `<< name | filter | … >>` (or the
//! same with `{{ … }}`) in a request body, a header value, or the path and
//! query of the destination URL, replaced by card-token values.
//!
//! This module owns (one file a concern: the field table and filters in
//! `fields`, the scan in `parse`, the escapers in `escape`, the output in
//! `render`):
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

mod escape;
mod fields;
mod parse;
mod render;
#[cfg(test)]
mod tests;

pub use escape::{percent_encode, xml_escape};
pub use fields::{Field, Filter, Namespace};
pub use parse::{Placeholder, TemplateError, TemplateErrorKind};
pub use render::{apply_filter, Value, Values};

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
        let essence = parse::split_once(ct, b';').map_or(ct, |(essence, _)| essence);
        let essence = essence.trim_ascii();
        let is = |s: &str| essence.eq_ignore_ascii_case(s.as_bytes());
        let has_suffix = |suffix: &str| {
            essence.len() > suffix.len()
                && essence
                    .iter()
                    .rev()
                    .zip(suffix.as_bytes().iter().rev())
                    .all(|(a, b)| a.eq_ignore_ascii_case(b))
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

/// What a byte sequence expands to at most, per placeholder, when sizing
/// the output (a PAN is 19 digits; a cryptogram 28 base64 characters).
const ESTIMATE_PER_HOLE: usize = 32;

/// A parsed template: literal ranges of the input and the holes between
/// them. Holds no input bytes: render with the same input given to parse.
#[derive(Debug, Clone)]
pub struct Template {
    holes: Vec<parse::Hole>,
    max_len: usize,
}

impl Template {
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
}
