//! The durable token store on SQL: SQLite (the embedded default: a file
//! under `data/`, WAL, `synchronous = FULL` so an acknowledged write
//! survives a crash) and PostgreSQL (several replicas sharing one vault).
//!
//! One implementation serves both engines through sqlx's `Any` driver: the
//! SQL below is the common dialect (`$n` parameters, `TEXT`/`BIGINT`
//! columns, `ON CONFLICT DO NOTHING`, `RETURNING`). Secrets are sealed by
//! the [`Keyring`] before they reach a query and stored as base64 text, so
//! no PAN or TPAN digit is ever in the database in the clear. Migrations are
//! versioned in `schema_migrations` and run at start.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::keyring::Keyring;
use super::{
    IdempotencyRecord, Inserted, Metadata, NetworkToken, NetworkTokenType, StoreError, TokenId,
    TokenStatus, TokenStore,
};
use crate::card::{Brand, CardNumber};

/// Versioned migrations; each runs once, in order.
const MIGRATIONS: &[(i64, &[&str])] = &[(
    1,
    &[
        "CREATE TABLE IF NOT EXISTS network_tokens (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            public_json TEXT NOT NULL,
            key_id TEXT NOT NULL,
            secret TEXT NOT NULL,
            atc BIGINT NOT NULL DEFAULT 0,
            updated_at TEXT NOT NULL
        )",
        "CREATE TABLE IF NOT EXISTS idempotency (
            key TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            status BIGINT NOT NULL,
            key_id TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at BIGINT NOT NULL
        )",
        "CREATE INDEX IF NOT EXISTS idempotency_created_at ON idempotency (created_at)",
        "CREATE INDEX IF NOT EXISTS network_tokens_key_id ON network_tokens (key_id)",
    ],
)];

/// The fields of a token that are not secret and never change after
/// provisioning; stored as JSON.
#[derive(Serialize, Deserialize)]
struct PublicFields {
    network_token_type: NetworkTokenType,
    scheme: Brand,
    card_last4: String,
    expiry_month: u8,
    expiry_year: u16,
    pci_token_id: Option<uuid::Uuid>,
    supports_device_binding: bool,
    scheme_reference: String,
    scheme_metadata: Metadata,
    metadata: Metadata,
    dauth_activated: bool,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

/// The SQL token store.
pub struct SqlTokenStore {
    pool: AnyPool,
    keys: Arc<Keyring>,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Result<Vec<u8>, StoreError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| corrupt("ciphertext is not base64"))
}

fn token_aad(id: &str) -> Vec<u8> {
    format!("tokenrelay/network_token/{id}").into_bytes()
}

fn idem_aad(key: &str) -> Vec<u8> {
    format!("tokenrelay/idempotency/{key}").into_bytes()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Result<[u8; 32], StoreError> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return Err(corrupt("bad fingerprint"));
    }
    for (i, c) in s.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(c).map_err(|_| corrupt("bad fingerprint"))?;
        out[i] = u8::from_str_radix(pair, 16).map_err(|_| corrupt("bad fingerprint"))?;
    }
    Ok(out)
}

fn now_text() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

