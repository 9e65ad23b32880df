//! Backends given by name: `addr = "host:port"` and `srv = "_ws._tcp.name"`
//! in an upstream's `servers`, and the `[resolver]` section that says how
//! they are resolved. Only the spelling is checked here: `ringlb check`
//! never touches DNS, so a config is valid on a machine that cannot
//! resolve its names yet (a CI runner, a pod before its Service exists).

use super::file::{FileResolver, FileServerEntry};
use super::validate::{duration, int_in, socket_addr};
use super::*;

/// Where one `servers` entry finds its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// An `IP:port`: one backend, fixed.
    Fixed(SocketAddr),
    /// A name: as many backends as it resolves to.
    Named(NameTarget),
}

/// Reads a server entry's `addr` or `srv`. An `addr` that parses as an
/// `IP:port` stays a fixed address, as before names existed.
pub(super) fn server_target(
    src: &Source<'_>,
    e: &FileServerEntry,
    key: &dyn Fn(&str) -> String,
    at: std::ops::Range<usize>,
) -> Result<Target, ConfigError> {
    match (&e.addr, &e.srv) {
        (Some(_), Some(s)) => Err(ConfigError::at(
            src,
            s.span(),
            &key("servers.srv"),
            "give either addr or srv, not both (srv brings the port)",
        )),
        (None, None) => Err(ConfigError::at(
            src,
            at,
            &key("servers"),
            "a server needs addr = \"IP:port\" or \"host:port\", or srv = \"_service._tcp.name\"",
        )),
        (Some(a), None) => {
            if let Ok(addr) = a.get_ref().parse::<SocketAddr>() {
                return Ok(Target::Fixed(addr));
            }
            let bad = |why: String| {
                ConfigError::at(
                    src,
                    a.span(),
                    &key("servers.addr"),
                    format!(
                        "{:?} {why}; give \"IP:port\" (like \"127.0.0.1:8080\" or \"[::1]:8080\") or \"host:port\" (like \"ws-backend.default.svc.cluster.local:9001\")",
                        a.get_ref()
                    ),
                )
            };
            let (host, port) = a
                .get_ref()
                .rsplit_once(':')
                .ok_or_else(|| bad("has no port".into()))?;
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("has port {port:?}, not one in 1..=65535")))?;
            if host.starts_with('[')
                || host.contains(':')
                || host.parse::<std::net::IpAddr>().is_ok()
            {
                return Err(bad("is not a valid address".into()));
            }
            host_name(host).map_err(bad)?;
            Ok(Target::Named(NameTarget::Host {
                host: host.to_ascii_lowercase(),
                port,
            }))
        }
        (None, Some(s)) => {
            let name = s.get_ref();
            let bad = |why: String| {
                ConfigError::at(
                    src,
                    s.span(),
                    &key("servers.srv"),
                    format!("{name:?} {why}; give an SRV name like \"_ws._tcp.ws-backend.default.svc.cluster.local\""),
                )
            };
            host_name(name).map_err(bad)?;
            let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
            if labels.len() < 3 || !labels[0].starts_with('_') || !labels[1].starts_with('_') {
                return Err(bad("is not _service._proto.domain".into()));
            }
            Ok(Target::Named(NameTarget::Srv(name.to_ascii_lowercase())))
        }
    }
}

/// A DNS name as RFC 1035 (with `_` allowed, as SRV owners use it):
/// labels of 1 to 63 letters, digits, `-` or `_`, at most 253 in all,
/// one trailing dot allowed.
fn host_name(name: &str) -> Result<(), String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() {
        return Err("has an empty host name".into());
    }
    if bare.len() > 253 {
        return Err("is longer than a DNS name may be (253)".into());
    }
    for label in bare.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "has a label {label:?} that is empty or longer than 63"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("has {c:?}, which a host name cannot contain"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "has a label {label:?} that starts or ends with '-'"
            ));
        }
    }
    // No top-level domain is all digits (RFC 3696 §2): this is a mistyped
    // IPv4 address, which DNS would only fail to find.
    if bare
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("is not a valid address".into());
    }
    Ok(())
}

