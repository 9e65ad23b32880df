use clap::{Args, Parser, Subcommand};
use ringlb_load::args::{HDuration, Size};
use ringlb_load::client;
use ringlb_load::echo;
use ringlb_load::http;
use ringlb_load::limits;
use ringlb_load::run::{self, HttpConfig, Mode, Progress, RunConfig};
use ringlb_load::stats::{cpu_times, Results};
use ringlb_load::tls;
use serde::Serialize;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::SocketAddr;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "ringlb-load",
    version,
    about = "WebSocket load generator and echo backend; HTTP/1.1 keep-alive GET load"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// RFC 6455 echo backend.
    Echo(EchoArgs),
    /// Closed loop: one message in flight per connection.
    Pingpong(PingpongArgs),
    /// Open loop at a fixed aggregate rate; latency from the intended send time.
    Rate(RateArgs),
    /// Connect, upgrade, one echo, close; connections/s and handshake latency.
    Handshake(HandshakeArgs),
    /// Open N connections, hold them idle, check every one still echoes.
    Idle(IdleArgs),
    /// Large binary messages echoed; MB/s and latency.
    Bulk(BulkArgs),
    /// HTTP/1.1 GETs, closed loop over keep-alive connections; req/s, MB/s, latency.
    Http(HttpArgs),
}

#[derive(Args)]
struct EchoArgs {
    /// Address to listen on (repeatable); port 0 picks a free port.
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Runtime threads, each with its own SO_REUSEPORT listener.
    #[arg(long, default_value = "1")]
    threads: usize,
    /// Processes sharing the ports via SO_REUSEPORT, each with its own fd limit.
    #[arg(long, default_value = "1")]
    procs: usize,
    /// Print open connections and echoed messages to stderr this often.
    #[arg(long)]
    report_every: Option<HDuration>,
    /// Bind with SO_REUSEPORT (set for --procs children).
    #[arg(long, hide = true)]
    reuseport: bool,
}

#[derive(Args, Serialize, Clone)]
struct Common {
    /// Target, e.g. ws://127.0.0.1:9000/
    #[arg(long)]
    url: String,
    /// Worker threads per process, each a tokio current_thread runtime.
    #[arg(long, default_value = "1")]
    threads: usize,
    /// Child processes, each with its own fd limit; results are merged.
    #[arg(long, default_value = "1")]
    procs: usize,
    /// Limit for connect+upgrade and for each echo (http: each connect and each request).
    #[arg(long, default_value = "10s")]
    timeout: HDuration,
    /// Write one JSON object with every figure to PATH, or `-` for stdout.
    #[arg(long)]
    json: Option<String>,
    /// Write the full latency percentile distribution as CSV to PATH.
    #[arg(long)]
    hist: Option<String>,
    /// Show a progress line on stderr even when it is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Exit 0 even when errors occurred.
    #[arg(long)]
    allow_errors: bool,
    /// Spread connections over this many 127.0.0.x source addresses (0 = automatic).
    #[arg(long, default_value = "0")]
    source_ips: usize,
    /// Connection attempts in flight at once, per worker thread.
    #[arg(long, default_value = "256")]
    connect_concurrency: usize,
    /// Speak TLS (wss://); a wss:// URL implies it.
    #[arg(long)]
    tls: bool,
    /// PEM file with the CA certificate(s) the server's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    ca: Option<String>,
    /// Accept any server certificate chain (handshake signatures are still checked).
    #[arg(long)]
    insecure: bool,
    /// TLS server name for SNI and verification (default: the URL's host).
    #[arg(long, value_name = "NAME")]
    sni: Option<String>,
    /// Resume TLS sessions on later connections (the default).
    #[arg(long, overrides_with = "no_tls_resume")]
    #[serde(skip)]
    tls_resume: bool,
    /// Never resume a TLS session: every handshake is a full one.
    #[arg(long, overrides_with = "tls_resume")]
    #[serde(skip)]
    no_tls_resume: bool,
    /// Offer only this cipher suite (repeatable), e.g. TLS13_AES_128_GCM_SHA256.
    #[arg(long = "tls-cipher", value_name = "SUITE")]
    tls_ciphers: Vec<String>,
    /// Offer only this TLS version: 1.2 or 1.3 (default: both).
    #[arg(long, value_name = "VERSION")]
    tls_version: Option<String>,
    /// Internal: this is child I of K started by --procs.
    #[arg(long, hide = true)]
    #[serde(skip)]
    child: Option<String>,
}

