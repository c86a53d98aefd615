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
//! moka holds each unused reference, and never rewrites it: its state
//! (unused, used, evicted) lives in the entry's `Slot` behind its own
//! small lock, which is what makes `take` exactly-once. A take is a moka
//! read plus that lock; a moka write per take (`and_compute_with`) cost
//! about a tenth of the forward's CPU under load.
//!
//! A taken reference leaves moka (an entry there costs ~700 bytes) and
//! becomes a tombstone in `Spent` until its expiry — a keyed 128-bit hash
//! of its id, its token and its expiry, well under a tenth of that — so a
//! retry answers 409, not 404. Tombstones do not count toward the bound
//! (otherwise the bound would cap the issuance *rate* at `max_entries /
//! reference_ttl`); their number is bounded by that rate times the TTL
//! instead, which is why they must be small: 1,000 forwards a second with
//! the default 15-minute TTL keep 900,000 of them.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::sync::Cache;
use moka::Expiry;
use time::OffsetDateTime;

use super::{
    Payload, Reference, ReferenceId, ReferenceStore, ReferenceStoreError, TakeError, TakeFailure,
};
use crate::vault::TokenId;

/// Locks a mutex whose critical sections cannot panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a reference bound to `token_id` and expiring at `expires_at` cannot
/// be used for `wanted` right now, if it cannot (its state aside).
fn refuse(token_id: TokenId, expires_at: OffsetDateTime, wanted: TokenId) -> Option<TakeError> {
    if expires_at <= OffsetDateTime::now_utc() {
        Some(TakeError::NotFound)
    } else if token_id != wanted {
        Some(TakeError::TokenMismatch)
    } else {
        None
    }
}

/// One issued reference: what it is bound to, fixed at issue, and its state.
struct Slot {
    token_id: TokenId,
    expires_at: OffsetDateTime,
    state: Mutex<State>,
}

enum State {
    /// Issued, not yet taken: counted toward the bound.
    Unused(Arc<Payload>),
    /// Taken; the cryptogram is gone and the tombstone is in [`Spent`].
    Used,
    /// Removed from the cache (expired or revoked); never usable again.
    Evicted,
}

impl Slot {
    fn unused(reference: Reference) -> Arc<Slot> {
        Arc::new(Slot {
            token_id: reference.token_id,
            expires_at: reference.expires_at,
            state: Mutex::new(State::Unused(reference.payload)),
        })
    }

    fn refuse(&self, wanted: TokenId) -> Option<TakeError> {
        refuse(self.token_id, self.expires_at, wanted)
    }

    fn reference(&self, payload: Arc<Payload>) -> Reference {
        Reference {
            token_id: self.token_id,
            expires_at: self.expires_at,
            payload,
        }
    }
}

/// Each entry expires at its own `expires_at`.
struct ByExpiresAt;

impl Expiry<ReferenceId, Arc<Slot>> for ByExpiresAt {
    fn expire_after_create(&self, _: &ReferenceId, s: &Arc<Slot>, _: Instant) -> Option<Duration> {
        let left = s.expires_at - OffsetDateTime::now_utc();
        Some(left.try_into().unwrap_or(Duration::ZERO))
    }
}

/// Tombstones of taken references, until their expiry. Keys are a 128-bit
/// hash of the reference id under two random per-process keys (a collision
/// could only turn a 404 into a 409). Expired tombstones are swept from a
/// shard at most every [`Spent::SWEEP_EVERY`], when it is next written.
struct Spent {
    shards: Box<[Mutex<SpentShard>]>,
    keys: (RandomState, RandomState),
}

#[derive(Default)]
struct SpentShard {
    tombstones: HashMap<u128, (TokenId, OffsetDateTime)>,
    swept_at: Option<OffsetDateTime>,
}

impl Spent {
    const SHARDS: usize = 16;
    const SWEEP_EVERY: time::Duration = time::Duration::seconds(30);

    fn new() -> Self {
        Self {
            shards: (0..Self::SHARDS).map(|_| Mutex::default()).collect(),
            keys: (RandomState::new(), RandomState::new()),
        }
    }

    fn shard(&self, id: &ReferenceId) -> (MutexGuard<'_, SpentShard>, u128) {
        let (hi, lo) = (self.keys.0.hash_one(id), self.keys.1.hash_one(id));
        let key = (u128::from(hi) << 64) | u128::from(lo);
        (lock(&self.shards[lo as usize % Self::SHARDS]), key)
    }

    fn insert(&self, id: &ReferenceId, token_id: TokenId, expires_at: OffsetDateTime) {
        let (mut shard, key) = self.shard(id);
        let now = OffsetDateTime::now_utc();
        if shard
            .swept_at
            .is_none_or(|at| now - at >= Self::SWEEP_EVERY)
        {
            shard.tombstones.retain(|_, (_, exp)| *exp > now);
            shard.swept_at = Some(now);
        }
        shard.tombstones.insert(key, (token_id, expires_at));
    }

