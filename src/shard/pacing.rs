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
            return self.schedule_pacing(IDLE_CHECK);
        }
        // Every session that can take a clean close, oldest first.
        let mut candidates: Vec<(Instant, usize, usize)> = Vec::new();
        for key in self.driver.keys() {
            if self.driver.is_closing(key) {
                continue;
            }
            let Some(s) = self.driver.get(key) else {
                continue;
            };
            if !s.conn.can_close_cleanly() {
                continue;
            }
            let backend = s
                .conn
                .backend_state()
                .map_or(0, |b| Arc::as_ptr(b) as usize);
            candidates.push((s.started, key, backend));
        }
        candidates.sort_unstable_by_key(|c| c.0);
        let mut taken = vec![false; candidates.len()];
        let now = crate::admission::now_us();
        let wait = snap.config.server.close_boundary_timeout;
        let mut rng = Rng::seeded();
        let shared = self.shared.clone();
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
            for (i, &(_, key, b)) in candidates.iter().enumerate() {
                if taken[i] || backend.is_some_and(|want| want != b) {
                    continue;
                }
                if !pacing::take(cell, rate, now, &mut rng) {
                    break;
                }
                taken[i] = true;
                if let Some(s) = self.driver.get_mut(key) {
                    s.conn.request_close(why, wait, &mut self.actions);
                    self.exec(key);
                }
            }
        }
        self.schedule_pacing(TICK);
    }
}
