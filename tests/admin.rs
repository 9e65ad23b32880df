//! The admin listener facing hostile clients: slow clients cannot hold it,
//! browsers cannot be made to drive it (cross-site POST, DNS rebinding), and
//! an optional bearer token guards it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;

/// The limits admin.rs documents (docs/OPERATIONS.md, "Admin API").
const MAX_ADMIN_CONNECTIONS: usize = 16;
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

fn admin_config(admin_extra: &str) -> String {
    format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n{admin_extra}\n",
        config(&[closed_port()], "", "")
    )
}

/// Sends `head` (a request head, blank line included) and reads the answer
/// until the admin listener closes; (status, headers and body as text).
fn raw(admin: SocketAddr, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (status_of(out.as_bytes()), out)
}

fn get(admin: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    raw(
        admin,
        &format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\n{headers}\r\n"),
    )
}

/// One admin client that sends a request head one byte every 200 ms (a
/// bounded number of times); returns how long the listener let it live.
fn slowloris(admin: SocketAddr, ready: Arc<Barrier>) -> Duration {
    let mut s = TcpStream::connect(admin).unwrap();
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.write_all(b"G").unwrap();
    ready.wait();
    let mut buf = [0u8; 512];
    for _ in 0..100 {
        match s.read(&mut buf) {
            // An answer (408) or EOF: the listener gave up on us.
            Ok(_) => return t0.elapsed(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return t0.elapsed(),
        }
        if s.write_all(b"X").is_err() {
            return t0.elapsed();
        }
    }
    panic!("a slowloris client was kept for 20 s");
}

#[test]
fn slow_clients_do_not_hold_the_admin_listener() {
    let proxy = Proxy::start(&admin_config(""));
    let admin = proxy.admin.unwrap();
    const SLOW: usize = 4;
    let ready = Arc::new(Barrier::new(SLOW + 1));
    let slow: Vec<_> = (0..SLOW)
        .map(|_| {
            let ready = ready.clone();
            std::thread::spawn(move || slowloris(admin, ready))
        })
        .collect();
    ready.wait();
    // Every slow client is connected and trickling: others still get answers.
    for path in ["/status", "/metrics", "/status", "/metrics"] {
        let t0 = Instant::now();
        let (status, _) = proxy.admin("GET", path);
        assert_eq!(status, 200, "{path}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{path} took {:?} while slow clients were connected",
            t0.elapsed()
        );
    }
    for t in slow {
        let lived = t.join().unwrap();
        assert!(
            lived >= REQUEST_DEADLINE - Duration::from_millis(500)
                && lived < REQUEST_DEADLINE + Duration::from_secs(3),
            "a slow client was closed after {lived:?}, not at the {REQUEST_DEADLINE:?} deadline"
        );
    }
}

#[test]
fn admin_connections_beyond_the_cap_get_a_quick_503() {
    let proxy = Proxy::start(&admin_config(""));
    let admin = proxy.admin.unwrap();
    // Silent clients fill every slot (they are accepted in connect order).
    let idle: Vec<TcpStream> = (0..MAX_ADMIN_CONNECTIONS)
        .map(|_| TcpStream::connect(admin).unwrap())
        .collect();
    let t0 = Instant::now();
    let (status, text) = get(admin, "/status", "");
    assert_eq!(status, 503, "{text}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // The deadline frees the slots.
    for mut s in idle {
        s.set_read_timeout(Some(REQUEST_DEADLINE + Duration::from_secs(5)))
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            out.is_empty() || status_of(&out) == 408,
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    assert_eq!(proxy.admin("GET", "/status").0, 200);
}

#[test]
fn post_needs_the_admin_header_and_every_request_the_admin_host() {
    let b = closed_port();
    let proxy = Proxy::start(&format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        config(&[b], "", "")
    ));
    let admin = proxy.admin.unwrap();
    let drain = format!("/backends/u/{b}/drain");

    // A form POST from any web page: a simple request, no custom header.
    let (status, text) = raw(
        admin,
        &format!(
            "POST {drain} HTTP/1.1\r\nHost: {admin}\r\nOrigin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 0\r\n\r\n"
        ),
    );
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("X-Ringlb-Admin"), "{text}");
    let (_, st) = proxy.admin("GET", "/status");
    assert!(!st.contains("\"draining\""), "refused POST drained: {st}");

    // DNS rebinding: the browser sends the attacker's name as Host.
    let port = admin.port();
    for host in [
        format!("evil.example:{port}"),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        "127.0.0.1".to_string(),
        format!("127.0.0.2:{port}"),
    ] {
        let (status, text) = raw(
            admin,
            &format!("GET /status HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        );
        assert_eq!(status, 403, "Host {host}: {text}");
        let (status, text) = raw(
            admin,
            &format!(
                "POST {drain} HTTP/1.1\r\nHost: {host}\r\nX-Ringlb-Admin: 1\r\nContent-Length: 0\r\n\r\n"
            ),
        );
        assert_eq!(status, 403, "Host {host}: {text}");
    }
    let (status, text) = raw(admin, "GET /status HTTP/1.0\r\n\r\n");
    assert_eq!(status, 400, "no Host: {text}");
    let (_, st) = proxy.admin("GET", "/status");
    assert!(!st.contains("\"draining\""), "refused POST drained: {st}");

    // What curl, Prometheus and kubelet send.
    for host in [admin.to_string(), format!("localhost:{port}")] {
        let (status, text) = raw(
            admin,
            &format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        );
        assert_eq!(status, 200, "Host {host}: {text}");
    }
    let (status, text) = raw(
        admin,
        &format!(
            "POST {drain} HTTP/1.1\r\nHost: localhost:{port}\r\nX-Ringlb-Admin: 1\r\nContent-Length: 0\r\n\r\n"
        ),
    );
    assert_eq!(status, 200, "{text}");
    let (_, st) = proxy.admin("GET", "/status");
    assert!(st.contains("\"draining\""), "{st}");
}

#[test]
fn a_configured_token_is_required() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin.token");
    std::fs::write(&token_file, "s3cret-Token_1\n").unwrap();
    let b = closed_port();
    let proxy = Proxy::start(&format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\n",
        config(&[b], "", ""),
        token_file
    ));
    let admin = proxy.admin.unwrap();
    let drain = format!("/backends/u/{b}/drain");
    let post = |auth: &str| {
        raw(
            admin,
            &format!(
                "POST {drain} HTTP/1.1\r\nHost: {admin}\r\nX-Ringlb-Admin: 1\r\n{auth}Content-Length: 0\r\n\r\n"
            ),
        )
    };

    for auth in [
        "",
        "Authorization: Bearer wrong\r\n",
        "Authorization: Bearer s3cret-Token_\r\n",
        "Authorization: Bearer s3cret-Token_12\r\n",
        "Authorization: Basic czNjcmV0LVRva2VuXzE=\r\n",
    ] {
        for path in ["/status", "/metrics"] {
            let (status, text) = get(admin, path, auth);
            assert_eq!(status, 401, "{path} with {auth:?}: {text}");
            assert!(text.contains("WWW-Authenticate: Bearer"), "{text}");
        }
        let (status, text) = post(auth);
        assert_eq!(status, 401, "POST with {auth:?}: {text}");
    }
    // The liveness and readiness answers say nothing and need no token.
    let (status, text) = get(admin, "/healthz", "");
    assert_eq!(status, 200, "{text}");
    let (status, text) = get(admin, "/readyz", "");
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("ready\n"), "{text}");

    let good = "Authorization: Bearer s3cret-Token_1\r\n";
    let (status, text) = get(admin, "/status", good);
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("\"draining\""), "{text}");
    assert_eq!(get(admin, "/metrics", good).0, 200);
    let (status, text) = post(good);
    assert_eq!(status, 200, "{text}");
    let (_, text) = get(admin, "/status", good);
    assert!(text.contains("\"draining\""), "{text}");
}

