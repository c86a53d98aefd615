//! JWE in compact serialization (RFC 7516 §7.1), for exactly one algorithm
//! pair: `ECDH-ES` key agreement in direct mode (RFC 7518 §4.6) and
//! `A256GCM` content encryption (RFC 7518 §5.3).
//!
//! Crates, and why: the ECDH is RustCrypto's `p256` (constant-time field
//! arithmetic, audited, and it can hold a private key we generate, store and
//! reload, which `ring`'s ephemeral-only agreement API cannot); SHA-256 and
//! AES-256-GCM are `ring`'s, the ones the vault already uses, so the binary
//! keeps one AEAD. The Concat KDF of RFC 7518 §4.6.2 is [`concat_kdf`]: for
//! a 256-bit key it is a single SHA-256 over a fixed layout, a dozen lines
//! pinned by the RFC's own test vector, lighter than another crate.
//!
//! Checks, all before any key is used, each with a fixed reason (never an
//! echo of the input): five parts, an empty encrypted key, a header that is
//! a JSON object with only the parameters this profile knows (so `zip`,
//! `crit` and anything else are refused, and duplicates too), `alg` =
//! `ECDH-ES`, `enc` = `A256GCM`, `kid` = the session id, `epk` a P-256 point
//! on the curve with full-length coordinates, a 96-bit IV and a 128-bit tag.
//! The protected header, as sent, is the AEAD's associated data, so a header
//! edited in transit fails the tag.

use std::borrow::Cow;

use base64::Engine;
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use p256::{EncodedPoint, FieldBytes, PublicKey, SecretKey};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::crypto::random_bytes;

/// The key-agreement algorithm.
pub const ALG: &str = "ECDH-ES";
/// The content-encryption algorithm.
pub const ENC: &str = "A256GCM";
/// Longest JWE accepted: a card is ~150 bytes of JSON; this leaves room for
/// long names and headers and bounds the work an attacker can cause.
pub const MAX_COMPACT_LEN: usize = 8 * 1024;

/// Why a JWE was refused. Reasons are fixed strings: nothing from the
/// ciphertext, the header values or the plaintext is ever in them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JweError {
    /// Not five base64url parts of sane sizes.
    #[error("not a JWE in compact serialization")]
    Malformed,
    /// The protected header breaks the profile.
    #[error("protected header: {0}")]
    Header(&'static str),
    /// The tag does not verify under this session's key: tampered, or
    /// encrypted to another key.
    #[error("does not decrypt under this session's key")]
    Decrypt,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn b64(part: &str) -> Result<Vec<u8>, JweError> {
    B64.decode(part).map_err(|_| JweError::Malformed)
}

/// The protected header this profile accepts; `deny_unknown_fields` also
/// makes serde refuse a parameter given twice.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow)]
    enc: Cow<'a, str>,
    #[serde(borrow)]
    kid: Option<Cow<'a, str>>,
    epk: Epk<'a>,
    #[serde(borrow)]
    apu: Option<Cow<'a, str>>,
    #[serde(borrow)]
    apv: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[allow(dead_code)] // accepted, carries no meaning here
    typ: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[allow(dead_code)]
    cty: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Epk<'a> {
    #[serde(borrow)]
    kty: Cow<'a, str>,
    #[serde(borrow)]
    crv: Cow<'a, str>,
    #[serde(borrow)]
    x: Cow<'a, str>,
    #[serde(borrow)]
    y: Cow<'a, str>,
}

/// A P-256 public key from base64url affine coordinates, each exactly 32
/// bytes (RFC 7518 §6.2.1.2); `None` unless the point is on the curve.
fn point(x: &str, y: &str) -> Option<PublicKey> {
    let (x, y) = (B64.decode(x).ok()?, B64.decode(y).ok()?);
    if x.len() != 32 || y.len() != 32 {
        return None;
    }
    let encoded = EncodedPoint::from_affine_coordinates(
        FieldBytes::from_slice(&x),
        FieldBytes::from_slice(&y),
        false,
    );
    Option::from(PublicKey::from_encoded_point(&encoded))
}

