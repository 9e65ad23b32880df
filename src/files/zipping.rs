//! An on-the-fly gzip answer in flight, compressed a slice at a time.
//!
//! Compressing a 1 MiB text file at once held its shard 35-55 ms (release
//! build), and every other connection of the shard waited. So the answer
//! is streamed and the work is cut into steps the shard interleaves with
//! everything else; each step is a ring operation away from the next:
//!
//! ```text
//!         ┌──────────────────── output empty (deflate holds it back) ─┐
//!         ▼                                                            │
//!  Read ≤ SLICE ─► compress the slice ─► output framed into buf ─► Send ┘
//!         ▲      (last slice: + trailer,                            │
//!         │       + chunked terminator)                             │
//!         └────────────── on_sent (not after the last) ◄────────────┘
//! ```
//!
//! One slice is compressed per completion, and the next slice is read only
//! once the previous output is out: a slow reader holds the machine at one
//! slice of input and one of output (plus the deflate state), never the
//! file or its compressed form. HTTP/1.1 gets chunks, HTTP/1.0 a body that
//! ends with the connection. While the whole result still fits the gzip
//! cache it is also kept, and stored at the end, so the next request for
//! this file version is answered from the cache with a Content-Length.

use std::rc::Rc;

use super::gzip;

/// Input compressed per step. Measured with `examples/gzip_slice.rs` on
/// the 2-core build VM (release, level 6, JavaScript-like text): 8 KiB
/// takes 0.41 ms median, 0.55 ms worst; 16 KiB 0.83 ms; 32 KiB 1.66 ms;
/// 64 KiB 3.3 ms. The budget is about 1 ms per step, but a WebSocket
/// message crosses the shard's loop several times and each turn may run
/// one step of every download in flight, so the slice is half of what the
/// budget allows; the extra reads cost little (file pages are cached).
pub const SLICE: usize = 8 * 1024;

#[derive(Debug)]
pub struct Zipping {
    gz: gzip::Stream,
    key: gzip::Key,
    /// File bytes not read yet, and the offset they start at.
    left: u64,
    off: u64,
    chunked: bool,
    /// The compressed bytes so far, while they may still fit the cache.
    keep: Option<Vec<u8>>,
    cap: usize,
    /// Compressor output of the current step, before framing.
    out: Vec<u8>,
    /// The last slice is compressed and its output queued.
    pub finished: bool,
}

impl Zipping {
    /// `cap`: the shard's gzip cache size (0: nothing is kept).
    pub fn new(key: gzip::Key, chunked: bool, cap: usize) -> Zipping {
        Zipping {
            gz: gzip::Stream::new(),
            key,
            left: key.size,
            off: 0,
            chunked,
            keep: (cap > 0).then(Vec::new),
            cap,
            out: Vec::new(),
            finished: false,
        }
    }

    /// The next slice to read: its length and file offset. Zero length:
    /// the file is all read (only for an empty file, before any read).
    pub fn next_slice(&self) -> (usize, u64) {
        (self.left.min(SLICE as u64) as usize, self.off)
    }

