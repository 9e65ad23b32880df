//! A shard: one thread, one io_uring, its own SO_REUSEPORT listeners, a slab
//! of connections and a provided-buffer ring. Nothing here is shared with
//! other shards except the read-only snapshot and per-connection atomics
//! (backend lease counts, the global connection count).
//!
//! The shard is policy; [`Driver`] is I/O. The driver owns everything the
//! kernel borrows (ring, buffer pool, listeners, each slot's sockets, files,
//! pipes and in-flight counts) and turns completions into typed events. The
//! shard keeps the loop, the timers, the commands from the main thread and
//! the access log, hands each event to its connection (`dispatch`), and
//! carries out the actions the connection returns by calling driver
//! methods (`do_action`).
//!
//! ```text
//!   completions ─► Driver::reap ─► Routed::{Accept, Wake, Slot{key, events}}
//!                                        │
//!        Shard::dispatch: Event ─► Conn::on_* ─► Vec<Action> ─► Shard::do_action
//!                                                                  │
//!                            Driver::{arm_recv, send, connect, close, ...} ◄┘
//! ```
//!
//! The loop: publish returned buffers, submit, wait for completions or the
//! next timer, dispatch, fire timers. When it ends, for any reason (a
//! `Stop`, a drain that finished, a ring error, a panic), the driver
//! cancels and reaps every op before anything is freed (`Driver::shutdown`).
//!
//! Files: `access_log.rs` (one JSON line per request or session),
//! `sweeps.rs` (timers, idle/stall/unpin sweeps, starved recvs),
//! `pacing.rs` (paced closes: drain at a rate, rebalance, paced shutdown).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};

use crate::conn::{Action, CloseKind, Closer, Conn, Payload, Side, Stage, TimerKind};
use crate::driver::{Driver, Event, Lender, Lent, Op, Routed};
use crate::ring::{self, BufRing};
use crate::snapshot::Snapshot;
use crate::stats::{self, ShardStats};

mod access_log;
mod handoff;
mod pacing;
mod sweeps;

/// Copies bytes `start..start + len` of provided buffer `bid` out of the pool.
fn copy_out(bufs: &BufRing) -> impl FnMut(u16, u32, u32) -> Vec<u8> + '_ {
    move |bid, start, len| bufs.data(bid, (start + len) as usize)[start as usize..].to_vec()
}

/// Messages from the main thread; the shard reads them when its eventfd fires.
#[derive(Debug)]
pub enum Command {
    /// A new configuration: new connections use it; live ones keep theirs.
    Reload(Arc<Snapshot>),
    /// Start accepting on these (new listen addresses after a reload).
    AddListeners(Vec<TcpListener>),
    /// The bound addresses of the `[tls]` listeners (after a reload).
    TlsListeners(Vec<SocketAddr>),
    /// Stop accepting on these addresses.
    RemoveListeners(Vec<SocketAddr>),
    /// Stop accepting; exit once the last session has ended.
    Drain,
    /// Close every session now (FIN both ways), then exit.
    CloseAll,
    /// Exit at once.
    Stop,
    /// Write the access log here from now on (reopened on every reload).
    AccessLog(crate::server::AccessLogWriter),
    /// A binary upgrade took over the listeners: stop accepting (keeping
    /// the sockets), close kept-alive connections between requests, and
    /// send every relaying WebSocket session (now, and any that starts
    /// relaying later) down this channel; say `Empty` once nothing is left.
    Handoff(std::sync::mpsc::Sender<crate::handoff::Exported>),
    /// Sessions to relay from now on: from the previous process, or ours
    /// coming back from a hand-off that failed.
    Import(Vec<crate::handoff::Moved>),
    /// The hand-off failed: accept again and keep what is left.
    Resume,
    /// Accept what waits in the listeners' queues now, with plain
    /// nonblocking accept(2) calls: a connection that arrived while the
    /// previous process still had an (exclusive) accept armed on the same
    /// socket woke that process, not us, and would otherwise wait for the
    /// next connection to wake us.
    AcceptPending,
}

