//! ringlb-load: WebSocket load generator and echo backend.
//!
//! The echo backend can be embedded: `ringlb_load::echo::spawn(&addrs)` starts it
//! on its own threads and returns a handle with the bound addresses and counters.

pub mod args;
pub mod client;
pub mod codec;
pub mod echo;
pub mod limits;
pub mod run;
pub mod stats;
