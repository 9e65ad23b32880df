//! What a shard needs from the configuration, built once per load and shared
//! read-only by every shard behind an `Arc`.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::resolver::Discovered;
use crate::route::Router;
use crate::upstream::{BackendState, Upstream};

#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub router: Router,
    pub upstreams: Vec<Upstream>,
    /// Backends a reload removed that still have live sessions, by upstream
    /// name and address. If a later reload brings one back, it gets its old
    /// state, so its live count still includes those sessions.
    retired: Vec<(String, SocketAddr, Arc<BackendState>)>,
    /// Admission state (upgrade budget, per-address counts): one for the
    /// life of the process, carried from snapshot to snapshot.
    pub admission: Arc<crate::admission::Admission>,
    /// The addresses DNS gave the configured names, as last heard from the
    /// resolver thread; a reload keeps them until the next answer.
    pub discovered: Arc<Discovered>,
}

impl Snapshot {
    pub fn new(config: Config) -> Arc<Snapshot> {
        Snapshot::reload(config, None)
    }

    /// A snapshot for `config` in which every backend ringlb already knows
    /// (same upstream name and address, current or retired) keeps its live
    /// count, totals and health.
    pub fn reload(config: Config, previous: Option<&Snapshot>) -> Arc<Snapshot> {
        let discovered = previous.map_or_else(Arc::default, |p| p.discovered.clone());
        Snapshot::build(config, previous, discovered)
    }

    /// The running configuration with new address sets from DNS: backends
    /// that stay keep their state, new ones join the pick, gone ones are
    /// retired (no new sessions; live ones keep relaying on their lease).
    pub fn rediscovered(previous: &Snapshot, discovered: Arc<Discovered>) -> Arc<Snapshot> {
        Snapshot::build(previous.config.clone(), Some(previous), discovered)
    }

    fn build(
        config: Config,
        previous: Option<&Snapshot>,
        discovered: Arc<Discovered>,
    ) -> Arc<Snapshot> {
        let mut known: Vec<(String, SocketAddr, Arc<BackendState>)> = Vec::new();
        if let Some(p) = previous {
            for u in &p.upstreams {
                for b in &u.backends {
                    known.push((u.name.clone(), b.addr, b.state.clone()));
                }
            }
            known.extend(p.retired.iter().cloned());
        }
        let upstreams: Vec<Upstream> = config
            .upstreams
            .iter()
            .map(|u| {
                let known = |addr| {
                    known
                        .iter()
                        .find(|(n, a, _)| *n == u.name && *a == addr)
                        .map(|(_, _, s)| s.clone())
                };
                let mut up = Upstream::new(u, &known);
                up.add_named(u, &discovered, &known);
                // A rebalance under way goes on across the reload.
                if let Some(p) =
                    previous.and_then(|p| p.upstreams.iter().find(|o| o.name == u.name))
                {
                    up.state = p.state.clone();
                }
                up
            })
            .collect();
        let in_use = |name: &str, addr: SocketAddr| {
            upstreams
                .iter()
                .any(|u| u.name == name && u.backends.iter().any(|b| b.addr == addr))
        };
        let retired = known
            .into_iter()
            .filter(|(n, a, s)| !in_use(n, *a) && s.active() > 0)
            .collect();
        Arc::new(Snapshot {
            router: Router::new(&config.routes),
            upstreams,
            config,
            retired,
            admission: previous.map_or_else(Arc::default, |p| p.admission.clone()),
            discovered,
        })
    }

    /// Backends of this upstream that left the configuration (a reload, or
    /// DNS) while sessions still use them: (address, live sessions).
    pub fn retired_in(&self, upstream: &str) -> Vec<(SocketAddr, usize)> {
        self.retired
            .iter()
            .filter(|(n, _, s)| n == upstream && s.active() > 0)
            .map(|(_, a, s)| (*a, s.active()))
            .collect()
    }
}
