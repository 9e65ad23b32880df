#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_ringlb-load");

/// `ringlb-load echo` as a child process, stopped by PID on drop.
pub struct EchoProc {
    pub child: Child,
    pub addrs: Vec<SocketAddr>,
}

impl EchoProc {
    pub fn start(extra: &[&str]) -> EchoProc {
        Self::start_n(1, extra)
    }

    pub fn start_n(listeners: usize, extra: &[&str]) -> EchoProc {
        let mut cmd = Command::new(BIN);
        cmd.arg("echo");
        for _ in 0..listeners {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn echo");
        // Readiness is the printed address, never a sleep.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addrs = Vec::new();
        for _ in 0..listeners {
            let line = lines.next().expect("echo printed nothing").unwrap();
            let a = line.strip_prefix("listening ").expect("listening line");
            addrs.push(a.parse().unwrap());
        }
        EchoProc { child, addrs }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addrs[0])
    }
}

impl Drop for EchoProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the tool with `--json -` and returns (exit code, parsed JSON, stderr).
pub fn run_tool(args: &[&str]) -> (i32, Option<Value>, String) {
    let out: Output = Command::new(BIN)
        .args(args)
        .args(["--json", "-"])
        .stdin(Stdio::null())
        .output()
        .expect("run ringlb-load");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let json = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok());
    (out.status.code().unwrap_or(-1), json, stderr)
}

pub fn err(v: &Value, kind: &str) -> u64 {
    v["errors"][kind]
        .as_u64()
        .unwrap_or_else(|| panic!("no error kind {kind} in {v}"))
}

/// Reads an HTTP request head from a raw socket (or a TLS stream over one).
pub fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 8192, "request head too long");
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Answers a client upgrade correctly.
pub fn accept_upgrade<S: Read + Write>(s: &mut S) {
    let head = read_head(s);
    let key = header(&head, "sec-websocket-key").expect("key");
    let accept = ringlb_load::codec::accept_key(key.as_bytes());
    write!(
        s,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .unwrap();
}

/// Reads one client frame; returns (opcode, fin, unmasked payload).
pub fn read_frame(s: &mut impl Read) -> Option<(u8, bool, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).ok()?;
    let mut len = (h[1] & 0x7f) as u64;
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).ok()?;
        len = u16::from_be_bytes(b) as u64;
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).ok()?;
        len = u64::from_be_bytes(b);
    }
    let mut mask = [0u8; 4];
    if h[1] & 0x80 != 0 {
        s.read_exact(&mut mask).ok()?;
    }
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).ok()?;
    for (i, b) in p.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Some((h[0] & 0x0f, h[0] & 0x80 != 0, p))
}

/// A one-off backend on a raw socket; `handler` gets each accepted connection.
/// At most `max_conns` are served so the thread always ends.
pub fn raw_backend<F>(max_conns: usize, handler: F) -> SocketAddr
where
    F: Fn(TcpStream) + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(max_conns) {
            let Ok(s) = s else { break };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            handler(s);
        }
    });
    addr
}
