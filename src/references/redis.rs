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
//!   expiry, expiring with the latest one) so `revoke_token` finds them;
//!   revocation deletes them in batches of 256, one short script each, so
//!   a token with many references never blocks Redis.
//! - `<kind>:<hex SHA-256 of the name>` — a sealed blob (`put_sealed`):
//!   expiry, key id and the sealed bytes (expiry and key as associated
//!   data), `PEXPIREAT` = expiry, taken once with `take_sealed`. Kind `cvc`
//!   holds the CVC of a PCI token (named by its id) when the references are
//!   in Redis, so a PCI forward through any replica finds it.
//!
//! Every command runs under `references.timeout`; one that gets no answer
//! drops the connection, and the next dials afresh (see `Link`).
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

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisError, RedisResult, Script};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::{
    Payload, Reference, ReferenceId, ReferenceStore, ReferenceStoreError, TakeError, TakeFailure,
};
use crate::card::{Brand, Secret};
use crate::tsp::{CryptogramKind, CryptogramType};
use crate::vault::keyring::{Keyring, Purpose};
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
    /// The CA file could not be read.
    #[error("references.ca_file: {0}")]
    CaFile(std::io::Error),
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

/// `REVOKE` — KEYS: token index, live. ARGV: now ms, batch. Deletes up to
/// `batch` references of the token, used or not (as the memory store does:
/// a later take answers 404), so no one script walks an unbounded list and
/// blocks Redis; the caller repeats until none is left. → {left in the
/// token's index, live count}.
const REVOKE: &str = r"
local refs = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
for _, k in ipairs(refs) do
  redis.call('DEL', k)
  redis.call('ZREM', KEYS[2], k)
  redis.call('ZREM', KEYS[1], k)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[1]))
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
";

/// References one `REVOKE` script deletes.
const REVOKE_BATCH: u64 = 256;

/// `TAKE_SEALED` — KEYS: blob. Returns the value and deletes it, in one
/// step: of concurrent takers exactly one gets it.
const TAKE_SEALED: &str = r"
local v = redis.call('GET', KEYS[1])
if v then redis.call('DEL', KEYS[1]) end
return v
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

/// A blob [`RedisReferenceStore::take_sealed`] took: the opened bytes and
/// the expiry they were stored with.
pub struct SealedBlob {
    /// The plaintext, wiped on drop.
    pub plain: Zeroizing<Vec<u8>>,
    /// When it stops being usable.
    pub expires_at: OffsetDateTime,
}

/// The Redis-backed store.
pub struct RedisReferenceStore {
    link: Link,
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
    take_sealed: Script,
}

/// The connection to Redis, replaced when it stops answering.
///
/// One multiplexed connection serves every request. A command that gets
/// no answer within `timeout`, or fails on the connection itself, drops
/// it; the next command dials afresh (one dial at a time, itself bounded by
/// `timeout`). So a connection that died silently — a partition that left
/// the socket open, a peer that vanished — costs the commands in flight one
/// timeout each, and `/readyz` recovers by itself as soon as Redis answers
/// a new connection. (redis-rs's `ConnectionManager` reconnects only on
/// errors it sees; a black hole only ever times out.)
struct Link {
    client: ::redis::Client,
    config: AsyncConnectionConfig,
    timeout: Duration,
    /// The connection in use and its generation, so a late failure of an
    /// old connection never drops its replacement.
    current: std::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    /// Held while dialling (across the await: a tokio mutex).
    dialling: tokio::sync::Mutex<()>,
}

