//! `--tls` against a real TLS WebSocket echo server written here on rustls
//! (blocking, a thread per connection, its own frame reading), with
//! certificates made by rcgen for each test: every mode, resumption on and
//! off in TLS 1.3 and 1.2, the server's own count of full and resumed
//! handshakes, records delivered a few bytes at a time, and the failures
//! (untrusted CA, wrong name, a server that does not speak TLS, bad flags).

mod common;
use common::*;

use ringlb_load::codec::{build_frame, OP_CLOSE, OP_PING, OP_PONG};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{HandshakeKind, ServerConfig, ServerConnection, StreamOwned};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

/// A CA and a leaf it signed, with the CA's PEM written to a file for `--ca`.
struct Pki {
    dir: PathBuf,
    ca_pem: PathBuf,
    leaf: CertificateDer<'static>,
    leaf_key: Vec<u8>,
}

impl Pki {
    fn new(names: &[&str]) -> Pki {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringlb-load-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ringlb-load test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let leaf = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &ca_cert, &ca_key)
            .unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
        Pki {
            dir,
            ca_pem,
            leaf: leaf.der().clone(),
            leaf_key: leaf_key.serialize_der(),
        }
    }

    fn ca(&self) -> String {
        self.ca_pem.to_str().unwrap().to_string()
    }

    fn server_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> ServerConfig {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.clone()));
        ServerConfig::builder_with_provider(Arc::new(ringlb_load::tls::provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.leaf.clone()], key)
            .unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the server saw.
#[derive(Default)]
struct Seen {
    full: AtomicU64,
    resumed: AtomicU64,
    messages: AtomicU64,
}

/// Writes at most 7 bytes per call, so TLS records reach the client in
/// many small TCP segments (the socket has TCP_NODELAY).
struct Trickle(TcpStream);

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(7);
        self.0.write(&buf[..n])
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// How the test server treats its socket.
#[derive(Clone, Copy, PartialEq)]
enum Manner {
    Normal,
    /// Records leave in segments of at most 7 bytes.
    Trickle,
    /// Waits before reading each message, so the client's socket fills and
    /// TLS records stay queued in rustls until the socket is writable.
    SlowReader,
}

/// A TLS WebSocket echo server: serves at most `max_conns` connections,
/// each on its own thread, so every thread ends.
fn tls_echo(config: ServerConfig, max_conns: usize, manner: Manner) -> (SocketAddr, Arc<Seen>) {
    let config = Arc::new(config);
    let seen = Arc::new(Seen::default());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().take(max_conns) {
            let Ok(s) = s else { break };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_nodelay(true).unwrap();
            let config = config.clone();
            let seen = s2.clone();
            std::thread::spawn(move || {
                let conn = ServerConnection::new(config).unwrap();
                if manner == Manner::Trickle {
                    serve(StreamOwned::new(conn, Trickle(s)), &seen, manner);
                } else {
                    serve(StreamOwned::new(conn, s), &seen, manner);
                }
            });
        }
    });
    (addr, seen)
}

fn serve<S: Read + Write>(mut tls: StreamOwned<ServerConnection, S>, seen: &Seen, manner: Manner) {
    let head = read_head(&mut tls);
    if head.is_empty() {
        return; // the handshake failed or the client left
    }
    match tls.conn.handshake_kind() {
        Some(HandshakeKind::Resumed) => seen.resumed.fetch_add(1, SeqCst),
        _ => seen.full.fetch_add(1, SeqCst),
    };
    let key = header(&head, "sec-websocket-key").expect("key");
    let accept = ringlb_load::codec::accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if tls.write_all(resp.as_bytes()).is_err() {
        return;
    }
    // Bounded: the client closes, or the 10 s read timeout ends it.
    loop {
        if manner == Manner::SlowReader {
            std::thread::sleep(Duration::from_millis(150));
        }
        let Some((op, fin, payload)) = read_frame(&mut tls) else {
            return;
        };
        let out = match op {
            OP_CLOSE => {
                let _ = tls.write_all(&build_frame(true, OP_CLOSE, None, &payload));
                let _ = tls.flush();
                return;
            }
            OP_PING => build_frame(true, OP_PONG, None, &payload),
            OP_PONG => continue,
            _ => {
                if fin {
                    seen.messages.fetch_add(1, SeqCst);
                }
                build_frame(fin, op, None, &payload)
            }
        };
        if tls.write_all(&out).and_then(|_| tls.flush()).is_err() {
            return;
        }
    }
}

