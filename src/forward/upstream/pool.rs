//! One worker's connections to acquirers, on hyper's connection API.
//!
//! A pool belongs to one worker thread (see [`super::Clients`]), and so do
//! the tasks driving its connections: a request, its connection's task and
//! the pool never leave that thread, and nothing here is contended.
//!
//! - **HTTP/1.1:** a connection serves one request at a time. It is taken
//!   out of the pool for a request and put back by its response body
//!   ([`PooledBody`]) once the body has been read to its end; a body
//!   dropped before its end closes the connection (what is left of the
//!   answer is never read into the next request's).
//! - **HTTP/2** (chosen by ALPN): one connection per acquirer carries
//!   concurrent requests and stays in the pool while it lives.
//!
//! A pooled connection found closed when a request is handed to it gives
//! the request back unsent ([`hyper::client::conn::TrySendError`]), and the
//! request goes to the next connection; the pool counts on this to never
//! send a request twice. Idle connections close after `pool_idle_timeout`
//! (a sweep runs while any are idle), and at most `pool_max_idle_per_host`
//! HTTP/1.1 connections per acquirer are kept idle.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::{ConnectError, Connector, Stream};

/// The longest wait for a pooled HTTP/1.1 connection to finish the
/// exchange its last body ended.
const READY_WAIT: Duration = Duration::from_millis(100);

/// A request to an acquirer.
pub type UpstreamRequest = Request<Full<Bytes>>;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made; nothing was sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A new connection closed before the request was written to it;
    /// nothing was sent.
    #[error("the connection closed before the request was written: {0}")]
    Unsent(hyper::Error),
    /// The exchange failed after the request was handed to the
    /// connection: it may have reached the acquirer.
    #[error(transparent)]
    Exchange(hyper::Error),
}

/// Where a connection goes: the scheme and authority of its requests.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    scheme: Scheme,
    authority: Authority,
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

struct Idle {
    key: Key,
    sender: Sender,
    since: Instant,
}

/// One worker's pool (see the module docs).
pub struct Pool {
    connector: Connector,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
    /// Whether a sweep task is running for `idle`.
    sweeping: AtomicBool,
}

impl Pool {
    pub(super) fn new(connector: Connector, idle_timeout: Duration, max_idle: usize) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `req` (an absolute URI) over a pooled or a new connection.
    pub async fn request(
        self: &Arc<Self>,
        mut req: UpstreamRequest,
    ) -> Result<Response<PooledBody>, SendError> {
        let uri = req.uri().clone();
        let key = match (uri.scheme(), uri.authority()) {
            (Some(s), Some(a)) => Key {
                scheme: s.clone(),
                authority: a.clone(),
            },
            _ => return Err(ConnectError::Refused("not an absolute URI".into()).into()),
        };
        // Pooled connections first. One found closed gives the request
        // back unsent, and the next one is tried.
        while let Some(sender) = self.checkout(&key).await {
            match self.send(&key, sender, req, &uri).await {
                Ok(response) => return Ok(response),
                Err(Failed::Unsent(r, _)) => req = *r,
                Err(Failed::Exchange(e)) => return Err(SendError::Exchange(e)),
            }
        }
        let sender = self.connect(&key, uri.clone()).await?;
        match self.send(&key, sender, req, &uri).await {
            Ok(response) => Ok(response),
            Err(Failed::Unsent(_, e)) => Err(SendError::Unsent(e)),
            Err(Failed::Exchange(e)) => Err(SendError::Exchange(e)),
        }
    }

