//! Completions into events: the `user_data` encoding, the generation
//! check, and the bookkeeping each completion does on its slot (counts,
//! buffers, adopted descriptors) before the shard sees it.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::time::Duration;

use socket2::SockRef;

use super::Driver;
use crate::conn::{RecvEnd, Side};
use crate::files;
use crate::ring::{self, Cqe};

/// The kind of op a completion belongs to (bits 63..56 of `user_data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Connect = 4,
    Cancel = 5,
    Wake = 6,
    Open = 7,
    Read = 8,
    PollIn = 9,
    PollOut = 10,
    FileSplice = 11,
}

impl Op {
    pub(super) const ALL: [Op; 11] = [
        Op::Accept,
        Op::Recv,
        Op::Send,
        Op::Connect,
        Op::Cancel,
        Op::Wake,
        Op::Open,
        Op::Read,
        Op::PollIn,
        Op::PollOut,
        Op::FileSplice,
    ];
}

/// A decoded `user_data` (layout in the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ud {
    pub op: Op,
    pub side: Side,
    pub gen: u16,
    pub key: u32,
}

impl Ud {
    pub fn encode(self) -> u64 {
        (self.op as u64) << 56
            | (self.side as u64) << 48
            | (self.gen as u64) << 32
            | self.key as u64
    }

    /// `None` for a value no op of ours carries.
    pub fn decode(ud: u64) -> Option<Ud> {
        let op = Op::ALL.into_iter().find(|o| *o as u64 == ud >> 56)?;
        let side = match (ud >> 48) & 0xff {
            0 => Side::Client,
            1 => Side::Backend,
            _ => return None,
        };
        Some(Ud {
            op,
            side,
            gen: (ud >> 32) as u16,
            key: ud as u32,
        })
    }
}

/// What a completion means for the connection in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `len` bytes arrived in provided buffer `bid`, which the connection
    /// now holds (read them with [`Driver::with_bufs`]).
    Recv {
        side: Side,
        bid: u16,
        len: usize,
    },
    /// The multishot recv on `side` ended.
    RecvEnd {
        side: Side,
        why: RecvEnd,
    },
    Send {
        side: Side,
        res: Result<usize, i32>,
    },
    Connect {
        res: Result<(), i32>,
    },
    Readable {
        side: Side,
    },
    Writable {
        side: Side,
    },
    /// An `openat2` ended; on success the file waits in the slot for
    /// [`Driver::adopt_file`].
    FileOpen {
        res: Result<files::Meta, i32>,
    },
    FileRead {
        res: Result<usize, i32>,
    },
    FileSpliced {
        res: Result<usize, i32>,
    },
    /// A readiness poll that a cancel ended (a parked session being
    /// quiesced for export).
    PollCancelled {
        side: Side,
    },
    /// A poll that a cancel ended: nothing to tell the connection, but the
    /// slot may now be free.
    Cancelled,
}

/// A completion, routed.
#[derive(Debug)]
pub enum Routed {
    /// A multishot accept produced a socket (`Ok(Some)`), one the closing
    /// listener dropped (`Ok(None)`), or failed. `rearm`: the accept ended
    /// and its listener is still open.
    Accept {
        listener: usize,
        res: Result<Option<OwnedFd>, i32>,
        rearm: bool,
    },
    /// The wake eventfd fired; commands are waiting.
    Wake,
    /// Events for slot `key`, in order (a recv's last data and its end).
    Slot {
        key: usize,
        first: Event,
        then: Option<Event>,
    },
    /// Nothing to deliver (a cancel's own completion, a stale one).
    Nothing,
}

fn res_len(r: i32) -> Result<usize, i32> {
    if r >= 0 {
        Ok(r as usize)
    } else {
        Err(-r)
    }
}

