//! Engine for the `http` mode: closed-loop HTTP/1.1 GETs over keep-alive
//! connections, one mio poll loop per worker thread.
//!
//! Each connection sends a request, reads the whole response (framing by
//! `ResponseReader`; body bytes are counted and dropped in the read buffer,
//! which is reused) and sends the next request on the same connection. When
//! the server closes, the connection is opened again and this counts as a
//! reconnect:
//!
//! * announced: the response said `Connection: close` (or was HTTP/1.0, or
//!   its body ran until the close) — the next request goes on a new connection;
//! * unannounced: a kept-alive connection ended (EOF or reset) before any byte
//!   of the next response — the same request is sent again once on a new
//!   connection (RFC 9112 9.3.1 allows this for idempotent requests). A second
//!   such close for the same request is an `unexpected_close` error.
//!
//! The clock starts when every worker thread has tried all its first
//! connections (as in the other modes). With `--requests`, each thread owns a
//! share of the total and stops when it is used up.

use super::{Progress, RunConfig};
use crate::client::ErrKind;
use crate::http::{Eof, HttpError, Response, ResponseReader, MAX_HEAD};
use crate::stats::{record, Results};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// What the `http` mode sends and checks, shared by all connections.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The complete request, written as is for every request.
    pub request: Vec<u8>,
    /// The request carries `Connection: close`: every response ends its connection.
    pub request_close: bool,
    pub expect_status: Option<u16>,
    pub expect_length: Option<u64>,
    /// Total requests for this process (`--requests`); `None` runs for `duration`.
    pub requests: Option<u64>,
}

/// Read buffer per connection; at least `MAX_HEAD` so any legal head fits.
const BUF: usize = 64 * 1024;
/// How often deadlines are checked; timeouts fire at most this late.
const SCAN: Duration = Duration::from_millis(50);
/// Reads per readiness event before other connections get a turn.
const MAX_READS: usize = 64;
/// Most bytes one `recv(MSG_TRUNC)` discards.
const DISCARD: usize = 1 << 20;

const _: () = assert!(BUF >= MAX_HEAD);

/// Start line for all worker threads of the process.
struct Gate {
    left: Mutex<usize>,
    cv: Condvar,
    start: OnceLock<Instant>,
}

impl Gate {
    fn arrive(&self) {
        let mut left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.start.get_or_init(Instant::now);
            self.cv.notify_all();
        }
    }

    fn wait(&self) -> Instant {
        let mut left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        // Bounded: every thread arrives exactly once, at the latest when its
        // `Arrival` guard drops (also on panic).
        while *left > 0 {
            left = self.cv.wait(left).unwrap_or_else(PoisonError::into_inner);
        }
        *self.start.get_or_init(Instant::now)
    }
}

/// Arrives at the gate once, at the latest when dropped.
struct Arrival<'a>(Option<&'a Gate>);

impl Arrival<'_> {
    fn arrive_and_wait(&mut self) -> Instant {
        if let Some(g) = self.0.take() {
            g.arrive();
            return g.wait();
        }
        Instant::now()
    }
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            g.arrive();
        }
    }
}

/// Runs this process's share of an `http` run.
pub fn run(cfg: Arc<RunConfig>, progress: Arc<Progress>) -> Results {
    let threads = cfg.threads.max(1);
    let gate = Arc::new(Gate {
        left: Mutex::new(threads),
        cv: Condvar::new(),
        start: OnceLock::new(),
    });
    let mut first = 0usize;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let n = super::split(cfg.connections as u64, threads, t) as usize;
            let range = first..first + n;
            first += n;
            let budget = cfg
                .http
                .as_ref()
                .and_then(|h| h.requests)
                .map(|r| super::split(r, threads, t));
            let (cfg, gate, progress) = (cfg.clone(), gate.clone(), progress.clone());
            std::thread::Builder::new()
                .name(format!("http-{t}"))
                .spawn(move || {
                    let arrival = Arrival(Some(&gate));
                    thread_main(&cfg, &progress, range, budget, arrival)
                })
                .expect("spawn worker thread")
        })
        .collect();
    let mut total = super::join_workers(handles);
    if cfg.http.as_ref().is_some_and(|h| h.requests.is_none()) {
        total.elapsed = cfg.duration;
    }
    total
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a connect slot (`--connect-concurrency`).
    Queued,
    Connecting,
    /// Connected before the clock started.
    Ready,
    Sending,
    Receiving,
    Done,
}

