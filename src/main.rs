//! The `ringlb` command line.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ringlb::config::Config;
use ringlb::handoff::{self, Launch};
use ringlb::server::Server;

#[derive(Parser)]
#[command(
    name = "ringlb",
    version,
    about = "WebSocket load balancer on io_uring"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground, logging to stderr.
    Run {
        /// TOML configuration file.
        #[arg(long, short, conflicts_with_all = ["listen", "upstream"])]
        config: Option<PathBuf>,
        /// Quick mode: address to listen on (repeatable).
        #[arg(long, requires = "upstream")]
        listen: Vec<SocketAddr>,
        /// Quick mode: backend address (repeatable); one least-connections group on "/".
        #[arg(long)]
        upstream: Vec<SocketAddr>,
        /// Quick mode: number of shards (default: one per CPU).
        #[arg(long)]
        shards: Option<NonZeroUsize>,
    },
    /// Validate a configuration file and exit (like `nginx -t`).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Upgrade a running daemon to the binary now at the path it was
    /// started from: every live WebSocket session moves to the new process.
    /// Waits for the outcome and prints it; exits non-zero if it failed.
    Upgrade {
        /// The daemon's process id.
        #[arg(
            long,
            required_unless_present = "pid_file",
            conflicts_with = "pid_file"
        )]
        pid: Option<u32>,
        /// A file holding it (`[server] pid_file`).
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// How long to wait for the outcome.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Start two WebSocket echo backends and ringlb in front of them, with a
    /// page to open in a browser and the admin dashboard.
    Demo {
        /// Where the demo page and its WebSocket endpoint (/ws) listen.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The admin listener (dashboard, /status, /metrics); port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:0")]
        admin: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `RUST_LOG` wins over the configured level.
fn init_log(level: &str) {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_target(false)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Check { config } => {
            let cfg = Config::load(&config)?;
            let names = cfg.names().len();
            println!(
                "{}: ok ({} listen addresses, {} routes, {} upstreams, {} backends{})",
                config.display(),
                cfg.server.listen.len(),
                cfg.routes.len(),
                cfg.upstreams.len(),
                cfg.upstreams.iter().map(|u| u.servers.len()).sum::<usize>(),
                match names {
                    0 => String::new(),
                    n => format!(", {n} names resolved at run time (not by check)"),
                }
            );
            for c in cfg.tls.iter().flat_map(|t| t.certificates.iter()) {
                println!("{}", ringlb::tls::describe(c));
            }
            Ok(())
        }
        Cmd::Run {
            config,
            listen,
            upstream,
            shards,
        } => {
            // Captured before anything can replace the file: an upgrade
            // starts whatever is at this path then.
            let launch = Launch::capture();
            // Started by a running ringlb to take over from it?
            let handoff = handoff::inherited_socket()
                .context("the hand-off socket from the previous process")?;
            let loaded = match &config {
                Some(path) => Config::load(path).map_err(anyhow::Error::from),
                None if !listen.is_empty() => Ok(Config::quick(listen, upstream, shards)),
                None => Err(anyhow::anyhow!(
                    "give --config FILE, or --listen ADDR with --upstream ADDR"
                )),
            };
            let cfg = match loaded {
                Ok(c) => c,
                Err(e) => {
                    if let Some(sock) = &handoff {
                        handoff::new::refuse(sock, &format!("{e:#}"));
                    }
                    return Err(e);
                }
            };
            init_log(&cfg.log.level);
            // Handlers first: a signal that arrives while the shards start
            // must not kill the process with the default action, and once
            // "listening on" is logged the process is fully set up.
            use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
            let signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR2])
                .context("installing signal handlers")?;
            let pid_file = cfg.server.pid_file.clone();
            let server = match handoff {
                None => {
                    let server = Server::start(cfg)?;
                    if let Some(p) = &pid_file {
                        handoff::write_pid_file(p);
                    }
                    handoff::sd_notify(&format!("READY=1\nMAINPID={}", std::process::id()));
                    server
                }
                Some(sock) => {
                    let (incoming, inherited, marks) = match handoff::new::Incoming::hello(sock) {
                        Ok(x) => x,
                        Err(e) => return Err(e.context("taking over from the previous process")),
                    };
                    let server = match Server::start_inherited(cfg, inherited) {
                        Ok(s) => s,
                        Err(e) => {
                            incoming.refuse(&format!("{e:#}"));
                            return Err(e);
                        }
                    };
                    incoming.ready(&server, marks)?;
                    log::info!("taking over from the previous process");
                    server
                }
            };
            supervise(server, signals, config.as_deref(), launch)
        }
        Cmd::Upgrade {
            pid,
            pid_file,
            timeout,
        } => upgrade_command(pid, pid_file, timeout),
        Cmd::Demo { listen, admin } => {
            init_log("warn");
            ringlb::demo::run(listen, admin)
        }
    }
}

