//! The [`ReferenceStore`] contract, one test body run against every backend:
//! the memory store always, the Redis store when `TOKENRELAY_TEST_REDIS_URL`
//! is set (a line says so when it is not; a panic when it is set and Redis
//! cannot be reached). Each Redis test writes under a prefix of its own and
//! deletes its keys afterwards, on success and on panic alike.
//!
//! Redis-only checks (what a dump of Redis shows, tampering, two replicas)
//! follow the shared ones.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::memory::MemoryReferenceStore;
use super::redis::RedisReferenceStore;
use super::{
    Payload, Reference, ReferenceId, ReferenceStore, ReferenceStoreError, TakeError, TakeFailure,
};
use crate::card::Secret;
use crate::tsp::CryptogramType;
use crate::vault::keyring::Keyring;
use crate::vault::{Metadata, TokenId};

const REDIS_ENV: &str = "TOKENRELAY_TEST_REDIS_URL";
const CRYPTOGRAM: &str = "AgAAAAAAAIR8CQrXSohbQAAAAAA=";
/// Not a real dynamic CVV (three digits would turn up by chance in scores
/// and ciphertext), but a value no store may write in the clear.
const DYNAMIC_CVV: &str = "dcvv-sentinel-7f3a9c";
/// A TPAN-shaped value carried in metadata: the whole payload is sealed.
const TPAN: &str = "4895370012345678";

/// Where a test's store lives.
enum Backend {
    Memory,
    Redis { url: String, prefix: String },
}

struct Fixture {
    backend: Backend,
    keys: Arc<Keyring>,
}

impl Fixture {
    fn memory() -> Fixture {
        Fixture {
            backend: Backend::Memory,
            keys: Arc::new(Keyring::ephemeral()),
        }
    }

    /// `None` (with a line saying so) when the variable is unset.
    fn redis(test: &str) -> Option<Fixture> {
        let url = match std::env::var(REDIS_ENV) {
            Ok(url) => url,
            Err(std::env::VarError::NotPresent) => {
                println!("{test}: Redis run skipped because {REDIS_ENV} is unset");
                return None;
            }
            Err(e) => panic!("{REDIS_ENV} is set but unusable: {e}"),
        };
        let prefix = format!("tokenrelay-test:{test}:{}:", uuid::Uuid::new_v4().simple());
        Some(Fixture {
            backend: Backend::Redis { url, prefix },
            keys: Arc::new(Keyring::ephemeral()),
        })
    }

    fn is_redis(&self) -> bool {
        matches!(self.backend, Backend::Redis { .. })
    }

    /// A store holding at most `max` unused references. For Redis, every
    /// store of one fixture shares the prefix: they are replicas.
    async fn store(&self, max: u64) -> Arc<dyn ReferenceStore> {
        match &self.backend {
            Backend::Memory => Arc::new(MemoryReferenceStore::new(max).unwrap()),
            Backend::Redis { .. } => Arc::new(self.redis_store(max).await),
        }
    }

    async fn redis_store(&self, max: u64) -> RedisReferenceStore {
        let Backend::Redis { url, prefix } = &self.backend else {
            panic!("not a Redis fixture");
        };
        RedisReferenceStore::connect(url, None, self.keys.clone(), max, prefix)
            .await
            .unwrap_or_else(|e| panic!("{REDIS_ENV} is set but Redis cannot be reached: {e}"))
    }

    /// A direct connection, for looking at what the store wrote.
    async fn raw(&self) -> ::redis::aio::MultiplexedConnection {
        let Backend::Redis { url, .. } = &self.backend else {
            panic!("not a Redis fixture");
        };
        ::redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("{REDIS_ENV} is set but Redis cannot be reached: {e}"))
    }

    /// Every key under this fixture's prefix.
    async fn keys_written(&self) -> Vec<String> {
        let Backend::Redis { prefix, .. } = &self.backend else {
            return Vec::new();
        };
        let mut con = self.raw().await;
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }

    /// The per-reference hashes among [`keys_written`](Self::keys_written).
    async fn ref_keys(&self) -> Vec<String> {
        let mut keys = self.keys_written().await;
        keys.retain(|k| k.contains(":ref:"));
        keys
    }
}

