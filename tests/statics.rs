//! Static routes end to end: a real ringlb process serving a real directory
//! to raw HTTP/1.1 clients on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Proxy;

const JS: &str = "export function greet(name) { return 'hello ' + name; }\n";
const SECRET: &[u8] = b"TOP-SECRET-OUTSIDE-ROOT";

/// A served tree under `root`, and a file outside it that must never leak.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let w = |p: &str, data: &[u8]| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        };
        w("index.html", b"<html>index</html>\n");
        w("assets/app.js", JS.repeat(60).as_bytes());
        w("assets/tiny.js", b"let x = 1;\n");
        w(
            "assets/logo.png",
            &(0..1000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>(),
        );
        w(
            "assets/pre.css",
            "body { color: red }\n".repeat(40).as_bytes(),
        );
        w(
            "assets/pre.css.gz",
            &gzip("body { color: red }\n".repeat(40).as_bytes()),
        );
        w("assets/pre.css.br", b"BROTLI-BYTES");
        w("big.bin", &big());
        w("docs/index.html", b"docs index\n");
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/secret.txt"), SECRET).unwrap();
        std::os::unix::fs::symlink("assets/app.js", root.join("link-in.js")).unwrap();
        std::os::unix::fs::symlink("../outside/secret.txt", root.join("link-out.txt")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), root.join("abs-out")).unwrap();
        Site { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn file(&self, p: &str) -> Vec<u8> {
        std::fs::read(self.root().join(p)).unwrap()
    }
}

fn big() -> Vec<u8> {
    (0..3 * 1024 * 1024 + 123u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn start(root: &Path, route_extra: &str, server_extra: &str) -> Proxy {
    Proxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n{server_extra}\n\n[[route]]\npath = \"/\"\nstatic = {{ root = \"{}\"{route_extra} }}\n",
        root.display()
    ))
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw HTTP/1.1 client on one connection (bounded by 10 s reads).
struct Http {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    fn connect(addr: SocketAddr) -> Http {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Http { s, buf: Vec::new() }
    }

    fn send(&mut self, text: &str) {
        self.s.write_all(text.as_bytes()).unwrap();
    }

    fn get(&mut self, path: &str, headers: &str) -> Resp {
        self.send(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n"));
        self.response(false)
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match self.s.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// One response; `head_only` for HEAD (no body whatever the length says).
    fn response(&mut self, head_only: bool) -> Resp {
        loop {
            let mut hs = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut hs);
            if let httparse::Status::Complete(n) = r.parse(&self.buf).unwrap() {
                let status = r.code.unwrap();
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, v)| v.parse().unwrap());
                let len = if head_only || status == 304 { 0 } else { len };
                self.buf.drain(..n);
                let chunked = headers
                    .iter()
                    .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == "chunked");
                if chunked && !head_only {
                    let body = self.chunked_body();
                    return Resp {
                        status,
                        headers,
                        body,
                    };
                }
                while self.buf.len() < len {
                    assert!(self.fill(), "closed inside a body");
                }
                let body = self.buf.drain(..len).collect();
                return Resp {
                    status,
                    headers,
                    body,
                };
            }
            assert!(self.fill(), "closed before a response head");
        }
    }

    /// A chunked body (a gzip answer compressed while it is sent).
    fn chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let eol = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(self.fill(), "closed inside a chunk size");
            };
            let size = std::str::from_utf8(&self.buf[..eol]).unwrap();
            let size = usize::from_str_radix(size, 16).unwrap();
            self.buf.drain(..eol + 2);
            while self.buf.len() < size + 2 {
                assert!(self.fill(), "closed inside a chunk");
            }
            body.extend_from_slice(&self.buf[..size]);
            assert_eq!(&self.buf[size..size + 2], b"\r\n");
            self.buf.drain(..size + 2);
            if size == 0 {
                return body;
            }
        }
    }

    /// The server closes the connection (EOF) with nothing more sent.
    fn closes(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0)) && self.buf.is_empty()
    }
}

fn get(addr: SocketAddr, path: &str, headers: &str) -> Resp {
    Http::connect(addr).get(path, headers)
}

