//! Response redaction: the exact secret values injected into a request
//! (TPAN, PAN, cryptogram, dynamic CVV, CVC) are masked wherever the
//! acquirer echoes them, in headers and in the streamed body, including a
//! value split across chunks.
//!
//! Each value is looked for as written and in the forms an echo takes:
//! percent-encoded (upper- and lower-case hex, as a form body or a query
//! string carries it), JSON-escaped with `\/` for `/`, and JSON-escaped
//! with `\u00XX` for every non-alphanumeric byte (upper- and lower-case
//! hex, as .NET and some Java encoders write `+`, `/`, `=`). A value
//! escaped two ways at once (some bytes `%2B`, others `\u002F`) is not
//! recognised. The forward asks the acquirer for `identity` and refuses a
//! compressed answer, since compressed bytes cannot be searched.
//!
//! Each match is replaced by as many `*` as it has bytes, so lengths — and
//! `content-length` — stay true. Short values (under [`MIN_FREE_MATCH`]
//! bytes, e.g. a CVC) are masked only where they stand alone: each
//! neighbour is the body's edge, a byte that is not a letter or digit, or a
//! byte of a long value's match — so a "123" CVC does not shred every
//! amount, yet a CVC glued to an echoed card number is masked with it.
//!
//! What is masked is a function of the acquirer's bytes alone, never of
//! how they were cut into chunks: every match of every form is found in
//! the *original* bytes (overlapping matches included), the boundary rule
//! reads the original bytes too (never a neighbour's mask), and the union
//! of the matches' ranges is masked. The body wrapper emits all but the last
//! [`Redactor::holdback`] bytes (the longest form plus the longest short
//! one: enough for every match touching an emitted byte, and every
//! neighbour its boundary rule reads, to have been seen), scanning once it
//! holds twice that (so tiny chunks cost no more per byte than large
//! ones); memory stays bounded by a few hundred bytes plus one chunk,
//! whatever the size of the response. What it must know of the bytes
//! already emitted (the last one, and how far matches begun in them reach)
//! is carried along with the held-back bytes.

use std::pin::Pin;
use std::task::{Context, Poll};

use aho_corasick::{packed, Span};
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// Values shorter than this are masked only where they stand alone.
pub const MIN_FREE_MATCH: usize = 8;

/// The set of values to mask.
#[derive(Clone, Default)]
pub struct Redactor {
    searcher: Searcher,
    /// How many forms are searched.
    forms: usize,
    /// The longest form.
    longest: usize,
    /// The longest form under [`MIN_FREE_MATCH`] (0 when none).
    longest_short: usize,
}

/// How the forms are found.
#[derive(Clone, Default)]
enum Searcher {
    /// Nothing to mask.
    #[default]
    Nothing,
    /// Every form, built once per forward.
    Forms {
        /// All forms at once, leftmost-first, with aho-corasick's SIMD
        /// multi-substring search (Teddy): finds the next position where
        /// any form starts, so a large body echoing nothing costs one fast
        /// pass. Built on the first window of [`TEDDY_FROM`] bytes or more:
        /// its ~4 µs would be most of a small answer's redaction (the
        /// per-form finders scan a 1 KB answer in well under that). Holds
        /// `None` where the CPU has no Teddy (then each form is searched on
        /// its own, whatever the size).
        any: OnceLock<Option<packed::Searcher>>,
        /// Each form on its own: checks which forms start at a position
        /// `any` found (every one, overlapping ones included, as the union
        /// of ranges needs), or searches the whole window without `any`.
        each: Vec<memchr::memmem::Finder<'static>>,
    },
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} values)", self.forms)
    }
}

/// What a scan of a window needs to know about the bytes before it,
/// already emitted.
#[derive(Clone, Copy, Default)]
struct Before {
    /// The last byte before the window, as the acquirer sent it; `None` at
    /// the start of the body.
    byte: Option<u8>,
    /// Whether that byte is in a long value's match.
    byte_in_long: bool,
    /// Matches begun before the window mask its bytes up to here.
    masked_to: usize,
    /// Of those, the long values' matches reach up to here.
    long_to: usize,
}

/// Reusable buffers for [`Redactor::scan`].
#[derive(Default)]
struct Scan {
    /// Short values' matches, as found.
    short: Vec<(usize, usize)>,
    /// Long values' match ranges, merged, in order.
    long: Vec<(usize, usize)>,
    /// Every range to mask, merged, in order.
    mask: Vec<(usize, usize)>,
}

