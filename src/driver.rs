//! The I/O driver: the one owner of everything the kernel borrows.
//!
//! A [`Driver`] holds the ring, the provided-buffer ring, the listeners, the
//! wake eventfd and its read buffer, and one [`Slot`] per connection with
//! that connection's I/O state: its sockets, the static file and the one
//! just opened, the pipes a splice uses, the boxed memory an op points
//! into (connect address, `openat2` request), the generation, and how many
//! ops are in flight on each side and on the file. The connection itself
//! (`T`, the shard's session) lives in the slot too, so memory it lends to
//! a send or a file read lives exactly as long as the slot.
//!
//! # Ownership rules
//! - **Nothing is freed or closed with an op in flight.** A slot is removed
//!   only by [`Driver::free`], which refuses while any count is non-zero. A
//!   socket, file or pipe replaced or given up while an op may still use it
//!   is *retired* into the slot and dropped when its count reaches zero.
//!   Every op the driver pushes is counted before the push and uncounted
//!   by the completion that ends it (`route`).
//! - **Unsafe stays here and in `ring`.** `ring` marks every function whose
//!   memory or descriptor the kernel uses after the call as `unsafe fn`.
//!   This module makes those calls, each in one statement with
//!   `#[allow(unsafe_code)]` and a `// SAFETY:` note, and offers safe
//!   methods instead: the invariants those notes rely on are the rules
//!   above, which only this type can break. The one promise it cannot keep
//!   by itself is that memory the connection lends (a queued payload, the
//!   static answer buffer) stays put until the op's completion; that is
//!   the `unsafe trait` [`Lender`], implemented once, by the shard.
//! - **Shutdown waits for the kernel.** [`Driver::shutdown`] (also run on
//!   drop, so a panic or an error return takes the same path) cancels every
//!   op and reads completions until none is in flight, for at most
//!   [`SHUTDOWN_LIMIT`]; if the kernel has not let go by then, the ring,
//!   the buffers and every slot are leaked rather than freed. Closing a
//!   ring tears it down asynchronously, so drop order proves nothing.
//!
//! # `user_data`
//! ```text
//!  63..56  op     1 accept, 2 recv, 3 send, 4 connect, 5 cancel, 6 wake,
//!                 7 open (static file), 8 read (static file),
//!                 9 poll in, 10 poll out, 11 file splice (file → pipe)
//!  55..48  side   0 client, 1 backend
//!  47..32  gen    low 16 bits of the slot's generation (0 for accept, wake)
//!  31..0   key    slab key of the slot (accept: listener index)
//! ```
//! A completion whose slot is gone or whose generation differs is *stale*:
//! it is counted (`stale_completions`), never delivered, and a provided
//! buffer it carries goes straight back to the ring (an `openat2` result is
//! closed). With the rules above none should ever occur; the check makes a
//! bookkeeping bug a counter, not a write into another connection. Cancel
//! completions carry no news and are never delivered.
//!
//! # Events
//! [`Driver::reap`] turns completions into [`Routed`] values: accepts,
//! wake-ups, and per-slot [`Event`]s, which the shard hands to the
//! connection state machine.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use slab::Slab;
use socket2::{SockAddr, SockRef};

use crate::conn::Side;
use crate::files;
use crate::ring::{self, BufRing, Cqe, Pipe, Uring};
use crate::stats::ShardStats;

mod events;
mod file_ops;
#[cfg(test)]
mod tests;

#[cfg(test)]
use events::{verdict, Verdict};
pub use events::{Event, Op, Routed, Ud};

/// How long a shutdown waits for the kernel to hand back every op.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(2);

/// Empty pipes kept for the next splice.
const SPARE_PIPES: usize = 64;

/// Where the bytes of a send come from.
#[derive(Debug, Clone, Copy)]
pub enum Lent {
    /// A provided buffer the connection holds.
    Ring { bid: u16, start: u32, len: u32 },
    /// Memory the connection owns.
    Memory { ptr: *const u8, len: usize },
}

