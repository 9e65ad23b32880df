//! One proxied connection as a sans-IO state machine.
//!
//! The shard feeds it completions (`on_*` methods) and executes the
//! [`Action`]s it pushes; the machine never touches a socket. Stages, in
//! order:
//!
//! ```text
//! ReadingHead ──► Connecting(n) ──► AwaitingResponse ──► Relaying ──► Closing
//!      │               │ ▲ retry next backend  │               (both EOF / error /
//!      │               └─┘                     │                response done)
//!      └───────────────┴──────────► Responding ┘ (ringlb's own 4xx/5xx, then linger)
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
//!
//! What reaches the backend connection ([`Upload`]): exactly one head that
//! ringlb wrote, plus that request's declared body (Content-Length, or
//! chunked to its last chunk, tracked by `body.rs`), and after a 101 the
//! client's frames. Bytes behind an upgrade head are held (the client recv
//! stops; what it already read is kept) until the 101, and dropped on any
//! other answer. Bytes behind a plain request's body (a pipelined request,
//! say) are never forwarded: the client recv stops, and after the answer
//! the connection is closed, lingering so the client reads the answer.
//! - `Relaying`: bytes move in provided buffers from one side's recv to the
//!   other side's send, no copy. No timer for a WebSocket session (a
//!   non-101 answer has the send timer, as static answers do). A direction
//!   whose queue holds `max_buffers_per_direction` buffers stops receiving
//!   until it drains (backpressure). EOF on one side shuts down the other side's write
//!   half once everything before it is sent. A reset or failed send ends
//!   only the direction towards the failed peer; what that peer sent before
//!   it went is still read and delivered (its last Close frame, typically),
//!   and the session closes when its read side reports the end.
//! - `Responding`: ringlb's own answer is sent, the client's write half is
//!   shut, and what the client still sends is discarded until it closes or
//!   the linger timer fires (so it reads the answer instead of a reset).
//! - `Closing`: the shard cancels every op and frees the slot when the
//!   kernel has returned them all; completions that still arrive only give
//!   their buffers back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::RouteTarget;
use crate::files;
use crate::http::{self, Body, Reject, Request};
use crate::route;
use crate::snapshot::Snapshot;
use crate::upstream::{Lease, Rng};

mod body;
mod frames;
mod queue;
use body::BodyTracker;
use frames::FrameTracker;
use queue::Queue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Backend = 1,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    pub fn idx(self) -> usize {
        self as usize
    }
}

/// Bytes waiting to be sent to one side.
#[derive(Debug)]
pub enum Payload {
    /// Part of a provided buffer of the shard's ring, still owned by this
    /// connection until sent.
    Ring { bid: u16, start: u32, len: u32 },
    /// Bytes ringlb wrote itself: a forwarded head, a relayed response head,
    /// an error answer. Boxed so a queue slot stays 16 bytes.
    Owned(Box<Owned>),
    /// Part of the static answer's buffer ([`files::Serve::buf`]), which
    /// does not change while this is queued.
    File { start: u32, len: u32 },
}

#[derive(Debug)]
pub struct Owned {
    pub data: Vec<u8>,
    /// How much was already sent.
    pub start: usize,
}

impl Payload {
    pub fn owned(data: Vec<u8>) -> Payload {
        Payload::Owned(Box::new(Owned { data, start: 0 }))
    }
}

impl Payload {
    pub fn remaining(&self) -> usize {
        match self {
            Payload::Ring { len, .. } | Payload::File { len, .. } => *len as usize,
            Payload::Owned(o) => o.data.len() - o.start,
        }
    }

    fn advance(&mut self, n: usize) {
        match self {
            Payload::Ring { start, len, .. } | Payload::File { start, len } => {
                *start += n as u32;
                *len -= n as u32;
            }
            Payload::Owned(o) => o.start += n,
        }
    }

    fn truncate(&mut self, keep: usize) {
        match self {
            Payload::Ring { len, .. } | Payload::File { len, .. } => *len = (*len).min(keep as u32),
            Payload::Owned(o) => o.data.truncate(o.start + keep),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// The head of request number `req` on this connection must be complete.
    Handshake {
        req: u32,
    },
    /// A kept-alive connection waits for request number `req`.
    KeepAlive {
        req: u32,
    },
    Connect {
        attempt: u32,
    },
    /// The backend must answer; `seq` names the arming, so a timer from an
    /// earlier attempt or phase never fires on a later one.
    Response {
        seq: u32,
    },
    /// The request body must keep arriving: it has moved since `mark` bytes.
    Upload {
        seq: u32,
        mark: u64,
    },
    Linger,
    /// An HTTP answer must have moved since `mark` bytes had gone to the
    /// client; checked (and re-armed while answering) every `period_ms`.
    Send {
        period_ms: u32,
        mark: u64,
    },
}

/// What the shard must do for a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Arm a multishot recv on this side.
    ArmRecv(Side),
    /// Cancel this side's multishot recv (backpressure).
    CancelRecv(Side),
    /// Cancel the send in flight to this side; it comes back to
    /// [`Conn::on_send_unpinned`] if it sent nothing.
    CancelSend(Side),
    /// Make closing this side's socket send a reset (SO_LINGER 0).
    ResetOnClose(Side),
    /// Send the front of this side's queue.
    Send(Side),
    /// Open a socket and connect it to this backend.
    Connect(SocketAddr),
    /// Cancel the connect in flight (its timer fired).
    CancelConnect,
    /// Close the backend socket now: its connect failed and no op uses it.
    DropBackend,
    /// Shut down the backend socket and cancel its ops; closed with the rest.
    AbortBackend,
    /// Shut down the backend socket, cancel its ops, and close it once none
    /// is left; then call [`Conn::on_backend_released`].
    ReleaseBackend,
    ShutdownWrite(Side),
    /// Give a provided buffer back to the ring.
    Release(u16),
    Timer(TimerKind, Duration),
    /// The recv on this side ran out of provided buffers; call
    /// [`Conn::on_buffers_available`] when there are some again.
    Starved(Side),
    /// Open a file for a static answer; report with [`Conn::on_file_open`].
    OpenFile(Box<files::OpenReq>),
    /// The file just opened is the one to read from (replacing any other).
    AdoptFile,
    /// Read from the adopted file into the static answer's buffer
    /// ([`Conn::read_ptr`]); report with [`Conn::on_file_read`].
    ReadFile {
        at: usize,
        len: usize,
        offset: u64,
    },
    /// A request on a kept-alive connection is answered: log it.
    RequestDone(Box<Done>),
    /// Wait until `side` is readable (splice mode); then [`Conn::on_readable`].
    PollIn(Side),
    /// Wait until `side` is writable (splice mode); then [`Conn::on_writable`].
    PollOut(Side),
    /// Splice: move up to `read` bytes from `src` into the direction's pipe,
    /// then everything in it (`pending` plus what came) on to the other
    /// side; report with [`Conn::on_spliced`].
    Splice {
        src: Side,
        read: usize,
        pending: usize,
    },
    /// The direction towards `dst` is done splicing; its pipe is empty if
    /// `reusable`, else it must be closed.
    LeaveSplice {
        dst: Side,
        reusable: bool,
    },
    /// Static body: move up to `len` bytes of the open file at `offset` into
    /// the client direction's pipe; report with [`Conn::on_file_spliced`].
    FileToPipe {
        offset: u64,
        len: u32,
    },
    /// Static body: move up to `pending` bytes from the client direction's
    /// pipe to the client, now and without blocking; report with
    /// [`Conn::on_pipe_drained`].
    PipeToClient {
        pending: usize,
    },
    /// Read at most `want` bytes (a frame header) from `src` into the
    /// direction's pipe; report with [`Conn::on_header`].
    ReadHeader {
        src: Side,
        want: usize,
    },
    /// Tear the connection down.
    Close,
}

/// Bytes one splice step asks for; the shard's pipes are this big.
pub const SPLICE_CHUNK: usize = 256 * 1024;

/// How bytes move in one direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Splice {
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

/// One answered request, for the access log and metrics.
#[derive(Debug, PartialEq, Eq)]
pub struct Done {
    pub status: u16,
    pub route: Option<Arc<str>>,
    pub path: Option<Box<str>>,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvState {
    Off,
    Armed,
    Cancelling,
    /// Parked: a one-shot readiness poll instead of a recv; the recv is
    /// armed again when it fires.
    Polling,
}

/// Why a multishot recv ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvEnd {
    Eof,
    /// Ended without error (cancelled, or the kernel stopped it); re-arm if wanted.
    Stopped,
    NoBuffers,
    Error(i32),
}

/// Who ended the session, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closer {
    Client,
    Backend,
    Proxy,
    /// ringlb closed it while shutting down.
    Drain,
    /// A peer took no byte for `stalled_peer_timeout` while bytes waited.
    StalledPeer,
    Error,
}

