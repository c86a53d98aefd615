//! Scale-out: several replicas on one PostgreSQL database and one Redis, as
//! an operator runs them. Each replica is a whole `AppState` with its own
//! listeners and its own token cache (`vault.cache_ttl` left at its default,
//! so a replica that trusted its cache would be caught).
//!
//! Runs when `TOKENRELAY_TEST_POSTGRES_URL` and `TOKENRELAY_TEST_REDIS_URL`
//! are set (`.ci/run` sets them; a line says so when they are not) and
//! panics when they are set and the service cannot be reached. Every test
//! works in a fresh PostgreSQL schema and under a Redis key prefix of its
//! own, both dropped at the end, so runs sharing the servers never meet.

// Tests are where panicking on the unexpected is the point (STYLE.md §3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;
use tokenrelay::config::{ComplianceLevel, Config, RedisConfig, ReferenceBackend, VaultBackend};
use uuid::Uuid;

const POSTGRES_ENV: &str = "TOKENRELAY_TEST_POSTGRES_URL";
const REDIS_ENV: &str = "TOKENRELAY_TEST_REDIS_URL";

const AUTH_BODY: &str = r#"{"card":{"number":"<< number >>","cryptogram":"<< cryptogram >>"},"amount":"10.00"}"#;

/// The URL an environment variable names: `None` (with a line saying so)
/// when unset, a panic when set but unusable.
fn env_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) => Some(url),
        Err(std::env::VarError::NotPresent) => {
            println!("{test}: skipped because {var} is unset");
            None
        }
        Err(e) => panic!("{var} is set but unusable: {e}"),
    }
}

async fn pg_pool(base: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(base)
        .await
        .unwrap_or_else(|e| panic!("{POSTGRES_ENV} is set but PostgreSQL cannot be reached: {e}"))
}

/// A fresh, empty schema in the test database; dropped on drop.
pub struct Schema {
    base: String,
    name: String,
    /// The URL that makes it the search path.
    pub url: String,
}

impl Schema {
    pub async fn create(base: &str) -> Schema {
        let name = format!("tokenrelay_scale_{}", Uuid::new_v4().simple());
        let pool = pg_pool(base).await;
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("creating schema {name}: {e}"));
        pool.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        Schema {
            url: format!("{base}{sep}options[search_path]={name}"),
            base: base.to_owned(),
            name,
        }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        // Best effort, bounded, on a runtime of its own (drop cannot await).
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    let pool = pg_pool(&base).await;
                    let _ = sqlx::query(&format!("DROP SCHEMA {name} CASCADE"))
                        .execute(&pool)
                        .await;
                    pool.close().await;
                })
                .await;
            })
        })
        .join();
    }
}

/// A Redis key prefix of one test's own; its keys are deleted on drop.
pub struct Prefix {
    url: String,
    pub prefix: String,
}

impl Prefix {
    pub fn new(url: &str, test: &str) -> Prefix {
        let mut con = redis::Client::open(url)
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{REDIS_ENV} is set but Redis cannot be reached: {e}"));
        let _: String = redis::cmd("PING").query(&mut con).unwrap();
        Prefix {
            url: url.to_owned(),
            prefix: format!("tokenrelay-test:{test}:{}:", Uuid::new_v4().simple()),
        }
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let keys: Vec<String> =
            match redis::Commands::scan_match(&mut con, format!("{}*", self.prefix)) {
                Ok(iter) => iter.filter_map(Result::ok).collect(),
                Err(_) => return,
            };
        if !keys.is_empty() {
            let _: Result<u64, _> = redis::cmd("DEL").arg(keys).query(&mut con);
        }
    }
}

/// The references backend for `url` under `prefix`.
pub fn redis_backend(url: &str, prefix: &str) -> ReferenceBackend {
    ReferenceBackend::Redis(RedisConfig {
        url: url.to_owned(),
        password_file: None,
        key_prefix: prefix.to_owned(),
        ..RedisConfig::default()
    })
}

/// One PostgreSQL schema, one Redis prefix, one master key: what every
/// replica of a deployment shares.
struct Cluster {
    schema: Schema,
    redis_url: String,
    prefix: Prefix,
    keys: tempfile::TempDir,
    acq: Acquirer,
}

impl Cluster {
    async fn new(test: &str) -> Option<Cluster> {
        let pg = env_url(POSTGRES_ENV, test)?;
        let redis_url = env_url(REDIS_ENV, test)?;
        let keys = tempfile::tempdir().unwrap();
        std::fs::write(
            keys.path().join("master.key"),
            format!("k1:{}\n", base64_key()),
        )
        .unwrap();
        Some(Cluster {
            schema: Schema::create(&pg).await,
            prefix: Prefix::new(&redis_url, test),
            redis_url,
            keys,
            acq: Acquirer::start().await,
        })
    }

    fn config(&self) -> Config {
        let mut c = config(ComplianceLevel::SaqD);
        c.destinations = vec![self.acq.rule()];
        c.vault.backend = VaultBackend::Postgres {
            url: self.schema.url.clone(),
            password_file: None,
        };
        c.vault.key_file = Some(self.keys.path().join("master.key"));
        c.vault.create_key_file = false;
        c.references = redis_backend(&self.redis_url, &self.prefix.prefix);
        c
    }

    async fn replica(&self) -> TestServer {
        TestServer::start(self.config()).await
    }
}

/// 32 random bytes, base64: one master key.
fn base64_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(tokenrelay::crypto::random_bytes::<32>())
}

