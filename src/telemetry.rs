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
/// Buffered bytes past which the logging thread writes the batch itself
/// (backpressure instead of unbounded memory or dropped lines).
const LOG_BUFFER_HIGH_WATER: usize = 256 * 1024;

/// Installs the JSON log subscriber (`RUST_LOG` filters, default `info`).
///
/// Lines go to stdout through a [`LogBuffer`]: request threads append to
/// a shared buffer and a writer thread writes what gathered every
/// [`LOG_FLUSH_INTERVAL`] in one syscall. Nothing is dropped. Keep the
/// returned guard alive: dropping it writes what is left.
pub fn init_logging() -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (buffer, guard) = LogBuffer::spawn(std::io::stdout());
    let _ = tracing_subscriber::fmt()
        .event_format(JsonLine)
        .with_env_filter(filter)
        .with_writer(buffer)
        .try_init();
    guard
}

/// A log sink that batches lines for a writer thread.
///
/// Why not a channel per line (as `tracing-appender` does): every line
/// then wakes the writer thread and is written with its own syscall, and
/// the line's buffer is freed on another thread than allocated it. Under
/// load that was a visible share of the forward path (futex wake-ups,
/// malloc arena locks). Here a line is one `memcpy` under a mutex; the
/// writer is woken once per batch, and only when the batch starts.
///
/// Order is kept: whoever writes a batch out holds the output lock
/// *before* taking the batch, so batches reach the output in the order
/// they were taken.
pub struct LogBuffer {
    shared: std::sync::Arc<LogShared>,
}

struct LogShared {
    /// Lines not yet written. A `std` mutex: held for a `memcpy`, never
    /// across I/O or `.await`.
    pending: std::sync::Mutex<LogPending>,
    /// Wakes the writer thread when a batch starts or at shutdown.
    wake: std::sync::Condvar,
    /// The output; its lock orders batches.
    out: std::sync::Mutex<Box<dyn std::io::Write + Send>>,
}

#[derive(Default)]
struct LogPending {
    buf: Vec<u8>,
    closing: bool,
}

/// Stops the writer thread and writes what is left when dropped.
pub struct LogGuard {
    shared: std::sync::Arc<LogShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogBuffer {
    /// A buffer over `out` and its writer thread.
    pub fn spawn(out: impl std::io::Write + Send + 'static) -> (LogBuffer, LogGuard) {
        let shared = std::sync::Arc::new(LogShared {
            pending: std::sync::Mutex::new(LogPending::default()),
            wake: std::sync::Condvar::new(),
            out: std::sync::Mutex::new(Box::new(out)),
        });
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tokenrelay-log".into())
            .spawn(move || writer.run())
            .ok();
        if thread.is_none() {
            // No writer thread: every line is written by its caller.
            shared.lock_pending().closing = true;
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

    /// Writes whatever is pending, in order.
    fn write_out(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let batch = std::mem::take(&mut self.lock_pending().buf);
        if !batch.is_empty() {
            // Nowhere to report a failed log write; the line is gone either way.
            let _ = out.write_all(&batch);
            let _ = out.flush();
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
            self.write_out();
            if closing {
                return;
            }
        }
    }
}

/// One event's writer: borrows the buffer, so making one costs nothing.
pub struct LogWriter<'a> {
    shared: &'a LogShared,
}

impl std::io::Write for LogWriter<'_> {
    /// `tracing-subscriber` hands over each formatted line in one call.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock_pending();
        let was_empty = pending.buf.is_empty();
        pending.buf.extend_from_slice(line);
        let full = pending.buf.len() >= LOG_BUFFER_HIGH_WATER;
        let no_writer = pending.closing;
        drop(pending);
        if full || no_writer {
            self.shared.write_out();
        } else if was_empty {
            self.shared.wake.notify_one();
        }
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
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock_pending().closing = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Lines logged after the thread stopped are written by their caller.
        self.shared.write_out();
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
        Self {
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
        let status = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .get_or_create(&RequestLabels { route, status })
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
        let (buffer, guard) = LogBuffer::spawn(out.clone());
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

    #[test]
    fn a_quiet_line_is_written_without_waiting_for_more() {
        let out = Captured::default();
        let (buffer, _guard) = LogBuffer::spawn(out.clone());
        buffer.make_writer().write_all(b"one\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(&*out.0.lock().unwrap(), b"one\n");
    }
}
