//! Configuration in two stages.
//!
//! Stage one is the file as written: structs that mirror the TOML with
//! `deny_unknown_fields`, so a misspelt key is an error and not a silently
//! ignored setting. Values that need checking beyond their TOML type are kept
//! `Spanned`, so stage two can point at the exact line and column.
//!
//! Stage two is [`Config`]: typed (`Duration`, `SocketAddr`, `NonZero*`),
//! cross-checked (routes name existing upstreams, no duplicate paths) and
//! never clamped: a value out of range is rejected with a message naming the
//! file, the position and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A configuration problem, already formatted as `file:line:col: key: what`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn at(
        src: &Source<'_>,
        span: std::ops::Range<usize>,
        key: &str,
        msg: impl fmt::Display,
    ) -> Self {
        let (line, col) = line_col(src.text, span.start);
        ConfigError(format!("{}:{line}:{col}: {key}: {msg}", src.name))
    }

    fn whole(src: &Source<'_>, msg: impl fmt::Display) -> Self {
        ConfigError(format!("{}: {msg}", src.name))
    }
}

struct Source<'a> {
    name: String,
    text: &'a str,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

// ---------------------------------------------------------------------------
// Stage one: the file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: FileServer,
    admin: Option<FileAdmin>,
    log: Option<FileLog>,
    #[serde(default)]
    route: Vec<FileRoute>,
    #[serde(default)]
    upstream: BTreeMap<String, FileUpstream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    listen: Spanned<Vec<Spanned<String>>>,
    shards: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    handshake_timeout: Option<Spanned<String>>,
    max_request_head: Option<Spanned<i64>>,
    max_headers: Option<Spanned<i64>>,
    tcp_keepalive: Option<Spanned<String>>,
    buffer_size: Option<Spanned<i64>>,
    buffers_per_shard: Option<Spanned<i64>>,
    max_buffers_per_direction: Option<Spanned<i64>>,
    linger_timeout: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    backlog: Option<Spanned<i64>>,
    keepalive_timeout: Option<Spanned<String>>,
    send_timeout: Option<Spanned<String>>,
    keepalive_requests: Option<Spanned<i64>>,
    gzip_cache_size: Option<Spanned<i64>>,
    splice_min: Option<Spanned<i64>>,
    park_idle_after: Option<Spanned<String>>,
    forwarded_for: Option<Spanned<String>>,
    stalled_peer_timeout: Option<Spanned<String>>,
    tcp_user_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: Spanned<String>,
    token_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    access: Option<Spanned<String>>,
    level: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    path: Spanned<String>,
    upstream: Option<Spanned<String>>,
    #[serde(rename = "static")]
    static_files: Option<Spanned<FileStatic>>,
    #[serde(default)]
    strip_prefix: bool,
    #[serde(default)]
    websocket_only: bool,
    response_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStatic {
    root: Spanned<String>,
    index: Option<Spanned<String>>,
    fallback: Option<Spanned<String>>,
    precompressed: Option<bool>,
    gzip: Option<bool>,
    gzip_min_length: Option<Spanned<i64>>,
    gzip_max_length: Option<Spanned<i64>>,
    gzip_types: Option<Vec<Spanned<String>>>,
    cache_control: Option<Spanned<String>>,
    follow_symlinks: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    balance: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    response_timeout: Option<Spanned<String>>,
    max_response_head: Option<Spanned<i64>>,
    max_fails: Option<Spanned<i64>>,
    fail_timeout: Option<Spanned<String>>,
    servers: Spanned<Vec<FileServerEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServerEntry {
    addr: Spanned<String>,
    weight: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
}

// ---------------------------------------------------------------------------
// Stage two: validated, typed.

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    pub log: LogConfig,
    pub routes: Vec<RouteConfig>,
    /// Indexed by `RouteConfig::upstream`.
    pub upstreams: Vec<UpstreamConfig>,
    /// Where it was loaded from, if from a file.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub shards: NonZeroUsize,
    pub max_connections: NonZeroUsize,
    pub handshake_timeout: Duration,
    pub max_request_head: NonZeroUsize,
    /// Header lines in a request head; beyond it: 431.
    pub max_headers: usize,
    pub tcp_keepalive: Option<Duration>,
    /// Size of one provided buffer; one recv completion fills at most one.
    pub buffer_size: NonZeroU32,
    /// Provided buffers per shard (a power of two, at most 32768).
    pub buffers_per_shard: u16,
    /// Backpressure: buffers queued towards one side before ringlb stops
    /// reading from the other.
    pub max_buffers_per_direction: NonZeroUsize,
    /// After ringlb answers with an error, how long it keeps reading (and
    /// discarding) so the client sees the answer rather than a reset.
    pub linger_timeout: Duration,
    /// On SIGTERM: how long established sessions may run before ringlb
    /// closes them. `None`: until they end by themselves.
    pub drain_timeout: Option<Duration>,
    pub backlog: i32,
    /// Idle time allowed between HTTP requests on a kept-alive connection.
    /// Never applies to WebSocket sessions, which have no idle timeout.
    pub keepalive_timeout: Duration,
    /// An HTTP answer (a static file, or a proxied non-upgrade response)
    /// whose client takes nothing for this long is abandoned, like nginx's
    /// `send_timeout`. Never applies to WebSocket sessions.
    pub send_timeout: Duration,
    /// Requests served on one connection before ringlb closes it.
    pub keepalive_requests: NonZeroU32,
    /// Bytes of gzip output kept per shard for on-the-fly compression.
    pub gzip_cache_size: usize,
    /// A relayed WebSocket frame with at least this many payload bytes still
    /// to come moves by splice(2) instead of through buffers; 0: never.
    pub splice_min: u64,
    /// A relaying session silent this long (up to twice this) is parked:
    /// its recvs are swapped for readiness polls, which hold less kernel
    /// memory. `None`: never.
    pub park_idle_after: Option<Duration>,
    /// What happens to an `X-Forwarded-For` the client sent.
    pub forwarded_for: ForwardedFor,
    /// A peer that takes no byte for this long while bytes wait for it is
    /// closed. Not an idle timeout: a silent session with nothing pending
    /// is never cut. `None`: never.
    pub stalled_peer_timeout: Option<Duration>,
    /// TCP_USER_TIMEOUT on both legs: unacknowledged data (or, on Linux
    /// 5.11 and later, a zero window with data waiting) for this long ends
    /// the connection. `None`: the kernel's default (about 15 minutes).
    pub tcp_user_timeout: Option<Duration>,
}

