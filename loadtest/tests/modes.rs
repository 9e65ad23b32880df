//! Every subcommand against the tool's own echo backend, with short durations.

mod common;
use common::*;

fn assert_clean(code: i32, v: &serde_json::Value, stderr: &str) {
    assert_eq!(code, 0, "exit code; stderr:\n{stderr}");
    assert_eq!(v["tool"], "ringlb-load");
    assert_eq!(v["error_total"], 0, "{v}");
}

#[test]
fn pingpong_text_and_binary() {
    let echo = EchoProc::start(&[]);
    for binary in [false, true] {
        let url = echo.url();
        let mut args = vec![
            "pingpong",
            "--url",
            &url,
            "--connections",
            "8",
            "--size",
            "100",
            "--duration",
            "300ms",
            "--warmup",
            "100ms",
        ];
        if binary {
            args.push("--binary");
        }
        let (code, v, stderr) = run_tool(&args);
        let v = v.expect("json");
        assert_clean(code, &v, &stderr);
        assert_eq!(v["mode"], "pingpong");
        let msgs = v["messages"].as_u64().unwrap();
        assert!(msgs > 100, "{v}");
        assert_eq!(v["bytes"].as_u64().unwrap(), msgs * 100);
        assert_eq!(v["latency_us"]["count"].as_u64().unwrap(), msgs);
        assert_eq!(v["connections"]["opened"], 8);
        assert_eq!(v["connections"]["alive"], 8);
        assert_eq!(v["params"]["connections"], 8);
        assert_eq!(v["params"]["binary"], binary);
        assert_eq!(v["params"]["duration"].as_f64().unwrap(), 0.3);
        assert!(v["latency_us"]["p50"].as_f64().unwrap() > 0.0);
        let total_cpu = v["cpu_s"]["user"].as_f64().unwrap() + v["cpu_s"]["sys"].as_f64().unwrap();
        assert!(total_cpu > 0.0, "{v}");
    }
}

#[test]
fn rate_holds_the_requested_rate() {
    let echo = EchoProc::start(&[]);
    let url = echo.url();
    let (code, v, stderr) = run_tool(&[
        "rate",
        "--url",
        &url,
        "--connections",
        "4",
        "--rate",
        "2000",
        "--duration",
        "500ms",
    ]);
    let v = v.expect("json");
    assert_clean(code, &v, &stderr);
    // Exactly the scheduled messages: 2000/s for 0.5 s.
    let msgs = v["messages"].as_u64().unwrap();
    assert!((990..=1010).contains(&msgs), "{v}");
    assert_eq!(v["params"]["rate"].as_f64().unwrap(), 2000.0);
}

