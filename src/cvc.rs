//! Card security codes (contract §4a): held for at most `cvc_ttl`, usable
//! by one forward, never written to disk.
//!
//! Where they live follows the references: in this process (moka) with the
//! memory backend; in Redis, sealed under the master key with the same TTL
//! and taken once (the reference store's sealed-blob primitive, kind
//! `cvc`), when `references.backend = "redis"` — so a PCI forward through
//! any replica finds the CVC another replica received. PCI DSS allows
//! sensitive authentication data before authorisation only while protected
//! and no longer than needed: the TTL and the single use hold in both.
//!
//! In memory the same moka traps as the reference store apply: entries
//! carry their own expiry and every read checks it; the cache has no size
//! bound of its own (admission could silently drop a CVC), and
//! [`CvcStore::hold`] refuses beyond `max_entries` instead.
//!
//! A CVC taken for a forward that never reached the acquirer is put back
//! with [`CvcStore::restore`]: with its original expiry, and only if no
//! newer CVC was held for the card meanwhile.
//!
//! Every expiry is decided on the store's [`Clock`](crate::clock::Clock).
//! What evicts an entry is the backend's own timer: moka's `time_to_live`
//! (process time) frees the memory, Redis's `PXAT` (wall time, the
//! expiry written from the clock) drops the key; a read past the clock's
//! expiry finds nothing either way.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use time::OffsetDateTime;

use crate::card::Secret;
use crate::clock::SharedClock;
use crate::references::redis::RedisReferenceStore;
use crate::references::ReferenceStoreError;
use crate::vault::PciTokenId;

/// Kind of the sealed blobs holding CVCs in Redis.
const KIND: &str = "cvc";

/// A CVC as held: the code and when it stops being usable.
#[derive(Clone)]
pub struct HeldCvc {
    cvc: Secret,
    expires_at: OffsetDateTime,
}

impl HeldCvc {
    /// The code.
    pub fn secret(&self) -> &Secret {
        &self.cvc
    }
}

enum Backend {
    Memory {
        cache: Cache<PciTokenId, HeldCvc>,
        max_entries: u64,
    },
    Shared(Arc<RedisReferenceStore>),
}

/// The CVC holder.
pub struct CvcStore {
    backend: Backend,
    ttl: Duration,
    clock: SharedClock,
}

impl CvcStore {
    /// In this process: CVCs live for `ttl` on `clock`; at most
    /// `max_entries` at once.
    pub fn new(ttl: Duration, max_entries: u64, clock: SharedClock) -> Self {
        Self {
            backend: Backend::Memory {
                cache: Cache::builder().time_to_live(ttl).build(),
                max_entries,
            },
            ttl,
            clock,
        }
    }

    /// In the shared Redis reference store: CVCs live for `ttl` on `clock`.
    pub fn shared(ttl: Duration, store: Arc<RedisReferenceStore>, clock: SharedClock) -> Self {
        Self {
            backend: Backend::Shared(store),
            ttl,
            clock,
        }
    }

    /// Holds `cvc` for the PCI token, replacing any earlier one. `false`
    /// when full (the CVC is then not held).
    pub async fn hold(&self, id: PciTokenId, cvc: Secret) -> Result<bool, ReferenceStoreError> {
        let held = HeldCvc {
            cvc,
            expires_at: self.clock.now() + self.ttl,
        };
        match &self.backend {
            Backend::Memory { cache, max_entries } => {
                if cache.entry_count() >= *max_entries {
                    cache.run_pending_tasks();
                    if cache.entry_count() >= *max_entries {
                        return Ok(false);
                    }
                }
                cache.insert(id, held);
                Ok(true)
            }
            Backend::Shared(store) => {
                store
                    .put_sealed(
                        KIND,
                        &id.to_string(),
                        held.cvc.expose().as_bytes(),
                        held.expires_at,
                        true,
                    )
                    .await
            }
        }
    }

    /// Whether a live CVC is held.
    pub async fn is_held(&self, id: PciTokenId) -> Result<bool, ReferenceStoreError> {
        match &self.backend {
            Backend::Memory { cache, .. } => Ok(cache
                .get(&id)
                .is_some_and(|h| h.expires_at > self.clock.now())),
            Backend::Shared(store) => store.holds_sealed(KIND, &id.to_string()).await,
        }
    }

    /// Takes the CVC: exactly one caller (on any replica sharing the store)
    /// gets it.
    pub async fn take(&self, id: PciTokenId) -> Result<Option<HeldCvc>, ReferenceStoreError> {
        match &self.backend {
            Backend::Memory { cache, .. } => Ok(cache
                .remove(&id)
                .filter(|h| h.expires_at > self.clock.now())),
            Backend::Shared(store) => {
                let Some(blob) = store.take_sealed(KIND, &id.to_string()).await? else {
                    return Ok(None);
                };
                let cvc = std::str::from_utf8(&blob.plain).map_err(|_| {
                    ReferenceStoreError::Unavailable("a stored CVC is malformed".into())
                })?;
                // Redis drops the key at its expiry; this check holds the
                // clock's word in between.
                Ok(Some(HeldCvc {
                    cvc: Secret::new(cvc.to_owned()),
                    expires_at: blob.expires_at,
                })
                .filter(|h| h.expires_at > self.clock.now()))
            }
        }
    }

