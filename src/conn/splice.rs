//! The splice path for big frames: a direction whose frame still has
//! `splice_min` payload bytes to come stops receiving into buffers and
//! moves the payload source → pipe → destination with inline nonblocking
//! `splice(2)` after readiness polls (never an io_uring splice, which would
//! block an io-wq thread on an idle socket). Frame headers are read into
//! the pipe in order, so the direction stays spliced from one big frame to
//! the next, and goes back to buffers when its source is idle between
//! frames (an idle direction holds no pipe).
//!
//! ```text
//! Off ─consider_splice─► Pending (recv stopping, queue draining) ─► On { in_pipe, end }
//!  ▲                                                                   │
//!  └──────────── leave_splice (idle at a boundary, EOF, error) ◄───────┘
//! ```

use super::*;

impl Conn {
    /// After relaying from `src`: if the frame under way still has at least
    /// `splice_min` payload bytes, stop receiving `src` into buffers and
    /// move the rest of the frame by splice.
    pub(super) fn consider_splice(&mut self, src: Side, out: &mut Vec<Action>) {
        let dst = src.other();
        let flow = &self.flow[dst.idx()];
        if self.splice_min == 0
            || self.stage() != Stage::Relaying
            || self.status != Some(101)
            || self.going_away()
            || self.quiescing()
            || self.close_wanted().is_some()
            || !self.transport.iter().all(Transport::in_place)
            || flow.splice != Splice::Off
            || flow.dead
            || flow.src_eof
            || flow.frames.payload_left() < self.splice_min
        {
            return;
        }
        self.flow[dst.idx()].splice = Splice::Pending;
        if self.recv[src.idx()] == RecvState::Armed {
            self.recv[src.idx()] = RecvState::Cancelling;
            out.push(Action::CancelRecv(src));
        }
        self.maybe_start_splice(dst, out);
    }

    /// Starts splicing towards `dst` once the switch is safe: no recv on
    /// the source and nothing queued or in flight towards `dst`.
    pub(super) fn maybe_start_splice(&mut self, dst: Side, out: &mut Vec<Action>) {
        let src = dst.other();
        let relaying = self.stage() == Stage::Relaying;
        let flow = &mut self.flow[dst.idx()];
        if flow.splice != Splice::Pending
            || self.recv[src.idx()] != RecvState::Off
            || !flow.queue.is_empty()
            || flow.sending
        {
            return;
        }
        if !relaying || flow.dead || flow.src_eof {
            flow.splice = Splice::Off;
            if self.wants_recv(src) {
                self.ensure_recv(src, out);
            }
            return;
        }
        flow.splice = Splice::On {
            in_pipe: 0,
            end: None,
        };
        out.push(Action::PollIn(src));
    }

    /// A splicing source is readable (or failed: the next step will say).
    /// Mid-frame the payload is spliced; at a frame boundary the next
    /// header is read (a few bytes, copied, and put in the pipe ahead of
    /// its payload), so a direction carrying big frames stays in splice
    /// mode from one frame to the next.
    pub fn on_readable(&mut self, src: Side, out: &mut Vec<Action>) {
        if self.stage() == Stage::Closing {
            return;
        }
        if self.quiescing() {
            // The poll fired before its cancel landed: start nothing. A
            // parked side stays parked in the record.
            if self.recv[src.idx()] == RecvState::Polling {
                self.recv[src.idx()] = RecvState::Off;
                self.parking[src.idx()] = true;
            }
            return;
        }
        if self.recv[src.idx()] == RecvState::Polling {
            // A parked side has something (data, EOF or an error): the recv
            // takes it from here.
            self.recv[src.idx()] = RecvState::Armed;
            self.active = true;
            out.push(Action::ArmRecv(src));
            return;
        }
        let flow = &self.flow[src.other().idx()];
        let Splice::On { in_pipe, end: None } = flow.splice else {
            return;
        };
        let left = flow.frames.payload_left();
        if in_pipe == 0 && self.close_waits_on_splice(src.other()) {
            return self.leave_splice(src, None, out);
        }
        if left > 0 {
            let read = left.min(SPLICE_CHUNK.saturating_sub(in_pipe) as u64) as usize;
            out.push(Action::Splice {
                src,
                read,
                pending: in_pipe,
            });
        } else {
            out.push(Action::ReadHeader {
                src,
                want: flow.frames.header_wanted(),
            });
        }
    }