/// One direction of flow: bytes going *to* `Side`.
#[derive(Debug, Default)]
struct Flow {
    queue: Queue,
    /// Frame boundaries of what flows this way (meaningful once upgraded).
    frames: FrameTracker,
    sending: bool,
    /// The source side reached EOF; shut our write half once drained.
    src_eof: bool,
    shut: bool,
    /// The destination reset its connection: nothing can be sent to it.
    dead: bool,
    bytes: u64,
    /// Body bytes still expected before the session ends (non-101 responses).
    limit: Option<u64>,
    splice: Splice,
    /// A send towards this side completed with bytes since the last stall
    /// sweep.
    moved: bool,
    /// Stall sweeps in a row that found bytes waiting and none moved.
    stall_sweeps: u16,
    /// The send in flight was already in flight at the last unpin sweep.
    pinned_seen: bool,
    /// Its cancel is asked for, to move its bytes off the shared pool.
    unpinning: bool,
    /// Its reader took nothing while the pool ran low: the source stays
    /// unread until everything queued here is sent, so a slow reader holds
    /// at most what it held then, and the rest waits in kernel buffers.
    stalled: bool,
}

/// What may still go from the client to the backend connection. A backend
/// connection carries one head that ringlb wrote plus that request's body,
/// and, only after a 101, the client's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Upload {
    /// An upgrade is sent: the client's next bytes wait for the backend's
    /// 101 (in the kernel: the client recv is stopped). Another answer
    /// discards them.
    HeldFor101,
    /// A request body is still arriving, framed by the tracker.
    Body(BodyTracker),
    /// The request is complete; whatever the client sends now is not for
    /// this backend connection (a pipelined request is dropped, and the
    /// connection closes after the answer).
    Complete,
    /// Upgraded: bytes flow both ways.
    Open,
}

/// State only needed until the session is relaying; dropped after.
#[derive(Debug)]
struct Handshake {
    snap: Arc<Snapshot>,
    head: Vec<u8>,
    request: Option<Request>,
    upstream: usize,
    tried: Vec<usize>,
    last_timed_out: bool,
    resp: Vec<u8>,
    /// For the request being proxied: how long the backend may take to answer.
    response_timeout: Duration,
    /// Every byte sent to the backend so far, while the request may still
    /// be sent again to another backend: idempotent, and short. `None`: it
    /// may not.
    replay: Option<Vec<u8>>,
    /// The connect attempt in progress.
    attempt: u32,
    /// Bytes the client sent behind its upgrade head, held until the 101.
    early: Vec<u8>,
    /// The client half-closed behind its upgrade head; passed on after the 101.
    early_eof: bool,
    /// Arming count of the response and upload timers.
    timer_seq: u32,
    /// Request body bytes received so far (for the upload timer).
    uploaded: u64,
    /// A send timer is pending for this connection. One serves every
    /// static answer on a kept-alive connection, so the shard's timer heap
    /// holds one per connection, not one per request.
    send_timer: bool,
}

/// Bytes of a request ringlb keeps to resend it after a backend failure.
const MAX_REPLAY: usize = 64 * 1024;

#[derive(Debug)]
pub struct Conn {
    stage: Stage,
    pub client_addr: SocketAddr,
    recv: [RecvState; 2],
    /// Indexed by destination side.
    flow: [Flow; 2],
    connected: bool,
    upload: Upload,
    hs: Option<Box<Handshake>>,
    lease: Option<Lease>,
    /// `Some` once the session's HTTP status is known.
    pub status: Option<u16>,
    /// The end-of-response rule for non-101 answers.
    finish_with_response: bool,
    pub closer: Option<Closer>,
    /// Close 1001 was injected; whatever arrives now is dropped.
    going_away: bool,
    /// EOF seen from each side.
    peer_eof: [bool; 2],
    /// The route prefix matched, for the access log.
    pub route: Option<Arc<str>>,
    /// The current request's path (normalised, no query), for the access log.
    pub path: Option<Box<str>>,
    /// The backend tried last, for the access log.
    pub backend: Option<SocketAddr>,

    max_queue: usize,
    linger: Duration,
    /// Frames with at least this much payload left move by splice; 0: never.
    splice_min: u64,

    /// The static answer in progress.
    serve: Option<Box<files::Serve>>,
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
            stage: Stage::ReadingHead,
            client_addr,
            recv: [RecvState::Armed, RecvState::Off],
            flow: Default::default(),
            connected: false,
            upload: Upload::Complete,
            hs: Some(Box::new(Handshake {
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
                send_timer: false,
            })),
            lease: None,
            status: None,
            finish_with_response: false,
            closer: None,
            going_away: false,
            peer_eof: [false, false],
            route: None,
            path: None,
            backend: None,

            max_queue,
            linger,
            splice_min,

