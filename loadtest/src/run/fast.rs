//! Readiness-driven engine for `pingpong` and `bulk`: one mio poll loop per
//! worker thread drives all its connections directly, plain or TLS
//! ([`FSock`]: with TLS, records rustls still holds keep the connection
//! interested in writability until they are out).
//!
//! Per message the kernel work (one send, one receive) is the same as the echo
//! backend's, so what separates the tool from the backend is user-space
//! overhead; a plain event loop has less of it than a task per connection.

use super::{count_message, Conn, Ctx};
use crate::client::{close_frame, make_payload, ErrKind, Expect, Got, OutFrame, Reader};
use crate::transport::FSock;
use mio::{Events, Interest, Poll, Token};
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// How often deadlines are checked; timeouts fire at most this late.
const SCAN: Duration = Duration::from_millis(50);
/// Reads per readiness event before yielding to other connections; a
/// connection cut short is revisited without waiting for a new event.
const MAX_READS: usize = 256;

#[derive(PartialEq, Eq)]
enum Phase {
    Running,
    Closing,
    Done,
}

struct FConn {
    sock: FSock,
    reader: Reader,
    out: OutFrame,
    seq: u64,
    sent_at: Instant,
    deadline: Instant,
    /// Bytes of `out.frame` already written.
    frame_off: usize,
    /// Pongs and the close frame, written only after the current frame.
    extra: Vec<u8>,
    extra_off: usize,
    want_write: bool,
    phase: Phase,
}

struct Loop<'a> {
    ctx: &'a Ctx,
    poll: Poll,
    measure_from: Instant,
    end: Instant,
    live: usize,
}

pub(super) fn run(ctx: &Ctx, conns: Vec<(u64, Conn)>, start: Instant) {
    let cfg = &ctx.cfg;
    let poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            for _ in &conns {
                ctx.err(ErrKind::from_io(&e));
            }
            return;
        }
    };
    let mut lp = Loop {
        ctx,
        poll,
        measure_from: start + cfg.warmup,
        end: start + cfg.warmup + cfg.duration,
        live: 0,
    };
    let mut fc: Vec<FConn> = Vec::with_capacity(conns.len());
    for (gidx, c) in conns {
        let mut sock = match c.stream.into_fast() {
            Ok(s) => s,
            Err(e) => {
                ctx.err(ErrKind::from_io(&e));
                continue;
            }
        };
        if let Err(e) =
            lp.poll
                .registry()
                .register(sock.tcp_mut(), Token(fc.len()), Interest::READABLE)
        {
            ctx.err(ErrKind::from_io(&e));
            continue;
        }
        let out = OutFrame::new(&make_payload(cfg.size, cfg.text, gidx), cfg.text);
        fc.push(FConn {
            sock,
            reader: c.reader,
            frame_off: out.frame.len(),
            out,
            seq: 0,
            sent_at: start,
            deadline: start,
            extra: Vec::new(),
            extra_off: 0,
            want_write: false,
            phase: Phase::Running,
        });
    }
    lp.live = fc.len();
    for (i, c) in fc.iter_mut().enumerate() {
        if let Err(k) = lp.send_next(c, i) {
            lp.fail(c, k);
        }
    }
    let mut events = Events::with_capacity(1024);
    let mut again: Vec<usize> = Vec::new();
    let mut again_next: Vec<usize> = Vec::new();
    let hard_stop = lp.end + cfg.timeout * 2 + Duration::from_secs(1);
    let mut next_scan = Instant::now() + SCAN;
    // Bounded by `hard_stop`, past every message and close deadline.
    while lp.live > 0 {
        let now = Instant::now();
        if now >= hard_stop {
            for c in fc.iter_mut().filter(|c| c.phase != Phase::Done) {
                lp.fail(c, ErrKind::Timeout);
            }
            break;
        }
        let wait = if again.is_empty() {
            next_scan.saturating_duration_since(now)
        } else {
            Duration::ZERO
        };
        if let Err(e) = lp.poll.poll(&mut events, Some(wait)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            for c in fc.iter_mut().filter(|c| c.phase != Phase::Done) {
                lp.fail(c, ErrKind::from_io(&e));
            }
            break;
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let hup = ev.is_read_closed() || ev.is_error();
            let ready = Ready {
                writable: ev.is_writable(),
                readable: ev.is_readable() || hup,
                hup,
            };
            lp.step(&mut fc[i], i, ready, &mut again_next);
        }
        for i in again.drain(..) {
            let ready = Ready {
                writable: false,
                readable: true,
                hup: true,
            };
            lp.step(&mut fc[i], i, ready, &mut again_next);
        }
        std::mem::swap(&mut again, &mut again_next);
        let now = Instant::now();
        if now >= next_scan {
            next_scan = now + SCAN;
            for c in fc.iter_mut() {
                if c.phase != Phase::Done && now >= c.deadline {
                    lp.fail(c, ErrKind::Timeout);
                }
            }
        }
    }
}