    /// The most recently idled live connection for `key`, ready for a
    /// request; closed and expired ones met on the way are dropped.
    async fn checkout(&self, key: &Key) -> Option<Sender> {
        loop {
            let found = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let i = idle.iter().rposition(|e| e.key == *key)?;
                if idle[i].sender.is_closed() || now >= idle[i].since + self.idle_timeout {
                    drop(idle.swap_remove(i));
                    continue;
                }
                let entry = &mut idle[i];
                match &entry.sender {
                    Sender::H2(s) => {
                        let s = s.clone();
                        entry.since = now;
                        Sender::H2(s)
                    }
                    Sender::H1(_) => idle.remove(i).sender,
                }
            };
            match found {
                // Put back when its last body was read to the end: the
                // connection is finishing that exchange or already idle.
                // The wait is bounded all the same: a connection that does
                // not come back is closed, never sent on.
                Sender::H1(mut s) => {
                    if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, s.ready()).await {
                        return Some(Sender::H1(s));
                    }
                }
                h2 => return Some(h2),
            }
        }
    }

    /// A new connection to `key`, HTTP/2 if ALPN chose it; its task runs on
    /// this thread's runtime.
    async fn connect(self: &Arc<Self>, key: &Key, uri: Uri) -> Result<Sender, ConnectError> {
        let stream = self.connector.dial(uri).await?;
        if stream.negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(stream)
                .await
                .map_err(|e| ConnectError::Handshake(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            // Shared by the requests that follow while it lives.
            self.put(key.clone(), Sender::H2(sender.clone()));
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::Builder::new()
                .handshake::<Stream, Full<Bytes>>(stream)
                .await
                .map_err(|e| ConnectError::Handshake(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H1(sender))
        }
    }

    async fn send(
        self: &Arc<Self>,
        key: &Key,
        sender: Sender,
        mut req: UpstreamRequest,
        uri: &Uri,
    ) -> Result<Response<PooledBody>, Failed> {
        match sender {
            Sender::H1(mut s) => {
                // What a client sends on its own connection: the Host
                // header and the origin form of the URI.
                if !req.headers().contains_key(header::HOST) {
                    req.headers_mut().insert(header::HOST, host_value(key));
                }
                *req.uri_mut() = Uri::from(
                    uri.path_and_query()
                        .cloned()
                        .unwrap_or_else(|| PathAndQuery::from_static("/")),
                );
                *req.version_mut() = Version::HTTP_11;
                let response = s.try_send_request(req).await.map_err(|e| failed(e, uri))?;
                let (parts, body) = response.into_parts();
                let back = Back {
                    pool: self.clone(),
                    key: key.clone(),
                    sender: s,
                };
                Ok(Response::from_parts(parts, PooledBody::new(body, back)))
            }
            Sender::H2(mut s) => {
                *req.version_mut() = Version::HTTP_2;
                let response = s.try_send_request(req).await.map_err(|e| failed(e, uri))?;
                let (parts, body) = response.into_parts();
                Ok(Response::from_parts(
                    parts,
                    PooledBody {
                        inner: body,
                        back: None,
                    },
                ))
            }
        }
    }

    /// Keeps `sender` for the next request to `key`, within the limits.
    fn put(self: &Arc<Self>, key: Key, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let h1 = matches!(sender, Sender::H1(_));
            if h1
                && idle
                    .iter()
                    .filter(|e| e.key == key && matches!(e.sender, Sender::H1(_)))
                    .count()
                    >= self.max_idle
            {
                return;
            }
            idle.push(Idle {
                key,
                sender,
                since: Instant::now(),
            });
        }
        self.sweep_while_idle();
    }

    /// Starts the task that closes connections idle past the timeout; it
    /// ends when none is left.
    fn sweep_while_idle(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err()
            || self.sweeping.swap(true, Ordering::AcqRel)
        {
            return;
        }
        // Cleared however the task ends, also when its runtime goes away
        // with it: the next connection put back starts a new one.
        struct Sweeping(Weak<Pool>);
        impl Sweeping {
            fn disarm(&mut self) {
                self.0 = Weak::new();
            }
        }
        impl Drop for Sweeping {
            fn drop(&mut self) {
                if let Some(pool) = self.0.upgrade() {
                    pool.sweeping.store(false, Ordering::Release);
                }
            }
        }
        let mut sweeping = Sweeping(Arc::downgrade(self));
        let every = (self.idle_timeout / 2).max(Duration::from_millis(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = sweeping.0.upgrade() else {
                    return;
                };
                let now = Instant::now();
                let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.retain(|e| !e.sender.is_closed() && now < e.since + pool.idle_timeout);
                if idle.is_empty() {
                    // Under the lock: a connection put back after this
                    // sees the flag down and starts the next sweep.
                    pool.sweeping.store(false, Ordering::Release);
                    sweeping.disarm();
                    return;
                }
            }
        });
    }

    /// How many connections are idle (tests).
    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// A failed send: the request back if it was not written (boxed: the
/// rare case should not size the common one).
enum Failed {
    Unsent(Box<UpstreamRequest>, hyper::Error),
    Exchange(hyper::Error),
}

fn failed(mut e: TrySendError<UpstreamRequest>, uri: &Uri) -> Failed {
    match e.take_message() {
        Some(mut req) => {
            *req.uri_mut() = uri.clone();
            Failed::Unsent(Box::new(req), e.into_error())
        }
        None => Failed::Exchange(e.into_error()),
    }
}

