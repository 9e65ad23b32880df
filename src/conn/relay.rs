//! Moving bytes between the two sides once a backend is connected: the
//! per-direction [`Flow`] (queue of payloads, frame tracker, half-close and
//! failure flags), backpressure, the shared buffer pool's quota and unpin
//! sweep, stalled peers, half-close and the end of a session.
//!
//! Per direction: bytes received from one side are queued (as the provided
//! buffer they arrived in, no copy) towards the other and sent in order,
//! one send in flight at a time. A direction holding its quota of buffers
//! stops reading its source until it drains. EOF from a source shuts the
//! destination's write half once everything before it is sent; the session
//! ends when both write halves are shut (or, for a non-101 answer, with its
//! body).

use super::*;

impl Conn {
    /// Buffers a direction may hold: the configured bound, lowered while the
    /// shard's pool runs low.
    pub(super) fn queue_limit(&self) -> usize {
        self.max_queue.min(POOL_QUOTA.with(|q| q.get()))
    }

    /// Queues `data`, received from `src` (still in provided buffer `bid`
    /// if `Some`), towards the other side: the buffer itself when both
    /// transports carry bytes as they are (no copy), else an encoded copy.
    pub(super) fn relay(
        &mut self,
        src: Side,
        bid: Option<u16>,
        data: &[u8],
        out: &mut Vec<Action>,
    ) {
        let dst = src.other();
        if let State::Relaying(Relay::Response { gzip: Some(g) }) = &mut self.state {
            // The answer is compressed on its way: what the backend sent is
            // consumed here, its buffer given back at once.
            release(bid, out);
            let bytes = match g.feed(data) {
                Ok(b) => b,
                Err(_) => return self.close(Closer::Error, out),
            };
            let done = g.done;
            if !bytes.is_empty() && !self.flow[dst.idx()].dead {
                self.enqueue(dst, bytes);
                self.kick(dst, out);
            }
            if done {
                self.flow[dst.idx()].limit = Some(0);
                self.maybe_finish(out);
            }
            self.backpressure(src, out);
            return;
        }
        let flow = &mut self.flow[dst.idx()];
        if flow.dead {
            return release(bid, out);
        }
        let mut keep = data.len();
        if let Some(limit) = &mut flow.limit {
            // A non-101 response ends with its body; anything after is not ours to relay.
            keep = (*limit).min(keep as u64) as usize;
            *limit -= keep as u64;
            if keep == 0 {
                release(bid, out);
                self.maybe_finish(out);
                return;
            }
        }
        let payload = match bid {
            Some(bid) if self.transport[dst.idx()].in_place() => Payload::Ring {
                bid,
                start: 0,
                len: keep as u32,
            },
            _ => {
                release(bid, out);
                Payload::owned(self.transport[dst.idx()].encode(data[..keep].to_vec()))
            }
        };
        let flow = &mut self.flow[dst.idx()];
        flow.queue.push_back(payload);
        self.kick(dst, out);
        self.backpressure(src, out);
    }

    /// Stops reading `src` while the direction it feeds holds its quota
    /// (or its reader stalled).
    fn backpressure(&mut self, src: Side, out: &mut Vec<Action>) {
        let flow = &self.flow[src.other().idx()];
        if (flow.stalled || flow.queue.len() >= self.queue_limit())
            && self.recv[src.idx()] == RecvState::Armed
        {
            self.recv[src.idx()] = RecvState::Cancelling;
            out.push(Action::CancelRecv(src));
        }
    }

    /// Starts a send to `dst` if one can go now.
    pub(super) fn kick(&mut self, dst: Side, out: &mut Vec<Action>) {
        let ready = (dst == Side::Client || self.connected()) && !self.quiescing();
        let flow = &mut self.flow[dst.idx()];
        if ready && !flow.sending && !flow.queue.is_empty() {
            flow.sending = true;
            out.push(Action::Send(dst));
        }
    }

