//! The new process's side of a hand-off: say whether the configuration
//! is good, take the listeners, start, then take sessions batch by batch
//! until the old process says `Done`.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use super::wire::{self, Msg};
use super::Moved;
use crate::conn::SessionRecord;
use crate::server::{Importer, Inherited, Server};
use crate::snapshot::Snapshot;

/// How often shards look at their accept queues during a hand-off.
const KICK_EVERY: Duration = Duration::from_millis(20);

/// The hand-off socket, once the configuration is known to be good.
pub struct Incoming {
    sock: UnixStream,
}

/// Tells the old process this one cannot take over, and why.
pub fn refuse(sock: &UnixStream, reason: &str) {
    let _ = wire::send(
        sock,
        &Msg::Refused {
            reason: reason.to_string(),
        },
        &[],
    );
}

impl Incoming {
    /// The configuration loaded and validated: say hello, receive the
    /// listening sockets.
    pub fn hello(sock: UnixStream) -> anyhow::Result<(Incoming, Inherited, Vec<wire::Mark>)> {
        wire::send(
            &sock,
            &Msg::Hello {
                pid: std::process::id(),
            },
            &[],
        )?;
        let (msg, fds) = wire::recv(&sock)?;
        let Msg::Listeners {
            listen,
            admin,
            marks,
        } = msg
        else {
            anyhow::bail!("hand-off: expected the listeners, got {msg:?}");
        };
        let mut fds = fds.into_iter();
        let mut inherited = Inherited::default();
        for (addr, n) in listen {
            let socks = (0..n)
                .map(|_| fds.next().map(std::net::TcpListener::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    anyhow::anyhow!("hand-off: fewer listening sockets than announced")
                })?;
            inherited.listen.push((addr, socks));
        }
        if let Some(a) = admin {
            let s = fds
                .next()
                .ok_or_else(|| anyhow::anyhow!("hand-off: no admin socket"))?;
            inherited.admin = Some((a, std::net::TcpListener::from(s)));
        }
        Ok((Incoming { sock }, inherited, marks))
    }

    pub fn refuse(&self, reason: &str) {
        refuse(&self.sock, reason);
    }

    /// Shards run: apply the marks, say `Ready`, and take sessions on a
    /// thread of their own until the old process is done.
    pub fn ready(self, server: &Server, marks: Vec<wire::Mark>) -> anyhow::Result<()> {
        let snap = server.control.snapshot();
        for m in &marks {
            if let Some(b) = backend(&snap, &m.upstream, m.addr) {
                b.state.draining.store(m.draining, Ordering::Relaxed);
                b.state.set_down_for(m.down_ms);
            }
        }
        server.control.taking_over.store(true, Ordering::Relaxed);
        wire::send(&self.sock, &Msg::Ready, &[])?;
        let importer = server.importer();
        let control = server.control.clone();
        // Until the old process is done, its accepts may still be armed on
        // our listening sockets, and accept wake-ups are exclusive: a
        // connection can wake the old process's accept, which then does not
        // take it, and not ours. So our shards also look at their queues
        // every KICK_EVERY until the hand-off ends, and once after.
        let done = Arc::new(AtomicBool::new(false));
        let (kicker, done2) = (server.importer(), done.clone());
        std::thread::Builder::new()
            .name("ringlb-handoff-kick".into())
            .spawn(move || {
                while !done2.load(Ordering::Relaxed) {
                    std::thread::sleep(KICK_EVERY);
                    kicker.accept_pending();
                }
            })?;
        std::thread::Builder::new()
            .name("ringlb-handoff".into())
            .spawn(move || {
                receive(self.sock, &importer, control);
                done.store(true, Ordering::Relaxed);
                importer.accept_pending();
            })?;
        Ok(())
    }
}

fn backend<'a>(
    snap: &'a Snapshot,
    upstream: &str,
    addr: std::net::SocketAddr,
) -> Option<&'a crate::upstream::Backend> {
    snap.upstreams
        .iter()
        .find(|u| u.name == upstream)?
        .backends
        .iter()
        .find(|b| b.addr == addr)
        .map(|b| &**b)
}

