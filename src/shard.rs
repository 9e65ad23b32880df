//! A shard: one thread, one io_uring, its own SO_REUSEPORT listeners, a slab
//! of connections and a provided-buffer ring. Nothing here is shared with
//! other shards except the read-only snapshot and per-connection atomics
//! (backend lease counts, the global connection count).
//!
//! The loop: publish returned buffers, submit, wait for completions or the
//! next timer, turn each completion into a call on the connection's state
//! machine, and carry out the actions it returns. Only this file and
//! `ring.rs` know about SQEs.
//!
//! `user_data` layout (64 bits):
//!
//! ```text
//!  63..56  op     1 accept, 2 recv, 3 send, 4 connect, 5 cancel, 6 wake,
//!                 7 open (static file), 8 read (static file),
//!                 9 poll in, 10 poll out (splice)
//!  55..48  side   0 client, 1 backend (recv/send/connect)
//!  31..0   key    slab key of the connection, or the listener index (accept)
//! ```
//!
//! A slot is freed only when its in-flight op count is zero, so a CQE's key
//! always names the connection that submitted it; timers, which are not
//! kernel ops, carry a generation as well.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::{Domain, SockAddr, SockRef, Socket, TcpKeepalive, Type};

use std::fs::File;

use crate::conn::{Action, Conn, RecvEnd, Side, Stage, TimerKind};
use crate::files;
use crate::ring::{self, BufRing, Cqe, Uring};
use crate::snapshot::Snapshot;
use crate::stats::{self, ShardStats};

const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_CONNECT: u64 = 4;
const OP_CANCEL: u64 = 5;
const OP_WAKE: u64 = 6;
const OP_OPEN: u64 = 7;
const OP_READ: u64 = 8;
const OP_POLL_IN: u64 = 9;
const OP_POLL_OUT: u64 = 10;
const OP_FILE_SPLICE: u64 = 11;

/// How often the pool is swept for stalled directions while it runs low.
const UNPIN_EVERY: Duration = Duration::from_millis(50);

/// Copies bytes `start..start + len` of provided buffer `bid` out of the pool.
fn copy_out(bufs: &BufRing) -> impl FnMut(u16, u32, u32) -> Vec<u8> + '_ {
    move |bid, start, len| bufs.data(bid, (start + len) as usize)[start as usize..].to_vec()
}

/// Empty pipes kept per shard for the next splice.
const SPARE_PIPES: usize = 64;

fn ud(op: u64, side: Side, key: usize) -> u64 {
    op << 56 | (side as u64) << 48 | key as u64
}

fn ud_op(ud: u64) -> u64 {
    ud >> 56
}

fn ud_side(ud: u64) -> Side {
    if (ud >> 48) & 0xff == 0 {
        Side::Client
    } else {
        Side::Backend
    }
}

fn ud_key(ud: u64) -> usize {
    (ud & 0xffff_ffff) as usize
}

/// Messages from the main thread; the shard reads them when its eventfd fires.
#[derive(Debug)]
pub enum Command {
    /// A new configuration: new connections use it; live ones keep theirs.
    Reload(Arc<Snapshot>),
    /// Start accepting on these (new listen addresses after a reload).
    AddListeners(Vec<TcpListener>),
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
}

/// State shared by all shards.
#[derive(Debug, Default)]
pub struct Shared {
    /// Client connections across all shards, for `server.max_connections`.
    pub clients: AtomicUsize,
}

struct Entry {
    conn: Conn,
    gen: u32,
    client: OwnedFd,
    backend: Option<OwnedFd>,
    /// The address a connect reads until its CQE arrives.
    connect_addr: Option<Box<SockAddr>>,
    /// Ops submitted and not yet completed, per side.
    inflight: [u32; 2],
    /// File ops (open, read) not yet completed; they end by themselves.
    inflight_file: u32,
    /// The file a static answer reads from, and one just opened that the
    /// connection has not adopted yet.
    file: Option<File>,
    opened: Option<File>,
    /// What an `openat2` in flight reads.
    open_req: Option<Box<(files::OpenReq, ring::OpenHow)>>,
    /// The backend socket is to close once no op uses it (a retry).
    release_backend: bool,
    /// The pipe of each direction that is splicing, by destination side.
    pipes: [Option<ring::Pipe>; 2],
    closing: bool,
    /// When the current request began (later requests of a kept-alive
    /// connection begin with their first byte).
    started: Instant,
    /// Accept to the answer (ours or the backend's); `None` until known.
    handshake: Option<Duration>,
}

