//! indep-load: a second WebSocket load client for the benchmark harness.
//!
//! It exists so that no figure in `docs/BENCHMARKS.md` rests on ringlb-load
//! alone (issue #18): a different client stack (tokio + tungstenite, a
//! work-stealing runtime, one task per connection and direction) offers the
//! load, so a quirk of ringlb-load's batching cannot flatter one proxy.
//!
//! Three modes, the flags and the JSON keys the harness reads being the same
//! as ringlb-load's (`bench/run.py` picks the tool with `--client`):
//! - `pingpong`: closed loop; every connection sends one binary message and
//!   waits for its echo before the next.
//! - `rate`: open loop; `--rate` messages per second over all connections,
//!   each connection on a fixed schedule (phase-shifted so the sends spread
//!   over the period). Latency is taken from the *scheduled* send time, not
//!   from when the send happened, so a stalled proxy cannot hide its stall by
//!   slowing the client (no coordinated omission).
//! - `handshake`: `--total` sessions, `--concurrency` at a time, each one
//!   connect, upgrade, one echo, close handshake; the per-connection path.
//!
//! Every echo is checked: same length, same sequence number as sent.
//!
//! `--tls` (or a `wss://` URL) speaks TLS through OpenSSL, a different TLS
//! stack from ringlb's and ringlb-load's rustls, with ringlb-load's TLS
//! flags (`--ca`, `--sni`, `--tls-version`, `--tls-cipher`, `--tls-resume` /
//! `--no-tls-resume`) and its `tls` JSON block, which the harness checks.
//! Resumption keeps a pool of the sessions the servers sent (TLS 1.3
//! tickets) and uses each once (RFC 8446, C.4: clients should not reuse a
//! ticket). The key exchange offered is
//! X25519 alone, so a handshake that completes negotiated it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use openssl::ssl::{SslConnector, SslMethod, SslSession, SslSessionCacheMode, SslVersion};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Pingpong,
    Rate,
    Handshake,
}

#[derive(Parser, Debug)]
#[command(about = "Independent WebSocket load client (tokio-tungstenite) for bench/")]
struct Cli {
    #[arg(value_enum)]
    mode: Mode,
    /// ws:// URL of the proxy.
    #[arg(long)]
    url: String,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<String>,
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// Message size in bytes (at least 24: sequence number, connection id, stamp).
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Sent but not measured, before the measured window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Open loop: messages per second over all connections.
    #[arg(long)]
    rate: Option<f64>,
    /// Binary frames (the default and only kind; accepted for the harness).
    #[arg(long)]
    binary: bool,
    /// Latency percentiles as CSV (same columns as ringlb-load's).
    #[arg(long)]
    hist: Option<String>,
    /// Handshake mode: sessions in all.
    #[arg(long, default_value_t = 20000)]
    total: u64,
    /// Handshake mode: sessions at a time.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Speak TLS (wss://); a wss:// URL implies it.
    #[arg(long)]
    tls: bool,
    /// PEM file with the CA the server's certificate must chain to.
    #[arg(long)]
    ca: Option<String>,
    /// Server name to send and verify (default: the URL's host).
    #[arg(long)]
    sni: Option<String>,
    /// Only this TLS version: 1.2 or 1.3.
    #[arg(long)]
    tls_version: Option<String>,
    /// Only this cipher suite, by its rustls name (as ringlb-load takes it),
    /// e.g. TLS13_AES_128_GCM_SHA256.
    #[arg(long)]
    tls_cipher: Option<String>,
    /// Resume TLS sessions from tickets the servers sent (the default).
    #[arg(long, overrides_with = "no_tls_resume")]
    tls_resume: bool,
    /// Full handshakes only.
    #[arg(long)]
    no_tls_resume: bool,
}

/// What a connection runs over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Ws = WebSocketStream<Box<dyn Io>>;

/// Opens WebSocket connections, over TLS if asked, and counts handshakes.
struct Connector {
    url: String,
    host_port: String,
    tls: Option<Tls>,
}

