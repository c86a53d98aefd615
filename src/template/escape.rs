//! Escaping a value's bytes for where they land: JSON string content,
//! percent-encoding, XML text, header values.
//!
//! Each escaper walks its input as runs of bytes that pass unchanged, each
//! ended by one byte that does not (`runs`), so a literal byte is copied
//! by the run and no index into the input is ever taken.
//!
//! It must never drop a byte other than those its context forbids (XML's
//! and a header's control bytes), nor let a byte through that would end
//! its context.

use super::Context;

/// How a hole's text is escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Escape {
    None,
    JsonString,
    Percent,
    /// Percent-encoding in the URL path: all-dot values encoded too.
    PercentPath,
    Xml,
    Header,
}

impl Escape {
    pub(super) fn for_context(ctx: Context) -> Escape {
        match ctx {
            Context::Json | Context::Raw => Escape::None,
            Context::Form | Context::UrlQuery => Escape::Percent,
            Context::UrlPath => Escape::PercentPath,
            Context::Xml => Escape::Xml,
            Context::Header => Escape::Header,
        }
    }
}

/// `bytes` as runs of bytes for which `special` is false, each with the
/// special byte that ends it (none for the last run).
fn runs(
    bytes: &[u8],
    special: impl Fn(u8) -> bool + Copy,
) -> impl Iterator<Item = (&[u8], Option<u8>)> {
    bytes
        .split_inclusive(move |&b| special(b))
        .map(move |chunk| match chunk.split_last() {
            Some((&last, run)) if special(last) => (run, Some(last)),
            _ => (chunk, None),
        })
}

/// `b` as two lowercase hex digits.
fn hex_lower(b: u8) -> [u8; 2] {
    let mut digits = *b"00";
    let encoded = hex::encode_to_slice([b], &mut digits);
    // One byte is always two digits.
    debug_assert!(encoded.is_ok());
    digits
}

/// Write `bytes` as JSON string content: `"`, `\` and control bytes
/// escaped.
pub(super) fn json_escape(bytes: &[u8], out: &mut Vec<u8>) {
    json_escape_with(bytes, |chunk| out.extend_from_slice(chunk));
}

/// JSON-escape `bytes`, handing the output to `emit` in chunks.
pub(super) fn json_escape_with(bytes: &[u8], mut emit: impl FnMut(&[u8])) {
    for (run, special) in runs(bytes, |b| b == b'"' || b == b'\\' || b < 0x20) {
        emit(run);
        let Some(b) = special else { continue };
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            _ => {
                let [hi, lo] = hex_lower(b);
                emit(&[b'\\', b'u', b'0', b'0', hi, lo]);
                continue;
            }
        };
        emit(short);
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Percent-encode every byte outside the RFC 3986 unreserved set.
pub fn percent_encode(bytes: &[u8], out: &mut Vec<u8>) {
    for (run, special) in runs(bytes, |b| !is_unreserved(b)) {
        out.extend_from_slice(run);
        if let Some(b) = special {
            let [hi, lo] = hex_lower(b).map(|d| d.to_ascii_uppercase());
            out.extend_from_slice(&[b'%', hi, lo]);
        }
    }
}

/// Escape the five XML special characters and drop what XML 1.0 forbids
/// (C0 controls other than tab, LF and CR; U+FFFE and U+FFFF, which are
/// `EF BF BE` / `EF BF BF` in UTF-8).
pub fn xml_escape(bytes: &[u8], out: &mut Vec<u8>) {
    let special = |b: u8| {
        matches!(b, b'&' | b'<' | b'>' | b'"' | b'\'' | 0xef)
            || (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'))
    };
    let mut runs = runs(bytes, special);
    let mut next = runs.next();
    while let Some((run, special)) = next {
        next = runs.next();
        out.extend_from_slice(run);
        let entity: &[u8] = match special {
            None => b"",
            Some(b'&') => b"&amp;",
            Some(b'<') => b"&lt;",
            Some(b'>') => b"&gt;",
            Some(b'"') => b"&quot;",
            Some(b'\'') => b"&apos;",
            // U+FFFE or U+FFFF: its `BF BE` / `BF BF` begin the next run.
            Some(0xef) => match next {
                Some(([0xbf, 0xbe | 0xbf, rest @ ..], ends)) => {
                    next = Some((rest, ends));
                    b""
                }
                _ => b"\xef",
            },
            // A control byte XML 1.0 forbids.
            Some(_) => b"",
        };
        out.extend_from_slice(entity);
    }
}

/// Copy `bytes` without control bytes other than tab (so no CR or LF).
pub(super) fn header_clean(bytes: &[u8], out: &mut Vec<u8>) {
    for run in bytes.split(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        out.extend_from_slice(run);
    }
}