/// State shared by all shards.
#[derive(Debug, Default)]
pub struct Shared {
    /// Client connections across all shards, for `server.max_connections`.
    pub clients: AtomicUsize,
    /// The paced shutdown's budget (`server.drain_close_rate`), a GCRA
    /// cell shared by all shards (`crate::pacing`).
    pub shutdown_tat_us: std::sync::atomic::AtomicU64,
}

/// What the shard keeps per connection; the driver's slot holds it.
struct Session {
    conn: Conn,
    /// When the current request began (later requests of a kept-alive
    /// connection begin with their first byte).
    started: Instant,
    /// Accept to the answer (ours or the backend's); `None` until known.
    handshake: Option<Duration>,
}

// SAFETY: every pointer lent here is to heap memory the connection owns,
// never into `Conn` itself (which moves when the slab grows): a queued
// payload's front is a provided buffer (held until the send's completion:
// `conn` releases a buffer on `on_send`/`on_send_unpinned`), a boxed `Owned`
// whose `Vec` does not move with the box, or the static answer buffer
// (`Serve::buf`), which is not resized or dropped while a send or read on
// it is in flight. A queue's front is popped only by `on_send` or
// `on_send_unpinned`, i.e. after the send's completion, and a read target
// is not touched until `on_file_read`.
#[allow(unsafe_code)]
unsafe impl Lender for Session {
    fn send_source(&self, side: Side) -> Lent {
        match self.conn.front(side).expect("send with an empty queue") {
            Payload::Ring { bid, start, len } => Lent::Ring {
                bid: *bid,
                start: *start,
                len: *len,
            },
            Payload::Owned(o) => Lent::Memory {
                ptr: o.data[o.start..].as_ptr(),
                len: o.data.len() - o.start,
            },
            Payload::File { start, len } => Lent::Memory {
                ptr: self.conn.file_ptr(*start),
                len: *len as usize,
            },
        }
    }

    fn read_target(&mut self, at: usize, len: usize) -> *mut u8 {
        self.conn.read_ptr(at, len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerTarget {
    Conn {
        key: u32,
        gen: u32,
    },
    /// Re-arm a listener's accept after it failed (EMFILE and friends).
    Accept {
        listener: u32,
    },
    /// Park the sessions that were silent since the last sweep.
    IdleSweep,
    /// Close peers that took nothing for `stalled_peer_timeout` while bytes
    /// waited for them.
    StallSweep,
    /// The pool runs low: move stalled directions' buffers out of it.
    Unpin,
    /// Paced closes (drain at a rate, rebalance, paced shutdown).
    Pacing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timer {
    at: Instant,
    target: TimerTarget,
    kind: TimerKind,
}

impl Ord for Timer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.target).cmp(&(other.at, other.target))
    }
}

impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

pub struct Shard {
    // First, so that on drop (a panic) it reaps every op before the other
    // fields go; `run` shuts it down explicitly before returning.
    driver: Driver<Session>,
    id: usize,
    snap: Arc<Snapshot>,
    shared: Arc<Shared>,
    stats: Arc<ShardStats>,
    timers: BinaryHeap<Reverse<Timer>>,
    starved: VecDeque<(usize, u32, Side)>,
    actions: Vec<Action>,
    routed: Vec<Routed>,
    commands: Receiver<Command>,
    stopping: bool,
    draining: bool,
    accept_errors_logged: Option<Instant>,
    socket_errors_logged: Option<Instant>,
    access_log: Option<Box<dyn Write + Send>>,
    log_dirty: bool,
    /// An unpin sweep is scheduled.
    unpin_pending: bool,
    /// Bound addresses of the listeners whose connections speak TLS.
    tls_addrs: Vec<SocketAddr>,
    /// A hand-off is under way: relaying sessions leave through here.
    export: Option<std::sync::mpsc::Sender<crate::handoff::Exported>>,
    /// `Empty` was sent and nothing arrived since.
    reported_empty: bool,
    /// Sessions the pacing sweep may close, oldest first, and when that
    /// list was made (`pacing.rs`).
    pacing_list: Vec<pacing::Candidate>,
    pacing_listed: Option<Instant>,
}

pub struct ShardInit {
    pub id: usize,
    pub listeners: Vec<TcpListener>,
    pub snap: Arc<Snapshot>,
    pub shared: Arc<Shared>,
    pub stats: Arc<ShardStats>,
    pub wake: OwnedFd,
    pub commands: Receiver<Command>,
    pub access_log: Option<Box<dyn Write + Send>>,
    /// Which of `listeners` (by bound address) are `[tls]` listeners.
    pub tls_addrs: Vec<SocketAddr>,
}

impl Shard {
    /// Builds the shard on the calling thread (the ring is single-issuer).
    pub fn new(init: ShardInit) -> std::io::Result<Shard> {
        let server = &init.snap.config.server;
        let mut driver = Driver::new(
            1024,
            server.buffers_per_shard,
            server.buffer_size.get(),
            init.wake,
            init.stats.clone(),
        )?;
        for l in init.listeners {
            configure(&SockRef::from(&l), &init.snap);
            driver.add_listener(l);
        }
        Ok(Shard {
            driver,
            id: init.id,
            snap: init.snap,
            shared: init.shared,
            stats: init.stats,
            timers: BinaryHeap::new(),
            starved: VecDeque::new(),
            actions: Vec::with_capacity(16),
            routed: Vec::with_capacity(256),
            commands: init.commands,
            stopping: false,
            draining: false,
            accept_errors_logged: None,
            socket_errors_logged: None,
            access_log: init.access_log,
            log_dirty: false,
            unpin_pending: false,
            tls_addrs: init.tls_addrs,
            export: None,
            reported_empty: false,
            pacing_list: Vec::new(),
            pacing_listed: None,
        })
    }