/// Memory a connection lends the kernel for its sends and file reads.
///
/// # Safety
/// An implementor promises that:
/// - [`Lender::send_source`] for `side` describes bytes that stay
///   allocated, unmoved and unwritten until the [`Event::Send`] for that
///   side is handed back to it (or, for `Lent::Ring`, a buffer it does not
///   release before then);
/// - [`Lender::read_target`] returns `len` writable bytes that nothing reads,
///   writes, moves or frees until the [`Event::FileRead`] is handed back.
///
/// Memory owned by `self` qualifies: the driver keeps `self` in its slot
/// until every op of the slot has completed.
#[allow(unsafe_code)]
pub unsafe trait Lender {
    fn send_source(&self, side: Side) -> Lent;
    fn read_target(&mut self, at: usize, len: usize) -> *mut u8;
}

/// Something dropped only once no op can use it any more. Never read:
/// holding it is the point.
#[allow(dead_code)]
enum Retired {
    Socket(OwnedFd),
    File(File),
    Pipe(Pipe),
}

/// Descriptors given up while an op may still use them, closed once their
/// side's ops are all back.
#[derive(Default)]
struct Retirees {
    /// Backend sockets (a retry replaced them, or the connection dropped them).
    backend: Vec<Retired>,
    /// Files and pipes, after a file op.
    file: Vec<Retired>,
}

struct Slot<T> {
    data: T,
    gen: u32,
    client: OwnedFd,
    backend: Option<OwnedFd>,
    /// The address a connect reads until its completion.
    connect_addr: Option<Box<SockAddr>>,
    /// Ops in flight per side (recv, send, connect, poll).
    inflight: [u32; 2],
    /// File ops (open, read, file splice) in flight.
    inflight_file: u32,
    /// The file a static answer reads from, and one just opened that the
    /// connection has not adopted yet.
    file: Option<File>,
    opened: Option<File>,
    /// What an `openat2` in flight reads.
    open_req: Option<Box<(files::OpenReq, ring::OpenHow)>>,
    /// The backend socket closes once no op uses it, then the connection
    /// hears of it (a retry).
    release_backend: bool,
    /// The pipe of each direction that is splicing, by destination side.
    pipes: [Option<Pipe>; 2],
    /// What was given up with ops still in flight. Rare, so one pointer
    /// per slot rather than two vectors (idle memory counts per session).
    retired: Option<Box<Retirees>>,
    closing: bool,
}

impl<T> Slot<T> {
    fn fd(&self, side: Side) -> Option<RawFd> {
        match side {
            Side::Client => Some(self.client.as_raw_fd()),
            Side::Backend => self.backend.as_ref().map(|f| f.as_raw_fd()),
        }
    }

    fn sock(&self, side: Side) -> Option<&OwnedFd> {
        match side {
            Side::Client => Some(&self.client),
            Side::Backend => self.backend.as_ref(),
        }
    }

    /// Drops what was retired once nothing can use it.
    fn settle(&mut self) {
        let Some(r) = &mut self.retired else { return };
        if self.inflight[Side::Backend.idx()] == 0 {
            r.backend.clear();
        }
        if self.inflight_file == 0 {
            r.file.clear();
        }
        if r.backend.is_empty() && r.file.is_empty() {
            self.retired = None;
        }
    }

    fn retirees(&mut self) -> &mut Retirees {
        self.retired.get_or_insert_with(Box::default)
    }

    fn idle(&self) -> bool {
        self.inflight == [0, 0] && self.inflight_file == 0
    }
}

/// A slot taken out of the driver ([`Driver::take`]).
pub struct Taken<T> {
    pub data: T,
    pub client: OwnedFd,
    pub backend: Option<OwnedFd>,
    /// The pipes of splicing directions, by destination side, with what
    /// they still hold.
    pub pipes: [Option<Pipe>; 2],
}