impl Drop for Fixture {
    /// Deletes the test's keys (best effort, bounded; blocking is fine here).
    fn drop(&mut self) {
        let Backend::Redis { url, prefix } = &self.backend else {
            return;
        };
        let Ok(client) = ::redis::Client::open(url.as_str()) else {
            return;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let keys: Vec<String> = match ::redis::Commands::scan_match(&mut con, format!("{prefix}*"))
        {
            Ok(iter) => iter.filter_map(Result::ok).collect(),
            Err(_) => return,
        };
        for chunk in keys.chunks(500) {
            let _: Result<u64, _> = ::redis::cmd("DEL").arg(chunk).query(&mut con);
        }
    }
}

fn payload(cryptogram_type: CryptogramType, eci: &'static str) -> Arc<Payload> {
    let mut metadata = Metadata::new();
    metadata.insert("order".into(), "A-1001".into());
    metadata.insert("card_hint".into(), TPAN.into());
    Arc::new(match cryptogram_type {
        CryptogramType::Tavv => Payload {
            cryptogram: Some(Secret::new(CRYPTOGRAM.into())),
            dynamic_cvv: None,
            cryptogram_type,
            eci,
            metadata,
        },
        CryptogramType::DynamicCvv => Payload {
            cryptogram: None,
            dynamic_cvv: Some(Secret::new(DYNAMIC_CVV.into())),
            cryptogram_type,
            eci,
            metadata,
        },
    })
}

fn reference(token_id: TokenId, ttl: Duration) -> Reference {
    Reference {
        token_id,
        expires_at: OffsetDateTime::now_utc() + ttl,
        payload: payload(CryptogramType::Tavv, "07"),
    }
}

const MINUTE: Duration = Duration::from_secs(60);
/// Short enough to wait for, long enough for a loaded CI machine to issue
/// and check before it passes.
const SHORT: Duration = Duration::from_secs(1);

async fn past_short_ttl() {
    tokio::time::sleep(SHORT + Duration::from_millis(300)).await;
}

fn refused(r: Result<Reference, TakeFailure>) -> TakeError {
    match r {
        Err(TakeFailure::Refused(e)) => e,
        Err(TakeFailure::Store(e)) => panic!("store failed: {e}"),
        Ok(_) => panic!("expected a refusal, got the reference"),
    }
}

fn cryptogram_of(r: &Reference) -> Option<&str> {
    r.payload.cryptogram.as_ref().map(Secret::expose)
}

// ---------------------------------------------------------------------------
// The contract, for every backend
// ---------------------------------------------------------------------------

async fn take_once_then_409_until_expiry(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let id = s.issue(reference(t, MINUTE)).await.unwrap();
    assert_eq!(s.len(), 1);
    let peeked = s.peek(&id, t).await.unwrap();
    assert_eq!(cryptogram_of(&peeked), Some(CRYPTOGRAM));
    let taken = s.take(&id, t).await.unwrap();
    assert_eq!(cryptogram_of(&taken), Some(CRYPTOGRAM));
    assert_eq!(taken.token_id, t);
    assert_eq!(s.len(), 0);
    // A retry — and a dry run — see a tombstone, not a missing reference.
    for _ in 0..3 {
        assert_eq!(refused(s.take(&id, t).await), TakeError::AlreadyUsed);
    }
    assert_eq!(refused(s.peek(&id, t).await), TakeError::AlreadyUsed);
}

async fn unknown_reference_is_not_found(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let id = ReferenceId::generate();
    assert_eq!(refused(s.take(&id, t).await), TakeError::NotFound);
    assert_eq!(refused(s.peek(&id, t).await), TakeError::NotFound);
}

async fn expired_is_not_found_and_so_is_an_expired_tombstone(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let unused = s.issue(reference(t, SHORT)).await.unwrap();
    let used = s.issue(reference(t, SHORT)).await.unwrap();
    let taken = s.take(&used, t).await.unwrap();
    assert_eq!(refused(s.take(&used, t).await), TakeError::AlreadyUsed);
    past_short_ttl().await;
    assert_eq!(refused(s.peek(&unused, t).await), TakeError::NotFound);
    assert_eq!(refused(s.take(&unused, t).await), TakeError::NotFound);
    assert_eq!(refused(s.take(&used, t).await), TakeError::NotFound);
    // Restoring after expiry brings nothing back.
    s.restore(&used, taken).await.unwrap();
    assert_eq!(refused(s.take(&used, t).await), TakeError::NotFound);
}

async fn token_mismatch_leaves_it_usable(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let id = s.issue(reference(t, MINUTE)).await.unwrap();
    let other = TokenId::new();
    assert_eq!(refused(s.peek(&id, other).await), TakeError::TokenMismatch);
    assert_eq!(refused(s.take(&id, other).await), TakeError::TokenMismatch);
    assert_eq!(s.len(), 1);
    assert_eq!(
        cryptogram_of(&s.take(&id, t).await.unwrap()),
        Some(CRYPTOGRAM)
    );
}

async fn exactly_one_of_64_concurrent_takers(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let id = s.issue(reference(t, MINUTE)).await.unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (s, id, start) = (s.clone(), id.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            s.take(&id, t).await
        }));
    }
    let mut wins = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => {
                assert_eq!(cryptogram_of(&r), Some(CRYPTOGRAM));
                wins += 1;
            }
            Err(e) => assert!(
                matches!(e, TakeFailure::Refused(TakeError::AlreadyUsed)),
                "{e}"
            ),
        }
    }
    assert_eq!(wins, 1);
}

