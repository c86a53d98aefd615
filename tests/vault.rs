//! The durable encrypted vault (contract §8): the SQL token store on SQLite
//! and PostgreSQL, encryption at rest (no TPAN or PAN digits on disk,
//! tampered or moved ciphertext refused), key rotation under load, restarts,
//! a `kill -9` of the real binary, and the `rotate-key` command.
//!
//! PostgreSQL runs only when `TOKENRELAY_TEST_POSTGRES_URL` is set; each
//! PostgreSQL test works in a fresh schema of its own, so runs sharing one
//! database never see each other's rows (key rotation scans whole tables).

// Tests are where panicking on the unexpected is the point (STYLE.md §3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};
use support::binary::Binary;
use support::*;
use time::OffsetDateTime;
use tokenrelay::auth::KeyHash;
use tokenrelay::card::{Brand, CardNumber};
use tokenrelay::config::{ComplianceLevel, VaultBackend, VaultConfig};
use tokenrelay::crypto::{random_bytes, random_digits};
use tokenrelay::vault::cached::CachedTokenStore;
use tokenrelay::vault::keyring::Keyring;
use tokenrelay::vault::sql::SqlTokenStore;
use tokenrelay::vault::{
    IdempotencyRecord, Inserted, Metadata, NetworkToken, NetworkTokenType, RotationCursor,
    StoreError, TokenId, TokenStatus, TokenStore,
};
use uuid::Uuid;

const TOKENS: &str = "/api/network/tokens";

// ---------------------------------------------------------------------------
// Databases and keys
// ---------------------------------------------------------------------------

/// A database for one test: a SQLite file in a tempdir, or a fresh schema
/// in the PostgreSQL database the environment names.
struct Db {
    label: &'static str,
    /// Connection URL for the store and for direct SQL.
    url: String,
    /// PostgreSQL only: the schema, dropped with the `Db`.
    _pg_schema: Option<PgSchema>,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        Db {
            label: "sqlite",
            url: format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("vault.db").display()
            ),
            _pg_schema: None,
            _dir: Some(dir),
        }
    }

    /// `None` (with a line saying so) when the variable is unset; a panic
    /// when it is set and the database cannot be reached.
    async fn postgres(test: &str) -> Option<Db> {
        let schema = PgSchema::create(test).await?;
        Some(Db {
            label: "postgres",
            url: schema.url.clone(),
            _pg_schema: Some(schema),
            _dir: None,
        })
    }

    async fn store(&self, keys: &str) -> Arc<SqlTokenStore> {
        let keys = Arc::new(Keyring::parse(keys).unwrap());
        Arc::new(
            SqlTokenStore::connect(&self.url, keys)
                .await
                .unwrap_or_else(|e| panic!("{}: opening the store: {e}", self.label)),
        )
    }
}

