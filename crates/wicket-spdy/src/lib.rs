//! SPDY/3.1 framing and header blocks, as Kubernetes uses them.
//!
//! Before WebSockets (kubectl 1.30 for exec and attach, 1.31 for
//! port-forward) kubectl ran exec, attach, `cp` and port-forward over an
//! HTTP/1.1 connection upgraded to SPDY/3.1 (draft-mbelshe-httpbis-spdy-00
//! and the SPDY/3.1 revision): a multiplexed connection of numbered
//! streams, one per channel (`streamtype: error`, `stdin`, `stdout`,
//! `stderr`, `resize`; for port-forward `error` and `data` per forwarded
//! connection, with a `port` header). The client opens every stream with a
//! SYN_STREAM whose header block says what it carries; the server answers
//! each with a SYN_REPLY; bytes travel in DATA frames; FIN half-closes a
//! stream.
//!
//! This crate holds what the Kubernetes gate and the fake API server of the
//! tests share: the frame layout ([`Frame`]), and header blocks
//! ([`Inflater`], [`Deflater`]), which are zlib streams (one per direction
//! per connection) primed with the SPDY dictionary. It holds no session
//! logic: the gate relays frames as they are and only reads them.

use std::sync::OnceLock;

use bytes::{Buf, Bytes, BytesMut};

/// Control frame types (SPDY/3 section 2.6).
pub mod kind {
    /// Opens a stream; carries its header block.
    pub const SYN_STREAM: u16 = 1;
    /// Answers a SYN_STREAM.
    pub const SYN_REPLY: u16 = 2;
    /// Aborts a stream.
    pub const RST_STREAM: u16 = 3;
    /// Connection settings.
    pub const SETTINGS: u16 = 4;
    /// A ping, echoed by the peer.
    pub const PING: u16 = 6;
    /// Ends the connection.
    pub const GOAWAY: u16 = 7;
    /// More headers for a stream.
    pub const HEADERS: u16 = 8;
    /// Flow control credit (SPDY/3 and 3.1).
    pub const WINDOW_UPDATE: u16 = 9;
}

/// FLAG_FIN: the sender's last frame on the stream.
pub const FLAG_FIN: u8 = 0x01;
/// The largest frame body the 24-bit length can say.
pub const MAX_LENGTH: usize = 0x00FF_FFFF;
/// The protocol version in every control frame.
pub const VERSION: u16 = 3;
/// The largest header block accepted once decompressed.
pub const MAX_HEADER_BYTES: usize = 256 * 1024;

/// What can be wrong with SPDY input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A frame says it is longer than the reader accepts.
    #[error("a SPDY frame of {0} bytes is over the limit of {1} bytes")]
    TooLarge(usize, usize),
    /// A control frame of another SPDY version.
    #[error("SPDY version {0} is not supported (version 3 is)")]
    Version(u16),
    /// A control frame too short for its type.
    #[error("a SPDY control frame of type {0} is too short")]
    Short(u16),
    /// A header block that is not a valid name/value list.
    #[error("a SPDY header block is malformed: {0}")]
    Headers(&'static str),
    /// A header block that decompresses past [`MAX_HEADER_BYTES`].
    #[error("a SPDY header block is over {MAX_HEADER_BYTES} bytes once decompressed")]
    HeadersTooLarge,
    /// A header block that is not a piece of the connection's zlib stream.
    #[error("a SPDY header block does not decompress: {0}")]
    Zlib(String),
}

