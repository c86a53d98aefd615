//! A read-through cache of network tokens in front of a SQL vault.
//!
//! Every forward and every cryptogram reads its token. From SQLite that read
//! (a query on the blocking pool plus an AES-GCM open) was the largest single
//! cost of a forward — ~80 µs of CPU against ~55 µs for all the rest
//! (`VAULT=sqlite QUICK=1 python3 scripts/load.py`). A merchant mints a cryptogram
//! and forwards it seconds later, so a short-lived cache serves the second
//! read.
//!
//! Consistency: every change made through this replica updates the cache in
//! the same call, after the write commits, so this replica never reads its
//! own writes stale. A change made by *another* replica (sharing PostgreSQL)
//! is seen by [`TokenStore::get`] here after at most `vault.cache_ttl` (a
//! `GET` of the token may show the old status that long). Minting and
//! forwarding read through [`TokenStore::get_current`] instead: the status
//! and last-change time come from the database on every call (one indexed
//! read, nothing decrypted) and the cached copy is used only if it matches
//! them, so no replica mints or forwards for a token another replica has
//! suspended or deleted, from the next request on. `cache_ttl = "0s"` turns
//! the cache off.
//!
//! A read that raced a write must not put its older copy back: reads note
//! a write epoch before going to the store and insert only if no write
//! happened meanwhile, under the same small lock writers take to bump it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::card::CardNumber;

use super::{
    IdempotencyRecord, Inserted, NetworkToken, PciToken, PciTokenId, RotationCursor, RotationStep,
    StoreError, TokenChange, TokenId, TokenLookup, TokenStatus, TokenStore,
};

/// Most tokens kept.
const CAPACITY: u64 = 100_000;

/// The cache around `inner`.
pub struct CachedTokenStore {
    inner: Arc<dyn TokenStore>,
    tokens: moka::sync::Cache<TokenId, Arc<NetworkToken>>,
    /// Bumped by every write; guards inserts by readers.
    epoch: Mutex<u64>,
}

impl CachedTokenStore {
    /// Caches `inner`'s tokens for `ttl`.
    pub fn new(inner: Arc<dyn TokenStore>, ttl: Duration) -> Self {
        Self {
            inner,
            tokens: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(ttl)
                .build(),
            epoch: Mutex::new(0),
        }
    }

    fn epoch(&self) -> std::sync::MutexGuard<'_, u64> {
        // The counter is plain data: a poisoned lock still holds a usable one.
        self.epoch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a committed write: the cache holds what the store now holds.
    fn written(&self, id: TokenId, now: Option<&Arc<NetworkToken>>) {
        let mut epoch = self.epoch();
        *epoch += 1;
        match now {
            Some(t) => self.tokens.insert(id, t.clone()),
            None => self.tokens.invalidate(&id),
        }
    }
}

#[async_trait]
impl TokenStore for CachedTokenStore {
    async fn insert(
        &self,
        token: NetworkToken,
        idempotency: Option<(IdempotencyRecord, OffsetDateTime)>,
    ) -> Result<Inserted, StoreError> {
        let id = token.id;
        let inserted = self.inner.insert(token, idempotency).await?;
        self.written(id, None);
        Ok(inserted)
    }

    async fn get(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        if let Some(t) = self.tokens.get(&id) {
            return Ok(Some(t));
        }
        let before = *self.epoch();
        let token = self.inner.get(id).await?;
        if let Some(t) = &token {
            let epoch = self.epoch();
            if *epoch == before {
                self.tokens.insert(id, t.clone());
            }
        }
        Ok(token)
    }

    async fn get_current(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        // The status always comes from the store; the cached copy serves
        // the rest (and saves the decryption) only while it still matches.
        let before = *self.epoch();
        let Some((status, updated_at)) = self.inner.status_now(id).await? else {
            self.tokens.invalidate(&id);
            return Ok(None);
        };
        if let Some(t) = self.tokens.get(&id) {
            if t.status == status && t.updated_at == updated_at {
                return Ok(Some(t));
            }
        }
        let token = self.inner.get(id).await?;
        let epoch = self.epoch();
        match &token {
            Some(t) if *epoch == before => self.tokens.insert(id, t.clone()),
            _ => self.tokens.invalidate(&id),
        }
        Ok(token)
    }

