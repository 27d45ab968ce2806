//! Matches the server's replies to the statements that caused them, so each
//! audited statement gets its result: rows, duration, error.
//!
//! The client side pushes what every message it forwards will be answered
//! with ([`Expect`]); the server side feeds each reply to
//! [`Tracker::on_server`]. The protocol's own rules keep the two in step:
//! every Parse, Bind, Close, Describe and Execute is answered in order, an
//! error in the extended protocol discards everything up to the next Sync,
//! and a simple Query or a FunctionCall ends with ReadyForQuery. The
//! tracker only observes: if it ever lost step, results would be wrong, but
//! the relay itself never depends on it.

use std::collections::VecDeque;
use std::time::Instant;

/// An audited statement whose result is awaited.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Id of its `command` audit event.
    pub command_id: String,
    /// When it was forwarded.
    pub started: Instant,
}

/// A bound statement and the result formats Bind asked for.
pub type ShapeKey = (String, bytes::Bytes);

/// What a forwarded client message will be answered with.
#[derive(Debug)]
pub enum Expect {
    /// Parse, Bind or Close: one completion message.
    Ack,
    /// Describe: ends with RowDescription or NoData. `Some(key)`: the
    /// gate's own (masking), whose reply the client never sees; the key
    /// (statement, result formats) names the shape it describes.
    Describe(Option<ShapeKey>),
    /// No reply of its own: the rows of the Execute after it have this
    /// shape (known from an earlier Describe of the same statement and formats).
    Shape(std::sync::Arc<crate::mask::Shape>),
    /// No reply of its own: the COPY rows of the Query after it are masked so.
    Copy(std::sync::Arc<crate::mask::CopyPlan>),
    /// Execute: ends with CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute(Option<Pending>),
    /// A simple Query (its statements in order) or a FunctionCall (one
    /// entry): ends with ReadyForQuery.
    Query(VecDeque<Option<Pending>>),
    /// Sync: ends with ReadyForQuery.
    Sync,
    /// An unparseable statement sent on behind a guard statement that
    /// fails at execution (`shift` characters long, naming marker
    /// `nonce`): the server either reports its own syntax error (position
    /// to be shifted back) or parses it and fails on the guard. A Query
    /// (`query`) or a Parse.
    Guarded {
        /// Characters the guard adds before the client's text.
        shift: usize,
        /// The refusal marker.
        nonce: String,
        /// A simple Query (else a Parse).
        query: bool,
    },
}

/// An error that answers a guarded statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedError {
    /// Characters to take off the error's position.
    pub shift: usize,
    /// It was a simple Query (else a Parse).
    pub query: bool,
    /// The refusal marker.
    pub nonce: String,
}

/// How a statement ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Completed.
    Ok,
    /// A portal suspended at its row limit (more rows may follow).
    Suspended,
    /// The server raised an error.
    Error {
        /// SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// Never ran: an earlier error in the same batch discarded it.
    Skipped,
}

/// One statement's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The statement.
    pub pending: Pending,
    /// Rows returned or affected (from the command tag, else rows counted).
    pub rows: Option<u64>,
    /// How it ended.
    pub status: Status,
    /// Microseconds from forwarding to the end of its reply.
    pub duration_us: u64,
    /// Values masked in its reply, per detector or column.
    pub masked: Vec<(String, u64)>,
}

/// Most replies awaited at once; past it the tracker stops (results for
/// that stretch are lost, the relay is not affected).
const MAX_EXPECTED: usize = 100_000;

/// The awaited replies of one session.
#[derive(Debug, Default)]
pub struct Tracker {
    queue: VecDeque<Expect>,
    /// DataRows seen for the statement in front.
    rows_seen: u64,
    overflowed: bool,
    /// The last reply answered the gate's own Describe of this key.
    swallow: Option<ShapeKey>,
    /// A known shape for the rows that follow.
    shape: Option<std::sync::Arc<crate::mask::Shape>>,
    /// The masking of the COPY rows that follow.
    copy: Option<std::sync::Arc<crate::mask::CopyPlan>>,
}

impl Tracker {
    /// Whether the last message handed to [`Self::on_server`] answered the
    /// gate's own Describe (and must not reach the client); resets.
    pub fn take_swallow(&mut self) -> Option<ShapeKey> {
        self.swallow.take()
    }

    /// The COPY masking announced for the rows that follow, if one was reached.
    pub fn take_copy(&mut self) -> Option<std::sync::Arc<crate::mask::CopyPlan>> {
        self.copy.take()
    }

