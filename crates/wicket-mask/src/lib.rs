//! Wicket's masking engine.
//!
//! A [`Masker`] finds personal data and secrets in text and replaces them.
//! The built-in detectors ([`Entity`]: e-mail, payment card, US SSN, IBAN,
//! phone, IPv4, IPv6, JWT, cloud access keys, PEM private keys) run together
//! in one pass over the bytes and validate what they find (Luhn, SSN ranges,
//! mod 97, address parsers). Custom detectors are regular expressions from
//! policy, prefiltered with one `RegexSet` pass.
//!
//! Each detector has a [`Style`]: full redaction (`[redacted:email]`),
//! partial (`****1234`, `j***@example.com`, a secret's first four
//! characters), or a keyed hash (`hmac:…`, HMAC-SHA-256 under the masker's
//! key, so a masked value still joins and groups). [`Counts`] says how many
//! values of each detector were masked, for the audit record.
//!
//! ```
//! use wicket_mask::{Masker, Style};
//! let m = Masker::builder().all(Style::Partial).build().unwrap();
//! let (out, counts) = m.mask("card 4111 1111 1111 1111, mail ann@example.com");
//! assert_eq!(out, "card ****1111, mail a***@example.com");
//! assert_eq!(counts.get("card"), 1);
//! ```

mod detect;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::str::FromStr;

use aws_lc_rs::hmac;

pub use detect::Entity;

/// How a detected value is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Style {
    /// `[redacted:<detector>]`.
    #[default]
    Redact,
    /// Keeps a hint: the last four letters or digits (`****1234`), an
    /// e-mail's first character and domain, a secret's first four characters.
    Partial,
    /// `hmac:` and 16 hex digits of HMAC-SHA-256 over the detector name and
    /// the value: equal values mask equally, so joins and groups still work.
    Hash,
}

impl FromStr for Style {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redact" | "full" => Ok(Style::Redact),
            "partial" => Ok(Style::Partial),
            "hash" => Ok(Style::Hash),
            _ => Err(format!(
                "unknown masking style `{s}` (known: redact, partial, hash)"
            )),
        }
    }
}

/// A masker could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// A custom detector's pattern does not compile.
    #[error("custom detector `{name}`: {error}")]
    Pattern {
        /// The detector.
        name: String,
        /// Why.
        error: String,
    },
    /// Two detectors share a name.
    #[error("detector `{0}` is defined twice")]
    Duplicate(String),
}

enum Kind {
    Builtin(Entity),
    Custom(regex::Regex),
}

struct Detector {
    name: String,
    style: Style,
    kind: Kind,
}

/// Builds a [`Masker`].
#[derive(Default)]
pub struct MaskerBuilder {
    builtin: Vec<(Entity, Style)>,
    custom: Vec<(String, String, Style)>,
    key: Option<Vec<u8>>,
}

impl MaskerBuilder {
    /// Every built-in detector, in `style`.
    pub fn all(mut self, style: Style) -> Self {
        for e in Entity::ALL {
            self = self.detector(e, style);
        }
        self
    }

    /// One built-in detector (again: its style changes).
    pub fn detector(mut self, entity: Entity, style: Style) -> Self {
        match self.builtin.iter_mut().find(|(e, _)| *e == entity) {
            Some(d) => d.1 = style,
            None => self.builtin.push((entity, style)),
        }
        self
    }

    /// A custom detector: every match of `pattern` (Rust `regex` syntax) is a value.
    pub fn custom(mut self, name: &str, pattern: &str, style: Style) -> Self {
        self.custom
            .push((name.to_string(), pattern.to_string(), style));
        self
    }

    /// The key of [`Style::Hash`]. Without one, a random key is drawn: hashes
    /// then agree within this masker only.
    pub fn hash_key(mut self, key: &[u8]) -> Self {
        self.key = Some(key.to_vec());
        self
    }

    /// Compiles the detectors.
    pub fn build(self) -> Result<Masker, MaskError> {
        let mut detectors = Vec::new();
        let mut builtin = [usize::MAX; Entity::ALL.len()];
        let mut enabled = [false; Entity::ALL.len()];
        for (e, style) in self.builtin {
            builtin[e.index()] = detectors.len();
            enabled[e.index()] = true;
            detectors.push(Detector {
                name: e.as_str().to_string(),
                style,
                kind: Kind::Builtin(e),
            });
        }
        let mut patterns = Vec::new();
        let mut custom = Vec::new();
        for (name, pattern, style) in self.custom {
            if detectors.iter().any(|d| d.name == name) {
                return Err(MaskError::Duplicate(name));
            }
            let re = regex::Regex::new(&pattern).map_err(|e| MaskError::Pattern {
                name: name.clone(),
                error: e.to_string(),
            })?;
            custom.push(detectors.len());
            patterns.push(pattern);
            detectors.push(Detector {
                name,
                style,
                kind: Kind::Custom(re),
            });
        }
        let set = if patterns.is_empty() {
            None
        } else {
            Some(
                regex::RegexSet::new(&patterns).map_err(|e| MaskError::Pattern {
                    name: "(set)".into(),
                    error: e.to_string(),
                })?,
            )
        };
        let key_bytes = match self.key {
            Some(k) => k,
            None => {
                let mut k = vec![0u8; 32];
                aws_lc_rs::rand::fill(&mut k).expect("the system random source works");
                k
            }
        };
        Ok(Masker {
            names: detectors.iter().map(|d| d.name.clone()).collect(),
            detectors,
            builtin,
            enabled: detect::Enabled::new(enabled),
            set,
            custom,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key_bytes),
        })
    }
}

