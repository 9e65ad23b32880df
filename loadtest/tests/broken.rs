//! Broken backends, written here on raw sockets, must show up as errors of the
//! right kind and a failing exit status, never as throughput.

mod common;
use common::*;
use std::io::Write;
use std::net::TcpStream;

fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    ringlb_load::codec::build_frame(true, opcode, None, payload)
}

fn run_against(addr: std::net::SocketAddr, mode: &str) -> (i32, serde_json::Value, String) {
    let url = format!("ws://{addr}/");
    let args: Vec<&str> = match mode {
        "pingpong" => vec![
            "pingpong",
            "--url",
            &url,
            "--connections",
            "1",
            "--duration",
            "300ms",
            "--timeout",
            "2s",
        ],
        "rate" => vec![
            "rate",
            "--url",
            &url,
            "--connections",
            "1",
            "--rate",
            "100",
            "--duration",
            "300ms",
            "--timeout",
            "2s",
        ],
        "bulk" => vec![
            "bulk",
            "--url",
            &url,
            "--connections",
            "1",
            "--size",
            "200KiB",
            "--duration",
            "300ms",
            "--timeout",
            "2s",
        ],
        _ => unreachable!(),
    };
    let (code, v, stderr) = run_tool(&args);
    (code, v.expect("json even on errors"), stderr)
}

#[test]
fn closes_mid_message_is_unexpected_close() {
    for mode in ["pingpong", "rate", "bulk"] {
        let addr = raw_backend(1, |mut s: TcpStream| {
            accept_upgrade(&mut s);
            if let Some((op, _, p)) = read_frame(&mut s) {
                // Half of the echo, then the connection goes away.
                let f = server_frame(op, &p);
                let _ = s.write_all(&f[..f.len() / 2]);
            }
        });
        let (code, v, stderr) = run_against(addr, mode);
        assert_eq!(code, 1, "{mode}: {stderr}");
        assert_eq!(err(&v, "unexpected_close"), 1, "{mode}: {v}");
        assert_eq!(v["messages"], 0, "{mode}: {v}");
        assert_eq!(v["bytes"], 0, "{mode}: {v}");
        assert_eq!(v["connections"]["alive"], 0, "{mode}: {v}");
        assert!(stderr.contains("unexpected_close=1"), "{stderr}");
    }
}

#[test]
fn wrong_payload_is_mismatched_echo() {
    for mode in ["pingpong", "rate", "bulk"] {
        let addr = raw_backend(1, |mut s: TcpStream| {
            accept_upgrade(&mut s);
            if let Some((op, _, mut p)) = read_frame(&mut s) {
                // One bit wrong, deep inside the payload.
                let i = p.len() * 3 / 4;
                p[i] ^= 0x01;
                let _ = s.write_all(&server_frame(op, &p));
            }
            // Hold the connection until the client gives up on it.
            let _ = read_frame(&mut s);
        });
        let (code, v, _) = run_against(addr, mode);
        assert_eq!(code, 1, "{mode}");
        assert_eq!(err(&v, "mismatched_echo"), 1, "{mode}: {v}");
        assert_eq!(v["messages"], 0, "{mode}: {v}");
    }
}

#[test]
fn stale_echo_is_caught_by_sequence_number() {
    // Echoes the first message correctly, then keeps replaying it.
    let addr = raw_backend(1, |mut s: TcpStream| {
        accept_upgrade(&mut s);
        let Some((op, _, first)) = read_frame(&mut s) else {
            return;
        };
        let _ = s.write_all(&server_frame(op, &first));
        for _ in 0..3 {
            if read_frame(&mut s).is_none() {
                return;
            }
            let _ = s.write_all(&server_frame(op, &first));
        }
    });
    let (code, v, _) = run_against(addr, "pingpong");
    assert_eq!(code, 1);
    assert_eq!(err(&v, "mismatched_echo"), 1, "{v}");
    assert!(v["messages"].as_u64().unwrap() <= 1, "{v}");
}

#[test]
fn silent_backend_is_timeout() {
    let addr = raw_backend(1, |mut s: TcpStream| {
        accept_upgrade(&mut s);
        // Swallow the message; answer nothing until the client leaves.
        let _ = read_frame(&mut s);
        let _ = read_frame(&mut s);
    });
    let url = format!("ws://{addr}/");
    let (code, v, _) = run_tool(&[
        "pingpong",
        "--url",
        &url,
        "--connections",
        "1",
        "--duration",
        "200ms",
        "--timeout",
        "500ms",
    ]);
    let v = v.unwrap();
    assert_eq!(code, 1);
    assert_eq!(err(&v, "timeout"), 1, "{v}");
    assert_eq!(v["messages"], 0);
}

#[test]
fn bad_handshakes_are_classified() {
    let forbidden = raw_backend(1, |mut s: TcpStream| {
        read_head(&mut s);
        let _ = s.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
    });
    let wrong_accept = raw_backend(1, |mut s: TcpStream| {
        read_head(&mut s);
        let _ = s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        );
    });
    for (addr, kind) in [
        (forbidden, "handshake_status"),
        (wrong_accept, "handshake_invalid"),
    ] {
        let url = format!("ws://{addr}/");
        let (code, v, _) = run_tool(&[
            "handshake",
            "--url",
            &url,
            "--total",
            "1",
            "--concurrency",
            "1",
            "--timeout",
            "2s",
        ]);
        let v = v.unwrap();
        assert_eq!(code, 1);
        assert_eq!(err(&v, kind), 1, "{v}");
        assert_eq!(v["handshakes"], 0);
        assert_eq!(v["connections"]["failed"], 1);
    }
}

#[test]
fn refused_connection_is_counted_and_allow_errors_exits_zero() {
    // A port that was just free: bind, note it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}/");
    let (code, v, _) = run_tool(&[
        "pingpong",
        "--url",
        &url,
        "--connections",
        "3",
        "--duration",
        "100ms",
    ]);
    let v = v.unwrap();
    assert_eq!(code, 1);
    assert_eq!(err(&v, "connect_refused"), 3, "{v}");
    assert_eq!(v["connections"]["failed"], 3);
    let (code, _, _) = run_tool(&[
        "pingpong",
        "--url",
        &url,
        "--connections",
        "1",
        "--duration",
        "100ms",
        "--allow-errors",
    ]);
    assert_eq!(code, 0);
}
