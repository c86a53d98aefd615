#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! Key rotation as the README tells it: add k2, rotate, remove k1 — the
//! same card still has the same fingerprint, so a second store of it finds
//! the first PCI token (deduplication) and every record opens under k2.

use std::sync::Arc;

use base64::Engine;
use tokenrelay::card::{Brand, CardNumber};
use tokenrelay::config::{VaultBackend, VaultConfig};
use tokenrelay::crypto::random_bytes;
use tokenrelay::vault::keyring::Keyring;
use tokenrelay::vault::{Metadata, PciToken, RotationCursor, TokenStore};

fn line(id: &str) -> String {
    format!(
        "{id}:{}",
        base64::engine::general_purpose::STANDARD.encode(random_bytes::<32>())
    )
}

async fn store(dir: &std::path::Path, material: &str) -> Arc<dyn TokenStore> {
    let config = VaultConfig {
        backend: VaultBackend::Sqlite {
            path: dir.join("vault.db"),
        },
        key_file: None,
        create_key_file: false,
        cache_ttl: std::time::Duration::ZERO,
    };
    tokenrelay::vault::open(&config, Some(Arc::new(Keyring::parse(material).unwrap())))
        .await
        .unwrap()
}

fn card(store: &dyn TokenStore, pan: &str) -> PciToken {
    let pan = CardNumber::parse(pan).unwrap();
    PciToken {
        id: uuid::Uuid::new_v4(),
        fingerprint: store.fingerprint(&pan),
        pan,
        scheme: Brand::Visa,
        expiry_month: 12,
        expiry_year: 2031,
        cardholder_name: Some("Ada Lovelace".into()),
        metadata: Metadata::new(),
        created_at: time::OffsetDateTime::now_utc(),
    }
}

async fn rotate(store: &dyn TokenStore) -> usize {
    let mut cursor = RotationCursor::default();
    let mut total = 0;
    loop {
        let step = store.rotate_batch(&mut cursor, 100).await.unwrap();
        assert!(step.unreadable.is_empty(), "{:?}", step.unreadable);
        if step.visited == 0 {
            return total;
        }
        total += step.rotated;
    }
}

#[tokio::test]
async fn add_k2_rotate_remove_k1_keeps_fingerprints_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let (fp, k1, k2) = (line("fingerprint:f1"), line("k1"), line("k2"));
    const PAN: &str = "4111111111111111";

    let before = store(dir.path(), &format!("{fp}\n{k1}\n")).await;
    let (first, created) = before.insert_pci(card(before.as_ref(), PAN)).await.unwrap();
    assert!(created);
    drop(before);

    // 1. add k2 (active for writes), 2. rotate-key.
    let both = store(dir.path(), &format!("{fp}\n{k1}\n{k2}\n")).await;
    assert!(rotate(both.as_ref()).await >= 1);
    drop(both);

    // 3. remove k1.
    let after = store(dir.path(), &format!("{fp}\n{k2}\n")).await;
    let read = after
        .get_pci(first.id)
        .await
        .unwrap()
        .expect("readable under k2");
    assert_eq!(read.pan.expose(), PAN);
    assert_eq!(read.cardholder_name.as_deref(), Some("Ada Lovelace"));
    let again = card(after.as_ref(), PAN);
    assert_eq!(
        again.fingerprint, first.fingerprint,
        "same card, same fingerprint"
    );
    let (found, created) = after.insert_pci(again).await.unwrap();
    assert!(!created, "deduplicated");
    assert_eq!(found.id, first.id);
    // And the Debug of what was read never holds the name or the number.
    let debug = format!("{read:?}");
    assert!(!debug.contains("Ada") && !debug.contains(PAN), "{debug}");
}
