//! Rebalancing after scale-out, with real WebSocket clients that reconnect
//! when closed (as real apps do): 300 sessions on backends A and B, then C
//! added by a reload. With `rebalance` on, sessions move at the configured
//! rate until all three hold 100 ± 25; with it off, nothing moves.

mod common;
#[path = "common/dns.rs"]
mod dns_server;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

const N: usize = 300;

/// When each Close came, and its code.
type Closes = Arc<Mutex<Vec<(Instant, Option<u16>)>>>;

fn toml(backends: &[SocketAddr], rebalance: &str) -> String {
    format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        config(backends, "", rebalance)
    )
}

/// A client that stays connected and reconnects (at most 5 times) when
/// ringlb closes it; records the time and code of every Close it gets.
fn client(url: String, closes: Closes, until: Instant) {
    tokio::spawn(async move {
        for _ in 0..6 {
            let Ok(Ok((mut ws, _))) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(&url),
            )
            .await
            else {
                return;
            };
            let left = until.saturating_duration_since(Instant::now());
            let closed = tokio::time::timeout(left, async {
                while let Some(m) = ws.next().await {
                    match m {
                        Ok(Message::Close(f)) => {
                            closes
                                .lock()
                                .unwrap()
                                .push((Instant::now(), f.map(|f| u16::from(f.code))));
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            })
            .await;
            if closed.is_err() {
                return; // the test is over
            }
        }
    });
}

struct Fleet {
    backends: Vec<Backend>,
    proxy: Proxy,
    closes: Closes,
}

/// 300 clients on A and B, then C added by a reload.
async fn scale_out(rebalance: &str) -> Fleet {
    let backends = vec![
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let proxy = Proxy::start(&toml(&[backends[0].addr, backends[1].addr], rebalance));
    let closes = Arc::new(Mutex::new(Vec::new()));
    let until = Instant::now() + Duration::from_secs(40);
    for _ in 0..N {
        client(proxy.url("/"), closes.clone(), until);
    }
    wait_until("300 sessions on A and B", || {
        backends[0].active() + backends[1].active() == N
    })
    .await;
    let (a, b) = (backends[0].active(), backends[1].active());
    assert!(a.abs_diff(b) <= 2, "least connections: {a} and {b}");
    let all: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    std::fs::write(&proxy.config_path, toml(&all, rebalance)).unwrap();
    proxy.signal("HUP");
    proxy.wait_log("reloaded", Duration::from_secs(10));
    Fleet {
        backends,
        proxy,
        closes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_rebalances_at_the_rate_until_all_are_within_the_threshold() {
    let t0 = Instant::now();
    let f = scale_out("rebalance = { threshold = 0.25, rate = 50 }").await;
    f.proxy
        .wait_log("rebalancing (1 backend(s) added", Duration::from_secs(5));
    // Converges: each of the three within 100 ± 25, and it says so.
    f.proxy.wait_log("rebalanced", Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let counts: Vec<usize> = f.backends.iter().map(|b| b.active()).collect();
        if counts.iter().sum::<usize>() == N {
            break counts;
        }
        assert!(
            Instant::now() < deadline,
            "clients did not all come back: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for c in &counts {
        assert!((75..=125).contains(c), "{counts:?}");
    }
    let closes = f.closes.lock().unwrap().clone();
    eprintln!(
        "after the rebalance: {counts:?}, {} sessions moved",
        closes.len()
    );
    assert!(closes.iter().all(|c| c.1 == Some(1012)), "{closes:?}");
    // At least C's 75 moved, paced at 50/s (jittered): at most 75 a second.
    assert!(closes.len() >= 75, "{}", closes.len());
    let mut times: Vec<Instant> = closes.iter().map(|c| c.0).collect();
    times.sort();
    let mut j = 0;
    for i in 0..times.len() {
        while times[i] - times[j] >= Duration::from_secs(1) {
            j += 1;
        }
        assert!(i - j < 75, "{} closes in one second", i - j + 1);
    }
    let (_, st) = f.proxy.admin("GET", "/status");
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["upstreams"][0]["rebalancing"], false, "{st}");
    assert_eq!(
        st["sessions_closed"]["rebalance"],
        closes.len() as u64,
        "{st}"
    );
    // On demand, when all are within the threshold: it starts, finds
    // nothing to move and stops, closing nothing.
    let (code, body) = f.proxy.admin("POST", "/upstreams/u/rebalance");
    assert_eq!(code, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.closes.lock().unwrap().len(), closes.len());
    let (_, st) = f.proxy.admin("GET", "/status");
    assert!(st.contains("\"rebalancing\": false"), "{st}");

    // C drained at a rate: its clients reconnect to A and B. Undrained, C
    // starts a rebalance, and sessions come back to it.
    let c = f.backends[2].addr;
    let (code, body) = f
        .proxy
        .admin("POST", &format!("/backends/u/{c}/drain?close_rate=100"));
    assert_eq!(code, 200, "{body}");
    wait_until("C drained, its clients back on A and B", || {
        f.backends[2].active() == 0 && f.backends[0].active() + f.backends[1].active() == N
    })
    .await;
    let (code, _) = f.proxy.admin("POST", &format!("/backends/u/{c}/undrain"));
    assert_eq!(code, 200);
    f.proxy
        .wait_log(&format!("backend {c} undrained"), Duration::from_secs(5));
    wait_until("all three within 100 +- 25 again", || {
        let n: Vec<usize> = f.backends.iter().map(|b| b.active()).collect();
        n.iter().sum::<usize>() == N && n.iter().all(|c| (75..=125).contains(c))
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(45));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rebalance_nothing_moves() {
    let f = scale_out("").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(f.backends[2].active(), 0);
    assert!(f.closes.lock().unwrap().is_empty());
    // On demand, refused with the reason.
    let (code, body) = f.proxy.admin("POST", "/upstreams/u/rebalance");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("rebalance"), "{body}");
}

/// A DNS answer that adds a backend starts a rebalance like a reload does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_answer_that_adds_a_backend_starts_a_rebalance() {
    const M: usize = 60;
    // Three echo backends at one port on 127.0.0.1, .2 and .3, as the pods
    // behind one name are.
    let mut found = None;
    for _ in 0..20 {
        let first = Backend::start().await;
        let port = first.addr.port();
        let free =
            (2..=3).all(|i| std::net::TcpListener::bind((format!("127.0.0.{i}"), port)).is_ok());
        if !free {
            first.kill();
            continue;
        }
        let mut v = vec![first];
        for i in 2..=3 {
            v.push(Backend::start_on(format!("127.0.0.{i}:{port}").parse().unwrap()).await);
        }
        found = Some(v);
        break;
    }
    let b = found.expect("a port free on 127.0.0.1..3");
    let port = b[0].addr.port();
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let dns = dns_server::DnsServer::start();
    dns.set_addrs("pods.test", &[ip("127.0.0.1"), ip("127.0.0.2")], 1);
    let proxy = Proxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\n\n[upstream.u]\nrebalance = {{ threshold = 0.25, rate = 50 }}\nservers = [{{ addr = \"pods.test:{port}\" }}]\n\n[resolver]\nnameservers = [\"{}\"]\nresolve_min_interval = \"100ms\"\n",
        dns.addr
    ));
    wait_until("two backends in /status", || {
        let (_, body) = proxy.admin("GET", "/status");
        let st: serde_json::Value = serde_json::from_str(&body).unwrap();
        st["upstreams"][0]["backends"].as_array().unwrap().len() == 2
    })
    .await;
    let closes: Closes = Arc::default();
    let until = Instant::now() + Duration::from_secs(30);
    for _ in 0..M {
        client(proxy.url("/"), closes.clone(), until);
    }
    wait_until("60 sessions on .1 and .2", || {
        b[0].active() + b[1].active() == M
    })
    .await;
    dns.set_addrs(
        "pods.test",
        &[ip("127.0.0.1"), ip("127.0.0.2"), ip("127.0.0.3")],
        1,
    );
    proxy.wait_log("backends added [127.0.0.3", Duration::from_secs(10));
    proxy.wait_log("rebalancing (1 backend(s) added", Duration::from_secs(5));
    wait_until("all three within 20 +- 5", || {
        let n: Vec<usize> = b.iter().map(|b| b.active()).collect();
        n.iter().sum::<usize>() == M && n.iter().all(|c| (15..=25).contains(c))
    })
    .await;
    let moved = closes.lock().unwrap().len();
    assert!((15..=25).contains(&moved), "{moved} moved");
}
