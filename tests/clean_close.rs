//! The clean close, seen from real WebSocket clients and backends: paced
//! drain (rate, every message then Close 1012, undrain stops it), a
//! fragmented message defers its session's close, the backend gets a valid
//! masked Close 1001, paced SIGTERM.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn with_admin(backends: &[SocketAddr], server_extra: &str, upstream_extra: &str) -> String {
    format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        config(backends, server_extra, upstream_extra)
    )
}

/// A backend that streams `seq N` text messages to every session (one per
/// `period`), counts what it receives, and records the Close codes it
/// gets (tungstenite, as a server, refuses an unmasked frame: a code here
/// came in a valid masked Close).
#[derive(Clone)]
struct Streamer {
    addr: SocketAddr,
    active: Arc<AtomicUsize>,
    closes: Arc<Mutex<Vec<u16>>>,
    /// Sizes of whole messages received (fragments reassembled).
    received: Arc<Mutex<Vec<usize>>>,
}

impl Streamer {
    async fn start(period: Option<Duration>) -> Streamer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Streamer {
            addr: listener.local_addr().unwrap(),
            active: Arc::default(),
            closes: Arc::default(),
            received: Arc::default(),
        };
        let s2 = s.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s2.clone();
                tokio::spawn(async move { s.serve(stream, period).await });
            }
        });
        s
    }

    async fn serve(&self, stream: TcpStream, period: Option<Duration>) {
        let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
            max_message_size: Some(8 << 20),
            max_frame_size: Some(8 << 20),
            ..Default::default()
        };
        let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(cfg)).await else {
            return;
        };
        self.active.fetch_add(1, Ordering::SeqCst);
        let (mut tx, mut rx) = ws.split();
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
        tick.tick().await;
        loop {
            tokio::select! {
                m = rx.next() => match m {
                    Some(Ok(Message::Close(f))) => {
                        self.closes.lock().unwrap().push(f.map_or(1005, |f| u16::from(f.code)));
                    }
                    Some(Ok(Message::Text(t))) => self.received.lock().unwrap().push(t.len()),
                    Some(Ok(Message::Binary(b))) => self.received.lock().unwrap().push(b.len()),
                    Some(Ok(_)) => {}
                    _ => break,
                },
                _ = tick.tick(), if period.is_some() => {
                    if tx.send(Message::Text(format!("seq {seq}"))).await.is_err() {
                        break;
                    }
                    seq += 1;
                }
            }
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
    }

    fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
}

/// What one client saw: when its Close came and with which code, and
/// whether the `seq N` messages before it were whole and in order.
#[derive(Debug)]
struct Seen {
    at: Instant,
    code: Option<u16>,
    messages: u64,
}