/// `[server] forwarded_for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedFor {
    /// ringlb is the edge: the client's own `X-Forwarded-For` is dropped
    /// and the backend sees only the address ringlb saw.
    Replace,
    /// Behind a trusted proxy: the client's list is kept and the address
    /// ringlb saw is appended.
    Append,
}

/// Where the access log goes: one JSON line per session, at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub access: AccessLog,
    /// Daemon log filter (`RUST_LOG` syntax); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            access: AccessLog::Off,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Every admin request except `GET /healthz` must carry
    /// `Authorization: Bearer <token>`; `None`: no token asked.
    pub token: Option<AdminToken>,
}

/// The admin bearer token, read from `admin.token_file`. Debug output never
/// shows it, so it cannot leak into a log line that prints the config.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(std::sync::Arc<str>);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// Compares in time independent of where `presented` differs, and of
    /// its length: both sides are hashed first, then every byte of the
    /// digests is compared.
    pub fn matches(&self, presented: &str) -> bool {
        use sha1::{Digest, Sha1};
        let a = Sha1::digest(self.0.as_bytes());
        let b = Sha1::digest(presented.as_bytes());
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub path: std::sync::Arc<str>,
    pub target: RouteTarget,
    pub strip_prefix: bool,
    pub websocket_only: bool,
    /// Plain HTTP requests only: how long the backend may take to answer;
    /// `None`: the upstream's `response_timeout`.
    pub response_timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub enum RouteTarget {
    /// Index into `Config::upstreams`.
    Upstream(usize),
    Static(std::sync::Arc<StaticConfig>),
}

impl RouteConfig {
    pub fn upstream(&self) -> Option<usize> {
        match self.target {
            RouteTarget::Upstream(u) => Some(u),
            RouteTarget::Static(_) => None,
        }
    }
}

/// A directory served as files (`static = { root = ... }`).
#[derive(Debug)]
pub struct StaticConfig {
    pub root: PathBuf,
    /// The root, opened once per configuration load; every file is opened
    /// relative to it so a path can be checked to stay beneath it.
    pub root_fd: std::os::fd::OwnedFd,
    /// File served for a directory; `None`: directories are not served.
    pub index: Option<String>,
    /// URL path (under root) served with 200 when nothing else matches,
    /// like nginx `try_files $uri $uri/ /index.html`.
    pub fallback: Option<String>,
    /// Serve `file.br` / `file.gz` when present and accepted.
    pub precompressed: bool,
    pub gzip: bool,
    pub gzip_min_length: u64,
    pub gzip_max_length: u64,
    /// MIME types compressed on the fly; an entry ending in `/*` matches
    /// the whole type.
    pub gzip_types: Vec<String>,
    pub cache_control: Option<String>,
    /// Let symlinks lead outside root (they may always point inside it).
    pub follow_symlinks: bool,
}

pub const DEFAULT_GZIP_TYPES: &[&str] = &[
    "text/*",
    "application/javascript",
    "application/json",
    "application/manifest+json",
    "application/xml",
    "application/wasm",
    "image/svg+xml",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    LeastConn,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: Balance,
    pub connect_timeout: Duration,
    /// From the forwarded request being sent until the backend's response
    /// head is complete.
    pub response_timeout: Duration,
    pub max_response_head: NonZeroUsize,
    /// Passive health (nginx semantics): this many failed connects within
    /// `fail_timeout` mark a backend down for `fail_timeout`. 0: never.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub servers: Vec<ServerEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub addr: SocketAddr,
    pub weight: NonZeroU32,
    /// `None`: no limit.
    pub max_connections: Option<NonZeroUsize>,
}

pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 100;
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);
pub const DEFAULT_BUFFER_SIZE: u32 = 32 * 1024;
pub const DEFAULT_BUFFERS_PER_SHARD: u16 = 1024;
pub const DEFAULT_MAX_BUFFERS_PER_DIRECTION: usize = 8;
pub const DEFAULT_LINGER: Duration = Duration::from_secs(2);
pub const DEFAULT_BACKLOG: i32 = 4096;
pub const DEFAULT_MAX_FAILS: u32 = 1;
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_KEEPALIVE_REQUESTS: u32 = 1000;
pub const DEFAULT_GZIP_CACHE_SIZE: usize = 16 << 20;
pub const DEFAULT_SPLICE_MIN: u64 = 64 * 1024;
pub const DEFAULT_PARK_IDLE_AFTER: Duration = Duration::from_secs(5);
pub const DEFAULT_GZIP_MIN_LENGTH: u64 = 256;
/// Also the default `tcp_user_timeout`: on Linux 5.11+ the kernel ends a
/// connection whose peer keeps a zero window for that long, so a shorter
/// one would cut slow readers before ringlb's own rule does.
pub const DEFAULT_STALLED_PEER_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_GZIP_MAX_LENGTH: u64 = 1 << 20;

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut cfg = Config::parse_in(&text, &path.display().to_string(), base)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses and validates TOML text; `name` is used in error messages.
    pub fn parse(text: &str, name: &str) -> Result<Config, ConfigError> {
        Config::parse_in(text, name, Path::new("."))
    }

    /// Like [`Config::parse`]; relative static roots are taken from `base`.
    pub fn parse_in(text: &str, name: &str, base: &Path) -> Result<Config, ConfigError> {
        let src = Source {
            name: name.to_string(),
            text,
        };
        let file: FileConfig = toml::from_str(text)
            .map_err(|e| ConfigError(format!("{name}: {}", e.to_string().trim_end())))?;
        validate(file, &src, base)
    }

    /// The configuration of `ringlb run --listen A --upstream B ...`: one
    /// route `/` to one least-connections group.
    pub fn quick(
        listen: Vec<SocketAddr>,
        upstreams: Vec<SocketAddr>,
        shards: Option<NonZeroUsize>,
    ) -> Config {
        Config {
            server: ServerConfig {
                listen,
                shards: shards.unwrap_or_else(default_shards),
                ..ServerConfig::defaults()
            },
            admin: None,
            log: LogConfig::default(),
            routes: vec![RouteConfig {
                path: "/".into(),
                target: RouteTarget::Upstream(0),
                strip_prefix: false,
                websocket_only: false,
                response_timeout: None,
            }],
            upstreams: vec![UpstreamConfig {
                name: "default".into(),
                balance: Balance::LeastConn,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                response_timeout: DEFAULT_RESPONSE_TIMEOUT,
                max_response_head: NonZeroUsize::new(DEFAULT_MAX_HEAD).unwrap(),
                max_fails: DEFAULT_MAX_FAILS,
                fail_timeout: DEFAULT_FAIL_TIMEOUT,
                servers: upstreams
                    .into_iter()
                    .map(|addr| ServerEntry {
                        addr,
                        weight: NonZeroU32::MIN,
                        max_connections: None,
                    })
                    .collect(),
            }],
            source: None,
        }
    }
}

