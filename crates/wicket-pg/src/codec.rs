//! PostgreSQL v3 wire framing, both directions.
//!
//! Every message but the startup ones is `tag: u8, len: i32 (self-inclusive), body`.
//! Lengths are checked before anything is allocated: a client cannot make the
//! sidecar buffer more than `max_len` bytes for one message.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version 3.0.
pub const PROTOCOL_V3: i32 = 196_608;
/// `SSLRequest` code.
pub const SSL_REQUEST: i32 = 80_877_103;
/// `GSSENCRequest` code.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// `CancelRequest` code.
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Largest startup packet accepted (PostgreSQL's own limit is 10 000).
pub const MAX_STARTUP: usize = 10_000;

/// A framing error.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer sent a length outside the allowed range.
    #[error("invalid message length {0}")]
    Length(i64),
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One framed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Type byte.
    pub tag: u8,
    /// Body, without tag and length.
    pub body: Bytes,
}

impl Message {
    /// The message as it goes on the wire.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(5 + self.body.len());
        b.put_u8(self.tag);
        b.put_i32(self.body.len() as i32 + 4);
        b.extend_from_slice(&self.body);
        b.freeze()
    }
}

async fn read_exact_or_closed<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), CodecError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(CodecError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// Reads a startup-phase packet (`len: i32, body`); returns the body.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Bytes, CodecError> {
    let mut len = [0u8; 4];
    read_exact_or_closed(r, &mut len).await?;
    let len = i32::from_be_bytes(len) as i64;
    if !(8..=MAX_STARTUP as i64).contains(&len) {
        return Err(CodecError::Length(len));
    }
    let mut body = vec![0u8; len as usize - 4];
    read_exact_or_closed(r, &mut body).await?;
    Ok(Bytes::from(body))
}

/// Reads one regular message of at most `max_len` bytes.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: usize,
) -> Result<Message, CodecError> {
    let mut head = [0u8; 5];
    read_exact_or_closed(r, &mut head).await?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as i64;
    if len < 4 || len as u64 > max_len as u64 {
        return Err(CodecError::Length(len));
    }
    let mut body = vec![0u8; len as usize - 4];
    read_exact_or_closed(r, &mut body).await?;
    Ok(Message {
        tag: head[0],
        body: Bytes::from(body),
    })
}

/// Decodes as many whole messages as `buf` holds (for fuzzing and tests).
pub fn decode_all(mut buf: &[u8], max_len: usize) -> Result<Vec<Message>, CodecError> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as i64;
        if len < 4 || len as u64 > max_len as u64 {
            return Err(CodecError::Length(len));
        }
        let total = 1 + len as usize;
        if buf.len() < total {
            break;
        }
        out.push(Message {
            tag: buf[0],
            body: Bytes::copy_from_slice(&buf[5..total]),
        });
        buf = &buf[total..];
    }
    Ok(out)
}

