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

use crate::card::CardNumber;

use super::keyring::Keyring;
use super::{
    IdempotencyRecord, Inserted, NetworkToken, PciToken, PciTokenId, RotationCursor, RotationStep,
    StoreError, TokenChange, TokenId, TokenLookup, TokenStore,
};

/// The in-memory store.
pub struct MemoryTokenStore {
    inner: RwLock<Inner>,
    /// Nothing is at rest, but fingerprints still need a key.
    keys: Keyring,
}

impl Default for MemoryTokenStore {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            keys: Keyring::ephemeral(),
        }
    }
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<TokenId, Arc<NetworkToken>>,
    counters: HashMap<TokenId, u64>,
    idempotency: HashMap<String, IdempotencyRecord>,
    pci: HashMap<PciTokenId, Arc<PciToken>>,
}

fn live(r: &IdempotencyRecord, horizon: OffsetDateTime) -> bool {
    r.created_at > horizon
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
        idempotency: Option<(IdempotencyRecord, OffsetDateTime)>,
    ) -> Result<Inserted, StoreError> {
        let mut inner = self.write()?;
        if let Some((rec, horizon)) = idempotency {
            // An expired record is overwritten below, under the same lock.
            if let Some(existing) = inner.idempotency.get(&rec.key) {
                if live(existing, horizon) {
                    return Ok(Inserted::IdempotencyExists(existing.clone()));
                }
            }
            inner.idempotency.insert(rec.key.clone(), rec);
        }
        inner.tokens.insert(token.id, Arc::new(token));
        Ok(Inserted::Stored)
    }

    async fn get_idempotency(
        &self,
        key: &str,
        horizon: OffsetDateTime,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let inner = self
            .inner
            .read()
            .map_err(|_| StoreError::Unavailable("lock poisoned".into()))?;
        Ok(inner
            .idempotency
            .get(key)
            .filter(|r| live(r, horizon))
            .cloned())
    }

    async fn put_idempotency(
        &self,
        record: IdempotencyRecord,
        horizon: OffsetDateTime,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let mut inner = self.write()?;
        inner.idempotency.retain(|_, r| live(r, horizon));
        if let Some(existing) = inner.idempotency.get(&record.key) {
            return Ok(Some(existing.clone()));
        }
        inner.idempotency.insert(record.key.clone(), record);
        Ok(None)
    }

    async fn finish_idempotency(&self, record: IdempotencyRecord) -> Result<bool, StoreError> {
        let mut inner = self.write()?;
        match inner.idempotency.get_mut(&record.key) {
            Some(claim) if claim.is_in_flight() && claim.fingerprint == record.fingerprint => {
                claim.status = record.status;
                claim.body = record.body;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_idempotency(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
    ) -> Result<(), StoreError> {
        let mut inner = self.write()?;
        if inner
            .idempotency
            .get(key)
            .is_some_and(|r| r.is_in_flight() && r.fingerprint == *fingerprint)
        {
            inner.idempotency.remove(key);
        }
        Ok(())
    }

    async fn rotate_batch(
        &self,
        _cursor: &mut RotationCursor,
        _batch: usize,
    ) -> Result<RotationStep, StoreError> {
        // Nothing is at rest.
        Ok(RotationStep::default())
    }

    async fn get(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        let inner = self
            .inner
            .read()
            .map_err(|_| StoreError::Unavailable("lock poisoned".into()))?;
        Ok(inner.tokens.get(&id).cloned())
    }

    async fn update(
        &self,
        id: TokenId,
        change: TokenChange,
    ) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        let mut inner = self.write()?;
        let Some(current) = inner.tokens.get(&id) else {
            return Ok(None);
        };
        let mut next = NetworkToken::clone(current);
        if !change.apply(&mut next)? {
            return Ok(Some(current.clone()));
        }
        let next = Arc::new(next);
        inner.tokens.insert(id, next.clone());
        Ok(Some(next))
    }

    fn fingerprint(&self, pan: &CardNumber) -> [u8; 32] {
        self.keys.fingerprint(pan.expose())
    }

    async fn insert_pci(&self, token: PciToken) -> Result<(Arc<PciToken>, bool), StoreError> {
        let mut inner = self.write()?;
        if let Some(existing) = inner
            .pci
            .values()
            .find(|p| p.fingerprint == token.fingerprint)
        {
            // Under the write lock: read, reissue and replace are one step.
            let mut updated = PciToken::clone(existing);
            if !updated.reissue_from(&token) {
                return Ok((existing.clone(), false));
            }
            let updated = Arc::new(updated);
            inner.pci.insert(updated.id, updated.clone());
            return Ok((updated, false));
        }
        let token = Arc::new(token);
        inner.pci.insert(token.id, token.clone());
        Ok((token, true))
    }

    async fn get_pci(&self, id: PciTokenId) -> Result<Option<Arc<PciToken>>, StoreError> {
        let inner = self
            .inner
            .read()
            .map_err(|_| StoreError::Unavailable("lock poisoned".into()))?;
        Ok(inner.pci.get(&id).cloned())
    }

    async fn delete_pci(&self, id: PciTokenId) -> Result<bool, StoreError> {
        Ok(self.write()?.pci.remove(&id).is_some())
    }

    async fn find_tokens(&self, by: TokenLookup<'_>) -> Result<Vec<Arc<NetworkToken>>, StoreError> {
        let inner = self
            .inner
            .read()
            .map_err(|_| StoreError::Unavailable("lock poisoned".into()))?;
        let mut found: Vec<Arc<NetworkToken>> = inner
            .tokens
            .values()
            .filter(|t| match by {
                TokenLookup::Card(card) => t.pci_token_id == Some(card),
                TokenLookup::Number(n) => t.tpan == *n,
            })
            .cloned()
            .collect();
        found.sort_by_key(|t| (t.created_at, t.id));
        Ok(found)
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
