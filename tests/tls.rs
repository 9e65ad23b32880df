//! TLS termination (`[tls]`): wss:// through ringlb with real clients that
//! verify against a CA made here (rcgen), TLS 1.2 and 1.3, SNI, byte-exact
//! relaying, reload of certificates, hostile input on the TLS port.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;

/// A CA and leaf certificates it signed, written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "ringlb test CA");
        let ca = p.self_signed(&ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca, ca_key }
    }

    /// Issues a certificate for `names` as `<file>.pem` / `<file>.key`;
    /// returns its DER.
    fn issue(&self, file: &str, names: &[&str]) -> Vec<u8> {
        self.issue_valid(file, names, None)
    }

    fn issue_valid(&self, file: &str, names: &[&str], expired: Option<()>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired.is_some() {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        std::fs::write(self.path(&format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{file}.key")), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        roots
    }
}

/// The `[tls]` section for these certificate files (first is the default).
fn tls_section(pki: &Pki, files: &[&str], extra: &str) -> String {
    let certs: Vec<String> = files
        .iter()
        .map(|f| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                pki.path(&format!("{f}.pem")).display(),
                pki.path(&format!("{f}.key")).display()
            )
        })
        .collect();
    format!(
        "\n[tls]\nlisten = [\"127.0.0.1:0\"]\ncertificates = [{}]\n{extra}\n",
        certs.join(", ")
    )
}

/// ringlb with a plaintext and a TLS listener in front of `backends`.
fn start(
    pki: &Pki,
    backends: &[SocketAddr],
    files: &[&str],
    server_extra: &str,
) -> (Proxy, SocketAddr) {
    let cfg = config(backends, server_extra, "") + &tls_section(pki, files, "");
    start_cfg(&cfg)
}

fn start_cfg(cfg: &str) -> (Proxy, SocketAddr) {
    start_cfg_under(cfg, &[])
}

/// `start_cfg` with the daemon run under `wrapper` (e.g. `env VAR=...`).
fn start_cfg_under(cfg: &str, wrapper: &[&str]) -> (Proxy, SocketAddr) {
    let proxy = if wrapper.is_empty() {
        Proxy::start(cfg)
    } else {
        Proxy::start_under(cfg, wrapper)
    };
    let line = proxy.wait_log("shards, TLS)", Duration::from_secs(10));
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    (proxy, addr)
}

fn client_config(
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

type TlsWs = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A verified TLS connection to `addr` as `name`.
async fn tls_connect(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .expect("TLS handshake timed out")
}

async fn wss(cfg: Arc<rustls::ClientConfig>, addr: SocketAddr, name: &str) -> TlsWs {
    let tls = tls_connect(cfg, addr, name).await.expect("TLS handshake");
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(format!("wss://{name}/"), tls),
    )
    .await
    .expect("upgrade timed out")
    .expect("upgrade failed");
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo_tls(ws: &mut TlsWs, msg: Message) {
    ws.send(msg.clone()).await.unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("no echo within 20 s")
            .expect("stream ended")
            .expect("websocket error");
        if m.is_text() || m.is_binary() {
            assert!(m == msg, "echo differs ({} bytes sent)", msg.len());
            return;
        }
    }
}

