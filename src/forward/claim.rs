//! Forward records (contract §9): `x-idempotency-key` on a forward.
//!
//! The first request with a key *claims* it: an in-flight record (status
//! [`IdempotencyRecord::IN_FLIGHT`]) in the vault's idempotency table, put
//! with the same insert-unless-taken the other idempotent endpoints use, so
//! one request per key wins across every replica sharing the vault. The
//! winner runs the forward and *finishes* the record with its [`Answer`]
//! (sealed like every idempotency record), or *releases* it when nothing was
//! sent, so the retry runs afresh.
//!
//! Everyone else waits for the answer:
//!
//! - on this replica, behind the winner in [`Flights`] (one entry per key in
//!   flight, a `watch` channel the winner publishes to: notified, no
//!   polling, and only one request per key per replica touches the vault);
//! - on another replica, by polling the record (20 ms doubling to 200 ms)
//!   until it is finished or released.
//!
//! A claim whose owner died (the process stopped mid-flight) is never
//! finished. Waiting for it is bounded by [`Bound`]: how long its owner can
//! take at most (upstream connect + response timeouts, then the window for
//! recording the body) plus a grace. Past it, the waiter finishes the claim
//! itself as [`Answer::Unknown`] (compare-and-set, so a late owner and
//! other waiters agree on one answer), and that request and every later
//! retry get 502 `forward_outcome_unknown`: the request may have reached the
//! acquirer, so nothing is sent again.
//!
//! This module never sees a rendered value: answers hold the acquirer's
//! response after redaction, or tokenrelay's own error text.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{ClientError, Error, InternalError, UpstreamError};
use crate::vault::IdempotencyRecord;
use crate::{AppState, Body};

/// Marks a recorded answer given again.
pub static X_RELAY_IDEMPOTENT_REPLAY: HeaderName =
    HeaderName::from_static("x-relay-idempotent-replay");
/// Marks a replayed body cut at `forward_record_max_bytes`.
pub static X_RELAY_IDEMPOTENT_BODY: HeaderName = HeaderName::from_static("x-relay-idempotent-body");

/// Time a waiter allows beyond its owner's bound: vault writes and clock
/// skew between replicas.
const GRACE: Duration = Duration::from_secs(5);
/// First and longest pause between two reads of a claim held elsewhere.
const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(200);

/// The recorded outcome of a forward that was (or may have been) sent.
#[derive(Clone, PartialEq, Eq)]
pub enum Answer {
    /// The acquirer's answer after redaction, without hop-by-hop headers
    /// and `content-length`; `truncated` when its body was longer than
    /// `forward_record_max_bytes` (or broke off) and only its head is here.
    Response {
        /// Status.
        status: StatusCode,
        /// Headers as relayed.
        headers: HeaderMap,
        /// Body, at most `forward_record_max_bytes`.
        body: Bytes,
        /// Whether `body` is only the head.
        truncated: bool,
    },
    /// tokenrelay's own error after the request went out, with its detail
    /// (hosts and reasons, never values).
    Error(SentError, String),
    /// The owner never finished: 502 `forward_outcome_unknown`.
    Unknown,
}

/// The errors a forward can end with once its request went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentError {
    /// 502 `destination_failed`.
    Failed,
    /// 504 `destination_timeout`.
    TimedOut,
    /// 502 `response_not_redactable`.
    NotRedactable,
    /// 502 `invalid_upstream_response`.
    InvalidUpstream,
}

impl SentError {
    /// Every kind, for the tests that pin their codes and mapping.
    pub const ALL: [SentError; 4] = [
        SentError::Failed,
        SentError::TimedOut,
        SentError::NotRedactable,
        SentError::InvalidUpstream,
    ];

    fn code(self) -> u8 {
        match self {
            SentError::Failed => 1,
            SentError::TimedOut => 2,
            SentError::NotRedactable => 4,
            SentError::InvalidUpstream => 5,
        }
    }

    /// The error recorded, as it was first answered.
    pub fn error(self, detail: String) -> Error {
        Error::sent_then(match self {
            SentError::Failed => UpstreamError::Failed(detail),
            SentError::TimedOut => UpstreamError::Timeout(detail),
            SentError::NotRedactable => UpstreamError::NotRedactable(detail),
            SentError::InvalidUpstream => UpstreamError::InvalidResponse(detail),
        })
    }

