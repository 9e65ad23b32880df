//! What reaches a backend connection: exactly one head that ringlb wrote,
//! plus that request's declared body, and nothing a client appended to it.
//!
//! The backend here keeps every connection open after answering and records
//! every byte it receives on it, split into what came before its answer and
//! what came after, until ringlb closes the connection.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One backend connection as the backend saw it.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Everything up to the end of the first head, then whatever arrived
    /// before the backend answered.
    before: Vec<u8>,
    /// Bytes that arrived after the answer was written.
    after: Vec<u8>,
    /// ringlb closed the connection (EOF or reset).
    ended: bool,
}

impl Seen {
    fn all(&self) -> Vec<u8> {
        [self.before.clone(), self.after.clone()].concat()
    }
}

type Record = Arc<Mutex<Vec<Arc<Mutex<Seen>>>>>;

/// A backend that answers each connection's first head with `answer(head)`
/// after `hold` (recording what arrives meanwhile), then keeps reading.
async fn recording_backend(hold: Duration, answer: fn(&[u8]) -> Vec<u8>) -> (SocketAddr, Record) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record: Record = Arc::default();
    let rec = record.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::new(Mutex::new(Seen::default()));
            rec.lock().unwrap().push(seen.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // The first head, byte-exact, plus what follows it in the same reads.
                loop {
                    let n = match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => {
                            seen.lock().unwrap().ended = true;
                            return;
                        }
                    };
                    let mut g = seen.lock().unwrap();
                    g.before.extend_from_slice(&buf[..n]);
                    if g.before.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let deadline = tokio::time::Instant::now() + hold;
                loop {
                    match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => {
                            seen.lock().unwrap().before.extend_from_slice(&buf[..n])
                        }
                        Ok(_) => {
                            seen.lock().unwrap().ended = true;
                            return;
                        }
                        Err(_) => break,
                    }
                }
                let head = seen.lock().unwrap().before.clone();
                let _ = s.write_all(&answer(&head)).await;
                loop {
                    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => {
                            seen.lock().unwrap().after.extend_from_slice(&buf[..n])
                        }
                        _ => break,
                    }
                }
                seen.lock().unwrap().ended = true;
            });
        }
    });
    (addr, record)
}

fn ok_answer(_: &[u8]) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
}

/// 101 for an upgrade (with the right accept key for [`KEY`]), 200 otherwise.
fn upgrade_answer(head: &[u8]) -> Vec<u8> {
    if String::from_utf8_lossy(head).contains("Upgrade: websocket") {
        switching_protocols().into_bytes()
    } else {
        ok_answer(head)
    }
}

fn forbidden(_: &[u8]) -> Vec<u8> {
    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nno way".to_vec()
}

/// Request lines in `bytes` (anything shaped like `METHOD /target HTTP/1.x`).
fn request_lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split("\r\n")
        .filter(|l| {
            let mut it = l.split(' ');
            matches!(
                (it.next(), it.next(), it.next(), it.next()),
                (Some(m), Some(t), Some(v), None)
                    if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase())
                        && t.starts_with('/') && v.starts_with("HTTP/1.")
            )
        })
        .map(str::to_string)
        .collect()
}

/// Sends `pieces` as separate writes (so they arrive in separate reads),
/// then reads ringlb's answer until it closes.
async fn send_pieces(addr: SocketAddr, pieces: &[&[u8]]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.write_all(p).await.unwrap();
    }
    read_to_close(&mut s).await
}

/// Waits until ringlb has closed every backend connection, then returns them.
async fn settled(record: &Record) -> Vec<Seen> {
    wait_until("ringlb closes every backend connection", || {
        record
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.lock().unwrap().ended)
    })
    .await;
    record
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.lock().unwrap().clone())
        .collect()
}

