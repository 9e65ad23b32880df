//! DNS discovery against a DNS server the test runs on loopback
//! (tests/common/dns.rs): addresses that come and go while sessions run,
//! TTLs honoured within [resolve_min_interval, resolve_max_interval], SRV
//! ports, failures that keep the last set, a name that never resolved, and
//! shards that never wait for DNS.

mod common;
#[path = "common/dns.rs"]
mod dns_server;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use dns_server::{Answer, DnsServer};
use hickory_proto::rr::RecordType;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Echo backends on 127.0.0.1, .2, ... all at one port, as the pods behind
/// one name are.
async fn backends_on_one_port(n: usize) -> Vec<Backend> {
    for _ in 0..20 {
        let first = Backend::start().await;
        let port = first.addr.port();
        let free = (2..=n).all(|i| {
            std::net::TcpListener::bind(("127.0.0.".to_string() + &i.to_string(), port)).is_ok()
        });
        if !free {
            first.kill();
            continue;
        }
        let mut v = vec![first];
        for i in 2..=n {
            v.push(Backend::start_on(format!("127.0.0.{i}:{port}").parse().unwrap()).await);
        }
        return v;
    }
    panic!("no port free on 127.0.0.1..{n} within 20 tries");
}

/// One route `/` to upstream `u` with these servers, the admin API, and a
/// `[resolver]` that asks `dns`.
fn config(dns: &DnsServer, servers: &str, resolver_extra: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\n\n[upstream.u]\nservers = [{servers}]\n\n[resolver]\nnameservers = [\"{}\"]\n{resolver_extra}\n",
        dns.addr
    )
}

