//! The real `tokenrelay serve` process on ports the kernel picks.
//!
//! The config says `listen = "127.0.0.1:0"` and `admin_listen =
//! "127.0.0.1:0"`; the binary binds both before it logs `tokenrelay ready`
//! with the addresses it got, so the test reads them from that line. No
//! port is chosen in advance, so nothing can take it in between (the race
//! of binding port 0, dropping the socket and handing its number on).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

/// How long a start (or an awaited log line) may take on a loaded machine
/// before the test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `tokenrelay serve`, SIGKILLed and reaped on drop.
pub struct Binary {
    pub child: Child,
    /// `http://` + the bound `listen` address.
    pub base: String,
    /// `http://` + the bound `admin_listen` address.
    pub admin: String,
    /// Every stdout (log) line so far; closed when the process closes it.
    lines: watch::Receiver<Vec<String>>,
    log: PathBuf,
}

impl Binary {
    /// Starts `serve --config <config>` and waits for its ready line. Its
    /// stdout (the JSON log) and stderr are appended to `log`, which a
    /// failed start prints.
    pub async fn serve(config: &Path, log: &Path) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(append(log))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = watch::channel(Vec::new());
        let mut out = append(log);
        // A thread, not a task: the pipe is read to its end (so the binary
        // never blocks on a full pipe) whatever the test's runtime does.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(out, "{line}");
                tx.send_modify(|lines| lines.push(line));
            }
        });
        let mut bin = Binary {
            child,
            base: String::new(),
            admin: String::new(),
            lines,
            log: log.to_owned(),
        };
        let ready = bin.logged("tokenrelay ready").await;
        let (listen, admin) = ready_addresses(&ready)
            .unwrap_or_else(|| panic!("no bound addresses in the ready line: {ready}"));
        bin.base = format!("http://{listen}");
        bin.admin = format!("http://{admin}");
        bin
    }

    /// Waits (bounded) for a log line whose message is `message`; returns
    /// the line.
    pub async fn logged(&mut self, message: &str) -> String {
        let is_it = |l: &String| message_of(l).as_deref() == Some(message);
        // Some(line) when logged; None when the process closed its stdout.
        let found = tokio::time::timeout(START_TIMEOUT, async {
            match self.lines.wait_for(|lines| lines.iter().any(is_it)).await {
                Ok(lines) => lines.iter().find(|l| is_it(l)).cloned(),
                Err(_) => None,
            }
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => {
                let status = self.child.wait();
                panic!(
                    "tokenrelay exited ({status:?}) without logging {message:?}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            Err(_) => {
                self.kill();
                panic!(
                    "tokenrelay did not log {message:?} within {START_TIMEOUT:?}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
        }
    }

    /// Provisions `pan` (a PAN source, 12/2031) and takes a cryptogram
    /// reference for it, with the API key `key`: `(token id, reference)`.
    pub async fn token_and_reference(
        &self,
        http: &reqwest::Client,
        key: &str,
        pan: &str,
    ) -> (String, String) {
        let base = &self.base;
        let t: Value = http
            .post(format!("{base}/api/network/tokens"))
            .header("x-api-key", key)
            .json(&serde_json::json!({"source": {"type": "pan", "number": pan, "expiry_month": 12, "expiry_year": 2031}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = t["id"].as_str().unwrap().to_owned();
        let r: Value = http
            .post(format!("{base}/api/network/tokens/{id}/cryptograms"))
            .header("x-api-key", key)
            .json(&serde_json::json!({"type": "ecom", "mode": "reference"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (id, r["cryptogram_reference"].as_str().unwrap().to_owned())
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn message_of(line: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    v["fields"]["message"].as_str().map(str::to_owned)
}

fn append(log: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap()
}

/// `(listen, admin_listen)` from the `tokenrelay ready` log line.
pub fn ready_addresses(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: Value = serde_json::from_str(line).ok()?;
    let f = &v["fields"];
    let addr = |k: &str| f[k].as_str()?.parse::<SocketAddr>().ok();
    let (listen, admin) = (addr("listen")?, addr("admin_listen")?);
    // A ready line that still says port 0 would be a bug in the binary.
    assert!(listen.port() != 0 && admin.port() != 0, "{line}");
    Some((listen, admin))
}
