//! Retry-safe forwards (contract §9): the forward's side of
//! `x-idempotency-key`.
//!
//! [`keyed`] is the hook: after the checks and the parse (so a malformed
//! request is refused before any key is claimed), it claims the key through
//! [`super::claim`] and runs the rest of the forward —
//! consume, send, relay — in a task of its own, so a merchant that hangs up
//! does not cancel a payment half-sent: the answer is still recorded for its
//! retry. What was sent decides what happens to the claim:
//!
//! - nothing sent (every error before the send, a restored
//!   `destination_unreachable`): released, the retry runs afresh;
//! - sent and failed (`destination_failed`, `destination_timeout`, and an
//!   answer refused as `response_not_redactable` or
//!   `invalid_upstream_response`): that error is recorded;
//! - answered: the response streams to the merchant through a
//!   [`RecordingBody`], a tee that copies at most `forward_record_max_bytes`
//!   of the (already redacted) body and records when the body ends, when the
//!   bound is reached (head only, marked truncated), or when the recording
//!   window (`upstream.response_timeout` after the head) closes. If the
//!   merchant goes away mid-body, the tee reads the rest itself.
//!
//! The fingerprint covers what makes the request the same request: the
//! subject, method, destination as written, the reference (or route), the
//! headers that reach the acquirer and the body — templates, never rendered
//! values, so it holds no secret and is the same on every retry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use ring::digest;

use super::claim::{self, Answer, Begun, Bound, Ticket};
use super::{Checked, Error, Parsed};
use crate::audit::Subject;
use crate::{AppState, Body, BoxError};

/// What the request is spent against: a cryptogram reference (none for a
/// PCI token) or an operator-defined route.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// `x-cryptogram-reference`, if the subject needs one.
    Reference(Option<&'a str>),
    /// A route (contract §10): its name, and the reference as for a
    /// free-form forward.
    Route {
        /// The route's name.
        name: &'a str,
        /// `x-cryptogram-reference`, if the subject needs one.
        reference: Option<&'a str>,
    },
}

/// How a forward ended, as far as its idempotency record cares.
pub(super) enum Executed {
    /// Nothing reached the acquirer (an error before the send, a dry run):
    /// the key is released.
    NotSent(Result<Response<Body>, Error>),
    /// The request went out (or may have): this is recorded.
    Sent(Result<Response<Body>, Error>),
}

impl Executed {
    /// The answer, recorded or not.
    pub(super) fn into_result(self) -> Result<Response<Body>, Error> {
        match self {
            Executed::NotSent(r) | Executed::Sent(r) => r,
        }
    }
}

/// The request's fingerprint (SHA-256 over length-prefixed fields).
pub(super) fn fingerprint(
    subject: Subject,
    origin: Origin<'_>,
    checked: &Checked,
    parsed: &Parsed,
) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut field = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    field(b"tokenrelay/forward/v1");
    field(subject.to_string().as_bytes());
    match origin {
        Origin::Reference(r) => {
            field(b"reference");
            field(r.unwrap_or("").as_bytes());
        }
        Origin::Route { name, reference } => {
            field(b"route");
            field(name.as_bytes());
            field(b"reference");
            field(reference.unwrap_or("").as_bytes());
        }
    }
    field(parsed.method.as_str().as_bytes());
    field(checked.destination.origin().as_bytes());
    field(&parsed.path.input);
    match &parsed.query {
        Some(q) => {
            field(b"?");
            field(&q.input);
        }
        None => field(b""),
    }
    field(&(parsed.headers.len() as u64).to_be_bytes());
    for (name, part) in &parsed.headers {
        field(name.as_str().as_bytes());
        field(&part.input);
    }
    field(&parsed.body.input);
    let mut fp = [0u8; 32];
    fp.copy_from_slice(ctx.finish().as_ref());
    fp
}

/// The owner's longest possible flight: connect and response timeouts for
/// the send, then the window for recording the body, plus a margin for the
/// vault writes around them.
pub(super) fn bound(state: &AppState) -> Bound {
    let up = &state.config.upstream;
    Bound(up.connect_timeout + 2 * up.response_timeout + Duration::from_secs(1))
}

