//! The only module that builds SQEs and the only one with `unsafe`.
//!
//! Ownership while the kernel holds a pointer:
//! - Provided buffers live in one anonymous mapping owned by [`BufRing`]. The
//!   kernel writes into a buffer only while it sits in the ring; a CQE hands
//!   it to us, and [`BufRing::release`] hands it back. The shard drops the
//!   `BufRing` only after its ring has been torn down (field order in
//!   `Shard`), so the kernel never writes into unmapped memory.
//! - Bytes a send reads and the address a connect reads are heap allocations
//!   owned by the connection's slab slot (`Vec<u8>`, `Box<SockAddr>`); heap
//!   data does not move when the slab grows. The shard frees a slot only
//!   when every op it submitted for that slot has completed (it counts them),
//!   and cancels and waits rather than freeing early.
//! - A file read writes into the static answer's buffer (`files::Serve::buf`),
//!   owned by the same slot and never resized while a read is in flight; an
//!   `openat2` reads a path and an `OpenHow` boxed in the slot until its CQE.
//! - Sockets are `OwnedFd`s in the same slot, closed under the same rule; a
//!   `close()` with an op pending would not even send a FIN, which is why
//!   the shard cancels first.
//!
//! `user_data` is built by the shard (see `shard::Ud`); this module treats it
//! as opaque.
//!
//! [`probe`] exercises every feature the shards use once at startup.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

pub mod probe;
pub use probe::probe;

/// The `open_how` of an `openat2`, kept by the caller until its CQE.
pub type OpenHow = types::OpenHow;

