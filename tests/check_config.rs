#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! `check-config` says "ok" only for a config the server will start with:
//! every duration inside its bounds (at the bound passes, past it fails,
//! naming the key), no `[vault]` is SQLite (which needs a master key, so
//! it is not silently memory), TLS and key files are read and parsed, no
//! password in a URL.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tokenrelay::config::DURATION_KEYS;

const BIN: &str = env!("CARGO_BIN_EXE_tokenrelay");

fn check(dir: &Path, doc: &str) -> Output {
    let path = dir.join("tokenrelay.toml");
    std::fs::write(&path, doc).unwrap();
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .current_dir(dir)
        .env_remove("TOKENRELAY_MASTER_KEY")
        .output()
        .unwrap()
}

fn refused(out: &Output, key: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(key), "{key} not named: {stderr}");
    stderr
}

/// `key = value` where the key lives, with a memory vault (no key needed).
fn doc_with(key: &str, value: &str) -> String {
    match key.split_once('.') {
        None => format!("{key} = \"{value}\"\n[vault]\nbackend = \"memory\"\n"),
        Some(("vault", k)) => format!("[vault]\nbackend = \"memory\"\n{k} = \"{value}\"\n"),
        Some((table, k)) => {
            format!("[vault]\nbackend = \"memory\"\n[{table}]\n{k} = \"{value}\"\n")
        }
    }
}

#[test]
fn every_bounded_duration_passes_at_its_bound_and_fails_past_it() {
    let dir = tempfile::tempdir().unwrap();
    for d in DURATION_KEYS {
        let at = humantime::format_duration(d.max).to_string();
        let out = check(dir.path(), &doc_with(d.key, &at));
        assert!(
            out.status.success(),
            "{} = {at}: {}",
            d.key,
            String::from_utf8_lossy(&out.stderr)
        );
        let past = humantime::format_duration(d.max + Duration::from_secs(1)).to_string();
        refused(&check(dir.path(), &doc_with(d.key, &past)), d.key);
        if !d.min.is_zero() {
            let at = humantime::format_duration(d.min).to_string();
            assert!(check(dir.path(), &doc_with(d.key, &at)).status.success());
            refused(&check(dir.path(), &doc_with(d.key, "0s")), d.key);
        }
    }
    // The two that used to pass here and then panic.
    refused(
        &check(dir.path(), &doc_with("reference_ttl", "9000years")),
        "reference_ttl",
    );
    refused(&check(dir.path(), &doc_with("cvc_ttl", "2000y")), "cvc_ttl");
}

#[test]
fn no_vault_table_is_sqlite_so_it_needs_a_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused(&check(dir.path(), ""), "vault.key_file");
    assert!(stderr.contains("TOKENRELAY_MASTER_KEY"), "{stderr}");
    // With a key file it would create, the same config is fine, and
    // checking creates neither the key nor the database.
    let out = check(
        dir.path(),
        "[vault]\nkey_file = \"data/master.key\"\ncreate_key_file = true\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("data").exists(),
        "check-config created files"
    );
}

#[test]
fn key_files_are_read_and_their_content_never_echoed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("master.key"), "k1:not-a-key-SECRETISH\n").unwrap();
    let stderr = refused(
        &check(dir.path(), "[vault]\nkey_file = \"master.key\"\n"),
        "master key",
    );
    assert!(!stderr.contains("SECRETISH"), "{stderr}");
    refused(
        &check(dir.path(), "[vault]\nkey_file = \"missing.key\"\n"),
        "missing.key",
    );
}

#[test]
fn listener_tls_files_are_parsed_not_just_found() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let doc =
        "[tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n[vault]\nbackend = \"memory\"\n";
    refused(&check(dir.path(), doc), "tls.");
}

#[test]
fn a_password_in_a_url_is_refused_without_repeating_it() {
    let dir = tempfile::tempdir().unwrap();
    for (doc, key) in [
        (
            "[vault]\nbackend = \"postgres\"\nurl = \"postgres://app@db/vault?password=hunter2\"\n",
            "vault.url",
        ),
        (
            "[vault]\nbackend = \"memory\"\n[references]\nbackend = \"redis\"\nurl = \"redis://:hunter2@cache\"\n",
            "references.url",
        ),
    ] {
        let stderr = refused(&check(dir.path(), doc), key);
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
}
