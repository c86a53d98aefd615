#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test
//! Connections that send nothing cannot hold the listener (issue 15): a
//! timer from accept for HTTP/1 and HTTP/2 alike, and a full cap makes room
//! by closing the oldest idle connection.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokenrelay::config::ComplianceLevel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (EOF or reset); returns
/// whatever it sent first.
async fn until_closed(mut tcp: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn five_thousand_silent_connections_do_not_stop_a_payment() {
    let acq = Acquirer::start().await;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule()];
    // Long enough that no timer can be what frees a slot here: only the
    // cap's eviction of idle connections can.
    c.header_read_timeout = Duration::from_secs(120);
    c.idle_timeout = Duration::from_secs(120);
    assert_eq!(c.max_connections, 4096);
    let s = TestServer::start(c).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap().to_owned();
    let r = s.reference(&id).await;

    let mut silent = Vec::with_capacity(5_000);
    for _ in 0..5_000 {
        silent.push(TcpStream::connect(s.addr).await.unwrap());
    }
    // A fresh connection, as a new merchant process would open.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        fresh
            .post(s.url(&format!("/api/network/tokens/{id}/forward")))
            .header("x-api-key", KEY)
            .header("x-cryptogram-reference", &r)
            .header("x-destination-url", acq.url("/pay"))
            .body("n=<< number >>")
            .send(),
    )
    .await
    .expect("a payment waited behind silent connections")
    .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 200);
    assert_eq!(acq.count(), 1);
    eprintln!("forward served in {took:?} with 5,000 silent connections open");
    // The silent ones are still ours to hold; the oldest were closed.
    assert_eq!(silent.len(), 5_000);
    let first = silent.swap_remove(0);
    let closed = tokio::time::timeout(Duration::from_secs(30), until_closed(first)).await;
    assert!(
        closed.is_ok(),
        "the oldest silent connection was not closed"
    );
    drop(silent);
    s.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_from_accept_http1_and_http2() {
    let mut c = config(ComplianceLevel::SaqD);
    c.header_read_timeout = Duration::from_millis(300);
    c.idle_timeout = Duration::from_millis(300);
    let s = TestServer::start(c).await;

    // No byte at all.
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), until_closed(tcp))
        .await
        .expect("a connection that sent nothing stayed open");
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{got:?}"
    );

    // One byte: still before the version is known.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"P").await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), until_closed(tcp))
        .await
        .expect("a connection stuck in version detection stayed open");

    // HTTP/2 preface and settings, then no request.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), until_closed(tcp))
        .await
        .expect("an HTTP/2 connection with no stream stayed open");
    assert!(!got.is_empty(), "the server spoke HTTP/2 first");

    // HTTP/1 keep-alive: served, then closed once idle.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GET /api/network/tokens/x HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), until_closed(tcp))
        .await
        .expect("an idle keep-alive connection stayed open");
    assert!(
        got.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // The listener still serves.
    let resp = s
        .req(reqwest::Method::GET, "/api/network/tokens/x")
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "token_not_found").await;
    s.stop().await;
}

#[tokio::test]
async fn a_slow_request_in_flight_is_not_cut_by_the_idle_timer() {
    // The acquirer takes longer than the idle timeout to answer: the
    // merchant's connection has a request in flight and stays open.
    let acq = Acquirer::with(std::sync::Arc::new(|_r| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(900)).await;
            full(200, "{}")
        })
    }))
    .await;
    let mut c = config(ComplianceLevel::SaqD);
    c.destinations = vec![acq.rule()];
    c.header_read_timeout = Duration::from_millis(200);
    c.idle_timeout = Duration::from_millis(200);
    let s = TestServer::start(c).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap().to_owned();
    let r = s.reference(&id).await;
    let resp = s
        .forward(&id, &r, &acq.url("/slow"))
        .body("n=<< number >>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "{}");
    s.stop().await;
}
