//! A TLS session on the client side of a connection, behind the transport
//! seam. Two phases:
//!
//! ```text
//! Handshaking(rustls ServerConnection) ──client Finished──► Records(keys + sequence numbers)
//!        │ not TLS / TLS error / timeout / client gone
//!        ▼
//!      failed (the connection closes; counted once, in Drop if not before)
//! ```
//!
//! - `Handshaking`: ciphertext from the provided buffers is cut into whole
//!   records here and fed to rustls one record at a time, so that the
//!   moment the handshake completes nothing after it sits inside rustls.
//!   What rustls writes (ServerHello..Finished, tickets) is taken by the
//!   connection and sent to the client. The connection's handshake timer
//!   runs across this phase, so `handshake_timeout` covers TLS too.
//! - `Records`: rustls hands over the traffic keys and sequence numbers
//!   (`dangerous_extract_secrets`, the same record kTLS would take) and is
//!   dropped. From then on the session is ~150 bytes: key bytes, IVs and
//!   sequence numbers for each direction, the AEAD contexts built from
//!   them while bytes move and dropped when the session parks, and a
//!   partial-record buffer that exists only while a record is cut across
//!   receives. So an idle TLS WebSocket holds no plaintext or ciphertext
//!   buffer. A kTLS path would hand this same record to the kernel.
//!
//! Record protection follows RFC 8446 §5.2-5.3 (TLS 1.3: nonce = IV xor
//! sequence, inner content type) and RFC 5288 / RFC 7905 (TLS 1.2 AES-GCM
//! with an explicit nonce, ChaCha20-Poly1305 without). After the handshake
//! only application data and alerts are accepted: a KeyUpdate (which would
//! need the traffic secret, not only the key) or a renegotiation attempt
//! ends the session, as it would under kTLS.

use std::sync::Arc;
use std::time::Instant;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{
    ClientConnection, Connection, ConnectionTrafficSecrets, ProtocolVersion, ServerConnection,
};

use crate::tls::{HandshakeResult, STATS};

/// Largest TLS record body accepted (RFC 8446 §5.2: 2^14 + 256; RFC 5246
/// allows 2^14 + 2048 for TLS 1.2 ciphertext).
const MAX_RECORD: usize = (1 << 14) + 2048;
const MAX_PLAINTEXT: usize = 1 << 14;
const HEADER: usize = 5;
const TAG: usize = 16;

const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPDATA: u8 = 23;

/// What a TLS session learned, for the access log.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// `TLSv1_3` style, as rustls names it.
    pub version: Option<ProtocolVersion>,
    pub suite: Option<rustls::CipherSuite>,
    /// Shared with the other sessions that sent the same name (`intern.rs`).
    pub sni: Option<Arc<str>>,
    pub resumed: bool,
}

/// An established TLS session as data: what a binary upgrade's live
/// hand-off carries to the next process with the rest of the session
/// (`export.rs`). The record layer is ringlb's own, so the keys, IVs and
/// sequence numbers of each direction, a record cut across receives and
/// the access log's facts are the whole of its state. Key bytes are zeroed
/// when it is dropped, and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsRecord {
    pub tls13: bool,
    /// ringlb was the client (a wss:// backend).
    pub client: bool,
    pub rx: DirRecord,
    pub tx: DirRecord,
    /// A record cut across receives, not yet opened.
    pub partial: Vec<u8>,
    /// rustls's numbers for the version and the cipher suite (0: none).
    pub version: u16,
    pub suite: u16,
    pub sni: Option<String>,
    pub resumed: bool,
    /// The peer sent close_notify.
    pub peer_closed: bool,
    /// ringlb sent close_notify: nothing more may be sealed.
    pub closed_write: bool,
}

/// One direction's keys, as data.
#[derive(Clone, PartialEq, Eq)]
pub struct DirRecord {
    /// [`ALG_AES_128_GCM`], [`ALG_AES_256_GCM`] or [`ALG_CHACHA20`].
    pub alg: u8,
    pub key: Vec<u8>,
    pub iv: [u8; 12],
    pub seq: u64,
}

pub const ALG_AES_128_GCM: u8 = 1;
pub const ALG_AES_256_GCM: u8 = 2;
pub const ALG_CHACHA20: u8 = 3;

impl Drop for DirRecord {
    fn drop(&mut self) {
        self.key.iter_mut().for_each(|b| *b = 0);
        self.iv.iter_mut().for_each(|b| *b = 0);
    }
}

impl std::fmt::Debug for TlsRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsRecord")
            .field("tls13", &self.tls13)
            .field("client", &self.client)
            .field("rx_seq", &self.rx.seq)
            .field("tx_seq", &self.tx.seq)
            .field("partial", &self.partial.len())
            .field("sni", &self.sni)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Ok,
    /// The client sent close_notify: what follows is ignored; its FIN ends
    /// the connection as on plaintext.
    PeerClosed,
    /// Not TLS, a TLS error, or a record that fails to open: close.
    Failed,
}

