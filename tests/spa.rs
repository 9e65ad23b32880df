//! The SPA example end to end (issue #7): `config/spa.toml` as shipped,
//! with only its addresses and its static root rewritten, in front of the
//! example API (`python3 examples/spa/api.py`, a real process) and a
//! WebSocket echo backend (tests/common's; `run.sh` uses `ringlb-load echo`,
//! which is not a dependency of this package), serving `examples/spa/dist`.
//! Requests go over a raw HTTP/1.1 client (below) so every header and byte is
//! checked as sent.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "spa.test";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dist() -> PathBuf {
    repo().join("examples/spa/dist")
}

/// `examples/spa/api.py` on a free port; killed by PID on drop.
struct Api {
    child: Child,
    addr: SocketAddr,
}

impl Api {
    fn start() -> Api {
        let mut child = Command::new("python3")
            .arg(repo().join("examples/spa/api.py"))
            .arg("0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3 examples/spa/api.py");
        // Readiness: its one stdout line, printed once the socket is bound.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("api.py did not start: {line:?}"))
            .trim()
            .parse()
            .unwrap();
        Api { child, addr }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces `from` in `text`, which must occur exactly `n` times (so a change
/// to the shipped file's shape fails here, loudly, instead of being missed).
fn replace_n(text: &str, from: &str, to: &str, n: usize) -> String {
    assert_eq!(
        text.matches(from).count(),
        n,
        "config/spa.toml should contain {from:?} {n} time(s)"
    );
    text.replace(from, to)
}

/// config/spa.toml with free ports, these backends and an absolute root.
fn spa_config(api: SocketAddr, capture: SocketAddr) -> String {
    let text = std::fs::read_to_string(repo().join("config/spa.toml")).unwrap();
    let root = dist().to_str().unwrap().to_string();
    assert!(!root.contains(['"', '\\']), "unusual path: {root}");
    let text = replace_n(
        &text,
        "listen = [\"127.0.0.1:8080\"]",
        "listen = [\"127.0.0.1:0\"]",
        1,
    );
    let text = replace_n(
        &text,
        "listen = \"127.0.0.1:9090\"",
        "listen = \"127.0.0.1:0\"",
        1,
    );
    let text = replace_n(&text, "\"127.0.0.1:8000\"", &format!("\"{api}\""), 1);
    let text = replace_n(&text, "\"127.0.0.1:9001\"", &format!("\"{capture}\""), 1);
    replace_n(
        &text,
        "root = \"../examples/spa/dist\"",
        &format!("root = \"{root}\""),
        2,
    )
}

/// The whole example: API, WebSocket backend, ringlb.
struct Spa {
    _api: Api,
    backend: common::Backend,
    proxy: common::Proxy,
}

impl Spa {
    async fn start() -> Spa {
        let api = Api::start();
        let backend = common::Backend::start().await;
        let proxy = common::Proxy::start(&spa_config(api.addr, backend.addr));
        Spa {
            _api: api,
            backend,
            proxy,
        }
    }

    async fn http(&self) -> Http {
        Http::connect(self.proxy.addr()).await
    }
}

/// One file of the build output, found by name prefix and extension (the
/// content hash in the name is not repeated here).
fn asset(prefix: &str, ext: &str) -> (String, Vec<u8>) {
    let dir = dist().join("assets");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix) && n.ends_with(ext))
        .collect();
    assert_eq!(found.len(), 1, "one {prefix}*{ext} in {dir:?}: {found:?}");
    let name = found.pop().unwrap();
    let bytes = std::fs::read(dir.join(&name)).unwrap();
    (format!("/assets/{name}"), bytes)
}

fn index_html() -> Vec<u8> {
    std::fs::read(dist().join("index.html")).unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn gzip");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not valid gzip");
    out.stdout
}

// ---- a raw HTTP/1.1 client: one connection, responses read in order ----

struct Response {
    version: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    /// The value of a header that must appear at most once.
    fn header(&self, name: &str) -> Option<&str> {
        let mut it = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let first = it.next().map(|(_, v)| v.as_str());
        assert!(
            it.next().is_none(),
            "{name} appears twice: {:?}",
            self.headers
        );
        first
    }

