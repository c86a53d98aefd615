//! Rendering: every literal byte copied unchanged, each hole's value
//! written in its string or JSON form through the hole's escaping, format
//! filters applied to the string form first.
//!
//! It must never write a value anywhere but the output buffer, nor take
//! an index into the input that the caller's contract (the same input as
//! given to parse) does not cover: with other bytes the output is
//! unspecified, but nothing panics.

use std::collections::BTreeMap;
use std::fmt;

use super::escape::{
    header_clean, json_escape, json_escape_with, percent_encode, xml_escape, Escape,
};
use super::parse::Hole;
use super::{Field, Filter, Template};

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

impl Template {
    /// Append the rendered `input` to `out`. `input` must be the bytes given
    /// to [`Template::parse`]; given other bytes, the output is unspecified
    /// (but this never panics).
    pub fn render(&self, input: &[u8], values: &dyn Values, out: &mut Vec<u8>) {
        out.reserve(self.size_hint(input.len()));
        let mut pos = 0;
        for hole in &self.holes {
            // Within `input` when it is the parsed input; `get` is for the
            // caller that breaks that contract.
            if let Some(literal) = input.get(pos..hole.start) {
                out.extend_from_slice(literal);
            }
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
        if let Some(literal) = input.get(pos..) {
            out.extend_from_slice(literal);
        }
    }

    /// The rendered `input` in a new, pre-sized vector. `input` must be the
    /// bytes given to [`Template::parse`].
    pub fn render_to_vec(&self, input: &[u8], values: &dyn Values) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size_hint(input.len()));
        self.render(input, values, &mut out);
        out
    }
}

/// The output buffer with the escaping of the hole being written.
struct Out<'a> {
    buf: &'a mut Vec<u8>,
    escape: Escape,
}

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
        self.put(itoa::Buffer::new().format(n).as_bytes());
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
        let text = String::from_utf8(buf);
        // Only UTF-8 (`&str`, digits, ASCII punctuation) was written.
        debug_assert!(text.is_ok(), "a value's string form is UTF-8");
        text.unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
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