    /// A splicing destination can take more of the pipe.
    pub fn on_writable(&mut self, dst: Side, out: &mut Vec<Action>) {
        if self.stage() == Stage::Closing || self.quiescing() {
            return;
        }
        if let Splice::On { in_pipe, .. } = self.flow[dst.idx()].splice {
            out.push(Action::Splice {
                src: dst.other(),
                read: 0,
                pending: in_pipe,
            });
        } else if let State::Serving {
            serve: Some(serve), ..
        } = &self.state
        {
            if serve.spliced.in_pipe > 0 {
                out.push(Action::PipeToClient {
                    pending: serve.spliced.in_pipe,
                });
            }
        }
    }

    /// The shard has no pipe to give: stay with buffers.
    pub fn on_no_pipe(&mut self, src: Side, out: &mut Vec<Action>) {
        if let Splice::On { in_pipe: 0, .. } = self.flow[src.other().idx()].splice {
            self.leave_splice(src, None, out);
        }
    }

    /// Header bytes of the next frame were read from `src` and put in the
    /// pipe (`Ok(bytes)`), or the read found nothing, EOF or an error.
    pub fn on_header(&mut self, src: Side, res: Result<&[u8], i32>, out: &mut Vec<Action>) {
        if self.stage() == Stage::Closing {
            return;
        }
        let dst = src.other();
        let flow = &mut self.flow[dst.idx()];
        let Splice::On { in_pipe, end } = flow.splice else {
            return;
        };
        match res {
            Ok([]) => {
                flow.splice = Splice::On {
                    in_pipe,
                    end: Some(RecvEnd::Eof),
                };
                self.splice_flush(src, out);
            }
            Ok(bytes) => {
                flow.frames.feed(bytes);
                flow.splice = Splice::On {
                    in_pipe: in_pipe + bytes.len(),
                    end,
                };
                if flow.frames.payload_left() > 0 || flow.frames.at_boundary() {
                    // Straight on with the payload (or the next header,
                    // after an empty frame).
                    self.on_readable(src, out);
                } else {
                    // Part of a header: the rest is not here yet.
                    self.splice_flush(src, out);
                }
            }
            Err(libc::EAGAIN) => {
                if flow.frames.at_boundary() && in_pipe == 0 {
                    // Idle between frames: back to buffers, so an idle
                    // direction holds no pipe.
                    self.leave_splice(src, None, out);
                } else {
                    self.splice_flush(src, out);
                }
            }
            Err(e) => {
                flow.splice = Splice::On {
                    in_pipe,
                    end: Some(RecvEnd::Error(e)),
                };
                self.splice_flush(src, out);
            }
        }
    }

    /// Sends what the pipe holds, or waits for more from `src`.
    pub(super) fn splice_flush(&mut self, src: Side, out: &mut Vec<Action>) {
        let flow = &self.flow[src.other().idx()];
        match flow.splice {
            Splice::On { in_pipe, .. } if in_pipe > 0 => out.push(Action::Splice {
                src,
                read: 0,
                pending: in_pipe,
            }),
            Splice::On { end: Some(why), .. } => self.leave_splice(src, Some(why), out),
            Splice::On { .. } => out.push(Action::PollIn(src)),
            _ => {}
        }
    }

    /// Back to buffers with an empty pipe. A source that ended is handled
    /// now (no recv is armed on it); otherwise its recv is armed again.
    pub(super) fn leave_splice(&mut self, src: Side, end: Option<RecvEnd>, out: &mut Vec<Action>) {
        let dst = src.other();
        self.flow[dst.idx()].splice = Splice::Off;
        out.push(Action::LeaveSplice {
            dst,
            reusable: true,
        });
        match end {
            Some(why) => self.on_recv_end_spliced(src, why, out),
            None if self.wants_recv(src) => self.ensure_recv(src, out),
            None => {}
        }
        self.try_clean_close(out);
    }

