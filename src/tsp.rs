//! Token service providers: who turns a card into a network token and mints
//! its cryptograms. The seam is [`TokenServiceProvider`]; the built-in
//! implementation is the [`sandbox`].
//!
//! The schemes' own rules about cryptogram requests (which brand supports
//! which cryptogram, which ECI goes with which type) live here, above any
//! provider, so every provider enforces the same contract.

use serde::Deserialize;

use crate::card::{Brand, CardNumber, Secret};
use crate::vault::{Metadata, NetworkToken, NetworkTokenType};

pub mod sandbox;

/// What the provider is asked to tokenise.
pub struct ProvisionRequest<'a> {
    /// The card number.
    pub pan: &'a CardNumber,
    /// Its brand.
    pub brand: Brand,
    /// Card expiry month.
    pub expiry_month: u8,
    /// Card expiry year.
    pub expiry_year: u16,
}

/// What the provider hands back for a new token.
pub struct Provisioned {
    /// The token number.
    pub tpan: CardNumber,
    /// Issuing token service.
    pub network_token_type: NetworkTokenType,
    /// Token expiry month.
    pub expiry_month: u8,
    /// Token expiry year.
    pub expiry_year: u16,
    /// Provider reference.
    pub scheme_reference: String,
    /// Provider metadata.
    pub scheme_metadata: Metadata,
    /// Device binding support.
    pub supports_device_binding: bool,
}

/// Cryptogram purpose, as the merchant asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CryptogramKind {
    /// E-commerce, merchant-initiated or cardholder-present online.
    Ecom,
    /// Delegated authentication (the merchant authenticated the cardholder).
    Dauth,
}

impl CryptogramKind {
    /// API name.
    pub fn as_str(self) -> &'static str {
        match self {
            CryptogramKind::Ecom => "ecom",
            CryptogramKind::Dauth => "dauth",
        }
    }
}

/// What kind of value is minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CryptogramType {
    /// Token authentication verification value (Visa TAVV, Mastercard UCAF).
    Tavv,
    /// A three-digit dynamic CVV (Visa only).
    DynamicCvv,
}

impl CryptogramType {
    /// API name.
    pub fn as_str(self) -> &'static str {
        match self {
            CryptogramType::Tavv => "tavv",
            CryptogramType::DynamicCvv => "dynamic_cvv",
        }
    }
}

/// A cryptogram request after API validation.
#[derive(Debug, Clone)]
pub struct CryptogramParams {
    /// Purpose.
    pub kind: CryptogramKind,
    /// Value kind.
    pub cryptogram_type: CryptogramType,
    /// Amount in minor or major units as given, canonical decimal string.
    pub amount: Option<String>,
    /// ISO 4217 code, upper case.
    pub currency: Option<String>,
}

/// A freshly minted cryptogram.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The TAVV/UCAF, base64 (28 chars), when `cryptogram_type = tavv`.
    pub cryptogram: Option<Secret>,
    /// Three digits, when `cryptogram_type = dynamic_cvv`.
    pub dynamic_cvv: Option<Secret>,
    /// What was minted.
    pub cryptogram_type: CryptogramType,
    /// Electronic commerce indicator.
    pub eci: &'static str,
}

