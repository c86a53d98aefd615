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
//! [`route`] parses the `{id}` segment once, into the id type the
//! [`Route`] variant carries, so dispatch is one exhaustive `match`; a
//! malformed id is simply not found, answered after the key's scope is
//! checked (as for a well-formed one). Errors from every handler become
//! responses in [`error`]. What a
//! handler did beyond its status (the token it created, the host it
//! forwarded to) goes into its [`Audit`], which the request's one log line
//! carries.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::audit::{Audit, Subject};
use crate::auth::{self, Scope};
use crate::body::bytes_response;
use crate::vault::{PciTokenId, TokenId};
use crate::{AppState, Body};

pub mod cryptograms;
pub mod error;
pub mod json;
pub mod pci;
pub mod sessions;
pub mod surfaces;
pub mod tokens;

pub use error::ApiError;

/// Header carrying the API key.
pub const X_API_KEY: &str = "x-api-key";

/// The OpenAPI document's path, on both listeners (no key needed).
pub const OPENAPI_PATH: &str = "/openapi.json";

/// Which route a request matched, without its ids: the label in logs and
/// metrics, the scope it needs, and the list the OpenAPI document is held
/// to. Known from the path's shape alone, so it is recorded — and the key's
/// scope checked — before any id in the path is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
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
    Surface(surfaces::OperationKind),
}

impl RouteKind {
    /// Every route, for the test that holds the OpenAPI document to the
    /// router; [`RouteKind::label`]'s exhaustive `match` is the reminder to
    /// add a new one here.
    pub const ALL: [RouteKind; 17] = [
        RouteKind::CreateSession,
        RouteKind::ForwardRoute,
        RouteKind::ForwardPciRoute,
        RouteKind::Surface(surfaces::OperationKind::VgsProvision),
        RouteKind::Surface(surfaces::OperationKind::VgsDelete),
        RouteKind::Surface(surfaces::OperationKind::VgsCryptogram),
        RouteKind::Surface(surfaces::OperationKind::JpmcCryptogram),
        RouteKind::ProvisionToken,
        RouteKind::GetToken,
        RouteKind::DeleteToken,
        RouteKind::CreateCryptogram,
        RouteKind::Forward,
        RouteKind::TokenEvent,
        RouteKind::CreatePciToken,
        RouteKind::GetPciToken,
        RouteKind::DeletePciToken,
        RouteKind::ForwardPci,
    ];

    /// Stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            RouteKind::ProvisionToken => "provision_token",
            RouteKind::GetToken => "get_token",
            RouteKind::DeleteToken => "delete_token",
            RouteKind::CreateCryptogram => "create_cryptogram",
            RouteKind::Forward => "forward",
            RouteKind::TokenEvent => "token_event",
            RouteKind::CreatePciToken => "create_pci_token",
            RouteKind::GetPciToken => "get_pci_token",
            RouteKind::DeletePciToken => "delete_pci_token",
            RouteKind::ForwardPci => "forward_pci",
            RouteKind::CreateSession => "create_session",
            RouteKind::ForwardRoute => "forward_route",
            RouteKind::ForwardPciRoute => "forward_pci_route",
            RouteKind::Surface(op) => op.label(),
        }
    }

    fn scope(self) -> Scope {
        match self {
            RouteKind::ProvisionToken
            | RouteKind::GetToken
            | RouteKind::DeleteToken
            | RouteKind::CreatePciToken
            | RouteKind::GetPciToken
            | RouteKind::DeletePciToken
            | RouteKind::CreateSession => Scope::Tokens,
            RouteKind::CreateCryptogram => Scope::Cryptograms,
            RouteKind::Forward
            | RouteKind::ForwardPci
            | RouteKind::ForwardRoute
            | RouteKind::ForwardPciRoute => Scope::Forward,
            RouteKind::TokenEvent => Scope::Admin,
            RouteKind::Surface(op) => op.scope(),
        }
    }
}