impl SqlTokenStore {
    /// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://…`),
    /// applies engine settings and runs pending migrations.
    pub async fn connect(url: &str, keys: Arc<Keyring>) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            // SQLite serialises writers anyway; a few connections serve reads.
            .max_connections(if is_sqlite { 4 } else { 16 })
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if is_sqlite {
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                            "PRAGMA busy_timeout = 5000",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(unavailable)?;
        let store = Self { pool, keys };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        for (version, statements) in MIGRATIONS {
            let done: Option<i64> =
                sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(unavailable)?
                    .map(|r| r.get::<i64, _>(0));
            if done.is_some() {
                continue;
            }
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            for stmt in *statements {
                sqlx::query(stmt)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(*version)
                .bind(now_text())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            tracing::info!(version, "vault migration applied");
        }
        Ok(())
    }

    fn row_to_token(&self, row: &AnyRow) -> Result<NetworkToken, StoreError> {
        let id: String = row.try_get("id").map_err(unavailable)?;
        let status: String = row.try_get("status").map_err(unavailable)?;
        let public: String = row.try_get("public_json").map_err(unavailable)?;
        let key_id: String = row.try_get("key_id").map_err(unavailable)?;
        let secret: String = row.try_get("secret").map_err(unavailable)?;
        let updated_at: String = row.try_get("updated_at").map_err(unavailable)?;
        let p: PublicFields =
            serde_json::from_str(&public).map_err(|_| corrupt("public fields unreadable"))?;
        let tpan = self
            .keys
            .open(&key_id, &token_aad(&id), &unb64(&secret)?)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let tpan = std::str::from_utf8(&tpan)
            .ok()
            .and_then(CardNumber::parse)
            .ok_or_else(|| corrupt("sealed TPAN malformed"))?;
        Ok(NetworkToken {
            id: TokenId::parse(&id).ok_or_else(|| corrupt("bad id"))?,
            status: TokenStatus::parse(&status).ok_or_else(|| corrupt("bad status"))?,
            network_token_type: p.network_token_type,
            scheme: p.scheme,
            card_last4: p.card_last4,
            expiry_month: p.expiry_month,
            expiry_year: p.expiry_year,
            pci_token_id: p.pci_token_id,
            supports_device_binding: p.supports_device_binding,
            scheme_reference: p.scheme_reference,
            scheme_metadata: p.scheme_metadata,
            metadata: p.metadata,
            dauth_activated: p.dauth_activated,
            created_at: p.created_at,
            updated_at: OffsetDateTime::parse(&updated_at, &Rfc3339)
                .map_err(|_| corrupt("bad updated_at"))?,
            tpan,
        })
    }

    fn row_to_idempotency(&self, row: &AnyRow) -> Result<IdempotencyRecord, StoreError> {
        let key: String = row.try_get("key").map_err(unavailable)?;
        let fingerprint: String = row.try_get("fingerprint").map_err(unavailable)?;
        let status: i64 = row.try_get("status").map_err(unavailable)?;
        let key_id: String = row.try_get("key_id").map_err(unavailable)?;
        let body: String = row.try_get("body").map_err(unavailable)?;
        let created_at: i64 = row.try_get("created_at").map_err(unavailable)?;
        let body = self
            .keys
            .open(&key_id, &idem_aad(&key), &unb64(&body)?)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(IdempotencyRecord {
            fingerprint: unhex32(&fingerprint)?,
            status: u16::try_from(status).map_err(|_| corrupt("bad status"))?,
            body: body.to_vec(),
            created_at: OffsetDateTime::from_unix_timestamp(created_at)
                .map_err(|_| corrupt("bad created_at"))?,
            key,
        })
    }

    fn sealed_idempotency(&self, r: &IdempotencyRecord) -> Result<(String, String), StoreError> {
        let (key_id, body) = self
            .keys
            .seal(&idem_aad(&r.key), &r.body)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok((key_id, b64(&body)))
    }

    async fn insert_idempotency<'c, E>(
        &self,
        exec: E,
        r: &IdempotencyRecord,
    ) -> Result<bool, StoreError>
    where
        E: sqlx::Executor<'c, Database = sqlx::Any>,
    {
        let (key_id, body) = self.sealed_idempotency(r)?;
        let done = sqlx::query(
            "INSERT INTO idempotency (key, fingerprint, status, key_id, body, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(r.key.clone())
        .bind(hex(&r.fingerprint))
        .bind(i64::from(r.status))
        .bind(key_id)
        .bind(body)
        .bind(r.created_at.unix_timestamp())
        .execute(exec)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn read_idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT key, fingerprint, status, key_id, body, created_at FROM idempotency WHERE key = $1",
        )
        .bind(key.to_owned())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| self.row_to_idempotency(&r)).transpose()
    }

    async fn get_token(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        let row = sqlx::query(
            "SELECT id, status, public_json, key_id, secret, updated_at FROM network_tokens WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| self.row_to_token(&r).map(Arc::new)).transpose()
    }
}