    pub(crate) fn mode(&self) -> ring::Mode {
        self.driver.mode()
    }

    /// Runs until told to stop or drained; then cancels and reaps every op
    /// in flight before returning, whatever ended the loop.
    pub fn run(mut self) -> std::io::Result<()> {
        let res = self.run_loop();
        if let Some(w) = &mut self.access_log {
            let _ = w.flush();
        }
        self.driver.shutdown();
        res
    }

    fn run_loop(&mut self) -> std::io::Result<()> {
        let listeners: Vec<usize> = self.driver.listeners().map(|(i, _, _)| i).collect();
        for i in listeners {
            self.driver.arm_accept(i);
        }
        self.schedule_sweep();
        self.schedule_stall_sweep();
        self.schedule_pacing(crate::pacing::IDLE_CHECK);
        self.driver.arm_wake();
        while !self.stopping {
            if self.draining && self.driver.is_empty() && self.driver.no_listeners() {
                break;
            }
            self.driver.commit();
            crate::conn::set_pool_quota(self.pool_quota());
            let timeout = self
                .timers
                .peek()
                .map(|Reverse(t)| t.at.saturating_duration_since(Instant::now()));
            self.driver.submit_and_wait(timeout)?;
            loop {
                let mut routed = std::mem::take(&mut self.routed);
                self.driver.reap(&mut routed);
                if routed.is_empty() {
                    self.routed = routed;
                    break;
                }
                for r in routed.drain(..) {
                    self.complete(r);
                }
                self.routed = routed;
            }
            self.fire_timers();
            if self.export.is_some() {
                self.report_empty();
            }
            self.feed_starved();
            self.watch_pool();
            self.stats.active.set(self.driver.len() as u64);
            self.stats.ops_in_flight.set(self.driver.in_flight() as u64);
            if self.log_dirty {
                self.log_dirty = false;
                if let Some(w) = &mut self.access_log {
                    let _ = w.flush();
                }
            }
        }
        Ok(())
    }

