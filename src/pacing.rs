//! Paced closes: how fast ringlb moves live sessions, and which upstreams
//! want moving. The shards do the closing (`shard/pacing.rs`); this holds
//! what they share.
//!
//! **One budget per purpose, shared by all shards, lock-free.** Each paced
//! purpose has one atomic cell: a backend being drained at a rate
//! ([`BackendState::close_tat_us`]), an upstream being rebalanced
//! ([`UpstreamState::tat_us`]), the paced shutdown (`Shared`). A shard's
//! pacing sweep (every [`TICK`] while there is work) takes one token per
//! session it closes with a compare-and-swap on the cell, so the rate holds
//! across shards whatever the number of shards and however sessions are
//! spread over them, and a shard that has no session of that backend takes
//! no token (the others get them). The main thread is not involved: a
//! quota handed out per shard would idle on a shard whose sessions of that
//! backend are gone while another still has some.
//!
//! **Jitter.** Each token moves the cell by the interval times a random
//! factor in [0.5, 1.5), so the closes (and the reconnects they cause) do
//! not fall on a fixed grid; the mean rate is the configured one.
//!
//! **Catch-up is bounded** to one sweep's worth ([`TICK`]): a cell left
//! behind (no work for a while) never releases a burst.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::snapshot::Snapshot;
use crate::upstream::{BackendState, Rng, Upstream};

/// How often a shard with pacing work sweeps its sessions.
pub const TICK: Duration = Duration::from_millis(20);
/// How often a shard without pacing work looks whether some started
/// (an admin request, a reload, a backend back up).
pub const IDLE_CHECK: Duration = Duration::from_millis(100);

/// Takes one token from a GCRA cell at `rate` per second; false: none now.
pub fn take(cell: &AtomicU64, rate: u32, now_us: u64, rng: &mut Rng) -> bool {
    let interval = 1_000_000 / u64::from(rate.max(1));
    let window = TICK.as_micros() as u64;
    let mut tat = cell.load(Ordering::Relaxed);
    loop {
        if tat > now_us {
            return false;
        }
        // Jitter in [0.5, 1.5) of the interval; never zero.
        let step = (interval / 2 + interval * u64::from(rng.below(1024)) / 1024).max(1);
        let next = tat.max(now_us.saturating_sub(window)) + step;
        match cell.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(seen) => tat = seen,
        }
    }
}

/// Per upstream, what survives reloads: whether it is being rebalanced,
/// its close budget, and which backends were up when last looked at.
#[derive(Debug, Default)]
pub struct UpstreamState {
    pub rebalancing: AtomicBool,
    pub tat_us: AtomicU64,
    /// Bit i: backend i was up (and not draining) at the last look.
    pub up_mask: AtomicU64,
}

impl UpstreamState {
    /// Starts a rebalance (if the upstream has one configured); returns
    /// whether one was started now.
    pub fn trigger(&self, u: &Upstream, why: &str) -> bool {
        if u.rebalance.is_none() {
            return false;
        }
        let started = !self.rebalancing.swap(true, Ordering::Relaxed);
        if started {
            log::info!("upstream {}: rebalancing ({why})", u.name);
        }
        started
    }
}

/// A new snapshot replaced `old`: every upstream whose backend set gained
/// an address starts rebalancing (a backend added by a reload, or by
/// re-resolution: whoever builds a new snapshot calls this).
pub fn backends_changed(old: &Snapshot, new: &Snapshot) {
    for u in &new.upstreams {
        let before = old.upstreams.iter().find(|o| o.name == u.name);
        let added = u
            .backends
            .iter()
            .filter(|b| before.is_none_or(|o| !o.backends.iter().any(|ob| ob.addr == b.addr)))
            .count();
        if added > 0 && before.is_some() {
            u.state.trigger(
                u,
                &format!("{added} backend(s) added by a new configuration"),
            );
        }
    }
}

/// Looks for backends that came back (up again after being down or
/// drained) and starts a rebalance of their upstream. Cheap: a few atomics
/// per backend; the shards call it on their idle check.
pub fn watch_health(snap: &Snapshot) {
    for u in &snap.upstreams {
        let mut mask = 0u64;
        for (i, b) in u.backends.iter().enumerate().take(64) {
            if b.is_up() && !b.is_draining() {
                mask |= 1 << i;
            }
        }
        let was = u.state.up_mask.swap(mask, Ordering::Relaxed);
        // The first look (nothing recorded yet) is no change.
        if was != 0 && mask & !was != 0 {
            u.state.trigger(u, "a backend is back up");
        }
    }
}

