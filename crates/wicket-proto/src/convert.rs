//! Conversions between wire messages and `wicket-core` domain types.
//!
//! Wire → domain conversions that can fail return a message naming the field.

use chrono::{DateTime, TimeZone, Utc};
use wicket_core as core;

use crate::v1;

/// Timestamp to wire.
pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// Optional wire timestamp to domain (None when unset or out of range).
pub fn from_ts(t: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let t = t?;
    Utc.timestamp_opt(t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
        .single()
}

/// Protocol to wire.
pub fn protocol(p: core::Protocol) -> v1::Protocol {
    match p {
        core::Protocol::Postgres => v1::Protocol::Postgres,
        core::Protocol::Ssh => v1::Protocol::Ssh,
        core::Protocol::Kubernetes => v1::Protocol::Kubernetes,
        core::Protocol::Http => v1::Protocol::Http,
    }
}

/// Protocol from wire.
pub fn from_protocol(p: i32) -> Result<core::Protocol, String> {
    match v1::Protocol::try_from(p) {
        Ok(v1::Protocol::Postgres) => Ok(core::Protocol::Postgres),
        Ok(v1::Protocol::Ssh) => Ok(core::Protocol::Ssh),
        Ok(v1::Protocol::Kubernetes) => Ok(core::Protocol::Kubernetes),
        Ok(v1::Protocol::Http) => Ok(core::Protocol::Http),
        _ => Err("protocol: unspecified or unknown".into()),
    }
}

/// Effect to wire.
pub fn effect(e: core::Effect) -> v1::Effect {
    match e {
        core::Effect::Allow => v1::Effect::Allow,
        core::Effect::Review => v1::Effect::Review,
        core::Effect::Deny => v1::Effect::Deny,
    }
}

/// Effect from wire; unspecified counts as deny (fail closed).
pub fn from_effect(e: i32) -> core::Effect {
    match v1::Effect::try_from(e) {
        Ok(v1::Effect::Allow) => core::Effect::Allow,
        Ok(v1::Effect::Review) => core::Effect::Review,
        _ => core::Effect::Deny,
    }
}

impl From<&core::Principal> for v1::Principal {
    fn from(p: &core::Principal) -> Self {
        p.clone().into()
    }
}

/// By value, as the nested parts of [`v1::AuditEvent`]'s conversion below:
/// strings move instead of being copied.
impl From<core::Principal> for v1::Principal {
    fn from(p: core::Principal) -> Self {
        v1::Principal {
            subject: p.subject,
            issuer: p.issuer,
            kind: match p.kind {
                core::PrincipalKind::Human => v1::PrincipalKind::Human,
                core::PrincipalKind::Agent => v1::PrincipalKind::Agent,
            } as i32,
            groups: p.groups,
            display_name: p.display_name,
            client_id: p.client_id,
        }
    }
}

impl From<&v1::Principal> for core::Principal {
    fn from(p: &v1::Principal) -> Self {
        p.clone().into()
    }
}

/// By value, as the nested parts of a received [`v1::AuditEvent`]'s
/// conversion: strings move instead of being copied.
impl From<v1::Principal> for core::Principal {
    fn from(p: v1::Principal) -> Self {
        core::Principal {
            kind: if p.kind == v1::PrincipalKind::Agent as i32 {
                core::PrincipalKind::Agent
            } else {
                core::PrincipalKind::Human
            },
            subject: p.subject,
            issuer: p.issuer,
            groups: p.groups,
            display_name: p.display_name,
            client_id: p.client_id,
        }
    }
}

impl From<&core::Connection> for v1::Connection {
    fn from(c: &core::Connection) -> Self {
        v1::Connection {
            name: c.name.clone(),
            protocol: protocol(c.protocol) as i32,
            labels: c.labels.clone().into_iter().collect(),
            upstream: c.upstream.clone(),
            description: c.description.clone(),
        }
    }
}

impl From<&core::Command> for v1::Command {
    fn from(c: &core::Command) -> Self {
        c.clone().into()
    }
}

impl From<core::Command> for v1::Command {
    fn from(c: core::Command) -> Self {
        let k = c.classification;
        v1::Command {
            text: c.text,
            classification: Some(v1::Classification {
                kind: k.kind,
                verb: k.verb,
                objects: k.objects,
                argv: k.argv,
                risk: k.risk,
                fingerprint: k.fingerprint,
            }),
        }
    }
}

impl From<&v1::Command> for core::Command {
    fn from(c: &v1::Command) -> Self {
        c.clone().into()
    }
}

impl From<v1::Command> for core::Command {
    fn from(c: v1::Command) -> Self {
        let k = c.classification.unwrap_or_default();
        core::Command {
            text: c.text,
            classification: core::Classification {
                kind: k.kind,
                verb: k.verb,
                objects: k.objects,
                argv: k.argv,
                risk: k.risk.min(100),
                fingerprint: k.fingerprint,
            },
        }
    }
}

impl From<&core::ReasoningTrace> for v1::ReasoningTrace {
    fn from(t: &core::ReasoningTrace) -> Self {
        t.clone().into()
    }
}

impl From<core::ReasoningTrace> for v1::ReasoningTrace {
    fn from(t: core::ReasoningTrace) -> Self {
        v1::ReasoningTrace {
            trace_id: t.trace_id,
            reasoning: t.reasoning,
            prompt: t.prompt,
            steps: t
                .steps
                .into_iter()
                .map(|s| v1::ReasoningStep {
                    description: s.description,
                    tool: s.tool,
                    observation: s.observation,
                })
                .collect(),
            confidence: t.confidence,
            sources: t.sources,
        }
    }
}

impl From<&v1::ReasoningTrace> for core::ReasoningTrace {
    fn from(t: &v1::ReasoningTrace) -> Self {
        t.clone().into()
    }
}

impl From<v1::ReasoningTrace> for core::ReasoningTrace {
    fn from(t: v1::ReasoningTrace) -> Self {
        core::ReasoningTrace {
            trace_id: t.trace_id,
            reasoning: t.reasoning,
            prompt: t.prompt,
            steps: t
                .steps
                .into_iter()
                .map(|s| core::ReasoningStep {
                    description: s.description,
                    tool: s.tool,
                    observation: s.observation,
                })
                .collect(),
            confidence: if t.confidence.is_finite() {
                t.confidence.clamp(0.0, 1.0)
            } else {
                0.0
            },
            sources: t.sources,
        }
    }
}

impl From<&core::ReviewSpec> for v1::ReviewSpec {
    fn from(r: &core::ReviewSpec) -> Self {
        r.clone().into()
    }
}

impl From<core::ReviewSpec> for v1::ReviewSpec {
    fn from(r: core::ReviewSpec) -> Self {
        v1::ReviewSpec {
            approver_groups: r.approver_groups,
            quorum: r.quorum,
            one_per_group: r.one_per_group,
            timeout_seconds: r.timeout_seconds,
            reuse_seconds: r.reuse_seconds,
        }
    }
}

impl From<&core::Decision> for v1::DecisionInfo {
    fn from(d: &core::Decision) -> Self {
        d.clone().into()
    }
}

impl From<core::Decision> for v1::DecisionInfo {
    fn from(d: core::Decision) -> Self {
        v1::DecisionInfo {
            effect: effect(d.effect) as i32,
            rule: d.rule,
            reason: d.reason,
            review: d.review.map(Into::into),
        }
    }
}

impl From<&v1::DecisionInfo> for core::Decision {
    fn from(d: &v1::DecisionInfo) -> Self {
        d.clone().into()
    }
}

impl From<v1::DecisionInfo> for core::Decision {
    fn from(d: v1::DecisionInfo) -> Self {
        core::Decision {
            effect: from_effect(d.effect),
            rule: d.rule,
            reason: d.reason,
            review: d.review.map(|r| core::ReviewSpec {
                approver_groups: r.approver_groups,
                quorum: r.quorum.max(1),
                one_per_group: r.one_per_group,
                timeout_seconds: r.timeout_seconds,
                reuse_seconds: r.reuse_seconds,
            }),
        }
    }
}

/// Audit kind to wire.
pub fn audit_kind(k: core::AuditKind) -> v1::AuditKind {
    match k {
        core::AuditKind::SessionStart => v1::AuditKind::SessionStart,
        core::AuditKind::SessionEnd => v1::AuditKind::SessionEnd,
        core::AuditKind::Command => v1::AuditKind::Command,
        core::AuditKind::AuthFailure => v1::AuditKind::AuthFailure,
        core::AuditKind::Approval => v1::AuditKind::Approval,
        core::AuditKind::Output => v1::AuditKind::Output,
        core::AuditKind::Notice => v1::AuditKind::Notice,
        core::AuditKind::CommandResult => v1::AuditKind::CommandResult,
    }
}

impl From<&core::AuditEvent> for v1::AuditEvent {
    fn from(e: &core::AuditEvent) -> Self {
        e.clone().into()
    }
}

/// By value: the event's strings and maps move instead of being copied (a
/// sidecar's reporter converts every event it sends, then drops it).
impl From<core::AuditEvent> for v1::AuditEvent {
    fn from(e: core::AuditEvent) -> Self {
        v1::AuditEvent {
            time: Some(ts(e.time)),
            kind: audit_kind(e.kind) as i32,
            principal: e.principal.map(Into::into),
            command: e.command.map(Into::into),
            decision: e.decision.map(Into::into),
            reasoning: e.reasoning.map(Into::into),
            id: e.id,
            session_id: e.session_id,
            seq: e.seq,
            connection: e.connection,
            traceparent: e.traceparent,
            masked: e.masked.into_iter().collect(),
            client_addr: e.client_addr,
            client_app: e.client_app,
            details: e.details.into_iter().collect(),
            end_reason: e.end_reason,
        }
    }
}

impl TryFrom<&v1::AuditEvent> for core::AuditEvent {
    type Error = String;
    fn try_from(e: &v1::AuditEvent) -> Result<Self, String> {
        e.clone().try_into()
    }
}

impl TryFrom<v1::AuditEvent> for core::AuditEvent {
    type Error = String;
    fn try_from(e: v1::AuditEvent) -> Result<Self, String> {
        let ev = audit_event_unchecked_owned(e)?;
        ev.validate()?;
        Ok(ev)
    }
}

/// The event without [`core::AuditEvent::validate`]'s checks (a known kind
/// and a valid time are still required).
pub fn audit_event_unchecked(e: &v1::AuditEvent) -> Result<core::AuditEvent, String> {
    audit_event_unchecked_owned(e.clone())
}

/// [`audit_event_unchecked`] taking the event: its strings move instead
/// of being copied (the control service's ingest converts every event).
pub fn audit_event_unchecked_owned(e: v1::AuditEvent) -> Result<core::AuditEvent, String> {
    let kind = match v1::AuditKind::try_from(e.kind) {
        Ok(v1::AuditKind::SessionStart) => core::AuditKind::SessionStart,
        Ok(v1::AuditKind::SessionEnd) => core::AuditKind::SessionEnd,
        Ok(v1::AuditKind::Command) => core::AuditKind::Command,
        Ok(v1::AuditKind::AuthFailure) => core::AuditKind::AuthFailure,
        Ok(v1::AuditKind::Approval) => core::AuditKind::Approval,
        Ok(v1::AuditKind::Output) => core::AuditKind::Output,
        Ok(v1::AuditKind::Notice) => core::AuditKind::Notice,
        Ok(v1::AuditKind::CommandResult) => core::AuditKind::CommandResult,
        _ => return Err("kind: unspecified or unknown".into()),
    };
    let time = from_ts(e.time.as_ref()).ok_or("time: missing or out of range")?;
    Ok(core::AuditEvent {
        id: e.id,
        session_id: e.session_id,
        seq: e.seq,
        time,
        kind,
        connection: e.connection,
        principal: e.principal.map(Into::into),
        command: e.command.map(Into::into),
        decision: e.decision.map(Into::into),
        reasoning: e.reasoning.map(Into::into),
        traceparent: e.traceparent,
        masked: e.masked.into_iter().collect(),
        client_addr: e.client_addr,
        client_app: e.client_app,
        details: e.details.into_iter().collect(),
        end_reason: e.end_reason,
    })
}

/// Approval state to wire.
pub fn approval_state(s: core::ApprovalState) -> v1::ApprovalState {
    match s {
        core::ApprovalState::Pending => v1::ApprovalState::Pending,
        core::ApprovalState::Approved => v1::ApprovalState::Approved,
        core::ApprovalState::Denied => v1::ApprovalState::Denied,
        core::ApprovalState::Expired => v1::ApprovalState::Expired,
    }
}

/// Approval state from wire (None for unspecified).
pub fn from_approval_state(s: i32) -> Option<core::ApprovalState> {
    match v1::ApprovalState::try_from(s) {
        Ok(v1::ApprovalState::Pending) => Some(core::ApprovalState::Pending),
        Ok(v1::ApprovalState::Approved) => Some(core::ApprovalState::Approved),
        Ok(v1::ApprovalState::Denied) => Some(core::ApprovalState::Denied),
        Ok(v1::ApprovalState::Expired) => Some(core::ApprovalState::Expired),
        _ => None,
    }
}

impl From<&core::ApprovalRequest> for v1::ApprovalRequest {
    fn from(r: &core::ApprovalRequest) -> Self {
        v1::ApprovalRequest {
            request_id: r.request_id.clone(),
            session_id: r.session_id.clone(),
            connection: r.connection.clone(),
            principal: Some((&r.principal).into()),
            command: Some((&r.command).into()),
            decision: Some((&r.decision).into()),
            reasoning: r.reasoning.as_ref().map(Into::into),
        }
    }
}

impl From<&core::Vote> for v1::ApprovalVote {
    fn from(v: &core::Vote) -> Self {
        v1::ApprovalVote {
            approver: v.approver.clone(),
            approve: v.approve,
            comment: v.comment.clone(),
            at: Some(ts(v.at)),
            reuse_seconds: v.reuse_seconds,
        }
    }
}

impl From<&core::Approval> for v1::Approval {
    fn from(a: &core::Approval) -> Self {
        v1::Approval {
            id: a.id.clone(),
            request: Some((&a.request).into()),
            state: approval_state(a.state) as i32,
            votes: a.votes.iter().map(Into::into).collect(),
            created_at: Some(ts(a.created_at)),
            expires_at: Some(ts(a.expires_at)),
            reason: a.reason.clone(),
            reuse_until: a.reuse_until.map(ts),
        }
    }
}

impl From<&core::Approval> for v1::ApprovalUpdate {
    fn from(a: &core::Approval) -> Self {
        v1::ApprovalUpdate {
            approval_id: a.id.clone(),
            state: approval_state(a.state) as i32,
            votes: a.votes.iter().map(Into::into).collect(),
            reason: a.reason.clone(),
            expires_at: Some(ts(a.expires_at)),
        }
    }
}

// Tamper evidence. A stored hash of the wrong size becomes all zeros, which
// matches nothing signed, so the verifier reports it rather than failing.

fn hash(b: &[u8]) -> core::evidence::Hash {
    core::evidence::hash_from(b).unwrap_or_default()
}

impl From<&v1::ChainedEvent> for core::evidence::ChainedEvent {
    fn from(e: &v1::ChainedEvent) -> Self {
        core::evidence::ChainedEvent {
            index: e.index,
            id: e.id.clone(),
            body: e.body.clone(),
            hash: hash(&e.hash),
        }
    }
}

impl From<core::evidence::ChainedEvent> for v1::ChainedEvent {
    fn from(e: core::evidence::ChainedEvent) -> Self {
        v1::ChainedEvent {
            index: e.index,
            id: e.id,
            body: e.body,
            hash: e.hash.to_vec(),
        }
    }
}

impl From<v1::AuditSeal> for core::evidence::Seal {
    fn from(s: v1::AuditSeal) -> Self {
        core::evidence::Seal {
            len: s.len,
            head: hash(&s.head),
            sealed_at_ms: s.sealed_at_ms,
            signature: s.signature,
            key_id: s.key_id,
        }
    }
}

impl From<core::evidence::Seal> for v1::AuditSeal {
    fn from(s: core::evidence::Seal) -> Self {
        v1::AuditSeal {
            len: s.len,
            head: s.head.to_vec(),
            sealed_at_ms: s.sealed_at_ms,
            signature: s.signature,
            key_id: s.key_id,
        }
    }
}

impl From<core::evidence::Checkpoint> for v1::AuditCheckpoint {
    fn from(c: core::evidence::Checkpoint) -> Self {
        v1::AuditCheckpoint {
            root_seq: c.root_seq,
            len: c.len,
            head: c.head.to_vec(),
        }
    }
}

impl From<&v1::AuditRoot> for core::evidence::Root {
    fn from(r: &v1::AuditRoot) -> Self {
        core::evidence::Root {
            seq: r.seq,
            created_at_ms: r.created_at_ms,
            prev: hash(&r.prev),
            root: hash(&r.root),
            leaves: r.leaves,
            signature: r.signature.clone(),
            key_id: r.key_id.clone(),
        }
    }
}

impl From<&core::evidence::Root> for v1::AuditRoot {
    fn from(r: &core::evidence::Root) -> Self {
        v1::AuditRoot {
            seq: r.seq,
            created_at_ms: r.created_at_ms,
            prev: r.prev.to_vec(),
            root: r.root.to_vec(),
            leaves: r.leaves,
            signature: r.signature.clone(),
            key_id: r.key_id.clone(),
        }
    }
}

impl From<&v1::AuditLeaf> for core::evidence::Leaf {
    fn from(l: &v1::AuditLeaf) -> Self {
        core::evidence::Leaf {
            session_id: l.session_id.clone(),
            len: l.len,
            head: hash(&l.head),
        }
    }
}

impl From<&core::evidence::Leaf> for v1::AuditLeaf {
    fn from(l: &core::evidence::Leaf) -> Self {
        v1::AuditLeaf {
            session_id: l.session_id.clone(),
            len: l.len,
            head: l.head.to_vec(),
        }
    }
}

/// A wire deletion record, with the session it answers for.
pub fn deletion(session_id: &str, d: v1::AuditDeletion) -> core::evidence::Deletion {
    core::evidence::Deletion {
        session_id: session_id.to_string(),
        len: d.len,
        head: hash(&d.head),
        deleted_at_ms: d.deleted_at_ms,
        reason: d.reason,
        signature: d.signature,
        key_id: d.key_id,
    }
}

impl From<core::evidence::Deletion> for v1::AuditDeletion {
    fn from(d: core::evidence::Deletion) -> Self {
        v1::AuditDeletion {
            len: d.len,
            head: d.head.to_vec(),
            deleted_at_ms: d.deleted_at_ms,
            reason: d.reason,
            signature: d.signature,
            key_id: d.key_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_events_round_trip() {
        let e = core::AuditEvent {
            id: "e1".into(),
            session_id: "s1".into(),
            seq: 7,
            time: Utc.timestamp_opt(1_700_000_000, 123_000_000).unwrap(),
            kind: core::AuditKind::Command,
            connection: "db".into(),
            principal: Some(core::Principal {
                subject: "bot".into(),
                kind: core::PrincipalKind::Agent,
                ..Default::default()
            }),
            command: Some(core::Command {
                text: "SELECT 1".into(),
                classification: core::Classification {
                    kind: "select".into(),
                    risk: 5,
                    ..Default::default()
                },
            }),
            decision: Some(core::Decision::deny("r", "because")),
            masked: [("email".to_string(), 2u64)].into(),
            ..Default::default()
        };
        let wire = v1::AuditEvent::from(&e);
        assert_eq!(core::AuditEvent::try_from(&wire).unwrap(), e);
        let mut bad = wire.clone();
        bad.kind = 0;
        assert!(
            core::AuditEvent::try_from(&bad)
                .unwrap_err()
                .contains("kind")
        );
        let mut bad = wire;
        bad.time = None;
        assert!(
            core::AuditEvent::try_from(&bad)
                .unwrap_err()
                .contains("time")
        );
    }

    #[test]
    fn unknown_effects_fail_closed() {
        assert_eq!(from_effect(0), core::Effect::Deny);
        assert_eq!(from_effect(99), core::Effect::Deny);
        assert_eq!(from_effect(v1::Effect::Allow as i32), core::Effect::Allow);
    }
}
