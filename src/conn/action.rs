//! What the connection and the shard say to each other: the sides, the
//! payloads queued for them (and who owns their bytes while the kernel
//! reads them), the timers, and the actions the connection asks the shard
//! to carry out. Only these cross the sans-IO boundary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::files;

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

    pub fn remaining(&self) -> usize {
        match self {
            Payload::Ring { len, .. } | Payload::File { len, .. } => *len as usize,
            Payload::Owned(o) => o.data.len() - o.start,
        }
    }

    pub(super) fn advance(&mut self, n: usize) {
        match self {
            Payload::Ring { start, len, .. } | Payload::File { start, len } => {
                *start += n as u32;
                *len -= n as u32;
            }
            Payload::Owned(o) => o.start += n,
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
    /// A clean close found no boundary in time: frame boundaries will do
    /// now, or (`fin`) none came either and FIN it is (`close.rs`).
    CloseBoundary {
        fin: bool,
    },
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
    /// Cancel the readiness poll of a parked side; report with
    /// [`Conn::on_poll_cancelled`].
    CancelPoll(Side),
    /// Cancel a splicing direction's writability poll on this side (a
    /// session being quiesced for export); its completion carries no news.
    CancelPollOut(Side),
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

/// One answered request, for the access log and metrics.
#[derive(Debug, PartialEq, Eq)]
pub struct Done {
    pub status: u16,
    pub route: Option<Arc<str>>,
    pub path: Option<std::sync::Arc<str>>,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
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
    /// ringlb closed it to move it off a backend being drained.
    Drain,
    /// ringlb closed it to move it to a backend with fewer sessions.
    Rebalance,
    /// ringlb closed it while shutting down.
    Shutdown,
    /// A peer took no byte for `stalled_peer_timeout` while bytes waited.
    StalledPeer,
    Error,
}

impl Closer {
    /// The reason as the access log and the metrics spell it; `None` (not
    /// known) counts as an error.
    pub fn name(closer: Option<Closer>) -> &'static str {
        match closer {
            Some(Closer::Client) => "client",
            Some(Closer::Backend) => "backend",
            Some(Closer::Proxy) => "proxy",
            Some(Closer::Drain) => "drain",
            Some(Closer::Rebalance) => "rebalance",
            Some(Closer::Shutdown) => "shutdown",
            Some(Closer::StalledPeer) => "stalled_peer",
            Some(Closer::Error) | None => "error",
        }
    }
}
