//! `wicket audit`: prove recorded sessions intact against the signed audit
//! trail (see `wicket_core::evidence`), with a public key the auditor pins.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};
use wicket_core::evidence::{self, ChainVerifier, ChainedEvent, Checkpoint, Leaf, Root, Seal};
use wicket_proto::convert;
use wicket_proto::v1;
use wicket_proto::v1::audit_admin_service_client::AuditAdminServiceClient;

use crate::commands::Client;
use crate::output::{self, Format};
use crate::{Cli, CliError};

/// `wicket audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Print the audit key's public half (OpenSSH form); keep it where the
    /// database's writers cannot change it, and pass it to `verify`.
    Key,
    /// Prove sessions intact: every event in place and unchanged, up to
    /// heads the audit key signed. Names the first changed, removed or
    /// moved event. Exits 5 when a record fails.
    Verify {
        /// The session to verify.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        session: Option<String>,
        /// Every root and every session.
        #[arg(long)]
        all: bool,
        /// The audit public key to verify with (a file holding `wicket audit
        /// key`'s output). Without it the control service's own key is
        /// used, which proves less: whoever controls the service could
        /// re-sign.
        #[arg(long, env = "WICKET_AUDIT_PUBLIC_KEY")]
        public_key: Option<PathBuf>,
    },
    /// Sign a root now over the sessions recorded since the last one
    /// (the control service does so every `--audit-root-interval`).
    Root,
    /// List the signed roots.
    Roots,
    /// Delete now the ended sessions whose connection's retention
    /// (`recording.retention_days`) has run out, except those on legal
    /// hold (the control service does so every `--retention-interval`).
    Retention,
}

type Api = AuditAdminServiceClient<tonic::transport::Channel>;

fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn ms_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// The raw Ed25519 public key from `--public-key`, or the service's own.
async fn public_key(
    c: &Client,
    api: &mut Api,
    file: Option<&PathBuf>,
) -> Result<Vec<u8>, CliError> {
    let line = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| CliError::usage(format!("cannot read {}: {e}", f.display())))?,
        None => {
            let k = api
                .get_audit_key(c.req(v1::GetAuditKeyRequest {}))
                .await?
                .into_inner();
            eprintln!(
                "wicket: note: verifying with the key the control service reports ({}); \
                 pin it with --public-key for proof independent of the service",
                k.key_id
            );
            k.public_key
        }
    };
    let key = ssh_key::PublicKey::from_openssh(line.trim()).map_err(|e| {
        CliError::usage(format!(
            "the audit public key is not an OpenSSH key line: {e}"
        ))
    })?;
    let ed = key
        .key_data()
        .ed25519()
        .ok_or_else(|| CliError::usage("the audit public key must be an Ed25519 key"))?;
    Ok(ed.0.to_vec())
}

/// Every stored root, oldest first.
async fn all_roots(c: &Client, api: &mut Api) -> Result<Vec<v1::AuditRoot>, CliError> {
    let mut all = Vec::new();
    loop {
        let page = api
            .list_audit_roots(c.req(v1::ListAuditRootsRequest {
                after_seq: all.last().map(|r: &v1::AuditRoot| r.seq).unwrap_or(0),
                limit: 1000,
            }))
            .await?
            .into_inner()
            .roots;
        if page.is_empty() {
            return Ok(all);
        }
        all.extend(page);
    }
}

/// Every root, verified one after the other; returns the roots that
/// verified, their leaves by session, and what is wrong.
async fn check_roots(
    c: &Client,
    api: &mut Api,
    key: &[u8],
    only: Option<&[u64]>,
) -> Result<(BTreeMap<String, Vec<Checkpoint>>, Vec<String>, u64), CliError> {
    let roots: Vec<Root> = all_roots(c, api).await?.iter().map(Root::from).collect();
    let mut problems = Vec::new();
    let mut named: BTreeMap<String, Vec<Checkpoint>> = BTreeMap::new();
    let mut prev: Option<&Root> = None;
    for r in &roots {
        // The chain of roots: each names the one before, so a removed or
        // changed root shows (only the newest could go unnoticed: keep
        // its hash, `wicket audit roots`, somewhere else).
        let expected = prev
            .map(|p| evidence::root_id(&p.message()))
            .unwrap_or(evidence::GENESIS);
        let expected_seq = prev.map(|p| p.seq + 1).unwrap_or(1);
        if r.seq != expected_seq {
            problems.push(format!(
                "roots #{expected_seq} to #{} are missing",
                r.seq - 1
            ));
        } else if r.prev != expected {
            problems.push(format!(
                "root #{} does not follow root #{}: one of them was changed",
                r.seq,
                r.seq - 1
            ));
        }
        prev = Some(r);
        if only.is_some_and(|o| !o.contains(&r.seq)) {
            continue;
        }
        let mut leaves = Vec::new();
        let mut after = String::new();
        loop {
            let page = api
                .list_audit_root_leaves(c.req(v1::ListAuditRootLeavesRequest {
                    seq: r.seq,
                    after_session: after.clone(),
                    limit: 1000,
                }))
                .await?
                .into_inner()
                .leaves;
            let Some(last) = page.last() else { break };
            after = last.session_id.clone();
            leaves.extend(page.iter().map(Leaf::from));
        }
        match r.check(key, &leaves) {
            Ok(()) => {
                for l in leaves {
                    named.entry(l.session_id).or_default().push(Checkpoint {
                        root_seq: r.seq,
                        len: l.len,
                        head: l.head,
                    });
                }
            }
            Err(e) => problems.push(e),
        }
    }
    Ok((named, problems, roots.len() as u64))
}

