//! rustls with `ring` against `aws-lc-rs`, in memory (no sockets), so only
//! the crypto provider differs: the server's CPU per full TLS 1.3 handshake
//! (ECDSA P-256, X25519, AES-128-GCM) and AES-128-GCM record throughput,
//! sealing and opening 16 KiB records. Only the server side is timed: it is
//! what ringlb pays.
//!
//! Run: `cargo run --release -- [handshakes] [MiB]` (defaults 2000, 256).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// Counts live heap bytes, to weigh what an established, idle session
/// keeps per provider.
struct Counting;
static LIVE: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE.fetch_sub(l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.dealloc(p, l)
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

struct Pki {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

fn pki() -> Pki {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["bench.test".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pki {
        cert: cert.der().clone(),
        key: key.serialize_der(),
    }
}

fn only_aes128(mut p: CryptoProvider) -> Arc<CryptoProvider> {
    p.cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    // The same key exchange on both: aws-lc-rs would otherwise lead with
    // the post-quantum hybrid, which ring does not have.
    p.kx_groups
        .retain(|g| g.name() == rustls::NamedGroup::X25519);
    Arc::new(p)
}

fn configs(p: &Arc<CryptoProvider>, pki: &Pki, tickets: bool) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let mut server = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone())),
        )
        .unwrap();
    // Full handshakes only: no ticket, no stateful cache hit.
    if !tickets {
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    let mut roots = RootCertStore::empty();
    roots.add(pki.cert.clone()).unwrap();
    let mut client = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    (Arc::new(server), Arc::new(client))
}

/// Moves every pending TLS byte from `from` to `to`.
fn pump(from: &mut dyn FnMut(&mut Vec<u8>) -> usize, to: &mut dyn FnMut(&[u8])) -> bool {
    let mut buf = Vec::new();
    while from(&mut buf) > 0 {}
    if buf.is_empty() {
        return false;
    }
    to(&buf);
    true
}

/// One full handshake; returns the time spent in the server.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> (Duration, ServerConnection, ClientConnection) {
    let name = ServerName::try_from("bench.test").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut in_server = t.elapsed();
    for _ in 0..10 {
        let mut moved = false;
        // client → server
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let t = Instant::now();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
            in_server += t.elapsed();
        }
        // server → client
        let t = Instant::now();
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        in_server += t.elapsed();
        if !buf.is_empty() {
            moved = true;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        if !moved && !s.is_handshaking() && !c.is_handshaking() {
            break;
        }
    }
    assert!(!s.is_handshaking() && !c.is_handshaking());
    let _ = pump;
    (in_server, s, c)
}

fn bulk(s: &mut ServerConnection, c: &mut ClientConnection, mib: usize) -> (f64, f64) {
    let chunk = vec![0x5au8; 1 << 20];
    // Seal: server plaintext → records.
    let mut wire = Vec::with_capacity((1 << 20) + 4096);
    let mut sink = vec![0u8; 1 << 20];
    let mut seal = Duration::ZERO;
    for _ in 0..mib {
        wire.clear();
        let t = Instant::now();
        for piece in chunk.chunks(16384) {
            s.writer().write_all(piece).unwrap();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
        }
        seal += t.elapsed();
        // Drain at the client so buffers do not grow (not timed).
        let mut rd = &wire[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
            while let Ok(n) = c.reader().read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
    }
    // Open: client records → server plaintext.
    let mut open = Duration::ZERO;
    for _ in 0..mib {
        wire.clear();
        for piece in chunk.chunks(16384) {
            c.writer().write_all(piece).unwrap();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
        }
        let t = Instant::now();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
            while let Ok(n) = s.reader().read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
        open += t.elapsed();
    }
    let mb = (mib as f64) * 1.048576;
    (mb / seal.as_secs_f64(), mb / open.as_secs_f64())
}

#[allow(deprecated)] // ring has no post-quantum group; X25519 is used on both.
fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(2000);
    let mib: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(256);
    let pki = pki();
    let providers = [
        ("ring", only_aes128(rustls::crypto::ring::default_provider())),
        ("aws-lc-rs", only_aes128(rustls::crypto::aws_lc_rs::default_provider())),
    ];
    println!("{{\"handshakes\": {n}, \"bulk_mib\": {mib}, \"suite\": \"TLS13_AES_128_GCM_SHA256\", \"cert\": \"ECDSA P-256\", \"results\": [");
    // Two rounds, interleaved, so neither provider gets the warm machine.
    let mut first = true;
    for round in 0..2 {
        for (name, p) in &providers {
            let kx = format!("{:?}", p.kx_groups[0].name());
            let (server, client) = configs(p, &pki, false);
            // Warm up.
            for _ in 0..50 {
                handshake(&server, &client);
            }
            let mut times: Vec<Duration> = (0..n).map(|_| handshake(&server, &client).0).collect();
            times.sort();
            let total: Duration = times.iter().sum();
            let mean_us = total.as_secs_f64() * 1e6 / n as f64;
            let p50 = times[n / 2].as_secs_f64() * 1e6;
            let p99 = times[n * 99 / 100].as_secs_f64() * 1e6;
            // Heap an established server session holds, idle: fresh, and
            // after bulk traffic has passed (buffers kept or not).
            let (_, s, c) = handshake(&server, &client);
            drop(c);
            let before = live();
            drop(s);
            let idle_fresh = before - live();
            let (_, mut s, mut c) = handshake(&server, &client);
            let (seal, open) = bulk(&mut s, &mut c, mib);
            drop(c);
            let before = live();
            drop(s);
            let idle_after_bulk = before - live();
            if !first {
                println!(",");
            }
            first = false;
            print!(
                "  {{\"round\": {round}, \"provider\": \"{name}\", \"kx\": \"{kx}\", \"server_us_per_full_handshake\": {{\"mean\": {mean_us:.1}, \"p50\": {p50:.1}, \"p99\": {p99:.1}}}, \"seal_MBps\": {seal:.0}, \"open_MBps\": {open:.0}, \"idle_session_heap_bytes\": {idle_fresh}, \"idle_session_heap_bytes_after_bulk\": {idle_after_bulk}}}"
            );
        }
    }
    println!("\n], \"aead_key\": [");
    // ringlb keeps only raw key bytes for an idle session and builds the
    // AEAD key again when it next moves bytes: what that costs.
    let key = [7u8; 16];
    let k = 100_000u32;
    let before = live();
    let one = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_128_GCM, &key).unwrap(),
    );
    let heap = live() - before;
    let t = Instant::now();
    for _ in 0..k {
        std::hint::black_box(aws_lc_rs::aead::LessSafeKey::new(
            aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_128_GCM, std::hint::black_box(&key)).unwrap(),
        ));
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(k);
    println!(
        "  {{\"provider\": \"aws-lc-rs\", \"aes128gcm_key_setup_ns\": {ns:.0}, \"key_heap_bytes\": {heap}, \"key_inline_bytes\": {}}},",
        std::mem::size_of_val(&one)
    );
    let before = live();
    let one = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &key).unwrap(),
    );
    let heap = live() - before;
    let t = Instant::now();
    for _ in 0..k {
        std::hint::black_box(ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, std::hint::black_box(&key)).unwrap(),
        ));
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(k);
    println!(
        "  {{\"provider\": \"ring\", \"aes128gcm_key_setup_ns\": {ns:.0}, \"key_heap_bytes\": {heap}, \"key_inline_bytes\": {}}}",
        std::mem::size_of_val(&one)
    );
    println!("]}}");
}