fn receive(sock: UnixStream, importer: &Importer, control: std::sync::Arc<crate::server::Control>) {
    let t0 = Instant::now();
    // The old process started us: while it lives, it is our parent.
    let parent = std::os::unix::process::parent_id();
    let mut got = 0u64;
    let mut batches = 0u64;
    let mut next_shard = 0usize;
    let shards = importer.shards();
    let outcome: anyhow::Result<()> = (|| loop {
        let (msg, fds) = wire::recv(&sock)?;
        match msg {
            Msg::Sessions { records } => {
                if fds.len() != records.len() * 2 {
                    anyhow::bail!(
                        "hand-off: {} sockets for {} sessions",
                        fds.len(),
                        records.len()
                    );
                }
                batches += 1;
                #[cfg(debug_assertions)]
                if batches == 3 && crate::server::test_fault("handoff-new-dies") {
                    // tests/upgrade.rs: die holding an unacknowledged batch.
                    log::error!("RINGLB_TEST_FAULT: the new process dies mid-transfer");
                    let _ = super::signal(std::process::id(), libc::SIGKILL);
                }
                #[cfg(debug_assertions)]
                if batches == 3 && crate::server::test_fault("handoff-new-hangs") {
                    // tests/upgrade.rs: stop answering, holding a batch.
                    log::error!("RINGLB_TEST_FAULT: the new process stops answering");
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                }
                let n = records.len() as u32;
                let mut per_shard: Vec<Vec<Moved>> = (0..shards).map(|_| Vec::new()).collect();
                let mut fds = fds.into_iter();
                for mut r in records {
                    let rec = SessionRecord::decode(&r);
                    wire::wipe(&mut r);
                    let rec = rec?;
                    let (Some(client), Some(backend)) = (fds.next(), fds.next()) else {
                        anyhow::bail!("hand-off: sockets missing");
                    };
                    per_shard[next_shard % shards].push(Moved {
                        client,
                        backend,
                        rec,
                    });
                    next_shard += 1;
                }
                for (i, s) in per_shard.into_iter().enumerate() {
                    if !s.is_empty() {
                        importer.import(i, s);
                    }
                }
                got += u64::from(n);
                control.inherited_sessions.store(got, Ordering::Relaxed);
                wire::send(&sock, &Msg::Ack { n }, &[])?;
            }
            Msg::Done {
                sessions: _,
                counters,
                totals,
            } => {
                control.inherited.add_counters(&counters);
                let snap = control.snapshot();
                for t in totals {
                    if let Some(b) = backend(&snap, &t.upstream, t.addr) {
                        b.state
                            .connections_total
                            .fetch_add(t.connections, Ordering::Relaxed);
                        b.state
                            .connect_failures
                            .fetch_add(t.connect_failures, Ordering::Relaxed);
                        for (c, v) in b.state.closed.iter().zip(&t.closed) {
                            c.fetch_add(*v, Ordering::Relaxed);
                        }
                    }
                }
                become_current(&control);
                wire::send(&sock, &Msg::Current, &[])?;
                log::info!(
                    "took over {got} sessions in {batches} batches ({} ms since ready); this process (pid {}) is current",
                    t0.elapsed().as_millis(),
                    std::process::id()
                );
                return Ok(());
            }
            m => anyhow::bail!("hand-off: unexpected {m:?}"),
        }
    })();
    if let Err(e) = outcome {
        if std::os::unix::process::parent_id() == parent {
            // The old process is alive: it rolls back (and kills us), so
            // we must not go on as if we were current.
            log::error!("hand-off failed: {e:#}; the previous process keeps serving; exiting");
            std::process::exit(1);
        }
        // The old process died: what we acknowledged is ours, and we are
        // the one serving now.
        log::warn!("hand-off ended early, the previous process is gone: {e:#}; keeping the {got} sessions taken");
        become_current(&control);
    }
}

fn become_current(control: &crate::server::Control) {
    control.taking_over.store(false, Ordering::Relaxed);
    if let Some(p) = &control.snapshot().config.server.pid_file {
        super::write_pid_file(p);
    }
    super::sd_notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
}