    fn complete(&mut self, r: Routed) {
        match r {
            Routed::Accept {
                listener,
                res,
                rearm,
            } => self.on_accept(listener, res, rearm),
            Routed::Wake => self.on_wake(),
            Routed::Slot { key, first, then } => {
                self.dispatch(key, first);
                if let Some(ev) = then {
                    self.dispatch(key, ev);
                }
                let opened = matches!(first, Event::FileOpen { res: Ok(_) });
                self.exec(key);
                if opened {
                    // Not adopted: not wanted.
                    self.driver.drop_unadopted(key);
                }
                if self.export.is_some() {
                    self.try_export(key);
                }
            }
            Routed::Nothing => {}
        }
    }

    /// Hands one event to its connection; the caller runs the actions.
    fn dispatch(&mut self, key: usize, ev: Event) {
        let Some((s, bufs)) = self.driver.with_bufs(key) else {
            return;
        };
        let out = &mut self.actions;
        match ev {
            Event::Recv { side, bid, len } => {
                if s.conn.requests() > 0 && s.conn.between_requests() {
                    s.started = Instant::now();
                }
                s.conn.on_recv(side, bid, bufs.data(bid, len), out);
            }
            Event::RecvEnd { side, why } => s.conn.on_recv_end(side, why, out),
            Event::Send { side, res } => {
                if res == Err(libc::ECANCELED) && s.conn.is_unpinning(side) {
                    s.conn.on_send_unpinned(side, &mut copy_out(bufs), out);
                    self.stats.unpinned.add(1);
                    return;
                }
                if let Ok(n) = res {
                    count_sent(&self.stats, side, n);
                }
                s.conn.on_send(side, res, out);
            }
            Event::Connect { res } => s.conn.on_connect(res, out),
            Event::Readable { side } => s.conn.on_readable(side, out),
            Event::PollCancelled { side } => s.conn.on_poll_cancelled(side),
            Event::Writable { side } => s.conn.on_writable(side, out),
            Event::FileOpen { res } => s.conn.on_file_open(res, out),
            Event::FileRead { res } => s.conn.on_file_read(res, out),
            Event::FileSpliced { res } => s.conn.on_file_spliced(res, out),
            Event::Cancelled => {}
        }
    }

    fn on_accept(&mut self, listener: usize, res: Result<Option<OwnedFd>, i32>, rearm: bool) {
        match &res {
            Ok(Some(_)) | Ok(None) => {}
            Err(e) if *e == libc::ECANCELED => {}
            Err(e) => {
                let now = Instant::now();
                if self
                    .socket_errors_logged
                    .is_none_or(|t| now.duration_since(t) > Duration::from_secs(5))
                {
                    self.socket_errors_logged = Some(now);
                    log::warn!(
                        "shard {}: accept failed: {} (backing off 50ms; logged at most every 5s)",
                        self.id,
                        std::io::Error::from_raw_os_error(*e)
                    );
                }
            }
        }
        let ok = res.is_ok();
        if let Ok(Some(fd)) = res {
            self.new_conn(fd, listener);
        }
        if rearm && !self.stopping {
            if ok {
                self.driver.arm_accept(listener);
            } else {
                // Re-arming at once on EMFILE would spin a core; wait a bit.
                self.timers.push(Reverse(Timer {
                    at: Instant::now() + Duration::from_millis(50),
                    target: TimerTarget::Accept {
                        listener: listener as u32,
                    },
                    kind: TimerKind::Linger,
                }));
            }
        }
    }