/// What checking one session found.
enum Checked {
    /// Its chain, checked.
    Report(evidence::SessionReport),
    /// Deleted on purpose: its signed record, verified.
    Deleted(evidence::Deletion),
    /// Not stored, and no signed record answers for it.
    Missing,
}

/// Verifies one session; `checkpoints` come from verified roots.
async fn check_session(
    c: &Client,
    api: &mut Api,
    key: &[u8],
    id: &str,
    checkpoints: &[Checkpoint],
) -> Result<Checked, CliError> {
    let mut v = ChainVerifier::new(id);
    let mut after = 0;
    let mut recorded: Vec<RecordingRef> = Vec::new();
    // Seal, presence and the unchained count as of the last page read.
    let (found, seal, unchained, deletion) = loop {
        let page = api
            .get_audit_chain(c.req(v1::GetAuditChainRequest {
                session_id: id.to_string(),
                after_index: after,
                limit: 1000,
            }))
            .await?
            .into_inner();
        for e in &page.events {
            v.push(&ChainedEvent::from(e));
            recorded.extend(RecordingRef::of(e));
        }
        match page.events.last() {
            Some(e) if page.events.len() >= 1000 => after = e.index,
            _ => {
                let seal = page.seal.map(Seal::from);
                let deletion = page.deletion.map(|d| convert::deletion(id, d));
                break (page.found, seal, page.unchained, deletion);
            }
        }
    };
    if !found {
        // Deleted on purpose answers for it only when signed, and only if
        // it covers everything a root vouched for.
        if let Some(d) = deletion {
            let signed = checkpoints.iter().map(|c| c.len).max().unwrap_or(0);
            if d.check(key, signed).is_ok() {
                return Ok(Checked::Deleted(d));
            }
        }
        if checkpoints.is_empty() && seal.is_none() {
            return Ok(Checked::Missing);
        }
    }
    for _ in 0..unchained {
        v.unchained();
    }
    let mut report = v.finish(seal.as_ref(), checkpoints, key);
    check_recordings(c, api, &recorded, &mut report).await?;
    Ok(Checked::Report(report))
}

/// Where an event's terminal output went (from the event as chained).
struct RecordingRef {
    index: u64,
    id: String,
    key: String,
    offset: usize,
    len: usize,
    sha256: String,
}

impl RecordingRef {
    fn of(e: &v1::ChainedEvent) -> Option<RecordingRef> {
        if !e.body.contains("asciicast_chunk") {
            return None;
        }
        let v: Value = serde_json::from_str(&e.body).ok()?;
        let d = &v["details"];
        let text = |k: &str| d[k].as_str().map(str::to_string);
        let num = |k: &str| text(k).and_then(|s| s.parse::<usize>().ok());
        Some(RecordingRef {
            index: e.index,
            id: e.id.clone(),
            key: text("asciicast_chunk")?,
            // A malformed reference cannot match and is reported as changed.
            offset: num("asciicast_offset").unwrap_or(usize::MAX),
            len: num("asciicast_len").unwrap_or(0),
            sha256: text("asciicast_sha256").unwrap_or_default(),
        })
    }
}

