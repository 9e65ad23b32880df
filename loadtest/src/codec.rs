//! Minimal RFC 6455 frame and handshake codec shared by the client and the echo server.
//!
//! Hand-written rather than tungstenite so that the hot path does no per-message
//! allocation: frames are parsed in place and payloads are streamed.

use base64::Engine;
use sha1::{Digest, Sha1};

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest possible frame header: 2 + 8 (extended length) + 4 (mask key).
pub const MAX_HEADER: usize = 14;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    pub header_len: usize,
}

impl FrameHeader {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// The most significant bit of a 64-bit length must be zero (RFC 6455 5.2).
    LengthOverflow,
}

/// Parses a frame header; `Ok(None)` means more bytes are needed.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, HeaderError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let masked = b1 & 0x80 != 0;
    let (len, mut pos) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(HeaderError::LengthOverflow);
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0f,
        mask,
        len,
        header_len: pos,
    }))
}

/// Writes a minimal-length frame header into `out` and returns its length.
pub fn write_header(
    out: &mut [u8],
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
) -> usize {
    out[0] = if fin { 0x80 } else { 0 } | (opcode & 0x0f);
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let mut pos = if len < 126 {
        out[1] = mbit | len as u8;
        2
    } else if len <= u16::MAX as u64 {
        out[1] = mbit | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = mbit | 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    };
    if let Some(m) = mask {
        out[pos..pos + 4].copy_from_slice(&m);
        pos += 4;
    }
    pos
}

/// Builds a complete frame; used to pre-build client frames once per connection.
pub fn build_frame(fin: bool, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut hdr = [0u8; MAX_HEADER];
    let n = write_header(&mut hdr, fin, opcode, mask, payload.len() as u64);
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&hdr[..n]);
    let start = v.len();
    v.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut v[start..], m, 0);
    }
    v
}

/// XORs `buf` with the mask key; `offset` is the position of `buf[0]` within the
/// payload so that a payload can be unmasked chunk by chunk as it streams in.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    if mask == [0; 4] {
        return;
    }
    let r = offset & 3;
    let m = [
        mask[r],
        mask[(r + 1) & 3],
        mask[(r + 2) & 3],
        mask[(r + 3) & 3],
    ];
    let m64 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ m64).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the mask phase is unchanged.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// Sec-WebSocket-Accept for a given Sec-WebSocket-Key.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A Sec-WebSocket-Key from 16 bytes of nonce.
pub fn make_key(nonce: [u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

/// Whether a key is the base64 encoding of exactly 16 bytes, as RFC 6455 4.1 requires.
pub fn key_is_valid(key: &[u8]) -> bool {
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .map(|v| v.len() == 16)
            .unwrap_or(false)
}

/// Whether a comma-separated header value contains `token` (case-insensitive).
pub fn header_has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Close codes a peer may legitimately send (RFC 6455 7.4).
pub fn close_code_is_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_accept_example() {
        // The worked example from RFC 6455 section 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(key_is_valid(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!key_is_valid(b"dGhlIHNhbXBsZSBub25jZQ"));
    }

    #[test]
    fn header_roundtrip_all_length_forms() {
        for len in [0u64, 1, 125, 126, 65535, 65536, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut buf = [0u8; MAX_HEADER];
                let n = write_header(&mut buf, true, OP_BINARY, mask, len);
                let h = parse_header(&buf[..n]).unwrap().unwrap();
                assert_eq!(h.len, len);
                assert_eq!(h.mask, mask);
                assert_eq!(h.header_len, n);
                assert!(h.fin);
                assert_eq!(h.opcode, OP_BINARY);
                // Every strict prefix must ask for more bytes rather than misparse.
                for k in 0..n {
                    assert_eq!(parse_header(&buf[..k]).unwrap(), None, "len {len} k {k}");
                }
            }
        }
    }

    #[test]
    fn mask_in_chunks_equals_mask_whole() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mask = [0xde, 0xad, 0xbe, 0xef];
        let mut whole = data.clone();
        apply_mask(&mut whole, mask, 0);
        for (i, b) in whole.iter().enumerate() {
            assert_eq!(*b, data[i] ^ mask[i % 4]);
        }
        let mut chunked = data.clone();
        let mut off = 0;
        for size in [1usize, 3, 5, 8, 13, 100, 870] {
            apply_mask(&mut chunked[off..off + size], mask, off);
            off += size;
        }
        assert_eq!(off, 1000);
        assert_eq!(chunked, whole);
    }

    #[test]
    fn length_msb_rejected() {
        let mut buf = [0x82u8, 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(parse_header(&buf), Err(HeaderError::LengthOverflow));
        buf[2] = 0;
        assert!(parse_header(&buf).unwrap().is_some());
    }
}