    fn new_conn(&mut self, fd: OwnedFd, listener: usize) {
        // Test builds only (tests/process.rs): die the way a bug would.
        #[cfg(debug_assertions)]
        if crate::server::test_fault("shard-panic-after-accept") {
            panic!(
                "RINGLB_TEST_FAULT: shard {} panics after an accept",
                self.id
            );
        }
        let sock = SockRef::from(&fd);
        let Ok(peer) = sock.peer_addr() else { return };
        let Some(peer) = peer.as_socket() else { return };
        self.stats.accepted.add(1);
        // TCP_NODELAY and keepalive come from the listener: accepted sockets
        // inherit them, which saves five setsockopt calls per connection.
        let over = self.shared.clients.fetch_add(1, Ordering::Relaxed)
            >= self.snap.config.server.max_connections.get();

        let server = &self.snap.config.server;
        // Behind a trusted L4 tier the peer is the tier; the client's
        // address comes in the PROXY header, and is counted then.
        let trusted = server
            .trusted_proxies
            .as_ref()
            .map(|nets| nets.iter().any(|n| n.contains(peer.ip())));
        // Per-address cap: counted only when configured, released with
        // the session (`Conn::ip_counted`).
        let cap = server
            .max_connections_per_ip
            .filter(|_| trusted != Some(true));
        let ip_counted =
            !over && cap.is_some_and(|c| self.snap.admission.acquire_ip(peer.ip(), c.get()));
        let tls = (self.snap.config.tls.as_ref()).filter(|_| {
            !self.tls_addrs.is_empty()
                && (self.driver.listeners())
                    .any(|(i, _, addr)| i == listener && self.tls_addrs.contains(&addr))
        });
        let refused = over || (cap.is_some() && !ip_counted);
        let mut conn = if refused && tls.is_some() {
            // A plaintext 503 or 429 means nothing to a TLS client: close.
            Conn::refused_tls(self.snap.clone(), peer, over, &mut self.actions)
        } else if over {
            Conn::over_capacity(self.snap.clone(), peer, &mut self.actions)
        } else if cap.is_some() && !ip_counted {
            Conn::over_ip_cap(self.snap.clone(), peer, &mut self.actions)
        } else {
            Conn::accept(self.snap.clone(), peer, &mut self.actions)
        };
        conn.ip_counted = ip_counted;
        if let (Some(tls), false) = (tls, refused) {
            if !conn.start_tls(tls.server.clone()) {
                // rustls refused to start a session (never with a
                // configuration that loaded): close, and give back what
                // this connection was counted as.
                log::warn!("shard {}: cannot start a TLS session; closing", self.id);
                self.shared.clients.fetch_sub(1, Ordering::Relaxed);
                if ip_counted {
                    self.snap.admission.release_ip(peer.ip());
                }
                return;
            }
        }
        if let Some(trusted) = trusted {
            conn.expect_proxy_header(trusted);
        }
        // getsockname only when some upstream will be sent a PROXY header.
        let sends_proxy =
            (self.snap.config.upstreams.iter()).any(|u| u.send_proxy_protocol.is_some());
        if sends_proxy {
            if let Some(local) = sock.local_addr().ok().and_then(|a| a.as_socket()) {
                conn.set_local_addr(local);
            }
        }
        let key = self.driver.insert(
            fd,
            Session {
                conn,
                started: Instant::now(),
                handshake: None,
            },
        );
        self.exec(key);
    }

    /// Carries out the actions a connection returned, then frees it if it
    /// is closed and idle.
    fn exec(&mut self, key: usize) {
        let mut batch = std::mem::take(&mut self.actions);
        loop {
            for action in batch.drain(..) {
                self.do_action(key, action);
            }
            // A backend socket being released for a retry closes once the
            // kernel has returned every op on it; only then may a new
            // backend socket take its place in this slot.
            if self.driver.backend_released(key) {
                if let Some(s) = self.driver.get_mut(key) {
                    s.conn.on_backend_released(&mut self.actions);
                }
            }
            // Actions may have produced actions (a connect that failed at once).
            std::mem::swap(&mut batch, &mut self.actions);
            if batch.is_empty() {
                break;
            }
        }
        self.actions = batch;
        if let Some(s) = self.driver.get_mut(key) {
            if s.handshake.is_none() {
                if let Some(status) = s.conn.status {
                    let took = s.started.elapsed();
                    s.handshake = Some(took);
                    self.stats
                        .record_handshake(stats::result_index(status), took);
                }
            }
        }
        self.maybe_free(key);
    }

