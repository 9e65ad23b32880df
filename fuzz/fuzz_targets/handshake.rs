//! The client head parser and the forwarded-head writer, fed arbitrary
//! bytes: no panic, and whatever parses is re-written without hop-by-hop
//! headers, with exactly one Host, one Connection and one X-Real-IP.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlb::http::{forward_head, parse_request, parse_response};

fuzz_target!(|data: &[u8]| {
    let _ = parse_response(data, 4096, Some("dGhlIHNhbXBsZSBub25jZQ=="), false);
    let Ok(Some(req)) = parse_request(data, 4096, 64) else { return };
    let out = forward_head(&req, &req.target, "192.0.2.1".parse().unwrap(), &data[req.head_len..]);
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("forwarded head is terminated") + 4;
    // Header values may carry obs-text (bytes >= 0x80), which HTTP allows.
    let head = String::from_utf8_lossy(&out[..head_end]);
    let names: Vec<String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    for hop in ["keep-alive", "te", "trailer", "proxy-connection", "proxy-authorization"] {
        assert!(!names.iter().any(|n| n == hop), "{hop} forwarded");
    }
    for one in ["host", "connection", "x-real-ip", "x-forwarded-for"] {
        assert!(names.iter().filter(|n| *n == one).count() <= 1, "{one} more than once");
    }
    assert_eq!(names.iter().filter(|n| *n == "connection").count(), 1);
    // The bytes after the head travel unchanged, in order.
    assert_eq!(&out[head_end..], &data[req.head_len..]);
    // And the forwarded head parses again.
    let again = parse_request(&out, 1 << 20, 256);
    assert!(matches!(again, Ok(Some(_))), "re-written head does not parse: {again:?}");
});
