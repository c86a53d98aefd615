//! Card-capture sessions (contract §11): the cardholder's browser encrypts
//! the card to a one-off public key, so the merchant's backend only ever
//! holds ciphertext and an SAQ-A merchant can provision tokens.
//!
//! A session is a fresh P-256 key pair with an id (`sess_…`, also the JWK's
//! `kid`), a TTL (`session_ttl`) and one use. [`Sessions::open`] makes one
//! and hands out the public key; [`Sessions::open_card`] spends it: the
//! session is taken from the store atomically (exactly one caller gets the
//! private key, and a retry answers `session_already_used`), then the JWE is
//! decrypted with it ([`jwe`]). A session is spent by the first attempt
//! whatever the ciphertext turns out to be, so its key decrypts at most one
//! message: nothing about the key can be learnt from repeated tries (no
//! oracle for invalid-curve or padding games), and a typo in the card means
//! a new session, as with any single-use credential.
//!
//! Sessions live beside the cryptogram references: in memory by default
//! ([`memory`]), in Redis with the private key sealed under the master key
//! when `references.backend = "redis"` ([`redis`]), so any replica can
//! finish a session another one opened.
//!
//! A session's expiry is decided on the [`Clock`](crate::clock::Clock)
//! [`Sessions`] holds: it sets `expires_at` and is the `now` every take is
//! judged at. Eviction is the store's own (moka's per-entry timer, Redis's
//! `PXAT`).
//!
//! Nothing here ever logs, prints or returns the plaintext: errors are the
//! fixed reasons of [`SessionError`], and private keys have no `Debug`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::clock::SharedClock;
use crate::crypto::{is_random_id, random_bytes, random_id};
use crate::references::ReferenceStoreError;

pub mod jwe;
pub mod memory;
pub mod redis;

const PREFIX: &str = "sess_";

/// A session id: `sess_` + 128 random bits, base64url. Not a secret (it is
/// the public key's `kid`, seen by the browser), but unguessable, so no one
/// can spend a session they were not given.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// A fresh id.
    pub fn generate() -> SessionId {
        SessionId(random_id::<16>(PREFIX).1)
    }

    /// Accepts only well-formed ids, so garbage never reaches a store.
    pub fn parse(s: &str) -> Option<SessionId> {
        is_random_id::<16>(s, PREFIX).then(|| SessionId(s.to_owned()))
    }

    /// The id as given to the merchant.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fresh P-256 private key from the OS generator (via `ring`, as every
/// other secret here).
pub fn generate_key() -> SecretKey {
    loop {
        // A 32-byte string is a valid scalar unless it is 0 or ≥ n, which
        // happens with probability < 2^-32.
        let bytes = Zeroizing::new(random_bytes::<32>());
        if let Ok(k) = SecretKey::from_slice(bytes.as_ref()) {
            return k;
        }
    }
}

/// A session just opened: what the merchant hands to the browser.
#[derive(Debug, Clone)]
pub struct OpenedSession {
    /// The id, also the JWK's `kid`.
    pub id: SessionId,
    /// The public key the browser encrypts to.
    pub public_key: PublicKey,
    /// When the session stops being usable.
    pub expires_at: OffsetDateTime,
}

impl OpenedSession {
    /// The public key as a JWK (RFC 7517/7518 §6.2): `kty`, `crv`, `x`,
    /// `y`, `kid` = the session id, `alg` `ECDH-ES`, `use` `enc`.
    pub fn jwk(&self) -> serde_json::Value {
        let point = self.public_key.to_encoded_point(false);
        let b64 = |c: Option<&p256::FieldBytes>| {
            c.map(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c))
                .unwrap_or_default()
        };
        serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": b64(point.x()),
            "y": b64(point.y()),
            "kid": self.id.as_str(),
            "alg": jwe::ALG,
            "use": "enc",
        })
    }
}

/// Why a session could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TakeError {
    /// Unknown, malformed or expired.
    #[error("session not found or expired")]
    NotFound,
    /// Spent before.
    #[error("session already used")]
    AlreadyUsed,
}

