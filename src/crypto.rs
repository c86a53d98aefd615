//! Small cryptographic helpers shared by the vault, the token service and
//! the reference store: randomness and HMAC. Built on `ring`, which rustls
//! already brings in, so there is one crypto library in the binary.

use base64::Engine;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// `N` bytes from the operating system's CSPRNG.
///
/// The OS generator failing is unrecoverable for a payment system (no
/// reference or key could be trusted), so it aborts the process rather than
/// degrade.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if SystemRandom::new().fill(&mut out).is_err() {
        // No safe fallback exists: refuse to continue without entropy.
        std::process::abort();
    }
    out
}

/// A fresh unguessable id: `prefix` then `N` random bytes in unpadded
/// base64url; also the bytes, for a store that keys on them.
pub fn random_id<const N: usize>(prefix: &str) -> ([u8; N], String) {
    let raw = random_bytes::<N>();
    let mut id = String::with_capacity(prefix.len() + N.div_ceil(3) * 4);
    id.push_str(prefix);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(raw, &mut id);
    (raw, id)
}

/// Whether `s` has the shape of a [`random_id`] of `N` bytes under
/// `prefix`: the prefix, then exactly as many base64url characters as `N`
/// bytes encode to. A shape check only, so garbage never reaches a store.
pub fn is_random_id<const N: usize>(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|body| {
        body.len() == (N * 4).div_ceil(3)
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// A uniformly random decimal string of `len` digits.
pub fn random_digits(len: usize) -> String {
    let mut s = String::with_capacity(len);
    while s.len() < len {
        for b in random_bytes::<32>() {
            // Reject 250..=255 so every digit is equally likely.
            if b < 250 && s.len() < len {
                s.push(char::from(b'0' + b % 10));
            }
        }
    }
    s
}

/// HMAC-SHA-256 of the concatenated `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    for p in parts {
        ctx.update(p);
    }
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_have_the_shape_they_are_checked_for() {
        let (raw, id) = random_id::<32>("cref_");
        assert_eq!(id.len(), "cref_".len() + 43);
        assert!(is_random_id::<32>(&id, "cref_"));
        assert_ne!(raw, random_id::<32>("cref_").0, "two ids share their bytes");
        let (_, short) = random_id::<16>("sess_");
        assert_eq!(short.len(), "sess_".len() + 22);
        assert!(is_random_id::<16>(&short, "sess_"));
        assert!(!is_random_id::<16>(&short, "cref_"), "wrong prefix");
        assert!(!is_random_id::<32>(&short, "sess_"), "wrong length");
        assert!(!is_random_id::<16>(
            &format!("{}=", &short[..short.len() - 1]),
            "sess_"
        ));
        assert!(!is_random_id::<16>("sess_", "sess_"));
    }

    #[test]
    fn random_digits_have_the_asked_length() {
        let d = random_digits(37);
        assert_eq!(d.len(), 37);
        assert!(d.bytes().all(|b| b.is_ascii_digit()));
        assert_ne!(random_bytes::<16>(), random_bytes::<16>());
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let tag = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
