//! In-process reference store: sharded hash maps in which nothing is removed
//! on the request path.
//!
//! A reference lives in one of [`SHARDS`] maps, chosen by its id's random
//! bytes, under that shard's `std::sync::Mutex` (critical sections are a
//! lookup and a field write; no `.await` inside). Its entry is fixed at
//! issue — token, expiry — plus the payload, which a take moves out,
//! leaving the entry as the tombstone that answers a retry 409 until the
//! expiry. So a take is one lookup and one write in place: no insert, no
//! removal, and so no rehash, whatever the table holds. Expired entries
//! leave in small batches — one shard at a time, on a thread of the
//! store's own ([`SWEEP_ROUND`] for all of them) — and every read checks
//! the expiry itself, so an entry not yet swept is never usable.
//!
//! This replaced a moka cache. moka is the design's in-memory TTL cache and
//! stays for the token cache (`vault/cached.rs`: read often, rarely
//! removed), but a reference is removed once per forward, and there it
//! could not meet the hot path's bar: the removal of each taken entry cost
//! ~5 µs of the forward's ~42 µs of CPU, and moka rebuilt a segment of its
//! table (`BucketArray::rehash`) once removals passed a threshold — stalls
//! of 1–3 ms on a request thread that were most of the paced p99 (issue
//! #24's profile; `docs/performance.md`).
//!
//! The bound counts *unused* references only: when `max_entries` of them
//! are held, `issue` sweeps every shard once and, if that frees nothing,
//! fails with [`ReferenceStoreError::Full`], so nothing is handed out that
//! is not stored. Tombstones do not count (that would cap the issuance
//! *rate* at `max_entries / reference_ttl`); their number is bounded by the
//! rate times the TTL instead, which is why an entry is small: 32 bytes of
//! id, the token, the expiry and one pointer (see the size test below).
//!
//! Keys are the id's 32 random bytes; the map hashes them by taking eight
//! of those bytes as they are. That is safe against flooding because only
//! the store inserts, and only ids it drew from the CSPRNG: a caller's id
//! is looked up, never inserted.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    Payload, Reference, ReferenceId, ReferenceStore, ReferenceStoreError, TakeError, TakeFailure,
};
use crate::clock::{SharedClock, SystemClock};
use crate::vault::TokenId;

/// How many maps the references are spread over: enough that one shard's
/// sweep or growth touches a few thousand entries at a million references.
pub const SHARDS: usize = 256;

/// Every shard is swept once per round, one shard at a time.
pub const SWEEP_ROUND: std::time::Duration = std::time::Duration::from_secs(16);

/// Locks a mutex whose critical sections cannot panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A reference's 32 random bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key([u8; 32]);

impl Key {
    fn of(id: &ReferenceId) -> Option<Key> {
        id.bytes().map(Key)
    }

