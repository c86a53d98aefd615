//! Accepting connections: the loop shared by the main and admin listeners.
//!
//! `serve` never binds: it takes a bound listener (tests pass
//! `127.0.0.1:0`). Connections are capped by a semaphore
//! (`max_connections`), and the cap cannot be held by sockets that do
//! nothing: every connection carries its own timer **from accept** — it is
//! closed if no request is in flight for `header_read_timeout` before its
//! first request (TLS handshake included, HTTP/1 and HTTP/2 alike: hyper's
//! own header timer starts only at the first byte, and the HTTP/1–HTTP/2
//! detection has none), or for `idle_timeout` between requests. When the
//! cap is reached, the oldest connection with no request in flight is
//! closed to admit the new one; only when every connection is busy does
//! the accept loop wait. HTTP/2 gets the limits a public server sets:
//! concurrent streams, header list size, keep-alive pings, reset-stream
//! bounds. On shutdown the loop stops accepting and in-flight requests get
//! `shutdown_grace` to finish.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::Body;

/// Limits applied to every connection of a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Time allowed for a request head, and from accept (TLS handshake
    /// included) to the first request.
    pub header_read_timeout: Duration,
    /// Time a connection may stay open with no request in flight after
    /// its first one (keep-alive idle).
    pub idle_timeout: Duration,
    /// Drain deadline after shutdown starts.
    pub shutdown_grace: Duration,
}

/// Most concurrent HTTP/2 streams per connection.
const H2_MAX_STREAMS: u32 = 256;
/// Largest HTTP/2 header list (and HTTP/1 read buffer) accepted.
const MAX_HEADER_BYTES: u32 = 64 * 1024;
/// HTTP/2 keep-alive ping interval and the time to answer one.
const H2_PING: Duration = Duration::from_secs(20);
/// How often a full accept loop retries closing an idle connection while
/// every one is busy.
const EVICT_RETRY: Duration = Duration::from_millis(50);

/// Serves `handler` on `listener` until `shutdown` turns true, then drains.
/// Each connection runs on one of `workers` when given (round-robin at
/// accept), else on the caller's runtime.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    handler: H,
    workers: Option<Arc<Workers>>,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let registry = Arc::new(Registry::default());
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES as usize)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES)
        .keep_alive_interval(H2_PING)
        .keep_alive_timeout(H2_PING)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024);
    let builder = Arc::new(builder);

    loop {
        if *shutdown.borrow() {
            break;
        }
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => loop {
                // Full: make room by closing the oldest idle connection;
                // wait only while every connection is busy.
                registry.evict_oldest_idle();
                tokio::select! {
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => break p,
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(EVICT_RETRY) => {}
                    _ = shutdown.changed() => {
                        drop(stream);
                        return drain(graceful, limits).await;
                    }
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = registry.register();
        let handler = handler.clone();
        let tracked = conn.clone();
        let service = service_fn(move |req| {
            let h = handler.clone();
            let guard = InFlight::start(tracked.clone());
            async move {
                let (parts, body) = h(req).await.into_parts();
                Ok::<_, Infallible>(Response::from_parts(
                    parts,
                    Tracked {
                        body,
                        _guard: guard,
                    },
                ))
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let registry = registry.clone();
        let slot = Slot {
            registry,
            conn,
            _permit: permit,
        };
        let connection = move |stream: TcpStream| async move {
            let conn = slot.conn.clone();
            let first = conn.opened + limits.header_read_timeout;
            match tls {
                None => {
                    let c = builder.serve_connection(TokioIo::new(stream), service);
                    supervise(watcher.watch(c.into_owned()), &conn, limits).await;
                }
                Some(acceptor) => {
                    let tls = tokio::select! {
                        r = tokio::time::timeout_at(first, acceptor.accept(stream)) => match r {
                            Ok(Ok(s)) => s,
                            _ => return,
                        },
                        _ = conn.evict.notified() => return,
                    };
                    let c = builder.serve_connection(TokioIo::new(tls), service);
                    supervise(watcher.watch(c.into_owned()), &conn, limits).await;
                }
            }
            drop(slot);
        };
        match &workers {
            None => {
                tokio::spawn(connection(stream));
            }
            // The socket leaves this runtime's reactor and joins the
            // worker's, so its readiness wakes that thread only.
            Some(workers) => match stream.into_std() {
                Ok(stream) => workers.spawn(async move {
                    if let Ok(stream) = TcpStream::from_std(stream) {
                        connection(stream).await;
                    }
                }),
                Err(e) => tracing::warn!(error = %e, "could not hand a connection over"),
            },
        }
    }
    drop(listener);
    drain(graceful, limits).await;
}

async fn drain(graceful: GracefulShutdown, limits: Limits) {
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; dropping remaining connections");
        }
    }
}

/// Runs `conn` until it ends, is evicted, or has had no request in flight
/// for its idle limit; dropping it closes the socket.
async fn supervise<F: Future>(conn: F, state: &Conn, limits: Limits) {
    tokio::pin!(conn);
    let mut deadline = state.opened + limits.header_read_timeout;
    loop {
        tokio::select! {
            _ = &mut conn => return,
            _ = state.evict.notified() => {
                if state.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                // A request began after the accept loop picked us.
                state.evicting.store(false, Ordering::Release);
            }
            _ = tokio::time::sleep_until(deadline) => {
                if state.in_flight.load(Ordering::Acquire) > 0 {
                    deadline = Instant::now() + limits.idle_timeout;
                    continue;
                }
                let limit = if state.served.load(Ordering::Acquire) {
                    limits.idle_timeout
                } else {
                    limits.header_read_timeout
                };
                let until = state.idle_since() + limit;
                if Instant::now() >= until {
                    return;
                }
                deadline = until;
            }
        }
    }
}

/// One connection's state, shared by its task, its requests and the
/// registry.
struct Conn {
    id: u64,
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last request finished.
    idle_since_ms: AtomicU64,
    served: AtomicBool,
    evicting: AtomicBool,
    evict: Notify,
}

impl Conn {
    fn idle_since(&self) -> Instant {
        self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
    }
}

/// Open connections by accept order: whom to close when the cap is full.
/// A `std` mutex: held for a map insert, remove or a short scan, never
/// across an await.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn register(&self) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
            evicting: AtomicBool::new(false),
            evict: Notify::new(),
        });
        if let Ok(mut open) = self.open.lock() {
            open.insert(conn.id, conn.clone());
        }
        conn
    }

    fn remove(&self, id: u64) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&id);
        }
    }

    /// Asks the oldest connection with no request in flight to close.
    fn evict_oldest_idle(&self) {
        let Ok(open) = self.open.lock() else {
            return;
        };
        let idle = open.values().find(|c| {
            c.in_flight.load(Ordering::Acquire) == 0 && !c.evicting.load(Ordering::Acquire)
        });
        if let Some(c) = idle {
            c.evicting.store(true, Ordering::Release);
            c.evict.notify_one();
        }
    }
}

