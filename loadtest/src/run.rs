//! The load-generating modes. Each worker thread runs a tokio current_thread
//! runtime with one task per connection; results are kept per thread in plain
//! (non-atomic) structures and merged at the end.

use crate::client::ErrKind;
use crate::client::{self, close_frame, Expect, Got, OutFrame, Reader, Target};
use crate::stats::{record, Results};
use crate::tls::{self, TlsClient, TlsCore};
use crate::transport::Stream;
use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

mod fast;
mod http;

pub use http::HttpConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    PingPong,
    Rate,
    Handshake,
    Idle,
    Bulk,
    Http,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::PingPong => "pingpong",
            Mode::Rate => "rate",
            Mode::Handshake => "handshake",
            Mode::Idle => "idle",
            Mode::Bulk => "bulk",
            Mode::Http => "http",
        }
    }
}

/// One process's share of a run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub mode: Mode,
    pub target: Target,
    /// Connections opened by this process (pingpong, rate, idle, bulk).
    pub connections: usize,
    /// Connections over all processes; fixes each connection's send phase in `rate`.
    pub total_connections: usize,
    /// Global index of this process's first connection.
    pub conn_offset: usize,
    pub size: usize,
    pub text: bool,
    pub duration: Duration,
    pub warmup: Duration,
    /// Messages per second over all processes (`rate`).
    pub rate: f64,
    /// Handshakes for this process (`handshake`).
    pub total: u64,
    /// Concurrent handshake workers for this process.
    pub concurrency: usize,
    pub hold: Duration,
    pub threads: usize,
    pub timeout: Duration,
    /// Source addresses to spread connections over; empty lets the kernel pick.
    pub source_ips: Vec<IpAddr>,
    /// Connects + upgrades in flight at once, per thread (avoids SYN backlog overflow).
    pub connect_concurrency: usize,
    /// What the `http` mode sends and checks (`None` for the WebSocket modes).
    pub http: Option<HttpConfig>,
    /// Speak TLS (`--tls` or `wss://`); one client config per process.
    pub tls: Option<TlsClient>,
}

/// Live counters for the progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub messages: AtomicU64,
    pub errors: AtomicU64,
    pub open: AtomicU64,
    pub handshakes: AtomicU64,
}

/// Bound on unanswered messages per connection in `rate`; beyond it sends are
/// delayed, which shows up as latency because latency is taken from the
/// intended send time.
const MAX_INFLIGHT: u64 = 1024;

struct Shared {
    to_open: AtomicUsize,
    start_tx: watch::Sender<Option<Instant>>,
    next_hs: AtomicU64,
    progress: Arc<Progress>,
}

struct Ctx {
    cfg: Arc<RunConfig>,
    shared: Arc<Shared>,
    res: RefCell<Results>,
    sem: Semaphore,
    start_rx: watch::Receiver<Option<Instant>>,
}

impl Ctx {
    fn err(&self, k: ErrKind) {
        self.res.borrow_mut().errors[k.index()] += 1;
        self.shared.progress.errors.fetch_add(1, Relaxed);
    }
}

struct Conn {
    stream: Stream,
    reader: Reader,
}

fn reader_cap(size: usize) -> usize {
    (size + 14).clamp(4096, 64 * 1024)
}

/// Ciphertext read per system call: one record for small messages, more for
/// large ones (fewer reads per MiB).
fn tls_in_cap(size: usize) -> usize {
    if size > 16 * 1024 {
        64 * 1024
    } else {
        17 * 1024
    }
}

fn split(n: u64, parts: usize, i: usize) -> u64 {
    let parts = parts as u64;
    let i = i as u64;
    n / parts + u64::from(i < n % parts)
}

/// Runs this process's share of a run and returns merged results.
pub fn run(cfg: Arc<RunConfig>, progress: Arc<Progress>) -> Results {
    if cfg.mode == Mode::Http {
        return http::run(cfg, progress);
    }
    let threads = cfg.threads.max(1);
    let (start_tx, _) = watch::channel(None);
    let shared = Arc::new(Shared {
        to_open: AtomicUsize::new(cfg.connections),
        start_tx,
        next_hs: AtomicU64::new(0),
        progress,
    });
    if cfg.connections == 0 {
        shared.start_tx.send_replace(Some(Instant::now()));
    }
    let t0 = Instant::now();
    let mut first = 0usize;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let n = split(cfg.connections as u64, threads, t) as usize;
            let workers = split(cfg.concurrency as u64, threads, t) as usize;
            let range = first..first + n;
            first += n;
            let cfg = cfg.clone();
            let shared = shared.clone();
            let rx = shared.start_tx.subscribe();
            std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || thread_main(cfg, shared, rx, range, workers))
                .expect("spawn worker thread")
        })
        .collect();
    let mut total = join_workers(handles);
    total.tls = cfg.tls.is_some();
    total.elapsed = match cfg.mode {
        Mode::PingPong | Mode::Rate | Mode::Bulk => cfg.duration,
        Mode::Handshake | Mode::Idle | Mode::Http => t0.elapsed(),
    };
    total
}