    fn content_type(&self) -> &str {
        self.header("Content-Type")
            .unwrap_or_else(|| panic!("no Content-Type: {:?}", self.headers))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// `Vary` names Accept-Encoding (in a list or alone).
    fn varies_on_accept_encoding(&self) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("Vary"))
            .flat_map(|(_, v)| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case("Accept-Encoding"))
    }
}

struct Http {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(addr: SocketAddr) -> Http {
        Http {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Sends a request with `Host: spa.test` and the given extra header
    /// lines (each ending in CRLF) and body.
    async fn send(&mut self, method: &str, target: &str, extra: &str, body: &[u8]) {
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {HOST}\r\n{extra}");
        if !body.is_empty() {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.s.write_all(&bytes).await.unwrap();
    }

    /// Reads more bytes into the buffer (bounded: 10 s); false on EOF.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
            .await
            .expect("no bytes from ringlb within 10 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed inside a body");
        }
        self.buf.drain(..n).collect()
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.take(i + 2).await;
                return String::from_utf8(line[..i].to_vec()).unwrap();
            }
            assert!(self.fill().await, "connection closed inside a head");
        }
    }

    /// Reads one response; `head` means it answers a HEAD request (no body
    /// whatever Content-Length says).
    async fn response(&mut self, head: bool) -> Response {
        let status_line = self.line().await;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap().to_string();
        let status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (n, v) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let mut r = Response {
            version,
            status,
            headers,
            body: Vec::new(),
        };
        if head || status == 204 || status == 304 || status < 200 {
            return r;
        }
        let chunked = r
            .header("Transfer-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            loop {
                let size_line = self.line().await;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                let chunk = self.take(size).await;
                r.body.extend_from_slice(&chunk);
                assert_eq!(self.line().await, "", "chunk not followed by CRLF");
            }
        } else if let Some(len) = r.header("Content-Length") {
            let len: usize = len.parse().unwrap();
            r.body = self.take(len).await;
        } else {
            while self.fill().await {}
            r.body = std::mem::take(&mut self.buf);
        }
        r
    }

    async fn get(&mut self, target: &str, extra: &str) -> Response {
        self.send("GET", target, extra, b"").await;
        self.response(false).await
    }

    /// True if the peer closes (or has closed) the connection within 10 s
    /// without sending anything more.
    async fn closes(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }
}

/// A response that keeps the connection open for another request.
fn assert_keep_alive(r: &Response) {
    assert_eq!(r.version, "HTTP/1.1");
    assert!(
        !r.header("Connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "static responses keep the connection: {:?}",
        r.headers
    );
}

// ---- the example's files ----

/// What the daemon tests below rely on: index.html names assets that exist,
/// the .gz is the .js compressed, the JS and CSS are over gzip_min_length
/// (256) and the SVG under it.
#[test]
fn example_files_are_consistent() {
    let index = String::from_utf8(index_html()).unwrap();
    let (js_path, js) = asset("app.", ".js");
    let (css_path, css) = asset("app.", ".css");
    let (svg_path, svg) = asset("logo.", ".svg");
    for p in [&js_path, &css_path, &svg_path] {
        assert!(index.contains(&format!("\"{p}\"")), "index.html lacks {p}");
    }
    let (gz_path, gz) = asset("app.", ".js.gz");
    assert_eq!(gz_path, format!("{js_path}.gz"));
    assert_eq!(gunzip(&gz), js, "{gz_path} is not {js_path} compressed");
    assert!(js.len() > 256 && css.len() > 256 && svg.len() < 256);
}

/// docs/MIGRATING-FROM-NGINX.md gives config/spa.toml as "the complete
/// file": it must be, byte for byte.
#[test]
fn migration_doc_quotes_config_spa_toml() {
    let doc = std::fs::read_to_string(repo().join("docs/MIGRATING-FROM-NGINX.md")).unwrap();
    let toml = std::fs::read_to_string(repo().join("config/spa.toml")).unwrap();
    assert!(
        doc.contains(&format!("```toml\n{toml}```\n")),
        "docs/MIGRATING-FROM-NGINX.md no longer quotes config/spa.toml as it is"
    );
}

// ---- the daemon: static files ----

/// GET / is index.html; a deep link the server has no file for is
/// index.html too (SPA fallback); both on one keep-alive connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_and_spa_fallback_on_one_connection() {
    let spa = Spa::start().await;
    let mut c = spa.http().await;
    let index = index_html();
    for target in ["/", "/deep/link", "/index.html", "/deep/link?tab=2"] {
        let r = c.get(target, "").await;
        assert_eq!(r.status, 200, "{target}");
        assert!(
            r.content_type().starts_with("text/html"),
            "{target}: {}",
            r.content_type()
        );
        assert_eq!(r.body, index, "{target}");
        assert_eq!(r.header("Cache-Control"), Some("no-cache"), "{target}");
        assert!(r.header("Content-Encoding").is_none(), "{target}");
        assert_keep_alive(&r);
    }
}

