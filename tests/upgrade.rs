//! Binary upgrade with live hand-off: ringlb (a child process) is told to
//! upgrade while thousands of WebSocket sessions relay patterned bytes both
//! ways; every byte must arrive once, in order, at every offset, through the
//! new process. The clients and backends are raw sockets in this process:
//! a frame parser checks each payload byte against a pattern of its offset,
//! so a byte lost, doubled or reordered anywhere shows.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex as AMutex, Notify};

/// The payload byte at `off` of a direction seeded `seed`: different at
/// every offset within 256, and across 256-byte and 64 KiB steps, so a
/// shifted stream cannot match.
fn pat(seed: u64, off: u64) -> u8 {
    (off as u8)
        ^ ((off >> 8) as u8).wrapping_mul(31)
        ^ ((off >> 16) as u8).wrapping_mul(17)
        ^ (seed as u8).wrapping_mul(101)
}

/// One direction's ledger.
#[derive(Default)]
struct Dir {
    /// Payload bytes the writer has committed to send.
    sent: AtomicU64,
    /// Payload bytes the reader checked.
    checked: AtomicU64,
    /// First wrong offset + 1 (0: none).
    bad_at: AtomicU64,
    /// The reader saw EOF or an error.
    ended: AtomicBool,
}

struct Session {
    id: u64,
    c2b: Dir,
    b2c: Dir,
    client_w: AMutex<Option<Writer>>,
    backend_w: AMutex<Option<Writer>>,
    /// The client reads only once opened (a slow reader before that).
    gate: Notify,
    gated: bool,
}

impl Session {
    fn seeds(&self) -> (u64, u64) {
        (self.id * 2, self.id * 2 + 1)
    }
}

/// Writes frames with patterned payloads; one frame may be written in parts.
struct Writer {
    w: OwnedWriteHalf,
    seed: u64,
    off: u64,
    masked: bool,
    left_in_frame: u64,
    /// `off` where the current frame's payload began.
    frame_start: u64,
}

impl Writer {
    async fn begin(&mut self, len: u64) -> std::io::Result<()> {
        assert_eq!(self.left_in_frame, 0);
        let mut h = vec![0x82u8];
        let m = if self.masked { 0x80 } else { 0 };
        if len < 126 {
            h.push(m | len as u8);
        } else if len < 65536 {
            h.push(m | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(m | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
        if self.masked {
            h.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]);
        }
        self.left_in_frame = len;
        self.w.write_all(&h).await
    }

    /// The next `n` payload bytes of the frame under way.
    async fn payload(&mut self, n: u64, d: &Dir) -> std::io::Result<()> {
        assert!(n <= self.left_in_frame);
        d.sent.fetch_add(n, Ordering::SeqCst);
        let mask = [0x11u8, 0x22, 0x33, 0x44];
        let mut chunk = Vec::with_capacity(64 * 1024);
        let mut left = n;
        while left > 0 {
            chunk.clear();
            let take = left.min(64 * 1024);
            for _ in 0..take {
                // The mask restarts with each frame.
                let in_frame = self.off - self.frame_start;
                let mut b = pat(self.seed, self.off);
                if self.masked {
                    b ^= mask[(in_frame % 4) as usize];
                }
                chunk.push(b);
                self.off += 1;
                self.left_in_frame -= 1;
            }
            left -= take;
            self.w.write_all(&chunk).await?;
        }
        Ok(())
    }

    async fn frame(&mut self, len: u64, d: &Dir) -> std::io::Result<()> {
        self.start_frame(len).await?;
        self.payload(len, d).await
    }

    async fn start_frame(&mut self, len: u64) -> std::io::Result<()> {
        self.frame_start = self.off;
        self.begin(len).await
    }
}

/// Reads frames and checks every payload byte against the pattern.
async fn verify(mut r: OwnedReadHalf, d: &Dir, seed: u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut head: Vec<u8> = Vec::new();
    let mut left = 0u64;
    let mut mask: Option<[u8; 4]> = None;
    let mut in_frame = 0u64;
    let mut off = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                d.ended.store(true, Ordering::SeqCst);
                return;
            }
            Ok(n) => n,
        };
        let mut i = 0;
        while i < n {
            if left == 0 {
                head.push(buf[i]);
                i += 1;
                if let Some((len, m, hlen)) = parse_head(&head) {
                    assert_eq!(hlen, head.len());
                    head.clear();
                    left = len;
                    mask = m;
                    in_frame = 0;
                }
                continue;
            }
            let take = ((n - i) as u64).min(left) as usize;
            for &b in &buf[i..i + take] {
                let b = match mask {
                    Some(m) => b ^ m[(in_frame % 4) as usize],
                    None => b,
                };
                if b != pat(seed, off) && d.bad_at.load(Ordering::Relaxed) == 0 {
                    d.bad_at.store(off + 1, Ordering::SeqCst);
                }
                off += 1;
                in_frame += 1;
            }
            left -= take as u64;
            i += take;
            d.checked.store(off, Ordering::SeqCst);
        }
    }
}

