//! The token vault: what a network token is, and the [`TokenStore`] seam
//! behind which it is kept.
//!
//! The store holds the TPAN and the sandbox token secret; nothing in this
//! module serialises either — the API's view of a token is built in
//! `api::tokens` from the public fields only.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::card::{Brand, CardNumber};

pub mod cached;
pub mod keyring;
pub mod memory;
pub mod sql;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// Most metadata pairs. Here, beside [`Metadata`], because
/// both the API (which enforces them) and the template renderer (which
/// sizes its output from them) need them.
pub const METADATA_MAX_PAIRS: usize = 20;
/// Longest metadata key, in characters.
pub const METADATA_MAX_KEY: usize = 20;
/// Longest metadata value, in characters.
pub const METADATA_MAX_VALUE: usize = 80;

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

impl NetworkTokenType {
    /// API name.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkTokenType::Vts => "vts",
            NetworkTokenType::Mdes => "mdes",
            NetworkTokenType::Tms => "tms",
            NetworkTokenType::Hgts => "hgts",
        }
    }
}

impl TokenStatus {
    /// API name.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::Inactive => "inactive",
            TokenStatus::Deleted => "deleted",
            TokenStatus::Unprovisioned => "unprovisioned",
        }
    }

    /// Parses the API name.
    pub fn parse(s: &str) -> Option<TokenStatus> {
        match s {
            "active" => Some(TokenStatus::Active),
            "inactive" => Some(TokenStatus::Inactive),
            "deleted" => Some(TokenStatus::Deleted),
            "unprovisioned" => Some(TokenStatus::Unprovisioned),
            _ => None,
        }
    }
}

/// Identifier of a PCI token.
pub type PciTokenId = Uuid;

/// A card kept for FPAN fallback (contract §4a). The CVC is never here: it
/// lives in memory only (`crate::cvc`). `Debug` shows the card masked and
/// never the cardholder's name.
#[derive(Clone)]
pub struct PciToken {
    /// Its id.
    pub id: PciTokenId,
    /// The card number. Secret.
    pub pan: CardNumber,
    /// Brand.
    pub scheme: Brand,
    /// Card expiry month.
    pub expiry_month: u8,
    /// Card expiry year.
    pub expiry_year: u16,
    /// Cardholder name, if given.
    pub cardholder_name: Option<String>,
    /// Merchant metadata.
    pub metadata: Metadata,
    /// Keyed HMAC of the PAN: finds the same card without decrypting.
    pub fingerprint: [u8; 32],
    /// Creation time.
    pub created_at: OffsetDateTime,
}

impl std::fmt::Debug for PciToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciToken")
            .field("id", &self.id)
            .field("pan", &self.pan)
            .field("scheme", &self.scheme)
            .field("expiry_month", &self.expiry_month)
            .field("expiry_year", &self.expiry_year)
            .field(
                "cardholder_name",
                &self.cardholder_name.as_ref().map(|_| "<redacted>"),
            )
            .field("metadata", &self.metadata)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

impl PciToken {
    /// Takes what `card` — the same card (same fingerprint) presented
    /// again — says about a reissue: when `card` expires *later* than this
    /// token, its expiry replaces the stored one, and its cardholder name
    /// too if it carries one (a reissued card is the newest statement of
    /// both; no name given says nothing, so the stored one stays). An
    /// expiry that is the same or earlier — an old card presented again, a
    /// repeat checkout — changes nothing at all, so neither the expiry nor
    /// the name can be rolled back or rewritten by it. Returns whether
    /// anything changed. The id, PAN, brand, metadata and creation time
    /// always stay.
    ///
    /// Every store applies this to a fresh read inside its conditional
    /// update (see [`TokenStore::insert_pci`]), so two reissues racing
    /// each other end with the later expiry, whichever commits first.
    pub fn reissue_from(&mut self, card: &PciToken) -> bool {
        if (card.expiry_year, card.expiry_month) <= (self.expiry_year, self.expiry_month) {
            return false;
        }
        self.expiry_month = card.expiry_month;
        self.expiry_year = card.expiry_year;
        if let Some(name) = &card.cardholder_name {
            self.cardholder_name = Some(name.clone());
        }
        true
    }
}

