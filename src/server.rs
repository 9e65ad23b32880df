//! Starting, reloading, draining and stopping the shards.
//!
//! The main thread binds every listen address once per shard with
//! SO_REUSEPORT (the first bind resolves port 0, the others reuse the port
//! it got), then starts one thread per shard. Each shard builds its ring on
//! its own thread and reports back before `start` returns, so a ring that
//! cannot be created is a startup error, not a silent dead shard.
//!
//! A shard thread that ends on its own (a panic, a ring error) is a broken
//! process, not a smaller one: its clients stay counted against
//! `max_connections` and its listeners are gone. [`Server::dead_shard`] finds
//! it; the caller stops the rest and exits non-zero so a supervisor restarts
//! the daemon.
//!
//! Reload builds a new snapshot in which backends that stay keep their
//! counters and health, sends it to every shard and opens or closes
//! listeners whose addresses changed. Live sessions are never touched.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context};
use socket2::{Domain, Socket, Type};

use crate::config::{AccessLog, Config, Scheduling};
use crate::resolver::Discovery;
use crate::ring;
use crate::shard::{Command, Shard, ShardInit, Shared};
use crate::snapshot::Snapshot;
use crate::stats::ShardStats;

struct ShardHandle {
    commands: mpsc::Sender<Command>,
    wake: OwnedFd,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

/// What the admin thread and the main thread share.
#[derive(Debug)]
pub struct Control {
    pub snapshot: Mutex<Arc<Snapshot>>,
    pub shards: Vec<Arc<ShardStats>>,
    pub started: Instant,
    pub loaded_at: Mutex<SystemTime>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub shared: Arc<Shared>,
    /// This process, for /status (an upgrade changes it).
    pub pid: u32,
    pub started_at: SystemTime,
    /// Sessions this process took over from the previous one on an upgrade.
    pub inherited_sessions: AtomicU64,
    /// Counters of the processes before this one (a binary upgrade hands
    /// them over), added to every sum so metrics never reset. Its gauges
    /// stay 0.
    pub inherited: ShardStats,
    /// The admin thread stops accepting while a hand-off runs (the new
    /// process accepts on the same socket).
    pub admin_paused: AtomicBool,
    /// Upgrades this process started, by outcome: ok, refused (the new
    /// process refused before taking anything), rolled_back.
    pub upgrades: [AtomicU64; 3],
    /// Admin connections being served; an old process waits (briefly) for
    /// them before it exits after a hand-off.
    pub admin_busy: Arc<std::sync::atomic::AtomicUsize>,
    /// Still taking sessions over from the previous process: an upgrade of
    /// this one waits until that is done.
    pub taking_over: AtomicBool,
    /// What the resolver thread knows about each backend name.
    pub dns: Arc<crate::resolver::DnsState>,
    /// Stopping (a SIGTERM drain, or closing everything): `GET /readyz`
    /// answers 503 so health checks take this instance out while its
    /// sessions finish.
    pub stopping: AtomicBool,
}

impl Control {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct Server {
    shards: Vec<ShardHandle>,
    /// The addresses actually bound (port 0 resolved): `server.listen`,
    /// then `tls.listen`, in order.
    pub local_addrs: Vec<SocketAddr>,
    /// The bound `[tls]` listener addresses (also in `local_addrs`).
    pub tls_addrs: Vec<SocketAddr>,
    pub control: Arc<Control>,
    /// The admin listener's address, if configured.
    pub admin_addr: Option<SocketAddr>,
    /// Shards were told to exit (drain, close, stop); a shard that ends
    /// cleanly after this did what it was asked.
    exit_requested: bool,
    /// Our own copies of every listening socket (by configured address,
    /// in `listen` order) and of the admin one: what a binary upgrade
    /// hands to the new process.
    listen_socks: Vec<(SocketAddr, Vec<TcpListener>)>,
    admin_sock: Option<(SocketAddr, TcpListener)>,
    /// The resolver thread, once the configuration has names.
    discovery: Option<Discovery>,
}

/// A configured listen address and its sockets (one per shard, or what
/// was inherited).
pub type ListenSocks = (SocketAddr, Vec<TcpListener>);

/// Listening sockets received from the previous process on an upgrade,
/// by configured address: used instead of binding (and the address check
/// skipped: the previous process is the listener it would find).
#[derive(Debug, Default)]
pub struct Inherited {
    pub listen: Vec<(SocketAddr, Vec<TcpListener>)>,
    pub admin: Option<(SocketAddr, TcpListener)>,
}

/// Gives sessions to shards from the thread that receives them.
pub struct Importer(Vec<(mpsc::Sender<Command>, OwnedFd)>);

impl Importer {
    pub fn shards(&self) -> usize {
        self.0.len()
    }

