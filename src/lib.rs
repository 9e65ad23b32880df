//! ringlb: a Linux-only WebSocket load balancer on io_uring.
//!
//! Layout: `config` (two-stage TOML), `http` (heads), `route`, `upstream`
//! (least connections), `conn` (the sans-IO connection state machine),
//! `shard` (one thread, one ring: loop, timers, commands), `driver` (owns
//! what the kernel borrows; completions to events), `ring` (every SQE; with
//! `driver`, the only `unsafe`),
//! `server` (listeners and shard threads), `pacing` (paced drain,
//! rebalance and shutdown budgets), `handoff` (live hand-off of listeners
//! and sessions to a new process on a binary upgrade), `demo`.
#![deny(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod config;
pub mod conn;
pub mod demo;
pub(crate) mod driver;
pub mod files;
pub mod handoff;
pub mod http;
pub mod pacing;
pub mod proxy_protocol;
pub mod resolver;
pub(crate) mod ring;
pub mod route;
pub mod server;
pub mod shard;
pub mod snapshot;
pub mod stats;
pub mod tls;
pub mod upstream;