#[test]
fn handshake_counts_every_connection() {
    let echo = EchoProc::start(&[]);
    let url = echo.url();
    let (code, v, stderr) = run_tool(&[
        "handshake",
        "--url",
        &url,
        "--total",
        "300",
        "--concurrency",
        "16",
    ]);
    let v = v.expect("json");
    assert_clean(code, &v, &stderr);
    assert_eq!(v["handshakes"], 300);
    assert_eq!(v["messages"], 300);
    assert_eq!(v["connections"]["requested"], 300);
    assert_eq!(v["handshake_latency_us"]["count"], 300);
    assert!(v["handshakes_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn idle_connections_still_echo() {
    let echo = EchoProc::start(&[]);
    let url = echo.url();
    let (code, v, stderr) = run_tool(&[
        "idle",
        "--url",
        &url,
        "--connections",
        "500",
        "--hold",
        "300ms",
    ]);
    let v = v.expect("json");
    assert_clean(code, &v, &stderr);
    assert_eq!(v["connections"]["opened"], 500);
    assert_eq!(v["connections"]["alive"], 500);
    assert_eq!(v["messages"], 1000);
    assert!(v["elapsed_s"].as_f64().unwrap() >= 0.3);
}

#[test]
fn bulk_moves_megabytes_byte_exact() {
    let echo = EchoProc::start(&[]);
    let url = echo.url();
    // Only messages completing inside the window count, and a debug build on a
    // busy 2-core machine is slow, so the window is generous.
    let (code, v, stderr) = run_tool(&[
        "bulk",
        "--url",
        &url,
        "--connections",
        "2",
        "--size",
        "3MiB",
        "--duration",
        "1500ms",
    ]);
    let v = v.expect("json");
    assert_clean(code, &v, &stderr);
    assert_eq!(v["connections"]["alive"], 2, "{v}");
    let msgs = v["messages"].as_u64().unwrap();
    assert!(msgs >= 1, "{v}");
    assert_eq!(v["bytes"].as_u64().unwrap(), msgs * 3 * 1024 * 1024);
    assert!(v["mb_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn procs_merge_children_and_threads_split() {
    let echo = EchoProc::start(&["--threads", "2"]);
    let url = echo.url();
    let (code, v, stderr) = run_tool(&[
        "pingpong",
        "--url",
        &url,
        "--connections",
        "6",
        "--duration",
        "300ms",
        "--procs",
        "2",
        "--threads",
        "2",
    ]);
    let v = v.expect("json");
    assert_clean(code, &v, &stderr);
    assert_eq!(v["connections"]["opened"], 6);
    assert_eq!(v["connections"]["alive"], 6);
    assert_eq!(v["params"]["procs"], 2);
    let msgs = v["messages"].as_u64().unwrap();
    assert!(msgs > 0);
    assert_eq!(v["latency_us"]["count"].as_u64().unwrap(), msgs);
}

#[test]
fn hist_csv_is_written() {
    let echo = EchoProc::start(&[]);
    let url = echo.url();
    let dir = std::env::temp_dir().join(format!("ringlb-load-hist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hist = dir.join("h.csv");
    let json = dir.join("r.json");
    let out = std::process::Command::new(BIN)
        .args([
            "pingpong",
            "--url",
            &url,
            "--connections",
            "2",
            "--duration",
            "200ms",
        ])
        .arg("--hist")
        .arg(&hist)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success());
    // The human table goes to stdout when JSON goes to a file.
    assert!(String::from_utf8_lossy(&out.stdout).contains("p99.9"));
    let csv = std::fs::read_to_string(&hist).unwrap();
    assert!(csv.starts_with("kind,percentile,latency_us,count_at_or_below\n"));
    assert!(
        csv.lines().filter(|l| l.starts_with("roundtrip,")).count() > 5,
        "{csv}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["mode"], "pingpong");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn too_many_connections_for_fd_limit_is_explained() {
    // Refused before any socket is opened, with the way out spelled out.
    let (code, _, stderr) = run_tool(&[
        "idle",
        "--url",
        "ws://127.0.0.1:9/",
        "--connections",
        "1000000",
        "--hold",
        "1s",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("RLIMIT_NOFILE"), "{stderr}");
    assert!(stderr.contains("--procs"), "{stderr}");
}

#[test]
fn echo_reports_multiple_listeners() {
    let echo = EchoProc::start_n(2, &[]);
    assert_ne!(echo.addrs[0], echo.addrs[1]);
    for a in &echo.addrs {
        let url = format!("ws://{a}/");
        let (code, v, stderr) = run_tool(&[
            "handshake",
            "--url",
            &url,
            "--total",
            "5",
            "--concurrency",
            "1",
        ]);
        assert_clean(code, &v.expect("json"), &stderr);
    }
}

#[test]
fn progress_lines_when_asked_without_a_terminal() {
    let echo = EchoProc::start(&[]);
    let url = echo.url();
    let (code, v, stderr) = run_tool(&[
        "pingpong",
        "--url",
        &url,
        "--connections",
        "2",
        "--duration",
        "1500ms",
        "--progress",
    ]);
    assert_clean(code, &v.expect("json"), &stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("msgs ") && l.contains("errors 0")),
        "{stderr}"
    );
}