/// A provider refusal or failure.
#[derive(Debug, thiserror::Error)]
pub enum TspError {
    /// The request breaks a scheme rule: the client's fault.
    #[error("{0}")]
    InvalidRequest(&'static str),
    /// The provider is unreachable or failed: not the client's fault.
    #[error("token service unavailable: {0}")]
    Unavailable(String),
}

/// A token service: provisions tokens and mints cryptograms for them.
pub trait TokenServiceProvider: Send + Sync + 'static {
    /// Tokenises a card.
    fn provision(&self, req: &ProvisionRequest<'_>) -> Result<Provisioned, TspError>;

    /// Mints a cryptogram for `token`; `counter` is the token's fresh ATC.
    /// Callers must have run [`check_scheme_rules`] first.
    fn cryptogram(
        &self,
        token: &NetworkToken,
        counter: u64,
        params: &CryptogramParams,
    ) -> Result<Minted, TspError>;
}

/// What a brand's token service asks a cryptogram request to carry (the
/// table of seed 001, J.P. Morgan's "required fields and values for
/// cryptograms by card brand"). The one copy of the brand table: the native
/// API enforces the rows its request shape has (amount, dynamic CVV), the
/// compatible surfaces map every row to their own field names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrandRules {
    /// An amount is required (Amex).
    pub amount: bool,
    /// A transaction type is required (Visa).
    pub transaction_type: bool,
    /// Who initiated the transaction is required (Visa).
    pub initiated_by: bool,
    /// An unpredictable number is required (Mastercard).
    pub random_number: bool,
    /// A three-digit dynamic CVV can be minted (Visa only).
    pub dynamic_cvv: bool,
    /// Account funding transactions (AFT) are supported (Visa only).
    pub account_funding: bool,
}

/// The brand table.
pub fn brand_rules(brand: Brand) -> BrandRules {
    let none = BrandRules {
        amount: false,
        transaction_type: false,
        initiated_by: false,
        random_number: false,
        dynamic_cvv: false,
        account_funding: false,
    };
    match brand {
        Brand::Visa => BrandRules {
            transaction_type: true,
            initiated_by: true,
            dynamic_cvv: true,
            account_funding: true,
            ..none
        },
        Brand::Mastercard => BrandRules {
            random_number: true,
            ..none
        },
        Brand::Amex => BrandRules {
            amount: true,
            ..none
        },
        Brand::Discover => none,
    }
}

/// The scheme's own name for a cryptogram `kind` minted for `brand` (the
/// `tokenCryptogramType` row of the brand table), or `None` when the
/// brand issues no such cryptogram: Visa TAVV / DTVV, Mastercard UCAF,
/// American Express DCSC; Discover, outside the table, TAVV.
pub fn scheme_cryptogram_name(brand: Brand, kind: CryptogramType) -> Option<&'static str> {
    match (brand, kind) {
        (Brand::Visa, CryptogramType::Tavv) => Some("TAVV"),
        (Brand::Visa, CryptogramType::DynamicCvv) => Some("DTVV"),
        (Brand::Mastercard, CryptogramType::Tavv) => Some("UCAF"),
        (Brand::Amex, CryptogramType::Tavv) => Some("DCSC"),
        (Brand::Discover, CryptogramType::Tavv) => Some("TAVV"),
        (Brand::Mastercard | Brand::Amex | Brand::Discover, CryptogramType::DynamicCvv) => None,
    }
}

/// A broken row of the brand table; each surface names its own field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemeRule {
    /// Dynamic CVV asked of a brand that has none.
    DynamicCvvVisaOnly,
    /// Account funding asked of a brand that has none.
    AccountFundingVisaOnly,
    /// No amount for a brand that needs one.
    AmountRequired,
    /// No transaction type for a brand that needs one.
    TransactionTypeRequired,
    /// No initiator for a brand that needs one.
    InitiatedByRequired,
    /// No unpredictable number for a brand that needs one.
    RandomNumberRequired,
}

impl SchemeRule {
    /// Human text, in the native API's field names.
    pub fn message(self) -> &'static str {
        match self {
            SchemeRule::DynamicCvvVisaOnly => {
                "cryptogram_type dynamic_cvv is supported for visa tokens only"
            }
            SchemeRule::AccountFundingVisaOnly => {
                "account funding transactions are supported for visa tokens only"
            }
            SchemeRule::AmountRequired => "amount is required for amex cryptograms",
            SchemeRule::TransactionTypeRequired => {
                "transaction_type is required for visa cryptograms"
            }
            SchemeRule::InitiatedByRequired => "initiated_by is required for visa cryptograms",
            SchemeRule::RandomNumberRequired => {
                "random_number is required for mastercard cryptograms"
            }
        }
    }
}