impl Entry {
    fn fd(&self, side: Side) -> Option<RawFd> {
        match side {
            Side::Client => Some(self.client.as_raw_fd()),
            Side::Backend => self.backend.as_ref().map(|f| f.as_raw_fd()),
        }
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

struct Listener {
    sock: TcpListener,
    addr: SocketAddr,
    /// Its accept is being cancelled; dropped when the accept CQE ends.
    closing: bool,
    /// A multishot accept is in flight (not while backing off after an error).
    armed: bool,
}

pub struct Shard {
    // Field order is drop order: the ring goes before the buffers it may
    // write into (see ring.rs).
    uring: Uring,
    bufs: BufRing,
    id: usize,
    conns: Slab<Entry>,
    listeners: Vec<Option<Listener>>,
    snap: Arc<Snapshot>,
    shared: Arc<Shared>,
    stats: Arc<ShardStats>,
    timers: BinaryHeap<Reverse<Timer>>,
    starved: VecDeque<(usize, u32, Side)>,
    actions: Vec<Action>,
    cqes: Vec<Cqe>,
    wake: OwnedFd,
    wake_buf: Box<[u8; 8]>,
    commands: Receiver<Command>,
    next_gen: u32,
    stopping: bool,
    draining: bool,
    accept_errors_logged: Option<Instant>,
    socket_errors_logged: Option<Instant>,
    access_log: Option<Box<dyn Write + Send>>,
    log_dirty: bool,
    /// Empty pipes for splicing directions to take.
    spare_pipes: Vec<ring::Pipe>,
    /// An unpin sweep is scheduled.
    unpin_pending: bool,
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
}

impl Shard {
    /// Builds the shard on the calling thread (the ring is single-issuer).
    pub fn new(init: ShardInit) -> std::io::Result<Shard> {
        let server = &init.snap.config.server;
        let uring = Uring::new(1024)?;
        let bufs = uring.buf_ring(0, server.buffers_per_shard, server.buffer_size.get())?;
        Ok(Shard {
            uring,
            bufs,
            id: init.id,
            conns: Slab::new(),
            listeners: init
                .listeners
                .into_iter()
                .map(|l| {
                    configure(&SockRef::from(&l), &init.snap);
                    Some(listener(l))
                })
                .collect(),
            snap: init.snap,
            shared: init.shared,
            stats: init.stats,
            timers: BinaryHeap::new(),
            starved: VecDeque::new(),
            actions: Vec::with_capacity(16),
            cqes: Vec::with_capacity(256),
            wake: init.wake,
            wake_buf: Box::new([0; 8]),
            commands: init.commands,
            next_gen: 0,
            stopping: false,
            draining: false,
            accept_errors_logged: None,
            socket_errors_logged: None,
            access_log: init.access_log,
            log_dirty: false,
            spare_pipes: Vec::new(),
            unpin_pending: false,
        })
    }

    pub fn mode(&self) -> ring::Mode {
        self.uring.mode
    }

    pub fn run(mut self) -> std::io::Result<()> {
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
        self.schedule_sweep();
        self.schedule_stall_sweep();
        let wake_fd = self.wake.as_raw_fd();
        self.uring
            .read_eventfd(wake_fd, &mut self.wake_buf, ud(OP_WAKE, Side::Client, 0));
        while !self.stopping {
            if self.draining && self.conns.is_empty() && self.listeners.iter().all(Option::is_none)
            {
                break;
            }
            self.bufs.commit();
            crate::conn::set_pool_quota(self.pool_quota());
            let timeout = self
                .timers
                .peek()
                .map(|Reverse(t)| t.at.saturating_duration_since(Instant::now()));
            self.uring.submit_and_wait(timeout)?;
            loop {
                self.uring.completions(&mut self.cqes);
                if self.cqes.is_empty() {
                    break;
                }
                let cqes = std::mem::take(&mut self.cqes);
                for cqe in &cqes {
                    self.complete(*cqe);
                }
                self.cqes = cqes;
            }
            self.fire_timers();
            self.feed_starved();
            self.watch_pool();
            self.stats.active.set(self.conns.len() as u64);
            if self.log_dirty {
                self.log_dirty = false;
                if let Some(w) = &mut self.access_log {
                    let _ = w.flush();
                }
            }
        }
        if let Some(w) = &mut self.access_log {
            let _ = w.flush();
        }
        Ok(())
    }

    /// Sessions silent for between one and two `park_idle_after` intervals
    /// get parked at the next sweep.
    /// (The sweep also runs while parking is off, idle, so that a reload
    /// can turn it on.)
    fn schedule_sweep(&mut self) {
        let every = self
            .snap
            .config
            .server
            .park_idle_after
            .unwrap_or(Duration::from_secs(10));
        self.timers.push(Reverse(Timer {
            at: Instant::now() + every,
            target: TimerTarget::IdleSweep,
            kind: TimerKind::Linger,
        }));
    }

    fn arm_accept(&mut self, i: usize) {
        if let Some(l) = &mut self.listeners[i] {
            if !l.closing && !l.armed {
                l.armed = true;
                let fd = l.sock.as_raw_fd();
                self.uring.accept_multi(fd, ud(OP_ACCEPT, Side::Client, i));
            }
        }
    }

    /// Cancels a listener's accept; the socket closes when the accept ends.
    fn close_listener(&mut self, i: usize) {
        if let Some(l) = &mut self.listeners[i] {
            if !l.armed {
                // Backing off after an error: nothing in flight, close now.
                self.listeners[i] = None;
            } else if !l.closing {
                l.closing = true;
                let fd = l.sock.as_raw_fd();
                self.uring.cancel_fd(fd, ud(OP_CANCEL, Side::Client, i));
            }
        }
    }

    fn complete(&mut self, cqe: Cqe) {
        let key = ud_key(cqe.user_data);
        match ud_op(cqe.user_data) {
            OP_ACCEPT => self.on_accept(key, cqe),
            OP_RECV => self.on_recv(key, ud_side(cqe.user_data), cqe),
            OP_SEND => {
                let side = ud_side(cqe.user_data);
                let Some(e) = self.conns.get_mut(key) else {
                    return;
                };
                e.inflight[side.idx()] -= 1;
                if cqe.result == -libc::ECANCELED && e.conn.is_unpinning(side) {
                    let bufs = &self.bufs;
                    e.conn
                        .on_send_unpinned(side, &mut copy_out(bufs), &mut self.actions);
                    self.stats.unpinned.add(1);
                    self.exec(key);
                    return;
                }
                let res = if cqe.result >= 0 {
                    Ok(cqe.result as usize)
                } else {
                    Err(-cqe.result)
                };
                if let Ok(n) = res {
                    let counter = match side {
                        Side::Client => &self.stats.bytes_to_client,
                        Side::Backend => &self.stats.bytes_to_backend,
                    };
                    counter.add(n as u64);
                }
                e.conn.on_send(side, res, &mut self.actions);
                self.exec(key);
            }
            OP_CONNECT => {
                let Some(e) = self.conns.get_mut(key) else {
                    return;
                };
                e.inflight[Side::Backend.idx()] -= 1;
                e.connect_addr = None;
                let res = if cqe.result >= 0 {
                    Ok(())
                } else {
                    Err(-cqe.result)
                };
                e.conn.on_connect(res, &mut self.actions);
                self.exec(key);
            }
            OP_WAKE => self.on_wake(),
            OP_OPEN => self.on_open(key, cqe),
            OP_POLL_IN | OP_POLL_OUT => {
                let side = ud_side(cqe.user_data);
                let Some(e) = self.conns.get_mut(key) else {
                    return;
                };
                e.inflight[side.idx()] -= 1;
                if cqe.result == -libc::ECANCELED && ud_op(cqe.user_data) == OP_POLL_IN {
                    e.conn.on_poll_cancelled(side);
                } else if cqe.result != -libc::ECANCELED {
                    // An error shows as readiness: the splice reports it.
                    if ud_op(cqe.user_data) == OP_POLL_IN {
                        e.conn.on_readable(side, &mut self.actions);
                    } else {
                        e.conn.on_writable(side, &mut self.actions);
                    }
                }
                self.exec(key);
            }
            OP_READ | OP_FILE_SPLICE => {
                let Some(e) = self.conns.get_mut(key) else {
                    return;
                };
                e.inflight_file -= 1;
                let res = if cqe.result >= 0 {
                    Ok(cqe.result as usize)
                } else {
                    Err(-cqe.result)
                };
                if ud_op(cqe.user_data) == OP_READ {
                    e.conn.on_file_read(res, &mut self.actions);
                } else {
                    e.conn.on_file_spliced(res, &mut self.actions);
                }
                self.exec(key);
            }
            // Cancel results carry nothing we need: the cancelled op reports itself.
            _ => {}
        }
    }

    fn on_accept(&mut self, listener: usize, cqe: Cqe) {
        if cqe.result >= 0 {
            let fd = ring::adopt_fd(cqe.result);
            if self.listeners[listener].as_ref().is_some_and(|l| l.closing) {
                // Raced the cancel: the listener is going away; so is this.
                drop(fd);
            } else {
                self.new_conn(fd);
            }
        } else if cqe.result != -libc::ECANCELED {
            let now = Instant::now();
            if self
                .socket_errors_logged
                .is_none_or(|t| now.duration_since(t) > Duration::from_secs(5))
            {
                self.socket_errors_logged = Some(now);
                log::warn!(
                    "shard {}: accept failed: {} (backing off 50ms; logged at most every 5s)",
                    self.id,
                    std::io::Error::from_raw_os_error(-cqe.result)
                );
            }
        }
        if !cqe.more() {
            if let Some(l) = &mut self.listeners[listener] {
                l.armed = false;
                if l.closing {
                    self.listeners[listener] = None;
                    return;
                }
            }
        }
        if !cqe.more() && !self.stopping {
            if cqe.result >= 0 {
                self.arm_accept(listener);
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

    fn new_conn(&mut self, fd: OwnedFd) {
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

        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        let conn = if over {
            Conn::over_capacity(self.snap.clone(), peer, &mut self.actions)
        } else {
            Conn::accept(self.snap.clone(), peer, &mut self.actions)
        };
        let key = self.conns.insert(Entry {
            conn,
            gen,
            client: fd,
            backend: None,
            connect_addr: None,
            inflight: [0, 0],
            inflight_file: 0,
            file: None,
            opened: None,
            open_req: None,
            release_backend: false,
            pipes: [None, None],
            closing: false,
            started: Instant::now(),
            handshake: None,
        });
        assert!(key <= u32::MAX as usize);
        self.exec(key);
    }

    fn on_recv(&mut self, key: usize, side: Side, cqe: Cqe) {
        let Some(e) = self.conns.get_mut(key) else {
            return;
        };
        if !cqe.more() {
            e.inflight[side.idx()] -= 1;
        }
        if cqe.result > 0 {
            if e.conn.requests() > 0 && e.conn.between_requests() {
                e.started = Instant::now();
            }
            let bid = cqe.buffer().expect("recv data without a buffer");
            self.bufs.taken(bid);
            let data = self.bufs.data(bid, cqe.result as usize);
            e.conn.on_recv(side, bid, data, &mut self.actions);
        }
        if !cqe.more() {
            let why = match cqe.result {
                0 => RecvEnd::Eof,
                r if r > 0 => RecvEnd::Stopped,
                r if r == -libc::ECANCELED => RecvEnd::Stopped,
                r if r == -libc::ENOBUFS => RecvEnd::NoBuffers,
                r => RecvEnd::Error(-r),
            };
            e.conn.on_recv_end(side, why, &mut self.actions);
        }
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
            if let Some(e) = self.conns.get_mut(key) {
                // A backend socket being released for a retry closes once
                // the kernel has returned every op on it; only then may a
                // new backend socket take its place in this slot.
                if e.release_backend && e.inflight[Side::Backend.idx()] == 0 {
                    e.release_backend = false;
                    e.backend = None;
                    e.conn.on_backend_released(&mut self.actions);
                }
            }
            // Actions may have produced actions (a connect that failed at once).
            std::mem::swap(&mut batch, &mut self.actions);
            if batch.is_empty() {
                break;
            }
        }
        self.actions = batch;
        if let Some(e) = self.conns.get_mut(key) {
            if e.handshake.is_none() {
                if let Some(status) = e.conn.status {
                    let took = e.started.elapsed();
                    e.handshake = Some(took);
                    self.stats
                        .record_handshake(stats::result_index(status), took);
                }
            }
        }
        self.maybe_free(key);
    }

    fn do_action(&mut self, key: usize, action: Action) {
        let e = &mut self.conns[key];
        match action {
            Action::ArmRecv(side) => {
                let fd = e.fd(side).expect("recv on a side without a socket");
                e.inflight[side.idx()] += 1;
                self.uring
                    .recv_multi(fd, self.bufs.bgid, ud(OP_RECV, side, key));
            }
            Action::CancelRecv(side) => {
                self.uring
                    .cancel(ud(OP_RECV, side, key), ud(OP_CANCEL, side, key));
            }
            Action::CancelPoll(side) => {
                self.uring
                    .cancel(ud(OP_POLL_IN, side, key), ud(OP_CANCEL, side, key));
            }
            Action::CancelSend(side) => {
                self.uring
                    .cancel(ud(OP_SEND, side, key), ud(OP_CANCEL, side, key));
            }
            Action::ResetOnClose(side) => {
                let fd = match side {
                    Side::Client => Some(&e.client),
                    Side::Backend => e.backend.as_ref(),
                };
                if let Some(fd) = fd {
                    let _ = SockRef::from(fd).set_linger(Some(Duration::ZERO));
                }
            }
            Action::Send(side) => {
                let fd = e.fd(side).expect("send on a side without a socket");
                let (ptr, len) = match e.conn.front(side).expect("send with an empty queue") {
                    crate::conn::Payload::Ring { bid, start, len } => {
                        (self.bufs.ptr(*bid, *start), *len as usize)
                    }
                    crate::conn::Payload::Owned(o) => {
                        (o.data[o.start..].as_ptr(), o.data.len() - o.start)
                    }
                    crate::conn::Payload::File { start, len } => {
                        (e.conn.file_ptr(*start), *len as usize)
                    }
                };
                e.inflight[side.idx()] += 1;
                self.uring.send(fd, ptr, len, ud(OP_SEND, side, key));
            }
            Action::Connect(addr) => match backend_socket(addr, &self.snap) {
                Ok(sock) => {
                    let sa = Box::new(SockAddr::from(addr));
                    let fd: OwnedFd = sock.into();
                    self.uring
                        .connect(fd.as_raw_fd(), &sa, ud(OP_CONNECT, Side::Backend, key));
                    e.backend = Some(fd);
                    e.connect_addr = Some(sa);
                    e.inflight[Side::Backend.idx()] += 1;
                }
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
                    e.conn.on_local_error(&mut self.actions);
                }
            },
            Action::CancelConnect => {
                self.uring.cancel(
                    ud(OP_CONNECT, Side::Backend, key),
                    ud(OP_CANCEL, Side::Backend, key),
                );
            }
            Action::DropBackend => {
                debug_assert_eq!(e.inflight[Side::Backend.idx()], 0);
                e.backend = None;
            }
            Action::ReleaseBackend => {
                if let Some(fd) = &e.backend {
                    let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Both);
                    if e.inflight[Side::Backend.idx()] > 0 {
                        self.uring
                            .cancel_fd(fd.as_raw_fd(), ud(OP_CANCEL, Side::Backend, key));
                    }
                }
                e.release_backend = true;
            }
            Action::AbortBackend => {
                if let Some(fd) = &e.backend {
                    let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Both);
                    if e.inflight[Side::Backend.idx()] > 0 {
                        self.uring
                            .cancel_fd(fd.as_raw_fd(), ud(OP_CANCEL, Side::Backend, key));
                    }
                }
            }
            Action::ShutdownWrite(side) => {
                let fd = match side {
                    Side::Client => Some(&e.client),
                    Side::Backend => e.backend.as_ref(),
                };
                if let Some(fd) = fd {
                    let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Write);
                }
            }
            Action::Release(bid) => self.bufs.release(bid),
            Action::Timer(kind, after) => {
                let gen = e.gen;
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
                self.starved.push_back((key, e.gen, side));
            }
            Action::OpenFile(req) => {
                let how = ring::OpenHow::new()
                    // O_NONBLOCK only so a FIFO under root cannot hang the
                    // open; it is cleared before any read (on_open).
                    .flags(
                        (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
                            as u64,
                    )
                    .resolve(req.resolve);
                let boxed = Box::new((*req, how));
                let dir = boxed.0.site.root_fd.as_raw_fd();
                self.uring.openat2(
                    dir,
                    &boxed.0.path,
                    &boxed.1,
                    ud(OP_OPEN, Side::Backend, key),
                );
                e.open_req = Some(boxed);
                e.inflight_file += 1;
            }
            Action::AdoptFile => e.file = e.opened.take(),
            Action::ReadFile { at, len, offset } => {
                let fd = e.file.as_ref().expect("read without a file").as_raw_fd();
                let ptr = e.conn.read_ptr(at, len);
                e.inflight_file += 1;
                self.uring
                    .read(fd, ptr, len, offset, ud(OP_READ, Side::Backend, key));
            }
            Action::RequestDone(done) => {
                self.stats
                    .record_handshake(stats::result_index(done.status), e.started.elapsed());
                // exec() must not count this request again.
                e.handshake = None;
                e.file = None;
                e.conn.set_snapshot(self.snap.clone());
                if self.access_log.is_some() {
                    self.log_request(key, &done);
                }
            }
            Action::PollIn(side) | Action::PollOut(side) => {
                let fd = e.fd(side).expect("poll on a side without a socket");
                let (op, mask) = if matches!(action, Action::PollIn(_)) {
                    (OP_POLL_IN, (libc::POLLIN | libc::POLLRDHUP) as u32)
                } else {
                    (OP_POLL_OUT, libc::POLLOUT as u32)
                };
                e.inflight[side.idx()] += 1;
                self.uring.poll(fd, mask, ud(op, side, key));
            }
            Action::ReadHeader { src, want } => {
                let dst = src.other();
                if !take_pipe(e, &mut self.spare_pipes, dst) {
                    e.conn.on_no_pipe(src, &mut self.actions);
                    return;
                }
                let pipe = e.pipes[dst.idx()].as_ref().expect("pipe just taken");
                let sock = match src {
                    Side::Client => &e.client,
                    Side::Backend => e
                        .backend
                        .as_ref()
                        .expect("header from a side without a socket"),
                };
                let mut hdr = [0u8; 14];
                let want = want.min(hdr.len());
                // The socket is O_NONBLOCK: no data is EAGAIN, never a wait.
                let res = match (&*SockRef::from(sock)).read(&mut hdr[..want]) {
                    Ok(n) => match pipe.put(&hdr[..n]) {
                        // The pipe is empty at a boundary: a header always fits.
                        Ok(m) if m == n => Ok(&hdr[..n]),
                        Ok(_) => Err(libc::EIO),
                        Err(e) => Err(e),
                    },
                    Err(err) => Err(err.raw_os_error().unwrap_or(libc::EIO)),
                };
                e.conn.on_header(src, res, &mut self.actions);
            }
            Action::Splice { src, read, pending } => {
                let dst = src.other();
                if !take_pipe(e, &mut self.spare_pipes, dst) {
                    e.conn.on_no_pipe(src, &mut self.actions);
                    return;
                }
                let pipe = e.pipes[dst.idx()].as_ref().expect("pipe just taken");
                let from = e.fd(src).expect("splice from a side without a socket");
                let to = e.fd(dst).expect("splice to a side without a socket");
                let got = (read > 0).then(|| pipe.fill(from, read));
                let total = pending + got.and_then(Result::ok).unwrap_or(0);
                let put = if total > 0 {
                    pipe.drain(to, total)
                } else {
                    Ok(0)
                };
                if let Ok(n) = put {
                    let counter = match dst {
                        Side::Client => &self.stats.bytes_to_client,
                        Side::Backend => &self.stats.bytes_to_backend,
                    };
                    counter.add(n as u64);
                    self.stats.bytes_spliced.add(n as u64);
                }
                e.conn.on_spliced(src, got, put, &mut self.actions);
            }
            Action::FileToPipe { offset, len } => {
                if !take_pipe(e, &mut self.spare_pipes, Side::Client) {
                    e.conn.on_file_spliced(Err(libc::EMFILE), &mut self.actions);
                    return;
                }
                let fd = e.file.as_ref().expect("splice without a file").as_raw_fd();
                let pipe = e.pipes[Side::Client.idx()]
                    .as_ref()
                    .expect("pipe just taken");
                e.inflight_file += 1;
                self.uring.splice_file(
                    fd,
                    offset,
                    pipe,
                    len,
                    ud(OP_FILE_SPLICE, Side::Client, key),
                );
            }
            Action::PipeToClient { pending } => {
                let pipe = e.pipes[Side::Client.idx()]
                    .as_ref()
                    .expect("draining a pipe the connection does not hold");
                let put = pipe.drain(e.client.as_raw_fd(), pending);
                if let Ok(n) = put {
                    self.stats.bytes_to_client.add(n as u64);
                }
                e.conn.on_pipe_drained(put, &mut self.actions);
            }
            Action::LeaveSplice { dst, reusable } => {
                if let Some(p) = e.pipes[dst.idx()].take() {
                    if reusable && self.spare_pipes.len() < SPARE_PIPES {
                        self.spare_pipes.push(p);
                    }
                }
            }
            Action::Close => {
                e.closing = true;
                for side in [Side::Client, Side::Backend] {
                    let fd = match side {
                        Side::Client => Some(&e.client),
                        Side::Backend => e.backend.as_ref(),
                    };
                    if let Some(fd) = fd {
                        // shutdown() wakes pending recvs with EOF and makes the
                        // FIN go out; the cancel covers ops shutdown does not end.
                        let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Both);
                        if e.inflight[side.idx()] > 0 {
                            self.uring
                                .cancel_fd(fd.as_raw_fd(), ud(OP_CANCEL, side, key));
                        }
                    }
                }
            }
        }
    }