pub struct TlsSession {
    phase: Phase,
    /// A record cut across receives; empty (no allocation) otherwise.
    partial: Vec<u8>,
    /// Handshake bytes for the client, taken by the connection.
    reply: Vec<u8>,
    info: TlsInfo,
    pub(super) status: Status,
    started: Instant,
    /// The handshake was counted (done, or failed); else Drop counts it.
    counted: bool,
    /// The handshake timer fired: Drop counts a timeout.
    pub(super) timed_out: bool,
    /// A PROXY protocol header comes first, in plaintext (a trusted L4
    /// tier); it is passed up as is for the connection to read.
    pub(super) expect_proxy: bool,
    /// ringlb is the TLS client (a wss:// backend), not the server.
    client: bool,
    /// Client role: plaintext queued before the handshake is done, sealed
    /// behind the client's Finished.
    pending: Vec<u8>,
    /// close_notify was sealed: nothing more may be.
    closed_write: bool,
}

enum Phase {
    Handshaking(Box<Connection>),
    Records(Records),
    Failed,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match self.phase {
            Phase::Handshaking(_) => "handshaking",
            Phase::Records(_) => "records",
            Phase::Failed => "failed",
        };
        f.debug_struct("TlsSession")
            .field("phase", &phase)
            .field("partial", &self.partial.len())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        if !self.counted {
            let why = if self.timed_out {
                HandshakeResult::Timeout
            } else {
                HandshakeResult::Closed
            };
            STATS.count(why, self.info.version);
        }
    }
}

impl TlsSession {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Option<TlsSession> {
        let conn = ServerConnection::new(config).ok()?;
        Some(TlsSession::with(Connection::Server(conn), false))
    }

    /// ringlb as the client of a wss:// backend: the ClientHello is ready
    /// to send as soon as the socket connects. Not counted in the
    /// listeners' handshake metrics.
    pub fn client(
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> Option<TlsSession> {
        let conn = ClientConnection::new(config, name).ok()?;
        let mut s = TlsSession::with(Connection::Client(conn), true);
        s.counted = true;
        s.flush_handshake();
        Some(s)
    }

    fn with(conn: Connection, client: bool) -> TlsSession {
        TlsSession {
            phase: Phase::Handshaking(Box::new(conn)),
            partial: Vec::new(),
            reply: Vec::new(),
            info: TlsInfo::default(),
            status: Status::Ok,
            started: Instant::now(),
            counted: false,
            timed_out: false,
            expect_proxy: false,
            client,
            pending: Vec::new(),
            closed_write: false,
        }
    }

    /// Takes what rustls wants to send into `reply`.
    fn flush_handshake(&mut self) {
        if let Phase::Handshaking(conn) = &mut self.phase {
            while conn.wants_write() {
                if conn.write_tls(&mut self.reply).is_err() {
                    break;
                }
            }
        }
    }

    /// Client role: plaintext to send once the handshake is done.
    pub(super) fn hold(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
    }

    pub fn info(&self) -> &TlsInfo {
        &self.info
    }

    pub(super) fn handshaking(&self) -> bool {
        matches!(self.phase, Phase::Handshaking(_))
    }

    /// Handshake bytes waiting for the client.
    pub(super) fn take_reply(&mut self) -> Option<Vec<u8>> {
        (!self.reply.is_empty()).then(|| std::mem::take(&mut self.reply))
    }

    /// The session went quiet: keep only key bytes.
    pub(super) fn idle(&mut self) {
        if let Phase::Records(r) = &mut self.phase {
            r.rx.cached = None;
            r.tx.cached = None;
        }
        if self.partial.is_empty() {
            self.partial = Vec::new();
        }
    }

    fn fail(&mut self, why: HandshakeResult) {
        if !self.counted {
            self.counted = true;
            STATS.count(why, self.info.version);
        }
        self.status = Status::Failed;
        self.phase = Phase::Failed;
        self.partial = Vec::new();
    }

    /// Ciphertext in, plaintext out (empty while handshaking). Check
    /// `status` and `take_reply` after.
    pub(super) fn decode(&mut self, data: &[u8]) -> Vec<u8> {
        if self.status != Status::Ok {
            return Vec::new();
        }
        // Records are opened straight from the provided buffer; only a
        // record cut across receives is put together in `partial`.
        let joined;
        let buf: &[u8] = if self.partial.is_empty() {
            data
        } else {
            let mut b = std::mem::take(&mut self.partial);
            b.extend_from_slice(data);
            joined = b;
            &joined
        };
        let mut at = 0;
        let mut plain = Vec::new();
        if self.expect_proxy {
            use crate::proxy_protocol::{parse, Parsed};
            // The header, whole, goes up as plaintext; anything that is not
            // one goes up as it is, for the connection to refuse.
            at = match parse(buf) {
                Ok(Parsed::Partial) => {
                    self.partial = buf.to_vec();
                    return Vec::new();
                }
                Ok(Parsed::Header(_, n)) => n,
                Ok(Parsed::Absent) | Err(_) => buf.len(),
            };
            self.expect_proxy = false;
            plain.extend_from_slice(&buf[..at]);
        }
        if self.handshaking() && at < buf.len() {
            at += self.handshake(&buf[at..]);
        }
        if let Phase::Records(r) = &mut self.phase {
            plain.reserve(buf.len() - at);
            match r.open_all(&buf[at..], &mut plain) {
                Ok((used, closed)) => {
                    at += used;
                    if closed {
                        self.status = Status::PeerClosed;
                    }
                }
                Err(()) => {
                    self.fail(HandshakeResult::Failed);
                    return Vec::new();
                }
            }
        }
        if self.status != Status::Ok {
            return plain;
        }
        if at < buf.len() {
            self.partial = buf[at..].to_vec();
        }
        plain
    }

    /// Feeds whole handshake-phase records to rustls; returns how many
    /// bytes of `buf` were consumed.
    fn handshake(&mut self, buf: &[u8]) -> usize {
        let mut at = 0;
        loop {
            let Phase::Handshaking(conn) = &mut self.phase else {
                return at;
            };
            let rest = &buf[at..];
            if !self.client
                && rest.first().is_some_and(|b| *b != CT_HANDSHAKE)
                && conn.protocol_version().is_none()
            {
                // Before any version is agreed only a ClientHello may come:
                // this is plaintext HTTP (or anything else) on the TLS port.
                self.fail(HandshakeResult::NotTls);
                return buf.len();
            }
            let len = match whole_record(rest) {
                Some(0) => return at,
                Some(n) => n,
                None => {
                    self.fail(HandshakeResult::Failed);
                    return buf.len();
                }
            };
            let mut rd = &rest[..len];
            let res = conn.read_tls(&mut rd).map_err(|_| ()).and_then(|_| {
                conn.process_new_packets().map(|_| ()).map_err(|e| {
                    log::debug!("TLS handshake failed: {e}");
                })
            });
            // An alert rustls wants to send is dropped: the connection
            // closes at once, and an attacker learns nothing from it.
            if res.is_err() {
                self.fail(HandshakeResult::Failed);
                return buf.len();
            }
            at += len;
            while conn.wants_write() {
                if conn.write_tls(&mut self.reply).is_err() {
                    break;
                }
            }
            if !conn.is_handshaking() {
                if self.finish().is_err() {
                    self.fail(HandshakeResult::Failed);
                    return buf.len();
                }
                return at;
            }
        }
    }

    /// The client's Finished was processed: keep keys, drop rustls.
    fn finish(&mut self) -> Result<(), ()> {
        let Phase::Handshaking(conn) = std::mem::replace(&mut self.phase, Phase::Failed) else {
            return Err(());
        };
        self.info.version = conn.protocol_version();
        self.info.suite = conn.negotiated_cipher_suite().map(|s| s.suite());
        if let Connection::Server(s) = &*conn {
            self.info.sni = s.server_name().map(super::intern::intern);
        }
        self.info.resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let tls13 = self.info.version == Some(ProtocolVersion::TLSv1_3);
        let secrets = conn.dangerous_extract_secrets().map_err(|e| {
            log::warn!("TLS: cannot take the session keys from rustls: {e}");
        })?;
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        let mut records = Records {
            tls13,
            client: self.client,
            rx: Dir::new(rx, rx_seq)?,
            tx: Dir::new(tx, tx_seq)?,
        };
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            self.reply.extend(records.seal_all(&pending));
        }
        self.phase = Phase::Records(records);
        if self.client {
            return Ok(());
        }
        self.counted = true;
        let result = if self.info.resumed {
            HandshakeResult::Resumed
        } else {
            HandshakeResult::Full
        };
        STATS.count(result, self.info.version);
        STATS.took(self.started.elapsed());
        Ok(())
    }

