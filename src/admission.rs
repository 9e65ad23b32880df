//! Admission control for reconnect storms: after a deploy or an outage every
//! client of a fleet comes back in the same second, and backends must see at
//! most a configured rate of new sessions however many arrive at once.
//!
//! - **Upgrade rate**, across all shards: one GCRA cell (a single atomic
//!   "theoretical arrival time"), so the check is one compare-and-swap per
//!   upgrade and no lock. `burst` upgrades may pass at once, then one per
//!   `1 / rate`. An upgrade over the budget gets 503 with a `Retry-After`
//!   jittered between 1 s and `retry_after_max`, so the retries spread out
//!   instead of coming back as the next storm.
//! - **Connections per client address**, across all shards: counts in 64
//!   sharded maps, touched once when a connection is accepted and once when
//!   it ends (never per message), and only when a cap is configured.
//!
//! One `Admission` lives for the life of the process and is carried from
//! snapshot to snapshot, so a reload does not reset the budget or the
//! counts; the limits themselves are read from the configuration in force.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::upstream::now_ms;

#[derive(Debug)]
pub struct Admission {
    /// GCRA theoretical arrival time, in µs on `now_ms`'s clock.
    tat_us: AtomicU64,
    per_ip: [Mutex<HashMap<IpAddr, u32>>; 64],
    pub rejected_rate: AtomicU64,
    pub rejected_per_ip: AtomicU64,
    /// PROXY protocol refusals: untrusted, missing, malformed.
    pub proxy_refused: [AtomicU64; 3],
    /// When a refusal was last logged (ms), to log at most one a second.
    proxy_logged_ms: AtomicU64,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            tat_us: AtomicU64::new(0),
            per_ip: std::array::from_fn(|_| Mutex::default()),
            rejected_rate: AtomicU64::new(0),
            rejected_per_ip: AtomicU64::new(0),
            proxy_refused: Default::default(),
            proxy_logged_ms: AtomicU64::new(0),
        }
    }
}

impl Admission {
    /// Takes one upgrade from a budget of `rate` per second with `burst`
    /// at once; `Err(wait)`: over it, the next one fits in `wait`.
    pub fn admit_upgrade(&self, rate: u32, burst: u32, now_us: u64) -> Result<(), Duration> {
        let interval = 1_000_000 / u64::from(rate.max(1));
        let tolerance = interval * u64::from(burst.max(1) - 1);
        let mut tat = self.tat_us.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now_us);
            if start - now_us > tolerance {
                self.rejected_rate.fetch_add(1, Ordering::Relaxed);
                return Err(Duration::from_micros(start - now_us - tolerance));
            }
            match self.tat_us.compare_exchange_weak(
                tat,
                start + interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Counts a connection from `ip` unless it already has `cap`; false:
    /// refused (and counted as a rejection).
    pub fn acquire_ip(&self, ip: IpAddr, cap: u32) -> bool {
        let mut map = self.shard(ip).lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= cap {
            drop(map);
            self.rejected_per_ip.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        *n += 1;
        true
    }

    /// A connection [`Admission::acquire_ip`] counted has ended.
    pub fn release_ip(&self, ip: IpAddr) {
        let mut map = self.shard(ip).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }

    fn shard(&self, ip: IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        use std::hash::{Hash, Hasher};
        // A fixed hash (not a per-map random one): the same address must
        // always land in the same map.
        let mut h = std::hash::DefaultHasher::new();
        ip.hash(&mut h);
        &self.per_ip[(h.finish() % 64) as usize]
    }
}

/// Reasons in [`Admission::proxy_refused`], in order.
pub const PROXY_REFUSALS: [&str; 3] = ["untrusted", "missing", "malformed"];

impl Admission {
    /// Counts a connection closed for its PROXY header, and logs it, at
    /// most once a second (a misconfigured tier would log every connection).
    pub fn proxy_refused(&self, reason: &str, peer: std::net::SocketAddr, why: &str) {
        let i = PROXY_REFUSALS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(2);
        self.proxy_refused[i].fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let last = self.proxy_logged_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .proxy_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!("{peer}: closed: {why} (PROXY protocol; logged at most once a second)");
        }
    }
}

/// Microseconds on the process clock the rate limit runs on.
pub fn now_us() -> u64 {
    now_ms() * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let a = Admission::default();
        let t0 = 5_000_000;
        // 100/s with a burst of 50: 50 pass at once, the 51st waits 10 ms.
        for i in 0..50 {
            assert!(a.admit_upgrade(100, 50, t0).is_ok(), "{i}");
        }
        let wait = a.admit_upgrade(100, 50, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10));
        // A second later the bucket is full again: one burst at once.
        let t1 = t0 + 1_000_000;
        let passed = (0..200)
            .filter(|_| a.admit_upgrade(100, 50, t1).is_ok())
            .count();
        assert_eq!(passed, 50);
        // Then the rate: one every 10 ms passes, a second in between does not.
        for i in 1..=20 {
            let t = t1 + i * 10_000;
            assert!(a.admit_upgrade(100, 50, t).is_ok(), "{i}");
            assert!(a.admit_upgrade(100, 50, t).is_err(), "{i}");
        }
        assert_eq!(a.rejected_rate.load(Ordering::Relaxed), 1 + 150 + 20);
    }

    #[test]
    fn per_ip_counts_and_releases() {
        let a = Admission::default();
        let x: IpAddr = "192.0.2.1".parse().unwrap();
        let y: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(a.acquire_ip(x, 2) && a.acquire_ip(x, 2));
        assert!(!a.acquire_ip(x, 2));
        assert!(a.acquire_ip(y, 2));
        a.release_ip(x);
        assert!(a.acquire_ip(x, 2));
        assert_eq!(a.rejected_per_ip.load(Ordering::Relaxed), 1);
    }
}
