//! Test fixtures: ringlb as a real child process, real WebSocket backends on
//! port 0, raw-socket helpers. Readiness is always signalled (a log line, a
//! bound listener), never waited for with a sleep.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// ringlb running as a child process; killed by PID on drop.
pub struct Proxy {
    child: Child,
    pub addrs: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub log: Arc<Mutex<Vec<String>>>,
    pub config_path: std::path::PathBuf,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts `ringlb run --config` with this TOML; `listen` entries may use port 0.
    pub fn start(toml: &str) -> Proxy {
        Proxy::start_under(toml, &[])
    }

    /// Starts ringlb as the last argument of a wrapper command (e.g.
    /// `prlimit --nofile=N:N --`), which must exec it in place.
    pub fn start_under(toml: &str, wrapper: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ringlb.toml");
        std::fs::write(&path, toml).unwrap();
        let n_listen = toml
            .lines()
            .find(|l| l.trim_start().starts_with("listen") && l.contains('['))
            .map_or(1, |l| l.matches(':').count());
        let ringlb = env!("CARGO_BIN_EXE_ringlb");
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(ringlb);
                c
            }
            None => Command::new(ringlb),
        };
        let mut child = cmd
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringlb");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("admin listening on ").nth(1) {
                    let addr: SocketAddr = rest.split_whitespace().next().unwrap().parse().unwrap();
                    let _ = tx.send(Ok((true, addr)));
                } else if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr: SocketAddr = rest.split_whitespace().next().unwrap().parse().unwrap();
                    let _ = tx.send(Ok((false, addr)));
                }
                if line.starts_with("ringlb: ") {
                    let _ = tx.send(Err(line.clone()));
                }
                log2.lock().unwrap().push(line);
            }
        });
        let want_admin = toml.contains("[admin]");
        let mut addrs = Vec::new();
        let mut admin = None;
        while addrs.len() < n_listen || (want_admin && admin.is_none()) {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(Ok((true, a))) => admin = Some(a),
                Ok(Ok((false, a))) => addrs.push(a),
                Ok(Err(e)) => panic!("ringlb failed to start: {e}"),
                Err(_) => panic!(
                    "ringlb did not report listening; log: {:?}",
                    log.lock().unwrap()
                ),
            }
        }
        Proxy {
            child,
            addrs,
            admin,
            log,
            config_path: path,
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr(), path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name ("HUP", "TERM") to ringlb's PID.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits (bounded) for ringlb to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for a log line containing `text`.
    pub fn wait_log(&self, text: &str, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(text)) {
                return l.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {text:?}; log: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET or POST on the admin listener, as curl would send it (Host is the
    /// admin address) plus the header mutating requests need; returns
    /// (status, body).
    pub fn admin(&self, method: &str, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let admin = self.admin.expect("no admin listener");
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nX-Ringlb-Admin: 1\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// A field of /proc/PID/status, in its own unit (kB for memory).
    pub fn status_field(&self, name: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = s.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The target and headers of an upgrade request a backend saw.
pub type SeenRequest = (String, Vec<(String, String)>);

/// A WebSocket echo backend (tungstenite) that records each upgrade
/// request's path and headers and counts live connections.
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub active: Arc<AtomicUsize>,
    pub requests: Arc<Mutex<Vec<SeenRequest>>>,
    /// Close codes received from clients (through ringlb).
    pub closes: Arc<Mutex<Vec<u16>>>,
    /// Flipped to true by `kill`: the listener and every session end.
    killed: tokio::sync::watch::Sender<bool>,
}

impl Backend {
    pub async fn start() -> Backend {
        Backend::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address (to bring a killed backend back).
    pub async fn start_on(addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let (killed, _) = tokio::sync::watch::channel(false);
        let b = Backend {
            addr: listener.local_addr().unwrap(),
            active: Arc::new(AtomicUsize::new(0)),
            requests: Arc::new(Mutex::new(Vec::new())),
            closes: Arc::new(Mutex::new(Vec::new())),
            killed,
        };
        let b2 = b.clone();
        let mut stop = b.killed.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = listener.accept() => {
                        let Ok((stream, _)) = r else { return };
                        let b = b2.clone();
                        tokio::spawn(async move { b.serve(stream).await });
                    }
                    _ = stop.changed() => return,
                }
            }
        });
        b
    }

    /// Closes the listener and every session, like a crashed process.
    pub fn kill(&self) {
        self.killed.send_replace(true);
    }

    async fn serve(&self, stream: TcpStream) {
        let requests = self.requests.clone();
        #[allow(clippy::result_large_err)] // the callback type is tungstenite's
        let cb = move |req: &Request, resp: Response| {
            let headers = req
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            requests
                .lock()
                .unwrap()
                .push((req.uri().to_string(), headers));
            Ok(resp)
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, cb).await else {
            return;
        };
        self.active.fetch_add(1, Ordering::SeqCst);
        let mut stop = self.killed.subscribe();
        loop {
            let msg = tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(m)) => m,
                    _ => break,
                },
                _ = stop.changed() => break,
            };
            if let Message::Close(Some(f)) = &msg {
                self.closes.lock().unwrap().push(u16::from(f.code));
            }
            match msg {
                Message::Text(t) if t == "server-close" => {
                    let _ = ws
                        .send(Message::Close(Some(
                            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                code: 4001u16.into(),
                                reason: "server bye".into(),
                            },
                        )))
                        .await;
                }
                Message::Text(_) | Message::Binary(_) => {
                    if let Err(_closed) = ws.send(msg).await {
                        break;
                    }
                }
                _ => {}
            }
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub fn last_request(&self) -> SeenRequest {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("backend saw no request")
    }
}

