//! The HTTP surface of the main listener: routing, authentication, and one
//! file per resource.
//!
//! | route | scope | handler |
//! |---|---|---|
//! | `POST /api/network/tokens` | tokens | [`tokens::provision`] |
//! | `GET /api/network/tokens/{id}` | tokens | [`tokens::get`] |
//! | `DELETE /api/network/tokens/{id}` | tokens | [`tokens::delete`] |
//! | `POST /api/network/tokens/{id}/cryptograms` | cryptograms | [`cryptograms::create`] |
//! | `<ANY> /api/network/tokens/{id}/forward` | forward | [`crate::forward::handle`] |
//! | `POST /api/network/tokens/{id}/events` | admin | [`tokens::event`] (sandbox lifecycle) |
//! | `POST /api/pci/tokens` | tokens | [`pci::create`] |
//! | `GET /api/pci/tokens/{id}` | tokens | [`pci::get`] |
//! | `DELETE /api/pci/tokens/{id}` | tokens | [`pci::delete`] |
//! | `<ANY> /api/pci/tokens/{id}/forward` | forward | [`crate::forward::handle`] |
//!
//! Authentication runs before routing for every `/api/` path, so an
//! unauthenticated caller learns nothing about which routes or ids exist.
//! Errors from every handler become responses in [`error`].

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;

use crate::{AppState, Body};

pub mod auth;
pub mod cryptograms;
pub mod error;
pub mod idempotency;
pub mod json;
pub mod pci;
pub mod tokens;

pub use error::ApiError;

use auth::Scope;

/// Header carrying the API key.
pub const X_API_KEY: &str = "x-api-key";
/// Header carrying an idempotency key.
pub const X_IDEMPOTENCY_KEY: &str = "x-idempotency-key";

/// Which route a request matched; also the label used in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /api/network/tokens`
    ProvisionToken,
    /// `GET /api/network/tokens/{id}`
    GetToken,
    /// `DELETE /api/network/tokens/{id}`
    DeleteToken,
    /// `POST /api/network/tokens/{id}/cryptograms`
    CreateCryptogram,
    /// `* /api/network/tokens/{id}/forward`
    Forward,
    /// `POST /api/network/tokens/{id}/events` (sandbox lifecycle)
    TokenEvent,
    /// `POST /api/pci/tokens`
    CreatePciToken,
    /// `GET /api/pci/tokens/{id}`
    GetPciToken,
    /// `DELETE /api/pci/tokens/{id}`
    DeletePciToken,
    /// `* /api/pci/tokens/{id}/forward`
    ForwardPci,
}

impl Route {
    /// Stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Route::ProvisionToken => "provision_token",
            Route::GetToken => "get_token",
            Route::DeleteToken => "delete_token",
            Route::CreateCryptogram => "create_cryptogram",
            Route::Forward => "forward",
            Route::TokenEvent => "token_event",
            Route::CreatePciToken => "create_pci_token",
            Route::GetPciToken => "get_pci_token",
            Route::DeletePciToken => "delete_pci_token",
            Route::ForwardPci => "forward_pci",
        }
    }

    fn scope(self) -> Scope {
        match self {
            Route::ProvisionToken
            | Route::GetToken
            | Route::DeleteToken
            | Route::CreatePciToken
            | Route::GetPciToken
            | Route::DeletePciToken => Scope::Tokens,
            Route::CreateCryptogram => Scope::Cryptograms,
            Route::Forward | Route::ForwardPci => Scope::Forward,
            Route::TokenEvent => Scope::Admin,
        }
    }
}

/// Matches method and path; `Ok((route, id segment))`.
pub fn route<'p>(method: &Method, path: &'p str) -> Result<(Route, Option<&'p str>), ApiError> {
    let (family, rest) = if let Some(rest) = path.strip_prefix("/api/network/tokens") {
        (Family::Network, rest)
    } else if let Some(rest) = path.strip_prefix("/api/pci/tokens") {
        (Family::Pci, rest)
    } else {
        return Err(ApiError::RouteNotFound);
    };
    let mut parts = rest.split('/');
    // `rest` is "" or "/{id}[/{action}]"; the first split part is empty.
    let (lead, id, action, extra) = (parts.next(), parts.next(), parts.next(), parts.next());
    if lead != Some("") || extra.is_some() {
        return Err(ApiError::RouteNotFound);
    }
    let id = match id {
        None | Some("") if action.is_none() => None,
        Some(id) if !id.is_empty() => Some(id),
        _ => return Err(ApiError::RouteNotFound),
    };
    let route = match (family, id.is_some(), action, method) {
        (Family::Network, false, None, &Method::POST) => Route::ProvisionToken,
        (Family::Network, true, None, &Method::GET) => Route::GetToken,
        (Family::Network, true, None, &Method::DELETE) => Route::DeleteToken,
        (Family::Network, true, Some("cryptograms"), &Method::POST) => Route::CreateCryptogram,
        (Family::Network, true, Some("events"), &Method::POST) => Route::TokenEvent,
        (Family::Network, true, Some("forward"), _) => Route::Forward,
        (Family::Pci, false, None, &Method::POST) => Route::CreatePciToken,
        (Family::Pci, true, None, &Method::GET) => Route::GetPciToken,
        (Family::Pci, true, None, &Method::DELETE) => Route::DeletePciToken,
        (Family::Pci, true, Some("forward"), _) => Route::ForwardPci,
        (_, _, None | Some("cryptograms" | "events"), _) => return Err(ApiError::MethodNotAllowed),
        _ => return Err(ApiError::RouteNotFound),
    };
    Ok((route, id))
}