struct HConn {
    gidx: u64,
    sock: Option<TcpStream>,
    phase: Phase,
    /// The first connection of this slot (counts in `connections`).
    initial: bool,
    buf: Vec<u8>,
    /// Bytes at the front of `buf` kept from earlier reads (an incomplete head).
    kept: usize,
    reader: ResponseReader,
    req_off: usize,
    sent_at: Instant,
    deadline: Instant,
    connect_at: Instant,
    /// Responses received on the current TCP connection.
    served: u64,
    /// The current request was already sent again after an unannounced close.
    retried: bool,
    /// The next send is already accounted for (a retry, or a request claimed
    /// before reconnecting), so it neither claims budget nor checks the end.
    claimed: bool,
    want_write: bool,
    /// Counted in the progress line's open connections.
    counted_open: bool,
}

struct Engine<'a> {
    cfg: &'a RunConfig,
    hc: &'a HttpConfig,
    progress: &'a Progress,
    poll: Poll,
    res: Results,
    codes: Vec<u64>,
    queue: VecDeque<usize>,
    connecting: usize,
    live: usize,
    started: bool,
    measure_from: Instant,
    end: Instant,
    /// Requests this thread may still start (`--requests`).
    budget: Option<u64>,
    last_done: Option<Instant>,
    /// Passed to `recv(MSG_TRUNC)`, which never writes to it; allocated on first use.
    scratch: Vec<MaybeUninit<u8>>,
}

#[derive(Clone, Copy)]
struct Ready {
    writable: bool,
    readable: bool,
    /// The peer's FIN or an error came with this event.
    hup: bool,
}

fn thread_main(
    cfg: &RunConfig,
    progress: &Progress,
    conns: std::ops::Range<usize>,
    budget: Option<u64>,
    mut arrival: Arrival<'_>,
) -> Results {
    let hc = cfg.http.as_ref().expect("http mode has an HttpConfig");
    let mut res = Results::default();
    let poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            res.requested = conns.len() as u64;
            res.failed = conns.len() as u64;
            res.errors[ErrKind::from_io(&e).index()] += conns.len() as u64;
            return res;
        }
    };
    let now = Instant::now();
    let mut eng = Engine {
        cfg,
        hc,
        progress,
        poll,
        res,
        codes: vec![0; 1000],
        queue: VecDeque::new(),
        connecting: 0,
        live: conns.len(),
        started: false,
        measure_from: now,
        end: now,
        budget,
        last_done: None,
        scratch: Vec::new(),
    };
    let mut cs: Vec<HConn> = conns
        .map(|i| HConn {
            gidx: (cfg.conn_offset + i) as u64,
            sock: None,
            phase: Phase::Queued,
            initial: true,
            buf: Vec::new(),
            kept: 0,
            reader: ResponseReader::new(),
            req_off: 0,
            sent_at: now,
            deadline: now,
            connect_at: now,
            served: 0,
            retried: false,
            claimed: false,
            want_write: false,
            counted_open: false,
        })
        .collect();
    eng.res.requested = cs.len() as u64;
    eng.queue.extend(0..cs.len());
    eng.pump_connects(&mut cs);

    let mut events = Events::with_capacity(1024);
    let mut again: Vec<usize> = Vec::new();
    let mut again_next: Vec<usize> = Vec::new();
    let mut next_scan = Instant::now() + SCAN;
    let mut hard_stop: Option<Instant> = None;
    // Bounded: before the start, by the connect deadlines; after it, by
    // `hard_stop` (duration) or the request budget and per-request deadlines.
    while eng.live > 0 || !eng.started {
        if !eng.started && eng.connecting == 0 && eng.queue.is_empty() {
            let start = arrival.arrive_and_wait();
            eng.begin(&mut cs, start);
            if eng.hc.requests.is_none() {
                hard_stop = Some(eng.end + cfg.timeout * 2 + Duration::from_secs(1));
            }
            continue;
        }
        let now = Instant::now();
        if hard_stop.is_some_and(|h| now >= h) {
            for c in cs.iter_mut() {
                eng.fail(c, ErrKind::Timeout);
            }
            break;
        }
        let wait = if again.is_empty() {
            next_scan.saturating_duration_since(now)
        } else {
            Duration::ZERO
        };
        if let Err(e) = eng.poll.poll(&mut events, Some(wait)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            for c in cs.iter_mut() {
                eng.fail(c, ErrKind::from_io(&e));
            }
            eng.queue.clear();
            eng.connecting = 0;
            if !eng.started {
                eng.started = true;
                arrival.arrive_and_wait();
            }
            break;
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let hup = ev.is_read_closed() || ev.is_error();
            let ready = Ready {
                writable: ev.is_writable() || ev.is_error(),
                readable: ev.is_readable() || hup,
                hup,
            };
            eng.step(&mut cs, i, ready, &mut again_next);
        }
        for i in again.drain(..) {
            let ready = Ready {
                writable: false,
                readable: true,
                hup: true,
            };
            eng.step(&mut cs, i, ready, &mut again_next);
        }
        std::mem::swap(&mut again, &mut again_next);
        eng.pump_connects(&mut cs);
        let now = Instant::now();
        if now >= next_scan {
            next_scan = now + SCAN;
            eng.scan(&mut cs, now);
            eng.pump_connects(&mut cs);
        }
    }
    eng.into_results()
}

