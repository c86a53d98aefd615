//! The one place where failures become HTTP.
//!
//! Every error tokenrelay produces is `{"code", "classifier", "message"}`
//! with `x-relay-error: <classifier>` (contract §3). The mapping from
//! [`ApiError`] to status and classifier is one exhaustive `match` with no
//! catch-all arm, pinned by a unit test. Messages are written here or by the
//! layers below from names and reasons only — never from request values — so
//! no PAN, TPAN, cryptogram, CVC or key can reach a client through them.
//! Faults on our side (store down, internal bugs) answer with a fixed text;
//! their detail goes to the log.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::auth::Scope;
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
        }
    }

    /// Whether the fault is on our side (logged at error level).
    pub fn is_ours(&self) -> bool {
        matches!(self, ApiError::Unavailable(_) | ApiError::Internal(_))
    }

    /// Status, classifier and the message a client may read; a fault on
    /// our side is logged here with its detail, which the message never
    /// carries. Every error shape (native, and the compatible surfaces'
    /// own) is written from this.
    pub fn describe(&self) -> (StatusCode, &'static str, String) {
        let (status, classifier) = self.status_and_classifier();
        if self.is_ours() {
            let detail = match self {
                ApiError::Unavailable(d) | ApiError::Internal(d) => d.as_str(),
                _ => "",
            };
            tracing::error!(classifier, detail, "request failed on our side");
        }
        (status, classifier, self.to_string())
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
        if let ApiError::MethodNotAllowed(allow) = &self {
            h.insert(http::header::ALLOW, HeaderValue::from_static(allow));
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

impl From<TakeFailure> for ApiError {
    fn from(e: TakeFailure) -> Self {
        match e {
            TakeFailure::Refused(TakeError::NotFound) => ApiError::ReferenceNotFound,
            TakeFailure::Refused(TakeError::AlreadyUsed) => ApiError::ReferenceAlreadyUsed,
            TakeFailure::Refused(TakeError::TokenMismatch) => ApiError::ReferenceTokenMismatch,
            TakeFailure::Store(s) => s.into(),
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

    #[test]
    fn internal_detail_never_reaches_the_message() {
        let e = ApiError::Internal("sqlite: disk I/O error at /var/secret".into());
        assert_eq!(e.to_string(), "internal error");
    }
}
