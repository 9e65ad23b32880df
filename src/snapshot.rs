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
        Arc::new(Snapshot {
            router: Router::new(&config.routes),
            upstreams: config.upstreams.iter().map(Upstream::new).collect(),
            config,
        })
    }
}
