//! TLS termination, outside the connection: certificates (loaded, checked,
//! chosen by SNI), the rustls server configuration every shard shares, the
//! session-ticket key shared by all shards and kept across reloads, and the
//! handshake counters `/metrics` shows. The per-connection part (handshake,
//! then the record layer) is `conn/tls.rs`, behind the transport seam.
//!
//! One [`TlsConfig`] is built per configuration load, so a reload (SIGHUP)
//! reads the certificate files again: new handshakes use the new
//! certificates, and live sessions, which no longer refer to any
//! configuration once their handshake is done, are untouched.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub mod stats;
pub use stats::{HandshakeResult, STATS};

/// `[tls]`, validated, with the rustls configuration built from it.
#[derive(Clone)]
pub struct TlsConfig {
    pub listen: Vec<SocketAddr>,
    pub certificates: Vec<CertInfo>,
    pub min_version: TlsVersion,
    pub alpn: Vec<String>,
    /// Resumption by tickets; the key is replaced this often. `None`: off.
    pub ticket_rotation: Option<Duration>,
    pub server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("listen", &self.listen)
            .field("certificates", &self.certificates)
            .field("min_version", &self.min_version)
            .field("alpn", &self.alpn)
            .field("ticket_rotation", &self.ticket_rotation)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V12,
    V13,
}

/// What was loaded from one `{ cert, key }` pair, for logs and checks.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// DNS names the certificate is valid for (subjectAltName, or the
    /// subject CN when it has none), lowercase; `*.` for wildcards.
    pub names: Vec<String>,
    pub not_after: SystemTime,
}

/// One line about a loaded certificate, for `ringlb check` and the log.
pub fn describe(c: &CertInfo) -> String {
    let left = c
        .not_after
        .duration_since(SystemTime::now())
        .map_or(0, |d| d.as_secs() / 86_400);
    format!(
        "tls certificate {} ({}): expires {} ({left} days)",
        c.cert.display(),
        c.names.join(", "),
        humantime::format_rfc3339_seconds(c.not_after),
    )
}

/// The provider chosen by measurement (docs/TLS.md).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Loads one certificate chain and its key; the error names the file.
pub fn load_pair(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(CertInfo, Arc<CertifiedKey>), String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: cannot read certificate: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: cannot read private key: {e}", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: unusable private key: {e}", key.display()))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|_| {
        format!(
            "{}: the private key does not match the certificate {}",
            key.display(),
            cert.display()
        )
    })?;
    let (names, not_after) = leaf_facts(&ck.cert[0])
        .map_err(|e| format!("{}: cannot parse the certificate: {e}", cert.display()))?;
    if not_after < SystemTime::now() {
        return Err(format!(
            "{}: the certificate expired at {}",
            cert.display(),
            humantime::format_rfc3339_seconds(not_after)
        ));
    }
    Ok((
        CertInfo {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            names,
            not_after,
        },
        Arc::new(ck),
    ))
}

fn leaf_facts(der: &CertificateDer<'_>) -> Result<(Vec<String>, SystemTime), String> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in x.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    let secs = x.validity().not_after.timestamp();
    let not_after = if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    };
    Ok((names, not_after))
}

/// True if `name` (lowercase, from SNI) is covered by `pattern`; `*.` covers
/// exactly one label (RFC 6125 §6.4.3), never the bare domain.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(base) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == base),
        None => pattern == name,
    }
}

/// Picks the certificate by SNI: the first whose names cover it, else the
/// first configured (clients without SNI, or an unknown name).
#[derive(Debug)]
struct SniResolver {
    certs: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = hello.server_name() {
            let sni = sni.to_ascii_lowercase();
            if let Some((_, ck)) =
                (self.certs.iter()).find(|(names, _)| names.iter().any(|p| name_matches(p, &sni)))
            {
                return Some(ck.clone());
            }
        }
        self.certs.first().map(|(_, ck)| ck.clone())
    }
}

