//! The durable token store on SQL: SQLite (the embedded default: a file
//! under `data/`, WAL, `synchronous = FULL` so an acknowledged write
//! survives a crash) and PostgreSQL (several replicas sharing one vault).
//!
//! One implementation serves both engines through sqlx's `Any` driver: the
//! SQL below is the common dialect (`$n` parameters, `TEXT`/`BIGINT`
//! columns, `ON CONFLICT DO NOTHING`, `RETURNING`). Secrets are sealed by
//! the [`Keyring`] before they reach a query and stored as base64 text, so
//! no PAN or TPAN digit is ever in the database in the clear. Migrations are
//! versioned in `schema_migrations` and run at start, under a lock (see
//! `migrate`) so replicas starting together do not race.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::keyring::{Keyring, Purpose};
use super::{
    IdempotencyRecord, Inserted, Metadata, NetworkToken, NetworkTokenType, PciToken, PciTokenId,
    RotationCursor, RotationStep, StoreError, TokenChange, TokenId, TokenLookup, TokenStatus,
    TokenStore,
};
use crate::card::{Brand, CardNumber};

mod inline;

/// Versioned migrations; each runs once, in order.
const MIGRATIONS: &[(i64, &[&str])] = &[
    (
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
    ),
    (
        2,
        &[
            "CREATE TABLE IF NOT EXISTS pci_tokens (
            id TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL UNIQUE,
            public_json TEXT NOT NULL,
            key_id TEXT NOT NULL,
            secret TEXT NOT NULL,
            created_at TEXT NOT NULL
        )",
            "CREATE INDEX IF NOT EXISTS pci_tokens_key_id ON pci_tokens (key_id)",
        ],
    ),
    (
        3,
        // Lookups for the compatible surfaces: a card's tokens, and a token
        // by its number (keyed fingerprint, never the number). Rows from
        // before are filled in by `backfill_lookups` at start.
        &[
            "ALTER TABLE network_tokens ADD COLUMN pci_token_id TEXT",
            "ALTER TABLE network_tokens ADD COLUMN tpan_fingerprint TEXT",
            "CREATE INDEX IF NOT EXISTS network_tokens_pci_token_id ON network_tokens (pci_token_id)",
            "CREATE INDEX IF NOT EXISTS network_tokens_tpan_fingerprint ON network_tokens (tpan_fingerprint)",
        ],
    ),
];

/// Tables whose `secret` column is sealed with `<aad prefix><id>` as
/// associated data; rotation walks each.
const SEALED_TABLES: &[(&str, &str)] = &[
    ("network_tokens", "tokenrelay/network_token/"),
    ("pci_tokens", "tokenrelay/pci_token/"),
];

/// Non-secret fields of a PCI token; the PAN and the cardholder name are
/// sealed together in `secret`.
#[derive(Serialize, Deserialize)]
struct PciPublic {
    scheme: Brand,
    expiry_month: u8,
    expiry_year: u16,
    metadata: Metadata,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

#[derive(Serialize, Deserialize)]
struct PciSecret {
    pan: String,
    cardholder_name: Option<String>,
}

impl Drop for PciSecret {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.pan.zeroize();
    }
}

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

/// Key of the PostgreSQL advisory lock migrations hold (`tokenrelay`
/// in ASCII): advisory locks are per database, so every tokenrelay sharing
/// the database — whatever its schema — migrates one at a time.
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e72_656c;

/// The SQL token store.
pub struct SqlTokenStore {
    pool: AnyPool,
    /// SQLite (else PostgreSQL): picks the migration lock.
    is_sqlite: bool,
    keys: Arc<Keyring>,
    /// Transaction counters reserved in the database and not yet handed
    /// out, per token (see [`ATC_BLOCK`]).
    atc: std::sync::Mutex<std::collections::HashMap<TokenId, AtcBlock>>,
    /// SQLite only: this process's writers take turns here (see
    /// [`SqlTokenStore::write_turn`]).
    writers: Option<tokio::sync::Mutex<()>>,
    /// SQLite on a file only: the status read on the calling thread (see
    /// [`inline`]).
    inline: Option<inline::InlineReads>,
}