/// The rows of the brand table every request shape carries, enforced
/// before any provider is asked: dynamic CVV is Visa only; Amex needs an
/// amount.
pub fn check_scheme_rules(brand: Brand, params: &CryptogramParams) -> Result<(), SchemeRule> {
    let rules = brand_rules(brand);
    if params.cryptogram_type == CryptogramType::DynamicCvv && !rules.dynamic_cvv {
        return Err(SchemeRule::DynamicCvvVisaOnly);
    }
    if rules.amount && params.amount.is_none() {
        return Err(SchemeRule::AmountRequired);
    }
    Ok(())
}

/// ECI for a brand and purpose: authenticated (`dauth`) or not (`ecom`).
pub fn eci(brand: Brand, kind: CryptogramKind) -> &'static str {
    match (brand, kind) {
        (Brand::Visa, CryptogramKind::Ecom) => "07",
        (Brand::Visa, CryptogramKind::Dauth) => "05",
        (Brand::Mastercard, CryptogramKind::Ecom) => "06",
        (Brand::Mastercard, CryptogramKind::Dauth) => "02",
        (Brand::Amex, CryptogramKind::Ecom) => "07",
        (Brand::Amex, CryptogramKind::Dauth) => "05",
        (Brand::Discover, CryptogramKind::Ecom) => "07",
        (Brand::Discover, CryptogramKind::Dauth) => "05",
    }
}

/// The token service type of a brand.
pub fn token_type(brand: Brand) -> NetworkTokenType {
    match brand {
        Brand::Visa => NetworkTokenType::Vts,
        Brand::Mastercard => NetworkTokenType::Mdes,
        Brand::Amex => NetworkTokenType::Tms,
        Brand::Discover => NetworkTokenType::Hgts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: CryptogramType, amount: Option<&str>) -> CryptogramParams {
        CryptogramParams {
            kind: CryptogramKind::Ecom,
            cryptogram_type: t,
            amount: amount.map(str::to_owned),
            currency: None,
        }
    }

    #[test]
    fn scheme_rules() {
        assert!(check_scheme_rules(Brand::Visa, &params(CryptogramType::DynamicCvv, None)).is_ok());
        assert!(
            check_scheme_rules(Brand::Mastercard, &params(CryptogramType::DynamicCvv, None))
                .is_err()
        );
        assert!(check_scheme_rules(Brand::Amex, &params(CryptogramType::Tavv, None)).is_err());
        assert!(
            check_scheme_rules(Brand::Amex, &params(CryptogramType::Tavv, Some("10.00"))).is_ok()
        );
    }

    #[test]
    fn brand_table_rows() {
        let visa = brand_rules(Brand::Visa);
        assert!(visa.transaction_type && visa.initiated_by && visa.dynamic_cvv);
        assert!(!visa.amount && !visa.random_number);
        let mc = brand_rules(Brand::Mastercard);
        assert!(mc.random_number && !mc.amount && !mc.transaction_type && !mc.dynamic_cvv);
        let amex = brand_rules(Brand::Amex);
        assert!(amex.amount && !amex.random_number && !amex.initiated_by);
        assert_eq!(
            scheme_cryptogram_name(Brand::Mastercard, CryptogramType::Tavv),
            Some("UCAF")
        );
        assert_eq!(
            scheme_cryptogram_name(Brand::Amex, CryptogramType::DynamicCvv),
            None
        );
    }

    #[test]
    fn eci_by_brand_and_kind() {
        assert_eq!(eci(Brand::Visa, CryptogramKind::Ecom), "07");
        assert_eq!(eci(Brand::Visa, CryptogramKind::Dauth), "05");
        assert_eq!(eci(Brand::Mastercard, CryptogramKind::Dauth), "02");
        assert_eq!(eci(Brand::Mastercard, CryptogramKind::Ecom), "06");
    }
}
