//! `[tls]` from the file to [`crate::tls::TlsConfig`]: addresses, versions,
//! ALPN, tickets, and every certificate loaded and checked (readable, key
//! matching, not expired), so `ringlb check` and a reload find the same
//! errors, each naming the file.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::file::{FileTls, FileUpstreamTls};
use super::validate::{duration, socket_addr};
use super::{ConfigError, Source};
use crate::tls::{TlsConfig, TlsVersion};

pub(super) const DEFAULT_TICKET_ROTATION: Duration = Duration::from_secs(6 * 3600);

pub(super) fn tls_config(
    src: &Source<'_>,
    t: &Spanned<FileTls>,
    plain: &[SocketAddr],
    base: &Path,
) -> Result<TlsConfig, ConfigError> {
    let span = t.span();
    let t = t.get_ref();
    let mut listen = Vec::new();
    if t.listen.get_ref().is_empty() {
        return Err(ConfigError::at(
            src,
            t.listen.span(),
            "tls.listen",
            "needs at least one address",
        ));
    }
    for a in t.listen.get_ref() {
        let addr = socket_addr(src, a, "tls.listen")?;
        // Port 0 (tests) binds a fresh port each time; any other address
        // is one socket, TLS or plaintext.
        if listen.contains(&addr) || (addr.port() != 0 && plain.contains(&addr)) {
            return Err(ConfigError::at(
                src,
                a.span(),
                "tls.listen",
                format!("{addr} is listed twice (here or in server.listen); a port is either TLS or plaintext"),
            ));
        }
        listen.push(addr);
    }
    let min_version = match t.min_version.as_ref().map(|v| (v.get_ref().as_str(), v)) {
        None | Some(("1.2", _)) => TlsVersion::V12,
        Some(("1.3", _)) => TlsVersion::V13,
        Some((other, v)) => {
            return Err(ConfigError::at(
                src,
                v.span(),
                "tls.min_version",
                format!("{other:?}: expected \"1.2\" or \"1.3\""),
            ))
        }
    };
    let mut alpn = Vec::new();
    for p in t.alpn.iter().flatten() {
        let s = p.get_ref();
        if s.is_empty() || s.len() > 255 {
            return Err(ConfigError::at(
                src,
                p.span(),
                "tls.alpn",
                "a protocol name is 1 to 255 bytes (like \"http/1.1\")",
            ));
        }
        alpn.push(s.clone());
    }
    if t.alpn.is_none() {
        alpn.push("http/1.1".into());
    }
    let ticket_rotation = match (t.session_tickets, &t.ticket_rotation) {
        (Some(false), Some(v)) => {
            return Err(ConfigError::at(
                src,
                v.span(),
                "tls.ticket_rotation",
                "only means something with session_tickets = true",
            ))
        }
        (Some(false), None) => None,
        (_, Some(v)) => Some(duration(src, v, "tls.ticket_rotation")?),
        (_, None) => Some(DEFAULT_TICKET_ROTATION),
    };
    if t.certificates.get_ref().is_empty() {
        return Err(ConfigError::at(
            src,
            t.certificates.span(),
            "tls.certificates",
            "needs at least one { cert = \"fullchain.pem\", key = \"key.pem\" }",
        ));
    }
    let mut pairs = Vec::new();
    for c in t.certificates.get_ref() {
        let c_span = c.span();
        let c = c.get_ref();
        let (info, ck) =
            crate::tls::load_pair(&base.join(c.cert.get_ref()), &base.join(c.key.get_ref()))
                .map_err(|e| ConfigError::at(src, c_span.clone(), "tls.certificates", e))?;
        pairs.push((info, ck));
    }
    let certificates = pairs.iter().map(|(i, _)| i.clone()).collect();
    let server = crate::tls::server_config(pairs, min_version, &alpn, ticket_rotation)
        .map_err(|e| ConfigError::at(src, span, "tls", e))?;
    Ok(TlsConfig {
        listen,
        certificates,
        min_version,
        alpn,
        ticket_rotation,
        server,
    })
}

/// `[upstream.X] tls`: the name the backends' certificates must have, and
/// the CA that signs them (default: the system's trust store). Verification
/// is always on.
pub(super) fn upstream_tls(
    src: &Source<'_>,
    t: &Spanned<FileUpstreamTls>,
    key: &str,
    base: &Path,
) -> Result<std::sync::Arc<crate::tls::UpstreamTls>, ConfigError> {
    let t = t.get_ref();
    let ca = t.ca.as_ref().map(|c| (base.join(c.get_ref()), c.span()));
    crate::tls::upstream_tls(
        t.server_name.get_ref(),
        ca.as_ref().map(|(p, _)| p.as_path()),
    )
    .map(std::sync::Arc::new)
    .map_err(|e| {
        let span = ca.map_or(t.server_name.span(), |(_, s)| s);
        ConfigError::at(src, span, key, e)
    })
}
