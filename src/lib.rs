//! ringlb: a Linux-only WebSocket load balancer on io_uring.
//!
//! Layout: `config` (two-stage TOML), `http` (heads), `route`, `upstream`
//! (least connections), `conn` (the sans-IO connection state machine),
//! `shard` (one thread, one ring), `ring` (every SQE and every `unsafe`),
//! `server` (listeners and shard threads), `demo`.
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod conn;
pub mod demo;
pub mod files;
pub mod http;
pub mod ring;
pub mod route;
pub mod server;
pub mod shard;
pub mod snapshot;
pub mod stats;
pub mod upstream;