fn thread_main(
    cfg: Arc<RunConfig>,
    shared: Arc<Shared>,
    start_rx: watch::Receiver<Option<Instant>>,
    conns: std::ops::Range<usize>,
    workers: usize,
) -> Results {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let ctx = Rc::new(Ctx {
            sem: Semaphore::new(cfg.connect_concurrency.max(1)),
            cfg,
            shared,
            res: RefCell::new(Results::default()),
            start_rx,
        });
        let mut tasks = Vec::new();
        if ctx.cfg.mode == Mode::Handshake {
            for _ in 0..workers {
                tasks.push(tokio::task::spawn_local(hs_worker(ctx.clone())));
            }
        } else if matches!(ctx.cfg.mode, Mode::PingPong | Mode::Bulk) {
            // Connections are set up with tokio, then driven by the mio loop.
            let opened = Rc::new(RefCell::new(Vec::new()));
            for i in conns {
                let ctx = ctx.clone();
                let opened = opened.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let gidx = (ctx.cfg.conn_offset + i) as u64;
                    let c = open_conn(&ctx, gidx).await;
                    announce_opened(&ctx);
                    if let Some(c) = c {
                        opened.borrow_mut().push((gidx, c));
                    }
                }));
            }
            for t in tasks.drain(..) {
                let _ = t.await;
            }
            let start = wait_start(&ctx).await;
            let conns = opened.take();
            fast::run(&ctx, conns, start);
        } else {
            for i in conns {
                tasks.push(tokio::task::spawn_local(conn_task(ctx.clone(), i)));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        ctx.res.take()
    })
}

async fn open_conn(ctx: &Ctx, gidx: u64) -> Option<Conn> {
    let cfg = &ctx.cfg;
    let _permit = ctx.sem.acquire().await.ok()?;
    let src =
        (!cfg.source_ips.is_empty()).then(|| cfg.source_ips[gidx as usize % cfg.source_ips.len()]);
    let mut reader = Reader::new(reader_cap(cfg.size));
    let t0 = Instant::now();
    let seed = gidx ^ (t0.elapsed().as_nanos() as u64) ^ std::process::id() as u64;
    let r = tokio::time::timeout(cfg.timeout, async {
        let sock = client::connect(&cfg.target, src).await?;
        let s = match &cfg.tls {
            None => Stream::Plain(sock),
            // Boxed: the TLS session would otherwise be part of every
            // connection task's state, plain ones included, for its whole life.
            Some(t) => Box::pin(tls_open(ctx, t, sock)).await?,
        };
        client::handshake(&s, &cfg.target, seed, &mut reader).await?;
        Ok::<_, ErrKind>(s)
    })
    .await
    .unwrap_or(Err(ErrKind::Timeout));
    let mut res = ctx.res.borrow_mut();
    res.requested += 1;
    match r {
        Ok(stream) => {
            record(&mut res.hs_latency, t0.elapsed());
            res.handshakes += 1;
            res.opened += 1;
            ctx.shared.progress.handshakes.fetch_add(1, Relaxed);
            ctx.shared.progress.open.fetch_add(1, Relaxed);
            Some(Conn { stream, reader })
        }
        Err(k) => {
            res.failed += 1;
            drop(res);
            ctx.err(k);
            None
        }
    }
}

/// The TLS handshake on a connected socket; counts it in the results.
async fn tls_open(
    ctx: &Ctx,
    t: &TlsClient,
    sock: tokio::net::TcpStream,
) -> Result<Stream, ErrKind> {
    let mut core = TlsCore::new(t, tls_in_cap(ctx.cfg.size))?;
    tls::handshake(&sock, &mut core).await?;
    ctx.res.borrow_mut().record_tls(&core.info());
    Ok(Stream::tls(sock, core))
}

/// Sends one frame and reads its echo, concurrently, so that a message larger
/// than the socket buffers cannot deadlock the two directions.
async fn exchange(c: &mut Conn, frame: &[u8], exp: &Expect<'_>) -> Result<(), ErrKind> {
    let stream = &c.stream;
    let reader = &mut c.reader;
    // Fast path: a small frame almost always fits the socket buffer at once,
    // and then only the read needs waiting for.
    let rest = match stream.try_write(frame) {
        Ok(n) => &frame[n..],
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => frame,
        Err(e) => return Err(ErrKind::from_io(&e)),
    };
    let write = stream.write_all(rest);
    let read = async {
        loop {
            match reader.next(exp)? {
                Some(Got::Message) => return Ok(()),
                Some(Got::Close(_)) => return Err(ErrKind::UnexpectedClose),
                None => reader.fill(stream).await?,
            }
        }
    };
    // Write first: the echo cannot arrive before the message has left.
    tokio::try_join!(write, read)?;
    write_pongs(c).await
}