async fn restore_makes_it_usable_again_with_its_original_expiry(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let issued = reference(t, MINUTE);
    let expires_at = issued.expires_at;
    let id = s.issue(issued).await.unwrap();
    let taken = s.take(&id, t).await.unwrap();
    assert_eq!(s.len(), 0);
    s.restore(&id, taken.clone()).await.unwrap();
    assert_eq!(s.len(), 1);
    // Restoring what is not taken changes nothing.
    s.restore(&id, taken).await.unwrap();
    assert_eq!(s.len(), 1);
    let again = s.take(&id, t).await.unwrap();
    assert_eq!(cryptogram_of(&again), Some(CRYPTOGRAM));
    // Redis keeps milliseconds.
    assert!((again.expires_at - expires_at).abs() < time::Duration::milliseconds(1));
    assert_eq!(refused(s.take(&id, t).await), TakeError::AlreadyUsed);
}

async fn revoke_kills_every_reference_of_that_token_only(f: &Fixture) {
    let s = f.store(3).await;
    let (a, b) = (TokenId::new(), TokenId::new());
    let a_unused = s.issue(reference(a, MINUTE)).await.unwrap();
    let a_used = s.issue(reference(a, MINUTE)).await.unwrap();
    let taken = s.take(&a_used, a).await.unwrap();
    let b_unused = s.issue(reference(b, MINUTE)).await.unwrap();
    assert_eq!(s.len(), 2);
    s.revoke_token(a).await.unwrap();
    assert_eq!(refused(s.take(&a_unused, a).await), TakeError::NotFound);
    assert_eq!(refused(s.take(&a_used, a).await), TakeError::NotFound);
    // A revoked reference cannot be restored either.
    s.restore(&a_used, taken).await.unwrap();
    assert_eq!(refused(s.take(&a_used, a).await), TakeError::NotFound);
    // The revoked reference's slot is free again (the memory store's count
    // catches up lazily, so `len` is not asserted here).
    s.issue(reference(b, MINUTE)).await.unwrap();
    s.issue(reference(b, MINUTE)).await.unwrap();
    assert!(matches!(
        s.issue(reference(b, MINUTE)).await,
        Err(ReferenceStoreError::Full)
    ));
    assert!(s.take(&b_unused, b).await.is_ok());
    // Revoking a token without references is fine.
    s.revoke_token(TokenId::new()).await.unwrap();
}

