//! Client side: URL parsing, connect, upgrade, and a streaming reader that checks
//! every echoed byte against what was sent without buffering whole messages.

use crate::codec::{self, MAX_HEADER, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};
use crate::transport::{FSock, Stream};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use tokio::net::{TcpSocket, TcpStream};

/// Error kinds, counted separately and reported by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrKind {
    ConnectRefused,
    /// EADDRNOTAVAIL / EADDRINUSE: the source port range is exhausted.
    ConnectNoPorts,
    /// EMFILE / ENFILE: out of file descriptors.
    FdLimit,
    ConnectOther,
    HandshakeStatus,
    HandshakeInvalid,
    UnexpectedClose,
    MismatchedEcho,
    Timeout,
    Protocol,
    Io,
    /// `http` mode: a response with a status other than `--expect-status`.
    HttpStatus,
    /// `http` mode: a body whose length differs from `--expect-length`.
    BodyLength,
    /// TLS failed: certificate not trusted or not for the name, an alert
    /// from the server, or bytes that are not TLS.
    Tls,
}

impl ErrKind {
    pub const ALL: [ErrKind; 14] = [
        ErrKind::ConnectRefused,
        ErrKind::ConnectNoPorts,
        ErrKind::FdLimit,
        ErrKind::ConnectOther,
        ErrKind::HandshakeStatus,
        ErrKind::HandshakeInvalid,
        ErrKind::UnexpectedClose,
        ErrKind::MismatchedEcho,
        ErrKind::Timeout,
        ErrKind::Protocol,
        ErrKind::Io,
        ErrKind::HttpStatus,
        ErrKind::BodyLength,
        ErrKind::Tls,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrKind::ConnectRefused => "connect_refused",
            ErrKind::ConnectNoPorts => "connect_no_ports",
            ErrKind::FdLimit => "fd_limit",
            ErrKind::ConnectOther => "connect_other",
            ErrKind::HandshakeStatus => "handshake_status",
            ErrKind::HandshakeInvalid => "handshake_invalid",
            ErrKind::UnexpectedClose => "unexpected_close",
            ErrKind::MismatchedEcho => "mismatched_echo",
            ErrKind::Timeout => "timeout",
            ErrKind::Protocol => "protocol",
            ErrKind::Io => "io",
            ErrKind::HttpStatus => "http_status",
            ErrKind::BodyLength => "body_length",
            ErrKind::Tls => "tls",
        }
    }

    pub fn from_name(s: &str) -> Option<ErrKind> {
        ErrKind::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Classifies a failed connect (or socket setup for one).
    pub fn from_connect(e: &io::Error) -> ErrKind {
        if matches!(e.raw_os_error(), Some(libc_emfile) if libc_emfile == 24 || libc_emfile == 23) {
            return ErrKind::FdLimit;
        }
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ErrKind::ConnectRefused,
            io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse => ErrKind::ConnectNoPorts,
            _ => ErrKind::ConnectOther,
        }
    }

    /// Classifies an I/O error on an established connection.
    pub fn from_io(e: &io::Error) -> ErrKind {
        if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
            return ErrKind::Tls;
        }
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => ErrKind::UnexpectedClose,
            io::ErrorKind::TimedOut => ErrKind::Timeout,
            _ => ErrKind::Io,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Value for the Host header, as written in the URL.
    pub host: String,
    pub path: String,
    /// The URL is `wss://`.
    pub tls: bool,
}

impl Target {
    /// The host without its port (and without IPv6 brackets): the default
    /// TLS server name.
    pub fn host_name(&self) -> &str {
        let h = match self.host.rfind(']') {
            Some(i) => &self.host[..=i],
            None => self.host.rsplit_once(':').map_or(&*self.host, |(h, _)| h),
        };
        h.trim_start_matches('[').trim_end_matches(']')
    }
}

pub fn parse_url(url: &str) -> anyhow::Result<Target> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("ws://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("wss://") {
        (true, r)
    } else {
        anyhow::bail!("only ws:// and wss:// URLs are supported: {url}");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        anyhow::bail!("missing host in {url}");
    }
    let addr = resolve_port(authority, if tls { 443 } else { 80 })?;
    Ok(Target {
        addr,
        host: authority.to_string(),
        path: path.to_string(),
        tls,
    })
}

