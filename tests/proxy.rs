//! End-to-end behaviour of the proxy: ringlb as a child process, real
//! WebSocket clients (tokio-tungstenite) and backends, raw sockets where the
//! exact bytes matter.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

async fn next_data(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no message within 10 s")
            .expect("stream ended")
            .expect("websocket error");
        if m.is_text() || m.is_binary() || m.is_close() || m.is_pong() {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_text_binary_large_fragmented_ping_close() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[b.addr], "", ""));
    let mut ws = connect(&proxy.url("/")).await;

    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("hello".into()));

    let bin: Vec<u8> = (0..=255u8).collect();
    ws.send(Message::Binary(bin.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Binary(bin));

    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    ws.send(Message::Binary(big.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Binary(big));

    // A message in three fragments comes back whole from the backend.
    ws.send(Message::Frame(Frame::message(
        b"frag".to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        b"men".to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        b"ted".to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("fragmented".into()));

    ws.send(Message::Ping(b"p1".to_vec())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Pong(b"p1".to_vec()));

    // Client-initiated close: the code and reason reach the backend and its
    // echo comes back.
    ws.send(Message::Close(Some(CloseFrame {
        code: 4000u16.into(),
        reason: "client bye".into(),
    })))
    .await
    .unwrap();
    match next_data(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4000);
            assert_eq!(f.reason, "client bye");
        }
        m => panic!("expected close, got {m:?}"),
    }

    // Backend-initiated close with its own code and reason.
    let mut ws = connect(&proxy.url("/")).await;
    ws.send(Message::Text("server-close".into())).await.unwrap();
    match next_data(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4001);
            assert_eq!(f.reason, "server bye");
        }
        m => panic!("expected close, got {m:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_even_weighted_and_refill() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[a.addr, b.addr], "", ""));
    let mut held = Vec::new();
    for i in 0..21 {
        let mut ws = connect(&proxy.url("/")).await;
        // One echo proves the backend has counted this connection.
        ws.send(Message::Text(format!("{i}"))).await.unwrap();
        next_data(&mut ws).await;
        held.push(ws);
        let (x, y) = (a.active(), b.active());
        assert!(
            x.abs_diff(y) <= 1,
            "after {} connections: {x} vs {y}",
            i + 1
        );
    }
    assert_eq!(a.active() + b.active(), 21);

    for mut ws in held {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    }
    wait_until("condition", || a.active() + b.active() == 0).await;

    // Weighted 2:1.
    let proxy_w = Proxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nservers = [{{ addr = \"{}\", weight = 2 }}, {{ addr = \"{}\", weight = 1 }}]\n",
        a.addr, b.addr
    ));
    let mut held = Vec::new();
    for i in 0..30 {
        let mut ws = connect(&proxy_w.url("/")).await;
        ws.send(Message::Text(format!("{i}"))).await.unwrap();
        next_data(&mut ws).await;
        held.push(ws);
    }
    let (x, y) = (a.active(), b.active());
    assert!(
        x.abs_diff(20) <= 1 && y.abs_diff(10) <= 1,
        "weights 2:1 gave {x}:{y}"
    );
    drop(held);
    wait_until("condition", || a.active() + b.active() == 0).await;
}

/// After one backend loses its connections, new connections go there first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_refills_the_emptied_backend() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[a.addr, b.addr], "", ""));
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for i in 0..10 {
        let before = a.active();
        let mut ws = connect(&proxy.url("/")).await;
        ws.send(Message::Text(format!("{i}"))).await.unwrap();
        next_data(&mut ws).await;
        if a.active() > before {
            on_a.push(ws);
        } else {
            on_b.push(ws);
        }
    }
    assert_eq!((on_a.len(), on_b.len()), (5, 5));
    for mut ws in on_a.drain(..) {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    }
    wait_until("condition", || a.active() == 0).await;
    for i in 0..5 {
        let mut ws = connect(&proxy.url("/")).await;
        ws.send(Message::Text(format!("{i}"))).await.unwrap();
        next_data(&mut ws).await;
        on_a.push(ws);
        assert_eq!(
            a.active(),
            i + 1,
            "new connection {i} did not go to the emptied backend"
        );
        assert_eq!(b.active(), 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_sees_forwarding_headers_and_no_hop_by_hop() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[b.addr], "", ""));
    let req = upgrade_request(
        "/chat?room=1",
        "Connection: X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9v\r\nX-Forwarded-For: 203.0.113.9\r\nX-Real-IP: 6.6.6.6\r\nX-Custom: kept\r\n",
    );
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101, "{}", String::from_utf8_lossy(&head));

    let (uri, headers) = b.last_request();
    assert_eq!(uri, "/chat?room=1");
    let get = |n: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(get("host"), vec!["test.local"]);
    assert_eq!(get("upgrade"), vec!["websocket"]);
    assert!(get("connection")
        .iter()
        .any(|v| v.to_ascii_lowercase().contains("upgrade")));
    // ringlb is the edge by default: the client's list is not kept.
    assert_eq!(get("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(get("x-real-ip"), vec!["127.0.0.1"]);
    assert_eq!(get("x-forwarded-proto"), vec!["http"]);
    assert_eq!(get("x-custom"), vec!["kept"]);
    for gone in ["x-private", "keep-alive", "te", "proxy-authorization"] {
        assert!(
            get(gone).is_empty(),
            "{gone} reached the backend: {headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ringlb_answers_bad_requests_itself() {
    let b = Backend::start().await;
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\nmax_request_head = 1024\nmax_headers = 20\n\n[[route]]\npath = \"/ws\"\nupstream = \"u\"\n\n[upstream.u]\nservers = [{{ addr = \"{}\" }}]\n",
        b.addr
    );
    let proxy = Proxy::start(&toml);
    let addr = proxy.addr();

    let r = raw_exchange(
        addr,
        upgrade_request("/ws", "")
            .replace("Version: 13", "Version: 8")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&r), 426);
    assert!(String::from_utf8_lossy(&r).contains("Sec-WebSocket-Version: 13\r\n"));

    let nokey = upgrade_request("/ws", "").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "");
    assert_eq!(status_of(&raw_exchange(addr, nokey.as_bytes()).await), 400);
    let badkey = upgrade_request("/ws", "").replace(KEY, "not-base64!");
    assert_eq!(status_of(&raw_exchange(addr, badkey.as_bytes()).await), 400);
    assert_eq!(
        status_of(&raw_exchange(addr, b"\x16\x03\x01garbage\r\n\r\n").await),
        400
    );
    let big = upgrade_request("/ws", &format!("X-Big: {}\r\n", "a".repeat(2000)));
    assert_eq!(status_of(&raw_exchange(addr, big.as_bytes()).await), 431);
    let many: String = (0..30).map(|i| format!("X-{i}: v\r\n")).collect();
    assert_eq!(
        status_of(&raw_exchange(addr, upgrade_request("/ws", &many).as_bytes()).await),
        431
    );
    assert_eq!(
        status_of(&raw_exchange(addr, upgrade_request("/other", "").as_bytes()).await),
        404
    );
    assert_eq!(
        b.requests.lock().unwrap().len(),
        0,
        "a backend was bothered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backends_give_502_after_trying_each() {
    let proxy = Proxy::start(&config(
        &[closed_port(), closed_port(), closed_port()],
        "",
        "",
    ));
    let t = Instant::now();
    let r = raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await;
    assert_eq!(status_of(&r), 502);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_is_skipped_for_a_live_one() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[closed_port(), b.addr], "", ""));
    for _ in 0..6 {
        let mut ws = connect(&proxy.url("/")).await;
        ws.send(Message::Text("x".into())).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::Text("x".into()));
    }
}

