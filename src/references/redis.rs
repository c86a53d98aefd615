//! Reference store on Redis, for several replicas sharing references.
//!
//! What it keeps (every key starts with the configured prefix, default
//! `tokenrelay:`):
//!
//! - `ref:<hex SHA-256 of the reference id>` — a hash per reference: `t`
//!   token id, `e` expiry (Unix ms), `u` used flag, `k` key id and `p` the
//!   payload (cryptogram, dynamic CVV, ECI, metadata) sealed with the vault's
//!   keyring (AES-256-GCM, the Redis key and token id as associated data).
//!   `PEXPIREAT` = expiry. The reference id itself is never written, so a
//!   Redis dump holds nothing that can be presented to the proxy, and no
//!   cryptogram in the clear.
//! - `live` — a sorted set of the unused references' keys scored by expiry:
//!   its cardinality, after dropping expired members, is what
//!   `max_entries` bounds and what [`ReferenceStore::len`] reports.
//! - `tok:<token id>` — a sorted set of a token's references (scored by
//!   expiry, expiring with the latest one) so `revoke_token` finds them.
//!
//! Every state change is one Lua script, which Redis runs atomically: that
//! is what makes `take` exactly-once across replicas. `take` marks the
//! reference used and drops its sealed payload in the same script; the
//! tombstone keeps its `PEXPIREAT` so a retry answers 409, not 404. Expiry
//! is checked against *our* clock in every script and read (as the memory
//! store does), besides Redis's own expiry, so clock skew between Redis and
//! a replica never makes an expired reference usable.
//!
//! Failure direction: if Redis answers a `take` too late (timeout) the
//! reference may be consumed without the payment being attempted; the
//! merchant gets 503 and a retry 409. It is never handed out twice.
//!
//! Single-node (or primary/replica) Redis only: the scripts touch keys of
//! several hash slots, which Redis Cluster refuses.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{IntoConnectionInfo, RedisError, Script};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::{
    Payload, Reference, ReferenceId, ReferenceStore, ReferenceStoreError, TakeError, TakeFailure,
};
use crate::card::{Brand, Secret};
use crate::tsp::{CryptogramKind, CryptogramType};
use crate::vault::keyring::Keyring;
use crate::vault::{Metadata, TokenId};

/// Environment variable with the Redis password; wins over
/// `references.password_file`.
pub const PASSWORD_ENV: &str = "TOKENRELAY_REDIS_PASSWORD";

/// Why the store could not be opened at start. Messages name the config key
/// and never carry the password.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The password file could not be read.
    #[error("references.password_file: {0}")]
    Password(std::io::Error),
    /// The URL is unusable or Redis did not answer.
    #[error("references.url: {0}")]
    Connect(String),
}

/// `ISSUE` — KEYS: ref, live, token index. ARGV: now ms, expires ms,
/// max_entries, token id, key id, sealed payload. → {code, live count}:
/// 0 stored, 1 full, 2 id collision.
const ISSUE: &str = r"
local now = tonumber(ARGV[1])
local exp = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local n = redis.call('ZCARD', KEYS[2])
if n >= tonumber(ARGV[3]) then return {1, n} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {2, n} end
redis.call('HSET', KEYS[1], 't', ARGV[4], 'e', ARGV[2], 'u', '0', 'k', ARGV[5], 'p', ARGV[6])
redis.call('PEXPIREAT', KEYS[1], exp)
redis.call('ZADD', KEYS[2], exp, KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZADD', KEYS[3], exp, KEYS[1])
local top = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
if tonumber(top[2]) <= exp then redis.call('PEXPIREAT', KEYS[3], exp) end
return {0, n + 1}
";

/// `TAKE` — KEYS: ref, live. ARGV: now ms, token id. → {code, live count,
/// key id, sealed payload, expires ms}: 0 taken, 1 not found or expired,
/// 2 already used, 3 bound to another token (left usable).
const TAKE: &str = r"
local now = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 't', 'e', 'u', 'k', 'p')
local code = 0
if not h[1] or not h[2] or tonumber(h[2]) <= now then code = 1
elseif h[1] ~= ARGV[2] then code = 3
elseif h[3] == '1' then code = 2
elseif not h[4] or not h[5] then code = 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if code ~= 0 then return {code, redis.call('ZCARD', KEYS[2]), '', '', 0} end
redis.call('HSET', KEYS[1], 'u', '1')
redis.call('HDEL', KEYS[1], 'k', 'p')
redis.call('ZREM', KEYS[2], KEYS[1])
return {0, redis.call('ZCARD', KEYS[2]), h[4], h[5], tonumber(h[2])}
";