/// Counters reserved by one database write (hi-lo). The `atc` column holds
/// the highest counter this or any replica may have handed out, and is
/// durable before any of the block is used: after a crash or on another
/// replica the next block starts above it, so a counter never repeats. The
/// price: up to `ATC_BLOCK - 1` unused counters per token at each restart
/// (a gap, which an ATC may have), and with several replicas the counters of
/// one token are unique but interleave.
const ATC_BLOCK: u64 = 32;

/// Rounds of [`TokenStore::insert_pci`]'s read and conditional write
/// before it gives up: each lost round means another writer's change to
/// the same card committed, so this bounds a storm, not normal traffic.
const PCI_REISSUE_ATTEMPTS: usize = 16;

/// Tokens whose unused block is kept; past this the blocks are dropped
/// (gaps, never repeats).
const ATC_BLOCKS_KEPT: usize = 100_000;

/// The reserved counters `next..=last` of one token.
#[derive(Debug, Clone, Copy)]
struct AtcBlock {
    next: u64,
    last: u64,
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
    format!("{}{id}", SEALED_TABLES[0].1).into_bytes()
}

fn pci_aad(id: &str) -> Vec<u8> {
    format!("{}{id}", SEALED_TABLES[1].1).into_bytes()
}

fn public_json(token: &NetworkToken) -> Result<String, StoreError> {
    serde_json::to_string(&PublicFields {
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
    .map_err(|e| StoreError::Unavailable(e.to_string()))
}

fn idem_aad(key: &str) -> Vec<u8> {
    format!("tokenrelay/idempotency/{key}").into_bytes()
}

/// The latest `created_at` column value (whole seconds) of a record that
/// is dead at `horizon`: [`TokenStore::get_idempotency`] reads a row back as
/// created at its whole second `s` and keeps it only when `s > horizon`,
/// so exactly the rows with `s <= floor(horizon)` are dead.
fn dead_at_or_before(horizon: OffsetDateTime) -> i64 {
    horizon.unix_timestamp()
}

/// An idempotency key as the `key` column holds it: `%` and NUL escaped,
/// since PostgreSQL text cannot hold NUL and the API's keys contain it.
fn db_key(key: &str) -> String {
    key.replace('%', "%25").replace('\0', "%00")
}

/// The idempotency key from its column form. A NUL means a row written
/// unescaped (SQLite, before escaping): taken as is.
fn from_db_key(stored: String) -> String {
    if stored.contains('\0') {
        return stored;
    }
    stored.replace("%00", "\0").replace("%25", "%")
}

fn unhex32(s: &str) -> Result<[u8; 32], StoreError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| corrupt("bad fingerprint"))?;
    Ok(out)
}

