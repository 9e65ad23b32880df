//! A connection's byte stream: plain TCP, or TLS over it.
//!
//! [`Stream`] serves the tokio paths (connect and upgrade, `rate`, `idle`,
//! `handshake`); [`FSock`] the mio loop of `pingpong` and `bulk`, which takes
//! over a connection once it is open. Both have the same contract for reads:
//! `(n, drained)`, where `drained` says the socket's receive queue is known
//! to be empty, and `WouldBlock` only when nothing is buffered anywhere. The
//! plain variants do exactly what the tool did before TLS existed: one
//! `read`/`write` system call, with `drained` meaning a short read.

use crate::client::{clear_read_readiness, ErrKind};
use crate::tls::TlsCore;
use std::cell::RefCell;
use std::io::{self, Read, Write};
use tokio::net::TcpStream;

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

/// The TLS session lives in a `RefCell` so that, as with a plain socket, a
/// read and a write can be in progress at once through shared references
/// (one thread; no borrow is held across an `await`).
pub struct TlsStream {
    sock: TcpStream,
    core: RefCell<TlsCore>,
}

impl Stream {
    pub fn tls(sock: TcpStream, core: TlsCore) -> Stream {
        Stream::Tls(Box::new(TlsStream {
            sock,
            core: RefCell::new(core),
        }))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }

    /// One non-blocking read: `(n, drained)`; `n == 0` is the end of the stream.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        match self {
            Stream::Plain(s) => s.try_read(buf).map(|n| (n, n < buf.len())),
            Stream::Tls(t) => t.core.borrow_mut().read(&t.sock, buf),
        }
    }

    /// One non-blocking write; with TLS, records the socket did not take
    /// stay queued until [`Stream::write_all`] flushes them.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_write(buf),
            Stream::Tls(t) => t.core.borrow_mut().write(&t.sock, buf),
        }
    }

    /// Writes all of `buf` (and, with TLS, every record queued before it).
    pub async fn write_all(&self, mut buf: &[u8]) -> Result<(), ErrKind> {
        // Bounded: each pass writes at least one byte or waits for writability.
        while !buf.is_empty() {
            match self.try_write(buf) {
                Ok(0) => return Err(ErrKind::UnexpectedClose),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tcp()
                        .writable()
                        .await
                        .map_err(|e| ErrKind::from_io(&e))?;
                }
                Err(e) => return Err(ErrKind::from_io(&e)),
            }
        }
        if let Stream::Tls(t) = self {
            // Bounded likewise: records leave or the socket is waited for.
            loop {
                let r = t.core.borrow_mut().flush(&t.sock);
                match r {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        t.sock.writable().await.map_err(|e| ErrKind::from_io(&e))?;
                    }
                    Err(e) => return Err(ErrKind::from_io(&e)),
                }
            }
        }
        Ok(())
    }

    /// Waits for and returns at least one byte (0 at the end of the stream).
    pub async fn read_some(&self, buf: &mut [u8]) -> Result<usize, ErrKind> {
        // Bounded: each pass reads or waits for a readiness event.
        loop {
            match self.try_read(buf) {
                Ok((n, _)) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tcp()
                        .readable()
                        .await
                        .map_err(|e| ErrKind::from_io(&e))?;
                }
                Err(e) => return Err(ErrKind::from_io(&e)),
            }
        }
    }

    /// After a drained read: the next read would only return EAGAIN.
    pub fn clear_read_readiness(&self) {
        clear_read_readiness(self.tcp());
    }

    /// Frees per-connection buffers while the connection sits idle.
    pub fn release(&self) {
        if let Stream::Tls(t) = self {
            t.core.borrow_mut().release();
        }
    }

    /// Moves the connection to the mio loop.
    pub fn into_fast(self) -> io::Result<FSock> {
        Ok(match self {
            Stream::Plain(s) => FSock::Plain(mio::net::TcpStream::from_std(s.into_std()?)),
            Stream::Tls(t) => {
                let t = *t;
                let sock = mio::net::TcpStream::from_std(t.sock.into_std()?);
                FSock::Tls(sock, Box::new(t.core.into_inner()))
            }
        })
    }
}

/// A connection in the mio loop.
pub enum FSock {
    Plain(mio::net::TcpStream),
    Tls(mio::net::TcpStream, Box<TlsCore>),
}

impl FSock {
    pub fn tcp_mut(&mut self) -> &mut mio::net::TcpStream {
        match self {
            FSock::Plain(s) => s,
            FSock::Tls(s, _) => s,
        }
    }

    pub fn tcp(&self) -> &mio::net::TcpStream {
        match self {
            FSock::Plain(s) => s,
            FSock::Tls(s, _) => s,
        }
    }

    /// One non-blocking read: `(n, drained)`.
    #[inline]
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        match self {
            FSock::Plain(s) => s.read(buf).map(|n| (n, n < buf.len())),
            FSock::Tls(s, core) => core.read(s, buf),
        }
    }

    /// One non-blocking write; see [`FSock::wants_write`] for TLS records
    /// still queued afterwards.
    #[inline]
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            FSock::Plain(s) => s.write(buf),
            FSock::Tls(s, core) => core.write(s, buf),
        }
    }

    /// TLS records are queued that the socket has not taken yet.
    #[inline]
    pub fn wants_write(&self) -> bool {
        match self {
            FSock::Plain(_) => false,
            FSock::Tls(_, core) => core.wants_write(),
        }
    }

    /// Writes queued TLS records; `WouldBlock` when the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            FSock::Plain(_) => Ok(()),
            FSock::Tls(s, core) => core.flush(s),
        }
    }
}
