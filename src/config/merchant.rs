//! The merchant: its compliance level (what may leave the vault), the
//! token service, placeholder syntax, response redaction, and how long what
//! it is handed lives — references, CVCs, sessions, idempotency records.

use std::time::Duration;

use serde::Deserialize;

use super::duration::{CVC_TTL, IDEMPOTENCY_TTL, REFERENCE_TTL, SESSION_TTL};
use super::raw::RawConfig;
use super::ConfigError;

/// PCI DSS compliance level of the merchant; decides what may leave the vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComplianceLevel {
    /// The merchant never sees card data: references only, no PAN input.
    SaqA,
    /// The merchant handles card data.
    SaqD,
    /// Report on compliance: the merchant is fully assessed.
    Roc,
}

impl ComplianceLevel {
    /// Whether the merchant may send or receive raw card data.
    pub fn handles_card_data(self) -> bool {
        !matches!(self, ComplianceLevel::SaqA)
    }
}

/// Placeholder delimiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlaceholderSyntax {
    /// `<< name >>`
    Angle,
    /// `{{ name }}`, as Hellgate writes them.
    Braces,
}

/// The merchant keys, validated (fields as in [`super::Config`]).
pub(super) struct Merchant {
    pub(super) compliance_level: ComplianceLevel,
    pub(super) reference_ttl: Duration,
    pub(super) cvc_ttl: Duration,
    pub(super) session_ttl: Duration,
    pub(super) idempotency_ttl: Duration,
    pub(super) placeholder_syntax: PlaceholderSyntax,
    pub(super) redact_responses: bool,
}

pub(super) fn validate(raw: &RawConfig) -> Result<Merchant, ConfigError> {
    let compliance_level = raw.compliance_level.unwrap_or(ComplianceLevel::SaqA);
    if let Some(tsp) = &raw.tsp {
        if tsp != "sandbox" {
            return Err(ConfigError::new(
                "tsp",
                format!("unknown token service provider {tsp:?} (supported: \"sandbox\")"),
            ));
        }
    }
    Ok(Merchant {
        compliance_level,
        reference_ttl: REFERENCE_TTL.parse(raw.reference_ttl.as_deref())?,
        cvc_ttl: CVC_TTL.parse(raw.cvc_ttl.as_deref())?,
        session_ttl: SESSION_TTL.parse(raw.session_ttl.as_deref())?,
        idempotency_ttl: IDEMPOTENCY_TTL.parse(raw.idempotency_ttl.as_deref())?,
        placeholder_syntax: raw.placeholder_syntax.unwrap_or(PlaceholderSyntax::Angle),
        // Masking what the acquirer echoes is on wherever the merchant
        // must never see card data.
        redact_responses: raw
            .redact_responses
            .unwrap_or(compliance_level == ComplianceLevel::SaqA),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn bad_values_name_their_key() {
        for (doc, key) in [
            ("reference_ttl = \"soon\"", "reference_ttl"),
            ("session_ttl = \"2h\"", "session_ttl"),
            ("session_ttl = \"0s\"", "session_ttl"),
            ("tsp = \"visa\"", "tsp"),
        ] {
            let e = Config::parse(doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
        }
    }

    #[test]
    fn responses_are_redacted_by_default_only_at_saq_a() {
        for (level, redacted) in [("saq-a", true), ("saq-d", false), ("roc", false)] {
            let c = Config::parse(&format!("compliance_level = \"{level}\"")).unwrap();
            assert_eq!(c.redact_responses, redacted, "{level}");
        }
        let c = Config::parse("redact_responses = false").unwrap();
        assert_eq!(c.compliance_level, ComplianceLevel::SaqA);
        assert!(!c.redact_responses);
    }
}
