//! Run results: merging across threads and processes, JSON, table, histogram CSV.

use crate::client::ErrKind;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Histograms hold nanoseconds, up to one hour, at 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = (d.as_nanos() as u64).clamp(1, h.high());
    h.record(ns).expect("value clamped into range");
}

#[derive(Clone)]
pub struct Results {
    pub latency: Histogram<u64>,
    pub hs_latency: Histogram<u64>,
    pub messages: u64,
    pub bytes: u64,
    pub handshakes: u64,
    pub requested: u64,
    pub opened: u64,
    pub failed: u64,
    pub alive: u64,
    pub errors: [u64; ErrKind::ALL.len()],
    pub elapsed: Duration,
    /// `http` mode only (below): responses by status code.
    pub status: BTreeMap<u16, u64>,
    /// New connections made because the server closed one.
    pub reconnects: u64,
    /// Server closes announced with `Connection: close` (or HTTP/1.0, or a
    /// body delimited by the close).
    pub closes_announced: u64,
    /// Server closes of a kept-alive connection without notice (EOF or reset
    /// before any byte of the next response); the request was sent again.
    pub closes_unannounced: u64,
    /// The run spoke TLS (the `tls` object is in the JSON).
    pub tls: bool,
    /// Completed TLS handshakes that were full (no session resumed).
    pub tls_full: u64,
    /// Completed TLS handshakes that resumed a session.
    pub tls_resumed: u64,
    /// Completed TLS handshakes by `version cipher-suite key-exchange-group`.
    pub tls_negotiated: BTreeMap<String, u64>,
}

impl Default for Results {
    fn default() -> Self {
        Results {
            latency: new_hist(),
            hs_latency: new_hist(),
            messages: 0,
            bytes: 0,
            handshakes: 0,
            requested: 0,
            opened: 0,
            failed: 0,
            alive: 0,
            errors: [0; ErrKind::ALL.len()],
            elapsed: Duration::ZERO,
            status: BTreeMap::new(),
            reconnects: 0,
            closes_announced: 0,
            closes_unannounced: 0,
            tls: false,
            tls_full: 0,
            tls_resumed: 0,
            tls_negotiated: BTreeMap::new(),
        }
    }
}

impl Results {
    pub fn merge(&mut self, o: &Results) {
        self.latency.add(&o.latency).expect("same bounds");
        self.hs_latency.add(&o.hs_latency).expect("same bounds");
        self.messages += o.messages;
        self.bytes += o.bytes;
        self.handshakes += o.handshakes;
        self.requested += o.requested;
        self.opened += o.opened;
        self.failed += o.failed;
        self.alive += o.alive;
        for (a, b) in self.errors.iter_mut().zip(o.errors.iter()) {
            *a += b;
        }
        self.elapsed = self.elapsed.max(o.elapsed);
        for (code, n) in &o.status {
            *self.status.entry(*code).or_insert(0) += n;
        }
        self.reconnects += o.reconnects;
        self.closes_announced += o.closes_announced;
        self.closes_unannounced += o.closes_unannounced;
        self.tls |= o.tls;
        self.tls_full += o.tls_full;
        self.tls_resumed += o.tls_resumed;
        for (k, n) in &o.tls_negotiated {
            *self.tls_negotiated.entry(k.clone()).or_insert(0) += n;
        }
    }

    /// Counts one completed TLS handshake.
    pub fn record_tls(&mut self, info: &crate::tls::HandshakeInfo) {
        if info.resumed {
            self.tls_resumed += 1;
        } else {
            self.tls_full += 1;
        }
        *self
            .tls_negotiated
            .entry(info.negotiated.clone())
            .or_insert(0) += 1;
    }

