//! Parsing: one `memchr::memmem` scan of the input for placeholders, each
//! checked against a [`Namespace`] and recorded as a hole (the input range
//! it replaces and how its value is escaped), and the error that names
//! what is wrong.
//!
//! It must never keep input bytes (holes are offsets), nor put anything
//! but names, filters and offsets into an error; template text quoted in
//! an error goes through `shown` (card-number-like digit runs masked).

use std::fmt;

use memchr::memmem;

use super::escape::Escape;
use super::{Context, Field, Filter, Namespace, Syntax, Template};

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

/// A placeholder and the input range it replaces.
#[derive(Debug, Clone)]
pub(super) struct Hole {
    /// First replaced byte (the open delimiter, or the opening quote when
    /// the quotes are removed).
    pub(super) start: usize,
    /// One past the last replaced byte.
    pub(super) end: usize,
    pub(super) placeholder: Placeholder,
    pub(super) escape: Escape,
    /// Write the JSON form: `unwrap` is in the chain, or the hole stands
    /// outside a JSON string literal.
    pub(super) unwrap: bool,
    /// No format filter in the chain: the value is written straight out.
    pub(super) plain: bool,
}

/// Most bytes one byte of a value can become once escaped, whatever the
/// context: a control byte is `\u0001` in JSON, and that percent-encoded
/// is `%5Cu0001` (8).
const MAX_EXPANSION: usize = 8;

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
        // Where a suffix of the input starts in it.
        let offset = |suffix: &[u8]| input.len() - suffix.len();
        let mut json = JsonScan::default();
        let mut holes = Vec::new();
        // The input after the last hole: its literal run not yet scanned
        // for JSON strings comes first.
        let mut rest = input;

        while let Some((literal, after_open)) = split_around(rest, &open_finder) {
            let literal_start = offset(rest);
            let at = literal_start + literal.len();
            let (content, after_close) = split_around(after_open, &close_finder)
                .ok_or(TemplateError::new(TemplateErrorKind::Unclosed, at))?;
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

            let mut after = after_close;
            let (start, escape) = if ctx == Context::Json {
                json.scan(literal, literal_start);
                // The opening quote of a string literal the placeholder
                // begins, with `unwrap`.
                let quote = json
                    .string_start
                    .filter(|&q| unwrap && json.in_string && q + 1 == at);
                match (quote, after_close.split_first()) {
                    // The whole content of the string: the quotes go too.
                    (Some(quote), Some((b'"', after_quote))) => {
                        json.in_string = false;
                        json.string_start = None;
                        after = after_quote;
                        (quote, Escape::None)
                    }
                    _ if json.in_string => (at, Escape::JsonString),
                    // Outside a string literal only a JSON value may go:
                    // a string is quoted, never written raw.
                    _ => {
                        unwrap = true;
                        (at, Escape::None)
                    }
                }
            } else {
                (at, escape)
            };
            holes.push(Hole {
                start,
                end: offset(after),
                placeholder,
                escape,
                unwrap,
                plain,
            });
            rest = after;
        }
        let replaced: usize = holes.iter().map(|h| h.end - h.start).sum();
        let max_len = holes
            .iter()
            .map(|h| hole_bound(&h.placeholder))
            .fold(input.len().saturating_sub(replaced), usize::saturating_add);
        Ok(Template { holes, max_len })
    }
}

/// `hay` around the first match of `finder`: the bytes before the match
/// and those after it.
fn split_around<'h>(hay: &'h [u8], finder: &memmem::Finder<'_>) -> Option<(&'h [u8], &'h [u8])> {
    let at = finder.find(hay)?;
    let split = hay
        .split_at_checked(at)
        .and_then(|(before, from)| Some((before, from.strip_prefix(finder.needle())?)));
    debug_assert!(split.is_some(), "a match lies inside the haystack");
    split
}

/// `bytes` around the first `sep`, if there is one.
pub(super) fn split_once(bytes: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let mut halves = bytes.splitn(2, |&b| b == sep);
    Some((halves.next()?, halves.next()?))
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

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
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
    let (name, chain) = match split_once(content, b'|') {
        Some((name, chain)) => (trim_blank(name), Some(chain)),
        None => (content, None),
    };
    if name.is_empty() {
        return Err(TemplateError::new(TemplateErrorKind::Empty, at));
    }
    let (base, key) = match split_once(name, b'.') {
        Some((base, key)) => (base, Some(key)),
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
        Some(k) => match std::str::from_utf8(k) {
            Ok(k) if valid_key(k) => Some(Box::from(k)),
            _ => {
                return Err(TemplateError::new(
                    TemplateErrorKind::InvalidKey {
                        name: field.name(),
                        key: shown(k),
                    },
                    at,
                ));
            }
        },
    };
    let mut filters = Vec::new();
    for part in chain.into_iter().flat_map(|c| c.split(|b| *b == b'|')) {
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
