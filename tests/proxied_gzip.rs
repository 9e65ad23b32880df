//! gzip of proxied answers (a route's `gzip = true`, nginx's `gzip_proxied
//! any`): compressed as they stream when the client takes gzip, the type is
//! listed, nothing else encoded them, they are not a range and not too
//! small; everything else passes untouched; a slow client holds the backend
//! back instead of making ringlb buffer the answer.

mod common;

use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// JSON that compresses about 2:1 (hex of a pseudo-random sequence), so a
/// slow reader of the compressed answer is really slow.
fn json(n: usize) -> Vec<u8> {
    let mut out = b"{\"data\":\"".to_vec();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while out.len() < n - 2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(format!("{:016x}", x).as_bytes());
    }
    out.truncate(n - 2);
    out.extend_from_slice(b"\"}");
    out
}

/// A backend answering by path; counts the body bytes it managed to write.
async fn backend(written: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let written = written.clone();
            tokio::spawn(async move {
                let head = String::from_utf8_lossy(&read_head(&mut s).await).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let (head, body): (String, Vec<u8>) = match path.as_str() {
                    "/big.json" => {
                        let b = json(300_000);
                        (format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nETag: \"v1\"\r\n\r\n", b.len()), b)
                    }
                    "/chunked.json" => {
                        let content = json(200_000);
                        let mut b = Vec::new();
                        for c in content.chunks(7000) {
                            b.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                            b.extend_from_slice(c);
                            b.extend_from_slice(b"\r\n");
                        }
                        b.extend_from_slice(b"0\r\n\r\n");
                        ("HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n".into(), b)
                    }
                    "/close.txt" => (
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n".into(),
                        json(50_000),
                    ),
                    "/small.json" => {
                        let b = json(100);
                        (format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", b.len()), b)
                    }
                    "/encoded.json" => {
                        let b = json(5000);
                        (format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: br\r\nContent-Length: {}\r\n\r\n", b.len()), b)
                    }
                    "/range.json" => {
                        let b = json(5000);
                        (format!("HTTP/1.1 206 Partial Content\r\nContent-Type: application/json\r\nContent-Range: bytes 0-4999/9999\r\nContent-Length: {}\r\n\r\n", b.len()), b)
                    }
                    "/image.png" => {
                        let b = json(5000);
                        (format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n", b.len()), b)
                    }
                    _ => {
                        // /huge.json: 40 MB, written as fast as ringlb takes it.
                        let b = json(40 << 20);
                        (format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", b.len()), b)
                    }
                };
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for c in body.chunks(64 * 1024) {
                    if s.write_all(c).await.is_err() {
                        return;
                    }
                    written.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                if path == "/close.txt" {
                    drop(s);
                } else {
                    let mut sink = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_secs(30), s.read(&mut sink)).await;
                }
            });
        }
    });
    addr
}

fn proxy_config(b: SocketAddr) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\ngzip = true\n\n[upstream.u]\nservers = [{{ addr = \"{b}\" }}]\n"
    )
}

struct Answer {
    head: String,
    body: Vec<u8>,
}

async fn get(proxy: SocketAddr, path: &str, extra: &str, minor: u8) -> Answer {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.{minor}\r\nHost: h\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    let all = read_to_close(&mut s).await;
    let end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    Answer {
        head: String::from_utf8_lossy(&all[..end]).to_string(),
        body: all[end..].to_vec(),
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&data[..line]).unwrap(), 16).unwrap();
        data = &data[line + 2..];
        if n == 0 {
            assert_eq!(data, b"\r\n", "a proper last chunk");
            return out;
        }
        out.extend_from_slice(&data[..n]);
        assert_eq!(&data[n..n + 2], b"\r\n");
        data = &data[n + 2..];
    }
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("a valid gzip stream");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_compressed_as_they_stream() {
    let b = backend(Arc::default()).await;
    let proxy = Proxy::start(&proxy_config(b));
    let gz = "Accept-Encoding: gzip, br\r\n";
    for (path, content) in [
        ("/big.json", json(300_000)),
        ("/chunked.json", json(200_000)),
        ("/close.txt", json(50_000)),
    ] {
        let a = get(proxy.addr(), path, gz, 1).await;
        assert!(a.head.starts_with("HTTP/1.1 200"), "{path}: {}", a.head);
        assert!(
            a.head.contains("Content-Encoding: gzip\r\n"),
            "{path}: {}",
            a.head
        );
        assert!(a.head.contains("Vary: Accept-Encoding\r\n"), "{}", a.head);
        assert!(
            a.head.contains("Transfer-Encoding: chunked\r\n"),
            "{}",
            a.head
        );
        assert!(!a.head.contains("Content-Length"), "{}", a.head);
        let plain = gunzip(&dechunk(&a.body));
        assert!(plain == content, "{path}: the backend's exact bytes");
        assert!(a.body.len() < content.len() * 3 / 4, "{path}: compressed");
    }
    // The ETag of a compressed variant is weak; HTTP/1.0 gets no chunks.
    let a = get(proxy.addr(), "/big.json", gz, 1).await;
    assert!(a.head.contains("ETag: W/\"v1\"\r\n"), "{}", a.head);
    let a = get(proxy.addr(), "/big.json", gz, 0).await;
    assert!(!a.head.contains("chunked"), "{}", a.head);
    assert!(gunzip(&a.body) == json(300_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_must_not_be_compressed_passes_untouched() {
    let b = backend(Arc::default()).await;
    let proxy = Proxy::start(&proxy_config(b));
    let gz = "Accept-Encoding: gzip\r\n";
    for (path, extra, body) in [
        ("/small.json", gz, json(100)),
        ("/encoded.json", gz, json(5000)),
        ("/range.json", gz, json(5000)),
        ("/image.png", gz, json(5000)),
        ("/big.json", "", json(300_000)),
        (
            "/big.json",
            "Accept-Encoding: gzip;q=0, br\r\n",
            json(300_000),
        ),
    ] {
        let a = get(proxy.addr(), path, extra, 1).await;
        assert!(
            !a.head.contains("Content-Encoding: gzip"),
            "{path} {extra:?}: {}",
            a.head
        );
        assert!(
            a.body == body,
            "{path} {extra:?}: the body as the backend sent it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_backend_back() {
    let written = Arc::new(AtomicU64::new(0));
    let b = backend(written.clone()).await;
    let proxy = Proxy::start(&proxy_config(b));
    let rss_before = proxy.status_field("VmRSS:");
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"GET /huge.json HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n\r\n")
        .await
        .unwrap();
    // About 640 KB/s for 2 s.
    let mut got = 0usize;
    let mut buf = vec![0u8; 32 * 1024];
    for _ in 0..40 {
        got += s.read(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = written.load(Ordering::Relaxed);
    let rss_after = proxy.status_field("VmRSS:");
    eprintln!(
        "client read {got} B; backend wrote {sent} B of {}; ringlb RSS {rss_before} -> {rss_after} kB",
        40 << 20
    );
    assert!(
        sent < 24 << 20,
        "the backend was not held back: {sent} bytes written"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "ringlb buffered the answer: RSS {rss_before} -> {rss_after} kB"
    );
}
