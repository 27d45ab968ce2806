//! Tamper evidence for the audit trail.
//!
//! - Each session's events form a **hash chain**: event `i` (numbered from 1
//!   in the order the control service stored them) is stored with
//!   `H_i = SHA-256("wicket-audit-event-v1\0" ‖ H_{i-1} ‖ i ‖ body)`, where
//!   `body` is the event exactly as stored and `H_0` is all zeros.
//! - When a session ends, the control service **seals** it: it signs the
//!   chain's length and head with its Ed25519 audit key ([`seal_message`]).
//! - Every day (by default) it signs a **root**: a Merkle tree (RFC 6962
//!   shape) over `(session, length, head)` of every session whose chain grew
//!   since the previous root, chained to the previous root
//!   ([`root_message`]). A root therefore proves the sessions it names up to
//!   their length then, including sessions not yet ended, and a removed
//!   session or root shows as a gap.
//!
//! [`ChainVerifier`] checks one session's stored events against its seal
//! and the roots that name it, and names the first changed, removed or
//! reordered event. Whoever can write to the database can recompute the
//! unkeyed hashes, but not the signatures: a chain that is consistent but
//! does not end in the signed head is reported too.

use aws_lc_rs::digest::{Context, SHA256};
use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// The hash before a session's first event.
pub const GENESIS: Hash = [0; 32];

fn finish(ctx: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn put_str(ctx: &mut Context, s: &str) {
    ctx.update(&(s.len() as u64).to_be_bytes());
    ctx.update(s.as_bytes());
}

/// The chain hash of event `index` (from 1) with stored `body`, after `prev`.
pub fn link(prev: &Hash, index: u64, body: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"wicket-audit-event-v1\0");
    ctx.update(prev);
    ctx.update(&index.to_be_bytes());
    ctx.update(body);
    finish(ctx)
}

/// What a session seal signs: the session, its chain length and head, and
/// when it was sealed (milliseconds since the epoch).
pub fn seal_message(session_id: &str, len: u64, head: &Hash, sealed_at_ms: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(96 + session_id.len());
    m.extend_from_slice(b"wicket-audit-seal-v1\0");
    m.extend_from_slice(&(session_id.len() as u64).to_be_bytes());
    m.extend_from_slice(session_id.as_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(head);
    m.extend_from_slice(&sealed_at_ms.to_be_bytes());
    m
}

/// A root's leaf: one session's chain length and head.
pub fn leaf_hash(session_id: &str, len: u64, head: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0]);
    put_str(&mut ctx, session_id);
    ctx.update(&len.to_be_bytes());
    ctx.update(head);
    finish(ctx)
}

/// The Merkle tree hash of `leaves` (RFC 6962 §2.1: the left subtree holds
/// the largest power of two below the count; inner nodes are prefixed 1).
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => finish(Context::new(&SHA256)),
        1 => leaves[0],
        n => {
            // The largest power of two below n.
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            let mut ctx = Context::new(&SHA256);
            ctx.update(&[1]);
            ctx.update(&merkle_root(&leaves[..k]));
            ctx.update(&merkle_root(&leaves[k..]));
            finish(ctx)
        }
    }
}

/// What a root signs: its number, when it was made, the previous root's
/// [`root_id`], the Merkle root and the number of leaves.
pub fn root_message(
    seq: u64,
    created_at_ms: i64,
    prev: &Hash,
    root: &Hash,
    leaves: u64,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(128);
    m.extend_from_slice(b"wicket-audit-root-v1\0");
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&created_at_ms.to_be_bytes());
    m.extend_from_slice(prev);
    m.extend_from_slice(root);
    m.extend_from_slice(&leaves.to_be_bytes());
    m
}

/// A root's identity, which the next root chains to: SHA-256 of its
/// signed message.
pub fn root_id(message: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(message);
    finish(ctx)
}

/// A short id of a public key: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(public_key: &[u8]) -> String {
    let mut ctx = Context::new(&SHA256);
    ctx.update(public_key);
    finish(ctx)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `signature` is `public_key`'s Ed25519 signature of `message`.
