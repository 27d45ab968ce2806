//! The audit path: a durable, bounded on-disk spool and the reporter that
//! streams it to the control service.
//!
//! **Nothing is lost:** an event is written to the spool before the command
//! it describes goes on, and leaves the spool only when the control service
//! acknowledged its id. After a restart or a reconnect every unacknowledged
//! event is sent again; ids make the replay idempotent. Segment files are
//! flushed to the OS at once and `fsync`ed every 200 ms, so a sidecar crash
//! loses nothing and a machine crash at most the last 200 ms.
//!
//! **Encoded once:** an event is encoded to protobuf when it is spooled. A
//! segment is a sequence of records, each a 4-byte little-endian length and
//! an `AuditEvent`'s encoding; the reporter sends those bytes as they are
//! ([`wicket_proto::report`]). Segments of the JSON Lines format of earlier
//! versions are converted when the spool opens.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use wicket_core::AuditEvent;
use wicket_proto::report::{self, EncodedReport};
use wicket_proto::v1;

use crate::client::{Backoff, ControlClient};

/// Segment files roll over at this size.
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Events per report batch.
const BATCH: usize = 512;
/// A batch stops growing past this many bytes of events (as spooled), so
/// recordings (32 KiB an event) stay well under the control service's
/// 4 MiB message limit; an event larger than this still goes, alone.
const BATCH_BYTES: u64 = 1024 * 1024;
/// How long a new event waits for others to share its report. Each report
/// is one store transaction: at 10 ms the control service spent 35–43 µs of
/// CPU per statement of `bench pg`, on the cores the database needs; at
/// 100 ms, 24 µs (and the gate itself less, with fewer reports to encode).
const LINGER: Duration = Duration::from_millis(100);
/// Unacknowledged batches at once.
const MAX_INFLIGHT: usize = 4;
/// Unsent events kept in memory as well as on disk; past this backlog (the
/// control service is away) only their place in the segment is kept and
/// they are read back from disk when sent, so memory stays bounded however
/// full the spool gets.
const MEMORY_EVENTS: usize = 4096;
/// …and at most this many bytes of them (recordings make large events).
const MEMORY_BYTES: u64 = 16 * 1024 * 1024;
/// A record's header: the length of the encoded event that follows.
const HEADER: usize = 4;
/// No event is longer (a longer length is a damaged segment).
const MAX_RECORD: usize = 256 * 1024 * 1024;

/// The spool refused an event.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool reached its size limit.
    #[error(
        "the audit spool is full ({0} bytes); commands are refused until the control service catches up"
    )]
    Full(u64),
    /// The disk failed.
    #[error("cannot write the audit spool: {0}")]
    Io(#[from] std::io::Error),
}

struct Segment {
    path: PathBuf,
    bytes: u64,
    unacked: usize,
}

/// An unacknowledged event: where its record is on disk, and the record
/// itself while the backlog is small. That part is boxed: an entry whose
/// record lives only on disk stays a few dozen bytes (a long backlog holds
/// one entry per event).
struct Entry {
    id: String,
    place: Place,
    /// A command a result may be merged into ([`report::takes_result`]).
    takes_result: bool,
    held: Option<Box<Held>>,
}

/// Where a record is.
#[derive(Debug, Clone, Copy)]
struct Place {
    seg: u64,
    offset: u64,
    /// The record's length, header included.
    len: u32,
}

/// A record kept in memory.
struct Held {
    /// Header and encoded event, as on disk.
    record: Vec<u8>,
    /// For a result: its command, and where (in the encoded event) the part
    /// merged into the command begins.
    result_of: Option<(String, usize)>,
}

struct Inner {
    dir: PathBuf,
    current: Option<(u64, File)>,
    segments: BTreeMap<u64, Segment>,
    pending: VecDeque<Entry>,
    /// Sent, not yet acknowledged: only their place is kept (a resend reads
    /// them back), so a burst of large batches leaves nothing in the heap.
    inflight: HashMap<String, Place>,
    /// Command id → the ids of result events sent inside it (acked with it).
    merged: HashMap<String, Vec<String>>,
    total_bytes: u64,
    /// Bytes of the pending events (as spooled).
    pending_bytes: u64,
    /// Bytes of the pending events kept in memory.
    memory_bytes: u64,
    next_segment: u64,
    dirty: bool,
}