    /// True if [`TlsSession::export`] can take this session: its handshake
    /// is done and it has not failed.
    pub(super) fn exportable(&self) -> bool {
        matches!(self.phase, Phase::Records(_))
            && self.status != Status::Failed
            && !self.expect_proxy
            && self.pending.is_empty()
            && self.reply.is_empty()
    }

    /// The session as data, for the live hand-off; `None` unless
    /// [`TlsSession::exportable`].
    pub(super) fn export(&self) -> Option<TlsRecord> {
        let Phase::Records(r) = &self.phase else {
            return None;
        };
        if !self.exportable() {
            return None;
        }
        Some(TlsRecord {
            tls13: r.tls13,
            client: r.client,
            rx: r.rx.export(),
            tx: r.tx.export(),
            partial: self.partial.clone(),
            version: self.info.version.map_or(0, u16::from),
            suite: self.info.suite.map_or(0, u16::from),
            sni: self.info.sni.as_deref().map(str::to_owned),
            resumed: self.info.resumed,
            peer_closed: self.status == Status::PeerClosed,
            closed_write: self.closed_write,
        })
    }

    /// An established session rebuilt from its record: it opens and seals
    /// records from the next sequence number on, as if it had never left.
    /// Its handshake was counted where it happened.
    pub(super) fn import(rec: &TlsRecord) -> Result<TlsSession, &'static str> {
        if rec.partial.len() >= HEADER + MAX_RECORD {
            return Err("TLS partial record too long");
        }
        let records = Records {
            tls13: rec.tls13,
            client: rec.client,
            rx: Dir::import(&rec.rx)?,
            tx: Dir::import(&rec.tx)?,
        };
        Ok(TlsSession {
            phase: Phase::Records(records),
            partial: rec.partial.clone(),
            reply: Vec::new(),
            info: TlsInfo {
                version: (rec.version != 0).then(|| ProtocolVersion::from(rec.version)),
                suite: (rec.suite != 0).then(|| rustls::CipherSuite::from(rec.suite)),
                sni: rec.sni.as_deref().map(super::intern::intern),
                resumed: rec.resumed,
            },
            status: if rec.peer_closed {
                Status::PeerClosed
            } else {
                Status::Ok
            },
            started: Instant::now(),
            counted: true,
            timed_out: false,
            expect_proxy: false,
            client: rec.client,
            pending: Vec::new(),
            closed_write: rec.closed_write,
        })
    }

    /// The close_notify alert, once, when ringlb is about to shut its write
    /// half (so the peer can tell an end from a truncation); `None` before
    /// the handshake is done.
    pub(super) fn close_notify(&mut self) -> Option<Vec<u8>> {
        let Phase::Records(r) = &mut self.phase else {
            return None;
        };
        if std::mem::replace(&mut self.closed_write, true) {
            return None;
        }
        let mut out = Vec::new();
        r.seal(CT_ALERT, &[1, 0], &mut out).ok()?;
        Some(out)
    }

    #[cfg(test)]
    pub(super) fn encode(&mut self, data: Vec<u8>) -> Vec<u8> {
        self.encode_slice(&data)
    }

    /// Plaintext in, records out (empty while handshaking: the client
    /// role holds it until the handshake is done).
    pub(super) fn encode_slice(&mut self, data: &[u8]) -> Vec<u8> {
        match &mut self.phase {
            Phase::Records(_) if self.closed_write => Vec::new(),
            Phase::Records(r) => r.seal_all(data),
            Phase::Handshaking(_) if self.client => {
                self.hold(data);
                Vec::new()
            }
            // Nothing is written to a TLS client before its handshake is
            // done; a failed session closes and its queue is never sent.
            Phase::Handshaking(_) | Phase::Failed => Vec::new(),
        }
    }
}

