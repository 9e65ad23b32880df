//! Timers and the sweeps over every session: idle parking, stalled peers,
//! unpinning the pool, and recvs waiting for buffers. Policy only; all I/O
//! goes through the driver.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use super::{copy_out, Shard, Timer, TimerTarget};
use crate::conn::TimerKind;

/// How often the pool is swept for stalled directions while it runs low.
const UNPIN_EVERY: Duration = Duration::from_millis(50);

impl Shard {
    /// Sessions silent for between one and two `park_idle_after` intervals
    /// get parked at the next sweep.
    /// (The sweep also runs while parking is off, idle, so that a reload
    /// can turn it on.)
    pub(super) fn schedule_sweep(&mut self) {
        let every = self
            .snap
            .config
            .server
            .park_idle_after
            .unwrap_or(Duration::from_secs(10));
        self.timers.push(Reverse(Timer {
            at: Instant::now() + every,
            target: TimerTarget::IdleSweep,
            kind: TimerKind::Linger,
        }));
    }

    pub(super) fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse(t)) = self.timers.peek().copied() {
            if t.at > now {
                break;
            }
            self.timers.pop();
            match t.target {
                TimerTarget::Accept { listener } => self.driver.arm_accept(listener as usize),
                TimerTarget::StallSweep => self.stall_sweep(),
                TimerTarget::Unpin => self.unpin_sweep(),
                TimerTarget::Pacing => self.pacing_sweep(),
                TimerTarget::IdleSweep if self.snap.config.server.park_idle_after.is_none() => {
                    self.schedule_sweep();
                }
                TimerTarget::IdleSweep => {
                    for key in self.driver.keys() {
                        if self.driver.is_closing(key) {
                            continue;
                        }
                        let Some(s) = self.driver.get_mut(key) else {
                            continue;
                        };
                        if s.conn.idle_sweep(&mut self.actions) {
                            self.stats.parked.add(1);
                        }
                        if !self.actions.is_empty() {
                            self.exec(key);
                        }
                    }
                    self.schedule_sweep();
                }
                TimerTarget::Conn { key, gen } => {
                    let key = key as usize;
                    if self.driver.gen(key) != Some(gen) || self.driver.is_closing(key) {
                        continue;
                    }
                    let Some(s) = self.driver.get_mut(key) else {
                        continue;
                    };
                    s.conn.on_timer(t.kind, &mut self.actions);
                    self.exec(key);
                }
            }
        }
    }

    pub(super) fn pool_quota(&self) -> usize {
        let server = &self.snap.config.server;
        crate::conn::pool_quota(
            server.max_buffers_per_direction.get(),
            self.driver.available(),
            server.buffers_per_shard as usize,
        )
    }

    /// Under pool pressure (a quarter or less free, or a recv waiting for
    /// buffers, which [`Shard::feed_starved`] gives only above a quarter),
    /// schedules an unpin sweep, which moves the buffers of directions whose
    /// readers take nothing out of the pool. One sweep per `UNPIN_EVERY` at
    /// most.
    pub(super) fn watch_pool(&mut self) {
        let total = self.snap.config.server.buffers_per_shard as usize;
        self.stats.buffers_free.set(self.driver.available() as u64);
        let pressure = self.driver.available() * 4 <= total || !self.starved.is_empty();
        if self.unpin_pending || !pressure {
            return;
        }
        self.unpin_pending = true;
        self.timers.push(Reverse(Timer {
            at: Instant::now() + UNPIN_EVERY,
            target: TimerTarget::Unpin,
            kind: TimerKind::Linger,
        }));
    }

    fn unpin_sweep(&mut self) {
        self.unpin_pending = false;
        for key in self.driver.keys() {
            let Some((s, bufs)) = self.driver.with_bufs(key) else {
                continue;
            };
            s.conn.unpin(&mut copy_out(bufs), &mut self.actions);
            if !self.actions.is_empty() {
                self.exec(key);
            }
        }
        // Still short: look again (sends seen in flight now are cancelled
        // next time if they have not moved).
        self.watch_pool();
    }

    /// Period of the stall sweep: fine enough that a stalled peer is closed
    /// within an eighth of `stalled_peer_timeout` of it, and no finer than
    /// 100 ms (the sweep visits every session).
    fn stall_period(&self) -> Duration {
        match self.snap.config.server.stalled_peer_timeout {
            Some(t) => (t / 8).clamp(Duration::from_millis(100), Duration::from_secs(5)),
            None => Duration::from_secs(5),
        }
    }

    pub(super) fn schedule_stall_sweep(&mut self) {
        self.timers.push(Reverse(Timer {
            at: Instant::now() + self.stall_period(),
            target: TimerTarget::StallSweep,
            kind: TimerKind::Linger,
        }));
    }

    fn stall_sweep(&mut self) {
        // Sweeps in a row without progress that add up to the timeout; one
        // more, since the first may come just after the stall began.
        let limit = self.snap.config.server.stalled_peer_timeout.map(|t| {
            let period = self.stall_period();
            (t.as_millis().div_ceil(period.as_millis()) + 1).min(u16::MAX as u128) as u16
        });
        for key in self.driver.keys() {
            if self.driver.is_closing(key) {
                continue;
            }
            let Some(s) = self.driver.get_mut(key) else {
                continue;
            };
            s.conn.stall_sweep(limit, &mut self.actions);
            if !self.actions.is_empty() {
                self.exec(key);
            }
        }
        self.schedule_stall_sweep();
    }

    /// Re-arms recvs that ran out of buffers, while there are buffers to spare.
    pub(super) fn feed_starved(&mut self) {
        let spare = (self.snap.config.server.buffers_per_shard as usize / 4).max(1);
        while self.driver.available() > spare {
            let Some((key, gen, side)) = self.starved.pop_front() else {
                break;
            };
            if self.driver.gen(key) != Some(gen) || self.driver.is_closing(key) {
                continue;
            }
            let Some(s) = self.driver.get_mut(key) else {
                continue;
            };
            s.conn.on_buffers_available(side, &mut self.actions);
            self.exec(key);
        }
    }
}