fn tls13() -> &'static [&'static rustls::SupportedProtocolVersion] {
    static V: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    &V
}

fn clean(code: i32, v: &Option<serde_json::Value>, stderr: &str) -> serde_json::Value {
    let v = v
        .clone()
        .unwrap_or_else(|| panic!("no JSON; stderr:\n{stderr}"));
    assert_eq!(code, 0, "exit code; stderr:\n{stderr}\n{v}");
    assert_eq!(v["error_total"], 0, "{v}");
    v
}

fn tls_counts(v: &serde_json::Value) -> (u64, u64) {
    (
        v["tls"]["full"].as_u64().unwrap(),
        v["tls"]["resumed"].as_u64().unwrap(),
    )
}

#[test]
fn resumption_on_and_off_tls13() {
    let pki = Pki::new(&["localhost"]);
    let (addr, seen) = tls_echo(pki.server_config(tls13()), 40, Manner::Normal);
    let url = format!("wss://localhost:{}/", addr.port());
    let ca = pki.ca();
    // One at a time: the first is full, each later one uses a ticket the
    // one before got.
    let (code, v, stderr) = run_tool(&[
        "handshake",
        "--url",
        &url,
        "--ca",
        &ca,
        "--total",
        "20",
        "--concurrency",
        "1",
    ]);
    let v = clean(code, &v, &stderr);
    assert_eq!(tls_counts(&v), (1, 19), "{v}");
    assert_eq!(v["tls"]["handshakes"], 20);
    assert_eq!(v["params"]["tls"], true);
    assert_eq!(v["params"]["tls_resume"], true);
    assert_eq!(
        v["tls"]["negotiated"]["TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519"], 20,
        "{v}"
    );
    assert_eq!((seen.full.load(SeqCst), seen.resumed.load(SeqCst)), (1, 19));

    let (code, v, stderr) = run_tool(&[
        "handshake",
        "--url",
        &url,
        "--ca",
        &ca,
        "--total",
        "20",
        "--concurrency",
        "1",
        "--tls-resume",
        "--no-tls-resume",
    ]);
    let v = clean(code, &v, &stderr);
    assert_eq!(tls_counts(&v), (20, 0), "{v}");
    assert_eq!(v["params"]["tls_resume"], false);
    assert_eq!(
        (seen.full.load(SeqCst), seen.resumed.load(SeqCst)),
        (21, 19)
    );
}

#[test]
fn resumption_tls12_and_version_choice() {
    let pki = Pki::new(&["localhost"]);
    let (addr, seen) = tls_echo(
        pki.server_config(&[&rustls::version::TLS12]),
        20,
        Manner::Normal,
    );
    let url = format!("wss://localhost:{}/", addr.port());
    let ca = pki.ca();
    let (code, v, stderr) = run_tool(&[
        "handshake",
        "--url",
        &url,
        "--ca",
        &ca,
        "--total",
        "10",
        "--concurrency",
        "1",
    ]);
    let v = clean(code, &v, &stderr);
    assert_eq!(tls_counts(&v), (1, 9), "{v}");
    let neg = v["tls"]["negotiated"].as_object().unwrap();
    assert!(
        neg.keys()
            .all(|k| k.starts_with("TLSv1_2 TLS_ECDHE_ECDSA_")),
        "{v}"
    );
    assert_eq!((seen.full.load(SeqCst), seen.resumed.load(SeqCst)), (1, 9));

    // Offering only 1.3 to a 1.2-only server fails the handshake, counted as tls.
    let (code, v, _) = run_tool(&[
        "handshake",
        "--url",
        &url,
        "--ca",
        &ca,
        "--total",
        "3",
        "--concurrency",
        "1",
        "--tls-version",
        "1.3",
    ]);
    let v = v.expect("json");
    assert_eq!(code, 1, "{v}");
    assert_eq!(err(&v, "tls"), 3, "{v}");
    assert_eq!(tls_counts(&v), (0, 0));
}