/// A P-256 public key from a JWK object (`kty` EC, `crv` P-256, `x`, `y`).
pub fn public_key_from_jwk(jwk: &serde_json::Value) -> Option<PublicKey> {
    let field = |k: &str| jwk.get(k).and_then(serde_json::Value::as_str);
    if field("kty")? != "EC" || field("crv")? != "P-256" {
        return None;
    }
    point(field("x")?, field("y")?)
}

/// What the header check yields: the sender's ephemeral key and the party
/// info for the KDF.
struct Agreed {
    epk: PublicKey,
    apu: Vec<u8>,
    apv: Vec<u8>,
}

fn check_header(raw: &[u8], kid: &str) -> Result<Agreed, JweError> {
    // Named reasons for the two parameters most likely to be tried.
    let generic: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(raw).map_err(|_| JweError::Header("is not a JSON object"))?;
    if generic.contains_key("zip") {
        return Err(JweError::Header("compression (`zip`) is not accepted"));
    }
    if generic.contains_key("crit") {
        return Err(JweError::Header(
            "no critical extension (`crit`) is understood",
        ));
    }
    let h: Header<'_> = serde_json::from_slice(raw)
        .map_err(|_| JweError::Header("has a missing, repeated or unknown parameter"))?;
    if h.alg != ALG {
        return Err(JweError::Header("`alg` must be ECDH-ES"));
    }
    if h.enc != ENC {
        return Err(JweError::Header("`enc` must be A256GCM"));
    }
    if h.kid.as_deref() != Some(kid) {
        return Err(JweError::Header("`kid` must be the session id"));
    }
    if h.epk.kty != "EC" || h.epk.crv != "P-256" {
        return Err(JweError::Header("`epk` must be an EC P-256 key"));
    }
    let epk = point(&h.epk.x, &h.epk.y).ok_or(JweError::Header("`epk` is not on P-256"))?;
    let party = |p: Option<Cow<'_, str>>| match p {
        None => Ok(Vec::new()),
        Some(p) => B64
            .decode(p.as_bytes())
            .map_err(|_| JweError::Header("`apu`/`apv` must be base64url")),
    };
    Ok(Agreed {
        epk,
        apu: party(h.apu)?,
        apv: party(h.apv)?,
    })
}