            serve: None,
            requests: 0,
            no_keepalive: false,
            bytes_base: [0, 0],
            active: true,
            parking: [false, false],
        }
    }

    /// A connection accepted over capacity: answer 503 and close.
    pub fn over_capacity(
        snap: Arc<Snapshot>,
        client_addr: SocketAddr,
        out: &mut Vec<Action>,
    ) -> Conn {
        let mut c = Conn::accept(snap, client_addr, &mut Vec::new());
        c.recv = [RecvState::Off, RecvState::Off];
        c.respond(Reject::ServiceUnavailable, out);
        c
    }

    pub fn stage(&self) -> Stage {
        self.stage
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
        self.stage == Stage::ReadingHead && self.hs.as_ref().is_some_and(|h| h.head.is_empty())
    }

    /// Where `Payload::File { start, .. }` bytes live.
    pub fn file_ptr(&self, start: u32) -> *const u8 {
        let serve = self.serve.as_ref().expect("file payload without an answer");
        serve.buf[start as usize..].as_ptr()
    }

    /// Where a `ReadFile { at, len, .. }` puts its bytes. The buffer is not
    /// resized until the read completes.
    pub fn read_ptr(&mut self, at: usize, len: usize) -> *mut u8 {
        let serve = self.serve.as_mut().expect("file read without an answer");
        serve.buf[at..at + len].as_mut_ptr()
    }

    /// A new configuration, for the next request of a kept-alive connection.
    pub fn set_snapshot(&mut self, snap: Arc<Snapshot>) {
        if let Some(hs) = &mut self.hs {
            if self.stage == Stage::ReadingHead {
                hs.snap = snap;
            }
        }
    }

    /// The payload the next send to `side` must carry.
    pub fn front(&self, side: Side) -> Option<&Payload> {
        self.flow[side.idx()].queue.front()
    }

    fn set_stage(&mut self, to: Stage) {
        debug_assert!(
            matches!(
                (self.stage, to),
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
            self.stage,
            to
        );
        self.stage = to;
    }

    /// Data arrived on `side` in provided buffer `bid`.
    pub fn on_recv(&mut self, side: Side, bid: u16, data: &[u8], out: &mut Vec<Action>) {
        self.active = true;
        self.parking = [false, false];
        match (self.stage, side) {
            (Stage::ReadingHead, Side::Client) => {
                out.push(Action::Release(bid));
                let hs = self.hs.as_mut().expect("handshake state");
                if self.requests > 0 && hs.head.is_empty() {
                    // A kept-alive connection's next request has begun.
                    out.push(Action::Timer(
                        TimerKind::Handshake { req: self.requests },
                        hs.snap.config.server.handshake_timeout,
                    ));
                }
                hs.head.extend_from_slice(data);
                self.try_head(out);
            }
            (Stage::Serving, Side::Client) => {
                // The next request, pipelined: kept for later, read no
                // further than one head's worth.
                out.push(Action::Release(bid));
                let hs = self.hs.as_mut().expect("handshake state");
                hs.head.extend_from_slice(data);
                if !self.wants_recv(Side::Client) && self.recv[0] == RecvState::Armed {
                    self.recv[0] = RecvState::Cancelling;
                    out.push(Action::CancelRecv(Side::Client));
                }
            }
            (Stage::AwaitingResponse, Side::Backend) => {
                out.push(Action::Release(bid));
                let hs = self.hs.as_mut().expect("handshake state");
                hs.resp.extend_from_slice(data);
                self.try_response(out);
            }
            (Stage::Relaying, _) if self.going_away => out.push(Action::Release(bid)),
            (Stage::Retrying { .. }, Side::Backend) => out.push(Action::Release(bid)),
            (
                Stage::Connecting { .. }
                | Stage::AwaitingResponse
                | Stage::Retrying { .. }
                | Stage::Relaying,
                Side::Client,
            ) if self.upload != Upload::Open => self.client_bytes(bid, data, out),
            (Stage::Connecting { .. } | Stage::Relaying, _) => {
                self.flow[side.other().idx()].frames.feed(data);
                self.relay(side, bid, data.len(), out);
                self.consider_splice(side, out);
            }
            // Responding discards what the client still sends; Closing only
            // gives buffers back.
            _ => out.push(Action::Release(bid)),
        }
    }

    /// Client bytes while its request is with the backend and no 101 has
    /// come: only the request's declared body goes on; bytes behind an
    /// upgrade head wait for the 101; anything else is dropped.
    fn client_bytes(&mut self, bid: u16, data: &[u8], out: &mut Vec<Action>) {
        let tracker = match &mut self.upload {
            Upload::Body(t) => t,
            Upload::HeldFor101 => {
                // Arrived before the recv was stopped.
                out.push(Action::Release(bid));
                if let Some(hs) = self.hs.as_mut() {
                    hs.early.extend_from_slice(data);
                }
                return;
            }
            Upload::Complete | Upload::Open => return out.push(Action::Release(bid)),
        };
        let n = match tracker.feed(data) {
            Ok(n) => n,
            Err(why) => {
                out.push(Action::Release(bid));
                return self.bad_body(why, out);
            }
        };
        let done = tracker.done();
        if let Some(hs) = self.hs.as_mut() {
            hs.uploaded += n as u64;
        }
        if n == 0 {
            out.push(Action::Release(bid));
        } else if matches!(self.stage, Stage::Retrying { .. }) {
            // Held with the request until the next backend is connected.
            out.push(Action::Release(bid));
            if !self.keep_for_replay(&data[..n]) {
                return self.respond(Reject::BadGateway("backend failed before answering"), out);
            }
        } else {
            self.keep_for_replay(&data[..n]);
            self.relay(Side::Client, bid, n, out);
        }
        if done && self.stage != Stage::Closing {
            self.upload_complete(out);
        }
    }

    /// The request's body has all arrived: stop reading the client (what it
    /// sends next stays in its socket, and is not this backend's) and give
    /// the backend its full `response_timeout` from now.
    fn upload_complete(&mut self, out: &mut Vec<Action>) {
        self.upload = Upload::Complete;
        self.stop_client_recv(out);
        if self.stage == Stage::AwaitingResponse {
            self.response_timer(out);
        }
    }

    fn stop_client_recv(&mut self, out: &mut Vec<Action>) {
        if self.recv[Side::Client.idx()] == RecvState::Armed {
            self.recv[Side::Client.idx()] = RecvState::Cancelling;
            out.push(Action::CancelRecv(Side::Client));
        }
    }

    /// The request body's framing is broken, so where it ends is unknown:
    /// 400 if no answer has started, else the connection ends.
    fn bad_body(&mut self, why: &'static str, out: &mut Vec<Action>) {
        log::debug!("{}: invalid request body: {why}", self.client_addr);
        match self.stage {
            Stage::Connecting { .. } | Stage::AwaitingResponse => {
                self.abort_backend(out);
                self.respond(Reject::BadRequest(why), out);
            }
            Stage::Retrying { .. } => self.respond(Reject::BadRequest(why), out),
            _ => self.close(Closer::Error, out),
        }
    }

    fn response_timer(&mut self, out: &mut Vec<Action>) {
        let hs = self.hs.as_mut().expect("handshake state");
        hs.timer_seq += 1;
        out.push(Action::Timer(
            TimerKind::Response { seq: hs.timer_seq },
            hs.response_timeout,
        ));
    }

    fn upload_timer(&mut self, out: &mut Vec<Action>) {
        let hs = self.hs.as_mut().expect("handshake state");
        hs.timer_seq += 1;
        out.push(Action::Timer(
            TimerKind::Upload {
                seq: hs.timer_seq,
                mark: hs.uploaded,
            },
            hs.response_timeout,
        ));
    }

    /// Buffers a direction may hold: the configured bound, lowered while the
    /// shard's pool runs low.
    fn queue_limit(&self) -> usize {
        self.max_queue.min(POOL_QUOTA.with(|q| q.get()))
    }

    fn relay(&mut self, src: Side, bid: u16, len: usize, out: &mut Vec<Action>) {
        let dst = src.other();
        let mut payload = Payload::Ring {
            bid,
            start: 0,
            len: len as u32,
        };
        let flow = &mut self.flow[dst.idx()];
        if flow.dead {
            out.push(Action::Release(bid));
            return;
        }
        if let Some(limit) = &mut flow.limit {
            // A non-101 response ends with its body; anything after is not ours to relay.
            let keep = (*limit).min(len as u64);
            *limit -= keep;
            if keep == 0 {
                out.push(Action::Release(bid));
                self.maybe_finish(out);
                return;
            }
            payload.truncate(keep as usize);
        }
        flow.queue.push_back(payload);
        self.kick(dst, out);
        let flow = &self.flow[dst.idx()];
        if (flow.stalled || flow.queue.len() >= self.queue_limit())
            && self.recv[src.idx()] == RecvState::Armed
        {
            self.recv[src.idx()] = RecvState::Cancelling;
            out.push(Action::CancelRecv(src));
        }
    }

    /// Starts a send to `dst` if one can go now.
    fn kick(&mut self, dst: Side, out: &mut Vec<Action>) {
        let ready = dst == Side::Client || self.connected;
        let flow = &mut self.flow[dst.idx()];
        if ready && !flow.sending && !flow.queue.is_empty() {
            flow.sending = true;
            out.push(Action::Send(dst));
        }
    }

    /// A send to `dst` completed with `res` bytes (or an errno).
    pub fn on_send(&mut self, dst: Side, res: Result<usize, i32>, out: &mut Vec<Action>) {
        if self.stage == Stage::Closing {
            return;
        }
        if matches!(self.stage, Stage::Retrying { .. }) {
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
                if self.stage == Stage::Responding && dst == Side::Backend {
                    // The backend was aborted; its failed send is expected.
                    self.flow[dst.idx()].sending = false;
                    return;
                }
                if self.stage == Stage::AwaitingResponse && dst == Side::Backend {
                    self.flow[dst.idx()].sending = false;
                    return self.backend_failed("backend failed before answering", out);
                }
                if self.stage == Stage::Relaying && !self.going_away {
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
        if self.stage == Stage::Serving {
            let flow = &self.flow[dst.idx()];
            if flow.queue.is_empty() && !flow.sending {
                let next = self.serve.as_mut().expect("serving").on_sent();
                self.follow(next, out);
            }
            return;
        }
        let src = dst.other();
        let flow = &self.flow[dst.idx()];
        if flow.queue.is_empty() && !flow.sending {
            if self.stage == Stage::Responding && dst == Side::Client {
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
        if self.stage != Stage::Closing
            && self.recv[src.idx()] == RecvState::Off
            && self.wants_recv(src)
        {
            self.recv[src.idx()] = RecvState::Armed;
            out.push(Action::ArmRecv(src));
        }
    }

    fn wants_recv(&self, src: Side) -> bool {
        let flow = &self.flow[src.other().idx()];
        if flow.splice != Splice::Off {
            return false;
        }
        match self.stage {
            Stage::Closing => false,
            Stage::Responding => src == Side::Client,
            Stage::Serving => self.hs.as_ref().is_some_and(|hs| {
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
            Stage::Relaying if self.going_away => !self.peer_eof[src.idx()],
            _ => !flow.src_eof && !flow.stalled && flow.queue.len() < self.queue_limit(),
        }
    }

    fn ensure_recv(&mut self, side: Side, out: &mut Vec<Action>) {
        if self.recv[side.idx()] == RecvState::Off {
            self.recv[side.idx()] = RecvState::Armed;
            out.push(Action::ArmRecv(side));
        }
    }

    /// A multishot recv on `side` ended.
    pub fn on_recv_end(&mut self, side: Side, why: RecvEnd, out: &mut Vec<Action>) {
        self.recv[side.idx()] = RecvState::Off;
        if self.stage == Stage::Closing {
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
        if matches!(self.stage, Stage::Retrying { .. }) {
            if side == Side::Client && why == RecvEnd::Eof {
                self.peer_eof[0] = true;
                if self.upload == Upload::HeldFor101 {
                    self.hs.as_mut().expect("handshake state").early_eof = true;
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
            RecvEnd::Error(_) => match (self.stage, side) {
                (Stage::Responding, Side::Backend) => {}
                (Stage::Serving, _) => self.close(Closer::Error, out),
                (Stage::AwaitingResponse, Side::Backend) => {
                    self.backend_failed("backend failed before answering", out)
                }
                (Stage::Relaying, _) if !self.going_away => self.peer_reset(side, out),
                _ => self.close(Closer::Error, out),
            },
            RecvEnd::Eof => self.on_eof(side, out),
        }
    }

    /// Provided buffers are back after this side starved.
    pub fn on_buffers_available(&mut self, side: Side, out: &mut Vec<Action>) {
        if self.wants_recv(side) {
            self.ensure_recv(side, out);
        }
    }

    fn on_eof(&mut self, side: Side, out: &mut Vec<Action>) {
        self.peer_eof[side.idx()] = true;
        match (self.stage, side) {
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
                self.hs.as_mut().expect("handshake state").early_eof = true;
            }
            _ => {
                let dst = side.other();
                let flow = &mut self.flow[dst.idx()];
                flow.src_eof = true;
                if flow.queue.is_empty()
                    && !flow.sending
                    && !flow.shut
                    && (dst == Side::Client || self.connected)
                {
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
    fn maybe_finish(&mut self, out: &mut Vec<Action>) {
        if self.stage != Stage::Relaying {
            return;
        }
        if self.going_away {
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
        if self.finish_with_response && drained && (to_client.limit == Some(0) || to_client.src_eof)
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

    /// A non-101 answer is out, but the client may still be sending (a
    /// pipelined request ringlb does not serve, a body the backend did not
    /// wait for). Closing now with unread bytes would send a reset, which
    /// can destroy the answer before the client reads it; so our write half
    /// is shut, and what the client sends is discarded until it closes or
    /// `linger_timeout` passes.
    fn linger_close(&mut self, out: &mut Vec<Action>) {
        self.abort_backend(out);
        self.lease = None;
        self.set_stage(Stage::Responding);
        release_unsent(&mut self.flow[Side::Backend.idx()], out);
        let to_client = &mut self.flow[Side::Client.idx()];
        if !to_client.shut {
            to_client.shut = true;
            out.push(Action::ShutdownWrite(Side::Client));
        }
        self.ensure_recv(Side::Client, out);
        out.push(Action::Timer(TimerKind::Linger, self.linger));
    }

    pub fn on_connect(&mut self, res: Result<(), i32>, out: &mut Vec<Action>) {
        let Stage::Connecting { attempt } = self.stage else {
            // Aborted meanwhile (e.g. handshake answered); nothing to do.
            return;
        };
        match res {
            Ok(()) => {
                self.connected = true;
                if let Some(lease) = &self.lease {
                    lease.backend().state.record_success();
                }
                self.set_stage(Stage::AwaitingResponse);
                self.recv[Side::Backend.idx()] = RecvState::Armed;
                out.push(Action::ArmRecv(Side::Backend));
                if matches!(self.upload, Upload::Body(_)) {
                    // The backend cannot answer before it has the body; a
                    // slow upload that keeps moving is not a slow backend.
                    self.upload_timer(out);
                } else {
                    self.response_timer(out);
                }
                self.kick(Side::Backend, out);
                let to_backend = &mut self.flow[Side::Backend.idx()];
                if to_backend.src_eof && to_backend.queue.is_empty() && !to_backend.sending {
                    to_backend.shut = true;
                    out.push(Action::ShutdownWrite(Side::Backend));
                }
            }
            Err(errno) => {
                self.blame_backend(&format!(
                    "a failed connect ({})",
                    std::io::Error::from_raw_os_error(errno)
                ));
                out.push(Action::DropBackend);
                self.connect_next(attempt + 1, out);
            }
        }
    }

    /// After relaying from `src`: if the frame under way still has at least
    /// `splice_min` payload bytes, stop receiving `src` into buffers and
    /// move the rest of the frame by splice.
    fn consider_splice(&mut self, src: Side, out: &mut Vec<Action>) {
        let dst = src.other();
        let flow = &self.flow[dst.idx()];
        if self.splice_min == 0
            || self.stage != Stage::Relaying
            || self.status != Some(101)
            || self.going_away
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
    fn maybe_start_splice(&mut self, dst: Side, out: &mut Vec<Action>) {
        let src = dst.other();
        let flow = &mut self.flow[dst.idx()];
        if flow.splice != Splice::Pending
            || self.recv[src.idx()] != RecvState::Off
            || !flow.queue.is_empty()
            || flow.sending
        {
            return;
        }
        if self.stage != Stage::Relaying || flow.dead || flow.src_eof {
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
        if self.stage == Stage::Closing {
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
        if self.stage == Stage::Closing {
            return;
        }
        if let Splice::On { in_pipe, .. } = self.flow[dst.idx()].splice {
            out.push(Action::Splice {
                src: dst.other(),
                read: 0,
                pending: in_pipe,
            });
        } else if let (Stage::Serving, Some(serve)) = (self.stage, &self.serve) {
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
        if self.stage == Stage::Closing {
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
    fn splice_flush(&mut self, src: Side, out: &mut Vec<Action>) {
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
    fn leave_splice(&mut self, src: Side, end: Option<RecvEnd>, out: &mut Vec<Action>) {
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
        if self.stage == Stage::Closing {
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
        } else {
            // Next: more payload, or the next frame's header.
            out.push(Action::PollIn(src));
        }
    }

    /// A source that was being spliced ended, and everything it sent is out.
    fn on_recv_end_spliced(&mut self, src: Side, why: RecvEnd, out: &mut Vec<Action>) {
        match why {
            RecvEnd::Error(_) if !self.going_away => self.peer_reset(src, out),
            RecvEnd::Error(_) => self.close(Closer::Error, out),
            _ => self.on_eof(src, out),
        }
    }

    /// Counts a failed connect against the current backend (passive
    /// health) and gives up its lease.
    fn blame_backend(&mut self, what: &str) {
        if let Some(lease) = self.lease.take() {
            let hs = self.hs.as_ref().expect("handshake state");
            let upstream = &hs.snap.upstreams[hs.upstream];
            if lease.backend().state.record_failure(upstream.health) {
                log::warn!(
                    "backend {} of upstream {} marked down for {:?} after {what}",
                    lease.backend().addr,
                    upstream.name,
                    upstream.health.fail_timeout,
                );
            }
        }
    }

    /// Keeps client bytes that went (or will go) to the backend, so the
    /// request can be resent; false once that is no longer possible.
    fn keep_for_replay(&mut self, data: &[u8]) -> bool {
        let Some(hs) = self.hs.as_mut() else {
            return false;
        };
        match &mut hs.replay {
            Some(r) if r.len() + data.len() <= MAX_REPLAY => {
                r.extend_from_slice(data);
                true
            }
            _ => {
                hs.replay = None;
                false
            }
        }
    }

    /// The old backend's socket has no op left: send the request again,
    /// to a backend not tried yet.
    pub fn on_backend_released(&mut self, out: &mut Vec<Action>) {
        let Stage::Retrying { attempt } = self.stage else {
            return;
        };
        let hs = self.hs.as_mut().expect("handshake state");
        hs.resp.clear();
        let replay = hs.replay.clone().expect("retrying without a replay copy");
        let flow = &mut self.flow[Side::Backend.idx()];
        debug_assert!(!flow.sending);
        release_unsent(flow, out);
        let src_eof = flow.src_eof;
        let frames = std::mem::take(&mut flow.frames);
        *flow = Flow {
            frames,
            src_eof,
            ..Flow::default()
        };
        flow.queue.push_back(Payload::owned(replay));
        self.recv[Side::Backend.idx()] = RecvState::Off;
        self.connect_next(attempt + 1, out);
    }

    /// ringlb could not even open a socket for the backend (its own fd or
    /// memory limit): answer 503 without blaming the backend.
    pub fn on_local_error(&mut self, out: &mut Vec<Action>) {
        if matches!(self.stage, Stage::Connecting { .. }) {
            self.respond(Reject::ServiceUnavailable, out);
        }
    }

    pub fn on_timer(&mut self, kind: TimerKind, out: &mut Vec<Action>) {
        match (kind, self.stage) {
            (TimerKind::Handshake { req }, Stage::ReadingHead) if req == self.requests => {
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
                if let Some(hs) = self.hs.as_mut() {
                    hs.last_timed_out = true;
                }
                out.push(Action::CancelConnect);
            }
            (TimerKind::Response { seq }, Stage::AwaitingResponse)
                if self.hs.as_ref().is_some_and(|h| h.timer_seq == seq) =>
            {
                self.abort_backend(out);
                self.respond(Reject::GatewayTimeout, out);
            }
            (TimerKind::Upload { seq, mark }, Stage::AwaitingResponse)
                if self.hs.as_ref().is_some_and(|h| h.timer_seq == seq) =>
            {
                let uploaded = self.hs.as_ref().expect("handshake state").uploaded;
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
            (TimerKind::Linger, Stage::Relaying) if self.going_away => self.close_now(out),
            (TimerKind::Send { period_ms, mark }, Stage::Serving | Stage::Relaying)
                if self.status != Some(101) =>
            {
                let to_client = &self.flow[Side::Client.idx()];
                let stuck = to_client.sending
                    || !to_client.queue.is_empty()
                    || self.serve.as_ref().is_some_and(|s| s.spliced.in_pipe > 0);
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
                if let Some(hs) = self.hs.as_mut() {
                    hs.send_timer = false;
                }
            }
            _ => {}
        }
    }

    fn try_head(&mut self, out: &mut Vec<Action>) {
        let hs = self.hs.as_mut().expect("handshake state");
        let server = &hs.snap.config.server;
        let parsed =
            http::parse_request(&hs.head, server.max_request_head.get(), server.max_headers);
        let mut req = match parsed {
            Ok(None) => return,
            Ok(Some(req)) => req,
            Err(reject) => return self.respond(reject, out),
        };
        match route::normalize_target(&req.target) {
            Ok(std::borrow::Cow::Borrowed(_)) => {}
            Ok(std::borrow::Cow::Owned(t)) => req.target = t,
            Err(why) => return self.respond(Reject::BadRequest(why), out),
        }
        self.path = Some(req.path().into());
        let Some(route) = hs.snap.router.find(req.path()).cloned() else {
            return self.respond(Reject::NotFound, out);
        };
        if route.websocket_only && !req.is_upgrade() {
            return self.respond(Reject::UpgradeRequired, out);
        }
        let upstream = match &route.target {
            RouteTarget::Upstream(u) => *u,
            RouteTarget::Static(site) => {
                let site = site.clone();
                return self.serve_static(req, route, site, out);
            }
        };
        let target = route::rewrite_target(&route, &req.target);
        let ip = self.client_addr.ip();
        // Behind the head: the start of the body, frames sent eagerly after
        // an upgrade (held for the 101), or the client's next requests
        // (never forwarded on this backend connection).
        let extra = hs.head.split_off(req.head_len);
        let (body_part, upload) = if req.is_upgrade() {
            (0, Upload::HeldFor101)
        } else {
            let tracker = match req.body {
                http::ReqBody::None => None,
                http::ReqBody::Length(n) => Some(BodyTracker::length(n)),
                http::ReqBody::Chunked => Some(BodyTracker::chunked()),
            };
            match tracker {
                None => (0, Upload::Complete),
                Some(mut t) => match t.feed(&extra) {
                    Ok(n) if t.done() => (n, Upload::Complete),
                    Ok(n) => (n, Upload::Body(t)),
                    Err(why) => return self.respond(Reject::BadRequest(why), out),
                },
            }
        };
        let append_xff = hs.snap.config.server.forwarded_for == crate::config::ForwardedFor::Append;
        let forwarded = http::forward_head(&req, &target, ip, append_xff, &extra[..body_part]);
        if upload == Upload::HeldFor101 {
            hs.early = extra;
        }
        hs.uploaded = body_part as u64;
        hs.upstream = upstream;
        let up = &hs.snap.upstreams[upstream];
        hs.response_timeout = match route.response_timeout {
            // The route's timeout is for plain HTTP; an upgrade answers at once.
            Some(t) if !req.is_upgrade() => t,
            _ => up.response_timeout,
        };
        self.route = Some(route.path.clone());

        hs.head = Vec::new();
        // POST and PATCH are not idempotent: never sent twice (RFC 9110 §9.2.2).
        if !matches!(req.method.as_str(), "POST" | "PATCH" | "LOCK") {
            hs.replay = Some(forwarded.clone());
        }
        hs.request = Some(req);
        self.flow[Side::Backend.idx()]
            .queue
            .push_back(Payload::owned(forwarded));
        self.upload = upload;
        if !matches!(self.upload, Upload::Body(_)) {
            self.stop_client_recv(out);
        }
        self.connect_next(0, out);
    }

    /// Picks a backend not tried yet and connects, or answers 502/504.
    fn connect_next(&mut self, attempt: u32, out: &mut Vec<Action>) {
        let hs = self.hs.as_mut().expect("handshake state");
        let upstream = &hs.snap.upstreams[hs.upstream];
        // Each backend once, at most.
        let picked = RNG.with(|rng| upstream.pick(&hs.tried, &mut rng.borrow_mut()));
        match picked {
            Some((i, lease)) => {
                hs.tried.push(i);
                hs.attempt = attempt;
                let addr = lease.backend().addr;
                self.backend = Some(addr);

                let timeout = upstream.connect_timeout;
                self.lease = Some(lease);
                self.set_stage(Stage::Connecting { attempt });
                out.push(Action::Connect(addr));
                out.push(Action::Timer(TimerKind::Connect { attempt }, timeout));
            }
            None => {
                let reject = if attempt == 0 && hs.tried.is_empty() {
                    Reject::BadGateway("no backend available")
                } else if hs.last_timed_out {
                    Reject::GatewayTimeout
                } else {
                    Reject::BadGateway("no backend reachable")
                };
                self.respond(reject, out);
            }
        }
    }

    fn try_response(&mut self, out: &mut Vec<Action>) {
        let hs = self.hs.as_mut().expect("handshake state");
        let req = hs.request.as_ref().expect("request parsed");
        let max = hs.snap.upstreams[hs.upstream].max_response_head;
        let parsed =
            http::parse_response(&hs.resp, max, req.ws_key.as_deref(), req.method == "HEAD");
        let resp = match parsed {
            Ok(None) => return,
            Ok(Some(r)) => r,
            Err(reject) => {
                self.abort_backend(out);
                return self.respond(reject, out);
            }
        };
        let data = std::mem::take(&mut hs.resp);
        let early = std::mem::take(&mut hs.early);
        let early_eof = hs.early_eof;
        let extra = (data.len() - resp.head_len) as u64;
        if resp.body != Body::Upgraded {
            let send_timeout = hs.snap.config.server.send_timeout;
            self.send_timer(send_timeout, out);
        }
        self.status = Some(resp.status);
        self.hs = None;
        self.set_stage(Stage::Relaying);
        let to_client = &mut self.flow[Side::Client.idx()];
        match resp.body {
            Body::Upgraded => to_client.frames.feed(&data[resp.head_len..]),
            Body::UntilClose => self.finish_with_response = true,
            Body::None | Body::Length(_) => {
                let want = if let Body::Length(n) = resp.body {
                    n
                } else {
                    0
                };
                self.finish_with_response = true;
                to_client.limit = Some(want.saturating_sub(extra));
            }
        }
        let mut payload = Payload::owned(data);
        if let Body::Length(n) = resp.body {
            payload.truncate(resp.head_len + n.min(extra) as usize);
        } else if resp.body == Body::None {
            payload.truncate(resp.head_len);
        }
        to_client.queue.push_back(payload);
        self.kick(Side::Client, out);
        if resp.body == Body::Upgraded {
            self.release_early(early, early_eof, out);
        } else if self.upload == Upload::HeldFor101 {
            // Declined: what the client sent behind its upgrade is dropped
            // with the connection, which closes after this answer.
            self.upload = Upload::Complete;
        }
    }

    /// The 101 is in: the client's bytes held behind its upgrade head go to
    /// the backend first, then the client is read again.
    fn release_early(&mut self, early: Vec<u8>, early_eof: bool, out: &mut Vec<Action>) {
        self.upload = Upload::Open;
        let to_backend = &mut self.flow[Side::Backend.idx()];
        if !early.is_empty() {
            to_backend.frames.feed(&early);
            to_backend.queue.push_back(Payload::owned(early));
            self.kick(Side::Backend, out);
        }
        if early_eof {
            let to_backend = &mut self.flow[Side::Backend.idx()];
            to_backend.src_eof = true;
            self.closer.get_or_insert(Closer::Client);
            if to_backend.queue.is_empty() && !to_backend.sending && !to_backend.shut {
                to_backend.shut = true;
                out.push(Action::ShutdownWrite(Side::Backend));
            }
        } else if self.wants_recv(Side::Client) {
            self.ensure_recv(Side::Client, out);
        }
    }

    /// Starts answering `req` from a static route.
    fn serve_static(
        &mut self,
        req: Request,
        route: crate::config::RouteConfig,
        site: Arc<crate::config::StaticConfig>,
        out: &mut Vec<Action>,
    ) {
        let hs = self.hs.as_mut().expect("handshake state");
        let server = &hs.snap.config.server;
        let path = if route.strip_prefix {
            route::rewrite_target(&route, req.path())
        } else {
            req.path().to_string()
        };
        let keep_alive = req.keep_alive()
            && !req.has_body()
            && !self.no_keepalive
            && !self.peer_eof[Side::Client.idx()]
            && self.requests + 1 < server.keepalive_requests.get();
        let h = |name: &str| req.header(name).map(<[u8]>::to_vec);
        let ask = files::Ask {
            method: req.method.clone(),
            path,
            target: req.target.clone(),
            minor: req.minor,
            keep_alive,
            accept_encoding: h("accept-encoding"),
            if_none_match: h("if-none-match"),
            if_modified_since: h("if-modified-since"),
            if_match: h("if-match"),
            if_unmodified_since: h("if-unmodified-since"),
            range: h("range"),
            if_range: h("if-range"),
        };
        let gzip_cache = server.gzip_cache_size;
        // What follows the head is the next request (pipelined), or a body
        // this answer ignores (then the connection is not kept).
        hs.head.drain(..req.head_len);
        self.route = Some(route.path.clone());
        let (serve, next) = files::Serve::start(site, ask, gzip_cache);
        self.serve = Some(Box::new(serve));
        let send_timeout = server.send_timeout;
        let armed = std::mem::replace(&mut hs.send_timer, true);
        self.set_stage(Stage::Serving);
        if !armed {
            self.send_timer(send_timeout, out);
        }
        self.follow(next, out);
    }

    /// Watches an HTTP answer for a client that stops taking it.
    fn send_timer(&self, period: Duration, out: &mut Vec<Action>) {
        out.push(Action::Timer(
            TimerKind::Send {
                period_ms: period.as_millis().min(u128::from(u32::MAX)) as u32,
                mark: self.flow[Side::Client.idx()].bytes,
            },
            period,
        ));
    }

    /// Carries out the static answer's next step.
    fn follow(&mut self, next: files::Next, out: &mut Vec<Action>) {
        match next {
            files::Next::Open(req) => out.push(Action::OpenFile(req)),
            files::Next::Read { at, len, offset } => out.push(Action::ReadFile { at, len, offset }),
            files::Next::Send { start, len } => {
                let serve = self.serve.as_ref().expect("serving");
                self.status = Some(serve.status);
                self.flow[Side::Client.idx()]
                    .queue
                    .push_back(Payload::File {
                        start: start as u32,
                        len: len as u32,
                    });
                self.kick(Side::Client, out);
            }
            files::Next::Splice { offset, len } => {
                let serve = self.serve.as_mut().expect("serving");
                serve.spliced = files::Spliced {
                    offset,
                    left: len,
                    in_pipe: 0,
                };
                self.fill_pipe(out);
            }
            files::Next::Done => self.request_done(out),
            files::Next::Abort => self.close(Closer::Error, out),
        }
    }

    /// Static body by splice: the pipe is empty, fill it from the file.
    fn fill_pipe(&mut self, out: &mut Vec<Action>) {
        let sp = self.serve.as_ref().expect("serving").spliced;
        out.push(Action::FileToPipe {
            offset: sp.offset,
            len: sp.left.min(SPLICE_CHUNK as u64) as u32,
        });
    }

    /// A file → pipe splice of the static body moved `res` bytes.
    pub fn on_file_spliced(&mut self, res: Result<usize, i32>, out: &mut Vec<Action>) {
        if self.stage != Stage::Serving {
            return;
        }
        let serve = self.serve.as_mut().expect("serving");
        match res {
            Ok(n) if n > 0 => {
                let sp = &mut serve.spliced;
                sp.offset += n as u64;
                sp.left = sp.left.saturating_sub(n as u64);
                sp.in_pipe += n;
                out.push(Action::PipeToClient {
                    pending: sp.in_pipe,
                });
            }
            // EOF: the file shrank after its length was promised.
            _ => {
                if let Err(e) = res {
                    log::warn!(
                        "static: splice from the file failed: {}",
                        std::io::Error::from_raw_os_error(e)
                    );
                }
                let next = serve.on_spliced(false);
                self.follow(next, out);
            }
        }
    }

    /// A pipe → client splice of the static body moved `res` bytes.
    pub fn on_pipe_drained(&mut self, res: Result<usize, i32>, out: &mut Vec<Action>) {
        if self.stage != Stage::Serving {
            return;
        }
        let serve = self.serve.as_mut().expect("serving");
        match res {
            Ok(m) => {
                self.flow[Side::Client.idx()].bytes += m as u64;
                let sp = &mut serve.spliced;
                sp.in_pipe -= m;
                if sp.in_pipe > 0 {
                    out.push(Action::PollOut(Side::Client));
                } else if sp.left > 0 {
                    self.fill_pipe(out);
                } else {
                    out.push(Action::LeaveSplice {
                        dst: Side::Client,
                        reusable: true,
                    });
                    let next = serve.on_spliced(true);
                    self.follow(next, out);
                }
            }
            Err(libc::EAGAIN) => out.push(Action::PollOut(Side::Client)),
            Err(_) => {
                // The client is gone; what is in the pipe goes with it.
                out.push(Action::LeaveSplice {
                    dst: Side::Client,
                    reusable: false,
                });
                let next = serve.on_spliced(false);
                self.follow(next, out);
            }
        }
    }

    /// The file opened for the static answer (its `fstat`), or an errno.
    pub fn on_file_open(&mut self, res: Result<files::Meta, i32>, out: &mut Vec<Action>) {
        if self.stage != Stage::Serving {
            return;
        }
        let (adopt, next) = self.serve.as_mut().expect("serving").on_open(res);
        if adopt {
            out.push(Action::AdoptFile);
        }
        self.follow(next, out);
    }

    pub fn on_file_read(&mut self, res: Result<usize, i32>, out: &mut Vec<Action>) {
        if self.stage != Stage::Serving {
            return;
        }
        let next = self.serve.as_mut().expect("serving").on_read(res);
        self.follow(next, out);
    }

    /// A static answer is sent: wait for the next request, or close.
    fn request_done(&mut self, out: &mut Vec<Action>) {
        let serve = self.serve.take().expect("serving");
        let keep = serve.keep_alive() && !self.no_keepalive && !self.peer_eof[0];
        out.push(Action::RequestDone(Box::new(Done {
            status: serve.status,
            route: self.route.take(),
            path: self.path.take(),
            bytes_from_client: self.bytes_to(Side::Backend),
            bytes_to_client: self.bytes_to(Side::Client),
        })));
        drop(serve);
        self.requests += 1;
        self.status = None;
        self.bytes_base = [self.flow[0].bytes, self.flow[1].bytes];
        if !keep {
            self.closer = Some(Closer::Proxy);
            self.set_stage(Stage::Responding);
            self.flow[Side::Client.idx()].shut = true;
            out.push(Action::ShutdownWrite(Side::Client));
            self.ensure_recv(Side::Client, out);
            out.push(Action::Timer(TimerKind::Linger, self.linger));
            return;
        }
        self.set_stage(Stage::ReadingHead);
        let req = self.requests;
        let hs = self.hs.as_mut().expect("handshake state");
        hs.request = None;
        let server = &hs.snap.config.server;
        if hs.head.is_empty() {
            out.push(Action::Timer(
                TimerKind::KeepAlive { req },
                server.keepalive_timeout,
            ));
        } else {
            out.push(Action::Timer(
                TimerKind::Handshake { req },
                server.handshake_timeout,
            ));
        }
        if self.recv[Side::Client.idx()] == RecvState::Off {
            self.ensure_recv(Side::Client, out);
        }
        if !self.hs.as_ref().expect("handshake state").head.is_empty() {
            self.try_head(out);
        }
    }

    /// The shard's pool is running low: a direction whose send has been in
    /// flight since the last sweep is not being read by its peer. What it
    /// holds of the pool is copied out (`copy` gives a buffer's bytes) and
    /// given back: queued payloads now, the one in flight once its cancel
    /// returns ([`Conn::on_send_unpinned`]). Its source stays unread until it
    /// drains, so what the slow reader has not taken waits in kernel socket
    /// buffers, which are per socket, not in the shared pool.
    pub fn unpin(&mut self, copy: &mut dyn FnMut(u16, u32, u32) -> Vec<u8>, out: &mut Vec<Action>) {
        if self.stage == Stage::Closing {
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
        let flow = &mut self.flow[dst.idx()];
        flow.sending = false;
        flow.unpinning = false;
        flow.pinned_seen = false;
        if self.stage == Stage::Closing {
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
        if self.stage != Stage::Relaying || self.going_away {
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

    /// Draining: a kept-alive connection between requests closes now; one
    /// mid-request closes after its answer.
    pub fn drain_idle(&mut self, out: &mut Vec<Action>) {
        self.no_keepalive = true;
        if self.requests > 0 && self.between_requests() {
            self.close(Closer::Drain, out);
        }
    }

    /// The shard's idle sweep: a relaying session that received nothing
    /// since the previous sweep, with nothing queued, is parked (both
    /// recvs stopped and replaced by readiness polls). Returns whether it
    /// was parked now.
    pub fn idle_sweep(&mut self, out: &mut Vec<Action>) -> bool {
        if std::mem::take(&mut self.active) {
            return false;
        }
        let quiet = self.stage == Stage::Relaying
            && !self.going_away
            && self.recv == [RecvState::Armed, RecvState::Armed]
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

    /// Answers the client with ringlb's own response, then closes.
    fn respond(&mut self, reject: Reject, out: &mut Vec<Action>) {
        self.status = Some(reject.status());
        self.closer = Some(Closer::Proxy);
        self.lease = None;
        self.hs = None;
        self.serve = None;
        let linger = self.linger;
        self.set_stage(Stage::Responding);
        for flow in &mut self.flow {
            release_unsent(flow, out);
        }
        self.flow[Side::Client.idx()]
            .queue
            .push_back(Payload::owned(reject.response()));
        self.kick(Side::Client, out);
        out.push(Action::Timer(TimerKind::Linger, linger));
    }

    /// `side` reset its connection while relaying. What it sent before the
    /// reset still goes to the other side (a Close frame, say), then the
    /// session ends; nothing more can reach `side`.
    fn peer_reset(&mut self, side: Side, out: &mut Vec<Action>) {
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
    fn write_failed(&mut self, dst: Side, out: &mut Vec<Action>) {
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

    /// The backend reset or failed before answering; nothing has reached
    /// the client yet, so it gets a proper 502 rather than a dropped socket.
    ///
    /// An idempotent request none of whose answer has arrived is sent again
    /// to the next backend (like nginx's `proxy_next_upstream error`), once
    /// the failed backend's socket has no op left.
    fn backend_failed(&mut self, why: &'static str, out: &mut Vec<Action>) {
        let hs = self.hs.as_ref().expect("handshake state");
        let untried = hs.tried.len() < hs.snap.upstreams[hs.upstream].backends.len();
        if hs.replay.is_none() || !hs.resp.is_empty() || !untried {
            log::debug!(
                "{}: {why}; not retried (replayable: {}, answer bytes: {}, backends left: {untried})",
                self.backend.map_or_else(String::new, |b| b.to_string()),
                hs.replay.is_some(),
                hs.resp.len()
            );
            self.abort_backend(out);
            return self.respond(Reject::BadGateway(why), out);
        }
        let attempt = hs.attempt;
        log::debug!(
            "{}: {why}; sending the request again to another backend",
            self.backend.map_or_else(String::new, |b| b.to_string())
        );
        // Not counted against the backend's health: any client can make a
        // backend hang up (a request it rejects by closing), and counting it
        // would let a few requests mark every backend down for everyone.
        // Only connect failures, which no client can cause, count.
        self.lease = None;
        self.connected = false;
        release_unsent(&mut self.flow[Side::Backend.idx()], out);
        self.set_stage(Stage::Retrying { attempt });
        out.push(Action::ReleaseBackend);
    }

    fn abort_backend(&mut self, out: &mut Vec<Action>) {
        self.connected = false;
        out.push(Action::AbortBackend);
    }

    /// Shutdown: end the session now. An upgraded session that sits between
    /// frames both ways gets a Close 1001 on each side (after what is already
    /// queued), then its write halves are shut and it ends when both peers
    /// close or `linger_timeout` passes; anything else is closed at once.
    pub fn drain_close(&mut self, out: &mut Vec<Action>) {
        let clean = self.stage == Stage::Relaying
            && self.status == Some(101)
            && !self.going_away
            && self.flow.iter().all(|f| {
                f.frames.at_boundary() && !f.shut && !f.src_eof && f.splice == Splice::Off
            });
        if !clean {
            return self.close(Closer::Drain, out);
        }
        self.going_away = true;
        self.closer = Some(Closer::Drain);
        for (dst, frame) in [
            (Side::Client, frames::close_going_away_to_client()),
            (Side::Backend, frames::close_going_away_to_backend()),
        ] {
            let flow = &mut self.flow[dst.idx()];
            flow.queue.push_back(Payload::owned(frame));
            flow.src_eof = true;
            self.kick(dst, out);
        }
        for side in [Side::Client, Side::Backend] {
            if self.recv[side.idx()] == RecvState::Off {
                self.ensure_recv(side, out);
            }
        }
        out.push(Action::Timer(TimerKind::Linger, self.linger));
    }

    fn close(&mut self, closer: Closer, out: &mut Vec<Action>) {
        self.closer.get_or_insert(closer);
        self.close_now(out);
    }

    fn close_now(&mut self, out: &mut Vec<Action>) {
        if self.stage == Stage::Closing {
            return;
        }
        self.set_stage(Stage::Closing);
        self.hs = None;
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

/// Drops what is queued but not yet handed to the kernel.
fn release_unsent(flow: &mut Flow, out: &mut Vec<Action>) {
    let keep = usize::from(flow.sending);
    while flow.queue.len() > keep {
        if let Some(Payload::Ring { bid, .. }) = flow.queue.pop_back() {
            out.push(Action::Release(bid));
        }
    }
}

thread_local! {
    static RNG: std::cell::RefCell<Rng> = std::cell::RefCell::new(Rng::seeded());
    /// Pool buffers one direction may hold now; the shard lowers it as its
    /// provided-buffer ring fills (see [`pool_quota`]).
    static POOL_QUOTA: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
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

#[cfg(test)]
mod tests;
