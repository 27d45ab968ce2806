//! WebSocket framing (RFC 6455) for gates that look inside upgraded
//! streams: Kubernetes exec/attach channels today, HTTP upgrades later.
//!
//! Only the frame layer lives here: the handshake's accept key, a frame
//! decoder that never trusts a length (bounded by `max_payload`) and an
//! encoder. Both directions are decoded, so a gate can record and mask what
//! crosses and re-encode it; frames a client sends are masked, frames a
//! server sends are not (section 5.1), and the decoder enforces both.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The GUID of RFC 6455 section 1.3.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    use base64::Engine as _;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.trim().as_bytes());
    ctx.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// Continuation of a fragmented message.
    Continuation,
    /// UTF-8 text.
    Text,
    /// Binary data.
    Binary,
    /// Close (payload: status code and reason).
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

impl Opcode {
    fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            0 => Opcode::Continuation,
            1 => Opcode::Text,
            2 => Opcode::Binary,
            8 => Opcode::Close,
            9 => Opcode::Ping,
            10 => Opcode::Pong,
            _ => return None,
        })
    }

    fn as_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0,
            Opcode::Text => 1,
            Opcode::Binary => 2,
            Opcode::Close => 8,
            Opcode::Ping => 9,
            Opcode::Pong => 10,
        }
    }

    /// Whether this is a control frame (close, ping, pong).
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// One frame, unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Final fragment of its message.
    pub fin: bool,
    /// Opcode.
    pub opcode: Opcode,
    /// Payload (already unmasked).
    pub payload: Bytes,
}

impl Frame {
    /// A final binary frame.
    pub fn binary(payload: impl Into<Bytes>) -> Frame {
        Frame {
            fin: true,
            opcode: Opcode::Binary,
            payload: payload.into(),
        }
    }

    /// A close frame with a status code and a reason (cut to fit the
    /// 125-byte limit of control frames).
    pub fn close(code: u16, reason: &str) -> Frame {
        let mut p = BytesMut::with_capacity(2 + reason.len().min(123));
        p.put_u16(code);
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        p.put_slice(&reason.as_bytes()[..end]);
        Frame {
            fin: true,
            opcode: Opcode::Close,
            payload: p.freeze(),
        }
    }
}

/// Which end sent the bytes being decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// The client: every frame must be masked.
    Client,
    /// The server: no frame may be masked.
    Server,
}

/// Why a stream of frames is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Reserved bits set (no extension was negotiated).
    #[error("reserved bits set in a WebSocket frame")]
    Reserved,
    /// An opcode RFC 6455 does not define.
    #[error("unknown WebSocket opcode {0}")]
    Opcode(u8),
    /// A client frame without a mask, or a server frame with one.
    #[error("WebSocket frame masking is wrong for its sender")]
    Masking,
    /// A control frame that is fragmented or longer than 125 bytes.
    #[error("malformed WebSocket control frame")]
    Control,
    /// A length over the limit (or a 64-bit length with its top bit set).
    #[error("WebSocket frame of {0} bytes is over the limit")]
    TooLarge(u64),
    /// A 16- or 64-bit length that a shorter form could have carried.
    #[error("WebSocket frame length is not in its shortest form")]
    Length,
}

