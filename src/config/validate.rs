//! Stage two: from the file as written to a validated, typed
//! configuration. Every rule rejects a bad value with the file, line,
//! column and key; nothing is clamped silently.

use super::file::*;
use super::names;
use super::*;

pub(super) fn validate(
    file: FileConfig,
    src: &Source<'_>,
    base: &Path,
) -> Result<Config, ConfigError> {
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
    if let Some(v) = &s.close_boundary_timeout {
        server.close_boundary_timeout = duration(src, v, "server.close_boundary_timeout")?;
    }
    if let Some(v) = &s.drain_close_rate {
        server.drain_close_rate =
            NonZeroU32::new(int_in(src, v, "server.drain_close_rate", 1, 1_000_000)? as u32);
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
    if let Some(v) = &s.heap_trim_interval {
        server.heap_trim_interval = if v.get_ref() == "off" {
            None
        } else {
            Some(duration(src, v, "server.heap_trim_interval")?)
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
    if let Some(v) = &s.scheduling {
        server.scheduling = match v.get_ref().as_str() {
            "batch" => Scheduling::Batch,
            "normal" => Scheduling::Normal,
            _ => {
                return Err(ConfigError::at(
                    src,
                    v.span(),
                    "server.scheduling",
                    "give \"batch\" (shards do not preempt a busy CPU when they wake) or \"normal\" (the kernel's default)",
                ))
            }
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
    if let Some(v) = &s.max_handshakes_per_second {
        let n = int_in(src, v, "server.max_handshakes_per_second", 1, 1_000_000)?;
        server.max_handshakes_per_second = NonZeroU32::new(n as u32);
        // A second's worth at once unless told otherwise.
        server.handshake_burst = NonZeroU32::new(n as u32).unwrap();
    }
    if let Some(v) = &s.handshake_burst {
        if server.max_handshakes_per_second.is_none() {
            return Err(ConfigError::at(
                src,
                v.span(),
                "server.handshake_burst",
                "only means something with max_handshakes_per_second",
            ));
        }
        server.handshake_burst =
            NonZeroU32::new(int_in(src, v, "server.handshake_burst", 1, 1_000_000)? as u32)
                .unwrap();
    }
    if let Some(v) = &s.retry_after_max {
        let d = duration(src, v, "server.retry_after_max")?;
        if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
            return Err(ConfigError::at(
                src,
                v.span(),
                "server.retry_after_max",
                "must be between 1s and 1h (Retry-After is in whole seconds)",
            ));
        }
        server.retry_after_max = d;
    }
    if let Some(v) = &s.pid_file {
        if v.get_ref().is_empty() {
            return Err(ConfigError::at(
                src,
                v.span(),
                "server.pid_file",
                "must be a file path",
            ));
        }
        server.pid_file = Some(PathBuf::from(v.get_ref()));
    }
    if let Some(v) = &s.upgrade_timeout {
        server.upgrade_timeout = duration(src, v, "server.upgrade_timeout")?;
    }
    if let Some(v) = &s.max_connections_per_ip {
        server.max_connections_per_ip =
            NonZeroU32::new(int_in(src, v, "server.max_connections_per_ip", 1, 10_000_000)? as u32);
    }
    match (s.proxy_protocol, &s.trusted_proxies) {
        (Some(true), Some(list)) => {
            let mut nets = Vec::new();
            for v in list {
                nets.push(cidr(src, v)?);
            }
            server.trusted_proxies = Some(nets);
        }
        (Some(true), None) => {
            return Err(ConfigError::at(
                src,
                s.listen.span(),
                "server.trusted_proxies",
                "proxy_protocol = true needs trusted_proxies: the addresses of the L4 tier allowed to say whose a connection is",
            ))
        }
        (_, Some(list)) if !list.is_empty() => {
            return Err(ConfigError::at(
                src,
                list[0].span(),
                "server.trusted_proxies",
                "only means something with proxy_protocol = true",
            ))
        }
        _ => {}
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
        let mut named: Vec<NamedServer> = Vec::new();
        for e in u.servers.get_ref() {
            let target = names::server_target(src, e, &key, u.servers.span())?;
            let (span, what) = match (&e.addr, &e.srv) {
                (Some(a), _) => (a.span(), "servers.addr"),
                (_, Some(s)) => (s.span(), "servers.srv"),
                _ => (u.servers.span(), "servers"),
            };
            let twice = match &target {
                names::Target::Fixed(addr) => servers.iter().any(|s| s.addr == *addr),
                names::Target::Named(t) => named.iter().any(|n| n.target == *t),
            };
            if twice {
                return Err(ConfigError::at(
                    src,
                    span,
                    &key(what),
                    format!(
                        "{:?} is listed twice",
                        e.addr
                            .as_ref()
                            .or(e.srv.as_ref())
                            .map(|v| v.get_ref().as_str())
                            .unwrap_or("")
                    ),
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
            match target {
                names::Target::Fixed(addr) => servers.push(ServerEntry {
                    addr,
                    weight,
                    max_connections,
                }),
                names::Target::Named(target) => named.push(NamedServer {
                    target,
                    weight,
                    max_connections,
                }),
            }
        }
        let tls = match &u.tls {
            Some(t) => {
                if u.send_proxy_protocol.is_some() {
                    return Err(ConfigError::at(
                        src,
                        t.span(),
                        &key("tls"),
                        "cannot be combined with send_proxy_protocol (not built)",
                    ));
                }
                Some(super::tls::upstream_tls(src, t, &key("tls"), base)?)
            }
            None => None,
        };
        names.push(name);
        upstreams.push(UpstreamConfig {
            tls,
            name: name.clone(),
            balance,
            connect_timeout,
            response_timeout,
            max_response_head,
            max_fails,
            fail_timeout,
            send_proxy_protocol: match &u.send_proxy_protocol {
                None => None,
                Some(v) => Some(match v.get_ref().as_str() {
                    "v1" => ProxyVersion::V1,
                    "v2" => ProxyVersion::V2,
                    _ => {
                        return Err(ConfigError::at(
                            src,
                            v.span(),
                            &key("send_proxy_protocol"),
                            "give \"v1\" or \"v2\"",
                        ))
                    }
                }),
            },
            rebalance: match &u.rebalance {
                None => None,
                Some(r) => {
                    let threshold = match &r.threshold {
                        None => 0.25,
                        Some(t) => {
                            let v = *t.get_ref();
                            if !(v > 0.0 && v <= 10.0) {
                                return Err(ConfigError::at(
                                    src,
                                    t.span(),
                                    &key("rebalance.threshold"),
                                    format!("{v} is out of range: give a fraction above 0 and at most 10 (0.25: shed above 125 % of the fair share)"),
                                ));
                            }
                            v
                        }
                    };
                    let rate = int_in(src, &r.rate, &key("rebalance.rate"), 1, 1_000_000)?;
                    Some(super::Rebalance {
                        threshold,
                        rate: NonZeroU32::new(rate as u32).unwrap(),
                    })
                }
            },
            servers,
            named,
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
                } else if r.gzip.is_some() || r.gzip_types.is_some() || r.gzip_min_length.is_some()
                {
                    Some("gzip")
                } else if r.allowed_origins.is_some() || r.allow_missing_origin.is_some() {
                    Some("allowed_origins")
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
        let gzip = if r.gzip == Some(true) {
            Some(std::sync::Arc::new(ProxyGzip {
                types: match &r.gzip_types {
                    Some(list) => mime_list(src, list, "route.gzip_types")?,
                    None => DEFAULT_GZIP_TYPES.iter().map(|s| s.to_string()).collect(),
                },
                min_length: match &r.gzip_min_length {
                    Some(v) => int_in(src, v, "route.gzip_min_length", 0, 1 << 40)? as u64,
                    None => DEFAULT_GZIP_MIN_LENGTH,
                },
            }))
        } else {
            None
        };
        let origins = match &r.allowed_origins {
            None if r.allow_missing_origin.is_some() => {
                return Err(ConfigError::at(
                    src,
                    r.path.span(),
                    "route.allow_missing_origin",
                    "only means something with allowed_origins",
                ))
            }
            None => None,
            Some(list) => {
                let mut allowed = Vec::new();
                for o in list {
                    allowed.push(origin_pattern(src, o)?);
                }
                Some(std::sync::Arc::new(OriginPolicy {
                    allowed,
                    allow_missing: r.allow_missing_origin.unwrap_or(true),
                }))
            }
        };
        routes.push(RouteConfig {
            path: path.as_str().into(),
            target,
            strip_prefix: r.strip_prefix,
            websocket_only: r.websocket_only,
            response_timeout,
            gzip,
            origins,
        });
    }

    let tls = match &file.tls {
        Some(t) => Some(super::tls::tls_config(src, t, &server.listen, base)?),
        None => None,
    };
    if let (Some(t), Some(a)) = (&tls, &admin) {
        if let Some(l) = t.listen.iter().find(|l| ports_overlap(a.listen, **l)) {
            return Err(ConfigError::whole(
                src,
                format!("admin.listen: {} takes the same port as tls.listen {l}; give the admin API a port of its own", a.listen),
            ));
        }
    }

    Ok(Config {
        server,
        admin,
        log,
        routes,
        upstreams,
        resolver: names::resolver_config(src, file.resolver.as_ref())?,
        source: None,
        tls,
    })
}

pub(super) fn admin_config(
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
pub(super) fn ports_overlap(admin: SocketAddr, listen: SocketAddr) -> bool {
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
pub(super) fn access_log_path(
    src: &Source<'_>,
    v: &Spanned<String>,
) -> Result<PathBuf, ConfigError> {
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

pub(super) fn static_config(
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
        Some(list) => mime_list(src, list, "route.static.gzip_types")?,
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

/// One `allowed_origins` entry: `scheme://host[:port]` as browsers send it
/// (no path, no trailing slash), lowercased; the host may start with `*.`.
fn origin_pattern(src: &Source<'_>, v: &Spanned<String>) -> Result<String, ConfigError> {
    let o = v.get_ref().trim().to_ascii_lowercase();
    let bad = |why: &str| {
        Err(ConfigError::at(
            src,
            v.span(),
            "route.allowed_origins",
            format!("{:?}: {why}; write it as a browser sends it, like \"https://app.example.com\" or \"https://*.example.com:8443\"", v.get_ref()),
        ))
    };
    let Some((scheme, rest)) = o.split_once("://") else {
        return bad("no scheme");
    };
    if !matches!(scheme, "http" | "https") {
        return bad("the scheme must be http or https");
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        return bad("an origin has no path");
    }
    let host = rest.strip_prefix("*.").unwrap_or(rest);
    if host.is_empty() || host.contains('*') {
        return bad("a wildcard may only be a leading \"*.\"");
    }
    Ok(o)
}

/// `10.0.0.0/8`, `2001:db8::/32`, or one address.
fn cidr(src: &Source<'_>, v: &Spanned<String>) -> Result<Cidr, ConfigError> {
    let bad = || {
        ConfigError::at(
            src,
            v.span(),
            "server.trusted_proxies",
            format!(
                "{:?} is not an address or a range like \"10.0.0.0/8\"",
                v.get_ref()
            ),
        )
    };
    let (ip, prefix) = match v.get_ref().trim().split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (v.get_ref().trim(), None),
    };
    let net: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
    };
    Ok(Cidr { net, prefix })
}

/// A list of MIME types, `text/*` wildcards allowed, lowercased.
fn mime_list(
    src: &Source<'_>,
    list: &[Spanned<String>],
    key: &str,
) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for t in list {
        let v = t.get_ref().trim().to_ascii_lowercase();
        if v.split('/').count() != 2 || v.contains(char::is_whitespace) {
            return Err(ConfigError::at(
                src,
                t.span(),
                key,
                format!(
                    "{:?} is not a MIME type like \"text/css\" or \"text/*\"",
                    t.get_ref()
                ),
            ));
        }
        out.push(v);
    }
    Ok(out)
}

pub(super) fn socket_addr(
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

pub(super) fn int_in(
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

pub(super) fn duration(
    src: &Source<'_>,
    v: &Spanned<String>,
    key: &str,
) -> Result<Duration, ConfigError> {
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
