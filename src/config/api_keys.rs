//! `[[api_keys]]`: named keys, stored as hashes only, each with its scopes.

use std::collections::HashSet;

use super::raw::RawApiKey;
use super::ConfigError;
use crate::auth::{ApiKey, KeyHash, Scope};

pub(super) fn validate(raw: &[RawApiKey]) -> Result<Vec<ApiKey>, ConfigError> {
    let mut api_keys = Vec::with_capacity(raw.len());
    let mut names = HashSet::new();
    for (i, k) in raw.iter().enumerate() {
        let key = |field: &str| format!("api_keys[{i}].{field}");
        if k.name.trim().is_empty() {
            return Err(ConfigError::new(key("name"), "must not be empty"));
        }
        if !names.insert(k.name.as_str()) {
            return Err(ConfigError::new(
                key("name"),
                format!("duplicate key name {:?}", k.name),
            ));
        }
        let hash = KeyHash::parse(&k.hash).ok_or_else(|| {
            ConfigError::new(
                key("hash"),
                "expected \"sha256:<64 hex digits>\" as printed by `tokenrelay hash-key`",
            )
        })?;
        let mut scopes = Vec::with_capacity(k.scopes.len());
        for s in &k.scopes {
            scopes.push(Scope::parse(s).ok_or_else(|| {
                ConfigError::new(
                    key("scopes"),
                    format!("unknown scope {s:?} (expected tokens, cryptograms, forward, admin)"),
                )
            })?);
        }
        api_keys.push(ApiKey {
            name: k.name.clone(),
            hash,
            scopes,
        });
    }
    Ok(api_keys)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const HASH: &str = "sha256:57c8139db7290a9064aa57837c951138a32df40cca3aca526319f55651368823";

    #[test]
    fn bad_values_name_their_key() {
        let one = |name: &str, hash: &str, scopes: &str| {
            format!("[[api_keys]]\nname = \"{name}\"\nhash = \"{hash}\"\nscopes = [{scopes}]\n")
        };
        for (doc, key) in [
            (one("a", "plain", ""), "api_keys[0].hash"),
            (one(" ", HASH, ""), "api_keys[0].name"),
            (one("a", HASH, "\"root\""), "api_keys[0].scopes"),
            (
                one("a", HASH, "\"tokens\"") + &one("a", HASH, ""),
                "api_keys[1].name",
            ),
        ] {
            let e = Config::parse(&doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
        }
        let c = Config::parse(&one("a", HASH, "\"tokens\", \"forward\"")).unwrap();
        assert_eq!(c.api_keys[0].name, "a");
        assert_eq!(c.api_keys[0].scopes.len(), 2);
    }
}
