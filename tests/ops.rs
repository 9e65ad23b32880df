//! Operations: metrics, status, backend drain, reload, SIGTERM drain,
//! failover, access log. ringlb runs as a child process; signals are real.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn with_admin(
    backends: &[std::net::SocketAddr],
    server_extra: &str,
    upstream_extra: &str,
) -> String {
    format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        config(backends, server_extra, upstream_extra)
    )
}

/// Parses Prometheus text with a real parser; returns "name{k=v,...}" -> value.
fn scrape(proxy: &Proxy) -> HashMap<String, f64> {
    let (status, body) = proxy.admin("GET", "/metrics");
    assert_eq!(status, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("metrics are valid Prometheus text");
    let mut out = HashMap::new();
    for s in parsed.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|c| c.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        };
        out.insert(format!("{}{{{}}}", s.metric, labels.join(",")), value);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_match_what_happened() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let proxy = Proxy::start(&with_admin(&[a.addr, b.addr], "", ""));
    for i in 0..3 {
        let mut ws = connect(&proxy.url("/")).await;
        echo(&mut ws, &format!("m{i}")).await;
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let r = raw_exchange(
        proxy.addr(),
        upgrade_request("/", "")
            .replace("Version: 13", "Version: 7")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&r), 426);
    wait_until("sessions freed", || {
        scrape(&proxy)
            .iter()
            .filter(|(k, _)| k.starts_with("ringlb_connections_active"))
            .map(|(_, v)| *v)
            .sum::<f64>()
            == 0.0
    })
    .await;

    let m = scrape(&proxy);
    assert_eq!(m["ringlb_handshakes_total{result=101}"], 3.0);
    assert_eq!(m["ringlb_handshakes_total{result=426}"], 1.0);
    assert_eq!(m["ringlb_handshakes_total{result=404}"], 0.0);
    let per_backend = |name: &str| -> f64 {
        [a.addr, b.addr]
            .iter()
            .map(|x| m[&format!("{name}{{backend={x},upstream=u}}")])
            .sum()
    };
    assert_eq!(per_backend("ringlb_backend_connections_total"), 3.0);
    assert_eq!(per_backend("ringlb_backend_active_connections"), 0.0);
    assert_eq!(per_backend("ringlb_backend_up"), 2.0);
    assert_eq!(per_backend("ringlb_backend_connect_failures_total"), 0.0);
    // Each session sent a head, a text frame (2 + 4 mask + 2 bytes) and a close frame.
    assert!(m["ringlb_bytes_total{direction=client_to_backend}"] > 3.0 * (8.0 + 6.0));
    assert!(m["ringlb_bytes_total{direction=backend_to_client}"] > 0.0);
    assert_eq!(m["ringlb_handshake_duration_seconds_count{}"], 4.0);
    assert_eq!(m["ringlb_config_reloads_total{result=ok}"], 0.0);

    let (status, body) = proxy.admin("GET", "/status");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["upstreams"][0]["name"], "u");
    assert_eq!(v["upstreams"][0]["backends"].as_array().unwrap().len(), 2);
    assert_eq!(v["upstreams"][0]["backends"][0]["state"], "up");
    assert_eq!(v["shards"].as_array().unwrap().len(), 2);
    assert!(v["config_file"].as_str().unwrap().ends_with("ringlb.toml"));
    assert_eq!(proxy.admin("GET", "/nope").0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_endpoint_stops_new_connections_to_one_backend() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let proxy = Proxy::start(&with_admin(&[a.addr, b.addr], "", ""));
    let mut first = Vec::new();
    for i in 0..2 {
        let mut ws = connect(&proxy.url("/")).await;
        echo(&mut ws, &format!("{i}")).await;
        first.push(ws);
    }
    assert_eq!((a.active(), b.active()), (1, 1));
    let (st, body) = proxy.admin("POST", &format!("/backends/u/{}/drain", a.addr));
    assert_eq!(st, 200, "{body}");
    let mut more = Vec::new();
    for i in 0..4 {
        let mut ws = connect(&proxy.url("/")).await;
        echo(&mut ws, &format!("{i}")).await;
        more.push(ws);
    }
    assert_eq!(
        (a.active(), b.active()),
        (1, 5),
        "a drained backend got new connections"
    );
    for ws in &mut first {
        echo(ws, "existing sessions continue").await;
    }
    let (_, status) = proxy.admin("GET", "/status");
    assert!(status.contains("\"draining\""), "{status}");
    assert_eq!(
        proxy
            .admin("POST", &format!("/backends/u/{}/undrain", a.addr))
            .0,
        200
    );
    let mut ws = connect(&proxy.url("/")).await;
    echo(&mut ws, "x").await;
    assert_eq!(
        a.active(),
        2,
        "undrained backend is the least loaded and must get it"
    );
    assert_eq!(proxy.admin("POST", "/backends/u/127.0.0.1:1/drain").0, 404);
    assert_eq!(proxy.admin("POST", "/backends/nope/1.2.3.4:5/drain").0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_switches_backends_listeners_and_rejects_bad_files() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let proxy = Proxy::start(&with_admin(&[a.addr], "", ""));
    let mut old = connect(&proxy.url("/")).await;
    echo(&mut old, "before").await;
    assert_eq!(a.active(), 1);

    // New backend set and a second listen address.
    let text = with_admin(&[b.addr], "", "").replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:0\", \"{}\"]", closed_port()),
    );
    std::fs::write(&proxy.config_path, &text).unwrap();
    proxy.signal("HUP");
    proxy.wait_log("reloaded", Duration::from_secs(10));
    let mut new = connect(&proxy.url("/")).await;
    echo(&mut new, "after").await;
    assert_eq!(
        (a.active(), b.active()),
        (1, 1),
        "new connections follow the new backend set"
    );
    echo(&mut old, "the old session is untouched").await;
    proxy.wait_log("listening on", Duration::from_secs(5));
    let added: Vec<String> = proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| {
            l.split("listening on ")
                .nth(1)
                .map(|r| r.split_whitespace().next().unwrap().to_string())
        })
        .filter(|a| *a != proxy.addr().to_string() && !is_admin_addr(a, &proxy))
        .collect();
    assert_eq!(added.len(), 1, "{added:?}");
    let mut via_new_listener = connect(&format!("ws://{}/", added[0])).await;
    echo(&mut via_new_listener, "new listener").await;

    // A broken file is rejected; everything keeps running.
    std::fs::write(
        &proxy.config_path,
        "[server]\nlisten = [\"127.0.0.1:0\"]\nbogus = 1\n",
    )
    .unwrap();
    proxy.signal("HUP");
    proxy.wait_log("reload rejected", Duration::from_secs(10));
    let m = scrape(&proxy);
    assert_eq!(m["ringlb_config_reloads_total{result=ok}"], 1.0);
    assert_eq!(m["ringlb_config_reloads_total{result=error}"], 1.0);
    let mut after_bad = connect(&proxy.url("/")).await;
    echo(&mut after_bad, "still fine").await;
    assert_eq!(b.active(), 3);
}

