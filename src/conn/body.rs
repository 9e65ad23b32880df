//! Where a request body ends (RFC 9112 §6.3, §7.1), so that nothing behind
//! it reaches the backend connection.
//!
//! ringlb relays a request body as the client sent it, chunked framing
//! included, but it must know where the body ends: bytes after that are the
//! client's next request (pipelined) or an attempt to smuggle one, and are
//! never written to the backend connection that carries this request.
//!
//! The chunked decoder is a byte-at-a-time state machine over the framing
//! only; chunk data is skipped in bulk. It accepts exactly RFC 9112's
//! grammar with CRLF line ends (a bare LF is a known desync vector) and
//! bounds every line it has to scan.
//!
//! ```text
//! Size ─hex─► Size ─;/SP─► Ext ─CR─► SizeLf ─LF─► Data(n) ─► DataCr ─► DataLf ─► Size
//!                 └──────────CR────────┘     n = 0 ─► LineStart ─CR─► EndLf ─LF─► Done
//!                                                         └─other─► Trailer ─CR─► TrailerLf ─┘
//! ```

/// Longest chunk-size line (size and extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;
/// All trailer lines together.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyTracker {
    /// `n` body bytes still to come.
    Length(u64),
    Chunked(Chunked),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: State,
    /// Hex digits seen in the current size, or bytes in the current line.
    line: usize,
    trailers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size(u64),
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk, at the start of a trailer line or the final CRLF.
    LineStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl BodyTracker {
    pub fn length(n: u64) -> BodyTracker {
        BodyTracker::Length(n)
    }

    pub fn chunked() -> BodyTracker {
        BodyTracker::Chunked(Chunked {
            state: State::Size(0),
            line: 0,
            trailers: 0,
        })
    }

    pub fn done(&self) -> bool {
        match self {
            BodyTracker::Length(n) => *n == 0,
            BodyTracker::Chunked(c) => c.state == State::Done,
        }
    }

    /// Consumes the front of `data`; returns how many of its bytes belong to
    /// the body (the rest, if any, comes after the body's end), or why the
    /// framing is invalid.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        self.feed_with(data, &mut |_| {})
    }

    /// [`BodyTracker::feed`], handing the body's content (chunk data, not
    /// the chunked framing) to `content` as it goes by.
    pub fn feed_with(
        &mut self,
        data: &[u8],
        content: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, &'static str> {
        match self {
            BodyTracker::Length(n) => {
                let take = (*n).min(data.len() as u64);
                *n -= take;
                content(&data[..take as usize]);
                Ok(take as usize)
            }
            BodyTracker::Chunked(c) => c.feed(data, content),
        }
    }
}