    /// A send to `dst` completed with `res` bytes (or an errno).
    pub fn on_send(&mut self, dst: Side, res: Result<usize, i32>, out: &mut Vec<Action>) {
        if self.stage() == Stage::Closing {
            return;
        }
        if matches!(self.stage(), Stage::Retrying { .. }) {
            // The failed backend's last send: what it carried is resent
            // from the replay copy.
            let flow = &mut self.flow[dst.idx()];
            flow.sending = false;
            if let Some(Payload::Ring { bid, .. }) = flow.queue.pop_front() {
                out.push(Action::Release(bid));
            }
            return;
        }
        let n = match res {
            Ok(n) => n,
            Err(_) => {
                if self.stage() == Stage::Responding && dst == Side::Backend {
                    // The backend was aborted; its failed send is expected.
                    self.flow[dst.idx()].sending = false;
                    return;
                }
                if self.stage() == Stage::AwaitingResponse && dst == Side::Backend {
                    self.flow[dst.idx()].sending = false;
                    return self.backend_failed("backend failed before answering", out);
                }
                if self.stage() == Stage::Relaying && !self.going_away() {
                    self.flow[dst.idx()].sending = false;
                    self.write_failed(dst, out);
                    return;
                }
                self.close(Closer::Error, out);
                return;
            }
        };
        let flow = &mut self.flow[dst.idx()];
        flow.sending = false;
        flow.pinned_seen = false;
        flow.unpinning = false;
        flow.moved |= n > 0;
        flow.bytes += n as u64;
        let front = flow
            .queue
            .front_mut()
            .expect("send completed for an empty queue");
        front.advance(n);
        if front.remaining() == 0 {
            if let Some(Payload::Ring { bid, .. }) = flow.queue.pop_front() {
                out.push(Action::Release(bid));
            }
        }
        if flow.queue.is_empty() {
            // The slow reader took everything: read its source again.
            flow.stalled = false;
        }
        self.kick(dst, out);
        self.maybe_start_splice(dst, out);
        if self.stage() == Stage::Serving {
            let flow = &self.flow[dst.idx()];
            if flow.queue.is_empty() && !flow.sending {
                let next = serve_mut(&mut self.state).on_sent();
                self.follow(next, out);
            }
            return;
        }
        let src = dst.other();
        let flow = &self.flow[dst.idx()];
        if flow.queue.is_empty() && !flow.sending {
            if self.stage() == Stage::Responding && dst == Side::Client {
                self.flow[dst.idx()].shut = true;
                out.push(Action::ShutdownWrite(Side::Client));
                self.ensure_recv(Side::Client, out);
                return;
            }
            if flow.src_eof && !flow.shut {
                self.flow[dst.idx()].shut = true;
                out.push(Action::ShutdownWrite(dst));
            }
            self.maybe_finish(out);
        }
        if self.stage() != Stage::Closing
            && self.recv[src.idx()] == RecvState::Off
            && self.wants_recv(src)
        {
            self.recv[src.idx()] = RecvState::Armed;
            out.push(Action::ArmRecv(src));
        }
    }

    pub(super) fn wants_recv(&self, src: Side) -> bool {
        let flow = &self.flow[src.other().idx()];
        if flow.splice != Splice::Off {
            return false;
        }
        // No recv on a backend socket that is not connected (yet, or any
        // more): a buffer wait from a socket a retry replaced must not arm
        // one on the new socket while it connects (found by prop_tests).
        if src == Side::Backend && !self.connected() {
            return false;
        }
        match self.stage() {
            Stage::Closing => false,
            Stage::Responding => src == Side::Client,
            Stage::Serving => try_hs(&self.state).is_some_and(|hs| {
                !self.peer_eof[0] && hs.head.len() < hs.snap.config.server.max_request_head.get()
            }),
            Stage::Connecting { .. }
            | Stage::AwaitingResponse
            | Stage::Retrying { .. }
            | Stage::Relaying
                if src == Side::Client
                    && !matches!(self.upload, Upload::Body(_) | Upload::Open) =>
            {
                false
            }
            Stage::Relaying if self.quiescing() => false,
            Stage::Relaying if self.going_away() => !self.peer_eof[src.idx()],
            _ => !flow.src_eof && !flow.stalled && flow.queue.len() < self.queue_limit(),
        }
    }

