//! The audit event: one typed record drives the audit trail, the log line and metrics.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::types::{Command, Decision, Principal, ReasoningTrace};

/// Kinds of audit events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A session opened (after authentication and the grant check).
    SessionStart,
    /// A session closed.
    SessionEnd,
    /// A command was decided (and run, if allowed).
    #[default]
    Command,
    /// Authentication failed.
    AuthFailure,
    /// An approval was requested or decided.
    Approval,
    /// Output recorded for a command.
    Output,
    /// How a command ended (rows, duration, error); `details.command_id`
    /// names its `command` event.
    CommandResult,
    /// Anything else worth keeping.
    Notice,
}

impl AuditKind {
    /// Stable snake_case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::SessionStart => "session_start",
            AuditKind::SessionEnd => "session_end",
            AuditKind::Command => "command",
            AuditKind::AuthFailure => "auth_failure",
            AuditKind::Approval => "approval",
            AuditKind::Output => "output",
            AuditKind::Notice => "notice",
            AuditKind::CommandResult => "command_result",
        }
    }
}

/// One audit event. `id` is stable, so a replayed event is stored once.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Sidecar-minted unique id.
    pub id: String,
    /// Session the event belongs to.
    pub session_id: String,
    /// Sequence number within the session.
    pub seq: u64,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// What happened.
    pub kind: AuditKind,
    /// Connection name.
    pub connection: String,
    /// Verified caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<Principal>,
    /// The command, for command events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Command>,
    /// The decision, for command and approval events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// The caller's reasoning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<ReasoningTrace>,
    /// W3C traceparent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
    /// Masking counts per entity type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub masked: BTreeMap<String, u64>,
    /// Client address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_addr: String,
    /// Client program.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_app: String,
    /// Free-form details (never secrets).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
    /// For session end: why.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub end_reason: String,
}

impl AuditEvent {
    /// Checks what the store relies on: an id, a session and a connection.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() || self.id.len() > 128 {
            return Err("event id must be 1..=128 characters".into());
        }
        if self.session_id.is_empty() || self.session_id.len() > 128 {
            return Err("session id must be 1..=128 characters".into());
        }
        if self.connection.is_empty() {
            return Err("connection is required".into());
        }
        if matches!(self.kind, AuditKind::SessionStart) && self.principal.is_none() {
            return Err("session_start events need a principal".into());
        }
        Ok(())
    }
}
