//! Idle connections cost no thread and almost no memory in ringlb.
//!
//! 2000 WebSocket sessions are opened through ringlb, each proven live with
//! one echo, then left idle. ringlb's thread count must not move (no io-wq
//! worker parked per idle socket, which an io_uring splice or blocking read
//! would cause) and its RSS must grow by well under 1 KB per connection.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const N: usize = 2000;

async fn open(
    url: &str,
    n: usize,
) -> Vec<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>>
{
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .expect("connect timed out")
        .expect("connect failed");
        ws.send(Message::Binary(vec![i as u8; 64])).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m, Message::Binary(vec![i as u8; 64]));
        out.push(ws);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cost_no_threads_and_little_memory() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[a.addr, b.addr], "", ""));
    let url = proxy.url("/");

    // Warm-up: allocator arenas and the slab grow in steps; cycle them once
    // so the baseline includes them (the buffer pool is prefaulted at start).
    let warm = open(&url, 100).await;
    drop(warm);
    wait_for(|| a.active() + b.active() == 0).await;

    let threads_before = proxy.status_field("Threads:");
    let rss_before = proxy.status_field("VmRSS:");
    let held = open(&url, N).await;
    assert_eq!(a.active() + b.active(), N);
    // Let anything the kernel would park (io-wq workers) show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let threads_after = proxy.status_field("Threads:");
    let rss_after = proxy.status_field("VmRSS:");
    let per_conn = (rss_after.saturating_sub(rss_before) * 1024) as f64 / N as f64;
    eprintln!(
        "ringlb threads {threads_before} -> {threads_after}; RSS {rss_before} kB -> {rss_after} kB = {per_conn:.0} B per connection ({N} idle)"
    );
    assert_eq!(
        threads_before, threads_after,
        "threads grew with idle connections"
    );
    assert!(
        per_conn < 1024.0,
        "{per_conn:.0} B of RSS per idle connection"
    );

    // Every one of them still relays.
    let mut held = held;
    for (i, ws) in held.iter_mut().enumerate().step_by(97) {
        ws.send(Message::Text(format!("still {i}"))).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m, Message::Text(format!("still {i}")));
    }
}

async fn wait_for(mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
