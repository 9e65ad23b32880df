//! A relaying WebSocket session as plain, versioned data, and back: the
//! core of the live hand-off on a binary upgrade. The two sockets travel
//! separately (SCM_RIGHTS); this record is everything else the connection
//! holds: the bytes received and not yet sent each way, where each
//! direction is in its frames, byte counts, half-closes, the backend (for
//! least-connections counts) and what the access log needs. A TLS side
//! adds its record-layer state (`TlsRecord`: keys, IVs, sequence numbers,
//! a record cut across receives); bytes queued towards a TLS side are
//! already sealed, so they travel as they are.
//!
//! ```text
//! Relaying(Upgraded) ─quiesce─► Relaying(Quiescing) ─(every op returned)─► export ─► SessionRecord
//!                                 recvs and polls cancelled,                          │ encode / decode
//!                                 a send in flight cancelled (its bytes kept)         ▼
//!                                                           import ─► Relaying(Upgraded), recvs and sends re-armed
//! ```
//!
//! Only an upgraded session that is not closing can be exported; `quiesce`
//! says no otherwise, and the session stays where it is. A splicing
//! direction has its readiness polls cancelled; the bytes already in its
//! pipe are read out by the shard and put in front of the record's pending
//! bytes ([`Conn::piped`], [`Conn::export`]'s `piped`). The shard exports
//! only once its driver holds no op of the slot either (a splice's polls
//! are the driver's to count, not the connection's).

use std::net::{IpAddr, SocketAddr};

use super::*;

/// First bytes of an encoded record.
const MAGIC: &[u8; 4] = b"RLBS";
/// Bumped whenever the encoding changes; a record of another version is
/// refused rather than misread, except version 3 (the same record without
/// `tls`: every side plain), so that a live upgrade from the ringlb before
/// TLS hand-off keeps its sessions.
pub const RECORD_VERSION: u16 = 4;
const OLDEST_READ: u16 = 3;

/// A quiesced relaying session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub client_addr: SocketAddr,
    /// The upstream and backend it relays to; the importer takes a
    /// least-connections lease on it if its configuration still has it.
    pub upstream: String,
    pub backend: SocketAddr,
    pub route: Option<String>,
    pub path: Option<String>,
    /// Bytes moved towards each side before the export, for the access
    /// log. Indexed like the connection's flows, by destination.
    pub flows: [FlowRecord; 2],
    /// EOF seen from each side.
    pub peer_eof: [bool; 2],
    /// Who ended a direction already, if one did.
    pub closer: Option<Closer>,
    /// Parked (silent): the importer waits with polls, not recvs.
    pub parked: bool,
    /// How long the session (its current request) had been running, for
    /// the access log's duration. Set by the shard, which keeps the clock
    /// (version 3).
    pub age_ms: u64,
    /// Each side's transport, by side (version 4).
    pub tls: [TlsSide; 2],
}

/// What a side's transport carries over.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TlsSide {
    #[default]
    Plain,
    /// An established TLS session.
    Tls(Box<TlsRecord>),
    /// A TLS session whose state could not be taken: the importer refuses
    /// the record, and the session is closed rather than continued as
    /// plaintext.
    Lost,
}

/// One direction of a session, by destination.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlowRecord {
    /// Received from the source and not yet sent, in order.
    pub pending: Vec<u8>,
    /// The frame tracker: header bytes of a frame not yet complete, and
    /// payload bytes of the current frame still to come.
    pub frame_header: Vec<u8>,
    pub frame_left: u64,
    /// Inside a fragmented message (version 2).
    pub frame_fragmented: bool,
    pub bytes: u64,
    /// The source ended; the destination's write half is shut once
    /// `pending` is sent (or already was: `shut`).
    pub src_eof: bool,
    pub shut: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("not a session record")]
    Magic,
    #[error(
        "session record version {0}, this ringlb reads versions {OLDEST_READ} to {RECORD_VERSION}"
    )]
    Version(u16),
    #[error("session record truncated")]
    Truncated,
    #[error("invalid session record: {0}")]
    Invalid(&'static str),
}