impl<T> Driver<T> {
    // ---- the loop ----

    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.ring.submit_and_wait(timeout)
    }

    /// Routes the completions that are ready into `out` (cleared first).
    pub fn reap(&mut self, out: &mut Vec<Routed>) {
        out.clear();
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.completions(&mut cqes);
        for cqe in &cqes {
            let r = self.route(*cqe);
            out.push(r);
        }
        self.cqes = cqes;
    }

    /// Books one completion against its owner and says what it means.
    pub(super) fn route(&mut self, cqe: Cqe) -> Routed {
        let Some(ud) = Ud::decode(cqe.user_data) else {
            self.stats.stale_completions.add(1);
            self.return_buffer(cqe);
            return Routed::Nothing;
        };
        match ud.op {
            Op::Accept => return self.route_accept(ud.key as usize, cqe),
            Op::Wake => {
                self.wake_armed = false;
                return Routed::Wake;
            }
            Op::Cancel => return Routed::Nothing,
            _ => {}
        }
        let key = ud.key as usize;
        let live = self.slots.get(key).map(|s| s.gen as u16);
        if verdict(live, ud.gen) == Verdict::Stale {
            self.stats.stale_completions.add(1);
            self.return_buffer(cqe);
            if ud.op == Op::Open && cqe.result >= 0 {
                // SAFETY: the openat2 created this descriptor for us and
                // nobody will see it: adopt it to close it.
                #[allow(unsafe_code)]
                drop(unsafe { ring::adopt_fd(cqe.result) });
            }
            return Routed::Nothing;
        }
        let side = ud.side;
        let s = &mut self.slots[key];
        let (first, then) = match ud.op {
            Op::Recv => {
                if !cqe.more() {
                    s.inflight[side.idx()] -= 1;
                }
                let end = (!cqe.more()).then(|| Event::RecvEnd {
                    side,
                    why: match cqe.result {
                        0 => RecvEnd::Eof,
                        r if r > 0 => RecvEnd::Stopped,
                        r if r == -libc::ECANCELED => RecvEnd::Stopped,
                        r if r == -libc::ENOBUFS => RecvEnd::NoBuffers,
                        r => RecvEnd::Error(-r),
                    },
                });
                if cqe.result > 0 {
                    let bid = cqe.buffer().expect("recv data without a buffer");
                    self.bufs.taken(bid);
                    let len = cqe.result as usize;
                    (Event::Recv { side, bid, len }, end)
                } else {
                    (end.expect("a recv without data ends"), None)
                }
            }
            Op::Send => {
                s.inflight[side.idx()] -= 1;
                let res = res_len(cqe.result);
                (Event::Send { side, res }, None)
            }
            Op::Connect => {
                s.inflight[Side::Backend.idx()] -= 1;
                s.connect_addr = None;
                let res = res_len(cqe.result).map(|_| ());
                (Event::Connect { res }, None)
            }
            Op::PollIn | Op::PollOut => {
                s.inflight[side.idx()] -= 1;
                let ev = if cqe.result == -libc::ECANCELED && ud.op == Op::PollIn {
                    Event::PollCancelled { side }
                } else if cqe.result == -libc::ECANCELED {
                    Event::Cancelled
                } else if ud.op == Op::PollIn {
                    // An error shows as readiness: the splice reports it.
                    Event::Readable { side }
                } else {
                    Event::Writable { side }
                };
                (ev, None)
            }
            Op::Open => {
                s.inflight_file -= 1;
                s.open_req = None;
                let res = if cqe.result >= 0 {
                    // SAFETY: the openat2 just created this descriptor for
                    // us; it is adopted once, here.
                    #[allow(unsafe_code)]
                    let f = File::from(unsafe { ring::adopt_fd(cqe.result) });
                    // Reads must wait for the disk (in io-wq), not fail with
                    // EAGAIN, so the open's O_NONBLOCK goes now.
                    let _ = SockRef::from(&f).set_nonblocking(false);
                    match f.metadata() {
                        Ok(m) => {
                            s.opened = Some(f);
                            Ok(meta(&m))
                        }
                        Err(err) => Err(err.raw_os_error().unwrap_or(libc::EIO)),
                    }
                } else {
                    Err(-cqe.result)
                };
                (Event::FileOpen { res }, None)
            }
            Op::Read => {
                s.inflight_file -= 1;
                (
                    Event::FileRead {
                        res: res_len(cqe.result),
                    },
                    None,
                )
            }
            Op::FileSplice => {
                s.inflight_file -= 1;
                (
                    Event::FileSpliced {
                        res: res_len(cqe.result),
                    },
                    None,
                )
            }
            Op::Accept | Op::Wake | Op::Cancel => unreachable!("handled above"),
        };
        s.settle();
        Routed::Slot { key, first, then }
    }

    /// A completion nobody will see gives its provided buffer back.
    fn return_buffer(&mut self, cqe: Cqe) {
        if cqe.result > 0 {
            if let Some(bid) = cqe.buffer() {
                self.bufs.taken(bid);
                // SAFETY: the kernel just handed us this buffer and nothing
                // was told of it, so no op reads it.
                #[allow(unsafe_code)]
                unsafe {
                    self.bufs.release(bid)
                };
            }
        }
    }

    fn route_accept(&mut self, i: usize, cqe: Cqe) -> Routed {
        let res = if cqe.result >= 0 {
            // SAFETY: the accept just created this descriptor; adopted once.
            #[allow(unsafe_code)]
            let fd = unsafe { ring::adopt_fd(cqe.result) };
            Ok(Some(fd))
        } else {
            Err(-cqe.result)
        };
        let Some(Some(l)) = self.listeners.get_mut(i) else {
            self.stats.stale_completions.add(1);
            return Routed::Nothing;
        };
        // Raced the cancel: the listener is going away; so is this socket.
        let res = if l.closing { res.map(|_| None) } else { res };
        let mut rearm = false;
        if !cqe.more() {
            l.armed = false;
            if l.closing {
                self.listeners[i] = None;
            } else {
                rearm = !l.paused;
            }
        }
        Routed::Accept {
            listener: i,
            res,
            rearm,
        }
    }
}

/// Whether a completion for a slot whose live generation is `live` (`None`:
/// no slot at that key) and that carries `carried` may be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    Stale,
}

pub fn verdict(live: Option<u16>, carried: u16) -> Verdict {
    match live {
        Some(g) if g == carried => Verdict::Deliver,
        _ => Verdict::Stale,
    }
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
