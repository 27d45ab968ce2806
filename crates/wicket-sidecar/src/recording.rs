//! Terminal recordings in asciicast v2: a header, then `[time, "o", text]`
//! (output), `[time, "i", text]` (input) and `[time, "r", "COLSxROWS"]`
//! (resize) events, one JSON array per line.
//!
//! Output is masked by the connection's detectors before it is recorded. A
//! value can arrive split over two chunks, so output is held until a line
//! ends (or input arrives, or the output pauses), and a private key block
//! is held until its END line: masking always sees whole lines. Input is
//! masked the same way, and answers to password prompts are not recorded.
//!
//! The recorder emits batches of event lines; the caller stores them as
//! `output` audit events (`details.asciicast`), from which `wicket sessions
//! recording` writes the `.cast` file.

use std::time::Instant;

use wicket_mask::{Counts, Masker};

/// Output held longer than this is masked and recorded without waiting for
/// its line to end.
const HOLD_BYTES: usize = 64 * 1024;
/// A batch is handed over once it holds this many bytes…
const BATCH_BYTES: usize = 32 * 1024;
/// …or once its first line is this old.
const BATCH_AGE: std::time::Duration = std::time::Duration::from_secs(2);

/// Most of a non-terminal command's output that is recorded (file copies
/// and bulk output are audited with byte counts beyond it).
pub const CAPTURE_LIMIT: u64 = 1 << 20;

/// Records one terminal channel.
pub struct Recorder {
    started: Instant,
    masker: Option<std::sync::Arc<Masker>>,
    /// Output not yet recorded, and when its first byte arrived.
    held: Vec<u8>,
    held_at: Option<Instant>,
    /// Input not yet recorded (recorded at the next Enter or output).
    input: Vec<u8>,
    input_at: Option<Instant>,
    batch: String,
    batch_at: Option<Instant>,
    /// Values masked so far.
    pub counts: Counts,
    /// Output bytes seen.
    pub output_bytes: u64,
    finishing: bool,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("held", &self.held.len())
            .field("batch", &self.batch.len())
            .finish()
    }
}

/// The asciicast v2 header line.
pub fn header(cols: u32, rows: u32, term: &str, command: Option<&str>) -> String {
    let mut h = serde_json::json!({
        "version": 2,
        "width": cols.max(1),
        "height": rows.max(1),
        "timestamp": chrono::Utc::now().timestamp(),
        "env": {"TERM": term},
    });
    if let Some(c) = command {
        h["command"] = serde_json::Value::String(c.to_string());
    }
    h.to_string()
}

impl Recorder {
    /// A recorder whose time starts now; `masker` masks what is recorded.
    pub fn new(masker: Option<std::sync::Arc<Masker>>) -> Recorder {
        Recorder {
            started: Instant::now(),
            masker,
            held: Vec::new(),
            held_at: None,
            input: Vec::new(),
            input_at: None,
            batch: String::new(),
            batch_at: None,
            counts: Counts::default(),
            output_bytes: 0,
            finishing: false,
        }
    }

    /// Output from the host.
    pub fn output(&mut self, data: &[u8]) {
        self.flush_input();
        self.output_bytes += data.len() as u64;
        if self.held.is_empty() {
            self.held_at = Some(Instant::now());
        }
        self.held.extend_from_slice(data);
        self.release(false);
    }

    /// Input from the client (`secret`: an answer to a password prompt).
    pub fn input(&mut self, data: &[u8], secret: bool) {
        self.release(true);
        if secret {
            return;
        }
        if self.input.is_empty() {
            self.input_at = Some(Instant::now());
        }
        self.input.extend_from_slice(data);
        if data.contains(&b'\r') || data.contains(&b'\n') || self.input.len() > 4096 {
            self.flush_input();
        }
    }

    /// A terminal resize.
    pub fn resize(&mut self, cols: u32, rows: u32) {
        self.release(true);
        self.flush_input();
        let t = self.started.elapsed().as_secs_f64();
        self.push_event(t, "r", &format!("{cols}x{rows}"));
    }

    /// Records held output that has waited `max_wait` or more.
    pub fn tick(&mut self, max_wait: std::time::Duration) {
        if self.held_at.is_some_and(|t| t.elapsed() >= max_wait) {
            self.release(true);
        }
        if self.input_at.is_some_and(|t| t.elapsed() >= max_wait) {
            self.flush_input();
        }
    }

    /// Records everything held.
    pub fn finish(&mut self) {
        self.finishing = true;
        self.release(true);
        self.flush_input();
    }

    /// The recorded event lines so far, if a batch is due: it is large, or
    /// its first line waited [`BATCH_AGE`] (so an idle session's recording
    /// reaches the spool too), or `force`. Callers ask after every piece of
    /// output, so a batch stays near [`BATCH_BYTES`] however fast the
    /// output comes.
    pub fn take_batch(&mut self, force: bool) -> Option<String> {
        let old = self.batch_at.is_some_and(|t| t.elapsed() >= BATCH_AGE);
        if self.batch.is_empty() || !force && !old && self.batch.len() < BATCH_BYTES {
            return None;
        }
        self.batch_at = None;
        Some(std::mem::take(&mut self.batch))
    }

    fn flush_input(&mut self) {
        if self.input.is_empty() {
            return;
        }
        let at = self.input_at.take().unwrap_or(self.started);
        let data = std::mem::take(&mut self.input);
        let text = self.masked(&data);
        let t = at.duration_since(self.started).as_secs_f64();
        self.push_event(t, "i", &text);
    }

