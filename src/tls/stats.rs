//! Handshake counters for `/metrics`: one process-wide set of atomics (TLS
//! handshakes are rare next to relayed bytes, so one shared cache line per
//! handshake costs nothing measurable), counted by the connection when its
//! handshake ends, whichever way.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a TLS handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    /// Completed, full handshake.
    Full,
    /// Completed by resuming a session (ticket).
    Resumed,
    /// The first bytes were not a TLS record (plaintext HTTP on the TLS port).
    NotTls,
    /// A TLS error: malformed ClientHello, no common version or cipher, ...
    Failed,
    /// `handshake_timeout` passed before it completed (slowloris, truncated).
    Timeout,
    /// The client closed before it completed.
    Closed,
}

pub const RESULTS: [(HandshakeResult, &str); 6] = [
    (HandshakeResult::Full, "full"),
    (HandshakeResult::Resumed, "resumed"),
    (HandshakeResult::NotTls, "not_tls"),
    (HandshakeResult::Failed, "failed"),
    (HandshakeResult::Timeout, "timeout"),
    (HandshakeResult::Closed, "closed"),
];

const VERSIONS: [&str; 3] = ["1.2", "1.3", "none"];

/// Upper bounds (seconds) of the handshake duration buckets.
const BUCKETS: [f64; 9] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0];

pub struct Stats {
    handshakes: [[AtomicU64; 3]; 6],
    /// Completed handshakes, by duration (first byte in to Finished).
    buckets: [AtomicU64; 10],
    sum_us: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ROW: [AtomicU64; 3] = [ZERO; 3];

pub static STATS: Stats = Stats {
    handshakes: [ROW; 6],
    buckets: [ZERO; 10],
    sum_us: ZERO,
};

impl Stats {
    pub fn count(&self, result: HandshakeResult, version: Option<rustls::ProtocolVersion>) {
        let r = RESULTS.iter().position(|(x, _)| *x == result).unwrap_or(0);
        let v = match version {
            Some(rustls::ProtocolVersion::TLSv1_2) => 0,
            Some(rustls::ProtocolVersion::TLSv1_3) => 1,
            _ => 2,
        };
        self.handshakes[r][v].fetch_add(1, Ordering::Relaxed);
    }

    pub fn took(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Handshakes counted with this result, all versions.
    pub fn total(&self, result: HandshakeResult) -> u64 {
        let r = RESULTS.iter().position(|(x, _)| *x == result).unwrap_or(0);
        self.handshakes[r]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The Prometheus text of the TLS metrics.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP ringlb_tls_handshakes_total TLS handshakes on the [tls] listeners, by how they ended (full, resumed, not_tls: the first bytes were not TLS, e.g. plaintext HTTP; failed: a TLS error; timeout: server.handshake_timeout passed; closed: the client left) and protocol version (none: not negotiated).\n# TYPE ringlb_tls_handshakes_total counter");
        for (r, (_, name)) in RESULTS.iter().enumerate() {
            for (v, version) in VERSIONS.iter().enumerate() {
                let n = self.handshakes[r][v].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "ringlb_tls_handshakes_total{{result=\"{name}\",version=\"{version}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP ringlb_tls_handshake_duration_seconds Completed TLS handshakes, from the connection's accept to the client's Finished.\n# TYPE ringlb_tls_handshake_duration_seconds histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "ringlb_tls_handshake_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "ringlb_tls_handshake_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}\nringlb_tls_handshake_duration_seconds_sum {}\nringlb_tls_handshake_duration_seconds_count {cumulative}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
}