    /// Puts a taken CVC back (the forward never reached the acquirer): with
    /// the expiry it had, not a fresh one, and only if no CVC was held for
    /// the card since (a newer one wins). An expired one is dropped.
    pub async fn restore(&self, id: PciTokenId, held: HeldCvc) -> Result<(), ReferenceStoreError> {
        if held.expires_at <= self.clock.now() {
            return Ok(());
        }
        match &self.backend {
            Backend::Memory { cache, .. } => {
                // Inserted only when absent: a newer hold is never replaced.
                cache.entry(id).or_insert(held);
                Ok(())
            }
            Backend::Shared(store) => {
                store
                    .put_sealed(
                        KIND,
                        &id.to_string(),
                        held.cvc.expose().as_bytes(),
                        held.expires_at,
                        false,
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// Forgets the CVC of a deleted card.
    pub async fn forget(&self, id: PciTokenId) -> Result<(), ReferenceStoreError> {
        match &self.backend {
            Backend::Memory { cache, .. } => {
                cache.invalidate(&id);
                Ok(())
            }
            Backend::Shared(store) => store.delete_sealed(KIND, &id.to_string()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The TTL, on the manual clock; moka's own timer (the same 60 s of
    /// process time) never fires within a test.
    const TTL: Duration = Duration::from_secs(60);
    const MS: time::Duration = time::Duration::milliseconds(1);

    #[test]
    fn single_use_and_expiry() {
        rt().block_on(async {
            let clock = ManualClock::starting_now();
            let s = CvcStore::new(TTL, 10, clock.clone());
            let id = uuid::Uuid::new_v4();
            assert!(s.hold(id, Secret::new("737".into())).await.unwrap());
            assert!(s.is_held(id).await.unwrap());
            assert_eq!(s.take(id).await.unwrap().unwrap().secret().expose(), "737");
            assert!(s.take(id).await.unwrap().is_none());

            // Usable until the last millisecond of the TTL, not at it.
            assert!(s.hold(id, Secret::new("737".into())).await.unwrap());
            clock.advance(time::Duration::try_from(TTL).unwrap() - MS);
            assert!(s.is_held(id).await.unwrap());
            clock.advance(MS);
            assert!(!s.is_held(id).await.unwrap());
            assert!(s.take(id).await.unwrap().is_none());
        })
    }

    #[test]
    fn an_expired_cvc_is_not_taken_even_while_still_cached() {
        rt().block_on(async {
            let clock = ManualClock::starting_now();
            let s = CvcStore::new(TTL, 10, clock.clone());
            let id = uuid::Uuid::new_v4();
            assert!(s.hold(id, Secret::new("4321".into())).await.unwrap());
            clock.advance(time::Duration::try_from(TTL).unwrap() - MS);
            assert_eq!(s.take(id).await.unwrap().unwrap().secret().expose(), "4321");
            assert!(s.hold(id, Secret::new("4321".into())).await.unwrap());
            clock.advance(time::Duration::try_from(TTL).unwrap());
            assert!(s.take(id).await.unwrap().is_none());
        })
    }

    #[test]
    fn a_restored_cvc_keeps_its_expiry_and_never_replaces_a_newer_one() {
        rt().block_on(async {
            let clock = ManualClock::starting_now();
            let s = CvcStore::new(TTL, 10, clock.clone());
            let id = uuid::Uuid::new_v4();
            assert!(s.hold(id, Secret::new("111".into())).await.unwrap());
            let taken = s.take(id).await.unwrap().unwrap();
            let expiry = taken.expires_at;
            s.restore(id, taken).await.unwrap();
            let again = s.take(id).await.unwrap().unwrap();
            assert_eq!(again.expires_at, expiry, "restore gave a fresh expiry");

            // A newer CVC held while the forward was out wins over the restore.
            assert!(s.hold(id, Secret::new("222".into())).await.unwrap());
            s.restore(id, again).await.unwrap();
            assert_eq!(s.take(id).await.unwrap().unwrap().secret().expose(), "222");

            // One taken a millisecond before its expiry is put back; one
            // restored at its expiry is not.
            assert!(s.hold(id, Secret::new("333".into())).await.unwrap());
            let taken = s.take(id).await.unwrap().unwrap();
            clock.advance(time::Duration::try_from(TTL).unwrap() - MS);
            s.restore(id, taken.clone()).await.unwrap();
            assert!(s.take(id).await.unwrap().is_some());
            clock.advance(MS);
            s.restore(id, taken).await.unwrap();
            assert!(s.take(id).await.unwrap().is_none());
        })
    }
}
