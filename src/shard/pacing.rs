//! The pacing sweep: closes live sessions cleanly at a rate, for a backend
//! drained at a rate, an upstream being rebalanced, or a paced shutdown.
//! The budgets are shared by all shards (`crate::pacing`); this sweep only
//! picks sessions and asks each for its clean close.
//!
//! Which sessions go first: the **oldest**. A session that was just moved
//! (by an earlier drain or rebalance, or a reconnect storm) is the newest
//! on its backend; closing newest first would bounce the same clients
//! again and again, while oldest first spreads the disruption over the
//! clients that have gone longest without one.

use std::cmp::Reverse;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Shard, Timer, TimerTarget};
use crate::conn::{Closer, TimerKind};
use crate::pacing::{self, IDLE_CHECK, TICK};
use crate::upstream::{BackendState, Rng};

/// How often the list of candidates is rebuilt while there is work.
const RESCAN: Duration = Duration::from_millis(250);

/// A session that could take a clean close when the list was made.
pub(super) struct Candidate {
    started: Instant,
    /// `usize::MAX` once used (closed, or found gone).
    key: usize,
    gen: u32,
    /// The backend's state, by address (to match a drain or rebalance).
    backend: usize,
}

/// One reason to close sessions now, with its budget.
enum Work<'a> {
    Shutdown {
        rate: u32,
    },
    Drain {
        state: &'a Arc<BackendState>,
        rate: u32,
    },
    Rebalance {
        upstream: usize,
        state: &'a Arc<BackendState>,
        rate: u32,
    },
}

impl Shard {
    pub(super) fn schedule_pacing(&mut self, after: Duration) {
        self.timers.push(Reverse(Timer {
            at: Instant::now() + after,
            target: TimerTarget::Pacing,
            kind: TimerKind::Linger,
        }));
    }

    /// Lists every session that can take a clean close, oldest first.
    fn list_candidates(&mut self) {
        self.pacing_list.clear();
        for key in self.driver.keys() {
            if self.driver.is_closing(key) {
                continue;
            }
            let (Some(s), Some(gen)) = (self.driver.get(key), self.driver.gen(key)) else {
                continue;
            };
            if !s.conn.can_close_cleanly() {
                continue;
            }
            let backend = s
                .conn
                .backend_state()
                .map_or(0, |b| Arc::as_ptr(b) as usize);
            self.pacing_list.push(Candidate {
                started: s.started,
                key,
                gen,
                backend,
            });
        }
        self.pacing_list.sort_unstable_by_key(|c| c.started);
    }

    pub(super) fn pacing_sweep(&mut self) {
        let snap = self.snap.clone();
        if self.id == 0 {
            pacing::watch_health(&snap);
        }
        let mut work = Vec::new();
        if self.draining {
            if let Some(rate) = snap.config.server.drain_close_rate {
                work.push(Work::Shutdown { rate: rate.get() });
            }
        }
        for (ui, u) in snap.upstreams.iter().enumerate() {
            for b in &u.backends {
                pacing::drain_finished(u, b);
                let rate = pacing::close_rate(&b.state);
                if rate > 0 {
                    work.push(Work::Drain {
                        state: &b.state,
                        rate,
                    });
                }
            }
            if u.state.rebalancing.load(Ordering::Relaxed) {
                match (pacing::rebalance_victim(u), u.rebalance) {
                    (Some(i), Some(r)) => work.push(Work::Rebalance {
                        upstream: ui,
                        state: &u.backends[i].state,
                        rate: r.rate.get(),
                    }),
                    _ => {
                        if u.state.rebalancing.swap(false, Ordering::Relaxed) {
                            let counts: Vec<String> = (u.backends.iter())
                                .map(|b| format!("{} {}", b.addr, b.active()))
                                .collect();
                            log::info!("upstream {}: rebalanced ({})", u.name, counts.join(", "));
                        }
                    }
                }
            }
        }
        if work.is_empty() {
            self.pacing_list.clear();
            return self.schedule_pacing(IDLE_CHECK);
        }
        // The candidates, oldest first: every session that could take a
        // clean close when last listed. Listing visits every session, so it
        // is redone only every RESCAN (or when the list ran out), not on
        // every 20 ms tick; between listings a tick walks the list, which
        // is plain data, and checks each entry it uses against its slot.
        let now_i = Instant::now();
        if self
            .pacing_listed
            .is_none_or(|t| now_i.duration_since(t) >= RESCAN)
            || (!self.pacing_list.is_empty()
                && self.pacing_list.iter().all(|c| c.key == usize::MAX))
        {
            self.list_candidates();
            self.pacing_listed = Some(now_i);
        }
        let now = crate::admission::now_us();
        let wait = snap.config.server.close_boundary_timeout;
        let mut rng = Rng::seeded();
        let shared = self.shared.clone();
        let mut list = std::mem::take(&mut self.pacing_list);
        for w in &work {
            let (cell, rate, why, backend) = match w {
                Work::Shutdown { rate } => (&shared.shutdown_tat_us, *rate, Closer::Shutdown, None),
                Work::Drain { state, rate } => (
                    &state.close_tat_us,
                    *rate,
                    Closer::Drain,
                    Some(Arc::as_ptr(state) as usize),
                ),
                Work::Rebalance {
                    upstream,
                    state,
                    rate,
                } => (
                    &snap.upstreams[*upstream].state.tat_us,
                    *rate,
                    Closer::Rebalance,
                    Some(Arc::as_ptr(state) as usize),
                ),
            };
            for c in list.iter_mut() {
                if c.key == usize::MAX || backend.is_some_and(|want| want != c.backend) {
                    continue;
                }
                // Still the same session, and still closable (no token
                // is spent on one that is gone).
                let key = std::mem::replace(&mut c.key, usize::MAX);
                if self.driver.gen(key) != Some(c.gen) || self.driver.is_closing(key) {
                    continue;
                }
                if !self
                    .driver
                    .get(key)
                    .is_some_and(|s| s.conn.can_close_cleanly())
                {
                    continue;
                }
                if !pacing::take(cell, rate, now, &mut rng) {
                    c.key = key;
                    break;
                }
                if let Some(s) = self.driver.get_mut(key) {
                    s.conn.request_close(why, wait, &mut self.actions);
                    self.exec(key);
                }
            }
        }
        self.pacing_list = list;
        self.schedule_pacing(TICK);
    }
}
