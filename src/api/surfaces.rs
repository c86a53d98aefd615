//! Compatible surfaces (contract §12): the same vault, cryptograms and
//! references in the shapes two other providers publish, so a client
//! written against either moves to tokenrelay by changing its base URL.
//!
//! | route | scope | handler |
//! |---|---|---|
//! | `POST /cards/{card_id}/network-tokens` | tokens | [`vgs_cmp::provision`] |
//! | `DELETE /cards/{card_id}/network-tokens` | tokens | [`vgs_cmp::delete`] |
//! | `POST /cards/{card_id}/cryptogram` | cryptograms | [`vgs_cmp::cryptogram`] |
//! | `POST /cryptograms` | cryptograms | [`jpmc::cryptogram`] |
//!
//! Each surface is a thin translation: it parses its provider's request,
//! calls the services the native handlers call ([`super::tokens::new_token`],
//! [`super::tokens::delete_token`], [`super::cryptograms::issue`]) and writes
//! the answer, or the [`ApiError`], in its provider's shape. Nothing here
//! mints, checks brand rules or issues references itself.
//!
//! Common rules: the key comes as `x-api-key` or `Authorization: Bearer`
//! (same keys, same scopes), checked before the route so an unauthenticated
//! caller learns nothing; the compliance level governs as on the native
//! API — where inline cryptograms are not permitted the cryptogram field
//! carries a `cref_…` reference for the forward, and the token number is
//! masked ([`token_number`]); every error carries `x-relay-error` and the
//! native classifier. A surface switched off in `[surfaces]` is not routed
//! at all (404 `not_found`, as any unknown path).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use super::{json, ApiError, Matched, RouteKind, Trace};
use crate::auth::{self, ApiKey, Scope};
use crate::body::{check_content_length, read_body};
use crate::card::CardNumber;
use crate::config::{ComplianceLevel, Surfaces};
use crate::vault::PciTokenId;
use crate::{AppState, Body, X_RELAY_ERROR};

pub mod jpmc;
pub mod vgs_cmp;

/// A compatible surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// VGS Card Management Platform (seed 003).
    VgsCmp,
    /// J.P. Morgan `POST /cryptograms` (seed 001).
    Jpmc,
}

impl Surface {
    /// The surface whose route family `path` belongs to, if it is on.
    pub fn for_path(on: Surfaces, path: &str) -> Option<Surface> {
        if on.vgs_cmp && path.starts_with("/cards/") {
            Some(Surface::VgsCmp)
        } else if on.jpmc && (path == "/cryptograms" || path.starts_with("/cryptograms/")) {
            Some(Surface::Jpmc)
        } else {
            None
        }
    }
}

impl Surface {
    /// The operation `method` and `path` name on this surface, with the
    /// card its path names where it names one.
    pub fn route(
        self,
        method: &http::Method,
        path: &str,
    ) -> Result<Matched<OperationKind, Operation>, ApiError> {
        match self {
            Surface::VgsCmp => vgs_cmp::route(method, path),
            Surface::Jpmc => jpmc::route(method, path),
        }
    }
}

/// One operation of a surface, without its ids; its label in logs and
/// metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationKind {
    /// `POST /cards/{card_id}/network-tokens`
    VgsProvision,
    /// `DELETE /cards/{card_id}/network-tokens`
    VgsDelete,
    /// `POST /cards/{card_id}/cryptogram`
    VgsCryptogram,
    /// `POST /cryptograms`
    JpmcCryptogram,
}

impl OperationKind {
    /// Stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            OperationKind::VgsProvision => "vgs_cmp_provision",
            OperationKind::VgsDelete => "vgs_cmp_delete",
            OperationKind::VgsCryptogram => "vgs_cmp_cryptogram",
            OperationKind::JpmcCryptogram => "jpmc_cryptogram",
        }
    }

    /// The scope it needs, as its native counterpart.
    pub(crate) fn scope(self) -> Scope {
        match self {
            OperationKind::VgsProvision | OperationKind::VgsDelete => Scope::Tokens,
            OperationKind::VgsCryptogram | OperationKind::JpmcCryptogram => Scope::Cryptograms,
        }
    }
}

/// One operation of a surface with the card its path names: a VGS card is
/// a PCI token; JPMC names its network token in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `POST /cards/{card_id}/network-tokens`
    VgsProvision(PciTokenId),
    /// `DELETE /cards/{card_id}/network-tokens`
    VgsDelete(PciTokenId),
    /// `POST /cards/{card_id}/cryptogram`
    VgsCryptogram(PciTokenId),
    /// `POST /cryptograms`
    JpmcCryptogram,
}

impl Operation {
    /// The operation without its ids.
    pub fn kind(self) -> OperationKind {
        match self {
            Operation::VgsProvision(_) => OperationKind::VgsProvision,
            Operation::VgsDelete(_) => OperationKind::VgsDelete,
            Operation::VgsCryptogram(_) => OperationKind::VgsCryptogram,
            Operation::JpmcCryptogram => OperationKind::JpmcCryptogram,
        }
    }
}

/// An error on a surface: the native error, and the request field it is
/// about in the surface's own names, where one is.
#[derive(Debug)]
pub struct SurfaceError {
    /// The native error (status, classifier, message).
    pub error: ApiError,
    /// The field at fault, as the surface's client names it.
    pub field: Option<&'static str>,
}

impl From<ApiError> for SurfaceError {
    fn from(error: ApiError) -> Self {
        SurfaceError { error, field: None }
    }
}

