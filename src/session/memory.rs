//! In-process session store on a moka cache, beside the memory reference
//! store and with the same two precautions: every entry carries its own
//! expiry and every read checks it (moka may hand out an entry past its
//! expiry before evicting it), and moka has no size bound of its own (its
//! admission policy could silently drop a session) — the bound is
//! enforced here, and a full store refuses to open a session.
//!
//! moka evicts an entry when the store's clock says it has expired (its
//! timer is set from `expires_at` on that clock at insertion); whether a
//! take finds it is decided by the `now` it is given.
//!
//! An entry's private key is dropped (and zeroized, by `p256`) the moment
//! the session is taken; the entry stays, empty, until its expiry so that a
//! retry answers `session_already_used`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::sync::Cache;
use moka::Expiry;
use p256::SecretKey;
use time::OffsetDateTime;

use super::{SessionId, SessionStore, TakeError, TakeFailure};
use crate::clock::SharedClock;
use crate::references::ReferenceStoreError;

struct Slot {
    expires_at: OffsetDateTime,
    /// `None` once taken.
    key: Mutex<Option<SecretKey>>,
}

/// moka's timer for an entry: what is left of it on the store's clock.
struct ByExpiresAt(SharedClock);

impl Expiry<SessionId, Arc<Slot>> for ByExpiresAt {
    fn expire_after_create(&self, _: &SessionId, s: &Arc<Slot>, _: Instant) -> Option<Duration> {
        let left = s.expires_at - self.0.now();
        Some(left.try_into().unwrap_or(Duration::ZERO))
    }
}

/// Sessions in this process.
pub struct MemorySessionStore {
    cache: Cache<SessionId, Arc<Slot>>,
    max_entries: u64,
}

impl MemorySessionStore {
    /// At most `max_entries` sessions (open or spent, until they expire on
    /// `clock`).
    pub fn new(max_entries: u64, clock: SharedClock) -> Self {
        Self {
            cache: Cache::builder().expire_after(ByExpiresAt(clock)).build(),
            max_entries,
        }
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    async fn insert(
        &self,
        id: &SessionId,
        key: &SecretKey,
        expires_at: OffsetDateTime,
    ) -> Result<(), ReferenceStoreError> {
        // moka's count lags its writes until maintenance runs; one session
        // per checkout is rare enough to run it every time, so the bound
        // is exact.
        self.cache.run_pending_tasks();
        if self.cache.entry_count() >= self.max_entries {
            return Err(ReferenceStoreError::Full);
        }
        let slot = Arc::new(Slot {
            expires_at,
            key: Mutex::new(Some(key.clone())),
        });
        // 128 random bits never collide; refuse rather than overwrite.
        let entry = self.cache.entry(id.clone()).or_insert(slot);
        if !entry.is_fresh() {
            return Err(ReferenceStoreError::Unavailable(
                "session id collision".into(),
            ));
        }
        Ok(())
    }

    async fn take(&self, id: &SessionId, now: OffsetDateTime) -> Result<SecretKey, TakeFailure> {
        let slot = self.cache.get(id).ok_or(TakeError::NotFound)?;
        if slot.expires_at <= now {
            return Err(TakeError::NotFound.into());
        }
        let taken = slot
            .key
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        taken.ok_or_else(|| TakeError::AlreadyUsed.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::session::generate_key;

    #[tokio::test]
    async fn single_use_expiry_and_bound() {
        let store = MemorySessionStore::new(2, SystemClock::shared());
        let now = OffsetDateTime::now_utc();
        let ttl = time::Duration::minutes(15);
        let (a, b) = (SessionId::generate(), SessionId::generate());
        let key = generate_key();
        store.insert(&a, &key, now + ttl).await.unwrap();
        store.insert(&b, &generate_key(), now + ttl).await.unwrap();
        assert!(matches!(
            store
                .insert(&SessionId::generate(), &generate_key(), now + ttl)
                .await,
            Err(ReferenceStoreError::Full)
        ));
        // Past its expiry (driven by `now`, not by sleeping): not found,
        // and still usable at a time before it.
        assert!(matches!(
            store.take(&a, now + ttl).await,
            Err(TakeFailure::Refused(TakeError::NotFound))
        ));
        let got = store.take(&a, now).await.unwrap();
        assert_eq!(got.to_bytes(), key.to_bytes());
        assert!(matches!(
            store.take(&a, now).await,
            Err(TakeFailure::Refused(TakeError::AlreadyUsed))
        ));
        assert!(matches!(
            store.take(&SessionId::generate(), now).await,
            Err(TakeFailure::Refused(TakeError::NotFound))
        ));
    }

    #[test]
    fn exactly_one_of_many_concurrent_takers_gets_the_key() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let store = Arc::new(MemorySessionStore::new(10, SystemClock::shared()));
            let id = SessionId::generate();
            let now = OffsetDateTime::now_utc();
            store
                .insert(&id, &generate_key(), now + time::Duration::minutes(1))
                .await
                .unwrap();
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let (store, id) = (store.clone(), id.clone());
                    tokio::spawn(async move { store.take(&id, now).await.is_ok() })
                })
                .collect();
            let mut wins = 0;
            for t in tasks {
                wins += usize::from(t.await.unwrap());
            }
            assert_eq!(wins, 1);
        });
    }
}