#[test]
fn every_mode_over_tls() {
    let pki = Pki::new(&["localhost"]);
    let (addr, seen) = tls_echo(pki.server_config(tls13()), 200, Manner::Normal);
    let url = format!("wss://localhost:{}/", addr.port());
    let ca = pki.ca();
    let base = ["--url", &url, "--ca", &ca];
    let run = |mode: &str, extra: &[&str]| {
        let mut args = vec![mode];
        args.extend_from_slice(&base);
        args.extend_from_slice(extra);
        let (code, v, stderr) = run_tool(&args);
        clean(code, &v, &stderr)
    };

    let v = run(
        "pingpong",
        &["--connections", "8", "--size", "100", "--duration", "300ms"],
    );
    let msgs = v["messages"].as_u64().unwrap();
    assert!(msgs > 50, "{v}");
    assert_eq!(v["bytes"].as_u64().unwrap(), msgs * 100);
    assert_eq!(v["connections"]["alive"], 8);
    assert_eq!(v["tls"]["handshakes"], 8, "{v}");

    // Two threads in each of two processes: the TLS counts are merged.
    let v = run(
        "pingpong",
        &[
            "--connections",
            "8",
            "--size",
            "2000",
            "--binary",
            "--duration",
            "300ms",
            "--threads",
            "2",
            "--procs",
            "2",
        ],
    );
    assert_eq!(v["connections"]["alive"], 8);
    assert_eq!(v["tls"]["handshakes"], 8, "{v}");

    let v = run(
        "rate",
        &[
            "--connections",
            "4",
            "--rate",
            "1000",
            "--duration",
            "500ms",
        ],
    );
    let msgs = v["messages"].as_u64().unwrap();
    assert!((490..=510).contains(&msgs), "{v}");

    // 1 MiB messages: many records per message, several per socket read.
    let v = run(
        "bulk",
        &[
            "--connections",
            "2",
            "--size",
            "1MiB",
            "--duration",
            "500ms",
        ],
    );
    let msgs = v["messages"].as_u64().unwrap();
    assert!(msgs >= 2, "{v}");
    assert_eq!(v["bytes"].as_u64().unwrap(), msgs << 20);

    let v = run("idle", &["--connections", "20", "--hold", "300ms"]);
    assert_eq!(v["connections"]["alive"], 20);
    assert_eq!(v["messages"], 40);
    assert_eq!(v["tls"]["handshakes"], 20);

    let v = run(
        "handshake",
        &["--total", "30", "--concurrency", "3", "--no-tls-resume"],
    );
    assert_eq!(v["connections"]["alive"], 30);
    assert_eq!(tls_counts(&v), (30, 0));

    // Every message the tool counted was echoed by this server, and more
    // (warm-up, and messages finishing after a window).
    let counted = seen.messages.load(SeqCst);
    assert!(counted > 0);
}

#[test]
fn records_in_small_segments_and_a_slow_reader() {
    let pki = Pki::new(&["localhost"]);
    let ca = pki.ca();
    // Trickled records are slow to send: small messages there. Against the
    // slow reader, 4 MiB messages fill the socket buffers.
    for (manner, big) in [(Manner::Trickle, "40000"), (Manner::SlowReader, "4MiB")] {
        let (addr, _) = tls_echo(pki.server_config(tls13()), 10, manner);
        let url = format!("wss://localhost:{}/", addr.port());
        for (mode, size) in [("pingpong", "300"), ("bulk", big)] {
            let (code, v, stderr) = run_tool(&[
                mode,
                "--url",
                &url,
                "--ca",
                &ca,
                "--connections",
                "2",
                "--size",
                size,
                "--duration",
                "1s",
                "--timeout",
                "3s",
            ]);
            let v = clean(code, &v, &stderr);
            assert!(v["messages"].as_u64().unwrap() > 0, "{v}");
            assert_eq!(v["connections"]["alive"], 2, "{v}");
        }
    }
}

