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
//! | `POST /api/sessions` | tokens | [`sessions::create`] |
//! | `POST /api/network/tokens/{id}/forward/{route}` | forward | [`crate::forward::route::handle`] |
//! | `POST /api/pci/tokens/{id}/forward/{route}` | forward | [`crate::forward::route::handle`] |
//!
//! The compatible surfaces (contract §12: `/cards/…` in VGS CMP's shape,
//! `POST /cryptograms` in J.P. Morgan's) are a separate route family,
//! dispatched to [`surfaces`] before the `/api/` router and listed there.
//!
//! Authentication runs before routing for every `/api/` path, so an
//! unauthenticated caller learns nothing about which routes or ids exist.
//! The `{id}` segment is parsed here, once: a malformed id is simply not
//! found. Errors from every handler become responses in [`error`]. What a
//! handler did beyond its status (the token it created, the host it
//! forwarded to) goes into its [`Audit`], which the request's one log line
//! carries.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;

use crate::template::Namespace;
use crate::vault::{PciTokenId, TokenId};
use crate::{AppState, Body};

pub mod auth;
pub mod cryptograms;
pub mod error;
pub mod idempotency;
pub mod json;
pub mod pci;
pub mod sessions;
pub mod surfaces;
pub mod tokens;

pub use error::ApiError;

use auth::Scope;

/// Header carrying the API key.
pub const X_API_KEY: &str = "x-api-key";
/// Header carrying an idempotency key.
pub const X_IDEMPOTENCY_KEY: &str = "x-idempotency-key";

/// The OpenAPI document's path, on both listeners (no key needed).
pub const OPENAPI_PATH: &str = "/openapi.json";

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
    /// `POST /api/sessions`
    CreateSession,
    /// `POST /api/network/tokens/{id}/forward/{route}`
    ForwardRoute,
    /// `POST /api/pci/tokens/{id}/forward/{route}`
    ForwardPciRoute,
    /// A compatible-surface operation (contract §12).
    Surface(surfaces::Operation),
}

impl Route {
    /// Every route, for the test that holds the OpenAPI document to the
    /// router; [`Route::label`]'s exhaustive `match` is the reminder to add
    /// a new one here.
    pub const ALL: [Route; 17] = [
        Route::CreateSession,
        Route::ForwardRoute,
        Route::ForwardPciRoute,
        Route::Surface(surfaces::Operation::VgsProvision),
        Route::Surface(surfaces::Operation::VgsDelete),
        Route::Surface(surfaces::Operation::VgsCryptogram),
        Route::Surface(surfaces::Operation::JpmcCryptogram),
        Route::ProvisionToken,
        Route::GetToken,
        Route::DeleteToken,
        Route::CreateCryptogram,
        Route::Forward,
        Route::TokenEvent,
        Route::CreatePciToken,
        Route::GetPciToken,
        Route::DeletePciToken,
        Route::ForwardPci,
    ];

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
            Route::CreateSession => "create_session",
            Route::ForwardRoute => "forward_route",
            Route::ForwardPciRoute => "forward_pci_route",
            Route::Surface(op) => op.label(),
        }
    }

    fn family(self) -> Family {
        match self {
            Route::ProvisionToken
            | Route::GetToken
            | Route::DeleteToken
            | Route::CreateCryptogram
            | Route::Forward
            | Route::ForwardRoute
            | Route::TokenEvent
            // No `{id}` segment: the family is never asked for.
            | Route::CreateSession => Family::Network,
            Route::CreatePciToken
            | Route::GetPciToken
            | Route::DeletePciToken
            | Route::ForwardPci
            | Route::ForwardPciRoute => Family::Pci,
            Route::Surface(op) => op.family(),
        }
    }

    fn scope(self) -> Scope {
        match self {
            Route::ProvisionToken
            | Route::GetToken
            | Route::DeleteToken
            | Route::CreatePciToken
            | Route::GetPciToken
            | Route::DeletePciToken
            | Route::CreateSession => Scope::Tokens,
            Route::CreateCryptogram => Scope::Cryptograms,
            Route::Forward | Route::ForwardPci | Route::ForwardRoute | Route::ForwardPciRoute => {
                Scope::Forward
            }
            Route::TokenEvent => Scope::Admin,
            Route::Surface(op) => op.scope(),
        }
    }
}