#[derive(Clone, Copy)]
enum Family {
    Network,
    Pci,
}

/// Everything the access log needs about a finished API request.
pub struct Outcome {
    /// The matched route, if any.
    pub route: Option<Route>,
    /// The authenticated key's name, if any.
    pub key_name: Option<String>,
    /// The response.
    pub response: Response<Body>,
}

/// Serves one request on the main listener.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Outcome {
    let path = req.uri().path().to_owned();
    if !path.starts_with("/api/") {
        return Outcome {
            route: None,
            key_name: None,
            response: ApiError::RouteNotFound.into_response(),
        };
    }
    let mut route_seen = None;
    let mut key_name = None;
    let result = async {
        let key = auth::authenticate(
            &state.config.api_keys,
            req.headers()
                .get(X_API_KEY)
                .map(|v| v.as_bytes())
                .ok_or(ApiError::Unauthorized)?,
        )
        .ok_or(ApiError::Unauthorized)?;
        key_name = Some(key.name.clone());
        let (route, id) = route(req.method(), &path)?;
        route_seen = Some(route);
        if !key.allows(route.scope()) {
            return Err(ApiError::Forbidden(route.scope()));
        }
        let id = id.map(str::to_owned);
        match route {
            Route::ProvisionToken => tokens::provision(&state, key, req).await,
            Route::GetToken => tokens::get(&state, id.as_deref()).await,
            Route::DeleteToken => tokens::delete(&state, id.as_deref()).await,
            Route::CreateCryptogram => cryptograms::create(&state, key, id.as_deref(), req).await,
            Route::Forward => {
                let id = tokens::parse_id(id.as_deref())?;
                crate::forward::handle(&state, crate::forward::Subject::NetworkToken(id), req).await
            }
            Route::ForwardPci => {
                let id = pci::parse_id(id.as_deref())?;
                crate::forward::handle(&state, crate::forward::Subject::PciToken(id), req).await
            }
            Route::TokenEvent => tokens::event(&state, id.as_deref(), req).await,
            Route::CreatePciToken => pci::create(&state, req).await,
            Route::GetPciToken => pci::get(&state, id.as_deref()).await,
            Route::DeletePciToken => pci::delete(&state, id.as_deref()).await,
        }
    }
    .await;
    Outcome {
        route: route_seen,
        key_name,
        response: result.unwrap_or_else(ApiError::into_response),
    }
}

/// Reads a request body, refusing more than `limit` bytes.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::BodyTooLarge(limit)),
        Err(_) => Err(ApiError::InvalidRequest(
            "request body could not be read".into(),
        )),
    }
}

/// Refuses early when `content-length` already says the body is too large.
pub fn check_content_length<B>(req: &Request<B>, limit: usize) -> Result<(), ApiError> {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Err(ApiError::BodyTooLarge(limit)),
        _ => Ok(()),
    }
}

/// A JSON response.
pub fn json_response<T: Serialize>(
    status: StatusCode,
    value: &T,
) -> Result<Response<Body>, ApiError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| ApiError::Internal(format!("serialising a response: {e}")))?;
    Ok(bytes_response(status, Bytes::from(bytes)))
}

/// A JSON response from serialised bytes.
pub fn bytes_response(status: StatusCode, bytes: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(bytes).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// An empty response.
pub fn empty_response(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let id = "6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11";
        assert_eq!(
            route(&Method::POST, "/api/network/tokens").unwrap().0,
            Route::ProvisionToken
        );
        assert_eq!(
            route(&Method::GET, &format!("/api/network/tokens/{id}")).unwrap(),
            (Route::GetToken, Some(id))
        );
        assert_eq!(
            route(&Method::PATCH, &format!("/api/network/tokens/{id}/forward"))
                .unwrap()
                .0,
            Route::Forward
        );
        assert!(matches!(
            route(&Method::GET, "/api/network/tokens"),
            Err(ApiError::MethodNotAllowed)
        ));
        assert!(matches!(
            route(&Method::GET, &format!("/api/network/tokens/{id}/nope")),
            Err(ApiError::RouteNotFound)
        ));
        assert!(matches!(
            route(&Method::GET, "/api/network/tokensx"),
            Err(ApiError::RouteNotFound)
        ));
    }
}
