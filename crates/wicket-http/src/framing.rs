//! Watches the request framing of an HTTP/1 client connection for what
//! hyper accepts but a gate should refuse.
//!
//! A request with both `Content-Length` and `Transfer-Encoding` is the
//! classic request-smuggling shape. hyper reads such a request's body as
//! chunked and closes the connection afterwards (RFC 9112 §6.1 allows
//! that), but it drops the `Content-Length` before the gate sees the
//! request, so the gate could not refuse it. [`Watched`] reads the same
//! bytes hyper reads, follows the requests' heads and bodies, and notes
//! which request of the connection first carries both; the gate answers
//! that request (and any after it) 400 and closes, as nginx does.
//!
//! hyper stays the parser that counts: the watcher only ever adds a
//! refusal. Anything it cannot follow (HTTP/2, an upgrade, a malformed
//! chunk) turns it off for the rest of the connection.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use memchr::memchr;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A head or a chunk line longer than this is not followed (hyper refuses
/// heads past its own limit anyway).
const MAX_LINE: usize = 64 * 1024;

/// Where in the client's byte stream the watcher is.
#[derive(Debug)]
enum State {
    /// Reading a request head (bytes so far).
    Head(Vec<u8>),
    /// Skipping this many bytes of a `Content-Length` body.
    Body(u64),
    /// Reading a chunk-size line (bytes so far).
    ChunkLine(Vec<u8>),
    /// Skipping chunk data, then its CRLF (the count includes it).
    ChunkData(u64),
    /// Reading the trailer section after the last chunk (bytes so far).
    Trailers(Vec<u8>),
    /// Not following this connection any more.
    Off,
}

/// The framing watcher of one connection.
#[derive(Debug)]
pub struct Framing {
    state: State,
    /// Request heads read so far.
    heads: u64,
    /// The number (from 1) of the first request with both framings; 0
    /// while there is none.
    conflict: Arc<AtomicU64>,
}

impl Framing {
    /// Follows a connection from its first byte, noting a conflicting
    /// request's number in `conflict`.
    pub fn new(conflict: Arc<AtomicU64>) -> Self {
        Framing {
            state: State::Head(Vec::new()),
            heads: 0,
            conflict,
        }
    }
}

/// What a request head says about its body.
struct HeadFacts {
    content_length: Option<u64>,
    chunked: bool,
    upgrade: bool,
}

fn head_facts(head: &[u8]) -> HeadFacts {
    let mut facts = HeadFacts {
        content_length: None,
        chunked: false,
        upgrade: false,
    };
    // The first line is the request line; header lines follow.
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            // An unreadable length counts as present: hyper refuses it.
            facts.content_length = Some(n.unwrap_or(u64::MAX));
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            facts.chunked = true;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            facts.upgrade = true;
        }
    }
    facts
}

/// Where `\r\n\r\n` (or a bare `\n\n`) ends in `buf`, searching from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while let Some(p) = memchr(b'\n', &buf[i..]) {
        let at = i + p;
        if at >= 1 && buf[at - 1] == b'\n' {
            return Some(at + 1);
        }
        if at >= 3 && &buf[at - 3..at] == b"\r\n\r" {
            return Some(at + 1);
        }
        i = at + 1;
    }
    None
}

impl Framing {
    /// Follows `bytes`, the next bytes the client sent.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head(buf) => {
                    // Blank lines between requests are allowed before a head.
                    if buf.is_empty() {
                        let skip = bytes
                            .iter()
                            .position(|&b| b != b'\r' && b != b'\n')
                            .unwrap_or(bytes.len());
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            return;
                        }
                        // A whole head in this read (the usual case): read
                        // in place, not copied.
                        if let Some(end) = head_end(&bytes[..bytes.len().min(MAX_LINE + 4)], 0) {
                            self.state = self.after_head(&bytes[..end]);
                            bytes = &bytes[end..];
                            continue;
                        }
                    }
                    let from = buf.len();
                    let take = bytes.len().min(MAX_LINE + 4 - from.min(MAX_LINE));
                    buf.extend_from_slice(&bytes[..take]);
                    match head_end(buf, from) {
                        Some(end) => {
                            let used = end - from;
                            bytes = &bytes[used..];
                            let head = std::mem::take(buf);
                            self.state = self.after_head(&head[..end]);
                        }
                        None if buf.len() > MAX_LINE => self.state = State::Off,
                        None => return,
                    }
                }
                State::Body(n) => {
                    if skip(n, &mut bytes) {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkData(n) => {
                    if skip(n, &mut bytes) {
                        self.state = State::ChunkLine(Vec::new());
                    }
                }
                State::ChunkLine(buf) => match line(buf, &mut bytes) {
                    Line::Partial => return,
                    Line::TooLong => self.state = State::Off,
                    Line::Whole(text) => {
                        self.state = chunk_size(&text).map_or(State::Off, |size| match size {
                            0 => State::Trailers(Vec::new()),
                            n => State::ChunkData(n.saturating_add(2)),
                        });
                    }
                },
                State::Trailers(buf) => match line(buf, &mut bytes) {
                    Line::Partial => return,
                    Line::TooLong => self.state = State::Off,
                    // The empty line ends the trailers, and the request.
                    Line::Whole(text) if text.is_empty() || text == b"\r" => {
                        self.state = State::Head(Vec::new());
                    }
                    Line::Whole(_) => {}
                },
            }
        }
    }

    /// Counts a head read whole, and what follows it.
    fn after_head(&mut self, head: &[u8]) -> State {
        self.heads += 1;
        // HTTP/2's preface: not ours to follow.
        if head.starts_with(b"PRI * HTTP/2.0") {
            return State::Off;
        }
        let facts = head_facts(head);
        if facts.chunked && facts.content_length.is_some() {
            self.conflict.store(self.heads, Ordering::Relaxed);
            return State::Off;
        }
        if facts.upgrade {
            // What follows may be another protocol.
            return State::Off;
        }
        if facts.chunked {
            return State::ChunkLine(Vec::new());
        }
        match facts.content_length {
            Some(0) | None => State::Head(Vec::new()),
            Some(n) => State::Body(n),
        }
    }
}