/// `GET /` is the dashboard: served without the token (a browser cannot
/// attach one to a navigation; the page holds no data), with a policy that
/// keeps it from loading anything from elsewhere or being framed; every
/// other method is refused. `/status` carries the sums the dashboard draws,
/// equal to the ones `/metrics` exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_page_and_the_status_sums_it_reads() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin.token");
    std::fs::write(&token_file, "t0ken\n").unwrap();
    let b = Backend::start().await;
    let proxy = Proxy::start(&format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\n",
        config(&[b.addr], "", ""),
        token_file
    ));
    let admin = proxy.admin.unwrap();
    let (status, text) = get(admin, "/", "");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("Content-Type: text/html"), "{text}");
    assert!(
        text.contains("Content-Security-Policy: default-src 'none';")
            && text.contains("connect-src 'self'")
            && text.contains("frame-ancestors 'none'"),
        "{text}"
    );
    assert!(text.contains("<title>ringlb dashboard</title>"), "{text}");
    let (status, text) = raw(
        admin,
        &format!(
            "GET / HTTP/1.1\r\nHost: evil.example:{}\r\n\r\n",
            admin.port()
        ),
    );
    assert_eq!(status, 403, "DNS rebinding gets no page either: {text}");
    let (status, text) = raw(
        admin,
        &format!("POST / HTTP/1.1\r\nHost: {admin}\r\nX-Ringlb-Admin: 1\r\nAuthorization: Bearer t0ken\r\nContent-Length: 0\r\n\r\n"),
    );
    assert_eq!(status, 405, "{text}");

    let mut ws = connect(&proxy.url("/")).await;
    echo(&mut ws, "counted").await;
    drop(ws);
    let _ = raw_exchange(
        proxy.addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    let auth = "Authorization: Bearer t0ken\r\n";
    // Wait for the session's close to be counted, then compare: nothing
    // else happens in between.
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let (_, text) = get(admin, "/status", auth);
        let body = text.split_once("\r\n\r\n").unwrap().1;
        let st: serde_json::Value = serde_json::from_str(body).unwrap();
        if st["sessions_closed"]["client"] == 1 {
            break st;
        }
        assert!(Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (_, metrics) = get(admin, "/metrics", auth);
    let sample = |line: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in {metrics}"))
    };
    assert_eq!(st["handshakes"]["101"], 1, "{st}");
    assert_eq!(st["handshakes"]["400"], 1, "{st}");
    for (result, n) in st["handshakes"].as_object().unwrap() {
        assert_eq!(
            n.as_u64().unwrap(),
            sample(&format!("ringlb_handshakes_total{{result=\"{result}\"}}")),
            "{result}"
        );
    }
    // Per backend in the metrics, summed in /status.
    for (reason, n) in st["sessions_closed"].as_object().unwrap() {
        let label = format!("reason=\"{reason}\"}}");
        let summed: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("ringlb_sessions_closed_total{") && l.contains(&label))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(n.as_u64().unwrap(), summed, "{reason}");
    }
    for dir in ["client_to_backend", "backend_to_client"] {
        let n = st["bytes"][dir].as_u64().unwrap();
        assert!(n > 0, "{st}");
        assert_eq!(
            n,
            sample(&format!("ringlb_bytes_total{{direction=\"{dir}\"}}")),
            "{dir}"
        );
    }
}
