//! On-the-fly gzip for files that have no precompressed twin, with a
//! per-shard cache of the results bounded in bytes.
//!
//! The cache is thread-local: no lock is shared between shards. A file
//! version (device, inode, size, mtime) is compressed while it is sent, a
//! slice per step (`files::zipping`, so no request holds the shard for
//! more than a slice's compression), and the result is kept when it fits
//! `gzip_cache_size`; later requests for that version are answered from
//! here. `gzip_cache_size = 0` keeps nothing: every request compresses.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::rc::Rc;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: SystemTime,
}

struct Cache {
    entries: HashMap<Key, (Rc<[u8]>, u64)>,
    bytes: usize,
    clock: u64,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache {
        entries: HashMap::new(),
        bytes: 0,
        clock: 0,
    });
}

pub fn get(key: &Key) -> Option<Rc<[u8]>> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        c.clock += 1;
        let now = c.clock;
        c.entries.get_mut(key).map(|(data, used)| {
            *used = now;
            data.clone()
        })
    })
}

/// Keeps `data` if it fits in `cap` bytes, evicting the least recently
/// used entries to make room.
pub fn put(key: Key, data: Rc<[u8]>, cap: usize) {
    if data.len() > cap {
        return;
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        while c.bytes + data.len() > cap {
            let Some(oldest) = c
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some((old, _)) = c.entries.remove(&oldest) {
                c.bytes -= old.len();
            }
        }
        c.clock += 1;
        let now = c.clock;
        c.bytes += data.len();
        if let Some((old, _)) = c.entries.insert(key, (data, now)) {
            c.bytes -= old.len();
        }
    })
}

/// Bytes held by this thread's cache.
pub fn cached_bytes() -> usize {
    CACHE.with(|c| c.borrow().bytes)
}

/// A gzip member compressed piece by piece, so each piece's cost is
/// bounded by its size and the shard can serve other connections between
/// pieces. Output comes out as the deflate state releases it: a piece may
/// yield nothing, and `finish` flushes the rest plus the trailer.
pub struct Stream {
    enc: flate2::write::GzEncoder<Vec<u8>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("gzip::Stream").finish_non_exhaustive()
    }
}

impl Default for Stream {
    fn default() -> Self {
        Stream::new()
    }
}

impl Stream {
    pub fn new() -> Stream {
        Stream {
            enc: flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(LEVEL)),
        }
    }

    /// Compresses `input`, appending what the encoder releases to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        // Writing to a Vec cannot fail.
        self.enc.write_all(input).expect("gzip into memory");
        out.append(self.enc.get_mut());
    }

    /// Ends the member: the encoder's held-back output and the trailer.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.enc.try_finish().expect("gzip into memory");
        out.append(self.enc.get_mut());
    }
}

/// nginx's `gzip_comp_level 6`, its usual setting.
const LEVEL: u32 = 6;

/// Everything at once: for tests and `examples/gzip_slice.rs`, never on a
/// shard (see `Stream`).
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 3 + 64),
        flate2::Compression::new(LEVEL),
    );
    // Writing to a Vec cannot fail.
    enc.write_all(data).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::{Duration, UNIX_EPOCH};

    fn key(ino: u64) -> Key {
        Key {
            dev: 1,
            ino,
            size: 10,
            mtime: UNIX_EPOCH + Duration::from_secs(ino),
        }
    }

    #[test]
    fn round_trip() {
        let text = "hello hello hello hello ".repeat(100);
        let gz = compress(text.as_bytes());
        assert!(gz.len() < text.len() / 4);
        let mut back = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, text);
    }

    #[test]
    fn bounded_and_lru() {
        // Thread-local: this test's thread has its own cache.
        put(key(1), vec![0u8; 40].into(), 100);
        put(key(2), vec![0u8; 40].into(), 100);
        assert!(get(&key(1)).is_some()); // 1 is now the most recent
        put(key(3), vec![0u8; 40].into(), 100);
        assert!(get(&key(2)).is_none(), "least recently used goes first");
        assert!(get(&key(1)).is_some() && get(&key(3)).is_some());
        assert_eq!(cached_bytes(), 80);
        put(key(4), vec![0u8; 101].into(), 100);
        assert!(get(&key(4)).is_none(), "larger than the whole cache");
        assert_eq!(cached_bytes(), 80);
    }
}