/// HEAD / answers the GET's head without a body: the next response on the
/// same connection starts right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_has_no_body() {
    let spa = Spa::start().await;
    let mut c = spa.http().await;
    let index = index_html();
    c.send("HEAD", "/", "", b"").await;
    let r = c.response(true).await;
    assert_eq!(r.status, 200);
    assert!(r.content_type().starts_with("text/html"));
    if let Some(len) = r.header("Content-Length") {
        assert_eq!(len, index.len().to_string());
    }
    assert_keep_alive(&r);
    let r = c.get("/deep/link", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, index);
}

/// The hashed JS has a precompressed .gz beside it: a client that accepts
/// gzip gets those exact bytes, one that does not gets the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precompressed_asset() {
    let spa = Spa::start().await;
    let (js_path, js) = asset("app.", ".js");
    let (_, gz) = asset("app.", ".js.gz");
    let mut c = spa.http().await;

    let r = c
        .get(&js_path, "Accept-Encoding: gzip, deflate, br\r\n")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Encoding"), Some("gzip"));
    assert!(r.varies_on_accept_encoding(), "{:?}", r.headers);
    let ct = r.content_type();
    assert!(
        ct.starts_with("application/javascript") || ct.starts_with("text/javascript"),
        "the .js type, not the .gz one: {ct}"
    );
    assert_eq!(r.body, gz, "not the precompressed file's bytes");
    assert_eq!(
        r.header("Cache-Control"),
        Some("public, max-age=31536000, immutable")
    );
    assert_keep_alive(&r);

    for extra in ["", "Accept-Encoding: br\r\n"] {
        let r = c.get(&js_path, extra).await;
        assert_eq!(r.status, 200, "{extra:?}");
        assert!(r.header("Content-Encoding").is_none(), "{extra:?}");
        assert_eq!(r.body, js, "{extra:?}");
        assert_keep_alive(&r);
    }
}

/// The CSS has no .gz: it is compressed on the fly. The SVG is under
/// gzip_min_length: sent as is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_on_the_fly_above_min_length() {
    let spa = Spa::start().await;
    let (css_path, css) = asset("app.", ".css");
    let (svg_path, svg) = asset("logo.", ".svg");
    let mut c = spa.http().await;

    let r = c.get(&css_path, "Accept-Encoding: gzip\r\n").await;
    assert_eq!(r.status, 200);
    assert!(
        r.content_type().starts_with("text/css"),
        "{}",
        r.content_type()
    );
    assert_eq!(r.header("Content-Encoding"), Some("gzip"));
    assert!(r.varies_on_accept_encoding(), "{:?}", r.headers);
    assert_eq!(gunzip(&r.body), css);
    assert_keep_alive(&r);

    // Twice: the second may come from the gzip cache, and must be the same.
    let again = c.get(&css_path, "Accept-Encoding: gzip\r\n").await;
    assert_eq!(gunzip(&again.body), css);

    let r = c.get(&svg_path, "Accept-Encoding: gzip\r\n").await;
    assert_eq!(r.status, 200);
    assert!(
        r.content_type().starts_with("image/svg+xml"),
        "{}",
        r.content_type()
    );
    assert!(
        r.header("Content-Encoding").is_none(),
        "{} bytes",
        svg.len()
    );
    assert_eq!(r.body, svg);
}