/// The length of the record at the front of `buf`: `Some(0)` while it is
/// not all there, `None` for a length no record may have.
fn whole_record(buf: &[u8]) -> Option<usize> {
    if buf.len() < HEADER {
        return Some(0);
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > MAX_RECORD {
        return None;
    }
    Some(if buf.len() >= HEADER + len {
        HEADER + len
    } else {
        0
    })
}

/// True if `msgs` is whole handshake messages, all NewSessionTicket.
fn only_tickets(mut msgs: &[u8]) -> bool {
    const NEW_SESSION_TICKET: u8 = 4;
    if msgs.is_empty() {
        return false;
    }
    while !msgs.is_empty() {
        if msgs.len() < 4 || msgs[0] != NEW_SESSION_TICKET {
            return false;
        }
        let len = usize::from(msgs[1]) << 16 | usize::from(msgs[2]) << 8 | usize::from(msgs[3]);
        if msgs.len() < 4 + len {
            return false;
        }
        msgs = &msgs[4 + len..];
    }
    true
}

struct Records {
    tls13: bool,
    /// Client role: the server may send session tickets after the handshake.
    client: bool,
    rx: Dir,
    tx: Dir,
}

/// One direction's key material.
struct Dir {
    alg: &'static aead::Algorithm,
    key: [u8; 32],
    key_len: u8,
    /// TLS 1.3 and ChaCha20: the IV xored with the sequence number. TLS 1.2
    /// AES-GCM: the first 4 bytes are the salt.
    iv: [u8; 12],
    /// TLS 1.2 AES-GCM: records carry an explicit nonce.
    explicit: bool,
    seq: u64,
    /// Built from `key` while bytes move; dropped when the session idles.
    cached: Option<LessSafeKey>,
}

impl Dir {
    fn new(s: ConnectionTrafficSecrets, seq: u64) -> Result<Dir, ()> {
        let (alg, key, iv, explicit): (_, &[u8], &[u8], bool) = match &s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key.as_ref(), iv.as_ref(), true)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key.as_ref(), iv.as_ref(), true)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key.as_ref(), iv.as_ref(), false)
            }
            _ => return Err(()),
        };
        if key.len() > 32 || iv.len() != 12 {
            return Err(());
        }
        let mut k = [0u8; 32];
        k[..key.len()].copy_from_slice(key);
        let mut v = [0u8; 12];
        v.copy_from_slice(iv);
        Ok(Dir {
            alg,
            key: k,
            key_len: key.len() as u8,
            iv: v,
            explicit,
            seq,
            cached: None,
        })
    }

    fn export(&self) -> DirRecord {
        let alg = if *self.alg == aead::AES_128_GCM {
            ALG_AES_128_GCM
        } else if *self.alg == aead::AES_256_GCM {
            ALG_AES_256_GCM
        } else {
            ALG_CHACHA20
        };
        DirRecord {
            alg,
            key: self.key[..usize::from(self.key_len)].to_vec(),
            iv: self.iv,
            seq: self.seq,
        }
    }

    fn import(d: &DirRecord) -> Result<Dir, &'static str> {
        let (alg, key_len, explicit) = match d.alg {
            ALG_AES_128_GCM => (&aead::AES_128_GCM, 16, true),
            ALG_AES_256_GCM => (&aead::AES_256_GCM, 32, true),
            ALG_CHACHA20 => (&aead::CHACHA20_POLY1305, 32, false),
            _ => return Err("TLS cipher"),
        };
        if d.key.len() != key_len {
            return Err("TLS key length");
        }
        let mut key = [0u8; 32];
        key[..key_len].copy_from_slice(&d.key);
        Ok(Dir {
            alg,
            key,
            key_len: key_len as u8,
            iv: d.iv,
            explicit,
            seq: d.seq,
            cached: None,
        })
    }

    fn key(&mut self) -> Result<&LessSafeKey, ()> {
        if self.cached.is_none() {
            let k = UnboundKey::new(self.alg, &self.key[..usize::from(self.key_len)])
                .map_err(|_| ())?;
            self.cached = Some(LessSafeKey::new(k));
        }
        self.cached.as_ref().ok_or(())
    }

    fn xor_nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // Key bytes do not outlive the session in freed memory.
        self.key.iter_mut().for_each(|b| *b = 0);
        self.iv.iter_mut().for_each(|b| *b = 0);
    }
}