/// (payload length, mask, header length) once `h` holds a whole header.
fn parse_head(h: &[u8]) -> Option<(u64, Option<[u8; 4]>, usize)> {
    if h.len() < 2 {
        return None;
    }
    let masked = h[1] & 0x80 != 0;
    let (len, mut at) = match h[1] & 0x7f {
        126 if h.len() >= 4 => (u16::from_be_bytes([h[2], h[3]]) as u64, 4),
        127 if h.len() >= 10 => (u64::from_be_bytes(h[2..10].try_into().unwrap()), 10),
        126 | 127 => return None,
        n => (n as u64, 2),
    };
    let mask = if masked {
        if h.len() < at + 4 {
            return None;
        }
        let m = [h[at], h[at + 1], h[at + 2], h[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    (h.len() == at).then_some((len, mask, at))
}

async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    head
}

/// The backends: one listener; `/s/ID` binds the connection to session ID,
/// anything else (the connect loop's probes) is answered and left alone.
async fn backend(l: TcpListener, sessions: Arc<Vec<Arc<Session>>>) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        let sessions = sessions.clone();
        tokio::spawn(async move {
            let head = read_head(&mut s).await;
            let text = String::from_utf8_lossy(&head).to_string();
            let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap_or(KEY)
                .trim()
                .to_string();
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                ringlb::http::accept_key(&key)
            );
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            let Some(id) = path
                .strip_prefix("/s/")
                .and_then(|i| i.parse::<usize>().ok())
            else {
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            };
            let sess = sessions[id].clone();
            let (r, w) = s.into_split();
            let (c2b_seed, b2c_seed) = sess.seeds();
            *sess.backend_w.lock().await = Some(Writer {
                w,
                seed: b2c_seed,
                off: 0,
                masked: false,
                left_in_frame: 0,
                frame_start: 0,
            });
            verify(r, &sess.c2b, c2b_seed).await;
        });
    }
}

async fn open_session(proxy: SocketAddr, sess: Arc<Session>) {
    let mut s = TcpStream::connect(proxy).await.expect("connect to ringlb");
    let req = upgrade_request(&format!("/s/{}", sess.id), "");
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let (r, w) = s.into_split();
    let (c2b_seed, b2c_seed) = sess.seeds();
    *sess.client_w.lock().await = Some(Writer {
        w,
        seed: c2b_seed,
        off: 0,
        masked: true,
        left_in_frame: 0,
        frame_start: 0,
    });
    let s2 = sess.clone();
    tokio::spawn(async move {
        if s2.gated {
            s2.gate.notified().await;
        }
        verify(r, &s2.b2c, b2c_seed).await;
    });
}

/// A small frame each way.
async fn exchange(sess: &Session, n: u64) {
    if let Some(w) = sess.client_w.lock().await.as_mut() {
        let _ = w.frame(n, &sess.c2b).await;
    }
    if let Some(w) = sess.backend_w.lock().await.as_mut() {
        let _ = w.frame(n, &sess.b2c).await;
    }
}

