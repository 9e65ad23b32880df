//! The shard's half of a live hand-off (see `crate::handoff`): relaying
//! sessions are quiesced and, once neither the connection nor the driver
//! has anything in flight, taken out of the driver with their sockets
//! (still open) and turned into records for the main thread; sessions that
//! arrive (from the previous process, or back after a failed hand-off) are
//! rebuilt from their records and re-armed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{copy_out, Session, Shard};
use crate::conn::{Action, Conn, Stage};
use crate::handoff::{Exported, Moved};

impl Shard {
    /// Moves the session of `key` towards the export channel as far as it
    /// can go now: quiesce it if it relays, export it if it is quiescent.
    pub(super) fn try_export(&mut self, key: usize) {
        if self.driver.is_closing(key) {
            return;
        }
        let Some(s) = self.driver.get_mut(key) else {
            return;
        };
        if s.conn.stage() != Stage::Relaying {
            return;
        }
        if !s.conn.is_quiescing() {
            if !s.conn.quiesce(&mut self.actions) {
                return;
            }
            self.exec(key);
        }
        let ready =
            self.driver.is_idle(key) && self.driver.get(key).is_some_and(|s| s.conn.is_quiescent());
        if !ready {
            return;
        }
        let Some(taken) = self.driver.take(key) else {
            return;
        };
        let Some(backend) = taken.backend else {
            // A relaying session always has its backend socket; if a bug
            // ever broke that, the session cannot travel: end it here.
            log::error!(
                "shard {}: a relaying session without a backend socket; closing it",
                self.id
            );
            self.shared.clients.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        let piped = taken.data.conn.piped();
        let mut bytes: [Vec<u8>; 2] = Default::default();
        for (i, p) in taken.pipes.iter().enumerate() {
            if let Some(p) = p {
                match p.read_out(piped[i]) {
                    Ok(b) if b.len() == piped[i] => bytes[i] = b,
                    res => {
                        log::error!(
                            "shard {}: reading {} spliced bytes out of a pipe for a hand-off: {res:?}",
                            self.id,
                            piped[i]
                        );
                        bytes[i] = res.unwrap_or_default();
                    }
                }
            }
        }
        let Session { conn, started, .. } = taken.data;
        let (client_ip, ip_counted) = (conn.client_addr.ip(), conn.ip_counted);
        let mut out = Vec::new();
        let mut rec = conn.export(
            &self.snap,
            &mut copy_out(self.driver.bufs()),
            bytes,
            &mut out,
        );
        rec.age_ms = started.elapsed().as_millis() as u64;
        for a in out {
            if let Action::Release(bid) = a {
                self.driver.release(bid);
            }
        }
        #[cfg(debug_assertions)]
        if crate::server::test_fault("handoff-drop-queued") {
            // The negative control of tests/upgrade.rs: lose what was queued.
            for f in &mut rec.flows {
                f.pending.clear();
            }
        }
        self.shared.clients.fetch_sub(1, Ordering::Relaxed);
        if ip_counted {
            self.snap.admission.release_ip(client_ip);
        }
        self.stats.exported.add(1);
        let moved = Box::new(Moved {
            client: taken.client,
            backend,
            rec,
        });
        if let Some(tx) = &self.export {
            if let Err(back) = tx.send(Exported::Session {
                shard: self.id,
                moved,
            }) {
                // The main thread gave up on the hand-off: keep it.
                if let Exported::Session { moved, .. } = back.0 {
                    self.export = None;
                    self.import(vec![*moved]);
                }
            }
        }
    }

    /// See [`super::Command::AcceptPending`]. Bounded per call, so a flood
    /// cannot keep the shard here.
    pub(super) fn accept_pending(&mut self) {
        let socks: Vec<(usize, std::net::TcpListener)> = self
            .driver
            .listeners()
            .filter_map(|(i, l, _)| Some((i, l.try_clone().ok()?)))
            .collect();
        for (i, l) in socks {
            for _ in 0..1024 {
                match l.accept() {
                    Ok((s, _)) => {
                        if s.set_nonblocking(true).is_ok() {
                            // The listener's index: a TLS listener's
                            // connections start TLS.
                            self.new_conn(s.into(), i);
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }

    /// Says `Empty` once the shard holds no session that can move, while
    /// exporting. The scan stops at the first session that can still move
    /// (or is still in its handshake), so it is short until only sessions
    /// that stay are left.
    pub(super) fn report_empty(&mut self) {
        let mut staying = 0;
        let mut empty = true;
        for key in self.driver.keys() {
            match self.driver.get(key) {
                Some(s) if s.conn.stays_on_upgrade() => staying += 1,
                Some(_) => {
                    empty = false;
                    break;
                }
                None => {}
            }
        }
        if empty && !self.reported_empty {
            if let Some(tx) = &self.export {
                let _ = tx.send(Exported::Empty {
                    shard: self.id,
                    staying,
                });
            }
        }
        self.reported_empty = empty;
    }

    /// Rebuilds sessions from their records and re-arms them here.
    pub(super) fn import(&mut self, sessions: Vec<Moved>) {
        for m in sessions {
            let age = Duration::from_millis(m.rec.age_ms);
            let conn = match Conn::import(m.rec, self.snap.clone(), &mut self.actions) {
                Ok(c) => c,
                Err(e) => {
                    // Dropping the sockets closes the session: a record
                    // this process cannot read is a bug to see, not hide.
                    log::error!(
                        "shard {}: a handed-over session could not be rebuilt: {e}; closing it",
                        self.id
                    );
                    self.actions.clear();
                    continue;
                }
            };
            let key = self.driver.insert(
                m.client,
                Session {
                    conn,
                    started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                    // Its handshake was counted where it happened.
                    handshake: Some(Duration::ZERO),
                },
            );
            self.driver.attach_backend(key, m.backend);
            self.shared.clients.fetch_add(1, Ordering::Relaxed);
            self.stats.imported.add(1);
            self.exec(key);
            if self.export.is_some() {
                self.try_export(key);
            }
        }
    }
}
