//! The JSON line of one log event, written straight into the line buffer.
//!
//! Same shape as `tracing-subscriber`'s `.json()` format (`timestamp`,
//! `level`, `fields`, `target`), which this replaces on the hot path: that
//! formatter collects every field into a `BTreeMap` of `serde_json::Value`s
//! before serialising — an allocation per field, two log lines per forward.
//! Here each field is escaped directly into the line.

use std::cell::RefCell;
use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter installed by [`super::init_logging`].
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The line is built in a buffer of this thread's, where every write
        // is a plain push, and handed over whole: through `w` each of the
        // few dozen pieces would be a dynamic call.
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                write_line(&mut line, event)?;
                w.write_str(&line)
            }
            // A field's `Debug` that logs while this thread formats.
            Err(_) => {
                let mut line = String::new();
                write_line(&mut line, event)?;
                w.write_str(&line)
            }
        })
    }
}

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(1024));
}

fn write_line(w: &mut String, event: &Event<'_>) -> fmt::Result {
    let meta = event.metadata();
    w.push_str("{\"timestamp\":\"");
    write_timestamp(w, time::OffsetDateTime::now_utc())?;
    w.push_str("\",\"level\":\"");
    w.push_str(meta.level().as_str());
    w.push_str("\",\"fields\":{");
    let mut fields = Fields {
        w: &mut *w,
        first: true,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    w.push_str("},\"target\":");
    write_str(w, meta.target())?;
    w.push_str("}\n");
    Ok(())
}

/// The timestamp's layout, for the years [`write_timestamp`]'s fast path
/// does not cover.
const TIMESTAMP: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

/// RFC 3339, UTC, microseconds: `2026-11-29T09:58:00.123456Z`.
pub(super) fn write_timestamp(w: &mut String, t: time::OffsetDateTime) -> fmt::Result {
    let year = t.year();
    if !(0..=9999).contains(&year) {
        w.push_str(&t.format(TIMESTAMP).map_err(|_| fmt::Error)?);
        return Ok(());
    }
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    for (at, width, value) in [
        (0, 4, year as u32),
        (5, 2, u32::from(u8::from(t.month()))),
        (8, 2, u32::from(t.day())),
        (11, 2, u32::from(t.hour())),
        (14, 2, u32::from(t.minute())),
        (17, 2, u32::from(t.second())),
        (20, 6, t.microsecond()),
    ] {
        let mut v = value;
        for digit in b[at..at + width].iter_mut().rev() {
            *digit = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    w.push_str(std::str::from_utf8(&b).map_err(|_| fmt::Error)?);
    Ok(())
}

/// Writes each field as `"name":value` after the ones before it.
struct Fields<'a, W: Write> {
    w: &'a mut W,
    first: bool,
    result: fmt::Result,
}

impl<W: Write> Fields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.w.write_char(',')?;
            }
            write_str(self.w, field.name())?;
            self.w.write_char(':')?;
            value(self.w)
        })();
    }
}

impl<W: Write> Visit for Fields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |w| write_str(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        if value.is_finite() {
            self.field(field, |w| write!(w, "{value}"));
        } else {
            self.field(field, |w| write!(w, "\"{value}\""));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value}")?;
            w.write_char('"')
        });
    }
}

/// A JSON string literal.
fn write_str(w: &mut impl Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(s)?;
    w.write_char('"')
}

/// Escapes what passes through for the inside of a JSON string.
struct Escaped<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            // One table load per byte; almost every byte is plain.
            if !NEEDS_ESCAPE[usize::from(b)] {
                continue;
            }
            self.0.write_str(&s[plain..i])?;
            match b {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                _ => write!(self.0, "\\u{b:04x}")?,
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

/// The bytes a JSON string cannot hold as they are: `"`, `\`, the
/// control characters, and DEL (escaped too, as before).
static NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t[0x7f] = true;
    t
};

#[cfg(test)]
mod tests {
    use super::super::tests::Captured;
    use super::*;

    fn capture(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLine)
            .with_writer(out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn the_line_has_the_json_formatters_shape() {
        let lines = capture(|| {
            tracing::info!(target: "tokenrelay::access", route = "forward", status = 200u16, took = 1.5, ok = true, delta = -3i64, "done");
        });
        assert_eq!(lines.len(), 1);
        let l = &lines[0];
        assert_eq!(l["level"], "INFO");
        assert_eq!(l["target"], "tokenrelay::access");
        assert_eq!(l["fields"]["message"], "done");
        assert_eq!(l["fields"]["route"], "forward");
        assert_eq!(l["fields"]["status"], 200);
        assert_eq!(l["fields"]["took"], 1.5);
        assert_eq!(l["fields"]["ok"], true);
        assert_eq!(l["fields"]["delta"], -3);
        let ts = l["timestamp"].as_str().unwrap();
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("{ts}: {e}"));
        assert!(ts.ends_with('Z') && ts.len() == "2026-11-29T09:58:00.123456Z".len());
    }

    #[test]
    fn strings_and_debug_values_are_escaped() {
        let nasty = "quote \" backslash \\ newline \n cr \r tab \t nul \0 bell \x07 del \x7f é ✓";
        let lines = capture(|| {
            tracing::warn!(s = nasty, d = ?nasty, e = %nasty, nan = f64::NAN);
        });
        let f = &lines[0]["fields"];
        assert_eq!(f["s"], nasty);
        assert_eq!(f["d"], format!("{nasty:?}"));
        assert_eq!(f["e"], nasty);
        assert_eq!(f["nan"], "NaN");
        assert_eq!(lines[0]["level"], "WARN");
    }

    #[test]
    fn an_event_without_fields_is_still_an_object() {
        let lines = capture(|| tracing::error!(target: "t", ""));
        assert_eq!(lines[0]["fields"]["message"], "");
        assert_eq!(lines[0]["target"], "t");
    }

    #[test]
    fn the_timestamp_is_rfc3339_utc_with_microseconds() {
        use time::macros::datetime;
        for t in [
            datetime!(2026-11-29 09:58:00.123456 UTC),
            datetime!(2026-01-01 00:00:00 UTC),
            datetime!(1999-12-31 23:59:59.999999 UTC),
            datetime!(0001-02-03 04:05:06.000007 UTC),
            datetime!(9999-12-31 23:59:59.999999 UTC),
        ] {
            let mut written = String::new();
            write_timestamp(&mut written, t).unwrap();
            let expected = t.format(TIMESTAMP).unwrap();
            assert_eq!(written, expected);
            let parsed = time::OffsetDateTime::parse(
                &written,
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap();
            assert_eq!(parsed, t);
        }
    }
}