/// Builds the rustls configuration shared by every shard.
pub fn server_config(
    pairs: Vec<(CertInfo, Arc<CertifiedKey>)>,
    min_version: TlsVersion,
    alpn: &[String],
    ticket_rotation: Option<Duration>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match min_version {
        TlsVersion::V12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V13 => &[&rustls::version::TLS13],
    };
    let resolver = SniResolver {
        certs: pairs.into_iter().map(|(i, ck)| (i.names, ck)).collect(),
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // The session keeps only keys and sequence numbers once the handshake
    // is done (conn/tls.rs); rustls hands them over only when allowed.
    cfg.enable_secret_extraction = true;
    // Plaintext that arrives with the client's Finished is taken out at
    // once; nothing else is written through rustls.
    cfg.max_early_data_size = 0;
    match ticket_rotation {
        Some(period) => cfg.ticketer = ticketer(period)?,
        None => {
            cfg.send_tls13_tickets = 0;
            cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        }
    }
    Ok(Arc::new(cfg))
}

/// One ticket key for the whole process: every shard's handshakes share a
/// configuration, and reloads keep the ticketer, so a ticket issued by one
/// shard (or before a reload) resumes on any other. Its key is replaced
/// every `period`, the previous one still accepted for one more period.
/// The period of the first load stays until restart.
fn ticketer(period: Duration) -> Result<Arc<dyn ProducesTickets>, String> {
    static T: OnceLock<Arc<dyn ProducesTickets>> = OnceLock::new();
    if let Some(t) = T.get() {
        return Ok(t.clone());
    }
    let secs = u32::try_from(period.as_secs()).unwrap_or(u32::MAX).max(1);
    let t: Arc<dyn ProducesTickets> = Arc::new(
        rustls::ticketer::TicketRotator::new(secs, || {
            rustls::crypto::aws_lc_rs::Ticketer::new()
                .map(|inner| Box::new(OneKey(inner)) as Box<dyn ProducesTickets>)
                .map_err(|_| rustls::crypto::GetRandomFailed)
        })
        .map_err(|e| format!("session ticket key: {e}"))?,
    );
    Ok(T.get_or_init(|| t).clone())
}

/// A fresh aws-lc-rs ticketer, used as one generation of the rotator.
#[derive(Debug)]
struct OneKey(Arc<dyn ProducesTickets>);

impl ProducesTickets for OneKey {
    fn enabled(&self) -> bool {
        self.0.enabled()
    }
    fn lifetime(&self) -> u32 {
        self.0.lifetime()
    }
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.0.encrypt(plain)
    }
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.0.decrypt(cipher)
    }
}

/// `[upstream.X] tls`: how ringlb reaches wss:// backends.
pub struct UpstreamTls {
    pub server_name: rustls_pki_types::ServerName<'static>,
    pub client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The client configuration for one upstream: verification against `ca`
/// (PEM) or, without it, the system's trust store.
pub fn upstream_tls(
    server_name: &str,
    ca: Option<&std::path::Path>,
) -> Result<UpstreamTls, String> {
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|_| format!("server_name {server_name:?} is not a DNS name or IP address"))?;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: cannot read CA certificates: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate in the file", path.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(
                    "no ca given and no system trust store found; give ca = \"...\"".into(),
                );
            }
        }
    }
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Keys only after the handshake, as on the client side (conn/tls.rs).
    client.enable_secret_extraction = true;
    // Each backend connection is fresh: no ticket is kept per session.
    client.resumption = rustls::client::Resumption::disabled();
    Ok(UpstreamTls {
        server_name: name,
        client: Arc::new(client),
    })
}

/// Counted once per connection on the TLS port (see [`stats`]).
pub fn count(result: HandshakeResult, version: Option<rustls::ProtocolVersion>) {
    STATS.count(result, version);
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn wildcards_cover_one_label_only() {
        assert!(name_matches("a.test", "a.test"));
        assert!(!name_matches("a.test", "b.test"));
        assert!(name_matches("*.a.test", "x.a.test"));
        assert!(!name_matches("*.a.test", "a.test"));
        assert!(!name_matches("*.a.test", "y.x.a.test"));
        assert!(!name_matches("*.a.test", ".a.test"));
    }
}