impl Link {
    fn new(client: ::redis::Client, timeout: Duration) -> Link {
        Link {
            client,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
            timeout,
            current: std::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            dialling: tokio::sync::Mutex::new(()),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(u64, MultiplexedConnection)>> {
        // Plain data: a poisoned lock still holds a usable value.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn connection(&self) -> Result<(u64, MultiplexedConnection), ReferenceStoreError> {
        if let Some(c) = self.slot().clone() {
            return Ok(c);
        }
        let _dialling = self.dialling.lock().await;
        if let Some(c) = self.slot().clone() {
            return Ok(c);
        }
        let dial = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config);
        let conn = match tokio::time::timeout(self.timeout, dial).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(unavailable(e)),
            Err(_) => {
                return Err(ReferenceStoreError::Unavailable(format!(
                    "redis: no connection within {:?}",
                    self.timeout
                )))
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.slot() = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    fn drop_connection(&self, generation: u64) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    /// Runs one command (or script) under the timeout.
    async fn run<'a, T, F, Fut>(&self, command: F) -> Result<T, ReferenceStoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>> + 'a,
    {
        let (generation, conn) = self.connection().await?;
        match tokio::time::timeout(self.timeout, command(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_timeout()
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error()
                {
                    self.drop_connection(generation);
                }
                Err(unavailable(e))
            }
            Err(_) => {
                self.drop_connection(generation);
                Err(ReferenceStoreError::Unavailable(format!(
                    "redis: no answer within {:?}; the connection is dropped",
                    self.timeout
                )))
            }
        }
    }
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
    /// `password` if given and every other `[references]` key at its
    /// default. Keys start with `prefix`; at most `max_entries` unused
    /// references are held across every replica sharing the prefix.
    pub async fn connect(
        url: &str,
        password: Option<&str>,
        keys: Arc<Keyring>,
        max_entries: u64,
        prefix: &str,
    ) -> Result<RedisReferenceStore, OpenError> {
        let config = crate::config::RedisConfig {
            url: url.to_owned(),
            key_prefix: prefix.to_owned(),
            ..Default::default()
        };
        Self::connect_with(&config, password, keys, max_entries).await
    }

    /// Opens the store the config describes: reads the password, connects.
    pub async fn open(
        config: &crate::config::RedisConfig,
        keys: Arc<Keyring>,
        max_entries: u64,
    ) -> Result<RedisReferenceStore, OpenError> {
        let password = password(config.password_file.as_deref())?;
        Self::connect_with(
            config,
            password.as_ref().map(|p| p.as_str()),
            keys,
            max_entries,
        )
        .await
    }

    /// Connects as `config` says, with `password` if given, and checks
    /// Redis answers.
    pub async fn connect_with(
        config: &crate::config::RedisConfig,
        password: Option<&str>,
        keys: Arc<Keyring>,
        max_entries: u64,
    ) -> Result<RedisReferenceStore, OpenError> {
        let prefix = config.key_prefix.as_str();
        let mut info = config
            .url
            .as_str()
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
        let client = match &config.ca_file {
            None => ::redis::Client::open(info),
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(OpenError::CaFile)?;
                ::redis::Client::build_with_tls(
                    info,
                    ::redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
        }
        .map_err(|e| OpenError::Connect(format!("not a usable Redis URL or CA ({e})")))?;
        let store = RedisReferenceStore {
            link: Link::new(client, config.timeout),
            keys,
            prefix: prefix.to_owned(),
            live_key: format!("{prefix}live"),
            max_entries,
            live: AtomicU64::new(0),
            issue: Script::new(ISSUE),
            take: Script::new(TAKE),
            restore: Script::new(RESTORE),
            revoke: Script::new(REVOKE),
            take_sealed: Script::new(TAKE_SEALED),
        };
        let cmd = ::redis::cmd("ZCOUNT")
            .arg(&store.live_key)
            .arg(format!("({}", now_ms()))
            .arg("+inf")
            .clone();
        let live: u64 = store
            .link
            .run(|mut c| async move { cmd.query_async(&mut c).await })
            .await
            .map_err(|e| OpenError::Connect(format!("Redis unreachable ({e})")))?;
        store.live.store(live, Ordering::Relaxed);
        Ok(store)
    }

    /// The key of a sealed blob of `kind` named `id` (hashed: the name
    /// itself, e.g. a session id, may be a bearer credential).
    fn blob_key(&self, kind: &str, id: &str) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
        format!("{}{kind}:{}", self.prefix, hex::encode(digest))
    }

    /// Associated data of a blob: its key and expiry, so neither can be
    /// moved or stretched in Redis without the open failing.
    fn blob_aad(key: &str, expires_ms: i64) -> Vec<u8> {
        format!("{key}\n{expires_ms}").into_bytes()
    }

    /// Stores `plain` sealed under the keyring as a blob of `kind` named
    /// `id`, until `expires_at` (Redis expires it then; every read checks
    /// our clock too). With `replace`, an earlier blob of that name is
    /// overwritten; without, an existing one wins and nothing is written.
    /// `false`: not stored (it existed, or `expires_at` has passed).
    ///
    /// The sealed-blob primitive — sealed, TTL-bound, single use through
    /// [`take_sealed`](Self::take_sealed) — holds the CVCs of PCI tokens
    /// (`crate::cvc`, kind `cvc`) and is meant for any other short-lived
    /// secret every replica must see once, such as browser sessions.
    pub async fn put_sealed(
        &self,
        kind: &str,
        id: &str,
        plain: &[u8],
        expires_at: OffsetDateTime,
        replace: bool,
    ) -> Result<bool, ReferenceStoreError> {
        let expires_ms = unix_ms(expires_at);
        if expires_ms <= now_ms() {
            return Ok(false);
        }
        let key = self.blob_key(kind, id);
        let (key_id, sealed) = self
            .keys
            .seal_for(Purpose::Reference, &Self::blob_aad(&key, expires_ms), plain)
            .map_err(|e| ReferenceStoreError::Unavailable(format!("sealing a {kind}: {e}")))?;
        // expiry (8 bytes, big endian) | key id length (1 byte) | key id | sealed
        let key_id = key_id.as_bytes();
        let key_id_len = u8::try_from(key_id.len())
            .map_err(|_| ReferenceStoreError::Unavailable("key id too long".into()))?;
        let mut value = Vec::with_capacity(9 + key_id.len() + sealed.len());
        value.extend_from_slice(&expires_ms.to_be_bytes());
        value.push(key_id_len);
        value.extend_from_slice(key_id);
        value.extend_from_slice(&sealed);
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(&key).arg(value).arg("PXAT").arg(expires_ms);
        if !replace {
            cmd.arg("NX");
        }
        let stored: Option<String> = self
            .link
            .run(|mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(stored.is_some())
    }

    /// Takes the blob of `kind` named `id`: exactly one of any number of
    /// concurrent takers, on any replica, gets it; it is gone afterwards.
    /// `None` when absent or expired.
    pub async fn take_sealed(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<SealedBlob>, ReferenceStoreError> {
        let key = self.blob_key(kind, id);
        let mut invocation = self.take_sealed.prepare_invoke();
        invocation.key(&key);
        let value: Option<Vec<u8>> = self
            .link
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let Some(value) = value.map(Zeroizing::new) else {
            return Ok(None);
        };
        let malformed =
            || ReferenceStoreError::Unavailable(format!("a stored {kind} is malformed"));
        let (head, rest) = value.split_at_checked(9).ok_or_else(malformed)?;
        let mut ms = [0u8; 8];
        ms.copy_from_slice(&head[..8]);
        let expires_ms = i64::from_be_bytes(ms);
        let (key_id, sealed) = rest
            .split_at_checked(usize::from(head[8]))
            .ok_or_else(malformed)?;
        if expires_ms <= now_ms() {
            return Ok(None);
        }
        let key_id = std::str::from_utf8(key_id).map_err(|_| malformed())?;
        let plain = self
            .keys
            .open_for(
                Purpose::Reference,
                key_id,
                &Self::blob_aad(&key, expires_ms),
                sealed,
            )
            .map_err(|e| {
                ReferenceStoreError::Unavailable(format!("opening a stored {kind}: {e}"))
            })?;
        Ok(Some(SealedBlob {
            plain,
            expires_at: Self::expires_at(expires_ms)?,
        }))
    }

    /// Whether a live blob of `kind` named `id` is held (nothing taken).
    pub async fn holds_sealed(&self, kind: &str, id: &str) -> Result<bool, ReferenceStoreError> {
        let cmd = ::redis::cmd("GETRANGE")
            .arg(self.blob_key(kind, id))
            .arg(0)
            .arg(7)
            .clone();
        let head: Vec<u8> = self
            .link
            .run(|mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(<[u8; 8]>::try_from(head.as_slice()).is_ok_and(|ms| i64::from_be_bytes(ms) > now_ms()))
    }

    /// Deletes the blob of `kind` named `id`, if any.
    pub async fn delete_sealed(&self, kind: &str, id: &str) -> Result<(), ReferenceStoreError> {
        let cmd = ::redis::cmd("DEL").arg(self.blob_key(kind, id)).clone();
        let _: u64 = self
            .link
            .run(|mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// Runs a Lua script of a store kept beside the references (the
    /// card-capture sessions, [`crate::session::redis`]) on this store's
    /// connection, under its timeout.
    pub async fn invoke<T: ::redis::FromRedisValue>(
        &self,
        invocation: ::redis::ScriptInvocation<'_>,
    ) -> Result<T, ReferenceStoreError> {
        self.link
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
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
            .seal_for(
                Purpose::Reference,
                Self::aad(key, token_id).as_bytes(),
                &plain,
            )
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
            .open_for(
                Purpose::Reference,
                key_id,
                Self::aad(key, token_id).as_bytes(),
                sealed,
            )
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
        let mut invocation = self.issue.prepare_invoke();
        invocation
            .key(&key)
            .key(&self.live_key)
            .key(self.token_key(reference.token_id))
            .arg(now_ms())
            .arg(unix_ms(reference.expires_at))
            .arg(self.max_entries)
            .arg(reference.token_id.to_string())
            .arg(key_id)
            .arg(sealed);
        let (code, live): (i64, u64) = self
            .link
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
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
        let mut invocation = self.take.prepare_invoke();
        invocation
            .key(&key)
            .key(&self.live_key)
            .arg(now_ms())
            .arg(token_id.to_string());
        let (code, live, key_id, sealed, expires): (i64, u64, String, Vec<u8>, i64) = self
            .link
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
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
        let (token, expires, used, key_id, sealed): Fields = {
            let cmd = ::redis::cmd("HMGET")
                .arg(&key)
                .arg(&["t", "e", "u", "k", "p"])
                .clone();
            self.link
                .run(|mut c| async move { cmd.query_async(&mut c).await })
                .await?
        };
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
        let mut invocation = self.restore.prepare_invoke();
        invocation
            .key(&key)
            .key(&self.live_key)
            .arg(now_ms())
            .arg(reference.token_id.to_string())
            .arg(key_id)
            .arg(sealed);
        let (_restored, live): (i64, u64) = self
            .link
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        self.count(live);
        Ok(())
    }

    async fn revoke_token(&self, token_id: TokenId) -> Result<(), ReferenceStoreError> {
        // In batches, each one short script, until the token's index is
        // empty. References issued meanwhile are caught by a later batch;
        // one issued after the last (by a mint that read the token active
        // before the change committed) is refused at the forward, which
        // reads the status from the vault.
        loop {
            let mut invocation = self.revoke.prepare_invoke();
            invocation
                .key(self.token_key(token_id))
                .key(&self.live_key)
                .arg(now_ms())
                .arg(REVOKE_BATCH);
            let (left, live): (u64, u64) = self
                .link
                .run(|mut c| async move { invocation.invoke_async(&mut c).await })
                .await?;
            self.count(live);
            if left == 0 {
                return Ok(());
            }
        }
    }

    fn len(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    async fn ping(&self) -> Result<(), ReferenceStoreError> {
        let _: String = {
            let cmd = ::redis::cmd("PING").clone();
            self.link
                .run(|mut c| async move { cmd.query_async(&mut c).await })
                .await?
        };
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