struct Tls {
    connector: SslConnector,
    server_name: String,
    resume: bool,
    /// Sessions the servers sent, each used once.
    sessions: Arc<Mutex<Vec<SslSession>>>,
    full: AtomicU64,
    resumed: AtomicU64,
    negotiated: Mutex<HashMap<String, u64>>,
}

/// Sessions kept for resumption; the oldest go first beyond this.
const MAX_SESSIONS: usize = 1024;

impl Connector {
    fn new(cli: &Cli) -> Result<Connector, String> {
        let wss = cli.url.starts_with("wss://");
        let rest = cli
            .url
            .strip_prefix("wss://")
            .or_else(|| cli.url.strip_prefix("ws://"))
            .ok_or("the URL must start with ws:// or wss://")?;
        let host_port = rest.split('/').next().unwrap_or(rest).to_string();
        let host = host_port
            .rsplit_once(':')
            .map_or(host_port.as_str(), |h| h.0);
        let tls = if cli.tls || wss {
            Some(Tls::new(cli, host)?)
        } else {
            None
        };
        // tungstenite sees ws://: the TLS is ours, beneath it.
        let url = if wss {
            format!("ws://{rest}")
        } else {
            cli.url.clone()
        };
        Ok(Connector {
            url,
            host_port,
            tls,
        })
    }

    async fn connect(&self) -> Result<Ws, String> {
        let tcp = tokio::net::TcpStream::connect(&self.host_port)
            .await
            .map_err(|e| e.to_string())?;
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(t) => Box::new(t.handshake(tcp).await?),
        };
        let (ws, _) = tokio_tungstenite::client_async(self.url.as_str(), io)
            .await
            .map_err(|e| e.to_string())?;
        Ok(ws)
    }

    fn json(&self) -> Option<serde_json::Value> {
        let t = self.tls.as_ref()?;
        let full = t.full.load(Ordering::Relaxed);
        let resumed = t.resumed.load(Ordering::Relaxed);
        Some(serde_json::json!({
            "library": openssl::version::version(),
            "handshakes": full + resumed,
            "full": full,
            "resumed": resumed,
            "negotiated": *t.negotiated.lock().unwrap(),
        }))
    }
}

impl Tls {
    fn new(cli: &Cli, host: &str) -> Result<Tls, String> {
        let e = |e: openssl::error::ErrorStack| e.to_string();
        let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(e)?;
        if let Some(ca) = &cli.ca {
            b.set_ca_file(ca).map_err(|x| format!("{ca}: {x}"))?;
        }
        match cli.tls_version.as_deref() {
            None => {}
            Some("1.3") => {
                b.set_min_proto_version(Some(SslVersion::TLS1_3))
                    .map_err(e)?;
                b.set_max_proto_version(Some(SslVersion::TLS1_3))
                    .map_err(e)?;
            }
            Some("1.2") => {
                b.set_min_proto_version(Some(SslVersion::TLS1_2))
                    .map_err(e)?;
                b.set_max_proto_version(Some(SslVersion::TLS1_2))
                    .map_err(e)?;
            }
            Some(v) => return Err(format!("--tls-version {v}: 1.2 or 1.3")),
        }
        if let Some(c) = &cli.tls_cipher {
            // rustls names TLS 1.3 suites TLS13_*, OpenSSL TLS_*.
            let name = c.strip_prefix("TLS13_").map(|r| format!("TLS_{r}"));
            let name = name.ok_or(format!("--tls-cipher {c}: only TLS 1.3 suites"))?;
            b.set_ciphersuites(&name)
                .map_err(|x| format!("{name}: {x}"))?;
        }
        b.set_groups_list("X25519").map_err(e)?;
        b.set_alpn_protos(b"\x08http/1.1").map_err(e)?;
        let sessions: Arc<Mutex<Vec<SslSession>>> = Arc::default();
        let resume = !cli.no_tls_resume;
        if resume {
            b.set_session_cache_mode(SslSessionCacheMode::CLIENT);
            let keep = sessions.clone();
            b.set_new_session_callback(move |_, s| {
                let mut v = keep.lock().unwrap();
                if v.len() >= MAX_SESSIONS {
                    v.remove(0);
                }
                v.push(s);
            });
        }
        Ok(Tls {
            connector: b.build(),
            server_name: cli.sni.clone().unwrap_or_else(|| host.to_string()),
            resume,
            sessions,
            full: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            negotiated: Mutex::new(HashMap::new()),
        })
    }

