//! Where WebSocket frames begin and end in one direction of a session.
//!
//! ringlb relays frames untouched; this only reads headers (2 to 14 bytes)
//! and skips payloads arithmetically, so it costs a few nanoseconds per frame
//! whatever the payload size. It is what lets a shutdown inject a Close
//! frame between two frames instead of cutting one in half.

/// State of one direction, fed every relayed byte in order.
#[derive(Debug, Clone, Default)]
pub struct FrameTracker {
    /// Header bytes seen of the frame being read (0: at a boundary).
    have: u8,
    header: [u8; 14],
    /// Payload bytes still to skip.
    left: u64,
}

impl FrameTracker {
    /// True between two frames (nothing of a next frame seen yet).
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    /// Payload bytes of the current frame still to come, when its header
    /// is complete (0 between frames or inside a header).
    pub fn payload_left(&self) -> u64 {
        if self.have == 0 {
            self.left
        } else {
            0
        }
    }

    /// How many bytes to read to complete the next header without reading
    /// past it: 2 at a boundary, then what the first two bytes announce.
    pub fn header_wanted(&self) -> usize {
        match self.header_len() {
            None => 2 - self.have as usize,
            Some(n) => n - self.have as usize,
        }
    }

    /// The state as plain data: the header bytes of a frame not yet
    /// complete, and the payload bytes of the current frame still to come.
    pub fn to_parts(&self) -> (Vec<u8>, u64) {
        (self.header[..self.have as usize].to_vec(), self.left)
    }

    /// The inverse of [`FrameTracker::to_parts`]; `None` for a state the
    /// tracker can never be in.
    pub fn from_parts(header: &[u8], left: u64) -> Option<FrameTracker> {
        let mut t = FrameTracker {
            left,
            ..FrameTracker::default()
        };
        if header.len() >= t.header.len() || (!header.is_empty() && left > 0) {
            return None;
        }
        t.header[..header.len()].copy_from_slice(header);
        t.have = header.len() as u8;
        if t.header_len().is_some_and(|n| n <= t.have as usize) {
            return None;
        }
        Some(t)
    }

    /// `n` payload bytes went by without being seen (spliced); at most
    /// [`FrameTracker::payload_left`].
    pub fn skip(&mut self, n: u64) {
        debug_assert!(self.have == 0 && n <= self.left, "skip past a frame");
        self.left -= n.min(self.left);
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let skip = (self.left).min(data.len() as u64);
                self.left -= skip;
                data = &data[skip as usize..];
                continue;
            }
            self.header[self.have as usize] = data[0];
            self.have += 1;
            data = &data[1..];
            if let Some(len) = self.header_len().filter(|n| *n == self.have as usize) {
                self.left = self.payload_len(len);
                self.have = 0;
            }
        }
    }

    /// Total header length once the first two bytes are known.
    fn header_len(&self) -> Option<usize> {
        if self.have < 2 {
            return None;
        }
        let b1 = self.header[1];
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
        Some(2 + ext + mask)
    }

    fn payload_len(&self, header_len: usize) -> u64 {
        match self.header[1] & 0x7f {
            126 => u16::from_be_bytes([self.header[2], self.header[3]]) as u64,
            127 => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
            n => {
                debug_assert!(header_len <= 6);
                n as u64
            }
        }
    }
}

/// A Close frame with status 1001 ("going away"), as a server sends it
/// (unmasked), for the client.
pub fn close_going_away_to_client() -> Vec<u8> {
    let mut f = vec![0x88, 2 + REASON.len() as u8];
    f.extend_from_slice(&1001u16.to_be_bytes());
    f.extend_from_slice(REASON);
    f
}

/// The same Close frame as a client must send it (masked), for the backend.
pub fn close_going_away_to_backend() -> Vec<u8> {
    // Any mask key is valid; a fixed one is fine for a frame ringlb writes.
    let key = [0x5a, 0x17, 0xc3, 0x81];
    let mut payload = 1001u16.to_be_bytes().to_vec();
    payload.extend_from_slice(REASON);
    let mut f = vec![0x88, 0x80 | payload.len() as u8];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

const REASON: &[u8] = b"ringlb shutting down";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert_eq, proptest};

    fn frame(len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let m = if masked { 0x80 } else { 0 };
        match len {
            n if n < 126 => f.push(m | n as u8),
            n if n < 65536 => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(7u8, len));
        f
    }

    #[test]
    fn boundaries_for_every_length_class() {
        for (len, masked) in [
            (0, false),
            (125, true),
            (126, false),
            (65535, true),
            (65536, false),
            (70000, true),
        ] {
            let f = frame(len, masked);
            let mut t = FrameTracker::default();
            t.feed(&f[..f.len() - 1]);
            assert!(!t.at_boundary() || f.len() == 1, "{len}");
            t.feed(&f[f.len() - 1..]);
            assert!(t.at_boundary(), "{len}");
        }
    }

    #[test]
    fn close_frames_parse_as_one_frame() {
        for f in [close_going_away_to_client(), close_going_away_to_backend()] {
            let mut t = FrameTracker::default();
            t.feed(&f[..3]);
            assert!(!t.at_boundary());
            t.feed(&f[3..]);
            assert!(t.at_boundary());
        }
    }

    proptest! {
        #[test]
        fn split_points_do_not_matter(lens in proptest::collection::vec(0usize..70_000, 1..6), cut in 0usize..200_000, chunk in 1usize..5000) {
            let stream: Vec<u8> = lens.iter().enumerate().flat_map(|(i, l)| frame(*l, i % 2 == 0)).collect();
            let cut = cut % (stream.len() + 1);
            // Feed the prefix in arbitrary chunks, then ask.
            let mut t = FrameTracker::default();
            for c in stream[..cut].chunks(chunk) {
                t.feed(c);
            }
            let mut ends = Vec::new();
            let mut pos = 0;
            for (i, l) in lens.iter().enumerate() {
                pos += frame(*l, i % 2 == 0).len();
                ends.push(pos);
            }
            prop_assert_eq!(t.at_boundary(), cut == 0 || ends.contains(&cut));
        }
    }
}