impl ServerConfig {
    fn defaults() -> ServerConfig {
        ServerConfig {
            listen: Vec::new(),
            shards: default_shards(),
            max_connections: NonZeroUsize::new(DEFAULT_MAX_CONNECTIONS).unwrap(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_request_head: NonZeroUsize::new(DEFAULT_MAX_HEAD).unwrap(),
            max_headers: DEFAULT_MAX_HEADERS,
            tcp_keepalive: Some(DEFAULT_KEEPALIVE),
            buffer_size: NonZeroU32::new(DEFAULT_BUFFER_SIZE).unwrap(),
            buffers_per_shard: DEFAULT_BUFFERS_PER_SHARD,
            max_buffers_per_direction: NonZeroUsize::new(DEFAULT_MAX_BUFFERS_PER_DIRECTION)
                .unwrap(),
            linger_timeout: DEFAULT_LINGER,
            drain_timeout: None,
            backlog: DEFAULT_BACKLOG,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            keepalive_requests: NonZeroU32::new(DEFAULT_KEEPALIVE_REQUESTS).unwrap(),
            gzip_cache_size: DEFAULT_GZIP_CACHE_SIZE,
            splice_min: DEFAULT_SPLICE_MIN,
            park_idle_after: Some(DEFAULT_PARK_IDLE_AFTER),
            forwarded_for: ForwardedFor::Replace,
            stalled_peer_timeout: Some(DEFAULT_STALLED_PEER_TIMEOUT),
            tcp_user_timeout: Some(DEFAULT_STALLED_PEER_TIMEOUT),
        }
    }
}

pub fn default_shards() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

fn validate(file: FileConfig, src: &Source<'_>, base: &Path) -> Result<Config, ConfigError> {
    let s = file.server;
    let mut server = ServerConfig::defaults();

    if s.listen.get_ref().is_empty() {
        return Err(ConfigError::at(
            src,
            s.listen.span(),
            "server.listen",
            "needs at least one address",
        ));
    }
    for a in s.listen.get_ref() {
        let addr = socket_addr(src, a, "server.listen")?;
        if server.listen.contains(&addr) {
            return Err(ConfigError::at(
                src,
                a.span(),
                "server.listen",
                format!("{addr} is listed twice"),
            ));
        }
        server.listen.push(addr);
    }
    if let Some(v) = &s.shards {
        server.shards =
            NonZeroUsize::new(int_in(src, v, "server.shards", 1, 1024)? as usize).unwrap();
    }
    if let Some(v) = &s.max_connections {
        server.max_connections =
            NonZeroUsize::new(int_in(src, v, "server.max_connections", 1, 100_000_000)? as usize)
                .unwrap();
    }
    if let Some(v) = &s.handshake_timeout {
        server.handshake_timeout = duration(src, v, "server.handshake_timeout")?;
    }
    if let Some(v) = &s.max_request_head {
        server.max_request_head =
            NonZeroUsize::new(int_in(src, v, "server.max_request_head", 256, 1 << 20)? as usize)
                .unwrap();
    }
    if let Some(v) = &s.max_headers {
        server.max_headers = int_in(src, v, "server.max_headers", 8, 10_000)? as usize;
    }
    if let Some(v) = &s.tcp_keepalive {
        server.tcp_keepalive = if v.get_ref() == "off" {
            None
        } else {
            Some(duration(src, v, "server.tcp_keepalive")?)
        };
    }
    if let Some(v) = &s.buffer_size {
        server.buffer_size =
            NonZeroU32::new(int_in(src, v, "server.buffer_size", 1024, 1 << 20)? as u32).unwrap();
    }
    if let Some(v) = &s.buffers_per_shard {
        let n = int_in(src, v, "server.buffers_per_shard", 16, 32768)?;
        if !(n as u64).is_power_of_two() {
            return Err(ConfigError::at(
                src,
                v.span(),
                "server.buffers_per_shard",
                format!("{n} is not a power of two"),
            ));
        }
        server.buffers_per_shard = n as u16;
    }
    if let Some(v) = &s.max_buffers_per_direction {
        server.max_buffers_per_direction = NonZeroUsize::new(int_in(
            src,
            v,
            "server.max_buffers_per_direction",
            1,
            1024,
        )? as usize)
        .unwrap();
    }
    if let Some(v) = &s.linger_timeout {
        server.linger_timeout = duration(src, v, "server.linger_timeout")?;
    }
    if let Some(v) = &s.drain_timeout {
        server.drain_timeout = if v.get_ref() == "none" {
            None
        } else {
            Some(duration(src, v, "server.drain_timeout")?)
        };
    }
    if let Some(v) = &s.backlog {
        server.backlog = int_in(src, v, "server.backlog", 1, 1 << 20)? as i32;
    }
    if let Some(v) = &s.keepalive_timeout {
        server.keepalive_timeout = duration(src, v, "server.keepalive_timeout")?;
    }
    if let Some(v) = &s.send_timeout {
        server.send_timeout = duration(src, v, "server.send_timeout")?;
        if server.send_timeout.as_millis() > u128::from(u32::MAX) {
            return Err(ConfigError::at(
                src,
                v.span(),
                "server.send_timeout",
                "must be under 49 days",
            ));
        }
    }
    if let Some(v) = &s.keepalive_requests {
        server.keepalive_requests =
            NonZeroU32::new(int_in(src, v, "server.keepalive_requests", 1, 1 << 30)? as u32)
                .unwrap();
    }
    if let Some(v) = &s.gzip_cache_size {
        server.gzip_cache_size = int_in(src, v, "server.gzip_cache_size", 0, 1 << 40)? as usize;
    }
    if let Some(v) = &s.park_idle_after {
        server.park_idle_after = if v.get_ref() == "off" {
            None
        } else {
            Some(duration(src, v, "server.park_idle_after")?)
        };
    }
    if let Some(v) = &s.forwarded_for {
        server.forwarded_for =
            match v.get_ref().as_str() {
                "replace" => ForwardedFor::Replace,
                "append" => ForwardedFor::Append,
                _ => return Err(ConfigError::at(
                    src,
                    v.span(),
                    "server.forwarded_for",
                    "give \"replace\" (ringlb is the edge) or \"append\" (behind a trusted proxy)",
                )),
            };
    }
    if let Some(v) = &s.stalled_peer_timeout {
        server.stalled_peer_timeout = if v.get_ref() == "off" {
            None
        } else {
            Some(duration(src, v, "server.stalled_peer_timeout")?)
        };
    }
    if let Some(v) = &s.tcp_user_timeout {
        server.tcp_user_timeout = if v.get_ref() == "off" {
            None
        } else {
            let d = duration(src, v, "server.tcp_user_timeout")?;
            if d > Duration::from_millis(u32::MAX as u64) {
                return Err(ConfigError::at(
                    src,
                    v.span(),
                    "server.tcp_user_timeout",
                    "at most 49 days",
                ));
            }
            Some(d)
        };
    }
    if let Some(v) = &s.splice_min {
        server.splice_min = int_in(src, v, "server.splice_min", 0, 1 << 40)? as u64;
    }
    if server.max_buffers_per_direction.get() * 2 > server.buffers_per_shard as usize {
        let span = s
            .max_buffers_per_direction
            .as_ref()
            .map_or(0..0, |v| v.span());
        return Err(ConfigError::at(
            src,
            span,
            "server.max_buffers_per_direction",
            format!(
                "{} per direction cannot fit twice in buffers_per_shard = {}",
                server.max_buffers_per_direction, server.buffers_per_shard
            ),
        ));
    }

    let admin = match &file.admin {
        Some(a) => Some(admin_config(src, a, &server.listen, base)?),
        None => None,
    };

    let mut log = LogConfig::default();
    if let Some(l) = &file.log {
        if let Some(a) = &l.access {
            log.access = match a.get_ref().as_str() {
                "off" => AccessLog::Off,
                "stderr" => AccessLog::Stderr,
                "" => {
                    return Err(ConfigError::at(
                        src,
                        a.span(),
                        "log.access",
                        "give \"off\", \"stderr\" or a file path",
                    ))
                }
                _ => AccessLog::File(access_log_path(src, a)?),
            };
        }
        if let Some(v) = &l.level {
            const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
            if !LEVELS.contains(&v.get_ref().as_str()) {
                return Err(ConfigError::at(
                    src,
                    v.span(),
                    "log.level",
                    format!("{:?} is not one of {}", v.get_ref(), LEVELS.join(", ")),
                ));
            }
            log.level = v.get_ref().clone();
        }
    }

    let mut names: Vec<&String> = Vec::new();
    let mut upstreams = Vec::new();
    for (name, u) in &file.upstream {
        let key = |k: &str| format!("upstream.{name}.{k}");
        let balance = match &u.balance {
            None => Balance::LeastConn,
            Some(b) if b.get_ref() == "least_conn" => Balance::LeastConn,
            Some(b) => {
                return Err(ConfigError::at(
                    src,
                    b.span(),
                    &key("balance"),
                    format!(
                        "unknown balance {:?}; the only one is \"least_conn\"",
                        b.get_ref()
                    ),
                ))
            }
        };
        let connect_timeout = match &u.connect_timeout {
            Some(v) => duration(src, v, &key("connect_timeout"))?,
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let response_timeout = match &u.response_timeout {
            Some(v) => duration(src, v, &key("response_timeout"))?,
            None => DEFAULT_RESPONSE_TIMEOUT,
        };
        let max_response_head = match &u.max_response_head {
            Some(v) => {
                NonZeroUsize::new(int_in(src, v, &key("max_response_head"), 256, 1 << 20)? as usize)
                    .unwrap()
            }
            None => NonZeroUsize::new(DEFAULT_MAX_HEAD).unwrap(),
        };
        let max_fails = match &u.max_fails {
            Some(v) => int_in(src, v, &key("max_fails"), 0, 1000)? as u32,
            None => DEFAULT_MAX_FAILS,
        };
        let fail_timeout = match &u.fail_timeout {
            Some(v) => duration(src, v, &key("fail_timeout"))?,
            None => DEFAULT_FAIL_TIMEOUT,
        };
        if u.servers.get_ref().is_empty() {
            return Err(ConfigError::at(
                src,
                u.servers.span(),
                &key("servers"),
                "needs at least one server",
            ));
        }
        let mut servers: Vec<ServerEntry> = Vec::new();
        for e in u.servers.get_ref() {
            let addr = socket_addr(src, &e.addr, &key("servers.addr"))?;
            if servers.iter().any(|s| s.addr == addr) {
                return Err(ConfigError::at(
                    src,
                    e.addr.span(),
                    &key("servers.addr"),
                    format!("{addr} is listed twice"),
                ));
            }
            let weight = match &e.weight {
                Some(w) => NonZeroU32::new(int_in(src, w, &key("servers.weight"), 1, 1000)? as u32)
                    .unwrap(),
                None => NonZeroU32::MIN,
            };
            let max_connections = match &e.max_connections {
                Some(m) => Some(
                    NonZeroUsize::new(int_in(
                        src,
                        m,
                        &key("servers.max_connections"),
                        1,
                        100_000_000,
                    )? as usize)
                    .unwrap(),
                ),
                None => None,
            };
            servers.push(ServerEntry {
                addr,
                weight,
                max_connections,
            });
        }
        names.push(name);
        upstreams.push(UpstreamConfig {
            name: name.clone(),
            balance,
            connect_timeout,
            response_timeout,
            max_response_head,
            max_fails,
            fail_timeout,
            servers,
        });
    }

    if file.route.is_empty() {
        return Err(ConfigError::whole(
            src,
            "route: no [[route]] defined; ringlb would answer 404 to everything",
        ));
    }
    let mut routes: Vec<RouteConfig> = Vec::new();
    for r in &file.route {
        let path = r.path.get_ref();
        if !path.starts_with('/') {
            return Err(ConfigError::at(
                src,
                r.path.span(),
                "route.path",
                format!("{path:?} must start with '/'"),
            ));
        }
        if path
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
        {
            return Err(ConfigError::at(
                src,
                r.path.span(),
                "route.path",
                format!("{path:?} has a character not allowed in a path prefix"),
            ));
        }
        if routes.iter().any(|x| *x.path == **path) {
            return Err(ConfigError::at(
                src,
                r.path.span(),
                "route.path",
                format!("{path:?} is routed twice"),
            ));
        }
        let target = match (&r.upstream, &r.static_files) {
            (Some(u), None) => {
                let Some(i) = names.iter().position(|n| *n == u.get_ref()) else {
                    return Err(ConfigError::at(
                        src,
                        u.span(),
                        "route.upstream",
                        format!("no [upstream.{}] is defined", u.get_ref()),
                    ));
                };
                RouteTarget::Upstream(i)
            }
            (None, Some(st)) => {
                let bad = if r.websocket_only {
                    Some("websocket_only")
                } else if r.response_timeout.is_some() {
                    Some("response_timeout")
                } else {
                    None
                };
                if let Some(key) = bad {
                    return Err(ConfigError::at(
                        src,
                        r.path.span(),
                        &format!("route.{key}"),
                        format!(
                            "route {path:?} serves files; {key} only applies to upstream routes"
                        ),
                    ));
                }
                RouteTarget::Static(std::sync::Arc::new(static_config(src, st, base)?))
            }
            _ => {
                return Err(ConfigError::at(
                    src,
                    r.path.span(),
                    "route",
                    format!("route {path:?} needs exactly one of `upstream` or `static`"),
                ))
            }
        };
        let response_timeout = match &r.response_timeout {
            Some(v) => Some(duration(src, v, "route.response_timeout")?),
            None => None,
        };
        routes.push(RouteConfig {
            path: path.as_str().into(),
            target,
            strip_prefix: r.strip_prefix,
            websocket_only: r.websocket_only,
            response_timeout,
        });
    }

    Ok(Config {
        server,
        admin,
        log,
        routes,
        upstreams,
        source: None,
    })
}

fn admin_config(
    src: &Source<'_>,
    a: &FileAdmin,
    listen: &[SocketAddr],
    base: &Path,
) -> Result<AdminConfig, ConfigError> {
    let addr = socket_addr(src, &a.listen, "admin.listen")?;
    // `run` binds the listen addresses first; an admin address that shares
    // a port with one of them would then fail to bind. Say so here, so
    // `check` refuses it too.
    if let Some(l) = listen.iter().find(|l| ports_overlap(addr, **l)) {
        return Err(ConfigError::at(
            src,
            a.listen.span(),
            "admin.listen",
            format!("{addr} takes the same port as server.listen {l}; give the admin API a port of its own"),
        ));
    }
    let token = match &a.token_file {
        Some(v) => {
            let path = base.join(v.get_ref());
            let at = |msg: String| ConfigError::at(src, v.span(), "admin.token_file", msg);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| at(format!("{}: cannot read: {e}", path.display())))?;
            let token = text.trim();
            if token.is_empty() {
                return Err(at(format!("{} is empty", path.display())));
            }
            // It travels in an Authorization header: visible ASCII only.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(at(format!(
                    "{}: the token must be visible ASCII characters without spaces",
                    path.display()
                )));
            }
            Some(AdminToken(token.into()))
        }
        None => None,
    };
    Ok(AdminConfig {
        listen: addr,
        token,
    })
}