async fn direct_pool(url: &str) -> Result<sqlx::AnyPool, sqlx::Error> {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `id:<random base64 key>`.
fn key_line(id: &str) -> String {
    format!("{id}:{}", b64(&random_bytes::<32>()))
}

/// A random 16-digit token number.
fn random_tpan() -> String {
    format!("4895{}", random_digits(12))
}

fn token(tpan: &str) -> NetworkToken {
    let now = OffsetDateTime::now_utc();
    let mut scheme_metadata = Metadata::new();
    scheme_metadata.insert("par".into(), format!("V0010013{}", random_digits(8)));
    let mut metadata = Metadata::new();
    metadata.insert("order".into(), Uuid::new_v4().to_string());
    metadata.insert("note".into(), "é \"quoted\" \u{1F4B3}".into());
    NetworkToken {
        id: TokenId::new(),
        status: TokenStatus::Active,
        network_token_type: NetworkTokenType::Vts,
        scheme: Brand::Visa,
        card_last4: "1111".into(),
        expiry_month: 11,
        expiry_year: 2032,
        pci_token_id: Some(Uuid::new_v4()),
        supports_device_binding: true,
        scheme_reference: format!("vts-{}", Uuid::new_v4()),
        scheme_metadata,
        metadata,
        dauth_activated: true,
        created_at: now - Duration::from_secs(90),
        updated_at: now,
        tpan: CardNumber::parse(tpan).unwrap(),
    }
}

fn idem(key: &str, body: &[u8], created_at: OffsetDateTime) -> IdempotencyRecord {
    IdempotencyRecord {
        key: key.to_owned(),
        fingerprint: random_bytes::<32>(),
        status: 201,
        body: body.to_vec(),
        created_at,
    }
}

fn assert_same_token(got: &NetworkToken, want: &NetworkToken) {
    assert_eq!(got.id, want.id);
    assert_eq!(got.status, want.status);
    assert_eq!(got.network_token_type, want.network_token_type);
    assert_eq!(got.scheme, want.scheme);
    assert_eq!(got.card_last4, want.card_last4);
    assert_eq!(got.expiry_month, want.expiry_month);
    assert_eq!(got.expiry_year, want.expiry_year);
    assert_eq!(got.pci_token_id, want.pci_token_id);
    assert_eq!(got.supports_device_binding, want.supports_device_binding);
    assert_eq!(got.scheme_reference, want.scheme_reference);
    assert_eq!(got.scheme_metadata, want.scheme_metadata);
    assert_eq!(got.metadata, want.metadata);
    assert_eq!(got.dauth_activated, want.dauth_activated);
    assert_eq!(got.created_at, want.created_at);
    assert_eq!(got.updated_at, want.updated_at);
    assert_eq!(got.tpan.expose(), want.tpan.expose(), "TPAN");
}

fn assert_same_record(got: &IdempotencyRecord, want: &IdempotencyRecord) {
    assert_eq!(got.key, want.key);
    assert_eq!(got.fingerprint, want.fingerprint);
    assert_eq!(got.status, want.status);
    assert_eq!(got.body, want.body);
    // Stored to the second.
    assert_eq!(
        got.created_at.unix_timestamp(),
        want.created_at.unix_timestamp()
    );
}

// ---------------------------------------------------------------------------
// 1. The store-level suite
// ---------------------------------------------------------------------------

const HOUR: Duration = Duration::from_secs(3600);

async fn exercise(store: Arc<dyn TokenStore>) {
    store.ping().await.unwrap();

    // Round trip, every field.
    let t = token(&random_tpan());
    let id = t.id;
    assert!(matches!(
        store.insert(t.clone(), None).await.unwrap(),
        Inserted::Stored
    ));
    let got = store.get(id).await.unwrap().expect("inserted token");
    assert_same_token(&got, &t);

    // Unknown id.
    assert!(store.get(TokenId::new()).await.unwrap().is_none());
    assert!(store
        .set_status(TokenId::new(), TokenStatus::Inactive)
        .await
        .unwrap()
        .is_none());

    // Status changes; everything else stays.
    for status in [
        TokenStatus::Inactive,
        TokenStatus::Active,
        TokenStatus::Deleted,
    ] {
        let updated = store.set_status(id, status).await.unwrap().unwrap();
        assert_eq!(updated.status, status);
        assert!(updated.updated_at >= t.updated_at);
        let reread = store.get(id).await.unwrap().unwrap();
        assert_eq!(reread.status, status, "status persisted");
        assert_eq!(reread.tpan.expose(), t.tpan.expose());
        assert_eq!(reread.metadata, t.metadata);
        assert_eq!(reread.created_at, t.created_at);
    }

    // Counters, per token.
    let other = token(&random_tpan());
    let other_id = other.id;
    store.insert(other, None).await.unwrap();
    for want in 1..=3 {
        assert_eq!(store.next_counter(id).await.unwrap(), want);
    }
    assert_eq!(store.next_counter(other_id).await.unwrap(), 1);
    assert_eq!(store.next_counter(id).await.unwrap(), 4);

    // Idempotency records: first put stores, second returns the first.
    // The key has the API's shape: scope NUL route NUL client key.
    let run = Uuid::new_v4();
    let key = format!("all\u{0}provision_token\u{0}k-%00%25%-{run}");
    let now = OffsetDateTime::now_utc();
    let first = idem(&key, br#"{"first":true,"number":"4895370012345678"}"#, now);
    assert!(store
        .get_idempotency(&key, now - HOUR)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .put_idempotency(first.clone(), now - HOUR)
        .await
        .unwrap()
        .is_none());
    let second = idem(&key, b"{\"second\":true}", now);
    let existing = store
        .put_idempotency(second, now - HOUR)
        .await
        .unwrap()
        .expect("second put returns the first record");
    assert_same_record(&existing, &first);
    assert_same_record(
        &store
            .get_idempotency(&key, now - HOUR)
            .await
            .unwrap()
            .unwrap(),
        &first,
    );

    // horizon: an old record reads as absent, and is replaced on put.
    let old_key = format!("all\u{0}cryptogram\u{0}old-{run}");
    let old = idem(&old_key, b"{\"old\":1}", now - 2 * HOUR);
    assert!(store
        .put_idempotency(old.clone(), now - 3 * HOUR)
        .await
        .unwrap()
        .is_none());
    assert_same_record(
        &store
            .get_idempotency(&old_key, now - 3 * HOUR)
            .await
            .unwrap()
            .unwrap(),
        &old,
    );
    assert!(store
        .get_idempotency(&old_key, now - HOUR)
        .await
        .unwrap()
        .is_none());
    let fresh = idem(&old_key, b"{\"fresh\":1}", now);
    assert!(
        store
            .put_idempotency(fresh.clone(), now - HOUR)
            .await
            .unwrap()
            .is_none(),
        "an expired record must not block a new one"
    );
    assert_same_record(
        &store
            .get_idempotency(&old_key, now - HOUR)
            .await
            .unwrap()
            .unwrap(),
        &fresh,
    );

    // Insert with a fresh idempotency record: both stored.
    let with_rec = token(&random_tpan());
    let with_rec_id = with_rec.id;
    let rec_key = format!("all\u{0}provision_token\u{0}ins-{run}");
    let rec = idem(&rec_key, b"{\"id\":\"a\"}", now);
    assert!(matches!(
        store
            .insert(with_rec.clone(), Some((rec.clone(), now - HOUR)))
            .await
            .unwrap(),
        Inserted::Stored
    ));
    assert_same_token(&store.get(with_rec_id).await.unwrap().unwrap(), &with_rec);
    assert_same_record(
        &store
            .get_idempotency(&rec_key, now - HOUR)
            .await
            .unwrap()
            .unwrap(),
        &rec,
    );

    // Insert whose idempotency key is taken: nothing stored, the first
    // record returned.
    let loser = token(&random_tpan());
    let loser_id = loser.id;
    match store
        .insert(
            loser,
            Some((idem(&rec_key, b"{\"id\":\"b\"}", now), now - HOUR)),
        )
        .await
        .unwrap()
    {
        Inserted::IdempotencyExists(r) => assert_same_record(&r, &rec),
        Inserted::Stored => panic!("insert with a taken idempotency key stored the token"),
    }
    assert!(
        store.get(loser_id).await.unwrap().is_none(),
        "the losing token must not be stored"
    );
    assert_same_record(
        &store
            .get_idempotency(&rec_key, now - HOUR)
            .await
            .unwrap()
            .unwrap(),
        &rec,
    );

    // Insert whose idempotency key holds only an expired record (created
    // at or before the horizon): the record is replaced and the token
    // stored, in one transaction.
    let expired_key = format!("all\u{0}provision_token\u{0}expired-{run}");
    let expired = idem(&expired_key, b"{\"id\":\"old\"}", now - 2 * HOUR);
    assert!(matches!(
        store
            .insert(token(&random_tpan()), Some((expired, now - 3 * HOUR)))
            .await
            .unwrap(),
        Inserted::Stored
    ));
    let renewed = token(&random_tpan());
    let renewed_id = renewed.id;
    let renewed_rec = idem(&expired_key, b"{\"id\":\"new\"}", now);
    assert!(
        matches!(
            store
                .insert(renewed, Some((renewed_rec.clone(), now - HOUR)))
                .await
                .unwrap(),
            Inserted::Stored
        ),
        "an expired idempotency record must give way to a new insert"
    );
    assert!(store.get(renewed_id).await.unwrap().is_some());
    assert_same_record(
        &store
            .get_idempotency(&expired_key, now - HOUR)
            .await
            .unwrap()
            .unwrap(),
        &renewed_rec,
    );

    // Many tokens, each readable with its own TPAN.
    let mut many = Vec::new();
    for _ in 0..20 {
        let t = token(&random_tpan());
        many.push((t.id, t.tpan.expose().to_owned()));
        store.insert(t, None).await.unwrap();
    }
    for (id, tpan) in &many {
        assert_eq!(store.get(*id).await.unwrap().unwrap().tpan.expose(), tpan);
    }
}

#[tokio::test]
async fn store_suite_on_sqlite() {
    let db = Db::sqlite();
    exercise(db.store(&key_line("k1")).await).await;
    // And again on the same file through a second store: durable.
    let keys = key_line("k1");
    let store = db.store(&keys).await;
    let t = token(&random_tpan());
    store.insert(t.clone(), None).await.unwrap();
    drop(store);
    let reopened = db.store(&keys).await;
    assert_same_token(&reopened.get(t.id).await.unwrap().unwrap(), &t);
}

#[tokio::test]
async fn store_suite_on_postgres() {
    let Some(db) = Db::postgres("store_suite_on_postgres").await else {
        return;
    };
    exercise(db.store(&key_line("k1")).await).await;
}

/// Transaction counters are reserved in blocks. Two stores on one database
/// (a restart, or two replicas) and concurrent callers on both never get
/// the same counter, and one store's sequential counters increase.
async fn counters_never_repeat(db: &Db) {
    let keys = key_line("k1");
    let a = db.store(&keys).await;
    let t = token(&random_tpan());
    let id = t.id;
    a.insert(t, None).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut last = 0;
    for _ in 0..5 {
        let c = a.next_counter(id).await.unwrap();
        assert!(c > last, "{}: {c} after {last}", db.label);
        assert!(seen.insert(c), "{}: {c} repeated", db.label);
        last = c;
    }
    drop(a);
    // Restarted: what the first store reserved but did not use is skipped.
    let a = db.store(&keys).await;
    let b = db.store(&keys).await;
    for s in [&a, &b] {
        let c = s.next_counter(id).await.unwrap();
        assert!(c > last, "{}: {c} after a restart, {last} before", db.label);
        assert!(seen.insert(c), "{}: {c} repeated", db.label);
    }
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..50 {
                    got.push(s.next_counter(id).await.unwrap());
                }
                got
            })
        })
        .collect();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{}: {got:?}", db.label);
        for c in got {
            assert!(seen.insert(c), "{}: {c} repeated", db.label);
        }
    }
}

