//! The only module that builds SQEs, and (with `driver`) the only one with
//! `unsafe`.
//!
//! Every function here that hands the kernel memory or a descriptor it
//! keeps using after the call returns is an `unsafe fn` whose `# Safety`
//! section states what the caller must keep alive, and until when. The
//! caller that keeps those promises is `crate::driver::Driver`: it owns
//! the ring, the provided-buffer ring, every slot's descriptors and the boxed
//! memory ops point into, and frees or closes none of them while an op
//! that uses it is in flight (it counts them, cancels, and on shutdown reaps
//! every completion before anything is freed). Its module doc has the
//! ownership table; `user_data` is built there too and is opaque here.
//!
//! What stays safe, and why:
//! - [`BufRing::data`] checks at run time that the buffer was handed to us
//!   by a completion and not yet given back (a per-buffer flag), so the
//!   kernel cannot be writing into the bytes it returns. [`BufRing::release`]
//!   stays `unsafe`: nothing here can see whether a send still reads it.
//! - Cancels pass only a `user_data` or a descriptor number to match; the
//!   kernel keeps neither.
//! - [`Pipe`]'s methods and [`eventfd_signal`] are plain syscalls that are
//!   over when they return; [`trim_heap`] a libc call that takes nothing.
//!
//! [`Uring`] counts every op from its push to its last completion (one
//! without `IORING_CQE_F_MORE`), so a shutdown can wait until the kernel
//! holds nothing: a ring's teardown on close is asynchronous and must never
//! be what ends an op whose memory is about to be freed.
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
    /// Ops pushed whose last completion has not been read yet.
    in_flight: usize,
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
                Ok(ring) => {
                    return Ok(Uring {
                        ring,
                        mode,
                        in_flight: 0,
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("io_uring setup failed")))
    }

    /// Ops submitted (or queued) whose last completion has not been read.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `entry`. Not itself unsafe to call: every caller is one of the
    /// `unsafe fn`s below (or a cancel), whose contract covers what the
    /// entry points at.
    fn push(&mut self, entry: squeue::Entry) {
        self.in_flight += 1;
        loop {
            // SAFETY: the entry's pointers and descriptors are covered by
            // the `# Safety` contract of the public function that built it
            // (cancels carry none).
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

    /// A multishot accept on `listener`.
    ///
    /// # Safety
    /// `listener` stays open, and names the same socket, until this op's last
    /// completion (one without `IORING_CQE_F_MORE`): the kernel resolves the
    /// number when it issues the SQE, which may be after this returns.
    pub unsafe fn accept_multi(&mut self, listener: RawFd, ud: u64) {
        let e = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// A multishot recv that picks buffers from group `bgid`.
    ///
    /// # Safety
    /// `fd` stays open until the op's last completion, and the [`BufRing`]
    /// registered as `bgid` on this ring is not dropped before then (the
    /// kernel writes into its buffers at any time until that completion).
    pub unsafe fn recv_multi(&mut self, fd: RawFd, bgid: u16, ud: u64) {
        let e = opcode::RecvMulti::new(types::Fd(fd), bgid)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Sends `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` is readable and stays allocated, unmoved and
    /// unwritten until this op's completion; `fd` stays open until then.
    /// A cancelled send still reads until its completion says it is over.
    pub unsafe fn send(&mut self, fd: RawFd, ptr: *const u8, len: usize, ud: u64) {
        let e = opcode::Send::new(types::Fd(fd), ptr, len as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Connects `fd` to `addr`.
    ///
    /// # Safety
    /// `addr` (the kernel keeps its pointer, not a copy, until it issues the
    /// op) stays allocated and unmoved until this op's completion, and `fd`
    /// stays open until then.
    pub unsafe fn connect(&mut self, fd: RawFd, addr: &socket2::SockAddr, ud: u64) {
        let e = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// `openat2` relative to `dir`.
    ///
    /// # Safety
    /// `path` and `how` stay allocated and unmoved, and `dir` open, until
    /// this op's completion. The completion's result is a new descriptor
    /// that only its reader may adopt ([`adopt_fd`]).
    pub unsafe fn openat2(&mut self, dir: RawFd, path: &CStr, how: &types::OpenHow, ud: u64) {
        let e = opcode::OpenAt2::new(types::Fd(dir), path.as_ptr(), how)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Reads a regular file at `offset` into `ptr..ptr + len`.
    ///
    /// # Safety
    /// `ptr..ptr + len` is writable, stays allocated and unmoved, and is
    /// neither read nor written by anyone else until this op's completion;
    /// `fd` stays open until then.
    pub unsafe fn read(&mut self, fd: RawFd, ptr: *mut u8, len: usize, offset: u64, ud: u64) {
        let e = opcode::Read::new(types::Fd(fd), ptr, len as u32)
            .offset(offset)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Moves up to `len` bytes of regular file `fd` at `offset` into `pipe`
    /// (page references, no copy). From the page cache it completes at
    /// once; a read that must wait for the disk runs in the kernel's io-wq,
    /// not on the shard thread.
    ///
    /// # Safety
    /// `fd` and both ends of `pipe` stay open until this op's completion
    /// (the io-wq worker resolves and uses them after this returns).
    pub unsafe fn splice_file(&mut self, fd: RawFd, offset: u64, pipe: &Pipe, len: u32, ud: u64) {
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
    ///
    /// # Safety
    /// `fd` stays open until this op's completion.
    pub unsafe fn poll(&mut self, fd: RawFd, mask: u32, ud: u64) {
        let e = opcode::PollAdd::new(types::Fd(fd), mask)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Reads 8 bytes from an eventfd into `buf`.
    ///
    /// # Safety
    /// `buf` stays allocated, unmoved and untouched, and `fd` open, until
    /// this op's completion.
    pub unsafe fn read_eventfd(&mut self, fd: RawFd, buf: &mut [u8; 8], ud: u64) {
        let e = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8)
            .build()
            .user_data(ud);
        self.push(e);
    }

    /// Cancels every op on `fd`. The kernel only compares the number.
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

    /// Cancels every op on the ring (`IORING_ASYNC_CANCEL_ANY`), for
    /// shutdown. Ops the kernel cannot stop (a file read already in io-wq)
    /// still complete by themselves.
    pub fn cancel_all(&mut self, ud: u64) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
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

    /// Cancels every op, then reads completions (handing each to `each`)
    /// until none is in flight or `limit` has passed. True if none is left:
    /// only then may the memory those ops used be freed. The ring itself
    /// is left usable.
    pub fn quiesce(&mut self, cancel_ud: u64, limit: Duration, mut each: impl FnMut(Cqe)) -> bool {
        if self.in_flight == 0 {
            return true;
        }
        self.cancel_all(cancel_ud);
        let deadline = std::time::Instant::now() + limit;
        let mut batch = Vec::with_capacity(256);
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            if let Err(e) = self.submit_and_wait(Some(left)) {
                log::error!("io_uring wait failed while reaping for shutdown: {e}");
                break;
            }
            self.completions(&mut batch);
            for c in batch.drain(..) {
                each(c);
            }
        }
        self.in_flight == 0
    }

    /// Moves up to `out.capacity()` completions into `out`.
    pub fn completions(&mut self, out: &mut Vec<Cqe>) {
        out.clear();
        let cap = out.capacity().max(64);
        for c in self.ring.completion().take(cap) {
            let cqe = Cqe {
                user_data: c.user_data(),
                result: c.result(),
                flags: c.flags(),
            };
            if !cqe.more() {
                self.in_flight -= 1;
            }
            out.push(cqe);
        }
    }

    /// Registers a provided-buffer ring as group `bgid`.
    ///
    /// # Safety
    /// The returned [`BufRing`] is not dropped while any op that selects
    /// from `bgid` on this ring is in flight (its drop unmaps the buffers
    /// the kernel writes into), nor before this ring if such an op may be.
    pub unsafe fn buf_ring(&self, bgid: u16, entries: u16, buf_size: u32) -> io::Result<BufRing> {
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
    /// Which buffers we hold: the kernel writes only into the others.
    ours: Vec<bool>,
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
        // once; by `Uring::buf_ring`'s contract no op uses them any more.
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
        // `entries`, and lives in this BufRing, which by `Uring::buf_ring`'s
        // contract outlives every op that selects from it.
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
            ours: vec![true; entries as usize],
            entries,
        };
        for bid in 0..entries {
            br.prefault(bid);
            // SAFETY: no op has been submitted against this group yet, so
            // nothing reads the buffer; it is ours (`ours` starts all true).
            unsafe { br.release(bid) };
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

    /// Records that a CQE handed us `bid`. Panics if we already hold it:
    /// the kernel never hands out a buffer twice, so the CQE was not real.
    pub fn taken(&mut self, bid: u16) {
        let ours = &mut self.ours[bid as usize];
        assert!(!*ours, "buffer {bid} handed to us twice");
        *ours = true;
        self.held += 1;
    }

    /// Whether we hold `bid` (taken and not yet released).
    pub fn is_ours(&self, bid: u16) -> bool {
        self.ours.get(bid as usize).copied().unwrap_or(false)
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid <= self.mask);
        // In bounds: bid < entries and the mapping holds entries * buf_size.
        self.bufs
            .ptr
            .wrapping_add(bid as usize * self.buf_size as usize)
    }

    /// The bytes a recv CQE delivered in `bid`. Safe because it checks
    /// that we hold `bid`: the kernel writes only into buffers in the ring,
    /// and `release` (which puts it back) needs `&mut self`, so it cannot
    /// happen while the returned slice lives.
    pub fn data(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid <= self.mask && len <= self.buf_size as usize);
        assert!(
            self.is_ours(bid),
            "reading buffer {bid}, which the kernel holds"
        );
        // SAFETY: we hold `bid` (checked), so the kernel does not write to
        // it until `release`; `len` bytes lie inside the mapping, and the
        // mapping lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.buf_ptr(bid), len) }
    }

    /// Address of byte `start` of buffer `bid`, for a send.
    pub fn ptr(&self, bid: u16, start: u32) -> *const u8 {
        assert!(bid <= self.mask && start <= self.buf_size);
        self.buf_ptr(bid).wrapping_add(start as usize)
    }

    /// Gives `bid` back to the kernel; visible after [`BufRing::commit`].
    /// Panics if we do not hold it (a double release would let two recvs
    /// write into one buffer).
    ///
    /// # Safety
    /// No op in flight reads `bid` any more: a send from it has completed
    /// (or was cancelled and its completion arrived). Once released, the
    /// kernel may write into it at any time.
    pub unsafe fn release(&mut self, bid: u16) {
        let ours = &mut self.ours[bid as usize];
        assert!(*ours, "releasing buffer {bid}, which the kernel holds");
        *ours = false;
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

/// Takes ownership of a descriptor a completion (accept, openat2) or a
/// syscall just returned.
///
/// # Safety
/// `fd` is a descriptor the kernel just created for us that nothing else
/// owns or will close: adopting it twice, or one that another owner holds,
/// closes it under that owner (and then whatever file reuses the number).
pub unsafe fn adopt_fd(fd: RawFd) -> OwnedFd {
    assert!(fd >= 0);
    // SAFETY: the caller's contract: nothing else owns `fd`.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An eventfd to wake a shard's ring from another thread.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked and adopted once.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd(2) just created `fd` and it is adopted once, here.
    Ok(unsafe { adopt_fd(fd) })
}

/// Gives the free pages inside the allocator's heaps back to the kernel
/// (glibc's `malloc_trim(0)`); true if any were. Why ringlb needs it is at
/// `crate::server::HeapTrim`.
pub fn trim_heap() -> bool {
    // SAFETY: takes no pointer and keeps nothing: glibc walks its own free
    // lists under their arena locks and madvises whole free pages.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Puts the calling thread under `SCHED_BATCH`: the scheduler no longer
/// lets it preempt a running task when it wakes, so on a busy CPU its
/// completions gather until the running task's slice ends and one wake-up
/// serves many. Why ringlb wants that is at `crate::config::Scheduling`.
pub fn set_batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; the kernel copies `param` from a
    // live stack value during the call and keeps no pointer to it.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

impl Pipe {
    /// Reads up to `len` bytes out of the pipe into memory (a splicing
    /// direction being exported: its bytes travel in the session record).
    pub fn read_out(&self, len: usize) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            // SAFETY: read(2) writes at most `len - got` bytes into the live,
            // initialised tail of `buf`; the pipe is ours and nonblocking.
            let n = unsafe {
                libc::read(
                    self.r.as_raw_fd(),
                    buf[got..].as_mut_ptr().cast(),
                    len - got,
                )
            };
            match byte_count(n) {
                Ok(0) | Err(libc::EAGAIN) => break,
                Ok(n) => got += n,
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }
}

/// Descriptors one `sendmsg` may carry (the kernel's `SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// Sends `data` on a unix stream socket with `fds` attached (SCM_RIGHTS),
/// all of it or an error. The descriptors travel with the first byte; the
/// caller keeps its own copies open (they are closed only once the peer
/// acknowledged them).
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(fds.len() <= SCM_MAX_FD, "more than SCM_MAX_FD descriptors");
    assert!(!data.is_empty(), "descriptors need at least one byte");
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is arithmetic on a length.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 elements: a cmsghdr needs 8-byte alignment.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut sent = 0;
    while sent < data.len() {
        let mut iov = libc::iovec {
            iov_base: data[sent..].as_ptr() as *mut libc::c_void,
            iov_len: data.len() - sent,
        };
        // SAFETY: an all-zero msghdr is valid (no name, no iovec, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 && !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer is `space` bytes, 8-aligned and
            // zeroed, so CMSG_FIRSTHDR points at a header inside it, and
            // CMSG_DATA at `fd_bytes` bytes inside it (CMSG_SPACE covers
            // header and data); the copy reads `fds` (live) only.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    fd_bytes,
                );
            }
        }
        // SAFETY: `msg` points at the live iovec over `data` and the live
        // control buffer; sendmsg reads them during the call only.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        match byte_count(n) {
            Ok(n) => sent += n,
            Err(libc::EINTR) => {}
            Err(e) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes from a unix stream socket, adopting
/// any descriptors that came with them (close-on-exec) into `fds`. A
/// control message the buffer could not hold (`MSG_CTRUNC`: descriptors
/// the kernel dropped) is an error, never a silent loss.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    // SAFETY: CMSG_SPACE is arithmetic on a length.
    let space =
        unsafe { libc::CMSG_SPACE((SCM_MAX_FD * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: recvmsg writes at most `buf.len()` bytes into `buf` and at
        // most `space` bytes into `control`, both live and exclusively ours.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        let n = match byte_count(n) {
            Ok(n) => n,
            Err(libc::EINTR) => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e)),
        };
        let mut got = Vec::new();
        // SAFETY: the kernel filled `msg_controllen` bytes of `control` with
        // well-formed cmsghdrs; CMSG_FIRSTHDR/NXTHDR stay inside it, and
        // each SCM_RIGHTS payload holds `(cmsg_len - CMSG_LEN(0)) / 4`
        // descriptors that are new in this process and owned by nobody else,
        // so each is adopted exactly once.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        got.push(adopt_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        fds.extend(got);
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other(
                "MSG_CTRUNC: descriptors were dropped by the kernel on receipt",
            ));
        }
        return Ok(n);
    }
}

/// Sends signal `sig` to process `pid`.
pub fn send_signal(pid: u32, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes two integers; no memory is involved.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes the descriptor whose number the environment variable `var`
/// holds (one end of the hand-off socket, inherited across exec), and
/// removes the variable so nothing can take it twice. `None` if unset.
pub fn take_inherited_fd(var: &str) -> io::Result<Option<OwnedFd>> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(v) = std::env::var_os(var) else {
        return Ok(None);
    };
    std::env::remove_var(var);
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other(format!("{var}: taken already")));
    }
    let fd: RawFd = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| io::Error::other(format!("{var}: not a descriptor number")))?;
    // SAFETY: fcntl(F_GETFD) only asks whether the number is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::other(format!(
            "{var}={fd}: no such open descriptor ({})",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: the parent process put this descriptor here for us and named
    // it in `var`, which was just removed, and `TAKEN` makes sure this runs
    // once: nothing else in this process owns it.
    let fd = unsafe { adopt_fd(fd) };
    // Not to be inherited by anything this process starts.
    // SAFETY: plain fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some(fd))
}
