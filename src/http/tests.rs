use super::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn ws(extra: &str) -> String {
    format!(
        "GET /chat?x=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn parse(s: &str) -> Result<Option<Request>, Reject> {
    parse_request(s.as_bytes(), 16384, 100)
}

#[test]
fn rfc_example_accept() {
    assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn valid_upgrade() {
    let r = parse(&ws("")).unwrap().unwrap();
    assert_eq!(r.ws_key.as_deref(), Some(KEY));
    assert_eq!(r.path(), "/chat");
    assert_eq!(r.head_len, ws("").len());
}

#[test]
fn partial_then_too_large() {
    let s = ws("");
    assert_eq!(parse(&s[..s.len() - 2]), Ok(None));
    let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(20000));
    assert_eq!(parse(&big), Err(Reject::HeadTooLarge));
    let many: String = (0..200).map(|i| format!("X-{i}: y\r\n")).collect();
    assert_eq!(
        parse(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")),
        Err(Reject::HeadTooLarge)
    );
}

#[test]
fn rejects() {
    let v12 = ws("").replace("Version: 13", "Version: 12");
    assert_eq!(parse(&v12), Err(Reject::UpgradeVersion));
    let nokey = ws("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "");
    assert!(matches!(parse(&nokey), Err(Reject::BadRequest(_))));
    let shortkey = ws("").replace(KEY, "c2hvcnQ=");
    assert!(matches!(parse(&shortkey), Err(Reject::BadRequest(_))));
    assert!(matches!(
        parse("\x01\x02garbage\r\n\r\n"),
        Err(Reject::BadRequest(_))
    ));
    let post = ws("").replacen("GET", "POST", 1);
    assert!(matches!(parse(&post), Err(Reject::BadRequest(_))));
    let body = ws("Content-Length: 5\r\n");
    assert!(matches!(parse(&body), Err(Reject::BadRequest(_))));
    let both =
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert!(matches!(parse(both), Err(Reject::BadRequest(_))));
    let dup = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
    assert!(matches!(parse(dup), Err(Reject::BadRequest(_))));
    let abs = "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n";
    assert!(matches!(parse(abs), Err(Reject::BadRequest(_))));
    let two_hosts = "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
    assert!(matches!(parse(two_hosts), Err(Reject::BadRequest(_))));
}

#[test]
fn forwarded_head_drops_hop_by_hop_and_adds_ours() {
    let r = parse(&ws("Connection: X-Secret, host\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 10.0.0.1\r\nX-Real-IP: 6.6.6.6\r\nTE: trailers\r\n"))
        .unwrap()
        .unwrap();
    let out = String::from_utf8(forward_head(
        &r,
        "/x",
        "192.0.2.7".parse().unwrap(),
        true,
        b"tail",
    ))
    .unwrap();
    assert!(
        out.starts_with("GET /x HTTP/1.1\r\nHost: example.com\r\n"),
        "{out}"
    );
    assert!(!out.to_ascii_lowercase().contains("x-secret"), "{out}");
    assert!(!out.contains("Keep-Alive"), "{out}");
    assert!(!out.contains("TE:"), "{out}");
    assert!(!out.contains("6.6.6.6"), "{out}");
    assert!(
        out.contains("X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n"),
        "{out}"
    );
    assert!(out.contains("X-Real-IP: 192.0.2.7\r\n"), "{out}");
    assert!(out.contains("X-Forwarded-Proto: http\r\n"), "{out}");
    assert!(
        out.contains(&format!("Sec-WebSocket-Key: {KEY}\r\n")),
        "{out}"
    );
    assert!(
        out.ends_with("Connection: Upgrade\r\nUpgrade: websocket\r\n\r\ntail"),
        "{out}"
    );
    assert_eq!(out.matches("Connection:").count(), 1);
}

#[test]
fn forwarding_headers_in_any_spelling_are_ringlbs() {
    let r = parse(&ws("X-Forwarded-For: 10.0.0.1\r\nX_Forwarded_For: 10.0.0.2\r\nX_Real_IP: 6.6.6.6\r\nx-real_ip: 6.6.6.7\r\nX_Forwarded_Proto: https\r\nForwarded: for=10.0.0.3\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Port: 1\r\nX-Forwardedness: kept\r\n"))
        .unwrap()
        .unwrap();
    let replaced = String::from_utf8(forward_head(
        &r,
        "/",
        "192.0.2.7".parse().unwrap(),
        false,
        b"",
    ))
    .unwrap();
    for gone in ["10.0.0", "6.6.6", "https", "evil", "Port", "Forwarded:"] {
        assert!(!replaced.contains(gone), "{gone}: {replaced}");
    }
    assert!(
        replaced.contains("X-Forwarded-For: 192.0.2.7\r\n"),
        "{replaced}"
    );
    assert!(replaced.contains("X-Forwardedness: kept\r\n"), "{replaced}");
    let appended = String::from_utf8(forward_head(
        &r,
        "/",
        "192.0.2.7".parse().unwrap(),
        true,
        b"",
    ))
    .unwrap();
    // Only the proper spelling is a list ringlb appends to.
    assert!(
        appended.contains("X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n"),
        "{appended}"
    );
    assert!(!appended.contains("10.0.0.2"), "{appended}");
}

#[test]
fn websocket_headers_named_in_connection_still_reach_the_backend() {
    let r = parse(&ws(
        "Connection: Upgrade, Sec-WebSocket-Key, Sec-WebSocket-Version\r\n",
    ))
    .unwrap()
    .unwrap();
    let out = String::from_utf8(forward_head(
        &r,
        "/",
        "192.0.2.7".parse().unwrap(),
        false,
        b"",
    ))
    .unwrap();
    assert!(
        out.contains(&format!("Sec-WebSocket-Key: {KEY}\r\n")),
        "{out}"
    );
    assert!(out.contains("Sec-WebSocket-Version: 13\r\n"), "{out}");
}

#[test]
fn response_with_both_lengths_is_refused() {
    let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert!(matches!(
        parse_response(r, 16384, None, false),
        Err(Reject::BadGateway(_))
    ));
}

#[test]
fn http10_stays_http10() {
    let r = parse("POST /api HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap()
        .unwrap();
    let out = forward_head(&r, "/", "127.0.0.1".parse().unwrap(), false, b"hi");
    assert!(out.starts_with(b"POST / HTTP/1.0\r\n"));
    assert!(out.ends_with(b"\r\n\r\nhi"));
}

#[test]
fn plain_request_gets_connection_close() {
    let r = parse("GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(!r.is_upgrade());
    let out = String::from_utf8(forward_head(
        &r,
        "/x",
        "::ffff:127.0.0.1".parse().unwrap(),
        false,
        b"",
    ))
    .unwrap();
    assert!(out.contains("X-Real-IP: 127.0.0.1\r\n"), "{out}");
    assert!(out.ends_with("Connection: close\r\n\r\n"), "{out}");
}

#[test]
fn responses() {
    let ok = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\nframe", accept_key(KEY));
    let r = parse_response(ok.as_bytes(), 16384, Some(KEY), false)
        .unwrap()
        .unwrap();
    assert_eq!(r.body, Body::Upgraded);
    assert_eq!(r.head_len, ok.len() - 5);
    let wrong = ok.replace(&accept_key(KEY), "AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
    assert!(matches!(
        parse_response(wrong.as_bytes(), 16384, Some(KEY), false),
        Err(Reject::BadGateway(_))
    ));
    let forbidden = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope";
    let r = parse_response(forbidden, 16384, Some(KEY), false)
        .unwrap()
        .unwrap();
    assert_eq!((r.status, r.body), (403, Body::Length(4)));
    assert_eq!(
        parse_response(b"HTTP/1.1 200 OK\r\n", 16384, None, false),
        Ok(None)
    );
    assert!(parse_response(b"garbage\r\n\r\n", 16384, None, false).is_err());
    let huge = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(400));
    assert!(parse_response(huge.as_bytes(), 256, None, false).is_err());
}

#[test]
fn reject_responses_are_complete_http() {
    for r in [
        Reject::UpgradeVersion,
        Reject::HeadTooLarge,
        Reject::BadGateway("x"),
        Reject::GatewayTimeout,
    ] {
        let bytes = r.response();
        let parsed = parse_response(&bytes, 4096, None, false).unwrap().unwrap();
        assert_eq!(parsed.status, r.status());
        assert_eq!(
            parsed.body,
            Body::Length((bytes.len() - parsed.head_len) as u64)
        );
    }
    assert!(String::from_utf8(Reject::UpgradeVersion.response())
        .unwrap()
        .contains("Sec-WebSocket-Version: 13\r\n"));
}

mod properties {
    use super::super::*;
    use proptest::prelude::{any, prop_assert, prop_oneof, proptest, Just, Strategy};

    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("Connection".to_string()),
            Just("Keep-Alive".to_string()),
            Just("TE".to_string()),
            Just("Trailer".to_string()),
            Just("Upgrade".to_string()),
            Just("Proxy-Connection".to_string()),
            Just("Proxy-Authorization".to_string()),
            Just("X-Forwarded-For".to_string()),
            Just("X-Real-IP".to_string()),
            "[A-Za-z][A-Za-z0-9-]{0,12}",
        ]
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_request(&bytes, 512, 16);
            let _ = parse_response(&bytes, 512, Some("dGhlIHNhbXBsZSBub25jZQ=="), false);
        }

        #[test]
        fn forwarded_head_has_no_hop_by_hop_header(
            headers in proptest::collection::vec((header_name(), "[a-zA-Z0-9 ,=-]{0,20}"), 0..12),
            upgrade in any::<bool>(),
        ) {
            let mut req = String::from("GET /p HTTP/1.1\r\nHost: h\r\n");
            if upgrade {
                req.push_str("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n");
            }
            let mut named = Vec::new();
            for (n, v) in &headers {
                req.push_str(&format!("{n}: {v}\r\n"));
                if n.eq_ignore_ascii_case("connection") {
                    named.extend(v.split(',').map(|t| t.trim().to_ascii_lowercase()).filter(|t| !t.is_empty()));
                }
            }
            req.push_str("\r\n");
            let Ok(Some(parsed)) = parse_request(req.as_bytes(), 16384, 100) else { return Ok(()) };
            let out = String::from_utf8(forward_head(&parsed, "/p", "10.0.0.1".parse().unwrap(), false, b"")).unwrap();
            let names: Vec<String> = out.lines().skip(1).filter_map(|l| l.split_once(':')).map(|(n, _)| n.to_ascii_lowercase()).collect();
            for hop in ["keep-alive", "te", "trailer", "proxy-connection", "proxy-authorization"] {
                prop_assert!(!names.iter().any(|n| n == hop), "{hop} forwarded:\n{out}");
            }
            for n in &named {
                // Host is never dropped; the rest are ringlb's own headers.
                let ours = ["host", "connection", "upgrade", "x-forwarded-for", "x-real-ip", "x-forwarded-proto"];
                if !ours.contains(&n.as_str()) {
                    prop_assert!(!names.iter().any(|x| x == n), "{n} was named in Connection but forwarded:\n{out}");
                }
            }
            prop_assert!(names.iter().filter(|n| *n == "connection").count() == 1);
            prop_assert!(names.iter().filter(|n| *n == "x-real-ip").count() == 1);
            prop_assert!(names.iter().filter(|n| *n == "host").count() == 1);
        }
    }
}