/// Matches method and path; `Ok((route, id segment))`.
pub fn route<'p>(method: &Method, path: &'p str) -> Result<(Route, Option<&'p str>), ApiError> {
    if path == "/api/sessions" {
        return match *method {
            Method::POST => Ok((Route::CreateSession, None)),
            _ => Err(ApiError::MethodNotAllowed("POST")),
        };
    }
    let (family, rest) = if let Some(rest) = path.strip_prefix("/api/network/tokens") {
        (Family::Network, rest)
    } else if let Some(rest) = path.strip_prefix("/api/pci/tokens") {
        (Family::Pci, rest)
    } else {
        return Err(ApiError::RouteNotFound);
    };
    let mut parts = rest.split('/');
    // `rest` is "" or "/{id}[/{action}[/{route}]]"; the first split part is empty.
    let (lead, id, action, extra) = (parts.next(), parts.next(), parts.next(), parts.next());
    if lead != Some("") || parts.next().is_some() {
        return Err(ApiError::RouteNotFound);
    }
    if let (Some(id), Some("forward"), Some(name)) = (id, action, extra) {
        if id.is_empty() || name.is_empty() {
            return Err(ApiError::RouteNotFound);
        }
        let route = match family {
            Family::Network => Route::ForwardRoute,
            Family::Pci => Route::ForwardPciRoute,
        };
        return Ok((route, Some(id)));
    }
    if extra.is_some() {
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
        (_, true, Some("cryptograms" | "events"), _) | (_, false, None, _) => {
            return Err(ApiError::MethodNotAllowed("POST"))
        }
        (_, true, None, _) => return Err(ApiError::MethodNotAllowed("GET, DELETE")),
        _ => return Err(ApiError::RouteNotFound),
    };
    Ok((route, id))
}

#[derive(Clone, Copy)]
pub(crate) enum Family {
    Network,
    Pci,
}

/// Whom a request is about: the token in its path, or the one it created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A network token.
    NetworkToken(TokenId),
    /// A PCI token (FPAN fallback).
    PciToken(PciTokenId),
}

impl Subject {
    /// The `{id}` path segment of a route in `family`; a malformed id is
    /// not found.
    fn parse(family: Family, id: &str) -> Result<Subject, ApiError> {
        match family {
            Family::Network => TokenId::parse(id)
                .map(Subject::NetworkToken)
                .ok_or(ApiError::TokenNotFound),
            Family::Pci => pci::parse_id(id).map(Subject::PciToken),
        }
    }

    /// A forward for a network token spends a cryptogram reference.
    pub(crate) fn needs_reference(self) -> bool {
        matches!(self, Subject::NetworkToken(_))
    }

    /// The placeholder namespace a forward for this subject renders.
    pub(crate) fn namespace(self) -> Namespace {
        match self {
            Subject::NetworkToken(_) => Namespace::NetworkToken,
            Subject::PciToken(_) => Namespace::PciToken,
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::NetworkToken(id) => write!(f, "network_token:{id}"),
            Subject::PciToken(id) => write!(f, "pci_token:{id}"),
        }
    }
}

/// What a request did beyond its route and status, for its one log line.
/// Handlers fill in what applies; nothing here is secret (a card number
/// only ever as its masked `Display`).
#[derive(Debug, Default)]
pub struct Audit {
    /// The token the request is about: from the path, or the one created.
    pub subject: Option<Subject>,
    /// The card scheme of a provisioned token.
    pub scheme: Option<&'static str>,
    /// The provisioned card, masked (first6…last4).
    pub card: Option<String>,
    /// A PCI token store: whether the card was new.
    pub created: Option<bool>,
    /// A cryptogram's kind.
    pub kind: Option<&'static str>,
    /// A cryptogram's delivery: `inline` or `reference`.
    pub mode: Option<&'static str>,
    /// A lifecycle event applied to a token.
    pub change: Option<&'static str>,
    /// A forward's destination host.
    pub destination_host: Option<String>,
    /// The card-capture session a request opened or spent (not a secret).
    pub session: Option<crate::session::SessionId>,
    /// A route forward's route name (from the config).
    pub forward_route: Option<String>,
    /// A forward's request was handed to the upstream connection: from
    /// here on the acquirer may have it, whatever happens to the client.
    pub sent_upstream: bool,
}

/// What the access line needs about an API request, filled in while it
/// runs. The caller owns it, so a request cut short (a drain deadline,
/// a panic) still leaves a line with what it had done so far.
#[derive(Debug, Default)]
pub struct Trace {
    /// The matched route, if any.
    pub route: Option<Route>,
    /// The authenticated key's name, if any.
    pub key_name: Option<String>,
    /// What the handler did.
    pub audit: Audit,
}

