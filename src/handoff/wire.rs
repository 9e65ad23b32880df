//! The hand-off protocol between the old and the new process, on a unix
//! stream socket (one end of a `socketpair`, inherited by the new process).
//!
//! A message is a 7-byte header (kind, descriptor count `u16`, body length
//! `u32`, little-endian), sent with `sendmsg` carrying the message's
//! descriptors (SCM_RIGHTS, at most [`SCM_MAX_FD`]), then the body. The
//! reader takes the header with `recvmsg` (the descriptors come with its
//! first byte) and then exactly the body, never a byte of the next message,
//! so descriptors can never arrive with a read that has no room for them.
//! Fewer descriptors than the header announces, or `MSG_CTRUNC`, is an
//! error.
//!
//! ```text
//!   new → old   Hello{pid}  | Refused{reason}       (config loaded and checked, or why not)
//!   old → new   Listeners{addresses, admin, marks} + listening sockets
//!   new → old   Ready       | Refused{reason}       (shards accepting)
//!   old → new   Sessions{records} + 2 sockets each  (repeated)
//!   new → old   Ack{n}                              (one per Sessions)
//!   old → new   Done{counters, totals}
//!   new → old   Current                             (pid file, sd_notify done)
//! ```

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::ring::{self, SCM_MAX_FD};

/// The largest body accepted: a batch of records with their queued bytes.
const MAX_BODY: usize = 512 << 20;

/// Sessions per `Sessions` message: two descriptors each within SCM_MAX_FD.
pub const BATCH: usize = SCM_MAX_FD / 2;

/// A backend's operator and health marks, carried so picks in the new
/// process skip what the old one skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub upstream: String,
    pub addr: SocketAddr,
    pub draining: bool,
    /// 0: up; `u64::MAX`: down until marked up; else down this many more ms.
    pub down_ms: u64,
}

/// A backend's lifetime totals, added to the new process's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    pub upstream: String,
    pub addr: SocketAddr,
    pub connections: u64,
    pub connect_failures: u64,
    /// Sessions closed, by reason (`stats::CLOSE_REASONS` order; a newer
    /// process that knows more reasons reads zeros for the rest).
    pub closed: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello {
        pid: u32,
    },
    Refused {
        reason: String,
    },
    /// The sockets follow in order: `count` for each listen address, then
    /// the admin socket if `admin` is set.
    Listeners {
        listen: Vec<(SocketAddr, u32)>,
        admin: Option<SocketAddr>,
        marks: Vec<Mark>,
    },
    Ready,
    /// Encoded session records; client then backend socket for each.
    Sessions {
        records: Vec<Vec<u8>>,
    },
    Ack {
        n: u32,
    },
    Done {
        sessions: u64,
        counters: Vec<u64>,
        totals: Vec<Totals>,
    },
    Current,
}

impl Msg {
    fn kind(&self) -> u8 {
        match self {
            Msg::Hello { .. } => 1,
            Msg::Refused { .. } => 2,
            Msg::Listeners { .. } => 3,
            Msg::Ready => 4,
            Msg::Sessions { .. } => 5,
            Msg::Ack { .. } => 6,
            Msg::Done { .. } => 7,
            Msg::Current => 8,
        }
    }

    fn body(&self) -> Vec<u8> {
        let mut w = W(Vec::new());
        match self {
            Msg::Hello { pid } => w.u32(*pid),
            Msg::Refused { reason } => w.str(reason),
            Msg::Listeners {
                listen,
                admin,
                marks,
            } => {
                w.u32(listen.len() as u32);
                for (a, n) in listen {
                    w.addr(*a);
                    w.u32(*n);
                }
                match admin {
                    Some(a) => {
                        w.0.push(1);
                        w.addr(*a);
                    }
                    None => w.0.push(0),
                }
                w.u32(marks.len() as u32);
                for m in marks {
                    w.str(&m.upstream);
                    w.addr(m.addr);
                    w.0.push(u8::from(m.draining));
                    w.u64(m.down_ms);
                }
            }
            Msg::Ready | Msg::Current => {}
            Msg::Sessions { records } => {
                // All at once: a growing buffer would free copies of the
                // records (TLS keys) before `send` can wipe them.
                w.0.reserve_exact(4 + records.iter().map(|r| 4 + r.len()).sum::<usize>());
                w.u32(records.len() as u32);
                for r in records {
                    w.bytes(r);
                }
            }
            Msg::Ack { n } => w.u32(*n),
            Msg::Done {
                sessions,
                counters,
                totals,
            } => {
                w.u64(*sessions);
                w.u32(counters.len() as u32);
                for c in counters {
                    w.u64(*c);
                }
                w.u32(totals.len() as u32);
                for t in totals {
                    w.str(&t.upstream);
                    w.addr(t.addr);
                    w.u64(t.connections);
                    w.u64(t.connect_failures);
                    w.u32(t.closed.len() as u32);
                    for c in &t.closed {
                        w.u64(*c);
                    }
                }
            }
        }
        w.0
    }