impl Conn {
    /// A relaying session a hand-off cannot take, because a side's
    /// transport state cannot travel (a TLS session that failed, or a
    /// test transport): it stays in this process until it ends.
    pub fn stays_on_upgrade(&self) -> bool {
        matches!(self.state, State::Relaying(_))
            && !self.transport.iter().all(Transport::exportable)
    }

    /// Starts taking a relaying session out of this process: every recv
    /// and poll is cancelled, and a send in flight too (a cancelled send
    /// sent nothing; its bytes stay queued). Nothing is re-armed until
    /// [`Conn::export`] or the session ends. Returns false, changing
    /// nothing, for a session that cannot be exported now (not upgraded,
    /// closing, splicing).
    pub fn quiesce(&mut self, out: &mut Vec<Action>) -> bool {
        // An established TLS session travels as its keys and sequence
        // numbers (`TlsRecord`).
        let exportable = matches!(
            self.state,
            State::Relaying(Relay::Upgraded { going_away: false })
        ) && self.transport.iter().all(Transport::exportable)
            && self.flow.iter().all(|f| !f.dead);
        if !exportable {
            return false;
        }
        self.state = State::Relaying(Relay::Quiescing);
        for side in [Side::Client, Side::Backend] {
            match self.recv[side.idx()] {
                RecvState::Armed => {
                    self.recv[side.idx()] = RecvState::Cancelling;
                    out.push(Action::CancelRecv(side));
                }
                RecvState::Polling => out.push(Action::CancelPoll(side)),
                RecvState::Off | RecvState::Cancelling => {}
            }
            let flow = &mut self.flow[side.idx()];
            if let Splice::On { .. } = flow.splice {
                // Whichever poll the splice is waiting on: readable source,
                // or writable destination (a cancel that finds none is
                // harmless).
                out.push(Action::CancelPoll(side.other()));
                out.push(Action::CancelPollOut(side));
            }
            if flow.sending && !flow.unpinning {
                flow.unpinning = true;
                out.push(Action::CancelSend(side));
            }
        }
        true
    }

    /// Quiescing, and nothing of this connection is in flight any more.
    pub fn is_quiescent(&self) -> bool {
        matches!(self.state, State::Relaying(Relay::Quiescing))
            && self.recv.iter().all(|r| *r == RecvState::Off)
            && self.flow.iter().all(|f| !f.sending)
    }

    /// Bytes waiting in the pipe of each splicing direction, by
    /// destination side: the shard reads them out for [`Conn::export`].
    pub fn piped(&self) -> [usize; 2] {
        self.flow.each_ref().map(|f| match f.splice {
            Splice::On { in_pipe, .. } => in_pipe,
            Splice::Off | Splice::Pending => 0,
        })
    }

    /// True while being quiesced (or quiescent): nothing may be started.
    pub fn is_quiescing(&self) -> bool {
        self.quiescing()
    }

    /// A parked side's poll was cancelled (by [`Conn::quiesce`]).
    pub fn on_poll_cancelled(&mut self, side: Side) {
        if self.recv[side.idx()] == RecvState::Polling {
            self.recv[side.idx()] = RecvState::Off;
            self.parking[side.idx()] = true;
        }
    }