struct Listener {
    sock: TcpListener,
    addr: SocketAddr,
    /// Its accept is being cancelled; dropped when the accept ends.
    closing: bool,
    /// A multishot accept is in flight.
    armed: bool,
    /// Not accepting for now (a hand-off in progress); the socket stays,
    /// and its accept queue with it, for another process or for later.
    paused: bool,
}

/// Kernel-borrowed state that a failed shutdown leaks instead of freeing.
struct Keep<X>(Option<X>);

impl<X> Keep<X> {
    fn leak(&mut self) {
        std::mem::forget(self.0.take());
    }
}

impl<X> std::ops::Deref for Keep<X> {
    type Target = X;
    fn deref(&self) -> &X {
        self.0
            .as_ref()
            .expect("the driver was used after its shutdown")
    }
}

impl<X> std::ops::DerefMut for Keep<X> {
    fn deref_mut(&mut self) -> &mut X {
        self.0
            .as_mut()
            .expect("the driver was used after its shutdown")
    }
}

pub struct Driver<T> {
    ring: Keep<Uring>,
    bufs: Keep<BufRing>,
    slots: Slab<Slot<T>>,
    next_gen: u32,
    listeners: Vec<Option<Listener>>,
    wake: OwnedFd,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    spare_pipes: Vec<Pipe>,
    stats: Arc<ShardStats>,
    cqes: Vec<Cqe>,
    /// `shutdown` ran; nothing may be submitted any more.
    shut: bool,
}

impl<T> Driver<T> {
    /// A ring of `entries` SQEs and a pool of `nbufs` buffers of
    /// `buf_size` bytes, on the calling thread (the ring is single-issuer).
    pub fn new(
        entries: u32,
        nbufs: u16,
        buf_size: u32,
        wake: OwnedFd,
        stats: Arc<ShardStats>,
    ) -> std::io::Result<Driver<T>> {
        let ring = Uring::new(entries)?;
        // SAFETY: the BufRing is kept next to the ring in this driver, which
        // frees it only after `shutdown` reaped every op (or leaks it).
        #[allow(unsafe_code)]
        let bufs = unsafe { ring.buf_ring(0, nbufs, buf_size) }?;
        Ok(Driver {
            ring: Keep(Some(ring)),
            bufs: Keep(Some(bufs)),
            slots: Slab::new(),
            next_gen: 0,
            listeners: Vec::new(),
            wake,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            spare_pipes: Vec::new(),
            stats,
            cqes: Vec::with_capacity(256),
            shut: false,
        })
    }

    pub fn mode(&self) -> ring::Mode {
        self.ring.mode
    }

    /// Ops submitted whose last completion has not been read.
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    // ---- slots ----