/// How many values each detector masked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    by_detector: Vec<u64>,
    names: std::sync::Arc<[String]>,
}

impl Counts {
    /// Values masked by the detector called `name`.
    pub fn get(&self, name: &str) -> u64 {
        self.names
            .iter()
            .position(|n| n == name)
            .and_then(|i| self.by_detector.get(i).copied())
            .unwrap_or(0)
    }

    /// Values masked in all.
    pub fn total(&self) -> u64 {
        self.by_detector.iter().sum()
    }

    /// `(detector, count)` for every detector that masked something.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.names
            .iter()
            .zip(&self.by_detector)
            .filter(|(_, c)| **c > 0)
            .map(|(n, c)| (n.as_str(), *c))
    }

    /// Adds `other`'s counts (from the same masker).
    pub fn add(&mut self, other: &Counts) {
        if self.names.is_empty() {
            *self = other.clone();
            return;
        }
        for (a, b) in self.by_detector.iter_mut().zip(&other.by_detector) {
            *a += b;
        }
    }

    fn bump(&mut self, m: &Masker, detector: usize) {
        if self.names.is_empty() {
            self.names = m.names.clone();
            self.by_detector = vec![0; m.detectors.len()];
        }
        self.by_detector[detector] += 1;
    }
}

/// A detected value: the detector (index into the masker's detectors) and its byte span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// Index of the detector.
    pub detector: usize,
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// Bytes before a replacement scanned again: longer than any value whose
/// end a neighbour decides (an e-mail address is at most 64 + 1 + 255 bytes).
const LOOKBACK: usize = 330;