    async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> Result<tokio_openssl::SslStream<tokio::net::TcpStream>, String> {
        let e = |e: openssl::error::ErrorStack| e.to_string();
        let mut ssl = self
            .connector
            .configure()
            .map_err(e)?
            .into_ssl(&self.server_name)
            .map_err(e)?;
        if self.resume {
            let s = self.sessions.lock().unwrap().pop();
            if let Some(s) = s {
                // SAFETY: the session came from this connector's context
                // (its new-session callback), as set_session requires.
                unsafe { ssl.set_session(&s) }.map_err(e)?;
            }
        }
        let mut stream = tokio_openssl::SslStream::new(ssl, tcp).map_err(e)?;
        std::pin::Pin::new(&mut stream)
            .connect()
            .await
            .map_err(|x| x.to_string())?;
        let ssl = stream.ssl();
        if ssl.session_reused() {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.full.fetch_add(1, Ordering::Relaxed);
        }
        // ringlb-load's (rustls's) spelling, which the harness checks.
        let version = ssl.version_str().replace("TLSv1.", "TLSv1_");
        let cipher = ssl.current_cipher().map_or("?", |c| c.name());
        let cipher = cipher
            .strip_prefix("TLS_")
            .map_or(cipher.to_string(), |r| format!("TLS13_{r}"));
        let key = format!("{version} {cipher} X25519");
        *self.negotiated.lock().unwrap().entry(key).or_default() += 1;
        Ok(stream)
    }
}

#[derive(Default)]
struct Errors {
    connect: AtomicU64,
    mismatch: AtomicU64,
    closed: AtomicU64,
    io: AtomicU64,
}

impl Errors {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "connect": self.connect.load(Ordering::Relaxed),
            "mismatch": self.mismatch.load(Ordering::Relaxed),
            "closed": self.closed.load(Ordering::Relaxed),
            "io": self.io.load(Ordering::Relaxed),
        })
    }

    fn total(&self) -> u64 {
        self.connect.load(Ordering::Relaxed)
            + self.mismatch.load(Ordering::Relaxed)
            + self.closed.load(Ordering::Relaxed)
            + self.io.load(Ordering::Relaxed)
    }
}

/// What one connection measured inside the window.
struct Tally {
    hist: Histogram<u64>,
    messages: u64,
}

/// Latency percentiles in µs, with the keys ringlb-load writes.
fn lat_json(hist: &Histogram<u64>) -> serde_json::Value {
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    serde_json::json!({
        "count": hist.len(),
        "mean": if hist.is_empty() { 0.0 } else { hist.mean() / 1e3 },
        "p50": us(0.5), "p90": us(0.9), "p99": us(0.99), "p999": us(0.999),
        "max": hist.max() as f64 / 1e3,
    })
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s in nanoseconds, 3 significant digits.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("histogram bounds")
}

/// Smallest message: sequence number, connection id, send stamp.
const MIN_SIZE: usize = 24;

fn payload(size: usize, conn: u64, seq: u64, stamp_ns: u64) -> Vec<u8> {
    let mut p = vec![0x5au8; size.max(MIN_SIZE)];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    p[8..16].copy_from_slice(&conn.to_le_bytes());
    p[16..24].copy_from_slice(&stamp_ns.to_le_bytes());
    p
}