    pub fn import(&self, shard: usize, sessions: Vec<crate::handoff::Moved>) {
        let (tx, wake) = &self.0[shard % self.0.len()];
        let _ = tx.send(Command::Import(sessions));
        ring::eventfd_signal(wake);
    }

    /// Every shard accepts what waits in its queues ([`Command::AcceptPending`]).
    pub fn accept_pending(&self) {
        for (tx, wake) in &self.0 {
            let _ = tx.send(Command::AcceptPending);
            ring::eventfd_signal(wake);
        }
    }
}

/// A shard thread that ended when it should not have.
#[derive(Debug)]
pub struct DeadShard {
    pub id: usize,
    /// The panic message, the ring's error, or that its loop just ended.
    pub why: String,
}

impl Server {
    pub fn start(config: Config) -> anyhow::Result<Server> {
        Server::start_inherited(config, Inherited::default())
    }

    /// Starts with listening sockets from the previous process where the
    /// configuration still has their address; binds the rest.
    pub fn start_inherited(config: Config, mut inherited: Inherited) -> anyhow::Result<Server> {
        let probe = ring::probe().map_err(anyhow::Error::msg)?;
        log::debug!("{probe}");
        let snapshot = Snapshot::new(config);
        let server_cfg = &snapshot.config.server;
        let shards = server_cfg.shards.get();

        let mut per_shard: Vec<Vec<TcpListener>> = (0..shards).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::new();
        let mut tls_addrs = Vec::new();
        let mut listen_socks = Vec::new();
        let all = all_listen(&snapshot.config);
        let mut taken: Vec<Option<Vec<TcpListener>>> = Vec::new();
        for (addr, _) in &all {
            let pos = inherited.listen.iter().position(|(a, _)| a == addr);
            match pos {
                Some(pos) => taken.push(Some(inherited.listen.swap_remove(pos).1)),
                None => {
                    ensure_unused(*addr, &[])?;
                    taken.push(None);
                }
            }
        }
        for (gone, _) in &inherited.listen {
            log::info!("{gone}: no longer in the configuration; not listening there");
        }
        // An inherited socket serves whichever side (plaintext or TLS) the
        // new configuration gives its address.
        for ((addr, tls), inherited) in all.iter().zip(taken) {
            let (bound, socks) = match inherited {
                Some(socks) if !socks.is_empty() => spread(socks, shards, server_cfg.backlog)?,
                _ => bind_all(*addr, shards, server_cfg.backlog)?,
            };
            let mut copies = Vec::with_capacity(socks.len());
            for (i, l) in socks.into_iter().enumerate() {
                copies.push(l.try_clone()?);
                per_shard[i % shards].push(l);
            }
            listen_socks.push((*addr, copies));
            local_addrs.push(bound);
            if *tls {
                tls_addrs.push(bound);
            }
        }

        let shared = Arc::new(Shared::default());
        let mut handles = Vec::new();
        let mut batch_refused = 0;
        let mut stats_all = Vec::new();
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
                access_log: open_access_log(&snapshot.config.log.access)?,
                tls_addrs: tls_addrs.clone(),
            };
            let (ready_tx, ready_rx) = mpsc::channel();
            let scheduling = snapshot.config.server.scheduling;
            let thread = std::thread::Builder::new()
                .name(format!("ringlb-shard-{id}"))
                .spawn(move || {
                    // Not fatal: a seccomp profile may refuse it, and the
                    // shard works the same, at more CPU per event.
                    let refused = match scheduling {
                        // tests/ops.rs: what a seccomp profile that
                        // refuses the call looks like.
                        #[cfg(debug_assertions)]
                        Scheduling::Batch if test_fault("sched-batch-refused") => {
                            Some(std::io::Error::from_raw_os_error(libc::EPERM))
                        }
                        Scheduling::Batch => ring::set_batch_scheduling().err(),
                        Scheduling::Normal => None,
                    };
                    let shard = match Shard::new(init) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return Ok(());
                        }
                    };
                    let _ = ready_tx.send(Ok((format!("{:?}", shard.mode()), refused)));
                    let res = shard.run();
                    if let Err(e) = &res {
                        log::error!("shard {id} stopped: {e}");
                    }
                    res
                })?;
            match ready_rx.recv() {
                Ok(Ok((mode, refused))) => {
                    log::debug!("shard {id} ready (io_uring mode {mode})");
                    if let Some(e) = refused {
                        log::warn!("shard {id}: SCHED_BATCH refused ({e}); it runs under the kernel's default policy");
                        batch_refused += 1;
                    }
                }
                Ok(Err(e)) => bail!("shard {id} could not start its io_uring: {e}"),
                Err(_) => bail!("shard {id} died while starting"),
            }
            handles.push(ShardHandle {
                commands: tx,
                wake,
                thread: Some(thread),
            });
            stats_all.push(stats);
        }
        let control = Arc::new(Control {
            snapshot: Mutex::new(snapshot.clone()),
            shards: stats_all,
            started: Instant::now(),
            loaded_at: Mutex::new(SystemTime::now()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            shared,
            pid: std::process::id(),
            started_at: SystemTime::now(),
            inherited_sessions: AtomicU64::new(0),
            inherited: ShardStats::default(),
            admin_paused: AtomicBool::new(false),
            upgrades: Default::default(),
            admin_busy: Arc::default(),
            taking_over: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            dns: Arc::default(),
        });
        let mut admin_sock = None;
        let admin_addr = match &snapshot.config.admin {
            Some(a) => {
                let listener = match inherited.admin.take() {
                    Some((was, l)) if was == a.listen => l,
                    _ => TcpListener::bind(a.listen)
                        .with_context(|| format!("admin listener on {}", a.listen))?,
                };
                admin_sock = Some((a.listen, listener.try_clone()?));
                Some(
                    crate::admin::spawn(listener, control.clone())
                        .with_context(|| format!("admin listener on {}", a.listen))?,
                )
            }
            None => None,
        };
        for a in &local_addrs {
            let tls = if tls_addrs.contains(a) { ", TLS" } else { "" };
            log::info!("listening on {a} ({shards} shards{tls})");
        }
        match batch_refused {
            0 => log::info!(
                "shard scheduling: {}",
                snapshot.config.server.scheduling.name()
            ),
            n => log::warn!(
                "shard scheduling: batch refused on {n} of {shards} shards, which run under the kernel's default policy"
            ),
        }
        for c in snapshot
            .config
            .tls
            .iter()
            .flat_map(|t| t.certificates.iter())
        {
            log::info!("{}", crate::tls::describe(c));
        }
        if let Some(a) = admin_addr {
            log::info!("admin listening on {a}");
        }
        let mut server = Server {
            shards: handles,
            local_addrs,
            tls_addrs,
            control,
            admin_addr,
            exit_requested: false,
            listen_socks,
            admin_sock,
            discovery: None,
        };
        server.watch_names(&snapshot.config)?;
        Ok(server)
    }

    /// Starts the resolver thread for the configuration's names, or tells
    /// it the names after a reload (new ones are asked at once).
    fn watch_names(&mut self, config: &Config) -> anyhow::Result<()> {
        let names = config.names();
        match &self.discovery {
            Some(d) => d.watch(names, config.resolver.clone()),
            None if names.is_empty() => {}
            None => {
                log::info!(
                    "dns: resolving {} backend names on the resolver thread ({})",
                    names.len(),
                    match &config.resolver.nameservers {
                        Some(ns) => format!(
                            "nameservers {}",
                            ns.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        None => "nameservers of /etc/resolv.conf".into(),
                    }
                );
                self.discovery = Some(
                    Discovery::spawn(names, config.resolver.clone(), self.control.dns.clone())
                        .context("starting the resolver thread")?,
                );
            }
        }
        Ok(())
    }

    /// Called by the main thread on every tick: if DNS changed an address
    /// set, the running configuration gets a new snapshot with it, sent to
    /// every shard like a reload. Never blocks.
    pub fn poll_discovery(&mut self) {
        let Some(found) = self.discovery.as_ref().and_then(Discovery::try_recv) else {
            return;
        };
        let old = self.control.snapshot();
        if *old.discovered == *found {
            return;
        }
        let snap = Snapshot::rediscovered(&old, found);
        for s in &self.shards {
            let _ = s.commands.send(Command::Reload(snap.clone()));
            ring::eventfd_signal(&s.wake);
        }
        self.publish(&old, snap);
    }

    /// The one place a new snapshot becomes the running one (after the
    /// shards were sent it), whether from a reload or from DNS.
    fn publish(&self, old: &Snapshot, snap: Arc<Snapshot>) {
        *self
            .control
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = snap.clone();
        for change in backend_changes(old, &snap) {
            self.backends_changed(&change);
        }
        // Added backends start a rebalance of their upstream (if it has one).
        crate::pacing::backends_changed(old, &snap);
    }

    /// An upstream's backend set changed (a reload or a DNS answer): logged
    /// here; [`Server::publish`] then starts a rebalance onto added
    /// backends (`pacing::backends_changed`).
    fn backends_changed(&self, c: &BackendChange) {
        let list = |v: &[SocketAddr]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        log::info!(
            "upstream {}: backends added [{}], removed [{}] (removed ones take no new sessions; live ones keep relaying)",
            c.upstream,
            list(&c.added),
            list(&c.removed)
        );
    }

    /// Our copies of the listening sockets (by configured address) and of
    /// the admin socket, for a hand-off.
    pub fn listening(&self) -> (&[ListenSocks], Option<&(SocketAddr, TcpListener)>) {
        (&self.listen_socks, self.admin_sock.as_ref())
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Starts a hand-off: shards stop accepting (the sockets stay open)
    /// and send their relaying sessions down `tx`; the admin thread stops
    /// accepting too.
    pub fn begin_handoff(&self, tx: &mpsc::Sender<crate::handoff::Exported>) {
        self.control.admin_paused.store(true, Ordering::Relaxed);
        self.send(|| Command::Handoff(tx.clone()));
    }

    /// Gives sessions to shard `shard` (`% shards`).
    pub fn import(&self, shard: usize, sessions: Vec<crate::handoff::Moved>) {
        let s = &self.shards[shard % self.shards.len()];
        let _ = s.commands.send(Command::Import(sessions));
        ring::eventfd_signal(&s.wake);
    }

    /// A handle that gives sessions to shards from another thread.
    pub fn importer(&self) -> Importer {
        Importer(
            self.shards
                .iter()
                .map(|s| {
                    let wake = s.wake.try_clone().expect("dup of a shard's eventfd");
                    (s.commands.clone(), wake)
                })
                .collect(),
        )
    }

    /// Every shard accepts what waits in its queues now
    /// ([`Command::AcceptPending`]).
    pub fn accept_pending(&self) {
        self.send(|| Command::AcceptPending);
    }

    /// A hand-off failed: accept again, keep what is left.
    pub fn resume(&self) {
        self.send(|| Command::Resume);
        self.control.admin_paused.store(false, Ordering::Relaxed);
    }

    fn send(&self, make: impl Fn() -> Command) {
        for s in &self.shards {
            let _ = s.commands.send(make());
            ring::eventfd_signal(&s.wake);
        }
    }

    /// Each shard's counters; they outlive the server (the shutdown test
    /// reads `ops_in_flight` after `stop`).
    pub fn shard_stats(&self) -> Vec<Arc<ShardStats>> {
        self.control.shards.clone()
    }

    /// Connections accepted plus sessions parked so far, all shards: the
    /// two events after which memory was set up or let go.
    fn accepted_and_parked(&self) -> u64 {
        self.control
            .shards
            .iter()
            .map(|s| s.accepted.get() + s.parked.get())
            .sum()
    }

    /// Client connections currently open, all shards.
    pub fn active_connections(&self) -> u64 {
        self.control.shards.iter().map(|s| s.active.get()).sum()
    }

    /// Re-reads the config file and swaps it in on every shard. On error the
    /// running configuration stays and the error is returned (and counted).
    pub fn reload(&mut self, path: &Path) -> anyhow::Result<()> {
        let res = self.try_reload(path);
        match &res {
            Ok(()) => self.control.reloads_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.control.reloads_failed.fetch_add(1, Ordering::Relaxed),
        };
        res
    }

    fn try_reload(&mut self, path: &Path) -> anyhow::Result<()> {
        let config = Config::load(path)?;
        let old = self.control.snapshot();
        restart_only_unchanged(path, &old.config, &config)?;
        // Every reload reopens the access log, at its new path if it moved:
        // that is also how logrotate gets a fresh file (postrotate: kill -HUP).
        // Opened before anything is swapped, so a failure changes nothing.
        let mut logs = Vec::with_capacity(self.shards.len());
        for _ in &self.shards {
            logs.push(open_access_log(&config.log.access)?);
        }

        // Listeners: bind new addresses before anything is swapped, so a
        // bind failure leaves everything as it was.
        let shards = self.shards.len();
        let mut local = Vec::new();
        let mut tls_local = Vec::new();
        let mut per_shard: Vec<Vec<TcpListener>> = (0..shards).map(|_| Vec::new()).collect();
        let mut new_socks = Vec::new();
        // An address keeps its listener only if it stays on the same side
        // (plaintext or TLS); moving sides rebinds it.
        let was = all_listen(&old.config);
        let now = all_listen(&config);
        for a in &now {
            if !was.contains(a) && !was.iter().any(|(w, _)| w == &a.0) {
                ensure_unused(a.0, &self.local_addrs)?;
            }
        }
        for (addr, tls) in &now {
            let bound = match was.iter().position(|w| w == &(*addr, *tls)) {
                Some(pos) => self.local_addrs[pos],
                None => {
                    let (bound, socks) = bind_all(*addr, shards, config.server.backlog)?;
                    let mut copies = Vec::with_capacity(socks.len());
                    for (i, l) in socks.into_iter().enumerate() {
                        copies.push(l.try_clone()?);
                        per_shard[i].push(l);
                    }
                    new_socks.push((*addr, copies));
                    bound
                }
            };
            local.push(bound);
            if *tls {
                tls_local.push(bound);
            }
        }
        let removed: Vec<SocketAddr> = self
            .local_addrs
            .iter()
            .filter(|a| !local.contains(a))
            .copied()
            .collect();

        for c in config.tls.iter().flat_map(|t| t.certificates.iter()) {
            log::info!("reload: {}", crate::tls::describe(c));
        }
        self.watch_names(&config)?;
        let snap = Snapshot::reload(config, Some(&old));
        for ((s, socks), log) in self.shards.iter().zip(per_shard).zip(logs) {
            let _ = s.commands.send(Command::Reload(snap.clone()));
            let _ = s.commands.send(Command::AccessLog(AccessLogWriter(log)));
            let _ = s.commands.send(Command::TlsListeners(tls_local.clone()));
            if !socks.is_empty() {
                let _ = s.commands.send(Command::AddListeners(socks));
            }
            if !removed.is_empty() {
                let _ = s.commands.send(Command::RemoveListeners(removed.clone()));
            }
            ring::eventfd_signal(&s.wake);
        }
        for a in &local {
            if !self.local_addrs.contains(a) {
                let tls = if tls_local.contains(a) { ", TLS" } else { "" };
                log::info!("listening on {a} ({shards} shards{tls})");
            }
        }
        for a in &removed {
            log::info!("no longer listening on {a}");
        }
        self.local_addrs = local;
        self.tls_addrs = tls_local;
        // Copies kept for a hand-off: those of addresses still listened on,
        // on the same side, and those just bound.
        self.listen_socks
            .retain(|(a, _)| was.iter().any(|w| w.0 == *a && now.contains(w)));
        self.listen_socks.extend(new_socks);
        self.publish(&old, snap);
        *self
            .control
            .loaded_at
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = SystemTime::now();
        Ok(())
    }

    /// Stops accepting; shards exit as their last session ends.
    pub fn drain(&mut self) {
        self.exit_requested = true;
        self.control.stopping.store(true, Ordering::Relaxed);
        // Our copies would keep the sockets listening (connections queued,
        // never accepted) after the shards close theirs.
        self.listen_socks.clear();
        self.send(|| Command::Drain);
    }

    /// Ends every session now and lets the shards exit.
    pub fn close_all(&mut self) {
        self.exit_requested = true;
        self.control.stopping.store(true, Ordering::Relaxed);
        self.listen_socks.clear();
        self.send(|| Command::CloseAll);
    }

    /// Joins the shard threads that have ended and returns the first that
    /// died: one that panicked or whose ring failed, or one that ended
    /// before it was asked to. Cheap enough to call on every supervisor tick.
    pub fn dead_shard(&mut self) -> Option<DeadShard> {
        for (id, s) in self.shards.iter_mut().enumerate() {
            let Some(t) = s.thread.take_if(|t| t.is_finished()) else {
                continue;
            };
            if let Some(why) = exit_failure(t.join(), self.exit_requested) {
                return Some(DeadShard { id, why });
            }
        }
        None
    }

    /// Stops every shard without draining, after one died: waits at most
    /// `limit` for them, since a broken process must not hang on its way
    /// out. True if every shard thread ended in time.
    pub fn abort(mut self, limit: std::time::Duration) -> bool {
        self.exit_requested = true;
        self.send(|| Command::Stop);
        let deadline = Instant::now() + limit;
        while !self.finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.join();
        true
    }

    /// True when every shard thread has exited.
    pub fn finished(&self) -> bool {
        self.shards
            .iter()
            .all(|s| s.thread.as_ref().is_none_or(|t| t.is_finished()))
    }

    /// Stops every shard at once and waits for its thread.
    pub fn stop(mut self) {
        self.exit_requested = true;
        self.send(|| Command::Stop);
        self.join();
    }

    pub fn join(&mut self) {
        for s in &mut self.shards {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// How one upstream's backends differ between two snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChange {
    pub upstream: String,
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

/// Per upstream (by name) present in `new`, the backends that joined and
/// left; upstreams whose set did not change are left out.
pub fn backend_changes(old: &Snapshot, new: &Snapshot) -> Vec<BackendChange> {
    new.upstreams
        .iter()
        .filter_map(|u| {
            let before: Vec<SocketAddr> = old
                .upstreams
                .iter()
                .find(|o| o.name == u.name)
                .map(|o| o.backends.iter().map(|b| b.addr).collect())
                .unwrap_or_default();
            let after: Vec<SocketAddr> = u.backends.iter().map(|b| b.addr).collect();
            let c = BackendChange {
                upstream: u.name.clone(),
                added: after
                    .iter()
                    .filter(|a| !before.contains(a))
                    .copied()
                    .collect(),
                removed: before
                    .iter()
                    .filter(|a| !after.contains(a))
                    .copied()
                    .collect(),
            };
            (!c.added.is_empty() || !c.removed.is_empty()).then_some(c)
        })
        .collect()
}

/// Shard count, buffer rings and the admin socket are fixed for the life of
/// the process. A file that changes one of them is refused as a whole:
/// running its other settings on top of the old values would run a
/// combination that was never validated (max_buffers_per_direction is
/// checked against buffers_per_shard, for one).
/// Every listen address, plaintext then TLS, with whether it is TLS.
fn all_listen(c: &Config) -> Vec<(SocketAddr, bool)> {
    let tls = c.tls.iter().flat_map(|t| t.listen.iter());
    (c.server.listen.iter().map(|a| (*a, false)))
        .chain(tls.map(|a| (*a, true)))
        .collect()
}

fn restart_only_unchanged(path: &Path, old: &Config, new: &Config) -> anyhow::Result<()> {
    let admin = |c: &Config| {
        c.admin
            .as_ref()
            .map_or("none".into(), |a| a.listen.to_string())
    };
    let (was, now) = (&old.server, &new.server);
    let fixed = [
        (
            "server.shards",
            was.shards.to_string(),
            now.shards.to_string(),
        ),
        (
            "server.buffer_size",
            was.buffer_size.to_string(),
            now.buffer_size.to_string(),
        ),
        (
            "server.buffers_per_shard",
            was.buffers_per_shard.to_string(),
            now.buffers_per_shard.to_string(),
        ),
        (
            "server.scheduling",
            was.scheduling.name().into(),
            now.scheduling.name().into(),
        ),
        ("admin.listen", admin(old), admin(new)),
    ];
    for (key, was, now) in fixed {
        if was != now {
            bail!(
                "{}: {key} changed from {was} to {now}; it changes only on restart (restart ringlb, or put {was} back to reload the rest)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Why a shard thread's end is a failure, if it is: a panic (with its
/// message), an error from its ring, or a clean end nobody asked for.
fn exit_failure(
    res: std::thread::Result<std::io::Result<()>>,
    exit_requested: bool,
) -> Option<String> {
    match res {
        Err(panic) => Some(format!(
            "panicked: {}",
            panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)")
        )),
        Ok(Err(e)) => Some(format!("its io_uring failed: {e}")),
        Ok(Ok(())) if !exit_requested => Some("its loop ended without being asked to".into()),
        Ok(Ok(())) => None,
    }
}

/// Refuses an address that another socket already listens on.
///
/// Our listeners use SO_REUSEPORT, which the kernel grants to any socket of
/// the same user that asks for it too: a second ringlb started by mistake
/// would silently take a share of the first one's new connections. A probe
/// socket *without* SO_REUSEPORT can bind only where nobody listens. It does
/// set SO_REUSEADDR, so the TIME_WAIT connections of an instance that just
/// exited do not block its restart. The probe is dropped before the real
/// binds.
///
/// A process that was killed keeps its listeners for a few tens of
/// milliseconds after it is gone: each has a multishot accept in flight, and
/// the kernel tears the ring down (dropping its file references) in a
/// worker, after the exit. So a clash is retried for up to
/// [`ADDRESS_CLASH_PATIENCE`] before it counts: a supervisor that restarts
/// ringlb at once after a crash gets a daemon, not a second failure.
///
/// Port 0 needs no check: the kernel picks a free port. IPv6 addresses are
/// probed with IPV6_V6ONLY, like the listeners, so `[::]:p` does not clash
/// with `0.0.0.0:p`.
///
/// Not atomic: two instances whose probes both run before either listens
/// (a window of microseconds) can both start. Supervisors start one.
///
/// `own` are the addresses this process already listens on (a reload): a
/// clash with one of them cannot be told apart from another process, so it
/// is reported as such.
///
/// The one intended exception is the live hand-off on a binary upgrade: the
/// new process will adopt the listeners it receives over a unix socket
/// instead of binding, so it must skip this check (the old process is the
/// listener the check would find). That path takes fds, not addresses, and
/// does not go through here.
/// How long a listen address may stay taken before `ensure_unused` calls it
/// another process's (see there).
const ADDRESS_CLASH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

fn ensure_unused(addr: SocketAddr, own: &[SocketAddr]) -> anyhow::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = || -> std::io::Result<()> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
        sock.set_reuse_address(true)?;
        if addr.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        sock.bind(&addr.into())
    };
    let deadline = Instant::now() + ADDRESS_CLASH_PATIENCE;
    let mut res = probe();
    let mut logged = false;
    while res
        .as_ref()
        .is_err_and(|e| e.raw_os_error() == Some(libc::EADDRINUSE))
        && Instant::now() < deadline
    {
        if !logged {
            log::info!(
                "{addr} is in use; waiting up to {ADDRESS_CLASH_PATIENCE:?} in case its \
                 listener belongs to a process on its way out"
            );
            logged = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        res = probe();
    }
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            let mine = own.iter().find(|o| {
                o.port() == addr.port()
                    && o.is_ipv4() == addr.is_ipv4()
                    && (o.ip() == addr.ip()
                        || o.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            });
            match mine {
                Some(o) => bail!(
                    "cannot listen on {addr}: it overlaps ringlb's own listener on {o} (same \
                     port), which this check cannot tell apart from another process; restart \
                     ringlb to listen on both"
                ),
                None => bail!(
                    "another process already listens on {addr} (or holds it bound); stop it or \
                     listen elsewhere: ringlb does not share a port with another process through \
                     SO_REUSEPORT"
                ),
            }
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr}")),
    }
}

/// Inherited sockets of one address over `shards` shards: round robin if
/// there are at least as many sockets as shards (a shard may then accept on
/// several), else one each and new ones bound beside them (SO_REUSEPORT,
/// same port) for the shards left.
fn spread(
    socks: Vec<TcpListener>,
    shards: usize,
    backlog: i32,
) -> anyhow::Result<(SocketAddr, Vec<TcpListener>)> {
    let bound = socks[0].local_addr()?;
    let mut out: Vec<TcpListener> = Vec::with_capacity(shards.max(socks.len()));
    out.extend(socks);
    while out.len() < shards {
        out.push(bind(bound, backlog).with_context(|| format!("cannot listen on {bound}"))?);
    }
    for l in &out {
        l.set_nonblocking(true)?;
    }
    Ok((bound, out))
}

fn bind_all(
    addr: SocketAddr,
    shards: usize,
    backlog: i32,
) -> anyhow::Result<(SocketAddr, Vec<TcpListener>)> {
    let mut bound = addr;
    let mut socks = Vec::with_capacity(shards);
    for _ in 0..shards {
        let l = bind(bound, backlog).with_context(|| format!("cannot listen on {addr}"))?;
        bound = l.local_addr()?;
        socks.push(l);
    }
    Ok((bound, socks))
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

/// A shard's access log sink, as sent to it on reload.
pub struct AccessLogWriter(pub Option<Box<dyn Write + Send>>);

impl std::fmt::Debug for AccessLogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "AccessLogWriter(on)"
        } else {
            "AccessLogWriter(off)"
        })
    }
}

/// Test builds only: true when `RINGLB_TEST_FAULT` names `fault`. Lets the
/// integration tests (which run the debug binary) break the daemon the way a
/// bug would; release builds compile every hook out.
#[cfg(debug_assertions)]
pub(crate) fn test_fault(fault: &str) -> bool {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAULT
        .get_or_init(|| std::env::var("RINGLB_TEST_FAULT").ok())
        .as_deref()
        == Some(fault)
}

fn open_access_log(cfg: &AccessLog) -> anyhow::Result<Option<Box<dyn Write + Send>>> {
    Ok(match cfg {
        AccessLog::Off => None,
        AccessLog::Stderr => Some(Box::new(std::io::LineWriter::new(std::io::stderr()))),
        AccessLog::File(path) => {
            // O_APPEND: each shard writes whole lines with one write(2), so
            // lines from different shards never interleave.
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("access log {}", path.display()))?;
            Some(Box::new(std::io::BufWriter::with_capacity(64 * 1024, f)))
        }
    })
}

/// Trims run, and the time they took in µs (`ringlb_heap_trims_total`,
/// `ringlb_heap_trim_seconds_total`): a trim holds each malloc arena's lock
/// while it walks it, so an operator chasing periodic stalls can see it.
pub static HEAP_TRIMS: AtomicU64 = AtomicU64::new(0);
pub static HEAP_TRIM_MICROS: AtomicU64 = AtomicU64::new(0);

/// Returns the heap's free pages to the kernel now and then.
///
/// Why: every session is set up amid short-lived allocations (a TLS
/// handshake leaves ~10 KB of rustls state behind it), and glibc gives back
/// only the top of a heap, never a free page in its middle. Idle sessions
/// then kept the peak of their handshakes resident: 9000 wss:// sessions
/// held 7.5 MB of free heap per shard. `malloc_trim` releases those pages.
/// It walks every free list under the arena locks, so it runs at most once
/// per `server.heap_trim_interval`, and only after connections were
/// accepted or sessions parked (parking drops a TLS session's cipher
/// contexts); a quiet process has nothing new to give back. Measured:
/// `bench/results/2026-12-06-tls-idle-slot`.
pub struct HeapTrim {
    last: std::time::Instant,
    events: u64,
}

impl HeapTrim {
    pub fn new() -> HeapTrim {
        HeapTrim {
            last: std::time::Instant::now(),
            events: 0,
        }
    }

    /// Called on every supervisor tick.
    pub fn tick(&mut self, server: &Server) {
        let every = server.control.snapshot().config.server.heap_trim_interval;
        if every.is_none_or(|e| self.last.elapsed() < e) {
            return;
        }
        self.last = std::time::Instant::now();
        let events = server.accepted_and_parked();
        if events == self.events {
            return;
        }
        self.events = events;
        let t0 = std::time::Instant::now();
        let released = crate::ring::trim_heap();
        let took = t0.elapsed();
        HEAP_TRIMS.fetch_add(1, Ordering::Relaxed);
        HEAP_TRIM_MICROS.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        log::debug!(
            "heap trim: {} in {took:?}",
            if released {
                "pages released"
            } else {
                "nothing to release"
            }
        );
    }
}

impl Default for HeapTrim {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_end_is_a_failure_unless_it_was_asked_for() {
        let panicked =
            std::thread::spawn(|| -> std::io::Result<()> { panic!("slot {} gone", 7) }).join();
        assert_eq!(
            exit_failure(panicked, true).as_deref(),
            Some("panicked: slot 7 gone")
        );
        let static_msg = std::thread::spawn(|| -> std::io::Result<()> { panic!("static") }).join();
        assert_eq!(
            exit_failure(static_msg, false).as_deref(),
            Some("panicked: static")
        );
        let ring = Ok(Err(std::io::Error::from_raw_os_error(libc::EBADF)));
        let why = exit_failure(ring, true).unwrap();
        assert!(
            why.starts_with("its io_uring failed: Bad file descriptor"),
            "{why}"
        );
        assert!(exit_failure(Ok(Ok(())), false).is_some());
        assert!(exit_failure(Ok(Ok(())), true).is_none());
    }
}
