//! Where WebSocket frames begin and end in one direction of a session.
//!
//! ringlb relays frames untouched; this only reads headers (2 to 14 bytes)
//! and skips payloads arithmetically, so it costs a few nanoseconds per frame
//! whatever the payload size. It is what lets a clean close inject a
//! Close frame between two messages instead of cutting one in half.
//!
//! Two kinds of boundary:
//! - a **frame boundary**: nothing of a next frame seen yet;
//! - a **message boundary**: a frame boundary outside a fragmented message.
//!   A data frame without FIN opens a message that only a continuation
//!   frame with FIN ends; control frames (opcodes 8 to 15, always
//!   unfragmented) may come between its fragments and do not end it, so
//!   the boundary after such a ping is a frame boundary only.
//!
//! ```text
//!            data frame, FIN             data frame, no FIN
//!  Between ─────────────────► Between ────────────────────► InMessage
//!  messages ◄── continuation with FIN ───────────────────── (pings, pongs
//!                                                            stay inside)
//! ```

/// State of one direction, fed every relayed byte in order.
#[derive(Debug, Clone, Default)]
pub struct FrameTracker {
    /// Header bytes seen of the frame being read (0: at a boundary).
    have: u8,
    /// Inside a fragmented message: a data frame without FIN was seen and
    /// the continuation with FIN was not (yet).
    fragmented: bool,
    header: [u8; 14],
    /// Payload bytes still to skip.
    left: u64,
}

impl FrameTracker {
    /// True between two frames (nothing of a next frame seen yet).
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    /// True between two messages: at a frame boundary and not inside a
    /// fragmented message.
    pub fn at_message_boundary(&self) -> bool {
        self.at_boundary() && !self.fragmented
    }