/// No fallback under /assets: a missing asset is 404, not index.html. Only
/// GET and HEAD are served. Nothing outside the root is reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_asset_wrong_method_and_traversal() {
    let spa = Spa::start().await;

    let r = spa.http().await.get("/assets/missing.0000.js", "").await;
    assert_eq!(r.status, 404);

    let mut c = spa.http().await;
    c.send("POST", "/", "", b"x=1").await;
    assert_eq!(c.response(false).await.status, 405);

    // examples/spa/api.py sits next to the root, Cargo.toml two levels up.
    for target in [
        "/../api.py",
        "/assets/../../api.py",
        "/%2e%2e/api.py",
        "/assets/%2e%2e/%2e%2e/api.py",
        "/..%2fapi.py",
        "/../../../Cargo.toml",
        "/%2e%2e/%2e%2e/%2e%2e/Cargo.toml",
    ] {
        let r = spa.http().await.get(target, "").await;
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            !body.contains("ThreadingHTTPServer") && !body.contains("[workspace]"),
            "{target} escaped the root: {} {body:.80}",
            r.status
        );
        assert!(
            matches!(r.status, 200 | 400 | 403 | 404),
            "{target}: {}",
            r.status
        );
        if r.status == 200 {
            assert_eq!(r.body, index_html(), "{target}");
        }
    }
}

// ---- the daemon: proxied routes ----

/// /api/x?y=1 reaches the API as /x?y=1 with the client's Host and its
/// address in X-Real-IP and X-Forwarded-For (nginx: rewrite ^/api/?(.*) /$1,
/// proxy_set_header Host, X-Real-IP, X-Forwarded-For).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_prefix_stripped_and_headers_set() {
    let spa = Spa::start().await;
    for (target, seen) in [("/api/x?y=1", "/x?y=1"), ("/api", "/"), ("/api/", "/")] {
        let r = spa.http().await.get(target, "").await;
        assert_eq!(r.status, 200, "{target}");
        assert!(r.content_type().starts_with("application/json"));
        let j = r.json();
        assert_eq!(j["method"], "GET");
        assert_eq!(j["path"], seen, "{target}");
        assert_eq!(j["headers"]["Host"], HOST);
        assert_eq!(j["headers"]["X-Real-IP"], "127.0.0.1");
        assert_eq!(j["headers"]["X-Forwarded-For"], "127.0.0.1");
        assert_eq!(j["headers"]["X-Forwarded-Proto"], "http");
    }

    let mut c = spa.http().await;
    c.send(
        "POST",
        "/api/items",
        "Content-Type: application/json\r\nX-Forwarded-For: 203.0.113.7\r\n",
        b"{\"a\":1}",
    )
    .await;
    let j = c.response(false).await.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["path"], "/items");
    assert_eq!(j["body_length"], 7);
    // ringlb is the edge (forwarded_for = "replace"): a client cannot choose
    // the address the API believes.
    assert_eq!(j["headers"]["X-Forwarded-For"], "127.0.0.1");
    assert_eq!(j["headers"]["X-Real-IP"], "127.0.0.1");
}

/// /capture is a WebSocket route: an upgrade reaches the backend with its
/// path unchanged and echoes; a plain GET gets 426.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_websocket_echoes() {
    let spa = Spa::start().await;
    let mut ws = common::connect(&spa.proxy.url("/capture")).await;
    common::echo(&mut ws, "hello through ringlb").await;
    assert_eq!(spa.backend.last_request().0, "/capture");

    let mut c = spa.http().await;
    let r = c.get("/capture", "").await;
    assert_eq!(r.status, 426);
    assert!(c.closes().await, "426 closes the connection");
}