struct Fleet {
    sessions: Arc<Vec<Arc<Session>>>,
    backend_addr: SocketAddr,
}

impl Fleet {
    async fn new(n: usize, gated: &[usize]) -> Fleet {
        let sessions: Arc<Vec<Arc<Session>>> = Arc::new(
            (0..n)
                .map(|i| {
                    Arc::new(Session {
                        id: i as u64,
                        c2b: Dir::default(),
                        b2c: Dir::default(),
                        client_w: AMutex::new(None),
                        backend_w: AMutex::new(None),
                        gate: Notify::new(),
                        gated: gated.contains(&i),
                    })
                })
                .collect(),
        );
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = l.local_addr().unwrap();
        tokio::spawn(backend(l, sessions.clone()));
        Fleet {
            sessions,
            backend_addr,
        }
    }

    async fn open_all(&self, proxy: SocketAddr) {
        let mut tasks = Vec::new();
        for chunk in self.sessions.chunks(100) {
            for s in chunk {
                tasks.push(tokio::spawn(open_session(proxy, s.clone())));
            }
            for t in tasks.drain(..) {
                tokio::time::timeout(Duration::from_secs(20), t)
                    .await
                    .expect("session open timed out")
                    .unwrap();
            }
        }
        for s in self.sessions.iter() {
            wait_until("backend side bound", || {
                s.backend_w.try_lock().map(|g| g.is_some()).unwrap_or(false)
            })
            .await;
        }
    }

    async fn exchange_all(&self, n: u64) {
        for s in self.sessions.iter() {
            exchange(s, n).await;
        }
    }

    /// Waits (bounded) until every byte sent was checked; the failures.
    async fn settle(&self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let pending = self.sessions.iter().any(|s| {
                [&s.c2b, &s.b2c].iter().any(|d| {
                    d.checked.load(Ordering::SeqCst) < d.sent.load(Ordering::SeqCst)
                        && !d.ended.load(Ordering::SeqCst)
                        && d.bad_at.load(Ordering::SeqCst) == 0
                })
            });
            if !pending || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.failures()
    }

    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.sessions.iter() {
            for (name, d) in [("c2b", &s.c2b), ("b2c", &s.b2c)] {
                let (sent, checked) = (
                    d.sent.load(Ordering::SeqCst),
                    d.checked.load(Ordering::SeqCst),
                );
                let bad = d.bad_at.load(Ordering::SeqCst);
                if bad != 0 {
                    out.push(format!(
                        "session {} {name}: wrong byte at offset {}",
                        s.id,
                        bad - 1
                    ));
                } else if d.ended.load(Ordering::SeqCst) {
                    out.push(format!(
                        "session {} {name}: ended (EOF or reset) after {checked} of {sent}",
                        s.id
                    ));
                } else if checked != sent {
                    out.push(format!(
                        "session {} {name}: {checked} of {sent} bytes arrived",
                        s.id
                    ));
                }
            }
        }
        out
    }
}

/// The connect loop's handles: stop flag, successes, errors, task.
type Probes = (
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    Arc<Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
);

/// Connects, upgrades and closes in a loop; counts what went wrong.
fn connect_loop(proxy: SocketAddr) -> Probes {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let (s2, o2, e2) = (stop.clone(), ok.clone(), errors.clone());
    let h = tokio::spawn(async move {
        // Bounded: at most this many probes, and the caller stops it.
        for _ in 0..100_000 {
            if s2.load(Ordering::SeqCst) {
                return;
            }
            let res = tokio::time::timeout(Duration::from_secs(5), async {
                let mut s = TcpStream::connect(proxy)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                s.write_all(upgrade_request("/probe", "").as_bytes())
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                let local = s.local_addr().map(|a| a.port()).unwrap_or(0);
                let head = tokio::time::timeout(Duration::from_secs(4), read_head(&mut s))
                    .await
                    .map_err(|_| {
                        let ss = Command::new("ss")
                            .args(["-tanp"])
                            .output()
                            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                            .unwrap_or_default();
                        let mine: Vec<&str> = ss
                            .lines()
                            .filter(|l| {
                                l.contains(&format!(":{local}"))
                                    || (l.contains("LISTEN")
                                        && l.contains(&proxy.port().to_string()))
                            })
                            .collect();
                        format!("no answer within 4 s (client port {local}): {mine:?}")
                    })?;
                if !head.starts_with(b"HTTP/1.1 101") {
                    return Err(format!("answer: {:?}", String::from_utf8_lossy(&head)));
                }
                Ok(())
            })
            .await;
            match res {
                Ok(Ok(())) => {
                    o2.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Err(e)) => e2.lock().unwrap().push(e),
                Err(_) => e2.lock().unwrap().push("timed out".into()),
            }
        }
    });
    (stop, ok, errors, h)
}

