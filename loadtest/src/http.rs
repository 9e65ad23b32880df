//! HTTP/1.1 client pieces for the `http` mode, without any socket code: URL
//! parsing, the request bytes, and a streaming response reader that frames
//! responses (Content-Length, chunked, or until close) and counts body bytes
//! without keeping them.

use crate::client::Target;

/// Longest response head accepted (status line plus headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers accepted in one response head.
const MAX_HEADERS: usize = 64;

/// Parses `http://HOST[:PORT][/PATH]`. Only loopback targets are accepted: the
/// tool is a benchmark client for this machine, not a stress tool for others.
pub fn parse_url(url: &str) -> anyhow::Result<Target> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        anyhow::anyhow!("only http:// URLs are supported by the http mode: {url}")
    })?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() {
        anyhow::bail!("missing host in {url}");
    }
    if authority.contains('@') {
        anyhow::bail!("credentials in the URL are not supported: {url}");
    }
    let addr = crate::client::resolve(authority)?;
    if !addr.ip().is_loopback() {
        anyhow::bail!(
            "{url} resolves to {}, which is not a loopback address; the http mode only loads this machine (127.0.0.0/8 or ::1)",
            addr.ip()
        );
    }
    Ok(Target {
        addr,
        host: authority.to_string(),
        path,
        tls: false,
    })
}

/// Builds the GET request sent on every connection. `headers` are `Name: value`
/// lines given by the user; a `Host` among them replaces the default one.
pub fn build_request(target: &Target, headers: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut extra = String::new();
    let mut has_host = false;
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--header {h:?}: expected 'Name: value'"))?;
        let name = name.trim();
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid_name || value.contains(['\r', '\n']) {
            anyhow::bail!("--header {h:?}: invalid header name or value");
        }
        has_host |= name.eq_ignore_ascii_case("host");
        extra.push_str(&format!("{name}: {}\r\n", value.trim()));
    }
    let host = if has_host {
        String::new()
    } else {
        format!("Host: {}\r\n", target.host)
    };
    Ok(format!("GET {} HTTP/1.1\r\n{host}{extra}\r\n", target.path).into_bytes())
}

/// Whether the request itself asks the server to close after the response.
pub fn request_asks_close(headers: &[String]) -> bool {
    headers.iter().any(|h| {
        h.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case("connection") && has_token(v.as_bytes(), "close")
        })
    })
}

/// A complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Body bytes after transfer decoding (chunk framing excluded; a
    /// Content-Encoding such as gzip is not undone).
    pub body: u64,
    /// The connection may carry another request.
    pub keep_alive: bool,
}

/// Why a response could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Malformed or unsupported response (bad head, bad chunk framing,
    /// conflicting lengths, a head longer than `MAX_HEAD`, bytes nobody asked for).
    Protocol,
    /// The connection ended in the middle of a response.
    Truncated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a chunk size.
    Size,
    /// After the size: optional whitespace and `;extensions`, up to CRLF.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (an empty line ends the message).
    TrailerStart,
    /// Inside a trailer line, up to LF.
    TrailerLine,
    TrailerLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked {
        st: Chunk,
        size: u64,
        digits: u8,
        /// Bytes left in the current chunk's data.
        left: u64,
    },
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body,
}

/// Streaming reader for one connection's responses. Feed it what the socket
/// returned; body bytes are counted and dropped, only an incomplete head has
/// to stay buffered by the caller.
#[derive(Debug, Clone)]
pub struct ResponseReader {
    state: State,
    body: Body,
    status: u16,
    got: u64,
    keep_alive: bool,
}

/// What `feed` did with the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes used; the caller drops them and keeps the rest.
    pub used: usize,
    /// A response completed within the used bytes.
    pub done: Option<Response>,
}

/// What the end of the stream meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eof {
    /// A body delimited by the close is complete.
    Done(Response),
    /// Closed before any byte of the current response arrived.
    Idle,
}

impl Default for ResponseReader {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseReader {
    pub fn new() -> Self {
        ResponseReader {
            state: State::Head,
            body: Body::Length(0),
            status: 0,
            got: 0,
            keep_alive: true,
        }
    }