async fn write_pongs(c: &mut Conn) -> Result<(), ErrKind> {
    if !c.reader.pong_out.is_empty() {
        c.stream.write_all(&c.reader.pong_out).await?;
        c.reader.pong_out.clear();
    }
    Ok(())
}

async fn echo_once(
    ctx: &Ctx,
    c: &mut Conn,
    out: &mut OutFrame,
    seq: u64,
) -> Result<Duration, ErrKind> {
    out.set_seq(seq);
    let exp = Expect {
        payload: out.payload(),
        seq,
        text: ctx.cfg.text,
    };
    let t0 = Instant::now();
    tokio::time::timeout(ctx.cfg.timeout, exchange(c, &out.frame, &exp))
        .await
        .unwrap_or(Err(ErrKind::Timeout))?;
    Ok(t0.elapsed())
}

/// Close handshake: send Close, expect Close back, then wait briefly for the
/// server to close TCP first so TIME_WAIT lands on the server side.
async fn close_conn(ctx: &Ctx, c: &mut Conn) -> Result<(), ErrKind> {
    let exp = Expect {
        payload: &[],
        seq: 0,
        text: false,
    };
    tokio::time::timeout(ctx.cfg.timeout, async {
        c.stream.write_all(&close_frame()).await?;
        loop {
            match c.reader.next(&exp)? {
                Some(Got::Close(_)) => break,
                Some(Got::Message) => return Err(ErrKind::MismatchedEcho),
                None => c.reader.fill(&c.stream).await?,
            }
        }
        Ok(())
    })
    .await
    .unwrap_or(Err(ErrKind::Timeout))?;
    let _ = tokio::time::timeout(Duration::from_secs(1), c.reader.fill(&c.stream)).await;
    Ok(())
}

fn count_message(ctx: &Ctx, lat: Duration) {
    let mut res = ctx.res.borrow_mut();
    record(&mut res.latency, lat);
    res.messages += 1;
    res.bytes += ctx.cfg.size as u64;
}

/// Marks this connection's open attempt done; the last one starts the clock.
fn announce_opened(ctx: &Ctx) {
    if ctx.shared.to_open.fetch_sub(1, Relaxed) == 1 {
        ctx.shared.start_tx.send_replace(Some(Instant::now()));
    }
}

/// Waits until every connection of the process has been attempted.
async fn wait_start(ctx: &Ctx) -> Instant {
    let mut rx = ctx.start_rx.clone();
    let start = match rx.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or_else(Instant::now),
        Err(_) => Instant::now(),
    };
    start
}

async fn conn_task(ctx: Rc<Ctx>, i: usize) {
    let cfg = ctx.cfg.clone();
    let gidx = (cfg.conn_offset + i) as u64;
    let mut conn = open_conn(&ctx, gidx).await;
    let payload = client::make_payload(cfg.size, cfg.text, gidx);
    let mut out = OutFrame::new(&payload, cfg.text);
    if cfg.mode == Mode::Idle {
        if let Some(c) = conn.as_mut() {
            match echo_once(&ctx, c, &mut out, 1).await {
                Ok(lat) => {
                    count_message(&ctx, lat);
                    ctx.shared.progress.messages.fetch_add(1, Relaxed);
                    c.reader.release();
                    c.stream.release();
                }
                Err(k) => {
                    ctx.err(k);
                    conn = None;
                }
            }
        }
    }
    announce_opened(&ctx);
    let start = wait_start(&ctx).await;
    let Some(mut c) = conn else { return };
    let r = match cfg.mode {
        Mode::Rate => rate(&ctx, &mut c, &mut out, start, gidx).await,
        Mode::Idle => idle(&ctx, &mut c, &mut out, start).await,
        // pingpong and bulk run in `fast`, handshake in `hs_worker`.
        Mode::PingPong | Mode::Bulk | Mode::Handshake | Mode::Http => Ok(()),
    };
    match r {
        Ok(()) => {
            ctx.res.borrow_mut().alive += 1;
            if let Err(k) = close_conn(&ctx, &mut c).await {
                ctx.err(k);
            }
        }
        Err(k) => ctx.err(k),
    }
    ctx.shared.progress.open.fetch_sub(1, Relaxed);
}