/// The Concat KDF of NIST SP 800-56A §5.8.1 as RFC 7518 §4.6.2 profiles it,
/// for a key of `key_bits` ≤ 256 (one SHA-256 round): `SHA-256(counter 1 ‖
/// Z ‖ AlgorithmID ‖ PartyUInfo ‖ PartyVInfo ‖ SuppPubInfo)`, each info a
/// 32-bit big-endian length and its bytes, SuppPubInfo the key length in
/// bits. In direct mode AlgorithmID is the `enc` value. Returns the whole
/// digest; the key is its first `key_bits / 8` bytes.
pub fn concat_kdf(
    z: &[u8],
    algorithm_id: &str,
    apu: &[u8],
    apv: &[u8],
    key_bits: u32,
) -> Zeroizing<[u8; 32]> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&1u32.to_be_bytes());
    ctx.update(z);
    for info in [algorithm_id.as_bytes(), apu, apv] {
        ctx.update(&(info.len() as u32).to_be_bytes());
        ctx.update(info);
    }
    ctx.update(&key_bits.to_be_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn aes_key(cek: &[u8; 32]) -> Result<LessSafeKey, JweError> {
    UnboundKey::new(&AES_256_GCM, cek)
        .map(LessSafeKey::new)
        .map_err(|_| JweError::Decrypt)
}

/// Decrypts `compact` for the session `kid`, whose private key is `key`.
pub fn decrypt(compact: &str, kid: &str, key: &SecretKey) -> Result<Zeroizing<Vec<u8>>, JweError> {
    if compact.len() > MAX_COMPACT_LEN {
        return Err(JweError::Malformed);
    }
    let mut parts = compact.split('.');
    let (Some(header), Some(encrypted_key), Some(iv), Some(ciphertext), Some(tag), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(JweError::Malformed);
    };
    if !encrypted_key.is_empty() {
        // Direct key agreement: RFC 7518 §4.6 says the encrypted key is empty.
        return Err(JweError::Header("`ECDH-ES` takes no encrypted key"));
    }
    let agreed = check_header(&b64(header)?, kid)?;
    let iv = b64(iv)?;
    let nonce = Nonce::try_assume_unique_for_key(&iv).map_err(|_| JweError::Malformed)?;
    let tag = b64(tag)?;
    if tag.len() != 16 {
        return Err(JweError::Malformed);
    }
    let mut buf = Zeroizing::new(b64(ciphertext)?);
    buf.extend_from_slice(&tag);

    let shared = p256::ecdh::diffie_hellman(key.to_nonzero_scalar(), agreed.epk.as_affine());
    let cek = concat_kdf(
        shared.raw_secret_bytes(),
        ENC,
        &agreed.apu,
        &agreed.apv,
        256,
    );
    let plain_len = aes_key(&cek)?
        .open_in_place(nonce, Aad::from(header.as_bytes()), buf.as_mut_slice())
        .map_err(|_| JweError::Decrypt)?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

/// Encrypts `plaintext` to `recipient` for session `kid`: what the browser
/// SDK does. tokenrelay never encrypts card data itself; this is the
/// sender's half for Rust clients, tests and the benchmark.
pub fn encrypt(recipient: &PublicKey, kid: &str, plaintext: &[u8]) -> String {
    let header = serde_json::json!({"alg": ALG, "enc": ENC, "kid": kid});
    seal(header, &super::generate_key(), recipient, plaintext)
}

/// Seals with `header` plus an `epk` for `ephemeral`, whatever the header
/// says (tests use it to build JWEs this module must refuse).
#[doc(hidden)]
pub fn seal(
    mut header: serde_json::Value,
    ephemeral: &SecretKey,
    recipient: &PublicKey,
    plaintext: &[u8],
) -> String {
    let point = ephemeral.public_key().to_encoded_point(false);
    let coord = |c: Option<&FieldBytes>| c.map(|c| B64.encode(c)).unwrap_or_default();
    if let Some(h) = header.as_object_mut() {
        h.entry("epk").or_insert_with(|| {
            serde_json::json!({"kty": "EC", "crv": "P-256", "x": coord(point.x()), "y": coord(point.y())})
        });
    }
    let header_b64 = B64.encode(header.to_string());
    let shared = p256::ecdh::diffie_hellman(ephemeral.to_nonzero_scalar(), recipient.as_affine());
    let cek = concat_kdf(shared.raw_secret_bytes(), ENC, &[], &[], 256);
    let iv = random_bytes::<12>();
    let mut buf = plaintext.to_vec();
    let tag = aes_key(&cek)
        .ok()
        .and_then(|k| {
            k.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(header_b64.as_bytes()),
                &mut buf,
            )
            .ok()
        })
        .map(|t| B64.encode(t.as_ref()))
        .unwrap_or_default();
    format!(
        "{header_b64}..{}.{}.{tag}",
        B64.encode(iv),
        B64.encode(&buf)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key_pair() -> (SecretKey, PublicKey) {
        let k = super::super::generate_key();
        let p = k.public_key();
        (k, p)
    }

    /// RFC 7518 Appendix C: ECDH-ES with Bob's key and Alice's ephemeral
    /// key, `A128GCM`, apu "Alice", apv "Bob" → the 128-bit key
    /// `VqqN6vgjbSBcIijNcacQGg`.
    #[test]
    fn concat_kdf_matches_rfc7518_appendix_c() {
        let bob = SecretKey::from_slice(
            &B64.decode("VEmDZpDXXK8p8N0Cndsxs924q6nS1RXFASRl6BfUqdw")
                .unwrap(),
        )
        .unwrap();
        let alice_epk = point(
            "gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0",
            "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps",
        )
        .unwrap();
        let z = p256::ecdh::diffie_hellman(bob.to_nonzero_scalar(), alice_epk.as_affine());
        let key = concat_kdf(z.raw_secret_bytes(), "A128GCM", b"Alice", b"Bob", 128);
        assert_eq!(B64.encode(&key[..16]), "VqqN6vgjbSBcIijNcacQGg");
    }

    #[test]
    fn round_trip() {
        let (k, p) = key_pair();
        let jwe = encrypt(&p, "sess_a", br#"{"number":"4111111111111111"}"#);
        assert_eq!(jwe.split('.').count(), 5);
        let plain = decrypt(&jwe, "sess_a", &k).unwrap();
        assert_eq!(&plain[..], br#"{"number":"4111111111111111"}"#);
    }

    fn parts(jwe: &str) -> Vec<String> {
        jwe.split('.').map(str::to_owned).collect()
    }

    fn header_of(jwe: &str) -> serde_json::Value {
        serde_json::from_slice(&B64.decode(&parts(jwe)[0]).unwrap()).unwrap()
    }

    fn with_header(jwe: &str, h: &serde_json::Value) -> String {
        let mut p = parts(jwe);
        p[0] = B64.encode(h.to_string());
        p.join(".")
    }

    #[test]
    fn tampering_anywhere_fails_the_tag() {
        let (k, p) = key_pair();
        let jwe = encrypt(&p, "sess_a", b"{\"number\":\"4111111111111111\"}");
        for i in [2, 3, 4] {
            let mut ps = parts(&jwe);
            let mut bytes = B64.decode(&ps[i]).unwrap();
            bytes[0] ^= 1;
            ps[i] = B64.encode(bytes);
            assert_eq!(
                decrypt(&ps.join("."), "sess_a", &k),
                Err(JweError::Decrypt),
                "part {i}"
            );
        }
        // A header re-encoded with an extra, harmless-looking space is no
        // longer the associated data the tag covers.
        let h = header_of(&jwe);
        let mut ps = parts(&jwe);
        ps[0] = B64.encode(format!(" {h}"));
        assert_eq!(decrypt(&ps.join("."), "sess_a", &k), Err(JweError::Decrypt));
        // Another recipient's key.
        let (other, _) = key_pair();
        assert_eq!(decrypt(&jwe, "sess_a", &other), Err(JweError::Decrypt));
    }

    #[test]
    fn header_checks_refuse_before_any_key_is_used() {
        let (k, p) = key_pair();
        let eph = super::super::generate_key();
        let plain = b"{}";
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"alg": "ECDH-ES+A256KW", "enc": ENC, "kid": "s"}),
                "`alg` must be ECDH-ES",
            ),
            (
                json!({"alg": "RSA-OAEP", "enc": ENC, "kid": "s"}),
                "`alg` must be ECDH-ES",
            ),
            (
                json!({"alg": ALG, "enc": "A128GCM", "kid": "s"}),
                "`enc` must be A256GCM",
            ),
            (
                json!({"alg": ALG, "enc": "A256CBC-HS512", "kid": "s"}),
                "`enc` must be A256GCM",
            ),
            (
                json!({"alg": ALG, "enc": ENC, "kid": "sess_other"}),
                "`kid` must be the session id",
            ),
            (
                json!({"alg": ALG, "enc": ENC}),
                "`kid` must be the session id",
            ),
            (
                json!({"alg": ALG, "enc": ENC, "kid": "s", "zip": "DEF"}),
                "compression (`zip`) is not accepted",
            ),
            (
                json!({"alg": ALG, "enc": ENC, "kid": "s", "crit": ["exp"], "exp": 1}),
                "no critical extension (`crit`) is understood",
            ),
            (
                json!({"alg": ALG, "enc": ENC, "kid": "s", "jku": "https://x"}),
                "has a missing, repeated or unknown parameter",
            ),
            (
                json!({"enc": ENC, "kid": "s"}),
                "has a missing, repeated or unknown parameter",
            ),
            (
                json!({"alg": ALG, "enc": ENC, "kid": "s", "epk": {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}}),
                "`epk` must be an EC P-256 key",
            ),
            (
                json!({"alg": ALG, "enc": ENC, "kid": "s", "epk": {"kty": "OKP", "crv": "X25519", "x": "AA", "y": "AA"}}),
                "`epk` must be an EC P-256 key",
            ),
            (
                json!({"alg": ALG, "enc": ENC, "kid": "s", "apu": "!!"}),
                "`apu`/`apv` must be base64url",
            ),
        ];
        for (h, reason) in cases {
            let jwe = seal(h.clone(), &eph, &p, plain);
            assert_eq!(decrypt(&jwe, "s", &k), Err(JweError::Header(reason)), "{h}");
        }
        // A repeated parameter (serde_json's Value would keep the last).
        let jwe = encrypt(&p, "s", plain);
        let h = header_of(&jwe).to_string();
        let dup = h.replacen('{', r#"{"alg":"none","#, 1);
        let mut ps = parts(&jwe);
        ps[0] = B64.encode(dup);
        assert_eq!(
            decrypt(&ps.join("."), "s", &k),
            Err(JweError::Header(
                "has a missing, repeated or unknown parameter"
            ))
        );
    }

    #[test]
    fn an_epk_off_the_curve_is_refused() {
        let (k, p) = key_pair();
        let jwe = encrypt(&p, "s", b"{}");
        let mut h = header_of(&jwe);
        // Flip the last bit of y: (x, y') is not on P-256.
        let mut y = B64.decode(h["epk"]["y"].as_str().unwrap()).unwrap();
        y[31] ^= 1;
        h["epk"]["y"] = json!(B64.encode(&y));
        assert_eq!(
            decrypt(&with_header(&jwe, &h), "s", &k),
            Err(JweError::Header("`epk` is not on P-256"))
        );
        // Short coordinates, and the all-zero "point".
        let mut h2 = header_of(&jwe);
        h2["epk"]["x"] = json!(B64.encode([1u8; 31]));
        assert_eq!(
            decrypt(&with_header(&jwe, &h2), "s", &k),
            Err(JweError::Header("`epk` is not on P-256"))
        );
        h2["epk"]["x"] = json!(B64.encode([0u8; 32]));
        h2["epk"]["y"] = json!(B64.encode([0u8; 32]));
        assert_eq!(
            decrypt(&with_header(&jwe, &h2), "s", &k),
            Err(JweError::Header("`epk` is not on P-256"))
        );
    }

    #[test]
    fn malformed_compact_forms_are_refused() {
        let (k, p) = key_pair();
        let jwe = encrypt(&p, "s", b"{}");
        let ps = parts(&jwe);
        let mut with_key = ps.clone();
        with_key[1] = B64.encode([7u8; 32]);
        assert_eq!(
            decrypt(&with_key.join("."), "s", &k),
            Err(JweError::Header("`ECDH-ES` takes no encrypted key"))
        );
        let mut short_iv = ps.clone();
        short_iv[2] = B64.encode([0u8; 8]);
        let mut short_tag = ps.clone();
        short_tag[4] = B64.encode([0u8; 12]);
        let mut padded = ps.clone();
        padded[3].push('=');
        for bad in [
            String::new(),
            "a.b.c.d".to_owned(),
            format!("{jwe}.x"),
            short_iv.join("."),
            short_tag.join("."),
            padded.join("."),
            "e".repeat(MAX_COMPACT_LEN + 1),
        ] {
            assert_eq!(
                decrypt(&bad, "s", &k),
                Err(JweError::Malformed),
                "{bad:.40}"
            );
        }
    }

    #[test]
    fn apu_and_apv_enter_the_kdf() {
        let (k, p) = key_pair();
        let eph = super::super::generate_key();
        // Sealed without party info, but the header claims some: the KDF
        // derives another key and the tag fails.
        let jwe = seal(
            json!({"alg": ALG, "enc": ENC, "kid": "s", "apu": "QWxpY2U"}),
            &eph,
            &p,
            b"{}",
        );
        assert_eq!(decrypt(&jwe, "s", &k), Err(JweError::Decrypt));
    }
}
