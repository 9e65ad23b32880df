//! A shard told to stop cancels every io_uring op in flight and reaps each
//! completion before it frees the memory and closes the descriptors those
//! ops use. Its own test binary, so the process's descriptor count belongs
//! to this test alone.
//!
//! 1. Note the descriptors open before the server starts.
//! 2. Start a server (2 shards) in-process, with a backend that accepts and
//!    never answers.
//! 3. Open sessions in two states: waiting for the backend's answer (recv on
//!    both sockets, the request sent) and mid-head (recv on the client).
//! 4. Wait until the backend holds all of the first kind.
//! 5. Stop the server; `stop` returns when the shard threads have ended.
//! 6. Every shard reports 0 ops in flight and no stale completion.
//! 7. Once the test's own sockets are closed, the descriptor count is back
//!    where it started: nothing the shards owned leaked.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use ringlb::config::Config;
use ringlb::server::Server;

const WAITING: usize = 40;
const MID_HEAD: usize = 40;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn stop_reaps_every_op_and_leaks_no_descriptor() {
    // The backend: accepts, reports each connection, answers nothing, and
    // drops them all when told to.
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let (accepted_tx, accepted_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let backend_thread = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..WAITING {
            let (mut s, _) = backend.accept().unwrap();
            // Read the forwarded head so the connection is truly mid-answer.
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            held.push(s);
            accepted_tx.send(()).unwrap();
        }
        let _ = done_rx.recv();
        drop(held);
        // Handed back so that it is still open for the final count.
        backend
    });

    // 1.
    let baseline = open_fds();

    // 2.
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshards = 2\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\n\n[upstream.u]\nservers = [{{ addr = \"{backend_addr}\" }}]\n"
    );
    let server = Server::start(Config::parse(&toml, "test").unwrap()).unwrap();
    let addr = server.local_addrs[0];

    // 3.
    let mut clients = Vec::new();
    for _ in 0..WAITING {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(
            b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
        clients.push(c);
    }
    for _ in 0..MID_HEAD {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\n").unwrap();
        clients.push(c);
    }

    // 4.
    for _ in 0..WAITING {
        accepted_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the backend got every session");
    }
    // The mid-head clients may still be in the accept queue: wait (bounded)
    // until every session has its op armed.
    let stats = server.shard_stats();
    let in_flight = || -> u64 { stats.iter().map(|s| s.ops_in_flight.get()).sum() };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while in_flight() < (WAITING + MID_HEAD) as u64 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        in_flight() >= (WAITING + MID_HEAD) as u64,
        "sessions have ops in flight before the stop: {}",
        in_flight()
    );

    // 5.
    server.stop();

    // 6.
    for (i, s) in stats.iter().enumerate() {
        assert_eq!(s.ops_in_flight.get(), 0, "shard {i} left ops in flight");
        assert_eq!(s.stale_completions.get(), 0, "shard {i}");
    }

    // 7.
    drop(clients);
    done_tx.send(()).unwrap();
    let _backend = backend_thread.join().unwrap();
    assert_eq!(open_fds(), baseline, "descriptors leaked by the shards");
}