/// Each chunk read once, each event's slice hashed against its chain.
async fn check_recordings(
    c: &Client,
    api: &mut Api,
    refs: &[RecordingRef],
    report: &mut evidence::SessionReport,
) -> Result<(), CliError> {
    let mut current: Option<(String, Option<Vec<u8>>)> = None;
    for r in refs {
        if current.as_ref().is_none_or(|(k, _)| *k != r.key) {
            let chunk = api
                .get_recording_chunk(c.req(v1::GetRecordingChunkRequest { key: r.key.clone() }))
                .await?
                .into_inner();
            current = Some((r.key.clone(), chunk.found.then_some(chunk.data)));
        }
        let Some((_, data)) = &current else { continue };
        let finding = match data {
            None => Some(evidence::Finding::RecordingMissing {
                index: r.index,
                id: r.id.clone(),
            }),
            Some(data) => {
                let slice = data.get(r.offset..r.offset.saturating_add(r.len));
                let ok = slice.is_some_and(|s| {
                    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s).as_ref())
                        == r.sha256
                });
                (!ok).then(|| evidence::Finding::RecordingChanged {
                    index: r.index,
                    id: r.id.clone(),
                })
            }
        };
        if let Some(f) = finding {
            report.add(r.index, f);
        }
    }
    Ok(())
}

fn report_json(r: &evidence::SessionReport) -> Value {
    json!({
        "session": r.session_id,
        "intact": r.intact(),
        "events": r.events,
        "sealed": r.sealed,
        "proven": r.proven,
        "signed": r.signed,
        "unchained": r.unchained,
        "findings": r.findings.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
    })
}

fn report_line(r: &evidence::SessionReport) -> Vec<String> {
    let state = if r.intact() { "intact" } else { "TAMPERED" };
    let mut notes = Vec::new();
    match r.sealed {
        Some(n) => notes.push(format!("sealed at {n} events")),
        None if r.signed > 0 => notes.push(format!(
            "not sealed; a root vouches for {} events",
            r.signed
        )),
        None => notes.push("not sealed yet and in no root: nothing signed vouches for it".into()),
    }
    if r.intact() && r.events > r.proven {
        notes.push(format!(
            "events {}..{} not yet signed",
            r.proven + 1,
            r.events
        ));
    }
    if r.unchained > 0 {
        notes.push(format!("{} events predate tamper evidence", r.unchained));
    }
    if let Some(f) = r.findings.first() {
        notes.insert(0, f.to_string());
        if r.findings.len() > 1 {
            let more = r.findings.len() - 1;
            notes.insert(
                1,
                format!("{more} more finding{}", if more == 1 { "" } else { "s" }),
            );
        }
    }
    vec![
        r.session_id.clone(),
        state.into(),
        r.events.to_string(),
        notes.join("; "),
    ]
}