    pub(super) fn ensure_recv(&mut self, side: Side, out: &mut Vec<Action>) {
        if self.recv[side.idx()] == RecvState::Off {
            self.recv[side.idx()] = RecvState::Armed;
            out.push(Action::ArmRecv(side));
        }
    }

    /// Provided buffers are back after this side starved.
    pub fn on_buffers_available(&mut self, side: Side, out: &mut Vec<Action>) {
        if self.wants_recv(side) {
            self.ensure_recv(side, out);
        }
    }

    pub(super) fn on_eof(&mut self, side: Side, out: &mut Vec<Action>) {
        self.peer_eof[side.idx()] = true;
        match (self.stage(), side) {
            (Stage::ReadingHead, _) | (Stage::Responding, Side::Client) => {
                self.close(Closer::Client, out)
            }
            // The client half-closed after its request: answer it, then close.
            (Stage::Serving, _) => {}
            (Stage::Responding, Side::Backend) => {}
            (Stage::AwaitingResponse, Side::Backend) => {
                self.backend_failed("backend closed before answering", out);
            }
            (Stage::Connecting { .. } | Stage::AwaitingResponse, Side::Client)
                if self.upload == Upload::HeldFor101 =>
            {
                // Passed on after the 101, behind the held bytes.
                hs_mut(&mut self.state).early_eof = true;
            }
            _ => {
                let dst = side.other();
                if let State::Relaying(Relay::Response { gzip: Some(g) }) = &mut self.state {
                    // The backend closed: the end of a close-delimited body
                    // (or a cut one); the compressed stream ends too.
                    let rest = g.finish();
                    if !rest.is_empty() && !self.flow[dst.idx()].dead {
                        self.enqueue(dst, rest);
                        self.kick(dst, out);
                    }
                }
                let writable = dst == Side::Client || self.connected();
                let flow = &mut self.flow[dst.idx()];
                flow.src_eof = true;
                if flow.queue.is_empty() && !flow.sending && !flow.shut && writable {
                    flow.shut = true;
                    out.push(Action::ShutdownWrite(dst));
                }
                if self.closer.is_none() {
                    self.closer = Some(if side == Side::Client {
                        Closer::Client
                    } else {
                        Closer::Backend
                    });
                }
                self.maybe_finish(out);
            }
        }
    }

    /// Ends the session once every direction that is going to finish has.
    pub(super) fn maybe_finish(&mut self, out: &mut Vec<Action>) {
        if self.stage() != Stage::Relaying {
            return;
        }
        if self.going_away() {
            // Closing before the peers answer our Close would make their
            // reply meet a closed socket, and the reset could destroy our
            // Close frame unread; wait for both EOFs (or the linger timer).
            if self.peer_eof == [true, true] {
                self.close_now(out);
            }
            return;
        }
        let to_client = &self.flow[Side::Client.idx()];
        let drained = to_client.queue.is_empty() && !to_client.sending;
        if self.finish_with_response()
            && drained
            && (to_client.limit == Some(0) || to_client.src_eof)
        {
            self.closer.get_or_insert(Closer::Backend);
            if self.peer_eof[Side::Client.idx()] {
                self.close_now(out);
            } else {
                self.linger_close(out);
            }
            return;
        }
        let to_backend = &self.flow[Side::Backend.idx()];
        if to_client.shut && to_backend.shut {
            self.close_now(out);
        }
    }

    /// `side` reset its connection while relaying. What it sent before the
    /// reset still goes to the other side (a Close frame, say), then the
    /// session ends; nothing more can reach `side`.
    pub(super) fn peer_reset(&mut self, side: Side, out: &mut Vec<Action>) {
        self.closer.get_or_insert(Closer::Error);
        // EOF first: the read side has ended, so no recv is re-armed.
        self.on_eof(side, out);
        self.write_failed(side, out);
    }