impl Redactor {
    /// A redactor for `values` (empty ones are ignored), in every form
    /// listed in the module docs.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Redactor {
        let mut forms: Vec<Vec<u8>> = Vec::new();
        for v in values.into_iter().filter(|v| !v.is_empty()) {
            let v = v.as_bytes();
            forms.push(v.to_vec());
            if v.iter().all(u8::is_ascii_alphanumeric) {
                // Digits (PAN, TPAN, CVC): every escaping leaves them as is.
                continue;
            }
            forms.push(escaped(v, Hex::Upper, Form::Percent));
            forms.push(escaped(v, Hex::Lower, Form::Percent));
            forms.push(escaped(v, Hex::Upper, Form::JsonSlash));
            forms.push(escaped(v, Hex::Upper, Form::JsonUnicode));
            forms.push(escaped(v, Hex::Lower, Form::JsonUnicode));
        }
        forms.sort();
        forms.dedup();
        if forms.is_empty() {
            return Redactor::default();
        }
        let longest = forms.iter().map(Vec::len).max().unwrap_or(0);
        let longest_short = forms
            .iter()
            .map(Vec::len)
            .filter(|&l| l < MIN_FREE_MATCH)
            .max()
            .unwrap_or(0);
        let searcher = Searcher::Forms {
            any: OnceLock::new(),
            each: forms
                .iter()
                .map(|f| memchr::memmem::Finder::new(f).into_owned())
                .collect(),
        };
        Redactor {
            searcher,
            forms: forms.len(),
            longest,
            longest_short,
        }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        matches!(self.searcher, Searcher::Nothing)
    }

    /// Bytes a stream holds back: a byte is emitted only once every match
    /// that could cover it, and every byte its boundary rule reads, has
    /// been seen.
    pub fn holdback(&self) -> usize {
        self.longest + self.longest_short
    }

    /// Fills `scan.mask` with the ranges of `hay` to mask. `before` tells
    /// what precedes `hay`; unless `at_end`, more bytes follow, and a short
    /// match touching the end of `hay` is left undecided (not masked): the
    /// caller never emits bytes such a match could cover.
    fn scan(&self, hay: &[u8], before: &Before, at_end: bool, scan: &mut Scan) {
        scan.short.clear();
        scan.long.clear();
        scan.mask.clear();
        if before.long_to > 0 {
            scan.long.push((0, before.long_to));
        }
        if before.masked_to > 0 {
            scan.mask.push((0, before.masked_to));
        }
        let mut found = |start: usize, len: usize| {
            if len >= MIN_FREE_MATCH {
                scan.long.push((start, start + len));
            } else {
                scan.short.push((start, start + len));
            }
        };
        match &self.searcher {
            Searcher::Nothing => return,
            Searcher::Forms { any, each } => match teddy(any, each, hay.len()) {
                Some(any) => {
                    // Every position where some form starts, left to right.
                    let mut at = 0;
                    while let Some(m) = any.find_in(hay, Span::from(at..hay.len())) {
                        let start = m.start();
                        for form in each {
                            if hay[start..].starts_with(form.needle()) {
                                found(start, form.needle().len());
                            }
                        }
                        at = start + 1;
                    }
                }
                None => {
                    for form in each {
                        let mut at = 0;
                        while let Some(pos) = hay.get(at..).and_then(|rest| form.find(rest)) {
                            found(at + pos, form.needle().len());
                            at += pos + 1;
                        }
                    }
                }
            },
        }
        if scan.long.is_empty() && scan.short.is_empty() {
            return;
        }
        merge(&mut scan.long);
        scan.mask.extend_from_slice(&scan.long);
        let alone = |b: u8| !b.is_ascii_alphanumeric();
        for &(start, end) in &scan.short {
            let prev_ok = match start.checked_sub(1) {
                None => before.byte.is_none_or(alone) || before.byte_in_long,
                Some(p) => alone(hay[p]) || covers(&scan.long, p),
            };
            let next_ok = match hay.get(end) {
                None => at_end,
                Some(&b) => alone(b) || covers(&scan.long, end),
            };
            if prev_ok && next_ok {
                scan.mask.push((start, end));
            }
        }
        merge(&mut scan.mask);
    }

    /// Masks a complete value (a header), returning it unchanged when clean.
    pub fn mask_all(&self, input: &[u8]) -> Option<Vec<u8>> {
        let mut scan = Scan::default();
        self.scan(input, &Before::default(), true, &mut scan);
        if scan.mask.is_empty() {
            return None;
        }
        let mut out = input.to_vec();
        for &(start, end) in &scan.mask {
            out[start..end].fill(b'*');
        }
        (out != input).then_some(out)
    }

    /// Masks the values in response headers.
    pub fn mask_headers(&self, headers: &mut HeaderMap) {
        for value in headers.values_mut() {
            if let Some(masked) = self.mask_all(value.as_bytes()) {
                if let Ok(v) = http::HeaderValue::from_bytes(&masked) {
                    *value = v;
                }
            }
        }
    }
}

