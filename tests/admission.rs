//! Admission control for reconnect storms: backends see at most the
//! configured rate of new sessions however many clients arrive at once, the
//! refused get 503 with a Retry-After spread over [1, retry_after_max], and
//! one address cannot hold more than max_connections_per_ip.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

fn config_with(backend: SocketAddr, server_extra: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n{server_extra}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\n\n[upstream.u]\nservers = [{{ addr = \"{backend}\" }}]\n"
    )
}

async fn upgrade_from(proxy: SocketAddr, source: &str) -> (TcpStream, String) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(proxy).await.unwrap();
    s.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    let head = String::from_utf8_lossy(&read_head(&mut s).await).to_string();
    (s, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_upgrades_at_once_meet_the_budget() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config_with(
        b.addr,
        "max_handshakes_per_second = 100\nhandshake_burst = 50\nretry_after_max = \"5s\"",
    ));
    let addr = proxy.addr();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(upgrade_request("/", "").as_bytes())
                    .await
                    .unwrap();
                let head = String::from_utf8_lossy(&read_head(&mut s).await).to_string();
                (s, head)
            })
        })
        .collect();
    let mut held = Vec::new();
    let (mut ok, mut busy) = (0usize, 0usize);
    for t in tasks {
        let (s, head) = t.await.unwrap();
        match status_of(head.as_bytes()) {
            101 => {
                ok += 1;
                held.push(s);
            }
            503 => {
                busy += 1;
                let secs: u32 = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Retry-After: "))
                    .expect("a 503 over the budget says when to come back")
                    .trim()
                    .parse()
                    .unwrap();
                assert!((1..=5).contains(&secs), "Retry-After: {secs}");
            }
            other => panic!("unexpected {other}: {head}"),
        }
    }
    let took = t0.elapsed().as_secs_f64();
    eprintln!("{ok} upgrades passed, {busy} refused, in {took:.2} s");
    // Burst plus the rate over the time it took, and a little slack for
    // the clocks of two shards.
    assert!(
        ok as f64 <= 50.0 + 100.0 * took + 5.0,
        "{ok} sessions reached the backend in {took:.2} s"
    );
    assert!(busy > 0 && ok >= 50, "{ok} passed, {busy} refused");
    assert_eq!(ok + busy, 1000);
    let (_, metrics) = proxy.admin("GET", "/metrics");
    assert!(
        metrics.contains(&format!(
            "ringlb_admission_rejected_total{{reason=\"rate\"}} {busy}"
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_address_over_its_cap_is_refused() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config_with(b.addr, "max_connections_per_ip = 3"));
    let mut from_2 = Vec::new();
    for _ in 0..3 {
        let (s, head) = upgrade_from(proxy.addr(), "127.0.0.2").await;
        assert_eq!(status_of(head.as_bytes()), 101);
        from_2.push(s);
    }
    let (_s, head) = upgrade_from(proxy.addr(), "127.0.0.2").await;
    assert_eq!(status_of(head.as_bytes()), 429, "{head}");
    let (_other, head) = upgrade_from(proxy.addr(), "127.0.0.3").await;
    assert_eq!(
        status_of(head.as_bytes()),
        101,
        "another address is not limited"
    );
    // A session from 127.0.0.2 ends: its place is free again.
    drop(from_2.pop());
    let mut again = None;
    for _ in 0..100 {
        let (s, head) = upgrade_from(proxy.addr(), "127.0.0.2").await;
        if status_of(head.as_bytes()) == 101 {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        again.is_some(),
        "the cap was not released when a session ended"
    );
    let (_, metrics) = proxy.admin("GET", "/metrics");
    assert!(
        metrics.contains("ringlb_admission_rejected_total{reason=\"per_ip\"}"),
        "{metrics}"
    );
}