/// Runs `run` (the forward from consume on) under the idempotency key
/// `record_key`: a replay when the key was answered, else the forward, its
/// answer recorded. `sent_upstream` says whether this request may have
/// reached the acquirer (never for a replay).
pub(super) async fn keyed<F, Fut>(
    state: &Arc<AppState>,
    record_key: String,
    fingerprint: [u8; 32],
    sent_upstream: &mut bool,
    run: F,
) -> Result<Response<Body>, Error>
where
    F: FnOnce(Arc<AppState>) -> Fut + Send + 'static,
    Fut: Future<Output = Executed> + Send + 'static,
{
    let ticket = match claim::begin(state, record_key, fingerprint, bound(state)).await? {
        Begun::Replay(answer) => return answer,
        Begun::Owner(ticket) => ticket,
    };
    let owned = state.clone();
    // Its own task, though the handler has one already: whatever cuts the
    // handler short (a client gone, a drain deadline) must not cancel a
    // payment half-sent nor leave its claim unfinished.
    *sent_upstream = true;
    let task = tokio::spawn(async move {
        let window = owned.config.upstream.response_timeout;
        let max = owned.config.forward_record_max_bytes;
        match run(owned).await {
            Executed::NotSent(r) => {
                ticket.release().await;
                (r, false)
            }
            Executed::Sent(Err(e)) => {
                ticket.finish(Answer::from_error(&e)).await;
                (Err(e), true)
            }
            Executed::Sent(Ok(resp)) => (Ok(tee(resp, ticket, max, window)), true),
        }
    });
    let (result, sent) = task
        .await
        .map_err(|e| Error::bug(format!("keyed forward task: {e}")))?;
    *sent_upstream = sent;
    result
}

/// The response, its body copied into the record as it streams.
fn tee(resp: Response<Body>, ticket: Ticket, max: usize, window: Duration) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let mut headers = parts.headers.clone();
    // The replay's body is whole (or cut): its length is its own.
    headers.remove(header::CONTENT_LENGTH);
    let recorder = Recorder {
        ticket,
        status: parts.status,
        headers,
        buf: BytesMut::with_capacity(max.min(16 << 10)),
        max,
        window: Box::pin(tokio::time::sleep(window)),
    };
    let body = RecordingBody {
        inner: body,
        recorder: Some(recorder),
    };
    Response::from_parts(parts, body.boxed())
}

/// What the tee has copied so far, and where it goes.
struct Recorder {
    ticket: Ticket,
    status: http::StatusCode,
    headers: http::HeaderMap,
    buf: BytesMut,
    max: usize,
    window: Pin<Box<tokio::time::Sleep>>,
}

impl Recorder {
    /// Copies `data`; `false` once the bound is passed (the rest is cut).
    fn push(&mut self, data: &Bytes) -> bool {
        let room = self.max - self.buf.len();
        if data.len() > room {
            self.buf.extend_from_slice(&data[..room]);
            return false;
        }
        self.buf.extend_from_slice(data);
        true
    }

    /// Records what was copied, without holding up the stream.
    fn finish(self, truncated: bool) {
        let answer = Answer::Response {
            status: self.status,
            headers: self.headers,
            body: self.buf.freeze(),
            truncated,
        };
        let ticket = self.ticket;
        spawn(ticket.finish(answer));
    }
}

fn spawn<F: Future<Output = ()> + Send + 'static>(f: F) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(f);
        }
        // Only when a runtime is shutting down: the claim stays in flight,
        // and retries will say forward_outcome_unknown.
        Err(_) => tracing::error!("no runtime to record a forward's answer"),
    }
}

/// A response body that records its head for the key's retries (see the
/// module docs); frames pass through untouched and as they arrive.
pub struct RecordingBody {
    inner: Body,
    recorder: Option<Recorder>,
}

impl HttpBody for RecordingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(r) = &mut this.recorder {
            if r.window.as_mut().poll(cx).is_ready() {
                if let Some(r) = this.recorder.take() {
                    r.finish(true);
                }
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(r)) = (frame.data_ref(), this.recorder.as_mut()) {
                    if !r.push(data) {
                        if let Some(r) = this.recorder.take() {
                            r.finish(true);
                        }
                    }
                }
            }
            // Broken off: what arrived is all there is.
            Poll::Ready(Some(Err(_))) => {
                if let Some(r) = this.recorder.take() {
                    r.finish(true);
                }
            }
            Poll::Ready(None) => {
                if let Some(r) = this.recorder.take() {
                    r.finish(false);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RecordingBody {
    fn drop(&mut self) {
        let Some(recorder) = self.recorder.take() else {
            return;
        };
        // The merchant went away (or the body ended unpolled): read the
        // rest here, within the same bounds, so the retry gets the answer.
        let inner = std::mem::replace(
            &mut self.inner,
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        );
        spawn(async move {
            let mut rest = RecordingBody {
                inner,
                recorder: Some(recorder),
            };
            while let Some(frame) = rest.frame().await {
                if frame.is_err() || rest.recorder.is_none() {
                    break;
                }
            }
            // Dropping `rest` here finds no recorder left unless the body
            // ended in a way the loop missed: then it records what it has.
            if let Some(r) = rest.recorder.take() {
                r.finish(false);
            }
        });
    }
}