/// Every backend connection carries exactly one head, written by ringlb.
fn one_head_each(conns: &[Seen]) {
    assert!(!conns.is_empty(), "no backend connection at all");
    for c in conns {
        let all = c.all();
        let lines = request_lines(&all);
        assert_eq!(
            lines.len(),
            1,
            "a backend connection carried {} request heads: {:?}",
            lines.len(),
            String::from_utf8_lossy(&all)
        );
        let text = String::from_utf8_lossy(&all);
        assert!(
            text.contains("X-Real-IP: 127.0.0.1\r\n"),
            "head not written by ringlb: {text:?}"
        );
        assert!(
            !text.contains("/admin"),
            "a client's request leaked: {text:?}"
        );
    }
}

fn body_after_head(c: &Seen) -> Vec<u8> {
    let all = c.all();
    let end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    all[end..].to_vec()
}

const SMUGGLED: &[u8] = b"GET /admin HTTP/1.1\r\nHost: h\r\nX-Real-IP: 10.0.0.1\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelined_gets_in_one_write() {
    let (b, record) = recording_backend(Duration::ZERO, ok_answer).await;
    let proxy = Proxy::start(&config(&[b], "", ""));
    let first = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n";
    let resp = send_pieces(proxy.addr(), &[&[first.as_slice(), SMUGGLED].concat()]).await;
    assert_eq!(status_of(&resp), 200);
    let conns = settled(&record).await;
    one_head_each(&conns);
    assert_eq!(
        conns.len(),
        1,
        "the second request was forwarded: {conns:?}"
    );
    assert!(body_after_head(&conns[0]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_get_in_a_later_write() {
    let (b, record) = recording_backend(Duration::from_millis(200), ok_answer).await;
    let proxy = Proxy::start(&config(&[b], "", ""));
    let first = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n";
    let resp = send_pieces(proxy.addr(), &[first, SMUGGLED]).await;
    assert_eq!(status_of(&resp), 200);
    let conns = settled(&record).await;
    one_head_each(&conns);
    assert_eq!(conns.len(), 1);
    assert!(body_after_head(&conns[0]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_upgrade_then_pipelined_get() {
    let (b, record) = recording_backend(Duration::ZERO, forbidden).await;
    let proxy = Proxy::start(&config(&[b], "", ""));
    let up = upgrade_request("/ws", "");
    let resp = send_pieces(proxy.addr(), &[&[up.as_bytes(), SMUGGLED].concat()]).await;
    assert_eq!(status_of(&resp), 403);
    assert!(
        String::from_utf8_lossy(&resp).ends_with("no way"),
        "the 403's body reaches the client: {:?}",
        String::from_utf8_lossy(&resp)
    );
    let conns = settled(&record).await;
    one_head_each(&conns);
    assert_eq!(conns.len(), 1);
    assert!(body_after_head(&conns[0]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_body_then_a_request() {
    let (b, record) = recording_backend(Duration::from_millis(100), ok_answer).await;
    let proxy = Proxy::start(&config(&[b], "", ""));
    let post = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello";
    let resp = send_pieces(proxy.addr(), &[&[post.as_slice(), SMUGGLED].concat()]).await;
    assert_eq!(status_of(&resp), 200);
    let conns = settled(&record).await;
    one_head_each(&conns);
    assert_eq!(body_after_head(&conns[0]), b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_then_extra_bytes_in_pieces() {
    let (b, record) = recording_backend(Duration::from_millis(300), ok_answer).await;
    let proxy = Proxy::start(&config(&[b], "", ""));
    let head = b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
    let resp = send_pieces(
        proxy.addr(),
        &[
            head,
            b"5;ext=1\r\nhel",
            b"lo\r\n0\r\nTrailer-A: x\r\n",
            &[b"\r\n".as_slice(), SMUGGLED].concat(),
        ],
    )
    .await;
    assert_eq!(status_of(&resp), 200);
    let conns = settled(&record).await;
    one_head_each(&conns);
    assert_eq!(
        String::from_utf8_lossy(&body_after_head(&conns[0])),
        "5;ext=1\r\nhello\r\n0\r\nTrailer-A: x\r\n\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_that_undercounts() {
    let (b, record) = recording_backend(Duration::from_millis(100), ok_answer).await;
    let proxy = Proxy::start(&config(&[b], "", ""));
    let post = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nhello";
    let resp = send_pieces(proxy.addr(), &[&[post.as_slice(), SMUGGLED].concat()]).await;
    assert_eq!(status_of(&resp), 200);
    let conns = settled(&record).await;
    one_head_each(&conns);
    assert_eq!(body_after_head(&conns[0]), b"hel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_body_is_refused() {
    let (b, record) = recording_backend(Duration::from_millis(300), ok_answer).await;
    let proxy = Proxy::start(&config(&[b], "", ""));
    // A chunk size that is not hex: the body's end cannot be known.
    let req = b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
    let resp = send_pieces(proxy.addr(), &[req]).await;
    assert_eq!(
        status_of(&resp),
        400,
        "{:?}",
        String::from_utf8_lossy(&resp)
    );
    for c in settled(&record).await {
        assert!(
            !String::from_utf8_lossy(&c.all()).contains("hello"),
            "a malformed chunk reached the backend"
        );
    }
}

/// Bytes a client sends right behind its upgrade head wait for the 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_an_upgrade_head_wait_for_the_101() {
    let (b, record) = recording_backend(Duration::from_millis(300), upgrade_answer).await;
    let proxy = Proxy::start(&config(&[b], "", ""));
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let frame = client_frame(0x2, b"eager first frame");
    let up = upgrade_request("/ws", "");
    s.write_all(&[up.as_bytes(), &frame].concat())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101);
    wait_until("the frame reaches the backend", || {
        record
            .lock()
            .unwrap()
            .first()
            .is_some_and(|c| c.lock().unwrap().after.len() >= frame.len())
    })
    .await;
    let c = record.lock().unwrap()[0].lock().unwrap().clone();
    assert_eq!(
        request_lines(&c.before).len(),
        1,
        "{:?}",
        String::from_utf8_lossy(&c.before)
    );
    assert!(
        c.before.ends_with(b"\r\n\r\n"),
        "bytes behind the upgrade head reached the backend before its 101: {:?}",
        String::from_utf8_lossy(&c.before)
    );
    assert_eq!(c.after, frame);
    drop(s);
}

/// A backend that reads a whole Content-Length body, then answers with its size.
async fn body_counting_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = String::from_utf8_lossy(&read_head(&mut s).await).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                if s.read_exact(&mut body).await.is_err() {
                    return;
                }
                let answer = format!("got {len}");
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                            answer.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

/// `response_timeout` is the backend's time to answer, not the client's
/// time to upload: a slow upload that keeps moving for longer than it is
/// answered, and one that stops gets 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_longer_than_response_timeout_is_answered() {
    let b = body_counting_backend().await;
    let proxy = Proxy::start(&config(&[b], "", "response_timeout = \"1s\""));
    let total = 25 * 2400;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(
        format!("PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: {total}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    // 2.5 s at about 24 KB/s, well past the 1 s response_timeout.
    let chunk = vec![b'u'; total / 25];
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(&chunk).await.unwrap();
    }
    let resp = read_to_close(&mut s).await;
    assert_eq!(
        status_of(&resp),
        200,
        "{:?}",
        String::from_utf8_lossy(&resp)
    );
    assert!(String::from_utf8_lossy(&resp).ends_with(&format!("got {total}")));

    // The same upload stopping halfway.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(
        format!("PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: {total}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&chunk).await.unwrap();
    let resp = read_to_close(&mut s).await;
    assert_eq!(
        status_of(&resp),
        408,
        "{:?}",
        String::from_utf8_lossy(&resp)
    );
}

/// Dot segments are resolved before routing, so a path cannot reach a
/// backend through a route it does not belong to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_resolved_before_routing() {
    let public = Backend::start().await;
    let ws = Backend::start().await;
    let toml = format!(
        r#"[server]
listen = ["127.0.0.1:0"]
shards = 1

[[route]]
path = "/public"
upstream = "public"
strip_prefix = true

[[route]]
path = "/ws"
upstream = "ws"
websocket_only = true

[upstream.public]
servers = [{{ addr = "{}" }}]
[upstream.ws]
servers = [{{ addr = "{}" }}]
"#,
        public.addr, ws.addr
    );
    let proxy = Proxy::start(&toml);
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n");
    for (path, status) in [
        // /admin has no route: a direct request gets 404, so must these.
        ("/public/../admin/users", 404),
        ("/public/%2e%2e/admin/users", 404),
        ("/public/%2E%2e/admin/users", 404),
        // /ws only takes upgrades, however it is spelled.
        ("/public/../ws/x", 426),
        ("/public/%2e%2e/ws/x", 426),
        // Climbing above the root, or dots behind an encoded slash.
        ("/public/../../etc/passwd", 400),
        ("/public/..%2f..%2fadmin", 400),
        ("/public/..\\admin", 400),
    ] {
        let resp = raw_exchange(proxy.addr(), get(path).as_bytes()).await;
        assert_eq!(
            status_of(&resp),
            status,
            "{path}: {:?}",
            String::from_utf8_lossy(&resp)
        );
    }
    // A normalised path is what the backend sees, prefix stripped.
    connect(&proxy.url("/public/a/../b/./c?q=1")).await;
    assert_eq!(public.last_request().0, "/b/c?q=1");
}

fn header_values(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .collect()
}

/// At the edge (the default), the client's forwarding headers are dropped in
/// every spelling; behind a trusted proxy, its X-Forwarded-For is appended to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_belong_to_ringlb() {
    let b = Backend::start().await;
    let spoof = "X-Forwarded-For: 203.0.113.9\r\nX_Forwarded_For: 203.0.113.10\r\nX_Real_IP: 6.6.6.6\r\nX-Real_IP: 6.6.6.7\r\nX_Forwarded_Proto: https\r\nForwarded: for=10.9.9.9\r\nX-Forwarded-Host: evil.example\r\n";
    for (mode, xff) in [
        ("", "127.0.0.1"),
        ("forwarded_for = \"append\"", "203.0.113.9, 127.0.0.1"),
    ] {
        let proxy = Proxy::start(&config(&[b.addr], mode, ""));
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(upgrade_request("/", spoof).as_bytes())
            .await
            .unwrap();
        assert_eq!(status_of(&read_head(&mut s).await), 101);
        let (_, headers) = b.last_request();
        assert_eq!(
            header_values(&headers, "x-forwarded-for"),
            vec![xff],
            "{mode}"
        );
        assert_eq!(header_values(&headers, "x-real-ip"), vec!["127.0.0.1"]);
        assert_eq!(header_values(&headers, "x-forwarded-proto"), vec!["http"]);
        for gone in [
            "x_forwarded_for",
            "x_real_ip",
            "x-real_ip",
            "x_forwarded_proto",
            "forwarded",
            "x-forwarded-host",
        ] {
            assert!(
                header_values(&headers, gone).is_empty(),
                "{gone}: {headers:?}"
            );
        }
    }
}

/// A client naming the handshake's own headers as hop-by-hop still gets a
/// working upgrade (they used to be stripped, and the backend's accept key
/// then failed ringlb's check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_naming_the_websocket_key_still_upgrades() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[b.addr], "", ""));
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let req = upgrade_request("/", "Connection: Upgrade, Sec-WebSocket-Key\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101, "{}", String::from_utf8_lossy(&head));
}

/// A backend answer framed two ways is not passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_both_lengths_is_a_502() {
    let (b, _heads) = scripted_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n".to_vec(),
    )
    .await;
    let proxy = Proxy::start(&config(&[b], "", ""));
    let resp = raw_exchange(proxy.addr(), b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(
        status_of(&resp),
        502,
        "{:?}",
        String::from_utf8_lossy(&resp)
    );
}