    /// Takes a new connection's socket and state; returns its key.
    pub fn insert(&mut self, client: OwnedFd, data: T) -> usize {
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        let key = self.slots.insert(Slot {
            data,
            gen,
            client,
            backend: None,
            connect_addr: None,
            inflight: [0, 0],
            inflight_file: 0,
            file: None,
            opened: None,
            open_req: None,
            release_backend: false,
            pipes: [None, None],
            retired: None,
            closing: false,
        });
        assert!(key <= u32::MAX as usize);
        key
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn keys(&self) -> Vec<usize> {
        self.slots.iter().map(|(k, _)| k).collect()
    }

    pub fn get(&self, key: usize) -> Option<&T> {
        self.slots.get(key).map(|s| &s.data)
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.slots.get_mut(key).map(|s| &mut s.data)
    }

    /// The buffer pool, to read what connections hold.
    pub fn bufs(&self) -> &BufRing {
        &self.bufs
    }

    /// The connection and the buffer pool, to read what a recv delivered.
    pub fn with_bufs(&mut self, key: usize) -> Option<(&mut T, &BufRing)> {
        let bufs = &*self.bufs;
        self.slots.get_mut(key).map(|s| (&mut s.data, bufs))
    }

    /// The slot's generation (timers carry it; see the module doc).
    pub fn gen(&self, key: usize) -> Option<u32> {
        self.slots.get(key).map(|s| s.gen)
    }

    pub fn is_closing(&self, key: usize) -> bool {
        self.slots.get(key).is_some_and(|s| s.closing)
    }

    /// Takes a live slot with nothing in flight out of the driver, with its
    /// sockets and pipes, none of them closed: a session leaving this
    /// process (hand-off). `None` (and the slot stays) while any op, file
    /// or retired descriptor is still the kernel's.
    pub fn take(&mut self, key: usize) -> Option<Taken<T>> {
        let s = self.slots.get(key)?;
        if s.closing
            || !s.idle()
            || s.retired.is_some()
            || s.file.is_some()
            || s.opened.is_some()
            || s.release_backend
        {
            return None;
        }
        let s = self.slots.remove(key);
        Some(Taken {
            data: s.data,
            client: s.client,
            backend: s.backend,
            pipes: s.pipes,
        })
    }

    /// Gives a slot (a session arriving from another process, or coming
    /// back after a failed hand-off) its already connected backend socket.
    pub fn attach_backend(&mut self, key: usize, sock: OwnedFd) {
        let s = slot_mut(&mut self.slots, self.shut, key);
        assert!(s.backend.is_none(), "the slot has a backend socket");
        s.backend = Some(sock);
    }

    /// A slot with no op in flight.
    pub fn is_idle(&self, key: usize) -> bool {
        self.slots.get(key).is_some_and(|s| s.idle())
    }

    /// Removes a closed slot with nothing in flight and returns its
    /// connection; `None` (and the slot stays) otherwise. Its sockets,
    /// file and pipes close here.
    pub fn free(&mut self, key: usize) -> Option<T> {
        let s = self.slots.get(key)?;
        if !s.closing || !s.idle() {
            return None;
        }
        Some(self.slots.remove(key).data)
    }

    fn ud(&self, op: Op, side: Side, key: usize) -> u64 {
        let gen = self.slots.get(key).map_or(0, |s| s.gen as u16);
        Ud {
            op,
            side,
            gen,
            key: key as u32,
        }
        .encode()
    }

    // ---- buffers ----

    /// Publishes released buffers to the kernel.
    pub fn commit(&mut self) {
        self.bufs.commit();
    }

    pub fn available(&self) -> usize {
        self.bufs.available()
    }

    /// Gives a buffer the connection is done with back to the ring.
    pub fn release(&mut self, bid: u16) {
        // SAFETY: a connection gives a buffer back only once no send reads
        // it: after the send that forwarded it completed, or when it never
        // went out (`conn` releases on `on_send`, on unpinning after the
        // cancel completed, and in `into_buffers` once the slot is freed).
        // A broken promise would garble relayed bytes, never free memory
        // the kernel uses: the pool lives until shutdown reaps every op.
        #[allow(unsafe_code)]
        unsafe {
            self.bufs.release(bid)
        };
    }

    // ---- listeners and wake ----

    pub fn add_listener(&mut self, sock: TcpListener) -> usize {
        let addr = sock.local_addr().expect("a bound listener has an address");
        self.listeners.push(Some(Listener {
            sock,
            addr,
            closing: false,
            armed: false,
            paused: false,
        }));
        self.listeners.len() - 1
    }

    /// Open listeners: index, socket, address.
    pub fn listeners(&self) -> impl Iterator<Item = (usize, &TcpListener, SocketAddr)> {
        self.listeners
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().map(|l| (i, &l.sock, l.addr)))
    }

    pub fn no_listeners(&self) -> bool {
        self.listeners.iter().all(Option::is_none)
    }

