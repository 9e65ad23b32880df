//! Byte-exact relaying. The backend here is a raw TCP echo after its 101, so
//! every byte the client sends must come back unchanged, whatever it is:
//! frames of every size class, fragments with control frames between them,
//! protocol violations (ringlb does not police frames), one byte per write,
//! multi-MiB bursts, half-closes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Completes the upgrade, optionally sends `first` in the same write as the
/// 101, then echoes raw bytes until EOF, then shuts its write half.
async fn raw_echo_backend(first: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let first = first.clone();
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                let mut resp = switching_protocols().into_bytes();
                resp.extend_from_slice(&first);
                s.write_all(&resp).await.unwrap();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn upgraded(proxy: &Proxy) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101);
    s
}

fn frame(opcode: u8, fin: bool, len: usize) -> Vec<u8> {
    let mut f = client_frame(opcode, &vec![0xa5; len]);
    if !fin {
        f[0] &= 0x7f;
    }
    f
}

async fn expect_echo(s: &mut TcpStream, sent: &[u8]) {
    let mut got = vec![0u8; sent.len()];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut got))
        .await
        .expect("echo timed out")
        .unwrap();
    assert!(
        got == sent,
        "echo differs from what was sent ({} bytes)",
        sent.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_size_boundary_round_trips() {
    let proxy = Proxy::start(&config(&[raw_echo_backend(Vec::new()).await], "", ""));
    let mut s = upgraded(&proxy).await;
    for len in [
        0,
        1,
        125,
        126,
        127,
        65535,
        65536,
        65537,
        3 * 1024 * 1024 + 7,
    ] {
        let f = frame(0x2, true, len);
        s.write_all(&f).await.unwrap();
        expect_echo(&mut s, &f).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_control_frames_and_violations_pass_untouched() {
    let proxy = Proxy::start(&config(&[raw_echo_backend(Vec::new()).await], "", ""));
    let mut s = upgraded(&proxy).await;
    let mut bytes = frame(0x1, false, 10);
    bytes.extend(client_frame(0x9, b"ping between fragments"));
    bytes.extend(frame(0x0, false, 70000));
    bytes.extend(client_frame(0xA, b"pong too"));
    bytes.extend(frame(0x0, true, 3));
    // Violations: reserved opcode, RSV bits set, an unmasked client frame,
    // a control frame over 125 bytes. ringlb relays; the endpoints judge.
    bytes.extend([0x83, 0x80, 1, 2, 3, 4]);
    bytes.extend([0xf2, 0x80, 1, 2, 3, 4]);
    bytes.extend([0x82, 0x03, b'a', b'b', b'c']);
    bytes.extend(frame(0x9, true, 200));
    s.write_all(&bytes).await.unwrap();
    expect_echo(&mut s, &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_writes_and_big_bursts() {
    let proxy = Proxy::start(&config(&[raw_echo_backend(Vec::new()).await], "", ""));
    let mut s = upgraded(&proxy).await;
    let f = frame(0x1, true, 300);
    for b in &f {
        s.write_all(&[*b]).await.unwrap();
    }
    expect_echo(&mut s, &f).await;
    let mut burst = Vec::new();
    for i in 0..64 {
        burst.extend(frame(0x2, true, 100_000 + i));
    }
    let (mut r, mut w) = s.into_split();
    let sent = burst.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w
    });
    let mut got = vec![0u8; burst.len()];
    tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == burst, "burst of {} bytes differs", burst.len());
    writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_frame_in_the_same_write_as_the_101() {
    let first = vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'];
    let proxy = Proxy::start(&config(&[raw_echo_backend(first.clone()).await], "", ""));
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101);
    let mut got = vec![0u8; first.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_client_still_delivers_the_backends_bytes() {
    let proxy = Proxy::start(&config(&[raw_echo_backend(Vec::new()).await], "", ""));
    let s = upgraded(&proxy).await;
    let (mut r, mut w) = s.into_split();
    let f = frame(0x2, true, 200_000);
    w.write_all(&f).await.unwrap();
    // Client is done sending; its echo must still arrive whole, then EOF.
    w.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == f, "got {} of {} bytes", got.len(), f.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_backend_still_delivers_the_clients_bytes() {
    // This backend shuts its write half right after the 101, then reads
    // everything the client sends and reports how much arrived.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let _ = read_head(&mut s).await;
        let resp = switching_protocols();
        s.write_all(resp.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        let _ = tx.send(all);
    });
    let proxy = Proxy::start(&config(&[addr], "", ""));
    let mut s = upgraded(&proxy).await;
    let mut eof = [0u8; 1];
    assert_eq!(
        s.read(&mut eof).await.unwrap(),
        0,
        "the backend's FIN reaches the client"
    );
    let f = frame(0x2, true, 300_000);
    s.write_all(&f).await.unwrap();
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), rx)
        .await
        .unwrap()
        .unwrap();
    assert!(got == f, "backend got {} of {} bytes", got.len(), f.len());
}

/// A tiny buffer ring shared by many busy sessions runs out (ENOBUFS) over
/// and over; recvs are re-armed as buffers return and every byte arrives.
/// Splicing is off: it would carry these big frames without buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_buffer_ring_recovers_without_stalls() {
    let toml = config(
        &[raw_echo_backend(Vec::new()).await],
        "shards = 1\nbuffers_per_shard = 16\nbuffer_size = 4096\nmax_buffers_per_direction = 4\nsplice_min = 0",
        "",
    )
    .replace("shards = 2\n", "");
    let proxy = Proxy::start(&format!("{toml}\n[admin]\nlisten = \"127.0.0.1:0\"\n"));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let s = upgraded(&proxy).await;
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let f = frame(0x2, true, 512 * 1024 + i);
            let sent = f.clone();
            let writer = tokio::spawn(async move { w.write_all(&sent).await.unwrap() });
            let mut got = vec![0u8; f.len()];
            tokio::time::timeout(Duration::from_secs(60), r.read_exact(&mut got))
                .await
                .expect("stalled")
                .unwrap();
            assert!(got == f);
            writer.await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, metrics) = proxy.admin("GET", "/metrics");
    let starved: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ringlb_recv_buffer_exhausted_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        starved > 0,
        "the ring never ran out: the test did not test ENOBUFS"
    );
}

