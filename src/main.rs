//! The `ringlb` command line.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ringlb::config::Config;
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
            let cfg = match &config {
                Some(path) => Config::load(path)?,
                None if !listen.is_empty() => Config::quick(listen, upstream, shards),
                None => anyhow::bail!("give --config FILE, or --listen ADDR with --upstream ADDR"),
            };
            init_log(&cfg.log.level);
            // Handlers first: a signal that arrives while the shards start
            // must not kill the process with the default action, and once
            // "listening on" is logged the process is fully set up.
            use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
            let signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
                .context("installing signal handlers")?;
            let server = Server::start(cfg)?;
            supervise(server, signals, config.as_deref())
        }
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
) -> anyhow::Result<()> {
    use signal_hook::consts::SIGHUP;
    let mut drain_started: Option<Instant> = None;
    let mut closing = false;
    loop {
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
        std::thread::sleep(Duration::from_millis(50));
    }
}