/// True if binding `admin` would collide with a listener on `listen`
/// (SO_REUSEPORT on the listeners, not on the admin socket).
fn ports_overlap(admin: SocketAddr, listen: SocketAddr) -> bool {
    if admin.port() != listen.port() || admin.port() == 0 {
        return false;
    }
    let (a, l) = (admin.ip(), listen.ip());
    let same_family = a.is_ipv4() == l.is_ipv4();
    // An admin socket on [::] is dual-stack (std leaves IPV6_V6ONLY off),
    // so it takes the IPv4 port as well; listeners on [::] are v6-only.
    a == l
        || (same_family && (a.is_unspecified() || l.is_unspecified()))
        || (a.is_ipv6() && a.is_unspecified())
}

/// An access log file must be creatable when `run` opens it: its directory
/// has to exist (it is taken as written: relative to the working directory,
/// like the daemon opens it).
fn access_log_path(src: &Source<'_>, v: &Spanned<String>) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(v.get_ref());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let problem = if !dir.is_dir() {
        Some(format!(
            "{}: directory {} does not exist",
            path.display(),
            dir.display()
        ))
    } else if path.is_dir() {
        Some(format!("{} is a directory", path.display()))
    } else {
        None
    };
    match problem {
        Some(msg) => Err(ConfigError::at(src, v.span(), "log.access", msg)),
        None => Ok(path),
    }
}