/// A completion, copied out of the CQ ring.
#[derive(Debug, Clone, Copy)]
pub struct Cqe {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Cqe {
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// How the ring was set up; logged at start so a benchmark knows what ran.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    SingleIssuerDeferTaskrun,
    CoopTaskrun,
    Plain,
}

pub struct Uring {
    ring: IoUring,
    pub mode: Mode,
}

impl Uring {
    /// Creates a ring for the calling thread, with the cheapest task-run
    /// mode the kernel accepts.
    pub fn new(entries: u32) -> io::Result<Uring> {
        let cq = entries * 8;
        type Setup = fn(&mut io_uring::Builder);
        let attempts: [(Mode, Setup); 3] = [
            (Mode::SingleIssuerDeferTaskrun, |b| {
                b.setup_single_issuer().setup_defer_taskrun();
            }),
            (Mode::CoopTaskrun, |b| {
                b.setup_coop_taskrun();
            }),
            (Mode::Plain, |_| {}),
        ];
        let mut last = None;
        for (mode, f) in attempts {
            let mut b = IoUring::builder();
            b.setup_cqsize(cq).setup_submit_all();
            f(&mut b);
            match b.build(entries) {
                Ok(ring) => return Ok(Uring { ring, mode }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("io_uring setup failed")))
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry built below points only at memory that
            // outlives the op, by the ownership rules in the module doc:
            // provided buffers (owned by BufRing, dropped after the ring),
            // heap data owned by a slab slot that is freed only after all its
            // ops completed, and the eventfd buffer boxed inside the shard.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            // The SQ is full: hand what is there to the kernel and retry.
            // SUBMIT_ALL makes the kernel take every entry, so one call frees
            // the whole queue.
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    panic!("io_uring submit failed with a full SQ: {e}");
                }
            }
        }
    }

    pub fn accept_multi(&mut self, listener: RawFd, ud: u64) {
        let e = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud);
        self.push(e);
    }

    pub fn recv_multi(&mut self, fd: RawFd, bgid: u16, ud: u64) {
        let e = opcode::RecvMulti::new(types::Fd(fd), bgid)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Sends `len` bytes at `ptr`. The caller keeps that memory alive and
    /// unmoved until this op's CQE (module doc).
    pub fn send(&mut self, fd: RawFd, ptr: *const u8, len: usize, ud: u64) {
        let e = opcode::Send::new(types::Fd(fd), ptr, len as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Connects `fd` to `addr`; `addr` is boxed in the caller's slot until the CQE.
    pub fn connect(&mut self, fd: RawFd, addr: &socket2::SockAddr, ud: u64) {
        let e = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Cancels every op on `fd`.
    /// `openat2` relative to `dir`. `path` and `how` must stay where they
    /// are until the CQE (the shard boxes them in the connection's slot).
    pub fn openat2(&mut self, dir: RawFd, path: &CStr, how: &types::OpenHow, ud: u64) {
        let e = opcode::OpenAt2::new(types::Fd(dir), path.as_ptr(), how)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Reads a regular file at `offset` into `ptr..ptr+len`, which must stay
    /// allocated and untouched until the CQE.
    pub fn read(&mut self, fd: RawFd, ptr: *mut u8, len: usize, offset: u64, ud: u64) {
        let e = opcode::Read::new(types::Fd(fd), ptr, len as u32)
            .offset(offset)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Moves up to `len` bytes of regular file `fd` at `offset` into `pipe`
    /// (page references, no copy). From the page cache it completes at
    /// once; a read that must wait for the disk runs in the kernel's io-wq,
    /// not on the shard thread. No user memory is involved; the file and the
    /// pipe belong to the connection's slab slot, freed only after its ops.
    pub fn splice_file(&mut self, fd: RawFd, offset: u64, pipe: &Pipe, len: u32, ud: u64) {
        let e = opcode::Splice::new(
            types::Fd(fd),
            offset as i64,
            types::Fd(pipe.w.as_raw_fd()),
            -1,
            len,
        )
        .build()
        .user_data(ud);
        self.push(e);
    }

    /// A one-shot readiness poll (`POLLIN`, `POLLOUT`, ...).
    pub fn poll(&mut self, fd: RawFd, mask: u32, ud: u64) {
        let e = opcode::PollAdd::new(types::Fd(fd), mask)
            .build()
            .user_data(ud);
        self.push(e);
    }

    pub fn cancel_fd(&mut self, fd: RawFd, ud: u64) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Cancels the op submitted with `target`.
    pub fn cancel(&mut self, target: u64, ud: u64) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target))
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Reads 8 bytes from an eventfd into `buf`, which the caller keeps boxed
    /// for the life of the ring.
    pub fn read_eventfd(&mut self, fd: RawFd, buf: &mut [u8; 8], ud: u64) {
        let e = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Submits pending SQEs and waits for at least one completion or `timeout`.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let res = match timeout {
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Moves up to `out.capacity()` completions into `out`.
    pub fn completions(&mut self, out: &mut Vec<Cqe>) {
        out.clear();
        let cap = out.capacity().max(64);
        for c in self.ring.completion().take(cap) {
            out.push(Cqe {
                user_data: c.user_data(),
                result: c.result(),
                flags: c.flags(),
            });
        }
    }

    pub fn buf_ring(&self, bgid: u16, entries: u16, buf_size: u32) -> io::Result<BufRing> {
        BufRing::new(&self.ring, bgid, entries, buf_size)
    }
}

/// A provided-buffer ring: `entries` buffers of `buf_size` bytes that the
/// kernel picks from when a multishot recv has data, so an idle socket holds
/// no buffer at all.
pub struct BufRing {
    /// The ring of `io_uring_buf` entries shared with the kernel.
    entries_map: Mapping,
    /// The buffers themselves, touched (and so resident) only once used.
    bufs: Mapping,
    mask: u16,
    buf_size: u32,
    tail: u16,
    pub bgid: u16,
    /// Buffers we hold (between a CQE and `release`).
    held: usize,
    entries: u16,
}

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn anon(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping with no address hint touches
        // no existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from a successful mmap and are unmapped
        // once; BufRing is dropped after its io_uring (module doc).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

impl BufRing {
    fn new(ring: &IoUring, bgid: u16, entries: u16, buf_size: u32) -> io::Result<BufRing> {
        assert!(entries.is_power_of_two());
        let entries_map =
            Mapping::anon(entries as usize * std::mem::size_of::<types::BufRingEntry>())?;
        let bufs = Mapping::anon(entries as usize * buf_size as usize)?;
        // SAFETY: the entry ring mapping is page aligned, sized for
        // `entries`, and lives in this BufRing, which the shard drops only
        // after the io_uring it is registered with.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries_map.ptr as u64,
                entries,
                bgid,
                0,
            )?;
        }
        let mut br = BufRing {
            entries_map,
            bufs,
            mask: entries - 1,
            buf_size,
            tail: 0,
            bgid,
            held: entries as usize,
            entries,
        };
        for bid in 0..entries {
            br.prefault(bid);
            br.release(bid);
        }
        br.commit();
        Ok(br)
    }

    /// Touches the first page of a buffer before the kernel gets it. Small
    /// messages never reach past it, so small-message traffic takes no page
    /// faults on the data path, and the pool's resident memory is paid once
    /// at start instead of showing up, page by page, as the first few
    /// thousand connections arrive (which made idle connections look ~1 KB
    /// dearer than they are).
    fn prefault(&mut self, bid: u16) {
        // SAFETY: the buffer lies inside our mapping and has not been given
        // to the kernel yet (this runs before its first `release`).
        unsafe {
            self.buf_ptr(bid).write_volatile(0);
        }
    }

    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// Buffers currently in the kernel's hands, free to be picked.
    pub fn available(&self) -> usize {
        self.entries as usize - self.held
    }

    /// Records that a CQE handed us `bid`.
    pub fn taken(&mut self, _bid: u16) {
        self.held += 1;
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid <= self.mask);
        // In bounds: bid < entries and the mapping holds entries * buf_size.
        self.bufs
            .ptr
            .wrapping_add(bid as usize * self.buf_size as usize)
    }

    /// The bytes a recv CQE delivered in `bid`.
    pub fn data(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid <= self.mask && len <= self.buf_size as usize);
        // SAFETY: the CQE gave `bid` to us, so the kernel no longer writes
        // to it until `release`; `len` bytes were written by the kernel and
        // lie inside the mapping.
        unsafe { std::slice::from_raw_parts(self.buf_ptr(bid), len) }
    }

    /// Address of byte `start` of buffer `bid`, for a send.
    pub fn ptr(&self, bid: u16, start: u32) -> *const u8 {
        assert!(bid <= self.mask && start <= self.buf_size);
        self.buf_ptr(bid).wrapping_add(start as usize)
    }

    /// Gives `bid` back to the kernel; visible after [`BufRing::commit`].
    pub fn release(&mut self, bid: u16) {
        let idx = (self.tail & self.mask) as usize;
        let base = self.entries_map.ptr.cast::<types::BufRingEntry>();
        // SAFETY: `idx` < entries, inside the entry mapping. The slot at the
        // tail is not read by the kernel until the tail is published in
        // `commit`. Entry 0's `resv` field doubles as the ring tail, and
        // BufRingEntry's setters leave it alone.
        unsafe {
            let e = &mut *base.add(idx);
            e.set_addr(self.buf_ptr(bid) as u64);
            e.set_len(self.buf_size);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        self.held -= 1;
    }

    /// Publishes released buffers to the kernel.
    pub fn commit(&mut self) {
        let base = self.entries_map.ptr.cast::<types::BufRingEntry>();
        // SAFETY: the tail lives in entry 0 of our mapping; the kernel reads
        // it with acquire semantics, so a release store orders the entry
        // writes before it.
        unsafe {
            let tail = types::BufRingEntry::tail(base) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

/// Takes ownership of a socket an accept CQE returned.
pub fn adopt_fd(fd: RawFd) -> OwnedFd {
    assert!(fd >= 0);
    // SAFETY: the kernel just created this descriptor for us in an accept
    // completion; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An eventfd to wake a shard's ring from another thread.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked and adopted once.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(adopt_fd(fd))
}

pub fn eventfd_signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live stack array to an fd we own.
    unsafe {
        libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8);
    }
}

/// A nonblocking pipe for moving bytes between two sockets by `splice(2)`
/// without copying them through userspace.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    /// A pipe of (at least) `size` bytes, if the kernel grants it.
    pub fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the live 2-element array.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created for us and are owned once.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe moves more per splice; the default (64 KiB) is kept
        // if the request is refused (pipe-max-size, pipe-user-pages-soft).
        // SAFETY: plain fcntl on a descriptor we own; no memory is passed.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        Ok(Pipe { r, w })
    }

    /// Moves up to `len` bytes from socket `from` into the pipe.
    pub fn fill(&self, from: RawFd, len: usize) -> Result<usize, i32> {
        splice(from, self.w.as_raw_fd(), len)
    }

    /// Writes a few bytes (a frame header) into the pipe, ahead of the
    /// payload that will follow it.
    pub fn put(&self, data: &[u8]) -> Result<usize, i32> {
        // SAFETY: write(2) reads `data.len()` bytes from a live slice into
        // a pipe we own; nonblocking, so it never sleeps.
        let n = unsafe { libc::write(self.w.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        byte_count(n)
    }

    /// Moves up to `len` bytes from the pipe to socket `to`.
    pub fn drain(&self, to: RawFd, len: usize) -> Result<usize, i32> {
        splice(self.r.as_raw_fd(), to, len)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> Result<usize, i32> {
    // SAFETY: splice(2) between descriptors the caller owns, with null
    // offsets (sockets and pipes have none); no user memory is involved.
    // Nonblocking: the sockets are O_NONBLOCK and SPLICE_F_NONBLOCK covers
    // the pipe, so this never sleeps on the shard thread.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    byte_count(n)
}

/// A byte count from a syscall, or its errno.
fn byte_count(n: isize) -> Result<usize, i32> {
    if n < 0 {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(n as usize)
    }
}
