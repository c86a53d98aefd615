//! Logs and metrics.
//!
//! Logs are JSON lines through `tracing`; nothing in this crate hands a
//! secret to a log macro (the secret types print masked or not at all).
//! Metrics are Prometheus text from `prometheus-client`, served by
//! [`crate::admin`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub mod access;
mod json_line;
pub use json_line::JsonLine;

/// How long the writer thread gathers lines before one `write` of them all.
const LOG_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);
/// Default bound of the lines waiting for stdout (`log_buffer_bytes`).
pub const DEFAULT_LOG_BUFFER_BYTES: usize = 4 << 20;
/// How long a stopping process waits for a stalled stdout to take the
/// last lines before it gives up on them.
const LOG_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Target of the access lines, the ones the buffer protects.
const ACCESS_TARGET: &str = "tokenrelay::access";

/// Installs the JSON log subscriber (`RUST_LOG` filters, default `info`)
/// with the default buffer bound.
pub fn init_logging() -> LogGuard {
    init_logging_with(DEFAULT_LOG_BUFFER_BYTES)
}

/// Installs the JSON log subscriber over a [`LogBuffer`] of at most
/// `buffer_bytes` waiting bytes. Keep the returned guard alive: dropping
/// it writes what is left.
pub fn init_logging_with(buffer_bytes: usize) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (buffer, guard) = LogBuffer::spawn(std::io::stdout(), buffer_bytes);
    let _ = tracing_subscriber::fmt()
        .event_format(JsonLine)
        .with_env_filter(filter)
        .with_writer(buffer)
        .try_init();
    guard
}

/// Labels of the dropped-log-lines counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LogDropLabels {
    /// `access` or `other`.
    pub kind: &'static str,
}

/// Lines the log buffer dropped, process-wide (one stdout per process),
/// exported by every [`Metrics`] as `tokenrelay_log_lines_dropped_total`.
pub fn log_drops() -> &'static Family<LogDropLabels, Counter> {
    static DROPS: std::sync::OnceLock<Family<LogDropLabels, Counter>> = std::sync::OnceLock::new();
    DROPS.get_or_init(|| {
        let f = Family::<LogDropLabels, Counter>::default();
        for kind in ["access", "other"] {
            let _ = f.get_or_create(&LogDropLabels { kind });
        }
        f
    })
}

/// A bounded log sink that batches lines for a writer thread and never
/// blocks the thread that logs.
///
/// A line is one `memcpy` under a mutex; the writer thread is woken once
/// per batch and writes it with one syscall, holding no lock the request
/// threads need. When stdout stalls (a full pipe nobody reads), lines
/// gather up to the bound and then are **dropped, counted, and reported**:
/// `tokenrelay_log_lines_dropped_total{kind}` in `/metrics`, and a `WARN`
/// line (`target` `tokenrelay::log`, with the counts) as soon as stdout
/// takes lines again.
///
/// What is dropped first: access lines are the audit trail, so other lines
/// (debug, warnings, start-up) may fill only half the bound; past it they
/// are dropped while access lines are still taken up to the whole bound.
/// An access line is dropped only when the whole bound is full of lines
/// stdout has not taken — then the counter with `kind="access"` says how
/// many payment records the log is missing (the metric and the acquirer's
/// own records are what is left to reconcile with).
///
/// Order is kept: batches are taken and written by the one writer thread.
pub struct LogBuffer {
    shared: std::sync::Arc<LogShared>,
}

struct LogShared {
    /// Lines not yet written. A `std` mutex: held for a `memcpy`, never
    /// across I/O or `.await`.
    pending: std::sync::Mutex<LogPending>,
    /// Wakes the writer thread when a batch starts or at shutdown.
    wake: std::sync::Condvar,
    /// Signals the guard that the writer thread has written everything.
    done: std::sync::Condvar,
    /// The bound on pending bytes.
    limit: usize,
    /// The output: the writer thread's, or the caller's when there is none.
    out: std::sync::Mutex<Box<dyn std::io::Write + Send>>,
}

#[derive(Default)]
struct LogPending {
    buf: Vec<u8>,
    closing: bool,
    finished: bool,
    /// No writer thread: each caller writes its own line.
    no_writer: bool,
    /// Drops not yet reported in a warning line.
    unreported_access: u64,
    unreported_other: u64,
}