/// The Host header for `key`: its authority, without the port when that
/// is the scheme's default (the forward's URIs always carry the port), as
/// a client writes it.
fn host_value(key: &Key) -> HeaderValue {
    let a = &key.authority;
    let default = match key.scheme.as_str() {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    let host = if a.port_u16().is_some() && a.port_u16() == default {
        a.host()
    } else {
        a.as_str()
    };
    // An authority's characters are all allowed in a header value.
    HeaderValue::from_str(host).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// An HTTP/1.1 connection on its way back to the pool.
struct Back {
    pool: Arc<Pool>,
    key: Key,
    sender: http1::SendRequest<Full<Bytes>>,
}

/// An acquirer's response body; read to its end, it puts its HTTP/1.1
/// connection back in the pool.
pub struct PooledBody {
    inner: Incoming,
    back: Option<Back>,
}

impl PooledBody {
    fn new(inner: Incoming, back: Back) -> PooledBody {
        let mut body = PooledBody {
            inner,
            back: Some(back),
        };
        body.give_back_at_end();
        body
    }

    fn give_back_at_end(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }

    fn give_back(&mut self) {
        if let Some(b) = self.back.take() {
            b.pool.put(b.key, Sender::H1(b.sender));
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) => this.give_back_at_end(),
            Poll::Ready(Some(Err(_))) => this.back = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, StreamBody};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{DestScheme, DestinationRule, HostPattern, UpstreamConfig};
    use crate::forward::destination::Resolver;
    use crate::telemetry::Metrics;

    /// How the test acquirer answers.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `ok`, and the connection stays open.
        Ok,
        /// A body that never ends.
        Endless,
        /// `ok`, then the socket is closed with no `connection: close`.
        OkThenClose,
    }

    /// A plain HTTP/1.1 acquirer counting its connections.
    struct Acquirer {
        port: u16,
        accepted: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Acquirer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn acquirer(answer: Answer) -> Acquirer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, closed, requests) = Default::default();
        let (a, c, r): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) = (
            Arc::clone(&accepted),
            Arc::clone(&closed),
            Arc::clone(&requests),
        );
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (c, r) = (c.clone(), r.clone());
                tokio::spawn(async move {
                    let r2 = r.clone();
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        r2.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let body = match answer {
                                Answer::Endless => {
                                    let chunks = futures_util::stream::unfold((), |()| async {
                                        tokio::time::sleep(Duration::from_millis(5)).await;
                                        Some((
                                            Ok::<_, Infallible>(Frame::data(Bytes::from("x"))),
                                            (),
                                        ))
                                    });
                                    StreamBody::new(chunks).boxed()
                                }
                                _ => Full::new(Bytes::from("ok")).map_err(|e| match e {}).boxed(),
                            };
                            Ok::<_, Infallible>(Response::new(body))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    if let Answer::OkThenClose = answer {
                        // Serve one exchange, then drop the socket.
                        loop {
                            tokio::select! {
                                _ = &mut conn => break,
                                _ = tokio::time::sleep(Duration::from_millis(5)) => {
                                    if r.load(Ordering::SeqCst) > 0 {
                                        conn.as_mut().graceful_shutdown();
                                    }
                                }
                            }
                        }
                    } else {
                        let _ = conn.await;
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Acquirer {
            port,
            accepted,
            closed,
            requests,
            task,
        }
    }

    fn pool_for(acq: &Acquirer, idle_timeout: Duration, max_idle: usize) -> Arc<Pool> {
        let rule = DestinationRule {
            host: HostPattern::Exact("127.0.0.1".into()),
            port: acq.port,
            scheme: DestScheme::Http,
            allow_private: true,
            ca_file: None,
            client_cert: None,
            client_key: None,
        };
        let config = UpstreamConfig {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            pool_idle_timeout: idle_timeout,
            pool_max_idle_per_host: max_idle,
        };
        let connector = super::super::connector(
            Arc::from([rule]),
            &config,
            Resolver::new(Duration::from_secs(30)),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        Pool::new(connector, idle_timeout, max_idle)
    }

    fn get(acq: &Acquirer) -> UpstreamRequest {
        Request::get(format!("http://127.0.0.1:{}/pay", acq.port))
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn ok(pool: &Arc<Pool>, acq: &Acquirer) {
        let response = pool.request(get(acq)).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
    }

    /// Polls `cond` for up to 5 s.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what} did not happen within 5 s");
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection() {
        let acq = acquirer(Answer::Ok).await;
        let pool = pool_for(&acq, Duration::from_secs(30), 8);
        for _ in 0..5 {
            ok(&pool, &acq).await;
        }
        assert_eq!(acq.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(acq.requests.load(Ordering::SeqCst), 5);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let acq = acquirer(Answer::Endless).await;
        let pool = pool_for(&acq, Duration::from_secs(30), 8);
        let mut body = pool.request(get(&acq)).await.unwrap().into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        drop(body);
        assert_eq!(pool.idle_count(), 0, "a half-read connection was pooled");
        eventually("the acquirer seeing the connection closed", || {
            acq.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        let body = pool.request(get(&acq)).await.unwrap().into_body();
        drop(body);
        assert_eq!(acq.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_acquirer_closed_is_not_sent_on() {
        let acq = acquirer(Answer::OkThenClose).await;
        let pool = pool_for(&acq, Duration::from_secs(30), 8);
        ok(&pool, &acq).await;
        assert_eq!(pool.idle_count(), 1);
        eventually("the acquirer closing the connection", || {
            acq.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        // The pooled connection's task sees the end of its socket.
        let idle_closed = || {
            pool.idle
                .lock()
                .unwrap()
                .iter()
                .all(|e| e.sender.is_closed())
        };
        eventually("the pool seeing its connection closed", idle_closed).await;
        ok(&pool, &acq).await;
        assert_eq!(acq.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(acq.requests.load(Ordering::SeqCst), 2, "one request each");
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let acq = acquirer(Answer::Ok).await;
        let pool = pool_for(&acq, Duration::from_millis(100), 8);
        ok(&pool, &acq).await;
        assert_eq!(pool.idle_count(), 1);
        eventually("the idle connection closing", || {
            acq.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(pool.idle_count(), 0);
        // The sweep ended with the pool empty, and starts again.
        ok(&pool, &acq).await;
        eventually("the second idle connection closing", || {
            acq.closed.load(Ordering::SeqCst) == 2
        })
        .await;
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept_per_acquirer() {
        let acq = acquirer(Answer::Ok).await;
        let pool = pool_for(&acq, Duration::from_secs(30), 2);
        // Four exchanges at once need four connections.
        let responses = futures_util::future::join_all((0..4).map(|_| pool.request(get(&acq))));
        let bodies: Vec<_> = responses
            .await
            .into_iter()
            .map(|r| r.unwrap().into_body())
            .collect();
        assert_eq!(acq.accepted.load(Ordering::SeqCst), 4);
        for b in bodies {
            assert_eq!(b.collect().await.unwrap().to_bytes(), "ok");
        }
        assert_eq!(pool.idle_count(), 2);
        eventually("the two connections over the limit closing", || {
            acq.closed.load(Ordering::SeqCst) == 2
        })
        .await;
    }

    #[test]
    fn a_sweep_that_died_with_its_runtime_does_not_stop_the_next() {
        let lasting = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let acq = lasting.block_on(acquirer(Answer::Ok));
        let pool = pool_for(&acq, Duration::from_millis(100), 8);
        // A runtime that goes away with the sweep it started (and the
        // connection's task).
        let short = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        short.block_on(ok(&pool, &acq));
        assert_eq!(pool.idle_count(), 1);
        drop(short);
        lasting.block_on(async {
            eventually("the first connection closing", || {
                acq.closed.load(Ordering::SeqCst) == 1
            })
            .await;
            ok(&pool, &acq).await;
            eventually("the second connection closing when idle", || {
                acq.closed.load(Ordering::SeqCst) == 2
            })
            .await;
        });
        assert_eq!(pool.idle_count(), 0);
    }

    #[test]
    fn the_host_header_leaves_out_only_the_schemes_default_port() {
        let host = |uri: &str| {
            let uri: Uri = uri.parse().unwrap();
            let key = Key {
                scheme: uri.scheme().unwrap().clone(),
                authority: uri.authority().unwrap().clone(),
            };
            host_value(&key)
        };
        assert_eq!(host("https://acq.example:443/pay"), "acq.example");
        assert_eq!(host("https://acq.example:8443/pay"), "acq.example:8443");
        assert_eq!(host("https://[::1]:443/pay"), "[::1]");
        assert_eq!(host("https://[::1]:8443/pay"), "[::1]:8443");
        assert_eq!(host("http://127.0.0.1:80/pay"), "127.0.0.1");
        assert_eq!(host("http://127.0.0.1:443/pay"), "127.0.0.1:443");
        assert_eq!(host("https://acq.example/pay"), "acq.example");
    }
}
