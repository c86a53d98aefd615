//! Master keys and encryption at rest (contract §8).
//!
//! Every master key is only ever used through keys derived from it with
//! HKDF-SHA-256, one per [`Purpose`] (vault records, reference payloads,
//! idempotency records) and per record: each seal draws a fresh random
//! 128-bit salt, derives `HKDF(master, salt, purpose)` and seals with
//! AES-256-GCM under that one-record key (random 96-bit nonce, the record's
//! identity as associated data). So no AES key seals more than one record —
//! the random-nonce budget of a shared key (2^32 seals) does not apply —
//! and a record sealed for one purpose cannot be opened as another's, even
//! with the same associated data. The stored key id is `<id>/v2`.
//!
//! Several master keys are loaded; the last one listed is active for
//! writes, any listed one can read. Records sealed by earlier versions
//! (key id `<id>` without `/v2`: AES-256-GCM under the master key itself)
//! still open, and `rotate-key` re-seals them under derived keys, since
//! their key id differs from the active one.
//!
//! Keys come from `TOKENRELAY_MASTER_KEY` or from the key file the config
//! names — never from the TOML, never printed. Both hold either a single
//! base64 key (id `k1`) or lines / comma-separated items `<id>:<base64>`,
//! plus at most one `fingerprint:<id>:<base64>`: the PAN fingerprint key,
//! with its own id, kept when master keys come and go, so retiring any
//! master key leaves every fingerprint (and deduplication) as it was.
//! Without that item the fingerprint key is derived from the *first*
//! master key listed, as earlier versions did (README: key rotation).

use std::path::Path;

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use zeroize::Zeroizing;

use crate::crypto::{hmac_sha256, random_bytes};

/// What a sealed record is for; each has its own derived keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Secrets of vault records (TPAN, PAN, cardholder name).
    VaultRecord,
    /// What the reference store keeps in Redis: reference payloads and
    /// the blobs beside them (CVCs, sessions).
    Reference,
    /// Idempotency records (a replayed answer may hold a TPAN).
    Idempotency,
}

impl Purpose {
    /// The HKDF `info` of this purpose.
    fn info(self) -> &'static [u8] {
        match self {
            Purpose::VaultRecord => b"tokenrelay/v2/vault-record",
            Purpose::Reference => b"tokenrelay/v2/reference",
            Purpose::Idempotency => b"tokenrelay/v2/idempotency",
        }
    }
}

/// Suffix of the stored key id of a record sealed under a derived key.
const DERIVED_SUFFIX: &str = "/v2";
/// Bytes of the per-record HKDF salt.
const SALT_LEN: usize = 16;
/// The item prefix naming the fingerprint key.
const FINGERPRINT_ITEM: &str = "fingerprint";

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
    /// `id` + [`DERIVED_SUFFIX`]: what records sealed under it store.
    stored_id: String,
    /// The HKDF input: never used as an AES key itself.
    prk_input: Zeroizing<[u8; 32]>,
    /// The master key as earlier versions used it, to open their records.
    legacy: LessSafeKey,
}

/// The HKDF output length for an AES-256-GCM key.
struct AesKeyLen;

impl hkdf::KeyType for AesKeyLen {
    fn len(&self) -> usize {
        AES_256_GCM.key_len()
    }
}

impl Key {
    /// The one-record key for `purpose` and `salt`.
    fn derive(&self, purpose: Purpose, salt: &[u8]) -> Result<LessSafeKey, KeyError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(self.prk_input.as_ref());
        let info = [purpose.info()];
        let okm = prk
            .expand(&info, AesKeyLen)
            .map_err(|_| KeyError::Invalid("key derivation failed".into()))?;
        let mut bytes = Zeroizing::new([0u8; 32]);
        okm.fill(bytes.as_mut())
            .map_err(|_| KeyError::Invalid("key derivation failed".into()))?;
        let unbound = UnboundKey::new(&AES_256_GCM, bytes.as_ref())
            .map_err(|_| KeyError::Invalid("key derivation failed".into()))?;
        Ok(LessSafeKey::new(unbound))
    }
}