#[test]
fn files_have_type_length_validators_and_cache_control() {
    let site = Site::new();
    let p = start(&site.root(), ", cache_control = \"public, max-age=60\"", "");
    let r = get(p.addr(), "/assets/logo.png", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, site.file("assets/logo.png"));
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert_eq!(r.header("content-length"), Some("1000"));
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    let meta = std::fs::metadata(site.root().join("assets/logo.png")).unwrap();
    let mtime = meta.modified().unwrap();
    assert_eq!(
        r.header("last-modified"),
        Some(httpdate::fmt_http_date(mtime).as_str())
    );
    let secs = mtime
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(r.header("etag"), Some(format!("\"{secs:x}-3e8\"").as_str()));
    assert!(r.header("vary").is_none(), "png is not compressible");

    let r = get(p.addr(), "/index.html", "");
    assert_eq!(r.header("content-type"), Some("text/html"));
    let r = get(p.addr(), "/assets/tiny.js", "");
    assert_eq!(r.header("content-type"), Some("text/javascript"));
    assert_eq!(r.body, b"let x = 1;\n");
}

#[test]
fn head_sends_no_body_and_keeps_the_connection() {
    let site = Site::new();
    let p = start(&site.root(), "", "");
    let mut c = Http::connect(p.addr());
    c.send("HEAD /big.bin HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.response(true);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(big().len().to_string().as_str())
    );
    // Had a body been sent, this would parse body bytes as a head.
    let r = c.get("/index.html", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"<html>index</html>\n");
}