impl Engine<'_> {
    fn into_results(mut self) -> Results {
        for (code, &n) in self.codes.iter().enumerate() {
            if n > 0 {
                *self.res.status.entry(code as u16).or_insert(0) += n;
            }
        }
        if self.hc.requests.is_some() {
            self.res.elapsed = self
                .last_done
                .map(|t| t.saturating_duration_since(self.measure_from))
                .unwrap_or_default();
        }
        self.res
    }

    fn err(&mut self, k: ErrKind) {
        self.res.errors[k.index()] += 1;
        self.progress.errors.fetch_add(1, Relaxed);
    }

    /// The clock starts: every connected connection sends its first request.
    fn begin(&mut self, cs: &mut [HConn], start: Instant) {
        self.started = true;
        if self.hc.requests.is_some() {
            self.measure_from = start;
            self.end = start + Duration::from_secs(10 * 365 * 24 * 3600);
        } else {
            self.measure_from = start + self.cfg.warmup;
            self.end = self.measure_from + self.cfg.duration;
        }
        for (i, c) in cs.iter_mut().enumerate() {
            if c.phase == Phase::Ready {
                self.next_request(c, i);
            }
        }
    }

    /// Starts queued connects while connect slots are free.
    fn pump_connects(&mut self, cs: &mut [HConn]) {
        let slots = self.cfg.connect_concurrency.max(1);
        while self.connecting < slots {
            let Some(i) = self.queue.pop_front() else {
                break;
            };
            let c = &mut cs[i];
            if c.phase != Phase::Queued {
                continue;
            }
            match self.start_connect(c, i) {
                Ok(()) => {
                    c.phase = Phase::Connecting;
                    self.connecting += 1;
                }
                Err(k) => self.connect_failed(c, k),
            }
        }
    }

    fn start_connect(&mut self, c: &mut HConn, i: usize) -> Result<(), ErrKind> {
        let addr = self.cfg.target.addr;
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(|e| ErrKind::from_connect(&e))?;
        sock.set_nonblocking(true)
            .map_err(|e| ErrKind::from_connect(&e))?;
        let _ = sock.set_nodelay(true);
        let ips = &self.cfg.source_ips;
        if !ips.is_empty() {
            let ip = ips[c.gidx as usize % ips.len()];
            sock.bind(&SocketAddr::new(ip, 0).into())
                .map_err(|e| ErrKind::from_connect(&e))?;
        }
        match sock.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
            Err(e) => return Err(ErrKind::from_connect(&e)),
        }
        let mut s = TcpStream::from_std(sock.into());
        self.poll
            .registry()
            .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| ErrKind::from_connect(&e))?;
        c.want_write = true;
        c.sock = Some(s);
        c.connect_at = Instant::now();
        c.deadline = c.connect_at + self.cfg.timeout;
        Ok(())
    }

    fn connect_failed(&mut self, c: &mut HConn, k: ErrKind) {
        if c.initial {
            self.res.failed += 1;
        }
        self.fail(c, k);
    }

    fn step(&mut self, cs: &mut [HConn], i: usize, ready: Ready, again: &mut Vec<usize>) {
        let c = &mut cs[i];
        match c.phase {
            Phase::Done | Phase::Queued => {}
            Phase::Connecting => {
                if ready.writable || ready.hup {
                    self.connected(c, i);
                }
            }
            Phase::Ready => {
                // Nothing was asked yet; only a close can arrive.
                if ready.hup {
                    self.fail(c, ErrKind::UnexpectedClose);
                }
            }
            Phase::Sending | Phase::Receiving => {
                if ready.writable && c.phase == Phase::Sending {
                    self.flush(c, i);
                }
                if ready.readable
                    && matches!(c.phase, Phase::Sending | Phase::Receiving)
                    && self.read(c, i, ready.hup)
                {
                    again.push(i);
                }
            }
        }
    }

    /// The connect finished one way or the other.
    fn connected(&mut self, c: &mut HConn, i: usize) {
        let Some(s) = c.sock.as_mut() else { return };
        let outcome = match s.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match s.peer_addr() {
                Ok(_) => Ok(true),
                // Spurious wakeup: still connecting.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(false) => {}
            Ok(true) => {
                self.connecting -= 1;
                record(&mut self.res.hs_latency, c.connect_at.elapsed());
                self.res.handshakes += 1;
                self.progress.handshakes.fetch_add(1, Relaxed);
                if c.initial {
                    self.res.opened += 1;
                }
                if !c.counted_open {
                    c.counted_open = true;
                    self.progress.open.fetch_add(1, Relaxed);
                }
                if c.buf.is_empty() {
                    c.buf = vec![0; BUF];
                }
                c.kept = 0;
                c.reader = ResponseReader::new();
                c.served = 0;
                if let Err(k) = self.set_write_interest(c, i, false) {
                    return self.fail(c, k);
                }
                if self.started {
                    self.next_request(c, i);
                } else {
                    c.phase = Phase::Ready;
                }
            }
            Err(e) => {
                self.connecting -= 1;
                self.connect_failed(c, ErrKind::from_connect(&e));
            }
        }
    }

    /// Sends a new request, or the current one again after an unannounced
    /// close; finishes the connection when the run is over.
    fn next_request(&mut self, c: &mut HConn, i: usize) {
        if !std::mem::take(&mut c.claimed) && !self.claim() {
            return self.finish(c, true);
        }
        c.req_off = 0;
        c.sent_at = Instant::now();
        c.deadline = c.sent_at + self.cfg.timeout;
        c.phase = Phase::Sending;
        self.flush(c, i);
    }

    /// Takes one request from the run: false once a duration run has ended
    /// or the `--requests` budget is used up.
    fn claim(&mut self) -> bool {
        if Instant::now() >= self.end {
            return false;
        }
        match self.budget.as_mut() {
            Some(0) => false,
            Some(b) => {
                *b -= 1;
                true
            }
            None => true,
        }
    }

    fn flush(&mut self, c: &mut HConn, i: usize) {
        let hc = self.hc;
        let req = &hc.request;
        let Some(s) = c.sock.as_mut() else { return };
        // Bounded: each pass writes bytes or returns.
        while c.req_off < req.len() {
            match s.write(&req[c.req_off..]) {
                Ok(0) => return self.peer_closed(c, i, ErrKind::UnexpectedClose),
                Ok(n) => c.req_off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(k) = self.set_write_interest(c, i, true) {
                        self.fail(c, k);
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.peer_closed(c, i, ErrKind::from_io(&e)),
            }
        }
        c.phase = Phase::Receiving;
        if let Err(k) = self.set_write_interest(c, i, false) {
            self.fail(c, k);
        }
    }

    /// Reads what is there and handles complete responses. Returns true when
    /// the connection should be visited again without a new event.
    fn read(&mut self, c: &mut HConn, i: usize, hup: bool) -> bool {
        for _ in 0..MAX_READS {
            let Some(s) = c.sock.as_mut() else {
                return false;
            };
            if let Some(left) = c.reader.body_left() {
                // Known-length body bytes are discarded in the kernel
                // (MSG_TRUNC on TCP skips the copy to user space): the run
                // measures the server, so the client does as little as it can.
                if self.scratch.is_empty() {
                    self.scratch = vec![MaybeUninit::uninit(); DISCARD];
                }
                let want = left.min(DISCARD as u64) as usize;
                let r = socket2::SockRef::from(&*s)
                    .recv_with_flags(&mut self.scratch[..want], nix::libc::MSG_TRUNC);
                match r {
                    Ok(0) => {
                        self.eof(c, i);
                        return false;
                    }
                    Ok(n) => {
                        if let Some(resp) = c.reader.skip_body(n as u64) {
                            self.response(c, i, resp);
                            return false;
                        }
                        if n < want && !hup {
                            return false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.peer_closed(c, i, ErrKind::from_io(&e));
                        return false;
                    }
                }
                continue;
            }
            let space = c.buf.len() - c.kept;
            let n = match s.read(&mut c.buf[c.kept..]) {
                Ok(0) => {
                    self.eof(c, i);
                    return false;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.peer_closed(c, i, ErrKind::from_io(&e));
                    return false;
                }
            };
            let end = c.kept + n;
            match c.reader.feed(&c.buf[..end]) {
                Err(e) => {
                    self.fail(c, http_err(e));
                    return false;
                }
                Ok(fed) => {
                    if let Some(resp) = fed.done {
                        if fed.used < end {
                            // Bytes beyond the response nobody asked for.
                            self.fail(c, ErrKind::Protocol);
                            return false;
                        }
                        c.kept = 0;
                        self.response(c, i, resp);
                        return false;
                    }
                    // Keep an incomplete head at the front of the buffer.
                    c.buf.copy_within(fed.used..end, 0);
                    c.kept = end - fed.used;
                }
            }
            // A short read drained the socket; edge-triggered readiness will
            // report the next arrival. Not so after a FIN: the EOF itself
            // still has to be read.
            if n < space && !hup {
                return false;
            }
        }
        true
    }

    fn eof(&mut self, c: &mut HConn, i: usize) {
        match c.reader.eof() {
            Ok(Eof::Done(resp)) => {
                c.kept = 0;
                self.response(c, i, resp);
            }
            Ok(Eof::Idle) if c.kept == 0 => self.peer_closed(c, i, ErrKind::UnexpectedClose),
            Ok(Eof::Idle) | Err(HttpError::Truncated) => self.fail(c, ErrKind::UnexpectedClose),
            Err(HttpError::Protocol) => self.fail(c, ErrKind::Protocol),
        }
    }

    /// The server ended the connection (EOF, reset, broken pipe) while a
    /// request was outstanding and nothing of its response had arrived.
    fn peer_closed(&mut self, c: &mut HConn, i: usize, k: ErrKind) {
        let retryable = k == ErrKind::UnexpectedClose
            && c.served > 0
            && !c.retried
            && c.reader.at_start()
            && c.kept == 0;
        if !retryable {
            return self.fail(c, k);
        }
        self.res.closes_unannounced += 1;
        c.retried = true;
        c.claimed = true;
        self.reconnect(c, i);
    }

    fn response(&mut self, c: &mut HConn, i: usize, r: Response) {
        let now = Instant::now();
        c.served += 1;
        c.retried = false;
        self.progress.messages.fetch_add(1, Relaxed);
        if now >= self.measure_from && now <= self.end {
            record(&mut self.res.latency, now - c.sent_at);
            self.res.messages += 1;
            self.res.bytes += r.body;
            self.codes[usize::from(r.status).min(999)] += 1;
            self.last_done = Some(now);
        }
        if self.hc.expect_status.is_some_and(|s| s != r.status) {
            self.err(ErrKind::HttpStatus);
        }
        if self.hc.expect_length.is_some_and(|l| l != r.body) {
            self.err(ErrKind::BodyLength);
        }
        if !r.keep_alive || self.hc.request_close {
            self.res.closes_announced += 1;
            // Claim the next request before reconnecting, so that no
            // connection is opened only to find the budget used up.
            if !self.claim() {
                return self.finish(c, true);
            }
            c.claimed = true;
            return self.reconnect(c, i);
        }
        self.next_request(c, i);
    }

    /// Drops the current TCP connection and queues a new one for this slot.
    fn reconnect(&mut self, c: &mut HConn, i: usize) {
        self.close_socket(c);
        self.res.reconnects += 1;
        c.initial = false;
        c.kept = 0;
        c.phase = Phase::Queued;
        self.queue.push_back(i);
    }

    fn close_socket(&mut self, c: &mut HConn) {
        if let Some(mut s) = c.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        c.want_write = false;
    }

    fn set_write_interest(&mut self, c: &mut HConn, i: usize, on: bool) -> Result<(), ErrKind> {
        if c.want_write == on {
            return Ok(());
        }
        let Some(s) = c.sock.as_mut() else {
            return Ok(());
        };
        let interest = if on {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        self.poll
            .registry()
            .reregister(s, Token(i), interest)
            .map_err(|e| ErrKind::from_io(&e))?;
        c.want_write = on;
        Ok(())
    }

    /// Deadlines, and the end of a duration run for connections between requests.
    fn scan(&mut self, cs: &mut [HConn], now: Instant) {
        for c in cs.iter_mut() {
            match c.phase {
                Phase::Connecting | Phase::Sending | Phase::Receiving if now >= c.deadline => {
                    if c.phase == Phase::Connecting {
                        self.connecting -= 1;
                        self.connect_failed(c, ErrKind::Timeout);
                    } else {
                        self.fail(c, ErrKind::Timeout);
                    }
                }
                // A reconnect still pending when a duration run ends did
                // nothing wrong; it just has no request left to make.
                Phase::Queued | Phase::Connecting if self.started && now >= self.end => {
                    if c.phase == Phase::Connecting {
                        self.connecting -= 1;
                    }
                    self.finish(c, true);
                }
                _ => {}
            }
        }
    }

    fn finish(&mut self, c: &mut HConn, alive: bool) {
        if c.phase == Phase::Done {
            return;
        }
        self.close_socket(c);
        c.phase = Phase::Done;
        c.buf = Vec::new();
        self.live -= 1;
        if alive {
            self.res.alive += 1;
        }
        if c.counted_open {
            c.counted_open = false;
            self.progress.open.fetch_sub(1, Relaxed);
        }
    }

    fn fail(&mut self, c: &mut HConn, k: ErrKind) {
        if c.phase == Phase::Done {
            return;
        }
        if let Some(s) = c.sock.as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.err(k);
        self.finish(c, false);
    }
}

fn http_err(e: HttpError) -> ErrKind {
    match e {
        HttpError::Protocol => ErrKind::Protocol,
        HttpError::Truncated => ErrKind::UnexpectedClose,
    }
}
