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
//! `content-length` — stay true. The body wrapper holds back only the last
//! `longest value` bytes of each chunk (a possible match that continues in
//! the next one), so memory is bounded by the longest value, whatever the
//! response size. Short values (under [`MIN_FREE_MATCH`] bytes, e.g. a CVC)
//! are masked only where they stand alone — not inside a longer run of
//! letters or digits — so a "123" CVC does not shred every amount.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// Values shorter than this are masked only at alphanumeric boundaries.
pub const MIN_FREE_MATCH: usize = 8;

/// The set of values to mask.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Every form of every value, longest first; each with its searcher,
    /// built once per forward.
    needles: Vec<memchr::memmem::Finder<'static>>,
    longest: usize,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} values)", self.needles.len())
    }
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
        // Longest first, so a value containing another is masked whole.
        forms.sort_by_key(|n| std::cmp::Reverse(n.len()));
        let longest = forms.first().map_or(0, Vec::len);
        Redactor {
            needles: forms
                .iter()
                .map(|f| memchr::memmem::Finder::new(f).into_owned())
                .collect(),
            longest,
        }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// Masks every whole match in `buf`. `before` is the byte preceding
    /// `buf` (for the boundary rule); a match touching the end of `buf` is
    /// masked only if `at_end` (nothing follows) or it is long.
    fn mask(&self, buf: &mut [u8], before: Option<u8>, at_end: bool) {
        for finder in &self.needles {
            let len = finder.needle().len();
            let short = len < MIN_FREE_MATCH;
            let mut from = 0;
            while let Some(pos) = buf.get(from..).and_then(|rest| finder.find(rest)) {
                let start = from + pos;
                let end = start + len;
                let ok = !short || {
                    let prev = if start == 0 {
                        before
                    } else {
                        Some(buf[start - 1])
                    };
                    let next = buf.get(end).copied();
                    let prev_ok = prev.is_none_or(|b| !b.is_ascii_alphanumeric());
                    let next_ok = match next {
                        Some(b) => !b.is_ascii_alphanumeric(),
                        None => at_end,
                    };
                    prev_ok && next_ok
                };
                if ok {
                    buf[start..end].fill(b'*');
                    from = end;
                } else {
                    from = start + 1;
                }
            }
        }
    }

    /// Masks a complete value (a header), returning it unchanged when clean.
    pub fn mask_all(&self, input: &[u8]) -> Option<Vec<u8>> {
        if !self.needles.iter().any(|n| n.find(input).is_some()) {
            return None;
        }
        let mut out = input.to_vec();
        self.mask(&mut out, None, true);
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
    let digits: &[u8; 16] = match hex {
        Hex::Upper => b"0123456789ABCDEF",
        Hex::Lower => b"0123456789abcdef",
    };
    let hi = |b: u8| digits[usize::from(b >> 4)];
    let lo = |b: u8| digits[usize::from(b & 0xf)];
    let mut out = Vec::with_capacity(v.len() * 3);
    for &b in v {
        match form {
            Form::Percent if !(b.is_ascii_alphanumeric() || b"-._~".contains(&b)) => {
                out.extend_from_slice(&[b'%', hi(b), lo(b)]);
            }
            Form::JsonSlash if b == b'/' => out.extend_from_slice(b"\\/"),
            Form::JsonUnicode if !b.is_ascii_alphanumeric() => {
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', hi(b), lo(b)]);
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
    /// Bytes held back: a match may continue in the next chunk.
    carry: BytesMut,
    /// The last byte already emitted, for the boundary rule.
    last_emitted: Option<u8>,
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
            last_emitted: None,
            pending_trailers: None,
            done: false,
        }
    }

    /// Masks `carry + chunk` and splits off what can be emitted: all but
    /// the last `longest` bytes (or everything at the end).
    fn process(&mut self, chunk: Option<&[u8]>) -> Bytes {
        let at_end = chunk.is_none();
        if let Some(c) = chunk {
            self.carry.extend_from_slice(c);
        }
        self.redactor
            .mask(&mut self.carry, self.last_emitted, at_end);
        let keep = if at_end {
            0
        } else {
            self.redactor.longest.min(self.carry.len())
        };
        let out = self.carry.split_to(self.carry.len() - keep).freeze();
        if let Some(b) = out.last() {
            self.last_emitted = Some(*b);
        }
        out
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