/// Kills a process started by an upgrade (a grandchild of the test) on drop.
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .map(|t| t.to_string_lossy().starts_with("socket:"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

fn admin_get(admin: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {admin}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("admin {path}: {e}"));
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn proxy_config(backend: SocketAddr) -> String {
    config(
        &[backend],
        "park_idle_after = \"1s\"\nsplice_min = 65536\nmax_connections = 20000",
        "",
    )
    .replace(
        "[[route]]",
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[route]]",
    )
}

const MIB: u64 = 1 << 20;

/// The whole scenario: 2000 relaying sessions, one mid 4 MiB message each
/// way (spliced), slow readers with bytes queued in ringlb (one with bytes
/// in a splice pipe), parked sessions, sessions sending while the transfer
/// runs, a connect loop throughout. Returns the failures the byte check
/// found, so the negative control can assert there are some.
async fn scenario(n: usize, fault: Option<&str>) -> Vec<String> {
    // 1 and 2: slow readers (2 also receives a 4 MiB message into a pipe).
    let fleet = Fleet::new(n, &[1, 2]).await;
    let toml = proxy_config(fleet.backend_addr);
    let fault_env = fault.map(|f| format!("RINGLB_TEST_FAULT={f}"));
    let mut proxy = match &fault_env {
        Some(e) => Proxy::start_under(&toml, &["env", e]),
        None => Proxy::start(&toml),
    };
    let addr = proxy.addr();
    let admin = proxy.admin.unwrap();
    fleet.open_all(addr).await;
    fleet.exchange_all(100).await;
    let s = &fleet.sessions;
    // Session 0: a 4 MiB client message, 1 MiB of it sent (spliced: its
    // frame has more than splice_min to come).
    let mut c0 = s[0].client_w.lock().await;
    c0.as_mut().unwrap().start_frame(4 * MIB).await.unwrap();
    c0.as_mut().unwrap().payload(MIB, &s[0].c2b).await.unwrap();
    // Session 1: a slow reader; 16 MiB from the backend in 16 KiB frames,
    // more than the kernel buffers on loopback hold, so some of it waits in
    // ringlb's queue (written by a task: it cannot all go until read).
    let s1 = s[1].clone();
    let slow1 = tokio::spawn(async move {
        let mut w = s1.backend_w.lock().await;
        for _ in 0..1024 {
            w.as_mut().unwrap().frame(16 * 1024, &s1.b2c).await.unwrap();
        }
    });
    // Session 2: a slow reader receiving a 32 MiB message, 16 MiB of it
    // before the upgrade: spliced, with bytes stuck in the pipe; the rest
    // is sent after the upgrade.
    let s2 = s[2].clone();
    let slow2 = tokio::spawn(async move {
        let mut w = s2.backend_w.lock().await;
        w.as_mut().unwrap().start_frame(32 * MIB).await.unwrap();
        w.as_mut()
            .unwrap()
            .payload(16 * MIB, &s2.b2c)
            .await
            .unwrap();
    });
    // Long enough for the silent sessions to park (park_idle_after = 1s:
    // parked within 2 s of silence).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let metrics = admin_get(admin, "/metrics");
    assert!(
        metric(&metrics, "ringlb_sessions_parked_total") > 0,
        "no session parked"
    );
    assert!(
        metric(&metrics, "ringlb_bytes_spliced_total") > 0,
        "nothing spliced"
    );
    let active_before = metric(&metrics, "ringlb_connections_active");
    let sockets_before = sockets_of(proxy.pid());

    // Peers that keep sending while the transfer runs.
    let chatty_stop = Arc::new(AtomicBool::new(false));
    let mut chatty = Vec::new();
    for sess in s.iter().skip(10).step_by(50) {
        let (sess, stop) = (sess.clone(), chatty_stop.clone());
        chatty.push(tokio::spawn(async move {
            for _ in 0..2000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                exchange(&sess, 200).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let (probe_stop, probes_ok, probe_errors, probes) = connect_loop(addr);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (ok, stdout, stderr) = upgrade(proxy.pid()).await;
    assert!(ok, "upgrade failed: {stdout} {stderr}");
    // Every session, and the connect loop's probes that were relaying.
    let handed: usize = stdout
        .split("handed ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(handed >= n, "{stdout}");
    let _new = Pid(new_pid(&stdout));
    let status = proxy
        .wait_exit(Duration::from_secs(20))
        .expect("the old process did not exit");
    assert!(status.success(), "old process: {status}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    probe_stop.store(true, Ordering::SeqCst);
    chatty_stop.store(true, Ordering::SeqCst);
    probes.await.unwrap();
    for c in chatty {
        c.await.unwrap();
    }
    let errors = probe_errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "the connect loop saw: {errors:?}");
    assert!(
        probes_ok.load(Ordering::SeqCst) > 5,
        "the connect loop barely ran"
    );

    // Same sockets and the same count of active connections.
    let new = _new.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sockets_of(new) != sockets_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sockets_of(new),
        sockets_before,
        "sockets: new process vs old"
    );
    let metrics = admin_get(admin, "/metrics");
    assert_eq!(metric(&metrics, "ringlb_connections_active"), active_before);
    let status = admin_get(admin, "/status");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["pid"], new);
    assert_eq!(v["inherited_sessions"], handed as u64);

    // Finish the big messages, open the slow readers, one more round.
    c0.as_mut()
        .unwrap()
        .payload(3 * MIB, &s[0].c2b)
        .await
        .unwrap();
    drop(c0);
    for sess in [&s[1], &s[2]] {
        sess.gate.notify_one();
    }
    slow1.await.unwrap();
    slow2.await.unwrap();
    {
        let mut w = s[2].backend_w.lock().await;
        w.as_mut()
            .unwrap()
            .payload(16 * MIB, &s[2].b2c)
            .await
            .unwrap();
    }
    fleet.exchange_all(50).await;
    let failures = fleet.settle(Duration::from_secs(20)).await;
    drop(proxy);
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_moves_to_the_new_process_with_every_byte() {
    let failures = scenario(2000, None).await;
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
}

/// The byte check can fail: a build that drops queued bytes during the
/// transfer must be caught by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_check_catches_a_hand_off_that_drops_queued_bytes() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: release builds compile the RINGLB_TEST_FAULT hooks out");
        return;
    }
    let failures = scenario(40, Some("handoff-drop-queued")).await;
    eprintln!("failures with the fault: {failures:?}");
    assert!(
        failures
            .iter()
            .any(|f| f.starts_with("session 1 ") || f.starts_with("session 2 ")),
        "dropping the queued bytes went unnoticed: {failures:?}"
    );
}

/// Sessions whose streams ended (EOF or reset), by id.
fn ended(fleet: &Fleet) -> Vec<u64> {
    fleet
        .sessions
        .iter()
        .filter(|s| s.c2b.ended.load(Ordering::SeqCst) || s.b2c.ended.load(Ordering::SeqCst))
        .map(|s| s.id)
        .collect()
}

/// True once `pid` is gone (or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Err(_) => true,
        Ok(s) => s
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z')),
    }
}

/// The new process dies holding an unacknowledged batch (after two it
/// acknowledged): the old process keeps every session not acknowledged
/// relaying, accepts again, and a second upgrade succeeds; then a third
/// (A → B → C) does too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_dying_mid_transfer_leaves_the_rest_relaying_and_a_retry_works() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: release builds compile the RINGLB_TEST_FAULT hooks out");
        return;
    }
    let n = 600;
    let fleet = Fleet::new(n, &[]).await;
    let mut proxy = Proxy::start_under(
        &proxy_config(fleet.backend_addr),
        &["env", "RINGLB_TEST_FAULT=handoff-new-dies"],
    );
    let admin = proxy.admin.unwrap();
    fleet.open_all(proxy.addr()).await;
    fleet.exchange_all(100).await;
    assert!(fleet.settle(Duration::from_secs(10)).await.is_empty());

    let (ok, stdout, stderr) = upgrade(proxy.pid()).await;
    assert!(!ok, "the upgrade should have failed: {stdout}");
    assert!(stderr.contains("rolled back"), "{stderr}");
    proxy.wait_log("upgrade rolled back", Duration::from_secs(5));
    assert!(
        proxy.wait_exit(Duration::from_millis(200)).is_none(),
        "the old process exited"
    );

    // The two batches it acknowledged were the new process's and ended
    // with it; every other session relays on in the old one.
    let acked: usize = stderr
        .split(" stay here and relay on (")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(acked > 0 && acked <= 2 * 126, "{stderr}");
    fleet.exchange_all(100).await;
    fleet.settle(Duration::from_secs(20)).await;
    let dead = ended(&fleet);
    assert_eq!(dead.len(), acked, "sessions that ended vs acknowledged");
    let bad: Vec<String> = fleet
        .failures()
        .into_iter()
        .filter(|f| !f.contains("ended"))
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
    // It accepts again (its listeners were paused, never closed).
    let mut ws = connect(&proxy.url("/")).await;
    drop(ws.close(None).await);
    let metrics = admin_get(admin, "/metrics");
    assert_eq!(
        metric(&metrics, "ringlb_upgrades_total{result=\"rolled_back\"}"),
        1
    );

    // A second upgrade takes every session left.
    let (ok, stdout, stderr) = upgrade(proxy.pid()).await;
    assert!(ok, "{stdout} {stderr}");
    // Every session left (and perhaps the probe above, if its close is
    // still under way).
    let handed: usize = stdout
        .split("handed ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(handed >= n - dead.len(), "{stdout}");
    let b = Pid(new_pid(&stdout));
    assert!(proxy.wait_exit(Duration::from_secs(20)).is_some());

    // And a third, from the new process to another (A → B → C).
    let (ok, stdout, stderr) = upgrade(b.0).await;
    assert!(ok, "{stdout} {stderr}");
    let c = Pid(new_pid(&stdout));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exited(b.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(exited(b.0), "B did not exit");
    let status: serde_json::Value = serde_json::from_str(&admin_get(admin, "/status")).unwrap();
    assert_eq!(status["pid"], c.0);
    // Counters carried over twice: the first process's 600 handshakes
    // are still counted.
    let metrics = admin_get(admin, "/metrics");
    assert!(metric(&metrics, "ringlb_handshakes_total{result=\"101\"}") >= n as u64);

    fleet.exchange_all(100).await;
    fleet.settle(Duration::from_secs(20)).await;
    let bad: Vec<String> = fleet
        .failures()
        .into_iter()
        .filter(|f| !f.contains("ended"))
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(ended(&fleet), dead, "a session ended in the later upgrades");
}

/// A configuration the new process refuses: the upgrade fails with the
/// reason, in `ringlb upgrade`'s output and the old process's log, and
/// nothing changes; with the file fixed, the upgrade goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_at_upgrade_is_refused_with_the_reason_and_changes_nothing() {
    let fleet = Fleet::new(20, &[]).await;
    let toml = proxy_config(fleet.backend_addr);
    let mut proxy = Proxy::start(&toml);
    fleet.open_all(proxy.addr()).await;
    fleet.exchange_all(100).await;
    std::fs::write(
        &proxy.config_path,
        toml.replace("shards = 2", "shards = 2\nbogus_key = 1"),
    )
    .unwrap();
    let (ok, stdout, stderr) = upgrade(proxy.pid()).await;
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("upgrade refused") && stderr.contains("bogus_key"),
        "{stderr}"
    );
    let line = proxy.wait_log("upgrade refused", Duration::from_secs(5));
    assert!(line.contains("ringlb.toml"), "{line}");
    proxy.wait_log("unknown field `bogus_key`", Duration::from_secs(5));
    assert!(proxy.wait_exit(Duration::from_millis(200)).is_none());
    fleet.exchange_all(100).await;
    let failures = fleet.settle(Duration::from_secs(10)).await;
    assert!(failures.is_empty(), "{failures:?}");
    let mut ws = connect(&proxy.url("/")).await;
    drop(ws.close(None).await);

    std::fs::write(&proxy.config_path, &toml).unwrap();
    let (ok, stdout, stderr) = upgrade(proxy.pid()).await;
    assert!(ok, "{stdout} {stderr}");
    let _new = Pid(new_pid(&stdout));
    assert!(proxy.wait_exit(Duration::from_secs(20)).is_some());
    fleet.exchange_all(100).await;
    let failures = fleet.settle(Duration::from_secs(10)).await;
    assert!(failures.is_empty(), "{failures:?}");
}