/// The loaded master keys and the fingerprint key.
pub struct Keyring {
    keys: Vec<Key>,
    fingerprint_key: Zeroizing<[u8; 32]>,
    fingerprint_key_id: String,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        write!(
            f,
            "Keyring(ids: {ids:?}, active: {:?}, fingerprint: {:?})",
            self.active_id(),
            self.fingerprint_key_id
        )
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn decode_key(id: &str, b64: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let raw = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| KeyError::Invalid(format!("key {id:?} is not valid base64")))?,
    );
    let mut out = Zeroizing::new([0u8; 32]);
    if raw.len() != out.len() {
        return Err(KeyError::Invalid(format!(
            "key {id:?} must be 32 bytes, base64-encoded"
        )));
    }
    out.copy_from_slice(&raw);
    Ok(out)
}

impl Keyring {
    /// Parses key material: `base64` or `id:base64` items separated by
    /// newlines or commas, at most one `fingerprint:id:base64`; `#` starts
    /// a comment line.
    pub fn parse(material: &str) -> Result<Keyring, KeyError> {
        let mut keys: Vec<Key> = Vec::new();
        let mut fingerprint: Option<(String, Zeroizing<[u8; 32]>)> = None;
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
            if id == FINGERPRINT_ITEM {
                let (fid, b64) = b64.split_once(':').ok_or_else(|| {
                    KeyError::Invalid("the fingerprint key is \"fingerprint:<id>:<base64>\"".into())
                })?;
                let fid = fid.trim().to_owned();
                if !valid_id(&fid) {
                    return Err(KeyError::Invalid(
                        "key ids are 1-32 characters [A-Za-z0-9_-]".into(),
                    ));
                }
                if fingerprint.is_some() {
                    return Err(KeyError::Invalid("more than one fingerprint key".into()));
                }
                let raw = decode_key(&fid, b64.trim())?;
                fingerprint = Some((fid, raw));
                continue;
            }
            if !valid_id(&id) {
                return Err(KeyError::Invalid(
                    "key ids are 1-32 characters [A-Za-z0-9_-]".into(),
                ));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyError::Invalid(format!("duplicate key id {id:?}")));
            }
            let raw = decode_key(&id, b64)?;
            let unbound = UnboundKey::new(&AES_256_GCM, raw.as_ref())
                .map_err(|_| KeyError::Invalid(format!("key {id:?} unusable")))?;
            keys.push(Key {
                stored_id: format!("{id}{DERIVED_SUFFIX}"),
                id,
                prk_input: raw,
                legacy: LessSafeKey::new(unbound),
            });
        }
        let first = keys
            .first()
            .ok_or_else(|| KeyError::Invalid("no key given".into()))?;
        let (fingerprint_key_id, fingerprint_key) = match fingerprint {
            Some((id, raw)) => (
                id,
                Zeroizing::new(hmac_sha256(
                    raw.as_ref(),
                    &[b"tokenrelay/v2/pan-fingerprint"],
                )),
            ),
            // Earlier versions' derivation, so their fingerprints still match.
            None => (
                format!("derived-from-{}", first.id),
                Zeroizing::new(hmac_sha256(
                    first.prk_input.as_ref(),
                    &[b"tokenrelay/pan-fingerprint/v1"],
                )),
            ),
        };
        Ok(Keyring {
            keys,
            fingerprint_key,
            fingerprint_key_id,
        })
    }

    /// Id of the fingerprint key: its own, or `derived-from-<first id>`
    /// when the material has no `fingerprint:` item.
    pub fn fingerprint_key_id(&self) -> &str {
        &self.fingerprint_key_id
    }

    /// Whether the fingerprint key has its own item (else it depends on
    /// the first master key staying listed).
    pub fn has_own_fingerprint_key(&self) -> bool {
        !self.fingerprint_key_id.starts_with("derived-from-")
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
                let b64 = || {
                    Zeroizing::new(
                        base64::engine::general_purpose::STANDARD
                            .encode(Zeroizing::new(random_bytes::<32>()).as_ref()),
                    )
                };
                let (key, fingerprint) = (b64(), b64());
                let text = Zeroizing::new(format!(
                    "# tokenrelay master keys, \"<id>:<base64 32 bytes>\", the last one active,\n# and the PAN fingerprint key, kept through every rotation.\n# Generated for a local try. Never commit or share this file.\nfingerprint:f1:{}\nk1:{}\n",
                    fingerprint.as_str(),
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

    /// Id of the key used for new records, as records store it
    /// (`<id>/v2`); `rotate-key` re-seals every record that stores another.
    pub fn active_id(&self) -> &str {
        self.keys.last().map_or("", |k| k.stored_id.as_str())
    }

    /// Seals a vault record's secret: [`Keyring::seal_for`] with
    /// [`Purpose::VaultRecord`].
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<(String, Vec<u8>), KeyError> {
        self.seal_for(Purpose::VaultRecord, aad, plaintext)
    }

    /// Seals `plaintext` for `purpose` under the active key; returns
    /// `(stored key id, salt ‖ nonce ‖ ciphertext ‖ tag)`.
    ///
    /// The plaintext is copied once, into the output buffer sized for the
    /// whole record, and encrypted there in place: no copy of it is left
    /// behind (no reallocation, no scratch buffer).
    pub fn seal_for(
        &self,
        purpose: Purpose,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(String, Vec<u8>), KeyError> {
        let key = self
            .keys
            .last()
            .ok_or_else(|| KeyError::Invalid("no key".into()))?;
        let salt = random_bytes::<SALT_LEN>();
        let record_key = key.derive(purpose, &salt)?;
        let nonce_bytes = random_bytes::<NONCE_LEN>();
        let head = SALT_LEN + NONCE_LEN;
        let mut out = Vec::with_capacity(head + plaintext.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&salt);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(plaintext);
        let tag = record_key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad),
                &mut out[head..],
            )
            .map_err(|_| KeyError::Invalid("sealing failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok((key.stored_id.clone(), out))
    }

    /// Opens a vault record's secret: [`Keyring::open_for`] with
    /// [`Purpose::VaultRecord`].
    pub fn open(
        &self,
        key_id: &str,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.open_for(Purpose::VaultRecord, key_id, aad, sealed)
    }

    /// Opens a record sealed for `purpose` under the stored `key_id`: a
    /// derived key (`<id>/v2`), or, for a record of an earlier version
    /// (`<id>`), the master key itself.
    pub fn open_for(
        &self,
        purpose: Purpose,
        key_id: &str,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let (id, derived) = match key_id.strip_suffix(DERIVED_SUFFIX) {
            Some(id) => (id, true),
            None => (key_id, false),
        };
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| KeyError::UnknownKey(key_id.to_owned()))?;
        let record_key;
        let (aead, rest): (&LessSafeKey, &[u8]) = if derived {
            if sealed.len() < SALT_LEN {
                return Err(KeyError::Tampered);
            }
            let (salt, rest) = sealed.split_at(SALT_LEN);
            record_key = key.derive(purpose, salt)?;
            (&record_key, rest)
        } else {
            // Earlier versions sealed with the master key itself.
            (&key.legacy, sealed)
        };
        if rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(KeyError::Tampered);
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KeyError::Tampered)?;
        let mut buf = Zeroizing::new(body.to_vec());
        let len = aead
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
        assert_eq!(both.active_id(), "k2/v2");
        assert_eq!(&*both.open(&id, b"r", &ct).unwrap(), b"secret");
        assert_eq!(both.fingerprint("4111"), old.fingerprint("4111"));
    }

    #[test]
    fn records_sealed_for_two_purposes_cannot_be_opened_as_each_other() {
        let k = Keyring::ephemeral();
        let purposes = [
            Purpose::VaultRecord,
            Purpose::Reference,
            Purpose::Idempotency,
        ];
        for sealed_as in purposes {
            let (id, ct) = k
                .seal_for(sealed_as, b"same-aad", b"4895370012345678")
                .unwrap();
            assert!(id.ends_with("/v2"), "{id}");
            for opened_as in purposes {
                let r = k.open_for(opened_as, &id, b"same-aad", &ct);
                if opened_as == sealed_as {
                    assert_eq!(&*r.unwrap(), b"4895370012345678");
                } else {
                    assert!(
                        matches!(r, Err(KeyError::Tampered)),
                        "{sealed_as:?} opened as {opened_as:?}"
                    );
                }
            }
        }
        // Each record has its own salt, so its own key: two seals of the
        // same plaintext share neither salt nor nonce.
        let (_, a) = k.seal(b"r", b"x").unwrap();
        let (_, b) = k.seal(b"r", b"x").unwrap();
        assert_ne!(a[..SALT_LEN], b[..SALT_LEN]);
        assert_ne!(
            a[SALT_LEN..SALT_LEN + NONCE_LEN],
            b[SALT_LEN..SALT_LEN + NONCE_LEN]
        );
    }

    #[test]
    fn records_of_earlier_versions_still_open_and_count_as_old() {
        let raw = [7u8; 32];
        let k = Keyring::parse(&format!("k1:{}", b64(raw))).unwrap();
        // v1: AES-256-GCM under the master key itself, key id "k1".
        let legacy = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).unwrap());
        let nonce = [3u8; NONCE_LEN];
        let mut body = b"secret".to_vec();
        legacy
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(b"r"),
                &mut body,
            )
            .unwrap();
        let sealed = [nonce.as_slice(), &body].concat();
        assert_eq!(&*k.open("k1", b"r", &sealed).unwrap(), b"secret");
        // rotate-key re-seals rows whose key id is not the active one.
        assert_ne!(k.active_id(), "k1");
        assert_eq!(k.active_id(), "k1/v2");
    }

    #[test]
    fn the_fingerprint_key_survives_retiring_any_master_key() {
        let (a, b, f) = (b64([1; 32]), b64([2; 32]), b64([9; 32]));
        let start = Keyring::parse(&format!("fingerprint:f1:{f}\nk1:{a}")).unwrap();
        let both = Keyring::parse(&format!("fingerprint:f1:{f}\nk1:{a}\nk2:{b}")).unwrap();
        let after = Keyring::parse(&format!("k2:{b}\nfingerprint:f1:{f}")).unwrap();
        assert_eq!(after.fingerprint_key_id(), "f1");
        assert!(after.has_own_fingerprint_key());
        assert_eq!(start.fingerprint("4111"), both.fingerprint("4111"));
        assert_eq!(start.fingerprint("4111"), after.fingerprint("4111"));
        // Without its own item: derived from the first key, as before.
        let legacy = Keyring::parse(&format!("k1:{a}")).unwrap();
        assert_eq!(legacy.fingerprint_key_id(), "derived-from-k1");
        assert_ne!(legacy.fingerprint("4111"), start.fingerprint("4111"));
        assert!(Keyring::parse(&format!("fingerprint:f1:{f},fingerprint:f2:{f},k1:{a}")).is_err());
        assert!(
            Keyring::parse(&format!("fingerprint:f1:{f}")).is_err(),
            "a master key is needed"
        );
    }

    #[test]
    fn a_generated_key_file_has_its_own_fingerprint_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let (k, created) = Keyring::load(None, Some(&path), true).unwrap();
        assert!(created && k.has_own_fingerprint_key());
        let (again, created) = Keyring::load(None, Some(&path), false).unwrap();
        assert!(!created);
        assert_eq!(again.fingerprint("4111"), k.fingerprint("4111"));
        assert!(Keyring::check(None, Some(&dir.path().join("nope")), true).is_ok());
        assert!(Keyring::check(None, Some(&dir.path().join("nope")), false).is_err());
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
        assert_eq!(Keyring::parse(&b64([3; 32])).unwrap().active_id(), "k1/v2");
    }
}