/// One frame, kept as the bytes it was on the wire so a relay forwards it
/// unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    /// Takes the next whole frame off `buf`, if it holds one. Frames longer
    /// than `max` bytes, and control frames of another version, are errors
    /// (the connection cannot go on: the stream of frames is lost).
    pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, Error> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
        if len > max {
            return Err(Error::TooLarge(len, max));
        }
        if buf[0] & 0x80 != 0 {
            let version = u16::from_be_bytes([buf[0] & 0x7f, buf[1]]);
            if version != VERSION {
                return Err(Error::Version(version));
            }
        }
        if buf.len() < 8 + len {
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        let f = Frame {
            raw: buf.split_to(8 + len).freeze(),
        };
        if let Some(k) = f.kind() {
            let need = match k {
                kind::SYN_STREAM => 10,
                kind::SYN_REPLY | kind::RST_STREAM | kind::HEADERS | kind::PING => 4,
                kind::WINDOW_UPDATE | kind::GOAWAY => 8,
                _ => 0,
            };
            if f.body().len() < need {
                return Err(Error::Short(k));
            }
        }
        Ok(Some(f))
    }

    /// A DATA frame.
    pub fn data(stream: u32, flags: u8, data: &[u8]) -> Frame {
        let mut b = BytesMut::with_capacity(8 + data.len());
        b.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        b.extend_from_slice(&[flags]);
        b.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        b.extend_from_slice(data);
        Frame { raw: b.freeze() }
    }

    /// A control frame of type `kind` with `body`.
    pub fn control(kind: u16, flags: u8, body: &[u8]) -> Frame {
        let mut b = BytesMut::with_capacity(8 + body.len());
        b.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&[flags]);
        b.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        b.extend_from_slice(body);
        Frame { raw: b.freeze() }
    }

    /// A SYN_STREAM opening `stream` with an (already compressed) header block.
    pub fn syn_stream(stream: u32, flags: u8, block: &[u8]) -> Frame {
        let mut body = Vec::with_capacity(10 + block.len());
        body.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        body.extend_from_slice(&[0; 6]);
        body.extend_from_slice(block);
        Frame::control(kind::SYN_STREAM, flags, &body)
    }

    /// A SYN_REPLY for `stream` with an (already compressed) header block.
    pub fn syn_reply(stream: u32, flags: u8, block: &[u8]) -> Frame {
        let mut body = Vec::with_capacity(4 + block.len());
        body.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        body.extend_from_slice(block);
        Frame::control(kind::SYN_REPLY, flags, &body)
    }

    /// Whether this is a control frame.
    pub fn is_control(&self) -> bool {
        self.raw[0] & 0x80 != 0
    }

    /// The control frame type; `None` for a DATA frame.
    pub fn kind(&self) -> Option<u16> {
        self.is_control()
            .then(|| u16::from_be_bytes([self.raw[2], self.raw[3]]))
    }

    /// The frame's flags.
    pub fn flags(&self) -> u8 {
        self.raw[4]
    }

    /// Whether the frame carries FLAG_FIN.
    pub fn fin(&self) -> bool {
        self.flags() & FLAG_FIN != 0
    }

    /// The stream the frame is about: a DATA frame's, or the stream id of
    /// SYN_STREAM, SYN_REPLY, RST_STREAM, HEADERS and WINDOW_UPDATE (0 for
    /// the connection's window). `None` for other control frames.
    pub fn stream(&self) -> Option<u32> {
        let id = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff;
        match self.kind() {
            None => Some(id(&self.raw)),
            Some(
                kind::SYN_STREAM
                | kind::SYN_REPLY
                | kind::RST_STREAM
                | kind::HEADERS
                | kind::WINDOW_UPDATE,
            ) => Some(id(self.body())),
            Some(_) => None,
        }
    }

    /// The frame's body (a DATA frame's data).
    pub fn body(&self) -> &[u8] {
        &self.raw[8..]
    }

    /// The body as shared bytes.
    pub fn body_bytes(&self) -> Bytes {
        self.raw.slice(8..)
    }

    /// The compressed header block of SYN_STREAM, SYN_REPLY and HEADERS.
    pub fn header_block(&self) -> Option<&[u8]> {
        match self.kind()? {
            kind::SYN_STREAM => Some(&self.body()[10..]),
            kind::SYN_REPLY | kind::HEADERS => Some(&self.body()[4..]),
            _ => None,
        }
    }

    /// The frame as it goes on the wire.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
}

/// A decoded header block: lower-case names, each with its value (several
/// values of one name are NUL-separated, as on the wire).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The value of header `name` (names are lower case in SPDY/3).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The uncompressed block: a count, then length-prefixed names and values.
    fn encode(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
        for (n, v) in pairs {
            raw.extend_from_slice(&(n.len() as u32).to_be_bytes());
            raw.extend_from_slice(n.to_ascii_lowercase().as_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
            raw.extend_from_slice(v.as_bytes());
        }
        raw
    }

    fn parse(mut raw: &[u8]) -> Result<Headers, Error> {
        fn take<'a>(raw: &mut &'a [u8]) -> Result<&'a [u8], Error> {
            if raw.len() < 4 {
                return Err(Error::Headers("a length runs past the block"));
            }
            let n = raw.get_u32() as usize;
            if raw.len() < n {
                return Err(Error::Headers("a name or value runs past the block"));
            }
            let (s, rest) = raw.split_at(n);
            *raw = rest;
            Ok(s)
        }
        if raw.len() < 4 {
            return Err(Error::Headers("no pair count"));
        }
        let count = raw.get_u32() as usize;
        // Each pair takes at least 8 bytes: a count past that is a lie.
        if count > raw.len() / 8 {
            return Err(Error::Headers("more pairs than the block can hold"));
        }
        let mut pairs = Vec::with_capacity(count);
        for _ in 0..count {
            let name = take(&mut raw)?;
            let value = take(&mut raw)?;
            if name.is_empty() {
                return Err(Error::Headers("an empty header name"));
            }
            pairs.push((
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
        }
        Ok(Headers(pairs))
    }
}