    fn decode(kind: u8, body: &[u8]) -> io::Result<Msg> {
        let mut r = R(body);
        let msg = match kind {
            1 => Msg::Hello { pid: r.u32()? },
            2 => Msg::Refused { reason: r.str()? },
            3 => {
                let n = r.u32()?;
                let mut listen = Vec::new();
                for _ in 0..n {
                    listen.push((r.addr()?, r.u32()?));
                }
                let admin = match r.u8()? {
                    0 => None,
                    _ => Some(r.addr()?),
                };
                let n = r.u32()?;
                let mut marks = Vec::new();
                for _ in 0..n {
                    marks.push(Mark {
                        upstream: r.str()?,
                        addr: r.addr()?,
                        draining: r.u8()? != 0,
                        down_ms: r.u64()?,
                    });
                }
                Msg::Listeners {
                    listen,
                    admin,
                    marks,
                }
            }
            4 => Msg::Ready,
            5 => {
                let n = r.u32()? as usize;
                if n > BATCH {
                    return Err(bad("more sessions in a batch than descriptors allow"));
                }
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(r.bytes()?.to_vec());
                }
                Msg::Sessions { records }
            }
            6 => Msg::Ack { n: r.u32()? },
            7 => {
                let sessions = r.u64()?;
                let n = r.u32()?;
                let mut counters = Vec::new();
                for _ in 0..n {
                    counters.push(r.u64()?);
                }
                let n = r.u32()?;
                let mut totals = Vec::new();
                for _ in 0..n {
                    totals.push(Totals {
                        upstream: r.str()?,
                        addr: r.addr()?,
                        connections: r.u64()?,
                        connect_failures: r.u64()?,
                        closed: {
                            let k = r.u32()? as usize;
                            // Bounded like every count read here: a reason
                            // list is short.
                            if k > 64 {
                                return Err(bad("too many close reasons"));
                            }
                            let mut v = Vec::with_capacity(k);
                            for _ in 0..k {
                                v.push(r.u64()?);
                            }
                            v
                        },
                    });
                }
                Msg::Done {
                    sessions,
                    counters,
                    totals,
                }
            }
            8 => Msg::Current,
            k => return Err(bad(&format!("unknown message kind {k}"))),
        };
        if !r.0.is_empty() {
            return Err(bad("bytes after the message"));
        }
        Ok(msg)
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("hand-off protocol: {what}"),
    )
}

/// Zeroes a buffer that held session records before it is freed: they
/// carry TLS keys (`TlsRecord`), which must not linger in freed heap.
/// `black_box` keeps the stores from being dropped as dead.
pub fn wipe(b: &mut [u8]) {
    b.fill(0);
    std::hint::black_box(b);
}

/// Sends `msg` with `fds` (our copies stay open).
pub fn send(sock: &UnixStream, msg: &Msg, fds: &[RawFd]) -> io::Result<()> {
    let mut body = msg.body();
    let mut head = [0u8; 7];
    head[0] = msg.kind();
    head[1..3].copy_from_slice(&(fds.len() as u16).to_le_bytes());
    head[3..7].copy_from_slice(&(body.len() as u32).to_le_bytes());
    let sent =
        ring::send_with_fds(sock.as_raw_fd(), &head, fds).and_then(|_| (&*sock).write_all(&body));
    wipe(&mut body);
    sent
}

