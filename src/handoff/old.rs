//! The old process's side of a hand-off (the protocol is in `wire.rs`,
//! the design in the module above). Runs on the main thread, which has
//! nothing else to do meanwhile: signals wait until it is over.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::wire::{self, Mark, Msg, Totals, BATCH};
use super::{Exported, Launch, Moved, HANDOFF_ENV};
use crate::server::Server;
use crate::upstream::now_ms;

/// Batches in flight (sent, not yet acknowledged) at most.
const WINDOW: usize = 8;

/// How an upgrade ended.
#[derive(Debug)]
pub enum Outcome {
    /// Everything was handed over; this process should exit.
    Done {
        sessions: u64,
        pid: u32,
        took: Duration,
        /// Sessions that could not move (TLS): this process keeps them,
        /// draining, until they end.
        staying: u64,
    },
    /// The new process refused before taking anything; nothing changed.
    Refused(String),
    /// It failed mid-transfer; un-acknowledged sessions stayed here.
    RolledBack(String),
}

/// Progress lines for `ringlb upgrade`, if it is waiting (an abstract
/// unix socket it listens on), and for the log.
pub struct Report(Option<UnixStream>);

impl Report {
    pub fn connect() -> Report {
        use std::os::linux::net::SocketAddrExt;
        let name = super::report_name(std::process::id());
        let sock = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| UnixStream::connect_addr(&a))
            .ok();
        if let Some(s) = &sock {
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        }
        Report(sock)
    }

    pub fn line(&mut self, text: &str) {
        if let Some(s) = &mut self.0 {
            if writeln!(s, "{text}").is_err() {
                self.0 = None;
            }
        }
    }
}

