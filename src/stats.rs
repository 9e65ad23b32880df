//! Counters each shard keeps for the admin thread.
//!
//! Every counter has exactly one writer, its shard, which updates it with a
//! plain load and store (no read-modify-write, so no locked instruction and no
//! cache line shared between shards on the per-message path). The admin
//! thread reads them with relaxed loads and sums over shards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A single-writer counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Only the owning shard may call this.
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Handshake results with their own counter; anything else counts as "other".
pub const RESULTS: [&str; 19] = [
    "101", "200", "206", "304", "400", "403", "404", "405", "408", "416", "426", "431", "500",
    "502", "503", "504", "other", "closed", "error",
];

const RESULT_OTHER: usize = 16;

/// Index into [`RESULTS`] for an HTTP status.
pub fn result_index(status: u16) -> usize {
    let s = status.to_string();
    RESULTS.iter().position(|r| *r == s).unwrap_or(RESULT_OTHER)
}

/// A client that went away before any answer.
pub const RESULT_CLOSED: usize = 17;

/// Why a WebSocket session ended: who closed it, or why ringlb did
/// (`drain`: a backend drained at a rate; `rebalance`: moved off a backend
/// over its share; `shutdown`: ringlb is shutting down).
pub const CLOSE_REASONS: [&str; 8] = [
    "client",
    "backend",
    "proxy",
    "drain",
    "rebalance",
    "shutdown",
    "stalled_peer",
    "error",
];

pub fn close_reason(closer: Option<crate::conn::Closer>) -> usize {
    let name = crate::conn::Closer::name(closer);
    CLOSE_REASONS
        .iter()
        .position(|r| *r == name)
        .unwrap_or(CLOSE_REASONS.len() - 1)
}

/// Clean closes that could not close between messages, by kind: `frame`
/// (Close frames at a frame boundary inside a fragmented message), `fin`
/// (no boundary at all, or a session half-closed already: FIN).
pub const FALLBACK_KINDS: [&str; 2] = ["frame", "fin"];

/// Upper bounds (seconds) of the handshake latency histogram.
pub const BUCKETS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
pub struct ShardStats {
    pub accepted: Counter,
    pub active: Counter,
    pub bytes_to_backend: Counter,
    pub bytes_to_client: Counter,
    /// Of those, bytes moved by splice(2) rather than through buffers.
    pub bytes_spliced: Counter,
    /// Sessions parked by the idle sweep (recvs swapped for polls).
    pub parked: Counter,
    /// Multishot recvs that ended because the buffer ring was empty.
    pub recv_starved: Counter,
    pub handshakes: [Counter; RESULTS.len()],
    /// WebSocket sessions ended, by [`CLOSE_REASONS`].
    pub closed: [Counter; CLOSE_REASONS.len()],
    /// Clean closes ringlb asked for that fell back, by [`FALLBACK_KINDS`].
    pub clean_close_fallbacks: [Counter; FALLBACK_KINDS.len()],
    /// Sends whose bytes were moved out of the shared pool because their
    /// reader took nothing while the pool ran low.
    pub unpinned: Counter,
    /// Completions for a slot that is gone or has a newer generation:
    /// never delivered (their buffers go back to the pool). Should stay 0.
    pub stale_completions: Counter,
    /// io_uring ops submitted and not yet completed (a gauge); 0 once the
    /// shard has shut down and reaped everything.
    pub ops_in_flight: Counter,
    /// Relaying sessions taken out of this shard for a binary upgrade's
    /// hand-off (some may come back if it fails: `imported`).
    pub exported: Counter,
    /// Relaying sessions this shard took in: from the previous process on
    /// an upgrade, or back after a hand-off failed.
    pub imported: Counter,
    /// Provided buffers free in the shard's ring (a gauge).
    pub buffers_free: Counter,
    /// Cumulative per bucket is computed on read; here each bucket counts
    /// only its own range, plus one overflow bucket.
    pub latency: [Counter; BUCKETS.len() + 1],
    pub latency_sum_us: Counter,
}

impl ShardStats {
    /// Every counter (not the gauges), in a fixed order: what a binary
    /// upgrade hands to the new process so its metrics do not reset.
    pub fn counters(&self) -> Vec<u64> {
        self.counter_refs().iter().map(|c| c.get()).collect()
    }

    /// Adds counters from [`ShardStats::counters`] (of another process).
    /// Extra or missing values (a different version) are ignored.
    pub fn add_counters(&self, values: &[u64]) {
        for (c, v) in self.counter_refs().into_iter().zip(values) {
            c.add(*v);
        }
    }

    fn counter_refs(&self) -> Vec<&Counter> {
        let mut v = vec![
            &self.accepted,
            &self.bytes_to_backend,
            &self.bytes_to_client,
            &self.bytes_spliced,
            &self.parked,
            &self.recv_starved,
            &self.unpinned,
            &self.stale_completions,
            &self.latency_sum_us,
            &self.exported,
            &self.imported,
        ];
        v.extend(self.handshakes.iter());
        v.extend(self.closed.iter());
        v.extend(self.latency.iter());
        v
    }

    pub fn record_handshake(&self, result: usize, took: Duration) {
        self.handshakes[result].add(1);
        let secs = took.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.latency[i].add(1);
        self.latency_sum_us.add(took.as_micros() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_buckets() {
        assert_eq!(RESULTS[result_index(101)], "101");
        assert_eq!(RESULTS[result_index(418)], "other");
        assert_eq!(RESULTS[RESULT_CLOSED], "closed");
        let s = ShardStats::default();
        s.record_handshake(0, Duration::from_micros(300));
        s.record_handshake(0, Duration::from_secs(60));
        assert_eq!(s.latency[1].get(), 1);
        assert_eq!(s.latency[BUCKETS.len()].get(), 1);
        assert_eq!(s.handshakes[0].get(), 2);
    }
}
