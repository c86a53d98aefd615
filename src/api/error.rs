//! The one place where failures become HTTP.
//!
//! Every error tokenrelay produces is `{"code", "classifier", "message"}`
//! with `x-relay-error: <classifier>` (contract §3). The mapping from
//! [`ApiError`] to status and classifier is one exhaustive `match` with no
//! catch-all arm, pinned by a unit test. The layers below bring their own
//! error types (the forward's [`forward::Error`], the stores',
//! [`idempotency::Error`], …) and each becomes an [`ApiError`] here, in a
//! `From` with every variant written out; a test pins every forward
//! error's answer. Messages are written here or by the
//! layers below from names and reasons only — never from request values — so
//! no PAN, TPAN, cryptogram, CVC or key can reach a client through them.
//! Faults on our side (store down, internal bugs) answer with a fixed text;
//! their detail goes to the log.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::auth::Scope;
use crate::forward::claim::X_RELAY_IDEMPOTENT_REPLAY;
use crate::forward::{self, ClientError, InternalError, UpstreamError};
use crate::idempotency;
use crate::references::{ReferenceStoreError, TakeError, TakeFailure};
use crate::session::jwe::JweError;
use crate::session::{SessionError, TakeError as SessionTakeError};
use crate::tsp::{SchemeRule, TspError};
use crate::vault::StoreError;
use crate::{Body, X_RELAY_ERROR};

/// Everything that can go wrong in a request, by cause.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or unknown `x-api-key`.
    #[error("missing or unknown API key")]
    Unauthorized,
    /// The key lacks the scope.
    #[error("API key lacks the `{}` scope", .0.as_str())]
    Forbidden(Scope),
    /// No such route.
    #[error("no such route")]
    RouteNotFound,
    /// Route exists, method does not; the methods it takes, for `Allow`
    /// (RFC 9110 §15.5.6 requires it on a 405).
    #[error("method not allowed on this route (allowed: {0})")]
    MethodNotAllowed(&'static str),
    /// Malformed request (not JSON, wrong shape).
    #[error("{0}")]
    InvalidRequest(String),
    /// The provisioning source is not allowed at this compliance level.
    #[error("source type `{0}` is not permitted at compliance level {1}")]
    SourceNotPermitted(&'static str, &'static str),
    /// The provisioning source type is not available in this build.
    #[error("source type `{0}` is not supported by this deployment")]
    SourceNotSupported(String),
    /// The card failed validation.
    #[error("invalid card: `{field}` {reason}")]
    InvalidCard {
        /// Field at fault.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// Same idempotency key, different request.
    #[error("idempotency key was used with a different request")]
    IdempotencyKeyReused,
    /// Unknown token id.
    #[error("network token not found")]
    TokenNotFound,
    /// Unknown, malformed or expired card-capture session.
    #[error("session not found or expired")]
    SessionNotFound,
    /// The session was spent by an earlier request.
    #[error("session already used; open a new session")]
    SessionAlreadyUsed,
    /// The session's JWE breaks the profile or does not decrypt; the reason
    /// is a fixed text that never describes the plaintext.
    #[error("invalid session data: {0}")]
    InvalidSessionData(&'static str),
    /// Unknown PCI token id.
    #[error("PCI token not found")]
    PciTokenNotFound,
    /// `security_code` used when no CVC is held.
    #[error("no security code is held for this PCI token (it is single use and expires)")]
    SecurityCodeUnavailable,
    /// Metadata breaks the limits.
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    /// Inline cryptograms at SAQ-A.
    #[error("inline cryptograms are not permitted at compliance level saq-a; use mode reference")]
    InlineNotPermitted,
    /// `dauth` without activation.
    #[error("delegated authentication is not activated for this token")]
    DauthNotActivated,
    /// Token is not active.
    #[error("network token is not active (status {0})")]
    TokenNotActive(&'static str),
    /// The cryptogram request breaks a rule.
    #[error("invalid cryptogram request: {0}")]
    InvalidCryptogramRequest(String),
    /// The cryptogram request breaks a row of the brand table; the
    /// compatible surfaces name their own field from it.
    #[error("invalid cryptogram request: {}", .0.message())]
    SchemeRule(SchemeRule),
    /// Reference store at its bound.
    #[error("reference store is full; retry later")]
    ReferenceStoreFull,
    /// A required header is absent.
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    /// `x-destination-url` is malformed.
    #[error("invalid destination: {0}")]
    InvalidDestination(String),
    /// The allow-list refuses the destination.
    #[error("destination not allowed: {0}")]
    DestinationNotAllowed(String),
    /// Body over `max_body_bytes`.
    #[error("request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    /// Placeholder syntax or name error.
    #[error("invalid template: {0}")]
    InvalidTemplate(String),
    /// A header tokenrelay must not let a merchant set (framing, `host`,
    /// hop-by-hop), or an escape for a name tokenrelay does not reserve.
    #[error("header not allowed: {0}")]
    HeaderNotAllowed(String),
    /// The request could render beyond `max_rendered_bytes`.
    #[error("the rendered request could exceed {0} bytes")]
    RenderedTooLarge(usize),
    /// Unknown or expired reference.
    #[error("cryptogram reference not found or expired")]
    ReferenceNotFound,
    /// Reference consumed before.
    #[error(
        "cryptogram reference already used: a forward took it. If that forward got no answer \
         (a lost connection, or a tokenrelay replica that stopped mid-request), its outcome is \
         unknown here: ask the acquirer before paying again with a new cryptogram"
    )]
    ReferenceAlreadyUsed,
    /// Reference bound to another token.
    #[error("cryptogram reference belongs to another network token")]
    ReferenceTokenMismatch,
    /// Could not connect to the acquirer; nothing was sent.
    #[error("destination unreachable: {0}")]
    DestinationUnreachable(String),
    /// The connection failed after the request was sent: the acquirer may
    /// have received it, so the reference stays consumed.
    #[error("destination failed: {0}")]
    DestinationFailed(String),
    /// The acquirer's answer is compressed while redaction is on, so its
    /// echoes could not be masked; it is not relayed.
    #[error("response not redactable: {0}")]
    ResponseNotRedactable(String),
    /// The acquirer's answer is malformed (e.g. both `content-length` and
    /// `transfer-encoding`); it is not relayed.
    #[error("invalid upstream response: {0}")]
    InvalidUpstreamResponse(String),
    /// The acquirer did not answer in time.
    #[error("destination timed out: {0}")]
    DestinationTimeout(String),
    /// A keyed forward's first request was sent, and its answer was never
    /// recorded: the replica running it stopped mid-flight. Whether the
    /// acquirer received it is unknown, so nothing is sent again.
    #[error("the first request with this idempotency key may have reached the acquirer, but its answer was never recorded (tokenrelay stopped mid-flight); check the payment with the acquirer before charging again")]
    ForwardOutcomeUnknown,
    /// No `[[routes]]` entry has this name.
    #[error("route not found")]
    UnknownRoute,
    /// The route is not open to this forward endpoint.
    #[error("{0}")]
    RouteNotPermitted(String),
    /// The route did not render with the merchant's input.
    #[error("invalid route input: {0}")]
    InvalidRouteInput(String),
    /// `routes_only = true`: free-form forwards are refused.
    #[error(
        "free-form forwards are disabled (routes_only); use a route: POST …/forward/{{route}}"
    )]
    FreeFormForwardDisabled,
    /// A backing store is down: ours, retryable.
    #[error("service unavailable")]
    Unavailable(String),
    /// A bug or an impossible state: ours.
    #[error("internal error")]
    Internal(String),
    /// A keyed forward's recorded error, given again to a retry: answered
    /// as the error itself, marked `x-relay-idempotent-replay: true`.
    #[error("{0}")]
    Replayed(Box<ApiError>),
}

