//! The clean close: the one way ringlb ends a relaying WebSocket session
//! on its own (backend drain, rebalance, shutdown, the drain deadline).
//!
//! ```text
//! Upgraded ──request_close──► CloseWanted { message boundaries }
//!    │                           │ both directions between messages
//!    │                           │   (cut inside the buffer that reaches it)
//!    │                           ▼
//!    │                        Close 1012 to the client, masked Close 1001 to
//!    │                        the backend, write halves shut behind them
//!    │                        = Upgraded { going_away } ── both EOFs, or
//!    │                           │                         linger_timeout ──► Closing
//!    │   close_boundary_timeout  │
//!    │   ──► CloseWanted { frame boundaries } ── linger_timeout ──► FIN (Closing)
//!    └── not both ways open (half-closed, failed): FIN at once
//! ```
//!
//! - **Boundaries.** Each direction's [`FrameTracker`] knows whether what
//!   was received so far ends between messages. Everything received is
//!   queued before the Close, so a Close queued when both trackers are
//!   between messages lands between messages in both output streams.
//! - **The cut.** While a close is wanted, a buffer received from a side
//!   is fed to its tracker only up to the first boundary. If the other
//!   direction is between messages then, the bytes up to the boundary are
//!   relayed, the Close frames go behind them, and the rest of the buffer
//!   is dropped: that peer has been sent a Close, and after a Close no data
//!   frame may follow. From then on everything received is dropped,
//!   including the peers' Close replies, which are answers to ringlb, not
//!   to the other side.
//! - **Splice.** A direction moving a big frame by splice has no queue to
//!   put a Close behind; no new splice starts once a close is wanted, and a
//!   splicing direction counts as not ready until it is back on buffers,
//!   which it is as soon as its pipe is empty at a boundary
//!   ([`Conn::on_readable`] leaves splice mode then).
//! - **Fallbacks.** After `close_boundary_timeout` without a moment where
//!   both directions are between messages (a peer streaming a fragmented
//!   message, or both streaming without pause), any frame boundary will
//!   do; after `linger_timeout` more, the session is closed with FIN. Which
//!   way a session ended is [`CloseKind`], counted by the shard.

use super::*;

/// How a close that ringlb asked for ended, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// Close frames between messages both ways.
    Message,
    /// Close frames at a frame boundary, inside a fragmented message.
    Frame,
    /// No boundary in time, or the session could not take a Close: FIN.
    Fin,
}

impl Conn {
    /// Asks for a clean close with `why` (the access log's reason).
    /// `boundary_wait`: how long to wait for a moment between messages
    /// before any frame boundary will do (zero: at once; the drain
    /// deadline uses that). Returns false if the session was already being
    /// closed (a zero wait still hurries a close that waits for a message
    /// boundary: the deadline does not wait for close_boundary_timeout). A
    /// session that is not relaying an upgrade is closed at once.
    pub fn request_close(
        &mut self,
        why: Closer,
        boundary_wait: Duration,
        out: &mut Vec<Action>,
    ) -> bool {
        match self.state {
            State::Relaying(Relay::Upgraded { going_away: false }) => {}
            State::Relaying(Relay::CloseWanted {
                why,
                frames_ok: false,
            }) if boundary_wait.is_zero() => {
                self.state = State::Relaying(Relay::CloseWanted {
                    why,
                    frames_ok: true,
                });
                out.push(Action::Timer(
                    TimerKind::CloseBoundary { fin: true },
                    self.linger,
                ));
                self.try_clean_close(out);
                return false;
            }
            State::Relaying(Relay::Upgraded { going_away: true } | Relay::CloseWanted { .. })
            | State::Closing => return false,
            _ => {
                self.close(why, out);
                return true;
            }
        }
        if self.status != Some(101) || self.flow.iter().any(|f| f.shut || f.src_eof || f.dead) {
            // Half-closed or failed one way: a Close could not reach that
            // peer, and the session is ending anyway.
            self.close_kind = Some(CloseKind::Fin);
            self.close(why, out);
            return true;
        }
        let frames_ok = boundary_wait.is_zero();
        self.state = State::Relaying(Relay::CloseWanted { why, frames_ok });
        // A parked session is woken so that what it receives is seen.
        self.parking = [false, false];
        if frames_ok {
            out.push(Action::Timer(
                TimerKind::CloseBoundary { fin: true },
                self.linger,
            ));
        } else {
            out.push(Action::Timer(
                TimerKind::CloseBoundary { fin: false },
                boundary_wait,
            ));
        }
        self.try_clean_close(out);
        true
    }

