//! The Redis reference backend, black-box: a real server configured with
//! `[references] backend = "redis"`, a reference minted, forwarded to the TLS
//! acquirer once, refused on replay — and nothing in Redis a merchant's
//! secret could be read from.
//!
//! Runs only when `TOKENRELAY_TEST_REDIS_URL` is set (a line says so when it
//! is not); panics when it is set and Redis cannot be reached. Each test
//! writes under a key prefix of its own and deletes it afterwards.

// Tests are where panicking on the unexpected is the point (STYLE.md §3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;
use tokenrelay::config::{ComplianceLevel, Config, RedisConfig, ReferenceBackend};

const AUTH_BODY: &str = r#"{"card":{"number":"<< number >>","cryptogram":"<< cryptogram >>","eci":"<< eci >>"},"amount":"10.00"}"#;

/// A key prefix of one test's own in the Redis the environment names; its
/// keys are deleted on drop, on success and on panic alike.
struct Redis {
    url: String,
    prefix: String,
}

impl Redis {
    /// `None` (with a line saying so) when the variable is unset; a panic
    /// when it is set and Redis does not answer.
    fn for_test(test: &str) -> Option<Redis> {
        let url = env_url(REDIS_ENV, test)?;
        let mut con = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{REDIS_ENV} is set but Redis cannot be reached: {e}"));
        let _: String = redis::cmd("PING").query(&mut con).unwrap();
        let prefix = format!("tokenrelay-test:{test}:{}:", uuid::Uuid::new_v4().simple());
        Some(Redis { url, prefix })
    }

    fn backend(&self) -> ReferenceBackend {
        ReferenceBackend::Redis(RedisConfig {
            url: self.url.clone(),
            password_file: None,
            key_prefix: self.prefix.clone(),
            ..RedisConfig::default()
        })
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }

    fn keys(&self) -> Vec<String> {
        let mut con = self.connection();
        redis::Commands::scan_match(&mut con, format!("{}*", self.prefix))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// Every key name and every value (hash fields and values, sorted-set
    /// members and scores) under the prefix, as bytes.
    fn everything(&self) -> Vec<Vec<u8>> {
        let mut con = self.connection();
        let mut out = Vec::new();
        for key in self.keys() {
            let kind: String = redis::cmd("TYPE").arg(&key).query(&mut con).unwrap();
            let values: Vec<Vec<u8>> = match kind.as_str() {
                "hash" => redis::cmd("HGETALL").arg(&key).query(&mut con).unwrap(),
                "zset" => redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query(&mut con)
                    .unwrap(),
                other => panic!("{key}: unexpected type {other}"),
            };
            out.push(key.into_bytes());
            out.extend(values);
        }
        out
    }
}

impl Drop for Redis {
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

/// A TCP relay to Redis that the test can cut, to play an outage without
/// touching the shared Redis.
struct CuttableRelay {
    addr: SocketAddr,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl CuttableRelay {
    async fn to(url: &str) -> CuttableRelay {
        let target = url
            .trim_start_matches("redis://")
            .split(['/', '?'])
            .next()
            .unwrap()
            .rsplit('@')
            .next()
            .unwrap()
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let conns = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        CuttableRelay { addr, tasks }
    }

    /// The URL to give tokenrelay: the test's Redis, through the relay.
    fn url(&self, redis_url: &str) -> String {
        let path = redis_url
            .trim_start_matches("redis://")
            .split_once('/')
            .map_or(String::new(), |(_, p)| format!("/{p}"));
        format!("redis://{}{path}", self.addr)
    }

    /// Stops accepting and drops every relayed connection.
    fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for CuttableRelay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A SAQ-D config with the Redis reference backend and a master key file
/// (the store seals under the vault's keyring).
fn redis_config(redis: &Redis, acq: &Acquirer, key_dir: &tempfile::TempDir) -> Config {
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule()];
    c.vault.key_file = Some(key_dir.path().join("master.key"));
    c.vault.create_key_file = true;
    c.references = redis.backend();
    c
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn a_reference_in_redis_forwards_once_and_a_replay_gets_409() {
    let Some(redis) = Redis::for_test("forward_once") else {
        return;
    };
    let acq = Acquirer::start().await;
    let key_dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(redis_config(&redis, &acq, &key_dir)).await;

    let token = s.provision(VISA).await;
    let id = token["id"].as_str().unwrap().to_owned();
    let inline = s.inline_cryptogram(&id).await;
    let tpan = inline["number"].as_str().unwrap().to_owned();
    let reference = s.reference(&id).await;

    let ready = s
        .http
        .get(format!("http://{}/readyz", s.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let resp = s
        .forward(&id, &reference, &acq.url("/v1/payments"))
        .header("content-type", "application/json")
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-relay-error").is_none());
    assert_eq!(acq.count(), 1);
    let sent: Value = serde_json::from_slice(&acq.last().body).unwrap();
    assert_eq!(sent["card"]["number"], tpan.as_str());
    assert_eq!(sent["card"]["eci"], "07");
    let cryptogram = sent["card"]["cryptogram"].as_str().unwrap().to_owned();
    assert_eq!(cryptogram.len(), 28);

    // Redis holds the tombstone, the token's index and the live set: none
    // of it gives the reference, the TPAN or the cryptogram.
    let everything = redis.everything();
    assert!(everything.len() >= 3, "nothing written under the prefix?");
    for v in &everything {
        for secret in [reference.as_str(), tpan.as_str(), cryptogram.as_str()] {
            assert!(!contains(v, secret), "a secret is readable in Redis");
        }
    }

    let replay = s
        .forward(&id, &reference, &acq.url("/v1/payments"))
        .header("content-type", "application/json")
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    assert_error(replay, 409, "reference_already_used").await;
    assert_eq!(acq.count(), 1, "the replay reached the acquirer");
    s.stop().await;
}

#[tokio::test]
async fn a_refused_redis_password_stops_start_without_echoing_it() {
    let Some(redis) = Redis::for_test("refused_password") else {
        return;
    };
    // The test Redis has no password (or another one): AUTH fails.
    let acq = Acquirer::start().await;
    let key_dir = tempfile::tempdir().unwrap();
    let password_file = key_dir.path().join("redis-password");
    std::fs::write(&password_file, "not-the-password-9c2e\n").unwrap();
    let mut c = redis_config(&redis, &acq, &key_dir);
    c.references = ReferenceBackend::Redis(RedisConfig {
        url: redis.url.clone(),
        password_file: Some(password_file),
        key_prefix: redis.prefix.clone(),
        ..RedisConfig::default()
    });
    if std::env::var_os("TOKENRELAY_REDIS_PASSWORD").is_some() {
        println!("skipped: TOKENRELAY_REDIS_PASSWORD is set and wins over password_file");
        return;
    }
    let e = match tokenrelay::AppState::build(c).await {
        Ok(_) => panic!("started with a refused Redis password"),
        Err(e) => format!("{:#}", anyhow::Error::from(e)),
    };
    assert!(e.contains("references.url"), "{e}");
    assert!(!e.contains("not-the-password"), "{e}");
}

#[tokio::test]
async fn a_redis_outage_answers_503_and_fails_readiness() {
    let Some(redis) = Redis::for_test("outage") else {
        return;
    };
    if !redis.url.starts_with("redis://") {
        println!("skipped: the relay speaks plain TCP, {REDIS_ENV} is not redis://");
        return;
    }
    let relay = CuttableRelay::to(&redis.url).await;
    let acq = Acquirer::start().await;
    let key_dir = tempfile::tempdir().unwrap();
    let mut c = redis_config(&redis, &acq, &key_dir);
    c.references = ReferenceBackend::Redis(RedisConfig {
        url: relay.url(&redis.url),
        password_file: None,
        key_prefix: redis.prefix.clone(),
        ..RedisConfig::default()
    });
    let s = TestServer::start(c).await;
    let token = s.provision(VISA).await;
    let id = token["id"].as_str().unwrap().to_owned();
    let reference = s.reference(&id).await;

    relay.cut();
    let resp = s
        .forward(&id, &reference, &acq.url("/v1/payments"))
        .header("content-type", "application/json")
        .body(AUTH_BODY)
        .send()
        .await
        .unwrap();
    let body = assert_error(resp, 503, "service_unavailable").await;
    assert!(
        !body.to_string().contains(&reference),
        "the reference in an error: {body}"
    );
    assert_eq!(acq.count(), 0);
    let minted = s
        .req(
            Method::POST,
            &format!("/api/network/tokens/{id}/cryptograms"),
        )
        .json(&json!({"type": "ecom", "mode": "reference", "amount": "10.00"}))
        .send()
        .await
        .unwrap();
    assert_error(minted, 503, "service_unavailable").await;
    let ready = s
        .http
        .get(format!("http://{}/readyz", s.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("reference store"));
    s.stop().await;
}
