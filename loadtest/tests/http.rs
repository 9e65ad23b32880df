//! The `http` mode against small HTTP servers written in the test: keep-alive
//! with Content-Length, `Connection: close` on every response, chunked
//! bodies, silent closes of kept-alive connections, wrong status and length.
//! With `--requests N` every count and byte total is exact.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy)]
enum Style {
    /// Content-Length, keep-alive.
    KeepAlive,
    /// Content-Length plus `Connection: close`, then the server closes.
    Close,
    /// `Transfer-Encoding: chunked` in 3 chunks, with an extension and a trailer.
    Chunked,
    /// Keep-alive, but the server silently closes after this many responses.
    DropAfter(u64),
    /// Keep-alive with this status.
    Status(u16),
}

struct Server {
    addr: SocketAddr,
    /// Requests answered and connections accepted, as seen by the server.
    requests: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

/// A thread-per-connection HTTP/1.1 server on 127.0.0.1:0 serving `body` at
/// every path. At most `max_conns` connections are accepted, so its threads end.
fn serve(style: Style, body: Vec<u8>, max_conns: usize) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let (rq, ac) = (requests.clone(), accepted.clone());
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for s in l.incoming().take(max_conns) {
            let Ok(s) = s else { break };
            ac.fetch_add(1, Relaxed);
            let (rq, body) = (rq.clone(), body.clone());
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let _ = s.set_nodelay(true);
                handle(s, style, &body, &rq);
            });
        }
    });
    Server {
        addr,
        requests,
        accepted,
    }
}

