//! Master keys and encryption at rest (contract §8).
//!
//! Secrets in the vault are sealed with AES-256-GCM: a fresh random 96-bit
//! nonce per record, the record's identity as associated data (so a
//! ciphertext moved to another row fails to open), and the key id stored
//! beside the ciphertext so keys can rotate: several keys are loaded, the
//! last one listed is active for writes, any listed one can read.
//!
//! Keys come from `TOKENRELAY_MASTER_KEY` or from the key file the config
//! names — never from the TOML, never printed. Both hold either a single
//! base64 key (id `k1`) or lines / comma-separated items `<id>:<base64>`.
//!
//! The PAN fingerprint key is derived (HMAC) from the *first* key listed, so
//! fingerprints stay stable while later keys rotate in.

use std::path::Path;

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use zeroize::Zeroizing;

use crate::crypto::{hmac_sha256, random_bytes};

/// Environment variable holding the master key(s).
pub const MASTER_KEY_ENV: &str = "TOKENRELAY_MASTER_KEY";

/// Why keys could not be loaded or a record opened.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key material is malformed; the message never contains it.
    #[error("master key: {0}")]
    Invalid(String),
    /// The key file could not be read or written.
    #[error("master key file {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// What failed.
        error: std::io::Error,
    },
    /// A record names a key id that is not loaded.
    #[error("record sealed under unknown key id {0:?}")]
    UnknownKey(String),
    /// Authentication failed: tampered, truncated, or moved ciphertext.
    #[error("record failed authentication")]
    Tampered,
}

struct Key {
    id: String,
    key: LessSafeKey,
}

/// The loaded master keys.
pub struct Keyring {
    keys: Vec<Key>,
    fingerprint_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        write!(f, "Keyring(ids: {ids:?}, active: {:?})", self.active_id())
    }
}

