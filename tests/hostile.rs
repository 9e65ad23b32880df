//! Hostile and broken peers: every case gets a clear HTTP error or a clean
//! close, never a hang, and never harms a healthy session running beside it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

async fn healthy(proxy: &Proxy) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(proxy.url("/"))
        .await
        .unwrap();
    ws.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("hi".into())
    );
    ws
}

async fn still_healthy(ws: &mut Ws) {
    ws.send(Message::Text("still".into())).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m, Message::Text("still".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_and_malformed_heads_get_400() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[b.addr], "", ""));
    let mut ws = healthy(&proxy).await;
    let cases: &[(&str, &[u8])] = &[
        ("CL and TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("duplicate CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n"),
        ("CL not a number", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n"),
        ("TE not chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n"),
        ("NUL in header", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n"),
        ("control char in header", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n"),
        ("space in header name", b"GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n"),
        ("bad method", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("bad version", b"GET / HTTP/9.9\r\nHost: a\r\n\r\n"),
        ("absolute form", b"GET http://evil/ HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("asterisk form", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("no Host on 1.1", b"GET / HTTP/1.1\r\nX: y\r\n\r\n"),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("binary garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
    ];
    for (what, bytes) in cases {
        let r = raw_exchange(proxy.addr(), bytes).await;
        assert_eq!(
            status_of(&r),
            400,
            "{what}: {}",
            String::from_utf8_lossy(&r)
        );
    }
    let with_body = upgrade_request("/", "Content-Length: 3\r\n") + "abc";
    assert_eq!(
        status_of(&raw_exchange(proxy.addr(), with_body.as_bytes()).await),
        400,
        "upgrade with a body"
    );
    assert_eq!(
        b.requests.lock().unwrap().len(),
        1,
        "only the healthy session reached the backend"
    );
    still_healthy(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_heads_in_many_writes_get_431() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[b.addr], "max_request_head = 4096", ""));
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    // 100-byte header lines, one write each, well past the limit.
    let line = format!("X-Pad: {}\r\n", "p".repeat(91));
    let mut answer = Vec::new();
    for _ in 0..100 {
        if s.write_all(line.as_bytes()).await.is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(5), s.read(&mut buf)).await {
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.ends_with(b"\n") {
                break;
            }
        }
    }
    if answer.is_empty() {
        answer = read_to_close(&mut s).await;
    }
    assert_eq!(status_of(&answer), 431);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_handshake_timeout_while_others_are_served() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config(&[b.addr], "handshake_timeout = \"1s\"", ""));
    let head = upgrade_request("/", "");
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(TcpStream::connect(proxy.addr()).await.unwrap());
    }
    let t = Instant::now();
    // One byte every 100 ms on each; normal clients are served meanwhile.
    let mut served = 0;
    let mut closed_at = vec![None; slow.len()];
    for (i, byte) in head.bytes().enumerate().take(30) {
        for (j, s) in slow.iter_mut().enumerate() {
            if closed_at[j].is_none() && s.write_all(&[byte]).await.is_err() {
                closed_at[j] = Some(t.elapsed());
            }
        }
        if i % 5 == 0 {
            let mut ws = healthy(&proxy).await;
            still_healthy(&mut ws).await;
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 5);
    // Every slow client has been closed by now (30 x 100 ms > 1 s + slack).
    for s in slow.iter_mut() {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        match r {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            other => panic!("slow client not closed: {other:?}"),
        }
    }
    assert!(t.elapsed() >= Duration::from_secs(1));
}

/// A backend that accepts and never answers.
async fn silent_backend() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_backends() {
    // Never answers: 504 after response_timeout.
    let silent = silent_backend().await;
    let proxy = Proxy::start(&config(&[silent], "", "response_timeout = \"500ms\""));
    let t = Instant::now();
    let r = raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await;
    assert_eq!(status_of(&r), 504);
    assert!(t.elapsed() >= Duration::from_millis(450));
    drop(proxy);

    // Answers garbage: 502.
    let (garbage, _h) = scripted_backend(b"\x00\x01garbage\r\n\r\n".to_vec()).await;
    let proxy = Proxy::start(&config(&[garbage], "", ""));
    assert_eq!(
        status_of(&raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await),
        502
    );
    drop(proxy);

    // A response head over max_response_head: 502.
    let huge = format!(
        "HTTP/1.1 101 Switching Protocols\r\nX-Big: {}\r\n\r\n",
        "b".repeat(5000)
    )
    .into_bytes();
    let (big, _h) = scripted_backend(huge).await;
    let proxy = Proxy::start(&config(&[big], "", "max_response_head = 1024"));
    assert_eq!(
        status_of(&raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await),
        502
    );
    drop(proxy);

    // Closes before answering: 502.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closer = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = read_head(&mut s).await;
        }
    });
    let proxy = Proxy::start(&config(&[closer], "", ""));
    assert_eq!(
        status_of(&raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await),
        502
    );
    drop(proxy);

    // 101 and then an immediate close: the client gets the 101, then EOF.
    let resp = switching_protocols();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let quitter = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = read_head(&mut s).await;
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    let proxy = Proxy::start(&config(&[quitter], "", ""));
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    let out = read_to_close(&mut s).await;
    assert_eq!(status_of(&out), 101);
}