async fn full_at_max_entries_then_room_after_take_and_expiry(f: &Fixture) {
    let s = f.store(2).await;
    let t = TokenId::new();
    let long = s.issue(reference(t, MINUTE)).await.unwrap();
    let short = s.issue(reference(t, SHORT)).await.unwrap();
    assert!(matches!(
        s.issue(reference(t, MINUTE)).await,
        Err(ReferenceStoreError::Full)
    ));
    // Nothing issued was dropped to make room.
    assert!(s.peek(&long, t).await.is_ok());
    assert!(s.peek(&short, t).await.is_ok());
    // Taking frees a slot.
    s.take(&long, t).await.unwrap();
    let _short2 = s.issue(reference(t, SHORT)).await.unwrap();
    assert!(matches!(
        s.issue(reference(t, MINUTE)).await,
        Err(ReferenceStoreError::Full)
    ));
    // So does expiry.
    past_short_ttl().await;
    s.issue(reference(t, MINUTE)).await.unwrap();
    s.issue(reference(t, MINUTE)).await.unwrap();
    assert_eq!(s.len(), 2);
    assert!(matches!(
        s.issue(reference(t, MINUTE)).await,
        Err(ReferenceStoreError::Full)
    ));
}

async fn used_references_do_not_count_toward_the_bound(f: &Fixture) {
    let s = f.store(2).await;
    let t = TokenId::new();
    for _ in 0..20 {
        let id = s.issue(reference(t, MINUTE)).await.unwrap();
        s.take(&id, t).await.unwrap();
        assert_eq!(refused(s.take(&id, t).await), TakeError::AlreadyUsed);
    }
    assert_eq!(s.len(), 0);
    let a = s.issue(reference(t, MINUTE)).await.unwrap();
    s.issue(reference(t, MINUTE)).await.unwrap();
    assert!(matches!(
        s.issue(reference(t, MINUTE)).await,
        Err(ReferenceStoreError::Full)
    ));
    let taken = s.take(&a, t).await.unwrap();
    assert_eq!(s.len(), 1);
    s.restore(&a, taken).await.unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(s.take(&a, t).await.unwrap().payload.eci, "07");
}

async fn every_payload_field_comes_back(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let id = s
        .issue(Reference {
            token_id: t,
            expires_at: OffsetDateTime::now_utc() + MINUTE,
            payload: payload(CryptogramType::DynamicCvv, "05"),
        })
        .await
        .unwrap();
    for r in [s.peek(&id, t).await.unwrap(), s.take(&id, t).await.unwrap()] {
        let p = &r.payload;
        assert!(p.cryptogram.is_none());
        assert_eq!(
            p.dynamic_cvv.as_ref().map(Secret::expose),
            Some(DYNAMIC_CVV)
        );
        assert_eq!(p.cryptogram_type, CryptogramType::DynamicCvv);
        assert_eq!(p.eci, "05");
        let want: BTreeMap<String, String> = [
            ("card_hint".to_owned(), TPAN.to_owned()),
            ("order".to_owned(), "A-1001".to_owned()),
        ]
        .into();
        assert_eq!(p.metadata, want);
    }
}

async fn store_answers_ping(f: &Fixture) {
    f.store(1).await.ping().await.unwrap();
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Fixture::memory()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(f) = super::Fixture::redis(stringify!($name)) {
                        super::$name(&f).await;
                    }
                }
            )*
        }
    };
}

on_every_backend!(
    take_once_then_409_until_expiry,
    unknown_reference_is_not_found,
    expired_is_not_found_and_so_is_an_expired_tombstone,
    token_mismatch_leaves_it_usable,
    exactly_one_of_64_concurrent_takers,
    restore_makes_it_usable_again_with_its_original_expiry,
    revoke_kills_every_reference_of_that_token_only,
    full_at_max_entries_then_room_after_take_and_expiry,
    used_references_do_not_count_toward_the_bound,
    every_payload_field_comes_back,
    store_answers_ping,
);

// ---------------------------------------------------------------------------
// Redis only
// ---------------------------------------------------------------------------