#[tokio::test]
async fn counters_never_repeat_on_sqlite() {
    counters_never_repeat(&Db::sqlite()).await;
}

#[tokio::test]
async fn counters_never_repeat_on_postgres() {
    let Some(db) = Db::postgres("counters_never_repeat_on_postgres").await else {
        return;
    };
    counters_never_repeat(&db).await;
}

/// Two stores on one database, as two processes sharing a SQLite file or
/// two replicas on one PostgreSQL: each change through one is what the
/// other's status read and `get_current` give at once, though the other
/// caches tokens for an hour. Every step changes the status, so a read that
/// served an older answer (a stale page, a kept connection's old snapshot,
/// the cached copy) fails.
async fn status_is_read_now_across_stores(db: &Db) {
    let keys = key_line("k1");
    let a = db.store(&keys).await;
    let b = CachedTokenStore::new(db.store(&keys).await, HOUR);
    let t = token(&random_tpan());
    let id = t.id;
    a.insert(t, None).await.unwrap();
    let status = |t: Option<Arc<NetworkToken>>| t.unwrap().status;
    assert_eq!(
        status(b.get_current(id).await.unwrap()),
        TokenStatus::Active
    );
    for now in [
        TokenStatus::Inactive,
        TokenStatus::Active,
        TokenStatus::Inactive,
        TokenStatus::Active,
        TokenStatus::Deleted,
    ] {
        a.set_status(id, now).await.unwrap();
        let (read, _) = b.status_now(id).await.unwrap().unwrap();
        assert_eq!(read, now, "{}: status_now", db.label);
        assert_eq!(
            status(b.get_current(id).await.unwrap()),
            now,
            "{}: get_current",
            db.label
        );
    }
    assert!(b.status_now(TokenId::new()).await.unwrap().is_none());
    assert!(b.get_current(TokenId::new()).await.unwrap().is_none());
}