    /// Calls the connection of `key` with the shard's action list.
    fn with_conn(&mut self, key: usize, f: impl FnOnce(&mut Conn, &mut Vec<Action>)) {
        let s = self
            .driver
            .get_mut(key)
            .expect("an action for a freed slot");
        f(&mut s.conn, &mut self.actions);
    }

    fn do_action(&mut self, key: usize, action: Action) {
        let d = &mut self.driver;
        match action {
            Action::ArmRecv(side) => d.arm_recv(key, side),
            Action::CancelRecv(side) => d.cancel(key, Op::Recv, side),
            Action::CancelSend(side) => d.cancel(key, Op::Send, side),
            Action::CancelPoll(side) => d.cancel(key, Op::PollIn, side),
            Action::CancelPollOut(side) => d.cancel(key, Op::PollOut, side),
            Action::CancelConnect => d.cancel(key, Op::Connect, Side::Backend),
            Action::ResetOnClose(side) => d.reset_on_close(key, side),
            Action::Send(side) => d.send(key, side),
            Action::Connect(addr) => match backend_socket(addr, &self.snap) {
                Ok(sock) => d.connect(key, sock.into(), addr),
                Err(err) => {
                    // Our own limit (EMFILE, ENOBUFS), not the backend's fault:
                    // the client gets 503 and the backend's health is untouched.
                    let now = Instant::now();
                    if self
                        .accept_errors_logged
                        .is_none_or(|t| now.duration_since(t) > Duration::from_secs(5))
                    {
                        self.accept_errors_logged = Some(now);
                        log::warn!("shard {}: cannot open a socket to {addr}: {err} (answering 503; logged at most every 5s)", self.id);
                    }
                    self.with_conn(key, |c, out| c.on_local_error(out));
                }
            },
            Action::DropBackend => d.drop_backend(key),
            Action::ReleaseBackend => d.abort_backend(key, true),
            Action::AbortBackend => d.abort_backend(key, false),
            Action::ShutdownWrite(side) => d.shutdown_write(key, side),
            Action::Release(bid) => d.release(bid),
            Action::Timer(kind, after) => {
                let gen = d.gen(key).expect("a timer for a freed slot");
                self.timers.push(Reverse(Timer {
                    at: Instant::now() + after,
                    target: TimerTarget::Conn {
                        key: key as u32,
                        gen,
                    },
                    kind,
                }));
            }
            Action::Starved(side) => {
                self.stats.recv_starved.add(1);
                let gen = d.gen(key).expect("a starved recv for a freed slot");
                self.starved.push_back((key, gen, side));
            }
            Action::OpenFile(req) => d.open_file(key, *req),
            Action::AdoptFile => d.adopt_file(key),
            Action::ReadFile { at, len, offset } => d.read_file(key, at, len, offset),
            Action::RequestDone(done) => {
                d.drop_file(key);
                let snap = self.snap.clone();
                let s = self
                    .driver
                    .get_mut(key)
                    .expect("an action for a freed slot");
                self.stats
                    .record_handshake(stats::result_index(done.status), s.started.elapsed());
                // exec() must not count this request again.
                s.handshake = None;
                s.conn.set_snapshot(snap);
                if self.access_log.is_some() {
                    self.log_request(key, &done);
                }
            }
            Action::PollIn(side) => d.poll(key, side, true),
            Action::PollOut(side) => d.poll(key, side, false),
            Action::ReadHeader { src, want } => match d.read_header(key, src, want) {
                None => self.with_conn(key, |c, out| c.on_no_pipe(src, out)),
                Some(res) => {
                    let res = res.as_ref().map(|(h, n)| &h[..*n]).map_err(|e| *e);
                    self.with_conn(key, |c, out| c.on_header(src, res, out));
                }
            },
            Action::Splice { src, read, pending } => match d.splice(key, src, read, pending) {
                None => self.with_conn(key, |c, out| c.on_no_pipe(src, out)),
                Some((got, put)) => {
                    if let Ok(n) = put {
                        count_sent(&self.stats, src.other(), n);
                        self.stats.bytes_spliced.add(n as u64);
                    }
                    self.with_conn(key, |c, out| c.on_spliced(src, got, put, out));
                }
            },
            Action::FileToPipe { offset, len } => {
                if !d.file_to_pipe(key, offset, len) {
                    self.with_conn(key, |c, out| c.on_file_spliced(Err(libc::EMFILE), out));
                }
            }
            Action::PipeToClient { pending } => {
                let put = d.pipe_to_client(key, pending);
                if let Ok(n) = put {
                    self.stats.bytes_to_client.add(n as u64);
                }
                self.with_conn(key, |c, out| c.on_pipe_drained(put, out));
            }
            Action::LeaveSplice { dst, reusable } => d.leave_splice(key, dst, reusable),
            Action::Close => d.close(key),
        }
    }

