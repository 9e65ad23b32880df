//! One proxied connection as a sans-IO state machine.
//!
//! The shard feeds it completions (`on_*` methods) and executes the
//! [`Action`]s it pushes; the machine never touches a socket. The stage is
//! a [`State`] enum whose variants hold what only that stage needs (the
//! handshake state before relaying, the static answer while serving, the
//! relay mode while relaying), so a field that means nothing in a stage
//! does not exist there. Stages, in order:
//!
//! ```text
//! ReadingHead ──► Connecting(n) ──► AwaitingResponse ──► Relaying ──► Closing
//!   │  ▲            │ ▲ retry next backend  │  │           Upgraded / Response /
//!   │  │            └─┘ (Retrying(n))       │  │           Quiescing (export)
//!   ▼  │ keep-alive                         │  └─ non-101 answer done ─► Responding (linger)
//! Serving (static)  └──────────────────────┴──────► Responding (ringlb's own 4xx/5xx, linger)
//! ```
//!
//! - `ReadingHead`: client recv armed; bytes accumulate in a small head
//!   buffer that exists only until the head is parsed. Handshake timer runs.
//! - `Connecting(n)`: a backend was picked (its lease counts it); the
//!   forwarded head waits in the backend queue. Connect timer runs. Failure
//!   → next backend, bounded by the number of backends, then 502 (or 504 if
//!   the last one timed out).
//! - `AwaitingResponse`: backend bytes accumulate until the response head
//!   parses. 101 with the right accept key → `Relaying`; another status →
//!   relayed, and the connection ends with its body. The response timer
//!   starts once the request body is in; while it is still arriving, an
//!   upload timer only checks that it keeps moving.
//! - `Relaying`: bytes move in provided buffers from one side's recv to the
//!   other side's send, no copy (big frames by splice). No timer for a
//!   WebSocket session (a non-101 answer has the send timer, as static
//!   answers do). Backpressure, the pool quota, half-close and failures are
//!   in `relay.rs`.
//! - `Responding`: ringlb's own answer (or the end of a proxied non-101
//!   one) is sent, the client's write half is shut, and what the client
//!   still sends is discarded until it closes or the linger timer fires
//!   (so it reads the answer instead of a reset).
//! - `Closing`: the shard cancels every op and frees the slot when the
//!   kernel has returned them all; completions that still arrive only give
//!   their buffers back.
//!
//! What reaches the backend connection ([`Upload`]): exactly one head that
//! ringlb wrote, plus that request's declared body (Content-Length, or
//! chunked to its last chunk, tracked by `body.rs`), and after a 101 the
//! client's frames.
//!
//! Files: `action.rs` (what crosses to the shard), `handshake.rs` (head to
//! answer: routing, pick, retries, upload), `relay.rs` (flows,
//! backpressure, pool, stalls), `splice.rs` (big frames), `serve.rs`
//! (static answers), `export.rs` (a session as a record, for hand-off),
//! `transport.rs` (the seam a TLS session sits in), `body.rs`,
//! `frames.rs`, `queue.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::RouteTarget;
use crate::files;
use crate::http::{self, Body, Reject, Request};
use crate::route;
use crate::snapshot::Snapshot;
use crate::upstream::{Lease, Rng};

mod action;
mod body;
mod close;
mod export;
mod frames;
mod gzip;
mod handshake;
mod intern;
mod queue;
mod relay;
mod serve;
mod splice;
mod tls;
mod transport;
pub use action::{Action, Closer, Done, Owned, Payload, RecvEnd, Side, TimerKind};
use body::BodyTracker;
pub use close::CloseKind;
pub use export::{FlowRecord, RecordError, SessionRecord, TlsSide, RECORD_VERSION};
use frames::FrameTracker;
use handshake::{Handshake, ProxyIn, Upload};
use queue::Queue;
pub use relay::{pool_quota, set_pool_quota};
use relay::{release_unsent, Flow};
use splice::Splice;
pub use splice::SPLICE_CHUNK;
pub use tls::{DirRecord, TlsInfo, TlsRecord};
pub use transport::Transport;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    ReadingHead,
    Connecting {
        attempt: u32,
    },
    AwaitingResponse,
    /// The backend failed before answering; its socket is being released
    /// so the request can be sent again to the next backend.
    Retrying {
        attempt: u32,
    },
    Relaying,
    /// Answering from a static route.
    Serving,
    Responding,
    Closing,
}