/// Compiled detectors and styles. Cheap to share (`Arc`); `Send + Sync`.
pub struct Masker {
    detectors: Vec<Detector>,
    names: std::sync::Arc<[String]>,
    builtin: [usize; Entity::ALL.len()],
    enabled: detect::Enabled,
    set: Option<regex::RegexSet>,
    custom: Vec<usize>,
    key: hmac::Key,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field(
                "detectors",
                &self.detectors.iter().map(|d| &d.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Masker {
    /// A builder with no detector.
    pub fn builder() -> MaskerBuilder {
        MaskerBuilder::default()
    }

    /// The name of detector `i`.
    pub fn detector_name(&self, i: usize) -> &str {
        &self.detectors[i].name
    }

    /// Every value in `text`, in order, without overlaps (overlapping
    /// findings are merged into one span, named after the longer one).
    pub fn find(&self, text: &str) -> Vec<Finding> {
        let mut raw = Vec::new();
        detect::scan(text, &self.enabled, &mut raw);
        let mut found: Vec<Finding> = raw
            .into_iter()
            .map(|(e, start, end)| Finding {
                detector: self.builtin[e.index()],
                start,
                end,
            })
            .collect();
        if let Some(set) = &self.set {
            let hits = set.matches(text);
            for k in hits.iter() {
                let d = self.custom[k];
                if let Kind::Custom(re) = &self.detectors[d].kind {
                    for m in re.find_iter(text).filter(|m| !m.is_empty()) {
                        found.push(Finding {
                            detector: d,
                            start: m.start(),
                            end: m.end(),
                        });
                    }
                }
            }
        }
        // An e-mail is found at its `@`, after what its local part holds.
        if found.len() > 1 {
            found.sort_by_key(|f| (f.start, std::cmp::Reverse(f.end)));
        }
        merge(found)
    }

    /// Masks every detected value in `text`.
    pub fn mask<'a>(&self, text: &'a str) -> (Cow<'a, str>, Counts) {
        let mut counts = Counts::default();
        let found = self.find(text);
        if found.is_empty() {
            return (Cow::Borrowed(text), counts);
        }
        let (mut out, mut spans) = self.replace_all(text, &found, &mut counts);
        // A replacement changes what the text before it is followed by: a
        // number glued by a dash to a card number is no SSN, but followed by
        // `-[redacted:card]` it is. So the few bytes before each replacement
        // are scanned again (what follows a replacement is already judged
        // as if it stood alone), until nothing more is found: the output
        // holds nothing a detector would find.
        for _ in 0..4 {
            let mut more = Vec::new();
            let mut prev_end = 0;
            for &(start, end) in &spans {
                // Only a value ending right before it, or before a character
                // some detector reads on (not a space after a word, a quote,
                // a bracket or a comma), can have been judged by what was there.
                let b = out.as_bytes();
                let glued = start >= 1
                    && match b[start - 1] {
                        b' ' => {
                            start >= 2
                                && !b[start - 2].is_ascii_alphabetic()
                                && !b[start - 2].is_ascii_whitespace()
                        }
                        b'\t' | b'\n' | b'\r' | b'"' | b'\'' | b'[' | b'{' | b'<' | b'>' | b'='
                        | b',' | b';' | b'|' => false,
                        _ => true,
                    };
                if !glued {
                    prev_end = end;
                    continue;
                }
                let mut from = start.saturating_sub(LOOKBACK).max(prev_end);
                while !out.is_char_boundary(from) {
                    from += 1;
                }
                for f in self.find(&out[from..start]) {
                    more.push(Finding {
                        detector: f.detector,
                        start: from + f.start,
                        end: from + f.end,
                    });
                }
                prev_end = end;
            }
            if more.is_empty() {
                break;
            }
            let (again, new_spans) = self.replace_all(&out, &more, &mut counts);
            // Old spans move by what the new replacements added before them.
            let mut moved = Vec::with_capacity(spans.len() + new_spans.len());
            let mut shift: isize = 0;
            let mut k = 0;
            for &(start, end) in &spans {
                while k < more.len() && more[k].end <= start {
                    let (ns, ne) = new_spans[k];
                    shift += (ne - ns) as isize - (more[k].end - more[k].start) as isize;
                    moved.push((ns, ne));
                    k += 1;
                }
                moved.push((
                    (start as isize + shift) as usize,
                    (end as isize + shift) as usize,
                ));
            }
            moved.extend_from_slice(&new_spans[k..]);
            out = again;
            spans = moved;
        }
        (Cow::Owned(out), counts)
    }

    /// `text` with `found` replaced; the spans of the replacements in the result.
    fn replace_all(
        &self,
        text: &str,
        found: &[Finding],
        counts: &mut Counts,
    ) -> (String, Vec<(usize, usize)>) {
        let mut out = String::with_capacity(text.len() + 16);
        let mut spans = Vec::with_capacity(found.len());
        let mut at = 0;
        for f in found {
            out.push_str(&text[at..f.start]);
            let d = &self.detectors[f.detector];
            let start = out.len();
            self.replace_into(&mut out, d, &text[f.start..f.end]);
            spans.push((start, out.len()));
            counts.bump(self, f.detector);
            at = f.end;
        }
        out.push_str(&text[at..]);
        (out, spans)
    }

    /// The whole of `value` masked as detector `name` would mask it, in
    /// `style` (for column rules, where the column, not the content, says
    /// what the value is).
    pub fn mask_whole(&self, value: &str, label: &str, style: Style) -> String {
        let mut out = String::new();
        let entity = Entity::from_str(label).ok();
        write_replacement(&mut out, &self.key, label, entity, style, value);
        out
    }

    fn replace_into(&self, out: &mut String, d: &Detector, value: &str) {
        let entity = match d.kind {
            Kind::Builtin(e) => Some(e),
            Kind::Custom(_) => None,
        };
        write_replacement(out, &self.key, &d.name, entity, d.style, value);
    }
}

fn write_replacement(
    out: &mut String,
    key: &hmac::Key,
    name: &str,
    entity: Option<Entity>,
    style: Style,
    value: &str,
) {
    match style {
        Style::Redact => {
            let _ = write!(out, "[redacted:{name}]");
        }
        Style::Hash => {
            let mut ctx = hmac::Context::with_key(key);
            ctx.update(name.as_bytes());
            ctx.update(&[0]);
            ctx.update(value.as_bytes());
            let tag = ctx.sign();
            out.push_str("hmac:");
            for b in &tag.as_ref()[..8] {
                let _ = write!(out, "{b:02x}");
            }
        }
        Style::Partial => partial(out, entity, value),
    }
}

fn partial(out: &mut String, entity: Option<Entity>, value: &str) {
    let alnum: Vec<char> = value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    match entity {
        Some(Entity::Email) => {
            if let Some((local, domain)) = value.split_once('@') {
                out.extend(local.chars().next());
                out.push_str("***@");
                out.push_str(domain);
                return;
            }
            out.push_str("****");
        }
        Some(e) if e.is_secret() => {
            out.extend(value.chars().take(4).filter(|c| c.is_ascii_alphanumeric()));
            out.push_str("****");
        }
        _ if alnum.len() > 8 => {
            out.push_str("****");
            out.extend(&alnum[alnum.len() - 4..]);
        }
        _ => out.push_str("****"),
    }
}

/// Sorted findings without overlaps: an overlap becomes one span covering
/// both, named after the longer finding (masking more, never less).
fn merge(found: Vec<Finding>) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::with_capacity(found.len());
    for f in found {
        match out.last_mut() {
            Some(last) if f.start < last.end => {
                if f.end - f.start > last.end - last.start {
                    last.detector = f.detector;
                }
                last.end = last.end.max(f.end);
            }
            _ => out.push(f),
        }
    }
    out
}

#[cfg(test)]
mod tests;