    /// The shape announced for the rows that follow, if one was reached.
    pub fn take_shape(&mut self) -> Option<std::sync::Arc<crate::mask::Shape>> {
        self.shape.take()
    }

    /// No reply is awaited.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// Records what a forwarded message will be answered with.
    pub fn push(&mut self, e: Expect) {
        if self.queue.len() >= MAX_EXPECTED {
            if !self.overflowed {
                tracing::warn!(
                    "too many unanswered messages; statement results are not tracked for a while"
                );
            }
            self.overflowed = true;
            self.queue.clear();
            return;
        }
        self.queue.push_back(e);
    }

    fn finish(
        &mut self,
        p: Option<Pending>,
        rows: Option<u64>,
        status: Status,
        out: &mut Vec<Outcome>,
    ) {
        let counted = std::mem::take(&mut self.rows_seen);
        if let Some(pending) = p {
            let rows = match status {
                Status::Skipped => None,
                _ => rows.or((counted > 0).then_some(counted)),
            };
            out.push(Outcome {
                duration_us: pending.started.elapsed().as_micros() as u64,
                pending,
                rows,
                status,
                masked: Vec::new(),
            });
        }
    }

    /// Feeds one server message (`tag`, `body`); finished statements are
    /// appended to `out`.
    /// An ErrorResponse answering a guarded statement returns how to fix it.
    pub fn on_server(
        &mut self,
        tag: u8,
        body: &[u8],
        out: &mut Vec<Outcome>,
    ) -> Option<GuardedError> {
        let mut guarded = None;
        if let Some(Expect::Guarded {
            shift,
            nonce,
            query,
        }) = self.queue.front()
        {
            if tag == b'E' {
                guarded = Some(GuardedError {
                    shift: *shift,
                    query: *query,
                    nonce: nonce.clone(),
                });
            }
            // From here on it behaves as what it stands for.
            let plain = if *query {
                Expect::Query([None].into())
            } else {
                Expect::Ack
            };
            if let Some(front) = self.queue.front_mut() {
                *front = plain;
            }
        }
        self.step(tag, body, out);
        guarded
    }