#[test]
fn conditional_requests_get_304() {
    let site = Site::new();
    let p = start(&site.root(), "", "");
    let r = get(p.addr(), "/assets/logo.png", "");
    let etag = r.header("etag").unwrap().to_string();
    let lm = r.header("last-modified").unwrap().to_string();
    let mut c = Http::connect(p.addr());
    let r = c.get("/assets/logo.png", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    let r = c.get(
        "/assets/logo.png",
        &format!("If-None-Match: \"other\", W/{etag}\r\n"),
    );
    assert_eq!(r.status, 304, "weak comparison");
    let r = c.get("/assets/logo.png", &format!("If-Modified-Since: {lm}\r\n"));
    assert_eq!(r.status, 304);
    let r = c.get(
        "/assets/logo.png",
        "If-Modified-Since: Thu, 01 Jan 1970 00:00:01 GMT\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 1000);
    // If-None-Match wins over If-Modified-Since.
    let r = c.get(
        "/assets/logo.png",
        &format!("If-None-Match: \"nope\"\r\nIf-Modified-Since: {lm}\r\n"),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn single_ranges_get_206_and_bad_ones_416() {
    let site = Site::new();
    let p = start(&site.root(), "", "");
    let data = big();
    let n = data.len();
    let mut c = Http::connect(p.addr());
    let r = c.get("/big.bin", "Range: bytes=100-199\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 100-199/{n}").as_str())
    );
    assert_eq!(r.body, &data[100..200]);
    let r = c.get("/big.bin", "Range: bytes=-10\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[n - 10..]);
    // A range that spans several read chunks.
    let r = c.get("/big.bin", "Range: bytes=1000-\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[1000..]);
    let r = c.get("/big.bin", &format!("Range: bytes={n}-\r\n"));
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{n}").as_str())
    );
    let r = c.get("/big.bin", "Range: bytes=0-1,5-6\r\n");
    assert_eq!(r.status, 200, "several ranges: the whole file");
    assert_eq!(r.body.len(), n);
    let etag = r.header("etag").unwrap().to_string();
    let r = c.get(
        "/big.bin",
        &format!("Range: bytes=0-0\r\nIf-Range: {etag}\r\n"),
    );
    assert_eq!(r.status, 206);
    let r = c.get("/big.bin", "Range: bytes=0-0\r\nIf-Range: \"stale\"\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data);
}

#[test]
fn spa_fallback_is_try_files() {
    let site = Site::new();
    let p = start(&site.root(), ", fallback = \"/index.html\"", "");
    let index = site.file("index.html");
    for path in [
        "/",
        "/deep/link",
        "/deep/link?x=1",
        "/empty/",
        "/missing.js",
    ] {
        let r = get(p.addr(), path, "");
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.body, index, "{path}");
        assert_eq!(r.header("content-type"), Some("text/html"), "{path}");
    }
    // A directory gets its own index under its slash form; without the
    // slash it is redirected there (below).
    assert_eq!(get(p.addr(), "/docs/", "").body, b"docs index\n");
    assert_eq!(get(p.addr(), "/docs", "").status, 301);
    // A file asked for as a directory does not exist: the fallback answers.
    let r = get(p.addr(), "/assets/tiny.js/", "");
    assert_eq!((r.status, r.body), (200, index.clone()));
    // Real files still win.
    assert_eq!(get(p.addr(), "/assets/tiny.js", "").body, b"let x = 1;\n");
}

#[test]
fn percent_escapes_are_exactly_two_hex_digits() {
    let site = Site::new();
    let p = start(&site.root(), ", fallback = \"/index.html\"", "");
    // `%+1` once decoded as byte 1 (a sign is accepted when parsing a number).
    for path in ["/%+1", "/index%+2.html", "/%+f", "/%-1", "/%+a", "/%1g"] {
        assert_eq!(get(p.addr(), path, "").status, 400, "{path}");
    }
    assert_eq!(get(p.addr(), "/assets/tin%79.js", "").body, b"let x = 1;\n");
    assert_eq!(
        get(p.addr(), "/assets/tin%7A.js", "").status,
        200,
        "fallback"
    );
}

#[test]
fn a_trailing_slash_names_a_directory_never_a_file() {
    let site = Site::new();
    let p = start(&site.root(), "", "");
    for path in [
        "/index.html/",
        "/assets/tiny.js/",
        "/assets/tiny.js//",
        "/big.bin/",
    ] {
        let r = get(p.addr(), path, "");
        assert_eq!(r.status, 404, "{path}");
    }
    assert_eq!(get(p.addr(), "/assets/tiny.js", "").status, 200);
    assert_eq!(get(p.addr(), "/docs/", "").body, b"docs index\n");
}

#[test]
fn a_directory_without_its_slash_is_redirected_to_it() {
    let site = Site::new();
    let p = Proxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\n\n\
         [[route]]\npath = \"/\"\nstatic = {{ root = \"{root}\", fallback = \"/index.html\" }}\n\n\
         [[route]]\npath = \"/alias\"\nstrip_prefix = true\nstatic = {{ root = \"{root}\" }}\n",
        root = site.root().display()
    ));
    let mut c = Http::connect(p.addr());
    for (path, location) in [
        ("/docs", "/docs/"),
        ("/docs?a=1&b", "/docs/?a=1&b"),
        ("/empty", "/empty/"),
        ("/alias/docs", "/alias/docs/"),
        // The route's own directory, whose path the prefix strip empties.
        ("/alias", "/alias/"),
        ("/alias?x", "/alias/?x"),
    ] {
        let r = c.get(path, "");
        assert_eq!(r.status, 301, "{path}");
        assert_eq!(r.header("location"), Some(location), "{path}");
        assert_eq!(r.header("connection"), None, "{path}: kept alive");
    }
    c.send("HEAD /docs HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.response(true);
    assert_eq!(r.status, 301);
    assert_eq!(c.get("/docs/", "").body, b"docs index\n");
    assert_eq!(c.get("/alias/docs/", "").body, b"docs index\n");
    assert_eq!(c.get("/alias/", "").body, site.file("index.html"));
    // The root needs no redirect.
    assert_eq!(c.get("/", "").body, site.file("index.html"));
}

#[test]
fn if_match_and_if_unmodified_since_are_preconditions() {
    let site = Site::new();
    let p = start(&site.root(), "", "");
    let r = get(p.addr(), "/assets/logo.png", "");
    let etag = r.header("etag").unwrap().to_string();
    let lm = r.header("last-modified").unwrap().to_string();
    let past = "Thu, 01 Jan 1970 00:00:01 GMT";
    let mut c = Http::connect(p.addr());
    let status = |c: &mut Http, h: &str| c.get("/assets/logo.png", h).status;
    // If-Match: strong comparison; `*` matches any existing file.
    assert_eq!(status(&mut c, &format!("If-Match: {etag}\r\n")), 200);
    assert_eq!(status(&mut c, &format!("If-Match: \"x\", {etag}\r\n")), 200);
    assert_eq!(status(&mut c, "If-Match: *\r\n"), 200);
    assert_eq!(status(&mut c, "If-Match: \"other\"\r\n"), 412);
    assert_eq!(
        status(&mut c, &format!("If-Match: W/{etag}\r\n")),
        412,
        "a weak tag never matches strongly"
    );
    // If-Unmodified-Since: 412 when the file changed after the date.
    assert_eq!(
        status(&mut c, &format!("If-Unmodified-Since: {lm}\r\n")),
        200
    );
    assert_eq!(
        status(&mut c, &format!("If-Unmodified-Since: {past}\r\n")),
        412
    );
    assert_eq!(
        status(&mut c, "If-Unmodified-Since: not a date\r\n"),
        200,
        "an invalid date is ignored"
    );
    // With If-Match, If-Unmodified-Since is not evaluated (RFC 9110 §13.2.2).
    assert_eq!(
        status(
            &mut c,
            &format!("If-Match: {etag}\r\nIf-Unmodified-Since: {past}\r\n")
        ),
        200
    );
    // 412 comes before 304 and before ranges.
    assert_eq!(
        status(
            &mut c,
            &format!("If-Match: \"other\"\r\nIf-None-Match: {etag}\r\n")
        ),
        412
    );
    assert_eq!(
        status(
            &mut c,
            &format!("If-Unmodified-Since: {past}\r\nIf-Modified-Since: {lm}\r\n")
        ),
        412
    );
    assert_eq!(
        status(
            &mut c,
            &format!("If-Match: {etag}\r\nIf-None-Match: {etag}\r\n")
        ),
        304
    );
    assert_eq!(
        status(&mut c, "If-Match: \"other\"\r\nRange: bytes=0-9\r\n"),
        412
    );
    let r = c.get(
        "/assets/logo.png",
        &format!("If-Match: {etag}\r\nRange: bytes=0-9\r\nIf-Range: {etag}\r\n"),
    );
    assert_eq!((r.status, r.body.len()), (206, 10));
    c.send("HEAD /assets/logo.png HTTP/1.1\r\nHost: t\r\nIf-Match: \"other\"\r\n\r\n");
    assert_eq!(c.response(true).status, 412);
    // Kept alive through all of that; a missing file stays 404.
    assert_eq!(status(&mut c, "If-Match: \"other\"\r\n"), 412);
    assert_eq!(
        c.get("/missing.png", "If-Match: *\r\n").status,
        404,
        "no precondition without a representation"
    );
}

#[test]
fn without_fallback_missing_is_404() {
    let site = Site::new();
    let p = start(&site.root(), ", index = \"\"", "");
    assert_eq!(get(p.addr(), "/missing", "").status, 404);
    assert_eq!(
        get(p.addr(), "/docs/", "").status,
        404,
        "no index configured"
    );
    // Keep-alive survives a 404.
    let mut c = Http::connect(p.addr());
    assert_eq!(c.get("/nope", "").status, 404);
    assert_eq!(c.get("/index.html", "").status, 200);
}

#[test]
fn nothing_outside_root_is_ever_served() {
    let site = Site::new();
    // With a fallback, so a wrong "missing" path would show as 200 index.
    let p = start(&site.root(), ", fallback = \"/index.html\"", "");
    let attacks = [
        "/../outside/secret.txt",
        "/assets/../../outside/secret.txt",
        "/%2e%2e/outside/secret.txt",
        "/%2E%2E%2Foutside%2Fsecret.txt",
        "/assets/%2e%2e/%2e%2e/outside/secret.txt",
        "/..%2foutside/secret.txt",
        "/index.html%00.png",
        "/%00",
        "/bad%zzescape",
    ];
    for path in attacks {
        let r = get(p.addr(), path, "");
        assert_eq!(r.status, 400, "{path}");
        assert!(!r.body.windows(SECRET.len()).any(|w| w == SECRET), "{path}");
    }
    for path in ["/link-out.txt", "/abs-out/secret.txt"] {
        let r = get(p.addr(), path, "");
        assert_eq!(r.status, 404, "{path}: a symlink out of root is hidden");
        assert!(!r.body.windows(SECRET.len()).any(|w| w == SECRET), "{path}");
    }
    // A symlink that stays inside root is fine.
    let r = get(p.addr(), "/link-in.js", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, site.file("assets/app.js"));
}

#[test]
fn follow_symlinks_allows_links_out_but_never_dotdot() {
    let site = Site::new();
    let p = start(&site.root(), ", follow_symlinks = true", "");
    let r = get(p.addr(), "/link-out.txt", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, SECRET);
    assert_eq!(get(p.addr(), "/../outside/secret.txt", "").status, 400);
}

#[test]
fn precompressed_files_are_chosen_by_accept_encoding() {
    let site = Site::new();
    let p = start(&site.root(), "", "");
    let plain = site.file("assets/pre.css");
    let r = get(p.addr(), "/assets/pre.css", "Accept-Encoding: gzip, br\r\n");
    assert_eq!(r.header("content-encoding"), Some("br"));
    assert_eq!(r.body, b"BROTLI-BYTES");
    assert_eq!(r.header("content-type"), Some("text/css"));
    assert_eq!(r.header("vary"), Some("Accept-Encoding"));
    let r = get(p.addr(), "/assets/pre.css", "Accept-Encoding: gzip\r\n");
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.body, site.file("assets/pre.css.gz"));
    assert_eq!(gunzip(&r.body), plain);
    let r = get(
        p.addr(),
        "/assets/pre.css",
        "Accept-Encoding: br;q=0, gzip\r\n",
    );
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let r = get(p.addr(), "/assets/pre.css", "");
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body, plain);
    assert_eq!(r.header("vary"), Some("Accept-Encoding"));
}