    /// The record's status column: the status the error is answered with
    /// (`api::error`'s mapping, which its tests hold this to). Stored for
    /// whoever reads the vault table; a replay reads the sealed body.
    pub fn record_status(self) -> StatusCode {
        match self {
            SentError::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            SentError::Failed | SentError::NotRedactable | SentError::InvalidUpstream => {
                StatusCode::BAD_GATEWAY
            }
        }
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body is the acquirer's: sizes only.
        match self {
            Answer::Response {
                status,
                body,
                truncated,
                ..
            } => write!(
                f,
                "Answer::Response({status}, {} bytes{})",
                body.len(),
                if *truncated { ", truncated" } else { "" }
            ),
            Answer::Error(kind, _) => write!(f, "Answer::Error({kind:?})"),
            Answer::Unknown => f.write_str("Answer::Unknown"),
        }
    }
}

const FORMAT_V1: u8 = 1;
const KIND_RESPONSE: u8 = 0;
const KIND_UNKNOWN: u8 = 3;

impl Answer {
    /// The error of a request that may have been sent, as recorded.
    pub fn from_error(e: &Error) -> Answer {
        let (kind, d) = match e {
            Error::Upstream { error, sent: _ } => match error {
                UpstreamError::Failed(d) => (SentError::Failed, d),
                UpstreamError::Timeout(d) => (SentError::TimedOut, d),
                UpstreamError::NotRedactable(d) => (SentError::NotRedactable, d),
                UpstreamError::InvalidResponse(d) => (SentError::InvalidUpstream, d),
                UpstreamError::Unreachable(_) => return Answer::Unknown,
            },
            // No other error follows a send; should one appear, the
            // outcome is not known, and saying so is the safe answer.
            Error::Client(_) | Error::Internal(_) | Error::Replayed(_) => return Answer::Unknown,
        };
        Answer::Error(kind, d.clone())
    }

    /// The record's status column (see [`SentError::record_status`]).
    fn status(&self) -> StatusCode {
        match self {
            Answer::Response { status, .. } => *status,
            Answer::Error(kind, _) => kind.record_status(),
            Answer::Unknown => StatusCode::BAD_GATEWAY,
        }
    }

    /// The sealed form: version, kind, then length-prefixed fields.
    pub fn encode(&self) -> Vec<u8> {
        fn put(out: &mut Vec<u8>, bytes: &[u8]) {
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(bytes);
        }
        let mut out = vec![FORMAT_V1];
        match self {
            Answer::Response {
                status,
                headers,
                body,
                truncated,
            } => {
                let size: usize = headers
                    .iter()
                    .map(|(n, v)| n.as_str().len() + v.len() + 8)
                    .sum();
                out.reserve(size + body.len() + 16);
                out.push(KIND_RESPONSE);
                out.extend_from_slice(&status.as_u16().to_be_bytes());
                out.push(u8::from(*truncated));
                out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
                for (n, v) in headers {
                    put(&mut out, n.as_str().as_bytes());
                    put(&mut out, v.as_bytes());
                }
                put(&mut out, body);
            }
            Answer::Error(kind, d) => {
                out.push(kind.code());
                put(&mut out, d.as_bytes());
            }
            Answer::Unknown => out.push(KIND_UNKNOWN),
        }
        out
    }