    /// Feeds `data` only up to the first boundary (a message boundary if
    /// `message`, else any frame boundary) and returns how many bytes that
    /// took: `Some(0)` if the tracker is at one already, `None` if `data`
    /// holds none (then all of it was fed).
    pub fn feed_to_boundary(&mut self, data: &[u8], message: bool) -> Option<usize> {
        let at = |t: &FrameTracker| {
            if message {
                t.at_message_boundary()
            } else {
                t.at_boundary()
            }
        };
        let mut pos = 0;
        loop {
            if at(self) {
                return Some(pos);
            }
            if pos == data.len() {
                return None;
            }
            // One step: the rest of a payload, or one header byte.
            let step = if self.left > 0 {
                self.left.min((data.len() - pos) as u64) as usize
            } else {
                1
            };
            self.feed(&data[pos..pos + step]);
            pos += step;
        }
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
    /// `fragmented`: inside a fragmented message.
    pub fn to_parts(&self) -> (Vec<u8>, u64, bool) {
        (
            self.header[..self.have as usize].to_vec(),
            self.left,
            self.fragmented,
        )
    }

    /// The inverse of [`FrameTracker::to_parts`]; `None` for a state the
    /// tracker can never be in.
    pub fn from_parts(header: &[u8], left: u64, fragmented: bool) -> Option<FrameTracker> {
        let mut t = FrameTracker {
            left,
            fragmented,
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
                let (fin, opcode) = (self.header[0] & 0x80 != 0, self.header[0] & 0x0f);
                // Control frames (8..=15) may sit between the fragments of
                // a message and never change whether one is open.
                if opcode < 8 {
                    self.fragmented = !fin;
                }
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

/// The status ringlb closes a session with: 1012 (Service Restart) tells a
/// client to reconnect (it lands on another backend or instance); 1001
/// (Going Away) tells a backend that this end is leaving.
pub const CLOSE_SERVICE_RESTART: u16 = 1012;
pub const CLOSE_GOING_AWAY: u16 = 1001;

fn reason(code: u16) -> &'static [u8] {
    match code {
        CLOSE_SERVICE_RESTART => b"ringlb: reconnect",
        _ => b"ringlb: going away",
    }
}

/// A Close frame with `code` and a short reason as a server sends it
/// (unmasked, no RSV bit: control frames are never compressed, so this is
/// valid on a permessage-deflate session too), for the client.
pub fn close_to_client(code: u16) -> Vec<u8> {
    let reason = reason(code);
    let mut f = vec![0x88, 2 + reason.len() as u8];
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(reason);
    f
}

/// The same Close frame as a client must send it (masked), for the backend.
pub fn close_to_backend(code: u16) -> Vec<u8> {
    // Any mask key is valid; a fixed one is fine for a frame ringlb writes.
    let key = [0x5a, 0x17, 0xc3, 0x81];
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason(code));
    let mut f = vec![0x88, 0x80 | payload.len() as u8];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert_eq, proptest};

    fn frame(len: usize, masked: bool) -> Vec<u8> {
        frame_op(0x82, len, masked)
    }

    /// A frame with first byte `b0` (FIN bit and opcode).
    fn frame_op(b0: u8, len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![b0];
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
        for f in [
            close_to_client(CLOSE_SERVICE_RESTART),
            close_to_backend(CLOSE_GOING_AWAY),
        ] {
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

    /// One message as frames: `parts` fragments (the first a text or
    /// binary frame, then continuations, FIN on the last), with a ping or
    /// pong after each fragment but the last when `pings`.
    fn message(lens: &[usize], pings: bool, masked: bool) -> Vec<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            let last = i + 1 == lens.len();
            let op = if i == 0 { 0x1 } else { 0x0 };
            out.push((
                frame_op(op | if last { 0x80 } else { 0 }, *len, masked),
                last,
            ));
            if pings && !last {
                out.push((frame_op(0x89 + (i % 2) as u8, 4, masked), false));
            }
        }
        out
    }

    #[test]
    fn control_frames_inside_a_fragmented_message_are_no_message_boundary() {
        let frames = message(&[10, 300, 5], true, true);
        let mut t = FrameTracker::default();
        assert!(t.at_message_boundary());
        for (f, ends_message) in &frames {
            t.feed(f);
            assert!(t.at_boundary());
            assert_eq!(t.at_message_boundary(), *ends_message);
        }
        // A ping between two whole messages is a message boundary after it.
        t.feed(&frame_op(0x89, 0, false));
        assert!(t.at_message_boundary());
        // The state survives the export record's parts.
        t.feed(&frames[0].0);
        let (h, left, frag) = t.to_parts();
        let back = FrameTracker::from_parts(&h, left, frag).unwrap();
        assert!(back.at_boundary() && !back.at_message_boundary());
    }

    #[test]
    fn feed_to_boundary_stops_at_the_first() {
        let mut stream = Vec::new();
        for (f, _) in message(&[3, 4], true, false) {
            stream.extend(f);
        }
        let whole = stream.len();
        stream.extend(frame(2, false));
        let mut t = FrameTracker::default();
        t.feed(&stream[..1]);
        // Frame boundaries come first; the message ends after its last fragment.
        let mut m = t.clone();
        assert_eq!(t.feed_to_boundary(&stream[1..], false), Some(5 - 1));
        assert_eq!(m.feed_to_boundary(&stream[1..], true), Some(whole - 1));
        assert!(m.at_message_boundary());
        let mut n = FrameTracker::default();
        n.feed(&stream[..1]);
        assert_eq!(n.feed_to_boundary(&stream[1..3], true), None);
        assert!(!n.at_boundary());
        assert_eq!(
            FrameTracker::default().feed_to_boundary(&stream, true),
            Some(0)
        );
    }

    proptest! {
        /// Any split of a stream of messages (fragmented or not, pings
        /// between fragments) gives the same frame and message boundaries,
        /// and `feed_to_boundary` finds the next one from anywhere.
        #[test]
        fn message_boundaries_do_not_depend_on_splits(
            msgs in proptest::collection::vec((proptest::collection::vec(0usize..3000, 1..4), proptest::bool::ANY), 1..6),
            chunk in 1usize..700,
            masked in proptest::bool::ANY,
        ) {
            let mut stream = Vec::new();
            let mut frame_ends = vec![0usize];
            let mut message_ends = vec![0usize];
            for (lens, pings) in &msgs {
                for (f, ends_message) in message(lens, *pings, masked) {
                    stream.extend(f);
                    frame_ends.push(stream.len());
                    if ends_message {
                        message_ends.push(stream.len());
                    }
                }
            }
            let mut t = FrameTracker::default();
            let mut pos = 0;
            for c in stream.chunks(chunk) {
                t.feed(c);
                pos += c.len();
                prop_assert_eq!(t.at_boundary(), frame_ends.contains(&pos));
                prop_assert_eq!(t.at_message_boundary(), message_ends.contains(&pos));
                // From here, the next message boundary is where the list says.
                let mut probe = t.clone();
                let next = message_ends.iter().find(|e| **e >= pos).map(|e| e - pos);
                prop_assert_eq!(probe.feed_to_boundary(&stream[pos..], true), next);
                let mut probe = t.clone();
                let next = frame_ends.iter().find(|e| **e >= pos).map(|e| e - pos);
                prop_assert_eq!(probe.feed_to_boundary(&stream[pos..], false), next);
            }
        }
    }
}