/// Under systemd (Type=notify, NotifyAccess=all): READY=1 at start, then
/// MAINPID=<new> and READY=1 from the new process, so the unit follows it;
/// `[server] pid_file` names whichever process is current, and
/// `ringlb upgrade --pid-file` finds it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_and_the_pid_file_follow_the_new_process() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let pid_file = dir.path().join("ringlb.pid");
    let fleet = Fleet::new(10, &[]).await;
    let toml = proxy_config(fleet.backend_addr).replace(
        "shards = 2",
        &format!("shards = 2\npid_file = \"{}\"", pid_file.display()),
    );
    let env = format!("NOTIFY_SOCKET={}", notify_path.display());
    let mut proxy = Proxy::start_under(&toml, &["env", &env]);
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(first.contains("READY=1"), "{first}");
    assert!(
        first.contains(&format!("MAINPID={}", proxy.pid())),
        "{first}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        proxy.pid().to_string()
    );
    fleet.open_all(proxy.addr()).await;
    fleet.exchange_all(10).await;
    // An operator's drain mark, to be carried over with the counts.
    let (code, body) = proxy.admin("POST", &format!("/backends/u/{}/drain", fleet.backend_addr));
    assert_eq!(code, 200, "{body}");

    let pf = pid_file.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ringlb"))
            .arg("upgrade")
            .arg("--pid-file")
            .arg(&pf)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = Pid(new_pid(&stdout));
    let n = notify.recv(&mut buf).unwrap();
    let second = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(second.contains(&format!("MAINPID={}", new.0)), "{second}");
    assert!(second.contains("READY=1"), "{second}");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        new.0.to_string()
    );
    assert!(proxy.wait_exit(Duration::from_secs(20)).is_some());
    // The backend is still draining, and its least-connections count is
    // the sessions that moved.
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin.unwrap(), "/status")).unwrap();
    let b = &status["upstreams"][0]["backends"][0];
    assert_eq!(b["state"], "draining", "{b}");
    assert_eq!(b["active"], 10, "{b}");
    assert!(b["connections_total"].as_u64().unwrap() >= 10, "{b}");
    assert!(status["started_at"].as_u64().unwrap() > 0);
    fleet.exchange_all(10).await;
    let failures = fleet.settle(Duration::from_secs(10)).await;
    assert!(failures.is_empty(), "{failures:?}");
}

