//! RFC 6455 echo backend, usable in-process (`spawn`) and from the CLI.
//!
//! It shares the machine with the proxy under test, so it is built to be cheap:
//! one tokio current_thread runtime per thread, frames echoed in place in the
//! read buffer, payloads streamed (a 1 MiB message never sits whole in memory),
//! and read buffers borrowed from a per-thread pool only while a connection has
//! bytes to process, so idle connections hold no buffer at all.

use crate::codec::OP_TEXT;
use crate::codec::{self, FrameHeader, MAX_HEADER, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG};
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Read buffer size while a connection is busy; big enough to move bulk data in
/// few syscalls, and only held during processing.
const BUF_SIZE: usize = 64 * 1024;
/// Pooled buffers kept per thread; beyond this they are freed to bound memory.
const POOL_MAX: usize = 64;
const HANDSHAKE_MAX: usize = 8 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters readable while the server runs (e.g. for `--report-every`).
#[derive(Debug, Default)]
pub struct EchoStats {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    pub handshakes: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub accept_errors: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct EchoOptions {
    /// Runtime threads; each has its own SO_REUSEPORT listener per address.
    pub threads: usize,
    /// Set SO_REUSEPORT even with one thread, so sibling processes can share the port.
    pub reuseport: bool,
    pub backlog: i32,
}

impl Default for EchoOptions {
    fn default() -> Self {
        EchoOptions {
            threads: 1,
            reuseport: false,
            backlog: 4096,
        }
    }
}

/// A running echo server; dropping it stops the server threads.
pub struct EchoServer {
    addrs: Vec<SocketAddr>,
    stats: Arc<EchoStats>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn stats(&self) -> &Arc<EchoStats> {
        &self.stats
    }

    /// Stops accepting, drops every connection and joins the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts an echo server on `addrs` (port 0 allowed) with default options.
pub fn spawn(addrs: &[SocketAddr]) -> io::Result<EchoServer> {
    spawn_with(addrs, &EchoOptions::default())
}

fn bind(addr: SocketAddr, reuseport: bool, backlog: i32) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuseport {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

pub fn spawn_with(addrs: &[SocketAddr], opts: &EchoOptions) -> io::Result<EchoServer> {
    let threads = opts.threads.max(1);
    let reuseport = opts.reuseport || threads > 1;
    // Bind everything before starting threads so that bind errors are returned
    // to the caller and the addresses are known when this function returns.
    let mut per_thread: Vec<Vec<std::net::TcpListener>> =
        (0..threads).map(|_| Vec::new()).collect();
    let mut bound = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let first = bind(addr, reuseport, opts.backlog)?;
        let local = first.local_addr()?;
        bound.push(local);
        per_thread[0].push(first);
        for lst in per_thread.iter_mut().skip(1) {
            lst.push(bind(local, true, opts.backlog)?);
        }
    }
    let stats = Arc::new(EchoStats::default());
    let (tx, rx) = watch::channel(false);
    let mut handles = Vec::with_capacity(threads);
    for (i, listeners) in per_thread.into_iter().enumerate() {
        let stats = stats.clone();
        let rx = rx.clone();
        let h = std::thread::Builder::new()
            .name(format!("echo-{i}"))
            .spawn(move || run_thread(listeners, stats, rx))?;
        handles.push(h);
    }
    Ok(EchoServer {
        addrs: bound,
        stats,
        shutdown: tx,
        threads: handles,
    })
}

fn run_thread(
    listeners: Vec<std::net::TcpListener>,
    stats: Arc<EchoStats>,
    mut rx: watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("echo: cannot build runtime: {e}");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        for l in listeners {
            match TcpListener::from_std(l) {
                Ok(l) => {
                    tokio::task::spawn_local(accept_loop(l, stats.clone()));
                }
                Err(e) => eprintln!("echo: listener: {e}"),
            }
        }
        // Connections live as tasks of this LocalSet and die with it.
        let _ = rx.wait_for(|&stop| stop).await;
    });
}