/// `RESTORE` — KEYS: ref, live. ARGV: now ms, token id, key id, sealed
/// payload. Only a used, unexpired tombstone of that token becomes usable
/// again, with its original expiry. → {code, live count}: 0 restored, 1 not.
const RESTORE: &str = r"
local now = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 't', 'e', 'u')
local code = 1
if h[1] == ARGV[2] and h[2] and tonumber(h[2]) > now and h[3] == '1' then
  redis.call('HSET', KEYS[1], 'u', '0', 'k', ARGV[3], 'p', ARGV[4])
  redis.call('ZADD', KEYS[2], tonumber(h[2]), KEYS[1])
  code = 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
return {code, redis.call('ZCARD', KEYS[2])}
";

/// `REVOKE` — KEYS: token index, live. ARGV: now ms. Deletes every
/// reference of the token, used or not (as the memory store does: a later
/// take answers 404). → live count.
const REVOKE: &str = r"
local refs = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, k in ipairs(refs) do
  redis.call('DEL', k)
  redis.call('ZREM', KEYS[2], k)
end
redis.call('DEL', KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[1]))
return redis.call('ZCARD', KEYS[2])
";

/// The payload as sealed: short field names, secrets borrowed.
#[derive(Serialize)]
struct SealedPayloadRef<'a> {
    c: Option<&'a str>,
    d: Option<&'a str>,
    y: &'a str,
    e: &'a str,
    m: &'a Metadata,
}

/// The payload as opened.
#[derive(Deserialize)]
struct SealedPayload {
    c: Option<String>,
    d: Option<String>,
    y: String,
    e: String,
    m: Metadata,
}

/// The Redis-backed store.
pub struct RedisReferenceStore {
    conn: ConnectionManager,
    keys: Arc<Keyring>,
    prefix: String,
    live_key: String,
    max_entries: u64,
    /// Unused references, as the last script counted them (all replicas').
    live: AtomicU64,
    issue: Script,
    take: Script,
    restore: Script,
    revoke: Script,
}

impl std::fmt::Debug for RedisReferenceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RedisReferenceStore(prefix {:?}, max_entries {})",
            self.prefix, self.max_entries
        )
    }
}

/// Reads the Redis password: `TOKENRELAY_REDIS_PASSWORD`, else the file.
pub fn password(password_file: Option<&Path>) -> Result<Option<Zeroizing<String>>, OpenError> {
    if let Ok(pw) = std::env::var(PASSWORD_ENV) {
        return Ok(Some(Zeroizing::new(pw)));
    }
    match password_file {
        None => Ok(None),
        Some(f) => {
            let text = Zeroizing::new(std::fs::read_to_string(f).map_err(OpenError::Password)?);
            Ok(Some(Zeroizing::new(text.trim_end().to_owned())))
        }
    }
}

fn unavailable(e: RedisError) -> ReferenceStoreError {
    // Redis errors carry the server's message or an I/O error; what we send
    // is ciphertext, hashes and ids, so nothing secret can be echoed.
    ReferenceStoreError::Unavailable(format!("redis: {e}"))
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn now_ms() -> i64 {
    unix_ms(OffsetDateTime::now_utc())
}

/// The ECI as the `&'static str` the token service hands out.
fn known_eci(s: &str) -> Option<&'static str> {
    [Brand::Visa, Brand::Mastercard, Brand::Amex, Brand::Discover]
        .into_iter()
        .flat_map(|b| [CryptogramKind::Ecom, CryptogramKind::Dauth].map(|k| crate::tsp::eci(b, k)))
        .find(|e| *e == s)
}