impl Chunked {
    fn feed(&mut self, data: &[u8], content: &mut dyn FnMut(&[u8])) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < data.len() {
            if let State::Data(left) = self.state {
                let take = left.min((data.len() - i) as u64);
                content(&data[i..i + take as usize]);
                i += take as usize;
                self.state = if left == take {
                    State::DataCr
                } else {
                    State::Data(left - take)
                };
                continue;
            }
            let b = data[i];
            self.state = self.step(b)?;
            i += 1;
            if self.state == State::Done {
                break;
            }
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<State, &'static str> {
        Ok(match self.state {
            State::Size(v) => match (b as char).to_digit(16) {
                Some(d) => {
                    self.line += 1;
                    if self.line > 16 {
                        return Err("chunk size too large");
                    }
                    State::Size(v << 4 | u64::from(d))
                }
                None if self.line == 0 => return Err("invalid chunk size"),
                None if b == b'\r' => State::SizeLf(v),
                None if b == b';' || b == b' ' || b == b'\t' => State::Ext(v),
                None => return Err("invalid chunk size"),
            },
            State::Ext(v) => {
                self.line += 1;
                if self.line > MAX_LINE {
                    return Err("chunk extension too long");
                }
                match b {
                    b'\r' => State::SizeLf(v),
                    b'\t' => State::Ext(v),
                    0..=0x1f | 0x7f => return Err("invalid chunk extension"),
                    _ => State::Ext(v),
                }
            }
            State::SizeLf(v) => {
                if b != b'\n' {
                    return Err("chunk size line not ended by CRLF");
                }
                self.line = 0;
                if v == 0 {
                    State::LineStart
                } else {
                    State::Data(v)
                }
            }
            State::Data(_) => unreachable!("data is consumed in bulk"),
            State::DataCr if b == b'\r' => State::DataLf,
            State::DataLf if b == b'\n' => State::Size(0),
            State::DataCr | State::DataLf => return Err("chunk data not followed by CRLF"),
            State::LineStart if b == b'\r' => State::EndLf,
            State::LineStart | State::Trailer => {
                self.line += 1;
                self.trailers += 1;
                if self.line > MAX_LINE || self.trailers > MAX_TRAILERS {
                    return Err("trailer section too large");
                }
                match b {
                    b'\r' => State::TrailerLf,
                    b'\n' => return Err("bare LF in trailer section"),
                    _ => State::Trailer,
                }
            }
            State::TrailerLf if b == b'\n' => {
                self.line = 0;
                State::LineStart
            }
            State::TrailerLf => return Err("trailer line not ended by CRLF"),
            State::EndLf if b == b'\n' => State::Done,
            State::EndLf => return Err("chunked body not ended by CRLF"),
            State::Done => State::Done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn whole(body: &[u8]) -> Result<usize, &'static str> {
        let mut t = BodyTracker::chunked();
        let n = t.feed(body)?;
        assert!(t.done(), "not done after {n} bytes");
        Ok(n)
    }

    #[test]
    fn length_counts_down() {
        let mut t = BodyTracker::length(5);
        assert_eq!(t.feed(b"he"), Ok(2));
        assert!(!t.done());
        assert_eq!(t.feed(b"lloGET /"), Ok(3));
        assert!(t.done());
        assert_eq!(t.feed(b"more"), Ok(0));
    }

    #[test]
    fn chunked_ends_exactly_after_the_last_crlf() {
        let body = b"5\r\nhello\r\nA;x=\"y z\"\r\n0123456789\r\n0\r\n\r\n";
        let mut with_tail = body.to_vec();
        with_tail.extend_from_slice(b"GET /admin HTTP/1.1\r\n\r\n");
        assert_eq!(whole(&with_tail), Ok(body.len()));
        let trailers = b"3\r\nabc\r\n000\r\nX-A: 1\r\nX-B: 2\r\n\r\nXX";
        assert_eq!(whole(trailers), Ok(trailers.len() - 2));
    }

    #[test]
    fn chunked_bad_shapes() {
        for bad in [
            &b"\r\n"[..],
            b"zz\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"-5\r\n",
            b"+5\r\n",
            b"0x5\r\n",
            b"11111111111111111\r\n",
            b"0\r\nX: a\nY: b\r\n\r\n",
            b"0\r\n\rX",
            b"5;\x01\r\n",
        ] {
            let mut t = BodyTracker::chunked();
            assert!(
                t.feed(bad).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        /// Cut anywhere, fed piece by piece, the body ends at the same byte.
        #[test]
        fn split_anywhere(sizes in proptest::collection::vec(0usize..300, 0..6), cut in any::<proptest::sample::Index>()) {
            let mut body = Vec::new();
            for s in &sizes {
                if *s == 0 { continue; }
                body.extend_from_slice(format!("{s:x}\r\n").as_bytes());
                body.extend(std::iter::repeat_n(b'a', *s));
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let len = body.len();
            body.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            let at = cut.index(body.len());
            let mut t = BodyTracker::chunked();
            let a = t.feed(&body[..at]).unwrap();
            let b = if t.done() { 0 } else { t.feed(&body[at..]).unwrap() };
            prop_assert!(t.done());
            prop_assert_eq!(a + b, len);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut t = BodyTracker::chunked();
            let _ = t.feed(&bytes);
        }
    }
}
