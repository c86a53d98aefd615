//! Card security codes, in memory only (contract §4a): held for at most
//! `cvc_ttl`, usable by one forward, never written anywhere.
//!
//! The same moka traps as the reference store apply: entries carry their
//! own expiry and every read checks it; the cache has no size bound of its
//! own (admission could silently drop a CVC), and [`CvcStore::hold`]
//! refuses beyond `max_entries` instead.

use std::time::{Duration, Instant};

use moka::sync::Cache;

use crate::card::Secret;
use crate::vault::PciTokenId;

#[derive(Clone)]
struct Held {
    cvc: Secret,
    expires_at: Instant,
}

/// The in-memory CVC holder.
pub struct CvcStore {
    cache: Cache<PciTokenId, Held>,
    ttl: Duration,
    max_entries: u64,
}

impl CvcStore {
    /// CVCs live for `ttl`; at most `max_entries` at once.
    pub fn new(ttl: Duration, max_entries: u64) -> Self {
        Self {
            cache: Cache::builder().time_to_live(ttl).build(),
            ttl,
            max_entries,
        }
    }

    /// Holds `cvc` for the PCI token, replacing any earlier one. `false`
    /// when full (the CVC is then not held).
    pub fn hold(&self, id: PciTokenId, cvc: Secret) -> bool {
        if self.cache.entry_count() >= self.max_entries {
            self.cache.run_pending_tasks();
            if self.cache.entry_count() >= self.max_entries {
                return false;
            }
        }
        self.cache.insert(
            id,
            Held {
                cvc,
                expires_at: Instant::now() + self.ttl,
            },
        );
        true
    }

    /// Whether a live CVC is held.
    pub fn is_held(&self, id: PciTokenId) -> bool {
        self.cache
            .get(&id)
            .is_some_and(|h| h.expires_at > Instant::now())
    }

    /// Takes the CVC: exactly one caller gets it.
    pub fn take(&self, id: PciTokenId) -> Option<Secret> {
        self.cache
            .remove(&id)
            .filter(|h| h.expires_at > Instant::now())
            .map(|h| h.cvc)
    }

    /// Puts a taken CVC back (the forward never reached the acquirer).
    pub fn restore(&self, id: PciTokenId, cvc: Secret) {
        self.cache.insert(
            id,
            Held {
                cvc,
                expires_at: Instant::now() + self.ttl,
            },
        );
    }

    /// Forgets the CVC of a deleted card.
    pub fn forget(&self, id: PciTokenId) {
        self.cache.invalidate(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_and_expiry() {
        let s = CvcStore::new(Duration::from_millis(50), 10);
        let id = uuid::Uuid::new_v4();
        assert!(s.hold(id, Secret::new("737".into())));
        assert!(s.is_held(id));
        assert_eq!(s.take(id).unwrap().expose(), "737");
        assert!(s.take(id).is_none());
        assert!(s.hold(id, Secret::new("737".into())));
        std::thread::sleep(Duration::from_millis(80));
        assert!(!s.is_held(id));
        assert!(s.take(id).is_none());
    }
}