impl Inner {
    /// Whether the pending events fill a report (by count or by bytes).
    fn batch_full(&self) -> bool {
        self.pending.len() >= BATCH || self.pending_bytes >= BATCH_BYTES
    }

    /// Gives back what a drained backlog held: the queues keep their largest
    /// capacity otherwise, and one burst would set the idle footprint.
    fn release_drained(&mut self) {
        const KEEP: usize = 1024;
        if self.pending.len() < KEEP && self.pending.capacity() > 4 * KEEP {
            self.pending.shrink_to(KEEP);
        }
        if self.inflight.len() < KEEP && self.inflight.capacity() > 4 * KEEP {
            self.inflight.shrink_to(KEEP);
        }
        if self.merged.len() < KEEP && self.merged.capacity() > 4 * KEEP {
            self.merged.shrink_to(KEEP);
        }
    }

    fn ack(&mut self, id: &str) {
        let Some(Place { seg, .. }) = self.inflight.remove(id) else {
            return;
        };
        if let Some(results) = self.merged.remove(id) {
            for r in results {
                self.ack(&r);
            }
        }
        let remove = match self.segments.get_mut(&seg) {
            Some(s) => {
                s.unacked = s.unacked.saturating_sub(1);
                s.unacked == 0 && self.current.as_ref().is_none_or(|(c, _)| *c != seg)
            }
            None => false,
        };
        if remove {
            self.drop_segment(seg);
        }
    }

    /// Reads a record back from its segment.
    fn read_back(&self, p: Place) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let seg = self
            .segments
            .get(&p.seg)
            .ok_or_else(|| std::io::Error::other("segment gone"))?;
        let mut buf = vec![0u8; p.len as usize];
        File::open(&seg.path)?.read_exact_at(&mut buf, p.offset)?;
        match record_len(&buf) {
            Some(n) if n + HEADER == buf.len() => Ok(buf),
            _ => Err(std::io::Error::other("the record's length does not match")),
        }
    }

    /// Deletes a fully acknowledged segment.
    fn drop_segment(&mut self, seg: u64) {
        if let Some(s) = self.segments.remove(&seg) {
            self.total_bytes = self.total_bytes.saturating_sub(s.bytes);
            if let Err(e) = std::fs::remove_file(&s.path) {
                tracing::warn!(error = %e, path = %s.path.display(), "cannot remove acknowledged spool segment");
            }
        }
    }
}

/// The on-disk spool.
pub struct Spool {
    appended: std::sync::atomic::AtomicU64,
    inner: Mutex<Inner>,
    notify: Notify,
    max_bytes: u64,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Spool")
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("audit-{n:012}.pb"))
}

/// Whether a record of `len` bytes is kept in memory too, behind `pending`
/// queued events holding `memory_bytes`.
fn fits_in_memory(pending: usize, memory_bytes: u64, len: usize) -> bool {
    pending < MEMORY_EVENTS && memory_bytes + len as u64 <= MEMORY_BYTES
}

/// The length of the encoded event a record's header announces.
fn record_len(record: &[u8]) -> Option<usize> {
    let h: [u8; HEADER] = record.get(..HEADER)?.try_into().ok()?;
    Some(u32::from_le_bytes(h) as usize)
}

/// The spool's segments in `dir` with the extension `ext`, in order.
fn segments_in(dir: &Path, ext: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().to_string();
            let n = name
                .strip_prefix("audit-")?
                .strip_suffix(ext)?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    names.sort();
    Ok(names)
}

