//! `x-idempotency-key`: the same key with the same request replays the first
//! response; the same key with another request is refused with 422
//! `idempotency_key_reused`.
//!
//! Records are scoped by API key name and route, keyed by the client's key,
//! and remember a SHA-256 fingerprint of the request (method, path, body).
//! Concurrent requests with one key run the handler once: the others wait
//! for the first and replay its answer. A failed request records nothing,
//! so a retry after an error runs again.
//!
//! Records live in memory for `idempotency_ttl` (default 24 h), bounded in
//! bytes ([`MAX_CACHE_BYTES`]: an inline cryptogram's record carries a TPAN
//! and a cryptogram, and a sidecar's pod has little memory). A record
//! evicted from memory is still replayed from the vault's durable copy.
//! Whether a record is live is decided on the state's clock
//! ([`crate::clock`]), in memory and in the vault alike; moka's own
//! `time_to_live` (process time) only frees the memory.
//!
//! A forward's answer streams, so it cannot wait in a cell:
//! `forward::claim` records it in the same vault table, claimed before the
//! send and finished when the answer is known; it shares [`client_key`],
//! [`record_key`] and [`Idempotency::horizon`] with the endpoints here.
//!
//! Below both `api` (provisioning, cryptograms) and `forward`, it knows
//! neither's error type: its [`Error`] says what went wrong here, and a
//! handler's own error type takes it in (`From`), so `api::error` alone
//! turns it into HTTP.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use moka::sync::Cache;
use ring::digest;
use time::OffsetDateTime;

use crate::auth::ApiKey;
use crate::body::{bytes_response, check_content_length, read_body};
use crate::clock::SharedClock;
use crate::vault::{IdempotencyRecord, StoreError, TokenStore};
use crate::{AppState, Body};
use http::Request;
use hyper::body::Incoming;

/// Header carrying an idempotency key.
pub const X_IDEMPOTENCY_KEY: &str = "x-idempotency-key";

/// What can go wrong under an idempotency key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `x-idempotency-key` is empty, too long or not visible ASCII: the
    /// client's (400 `invalid_request`, this text).
    #[error("{X_IDEMPOTENCY_KEY} must be 1 to {MAX_KEY_LEN} visible ASCII characters")]
    MalformedKey,
    /// The key was used with another request: the client's (422
    /// `idempotency_key_reused`).
    #[error("idempotency key was used with a different request")]
    KeyReused,
    /// The vault's durable copy could not be read: ours.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A durable record holds no valid status: ours.
    #[error("bad status in idempotency record")]
    BadRecord,
}

/// Reads the body of an idempotent endpoint (under `max_body_bytes`) and
/// runs `f` on it under the request's idempotency key, scoped to the API
/// key and `route`; `E` is the handler's error type.
pub async fn respond<F, Fut, E>(
    state: &AppState,
    key: &ApiKey,
    route: &str,
    req: Request<Incoming>,
    f: F,
) -> Result<Response<Body>, E>
where
    F: FnOnce(Bytes, Option<Pending>) -> Fut,
    Fut: Future<Output = Result<Stored, E>>,
    E: From<Error> + From<crate::body::Error>,
{
    check_content_length(&req, state.config.max_body_bytes)?;
    let (parts, body) = req.into_parts();
    let body = read_body(body, state.config.max_body_bytes).await?;
    state
        .idempotency
        .run(
            state.tokens.as_ref(),
            state.config.idempotency_ttl,
            &parts.headers,
            (&key.name, route),
            &parts.method,
            parts.uri.path(),
            &body.clone(),
            |pending| f(body, pending),
        )
        .await
}

/// Upper bound on records held.
pub const MAX_RECORDS: u64 = 1_000_000;
/// Upper bound on the bytes of the records held in memory (keys, bodies
/// and a per-entry overhead).
pub const MAX_CACHE_BYTES: u64 = 32 << 20;
/// What an entry costs beyond its key and body (moka's node, the slot).
const ENTRY_OVERHEAD: usize = 256;