impl RedisReferenceStore {
    /// Connects to `url` (checked by the config: no password in it), with
    /// `password` if given. Keys start with `prefix`; at most `max_entries`
    /// unused references are held across every replica sharing the prefix.
    pub async fn connect(
        url: &str,
        password: Option<&str>,
        keys: Arc<Keyring>,
        max_entries: u64,
        prefix: &str,
    ) -> Result<RedisReferenceStore, OpenError> {
        let mut info = url
            .into_connection_info()
            .map_err(|e| OpenError::Connect(format!("not a usable Redis URL ({e})")))?;
        if let Some(pw) = password {
            let settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(settings);
        }
        if matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. }) {
            // The client builds its TLS config from the process default;
            // make it the same ring provider the rest of tokenrelay uses.
            // An error only means one is installed already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = ::redis::Client::open(info)
            .map_err(|e| OpenError::Connect(format!("not a usable Redis URL ({e})")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| OpenError::Connect(format!("Redis unreachable ({e})")))?;
        let store = RedisReferenceStore {
            conn,
            keys,
            prefix: prefix.to_owned(),
            live_key: format!("{prefix}live"),
            max_entries,
            live: AtomicU64::new(0),
            issue: Script::new(ISSUE),
            take: Script::new(TAKE),
            restore: Script::new(RESTORE),
            revoke: Script::new(REVOKE),
        };
        let live: u64 = ::redis::cmd("ZCOUNT")
            .arg(&store.live_key)
            .arg(format!("({}", now_ms()))
            .arg("+inf")
            .query_async(&mut store.conn.clone())
            .await
            .map_err(|e| OpenError::Connect(format!("Redis refused a command ({e})")))?;
        store.live.store(live, Ordering::Relaxed);
        Ok(store)
    }

    /// Opens the store the config describes: reads the password, connects.
    pub async fn open(
        config: &crate::config::RedisConfig,
        keys: Arc<Keyring>,
        max_entries: u64,
    ) -> Result<RedisReferenceStore, OpenError> {
        let password = password(config.password_file.as_deref())?;
        Self::connect(
            &config.url,
            password.as_ref().map(|p| p.as_str()),
            keys,
            max_entries,
            &config.key_prefix,
        )
        .await
    }

    fn ref_key(&self, id: &ReferenceId) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
        format!("{}ref:{}", self.prefix, hex::encode(digest))
    }

    fn token_key(&self, token_id: TokenId) -> String {
        format!("{}tok:{token_id}", self.prefix)
    }

    /// Associated data: the payload opens only under its own key and token.
    fn aad(key: &str, token_id: TokenId) -> String {
        format!("{key}\n{token_id}")
    }

    fn seal(
        &self,
        key: &str,
        token_id: TokenId,
        payload: &Payload,
    ) -> Result<(String, Vec<u8>), ReferenceStoreError> {
        let plain = Zeroizing::new(
            serde_json::to_vec(&SealedPayloadRef {
                c: payload.cryptogram.as_ref().map(Secret::expose),
                d: payload.dynamic_cvv.as_ref().map(Secret::expose),
                y: payload.cryptogram_type.as_str(),
                e: payload.eci,
                m: &payload.metadata,
            })
            .map_err(|e| ReferenceStoreError::Unavailable(format!("serialising: {e}")))?,
        );
        self.keys
            .seal(Self::aad(key, token_id).as_bytes(), &plain)
            .map_err(|e| ReferenceStoreError::Unavailable(format!("sealing a reference: {e}")))
    }

    fn open_payload(
        &self,
        key: &str,
        token_id: TokenId,
        key_id: &str,
        sealed: &[u8],
    ) -> Result<Payload, ReferenceStoreError> {
        let plain = self
            .keys
            .open(key_id, Self::aad(key, token_id).as_bytes(), sealed)
            .map_err(|e| {
                // Every replica must load the same master keys, and an old
                // key may only go once reference_ttl has passed since the
                // rotation.
                ReferenceStoreError::Unavailable(format!("opening a stored reference: {e}"))
            })?;
        let p: SealedPayload = serde_json::from_slice(&plain).map_err(|_| {
            ReferenceStoreError::Unavailable("a stored reference is malformed".into())
        })?;
        let cryptogram_type = match p.y.as_str() {
            "tavv" => CryptogramType::Tavv,
            "dynamic_cvv" => CryptogramType::DynamicCvv,
            _ => {
                return Err(ReferenceStoreError::Unavailable(
                    "a stored reference has an unknown type".into(),
                ))
            }
        };
        let eci = known_eci(&p.e).ok_or_else(|| {
            ReferenceStoreError::Unavailable("a stored reference has an unknown ECI".into())
        })?;
        Ok(Payload {
            cryptogram: p.c.map(Secret::new),
            dynamic_cvv: p.d.map(Secret::new),
            cryptogram_type,
            eci,
            metadata: p.m,
        })
    }

    fn expires_at(ms: i64) -> Result<OffsetDateTime, ReferenceStoreError> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map_err(|_| {
            ReferenceStoreError::Unavailable("a stored reference has a bad expiry".into())
        })
    }

    fn count(&self, live: u64) {
        self.live.store(live, Ordering::Relaxed);
    }
}

#[async_trait]
impl ReferenceStore for RedisReferenceStore {
    async fn issue(&self, reference: Reference) -> Result<ReferenceId, ReferenceStoreError> {
        let id = ReferenceId::generate();
        let key = self.ref_key(&id);
        let (key_id, sealed) = self.seal(&key, reference.token_id, &reference.payload)?;
        let (code, live): (i64, u64) = self
            .issue
            .key(&key)
            .key(&self.live_key)
            .key(self.token_key(reference.token_id))
            .arg(now_ms())
            .arg(unix_ms(reference.expires_at))
            .arg(self.max_entries)
            .arg(reference.token_id.to_string())
            .arg(key_id)
            .arg(sealed)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        self.count(live);
        match code {
            0 => Ok(id),
            1 => Err(ReferenceStoreError::Full),
            // 256 random bits never collide; refuse rather than overwrite.
            _ => Err(ReferenceStoreError::Unavailable(
                "reference id collision".into(),
            )),
        }
    }

