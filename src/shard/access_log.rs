//! The access log: one JSON line per answered request (static routes,
//! kept-alive connections) or per session at its end.

use std::io::Write;
use std::time::Duration;

use super::{Session, Shard};
use crate::conn::Side;

impl Shard {
    pub(super) fn log_request(&mut self, key: usize, done: &crate::conn::Done) {
        let Some(e) = self.driver.get(key) else {
            return;
        };
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "client": e.conn.client_addr.to_string(),
            "route": done.route.as_deref(),
            "path": done.path.as_deref(),
            "backend": null,
            "status": done.status,
            "handshake_ms": null,
            "duration_ms": ms(e.started.elapsed()),
            "bytes_from_client": done.bytes_from_client,
            "bytes_from_backend": done.bytes_to_client,
            "closed_by": null,
        });
        self.write_log(line);
    }

    pub(super) fn log_session(&mut self, e: &Session) {
        let c = &e.conn;
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "client": c.client_addr.to_string(),
            "route": c.route.as_deref(),
            "path": c.path.as_deref(),
            "backend": c.backend.map(|b| b.to_string()),
            "status": c.status,
            "handshake_ms": e.handshake.map(ms),
            "duration_ms": ms(e.started.elapsed()),
            "bytes_from_client": c.bytes_to(Side::Backend),
            "bytes_from_backend": c.bytes_to(Side::Client),
            "closed_by": crate::conn::Closer::name(c.closer),
            "close": match c.close_kind {
                None => None,
                Some(crate::conn::CloseKind::Message) => Some("message"),
                Some(crate::conn::CloseKind::Frame) => Some("frame"),
                Some(crate::conn::CloseKind::Fin) => Some("fin"),
            },
        });
        self.write_log(line);
    }

    fn write_log(&mut self, line: serde_json::Value) {
        if let Some(w) = &mut self.access_log {
            let mut text = line.to_string();
            text.push('\n');
            let _ = w.write_all(text.as_bytes());
            self.log_dirty = true;
        }
    }
}
