//! The SFTP subsystem (draft-ietf-secsh-filexfer-02, version 3 as OpenSSH
//! speaks it), followed packet by packet in both directions, so every file
//! operation is decided and audited with its paths and byte counts.
//!
//! Requests that change or open something (open, remove, rename, mkdir,
//! rmdir, setstat, symlink, hard links) are decided by policy as commands of
//! kind `sftp` with the operation as verb and the paths as objects; a
//! refused request is answered by the gate with `SSH_FX_PERMISSION_DENIED`
//! and the rule's message, and never reaches the server. Reads and writes
//! are counted per handle and reported when the handle is closed.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The largest packet accepted (OpenSSH's own limit is 256 KiB).
pub const MAX_PACKET: usize = 1024 * 1024;

const INIT: u8 = 1;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const WRITE: u8 = 6;
const SETSTAT: u8 = 9;
const OPENDIR: u8 = 11;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const RMDIR: u8 = 15;
const RENAME: u8 = 18;
const SYMLINK: u8 = 20;
const EXTENDED: u8 = 200;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;

const FXF_WRITE: u32 = 0x02;
const FXF_APPEND: u32 = 0x04;
const FXF_CREAT: u32 = 0x08;
const FXF_TRUNC: u32 = 0x10;

/// Splits a byte stream into SFTP packets (each with its length prefix).
#[derive(Debug, Default)]
pub struct Framer {
    buf: BytesMut,
}

impl Framer {
    /// Adds bytes and returns the complete packets, or an error for a packet
    /// over [`MAX_PACKET`].
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Bytes>, String> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            if self.buf.len() < 4 {
                break;
            }
            let len =
                u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            if len == 0 || len > MAX_PACKET {
                return Err(format!(
                    "SFTP packet of {len} bytes (at most {MAX_PACKET} are accepted)"
                ));
            }
            if self.buf.len() < 4 + len {
                break;
            }
            out.push(self.buf.split_to(4 + len).freeze());
        }
        Ok(out)
    }
}

/// A file operation to decide and audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Request id (to answer a refusal).
    pub id: u32,
    /// `open`, `opendir`, `remove`, `rename`, `mkdir`, `rmdir`, `setstat`,
    /// `symlink`, `hardlink`.
    pub verb: &'static str,
    /// Paths, as the client sent them.
    pub paths: Vec<String>,
    /// Whether it writes (for `open`: write, create, truncate or append).
    pub writes: bool,
}

/// A handle that was closed, with what went through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The audit id of the open that made the handle.
    pub command_id: String,
    /// The path opened.
    pub path: String,
    /// Bytes read through it.
    pub read: u64,
    /// Bytes written through it.
    pub written: u64,
}

#[derive(Debug)]
enum Pending {
    Open { path: String, command_id: String },
    Read { handle: Bytes },
    Close { handle: Bytes },
}

#[derive(Debug)]
struct Handle {
    path: String,
    command_id: String,
    read: u64,
    written: u64,
}

/// Both directions of one SFTP channel.
#[derive(Debug, Default)]
pub struct Tracker {
    pending: HashMap<u32, Pending>,
    handles: HashMap<Bytes, Handle>,
}

fn string(b: &mut Bytes) -> Option<Bytes> {
    if b.remaining() < 4 {
        return None;
    }
    let n = b.get_u32() as usize;
    if b.remaining() < n {
        return None;
    }
    Some(b.split_to(n))
}

fn path(b: &mut Bytes) -> Option<String> {
    string(b).map(|s| String::from_utf8_lossy(&s).into_owned())
}

fn u32_of(b: &mut Bytes) -> Option<u32> {
    (b.remaining() >= 4).then(|| b.get_u32())
}

/// The type and body (after the length) of a packet.
fn split(pkt: &Bytes) -> Option<(u8, Bytes)> {
    let mut b = pkt.slice(4..);
    if !b.has_remaining() {
        return None;
    }
    let t = b.get_u8();
    Some((t, b))
}