/// Runs one upgrade: start the new binary and hand it everything, or
/// roll back.
pub fn upgrade(server: &Server, launch: &mut Launch, report: &mut Report) -> Outcome {
    let timeout = server.control.snapshot().config.server.upgrade_timeout;
    let (ours, theirs) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return Outcome::Refused(format!("socketpair: {e}")),
    };
    if let Err(e) = SockRef::from(&theirs).set_cloexec(false) {
        return Outcome::Refused(format!("hand-off socket: {e}"));
    }
    let mut cmd = Command::new(&launch.exe);
    cmd.args(&launch.args)
        .env(HANDOFF_ENV, theirs.as_raw_fd().to_string())
        .stdin(Stdio::null());
    // Test builds: a fault given to the first new process (one that dies
    // mid-transfer) must not follow into the retry.
    #[cfg(debug_assertions)]
    if launch.attempts > 0 {
        cmd.env_remove("RINGLB_TEST_FAULT");
    }
    launch.attempts += 1;
    let spawned = cmd.spawn();
    drop(theirs);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Outcome::Refused(format!("cannot start {}: {e}", launch.exe.display())),
    };
    let pid = child.id();
    log::info!("upgrade: started {} as pid {pid}", launch.exe.display());
    report.line(&format!("started {} as pid {pid}", launch.exe.display()));
    let _ = ours.set_read_timeout(Some(timeout));
    let _ = ours.set_write_timeout(Some(timeout));

    // The new process checks its configuration before it gets anything.
    match wire::recv(&ours) {
        Ok((Msg::Hello { .. }, _)) => {}
        Ok((Msg::Refused { reason }, _)) => {
            reap(child);
            return Outcome::Refused(format!("new process {pid} refused: {reason}"));
        }
        Ok((m, _)) => return refuse_kill(child, format!("unexpected {m:?}")),
        Err(e) => return refuse_kill(child, format!("new process {pid}: {e}")),
    }

    // Listeners, and the backends' marks.
    let (listen, admin) = server.listening();
    let mut fds: Vec<RawFd> = Vec::new();
    let mut counts = Vec::new();
    for (addr, socks) in listen {
        counts.push((*addr, socks.len() as u32));
        fds.extend(socks.iter().map(|s| s.as_raw_fd()));
    }
    if let Some((_, s)) = admin {
        fds.push(s.as_raw_fd());
    }
    if fds.len() > crate::ring::SCM_MAX_FD {
        return refuse_kill(
            child,
            "more listening sockets than one message carries".into(),
        );
    }
    let snap = server.control.snapshot();
    let now = now_ms();
    let marks = snap
        .upstreams
        .iter()
        .flat_map(|u| {
            u.backends.iter().map(|b| Mark {
                upstream: u.name.clone(),
                addr: b.addr,
                draining: b.is_draining(),
                down_ms: b.state.down_for(now),
            })
        })
        .collect();
    let msg = Msg::Listeners {
        listen: counts,
        admin: admin.map(|(a, _)| *a),
        marks,
    };
    if let Err(e) = wire::send(&ours, &msg, &fds) {
        return refuse_kill(child, format!("sending the listeners: {e}"));
    }
    match wire::recv(&ours) {
        Ok((Msg::Ready, _)) => {}
        Ok((Msg::Refused { reason }, _)) => {
            reap(child);
            return Outcome::Refused(format!("new process {pid} refused: {reason}"));
        }
        Ok((m, _)) => return refuse_kill(child, format!("unexpected {m:?}")),
        Err(e) => return refuse_kill(child, format!("new process {pid}: {e}")),
    }
    log::info!("upgrade: pid {pid} accepts; handing over sessions");
    report.line(&format!("pid {pid} accepts; handing over sessions"));

    // From here on it owns what it acknowledges.
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel();
    server.begin_handoff(&tx);
    drop(tx);
    let shards = server.shard_count();
    let mut empty = vec![false; shards];
    let mut staying = vec![0usize; shards];
    let mut handed = 0u64;
    let mut batches = 0u64;
    // Batches sent and not yet acknowledged, oldest first (acks come in
    // order): up to WINDOW in flight, so the transfer does not wait a
    // round trip (and the new process's scheduling) per batch.
    let mut unacked: VecDeque<Vec<(usize, Moved)>> = VecDeque::new();
    loop {
        let mut batch: Vec<(usize, Moved)> = Vec::new();
        // Wait for sessions only when nothing is in flight and a shard
        // still holds some; else just look.
        let first = if unacked.is_empty() && !empty.iter().all(|e| *e) {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(x) => Some(x),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            rx.try_recv().ok()
        };
        let mut take = |x: Exported, batch: &mut Vec<(usize, Moved)>| match x {
            Exported::Session { shard, moved } => {
                empty[shard] = false;
                batch.push((shard, *moved));
            }
            Exported::Empty { shard, staying: n } => {
                empty[shard] = true;
                staying[shard] = n;
            }
        };
        if let Some(x) = first {
            take(x, &mut batch);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(x) => take(x, &mut batch),
                    Err(_) => break,
                }
            }
        }
        if !batch.is_empty() {
            let records: Vec<Vec<u8>> = batch.iter().map(|(_, m)| m.rec.encode()).collect();
            let fds: Vec<RawFd> = batch
                .iter()
                .flat_map(|(_, m)| [m.client.as_raw_fd(), m.backend.as_raw_fd()])
                .collect();
            let mut msg = Msg::Sessions { records };
            let sent = wire::send(&ours, &msg, &fds);
            if let Msg::Sessions { records } = &mut msg {
                records.iter_mut().for_each(|r| wire::wipe(r));
            }
            unacked.push_back(batch);
            if let Err(e) = sent {
                let why = format!("sending sessions to pid {pid}: {e}");
                return rollback(server, rx, unacked, why, handed, child);
            }
            if unacked.len() < WINDOW {
                continue;
            }
        }
        if let Some(oldest) = unacked.pop_front() {
            let n = oldest.len() as u32;
            unacked.push_front(oldest);
            match wire::recv(&ours) {
                Ok((Msg::Ack { n: got }, _)) if got == n => {}
                Ok((m, _)) => {
                    let why = format!("pid {pid} answered {m:?}");
                    return rollback(server, rx, unacked, why, handed, child);
                }
                Err(e) => {
                    let why = format!("pid {pid} did not acknowledge a batch: {e}");
                    return rollback(server, rx, unacked, why, handed, child);
                }
            }
            // Acknowledged: the new process owns them; our copies close here.
            drop(unacked.pop_front());
            handed += u64::from(n);
            batches += 1;
            continue;
        }
        if empty.iter().all(|e| *e) {
            break;
        }
        // A dead new process is noticed between batches too.
        if let Ok(Some(st)) = child.try_wait() {
            let why = format!("new process {pid} exited ({st})");
            return rollback(server, rx, unacked, why, handed, child);
        }
    }
    let took = t0.elapsed();

    // Counters (ours plus what we inherited) and backend totals.
    let mut counters = server.control.inherited.counters();
    for s in &server.control.shards {
        for (c, v) in counters.iter_mut().zip(s.counters()) {
            *c += v;
        }
    }
    let totals = snap
        .upstreams
        .iter()
        .flat_map(|u| {
            u.backends.iter().map(|b| Totals {
                upstream: u.name.clone(),
                addr: b.addr,
                connections: b.state.connections_total.load(Ordering::Relaxed),
                connect_failures: b.state.connect_failures.load(Ordering::Relaxed),
                closed: b
                    .state
                    .closed
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect(),
            })
        })
        .collect();
    let done = Msg::Done {
        sessions: handed,
        counters,
        totals,
    };
    let confirmed = wire::send(&ours, &done, &[]).and_then(|()| wire::recv(&ours));
    match confirmed {
        Ok((Msg::Current, _)) => {}
        other => {
            // Everything is the new process's already; if it is alive it is
            // current, whatever it failed to say.
            if !matches!(child.try_wait(), Ok(None)) {
                server.resume();
                return Outcome::RolledBack(format!(
                    "new process {pid} died after taking every session ({handed}): {other:?}; \
                     accepting here again"
                ));
            }
            log::warn!("upgrade: pid {pid} did not confirm it is current: {other:?}");
        }
    }
    log::info!("upgrade: {batches} batches");
    // It outlives us: never wait for it.
    std::mem::forget(child);
    Outcome::Done {
        sessions: handed,
        pid,
        took,
        staying: staying.iter().sum::<usize>() as u64,
    }
}