#[test]
fn certificate_checks() {
    let pki = Pki::new(&["localhost"]);
    let other = Pki::new(&["localhost"]);
    let (addr, _) = tls_echo(pki.server_config(tls13()), 30, Manner::Normal);
    let port = addr.port().to_string();
    let by_name = format!("wss://localhost:{port}/");
    let by_ip = format!("wss://127.0.0.1:{port}/");
    let hs = |url: &str, extra: &[&str]| {
        let mut a = vec![
            "handshake",
            "--url",
            url,
            "--total",
            "2",
            "--concurrency",
            "1",
        ];
        a.extend_from_slice(extra);
        run_tool(&a)
    };
    let ca = pki.ca();
    let other_ca = other.ca();

    // Signed by another CA: every handshake fails, under `tls`.
    let (code, v, _) = hs(&by_name, &["--ca", &other_ca]);
    let v = v.expect("json");
    assert_eq!(code, 1);
    assert_eq!(err(&v, "tls"), 2, "{v}");
    assert_eq!(v["connections"]["opened"], 0);
    // --insecure accepts it.
    let (code, v, stderr) = hs(&by_name, &["--insecure"]);
    clean(code, &v, &stderr);

    // The certificate names localhost only: an IP URL fails unless --sni says localhost.
    let (code, v, _) = hs(&by_ip, &["--ca", &ca]);
    assert_eq!(code, 1);
    assert_eq!(err(&v.expect("json"), "tls"), 2);
    let (code, v, stderr) = hs(&by_ip, &["--ca", &ca, "--sni", "localhost"]);
    clean(code, &v, &stderr);
    let (code, v, _) = hs(&by_name, &["--ca", &ca, "--sni", "other.example"]);
    assert_eq!(code, 1);
    assert_eq!(err(&v.expect("json"), "tls"), 2);
}

#[test]
fn server_without_tls_is_a_tls_error() {
    // What a plaintext HTTP server says to a ClientHello.
    let addr = raw_backend(2, |mut s| {
        let mut b = [0u8; 512];
        let _ = s.read(&mut b);
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
    });
    let url = format!("ws://{addr}/");
    let (code, v, _) = run_tool(&[
        "handshake",
        "--url",
        &url,
        "--tls",
        "--insecure",
        "--total",
        "2",
        "--concurrency",
        "1",
    ]);
    let v = v.expect("json");
    assert_eq!(code, 1);
    assert_eq!(err(&v, "tls"), 2, "{v}");
    assert_eq!(v["params"]["tls"], true);
}

#[test]
fn cipher_suite_choice() {
    let pki = Pki::new(&["localhost"]);
    let (addr, _) = tls_echo(pki.server_config(tls13()), 10, Manner::Normal);
    let url = format!("wss://localhost:{}/", addr.port());
    let ca = pki.ca();
    for suite in ["TLS13_AES_128_GCM_SHA256", "TLS13_CHACHA20_POLY1305_SHA256"] {
        let (code, v, stderr) = run_tool(&[
            "pingpong",
            "--url",
            &url,
            "--ca",
            &ca,
            "--connections",
            "1",
            "--duration",
            "100ms",
            "--tls-cipher",
            suite,
        ]);
        let v = clean(code, &v, &stderr);
        let key = format!("TLSv1_3 {suite} X25519");
        assert_eq!(v["tls"]["negotiated"][&key], 1, "{v}");
    }
}

#[test]
fn bad_tls_arguments_exit_2() {
    let pki = Pki::new(&["localhost"]);
    let ca = pki.ca();
    let cases: &[(&[&str], &str)] = &[
        (&["--url", "wss://127.0.0.1:9/"], "--ca FILE"),
        (&["--url", "ws://127.0.0.1:9/", "--ca", &ca], "need --tls"),
        (
            &[
                "--url",
                "wss://127.0.0.1:9/",
                "--insecure",
                "--tls-cipher",
                "TLS_NOPE",
            ],
            "unknown cipher suite",
        ),
        (
            &["--url", "wss://127.0.0.1:9/", "--ca", "/nonexistent/ca.pem"],
            "/nonexistent/ca.pem",
        ),
        (
            &[
                "--url",
                "wss://127.0.0.1:9/",
                "--insecure",
                "--tls-version",
                "1.1",
            ],
            "use 1.2 or 1.3",
        ),
    ];
    for (args, msg) in cases {
        let mut a = vec!["handshake", "--total", "1"];
        a.extend_from_slice(args);
        let (code, _, stderr) = run_tool(&a);
        assert_eq!(code, 2, "{a:?}: {stderr}");
        assert!(stderr.contains(msg), "{a:?}: {stderr}");
    }
    let (code, _, stderr) = run_tool(&[
        "http",
        "--url",
        "http://127.0.0.1:9/",
        "--tls",
        "--insecure",
        "--requests",
        "1",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("does not speak TLS"), "{stderr}");
}