/// A change to a network token (sandbox lifecycle events).
#[derive(Debug, Clone, Copy)]
pub enum TokenChange {
    /// New status.
    Status(TokenStatus),
    /// New token expiry.
    Expiry {
        /// Month.
        month: u8,
        /// Year.
        year: u16,
    },
    /// Delegated authentication activated.
    ActivateDauth,
}

impl TokenStatus {
    /// Whether the lifecycle lets a token go from `self` to `to`: `deleted`
    /// is terminal; `active` and `inactive` swap; an `unprovisioned` token
    /// may become active; anything not deleted may be deleted. Staying put
    /// is allowed (a repeated suspend or delete changes nothing).
    pub fn allows(self, to: TokenStatus) -> bool {
        use TokenStatus::*;
        self == to
            || matches!(
                (self, to),
                (Active, Inactive) | (Inactive, Active) | (Unprovisioned, Active)
            )
            || (self != Deleted && to == Deleted)
    }
}

impl TokenChange {
    /// Applies the change to a token as the store holds it now, enforcing
    /// the lifecycle: a change [`TokenStatus::allows`] refuses, or any
    /// change but a repeated delete to a deleted token, is
    /// [`StoreError::Lifecycle`] and leaves the token as it is. `Ok(false)`:
    /// allowed but nothing to change.
    ///
    /// Every store applies this to a fresh read inside its conditional
    /// update, so the check cannot be fooled by a cached copy.
    pub fn apply(self, t: &mut NetworkToken) -> Result<bool, StoreError> {
        match self {
            TokenChange::Status(s) if !t.status.allows(s) => {
                return Err(StoreError::Lifecycle(t.status))
            }
            TokenChange::Status(s) if s == t.status => return Ok(false),
            TokenChange::Status(s) => t.status = s,
            _ if t.status == TokenStatus::Deleted => return Err(StoreError::Lifecycle(t.status)),
            TokenChange::Expiry { month, year } => {
                t.expiry_month = month;
                t.expiry_year = year;
            }
            TokenChange::ActivateDauth => t.dauth_activated = true,
        }
        t.updated_at = OffsetDateTime::now_utc();
        Ok(true)
    }
}

/// How [`TokenStore::find_tokens`] looks tokens up.
#[derive(Debug, Clone, Copy)]
pub enum TokenLookup<'a> {
    /// The tokens made for a PCI token (card).
    Card(PciTokenId),
    /// The token with this number (TPAN), found by its keyed fingerprint.
    Number(&'a CardNumber),
}

/// A recorded answer to an idempotent request.
///
/// A record with status [`IdempotencyRecord::IN_FLIGHT`] is a claim: a
/// forward holds the key and has not finished (contract §9); its body is
/// empty until [`TokenStore::finish_idempotency`] writes the answer.
#[derive(Clone)]
pub struct IdempotencyRecord {
    /// Scope (API key name, route) and the client's key.
    pub key: String,
    /// SHA-256 of the request that produced the answer.
    pub fingerprint: [u8; 32],
    /// HTTP status of the answer.
    pub status: u16,
    /// The answer's body. May hold an inline cryptogram: sealed at rest.
    pub body: Vec<u8>,
    /// When it was recorded.
    pub created_at: OffsetDateTime,
}

impl IdempotencyRecord {
    /// The status of a claim whose answer is not recorded yet (no HTTP
    /// status is 0).
    pub const IN_FLIGHT: u16 = 0;

    /// Whether this is a claim still waiting for its answer.
    pub fn is_in_flight(&self) -> bool {
        self.status == Self::IN_FLIGHT
    }
}

