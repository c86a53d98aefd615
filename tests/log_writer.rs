#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! The log writer never blocks a request: with stdout a pipe nobody reads,
//! requests are still answered, the dropped-lines counter moves in
//! `/metrics`, and once stdout takes lines again a warning says how many
//! were dropped.

mod support;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::binary::{message_of, ready_addresses};

/// The real binary, killed on drop.
struct Binary(Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_stalled_stdout_drops_counted_lines_and_never_stalls_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let config = "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nlog_buffer_bytes = 65536\n[vault]\nbackend = \"memory\"\n";
    let path = dir.path().join("tokenrelay.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let _bin = Binary(child);
    // Read up to the ready line for the bound ports; after it, stdout is
    // held and not read until the end, so the pipe fills and stays full.
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "no ready line");
            if message_of(&line).as_deref() == Some("tokenrelay ready") {
                let addrs = ready_addresses(&line).expect("bound addresses");
                return (addrs, stdout);
            }
        }
    });
    let ((listen, admin), stdout) = tokio::time::timeout(Duration::from_secs(60), ready)
        .await
        .expect("tokenrelay did not start")
        .unwrap();
    let http = reqwest::Client::new();
    // ~300 bytes of access line each: many times the pipe and the buffer.
    let url = format!("http://{listen}/api/network/tokens/00000000-0000-0000-0000-000000000000");
    for i in 0..2000 {
        let resp = tokio::time::timeout(Duration::from_secs(30), http.get(&url).send())
            .await
            .unwrap_or_else(|_| panic!("request {i} was not answered: the log stalled it"))
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    let m = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped = metric(&m, "tokenrelay_log_lines_dropped_total{kind=\"access\"}");
    assert!(dropped > 0.0, "{m}");

    // stdout is read again: the writer catches up and says what it dropped.
    let warning = tokio::task::spawn_blocking(move || {
        for line in stdout.lines() {
            let line = line.unwrap();
            if line.contains("log lines dropped") {
                return Some(line);
            }
        }
        None
    });
    let warning = tokio::time::timeout(Duration::from_secs(60), warning)
        .await
        .expect("no warning line about the dropped lines")
        .unwrap()
        .expect("stdout closed without the warning line");
    let warning: serde_json::Value = serde_json::from_str(&warning).unwrap();
    assert_eq!(warning["level"], "WARN");
    assert_eq!(warning["target"], "tokenrelay::log");
    assert!(
        warning["fields"]["dropped_access"].as_u64().unwrap() > 0,
        "{warning}"
    );
}