pub fn signature_ok(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

/// Copies a stored hash into a [`Hash`]; `None` when it is not 32 bytes.
pub fn hash_from(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

/// One stored event as the chain holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainedEvent {
    /// Position in the session's chain, from 1.
    pub index: u64,
    /// The event's id.
    pub id: String,
    /// The event exactly as stored.
    pub body: String,
    /// The stored chain hash.
    pub hash: Hash,
}

/// A session's seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    /// Chain length sealed.
    pub len: u64,
    /// Chain head sealed.
    pub head: Hash,
    /// When, in milliseconds since the epoch.
    pub sealed_at_ms: i64,
    /// Ed25519 signature of [`seal_message`].
    pub signature: Vec<u8>,
    /// [`key_id`] of the signing key.
    pub key_id: String,
}

/// A signed root over the sessions whose chains grew since the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// Number, from 1, without gaps.
    pub seq: u64,
    /// When it was made, in milliseconds since the epoch.
    pub created_at_ms: i64,
    /// The previous root's [`root_id`] ([`GENESIS`] for the first).
    pub prev: Hash,
    /// The Merkle root over its leaves, sorted by session id.
    pub root: Hash,
    /// How many leaves.
    pub leaves: u64,
    /// Ed25519 signature of [`root_message`].
    pub signature: Vec<u8>,
    /// [`key_id`] of the signing key.
    pub key_id: String,
}

impl Root {
    /// The message this root signs.
    pub fn message(&self) -> Vec<u8> {
        root_message(
            self.seq,
            self.created_at_ms,
            &self.prev,
            &self.root,
            self.leaves,
        )
    }

    /// Whether the signature verifies with `public_key` and `leaves`
    /// (sorted by session id) hash to the root. Returns what is wrong.
    pub fn check(&self, public_key: &[u8], leaves: &[Leaf]) -> Result<(), String> {
        if self.key_id != key_id(public_key)
            || !signature_ok(public_key, &self.message(), &self.signature)
        {
            return Err(format!(
                "root #{} does not verify with the audit key",
                self.seq
            ));
        }
        if leaves.len() as u64 != self.leaves {
            return Err(format!(
                "root #{} names {} sessions but {} are stored: its list was changed",
                self.seq,
                self.leaves,
                leaves.len()
            ));
        }
        let hashes: Vec<Hash> = leaves.iter().map(Leaf::hash).collect();
        if merkle_root(&hashes) != self.root {
            return Err(format!(
                "root #{}'s stored list of sessions does not hash to the signed root: it was changed",
                self.seq
            ));
        }
        Ok(())
    }
}

/// A signed record that a session was deleted on purpose (retention):
/// what its chain was, when, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    /// The session.
    pub session_id: String,
    /// Its chain length when deleted.
    pub len: u64,
    /// Its chain head when deleted.
    pub head: Hash,
    /// When, in milliseconds since the epoch.
    pub deleted_at_ms: i64,
    /// Why (`retention: 30 days`).
    pub reason: String,
    /// Ed25519 signature of [`Deletion::message`].
    pub signature: Vec<u8>,
    /// [`key_id`] of the signing key.
    pub key_id: String,
}

impl Deletion {
    /// The message a deletion signs.
    pub fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(128 + self.session_id.len() + self.reason.len());
        m.extend_from_slice(b"wicket-audit-deletion-v1\0");
        m.extend_from_slice(&(self.session_id.len() as u64).to_be_bytes());
        m.extend_from_slice(self.session_id.as_bytes());
        m.extend_from_slice(&self.len.to_be_bytes());
        m.extend_from_slice(&self.head);
        m.extend_from_slice(&self.deleted_at_ms.to_be_bytes());
        m.extend_from_slice(&(self.reason.len() as u64).to_be_bytes());
        m.extend_from_slice(self.reason.as_bytes());
        m
    }

    /// Whether it is signed by `public_key` and covers at least everything
    /// the roots and seal say the session held (`signed_len`).
    pub fn check(&self, public_key: &[u8], signed_len: u64) -> Result<(), String> {
        if self.key_id != key_id(public_key)
            || !signature_ok(public_key, &self.message(), &self.signature)
        {
            return Err(format!(
                "session {}'s deletion record does not verify with the audit key",
                self.session_id
            ));
        }
        if self.len < signed_len {
            return Err(format!(
                "session {} was deleted at {} events but a signature vouches for {signed_len}",
                self.session_id, self.len
            ));
        }
        Ok(())
    }
}