    pub fn error_total(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// The raw histogram as (value, count) pairs, so a parent process can merge
    /// children's distributions exactly rather than averaging percentiles.
    fn hist_raw(h: &Histogram<u64>) -> Value {
        Value::Array(
            h.iter_recorded()
                .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
                .collect(),
        )
    }

    fn hist_from_raw(v: &Value) -> anyhow::Result<Histogram<u64>> {
        let mut h = new_hist();
        for pair in v
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("hist_raw not an array"))?
        {
            let value = pair[0]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("bad hist value"))?;
            let count = pair[1]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("bad hist count"))?;
            h.record_n(value.clamp(1, h.high()), count)?;
        }
        Ok(h)
    }

    /// Rebuilds results from a child's JSON object (see `to_json`).
    pub fn from_json(v: &Value) -> anyhow::Result<Results> {
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        let c = &v["connections"];
        let mut errors = [0; ErrKind::ALL.len()];
        if let Some(map) = v["errors"].as_object() {
            for (k, n) in map {
                let kind = ErrKind::from_name(k)
                    .ok_or_else(|| anyhow::anyhow!("unknown error kind {k}"))?;
                errors[kind.index()] += n.as_u64().unwrap_or(0);
            }
        }
        let mut status = BTreeMap::new();
        if let Some(map) = v["status_codes"].as_object() {
            for (k, n) in map {
                let code: u16 = k
                    .parse()
                    .map_err(|_| anyhow::anyhow!("bad status code {k}"))?;
                status.insert(code, n.as_u64().unwrap_or(0));
            }
        }
        let closes = &v["server_closes"];
        let tls = &v["tls"];
        let mut tls_negotiated = BTreeMap::new();
        if let Some(map) = tls["negotiated"].as_object() {
            for (k, n) in map {
                tls_negotiated.insert(k.clone(), n.as_u64().unwrap_or(0));
            }
        }
        Ok(Results {
            latency: Self::hist_from_raw(&v["latency_hist_raw"])?,
            hs_latency: Self::hist_from_raw(&v["handshake_hist_raw"])?,
            messages: u("messages"),
            bytes: u("bytes"),
            handshakes: u("handshakes"),
            requested: c["requested"].as_u64().unwrap_or(0),
            opened: c["opened"].as_u64().unwrap_or(0),
            failed: c["failed"].as_u64().unwrap_or(0),
            alive: c["alive"].as_u64().unwrap_or(0),
            errors,
            elapsed: Duration::from_secs_f64(v["elapsed_s"].as_f64().unwrap_or(0.0)),
            status,
            reconnects: u("reconnects"),
            closes_announced: closes["announced"].as_u64().unwrap_or(0),
            closes_unannounced: closes["unannounced"].as_u64().unwrap_or(0),
            tls: tls.is_object(),
            tls_full: tls["full"].as_u64().unwrap_or(0),
            tls_resumed: tls["resumed"].as_u64().unwrap_or(0),
            tls_negotiated,
        })
    }

    pub fn to_json(&self, mode: &str, params: Value, cpu: (f64, f64), raw: bool) -> Value {
        let secs = self.elapsed.as_secs_f64();
        let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let mut errors = serde_json::Map::new();
        for k in ErrKind::ALL {
            errors.insert(k.name().to_string(), json!(self.errors[k.index()]));
        }
        let mut v = json!({
            "tool": "ringlb-load",
            "version": env!("CARGO_PKG_VERSION"),
            "mode": mode,
            "params": params,
            "elapsed_s": secs,
            "messages": self.messages,
            "msgs_per_s": per_s(self.messages),
            "bytes": self.bytes,
            "mb_per_s": per_s(self.bytes) / 1e6,
            "latency_us": lat_json(&self.latency),
            "handshakes": self.handshakes,
            "handshakes_per_s": per_s(self.handshakes),
            "handshake_latency_us": if self.hs_latency.is_empty() { Value::Null } else { lat_json(&self.hs_latency) },
            "connections": {
                "requested": self.requested,
                "opened": self.opened,
                "failed": self.failed,
                "alive": self.alive,
            },
            "errors": errors,
            "error_total": self.error_total(),
            "cpu_s": { "user": cpu.0, "sys": cpu.1 },
            "tls": Value::Null,
        });
        if self.tls {
            let hs = self.tls_full + self.tls_resumed;
            v["tls"] = json!({
                "handshakes": hs,
                "handshakes_per_s": per_s(hs),
                "full": self.tls_full,
                "resumed": self.tls_resumed,
                "negotiated": self.tls_negotiated,
            });
        }
        if mode == "http" {
            let codes: serde_json::Map<String, Value> = self
                .status
                .iter()
                .map(|(c, n)| (c.to_string(), json!(n)))
                .collect();
            v["requests"] = json!(self.messages);
            v["requests_per_s"] = json!(per_s(self.messages));
            v["status_codes"] = Value::Object(codes);
            v["reconnects"] = json!(self.reconnects);
            v["server_closes"] = json!({
                "announced": self.closes_announced,
                "unannounced": self.closes_unannounced,
            });
        }
        if raw {
            v["latency_hist_raw"] = Self::hist_raw(&self.latency);
            v["handshake_hist_raw"] = Self::hist_raw(&self.hs_latency);
        }
        v
    }

    pub fn table(&self, mode: &str, cpu: (f64, f64)) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "ringlb-load {mode}: {:.2} s measured",
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "  connections  requested {}  opened {}  failed {}  alive {}",
            self.requested, self.opened, self.failed, self.alive
        );
        if mode == "http" {
            let codes: Vec<String> = self
                .status
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect();
            let _ = writeln!(
                s,
                "  requests     {}  ({:.0} req/s)   body bytes {}  ({:.2} MB/s)",
                self.messages,
                self.messages as f64 / secs,
                self.bytes,
                self.bytes as f64 / secs / 1e6
            );
            let _ =
                writeln!(
                s,
                "  status       {}   reconnects {}  (server closes: announced {}, unannounced {})",
                if codes.is_empty() { "-".to_string() } else { codes.join(" ") },
                self.reconnects,
                self.closes_announced,
                self.closes_unannounced
            );
        } else if self.messages > 0 || mode != "handshake" {
            let _ = writeln!(
                s,
                "  messages     {}  ({:.0} msg/s)   payload bytes {}  ({:.2} MB/s)",
                self.messages,
                self.messages as f64 / secs,
                self.bytes,
                self.bytes as f64 / secs / 1e6
            );
        }
        let _ = writeln!(
            s,
            "  {}   {}  ({:.0} /s)",
            if mode == "http" {
                "connects  "
            } else {
                "handshakes"
            },
            self.handshakes,
            self.handshakes as f64 / secs
        );
        if self.tls {
            let _ = writeln!(
                s,
                "  tls          full {}  resumed {}   {}",
                self.tls_full,
                self.tls_resumed,
                self.tls_negotiated
                    .iter()
                    .map(|(k, n)| format!("{k}={n}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            );
        }
        let _ = writeln!(
            s,
            "  {:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency us", "count", "mean", "p50", "p90", "p99", "p99.9", "max"
        );
        let names = if mode == "http" {
            ["request", "connect"]
        } else {
            ["round trip", "handshake"]
        };
        for (name, h) in [(names[0], &self.latency), (names[1], &self.hs_latency)] {
            if h.is_empty() {
                continue;
            }
            let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
            let _ = writeln!(
                s,
                "  {:<12} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name,
                h.len(),
                h.mean() / 1e3,
                us(0.5),
                us(0.9),
                us(0.99),
                us(0.999),
                h.max() as f64 / 1e3
            );
        }
        let total = self.error_total();
        let _ = write!(s, "  errors       {total}");
        for k in ErrKind::ALL {
            let n = self.errors[k.index()];
            if n > 0 {
                let _ = write!(s, "  {}={}", k.name(), n);
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "  cpu          user {:.2} s  sys {:.2} s", cpu.0, cpu.1);
        s
    }

    /// Full percentile distribution of round-trip (and handshake) latency as CSV.
    pub fn hist_csv(&self) -> String {
        let mut s = String::from("kind,percentile,latency_us,count_at_or_below\n");
        for (name, h) in [
            ("roundtrip", &self.latency),
            ("handshake", &self.hs_latency),
        ] {
            if h.is_empty() {
                continue;
            }
            for v in h.iter_quantiles(5) {
                let _ = writeln!(
                    s,
                    "{name},{:.6},{:.3},{}",
                    v.quantile_iterated_to() * 100.0,
                    v.value_iterated_to() as f64 / 1e3,
                    v.count_since_last_iteration()
                );
            }
        }
        s
    }
}

fn lat_json(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    json!({
        "count": h.len(),
        "mean": if h.is_empty() { 0.0 } else { h.mean() / 1e3 },
        "p50": us(0.5),
        "p90": us(0.9),
        "p99": us(0.99),
        "p999": us(0.999),
        "max": h.max() as f64 / 1e3,
    })
}

/// The tool's own CPU time (user, sys) in seconds, including waited-for children.
pub fn cpu_times() -> (f64, f64) {
    use nix::sys::resource::{getrusage, UsageWho};
    let mut user = 0.0;
    let mut sys = 0.0;
    for who in [UsageWho::RUSAGE_SELF, UsageWho::RUSAGE_CHILDREN] {
        if let Ok(u) = getrusage(who) {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            user += tv(u.user_time());
            sys += tv(u.system_time());
        }
    }
    (user, sys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_roundtrip_merges_exactly() {
        let mut a = Results::default();
        for us in 1..=1000u64 {
            record(&mut a.latency, Duration::from_micros(us));
        }
        a.messages = 1000;
        a.errors[ErrKind::Timeout.index()] = 2;
        a.elapsed = Duration::from_secs(2);
        let v = a.to_json("pingpong", json!({}), (0.0, 0.0), true);
        let b = Results::from_json(&v).unwrap();
        assert_eq!(b.latency.len(), 1000);
        assert_eq!(
            b.latency.value_at_quantile(0.99),
            a.latency.value_at_quantile(0.99)
        );
        assert_eq!(b.errors[ErrKind::Timeout.index()], 2);
        assert_eq!(v["msgs_per_s"].as_f64().unwrap(), 500.0);
        assert_eq!(v["error_total"].as_u64().unwrap(), 2);
        assert!(v["tls"].is_null());
        assert!(!b.tls);

        let mut t = Results {
            tls: true,
            ..Default::default()
        };
        let info = |resumed| crate::tls::HandshakeInfo {
            resumed,
            negotiated: "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519".into(),
        };
        t.record_tls(&info(false));
        t.record_tls(&info(true));
        t.record_tls(&info(true));
        let v = t.to_json("handshake", json!({}), (0.0, 0.0), true);
        let mut m = Results::from_json(&v).unwrap();
        m.merge(&t);
        assert!(m.tls);
        assert_eq!((m.tls_full, m.tls_resumed), (2, 4));
        assert_eq!(
            m.tls_negotiated["TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519"],
            6
        );
    }
}