    /// True while no byte of a response has been consumed.
    pub fn at_start(&self) -> bool {
        self.state == State::Head
    }

    /// Body bytes still to come when the current body has a known length
    /// (Content-Length), so the caller may skip them without feeding them.
    pub fn body_left(&self) -> Option<u64> {
        match (self.state, self.body) {
            (State::Body, Body::Length(left)) if left > 0 => Some(left),
            _ => None,
        }
    }

    /// Accounts for `n` body bytes the caller skipped (at most `body_left()`).
    pub fn skip_body(&mut self, n: u64) -> Option<Response> {
        let Body::Length(left) = &mut self.body else {
            return None;
        };
        let n = n.min(*left);
        *left -= n;
        self.got += n;
        (self.state == State::Body && *left == 0).then(|| self.finish())
    }

    /// Consumes bytes from `data`. With `used < data.len()` and no response
    /// done, the remaining bytes are an incomplete head: keep them, read
    /// more, and feed them again in front of the new bytes.
    pub fn feed(&mut self, data: &[u8]) -> Result<Fed, HttpError> {
        let mut used = 0;
        // Bounded: every pass consumes bytes or returns.
        loop {
            if self.state == State::Head {
                let rest = &data[used..];
                if rest.is_empty() {
                    return Ok(Fed { used, done: None });
                }
                match self.parse_head(rest)? {
                    None => {
                        if rest.len() >= MAX_HEAD {
                            return Err(HttpError::Protocol);
                        }
                        return Ok(Fed { used, done: None });
                    }
                    Some(n) => {
                        used += n;
                        if self.state == State::Head {
                            // An interim 1xx response: the real one follows.
                            continue;
                        }
                        if let Some(r) = self.finish_if_empty() {
                            return Ok(Fed {
                                used,
                                done: Some(r),
                            });
                        }
                    }
                }
            }
            let rest = &data[used..];
            if rest.is_empty() {
                return Ok(Fed { used, done: None });
            }
            let (n, complete) = self.body_bytes(rest)?;
            used += n;
            if complete {
                return Ok(Fed {
                    used,
                    done: Some(self.finish()),
                });
            }
            if used == data.len() {
                return Ok(Fed { used, done: None });
            }
        }
    }

    /// The peer closed the connection (EOF).
    pub fn eof(&mut self) -> Result<Eof, HttpError> {
        match (self.state, self.body) {
            (State::Head, _) => Ok(Eof::Idle),
            (State::Body, Body::UntilClose) => Ok(Eof::Done(self.finish())),
            _ => Err(HttpError::Truncated),
        }
    }