#[test]
fn gzip_on_the_fly_for_compressible_types_above_the_minimum() {
    let site = Site::new();
    let p = start(&site.root(), ", precompressed = false", "");
    let app = site.file("assets/app.js");
    let mut c = Http::connect(p.addr());
    let r = c.get("/assets/app.js", "Accept-Encoding: gzip\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.header("vary"), Some("Accept-Encoding"));
    assert!(
        r.header("etag").unwrap().starts_with("W/"),
        "weak: bytes differ from the file"
    );
    assert!(r.body.len() < app.len() / 4);
    assert_eq!(gunzip(&r.body), app);
    // From the cache: the same bytes again, and 304 on its validator.
    let again = c.get("/assets/app.js", "Accept-Encoding: gzip\r\n");
    assert_eq!(again.body, r.body);
    let etag = r.header("etag").unwrap().to_string();
    let r304 = c.get(
        "/assets/app.js",
        &format!("Accept-Encoding: gzip\r\nIf-None-Match: {etag}\r\n"),
    );
    assert_eq!(r304.status, 304);
    // Below gzip_min_length, not compressible, or not accepted: identity.
    let r = c.get("/assets/tiny.js", "Accept-Encoding: gzip\r\n");
    assert_eq!(r.header("content-encoding"), None);
    let r = c.get("/assets/logo.png", "Accept-Encoding: gzip\r\n");
    assert_eq!(r.header("content-encoding"), None);
    let r = c.get("/assets/app.js", "Accept-Encoding: gzip;q=0\r\n");
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body, app);
    // HEAD gives the compressed length.
    c.send("HEAD /assets/app.js HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n");
    let h = c.response(true);
    assert_eq!(
        h.header("content-length"),
        Some(again.body.len().to_string().as_str())
    );
}