/// Connects, optionally from a given source address (to spread over 127.0.0.x
/// when one source address runs out of ephemeral ports).
pub async fn connect(target: &Target, source: Option<IpAddr>) -> Result<TcpStream, ErrKind> {
    let sock = if target.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| ErrKind::from_connect(&e))?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))
            .map_err(|e| ErrKind::from_connect(&e))?;
    }
    let s = sock
        .connect(target.addr)
        .await
        .map_err(|e| ErrKind::from_connect(&e))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A cheap nonce source; the key only has to be well-formed, not secret.
pub fn nonce(seed: u64) -> [u8; 16] {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut out = [0u8; 16];
    for chunk in out.chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes());
    }
    out
}

const RESPONSE_MAX: usize = 8 * 1024;

/// Performs the client upgrade; bytes received after the response go to `reader`.
pub async fn handshake(
    stream: &Stream,
    target: &Target,
    seed: u64,
    reader: &mut Reader,
) -> Result<(), ErrKind> {
    let key = codec::make_key(nonce(seed));
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.host, key
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 1024];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if buf.len() >= RESPONSE_MAX {
                return Err(ErrKind::HandshakeInvalid);
            }
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read_some(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(ErrKind::UnexpectedClose);
        }
        let from = filled.saturating_sub(3);
        filled += n;
        let Some(pos) = buf[from..filled].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let end = from + pos + 4;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf[..end]) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err(ErrKind::HandshakeInvalid),
        }
        if resp.code != Some(101) {
            return Err(ErrKind::HandshakeStatus);
        }
        let get = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        let expected = codec::accept_key(key.as_bytes());
        let ok = get("upgrade").is_some_and(|v| codec::header_has_token(v, "websocket"))
            && get("connection").is_some_and(|v| codec::header_has_token(v, "upgrade"))
            && get("sec-websocket-accept").map(|v| v.trim_ascii()) == Some(expected.as_bytes());
        if !ok {
            return Err(ErrKind::HandshakeInvalid);
        }
        reader.preload(&buf[end..filled]);
        return Ok(());
    }
}

/// Length of the sequence-number field at the start of each payload.
pub fn seq_len(size: usize) -> usize {
    size.min(8)
}

/// The sequence field: little-endian in binary mode, hex digits in text mode so
/// that text payloads stay valid UTF-8.
pub fn seq_bytes(seq: u64, text: bool) -> [u8; 8] {
    if text {
        let mut out = [0u8; 8];
        let v = seq as u32;
        for (i, b) in out.iter_mut().enumerate() {
            let nib = (v >> (28 - 4 * i)) & 0xf;
            *b = b"0123456789abcdef"[nib as usize];
        }
        out
    } else {
        seq.to_le_bytes()
    }
}

/// Deterministic payload that differs per connection, so cross-talk is caught.
pub fn make_payload(size: usize, text: bool, conn: u64) -> Vec<u8> {
    (0..size)
        .map(|i| {
            let v = (i as u64)
                .wrapping_mul(31)
                .wrapping_add(conn.wrapping_mul(7));
            if text {
                b'a' + (v % 26) as u8
            } else {
                v as u8
            }
        })
        .collect()
}

/// A pre-built client frame whose sequence field is patched in place per send.
///
/// The mask key is all zero: RFC 6455 requires clients to mask, but any key is
/// legal, and a zero key makes masking a no-op, so the frame is built once.
pub struct OutFrame {
    pub frame: Vec<u8>,
    hdr: usize,
    seq_len: usize,
    text: bool,
}

impl OutFrame {
    pub fn new(payload: &[u8], text: bool) -> Self {
        let op = if text { OP_TEXT } else { OP_BINARY };
        let frame = codec::build_frame(true, op, Some([0; 4]), payload);
        OutFrame {
            hdr: frame.len() - payload.len(),
            seq_len: seq_len(payload.len()),
            frame,
            text,
        }
    }