    fn maybe_free(&mut self, key: usize) {
        let Some(s) = self.driver.free(key) else {
            return;
        };
        // The sockets closed in `free`, with nothing left in flight on them.
        debug_assert_eq!(s.conn.stage(), Stage::Closing);
        // A kept-alive connection closed between requests has nothing left
        // to count or log: each request was, when answered.
        let idle_end = s.conn.requests() > 0 && s.conn.status.is_none();
        if s.handshake.is_none() && !idle_end {
            self.stats
                .record_handshake(stats::RESULT_CLOSED, s.started.elapsed());
        }
        if self.access_log.is_some() && !idle_end {
            self.log_session(&s);
        }
        if s.conn.status == Some(101) {
            let reason = stats::close_reason(s.conn.closer);
            self.stats.closed[reason].add(1);
            if let Some(b) = s.conn.backend_state() {
                b.count_close(reason);
            }
            match s.conn.close_kind {
                Some(CloseKind::Frame) => self.stats.clean_close_fallbacks[0].add(1),
                Some(CloseKind::Fin) => self.stats.clean_close_fallbacks[1].add(1),
                Some(CloseKind::Message) | None => {}
            }
        }
        let (client_ip, ip_counted) = (s.conn.client_addr.ip(), s.conn.ip_counted);
        for bid in s.conn.into_buffers() {
            self.driver.release(bid);
        }
        self.shared.clients.fetch_sub(1, Ordering::Relaxed);
        if ip_counted {
            self.snap.admission.release_ip(client_ip);
        }
    }

    fn on_wake(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Stop => self.stopping = true,
                // Dropping the old writer flushes what it buffered.
                Command::AccessLog(w) => self.access_log = w.0,
                Command::Reload(snap) => {
                    self.snap = snap;
                    for (_, sock, _) in self.driver.listeners() {
                        configure(&SockRef::from(sock), &self.snap);
                    }
                }
                Command::AddListeners(socks) => {
                    for sock in socks {
                        configure(&SockRef::from(&sock), &self.snap);
                        let i = self.driver.add_listener(sock);
                        self.driver.arm_accept(i);
                    }
                }
                Command::TlsListeners(addrs) => self.tls_addrs = addrs,
                Command::RemoveListeners(addrs) => {
                    let gone: Vec<usize> = self
                        .driver
                        .listeners()
                        .filter(|(_, _, addr)| addrs.contains(addr))
                        .map(|(i, _, _)| i)
                        .collect();
                    for i in gone {
                        self.driver.close_listener(i);
                    }
                }
                Command::Drain => {
                    self.draining = true;
                    // A drain after a hand-off (sessions that could not
                    // move stay here): the export is over.
                    self.export = None;
                    self.close_listeners();
                    for key in self.driver.keys() {
                        if let Some(s) = self.driver.get_mut(key) {
                            s.conn.drain_idle(&mut self.actions);
                            self.exec(key);
                        }
                    }
                }
                Command::Handoff(tx) => {
                    self.export = Some(tx);
                    self.reported_empty = false;
                    self.driver.pause_listeners();
                    for key in self.driver.keys() {
                        if let Some(s) = self.driver.get_mut(key) {
                            if s.conn.stage() != Stage::Relaying {
                                s.conn.drain_idle(&mut self.actions);
                                self.exec(key);
                            }
                        }
                        self.try_export(key);
                    }
                }
                Command::Import(sessions) => self.import(sessions),
                Command::AcceptPending => self.accept_pending(),
                Command::Resume => {
                    self.export = None;
                    self.driver.resume_listeners();
                }
                Command::CloseAll => {
                    self.draining = true;
                    self.close_listeners();
                    let keys: Vec<usize> = self
                        .driver
                        .keys()
                        .into_iter()
                        .filter(|k| !self.driver.is_closing(*k))
                        .collect();
                    // The deadline: the clean close with no wait for a
                    // message boundary (any frame boundary will do, FIN
                    // after linger_timeout).
                    for key in keys {
                        if let Some(s) = self.driver.get_mut(key) {
                            s.conn.request_close(
                                Closer::Shutdown,
                                Duration::ZERO,
                                &mut self.actions,
                            );
                            self.exec(key);
                        }
                    }
                }
            }
        }
        if !self.stopping {
            self.driver.arm_wake();
        }
    }

    fn close_listeners(&mut self) {
        let all: Vec<usize> = self.driver.listeners().map(|(i, _, _)| i).collect();
        for i in all {
            self.driver.close_listener(i);
        }
    }
}