    /// Turns a quiescent session into its record. `copy` gives the bytes of
    /// a provided buffer; the buffers this session held are pushed as
    /// releases. Panics unless [`Conn::is_quiescent`].
    ///
    /// `snap` is this process's configuration, to name the backend's
    /// upstream (a backend keeps its state across reloads; one a reload
    /// removed is named by address only).
    ///
    /// `piped` holds, by destination side, what [`Conn::piped`] said the
    /// pipes held, read out of them: older than anything queued, so it goes
    /// first.
    pub fn export(
        self,
        snap: &Snapshot,
        copy: &mut dyn FnMut(u16, u32, u32) -> Vec<u8>,
        piped: [Vec<u8>; 2],
        out: &mut Vec<Action>,
    ) -> SessionRecord {
        assert!(
            self.is_quiescent(),
            "export of a session with ops in flight"
        );
        let parked = self.parking.iter().any(|p| *p);
        let upstream = self
            .lease
            .as_ref()
            .and_then(|l| {
                snap.upstreams.iter().find(|u| {
                    u.backends
                        .iter()
                        .any(|b| Arc::ptr_eq(&b.state, &l.backend().state))
                })
            })
            .map(|u| u.name.clone())
            .unwrap_or_default();
        let backend = self
            .backend_addr()
            .or(self.backend)
            .unwrap_or(self.client_addr);
        let tls = self.transport.each_ref().map(Transport::export);
        let Conn {
            client_addr,
            flow,
            route,
            path,
            peer_eof,
            closer,
            ..
        } = self;
        let mut piped = piped.into_iter();
        let flows = flow.map(|f| {
            let mut pending = piped.next().unwrap_or_default();
            for p in f.queue.into_iter() {
                match p {
                    Payload::Ring { bid, start, len } => {
                        pending.extend_from_slice(&copy(bid, start, len));
                        out.push(Action::Release(bid));
                    }
                    Payload::Owned(o) => pending.extend_from_slice(&o.data[o.start..]),
                    Payload::File { .. } => unreachable!("a relaying session queues no file"),
                }
            }
            let (frame_header, frame_left, frame_fragmented) = f.frames.to_parts();
            FlowRecord {
                pending,
                frame_header,
                frame_left,
                frame_fragmented,
                bytes: f.bytes,
                src_eof: f.src_eof,
                shut: f.shut,
            }
        });
        SessionRecord {
            client_addr,
            upstream,
            backend,
            route: route.map(|r| r.to_string()),
            path: path.map(|p| p.to_string()),
            flows,
            peer_eof,
            closer,
            parked,
            age_ms: 0,
            tls,
        }
    }

    /// Rebuilds a relaying session from its record, in this process's
    /// configuration, and re-arms it: sends for what was pending, recvs (or
    /// polls, if it was parked) on every side that has not ended.
    pub fn import(
        rec: SessionRecord,
        snap: Arc<Snapshot>,
        out: &mut Vec<Action>,
    ) -> Result<Conn, RecordError> {
        let lease = snap
            .upstreams
            .iter()
            .find(|u| u.name == rec.upstream)
            .and_then(|u| u.lease_on(rec.backend));
        let mut c = Conn::accept(snap, rec.client_addr, &mut Vec::new());
        for (t, side) in c.transport.iter_mut().zip(&rec.tls) {
            *t = Transport::import(side).map_err(RecordError::Invalid)?;
        }
        c.recv = [RecvState::Off, RecvState::Off];
        c.upload = Upload::Open;
        c.lease = lease;
        c.backend = Some(rec.backend);
        c.status = Some(101);
        c.route = rec.route.map(Arc::from);
        c.path = rec.path.as_deref().map(intern::intern);
        c.peer_eof = rec.peer_eof;
        c.closer = rec.closer;
        c.active = !rec.parked;
        c.set_stage(Stage::Connecting { attempt: 0 });
        c.set_stage(Stage::AwaitingResponse);
        c.set_stage(Stage::Relaying);
        for (i, f) in rec.flows.into_iter().enumerate() {
            let flow = &mut c.flow[i];
            flow.frames =
                FrameTracker::from_parts(&f.frame_header, f.frame_left, f.frame_fragmented)
                    .ok_or(RecordError::Invalid("frame state"))?;
            flow.bytes = f.bytes;
            flow.src_eof = f.src_eof;
            flow.shut = f.shut;
            if !f.pending.is_empty() {
                flow.queue.push_back(Payload::owned(f.pending));
            }
        }
        for side in [Side::Client, Side::Backend] {
            c.kick(side, out);
            let flow = &mut c.flow[side.idx()];
            if flow.src_eof && flow.queue.is_empty() && !flow.shut {
                flow.shut = true;
                out.push(Action::ShutdownWrite(side));
            }
        }
        for side in [Side::Client, Side::Backend] {
            if c.wants_recv(side) && !c.peer_eof[side.idx()] {
                if rec.parked {
                    c.recv[side.idx()] = RecvState::Polling;
                    out.push(Action::PollIn(side));
                } else {
                    c.ensure_recv(side, out);
                }
            }
        }
        Ok(c)
    }
}