    pub fn set_seq(&mut self, seq: u64) {
        let b = seq_bytes(seq, self.text);
        self.frame[self.hdr..self.hdr + self.seq_len].copy_from_slice(&b[..self.seq_len]);
    }

    pub fn payload(&self) -> &[u8] {
        &self.frame[self.hdr..]
    }
}

/// What an echoed message must be. The first `seq_len` bytes come from `seq`,
/// the rest from `payload` (whose own first bytes are ignored).
pub struct Expect<'a> {
    pub payload: &'a [u8],
    pub seq: u64,
    pub text: bool,
}

impl Expect<'_> {
    fn matches(&self, pos: usize, chunk: &[u8]) -> bool {
        let sl = seq_len(self.payload.len());
        let mut p = pos;
        let mut c = chunk;
        if p < sl {
            let seq = seq_bytes(self.seq, self.text);
            let k = (sl - p).min(c.len());
            if c[..k] != seq[p..p + k] {
                return false;
            }
            p += k;
            c = &c[k..];
        }
        c == &self.payload[p..p + c.len()]
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    Message,
    Close(Option<u16>),
}

/// Streaming frame reader for server-to-client frames.
pub struct Reader {
    buf: Vec<u8>,
    cap: usize,
    start: usize,
    end: usize,
    in_frame: bool,
    frame_op: u8,
    frame_fin: bool,
    frame_remaining: u64,
    msg_active: bool,
    msg_pos: usize,
    ctrl: [u8; 125],
    ctrl_len: usize,
    ctrl_got: usize,
    /// Pong frames owed to the server; the caller writes them out.
    pub pong_out: Vec<u8>,
}

impl Reader {
    /// `cap` is the read buffer size; the buffer is allocated lazily.
    pub fn new(cap: usize) -> Self {
        Reader {
            buf: Vec::new(),
            cap: cap.max(MAX_HEADER * 2),
            start: 0,
            end: 0,
            in_frame: false,
            frame_op: 0,
            frame_fin: false,
            frame_remaining: 0,
            msg_active: false,
            msg_pos: 0,
            ctrl: [0; 125],
            ctrl_len: 0,
            ctrl_got: 0,
            pong_out: Vec::new(),
        }
    }

    fn preload(&mut self, data: &[u8]) {
        if self.buf.len() < self.cap.max(data.len()) {
            self.buf.resize(self.cap.max(data.len()), 0);
        }
        self.buf[..data.len()].copy_from_slice(data);
        self.start = 0;
        self.end = data.len();
    }