    async fn take(&self, id: &ReferenceId, token_id: TokenId) -> Result<Reference, TakeFailure> {
        let key = self.ref_key(id);
        let (code, live, key_id, sealed, expires): (i64, u64, String, Vec<u8>, i64) = self
            .take
            .key(&key)
            .key(&self.live_key)
            .arg(now_ms())
            .arg(token_id.to_string())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        self.count(live);
        let sealed = Zeroizing::new(sealed);
        match code {
            0 => Ok(Reference {
                token_id,
                expires_at: Self::expires_at(expires)?,
                payload: Arc::new(self.open_payload(&key, token_id, &key_id, &sealed)?),
            }),
            2 => Err(TakeError::AlreadyUsed.into()),
            3 => Err(TakeError::TokenMismatch.into()),
            _ => Err(TakeError::NotFound.into()),
        }
    }

    async fn peek(&self, id: &ReferenceId, token_id: TokenId) -> Result<Reference, TakeFailure> {
        let key = self.ref_key(id);
        type Fields = (
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<Vec<u8>>,
        );
        let (token, expires, used, key_id, sealed): Fields = ::redis::cmd("HMGET")
            .arg(&key)
            .arg(&["t", "e", "u", "k", "p"])
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let sealed = sealed.map(Zeroizing::new);
        let (Some(token), Some(expires)) = (token, expires) else {
            return Err(TakeError::NotFound.into());
        };
        if expires <= now_ms() {
            return Err(TakeError::NotFound.into());
        }
        if token != token_id.to_string() {
            return Err(TakeError::TokenMismatch.into());
        }
        if used.as_deref() == Some("1") {
            return Err(TakeError::AlreadyUsed.into());
        }
        let (Some(key_id), Some(sealed)) = (key_id, sealed) else {
            return Err(TakeError::NotFound.into());
        };
        Ok(Reference {
            token_id,
            expires_at: Self::expires_at(expires)?,
            payload: Arc::new(self.open_payload(&key, token_id, &key_id, &sealed)?),
        })
    }

    async fn restore(
        &self,
        id: &ReferenceId,
        reference: Reference,
    ) -> Result<(), ReferenceStoreError> {
        let key = self.ref_key(id);
        let (key_id, sealed) = self.seal(&key, reference.token_id, &reference.payload)?;
        let (_restored, live): (i64, u64) = self
            .restore
            .key(&key)
            .key(&self.live_key)
            .arg(now_ms())
            .arg(reference.token_id.to_string())
            .arg(key_id)
            .arg(sealed)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        self.count(live);
        Ok(())
    }

    async fn revoke_token(&self, token_id: TokenId) -> Result<(), ReferenceStoreError> {
        let live: u64 = self
            .revoke
            .key(self.token_key(token_id))
            .key(&self.live_key)
            .arg(now_ms())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        self.count(live);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    async fn ping(&self) -> Result<(), ReferenceStoreError> {
        let _: String = ::redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_eci_the_token_service_mints_round_trips() {
        for b in [Brand::Visa, Brand::Mastercard, Brand::Amex, Brand::Discover] {
            for k in [CryptogramKind::Ecom, CryptogramKind::Dauth] {
                let e = crate::tsp::eci(b, k);
                assert_eq!(known_eci(e), Some(e));
            }
        }
        assert_eq!(known_eci("99"), None);
    }

    #[test]
    fn keys_hide_the_reference_id() {
        let id = ReferenceId::generate();
        let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
        let key = format!("tokenrelay:ref:{}", hex::encode(digest));
        assert_eq!(key.len(), "tokenrelay:ref:".len() + 64);
        assert!(!key.contains(&id.as_str()[5..]));
    }

    #[tokio::test]
    async fn unreachable_redis_names_the_url_key() {
        // Port 1 on loopback: nothing listens, the connection is refused.
        let e = RedisReferenceStore::connect(
            "redis://127.0.0.1:1",
            Some("hunter2"),
            Arc::new(Keyring::ephemeral()),
            10,
            "t:",
        )
        .await
        .unwrap_err();
        let m = e.to_string();
        assert!(m.starts_with("references.url:"), "{m}");
        assert!(!m.contains("hunter2"), "{m}");
    }
}