/// Sorts `ranges` and merges those that overlap or touch.
/// Windows this long or longer are searched with Teddy.
pub const TEDDY_FROM: usize = 4096;

/// The Teddy searcher for a window of `len` bytes, built on first use; `None`
/// for a shorter window or where the CPU has no Teddy.
fn teddy<'a>(
    any: &'a OnceLock<Option<packed::Searcher>>,
    each: &[memchr::memmem::Finder<'static>],
    len: usize,
) -> Option<&'a packed::Searcher> {
    if len < TEDDY_FROM {
        return None;
    }
    // Teddy, not a full Aho-Corasick automaton: built in a few
    // microseconds (the automata took ~65 µs), and the overlapping matches
    // come from the per-form finders anyway.
    any.get_or_init(|| {
        let mut builder = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder();
        builder.extend(each.iter().map(|f| f.needle())).build()
    })
    .as_ref()
}

fn merge(ranges: &mut Vec<(usize, usize)>) {
    if ranges.len() < 2 {
        return;
    }
    ranges.sort_unstable();
    let mut w = 0;
    for r in 1..ranges.len() {
        let (start, end) = ranges[r];
        if start <= ranges[w].1 {
            ranges[w].1 = ranges[w].1.max(end);
        } else {
            w += 1;
            ranges[w] = (start, end);
        }
    }
    ranges.truncate(w + 1);
}

/// Whether merged, ordered `ranges` cover `at`.
fn covers(ranges: &[(usize, usize)], at: usize) -> bool {
    let i = ranges.partition_point(|&(start, _)| start <= at);
    i > 0 && at < ranges[i - 1].1
}

/// How far past `at` the merged, ordered `ranges` that begin before `at`
/// reach (0: none crosses it).
fn reach_past(ranges: &[(usize, usize)], at: usize) -> usize {
    let i = ranges.partition_point(|&(start, _)| start < at);
    match i.checked_sub(1).map(|i| ranges[i]) {
        Some((_, end)) if end > at => end - at,
        _ => 0,
    }
}

#[derive(Clone, Copy)]
enum Hex {
    Upper,
    Lower,
}

#[derive(Clone, Copy)]
enum Form {
    /// `%2B`: every byte outside RFC 3986's unreserved set.
    Percent,
    /// `\/` for `/`, the rest as is.
    JsonSlash,
    /// `\u002B`: every non-alphanumeric byte.
    JsonUnicode,
}

/// `v` written in `form`.
fn escaped(v: &[u8], hex: Hex, form: Form) -> Vec<u8> {
    let digits = |b: u8| {
        let mut pair = *b"00";
        let encoded = hex::encode_to_slice([b], &mut pair);
        // One byte is always two digits.
        debug_assert!(encoded.is_ok());
        if let Hex::Upper = hex {
            pair.make_ascii_uppercase();
        }
        pair
    };
    let mut out = Vec::with_capacity(v.len() * 3);
    for &b in v {
        match form {
            Form::Percent if !(b.is_ascii_alphanumeric() || b"-._~".contains(&b)) => {
                let [hi, lo] = digits(b);
                out.extend_from_slice(&[b'%', hi, lo]);
            }
            Form::JsonSlash if b == b'/' => out.extend_from_slice(b"\\/"),
            Form::JsonUnicode if !b.is_ascii_alphanumeric() => {
                let [hi, lo] = digits(b);
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', hi, lo]);
            }
            _ => out.push(b),
        }
    }
    out
}

