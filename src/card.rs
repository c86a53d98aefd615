//! Card numbers and the rules about them: Luhn, brand from BIN, expiry, and
//! the secret-bearing newtypes that keep PANs, TPANs, cryptograms and CVCs
//! out of logs.
//!
//! Nothing here prints a secret: [`CardNumber`] shows first6/last4 at most
//! (last4 only when that would leave fewer than [`MIN_HIDDEN_DIGITS`]
//! hidden), [`Secret`] shows nothing. Both zeroize their memory on drop.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// A primary account number or a network token number (TPAN): digits only.
///
/// `Debug` and `Display` print `first6…last4` for numbers of 16 digits or
/// more and `…last4` for shorter ones (see [`MIN_HIDDEN_DIGITS`]); the
/// digits are reachable only through [`CardNumber::expose`], which makes
/// every use greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct CardNumber(String);

impl CardNumber {
    /// Accepts 12–19 ASCII digits.
    pub fn parse(s: &str) -> Option<CardNumber> {
        let ok = (12..=19).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
        ok.then(|| CardNumber(s.to_owned()))
    }

    /// The digits. Every call site is a place a secret leaves its box.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Last four digits.
    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }

    /// First six digits (the BIN).
    pub fn first6(&self) -> &str {
        &self.0[..6]
    }
}

/// Fewest digits a masked number keeps hidden. PCI DSS (3.4.1) allows at
/// most the BIN and the last four to be shown; for a 16-digit PAN that
/// hides 6. For shorter PANs first6 + last4 would hide less (5 of an Amex's
/// 15, 3 of a 13-digit Visa's), so those show the last four only. The rule:
/// first6 + last4 only when at least this many digits stay hidden.
pub const MIN_HIDDEN_DIGITS: usize = 6;

impl fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() >= 6 + 4 + MIN_HIDDEN_DIGITS {
            write!(f, "{}…{}", self.first6(), self.last4())
        } else {
            write!(f, "…{}", self.last4())
        }
    }
}

impl fmt::Display for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Drop for CardNumber {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A value that must never be printed: cryptogram, dynamic CVV, CVC.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret string.
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    /// The value. Every call site is a place a secret leaves its box.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Card brand, as decided by the BIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Brand {
    /// Visa (VTS tokens).
    Visa,
    /// Mastercard (MDES tokens).
    Mastercard,
    /// American Express.
    Amex,
    /// Discover.
    Discover,
}

impl Brand {
    /// Lower-case name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Brand::Visa => "visa",
            Brand::Mastercard => "mastercard",
            Brand::Amex => "amex",
            Brand::Discover => "discover",
        }
    }

    /// Parses the API name.
    pub fn parse(s: &str) -> Option<Brand> {
        match s {
            "visa" => Some(Brand::Visa),
            "mastercard" => Some(Brand::Mastercard),
            "amex" => Some(Brand::Amex),
            "discover" => Some(Brand::Discover),
            _ => None,
        }
    }

    /// Card number lengths the brand issues.
    fn lengths(self) -> &'static [usize] {
        match self {
            Brand::Visa => &[13, 16, 19],
            Brand::Mastercard => &[16],
            Brand::Amex => &[15],
            Brand::Discover => &[16, 17, 18, 19],
        }
    }
}

/// Whether `digits` passes the Luhn check.
pub fn luhn_valid(digits: &str) -> bool {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    luhn_sum(digits.bytes().rev(), false) % 10 == 0
}

/// The check digit that makes `payload` followed by it Luhn-valid.
pub fn luhn_check_digit(payload: &str) -> u8 {
    let sum = luhn_sum(payload.bytes().rev(), true);
    ((10 - sum % 10) % 10) as u8
}

fn luhn_sum(rev_digits: impl Iterator<Item = u8>, double_first: bool) -> u32 {
    let mut sum = 0u32;
    let mut double = double_first;
    for b in rev_digits {
        let mut d = u32::from(b - b'0');
        if double {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        double = !double;
    }
    sum
}

/// The brand from the leading digits, if it is one we accept.
pub fn brand_from_bin(number: &str) -> Option<Brand> {
    let prefix = |n: usize| -> u32 {
        number
            .get(..n)
            .and_then(|p| p.parse().ok())
            .unwrap_or(u32::MAX)
    };
    let brand = if number.starts_with('4') {
        Brand::Visa
    } else if (51..=55).contains(&prefix(2)) || (2221..=2720).contains(&prefix(4)) {
        Brand::Mastercard
    } else if matches!(prefix(2), 34 | 37) {
        Brand::Amex
    } else if prefix(4) == 6011
        || (644..=649).contains(&prefix(3))
        || prefix(2) == 65
        || (622_126..=622_925).contains(&prefix(6))
    {
        Brand::Discover
    } else {
        return None;
    };
    brand.lengths().contains(&number.len()).then_some(brand)
}

/// Why a card was refused; `field` is the request field named in the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardError {
    /// The offending field.
    pub field: &'static str,
    /// Human text, never containing the number.
    pub reason: &'static str,
}