    /// A splice step moved `got` bytes in from `src` (`None`: none asked)
    /// and `put` bytes out to the other side.
    pub fn on_spliced(
        &mut self,
        src: Side,
        got: Option<Result<usize, i32>>,
        put: Result<usize, i32>,
        out: &mut Vec<Action>,
    ) {
        if self.stage() == Stage::Closing {
            return;
        }
        let dst = src.other();
        let flow = &mut self.flow[dst.idx()];
        let Splice::On {
            mut in_pipe,
            mut end,
        } = flow.splice
        else {
            return;
        };
        match got {
            None | Some(Err(libc::EAGAIN)) => {}
            Some(Ok(0)) => end = Some(RecvEnd::Eof),
            Some(Ok(n)) => {
                flow.frames.skip(n as u64);
                in_pipe += n;
            }
            Some(Err(e)) => end = Some(RecvEnd::Error(e)),
        }
        match put {
            Ok(m) => {
                in_pipe -= m;
                flow.bytes += m as u64;
                flow.moved |= m > 0;
            }
            Err(libc::EAGAIN) => {}
            Err(_) => {
                // The destination is gone; what is in the pipe goes with it.
                flow.splice = Splice::Off;
                out.push(Action::LeaveSplice {
                    dst,
                    reusable: false,
                });
                self.write_failed(dst, out);
                if let Some(why) = end {
                    self.on_recv_end_spliced(src, why, out);
                } else if self.wants_recv(src) {
                    self.ensure_recv(src, out);
                }
                return;
            }
        }
        flow.splice = Splice::On { in_pipe, end };
        if in_pipe > 0 {
            out.push(Action::PollOut(dst));
        } else if end.is_some() {
            self.splice_flush(src, out);
        } else if self.close_waits_on_splice(dst) {
            // The pipe is empty at a boundary and a clean close waits for
            // this direction: back to buffers now, not at the next byte.
            self.leave_splice(src, None, out);
        } else {
            // Next: more payload, or the next frame's header.
            out.push(Action::PollIn(src));
        }
    }

    /// A clean close waits for the direction towards `dst`, which is
    /// splicing and sits at a boundary it can close at: it should go back
    /// to buffers, so a Close can be queued behind what it moved.
    fn close_waits_on_splice(&self, dst: Side) -> bool {
        let f = &self.flow[dst.idx()].frames;
        self.close_wanted()
            .is_some_and(|(_, frames_ok)| f.at_message_boundary() || (frames_ok && f.at_boundary()))
    }

    /// A source that was being spliced ended, and everything it sent is out.
    pub(super) fn on_recv_end_spliced(&mut self, src: Side, why: RecvEnd, out: &mut Vec<Action>) {
        match why {
            RecvEnd::Error(_) if !self.going_away() => self.peer_reset(src, out),
            RecvEnd::Error(_) => self.close(Closer::Error, out),
            _ => self.on_eof(src, out),
        }
    }
}

/// How bytes move in one direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Splice {
    /// Provided buffers: multishot recv, then send from the same buffer.
    #[default]
    Off,
    /// Switching to splice: the source's recv is being stopped and what it
    /// already received goes out first, so bytes stay in order.
    Pending,
    /// `splice(2)` through a pipe: payloads spliced, headers read (a few
    /// bytes) and written into the pipe in order, until the source is idle
    /// at a frame boundary. `in_pipe` bytes wait for the destination.
    /// `end`: the source ended (EOF or error), handled once the pipe is
    /// empty.
    On {
        in_pipe: usize,
        end: Option<RecvEnd>,
    },
}

/// Bytes one splice step asks for; the shard's pipes are this big.
pub const SPLICE_CHUNK: usize = 256 * 1024;
