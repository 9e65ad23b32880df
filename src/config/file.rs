//! Stage one of the configuration: the file as written. Every struct
//! denies unknown fields, so a misspelt key is an error, never ignored;
//! values stay spanned, so errors can name their line and column.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

// ---------------------------------------------------------------------------
// Stage one: the file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) server: FileServer,
    pub(super) admin: Option<FileAdmin>,
    pub(super) log: Option<FileLog>,
    #[serde(default)]
    pub(super) route: Vec<FileRoute>,
    #[serde(default)]
    pub(super) upstream: BTreeMap<String, FileUpstream>,
    pub(super) tls: Option<Spanned<FileTls>>,
    pub(super) resolver: Option<FileResolver>,
}

/// `[tls]`: TLS termination (src/tls).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    pub(super) listen: Spanned<Vec<Spanned<String>>>,
    pub(super) certificates: Spanned<Vec<Spanned<FileCert>>>,
    pub(super) min_version: Option<Spanned<String>>,
    pub(super) alpn: Option<Vec<Spanned<String>>>,
    pub(super) session_tickets: Option<bool>,
    pub(super) ticket_rotation: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCert {
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileResolver {
    pub(super) nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) resolve_min_interval: Option<Spanned<String>>,
    pub(super) resolve_max_interval: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) max_addresses: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileServer {
    pub(super) listen: Spanned<Vec<Spanned<String>>>,
    pub(super) shards: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) handshake_timeout: Option<Spanned<String>>,
    pub(super) max_request_head: Option<Spanned<i64>>,
    pub(super) max_headers: Option<Spanned<i64>>,
    pub(super) tcp_keepalive: Option<Spanned<String>>,
    pub(super) buffer_size: Option<Spanned<i64>>,
    pub(super) buffers_per_shard: Option<Spanned<i64>>,
    pub(super) max_buffers_per_direction: Option<Spanned<i64>>,
    pub(super) linger_timeout: Option<Spanned<String>>,
    pub(super) drain_timeout: Option<Spanned<String>>,
    pub(super) backlog: Option<Spanned<i64>>,
    pub(super) keepalive_timeout: Option<Spanned<String>>,
    pub(super) send_timeout: Option<Spanned<String>>,
    pub(super) keepalive_requests: Option<Spanned<i64>>,
    pub(super) gzip_cache_size: Option<Spanned<i64>>,
    pub(super) splice_min: Option<Spanned<i64>>,
    pub(super) park_idle_after: Option<Spanned<String>>,
    pub(super) heap_trim_interval: Option<Spanned<String>>,
    pub(super) forwarded_for: Option<Spanned<String>>,
    pub(super) scheduling: Option<Spanned<String>>,
    pub(super) stalled_peer_timeout: Option<Spanned<String>>,
    pub(super) tcp_user_timeout: Option<Spanned<String>>,
    pub(super) max_handshakes_per_second: Option<Spanned<i64>>,
    pub(super) handshake_burst: Option<Spanned<i64>>,
    pub(super) retry_after_max: Option<Spanned<String>>,
    pub(super) max_connections_per_ip: Option<Spanned<i64>>,
    pub(super) proxy_protocol: Option<bool>,
    pub(super) trusted_proxies: Option<Vec<Spanned<String>>>,
    pub(super) pid_file: Option<Spanned<String>>,
    pub(super) upgrade_timeout: Option<Spanned<String>>,
    pub(super) close_boundary_timeout: Option<Spanned<String>>,
    pub(super) drain_close_rate: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    pub(super) listen: Spanned<String>,
    pub(super) token_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLog {
    pub(super) access: Option<Spanned<String>>,
    pub(super) level: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    pub(super) path: Spanned<String>,
    pub(super) upstream: Option<Spanned<String>>,
    #[serde(rename = "static")]
    pub(super) static_files: Option<Spanned<FileStatic>>,
    #[serde(default)]
    pub(super) strip_prefix: bool,
    #[serde(default)]
    pub(super) websocket_only: bool,
    pub(super) response_timeout: Option<Spanned<String>>,
    pub(super) gzip: Option<bool>,
    pub(super) gzip_types: Option<Vec<Spanned<String>>>,
    pub(super) gzip_min_length: Option<Spanned<i64>>,
    pub(super) allowed_origins: Option<Vec<Spanned<String>>>,
    pub(super) allow_missing_origin: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileStatic {
    pub(super) root: Spanned<String>,
    pub(super) index: Option<Spanned<String>>,
    pub(super) fallback: Option<Spanned<String>>,
    pub(super) precompressed: Option<bool>,
    pub(super) gzip: Option<bool>,
    pub(super) gzip_min_length: Option<Spanned<i64>>,
    pub(super) gzip_max_length: Option<Spanned<i64>>,
    pub(super) gzip_types: Option<Vec<Spanned<String>>>,
    pub(super) cache_control: Option<Spanned<String>>,
    pub(super) follow_symlinks: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstream {
    pub(super) balance: Option<Spanned<String>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) response_timeout: Option<Spanned<String>>,
    pub(super) max_response_head: Option<Spanned<i64>>,
    pub(super) max_fails: Option<Spanned<i64>>,
    pub(super) fail_timeout: Option<Spanned<String>>,
    pub(super) send_proxy_protocol: Option<Spanned<String>>,
    pub(super) rebalance: Option<FileRebalance>,
    pub(super) servers: Spanned<Vec<FileServerEntry>>,
    pub(super) tls: Option<Spanned<FileUpstreamTls>>,
}

/// `[upstream.X] tls = { server_name = "...", ca = "..." }`: wss:// backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstreamTls {
    pub(super) server_name: Spanned<String>,
    pub(super) ca: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRebalance {
    pub(super) threshold: Option<Spanned<f64>>,
    pub(super) rate: Spanned<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileServerEntry {
    /// `IP:port`, or `host:port` (resolved, see `names.rs`).
    pub(super) addr: Option<Spanned<String>>,
    pub(super) srv: Option<Spanned<String>>,
    pub(super) weight: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
}