/// Receives one message and its descriptors. EOF before a header is
/// `UnexpectedEof`; a read timeout set on the socket applies.
pub fn recv(sock: &UnixStream) -> io::Result<(Msg, Vec<OwnedFd>)> {
    let mut head = [0u8; 7];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < head.len() {
        let n = ring::recv_with_fds(sock.as_raw_fd(), &mut head[got..], &mut fds)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process closed the hand-off socket",
            ));
        }
        got += n;
    }
    let nfds = u16::from_le_bytes([head[1], head[2]]) as usize;
    let len = u32::from_le_bytes([head[3], head[4], head[5], head[6]]) as usize;
    if len > MAX_BODY {
        return Err(bad("message too large"));
    }
    if fds.len() != nfds {
        return Err(bad(&format!(
            "{} descriptors announced, {} received",
            nfds,
            fds.len()
        )));
    }
    let mut body = vec![0u8; len];
    let msg = (&*sock)
        .read_exact(&mut body)
        .and_then(|_| Msg::decode(head[0], &body));
    wipe(&mut body);
    Ok((msg?, fds))
}

struct W(Vec<u8>);

impl W {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn addr(&mut self, a: SocketAddr) {
        match a.ip() {
            IpAddr::V4(ip) => {
                self.0.push(4);
                self.0.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                self.0.push(6);
                self.0.extend_from_slice(&ip.octets());
            }
        }
        self.0.extend_from_slice(&a.port().to_le_bytes());
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad("message truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("text is not UTF-8"))
    }
    fn addr(&mut self) -> io::Result<SocketAddr> {
        let ip = match self.u8()? {
            4 => IpAddr::from(<[u8; 4]>::try_from(self.take(4)?).expect("4 bytes")),
            6 => IpAddr::from(<[u8; 16]>::try_from(self.take(16)?).expect("16 bytes")),
            _ => return Err(bad("address family")),
        };
        let port = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
        Ok(SocketAddr::new(ip, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message survives the trip, descriptors included, and a batch
    /// of SCM_MAX_FD descriptors arrives whole.
    #[test]
    fn messages_and_descriptors_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let msgs = vec![
            Msg::Hello { pid: 42 },
            Msg::Refused {
                reason: "bad config".into(),
            },
            Msg::Listeners {
                listen: vec![("127.0.0.1:80".parse().unwrap(), 2)],
                admin: Some("[::1]:9090".parse().unwrap()),
                marks: vec![Mark {
                    upstream: "u".into(),
                    addr: "10.0.0.1:8080".parse().unwrap(),
                    draining: true,
                    down_ms: u64::MAX,
                }],
            },
            Msg::Ready,
            Msg::Sessions {
                records: vec![vec![1, 2, 3], vec![]],
            },
            Msg::Ack { n: 126 },
            Msg::Done {
                sessions: 9000,
                counters: vec![1, 2, 3],
                totals: vec![Totals {
                    upstream: "u".into(),
                    addr: "10.0.0.1:8080".parse().unwrap(),
                    connections: 7,
                    connect_failures: 1,
                    closed: vec![3, 0, 2],
                }],
            },
            Msg::Current,
        ];
        for m in &msgs {
            send(&a, m, &[]).unwrap();
        }
        for m in &msgs {
            let (got, fds) = recv(&b).unwrap();
            assert_eq!(&got, m);
            assert!(fds.is_empty());
        }
        let files: Vec<std::fs::File> = (0..SCM_MAX_FD)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let big = Msg::Sessions {
            records: vec![vec![7; 1 << 20]; 3],
        };
        // More than the socket buffer holds: sent from another thread.
        let (big2, a2) = (big.clone(), a.try_clone().unwrap());
        let sender = std::thread::spawn(move || {
            send(&a2, &big2, &raw).unwrap();
            send(&a2, &Msg::Ready, &raw[..1]).unwrap();
            drop(files);
        });
        let (got, fds) = recv(&b).unwrap();
        assert_eq!(got, big);
        assert_eq!(fds.len(), SCM_MAX_FD);
        let (got, fds) = recv(&b).unwrap();
        assert_eq!((got, fds.len()), (Msg::Ready, 1));
        sender.join().unwrap();
        drop(a);
        assert_eq!(recv(&b).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A header that announces descriptors that did not come is refused.
    #[test]
    fn missing_descriptors_are_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut head = [5u8, 2, 0, 4, 0, 0, 0];
        head[3..7].copy_from_slice(&4u32.to_le_bytes());
        (&a).write_all(&head).unwrap();
        (&a).write_all(&0u32.to_le_bytes()).unwrap();
        let err = recv(&b).unwrap_err();
        assert!(
            err.to_string()
                .contains("2 descriptors announced, 0 received"),
            "{err}"
        );
    }
}
