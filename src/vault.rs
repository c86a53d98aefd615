//! The token vault: what a network token is, and the [`TokenStore`] seam
//! behind which it is kept.
//!
//! The store holds the TPAN and the sandbox token secret; nothing in this
//! module serialises either — the API's view of a token is built in
//! `api::tokens` from the public fields only.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::card::{Brand, CardNumber};

pub mod memory;

/// Identifier of a network token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TokenId(pub Uuid);

impl TokenId {
    /// A fresh random id.
    pub fn new() -> TokenId {
        TokenId(Uuid::new_v4())
    }

    /// Parses the canonical UUID form.
    pub fn parse(s: &str) -> Option<TokenId> {
        Uuid::try_parse(s).ok().map(TokenId)
    }
}

impl Default for TokenId {
    fn default() -> Self {
        TokenId::new()
    }
}

impl std::fmt::Display for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Lifecycle of a network token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStatus {
    /// Usable for cryptograms and forwards.
    Active,
    /// Suspended by the scheme or the issuer.
    Inactive,
    /// Deleted by the merchant; kept as a tombstone.
    Deleted,
    /// The token service could not provision it.
    Unprovisioned,
}

/// Which token service issued the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkTokenType {
    /// Visa Token Service.
    Vts,
    /// Mastercard Digital Enablement Service.
    Mdes,
    /// Amex Token Service.
    Tms,
    /// Discover (Global Token Service).
    Hgts,
}

/// String-to-string metadata, validated at the API edge.
pub type Metadata = BTreeMap<String, String>;

/// A network token as kept in the vault.
#[derive(Debug, Clone)]
pub struct NetworkToken {
    /// Its id.
    pub id: TokenId,
    /// Lifecycle state.
    pub status: TokenStatus,
    /// Issuing token service.
    pub network_token_type: NetworkTokenType,
    /// Card brand.
    pub scheme: Brand,
    /// Last four digits of the card (not of the token).
    pub card_last4: String,
    /// Token expiry month, 1–12.
    pub expiry_month: u8,
    /// Token expiry year, four digits.
    pub expiry_year: u16,
    /// The PCI token for the same card, for FPAN fallback.
    pub pci_token_id: Option<Uuid>,
    /// Whether the token service supports device binding.
    pub supports_device_binding: bool,
    /// The token service's reference for this token.
    pub scheme_reference: String,
    /// Token-service metadata.
    pub scheme_metadata: Metadata,
    /// Merchant metadata.
    pub metadata: Metadata,
    /// Whether delegated authentication (`dauth`) is activated.
    pub dauth_activated: bool,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
    /// The token number. Secret.
    pub tpan: CardNumber,
}

/// A store failure: ours, never the client's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or failed.
    #[error("token store unavailable: {0}")]
    Unavailable(String),
}

/// Where network tokens live. Implementations must make each call atomic.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Stores a new token.
    async fn insert(&self, token: NetworkToken) -> Result<(), StoreError>;

    /// Reads a token, including deleted ones.
    async fn get(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError>;

    /// Sets the status and returns the updated token, or `None` if unknown.
    async fn set_status(
        &self,
        id: TokenId,
        status: TokenStatus,
    ) -> Result<Option<Arc<NetworkToken>>, StoreError>;

    /// Increments and returns the token's transaction counter (ATC).
    async fn next_counter(&self, id: TokenId) -> Result<u64, StoreError>;

    /// Checks the backend answers.
    async fn ping(&self) -> Result<(), StoreError>;
}
