//! The process as a whole: a shard that dies ends the daemon, the startup
//! probe refuses a kernel or sandbox it cannot work in, a second instance
//! does not share the port. ringlb runs as a child process.

mod common;

use std::time::Duration;

use common::*;

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