#[tokio::test]
async fn status_is_read_now_across_stores_on_sqlite() {
    status_is_read_now_across_stores(&Db::sqlite()).await;
}

#[tokio::test]
async fn status_is_read_now_across_stores_on_postgres() {
    let Some(db) = Db::postgres("status_is_read_now_across_stores_on_postgres").await else {
        return;
    };
    status_is_read_now_across_stores(&db).await;
}

#[tokio::test]
async fn store_suite_on_memory() {
    exercise(Arc::new(tokenrelay::vault::memory::MemoryTokenStore::new())).await;
}

// ---------------------------------------------------------------------------
// 2. No TPAN or PAN digits in the SQLite files
// ---------------------------------------------------------------------------

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn sqlite_files_hold_no_tpan_or_pan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vault.db");
    let mut c = config(ComplianceLevel::SaqD);
    c.vault = VaultConfig {
        backend: VaultBackend::Sqlite { path: path.clone() },
        key_file: Some(dir.path().join("master.key")),
        create_key_file: true,
        cache_ttl: tokenrelay::config::DEFAULT_VAULT_CACHE_TTL,
    };
    let s = TestServer::start(c).await;

    let pans = [VISA, MASTERCARD, DISCOVER];
    let mut ids = Vec::new();
    let mut tpans = Vec::new();
    for (i, pan) in pans.iter().enumerate() {
        // Provisioned with an idempotency key: the record is durable too.
        let r = s
            .req(Method::POST, TOKENS)
            .header("x-idempotency-key", format!("prov-{i}"))
            .json(&json!({"source": {"type": "pan", "number": pan, "expiry_month": 12, "expiry_year": 2031, "cvc": "123"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let t: Value = r.json().await.unwrap();
        let id = t["id"].as_str().unwrap().to_owned();
        // An inline cryptogram under an idempotency key: its recorded body
        // carries the TPAN, sealed at rest.
        let r = s
            .req(Method::POST, &format!("{TOKENS}/{id}/cryptograms"))
            .header("x-idempotency-key", format!("crypt-{i}"))
            .json(&json!({"type": "ecom", "mode": "inline", "amount": "1.00"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let c: Value = r.json().await.unwrap();
        let tpan = c["number"].as_str().unwrap().to_owned();
        assert_eq!(tpan.len(), 16, "TPAN shape");
        ids.push(id);
        tpans.push(tpan);
    }
    // Tokens placed straight into the store, with known TPANs.
    for _ in 0..5 {
        let t = token(&random_tpan());
        ids.push(t.id.to_string());
        tpans.push(t.tpan.expose().to_owned());
        s.state.tokens.insert(t, None).await.unwrap();
    }

    let name = path.file_name().unwrap().to_str().unwrap();
    let files = files_named(path.parent().unwrap(), name);
    let all: Vec<u8> = files.iter().flat_map(|(_, b)| b.clone()).collect();
    let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
    assert!(
        names.iter().any(|n| n.ends_with("vault.db")),
        "database file missing: {names:?}"
    );
    // Sanity: the scan sees the rows (ids are stored in the clear).
    for id in &ids {
        assert!(contains(&all, id), "token {id} not found in {names:?}");
    }
    for (path, bytes) in &files {
        for pan in pans {
            assert!(!contains(bytes, pan), "PAN in clear in {}", path.display());
        }
        for tpan in &tpans {
            assert!(
                !contains(bytes, tpan),
                "TPAN in clear in {}",
                path.display()
            );
            assert!(
                !contains(bytes, &tpan[tpan.len() - 12..]),
                "last 12 TPAN digits in clear in {}",
                path.display()
            );
        }
        assert!(
            // Quoted on both sides: `123"` alone also matches a random TPAN's
            // public last4 such as `"5123"` (a one-in-a-thousand flake).
            !contains(bytes, "\"cvc\"") && !contains(bytes, "\"123\""),
            "CVC on disk in {}",
            path.display()
        );
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------
// 3. Tampered and moved ciphertext
// ---------------------------------------------------------------------------

/// Replaces one base64 character with another valid one.
fn flip_char(s: &str, at: usize) -> String {
    let mut b = s.as_bytes().to_vec();
    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

async fn secret_of(pool: &sqlx::AnyPool, id: TokenId) -> (String, String) {
    use sqlx::Row;
    let row = sqlx::query("SELECT key_id, secret FROM network_tokens WHERE id = $1")
        .bind(id.to_string())
        .fetch_one(pool)
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn set_secret(pool: &sqlx::AnyPool, id: TokenId, key_id: &str, secret: &str) {
    let r = sqlx::query("UPDATE network_tokens SET key_id = $1, secret = $2 WHERE id = $3")
        .bind(key_id.to_owned())
        .bind(secret.to_owned())
        .bind(id.to_string())
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(r.rows_affected(), 1);
}

async fn assert_corrupt(store: &dyn TokenStore, id: TokenId, what: &str) {
    match store.get(id).await {
        Err(StoreError::Corrupt(_)) => {}
        Err(e) => panic!("{what}: expected Corrupt, got {e}"),
        Ok(Some(t)) => panic!("{what}: read back a token (TPAN ending {})", t.tpan.last4()),
        Ok(None) => panic!("{what}: token vanished"),
    }
}

async fn tamper(db: &Db) {
    let store = db.store(&key_line("k1")).await;
    let (a, b, c) = (
        token(&random_tpan()),
        token(&random_tpan()),
        token(&random_tpan()),
    );
    let (a_id, b_id, c_id) = (a.id, b.id, c.id);
    for t in [a, b.clone(), c.clone()] {
        store.insert(t, None).await.unwrap();
    }
    let pool = direct_pool(&db.url).await.unwrap();

    // One character flipped, at the nonce, in the ciphertext, in the tag.
    let (key_id, secret) = secret_of(&pool, a_id).await;
    for at in [2, secret.len() / 2, secret.len() - 4] {
        set_secret(&pool, a_id, &key_id, &flip_char(&secret, at)).await;
        assert_corrupt(store.as_ref(), a_id, &format!("flipped char {at}")).await;
    }
    // Truncated, not base64, empty, unknown key id.
    set_secret(&pool, a_id, &key_id, &secret[..secret.len() - 8]).await;
    assert_corrupt(store.as_ref(), a_id, "truncated").await;
    set_secret(&pool, a_id, &key_id, "***not base64***").await;
    assert_corrupt(store.as_ref(), a_id, "not base64").await;
    set_secret(&pool, a_id, &key_id, "").await;
    assert_corrupt(store.as_ref(), a_id, "empty").await;
    set_secret(&pool, a_id, "k9", &secret).await;
    assert_corrupt(store.as_ref(), a_id, "unknown key id").await;
    // Restored, it reads again: the failures were the tampering.
    set_secret(&pool, a_id, &key_id, &secret).await;
    assert!(store.get(a_id).await.unwrap().is_some());

    // A's ciphertext moved into B's row.
    set_secret(&pool, b_id, &key_id, &secret).await;
    assert_corrupt(store.as_ref(), b_id, "ciphertext moved from A to B").await;
    // A and C untouched.
    assert!(store.get(a_id).await.unwrap().is_some());
    assert_same_token(&store.get(c_id).await.unwrap().unwrap(), &c);
    // set_status on a corrupt row reports the corruption, not garbage.
    assert!(matches!(
        store.set_status(b_id, TokenStatus::Inactive).await,
        Err(StoreError::Corrupt(_))
    ));

    // Idempotency bodies are bound to their key the same way.
    let now = OffsetDateTime::now_utc();
    let run = Uuid::new_v4();
    // Plain keys: the SQL below names them as stored.
    let (k1, k2) = (format!("tamper-1-{run}"), format!("tamper-2-{run}"));
    store
        .put_idempotency(idem(&k1, b"{\"n\":1}", now), now - HOUR)
        .await
        .unwrap();
    store
        .put_idempotency(idem(&k2, b"{\"n\":2}", now), now - HOUR)
        .await
        .unwrap();
    sqlx::query("UPDATE idempotency SET body = (SELECT body FROM idempotency WHERE key = $1) WHERE key = $2")
        .bind(k1.clone())
        .bind(k2.clone())
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(
        store.get_idempotency(&k2, now - HOUR).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(store
        .get_idempotency(&k1, now - HOUR)
        .await
        .unwrap()
        .is_some());
    pool.close().await;
}

#[tokio::test]
async fn tampered_or_moved_ciphertext_is_corrupt_on_sqlite() {
    tamper(&Db::sqlite()).await;
}

#[tokio::test]
async fn tampered_or_moved_ciphertext_is_corrupt_on_postgres() {
    let Some(db) = Db::postgres("tampered_or_moved_ciphertext_is_corrupt_on_postgres").await else {
        return;
    };
    tamper(&db).await;
}

// ---------------------------------------------------------------------------
// 4. Key rotation under concurrent load
// ---------------------------------------------------------------------------

async fn rotation_under_load(db: &Db) {
    let k1 = key_line("k1");
    let k2 = key_line("k2");
    let old = db.store(&k1).await;
    let mut known: HashMap<TokenId, String> = HashMap::new();
    for _ in 0..200 {
        let t = token(&random_tpan());
        known.insert(t.id, t.tpan.expose().to_owned());
        old.insert(t, None).await.unwrap();
    }
    let now = OffsetDateTime::now_utc();
    let run = Uuid::new_v4();
    let idem_keys: Vec<String> = (0..30)
        .map(|i| format!("all\u{0}provision_token\u{0}{run}-{i}"))
        .collect();
    for k in &idem_keys {
        old.put_idempotency(idem(k, k.as_bytes(), now), now - HOUR)
            .await
            .unwrap();
    }
    drop(old);

    let both = db.store(&format!("{k1}\n{k2}")).await;
    let existing: Arc<Vec<(TokenId, String)>> =
        Arc::new(known.iter().map(|(i, t)| (*i, t.clone())).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));

    let mut readers = Vec::new();
    for r in 0..2u64 {
        let (store, existing, stop, reads) =
            (both.clone(), existing.clone(), stop.clone(), reads.clone());
        readers.push(tokio::spawn(async move {
            let mut i = r as usize * 7919;
            // Bounded: the rotation finishes long before this.
            for _ in 0..200_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                i = (i * 31 + 17) % existing.len();
                let (id, tpan) = &existing[i];
                let t = store
                    .get(*id)
                    .await
                    .unwrap_or_else(|e| panic!("read during rotation failed: {e}"))
                    .expect("token missing during rotation");
                assert_eq!(t.tpan.expose(), tpan, "wrong TPAN during rotation");
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let writer = {
        let (store, stop) = (both.clone(), stop.clone());
        tokio::spawn(async move {
            let mut written = Vec::new();
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = token(&random_tpan());
                let entry = (t.id, t.tpan.expose().to_owned());
                store
                    .insert(t, None)
                    .await
                    .unwrap_or_else(|e| panic!("insert during rotation failed: {e}"));
                written.push(entry);
            }
            written
        })
    };

    let reads_before = reads.load(Ordering::Relaxed);
    let mut rotated = 0;
    let mut rounds = 0;
    let mut cursor = RotationCursor::default();
    loop {
        rounds += 1;
        assert!(rounds < 100, "rotation did not converge");
        let step = both.rotate_batch(&mut cursor, 25).await.unwrap();
        assert!(step.unreadable.is_empty(), "{:?}", step.unreadable);
        assert!(
            step.visited <= 75,
            "a batch of 25 per table (tokens, PCI tokens, idempotency) visited {}",
            step.visited
        );
        if step.visited == 0 {
            break;
        }
        rotated += step.rotated;
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let written = writer.await.unwrap();
    assert_eq!(rotated, 200 + idem_keys.len(), "records re-encrypted");
    assert!(
        reads.load(Ordering::Relaxed) > reads_before,
        "no read overlapped the rotation"
    );
    assert!(!written.is_empty(), "no insert overlapped the rotation");
    for (id, tpan) in &written {
        known.insert(*id, tpan.clone());
    }

    for (id, tpan) in &known {
        let t = both.get(*id).await.unwrap().unwrap();
        assert_eq!(t.tpan.expose(), tpan);
    }
    let k2_only = db.store(&k2).await;
    for (id, tpan) in &known {
        let t = k2_only
            .get(*id)
            .await
            .unwrap_or_else(|e| panic!("not re-encrypted under k2: {e}"))
            .unwrap();
        assert_eq!(t.tpan.expose(), tpan);
    }
    for k in &idem_keys {
        let r = k2_only
            .get_idempotency(k, now - HOUR)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.body, k.as_bytes());
    }
    let k1_only = db.store(&k1).await;
    for id in known.keys() {
        assert_corrupt(k1_only.as_ref(), *id, "read under k1 after rotation").await;
    }
    assert!(matches!(
        k1_only.get_idempotency(&idem_keys[0], now - HOUR).await,
        Err(StoreError::Corrupt(_))
    ));
    let again = both
        .rotate_batch(&mut RotationCursor::default(), 25)
        .await
        .unwrap();
    assert_eq!(again.visited, 0, "a second pass has nothing to do");
}

/// A record rotation cannot open is named (table, row, key id) and passed
/// over: the rows behind it are still re-encrypted, and it is left as it
/// was, readable under its old key.
async fn rotation_passes_over_a_row_it_cannot_open(db: &Db) {
    let (k1, k2, lost) = (key_line("k1"), key_line("k2"), key_line("k0"));
    // Rotation's keyring lacks "k0": those rows cannot be opened.
    let unreadable = token(&random_tpan());
    let unreadable_id = unreadable.id;
    db.store(&lost)
        .await
        .insert(unreadable, None)
        .await
        .unwrap();
    let mut readable = Vec::new();
    for _ in 0..5 {
        let t = token(&random_tpan());
        readable.push(t.id);
        db.store(&k1).await.insert(t, None).await.unwrap();
    }
    let both = db.store(&format!("{k1}\n{k2}")).await;
    let mut cursor = RotationCursor::default();
    let (mut rotated, mut named) = (0, Vec::new());
    for round in 0.. {
        assert!(round < 100, "the pass did not end");
        // Batches of 2, so the bad row sits inside a pass, not at its end.
        let step = both.rotate_batch(&mut cursor, 2).await.unwrap();
        if step.visited == 0 {
            break;
        }
        rotated += step.rotated;
        named.extend(step.unreadable);
    }
    assert_eq!(rotated, readable.len());
    assert_eq!(named.len(), 1, "{named:?}");
    assert!(
        named[0].starts_with(&format!(
            "network_tokens row {unreadable_id} (key \"k0/v2\")"
        )),
        "{named:?}"
    );
    let k2_only = db.store(&k2).await;
    for id in readable {
        assert!(k2_only.get(id).await.unwrap().is_some());
    }
    assert!(db
        .store(&lost)
        .await
        .get(unreadable_id)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn rotation_passes_over_a_row_it_cannot_open_on_sqlite() {
    rotation_passes_over_a_row_it_cannot_open(&Db::sqlite()).await;
}

#[tokio::test]
async fn rotation_passes_over_a_row_it_cannot_open_on_postgres() {
    let Some(db) = Db::postgres("rotation_passes_over_a_row_it_cannot_open_on_postgres").await
    else {
        return;
    };
    rotation_passes_over_a_row_it_cannot_open(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_under_load_on_sqlite() {
    rotation_under_load(&Db::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_under_load_on_postgres() {
    let Some(db) = Db::postgres("rotation_under_load_on_postgres").await else {
        return;
    };
    rotation_under_load(&db).await;
}

// ---------------------------------------------------------------------------
// 5. A restart keeps tokens
// ---------------------------------------------------------------------------

async fn get_json(s: &TestServer, id: &str) -> (u16, Value) {
    let r = s
        .req(Method::GET, &format!("{TOKENS}/{id}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn restart_keeps_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let vault = VaultConfig {
        backend: VaultBackend::Sqlite {
            path: dir.path().join("data").join("vault.db"),
        },
        key_file: Some(dir.path().join("master.key")),
        create_key_file: true,
        cache_ttl: tokenrelay::config::DEFAULT_VAULT_CACHE_TTL,
    };
    let mut c = config(ComplianceLevel::SaqD);
    c.vault = vault.clone();
    let s = TestServer::start(c).await;
    let a = s.provision(VISA).await;
    let b = s.provision(MASTERCARD).await;
    let mut before = Vec::new();
    for t in [&a, &b] {
        let id = t["id"].as_str().unwrap().to_owned();
        let (status, body) = get_json(&s, &id).await;
        assert_eq!(status, 200);
        assert_eq!(&body, t, "GET matches the 201 body");
        before.push((id, body));
    }
    s.stop().await;
    assert!(dir.path().join("master.key").exists());

    let mut c = config(ComplianceLevel::SaqD);
    c.vault = vault;
    let s = TestServer::start(c).await;
    for (id, body) in &before {
        let (status, after) = get_json(&s, id).await;
        assert_eq!(status, 200, "token {id} lost on restart");
        assert_eq!(&after, body);
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------
// 6–7. The real binary: kill -9, then rotate-key
// ---------------------------------------------------------------------------

const CRASH_KEY: &str = "crash-key";

/// A SQLite-backed config in `dir` on ports the kernel picks; returns the
/// config file.
fn binary_config(dir: &Path) -> PathBuf {
    let config = format!(
        r#"listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
compliance_level = "saq-d"
[[api_keys]]
name = "crash"
hash = "{hash}"
scopes = ["tokens"]
[vault]
backend = "sqlite"
path = "{db}"
key_file = "{key}"
create_key_file = true
"#,
        hash = KeyHash::of(CRASH_KEY.as_bytes()).to_config_string(),
        db = dir.join("vault.db").display(),
        key = dir.join("master.key").display(),
    );
    let path = dir.join("tokenrelay.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Starts `serve` and waits (bounded) until it is ready and `/healthz`
/// answers 200.
async fn serve(config: &Path, log: &Path) -> Binary {
    let bin = Binary::serve(config, log).await;
    let r = client()
        .get(format!("{}/healthz", bin.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "/healthz once ready");
    bin
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn provision_over_http(http: &reqwest::Client, base: &str, pan: &str) -> (u16, String) {
    let r = http
        .post(format!("{base}{TOKENS}"))
        .header("x-api-key", CRASH_KEY)
        .json(&json!({"source": {"type": "pan", "number": pan, "expiry_month": 12, "expiry_year": 2031}}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn get_over_http(http: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    let r = http
        .get(format!("{base}{TOKENS}/{id}"))
        .header("x-api-key", CRASH_KEY)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A 201 is sent only after the token's transaction committed: every token
/// acknowledged before a SIGKILL is there after the restart, unchanged.
///
/// What this does not prove: that the commit reached the disk. SIGKILL
/// keeps the OS page cache, so this passes with `synchronous = OFF` too;
/// the durability setting itself is pinned by
/// `vault::sql::durability_tests::sqlite_connections_open_with_wal_and_synchronous_full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_is_acknowledged_only_after_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path());
    let log = dir.path().join("tokenrelay.log");
    let mut bin = serve(&config, &log).await;
    let base = bin.base.clone();

    let acked: Arc<Mutex<Vec<(String, Value)>>> = Arc::new(Mutex::new(Vec::new()));
    let running = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (acked, running, base) = (acked.clone(), running.clone(), base.clone());
        running.fetch_add(1, Ordering::SeqCst);
        clients.push(tokio::spawn(async move {
            let http = client();
            let pans = [VISA, MASTERCARD, DISCOVER, AMEX];
            for i in 0..20_000 {
                let sent = http
                    .post(format!("{base}{TOKENS}"))
                    .header("x-api-key", CRASH_KEY)
                    .json(&json!({"source": {"type": "pan", "number": pans[(c + i) % 4], "expiry_month": 12, "expiry_year": 2031}}))
                    .send()
                    .await;
                // After the kill: connection refused or reset.
                let Ok(r) = sent else { break };
                let status = r.status().as_u16();
                let Ok(text) = r.text().await else { break };
                if status == 201 {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    let id = v["id"].as_str().unwrap().to_owned();
                    acked.lock().unwrap().push((id, v));
                } else {
                    panic!("provision answered {status}: {text}");
                }
            }
            running.fetch_sub(1, Ordering::SeqCst);
        }));
    }

    // Let the load run, then SIGKILL mid-flight.
    let started = Instant::now();
    loop {
        let n = acked.lock().unwrap().len();
        let elapsed = started.elapsed();
        if (n >= 30 && elapsed >= Duration::from_millis(700)) || elapsed > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        running.load(Ordering::SeqCst),
        4,
        "clients stopped before the kill"
    );
    bin.kill();
    for c in clients {
        tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .expect("client did not stop after the kill")
            .unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.len() >= 30,
        "only {} tokens acknowledged before the kill",
        acked.len()
    );
    println!("{} tokens acknowledged before kill -9", acked.len());

    let bin = serve(&config, &log).await;
    let http = client();
    for (id, body) in &acked {
        let (status, got) = get_over_http(&http, &bin.base, id).await;
        assert_eq!(status, 200, "acknowledged token {id} lost after kill -9");
        assert_eq!(&got, body, "token {id} changed after kill -9");
    }
}

#[tokio::test]
async fn rotate_key_command_reencrypts_and_serve_reads() {
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path());
    let log = dir.path().join("tokenrelay.log");
    let key_file = dir.path().join("master.key");

    let mut bin = serve(&config, &log).await;
    let http = client();
    let mut tokens = Vec::new();
    for pan in [VISA, MASTERCARD, AMEX] {
        let (status, text) = provision_over_http(&http, &bin.base, pan).await;
        assert_eq!(status, 201, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        tokens.push((v["id"].as_str().unwrap().to_owned(), v));
    }
    bin.kill();
    drop(bin);

    // Rotate: append k2 (now active) and re-encrypt offline.
    let k1_material = std::fs::read_to_string(&key_file).unwrap();
    assert!(k1_material.contains("k1:"), "generated key file has k1");
    let k2 = key_line("k2");
    std::fs::write(&key_file, format!("{k1_material}{k2}\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
        .args(["rotate-key", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "rotate-key failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The network tokens, plus whatever else the vault seals (PCI tokens,
    // idempotency records): at least one record per provisioned token.
    let reported: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("done: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count reported: {stdout}"));
    assert!(
        reported >= tokens.len(),
        "only {reported} records re-encrypted: {stdout}"
    );
    assert!(
        !stdout.contains(&k2[3..]),
        "rotate-key printed key material"
    );

    // Everything is now under k2: a k2-only keyring reads it all, k1 alone
    // reads nothing.
    let db = Db {
        label: "sqlite",
        url: format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("vault.db").display()
        ),
        _pg_schema: None,
        _dir: None,
    };
    {
        let k2_only = db.store(&k2).await;
        let k1_only = db.store(&k1_material).await;
        for (id, _) in &tokens {
            let id = TokenId::parse(id).unwrap();
            assert!(k2_only.get(id).await.unwrap().is_some());
            assert_corrupt(k1_only.as_ref(), id, "k1 after rotate-key").await;
        }
    }

    // A second run has nothing left to do.
    let again = Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
        .args(["rotate-key", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("done: 0 records re-encrypted"));

    // A row under a key the file no longer holds: the command names it,
    // says what to do, and fails, so nobody removes a key still in use.
    let stray = token(&random_tpan());
    let stray_id = stray.id;
    db.store(&key_line("k0"))
        .await
        .insert(stray, None)
        .await
        .unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
        .args(["rotate-key", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("network_tokens row {stray_id} (key \"k0/v2\")"))
            && stderr.contains("keep those keys"),
        "{stderr}"
    );

    let bin = serve(&config, &log).await;
    for (id, body) in &tokens {
        let (status, got) = get_over_http(&http, &bin.base, id).await;
        assert_eq!(status, 200, "token {id} after rotate-key");
        assert_eq!(&got, body);
    }
}

// ---------------------------------------------------------------------------
// 8. Health of the in-memory vault
// ---------------------------------------------------------------------------

#[tokio::test]
async fn memory_backend_is_ready_and_healthy() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    assert_eq!(s.state.config.vault.backend, VaultBackend::Memory);
    for path in ["/readyz", "/healthz"] {
        let r = s
            .http
            .get(format!("http://{}{path}", s.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    s.stop().await;
}

#[tokio::test]
async fn sqlite_backend_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(ComplianceLevel::SaqD);
    c.vault = VaultConfig {
        backend: VaultBackend::Sqlite {
            path: dir.path().join("vault.db"),
        },
        key_file: Some(dir.path().join("master.key")),
        create_key_file: true,
        cache_ttl: tokenrelay::config::DEFAULT_VAULT_CACHE_TTL,
    };
    let s = TestServer::start(c).await;
    let r = s
        .http
        .get(format!("http://{}/readyz", s.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}