    /// A send to `dst` failed: nothing more can go that way. What `dst`
    /// sent before it went away may still be unread in our socket (a peer
    /// that closes with unread data resets, and its last frame, often a
    /// Close, arrives just ahead of the reset), so the read side carries on
    /// until it reports its own end; only then does the session finish.
    pub(super) fn write_failed(&mut self, dst: Side, out: &mut Vec<Action>) {
        self.closer.get_or_insert(Closer::Error);
        let to_dead = &mut self.flow[dst.idx()];
        if to_dead.dead {
            return;
        }
        to_dead.dead = true;
        release_unsent(to_dead, out);
        to_dead.shut = true;
        if self.recv[dst.idx()] == RecvState::Off && self.wants_recv(dst) {
            self.ensure_recv(dst, out);
        }
        self.maybe_finish(out);
    }

    /// The shard's idle sweep: a relaying session that received nothing
    /// since the previous sweep, with nothing queued, is parked (both
    /// recvs stopped and replaced by readiness polls). Returns whether it
    /// was parked now.
    pub fn idle_sweep(&mut self, out: &mut Vec<Action>) -> bool {
        if std::mem::take(&mut self.active) {
            return false;
        }
        let quiet = matches!(
            self.state,
            State::Relaying(Relay::Upgraded { going_away: false })
        ) && self.recv == [RecvState::Armed, RecvState::Armed]
            && self
                .flow
                .iter()
                .all(|f| f.queue.is_empty() && !f.sending && f.splice == Splice::Off);
        if !quiet {
            return false;
        }
        for side in [Side::Client, Side::Backend] {
            self.recv[side.idx()] = RecvState::Cancelling;
            self.parking[side.idx()] = true;
            out.push(Action::CancelRecv(side));
        }
        true
    }

    /// The shard's pool is running low: a direction whose send has been in
    /// flight since the last sweep is not being read by its peer. What it
    /// holds of the pool is copied out (`copy` gives a buffer's bytes) and
    /// given back: queued payloads now, the one in flight once its cancel
    /// returns ([`Conn::on_send_unpinned`]). Its source stays unread until it
    /// drains, so what the slow reader has not taken waits in kernel socket
    /// buffers, which are per socket, not in the shared pool.
    pub fn unpin(&mut self, copy: &mut dyn FnMut(u16, u32, u32) -> Vec<u8>, out: &mut Vec<Action>) {
        if self.stage() == Stage::Closing {
            return;
        }
        for dst in [Side::Client, Side::Backend] {
            let flow = &mut self.flow[dst.idx()];
            // Stuck on a send, holding pool buffers: in flight, or queued
            // behind it (a recv burst lands before the recv can be stopped).
            let pinned = flow.sending
                && flow
                    .queue
                    .iter_mut()
                    .any(|p| matches!(p, Payload::Ring { .. }));
            if !pinned {
                continue;
            }
            if !std::mem::replace(&mut flow.pinned_seen, true) {
                continue;
            }
            flow.stalled = true;
            for p in flow.queue.iter_mut().skip(1) {
                if let Payload::Ring { bid, start, len } = *p {
                    *p = Payload::owned(copy(bid, start, len));
                    out.push(Action::Release(bid));
                }
            }
            let front_pinned = matches!(flow.queue.front(), Some(Payload::Ring { .. }));
            if front_pinned && !flow.unpinning {
                flow.unpinning = true;
                out.push(Action::CancelSend(dst));
            }
        }
    }

    /// Whether a cancelled send towards `dst` was one [`Conn::unpin`] asked
    /// to cancel.
    pub fn is_unpinning(&self, dst: Side) -> bool {
        self.flow[dst.idx()].unpinning
    }

    /// The send [`Conn::unpin`] cancelled has returned, having sent nothing:
    /// its bytes are copied out of the pool and sent again from the copy.
    pub fn on_send_unpinned(
        &mut self,
        dst: Side,
        copy: &mut dyn FnMut(u16, u32, u32) -> Vec<u8>,
        out: &mut Vec<Action>,
    ) {
        let closing = self.stage() == Stage::Closing;
        let flow = &mut self.flow[dst.idx()];
        flow.sending = false;
        flow.unpinning = false;
        flow.pinned_seen = false;
        if closing {
            return;
        }
        if let Some(p) = flow.queue.front_mut() {
            if let Payload::Ring { bid, start, len } = *p {
                *p = Payload::owned(copy(bid, start, len));
                out.push(Action::Release(bid));
            }
        }
        self.kick(dst, out);
    }