/// A second request pipelined behind the upgrade is not ringlb's to parse:
/// after the head everything is the session's bytes, and they reach the
/// backend verbatim and in order (the backend then judges them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_request_after_the_upgrade_is_relayed_not_routed() {
    let proxy = Proxy::start(&config(&[raw_echo_backend(Vec::new()).await], "", ""));
    let pipelined = b"GET /admin HTTP/1.1\r\nHost: other\r\n\r\n".to_vec();
    let mut bytes = upgrade_request("/", "").into_bytes();
    bytes.extend_from_slice(&pipelined);
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101);
    expect_echo(&mut s, &pipelined).await;
}

/// A masked client frame whose payload is `len` bytes of a pattern that
/// differs at every position (so a lost, doubled or reordered chunk shows).
fn patterned_frame(len: usize, seed: u32) -> Vec<u8> {
    let payload: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 11) as u8)
        .collect();
    client_frame(0x2, &payload)
}

fn spliced_bytes(proxy: &Proxy) -> u64 {
    let (status, body) = proxy.admin("GET", "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("ringlb_bytes_spliced_total "))
        .expect("ringlb_bytes_spliced_total in /metrics")
        .parse()
        .unwrap()
}

fn admin_config(backend: SocketAddr, server_extra: &str) -> String {
    format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        config(&[backend], server_extra, "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_frames_move_by_splice_byte_exact_between_small_ones() {
    // A small buffer ring bounds what can arrive in buffers before the
    // switch to splice (a multishot recv keeps filling buffers until its
    // cancel lands), so the share spliced does not depend on how busy the
    // machine is.
    for (splice_min, spliced) in [
        ("buffers_per_shard = 16", true),
        ("buffers_per_shard = 16\nsplice_min = 0", false),
    ] {
        let proxy = Proxy::start(&admin_config(
            raw_echo_backend(Vec::new()).await,
            splice_min,
        ));
        let mut s = upgraded(&proxy).await;
        // Small and big frames back to back in one write, so the switch to
        // splice and back happens at frame boundaries inside a burst.
        let mut burst = Vec::new();
        for (i, len) in [10usize, 3 << 20, 70, 65_536, 1, 600_000, 125, (1 << 20) + 7]
            .into_iter()
            .enumerate()
        {
            burst.extend(patterned_frame(len, i as u32));
        }
        let (mut r, mut w) = s.split();
        let (_, ()) = tokio::join!(
            async { w.write_all(&burst).await.unwrap() },
            expect_echo_from(&mut r, &burst)
        );
        let n = spliced_bytes(&proxy);
        if spliced {
            // Both directions splice nearly all of the big frames; buffers
            // carry the small ones and what arrives before the first switch.
            let total = 2 * burst.len() as u64;
            assert!(n > total * 3 / 4, "only {n} of {total} bytes spliced");
        } else {
            assert_eq!(n, 0, "splice_min = 0 turns splicing off");
        }
        // The session still relays small frames afterwards.
        let f = patterned_frame(20, 99);
        s.write_all(&f).await.unwrap();
        expect_echo(&mut s, &f).await;
    }
}

async fn expect_echo_from(r: &mut tokio::net::tcp::ReadHalf<'_>, sent: &[u8]) {
    let mut got = vec![0u8; sent.len()];
    tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut got))
        .await
        .expect("echo timed out")
        .unwrap();
    assert!(got == sent, "echo differs ({} bytes)", sent.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_a_splice_back_without_loss() {
    let proxy = Proxy::start(&admin_config(raw_echo_backend(Vec::new()).await, ""));
    let s = upgraded(&proxy).await;
    let (mut r, mut w) = s.into_split();
    let f = patterned_frame(6 << 20, 7);
    let f2 = f.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&f2).await.unwrap();
        w
    });
    // Read in small sips with pauses: the pipe towards the client fills,
    // ringlb waits for POLLOUT, and nothing is lost or reordered.
    let mut got = Vec::with_capacity(f.len());
    let mut sip = vec![0u8; 16 * 1024];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got.len() < f.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled at {}",
            got.len()
        );
        if got.len() < (1 << 20) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut sip))
            .await
            .expect("read stalled")
            .unwrap();
        assert!(n > 0, "EOF after {} bytes", got.len());
        got.extend_from_slice(&sip[..n]);
    }
    assert!(got == f, "bytes differ");
    let _w = writer.await.unwrap();
    assert!(spliced_bytes(&proxy) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reset_in_the_middle_of_a_spliced_frame() {
    // This backend answers the upgrade, sends the start of a big frame,
    // reads some of the client's big frame, then resets.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let sent = patterned_frame(4 << 20, 3);
    let part = sent[..(1 << 20)].to_vec();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let part = part.clone();
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                let mut resp = switching_protocols().into_bytes();
                resp.extend_from_slice(&part);
                s.write_all(&resp).await.unwrap();
                let mut buf = vec![0u8; 512 * 1024];
                let _ = s.read_exact(&mut buf).await;
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            });
        }
    });
    let proxy = Proxy::start(&admin_config(addr, ""));
    for _ in 0..3 {
        let s = upgraded(&proxy).await;
        let (mut r, mut w) = s.into_split();
        let big = sent.clone();
        tokio::spawn(async move {
            let _ = w.write_all(&big).await;
        });
        // What the backend sent before its reset arrives whole, then the
        // session ends; ringlb stays up for the next one.
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got))
            .await
            .expect("session did not end after the backend's reset");
        assert!(got.len() <= (1 << 20));
        assert!(got == sent[..got.len()], "bytes differ");
    }
    let mut ok = upgraded(&proxy).await;
    drop(ok.write_all(b"").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_last_frame_arrives_even_when_it_resets_under_a_stream_of_bytes() {
    // Autobahn 5.14 through ringlb: the client sends a frame byte by byte,
    // the backend answers the violation with a Close and resets (it closed
    // with the client's bytes unread). ringlb's next send to it fails,
    // possibly before it has read that Close; the Close must still reach
    // the client, then the session ends.
    const CLOSE: [u8; 4] = [0x88, 0x02, 0x03, 0xea];
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                s.write_all(switching_protocols().as_bytes()).await.unwrap();
                let mut buf = [0u8; 8];
                let _ = s.read_exact(&mut buf).await;
                s.write_all(&CLOSE).await.unwrap();
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            });
        }
    });
    let proxy = Proxy::start(&admin_config(addr, ""));
    for round in 0..40 {
        let s = upgraded(&proxy).await;
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            for _ in 0..20_000 {
                if w.write_all(&[0x81]).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        });
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got))
            .await
            .expect("session did not end after the backend's reset");
        assert_eq!(got, CLOSE, "round {round}: the backend's Close was lost");
        writer.abort();
    }
}
