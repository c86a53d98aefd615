//! In-process reference store on a moka cache.
//!
//! Two moka properties shape this file. First, a read or removal can see an
//! entry that has expired but not yet been evicted, so every entry carries
//! its own `expires_at` and every read checks it. Second, with a size bound
//! moka's admission policy may silently refuse an insert; so moka gets no
//! size bound at all, and the bound is enforced here with a counter of
//! *unused* references: when it is reached, `issue` fails with
//! [`ReferenceStoreError::Full`] and nothing is handed out that is not
//! stored.
//!
//! A taken reference becomes a tombstone until its expiry — its cryptogram
//! dropped, a few dozen bytes left — so a retry answers 409, not 404.
//! Tombstones do not count toward the bound (otherwise the bound would cap
//! the issuance *rate* at `max_entries / reference_ttl`); their number is
//! bounded by that rate times the TTL instead.
//!
//! Every state change goes through `and_compute_with`, which moka serialises
//! per key: that is what makes `take` exactly-once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::sync::Cache;
use moka::Expiry;
use time::OffsetDateTime;

use super::{
    Payload, Reference, ReferenceId, ReferenceStore, ReferenceStoreError, TakeError, TakeFailure,
};
use crate::vault::TokenId;

#[derive(Clone)]
struct Entry {
    reference: Reference,
    used: bool,
}

impl Entry {
    fn live(&self, now: OffsetDateTime) -> bool {
        self.reference.expires_at > now
    }
}

/// Each entry expires at its own `expires_at`, also after updates (so a
/// restored reference keeps its original expiry).
struct ByExpiresAt;

impl ByExpiresAt {
    fn remaining(e: &Entry) -> Option<Duration> {
        let left = e.reference.expires_at - OffsetDateTime::now_utc();
        Some(left.try_into().unwrap_or(Duration::ZERO))
    }
}

impl Expiry<ReferenceId, Entry> for ByExpiresAt {
    fn expire_after_create(&self, _: &ReferenceId, e: &Entry, _: Instant) -> Option<Duration> {
        Self::remaining(e)
    }

    fn expire_after_update(
        &self,
        _: &ReferenceId,
        e: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Self::remaining(e)
    }
}

/// The moka-backed store.
pub struct MemoryReferenceStore {
    cache: Cache<ReferenceId, Entry>,
    /// Unused references held.
    live: Arc<AtomicU64>,
    max_entries: u64,
    /// What a tombstone keeps instead of the cryptogram.
    spent: Arc<Payload>,
}

impl MemoryReferenceStore {
    /// A store holding at most `max_entries` references (used ones count
    /// until they expire).
    pub fn new(max_entries: u64) -> Self {
        let live = Arc::new(AtomicU64::new(0));
        let counter = live.clone();
        let cache = Cache::builder()
            .expire_after(ByExpiresAt)
            .support_invalidation_closures()
            .eviction_listener(move |_k, v: Entry, cause| {
                // A replacement is the same reference changing state (the
                // counter moves with the state change); tombstones are not
                // counted.
                if cause != RemovalCause::Replaced && !v.used {
                    counter.fetch_sub(1, Ordering::Relaxed);
                }
            })
            .build();
        Self {
            cache,
            live,
            max_entries,
            spent: Arc::new(Payload {
                cryptogram: None,
                dynamic_cvv: None,
                cryptogram_type: crate::tsp::CryptogramType::Tavv,
                eci: "",
                metadata: crate::vault::Metadata::new(),
            }),
        }
    }