/// The stage a connection is in, with what only that stage needs: a
/// field that means nothing in a stage does not exist there.
#[derive(Debug)]
enum State {
    ReadingHead(Box<Handshake>),
    Connecting {
        hs: Box<Handshake>,
        attempt: u32,
    },
    AwaitingResponse(Box<Handshake>),
    Retrying {
        hs: Box<Handshake>,
        attempt: u32,
    },
    Relaying(Relay),
    /// The handshake state stays for the next request of a kept-alive
    /// connection; `serve` is the answer in progress (taken when it ends).
    Serving {
        hs: Box<Handshake>,
        serve: Option<Box<files::Serve>>,
    },
    Responding,
    Closing,
}

/// The handshake state of a stage that has one (all before `Relaying`,
/// and `Serving`, which keeps it for the next request). Free functions over
/// the field, so the rest of the connection stays borrowable beside it.
fn try_hs(state: &State) -> Option<&Handshake> {
    match state {
        State::ReadingHead(hs)
        | State::Connecting { hs, .. }
        | State::AwaitingResponse(hs)
        | State::Retrying { hs, .. }
        | State::Serving { hs, .. } => Some(hs),
        State::Relaying(_) | State::Responding | State::Closing => None,
    }
}

fn try_hs_mut(state: &mut State) -> Option<&mut Handshake> {
    match state {
        State::ReadingHead(hs)
        | State::Connecting { hs, .. }
        | State::AwaitingResponse(hs)
        | State::Retrying { hs, .. }
        | State::Serving { hs, .. } => Some(hs),
        State::Relaying(_) | State::Responding | State::Closing => None,
    }
}

fn hs(state: &State) -> &Handshake {
    try_hs(state).expect("this stage has no handshake state")
}

fn hs_mut(state: &mut State) -> &mut Handshake {
    try_hs_mut(state).expect("this stage has no handshake state")
}

fn serve_mut(state: &mut State) -> &mut files::Serve {
    match state {
        State::Serving {
            serve: Some(serve), ..
        } => serve,
        _ => panic!("no static answer in this stage"),
    }
}