/// A listener whose accept queue is full drops SYNs, so connects to it hang.
fn blackhole() -> (std::net::SocketAddr, Vec<std::net::TcpStream>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    // Fill the queue; stop at the first connect that does not complete at once.
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fill.push(s),
            Err(_) => break,
        }
    }
    std::mem::forget(sock);
    (addr, fill)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_gives_504() {
    let (hole, _fill) = blackhole();
    let proxy = Proxy::start(&config(&[hole], "", "connect_timeout = \"300ms\""));
    let t = Instant::now();
    let r = raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await;
    assert_eq!(status_of(&r), 504);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_head_is_closed_after_handshake_timeout() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[b.addr], "handshake_timeout = \"400ms\"", ""));
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let t = Instant::now();
    let out = read_to_close(&mut s).await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(out.is_empty(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_connections_gets_503() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        config(&[b.addr], "max_connections = 2", "")
    ));
    let mut w1 = connect(&proxy.url("/")).await;
    let mut w2 = connect(&proxy.url("/")).await;
    let r = raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await;
    assert_eq!(status_of(&r), 503);
    let (_, metrics) = proxy.admin("GET", "/metrics");
    assert!(
        metrics.contains("ringlb_handshakes_total{result=\"503\"} 1\n"),
        "{metrics}"
    );
    // The held ones are unaffected.
    for ws in [&mut w1, &mut w2] {
        ws.send(Message::Text("still".into())).await.unwrap();
        assert_eq!(next_data(ws).await, Message::Text("still".into()));
    }
    // Capacity frees when one closes.
    drop(w1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(upgrade_request("/", "").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        if status_of(&head) == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "capacity never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_longer_than_every_timeout_still_relays() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(
        &[b.addr],
        "handshake_timeout = \"200ms\"\nlinger_timeout = \"200ms\"\ntcp_keepalive = \"1s\"",
        "connect_timeout = \"200ms\"\nresponse_timeout = \"200ms\"",
    ));
    let mut ws = connect(&proxy.url("/")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ws.send(Message::Text("after idle".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("after idle".into()));
}

/// tungstenite refuses bytes after the request head ("junk after request"),
/// so this backend is raw: after its 101 it checks the bytes that follow are
/// exactly the frames the client sent with its head, and echoes them. (That
/// none of them arrives before the 101 is tests/smuggling.rs's job.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_frames_in_the_request_write_arrive_in_order() {
    let mut frames = client_frame(0x1, b"first");
    frames.extend(client_frame(0x2, &[7u8; 300]));
    frames.extend(client_frame(0x1, b"third"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let want = frames.clone();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let head = read_head(&mut s).await;
        let resp = switching_protocols();
        s.write_all(resp.as_bytes()).await.unwrap();
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(&got).await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        (head, got)
    });
    let proxy = Proxy::start(&config(&[addr], "", ""));
    let mut bytes = upgrade_request("/", "").into_bytes();
    bytes.extend(&frames);
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101, "{}", String::from_utf8_lossy(&head));
    let mut echoed = vec![0u8; frames.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, frames);
    drop(s);
    let (fwd_head, got) = backend.await.unwrap();
    assert!(fwd_head.ends_with(b"Upgrade: websocket\r\n\r\n"));
    assert_eq!(got, frames);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_101_answer_is_relayed_and_closed() {
    let body =
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nnope!\n"
            .to_vec();
    let (addr, mut heads) = scripted_backend(body.clone()).await;
    let proxy = Proxy::start(&config(&[addr], "", ""));
    let r = raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await;
    assert_eq!(r, body);
    assert!(heads
        .recv()
        .await
        .unwrap()
        .starts_with(b"GET / HTTP/1.1\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_accept_key_gives_502() {
    let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n".to_vec();
    let (addr, _heads) = scripted_backend(resp).await;
    let proxy = Proxy::start(&config(&[addr], "", ""));
    let r = raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await;
    assert_eq!(status_of(&r), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_prefix_and_longest_prefix() {
    let root = Backend::start().await;
    let api = Backend::start().await;
    let live = Backend::start().await;
    let toml = format!(
        r#"[server]
listen = ["127.0.0.1:0"]
shards = 2

[[route]]
path = "/"
upstream = "root"

[[route]]
path = "/api"
upstream = "api"
strip_prefix = true

[[route]]
path = "/api/live"
upstream = "live"

[upstream.root]
servers = [{{ addr = "{}" }}]
[upstream.api]
servers = [{{ addr = "{}" }}]
[upstream.live]
servers = [{{ addr = "{}" }}]
"#,
        root.addr, api.addr, live.addr
    );
    let proxy = Proxy::start(&toml);
    connect(&proxy.url("/api/x?y=1")).await;
    assert_eq!(api.last_request().0, "/x?y=1");
    connect(&proxy.url("/api")).await;
    assert_eq!(api.last_request().0, "/");
    connect(&proxy.url("/api/live/7")).await;
    assert_eq!(live.last_request().0, "/api/live/7");
    connect(&proxy.url("/apix")).await;
    assert_eq!(root.last_request().0, "/apix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_request_is_proxied_with_connection_close() {
    let resp =
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello".to_vec();
    let (addr, mut heads) = scripted_backend(resp.clone()).await;
    let proxy = Proxy::start(&config(&[addr], "", ""));
    let r = raw_exchange(
        proxy.addr(),
        b"GET /plain HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n\r\n",
    )
    .await;
    assert_eq!(r, resp);
    let head = String::from_utf8(heads.recv().await.unwrap()).unwrap();
    assert!(head.starts_with("GET /plain HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    assert!(!head.contains("Keep-Alive"), "{head}");
    assert_eq!(head.matches("Connection:").count(), 1, "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_post_body_reaches_backend() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let head = read_head(&mut s).await;
        let mut body = vec![0u8; 11];
        s.read_exact(&mut body).await.unwrap();
        s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        (head, body)
    });
    let proxy = Proxy::start(&config(&[addr], "", ""));
    let r = raw_exchange(
        proxy.addr(),
        b"POST /api/items HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
    )
    .await;
    assert_eq!(status_of(&r), 201);
    assert!(r.ends_with(b"\r\n\r\nok"));
    let (head, body) = server.await.unwrap();
    assert!(String::from_utf8_lossy(&head).contains("Content-Length: 11\r\n"));
    assert_eq!(body, b"hello world");
}

/// A backend that reads each request head and then hangs up without
/// answering: with a FIN on even connections, a reset on odd ones.
async fn hang_up_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let n = seen2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                if n % 2 == 1 {
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                }
                drop(s);
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_hangs_up_before_answering_is_retried_on_the_next() {
    let (bad, bad_seen) = hang_up_backend().await;
    let good = Backend::start().await;
    // max_fails = 0: the bad backend stays in rotation, so every other
    // pick lands on it and must be retried.
    let proxy = Proxy::start(&config(&[bad, good.addr], "", "max_fails = 0"));
    let mut sessions = Vec::new();
    for i in 0..10 {
        let mut ws = connect(&proxy.url("/")).await;
        echo(&mut ws, &format!("retried {i}")).await;
        sessions.push(ws);
    }
    assert!(
        bad_seen.load(Ordering::SeqCst) >= 5,
        "the bad backend was not tried"
    );

    drop(proxy);

    // A first frame sent with the upgrade request is resent too, in order.
    // (tungstenite refuses bytes after a handshake, so a raw backend here.)
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_addr = raw.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = raw.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                let _ = s.write_all(switching_protocols().as_bytes()).await;
                let mut frame = [0u8; 11];
                if s.read_exact(&mut frame).await.is_ok() {
                    let mask = &frame[2..6];
                    let text: Vec<u8> = frame[6..]
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ mask[i % 4])
                        .collect();
                    let mut out = vec![0x81, text.len() as u8];
                    out.extend(text);
                    let _ = s.write_all(&out).await;
                }
                let mut sink = [0u8; 64];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    let proxy = Proxy::start(&config(&[bad, raw_addr], "", "max_fails = 0"));
    let before = bad_seen.load(Ordering::SeqCst);
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut bytes = upgrade_request("/", "").into_bytes();
        bytes.extend(client_frame(0x1, b"eager"));
        s.write_all(&bytes).await.unwrap();
        let head = read_head(&mut s).await;
        assert_eq!(status_of(&head), 101);
        let mut frame = [0u8; 7];
        s.read_exact(&mut frame).await.unwrap();
        assert_eq!(&frame, b"\x81\x05eager");
        // Kept open, so the raw backend is busier and the bad one is
        // picked first from the second connection on.
        open.push(s);
    }
    let tried = bad_seen.load(Ordering::SeqCst) - before;
    assert!(tried >= 3, "the bad backend was tried {tried} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_never_sent_twice() {
    let (bad, bad_seen) = hang_up_backend().await;
    let (good, _heads) =
        scripted_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()).await;
    let proxy = Proxy::start(&config(&[bad, good], "", "max_fails = 0"));
    let mut answers = Vec::new();
    for _ in 0..6 {
        let r = raw_exchange(
            proxy.addr(),
            b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
        )
        .await;
        answers.push(status_of(&r));
    }
    // Each POST reached exactly one backend: the bad one's were 502s, the
    // good one's 200s.
    let bad_hits = bad_seen.load(Ordering::SeqCst);
    assert!(bad_hits >= 1, "{answers:?}");
    assert_eq!(
        answers.iter().filter(|&&s| s == 502).count(),
        bad_hits,
        "{answers:?}"
    );
}

/// A backend that serves WebSocket upgrades (echo) but hangs up on any
/// plain request for `/boom` before answering, as an app may on a request
/// it rejects.
async fn picky_backend() -> SocketAddr {
    let echo = Backend::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let echo = echo.addr;
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                if String::from_utf8_lossy(&head).starts_with("GET /boom") {
                    return drop(s);
                }
                // Anything else is passed to the echo server as it came.
                let mut up = TcpStream::connect(echo).await.unwrap();
                up.write_all(&head).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            });
        }
    });
    addr
}