    fn maybe_free(&mut self, key: usize) {
        let Some(e) = self.conns.get(key) else { return };
        if !e.closing || e.inflight != [0, 0] || e.inflight_file != 0 {
            return;
        }
        let e = self.conns.remove(key);
        debug_assert_eq!(e.conn.stage(), Stage::Closing);
        // A kept-alive connection closed between requests has nothing left
        // to count or log: each request was, when answered.
        let idle_end = e.conn.requests() > 0 && e.conn.status.is_none();
        if e.handshake.is_none() && !idle_end {
            self.stats
                .record_handshake(stats::RESULT_CLOSED, e.started.elapsed());
        }
        if self.access_log.is_some() && !idle_end {
            self.log_session(&e);
        }
        if e.conn.status == Some(101) {
            self.stats.closed[stats::close_reason(e.conn.closer)].add(1);
        }
        for bid in e.conn.into_buffers() {
            self.bufs.release(bid);
        }
        self.shared.clients.fetch_sub(1, Ordering::Relaxed);
        // The sockets close here, with nothing left in flight on them.
    }

    fn on_open(&mut self, key: usize, cqe: Cqe) {
        let file = (cqe.result >= 0).then(|| File::from(ring::adopt_fd(cqe.result)));
        let Some(e) = self.conns.get_mut(key) else {
            return;
        };
        e.inflight_file -= 1;
        e.open_req = None;
        let res = match file {
            None => Err(-cqe.result),
            Some(f) => {
                // Reads must wait for the disk (in io-wq), not fail with
                // EAGAIN, so the open's O_NONBLOCK goes now.
                let _ = SockRef::from(&f).set_nonblocking(false);
                match f.metadata() {
                    Ok(m) => {
                        e.opened = Some(f);
                        Ok(meta(&m))
                    }
                    Err(err) => Err(err.raw_os_error().unwrap_or(libc::EIO)),
                }
            }
        };
        e.conn.on_file_open(res, &mut self.actions);
        self.exec(key);
        if let Some(e) = self.conns.get_mut(key) {
            // Not adopted: not wanted.
            e.opened = None;
        }
    }