/// Skips up to `n` bytes of `bytes`, counting them off; whether all were.
fn skip(n: &mut u64, bytes: &mut &[u8]) -> bool {
    let k = (*n).min(bytes.len() as u64);
    *n -= k;
    *bytes = &bytes[k as usize..];
    *n == 0
}

/// A line being read.
enum Line {
    /// No `\n` yet (what came is kept).
    Partial,
    /// The line, without its `\n`.
    Whole(Vec<u8>),
    /// Longer than [`MAX_LINE`].
    TooLong,
}

/// Reads `bytes` up to and including a `\n` onto `buf`.
fn line(buf: &mut Vec<u8>, bytes: &mut &[u8]) -> Line {
    let (part, done) = match memchr(b'\n', bytes) {
        Some(p) => (&bytes[..p], p + 1),
        None => (*bytes, bytes.len()),
    };
    buf.extend_from_slice(part);
    let whole = done > part.len();
    *bytes = &bytes[done..];
    if buf.len() > MAX_LINE {
        Line::TooLong
    } else if whole {
        Line::Whole(std::mem::take(buf))
    } else {
        Line::Partial
    }
}

/// A chunk-size line's size (extensions after `;` ignored).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let hex = std::str::from_utf8(&line[..end])
        .ok()?
        .trim_matches([' ', '\t']);
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// A client connection whose reads go through a [`Framing`] watcher.
pub struct Watched<S> {
    io: S,
    framing: Framing,
}

impl<S> Watched<S> {
    /// Watches `io` (see [`Framing::new`]).
    pub fn new(io: S, conflict: Arc<AtomicU64>) -> Self {
        Watched {
            io,
            framing: Framing::new(conflict),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let me = &mut *self;
        let r = Pin::new(&mut me.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            me.framing.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of `step`; the conflicting request's number.
    fn conflict(bytes: &[u8], step: usize) -> u64 {
        let flag = Arc::new(AtomicU64::new(0));
        let mut f = Framing::new(flag.clone());
        for piece in bytes.chunks(step) {
            f.feed(piece);
        }
        flag.load(Ordering::Relaxed)
    }

    fn every_split(bytes: &[u8]) -> u64 {
        let whole = conflict(bytes, bytes.len().max(1));
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(conflict(bytes, step), whole, "step {step}");
        }
        whole
    }

    #[test]
    fn both_framings_in_one_head_raise_the_flag_in_either_order() {
        assert_eq!(every_split(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ), 1);
        assert_eq!(every_split(
            b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 40\r\n\r\n"
        ), 1);
        // Behind a well-framed first request, after a chunked one, after
        // blank lines.
        assert_eq!(every_split(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nPOST /d HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ), 4);
    }

    #[test]
    fn bodies_that_look_like_heads_do_not() {
        // The bodies hold a conflicting head as data: not a request.
        let smuggled =
            b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut cl = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            smuggled.len()
        )
        .into_bytes();
        cl.extend_from_slice(smuggled);
        cl.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(every_split(&cl), 0);
        let mut chunked = format!(
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            smuggled.len()
        )
        .into_bytes();
        chunked.extend_from_slice(smuggled);
        chunked.extend_from_slice(b"\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(every_split(&chunked), 0);
    }

    #[test]
    fn what_it_cannot_follow_turns_it_off() {
        // HTTP/2, an upgrade, a bad chunk line: later heads are not read.
        let later = b"POST /d HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for first in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let mut bytes = first.to_vec();
            bytes.extend_from_slice(later);
            assert_eq!(every_split(&bytes), 0, "{}", String::from_utf8_lossy(first));
        }
        // A head past the limit.
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_LINE + 10));
        long.extend_from_slice(b"\r\n\r\n");
        long.extend_from_slice(later);
        assert_eq!(every_split(&long), 0);
    }

    #[test]
    fn any_bytes_in_any_pieces_never_panic() {
        let parts: [&[u8]; 12] = [
            b"GET / HTTP/1.1\r\n",
            b"Content-Length: 3\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"\r\n",
            b"\n",
            b"ffffffffffffffffff\r\n",
            b"5\r\nhello\r\n",
            b"0\r\n",
            b"Content-Length: 99999999999999999999\r\n",
            b"abc",
            b"\xff\x00:",
            b"Upgrade: x\r\n",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let mut bytes = Vec::new();
            for _ in 0..next() % 24 {
                bytes.extend_from_slice(parts[(next() % parts.len() as u64) as usize]);
            }
            let step = 1 + (next() % 40) as usize;
            let first = conflict(&bytes, step);
            assert!(first <= bytes.len() as u64);
        }
    }
}