/// Serves one request on the main listener, recording what it does in
/// `trace` as it goes.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    trace: &mut Trace,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path == OPENAPI_PATH {
        return if req.method() == Method::GET {
            bytes_response(StatusCode::OK, crate::openapi::main_document())
        } else {
            ApiError::MethodNotAllowed("GET").into_response()
        };
    }
    if let Some(surface) = surfaces::Surface::for_path(state.config.surfaces, &path) {
        return surfaces::handle(&state, surface, req, trace).await;
    }
    let Trace {
        route: route_seen,
        key_name,
        audit,
    } = trace;
    if !path.starts_with("/api/") {
        return ApiError::RouteNotFound.into_response();
    }
    let result = async {
        let key = auth::authenticate(
            &state.config.api_keys,
            req.headers()
                .get(X_API_KEY)
                .map(|v| v.as_bytes())
                .ok_or(ApiError::Unauthorized)?,
        )
        .ok_or(ApiError::Unauthorized)?;
        *key_name = Some(key.name.clone());
        let (route, id) = route(req.method(), &path)?;
        *route_seen = Some(route);
        if !key.allows(route.scope()) {
            return Err(ApiError::Forbidden(route.scope()));
        }
        audit.subject = id
            .map(|id| Subject::parse(route.family(), id))
            .transpose()?;
        let a = &mut *audit;
        match (route, a.subject) {
            (Route::ProvisionToken, None) => tokens::provision(&state, key, req, a).await,
            (Route::GetToken, Some(Subject::NetworkToken(id))) => tokens::get(&state, id).await,
            (Route::DeleteToken, Some(Subject::NetworkToken(id))) => {
                tokens::delete(&state, id).await
            }
            (Route::CreateCryptogram, Some(Subject::NetworkToken(id))) => {
                cryptograms::create(&state, key, id, req, a).await
            }
            (Route::TokenEvent, Some(Subject::NetworkToken(id))) => {
                tokens::event(&state, id, req, a).await
            }
            (Route::Forward | Route::ForwardPci, Some(subject)) => {
                crate::forward::handle(&state, key, subject, req, a).await
            }
            (Route::ForwardRoute | Route::ForwardPciRoute, Some(subject)) => {
                // The route name is the last path segment (see `route`).
                let name = path.rsplit('/').next().unwrap_or_default();
                crate::forward::route::handle(&state, key, subject, name, req, a).await
            }
            (Route::CreatePciToken, None) => pci::create(&state, req, a).await,
            (Route::GetPciToken, Some(Subject::PciToken(id))) => pci::get(&state, id).await,
            (Route::DeletePciToken, Some(Subject::PciToken(id))) => pci::delete(&state, id).await,
            (Route::CreateSession, None) => sessions::create(&state, req, a).await,
            _ => Err(ApiError::Internal(format!(
                "route {} matched with a mismatched id",
                route.label()
            ))),
        }
    }
    .await;
    result.unwrap_or_else(ApiError::into_response)
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
    fn all_lists_every_route_once() {
        // Exhaustive, no `_`: a new route fails to compile here until it
        // is given a place, and then fails the assertion until it is in ALL.
        fn index(r: Route) -> usize {
            match r {
                Route::ProvisionToken => 0,
                Route::GetToken => 1,
                Route::DeleteToken => 2,
                Route::CreateCryptogram => 3,
                Route::Forward => 4,
                Route::TokenEvent => 5,
                Route::CreatePciToken => 6,
                Route::GetPciToken => 7,
                Route::DeletePciToken => 8,
                Route::ForwardPci => 9,
                Route::ForwardRoute => 14,
                Route::ForwardPciRoute => 15,
                Route::CreateSession => 16,
                Route::Surface(op) => match op {
                    surfaces::Operation::VgsProvision => 10,
                    surfaces::Operation::VgsDelete => 11,
                    surfaces::Operation::VgsCryptogram => 12,
                    surfaces::Operation::JpmcCryptogram => 13,
                },
            }
        }
        let mut seen = [false; Route::ALL.len()];
        for r in Route::ALL {
            assert!(!seen[index(r)], "{} twice in Route::ALL", r.label());
            seen[index(r)] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

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
            Err(ApiError::MethodNotAllowed("POST"))
        ));
        assert!(matches!(
            route(&Method::GET, &format!("/api/network/tokens/{id}/nope")),
            Err(ApiError::RouteNotFound)
        ));
        assert_eq!(
            route(&Method::POST, "/api/sessions").unwrap(),
            (Route::CreateSession, None)
        );
        assert!(matches!(
            route(&Method::GET, "/api/sessions"),
            Err(ApiError::MethodNotAllowed(_))
        ));
        assert!(matches!(
            route(&Method::POST, "/api/sessions/x"),
            Err(ApiError::RouteNotFound)
        ));
        assert!(matches!(
            route(&Method::GET, "/api/network/tokensx"),
            Err(ApiError::RouteNotFound)
        ));
        assert_eq!(
            route(
                &Method::POST,
                &format!("/api/network/tokens/{id}/forward/adyen-payments")
            )
            .unwrap(),
            (Route::ForwardRoute, Some(id))
        );
        assert_eq!(
            route(&Method::POST, &format!("/api/pci/tokens/{id}/forward/x"))
                .unwrap()
                .0,
            Route::ForwardPciRoute
        );
        for bad in [
            format!("/api/network/tokens/{id}/forward/"),
            format!("/api/network/tokens/{id}/forward/a/b"),
            format!("/api/network/tokens/{id}/cryptograms/a"),
        ] {
            assert!(
                matches!(route(&Method::POST, &bad), Err(ApiError::RouteNotFound)),
                "{bad}"
            );
        }
    }
}