/// Stops the writer thread and writes what is left when dropped.
pub struct LogGuard {
    shared: std::sync::Arc<LogShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogBuffer {
    /// A buffer of at most `limit` waiting bytes over `out`, and its
    /// writer thread.
    pub fn spawn(out: impl std::io::Write + Send + 'static, limit: usize) -> (LogBuffer, LogGuard) {
        let shared = std::sync::Arc::new(LogShared {
            pending: std::sync::Mutex::new(LogPending::default()),
            wake: std::sync::Condvar::new(),
            done: std::sync::Condvar::new(),
            limit,
            out: std::sync::Mutex::new(Box::new(out)),
        });
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tokenrelay-log".into())
            .spawn(move || writer.run())
            .ok();
        if thread.is_none() {
            // No writer thread: every line is written by its caller.
            shared.lock_pending().no_writer = true;
        }
        let guard = LogGuard {
            shared: shared.clone(),
            thread,
        };
        (LogBuffer { shared }, guard)
    }
}

impl LogShared {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, LogPending> {
        // A panic while holding the lock leaves plain bytes: still usable.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a line, or drops and counts it when over its share.
    fn push(&self, line: &[u8], access: bool) {
        let mut pending = self.lock_pending();
        if pending.no_writer {
            drop(pending);
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            let _ = out.write_all(line);
            let _ = out.flush();
            return;
        }
        let share = if access { self.limit } else { self.limit / 2 };
        if pending.buf.len() + line.len() > share {
            let kind = if access {
                pending.unreported_access += 1;
                "access"
            } else {
                pending.unreported_other += 1;
                "other"
            };
            drop(pending);
            log_drops().get_or_create(&LogDropLabels { kind }).inc();
            return;
        }
        let was_empty = pending.buf.is_empty();
        pending.buf.extend_from_slice(line);
        drop(pending);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// The writer thread: sleep until a batch starts, let it gather, write.
    fn run(&self) {
        loop {
            let mut pending = self.lock_pending();
            while pending.buf.is_empty() && !pending.closing {
                pending = self.wake.wait(pending).unwrap_or_else(|p| p.into_inner());
            }
            let closing = pending.closing;
            drop(pending);
            if !closing {
                std::thread::sleep(LOG_FLUSH_INTERVAL);
            }
            let (mut batch, access, other) = {
                let mut p = self.lock_pending();
                let counts = (
                    std::mem::take(&mut p.unreported_access),
                    std::mem::take(&mut p.unreported_other),
                );
                // Keep the allocation for the next batch when it is small.
                let cap = p.buf.capacity().min(1 << 16);
                (
                    std::mem::replace(&mut p.buf, Vec::with_capacity(cap)),
                    counts.0,
                    counts.1,
                )
            };
            if access + other > 0 {
                batch.extend_from_slice(&dropped_line(access, other));
            }
            if !batch.is_empty() {
                let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
                // Nowhere to report a failed log write; the line is gone either way.
                let _ = out.write_all(&batch);
                let _ = out.flush();
            }
            if closing {
                let mut p = self.lock_pending();
                if p.buf.is_empty() {
                    // From here on each caller writes its own line.
                    p.finished = true;
                    p.no_writer = true;
                    drop(p);
                    self.done.notify_all();
                    return;
                }
            }
        }
    }
}

/// The warning line written when lines were dropped, in [`JsonLine`]'s shape.
fn dropped_line(access: u64, other: u64) -> Vec<u8> {
    let mut timestamp = String::new();
    // Only the fallback for years outside 0..=9999 can fail; the line goes
    // out either way.
    let _ = json_line::write_timestamp(&mut timestamp, time::OffsetDateTime::now_utc());
    format!(
        "{{\"timestamp\":\"{timestamp}\",\"level\":\"WARN\",\"fields\":{{\"message\":\"log lines dropped: stdout did not keep up\",\"dropped_access\":{access},\"dropped_other\":{other}}},\"target\":\"tokenrelay::log\"}}\n",
    )
    .into_bytes()
}

/// One event's writer: borrows the buffer, so making one costs nothing.
pub struct LogWriter<'a> {
    shared: &'a LogShared,
    access: bool,
}

impl std::io::Write for LogWriter<'_> {
    /// `tracing-subscriber` hands over each formatted line in one call.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.shared.push(line, self.access);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter {
            shared: &self.shared,
            access: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LogWriter {
            shared: &self.shared,
            access: meta.target() == ACCESS_TARGET,
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            // No writer thread: every line was written by its caller.
            return;
        };
        let mut pending = self.shared.lock_pending();
        pending.closing = true;
        self.shared.wake.notify_one();
        // A stalled stdout must not hold the exit forever: wait a bounded
        // time for the writer, then leave it (and its lines) behind.
        let deadline = std::time::Instant::now() + LOG_CLOSE_WAIT;
        while !pending.finished {
            let now = std::time::Instant::now();
            if now >= deadline {
                return;
            }
            pending = match self.shared.done.wait_timeout(pending, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        drop(pending);
        let _ = thread.join();
    }
}

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route label, or `none`.
    pub route: &'static str,
    /// Status class: `2xx`, `4xx`, ….
    pub status: &'static str,
}

/// Labels of the route-forward counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's name from `[[routes]]` (bounded by the config).
    pub route: String,
    /// Status class: `2xx`, `4xx`, ….
    pub status: &'static str,
}