/// Reads one direction's header blocks: every block of that direction must
/// go through the same inflater, in order (they are pieces of one zlib
/// stream).
pub struct Inflater {
    z: flate2::Decompress,
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflater {
    /// An inflater for a new connection.
    pub fn new() -> Inflater {
        Inflater {
            z: flate2::Decompress::new(true),
        }
    }

    /// Decompresses and parses the next header block.
    pub fn headers(&mut self, block: &[u8]) -> Result<Headers, Error> {
        let raw = self.inflate(block)?;
        Headers::parse(&raw)
    }

    fn inflate(&mut self, block: &[u8]) -> Result<Vec<u8>, Error> {
        let start = self.z.total_in();
        let mut out = Vec::with_capacity((block.len() * 4).clamp(256, MAX_HEADER_BYTES));
        loop {
            let used = (self.z.total_in() - start) as usize;
            let (before_in, before_out) = (self.z.total_in(), self.z.total_out());
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BYTES {
                    return Err(Error::HeadersTooLarge);
                }
                out.reserve(out.len().min(MAX_HEADER_BYTES - out.len()).max(256));
            }
            match self
                .z
                .decompress_vec(&block[used..], &mut out, flate2::FlushDecompress::Sync)
            {
                _ if out.len() > MAX_HEADER_BYTES => return Err(Error::HeadersTooLarge),
                Ok(flate2::Status::StreamEnd) => break,
                Ok(_) => {
                    let done = (self.z.total_in() - start) as usize == block.len();
                    if done && out.len() < out.capacity() {
                        break;
                    }
                    if self.z.total_in() == before_in
                        && self.z.total_out() == before_out
                        && out.len() < out.capacity()
                    {
                        return Err(Error::Zlib("the block ends mid-stream".into()));
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(dictionary())
                        .map_err(|e| Error::Zlib(format!("not the SPDY/3 dictionary ({e})")))?;
                }
                Err(e) => return Err(Error::Zlib(e.to_string())),
            }
        }
        Ok(out)
    }
}

/// Writes one direction's header blocks, as one zlib stream primed with the
/// SPDY dictionary.
pub struct Deflater {
    z: flate2::Compress,
}

impl Default for Deflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Deflater {
    /// A deflater for a new connection.
    pub fn new() -> Deflater {
        let mut z = flate2::Compress::new(flate2::Compression::default(), true);
        z.set_dictionary(dictionary())
            .expect("a new zlib stream takes a dictionary");
        Deflater { z }
    }

    /// The compressed header block for `pairs`.
    pub fn block(&mut self, pairs: &[(&str, &str)]) -> Vec<u8> {
        let raw = Headers::encode(pairs);
        let start = self.z.total_in();
        let mut out = Vec::with_capacity(raw.len() + 64);
        loop {
            let used = (self.z.total_in() - start) as usize;
            if out.len() == out.capacity() {
                out.reserve(256);
            }
            self.z
                .compress_vec(&raw[used..], &mut out, flate2::FlushCompress::Sync)
                .expect("compressing into a growing buffer");
            if (self.z.total_in() - start) as usize == raw.len() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

/// Header names with a 32-bit length before each, as the dictionary lists them.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The rest of the dictionary, without length prefixes.
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
    "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch",
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// The SPDY/3 header compression dictionary (section 2.6.10.1).
pub fn dictionary() -> &'static [u8] {
    static D: OnceLock<Vec<u8>> = OnceLock::new();
    D.get_or_init(|| {
        let mut d = Vec::with_capacity(1424);
        for w in DICTIONARY_WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
        d
    })
}

#[cfg(test)]
mod tests;
