//! DNS discovery: the resolver thread.
//!
//! Backends given by name (`addr = "host:port"`, `srv = "_ws._tcp.name"`)
//! are resolved here, on one thread of its own with a current-thread tokio
//! runtime for hickory-resolver. A shard never resolves anything and never
//! waits for this thread: it sees the result only as a new snapshot, sent
//! like a reload (the main thread builds it, see `Server::poll_discovery`).
//!
//! Each name is in one of three states:
//!
//! ```text
//!   never resolved ──ok──► resolved(addrs) ──ok, same set──► resolved (no update)
//!        │  ▲                   │   ▲  └──ok, new set──► resolved(new) + update
//!      fail └─┘               fail  └──ok──┘
//!                               ▼
//!                         failing(last addrs kept)
//! ```
//!
//! - A successful answer is asked again when its TTL (the smallest in the
//!   answer, SRV targets' addresses included) runs out, clamped to
//!   `[resolve_min_interval, resolve_max_interval]`. hickory's cache is
//!   cleared before every lookup, so a clamp below the TTL really asks.
//! - A failure (timeout, SERVFAIL, refused, or an answer with no address:
//!   NXDOMAIN or an empty set) keeps the last addresses: a name that
//!   answered once is never emptied by DNS trouble. It is retried after
//!   `resolve_min_interval`, doubling per failure up to
//!   `resolve_max_interval`, counted per name and result, and logged at
//!   most once a minute per name (the first failure of a run at once).
//! - A name that never resolved adds no backend; `/status` shows it with
//!   its last error.
//!
//! Lookups run one after another: while one waits for a stalled
//! nameserver (at most `[resolver] timeout` per nameserver), the others
//! wait too, and the backends already known keep serving.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

use crate::config::{NameTarget, ResolverSettings};

/// Every name's current addresses, for names that resolved at least once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Discovered(pub BTreeMap<NameTarget, Vec<SocketAddr>>);

impl Discovered {
    pub fn get(&self, name: &NameTarget) -> &[SocketAddr] {
        self.0.get(name).map_or(&[], Vec::as_slice)
    }
}

/// How one lookup ended, as counted in `ringlb_dns_resolutions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// NXDOMAIN, or an answer without a usable address.
    Empty,
    /// Timeout, SERVFAIL, refused, a network error.
    Error,
}

pub const OUTCOMES: [(Outcome, &str); 3] = [
    (Outcome::Ok, "ok"),
    (Outcome::Empty, "empty"),
    (Outcome::Error, "error"),
];

/// What `/status` and `/metrics` show about one name.
#[derive(Debug, Clone, Default)]
pub struct NameStatus {
    /// The addresses in use (the last good answer), empty if none yet.
    pub addresses: Vec<SocketAddr>,
    pub resolved: bool,
    pub last_resolved: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    /// When it is asked next.
    pub next: Option<Instant>,
    /// Lookups by outcome, in the order of [`OUTCOMES`].
    pub lookups: [u64; 3],
}

/// Shared with the admin threads; written by the resolver thread only.
#[derive(Debug, Default)]
pub struct DnsState {
    names: Mutex<BTreeMap<NameTarget, NameStatus>>,
}

impl DnsState {
    pub fn names(&self) -> BTreeMap<NameTarget, NameStatus> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NameTarget, NameStatus>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum Msg {
    Watch(Vec<NameTarget>, ResolverSettings),
    Stop,
}

/// The main thread's handle on the resolver thread. Dropping it stops the
/// thread (after a lookup in progress, if any; it is not joined).
pub struct Discovery {
    tx: mpsc::Sender<Msg>,
    updates: mpsc::Receiver<Arc<Discovered>>,
    pub state: Arc<DnsState>,
}

impl Discovery {
    pub fn spawn(
        names: Vec<NameTarget>,
        settings: ResolverSettings,
        state: Arc<DnsState>,
    ) -> std::io::Result<Discovery> {
        let (tx, rx) = mpsc::channel();
        let (up_tx, updates) = mpsc::channel();
        let _ = tx.send(Msg::Watch(names, settings));
        let st = state.clone();
        std::thread::Builder::new()
            .name("ringlb-resolver".into())
            .spawn(move || run(rx, up_tx, st))?;
        Ok(Discovery { tx, updates, state })
    }

    /// After a reload: resolve these names (new ones at once), forget the
    /// others.
    pub fn watch(&self, names: Vec<NameTarget>, settings: ResolverSettings) {
        let _ = self.tx.send(Msg::Watch(names, settings));
    }

