//! Compressing a proxied answer as it streams (a route's `gzip = true`).
//!
//! The backend's body is found with the same framing rules as everywhere
//! (`body.rs`: a length, or chunked de-framed to its content, or until the
//! backend closes), each piece is compressed as it arrives and sent on as a
//! chunk (HTTP/1.1) or as it is (HTTP/1.0, ended by the close). Nothing
//! waits for the whole answer: what one recv brought (at most a buffer) is
//! compressed in that event, and the relay's usual backpressure stops
//! reading the backend while the client is slow. Level 1 (nginx's
//! `gzip_comp_level` default), so one buffer costs well under a
//! millisecond of shard time.

use std::io::Write as _;

use super::body::BodyTracker;
use crate::http::Framing;

pub(super) struct GzipRelay {
    enc: flate2::write::GzEncoder<Vec<u8>>,
    /// Where the backend's body ends; `None`: when the backend closes.
    body: Option<BodyTracker>,
    chunked: bool,
    /// The body ended and the trailer went out.
    pub(super) done: bool,
}

impl std::fmt::Debug for GzipRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GzipRelay")
            .field("chunked", &self.chunked)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl GzipRelay {
    pub(super) fn new(framing: Framing, chunked: bool) -> GzipRelay {
        GzipRelay {
            enc: flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1)),
            body: match framing {
                Framing::Length(n) => Some(BodyTracker::length(n)),
                Framing::Chunked => Some(BodyTracker::chunked()),
                Framing::UntilClose => None,
            },
            chunked,
            done: false,
        }
    }

    /// Bytes from the backend → bytes for the client. Bytes after the body
    /// are ignored; a malformed chunked body is an error.
    pub(super) fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>, &'static str> {
        if self.done {
            return Ok(Vec::new());
        }
        let enc = &mut self.enc;
        match &mut self.body {
            Some(t) => {
                t.feed_with(data, &mut |content| {
                    enc.write_all(content).expect("gzip into memory")
                })?;
            }
            None => enc.write_all(data).expect("gzip into memory"),
        }
        let end = self.body.as_ref().is_some_and(BodyTracker::done);
        Ok(if end { self.finish() } else { self.take() })
    }

    /// The body ended (or the backend closed): the rest of the compressed
    /// stream, its trailer, and the last chunk.
    pub(super) fn finish(&mut self) -> Vec<u8> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        self.enc.try_finish().expect("gzip into memory");
        let mut out = self.take();
        if self.chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        out
    }

    fn take(&mut self) -> Vec<u8> {
        let data = std::mem::take(self.enc.get_mut());
        if !self.chunked || data.is_empty() {
            return data;
        }
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(&data);
        out.extend_from_slice(b"\r\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn dechunk(mut data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let line = data.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&data[..line]).unwrap(), 16).unwrap();
            data = &data[line + 2..];
            if n == 0 {
                assert_eq!(data, b"\r\n");
                return out;
            }
            out.extend_from_slice(&data[..n]);
            assert_eq!(&data[n..n + 2], b"\r\n");
            data = &data[n + 2..];
        }
    }

    #[test]
    fn a_chunked_body_in_pieces_compresses_to_its_content() {
        let content: Vec<u8> = (0..50_000).map(|i| b"{\"k\":1}"[i % 7]).collect();
        let mut wire = Vec::new();
        for c in content.chunks(3000) {
            wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\nGARBAGE");
        let mut g = GzipRelay::new(Framing::Chunked, true);
        let mut out = Vec::new();
        for piece in wire.chunks(777) {
            out.extend(g.feed(piece).unwrap());
        }
        assert!(g.done);
        assert_eq!(gunzip(&dechunk(&out)), content);
    }

    #[test]
    fn a_length_body_and_a_close_delimited_one() {
        let content = vec![b'a'; 10_000];
        let mut g = GzipRelay::new(Framing::Length(10_000), false);
        let mut out = g.feed(&content[..4000]).unwrap();
        out.extend(g.feed(&[&content[4000..], b"extra"].concat()).unwrap());
        assert!(g.done);
        assert_eq!(gunzip(&out), content);

        let mut g = GzipRelay::new(Framing::UntilClose, true);
        let mut out = g.feed(&content).unwrap();
        assert!(!g.done);
        out.extend(g.finish());
        assert_eq!(gunzip(&dechunk(&out)), content);
    }
}