async fn event(s: &TestServer, id: &str, event: &str) -> reqwest::Response {
    s.req(Method::POST, &format!("/api/network/tokens/{id}/events"))
        .json(&json!({ "event": event }))
        .send()
        .await
        .unwrap()
}

async fn mint(s: &TestServer, id: &str) -> reqwest::Response {
    s.req(Method::POST, &format!("/api/network/tokens/{id}/cryptograms"))
        .json(&json!({"type": "ecom", "mode": "reference", "amount": "10.00"}))
        .send()
        .await
        .unwrap()
}

async fn pay(s: &TestServer, acq: &Acquirer, id: &str, reference: &str) -> reqwest::Response {
    s.forward(id, reference, &acq.url("/v1/payments"))
        .header("content-type", "application/json")
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap()
}

async fn status_on(s: &TestServer, id: &str) -> String {
    let v: Value = s
        .req(Method::GET, &format!("/api/network/tokens/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["status"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_or_delete_on_one_replica_stops_minting_and_forwarding_on_the_other_at_once() {
    let Some(cl) = Cluster::new("lifecycle_authority").await else {
        return;
    };
    let (a, b) = (cl.replica().await, cl.replica().await);
    for change in ["suspend", "delete"] {
        let id = a.provision(VISA).await["id"].as_str().unwrap().to_owned();
        // A's token cache now holds the active token, and a reference minted
        // before the change is outstanding.
        let before = a.reference(&id).await;
        assert_eq!(status_on(&a, &id).await, "active");

        let r = if change == "delete" {
            b.req(Method::DELETE, &format!("/api/network/tokens/{id}"))
                .send()
                .await
                .unwrap()
        } else {
            event(&b, &id, change).await
        };
        assert!(r.status().is_success(), "{change} on B: {}", r.status());

        // The very next request on A: no new reference, no forward.
        let want = if change == "delete" { "deleted" } else { "inactive" };
        let minted = assert_error(mint(&a, &id).await, 424, "token_not_active").await;
        assert!(minted["message"].as_str().unwrap().contains(want), "{minted}");
        assert_error(pay(&a, &cl.acq, &id, &before).await, 424, "token_not_active").await;
        assert_eq!(cl.acq.count(), 0, "{change}: a payment reached the acquirer");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_deleted_on_one_replica_stays_deleted_whatever_the_other_does() {
    let Some(cl) = Cluster::new("deleted_terminal").await else {
        return;
    };
    let (a, b) = (cl.replica().await, cl.replica().await);
    let id = a.provision(VISA).await["id"].as_str().unwrap().to_owned();
    // B caches the active token first, as a replica that served it would.
    assert_eq!(status_on(&b, &id).await, "active");
    let r = a
        .req(Method::DELETE, &format!("/api/network/tokens/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    for ev in ["suspend", "resume", "activate_dauth", "resume"] {
        let body = assert_error(event(&b, &id, ev).await, 424, "token_not_active").await;
        assert!(body["message"].as_str().unwrap().contains("deleted"), "{body}");
    }
    // A repeated delete is still a success and changes nothing.
    let r = b
        .req(Method::DELETE, &format!("/api/network/tokens/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    for s in [&a, &b] {
        assert_error(mint(s, &id).await, 424, "token_not_active").await;
    }
    assert_eq!(status_on(&a, &id).await, "deleted");
    assert_eq!(cl.acq.count(), 0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_token_resumed_on_another_replica_pays_again() {
    let Some(cl) = Cluster::new("resume_elsewhere").await else {
        return;
    };
    let (a, b) = (cl.replica().await, cl.replica().await);
    let id = a.provision(VISA).await["id"].as_str().unwrap().to_owned();
    assert_eq!(event(&b, &id, "suspend").await.status(), 200);
    assert_error(mint(&a, &id).await, 424, "token_not_active").await;
    assert_eq!(event(&b, &id, "resume").await.status(), 200);
    let reference = a.reference(&id).await;
    let paid = pay(&a, &cl.acq, &id, &reference).await;
    assert_eq!(paid.status(), 200);
    assert_eq!(cl.acq.count(), 1);
    a.stop().await;
    b.stop().await;
}

/// Five replicas started at once on one empty PostgreSQL schema: every one
/// migrates or waits for the one that does, and all start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_replicas_migrating_one_empty_postgres_database_at_once_all_start() {
    let Some(pg) = env_url(POSTGRES_ENV, "migrate_at_once") else {
        return;
    };
    for _round in 0..3 {
        let schema = Schema::create(&pg).await;
        let starts = (0..5).map(|_| {
            let url = schema.url.clone();
            tokio::spawn(async move {
                let keys = std::sync::Arc::new(tokenrelay::vault::keyring::Keyring::ephemeral());
                tokenrelay::vault::sql::SqlTokenStore::connect(&url, keys).await
            })
        });
        for started in futures_util::future::join_all(starts).await {
            if let Err(e) = started.unwrap() {
                panic!("a replica failed to start: {e}");
            }
        }
    }
}

/// The same on one new SQLite file, opened by five stores at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_stores_migrating_one_new_sqlite_file_at_once_all_open() {
    for _round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("v.db").display());
        let starts = (0..5).map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let keys = std::sync::Arc::new(tokenrelay::vault::keyring::Keyring::ephemeral());
                tokenrelay::vault::sql::SqlTokenStore::connect(&url, keys).await
            })
        });
        for started in futures_util::future::join_all(starts).await {
            if let Err(e) = started.unwrap() {
                panic!("a store failed to open: {e}");
            }
        }
    }
}
