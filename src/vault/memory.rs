//! In-process token store: a map behind a lock, lost on restart.
//!
//! The lock is a `std::sync::RwLock` because no call awaits while holding it
//! and every critical section is a map lookup; an async lock would only add
//! cost. Tokens are kept as `Arc`s so readers on the forward path clone a
//! pointer, not the token.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    IdempotencyRecord, Inserted, NetworkToken, StoreError, TokenId, TokenStatus, TokenStore,
};

/// The in-memory store.
#[derive(Default)]
pub struct MemoryTokenStore {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<TokenId, Arc<NetworkToken>>,
    counters: HashMap<TokenId, u64>,
    idempotency: HashMap<String, IdempotencyRecord>,
}

fn live(r: &IdempotencyRecord, max_age: std::time::Duration) -> bool {
    r.created_at + max_age > OffsetDateTime::now_utc()
}

impl MemoryTokenStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn write(&self) -> Result<std::sync::RwLockWriteGuard<'_, Inner>, StoreError> {
        self.inner
            .write()
            .map_err(|_| StoreError::Unavailable("lock poisoned".into()))
    }
}

#[async_trait]
impl TokenStore for MemoryTokenStore {
    async fn insert(
        &self,
        token: NetworkToken,
        idempotency: Option<IdempotencyRecord>,
    ) -> Result<Inserted, StoreError> {
        let mut inner = self.write()?;
        if let Some(rec) = idempotency {
            if let Some(existing) = inner.idempotency.get(&rec.key) {
                return Ok(Inserted::IdempotencyExists(existing.clone()));
            }
            inner.idempotency.insert(rec.key.clone(), rec);
        }
        inner.tokens.insert(token.id, Arc::new(token));
        Ok(Inserted::Stored)
    }

    async fn get_idempotency(
        &self,
        key: &str,
        max_age: std::time::Duration,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let inner = self
            .inner
            .read()
            .map_err(|_| StoreError::Unavailable("lock poisoned".into()))?;
        Ok(inner
            .idempotency
            .get(key)
            .filter(|r| live(r, max_age))
            .cloned())
    }

    async fn put_idempotency(
        &self,
        record: IdempotencyRecord,
        max_age: std::time::Duration,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let mut inner = self.write()?;
        inner.idempotency.retain(|_, r| live(r, max_age));
        if let Some(existing) = inner.idempotency.get(&record.key) {
            return Ok(Some(existing.clone()));
        }
        inner.idempotency.insert(record.key.clone(), record);
        Ok(None)
    }

    async fn rotate_batch(&self, _batch: usize) -> Result<usize, StoreError> {
        // Nothing is at rest.
        Ok(0)
    }

    async fn get(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        let inner = self
            .inner
            .read()
            .map_err(|_| StoreError::Unavailable("lock poisoned".into()))?;
        Ok(inner.tokens.get(&id).cloned())
    }

    async fn set_status(
        &self,
        id: TokenId,
        status: TokenStatus,
    ) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        let mut inner = self.write()?;
        let Some(current) = inner.tokens.get(&id) else {
            return Ok(None);
        };
        let mut next = NetworkToken::clone(current);
        next.status = status;
        next.updated_at = OffsetDateTime::now_utc();
        let next = Arc::new(next);
        inner.tokens.insert(id, next.clone());
        Ok(Some(next))
    }

    async fn next_counter(&self, id: TokenId) -> Result<u64, StoreError> {
        let mut inner = self.write()?;
        let c = inner.counters.entry(id).or_insert(0);
        *c += 1;
        Ok(*c)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