/// An `/api/` route with the typed ids its path names, as [`route`] makes
/// it: dispatch is one exhaustive `match` with nothing left to parse. (The
/// compatible surfaces route to their own [`surfaces::Operation`], so no
/// variant here stands for them.) `'p` is the path a route name is read
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'p> {
    /// `POST /api/network/tokens`
    ProvisionToken,
    /// `GET /api/network/tokens/{id}`
    GetToken(TokenId),
    /// `DELETE /api/network/tokens/{id}`
    DeleteToken(TokenId),
    /// `POST /api/network/tokens/{id}/cryptograms`
    CreateCryptogram(TokenId),
    /// `* /api/network/tokens/{id}/forward`
    Forward(TokenId),
    /// `POST /api/network/tokens/{id}/events` (sandbox lifecycle)
    TokenEvent(TokenId),
    /// `POST /api/pci/tokens`
    CreatePciToken,
    /// `GET /api/pci/tokens/{id}`
    GetPciToken(PciTokenId),
    /// `DELETE /api/pci/tokens/{id}`
    DeletePciToken(PciTokenId),
    /// `* /api/pci/tokens/{id}/forward`
    ForwardPci(PciTokenId),
    /// `POST /api/sessions`
    CreateSession,
    /// `POST /api/network/tokens/{id}/forward/{route}`: the token and the
    /// route's name (looked up in the config by the forward).
    ForwardRoute(TokenId, &'p str),
    /// `POST /api/pci/tokens/{id}/forward/{route}`
    ForwardPciRoute(PciTokenId, &'p str),
}

impl Route<'_> {
    /// The route without its ids.
    pub fn kind(self) -> RouteKind {
        match self {
            Route::ProvisionToken => RouteKind::ProvisionToken,
            Route::GetToken(_) => RouteKind::GetToken,
            Route::DeleteToken(_) => RouteKind::DeleteToken,
            Route::CreateCryptogram(_) => RouteKind::CreateCryptogram,
            Route::Forward(_) => RouteKind::Forward,
            Route::TokenEvent(_) => RouteKind::TokenEvent,
            Route::CreatePciToken => RouteKind::CreatePciToken,
            Route::GetPciToken(_) => RouteKind::GetPciToken,
            Route::DeletePciToken(_) => RouteKind::DeletePciToken,
            Route::ForwardPci(_) => RouteKind::ForwardPci,
            Route::CreateSession => RouteKind::CreateSession,
            Route::ForwardRoute(..) => RouteKind::ForwardRoute,
            Route::ForwardPciRoute(..) => RouteKind::ForwardPciRoute,
        }
    }

    /// The token the path names, if it names one.
    fn subject(self) -> Option<Subject> {
        match self {
            Route::ProvisionToken | Route::CreatePciToken | Route::CreateSession => None,
            Route::GetToken(id)
            | Route::DeleteToken(id)
            | Route::CreateCryptogram(id)
            | Route::Forward(id)
            | Route::TokenEvent(id)
            | Route::ForwardRoute(id, _) => Some(Subject::NetworkToken(id)),
            Route::GetPciToken(id)
            | Route::DeletePciToken(id)
            | Route::ForwardPci(id)
            | Route::ForwardPciRoute(id, _) => Some(Subject::PciToken(id)),
        }
    }
}

/// What a router matched: the route's kind, and the route with its typed
/// ids — or, where an id in the path is malformed, the error it answers
/// (the id's "not found", as for an unknown one). The two are apart so the
/// kind is recorded and the key's scope checked before an id is judged, as
/// for a well-formed id: a key without the scope learns nothing about ids.
#[derive(Debug)]
pub struct Matched<K, R> {
    /// Which route, without ids.
    pub kind: K,
    /// The route with its ids, whose kind is `kind`.
    pub route: Result<R, ApiError>,
}

