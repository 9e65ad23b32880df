//! TLS client side (`--tls` or a `wss://` URL): the rustls configuration and
//! a non-blocking TLS session over any socket that can be read and written
//! without blocking (tokio's and mio's `TcpStream`).
//!
//! A [`TlsCore`] is driven by readiness, like the plaintext path:
//!
//! * **Reading.** Plaintext already decrypted is returned first; otherwise
//!   ciphertext already read from the socket (`inbuf`) is fed to rustls;
//!   only when both are empty is the socket read, once, into `inbuf`. A read
//!   that would block returns `WouldBlock`, never a short count, so an event
//!   loop waits for readiness only when nothing is buffered anywhere. One
//!   socket read of up to `inbuf`'s size (64 KiB for large messages) replaces
//!   the 4 KiB reads rustls would make itself.
//! * **Drained.** A read also reports whether the socket's receive queue is
//!   known to be empty (the socket read was short and nothing is left in
//!   `inbuf` or in rustls), so callers can skip the read that would only
//!   return EAGAIN, exactly as they do for plaintext.
//! * **Writing.** Plaintext goes into rustls (which bounds what it holds to
//!   its 64 KiB buffer limit and then accepts nothing) and the resulting
//!   records are written at once; what the socket does not take stays in
//!   rustls until [`TlsCore::flush`] succeeds on a later writability event.
//!   [`TlsCore::wants_write`] tells the caller to wait for that.
//! * **Idle.** [`TlsCore::release`] frees `inbuf` while a session sits idle.
//!
//! The crypto provider is chosen in one place, [`provider`].

use crate::client::ErrKind;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, SignatureScheme,
};
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

/// The crypto provider of the load tool: the one place to change it.
///
/// `ring` by default; the cargo feature `aws-lc-rs` switches to aws-lc-rs
/// (`cargo build --release -p ringlb-load --features aws-lc-rs`). The
/// provider only decides the load tool's own CPU: what a server pays is set by
/// what is negotiated, which is the same with either.
///
/// Key exchange: X25519 first, then P-256, then P-384, the order browsers
/// offer the classical groups in (rustls's `ring` default puts P-384 first,
/// which would make every server pay for a P-384 exchange; its `aws-lc-rs`
/// default starts with a post-quantum hybrid the benchmark anchors do not
/// have). The key share is sent for the first group only.
#[cfg(not(feature = "aws-lc-rs"))]
// rustls deprecates ring's provider only because it has no post-quantum key
// exchange; browsers' classical choice, X25519, is what is measured here.
#[allow(deprecated)]
pub fn provider() -> CryptoProvider {
    use rustls::crypto::ring::{default_provider, kx_group};
    let mut p = default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    p
}

/// See the `ring` variant above.
#[cfg(feature = "aws-lc-rs")]
pub fn provider() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    let mut p = default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    p
}

/// The provider's name, for the run's parameters.
pub const PROVIDER: &str = if cfg!(feature = "aws-lc-rs") {
    "aws-lc-rs"
} else {
    "ring"
};

/// What the command line asked for.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM file with the CA certificate(s) the server's chain must lead to.
    pub ca: Option<String>,
    /// Accept any certificate chain (handshake signatures are still checked).
    pub insecure: bool,
    /// Name for SNI and verification; `None` uses the URL's host.
    pub sni: Option<String>,
    /// Resume sessions (tickets or session ids) on later connections.
    pub resume: bool,
    /// Offer only these cipher suites (rustls names, e.g. `TLS13_AES_128_GCM_SHA256`).
    pub ciphers: Vec<String>,
    /// Offer only this version ("1.2" or "1.3"); `None` offers both.
    pub version: Option<String>,
}

/// A process's TLS client: one configuration (and so one session cache for
/// resumption) shared by every connection of the process.
#[derive(Debug, Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// Sessions kept for resumption. Each connection takes one ticket and gets
/// new ones, so a few per concurrent handshake is plenty.
const SESSION_CACHE: usize = 1024;