fn stamp_of(p: &[u8]) -> u64 {
    p.get(16..24)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// How late a timer may fire before the lateness counts as the proxy's.
/// tokio's timer wheel has 1 ms granularity, so a send due at t goes out up
/// to ~1 ms later for reasons that have nothing to do with the proxy; that
/// slop is not charged. A send later than this (the writer was held up, e.g.
/// by a proxy that stopped reading) is measured from its due time instead,
/// so a stall cannot hide itself (no coordinated omission).
const TIMER_SLOP: Duration = Duration::from_millis(2);

fn seq_of(p: &[u8], conn: u64) -> Option<u64> {
    if p.len() < 16 || u64::from_le_bytes(p[8..16].try_into().ok()?) != conn {
        return None;
    }
    Some(u64::from_le_bytes(p[..8].try_into().ok()?))
}

struct Plan {
    conn: Connector,
    size: usize,
    start: Instant,
    warm_end: Instant,
    end: Instant,
    /// Open loop: this connection's period and phase.
    period: Option<Duration>,
    errors: Arc<Errors>,
}

async fn pingpong(plan: &Plan, conn: u64) -> Tally {
    let mut t = Tally {
        hist: new_hist(),
        messages: 0,
    };
    let ws = match plan.conn.connect().await {
        Ok(ws) => ws,
        Err(_) => {
            plan.errors.connect.fetch_add(1, Ordering::Relaxed);
            return t;
        }
    };
    let (mut tx, mut rx) = ws.split();
    let mut seq = 0u64;
    while Instant::now() < plan.end {
        let sent = Instant::now();
        if tx
            .send(Message::Binary(payload(plan.size, conn, seq, 0)))
            .await
            .is_err()
        {
            plan.errors.io.fetch_add(1, Ordering::Relaxed);
            return t;
        }
        loop {
            match rx.next().await {
                Some(Ok(Message::Binary(b))) => {
                    if b.len() != plan.size.max(MIN_SIZE) || seq_of(&b, conn) != Some(seq) {
                        plan.errors.mismatch.fetch_add(1, Ordering::Relaxed);
                        return t;
                    }
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(_)) | None => {
                    plan.errors.closed.fetch_add(1, Ordering::Relaxed);
                    return t;
                }
                Some(Err(_)) => {
                    plan.errors.io.fetch_add(1, Ordering::Relaxed);
                    return t;
                }
            }
        }
        let now = Instant::now();
        if sent >= plan.warm_end && now <= plan.end {
            let _ = t.hist.record((now - sent).as_nanos().max(1_000) as u64);
            t.messages += 1;
        }
        seq += 1;
    }
    let _ = tx.send(Message::Close(None)).await;
    t
}

async fn open_loop(plan: &Plan, conn: u64, phase: Duration) -> Tally {
    let period = plan.period.expect("rate mode has a period");
    let ws = match plan.conn.connect().await {
        Ok(ws) => ws,
        Err(_) => {
            plan.errors.connect.fetch_add(1, Ordering::Relaxed);
            return Tally {
                hist: new_hist(),
                messages: 0,
            };
        }
    };
    let (mut tx, mut rx) = ws.split();
    // The schedule starts at the common start time, not at this connection's
    // connect, so every connection's sends are phase-shifted, not bunched.
    let first = plan.start + phase;
    let total = ((plan.end - first).as_secs_f64() / period.as_secs_f64()).floor() as u64 + 1;
    let size = plan.size;
    let start = plan.start;
    let errors = plan.errors.clone();
    let writer = tokio::spawn(async move {
        for seq in 0..total {
            let due = first + period * seq as u32;
            tokio::time::sleep_until(due.into()).await;
            let woke = Instant::now();
            let from = if woke.saturating_duration_since(due) <= TIMER_SLOP {
                woke
            } else {
                due
            };
            let stamp = from.saturating_duration_since(start).as_nanos() as u64;
            if tx
                .send(Message::Binary(payload(size, conn, seq, stamp)))
                .await
                .is_err()
            {
                errors.io.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let _ = tx.send(Message::Close(None)).await;
    });
    let mut t = Tally {
        hist: new_hist(),
        messages: 0,
    };
    let mut expect = 0u64;
    // Bounded: every echo due has arrived, or 5 s past the end.
    let deadline = plan.end + Duration::from_secs(5);
    while expect < total {
        let next = tokio::time::timeout_at(deadline.into(), rx.next()).await;
        match next {
            Ok(Some(Ok(Message::Binary(b)))) => {
                if b.len() != size.max(MIN_SIZE) || seq_of(&b, conn) != Some(expect) {
                    plan.errors.mismatch.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let due = first + period * expect as u32;
                let from = plan.start + Duration::from_nanos(stamp_of(&b));
                let now = Instant::now();
                if due >= plan.warm_end && due <= plan.end {
                    let _ = t
                        .hist
                        .record((now.saturating_duration_since(from)).as_nanos().max(1_000) as u64);
                    t.messages += 1;
                }
                expect += 1;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(_))) | Ok(None) => {
                plan.errors.closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(Some(Err(_))) => {
                plan.errors.io.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(_) => {
                plan.errors.closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    writer.abort();
    t
}

fn main() {
    let cli = Cli::parse();
    if cli.mode == Mode::Rate && !cli.rate.is_some_and(|r| r > 0.0 && r.is_finite()) {
        eprintln!("rate mode needs --rate > 0 (messages per second)");
        std::process::exit(2);
    }
    if cli.connections == 0 {
        eprintln!("--connections must be at least 1");
        std::process::exit(2);
    }
    let conn = match Connector::new(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = if cli.mode == Mode::Handshake {
        rt.block_on(handshakes(cli, conn))
    } else {
        rt.block_on(run(cli, conn))
    };
    std::process::exit(code);
}

async fn run(cli: Cli, conn: Connector) -> i32 {
    let errors = Arc::new(Errors::default());
    // Connections open during the first part of the warm-up.
    let start = Instant::now() + Duration::from_millis(200);
    let warm_end = start + cli.warmup;
    let end = warm_end + cli.duration;
    let period = cli
        .rate
        .map(|r| Duration::from_secs_f64(cli.connections as f64 / r));
    let plan = Arc::new(Plan {
        conn,
        size: cli.size,
        start,
        warm_end,
        end,
        period,
        errors: errors.clone(),
    });
    let cpu0 = proc_cpu();
    let mut tasks = Vec::with_capacity(cli.connections);
    for i in 0..cli.connections {
        let plan = plan.clone();
        let mode = cli.mode;
        let phase = period
            .map(|p| p.mul_f64(i as f64 / cli.connections as f64))
            .unwrap_or_default();
        tasks.push(tokio::spawn(async move {
            match mode {
                Mode::Pingpong => pingpong(&plan, i as u64).await,
                Mode::Rate | Mode::Handshake => open_loop(&plan, i as u64, phase).await,
            }
        }));
    }
    let mut hist = new_hist();
    let mut messages = 0u64;
    for t in tasks {
        if let Ok(t) = t.await {
            let _ = hist.add(&t.hist);
            messages += t.messages;
        } else {
            errors.io.fetch_add(1, Ordering::Relaxed);
        }
    }
    let cpu1 = proc_cpu();
    let secs = cli.duration.as_secs_f64();
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    let lat = lat_json(&hist);
    let out = serde_json::json!({
        "tool": "indep-load",
        "mode": match cli.mode { Mode::Pingpong => "pingpong", Mode::Rate => "rate", Mode::Handshake => "handshake" },
        "params": {"connections": cli.connections, "size": cli.size, "rate": cli.rate,
                   "duration_s": secs, "warmup_s": cli.warmup.as_secs_f64(), "threads": cli.threads},
        "elapsed_s": secs,
        "messages": messages,
        "msgs_per_s": messages as f64 / secs,
        "offered_per_s": cli.rate,
        "latency_us": lat,
        "connections": {"requested": cli.connections},
        "errors": errors.json(),
        "error_total": errors.total(),
        "cpu_s": {"user": cpu1.0 - cpu0.0, "sys": cpu1.1 - cpu0.1},
        "tls": plan.conn.json(),
    });
    println!(
        "{} msgs in {:.1}s = {:.0} msg/s, p50 {:.0}us p99 {:.0}us, errors {}",
        messages,
        secs,
        messages as f64 / secs,
        us(0.5),
        us(0.99),
        errors.total()
    );
    if !write_json(cli.json.as_deref(), &out) {
        return 1;
    }
    if let Some(path) = &cli.hist {
        let mut s = String::from("kind,percentile,latency_us,count_at_or_below\n");
        for v in hist.iter_quantiles(5) {
            s.push_str(&format!(
                "roundtrip,{:.6},{:.3},{}\n",
                v.quantile_iterated_to() * 100.0,
                v.value_iterated_to() as f64 / 1e3,
                v.count_since_last_iteration()
            ));
        }
        let _ = std::fs::write(path, s);
    }
    if errors.total() > 0 {
        1
    } else {
        0
    }
}

/// One session of the handshake mode: connect and upgrade (timed), one
/// echo (checked), then the close handshake, waiting for the peer's Close.
async fn one_session(conn: &Connector, size: usize, n: u64, errors: &Errors) -> Option<Duration> {
    let t0 = Instant::now();
    let Ok(ws) = conn.connect().await else {
        errors.connect.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let took = t0.elapsed();
    let (mut tx, mut rx) = ws.split();
    if tx
        .send(Message::Binary(payload(size, n, 0, 0)))
        .await
        .is_err()
    {
        errors.io.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    loop {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => {
                if b.len() != size.max(MIN_SIZE) || seq_of(&b, n) != Some(0) {
                    errors.mismatch.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                break;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(_)) | None => {
                errors.closed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Some(Err(_)) => {
                errors.io.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    // The peer's Close (or EOF) ends the session.
    while let Some(Ok(m)) = rx.next().await {
        if m.is_close() {
            break;
        }
    }
    Some(took)
}

async fn handshakes(cli: Cli, conn: Connector) -> i32 {
    let conn = Arc::new(conn);
    let errors = Arc::new(Errors::default());
    let next = Arc::new(AtomicU64::new(0));
    let cpu0 = proc_cpu();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cli.concurrency.max(1) {
        let (errors, next, conn) = (errors.clone(), next.clone(), conn.clone());
        let (total, size) = (cli.total, cli.size);
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return hist;
                }
                if let Some(d) = one_session(&conn, size, n, &errors).await {
                    let _ = hist.record(d.as_nanos().max(1_000) as u64);
                }
            }
        }));
    }
    let mut hist = new_hist();
    for t in tasks {
        match t.await {
            Ok(h) => {
                let _ = hist.add(&h);
            }
            Err(_) => {
                errors.io.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = proc_cpu();
    let done = hist.len();
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    let out = serde_json::json!({
        "tool": "indep-load",
        "mode": "handshake",
        "params": {"total": cli.total, "concurrency": cli.concurrency, "size": cli.size,
                   "threads": cli.threads},
        "elapsed_s": secs,
        "handshakes": done,
        "handshakes_per_s": done as f64 / secs,
        "handshake_latency_us": lat_json(&hist),
        "connections": {"requested": cli.total},
        "errors": errors.json(),
        "error_total": errors.total(),
        "cpu_s": {"user": cpu1.0 - cpu0.0, "sys": cpu1.1 - cpu0.1},
        "tls": conn.json(),
    });
    println!(
        "{} sessions in {:.1}s = {:.0} /s, upgrade p50 {:.0}us p99 {:.0}us, errors {}",
        done,
        secs,
        done as f64 / secs,
        us(0.5),
        us(0.99),
        errors.total()
    );
    if !write_json(cli.json.as_deref(), &out) {
        return 1;
    }
    i32::from(errors.total() > 0)
}

/// Writes the result for the harness, if asked; false if it could not.
fn write_json(path: Option<&str>, out: &serde_json::Value) -> bool {
    let Some(path) = path else {
        return true;
    };
    match std::fs::write(path, serde_json::to_vec_pretty(out).unwrap()) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("cannot write {path}: {e}");
            false
        }
    }
}

/// This process's (user, sys) CPU seconds, from /proc (no unsafe needed).
fn proc_cpu() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = text.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / tick;
    // utime and stime are fields 14 and 15 of the stat line, 12 and 13 here.
    (get(11), get(12))
}
