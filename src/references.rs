//! Cryptogram references: short-lived, single-use handles for a minted
//! cryptogram, so a SAQ-A merchant never holds the cryptogram itself.
//!
//! The seam is [`ReferenceStore`], with an in-process implementation
//! ([`memory`], the default) and a shared one ([`redis`], for several
//! replicas). Its one hard promise is [`take`]: of any number of concurrent
//! takers of one reference, exactly one gets it. A taken reference stays as
//! a tombstone until its expiry so that a retry answers 409
//! `reference_already_used` rather than 404.
//!
//! [`take`]: ReferenceStore::take

use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use time::OffsetDateTime;

use crate::card::Secret;
use crate::crypto::{is_random_id, random_id};
use crate::tsp::CryptogramType;
use crate::vault::{Metadata, TokenId};

pub mod memory;
pub mod redis;

#[cfg(test)]
mod conformance;

const PREFIX: &str = "cref_";

/// An opaque reference id: `cref_` + 256 random bits, base64url.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ReferenceId(String);

impl ReferenceId {
    /// A fresh unguessable id.
    pub fn generate() -> ReferenceId {
        Self::random().1
    }

    /// A fresh id and the 32 random bytes it encodes.
    pub(crate) fn random() -> ([u8; 32], ReferenceId) {
        let (raw, id) = random_id::<32>(PREFIX);
        (raw, ReferenceId(id))
    }

    /// The 32 bytes the id encodes; `None` for a well-formed id that no
    /// [`generate`](Self::generate) can have made (non-canonical base64).
    pub(crate) fn bytes(&self) -> Option<[u8; 32]> {
        let mut raw = [0u8; 32];
        let body = self.0.get(PREFIX.len()..)?;
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode_slice(body, &mut raw)
            .ok()?;
        (n == raw.len()).then_some(raw)
    }

    /// Accepts only well-formed ids, so garbage never reaches a store.
    pub fn parse(s: &str) -> Option<ReferenceId> {
        is_random_id::<32>(s, PREFIX).then(|| ReferenceId(s.to_owned()))
    }

    /// The id as given to the merchant.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ReferenceId {
    // A live reference is a bearer credential for one payment: log a prefix.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}…", &self.0[..PREFIX.len() + 6])
    }
}

/// What a reference stands for.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The TAVV, when minted.
    pub cryptogram: Option<Secret>,
    /// The dynamic CVV, when minted.
    pub dynamic_cvv: Option<Secret>,
    /// Which of the two.
    pub cryptogram_type: CryptogramType,
    /// ECI.
    pub eci: &'static str,
    /// Metadata given with the cryptogram request.
    pub metadata: Metadata,
}

/// A stored reference.
#[derive(Debug, Clone)]
pub struct Reference {
    /// The token it is bound to.
    pub token_id: TokenId,
    /// When it stops being usable.
    pub expires_at: OffsetDateTime,
    /// What it stands for.
    pub payload: Arc<Payload>,
}

/// Why a reference could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TakeError {
    /// Unknown or expired.
    #[error("reference not found or expired")]
    NotFound,
    /// Taken before.
    #[error("reference already used")]
    AlreadyUsed,
    /// Bound to another token; left untouched.
    #[error("reference is bound to another token")]
    TokenMismatch,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceStoreError {
    /// The size bound is reached; nothing was stored.
    #[error("reference store is full")]
    Full,
    /// The backend failed.
    #[error("reference store unavailable: {0}")]
    Unavailable(String),
}

/// Either kind of failure of a take.
#[derive(Debug, thiserror::Error)]
pub enum TakeFailure {
    /// The client's: unknown, used, mismatched.
    #[error(transparent)]
    Refused(#[from] TakeError),
    /// Ours.
    #[error(transparent)]
    Store(#[from] ReferenceStoreError),
}

/// Where references live.
#[async_trait]
pub trait ReferenceStore: Send + Sync + 'static {
    /// Stores a new reference; never returns an id that is not stored.
    async fn issue(&self, reference: Reference) -> Result<ReferenceId, ReferenceStoreError>;

    /// Atomically marks the reference used and returns it. Exactly one of
    /// any number of concurrent callers succeeds; a mismatch leaves it usable.
    async fn take(&self, id: &ReferenceId, token_id: TokenId) -> Result<Reference, TakeFailure>;

    /// Checks what [`take`](Self::take) would answer without consuming.
    async fn peek(&self, id: &ReferenceId, token_id: TokenId) -> Result<Reference, TakeFailure>;

    /// Makes a taken reference usable again, with its original expiry; for
    /// a payment that was never attempted. `reference` is what `take` gave.
    async fn restore(
        &self,
        id: &ReferenceId,
        reference: Reference,
    ) -> Result<(), ReferenceStoreError>;

    /// Kills every reference bound to `token_id`.
    async fn revoke_token(&self, token_id: TokenId) -> Result<(), ReferenceStoreError>;

    /// Unused references currently held (approximate), for metrics.
    fn len(&self) -> u64;

    /// Checks the backend answers, for `/readyz`. In-process stores always do.
    async fn ping(&self) -> Result<(), ReferenceStoreError> {
        Ok(())
    }

    /// Whether no reference is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_256_bit_and_parse_strictly() {
        let a = ReferenceId::generate();
        assert_eq!(a.as_str().len(), 48);
        assert_eq!(ReferenceId::parse(a.as_str()), Some(a.clone()));
        assert_ne!(a, ReferenceId::generate());
        assert!(ReferenceId::parse("cref_short").is_none());
        assert!(ReferenceId::parse(&a.as_str().replace("cref_", "xref_")).is_none());
        assert!(!format!("{a:?}").contains(&a.as_str()[12..]));
    }

    #[test]
    fn an_id_gives_back_the_bytes_it_encodes_and_only_canonical_ones() {
        let (raw, id) = ReferenceId::random();
        assert_eq!(id.bytes(), Some(raw));
        // 43 base64 characters carry 258 bits, so the last one's two low
        // bits are zero. One with them set is well-formed (it parses) but
        // nobody's: its bytes are refused, not aliased to `raw`'s.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let last = id.as_str().as_bytes()[47];
        let at = ALPHABET.iter().position(|&c| c == last).unwrap();
        assert_eq!(at % 4, 0);
        let mut s = id.as_str().to_owned();
        s.replace_range(47.., &(ALPHABET[at + 1] as char).to_string());
        let other = ReferenceId::parse(&s).unwrap();
        assert_eq!(other.bytes(), None);
    }
}