/// Labels of the unfinished-request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnfinishedLabels {
    /// Route label, or `none`.
    pub route: &'static str,
    /// How it ended: an [`access::Ending`] label other than `complete`.
    pub outcome: &'static str,
}

/// Labels of per-destination counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    /// Destination host.
    pub host: String,
}

/// Every metric tokenrelay exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Requests that did not deliver their whole response, by outcome.
    pub unfinished: Family<UnfinishedLabels, Counter>,
    /// Whole forward handling time, seconds.
    pub forward_duration: Histogram,
    /// Time to the acquirer's response head, seconds.
    pub upstream_duration: Histogram,
    /// References handed out.
    pub references_issued: Counter,
    /// References consumed by a forward.
    pub references_consumed: Counter,
    /// References put back after a connection failure.
    pub references_restored: Counter,
    /// Forwards refused at the reference (unknown, used, mismatched).
    pub references_refused: Counter,
    /// References currently held (set at scrape time).
    pub reference_cache_size: Gauge,
    /// TLS handshake failures by destination host.
    pub tls_failures: Family<HostLabels, Counter>,
    /// Route forwards by route name and status class.
    pub route_forwards: Family<RouteLabels, Counter>,
    /// Log lines dropped by the log buffer (process-wide, [`log_drops`]).
    pub log_lines_dropped: Family<LogDropLabels, Counter>,
}

