//! The seam between a socket and the connection logic.
//!
//! Everything the connection reads from a side passes through that side's
//! transport on the way in (`decode`), and everything it queues for a side
//! on the way out (`encode`), so the handshake, routing, relay, frame
//! tracking and Close injection all see plaintext. TLS termination puts a
//! session here (ciphertext in provided buffers → plaintext; plaintext →
//! records); nothing above it changes.
//!
//! The plaintext transport is the identity and says so (`in_place`): the
//! provided buffer a recv filled is relayed as it is, and big frames may
//! move by splice, so today's zero-copy path stays zero-copy. A transport
//! that transforms bytes gets owned copies instead, and never splice.
//!
//! `Tls` (`tls.rs`) is the first such transport: it also answers on its
//! own while handshaking (`TlsSession::take_reply`) and can fail, which the
//! connection checks after each decode (`Conn::after_tls`). A kTLS
//! transport would take the same keys and sequence numbers, and be
//! `in_place` again.
//!
//! A TLS session lives in its shard thread's [`TlsSlot`] table, not in a
//! box of its own: see there for why.
//!
//! `Xor` exists only in tests: a transforming transport that proves the
//! seam carries a non-plain transport end to end.

use std::cell::RefCell;
use std::marker::PhantomData;

use super::export::TlsSide;
use super::tls::{TlsInfo, TlsSession};

thread_local! {
    static SESSIONS: RefCell<slab::Slab<TlsSession>> = const { RefCell::new(slab::Slab::new()) };
}

/// A TLS session held in its thread's table of sessions.
///
/// Why not a `Box`: each session is allocated while dozens of handshakes
/// around it fill the heap with rustls's short-lived state. A boxed session
/// (and its boxed details) lands between those, and once they are freed
/// every heap page still holds one live session, so the allocator can give
/// none of them back: 9000 idle wss:// sessions cost 2.7 KB of RSS each,
/// of which 1.5 KB was free heap nobody could use
/// (`bench/results/2026-12-06-tls-idle-slot`). In one growing array the
/// sessions sit side by side, and handshake garbage frees whole pages.
///
/// Sessions never change threads (the shard that accepted one relays it; a
/// binary upgrade exports a session as data, `TlsRecord`, and the importing
/// shard makes a new slot from it), so the table is a thread local and the
/// slot is not `Send`.
pub struct TlsSlot {
    key: usize,
    _thread_bound: PhantomData<*const ()>,
}

impl TlsSlot {
    pub fn new(s: TlsSession) -> TlsSlot {
        let key = SESSIONS.with(|t| t.borrow_mut().insert(s));
        TlsSlot {
            key,
            _thread_bound: PhantomData,
        }
    }

    /// Runs `f` on the session. `f` must not create or drop another slot.
    /// `&mut self`: the slot owns its session, so changing the session
    /// needs the slot as much as a `Box` would.
    #[inline]
    pub fn with<R>(&mut self, f: impl FnOnce(&mut TlsSession) -> R) -> R {
        SESSIONS.with(|t| f(&mut t.borrow_mut()[self.key]))
    }

    /// Reads the session. Same rule as `with`.
    pub fn read<R>(&self, f: impl FnOnce(&TlsSession) -> R) -> R {
        SESSIONS.with(|t| f(&t.borrow()[self.key]))
    }
}

impl Drop for TlsSlot {
    fn drop(&mut self) {
        // Taken out first and dropped outside the borrow: the session's Drop
        // counts an unfinished handshake.
        // The table keeps its high-water size while any session is left
        // (keys cannot move); the last one out gives it back.
        let s = SESSIONS
            .try_with(|t| {
                let mut t = t.borrow_mut();
                let s = t.try_remove(self.key);
                if t.is_empty() {
                    t.shrink_to_fit();
                }
                s
            })
            .ok()
            .flatten();
        drop(s);
    }
}

impl std::fmt::Debug for TlsSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not `with`: a Debug print from inside a `with` must not panic.
        SESSIONS.with(|t| match t.try_borrow() {
            Ok(t) => t[self.key].fmt(f),
            Err(_) => write!(f, "TlsSlot({})", self.key),
        })
    }
}