impl std::fmt::Debug for IdempotencyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IdempotencyRecord(status {}, {} bytes)",
            self.status,
            self.body.len()
        )
    }
}

/// What an insert did.
#[derive(Debug)]
pub enum Inserted {
    /// Stored, with its idempotency record if one was given.
    Stored,
    /// Another request recorded this idempotency key first: nothing was
    /// written; here is its record.
    IdempotencyExists(IdempotencyRecord),
}

/// A store failure: ours, except [`StoreError::Lifecycle`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The lifecycle does not allow the change from the token's current
    /// status (the client's: e.g. resuming a deleted token). Nothing changed.
    #[error("the change is not allowed for a token that is {}", .0.as_str())]
    Lifecycle(TokenStatus),
    /// The backend could not be reached or failed.
    #[error("token store unavailable: {0}")]
    Unavailable(String),
    /// A record could not be opened (tampered, moved, or unknown key).
    #[error("token store record unreadable: {0}")]
    Corrupt(String),
}

/// How far a key-rotation pass has got: the last row visited in each
/// sealed table, in key order.
#[derive(Debug, Default, Clone)]
pub struct RotationCursor {
    last: std::collections::BTreeMap<&'static str, String>,
}

impl RotationCursor {
    /// The last row visited in `table` ("" before the first).
    pub fn after(&self, table: &str) -> &str {
        self.last.get(table).map_or("", String::as_str)
    }

    /// Moves past `row` in `table`.
    pub fn visited(&mut self, table: &'static str, row: String) {
        self.last.insert(table, row);
    }
}

/// What one key-rotation step did.
#[derive(Debug, Default)]
pub struct RotationStep {
    /// Rows under an old key it looked at; 0 ends the pass.
    pub visited: usize,
    /// Rows re-encrypted under the active key.
    pub rotated: usize,
    /// Rows it could not open, each named by table, row and key id with
    /// the reason; they stay as they are, under their old key.
    pub unreadable: Vec<String>,
}

