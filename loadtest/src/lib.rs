//! ringlb-load: WebSocket load generator and echo backend, plus an HTTP/1.1
//! keep-alive GET load mode for static files.
//!
//! The echo backend can be embedded: `ringlb_load::echo::spawn(&addrs)` starts it
//! on its own threads and returns a handle with the bound addresses and counters.
//!
//! The WebSocket modes speak TLS too (`--tls` or `wss://`): see [`tls`] and
//! [`transport`].

pub mod args;
pub mod client;
pub mod codec;
pub mod echo;
pub mod http;
pub mod limits;
pub mod run;
pub mod stats;
pub mod tls;
pub mod transport;