/// An entry's weight in bytes: an empty slot weighs its key, a filled one
/// its body too (re-weighed when it is filled, see [`Idempotency::run`]).
#[allow(clippy::ptr_arg)] // moka's weigher signature
fn weight(key: &String, slot: &Arc<Slot>) -> u32 {
    let body = slot.get().map_or(0, |a| a.stored.body.len());
    u32::try_from(key.len() + body + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
}
/// Longest accepted idempotency key.
pub const MAX_KEY_LEN: usize = 255;

/// A response worth replaying.
#[derive(Clone)]
pub struct Stored {
    /// Its status.
    pub status: StatusCode,
    /// Its JSON body.
    pub body: Bytes,
}

/// An idempotent request in progress: what its handler needs to record its
/// answer durably, in the same transaction as its write where it can.
pub struct Pending {
    key: String,
    fingerprint: [u8; 32],
    clock: SharedClock,
}

impl Pending {
    /// The durable record of `stored` as this request's answer, made now.
    pub fn record(&self, stored: &Stored) -> IdempotencyRecord {
        IdempotencyRecord {
            key: self.key.clone(),
            fingerprint: self.fingerprint,
            status: stored.status.as_u16(),
            body: stored.body.to_vec(),
            created_at: self.clock.now(),
        }
    }

    /// The answer to give when another request recorded this key first:
    /// its answer if it was the same request, else 422.
    pub fn replay(&self, existing: IdempotencyRecord) -> Result<Stored, Error> {
        if existing.fingerprint != self.fingerprint {
            return Err(Error::KeyReused);
        }
        stored_from(existing)
    }
}

fn stored_from(r: IdempotencyRecord) -> Result<Stored, Error> {
    Ok(Stored {
        status: StatusCode::from_u16(r.status).map_err(|_| Error::BadRecord)?,
        body: Bytes::from(r.body),
    })
}

/// The answer recorded under one key, with the fingerprint of the request
/// that produced it. The fingerprint is set together with the answer, not
/// when the slot is created: a failed request must leave the key free for
/// whatever request comes next, with this body or another.
type Slot = tokio::sync::OnceCell<Answered>;

/// A slot's content.
struct Answered {
    fingerprint: [u8; 32],
    stored: Stored,
    /// When the answer was recorded (the durable record's `created_at`
    /// when it came from the vault): it is live for the TTL from then.
    at: OffsetDateTime,
}

/// Whether `slot` holds an answer that is no longer live at `now`.
fn expired(slot: &Slot, now: OffsetDateTime, ttl: Duration) -> bool {
    slot.get().is_some_and(|a| a.at + ttl <= now)
}

/// The idempotency record cache.
pub struct Idempotency {
    cache: Cache<String, Arc<Slot>>,
    clock: SharedClock,
}

/// The request's `x-idempotency-key`, if it has one; a malformed one is
/// refused (400 `invalid_request`).
pub fn client_key(headers: &HeaderMap) -> Result<Option<&str>, Error> {
    let Some(client_key) = headers.get(X_IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    client_key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
        .map(Some)
        .ok_or(Error::MalformedKey)
}

/// The vault key of a record: scope (API key name, route) and the
/// client's key.
pub fn record_key(scope: (&str, &str), client_key: &str) -> String {
    format!("{}\u{0}{}\u{0}{client_key}", scope.0, scope.1)
}

impl Idempotency {
    /// Records live for `ttl` on `clock`.
    pub fn new(ttl: Duration, clock: SharedClock) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(MAX_CACHE_BYTES.min(MAX_RECORDS * ENTRY_OVERHEAD as u64))
                .weigher(weight)
                .time_to_live(ttl)
                .build(),
            clock,
        }
    }

    /// The clock's now minus `ttl`: a record created at or before it is no
    /// longer live (the vault's idempotency calls take it as `horizon`).
    pub fn horizon(&self, ttl: Duration) -> OffsetDateTime {
        self.clock.now() - ttl
    }

    /// Runs `f` under the request's idempotency key, if it has one. A
    /// durable record in `store` (from before a restart, or from another
    /// replica) is replayed without running `f`; `E` is the handler's
    /// error type.
    #[allow(clippy::too_many_arguments)]
    pub async fn run<F, Fut, E>(
        &self,
        store: &dyn TokenStore,
        ttl: Duration,
        headers: &HeaderMap,
        scope: (&str, &str),
        method: &Method,
        path: &str,
        body: &[u8],
        f: F,
    ) -> Result<Response<Body>, E>
    where
        F: FnOnce(Option<Pending>) -> Fut,
        Fut: Future<Output = Result<Stored, E>>,
        E: From<Error>,
    {
        let Some(client_key) = client_key(headers)? else {
            let s = f(None).await?;
            return Ok(bytes_response(s.status, s.body));
        };
        let fingerprint = {
            let mut ctx = digest::Context::new(&digest::SHA256);
            ctx.update(method.as_str().as_bytes());
            ctx.update(b" ");
            ctx.update(path.as_bytes());
            ctx.update(b"\n");
            ctx.update(body);
            let mut fp = [0u8; 32];
            fp.copy_from_slice(ctx.finish().as_ref());
            fp
        };
        let record_key = record_key(scope, client_key);
        let now = self.clock.now();
        // An answer past its TTL on the clock is replaced by an empty slot
        // (atomically: concurrent requests get the same new slot).
        let slot = self
            .cache
            .entry(record_key.clone())
            .or_insert_with_if(|| Arc::new(Slot::new()), |s| expired(s, now, ttl))
            .into_value();
        let was_empty = !slot.initialized();
        let cache_key = was_empty.then(|| record_key.clone());
        let clock = self.clock.clone();
        let horizon = now - ttl;
        // Concurrent requests with one key queue here; the first to succeed
        // records its answer, and the others compare against it.
        let answered = slot
            .get_or_try_init(|| async move {
                let durable = store.get_idempotency(&record_key, horizon).await;
                if let Some(r) = durable.map_err(Error::Store)? {
                    let at = r.created_at;
                    return Ok(Answered {
                        fingerprint: r.fingerprint,
                        stored: stored_from(r)?,
                        at,
                    });
                }
                let pending = Pending {
                    key: record_key,
                    fingerprint,
                    clock,
                };
                let stored = f(Some(pending)).await?;
                // The request's arrival, not after its record's
                // `created_at`: memory never outlives the vault's copy.
                Ok::<_, E>(Answered {
                    fingerprint,
                    stored,
                    at: now,
                })
            })
            .await?;
        if let Some(k) = cache_key {
            // Filled now: insert again so the byte bound weighs the body.
            self.cache.insert(k, slot.clone());
        }
        if answered.fingerprint != fingerprint {
            return Err(Error::KeyReused.into());
        }
        Ok(bytes_response(
            answered.stored.status,
            answered.stored.body.clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cache_is_bounded_in_bytes_and_weighs_the_bodies() {
        let idem = Idempotency::new(
            Duration::from_secs(3600),
            crate::clock::SystemClock::shared(),
        );
        let store = crate::vault::memory::MemoryTokenStore::new();
        let body = Bytes::from(vec![b'x'; 256 << 10]);
        // 50 MiB of answers, over the bound.
        for i in 0..200 {
            let mut headers = HeaderMap::new();
            headers.insert(X_IDEMPOTENCY_KEY, i.to_string().parse().unwrap());
            let body = body.clone();
            idem.run(
                &store,
                Duration::from_secs(3600),
                &headers,
                ("k", "r"),
                &Method::POST,
                "/p",
                b"{}",
                |_| async move {
                    Ok::<_, Error>(Stored {
                        status: StatusCode::CREATED,
                        body,
                    })
                },
            )
            .await
            .unwrap();
        }
        idem.cache.run_pending_tasks();
        let held = idem.cache.weighted_size();
        assert!(held <= MAX_CACHE_BYTES, "{held}");
        assert!(held > MAX_CACHE_BYTES / 2, "bodies are weighed: {held}");
    }
}
