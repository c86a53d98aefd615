//! The response redaction stream (src/forward/redact.rs, `RedactingBody`
//! over `Redactor`), with the body cut into chunks at arbitrary points.
//!
//! However the body is cut, the output is the same: masking the body at
//! once (`Redactor::mask_all`), streaming it as one chunk, cut at the
//! fuzzer's points and byte by byte all give the same bytes, of the body's
//! length, with bytes changed only to `*` and no value of `MIN_FREE_MATCH`
//! bytes or more left in clear. The values and bodies:
//!
//! - mode 0: up to three long values over pairwise-disjoint alphabets;
//! - mode 1: one value of any length, a space after every piece of the
//!   body;
//! - mode 2: arbitrary values and body (with copies of the values spliced
//!   in);
//! - mode 3: up to three values of any length over one shared alphabet,
//!   so they overlap, contain and touch each other and themselves (what
//!   issue 15's fix, 28f3eb9, made split-independent).

#![no_main]

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use arbitrary::{Result, Unstructured};
use bytes::Bytes;
use http_body::{Body, Frame};
use libfuzzer_sys::fuzz_target;
use tokenrelay::forward::redact::{RedactingBody, Redactor, MIN_FREE_MATCH};

/// A body that yields the given chunks (empty ones included), then ends.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

/// Drives the body to its end; every frame is ready at once.
fn stream(redactor: &Redactor, chunks: VecDeque<Bytes>) -> Vec<u8> {
    let mut body = RedactingBody::new(Chunks(chunks), redactor.clone());
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Poll::Ready(None) => return out,
            Poll::Ready(Some(Err(never))) => match never {},
            Poll::Pending => panic!("pending with every chunk ready"),
        }
    }
}

/// `body` cut at `cuts` (taken modulo its length, sorted).
fn split(body: &[u8], mut cuts: Vec<usize>) -> VecDeque<Bytes> {
    cuts.iter_mut().for_each(|c| *c %= body.len() + 1);
    cuts.sort_unstable();
    let mut chunks = VecDeque::new();
    let mut at = 0;
    for c in cuts {
        chunks.push_back(Bytes::copy_from_slice(&body[at..c]));
        at = c;
    }
    chunks.push_back(Bytes::copy_from_slice(&body[at..]));
    chunks
}

fn bytewise(body: &[u8]) -> VecDeque<Bytes> {
    body.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect()
}

fn cuts(u: &mut Unstructured<'_>) -> Result<Vec<usize>> {
    let n = u.int_in_range(0..=12u8)?;
    (0..n)
        .map(|_| u.arbitrary::<u16>().map(usize::from))
        .collect()
}

/// Text of `len` pieces of `alphabet`.
fn over(
    u: &mut Unstructured<'_>,
    alphabet: &[&str],
    len: std::ops::RangeInclusive<usize>,
) -> Result<String> {
    let n = u.int_in_range(len)?;
    let mut s = String::new();
    for _ in 0..n {
        s.push_str(u.choose(alphabet)?);
    }
    Ok(s)
}

/// Pairwise-disjoint alphabets for the long values, and the literal text.
const ALPHABETS: [&[&str]; 3] = [&["1", "2"], &["a", "b"], &["=", "/"]];
const ANY: &[&str] = &["1", "2", "a", "b", "=", "/", " ", "\""];

/// A body of literal text and copies of `values`, `between` after each.
fn body(u: &mut Unstructured<'_>, values: &[String], between: &str) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    for _ in 0..u.int_in_range(0..=16u8)? {
        if u.arbitrary()? {
            body.extend_from_slice(u.choose(values)?.as_bytes());
        } else {
            body.extend_from_slice(over(u, ANY, 0..=5)?.as_bytes());
        }
        body.extend_from_slice(between.as_bytes());
    }
    Ok(body)
}

/// No value of `MIN_FREE_MATCH` bytes or more is in `out`. (A value with
/// a `*` is left out: masking another value can write it.)
fn no_long_value_left(values: &[String], out: &[u8]) {
    for v in values
        .iter()
        .filter(|v| v.len() >= MIN_FREE_MATCH && !v.contains('*'))
    {
        assert!(
            memchr::memmem::find(out, v.as_bytes()).is_none(),
            "a value of {} bytes survived",
            v.len()
        );
    }
}

/// However `body` is cut, the output is the body masked at once.
fn split_invariant(values: &[String], body: &[u8], cuts: Vec<usize>) {
    let redactor = Redactor::new(values.iter().map(String::as_str));
    let at_once = redactor.mask_all(body).unwrap_or_else(|| body.to_vec());
    let whole = stream(&redactor, VecDeque::from([Bytes::copy_from_slice(body)]));
    assert_eq!(whole, at_once, "one chunk differs from masking at once");
    assert_eq!(whole.len(), body.len());
    assert!(
        whole.iter().zip(body).all(|(o, b)| o == b || *o == b'*'),
        "a byte changed to something else than `*`"
    );
    assert_eq!(
        stream(&redactor, split(body, cuts)),
        whole,
        "the output depends on the split"
    );
    assert_eq!(
        stream(&redactor, bytewise(body)),
        whole,
        "one-byte chunks differ"
    );
    no_long_value_left(values, &whole);
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    match u.int_in_range(0..=3u8)? {
        0 => {
            let n = u.int_in_range(1..=3usize)?;
            let long = MIN_FREE_MATCH..=MIN_FREE_MATCH + 6;
            let values = ALPHABETS[..n]
                .iter()
                .map(|a| over(u, a, long.clone()))
                .collect::<Result<Vec<_>>>()?;
            let body = body(u, &values, "")?;
            split_invariant(&values, &body, cuts(u)?);
        }
        1 => {
            let values = vec![over(u, &["1", "2", "a", "b", "=", "/", "\""], 1..=12)?];
            let body = body(u, &values, " ")?;
            split_invariant(&values, &body, cuts(u)?);
        }
        2 => {
            let values: Vec<String> = (0..u.int_in_range(0..=4u8)?)
                .map(|_| u.arbitrary())
                .collect::<Result<_>>()?;
            let mut body: Vec<u8> = u.arbitrary()?;
            // Copies of the values too, or the body rarely holds one.
            for _ in 0..u.int_in_range(0..=4u8)? {
                if let Ok(v) = u.choose(&values) {
                    let at = u.int_in_range(0..=body.len())?;
                    body.splice(at..at, v.bytes());
                }
            }
            split_invariant(&values, &body, cuts(u)?);
        }
        _ => {
            let shared = &["1", "2", "=", " ", "\""];
            let values = (0..u.int_in_range(1..=3u8)?)
                .map(|_| over(u, shared, 1..=12))
                .collect::<Result<Vec<_>>>()?;
            let body = body(u, &values, "")?;
            split_invariant(&values, &body, cuts(u)?);
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