    /// Parses a head at the start of `buf`. Returns its length, or `None` when
    /// it is not complete yet.
    fn parse_head(&mut self, buf: &[u8]) -> Result<Option<usize>, HttpError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(HttpError::Protocol),
        };
        let status = resp.code.ok_or(HttpError::Protocol)?;
        let version = resp.version.ok_or(HttpError::Protocol)?;
        if (100..200).contains(&status) {
            // 101 would switch protocols, which a GET here never asks for.
            if status == 101 {
                return Err(HttpError::Protocol);
            }
            return Ok(Some(n));
        }
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut te = false;
        let mut close = false;
        let mut keep = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = parse_length(h.value).ok_or(HttpError::Protocol)?;
                if length.is_some_and(|l| l != v) {
                    return Err(HttpError::Protocol);
                }
                length = Some(v);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                // Only the final coding decides the framing (RFC 9112 6.3).
                chunked = last_token(h.value).is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                close |= has_token(h.value, "close");
                keep |= has_token(h.value, "keep-alive");
            }
        }
        self.status = status;
        self.got = 0;
        self.keep_alive = if version == 0 { keep && !close } else { !close };
        self.body = if status == 204 || status == 304 {
            Body::Length(0)
        } else if te {
            if chunked {
                Body::Chunked {
                    st: Chunk::Size,
                    size: 0,
                    digits: 0,
                    left: 0,
                }
            } else {
                Body::UntilClose
            }
        } else if let Some(l) = length {
            Body::Length(l)
        } else {
            Body::UntilClose
        };
        if matches!(self.body, Body::UntilClose) || (te && length.is_some()) {
            // Framed by the close, or ambiguous framing: never reuse.
            self.keep_alive = false;
        }
        self.state = State::Body;
        Ok(Some(n))
    }

    fn finish_if_empty(&mut self) -> Option<Response> {
        (self.body == Body::Length(0)).then(|| self.finish())
    }

    fn finish(&mut self) -> Response {
        let r = Response {
            status: self.status,
            body: self.got,
            keep_alive: self.keep_alive,
        };
        self.state = State::Head;
        self.got = 0;
        r
    }

    /// Consumes body bytes; returns (bytes used, response complete).
    fn body_bytes(&mut self, data: &[u8]) -> Result<(usize, bool), HttpError> {
        match &mut self.body {
            Body::Length(left) => {
                let take = (*left).min(data.len() as u64);
                *left -= take;
                self.got += take;
                Ok((take as usize, *left == 0))
            }
            Body::UntilClose => {
                self.got += data.len() as u64;
                Ok((data.len(), false))
            }
            Body::Chunked {
                st,
                size,
                digits,
                left,
            } => {
                let mut i = 0;
                while i < data.len() {
                    let b = data[i];
                    match *st {
                        Chunk::Size => match hex(b) {
                            Some(d) => {
                                if *digits >= 15 {
                                    return Err(HttpError::Protocol);
                                }
                                *size = *size * 16 + u64::from(d);
                                *digits += 1;
                            }
                            None if *digits == 0 => return Err(HttpError::Protocol),
                            None => {
                                *st = Chunk::Ext;
                                continue;
                            }
                        },
                        Chunk::Ext => match b {
                            b'\r' => *st = Chunk::SizeLf,
                            b'\n' => return Err(HttpError::Protocol),
                            _ => {}
                        },
                        Chunk::SizeLf => {
                            if b != b'\n' {
                                return Err(HttpError::Protocol);
                            }
                            if *size == 0 {
                                *st = Chunk::TrailerStart;
                            } else {
                                *left = *size;
                                *st = Chunk::Data;
                            }
                            *size = 0;
                            *digits = 0;
                        }
                        Chunk::Data => {
                            let take = (*left).min((data.len() - i) as u64);
                            *left -= take;
                            self.got += take;
                            i += take as usize;
                            if *left == 0 {
                                *st = Chunk::DataCr;
                            }
                            continue;
                        }
                        Chunk::DataCr => {
                            if b != b'\r' {
                                return Err(HttpError::Protocol);
                            }
                            *st = Chunk::DataLf;
                        }
                        Chunk::DataLf => {
                            if b != b'\n' {
                                return Err(HttpError::Protocol);
                            }
                            *st = Chunk::Size;
                        }
                        Chunk::TrailerStart => {
                            *st = match b {
                                b'\r' => Chunk::TrailerLf,
                                b'\n' => return Err(HttpError::Protocol),
                                _ => Chunk::TrailerLine,
                            }
                        }
                        Chunk::TrailerLine => {
                            if b == b'\n' {
                                *st = Chunk::TrailerStart;
                            }
                        }
                        Chunk::TrailerLf => {
                            if b != b'\n' {
                                return Err(HttpError::Protocol);
                            }
                            return Ok((i + 1, true));
                        }
                    }
                    i += 1;
                }
                Ok((i, false))
            }
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn last_token(v: &[u8]) -> Option<&[u8]> {
    v.split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .rfind(|t| !t.is_empty())
}

fn has_token(v: &[u8], token: &str) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` in pieces of `step` bytes the way the engine does (an
    /// incomplete head stays buffered) and returns the responses and the EOF.
    fn run(wire: &[u8], step: usize) -> (Vec<Response>, Result<Eof, HttpError>) {
        let mut r = ResponseReader::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                let fed = r.feed(&buf).expect("feed");
                buf.drain(..fed.used);
                match fed.done {
                    Some(resp) => out.push(resp),
                    None => break,
                }
            }
        }
        assert!(buf.len() < MAX_HEAD);
        (out, r.eof())
    }

    fn every_step(wire: &[u8]) -> (Vec<Response>, Result<Eof, HttpError>) {
        let first = run(wire, wire.len().max(1));
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(run(wire, step), first, "step {step}");
        }
        first
    }

    #[test]
    fn content_length_keep_alive_twice() {
        let one = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let wire = [&one[..], &one[..]].concat();
        let (rs, eof) = every_step(&wire);
        let ok = Response {
            status: 200,
            body: 5,
            keep_alive: true,
        };
        assert_eq!(rs, vec![ok, ok]);
        assert_eq!(eof, Ok(Eof::Idle));
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
            5;name=v\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let (rs, eof) = every_step(wire);
        assert_eq!(
            rs,
            vec![Response {
                status: 200,
                body: 31,
                keep_alive: true
            }]
        );
        assert_eq!(eof, Ok(Eof::Idle));
    }

    #[test]
    fn connection_close_and_http10() {
        let (rs, _) =
            every_step(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(rs[0].status, 404);
        assert!(!rs[0].keep_alive);
        let (rs, _) = every_step(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx");
        assert!(!rs[0].keep_alive);
        let (rs, _) =
            every_step(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\nx");
        assert!(rs[0].keep_alive);
    }

    #[test]
    fn skipped_body_bytes_count() {
        let mut r = ResponseReader::new();
        let fed = r
            .feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            .unwrap();
        assert_eq!(fed.done, None);
        assert_eq!(r.body_left(), Some(7));
        assert_eq!(r.skip_body(5), None);
        let done = r.skip_body(5).unwrap();
        assert_eq!(done.body, 10);
        assert_eq!(r.body_left(), None);
        assert!(r.at_start());
    }

    #[test]
    fn body_until_close() {
        let (rs, eof) = every_step(b"HTTP/1.1 200 OK\r\n\r\nabc");
        assert!(rs.is_empty());
        assert_eq!(
            eof,
            Ok(Eof::Done(Response {
                status: 200,
                body: 3,
                keep_alive: false
            }))
        );
    }

    #[test]
    fn interim_and_bodiless_statuses() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        let (rs, eof) = every_step(wire);
        assert_eq!(rs.iter().map(|r| r.status).collect::<Vec<_>>(), [304, 204]);
        assert!(rs.iter().all(|r| r.body == 0 && r.keep_alive));
        assert_eq!(eof, Ok(Eof::Idle));
    }

    #[test]
    fn truncation_and_bad_framing() {
        let (_, eof) = run(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 4);
        assert_eq!(eof, Err(HttpError::Truncated));
        let (_, eof) = run(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            4,
        );
        assert_eq!(eof, Err(HttpError::Truncated));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            let mut r = ResponseReader::new();
            assert_eq!(
                r.feed(bad),
                Err(HttpError::Protocol),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
        while wire.len() < MAX_HEAD + 10 {
            wire.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let mut r = ResponseReader::new();
        assert_eq!(r.feed(&wire), Err(HttpError::Protocol));
    }

    #[test]
    fn urls_and_requests() {
        let t = parse_url("http://127.0.0.1:8080/small.bin?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/small.bin?x=1");
        assert_eq!(parse_url("http://127.0.0.1").unwrap().path, "/");
        assert_eq!(parse_url("http://127.0.0.1:9?q").unwrap().path, "/?q");
        assert!(parse_url("ws://127.0.0.1/").is_err());
        let e = parse_url("http://10.1.2.3:80/").unwrap_err().to_string();
        assert!(e.contains("loopback"), "{e}");
        let req = build_request(&t, &["Accept-Encoding: gzip".into()]).unwrap();
        assert_eq!(
            req,
            b"GET /small.bin?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept-Encoding: gzip\r\n\r\n"
        );
        let req = build_request(&t, &["host: example".into()]).unwrap();
        assert_eq!(req, b"GET /small.bin?x=1 HTTP/1.1\r\nhost: example\r\n\r\n");
        assert!(build_request(&t, &["NoColon".into()]).is_err());
        assert!(build_request(&t, &["X: a\r\nInjected: 1".into()]).is_err());
        assert!(request_asks_close(&["Connection: Close".into()]));
        assert!(!request_asks_close(&["Accept: */*".into()]));
    }
}