/// A body that masks the redactor's values as it streams.
pub struct RedactingBody<B> {
    inner: B,
    redactor: Redactor,
    /// Bytes not emitted yet, as the acquirer sent them.
    carry: BytesMut,
    /// What the bytes already emitted mean for those in `carry`.
    before: Before,
    scan: Scan,
    /// Trailers waiting for the carry to be flushed first.
    pending_trailers: Option<HeaderMap>,
    done: bool,
}

impl<B> RedactingBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, redactor: Redactor) -> Self {
        Self {
            inner,
            redactor,
            carry: BytesMut::new(),
            before: Before::default(),
            scan: Scan::default(),
            pending_trailers: None,
            done: false,
        }
    }

    /// Adds `chunk` to the carry and splits off, masked, what can be
    /// emitted: all but the last [`Redactor::holdback`] bytes, or
    /// everything at the end (`chunk` is `None`).
    fn process(&mut self, chunk: Option<&[u8]>) -> Bytes {
        let at_end = chunk.is_none();
        if let Some(c) = chunk {
            self.carry.extend_from_slice(c);
        }
        let hold = self.redactor.holdback();
        // Scanning waits for twice the holdback, so each scan emits at
        // least as much as it re-reads: tiny chunks cost no more per byte
        // than large ones.
        if !at_end && self.carry.len() < 2 * hold.max(1) {
            return Bytes::new();
        }
        let limit = if at_end {
            self.carry.len()
        } else {
            self.carry.len() - hold
        };
        if limit == 0 {
            return Bytes::new();
        }
        let scan = &mut self.scan;
        self.redactor.scan(&self.carry, &self.before, at_end, scan);
        // Read from the original bytes before any is masked.
        self.before = Before {
            byte: Some(self.carry[limit - 1]),
            byte_in_long: covers(&scan.long, limit - 1),
            masked_to: reach_past(&scan.mask, limit),
            long_to: reach_past(&scan.long, limit),
        };
        for &(start, end) in &scan.mask {
            if start >= limit {
                break;
            }
            self.carry[start..end.min(limit)].fill(b'*');
        }
        self.carry.split_to(limit).freeze()
    }
}