/// One session in a root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// The session.
    pub session_id: String,
    /// Its chain length then.
    pub len: u64,
    /// Its chain head then.
    pub head: Hash,
}

impl Leaf {
    /// [`leaf_hash`] of this leaf.
    pub fn hash(&self) -> Hash {
        leaf_hash(&self.session_id, self.len, &self.head)
    }
}

/// A root's statement about one session: its chain had `len` events ending
/// in `head`. Only meaningful once the root itself is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The root's number.
    pub root_seq: u64,
    /// Chain length then.
    pub len: u64,
    /// Chain head then.
    pub head: Hash,
}

/// Something wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The event at `index` does not match its recorded hash: its content
    /// was changed.
    Changed {
        /// Position.
        index: u64,
        /// Event id.
        id: String,
    },
    /// Events `from..=to` are missing.
    Removed {
        /// First missing position.
        from: u64,
        /// Last missing position.
        to: u64,
    },
    /// The event now at `index` was recorded at `was`.
    Reordered {
        /// Position now.
        index: u64,
        /// Event id.
        id: String,
        /// Position it was recorded at.
        was: u64,
    },
    /// The event at `index` does not chain from the one before it: it, or
    /// an event before it, was changed, removed or moved.
    Broken {
        /// Position.
        index: u64,
        /// Event id.
        id: String,
    },
    /// Two stored events claim position `index`.
    Duplicate {
        /// Position.
        index: u64,
    },
    /// The chain is consistent but does not reach a signed head: events up
    /// to `to` were rewritten together with their hashes, somewhere after
    /// `from` (the last position a signature still vouches for).
    Rewritten {
        /// Last position proven intact (0: none).
        from: u64,
        /// The signed length that no longer matches.
        to: u64,
    },
    /// The seal's signature does not verify (or names another key).
    BadSeal,
    /// The terminal output of the event at `index` does not match the hash
    /// the event carries: its recording chunk was changed.
    RecordingChanged {
        /// Position.
        index: u64,
        /// Event id.
        id: String,
    },
    /// The recording chunk of the event at `index` is gone.
    RecordingMissing {
        /// Position.
        index: u64,
        /// Event id.
        id: String,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Changed { index, id } => {
                write!(
                    f,
                    "event #{index} ({id}) was changed: it does not match the chain (or the event before it was changed together with its hash)"
                )
            }
            Finding::Removed { from, to } if from == to => write!(f, "event #{from} was removed"),
            Finding::Removed { from, to } => write!(f, "events #{from} to #{to} were removed"),
            Finding::Reordered { index, id, was } => {
                write!(
                    f,
                    "event #{index} ({id}) was moved: it was recorded as #{was}"
                )
            }
            Finding::Broken { index, id } => write!(
                f,
                "event #{index} ({id}) does not follow the event before it: it or an earlier event was changed, removed or moved"
            ),
            Finding::Duplicate { index } => write!(f, "two events claim position #{index}"),
            Finding::Rewritten { from: 0, to } => write!(
                f,
                "events up to #{to} were rewritten with recomputed hashes: they do not end in the signed head"
            ),
            Finding::Rewritten { from, to } => write!(
                f,
                "events after #{from} (up to #{to}) were rewritten with recomputed hashes: they do not end in the signed head"
            ),
            Finding::BadSeal => write!(f, "the session's seal does not verify with the audit key"),
            Finding::RecordingChanged { index, id } => write!(
                f,
                "the recording of event #{index} ({id}) was changed: its chunk does not match the hash in the chain"
            ),
            Finding::RecordingMissing { index, id } => {
                write!(
                    f,
                    "the recording of event #{index} ({id}) was removed: its chunk is gone"
                )
            }
        }
    }
}

/// What verifying one session found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionReport {
    /// The session.
    pub session_id: String,
    /// Events stored in the chain.
    pub events: u64,
    /// The sealed length, when sealed.
    pub sealed: Option<u64>,
    /// The longest prefix a signature (seal or root) vouches for.
    pub proven: u64,
    /// The longest length a valid seal or a root claims (whether or not
    /// the stored events still match it).
    pub signed: u64,
    /// Events before the chain began (stored before tamper evidence was
    /// enabled), which nothing vouches for.
    pub unchained: u64,
    /// Problems, first (in chain order) first.
    pub findings: Vec<Finding>,
}