    fn shard(&self) -> usize {
        usize::from(self.0[8]) % SHARDS
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// The hash of a [`Key`] is its first eight random bytes.
#[derive(Default)]
struct RandomBits(u64);

impl Hasher for RandomBits {
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `Key`; anything else still hashes.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Shard = HashMap<Key, Entry, BuildHasherDefault<RandomBits>>;

/// One issued reference. `payload` is `Some` while unused, `None` once
/// taken (the tombstone).
struct Entry {
    token_id: TokenId,
    expires_at: OffsetDateTime,
    payload: Option<Arc<Payload>>,
}

impl Entry {
    /// Why this entry cannot be used for `wanted` now, if it cannot (its
    /// payload aside).
    fn refuse(&self, wanted: TokenId, now: OffsetDateTime) -> Option<TakeError> {
        if self.expires_at <= now {
            Some(TakeError::NotFound)
        } else if self.token_id != wanted {
            Some(TakeError::TokenMismatch)
        } else {
            None
        }
    }

    fn reference(&self, payload: Arc<Payload>) -> Reference {
        Reference {
            token_id: self.token_id,
            expires_at: self.expires_at,
            payload,
        }
    }
}

struct Shared {
    shards: Box<[Mutex<Shard>]>,
    /// Unused references held (issued, not taken, not yet swept).
    live: AtomicU64,
    max_entries: u64,
    clock: SharedClock,
}

impl Shared {
    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        lock(&self.shards[key.shard()])
    }

    /// Removes shard `i`'s expired entries, uncounting the unused ones.
    fn sweep(&self, i: usize) {
        let now = self.clock.now();
        self.remove_where(&self.shards[i], |e| e.expires_at <= now);
    }

    /// Removes the shard's entries that `gone` picks, and uncounts those
    /// of them still unused (a spent one's tombstone was uncounted when
    /// it was taken).
    fn remove_where(&self, shard: &Mutex<Shard>, gone: impl Fn(&Entry) -> bool) {
        let mut unused = 0;
        lock(shard).retain(|_, e| {
            let keep = !gone(e);
            if !keep && e.payload.is_some() {
                unused += 1;
            }
            keep
        });
        self.live.fetch_sub(unused, Ordering::AcqRel);
    }

    fn sweep_all(&self) {
        (0..SHARDS).for_each(|i| self.sweep(i));
    }

    fn reserve(&self) -> bool {
        let fits = || {
            if self.live.fetch_add(1, Ordering::AcqRel) < self.max_entries {
                return true;
            }
            self.live.fetch_sub(1, Ordering::AcqRel);
            false
        };
        // Expired references may be waiting for their sweep: sweep, then
        // try once more.
        fits() || {
            self.sweep_all();
            fits()
        }
    }
}

/// The in-process store. Dropping it stops its sweeper.
pub struct MemoryReferenceStore {
    shared: Arc<Shared>,
}

impl MemoryReferenceStore {
    /// A store holding at most `max_entries` unused references, on the
    /// system clock.
    pub fn new(max_entries: u64) -> std::io::Result<Self> {
        Self::with_clock(max_entries, SystemClock::shared())
    }

    /// The same on `clock`. Fails only if the sweeper thread cannot start:
    /// without it, tombstones would never leave.
    pub fn with_clock(max_entries: u64, clock: SharedClock) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            live: AtomicU64::new(0),
            max_entries,
            clock,
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("reference-sweep".into())
            .stack_size(64 * 1024)
            .spawn(move || sweep_forever(weak))?;
        Ok(Self { shared })
    }

    fn lookup<T>(
        &self,
        id: &ReferenceId,
        wanted: TokenId,
        f: impl FnOnce(&mut Entry) -> Result<T, TakeError>,
    ) -> Result<T, TakeFailure> {
        let key = Key::of(id).ok_or(TakeError::NotFound)?;
        let now = self.shared.clock.now();
        let mut shard = self.shared.shard(&key);
        let entry = shard.get_mut(&key).ok_or(TakeError::NotFound)?;
        if let Some(refused) = entry.refuse(wanted, now) {
            return Err(refused.into());
        }
        Ok(f(entry)?)
    }
}

/// The sweeper: one shard every `SWEEP_ROUND / SHARDS`, until the store is
/// dropped.
fn sweep_forever(shared: Weak<Shared>) {
    let pause = SWEEP_ROUND / SHARDS as u32;
    for i in (0..SHARDS).cycle() {
        std::thread::sleep(pause);
        match shared.upgrade() {
            Some(shared) => shared.sweep(i),
            None => return,
        }
    }
}

#[async_trait]
impl ReferenceStore for MemoryReferenceStore {
    async fn issue(&self, reference: Reference) -> Result<ReferenceId, ReferenceStoreError> {
        if !self.shared.reserve() {
            return Err(ReferenceStoreError::Full);
        }
        let entry = Entry {
            token_id: reference.token_id,
            expires_at: reference.expires_at,
            payload: Some(reference.payload),
        };
        loop {
            let (raw, id) = ReferenceId::random();
            let key = Key(raw);
            let mut shard = self.shared.shard(&key);
            // 256 random bits do not collide; if they ever did, the older
            // reference must not be overwritten.
            if let std::collections::hash_map::Entry::Vacant(slot) = shard.entry(key) {
                slot.insert(entry);
                return Ok(id);
            }
        }
    }

    async fn take(&self, id: &ReferenceId, token_id: TokenId) -> Result<Reference, TakeFailure> {
        let live = &self.shared.live;
        self.lookup(id, token_id, |entry| match entry.payload.take() {
            Some(payload) => {
                live.fetch_sub(1, Ordering::AcqRel);
                Ok(entry.reference(payload))
            }
            None => Err(TakeError::AlreadyUsed),
        })
    }

    async fn peek(&self, id: &ReferenceId, token_id: TokenId) -> Result<Reference, TakeFailure> {
        self.lookup(id, token_id, |entry| match &entry.payload {
            Some(payload) => Ok(entry.reference(payload.clone())),
            None => Err(TakeError::AlreadyUsed),
        })
    }