    fn log_request(&mut self, key: usize, done: &crate::conn::Done) {
        let e = &self.conns[key];
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "client": e.conn.client_addr.to_string(),
            "route": done.route.as_deref(),
            "path": done.path.as_deref(),
            "backend": null,
            "status": done.status,
            "handshake_ms": null,
            "duration_ms": ms(e.started.elapsed()),
            "bytes_from_client": done.bytes_from_client,
            "bytes_from_backend": done.bytes_to_client,
            "closed_by": null,
        });
        self.write_log(line);
    }

    fn log_session(&mut self, e: &Entry) {
        let c = &e.conn;
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "client": c.client_addr.to_string(),
            "route": c.route.as_deref(),
            "path": c.path.as_deref(),
            "backend": c.backend.map(|b| b.to_string()),
            "status": c.status,
            "handshake_ms": e.handshake.map(ms),
            "duration_ms": ms(e.started.elapsed()),
            "bytes_from_client": c.bytes_to(Side::Backend),
            "bytes_from_backend": c.bytes_to(Side::Client),
            "closed_by": match c.closer {
                Some(crate::conn::Closer::Client) => "client",
                Some(crate::conn::Closer::Backend) => "backend",
                Some(crate::conn::Closer::Proxy) => "proxy",
                Some(crate::conn::Closer::Drain) => "drain",
                Some(crate::conn::Closer::StalledPeer) => "stalled_peer",
                Some(crate::conn::Closer::Error) | None => "error",
            },
        });
        self.write_log(line);
    }

    fn write_log(&mut self, line: serde_json::Value) {
        if let Some(w) = &mut self.access_log {
            let mut text = line.to_string();
            text.push('\n');
            let _ = w.write_all(text.as_bytes());
            self.log_dirty = true;
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse(t)) = self.timers.peek().copied() {
            if t.at > now {
                break;
            }
            self.timers.pop();
            match t.target {
                TimerTarget::Accept { listener } => self.arm_accept(listener as usize),
                TimerTarget::StallSweep => self.stall_sweep(),
                TimerTarget::Unpin => self.unpin_sweep(),
                TimerTarget::IdleSweep if self.snap.config.server.park_idle_after.is_none() => {
                    self.schedule_sweep();
                }
                TimerTarget::IdleSweep => {
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        let Some(e) = self.conns.get_mut(key) else {
                            continue;
                        };
                        if e.closing {
                            continue;
                        }
                        if e.conn.idle_sweep(&mut self.actions) {
                            self.stats.parked.add(1);
                        }
                        if !self.actions.is_empty() {
                            self.exec(key);
                        }
                    }
                    self.schedule_sweep();
                }
                TimerTarget::Conn { key, gen } => {
                    let key = key as usize;
                    let Some(e) = self.conns.get_mut(key) else {
                        continue;
                    };
                    if e.gen != gen || e.closing {
                        continue;
                    }
                    e.conn.on_timer(t.kind, &mut self.actions);
                    self.exec(key);
                }
            }
        }
    }

    fn pool_quota(&self) -> usize {
        let server = &self.snap.config.server;
        crate::conn::pool_quota(
            server.max_buffers_per_direction.get(),
            self.bufs.available(),
            server.buffers_per_shard as usize,
        )
    }

    /// Under pool pressure (a quarter or less free, or a recv waiting for
    /// buffers, which [`Shard::feed_starved`] gives only above a quarter),
    /// schedules an unpin sweep, which moves the buffers of directions whose
    /// readers take nothing out of the pool. One sweep per `UNPIN_EVERY` at
    /// most.
    fn watch_pool(&mut self) {
        let total = self.snap.config.server.buffers_per_shard as usize;
        self.stats.buffers_free.set(self.bufs.available() as u64);
        let pressure = self.bufs.available() * 4 <= total || !self.starved.is_empty();
        if self.unpin_pending || !pressure {
            return;
        }
        self.unpin_pending = true;
        self.timers.push(Reverse(Timer {
            at: Instant::now() + UNPIN_EVERY,
            target: TimerTarget::Unpin,
            kind: TimerKind::Linger,
        }));
    }

    fn unpin_sweep(&mut self) {
        self.unpin_pending = false;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some(e) = self.conns.get_mut(key) else {
                continue;
            };
            let bufs = &self.bufs;
            e.conn.unpin(&mut copy_out(bufs), &mut self.actions);
            if !self.actions.is_empty() {
                self.exec(key);
            }
        }
        // Still short: look again (sends seen in flight now are cancelled
        // next time if they have not moved).
        self.watch_pool();
    }

    /// Period of the stall sweep: fine enough that a stalled peer is closed
    /// within an eighth of `stalled_peer_timeout` of it, and no finer than
    /// 100 ms (the sweep visits every session).
    fn stall_period(&self) -> Duration {
        match self.snap.config.server.stalled_peer_timeout {
            Some(t) => (t / 8).clamp(Duration::from_millis(100), Duration::from_secs(5)),
            None => Duration::from_secs(5),
        }
    }

    fn schedule_stall_sweep(&mut self) {
        self.timers.push(Reverse(Timer {
            at: Instant::now() + self.stall_period(),
            target: TimerTarget::StallSweep,
            kind: TimerKind::Linger,
        }));
    }

    fn stall_sweep(&mut self) {
        // Sweeps in a row without progress that add up to the timeout; one
        // more, since the first may come just after the stall began.
        let limit = self.snap.config.server.stalled_peer_timeout.map(|t| {
            let period = self.stall_period();
            (t.as_millis().div_ceil(period.as_millis()) + 1).min(u16::MAX as u128) as u16
        });
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some(e) = self.conns.get_mut(key) else {
                continue;
            };
            if e.closing {
                continue;
            }
            e.conn.stall_sweep(limit, &mut self.actions);
            if !self.actions.is_empty() {
                self.exec(key);
            }
        }
        self.schedule_stall_sweep();
    }

    /// Re-arms recvs that ran out of buffers, while there are buffers to spare.
    fn feed_starved(&mut self) {
        let spare = (self.snap.config.server.buffers_per_shard as usize / 4).max(1);
        while self.bufs.available() > spare {
            let Some((key, gen, side)) = self.starved.pop_front() else {
                break;
            };
            let Some(e) = self.conns.get_mut(key) else {
                continue;
            };
            if e.gen != gen || e.closing {
                continue;
            }
            e.conn.on_buffers_available(side, &mut self.actions);
            self.exec(key);
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
                    for l in self.listeners.iter().flatten() {
                        configure(&SockRef::from(&l.sock), &self.snap);
                    }
                }
                Command::AddListeners(socks) => {
                    for sock in socks {
                        configure(&SockRef::from(&sock), &self.snap);
                        self.listeners.push(Some(listener(sock)));
                        self.arm_accept(self.listeners.len() - 1);
                    }
                }
                Command::RemoveListeners(addrs) => {
                    for i in 0..self.listeners.len() {
                        if self.listeners[i]
                            .as_ref()
                            .is_some_and(|l| addrs.contains(&l.addr))
                        {
                            self.close_listener(i);
                        }
                    }
                }
                Command::Drain => {
                    self.draining = true;
                    for i in 0..self.listeners.len() {
                        self.close_listener(i);
                    }
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        if let Some(e) = self.conns.get_mut(key) {
                            e.conn.drain_idle(&mut self.actions);
                            self.exec(key);
                        }
                    }
                }
                Command::CloseAll => {
                    self.draining = true;
                    for i in 0..self.listeners.len() {
                        self.close_listener(i);
                    }
                    let keys: Vec<usize> = self
                        .conns
                        .iter()
                        .filter(|(_, e)| !e.closing)
                        .map(|(k, _)| k)
                        .collect();
                    for key in keys {
                        self.conns[key].conn.drain_close(&mut self.actions);
                        self.exec(key);
                    }
                }
            }
        }
        if !self.stopping {
            let wake_fd = self.wake.as_raw_fd();
            self.uring
                .read_eventfd(wake_fd, &mut self.wake_buf, ud(OP_WAKE, Side::Client, 0));
        }
    }
}