impl SessionReport {
    /// Adds a finding about the event at `index` (from checks beyond the
    /// chain, such as recording chunks), keeping the findings in order.
    pub fn add(&mut self, index: u64, finding: Finding) {
        self.proven = self.proven.min(index.saturating_sub(1));
        let at = |f: &Finding| match f {
            Finding::Changed { index, .. }
            | Finding::Reordered { index, .. }
            | Finding::Broken { index, .. }
            | Finding::Duplicate { index }
            | Finding::RecordingChanged { index, .. }
            | Finding::RecordingMissing { index, .. } => *index,
            Finding::Removed { from, .. } => *from,
            Finding::Rewritten { from, .. } => from + 1,
            Finding::BadSeal => 0,
        };
        let pos = self.findings.partition_point(|f| at(f) <= index);
        self.findings.insert(pos, finding);
    }

    /// No problem found.
    pub fn intact(&self) -> bool {
        self.findings.is_empty()
    }
}

/// At most this many events whose link failed are kept for classifying.
const MAX_SUSPECTS: usize = 64;

/// Checks one session's chain, event by event, in bounded memory (32 bytes
/// per event plus the few events that fail).
#[derive(Debug)]
pub struct ChainVerifier {
    session_id: String,
    /// Stored hashes by position (index 1 at [0]); positions never seen
    /// hold `None`.
    hashes: Vec<Option<Hash>>,
    /// Events whose link failed: `(index, id, body)`.
    suspects: Vec<(u64, String, String)>,
    /// Positions where a link failed right after a gap (explained by it).
    after_gap: Vec<u64>,
    findings: Vec<(u64, Finding)>,
    unchained: u64,
    last: u64,
}

impl ChainVerifier {
    /// A verifier for `session_id`.
    pub fn new(session_id: &str) -> ChainVerifier {
        ChainVerifier {
            session_id: session_id.to_string(),
            hashes: Vec::new(),
            suspects: Vec::new(),
            after_gap: Vec::new(),
            findings: Vec::new(),
            unchained: 0,
            last: 0,
        }
    }

    /// Counts an event stored before the chain began.
    pub fn unchained(&mut self) {
        self.unchained += 1;
    }

    /// The next stored event, in position order.
    pub fn push(&mut self, e: &ChainedEvent) {
        let index = e.index;
        if index == 0 {
            self.findings.push((0, Finding::Duplicate { index: 0 }));
            return;
        }
        if index <= self.last {
            self.findings.push((index, Finding::Duplicate { index }));
            return;
        }
        let gap = index > self.last + 1;
        if gap {
            self.findings.push((
                self.last + 1,
                Finding::Removed {
                    from: self.last + 1,
                    to: index - 1,
                },
            ));
        }
        let prev = match index {
            1 => Some(GENESIS),
            i => self.hashes.get(i as usize - 2).copied().flatten(),
        };
        let ok = prev.is_some_and(|p| link(&p, index, e.body.as_bytes()) == e.hash);
        if !ok {
            if gap {
                self.after_gap.push(index);
            } else if self.suspects.len() < MAX_SUSPECTS {
                self.suspects.push((index, e.id.clone(), e.body.clone()));
            } else {
                self.findings.push((
                    index,
                    Finding::Broken {
                        index,
                        id: e.id.clone(),
                    },
                ));
            }
        }
        self.hashes.resize(index as usize - 1, None);
        self.hashes.push(Some(e.hash));
        self.last = index;
    }

    fn stored(&self, index: u64) -> Option<Hash> {
        match index {
            0 => Some(GENESIS),
            i => self.hashes.get(i as usize - 1).copied().flatten(),
        }
    }

