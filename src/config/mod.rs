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

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

mod file;
mod names;
mod tls;
mod validate;
use file::FileConfig;
pub use validate::parse_duration;
use validate::validate;

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
    /// How `servers` given by name are resolved (`[resolver]`).
    pub resolver: ResolverSettings,
    /// Where it was loaded from, if from a file.
    pub source: Option<PathBuf>,
    /// `[tls]`: TLS termination on its own listeners; `None`: off.
    pub tls: Option<crate::tls::TlsConfig>,
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
    /// At most this often, after new connections or parked sessions, free
    /// heap pages go back to the kernel (`server::HeapTrim`). `None`: never.
    pub heap_trim_interval: Option<Duration>,
    /// What happens to an `X-Forwarded-For` the client sent.
    pub forwarded_for: ForwardedFor,
    /// The scheduling policy of the shard threads.
    pub scheduling: Scheduling,
    /// A peer that takes no byte for this long while bytes wait for it is
    /// closed. Not an idle timeout: a silent session with nothing pending
    /// is never cut. `None`: never.
    pub stalled_peer_timeout: Option<Duration>,
    /// TCP_USER_TIMEOUT on both legs: unacknowledged data (or, on Linux
    /// 5.11 and later, a zero window with data waiting) for this long ends
    /// the connection. `None`: the kernel's default (about 15 minutes).
    pub tcp_user_timeout: Option<Duration>,
    /// WebSocket upgrades per second passed on to backends, across all
    /// shards, with `handshake_burst` at once; over it: 503 with
    /// `Retry-After`. `None`: no limit.
    pub max_handshakes_per_second: Option<NonZeroU32>,
    pub handshake_burst: NonZeroU32,
    /// `Retry-After` on a 503 over the budget is jittered between 1 s and this.
    pub retry_after_max: Duration,
    /// Client connections from one address, across all shards; over it: 429.
    pub max_connections_per_ip: Option<NonZeroU32>,
    /// Written with the PID of the process that is current (on start, and
    /// by the new process after a binary upgrade).
    pub pid_file: Option<PathBuf>,
    /// A binary upgrade: how long the old process waits for each answer of
    /// the new one (started, ready, each batch acknowledged) before it
    /// kills it and rolls back.
    pub upgrade_timeout: Duration,
    /// Accept PROXY protocol headers (v1 and v2) from these sources, and
    /// require one from them; `None`: PROXY protocol off.
    pub trusted_proxies: Option<Vec<Cidr>>,
    /// A clean close (drain, rebalance, paced shutdown) waits this long
    /// for both directions to be between messages; then any frame
    /// boundary will do, and after `linger_timeout` more, FIN.
    pub close_boundary_timeout: Duration,
    /// On SIGTERM, close sessions cleanly at this many per second (across
    /// shards) from the start, instead of only at `drain_timeout`.
    pub drain_close_rate: Option<NonZeroU32>,
}

/// `[upstream.X] rebalance`: a backend holding more than
/// `(1 + threshold)` times its weighted fair share of the upstream's
/// sessions sheds them at `rate` per second (for the whole upstream), by
/// the clean close, until every backend is within the threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebalance {
    pub threshold: f64,
    pub rate: NonZeroU32,
}

/// Default `close_boundary_timeout`.
pub const DEFAULT_CLOSE_BOUNDARY_TIMEOUT: Duration = Duration::from_secs(30);

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

/// `[server] scheduling`: how the kernel schedules the shard threads.
///
/// A shard sleeps in `io_uring_enter` whenever it has no completion, and
/// under the default policy a waking shard usually preempts whatever runs
/// on its CPU, since its short runs leave it owed CPU time. Where cores
/// are shared that means a sleep and a wake-up for almost every event, and
/// on this project's measurements each costs a shard tens of microseconds
/// of CPU (the switch itself, then cold caches). Under
/// `SCHED_BATCH` a waking shard runs at once on an idle CPU, as before, but
/// does not preempt a busy one: its completions gather until that task's
/// slice ends, and one wake-up serves them all. The price is latency, only
/// when the CPU is contended, and bounded by the scheduler's slice (a few
/// milliseconds). `docs/PERFORMANCE.md` has the measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// `SCHED_BATCH` (the default).
    Batch,
    /// `SCHED_OTHER`, the kernel's default: a waking shard preempts.
    Normal,
}

impl Scheduling {
    pub fn name(self) -> &'static str {
        match self {
            Scheduling::Batch => "batch",
            Scheduling::Normal => "normal",
        }
    }
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
    /// Compress the backend's plain-HTTP answers on the fly (nginx
    /// `gzip_proxied any`); `None`: never.
    pub gzip: Option<std::sync::Arc<ProxyGzip>>,
    /// Which `Origin`s may open a WebSocket on this route; `None`: any.
    pub origins: Option<std::sync::Arc<OriginPolicy>>,
}

/// `allowed_origins` on a route: a browser page on another site cannot
/// open a WebSocket here with the user's cookies (cross-site WebSocket
/// hijacking); ringlb answers 403 before any backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    /// `scheme://host[:port]`, lowercase; a host may start with `*.`,
    /// which matches any subdomain (not the domain itself).
    pub allowed: Vec<String>,
    /// Let in clients that send no `Origin` (non-browser clients).
    pub allow_missing: bool,
}