/// Why a session's card could not be read. No variant carries input.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client's: unknown or spent session.
    #[error(transparent)]
    Refused(#[from] TakeError),
    /// The client's: the JWE is not for this session or does not decrypt.
    #[error(transparent)]
    Invalid(#[from] jwe::JweError),
    /// Ours: the store failed.
    #[error(transparent)]
    Store(#[from] ReferenceStoreError),
}

/// Where sessions live: the private key until the session is spent, and a
/// tombstone after it until its expiry (so a retry answers 409, not 404).
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new session; never returns before it is stored.
    async fn insert(
        &self,
        id: &SessionId,
        key: &SecretKey,
        expires_at: OffsetDateTime,
    ) -> Result<(), ReferenceStoreError>;

    /// Atomically spends the session and returns its private key: of any
    /// number of concurrent callers, exactly one succeeds. A session whose
    /// expiry is not after `now` is not found.
    async fn take(&self, id: &SessionId, now: OffsetDateTime) -> Result<SecretKey, TakeFailure>;
}

/// Either kind of failure of a take.
#[derive(Debug, thiserror::Error)]
pub enum TakeFailure {
    /// The client's.
    #[error(transparent)]
    Refused(#[from] TakeError),
    /// Ours.
    #[error(transparent)]
    Store(#[from] ReferenceStoreError),
}

impl From<TakeFailure> for SessionError {
    fn from(e: TakeFailure) -> Self {
        match e {
            TakeFailure::Refused(r) => SessionError::Refused(r),
            TakeFailure::Store(s) => SessionError::Store(s),
        }
    }
}

/// The sessions of this instance: a store, the TTL and the clock both are
/// read on. Cheap to share.
#[derive(Clone)]
pub struct Sessions {
    store: Arc<dyn SessionStore>,
    ttl: Duration,
    clock: SharedClock,
}

impl Sessions {
    /// Sessions in `store`, each usable for `ttl` on `clock`.
    pub fn new(store: Arc<dyn SessionStore>, ttl: Duration, clock: SharedClock) -> Sessions {
        Sessions { store, ttl, clock }
    }

    /// Opens a session, usable until the clock reads `ttl` later.
    pub async fn open(&self) -> Result<OpenedSession, ReferenceStoreError> {
        let id = SessionId::generate();
        let key = generate_key();
        let expires_at = self.clock.now() + self.ttl;
        self.store.insert(&id, &key, expires_at).await?;
        Ok(OpenedSession {
            id,
            public_key: key.public_key(),
            expires_at,
        })
    }

    /// Spends session `id` and decrypts `compact` (a JWE) with its key. The
    /// session is spent whatever the JWE holds (see the module docs); one
    /// whose expiry is not after the clock's now is not found.
    pub async fn open_card(
        &self,
        id: &str,
        compact: &str,
    ) -> Result<Zeroizing<Vec<u8>>, SessionError> {
        let id = SessionId::parse(id).ok_or(TakeError::NotFound)?;
        let key = self.store.take(&id, self.clock.now()).await?;
        Ok(jwe::decrypt(compact, id.as_str(), &key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_128_bit_and_parse_strictly() {
        let a = SessionId::generate();
        assert_eq!(a.as_str().len(), 27);
        assert_eq!(SessionId::parse(a.as_str()), Some(a.clone()));
        assert_ne!(a, SessionId::generate());
        assert!(SessionId::parse("sess_short").is_none());
        assert!(SessionId::parse(&a.as_str().replace("sess_", "cref_")).is_none());
        assert!(SessionId::parse(&format!("{}.", &a.as_str()[..26])).is_none());
    }

    #[test]
    fn the_jwk_is_the_public_half_with_kid_alg_use() {
        let key = generate_key();
        let s = OpenedSession {
            id: SessionId::generate(),
            public_key: key.public_key(),
            expires_at: OffsetDateTime::now_utc(),
        };
        let jwk = s.jwk();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["kid"], s.id.as_str());
        assert_eq!(jwk["alg"], "ECDH-ES");
        assert_eq!(jwk["use"], "enc");
        assert_eq!(jwk["x"].as_str().map(str::len), Some(43));
        assert_eq!(jwk["y"].as_str().map(str::len), Some(43));
        assert!(jwk.get("d").is_none());
        let public = jwe::public_key_from_jwk(&jwk).unwrap();
        assert_eq!(public, key.public_key());
    }
}