    /// The newest address sets, if they changed since the last call.
    pub fn try_recv(&self) -> Option<Arc<Discovered>> {
        let mut last = None;
        while let Ok(d) = self.updates.try_recv() {
            last = Some(d);
        }
        last
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

/// The resolver thread's view of one name.
struct Entry {
    due: Instant,
    /// Failures in a row; 0 after a success.
    failures: u32,
    addrs: Option<Vec<SocketAddr>>,
    /// Bounded failure logging: when the last line was written and how many
    /// failures went unlogged since.
    logged_at: Option<Instant>,
    unlogged: u64,
}

const LOG_EVERY: Duration = Duration::from_secs(60);

fn build(settings: &ResolverSettings) -> Result<TokioResolver, String> {
    let provider = TokioConnectionProvider::default();
    let mut builder = match &settings.nameservers {
        Some(list) => {
            let mut servers = Vec::new();
            for a in list {
                servers.push(NameServerConfig::new(*a, Protocol::Udp));
                // A truncated UDP answer (a large SRV set) is asked again over TCP.
                servers.push(NameServerConfig::new(*a, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], servers),
                provider,
            )
        }
        None => TokioResolver::builder(provider)
            .map_err(|e| format!("cannot read /etc/resolv.conf: {e}"))?,
    };
    let opts = builder.options_mut();
    opts.timeout = settings.timeout;
    opts.attempts = 1;
    // Every address is a backend, so ask for both families.
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.cache_size = 0;
    Ok(builder.build())
}

fn run(rx: mpsc::Receiver<Msg>, updates: mpsc::Sender<Arc<Discovered>>, state: Arc<DnsState>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!(
                "dns: cannot start the resolver thread's runtime: {e}; names will not resolve"
            );
            return;
        }
    };
    let mut settings: Option<ResolverSettings> = None;
    let mut resolver: Result<TokioResolver, String> = Err("not configured".into());
    let mut names: BTreeMap<NameTarget, Entry> = BTreeMap::new();
    let mut published = Discovered::default();
    loop {
        let now = Instant::now();
        let wait = names
            .values()
            .map(|e| e.due.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(wait) {
            Ok(Msg::Watch(list, s)) => {
                if settings.as_ref() != Some(&s) {
                    // The runtime must be entered for hickory to bind its sockets.
                    let _guard = rt.enter();
                    resolver = build(&s);
                    settings = Some(s);
                }
                names.retain(|n, _| list.contains(n));
                state.lock().retain(|n, _| list.contains(n));
                for n in list {
                    names.entry(n.clone()).or_insert_with(|| Entry {
                        due: Instant::now(),
                        failures: 0,
                        addrs: None,
                        logged_at: None,
                        unlogged: 0,
                    });
                    state.lock().entry(n).or_default();
                }
                continue;
            }
            Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let Some(s) = settings.as_ref() else { continue };
        let due: Vec<NameTarget> = names
            .iter()
            .filter(|(_, e)| e.due <= Instant::now())
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let res = match &resolver {
                Ok(r) => rt.block_on(lookup(r, &name, s)),
                Err(e) => Err((Outcome::Error, e.clone())),
            };
            let Some(e) = names.get_mut(&name) else {
                continue;
            };
            record(&name, e, res, s, &state);
        }
        let now_set = Discovered(
            names
                .iter()
                .filter_map(|(n, e)| Some((n.clone(), e.addrs.clone()?)))
                .collect(),
        );
        if now_set != published {
            published = now_set.clone();
            if updates.send(Arc::new(now_set)).is_err() {
                return;
            }
        }
    }
}

/// Books one lookup's result: the entry's next time and addresses, the
/// shared status, a log line when it says something new.
fn record(
    name: &NameTarget,
    e: &mut Entry,
    res: Result<Found, (Outcome, String)>,
    s: &ResolverSettings,
    state: &DnsState,
) {
    let now = Instant::now();
    let mut st = state.lock();
    let st = st.entry(name.clone()).or_default();
    match res {
        Ok(Found {
            addrs,
            until: valid_until,
            total,
        }) => {
            st.lookups[0] += 1;
            let ttl = valid_until.saturating_duration_since(now);
            e.due = now + ttl.clamp(s.min_interval, s.max_interval);
            if e.failures > 0 {
                log::info!(
                    "dns: {name} resolves again after {} failed lookups",
                    e.failures
                );
            }
            e.failures = 0;
            e.logged_at = None;
            e.unlogged = 0;
            if e.addrs.as_ref() != Some(&addrs) {
                let old = e.addrs.as_deref().unwrap_or(&[]);
                let added: Vec<String> = addrs
                    .iter()
                    .filter(|a| !old.contains(a))
                    .map(ToString::to_string)
                    .collect();
                let gone: Vec<String> = old
                    .iter()
                    .filter(|a| !addrs.contains(a))
                    .map(ToString::to_string)
                    .collect();
                log::info!(
                    "dns: {name} now resolves to {} addresses (added [{}], gone [{}]; asked again in {:?})",
                    addrs.len(),
                    added.join(", "),
                    gone.join(", "),
                    e.due - now
                );
                if total > addrs.len() {
                    log::warn!(
                        "dns: {name} gives {total} addresses; only the first {} are backends (resolver.max_addresses)",
                        addrs.len()
                    );
                }
            }
            st.addresses = addrs.clone();
            st.resolved = true;
            st.last_resolved = Some(SystemTime::now());
            e.addrs = Some(addrs);
        }
        Err((outcome, why)) => {
            st.lookups[if outcome == Outcome::Empty { 1 } else { 2 }] += 1;
            e.failures += 1;
            let backoff = s
                .min_interval
                .saturating_mul(1 << (e.failures - 1).min(20))
                .min(s.max_interval);
            e.due = now + backoff;
            let keeping = match &e.addrs {
                Some(a) => format!("keeping its last {} addresses", a.len()),
                None => "it has never resolved, so it adds no backend".into(),
            };
            if e.logged_at
                .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
            {
                let more = match e.unlogged {
                    0 => String::new(),
                    n => format!(" ({n} more failures since the last line)"),
                };
                log::warn!(
                    "dns: lookup of {name} failed: {why}; {keeping}; next try in {backoff:?}{more}"
                );
                e.logged_at = Some(now);
                e.unlogged = 0;
            } else {
                e.unlogged += 1;
            }
            st.last_error = Some(why);
            st.last_error_at = Some(SystemTime::now());
        }
    }
    st.next = Some(e.due);
}

fn classify(e: &hickory_resolver::ResolveError) -> (Outcome, String) {
    use hickory_resolver::proto::op::ResponseCode;
    use hickory_resolver::proto::ProtoErrorKind;
    // hickory reports SERVFAIL and REFUSED as "no records found" too; only
    // NXDOMAIN and an empty NOERROR are answers that say "no address".
    if let Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) = e.proto().map(|p| p.kind())
    {
        return match *response_code {
            ResponseCode::NXDomain => (Outcome::Empty, "NXDOMAIN".into()),
            ResponseCode::NoError => (Outcome::Empty, "no address in the answer".into()),
            code => (Outcome::Error, format!("the nameserver answered {code}")),
        };
    }
    (Outcome::Error, e.to_string())
}

/// One name's addresses and how long they are good for.
async fn lookup(
    r: &TokioResolver,
    name: &NameTarget,
    s: &ResolverSettings,
) -> Result<Found, (Outcome, String)> {
    // hickory bounds each query by `timeout`; this bounds the whole lookup
    // (an SRV set with many targets, several nameservers) in case it does not.
    let servers = s.nameservers.as_ref().map_or(3, Vec::len) as u32;
    let limit = s.timeout.saturating_mul(4 * servers.max(1)) + Duration::from_secs(1);
    r.clear_cache();
    let res = tokio::time::timeout(limit, lookup_inner(r, name)).await;
    let (mut addrs, until) = match res {
        Err(_) => return Err((Outcome::Error, format!("no answer within {limit:?}"))),
        Ok(r) => r?,
    };
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err((Outcome::Empty, "the answer has no address".into()));
    }
    // Every address is a backend that each pick looks at: a runaway answer
    // (a misconfigured zone, a hostile nameserver) must not make thousands.
    // `record` says so when the set changes.
    let total = addrs.len();
    addrs.truncate(s.max_addresses);
    Ok(Found {
        addrs,
        until,
        total,
    })
}

