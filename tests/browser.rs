//! The browser flow in a real browser: the example checkout page of
//! `sdk/js/example/`, served by the `demo --browser` merchant stand-in
//! (started here, in-process, with tokenrelay at SAQ-A), driven in headless
//! Chromium by `sdk/js/test/browser.mjs` (playwright-core, Debian's
//! `/usr/bin/chromium`). A test card is typed, the payment must be approved,
//! and the stand-in — the merchant's server — must never have received the
//! card number.
//!
//! Needs Chromium, Node and `npm ci` in `sdk/js`. Without them plain `cargo
//! test` skips with a line saying so; with `TOKENRELAY_TEST_BROWSER=1` (set
//! by `.ci/run`) it runs, and a missing piece is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Command;

use tokenrelay::demo::browser::Checkout;

const PAN: &str = "4111111111111111";

/// What is missing to run the test, if anything.
fn missing(chromium: &Path, sdk: &Path) -> Option<String> {
    if !chromium.is_file() {
        return Some(format!("Chromium not found at {}", chromium.display()));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node not found".into());
    }
    if !sdk.join("node_modules/playwright-core").is_dir() {
        return Some(format!(
            "playwright-core not installed (npm ci in {})",
            sdk.display()
        ));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_typed_into_the_checkout_page_in_chromium_pays_at_saq_a() {
    let required = std::env::var("TOKENRELAY_TEST_BROWSER").is_ok_and(|v| v == "1");
    let chromium = PathBuf::from(
        std::env::var("TOKENRELAY_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
    );
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/js");
    if let Some(what) = missing(&chromium, &sdk) {
        if required {
            panic!("TOKENRELAY_TEST_BROWSER=1 but {what}: install chromium and chromium-driver (apt-get) and run npm ci in sdk/js");
        }
        println!("skipped: {what} (set TOKENRELAY_TEST_BROWSER=1 to require this test)");
        return;
    }

    let checkout = Checkout::start("127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("checkout.png");
    let url = checkout.url();
    let dir = sdk.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("test/browser.mjs")
            .arg(url)
            .arg(&shot)
            .current_dir(&dir)
            .env("TOKENRELAY_CHROMIUM", &chromium)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the page did not approve:\n{stdout}\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["outcome"], "approved", "{report}");
    assert_eq!(report["console_errors"], serde_json::json!([]), "{report}");
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "Session opened by the merchant's server",
            "Card encrypted in this browser (JWE, ECDH-ES + A256GCM)",
            "Network token provisioned from the session",
            "Cryptogram reference (single use)",
            "Forwarded through tokenrelay",
            "Approved",
        ]
    );
    let details = report["details"].to_string();
    assert!(details.contains(r#"\"last4\": \"1111\""#), "{details}");
    // What the page shows is masked: no card number, no TPAN.
    assert!(!details.contains(PAN), "{details}");

    // The merchant's server got the page, a session request and the
    // ciphertext — never the card.
    let received = checkout.received();
    let pay: Vec<_> = received
        .iter()
        .filter(|r| r.request == "POST /checkout/pay")
        .collect();
    assert_eq!(pay.len(), 1, "{received:?}");
    let body: serde_json::Value = serde_json::from_slice(&pay[0].body).unwrap();
    assert!(body["data"].as_str().unwrap().starts_with("ey"), "a JWE");
    assert_eq!(
        body.as_object().unwrap().len(),
        2,
        "session_id and data only"
    );
    for r in &received {
        let text = String::from_utf8_lossy(&r.body);
        for secret in [PAN, "4111 1111 1111 1111", "Ada Lovelace"] {
            assert!(!text.contains(secret), "{} carried {secret:?}", r.request);
        }
    }
    checkout.stop().await;
}
