//! The process as a whole: a shard that dies ends the daemon, the startup
//! probe refuses a kernel or sandbox it cannot work in, a second instance
//! does not share the port. ringlb runs as a child process.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn ringlb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringlb"))
}

/// Runs a ringlb that is expected to refuse to start: its exit status and
/// stderr, or `None` (after killing it) if it is still running after 10 s.
fn run_refused(cmd: &mut Command) -> Option<(std::process::ExitStatus, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = reader.join().unwrap();
    status.map(|st| (st, err))
}

/// A shard that panics must not leave a half-working daemon behind (its
/// clients would stay counted against `max_connections` forever): the
/// process logs which shard died and why and exits non-zero, so systemd or
/// Docker restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shard_ends_the_process_with_an_error() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: release builds compile the RINGLB_TEST_FAULT hooks out");
        return;
    }
    let b = Backend::start().await;
    let mut proxy = Proxy::start_under(
        &config(&[b.addr], "", ""),
        &["env", "RINGLB_TEST_FAULT=shard-panic-after-accept"],
    );
    // One connection reaches one shard, which panics on accepting it; the
    // other shard is healthy and would keep the process up.
    let _client = std::net::TcpStream::connect(proxy.addr()).unwrap();
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("ringlb kept running with a dead shard");
    assert!(!status.success(), "exit status {status}");
    let died = proxy.wait_log("died", Duration::from_secs(5));
    assert!(
        died.contains("shard ") && died.contains("panics after an accept"),
        "{died}"
    );
    proxy.wait_log("without draining", Duration::from_secs(5));
}

/// SO_REUSEPORT would let a second ringlb of the same user take half of the
/// first one's new connections without a word. It must refuse instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_address_refuses_to_start() {
    let b = Backend::start().await;
    let first = Proxy::start(&config(&[b.addr], "", ""));
    let taken = first.addr();
    let (status, err) = run_refused(
        ringlb()
            .args(["run", "--shards", "2", "--listen"])
            .arg(taken.to_string())
            .arg("--upstream")
            .arg(b.addr.to_string()),
    )
    .expect("a second ringlb started on the same address");
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!("another process already listens on {taken}")),
        "{err}"
    );
    // The first instance never noticed.
    let mut ws = connect(&first.url("/")).await;
    echo(&mut ws, "still mine").await;
}

/// The check must not refuse a restart right after a crash: neither because
/// of the TIME_WAIT sockets the previous instance's connections left behind
/// (SO_REUSEADDR on the probe) nor because of its listeners, which the
/// kernel closes a little after the process is gone (ring teardown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_restart_after_a_kill_is_not_refused() {
    let toml = config(&[closed_port()], "", "");
    let first = Proxy::start(&toml);
    let addr = first.addr();
    // ringlb answers 502 and closes first, so its side of the connection
    // stays in TIME_WAIT on `addr` after it exits.
    let resp = raw_exchange(addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 502);
    drop(first); // SIGKILL, then waits for the process to be gone
    let second = Proxy::start(&toml.replace("127.0.0.1:0", &addr.to_string()));
    assert_eq!(second.addr(), addr);
}

/// A reload that adds an address someone else listens on is rejected the
/// same way, and the running configuration stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_onto_a_taken_address_is_rejected() {
    let b = Backend::start().await;
    let other = Proxy::start(&config(&[b.addr], "", ""));
    let taken = other.addr();
    let proxy = Proxy::start(&config(&[b.addr], "", ""));
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    let text = text.replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:0\", \"{taken}\"]"),
    );
    std::fs::write(&proxy.config_path, text).unwrap();
    proxy.signal("HUP");
    let line = proxy.wait_log("reload rejected", Duration::from_secs(10));
    assert!(
        line.contains(&format!("another process already listens on {taken}")),
        "{line}"
    );
    let mut ws = connect(&other.url("/")).await;
    echo(&mut ws, "untouched").await;
}

/// `ringlb demo` on an address that is taken says so and how to get
/// another one, instead of sharing the port.
#[test]
fn demo_on_a_taken_address_says_so() {
    let mut first = ringlb()
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kept open: the demo prints a status line every second, and would die
    // of a closed stdout.
    let mut stdout = BufReader::new(first.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let taken = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ws://"))
        .unwrap_or_else(|| panic!("no ws:// URL in {line:?}"))
        .trim_end_matches('/')
        .to_string();
    let second = run_refused(ringlb().args(["demo", "--listen", &taken]));
    first.kill().unwrap();
    first.wait().unwrap();
    let (status, err) = second.expect("a second demo started on the same address");
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!("another process already listens on {taken}"))
            && err.contains("--listen 127.0.0.1:0"),
        "{err}"
    );
}
