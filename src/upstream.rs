//! Backends and the least-connections pick.
//!
//! Every backend has one atomic count of live connections (including those
//! still connecting or mid-handshake), shared by all shards, so the pick is
//! global rather than per shard. A connection holds a [`Lease`] for as long
//! as it uses the backend; dropping the lease gives the slot back. The only
//! atomics touched are per connection (pick and release), never per message.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::UpstreamConfig;

/// What survives a reload for a backend that stays: its live count, its
/// totals, its health and whether an operator is draining it.
#[derive(Debug, Default)]
pub struct BackendState {
    active: AtomicUsize,
    pub connections_total: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Set by the admin API: no new connections.
    pub draining: AtomicBool,
    /// Passive health: failures counted in the current window.
    fails: AtomicU32,
    /// Start of the failure window, in ms since `epoch()`.
    fail_window_start: AtomicU64,
    /// Down until this time (ms since `epoch()`); 0: up.
    down_until: AtomicU64,
    /// WebSocket sessions on this backend that ended, by
    /// [`crate::stats::CLOSE_REASONS`]; touched once per session.
    pub closed: [AtomicU64; crate::stats::CLOSE_REASONS.len()],
    /// Paced drain (`drain?close_rate=N`): sessions to close per second,
    /// 0 when none; and its GCRA cell (µs, `admission::now_us`'s clock).
    pub close_rate: AtomicU32,
    pub close_tat_us: AtomicU64,
}

impl BackendState {
    pub fn count_close(&self, reason: usize) {
        self.closed[reason].fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    pub max_connections: Option<usize>,
    pub state: Arc<BackendState>,
}

impl Backend {
    pub fn new(addr: SocketAddr, weight: u32, max_connections: Option<usize>) -> Backend {
        Backend {
            addr,
            weight,
            max_connections,
            state: Arc::default(),
        }
    }

    pub fn active(&self) -> usize {
        self.state.active()
    }

    pub fn is_up(&self) -> bool {
        self.state.down_until.load(Ordering::Relaxed) <= now_ms()
    }

    pub fn is_draining(&self) -> bool {
        self.state.draining.load(Ordering::Relaxed)
    }
}

/// Milliseconds on a process-wide monotonic clock; never 0.
pub fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Passive health with nginx's semantics: `max_fails` failures within
/// `fail_timeout` mark the backend down for `fail_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct HealthPolicy {
    pub max_fails: u32,
    pub fail_timeout: Duration,
}