    pub fn arm_accept(&mut self, i: usize) {
        assert!(!self.shut, "an accept after the driver's shutdown");
        let ud = Ud {
            op: Op::Accept,
            side: Side::Client,
            gen: 0,
            key: i as u32,
        }
        .encode();
        if let Some(l) = &mut self.listeners[i] {
            if !l.closing && !l.armed && !l.paused {
                l.armed = true;
                // SAFETY: the listener's socket is dropped only when its
                // accept's last completion arrives (`close_listener`,
                // `route_accept`), or after shutdown reaped it.
                #[allow(unsafe_code)]
                unsafe {
                    self.ring.accept_multi(l.sock.as_raw_fd(), ud)
                };
            }
        }
    }

    /// Cancels a listener's accept; the socket closes when the accept ends.
    pub fn close_listener(&mut self, i: usize) {
        let ud = Ud {
            op: Op::Cancel,
            side: Side::Client,
            gen: 0,
            key: i as u32,
        }
        .encode();
        if let Some(l) = &mut self.listeners[i] {
            if !l.armed {
                // Backing off after an error: nothing in flight, close now.
                self.listeners[i] = None;
            } else if !l.closing {
                l.closing = true;
                self.ring.cancel_fd(l.sock.as_raw_fd(), ud);
            }
        }
    }