impl Loop<'_> {
    fn step(&mut self, c: &mut FConn, i: usize, ready: Ready, again: &mut Vec<usize>) {
        if c.phase == Phase::Done {
            return;
        }
        match self.handle(c, i, ready) {
            Ok(Step::Wait) => {}
            Ok(Step::Again) => again.push(i),
            Ok(Step::Finished) => self.finish(c),
            Err(k) => self.fail(c, k),
        }
    }

    fn finish(&mut self, c: &mut FConn) {
        let _ = self.poll.registry().deregister(c.sock.tcp_mut());
        c.phase = Phase::Done;
        c.reader = Reader::new(0);
        self.live -= 1;
        self.ctx.shared.progress.open.fetch_sub(1, Relaxed);
    }

    fn fail(&mut self, c: &mut FConn, k: ErrKind) {
        if c.phase == Phase::Done {
            return;
        }
        self.ctx.err(k);
        let _ = c.sock.tcp().shutdown(std::net::Shutdown::Both);
        self.finish(c);
    }

    fn handle(&mut self, c: &mut FConn, i: usize, ready: Ready) -> Result<Step, ErrKind> {
        let cfg = &self.ctx.cfg;
        if ready.writable {
            self.flush(c, i)?;
        }
        if !ready.readable {
            return Ok(Step::Wait);
        }
        for _ in 0..MAX_READS {
            let got = c.reader.fill_sync(&mut c.sock)?;
            loop {
                let exp = Expect {
                    payload: c.out.payload(),
                    seq: c.seq,
                    text: cfg.text,
                };
                match c.reader.next(&exp)? {
                    None => break,
                    Some(Got::Close(_)) if c.phase == Phase::Closing => return Ok(Step::Finished),
                    Some(Got::Close(_)) => return Err(ErrKind::UnexpectedClose),
                    Some(Got::Message) if c.phase == Phase::Closing => {
                        return Err(ErrKind::MismatchedEcho)
                    }
                    Some(Got::Message) => {
                        let t1 = Instant::now();
                        if t1 >= self.measure_from && t1 <= self.end {
                            count_message(self.ctx, t1 - c.sent_at);
                        }
                        self.ctx.shared.progress.messages.fetch_add(1, Relaxed);
                        if t1 >= self.end {
                            self.ctx.res.borrow_mut().alive += 1;
                            c.phase = Phase::Closing;
                            c.deadline = t1 + cfg.timeout;
                            c.extra.extend_from_slice(&close_frame());
                            self.flush(c, i)?;
                        } else {
                            self.send_next(c, i)?;
                        }
                    }
                }
            }
            if !c.reader.pong_out.is_empty() {
                c.extra.append(&mut c.reader.pong_out);
                self.flush(c, i)?;
            }
            // A short read drained the socket; edge-triggered readiness will
            // report the next arrival. Not so after a FIN: the EOF itself
            // still has to be read, and no new edge will announce it.
            match got {
                None => return Ok(Step::Wait),
                Some(true) if !ready.hup => return Ok(Step::Wait),
                _ => {}
            }
        }
        Ok(Step::Again)
    }

    fn send_next(&mut self, c: &mut FConn, i: usize) -> Result<(), ErrKind> {
        c.seq += 1;
        c.out.set_seq(c.seq);
        c.frame_off = 0;
        c.sent_at = Instant::now();
        c.deadline = c.sent_at + self.ctx.cfg.timeout;
        self.flush(c, i)
    }

    /// Writes what is pending: the current frame first, so pongs and the close
    /// frame never land inside it. Each pass writes bytes or stops.
    fn flush(&mut self, c: &mut FConn, i: usize) -> Result<(), ErrKind> {
        while c.frame_off < c.out.frame.len() {
            match c.sock.write(&c.out.frame[c.frame_off..]) {
                Ok(0) => return Err(ErrKind::UnexpectedClose),
                Ok(n) => c.frame_off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.want_write(c, i, true)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ErrKind::from_io(&e)),
            }
        }
        while c.extra_off < c.extra.len() {
            match c.sock.write(&c.extra[c.extra_off..]) {
                Ok(0) => return Err(ErrKind::UnexpectedClose),
                Ok(n) => c.extra_off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.want_write(c, i, true)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ErrKind::from_io(&e)),
            }
        }
        c.extra.clear();
        c.extra_off = 0;
        // TLS: records the socket has not taken yet.
        if c.sock.wants_write() {
            match c.sock.flush() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.want_write(c, i, true)
                }
                Err(e) => return Err(ErrKind::from_io(&e)),
            }
        }
        self.want_write(c, i, false)
    }

    fn want_write(&mut self, c: &mut FConn, i: usize, on: bool) -> Result<(), ErrKind> {
        if c.want_write != on {
            let interest = if on {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            self.poll
                .registry()
                .reregister(c.sock.tcp_mut(), Token(i), interest)
                .map_err(|e| ErrKind::from_io(&e))?;
            c.want_write = on;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Ready {
    writable: bool,
    readable: bool,
    /// The peer's FIN or an error came with this event.
    hup: bool,
}

enum Step {
    Wait,
    Again,
    Finished,
}