impl BackendState {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Records a failed connect; returns true if this marked the backend down.
    pub fn record_failure(&self, policy: HealthPolicy) -> bool {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        if policy.max_fails == 0 {
            return false;
        }
        let now = now_ms();
        let window = policy.fail_timeout.as_millis() as u64;
        let start = self.fail_window_start.load(Ordering::Relaxed);
        let fails = if now.saturating_sub(start) > window {
            self.fail_window_start.store(now, Ordering::Relaxed);
            self.fails.store(1, Ordering::Relaxed);
            1
        } else {
            self.fails.fetch_add(1, Ordering::Relaxed) + 1
        };
        if fails >= policy.max_fails {
            self.fails.store(0, Ordering::Relaxed);
            self.fail_window_start.store(0, Ordering::Relaxed);
            self.down_until.store(now + window, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// A successful connect clears the failure count.
    pub fn record_success(&self) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
    }

    /// How much longer the backend is marked down, in ms, as of `now`
    /// (`now_ms()`): 0 up, `u64::MAX` until marked up. For a hand-off.
    pub fn down_for(&self, now: u64) -> u64 {
        match self.down_until.load(Ordering::Relaxed) {
            u64::MAX => u64::MAX,
            t => t.saturating_sub(now),
        }
    }

    /// Marks the backend down for `ms` more ([`BackendState::down_for`]'s
    /// value from another process).
    pub fn set_down_for(&self, ms: u64) {
        let until = match ms {
            0 => 0,
            u64::MAX => u64::MAX,
            ms => now_ms().saturating_add(ms),
        };
        self.down_until.store(until, Ordering::Relaxed);
    }

    /// Marks up or down from an active check.
    pub fn set_down(&self, down: bool) {
        self.down_until
            .store(if down { u64::MAX } else { 0 }, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub max_response_head: usize,
    pub health: HealthPolicy,
    /// `rebalance = { threshold, rate }`; off when `None`.
    pub rebalance: Option<crate::config::Rebalance>,
    /// Rebalance state; a reload carries it over by upstream name.
    pub state: Arc<crate::pacing::UpstreamState>,
}

impl Upstream {
    /// Builds an upstream; `known` returns the state of a backend ringlb
    /// already tracks (by address), so live counts and health survive a
    /// reload.
    pub fn new(
        cfg: &UpstreamConfig,
        known: &dyn Fn(SocketAddr) -> Option<Arc<BackendState>>,
    ) -> Upstream {
        Upstream {
            name: cfg.name.clone(),
            backends: cfg
                .servers
                .iter()
                .map(|s| {
                    let max = s.max_connections.map(|m| m.get());
                    let mut b = Backend::new(s.addr, s.weight.get(), max);
                    if let Some(state) = known(s.addr) {
                        b.state = state;
                    }
                    Arc::new(b)
                })
                .collect(),
            connect_timeout: cfg.connect_timeout,
            response_timeout: cfg.response_timeout,
            max_response_head: cfg.max_response_head.get(),
            health: HealthPolicy {
                max_fails: cfg.max_fails,
                fail_timeout: cfg.fail_timeout,
            },
            rebalance: cfg.rebalance,
            state: Arc::default(),
        }
    }

    /// Picks the backend with the lowest `active / weight` among those not in
    /// `tried` and not full, choosing at random among ties, and takes a
    /// lease on it. Backends marked down are passed over while any other is
    /// left; when all that remain are down they are tried anyway, since a
    /// mark is only a guess about the next connect and a 502 is a certainty.
    /// `None`: every backend was tried, is full or is draining.
    pub fn pick(&self, tried: &[usize], rng: &mut Rng) -> Option<(usize, Lease)> {
        self.pick_among(tried, rng, true)
            .or_else(|| self.pick_among(tried, rng, false))
    }

    fn pick_among(&self, tried: &[usize], rng: &mut Rng, up_only: bool) -> Option<(usize, Lease)> {
        // Another shard may fill a backend between our look and our
        // increment; then we give the slot back and look again.
        for _ in 0..=self.backends.len() {
            let mut best: Option<(usize, usize, u32)> = None; // (index, active, weight)
            let mut ties = 0u32;
            for (i, b) in self.backends.iter().enumerate() {
                if tried.contains(&i) {
                    continue;
                }
                let active = b.active();
                if b.max_connections.is_some_and(|m| active >= m)
                    || b.is_draining()
                    || (up_only && !b.is_up())
                {
                    continue;
                }
                match best {
                    None => {
                        best = Some((i, active, b.weight));
                        ties = 1;
                    }
                    Some((_, ba, bw)) => {
                        // active/weight < ba/bw without division.
                        let lhs = active as u128 * bw as u128;
                        let rhs = ba as u128 * b.weight as u128;
                        if lhs < rhs {
                            best = Some((i, active, b.weight));
                            ties = 1;
                        } else if lhs == rhs {
                            // Reservoir sampling: each tie wins with equal chance.
                            ties += 1;
                            if rng.below(ties) == 0 {
                                best = Some((i, active, b.weight));
                            }
                        }
                    }
                }
            }
            let (i, _, _) = best?;
            let b = &self.backends[i];
            let now = b.state.active.fetch_add(1, Ordering::Relaxed) + 1;
            if b.max_connections.is_some_and(|m| now > m) {
                b.state.active.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            b.state.connections_total.fetch_add(1, Ordering::Relaxed);
            return Some((i, Lease(b.clone())));
        }
        None
    }
}

impl Upstream {
    /// Adds a backend for every address the upstream's names resolved to
    /// (`cfg.named`), each with its server entry's weight and limit. An
    /// address already present (a fixed server, or another name's) is not
    /// added twice: the first entry that gives it wins. `known` is as in
    /// [`Upstream::new`], so an address that stays keeps its live count.
    pub fn add_named(
        &mut self,
        cfg: &UpstreamConfig,
        discovered: &crate::resolver::Discovered,
        known: &dyn Fn(SocketAddr) -> Option<Arc<BackendState>>,
    ) {
        for n in &cfg.named {
            for &addr in discovered.get(&n.target) {
                if self.backends.iter().any(|b| b.addr == addr) {
                    continue;
                }
                let max = n.max_connections.map(|m| m.get());
                let mut b = Backend::new(addr, n.weight.get(), max);
                if let Some(state) = known(addr) {
                    b.state = state;
                }
                self.backends.push(Arc::new(b));
            }
        }
    }

    /// A lease on the backend at `addr`, whatever its state: for a session
    /// that already exists (taken over from another process), which must
    /// be counted, not placed.
    pub fn lease_on(&self, addr: SocketAddr) -> Option<Lease> {
        let b = self.backends.iter().find(|b| b.addr == addr)?;
        b.state.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease(b.clone()))
    }
}

/// A counted use of a backend; the count drops with the lease.
#[derive(Debug)]
pub struct Lease(Arc<Backend>);

impl Lease {
    pub fn backend(&self) -> &Backend {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// xorshift64*: tie-breaking only, so speed matters and quality barely does.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let stack = &t as *const u64 as u64;
        Rng::new(t ^ stack.rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-enough in `0..n` for small `n`.
    pub fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * n as u64) >> 32) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert, proptest};

    fn up(weights: &[u32], max: &[Option<usize>]) -> Upstream {
        Upstream {
            name: "t".into(),
            backends: weights
                .iter()
                .zip(max)
                .enumerate()
                .map(|(i, (w, m))| {
                    Arc::new(Backend::new(
                        SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                        *w,
                        *m,
                    ))
                })
                .collect(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            max_response_head: 4096,
            health: HealthPolicy {
                max_fails: 1,
                fail_timeout: Duration::from_secs(10),
            },
            rebalance: None,
            state: Arc::default(),
        }
    }

    #[test]
    fn down_and_draining_are_skipped() {
        let u = up(&[1, 1], &[None, None]);
        let mut rng = Rng::new(9);
        u.backends[0].state.draining.store(true, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(u.pick(&[], &mut rng).unwrap().0, 1);
        }
        u.backends[0].state.draining.store(false, Ordering::Relaxed);
        assert!(u.backends[1].state.record_failure(u.health));
        assert!(!u.backends[1].is_up());
        assert_eq!(u.pick(&[], &mut rng).unwrap().0, 0);
        u.backends[0].state.set_down(true);
        // Every backend down: they are tried anyway, least connections first.
        let (first, _lease) = u
            .pick(&[], &mut rng)
            .expect("down backends are still tried");
        assert_eq!(u.pick(&[first], &mut rng).unwrap().0, 1 - first);
        // Draining is an operator's word, and holds even then.
        u.backends[0].state.draining.store(true, Ordering::Relaxed);
        u.backends[1].state.draining.store(true, Ordering::Relaxed);
        assert!(u.pick(&[], &mut rng).is_none());
    }

    #[test]
    fn failures_must_fall_in_one_window() {
        let s = BackendState::default();
        let p = HealthPolicy {
            max_fails: 2,
            fail_timeout: Duration::from_secs(60),
        };
        assert!(!s.record_failure(p));
        s.record_success();
        assert!(
            !s.record_failure(p),
            "a success in between resets the count"
        );
        assert!(s.record_failure(p));
    }

    #[test]
    fn even_spread_and_refill() {
        let u = up(&[1, 1], &[None, None]);
        let mut rng = Rng::new(7);
        let mut leases: Vec<(usize, Lease)> =
            (0..10).map(|_| u.pick(&[], &mut rng).unwrap()).collect();
        assert_eq!(u.backends[0].active(), 5);
        assert_eq!(u.backends[1].active(), 5);
        leases.retain(|(i, _)| *i != 0);
        assert_eq!(u.backends[0].active(), 0);
        for _ in 0..5 {
            assert_eq!(u.pick(&[], &mut rng).unwrap().0, 0);
        }
    }

    #[test]
    fn weights_two_to_one() {
        let u = up(&[2, 1], &[None, None]);
        let mut rng = Rng::new(3);
        let _l: Vec<_> = (0..30).map(|_| u.pick(&[], &mut rng).unwrap()).collect();
        assert_eq!(u.backends[0].active(), 20);
        assert_eq!(u.backends[1].active(), 10);
    }

    #[test]
    fn ties_are_random_not_first() {
        let u = up(&[1, 1, 1], &[None, None, None]);
        let mut rng = Rng::new(11);
        let mut first = [0; 3];
        for _ in 0..300 {
            let (i, _lease) = u.pick(&[], &mut rng).unwrap();
            first[i] += 1;
        }
        assert!(first.iter().all(|&n| n > 50), "{first:?}");
    }

    #[test]
    fn full_and_tried_are_skipped() {
        let u = up(&[1, 1], &[Some(1), None]);
        let mut rng = Rng::new(5);
        let a = u.pick(&[], &mut rng).unwrap();
        let b = u.pick(&[], &mut rng).unwrap();
        let c = u.pick(&[], &mut rng).unwrap();
        assert_eq!(u.backends[0].active(), 1);
        assert_eq!(u.backends[1].active(), 2);
        assert!(u.pick(&[1], &mut rng).is_none());
        drop((a, b, c));
        assert_eq!(u.backends[0].active() + u.backends[1].active(), 0);
    }

    proptest! {
        #[test]
        fn pick_is_least_loaded(weights in proptest::collection::vec(1u32..5, 1..6), n in 0usize..60, seed in 1u64..1000) {
            let u = up(&weights, &vec![None; weights.len()]);
            let mut rng = Rng::new(seed);
            let mut held = Vec::new();
            for _ in 0..n {
                held.push(u.pick(&[], &mut rng).unwrap());
            }
            // The next pick has the minimal active/weight of all backends.
            let (i, _l) = u.pick(&[], &mut rng).unwrap();
            let load = |j: usize| (u.backends[j].active() as f64 - if j == i { 1.0 } else { 0.0 }) / weights[j] as f64;
            for j in 0..weights.len() {
                prop_assert!(load(i) <= load(j) + 1e-9);
            }
        }
    }
}