/// The main thread's life after start: SIGHUP reloads, the first
/// SIGTERM/SIGINT drains, the drain deadline or a second signal ends it.
/// A shard that dies ends it at once with an error (a non-zero exit).
fn supervise(
    mut server: Server,
    mut signals: signal_hook::iterator::Signals,
    config: Option<&std::path::Path>,
    mut launch: Launch,
) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGUSR2};
    let mut drain_started: Option<Instant> = None;
    let mut closing = false;
    let mut kick_until: Option<Instant> = None;
    let mut trim = ringlb::server::HeapTrim::new();
    loop {
        if let Some(t) = kick_until {
            server.accept_pending();
            if Instant::now() >= t {
                kick_until = None;
            }
        }
        if let Some(dead) = server.dead_shard() {
            log::error!("shard {} died: {}", dead.id, dead.why);
            log::error!(
                "stopping the other shards without draining: the process is broken (the dead \
                 shard's sessions are gone and stay counted against max_connections); exiting \
                 non-zero so a supervisor (systemd Restart=on-failure, docker --restart) starts \
                 a fresh one"
            );
            if !server.abort(Duration::from_secs(2)) {
                log::error!("some shards did not stop within 2s; exiting anyway");
            }
            anyhow::bail!("shard {} died: {}", dead.id, dead.why);
        }
        for sig in signals.pending() {
            match sig {
                SIGHUP => match config {
                    Some(path) => match server.reload(path) {
                        Ok(()) => log::info!("reloaded {}", path.display()),
                        Err(e) => {
                            log::error!("reload rejected, the running configuration stays: {e:#}")
                        }
                    },
                    None => log::warn!("SIGHUP ignored: no config file (quick mode)"),
                },
                SIGUSR2 if drain_started.is_some() => {
                    log::warn!("SIGUSR2 ignored: draining");
                    handoff::old::Report::connect().line("error: the daemon is draining");
                }
                SIGUSR2 if server.control.taking_over.load(Ordering::Relaxed) => {
                    log::warn!("SIGUSR2 ignored: still taking over from the previous process");
                    handoff::old::Report::connect().line(
                        "error: this process is still taking over from the previous one; try again when it has",
                    );
                }
                SIGUSR2 => {
                    let mut report = handoff::old::Report::connect();
                    log::info!("SIGUSR2: upgrading to {}", launch.exe.display());
                    match handoff::old::upgrade(&server, &mut launch, &mut report) {
                        handoff::old::Outcome::Done {
                            sessions,
                            pid,
                            took,
                            staying,
                        } => {
                            let mut line = format!(
                                "handed {sessions} sessions to pid {pid} in {} ms",
                                took.as_millis()
                            );
                            if staying > 0 {
                                // Sessions whose TLS state could not be
                                // taken: this process keeps them, draining (no
                                // accepts; drain_timeout and
                                // drain_close_rate apply), and exits when
                                // the last one ends.
                                line += &format!(
                                    "; {staying} TLS sessions stay in pid {} until they end",
                                    std::process::id()
                                );
                                log::info!("upgrade: {line}; draining them");
                                server.control.upgrades[0].fetch_add(1, Ordering::Relaxed);
                                report.line(&format!("ok: {line}"));
                                server.drain();
                                drain_started = Some(Instant::now());
                                continue;
                            }
                            log::info!("upgrade: {line}; exiting");
                            server.control.upgrades[0].fetch_add(1, Ordering::Relaxed);
                            report.line(&format!("ok: {line}"));
                            // Admin requests accepted before the pause get
                            // their answer (bounded).
                            let t = Instant::now();
                            while server.control.admin_busy.load(Ordering::Relaxed) > 0
                                && t.elapsed() < Duration::from_secs(2)
                            {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            server.stop();
                            return Ok(());
                        }
                        handoff::old::Outcome::Refused(why) => {
                            log::error!("upgrade refused, this process keeps serving: {why}");
                            server.control.upgrades[1].fetch_add(1, Ordering::Relaxed);
                            report.line(&format!("error: upgrade refused: {why}"));
                        }
                        handoff::old::Outcome::RolledBack(why) => {
                            // The dead process's accepts may have taken
                            // wake-ups meant for ours (see AcceptPending).
                            kick_until = Some(Instant::now() + Duration::from_secs(2));
                            log::error!("upgrade rolled back: {why}");
                            server.control.upgrades[2].fetch_add(1, Ordering::Relaxed);
                            report.line(&format!("error: upgrade rolled back: {why}"));
                        }
                    }
                }
                _ if drain_started.is_none() => {
                    log::info!(
                        "draining: listeners closed, {} sessions continue until they end{}",
                        server.active_connections(),
                        match server.control.snapshot().config.server.drain_timeout {
                            Some(t) => format!(" or for {t:?}"),
                            None => String::new(),
                        }
                    );
                    server.drain();
                    drain_started = Some(Instant::now());
                }
                _ => {
                    log::info!("second signal: stopping now");
                    server.stop();
                    return Ok(());
                }
            }
        }
        if let Some(t0) = drain_started {
            if server.finished() {
                log::info!("drained; exiting");
                server.join();
                return Ok(());
            }
            let deadline = server.control.snapshot().config.server.drain_timeout;
            if !closing && deadline.is_some_and(|d| t0.elapsed() >= d) {
                log::info!(
                    "drain_timeout reached: closing {} sessions",
                    server.active_connections()
                );
                server.close_all();
                closing = true;
            }
        }
        server.poll_discovery();
        trim.tick(&server);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ringlb upgrade`: listen where the daemon reports (an abstract unix
/// socket named after its pid), send SIGUSR2, print what it says.
fn upgrade_command(
    pid: Option<u32>,
    pid_file: Option<PathBuf>,
    timeout: Duration,
) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    use std::os::linux::net::SocketAddrExt;
    let pid = match (pid, pid_file) {
        (Some(p), _) => p,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{}: not a process id", f.display()))?,
        (None, None) => anyhow::bail!("give --pid PID or --pid-file FILE"),
    };
    let name = handoff::report_name(pid);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).with_context(|| {
        format!("listening for the outcome on @{name} (another upgrade of {pid} under way?)")
    })?;
    listener.set_nonblocking(true)?;
    handoff::signal(pid, libc::SIGUSR2).with_context(|| format!("sending SIGUSR2 to {pid}"))?;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    anyhow::bail!("pid {pid} did not answer within {timeout:?} (is it ringlb?)");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ))?;
    // Progress lines, then the outcome: "ok: …" or "error: …", which may
    // go on over several lines (a config error quotes the file).
    let mut outcome: Option<String> = None;
    for line in BufReader::new(stream).lines() {
        let line = line.with_context(|| format!("waiting for pid {pid}"))?;
        match &mut outcome {
            Some(o) => {
                o.push('\n');
                o.push_str(&line);
            }
            None if line.starts_with("ok: ") || line.starts_with("error: ") => outcome = Some(line),
            None => eprintln!("{line}"),
        }
    }
    let last = outcome.unwrap_or_default();
    match last.strip_prefix("error: ") {
        Some(why) => anyhow::bail!("{why}"),
        None if last.starts_with("ok: ") => {
            println!("{}", &last["ok: ".len()..]);
            Ok(())
        }
        None => anyhow::bail!("pid {pid} closed the report without an outcome (did it die?)"),
    }
}
