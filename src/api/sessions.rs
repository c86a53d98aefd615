//! Card-capture sessions over HTTP (contract §11): `POST /api/sessions`.
//! The `session` provisioning source that spends one is read with the
//! other card sources, in [`super::pci::card_from_source`].

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::json::rfc3339;
use super::{json, ApiError};
use crate::audit::Audit;
use crate::body::{check_content_length, json_response, read_body};
use crate::{AppState, Body};

/// `POST /api/sessions` → 201 `{id, public_key, expires_at}`. The body is
/// empty or `{}`.
pub async fn create(
    state: &AppState,
    req: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, ApiError> {
    check_content_length(&req, state.config.max_body_bytes)?;
    let body = read_body(req.into_body(), state.config.max_body_bytes).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        json::only_fields(&json::object(&body)?, &[], "")?;
    }
    let session = state.sessions.open().await?;
    audit.session = Some(session.id.clone());
    Ok(json_response(
        StatusCode::CREATED,
        &serde_json::json!({
            "id": session.id.as_str(),
            "public_key": session.jwk(),
            "expires_at": rfc3339(session.expires_at),
        }),
    )?)
}