    fn step(&mut self, tag: u8, body: &[u8], out: &mut Vec<Outcome>) {
        // Shape markers have no reply: they apply from the next message on.
        while let Some(Expect::Shape(_) | Expect::Copy(_)) = self.queue.front() {
            match self.queue.pop_front() {
                Some(Expect::Shape(s)) => self.shape = Some(s),
                Some(Expect::Copy(c)) => self.copy = Some(c),
                _ => {}
            }
        }
        match tag {
            b'D' => self.rows_seen += 1,
            b'1' | b'2' | b'3' => {
                if matches!(self.queue.front(), Some(Expect::Ack)) {
                    self.queue.pop_front();
                }
            }
            b'T' | b'n' => {
                if let Some(Expect::Describe(_)) = self.queue.front()
                    && let Some(Expect::Describe(key)) = self.queue.pop_front()
                {
                    self.swallow = key;
                }
            }
            b'C' | b'I' | b's' => {
                let rows = if tag == b'C' { tag_rows(body) } else { None };
                let status = if tag == b's' {
                    Status::Suspended
                } else {
                    Status::Ok
                };
                match self.queue.front_mut() {
                    Some(Expect::Execute(_)) => {
                        if let Some(Expect::Execute(p)) = self.queue.pop_front() {
                            self.finish(p, rows, status, out);
                        }
                    }
                    Some(Expect::Query(stmts)) => {
                        let p = stmts.pop_front().flatten();
                        self.finish(p, rows, status, out);
                    }
                    _ => self.rows_seen = 0,
                }
            }
            b'E' => {
                let fields = crate::codec::error_fields(body);
                let get = |c: u8| {
                    fields
                        .iter()
                        .find(|(k, _)| *k == c)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let error = Status::Error {
                    code: get(b'C'),
                    message: get(b'M'),
                };
                match self.queue.front_mut() {
                    Some(Expect::Query(stmts)) => {
                        let mut rest = std::mem::take(stmts);
                        let first = rest.pop_front().flatten();
                        self.finish(first, None, error, out);
                        for p in rest {
                            self.finish(p, None, Status::Skipped, out);
                        }
                    }
                    Some(Expect::Sync) | None => {}
                    Some(_) => {
                        // Extended protocol: this message failed, and the
                        // server discards everything up to the next Sync.
                        let mut first = true;
                        while let Some(front) = self.queue.front() {
                            if matches!(front, Expect::Sync | Expect::Query(_)) {
                                break;
                            }
                            let status = if first {
                                error.clone()
                            } else {
                                Status::Skipped
                            };
                            first = false;
                            if let Some(Expect::Execute(p)) = self.queue.pop_front() {
                                self.finish(p, None, status, out);
                            }
                        }
                    }
                }
            }
            b'Z' => {
                if matches!(self.queue.front(), Some(Expect::Sync | Expect::Query(_))) {
                    if let Some(Expect::Query(rest)) = self.queue.pop_front() {
                        for p in rest {
                            self.finish(p, None, Status::Skipped, out);
                        }
                    }
                } else if !self.queue.is_empty() {
                    // Out of step (should not happen): start over rather than
                    // attribute later replies to the wrong statements.
                    self.queue.clear();
                }
                self.rows_seen = 0;
                self.overflowed = false;
            }
            _ => {}
        }
    }
}

/// Rows from a command tag: `SELECT 5`, `INSERT 0 3`, `UPDATE 2`, `COPY 10`…
fn tag_rows(body: &[u8]) -> Option<u64> {
    let tag = body.strip_suffix(b"\0").unwrap_or(body);
    let tag = std::str::from_utf8(tag).ok()?;
    let mut words = tag.split(' ');
    let verb = words.next()?;
    let last = tag.rsplit(' ').next()?;
    match verb {
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "COPY" | "FETCH" | "MOVE" => {
            last.parse().ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str) -> Option<Pending> {
        Some(Pending {
            command_id: id.into(),
            started: Instant::now(),
        })
    }

    fn err(code: &str) -> Vec<u8> {
        format!("SERROR\0C{code}\0Mboom\0\0").into_bytes()
    }

    #[test]
    fn simple_query_with_an_error_skips_the_rest() {
        let mut t = Tracker::default();
        t.push(Expect::Query([p("a"), p("b"), p("c")].into()));
        let mut out = Vec::new();
        t.on_server(b'T', b"", &mut out);
        t.on_server(b'D', b"", &mut out);
        t.on_server(b'C', b"SELECT 1\0", &mut out);
        t.on_server(b'E', &err("22012"), &mut out);
        t.on_server(b'Z', b"I", &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].rows, Some(1));
        assert_eq!(out[0].status, Status::Ok);
        assert!(matches!(&out[1].status, Status::Error { code, .. } if code == "22012"));
        assert_eq!(out[2].status, Status::Skipped);
    }

    #[test]
    fn pipelined_extended_batches_stay_in_step() {
        let mut t = Tracker::default();
        // Batch 1: Parse, Bind, Execute(a), Sync. Batch 2: Bind, Execute(b)
        // fails, Bind, Execute(c) skipped, Sync. Batch 3: Execute(d), Sync.
        for e in [
            Expect::Ack,
            Expect::Ack,
            Expect::Execute(p("a")),
            Expect::Sync,
            Expect::Ack,
            Expect::Execute(p("b")),
            Expect::Ack,
            Expect::Execute(p("c")),
            Expect::Sync,
            Expect::Execute(p("d")),
            Expect::Sync,
        ] {
            t.push(e);
        }
        let mut out = Vec::new();
        for (tag, body) in [
            (b'1', &b""[..]),
            (b'2', b""),
            (b'D', b""),
            (b'D', b""),
            (b'C', b"UPDATE 2\0"),
            (b'Z', b"T"),
            (b'2', b""),
            (b'E', &err("23505")),
            (b'Z', b"E"),
            (b'C', b"INSERT 0 1\0"),
            (b'Z', b"I"),
        ] {
            t.on_server(tag, body, &mut out);
        }
        let got: Vec<_> = out
            .iter()
            .map(|o| (o.pending.command_id.as_str(), o.rows, o.status.clone()))
            .collect();
        assert_eq!(got[0], ("a", Some(2), Status::Ok));
        assert!(matches!(&got[1], ("b", None, Status::Error { code, .. }) if code == "23505"));
        assert_eq!(got[2], ("c", None, Status::Skipped));
        assert_eq!(got[3], ("d", Some(1), Status::Ok));
        assert!(t.queue.is_empty());
    }

    #[test]
    fn command_tags() {
        assert_eq!(tag_rows(b"SELECT 42\0"), Some(42));
        assert_eq!(tag_rows(b"INSERT 0 7\0"), Some(7));
        assert_eq!(tag_rows(b"COPY 3\0"), Some(3));
        assert_eq!(tag_rows(b"CREATE TABLE\0"), None);
    }
}
