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
        ("scheduling", "\"fifo\""),
        ("stalled_peer_timeout", "\"0s\""),
        ("stalled_peer_timeout", "\"soon\""),
        ("tcp_user_timeout", "\"0s\""),
        ("tcp_user_timeout", "\"100d\""),
        ("max_handshakes_per_second", "0"),
        ("handshake_burst", "10"),
        ("retry_after_max", "\"500ms\""),
        ("max_connections_per_ip", "0"),
        ("trusted_proxies", "[\"10.0.0.0/8\"]"),
        ("upgrade_timeout", "\"0s\""),
        ("heap_trim_interval", "\"0s\""),
        ("heap_trim_interval", "\"often\""),
        ("upgrade_timeout", "\"later\""),
        ("pid_file", "\"\""),
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
fn heap_trim_interval_defaults_on_and_can_be_turned_off() {
    let c = Config::parse(MIN, "t").unwrap();
    assert_eq!(c.server.heap_trim_interval, Some(Duration::from_secs(10)));
    let off = MIN.replace("[server]\n", "[server]\nheap_trim_interval = \"off\"\n");
    assert_eq!(
        Config::parse(&off, "t").unwrap().server.heap_trim_interval,
        None
    );
    let every = MIN.replace("[server]\n", "[server]\nheap_trim_interval = \"2s\"\n");
    assert_eq!(
        Config::parse(&every, "t")
            .unwrap()
            .server
            .heap_trim_interval,
        Some(Duration::from_secs(2))
    );
}

#[test]
fn scheduling_defaults_to_batch_and_can_be_normal() {
    let c = Config::parse(MIN, "t").unwrap();
    assert_eq!(c.server.scheduling, Scheduling::Batch);
    let normal = MIN.replace("[server]\n", "[server]\nscheduling = \"normal\"\n");
    assert_eq!(
        Config::parse(&normal, "t").unwrap().server.scheduling,
        Scheduling::Normal
    );
    let e = err(&MIN.replace("[server]\n", "[server]\nscheduling = \"rt\"\n"));
    assert!(e.contains("give \"batch\""), "{e}");
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

#[test]
fn route_origin_and_gzip_keys() {
    let route = |extra: &str| {
        MIN.replace(
            "upstream = \"u\"\n",
            &format!("upstream = \"u\"\n{extra}\n"),
        )
    };
    let c = Config::parse(
        &route("allowed_origins = [\"https://App.example.com\", \"https://*.example.com:8443\"]\ngzip = true"),
        "t.toml",
    )
    .unwrap();
    let o = c.routes[0].origins.as_ref().unwrap();
    assert_eq!(
        o.allowed,
        ["https://app.example.com", "https://*.example.com:8443"]
    );
    assert!(o.allow_missing);
    assert!(c.routes[0].gzip.is_some());
    for bad in [
        "app.example.com",
        "ftp://app.example.com",
        "https://app.example.com/",
        "https://app.*.com",
        "https://*",
    ] {
        let e = err(&route(&format!("allowed_origins = [\"{bad}\"]")));
        assert!(e.contains("route.allowed_origins"), "{bad}: {e}");
    }
    let e = err(&route("allow_missing_origin = false"));
    assert!(e.contains("route.allow_missing_origin"), "{e}");
    let e = err(&route("gzip = true\ngzip_types = [\"json\"]"));
    assert!(e.contains("route.gzip_types"), "{e}");
}

#[test]
fn proxy_protocol_keys() {
    let c = Config::parse(
        &MIN.replace(
            "[server]\n",
            "[server]\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n",
        ),
        "t.toml",
    )
    .unwrap();
    let nets = c.server.trusted_proxies.unwrap();
    assert!(nets[0].contains("10.9.8.7".parse().unwrap()));
    assert!(!nets[0].contains("11.0.0.1".parse().unwrap()));
    assert!(nets[1].contains("192.0.2.7".parse().unwrap()));
    assert!(!nets[1].contains("192.0.2.8".parse().unwrap()));
    assert!(nets[2].contains("2001:db8:1::5".parse().unwrap()));
    assert!(
        nets[0].contains("::ffff:10.1.2.3".parse().unwrap()),
        "IPv4-mapped"
    );
    for bad in ["10.0.0.0/33", "10.0.0/8", "host.example"] {
        let e = err(&MIN.replace(
            "[server]\n",
            &format!("[server]\nproxy_protocol = true\ntrusted_proxies = [\"{bad}\"]\n"),
        ));
        assert!(e.contains("server.trusted_proxies"), "{bad}: {e}");
    }
    let e = err(&MIN.replace("[server]\n", "[server]\nproxy_protocol = true\n"));
    assert!(
        e.contains("server.trusted_proxies"),
        "names what is missing: {e}"
    );
    let e = err(&MIN.replace("servers = [", "send_proxy_protocol = \"v3\"\nservers = ["));
    assert!(e.contains("send_proxy_protocol"), "{e}");
}

#[test]
fn paced_close_keys() {
    let c = Config::parse(MIN, "t.toml").unwrap();
    assert_eq!(
        c.server.close_boundary_timeout,
        DEFAULT_CLOSE_BOUNDARY_TIMEOUT
    );
    assert_eq!(c.server.drain_close_rate, None);
    assert_eq!(c.upstreams[0].rebalance, None, "off when absent");
    let on = MIN
        .replace(
            "[server]\n",
            "[server]\ndrain_close_rate = 200\nclose_boundary_timeout = \"5s\"\n",
        )
        .replace(
            "[upstream.u]\n",
            "[upstream.u]\nrebalance = { rate = 20 }\n",
        );
    let c = Config::parse(&on, "t.toml").unwrap();
    assert_eq!(c.server.drain_close_rate.map(|r| r.get()), Some(200));
    assert_eq!(c.server.close_boundary_timeout, Duration::from_secs(5));
    let r = c.upstreams[0].rebalance.unwrap();
    assert_eq!((r.threshold, r.rate.get()), (0.25, 20));
    for (server, upstream, wants) in [
        ("drain_close_rate = 0", "", "server.drain_close_rate"),
        (
            "close_boundary_timeout = \"0s\"",
            "",
            "server.close_boundary_timeout",
        ),
        (
            "",
            "rebalance = { threshold = 0.0, rate = 5 }",
            "upstream.u.rebalance.threshold",
        ),
        (
            "",
            "rebalance = { threshold = 11.0, rate = 5 }",
            "upstream.u.rebalance.threshold",
        ),
        ("", "rebalance = { rate = 0 }", "upstream.u.rebalance.rate"),
        ("", "rebalance = { threshold = 0.5 }", "rate"),
        ("", "rebalance = { rate = 5, every = 3 }", "every"),
    ] {
        let text = MIN
            .replace("[server]\n", &format!("[server]\n{server}\n"))
            .replace("[upstream.u]\n", &format!("[upstream.u]\n{upstream}\n"));
        let e = err(&text);
        assert!(e.contains(wants), "{server}{upstream}: {e}");
    }
}