/// No sequence of client requests may make ringlb refuse traffic a backend
/// would serve: a backend that hangs up on one request is not marked down
/// for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_mark_backends_down() {
    let a = picky_backend().await;
    let b = picky_backend().await;
    let proxy = Proxy::start(&config(
        &[a, b],
        "",
        "max_fails = 1\nfail_timeout = \"30s\"",
    ));
    for _ in 0..4 {
        let r = raw_exchange(proxy.addr(), b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n").await;
        assert_eq!(status_of(&r), 502);
    }
    for i in 0..4 {
        let mut ws = connect(&proxy.url("/")).await;
        echo(&mut ws, &format!("still served {i}")).await;
    }
}

/// Every backend marked down (they refused connections for a while): they
/// are tried anyway rather than answering 502 for fail_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_are_tried_anyway() {
    let gone = closed_port();
    let proxy = Proxy::start(&config(
        &[gone],
        "",
        "max_fails = 1\nfail_timeout = \"60s\"",
    ));
    let r = raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await;
    assert_eq!(status_of(&r), 502);
    // The backend comes back on the same port, within fail_timeout.
    let b = Backend::start_on(gone).await;
    let mut ws = connect(&proxy.url("/")).await;
    echo(&mut ws, "back").await;
    drop(b);
}