impl SessionRecord {
    /// The record as bytes: magic, version, then each field in order
    /// (integers little-endian, byte strings length-prefixed).
    pub fn encode(&self) -> Vec<u8> {
        // Sized for everything, so the buffer never grows: a reallocation
        // would free a copy of the TLS keys that nobody wipes.
        let strings = [
            &self.upstream,
            self.route.as_deref().unwrap_or(""),
            self.path.as_deref().unwrap_or(""),
        ]
        .iter()
        .map(|s| s.len() + 5)
        .sum::<usize>();
        let tls = self
            .tls
            .iter()
            .map(|t| match t {
                TlsSide::Tls(r) => {
                    64 + r.partial.len()
                        + r.sni.as_ref().map_or(0, String::len)
                        + r.rx.key.len()
                        + r.tx.key.len()
                }
                _ => 1,
            })
            .sum::<usize>();
        let mut w = Vec::with_capacity(
            128 + strings
                + tls
                + self
                    .flows
                    .iter()
                    .map(|f| f.pending.len() + f.frame_header.len() + 32)
                    .sum::<usize>(),
        );
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(&RECORD_VERSION.to_le_bytes());
        put_addr(&mut w, self.client_addr);
        put_bytes(&mut w, self.upstream.as_bytes());
        put_addr(&mut w, self.backend);
        put_opt_str(&mut w, self.route.as_deref());
        put_opt_str(&mut w, self.path.as_deref());
        for f in &self.flows {
            put_bytes(&mut w, &f.pending);
            put_bytes(&mut w, &f.frame_header);
            w.extend_from_slice(&f.frame_left.to_le_bytes());
            w.extend_from_slice(&f.bytes.to_le_bytes());
            w.push(u8::from(f.src_eof) | u8::from(f.shut) << 1 | u8::from(f.frame_fragmented) << 2);
        }
        w.push(u8::from(self.peer_eof[0]) | u8::from(self.peer_eof[1]) << 1);
        w.push(match self.closer {
            None => 0,
            Some(Closer::Client) => 1,
            Some(Closer::Backend) => 2,
            Some(Closer::Proxy) => 3,
            Some(Closer::Drain) => 4,
            Some(Closer::StalledPeer) => 5,
            Some(Closer::Error) => 6,
            Some(Closer::Rebalance) => 7,
            Some(Closer::Shutdown) => 8,
        });
        w.push(u8::from(self.parked));
        w.extend_from_slice(&self.age_ms.to_le_bytes());
        let cap = w.capacity();
        for t in &self.tls {
            match t {
                TlsSide::Plain => w.push(0),
                TlsSide::Lost => w.push(2),
                TlsSide::Tls(r) => {
                    w.push(1);
                    w.push(
                        u8::from(r.tls13)
                            | u8::from(r.client) << 1
                            | u8::from(r.resumed) << 2
                            | u8::from(r.peer_closed) << 3
                            | u8::from(r.closed_write) << 4,
                    );
                    w.extend_from_slice(&r.version.to_le_bytes());
                    w.extend_from_slice(&r.suite.to_le_bytes());
                    put_opt_str(&mut w, r.sni.as_deref());
                    put_bytes(&mut w, &r.partial);
                    for d in [&r.rx, &r.tx] {
                        w.push(d.alg);
                        put_bytes(&mut w, &d.key);
                        w.extend_from_slice(&d.iv);
                        w.extend_from_slice(&d.seq.to_le_bytes());
                    }
                }
            }
        }
        debug_assert_eq!(w.capacity(), cap, "the record buffer grew");
        w
    }

