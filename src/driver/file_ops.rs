//! Static-file ops and the pipes of splicing directions. A file or pipe
//! given up while a file op may still use it is retired into the slot, not
//! closed (module doc of `driver`).

use std::fs::File;
use std::os::fd::AsRawFd;

use socket2::SockRef;

use super::{slot_mut, Driver, Lender, Op, Retired, Slot, SPARE_PIPES};
use crate::conn::Side;
use crate::files;
use crate::ring::{self, Pipe};

impl<T> Driver<T> {
    // ---- static files ----

    pub fn open_file(&mut self, key: usize, req: files::OpenReq) {
        let ud = self.ud(Op::Open, Side::Backend, key);
        let how = ring::OpenHow::new()
            // O_NONBLOCK only so a FIFO under root cannot hang the open; it
            // is cleared before any read (`route`).
            .flags((libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64)
            .resolve(req.resolve);
        let boxed = Box::new((req, how));
        let dir = boxed.0.site.root_fd.as_raw_fd();
        let s = slot_mut(&mut self.slots, self.shut, key);
        s.inflight_file += 1;
        // SAFETY: path and open_how are boxed in the slot until this op's
        // completion (`route` drops them there), and the root descriptor is
        // held by the request's `Arc`'d site inside that box.
        #[allow(unsafe_code)]
        unsafe {
            self.ring.openat2(dir, &boxed.0.path, &boxed.1, ud)
        };
        s.open_req = Some(boxed);
    }

    /// The connection takes the file just opened.
    pub fn adopt_file(&mut self, key: usize) {
        let s = slot_mut(&mut self.slots, self.shut, key);
        let new = s.opened.take();
        Self::set_file(s, new);
    }

    /// Forgets the file a finished answer read (closed once no file op
    /// uses it).
    pub fn drop_file(&mut self, key: usize) {
        Self::set_file(slot_mut(&mut self.slots, self.shut, key), None);
    }

    fn set_file(s: &mut Slot<T>, new: Option<File>) {
        if let Some(old) = std::mem::replace(&mut s.file, new) {
            if s.inflight_file > 0 {
                s.retirees().file.push(Retired::File(old));
            }
        }
    }

    /// Closes a file the connection was offered and did not adopt.
    pub fn drop_unadopted(&mut self, key: usize) {
        if let Some(s) = self.slots.get_mut(key) {
            s.opened = None;
        }
    }

    pub fn read_file(&mut self, key: usize, at: usize, len: usize, offset: u64)
    where
        T: Lender,
    {
        let ud = self.ud(Op::Read, Side::Backend, key);
        let s = slot_mut(&mut self.slots, self.shut, key);
        let fd = s.file.as_ref().expect("read without a file").as_raw_fd();
        let ptr = s.data.read_target(at, len);
        s.inflight_file += 1;
        // SAFETY: the target is lent by the connection under `Lender`'s
        // contract until this read's event; the file is the slot's and is
        // retired, not closed, while a file op is in flight.
        #[allow(unsafe_code)]
        unsafe {
            self.ring.read(fd, ptr, len, offset, ud)
        };
    }

    /// Gives the direction towards `dst` a pipe if it has none: a spare
    /// one, or a new one. False if the kernel refuses (descriptors, pipe
    /// quota).
    fn take_pipe(&mut self, key: usize, dst: Side) -> bool {
        let s = &mut self.slots[key];
        if s.pipes[dst.idx()].is_some() {
            return true;
        }
        let pipe = match self.spare_pipes.pop() {
            Some(p) => Ok(p),
            None => Pipe::new(crate::conn::SPLICE_CHUNK),
        };
        match pipe {
            Ok(p) => {
                s.pipes[dst.idx()] = Some(p);
                true
            }
            Err(err) => {
                log::debug!("no pipe for splice: {err}");
                false
            }
        }
    }

    /// Splices up to `len` bytes of the static file at `offset` into the
    /// client pipe, on the ring. False if no pipe could be had.
    pub fn file_to_pipe(&mut self, key: usize, offset: u64, len: u32) -> bool {
        if !self.take_pipe(key, Side::Client) {
            return false;
        }
        let ud = self.ud(Op::FileSplice, Side::Client, key);
        let s = slot_mut(&mut self.slots, self.shut, key);
        let fd = s.file.as_ref().expect("splice without a file").as_raw_fd();
        let pipe = s.pipes[Side::Client.idx()]
            .as_ref()
            .expect("pipe just taken");
        s.inflight_file += 1;
        // SAFETY: the file and the pipe are the slot's; either one given up
        // while a file op is in flight is retired until that op is back.
        #[allow(unsafe_code)]
        unsafe {
            self.ring.splice_file(fd, offset, pipe, len, ud)
        };
        true
    }

    /// Moves up to `pending` bytes from the client pipe to the client.
    pub fn pipe_to_client(&mut self, key: usize, pending: usize) -> Result<usize, i32> {
        let s = slot_mut(&mut self.slots, self.shut, key);
        let pipe = s.pipes[Side::Client.idx()]
            .as_ref()
            .expect("draining a pipe the connection does not hold");
        pipe.drain(s.client.as_raw_fd(), pending)
    }

    /// Reads up to `want` bytes (a frame header) from `src` and writes them
    /// into the pipe towards the other side. `None`: no pipe to be had.
    pub fn read_header(
        &mut self,
        key: usize,
        src: Side,
        want: usize,
    ) -> Option<Result<([u8; 14], usize), i32>> {
        use std::io::Read;
        let dst = src.other();
        if !self.take_pipe(key, dst) {
            return None;
        }
        let s = slot_mut(&mut self.slots, self.shut, key);
        let pipe = s.pipes[dst.idx()].as_ref().expect("pipe just taken");
        let sock = s.sock(src).expect("header from a side without a socket");
        let mut hdr = [0u8; 14];
        let want = want.min(hdr.len());
        // The socket is O_NONBLOCK: no data is EAGAIN, never a wait.
        let res = match (&*SockRef::from(sock)).read(&mut hdr[..want]) {
            Ok(n) => match pipe.put(&hdr[..n]) {
                // The pipe is empty at a boundary: a header always fits.
                Ok(m) if m == n => Ok((hdr, n)),
                Ok(_) => Err(libc::EIO),
                Err(e) => Err(e),
            },
            Err(err) => Err(err.raw_os_error().unwrap_or(libc::EIO)),
        };
        Some(res)
    }

    /// Moves up to `read` bytes from `src` into its pipe, then up to what
    /// the pipe holds (`pending` plus that) to the other side. `None`: no
    /// pipe to be had. Otherwise what was read (if asked) and written.
    #[allow(clippy::type_complexity)]
    pub fn splice(
        &mut self,
        key: usize,
        src: Side,
        read: usize,
        pending: usize,
    ) -> Option<(Option<Result<usize, i32>>, Result<usize, i32>)> {
        let dst = src.other();
        if !self.take_pipe(key, dst) {
            return None;
        }
        let s = slot_mut(&mut self.slots, self.shut, key);
        let pipe = s.pipes[dst.idx()].as_ref().expect("pipe just taken");
        let from = s.fd(src).expect("splice from a side without a socket");
        let to = s.fd(dst).expect("splice to a side without a socket");
        let got = (read > 0).then(|| pipe.fill(from, read));
        let total = pending + got.and_then(Result::ok).unwrap_or(0);
        let put = if total > 0 {
            pipe.drain(to, total)
        } else {
            Ok(0)
        };
        Some((got, put))
    }

    /// The direction towards `dst` stops splicing; its pipe goes back to
    /// the spares if it is empty (`reusable`).
    pub fn leave_splice(&mut self, key: usize, dst: Side, reusable: bool) {
        let s = slot_mut(&mut self.slots, self.shut, key);
        let Some(p) = s.pipes[dst.idx()].take() else {
            return;
        };
        if dst == Side::Client && s.inflight_file > 0 {
            // A file splice may still fill it.
            s.retirees().file.push(Retired::Pipe(p));
        } else if reusable && self.spare_pipes.len() < SPARE_PIPES {
            self.spare_pipes.push(p);
        }
    }
}
