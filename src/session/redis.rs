//! Session store on Redis, sharing the reference store's connection (its
//! scripts run through [`RedisReferenceStore::invoke`]) and key prefix, so
//! that any replica can finish a session another opened.
//!
//! Not the reference store's sealed-blob primitive (`put_sealed` /
//! `take_sealed`): a taken blob is deleted, and a spent session must stay
//! as a tombstone so that a retry answers 409 `session_already_used`, not
//! 404, atomically with the take.
//!
//! One hash per session, `<prefix>sess:<base64url SHA-256 of the id>`: `e`
//! expiry (Unix ms), `k` key id, `p` the private key sealed with the vault's
//! keyring (AES-256-GCM, the Redis key as associated data, so a sealed key
//! moved to another session's entry does not open). `PEXPIREAT` = expiry.
//! The session id is never written. `take` is one Lua script (atomic in
//! Redis): it checks the expiry against *our* clock, hands out the sealed
//! key and deletes it, leaving `e` as the tombstone that makes a retry 409.
//!
//! Failure direction, as for references: a `take` whose answer is lost
//! spends the session without a provisioning; the merchant gets 503 and
//! opens a new session. A session is never handed out twice.

use std::sync::Arc;

use ::redis::Script;
use async_trait::async_trait;
use base64::Engine;
use p256::SecretKey;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::{SessionId, SessionStore, TakeError, TakeFailure};
use crate::references::redis::RedisReferenceStore;
use crate::references::ReferenceStoreError;
use crate::vault::keyring::{Keyring, Purpose};

/// `INSERT` — KEYS: session. ARGV: expires ms, key id, sealed key. → 0
/// stored, 1 id collision.
const INSERT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'k', ARGV[2], 'p', ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
return 0
";

/// `TAKE` — KEYS: session. ARGV: now ms. → {code, key id, sealed key}:
/// 0 taken, 1 not found or expired, 2 already used.
const TAKE: &str = r"
local h = redis.call('HMGET', KEYS[1], 'e', 'k', 'p')
if not h[1] or tonumber(h[1]) <= tonumber(ARGV[1]) then return {1, '', ''} end
if not h[2] or not h[3] then return {2, '', ''} end
redis.call('HDEL', KEYS[1], 'k', 'p')
return {0, h[2], h[3]}
";

fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The Redis-backed session store.
pub struct RedisSessionStore {
    store: Arc<RedisReferenceStore>,
    keys: Arc<Keyring>,
    prefix: String,
    insert: Script,
    take: Script,
}

impl RedisSessionStore {
    /// Sessions beside `store`'s references, keys under `prefix`, private
    /// keys sealed with `keys`.
    pub fn new(store: Arc<RedisReferenceStore>, keys: Arc<Keyring>, prefix: &str) -> Self {
        Self {
            store,
            keys,
            prefix: prefix.to_owned(),
            insert: Script::new(INSERT),
            take: Script::new(TAKE),
        }
    }

    fn key(&self, id: &SessionId) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
        format!(
            "{}sess:{}",
            self.prefix,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
        )
    }
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    async fn insert(
        &self,
        id: &SessionId,
        key: &SecretKey,
        expires_at: OffsetDateTime,
    ) -> Result<(), ReferenceStoreError> {
        let redis_key = self.key(id);
        let scalar = Zeroizing::new(key.to_bytes());
        let (key_id, sealed) = self
            .keys
            .seal_for(Purpose::Reference, redis_key.as_bytes(), scalar.as_slice())
            .map_err(|e| ReferenceStoreError::Unavailable(format!("sealing a session: {e}")))?;
        let mut invocation = self.insert.prepare_invoke();
        invocation
            .key(&redis_key)
            .arg(unix_ms(expires_at))
            .arg(key_id)
            .arg(sealed);
        let code: i64 = self.store.invoke(invocation).await?;
        match code {
            0 => Ok(()),
            _ => Err(ReferenceStoreError::Unavailable(
                "session id collision".into(),
            )),
        }
    }

    async fn take(&self, id: &SessionId, now: OffsetDateTime) -> Result<SecretKey, TakeFailure> {
        let redis_key = self.key(id);
        let mut invocation = self.take.prepare_invoke();
        invocation.key(&redis_key).arg(unix_ms(now));
        let (code, key_id, sealed): (i64, String, Vec<u8>) = self.store.invoke(invocation).await?;
        let sealed = Zeroizing::new(sealed);
        match code {
            0 => {}
            2 => return Err(TakeError::AlreadyUsed.into()),
            _ => return Err(TakeError::NotFound.into()),
        }
        let scalar = self
            .keys
            .open_for(Purpose::Reference, &key_id, redis_key.as_bytes(), &sealed)
            .map_err(|e| {
                // Every replica must load the same master keys.
                ReferenceStoreError::Unavailable(format!("opening a stored session: {e}"))
            })?;
        SecretKey::from_slice(&scalar).map_err(|_| {
            ReferenceStoreError::Unavailable("a stored session key is malformed".into()).into()
        })
    }
}