    pub fn decode(data: &[u8]) -> Result<SessionRecord, RecordError> {
        let mut r = Reader(data);
        if r.take(4)? != MAGIC {
            return Err(RecordError::Magic);
        }
        let version = u16::from_le_bytes(r.array()?);
        if !(OLDEST_READ..=RECORD_VERSION).contains(&version) {
            return Err(RecordError::Version(version));
        }
        let client_addr = r.addr()?;
        let upstream = r.string()?;
        let backend = r.addr()?;
        let route = r.opt_string()?;
        let path = r.opt_string()?;
        let mut flows: [FlowRecord; 2] = Default::default();
        for f in &mut flows {
            f.pending = r.bytes()?.to_vec();
            f.frame_header = r.bytes()?.to_vec();
            f.frame_left = u64::from_le_bytes(r.array()?);
            f.bytes = u64::from_le_bytes(r.array()?);
            let bits = r.byte()?;
            f.src_eof = bits & 1 != 0;
            f.shut = bits & 2 != 0;
            f.frame_fragmented = bits & 4 != 0;
        }
        let eof = r.byte()?;
        let closer = match r.byte()? {
            0 => None,
            1 => Some(Closer::Client),
            2 => Some(Closer::Backend),
            3 => Some(Closer::Proxy),
            4 => Some(Closer::Drain),
            5 => Some(Closer::StalledPeer),
            6 => Some(Closer::Error),
            7 => Some(Closer::Rebalance),
            8 => Some(Closer::Shutdown),
            _ => return Err(RecordError::Invalid("closer")),
        };
        let parked = r.byte()? != 0;
        let age_ms = u64::from_le_bytes(r.array()?);
        let mut tls: [TlsSide; 2] = Default::default();
        for t in tls.iter_mut().filter(|_| version >= 4) {
            *t = match r.byte()? {
                0 => TlsSide::Plain,
                2 => TlsSide::Lost,
                1 => TlsSide::Tls(Box::new(r.tls()?)),
                _ => return Err(RecordError::Invalid("transport")),
            };
        }
        if !r.0.is_empty() {
            return Err(RecordError::Invalid("bytes after the record"));
        }
        Ok(SessionRecord {
            client_addr,
            upstream,
            backend,
            route,
            path,
            flows,
            peer_eof: [eof & 1 != 0, eof & 2 != 0],
            closer,
            parked,
            age_ms,
            tls,
        })
    }
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    w.extend_from_slice(&(b.len() as u32).to_le_bytes());
    w.extend_from_slice(b);
}

fn put_opt_str(w: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => w.push(0),
        Some(s) => {
            w.push(1);
            put_bytes(w, s.as_bytes());
        }
    }
}

fn put_addr(w: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            w.push(4);
            w.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            w.push(6);
            w.extend_from_slice(&ip.octets());
        }
    }
    w.extend_from_slice(&a.port().to_le_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn byte(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }

    fn bytes(&mut self) -> Result<&'a [u8], RecordError> {
        let n = u32::from_le_bytes(self.array()?) as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, RecordError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| RecordError::Invalid("text"))
    }

    fn opt_string(&mut self) -> Result<Option<String>, RecordError> {
        match self.byte()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            _ => Err(RecordError::Invalid("optional text")),
        }
    }

    fn tls(&mut self) -> Result<TlsRecord, RecordError> {
        let bits = self.byte()?;
        if bits >> 5 != 0 {
            return Err(RecordError::Invalid("TLS flags"));
        }
        let version = u16::from_le_bytes(self.array()?);
        let suite = u16::from_le_bytes(self.array()?);
        let sni = self.opt_string()?;
        let partial = self.bytes()?.to_vec();
        let mut dir = || -> Result<DirRecord, RecordError> {
            Ok(DirRecord {
                alg: self.byte()?,
                key: self.bytes()?.to_vec(),
                iv: self.array()?,
                seq: u64::from_le_bytes(self.array()?),
            })
        };
        let rx = dir()?;
        let tx = dir()?;
        Ok(TlsRecord {
            tls13: bits & 1 != 0,
            client: bits & 2 != 0,
            rx,
            tx,
            partial,
            version,
            suite,
            sni,
            resumed: bits & 4 != 0,
            peer_closed: bits & 8 != 0,
            closed_write: bits & 16 != 0,
        })
    }

    fn addr(&mut self) -> Result<SocketAddr, RecordError> {
        let ip = match self.byte()? {
            4 => IpAddr::from(self.array::<4>()?),
            6 => IpAddr::from(self.array::<16>()?),
            _ => return Err(RecordError::Invalid("address family")),
        };
        Ok(SocketAddr::new(ip, u16::from_le_bytes(self.array()?)))
    }
}
