//! Request and response bodies as plain HTTP: reading a body under a size
//! limit, refusing early when `content-length` already exceeds it, and
//! building JSON and empty responses.
//!
//! Below both `api` and `forward`, which both use it; it knows neither's
//! error type (so it does not even link to them). Its [`Error`] says only
//! which of three things went wrong, and `api::error` turns it into HTTP.
//! Nothing here ever looks at what a body contains, so no error can carry
//! a card number.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;

use crate::Body;

/// Why a body could not be read or a response built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body is (or declares itself) larger than the limit, in bytes:
    /// the client's fault.
    #[error("body exceeds {0} bytes")]
    TooLarge(usize),
    /// The connection failed while the body was being read: the client's
    /// side (a reset, a malformed chunk), never its bytes.
    #[error("request body could not be read")]
    Unreadable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A response value did not serialise: ours.
    #[error("serialising a response: {0}")]
    Serialise(#[source] serde_json::Error),
}

/// Reads a request body, refusing more than `limit` bytes.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Error> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Error::TooLarge(limit)),
        Err(e) => Err(Error::Unreadable(e)),
    }
}

/// Refuses early when `content-length` already says the body is too large.
pub fn check_content_length<B>(req: &Request<B>, limit: usize) -> Result<(), Error> {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Err(Error::TooLarge(limit)),
        _ => Ok(()),
    }
}

/// A JSON response.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Result<Response<Body>, Error> {
    let bytes = serde_json::to_vec(value).map_err(Error::Serialise)?;
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
