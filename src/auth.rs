//! API-key authentication and scopes (contract §2).
//!
//! Keys live in the config only as SHA-256 hashes. API keys are long random
//! strings, so a fast hash is the right tool (a slow KDF buys nothing against
//! 128+ bits of entropy and would cost every request). The presented key is
//! hashed once and compared in constant time against *every* configured
//! hash, so the time taken says nothing about which key, if any, matched.

use ring::digest;
use subtle::ConstantTimeEq;

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Provision, read and delete tokens.
    Tokens,
    /// Request cryptograms.
    Cryptograms,
    /// Forward requests with injected values.
    Forward,
    /// Sandbox lifecycle events.
    Admin,
}

impl Scope {
    /// Parses a scope name as written in the config.
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "tokens" => Some(Scope::Tokens),
            "cryptograms" => Some(Scope::Cryptograms),
            "forward" => Some(Scope::Forward),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    /// The scope's config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tokens => "tokens",
            Scope::Cryptograms => "cryptograms",
            Scope::Forward => "forward",
            Scope::Admin => "admin",
        }
    }
}

/// SHA-256 of an API key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

impl KeyHash {
    /// Hashes a plaintext key.
    pub fn of(key: &[u8]) -> KeyHash {
        let d = digest::digest(&digest::SHA256, key);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        KeyHash(out)
    }

    /// Parses `sha256:<64 hex digits>`.
    pub fn parse(s: &str) -> Option<KeyHash> {
        let digits = s.strip_prefix("sha256:")?;
        let mut out = [0u8; 32];
        // Exactly 64 hex digits, either case.
        hex::decode_to_slice(digits, &mut out).ok()?;
        Some(KeyHash(out))
    }

    /// The config form, `sha256:<hex>`.
    pub fn to_config_string(&self) -> String {
        format!("sha256:{}", hex::encode(self.0))
    }
}

/// A configured API key.
#[derive(Debug, Clone)]
pub struct ApiKey {
    /// Its name, used in logs and audit events.
    pub name: String,
    /// Hash of the plaintext.
    pub hash: KeyHash,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

impl ApiKey {
    /// Whether this key carries `scope`.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// Finds the key whose hash matches `presented`, comparing against every
/// configured key in constant time.
pub fn authenticate<'a>(keys: &'a [ApiKey], presented: &[u8]) -> Option<&'a ApiKey> {
    let h = KeyHash::of(presented);
    let mut found = None;
    for k in keys {
        if bool::from(k.hash.0.ct_eq(&h.0)) && found.is_none() {
            found = Some(k);
        }
    }
    found
}

/// The credentials of an `Authorization: Bearer <key>` header value
/// (RFC 6750 §2.1; the scheme name is case-insensitive). Only the
/// compatible surfaces read it: on the native API `Authorization` belongs
/// to the acquirer and passes through (contract §2).
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trips_through_config_form() {
        let h = KeyHash::of(b"dev-key-change-me");
        let s = h.to_config_string();
        assert_eq!(KeyHash::parse(&s), Some(h));
        assert!(KeyHash::parse("sha256:zz").is_none());
        assert!(KeyHash::parse(&s.replace("sha256:", "md5:")).is_none());
    }

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b""), None);
    }

    #[test]
    fn authenticate_finds_only_the_right_key() {
        let keys = vec![
            ApiKey {
                name: "a".into(),
                hash: KeyHash::of(b"alpha"),
                scopes: vec![Scope::Tokens],
            },
            ApiKey {
                name: "b".into(),
                hash: KeyHash::of(b"beta"),
                scopes: vec![Scope::Forward],
            },
        ];
        assert_eq!(
            authenticate(&keys, b"beta").map(|k| k.name.as_str()),
            Some("b")
        );
        assert!(authenticate(&keys, b"gamma").is_none());
        assert!(authenticate(&keys, b"").is_none());
    }
}