/// Matches method and path. `Err`: nothing is routed there (404
/// `not_found`, or 405 with the methods the path takes).
pub fn route<'p>(
    method: &Method,
    path: &'p str,
) -> Result<Matched<RouteKind, Route<'p>>, ApiError> {
    let matched = |kind, route| Ok(Matched { kind, route });
    if path == "/api/sessions" {
        return match *method {
            Method::POST => matched(RouteKind::CreateSession, Ok(Route::CreateSession)),
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
    // A malformed id is simply not found.
    let token = |id: &str| TokenId::parse(id).ok_or(ApiError::TokenNotFound);
    if let (Some(id), Some("forward"), Some(name)) = (id, action, extra) {
        if id.is_empty() || name.is_empty() {
            return Err(ApiError::RouteNotFound);
        }
        return match family {
            Family::Network => matched(
                RouteKind::ForwardRoute,
                token(id).map(|id| Route::ForwardRoute(id, name)),
            ),
            Family::Pci => matched(
                RouteKind::ForwardPciRoute,
                pci::parse_id(id).map(|id| Route::ForwardPciRoute(id, name)),
            ),
        };
    }
    if extra.is_some() {
        return Err(ApiError::RouteNotFound);
    }
    let id = match id {
        None | Some("") if action.is_none() => None,
        Some(id) if !id.is_empty() => Some(id),
        _ => return Err(ApiError::RouteNotFound),
    };
    use RouteKind as K;
    match (family, id, action, method) {
        (Family::Network, None, None, &Method::POST) => {
            matched(K::ProvisionToken, Ok(Route::ProvisionToken))
        }
        (Family::Network, Some(id), None, &Method::GET) => {
            matched(K::GetToken, token(id).map(Route::GetToken))
        }
        (Family::Network, Some(id), None, &Method::DELETE) => {
            matched(K::DeleteToken, token(id).map(Route::DeleteToken))
        }
        (Family::Network, Some(id), Some("cryptograms"), &Method::POST) => {
            matched(K::CreateCryptogram, token(id).map(Route::CreateCryptogram))
        }
        (Family::Network, Some(id), Some("events"), &Method::POST) => {
            matched(K::TokenEvent, token(id).map(Route::TokenEvent))
        }
        (Family::Network, Some(id), Some("forward"), _) => {
            matched(K::Forward, token(id).map(Route::Forward))
        }
        (Family::Pci, None, None, &Method::POST) => {
            matched(K::CreatePciToken, Ok(Route::CreatePciToken))
        }
        (Family::Pci, Some(id), None, &Method::GET) => {
            matched(K::GetPciToken, pci::parse_id(id).map(Route::GetPciToken))
        }
        (Family::Pci, Some(id), None, &Method::DELETE) => matched(
            K::DeletePciToken,
            pci::parse_id(id).map(Route::DeletePciToken),
        ),
        (Family::Pci, Some(id), Some("forward"), _) => {
            matched(K::ForwardPci, pci::parse_id(id).map(Route::ForwardPci))
        }
        (_, Some(_), Some("cryptograms" | "events"), _) | (_, None, None, _) => {
            Err(ApiError::MethodNotAllowed("POST"))
        }
        (_, Some(_), None, _) => Err(ApiError::MethodNotAllowed("GET, DELETE")),
        _ => Err(ApiError::RouteNotFound),
    }
}

/// The token family an `/api/` path names.
#[derive(Clone, Copy)]
enum Family {
    Network,
    Pci,
}

/// What the access line needs about an API request, filled in while it
/// runs. The caller owns it, so a request cut short (a drain deadline,
/// a panic) still leaves a line with what it had done so far.
#[derive(Debug, Default)]
pub struct Trace {
    /// The matched route, if any.
    pub route: Option<RouteKind>,
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
            bytes_response(StatusCode::OK, (state.openapi)())
        } else {
            ApiError::MethodNotAllowed("GET").into_response()
        };
    }
    if let Some(surface) = surfaces::Surface::for_path(state.config.surfaces, &path) {
        return Box::pin(surfaces::handle(&state, surface, req, trace)).await;
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
        let matched = route(req.method(), &path)?;
        *route_seen = Some(matched.kind);
        let scope = matched.kind.scope();
        if !key.allows(scope) {
            return Err(ApiError::Forbidden(scope));
        }
        let route = matched.route?;
        audit.subject = route.subject();
        let a = &mut *audit;
        // Each handler's future is boxed. Inline, this match would be as
        // large as the largest of them (13 KB), and the request's task
        // would copy that much several times per request (spawn, output
        // slot, read-out); boxed, the one handler that runs is built once
        // on the heap and never moved.
        match route {
            Route::ProvisionToken => Box::pin(tokens::provision(&state, key, req, a)).await,
            Route::GetToken(id) => Box::pin(tokens::get(&state, id)).await,
            Route::DeleteToken(id) => Box::pin(tokens::delete(&state, id)).await,
            Route::CreateCryptogram(id) => {
                Box::pin(cryptograms::create(&state, key, id, req, a)).await
            }
            Route::TokenEvent(id) => Box::pin(tokens::event(&state, id, req, a)).await,
            Route::Forward(id) => {
                let subject = Subject::NetworkToken(id);
                Ok(Box::pin(crate::forward::handle(&state, key, subject, req, a)).await?)
            }
            Route::ForwardPci(id) => {
                let subject = Subject::PciToken(id);
                Ok(Box::pin(crate::forward::handle(&state, key, subject, req, a)).await?)
            }
            Route::ForwardRoute(id, name) => {
                let subject = Subject::NetworkToken(id);
                let result = Box::pin(crate::forward::route::handle(
                    &state, key, subject, name, req, a,
                ))
                .await
                .map_err(ApiError::from);
                route_forwarded(&state, a, result)
            }
            Route::ForwardPciRoute(id, name) => {
                let subject = Subject::PciToken(id);
                let result = Box::pin(crate::forward::route::handle(
                    &state, key, subject, name, req, a,
                ))
                .await
                .map_err(ApiError::from);
                route_forwarded(&state, a, result)
            }
            Route::CreatePciToken => Box::pin(pci::create(&state, req, a)).await,
            Route::GetPciToken(id) => Box::pin(pci::get(&state, id)).await,
            Route::DeletePciToken(id) => Box::pin(pci::delete(&state, id)).await,
            Route::CreateSession => Box::pin(sessions::create(&state, req, a)).await,
        }
    }
    .await;
    result.unwrap_or_else(ApiError::into_response)
}