impl Spool {
    /// Opens the spool in `dir`, loading every event not yet acknowledged
    /// (and converting segments of the earlier JSON Lines format).
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Arc<Spool>> {
        std::fs::create_dir_all(dir)?;
        let mut segments = BTreeMap::new();
        let mut pending = VecDeque::new();
        let mut total_bytes = 0;
        let mut memory_bytes = 0u64;
        let mut next_segment = 0;
        let mut seen = std::collections::HashSet::new();
        for (n, path) in segments_in(dir, ".pb")? {
            let data = std::fs::read(&path)?;
            let mut unacked = 0;
            let mut at = 0;
            while at < data.len() {
                let end = record_len(&data[at..])
                    .filter(|&len| len <= MAX_RECORD)
                    .map(|len| at + HEADER + len)
                    .filter(|&end| end <= data.len());
                // A torn last record (a crash mid-write) ends the segment;
                // its command never ran.
                let Some(end) = end else {
                    tracing::warn!(path = %path.display(), offset = at, "audit spool segment ends in a partial record; skipped");
                    break;
                };
                let event = match report::decode_event(&data[at + HEADER..end]) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(path = %path.display(), offset = at, error = %e, "unreadable audit record in the spool; skipped");
                        at = end;
                        continue;
                    }
                };
                if seen.insert(event.id.clone()) {
                    let len = end - at;
                    let keep = fits_in_memory(pending.len(), memory_bytes, len);
                    if keep {
                        memory_bytes += len as u64;
                    }
                    pending.push_back(Entry {
                        takes_result: report::takes_result(&event),
                        id: event.id,
                        place: Place {
                            seg: n,
                            offset: at as u64,
                            len: len as u32,
                        },
                        held: keep.then(|| {
                            Box::new(Held {
                                record: data[at..end].to_vec(),
                                result_of: None,
                            })
                        }),
                    });
                    unacked += 1;
                }
                at = end;
            }
            total_bytes += data.len() as u64;
            next_segment = next_segment.max(n + 1);
            segments.insert(
                n,
                Segment {
                    path,
                    bytes: data.len() as u64,
                    unacked,
                },
            );
        }
        let legacy = segments_in(dir, ".jsonl")?;
        for (n, _) in &legacy {
            next_segment = next_segment.max(n + 1);
        }
        let pending_bytes = pending.iter().map(|e| u64::from(e.place.len)).sum();
        let spool = Arc::new(Spool {
            appended: std::sync::atomic::AtomicU64::new(0),
            inner: Mutex::new(Inner {
                dir: dir.to_path_buf(),
                current: None,
                segments,
                pending,
                inflight: HashMap::new(),
                merged: HashMap::new(),
                total_bytes,
                pending_bytes,
                memory_bytes,
                next_segment,
                dirty: false,
            }),
            notify: Notify::new(),
            max_bytes,
        });
        for (_, path) in legacy {
            spool.convert_legacy(&path, &mut seen)?;
        }
        let waiting = spool.unacked();
        if waiting > 0 {
            tracing::info!(
                events = waiting,
                "replaying unacknowledged audit events from the spool"
            );
        }
        Ok(spool)
    }

    /// Spools again the events of a JSON Lines segment (the format of
    /// earlier builds: one event per line), then removes it.
    fn convert_legacy(
        &self,
        path: &Path,
        seen: &mut std::collections::HashSet<String>,
    ) -> std::io::Result<()> {
        let mut reader = BufReader::new(File::open(path)?);
        let mut line = Vec::new();
        let mut converted = 0usize;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            // A torn last line (a crash mid-write) is skipped; its command never ran.
            let Ok(event) = serde_json::from_slice::<AuditEvent>(&line) else {
                continue;
            };
            if seen.insert(event.id.clone()) {
                self.append(event).map_err(std::io::Error::other)?;
                converted += 1;
            }
        }
        self.sync();
        std::fs::remove_file(path)?;
        tracing::info!(path = %path.display(), events = converted, "converted an audit spool segment of the JSON Lines format");
        Ok(())
    }

    /// Writes an event durably (to the OS at once, to disk within 200 ms).
    pub fn append(&self, event: AuditEvent) -> Result<(), SpoolError> {
        // Most events fit in 512 bytes: one allocation, no regrowth.
        let mut line = Vec::with_capacity(512);
        line.extend_from_slice(&[0; HEADER]);
        let encoded = report::encode_event(event, &mut line);
        let body = line.len() - HEADER;
        if body > MAX_RECORD {
            return Err(SpoolError::Io(std::io::Error::other(format!(
                "an audit event of {body} bytes is over the limit of {MAX_RECORD}"
            ))));
        }
        line[..HEADER].copy_from_slice(&(body as u32).to_le_bytes());
        let mut g = self.inner.lock().expect("spool lock");
        if g.total_bytes + line.len() as u64 > self.max_bytes {
            return Err(SpoolError::Full(self.max_bytes));
        }
        let roll = match &g.current {
            None => true,
            Some((n, _)) => g.segments.get(n).is_none_or(|s| s.bytes >= SEGMENT_BYTES),
        };
        if roll {
            if let Some((old, f)) = g.current.take() {
                let _ = f.sync_data();
                if g.segments.get(&old).is_some_and(|s| s.unacked == 0) {
                    g.drop_segment(old);
                }
            }
            let n = g.next_segment;
            g.next_segment += 1;
            let path = segment_path(&g.dir, n);
            let f = OpenOptions::new().create(true).append(true).open(&path)?;
            g.segments.insert(
                n,
                Segment {
                    path,
                    bytes: 0,
                    unacked: 0,
                },
            );
            g.current = Some((n, f));
        }
        let inner = &mut *g;
        let (n, f) = inner.current.as_mut().expect("a current segment");
        let n = *n;
        if let Err(e) = f.write_all(&line) {
            // Part of the record may be on disk, and a replay stops at a
            // partial record: cut it off, or leave the segment for a new one.
            let at = inner.segments.get(&n).map_or(0, |s| s.bytes);
            if f.set_len(at).is_err() {
                inner.current = None;
                if inner.segments.get(&n).is_some_and(|s| s.unacked == 0) {
                    inner.drop_segment(n);
                }
            }
            return Err(e.into());
        }
        let seg = inner
            .segments
            .get_mut(&n)
            .expect("current segment is tracked");
        let offset = seg.bytes;
        seg.bytes += line.len() as u64;
        seg.unacked += 1;
        inner.total_bytes += line.len() as u64;
        let keep = fits_in_memory(inner.pending.len(), inner.memory_bytes, line.len());
        if keep {
            inner.memory_bytes += line.len() as u64;
        }
        let was_full = inner.batch_full();
        inner.pending_bytes += line.len() as u64;
        inner.pending.push_back(Entry {
            id: encoded.id,
            place: Place {
                seg: n,
                offset,
                len: line.len() as u32,
            },
            takes_result: encoded.takes_result,
            held: keep.then(|| {
                Box::new(Held {
                    record: line,
                    result_of: encoded.result_of,
                })
            }),
        });
        inner.dirty = true;
        // The reporter wants to hear of the first event (it starts waiting
        // for company) and of a full batch (it stops waiting); the events
        // between would only wake it to count them.
        let wake = inner.pending.len() == 1 || (!was_full && inner.batch_full());
        drop(g);
        self.appended
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if wake {
            self.notify.notify_one();
        }
        Ok(())
    }

    /// Events appended by this process since it opened the spool.
    pub fn appended(&self) -> u64 {
        self.appended.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Events not yet acknowledged (pending and in flight).
    pub fn unacked(&self) -> usize {
        let g = self.inner.lock().expect("spool lock");
        g.pending.len() + g.inflight.len()
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().expect("spool lock").total_bytes
    }

    /// Whether the next event would not fit.
    pub fn is_full(&self) -> bool {
        self.bytes() >= self.max_bytes
    }

    fn take_batch(&self) -> EncodedReport {
        let mut g = self.inner.lock().expect("spool lock");
        let n = g.pending.len().min(BATCH);
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(n);
        // Commands in this report a result may join: id → index in `out`.
        let mut commands: HashMap<String, usize> = HashMap::with_capacity(n);
        let mut bytes = 0u64;
        for _ in 0..n {
            let next = u64::from(g.pending.front().map(|e| e.place.len).unwrap_or(0));
            if bytes > 0 && bytes + next > BATCH_BYTES {
                break;
            }
            bytes += next;
            let mut entry = g.pending.pop_front().expect("counted");
            g.pending_bytes -= u64::from(entry.place.len);
            let (mut record, result_of) = match entry.held.take() {
                Some(h) => {
                    g.memory_bytes = g.memory_bytes.saturating_sub(u64::from(entry.place.len));
                    (h.record, h.result_of)
                }
                None => match g.read_back(entry.place) {
                    Ok(r) => (r, None),
                    Err(e) => {
                        // The record was written and fsynced by us; if it cannot
                        // be read back now, keep it queued and say so.
                        tracing::error!(error = %e, id = %entry.id, "cannot read an audit event back from the spool");
                        g.pending_bytes += u64::from(entry.place.len);
                        g.pending.push_front(entry);
                        break;
                    }
                },
            };
            // A result whose command goes in this same report travels inside
            // it: one stored row per statement instead of two. It is
            // acknowledged with its command.
            let into = result_of
                .as_ref()
                .and_then(|(command, at)| commands.get(command).map(|&i| (i, *at)));
            match (into, result_of) {
                (Some((i, at)), Some((command, _))) => {
                    out[i].extend_from_slice(&record[HEADER + at..]);
                    report::append_detail(&mut out[i], "result_id", &entry.id);
                    g.merged.entry(command).or_default().push(entry.id.clone());
                }
                _ => {
                    if entry.takes_result {
                        commands.insert(entry.id.clone(), out.len());
                    }
                    record.drain(..HEADER);
                    out.push(record);
                }
            }
            g.inflight.insert(entry.id, entry.place);
        }
        EncodedReport { events: out }
    }

    /// Whether events wait to be sent, and whether they fill a batch.
    fn waiting(&self) -> (bool, bool) {
        let g = self.inner.lock().expect("spool lock");
        (!g.pending.is_empty(), g.batch_full())
    }

    /// Puts every in-flight event back in front of the queue (after a disconnect).
    fn requeue_inflight(&self) {
        let mut g = self.inner.lock().expect("spool lock");
        g.merged.clear();
        let mut back: Vec<(String, Place)> = g.inflight.drain().collect();
        back.sort_by_key(|(_, p)| (p.seg, p.offset));
        // They are read back from disk when sent again.
        for (id, place) in back.into_iter().rev() {
            g.pending_bytes += u64::from(place.len);
            g.pending.push_front(Entry {
                id,
                place,
                takes_result: false,
                held: None,
            });
        }
    }

    fn ack(&self, ids: &[String]) {
        let mut g = self.inner.lock().expect("spool lock");
        for id in ids {
            g.ack(id);
        }
        g.release_drained();
    }

    fn reject(&self, rejected: &[v1::RejectedEvent]) {
        let mut g = self.inner.lock().expect("spool lock");
        let path = g.dir.join("rejected.jsonl");
        for r in rejected {
            let read = g.inflight.get(&r.id).map(|&p| {
                g.read_back(p).and_then(|rec| {
                    report::decode_event(&rec[HEADER..]).map_err(std::io::Error::other)
                })
            });
            if let Some(Err(e)) = &read {
                tracing::error!(error = %e, id = %r.id, reason = %r.reason, "audit event rejected by the control service and not readable from the spool");
            }
            if let Some(Ok(ev)) = read {
                // Keep what the control service will never take, with the reason.
                let line = serde_json::json!({"reason": r.reason, "event": ev}).to_string();
                let written = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| writeln!(f, "{line}"));
                if let Err(e) = written {
                    tracing::error!(error = %e, "cannot keep a rejected audit event");
                    continue;
                }
                tracing::error!(id = %r.id, reason = %r.reason, "audit event rejected by the control service; kept in rejected.jsonl");
            }
            g.ack(&r.id);
        }
    }

    /// `fsync`s the current segment if anything was written since the last call.
    pub fn sync(&self) {
        // fsync a duplicate of the handle outside the lock: a slow disk must
        // not stall the data path, whose appends take the same lock.
        let file = {
            let mut g = self.inner.lock().expect("spool lock");
            if !g.dirty {
                return;
            }
            g.dirty = false;
            g.current.as_ref().map(|(_, f)| f.try_clone())
        };
        match file {
            Some(Ok(f)) => {
                if let Err(e) = f.sync_data() {
                    tracing::error!(error = %e, "audit spool fsync failed");
                }
            }
            Some(Err(e)) => tracing::error!(error = %e, "audit spool fsync failed"),
            None => {}
        }
    }

    /// Flushes to disk periodically, forever.
    pub async fn sync_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.sync()).await;
        }
    }

    /// Streams the spool to the control service forever, reconnecting.
    pub async fn report_forever(self: Arc<Self>, client: ControlClient) {
        let mut backoff = Backoff::default();
        loop {
            self.requeue_inflight();
            let (tx, rx) = mpsc::channel::<EncodedReport>(4);
            let call = report::report(client.channel.clone(), client.req(ReceiverStream::new(rx)));
            // At most MAX_INFLIGHT unacknowledged batches: the request channel
            // then never blocks while acks wait to be read.
            let mut inflight = 0usize;
            let first = self.take_batch();
            if !first.events.is_empty() {
                if tx.send(first).await.is_err() {
                    backoff.wait().await;
                    continue;
                }
                inflight += 1;
            }
            let mut acks = match call.await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), unacked = self.unacked(), "cannot report audit events; they stay in the spool");
                    backoff.wait().await;
                    continue;
                }
            };
            backoff.reset();
            // When the events waiting now go even if no batch fills:
            // LINGER after the first of them. An acknowledgement alone does
            // not send them: sending whatever came in during one round trip
            // made reports of a few events each, and each report is a store
            // transaction (at 15,000 statements a second the control service
            // switched threads about once per event).
            let mut due = self
                .waiting()
                .0
                .then(|| tokio::time::Instant::now() + LINGER);
            loop {
                let timer = async {
                    match due {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                };
                let fired = tokio::select! {
                    ack = acks.next() => match ack {
                        Some(Ok(ack)) => {
                            inflight = inflight.saturating_sub(1);
                            self.ack(&ack.acked_ids);
                            self.reject(&ack.rejected);
                            false
                        }
                        Some(Err(status)) => {
                            tracing::warn!(code = ?status.code(), message = status.message(), "audit stream failed; resending unacknowledged events");
                            break;
                        }
                        None => break,
                    },
                    // The first event after none, or a full batch.
                    _ = self.notify.notified() => false,
                    // The wait is over (or the periodic check, with none set).
                    _ = timer => true,
                };
                if fired || self.waiting().1 {
                    while inflight < MAX_INFLIGHT {
                        let batch = self.take_batch();
                        if batch.events.is_empty() {
                            break;
                        }
                        if tx.send(batch).await.is_err() {
                            break;
                        }
                        inflight += 1;
                    }
                    due = None;
                }
                if due.is_none() && self.waiting().0 {
                    due = Some(tokio::time::Instant::now() + LINGER);
                }
            }
            backoff.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wicket_core::AuditKind;

    fn event(i: usize) -> AuditEvent {
        AuditEvent {
            id: format!("ev-{i:06}"),
            session_id: "s".into(),
            seq: i as u64,
            kind: AuditKind::Command,
            connection: "db".into(),
            ..Default::default()
        }
    }

    /// The next report, as the control service reads it.
    fn take(spool: &Spool) -> Vec<v1::AuditEvent> {
        spool
            .take_batch()
            .decode()
            .expect("a report decodes")
            .events
    }

    fn drain(spool: &Spool) -> Vec<String> {
        let mut ids = Vec::new();
        loop {
            let batch = take(spool);
            if batch.is_empty() {
                return ids;
            }
            let got: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
            spool.ack(&got);
            ids.extend(got);
        }
    }

    #[test]
    fn a_result_reported_with_its_command_travels_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let cmd = event(1);
        let mut result = event(2);
        result.kind = AuditKind::CommandResult;
        result.details.insert("command_id".into(), cmd.id.clone());
        result.details.insert("rows".into(), "3".into());
        spool.append(cmd.clone()).unwrap();
        spool.append(result.clone()).unwrap();
        let batch = take(&spool);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].details["rows"], "3");
        assert_eq!(batch[0].details["result_id"], result.id);
        assert_eq!(spool.unacked(), 2);
        spool.ack(std::slice::from_ref(&cmd.id));
        assert_eq!(
            spool.unacked(),
            0,
            "the result is acknowledged with its command"
        );

        // A result whose command went out earlier travels alone.
        let mut late = event(4);
        late.kind = AuditKind::CommandResult;
        late.details.insert("command_id".into(), event(3).id);
        spool.append(event(3)).unwrap();
        assert_eq!(take(&spool).len(), 1);
        spool.append(late).unwrap();
        let batch = take(&spool);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].details["command_id"], event(3).id);
    }

    #[test]
    fn batches_of_recordings_stay_under_a_megabyte() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        for i in 0..100 {
            let mut e = event(i);
            e.kind = AuditKind::Output;
            e.details.insert("asciicast".into(), "x".repeat(32 * 1024));
            spool.append(e).unwrap();
        }
        // One event bigger than a batch still goes, alone.
        let mut big = event(100);
        big.details.insert("asciicast".into(), "y".repeat(3 << 20));
        spool.append(big).unwrap();
        let mut sizes = Vec::new();
        loop {
            let batch = take(&spool);
            if batch.is_empty() {
                break;
            }
            let bytes: usize = batch
                .iter()
                .map(|e| e.details.values().map(String::len).sum::<usize>())
                .sum();
            assert!(
                batch.len() == 1 || bytes <= 1 << 20,
                "{} events, {bytes} bytes",
                batch.len()
            );
            sizes.push(batch.len());
            let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
            spool.ack(&ids);
        }
        assert_eq!(sizes.iter().sum::<usize>(), 101);
        assert!(sizes.len() >= 4, "{sizes:?}");
        assert_eq!(sizes.last(), Some(&1));
    }

    #[test]
    fn large_events_past_the_memory_budget_wait_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        for i in 0..700 {
            let mut e = event(i);
            e.details.insert("asciicast".into(), "z".repeat(32 * 1024));
            spool.append(e).unwrap();
        }
        {
            let g = spool.inner.lock().unwrap();
            assert!(g.memory_bytes <= MEMORY_BYTES, "{}", g.memory_bytes);
            assert!(g.pending.iter().any(|e| e.held.is_none()));
        }
        let ids = drain(&spool);
        assert_eq!(ids, (0..700).map(|i| event(i).id).collect::<Vec<_>>());
        assert_eq!(spool.inner.lock().unwrap().memory_bytes, 0);
    }

    #[test]
    fn a_backlog_past_memory_is_read_back_from_disk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let n = MEMORY_EVENTS * 2 + 17;
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        for i in 0..n {
            spool.append(event(i)).unwrap();
        }
        {
            let g = spool.inner.lock().unwrap();
            let in_memory = g.pending.iter().filter(|e| e.held.is_some()).count();
            assert_eq!(
                in_memory, MEMORY_EVENTS,
                "only the first part stays in memory"
            );
        }
        let ids = drain(&spool);
        assert_eq!(ids, (0..n).map(|i| event(i).id).collect::<Vec<_>>());
        assert_eq!(spool.unacked(), 0);
        // The drained backlog's memory is given back, and an entry whose
        // event waits on disk is small.
        let g = spool.inner.lock().unwrap();
        assert!(g.pending.capacity() <= 4 * 1024, "{}", g.pending.capacity());
        assert!(
            g.inflight.capacity() <= 4 * 1024,
            "{}",
            g.inflight.capacity()
        );
        assert!(
            std::mem::size_of::<Entry>() <= 64,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn events_in_flight_are_resent_whole_from_disk_after_a_disconnect() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let mut sent = Vec::new();
        for i in 0..3 {
            let mut e = event(i);
            e.command = Some(wicket_core::Command {
                text: format!("SELECT {i}"),
                ..Default::default()
            });
            sent.push(v1::AuditEvent::from(&e));
            spool.append(e).unwrap();
        }
        assert_eq!(take(&spool), sent);
        assert_eq!(spool.inner.lock().unwrap().memory_bytes, 0);
        spool.requeue_inflight();
        assert_eq!(
            take(&spool),
            sent,
            "the resend is the same events, read back"
        );
        spool.ack(&sent.iter().map(|e| e.id.clone()).collect::<Vec<_>>());
        assert_eq!(spool.unacked(), 0);
    }

    #[test]
    fn a_rejected_event_is_kept_with_the_reason_and_leaves_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let mut e = event(7);
        e.command = Some(wicket_core::Command {
            text: "DROP TABLE t".into(),
            ..Default::default()
        });
        spool.append(e).unwrap();
        spool.append(event(8)).unwrap();
        assert_eq!(take(&spool).len(), 2);
        spool.reject(&[v1::RejectedEvent {
            id: "ev-000007".into(),
            reason: "unknown connection".into(),
        }]);
        spool.ack(&["ev-000008".to_string()]);
        assert_eq!(spool.unacked(), 0);
        let kept = std::fs::read_to_string(dir.path().join("rejected.jsonl")).unwrap();
        let line: serde_json::Value = serde_json::from_str(kept.trim()).unwrap();
        assert_eq!(line["reason"], "unknown connection");
        assert_eq!(line["event"]["id"], "ev-000007");
        assert_eq!(line["event"]["command"]["text"], "DROP TABLE t");
    }

    #[test]
    fn a_segment_of_the_json_lines_format_is_converted_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = String::new();
        for i in 0..3 {
            old.push_str(&serde_json::to_string(&event(i)).unwrap());
            old.push('\n');
        }
        // The same event twice (a replay) and a torn last line.
        old.push_str(&serde_json::to_string(&event(1)).unwrap());
        old.push_str("\n{\"id\":\"ev-torn");
        let legacy = dir.path().join("audit-000000000004.jsonl");
        std::fs::write(&legacy, old).unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert!(
            !legacy.exists(),
            "the old segment is removed once converted"
        );
        assert_eq!(spool.unacked(), 3);
        drop(spool);
        // Converted durably: a second open finds them in the new format.
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(
            drain(&spool),
            (0..3).map(|i| event(i).id).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_torn_last_record_is_skipped_and_the_rest_replayed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 30).unwrap();
            for i in 0..3 {
                spool.append(event(i)).unwrap();
            }
            spool.sync();
        }
        let seg = segments_in(dir.path(), ".pb").unwrap().remove(0).1;
        let mut data = std::fs::read(&seg).unwrap();
        // A crash halfway through writing a fourth record.
        let mut torn = Vec::new();
        report::encode_event(event(3), &mut torn);
        data.extend_from_slice(&(torn.len() as u32).to_le_bytes());
        data.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(&seg, data).unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(
            drain(&spool),
            (0..3).map(|i| event(i).id).collect::<Vec<_>>()
        );
        // New events go to a new segment, after the damaged one.
        spool.append(event(5)).unwrap();
        assert_eq!(drain(&spool), vec![event(5).id]);
    }

    #[test]
    fn a_failed_write_loses_nothing_already_spooled_and_the_next_append_works() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        // The next segment is a device that is always full.
        std::os::unix::fs::symlink("/dev/full", dir.path().join("audit-000000000000.pb")).unwrap();
        assert!(matches!(spool.append(event(1)), Err(SpoolError::Io(_))));
        assert_eq!(spool.unacked(), 0, "a refused event is not queued");
        spool.append(event(2)).unwrap();
        assert!(
            !dir.path().join("audit-000000000000.pb").exists(),
            "the failed segment, holding nothing, is gone"
        );
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(drain(&spool), vec![event(2).id]);
    }

    #[test]
    fn a_reopened_spool_replays_everything_unacknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let n = MEMORY_EVENTS + 500;
        {
            let spool = Spool::open(dir.path(), 1 << 30).unwrap();
            for i in 0..n {
                spool.append(event(i)).unwrap();
            }
            // Half goes out and is acknowledged before the "crash".
            let first = take(&spool);
            spool.ack(&first.iter().map(|e| e.id.clone()).collect::<Vec<_>>());
        }
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let ids = drain(&spool);
        // Acked events are not resent (the segment still holds them, but
        // a replay of the whole segment is idempotent by id).
        assert!(ids.len() >= n - BATCH);
        assert_eq!(ids.last(), Some(&event(n - 1).id));
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }
}