/// Runs `wicket audit …`.
pub async fn run(cli: &Cli, fmt: Format, cmd: &AuditCmd) -> Result<(), CliError> {
    let c = Client::connect(cli).await?;
    // A recording chunk is as large as a sidecar's batch.
    let mut api =
        AuditAdminServiceClient::new(c.channel.clone()).max_decoding_message_size(64 << 20);
    match cmd {
        AuditCmd::Key => {
            let k = api
                .get_audit_key(c.req(v1::GetAuditKeyRequest {}))
                .await?
                .into_inner();
            match fmt {
                Format::Table => println!("{}", k.public_key),
                _ => output::json(
                    fmt,
                    &json!({"public_key": k.public_key, "key_id": k.key_id}),
                ),
            }
            Ok(())
        }
        AuditCmd::Root => {
            let roots = api
                .create_audit_root(c.req(v1::CreateAuditRootRequest {}))
                .await?
                .into_inner()
                .roots;
            if roots.is_empty() && fmt == Format::Table {
                eprintln!("No session changed since the last root.");
            }
            print_roots(fmt, &roots);
            Ok(())
        }
        AuditCmd::Retention => {
            let deleted = api
                .apply_retention(c.req(v1::ApplyRetentionRequest {}))
                .await?
                .into_inner()
                .deleted;
            match fmt {
                Format::Table if deleted.is_empty() => {
                    println!("No session is past its retention.")
                }
                Format::Table => {
                    for d in &deleted {
                        println!("deleted {d}");
                    }
                }
                _ => output::json(fmt, &json!({"deleted": deleted})),
            }
            Ok(())
        }
        AuditCmd::Roots => {
            print_roots(fmt, &all_roots(&c, &mut api).await?);
            Ok(())
        }
        AuditCmd::Verify {
            session,
            all,
            public_key: file,
        } => {
            let key = public_key(&c, &mut api, file.as_ref()).await?;
            let mut reports = Vec::new();
            let mut deleted: Vec<evidence::Deletion> = Vec::new();
            let mut problems = Vec::new();
            if *all {
                let (named, root_problems, root_count) =
                    check_roots(&c, &mut api, &key, None).await?;
                problems.extend(root_problems);
                // Every stored session, and every session a root names.
                let mut ids: Vec<String> = named.keys().cloned().collect();
                let mut after = String::new();
                loop {
                    let page = api
                        .list_audit_sessions(c.req(v1::ListAuditSessionsRequest {
                            after_session: after.clone(),
                            limit: 1000,
                        }))
                        .await?
                        .into_inner()
                        .session_ids;
                    let Some(last) = page.last() else { break };
                    after = last.clone();
                    ids.extend(page);
                }
                ids.sort();
                ids.dedup();
                for id in &ids {
                    let cps = named.get(id).map(Vec::as_slice).unwrap_or_default();
                    match check_session(&c, &mut api, &key, id, cps).await? {
                        Checked::Report(r) => reports.push(r),
                        Checked::Deleted(d) => deleted.push(d),
                        Checked::Missing => problems.push(format!(
                            "session {id} is named by a root but no longer stored: it was removed"
                        )),
                    }
                }
                if fmt == Format::Table {
                    eprintln!("{root_count} roots, {} sessions checked", ids.len());
                }
            } else if let Some(id) = session {
                // Only the roots that name this session need checking,
                // but a root is only believed with its whole chain.
                let first = api
                    .get_audit_chain(c.req(v1::GetAuditChainRequest {
                        session_id: id.clone(),
                        after_index: 0,
                        limit: 1,
                    }))
                    .await?
                    .into_inner();
                let seqs: Vec<u64> = first.checkpoints.iter().map(|c| c.root_seq).collect();
                let (named, root_problems, _) =
                    check_roots(&c, &mut api, &key, Some(&seqs)).await?;
                problems.extend(root_problems);
                let cps = named.get(id).map(Vec::as_slice).unwrap_or_default();
                match check_session(&c, &mut api, &key, id, cps).await? {
                    Checked::Report(r) => reports.push(r),
                    Checked::Deleted(d) => deleted.push(d),
                    Checked::Missing => {
                        return Err(CliError::failed(format!("no session `{id}`")));
                    }
                }
            }
            let bad = reports.iter().filter(|r| !r.intact()).count();
            match fmt {
                Format::Table => {
                    for p in &problems {
                        println!("TAMPERED: {p}");
                    }
                    let mut rows: Vec<Vec<String>> = reports.iter().map(report_line).collect();
                    rows.extend(deleted.iter().map(|d| {
                        vec![
                            d.session_id.clone(),
                            "deleted".into(),
                            d.len.to_string(),
                            format!(
                                "deleted {} ({}); the deletion is signed",
                                ms_time(d.deleted_at_ms),
                                d.reason
                            ),
                        ]
                    }));
                    rows.sort();
                    output::rows(
                        fmt,
                        &["session", "state", "events", "notes"],
                        rows,
                        Value::Null,
                    );
                }
                _ => output::json(
                    fmt,
                    &json!({
                        "intact": bad == 0 && problems.is_empty(),
                        "problems": problems,
                        "sessions": reports.iter().map(report_json).collect::<Vec<_>>(),
                        "deleted": deleted.iter().map(|d| json!({
                            "session": d.session_id, "events": d.len,
                            "deleted_at": ms_time(d.deleted_at_ms), "reason": d.reason,
                        })).collect::<Vec<_>>(),
                    }),
                ),
            }
            if bad > 0 || !problems.is_empty() {
                return Err(CliError::tampered(format!(
                    "verification failed: {bad} tampered sessions, {} other problems",
                    problems.len()
                )));
            }
            Ok(())
        }
    }
}

fn print_roots(fmt: Format, roots: &[v1::AuditRoot]) {
    output::rows(
        fmt,
        &["seq", "created", "sessions", "root", "key"],
        roots
            .iter()
            .map(|r| {
                vec![
                    r.seq.to_string(),
                    ms_time(r.created_at_ms),
                    r.leaves.to_string(),
                    hex(&r.root),
                    r.key_id.clone(),
                ]
            })
            .collect(),
        Value::Array(
            roots
                .iter()
                .map(|r| {
                    json!({"seq": r.seq, "created_at": ms_time(r.created_at_ms), "sessions": r.leaves,
                           "root": hex(&r.root), "prev": hex(&r.prev), "key_id": r.key_id})
                })
                .collect(),
        ),
    );
}