/// How bytes are carried on one side's socket.
#[derive(Debug, Default)]
pub enum Transport {
    #[default]
    Plain,
    /// TLS terminated here (`tls.rs`): a handshake, then records.
    Tls(TlsSlot),
    /// Test only: every byte XORed with the key, both ways.
    #[cfg(test)]
    Xor(u8),
}

/// Received bytes, as the connection logic sees them.
pub(super) enum Decoded<'a> {
    /// The bytes as received: the provided buffer carries them on.
    InPlace(&'a [u8]),
    /// Transformed into a copy; the provided buffer is no longer needed.
    Owned(Vec<u8>),
}

impl Transport {
    /// The socket carries exactly what the logic sees: buffers may be
    /// relayed as they are, and bytes spliced between sockets.
    #[inline]
    pub(super) fn in_place(&self) -> bool {
        matches!(self, Transport::Plain)
    }

    #[inline]
    pub(super) fn decode<'a>(&mut self, data: &'a [u8]) -> Decoded<'a> {
        match self {
            Transport::Plain => Decoded::InPlace(data),
            Transport::Tls(s) => Decoded::Owned(s.with(|s| s.decode(data))),
            #[cfg(test)]
            Transport::Xor(k) => Decoded::Owned(data.iter().map(|b| b ^ *k).collect()),
        }
    }

    /// A binary upgrade's hand-off can carry this side's state: none, or
    /// an established TLS session's keys and sequence numbers.
    pub(super) fn exportable(&self) -> bool {
        match self {
            Transport::Plain => true,
            Transport::Tls(s) => {
                // tests/tls.rs: the fallback for a TLS state that cannot be
                // taken (the session stays; the old process drains it).
                #[cfg(debug_assertions)]
                if crate::server::test_fault("handoff-tls-stays") {
                    return false;
                }
                s.read(TlsSession::exportable)
            }
            #[cfg(test)]
            Transport::Xor(_) => false,
        }
    }

    /// This side's state for the hand-off record.
    pub(super) fn export(&self) -> TlsSide {
        match self {
            Transport::Plain => TlsSide::Plain,
            Transport::Tls(s) => s
                .read(TlsSession::export)
                .map_or(TlsSide::Lost, |r| TlsSide::Tls(Box::new(r))),
            #[cfg(test)]
            Transport::Xor(_) => TlsSide::Lost,
        }
    }

    /// The transport a handed-over side had; on the importing shard's
    /// thread, whose table the TLS session joins.
    pub(super) fn import(side: &TlsSide) -> Result<Transport, &'static str> {
        match side {
            TlsSide::Plain => Ok(Transport::Plain),
            TlsSide::Tls(r) => Ok(Transport::Tls(TlsSlot::new(TlsSession::import(r)?))),
            TlsSide::Lost => Err("its TLS state could not be taken from the old process"),
        }
    }

    pub(super) fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Runs `f` on the TLS session, if this side has one.
    pub(super) fn tls<R>(&mut self, f: impl FnOnce(&mut TlsSession) -> R) -> Option<R> {
        match self {
            Transport::Tls(s) => Some(s.with(f)),
            _ => None,
        }
    }

    pub(super) fn tls_info(&self) -> Option<TlsInfo> {
        match self {
            Transport::Tls(s) => Some(s.read(|s| s.info().clone())),
            _ => None,
        }
    }

    /// The session went quiet (parked): drop what can be rebuilt.
    pub(super) fn idle(&mut self) {
        if let Transport::Tls(s) = self {
            s.with(TlsSession::idle);
        }
    }

    /// Like [`Transport::encode`] from borrowed bytes: a transforming
    /// transport reads them where they are (a provided buffer) instead of
    /// taking a copy first.
    #[inline]
    pub(super) fn encode_slice(&mut self, data: &[u8]) -> Vec<u8> {
        match self {
            Transport::Tls(s) => s.with(|s| s.encode_slice(data)),
            _ => self.encode(data.to_vec()),
        }
    }

    /// Bytes for the wire, from bytes the logic queued.
    #[inline]
    pub(super) fn encode(&mut self, data: Vec<u8>) -> Vec<u8> {
        match self {
            Transport::Plain => data,
            Transport::Tls(s) => s.with(|s| s.encode_slice(&data)),
            #[cfg(test)]
            Transport::Xor(k) => data.into_iter().map(|b| b ^ *k).collect(),
        }
    }
}
