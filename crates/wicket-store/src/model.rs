//! Records the store keeps, beside the `wicket-core` types it stores as JSON.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use wicket_core::Principal;

/// One applied policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVersion {
    /// Strictly increasing.
    pub version: u64,
    /// The document as applied (YAML or JSON text).
    pub document: String,
    /// SHA-256 of the canonical JSON form.
    pub sha256: String,
    /// Who applied it.
    pub applied_by: String,
    /// When.
    pub applied_at: DateTime<Utc>,
}

/// A just-in-time access grant: an approved access request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessGrant {
    /// Id (`jit-` and the approval's id).
    pub id: String,
    /// The approval that granted it.
    pub approval_id: String,
    /// The grantee's issuer.
    pub issuer: String,
    /// The grantee's subject.
    pub subject: String,
    /// The grantee as people read it.
    pub label: String,
    /// Connection name.
    pub connection: String,
    /// Why it was asked for.
    pub reason: String,
    /// When it was approved.
    pub granted_at: DateTime<Utc>,
    /// When it lapses.
    pub until: DateTime<Utc>,
}

/// A session, derived from its audit events.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// Id.
    pub id: String,
    /// Connection name.
    pub connection: String,
    /// Who opened it.
    pub principal: Principal,
    /// First event time.
    pub started_at: DateTime<Utc>,
    /// Set when it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// `active`, `terminating` or `ended`.
    pub state: String,
    /// Why it ended.
    pub end_reason: String,
    /// Number of command events.
    pub command_count: u64,
    /// Client address.
    pub client_addr: String,
    /// Client program.
    pub client_app: String,
    /// Legal hold: why the session must be kept (empty: not held).
    pub hold: String,
}

/// Filter for listing sessions.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// Connection name.
    pub connection: Option<String>,
    /// Principal subject.
    pub principal: Option<String>,
    /// Only sessions not ended.
    pub active_only: bool,
    /// Max rows (default 100, at most 1000).
    pub limit: u32,
}

/// What `search_events` looks for; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventSearch {
    /// Text anywhere in the stored event (command, details, reasoning),
    /// case-insensitive.
    pub text: String,
    /// Principal subject or display name of the event's session.
    pub principal: String,
    /// Connection name.
    pub connection: String,
    /// Decision effect (`allow`, `review`, `deny`) or approval outcome
    /// (`approved`, `denied`, `expired`, `covered`).
    pub decision: String,
    /// Events at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Events before this time.
    pub until: Option<DateTime<Utc>>,
    /// Max rows (default 100, at most 1000).
    pub limit: u32,
}

/// A principal revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Issuer.
    pub issuer: String,
    /// Subject.
    pub subject: String,
    /// Why.
    pub reason: String,
    /// When.
    pub revoked_at: DateTime<Utc>,
    /// Lifts at this time, if set.
    pub until: Option<DateTime<Utc>>,
}

/// A sidecar credential (the secret itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarRecord {
    /// Public id (part of the token).
    pub id: String,
    /// Name.
    pub name: String,
    /// Connections it may serve.
    pub connections: Vec<String>,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Revoked.
    pub revoked: bool,
}