#[async_trait]
impl TokenStore for SqlTokenStore {
    async fn insert(
        &self,
        token: NetworkToken,
        idempotency: Option<IdempotencyRecord>,
    ) -> Result<Inserted, StoreError> {
        let id = token.id.to_string();
        let public = serde_json::to_string(&PublicFields {
            network_token_type: token.network_token_type,
            scheme: token.scheme,
            card_last4: token.card_last4.clone(),
            expiry_month: token.expiry_month,
            expiry_year: token.expiry_year,
            pci_token_id: token.pci_token_id,
            supports_device_binding: token.supports_device_binding,
            scheme_reference: token.scheme_reference.clone(),
            scheme_metadata: token.scheme_metadata.clone(),
            metadata: token.metadata.clone(),
            dauth_activated: token.dauth_activated,
            created_at: token.created_at,
        })
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let (key_id, sealed) = self
            .keys
            .seal(&token_aad(&id), token.tpan.expose().as_bytes())
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        if let Some(rec) = &idempotency {
            if !self.insert_idempotency(&mut *tx, rec).await? {
                tx.rollback().await.map_err(unavailable)?;
                return match self.read_idempotency(&rec.key).await? {
                    Some(existing) => Ok(Inserted::IdempotencyExists(existing)),
                    None => Err(StoreError::Unavailable(
                        "idempotency record vanished during insert".into(),
                    )),
                };
            }
        }
        sqlx::query(
            "INSERT INTO network_tokens (id, status, public_json, key_id, secret, atc, updated_at)
             VALUES ($1, $2, $3, $4, $5, 0, $6)",
        )
        .bind(id)
        .bind(token.status.as_str())
        .bind(public)
        .bind(key_id)
        .bind(b64(&sealed))
        .bind(token.updated_at.format(&Rfc3339).unwrap_or_default())
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Inserted::Stored)
    }

    async fn get(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        self.get_token(id).await
    }

    async fn set_status(
        &self,
        id: TokenId,
        status: TokenStatus,
    ) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        let done =
            sqlx::query("UPDATE network_tokens SET status = $1, updated_at = $2 WHERE id = $3")
                .bind(status.as_str())
                .bind(now_text())
                .bind(id.to_string())
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.get_token(id).await
    }

    async fn next_counter(&self, id: TokenId) -> Result<u64, StoreError> {
        let row =
            sqlx::query("UPDATE network_tokens SET atc = atc + 1 WHERE id = $1 RETURNING atc")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("token vanished"))?;
        let atc: i64 = row.try_get(0).map_err(unavailable)?;
        Ok(atc as u64)
    }

    async fn get_idempotency(
        &self,
        key: &str,
        max_age: Duration,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self
            .read_idempotency(key)
            .await?
            .filter(|r| r.created_at + max_age > OffsetDateTime::now_utc()))
    }

    async fn put_idempotency(
        &self,
        record: IdempotencyRecord,
        max_age: Duration,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let horizon = (OffsetDateTime::now_utc() - max_age).unix_timestamp();
        sqlx::query("DELETE FROM idempotency WHERE created_at < $1")
            .bind(horizon)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        if self.insert_idempotency(&self.pool, &record).await? {
            return Ok(None);
        }
        self.read_idempotency(&record.key).await
    }

    async fn rotate_batch(&self, batch: usize) -> Result<usize, StoreError> {
        let active = self.keys.active_id().to_owned();
        let limit = batch as i64;
        let mut done = 0;
        let rows = sqlx::query(
            "SELECT id, key_id, secret FROM network_tokens WHERE key_id <> $1 LIMIT $2",
        )
        .bind(active.clone())
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        for row in rows {
            let (id, key_id, secret): (String, String, String) = (
                row.try_get(0).map_err(unavailable)?,
                row.try_get(1).map_err(unavailable)?,
                row.try_get(2).map_err(unavailable)?,
            );
            let aad = token_aad(&id);
            let plain = self
                .keys
                .open(&key_id, &aad, &unb64(&secret)?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let (new_id, sealed) = self
                .keys
                .seal(&aad, &plain)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            // Compare-and-set: a concurrent writer's change wins.
            let r = sqlx::query(
                "UPDATE network_tokens SET key_id = $1, secret = $2 WHERE id = $3 AND key_id = $4 AND secret = $5",
            )
            .bind(new_id)
            .bind(b64(&sealed))
            .bind(id)
            .bind(key_id)
            .bind(secret)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            done += r.rows_affected() as usize;
        }
        let rows = sqlx::query(
            "SELECT key, fingerprint, status, key_id, body, created_at FROM idempotency WHERE key_id <> $1 LIMIT $2",
        )
        .bind(active)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        for row in rows {
            let old_key_id: String = row.try_get("key_id").map_err(unavailable)?;
            let old_body: String = row.try_get("body").map_err(unavailable)?;
            let rec = self.row_to_idempotency(&row)?;
            let (key_id, body) = self.sealed_idempotency(&rec)?;
            let r = sqlx::query(
                "UPDATE idempotency SET key_id = $1, body = $2 WHERE key = $3 AND key_id = $4 AND body = $5",
            )
            .bind(key_id)
            .bind(body)
            .bind(rec.key)
            .bind(old_key_id)
            .bind(old_body)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            done += r.rows_affected() as usize;
        }
        Ok(done)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