    /// A relaying WebSocket session that nobody is closing yet.
    pub fn can_close_cleanly(&self) -> bool {
        self.status == Some(101)
            && matches!(
                self.state,
                State::Relaying(Relay::Upgraded { going_away: false })
            )
    }

    /// A clean close is wanted and has not happened yet.
    pub(super) fn close_wanted(&self) -> Option<(Closer, bool)> {
        match self.state {
            State::Relaying(Relay::CloseWanted { why, frames_ok }) => Some((why, frames_ok)),
            _ => None,
        }
    }

    /// The direction towards `dst` ends at a boundary (a message boundary
    /// unless `frames_ok`) and is on buffers, so a Close can be queued.
    fn ready(&self, dst: Side, frames_ok: bool) -> bool {
        let f = &self.flow[dst.idx()];
        let boundary = if frames_ok {
            f.frames.at_boundary()
        } else {
            f.frames.at_message_boundary()
        };
        boundary && f.splice == Splice::Off && !f.shut && !f.src_eof && !f.dead
    }

    /// Closes now if both directions are ready.
    pub(super) fn try_clean_close(&mut self, out: &mut Vec<Action>) {
        let Some((why, frames_ok)) = self.close_wanted() else {
            return;
        };
        if self.ready(Side::Client, frames_ok) && self.ready(Side::Backend, frames_ok) {
            self.inject_close(why, frames_ok, out);
        }
    }

    /// Bytes from `src` while a close is wanted: relayed up to the first
    /// boundary; if the other direction is ready then, the Close frames go
    /// right behind them and the rest is dropped.
    pub(super) fn relay_until_close(
        &mut self,
        src: Side,
        bid: Option<u16>,
        data: &[u8],
        out: &mut Vec<Action>,
    ) {
        let Some((why, frames_ok)) = self.close_wanted() else {
            return;
        };
        let dst = src.other();
        let cut = if self.ready(src, frames_ok) && self.flow[dst.idx()].splice == Splice::Off {
            self.flow[dst.idx()]
                .frames
                .feed_to_boundary(data, !frames_ok)
        } else {
            self.flow[dst.idx()].frames.feed(data);
            None
        };
        match cut {
            None => {
                self.relay(src, bid, data, out);
            }
            Some(0) => {
                release(bid, out);
                self.inject_close(why, frames_ok, out);
            }
            Some(k) => {
                self.relay(src, bid, &data[..k], out);
                if self.close_wanted().is_some() {
                    self.inject_close(why, frames_ok, out);
                }
            }
        }
    }

    /// Queues Close 1012 for the client and a masked Close 1001 for the
    /// backend behind everything received so far, shuts both write halves
    /// behind them, and waits for the peers to close (or `linger_timeout`).
    fn inject_close(&mut self, why: Closer, frames_ok: bool, out: &mut Vec<Action>) {
        self.state = State::Relaying(Relay::Upgraded { going_away: true });
        self.closer = Some(why);
        self.close_kind = Some(if frames_ok {
            CloseKind::Frame
        } else {
            CloseKind::Message
        });
        for (dst, frame) in [
            (
                Side::Client,
                frames::close_to_client(frames::CLOSE_SERVICE_RESTART),
            ),
            (
                Side::Backend,
                frames::close_to_backend(frames::CLOSE_GOING_AWAY),
            ),
        ] {
            self.enqueue(dst, frame);
            self.flow[dst.idx()].src_eof = true;
            self.kick(dst, out);
        }
        // Read both sides again: their Close replies and EOFs are awaited
        // (and dropped), whatever backpressure or parking had stopped.
        for side in [Side::Client, Side::Backend] {
            // (A parked side's poll fires on the reply and arms its recv.)
            if self.recv[side.idx()] == RecvState::Off {
                self.ensure_recv(side, out);
            }
        }
        out.push(Action::Timer(TimerKind::Linger, self.linger));
    }

    /// `close_boundary_timeout` passed (`fin: false`): any frame boundary
    /// will do from now on, for `linger_timeout` more; then (`fin: true`)
    /// the session is closed with FIN.
    pub(super) fn on_close_boundary_timer(&mut self, fin: bool, out: &mut Vec<Action>) {
        let Some((why, _)) = self.close_wanted() else {
            return;
        };
        if fin {
            log::debug!(
                "{}: no frame boundary for a clean close; closing with FIN",
                self.client_addr
            );
            self.close_kind = Some(CloseKind::Fin);
            self.closer = Some(why);
            return self.close_now(out);
        }
        self.state = State::Relaying(Relay::CloseWanted {
            why,
            frames_ok: true,
        });
        out.push(Action::Timer(
            TimerKind::CloseBoundary { fin: true },
            self.linger,
        ));
        self.try_clean_close(out);
    }
}
