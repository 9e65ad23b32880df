//! Starting and stopping the shards.
//!
//! The main thread binds every listen address once per shard with
//! SO_REUSEPORT (the first bind resolves port 0, the others reuse the port
//! it got), then starts one thread per shard. Each shard builds its ring on
//! its own thread and reports back before `start` returns, so a ring that
//! cannot be created is a startup error, not a silent dead shard.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use socket2::{Domain, Socket, Type};

use crate::config::Config;
use crate::ring;
use crate::shard::{Command, Shard, ShardInit, ShardStats, Shared};
use crate::snapshot::Snapshot;

struct ShardHandle {
    commands: mpsc::Sender<Command>,
    wake: OwnedFd,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    stats: Arc<ShardStats>,
}

pub struct Server {
    shards: Vec<ShardHandle>,
    /// The addresses actually bound (port 0 resolved).
    pub local_addrs: Vec<SocketAddr>,
    pub snapshot: Arc<Snapshot>,
    pub shared: Arc<Shared>,
}

impl Server {
    pub fn start(config: Config) -> anyhow::Result<Server> {
        let probe = ring::probe().map_err(anyhow::Error::msg)?;
        log::debug!("{probe}");
        let snapshot = Snapshot::new(config);
        let server_cfg = &snapshot.config.server;
        let shards = server_cfg.shards.get();

        let mut per_shard: Vec<Vec<TcpListener>> = (0..shards).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::new();
        for addr in &server_cfg.listen {
            let mut bound = *addr;
            for listeners in per_shard.iter_mut() {
                let l = bind(bound, server_cfg.backlog)
                    .with_context(|| format!("cannot listen on {addr}"))?;
                bound = l.local_addr()?;
                listeners.push(l);
            }
            local_addrs.push(bound);
        }

        let shared = Arc::new(Shared::default());
        let mut handles = Vec::new();
        for (id, listeners) in per_shard.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let wake = ring::eventfd().context("eventfd")?;
            let stats = Arc::new(ShardStats::default());
            let init = ShardInit {
                id,
                listeners,
                snap: snapshot.clone(),
                shared: shared.clone(),
                stats: stats.clone(),
                wake: wake.try_clone()?,
                commands: rx,
            };
            let (ready_tx, ready_rx) = mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("ringlb-shard-{id}"))
                .spawn(move || {
                    let shard = match Shard::new(init) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return Ok(());
                        }
                    };
                    let _ = ready_tx.send(Ok(format!("{:?}", shard.mode())));
                    let res = shard.run();
                    if let Err(e) = &res {
                        log::error!("shard {id} stopped: {e}");
                    }
                    res
                })?;
            match ready_rx.recv() {
                Ok(Ok(mode)) => log::debug!("shard {id} ready (io_uring mode {mode})"),
                Ok(Err(e)) => bail!("shard {id} could not start its io_uring: {e}"),
                Err(_) => bail!("shard {id} died while starting"),
            }
            handles.push(ShardHandle {
                commands: tx,
                wake,
                thread: Some(thread),
                stats,
            });
        }
        for a in &local_addrs {
            log::info!("listening on {a} ({shards} shards)");
        }
        Ok(Server {
            shards: handles,
            local_addrs,
            snapshot,
            shared,
        })
    }

    /// Client connections currently open, all shards.
    pub fn active_connections(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.stats.active.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Bytes relayed (to backends, to clients), all shards.
    pub fn bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.shards.iter().fold((0, 0), |(b, c), s| {
            (
                b + s.stats.bytes_to_backend.load(Relaxed),
                c + s.stats.bytes_to_client.load(Relaxed),
            )
        })
    }

    /// Stops every shard and waits for its thread.
    pub fn stop(mut self) {
        for s in &self.shards {
            let _ = s.commands.send(Command::Stop);
            ring::eventfd_signal(&s.wake);
        }
        for s in &mut self.shards {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn bind(addr: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock.into())
}