/// Every value of every key under the prefix, as bytes, by type.
async fn dump_everything(f: &Fixture) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut con = f.raw().await;
    let mut out = Vec::new();
    for key in f.keys_written().await {
        let kind: String = ::redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        let mut cmd = match kind.as_str() {
            "hash" => ::redis::cmd("HGETALL"),
            "zset" => ::redis::cmd("ZRANGE"),
            "set" => ::redis::cmd("SMEMBERS"),
            "string" => ::redis::cmd("GET"),
            other => panic!("{key}: unexpected type {other}"),
        };
        cmd.arg(&key);
        if kind == "zset" {
            cmd.arg(0).arg(-1).arg("WITHSCORES");
        }
        let value: ::redis::Value = cmd.query_async(&mut con).await.unwrap();
        let items = match value {
            ::redis::Value::Array(items) => items,
            ::redis::Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            other => vec![other],
        };
        let values: Vec<Vec<u8>> = items
            .into_iter()
            .map(|i| ::redis::from_redis_value::<Vec<u8>>(i).unwrap())
            .collect();
        out.push((key, values));
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn nothing_in_redis_can_be_presented_or_read(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let unused = s.issue(reference(t, MINUTE)).await.unwrap();
    let used = s.issue(reference(t, MINUTE)).await.unwrap();
    s.take(&used, t).await.unwrap();
    let restored = s.issue(reference(t, MINUTE)).await.unwrap();
    let r = s.take(&restored, t).await.unwrap();
    s.restore(&restored, r).await.unwrap();
    let dcvv = s
        .issue(Reference {
            token_id: t,
            expires_at: OffsetDateTime::now_utc() + MINUTE,
            payload: payload(CryptogramType::DynamicCvv, "05"),
        })
        .await
        .unwrap();

    let dump = dump_everything(f).await;
    assert!(
        dump.len() >= 6,
        "expected 4 refs, live and token index: {dump:?}"
    );
    // The dump really holds the values: the token id is stored in the clear.
    let token = t.to_string();
    assert!(dump
        .iter()
        .any(|(_, vs)| vs.iter().any(|v| contains(v, token.as_bytes()))));
    let mut forbidden: Vec<Vec<u8>> = vec![
        CRYPTOGRAM.into(),
        DYNAMIC_CVV.into(),
        TPAN.into(),
        "A-1001".into(),
    ];
    for id in [&unused, &used, &restored, &dcvv] {
        forbidden.push(id.as_str().into());
        // The random part alone, too.
        forbidden.push(id.as_str()["cref_".len()..].into());
    }
    for (key, values) in &dump {
        for needle in &forbidden {
            let shown = String::from_utf8_lossy(needle);
            assert!(!contains(key.as_bytes(), needle), "{shown} in key {key}");
            for v in values {
                assert!(!contains(v, needle), "{shown} in a value of {key}");
            }
        }
    }
}

async fn take_drops_the_sealed_payload_and_keeps_the_expiry(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let id = s.issue(reference(t, MINUTE)).await.unwrap();
    let mut con = f.raw().await;
    let ref_keys = f.ref_keys().await;
    assert_eq!(ref_keys.len(), 1);
    let key = &ref_keys[0];
    let before: i64 = ::redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut con)
        .await
        .unwrap();
    s.take(&id, t).await.unwrap();
    let fields: Vec<String> = ::redis::cmd("HKEYS")
        .arg(key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!fields.contains(&"p".to_owned()), "{fields:?}");
    let after: i64 = ::redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut con)
        .await
        .unwrap();
    // Same PEXPIREAT: the remaining time only went down by the time taken.
    assert!(before > 50_000, "{before}");
    assert!(
        after <= before && after > before - 5_000,
        "{before} → {after}"
    );
}

