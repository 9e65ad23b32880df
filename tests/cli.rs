//! The command line: `check`, shipped configs, quick mode, `demo`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn ringlb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringlb"))
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        // The image's config names container paths: /srv/app is where the
        // Dockerfile puts the SPA example's build output, so check it
        // against that same directory here.
        let text = std::fs::read_to_string(&path).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = if text.contains("\"/srv/app\"") {
            let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/spa/dist");
            let copy = tmp.path().join(path.file_name().unwrap());
            std::fs::write(&copy, text.replace("\"/srv/app\"", &format!("{:?}", dist))).unwrap();
            copy
        } else {
            path
        };
        ringlb::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let out = ringlb()
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
        n += 1;
    }
    assert!(n >= 2, "expected config/ringlb.toml and config/seed.toml");
}

#[test]
fn check_reports_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:8080\"]\nhandshake_timeout = \"ten\"\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nservers = [{ addr = \"127.0.0.1:1\" }]\n",
    )
    .unwrap();
    let out = ringlb()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:3:21: server.handshake_timeout",
            path.display()
        )),
        "{err}"
    );

    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:8080\"]\nworkers = 4\n",
    )
    .unwrap();
    let out = ringlb()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("workers") && err.contains("line 3"), "{err}");

    let out = ringlb()
        .arg("check")
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// What `run` would refuse, `check` refuses with the same message, naming
/// the key: both go through the same validation.
#[test]
fn check_and_run_refuse_what_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::closed_port().port();
    let base = |listen: &str, extra: &str| {
        format!(
            "[server]\nlisten = [\"{listen}\"]\nshards = 1\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nservers = [{{ addr = \"127.0.0.1:1\" }}]\n{extra}"
        )
    };
    let missing = dir.path().join("no-such-dir/access.log");
    let cases = [
        (
            base(
                "127.0.0.1:0",
                &format!("[log]\naccess = {:?}\n", missing.display().to_string()),
            ),
            "log.access",
            missing.display().to_string(),
        ),
        (
            base(
                &format!("127.0.0.1:{port}"),
                &format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n"),
            ),
            "admin.listen",
            format!("127.0.0.1:{port}"),
        ),
        (
            base(
                &format!("0.0.0.0:{port}"),
                &format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n"),
            ),
            "admin.listen",
            format!("0.0.0.0:{port}"),
        ),
        (
            base(
                &format!("127.0.0.1:{port}"),
                &format!("[admin]\nlisten = \"0.0.0.0:{port}\"\n"),
            ),
            "admin.listen",
            format!("127.0.0.1:{port}"),
        ),
    ];
    for (i, (text, key, names)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = ringlb()
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "check passed case {i}:\n{text}");
        assert!(err.contains(&format!("{}:", path.display())), "{err}");
        assert!(err.contains(&format!(": {key}: ")), "{err}");
        assert!(err.contains(names.as_str()), "{err}");

        // `run` stops at the same error, before it binds anything.
        let mut child = ringlb()
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("run kept running with case {i}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut run_err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut run_err).unwrap();
        assert!(!status.success());
        assert!(
            run_err.contains(err.trim().trim_start_matches("ringlb: ")),
            "run said {run_err:?}, check said {err:?}"
        );
        assert!(!run_err.contains("listening on"), "{run_err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_proxies() {
    let b = common::Backend::start().await;
    let mut child = ringlb()
        .args(["run", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(b.addr.to_string())
        .args(["--shards", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let addr = read_until(stderr, "listening on ");
    let url = format!("ws://{}/", addr.split_whitespace().next().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Text("quick".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("quick".into())
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_echoes_and_reports() {
    let mut child = ringlb()
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // The banner: the page to open, then the WebSocket endpoint.
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("open http://"), "{line:?}");
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("ws://"))
        .unwrap_or_else(|| panic!("no ws:// URL in {line:?}"))
        .trim_end_matches(',')
        .to_string();
    assert!(url.ends_with("/ws"), "{url}");
    // A plain WebSocket client (no demo subprotocol) gets a pure echo.
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(&url),
    )
    .await
    .unwrap()
    .unwrap();
    ws.send(Message::Text("demo".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("demo".into())
    );
    // Status lines come once a second; one must show the live connection
    // and the relayed message (bounded: at most 10 lines).
    let mut seen = false;
    for _ in 0..10 {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.contains("connections: 1 ") && line.contains("messages relayed: 1 ") {
            seen = true;
            break;
        }
    }
    assert!(
        seen,
        "no status line with the connection and message; last: {line:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Reads lines until one contains `marker`; returns the text after it.
fn read_until(mut r: impl BufRead, marker: &str) -> String {
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(rest) = line.split(marker).nth(1) {
            return rest.trim().to_string();
        }
    }
    panic!("{marker:?} never printed");
}