#[test]
fn gzip_can_be_turned_off_and_bounded() {
    let site = Site::new();
    let p = start(&site.root(), ", gzip = false", "");
    let r = get(p.addr(), "/assets/app.js", "Accept-Encoding: gzip\r\n");
    assert_eq!(r.header("content-encoding"), None);
    drop(p);
    let p = start(&site.root(), ", gzip_max_length = 1000", "");
    let r = get(p.addr(), "/assets/app.js", "Accept-Encoding: gzip\r\n");
    assert_eq!(
        r.header("content-encoding"),
        None,
        "larger than gzip_max_length"
    );
}

#[test]
fn keep_alive_pipelining_and_request_limit() {
    let site = Site::new();
    let p = start(&site.root(), "", "keepalive_requests = 3");
    let mut c = Http::connect(p.addr());
    // Two requests in one write: answered in order.
    c.send("GET /assets/tiny.js HTTP/1.1\r\nHost: t\r\n\r\nGET /index.html HTTP/1.1\r\nHost: t\r\n\r\n");
    let a = c.response(false);
    let b = c.response(false);
    assert_eq!(a.body, b"let x = 1;\n");
    assert_eq!(b.body, b"<html>index</html>\n");
    assert_eq!(a.header("connection"), None);
    let last = c.get("/index.html", "");
    assert_eq!(last.header("connection"), Some("close"), "third of 3");
    assert!(c.closes());

    // Connection: close and HTTP/1.0 are honoured.
    let mut c = Http::connect(p.addr());
    let r = c.get("/index.html", "Connection: close\r\n");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closes());
    let mut c = Http::connect(p.addr());
    c.send("GET /index.html HTTP/1.0\r\n\r\n");
    assert_eq!(c.response(false).header("connection"), Some("close"));
    assert!(c.closes());
    let mut c = Http::connect(p.addr());
    c.send("GET /index.html HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(c.response(false).header("connection"), Some("keep-alive"));
    assert_eq!(c.get("/index.html", "").status, 200);
}