fn static_config(
    src: &Source<'_>,
    st: &Spanned<FileStatic>,
    base: &Path,
) -> Result<StaticConfig, ConfigError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = st.get_ref();
    let root_text = f.root.get_ref();
    let root = base.join(root_text);
    let root_fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_PATH)
        .open(&root)
        .map_err(|e| {
            ConfigError::at(
                src,
                f.root.span(),
                "route.static.root",
                format!("{}: {e}", root.display()),
            )
        })?;
    let url_path = |v: &Spanned<String>, key: &str| -> Result<String, ConfigError> {
        let p = v.get_ref();
        if !p.starts_with('/') || p.split('/').any(|seg| seg == "..") || p.contains('\0') {
            return Err(ConfigError::at(
                src,
                v.span(),
                key,
                format!("{p:?} must be a path under root starting with '/', without '..'"),
            ));
        }
        Ok(p.clone())
    };
    let index = match &f.index {
        None => Some("index.html".to_string()),
        Some(v) if v.get_ref().is_empty() => None,
        Some(v) => {
            if v.get_ref().contains('/') || v.get_ref() == ".." {
                return Err(ConfigError::at(
                    src,
                    v.span(),
                    "route.static.index",
                    "must be a file name (no '/'), or \"\" to serve no index",
                ));
            }
            Some(v.get_ref().clone())
        }
    };
    let fallback = match &f.fallback {
        Some(v) => Some(url_path(v, "route.static.fallback")?),
        None => None,
    };
    let gzip_min_length = match &f.gzip_min_length {
        Some(v) => int_in(src, v, "route.static.gzip_min_length", 0, 1 << 40)? as u64,
        None => DEFAULT_GZIP_MIN_LENGTH,
    };
    let gzip_max_length = match &f.gzip_max_length {
        Some(v) => int_in(src, v, "route.static.gzip_max_length", 0, 1 << 30)? as u64,
        None => DEFAULT_GZIP_MAX_LENGTH,
    };
    let gzip_types = match &f.gzip_types {
        None => DEFAULT_GZIP_TYPES.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            let mut out = Vec::new();
            for t in list {
                let v = t.get_ref().trim().to_ascii_lowercase();
                if v.split('/').count() != 2 || v.contains(char::is_whitespace) {
                    return Err(ConfigError::at(
                        src,
                        t.span(),
                        "route.static.gzip_types",
                        format!(
                            "{:?} is not a MIME type like \"text/css\" or \"text/*\"",
                            t.get_ref()
                        ),
                    ));
                }
                out.push(v);
            }
            out
        }
    };
    let cache_control = match &f.cache_control {
        Some(v) => {
            let text = v.get_ref();
            if text.is_empty() || text.bytes().any(|b| b.is_ascii_control()) {
                return Err(ConfigError::at(
                    src,
                    v.span(),
                    "route.static.cache_control",
                    "must be a non-empty header value without control characters",
                ));
            }
            Some(text.clone())
        }
        None => None,
    };
    Ok(StaticConfig {
        root,
        root_fd: root_fd.into(),
        index,
        fallback,
        precompressed: f.precompressed.unwrap_or(true),
        gzip: f.gzip.unwrap_or(true),
        gzip_min_length,
        gzip_max_length,
        gzip_types,
        cache_control,
        follow_symlinks: f.follow_symlinks.unwrap_or(false),
    })
}