/// `[resolver]`.
pub(super) fn resolver_config(
    src: &Source<'_>,
    r: Option<&FileResolver>,
) -> Result<ResolverSettings, ConfigError> {
    let mut out = ResolverSettings::default();
    let Some(r) = r else { return Ok(out) };
    if let Some(list) = &r.nameservers {
        if list.get_ref().is_empty() {
            return Err(ConfigError::at(
                src,
                list.span(),
                "resolver.nameservers",
                "is empty; leave it out to use /etc/resolv.conf",
            ));
        }
        let mut ns = Vec::new();
        for v in list.get_ref() {
            let a = socket_addr(src, v, "resolver.nameservers")?;
            if ns.contains(&a) {
                return Err(ConfigError::at(
                    src,
                    v.span(),
                    "resolver.nameservers",
                    format!("{a} is listed twice"),
                ));
            }
            ns.push(a);
        }
        out.nameservers = Some(ns);
    }
    if let Some(v) = &r.resolve_min_interval {
        out.min_interval = duration(src, v, "resolver.resolve_min_interval")?;
    }
    if let Some(v) = &r.resolve_max_interval {
        out.max_interval = duration(src, v, "resolver.resolve_max_interval")?;
        if out.max_interval < out.min_interval {
            return Err(ConfigError::at(
                src,
                v.span(),
                "resolver.resolve_max_interval",
                format!(
                    "{:?} is shorter than resolve_min_interval ({:?})",
                    out.max_interval, out.min_interval
                ),
            ));
        }
    } else if out.max_interval < out.min_interval {
        let v = r
            .resolve_min_interval
            .as_ref()
            .expect("only min can be raised");
        return Err(ConfigError::at(
            src,
            v.span(),
            "resolver.resolve_min_interval",
            format!(
                "{:?} is longer than resolve_max_interval (default {:?})",
                out.min_interval, out.max_interval
            ),
        ));
    }
    if let Some(v) = &r.timeout {
        out.timeout = duration(src, v, "resolver.timeout")?;
    }
    if let Some(v) = &r.max_addresses {
        out.max_addresses = int_in(src, v, "resolver.max_addresses", 1, 10_000)? as usize;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::*;

    const MIN: &str = r#"
[server]
listen = ["127.0.0.1:8080"]

[[route]]
path = "/"
upstream = "u"

[upstream.u]
servers = [{ addr = "127.0.0.1:9001" }]
"#;

    fn with_servers(servers: &str, extra: &str) -> Result<Config, String> {
        let text = MIN.replace("{ addr = \"127.0.0.1:9001\" }", servers) + extra;
        Config::parse(&text, "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn names_are_accepted_without_resolving() {
        let c = with_servers(
            r#"{ addr = "127.0.0.1:9001" }, { addr = "WS-Backend.default.svc.cluster.local.:9001", weight = 3 }, { srv = "_ws._tcp.ws.invalid", max_connections = 5 }"#,
            "",
        )
        .unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.servers.len(), 1);
        assert_eq!(u.named.len(), 2);
        assert_eq!(
            u.named[0].target,
            NameTarget::Host {
                host: "ws-backend.default.svc.cluster.local.".into(),
                port: 9001
            }
        );
        assert_eq!(u.named[0].weight.get(), 3);
        assert_eq!(
            u.named[1].target,
            NameTarget::Srv("_ws._tcp.ws.invalid".into())
        );
        assert_eq!(u.named[1].max_connections.map(|m| m.get()), Some(5));
        assert_eq!(c.names().len(), 2);
        assert_eq!(c.resolver, ResolverSettings::default());
        // A server of names only is a server: it may resolve later.
        let c = with_servers(r#"{ addr = "backend:80" }"#, "").unwrap();
        assert!(c.upstreams[0].servers.is_empty());
    }

    #[test]
    fn bad_names_name_the_key() {
        for (servers, key, what) in [
            (r#"{ addr = "backend" }"#, "servers.addr", "has no port"),
            (
                r#"{ addr = "backend:0" }"#,
                "servers.addr",
                "not one in 1..=65535",
            ),
            (
                r#"{ addr = "backend:http" }"#,
                "servers.addr",
                "not one in 1..=65535",
            ),
            (
                r#"{ addr = "bad name:80" }"#,
                "servers.addr",
                "cannot contain",
            ),
            (r#"{ addr = "a..b:80" }"#, "servers.addr", "empty"),
            (
                r#"{ addr = "-a.b:80" }"#,
                "servers.addr",
                "starts or ends with '-'",
            ),
            (r#"{ addr = "[::1]:x" }"#, "servers.addr", "port"),
            (
                r#"{ addr = "300.1.1.1:80" }"#,
                "servers.addr",
                "not a valid address",
            ),
            (
                r#"{ srv = "ws.example.com" }"#,
                "servers.srv",
                "_service._proto.domain",
            ),
            (
                r#"{ srv = "_ws._tcp" }"#,
                "servers.srv",
                "_service._proto.domain",
            ),
            (
                r#"{ srv = "_ws._tcp.x", addr = "a:1" }"#,
                "servers.srv",
                "not both",
            ),
            (r#"{ weight = 2 }"#, "servers", "needs addr"),
            (
                r#"{ addr = "a:1" }, { addr = "A:1" }"#,
                "servers.addr",
                "listed twice",
            ),
            (
                r#"{ srv = "_ws._tcp.x" }, { srv = "_ws._tcp.x" }"#,
                "servers.srv",
                "listed twice",
            ),
        ] {
            let e = with_servers(servers, "").unwrap_err();
            assert!(e.contains(&format!("upstream.u.{key}:")), "{servers}: {e}");
            assert!(e.contains(what), "{servers}: {e}");
        }
        let long = format!("{}.example:80", "a".repeat(64));
        let e = with_servers(&format!("{{ addr = \"{long}\" }}"), "").unwrap_err();
        assert!(e.contains("longer than 63"), "{e}");
    }

    #[test]
    fn resolver_section() {
        let c = with_servers(
            r#"{ addr = "b:1" }"#,
            "\n[resolver]\nnameservers = [\"127.0.0.1:5353\", \"[::1]:53\"]\nresolve_min_interval = \"2s\"\nresolve_max_interval = \"1m\"\ntimeout = \"500ms\"\nmax_addresses = 3\n",
        )
        .unwrap();
        let r = &c.resolver;
        assert_eq!(
            r.nameservers.as_deref(),
            Some(
                &[
                    "127.0.0.1:5353".parse().unwrap(),
                    "[::1]:53".parse().unwrap()
                ][..]
            )
        );
        assert_eq!(r.min_interval, Duration::from_secs(2));
        assert_eq!(r.max_interval, Duration::from_secs(60));
        assert_eq!(r.timeout, Duration::from_millis(500));
        assert_eq!(r.max_addresses, 3);
        for (body, key) in [
            ("nameservers = []", "resolver.nameservers"),
            ("nameservers = [\"dns.example:53\"]", "resolver.nameservers"),
            (
                "nameservers = [\"127.0.0.1:53\", \"127.0.0.1:53\"]",
                "resolver.nameservers",
            ),
            (
                "resolve_min_interval = \"0s\"",
                "resolver.resolve_min_interval",
            ),
            (
                "resolve_min_interval = \"10m\"",
                "resolver.resolve_min_interval",
            ),
            (
                "resolve_min_interval = \"5s\"\nresolve_max_interval = \"2s\"",
                "resolver.resolve_max_interval",
            ),
            ("timeout = \"soon\"", "resolver.timeout"),
            ("max_addresses = 0", "resolver.max_addresses"),
            ("ttl = \"1s\"", "ttl"),
        ] {
            let e = with_servers(r#"{ addr = "b:1" }"#, &format!("\n[resolver]\n{body}\n"))
                .unwrap_err();
            assert!(e.contains(key), "{body}: {e}");
        }
    }
}
