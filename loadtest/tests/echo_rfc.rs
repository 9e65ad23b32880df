//! The echo backend spoken to on raw sockets: real mask keys, fragmentation,
//! ping/pong, close, and upgrade validation. Uses the in-process library API.

mod common;
use common::*;
use ringlb_load::codec::{self, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn upgrade(s: &mut TcpStream) -> String {
    write!(
        s,
        "GET /x HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    read_head(s)
}

/// Reads one server frame, insisting it is unmasked.
fn server_frame(s: &mut TcpStream) -> (u8, bool, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames must not be masked: {h:?}");
    let mut rest = vec![0u8; 0];
    let len = match h[1] & 0x7f {
        126 => {
            rest.resize(2, 0);
            s.read_exact(&mut rest).unwrap();
            u16::from_be_bytes([rest[0], rest[1]]) as usize
        }
        127 => {
            rest.resize(8, 0);
            s.read_exact(&mut rest).unwrap();
            u64::from_be_bytes(rest[..8].try_into().unwrap()) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (h[0] & 0x0f, h[0] & 0x80 != 0, p)
}

#[test]
fn echoes_with_real_masks_fragments_and_control_frames() {
    let server = ringlb_load::echo::spawn(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let mut s = connect(server.local_addrs()[0]);
    let head = upgrade(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );

    // A text message, masked with a real key, written one byte at a time.
    let f = codec::build_frame(true, OP_TEXT, Some([0x37, 0xfa, 0x21, 0x3d]), b"Hello");
    for b in &f {
        s.write_all(std::slice::from_ref(b)).unwrap();
    }
    assert_eq!(server_frame(&mut s), (OP_TEXT, true, b"Hello".to_vec()));

    // A 100 KB binary message in three fragments with a ping between them.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i * 13 + 5) as u8).collect();
    let mut wire = codec::build_frame(false, OP_BINARY, Some([1, 2, 3, 4]), &big[..10]);
    wire.extend(codec::build_frame(
        true,
        OP_PING,
        Some([9, 9, 9, 9]),
        b"are you there",
    ));
    wire.extend(codec::build_frame(
        false,
        OP_CONT,
        Some([5, 6, 7, 8]),
        &big[10..70_000],
    ));
    wire.extend(codec::build_frame(
        true,
        OP_CONT,
        Some([0xaa, 0xbb, 0xcc, 0xdd]),
        &big[70_000..],
    ));
    s.write_all(&wire).unwrap();
    let mut echoed = Vec::new();
    let mut pong = None;
    let mut frames = 0;
    while frames < 10 {
        frames += 1;
        let (op, fin, p) = server_frame(&mut s);
        match op {
            OP_PONG => pong = Some(p),
            OP_BINARY | OP_CONT => {
                assert_eq!(op == OP_BINARY, echoed.is_empty());
                echoed.extend_from_slice(&p);
                if fin {
                    break;
                }
            }
            other => panic!("unexpected opcode {other}"),
        }
    }
    if pong.is_none() {
        let (op, _, p) = server_frame(&mut s);
        assert_eq!(op, OP_PONG);
        pong = Some(p);
    }
    assert!(echoed == big, "fragmented message not echoed byte for byte");
    assert_eq!(pong.as_deref(), Some(&b"are you there"[..]));

    // Close with a code and reason: echoed, then the server closes TCP.
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"done");
    s.write_all(&codec::build_frame(
        true,
        OP_CLOSE,
        Some([4, 3, 2, 1]),
        &close,
    ))
    .unwrap();
    assert_eq!(server_frame(&mut s), (OP_CLOSE, true, close));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    let st = server.stats();
    assert_eq!(st.messages.load(Relaxed), 2);
    assert_eq!(st.handshakes.load(Relaxed), 1);
    server.shutdown();
}

#[test]
fn protocol_violations_get_close_1002() {
    let server = ringlb_load::echo::spawn(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let addr = server.local_addrs()[0];
    // Unmasked client frame; continuation without a start; oversized ping.
    let bad = [
        codec::build_frame(true, OP_TEXT, None, b"x"),
        codec::build_frame(true, OP_CONT, Some([1, 2, 3, 4]), b"x"),
        codec::build_frame(true, OP_PING, Some([1, 2, 3, 4]), &[0u8; 126]),
    ];
    for f in bad {
        let mut s = connect(addr);
        upgrade(&mut s);
        s.write_all(&f).unwrap();
        assert_eq!(
            server_frame(&mut s),
            (OP_CLOSE, true, 1002u16.to_be_bytes().to_vec())
        );
    }
    assert_eq!(server.stats().protocol_errors.load(Relaxed), 3);
}

#[test]
fn bad_upgrades_are_refused() {
    let server = ringlb_load::echo::spawn(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let addr = server.local_addrs()[0];
    let cases = [
        ("POST / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", "405"),
        ("GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", "400"),
        ("GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n", "400"),
        ("GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n", "426"),
    ];
    for (req, status) in cases {
        let mut s = connect(addr);
        s.write_all(req.as_bytes()).unwrap();
        let head = read_head(&mut s);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{req:?} -> {head}"
        );
    }
    // The server counts a failure after sending the response; poll with a bound.
    let st = server.stats();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while st.handshake_failures.load(Relaxed) < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(st.handshake_failures.load(Relaxed), 4);
    assert_eq!(st.handshakes.load(Relaxed), 0);
}

#[test]
fn open_connection_counter_tracks_idle_connections() {
    let server = ringlb_load::echo::spawn(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let addr = server.local_addrs()[0];
    let mut conns: Vec<TcpStream> = (0..50).map(|_| connect(addr)).collect();
    for s in &mut conns {
        upgrade(s);
    }
    // Every upgrade was answered, so every connection has been accepted.
    assert_eq!(server.stats().open.load(Relaxed), 50);
    drop(conns);
    // Closing is asynchronous on the server side; poll with a bound.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.stats().open.load(Relaxed) != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(server.stats().open.load(Relaxed), 0);
}
