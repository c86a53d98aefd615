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

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use time::OffsetDateTime;

use crate::card::Secret;
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
}

impl CvcStore {
    /// In this process: CVCs live for `ttl`; at most `max_entries` at once.
    pub fn new(ttl: Duration, max_entries: u64) -> Self {
        Self {
            backend: Backend::Memory {
                cache: Cache::builder().time_to_live(ttl).build(),
                max_entries,
            },
            ttl,
        }
    }

    /// In the shared Redis reference store: CVCs live for `ttl`.
    pub fn shared(ttl: Duration, store: Arc<RedisReferenceStore>) -> Self {
        Self {
            backend: Backend::Shared(store),
            ttl,
        }
    }

    /// Holds `cvc` for the PCI token, replacing any earlier one. `false`
    /// when full (the CVC is then not held).
    pub async fn hold(&self, id: PciTokenId, cvc: Secret) -> Result<bool, ReferenceStoreError> {
        let held = HeldCvc {
            cvc,
            expires_at: OffsetDateTime::now_utc() + self.ttl,
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
                .is_some_and(|h| h.expires_at > OffsetDateTime::now_utc())),
            Backend::Shared(store) => store.holds_sealed(KIND, &id.to_string()).await,
        }
    }

    /// Takes the CVC: exactly one caller (on any replica sharing the store)
    /// gets it.
    pub async fn take(&self, id: PciTokenId) -> Result<Option<HeldCvc>, ReferenceStoreError> {
        match &self.backend {
            Backend::Memory { cache, .. } => Ok(cache
                .remove(&id)
                .filter(|h| h.expires_at > OffsetDateTime::now_utc())),
            Backend::Shared(store) => {
                let Some(blob) = store.take_sealed(KIND, &id.to_string()).await? else {
                    return Ok(None);
                };
                let cvc = std::str::from_utf8(&blob.plain).map_err(|_| {
                    ReferenceStoreError::Unavailable("a stored CVC is malformed".into())
                })?;
                Ok(Some(HeldCvc {
                    cvc: Secret::new(cvc.to_owned()),
                    expires_at: blob.expires_at,
                }))
            }
        }
    }

    /// Puts a taken CVC back (the forward never reached the acquirer): with
    /// the expiry it had, not a fresh one, and only if no CVC was held for
    /// the card since (a newer one wins). An expired one is dropped.
    pub async fn restore(&self, id: PciTokenId, held: HeldCvc) -> Result<(), ReferenceStoreError> {
        if held.expires_at <= OffsetDateTime::now_utc() {
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

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn single_use_and_expiry() {
        rt().block_on(async {
            let s = CvcStore::new(Duration::from_millis(50), 10);
            let id = uuid::Uuid::new_v4();
            assert!(s.hold(id, Secret::new("737".into())).await.unwrap());
            assert!(s.is_held(id).await.unwrap());
            assert_eq!(s.take(id).await.unwrap().unwrap().secret().expose(), "737");
            assert!(s.take(id).await.unwrap().is_none());
            assert!(s.hold(id, Secret::new("737".into())).await.unwrap());
            std::thread::sleep(Duration::from_millis(80));
            assert!(!s.is_held(id).await.unwrap());
            assert!(s.take(id).await.unwrap().is_none());
        })
    }

    #[test]
    fn a_restored_cvc_keeps_its_expiry_and_never_replaces_a_newer_one() {
        rt().block_on(async {
            let s = CvcStore::new(Duration::from_secs(60), 10);
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

            // An expired one is not put back.
            let stale = HeldCvc {
                cvc: Secret::new("333".into()),
                expires_at: OffsetDateTime::now_utc() - Duration::from_secs(1),
            };
            s.restore(id, stale).await.unwrap();
            assert!(s.take(id).await.unwrap().is_none());
        })
    }
}