/// A backend that reads one request head and answers with `response`
/// verbatim, then keeps the socket open until the peer closes. Sends the
/// head it read on the returned channel.
pub async fn scripted_backend(
    response: Vec<u8>,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let response = response.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                let _ = tx.send(head);
                let _ = s.write_all(&response).await;
                let mut sink = [0u8; 1024];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Reads up to and including the blank line that ends an HTTP head.
pub async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    head
}

/// Sends raw bytes to ringlb and returns everything it answers until it
/// closes (bounded by 10 s).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_to_close(&mut s).await
}

pub async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        r.is_ok(),
        "ringlb did not close within 10 s; got {:?}",
        String::from_utf8_lossy(&out)
    );
    out
}

pub fn status_of(resp: &[u8]) -> u16 {
    let s = String::from_utf8_lossy(resp);
    s.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {s:?}"))
}

pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test.local\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A masked client frame (RFC 6455 §5.2), FIN set.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
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
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Config text with one route `/` to the given backends.
pub fn config(backends: &[SocketAddr], server_extra: &str, upstream_extra: &str) -> String {
    let servers: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect();
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n{server_extra}\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\n\n[upstream.u]\n{upstream_extra}\nservers = [{}]\n",
        servers.join(", ")
    )
}

/// A port on loopback where nothing listens (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The 101 a correct backend sends for [`upgrade_request`]'s key.
pub fn switching_protocols() -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        ringlb::http::accept_key(KEY)
    )
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A WebSocket client through ringlb (bounded: 10 s).
pub async fn connect(url: &str) -> Ws {
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("connect timed out")
    .expect("connect failed");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends a text message and waits (bounded) for the same text back.
pub async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no echo within 10 s")
            .expect("stream ended")
            .expect("websocket error");
        if m.is_text() {
            assert_eq!(m, Message::Text(text.into()));
            return;
        }
    }
}

/// Polls a condition every 10 ms for at most 10 s.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "not reached within 10 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A process this test started by `ringlb upgrade`: killed when dropped.
pub struct Pid(pub u32);

impl Drop for Pid {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-9")
            .arg(self.0.to_string())
            .status();
    }
}

/// `ringlb upgrade --pid PID`: (success, stdout, stderr).
pub async fn upgrade(pid: u32) -> (bool, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ringlb"))
            .args(["upgrade", "--pid", &pid.to_string(), "--timeout", "60s"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The new process's pid in `ringlb upgrade`'s outcome line.
pub fn new_pid(stdout: &str) -> u32 {
    stdout
        .split("to pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {stdout:?}"))
}