fn metric(body: &str, line_start: &str) -> u64 {
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_start}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_echo_over_tls13_and_tls12_verifying_the_ca() {
    let pki = Pki::new();
    pki.issue("a", &["a.test", "localhost"]);
    let b = Backend::start().await;
    let admin = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let cfg = config(&[b.addr], "", "") + &tls_section(&pki, &["a"], "") + admin;
    let (proxy, tls_addr) = start_cfg(&cfg);
    for (v, label) in [
        (&rustls::version::TLS13, "TLSv1_3"),
        (&rustls::version::TLS12, "TLSv1_2"),
    ] {
        let mut ws = wss(client_config(&pki, &[v]), tls_addr, "a.test").await;
        assert_eq!(
            ws.get_ref()
                .get_ref()
                .1
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .as_deref(),
            Some(label)
        );
        for i in 0..20 {
            echo_tls(&mut ws, Message::Text(format!("hello {label} {i}"))).await;
        }
        echo_tls(&mut ws, Message::Binary(vec![7u8; 200_000])).await;
        let (_, headers) = b.last_request();
        let proto = headers
            .iter()
            .find(|(n, _)| n == "x-forwarded-proto")
            .map(|(_, v)| v.as_str());
        assert_eq!(
            proto,
            Some("https"),
            "the backend must be told the client came over TLS"
        );
        ws.close(None).await.unwrap();
    }
    // The plaintext listener still says http.
    let mut ws = connect(&proxy.url("/")).await;
    echo(&mut ws, "plain").await;
    let (_, headers) = b.last_request();
    let proto = headers
        .iter()
        .find(|(n, _)| n == "x-forwarded-proto")
        .map(|(_, v)| v.as_str());
    assert_eq!(proto, Some("http"));
    let (_, m) = proxy.admin("GET", "/metrics");
    assert_eq!(
        metric(
            &m,
            "ringlb_tls_handshakes_total{result=\"full\",version=\"1.3\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &m,
            "ringlb_tls_handshakes_total{result=\"full\",version=\"1.2\"}"
        ),
        1
    );
    assert_eq!(metric(&m, "ringlb_tls_handshake_duration_seconds_count"), 2);
    let expiry = metric(&m, "ringlb_tls_certificate_expiry_timestamp_seconds{cert=");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        expiry > now,
        "certificate expiry {expiry} not after now {now}"
    );
    proxy.wait_log("tls certificate ", Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_matching_certificate_and_unknown_names_get_the_default() {
    let pki = Pki::new();
    let a = pki.issue("a", &["a.test"]);
    let b_der = pki.issue("b", &["b.test", "*.wild.test"]);
    let backend = Backend::start().await;
    let (_proxy, tls_addr) = start(&pki, &[backend.addr], &["a", "b"], "");
    // Only the certificate is checked here, so this client accepts any name
    // signed by the CA; the test asserts which certificate was presented.
    for (name, want) in [
        ("a.test", &a),
        ("b.test", &b_der),
        ("x.wild.test", &b_der),
        ("unknown.test", &a),
    ] {
        let cfg = client_config_any_name(&pki);
        let tls = tls_connect(cfg, tls_addr, name).await.expect("handshake");
        let got = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        assert!(&got == want, "SNI {name}: wrong certificate");
    }
    // And a verifying client for b.test works end to end.
    let mut ws = wss(
        client_config(&pki, &[&rustls::version::TLS13]),
        tls_addr,
        "b.test",
    )
    .await;
    echo_tls(&mut ws, Message::Text("sni".into())).await;
}

/// Verifies the chain against the CA but not the name, to see which
/// certificate an unknown SNI gets.
fn client_config_any_name(pki: &Pki) -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);
    impl rustls::client::danger::ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &rustls::pki_types::CertificateDer<'_>,
            intermediates: &[rustls::pki_types::CertificateDer<'_>],
            _name: &rustls::pki_types::ServerName<'_>,
            ocsp: &[u8],
            now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            // Checked as if for a name every test certificate has not: the
            // chain must verify; a name mismatch is the one error allowed.
            match self.0.verify_server_cert(
                end_entity,
                intermediates,
                &rustls::pki_types::ServerName::try_from("a.test").unwrap(),
                ocsp,
                now,
            ) {
                Ok(v) => Ok(v),
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName,
                ))
                | Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. },
                )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
                Err(e) => Err(e),
            }
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(pki.roots()),
        provider.clone(),
    )
    .build()
    .unwrap();
    let c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyName(inner)))
        .with_no_client_auth();
    Arc::new(c)
}

/// Reads until EOF or error (bounded); true if the connection ended.
async fn closed_within(s: &mut TcpStream, within: Duration) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let res = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (res.is_ok(), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_on_the_tls_port_are_closed_cleanly_and_counted() {
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let b = Backend::start().await;
    let admin = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let cfg = config(&[b.addr], "handshake_timeout = \"1s\"", "")
        + &tls_section(&pki, &["a"], "")
        + admin;
    let (proxy, tls_addr) = start_cfg(&cfg);
    // Plaintext HTTP: closed at once, nothing answered.
    let mut s = TcpStream::connect(tls_addr).await.unwrap();
    s.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    let (closed, got) = closed_within(&mut s, Duration::from_millis(900)).await;
    assert!(
        closed && got.is_empty(),
        "plaintext HTTP: closed {closed}, got {got:?}"
    );
    // Garbage that looks like a handshake record but is not one.
    let mut s = TcpStream::connect(tls_addr).await.unwrap();
    let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    junk.extend(std::iter::repeat_n(0xee, 0x40));
    s.write_all(&junk).await.unwrap();
    let (closed, _) = closed_within(&mut s, Duration::from_millis(900)).await;
    assert!(closed, "garbage ClientHello not closed");
    // A record length no record may have.
    let mut s = TcpStream::connect(tls_addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff]).await.unwrap();
    let (closed, _) = closed_within(&mut s, Duration::from_millis(900)).await;
    assert!(closed, "oversized record not closed");
    // A truncated ClientHello and a slowloris (one byte at a time) are
    // closed at handshake_timeout, while a real client is served meanwhile.
    let start = std::time::Instant::now();
    let mut trunc = TcpStream::connect(tls_addr).await.unwrap();
    trunc
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(tls_addr).await.unwrap();
        let hello = [
            0x16u8, 0x03, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00, 0xfc, 0x03, 0x03,
        ];
        for b in hello.iter().cycle().take(40) {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        closed_within(&mut s, Duration::from_secs(5)).await.0
    });
    let mut ws = wss(
        client_config(&pki, &[&rustls::version::TLS13]),
        tls_addr,
        "a.test",
    )
    .await;
    echo_tls(&mut ws, Message::Text("unaffected".into())).await;
    let (closed, _) = closed_within(&mut trunc, Duration::from_secs(5)).await;
    let took = start.elapsed();
    assert!(closed, "truncated ClientHello not closed");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}, not at handshake_timeout (1 s)"
    );
    assert!(slow.await.unwrap(), "slowloris handshake not closed");
    echo_tls(&mut ws, Message::Text("still unaffected".into())).await;
    let (_, m) = proxy.admin("GET", "/metrics");
    assert_eq!(
        metric(
            &m,
            "ringlb_tls_handshakes_total{result=\"not_tls\",version=\"none\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &m,
            "ringlb_tls_handshakes_total{result=\"failed\",version=\"none\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            &m,
            "ringlb_tls_handshakes_total{result=\"timeout\",version=\"none\"}"
        ),
        2
    );
    let _ = Path::new("");
}