impl<B> Body for RedactingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(t) = this.pending_trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.process(Some(&data));
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        // Trailers: flush held bytes first, then the trailers.
                        if let Ok(mut t) = frame.into_trailers() {
                            this.redactor.mask_headers(&mut t);
                            this.pending_trailers = Some(t);
                        }
                        this.done = true;
                        let out = this.process(None);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                },
                Poll::Ready(None) => {
                    this.done = true;
                    let out = this.process(None);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.carry.is_empty() && self.pending_trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Masking keeps lengths, so the inner hint stays true.
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    async fn run(chunks: Vec<&'static [u8]>, values: &[&str]) -> Vec<u8> {
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c)))),
        );
        let body = RedactingBody::new(
            StreamBody::new(stream),
            Redactor::new(values.iter().copied()),
        );
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn masks_whole_and_split_values_keeping_length() {
        let tpan = "4895370012345678";
        let out = run(
            vec![
                b"{\"pan\":\"4895370012345678\",\"x\":\"48953700",
                b"12345678\"}",
            ],
            &[tpan],
        )
        .await;
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"pan\":\"****************\",\"x\":\"****************\"}"
        );
    }

    #[tokio::test]
    async fn split_into_single_bytes() {
        let chunks: Vec<&'static [u8]> = b"a-4895370012345678-b".chunks(1).collect();
        let out = run(chunks, &["4895370012345678"]).await;
        assert_eq!(out, b"a-****************-b");
    }

    #[tokio::test]
    async fn short_values_only_at_boundaries() {
        let out = run(vec![b"cvc=737&amount=17370&id=a737"], &["737"]).await;
        assert_eq!(out, b"cvc=***&amount=17370&id=a737");
        let out = run(vec![b"x 73", b"7"], &["737"]).await;
        assert_eq!(out, b"x ***");
    }

    #[tokio::test]
    async fn nothing_to_mask_passes_through() {
        let out = run(vec![b"hello ", b"world"], &["4895370012345678"]).await;
        assert_eq!(out, b"hello world");
    }

    #[tokio::test]
    async fn escaped_echoes_are_masked() {
        let cavv = "AAAAI2sO+a/b=";
        let body: &'static [u8] = b"cavv=AAAAI2sO%2Ba%2Fb%3D&l=AAAAI2sO%2ba%2fb%3d&j={\"c\":\"AAAAI2sO+a\\/b=\"}&u=AAAAI2sO\\u002Ba\\u002Fb\\u003D&w=AAAAI2sO\\u002ba\\u002fb\\u003d";
        let chunks: Vec<&'static [u8]> = body.chunks(5).collect();
        let out = String::from_utf8(run(chunks, &[cavv]).await).unwrap();
        assert!(!out.contains("AAAAI2sO"), "{out}");
        assert_eq!(out.len(), body.len());
        assert!(out.starts_with("cavv=*"), "{out}");
        assert!(out.contains("&j={\"c\":\"*"), "{out}");
    }

    #[tokio::test]
    async fn a_short_value_glued_to_a_long_one_is_masked_with_it() {
        let (tpan, cvc) = ("4895370012345678", "737");
        let body: &'static [u8] = b"x=4895370012345678737&y=737&z=1737&w=7374895370012345678";
        for size in [1, 3, 7, body.len()] {
            let out = run(body.chunks(size).collect(), &[tpan, cvc]).await;
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "x=*******************&y=***&z=1737&w=*******************",
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn the_stream_holds_back_at_most_the_holdback() {
        let r = Redactor::new(["4895370012345678", "AAAABWdpJA9VbNnRDnhXAAAAAAA=", "737"]);
        let hold = r.holdback();
        // The longest form is the cryptogram with `=` as `\u003D` (33
        // bytes), the longest short one the CVC.
        assert_eq!(hold, 33 + 3);
        let mut body = RedactingBody::new(http_body_util::Empty::<Bytes>::new(), r);
        let mut emitted = 0;
        for _ in 0..100 {
            emitted += body.process(Some(&[b'x'; 1000])).len();
            assert!(body.carry.len() <= hold, "{} held", body.carry.len());
        }
        emitted += body.process(None).len();
        assert_eq!(emitted, 100 * 1000);
        assert!(body.carry.is_empty());
    }

    /// Where the CPU has no Teddy, each form is searched on its own: the
    /// same ranges.
    #[test]
    fn without_the_simd_search_the_same_is_masked() {
        let values = ["4895370012345678", "AAAAI2sO+a/b=", "737", "1="];
        let alone = Redactor::new(values);
        let teddy = alone.clone();
        if let Searcher::Forms { any, .. } = &alone.searcher {
            assert!(any.set(None).is_ok());
        }
        for body in [
            &b"x=4895370012345678737&y=737&z=1737&w=7374895370012345678"[..],
            b"cavv=AAAAI2sO%2Ba%2Fb%3D&j=AAAAI2sO+a\\/b=&u=AAAAI2sO\\u002ba\\u002fb\\u003d",
            b"1=1==1=7371=48953700123456781=",
            b"nothing here",
        ] {
            // Padded past TEDDY_FROM, so `teddy` really uses Teddy (where
            // the CPU has it) and `alone` cannot.
            let mut padded = body.to_vec();
            padded.extend(std::iter::repeat_n(b' ', TEDDY_FROM));
            padded.extend_from_slice(body);
            assert_eq!(alone.mask_all(&padded), teddy.mask_all(&padded));
            assert_eq!(alone.mask_all(body), teddy.mask_all(body));
            assert!(teddy.mask_all(body).is_some() || body == b"nothing here");
        }
    }

    #[test]
    fn teddy_is_built_only_for_a_window_long_enough_to_pay_it_back() {
        let r = Redactor::new(["4895370012345678", "AAAAI2sO+a/b="]);
        let built = |r: &Redactor| match &r.searcher {
            Searcher::Forms { any, .. } => any.get().is_some(),
            Searcher::Nothing => unreachable!(),
        };
        let small = b"{\"pan\":\"4895370012345678\"}";
        assert!(r.mask_all(small).is_some());
        assert!(!built(&r), "a small answer paid for Teddy");
        let mut large = small.to_vec();
        large.resize(TEDDY_FROM, b' ');
        assert!(r.mask_all(&large).is_some());
        assert!(built(&r));
    }

    #[test]
    fn headers() {
        let r = Redactor::new(["4895370012345678"]);
        let mut h = HeaderMap::new();
        h.insert("x-echo", "card 4895370012345678".parse().unwrap());
        h.insert("x-other", "fine".parse().unwrap());
        r.mask_headers(&mut h);
        assert_eq!(h["x-echo"], "card ****************");
        assert_eq!(h["x-other"], "fine");
    }
}
