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

const AUTH_BODY: &str =
    r#"{"card":{"number":"<< number >>","cryptogram":"<< cryptogram >>"},"amount":"10.00"}"#;

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
    schema: PgSchema,
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
            schema: PgSchema::create_in(&pg).await,
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
    s.req(
        Method::POST,
        &format!("/api/network/tokens/{id}/cryptograms"),
    )
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
        let want = if change == "delete" {
            "deleted"
        } else {
            "inactive"
        };
        let minted = assert_error(mint(&a, &id).await, 424, "token_not_active").await;
        assert!(
            minted["message"].as_str().unwrap().contains(want),
            "{minted}"
        );
        assert_error(
            pay(&a, &cl.acq, &id, &before).await,
            424,
            "token_not_active",
        )
        .await;
        assert_eq!(
            cl.acq.count(),
            0,
            "{change}: a payment reached the acquirer"
        );
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
        assert!(
            body["message"].as_str().unwrap().contains("deleted"),
            "{body}"
        );
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
    // A replay through the other replica: 409, and the message does not
    // pretend to know what happened to the first forward.
    let replay = assert_error(
        pay(&b, &cl.acq, &id, &reference).await,
        409,
        "reference_already_used",
    )
    .await;
    assert!(
        replay["message"]
            .as_str()
            .unwrap()
            .contains("outcome is unknown"),
        "{replay}"
    );
    assert_eq!(cl.acq.count(), 1);

    // An expiry update on B reaches A's very next cryptogram, cache or not.
    let r = b
        .req(Method::POST, &format!("/api/network/tokens/{id}/events"))
        .json(&json!({"event": "update_expiry", "expiry_month": 7, "expiry_year": 2034}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let inline = a.inline_cryptogram(&id).await;
    assert_eq!(
        (
            inline["expiry_month"].as_u64(),
            inline["expiry_year"].as_u64()
        ),
        (Some(7), Some(2034))
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_racing_a_suspend_on_another_replica_always_ends_deleted() {
    let Some(cl) = Cluster::new("delete_vs_suspend").await else {
        return;
    };
    let (a, b) = (cl.replica().await, cl.replica().await);
    for _round in 0..10 {
        let id = a.provision(VISA).await["id"].as_str().unwrap().to_owned();
        let path = format!("/api/network/tokens/{id}");
        let (deleted, suspended) = tokio::join!(
            a.req(Method::DELETE, &path).send(),
            event(&b, &id, "suspend"),
        );
        assert_eq!(deleted.unwrap().status(), 204);
        // The suspend either came first (200) or found it deleted (424).
        let s = suspended.status().as_u16();
        assert!(s == 200 || s == 424, "suspend answered {s}");
        for r in [&a, &b] {
            assert_error(event(r, &id, "resume").await, 424, "token_not_active").await;
            assert_error(mint(r, &id).await, 424, "token_not_active").await;
        }
        assert_eq!(status_on(&a, &id).await, "deleted");
    }
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
        let schema = PgSchema::create_in(&pg).await;
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

// ---------------------------------------------------------------------------
// Redis: CVCs shared, revocation in batches, dead connections, TLS
// ---------------------------------------------------------------------------

const CVC_BODY: &str =
    r#"{"card":{"number":"<< account_number >>","security_code":"<< security_code >>"}}"#;

async fn pci_pay(s: &TestServer, acq: &Acquirer, pci_id: &str) -> reqwest::Response {
    s.req(Method::POST, &format!("/api/pci/tokens/{pci_id}/forward"))
        .header("x-destination-url", acq.url("/pay"))
        .header("content-type", "application/json")
        .body(CVC_BODY)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cvc_held_through_one_replica_is_injected_through_the_other_once() {
    let Some(cl) = Cluster::new("cvc_shared").await else {
        return;
    };
    let (a, b) = (cl.replica().await, cl.replica().await);
    let r = a
        .req(Method::POST, "/api/pci/tokens")
        .json(&json!({"number": VISA, "expiry_month": 12, "expiry_year": 2031, "cvc": "737"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let pci_id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let paid = pci_pay(&b, &cl.acq, &pci_id).await;
    assert_eq!(paid.status(), 200);
    let sent: Value = serde_json::from_slice(&cl.acq.last().body).unwrap();
    assert_eq!(sent["card"]["security_code"], "737");

    // Single use across replicas: neither gets it again.
    for s in [&a, &b] {
        assert_error(
            pci_pay(s, &cl.acq, &pci_id).await,
            422,
            "security_code_unavailable",
        )
        .await;
    }
    assert_eq!(cl.acq.count(), 1);

    // Redis never held it in the clear.
    let mut con = redis::Client::open(cl.redis_url.as_str())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    assert!(
        redis::Commands::scan_match::<_, String>(&mut con, format!("{}cvc:*", cl.prefix.prefix))
            .unwrap()
            .next()
            .is_none(),
        "the used CVC is still in Redis"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cvc_in_redis_is_sealed_and_expires_with_cvc_ttl() {
    let Some(url) = env_url(REDIS_ENV, "cvc_sealed") else {
        return;
    };
    let prefix = Prefix::new(&url, "cvc_sealed");
    let store = std::sync::Arc::new(
        tokenrelay::references::redis::RedisReferenceStore::connect(
            &url,
            None,
            std::sync::Arc::new(tokenrelay::vault::keyring::Keyring::ephemeral()),
            100,
            &prefix.prefix,
        )
        .await
        .unwrap(),
    );
    let cvcs = tokenrelay::cvc::CvcStore::shared(
        Duration::from_secs(30),
        store.clone(),
        tokenrelay::clock::SystemClock::shared(),
    );
    let id = Uuid::new_v4();
    assert!(cvcs
        .hold(id, tokenrelay::card::Secret::new("9731".into()))
        .await
        .unwrap());
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let keys: Vec<String> =
        redis::Commands::scan_match(&mut con, format!("{}cvc:*", prefix.prefix))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    assert_eq!(keys.len(), 1);
    assert!(
        !keys[0].contains(&id.to_string()),
        "the card id is in the key"
    );
    let value: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(&mut con).unwrap();
    assert!(
        !value.windows(4).any(|w| w == b"9731"),
        "the CVC is in the clear"
    );
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut con).unwrap();
    assert!(ttl > 0 && ttl <= 30_000, "PTTL {ttl}");

    let taken = cvcs.take(id).await.unwrap().unwrap();
    assert_eq!(taken.secret().expose(), "9731");
    // Put back (the send never started), it keeps its expiry...
    cvcs.restore(id, taken).await.unwrap();
    let ttl2: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut con).unwrap();
    assert!(
        ttl2 > 0 && ttl2 <= ttl,
        "restore stretched the TTL: {ttl} -> {ttl2}"
    );
    // ...and never replaces a newer one.
    let again = cvcs.take(id).await.unwrap().unwrap();
    assert!(cvcs
        .hold(id, tokenrelay::card::Secret::new("1234".into()))
        .await
        .unwrap());
    cvcs.restore(id, again).await.unwrap();
    assert_eq!(
        cvcs.take(id).await.unwrap().unwrap().secret().expose(),
        "1234"
    );
    assert!(cvcs.take(id).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_with_many_references_in_redis_kills_every_one() {
    use tokenrelay::references::{Payload, Reference, ReferenceStore, TakeError, TakeFailure};
    let Some(url) = env_url(REDIS_ENV, "revoke_many") else {
        return;
    };
    let prefix = Prefix::new(&url, "revoke_many");
    let store = tokenrelay::references::redis::RedisReferenceStore::connect(
        &url,
        None,
        std::sync::Arc::new(tokenrelay::vault::keyring::Keyring::ephemeral()),
        10_000,
        &prefix.prefix,
    )
    .await
    .unwrap();
    let token = tokenrelay::vault::TokenId::new();
    let payload = std::sync::Arc::new(Payload {
        cryptogram: None,
        dynamic_cvv: Some(tokenrelay::card::Secret::new("123".into())),
        cryptogram_type: tokenrelay::tsp::CryptogramType::DynamicCvv,
        eci: "07",
        metadata: Default::default(),
    });
    let mut ids = Vec::new();
    // More than two batches of the revoke script.
    for _ in 0..600 {
        ids.push(
            store
                .issue(Reference {
                    token_id: token,
                    expires_at: time::OffsetDateTime::now_utc() + Duration::from_secs(60),
                    payload: payload.clone(),
                })
                .await
                .unwrap(),
        );
    }
    // Some used, some not: all die.
    for id in ids.iter().take(10) {
        store.take(id, token).await.unwrap();
    }
    store.revoke_token(token).await.unwrap();
    for id in &ids {
        assert!(matches!(
            store.take(id, token).await,
            Err(TakeFailure::Refused(TakeError::NotFound))
        ));
    }
    assert_eq!(store.len(), 0);
}

/// A TCP relay to Redis that can black-hole: from `black_hole()` on, every
/// connection it holds — and every one it accepts until `heal()` — drops
/// the bytes it reads and keeps its sockets open, as a partition or a
/// vanished peer does. Connections black-holed stay so after `heal()`; new
/// ones are relayed again. Nothing is ever closed by the test.
struct BlackHoleRelay {
    addr: std::net::SocketAddr,
    outage: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl BlackHoleRelay {
    async fn to(target: std::net::SocketAddr) -> BlackHoleRelay {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let outage = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let (o, c) = (outage.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let dead = Arc::new(AtomicBool::new(o.load(Ordering::SeqCst)));
                c.lock().unwrap().push(dead.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let up = pump(ri, wo, dead.clone());
                    let down = pump(ro, wi, dead);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        async fn pump(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            dead: std::sync::Arc<std::sync::atomic::AtomicBool>,
        ) {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        // Keep the other side open even then: a dead path
                        // says nothing.
                        std::future::pending::<()>().await;
                        return;
                    }
                    Ok(n) => n,
                };
                if dead.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
        BlackHoleRelay {
            addr,
            outage,
            conns,
            accept,
        }
    }

    fn black_hole(&self) {
        use std::sync::atomic::Ordering;
        self.outage.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().iter() {
            c.store(true, Ordering::SeqCst);
        }
    }

    fn heal(&self) {
        self.outage
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for BlackHoleRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// host:port of a `redis://` URL.
fn redis_addr(url: &str) -> std::net::SocketAddr {
    let hostport = url
        .trim_start_matches("redis://")
        .split(['/', '?'])
        .next()
        .unwrap()
        .rsplit('@')
        .next()
        .unwrap();
    use std::net::ToSocketAddrs;
    hostport.to_socket_addrs().unwrap().next().unwrap()
}

async fn ready(s: &TestServer) -> u16 {
    s.http
        .get(format!("http://{}/readyz", s.admin))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_redis_connection_is_replaced_and_readiness_recovers_by_itself() {
    let Some(url) = env_url(REDIS_ENV, "black_hole") else {
        return;
    };
    if !url.starts_with("redis://") {
        println!("skipped: the relay speaks plain TCP, {REDIS_ENV} is not redis://");
        return;
    }
    let prefix = Prefix::new(&url, "black_hole");
    let relay = BlackHoleRelay::to(redis_addr(&url)).await;
    let acq = Acquirer::start().await;
    let keys = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(500);
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule()];
    c.vault.backend = VaultBackend::Memory;
    c.vault.key_file = Some(keys.path().join("master.key"));
    c.vault.create_key_file = true;
    let path = url
        .trim_start_matches("redis://")
        .split_once('/')
        .map_or(String::new(), |(_, p)| format!("/{p}"));
    c.references = ReferenceBackend::Redis(RedisConfig {
        url: format!("redis://{}{path}", relay.addr),
        key_prefix: prefix.prefix.clone(),
        timeout,
        ..RedisConfig::default()
    });
    let s = TestServer::start(c).await;
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let reference = s.reference(&id).await;
    assert_eq!(ready(&s).await, 200);

    relay.black_hole();
    // Bytes vanish, sockets stay open: each request costs one timeout and
    // answers 503; readiness fails.
    assert_error(
        pay(&s, &acq, &id, &reference).await,
        503,
        "service_unavailable",
    )
    .await;
    assert_error(mint(&s, &id).await, 503, "service_unavailable").await;
    assert_eq!(ready(&s).await, 503);
    // Inline cryptograms do not use the reference store.
    assert_eq!(s.inline_cryptogram(&id).await["type"], "tavv");
    assert_eq!(acq.count(), 0);

    relay.heal();
    // The black-holed connections stay dead and open; recovery must come
    // from dialling afresh, within a few timeouts.
    let healed = std::time::Instant::now();
    let bound = timeout * 3 + Duration::from_secs(2);
    loop {
        if ready(&s).await == 200 {
            break;
        }
        assert!(
            healed.elapsed() < bound,
            "/readyz still failing {:?} after Redis came back",
            healed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The reference the failed forward never took still pays, once.
    assert_eq!(pay(&s, &acq, &id, &reference).await.status(), 200);
    assert_eq!(acq.count(), 1);
    s.stop().await;
}

/// A TLS front for the test Redis with a certificate from a private CA.
async fn tls_front(
    target: std::net::SocketAddr,
    pki: &Pki,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use std::sync::Arc;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        pki.leaf.clone(),
        rustls::pki_types::PrivateKeyDer::Pkcs8(pki.key_der.clone().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(inbound).await else {
                    return;
                };
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut outbound).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_in_ca_file_connects_and_without_it_is_refused() {
    let Some(url) = env_url(REDIS_ENV, "rediss_ca") else {
        return;
    };
    if !url.starts_with("redis://") {
        println!("skipped: the TLS front needs a plain {REDIS_ENV}");
        return;
    }
    let prefix = Prefix::new(&url, "rediss_ca");
    let pki = pki();
    let (front, task) = tls_front(redis_addr(&url), &pki).await;
    let acq = Acquirer::start().await;
    let keys = tempfile::tempdir().unwrap();
    let path = url
        .trim_start_matches("redis://")
        .split_once('/')
        .map_or(String::new(), |(_, p)| format!("/{p}"));
    let with = |ca_file: Option<std::path::PathBuf>| {
        let mut c = config(ComplianceLevel::SaqD);
        c.destinations = vec![acq.rule()];
        c.vault.backend = VaultBackend::Memory;
        c.vault.key_file = Some(keys.path().join("master.key"));
        c.vault.create_key_file = true;
        c.references = ReferenceBackend::Redis(RedisConfig {
            url: format!("rediss://localhost:{}{path}", front.port()),
            key_prefix: prefix.prefix.clone(),
            ca_file,
            ..RedisConfig::default()
        });
        c
    };
    let e = match tokenrelay::AppState::build(with(None)).await {
        Ok(_) => panic!("trusted a private CA it was not given"),
        Err(e) => format!("{:#}", anyhow::Error::from(e)),
    };
    assert!(e.contains("references.url"), "{e}");

    let s = TestServer::start(with(Some(pki.ca_file.clone()))).await;
    assert_eq!(ready(&s).await, 200);
    let id = s.provision(VISA).await["id"].as_str().unwrap().to_owned();
    let reference = s.reference(&id).await;
    assert_eq!(pay(&s, &acq, &id, &reference).await.status(), 200);
    s.stop().await;
    task.abort();
}