impl From<crate::vault::StoreError> for SurfaceError {
    fn from(e: crate::vault::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl SurfaceError {
    /// An error about `field`.
    pub fn at(error: ApiError, field: &'static str) -> Self {
        SurfaceError {
            error,
            field: Some(field),
        }
    }
}

/// Serves one request of `surface`, recording what it does in `trace`.
pub async fn handle(
    state: &Arc<AppState>,
    surface: Surface,
    req: Request<Incoming>,
    trace: &mut Trace,
) -> Response<Body> {
    let Trace {
        route,
        key_name,
        audit,
    } = trace;
    // JPMC echoes `request-id` (or a fresh id) in every answer, errors too.
    let request_id = jpmc::request_identifier(req.headers());
    let result = async {
        let key = authenticate(&state.config.api_keys, req.headers())?;
        *key_name = Some(key.name.clone());
        let path = req.uri().path().to_owned();
        let matched = surface.route(req.method(), &path)?;
        *route = Some(RouteKind::Surface(matched.kind));
        let scope = matched.kind.scope();
        if !key.allows(scope) {
            return Err(ApiError::Forbidden(scope).into());
        }
        match matched.route? {
            Operation::VgsProvision(card) => vgs_cmp::provision(state, card, audit).await,
            Operation::VgsDelete(card) => vgs_cmp::delete(state, card, audit).await,
            Operation::VgsCryptogram(card) => vgs_cmp::cryptogram(state, card, req, audit).await,
            Operation::JpmcCryptogram => jpmc::cryptogram(state, &request_id, req, audit).await,
        }
    }
    .await;
    result.unwrap_or_else(|e| match surface {
        Surface::VgsCmp => vgs_cmp::error_response(e),
        Surface::Jpmc => jpmc::error_response(e, &request_id),
    })
}

/// The key from `x-api-key`, else from `Authorization: Bearer`.
fn authenticate<'k>(keys: &'k [ApiKey], headers: &http::HeaderMap) -> Result<&'k ApiKey, ApiError> {
    let presented = match headers.get(super::X_API_KEY) {
        Some(v) => v.as_bytes(),
        None => headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| auth::bearer(v.as_bytes()))
            .ok_or(ApiError::Unauthorized)?,
    };
    auth::authenticate(keys, presented).ok_or(ApiError::Unauthorized)
}

/// The token number as a merchant at `level` may see it: whole where it may
/// hold card data, else first six, `*`s and last four at the same length
/// (JPMC's own example masks with `X`s the same way).
pub fn token_number(tpan: &CardNumber, level: ComplianceLevel) -> String {
    if level.handles_card_data() {
        return tpan.expose().to_owned();
    }
    let n = tpan.expose().len();
    let mut out = String::with_capacity(n);
    out.push_str(tpan.first6());
    out.extend(std::iter::repeat_n('*', n - 10));
    out.push_str(tpan.last4());
    out
}

/// The request body as a JSON object; an empty body is `None`.
async fn body_object(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Option<Map<String, Value>>, ApiError> {
    check_content_length(&req, state.config.max_body_bytes)?;
    let body = read_body(req.into_body(), state.config.max_body_bytes).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    json::object(&body).map(Some)
}

/// A response with `content_type` and a serialised body.
fn response(status: StatusCode, content_type: &'static str, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(
        Full::new(Bytes::from(bytes))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    resp
}

/// An error response: `body` in the surface's shape, plus `x-relay-error`.
/// A 405 also names the methods the route takes, in `Allow`.
fn error(
    e: &ApiError,
    status: StatusCode,
    content_type: &'static str,
    body: &Value,
) -> Response<Body> {
    let mut resp = response(status, content_type, body);
    let h = resp.headers_mut();
    let classifier = e.status_and_classifier().1;
    h.insert(X_RELAY_ERROR.clone(), HeaderValue::from_static(classifier));
    if let ApiError::MethodNotAllowed(allow) = e {
        h.insert(http::header::ALLOW, HeaderValue::from_static(allow));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surfaces_route_only_their_families_and_only_when_on() {
        let on = Surfaces {
            vgs_cmp: true,
            jpmc: true,
        };
        assert_eq!(
            Surface::for_path(on, "/cards/x/network-tokens"),
            Some(Surface::VgsCmp)
        );
        assert_eq!(Surface::for_path(on, "/cryptograms"), Some(Surface::Jpmc));
        assert_eq!(Surface::for_path(on, "/cryptogramsx"), None);
        assert_eq!(Surface::for_path(on, "/api/network/tokens"), None);
        assert_eq!(Surface::for_path(on, "/cards"), None);
        let off = Surfaces {
            vgs_cmp: false,
            jpmc: false,
        };
        assert_eq!(Surface::for_path(off, "/cards/x/network-tokens"), None);
        assert_eq!(Surface::for_path(off, "/cryptograms"), None);
    }

    #[test]
    fn token_numbers_are_masked_at_saq_a_at_the_same_length() {
        let visa = CardNumber::parse("4895370012345678").unwrap();
        assert_eq!(
            token_number(&visa, ComplianceLevel::SaqA),
            "489537******5678"
        );
        assert_eq!(
            token_number(&visa, ComplianceLevel::SaqD),
            "4895370012345678"
        );
        let amex = CardNumber::parse("374245001234567").unwrap();
        assert_eq!(
            token_number(&amex, ComplianceLevel::SaqA),
            "374245*****4567"
        );
    }
}
