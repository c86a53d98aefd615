//! What a request did, for its one access line: whom it is about
//! ([`Subject`]) and what it did beyond its route and status ([`Audit`]).
//!
//! Below both `api` and `forward`, whose handlers fill an [`Audit`] in as
//! they go; `telemetry::access` reads it. It holds plain facts and never a
//! secret: a card number only ever as its masked `Display`.

use crate::session::SessionId;
use crate::vault::{PciTokenId, TokenId};

/// Whom a request is about: the token in its path, or the one it created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A network token.
    NetworkToken(TokenId),
    /// A PCI token (FPAN fallback).
    PciToken(PciTokenId),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::NetworkToken(id) => write!(f, "network_token:{id}"),
            Subject::PciToken(id) => write!(f, "pci_token:{id}"),
        }
    }
}

/// What a request did beyond its route and status, for its one log line.
/// Handlers fill in what applies; nothing here is secret (a card number
/// only ever as its masked `Display`).
#[derive(Debug, Default)]
pub struct Audit {
    /// The token the request is about: from the path, or the one created.
    pub subject: Option<Subject>,
    /// The card scheme of a provisioned token.
    pub scheme: Option<&'static str>,
    /// The provisioned card, masked (first6…last4).
    pub card: Option<String>,
    /// A PCI token store: whether the card was new.
    pub created: Option<bool>,
    /// A cryptogram's kind.
    pub kind: Option<&'static str>,
    /// A cryptogram's delivery: `inline` or `reference`.
    pub mode: Option<&'static str>,
    /// A lifecycle event applied to a token.
    pub change: Option<&'static str>,
    /// A forward's destination host.
    pub destination_host: Option<String>,
    /// The card-capture session a request opened or spent (not a secret).
    pub session: Option<SessionId>,
    /// A route forward's route name (from the config).
    pub forward_route: Option<String>,
    /// A forward's request was handed to the upstream connection: from
    /// here on the acquirer may have it, whatever happens to the client.
    pub sent_upstream: bool,
}