/// Fails before anything moved: the new process is killed (it may be
/// stuck, and must not go on accepting on our sockets).
fn refuse_kill(mut child: Child, why: String) -> Outcome {
    kill(&mut child);
    reap(child);
    Outcome::Refused(why)
}

fn kill(child: &mut Child) {
    let _ = child.kill();
}

/// Waits for a finished (or killed) child off the main thread.
fn reap(mut child: Child) {
    let _ = std::thread::Builder::new()
        .name("ringlb-reap".into())
        .spawn(move || {
            let _ = child.wait();
        });
}

/// The new process is gone (or killed): accept again, and take back every
/// session not acknowledged, the batch in flight and whatever the shards
/// exported since.
fn rollback(
    server: &Server,
    rx: mpsc::Receiver<Exported>,
    unacked: VecDeque<Vec<(usize, Moved)>>,
    why: String,
    handed: u64,
    mut child: Child,
) -> Outcome {
    // Killed first: a process that stopped answering must not relay what
    // it may have received after we gave up on it. Waited for, so its
    // accepts are gone before ours are back (the caller also looks at the
    // accept queues for a while: its ring is torn down after its exit).
    kill(&mut child);
    let _ = child.wait();
    server.resume();
    let mut back: Vec<(usize, Moved)> = unacked.into_iter().flatten().collect();
    // Every shard drops its sender when it handles `Resume`; until then
    // it may still export. Bounded: a shard that does not answer within
    // this is broken, and the supervisor will see it dead.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Exported::Session { shard, moved }) => back.push((shard, *moved)),
            Ok(Exported::Empty { .. }) => {}
            Err(_) => break,
        }
    }
    let kept = back.len();
    let shards = server.shard_count();
    let mut per_shard: Vec<Vec<Moved>> = (0..shards).map(|_| Vec::new()).collect();
    for (shard, m) in back {
        per_shard[shard % shards].push(m);
    }
    for (i, sessions) in per_shard.into_iter().enumerate() {
        if !sessions.is_empty() {
            server.import(i, sessions);
        }
    }
    Outcome::RolledBack(format!(
        "{why}; {kept} sessions not acknowledged stay here and relay on ({handed} acknowledged \
         ones were the new process's)"
    ))
}