/// `2xx`, `4xx`, … of a status code.
fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tokenrelay");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route and status class",
            requests.clone(),
        );
        let unfinished = Family::<UnfinishedLabels, Counter>::default();
        registry.register(
            "requests_unfinished",
            "Requests whose response was not delivered whole, by route and outcome",
            unfinished.clone(),
        );
        let forward_duration = Histogram::new(latency_buckets());
        registry.register(
            "forward_duration_seconds",
            "Forward handling time",
            forward_duration.clone(),
        );
        let upstream_duration = Histogram::new(latency_buckets());
        registry.register(
            "upstream_duration_seconds",
            "Time to the acquirer's response head",
            upstream_duration.clone(),
        );
        let references_issued = Counter::default();
        registry.register(
            "references_issued",
            "References issued",
            references_issued.clone(),
        );
        let references_consumed = Counter::default();
        registry.register(
            "references_consumed",
            "References consumed by a forward",
            references_consumed.clone(),
        );
        let references_restored = Counter::default();
        registry.register(
            "references_restored",
            "References restored after a connection failure",
            references_restored.clone(),
        );
        let references_refused = Counter::default();
        registry.register(
            "references_refused",
            "Forwards refused at the reference",
            references_refused.clone(),
        );
        let reference_cache_size = Gauge::default();
        registry.register(
            "reference_cache_size",
            "References currently held",
            reference_cache_size.clone(),
        );
        let tls_failures = Family::<HostLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshake failures by destination host",
            tls_failures.clone(),
        );
        let route_forwards = Family::<RouteLabels, Counter>::default();
        registry.register(
            "route_forwards",
            "Route forwards by route name and status class",
            route_forwards.clone(),
        );
        let log_lines_dropped = log_drops().clone();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stdout did not keep up, by kind (access or other)",
            log_lines_dropped.clone(),
        );
        Self {
            route_forwards,
            log_lines_dropped,
            registry,
            requests,
            unfinished,
            forward_duration,
            upstream_duration,
            references_issued,
            references_consumed,
            references_restored,
            references_refused,
            reference_cache_size,
            tls_failures,
        }
    }

    /// Counts a finished request.
    pub fn count_request(&self, route: &'static str, status: u16) {
        let status = status_class(status);
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }

    /// Counts a finished route forward.
    pub fn count_route_forward(&self, route: &str, status: u16) {
        self.route_forwards
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
                status: status_class(status),
            })
            .inc();
    }

    /// Counts a request that ended without delivering its whole response.
    pub fn count_unfinished(&self, route: &'static str, outcome: &'static str) {
        self.unfinished
            .get_or_create(&UnfinishedLabels { route, outcome })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// An output the test can read back (also the log formatter's tests').
    #[derive(Clone, Default)]
    pub(super) struct Captured(pub(super) Arc<Mutex<Vec<u8>>>);

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_whole_and_in_order_per_thread() {
        let out = Captured::default();
        let (buffer, guard) = LogBuffer::spawn(out.clone(), 64 << 20);
        let buffer = Arc::new(buffer);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let buffer = buffer.clone();
                std::thread::spawn(move || {
                    // Enough bytes to cross the high-water mark several times.
                    let pad = "x".repeat(200);
                    for i in 0..5_000 {
                        let line = format!("{t} {i} {pad}\n");
                        buffer.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let mut next = [0u32; 4];
        for line in text.lines() {
            let mut f = line.split(' ');
            let t: usize = f.next().unwrap().parse().unwrap();
            let i: u32 = f.next().unwrap().parse().unwrap();
            assert_eq!(f.next().unwrap().len(), 200, "a line was cut");
            assert_eq!(i, next[t], "thread {t}'s lines out of order");
            next[t] += 1;
        }
        assert_eq!(next, [5_000; 4], "lines were lost");
    }

    /// An output that blocks every write until the gate opens.
    #[derive(Clone, Default)]
    struct Stalled {
        gate: Arc<(Mutex<(bool, bool)>, std::sync::Condvar)>,
        out: Captured,
    }

    impl Stalled {
        fn wait_until_blocked(&self) {
            let (lock, cv) = &*self.gate;
            let mut g = lock.lock().unwrap();
            while !g.1 {
                g = cv.wait(g).unwrap();
            }
        }
        fn open(&self) {
            let (lock, cv) = &*self.gate;
            lock.lock().unwrap().0 = true;
            cv.notify_all();
        }
    }

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.gate;
            let mut g = lock.lock().unwrap();
            g.1 = true;
            cv.notify_all();
            while !g.0 {
                g = cv.wait(g).unwrap();
            }
            drop(g);
            self.out.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_drops_other_lines_first_and_says_so() {
        let out = Stalled::default();
        let (buffer, guard) = LogBuffer::spawn(out.clone(), 1000);
        let line = |tag: &str| format!("{tag:>19}\n");
        buffer.shared.push(b"first\n", false);
        out.wait_until_blocked();
        // The writer is stuck in `write`; nothing here may wait for it.
        for i in 0..60 {
            buffer
                .shared
                .push(line(&format!("other{i}")).as_bytes(), false);
        }
        for i in 0..40 {
            buffer
                .shared
                .push(line(&format!("access{i}")).as_bytes(), true);
        }
        out.open();
        drop(guard);
        let text = String::from_utf8(out.out.0.lock().unwrap().clone()).unwrap();
        let count = |p: &str| {
            text.lines()
                .filter(|l| l.trim_start().starts_with(p))
                .count()
        };
        // Other lines may use half the bound (25 of 20 bytes), access
        // lines the rest.
        assert_eq!((count("other"), count("access")), (25, 25), "{text}");
        let warning: serde_json::Value = serde_json::from_str(
            text.lines()
                .find(|l| l.contains("log lines dropped"))
                .expect("warning line"),
        )
        .unwrap();
        assert_eq!(warning["fields"]["dropped_other"], 35);
        assert_eq!(warning["fields"]["dropped_access"], 15);
        assert_eq!(warning["level"], "WARN");
    }

    #[test]
    fn a_quiet_line_is_written_without_waiting_for_more() {
        let out = Captured::default();
        let (buffer, _guard) = LogBuffer::spawn(out.clone(), 64 << 20);
        buffer.make_writer().write_all(b"one\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(&*out.0.lock().unwrap(), b"one\n");
    }
}