async fn tampered_or_moved_ciphertext_is_refused(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let a = s.issue(reference(t, MINUTE)).await.unwrap();
    let mut con = f.raw().await;
    let ref_keys = f.ref_keys().await;
    let key_a = ref_keys[0].clone();
    let b = s.issue(reference(t, MINUTE)).await.unwrap();
    let key_b = f
        .ref_keys()
        .await
        .into_iter()
        .find(|k| *k != key_a)
        .unwrap();
    // b's sealed payload copied into a's hash does not open under a's key.
    let sealed_b: Vec<u8> = ::redis::cmd("HGET")
        .arg(&key_b)
        .arg("p")
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = ::redis::cmd("HSET")
        .arg(&key_a)
        .arg("p")
        .arg(&sealed_b)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(matches!(
        s.peek(&a, t).await,
        Err(TakeFailure::Store(ReferenceStoreError::Unavailable(_)))
    ));
    // A flipped bit does not open either.
    let mut flipped = sealed_b.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let _: () = ::redis::cmd("HSET")
        .arg(&key_b)
        .arg("p")
        .arg(&flipped)
        .query_async(&mut con)
        .await
        .unwrap();
    match s.take(&b, t).await {
        Err(TakeFailure::Store(ReferenceStoreError::Unavailable(m))) => {
            assert!(!m.contains(CRYPTOGRAM), "{m}");
        }
        other => panic!("expected Unavailable, got {:?}", other.map(|_| ())),
    }
}

async fn expiry_is_checked_against_our_clock(f: &Fixture) {
    // Redis's clock behind ours: the key is still there, the reference is
    // expired all the same.
    let s = f.store(10).await;
    let t = TokenId::new();
    let id = s.issue(reference(t, MINUTE)).await.unwrap();
    let key = f.ref_keys().await.remove(0);
    let past = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64 - 1000;
    let mut con = f.raw().await;
    let _: () = ::redis::cmd("HSET")
        .arg(&key)
        .arg("e")
        .arg(past)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(refused(s.peek(&id, t).await), TakeError::NotFound);
    assert_eq!(refused(s.take(&id, t).await), TakeError::NotFound);
}

async fn two_replicas_share_references_and_exactly_one_taker_wins(f: &Fixture) {
    let a: Arc<dyn ReferenceStore> = Arc::new(f.redis_store(10).await);
    let b: Arc<dyn ReferenceStore> = Arc::new(f.redis_store(10).await);
    let t = TokenId::new();
    let id = a.issue(reference(t, MINUTE)).await.unwrap();
    assert_eq!(
        cryptogram_of(&b.peek(&id, t).await.unwrap()),
        Some(CRYPTOGRAM)
    );
    let start = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (id, start) = (id.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            s.take(&id, t).await.is_ok()
        }));
    }
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.unwrap());
    }
    assert_eq!(wins, 1);
    // The bound is shared: what a holds counts for b.
    let c = Arc::new(f.redis_store(1).await);
    c.issue(reference(t, MINUTE)).await.unwrap();
    assert!(matches!(
        c.issue(reference(t, MINUTE)).await,
        Err(ReferenceStoreError::Full)
    ));
    b.revoke_token(t).await.unwrap();
    assert_eq!(b.len(), 0);
}

async fn a_store_under_other_keys_cannot_open_references(f: &Fixture) {
    let s = f.store(10).await;
    let t = TokenId::new();
    let id = s.issue(reference(t, MINUTE)).await.unwrap();
    let Backend::Redis { url, prefix } = &f.backend else {
        panic!("not a Redis fixture");
    };
    let other = RedisReferenceStore::connect(url, None, Arc::new(Keyring::ephemeral()), 10, prefix)
        .await
        .unwrap();
    assert!(matches!(
        other.peek(&id, t).await,
        Err(TakeFailure::Store(ReferenceStoreError::Unavailable(_)))
    ));
}

macro_rules! on_redis {
    ($($name:ident),* $(,)?) => {
        mod redis_only {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(f) = super::Fixture::redis(stringify!($name)) {
                        assert!(f.is_redis());
                        super::$name(&f).await;
                    }
                }
            )*
        }
    };
}

on_redis!(
    nothing_in_redis_can_be_presented_or_read,
    take_drops_the_sealed_payload_and_keeps_the_expiry,
    tampered_or_moved_ciphertext_is_refused,
    expiry_is_checked_against_our_clock,
    two_replicas_share_references_and_exactly_one_taker_wins,
    a_store_under_other_keys_cannot_open_references,
);
