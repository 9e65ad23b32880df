use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::*;

#[test]
fn user_data_round_trips() {
    for op in Op::ALL {
        for side in [Side::Client, Side::Backend] {
            for gen in [0, 1, 0x1234, u16::MAX] {
                for key in [0, 1, 77, u32::MAX] {
                    let ud = Ud { op, side, gen, key };
                    let raw = ud.encode();
                    assert_eq!(Ud::decode(raw), Some(ud), "{raw:#018x}");
                    // The documented layout, field by field.
                    assert_eq!(raw >> 56, op as u64);
                    assert_eq!((raw >> 48) & 0xff, side as u64);
                    assert_eq!((raw >> 32) & 0xffff, gen as u64);
                    assert_eq!(raw & 0xffff_ffff, key as u64);
                }
            }
        }
    }
}

#[test]
fn foreign_user_data_is_not_ours() {
    assert_eq!(Ud::decode(0), None);
    assert_eq!(Ud::decode(12 << 56), None);
    assert_eq!(Ud::decode(2 << 56 | 2 << 48), None);
}

#[test]
fn only_the_live_generation_is_delivered() {
    assert_eq!(verdict(Some(7), 7), Verdict::Deliver);
    assert_eq!(verdict(Some(7), 6), Verdict::Stale);
    assert_eq!(verdict(None, 7), Verdict::Stale);
}

fn driver(nbufs: u16) -> Driver<()> {
    Driver::new(
        64,
        nbufs,
        4096,
        ring::eventfd().unwrap(),
        Arc::new(ShardStats::default()),
    )
    .unwrap()
}

/// Waits for the next routed completion that is not `Routed::Nothing`, or
/// returns what came if only `Nothing`s did within a second.
fn next(d: &mut Driver<()>) -> Vec<Routed> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while Instant::now() < deadline {
        d.submit_and_wait(Some(Duration::from_millis(100))).unwrap();
        d.reap(&mut out);
        if !out.is_empty() {
            return out;
        }
    }
    panic!("no completion within 5s");
}

/// A real recv completion for a slot whose generation moved on (as if the
/// slot had been freed and reused) is counted, not delivered, and its
/// buffer goes straight back to the pool; so is one for a slot that is gone.
#[test]
fn a_stale_completion_returns_its_buffer() {
    let mut d = driver(4);
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let key = d.insert(OwnedFd::from(ours), ());
    d.arm_recv(key, Side::Client);
    d.submit_and_wait(Some(Duration::ZERO)).unwrap();

    // The op was submitted by the slot's current generation; move it on.
    d.slots[key].gen += 1;
    peer.write_all(b"hello").unwrap();
    let routed = next(&mut d);
    assert!(matches!(routed[..], [Routed::Nothing]), "{routed:?}");
    assert_eq!(d.stats.stale_completions.get(), 1);
    assert_eq!(d.available(), 4, "the buffer went back");

    // Gone altogether (kept alive here, so the recv still has its socket).
    let slot = d.slots.remove(key);
    peer.write_all(b"again").unwrap();
    let routed = next(&mut d);
    assert!(matches!(routed[..], [Routed::Nothing]), "{routed:?}");
    assert_eq!(d.stats.stale_completions.get(), 2);
    assert_eq!(d.available(), 4);

    // Buffers given back are usable: the pool has not lost any.
    d.commit();
    assert!(d.shutdown());
    drop(slot);
}

/// The same completion, with the generation intact, is delivered and the
/// connection holds the buffer until it releases it.
#[test]
fn a_live_completion_is_delivered() {
    let mut d = driver(4);
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let key = d.insert(OwnedFd::from(ours), ());
    d.arm_recv(key, Side::Client);
    peer.write_all(b"hello").unwrap();
    let routed = next(&mut d);
    let [Routed::Slot {
        key: k,
        first: Event::Recv { side, bid, len },
        then: None,
    }] = routed[..]
    else {
        panic!("{routed:?}");
    };
    assert_eq!((k, side, len), (key, Side::Client, 5));
    assert_eq!(d.with_bufs(key).unwrap().1.data(bid, len), b"hello");
    assert_eq!(d.available(), 3);
    d.release(bid);
    assert_eq!(d.available(), 4);
    assert_eq!(d.stats.stale_completions.get(), 0);
    assert!(d.shutdown());
}

/// A closing slot is not freed while its ops are in flight, and is once
/// they are back.
#[test]
fn a_slot_is_freed_only_with_nothing_in_flight() {
    let mut d = driver(4);
    let (ours, _peer) = UnixStream::pair().unwrap();
    let key = d.insert(OwnedFd::from(ours), ());
    d.arm_recv(key, Side::Client);
    d.poll(key, Side::Client, false);
    d.close(key);
    assert!(d.free(key).is_none(), "freed with two ops in flight");
    let mut seen = 0;
    while d.free(key).is_none() {
        for r in next(&mut d) {
            if let Routed::Slot { key: k, .. } = r {
                assert_eq!(k, key);
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 2, "the poll and the recv both came back");
    assert_eq!(d.in_flight(), 0);
}

/// Shutdown cancels every op (multishot recvs on many slots, polls, an
/// accept, the wake read) and returns only once each completion is read.
#[test]
fn shutdown_reaps_every_op() {
    let mut d = driver(8);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let l = d.add_listener(listener);
    d.arm_accept(l);
    d.arm_wake();
    let mut peers = Vec::new();
    for _ in 0..50 {
        let (ours, peer) = UnixStream::pair().unwrap();
        let key = d.insert(OwnedFd::from(ours), ());
        d.arm_recv(key, Side::Client);
        d.poll(key, Side::Client, true);
        peers.push(peer);
    }
    d.submit_and_wait(Some(Duration::ZERO)).unwrap();
    assert_eq!(d.in_flight(), 102);
    assert!(d.shutdown());
    assert_eq!(d.in_flight(), 0);
    assert_eq!(d.stats.ops_in_flight.get(), 0);
    assert!(d.slots.iter().all(|(_, s)| s.idle()));
    // A second call has nothing to do.
    assert!(d.shutdown());
}
