//! A route's Origin allow-list (cross-site WebSocket hijacking): an upgrade
//! from a page on a site not listed gets 403 from ringlb and never reaches
//! a backend; clients that send no Origin are let in or not, as configured.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn config_with(backend: std::net::SocketAddr, allow_missing: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\nallowed_origins = [\"https://app.example.com\", \"https://*.example.com\"]\n{allow_missing}\n\n[upstream.u]\nservers = [{{ addr = \"{backend}\" }}]\n"
    )
}

async fn upgrade_status(proxy: &Proxy, origin: Option<&str>) -> u16 {
    let extra = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(upgrade_request("/", &extra).as_bytes())
        .await
        .unwrap();
    status_of(&read_head(&mut s).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_origins_open_websockets() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config_with(b.addr, ""));
    assert_eq!(
        upgrade_status(&proxy, Some("https://app.example.com")).await,
        101
    );
    assert_eq!(
        upgrade_status(&proxy, Some("https://eu.example.com")).await,
        101
    );
    let before = b.active();
    for evil in [
        "https://evil.com",
        "https://app.example.com.evil.com",
        "http://app.example.com",
        "https://example.com",
        "null",
    ] {
        assert_eq!(upgrade_status(&proxy, Some(evil)).await, 403, "{evil}");
    }
    assert!(
        b.active() <= before,
        "a refused upgrade reached the backend"
    );
    // No Origin: a non-browser client, let in by default.
    assert_eq!(upgrade_status(&proxy, None).await, 101);
    // Plain requests are not WebSocket hijacking; the list does not apply.
    let r = raw_exchange(
        proxy.addr(),
        b"GET /x HTTP/1.1\r\nHost: h\r\nOrigin: https://evil.com\r\n\r\n",
    )
    .await;
    assert_ne!(status_of(&r), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_origin_can_be_refused() {
    let b = Backend::start().await;
    let proxy = Proxy::start(&config_with(b.addr, "allow_missing_origin = false"));
    assert_eq!(upgrade_status(&proxy, None).await, 403);
    assert_eq!(
        upgrade_status(&proxy, Some("https://app.example.com")).await,
        101
    );
}