impl Records {
    /// Opens every whole record in `buf` into `plain`. Returns the bytes
    /// consumed and whether close_notify came; `Err` ends the session.
    fn open_all(&mut self, buf: &[u8], plain: &mut Vec<u8>) -> Result<(usize, bool), ()> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            let len = match whole_record(rest) {
                None => return Err(()),
                Some(0) => return Ok((at, false)),
                Some(n) => n,
            };
            let typ = rest[0];
            let body = &rest[HEADER..len];
            let start = plain.len();
            let inner = self.open(typ, &rest[..HEADER], body, plain)?;
            at += len;
            match inner {
                CT_APPDATA => {}
                CT_ALERT => {
                    let alert = plain.split_off(start);
                    // close_notify (warning or fatal level, description 0).
                    if alert.len() == 2 && alert[1] == 0 {
                        return Ok((buf.len(), true));
                    }
                    return Err(());
                }
                CT_HANDSHAKE if self.client && only_tickets(&plain[start..]) => {
                    // A TLS 1.3 server's NewSessionTicket: ringlb does not
                    // resume backend sessions, so it is dropped.
                    plain.truncate(start);
                }
                _ => {
                    // Post-handshake messages (KeyUpdate, a renegotiating
                    // ClientHello) cannot be followed without rustls.
                    log::debug!("TLS: post-handshake message of type {inner}; closing");
                    return Err(());
                }
            }
        }
    }

    /// Opens one record, appending its plaintext to `plain`; returns the
    /// content type.
    fn open(&mut self, typ: u8, header: &[u8], body: &[u8], plain: &mut Vec<u8>) -> Result<u8, ()> {
        let start = plain.len();
        let d = &mut self.rx;
        let tls13 = self.tls13;
        let (nonce, ct) = if tls13 || !d.explicit {
            (d.xor_nonce(), body)
        } else {
            if body.len() < 8 {
                return Err(());
            }
            let mut n = [0u8; 12];
            n[..4].copy_from_slice(&d.iv[..4]);
            n[4..].copy_from_slice(&body[..8]);
            (n, &body[8..])
        };
        if ct.len() < TAG {
            return Err(());
        }
        plain.extend_from_slice(ct);
        let seq = d.seq;
        let key = d.key()?;
        let opened = if tls13 {
            if typ != CT_APPDATA {
                return Err(());
            }
            key.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut plain[start..],
            )
        } else {
            let mut aad = [0u8; 13];
            aad[..8].copy_from_slice(&seq.to_be_bytes());
            aad[8] = typ;
            aad[9..11].copy_from_slice(&header[1..3]);
            aad[11..].copy_from_slice(&((ct.len() - TAG) as u16).to_be_bytes());
            key.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut plain[start..],
            )
        }
        .map_err(|_| ())?
        .len();
        d.seq += 1;
        plain.truncate(start + opened);
        if !tls13 {
            return Ok(typ);
        }
        // TLS 1.3: zero padding, then the real content type.
        while let Some(&b) = plain.last() {
            plain.pop();
            if plain.len() < start {
                return Err(());
            }
            if b != 0 {
                return Ok(b);
            }
        }
        Err(())
    }

    fn seal_all(&mut self, data: &[u8]) -> Vec<u8> {
        let per = HEADER + 8 + 1 + TAG;
        let n = data.len().div_ceil(MAX_PLAINTEXT).max(1);
        let mut out = Vec::with_capacity(data.len() + n * per);
        for chunk in data.chunks(MAX_PLAINTEXT) {
            if self.seal(CT_APPDATA, chunk, &mut out).is_err() {
                // Only if aws-lc cannot build a key: nothing sensible can go out.
                return Vec::new();
            }
        }
        out
    }

    /// Seals one record of content type `typ`.
    fn seal(&mut self, typ: u8, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), ()> {
        let d = &mut self.tx;
        let tls13 = self.tls13;
        let explicit = !tls13 && d.explicit;
        let body_len = chunk.len() + usize::from(tls13) + usize::from(explicit) * 8 + TAG;
        let start = out.len();
        // TLS 1.3 hides the real type inside (RFC 8446 §5.2).
        out.push(if tls13 { CT_APPDATA } else { typ });
        out.extend_from_slice(&[3, 3]);
        out.extend_from_slice(&(body_len as u16).to_be_bytes());
        let nonce = if explicit {
            // The sequence number is a unique explicit nonce for this key.
            let mut n = [0u8; 12];
            n[..4].copy_from_slice(&d.iv[..4]);
            n[4..].copy_from_slice(&d.seq.to_be_bytes());
            out.extend_from_slice(&d.seq.to_be_bytes());
            n
        } else {
            d.xor_nonce()
        };
        let at = out.len();
        out.extend_from_slice(chunk);
        if tls13 {
            out.push(typ);
        }
        let seq = d.seq;
        let key = d.key()?;
        let tag = if tls13 {
            let mut header = [0u8; HEADER];
            header.copy_from_slice(&out[start..start + HEADER]);
            key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut out[at..],
            )
        } else {
            let mut aad = [0u8; 13];
            aad[..8].copy_from_slice(&seq.to_be_bytes());
            aad[8] = typ;
            aad[9..11].copy_from_slice(&[3, 3]);
            aad[11..].copy_from_slice(&(chunk.len() as u16).to_be_bytes());
            key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[at..],
            )
        }
        .map_err(|_| ())?;
        out.extend_from_slice(tag.as_ref());
        d.seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The record layer against rustls itself, in memory: every cipher
    //! suite of both versions, bytes cut at awkward places, both roles.
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{CipherSuite, ClientConnection, ServerConnection, SupportedProtocolVersion};

    use super::{Status, TlsSession};

    struct Pki {
        cert: CertificateDer<'static>,
        key: Vec<u8>,
    }

    fn pki() -> Pki {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["t.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Pki {
            cert: cert.der().clone(),
            key: key.serialize_der(),
        }
    }

    fn provider(suite: CipherSuite) -> Arc<rustls::crypto::CryptoProvider> {
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.cipher_suites.retain(|s| s.suite() == suite);
        assert_eq!(p.cipher_suites.len(), 1, "{suite:?}");
        Arc::new(p)
    }

    fn configs(
        pki: &Pki,
        suite: CipherSuite,
        v: &'static SupportedProtocolVersion,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let p = provider(suite);
        let mut server = rustls::ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[v])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone())),
            )
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.cert.clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[v])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        (Arc::new(server), Arc::new(client))
    }

    /// Feeds `wire` to the session `cut` bytes at a time; returns the plaintext.
    fn feed(s: &mut TlsSession, wire: &[u8], cut: usize) -> Vec<u8> {
        let mut plain = Vec::new();
        for piece in wire.chunks(cut.max(1)) {
            plain.extend(s.decode(piece));
        }
        plain
    }

    fn drain_tls(from: &mut dyn FnMut(&mut Vec<u8>) -> bool) -> Vec<u8> {
        let mut out = Vec::new();
        while from(&mut out) {}
        out
    }

    fn client_out(c: &mut ClientConnection) -> Vec<u8> {
        drain_tls(&mut |o| c.wants_write() && c.write_tls(o).unwrap() > 0)
    }

    fn client_in(c: &mut ClientConnection, wire: &[u8]) -> Vec<u8> {
        let mut rd = wire;
        let mut plain = Vec::new();
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = c.reader().read(&mut buf) {
                if n == 0 {
                    break;
                }
                plain.extend_from_slice(&buf[..n]);
            }
        }
        plain
    }

    const SUITES: [(CipherSuite, &SupportedProtocolVersion); 6] = [
        (
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            &rustls::version::TLS13,
        ),
        (
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            &rustls::version::TLS13,
        ),
        (
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            &rustls::version::TLS13,
        ),
        (
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            &rustls::version::TLS12,
        ),
        (
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            &rustls::version::TLS12,
        ),
        (
            CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            &rustls::version::TLS12,
        ),
    ];

    /// A finished handshake between a rustls client and a server session.
    fn established(
        pki: &Pki,
        suite: CipherSuite,
        v: &'static SupportedProtocolVersion,
        cut: usize,
    ) -> (TlsSession, ClientConnection) {
        let (server, client) = configs(pki, suite, v);
        let mut s = TlsSession::new(server).unwrap();
        let mut c = ClientConnection::new(client, ServerName::try_from("t.test").unwrap()).unwrap();
        c.set_buffer_limit(None);
        for _ in 0..10 {
            let wire = client_out(&mut c);
            assert!(feed(&mut s, &wire, cut).is_empty());
            assert_eq!(s.status, Status::Ok, "{suite:?} cut {cut}");
            if let Some(reply) = s.take_reply() {
                client_in(&mut c, &reply);
            }
            if !s.handshaking() && !c.is_handshaking() {
                break;
            }
        }
        assert!(
            !s.handshaking() && !c.is_handshaking(),
            "{suite:?}: no handshake"
        );
        assert_eq!(s.info().suite, Some(suite));
        (s, c)
    }

    #[test]
    fn every_suite_both_ways_whatever_the_cuts() {
        let pki = pki();
        let up: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..70_001u32).map(|i| (i % 241) as u8).collect();
        for (suite, v) in SUITES {
            for cut in [1, 5, 6, 100, 16_389, 1 << 20] {
                let (mut s, mut c) = established(&pki, suite, v, cut);
                // Client to server, several records, fed in pieces.
                c.writer().write_all(&up[..cut.min(up.len())]).unwrap();
                c.writer().write_all(&up[cut.min(up.len())..]).unwrap();
                let wire = client_out(&mut c);
                let got = feed(&mut s, &wire, cut);
                assert!(got == up, "{suite:?} cut {cut}: client to server differs");
                // Server to client, including an empty write.
                let mut wire = s.encode(down.clone());
                wire.extend(s.encode(b"x".to_vec()));
                let got = client_in(&mut c, &wire);
                assert_eq!(got.len(), down.len() + 1, "{suite:?} cut {cut}");
                assert!(got[..down.len()] == down[..] && got[down.len()] == b'x');
                // Idle drops the AEAD contexts; the next record still opens.
                s.idle();
                c.writer().write_all(b"after idle").unwrap();
                let wire = client_out(&mut c);
                assert_eq!(feed(&mut s, &wire, cut), b"after idle");
                // Ours reaches the client as a clean close.
                let alert = s.close_notify().expect("established");
                assert!(s.close_notify().is_none(), "only once");
                let mut rd = &alert[..];
                c.read_tls(&mut rd).unwrap();
                let state = c.process_new_packets().unwrap();
                assert!(state.peer_has_closed(), "{suite:?}: close_notify not seen");
                assert!(
                    s.encode(b"late".to_vec()).is_empty(),
                    "sealed after close_notify"
                );
                // close_notify ends reading.
                c.send_close_notify();
                let wire = client_out(&mut c);
                assert!(feed(&mut s, &wire, cut).is_empty());
                assert_eq!(s.status, Status::PeerClosed, "{suite:?} cut {cut}");
            }
        }
    }

    /// A binary upgrade carries an established session as a `TlsRecord`:
    /// the rebuilt session continues both directions from the next
    /// sequence number, with a record cut across the move, for every suite
    /// and both roles' bookkeeping (close_notify sent, peer closed).
    #[test]
    fn an_exported_session_continues_where_it_stopped() {
        let pki = pki();
        for (suite, v) in SUITES {
            let (mut s, mut c) = established(&pki, suite, v, 1 << 20);
            c.writer().write_all(b"before the move").unwrap();
            let wire = client_out(&mut c);
            assert_eq!(feed(&mut s, &wire, 7), b"before the move");
            let wire = s.encode(b"down before".to_vec());
            assert_eq!(client_in(&mut c, &wire), b"down before");
            // A record cut across the move: its first half stays in the
            // old session's partial buffer and travels.
            c.writer().write_all(b"cut across the move").unwrap();
            let wire = client_out(&mut c);
            assert!(s.decode(&wire[..9]).is_empty());
            let rec = s.export().expect("an established session exports");
            assert!(!format!("{rec:?}").contains("key:"), "keys are not printed");
            drop(s);
            let mut s2 = TlsSession::import(&rec).unwrap();
            assert_eq!(s2.info().suite, Some(suite), "{suite:?}");
            assert_eq!(s2.info().sni.as_deref(), Some("t.test"));
            assert_eq!(s2.info().version.map(u16::from), Some(u16::from(v.version)));
            assert_eq!(s2.decode(&wire[9..]), b"cut across the move", "{suite:?}");
            let wire = s2.encode(b"down after".to_vec());
            assert_eq!(client_in(&mut c, &wire), b"down after", "{suite:?}");
            // Parked in between: the rebuilt session idles like any other.
            s2.idle();
            c.writer().write_all(b"after idle").unwrap();
            let wire = client_out(&mut c);
            assert_eq!(s2.decode(&wire), b"after idle");
            // close_notify already sent travels too: nothing more is sealed.
            let alert = s2.close_notify().unwrap();
            client_in(&mut c, &alert);
            let mut s3 = TlsSession::import(&s2.export().unwrap()).unwrap();
            assert!(s3.close_notify().is_none() && s3.encode(b"late".to_vec()).is_empty());
            c.send_close_notify();
            let wire = client_out(&mut c);
            s3.decode(&wire);
            assert_eq!(s3.status, Status::PeerClosed);
            let s4 = TlsSession::import(&s3.export().unwrap()).unwrap();
            assert_eq!(s4.status, Status::PeerClosed, "{suite:?}");
        }
    }

    #[test]
    fn only_an_established_session_exports_and_a_bad_record_is_refused() {
        let pki = pki();
        let (server, _) = configs(&pki, SUITES[0].0, SUITES[0].1);
        let s = TlsSession::new(server.clone()).unwrap();
        assert!(!s.exportable() && s.export().is_none(), "still handshaking");
        let mut failed = TlsSession::new(server).unwrap();
        failed.decode(b"GET / HTTP/1.1\r\n");
        assert!(failed.export().is_none(), "failed");
        let (s, _) = established(&pki, SUITES[0].0, SUITES[0].1, 1 << 20);
        let good = s.export().unwrap();
        let mut bad = good.clone();
        bad.rx.alg = 9;
        assert!(TlsSession::import(&bad).is_err(), "unknown cipher");
        let mut bad = good.clone();
        bad.tx.key.pop();
        assert!(TlsSession::import(&bad).is_err(), "short key");
        let mut bad = good;
        bad.partial = vec![0x17; super::HEADER + super::MAX_RECORD];
        assert!(TlsSession::import(&bad).is_err(), "partial record too long");
    }

    #[test]
    fn a_tampered_record_or_a_key_update_fails_the_session() {
        let pki = pki();
        for (suite, v) in SUITES {
            let (mut s, mut c) = established(&pki, suite, v, 1 << 20);
            c.writer().write_all(b"hello").unwrap();
            let mut wire = client_out(&mut c);
            let last = wire.len() - 1;
            wire[last] ^= 1;
            assert!(s.decode(&wire).is_empty());
            assert_eq!(s.status, Status::Failed, "{suite:?}: tampered tag");
            if v == &rustls::version::TLS13 {
                let (mut s, mut c) = established(&pki, suite, v, 1 << 20);
                c.refresh_traffic_keys().unwrap();
                let wire = client_out(&mut c);
                s.decode(&wire);
                assert_eq!(s.status, Status::Failed, "{suite:?}: KeyUpdate followed");
            }
        }
    }

    #[test]
    fn plaintext_http_and_oversized_records_fail_at_once() {
        let pki = pki();
        let (server, _) = configs(&pki, SUITES[0].0, SUITES[0].1);
        let mut s = TlsSession::new(server.clone()).unwrap();
        assert!(s.decode(b"GET / HTTP/1.1\r\n").is_empty());
        assert_eq!(s.status, Status::Failed);
        assert!(s.take_reply().is_none(), "nothing is answered");
        let mut s = TlsSession::new(server).unwrap();
        s.decode(&[0x16, 3, 1, 0xff, 0xff]);
        assert_eq!(s.status, Status::Failed);
    }

    /// ringlb as the client of a wss:// backend: the plaintext queued before
    /// the handshake goes out behind it; the server's tickets are dropped.
    #[test]
    fn the_client_role_holds_plaintext_until_the_handshake_is_done() {
        let pki = pki();
        for (suite, v) in SUITES {
            let (server, client) = configs(&pki, suite, v);
            let mut srv = ServerConnection::new(server).unwrap();
            let mut s =
                TlsSession::client(client, ServerName::try_from("t.test").unwrap()).unwrap();
            assert!(s.encode(b"GET / HTTP/1.1\r\n\r\n".to_vec()).is_empty());
            let mut got = Vec::new();
            for _ in 0..10 {
                if let Some(w) = s.take_reply() {
                    let mut rd = &w[..];
                    while !rd.is_empty() {
                        srv.read_tls(&mut rd).unwrap();
                        srv.process_new_packets().unwrap();
                    }
                    let mut buf = [0u8; 256];
                    while let Ok(n) = srv.reader().read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                }
                let mut w = Vec::new();
                while srv.wants_write() {
                    srv.write_tls(&mut w).unwrap();
                }
                if !w.is_empty() {
                    assert!(s.decode(&w).is_empty(), "{suite:?}");
                    assert_eq!(s.status, Status::Ok, "{suite:?}");
                }
                if !s.handshaking() && s.reply.is_empty() && !srv.wants_write() {
                    break;
                }
            }
            assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n", "{suite:?}");
            srv.writer().write_all(b"HTTP/1.1 101 x\r\n\r\n").unwrap();
            let mut w = Vec::new();
            while srv.wants_write() {
                srv.write_tls(&mut w).unwrap();
            }
            assert_eq!(s.decode(&w), b"HTTP/1.1 101 x\r\n\r\n", "{suite:?}");
            assert_eq!(s.status, Status::Ok);
        }
    }
}

#[cfg(test)]
mod size_guard {
    /// An idle TLS session costs its `TlsSession` slot (keys, sequence
    /// numbers, the access log's facts, no buffers) on top of a plaintext
    /// session; the 2 KB per idle session target (issue #15) leaves little
    /// room, so growth here must be a decision, not an accident. (Measured
    /// at 320 and 32 bytes.)
    #[test]
    fn idle_tls_state_stays_small() {
        let (s, i) = (
            std::mem::size_of::<super::TlsSession>(),
            std::mem::size_of::<super::TlsInfo>(),
        );
        assert!(s <= 320, "TlsSession grew to {s} bytes");
        assert!(i <= 32, "TlsInfo grew to {i} bytes");
        // The cipher contexts are dropped when the session idles; an
        // Option of one must not hold the context inline.
        assert!(std::mem::size_of::<Option<aws_lc_rs::aead::LessSafeKey>>() <= 32);
    }
}