    async fn status_now(
        &self,
        id: TokenId,
    ) -> Result<Option<(TokenStatus, time::OffsetDateTime)>, StoreError> {
        self.inner.status_now(id).await
    }

    async fn update(
        &self,
        id: TokenId,
        change: TokenChange,
    ) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        let result = self.inner.update(id, change).await;
        // On an error the write may or may not have landed: forget the copy.
        self.written(id, result.as_ref().ok().and_then(Option::as_ref));
        result
    }

    async fn find_tokens(&self, by: TokenLookup<'_>) -> Result<Vec<Arc<NetworkToken>>, StoreError> {
        // A lookup by card or number is not on the forward path: always the
        // store's current answer.
        self.inner.find_tokens(by).await
    }

    async fn next_counter(&self, id: TokenId) -> Result<u64, StoreError> {
        // The counter is not part of the cached token.
        self.inner.next_counter(id).await
    }

    fn fingerprint(&self, pan: &CardNumber) -> [u8; 32] {
        self.inner.fingerprint(pan)
    }

    // PCI tokens are not cached (only the forward's network-token read is
    // hot), so a reissue written by `insert_pci` is what the next read sees.
    async fn insert_pci(&self, token: PciToken) -> Result<(Arc<PciToken>, bool), StoreError> {
        self.inner.insert_pci(token).await
    }

    async fn get_pci(&self, id: PciTokenId) -> Result<Option<Arc<PciToken>>, StoreError> {
        self.inner.get_pci(id).await
    }

    async fn delete_pci(&self, id: PciTokenId) -> Result<bool, StoreError> {
        self.inner.delete_pci(id).await
    }

    async fn get_idempotency(
        &self,
        key: &str,
        horizon: OffsetDateTime,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.inner.get_idempotency(key, horizon).await
    }

    async fn put_idempotency(
        &self,
        record: IdempotencyRecord,
        horizon: OffsetDateTime,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.inner.put_idempotency(record, horizon).await
    }

    async fn finish_idempotency(&self, record: IdempotencyRecord) -> Result<bool, StoreError> {
        self.inner.finish_idempotency(record).await
    }

    async fn release_idempotency(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
    ) -> Result<(), StoreError> {
        self.inner.release_idempotency(key, fingerprint).await
    }

    async fn rotate_batch(
        &self,
        cursor: &mut RotationCursor,
        batch: usize,
    ) -> Result<RotationStep, StoreError> {
        // Re-encryption changes the ciphertext, not the token.
        self.inner.rotate_batch(cursor, batch).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use time::OffsetDateTime;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::vault::memory::MemoryTokenStore;
    use crate::vault::TokenStatus;

    /// A real memory store that counts token reads and, when armed, holds
    /// each read until the test lets it finish.
    #[derive(Default)]
    struct Watched {
        store: MemoryTokenStore,
        reads: AtomicUsize,
        gate: Option<Semaphore>,
    }

    #[async_trait]
    impl TokenStore for Watched {
        async fn insert(
            &self,
            t: NetworkToken,
            i: Option<(IdempotencyRecord, OffsetDateTime)>,
        ) -> Result<Inserted, StoreError> {
            self.store.insert(t, i).await
        }
        async fn get(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let t = self.store.get(id).await;
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            t
        }
        async fn update(
            &self,
            id: TokenId,
            c: TokenChange,
        ) -> Result<Option<Arc<NetworkToken>>, StoreError> {
            self.store.update(id, c).await
        }
        async fn find_tokens(
            &self,
            by: TokenLookup<'_>,
        ) -> Result<Vec<Arc<NetworkToken>>, StoreError> {
            self.store.find_tokens(by).await
        }
        async fn next_counter(&self, id: TokenId) -> Result<u64, StoreError> {
            self.store.next_counter(id).await
        }
        fn fingerprint(&self, pan: &CardNumber) -> [u8; 32] {
            self.store.fingerprint(pan)
        }
        async fn insert_pci(&self, t: PciToken) -> Result<(Arc<PciToken>, bool), StoreError> {
            self.store.insert_pci(t).await
        }
        async fn get_pci(&self, id: PciTokenId) -> Result<Option<Arc<PciToken>>, StoreError> {
            self.store.get_pci(id).await
        }
        async fn delete_pci(&self, id: PciTokenId) -> Result<bool, StoreError> {
            self.store.delete_pci(id).await
        }
        async fn get_idempotency(
            &self,
            k: &str,
            a: OffsetDateTime,
        ) -> Result<Option<IdempotencyRecord>, StoreError> {
            self.store.get_idempotency(k, a).await
        }
        async fn put_idempotency(
            &self,
            r: IdempotencyRecord,
            a: OffsetDateTime,
        ) -> Result<Option<IdempotencyRecord>, StoreError> {
            self.store.put_idempotency(r, a).await
        }
        async fn finish_idempotency(&self, r: IdempotencyRecord) -> Result<bool, StoreError> {
            self.store.finish_idempotency(r).await
        }
        async fn release_idempotency(&self, k: &str, f: &[u8; 32]) -> Result<(), StoreError> {
            self.store.release_idempotency(k, f).await
        }
        async fn rotate_batch(
            &self,
            c: &mut RotationCursor,
            b: usize,
        ) -> Result<RotationStep, StoreError> {
            self.store.rotate_batch(c, b).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    async fn stored(inner: &Arc<Watched>) -> TokenId {
        let t = crate::vault::test_token();
        let id = t.id;
        inner.insert(t, None).await.unwrap();
        id
    }

    #[tokio::test]
    async fn a_second_read_is_served_from_the_cache() {
        let inner = Arc::new(Watched::default());
        let id = stored(&inner).await;
        let cache = CachedTokenStore::new(inner.clone(), Duration::from_secs(60));
        assert!(cache.get(id).await.unwrap().is_some());
        assert!(cache.get(id).await.unwrap().is_some());
        assert_eq!(inner.reads.load(Ordering::SeqCst), 1);
        // Unknown tokens are not cached: a later insert is seen at once.
        assert!(cache.get(TokenId::new()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn this_replicas_writes_are_read_back_at_once() {
        let inner = Arc::new(Watched::default());
        let id = stored(&inner).await;
        let cache = CachedTokenStore::new(inner.clone(), Duration::from_secs(60));
        cache.get(id).await.unwrap();
        cache
            .set_status(id, TokenStatus::Inactive)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            cache.get(id).await.unwrap().unwrap().status,
            TokenStatus::Inactive
        );
        cache
            .update(
                id,
                TokenChange::Expiry {
                    month: 3,
                    year: 2033,
                },
            )
            .await
            .unwrap();
        let t = cache.get(id).await.unwrap().unwrap();
        assert_eq!((t.expiry_month, t.expiry_year), (3, 2033));
        assert_eq!(inner.reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn another_replicas_write_shows_after_the_ttl() {
        let inner = Arc::new(Watched::default());
        let id = stored(&inner).await;
        let cache = CachedTokenStore::new(inner.clone(), Duration::from_millis(50));
        cache.get(id).await.unwrap();
        // Straight to the shared store, as another replica would.
        inner.set_status(id, TokenStatus::Deleted).await.unwrap();
        assert_eq!(
            cache.get(id).await.unwrap().unwrap().status,
            TokenStatus::Active,
            "within the TTL the copy is served (the documented window)"
        );
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            cache.get(id).await.unwrap().unwrap().status,
            TokenStatus::Deleted
        );
    }

    #[tokio::test]
    async fn a_read_that_raced_a_write_does_not_put_its_old_copy_back() {
        let inner = Arc::new(Watched {
            gate: Some(Semaphore::new(0)),
            ..Watched::default()
        });
        let id = stored(&inner).await;
        let cache = Arc::new(CachedTokenStore::new(
            inner.clone(),
            Duration::from_secs(60),
        ));
        // The read fetches the active token, then stalls before caching it.
        let read = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(id).await.unwrap().unwrap().status }
        });
        while inner.reads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Meanwhile this replica suspends the token.
        cache.set_status(id, TokenStatus::Inactive).await.unwrap();
        inner.gate.as_ref().unwrap().add_permits(1);
        assert_eq!(read.await.unwrap(), TokenStatus::Active);
        assert_eq!(
            cache.get(id).await.unwrap().unwrap().status,
            TokenStatus::Inactive,
            "the stale read must not have been cached"
        );
    }
}