/// Reads until the session ends (bounded by `within`); checks that the
/// messages are `seq 0`, `seq 1`, ... with no gap and nothing after Close.
async fn watch(mut ws: Ws, within: Duration) -> Seen {
    let mut next = 0u64;
    let mut close = None;
    let _ = tokio::time::timeout(within, async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    assert!(close.is_none(), "a message after the Close: {t}");
                    assert_eq!(t, format!("seq {next}"), "a message lost or cut");
                    next += 1;
                }
                Ok(Message::Close(f)) => {
                    close = Some((Instant::now(), f.map(|f| u16::from(f.code))));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    let (at, code) = close.unwrap_or((Instant::now(), None));
    Seen {
        at,
        code,
        messages: next,
    }
}

/// Most closes in any 1-second window.
fn max_per_second(mut times: Vec<Instant>) -> usize {
    times.sort();
    let mut best = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while times[i].duration_since(times[j]) >= Duration::from_secs(1) {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

/// Opens `n` sessions (all land on the only backend not draining).
async fn open(proxy: &Proxy, n: usize) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(connect(&proxy.url("/")).await);
    }
    out
}

fn status(proxy: &Proxy) -> serde_json::Value {
    let (code, body) = proxy.admin("GET", "/status");
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

/// 200 sessions drained at 50/s: their Close frames span about 4 s, no
/// second holds more than 1.5 x the rate, every client got an unbroken run
/// of the backend's messages and then Close 1012, the backend got Close
/// 1001 on every session, and the metrics and /status say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_drain_keeps_the_rate_and_every_message() {
    const N: usize = 200;
    let a = Streamer::start(Some(Duration::from_millis(100))).await;
    let proxy = Proxy::start(&with_admin(&[a.addr], "", ""));
    let clients = open(&proxy, N).await;
    wait_until("all sessions on the backend", || a.active() == N).await;
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|ws| tokio::spawn(watch(ws, Duration::from_secs(20))))
        .collect();
    // Let some messages flow first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let (code, body) = proxy.admin(
        "POST",
        &format!("/backends/u/{}/drain?close_rate=50", a.addr),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"close_rate\":50"), "{body}");
    // Progress is visible while it runs.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let st = status(&proxy);
    let b = &st["upstreams"][0]["backends"][0];
    assert_eq!(b["close_rate"], 50, "{st}");
    let moved = b["sessions_closed"]["drain"].as_u64().unwrap();
    assert!(
        (20..=90).contains(&moved),
        "after 1 s: {moved} closed; {st}"
    );
    let mut seen = Vec::new();
    for w in watchers {
        seen.push(w.await.unwrap());
    }
    for s in &seen {
        assert_eq!(s.code, Some(1012), "{s:?}");
        assert!(s.messages >= 2, "the stream ran before the close: {s:?}");
    }
    let times: Vec<Instant> = seen.iter().map(|s| s.at).collect();
    let last = times.iter().max().unwrap().duration_since(t0);
    let first = times.iter().min().unwrap().duration_since(t0);
    let span = last - first;
    assert!(
        span >= Duration::from_millis(3300) && span <= Duration::from_millis(5500),
        "200 closes at 50/s took {span:?}"
    );
    let peak = max_per_second(times);
    assert!(peak <= 75, "{peak} closes in one second (rate 50)");
    wait_until("the backend saw every Close 1001", || {
        let c = a.closes.lock().unwrap();
        c.len() == N && c.iter().all(|c| *c == 1001)
    })
    .await;
    // At zero the paced drain ends by itself; the backend stays drained.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = status(&proxy);
        let b = &st["upstreams"][0]["backends"][0];
        if b["close_rate"] == 0 {
            assert_eq!(b["state"], "draining", "{st}");
            assert_eq!(b["active"], 0, "{st}");
            assert_eq!(st["clean_close_fallbacks"]["fin"], 0, "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = proxy.admin("GET", "/metrics");
    let line = format!(
        "ringlb_sessions_closed_total{{upstream=\"u\",backend=\"{}\",reason=\"drain\"}} {N}",
        a.addr
    );
    assert!(metrics.contains(&line), "{metrics}");
    proxy.wait_log("paced drain done", Duration::from_secs(5));
}

/// Undrain stops the closes at once: sessions not yet closed stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undrain_during_a_paced_drain_stops_the_closes() {
    const N: usize = 100;
    let a = Streamer::start(None).await;
    let proxy = Proxy::start(&with_admin(&[a.addr], "", ""));
    let clients = open(&proxy, N).await;
    wait_until("all sessions on the backend", || a.active() == N).await;
    let closed = Arc::new(AtomicUsize::new(0));
    let mut keep = Vec::new();
    for ws in clients {
        let closed = closed.clone();
        keep.push(tokio::spawn(async move {
            let s = watch(ws, Duration::from_secs(4)).await;
            if s.code.is_some() {
                closed.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let path = format!("/backends/u/{}/drain?close_rate=20", a.addr);
    assert_eq!(proxy.admin("POST", &path).0, 200);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        proxy
            .admin("POST", &format!("/backends/u/{}/undrain", a.addr))
            .0,
        200
    );
    let at_undrain = closed.load(Ordering::SeqCst);
    assert!(
        (8..=40).contains(&at_undrain),
        "{at_undrain} closed in 1 s at 20/s"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = closed.load(Ordering::SeqCst);
    // A close already asked for may still land; nothing new starts.
    assert!(later <= at_undrain + 2, "{at_undrain} then {later}");
    assert_eq!(a.active(), N - later);
    let st = status(&proxy);
    assert_eq!(st["upstreams"][0]["backends"][0]["close_rate"], 0, "{st}");
    assert_eq!(st["upstreams"][0]["backends"][0]["state"], "up", "{st}");
    for k in keep {
        k.await.unwrap();
    }
}

/// A masked client frame header (FIN and opcode in `b0`) for `len` bytes.
fn header(b0: u8, len: usize, mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![b0];
    match len {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f
}

fn masked_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [9, 8, 7, 6];
    let mut f = header(b0, payload.len(), mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads frames from ringlb (unmasked, server to client) until a Close;
/// returns its code. Bounded by `within`; `None` if none came.
async fn read_close(s: &mut TcpStream, within: Duration) -> Option<u16> {
    tokio::time::timeout(within, async {
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.ok()?;
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    s.read_exact(&mut b).await.ok()?;
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    s.read_exact(&mut b).await.ok()?;
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            assert_eq!(h[1] & 0x80, 0, "a server frame is never masked");
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.ok()?;
            if h[0] & 0x0f == 8 {
                assert_eq!(h[0], 0x88, "Close: FIN, no RSV bit");
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// A 2 MiB message sent in 512 KiB fragments, with a ping between two of
/// them, is in flight when the drain asks for the close: the session is
/// closed only after its last fragment, the backend gets the whole message
/// and then a valid masked Close 1001, the client gets Close 1012. Both
/// with the fragments spliced (the default splice_min) and through buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_defers_the_close_until_it_is_complete() {
    for (extra, spliced) in [("", true), ("splice_min = 0", false)] {
        fragmented_message_then_close(extra, spliced).await;
    }
}

async fn fragmented_message_then_close(server_extra: &str, spliced: bool) {
    let a = Streamer::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let proxy = Proxy::start(&format!(
        "{}\n[log]\naccess = \"{}\"\n",
        with_admin(&[a.addr], server_extra, ""),
        log.display()
    ));
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101);
    wait_until("session on the backend", || a.active() == 1).await;
    let part = vec![b'x'; 512 * 1024];
    s.write_all(&masked_frame(0x02, &part)).await.unwrap(); // binary, no FIN
    s.write_all(&masked_frame(0x89, b"ping")).await.unwrap();
    s.write_all(&masked_frame(0x00, &part)).await.unwrap();
    let path = format!("/backends/u/{}/drain?close_rate=100", a.addr);
    assert_eq!(proxy.admin("POST", &path).0, 200);
    // Mid-message: no Close for a while (the pacing sweep runs every 20 ms).
    assert_eq!(read_close(&mut s, Duration::from_millis(600)).await, None);
    assert!(a.closes.lock().unwrap().is_empty());
    s.write_all(&masked_frame(0x00, &part)).await.unwrap();
    s.write_all(&masked_frame(0x80, &part)).await.unwrap(); // the last, FIN
    assert_eq!(
        read_close(&mut s, Duration::from_secs(10)).await,
        Some(1012)
    );
    wait_until("the backend got the message and then Close 1001", || {
        a.closes.lock().unwrap().as_slice() == [1001]
    })
    .await;
    assert_eq!(a.received.lock().unwrap().as_slice(), [2 * 1024 * 1024]);
    let (_, metrics) = proxy.admin("GET", "/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("ringlb_bytes_spliced_total "))
        .unwrap();
    assert_eq!(!line.ends_with(" 0"), spliced, "{line}");
    let st = status(&proxy);
    assert_eq!(st["clean_close_fallbacks"]["frame"], 0, "{st}");
    assert_eq!(st["clean_close_fallbacks"]["fin"], 0, "{st}");
    // The access log line says why and how it was closed.
    drop(s);
    wait_until("the session's access log line", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"closed_by\""))
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["closed_by"], "drain", "{line}");
    assert_eq!(line["close"], "message", "{line}");
}

/// A message that never ends: after close_boundary_timeout the close
/// comes at the next frame boundary, and is counted as a fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_boundary_falls_back_to_a_frame_boundary() {
    let a = Streamer::start(None).await;
    let proxy = Proxy::start(&with_admin(
        &[a.addr],
        "close_boundary_timeout = \"300ms\"",
        "",
    ));
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(status_of(&read_head(&mut s).await), 101);
    wait_until("session on the backend", || a.active() == 1).await;
    s.write_all(&masked_frame(0x01, b"never ends"))
        .await
        .unwrap();
    let path = format!("/backends/u/{}/drain?close_rate=100", a.addr);
    assert_eq!(proxy.admin("POST", &path).0, 200);
    let t = Instant::now();
    assert_eq!(
        read_close(&mut s, Duration::from_secs(10)).await,
        Some(1012)
    );
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    // Counted when the session ends (the peers close after the Close).
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status(&proxy);
        if st["clean_close_fallbacks"]["frame"] == 1 {
            assert_eq!(st["sessions_closed"]["drain"], 1, "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// server.drain_close_rate: on SIGTERM sessions close at that rate from
/// the start, each with Close 1012, and the process exits when the last
/// one is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_sigterm_closes_at_the_rate_then_exits() {
    const N: usize = 100;
    let a = Streamer::start(Some(Duration::from_millis(200))).await;
    let mut proxy = Proxy::start(&with_admin(&[a.addr], "drain_close_rate = 50", ""));
    let clients = open(&proxy, N).await;
    wait_until("all sessions on the backend", || a.active() == N).await;
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|ws| tokio::spawn(watch(ws, Duration::from_secs(15))))
        .collect();
    let t0 = Instant::now();
    proxy.signal("TERM");
    let mut seen = Vec::new();
    for w in watchers {
        seen.push(w.await.unwrap());
    }
    assert!(seen.iter().all(|s| s.code == Some(1012)), "{seen:?}");
    let times: Vec<Instant> = seen.iter().map(|s| s.at).collect();
    let last = times.iter().max().unwrap().duration_since(t0);
    assert!(
        last >= Duration::from_millis(1500) && last <= Duration::from_millis(3500),
        "100 closes at 50/s ended after {last:?}"
    );
    assert!(max_per_second(times) <= 75);
    let st = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit after the last session");
    assert!(st.success(), "{st:?}");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
}

/// A child process whose stdout lines are read on a thread; killed by PID
/// on drop.
struct Peer {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Peer {
    fn spawn(args: &[&str]) -> Peer {
        // Debian's python3, which has python3-websockets (.ci/run installs it).
        let mut child = std::process::Command::new("/usr/bin/python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/deflate_peer.py"
            ))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn /usr/bin/python3 (apt-get install python3-websockets)");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Peer { child, lines }
    }

    /// The next line starting with `prefix` (bounded: 20 s).
    fn expect(&self, prefix: &str) -> String {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no line starting with {prefix:?}"));
            if let Some(rest) = l.strip_prefix(prefix) {
                return rest.trim().to_string();
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// permessage-deflate negotiated end to end (Python `websockets` on both
/// ends): the compressed messages arrive intact, the drain's Close frames
/// (control frames carry no RSV1 bit) are taken by both: 1012 at the
/// client, 1001 at the backend, with no protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permessage_deflate_sessions_close_cleanly() {
    let server = Peer::spawn(&["server"]);
    let port: u16 = server.expect("listening").parse().unwrap();
    let backend: SocketAddr = ([127, 0, 0, 1], port).into();
    let proxy = Proxy::start(&with_admin(&[backend], "", ""));
    let client = Peer::spawn(&["client", &proxy.url("/"), "20"]);
    assert_eq!(client.expect("ready"), "permessage-deflate");
    let path = format!("/backends/u/{backend}/drain?close_rate=10");
    assert_eq!(proxy.admin("POST", &path).0, 200);
    assert_eq!(client.expect("client-close"), "1012 20");
    assert_eq!(server.expect("backend-close"), "1001 permessage-deflate");
}