    /// The stall sweep: a relaying direction with bytes waiting that moved
    /// none since the previous sweep counts one more; at `limit` sweeps in a
    /// row its peer is closed. A silent session with nothing waiting never
    /// counts: this is not an idle timeout. Returns whether it closed.
    pub fn stall_sweep(&mut self, limit: Option<u16>, out: &mut Vec<Action>) -> bool {
        if !matches!(
            self.state,
            State::Relaying(Relay::Upgraded { going_away: false } | Relay::CloseWanted { .. })
        ) {
            return false;
        }
        for dst in [Side::Client, Side::Backend] {
            let flow = &mut self.flow[dst.idx()];
            let waiting = flow.sending
                || !flow.queue.is_empty()
                || matches!(flow.splice, Splice::On { in_pipe, .. } if in_pipe > 0);
            if !waiting || std::mem::take(&mut flow.moved) || flow.dead {
                flow.stall_sweeps = 0;
                continue;
            }
            flow.stall_sweeps = flow.stall_sweeps.saturating_add(1);
            if limit.is_some_and(|l| flow.stall_sweeps >= l) {
                log::info!(
                    "{}: the {} took nothing while {} bytes waited for it; closing (stalled_peer_timeout)",
                    self.client_addr,
                    if dst == Side::Client { "client" } else { "backend" },
                    flow.queue.iter_mut().map(|p| p.remaining()).sum::<usize>(),
                );
                self.closer = Some(Closer::StalledPeer);
                // A reset, not a FIN behind data the peer will not take:
                // the kernel frees the socket now instead of probing a zero
                // window until TCP_USER_TIMEOUT.
                out.push(Action::ResetOnClose(dst));
                self.close_now(out);
                return true;
            }
        }
        false
    }
}

/// One direction of flow: bytes going *to* `Side`.
#[derive(Debug, Default)]
pub(super) struct Flow {
    pub(super) queue: Queue,
    /// Frame boundaries of what flows this way (meaningful once upgraded).
    pub(super) frames: FrameTracker,
    pub(super) sending: bool,
    /// The source side reached EOF; shut our write half once drained.
    pub(super) src_eof: bool,
    pub(super) shut: bool,
    /// The destination reset its connection: nothing can be sent to it.
    pub(super) dead: bool,
    pub(super) bytes: u64,
    /// Body bytes still expected before the session ends (non-101 responses).
    pub(super) limit: Option<u64>,
    pub(super) splice: Splice,
    /// A send towards this side completed with bytes since the last stall
    /// sweep.
    pub(super) moved: bool,
    /// Stall sweeps in a row that found bytes waiting and none moved.
    pub(super) stall_sweeps: u16,
    /// The send in flight was already in flight at the last unpin sweep.
    pub(super) pinned_seen: bool,
    /// Its cancel is asked for, to move its bytes off the shared pool.
    pub(super) unpinning: bool,
    /// Its reader took nothing while the pool ran low: the source stays
    /// unread until everything queued here is sent, so a slow reader holds
    /// at most what it held then, and the rest waits in kernel buffers.
    pub(super) stalled: bool,
}

/// Drops what is queued but not yet handed to the kernel.
pub(super) fn release_unsent(flow: &mut Flow, out: &mut Vec<Action>) {
    let keep = usize::from(flow.sending);
    while flow.queue.len() > keep {
        if let Some(Payload::Ring { bid, .. }) = flow.queue.pop_back() {
            out.push(Action::Release(bid));
        }
    }
}

/// How many pool buffers one direction may queue, given how much of the
/// shard's pool is free: `max` while at least half is free, then falling
/// linearly to 1 as the pool empties, so that directions whose readers are
/// slow give way to the others instead of draining the pool between them.
pub fn pool_quota(max: usize, free: usize, total: usize) -> usize {
    if free * 2 >= total {
        max
    } else {
        (max * free * 2 / total.max(1)).clamp(1, max)
    }
}

/// Set by the shard before it feeds completions (one pool per shard thread).
pub fn set_pool_quota(n: usize) {
    POOL_QUOTA.with(|q| q.set(n));
}
