//! The built-in sandbox token service.
//!
//! TPANs are Luhn-valid numbers in each brand's range (under test BINs).
//! A TAVV is 20 bytes, base64 (28 characters), laid out so that a verifier
//! holding the sandbox key can check it from what an authorisation carries
//! (TPAN, amount, cryptogram), as a scheme does with the ATC inside a real
//! one:
//!
//! ```text
//! [0..4)   ATC (token transaction counter), big endian
//! [4..8)   unix time of minting, seconds, big endian
//! [8..20)  HMAC-SHA-256(key, "tavv" | TPAN | "|" | amount | "|" | ATC | time)[..12]
//! ```
//!
//! The sandbox key is not a secret in any real sense: sandbox tokens carry
//! no value. It exists so the sandbox acquirer can verify (and approve once)
//! what the sandbox minted.

use base64::Engine;
use time::OffsetDateTime;

use super::{
    token_type, CryptogramParams, CryptogramType, Minted, ProvisionRequest, Provisioned,
    TokenServiceProvider, TspError,
};
use crate::card::{luhn_check_digit, Brand, CardNumber, Secret};
use crate::crypto::{hmac_sha256, random_bytes, random_digits};
use crate::vault::{Metadata, NetworkToken};

/// The sandbox key used unless one is given; public by design (see above).
pub const DEFAULT_SANDBOX_KEY: [u8; 32] = *b"tokenrelay-sandbox-key-not-prod!";

/// The sandbox provider.
pub struct SandboxTsp {
    key: [u8; 32],
}

impl std::fmt::Debug for SandboxTsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SandboxTsp")
    }
}

impl SandboxTsp {
    /// A sandbox provider under `key`.
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// Recomputes a TAVV's MAC; returns `(atc, minted_at_unix)` when it is
    /// genuine for this TPAN and amount. Single use is the verifier's job.
    pub fn verify_tavv(
        &self,
        tpan: &str,
        amount: Option<&str>,
        cryptogram: &str,
    ) -> Option<(u32, u32)> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(cryptogram)
            .ok()?;
        if raw.len() != 20 {
            return None;
        }
        let atc = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let at = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
        let mac = self.tavv_mac(tpan, amount, atc, at);
        let ok = bool::from(subtle::ConstantTimeEq::ct_eq(&mac[..], &raw[8..20]));
        ok.then_some((atc, at))
    }

    fn tavv_mac(&self, tpan: &str, amount: Option<&str>, atc: u32, at: u32) -> [u8; 12] {
        let tag = hmac_sha256(
            &self.key,
            &[
                b"tavv",
                tpan.as_bytes(),
                b"|",
                amount.unwrap_or("").as_bytes(),
                b"|",
                &atc.to_be_bytes(),
                &at.to_be_bytes(),
            ],
        );
        let mut out = [0u8; 12];
        out.copy_from_slice(&tag[..12]);
        out
    }
}

/// Test BIN per brand for sandbox TPANs.
fn tpan_prefix(brand: Brand) -> (&'static str, usize) {
    match brand {
        Brand::Visa => ("489537", 16),
        Brand::Mastercard => ("520473", 16),
        Brand::Amex => ("374245", 15),
        Brand::Discover => ("601100", 16),
    }
}

impl TokenServiceProvider for SandboxTsp {
    fn provision(&self, req: &ProvisionRequest<'_>) -> Result<Provisioned, TspError> {
        let (prefix, len) = tpan_prefix(req.brand);
        let mut digits = String::with_capacity(len);
        digits.push_str(prefix);
        digits.push_str(&random_digits(len - prefix.len() - 1));
        let check = luhn_check_digit(&digits);
        digits.push(char::from(b'0' + check));
        let tpan = CardNumber::parse(&digits)
            .ok_or_else(|| TspError::Unavailable("sandbox produced a malformed TPAN".into()))?;

        // Sandbox tokens live three years from provisioning, like VTS/MDES
        // tokens outliving the card they replace.
        let now = OffsetDateTime::now_utc();
        let expiry_year = (now.year() + 3) as u16;
        let expiry_month = u8::from(now.month());

        let reference = hex::encode(random_bytes::<12>());
        let mut scheme_metadata = Metadata::new();
        scheme_metadata.insert("token_service".into(), "sandbox".into());
        scheme_metadata.insert("token_requestor_id".into(), "40010030273".into());
        Ok(Provisioned {
            tpan,
            network_token_type: token_type(req.brand),
            expiry_month,
            expiry_year,
            scheme_reference: format!("sbx_{reference}"),
            scheme_metadata,
            supports_device_binding: matches!(req.brand, Brand::Visa | Brand::Mastercard),
        })
    }

