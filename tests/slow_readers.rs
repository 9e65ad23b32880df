//! Clients that stop reading while their backends flood them must not hold
//! the shard's shared buffer pool hostage: sessions beside them on the same
//! shard keep moving, ringlb's memory stays bounded, and a peer that takes
//! nothing for `stalled_peer_timeout` while bytes wait for it is closed.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A WebSocket backend that floods every session with 4 KiB binary frames
/// for as long as it can write (bounded: 20 s per session).
async fn flooding_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                if s.write_all(switching_protocols().as_bytes()).await.is_err() {
                    return;
                }
                let mut frame = vec![0x82u8, 126];
                frame.extend_from_slice(&4096u16.to_be_bytes());
                frame.extend(std::iter::repeat_n(0x5au8, 4096));
                let end = tokio::time::Instant::now() + Duration::from_secs(20);
                while tokio::time::Instant::now() < end {
                    match tokio::time::timeout_at(end, s.write_all(&frame)).await {
                        Ok(Ok(())) => {}
                        _ => break,
                    }
                }
                // Hold the session until ringlb or the test ends it.
                let mut sink = [0u8; 512];
                let _ = tokio::time::timeout(Duration::from_secs(20), s.read(&mut sink)).await;
            });
        }
    });
    addr
}

/// A client that upgrades and then never reads again; its receive buffer is
/// small so the flood backs up into ringlb quickly.
async fn non_reader(proxy: &Proxy) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(proxy.addr()).await.unwrap();
    s.write_all(upgrade_request("/flood", "").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    if head.is_empty() {
        let (_, m) = proxy.admin("GET", "/metrics");
        let m: Vec<&str> = m
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.contains("buffer") || l.contains("unpinned") || l.contains("active"))
            })
            .collect();
        panic!("no answer to an upgrade within 10 s: {m:#?}");
    }
    assert_eq!(status_of(&head), 101, "{}", String::from_utf8_lossy(&head));
    s
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Round trips on an echo session; each must come back within 5 s.
async fn echo_times(ws: &mut Ws, n: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), echo(ws, &format!("ping {i}")))
            .await
            .unwrap_or_else(|_| panic!("echo {i} took over 5 s: the shard is stalled"));
        times.push(t.elapsed());
    }
    times
}

fn pool_config(flood: SocketAddr, echo: SocketAddr, extra: &str) -> String {
    // 64 buffers, 8 per direction: 8 stalled directions pin the whole pool.
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\nbuffer_size = 4096\nbuffers_per_shard = 64\nmax_buffers_per_direction = 8\n{extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\npath = \"/flood\"\nupstream = \"f\"\n[[route]]\npath = \"/\"\nupstream = \"e\"\n[upstream.f]\nservers = [{{ addr = \"{flood}\" }}]\n[upstream.e]\nservers = [{{ addr = \"{echo}\" }}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_readers_do_not_stall_their_shard() {
    let flood = flooding_backend().await;
    let echo_backend = Backend::start().await;
    let proxy = Proxy::start(&pool_config(flood, echo_backend.addr, ""));
    let mut ws = connect(&proxy.url("/")).await;
    let mut calm = echo_times(&mut ws, 200).await;
    let calm_p99 = percentile(&mut calm, 0.99);
    let rss_before = proxy.status_field("VmRSS:");

    // 4x the number of stalled directions that pin the pool.
    let mut readers = Vec::new();
    for _ in 0..32 {
        readers.push(non_reader(&proxy).await);
    }
    // Let every flood back up into ringlb.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut loaded = echo_times(&mut ws, 200).await;
    let loaded_p99 = percentile(&mut loaded, 0.99);
    let rss_after = proxy.status_field("VmRSS:");
    eprintln!(
        "echo p99: {calm_p99:?} calm, {loaded_p99:?} beside 32 non-readers; RSS {rss_before} -> {rss_after} kB"
    );
    assert!(
        loaded_p99 <= (calm_p99 * 5).max(Duration::from_millis(25)),
        "echo p99 {loaded_p99:?} against {calm_p99:?} unloaded"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} kB to {rss_after} kB"
    );
    // A new session on the same shard still gets through its handshake.
    let mut ws2 = connect(&proxy.url("/")).await;
    echo(&mut ws2, "new session").await;
    drop(readers);
}

/// A peer that takes nothing while bytes wait for it is closed after
/// `stalled_peer_timeout`, logged with that reason; a silent session with
/// nothing pending is never cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_is_closed_and_a_silent_one_is_not() {
    let flood = flooding_backend().await;
    let echo_backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let toml = format!(
        "{}\n[log]\naccess = \"{}\"\n",
        pool_config(flood, echo_backend.addr, "stalled_peer_timeout = \"1s\""),
        log.display()
    );
    let proxy = Proxy::start(&toml);
    let mut silent = connect(&proxy.url("/")).await;
    echo(&mut silent, "before").await;
    let mut stuck = non_reader(&proxy).await;
    // Not reading: the flood backs up and then nothing moves towards it.
    wait_until("the access log names the reason", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"closed_by\":\"stalled_peer\""))
    })
    .await;
    // Draining it now finds the end: what was in flight, then EOF or reset.
    let mut sink = vec![0u8; 64 * 1024];
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stuck.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the stalled client was not closed");
    // The silent session, idle all this time, still works.
    echo(&mut silent, "after").await;
    let (status, metrics) = proxy.admin("GET", "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!(
            "ringlb_sessions_closed_total{{upstream=\"f\",backend=\"{flood}\",reason=\"stalled_peer\"}} 1"
        )),
        "{metrics}"
    );
}