#[derive(Args, Serialize, Clone)]
struct PingpongArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    #[arg(long, default_value = "100")]
    connections: u64,
    /// Payload bytes per message (64, 1KiB, ...).
    #[arg(long, default_value = "64")]
    size: Size,
    /// Binary messages (default: text).
    #[arg(long)]
    binary: bool,
    #[arg(long, default_value = "10s")]
    duration: HDuration,
    /// Run this long before measuring.
    #[arg(long, default_value = "0s")]
    warmup: HDuration,
}

#[derive(Args, Serialize, Clone)]
struct RateArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    #[arg(long, default_value = "100")]
    connections: u64,
    /// Aggregate messages per second over all connections.
    #[arg(long)]
    rate: f64,
    #[arg(long, default_value = "64")]
    size: Size,
    #[arg(long)]
    binary: bool,
    #[arg(long, default_value = "10s")]
    duration: HDuration,
    #[arg(long, default_value = "0s")]
    warmup: HDuration,
}

#[derive(Args, Serialize, Clone)]
struct HandshakeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    /// Connections to make in total.
    #[arg(long, default_value = "1000")]
    total: u64,
    /// Connections in progress at once.
    #[arg(long, default_value = "50")]
    concurrency: u64,
    #[arg(long, default_value = "64")]
    size: Size,
    #[arg(long)]
    binary: bool,
}

#[derive(Args, Serialize, Clone)]
struct IdleArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    #[arg(long, default_value = "1000")]
    connections: u64,
    /// How long to hold every connection idle before checking it again.
    #[arg(long, default_value = "30s")]
    hold: HDuration,
    #[arg(long, default_value = "64")]
    size: Size,
    #[arg(long)]
    binary: bool,
}

#[derive(Args, Serialize, Clone)]
struct BulkArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    #[arg(long, default_value = "4")]
    connections: u64,
    #[arg(long, default_value = "1MiB")]
    size: Size,
    #[arg(long, default_value = "10s")]
    duration: HDuration,
    #[arg(long, default_value = "0s")]
    warmup: HDuration,
}

#[derive(Args, Serialize, Clone)]
struct HttpArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: Common,
    #[arg(long, default_value = "50")]
    connections: u64,
    /// Measure this long (after --warmup).
    #[arg(long, default_value = "10s")]
    duration: HDuration,
    /// Run this long before measuring.
    #[arg(long, default_value = "0s")]
    warmup: HDuration,
    /// Make exactly this many requests in total instead of running for --duration.
    #[arg(long, conflicts_with_all = ["duration", "warmup"])]
    requests: Option<u64>,
    /// Extra request header, `Name: value` (repeatable), e.g. 'Accept-Encoding: gzip'.
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    headers: Vec<String>,
    /// Count responses with any other status as `http_status` errors (0: accept any).
    #[arg(long, default_value = "200")]
    expect_status: u16,
    /// Count bodies of any other length (after chunked decoding) as `body_length` errors.
    #[arg(long)]
    expect_length: Option<Size>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Echo(a) => run_echo(a),
        Cmd::Pingpong(a) => {
            let plan = Plan {
                mode: Mode::PingPong,
                connections: a.connections,
                size: a.size.0,
                text: !a.binary,
                duration: a.duration.0,
                warmup: a.warmup.0,
                rate: 0.0,
                total: 0,
                concurrency: 0,
                hold: Duration::ZERO,
                http: None,
            };
            run_load(plan, &a.common, serde_json::to_value(&a))
        }
        Cmd::Rate(a) => {
            let plan = Plan {
                mode: Mode::Rate,
                connections: a.connections,
                size: a.size.0,
                text: !a.binary,
                duration: a.duration.0,
                warmup: a.warmup.0,
                rate: a.rate,
                total: 0,
                concurrency: 0,
                hold: Duration::ZERO,
                http: None,
            };
            run_load(plan, &a.common, serde_json::to_value(&a))
        }
        Cmd::Handshake(a) => {
            let plan = Plan {
                mode: Mode::Handshake,
                connections: 0,
                size: a.size.0,
                text: !a.binary,
                duration: Duration::ZERO,
                warmup: Duration::ZERO,
                rate: 0.0,
                total: a.total,
                concurrency: a.concurrency,
                hold: Duration::ZERO,
                http: None,
            };
            run_load(plan, &a.common, serde_json::to_value(&a))
        }
        Cmd::Idle(a) => {
            let plan = Plan {
                mode: Mode::Idle,
                connections: a.connections,
                size: a.size.0,
                text: !a.binary,
                duration: Duration::ZERO,
                warmup: Duration::ZERO,
                rate: 0.0,
                total: 0,
                concurrency: 0,
                hold: a.hold.0,
                http: None,
            };
            run_load(plan, &a.common, serde_json::to_value(&a))
        }
        Cmd::Bulk(a) => {
            let plan = Plan {
                mode: Mode::Bulk,
                connections: a.connections,
                size: a.size.0,
                text: false,
                duration: a.duration.0,
                warmup: a.warmup.0,
                rate: 0.0,
                total: 0,
                concurrency: 0,
                hold: Duration::ZERO,
                http: None,
            };
            run_load(plan, &a.common, serde_json::to_value(&a))
        }
        Cmd::Http(a) => {
            let plan = Plan {
                mode: Mode::Http,
                connections: a.connections,
                size: 0,
                text: false,
                duration: a.duration.0,
                warmup: a.warmup.0,
                rate: 0.0,
                total: 0,
                concurrency: 0,
                hold: Duration::ZERO,
                http: Some(HttpPlan {
                    headers: a.headers.clone(),
                    requests: a.requests,
                    expect_status: (a.expect_status != 0).then_some(a.expect_status),
                    expect_length: a.expect_length.map(|s| s.0),
                }),
            };
            run_load(plan, &a.common, serde_json::to_value(&a))
        }
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringlb-load: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A whole run's parameters, before splitting over processes.
struct Plan {
    mode: Mode,
    connections: u64,
    size: u64,
    text: bool,
    duration: Duration,
    warmup: Duration,
    rate: f64,
    total: u64,
    concurrency: u64,
    hold: Duration,
    http: Option<HttpPlan>,
}