/// Decodes the next whole frame from `buf` (consuming it), or returns
/// `Ok(None)` when more bytes are needed. Never reads past `buf` and never
/// allocates more than the frame's (bounded) payload.
pub fn decode(
    buf: &mut BytesMut,
    from: Sender,
    max_payload: usize,
) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let opcode = Opcode::from_u8(b0 & 0x0f).ok_or(FrameError::Opcode(b0 & 0x0f))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    if masked != (from == Sender::Client) {
        return Err(FrameError::Masking);
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let n = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
            if n < 126 {
                return Err(FrameError::Length);
            }
            (n, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 {
                return Err(FrameError::TooLarge(n));
            }
            if n <= 0xffff {
                return Err(FrameError::Length);
            }
            (n, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(FrameError::Control);
    }
    if len > max_payload as u64 {
        return Err(FrameError::TooLarge(len));
    }
    let len = len as usize;
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < at + len {
        buf.reserve(at + len - buf.len());
        return Ok(None);
    }
    buf.advance(at);
    let mut payload = buf.split_to(len);
    if let Some(m) = mask {
        apply_mask(&mut payload, m);
    }
    Ok(Some(Frame {
        fin,
        opcode,
        payload: payload.freeze(),
    }))
}

/// XORs `data` with the 4-byte masking key (section 5.3).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Appends `frame` to `out`, masked with `mask` when the sender is a client.
pub fn encode(frame: &Frame, mask: Option<[u8; 4]>, out: &mut BytesMut) {
    out.reserve(frame.payload.len() + 14);
    put_header(frame, frame.payload.len(), mask.is_some(), out);
    match mask {
        Some(k) => {
            out.put_slice(&k);
            let start = out.len();
            out.put_slice(&frame.payload);
            apply_mask(&mut out[start..], k);
        }
        None => out.put_slice(&frame.payload),
    }
}

/// Appends the header of an unmasked `frame` (a server's) whose payload
/// on the wire is `len` bytes long, for a writer that sends the payload
/// from where it is (a vectored write) instead of copying it behind the
/// header as [`encode`] does; `len` may count bytes sent between the two
/// that `frame.payload` does not hold (a channel byte).
pub fn encode_header(frame: &Frame, len: usize, out: &mut BytesMut) {
    put_header(frame, len, false, out);
}

/// The first two bytes and the extended length of a header for `frame`
/// with a payload of `len` bytes.
fn put_header(frame: &Frame, len: usize, masked: bool, out: &mut BytesMut) {
    out.put_u8(if frame.fin { 0x80 } else { 0 } | frame.opcode.as_u8());
    let m = if masked { 0x80 } else { 0 };
    if len < 126 {
        out.put_u8(m | len as u8);
    } else if len <= 0xffff {
        out.put_u8(m | 126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(m | 127);
        out.put_u64(len as u64);
    }
}

/// A fresh masking key for a client frame.
pub fn new_mask() -> [u8; 4] {
    let mut k = [0u8; 4];
    // A masking key needs unpredictability, not secrecy; a failure of the
    // system generator leaves the zero key, which is still valid framing.
    let _ = aws_lc_rs::rand::fill(&mut k);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_round_trip_in_every_length_form() {
        for len in [0usize, 5, 125, 126, 65535, 65536, 200_000] {
            let f = Frame::binary(vec![7u8; len]);
            for (mask, from) in [(Some([1, 2, 3, 4]), Sender::Client), (None, Sender::Server)] {
                let mut buf = BytesMut::new();
                encode(&f, mask, &mut buf);
                encode(&Frame::close(1000, "bye"), mask, &mut buf);
                let got = decode(&mut buf, from, 1 << 20).unwrap().unwrap();
                assert_eq!(got, f);
                let close = decode(&mut buf, from, 1 << 20).unwrap().unwrap();
                assert_eq!(close.opcode, Opcode::Close);
                assert_eq!(&close.payload[2..], b"bye");
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn partial_input_waits_for_more() {
        let mut whole = BytesMut::new();
        encode(
            &Frame::binary(&b"\x01hello"[..]),
            Some([9, 8, 7, 6]),
            &mut whole,
        );
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut part, Sender::Client, 100).unwrap(), None);
            assert_eq!(part.len(), cut, "nothing consumed before a frame is whole");
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let d = |b: &[u8], from| decode(&mut BytesMut::from(b), from, 1000);
        assert_eq!(
            d(&[0x82, 0x01, 0], Sender::Client),
            Err(FrameError::Masking)
        );
        assert_eq!(
            d(&[0x82, 0x81, 0, 0, 0, 0, 0], Sender::Server),
            Err(FrameError::Masking)
        );
        assert_eq!(d(&[0xc2, 0x00], Sender::Server), Err(FrameError::Reserved));
        assert_eq!(d(&[0x83, 0x00], Sender::Server), Err(FrameError::Opcode(3)));
        assert_eq!(d(&[0x09, 0x00], Sender::Server), Err(FrameError::Control));
        assert_eq!(
            d(&[0x82, 126, 0, 5], Sender::Server),
            Err(FrameError::Length)
        );
        assert_eq!(
            d(&[0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0], Sender::Server),
            Err(FrameError::TooLarge(1 << 63))
        );
        assert_eq!(
            d(&[0x82, 127, 0, 0, 0, 1, 0, 0, 0, 0], Sender::Server),
            Err(FrameError::TooLarge(1 << 32))
        );
    }
}
