//! A DNS server on loopback for the discovery tests: UDP and TCP on one
//! 127.0.0.1 port (a UDP answer too big for the client gets TC set, as a
//! real server does, so the client asks again over TCP). It answers A,
//! AAAA and SRV from records the test sets (with their TTL), SERVFAIL or
//! NXDOMAIN on request, and has a stall switch under which it reads
//! queries and answers none. Every query is logged with its arrival time,
//! so a test can see when ringlb asked. Messages are parsed and built with
//! hickory-proto; the server logic is ours.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// What a name answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Records of every type asked for; a type with none gets an empty
    /// NOERROR answer.
    Records {
        addrs: Vec<IpAddr>,
        srv: Vec<(u16, u16, u16, String)>,
        ttl: u32,
    },
    ServFail,
    NxDomain,
}

#[derive(Default)]
struct State {
    zone: Mutex<HashMap<String, Answer>>,
    stall: AtomicBool,
    stop: AtomicBool,
    queries: Mutex<Vec<(String, RecordType, Instant)>>,
    tcp_queries: std::sync::atomic::AtomicUsize,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    state: Arc<State>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    pub fn start() -> DnsServer {
        // UDP and TCP on one port, as a nameserver is reached (TCP for
        // answers too big for a datagram).
        let (sock, tcp) = (0..20)
            .find_map(|_| {
                let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
                let tcp = TcpListener::bind(sock.local_addr().ok()?).ok()?;
                Some((sock, tcp))
            })
            .expect("a port free for UDP and TCP within 20 tries");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let addr = sock.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((conn, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || serve_tcp(conn, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let st = state.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !st.stop.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Some(q) = received(&st, &buf[..n]) else {
                    continue;
                };
                let Some(mut bytes) = answer(&st, &q) else {
                    continue;
                };
                // Too big for a datagram (RFC 1035 4.2.1: 512 bytes, or the
                // client's EDNS size): the header alone, with TC set, sends
                // the client to TCP.
                let max = q
                    .extensions()
                    .as_ref()
                    .map_or(512, |e| e.max_payload().max(512));
                if bytes.len() > usize::from(max) {
                    let mut t = Message::new();
                    t.set_id(q.id())
                        .set_message_type(MessageType::Response)
                        .set_op_code(q.op_code())
                        .set_truncated(true)
                        .add_queries(q.queries().to_vec());
                    bytes = t.to_vec().unwrap();
                }
                let _ = sock.send_to(&bytes, peer);
            }
        });
        DnsServer { addr, state }
    }

    pub fn set(&self, name: &str, answer: Answer) {
        self.state.zone.lock().unwrap().insert(key(name), answer);
    }

    /// A and AAAA records.
    pub fn set_addrs(&self, name: &str, addrs: &[IpAddr], ttl: u32) {
        self.set(
            name,
            Answer::Records {
                addrs: addrs.to_vec(),
                srv: vec![],
                ttl,
            },
        );
    }

    /// SRV records: (priority, weight, port, target).
    pub fn set_srv(&self, name: &str, srv: &[(u16, u16, u16, &str)], ttl: u32) {
        let srv = srv
            .iter()
            .map(|(p, w, port, t)| (*p, *w, *port, t.to_string()))
            .collect();
        self.set(
            name,
            Answer::Records {
                addrs: vec![],
                srv,
                ttl,
            },
        );
    }

    /// Read queries and answer none (a nameserver that hangs).
    pub fn stall(&self, on: bool) {
        self.state.stall.store(on, Ordering::Relaxed);
    }

    /// Queries that came over TCP.
    pub fn tcp_queries(&self) -> usize {
        self.state.tcp_queries.load(Ordering::Relaxed)
    }

    /// When `name` was asked for `rtype`.
    pub fn queries(&self, name: &str, rtype: RecordType) -> Vec<Instant> {
        let k = key(name);
        self.state
            .queries
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, t, _)| *n == k && *t == rtype)
            .map(|(_, _, at)| *at)
            .collect()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
    }
}

/// Logs a query; `None` if it cannot be parsed or the server stalls.
fn received(st: &State, bytes: &[u8]) -> Option<Message> {
    let q = Message::from_vec(bytes).ok()?;
    if let Some(query) = q.queries().first() {
        st.queries.lock().unwrap().push((
            key(&query.name().to_ascii()),
            query.query_type(),
            Instant::now(),
        ));
    }
    (!st.stall.load(Ordering::Relaxed)).then_some(q)
}

/// DNS over TCP: each message with a two-byte length in front (RFC 1035
/// 4.2.2); the connection ends when the client closes it, after 5 s
/// without a query, or after 100 queries.
fn serve_tcp(mut conn: TcpStream, st: &State) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    for _ in 0..100 {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut buf).is_err() {
            return;
        }
        st.tcp_queries.fetch_add(1, Ordering::Relaxed);
        let Some(q) = received(st, &buf) else {
            continue;
        };
        let Some(bytes) = answer(st, &q) else {
            continue;
        };
        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&bytes);
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

fn answer(st: &State, q: &Message) -> Option<Vec<u8>> {
    let query = q.queries().first()?.clone();
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true)
        .add_query(query.clone());
    let name: Name = query.name().clone();
    match st.zone.lock().unwrap().get(&key(&name.to_ascii())).cloned() {
        None | Some(Answer::NxDomain) => {
            m.set_response_code(ResponseCode::NXDomain);
        }
        Some(Answer::ServFail) => {
            m.set_response_code(ResponseCode::ServFail);
        }
        Some(Answer::Records { addrs, srv, ttl }) => {
            for ip in addrs {
                let rdata = match (ip, query.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                    _ => continue,
                };
                m.add_answer(Record::from_rdata(name.clone(), ttl, rdata));
            }
            if query.query_type() == RecordType::SRV {
                for (p, w, port, target) in srv {
                    let t = Name::from_ascii(format!("{}.", key(&target))).unwrap();
                    m.add_answer(Record::from_rdata(
                        name.clone(),
                        ttl,
                        RData::SRV(SRV::new(p, w, port, t)),
                    ));
                }
            }
        }
    }
    m.to_vec().ok()
}
