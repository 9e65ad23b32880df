//! What a shard needs from the configuration, built once per load and shared
//! read-only by every shard behind an `Arc`.

use std::sync::Arc;

use crate::config::Config;
use crate::route::Router;
use crate::upstream::Upstream;

#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub router: Router,
    pub upstreams: Vec<Upstream>,
}

impl Snapshot {
    pub fn new(config: Config) -> Arc<Snapshot> {
        Snapshot::reload(config, None)
    }

    /// A snapshot for `config` in which backends that `previous` had (same
    /// upstream name and address) keep their live counts and health.
    pub fn reload(config: Config, previous: Option<&Snapshot>) -> Arc<Snapshot> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                let old = previous.and_then(|p| p.upstreams.iter().find(|o| o.name == u.name));
                Upstream::new(u, old)
            })
            .collect();
        Arc::new(Snapshot {
            router: Router::new(&config.routes),
            upstreams,
            config,
        })
    }
}
