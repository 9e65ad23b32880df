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
//! `Xor` exists only in tests: a transforming transport that proves the
//! seam carries a non-plain transport end to end.

use super::tls::TlsSession;

/// How bytes are carried on one side's socket.
#[derive(Debug, Default)]
pub enum Transport {
    #[default]
    Plain,
    /// TLS terminated here (`tls.rs`): a handshake, then records.
    Tls(Box<TlsSession>),
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
            Transport::Tls(s) => Decoded::Owned(s.decode(data)),
            #[cfg(test)]
            Transport::Xor(k) => Decoded::Owned(data.iter().map(|b| b ^ *k).collect()),
        }
    }

    pub(super) fn tls(&self) -> Option<&TlsSession> {
        match self {
            Transport::Tls(s) => Some(s),
            _ => None,
        }
    }

    pub(super) fn tls_mut(&mut self) -> Option<&mut TlsSession> {
        match self {
            Transport::Tls(s) => Some(s),
            _ => None,
        }
    }

    /// The session went quiet (parked): drop what can be rebuilt.
    pub(super) fn idle(&mut self) {
        if let Transport::Tls(s) = self {
            s.idle();
        }
    }

    /// Like [`Transport::encode`] from borrowed bytes: a transforming
    /// transport reads them where they are (a provided buffer) instead of
    /// taking a copy first.
    #[inline]
    pub(super) fn encode_slice(&mut self, data: &[u8]) -> Vec<u8> {
        match self {
            Transport::Tls(s) => s.encode_slice(data),
            _ => self.encode(data.to_vec()),
        }
    }

    /// Bytes for the wire, from bytes the logic queued.
    #[inline]
    pub(super) fn encode(&mut self, data: Vec<u8>) -> Vec<u8> {
        match self {
            Transport::Plain => data,
            Transport::Tls(s) => s.encode_slice(&data),
            #[cfg(test)]
            Transport::Xor(k) => data.into_iter().map(|b| b ^ *k).collect(),
        }
    }
}