impl Keyring {
    /// Parses key material: `base64` or `id:base64` items separated by
    /// newlines or commas; `#` starts a comment line.
    pub fn parse(material: &str) -> Result<Keyring, KeyError> {
        let mut keys = Vec::new();
        let mut first_raw: Option<Zeroizing<Vec<u8>>> = None;
        for item in material
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let (id, b64) = match item.split_once(':') {
                Some((id, b64)) => (id.trim().to_owned(), b64.trim()),
                None => ("k1".to_owned(), item),
            };
            if id.is_empty()
                || id.len() > 32
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(KeyError::Invalid(
                    "key ids are 1-32 characters [A-Za-z0-9_-]".into(),
                ));
            }
            if keys.iter().any(|k: &Key| k.id == id) {
                return Err(KeyError::Invalid(format!("duplicate key id {id:?}")));
            }
            let raw = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| KeyError::Invalid(format!("key {id:?} is not valid base64")))?,
            );
            if raw.len() != 32 {
                return Err(KeyError::Invalid(format!(
                    "key {id:?} must be 32 bytes, base64-encoded"
                )));
            }
            let unbound = UnboundKey::new(&AES_256_GCM, &raw)
                .map_err(|_| KeyError::Invalid(format!("key {id:?} unusable")))?;
            if first_raw.is_none() {
                first_raw = Some(raw.clone());
            }
            keys.push(Key {
                id,
                key: LessSafeKey::new(unbound),
            });
        }
        let first = first_raw.ok_or_else(|| KeyError::Invalid("no key given".into()))?;
        let fingerprint_key =
            Zeroizing::new(hmac_sha256(&first, &[b"tokenrelay/pan-fingerprint/v1"]));
        Ok(Keyring {
            keys,
            fingerprint_key,
        })
    }

    /// Loads keys from `env_value` if given, else from `file`. With
    /// `create_if_missing`, a missing file gets a fresh key (mode 0600) —
    /// for local tries only; the caller warns loudly.
    pub fn load(
        env_value: Option<&str>,
        file: Option<&Path>,
        create_if_missing: bool,
    ) -> Result<(Keyring, bool), KeyError> {
        if let Some(v) = env_value {
            return Ok((Keyring::parse(v)?, false));
        }
        let path = file
            .ok_or_else(|| KeyError::Invalid(format!("set {MASTER_KEY_ENV} or vault.key_file")))?;
        let file_err = |error| KeyError::File {
            path: path.display().to_string(),
            error,
        };
        match std::fs::read_to_string(path).map(Zeroizing::new) {
            // The file's text is the key material: zeroized when dropped.
            Ok(text) => Ok((Keyring::parse(&text)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create_if_missing => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(file_err)?;
                }
                let key = Zeroizing::new(
                    base64::engine::general_purpose::STANDARD.encode(random_bytes::<32>()),
                );
                let text = Zeroizing::new(format!(
                    "# tokenrelay master keys, \"<id>:<base64 32 bytes>\", the last one active.\n# Generated for a local try. Never commit or share this file.\nk1:{}\n",
                    key.as_str()
                ));
                write_private(path, text.as_bytes()).map_err(file_err)?;
                Ok((Keyring::parse(&text)?, true))
            }
            Err(e) => Err(file_err(e)),
        }
    }

    /// What [`Keyring::load`] would do, without creating anything: the
    /// keys parse, or the file is missing and would be created. For
    /// `check-config`.
    pub fn check(
        env_value: Option<&str>,
        file: Option<&Path>,
        create_if_missing: bool,
    ) -> Result<(), KeyError> {
        if let Some(v) = env_value {
            return Keyring::parse(v).map(drop);
        }
        let path = file
            .ok_or_else(|| KeyError::Invalid(format!("set {MASTER_KEY_ENV} or vault.key_file")))?;
        match std::fs::read_to_string(path) {
            Ok(text) => Keyring::parse(&Zeroizing::new(text)).map(drop),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create_if_missing => Ok(()),
            Err(error) => Err(KeyError::File {
                path: path.display().to_string(),
                error,
            }),
        }
    }

    /// A keyring with one random key: for tests and the in-memory vault.
    pub fn ephemeral() -> Keyring {
        let material =
            Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(random_bytes::<32>()));
        match Keyring::parse(&material) {
            Ok(k) => k,
            Err(e) => unreachable!("a fresh key always parses: {e}"),
        }
    }

    /// Id of the key used for new records.
    pub fn active_id(&self) -> &str {
        self.keys.last().map_or("", |k| k.id.as_str())
    }

    /// Seals `plaintext` under the active key; returns `(key id, nonce ‖
    /// ciphertext ‖ tag)`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<(String, Vec<u8>), KeyError> {
        let key = self
            .keys
            .last()
            .ok_or_else(|| KeyError::Invalid("no key".into()))?;
        let nonce_bytes = random_bytes::<NONCE_LEN>();
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce_bytes);
        let mut body = plaintext.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| KeyError::Invalid("sealing failed".into()))?;
        out.extend_from_slice(&body);
        body.fill(0);
        Ok((key.id.clone(), out))
    }

    /// Opens a sealed record.
    pub fn open(
        &self,
        key_id: &str,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or_else(|| KeyError::UnknownKey(key_id.to_owned()))?;
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(KeyError::Tampered);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KeyError::Tampered)?;
        let mut buf = Zeroizing::new(body.to_vec());
        let len = key
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| KeyError::Tampered)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    /// Keyed fingerprint (HMAC-SHA-256) of a card number.
    pub fn fingerprint(&self, pan: &str) -> [u8; 32] {
        hmac_sha256(self.fingerprint_key.as_ref(), &[pan.as_bytes()])
    }
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(b: [u8; 32]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[test]
    fn seal_open_round_trip_and_aad_binding() {
        let k = Keyring::ephemeral();
        let (id, ct) = k.seal(b"token:a", b"4895370012345678").unwrap();
        assert_eq!(&*k.open(&id, b"token:a", &ct).unwrap(), b"4895370012345678");
        assert!(matches!(
            k.open(&id, b"token:b", &ct),
            Err(KeyError::Tampered)
        ));
        let mut bad = ct.clone();
        bad[15] ^= 1;
        assert!(matches!(
            k.open(&id, b"token:a", &bad),
            Err(KeyError::Tampered)
        ));
        assert!(matches!(
            k.open(&id, b"token:a", &ct[..10]),
            Err(KeyError::Tampered)
        ));
        assert!(matches!(
            k.open("nope", b"token:a", &ct),
            Err(KeyError::UnknownKey(_))
        ));
        // Fresh nonce each time.
        assert_ne!(k.seal(b"a", b"x").unwrap().1, k.seal(b"a", b"x").unwrap().1);
    }

    #[test]
    fn last_key_is_active_and_old_keys_still_read() {
        let (a, b) = (b64([1; 32]), b64([2; 32]));
        let old = Keyring::parse(&format!("k1:{a}")).unwrap();
        let (id, ct) = old.seal(b"r", b"secret").unwrap();
        let both = Keyring::parse(&format!("# comment\nk1:{a}\nk2:{b}\n")).unwrap();
        assert_eq!(both.active_id(), "k2");
        assert_eq!(&*both.open(&id, b"r", &ct).unwrap(), b"secret");
        assert_eq!(both.fingerprint("4111"), old.fingerprint("4111"));
    }

    #[test]
    fn bad_material_is_refused_without_echoing_it() {
        for bad in [
            "",
            "not-base64!!",
            "k1:AAAA",
            &format!("k1:{},k1:{}", b64([1; 32]), b64([2; 32])),
        ] {
            let e = Keyring::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("AAAA") && !e.contains("base64!!"), "{e}");
        }
        assert_eq!(Keyring::parse(&b64([3; 32])).unwrap().active_id(), "k1");
    }
}