/// A connection's place: leaving the registry and freeing the permit when
/// its task ends, however it ends.
struct Slot {
    registry: Arc<Registry>,
    conn: Arc<Conn>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.remove(self.conn.id);
    }
}

/// A request in flight, until its response body is done (or dropped).
struct InFlight(Arc<Conn>);

impl InFlight {
    fn start(conn: Arc<Conn>) -> InFlight {
        conn.served.store(true, Ordering::Release);
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let c = &self.0;
        let ms = u64::try_from(c.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        c.idle_since_ms.store(ms, Ordering::Release);
        c.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight.
struct Tracked {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Threads each running a single-threaded tokio runtime. A connection
/// handed to a worker stays there with everything it does — its requests,
/// their timers, the forward's upstream connection (one pool per worker,
/// `forward::upstream::Clients`) — so a forward never wakes another core:
/// on this 2-core machine the multi-threaded scheduler's cross-core wakes
/// were ~9 µs of a forward's CPU (issue #24, `docs/performance.md`).
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    next: AtomicUsize,
    threads: Mutex<
        Vec<(
            tokio::sync::oneshot::Sender<()>,
            std::thread::JoinHandle<()>,
        )>,
    >,
}

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker this thread is, if it is one.
pub fn current_worker() -> Option<usize> {
    WORKER.with(Cell::get)
}

impl Workers {
    /// Starts `n` (at least one) worker threads.
    pub fn start(n: usize) -> std::io::Result<Arc<Workers>> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("tokenrelay-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some(i)));
                    let _ = runtime.block_on(stopped);
                    // Dropping the runtime cancels what still runs here.
                    drop(runtime);
                })?;
            threads.push((stop, thread));
        }
        Ok(Arc::new(Workers {
            handles,
            next: AtomicUsize::new(0),
            threads: Mutex::new(threads),
        }))
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, once started).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `task` on the next worker, round-robin.
    pub(crate) fn spawn<F: Future<Output = ()> + Send + 'static>(&self, task: F) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(task);
    }

    /// Stops every worker, cancelling what still runs there, and waits for
    /// their threads. Call it outside any worker.
    pub fn stop(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for (stop, thread) in threads {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn limits() -> Limits {
        Limits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(1),
        }
    }

    /// Answers with the index of the worker thread that ran the request.
    async fn which_worker(_: Request<Incoming>) -> Response<Body> {
        let index = match current_worker() {
            Some(i) => i.to_string(),
            None => "none".to_owned(),
        };
        Response::new(
            Full::new(Bytes::from(index))
                .map_err(|never| match never {})
                .boxed(),
        )
    }

    #[tokio::test]
    async fn connections_are_spread_over_the_workers_and_each_stays_on_one() {
        let workers = Workers::start(2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            None,
            limits(),
            which_worker,
            Some(workers.clone()),
            stopped,
        ));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            // One keep-alive connection per client, several requests each.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            let mut on = Vec::new();
            for _ in 0..3 {
                let body = client
                    .get(format!("http://{addr}/"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                on.push(body);
            }
            assert!(on.iter().all(|w| *w == on[0]), "a connection moved: {on:?}");
            seen.insert(on[0].clone());
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["0", "1"],
            "round-robin over both workers, never the acceptor's runtime"
        );
        stop.send(true).unwrap();
        server.await.unwrap();
        workers.stop();
    }

    #[tokio::test]
    async fn stopping_the_workers_cancels_what_runs_there() {
        let workers = Workers::start(1).unwrap();
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Flag(dropped.clone());
        workers.spawn(async move {
            let _flag = flag;
            std::future::pending::<()>().await;
        });
        assert!(!dropped.load(Ordering::Acquire));
        workers.stop();
        assert!(
            dropped.load(Ordering::Acquire),
            "the task outlived its worker"
        );
        assert_eq!(workers.len(), 1);
    }
}