fn handle(s: TcpStream, style: Style, body: &[u8], requests: &AtomicU64) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut served = 0u64;
    // Bounded by the client: each pass reads one request or returns.
    loop {
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if first {
                assert!(line.starts_with("GET /file HTTP/1.1"), "{line:?}");
                first = false;
            }
            if line == "\r\n" {
                break;
            }
        }
        requests.fetch_add(1, Relaxed);
        let mut out = Vec::new();
        match style {
            Style::KeepAlive | Style::DropAfter(_) => {
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .unwrap();
                out.extend_from_slice(body);
            }
            Style::Status(code) => {
                write!(
                    out,
                    "HTTP/1.1 {code} X\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .unwrap();
                out.extend_from_slice(body);
            }
            Style::Close => {
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .unwrap();
                out.extend_from_slice(body);
            }
            Style::Chunked => {
                out.extend_from_slice(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                let third = body.len() / 3;
                for (i, part) in [&body[..third], &body[third..2 * third], &body[2 * third..]]
                    .iter()
                    .enumerate()
                {
                    if i == 1 {
                        write!(out, "{:X};ext=1\r\n", part.len()).unwrap();
                    } else {
                        write!(out, "{:x}\r\n", part.len()).unwrap();
                    }
                    out.extend_from_slice(part);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\nX-Checksum: none\r\n\r\n");
            }
        }
        if w.write_all(&out).is_err() {
            return;
        }
        served += 1;
        match style {
            Style::Close => return,
            Style::DropAfter(k) if served == k => return,
            _ => {}
        }
    }
}

fn url(s: &Server) -> String {
    format!("http://{}/file", s.addr)
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn clean(code: i32, v: &Value, stderr: &str) {
    assert_eq!(code, 0, "exit code; stderr:\n{stderr}\n{v}");
    assert_eq!(v["mode"], "http");
    assert_eq!(v["error_total"], 0, "{v}");
}

#[test]
fn keep_alive_counts_are_exact() {
    let body: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
    let srv = serve(Style::KeepAlive, body, 64);
    let url = url(&srv);
    let (code, v, stderr) = run_tool(&[
        "http",
        "--url",
        &url,
        "--connections",
        "4",
        "--requests",
        "1000",
        "--expect-length",
        "2048",
    ]);
    let v = v.expect("json");
    clean(code, &v, &stderr);
    assert_eq!(u(&v, "requests"), 1000);
    assert_eq!(u(&v, "messages"), 1000);
    assert_eq!(u(&v, "bytes"), 1000 * 2048);
    assert_eq!(v["status_codes"], serde_json::json!({"200": 1000}));
    assert_eq!(u(&v, "reconnects"), 0);
    assert_eq!(v["server_closes"]["announced"], 0);
    assert_eq!(v["server_closes"]["unannounced"], 0);
    assert_eq!(v["latency_us"]["count"], 1000);
    assert_eq!(v["connections"]["opened"], 4);
    assert_eq!(v["connections"]["alive"], 4);
    assert_eq!(u(&v, "handshakes"), 4);
    assert!(v["requests_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["params"]["requests"], 1000);
    assert_eq!(srv.requests.load(Relaxed), 1000);
    assert_eq!(srv.accepted.load(Relaxed), 4);
}

#[test]
fn connection_close_reconnects_every_time() {
    let srv = serve(Style::Close, vec![b'x'; 500], 1000);
    let url = url(&srv);
    let (code, v, stderr) = run_tool(&[
        "http",
        "--url",
        &url,
        "--connections",
        "3",
        "--requests",
        "60",
    ]);
    let v = v.expect("json");
    clean(code, &v, &stderr);
    assert_eq!(u(&v, "requests"), 60);
    assert_eq!(u(&v, "bytes"), 60 * 500);
    // Every response closes; each of the 3 slots ends after its last one.
    assert_eq!(v["server_closes"]["announced"], 60);
    assert_eq!(u(&v, "reconnects"), 60 - 3);
    assert_eq!(u(&v, "handshakes"), 60);
    assert_eq!(v["connections"]["opened"], 3);
    assert_eq!(v["connections"]["alive"], 3);
    assert_eq!(srv.accepted.load(Relaxed), 60);
}

#[test]
fn chunked_bodies_are_decoded_and_counted() {
    let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let srv = serve(Style::Chunked, body, 64);
    let url = url(&srv);
    let (code, v, stderr) = run_tool(&[
        "http",
        "--url",
        &url,
        "--connections",
        "2",
        "--requests",
        "200",
        "--expect-length",
        "10000",
        "--threads",
        "2",
    ]);
    let v = v.expect("json");
    clean(code, &v, &stderr);
    assert_eq!(u(&v, "requests"), 200);
    assert_eq!(u(&v, "bytes"), 200 * 10_000);
    assert_eq!(u(&v, "reconnects"), 0);
    assert_eq!(srv.requests.load(Relaxed), 200);
}

#[test]
fn silent_close_of_a_kept_alive_connection_is_retried_once() {
    let srv = serve(Style::DropAfter(3), vec![b'y'; 100], 64);
    let url = url(&srv);
    let (code, v, stderr) = run_tool(&[
        "http",
        "--url",
        &url,
        "--connections",
        "1",
        "--requests",
        "10",
    ]);
    let v = v.expect("json");
    clean(code, &v, &stderr);
    // Connections serve requests 1-3, 4-6, 7-9, 10: three silent closes, each
    // followed by the same request on a new connection.
    assert_eq!(u(&v, "requests"), 10);
    assert_eq!(u(&v, "bytes"), 1000);
    assert_eq!(v["server_closes"]["unannounced"], 3);
    assert_eq!(v["server_closes"]["announced"], 0);
    assert_eq!(u(&v, "reconnects"), 3);
    assert_eq!(srv.requests.load(Relaxed), 10);
    assert_eq!(srv.accepted.load(Relaxed), 4);
}

#[test]
fn wrong_status_and_length_are_errors() {
    let srv = serve(Style::Status(404), vec![b'z'; 10], 64);
    let url = url(&srv);
    let (code, v, _) = run_tool(&[
        "http",
        "--url",
        &url,
        "--connections",
        "2",
        "--requests",
        "20",
        "--expect-length",
        "11",
    ]);
    let v = v.expect("json");
    assert_eq!(code, 1, "{v}");
    assert_eq!(err(&v, "http_status"), 20);
    assert_eq!(err(&v, "body_length"), 20);
    assert_eq!(v["status_codes"], serde_json::json!({"404": 20}));
    // --expect-status 0 accepts any status.
    let (code, v, stderr) = run_tool(&[
        "http",
        "--url",
        &url,
        "--connections",
        "1",
        "--requests",
        "5",
        "--expect-status",
        "0",
    ]);
    clean(code, &v.expect("json"), &stderr);
}

#[test]
fn duration_run_with_procs_merges_status_counts() {
    let srv = serve(Style::KeepAlive, vec![b'a'; 2048], 64);
    let url = url(&srv);
    let (code, v, stderr) = run_tool(&[
        "http",
        "--url",
        &url,
        "--connections",
        "4",
        "--duration",
        "400ms",
        "--warmup",
        "100ms",
        "--procs",
        "2",
        "--header",
        "Accept-Encoding: gzip",
    ]);
    let v = v.expect("json");
    clean(code, &v, &stderr);
    let n = u(&v, "requests");
    assert!(n > 50, "{v}");
    assert_eq!(v["status_codes"]["200"].as_u64(), Some(n));
    assert_eq!(u(&v, "bytes"), n * 2048);
    assert_eq!(v["latency_us"]["count"].as_u64(), Some(n));
    assert_eq!(v["connections"]["alive"], 4);
    assert_eq!(v["elapsed_s"].as_f64(), Some(0.4));
    assert_eq!(v["params"]["headers"][0], "Accept-Encoding: gzip");
}

#[test]
fn refused_port_and_non_loopback_target() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/");
    let (code, v, _) = run_tool(&[
        "http",
        "--url",
        &url,
        "--connections",
        "2",
        "--requests",
        "5",
    ]);
    let v = v.expect("json");
    assert_eq!(code, 1);
    assert_eq!(err(&v, "connect_refused"), 2);
    assert_eq!(v["connections"]["failed"], 2);
    assert_eq!(u(&v, "requests"), 0);

    let (code, _, stderr) = run_tool(&["http", "--url", "http://192.0.2.1:80/", "--requests", "1"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}
