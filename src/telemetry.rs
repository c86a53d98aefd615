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

/// Log lines queued for the writer thread before request threads wait.
const LOG_QUEUE_LINES: usize = 4096;

/// Installs the JSON log subscriber (`RUST_LOG` filters, default `info`).
///
/// Lines are written to stdout by a dedicated thread, so request threads
/// never wait on the write syscall; the queue blocks rather than drops when
/// full (audit lines must not be lost). Keep the returned guard alive: it
/// flushes the queue when dropped at exit.
pub fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // A small queue: its slots are allocated up front and count in RSS.
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(false)
        .finish(std::io::stdout());
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .with_target(true)
        .with_writer(writer)
        .try_init();
    guard
}

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route label, or `none`.
    pub route: &'static str,
    /// Status class: `2xx`, `4xx`, ….
    pub status: &'static str,
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

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