/// A session still in its handshake when the upgrade starts finishes it in
/// the old process, which hands it over once it relays (the upgrade waits
/// for it); then it relays through the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_under_way_finishes_in_the_old_process_and_then_moves() {
    let fleet = Fleet::new(3, &[]).await;
    let mut proxy = Proxy::start(&proxy_config(fleet.backend_addr));
    // Sessions 0 and 1 relay; session 2 has sent half its upgrade head.
    for s in &fleet.sessions[..2] {
        open_session(proxy.addr(), s.clone()).await;
    }
    let mut late = TcpStream::connect(proxy.addr()).await.unwrap();
    let req = upgrade_request("/s/2", "");
    let (first, rest) = req.as_bytes().split_at(req.len() / 2);
    late.write_all(first).await.unwrap();
    // Accepted and reading its head in the old process.
    let admin = proxy.admin.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&admin_get(admin, "/metrics"), "ringlb_connections_active") < 3 {
        assert!(
            Instant::now() < deadline,
            "the third connection was not accepted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = proxy.pid();
    let upgrading = tokio::spawn(upgrade(pid));
    proxy.wait_log("handing over sessions", Duration::from_secs(10));
    // The old process holds the half-read handshake: it cannot be done yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !upgrading.is_finished(),
        "the upgrade ended with a handshake under way"
    );
    assert!(proxy.wait_exit(Duration::from_millis(10)).is_none());
    late.write_all(rest).await.unwrap();
    let head = read_head(&mut late).await;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let (ok, stdout, stderr) = upgrading.await.unwrap();
    assert!(ok, "{stdout} {stderr}");
    assert!(stdout.contains("handed 3 sessions"), "{stdout}");
    let _new = Pid(new_pid(&stdout));
    assert!(proxy.wait_exit(Duration::from_secs(20)).is_some());

    // The late session relays through the new process, both ways.
    let s2 = fleet.sessions[2].clone();
    let (r, w) = late.into_split();
    let (c2b_seed, b2c_seed) = s2.seeds();
    *s2.client_w.lock().await = Some(Writer {
        w,
        seed: c2b_seed,
        off: 0,
        masked: true,
        left_in_frame: 0,
        frame_start: 0,
    });
    let s2r = s2.clone();
    tokio::spawn(async move { verify(r, &s2r.b2c, b2c_seed).await });
    wait_until("backend side bound", || {
        s2.backend_w
            .try_lock()
            .map(|g| g.is_some())
            .unwrap_or(false)
    })
    .await;
    fleet.exchange_all(1000).await;
    let failures = fleet.settle(Duration::from_secs(10)).await;
    assert!(failures.is_empty(), "{failures:?}");
}