/// Where a rebalance stands for one upstream: `Some(i)`, the backend to
/// take a session from next (the one most over its weighted share, and
/// over it), while some backend is outside `share × (1 ± threshold)`;
/// `None` when all are within it (the rebalance is done).
///
/// Only backends that take new sessions (up, not draining) count: the
/// fair share is of the sessions they hold, by weight. A backend at its
/// `max_connections` is never "under" (it cannot take more), and a session
/// is moved only if the backend its client will land on (the least loaded
/// other one that is not full) is left less loaded than the victim was:
/// otherwise the client would come back, or churn between two backends,
/// for ever.
pub fn rebalance_victim(u: &Upstream) -> Option<usize> {
    let r = u.rebalance?;
    // (index, active, weight, full)
    let eligible: Vec<(usize, f64, f64, bool)> = u
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.is_up() && !b.is_draining())
        .map(|(i, b)| {
            let full = b.max_connections.is_some_and(|m| b.active() >= m);
            (i, b.active() as f64, f64::from(b.weight), full)
        })
        .collect();
    let total: f64 = eligible.iter().map(|e| e.1).sum();
    let weights: f64 = eligible.iter().map(|e| e.2).sum();
    if eligible.len() < 2 || total == 0.0 {
        return None;
    }
    let share = |w: f64| total * w / weights;
    let outside = eligible.iter().any(|&(_, n, w, full)| {
        let s = share(w);
        n > s * (1.0 + r.threshold) || (n < s * (1.0 - r.threshold) && !full)
    });
    if !outside {
        return None;
    }
    let &(victim, n, w, _) = eligible
        .iter()
        .filter(|&&(_, n, w, _)| n > share(w))
        .max_by(|a, b| (a.1 / a.2).total_cmp(&(b.1 / b.2)))?;
    // Where its client lands: the least loaded other backend with room.
    let lands = eligible
        .iter()
        .filter(|&&(i, _, _, full)| i != victim && !full)
        .map(|&(_, n2, w2, _)| (n2 + 1.0) / w2)
        .min_by(|a, b| a.total_cmp(b))?;
    (lands < n / w).then_some(victim)
}

/// Paced drain of one backend: stop at zero sessions. Returns true for the
/// one caller that saw it finish (it logs).
pub fn drain_finished(u: &Upstream, b: &crate::upstream::Backend) -> bool {
    let rate = b.state.close_rate.load(Ordering::Relaxed);
    if rate == 0 || b.active() > 0 {
        return false;
    }
    if b.state
        .close_rate
        .compare_exchange(rate, 0, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        log::info!(
            "backend {} of upstream {}: paced drain done, no session left",
            b.addr,
            u.name
        );
        return true;
    }
    false
}