/// A token's status and last change from their columns.
fn status_columns(
    status: &str,
    updated_at: &str,
) -> Result<(TokenStatus, OffsetDateTime), StoreError> {
    Ok((
        TokenStatus::parse(status).ok_or_else(|| corrupt("bad status"))?,
        OffsetDateTime::parse(updated_at, &Rfc3339).map_err(|_| corrupt("bad updated_at"))?,
    ))
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
                        // busy_timeout first: replicas opening one new file
                        // at once wait for each other's journal switch.
                        for pragma in [
                            "PRAGMA busy_timeout = 5000",
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
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
        let store = Self {
            pool,
            is_sqlite,
            keys,
            atc: Default::default(),
            writers: is_sqlite.then(|| tokio::sync::Mutex::new(())),
            inline: None,
        };
        store.migrate().await?;
        store.backfill_lookups().await?;
        // After the migrations: the file and its table exist now.
        let inline = match is_sqlite {
            true => sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .ok()
                .and_then(|o| inline::InlineReads::new(o.get_filename())),
            false => None,
        };
        Ok(Self { inline, ..store })
    }

    /// A turn to write, on SQLite. A file has one writer at a time, and
    /// SQLite's busy handler makes the others poll with growing sleeps, in
    /// no order: under a steady stream of writes (a rotation beside
    /// provisioning, with an fsync per commit) one writer can lose every
    /// race until `busy_timeout` runs out and fail with "database is
    /// locked". This process's writers queue here instead — tokio's mutex
    /// is fair, first come first served — each for one statement or one
    /// transaction, so the file's lock is only contended by other
    /// processes sharing it, which `busy_timeout` still arbitrates.
    /// PostgreSQL has row locks and needs no turn (`None`).
    async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.writers {
            Some(writers) => Some(writers.lock().await),
            None => None,
        }
    }

    fn atc_blocks(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<TokenId, AtcBlock>> {
        // Plain data: a poisoned lock still holds usable blocks.
        self.atc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs pending migrations as one transaction that holds the database's
    /// migration lock: on PostgreSQL a transaction-scoped advisory lock
    /// ([`MIGRATION_LOCK`]), on SQLite the file's write lock (`BEGIN
    /// IMMEDIATE`, waited for under `busy_timeout`). Any number of replicas
    /// may start at once on an empty database: one migrates, the others
    /// wait for it, then find nothing to do. Both engines' DDL is
    /// transactional, so a migrator that dies leaves nothing half done.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = if self.is_sqlite {
            self.pool.begin_with("BEGIN IMMEDIATE").await
        } else {
            self.pool.begin().await
        }
        .map_err(unavailable)?;
        if !self.is_sqlite {
            // Released at commit or rollback, or when the connection dies.
            sqlx::query("SELECT 1 AS locked FROM pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        for (version, statements) in MIGRATIONS {
            let done: Option<i64> =
                sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(unavailable)?
                    .map(|r| r.get::<i64, _>(0));
            if done.is_some() {
                continue;
            }
            for stmt in *statements {
                sqlx::query(stmt)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(*version)
                .bind(now_text())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            tracing::info!(version, "vault migration applied");
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    /// Fills the lookup columns of migration 3 for tokens stored before
    /// it, in id order and in batches; a row that cannot be opened is left
    /// as it is (key rotation reports it) and passed over.
    async fn backfill_lookups(&self) -> Result<(), StoreError> {
        let mut after = String::new();
        loop {
            let rows = sqlx::query(
                "SELECT id, status, public_json, key_id, secret, updated_at FROM network_tokens
                 WHERE tpan_fingerprint IS NULL AND id > $1 ORDER BY id LIMIT 500",
            )
            .bind(after.clone())
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            after = last.try_get("id").map_err(unavailable)?;
            for row in &rows {
                let Ok(token) = self.row_to_token(row) else {
                    continue;
                };
                sqlx::query(
                    "UPDATE network_tokens SET pci_token_id = $1, tpan_fingerprint = $2 WHERE id = $3",
                )
                .bind(token.pci_token_id.map(|p| p.to_string()))
                .bind(hex::encode(self.keys.fingerprint(token.tpan.expose())))
                .bind(token.id.to_string())
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
            }
        }
    }

    /// The `id`, parsed `public_json` and opened `secret` of a sealed row.
    fn open_row<P: serde::de::DeserializeOwned>(
        &self,
        row: &AnyRow,
        aad: fn(&str) -> Vec<u8>,
    ) -> Result<(String, P, zeroize::Zeroizing<Vec<u8>>), StoreError> {
        let id: String = row.try_get("id").map_err(unavailable)?;
        let public: String = row.try_get("public_json").map_err(unavailable)?;
        let key_id: String = row.try_get("key_id").map_err(unavailable)?;
        let secret: String = row.try_get("secret").map_err(unavailable)?;
        let p: P =
            serde_json::from_str(&public).map_err(|_| corrupt("public fields unreadable"))?;
        let opened = self
            .keys
            .open(&key_id, &aad(&id), &unb64(&secret)?)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok((id, p, opened))
    }

    fn row_to_token(&self, row: &AnyRow) -> Result<NetworkToken, StoreError> {
        let status: String = row.try_get("status").map_err(unavailable)?;
        let updated_at: String = row.try_get("updated_at").map_err(unavailable)?;
        let (id, p, tpan): (String, PublicFields, _) = self.open_row(row, token_aad)?;
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

    fn row_to_pci(&self, row: &AnyRow) -> Result<PciToken, StoreError> {
        let fingerprint: String = row.try_get("fingerprint").map_err(unavailable)?;
        let (id, p, opened): (String, PciPublic, _) = self.open_row(row, pci_aad)?;
        let sealed: PciSecret =
            serde_json::from_slice(&opened).map_err(|_| corrupt("sealed card unreadable"))?;
        Ok(PciToken {
            id: uuid::Uuid::try_parse(&id).map_err(|_| corrupt("bad id"))?,
            pan: CardNumber::parse(&sealed.pan).ok_or_else(|| corrupt("sealed PAN malformed"))?,
            scheme: p.scheme,
            expiry_month: p.expiry_month,
            expiry_year: p.expiry_year,
            cardholder_name: sealed.cardholder_name.clone(),
            metadata: p.metadata,
            fingerprint: unhex32(&fingerprint)?,
            created_at: p.created_at,
        })
    }

    fn row_to_idempotency(&self, row: &AnyRow) -> Result<IdempotencyRecord, StoreError> {
        let key = from_db_key(row.try_get("key").map_err(unavailable)?);
        let fingerprint: String = row.try_get("fingerprint").map_err(unavailable)?;
        let status: i64 = row.try_get("status").map_err(unavailable)?;
        let key_id: String = row.try_get("key_id").map_err(unavailable)?;
        let body: String = row.try_get("body").map_err(unavailable)?;
        let created_at: i64 = row.try_get("created_at").map_err(unavailable)?;
        let body = self
            .keys
            .open_for(
                Purpose::Idempotency,
                &key_id,
                &idem_aad(&key),
                &unb64(&body)?,
            )
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
            .seal_for(Purpose::Idempotency, &idem_aad(&r.key), &r.body)
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
        .bind(db_key(&r.key))
        .bind(hex::encode(r.fingerprint))
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
        .bind(db_key(key))
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| self.row_to_idempotency(&r)).transpose()
    }

    /// One rotation step over a sealed table: rows under an old key after
    /// the cursor, in id order.
    async fn rotate_table(
        &self,
        table: &'static str,
        aad_prefix: &str,
        cursor: &mut RotationCursor,
        limit: i64,
        step: &mut RotationStep,
    ) -> Result<(), StoreError> {
        let active = self.keys.active_id().to_owned();
        let rows = sqlx::query(&format!(
            "SELECT id, key_id, secret FROM {table} WHERE key_id <> $1 AND id > $2 ORDER BY id LIMIT $3"
        ))
        .bind(active)
        .bind(cursor.after(table).to_owned())
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
            step.visited += 1;
            cursor.visited(table, id.clone());
            let aad = format!("{aad_prefix}{id}").into_bytes();
            let plain = match unb64(&secret).and_then(|sealed| {
                self.keys
                    .open(&key_id, &aad, &sealed)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            }) {
                Ok(plain) => plain,
                Err(e) => {
                    // Named, so the operator can find it (ids are not secret).
                    step.unreadable
                        .push(format!("{table} row {id} (key {key_id:?}): {e}"));
                    continue;
                }
            };
            let (new_id, sealed) = self
                .keys
                .seal(&aad, &plain)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            // Compare-and-set: a concurrent writer's change wins.
            let turn = self.write_turn().await;
            let r = sqlx::query(&format!(
                "UPDATE {table} SET key_id = $1, secret = $2 WHERE id = $3 AND key_id = $4 AND secret = $5"
            ))
            .bind(new_id)
            .bind(b64(&sealed))
            .bind(id)
            .bind(key_id)
            .bind(secret)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            drop(turn);
            step.rotated += r.rows_affected() as usize;
        }
        Ok(())
    }

    /// The `public_json`, `key_id` and base64 `secret` columns of a PCI
    /// token: the PAN and the cardholder name sealed together, bound to
    /// the row's id.
    fn seal_pci(&self, token: &PciToken) -> Result<(String, String, String), StoreError> {
        let public = serde_json::to_string(&PciPublic {
            scheme: token.scheme,
            expiry_month: token.expiry_month,
            expiry_year: token.expiry_year,
            metadata: token.metadata.clone(),
            created_at: token.created_at,
        })
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let secret = zeroize::Zeroizing::new(
            serde_json::to_vec(&PciSecret {
                pan: token.pan.expose().to_owned(),
                cardholder_name: token.cardholder_name.clone(),
            })
            .map_err(|e| StoreError::Unavailable(e.to_string()))?,
        );
        let (key_id, sealed) = self
            .keys
            .seal(&pci_aad(&token.id.to_string()), &secret)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok((public, key_id, b64(&sealed)))
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
        idempotency: Option<(IdempotencyRecord, OffsetDateTime)>,
    ) -> Result<Inserted, StoreError> {
        let id = token.id.to_string();
        let public = public_json(&token)?;
        let (key_id, sealed) = self
            .keys
            .seal(&token_aad(&id), token.tpan.expose().as_bytes())
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        // One turn for the whole transaction, released when `turn` drops.
        let turn = self.write_turn().await;
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        if let Some((rec, horizon)) = &idempotency {
            // An expired record under the key gives way, in this
            // transaction; a live one makes the insert below conflict.
            sqlx::query("DELETE FROM idempotency WHERE key = $1 AND created_at <= $2")
                .bind(db_key(&rec.key))
                .bind(dead_at_or_before(*horizon))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            if !self.insert_idempotency(&mut *tx, rec).await? {
                tx.rollback().await.map_err(unavailable)?;
                drop(turn);
                return match self.read_idempotency(&rec.key).await? {
                    Some(existing) => Ok(Inserted::IdempotencyExists(existing)),
                    None => Err(StoreError::Unavailable(
                        "idempotency record vanished during insert".into(),
                    )),
                };
            }
        }
        sqlx::query(
            "INSERT INTO network_tokens (id, status, public_json, key_id, secret, atc, updated_at, pci_token_id, tpan_fingerprint)
             VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8)",
        )
        .bind(id)
        .bind(token.status.as_str())
        .bind(public)
        .bind(key_id)
        .bind(b64(&sealed))
        .bind(token.updated_at.format(&Rfc3339).unwrap_or_default())
        .bind(token.pci_token_id.map(|p| p.to_string()))
        .bind(hex::encode(self.keys.fingerprint(token.tpan.expose())))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Inserted::Stored)
    }

    async fn get(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        self.get_token(id).await
    }

    async fn find_tokens(&self, by: TokenLookup<'_>) -> Result<Vec<Arc<NetworkToken>>, StoreError> {
        let (column, value) = match by {
            TokenLookup::Card(card) => ("pci_token_id", card.to_string()),
            TokenLookup::Number(n) => (
                "tpan_fingerprint",
                hex::encode(self.keys.fingerprint(n.expose())),
            ),
        };
        let rows = sqlx::query(&format!(
            "SELECT id, status, public_json, key_id, secret, updated_at FROM network_tokens WHERE {column} = $1"
        ))
        .bind(value)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let mut found = rows
            .iter()
            .map(|r| self.row_to_token(r).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        found.sort_by_key(|t| (t.created_at, t.id));
        Ok(found)
    }

    /// On SQLite this is an inline read (see [`inline`]): it is on every
    /// forward's path. The pool answers when the file is busy, waiting its
    /// `busy_timeout`, and when the inline read failed.
    async fn status_now(
        &self,
        id: TokenId,
    ) -> Result<Option<(TokenStatus, OffsetDateTime)>, StoreError> {
        let id = id.to_string();
        if let Some(inline) = &self.inline {
            match inline.status(&id) {
                inline::Read::Row(None) => return Ok(None),
                inline::Read::Row(Some((status, updated_at))) => {
                    return status_columns(&status, &updated_at).map(Some)
                }
                inline::Read::Busy => {}
                inline::Read::Failed(error) => {
                    tracing::warn!(%error, "inline status read failed; reading through the pool");
                }
            }
        }
        let row = sqlx::query("SELECT status, updated_at FROM network_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let status: String = row.try_get(0).map_err(unavailable)?;
        let updated_at: String = row.try_get(1).map_err(unavailable)?;
        status_columns(&status, &updated_at).map(Some)
    }

    async fn update(
        &self,
        id: TokenId,
        change: TokenChange,
    ) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        // Optimistic: read, change, write only if nobody wrote in between.
        for _ in 0..8 {
            let row = sqlx::query(
                "SELECT id, status, public_json, key_id, secret, updated_at FROM network_tokens WHERE id = $1",
            )
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let old_public: String = row.try_get("public_json").map_err(unavailable)?;
            let old_status: String = row.try_get("status").map_err(unavailable)?;
            let mut token = self.row_to_token(&row)?;
            // The lifecycle is checked against this fresh read, and the write
            // below lands only if the row is still what was read: a change
            // racing in from another replica makes this loop read again.
            if !change.apply(&mut token)? {
                return Ok(Some(Arc::new(token)));
            }
            let turn = self.write_turn().await;
            let done = sqlx::query(
                "UPDATE network_tokens SET status = $1, public_json = $2, updated_at = $3
                 WHERE id = $4 AND public_json = $5 AND status = $6 AND status <> 'deleted'",
            )
            .bind(token.status.as_str())
            .bind(public_json(&token)?)
            .bind(token.updated_at.format(&Rfc3339).unwrap_or_default())
            .bind(id.to_string())
            .bind(old_public)
            .bind(old_status)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            drop(turn);
            if done.rows_affected() == 1 {
                return Ok(Some(Arc::new(token)));
            }
        }
        Err(StoreError::Unavailable(
            "token kept changing under update".into(),
        ))
    }

    fn fingerprint(&self, pan: &CardNumber) -> [u8; 32] {
        self.keys.fingerprint(pan.expose())
    }

    async fn insert_pci(&self, token: PciToken) -> Result<(Arc<PciToken>, bool), StoreError> {
        let (public, key_id, secret) = self.seal_pci(&token)?;
        let fingerprint = hex::encode(token.fingerprint);
        // Optimistic, as `update`: insert, or read the stored card and
        // write its reissue only if the row is still what was read (public
        // fields and sealed secret both), so of two reissues racing in from
        // any replica neither is lost and the later expiry stands.
        let mut insert = true;
        for _ in 0..PCI_REISSUE_ATTEMPTS {
            if insert {
                let turn = self.write_turn().await;
                let done = sqlx::query(
                    "INSERT INTO pci_tokens (id, fingerprint, public_json, key_id, secret, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                )
                .bind(token.id.to_string())
                .bind(fingerprint.clone())
                .bind(public.clone())
                .bind(key_id.clone())
                .bind(secret.clone())
                .bind(token.created_at.format(&Rfc3339).unwrap_or_default())
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
                drop(turn);
                if done.rows_affected() == 1 {
                    return Ok((Arc::new(token), true));
                }
            }
            let row = sqlx::query(
                "SELECT id, fingerprint, public_json, key_id, secret FROM pci_tokens WHERE fingerprint = $1",
            )
            .bind(fingerprint.clone())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
            let Some(row) = row else {
                // Deleted between the insert and the read: insert again.
                insert = true;
                continue;
            };
            insert = false;
            let mut stored = self.row_to_pci(&row)?;
            if !stored.reissue_from(&token) {
                return Ok((Arc::new(stored), false));
            }
            let old_public: String = row.try_get("public_json").map_err(unavailable)?;
            let old_key_id: String = row.try_get("key_id").map_err(unavailable)?;
            let old_secret: String = row.try_get("secret").map_err(unavailable)?;
            // Sealed afresh under the active key, bound to the stored row's
            // id as every PCI row is.
            let (new_public, new_key_id, new_secret) = self.seal_pci(&stored)?;
            let turn = self.write_turn().await;
            let done = sqlx::query(
                "UPDATE pci_tokens SET public_json = $1, key_id = $2, secret = $3
                 WHERE id = $4 AND public_json = $5 AND key_id = $6 AND secret = $7",
            )
            .bind(new_public)
            .bind(new_key_id)
            .bind(new_secret)
            .bind(stored.id.to_string())
            .bind(old_public)
            .bind(old_key_id)
            .bind(old_secret)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            drop(turn);
            if done.rows_affected() == 1 {
                return Ok((Arc::new(stored), false));
            }
        }
        Err(StoreError::Unavailable(
            "PCI token kept changing under insert".into(),
        ))
    }

    async fn get_pci(&self, id: PciTokenId) -> Result<Option<Arc<PciToken>>, StoreError> {
        let row = sqlx::query(
            "SELECT id, fingerprint, public_json, key_id, secret FROM pci_tokens WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| self.row_to_pci(&r).map(Arc::new)).transpose()
    }

    async fn delete_pci(&self, id: PciTokenId) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query("DELETE FROM pci_tokens WHERE id = $1")
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn next_counter(&self, id: TokenId) -> Result<u64, StoreError> {
        if let Some(b) = self.atc_blocks().get_mut(&id) {
            if b.next <= b.last {
                b.next += 1;
                return Ok(b.next - 1);
            }
        }
        let turn = self.write_turn().await;
        let row =
            sqlx::query("UPDATE network_tokens SET atc = atc + $2 WHERE id = $1 RETURNING atc")
                .bind(id.to_string())
                .bind(ATC_BLOCK as i64)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("token vanished"))?;
        drop(turn);
        let last = row.try_get::<i64, _>(0).map_err(unavailable)? as u64;
        let first = last + 1 - ATC_BLOCK;
        let mut blocks = self.atc_blocks();
        if blocks.len() >= ATC_BLOCKS_KEPT {
            blocks.clear();
        }
        // A block reserved meanwhile by a concurrent call stays if it is
        // above this one (counters handed out here keep increasing); this
        // block's rest is then a gap.
        let keep_theirs = blocks.get(&id).is_some_and(|b| b.last > last);
        if !keep_theirs {
            blocks.insert(
                id,
                AtcBlock {
                    next: first + 1,
                    last,
                },
            );
        }
        Ok(first)
    }

    async fn get_idempotency(
        &self,
        key: &str,
        horizon: OffsetDateTime,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self
            .read_idempotency(key)
            .await?
            .filter(|r| r.created_at > horizon))
    }

    async fn put_idempotency(
        &self,
        record: IdempotencyRecord,
        horizon: OffsetDateTime,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let turn = self.write_turn().await;
        sqlx::query("DELETE FROM idempotency WHERE created_at <= $1")
            .bind(dead_at_or_before(horizon))
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        let inserted = self.insert_idempotency(&self.pool, &record).await?;
        drop(turn);
        if inserted {
            return Ok(None);
        }
        self.read_idempotency(&record.key).await
    }

    async fn finish_idempotency(&self, record: IdempotencyRecord) -> Result<bool, StoreError> {
        let (key_id, body) = self.sealed_idempotency(&record)?;
        let turn = self.write_turn().await;
        let done = sqlx::query(
            "UPDATE idempotency SET status = $1, key_id = $2, body = $3
             WHERE key = $4 AND fingerprint = $5 AND status = $6",
        )
        .bind(i64::from(record.status))
        .bind(key_id)
        .bind(body)
        .bind(db_key(&record.key))
        .bind(hex::encode(record.fingerprint))
        .bind(i64::from(IdempotencyRecord::IN_FLIGHT))
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        drop(turn);
        Ok(done.rows_affected() == 1)
    }

    async fn release_idempotency(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
    ) -> Result<(), StoreError> {
        let turn = self.write_turn().await;
        sqlx::query("DELETE FROM idempotency WHERE key = $1 AND fingerprint = $2 AND status = $3")
            .bind(db_key(key))
            .bind(hex::encode(fingerprint))
            .bind(i64::from(IdempotencyRecord::IN_FLIGHT))
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        drop(turn);
        Ok(())
    }

    async fn rotate_batch(
        &self,
        cursor: &mut RotationCursor,
        batch: usize,
    ) -> Result<RotationStep, StoreError> {
        let limit = batch as i64;
        let mut step = RotationStep::default();
        for (table, aad_prefix) in SEALED_TABLES {
            self.rotate_table(table, aad_prefix, cursor, limit, &mut step)
                .await?;
        }
        let rows = sqlx::query(
            "SELECT key, fingerprint, status, key_id, body, created_at FROM idempotency WHERE key_id <> $1 AND key > $2 ORDER BY key LIMIT $3",
        )
        .bind(self.keys.active_id().to_owned())
        .bind(cursor.after("idempotency").to_owned())
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        for row in rows {
            let stored_key: String = row.try_get("key").map_err(unavailable)?;
            let old_key_id: String = row.try_get("key_id").map_err(unavailable)?;
            let old_body: String = row.try_get("body").map_err(unavailable)?;
            step.visited += 1;
            cursor.visited("idempotency", stored_key.clone());
            let rec = match self.row_to_idempotency(&row) {
                Ok(rec) => rec,
                Err(e) => {
                    step.unreadable.push(format!(
                        "idempotency row {stored_key:?} (key {old_key_id:?}): {e}"
                    ));
                    continue;
                }
            };
            let (key_id, body) = self.sealed_idempotency(&rec)?;
            let turn = self.write_turn().await;
            let r = sqlx::query(
                "UPDATE idempotency SET key_id = $1, body = $2 WHERE key = $3 AND key_id = $4 AND body = $5",
            )
            .bind(key_id)
            .bind(body)
            .bind(stored_key)
            .bind(old_key_id)
            .bind(old_body)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            drop(turn);
            step.rotated += r.rows_affected() as usize;
        }
        Ok(step)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod durability_tests {
    use super::*;

    /// The durability setting itself, read back from every connection the
    /// pool opens (`synchronous` is per connection, so a file on disk cannot
    /// show it): `FULL` (2) fsyncs the WAL at each commit, so an acknowledged
    /// write survives power loss, not only a killed process. The kill -9
    /// test in `tests/vault.rs` cannot tell `FULL` from `OFF` (the page
    /// cache survives SIGKILL); this one can.
    #[tokio::test]
    async fn sqlite_connections_open_with_wal_and_synchronous_full() {
        let dir = tempfile::tempdir().unwrap();
        // The URL `vault::open` builds for `backend = "sqlite"`.
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("v.db").display());
        let store = SqlTokenStore::connect(&url, Arc::new(Keyring::ephemeral()))
            .await
            .unwrap();
        let max = store.pool.options().get_max_connections();
        // Hold them all at once so each is a separate connection.
        let mut held = Vec::new();
        for _ in 0..max {
            held.push(store.pool.acquire().await.unwrap());
        }
        for conn in &mut held {
            let synchronous: i64 = sqlx::query("PRAGMA synchronous")
                .fetch_one(&mut **conn)
                .await
                .unwrap()
                .get(0);
            assert_eq!(synchronous, 2, "PRAGMA synchronous is not FULL");
            let journal: String = sqlx::query("PRAGMA journal_mode")
                .fetch_one(&mut **conn)
                .await
                .unwrap()
                .get(0);
            assert_eq!(journal, "wal");
        }
    }

    /// A store on a new file holding one active token, whose inline reads
    /// go to `file` in the same directory instead (set up by `prepare`),
    /// to stand in for its own file failing one way or another.
    async fn reading_inline_from(
        dir: &tempfile::TempDir,
        file: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> (SqlTokenStore, TokenId) {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("v.db").display());
        let store = SqlTokenStore::connect(&url, Arc::new(Keyring::ephemeral()))
            .await
            .unwrap();
        let token = crate::vault::test_token();
        let id = token.id;
        store.insert(token, None).await.unwrap();
        let other = dir.path().join(file);
        prepare(&other);
        let store = SqlTokenStore {
            inline: inline::InlineReads::new(&other),
            ..store
        };
        (store, id)
    }

    /// The inline status read never waits: on a busy file it gives up at
    /// once and the pool answers (waiting its `busy_timeout`). A busy file
    /// is hard to make in WAL mode with the store's own connections open (a
    /// reader only meets one during another process's WAL recovery), so a
    /// second file held in exclusive mode stands in for the busy one.
    #[tokio::test]
    async fn a_busy_inline_read_is_answered_by_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let mut holder = None;
        let (store, id) = reading_inline_from(&dir, "busy.db", |busy| {
            let conn = rusqlite::Connection::open(busy).unwrap();
            conn.execute_batch(
                "PRAGMA locking_mode = EXCLUSIVE;
                 CREATE TABLE network_tokens (id TEXT, status TEXT, updated_at TEXT);",
            )
            .unwrap();
            holder = Some(conn);
        })
        .await;
        let read = store.inline.as_ref().unwrap().status(&id.to_string());
        assert!(matches!(read, inline::Read::Busy), "the file is not busy");
        let (status, _) = store.status_now(id).await.unwrap().unwrap();
        assert_eq!(status, TokenStatus::Active);
        drop(holder);
    }

    /// An inline read that fails otherwise (here: a file without the
    /// table) is logged and answered by the pool, not refused.
    #[tokio::test]
    async fn a_failed_inline_read_is_answered_by_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (store, id) = reading_inline_from(&dir, "other.db", |other| {
            rusqlite::Connection::open(other)
                .unwrap()
                .execute_batch("CREATE TABLE unrelated (x TEXT);")
                .unwrap();
        })
        .await;
        let read = store.inline.as_ref().unwrap().status(&id.to_string());
        assert!(
            matches!(read, inline::Read::Failed(_)),
            "the read did not fail"
        );
        let (status, _) = store.status_now(id).await.unwrap().unwrap();
        assert_eq!(status, TokenStatus::Active);
        assert!(store.status_now(TokenId::new()).await.unwrap().is_none());
    }
}