#[test]
fn idle_keep_alive_connections_time_out_and_slow_heads_too() {
    let site = Site::new();
    let p = start(
        &site.root(),
        "",
        "keepalive_timeout = \"300ms\"\nhandshake_timeout = \"2s\"",
    );
    let mut c = Http::connect(p.addr());
    assert_eq!(c.get("/index.html", "").status, 200);
    let t = Instant::now();
    assert!(c.closes());
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // A request begun on a kept-alive connection gets handshake_timeout,
    // not the keep-alive one.
    let mut c = Http::connect(p.addr());
    assert_eq!(c.get("/index.html", "").status, 200);
    c.send("GET /index.html HTTP/1.1\r\n");
    std::thread::sleep(Duration::from_millis(600));
    c.send("Host: t\r\n\r\n");
    assert_eq!(c.response(false).status, 200);
}

#[test]
fn methods_other_than_get_and_head_get_405() {
    let site = Site::new();
    let p = start(&site.root(), "", "");
    let mut c = Http::connect(p.addr());
    c.send("DELETE /index.html HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.response(false);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(c.get("/index.html", "").status, 200, "kept alive");
    // A request with a body is answered, then the connection closes (the
    // body is not read as a next request).
    let mut c = Http::connect(p.addr());
    c.send("POST /index.html HTTP/1.1\r\nHost: t\r\nContent-Length: 26\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n");
    let r = c.response(false);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closes());
}

#[test]
fn a_large_download_does_not_stall_the_shard() {
    let site = Site::new();
    // One shard: the stalled download and the other requests share it.
    let p = start(&site.root(), "", "");
    let data = big();
    // A client that asks for the big file and does not read.
    let mut stuck = Http::connect(p.addr());
    stuck.send("GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n");
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..20 {
        let r = get(p.addr(), "/index.html", "");
        assert_eq!(r.status, 200);
    }
    // And two full downloads at once complete byte for byte.
    let t: Vec<_> = (0..2)
        .map(|_| {
            let a = p.addr();
            std::thread::spawn(move || get(a, "/big.bin", "").body)
        })
        .collect();
    for h in t {
        assert!(h.join().unwrap() == data);
    }
    // The stuck one still gets all of it once it reads.
    let r = stuck.response(false);
    assert!(r.body == data);
}

#[test]
fn routes_have_their_own_cache_control_and_root() {
    let site = Site::new();
    let p = Proxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n\n\
         [[route]]\npath = \"/assets\"\nstatic = {{ root = \"{root}\", cache_control = \"public, max-age=31536000, immutable\" }}\n\n\
         [[route]]\npath = \"/\"\nstatic = {{ root = \"{root}\", fallback = \"/index.html\", cache_control = \"no-cache\" }}\n\n\
         [[route]]\npath = \"/docs-alias\"\nstrip_prefix = true\nstatic = {{ root = \"{root}/docs\" }}\n",
        root = site.root().display()
    ));
    let r = get(p.addr(), "/assets/tiny.js", "");
    assert_eq!(
        r.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    let r = get(p.addr(), "/some/page", "");
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    assert_eq!(r.body, site.file("index.html"));
    let r = get(p.addr(), "/docs-alias/index.html", "");
    assert_eq!(
        r.body, b"docs index\n",
        "strip_prefix maps the route onto root"
    );
}

