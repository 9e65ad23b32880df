//! The PROXY protocol (HAProxy's spec, versions 1 and 2): the header an L4
//! tier puts in front of a connection to say whose it is, and the one ringlb
//! sends to backends that want the client's address that way.
//!
//! Parsing is strict and bounded: v1 is one CRLF-ended text line of at most
//! 107 bytes; v2 is the 12-byte signature, version 2, a command (LOCAL or
//! PROXY), a family and a length of at most [`MAX_V2_LEN`]; TLVs are
//! skipped. Anything else is malformed: the connection is closed, never
//! read as HTTP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line, CRLF included (the spec's limit).
const MAX_V1: usize = 107;
/// Addresses and TLVs of a v2 header; more is treated as malformed.
pub const MAX_V2_LEN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The connection is the client's: `src` is its address.
    Proxy { src: SocketAddr, dst: SocketAddr },
    /// The L4 tier's own connection (a health check) or an unknown
    /// family: the connection's own address stands.
    Local,
}

/// What the first bytes of a connection are.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet to tell or to finish.
    Partial,
    /// No PROXY header starts here.
    Absent,
    /// A header, and how many bytes it took.
    Header(Header, usize),
}

/// Looks at the start of a connection.
pub fn parse(buf: &[u8]) -> Result<Parsed, &'static str> {
    let v1 = b"PROXY ";
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(Parsed::Partial)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(v1.len());
    if buf[..n] == v1[..n] {
        return if n < v1.len() {
            Ok(Parsed::Partial)
        } else {
            parse_v1(buf)
        };
    }
    Ok(Parsed::Absent)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, &'static str> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1 {
            Err("PROXY v1 line too long")
        } else {
            Ok(Parsed::Partial)
        };
    };
    if end + 2 > MAX_V1 {
        return Err("PROXY v1 line too long");
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "PROXY v1 line not text")?;
    let parts: Vec<&str> = line.split(' ').collect();
    let header = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header::Local,
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |s: &str| -> Result<IpAddr, &'static str> {
                let ip: IpAddr = s.parse().map_err(|_| "PROXY v1 bad address")?;
                if ip.is_ipv4() != (*fam == "TCP4") {
                    return Err("PROXY v1 address of the wrong family");
                }
                Ok(ip)
            };
            let port = |s: &str| -> Result<u16, &'static str> {
                if s.is_empty()
                    || s.len() > 5
                    || !s.bytes().all(|b| b.is_ascii_digit())
                    || (s.len() > 1 && s.starts_with('0'))
                {
                    return Err("PROXY v1 bad port");
                }
                s.parse().map_err(|_| "PROXY v1 bad port")
            };
            Header::Proxy {
                src: SocketAddr::new(ip(src)?, port(sport)?),
                dst: SocketAddr::new(ip(dst)?, port(dport)?),
            }
        }
        _ => return Err("PROXY v1 malformed"),
    };
    Ok(Parsed::Header(header, end + 2))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, &'static str> {
    if buf.len() < 16 {
        return Ok(Parsed::Partial);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err("PROXY v2 unknown version");
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_V2_LEN {
        return Err("PROXY v2 header too long");
    }
    if buf.len() < 16 + len {
        return Ok(Parsed::Partial);
    }
    let body = &buf[16..16 + len];
    let header = match ver_cmd & 0x0f {
        0 => Header::Local,
        1 => match buf[13] {
            // TCP over IPv4, then IPv6.
            0x11 => {
                if body.len() < 12 {
                    return Err("PROXY v2 truncated IPv4 addresses");
                }
                let a = |i: usize| Ipv4Addr::new(body[i], body[i + 1], body[i + 2], body[i + 3]);
                let p = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
                Header::Proxy {
                    src: SocketAddr::new(a(0).into(), p(8)),
                    dst: SocketAddr::new(a(4).into(), p(10)),
                }
            }
            0x21 => {
                if body.len() < 36 {
                    return Err("PROXY v2 truncated IPv6 addresses");
                }
                let a = |i: usize| {
                    Ipv6Addr::from(<[u8; 16]>::try_from(&body[i..i + 16]).expect("16 bytes"))
                };
                let p = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
                Header::Proxy {
                    src: SocketAddr::new(a(0).into(), p(32)),
                    dst: SocketAddr::new(a(16).into(), p(34)),
                }
            }
            // UNSPEC, UDP, unix sockets: no client address to use.
            0x00 => Header::Local,
            _ => return Err("PROXY v2 unsupported family"),
        },
        _ => return Err("PROXY v2 unknown command"),
    };
    Ok(Parsed::Header(header, 16 + len))
}

/// `PROXY TCP4|TCP6 src dst sport dport\r\n`.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// The binary form: signature, v2 PROXY, TCP over the family, addresses.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// Both addresses in one family (an IPv4-mapped client on an IPv6
/// listener is sent as IPv4 when the other end is IPv4 too).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (s, d) = (canon(src), canon(dst));
    if s.is_ipv4() == d.is_ipv4() {
        (s, d)
    } else {
        let v6 = |a: SocketAddr| match a.ip() {
            IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
            IpAddr::V6(_) => a,
        };
        (v6(s), v6(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_and_v2_round_trip_in_any_split() {
        for (src, dst) in [
            (sa("203.0.113.7:51000"), sa("10.0.0.1:443")),
            (sa("[2001:db8::7]:51000"), sa("[2001:db8::1]:443")),
        ] {
            for wire in [encode_v1(src, dst), encode_v2(src, dst)] {
                let mut with_http = wire.clone();
                with_http.extend_from_slice(b"GET / HTTP/1.1\r\n");
                for cut in 0..wire.len() {
                    assert_eq!(parse(&with_http[..cut]), Ok(Parsed::Partial), "cut {cut}");
                }
                assert_eq!(
                    parse(&with_http),
                    Ok(Parsed::Header(Header::Proxy { src, dst }, wire.len()))
                );
            }
        }
    }

    #[test]
    fn local_unknown_and_bad_shapes() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Parsed::Header(Header::Local, 16)));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\nGET"),
            Ok(Parsed::Header(Header::Local, 15))
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Ok(Parsed::Absent));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n"[..],
            b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 120]].concat();
        assert!(parse(&long).is_err());
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0x10, 0x00]);
        assert_eq!(parse(&v2), Err("PROXY v2 header too long"));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert!(parse(&v2).is_err(), "truncated addresses");
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x31, 0x11, 0x00, 0x00]);
        assert!(parse(&v2).is_err(), "version 3");
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
            let mut v2 = V2_SIGNATURE.to_vec();
            v2.extend_from_slice(&bytes);
            let _ = parse(&v2);
        }
    }
}