impl Tracker {
    /// What a request from the client asks, when it is an operation to
    /// decide (`None` for reads, writes, stats, listings and the like).
    pub fn operation(&self, pkt: &Bytes) -> Option<Op> {
        let (t, mut b) = split(pkt)?;
        if t == INIT {
            return None;
        }
        let id = u32_of(&mut b)?;
        let op = |verb, paths: Vec<String>, writes| Op {
            id,
            verb,
            paths,
            writes,
        };
        Some(match t {
            OPEN => {
                let p = path(&mut b)?;
                let flags = u32_of(&mut b)?;
                let writes = flags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC) != 0;
                op("open", vec![p], writes)
            }
            OPENDIR => op("opendir", vec![path(&mut b)?], false),
            REMOVE => op("remove", vec![path(&mut b)?], true),
            MKDIR => op("mkdir", vec![path(&mut b)?], true),
            RMDIR => op("rmdir", vec![path(&mut b)?], true),
            SETSTAT => op("setstat", vec![path(&mut b)?], true),
            RENAME => {
                let from = path(&mut b)?;
                op("rename", vec![from, path(&mut b)?], true)
            }
            SYMLINK => {
                let a = path(&mut b)?;
                op("symlink", vec![a, path(&mut b)?], true)
            }
            EXTENDED => {
                let name = path(&mut b)?;
                match name.as_str() {
                    "posix-rename@openssh.com" => {
                        let from = path(&mut b)?;
                        op("rename", vec![from, path(&mut b)?], true)
                    }
                    "hardlink@openssh.com" => {
                        let a = path(&mut b)?;
                        op("hardlink", vec![a, path(&mut b)?], true)
                    }
                    "lsetstat@openssh.com" => op("setstat", vec![path(&mut b)?], true),
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// Follows a request that goes on to the server; `command_id` is the
    /// audit id of its decision, for opens.
    pub fn request(&mut self, pkt: &Bytes, command_id: Option<&str>) {
        let Some((t, mut b)) = split(pkt) else { return };
        if t == INIT {
            return;
        }
        let Some(id) = u32_of(&mut b) else { return };
        match t {
            OPEN => {
                if let Some(p) = path(&mut b) {
                    self.pending.insert(
                        id,
                        Pending::Open {
                            path: p,
                            command_id: command_id.unwrap_or_default().to_string(),
                        },
                    );
                }
            }
            READ => {
                if let Some(h) = string(&mut b) {
                    self.pending.insert(id, Pending::Read { handle: h });
                }
            }
            WRITE => {
                if let Some(h) = string(&mut b)
                    && b.remaining() >= 8
                {
                    b.advance(8);
                    if let Some(data) = string(&mut b)
                        && let Some(handle) = self.handles.get_mut(&h)
                    {
                        handle.written += data.len() as u64;
                    }
                }
            }
            CLOSE => {
                if let Some(h) = string(&mut b) {
                    self.pending.insert(id, Pending::Close { handle: h });
                }
            }
            _ => {}
        }
        // A client that never waits for replies cannot grow this without bound.
        if self.pending.len() > 65_536 {
            self.pending.clear();
        }
    }

    /// Follows a reply from the server; returns the handle it closed, if any.
    pub fn reply(&mut self, pkt: &Bytes) -> Option<Closed> {
        let (t, mut b) = split(pkt)?;
        let id = u32_of(&mut b)?;
        let pending = self.pending.remove(&id)?;
        match (t, pending) {
            (HANDLE, Pending::Open { path, command_id }) => {
                let h = string(&mut b)?;
                if self.handles.len() < 65_536 {
                    self.handles.insert(
                        h,
                        Handle {
                            path,
                            command_id,
                            read: 0,
                            written: 0,
                        },
                    );
                }
                None
            }
            (DATA, Pending::Read { handle }) => {
                let data = string(&mut b)?;
                if let Some(h) = self.handles.get_mut(&handle) {
                    h.read += data.len() as u64;
                }
                None
            }
            (STATUS, Pending::Close { handle }) => {
                let h = self.handles.remove(&handle)?;
                Some(Closed {
                    command_id: h.command_id,
                    path: h.path,
                    read: h.read,
                    written: h.written,
                })
            }
            _ => None,
        }
    }

    /// Handles still open (reported when the channel ends).
    pub fn open_handles(&mut self) -> Vec<Closed> {
        self.handles
            .drain()
            .map(|(_, h)| Closed {
                command_id: h.command_id,
                path: h.path,
                read: h.read,
                written: h.written,
            })
            .collect()
    }
}

/// An `SSH_FXP_STATUS` packet answering request `id` with
/// `SSH_FX_PERMISSION_DENIED` and `message`.
pub fn permission_denied(id: u32, message: &str) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u8(STATUS);
    body.put_u32(id);
    body.put_u32(3);
    body.put_u32(message.len() as u32);
    body.put_slice(message.as_bytes());
    body.put_u32(2);
    body.put_slice(b"en");
    let mut out = BytesMut::with_capacity(body.len() + 4);
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(t: u8, id: u32, fields: &[&[u8]], tail: &[u8]) -> Bytes {
        let mut body = BytesMut::new();
        body.put_u8(t);
        body.put_u32(id);
        for f in fields {
            body.put_u32(f.len() as u32);
            body.put_slice(f);
        }
        body.put_slice(tail);
        let mut out = BytesMut::new();
        out.put_u32(body.len() as u32);
        out.put_slice(&body);
        out.freeze()
    }

    #[test]
    fn packets_are_framed_across_chunks_and_oversized_ones_refused() {
        let p = pkt(REMOVE, 7, &[b"/tmp/x"], b"");
        let mut f = Framer::default();
        assert!(f.push(&p[..3]).unwrap().is_empty());
        let got = f.push(&[&p[3..], &p[..]].concat()).unwrap();
        assert_eq!(got, [p.clone(), p]);
        assert!(Framer::default().push(&[0x7f, 0, 0, 0]).is_err());
    }

    #[test]
    fn an_open_write_close_is_followed_to_its_byte_counts() {
        let mut t = Tracker::default();
        let open = pkt(
            OPEN,
            1,
            &[b"/srv/f"],
            &(FXF_WRITE | FXF_CREAT).to_be_bytes(),
        );
        let op = t.operation(&open).unwrap();
        assert_eq!(op.verb, "open");
        assert!(op.writes);
        assert_eq!(op.paths, ["/srv/f"]);
        t.request(&open, Some("cmd-1"));
        assert_eq!(t.reply(&pkt(HANDLE, 1, &[b"h1"], b"")), None);
        let mut w = 0u64.to_be_bytes().to_vec();
        w.extend_from_slice(&5u32.to_be_bytes());
        w.extend_from_slice(b"hello");
        t.request(&pkt(WRITE, 2, &[b"h1"], &w), None);
        t.request(&pkt(READ, 3, &[b"h1"], &[0; 12]), None);
        t.reply(&pkt(DATA, 3, &[b"abc"], b""));
        t.request(&pkt(CLOSE, 4, &[b"h1"], b""), None);
        let closed = t.reply(&pkt(STATUS, 4, &[], &[0, 0, 0, 0])).unwrap();
        assert_eq!(
            closed,
            Closed {
                command_id: "cmd-1".into(),
                path: "/srv/f".into(),
                read: 3,
                written: 5
            }
        );
    }

    #[test]
    fn renames_and_extensions_name_both_paths() {
        let t = Tracker::default();
        let op = t.operation(&pkt(RENAME, 9, &[b"/a", b"/b"], b"")).unwrap();
        assert_eq!(
            (op.verb, op.paths.clone()),
            ("rename", vec!["/a".to_string(), "/b".to_string()])
        );
        let op = t
            .operation(&pkt(
                EXTENDED,
                9,
                &[b"posix-rename@openssh.com", b"/a", b"/c"],
                b"",
            ))
            .unwrap();
        assert_eq!(op.paths, ["/a", "/c"]);
        assert!(t.operation(&pkt(READ, 1, &[b"h"], b"")).is_none());
        // Truncated packets are not operations, and nothing panics.
        assert!(
            t.operation(&Bytes::from_static(&[0, 0, 0, 2, OPEN, 0]))
                .is_none()
        );
    }

    #[test]
    fn a_refusal_is_a_well_formed_status() {
        let p = permission_denied(5, "no");
        let (t, mut b) = split(&p).unwrap();
        assert_eq!(t, STATUS);
        assert_eq!(b.get_u32(), 5);
        assert_eq!(b.get_u32(), 3);
        assert_eq!(string(&mut b).unwrap(), &b"no"[..]);
    }
}