#[test]
fn static_config_errors_are_clear() {
    let site = Site::new();
    let check = |toml: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringlb"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let head = "[server]\nlisten = [\"127.0.0.1:0\"]\n[[route]]\npath = \"/\"\n";
    let e = check(&format!(
        "{head}static = {{ root = \"/nonexistent/dir\" }}\n"
    ));
    assert!(
        e.contains("route.static.root") && e.contains("/nonexistent/dir"),
        "{e}"
    );
    let e = check(&format!(
        "{head}static = {{ root = \"{}\", fallback = \"index.html\" }}\n",
        site.root().display()
    ));
    assert!(e.contains("route.static.fallback"), "{e}");
    let e = check(&format!(
        "{head}static = {{ root = \"{}\", gzip_level = 9 }}\n",
        site.root().display()
    ));
    assert!(e.contains("gzip_level"), "{e}");
    let e = check(&format!(
        "{head}upstream = \"u\"\nstatic = {{ root = \"{}\" }}\n[upstream.u]\nservers = [{{ addr = \"127.0.0.1:1\" }}]\n",
        site.root().display()
    ));
    assert!(e.contains("exactly one of `upstream` or `static`"), "{e}");
}

/// A backend that answers plain requests for `/slow` after 800 ms and
/// anything else at once, and upgrades after 400 ms. Records the targets.
async fn api_backend() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let head = String::from_utf8(common::read_head(&mut s).await).unwrap();
                let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                seen.lock().unwrap().push(target.clone());
                if head.contains("Upgrade: websocket") {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    let _ = s.write_all(common::switching_protocols().as_bytes()).await;
                } else {
                    if target == "/slow" {
                        tokio::time::sleep(Duration::from_millis(800)).await;
                    }
                    let body = format!("api saw {target}");
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                }
                let mut sink = [0u8; 1024];
                use tokio::io::AsyncReadExt;
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_response_timeout_is_for_plain_http_only() {
    let (api, seen) = api_backend().await;
    let p = Proxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n\n\
         [[route]]\npath = \"/api\"\nupstream = \"api\"\nstrip_prefix = true\nresponse_timeout = \"300ms\"\n\n\
         [upstream.api]\nresponse_timeout = \"5s\"\nservers = [{{ addr = \"{api}\" }}]\n"
    ));
    let addr = p.addr();
    let (fast, slow, upgrade) = tokio::task::spawn_blocking(move || {
        let fast = get(addr, "/api/fast?x=1", "");
        let t = Instant::now();
        let slow = get(addr, "/api/slow", "");
        let slow_took = t.elapsed();
        let mut c = Http::connect(addr);
        c.send(&common::upgrade_request("/api/ws", ""));
        let upgrade = c.response(true);
        (fast, (slow, slow_took), upgrade)
    })
    .await
    .unwrap();
    assert_eq!(fast.status, 200);
    assert_eq!(fast.body, b"api saw /fast?x=1");
    assert_eq!(
        slow.0.status, 504,
        "the route's 300 ms, not the upstream's 5 s"
    );
    assert!(slow.1 < Duration::from_secs(3), "{:?}", slow.1);
    assert_eq!(
        upgrade.status, 101,
        "an upgrade answered after 400 ms is not cut"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen.contains(&"/ws".to_string()), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_then_websocket_on_one_connection_and_ws_never_idles_out() {
    let site = Site::new();
    let backend = common::Backend::start().await;
    let p = Proxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\nkeepalive_timeout = \"200ms\"\n\n\
         [[route]]\npath = \"/\"\nstatic = {{ root = \"{}\" }}\n\n\
         [[route]]\npath = \"/ws\"\nupstream = \"u\"\n\n\
         [upstream.u]\nservers = [{{ addr = \"{}\" }}]\n",
        site.root().display(),
        backend.addr
    ));
    let addr = p.addr();
    tokio::task::spawn_blocking(move || {
        let mut c = Http::connect(addr);
        assert_eq!(c.get("/index.html", "").status, 200);
        c.send(&common::upgrade_request("/ws", ""));
        assert_eq!(c.response(true).status, 101);
        // Idle for longer than keepalive_timeout: a tunnel has no idle limit.
        std::thread::sleep(Duration::from_millis(600));
        c.s.write_all(&common::client_frame(0x1, b"still here"))
            .unwrap();
        let mut frame = [0u8; 2 + 10];
        let have = c.buf.len().min(frame.len());
        frame[..have].copy_from_slice(&c.buf[..have]);
        c.s.read_exact(&mut frame[have..]).unwrap();
        assert_eq!(&frame[..2], &[0x81, 10]);
        assert_eq!(&frame[2..], b"still here");
    })
    .await
    .unwrap();
}