fn listener(sock: TcpListener) -> Listener {
    let addr = sock.local_addr().expect("a bound listener has an address");
    Listener {
        sock,
        addr,
        closing: false,
        armed: false,
    }
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

fn meta(m: &std::fs::Metadata) -> files::Meta {
    use std::os::unix::fs::MetadataExt;
    let ft = m.file_type();
    files::Meta {
        kind: if ft.is_file() {
            files::Kind::File
        } else if ft.is_dir() {
            files::Kind::Dir
        } else {
            files::Kind::Other
        },
        size: m.len(),
        mtime: m.modified().unwrap_or(std::time::UNIX_EPOCH),
        dev: m.dev(),
        ino: m.ino(),
    }
}

/// Gives the direction towards `dst` a pipe if it has none: a spare one, or
/// a new one. False if the kernel refuses (descriptors, pipe quota).
fn take_pipe(e: &mut Entry, spare: &mut Vec<ring::Pipe>, dst: Side) -> bool {
    if e.pipes[dst.idx()].is_some() {
        return true;
    }
    let pipe = match spare.pop() {
        Some(p) => Ok(p),
        None => ring::Pipe::new(crate::conn::SPLICE_CHUNK),
    };
    match pipe {
        Ok(p) => {
            e.pipes[dst.idx()] = Some(p);
            true
        }
        Err(err) => {
            log::debug!("no pipe for splice: {err}");
            false
        }
    }
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
