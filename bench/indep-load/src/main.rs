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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio_tungstenite::tungstenite::Message;

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
    url: String,
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
    let ws = match tokio_tungstenite::connect_async(plan.url.as_str()).await {
        Ok((ws, _)) => ws,
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
    let ws = match tokio_tungstenite::connect_async(plan.url.as_str()).await {
        Ok((ws, _)) => ws,
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = if cli.mode == Mode::Handshake {
        rt.block_on(handshakes(cli))
    } else {
        rt.block_on(run(cli))
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> i32 {
    let errors = Arc::new(Errors::default());
    // Connections open during the first part of the warm-up.
    let start = Instant::now() + Duration::from_millis(200);
    let warm_end = start + cli.warmup;
    let end = warm_end + cli.duration;
    let period = cli
        .rate
        .map(|r| Duration::from_secs_f64(cli.connections as f64 / r));
    let plan = Arc::new(Plan {
        url: cli.url.clone(),
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
async fn one_session(url: &str, size: usize, n: u64, errors: &Errors) -> Option<Duration> {
    let t0 = Instant::now();
    let Ok((ws, _)) = tokio_tungstenite::connect_async(url).await else {
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

async fn handshakes(cli: Cli) -> i32 {
    let errors = Arc::new(Errors::default());
    let next = Arc::new(AtomicU64::new(0));
    let cpu0 = proc_cpu();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cli.concurrency.max(1) {
        let (errors, next, url) = (errors.clone(), next.clone(), cli.url.clone());
        let (total, size) = (cli.total, cli.size);
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return hist;
                }
                if let Some(d) = one_session(&url, size, n, &errors).await {
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