    async fn restore(
        &self,
        id: &ReferenceId,
        reference: Reference,
    ) -> Result<(), ReferenceStoreError> {
        // Only a live tombstone of the same token comes back: not an
        // expired, swept or revoked one (revocation removes the entry under
        // the same lock), and not a reference that is still unused.
        let Some(key) = Key::of(id) else {
            return Ok(());
        };
        let now = self.shared.clock.now();
        let mut shard = self.shared.shard(&key);
        if let Some(entry) = shard.get_mut(&key) {
            let tombstone = entry.payload.is_none()
                && entry.expires_at > now
                && entry.token_id == reference.token_id;
            if tombstone {
                // It was counted when issued; it is unused again.
                entry.payload = Some(reference.payload);
                self.shared.live.fetch_add(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    async fn revoke_token(&self, token_id: TokenId) -> Result<(), ReferenceStoreError> {
        for shard in self.shared.shards.iter() {
            self.shared.remove_where(shard, |e| e.token_id == token_id);
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.shared.live.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::references::Payload;
    use crate::tsp::CryptogramType;
    use crate::vault::Metadata;
    use time::Duration;

    fn reference(token_id: TokenId, expires_at: OffsetDateTime) -> Reference {
        Reference {
            token_id,
            expires_at,
            payload: Arc::new(Payload {
                cryptogram: None,
                dynamic_cvv: None,
                cryptogram_type: CryptogramType::Tavv,
                eci: "07",
                metadata: Metadata::new(),
            }),
        }
    }

    fn store(max: u64) -> (MemoryReferenceStore, Arc<ManualClock>) {
        let clock = ManualClock::starting_now();
        let store = MemoryReferenceStore::with_clock(max, clock.clone()).unwrap();
        (store, clock)
    }

    fn held(s: &MemoryReferenceStore) -> usize {
        s.shared.shards.iter().map(|m| lock(m).len()).sum()
    }

    fn refused(r: Result<Reference, TakeFailure>) -> TakeError {
        match r {
            Err(TakeFailure::Refused(e)) => e,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn usable_until_the_expiry_then_not_found_before_any_sweep() {
        let (s, clock) = store(10);
        let t = TokenId::new();
        let ttl = Duration::seconds(30);
        let a = s.issue(reference(t, clock.now() + ttl)).await.unwrap();
        let b = s.issue(reference(t, clock.now() + ttl)).await.unwrap();
        clock.advance(ttl - Duration::milliseconds(1));
        s.take(&a, t).await.unwrap();
        clock.advance(Duration::milliseconds(1));
        assert_eq!(refused(s.take(&b, t).await), TakeError::NotFound);
        assert_eq!(refused(s.peek(&b, t).await), TakeError::NotFound);
        // The tombstone of `a` has expired too.
        assert_eq!(refused(s.take(&a, t).await), TakeError::NotFound);
        assert_eq!(held(&s), 2, "nothing is removed by a read");
    }

    #[tokio::test]
    async fn a_take_leaves_a_tombstone_without_the_payload() {
        let (s, clock) = store(10);
        let t = TokenId::new();
        let id = s
            .issue(reference(t, clock.now() + Duration::minutes(1)))
            .await
            .unwrap();
        let key = Key::of(&id).unwrap();
        s.take(&id, t).await.unwrap();
        assert!(s.shared.shard(&key)[&key].payload.is_none());
        assert_eq!(s.len(), 0);
        assert_eq!(refused(s.take(&id, t).await), TakeError::AlreadyUsed);
        assert_eq!(
            refused(s.peek(&id, TokenId::new()).await),
            TakeError::TokenMismatch
        );
    }

    #[tokio::test]
    async fn a_sweep_removes_expired_entries_only_and_uncounts_unused_ones() {
        let (s, clock) = store(1_000);
        let t = TokenId::new();
        let soon = clock.now() + Duration::seconds(10);
        let later = clock.now() + Duration::minutes(10);
        for i in 0..300 {
            let id = s.issue(reference(t, soon)).await.unwrap();
            if i % 3 == 0 {
                s.take(&id, t).await.unwrap();
            }
        }
        let keep = s.issue(reference(t, later)).await.unwrap();
        assert_eq!((held(&s), s.len()), (301, 201));
        s.shared.sweep_all();
        assert_eq!((held(&s), s.len()), (301, 201), "nothing had expired");
        clock.advance(Duration::seconds(10));
        s.shared.sweep_all();
        assert_eq!((held(&s), s.len()), (1, 1));
        s.take(&keep, t).await.unwrap();
    }

    #[tokio::test]
    async fn a_full_store_sweeps_before_it_refuses() {
        let (s, clock) = store(3);
        let t = TokenId::new();
        for _ in 0..3 {
            s.issue(reference(t, clock.now() + Duration::seconds(5)))
                .await
                .unwrap();
        }
        let later = clock.now() + Duration::minutes(1);
        assert!(matches!(
            s.issue(reference(t, later)).await,
            Err(ReferenceStoreError::Full)
        ));
        clock.advance(Duration::seconds(5));
        let id = s.issue(reference(t, later)).await.unwrap();
        assert_eq!((held(&s), s.len()), (1, 1));
        s.take(&id, t).await.unwrap();
    }

    #[tokio::test]
    async fn restore_brings_back_only_a_live_tombstone_of_its_token() {
        let (s, clock) = store(10);
        let t = TokenId::new();
        let expires = clock.now() + Duration::minutes(1);
        let id = s.issue(reference(t, expires)).await.unwrap();
        // Not taken: a restore changes nothing (and counts nothing).
        s.restore(&id, reference(t, expires)).await.unwrap();
        assert_eq!(s.len(), 1);
        let taken = s.take(&id, t).await.unwrap();
        // Another token's restore does not rebind it.
        s.restore(&id, reference(TokenId::new(), expires))
            .await
            .unwrap();
        assert_eq!(refused(s.take(&id, t).await), TakeError::AlreadyUsed);
        s.restore(&id, taken).await.unwrap();
        assert_eq!(s.len(), 1);
        let again = s.take(&id, t).await.unwrap();
        clock.advance(Duration::minutes(1));
        s.restore(&id, again).await.unwrap();
        assert_eq!(refused(s.take(&id, t).await), TakeError::NotFound);
        assert_eq!(s.len(), 0);
    }

    #[tokio::test]
    async fn an_id_that_is_well_formed_but_not_canonical_is_not_found() {
        let (s, clock) = store(10);
        let t = TokenId::new();
        let id = s
            .issue(reference(t, clock.now() + Duration::minutes(1)))
            .await
            .unwrap();
        let text = id.as_str();
        let tweaked = format!(
            "{}{}",
            &text[..47],
            if &text[47..] == "B" { "C" } else { "B" }
        );
        let other = ReferenceId::parse(&tweaked).unwrap();
        assert_eq!(refused(s.take(&other, t).await), TakeError::NotFound);
        s.take(&id, t).await.unwrap();
    }

    #[test]
    fn an_entry_is_small() {
        // Key, token, expiry, one pointer; hashbrown adds a control byte.
        // The bound on tombstones (rate × TTL) is a bound on memory because
        // of this.
        let entry = std::mem::size_of::<(Key, Entry)>();
        assert!(entry <= 72, "{entry} bytes");
    }

    #[test]
    fn a_dropped_store_stops_its_sweeper() {
        let (s, _) = store(10);
        let weak = Arc::downgrade(&s.shared);
        drop(s);
        // The sweeper holds the store only for one shard's sweep at a time.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while weak.upgrade().is_some() {
            assert!(std::time::Instant::now() < deadline, "the sweeper keeps it");
            std::thread::yield_now();
        }
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
        let (s, clock) = store(10);
        let s = Arc::new(s);
        let t = TokenId::new();
        let rt = two_workers();
        rt.block_on(async {
            let id = s
                .issue(reference(t, clock.now() + Duration::minutes(1)))
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
        let (s, clock) = store(10_000);
        let s = Arc::new(s);
        let rt = two_workers();
        rt.block_on(async {
            for _ in 0..2_000 {
                let t = TokenId::new();
                let id = s
                    .issue(reference(t, clock.now() + Duration::minutes(1)))
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
                assert_eq!(
                    refused(s.take(&id, t).await),
                    TakeError::NotFound,
                    "a revoked reference came back"
                );
            }
            assert_eq!(s.len(), 0);
        });
    }

    #[test]
    fn takes_racing_a_revoke_count_each_reference_once() {
        let (s, clock) = store(10_000);
        let s = Arc::new(s);
        let t = TokenId::new();
        let rt = two_workers();
        rt.block_on(async {
            for _ in 0..20 {
                let mut ids = Vec::new();
                for _ in 0..200 {
                    let expires = clock.now() + Duration::minutes(1);
                    ids.push(s.issue(reference(t, expires)).await.unwrap());
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
                // Taken or revoked, each was uncounted exactly once: an
                // uncount by both would wrap the counter.
                assert_eq!(s.len(), 0);
                assert_eq!(held(&s), 0);
            }
        });
    }
}