/// Checks a card as submitted: number format, Luhn, brand, expiry not past.
/// `today` is `(year, month)`.
pub fn validate_card(
    number: &str,
    expiry_month: i64,
    expiry_year: i64,
    today: (i32, u8),
) -> Result<(CardNumber, Brand), CardError> {
    let n = CardNumber::parse(number).ok_or(CardError {
        field: "number",
        reason: "must be 12 to 19 digits",
    })?;
    if !luhn_valid(n.expose()) {
        return Err(CardError {
            field: "number",
            reason: "fails the Luhn check",
        });
    }
    let brand = brand_from_bin(n.expose()).ok_or(CardError {
        field: "number",
        reason: "brand not supported (visa, mastercard, amex, discover)",
    })?;
    validate_expiry(expiry_month, expiry_year, today)?;
    Ok((n, brand))
}

/// Checks an expiry month/year is well formed and not in the past.
pub fn validate_expiry(month: i64, year: i64, today: (i32, u8)) -> Result<(), CardError> {
    if !(1..=12).contains(&month) {
        return Err(CardError {
            field: "expiry_month",
            reason: "must be 1 to 12",
        });
    }
    if !(2000..=2100).contains(&year) {
        return Err(CardError {
            field: "expiry_year",
            reason: "must be a four-digit year",
        });
    }
    let (ty, tm) = today;
    if (year, month) < (i64::from(ty), i64::from(tm)) {
        return Err(CardError {
            field: "expiry_year",
            reason: "card has expired",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_test_cards_and_rejects_one_digit_off() {
        for n in [
            "4111111111111111",
            "5555555555554444",
            "378282246310005",
            "6011111111111117",
        ] {
            assert!(luhn_valid(n), "{n}");
        }
        assert!(!luhn_valid("4111111111111112"));
        assert!(!luhn_valid("41111111111x1111"));
        assert!(!luhn_valid(""));
    }

    #[test]
    fn check_digit_completes_a_payload() {
        assert_eq!(luhn_check_digit("411111111111111"), 1);
        assert_eq!(luhn_check_digit("37828224631000"), 5);
        for p in ["489537", "520473000000", "3742000000000"] {
            let full = format!("{p}{}", luhn_check_digit(p));
            assert!(luhn_valid(&full), "{full}");
        }
    }

    #[test]
    fn brand_from_bin_by_range_and_length() {
        assert_eq!(brand_from_bin("4111111111111111"), Some(Brand::Visa));
        assert_eq!(brand_from_bin("5555555555554444"), Some(Brand::Mastercard));
        assert_eq!(brand_from_bin("2223003122003222"), Some(Brand::Mastercard));
        assert_eq!(brand_from_bin("378282246310005"), Some(Brand::Amex));
        assert_eq!(brand_from_bin("6011111111111117"), Some(Brand::Discover));
        assert_eq!(brand_from_bin("6221260000000000"), Some(Brand::Discover));
        // Right prefix, wrong length.
        assert_eq!(brand_from_bin("37828224631000"), None);
        // Unknown ranges.
        assert_eq!(brand_from_bin("3530111333300000"), None);
        assert_eq!(brand_from_bin("2720990000000000"), Some(Brand::Mastercard));
        assert_eq!(brand_from_bin("2721000000000000"), None);
    }

    #[test]
    fn expiry_in_the_past_is_refused_current_month_is_fine() {
        assert!(validate_expiry(11, 2026, (2026, 11)).is_ok());
        assert_eq!(
            validate_expiry(10, 2026, (2026, 11)).unwrap_err().field,
            "expiry_year"
        );
        assert_eq!(
            validate_expiry(13, 2030, (2026, 11)).unwrap_err().field,
            "expiry_month"
        );
        assert_eq!(
            validate_expiry(1, 30, (2026, 11)).unwrap_err().field,
            "expiry_year"
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let n = CardNumber::parse("4111111111111111").unwrap();
        assert_eq!(format!("{n:?} {n}"), "411111…1111 411111…1111");
        // Masking by length: first6 + last4 only where 6 digits stay hidden.
        for (pan, shown) in [
            ("4222222222222", "…2222"),
            ("378282246310005", "…0005"),
            ("6011111111111117", "601111…1117"),
            ("4000000000000000006", "400000…0006"),
            ("123456789012", "…9012"),
        ] {
            assert_eq!(CardNumber::parse(pan).unwrap().to_string(), shown, "{pan}");
        }
        let s = Secret::new("AAAAAAAAAAAAAAAAAAAAAAAAAAA=".into());
        assert!(!format!("{s:?}").contains("AAAA"));
    }
}