/// The `http` mode's own parameters.
struct HttpPlan {
    headers: Vec<String>,
    requests: Option<u64>,
    expect_status: Option<u16>,
    expect_length: Option<u64>,
}

fn share(n: u64, parts: u64, i: u64) -> (u64, u64) {
    let base = n / parts;
    let extra = n % parts;
    let count = base + u64::from(i < extra);
    let offset = i * base + i.min(extra);
    (count, offset)
}

fn run_load(
    plan: Plan,
    c: &Common,
    params: serde_json::Result<serde_json::Value>,
) -> anyhow::Result<ExitCode> {
    let mut params = params?;
    let mode = plan.mode;
    if c.threads == 0 || c.procs == 0 {
        anyhow::bail!("--threads and --procs must be at least 1");
    }
    if mode == Mode::Rate && !(plan.rate > 0.0 && plan.rate.is_finite()) {
        anyhow::bail!("--rate must be a positive number");
    }
    if plan.size > usize::MAX as u64 / 2 {
        anyhow::bail!("--size too large");
    }
    let target = if mode == Mode::Http {
        http::parse_url(&c.url)?
    } else {
        client::parse_url(&c.url)?
    };
    let tls_wanted = c.tls || target.tls;
    if !tls_wanted
        && (c.ca.is_some()
            || c.insecure
            || c.sni.is_some()
            || !c.tls_ciphers.is_empty()
            || c.tls_version.is_some())
    {
        anyhow::bail!(
            "--ca, --insecure, --sni, --tls-cipher and --tls-version need --tls (or a wss:// URL)"
        );
    }
    if tls_wanted && mode == Mode::Http {
        anyhow::bail!("the http mode does not speak TLS; --tls works with the WebSocket modes");
    }
    let tls = if tls_wanted {
        let opts = tls::TlsOptions {
            ca: c.ca.clone(),
            insecure: c.insecure,
            sni: c.sni.clone(),
            resume: !c.no_tls_resume,
            ciphers: c.tls_ciphers.clone(),
            version: c.tls_version.clone(),
        };
        Some(tls::TlsClient::new(&opts, target.host_name())?)
    } else {
        None
    };
    params["tls"] = serde_json::json!(tls_wanted);
    params["tls_resume"] = serde_json::json!(tls_wanted && !c.no_tls_resume);
    if tls_wanted {
        params["tls_provider"] = serde_json::json!(tls::PROVIDER);
    }
    if let Some(h) = &plan.http {
        if h.requests == Some(0) {
            anyhow::bail!("--requests must be at least 1");
        }
        if plan.connections == 0 {
            anyhow::bail!("--connections must be at least 1");
        }
    }
    // Built (and the headers checked) before any child process starts.
    let request = match &plan.http {
        Some(h) => http::build_request(&target, &h.headers)?,
        None => Vec::new(),
    };
    let (index, procs) = match &c.child {
        Some(s) => {
            let (i, k) = s
                .split_once('/')
                .ok_or_else(|| anyhow::anyhow!("bad --child"))?;
            (i.parse::<u64>()?, k.parse::<u64>()?)
        }
        None => (0, c.procs as u64),
    };
    let (soft, hard) = limits::raise_nofile();
    // Sockets per process: connections, or concurrent handshakes.
    let (what, total_socks) = if mode == Mode::Handshake {
        ("concurrent handshakes", plan.concurrency)
    } else {
        ("connections", plan.connections)
    };
    let per_proc = total_socks.div_ceil(procs);
    limits::check_fit(what, per_proc, procs as usize, total_socks, soft, hard)
        .map_err(anyhow::Error::msg)?;
    let source_ips = if mode == Mode::Handshake {
        Vec::new()
    } else {
        limits::source_ips(target.addr.ip(), plan.connections, c.source_ips)
            .map_err(anyhow::Error::msg)?
    };

    let started = Instant::now();
    let show_progress = c.child.is_none() && (c.progress || std::io::stderr().is_terminal());
    let results = if c.child.is_none() && procs > 1 {
        let done = Arc::new(AtomicBool::new(false));
        let pb = show_progress.then(|| spawn_progress(None, done.clone()));
        let r = run_children(procs);
        done.store(true, Relaxed);
        if let Some(h) = pb {
            let _ = h.join();
        }
        r?
    } else {
        let (conns, conn_offset) = share(plan.connections, procs, index);
        let (total, hs_offset) = share(plan.total, procs, index);
        let (conc, _) = share(plan.concurrency, procs, index);
        let cfg = RunConfig {
            mode,
            target,
            connections: conns as usize,
            total_connections: plan.connections as usize,
            conn_offset: if mode == Mode::Handshake {
                hs_offset
            } else {
                conn_offset
            } as usize,
            size: plan.size as usize,
            text: plan.text,
            duration: plan.duration,
            warmup: plan.warmup,
            rate: plan.rate,
            total,
            concurrency: conc.max(u64::from(total > 0)) as usize,
            hold: plan.hold,
            threads: c.threads,
            timeout: c.timeout.0,
            source_ips,
            connect_concurrency: c.connect_concurrency,
            http: plan.http.as_ref().map(|h| HttpConfig {
                request: request.clone(),
                request_close: http::request_asks_close(&h.headers),
                expect_status: h.expect_status,
                expect_length: h.expect_length,
                requests: h.requests.map(|r| share(r, procs, index).0),
            }),
            tls: tls.clone(),
        };
        let progress = Arc::new(Progress::default());
        let done = Arc::new(AtomicBool::new(false));
        let pb = show_progress.then(|| spawn_progress(Some(progress.clone()), done.clone()));
        let r = run::run(Arc::new(cfg), progress);
        done.store(true, Relaxed);
        if let Some(h) = pb {
            let _ = h.join();
        }
        r
    };
    let _ = started;
    let cpu = cpu_times();
    if c.child.is_some() {
        // A child reports raw histograms on stdout for the parent to merge.
        let v = results.to_json(mode.name(), params, cpu, true);
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    let json = results.to_json(mode.name(), params, cpu, false);
    let table = results.table(mode.name(), cpu);
    match c.json.as_deref() {
        Some("-") => {
            eprint!("{table}");
            println!("{json}");
        }
        Some(path) => {
            std::fs::write(path, format!("{json}\n"))?;
            print!("{table}");
        }
        None => print!("{table}"),
    }
    if let Some(path) = &c.hist {
        std::fs::write(path, results.hist_csv())?;
    }
    if results.error_total() > 0 && !c.allow_errors {
        eprintln!(
            "ringlb-load: {} error(s); exiting with status 1 (use --allow-errors to ignore)",
            results.error_total()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Re-runs this command in `procs` children with the same arguments, each
/// taking its share, and merges their results.
fn run_children(procs: u64) -> anyhow::Result<Results> {
    let exe = std::env::current_exe()?;
    let mut base: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    // Drop the options the parent handles itself; children get their own.
    while let Some(a) = args.next() {
        let key = a.split('=').next().unwrap_or("");
        match key {
            "--procs" | "--json" | "--hist" | "--child" => {
                if !a.contains('=') {
                    args.next();
                }
            }
            "--progress" | "--allow-errors" => {}
            _ => base.push(a),
        }
    }
    let mut children = Vec::new();
    for i in 0..procs {
        let child = Command::new(&exe)
            .args(&base)
            .arg("--procs")
            .arg(procs.to_string())
            .arg("--child")
            .arg(format!("{i}/{procs}"))
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()?;
        children.push(child);
    }
    let mut total = Results::default();
    let mut failures = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text
            .lines()
            .last()
            .map(serde_json::from_str::<serde_json::Value>)
        {
            Some(Ok(v)) if out.status.success() => total.merge(&Results::from_json(&v)?),
            _ => failures.push(format!("child {i} failed ({})", out.status)),
        }
    }
    if !failures.is_empty() {
        anyhow::bail!("{}", failures.join("; "));
    }
    Ok(total)
}

fn spawn_progress(p: Option<Arc<Progress>>, done: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        // indicatif draws nothing when stderr is not a terminal, so --progress
        // there falls back to one plain line per second (e.g. for CI logs).
        let tty = std::io::stderr().is_terminal();
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        let tick = Duration::from_millis(if tty { 250 } else { 1000 });
        let start = Instant::now();
        let mut last = (Instant::now(), 0u64);
        // Bounded by the run: `done` is set when the run returns.
        while !done.load(Relaxed) {
            std::thread::sleep(tick);
            let msg = match &p {
                Some(p) => {
                    let m = p.messages.load(Relaxed);
                    let now = Instant::now();
                    let rate =
                        (m - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
                    last = (now, m);
                    format!(
                        "{:>6.1}s  open {}  handshakes {}  msgs {}  ({:.0}/s)  errors {}",
                        start.elapsed().as_secs_f64(),
                        p.open.load(Relaxed),
                        p.handshakes.load(Relaxed),
                        m,
                        rate,
                        p.errors.load(Relaxed)
                    )
                }
                None => format!(
                    "{:>6.1}s  running in child processes",
                    start.elapsed().as_secs_f64()
                ),
            };
            if tty {
                pb.set_message(msg);
                pb.tick();
            } else {
                eprintln!("{msg}");
            }
        }
        pb.finish_and_clear();
    })
}

fn run_echo(a: EchoArgs) -> anyhow::Result<ExitCode> {
    if a.threads == 0 || a.procs == 0 {
        anyhow::bail!("--threads and --procs must be at least 1");
    }
    limits::raise_nofile();
    let opts = echo::EchoOptions {
        threads: a.threads,
        reuseport: a.reuseport || a.procs > 1,
        ..Default::default()
    };
    let server = echo::spawn_with(&a.listen, &opts)?;
    let mut children = Vec::new();
    if a.procs > 1 {
        let exe = std::env::current_exe()?;
        for _ in 1..a.procs {
            let mut cmd = Command::new(&exe);
            cmd.arg("echo")
                .arg("--reuseport")
                .arg("--threads")
                .arg(a.threads.to_string());
            for addr in server.local_addrs() {
                cmd.arg("--listen").arg(addr.to_string());
            }
            if let Some(r) = a.report_every {
                cmd.arg("--report-every").arg(r.to_string());
            }
            let mut child = cmd.stdout(Stdio::piped()).stdin(Stdio::null()).spawn()?;
            // Wait until the child is accepting before announcing the addresses.
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow::anyhow!("no child stdout"))?;
            let mut lines = BufReader::new(stdout).lines();
            for _ in server.local_addrs() {
                match lines.next() {
                    Some(Ok(l)) if l.starts_with("listening ") => {}
                    _ => anyhow::bail!("echo child {} did not start", child.id()),
                }
            }
            children.push(child);
        }
    }
    {
        let mut out = std::io::stdout().lock();
        for addr in server.local_addrs() {
            writeln!(out, "listening {addr}")?;
        }
        out.flush()?;
    }
    let stats = server.stats().clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let period = a.report_every.map(|d| d.0).unwrap_or(Duration::from_secs(3600)).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        let mut last = stats.messages.load(Relaxed);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    if a.report_every.is_some() {
                        let m = stats.messages.load(Relaxed);
                        eprintln!(
                            "echo pid {}: open {} accepted {} echoed {} ({:.0} msg/s) handshake_failures {} protocol_errors {}",
                            std::process::id(),
                            stats.open.load(Relaxed),
                            stats.accepted.load(Relaxed),
                            m,
                            (m - last) as f64 / period.as_secs_f64(),
                            stats.handshake_failures.load(Relaxed),
                            stats.protocol_errors.load(Relaxed),
                        );
                        last = m;
                    }
                }
            }
        }
        Ok::<_, std::io::Error>(())
    })?;
    for mut c in children {
        // Children are ours; stop each by its PID.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = c.wait();
    }
    server.shutdown();
    Ok(ExitCode::SUCCESS)
}