/// `gzip = true` on an upstream route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyGzip {
    /// MIME types compressed; `text/*` style wildcards allowed.
    pub types: Vec<String>,
    /// Answers that declare fewer bytes than this pass untouched.
    pub min_length: u64,
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
    /// Send the client's address to the backends in a PROXY header.
    pub send_proxy_protocol: Option<ProxyVersion>,
    /// Off when `None`.
    pub rebalance: Option<Rebalance>,
    pub servers: Vec<ServerEntry>,
    /// Reach the backends over TLS (wss://); `None`: plaintext.
    pub tls: Option<std::sync::Arc<crate::tls::UpstreamTls>>,
    /// Servers given by name (`addr = "host:port"` or `srv`): each
    /// address they resolve to is a backend with the entry's weight and
    /// limits, next to the fixed `servers`.
    pub named: Vec<NamedServer>,
}

/// A `servers` entry given by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedServer {
    pub target: NameTarget,
    pub weight: NonZeroU32,
    pub max_connections: Option<NonZeroUsize>,
}

/// What DNS is asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NameTarget {
    /// `addr = "host:port"`: every A and AAAA address, at this port.
    Host { host: String, port: u16 },
    /// `srv = "_ws._tcp.name"`: the SRV records of the lowest priority
    /// present, each target's addresses at the record's port. SRV weights
    /// are not used: the pick is least connections with the server
    /// entry's `weight` on every address.
    Srv(String),
}

impl fmt::Display for NameTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameTarget::Host { host, port } => write!(f, "{host}:{port}"),
            NameTarget::Srv(name) => write!(f, "srv:{name}"),
        }
    }
}

/// `[resolver]`: where names are asked and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverSettings {
    /// `None`: the nameservers (and search domains) of /etc/resolv.conf.
    pub nameservers: Option<Vec<SocketAddr>>,
    /// A name is asked again when its answer's TTL runs out, but never
    /// sooner than this nor later than `max_interval`.
    pub min_interval: Duration,
    pub max_interval: Duration,
    /// How long one query waits for a nameserver's answer.
    pub timeout: Duration,
    /// Addresses one name may contribute (the lowest, in address order);
    /// the rest of an answer is ignored, with a log line.
    pub max_addresses: usize,
}

pub const DEFAULT_RESOLVE_MIN_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_RESOLVE_MAX_INTERVAL: Duration = Duration::from_secs(300);
pub const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_RESOLVE_MAX_ADDRESSES: usize = 256;

impl Default for ResolverSettings {
    fn default() -> Self {
        ResolverSettings {
            nameservers: None,
            min_interval: DEFAULT_RESOLVE_MIN_INTERVAL,
            max_interval: DEFAULT_RESOLVE_MAX_INTERVAL,
            timeout: DEFAULT_RESOLVE_TIMEOUT,
            max_addresses: DEFAULT_RESOLVE_MAX_ADDRESSES,
        }
    }
}

impl Config {
    /// Every name any upstream asks for, once each.
    pub fn names(&self) -> Vec<NameTarget> {
        let mut v: Vec<NameTarget> = self
            .upstreams
            .iter()
            .flat_map(|u| u.named.iter().map(|n| n.target.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// An address range, `10.0.0.0/8` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub net: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub addr: SocketAddr,
    pub weight: NonZeroU32,
    /// `None`: no limit.
    pub max_connections: Option<NonZeroUsize>,
}

pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
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
pub const DEFAULT_HEAP_TRIM_INTERVAL: Duration = Duration::from_secs(10);
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
                gzip: None,
                origins: None,
            }],
            upstreams: vec![UpstreamConfig {
                name: "default".into(),
                balance: Balance::LeastConn,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                response_timeout: DEFAULT_RESPONSE_TIMEOUT,
                max_response_head: NonZeroUsize::new(DEFAULT_MAX_HEAD).unwrap(),
                max_fails: DEFAULT_MAX_FAILS,
                fail_timeout: DEFAULT_FAIL_TIMEOUT,
                send_proxy_protocol: None,
                tls: None,
                rebalance: None,
                servers: upstreams
                    .into_iter()
                    .map(|addr| ServerEntry {
                        addr,
                        weight: NonZeroU32::MIN,
                        max_connections: None,
                    })
                    .collect(),
                named: Vec::new(),
            }],
            resolver: ResolverSettings::default(),
            source: None,
            tls: None,
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
            heap_trim_interval: Some(DEFAULT_HEAP_TRIM_INTERVAL),
            forwarded_for: ForwardedFor::Replace,
            scheduling: Scheduling::Batch,
            stalled_peer_timeout: Some(DEFAULT_STALLED_PEER_TIMEOUT),
            close_boundary_timeout: DEFAULT_CLOSE_BOUNDARY_TIMEOUT,
            drain_close_rate: None,
            tcp_user_timeout: Some(DEFAULT_STALLED_PEER_TIMEOUT),
            max_handshakes_per_second: None,
            handshake_burst: NonZeroU32::MIN,
            retry_after_max: Duration::from_secs(10),
            max_connections_per_ip: None,
            trusted_proxies: None,
            pid_file: None,
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
        }
    }
}

pub fn default_shards() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
mod tests;