fn is_admin_addr(addr: &str, proxy: &Proxy) -> bool {
    proxy.admin.is_some_and(|a| a.to_string() == addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_waits_for_sessions() {
    let a = Backend::start().await;
    let mut proxy = Proxy::start(&config(&[a.addr], "", ""));
    let mut live = connect(&proxy.url("/")).await;
    echo(&mut live, "before").await;
    proxy.signal("TERM");
    proxy.wait_log("draining", Duration::from_secs(10));
    // Listeners close at once (bounded wait for the shards to act).
    let deadline = Instant::now() + Duration::from_secs(3);
    while TcpStream::connect(proxy.addr()).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..3 {
        echo(&mut live, &format!("during drain {i}")).await;
    }
    assert!(
        proxy.wait_exit(Duration::from_millis(300)).is_none(),
        "exited with a session open"
    );
    last_session_ends_then_exit_0(live, &mut proxy).await;
}

/// A draining ringlb's last session closes; the process then exits 0.
async fn last_session_ends_then_exit_0(mut live: Ws, proxy: &mut Proxy) {
    live.close(None).await.unwrap();
    while let Some(Ok(_)) = live.next().await {}
    drop(live);
    let st = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit after the last session");
    assert!(st.success(), "{st:?}");
}

/// Readiness is not liveness: once a SIGTERM drain starts, `/readyz`
/// answers 503 so health checks take the instance out, while `/healthz`
/// stays 200 (the process is fine) and live sessions keep relaying until
/// they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_draining_and_healthz_does_not() {
    let a = Backend::start().await;
    let mut proxy = Proxy::start(&with_admin(&[a.addr], "drain_timeout = \"30s\"", ""));
    assert_eq!(proxy.admin("GET", "/readyz"), (200, "ready\n".to_string()));
    let mut live = connect(&proxy.url("/")).await;
    echo(&mut live, "before").await;
    proxy.signal("TERM");
    wait_until("readyz says draining", || {
        proxy.admin("GET", "/readyz") == (503, "draining\n".to_string())
    })
    .await;
    assert_eq!(proxy.admin("GET", "/healthz"), (200, "ok\n".to_string()));
    for i in 0..3 {
        echo(&mut live, &format!("while draining {i}")).await;
    }
    last_session_ends_then_exit_0(live, &mut proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_what_is_left() {
    let a = Backend::start().await;
    let mut proxy = Proxy::start(&config(&[a.addr], "drain_timeout = \"300ms\"", ""));
    let mut live = connect(&proxy.url("/")).await;
    echo(&mut live, "before").await;
    let t = Instant::now();
    proxy.signal("TERM");
    // Idle between messages: the clean close, Close 1012 (reconnect) to the
    // client and 1001 (going away) to the backend.
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match live.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("session ended without a Close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("session not closed after drain_timeout");
    assert_eq!(got, Some(1012));
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    drop(live);
    wait_until("backend got the Close", || {
        a.closes.lock().unwrap().contains(&1001)
    })
    .await;
    let st = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit");
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_fails_over_is_marked_down_and_comes_back() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let proxy = Proxy::start(&with_admin(
        &[a.addr, b.addr],
        "",
        "fail_timeout = \"1s\"\nmax_fails = 1",
    ));
    let mut on_a = None;
    let mut on_b = None;
    for i in 0..2 {
        let before = a.active();
        let mut ws = connect(&proxy.url("/")).await;
        echo(&mut ws, &format!("{i}")).await;
        if a.active() > before {
            on_a = Some(ws)
        } else {
            on_b = Some(ws)
        }
    }
    let (mut on_a, mut on_b) = (on_a.unwrap(), on_b.unwrap());
    a.kill();
    // a's client sees its session end.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match on_a.next().await {
                Some(Ok(m)) if !m.is_close() => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "client of the killed backend was not closed");
    drop(on_a);
    // New clients never notice: a refused connect is retried on b.
    for i in 0..6 {
        let mut ws = connect(&proxy.url("/")).await;
        echo(&mut ws, &format!("after kill {i}")).await;
    }
    echo(&mut on_b, "b unaffected").await;
    let m = scrape(&proxy);
    assert_eq!(
        m[&format!("ringlb_backend_up{{backend={},upstream=u}}", a.addr)],
        0.0
    );
    assert!(
        m[&format!(
            "ringlb_backend_connect_failures_total{{backend={},upstream=u}}",
            a.addr
        )] >= 1.0
    );
    proxy.wait_log("marked down", Duration::from_secs(1));

    // Back on the same port: after fail_timeout it takes connections again.
    let a_active = format!(
        "ringlb_backend_active_connections{{backend={},upstream=u}}",
        a.addr
    );
    let b_active = format!(
        "ringlb_backend_active_connections{{backend={},upstream=u}}",
        b.addr
    );
    wait_until("old sessions gone", || {
        let m = scrape(&proxy);
        m[&a_active] == 0.0 && m[&b_active] == 1.0
    })
    .await;
    let a2 = Backend::start_on(a.addr).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut ws = connect(&proxy.url("/")).await;
    echo(&mut ws, "a is back").await;
    assert_eq!(
        a2.active(),
        1,
        "the least-loaded, recovered backend got the connection"
    );
    assert_eq!(
        scrape(&proxy)[&format!("ringlb_backend_up{{backend={},upstream=u}}", a.addr)],
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_session() {
    let a = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let text = format!(
        "{}\n[log]\naccess = \"{}\"\n",
        config(&[a.addr], "", ""),
        log.display()
    );
    let proxy = Proxy::start(&text);
    let mut ws = connect(&proxy.url("/chat")).await;
    echo(&mut ws, "hello").await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    let r = raw_exchange(proxy.addr(), b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status_of(&r), 400);
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        if lines.len() >= 2 {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "access log has {} lines",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 2);
    let ws_line = lines
        .iter()
        .find(|l| l["status"] == 101)
        .expect("a 101 line");
    assert_eq!(ws_line["route"], "/");
    assert_eq!(ws_line["backend"], a.addr.to_string());
    assert_eq!(ws_line["closed_by"], "backend");
    assert!(ws_line["bytes_from_client"].as_u64().unwrap() > 0);
    assert!(ws_line["bytes_from_backend"].as_u64().unwrap() > 0);
    assert!(ws_line["handshake_ms"].as_f64().unwrap() >= 0.0);
    assert!(ws_line["client"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let bad = lines
        .iter()
        .find(|l| l["status"] == 400)
        .expect("a 400 line");
    assert_eq!(bad["closed_by"], "proxy");
    assert!(bad["backend"].is_null());
}

/// 2000 sessions exchange messages while the backend set is swapped ten
/// times: no session or message is lost, new sessions follow the new set,
/// and live counts stay right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing() {
    const N: usize = 2000;
    let set1 = [Backend::start().await, Backend::start().await];
    let set2 = [Backend::start().await, Backend::start().await];
    let proxy = Proxy::start(&with_admin(&[set1[0].addr, set1[1].addr], "", ""));
    let mut sessions = Vec::with_capacity(N);
    for i in 0..N {
        let mut ws = connect(&proxy.url("/")).await;
        echo(&mut ws, &format!("open {i}")).await;
        sessions.push(ws);
    }
    assert_eq!(set1[0].active() + set1[1].active(), N);

    let stop = Arc::new(AtomicBool::new(false));
    let messages = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, mut ws) in sessions.into_iter().enumerate() {
        let stop = stop.clone();
        let messages = messages.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                echo(&mut ws, &format!("{i}:{n}")).await;
                n += 1;
                messages.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ws
        }));
    }
    let sets = [&set1, &set2];
    for r in 0..10 {
        let set = sets[(r + 1) % 2];
        std::fs::write(
            &proxy.config_path,
            with_admin(&[set[0].addr, set[1].addr], "", ""),
        )
        .unwrap();
        proxy.signal("HUP");
        let want = r as f64 + 1.0;
        wait_until("reload applied", || {
            scrape(&proxy)["ringlb_config_reloads_total{result=ok}"] == want
        })
        .await;
        // Upgrade requests seen only grow, unlike live counts, which the
        // previous probe's close may still be lowering.
        let seen = |s: &[Backend; 2]| {
            s.iter()
                .map(|b| b.requests.lock().unwrap().len())
                .sum::<usize>()
        };
        let before = seen(set);
        let mut probe = connect(&proxy.url("/")).await;
        echo(&mut probe, "probe").await;
        assert_eq!(
            seen(set),
            before + 1,
            "reload {r}: new session went elsewhere"
        );
        drop(probe);
    }
    stop.store(true, Ordering::Relaxed);
    let mut survivors = Vec::new();
    for t in tasks {
        survivors.push(t.await.expect("a session failed during the reloads"));
    }
    let total = messages.load(Ordering::Relaxed);
    eprintln!("reload under load: {N} sessions, 10 reloads, {total} messages echoed, 0 lost");
    assert!(total >= N as u64, "{total}");
    assert_eq!(survivors.len(), N);
    // Counts per backend in ringlb agree with the backends' own.
    wait_until("probes closed", || set1[0].active() + set1[1].active() == N).await;
    let (_, body) = proxy.admin("GET", "/status");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for (i, b) in set1.iter().enumerate() {
        let seen = v["upstreams"][0]["backends"][i]["active"].as_u64().unwrap() as usize;
        assert_eq!(seen, b.active(), "ringlb's count for {}", b.addr);
    }
    for mut ws in survivors.into_iter().step_by(199) {
        echo(&mut ws, "after").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_stops_at_once() {
    let a = Backend::start().await;
    let mut proxy = Proxy::start(&config(&[a.addr], "", ""));
    let mut live = connect(&proxy.url("/")).await;
    echo(&mut live, "before").await;
    proxy.signal("TERM");
    proxy.wait_log("draining", Duration::from_secs(10));
    assert!(
        proxy.wait_exit(Duration::from_millis(300)).is_none(),
        "a draining ringlb waits for its session"
    );
    proxy.signal("TERM");
    let st = proxy
        .wait_exit(Duration::from_secs(5))
        .expect("second SIGTERM did not stop ringlb");
    assert!(st.success(), "{st:?}");
}

/// Lines of a JSON access log so far.
fn access_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// One WebSocket session on `path`, closed by the client.
async fn one_session(proxy: &Proxy, path: &str) {
    let mut ws = connect(&proxy.url(path)).await;
    echo(&mut ws, "hello").await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_access_log_at_its_new_path() {
    let a = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.log");
    let second = dir.path().join("second.log");
    let text = |log: &std::path::Path| {
        format!(
            "{}\n[log]\naccess = \"{}\"\n",
            with_admin(&[a.addr], "", ""),
            log.display()
        )
    };
    let proxy = Proxy::start(&text(&first));
    one_session(&proxy, "/before").await;
    wait_until("a line in the first log", || {
        access_lines(&first).len() == 1
    })
    .await;

    std::fs::write(&proxy.config_path, text(&second)).unwrap();
    proxy.signal("HUP");
    proxy.wait_log("reloaded", Duration::from_secs(10));
    one_session(&proxy, "/after").await;
    wait_until("a line in the second log", || {
        access_lines(&second).len() == 1
    })
    .await;
    assert_eq!(access_lines(&second)[0]["route"], "/");
    let old = access_lines(&first);
    assert_eq!(old.len(), 1, "the old file got more lines: {old:?}");

    // Rotation: the file is moved away, SIGHUP with the same config opens a
    // fresh one at the configured path.
    let rotated = dir.path().join("second.log.1");
    std::fs::rename(&second, &rotated).unwrap();
    proxy.signal("HUP");
    wait_until("second reload", || {
        scrape(&proxy)["ringlb_config_reloads_total{result=ok}"] == 2.0
    })
    .await;
    one_session(&proxy, "/rotated").await;
    wait_until("a line in the reopened log", || {
        access_lines(&second).len() == 1
    })
    .await;
    assert_eq!(access_lines(&rotated).len(), 1);
}

/// buffers_per_shard is fixed for the life of the process. A file that
/// changes it is refused as a whole: its other settings (here a
/// max_buffers_per_direction that fits only the new buffers_per_shard, and a
/// new backend) do not run on top of the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_changes_a_restart_only_key_is_refused() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let proxy = Proxy::start(&with_admin(
        &[a.addr],
        "buffers_per_shard = 32\nmax_buffers_per_direction = 8",
        "",
    ));
    let new = with_admin(
        &[b.addr],
        "buffers_per_shard = 64\nmax_buffers_per_direction = 32",
        "",
    );
    ringlb::config::Config::parse(&new, "new.toml").expect("the new file is valid alone");
    std::fs::write(&proxy.config_path, &new).unwrap();
    proxy.signal("HUP");
    let line = proxy.wait_log("reload rejected", Duration::from_secs(10));
    assert!(
        line.contains("server.buffers_per_shard") && line.contains("restart"),
        "{line}"
    );
    let m = scrape(&proxy);
    assert_eq!(m["ringlb_config_reloads_total{result=error}"], 1.0);
    assert_eq!(m["ringlb_config_reloads_total{result=ok}"], 0.0);
    let mut ws = connect(&proxy.url("/")).await;
    echo(&mut ws, "old config").await;
    assert_eq!((a.active(), b.active()), (1, 0), "the old backend set runs");

    // The same file with the running buffers_per_shard fails the cross-check
    // it would have skipped before.
    std::fs::write(
        &proxy.config_path,
        new.replace("buffers_per_shard = 64", "buffers_per_shard = 32"),
    )
    .unwrap();
    proxy.signal("HUP");
    wait_until("second rejection", || {
        scrape(&proxy)["ringlb_config_reloads_total{result=error}"] == 2.0
    })
    .await;
    assert!(proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("reload rejected") && l.contains("max_buffers_per_direction")));

    // Unchanged restart-only keys reload as usual.
    std::fs::write(
        &proxy.config_path,
        with_admin(
            &[b.addr],
            "buffers_per_shard = 32\nmax_buffers_per_direction = 8",
            "",
        ),
    )
    .unwrap();
    proxy.signal("HUP");
    proxy.wait_log("reloaded", Duration::from_secs(10));
    let mut ws2 = connect(&proxy.url("/")).await;
    echo(&mut ws2, "new config").await;
    assert_eq!((a.active(), b.active()), (1, 1));
}

/// The scheduling policy of each `ringlb-shard-*` thread of `pid`, from
/// field 41 of `/proc/PID/task/TID/stat` (0 SCHED_OTHER, 3 SCHED_BATCH).
fn shard_policies(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("ringlb-shard-") {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the parenthesised name start at field 3.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        out.push(rest.split(' ').nth(41 - 3).unwrap().parse().unwrap());
    }
    out
}

/// Shards run under SCHED_BATCH unless the file says "normal", and a reload
/// that changes the policy is refused (the threads keep theirs) while the
/// proxy goes on relaying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_run_under_sched_batch_unless_told_normal() {
    let a = Backend::start().await;
    let proxy = Proxy::start(&with_admin(&[a.addr], "", ""));
    proxy.wait_log("shard scheduling: batch", Duration::from_secs(10));
    assert_eq!(shard_policies(proxy.pid()), vec![3, 3]);
    let normal = Proxy::start(&with_admin(&[a.addr], "scheduling = \"normal\"", ""));
    normal.wait_log("shard scheduling: normal", Duration::from_secs(10));
    assert_eq!(shard_policies(normal.pid()), vec![0, 0]);

    std::fs::write(
        &proxy.config_path,
        with_admin(&[a.addr], "scheduling = \"normal\"", ""),
    )
    .unwrap();
    proxy.signal("HUP");
    let line = proxy.wait_log("reload rejected", Duration::from_secs(10));
    assert!(
        line.contains("server.scheduling changed from batch to normal") && line.contains("restart"),
        "{line}"
    );
    assert_eq!(shard_policies(proxy.pid()), vec![3, 3]);
    for p in [&proxy, &normal] {
        let mut ws = connect(&p.url("/")).await;
        echo(&mut ws, "still relaying").await;
    }
}

/// Where the policy cannot be set (a seccomp profile that refuses
/// sched_setscheduler), the shards start anyway under the default policy,
/// and the log says so instead of claiming "batch".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sched_batch_is_a_warning_and_the_shards_still_serve() {
    let a = Backend::start().await;
    let proxy = Proxy::start_under(
        &with_admin(&[a.addr], "", ""),
        &["env", "RINGLB_TEST_FAULT=sched-batch-refused"],
    );
    let line = proxy.wait_log("shard scheduling:", Duration::from_secs(10));
    assert!(
        line.contains("batch refused on 2 of 2 shards") && line.contains("WARN"),
        "{line}"
    );
    assert!(proxy
        .wait_log("shard 0: SCHED_BATCH refused", Duration::from_secs(1))
        .contains("Operation not permitted"));
    assert_eq!(shard_policies(proxy.pid()), vec![0, 0]);
    let mut ws = connect(&proxy.url("/")).await;
    echo(&mut ws, "still relaying").await;
}