/// Whether a backend is being drained at a rate now.
pub fn close_rate(b: &BackendState) -> u32 {
    b.close_rate.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_at_the_rate_with_jitter_and_no_burst() {
        let cell = AtomicU64::new(0);
        let mut rng = Rng::new(5);
        // 50/s for 10 s, asked every 20 ms (a sweep): about 500 tokens,
        // never more than 3 in one sweep, gaps not all equal.
        let mut got = Vec::new();
        let t0 = 10_000_000u64;
        for tick in 0..500u64 {
            let now = t0 + tick * 20_000;
            let mut n = 0;
            while take(&cell, 50, now, &mut rng) {
                n += 1;
                got.push(now);
            }
            assert!(n <= 3, "a burst of {n} at tick {tick}");
        }
        assert!((480..=520).contains(&got.len()), "{}", got.len());
        // After a long pause, one sweep's worth at most.
        let later = t0 + 100_000_000;
        let burst = (0..100)
            .take_while(|_| take(&cell, 50, later, &mut rng))
            .count();
        assert!(burst <= 3, "{burst}");
        let gaps: std::collections::HashSet<u64> = got.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.len() > 1, "no jitter");
    }

    fn snap(servers: &[(u16, u32)], rebalance: &str) -> std::sync::Arc<Snapshot> {
        let list: Vec<String> = servers
            .iter()
            .map(|(p, w)| format!("{{ addr = \"127.0.0.1:{p}\", weight = {w} }}"))
            .collect();
        let toml = format!(
            "[server]\nlisten = [\"127.0.0.1:1\"]\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\n{rebalance}\nservers = [{}]\n",
            list.join(",")
        );
        Snapshot::new(crate::config::Config::parse(&toml, "test").unwrap())
    }

    /// Holds `n` leases on backend `i`.
    fn hold(s: &Snapshot, i: usize, n: usize) -> Vec<crate::upstream::Lease> {
        let u = &s.upstreams[0];
        (0..n)
            .map(|_| u.lease_on(u.backends[i].addr).unwrap())
            .collect()
    }

    #[test]
    fn the_victim_is_the_most_over_its_weighted_share_until_all_are_within() {
        let r = "rebalance = { threshold = 0.25, rate = 10 }";
        let s = snap(&[(9001, 1), (9002, 1), (9003, 1)], r);
        let u = &s.upstreams[0];
        let _a = hold(&s, 0, 150);
        let mut b = hold(&s, 1, 160);
        assert_eq!(rebalance_victim(u), Some(1), "C is empty: B is most over");
        // 112, 113, 75: C at the edge of the band, nobody over it: done.
        b.truncate(113);
        drop(_a);
        let _a = hold(&s, 0, 112);
        let _c = hold(&s, 2, 75);
        assert_eq!(rebalance_victim(u), None);
        // Weights: 2:1 means 200:100 is fair.
        let w = snap(&[(9001, 2), (9002, 1)], r);
        let _x = hold(&w, 0, 200);
        let _y = hold(&w, 1, 100);
        assert_eq!(rebalance_victim(&w.upstreams[0]), None);
        let _z = hold(&w, 1, 100);
        assert_eq!(rebalance_victim(&w.upstreams[0]), Some(1));
        // Draining or down backends are left out of the shares.
        w.upstreams[0].backends[0]
            .state
            .draining
            .store(true, Ordering::Relaxed);
        assert_eq!(
            rebalance_victim(&w.upstreams[0]),
            None,
            "one left: nothing to even"
        );
        // A full backend under its share cannot take more: the others are
        // evened out among themselves, and nothing churns between them.
        let full = Upstream::new(
            &crate::config::Config::parse(
                "[server]\nlisten = [\"127.0.0.1:1\"]\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nrebalance = { threshold = 0.1, rate = 5 }\nservers = [{ addr = \"127.0.0.1:9001\" }, { addr = \"127.0.0.1:9002\" }, { addr = \"127.0.0.1:9003\", max_connections = 50 }]\n",
                "test",
            )
            .unwrap()
            .upstreams[0],
            &|_| None,
        );
        let lease = |i: usize, n: usize| -> Vec<_> {
            (0..n)
                .map(|_| full.lease_on(full.backends[i].addr).unwrap())
                .collect()
        };
        let (_p, _q, _r) = (lease(0, 150), lease(1, 100), lease(2, 50));
        assert_eq!(rebalance_victim(&full), Some(0), "150 vs 100: move to B");
        drop(_p);
        let (_p, _s) = (lease(0, 126), lease(1, 24));
        assert_eq!(
            rebalance_victim(&full),
            Some(0),
            "126 and 124: one more move"
        );
        drop(_p);
        let _p = lease(0, 125);
        assert_eq!(
            rebalance_victim(&full),
            None,
            "125 and 125 with C full: a move would only swap them"
        );
        // Off without a rebalance configured.
        assert_eq!(
            rebalance_victim(&snap(&[(9001, 1), (9002, 1)], "").upstreams[0]),
            None
        );
    }

    #[test]
    fn triggers_a_new_backend_and_one_back_up() {
        let r = "rebalance = { rate = 10 }";
        let old = snap(&[(9001, 1), (9002, 1)], r);
        let same = snap(&[(9002, 1), (9001, 1)], r);
        backends_changed(&old, &same);
        assert!(!same.upstreams[0].state.rebalancing.load(Ordering::Relaxed));
        let more = snap(&[(9001, 1), (9002, 1), (9003, 1)], r);
        backends_changed(&old, &more);
        assert!(more.upstreams[0].state.rebalancing.load(Ordering::Relaxed));
        // Without rebalance configured nothing starts.
        let off = snap(&[(9001, 1), (9002, 1), (9003, 1)], "");
        backends_changed(&old, &off);
        assert!(!off.upstreams[0].state.rebalancing.load(Ordering::Relaxed));
        // Up, then down, then up again: the return triggers it.
        let s = snap(&[(9001, 1), (9002, 1)], r);
        let st = &s.upstreams[0].state;
        watch_health(&s);
        assert!(
            !st.rebalancing.load(Ordering::Relaxed),
            "the first look is no change"
        );
        s.upstreams[0].backends[1].state.set_down(true);
        watch_health(&s);
        assert!(!st.rebalancing.load(Ordering::Relaxed));
        s.upstreams[0].backends[1].state.set_down(false);
        watch_health(&s);
        assert!(st.rebalancing.load(Ordering::Relaxed));
    }
}