/// Reads a NUL-terminated string from `body` at `*pos`.
pub fn cstr(body: &[u8], pos: &mut usize) -> Option<String> {
    let rest = body.get(*pos..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    let s = String::from_utf8_lossy(&rest[..end]).into_owned();
    *pos += end + 1;
    Some(s)
}

/// Parses a StartupMessage body (after the protocol code) into parameters.
pub fn startup_params(body: &[u8]) -> Option<Vec<(String, String)>> {
    let mut pos = 4;
    let mut out = Vec::new();
    loop {
        let key = cstr(body, &mut pos)?;
        if key.is_empty() {
            return Some(out);
        }
        let value = cstr(body, &mut pos)?;
        out.push((key, value));
    }
}

/// Builders of the messages the sidecar itself sends.
pub mod build {
    use super::*;

    fn msg(tag: u8, f: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut body = BytesMut::new();
        f(&mut body);
        Message {
            tag,
            body: body.freeze(),
        }
        .encode()
    }

    fn put_cstr(b: &mut BytesMut, s: &str) {
        b.extend_from_slice(s.replace('\0', " ").as_bytes());
        b.put_u8(0);
    }

    /// `AuthenticationRequest` with a code and extra bytes.
    pub fn auth(code: i32, extra: &[u8]) -> Bytes {
        msg(b'R', |b| {
            b.put_i32(code);
            b.extend_from_slice(extra);
        })
    }

    /// `ErrorResponse` (or `NoticeResponse` with tag `N`).
    pub fn error(
        tag: u8,
        severity: &str,
        code: &str,
        message: &str,
        detail: Option<&str>,
        hint: Option<&str>,
    ) -> Bytes {
        msg(tag, |b| {
            b.put_u8(b'S');
            put_cstr(b, severity);
            b.put_u8(b'V');
            put_cstr(b, severity);
            b.put_u8(b'C');
            put_cstr(b, code);
            b.put_u8(b'M');
            put_cstr(b, message);
            if let Some(d) = detail {
                b.put_u8(b'D');
                put_cstr(b, d);
            }
            if let Some(h) = hint {
                b.put_u8(b'H');
                put_cstr(b, h);
            }
            b.put_u8(0);
        })
    }

    /// `ReadyForQuery` with a transaction status (`I`, `T`, `E`).
    pub fn ready(status: u8) -> Bytes {
        msg(b'Z', |b| b.put_u8(status))
    }

    /// `BackendKeyData`.
    pub fn backend_key(pid: i32, key: i32) -> Bytes {
        msg(b'K', |b| {
            b.put_i32(pid);
            b.put_i32(key);
        })
    }

    /// `Query`.
    pub fn query(sql: &str) -> Bytes {
        msg(b'Q', |b| put_cstr(b, sql))
    }

    /// `PasswordMessage` / SASL responses (`p`).
    pub fn password(data: &[u8]) -> Bytes {
        msg(b'p', |b| b.extend_from_slice(data))
    }

    /// `StartupMessage` (no tag).
    pub fn startup(params: &[(&str, &str)]) -> Bytes {
        let mut body = BytesMut::new();
        body.put_i32(PROTOCOL_V3);
        for (k, v) in params {
            put_cstr(&mut body, k);
            put_cstr(&mut body, v);
        }
        body.put_u8(0);
        let mut out = BytesMut::with_capacity(body.len() + 4);
        out.put_i32(body.len() as i32 + 4);
        out.extend_from_slice(&body);
        out.freeze()
    }

    /// `Terminate`.
    pub fn terminate() -> Bytes {
        msg(b'X', |_| {})
    }
}

/// Fields of an `ErrorResponse` / `NoticeResponse` body.
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < body.len() && body[pos] != 0 {
        let code = body[pos];
        pos += 1;
        match cstr(body, &mut pos) {
            Some(v) => out.push((code, v)),
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_refuses_bad_lengths_and_waits_for_whole_messages() {
        let q = build::query("SELECT 1");
        let mut two = q.to_vec();
        two.extend_from_slice(&q);
        assert_eq!(decode_all(&two, 1 << 20).unwrap().len(), 2);
        assert_eq!(decode_all(&two[..two.len() - 1], 1 << 20).unwrap().len(), 1);
        assert!(matches!(
            decode_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff], 1 << 20),
            Err(CodecError::Length(_))
        ));
        assert!(matches!(
            decode_all(&[b'Q', 0, 0, 0, 2], 1 << 20),
            Err(CodecError::Length(2))
        ));
    }

    #[tokio::test]
    async fn startup_packets_are_bounded() {
        let mut huge: &[u8] = &[0x40, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            read_startup(&mut huge).await,
            Err(CodecError::Length(_))
        ));
        let s = build::startup(&[("user", "a"), ("database", "b")]);
        let mut r: &[u8] = &s;
        let body = read_startup(&mut r).await.unwrap();
        assert_eq!(
            startup_params(&body).unwrap(),
            [
                ("user".to_string(), "a".to_string()),
                ("database".to_string(), "b".to_string())
            ]
        );
        // A message claiming 1 GiB is refused before anything is allocated.
        let mut big: &[u8] = &[b'Q', 0x40, 0, 0, 0];
        assert!(matches!(
            read_message(&mut big, 64 << 20).await,
            Err(CodecError::Length(_))
        ));
    }

    #[test]
    fn errors_round_trip() {
        let e = build::error(b'E', "ERROR", "42501", "no", Some("d"), None);
        let m = decode_all(&e, 1024).unwrap();
        let f = error_fields(&m[0].body);
        assert!(f.contains(&(b'C', "42501".into())));
        assert!(f.contains(&(b'D', "d".into())));
    }
}