/// A successful lookup.
#[derive(Debug)]
struct Found {
    /// Sorted, at most `max_addresses`.
    addrs: Vec<SocketAddr>,
    /// When the answer's smallest TTL runs out.
    until: Instant,
    /// Addresses in the answer, before `max_addresses`.
    total: usize,
}

async fn lookup_inner(
    r: &TokioResolver,
    name: &NameTarget,
) -> Result<(Vec<SocketAddr>, Instant), (Outcome, String)> {
    match name {
        NameTarget::Host { host, port } => {
            let ips = r.lookup_ip(host.as_str()).await.map_err(|e| classify(&e))?;
            let until = ips.valid_until();
            Ok((
                ips.iter().map(|ip| SocketAddr::new(ip, *port)).collect(),
                until,
            ))
        }
        NameTarget::Srv(srv) => {
            let records = r.srv_lookup(srv.as_str()).await.map_err(|e| classify(&e))?;
            let mut until = records.as_lookup().valid_until();
            // Only the lowest priority is used: higher ones are fallbacks
            // (RFC 2782), and a least-connections pick has no order to put
            // them in. A target of "." says the service is not offered.
            let lowest = records.iter().map(|r| r.priority()).min();
            let mut addrs = Vec::new();
            let mut errors = Vec::new();
            for rec in records.iter().filter(|r| Some(r.priority()) == lowest) {
                if rec.target().is_root() {
                    continue;
                }
                match r.lookup_ip(rec.target().clone()).await {
                    Ok(ips) => {
                        until = until.min(ips.valid_until());
                        addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, rec.port())));
                    }
                    Err(e) => errors.push(format!("{}: {e}", rec.target())),
                }
            }
            // Some targets without an address is a partial answer worth
            // using; none at all is a failure like any other.
            if addrs.is_empty() && !errors.is_empty() {
                return Err((Outcome::Error, errors.join("; ")));
            }
            Ok((addrs, until))
        }
    }
}

