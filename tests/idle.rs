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

fn metric(proxy: &Proxy, name: &str) -> u64 {
    let (status, body) = proxy.admin("GET", "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
        .parse()
        .unwrap()
}

/// Silent sessions are parked (recvs swapped for readiness polls) and wake
/// up for data both ways, for a close, and park again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sessions_are_parked_and_wake_for_data_and_close() {
    let backend = Backend::start().await;
    let proxy = Proxy::start(&format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        config(&[backend.addr], "park_idle_after = \"150ms\"", "")
    ));
    let mut sessions = open(&proxy.url("/"), 20).await;
    wait_for(|| metric(&proxy, "ringlb_sessions_parked_total") >= 20).await;

    // Data wakes the client side, the echo wakes the backend side.
    for (i, ws) in sessions.iter_mut().enumerate() {
        echo(ws, &format!("after parking {i}")).await;
    }
    // Silent again: parked again.
    wait_for(|| metric(&proxy, "ringlb_sessions_parked_total") >= 40).await;
    echo(&mut sessions[0], "twice parked").await;

    // A close from a parked client reaches the backend.
    wait_for(|| metric(&proxy, "ringlb_sessions_parked_total") >= 41).await;
    let mut ws = sessions.pop().unwrap();
    ws.close(None).await.unwrap();
    while let Some(Ok(m)) = ws.next().await {
        if m.is_close() {
            break;
        }
    }
    wait_for(|| backend.active() == 19).await;
    // And a backend that goes away wakes its parked sessions, which end.
    backend.kill();
    for mut ws in sessions {
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ws.next().await {
                    Some(Ok(m)) if !m.is_close() => continue,
                    _ => return,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a parked session outlived its backend");
    }
}