fn socket_addr(
    src: &Source<'_>,
    v: &Spanned<String>,
    key: &str,
) -> Result<SocketAddr, ConfigError> {
    v.get_ref().parse().map_err(|_| {
        ConfigError::at(
            src,
            v.span(),
            key,
            format!("{:?} is not an IP:port address (like \"127.0.0.1:8080\" or \"[::1]:8080\"; host names are not resolved)", v.get_ref()),
        )
    })
}

fn int_in(
    src: &Source<'_>,
    v: &Spanned<i64>,
    key: &str,
    min: i64,
    max: i64,
) -> Result<i64, ConfigError> {
    let n = *v.get_ref();
    if n < min || n > max {
        return Err(ConfigError::at(
            src,
            v.span(),
            key,
            format!("{n} is out of range {min}..={max}"),
        ));
    }
    Ok(n)
}

fn duration(src: &Source<'_>, v: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
    match parse_duration(v.get_ref()) {
        Ok(d) if d.is_zero() => Err(ConfigError::at(
            src,
            v.span(),
            key,
            "must be longer than zero",
        )),
        Ok(d) => Ok(d),
        Err(e) => Err(ConfigError::at(src, v.span(), key, e)),
    }
}

/// Parses `"250ms"`, `"10s"`, `"5m"`, `"1h"`, `"1.5s"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?} has no unit; write it like \"10s\" or \"500ms\""))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like \"10s\" or \"500ms\""))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{s:?} has unknown unit {unit:?}; use ms, s, m or h"
            ))
        }
    };
    if !secs.is_finite() || secs > 365.0 * 86400.0 {
        return Err(format!("{s:?} is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[server]
listen = ["127.0.0.1:8080"]

[[route]]
path = "/"
upstream = "u"

[upstream.u]
servers = [{ addr = "127.0.0.1:9001" }]
"#;

    fn err(text: &str) -> String {
        Config::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn minimal_gets_defaults() {
        let c = Config::parse(MIN, "t.toml").unwrap();
        assert_eq!(c.server.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(c.upstreams[0].servers[0].weight.get(), 1);
        assert_eq!(c.routes[0].upstream(), Some(0));
    }

    #[test]
    fn unknown_key_names_key_and_position() {
        let e = err(&MIN.replace("[server]\n", "[server]\nhandshake_timout = \"1s\"\n"));
        assert!(e.starts_with("t.toml: "), "{e}");
        assert!(e.contains("handshake_timout"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn bad_duration_points_at_value() {
        let e = err(&MIN.replace("[server]\n", "[server]\nhandshake_timeout = \"10x\"\n"));
        assert!(
            e.starts_with("t.toml:3:21: server.handshake_timeout:"),
            "{e}"
        );
        assert!(e.contains("unknown unit"), "{e}");
        let e = err(&MIN.replace("[server]\n", "[server]\nhandshake_timeout = \"0s\"\n"));
        assert!(e.contains("longer than zero"), "{e}");
        let e = err(&MIN.replace("[server]\n", "[server]\nsend_timeout = \"0ms\"\n"));
        assert!(
            e.contains("server.send_timeout: must be longer than zero"),
            "{e}"
        );
        let e = err(&MIN.replace("[server]\n", "[server]\nsend_timeout = \"1200h\"\n"));
        assert!(
            e.contains("server.send_timeout: must be under 49 days"),
            "{e}"
        );
        let c = Config::parse(
            &MIN.replace("[server]\n", "[server]\nsend_timeout = \"90s\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(c.server.send_timeout, Duration::from_secs(90));
    }

    #[test]
    fn bad_address() {
        let e = err(&MIN.replace("127.0.0.1:8080", "localhost:8080"));
        assert!(e.starts_with("t.toml:3:11: server.listen:"), "{e}");
        let e = err(&MIN.replace("127.0.0.1:9001", "nowhere"));
        assert!(e.contains("upstream.u.servers.addr"), "{e}");
    }

    #[test]
    fn route_to_missing_upstream() {
        let e = err(&MIN.replace("upstream = \"u\"", "upstream = \"nope\""));
        assert!(e.contains("route.upstream: no [upstream.nope]"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_rejected_not_clamped() {
        for (k, v) in [
            ("shards", "0"),
            ("max_connections", "0"),
            ("max_request_head", "10"),
            ("buffers_per_shard", "1000"),
            ("buffer_size", "10"),
            ("forwarded_for", "\"trust\""),
            ("stalled_peer_timeout", "\"0s\""),
            ("stalled_peer_timeout", "\"soon\""),
            ("tcp_user_timeout", "\"0s\""),
            ("tcp_user_timeout", "\"100d\""),
        ] {
            let e = err(&MIN.replace("[server]\n", &format!("[server]\n{k} = {v}\n")));
            assert!(e.contains(&format!("server.{k}")), "{k}: {e}");
        }
        let e = err(&MIN.replace(
            "addr = \"127.0.0.1:9001\"",
            "addr = \"127.0.0.1:9001\", weight = 0",
        ));
        assert!(
            e.contains("upstream.u.servers.weight: 0 is out of range"),
            "{e}"
        );
    }

    #[test]
    fn duplicates_are_rejected() {
        let e = err(&MIN.replace(
            "servers = [{ addr = \"127.0.0.1:9001\" }]",
            "servers = [{ addr = \"127.0.0.1:9001\" }, { addr = \"127.0.0.1:9001\" }]",
        ));
        assert!(e.contains("listed twice"), "{e}");
        let e = err(&format!(
            "{MIN}\n[[route]]\npath = \"/\"\nupstream = \"u\"\n"
        ));
        assert!(e.contains("routed twice"), "{e}");
    }

    #[test]
    fn no_routes_is_an_error() {
        let e = err("[server]\nlisten = [\"127.0.0.1:1\"]\n");
        assert!(e.contains("no [[route]]"), "{e}");
    }

    #[test]
    fn unknown_balance() {
        let e = err(&MIN.replace(
            "[upstream.u]\n",
            "[upstream.u]\nbalance = \"round_robin\"\n",
        ));
        assert!(e.contains("upstream.u.balance"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn admin_port_must_not_overlap_a_listener() {
        let with_admin = |listen: &str, admin: &str| {
            MIN.replace("127.0.0.1:8080", listen) + &format!("\n[admin]\nlisten = \"{admin}\"\n")
        };
        for (listen, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
            ("127.0.0.1:8080", "[::]:8080"),
            ("[::1]:8080", "[::]:8080"),
        ] {
            let e = err(&with_admin(listen, admin));
            assert!(e.contains(": admin.listen: "), "{listen} {admin}: {e}");
            assert!(e.contains(listen), "{e}");
        }
        for (listen, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:9090"),
            ("127.0.0.1:8080", "127.0.0.2:8080"),
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("[::]:8080", "127.0.0.1:8080"),
        ] {
            Config::parse(&with_admin(listen, admin), "t")
                .unwrap_or_else(|e| panic!("{listen} {admin}: {e}"));
        }
    }

    #[test]
    fn access_log_directory_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let log = |p: &Path| format!("{MIN}\n[log]\naccess = {:?}\n", p.display().to_string());
        let missing = dir.path().join("nope/access.log");
        let e = err(&log(&missing));
        assert!(e.contains(": log.access: "), "{e}");
        assert!(e.contains(&missing.display().to_string()), "{e}");
        assert!(e.contains("does not exist"), "{e}");
        let e = err(&log(dir.path()));
        assert!(
            e.contains("log.access") && e.contains("is a directory"),
            "{e}"
        );
        let c = Config::parse(&log(&dir.path().join("access.log")), "t").unwrap();
        assert_eq!(c.log.access, AccessLog::File(dir.path().join("access.log")));
    }

    #[test]
    fn admin_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let with_token =
            |p: &str| format!("{MIN}\n[admin]\nlisten = \"127.0.0.1:9090\"\ntoken_file = {p:?}\n");
        let parse = |text: &str| Config::parse_in(text, "t.toml", dir.path());
        let e = parse(&with_token("missing.token")).unwrap_err().to_string();
        assert!(e.contains(": admin.token_file: "), "{e}");
        assert!(e.contains("missing.token: cannot read"), "{e}");
        for (content, why) in [
            ("", "is empty"),
            (" \n\t\n", "is empty"),
            ("two words\n", "visible ASCII"),
        ] {
            std::fs::write(dir.path().join("bad.token"), content).unwrap();
            let e = parse(&with_token("bad.token")).unwrap_err().to_string();
            assert!(
                e.contains("admin.token_file") && e.contains("bad.token"),
                "{e}"
            );
            assert!(e.contains(why), "{content:?}: {e}");
        }
        // Relative to the config file's directory; trimmed.
        std::fs::write(dir.path().join("good.token"), "  t0ken-xyz\n").unwrap();
        let c = parse(&with_token("good.token")).unwrap();
        let token = c.admin.unwrap().token.unwrap();
        assert!(token.matches("t0ken-xyz"));
        assert!(!token.matches("t0ken-xy"));
        assert!(!token.matches("t0ken-xyz "));
        assert!(!format!("{token:?}").contains("t0ken"));
        let c = Config::parse(
            &format!("{MIN}\n[admin]\nlisten = \"127.0.0.1:9090\"\n"),
            "t",
        )
        .unwrap();
        assert!(c.admin.unwrap().token.is_none());
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