    /// Compresses `buf[at..at + n]` (the slice just read) and replaces it
    /// with the output framed for the wire. `buf[..at]` (a head not sent
    /// yet) stays in front.
    pub fn feed(&mut self, buf: &mut Vec<u8>, at: usize, n: usize) {
        self.gz.push(&buf[at..at + n], &mut self.out);
        buf.truncate(at);
        self.off += n as u64;
        self.left -= n as u64;
        if self.left == 0 {
            self.gz.finish(&mut self.out);
            self.finished = true;
        }
        if let Some(keep) = &mut self.keep {
            if keep.len() + self.out.len() <= self.cap {
                keep.extend_from_slice(&self.out);
            } else {
                self.keep = None;
            }
        }
        if !self.out.is_empty() {
            if self.chunked {
                buf.extend_from_slice(format!("{:x}\r\n", self.out.len()).as_bytes());
                buf.extend_from_slice(&self.out);
                buf.extend_from_slice(b"\r\n");
            } else {
                buf.extend_from_slice(&self.out);
            }
            self.out.clear();
        }
        if self.finished {
            if self.chunked {
                buf.extend_from_slice(b"0\r\n\r\n");
            }
            if let Some(keep) = self.keep.take() {
                let data: Rc<[u8]> = keep.into();
                gzip::put(self.key, data, self.cap);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Ask, Kind, Meta, Next, Serve};
    use super::SLICE;
    use crate::config::{StaticConfig, DEFAULT_GZIP_TYPES};
    use std::io::Read;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    fn site() -> Arc<StaticConfig> {
        Arc::new(StaticConfig {
            root: ".".into(),
            root_fd: std::fs::File::open(".").unwrap().into(),
            index: Some("index.html".into()),
            fallback: None,
            precompressed: false,
            gzip: true,
            gzip_min_length: 0,
            gzip_max_length: 64 << 20,
            gzip_types: DEFAULT_GZIP_TYPES.iter().map(|t| t.to_string()).collect(),
            cache_control: None,
            follow_symlinks: false,
        })
    }

    fn text(len: usize) -> Vec<u8> {
        let mut x: u32 = 1;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            out.extend_from_slice(format!("let v{} = f({});\n", x >> 24, x % 1000).as_bytes());
        }
        out.truncate(len);
        out
    }

    /// What the connection would have put on the wire, and the most the
    /// answer held in its buffer at any step.
    struct Run {
        wire: Vec<u8>,
        max_buf: usize,
        keep_alive: bool,
    }

    /// Plays the shard for one request of `/f.js` whose content is `data`
    /// (inode `ino`). Every step is taken only after the previous one is
    /// reported done, as the ring does, however slow the client.
    fn serve(data: &[u8], ino: u64, minor: u8, method: &str, cache: usize) -> Run {
        let ask = Ask {
            method: method.into(),
            path: "/f.js".into(),
            minor,
            keep_alive: true,
            accept_encoding: Some(b"gzip".to_vec()),
            ..Ask::default()
        };
        let (mut s, mut next) = Serve::start(site(), ask, cache);
        let mut run = Run {
            wire: Vec::new(),
            max_buf: 0,
            keep_alive: false,
        };
        loop {
            run.max_buf = run.max_buf.max(s.buf.len());
            next = match next {
                Next::Open(_) => {
                    let meta = Meta {
                        kind: Kind::File,
                        size: data.len() as u64,
                        mtime: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                        dev: 1,
                        ino,
                    };
                    s.on_open(Ok(meta)).1
                }
                Next::Read { at, len, offset } => {
                    // Short reads, as the ring may give.
                    let n = len.min(5000);
                    let o = offset as usize;
                    s.buf[at..at + n].copy_from_slice(&data[o..o + n]);
                    s.on_read(Ok(n))
                }
                Next::Send { start, len } => {
                    run.wire.extend_from_slice(&s.buf[start..start + len]);
                    s.on_sent()
                }
                Next::Done => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        run.keep_alive = s.keep_alive();
        run
    }

    fn split_head(wire: &[u8]) -> (String, &[u8]) {
        let end = wire.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (
            String::from_utf8(wire[..end].to_vec()).unwrap(),
            &wire[end..],
        )
    }

    fn dechunk(mut body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let eol = body.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&body[..eol]).unwrap(), 16).unwrap();
            body = &body[eol + 2..];
            if n == 0 {
                assert_eq!(body, b"\r\n", "nothing after the last chunk");
                return out;
            }
            assert!(n > 0);
            out.extend_from_slice(&body[..n]);
            assert_eq!(&body[n..n + 2], b"\r\n");
            body = &body[n + 2..];
        }
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn streamed_in_slices_with_bounded_memory() {
        let data = text(3 << 20);
        let run = serve(&data, 1, 1, "GET", 0);
        let (head, body) = split_head(&run.wire);
        assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
        assert!(head.contains("Content-Encoding: gzip\r\n"), "{head}");
        assert!(!head.contains("Content-Length"), "{head}");
        assert!(gunzip(&dechunk(body)) == data);
        assert!(run.keep_alive);
        // One slice in, its output framed out: never the file nor its
        // compressed form (whole-file compression held 3 MiB here).
        assert!(run.max_buf <= 8 * SLICE, "held {} bytes", run.max_buf);
    }

    #[test]
    fn http_1_0_ends_the_body_by_closing() {
        let data = text(100_000);
        let run = serve(&data, 2, 0, "GET", 0);
        let (head, body) = split_head(&run.wire);
        assert!(!head.contains("Transfer-Encoding"), "{head}");
        assert!(head.contains("Connection: close\r\n"), "{head}");
        assert!(!run.keep_alive);
        assert!(gunzip(body) == data);
    }

    #[test]
    fn cached_when_it_fits_then_sent_with_a_length() {
        let data = text(200_000);
        let first = serve(&data, 3, 1, "GET", 1 << 20);
        let (_, body) = split_head(&first.wire);
        let gz = dechunk(body);
        let again = serve(&data, 3, 1, "GET", 1 << 20);
        let (head, body) = split_head(&again.wire);
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", gz.len())),
            "{head}"
        );
        assert!(body == gz);
        // Too big for the cache: streamed every time.
        let small_cache = serve(&data, 4, 1, "GET", 1000);
        let again = serve(&data, 4, 1, "GET", 1000);
        // Bodies only: the heads carry a Date, which may tick between them.
        assert!(split_head(&small_cache.wire).1 == split_head(&again.wire).1);
        assert!(split_head(&again.wire).0.contains("chunked"));
    }

    #[test]
    fn head_and_empty_files() {
        let run = serve(&text(50_000), 5, 1, "HEAD", 0);
        let (head, body) = split_head(&run.wire);
        assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
        assert!(body.is_empty());
        let run = serve(b"", 6, 1, "GET", 0);
        let (_, body) = split_head(&run.wire);
        assert!(gunzip(&dechunk(body)).is_empty());
    }
}