    fn cryptogram(
        &self,
        token: &NetworkToken,
        counter: u64,
        params: &CryptogramParams,
    ) -> Result<Minted, TspError> {
        let atc = counter as u32;
        let at = OffsetDateTime::now_utc().unix_timestamp() as u32;
        let eci = super::eci(token.scheme, params.kind);
        match params.cryptogram_type {
            CryptogramType::Tavv => {
                let mac = self.tavv_mac(token.tpan.expose(), params.amount.as_deref(), atc, at);
                let mut raw = [0u8; 20];
                raw[..4].copy_from_slice(&atc.to_be_bytes());
                raw[4..8].copy_from_slice(&at.to_be_bytes());
                raw[8..].copy_from_slice(&mac);
                Ok(Minted {
                    cryptogram: Some(Secret::new(
                        base64::engine::general_purpose::STANDARD.encode(raw),
                    )),
                    dynamic_cvv: None,
                    cryptogram_type: CryptogramType::Tavv,
                    eci,
                })
            }
            CryptogramType::DynamicCvv => {
                let tag = hmac_sha256(
                    &self.key,
                    &[
                        b"dcvv",
                        token.tpan.expose().as_bytes(),
                        &atc.to_be_bytes(),
                        &at.to_be_bytes(),
                    ],
                );
                let n = u32::from_be_bytes([tag[0], tag[1], tag[2], tag[3]]) % 1000;
                Ok(Minted {
                    cryptogram: None,
                    dynamic_cvv: Some(Secret::new(format!("{n:03}"))),
                    cryptogram_type: CryptogramType::DynamicCvv,
                    eci,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::{brand_from_bin, luhn_valid};
    use crate::tsp::CryptogramKind;
    use crate::vault::{TokenId, TokenStatus};

    fn provision(tsp: &SandboxTsp, brand: Brand, pan: &str) -> NetworkToken {
        let pan = CardNumber::parse(pan).unwrap();
        let p = tsp
            .provision(&ProvisionRequest {
                pan: &pan,
                brand,
                expiry_month: 12,
                expiry_year: 2030,
            })
            .unwrap();
        let now = OffsetDateTime::now_utc();
        NetworkToken {
            id: TokenId::new(),
            status: TokenStatus::Active,
            network_token_type: p.network_token_type,
            scheme: brand,
            card_last4: pan.last4().into(),
            expiry_month: p.expiry_month,
            expiry_year: p.expiry_year,
            pci_token_id: None,
            supports_device_binding: p.supports_device_binding,
            scheme_reference: p.scheme_reference,
            scheme_metadata: p.scheme_metadata,
            metadata: Metadata::new(),
            dauth_activated: false,
            created_at: now,
            updated_at: now,
            tpan: p.tpan,
        }
    }

    #[test]
    fn tpans_are_luhn_valid_in_the_brand_range() {
        let tsp = SandboxTsp::new(DEFAULT_SANDBOX_KEY);
        for (brand, pan) in [
            (Brand::Visa, "4111111111111111"),
            (Brand::Mastercard, "5555555555554444"),
            (Brand::Amex, "378282246310005"),
            (Brand::Discover, "6011111111111117"),
        ] {
            for _ in 0..20 {
                let t = provision(&tsp, brand, pan);
                assert!(luhn_valid(t.tpan.expose()), "{brand:?}");
                assert_eq!(brand_from_bin(t.tpan.expose()), Some(brand));
                assert_ne!(t.tpan.expose(), pan);
            }
        }
    }

    #[test]
    fn tavv_is_20_bytes_base64_and_verifies_only_for_its_inputs() {
        let tsp = SandboxTsp::new(DEFAULT_SANDBOX_KEY);
        for brand in [Brand::Visa, Brand::Mastercard, Brand::Amex] {
            let pan = match brand {
                Brand::Visa => "4111111111111111",
                Brand::Mastercard => "5555555555554444",
                _ => "378282246310005",
            };
            let t = provision(&tsp, brand, pan);
            let params = CryptogramParams {
                kind: CryptogramKind::Ecom,
                cryptogram_type: CryptogramType::Tavv,
                amount: Some("10.00".into()),
                currency: Some("EUR".into()),
            };
            let m = tsp.cryptogram(&t, 7, &params).unwrap();
            let c = m.cryptogram.unwrap();
            assert_eq!(c.expose().len(), 28);
            let (atc, _) = tsp
                .verify_tavv(t.tpan.expose(), Some("10.00"), c.expose())
                .unwrap();
            assert_eq!(atc, 7);
            assert!(tsp
                .verify_tavv(t.tpan.expose(), Some("10.01"), c.expose())
                .is_none());
            assert!(SandboxTsp::new([1; 32])
                .verify_tavv(t.tpan.expose(), Some("10.00"), c.expose())
                .is_none());
        }
    }

    #[test]
    fn dynamic_cvv_is_three_digits() {
        let tsp = SandboxTsp::new(DEFAULT_SANDBOX_KEY);
        let t = provision(&tsp, Brand::Visa, "4111111111111111");
        let params = CryptogramParams {
            kind: CryptogramKind::Ecom,
            cryptogram_type: CryptogramType::DynamicCvv,
            amount: None,
            currency: None,
        };
        let m = tsp.cryptogram(&t, 1, &params).unwrap();
        assert!(m.cryptogram.is_none());
        let d = m.dynamic_cvv.unwrap();
        assert_eq!(d.expose().len(), 3);
        assert!(d.expose().bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(m.eci, "07");
    }
}
