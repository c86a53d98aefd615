//! The admin listener (`admin_listen`), for the orchestrator and Prometheus:
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 when the stores (vault, references) answer, else 503 |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /openapi.json` | this listener's OpenAPI 3.1 document |
//!
//! It carries no API and no secrets; keep it on a pod-local address.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::{AppState, Body};

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
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

/// Serves one admin request.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
        resp.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET"));
        return resp;
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let (tokens, references) = tokio::join!(state.tokens.ping(), state.references.ping());
            let mut down = Vec::new();
            if let Err(e) = tokens {
                tracing::warn!(error = %e, "not ready: token store");
                down.push("token store unavailable\n");
            }
            if let Err(e) = references {
                tracing::warn!(error = %e, "not ready: reference store");
                down.push("reference store unavailable\n");
            }
            if down.is_empty() {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", down.concat())
            }
        }
        "/metrics" => {
            state
                .metrics
                .reference_cache_size
                .set(state.references.len() as i64);
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(),
            )
        }
        crate::api::OPENAPI_PATH => {
            crate::body::bytes_response(StatusCode::OK, crate::openapi::admin_document())
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