/// `ringlb_dns_resolutions_total` and `ringlb_dns_addresses`.
pub fn write_metrics(state: &DnsState, out: &mut String) {
    use std::fmt::Write;
    let names = state.names();
    let _ = writeln!(out, "# HELP ringlb_dns_resolutions_total DNS lookups of backend names, by result (ok; empty: NXDOMAIN or no address; error: timeout, SERVFAIL, refused). A failed lookup keeps the last addresses.\n# TYPE ringlb_dns_resolutions_total counter");
    for (name, st) in &names {
        for (i, (_, result)) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringlb_dns_resolutions_total{{name=\"{name}\",result=\"{result}\"}} {}",
                st.lookups[i]
            );
        }
    }
    let _ = writeln!(out, "# HELP ringlb_dns_addresses Addresses a backend name currently contributes (0: never resolved).\n# TYPE ringlb_dns_addresses gauge");
    for (name, st) in &names {
        let _ = writeln!(
            out,
            "ringlb_dns_addresses{{name=\"{name}\"}} {}",
            st.addresses.len()
        );
    }
}

/// `/status`: the names one upstream's servers are given by.
pub fn status_json(state: &DnsState, named: &[crate::config::NamedServer]) -> serde_json::Value {
    let names = state.names();
    let now = Instant::now();
    let rfc = |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_seconds(t).to_string());
    named
        .iter()
        .map(|n| {
            let st = names.get(&n.target).cloned().unwrap_or_default();
            let (name, kind) = match &n.target {
                NameTarget::Host { host, port } => (format!("{host}:{port}"), "host"),
                NameTarget::Srv(s) => (s.clone(), "srv"),
            };
            serde_json::json!({
                "name": name,
                "kind": kind,
                "resolved": st.resolved,
                "addresses": st.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "last_resolved": rfc(st.last_resolved),
                "last_error": st.last_error,
                "last_error_at": rfc(st.last_error_at),
                "next_lookup_in_seconds": st.next.map(|t| t.saturating_duration_since(now).as_secs_f64()),
                "lookups": {
                    "ok": st.lookups[0],
                    "empty": st.lookups[1],
                    "error": st.lookups[2],
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::snapshot::Snapshot;
    use crate::upstream::Rng;

    fn target() -> NameTarget {
        NameTarget::Host {
            host: "pods.test".into(),
            port: 9000,
        }
    }

    fn entry() -> Entry {
        Entry {
            due: Instant::now(),
            failures: 0,
            addrs: None,
            logged_at: None,
            unlogged: 0,
        }
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ttl_is_clamped_and_failures_back_off_keeping_the_set() {
        let s = ResolverSettings {
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(10),
            ..ResolverSettings::default()
        };
        let state = DnsState::default();
        let mut e = entry();
        let t0 = Instant::now();
        let set = vec![a("127.0.0.1:9000")];
        for (ttl, want) in [(3600, 10), (0, 1), (4, 4)] {
            let until = Instant::now() + Duration::from_secs(ttl);
            let found = Found {
                addrs: set.clone(),
                until,
                total: 1,
            };
            record(&target(), &mut e, Ok(found), &s, &state);
            let d = e.due.saturating_duration_since(t0).as_secs_f64();
            assert!((d - want as f64).abs() < 0.5, "ttl {ttl}: due in {d}");
        }
        // Failures: 1 s, 2 s, 4 s, 8 s, then the ceiling; the set stays.
        for want in [1, 2, 4, 8, 10, 10] {
            let t = Instant::now();
            record(
                &target(),
                &mut e,
                Err((Outcome::Error, "x".into())),
                &s,
                &state,
            );
            let d = e.due.saturating_duration_since(t).as_secs_f64();
            assert!((d - want as f64).abs() < 0.5, "due in {d}, want {want}");
            assert_eq!(e.addrs.as_deref(), Some(&set[..]));
        }
        record(
            &target(),
            &mut e,
            Err((Outcome::Empty, "nx".into())),
            &s,
            &state,
        );
        let st = state.names()[&target()].clone();
        assert_eq!(st.lookups, [3, 1, 6]);
        assert_eq!(st.addresses, set);
        assert!(st.resolved);
        assert_eq!(st.last_error.as_deref(), Some("nx"));
        // Logged once for the whole run of failures (bounded rate).
        assert_eq!(e.unlogged, 6);
    }

    #[test]
    fn a_new_set_keeps_states_and_retires_gone_addresses() {
        let cfg = Config::parse(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nservers = [{ addr = \"127.0.0.1:8000\" }, { addr = \"pods.test:9000\", weight = 2, max_connections = 7 }, { addr = \"again.test:9000\" }]\n",
            "t",
        )
        .unwrap();
        let s0 = Snapshot::new(cfg);
        assert_eq!(
            s0.upstreams[0].backends.len(),
            1,
            "names add nothing until resolved"
        );
        let mut d = Discovered::default();
        d.0.insert(target(), vec![a("127.0.0.1:9000"), a("127.0.0.2:9000")]);
        // Another name giving an address already present adds no second backend.
        d.0.insert(
            NameTarget::Host {
                host: "again.test".into(),
                port: 9000,
            },
            vec![a("127.0.0.2:9000")],
        );
        let s1 = Snapshot::rediscovered(&s0, Arc::new(d));
        let u = &s1.upstreams[0];
        let addrs: Vec<SocketAddr> = u.backends.iter().map(|b| b.addr).collect();
        assert_eq!(
            addrs,
            [
                a("127.0.0.1:8000"),
                a("127.0.0.1:9000"),
                a("127.0.0.2:9000")
            ]
        );
        assert_eq!(u.backends[1].weight, 2);
        assert_eq!(u.backends[1].max_connections, Some(7));
        let changes = crate::server::backend_changes(&s0, &s1);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].added, [a("127.0.0.1:9000"), a("127.0.0.2:9000")]);
        assert!(changes[0].removed.is_empty());

        // A session on .1; then .1 leaves the answer and .3 joins.
        let mut rng = Rng::new(1);
        let lease = u.lease_on(a("127.0.0.1:9000")).unwrap();
        let kept = u.backends[2].state.clone();
        let mut d = Discovered::default();
        d.0.insert(target(), vec![a("127.0.0.2:9000"), a("127.0.0.3:9000")]);
        let s2 = Snapshot::rediscovered(&s1, Arc::new(d));
        let u2 = &s2.upstreams[0];
        assert!(
            Arc::ptr_eq(&u2.backends[1].state, &kept),
            "an address that stays keeps its state"
        );
        assert_eq!(s2.retired_in("u"), [(a("127.0.0.1:9000"), 1)]);
        for _ in 0..6 {
            let (i, _l) = u2.pick(&[], &mut rng).unwrap();
            assert_ne!(
                u2.backends[i].addr,
                a("127.0.0.1:9000"),
                "a gone address takes no new session"
            );
        }
        let changes = crate::server::backend_changes(&s1, &s2);
        assert_eq!(changes[0].added, [a("127.0.0.3:9000")]);
        assert_eq!(changes[0].removed, [a("127.0.0.1:9000")]);
        // Its last session ends: it is forgotten at the next change.
        drop(lease);
        let s3 = Snapshot::rediscovered(&s2, s2.discovered.clone());
        assert!(s3.retired_in("u").is_empty());
        // A reload keeps the last sets until DNS answers again.
        let s4 = Snapshot::reload(s3.config.clone(), Some(&s3));
        assert_eq!(s4.upstreams[0].backends.len(), 3);
    }
}