#[test]
fn sigterm_closes_idle_keep_alive_connections_at_once() {
    let site = Site::new();
    let mut p = start(&site.root(), "", "keepalive_timeout = \"60s\"");
    let mut c = Http::connect(p.addr());
    assert_eq!(c.get("/index.html", "").status, 200);
    p.signal("TERM");
    assert!(c.closes());
    let status = p.wait_exit(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// Reads what a stuck client was sent, once it starts reading: the number
/// of body bytes before the server's EOF or reset (bounded by 10 s reads).
fn drain_count(c: &mut Http) -> usize {
    let mut total = c.buf.len();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        match c.s.read(&mut chunk) {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

fn patterned(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect()
}

#[test]
fn a_client_that_stops_reading_is_cut_after_send_timeout_a_slow_one_is_not() {
    let site = Site::new();
    // Far more than the two sockets' buffers can absorb.
    let huge = patterned(48 << 20);
    std::fs::write(site.root().join("huge.bin"), &huge).unwrap();
    let steady = patterned(6 << 20);
    std::fs::write(site.root().join("steady.bin"), &steady).unwrap();
    let p = start(&site.root(), "", "send_timeout = \"1s\"");

    let mut stuck = Http::connect(p.addr());
    stuck.send("GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n");
    // A client that reads slowly but steadily for several periods keeps
    // its download going, meanwhile.
    let mut slow = Http::connect(p.addr());
    slow.send("GET /steady.bin HTTP/1.1\r\nHost: t\r\n\r\n");
    let t = Instant::now();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    while got.len() < steady.len() + 200 && t.elapsed() < Duration::from_secs(20) {
        match slow.s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("the slow reader was cut: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n");
        if head_end.is_some_and(|h| got.len() - h - 4 == steady.len()) {
            break;
        }
    }
    let took = t.elapsed();
    let h = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        got[h..] == steady[..],
        "slow reader got {} of {} bytes",
        got.len() - h,
        steady.len()
    );
    assert!(
        took > Duration::from_secs(2),
        "the slow download lasted {took:?}, under two periods"
    );

    // By now the stuck client has been cut: reading gets what was buffered,
    // then the end, well short of the whole file.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let n = drain_count(&mut stuck);
    assert!(
        n < huge.len() / 2,
        "the stuck client was not cut: {n} bytes"
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "draining took {:?}",
        t.elapsed()
    );
    // And the server still serves.
    assert_eq!(get(p.addr(), "/index.html", "").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_answer_the_client_stops_reading_is_cut_too() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = common::read_head(&mut s).await;
                let body = vec![b'x'; 48 << 20];
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                            .as_bytes(),
                    )
                    .await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    let p = Proxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 1\nsend_timeout = \"1s\"\n\n\
         [[route]]\npath = \"/\"\nupstream = \"api\"\n\n\
         [upstream.api]\nservers = [{{ addr = \"{api}\" }}]\n"
    ));
    let addr = p.addr();
    let n = tokio::task::spawn_blocking(move || {
        let mut stuck = Http::connect(addr);
        stuck.send("GET /big HTTP/1.1\r\nHost: t\r\n\r\n");
        std::thread::sleep(Duration::from_secs(3));
        drain_count(&mut stuck)
    })
    .await
    .unwrap();
    assert!(n < 24 << 20, "the stuck client was not cut: {n} bytes");
}

#[test]
fn a_file_that_shrinks_mid_download_ends_the_connection_not_hangs() {
    let site = Site::new();
    let path = site.root().join("shrinks.bin");
    std::fs::write(&path, patterned(32 << 20)).unwrap();
    let p = start(&site.root(), "", "");
    let mut c = Http::connect(p.addr());
    c.send("GET /shrinks.bin HTTP/1.1\r\nHost: t\r\n\r\n");
    // The head and a little of the body, then the file loses most of itself.
    assert!(c.fill());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let t = Instant::now();
    let n = drain_count(&mut c);
    assert!(n < 32 << 20, "got all {n} bytes of a file that shrank");
    assert!(t.elapsed() < Duration::from_secs(9), "{:?}", t.elapsed());
    assert_eq!(get(p.addr(), "/index.html", "").status, 200);
}
