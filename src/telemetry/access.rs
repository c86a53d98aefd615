//! The access line: one per API request, written when the request is over
//! for the client — its response body finished, broke, or was dropped —
//! never at the response head, and never depending on the client staying.
//!
//! An [`AccessRecord`] is made when a request arrives and travels with it:
//! the handler fills its [`Trace`], the response body carries it
//! ([`RecordedBody`]) and counts the bytes relayed, and whichever way the
//! request ends, the record writes its line exactly once (on drop at the
//! latest) with an `outcome`:
//!
//! | outcome | meaning |
//! |---|---|
//! | `complete` | the whole body was handed to the connection |
//! | `body_incomplete` | the body broke part-way (the acquirer's answer was cut) |
//! | `client_gone` | the client left before the response was delivered |
//! | `client_gone_after_send` | same, for a forward whose request may have reached the acquirer |
//! | `drain_cut` | still running when the shutdown grace ran out |
//! | `handler_panicked` | a bug: the handler panicked |
//!
//! Every outcome but `complete` also counts in
//! `tokenrelay_requests_unfinished{route,outcome}`. This module never sees
//! a secret: the trace holds only ids, masked cards and host names.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes};
use http::{HeaderValue, Method};
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::Metrics;
use crate::api::{RouteKind, Trace};
use crate::{Body, BoxError};

/// How a request ended, as the access line's `outcome` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The whole response was handed to the connection.
    Complete,
    /// The response body failed part-way.
    BodyIncomplete,
    /// The client left before the response was delivered.
    ClientGone,
    /// The client left, and the forward's request may have reached the
    /// acquirer.
    ClientGoneAfterSend,
    /// Cut off when the shutdown grace ran out.
    DrainCut,
    /// The handler panicked.
    HandlerPanicked,
}

impl Ending {
    /// The `outcome` field and metric label.
    pub fn label(self) -> &'static str {
        match self {
            Ending::Complete => "complete",
            Ending::BodyIncomplete => "body_incomplete",
            Ending::ClientGone => "client_gone",
            Ending::ClientGoneAfterSend => "client_gone_after_send",
            Ending::DrainCut => "drain_cut",
            Ending::HandlerPanicked => "handler_panicked",
        }
    }
}

/// The access log's shared handle: metrics, and whether the drain
/// deadline has passed.
pub struct AccessLog {
    metrics: Arc<Metrics>,
    cut: AtomicBool,
}

impl AccessLog {
    /// A handle counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Arc<AccessLog> {
        Arc::new(AccessLog {
            metrics,
            cut: AtomicBool::new(false),
        })
    }

    /// From now on, a request that ends unfinished was cut by the drain
    /// deadline (the listeners have stopped waiting for it).
    pub fn drain_deadline_passed(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// The record of a request that just arrived.
    pub fn start(self: &Arc<Self>, request_id: HeaderValue, method: Method) -> AccessRecord {
        AccessRecord {
            log: self.clone(),
            started: Instant::now(),
            request_id,
            method,
            trace: Trace::default(),
            status: None,
            relay_error: None,
            bytes: 0,
            written: false,
        }
    }
}

/// One request's access line, written once: by [`AccessRecord::finish`]
/// or, at the latest, on drop.
pub struct AccessRecord {
    log: Arc<AccessLog>,
    started: Instant,
    request_id: HeaderValue,
    method: Method,
    /// What the handler did, filled in as it runs.
    pub trace: Trace,
    status: Option<u16>,
    relay_error: Option<HeaderValue>,
    bytes: u64,
    written: bool,
}

impl AccessRecord {
    /// The request id the line carries.
    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    /// Notes the response head: from here on the body carries the record.
    pub fn responded(&mut self, status: u16, relay_error: Option<HeaderValue>) {
        self.status = Some(status);
        self.relay_error = relay_error;
    }

    /// Writes the line now with `ending` (no-op when already written).
    pub fn finish(&mut self, ending: Ending) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let route = self.trace.route.map_or("none", RouteKind::label);
        let outcome = ending.label();
        // A request that never produced a head is counted as what the
        // client saw: nothing, a 5xx in effect.
        let status = self.status.unwrap_or(0);
        let metrics = &self.log.metrics;
        metrics.count_request(route, if status == 0 { 599 } else { status });
        if ending != Ending::Complete {
            metrics.count_unfinished(route, outcome);
        }
        let audit = &self.trace.audit;
        tracing::info!(
            target: "tokenrelay::access",
            request_id = self.request_id.to_str().unwrap_or(""),
            method = self.method.as_str(),
            route,
            status = self.status,
            outcome,
            bytes = self.bytes,
            relay_error = self.relay_error.as_ref().and_then(|v| v.to_str().ok()),
            key = self.trace.key_name.as_deref(),
            subject = audit.subject.as_ref().map(tracing::field::display),
            scheme = audit.scheme,
            card = audit.card.as_deref(),
            created = audit.created,
            session = audit.session.as_ref().map(tracing::field::display),
            kind = audit.kind,
            mode = audit.mode,
            change = audit.change,
            destination_host = audit.destination_host.as_deref(),
            forward_route = audit.forward_route.as_deref(),
            sent_upstream = audit.destination_host.is_some().then_some(audit.sent_upstream),
            duration_us = self.started.elapsed().as_micros() as u64,
        );
    }

    /// Why a request is ending that did not finish its body.
    fn unfinished(&self) -> Ending {
        if std::thread::panicking() {
            Ending::HandlerPanicked
        } else if self.log.cut.load(Ordering::SeqCst) {
            Ending::DrainCut
        } else if self.trace.audit.sent_upstream {
            Ending::ClientGoneAfterSend
        } else {
            Ending::ClientGone
        }
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        if !self.written {
            let ending = self.unfinished();
            self.finish(ending);
        }
    }
}

/// A response body that counts what it relays and writes the request's
/// access line when it ends.
pub struct RecordedBody {
    inner: Body,
    record: AccessRecord,
}

impl RecordedBody {
    /// Wraps `inner`; the record is written when it ends.
    pub fn new(inner: Body, record: AccessRecord) -> RecordedBody {
        RecordedBody { inner, record }
    }
}

impl HttpBody for RecordedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.record.bytes += data.remaining() as u64;
                }
                if this.inner.is_end_stream() {
                    this.record.finish(Ending::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => this.record.finish(Ending::BodyIncomplete),
            Poll::Ready(None) => this.record.finish(Ending::Complete),
            Poll::Pending => {}
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

impl Drop for RecordedBody {
    fn drop(&mut self) {
        // The connection stops polling once the body says it is at its
        // end (or never starts, for an empty one): that is a delivery too.
        if self.inner.is_end_stream() {
            self.record.finish(Ending::Complete);
        }
    }
}