    /// Records the held output up to the last complete line (all of it
    /// when `all`), keeping an open private key block whole.
    fn release(&mut self, all: bool) {
        if self.held.is_empty() {
            return;
        }
        let mut cut = if all || self.held.len() > HOLD_BYTES {
            self.held.len()
        } else {
            match self.held.iter().rposition(|&b| b == b'\n') {
                Some(p) => p + 1,
                None => return,
            }
        };
        if self.held.len() <= HOLD_BYTES
            && let Some(begin) = find(&self.held[..cut], b"-----BEGIN ")
            && find(&self.held[begin..cut], b"-----END ").is_none()
        {
            if !all {
                return;
            }
            cut = self.held.len();
        }
        // Never cut inside a UTF-8 sequence (the rest of it is on its way).
        if cut == self.held.len() && !self.finishing {
            cut = utf8_complete(&self.held);
        }
        if cut == 0 {
            return;
        }
        let rest = self.held.split_off(cut);
        let data = std::mem::replace(&mut self.held, rest);
        let at = self.held_at.unwrap_or(self.started);
        self.held_at = if self.held.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        let text = self.masked(&data);
        let t = at.duration_since(self.started).as_secs_f64();
        self.push_event(t, "o", &text);
    }

    fn masked(&mut self, data: &[u8]) -> String {
        let text = String::from_utf8_lossy(data);
        match &self.masker {
            Some(m) => {
                let (masked, counts) = m.mask(&text);
                self.counts.add(&counts);
                masked.into_owned()
            }
            None => text.into_owned(),
        }
    }

    fn push_event(&mut self, t: f64, code: &str, data: &str) {
        let line = serde_json::json!([(t * 1e6).round() / 1e6, code, data]).to_string();
        if self.batch.is_empty() {
            self.batch_at = Some(Instant::now());
        }
        self.batch.push_str(&line);
        self.batch.push('\n');
    }
}

/// The length of the longest prefix of `b` that ends on a character boundary.
fn utf8_complete(b: &[u8]) -> usize {
    let n = b.len();
    for back in 1..=3.min(n) {
        let c = b[n - back];
        if c & 0xc0 == 0x80 {
            continue;
        }
        let need = match c {
            c if c >= 0xf0 => 4,
            c if c >= 0xe0 => 3,
            c if c >= 0xc0 => 2,
            _ => 1,
        };
        return if need > back { n - back } else { n };
    }
    n
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker() -> Option<std::sync::Arc<Masker>> {
        Some(std::sync::Arc::new(
            Masker::builder()
                .all(wicket_mask::Style::Redact)
                .build()
                .unwrap(),
        ))
    }

    fn events(batch: &str) -> Vec<serde_json::Value> {
        batch
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn a_value_split_over_chunks_is_still_masked() {
        let mut r = Recorder::new(masker());
        r.output(b"user: ada@exa");
        r.output(b"mple.com\r\nnext ");
        r.finish();
        let evs = events(&r.take_batch(true).unwrap());
        let text: String = evs.iter().map(|e| e[2].as_str().unwrap()).collect();
        assert!(!text.contains("ada@example.com"), "{text}");
        assert!(text.contains("[redacted:email]"), "{text}");
        assert!(text.ends_with("next "));
        assert_eq!(r.counts.get("email"), 1);
    }

    #[test]
    fn a_private_key_block_is_held_until_its_end() {
        let mut r = Recorder::new(masker());
        r.output(
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n",
        );
        assert!(r.take_batch(true).is_none(), "held");
        r.output(b"AAAAAAABAAAAMwAAAAtzc2gtZWQyNTUxOQ\n-----END OPENSSH PRIVATE KEY-----\n");
        let text = r.take_batch(true).unwrap();
        assert!(!text.contains("b3BlbnNzaC1rZXkt"), "{text}");
    }

    #[test]
    fn events_are_in_time_order_with_input_and_resizes() {
        let mut r = Recorder::new(None);
        r.output(b"$ ");
        r.input(b"ls\r", false);
        r.output(b"a b\r\n");
        r.resize(100, 40);
        r.input(b"hunter2\r", true);
        r.finish();
        let evs = events(&r.take_batch(true).unwrap());
        let codes: Vec<&str> = evs.iter().map(|e| e[1].as_str().unwrap()).collect();
        assert_eq!(codes, ["o", "i", "o", "r"]);
        assert_eq!(evs[3][2], "100x40");
        let times: Vec<f64> = evs.iter().map(|e| e[0].as_f64().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    }

    #[test]
    fn small_batches_are_handed_over_once_they_are_old() {
        let mut r = Recorder::new(None);
        r.output(b"one line\n");
        assert!(r.take_batch(false).is_none(), "small and fresh");
        r.batch_at = Some(Instant::now() - BATCH_AGE);
        assert!(r.take_batch(false).unwrap().contains("one line"));
        assert!(r.take_batch(false).is_none());
    }

    #[test]
    fn a_multibyte_character_is_never_split() {
        let mut r = Recorder::new(None);
        let s = "é".repeat(HOLD_BYTES);
        let (a, b) = s.as_bytes().split_at(HOLD_BYTES + 1);
        r.output(a);
        r.tick(std::time::Duration::ZERO);
        r.output(b);
        r.finish();
        let text: String = events(&r.take_batch(true).unwrap())
            .iter()
            .map(|e| e[2].as_str().unwrap().to_string())
            .collect();
        assert_eq!(text, s);
    }
}