    /// Stops accepting on every listener but keeps the sockets open: their
    /// accept queues stay for whoever accepts on the same sockets (the new
    /// process of a hand-off), or for this shard again after
    /// [`Driver::resume_listeners`]. A connection the accept already took
    /// when the cancel landed is delivered as usual.
    pub fn pause_listeners(&mut self) {
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let Some(l) = l else { continue };
            if l.closing || l.paused {
                continue;
            }
            l.paused = true;
            if l.armed {
                let ud = Ud {
                    op: Op::Cancel,
                    side: Side::Client,
                    gen: 0,
                    key: i as u32,
                }
                .encode();
                self.ring.cancel_fd(l.sock.as_raw_fd(), ud);
            }
        }
    }

    /// Accepts again after [`Driver::pause_listeners`].
    pub fn resume_listeners(&mut self) {
        let paused: Vec<usize> = (self.listeners.iter().enumerate())
            .filter(|(_, l)| l.as_ref().is_some_and(|l| l.paused))
            .map(|(i, _)| i)
            .collect();
        for i in paused {
            if let Some(l) = &mut self.listeners[i] {
                l.paused = false;
            }
            self.arm_accept(i);
        }
    }

    /// Keeps a read armed on the wake eventfd.
    pub fn arm_wake(&mut self) {
        if self.wake_armed || self.shut {
            return;
        }
        self.wake_armed = true;
        let ud = Ud {
            op: Op::Wake,
            side: Side::Client,
            gen: 0,
            key: 0,
        }
        .encode();
        // SAFETY: the buffer is boxed in the driver and the eventfd owned
        // by it; both live until shutdown reaped this read (or are leaked).
        #[allow(unsafe_code)]
        unsafe {
            self.ring
                .read_eventfd(self.wake.as_raw_fd(), &mut self.wake_buf, ud)
        };
    }

    // ---- ops on a slot ----

    pub fn arm_recv(&mut self, key: usize, side: Side) {
        let ud = self.ud(Op::Recv, side, key);
        let bgid = self.bufs.bgid;
        let s = slot_mut(&mut self.slots, self.shut, key);
        let fd = s.fd(side).expect("recv on a side without a socket");
        s.inflight[side.idx()] += 1;
        // SAFETY: the socket is owned by the slot, which is freed (and a
        // backend socket retired) only once this op's last completion was
        // counted; the buffer ring outlives every op (module doc).
        #[allow(unsafe_code)]
        unsafe {
            self.ring.recv_multi(fd, bgid, ud)
        };
    }

    /// Cancels the op of kind `op` on `side` by its `user_data`.
    pub fn cancel(&mut self, key: usize, op: Op, side: Side) {
        let target = self.ud(op, side, key);
        let ud = self.ud(Op::Cancel, side, key);
        self.ring.cancel(target, ud);
    }

    pub fn send(&mut self, key: usize, side: Side)
    where
        T: Lender,
    {
        let ud = self.ud(Op::Send, side, key);
        let s = &mut self.slots[key];
        assert!(!self.shut, "an op after the driver's shutdown");
        let fd = s.fd(side).expect("send on a side without a socket");
        let (ptr, len) = match s.data.send_source(side) {
            Lent::Ring { bid, start, len } => {
                assert!(
                    self.bufs.is_ours(bid),
                    "sending from buffer {bid}, which the kernel holds"
                );
                assert!(start + len <= self.bufs.buf_size());
                (self.bufs.ptr(bid, start), len as usize)
            }
            Lent::Memory { ptr, len } => (ptr, len),
        };
        s.inflight[side.idx()] += 1;
        // SAFETY: the bytes are a held provided buffer (checked above; the
        // pool lives until every op is reaped) or memory the connection
        // lends under `Lender`'s contract until this send's event; the
        // socket lives in the slot, which outlives the op (module doc).
        #[allow(unsafe_code)]
        unsafe {
            self.ring.send(fd, ptr, len, ud)
        };
    }

    /// Starts connecting `sock` (the new backend socket) to `addr`.
    pub fn connect(&mut self, key: usize, sock: OwnedFd, addr: SocketAddr) {
        let ud = self.ud(Op::Connect, Side::Backend, key);
        let s = slot_mut(&mut self.slots, self.shut, key);
        let sa = Box::new(SockAddr::from(addr));
        let fd = sock.as_raw_fd();
        if let Some(old) = s.backend.replace(sock) {
            if s.inflight[Side::Backend.idx()] > 0 {
                s.retirees().backend.push(Retired::Socket(old));
            }
        }
        s.inflight[Side::Backend.idx()] += 1;
        // SAFETY: the address is boxed in the slot until this op's
        // completion (`route` drops it there); the socket is the slot's
        // backend, retired rather than closed while ops use it.
        #[allow(unsafe_code)]
        unsafe {
            self.ring.connect(fd, &sa, ud)
        };
        s.connect_addr = Some(sa);
    }

    /// Closes the backend socket, which has no op in flight (the
    /// connection says so); one that still has is retired instead.
    pub fn drop_backend(&mut self, key: usize) {
        let s = slot_mut(&mut self.slots, self.shut, key);
        debug_assert_eq!(s.inflight[Side::Backend.idx()], 0);
        if let Some(fd) = s.backend.take() {
            if s.inflight[Side::Backend.idx()] > 0 {
                s.retirees().backend.push(Retired::Socket(fd));
            }
        }
    }

    /// Shuts the backend socket down and cancels its ops; with `release`,
    /// it closes once they are back and the connection hears of it
    /// ([`Driver::backend_released`]).
    pub fn abort_backend(&mut self, key: usize, release: bool) {
        let ud = self.ud(Op::Cancel, Side::Backend, key);
        let s = slot_mut(&mut self.slots, self.shut, key);
        if let Some(fd) = &s.backend {
            let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Both);
            if s.inflight[Side::Backend.idx()] > 0 {
                self.ring.cancel_fd(fd.as_raw_fd(), ud);
            }
        }
        if release {
            s.release_backend = true;
        }
    }

    /// True once: the backend socket being released has no op left and is
    /// closed now, so a new one may take its place.
    pub fn backend_released(&mut self, key: usize) -> bool {
        let Some(s) = self.slots.get_mut(key) else {
            return false;
        };
        if s.release_backend && s.inflight[Side::Backend.idx()] == 0 {
            s.release_backend = false;
            s.backend = None;
            return true;
        }
        false
    }

    /// SO_LINGER 0: the socket's close sends a reset.
    pub fn reset_on_close(&mut self, key: usize, side: Side) {
        if let Some(fd) = slot_mut(&mut self.slots, self.shut, key).sock(side) {
            let _ = SockRef::from(fd).set_linger(Some(Duration::ZERO));
        }
    }

    pub fn shutdown_write(&mut self, key: usize, side: Side) {
        if let Some(fd) = slot_mut(&mut self.slots, self.shut, key).sock(side) {
            let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Write);
        }
    }

    /// Marks the slot closing: both sockets shut down and their ops
    /// cancelled. It is freed once every op is back ([`Driver::free`]).
    pub fn close(&mut self, key: usize) {
        let uds = [Side::Client, Side::Backend].map(|side| self.ud(Op::Cancel, side, key));
        let s = slot_mut(&mut self.slots, self.shut, key);
        s.closing = true;
        for side in [Side::Client, Side::Backend] {
            if let Some(fd) = s.sock(side) {
                // shutdown() wakes pending recvs with EOF and makes the FIN
                // go out; the cancel covers ops shutdown does not end.
                let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Both);
                if s.inflight[side.idx()] > 0 {
                    self.ring.cancel_fd(fd.as_raw_fd(), uds[side.idx()]);
                }
            }
        }
    }

    /// A one-shot poll for readability (`POLLIN|POLLRDHUP`) or writability.
    pub fn poll(&mut self, key: usize, side: Side, readable: bool) {
        let (op, mask) = if readable {
            (Op::PollIn, (libc::POLLIN | libc::POLLRDHUP) as u32)
        } else {
            (Op::PollOut, libc::POLLOUT as u32)
        };
        let ud = self.ud(op, side, key);
        let s = slot_mut(&mut self.slots, self.shut, key);
        let fd = s.fd(side).expect("poll on a side without a socket");
        s.inflight[side.idx()] += 1;
        // SAFETY: the socket lives in the slot until this op is counted back.
        #[allow(unsafe_code)]
        unsafe {
            self.ring.poll(fd, mask, ud)
        };
    }

    // ---- shutdown ----

    /// Cancels every op and reaps the completions before anything they
    /// use is freed; leaks what the kernel may still use if it has not let
    /// go within [`SHUTDOWN_LIMIT`]. True if nothing was left in flight.
    /// Idempotent; no op may be submitted afterwards.
    pub fn shutdown(&mut self) -> bool {
        if self.shut {
            return self.ring.0.as_ref().is_some_and(|r| r.in_flight() == 0);
        }
        self.shut = true;
        let mut done = Vec::new();
        let cancel = Ud {
            op: Op::Cancel,
            side: Side::Client,
            gen: 0,
            key: 0,
        }
        .encode();
        let reaped = self.ring.quiesce(cancel, SHUTDOWN_LIMIT, |c| done.push(c));
        for cqe in done {
            // Book each one (counts, buffers, descriptors) and deliver
            // nothing: the connections are going away with the shard.
            if let Routed::Slot { first, then, .. } = self.route(cqe) {
                for ev in std::iter::once(first).chain(then) {
                    if let Event::Recv { bid, .. } = ev {
                        self.release(bid);
                    }
                }
            }
        }
        let left = self.ring.in_flight();
        self.stats.ops_in_flight.set(left as u64);
        if !reaped {
            log::error!(
                "shard shutdown: {left} io_uring ops still in flight after {SHUTDOWN_LIMIT:?}; \
                 leaking the ring, the buffer pool and {} connection slots rather than \
                 freeing memory the kernel may still use",
                self.slots.len()
            );
            self.ring.leak();
            self.bufs.leak();
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
            std::mem::forget(std::mem::take(&mut self.listeners));
        }
        reaped
    }
}

impl<T> Drop for Driver<T> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The slot an op is about to use; no op may start after shutdown.
fn slot_mut<T>(slots: &mut Slab<Slot<T>>, shut: bool, key: usize) -> &mut Slot<T> {
    assert!(!shut, "an op after the driver's shutdown");
    &mut slots[key]
}