/// A client that never reads while the backend floods it: ringlb stops
/// reading from the backend (bounded buffers), its RSS stays flat, and a
/// healthy session beside it is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_costs_bounded_memory() {
    // The backend floods 64 KiB frames as long as it can write.
    let resp = switching_protocols();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flooder = l.local_addr().unwrap();
    let (sent_tx, sent_rx) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let _ = read_head(&mut s).await;
        s.write_all(resp.as_bytes()).await.unwrap();
        let mut frame = vec![0x82u8, 127];
        frame.extend_from_slice(&(65536u64).to_be_bytes());
        frame.extend(std::iter::repeat_n(0x55u8, 65536));
        let mut sent = 0u64;
        // Bounded: stops after 512 MiB or when writes block for 2 s.
        while sent < 512 << 20 {
            match tokio::time::timeout(Duration::from_secs(2), s.write_all(&frame)).await {
                Ok(Ok(())) => {
                    sent += frame.len() as u64;
                    let _ = sent_tx.send(sent);
                }
                _ => break,
            }
        }
        // Keep the socket open until the test ends.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let echo = Backend::start().await;
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n[[route]]\npath = \"/flood\"\nupstream = \"f\"\n[[route]]\npath = \"/\"\nupstream = \"e\"\n[upstream.f]\nservers = [{{ addr = \"{flooder}\" }}]\n[upstream.e]\nservers = [{{ addr = \"{}\" }}]\n",
        echo.addr
    );
    let proxy = Proxy::start(&toml);
    let mut victim = TcpStream::connect(proxy.addr()).await.unwrap();
    victim
        .write_all(upgrade_request("/flood", "").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut victim).await;
    assert_eq!(status_of(&head), 101);
    // Never read again. Wait (bounded) for a 700 ms window in which the
    // backend could not write a byte: the flood has stalled on backpressure.
    let mut stalled = None;
    for _ in 0..40 {
        let (s1, r1) = (*sent_rx.borrow(), proxy.status_field("VmRSS:"));
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (s2, r2) = (*sent_rx.borrow(), proxy.status_field("VmRSS:"));
        if s1 == s2 && s2 > 0 {
            stalled = Some((s2, r1, r2));
            break;
        }
    }
    let (sent, rss1, rss2) = stalled.expect("the flood never stalled");
    eprintln!(
        "flood stalled after {} KiB; ringlb RSS {rss1} kB -> {rss2} kB",
        sent >> 10
    );
    assert!(sent < 64 << 20, "stalled only after {sent} bytes");
    assert!(rss2 < 64 * 1024, "ringlb RSS {rss2} kB");
    assert!(
        rss2 <= rss1 + 256,
        "RSS grows while stalled: {rss1} -> {rss2} kB"
    );
    // The other session on the same shard is unaffected.
    let mut ws = healthy(&proxy).await;
    still_healthy(&mut ws).await;
}