impl ApiError {
    /// Status and classifier; the contract's table, exhaustively.
    pub fn status_and_classifier(&self) -> (StatusCode, &'static str) {
        use ApiError as E;
        match self {
            E::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            E::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            E::RouteNotFound => (StatusCode::NOT_FOUND, "not_found"),
            E::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            E::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            E::SourceNotPermitted(..) => (StatusCode::FORBIDDEN, "source_not_permitted"),
            E::SourceNotSupported(_) => (StatusCode::UNPROCESSABLE_ENTITY, "source_not_supported"),
            E::InvalidCard { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_card"),
            E::IdempotencyKeyReused => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            E::TokenNotFound => (StatusCode::NOT_FOUND, "token_not_found"),
            E::PciTokenNotFound => (StatusCode::NOT_FOUND, "pci_token_not_found"),
            E::SessionNotFound => (StatusCode::NOT_FOUND, "session_not_found"),
            E::SessionAlreadyUsed => (StatusCode::CONFLICT, "session_already_used"),
            E::InvalidSessionData(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_session_data"),
            E::SecurityCodeUnavailable => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "security_code_unavailable",
            ),
            E::InvalidMetadata(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_metadata"),
            E::InlineNotPermitted => (StatusCode::FORBIDDEN, "inline_not_permitted"),
            E::DauthNotActivated => (StatusCode::UNPROCESSABLE_ENTITY, "dauth_not_activated"),
            E::TokenNotActive(_) => (StatusCode::FAILED_DEPENDENCY, "token_not_active"),
            E::InvalidCryptogramRequest(_) | E::SchemeRule(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_cryptogram_request",
            ),
            E::ReferenceStoreFull => (StatusCode::SERVICE_UNAVAILABLE, "reference_store_full"),
            E::MissingHeader(_) => (StatusCode::BAD_REQUEST, "missing_header"),
            E::InvalidDestination(_) => (StatusCode::BAD_REQUEST, "invalid_destination"),
            E::DestinationNotAllowed(_) => (StatusCode::FORBIDDEN, "destination_not_allowed"),
            E::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            E::InvalidTemplate(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_template"),
            E::HeaderNotAllowed(_) => (StatusCode::BAD_REQUEST, "header_not_allowed"),
            E::RenderedTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "rendered_too_large"),
            E::ReferenceNotFound => (StatusCode::NOT_FOUND, "reference_not_found"),
            E::ReferenceAlreadyUsed => (StatusCode::CONFLICT, "reference_already_used"),
            E::ReferenceTokenMismatch => {
                (StatusCode::UNPROCESSABLE_ENTITY, "reference_token_mismatch")
            }
            E::DestinationUnreachable(_) => (StatusCode::BAD_GATEWAY, "destination_unreachable"),
            E::DestinationFailed(_) => (StatusCode::BAD_GATEWAY, "destination_failed"),
            E::ResponseNotRedactable(_) => (StatusCode::BAD_GATEWAY, "response_not_redactable"),
            E::InvalidUpstreamResponse(_) => (StatusCode::BAD_GATEWAY, "invalid_upstream_response"),
            E::DestinationTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "destination_timeout"),
            E::ForwardOutcomeUnknown => (StatusCode::BAD_GATEWAY, "forward_outcome_unknown"),
            E::UnknownRoute => (StatusCode::NOT_FOUND, "route_not_found"),
            E::RouteNotPermitted(_) => (StatusCode::FORBIDDEN, "route_not_permitted"),
            E::InvalidRouteInput(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_route_input"),
            E::FreeFormForwardDisabled => (StatusCode::FORBIDDEN, "free_form_forward_disabled"),
            E::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            E::Replayed(e) => e.status_and_classifier(),
        }
    }

    /// Whether the fault is on our side (logged at error level).
    pub fn is_ours(&self) -> bool {
        matches!(
            self.replayed(),
            ApiError::Unavailable(_) | ApiError::Internal(_)
        )
    }

    /// Status, classifier and the message a client may read; a fault on
    /// our side is logged here with its detail, which the message never
    /// carries. Every error shape (native, and the compatible surfaces'
    /// own) is written from this.
    pub fn describe(&self) -> (StatusCode, &'static str, String) {
        let (status, classifier) = self.status_and_classifier();
        if self.is_ours() {
            let detail = match self.replayed() {
                ApiError::Unavailable(d) | ApiError::Internal(d) => d.as_str(),
                _ => "",
            };
            tracing::error!(classifier, detail, "request failed on our side");
        }
        (status, classifier, self.to_string())
    }

    /// The error itself, a replay's or not.
    fn replayed(&self) -> &ApiError {
        match self {
            ApiError::Replayed(e) => e.replayed(),
            e => e,
        }
    }

    /// The JSON error response.
    pub fn into_response(self) -> Response<Body> {
        let (status, classifier, message) = self.describe();
        let body = serde_json::json!({
            "code": status.as_u16(),
            "classifier": classifier,
            "message": message,
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = Response::new(
            Full::new(Bytes::from(bytes))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(X_RELAY_ERROR.clone(), HeaderValue::from_static(classifier));
        if let ApiError::MethodNotAllowed(allow) = self.replayed() {
            h.insert(http::header::ALLOW, HeaderValue::from_static(allow));
        }
        if let ApiError::Replayed(_) = self {
            h.insert(
                X_RELAY_IDEMPOTENT_REPLAY.clone(),
                HeaderValue::from_static("true"),
            );
        }
        resp
    }
}

impl From<crate::body::Error> for ApiError {
    fn from(e: crate::body::Error) -> Self {
        use crate::body::Error as B;
        match e {
            B::TooLarge(limit) => ApiError::BodyTooLarge(limit),
            B::Unreadable(_) => ApiError::InvalidRequest("request body could not be read".into()),
            B::Serialise(e) => ApiError::Internal(format!("serialising a response: {e}")),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(d) => ApiError::Unavailable(format!("token store: {d}")),
            StoreError::Corrupt(d) => ApiError::Internal(format!("token store: {d}")),
            StoreError::Lifecycle(status) => ApiError::TokenNotActive(status.as_str()),
        }
    }
}

impl From<TspError> for ApiError {
    fn from(e: TspError) -> Self {
        match e {
            TspError::InvalidRequest(m) => ApiError::InvalidCryptogramRequest(m.to_owned()),
            TspError::Unavailable(d) => ApiError::Unavailable(format!("token service: {d}")),
        }
    }
}

impl From<SchemeRule> for ApiError {
    fn from(rule: SchemeRule) -> Self {
        ApiError::SchemeRule(rule)
    }
}

impl From<ReferenceStoreError> for ApiError {
    fn from(e: ReferenceStoreError) -> Self {
        match e {
            ReferenceStoreError::Full => ApiError::ReferenceStoreFull,
            ReferenceStoreError::Unavailable(d) => {
                ApiError::Unavailable(format!("reference store: {d}"))
            }
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Refused(SessionTakeError::NotFound) => ApiError::SessionNotFound,
            SessionError::Refused(SessionTakeError::AlreadyUsed) => ApiError::SessionAlreadyUsed,
            SessionError::Invalid(JweError::Malformed) => {
                ApiError::InvalidSessionData("not a JWE in compact serialization")
            }
            SessionError::Invalid(JweError::Header(reason)) => ApiError::InvalidSessionData(reason),
            SessionError::Invalid(JweError::Decrypt) => {
                ApiError::InvalidSessionData("does not decrypt under this session's key")
            }
            SessionError::Store(s) => s.into(),
        }
    }
}

impl From<TakeError> for ApiError {
    fn from(e: TakeError) -> Self {
        match e {
            TakeError::NotFound => ApiError::ReferenceNotFound,
            TakeError::AlreadyUsed => ApiError::ReferenceAlreadyUsed,
            TakeError::TokenMismatch => ApiError::ReferenceTokenMismatch,
        }
    }
}

impl From<TakeFailure> for ApiError {
    fn from(e: TakeFailure) -> Self {
        match e {
            TakeFailure::Refused(r) => r.into(),
            TakeFailure::Store(s) => s.into(),
        }
    }
}

impl From<idempotency::Error> for ApiError {
    fn from(e: idempotency::Error) -> Self {
        use idempotency::Error as I;
        match e {
            I::MalformedKey => ApiError::InvalidRequest(I::MalformedKey.to_string()),
            I::KeyReused => ApiError::IdempotencyKeyReused,
            I::Store(s) => s.into(),
            I::BadRecord => ApiError::Internal("bad status in idempotency record".into()),
        }
    }
}

/// A forward's failure as HTTP: by source, every variant, no catch-all.
impl From<forward::Error> for ApiError {
    fn from(e: forward::Error) -> Self {
        use forward::Error as F;
        match e {
            F::Client(c) => c.into(),
            F::Upstream { error, sent: _ } => error.into(),
            F::Internal(i) => i.into(),
            F::Replayed(e) => ApiError::Replayed(Box::new((*e).into())),
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        use ClientError as C;
        match e {
            C::FreeFormForwardDisabled => ApiError::FreeFormForwardDisabled,
            C::MethodNotAllowed(allow) => ApiError::MethodNotAllowed(allow),
            C::InvalidRequest(m) => ApiError::InvalidRequest(m.to_owned()),
            C::MalformedIdempotencyKey => idempotency::Error::MalformedKey.into(),
            C::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
            C::MissingHeader(h) => ApiError::MissingHeader(h),
            C::InvalidDestination(m) => ApiError::InvalidDestination(m),
            C::DestinationNotAllowed(m) => ApiError::DestinationNotAllowed(m),
            C::Body(b) => b.into(),
            C::InvalidTemplate(m) => ApiError::InvalidTemplate(m),
            C::HeaderNotAllowed(m) => ApiError::HeaderNotAllowed(m),
            C::RenderedTooLarge(limit) => ApiError::RenderedTooLarge(limit),
            C::TokenNotFound => ApiError::TokenNotFound,
            C::PciTokenNotFound => ApiError::PciTokenNotFound,
            C::TokenNotActive(status) => ApiError::TokenNotActive(status),
            C::SecurityCodeUnavailable => ApiError::SecurityCodeUnavailable,
            C::Reference(r) => r.into(),
            C::UnknownRoute => ApiError::UnknownRoute,
            C::RouteNotPermitted(m) => ApiError::RouteNotPermitted(m),
            C::InvalidRouteInput(m) => ApiError::InvalidRouteInput(m),
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        use UpstreamError as U;
        match e {
            U::Unreachable(d) => ApiError::DestinationUnreachable(d),
            U::Failed(d) => ApiError::DestinationFailed(d),
            U::Timeout(d) => ApiError::DestinationTimeout(d),
            U::NotRedactable(d) => ApiError::ResponseNotRedactable(d),
            U::InvalidResponse(d) => ApiError::InvalidUpstreamResponse(d),
        }
    }
}

impl From<InternalError> for ApiError {
    fn from(e: InternalError) -> Self {
        use InternalError as I;
        match e {
            I::Tokens(s) => s.into(),
            I::References(r) => r.into(),
            I::Body(b) => b.into(),
            I::OutcomeUnknown => ApiError::ForwardOutcomeUnknown,
            I::Bug(d) => ApiError::Internal(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ApiError as E;

    /// Writes the contract's table once and makes from it `contract_row`,
    /// an exhaustive `match` with no `_ =>` (so a new variant does not
    /// compile until it has a row), and `one_of_each`, the rows' samples.
    macro_rules! contract_table {
        ($($sample:expr => $pattern:pat => $code:literal $classifier:literal,)*) => {
            fn contract_row(e: &ApiError) -> (u16, &'static str) {
                match e {
                    $($pattern => ($code, $classifier),)*
                }
            }

            /// One value per row, each checked to match its own row.
            fn one_of_each() -> Vec<ApiError> {
                let samples = vec![$($sample),*];
                let mut i = 0;
                $(
                    assert!(matches!(samples[i], $pattern), "{} is not {}", $classifier, stringify!($sample));
                    i += 1;
                )*
                assert_eq!(i, samples.len());
                samples
            }
        };
    }

    // The contract's status/classifier table (§3), written out on its own
    // rather than derived from `status_and_classifier`:
    // sample => pattern => status classifier.
    contract_table! {
        E::Unauthorized => E::Unauthorized => 401 "unauthorized",
        E::Forbidden(Scope::Forward) => E::Forbidden(_) => 403 "forbidden",
        E::RouteNotFound => E::RouteNotFound => 404 "not_found",
        E::MethodNotAllowed("GET") => E::MethodNotAllowed(_) => 405 "method_not_allowed",
        E::InvalidRequest("x".into()) => E::InvalidRequest(_) => 400 "invalid_request",
        E::SourceNotPermitted("pan", "saq-a") => E::SourceNotPermitted(..) => 403 "source_not_permitted",
        E::SourceNotSupported("x".into()) => E::SourceNotSupported(_) => 422 "source_not_supported",
        E::InvalidCard { field: "number", reason: "x" } => E::InvalidCard { .. } => 422 "invalid_card",
        E::IdempotencyKeyReused => E::IdempotencyKeyReused => 422 "idempotency_key_reused",
        E::TokenNotFound => E::TokenNotFound => 404 "token_not_found",
        E::PciTokenNotFound => E::PciTokenNotFound => 404 "pci_token_not_found",
        E::SessionNotFound => E::SessionNotFound => 404 "session_not_found",
        E::SessionAlreadyUsed => E::SessionAlreadyUsed => 409 "session_already_used",
        E::InvalidSessionData("x") => E::InvalidSessionData(_) => 422 "invalid_session_data",
        E::SecurityCodeUnavailable => E::SecurityCodeUnavailable => 422 "security_code_unavailable",
        E::InvalidMetadata("x".into()) => E::InvalidMetadata(_) => 422 "invalid_metadata",
        E::InlineNotPermitted => E::InlineNotPermitted => 403 "inline_not_permitted",
        E::DauthNotActivated => E::DauthNotActivated => 422 "dauth_not_activated",
        E::TokenNotActive("deleted") => E::TokenNotActive(_) => 424 "token_not_active",
        E::InvalidCryptogramRequest("x".into()) => E::InvalidCryptogramRequest(_) => 422 "invalid_cryptogram_request",
        E::SchemeRule(SchemeRule::AmountRequired) => E::SchemeRule(_) => 422 "invalid_cryptogram_request",
        E::ReferenceStoreFull => E::ReferenceStoreFull => 503 "reference_store_full",
        E::MissingHeader("x") => E::MissingHeader(_) => 400 "missing_header",
        E::InvalidDestination("x".into()) => E::InvalidDestination(_) => 400 "invalid_destination",
        E::DestinationNotAllowed("x".into()) => E::DestinationNotAllowed(_) => 403 "destination_not_allowed",
        E::BodyTooLarge(1) => E::BodyTooLarge(_) => 413 "body_too_large",
        E::InvalidTemplate("x".into()) => E::InvalidTemplate(_) => 422 "invalid_template",
        E::ReferenceNotFound => E::ReferenceNotFound => 404 "reference_not_found",
        E::ReferenceAlreadyUsed => E::ReferenceAlreadyUsed => 409 "reference_already_used",
        E::ReferenceTokenMismatch => E::ReferenceTokenMismatch => 422 "reference_token_mismatch",
        E::DestinationUnreachable("x".into()) => E::DestinationUnreachable(_) => 502 "destination_unreachable",
        E::DestinationFailed("x".into()) => E::DestinationFailed(_) => 502 "destination_failed",
        E::DestinationTimeout("x".into()) => E::DestinationTimeout(_) => 504 "destination_timeout",
        E::ForwardOutcomeUnknown => E::ForwardOutcomeUnknown => 502 "forward_outcome_unknown",
        E::UnknownRoute => E::UnknownRoute => 404 "route_not_found",
        E::RouteNotPermitted("x".into()) => E::RouteNotPermitted(_) => 403 "route_not_permitted",
        E::InvalidRouteInput("x".into()) => E::InvalidRouteInput(_) => 422 "invalid_route_input",
        E::FreeFormForwardDisabled => E::FreeFormForwardDisabled => 403 "free_form_forward_disabled",
        E::HeaderNotAllowed("x".into()) => E::HeaderNotAllowed(_) => 400 "header_not_allowed",
        E::RenderedTooLarge(1) => E::RenderedTooLarge(_) => 413 "rendered_too_large",
        E::ResponseNotRedactable("x".into()) => E::ResponseNotRedactable(_) => 502 "response_not_redactable",
        E::InvalidUpstreamResponse("x".into()) => E::InvalidUpstreamResponse(_) => 502 "invalid_upstream_response",
        E::Unavailable("x".into()) => E::Unavailable(_) => 503 "service_unavailable",
        E::Internal("x".into()) => E::Internal(_) => 500 "internal_error",
        E::Replayed(Box::new(E::DestinationTimeout("x".into()))) => E::Replayed(_) => 504 "destination_timeout",
    }

    /// Pins the contract's table for every variant: the status, the body's
    /// `code`, `classifier` and `message`, and `x-relay-error`.
    #[tokio::test]
    async fn contract_table() {
        let samples = one_of_each();
        let variants: std::collections::HashSet<_> =
            samples.iter().map(std::mem::discriminant).collect();
        assert_eq!(variants.len(), samples.len(), "a variant has two rows");
        for e in samples {
            let (code, classifier) = contract_row(&e);
            let (s, c) = e.status_and_classifier();
            assert_eq!((s.as_u16(), c), (code, classifier), "{e:?}");
            let message = e.to_string();
            let resp = e.into_response();
            assert_eq!(resp.status().as_u16(), code, "{classifier}");
            assert_eq!(resp.headers()[&X_RELAY_ERROR], classifier);
            assert_eq!(
                resp.headers()[http::header::CONTENT_TYPE],
                "application/json"
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"code": code, "classifier": classifier, "message": message})
            );
        }
    }

    /// Writes the forward's errors once, one sample per variant, each with
    /// the answer it must get; `forward_row` is an exhaustive `match` with
    /// no `_ =>` over every variant (nested ones too), so a new one does not
    /// compile until it has a row here.
    macro_rules! forward_table {
        ($($sample:expr => $pattern:pat => $code:literal $classifier:literal $message:literal,)*) => {
            fn forward_row(e: &forward::Error) -> (u16, &'static str, &'static str) {
                match e {
                    $($pattern => ($code, $classifier, $message),)*
                }
            }

            fn one_forward_error_of_each() -> Vec<forward::Error> {
                let samples: Vec<forward::Error> = vec![$($sample.into()),*];
                let mut i = 0;
                $(
                    assert!(matches!(samples[i], $pattern), "{} is not {}", $classifier, stringify!($sample));
                    i += 1;
                )*
                assert_eq!(i, samples.len());
                samples
            }
        };
    }

    fn serde_error() -> serde_json::Error {
        serde_json::from_str::<u8>("x").unwrap_err()
    }

    use crate::body::Error as B;
    use crate::forward::Error as F;
    use ClientError as C;
    use InternalError as I;
    use UpstreamError as U;

    // The forward's errors as the wire sees them: status, classifier and
    // the message, byte for byte (sample => pattern => status classifier
    // message).
    forward_table! {
        C::FreeFormForwardDisabled => F::Client(C::FreeFormForwardDisabled) => 403 "free_form_forward_disabled"
            "free-form forwards are disabled (routes_only); use a route: POST …/forward/{route}",
        C::MethodNotAllowed("POST") => F::Client(C::MethodNotAllowed(_)) => 405 "method_not_allowed"
            "method not allowed on this route (allowed: POST)",
        C::InvalidRequest("x-relay-dry-run given more than once") => F::Client(C::InvalidRequest(_)) => 400 "invalid_request"
            "x-relay-dry-run given more than once",
        C::MalformedIdempotencyKey => F::Client(C::MalformedIdempotencyKey) => 400 "invalid_request"
            "x-idempotency-key must be 1 to 255 visible ASCII characters",
        C::IdempotencyKeyReused => F::Client(C::IdempotencyKeyReused) => 422 "idempotency_key_reused"
            "idempotency key was used with a different request",
        C::MissingHeader("x-destination-url") => F::Client(C::MissingHeader(_)) => 400 "missing_header"
            "missing header `x-destination-url`",
        C::InvalidDestination("URL must be ASCII".into()) => F::Client(C::InvalidDestination(_)) => 400 "invalid_destination"
            "invalid destination: URL must be ASCII",
        C::DestinationNotAllowed("a.example".into()) => F::Client(C::DestinationNotAllowed(_)) => 403 "destination_not_allowed"
            "destination not allowed: a.example",
        C::Body(B::TooLarge(7)) => F::Client(C::Body(B::TooLarge(_))) => 413 "body_too_large"
            "request body exceeds 7 bytes",
        C::Body(B::Unreadable("reset".into())) => F::Client(C::Body(B::Unreadable(_))) => 400 "invalid_request"
            "request body could not be read",
        C::Body(B::Serialise(serde_error())) => F::Client(C::Body(B::Serialise(_))) => 500 "internal_error"
            "internal error",
        C::InvalidTemplate("body: x".into()) => F::Client(C::InvalidTemplate(_)) => 422 "invalid_template"
            "invalid template: body: x",
        C::HeaderNotAllowed("host".into()) => F::Client(C::HeaderNotAllowed(_)) => 400 "header_not_allowed"
            "header not allowed: host",
        C::RenderedTooLarge(9) => F::Client(C::RenderedTooLarge(_)) => 413 "rendered_too_large"
            "the rendered request could exceed 9 bytes",
        C::TokenNotFound => F::Client(C::TokenNotFound) => 404 "token_not_found"
            "network token not found",
        C::PciTokenNotFound => F::Client(C::PciTokenNotFound) => 404 "pci_token_not_found"
            "PCI token not found",
        C::TokenNotActive("inactive") => F::Client(C::TokenNotActive(_)) => 424 "token_not_active"
            "network token is not active (status inactive)",
        C::SecurityCodeUnavailable => F::Client(C::SecurityCodeUnavailable) => 422 "security_code_unavailable"
            "no security code is held for this PCI token (it is single use and expires)",
        C::Reference(TakeError::NotFound) => F::Client(C::Reference(TakeError::NotFound)) => 404 "reference_not_found"
            "cryptogram reference not found or expired",
        C::Reference(TakeError::AlreadyUsed) => F::Client(C::Reference(TakeError::AlreadyUsed)) => 409 "reference_already_used"
            "cryptogram reference already used: a forward took it. If that forward got no answer (a lost connection, or a tokenrelay replica that stopped mid-request), its outcome is unknown here: ask the acquirer before paying again with a new cryptogram",
        C::Reference(TakeError::TokenMismatch) => F::Client(C::Reference(TakeError::TokenMismatch)) => 422 "reference_token_mismatch"
            "cryptogram reference belongs to another network token",
        C::UnknownRoute => F::Client(C::UnknownRoute) => 404 "route_not_found"
            "route not found",
        C::RouteNotPermitted("route r is not open to PCI-token forwards".into()) => F::Client(C::RouteNotPermitted(_)) => 403 "route_not_permitted"
            "route r is not open to PCI-token forwards",
        C::InvalidRouteInput("route r: x".into()) => F::Client(C::InvalidRouteInput(_)) => 422 "invalid_route_input"
            "invalid route input: route r: x",
        F::Upstream { error: U::Unreachable("a.example: connection failed".into()), sent: false } => F::Upstream { error: U::Unreachable(_), .. } => 502 "destination_unreachable"
            "destination unreachable: a.example: connection failed",
        F::Upstream { error: U::Failed("a.example: gone".into()), sent: true } => F::Upstream { error: U::Failed(_), .. } => 502 "destination_failed"
            "destination failed: a.example: gone",
        F::Upstream { error: U::Timeout("connecting to a.example timed out".into()), sent: false } => F::Upstream { error: U::Timeout(_), .. } => 504 "destination_timeout"
            "destination timed out: connecting to a.example timed out",
        F::Upstream { error: U::NotRedactable("a.example: gzip".into()), sent: true } => F::Upstream { error: U::NotRedactable(_), .. } => 502 "response_not_redactable"
            "response not redactable: a.example: gzip",
        F::Upstream { error: U::InvalidResponse("a.example: framing".into()), sent: true } => F::Upstream { error: U::InvalidResponse(_), .. } => 502 "invalid_upstream_response"
            "invalid upstream response: a.example: framing",
        I::Tokens(StoreError::Unavailable("db down".into())) => F::Internal(I::Tokens(StoreError::Unavailable(_))) => 503 "service_unavailable"
            "service unavailable",
        I::Tokens(StoreError::Corrupt("sealed".into())) => F::Internal(I::Tokens(StoreError::Corrupt(_))) => 500 "internal_error"
            "internal error",
        I::Tokens(StoreError::Lifecycle(crate::vault::TokenStatus::Deleted)) => F::Internal(I::Tokens(StoreError::Lifecycle(_))) => 424 "token_not_active"
            "network token is not active (status deleted)",
        I::References(ReferenceStoreError::Full) => F::Internal(I::References(ReferenceStoreError::Full)) => 503 "reference_store_full"
            "reference store is full; retry later",
        I::References(ReferenceStoreError::Unavailable("redis down".into())) => F::Internal(I::References(ReferenceStoreError::Unavailable(_))) => 503 "service_unavailable"
            "service unavailable",
        I::Body(B::Serialise(serde_error())) => F::Internal(I::Body(B::Serialise(_))) => 500 "internal_error"
            "internal error",
        I::Body(B::TooLarge(3)) => F::Internal(I::Body(B::TooLarge(_))) => 413 "body_too_large"
            "request body exceeds 3 bytes",
        I::Body(B::Unreadable("reset".into())) => F::Internal(I::Body(B::Unreadable(_))) => 400 "invalid_request"
            "request body could not be read",
        I::OutcomeUnknown => F::Internal(I::OutcomeUnknown) => 502 "forward_outcome_unknown"
            "the first request with this idempotency key may have reached the acquirer, but its answer was never recorded (tokenrelay stopped mid-flight); check the payment with the acquirer before charging again",
        I::Bug("building the request".into()) => F::Internal(I::Bug(_)) => 500 "internal_error"
            "internal error",
        F::Replayed(Box::new(F::Upstream { error: U::Failed("a.example: gone".into()), sent: true })) => F::Replayed(_) => 502 "destination_failed"
            "destination failed: a.example: gone",
    }

    /// Every forward error's answer: status, classifier, message, the
    /// `x-relay-error` header, `Allow` on a 405, and the replay mark on
    /// a replayed error only.
    #[tokio::test]
    async fn forward_errors_keep_their_answers() {
        for e in one_forward_error_of_each() {
            let (code, classifier, message) = forward_row(&e);
            let replayed = matches!(e, F::Replayed(_));
            let allow = matches!(e, F::Client(C::MethodNotAllowed(_)));
            let api = ApiError::from(e);
            assert_eq!(api.to_string(), message, "{classifier}");
            let resp = api.into_response();
            assert_eq!(resp.status().as_u16(), code, "{classifier}");
            assert_eq!(resp.headers()[&X_RELAY_ERROR], classifier);
            assert_eq!(
                resp.headers().get(&X_RELAY_IDEMPOTENT_REPLAY).is_some(),
                replayed,
                "{classifier}"
            );
            assert_eq!(
                resp.headers().get(http::header::ALLOW).is_some(),
                allow,
                "{classifier}"
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"code": code, "classifier": classifier, "message": message})
            );
        }
    }

    /// A keyed forward's recorded errors replay as first answered, marked;
    /// the record's status column is the status they answer with.
    #[tokio::test]
    async fn recorded_forward_errors_replay_as_first_answered() {
        use crate::forward::claim::{Answer, SentError};
        for kind in SentError::ALL {
            let first = ApiError::from(kind.error("a.example: x".into()));
            let (status, classifier) = first.status_and_classifier();
            assert_eq!(kind.record_status(), status, "{kind:?}");
            let Err(replayed) = Answer::Error(kind, "a.example: x".into()).replay() else {
                panic!("{kind:?} replays as an error");
            };
            let replayed = ApiError::from(replayed);
            assert_eq!(replayed.to_string(), first.to_string());
            let resp = replayed.into_response();
            assert_eq!(resp.status(), status);
            assert_eq!(resp.headers()[&X_RELAY_ERROR], classifier);
            assert_eq!(resp.headers()[&X_RELAY_IDEMPOTENT_REPLAY], "true");
        }
        let Err(unknown) = Answer::Unknown.replay() else {
            panic!("an unknown outcome replays as an error");
        };
        let resp = ApiError::from(unknown).into_response();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()[&X_RELAY_ERROR], "forward_outcome_unknown");
        assert_eq!(resp.headers()[&X_RELAY_IDEMPOTENT_REPLAY], "true");
    }

    #[test]
    fn internal_detail_never_reaches_the_message() {
        let e = ApiError::Internal("sqlite: disk I/O error at /var/secret".into());
        assert_eq!(e.to_string(), "internal error");
    }
}
