//! PROXY protocol: behind a trusted L4 tier the address in the header is
//! the client's everywhere (X-Forwarded-For, X-Real-IP); anything else about
//! a header closes the connection and is counted; backends that want one
//! get a header with the client's address in front of the request.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use ringlb::proxy_protocol::{encode_v1, encode_v2, parse, Header, Parsed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn config_with(backend: SocketAddr, upstream_extra: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\nhandshake_timeout = \"1s\"\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.2/32\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\n\n[upstream.u]\n{upstream_extra}\nservers = [{{ addr = \"{backend}\" }}]\n"
    )
}

async fn from(source: &str, proxy: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    sock.connect(proxy).await.unwrap()
}

/// Sends `prefix` one byte per write, then an upgrade; what ringlb answers.
async fn exchange(source: &str, proxy: SocketAddr, prefix: &[u8]) -> Vec<u8> {
    let mut s = from(source, proxy).await;
    for b in prefix {
        s.write_all(&[*b]).await.unwrap();
    }
    let _ = s.write_all(upgrade_request("/", "").as_bytes()).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    // Up to the end of the answer's head, or the close.
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    out
}

fn xff(b: &Backend) -> String {
    b.last_request()
        .1
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|(_, v)| v.clone())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_from_a_trusted_tier_names_the_client() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config_with(b.addr, ""));
    let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
    for (src, header) in [
        (
            "203.0.113.7:51000",
            encode_v1("203.0.113.7:51000".parse().unwrap(), dst),
        ),
        (
            "198.51.100.9:4000",
            encode_v2("198.51.100.9:4000".parse().unwrap(), dst),
        ),
        (
            "[2001:db8::7]:4000",
            encode_v2(
                "[2001:db8::7]:4000".parse().unwrap(),
                "[2001:db8::1]:443".parse().unwrap(),
            ),
        ),
    ] {
        let r = exchange("127.0.0.2", proxy.addr(), &header).await;
        assert_eq!(status_of(&r), 101, "{src}: {}", String::from_utf8_lossy(&r));
        let ip = src.parse::<SocketAddr>().unwrap().ip().to_string();
        assert_eq!(xff(&b), ip);
    }
    // LOCAL (the tier's own health check): the connection's own address.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let r = exchange("127.0.0.2", proxy.addr(), &local).await;
    assert_eq!(status_of(&r), 101);
    assert_eq!(xff(&b), "127.0.0.2");
    // Not behind the tier, no header: an ordinary client.
    let r = exchange("127.0.0.3", proxy.addr(), b"").await;
    assert_eq!(status_of(&r), 101);
    assert_eq!(xff(&b), "127.0.0.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anything_else_about_a_header_closes_the_connection() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config_with(b.addr, ""));
    let spoof = encode_v1(
        "203.0.113.7:1".parse().unwrap(),
        "10.0.0.1:443".parse().unwrap(),
    );
    let mut oversize = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    oversize.extend_from_slice(&[0x21, 0x11, 0x10, 0x00]);
    let mut truncated = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    truncated.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
    for (source, prefix, what) in [
        (
            "127.0.0.3",
            spoof.clone(),
            "a header from an untrusted source",
        ),
        ("127.0.0.2", Vec::new(), "no header from the trusted tier"),
        (
            "127.0.0.2",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n".to_vec(),
            "a bad v1 port",
        ),
        ("127.0.0.2", oversize, "oversize v2 TLVs"),
        ("127.0.0.2", truncated, "truncated v2 addresses"),
    ] {
        let r = exchange(source, proxy.addr(), &prefix).await;
        assert!(
            r.is_empty(),
            "{what}: answered {:?}",
            String::from_utf8_lossy(&r)
        );
    }
    let (_, m) = proxy.admin("GET", "/metrics");
    for line in [
        "ringlb_proxy_protocol_refused_total{reason=\"untrusted\"} 1",
        "ringlb_proxy_protocol_refused_total{reason=\"missing\"} 1",
        "ringlb_proxy_protocol_refused_total{reason=\"malformed\"} 3",
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }
    // A header that never completes is cut at handshake_timeout.
    let mut s = from("127.0.0.2", proxy.addr()).await;
    s.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
    let got = read_to_close(&mut s).await;
    assert!(got.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_that_want_it_get_a_v2_header_with_the_client() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let seen = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let (h, n) = loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a header");
            buf.extend_from_slice(&chunk[..n]);
            if let Parsed::Header(h, n) = parse(&buf).unwrap() {
                break (h, n);
            }
        };
        while !buf[n..].windows(4).any(|w| w == b"\r\n\r\n") {
            let k = s.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..k]);
        }
        assert!(buf[n..].starts_with(b"GET / HTTP/1.1\r\n"));
        s.write_all(switching_protocols().as_bytes()).await.unwrap();
        let _ = s.read(&mut chunk).await;
        h
    });
    let proxy = Proxy::start(&config_with(backend, "send_proxy_protocol = \"v2\""));
    let mut c = from("127.0.0.3", proxy.addr()).await;
    let me = c.local_addr().unwrap();
    c.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(status_of(&read_head(&mut c).await), 101);
    drop(c);
    match seen.await.unwrap() {
        Header::Proxy { src, dst } => {
            assert_eq!(src, me, "the client's address and port");
            assert_eq!(dst, proxy.addr(), "the address the client connected to");
        }
        other => panic!("{other:?}"),
    }
}