async fn accept_loop(listener: TcpListener, stats: Arc<EchoStats>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                stats.accepted.fetch_add(1, Relaxed);
                let _ = s.set_nodelay(true);
                tokio::task::spawn_local(serve(s, stats.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on a full fd table.
                let n = stats.accept_errors.fetch_add(1, Relaxed);
                if n < 10 || n.is_power_of_two() {
                    eprintln!("echo: accept error ({} so far): {e}", n + 1);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

struct OpenGuard(Arc<EchoStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn pool_get() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn pool_put(b: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

async fn serve(mut stream: TcpStream, stats: Arc<EchoStats>) {
    stats.open.fetch_add(1, Relaxed);
    let _guard = OpenGuard(stats.clone());
    let leftover =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, server_handshake(&mut stream)).await {
            Ok(Ok(l)) => l,
            _ => {
                stats.handshake_failures.fetch_add(1, Relaxed);
                return;
            }
        };
    stats.handshakes.fetch_add(1, Relaxed);
    let _ = echo_loop(&mut stream, &stats, leftover).await;
}

/// Reads the upgrade request, validates it, answers 101 (or an error status),
/// and returns any bytes the client sent after the request.
async fn server_handshake(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 1024];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if buf.len() >= HANDSHAKE_MAX {
                let _ = stream
                    .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                    .await;
                return Err(io::ErrorKind::InvalidData.into());
            }
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let from = filled.saturating_sub(3);
        filled += n;
        let Some(pos) = buf[from..filled].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let end = from + pos + 4;
        match check_upgrade(&buf[..end]) {
            Ok(accept) => {
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                stream.write_all(resp.as_bytes()).await?;
                return Ok(buf[end..filled].to_vec());
            }
            Err(resp) => {
                let _ = stream.write_all(resp.as_bytes()).await;
                let _ = stream.shutdown().await;
                return Err(io::ErrorKind::InvalidData.into());
            }
        }
    }
}

const BAD_REQUEST: &str =
    "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// Returns the Sec-WebSocket-Accept value, or the full error response to send.
fn check_upgrade(req: &[u8]) -> Result<String, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Request::new(&mut headers);
    match r.parse(req) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(BAD_REQUEST),
    }
    if r.method != Some("GET") {
        return Err("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    }
    if r.version != Some(1) {
        return Err(BAD_REQUEST);
    }
    let get = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let upgrade_ok = get("upgrade").is_some_and(|v| codec::header_has_token(v, "websocket"));
    let connection_ok = r
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| codec::header_has_token(h.value, "upgrade"));
    if !upgrade_ok || !connection_ok || get("host").is_none() {
        return Err(BAD_REQUEST);
    }
    if get("sec-websocket-version").map(|v| v.trim_ascii()) != Some(b"13") {
        return Err("HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    }
    match get("sec-websocket-key").map(|v| v.trim_ascii()) {
        Some(k) if codec::key_is_valid(k) => Ok(codec::accept_key(k)),
        _ => Err(BAD_REQUEST),
    }
}

async fn echo_loop(stream: &mut TcpStream, stats: &EchoStats, leftover: Vec<u8>) -> io::Result<()> {
    let mut echo = Echo::new();
    if !leftover.is_empty() {
        let mut buf = pool_get();
        buf[..leftover.len()].copy_from_slice(&leftover);
        let done = process_and_write(&mut echo, stream, &mut buf, leftover.len(), stats).await;
        pool_put(buf);
        if done? {
            return Ok(());
        }
    }
    loop {
        stream.readable().await?;
        let mut buf = pool_get();
        // Drain everything readable while we hold the buffer, then give it back.
        let res: io::Result<bool> = async {
            loop {
                let carried = echo.take_carry(&mut buf);
                match stream.try_read(&mut buf[carried..]) {
                    Ok(0) => return Ok(true),
                    Ok(n) => {
                        let short = carried + n < buf.len();
                        if process_and_write(&mut echo, stream, &mut buf, carried + n, stats)
                            .await?
                        {
                            return Ok(true);
                        }
                        if short {
                            // Drained: skip the read that would only say EAGAIN.
                            crate::client::clear_read_readiness(stream);
                            return Ok(false);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Partial header bytes were copied back; keep them.
                        echo.put_carry(&buf[..carried]);
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        .await;
        pool_put(buf);
        if res? {
            return Ok(());
        }
    }
}

/// Returns true when the connection should be closed.
async fn process_and_write(
    echo: &mut Echo,
    stream: &mut TcpStream,
    buf: &mut [u8],
    filled: usize,
    stats: &EchoStats,
) -> io::Result<bool> {
    let mut from = 0;
    // Each pass ends at the end of the input or right after a control frame
    // that needs a reply, so replies go out at a frame boundary. Bounded by
    // the number of frames in the buffer.
    while from < filled {
        let (out, used, outcome) = echo.process(&mut buf[from..filled], stats);
        if out > 0 {
            stream.write_all(&buf[from..from + out]).await?;
        }
        if !echo.ctrl_out.is_empty() {
            stream.write_all(&echo.ctrl_out).await?;
            echo.ctrl_out.clear();
            echo.ctrl_out.shrink_to(256);
        }
        if outcome == Outcome::Close {
            // The server closes the TCP connection first (RFC 6455 7.1.1).
            let _ = stream.shutdown().await;
            return Ok(true);
        }
        from += used;
    }
    Ok(false)
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Outcome {
    Continue,
    Close,
}

enum St {
    Header,
    Data {
        remaining: u64,
        mask: [u8; 4],
        off: usize,
        fin: bool,
    },
    Control {
        opcode: u8,
        mask: [u8; 4],
        data: [u8; 125],
        len: usize,
        got: usize,
    },
}

/// Per-connection echo state machine; small enough to keep for idle connections.
struct Echo {
    state: St,
    in_message: bool,
    carry: [u8; MAX_HEADER],
    carry_len: usize,
    ctrl_out: Vec<u8>,
}

impl Echo {
    fn new() -> Self {
        Echo {
            state: St::Header,
            in_message: false,
            carry: [0; MAX_HEADER],
            carry_len: 0,
            ctrl_out: Vec::new(),
        }
    }

    fn take_carry(&mut self, buf: &mut [u8]) -> usize {
        let n = self.carry_len;
        buf[..n].copy_from_slice(&self.carry[..n]);
        self.carry_len = 0;
        n
    }

    fn put_carry(&mut self, b: &[u8]) {
        self.carry[..b.len()].copy_from_slice(b);
        self.carry_len = b.len();
    }

    fn fail(&mut self, code: u16, stats: &EchoStats) -> Outcome {
        stats.protocol_errors.fetch_add(1, Relaxed);
        self.ctrl_out.extend_from_slice(&codec::build_frame(
            true,
            OP_CLOSE,
            None,
            &code.to_be_bytes(),
        ));
        Outcome::Close
    }

    /// Echoes `buf` in place and returns (output length, input consumed, outcome).
    /// Server headers are 4 bytes shorter than masked client headers, so output
    /// never overtakes input. A control frame needing a reply ends the pass so
    /// the caller can send `ctrl_out` before any later data frame's output.
    fn process(&mut self, buf: &mut [u8], stats: &EchoStats) -> (usize, usize, Outcome) {
        let n = buf.len();
        let mut i = 0;
        let mut o = 0;
        loop {
            match &mut self.state {
                St::Header => {
                    if i == n {
                        break;
                    }
                    let h: FrameHeader = match codec::parse_header(&buf[i..]) {
                        Ok(Some(h)) => h,
                        Ok(None) => {
                            self.carry[..n - i].copy_from_slice(&buf[i..]);
                            self.carry_len = n - i;
                            break;
                        }
                        Err(_) => return (o, i, self.fail(1002, stats)),
                    };
                    // Clients must mask (RFC 6455 5.1) and we negotiate no extensions.
                    let Some(mask) = h.mask else {
                        return (o, i, self.fail(1002, stats));
                    };
                    if h.rsv != 0 {
                        return (o, i, self.fail(1002, stats));
                    }
                    i += h.header_len;
                    match h.opcode {
                        OP_TEXT | OP_BINARY | OP_CONT => {
                            if (h.opcode == OP_CONT) != self.in_message {
                                return (o, i, self.fail(1002, stats));
                            }
                            self.in_message = !h.fin;
                            o += codec::write_header(&mut buf[o..], h.fin, h.opcode, None, h.len);
                            if h.len == 0 {
                                if h.fin {
                                    stats.messages.fetch_add(1, Relaxed);
                                }
                            } else {
                                self.state = St::Data {
                                    remaining: h.len,
                                    mask,
                                    off: 0,
                                    fin: h.fin,
                                };
                            }
                        }
                        OP_CLOSE | OP_PING | OP_PONG => {
                            if !h.fin || h.len > 125 {
                                return (o, i, self.fail(1002, stats));
                            }
                            self.state = St::Control {
                                opcode: h.opcode,
                                mask,
                                data: [0; 125],
                                len: h.len as usize,
                                got: 0,
                            };
                        }
                        _ => return (o, i, self.fail(1002, stats)),
                    }
                }
                St::Data {
                    remaining,
                    mask,
                    off,
                    fin,
                } => {
                    if i == n {
                        break;
                    }
                    let take = (*remaining).min((n - i) as u64) as usize;
                    codec::apply_mask(&mut buf[i..i + take], *mask, *off);
                    if o != i {
                        buf.copy_within(i..i + take, o);
                    }
                    o += take;
                    i += take;
                    *off += take;
                    *remaining -= take as u64;
                    stats.bytes.fetch_add(take as u64, Relaxed);
                    if *remaining == 0 {
                        if *fin {
                            stats.messages.fetch_add(1, Relaxed);
                        }
                        self.state = St::Header;
                    }
                }
                St::Control {
                    opcode,
                    mask,
                    data,
                    len,
                    got,
                } => {
                    let take = (*len - *got).min(n - i);
                    data[*got..*got + take].copy_from_slice(&buf[i..i + take]);
                    *got += take;
                    i += take;
                    if *got < *len {
                        break;
                    }
                    let (opcode, mask, len) = (*opcode, *mask, *len);
                    let mut data = *data;
                    codec::apply_mask(&mut data[..len], mask, 0);
                    self.state = St::Header;
                    let outcome = self.control(opcode, &data[..len], stats);
                    if outcome == Outcome::Close || !self.ctrl_out.is_empty() {
                        return (o, i, outcome);
                    }
                }
            }
        }
        (o, n, Outcome::Continue)
    }

    fn control(&mut self, opcode: u8, data: &[u8], stats: &EchoStats) -> Outcome {
        match opcode {
            OP_PING => {
                self.ctrl_out
                    .extend_from_slice(&codec::build_frame(true, OP_PONG, None, data));
                Outcome::Continue
            }
            OP_PONG => Outcome::Continue,
            _ => {
                if data.len() == 1 {
                    return self.fail(1002, stats);
                }
                if data.len() >= 2 {
                    let code = u16::from_be_bytes([data[0], data[1]]);
                    if !codec::close_code_is_valid(code) {
                        return self.fail(1002, stats);
                    }
                    if std::str::from_utf8(&data[2..]).is_err() {
                        return self.fail(1007, stats);
                    }
                }
                // Echo the peer's close code and reason back, then close.
                self.ctrl_out
                    .extend_from_slice(&codec::build_frame(true, OP_CLOSE, None, data));
                Outcome::Close
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(echo: &mut Echo, input: &[u8], chunk: usize) -> (Vec<u8>, Vec<u8>, Outcome) {
        let stats = EchoStats::default();
        let mut out = Vec::new();
        let mut ctrl = Vec::new();
        let mut buf = vec![0u8; BUF_SIZE];
        for piece in input.chunks(chunk) {
            let c = echo.take_carry(&mut buf);
            buf[c..c + piece.len()].copy_from_slice(piece);
            let filled = c + piece.len();
            let mut from = 0;
            while from < filled {
                let (o, used, oc) = echo.process(&mut buf[from..filled], &stats);
                out.extend_from_slice(&buf[from..from + o]);
                // Control replies are part of the output stream, in order.
                out.append(&mut echo.ctrl_out.clone());
                ctrl.append(&mut echo.ctrl_out);
                if oc == Outcome::Close {
                    return (out, ctrl, oc);
                }
                from += used;
            }
        }
        (out, ctrl, Outcome::Continue)
    }

    #[test]
    fn echoes_masked_fragments_any_chunking() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut input = codec::build_frame(false, OP_BINARY, Some([9, 8, 7, 6]), &payload[..100]);
        input.extend(codec::build_frame(true, OP_PING, Some([1, 1, 1, 1]), b"hi"));
        input.extend(codec::build_frame(
            true,
            OP_CONT,
            Some([5, 6, 7, 8]),
            &payload[100..],
        ));
        // The pong must come between the fragments' echoes, not inside one.
        let mut expect = codec::build_frame(false, OP_BINARY, None, &payload[..100]);
        expect.extend(codec::build_frame(true, OP_PONG, None, b"hi"));
        expect.extend(codec::build_frame(true, OP_CONT, None, &payload[100..]));
        for chunk in [1, 2, 7, 13, 1000, BUF_SIZE - MAX_HEADER] {
            let (out, ctrl, oc) = run(&mut Echo::new(), &input, chunk);
            assert_eq!(oc, Outcome::Continue);
            assert!(out == expect, "chunk {chunk}");
            assert_eq!(ctrl, codec::build_frame(true, OP_PONG, None, b"hi"));
        }
    }

    #[test]
    fn rejects_unmasked_and_bad_continuation() {
        let (_, ctrl, oc) = run(
            &mut Echo::new(),
            &codec::build_frame(true, OP_TEXT, None, b"x"),
            100,
        );
        assert_eq!(oc, Outcome::Close);
        assert_eq!(
            ctrl,
            codec::build_frame(true, OP_CLOSE, None, &1002u16.to_be_bytes())
        );
        let f = codec::build_frame(true, OP_CONT, Some([1, 2, 3, 4]), b"x");
        assert_eq!(run(&mut Echo::new(), &f, 100).2, Outcome::Close);
    }

    #[test]
    fn close_is_echoed() {
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        let f = codec::build_frame(true, OP_CLOSE, Some([3, 1, 4, 1]), &p);
        let (out, ctrl, oc) = run(&mut Echo::new(), &f, 3);
        assert_eq!(out, ctrl);
        assert_eq!(oc, Outcome::Close);
        assert_eq!(ctrl, codec::build_frame(true, OP_CLOSE, None, &p));
    }

    #[test]
    fn upgrade_validation() {
        let ok = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(check_upgrade(ok).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let v12 = String::from_utf8_lossy(ok).replace("Version: 13", "Version: 12");
        assert!(check_upgrade(v12.as_bytes()).unwrap_err().contains("426"));
        let post = String::from_utf8_lossy(ok).replace("GET", "POST");
        assert!(check_upgrade(post.as_bytes()).unwrap_err().contains("405"));
        let noup = String::from_utf8_lossy(ok).replace("Upgrade: WebSocket\r\n", "");
        assert!(check_upgrade(noup.as_bytes()).unwrap_err().contains("400"));
    }
}