/// Completes the upgrade, then echoes raw bytes until EOF.
async fn raw_echo_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                s.write_all(switching_protocols().as_bytes()).await.unwrap();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// An upgraded raw TLS stream through ringlb.
async fn upgraded_tls(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut s = tls_connect(cfg, addr, "a.test").await.expect("handshake");
    s.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed in the 101");
        head.push(b[0]);
    }
    assert_eq!(status_of(&head), 101);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_relaying_over_tls_for_every_frame_size_including_4_mib() {
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let (_proxy, tls_addr) = start(&pki, &[raw_echo_backend().await], &["a"], "");
    for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let s = upgraded_tls(client_config(&pki, &[v]), tls_addr).await;
        let (mut r, mut w) = tokio::io::split(s);
        for len in [
            0,
            1,
            125,
            126,
            127,
            65535,
            65536,
            65537,
            3 * 1024 * 1024 + 7,
            4 << 20,
        ] {
            let mut f = client_frame(0x2, &vec![0u8; len]);
            // Varied bytes, so a misplaced or repeated record shows.
            let n = f.len();
            for (i, b) in f[n - len..].iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let sent = f.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await.unwrap();
                w.flush().await.unwrap();
                w
            });
            let mut got = vec![0u8; f.len()];
            tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut got))
                .await
                .expect("echo timed out")
                .unwrap();
            assert!(got == f, "{len}-byte frame differs after the round trip");
            w = writer.await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_loads_new_certificates_and_open_sessions_keep_echoing() {
    let pki = Pki::new();
    let old = pki.issue("a", &["a.test"]);
    let b = Backend::start().await;
    let (proxy, tls_addr) = start(&pki, &[b.addr], &["a"], "");
    let cfg = client_config(&pki, &[&rustls::version::TLS13]);
    let mut open = wss(cfg.clone(), tls_addr, "a.test").await;
    echo_tls(&mut open, Message::Text("before".into())).await;
    let first = tls_connect(cfg.clone(), tls_addr, "a.test").await.unwrap();
    assert!(first.get_ref().1.peer_certificates().unwrap()[0].as_ref() == old.as_slice());
    // A certbot-style renewal: the same paths get a new certificate and key.
    let new = pki.issue("a", &["a.test"]);
    assert!(new != old);
    proxy.signal("HUP");
    let mut seen_new = false;
    for _ in 0..100 {
        let s = tls_connect(cfg.clone(), tls_addr, "a.test").await.unwrap();
        if s.get_ref().1.peer_certificates().unwrap()[0].as_ref() == new.as_slice() {
            seen_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen_new,
        "new handshakes did not get the renewed certificate"
    );
    for i in 0..10 {
        echo_tls(&mut open, Message::Text(format!("after reload {i}"))).await;
    }
    // A bad renewal (key of another certificate) is refused; the running
    // certificate stays.
    let other = Pki::new();
    other.issue("x", &["a.test"]);
    std::fs::copy(other.path("x.key"), pki.path("a.key")).unwrap();
    proxy.signal("HUP");
    proxy.wait_log("does not match the certificate", Duration::from_secs(10));
    let s = tls_connect(cfg, tls_addr, "a.test").await.unwrap();
    assert!(s.get_ref().1.peer_certificates().unwrap()[0].as_ref() == new.as_slice());
    echo_tls(&mut open, Message::Text("after a refused reload".into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_from_one_connection_resumes_on_the_next() {
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let b = Backend::start().await;
    let admin = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let cfg = config(&[b.addr], "", "") + &tls_section(&pki, &["a"], "") + admin;
    let (proxy, tls_addr) = start_cfg(&cfg);
    let client = client_config(&pki, &[&rustls::version::TLS13]);
    // Two shards: several connections, so resumption crosses shards.
    for i in 0..6 {
        let mut ws = wss(client.clone(), tls_addr, "a.test").await;
        echo_tls(&mut ws, Message::Text(format!("r{i}"))).await;
        let resumed =
            ws.get_ref().get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        assert_eq!(resumed, i > 0, "connection {i}");
        ws.close(None).await.unwrap();
    }
    let (_, m) = proxy.admin("GET", "/metrics");
    assert_eq!(
        metric(
            &m,
            "ringlb_tls_handshakes_total{result=\"resumed\",version=\"1.3\"}"
        ),
        5
    );
}

#[test]
fn check_names_the_file_for_unreadable_mismatched_and_expired_certificates() {
    let pki = Pki::new();
    pki.issue("good", &["a.test"]);
    pki.issue_valid("old", &["a.test"], Some(()));
    pki.issue("other", &["b.test"]);
    let base = "[server]\nlisten = [\"127.0.0.1:0\"]\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nservers = [{ addr = \"127.0.0.1:1\" }]\n";
    let cases = [
        (
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                pki.path("missing.pem").display(),
                pki.path("good.key").display()
            ),
            "missing.pem: cannot read certificate",
        ),
        (
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                pki.path("good.pem").display(),
                pki.path("other.key").display()
            ),
            "other.key: the private key does not match the certificate",
        ),
        (
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                pki.path("old.pem").display(),
                pki.path("old.key").display()
            ),
            "old.pem: the certificate expired at 2021-01-01",
        ),
        (
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                pki.path("good.key").display(),
                pki.path("good.key").display()
            ),
            "good.key: no certificate in the file",
        ),
    ];
    for (cert, want) in cases {
        let text = format!("{base}\n[tls]\nlisten = [\"127.0.0.1:0\"]\ncertificates = [{cert}]\n");
        let path = pki.path("check.toml");
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringlb"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "check passed for {want}");
        assert!(
            err.contains(want) && err.contains("tls.certificates"),
            "want {want:?} in {err}"
        );
    }
    // A good one: ok, and the certificate's names and expiry are listed.
    let text = format!(
        "{base}\n[tls]\nlisten = [\"127.0.0.1:0\"]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        pki.path("good.pem").display(),
        pki.path("good.key").display()
    );
    let path = pki.path("check.toml");
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("good.pem (a.test): expires"), "{stdout}");
    for (extra, want) in [
        ("min_version = \"1.1\"", "tls.min_version"),
        ("alpn = [\"\"]", "tls.alpn"),
        (
            "session_tickets = false\nticket_rotation = \"1h\"",
            "tls.ticket_rotation",
        ),
        ("ticket_rotation = \"0s\"", "tls.ticket_rotation"),
    ] {
        let text = format!(
            "{base}\n[tls]\nlisten = [\"127.0.0.1:0\"]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n{extra}\n",
            pki.path("good.pem").display(),
            pki.path("good.key").display()
        );
        let err = ringlb::config::Config::parse(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "want {want:?} in {err}");
    }
    let up = "[server]\nlisten = [\"127.0.0.1:0\"]\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nservers = [{ addr = \"127.0.0.1:1\" }]\n";
    for (extra, want) in [
        (
            format!(
                "tls = {{ server_name = \"b.test\", ca = \"{}\" }}",
                pki.path("nope.pem").display()
            ),
            "nope.pem: cannot read CA certificates",
        ),
        (
            "tls = { server_name = \"not a name\" }".to_string(),
            "is not a DNS name or IP address",
        ),
        (
            "tls = { server_name = \"b.test\" }\nsend_proxy_protocol = \"v2\"".to_string(),
            "upstream.u.tls",
        ),
        ("tls = { server = \"b.test\" }".to_string(), "unknown field"),
    ] {
        let err = ringlb::config::Config::parse(&format!("{up}{extra}\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "want {want:?} in {err}");
    }
}

/// config/ringlb.toml documents [tls] commented out; uncommented, with
/// generated certificates, it loads.
#[test]
fn the_shipped_config_tls_section_loads_uncommented() {
    let pki = Pki::new();
    pki.issue("a", &["example.com"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config/ringlb.toml")).unwrap();
    let mut out = String::new();
    let mut in_tls = false;
    for line in text.lines() {
        if line == "# [tls]" {
            in_tls = true;
        } else if in_tls && line.starts_with('[') {
            in_tls = false;
        }
        let key = line.strip_prefix("# ").filter(|l| {
            in_tls
                && (l.starts_with("[tls]")
                    || l.starts_with("  {")
                    || *l == "]"
                    || l.split_once(" = ").is_some_and(|(k, _)| {
                        k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }))
        });
        match key {
            Some(l) if l.starts_with("  {") => out.push_str(&format!(
                "  {{ cert = \"{}\", key = \"{}\" }},\n",
                pki.path("a.pem").display(),
                pki.path("a.key").display()
            )),
            Some(l) => {
                out.push_str(l);
                out.push('\n');
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    assert!(
        out.contains("\n[tls]\n"),
        "no [tls] block found to uncomment"
    );
    // And the upstream's tls key, with the test CA.
    let up_line = "# tls = { server_name = \"backend.internal\", ca = \"backend-ca.pem\" }";
    assert!(out.contains(up_line), "no upstream tls example");
    let out = out.replace(
        up_line,
        &format!(
            "tls = {{ server_name = \"backend.internal\", ca = \"{}\" }}",
            pki.path("ca.pem").display()
        ),
    );
    let cfg = ringlb::config::Config::parse_in(&out, "ringlb.toml", &root.join("config"))
        .unwrap_or_else(|e| panic!("{e}"));
    let tls = cfg.tls.expect("[tls] parsed");
    assert_eq!(tls.listen, vec!["0.0.0.0:8443".parse().unwrap()]);
    assert_eq!(tls.alpn, vec!["http/1.1".to_string()]);
    assert_eq!(tls.ticket_rotation, Some(Duration::from_secs(6 * 3600)));
    assert_eq!(tls.certificates[0].names, vec!["example.com".to_string()]);
    let up = cfg
        .upstreams
        .iter()
        .find(|u| u.tls.is_some())
        .expect("an upstream with tls");
    assert_eq!(
        format!("{:?}", up.tls.as_ref().unwrap().server_name),
        format!(
            "{:?}",
            rustls::pki_types::ServerName::try_from("backend.internal").unwrap()
        )
    );
}

/// `n` sessions, each proven by one echo, opened `wave` handshakes at a
/// time, as clients arrive on a real server (and in the benchmark):
/// sessions are set up amid the short-lived state of other handshakes.
async fn open_tls_waves(
    cfg: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    n: usize,
    wave: usize,
) -> Vec<TlsWs> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = wave.min(n - out.len());
        let opened = futures_util::future::join_all((0..batch).map(|i| {
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let mut ws = wss(cfg, addr, "a.test").await;
                echo_tls(&mut ws, Message::Binary(vec![i as u8; 64])).await;
                ws
            })
        }))
        .await;
        out.extend(opened.into_iter().map(|r| r.expect("opening a session")));
    }
    out
}

/// 2000 idle TLS WebSocket sessions, opened 500 handshakes at a time: no
/// thread added, and ringlb's RSS per session within the issue's target
/// (2 KB), measured once they parked and the heap was trimmed. Before
/// sessions were held apart from handshake memory (`TlsSlot`, `intern.rs`)
/// and the heap trimmed (`server::HeapTrim`), this measured ~2.7 KB: free
/// heap pages left by the handshakes, each pinned by a live session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_sessions_add_no_thread_and_stay_under_2_kb_each() {
    const N: usize = 2000;
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let b = Backend::start().await;
    let cfg = config(
        &[b.addr],
        "park_idle_after = \"200ms\"\nheap_trim_interval = \"300ms\"",
        "",
    ) + &tls_section(&pki, &["a"], "")
        + "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let (proxy, tls_addr) = start_cfg(&cfg);
    let cfg = client_config(&pki, &[&rustls::version::TLS13]);
    // Warm-up: allocator arenas and the slab grow in steps.
    let warm = open_tls_waves(&cfg, tls_addr, 200, 64).await;
    drop(warm);
    wait_until("warm-up sessions gone", || b.active() == 0).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let threads_before = proxy.status_field("Threads:");
    let rss_before = proxy.status_field("VmRSS:");
    let mut held = open_tls_waves(&cfg, tls_addr, N, 500).await;
    assert_eq!(b.active(), N);
    // Silent for more than twice park_idle_after: every session parked,
    // and a trim ran after the last accept.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let threads_after = proxy.status_field("Threads:");
    let rss_after = proxy.status_field("VmRSS:");
    let per = (rss_after.saturating_sub(rss_before) * 1024) as f64 / N as f64;
    eprintln!(
        "ringlb threads {threads_before} -> {threads_after}; RSS {rss_before} kB -> {rss_after} kB = {per:.0} B per idle TLS session ({N})"
    );
    assert_eq!(
        threads_before, threads_after,
        "threads grew with idle TLS sessions"
    );
    assert!(per <= 2048.0, "{per:.0} B of RSS per idle TLS session");
    // The trims ran and are visible to an operator.
    let (_, metrics) = proxy.admin("GET", "/metrics");
    let trims = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ringlb_heap_trims_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("ringlb_heap_trims_total in /metrics");
    assert!(trims >= 1, "no heap trim counted");
    assert!(metrics.contains("ringlb_heap_trim_seconds_total "));
    for (i, ws) in held.iter_mut().enumerate().step_by(97) {
        echo_tls(ws, Message::Text(format!("still {i}"))).await;
    }
}

/// Python's `websockets` (Debian's python3-websockets, on /usr/bin/python3)
/// over wss://, verifying the test CA, pinned to TLS 1.3 and then 1.2.
const PY_CLIENT: &str = r#"
import asyncio, ssl, sys
import websockets

async def main(port, ca):
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = ssl.create_default_context(cafile=ca)
        ctx.minimum_version = version
        ctx.maximum_version = version
        async with websockets.connect(f"wss://a.test:{port}/", ssl=ctx, host="127.0.0.1", port=int(port), server_hostname="a.test") as ws:
            got = ws.transport.get_extra_info("ssl_object").version()
            for i in range(5):
                msg = f"python {got} {i}"
                await ws.send(msg)
                back = await asyncio.wait_for(ws.recv(), 10)
                assert back == msg, (back, msg)
            big = bytes(range(256)) * 4096
            await ws.send(big)
            assert await asyncio.wait_for(ws.recv(), 10) == big
            print("ok", got)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_over_wss_tls13_and_tls12() {
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let b = Backend::start().await;
    let (_proxy, tls_addr) = start(&pki, &[b.addr], &["a"], "");
    let ca = pki.path("ca.pem");
    let port = tls_addr.port().to_string();
    // The client bounds itself (10 s per answer); the timeout bounds the rest.
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(PY_CLIENT)
            .arg(port)
            .arg(ca)
            .output()
    });
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("python client timed out")
        .unwrap()
        .expect("run /usr/bin/python3 (python3-websockets, installed by .ci/run)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok TLSv1.3") && stdout.contains("ok TLSv1.2"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_in_front_of_the_tls_handshake_names_the_client() {
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let b = Backend::start().await;
    let extra = "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]";
    let (_proxy, tls_addr) = start(&pki, &[b.addr], &["a"], extra);
    let cfg = client_config(&pki, &[&rustls::version::TLS13]);
    let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
    // The header and the ClientHello in one segment, as an L4 tier sends them.
    let mut tcp = TcpStream::connect(tls_addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 443\r\n")
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("wss://a.test/", tls)
        .await
        .unwrap();
    echo_tls(&mut ws, Message::Text("via the tier".into())).await;
    let (_, headers) = b.last_request();
    let xff = headers
        .iter()
        .find(|(n, _)| n == "x-forwarded-for")
        .map(|(_, v)| v.as_str());
    assert_eq!(xff, Some("198.51.100.7"));
    // From the trusted tier without a header: refused, no handshake.
    let tcp = TcpStream::connect(tls_addr).await.unwrap();
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .expect("not closed");
    assert!(
        res.is_err(),
        "a TLS handshake without the required PROXY header succeeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_capacity_on_the_tls_port_closes_without_a_plaintext_answer() {
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let b = Backend::start().await;
    let (_proxy, tls_addr) = start(&pki, &[b.addr], &["a"], "max_connections = 1");
    let cfg = client_config(&pki, &[&rustls::version::TLS13]);
    let mut first = wss(cfg, tls_addr, "a.test").await;
    let mut s = TcpStream::connect(tls_addr).await.unwrap();
    let (closed, got) = closed_within(&mut s, Duration::from_secs(5)).await;
    assert!(
        closed && got.is_empty(),
        "over capacity: closed {closed}, got {got:?}"
    );
    echo_tls(&mut first, Message::Text("the first is unaffected".into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_tls_version_cipher_and_sni() {
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let b = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let cfg = config(&[b.addr], "", "")
        + &tls_section(&pki, &["a"], "")
        + &format!("\n[log]\naccess = \"{}\"\n", log.display());
    let (_proxy, tls_addr) = start_cfg(&cfg);
    let mut ws = wss(
        client_config(&pki, &[&rustls::version::TLS12]),
        tls_addr,
        "a.test",
    )
    .await;
    echo_tls(&mut ws, Message::Text("logged".into())).await;
    ws.close(None).await.unwrap();
    drop(ws);
    let mut line = String::new();
    wait_until("an access log line", || {
        line = std::fs::read_to_string(&log).unwrap_or_default();
        line.contains("\"status\":101")
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(v["tls"]["version"], "TLSv1_2", "{line}");
    assert_eq!(v["tls"]["sni"], "a.test", "{line}");
    assert!(
        v["tls"]["cipher"]
            .as_str()
            .unwrap()
            .starts_with("TLS_ECDHE_ECDSA_WITH_"),
        "{line}"
    );
    assert_eq!(v["tls"]["resumed"], false);
}

/// A wss:// echo backend (tokio-rustls + tungstenite) with a certificate
/// for `name` signed by the test CA.
async fn tls_echo_backend(pki: &Pki, name: &str) -> SocketAddr {
    pki.issue("backend", &[name]);
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_file_iter(pki.path("backend.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key: rustls::pki_types::PrivateKeyDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_file(pki.path("backend.key")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_backend_is_reached_over_verified_tls() {
    let pki = Pki::new();
    let backend = tls_echo_backend(&pki, "backend.test").await;
    let ca = pki.path("ca.pem");
    let up = format!(
        "tls = {{ server_name = \"backend.test\", ca = \"{}\" }}",
        ca.display()
    );
    let proxy = Proxy::start(&config(&[backend], "", &up));
    for i in 0..3 {
        let mut ws = connect(&proxy.url("/")).await;
        echo(&mut ws, &format!("to a wss backend {i}")).await;
        let big = Message::Binary((0..(1 << 20)).map(|i| (i % 253) as u8).collect());
        ws.send(big.clone()).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(back == big, "1 MiB message differs");
    }
    // A backend whose certificate does not have the configured name: 502,
    // never an unverified session.
    let wrong = format!(
        "tls = {{ server_name = \"other.test\", ca = \"{}\" }}",
        ca.display()
    );
    let proxy = Proxy::start(&config(&[backend], "", &wrong));
    let resp = raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 502, "{}", String::from_utf8_lossy(&resp));
    // Another CA: 502 too.
    let other = Pki::new();
    let bad_ca = format!(
        "tls = {{ server_name = \"backend.test\", ca = \"{}\" }}",
        other.path("ca.pem").display()
    );
    let proxy = Proxy::start(&config(&[backend], "", &bad_ca));
    let resp = raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 502, "{}", String::from_utf8_lossy(&resp));
}

/// The fallback when a live TLS session's state cannot be taken (forced
/// here by a test hook; no real session should need it): the session stays
/// and keeps echoing in the old process, which reports it, accepts nothing
/// more (new handshakes land in the new process on the same port) and
/// exits once the session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_session_that_cannot_move_stays_and_the_old_process_drains_it() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: release builds compile the RINGLB_TEST_FAULT hooks out");
        return;
    }
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let b = Backend::start().await;
    let cfg = config(&[b.addr], "", "") + &tls_section(&pki, &["a"], "");
    let (mut proxy, tls_addr) =
        start_cfg_under(&cfg, &["env", "RINGLB_TEST_FAULT=handoff-tls-stays"]);
    let cfg = client_config(&pki, &[&rustls::version::TLS13]);
    let mut open = wss(cfg.clone(), tls_addr, "a.test").await;
    echo_tls(&mut open, Message::Text("before".into())).await;
    let (ok, stdout, stderr) = upgrade(proxy.pid()).await;
    assert!(
        ok && stdout.contains("1 TLS sessions stay in pid"),
        "the outcome says what stays: {stdout} {stderr}"
    );
    let _new = Pid(new_pid(&stdout));
    for i in 0..10 {
        let mut ws = wss(cfg.clone(), tls_addr, "a.test").await;
        echo_tls(&mut ws, Message::Text(format!("new {i}"))).await;
    }
    for i in 0..5 {
        echo_tls(&mut open, Message::Text(format!("old session {i}"))).await;
    }
    assert!(
        proxy.wait_exit(Duration::from_millis(300)).is_none(),
        "the old process must stay while it holds a TLS session"
    );
    open.close(None).await.unwrap();
    drop(open);
    let status = proxy.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old process exits 0 once its last TLS session ended: {status:?}"
    );
}

/// Reads one HTTP answer with a Content-Length body from a TLS stream.
async fn read_answer<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (Vec<u8>, Vec<u8>) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("answer head timed out")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed in the head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse().unwrap())
        .expect("a Content-Length");
    let mut body = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut body))
        .await
        .expect("answer body timed out")
        .unwrap();
    (head, body)
}

/// Static files (small, and large enough to leave by splice on plaintext)
/// and plain HTTP proxying over TLS, several requests on one kept-alive
/// TLS connection: every byte the client reads must be TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_files_and_plain_http_over_one_kept_alive_tls_connection() {
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let site = tempfile::tempdir().unwrap();
    let small = b"<h1>small</h1>".to_vec();
    let large: Vec<u8> = (0..1_500_000u32).map(|i| (i % 249) as u8).collect();
    std::fs::write(site.path().join("small.html"), &small).unwrap();
    std::fs::write(site.path().join("large.bin"), &large).unwrap();
    let (backend, mut heads) =
        scripted_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec()).await;
    let cfg = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n\n[[route]]\npath = \"/files\"\nstrip_prefix = true\nstatic = {{ root = \"{}\", gzip = false }}\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\n\n[upstream.u]\nservers = [{{ addr = \"{backend}\" }}]\n{}",
        site.path().display(),
        tls_section(&pki, &["a"], "")
    );
    let (_proxy, tls_addr) = start_cfg(&cfg);
    let mut s = tls_connect(
        client_config(&pki, &[&rustls::version::TLS13]),
        tls_addr,
        "a.test",
    )
    .await
    .unwrap();
    for (path, want) in [
        ("/files/small.html", &small),
        ("/files/large.bin", &large),
        ("/files/small.html", &small),
    ] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, body) = read_answer(&mut s).await;
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        assert!(&body == want, "{path}: body differs ({} bytes)", body.len());
    }
    // A plain (non-upgrade) request is proxied, with X-Forwarded-Proto: https.
    s.write_all(b"GET /api HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut s).await;
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(body, b"hello");
    let seen = String::from_utf8(heads.recv().await.unwrap()).unwrap();
    assert!(seen.contains("X-Forwarded-Proto: https"), "{seen}");
    // A proxied answer ends the connection; it ends with close_notify
    // before the FIN, so a TLS client reads a clean end (rustls reports a
    // FIN without it as an unexpected EOF).
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("not closed")
        .expect("closed without close_notify");
    assert!(rest.is_empty());
    // So does ringlb's own error answer.
    let mut s = tls_connect(
        client_config(&pki, &[&rustls::version::TLS12]),
        tls_addr,
        "a.test",
    )
    .await
    .unwrap();
    s.write_all(b"NONSENSE\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("not closed")
        .expect("closed without close_notify");
    assert!(
        rest.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

/// A binary upgrade moves live TLS sessions with their keys and sequence
/// numbers: wss:// clients over TLS 1.3 and 1.2 and a plaintext client,
/// all relaying to a wss:// backend (so ringlb's TLS client side moves
/// too), keep echoing through the new process, and the old one exits at
/// once instead of waiting for them. The TLS port moves with the rest, so
/// new handshakes land in the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_hands_live_tls_sessions_to_the_new_process() {
    let pki = Pki::new();
    pki.issue("a", &["a.test"]);
    let backend = tls_echo_backend(&pki, "backend.test").await;
    let up = format!(
        "tls = {{ server_name = \"backend.test\", ca = \"{}\" }}",
        pki.path("ca.pem").display()
    );
    let cfg = config(&[backend], "", &up) + &tls_section(&pki, &["a"], "");
    let (mut proxy, tls_addr) = start_cfg(&cfg);
    let cfg13 = client_config(&pki, &[&rustls::version::TLS13]);
    let cfg12 = client_config(&pki, &[&rustls::version::TLS12]);
    let mut s13 = wss(cfg13.clone(), tls_addr, "a.test").await;
    let mut s12 = wss(cfg12, tls_addr, "a.test").await;
    let mut plain = connect(&proxy.url("/")).await;
    let big = Message::Binary((0..(300 << 10)).map(|i| (i % 251) as u8).collect());
    for ws in [&mut s13, &mut s12] {
        echo_tls(ws, Message::Text("before".into())).await;
        echo_tls(ws, big.clone()).await;
    }
    echo(&mut plain, "before").await;
    let (ok, stdout, stderr) = upgrade(proxy.pid()).await;
    assert!(ok, "upgrade failed: {stdout} {stderr}");
    assert!(
        stdout.contains("handed 3 sessions to pid") && !stdout.contains("stay"),
        "every session moves: {stdout}"
    );
    let _new = Pid(new_pid(&stdout));
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old process holds nothing and exits 0: {status:?}"
    );
    // Only the new process is left: these go through it, on the keys and
    // sequence numbers the old one handed over.
    for i in 0..5 {
        for ws in [&mut s13, &mut s12] {
            echo_tls(ws, Message::Text(format!("moved {i}"))).await;
        }
        echo(&mut plain, &format!("moved {i}")).await;
    }
    for ws in [&mut s13, &mut s12] {
        echo_tls(ws, big.clone()).await;
    }
    let mut ws = wss(cfg13, tls_addr, "a.test").await;
    echo_tls(&mut ws, Message::Text("a new handshake".into())).await;
    // A moved session still ends cleanly: close_notify and a Close answered.
    s13.close(None).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = s13.next().await {
            if m.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(end, Ok(true), "the moved TLS session closed cleanly");
}