fn count_sent(stats: &ShardStats, to: Side, n: usize) {
    let counter = match to {
        Side::Client => &stats.bytes_to_client,
        Side::Backend => &stats.bytes_to_backend,
    };
    counter.add(n as u64);
}

/// Socket options for both legs; set on listeners (inherited by accepted
/// sockets) and on each backend socket.
pub fn configure(sock: &SockRef<'_>, snap: &Snapshot) {
    // Relayed WebSocket frames are latency-sensitive and already batched by
    // the sender; Nagle would only delay them.
    let _ = sock.set_nodelay(true);
    // Unacknowledged data to a dead peer (or, on Linux 5.11+, a zero window
    // with data waiting) ends the connection after this long, rather than
    // after the kernel's ~15 minutes of retransmissions. Accepted sockets
    // inherit it from the listener.
    let _ = sock.set_tcp_user_timeout(snap.config.server.tcp_user_timeout);
    if let Some(idle) = snap.config.server.tcp_keepalive {
        let ka = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10).min(idle))
            .with_retries(6);
        let _ = sock.set_tcp_keepalive(&ka);
    }
}

fn backend_socket(addr: SocketAddr, snap: &Snapshot) -> std::io::Result<Socket> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    configure(&SockRef::from(&sock), snap);
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn snap(server_extra: &str) -> Arc<Snapshot> {
        let toml = format!(
            "[server]\nlisten = [\"127.0.0.1:1\"]\n{server_extra}\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n"
        );
        Snapshot::new(Config::parse(&toml, "test").unwrap())
    }

    /// Set on the listener, inherited by what it accepts (no setsockopt per
    /// connection), and set on backend sockets.
    #[test]
    fn tcp_user_timeout_reaches_both_legs() {
        let s = snap("tcp_user_timeout = \"42s\"");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        configure(&SockRef::from(&l), &s);
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        assert_eq!(
            SockRef::from(&a).tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(42))
        );
        let b = backend_socket("127.0.0.1:9".parse().unwrap(), &s).unwrap();
        assert_eq!(b.tcp_user_timeout().unwrap(), Some(Duration::from_secs(42)));
        // The default follows stalled_peer_timeout's (see config).
        let b = backend_socket("127.0.0.1:9".parse().unwrap(), &snap("")).unwrap();
        assert_eq!(
            b.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(300))
        );
        let b = backend_socket(
            "127.0.0.1:9".parse().unwrap(),
            &snap("tcp_user_timeout = \"off\""),
        )
        .unwrap();
        assert_eq!(b.tcp_user_timeout().unwrap(), None);
    }
}