    fn reserve_slot(&self) -> bool {
        if self.live.fetch_add(1, Ordering::AcqRel) < self.max_entries {
            return true;
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
        // Expired entries may be waiting for eviction: evict, then retry once.
        self.cache.run_pending_tasks();
        if self.live.fetch_add(1, Ordering::AcqRel) < self.max_entries {
            return true;
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
        false
    }

    fn judge(entry: Option<&Entry>, token_id: TokenId) -> Result<Reference, TakeError> {
        match entry {
            Some(e) if e.live(OffsetDateTime::now_utc()) => {
                if e.reference.token_id != token_id {
                    Err(TakeError::TokenMismatch)
                } else if e.used {
                    Err(TakeError::AlreadyUsed)
                } else {
                    Ok(e.reference.clone())
                }
            }
            _ => Err(TakeError::NotFound),
        }
    }
}

#[async_trait]
impl ReferenceStore for MemoryReferenceStore {
    async fn issue(&self, reference: Reference) -> Result<ReferenceId, ReferenceStoreError> {
        if !self.reserve_slot() {
            return Err(ReferenceStoreError::Full);
        }
        let id = ReferenceId::generate();
        self.cache.insert(
            id.clone(),
            Entry {
                reference,
                used: false,
            },
        );
        Ok(id)
    }

    async fn take(&self, id: &ReferenceId, token_id: TokenId) -> Result<Reference, TakeFailure> {
        let mut outcome = Err(TakeError::NotFound);
        self.cache.entry_by_ref(id).and_compute_with(|current| {
            let current = current.map(|e| e.into_value());
            outcome = Self::judge(current.as_ref(), token_id);
            match (outcome.is_ok(), current) {
                (true, Some(mut e)) => {
                    e.used = true;
                    e.reference.payload = self.spent.clone();
                    Op::Put(e)
                }
                _ => Op::Nop,
            }
        });
        if outcome.is_ok() {
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(outcome?)
    }

    async fn peek(&self, id: &ReferenceId, token_id: TokenId) -> Result<Reference, TakeFailure> {
        Ok(Self::judge(self.cache.get(id).as_ref(), token_id)?)
    }

    async fn restore(
        &self,
        id: &ReferenceId,
        reference: Reference,
    ) -> Result<(), ReferenceStoreError> {
        let mut restored = false;
        self.cache
            .entry_by_ref(id)
            .and_compute_with(|current| match current {
                Some(e) if e.value().used => {
                    restored = true;
                    Op::Put(Entry {
                        reference,
                        used: false,
                    })
                }
                _ => Op::Nop,
            });
        if restored {
            // It was counted when issued; it is unused again.
            self.live.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    async fn revoke_token(&self, token_id: TokenId) -> Result<(), ReferenceStoreError> {
        self.cache
            .invalidate_entries_if(move |_, e| e.reference.token_id == token_id)
            .map_err(|e| ReferenceStoreError::Unavailable(e.to_string()))?;
        Ok(())
    }

    fn len(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::references::Payload;
    use crate::tsp::CryptogramType;
    use crate::vault::Metadata;

    fn reference(token_id: TokenId, ttl: Duration) -> Reference {
        Reference {
            token_id,
            expires_at: OffsetDateTime::now_utc() + ttl,
            payload: Arc::new(Payload {
                cryptogram: None,
                dynamic_cvv: None,
                cryptogram_type: CryptogramType::Tavv,
                eci: "07",
                metadata: Metadata::new(),
            }),
        }
    }

    #[tokio::test]
    async fn expired_is_not_found_even_before_eviction() {
        let s = MemoryReferenceStore::new(10);
        let t = TokenId::new();
        let id = s
            .issue(reference(t, Duration::from_millis(30)))
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(
            s.take(&id, t).await,
            Err(TakeFailure::Refused(TakeError::NotFound))
        ));
    }

    #[test]
    fn concurrent_takers_exactly_one_wins() {
        let s = Arc::new(MemoryReferenceStore::new(10));
        let t = TokenId::new();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let id = s
                .issue(reference(t, Duration::from_secs(60)))
                .await
                .unwrap();
            let mut tasks = Vec::new();
            for _ in 0..256 {
                let s = s.clone();
                let id = id.clone();
                tasks.push(tokio::spawn(async move { s.take(&id, t).await.is_ok() }));
            }
            let mut wins = 0;
            for task in tasks {
                wins += usize::from(task.await.unwrap());
            }
            assert_eq!(wins, 1);
        });
    }
}
