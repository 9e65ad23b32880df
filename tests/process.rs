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
        .find_map(|w| w.strip_prefix("http://"))
        .and_then(|w| w.split('/').next())
        .unwrap_or_else(|| panic!("no http:// URL in {line:?}"))
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

/// A kernel that knows the opcodes but lacks a feature ringlb uses must be
/// refused at start, naming the feature and the kernel that has it. No
/// kernel here lacks one, so a test-build hook makes the probe see the
/// kernel's answer (EINVAL) for multishot recv; the hook sits at the step,
/// so what is tested is the reporting from there to the exit status.
#[test]
fn a_missing_io_uring_feature_stops_the_start() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: release builds compile the RINGLB_TEST_FAULT hooks out");
        return;
    }
    let (status, err) = run_refused(
        ringlb()
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:1",
            ])
            .env("RINGLB_TEST_FAULT", "probe-missing-recv-multi"),
    )
    .expect("ringlb started without multishot recv");
    assert!(!status.success());
    assert!(
        err.contains("io_uring lacks multishot recv") && err.contains("Linux 6.0"),
        "{err}"
    );
}

/// Runs ringlb under a seccomp filter that makes `syscall` fail with
/// `errno`, as a container runtime's profile does. python3's ctypes
/// installs the filter (prctl) and execs ringlb, which inherits it.
fn ringlb_under_seccomp(syscall: u32, errno: i32) -> Command {
    const FILTER: &str = r#"
import ctypes, os, sys
nr, errno, exe = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]
prog = (Insn * 4)(
    Insn(0x20, 0, 0, 0),                 # load the syscall number
    Insn(0x15, 0, 1, nr),                # == nr ?
    Insn(0x06, 0, 0, 0x00050000 | errno),  # SECCOMP_RET_ERRNO | errno
    Insn(0x06, 0, 0, 0x7fff0000),        # SECCOMP_RET_ALLOW
)
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
p = Prog(4, prog)
assert libc.prctl(22, 2, ctypes.byref(p), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
os.execv(exe, [exe] + sys.argv[4:])
"#;
    let mut c = Command::new("python3");
    c.args(["-c", FILTER])
        .arg(syscall.to_string())
        .arg(errno.to_string())
        .arg(env!("CARGO_BIN_EXE_ringlb"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
        ]);
    c
}

/// Under a seccomp filter, any refusal of an io_uring call (EPERM from
/// Docker's profile, ENOSYS from others, or a blocked io_uring_register)
/// names the filter and the shipped profile, never an old kernel.
#[test]
fn a_seccomp_filter_blocking_io_uring_is_named() {
    const IO_URING_SETUP: u32 = 425; // same number on every architecture
    const IO_URING_REGISTER: u32 = 427;
    for (syscall, errno) in [
        (IO_URING_SETUP, libc::ENOSYS),
        (IO_URING_REGISTER, libc::EPERM),
        (IO_URING_SETUP, libc::EPERM),
    ] {
        let (status, err) = run_refused(&mut ringlb_under_seccomp(syscall, errno))
            .expect("ringlb started with io_uring blocked");
        assert!(!status.success(), "{err}");
        assert!(
            err.contains("blocked by a seccomp filter")
                && err.contains("config/docker-seccomp.json"),
            "syscall {syscall}, errno {errno}: {err}"
        );
        assert!(
            !err.contains("Linux 6.0"),
            "syscall {syscall}, errno {errno}: {err}"
        );
    }
}