    /// Checks the seal (with `public_key`) and the roots' checkpoints
    /// (already verified by the caller) and reports.
    pub fn finish(
        mut self,
        seal: Option<&Seal>,
        checkpoints: &[Checkpoint],
        public_key: &[u8],
    ) -> SessionReport {
        // Classify the events whose link failed.
        let suspects = std::mem::take(&mut self.suspects);
        let suspect_at: Vec<u64> = suspects.iter().map(|(i, _, _)| *i).collect();
        for (index, id, body) in suspects {
            let own = self.stored(index);
            let links_from = |p: u64, j: u64| {
                self.stored(p)
                    .is_some_and(|h| Some(link(&h, j, body.as_bytes())) == own)
            };
            // Recorded at another position `was`, after the event then
            // before it.
            if let Some(was) = (1..=self.last).find(|&j| j != index && links_from(j - 1, j)) {
                self.findings
                    .push((index, Finding::Reordered { index, id, was }));
                continue;
            }
            // Intact, but the event it followed was moved: explained by
            // that event's finding.
            if (0..=self.last).any(|p| p + 1 != index && links_from(p, index)) {
                continue;
            }
            // The next event chains from this one's stored hash, so that
            // hash is the original and the content differs from it.
            let next_vouches = self.stored(index + 1).is_some()
                && !suspect_at.contains(&(index + 1))
                && !self.after_gap.contains(&(index + 1));
            let finding = if next_vouches || index == self.last {
                Finding::Changed { index, id }
            } else {
                Finding::Broken { index, id }
            };
            self.findings.push((index, finding));
        }
        // Signed statements: the seal, then each root's checkpoint.
        let mut signed: Vec<(u64, Hash)> = checkpoints.iter().map(|c| (c.len, c.head)).collect();
        let mut sealed = None;
        if let Some(s) = seal {
            let msg = seal_message(&self.session_id, s.len, &s.head, s.sealed_at_ms);
            if s.key_id != key_id(public_key) || !signature_ok(public_key, &msg, &s.signature) {
                self.findings.push((0, Finding::BadSeal));
            } else {
                sealed = Some(s.len);
                signed.push((s.len, s.head));
            }
        }
        signed.sort_by_key(|(len, _)| *len);
        let signed_len = signed.last().map(|(len, _)| *len).unwrap_or(0);
        let mut proven = 0;
        for (len, head) in &signed {
            if *len > self.last {
                self.findings.push((
                    self.last + 1,
                    Finding::Removed {
                        from: self.last + 1,
                        to: *len,
                    },
                ));
                break;
            }
            if *len > 0 && self.stored(*len) != Some(*head) {
                // Only worth saying when no event-level finding explains it.
                if !self
                    .findings
                    .iter()
                    .any(|(at, _)| *at > proven && *at <= *len)
                {
                    self.findings.push((
                        proven + 1,
                        Finding::Rewritten {
                            from: proven,
                            to: *len,
                        },
                    ));
                }
                break;
            }
            proven = proven.max(*len);
        }
        if self
            .findings
            .iter()
            .any(|(_, f)| !matches!(f, Finding::BadSeal))
        {
            proven = proven.min(
                self.findings
                    .iter()
                    .map(|(at, _)| at.saturating_sub(1))
                    .min()
                    .unwrap_or(proven),
            );
        }
        self.findings.sort_by_key(|(at, _)| *at);
        self.findings.dedup();
        SessionReport {
            session_id: self.session_id,
            events: self.hashes.iter().filter(|h| h.is_some()).count() as u64,
            sealed,
            proven,
            signed: signed_len,
            unchained: self.unchained,
            findings: self.findings.into_iter().map(|(_, f)| f).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};

    fn chain(bodies: &[&str]) -> Vec<ChainedEvent> {
        let mut prev = GENESIS;
        bodies
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let index = i as u64 + 1;
                prev = link(&prev, index, b.as_bytes());
                ChainedEvent {
                    index,
                    id: format!("e{index}"),
                    body: b.to_string(),
                    hash: prev,
                }
            })
            .collect()
    }

    fn key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap()
    }

    fn seal(k: &Ed25519KeyPair, events: &[ChainedEvent]) -> Seal {
        let last = events.last().unwrap();
        let msg = seal_message("s1", last.index, &last.hash, 1000);
        Seal {
            len: last.index,
            head: last.hash,
            sealed_at_ms: 1000,
            signature: k.sign(&msg).as_ref().to_vec(),
            key_id: key_id(k.public_key().as_ref()),
        }
    }

    fn check(events: &[ChainedEvent], s: Option<&Seal>, cps: &[Checkpoint]) -> SessionReport {
        let mut v = ChainVerifier::new("s1");
        for e in events {
            v.push(e);
        }
        v.finish(s, cps, key().public_key().as_ref())
    }

    const BODIES: [&str; 6] = ["start", "select 1", "delete", "output", "drop", "end"];

    #[test]
    fn an_untouched_sealed_chain_is_intact_and_proven() {
        let c = chain(&BODIES);
        let s = seal(&key(), &c);
        let r = check(&c, Some(&s), &[]);
        assert!(r.intact(), "{:?}", r.findings);
        assert_eq!((r.events, r.sealed, r.proven), (6, Some(6), 6));
    }

    #[test]
    fn a_changed_body_is_named() {
        let mut c = chain(&BODIES);
        let s = seal(&key(), &c);
        c[2].body = "select 2".into();
        let r = check(&c, Some(&s), &[]);
        assert_eq!(
            r.findings,
            [Finding::Changed {
                index: 3,
                id: "e3".into()
            }]
        );
        assert_eq!(r.proven, 2);
    }

    #[test]
    fn a_changed_body_with_its_hash_recomputed_breaks_the_next_link() {
        let mut c = chain(&BODIES);
        let s = seal(&key(), &c);
        c[2].body = "select 2".into();
        c[2].hash = link(&c[1].hash, 3, b"select 2");
        let r = check(&c, Some(&s), &[]);
        // Indistinguishable from #4 changed: the chain breaks there.
        assert_eq!(
            r.findings,
            [Finding::Changed {
                index: 4,
                id: "e4".into()
            }]
        );
    }

    #[test]
    fn a_whole_rewritten_tail_fails_against_the_seal_and_a_root() {
        let mut c = chain(&BODIES);
        let s = seal(&key(), &c);
        let cp = Checkpoint {
            root_seq: 1,
            len: 2,
            head: c[1].hash,
        };
        c[3].body = "nothing to see".into();
        let mut prev = c[2].hash;
        for e in &mut c[3..] {
            e.hash = link(&prev, e.index, e.body.as_bytes());
            prev = e.hash;
        }
        let r = check(&c, Some(&s), std::slice::from_ref(&cp));
        assert_eq!(r.findings, [Finding::Rewritten { from: 2, to: 6 }]);
        assert_eq!(r.proven, 2);
    }

    #[test]
    fn removed_events_are_named_in_the_middle_and_at_the_end() {
        let c = chain(&BODIES);
        let s = seal(&key(), &c);
        let mut gap = c.clone();
        gap.remove(3);
        let r = check(&gap, Some(&s), &[]);
        assert_eq!(r.findings, [Finding::Removed { from: 4, to: 4 }]);
        let r = check(&c[..4], Some(&s), &[]);
        assert_eq!(r.findings, [Finding::Removed { from: 5, to: 6 }]);
    }

    #[test]
    fn swapped_events_are_named_as_moved() {
        let mut c = chain(&BODIES);
        let s = seal(&key(), &c);
        let (a, b) = (c[1].clone(), c[4].clone());
        c[1] = ChainedEvent { index: 2, ..b };
        c[4] = ChainedEvent { index: 5, ..a };
        let r = check(&c, Some(&s), &[]);
        assert_eq!(
            r.findings.first(),
            Some(&Finding::Reordered {
                index: 2,
                id: "e5".into(),
                was: 5
            })
        );
    }

    #[test]
    fn a_forged_or_foreign_seal_is_reported() {
        let c = chain(&BODIES);
        let mut s = seal(&key(), &c);
        s.sealed_at_ms += 1;
        assert_eq!(check(&c, Some(&s), &[]).findings, [Finding::BadSeal]);
        let other = Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap();
        let s = seal(&other, &c);
        assert_eq!(check(&c, Some(&s), &[]).findings, [Finding::BadSeal]);
    }

    #[test]
    fn merkle_roots_follow_rfc_6962_shape() {
        let l: Vec<Hash> = (0..5u8).map(|i| [i; 32]).collect();
        assert_eq!(merkle_root(&l[..1]), l[0]);
        let node = |a: &Hash, b: &Hash| {
            let mut ctx = Context::new(&SHA256);
            ctx.update(&[1]);
            ctx.update(a);
            ctx.update(b);
            finish(ctx)
        };
        let ab = node(&l[0], &l[1]);
        let cd = node(&l[2], &l[3]);
        assert_eq!(merkle_root(&l[..3]), node(&ab, &l[2]));
        assert_eq!(merkle_root(&l[..5]), node(&node(&ab, &cd), &l[4]));
        assert_ne!(merkle_root(&l[..4]), merkle_root(&[l[1], l[0], l[2], l[3]]));
    }
}