    /// Frees the read buffer while a connection sits idle.
    pub fn release(&mut self) {
        if self.start == self.end {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
    }

    fn make_room(&mut self) -> usize {
        if self.buf.is_empty() {
            self.buf = vec![0u8; self.cap];
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.buf.len() - self.end
    }

    /// One non-blocking read for readiness-driven loops. Returns `Ok(None)` on
    /// WouldBlock, otherwise whether the socket is known to be drained.
    pub fn fill_sync(&mut self, s: &mut FSock) -> Result<Option<bool>, ErrKind> {
        self.make_room();
        match s.read(&mut self.buf[self.end..]) {
            Ok((0, _)) => Err(ErrKind::UnexpectedClose),
            Ok((n, drained)) => {
                self.end += n;
                Ok(Some(drained))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Some(false)),
            Err(e) => Err(ErrKind::from_io(&e)),
        }
    }

    /// One read from the stream. Cancel-safe: a read either happened or not.
    pub async fn fill(&mut self, s: &Stream) -> Result<(), ErrKind> {
        self.make_room();
        // Bounded: each pass either reads or waits for a readiness event.
        loop {
            match s.try_read(&mut self.buf[self.end..]) {
                Ok((0, _)) => return Err(ErrKind::UnexpectedClose),
                Ok((n, drained)) => {
                    if drained {
                        s.clear_read_readiness();
                    }
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    s.tcp().readable().await.map_err(|e| ErrKind::from_io(&e))?;
                }
                Err(e) => return Err(ErrKind::from_io(&e)),
            }
        }
    }

    /// Consumes buffered bytes; returns a complete, byte-checked message or a
    /// close, or `None` when more bytes are needed.
    pub fn next(&mut self, expect: &Expect) -> Result<Option<Got>, ErrKind> {
        loop {
            if !self.in_frame {
                let h = match codec::parse_header(&self.buf[self.start..self.end]) {
                    Ok(Some(h)) => h,
                    Ok(None) => return Ok(None),
                    Err(_) => return Err(ErrKind::Protocol),
                };
                // Servers must not mask (RFC 6455 5.1); no extensions were negotiated.
                if h.mask.is_some() || h.rsv != 0 {
                    return Err(ErrKind::Protocol);
                }
                self.start += h.header_len;
                match h.opcode {
                    OP_TEXT | OP_BINARY => {
                        if self.msg_active {
                            return Err(ErrKind::Protocol);
                        }
                        let want = if expect.text { OP_TEXT } else { OP_BINARY };
                        if h.opcode != want {
                            return Err(ErrKind::MismatchedEcho);
                        }
                        self.msg_active = true;
                        self.msg_pos = 0;
                    }
                    OP_CONT => {
                        if !self.msg_active {
                            return Err(ErrKind::Protocol);
                        }
                    }
                    OP_PING | OP_PONG | OP_CLOSE => {
                        if !h.fin || h.len > 125 {
                            return Err(ErrKind::Protocol);
                        }
                        self.ctrl_len = h.len as usize;
                        self.ctrl_got = 0;
                    }
                    _ => return Err(ErrKind::Protocol),
                }
                self.in_frame = true;
                self.frame_op = h.opcode;
                self.frame_fin = h.fin;
                self.frame_remaining = h.len;
            }
            let avail = self.end - self.start;
            if self.frame_op & 0x8 != 0 {
                let take = (self.ctrl_len - self.ctrl_got).min(avail);
                self.ctrl[self.ctrl_got..self.ctrl_got + take]
                    .copy_from_slice(&self.buf[self.start..self.start + take]);
                self.ctrl_got += take;
                self.start += take;
                if self.ctrl_got < self.ctrl_len {
                    return Ok(None);
                }
                self.in_frame = false;
                let data = &self.ctrl[..self.ctrl_len];
                match self.frame_op {
                    OP_PING => self.pong_out.extend_from_slice(&codec::build_frame(
                        true,
                        OP_PONG,
                        Some([0; 4]),
                        data,
                    )),
                    OP_PONG => {}
                    _ => {
                        let code =
                            (data.len() >= 2).then(|| u16::from_be_bytes([data[0], data[1]]));
                        return Ok(Some(Got::Close(code)));
                    }
                }
                continue;
            }
            let take = self.frame_remaining.min(avail as u64) as usize;
            if self.msg_pos + take > expect.payload.len() {
                return Err(ErrKind::MismatchedEcho);
            }
            if !expect.matches(self.msg_pos, &self.buf[self.start..self.start + take]) {
                return Err(ErrKind::MismatchedEcho);
            }
            self.msg_pos += take;
            self.start += take;
            self.frame_remaining -= take as u64;
            if self.frame_remaining > 0 {
                return Ok(None);
            }
            self.in_frame = false;
            if self.frame_fin {
                self.msg_active = false;
                if self.msg_pos != expect.payload.len() {
                    return Err(ErrKind::MismatchedEcho);
                }
                return Ok(Some(Got::Message));
            }
        }
    }
}

/// A short TCP read means the receive queue was drained, so the next read
/// would only return EAGAIN. Telling tokio so saves that syscall on every
/// message; data arriving later raises a fresh edge-triggered event, and tokio
/// only clears readiness it has not seen change since.
pub fn clear_read_readiness(s: &TcpStream) {
    let _ = s.try_io(tokio::io::Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// A close frame with code 1000, masked with a zero key like every client frame.
pub fn close_frame() -> Vec<u8> {
    codec::build_frame(true, OP_CLOSE, Some([0; 4]), &1000u16.to_be_bytes())
}

/// `host[:port]` (port 80 if absent, IPv6 in brackets) to an address.
pub(crate) fn resolve(authority: &str) -> anyhow::Result<std::net::SocketAddr> {
    resolve_port(authority, 80)
}

/// `host[:port]` (`default_port` if absent) to an address.
fn resolve_port(authority: &str, default_port: u16) -> anyhow::Result<std::net::SocketAddr> {
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:{default_port}")
    } else {
        authority.to_string()
    };
    with_port
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {authority}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(r: &mut Reader, bytes: &[u8]) {
        let s = r.end;
        if r.buf.len() < s + bytes.len() {
            r.buf.resize(s + bytes.len(), 0);
        }
        r.buf[s..s + bytes.len()].copy_from_slice(bytes);
        r.end += bytes.len();
    }

    #[test]
    fn reader_checks_bytes_across_fragments() {
        let mut f = OutFrame::new(&make_payload(300, false, 3), false);
        f.set_seq(42);
        let p = f.payload().to_vec();
        let mut wire = codec::build_frame(false, OP_BINARY, None, &p[..5]);
        wire.extend(codec::build_frame(true, OP_PING, None, b"x"));
        wire.extend(codec::build_frame(true, OP_CONT, None, &p[5..]));
        let exp = Expect {
            payload: &p,
            seq: 42,
            text: false,
        };
        let mut r = Reader::new(64);
        let mut got = None;
        for b in wire.chunks(1) {
            feed(&mut r, b);
            if let Some(g) = r.next(&exp).unwrap() {
                got = Some(g);
            }
        }
        assert_eq!(got, Some(Got::Message));
        assert_eq!(
            r.pong_out,
            codec::build_frame(true, OP_PONG, Some([0; 4]), b"x")
        );

        // One flipped byte, wrong sequence number, or short message: all mismatches.
        let mut bad = p.clone();
        bad[200] ^= 1;
        let mut r = Reader::new(64);
        feed(&mut r, &codec::build_frame(true, OP_BINARY, None, &bad));
        assert_eq!(r.next(&exp), Err(ErrKind::MismatchedEcho));
        let mut r = Reader::new(64);
        feed(&mut r, &codec::build_frame(true, OP_BINARY, None, &p));
        let stale = Expect {
            payload: &p,
            seq: 41,
            text: false,
        };
        assert_eq!(r.next(&stale), Err(ErrKind::MismatchedEcho));
        let mut r = Reader::new(64);
        feed(
            &mut r,
            &codec::build_frame(true, OP_BINARY, None, &p[..299]),
        );
        assert_eq!(r.next(&exp), Err(ErrKind::MismatchedEcho));
    }

    #[test]
    fn masked_server_frame_is_protocol_error() {
        let mut r = Reader::new(64);
        feed(
            &mut r,
            &codec::build_frame(true, OP_BINARY, Some([1, 2, 3, 4]), b"abc"),
        );
        let exp = Expect {
            payload: b"abc",
            seq: 0,
            text: false,
        };
        assert_eq!(r.next(&exp), Err(ErrKind::Protocol));
    }

    #[test]
    fn text_seq_is_ascii() {
        assert_eq!(&seq_bytes(0x1234abcd, true), b"1234abcd");
        let f = OutFrame::new(&make_payload(20, true, 1), true);
        assert!(std::str::from_utf8(f.payload()).is_ok());
    }

    #[test]
    fn url_parsing() {
        let t = parse_url("ws://127.0.0.1:9000/chat?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:9000");
        assert_eq!(t.path, "/chat?x=1");
        assert_eq!(parse_url("ws://127.0.0.1").unwrap().addr.port(), 80);
        assert!(!t.tls);
        let t = parse_url("wss://127.0.0.1").unwrap();
        assert!(t.tls);
        assert_eq!(t.addr.port(), 443);
        assert_eq!(t.host_name(), "127.0.0.1");
        let t = parse_url("wss://localhost:8443/x").unwrap();
        assert_eq!((t.host_name(), t.addr.port()), ("localhost", 8443));
        assert_eq!(parse_url("ws://[::1]:9/").unwrap().host_name(), "::1");
        assert!(parse_url("http://127.0.0.1").is_err());
    }
}
