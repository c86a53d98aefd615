//! Why a forward failed, by whose fault (after pingora-error's
//! `ErrorSource`): the merchant's request ([`ClientError`]), the acquirer's
//! side ([`UpstreamError`], with whether the request may have reached it),
//! or ours ([`InternalError`]).
//!
//! Nothing here knows HTTP: `api::error` turns an [`Error`] into a status,
//! a classifier and a message, in one exhaustive `match`. The texts carried
//! here name placeholders, headers, hosts and reasons, never a value.

use crate::references::{ReferenceStoreError, TakeError, TakeFailure};
use crate::vault::StoreError;

/// Why a forward failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The merchant's request: refused before anything was sent.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The acquirer's side: no connection, no answer in time, or an answer
    /// that cannot be relayed. `sent`: whether any byte of the request may
    /// have reached the acquirer — then what it spent stays spent, and a
    /// keyed forward records the error for its retries.
    #[error("{error}")]
    Upstream {
        /// What went wrong.
        error: UpstreamError,
        /// Whether the acquirer may have the request.
        sent: bool,
    },
    /// Ours: a store, or a bug.
    #[error(transparent)]
    Internal(#[from] InternalError),
    /// A keyed forward's error, recorded when it first happened and given
    /// again to a retry (marked as a replay).
    #[error("{0}")]
    Replayed(Box<Error>),
}

impl Error {
    /// Whether the acquirer may have the request (see [`Error::Upstream`]).
    pub fn sent(&self) -> bool {
        matches!(self, Error::Upstream { sent: true, .. })
    }

    /// An upstream error after which nothing was sent.
    pub(super) fn unsent(error: UpstreamError) -> Error {
        Error::Upstream { error, sent: false }
    }

    /// An upstream error after the request was (or may have been) sent.
    pub(super) fn sent_then(error: UpstreamError) -> Error {
        Error::Upstream { error, sent: true }
    }

    /// A bug or an impossible state.
    pub(super) fn bug(detail: String) -> Error {
        Error::Internal(InternalError::Bug(detail))
    }
}

/// The merchant's request is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `routes_only = true`: free-form forwards are refused.
    #[error("free-form forwards are disabled")]
    FreeFormForwardDisabled,
    /// A method a forward does not relay; the methods it takes, for `Allow`.
    #[error("method not allowed (allowed: {0})")]
    MethodNotAllowed(&'static str),
    /// A malformed request header or body, with a fixed text.
    #[error("{0}")]
    InvalidRequest(&'static str),
    /// A malformed `x-idempotency-key`.
    #[error("malformed idempotency key")]
    MalformedIdempotencyKey,
    /// The idempotency key was used with another request.
    #[error("idempotency key was used with a different request")]
    IdempotencyKeyReused,
    /// A required header is absent.
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    /// `x-destination-url` (or the URL it renders to) is malformed.
    #[error("invalid destination: {0}")]
    InvalidDestination(String),
    /// The allow-list (or an address check) refuses the destination.
    #[error("destination not allowed: {0}")]
    DestinationNotAllowed(String),
    /// The body is over `max_body_bytes`, or could not be read.
    #[error(transparent)]
    Body(crate::body::Error),
    /// Placeholder syntax or name error.
    #[error("invalid template: {0}")]
    InvalidTemplate(String),
    /// A header tokenrelay does not let a merchant set.
    #[error("header not allowed: {0}")]
    HeaderNotAllowed(String),
    /// The request could render beyond `max_rendered_bytes`.
    #[error("the rendered request could exceed {0} bytes")]
    RenderedTooLarge(usize),
    /// Unknown network token.
    #[error("network token not found")]
    TokenNotFound,
    /// Unknown PCI token.
    #[error("PCI token not found")]
    PciTokenNotFound,
    /// The network token is not active (its status).
    #[error("network token is not active ({0})")]
    TokenNotActive(&'static str),
    /// The template names `security_code` and no CVC is held.
    #[error("no security code is held")]
    SecurityCodeUnavailable,
    /// The cryptogram reference is unknown (or malformed), spent, or
    /// another token's.
    #[error(transparent)]
    Reference(TakeError),
    /// No `[[routes]]` entry has this name.
    #[error("route not found")]
    UnknownRoute,
    /// The route is not open to this forward endpoint.
    #[error("{0}")]
    RouteNotPermitted(String),
    /// The route did not render with the merchant's input.
    #[error("invalid route input: {0}")]
    InvalidRouteInput(String),
}

/// The acquirer's side failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection: not resolved, refused, TLS refused.
    #[error("destination unreachable: {0}")]
    Unreachable(String),
    /// The connection failed after the request was written.
    #[error("destination failed: {0}")]
    Failed(String),
    /// No connection, or no answer, in time.
    #[error("destination timed out: {0}")]
    Timeout(String),
    /// A compressed answer while redaction is on: its echoes cannot be
    /// masked, so it is not relayed.
    #[error("response not redactable: {0}")]
    NotRedactable(String),
    /// A malformed answer (e.g. framed twice): not relayed.
    #[error("invalid upstream response: {0}")]
    InvalidResponse(String),
}

/// Ours.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    /// The token vault failed.
    #[error(transparent)]
    Tokens(StoreError),
    /// The reference (or CVC) store failed, or is full.
    #[error(transparent)]
    References(#[from] ReferenceStoreError),
    /// A response could not be built.
    #[error(transparent)]
    Body(crate::body::Error),
    /// A keyed forward's first request may have reached the acquirer, and
    /// the replica running it stopped before recording its answer.
    #[error("the first request's outcome was never recorded")]
    OutcomeUnknown,
    /// A bug or an impossible state.
    #[error("internal error: {0}")]
    Bug(String),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Lifecycle(status) => ClientError::TokenNotActive(status.as_str()).into(),
            e @ (StoreError::Unavailable(_) | StoreError::Corrupt(_)) => {
                InternalError::Tokens(e).into()
            }
        }
    }
}

impl From<ReferenceStoreError> for Error {
    fn from(e: ReferenceStoreError) -> Self {
        InternalError::References(e).into()
    }
}

impl From<TakeFailure> for Error {
    fn from(e: TakeFailure) -> Self {
        match e {
            TakeFailure::Refused(r) => ClientError::Reference(r).into(),
            TakeFailure::Store(s) => s.into(),
        }
    }
}

impl From<crate::body::Error> for Error {
    fn from(e: crate::body::Error) -> Self {
        use crate::body::Error as B;
        match e {
            B::TooLarge(_) | B::Unreadable(_) => ClientError::Body(e).into(),
            B::Serialise(_) => InternalError::Body(e).into(),
        }
    }
}

impl From<crate::idempotency::Error> for Error {
    fn from(e: crate::idempotency::Error) -> Self {
        use crate::idempotency::Error as I;
        match e {
            I::MalformedKey => ClientError::MalformedIdempotencyKey.into(),
            I::KeyReused => ClientError::IdempotencyKeyReused.into(),
            I::Store(s) => s.into(),
            I::BadRecord => Error::bug("bad status in idempotency record".into()),
        }
    }
}