/// What a relaying session carries.
#[derive(Debug)]
enum Relay {
    /// Switched protocols: frames both ways until both sides close.
    /// `going_away`: ringlb sent Close 1001 both ways (shutdown) and drops
    /// whatever arrives while it waits for the peers to close.
    Upgraded { going_away: bool },
    /// A non-101 answer: the session ends with its body, compressed on
    /// the way if the route says so.
    Response { gzip: Option<Box<gzip::GzipRelay>> },
    /// Upgraded, and being taken out of this process (`export.rs`): what
    /// is in flight is cancelled and nothing is started again.
    Quiescing,
    /// Upgraded, and ringlb wants to close it cleanly (`close.rs`): frames
    /// relay as before until both directions are between messages (any
    /// frame boundary once `frames_ok`), then Close frames go both ways
    /// and the session is `Upgraded { going_away: true }`.
    CloseWanted { why: Closer, frames_ok: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvState {
    Off,
    Armed,
    Cancelling,
    /// Parked: a one-shot readiness poll instead of a recv; the recv is
    /// armed again when it fires.
    Polling,
}

#[derive(Debug)]
pub struct Conn {
    /// The stage, holding what only that stage needs.
    state: State,
    pub client_addr: SocketAddr,
    recv: [RecvState; 2],
    /// Indexed by destination side.
    flow: [Flow; 2],
    upload: Upload,
    /// How bytes are carried on each side's socket (plaintext, or later
    /// TLS); indexed by side.
    transport: [Transport; 2],
    lease: Option<Lease>,
    /// `Some` once the session's HTTP status is known.
    pub status: Option<u16>,
    pub closer: Option<Closer>,
    /// How a close ringlb asked for ended (clean or a fallback).
    pub close_kind: Option<CloseKind>,
    /// Counted against `max_connections_per_ip` (as `client_addr`); the
    /// shard gives the place back when the connection ends.
    pub ip_counted: bool,
    /// EOF seen from each side.
    peer_eof: [bool; 2],
    /// The route prefix matched, for the access log.
    pub route: Option<Arc<str>>,
    /// The current request's path (normalised, no query), for the access log.
    pub path: Option<Arc<str>>,
    /// The backend tried last, for the access log.
    pub backend: Option<SocketAddr>,

    max_queue: usize,
    linger: Duration,
    /// Frames with at least this much payload left move by splice; 0: never.
    splice_min: u64,

    /// Requests answered on this connection (keep-alive).
    requests: u32,
    /// Draining: the current answer is the last.
    no_keepalive: bool,
    /// Byte counts when the current request started.
    bytes_base: [u64; 2],
    /// Something was received since the last idle sweep.
    active: bool,
    /// The recv of each side is being stopped to park the session.
    parking: [bool; 2],
}

impl Conn {
    /// A client connection was accepted.
    pub fn accept(snap: Arc<Snapshot>, client_addr: SocketAddr, out: &mut Vec<Action>) -> Conn {
        let server = &snap.config.server;
        out.push(Action::ArmRecv(Side::Client));
        out.push(Action::Timer(
            TimerKind::Handshake { req: 0 },
            server.handshake_timeout,
        ));
        let max_queue = server.max_buffers_per_direction.get();
        let linger = server.linger_timeout;
        let splice_min = server.splice_min;
        Conn {
            state: State::ReadingHead(Box::new(Handshake {
                snap,
                head: Vec::new(),
                request: None,
                upstream: 0,
                tried: Vec::new(),
                last_timed_out: false,
                resp: Vec::new(),
                response_timeout: Duration::ZERO,
                replay: None,
                attempt: 0,
                early: Vec::new(),
                early_eof: false,
                timer_seq: 0,
                uploaded: 0,
                gzip: None,
                proxy_in: ProxyIn::Off,
                local_addr: None,
                send_timer: false,
            })),
            client_addr,
            recv: [RecvState::Armed, RecvState::Off],
            flow: Default::default(),
            upload: Upload::Complete,
            transport: [Transport::Plain, Transport::Plain],
            lease: None,
            status: None,
            closer: None,
            close_kind: None,
            ip_counted: false,
            peer_eof: [false, false],
            route: None,
            path: None,
            backend: None,

            max_queue,
            linger,
            splice_min,

            requests: 0,
            no_keepalive: false,
            bytes_base: [0, 0],
            active: true,
            parking: [false, false],
        }
    }

    /// Accepted on a `[tls]` listener: the client side speaks TLS, starting
    /// with its handshake (under the handshake timer already running).
    /// False if rustls could not start a session (the shard closes it).
    pub fn start_tls(&mut self, config: Arc<rustls::ServerConfig>) -> bool {
        match tls::TlsSession::new(config) {
            Some(s) => {
                self.transport[Side::Client.idx()] = Transport::Tls(transport::TlsSlot::new(s));
                true
            }
            None => false,
        }
    }

    /// The client's TLS session, once it has one.
    pub fn tls_info(&self) -> Option<TlsInfo> {
        self.transport[Side::Client.idx()].tls_info()
    }

    /// After a TLS side decoded: sends what its handshake wrote, and closes
    /// the connection if the session failed. False: closed.
    fn after_tls(&mut self, side: Side, out: &mut Vec<Action>) -> bool {
        let Some((reply, failed)) =
            self.transport[side.idx()].tls(|s| (s.take_reply(), s.status == tls::Status::Failed))
        else {
            return true;
        };
        if let Some(wire) = reply {
            self.flow[side.idx()].queue.push_back(Payload::owned(wire));
            self.kick(side, out);
        }
        if failed && side == Side::Backend {
            log::warn!(
                "{}: TLS with the backend failed (see debug log for the reason); closing",
                self.backend.map_or_else(String::new, |b| b.to_string())
            );
            if matches!(self.stage(), Stage::AwaitingResponse) {
                self.abort_backend(out);
                self.respond(http::Reject::BadGateway("backend TLS failed"), out);
            } else {
                self.close(Closer::Backend, out);
            }
            return false;
        }
        if failed {
            log::debug!("{}: TLS failed; closing", self.client_addr);
            self.closer = Some(Closer::Proxy);
            self.close_now(out);
            return false;
        }
        true
    }

    /// Before ringlb shuts its write half towards a TLS side: close_notify,
    /// queued and sent first. True if one was queued (the shutdown then
    /// waits for the queue to drain, as it does for any bytes).
    pub(super) fn queue_close_notify(&mut self, side: Side, out: &mut Vec<Action>) -> bool {
        let Some(alert) = self.transport[side.idx()]
            .tls(|s| s.close_notify())
            .flatten()
        else {
            return false;
        };
        self.flow[side.idx()].queue.push_back(Payload::owned(alert));
        self.kick(side, out);
        true
    }

    /// PROXY protocol is on: a connection from a trusted L4 tier must start
    /// with a header (`trusted`), any other must not.
    pub fn expect_proxy_header(&mut self, trusted: bool) {
        // In front of the TLS handshake, in plaintext.
        self.transport[Side::Client.idx()].tls(|s| s.expect_proxy = trusted);
        if let Some(hs) = try_hs_mut(&mut self.state) {
            hs.proxy_in = if trusted {
                ProxyIn::Required
            } else {
                ProxyIn::Refused
            };
        }
    }

    /// The address the client connected to, for a PROXY header to backends.
    pub fn set_local_addr(&mut self, addr: SocketAddr) {
        if let Some(hs) = try_hs_mut(&mut self.state) {
            hs.local_addr = Some(addr);
        }
    }

    /// Reads a PROXY header off the front of the head buffer; false: wait
    /// for more, or the connection was refused.
    fn try_proxy_header(&mut self, out: &mut Vec<Action>) -> bool {
        use crate::proxy_protocol::{parse, Header, Parsed};
        let hs = hs_mut(&mut self.state);
        let refuse = match (parse(&hs.head), hs.proxy_in) {
            (Ok(Parsed::Partial), _) => return false,
            (Ok(Parsed::Absent), ProxyIn::Refused) => {
                hs.proxy_in = ProxyIn::Off;
                return true;
            }
            (Ok(Parsed::Absent), _) => ("missing", "no PROXY header from a trusted source"),
            (Ok(Parsed::Header(..)), ProxyIn::Refused) => {
                ("untrusted", "a PROXY header from an untrusted source")
            }
            (Ok(Parsed::Header(h, n)), _) => {
                hs.head.drain(..n);
                hs.proxy_in = ProxyIn::Off;
                let snap = hs.snap.clone();
                if let Header::Proxy { src, .. } = h {
                    self.client_addr = src;
                }
                // The real client is known now: it is the one counted.
                if let Some(cap) = snap.config.server.max_connections_per_ip {
                    if !snap.admission.acquire_ip(self.client_addr.ip(), cap.get()) {
                        self.respond(Reject::TooManyRequests, out);
                        return false;
                    }
                    self.ip_counted = true;
                }
                return true;
            }
            (Err(why), _) => ("malformed", why),
        };
        let (reason, why) = refuse;
        hs.snap
            .admission
            .proxy_refused(reason, self.client_addr, why);
        self.closer = Some(Closer::Proxy);
        self.close_now(out);
        false
    }

    /// A connection ringlb turns away before reading anything: it is
    /// never read from, only answered (or closed).
    fn refused(snap: Arc<Snapshot>, client_addr: SocketAddr) -> Conn {
        let mut c = Conn::accept(snap, client_addr, &mut Vec::new());
        c.recv = [RecvState::Off, RecvState::Off];
        c
    }

    /// A connection from an address that has `max_connections_per_ip`
    /// already: answer 429 and close.
    pub fn over_ip_cap(
        snap: Arc<Snapshot>,
        client_addr: SocketAddr,
        out: &mut Vec<Action>,
    ) -> Conn {
        let mut c = Conn::refused(snap, client_addr);
        c.respond(Reject::TooManyRequests, out);
        c
    }

    /// A connection on a TLS listener over capacity (`over`) or over the
    /// per-address cap: closed at once, counted as 503 or 429.
    pub fn refused_tls(
        snap: Arc<Snapshot>,
        client_addr: SocketAddr,
        over: bool,
        out: &mut Vec<Action>,
    ) -> Conn {
        let mut c = Conn::refused(snap, client_addr);
        c.status = Some(if over { 503 } else { 429 });
        c.closer = Some(Closer::Proxy);
        c.close_now(out);
        c
    }

    /// A connection accepted over capacity: answer 503 and close.
    pub fn over_capacity(
        snap: Arc<Snapshot>,
        client_addr: SocketAddr,
        out: &mut Vec<Action>,
    ) -> Conn {
        let mut c = Conn::refused(snap, client_addr);
        c.respond(Reject::ServiceUnavailable, out);
        c
    }

    pub fn stage(&self) -> Stage {
        match &self.state {
            State::ReadingHead(_) => Stage::ReadingHead,
            State::Connecting { attempt, .. } => Stage::Connecting { attempt: *attempt },
            State::AwaitingResponse(_) => Stage::AwaitingResponse,
            State::Retrying { attempt, .. } => Stage::Retrying { attempt: *attempt },
            State::Relaying(_) => Stage::Relaying,
            State::Serving { .. } => Stage::Serving,
            State::Responding => Stage::Responding,
            State::Closing => Stage::Closing,
        }
    }

    fn try_serve(&self) -> Option<&files::Serve> {
        match &self.state {
            State::Serving { serve, .. } => serve.as_deref(),
            _ => None,
        }
    }

    fn serve(&self) -> &files::Serve {
        self.try_serve().expect("no static answer in this stage")
    }

    /// Close 1001 was injected; whatever arrives now is dropped.
    fn going_away(&self) -> bool {
        matches!(
            self.state,
            State::Relaying(Relay::Upgraded { going_away: true })
        )
    }

    /// The backend socket is connected and may be written: from the
    /// connect's success until the session ends or ringlb answers itself.
    fn connected(&self) -> bool {
        matches!(self.state, State::AwaitingResponse(_) | State::Relaying(_))
    }

    /// Being exported: nothing new is sent or armed.
    fn quiescing(&self) -> bool {
        matches!(self.state, State::Relaying(Relay::Quiescing))
    }

    /// Relaying a non-101 answer, which ends the session with its body.
    fn finish_with_response(&self) -> bool {
        matches!(self.state, State::Relaying(Relay::Response { .. }))
    }

    /// The state of the backend this session holds a lease on.
    pub fn backend_state(&self) -> Option<&Arc<crate::upstream::BackendState>> {
        self.lease.as_ref().map(|l| &l.backend().state)
    }

    pub fn backend_addr(&self) -> Option<SocketAddr> {
        self.lease.as_ref().map(|l| l.backend().addr)
    }

    /// Bytes sent towards `side` for the current request.
    pub fn bytes_to(&self, side: Side) -> u64 {
        self.flow[side.idx()].bytes - self.bytes_base[side.idx()]
    }

    /// Requests answered before the current one.
    pub fn requests(&self) -> u32 {
        self.requests
    }

    /// Waiting for a request and nothing of it has arrived yet.
    pub fn between_requests(&self) -> bool {
        self.stage() == Stage::ReadingHead && try_hs(&self.state).is_some_and(|h| h.head.is_empty())
    }

    /// Queues bytes ringlb wrote (a head, an answer, a Close frame) for
    /// `dst`, through its transport.
    fn enqueue(&mut self, dst: Side, data: Vec<u8>) {
        let wire = self.transport[dst.idx()].encode(data);
        // Empty: held by a TLS client session until its handshake is done.
        if !wire.is_empty() {
            self.flow[dst.idx()].queue.push_back(Payload::owned(wire));
        }
    }

    /// A backend in an upstream with `tls`: a fresh TLS client session
    /// for this connect attempt. What is already queued for the backend
    /// (the forwarded head, body bytes) is plaintext; it moves into the
    /// session, to go behind the handshake, and the ClientHello goes first.
    fn start_backend_tls(&mut self, up: &crate::tls::UpstreamTls) -> bool {
        let Some(mut s) = tls::TlsSession::client(up.client.clone(), up.server_name.clone()) else {
            return false;
        };
        let flow = &mut self.flow[Side::Backend.idx()];
        debug_assert!(!flow.sending);
        let queued = std::mem::take(&mut flow.queue);
        if let Some(hello) = s.take_reply() {
            flow.queue.push_back(Payload::owned(hello));
        }
        for p in queued.into_iter() {
            match p {
                Payload::Owned(o) => s.hold(&o.data[o.start..]),
                // Nothing else is queued for a backend before it connects.
                other => flow.queue.push_back(other),
            }
        }
        self.transport[Side::Backend.idx()] = Transport::Tls(transport::TlsSlot::new(s));
        true
    }

    /// Where `Payload::File { start, .. }` bytes live.
    pub fn file_ptr(&self, start: u32) -> *const u8 {
        self.serve().buf[start as usize..].as_ptr()
    }

    /// Where a `ReadFile { at, len, .. }` puts its bytes. The buffer is not
    /// resized until the read completes.
    pub fn read_ptr(&mut self, at: usize, len: usize) -> *mut u8 {
        serve_mut(&mut self.state).buf[at..at + len].as_mut_ptr()
    }

    /// A new configuration, for the next request of a kept-alive connection.
    pub fn set_snapshot(&mut self, snap: Arc<Snapshot>) {
        if let State::ReadingHead(hs) = &mut self.state {
            hs.snap = snap;
        }
    }

    /// The payload the next send to `side` must carry.
    pub fn front(&self, side: Side) -> Option<&Payload> {
        self.flow[side.idx()].queue.front()
    }

    fn set_stage(&mut self, to: Stage) {
        debug_assert!(
            matches!(
                (self.stage(), to),
                (Stage::ReadingHead, Stage::Connecting { .. })
                    | (Stage::Connecting { .. }, Stage::Connecting { .. })
                    | (Stage::Connecting { .. }, Stage::AwaitingResponse)
                    | (Stage::AwaitingResponse, Stage::Retrying { .. })
                    | (Stage::Retrying { .. }, Stage::Connecting { .. })
                    | (Stage::AwaitingResponse, Stage::Relaying)
                    | (Stage::Relaying, Stage::Responding)
                    | (Stage::ReadingHead, Stage::Serving)
                    | (Stage::Serving, Stage::ReadingHead)
                    | (
                        Stage::ReadingHead
                            | Stage::Connecting { .. }
                            | Stage::AwaitingResponse
                            | Stage::Retrying { .. }
                            | Stage::Serving,
                        Stage::Responding
                    )
                    | (_, Stage::Closing)
            ),
            "bad transition {:?} -> {:?}",
            self.stage(),
            to
        );
        // Stage data moves with the connection: the handshake state goes
        // on until the session relays or ringlb answers; a static answer
        // ends with its stage; everything else starts fresh.
        let hs = match std::mem::replace(&mut self.state, State::Closing) {
            State::ReadingHead(hs)
            | State::Connecting { hs, .. }
            | State::AwaitingResponse(hs)
            | State::Retrying { hs, .. }
            | State::Serving { hs, .. } => Some(hs),
            State::Relaying(_) | State::Responding | State::Closing => None,
        };
        let hs = move || hs.expect("this stage needs the handshake state");
        self.state = match to {
            Stage::ReadingHead => State::ReadingHead(hs()),
            Stage::Connecting { attempt } => State::Connecting { hs: hs(), attempt },
            Stage::AwaitingResponse => State::AwaitingResponse(hs()),
            Stage::Retrying { attempt } => State::Retrying { hs: hs(), attempt },
            Stage::Relaying => State::Relaying(Relay::Upgraded { going_away: false }),
            Stage::Serving => State::Serving {
                hs: hs(),
                serve: None,
            },
            Stage::Responding => State::Responding,
            Stage::Closing => State::Closing,
        };
    }

    /// Data arrived on `side` in provided buffer `bid`.
    pub fn on_recv(&mut self, side: Side, bid: u16, data: &[u8], out: &mut Vec<Action>) {
        self.active = true;
        self.parking = [false, false];
        // Through the side's transport: the buffer itself (plaintext), or
        // a decoded copy, after which the buffer goes back at once.
        let mut decoded = Vec::new();
        let (bid, data) = match self.transport[side.idx()].decode(data) {
            transport::Decoded::InPlace(d) => (Some(bid), d),
            transport::Decoded::Owned(v) => {
                out.push(Action::Release(bid));
                if !self.after_tls(side, out) {
                    return;
                }
                if v.is_empty() {
                    // A TLS handshake step, or a record not yet whole.
                    return;
                }
                decoded = v;
                (None, &decoded[..])
            }
        };
        match (self.stage(), side) {
            (Stage::ReadingHead, Side::Client) => {
                release(bid, out);
                let hs = hs_mut(&mut self.state);
                if self.requests > 0 && hs.head.is_empty() {
                    // A kept-alive connection's next request has begun.
                    out.push(Action::Timer(
                        TimerKind::Handshake { req: self.requests },
                        hs.snap.config.server.handshake_timeout,
                    ));
                }
                hs.head.extend_from_slice(data);
                if hs.proxy_in != ProxyIn::Off && !self.try_proxy_header(out) {
                    return;
                }
                self.try_head(out);
            }
            (Stage::Serving, Side::Client) => {
                // The next request, pipelined: kept for later, read no
                // further than one head's worth.
                release(bid, out);
                let hs = hs_mut(&mut self.state);
                hs.head.extend_from_slice(data);
                if !self.wants_recv(Side::Client) && self.recv[0] == RecvState::Armed {
                    self.recv[0] = RecvState::Cancelling;
                    out.push(Action::CancelRecv(Side::Client));
                }
            }
            (Stage::AwaitingResponse, Side::Backend) => {
                release(bid, out);
                let hs = hs_mut(&mut self.state);
                hs.resp.extend_from_slice(data);
                self.try_response(out);
            }
            (Stage::Relaying, _) if self.going_away() => release(bid, out),
            (Stage::Retrying { .. }, Side::Backend) => release(bid, out),
            (
                Stage::Connecting { .. }
                | Stage::AwaitingResponse
                | Stage::Retrying { .. }
                | Stage::Relaying,
                Side::Client,
            ) if self.upload != Upload::Open => self.client_bytes(bid, data, out),
            (Stage::Relaying, _) if self.close_wanted().is_some() => {
                self.relay_until_close(side, bid, data, out);
            }
            (Stage::Connecting { .. } | Stage::Relaying, _) => {
                self.flow[side.other().idx()].frames.feed(data);
                match bid {
                    Some(_) => self.relay(side, bid, data, out),
                    // Opened from TLS records: ours already, moved on.
                    None => self.relay_owned(side, std::mem::take(&mut decoded), out),
                }
                self.consider_splice(side, out);
            }
            // Responding discards what the client still sends; Closing only
            // gives buffers back.
            _ => release(bid, out),
        }
    }

    /// A multishot recv on `side` ended.
    pub fn on_recv_end(&mut self, side: Side, why: RecvEnd, out: &mut Vec<Action>) {
        self.recv[side.idx()] = RecvState::Off;
        if self.stage() == Stage::Closing {
            return;
        }
        if std::mem::take(&mut self.parking[side.idx()]) && why == RecvEnd::Stopped {
            if self.wants_recv(side) {
                // Parked: wait for readiness with a poll, which holds far
                // less kernel memory than an armed recv.
                self.recv[side.idx()] = RecvState::Polling;
                out.push(Action::PollIn(side));
            }
            return;
        }
        if matches!(self.stage(), Stage::Retrying { .. }) {
            if side == Side::Client && why == RecvEnd::Eof {
                self.peer_eof[0] = true;
                if self.upload == Upload::HeldFor101 {
                    hs_mut(&mut self.state).early_eof = true;
                } else {
                    self.flow[Side::Backend.idx()].src_eof = true;
                }
            } else if side == Side::Client && why == RecvEnd::NoBuffers {
                out.push(Action::Starved(side));
            } else if side == Side::Client && why == RecvEnd::Stopped && self.wants_recv(side) {
                self.ensure_recv(side, out);
            }
            return;
        }
        let to = side.other().idx();
        if self.flow[to].splice == Splice::Pending {
            match why {
                // The recv stopped as asked (or ran out of buffers, which a
                // splice does not need): splice once the queue is sent.
                RecvEnd::Stopped | RecvEnd::NoBuffers => {
                    return self.maybe_start_splice(side.other(), out);
                }
                RecvEnd::Eof | RecvEnd::Error(_) => self.flow[to].splice = Splice::Off,
            }
        }
        match why {
            RecvEnd::Stopped => {
                if self.wants_recv(side) {
                    self.ensure_recv(side, out);
                }
            }
            RecvEnd::NoBuffers => out.push(Action::Starved(side)),
            RecvEnd::Error(_) => match (self.stage(), side) {
                (Stage::Responding, Side::Backend) => {}
                (Stage::Serving, _) => self.close(Closer::Error, out),
                (Stage::AwaitingResponse, Side::Backend) => {
                    self.backend_failed("backend failed before answering", out)
                }
                (Stage::Relaying, _) if !self.going_away() => self.peer_reset(side, out),
                _ => self.close(Closer::Error, out),
            },
            RecvEnd::Eof => self.on_eof(side, out),
        }
    }

    pub fn on_timer(&mut self, kind: TimerKind, out: &mut Vec<Action>) {
        match (kind, self.stage()) {
            (TimerKind::Handshake { req }, Stage::ReadingHead) if req == self.requests => {
                self.transport[Side::Client.idx()].tls(|s| s.timed_out = s.handshaking());
                self.closer = Some(Closer::Proxy);
                self.status = Some(408);
                self.close_now(out);
            }
            (TimerKind::KeepAlive { req }, Stage::ReadingHead)
                if req == self.requests && self.between_requests() =>
            {
                self.closer = Some(Closer::Proxy);
                self.close_now(out);
            }
            (TimerKind::Connect { attempt }, Stage::Connecting { attempt: now })
                if attempt == now =>
            {
                if let Some(hs) = try_hs_mut(&mut self.state) {
                    hs.last_timed_out = true;
                }
                out.push(Action::CancelConnect);
            }
            (TimerKind::Response { seq }, Stage::AwaitingResponse)
                if try_hs(&self.state).is_some_and(|h| h.timer_seq == seq) =>
            {
                self.abort_backend(out);
                self.respond(Reject::GatewayTimeout, out);
            }
            (TimerKind::Upload { seq, mark }, Stage::AwaitingResponse)
                if try_hs(&self.state).is_some_and(|h| h.timer_seq == seq) =>
            {
                let uploaded = hs(&self.state).uploaded;
                if uploaded != mark {
                    self.upload_timer(out);
                } else {
                    log::debug!(
                        "{}: request body stalled at {uploaded} bytes",
                        self.client_addr
                    );
                    self.abort_backend(out);
                    self.respond(Reject::RequestTimeout, out);
                }
            }
            (TimerKind::Linger, Stage::Responding) => self.close_now(out),
            (TimerKind::CloseBoundary { fin }, Stage::Relaying) => {
                self.on_close_boundary_timer(fin, out)
            }
            (TimerKind::Linger, Stage::Relaying) if self.going_away() => self.close_now(out),
            (TimerKind::Send { period_ms, mark }, Stage::Serving | Stage::Relaying)
                if self.status != Some(101) =>
            {
                let to_client = &self.flow[Side::Client.idx()];
                let stuck = to_client.sending
                    || !to_client.queue.is_empty()
                    || self.try_serve().is_some_and(|s| s.spliced.in_pipe > 0);
                if to_client.bytes == mark && stuck {
                    log::debug!(
                        "{}: client took nothing for {period_ms} ms; closing",
                        self.client_addr
                    );
                    self.closer = Some(Closer::Proxy);
                    self.close_now(out);
                } else {
                    // Moving, or waiting on the file or the backend rather
                    // than on the client: another period.
                    self.send_timer(Duration::from_millis(u64::from(period_ms)), out);
                }
            }
            (TimerKind::Send { .. }, _) => {
                // Not answering: the next answer arms a timer again.
                if let Some(hs) = try_hs_mut(&mut self.state) {
                    hs.send_timer = false;
                }
            }
            _ => {}
        }
    }

    fn close(&mut self, closer: Closer, out: &mut Vec<Action>) {
        self.closer.get_or_insert(closer);
        self.close_now(out);
    }

    fn close_now(&mut self, out: &mut Vec<Action>) {
        if self.stage() == Stage::Closing {
            return;
        }
        self.set_stage(Stage::Closing);
        out.push(Action::Close);
    }

    /// After the shard saw every op of this connection complete: every
    /// buffer still held, for the ring.
    pub fn into_buffers(self) -> impl Iterator<Item = u16> {
        let Conn { flow, lease, .. } = self;
        drop(lease);
        flow.into_iter()
            .flat_map(|f| f.queue.into_iter())
            .filter_map(|p| match p {
                Payload::Ring { bid, .. } => Some(bid),
                Payload::Owned(_) | Payload::File { .. } => None,
            })
    }
}

/// Gives a provided buffer back, if the bytes still live in one.
fn release(bid: Option<u16>, out: &mut Vec<Action>) {
    if let Some(bid) = bid {
        out.push(Action::Release(bid));
    }
}

thread_local! {
    static RNG: std::cell::RefCell<Rng> = std::cell::RefCell::new(Rng::seeded());
    /// Pool buffers one direction may hold now; the shard lowers it as its
    /// provided-buffer ring fills (see [`pool_quota`]).
    static POOL_QUOTA: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;