fn status(proxy: &Proxy) -> serde_json::Value {
    let (code, body) = proxy.admin("GET", "/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Entry `i` of the `names` of the (first) upstream that has names, in
/// /status.
fn name_status(proxy: &Proxy, i: usize) -> serde_json::Value {
    let s = status(proxy);
    let named = s["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u.get("names").is_some())
        .cloned()
        .expect("an upstream with names in /status");
    named["names"][i].clone()
}

fn addresses(proxy: &Proxy) -> Vec<String> {
    let v = name_status(proxy, 0);
    let mut a: Vec<String> = v["addresses"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    a.sort();
    a
}

/// A sample of /metrics, 0 if absent.
fn metric(proxy: &Proxy, sample: &str) -> f64 {
    let (_, body) = proxy.admin("GET", "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn upgrade_status(proxy: &Proxy) -> u16 {
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    status_of(&read_head(&mut s).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_added_and_removed_while_sessions_run() {
    let b = backends_on_one_port(3).await;
    let port = b[0].addr.port();
    let dns = DnsServer::start();
    dns.set_addrs("pods.test", &[ip("127.0.0.1"), ip("127.0.0.2")], 1);
    let proxy = Proxy::start(&config(
        &dns,
        &format!("{{ addr = \"pods.test:{port}\" }}"),
        "resolve_min_interval = \"100ms\"",
    ));
    let want = |v: &[&str]| v.iter().map(|a| format!("{a}:{port}")).collect::<Vec<_>>();
    wait_until("two addresses", || {
        addresses(&proxy) == want(&["127.0.0.1", "127.0.0.2"])
    })
    .await;
    // The snapshot reaches the shards through the main thread's next tick.
    wait_until("backends in /status", || {
        status(&proxy)["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;

    let mut old = Vec::new();
    for _ in 0..4 {
        old.push(connect(&proxy.url("/")).await);
    }
    assert_eq!((b[0].active(), b[1].active(), b[2].active()), (2, 2, 0));

    // .1 leaves, .3 joins.
    dns.set_addrs("pods.test", &[ip("127.0.0.2"), ip("127.0.0.3")], 1);
    wait_until("the new set", || {
        addresses(&proxy) == want(&["127.0.0.2", "127.0.0.3"])
    })
    .await;
    wait_until(".1 retired with its sessions", || {
        let s = status(&proxy);
        let r = &s["upstreams"][0]["retired"];
        r[0]["addr"] == format!("127.0.0.1:{port}") && r[0]["active"] == 2
    })
    .await;
    // The removed address's sessions keep relaying.
    for ws in &mut old {
        echo(ws, "still here").await;
    }
    assert_eq!(b[0].active(), 2);

    // New sessions: none to the removed address; the new one, empty, gets
    // them first (least connections).
    let mut new = Vec::new();
    for _ in 0..4 {
        new.push(connect(&proxy.url("/")).await);
    }
    assert_eq!((b[0].active(), b[1].active(), b[2].active()), (2, 3, 3));
    for ws in &mut new {
        echo(ws, "hello").await;
    }
    proxy.wait_log("backends added [127.0.0.3", Duration::from_secs(5));
    let ok = metric(
        &proxy,
        &format!("ringlb_dns_resolutions_total{{name=\"pods.test:{port}\",result=\"ok\"}}"),
    );
    assert!(ok >= 2.0, "ok lookups: {ok}");
    assert_eq!(
        metric(
            &proxy,
            &format!("ringlb_dns_addresses{{name=\"pods.test:{port}\"}}")
        ),
        2.0
    );
    drop(old);
    wait_until("the retired address's sessions end", || b[0].active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_and_aaaa_addresses_are_each_a_backend() {
    let mut pair = None;
    for _ in 0..20 {
        let v4 = Backend::start().await;
        let port = v4.addr.port();
        if std::net::TcpListener::bind(("::1", port)).is_ok() {
            pair = Some((
                v4,
                Backend::start_on(format!("[::1]:{port}").parse().unwrap()).await,
            ));
            break;
        }
        v4.kill();
    }
    let (v4, v6) = pair.expect("a port free on 127.0.0.1 and ::1");
    let dns = DnsServer::start();
    dns.set_addrs("dual.test", &[ip("127.0.0.1"), ip("::1")], 30);
    let proxy = Proxy::start(&config(
        &dns,
        &format!(
            "{{ addr = \"dual.test:{}\", max_connections = 1 }}",
            v4.addr.port()
        ),
        "",
    ));
    let want = vec![v4.addr.to_string(), v6.addr.to_string()];
    wait_until("both families", || addresses(&proxy) == want).await;
    wait_until("backends in /status", || {
        status(&proxy)["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    // max_connections applies per address: one session each, a third is refused.
    let _a = connect(&proxy.url("/")).await;
    let _b = connect(&proxy.url("/")).await;
    assert_eq!((v4.active(), v6.active()), (1, 1));
    assert_eq!(upgrade_status(&proxy).await, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_is_honoured_within_bounds() {
    let dns = DnsServer::start();
    dns.set_addrs("ttl2.test", &[ip("127.0.0.1")], 2);
    dns.set_addrs("ttl0.test", &[ip("127.0.0.1")], 0);
    dns.set_addrs("ttl1h.test", &[ip("127.0.0.1")], 3600);
    let proxy = Proxy::start(&config(
        &dns,
        r#"{ addr = "ttl2.test:9" }, { addr = "ttl0.test:9" }, { addr = "ttl1h.test:9" }"#,
        "resolve_min_interval = \"500ms\"\nresolve_max_interval = \"3s\"",
    ));
    tokio::time::sleep(Duration::from_millis(7500)).await;
    // Asked at its TTL (2 s); TTL 0 at the floor (500 ms); an hour at the
    // ceiling (3 s). Each lookup asks once, so the gaps between A queries
    // are the re-resolution period.
    for (name, expect, min_count) in [
        ("ttl2.test", Duration::from_secs(2), 3),
        ("ttl0.test", Duration::from_millis(500), 10),
        ("ttl1h.test", Duration::from_secs(3), 2),
    ] {
        let q = dns.queries(name, RecordType::A);
        assert!(q.len() >= min_count, "{name}: {} queries", q.len());
        for w in q.windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap >= expect.mul_f64(0.9)
                    && gap <= expect.mul_f64(1.5) + Duration::from_millis(300),
                "{name}: asked again after {gap:?}, expected about {expect:?}"
            );
        }
        // Both families are asked: every address is a backend.
        assert!(
            !dns.queries(name, RecordType::AAAA).is_empty(),
            "{name}: no AAAA query"
        );
    }
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_bring_their_ports() {
    let (b1, b2, b3) = (
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    );
    let dns = DnsServer::start();
    dns.set_srv(
        "_ws._tcp.svc.test",
        &[
            (10, 5, b1.addr.port(), "pod-a.svc.test"),
            (10, 50, b2.addr.port(), "pod-b.svc.test"),
            // A higher priority is a fallback, not used while priority 10 exists.
            (20, 5, b3.addr.port(), "pod-c.svc.test"),
        ],
        30,
    );
    for t in ["pod-a.svc.test", "pod-b.svc.test", "pod-c.svc.test"] {
        dns.set_addrs(t, &[ip("127.0.0.1")], 30);
    }
    let proxy = Proxy::start(&config(
        &dns,
        r#"{ srv = "_ws._tcp.svc.test", weight = 2 }"#,
        "",
    ));
    let mut want = vec![b1.addr.to_string(), b2.addr.to_string()];
    want.sort();
    wait_until("both priority-10 targets", || addresses(&proxy) == want).await;
    wait_until("backends in /status", || {
        status(&proxy)["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    let s = status(&proxy);
    let backends = s["upstreams"][0]["backends"].as_array().unwrap();
    assert!(backends.iter().all(|b| b["weight"] == 2), "{backends:?}");
    assert_eq!(name_status(&proxy, 0)["kind"], "srv");
    let mut ws = Vec::new();
    for _ in 0..4 {
        ws.push(connect(&proxy.url("/")).await);
    }
    // SRV weights (5 and 50) are not used: least connections, equal weight.
    assert_eq!((b1.active(), b2.active(), b3.active()), (2, 2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_name_keeps_its_last_addresses() {
    let b = Backend::start().await;
    let dns = DnsServer::start();
    dns.set_addrs("flaky.test", &[ip("127.0.0.1")], 1);
    let name = format!("flaky.test:{}", b.addr.port());
    let proxy = Proxy::start(&config(
        &dns,
        &format!("{{ addr = \"{name}\" }}"),
        "resolve_min_interval = \"100ms\"\nresolve_max_interval = \"400ms\"\ntimeout = \"300ms\"",
    ));
    wait_until("resolved", || addresses(&proxy) == [b.addr.to_string()]).await;
    wait_until("a backend", || upgrade_status_blocking(&proxy) == 101).await;
    let counted = |result: &str| {
        metric(
            &proxy,
            &format!("ringlb_dns_resolutions_total{{name=\"{name}\",result=\"{result}\"}}"),
        )
    };

    // SERVFAIL, then no answer at all, then NXDOMAIN: each is counted, and
    // the address stays in use throughout.
    dns.set("flaky.test", Answer::ServFail);
    wait_until("a SERVFAIL counted", || counted("error") >= 1.0).await;
    let mut ws = connect(&proxy.url("/")).await;
    echo(&mut ws, "servfail").await;
    dns.stall(true);
    let before = counted("error");
    wait_until("a timeout counted", || counted("error") >= before + 1.0).await;
    let mut ws2 = connect(&proxy.url("/")).await;
    echo(&mut ws2, "stalled").await;
    dns.stall(false);
    dns.set("flaky.test", Answer::NxDomain);
    wait_until("an NXDOMAIN counted", || counted("empty") >= 1.0).await;
    let mut ws3 = connect(&proxy.url("/")).await;
    echo(&mut ws3, "nxdomain").await;
    assert_eq!(b.active(), 3);
    let n = name_status(&proxy, 0);
    assert_eq!(n["addresses"][0], b.addr.to_string(), "{n}");
    assert!(
        n["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{n}"
    );
    assert!(n["last_resolved"].is_string(), "{n}");
    // Logged at a bounded rate: one line for the whole run of failures.
    let lines = proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| {
            l.contains("dns: lookup of flaky.test") && l.contains("keeping its last 1 addresses")
        })
        .count();
    assert_eq!(lines, 1, "{:?}", proxy.log.lock().unwrap());
    assert!(counted("error") + counted("empty") >= 3.0);

    // It answers again: the run of failures ends, and is said to.
    dns.set_addrs("flaky.test", &[ip("127.0.0.1")], 1);
    proxy.wait_log("resolves again after", Duration::from_secs(10));
}

fn upgrade_status_blocking(proxy: &Proxy) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(upgrade_request("/", "").as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    status_of(&buf[..n])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_never_resolved_leaves_its_server_empty() {
    let b = Backend::start().await;
    let dns = DnsServer::start();
    let name = format!("later.test:{}", b.addr.port());
    let proxy = Proxy::start(&config(
        &dns,
        &format!("{{ addr = \"{name}\" }}"),
        "resolve_min_interval = \"100ms\"\nresolve_max_interval = \"200ms\"",
    ));
    wait_until("a failed lookup in /status", || {
        name_status(&proxy, 0)["last_error"].is_string()
    })
    .await;
    let n = name_status(&proxy, 0);
    assert_eq!(n["resolved"], false, "{n}");
    assert_eq!(n["name"], name, "{n}");
    assert_eq!(n["addresses"].as_array().unwrap().len(), 0, "{n}");
    assert!(n["last_resolved"].is_null(), "{n}");
    assert_eq!(
        status(&proxy)["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(upgrade_status(&proxy).await, 502);
    assert_eq!(
        metric(&proxy, &format!("ringlb_dns_addresses{{name=\"{name}\"}}")),
        0.0
    );
    proxy.wait_log(
        "it has never resolved, so it adds no backend",
        Duration::from_secs(5),
    );

    // Once it resolves, its address joins.
    dns.set_addrs("later.test", &[ip("127.0.0.1")], 1);
    wait_until("resolved", || name_status(&proxy, 0)["resolved"] == true).await;
    wait_until("upgrades reach the backend", || {
        upgrade_status_blocking(&proxy) == 101
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_the_last_addresses_while_dns_is_down() {
    let b = Backend::start().await;
    let dns = DnsServer::start();
    dns.set_addrs("steady.test", &[ip("127.0.0.1")], 1);
    let servers = format!("{{ addr = \"steady.test:{}\" }}", b.addr.port());
    let extra = "resolve_min_interval = \"100ms\"\ntimeout = \"300ms\"";
    let proxy = Proxy::start(&config(&dns, &servers, extra));
    wait_until("resolved", || addresses(&proxy) == [b.addr.to_string()]).await;
    dns.stall(true);
    // A reload (the weight changes) while DNS does not answer: the new
    // snapshot reuses the last addresses instead of emptying the upstream.
    let text = config(&dns, &servers.replace(" }", ", weight = 3 }"), extra);
    std::fs::write(&proxy.config_path, text).unwrap();
    proxy.signal("HUP");
    wait_until("reloaded with the new weight", || {
        status(&proxy)["upstreams"][0]["backends"][0]["weight"] == 3
    })
    .await;
    let mut ws = connect(&proxy.url("/")).await;
    echo(&mut ws, "after reload").await;
    assert_eq!(b.active(), 1);
}

/// Percentile of durations (nearest rank).
fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// A new session (handshake) plus one echo on it, timed.
async fn timed_session(proxy: &Proxy) -> Duration {
    let t = Instant::now();
    let mut ws = connect(&proxy.url("/fixed")).await;
    echo(&mut ws, "x").await;
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_shard_waits_for_a_stalled_nameserver() {
    let fixed = Backend::start().await;
    let named = Backend::start().await;
    let dns = DnsServer::start();
    dns.set_addrs("slow.test", &[ip("127.0.0.1")], 0);
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/fixed\"\nupstream = \"fixed\"\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\n\n[upstream.fixed]\nservers = [{{ addr = \"{}\" }}]\n\n[upstream.u]\nservers = [{{ addr = \"slow.test:{}\" }}]\n\n[resolver]\nnameservers = [\"{}\"]\nresolve_min_interval = \"100ms\"\nresolve_max_interval = \"100ms\"\ntimeout = \"1s\"\n",
        fixed.addr,
        named.addr.port(),
        dns.addr
    );
    let proxy = Proxy::start(&text);
    wait_until("resolved", || addresses(&proxy) == [named.addr.to_string()]).await;
    // /status shows the answer as soon as it comes; the shards get it with
    // the main thread's next tick.
    wait_until("the named backend takes sessions", || {
        upgrade_status_blocking(&proxy) == 101
    })
    .await;
    let mut held = connect(&proxy.url("/")).await;

    let mut base = Vec::new();
    for _ in 0..100 {
        base.push(timed_session(&proxy).await);
    }
    dns.stall(true);
    let asked = dns.queries("slow.test", RecordType::A).len();
    let t0 = Instant::now();
    let mut stalled = Vec::new();
    let mut held_echo = Vec::new();
    // Sessions for 2.5 s, longer than two of the resolver's 1 s timeouts,
    // paced so the window is covered whatever the machine's speed.
    while t0.elapsed() < Duration::from_millis(2500) && stalled.len() < 5000 {
        stalled.push(timed_session(&proxy).await);
        // And an echo on a session that was open before the stall, whose
        // backend came from the stalled name.
        let t = Instant::now();
        echo(&mut held, "held").await;
        held_echo.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        stalled.len() >= 100,
        "only {} sessions in 2.5 s",
        stalled.len()
    );
    // The resolver was waiting on the nameserver during the measurement:
    // it asked and got nothing, more than once (1 s timeout each).
    assert!(
        dns.queries("slow.test", RecordType::A).len() >= asked + 2,
        "the resolver did not keep asking while stalled"
    );
    let (b99, s99) = (pct(&mut base, 0.99), pct(&mut stalled, 0.99));
    let h99 = pct(&mut held_echo, 0.99);
    eprintln!(
        "session p99: {b99:?} before, {s99:?} while DNS stalls ({} sessions); held session's echo p99 {h99:?}",
        stalled.len()
    );
    assert!(h99 < Duration::from_millis(500), "held echo p99 {h99:?}");
    // A shard that waited for DNS would take a whole 1 s timeout; the
    // bound is far below that and generous for a loaded machine.
    assert!(
        s99 < Duration::from_millis(500).max(b99 * 5),
        "p99 {s99:?} while DNS stalls, {b99:?} before"
    );
    assert_eq!(
        addresses(&proxy),
        [named.addr.to_string()],
        "the last set stays"
    );
}

#[test]
fn check_accepts_names_without_resolving_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names.toml");
    // A nameserver nobody runs: check must not ask it.
    let closed = closed_port();
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\n\n[upstream.u]\nservers = [{{ addr = \"nowhere.invalid:9001\" }}, {{ srv = \"_ws._tcp.nowhere.invalid\" }}]\n\n[resolver]\nnameservers = [\"{closed}\"]\n"
        ),
    )
    .unwrap();
    let t = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("2 names resolved at run time (not by check)"),
        "{stdout}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_answer_is_capped_at_max_addresses() {
    let dns = DnsServer::start();
    let many: Vec<IpAddr> = (1..=40).map(|i| ip(&format!("127.0.1.{i}"))).collect();
    dns.set_addrs("many.test", &many, 30);
    let proxy = Proxy::start(&config(
        &dns,
        r#"{ addr = "many.test:9" }"#,
        "max_addresses = 3",
    ));
    wait_until("resolved", || name_status(&proxy, 0)["resolved"] == true).await;
    // 40 A records do not fit a 512-byte datagram: the answer came over TCP.
    assert!(dns.tcp_queries() >= 1);
    // The lowest three, in address order.
    assert_eq!(
        addresses(&proxy),
        ["127.0.1.1:9", "127.0.1.2:9", "127.0.1.3:9"]
    );
    proxy.wait_log(
        "many.test:9 gives 40 addresses; only the first 3 are backends (resolver.max_addresses)",
        Duration::from_secs(5),
    );
    wait_until("three backends", || {
        status(&proxy)["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .len()
            == 3
    })
    .await;
}