/// Counts a route forward under its route (when one was found) and the
/// status it answers.
fn route_forwarded(
    state: &AppState,
    audit: &Audit,
    result: Result<Response<Body>, ApiError>,
) -> Result<Response<Body>, ApiError> {
    if let Some(route) = &audit.forward_route {
        let status = match &result {
            Ok(r) => r.status(),
            Err(e) => e.status_and_classifier().0,
        };
        state.metrics.count_route_forward(route, status.as_u16());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_route_once() {
        // Exhaustive, no `_`: a new route fails to compile here until it
        // is given a place, and then fails the assertion until it is in ALL.
        fn index(r: RouteKind) -> usize {
            match r {
                RouteKind::ProvisionToken => 0,
                RouteKind::GetToken => 1,
                RouteKind::DeleteToken => 2,
                RouteKind::CreateCryptogram => 3,
                RouteKind::Forward => 4,
                RouteKind::TokenEvent => 5,
                RouteKind::CreatePciToken => 6,
                RouteKind::GetPciToken => 7,
                RouteKind::DeletePciToken => 8,
                RouteKind::ForwardPci => 9,
                RouteKind::ForwardRoute => 14,
                RouteKind::ForwardPciRoute => 15,
                RouteKind::CreateSession => 16,
                RouteKind::Surface(op) => match op {
                    surfaces::OperationKind::VgsProvision => 10,
                    surfaces::OperationKind::VgsDelete => 11,
                    surfaces::OperationKind::VgsCryptogram => 12,
                    surfaces::OperationKind::JpmcCryptogram => 13,
                },
            }
        }
        let mut seen = [false; RouteKind::ALL.len()];
        for r in RouteKind::ALL {
            assert!(!seen[index(r)], "{} twice in RouteKind::ALL", r.label());
            seen[index(r)] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    /// The route `method` and `path` reach, with its ids; its kind agrees.
    fn routed<'p>(method: &Method, path: &'p str) -> Route<'p> {
        let m = route(method, path).unwrap();
        let r = m.route.unwrap();
        assert_eq!(r.kind(), m.kind, "{method} {path}");
        r
    }

    /// The kind of a route whose id is malformed, and the error it answers.
    fn unparsed(method: &Method, path: &str) -> (RouteKind, ApiError) {
        let m = route(method, path).unwrap();
        (m.kind, m.route.unwrap_err())
    }

    #[test]
    fn routes() {
        let id = "6f1c2a9e-9a43-4a53-9f35-4b1b2d6f5c11";
        let token = TokenId::parse(id).unwrap();
        let pci = pci::parse_id(id).unwrap();
        assert_eq!(
            routed(&Method::POST, "/api/network/tokens"),
            Route::ProvisionToken
        );
        let one = format!("/api/network/tokens/{id}");
        assert_eq!(routed(&Method::GET, &one), Route::GetToken(token));
        assert_eq!(routed(&Method::DELETE, &one), Route::DeleteToken(token));
        assert_eq!(
            routed(&Method::POST, &format!("{one}/cryptograms")),
            Route::CreateCryptogram(token)
        );
        assert_eq!(
            routed(&Method::POST, &format!("{one}/events")),
            Route::TokenEvent(token)
        );
        assert_eq!(
            routed(&Method::PATCH, &format!("{one}/forward")),
            Route::Forward(token)
        );
        assert_eq!(
            routed(&Method::POST, "/api/pci/tokens"),
            Route::CreatePciToken
        );
        let card = format!("/api/pci/tokens/{id}");
        assert_eq!(routed(&Method::GET, &card), Route::GetPciToken(pci));
        assert_eq!(routed(&Method::DELETE, &card), Route::DeletePciToken(pci));
        assert_eq!(
            routed(&Method::PUT, &format!("{card}/forward")),
            Route::ForwardPci(pci)
        );
        assert!(matches!(
            route(&Method::GET, "/api/network/tokens"),
            Err(ApiError::MethodNotAllowed("POST"))
        ));
        assert!(matches!(
            route(&Method::GET, &format!("/api/network/tokens/{id}/nope")),
            Err(ApiError::RouteNotFound)
        ));
        assert_eq!(routed(&Method::POST, "/api/sessions"), Route::CreateSession);
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
        let forward_route = format!("/api/network/tokens/{id}/forward/adyen-payments");
        assert_eq!(
            routed(&Method::POST, &forward_route),
            Route::ForwardRoute(token, "adyen-payments")
        );
        assert_eq!(
            routed(&Method::POST, &format!("/api/pci/tokens/{id}/forward/x")),
            Route::ForwardPciRoute(pci, "x")
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

    #[test]
    fn a_malformed_id_keeps_its_route_kind_and_is_not_found() {
        for (method, path, kind) in [
            (Method::GET, "/api/network/tokens/x", RouteKind::GetToken),
            (
                Method::DELETE,
                "/api/network/tokens/x",
                RouteKind::DeleteToken,
            ),
            (
                Method::POST,
                "/api/network/tokens/x/cryptograms",
                RouteKind::CreateCryptogram,
            ),
            (
                Method::POST,
                "/api/network/tokens/x/events",
                RouteKind::TokenEvent,
            ),
            (
                Method::GET,
                "/api/network/tokens/x/forward",
                RouteKind::Forward,
            ),
            (
                Method::POST,
                "/api/network/tokens/x/forward/r",
                RouteKind::ForwardRoute,
            ),
        ] {
            let (k, e) = unparsed(&method, path);
            assert_eq!(k, kind, "{method} {path}");
            assert!(matches!(e, ApiError::TokenNotFound), "{method} {path}");
        }
        for (method, path, kind) in [
            (Method::GET, "/api/pci/tokens/x", RouteKind::GetPciToken),
            (
                Method::DELETE,
                "/api/pci/tokens/x",
                RouteKind::DeletePciToken,
            ),
            (
                Method::POST,
                "/api/pci/tokens/x/forward",
                RouteKind::ForwardPci,
            ),
            (
                Method::POST,
                "/api/pci/tokens/x/forward/r",
                RouteKind::ForwardPciRoute,
            ),
        ] {
            let (k, e) = unparsed(&method, path);
            assert_eq!(k, kind, "{method} {path}");
            assert!(matches!(e, ApiError::PciTokenNotFound), "{method} {path}");
        }
    }
}