impl TlsClient {
    /// Builds the configuration; `host` is the URL's host (without port).
    pub fn new(opts: &TlsOptions, host: &str) -> anyhow::Result<TlsClient> {
        let mut prov = provider();
        if !opts.ciphers.is_empty() {
            let known: Vec<String> = prov
                .cipher_suites
                .iter()
                .map(|s| format!("{:?}", s.suite()))
                .collect();
            for c in &opts.ciphers {
                if !known.iter().any(|k| k.eq_ignore_ascii_case(c)) {
                    anyhow::bail!(
                        "--tls-cipher {c}: unknown cipher suite (known: {})",
                        known.join(", ")
                    );
                }
            }
            prov.cipher_suites.retain(|s| {
                let name = format!("{:?}", s.suite());
                opts.ciphers.iter().any(|c| c.eq_ignore_ascii_case(&name))
            });
        }
        let versions: &[&rustls::SupportedProtocolVersion] = match opts.version.as_deref() {
            None => rustls::ALL_VERSIONS,
            Some("1.3") => &[&rustls::version::TLS13],
            Some("1.2") => &[&rustls::version::TLS12],
            Some(v) => anyhow::bail!("--tls-version {v}: use 1.2 or 1.3"),
        };
        let prov = Arc::new(prov);
        let builder = ClientConfig::builder_with_provider(prov.clone())
            .with_protocol_versions(versions)
            .map_err(|e| anyhow::anyhow!("TLS versions and cipher suites do not fit: {e}"))?;
        let mut config = if opts.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyChain(prov)))
                .with_no_client_auth()
        } else {
            let path = opts.ca.as_deref().ok_or_else(|| {
                anyhow::anyhow!("TLS needs --ca FILE (the CA that signed the server's certificate) or --insecure")
            })?;
            let mut roots = rustls::RootCertStore::empty();
            let mut n = 0;
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow::anyhow!("--ca {path}: {e}"))?
            {
                let cert = cert.map_err(|e| anyhow::anyhow!("--ca {path}: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("--ca {path}: {e}"))?;
                n += 1;
            }
            if n == 0 {
                anyhow::bail!("--ca {path}: no CERTIFICATE in the file");
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        // WebSocket over TLS is HTTP/1.1, as browsers offer it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = if opts.resume {
            Resumption::in_memory_sessions(SESSION_CACHE)
        } else {
            Resumption::disabled()
        };
        let name = opts.sni.as_deref().unwrap_or(host);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| anyhow::anyhow!("server name {name:?}: {e}"))?;
        Ok(TlsClient {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// `--insecure`: any chain is accepted, but the handshake signatures are
/// verified as usual, so the handshake costs what a verified one costs minus
/// the chain check.
#[derive(Debug)]
struct AnyChain(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyChain {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A socket that can be read and written without blocking through a shared
/// reference (both tokio's and mio's `TcpStream` can).
pub trait NbSocket {
    fn nb_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn nb_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl NbSocket for tokio::net::TcpStream {
    fn nb_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.try_read(buf)
    }
    fn nb_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.try_write_vectored(bufs)
    }
}

impl NbSocket for mio::net::TcpStream {
    fn nb_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
    fn nb_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }
}

/// rustls writes records through `io::Write`; this forwards to the socket.
struct SockWriter<'a, S>(&'a S);

impl<S: NbSocket> Write for SockWriter<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.nb_write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.nb_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The handshake that was made, for the run's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeInfo {
    pub resumed: bool,
    /// `version cipher-suite key-exchange-group`, e.g.
    /// `TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519`.
    pub negotiated: String,
}

/// One client TLS session over a non-blocking socket (see the module doc).
pub struct TlsCore {
    conn: ClientConnection,
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    in_cap: usize,
    sock_eof: bool,
    /// The last socket read returned less than it asked for.
    last_short: bool,
    /// Socket reads so far; a read reports `drained` only from a socket
    /// read it made itself (an older short read says nothing about now).
    sock_reads: u64,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsCore {
    /// `in_cap`: the ciphertext read buffer (allocated on first read).
    pub fn new(client: &TlsClient, in_cap: usize) -> Result<TlsCore, ErrKind> {
        let conn = ClientConnection::new(client.config.clone(), client.server_name.clone())
            .map_err(|_| ErrKind::Tls)?;
        Ok(TlsCore {
            conn,
            inbuf: Vec::new(),
            in_start: 0,
            in_end: 0,
            // At least one whole record, so a record never needs two reads.
            in_cap: in_cap.max(17 * 1024),
            sock_eof: false,
            last_short: false,
            sock_reads: 0,
        })
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Ciphertext is waiting for the socket to take it.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    pub fn info(&self) -> HandshakeInfo {
        let version = self
            .conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_else(|| "?".into());
        let suite = self
            .conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_else(|| "?".into());
        let kx = self
            .conn
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_else(|| "none".into());
        HandshakeInfo {
            resumed: self.conn.handshake_kind() == Some(HandshakeKind::Resumed),
            negotiated: format!("{version} {suite} {kx}"),
        }
    }

    /// Frees the ciphertext buffer while the session is idle.
    pub fn release(&mut self) {
        if self.in_start == self.in_end {
            self.inbuf = Vec::new();
            self.in_start = 0;
            self.in_end = 0;
        }
    }

    /// Writes pending records. `Ok` once rustls holds nothing more;
    /// `WouldBlock` when the socket is full.
    pub fn flush<S: NbSocket>(&mut self, s: &S) -> io::Result<()> {
        // Bounded: each pass writes bytes or returns.
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut SockWriter(s))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Makes progress on input: feeds buffered ciphertext to rustls, or reads
    /// the socket once. `Ok(false)` when the peer has closed and nothing is
    /// left to feed; `WouldBlock` when the socket has nothing.
    pub fn pump<S: NbSocket>(&mut self, s: &S) -> io::Result<bool> {
        if self.in_start == self.in_end {
            if self.sock_eof {
                return Ok(false);
            }
            if self.inbuf.is_empty() {
                self.inbuf = vec![0; self.in_cap];
            }
            self.in_start = 0;
            self.in_end = 0;
            let n = s.nb_read(&mut self.inbuf)?;
            self.sock_reads += 1;
            self.last_short = n < self.inbuf.len();
            if n == 0 {
                self.sock_eof = true;
                // Tell rustls, so a read without close_notify is UnexpectedEof.
                self.conn.read_tls(&mut io::empty())?;
                return Ok(false);
            }
            self.in_end = n;
        }
        let mut src = &self.inbuf[self.in_start..self.in_end];
        let fed = self.conn.read_tls(&mut src)?;
        if fed == 0 {
            // Only after close_notify: nothing more is read.
            return Ok(false);
        }
        self.in_start += fed;
        if let Err(e) = self.conn.process_new_packets() {
            // rustls queued an alert saying why; send it if the socket takes it.
            let _ = self.flush(s);
            return Err(tls_err(e));
        }
        // Nothing a client reads needs an answer mid-stream except a key
        // update; send it now or with the next write.
        if self.conn.wants_write() {
            match self.flush(s) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads plaintext: `(n, drained)`. `n == 0` is the peer's close_notify;
    /// a TCP close without it is `UnexpectedEof`; `WouldBlock` when nothing
    /// is buffered and the socket has nothing.
    pub fn read<S: NbSocket>(&mut self, s: &S, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        let reads_before = self.sock_reads;
        // Bounded: each pass returns or consumes buffered ciphertext or reads
        // the socket (which returns WouldBlock or EOF once it is empty).
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => {
                    let drained = self.sock_reads != reads_before
                        && self.last_short
                        && self.in_start == self.in_end
                        && n < buf.len();
                    return Ok((n, drained));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if !self.pump(s)? {
                // rustls now knows of the EOF; its reader reports it.
                return match self.conn.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    r => r.map(|n| (n, false)),
                };
            }
        }
    }

    /// Hands plaintext to rustls and writes the records. Returns how much
    /// was taken (records may still wait in rustls: see `wants_write`);
    /// `WouldBlock` when rustls is full and the socket takes nothing.
    pub fn write<S: NbSocket>(&mut self, s: &S, buf: &[u8]) -> io::Result<usize> {
        if self.conn.wants_write() {
            match self.flush(s) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let n = self.conn.writer().write(buf)?;
        match self.flush(s) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }
}

/// Drives the handshake on a connected tokio socket.
pub async fn handshake(sock: &tokio::net::TcpStream, core: &mut TlsCore) -> Result<(), ErrKind> {
    // Bounded by the caller's timeout; each pass writes, reads, or waits.
    loop {
        loop {
            match core.flush(sock) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    sock.writable().await.map_err(|e| ErrKind::from_io(&e))?
                }
                Err(e) => return Err(ErrKind::from_io(&e)),
            }
        }
        if !core.is_handshaking() {
            return Ok(());
        }
        match core.pump(sock) {
            Ok(true) => {}
            Ok(false) => return Err(ErrKind::UnexpectedClose),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sock.readable().await.map_err(|e| ErrKind::from_io(&e))?
            }
            Err(e) => return Err(ErrKind::from_io(&e)),
        }
    }
}