/// Open loop: message k of this connection is due at `base + k * interval`
/// regardless of how earlier messages fared, and its latency is measured from
/// that due time, so a stalled server cannot hide its stall (no coordinated
/// omission).
async fn rate(
    ctx: &Ctx,
    c: &mut Conn,
    out: &mut OutFrame,
    start: Instant,
    gidx: u64,
) -> Result<(), ErrKind> {
    let cfg = &ctx.cfg;
    let n = cfg.total_connections.max(1) as f64;
    let interval_ns = ((n / cfg.rate) * 1e9).max(1.0) as u64;
    // Spread connections' phases evenly so the aggregate stream is smooth.
    let base = start + Duration::from_nanos((interval_ns as f64 * gidx as f64 / n) as u64);
    let due = |k: u64| base + Duration::from_nanos(interval_ns.saturating_mul(k));
    let measure_from = start + cfg.warmup;
    let send_end = measure_from + cfg.duration;
    let template = out.payload().to_vec();
    let (mut sent, mut recvd) = (0u64, 0u64);
    loop {
        loop {
            let exp = Expect {
                payload: &template,
                seq: recvd,
                text: cfg.text,
            };
            match c.reader.next(&exp)? {
                Some(Got::Message) => {
                    let now = Instant::now();
                    let t = due(recvd);
                    if t >= measure_from {
                        count_message(ctx, now.saturating_duration_since(t));
                    }
                    ctx.shared.progress.messages.fetch_add(1, Relaxed);
                    recvd += 1;
                }
                Some(Got::Close(_)) => return Err(ErrKind::UnexpectedClose),
                None => break,
            }
        }
        write_pongs(c).await?;
        let sending = due(sent) < send_end;
        if !sending && recvd == sent {
            return Ok(());
        }
        let reply_deadline = due(recvd) + cfg.timeout;
        if recvd < sent && Instant::now() >= reply_deadline {
            return Err(ErrKind::Timeout);
        }
        tokio::select! {
            biased;
            r = c.reader.fill(&c.stream) => r?,
            _ = tokio::time::sleep_until(due(sent).into()), if sending && sent - recvd < MAX_INFLIGHT => {
                let now = Instant::now();
                // Catch up on every send that is already due, in one burst.
                while due(sent) <= now && due(sent) < send_end && sent - recvd < MAX_INFLIGHT {
                    out.set_seq(sent);
                    tokio::time::timeout(cfg.timeout, c.stream.write_all(&out.frame))
                        .await
                        .map_err(|_| ErrKind::Timeout)??;
                    sent += 1;
                }
            }
            _ = tokio::time::sleep_until(reply_deadline.into()), if recvd < sent => {
                return Err(ErrKind::Timeout);
            }
        }
    }
}

async fn idle(ctx: &Ctx, c: &mut Conn, out: &mut OutFrame, start: Instant) -> Result<(), ErrKind> {
    // The hold starts once every connection of this process is open, so all of
    // them are idle together for the whole hold.
    tokio::time::sleep_until((start + ctx.cfg.hold).into()).await;
    let lat = echo_once(ctx, c, out, 2).await?;
    count_message(ctx, lat);
    ctx.shared.progress.messages.fetch_add(1, Relaxed);
    Ok(())
}

async fn hs_worker(ctx: Rc<Ctx>) {
    let cfg = ctx.cfg.clone();
    // Bounded by `total`: each iteration claims one handshake.
    loop {
        let k = ctx.shared.next_hs.fetch_add(1, Relaxed);
        if k >= cfg.total {
            break;
        }
        let gidx = cfg.conn_offset as u64 + k;
        let Some(mut c) = open_conn(&ctx, gidx).await else {
            continue;
        };
        let payload = client::make_payload(cfg.size, cfg.text, gidx);
        let mut out = OutFrame::new(&payload, cfg.text);
        let r = match echo_once(&ctx, &mut c, &mut out, 1).await {
            Ok(lat) => {
                count_message(&ctx, lat);
                ctx.shared.progress.messages.fetch_add(1, Relaxed);
                close_conn(&ctx, &mut c).await
            }
            Err(k) => Err(k),
        };
        match r {
            Ok(()) => ctx.res.borrow_mut().alive += 1,
            Err(k) => ctx.err(k),
        }
        ctx.shared.progress.open.fetch_sub(1, Relaxed);
    }
}

/// Joins worker threads and merges what each measured.
pub(crate) fn join_workers(handles: Vec<std::thread::JoinHandle<Results>>) -> Results {
    let mut total = Results::default();
    for h in handles {
        match h.join() {
            Ok(r) => total.merge(&r),
            Err(_) => eprintln!("ringlb-load: a worker thread panicked; its results are lost"),
        }
    }
    total
}