    /// The live tombstone of `id`: its token and expiry.
    fn get(&self, id: &ReferenceId) -> Option<(TokenId, OffsetDateTime)> {
        let (shard, key) = self.shard(id);
        shard
            .tombstones
            .get(&key)
            .copied()
            .filter(|(_, exp)| *exp > OffsetDateTime::now_utc())
    }

    fn revoke_token(&self, token_id: TokenId) {
        for shard in self.shards.iter() {
            lock(shard).tombstones.retain(|_, (t, _)| *t != token_id);
        }
    }

    /// Why a reference that is not in the cache cannot be taken.
    fn refuse(&self, id: &ReferenceId, wanted: TokenId) -> TakeError {
        match self.get(id) {
            Some((token_id, expires_at)) => {
                refuse(token_id, expires_at, wanted).unwrap_or(TakeError::AlreadyUsed)
            }
            None => TakeError::NotFound,
        }
    }
}

/// The moka-backed store.
pub struct MemoryReferenceStore {
    cache: Cache<ReferenceId, Arc<Slot>>,
    spent: Spent,
    /// Unused references held.
    live: Arc<AtomicU64>,
    max_entries: u64,
}

impl MemoryReferenceStore {
    /// A store holding at most `max_entries` unused references.
    pub fn new(max_entries: u64) -> Self {
        let live = Arc::new(AtomicU64::new(0));
        let counter = live.clone();
        let cache = Cache::builder()
            .expire_after(ByExpiresAt)
            .support_invalidation_closures()
            .eviction_listener(move |_k, slot: Arc<Slot>, _cause| {
                // Under the slot's lock, so a concurrent take either wins
                // before (and uncounts it) or finds it evicted. A taken
                // slot stays `Used`: whoever still holds it answers 409.
                let mut state = lock(&slot.state);
                if matches!(*state, State::Unused(_)) {
                    counter.fetch_sub(1, Ordering::AcqRel);
                    *state = State::Evicted;
                }
            })
            .build();
        Self {
            cache,
            spent: Spent::new(),
            live,
            max_entries,
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

    fn slot(&self, id: &ReferenceId, token_id: TokenId) -> Result<Arc<Slot>, TakeError> {
        let slot = self
            .cache
            .get(id)
            .ok_or_else(|| self.spent.refuse(id, token_id))?;
        match slot.refuse(token_id) {
            Some(e) => Err(e),
            None => Ok(slot),
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
        self.cache.insert(id.clone(), Slot::unused(reference));
        Ok(id)
    }

    async fn take(&self, id: &ReferenceId, token_id: TokenId) -> Result<Reference, TakeFailure> {
        let slot = self.slot(id, token_id)?;
        let mut state = lock(&slot.state);
        match std::mem::replace(&mut *state, State::Used) {
            State::Unused(payload) => {
                self.live.fetch_sub(1, Ordering::AcqRel);
                // The tombstone first, so a retry never finds neither.
                self.spent.insert(id, slot.token_id, slot.expires_at);
                drop(state);
                self.cache.invalidate(id);
                Ok(slot.reference(payload))
            }
            State::Used => Err(TakeError::AlreadyUsed.into()),
            State::Evicted => {
                *state = State::Evicted;
                Err(TakeError::NotFound.into())
            }
        }
    }

    async fn peek(&self, id: &ReferenceId, token_id: TokenId) -> Result<Reference, TakeFailure> {
        let slot = self.slot(id, token_id)?;
        let state = lock(&slot.state);
        match &*state {
            State::Unused(payload) => Ok(slot.reference(payload.clone())),
            State::Used => Err(TakeError::AlreadyUsed.into()),
            State::Evicted => Err(TakeError::NotFound.into()),
        }
    }

    async fn restore(
        &self,
        id: &ReferenceId,
        reference: Reference,
    ) -> Result<(), ReferenceStoreError> {
        // Only a live tombstone comes back: not an expired or revoked one,
        // and not a reference that was never taken. The tombstone's removal
        // and the insert happen under its shard's lock, which a revocation
        // takes too before it registers its cache invalidation: either the
        // revocation removed the tombstone first (nothing comes back), or
        // the insert is done before the invalidation is registered, which
        // then covers it. A restore racing a revoke never resurrects.
        let (mut shard, key) = self.spent.shard(id);
        let live = shard
            .tombstones
            .remove(&key)
            .is_some_and(|(_, exp)| exp > OffsetDateTime::now_utc());
        if live {
            // It was counted when issued; it is unused again.
            self.live.fetch_add(1, Ordering::AcqRel);
            self.cache.insert(id.clone(), Slot::unused(reference));
        }
        drop(shard);
        Ok(())
    }

    async fn revoke_token(&self, token_id: TokenId) -> Result<(), ReferenceStoreError> {
        // Tombstones first (each shard under its lock), then the cache: see
        // `restore` for why this order makes the race with it safe.
        self.spent.revoke_token(token_id);
        self.cache
            .invalidate_entries_if(move |_, s| s.token_id == token_id)
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

    /// Two workers, so takers really run in parallel.
    fn two_workers() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap()
    }

    #[test]
    fn concurrent_takers_exactly_one_wins() {
        let s = Arc::new(MemoryReferenceStore::new(10));
        let t = TokenId::new();
        let rt = two_workers();
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

    #[test]
    fn a_restore_racing_a_revoke_never_resurrects() {
        let s = Arc::new(MemoryReferenceStore::new(10_000));
        let rt = two_workers();
        rt.block_on(async {
            for _ in 0..2_000 {
                let t = TokenId::new();
                let id = s
                    .issue(reference(t, Duration::from_secs(60)))
                    .await
                    .unwrap();
                let taken = s.take(&id, t).await.unwrap();
                let (a, b) = (s.clone(), s.clone());
                let rid = id.clone();
                let restore = tokio::spawn(async move { a.restore(&rid, taken).await });
                let revoke = tokio::spawn(async move { b.revoke_token(t).await });
                restore.await.unwrap().unwrap();
                revoke.await.unwrap().unwrap();
                // Whichever ran first, the reference is dead after both.
                assert!(
                    matches!(
                        s.take(&id, t).await,
                        Err(TakeFailure::Refused(TakeError::NotFound))
                    ),
                    "a revoked reference came back"
                );
            }
        });
    }

    #[test]
    fn takes_racing_a_revoke_count_each_reference_once() {
        let s = Arc::new(MemoryReferenceStore::new(10_000));
        let t = TokenId::new();
        let rt = two_workers();
        rt.block_on(async {
            for _ in 0..20 {
                let mut ids = Vec::new();
                for _ in 0..200 {
                    ids.push(
                        s.issue(reference(t, Duration::from_secs(60)))
                            .await
                            .unwrap(),
                    );
                }
                // Some are tombstones before the revoke, some race it.
                for id in ids.drain(..50) {
                    s.take(&id, t).await.unwrap();
                }
                let takers = tokio::spawn({
                    let s = s.clone();
                    async move {
                        let mut taken = 0;
                        for id in ids {
                            taken += usize::from(s.take(&id, t).await.is_ok());
                        }
                        taken
                    }
                });
                s.revoke_token(t).await.unwrap();
                takers.await.unwrap();
                s.cache.run_pending_tasks();
                // Taken or evicted, each was uncounted exactly once: an
                // uncount by both would wrap the counter.
                assert_eq!(s.len(), 0);
            }
        });
    }

    #[tokio::test]
    async fn a_taken_reference_leaves_the_cache_and_its_tombstone_answers() {
        let s = MemoryReferenceStore::new(10);
        let t = TokenId::new();
        let id = s
            .issue(reference(t, Duration::from_secs(60)))
            .await
            .unwrap();
        s.take(&id, t).await.unwrap();
        s.cache.run_pending_tasks();
        assert_eq!(s.cache.entry_count(), 0, "the moka entry is gone");
        assert!(matches!(
            s.take(&id, t).await,
            Err(TakeFailure::Refused(TakeError::AlreadyUsed))
        ));
        assert!(matches!(
            s.peek(&id, TokenId::new()).await,
            Err(TakeFailure::Refused(TakeError::TokenMismatch))
        ));
    }

    #[tokio::test]
    async fn expired_tombstones_are_swept_when_their_shard_is_next_written() {
        let s = MemoryReferenceStore::new(1_000);
        let t = TokenId::new();
        for _ in 0..200 {
            let id = s
                .issue(reference(t, Duration::from_millis(20)))
                .await
                .unwrap();
            s.take(&id, t).await.unwrap();
        }
        let held = || -> usize {
            s.spent
                .shards
                .iter()
                .map(|m| lock(m).tombstones.len())
                .sum()
        };
        assert_eq!(held(), 200);
        std::thread::sleep(Duration::from_millis(40));
        // Every shard is due for a sweep and gets a write.
        for shard in s.spent.shards.iter() {
            lock(shard).swept_at = Some(OffsetDateTime::now_utc() - Spent::SWEEP_EVERY);
        }
        let (mut written, mut taken) = (std::collections::HashSet::new(), 0);
        while written.len() < Spent::SHARDS {
            let id = s
                .issue(reference(t, Duration::from_secs(60)))
                .await
                .unwrap();
            let key = s.spent.shard(&id).1;
            written.insert(key as u64 as usize % Spent::SHARDS);
            s.take(&id, t).await.unwrap();
            taken += 1;
        }
        // Only the live ones are left.
        assert_eq!(held(), taken);
    }
}