    /// Reads [`Answer::encode`]'s form; `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Answer> {
        let mut r = Reader(bytes);
        if r.u8()? != FORMAT_V1 {
            return None;
        }
        let answer = match r.u8()? {
            KIND_RESPONSE => {
                let status =
                    StatusCode::from_u16(u16::from_be_bytes(r.take(2)?.try_into().ok()?)).ok()?;
                let truncated = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                let n = r.u32()? as usize;
                let mut headers = HeaderMap::with_capacity(n.min(256));
                for _ in 0..n {
                    let name = HeaderName::from_bytes(r.field()?).ok()?;
                    let value = HeaderValue::from_bytes(r.field()?).ok()?;
                    headers.append(name, value);
                }
                let body = Bytes::copy_from_slice(r.field()?);
                Answer::Response {
                    status,
                    headers,
                    body,
                    truncated,
                }
            }
            KIND_UNKNOWN => Answer::Unknown,
            code => {
                let kind = SentError::ALL.into_iter().find(|k| k.code() == code)?;
                Answer::Error(kind, String::from_utf8(r.field()?.to_vec()).ok()?)
            }
        };
        r.0.is_empty().then_some(answer)
    }

    /// The answer given to a retry: as first given, marked a replay (an
    /// error as [`Error::Replayed`], which `api::error` marks).
    pub fn replay(&self) -> Result<Response<Body>, Error> {
        let mut resp = match self {
            Answer::Response {
                status,
                headers,
                body,
                truncated,
            } => {
                let mut resp = Response::new(
                    Full::new(body.clone())
                        .map_err(|never| match never {})
                        .boxed(),
                );
                *resp.status_mut() = *status;
                *resp.headers_mut() = headers.clone();
                if *truncated {
                    resp.headers_mut().insert(
                        X_RELAY_IDEMPOTENT_BODY.clone(),
                        HeaderValue::from_static("truncated"),
                    );
                }
                resp
            }
            Answer::Error(kind, d) => return Err(Error::Replayed(Box::new(kind.error(d.clone())))),
            Answer::Unknown => {
                return Err(Error::Replayed(Box::new(
                    InternalError::OutcomeUnknown.into(),
                )))
            }
        };
        resp.headers_mut().insert(
            X_RELAY_IDEMPOTENT_REPLAY.clone(),
            HeaderValue::from_static("true"),
        );
        Ok(resp)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn field(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// How long the owner of a claim may take at most, and so how long a
/// waiter waits before it calls the outcome unknown.
#[derive(Debug, Clone, Copy)]
pub struct Bound(pub Duration);

impl Bound {
    /// What remains at `now` of the bound for a claim made at
    /// `claimed_at`, plus the grace.
    fn remaining(self, claimed_at: OffsetDateTime, now: OffsetDateTime) -> Duration {
        let age = now - claimed_at;
        let age = Duration::try_from(age).unwrap_or(Duration::ZERO);
        self.0.saturating_sub(age) + GRACE
    }
}

/// A key's state on this replica.
#[derive(Clone)]
enum Flight {
    /// Its owner here runs the request with this fingerprint.
    Running([u8; 32]),
    /// Its answer, with the fingerprint of the request that produced it.
    Done([u8; 32], Arc<Answer>),
    /// Its owner gave the key up (nothing was sent, or it saw a claim
    /// elsewhere and stopped waiting): whoever waits tries again.
    Released,
}

/// Keys in flight on this replica, one owner each. Entries live only while
/// their request runs, so the map is bounded by the requests in progress.
#[derive(Default)]
pub struct Flights {
    /// A `std` mutex: held only for a map operation, never across `.await`.
    map: Mutex<HashMap<String, watch::Sender<Flight>>>,
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<Flight>>> {
        // The map holds channels only: a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Becomes the owner of `key` on this replica, or follows its owner.
    fn enter(&self, key: &str, fingerprint: [u8; 32]) -> Result<(), watch::Receiver<Flight>> {
        let mut map = self.lock();
        if let Some(tx) = map.get(key) {
            return Err(tx.subscribe());
        }
        let (tx, _) = watch::channel(Flight::Running(fingerprint));
        map.insert(key.to_owned(), tx);
        Ok(())
    }

    /// Ends `key`'s flight with `flight`, waking its followers.
    fn leave(&self, key: &str, flight: Flight) {
        if let Some(tx) = self.lock().remove(key) {
            tx.send_replace(flight);
        }
    }

    /// Keys in flight (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no key is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The owner's hold on a key, on this replica and in the vault. Dropped
/// without [`Ticket::finish`] or [`Ticket::release`] (a panic), it frees
/// the key on this replica only: the vault's claim stays, so a retry waits
/// out the bound and answers `forward_outcome_unknown` — never a second
/// send.
pub struct Ticket {
    state: Arc<AppState>,
    key: String,
    fingerprint: [u8; 32],
    done: bool,
}

impl Ticket {
    /// Records `answer` for the retries and gives it to the ones waiting.
    /// A vault that fails is tried three times; after that the claim stays
    /// in flight (retries elsewhere will say `forward_outcome_unknown`).
    pub async fn finish(mut self, answer: Answer) {
        self.done = true;
        let record = IdempotencyRecord {
            key: self.key.clone(),
            fingerprint: self.fingerprint,
            status: answer.status().as_u16(),
            body: answer.encode(),
            created_at: self.state.clock.now(),
        };
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=3 {
            match self.state.tokens.finish_idempotency(record.clone()).await {
                Ok(true) => break,
                Ok(false) => {
                    // Called unknown by a waiter past the bound: the
                    // record keeps that answer, and so does everyone.
                    tracing::warn!("forward record finished by another request first");
                    if let Ok(Some(r)) = self
                        .state
                        .tokens
                        .get_idempotency(
                            &self.key,
                            self.state
                                .idempotency
                                .horizon(self.state.config.idempotency_ttl),
                        )
                        .await
                    {
                        if let Some(recorded) = Answer::decode(&r.body) {
                            self.state
                                .forwarder
                                .flights
                                .leave(&self.key, Flight::Done(r.fingerprint, Arc::new(recorded)));
                            return;
                        }
                    }
                    break;
                }
                Err(e) if attempt < 3 => {
                    tracing::warn!(error = %e, attempt, "recording a forward's answer failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
                Err(e) => {
                    tracing::error!(error = %e, "recording a forward's answer failed; its retries on other replicas will answer forward_outcome_unknown");
                }
            }
        }
        self.state
            .forwarder
            .flights
            .leave(&self.key, Flight::Done(self.fingerprint, Arc::new(answer)));
    }

    /// Frees the key: nothing was sent, so a retry runs afresh.
    pub async fn release(mut self) {
        self.done = true;
        if let Err(e) = self
            .state
            .tokens
            .release_idempotency(&self.key, &self.fingerprint)
            .await
        {
            // The claim stays; retries will call the outcome unknown,
            // which is safe, if unhelpful.
            tracing::error!(error = %e, "releasing a forward's idempotency claim failed");
        }
        self.state
            .forwarder
            .flights
            .leave(&self.key, Flight::Released);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.state
                .forwarder
                .flights
                .leave(&self.key, Flight::Released);
        }
    }
}

/// What [`begin`] decided.
pub enum Begun {
    /// This request owns the key: run it, then finish or release.
    Owner(Ticket),
    /// The recorded answer of the first request, given again.
    Replay(Result<Response<Body>, Error>),
}

/// Claims `key` for a forward with `fingerprint`, or waits for its owner's
/// answer (bounded by `bound`). Errors: 422 `idempotency_key_reused` for
/// another request under the key, and the vault's.
pub async fn begin(
    state: &Arc<AppState>,
    key: String,
    fingerprint: [u8; 32],
    bound: Bound,
) -> Result<Begun, Error> {
    let flights = &state.forwarder.flights;
    loop {
        if let Err(mut rx) = flights.enter(&key, fingerprint) {
            // Someone on this replica holds the key: wait for their answer.
            let wait = rx.wait_for(|f| !matches!(f, Flight::Running(fp) if *fp == fingerprint));
            let flight = match tokio::time::timeout(bound.0 + GRACE, wait).await {
                Ok(Ok(f)) => f.clone(),
                // The owner vanished without a word: ask again.
                Ok(Err(_)) => continue,
                Err(_) => return Err(InternalError::OutcomeUnknown.into()),
            };
            match flight {
                Flight::Running(_) => return Err(ClientError::IdempotencyKeyReused.into()),
                Flight::Done(fp, answer) if fp == fingerprint => {
                    return Ok(Begun::Replay(answer.replay()))
                }
                Flight::Done(..) => return Err(ClientError::IdempotencyKeyReused.into()),
                Flight::Released => continue,
            }
        }
        // This request holds the key on this replica; now in the vault.
        let mut ticket = Ticket {
            state: state.clone(),
            key: key.clone(),
            fingerprint,
            done: false,
        };
        let claim = IdempotencyRecord {
            key: key.clone(),
            fingerprint,
            status: IdempotencyRecord::IN_FLIGHT,
            body: Vec::new(),
            created_at: state.clock.now(),
        };
        let ttl = state.config.idempotency_ttl;
        let horizon = || state.idempotency.horizon(ttl);
        let Some(mut existing) = state.tokens.put_idempotency(claim, horizon()).await? else {
            return Ok(Begun::Owner(ticket));
        };
        if existing.fingerprint != fingerprint {
            return Err(ClientError::IdempotencyKeyReused.into());
        }
        if existing.is_in_flight() {
            // Held by another replica, or by one that died: poll it.
            let deadline = tokio::time::Instant::now()
                + bound.remaining(existing.created_at, state.clock.now());
            let mut pause = POLL_FIRST;
            loop {
                if tokio::time::Instant::now() >= deadline {
                    let unknown = IdempotencyRecord {
                        status: StatusCode::BAD_GATEWAY.as_u16(),
                        body: Answer::Unknown.encode(),
                        ..existing.clone()
                    };
                    if state.tokens.finish_idempotency(unknown).await? {
                        tracing::warn!(
                            "a forward's idempotency claim outlived its bound; its outcome is recorded as unknown"
                        );
                        ticket.done = true;
                        flights.leave(&key, Flight::Done(fingerprint, Arc::new(Answer::Unknown)));
                        return Ok(Begun::Replay(Answer::Unknown.replay()));
                    }
                }
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                tokio::time::sleep(pause.min(left).max(Duration::from_millis(1))).await;
                pause = (pause * 2).min(POLL_MAX);
                match state.tokens.get_idempotency(&key, horizon()).await? {
                    // Released: the key is free, claim it again.
                    None => break,
                    Some(r) if r.fingerprint != fingerprint => {
                        return Err(ClientError::IdempotencyKeyReused.into())
                    }
                    Some(r) if r.is_in_flight() => existing = r,
                    Some(r) => {
                        existing = r;
                        break;
                    }
                }
            }
            if existing.is_in_flight() {
                // Released: drop the ticket (frees this replica) and loop.
                drop(ticket);
                continue;
            }
        }
        let answer = Answer::decode(&existing.body)
            .ok_or_else(|| Error::bug("unreadable forward record".into()))?;
        let answer = Arc::new(answer);
        ticket.done = true;
        flights.leave(&key, Flight::Done(fingerprint, answer.clone()));
        return Ok(Begun::Replay(answer.replay()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        for a in [
            Answer::Response {
                status: StatusCode::PAYMENT_REQUIRED,
                headers,
                body: Bytes::from_static(b"{\"declined\":true}"),
                truncated: true,
            },
            Answer::Error(
                SentError::Failed,
                "acq.example: the connection failed".into(),
            ),
            Answer::Error(SentError::TimedOut, "acq.example sent no response".into()),
            Answer::Error(SentError::NotRedactable, "acq.example: gzip".into()),
            Answer::Error(SentError::InvalidUpstream, "acq.example: framing".into()),
            Answer::Unknown,
        ] {
            let encoded = a.encode();
            assert_eq!(Answer::decode(&encoded), Some(a.clone()), "{a:?}");
            // Cut or extended, it is refused, not misread.
            assert_eq!(Answer::decode(&encoded[..encoded.len() - 1]), None);
            let mut longer = encoded.clone();
            longer.push(0);
            assert_eq!(Answer::decode(&longer), None);
        }
        assert_eq!(Answer::decode(&[]), None);
        assert_eq!(Answer::decode(&[2, KIND_UNKNOWN]), None);
    }

    #[test]
    fn replays_are_marked() {
        let a = Answer::Response {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"ok"),
            truncated: true,
        };
        let r = a.replay().unwrap();
        assert_eq!(r.headers()[&X_RELAY_IDEMPOTENT_REPLAY], "true");
        assert_eq!(r.headers()[&X_RELAY_IDEMPOTENT_BODY], "truncated");
        // Errors replay as themselves, marked (their HTTP is `api::error`'s,
        // pinned there).
        for kind in SentError::ALL {
            let e = kind.error("x".into());
            assert!(e.sent());
            assert_eq!(Answer::from_error(&e), Answer::Error(kind, "x".into()));
            match Answer::Error(kind, "x".into()).replay() {
                Err(Error::Replayed(e)) => {
                    assert_eq!(Answer::from_error(&e), Answer::Error(kind, "x".into()))
                }
                _ => panic!("{kind:?} did not replay as an error"),
            }
        }
        assert_eq!(
            Answer::from_error(&ClientError::TokenNotFound.into()),
            Answer::Unknown
        );
        assert!(matches!(
            Answer::Unknown.replay(),
            Err(Error::Replayed(e)) if matches!(*e, Error::Internal(InternalError::OutcomeUnknown))
        ));
    }
}