/// Where network tokens live. Implementations must make each call atomic.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Stores a new token and, in the same transaction, the idempotency
    /// record of the request that created it, given with its `horizon`
    /// (the caller's clock minus the TTL, as for
    /// [`TokenStore::get_idempotency`]). A live record under the key (one
    /// created after `horizon`) wins: nothing is written and it is
    /// returned. An expired one is replaced in the same transaction.
    async fn insert(
        &self,
        token: NetworkToken,
        idempotency: Option<(IdempotencyRecord, OffsetDateTime)>,
    ) -> Result<Inserted, StoreError>;

    /// Reads a token, including deleted ones. May come from a cache that
    /// lags other replicas' changes by up to `vault.cache_ttl`.
    async fn get(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError>;

    /// Reads a token whose status (and every other field) is what the
    /// durable store holds now, never a cached copy another replica's change
    /// has outdated: what minting a cryptogram and forwarding check.
    async fn get_current(&self, id: TokenId) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        self.get(id).await
    }

    /// The token's status and last change as the durable store holds them
    /// now (a light read: nothing decrypted). A cache checks its copy with it.
    async fn status_now(
        &self,
        id: TokenId,
    ) -> Result<Option<(TokenStatus, OffsetDateTime)>, StoreError> {
        Ok(self.get(id).await?.map(|t| (t.status, t.updated_at)))
    }

    /// Sets the status and returns the updated token, or `None` if unknown.
    async fn set_status(
        &self,
        id: TokenId,
        status: TokenStatus,
    ) -> Result<Option<Arc<NetworkToken>>, StoreError> {
        self.update(id, TokenChange::Status(status)).await
    }

    /// Applies a lifecycle change as one conditional update against the
    /// stored row ([`TokenChange::apply`] on a fresh read, written only if
    /// the row did not change meanwhile); returns the updated token, or
    /// `None`. A change the lifecycle refuses is [`StoreError::Lifecycle`].
    async fn update(
        &self,
        id: TokenId,
        change: TokenChange,
    ) -> Result<Option<Arc<NetworkToken>>, StoreError>;

    /// The network tokens a lookup finds (any status), oldest first: those
    /// made for one card (the compatible surfaces' "card"), or the one with
    /// a given token number.
    async fn find_tokens(&self, by: TokenLookup<'_>) -> Result<Vec<Arc<NetworkToken>>, StoreError>;

    /// Increments and returns the token's transaction counter (ATC).
    async fn next_counter(&self, id: TokenId) -> Result<u64, StoreError>;

    /// The keyed fingerprint (HMAC) of a card number, stable across
    /// restarts and key rotation.
    fn fingerprint(&self, pan: &CardNumber) -> [u8; 32];

    /// Stores a PCI token unless one with the same fingerprint exists;
    /// returns the stored one and whether it is new. When one exists, a
    /// later expiry in `token` (a reissued card) is written to it by
    /// [`PciToken::reissue_from`], as one atomic conditional update of the
    /// stored record, which stays sealed as before; the returned token is
    /// the stored one after that update.
    async fn insert_pci(&self, token: PciToken) -> Result<(Arc<PciToken>, bool), StoreError>;

    /// Reads a PCI token.
    async fn get_pci(&self, id: PciTokenId) -> Result<Option<Arc<PciToken>>, StoreError>;

    /// Deletes a PCI token and its card data; `false` if unknown.
    async fn delete_pci(&self, id: PciTokenId) -> Result<bool, StoreError>;

    /// The live idempotency record under `key`: one created at or before
    /// `horizon` (the caller's clock minus the TTL) counts as absent.
    async fn get_idempotency(
        &self,
        key: &str,
        horizon: OffsetDateTime,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// Records an answer unless the key is taken by a live record (created
    /// after `horizon`); returns the existing record when it is.
    async fn put_idempotency(
        &self,
        record: IdempotencyRecord,
        horizon: OffsetDateTime,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// Writes the answer of a claim (an [`IdempotencyRecord::IN_FLIGHT`]
    /// record stored by `put_idempotency`) under `record.key`, keeping the
    /// claim's `created_at`. `false` when no claim with this fingerprint is
    /// in flight there (already finished, released or expired): nothing is
    /// written, the first answer stands.
    async fn finish_idempotency(&self, record: IdempotencyRecord) -> Result<bool, StoreError>;

    /// Removes the claim under `key` if it is still in flight with
    /// `fingerprint`, so the key is free again (the request failed before
    /// anything was consumed).
    async fn release_idempotency(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
    ) -> Result<(), StoreError>;

    /// Re-encrypts up to `batch` records per table that are not sealed
    /// under the active key, after `cursor`, and moves the cursor past
    /// them. A record it cannot open is reported and passed over, so one
    /// bad row does not hold back every row behind it. A step that visits
    /// nothing ends the pass.
    async fn rotate_batch(
        &self,
        cursor: &mut RotationCursor,
        batch: usize,
    ) -> Result<RotationStep, StoreError>;

    /// Checks the backend answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Why the vault could not be opened at start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The master key is missing or malformed.
    #[error(transparent)]
    Key(#[from] keyring::KeyError),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The PostgreSQL password file could not be read.
    #[error("vault.password_file: {0}")]
    Password(std::io::Error),
}

/// Environment variable with the PostgreSQL password.
pub const POSTGRES_PASSWORD_ENV: &str = "TOKENRELAY_POSTGRES_PASSWORD";

/// Loads the master keys the config names (env first, then the key file).
pub fn load_keys(config: &crate::config::VaultConfig) -> Result<Arc<keyring::Keyring>, OpenError> {
    let env = std::env::var(keyring::MASTER_KEY_ENV)
        .ok()
        .map(zeroize::Zeroizing::new);
    let (keys, created) = keyring::Keyring::load(
        env.as_deref().map(String::as_str),
        config.key_file.as_deref(),
        config.create_key_file,
    )?;
    if created {
        tracing::warn!(
            key_file = %config.key_file.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            "GENERATED A DEVELOPMENT MASTER KEY: fine for a local try, never for real card data; \
             set TOKENRELAY_MASTER_KEY or provision the key file and set vault.create_key_file = false"
        );
    }
    Ok(Arc::new(keys))
}

/// Whether [`load_keys`] would succeed, creating nothing (`check-config`).
pub fn check_keys(config: &crate::config::VaultConfig) -> Result<(), OpenError> {
    let env = std::env::var(keyring::MASTER_KEY_ENV)
        .ok()
        .map(zeroize::Zeroizing::new);
    keyring::Keyring::check(
        env.as_deref().map(String::as_str),
        config.key_file.as_deref(),
        config.create_key_file,
    )?;
    Ok(())
}

/// Opens the configured token store, sealing under `keys` (loaded from the
/// config when `None` and the backend needs them).
pub async fn open(
    config: &crate::config::VaultConfig,
    keys: Option<Arc<keyring::Keyring>>,
) -> Result<Arc<dyn TokenStore>, OpenError> {
    use crate::config::VaultBackend;
    let keys = || match &keys {
        Some(k) => Ok(k.clone()),
        None => load_keys(config),
    };
    let sql: Arc<dyn TokenStore> = match &config.backend {
        VaultBackend::Memory => return Ok(Arc::new(memory::MemoryTokenStore::new())),
        VaultBackend::Sqlite { path } => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Unavailable(e.to_string()))?;
            }
            let keys = keys()?;
            let url = format!("sqlite://{}?mode=rwc", path.display());
            Arc::new(sql::SqlTokenStore::connect(&url, keys).await?)
        }
        VaultBackend::Postgres { url, password_file } => {
            let keys = keys()?;
            // Secrets: the environment wins over a file, everywhere (the
            // master key and the Redis password read the same way).
            let password = match (std::env::var(POSTGRES_PASSWORD_ENV).ok(), password_file) {
                (Some(pw), _) => Some(zeroize::Zeroizing::new(pw)),
                (None, Some(f)) => {
                    let text = zeroize::Zeroizing::new(
                        std::fs::read_to_string(f).map_err(OpenError::Password)?,
                    );
                    Some(zeroize::Zeroizing::new(text.trim_end().to_owned()))
                }
                (None, None) => None,
            };
            let url = match password {
                Some(pw) => with_password(url, &pw),
                None => url.clone(),
            };
            Arc::new(sql::SqlTokenStore::connect(&url, keys).await?)
        }
    };
    Ok(if config.cache_ttl.is_zero() {
        sql
    } else {
        Arc::new(cached::CachedTokenStore::new(sql, config.cache_ttl))
    })
}

/// Inserts a percent-encoded password into a `postgres://user@host/…` URL.
fn with_password(url: &str, password: &str) -> String {
    let encoded: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user, host)) => format!("{scheme}://{user}:{encoded}@{host}"),
            None => format!("{scheme}://postgres:{encoded}@{rest}"),
        },
        None => url.to_owned(),
    }
}

/// An active token for unit tests.
#[cfg(test)]
pub(crate) fn test_token() -> NetworkToken {
    let now = time::OffsetDateTime::now_utc();
    NetworkToken {
        id: TokenId::new(),
        status: TokenStatus::Active,
        network_token_type: NetworkTokenType::Vts,
        scheme: crate::card::Brand::Visa,
        card_last4: "1111".into(),
        expiry_month: 12,
        expiry_year: 2031,
        pci_token_id: None,
        supports_device_binding: false,
        scheme_reference: "ref".into(),
        scheme_metadata: Metadata::new(),
        metadata: Metadata::new(),
        dauth_activated: false,
        created_at: now,
        updated_at: now,
        tpan: crate::card::CardNumber::parse("4895370012003478").unwrap(),
    }
}
