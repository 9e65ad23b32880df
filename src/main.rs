//! The `ringlb` command line.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Start two WebSocket echo backends and ringlb in front of them.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Check { config } => {
            let cfg = Config::load(&config)?;
            println!(
                "{}: ok ({} listen addresses, {} routes, {} upstreams, {} backends)",
                config.display(),
                cfg.server.listen.len(),
                cfg.routes.len(),
                cfg.upstreams.len(),
                cfg.upstreams.iter().map(|u| u.servers.len()).sum::<usize>()
            );
            Ok(())
        }
        Cmd::Run {
            config,
            listen,
            upstream,
            shards,
        } => {
            let cfg = match config {
                Some(path) => Config::load(&path)?,
                None if !listen.is_empty() => Config::quick(listen, upstream, shards),
                None => anyhow::bail!("give --config FILE, or --listen ADDR with --upstream ADDR"),
            };
            let server = Server::start(cfg)?;
            wait_for_signal()?;
            log::info!("stopping");
            server.stop();
            Ok(())
        }
        Cmd::Demo { listen } => ringlb::demo::run(listen),
    }
}

fn wait_for_signal() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;
    if let Some(sig) = signals.forever().next() {
        log::info!("received signal {sig}");
    }
    Ok(())
}