/// A new process that stops answering mid-transfer: after
/// `server.upgrade_timeout` the old one kills it and keeps every session
/// not acknowledged relaying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_stops_answering_is_killed_after_upgrade_timeout() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: release builds compile the RINGLB_TEST_FAULT hooks out");
        return;
    }
    let n = 400;
    let fleet = Fleet::new(n, &[]).await;
    let toml = proxy_config(fleet.backend_addr)
        .replace("shards = 2", "shards = 2\nupgrade_timeout = \"1s\"");
    let mut proxy = Proxy::start_under(&toml, &["env", "RINGLB_TEST_FAULT=handoff-new-hangs"]);
    fleet.open_all(proxy.addr()).await;
    fleet.exchange_all(100).await;
    let t0 = Instant::now();
    let (ok, stdout, stderr) = upgrade(proxy.pid()).await;
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("did not acknowledge a batch") && stderr.contains("rolled back"),
        "{stderr}"
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "gave up before upgrade_timeout"
    );
    let acked: usize = stderr
        .split(" stay here and relay on (")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    fleet.exchange_all(100).await;
    fleet.settle(Duration::from_secs(20)).await;
    assert_eq!(ended(&fleet).len(), acked);
    let bad: Vec<String> = fleet
        .failures()
        .into_iter()
        .filter(|f| !f.contains("ended"))
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
    assert!(proxy.wait_exit(Duration::from_millis(100)).is_none());
}
