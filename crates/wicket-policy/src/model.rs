//! The policy document: what `wicket policy apply -f FILE` reads.
//!
//! Unknown fields are refused so a typo never silently weakens a policy.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use wicket_core::{Effect, PrincipalKind, Protocol};

/// A whole policy document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Document schema version; only `1` exists.
    #[serde(default = "one")]
    pub version: u32,
    /// What happens when no rule matches.
    #[serde(default)]
    pub defaults: Defaults,
    /// Settings for non-human principals.
    #[serde(default)]
    pub agents: AgentSettings,
    /// Protected resources.
    #[serde(default)]
    pub connections: Vec<ConnectionSpec>,
    /// Who may open sessions where.
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Per-command rules.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Custom masking detectors.
    #[serde(default)]
    pub detectors: Vec<CustomDetector>,
    /// Who may ask for just-in-time access where, and who approves it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<AccessRule>,
}

/// A just-in-time access rule: principals it names may ask for a
/// time-bound grant on its connections; once its approvers approve, the
/// grant reaches the sidecars and lapses by itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Unique id, named in the approval.
    pub id: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Connection names or globs.
    pub connections: Vec<String>,
    /// Who may ask: subjects or display names (any matches).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Who may ask: groups (any matches). Empty with empty `principals`: nobody.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Restrict askers to humans or agents (empty: both).
    #[serde(default)]
    pub kinds: Vec<PrincipalKind>,
    /// How the request is approved (approvers, quorum, how long it waits).
    pub review: ReviewDoc,
    /// Longest grant one request may ask for (`1h`; default 1h, at most 7d).
    #[serde(default = "default_access_max")]
    pub max: Seconds,
}

fn default_access_max() -> Seconds {
    Seconds(3600)
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// Defaults applied when no rule matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Effect for commands no rule matches. Fail closed: `deny` unless set.
    #[serde(default)]
    pub effect: Effect,
    /// Review settings used by `review` rules that give none of their own.
    #[serde(default)]
    pub review: Option<ReviewDoc>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            effect: Effect::Deny,
            review: None,
        }
    }
}

/// Settings for agents (non-human principals).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Refuse agents' commands that carry no reasoning trace.
    #[serde(default)]
    pub require_reasoning: bool,
}

/// A protected resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionSpec {
    /// Unique name (`[a-z0-9][a-z0-9._-]*`).
    pub name: String,
    /// Gated protocol.
    pub protocol: Protocol,
    /// `host:port` the sidecar reaches.
    #[serde(default)]
    pub upstream: String,
    /// Labels rules and grants can select on.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Overrides `agents.require_reasoning` for this connection.
    #[serde(default)]
    pub require_reasoning: Option<bool>,
    /// Masking of what comes back.
    #[serde(default)]
    pub masking: MaskingSpec,
    /// Recording and retention.
    #[serde(default)]
    pub recording: RecordingSpec,
    /// HTTP routes and request inspection (HTTP connections only).
    #[serde(default)]
    pub http: HttpSpec,
}

/// How an HTTP gate names and inspects requests.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// Route patterns, tried in order; the first match names the request.
    #[serde(default)]
    pub routes: Vec<HttpRoute>,
    /// Request headers whose values join the classification (`header:NAME=VALUE`).
    #[serde(default)]
    pub headers: Vec<String>,
    /// JSON paths read from every JSON request body (`field:PATH=VALUE`);
    /// routes add their own.
    #[serde(default)]
    pub body_fields: Vec<String>,
}

/// One HTTP route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    /// Name, shown in audit events and matched by rules as `route:NAME` in
    /// `command.objects`.
    pub name: String,
    /// Methods (empty: any).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Host glob (`*.internal`; empty: any).
    #[serde(default)]
    pub host: String,
    /// Path pattern: literal segments, `{name}` or `*` for one segment, a
    /// final `**` for any rest (`/api/users/{id}`, `/admin/**`).
    pub path: String,
    /// Command class for rules (default: by method: `read`, `write`, `delete`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Risk 0..=100 (default: by method).
    #[serde(default)]
    pub risk: Option<u32>,
    /// JSON paths read from this route's JSON request bodies.
    #[serde(default)]
    pub body_fields: Vec<String>,
    /// Largest request body accepted on this route, in bytes.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
}

/// How a masked value is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskStyle {
    /// Replace the whole value.
    #[default]
    Redact,
    /// Keep the last four characters (`****1234`).
    Partial,
    /// Keyed hash, so masked values still join and group.
    Hash,
}

/// Masking settings of a connection.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingSpec {
    /// Column rules (`schema.table.column`, `*` allowed) for databases.
    #[serde(default)]
    pub columns: Vec<ColumnMask>,
    /// Field rules (JSON paths such as `$.user.email`) for HTTP and Kubernetes.
    #[serde(default)]
    pub fields: Vec<FieldMask>,
    /// Content detectors applied to every text value (built-in or custom names).
    #[serde(default)]
    pub detectors: Vec<String>,
    /// Style for detector hits.
    #[serde(default)]
    pub style: MaskStyle,
    /// Refuse statements whose results derive from a masked column other
    /// than as the column itself (expressions, whole rows, subqueries, set
    /// operations…), naming the column.
    #[serde(default)]
    pub strict: bool,
}

/// A column masking rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnMask {
    /// `schema.table.column`, each part a name or a `*` glob.
    pub column: String,
    /// Replacement style.
    #[serde(default)]
    pub style: MaskStyle,
}

/// A field masking rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMask {
    /// JSON path, e.g. `$.items[*].email`.
    pub path: String,
    /// Replacement style.
    #[serde(default)]
    pub style: MaskStyle,
}

/// Recording settings of a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordingSpec {
    /// Record sessions (on by default).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Record output as well as commands.
    #[serde(default = "yes")]
    pub capture_output: bool,
    /// Delete recordings after this many days (unset: keep).
    #[serde(default)]
    pub retention_days: Option<u32>,
    /// Refuse commands when the audit spool is full (fail closed; on by default).
    #[serde(default = "yes")]
    pub refuse_when_spool_full: bool,
}

impl Default for RecordingSpec {
    fn default() -> Self {
        RecordingSpec {
            enabled: true,
            capture_output: true,
            retention_days: None,
            refuse_when_spool_full: true,
        }
    }
}

/// Who may open sessions on which connections. No grant, no session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Unique id.
    pub id: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Connection names or globs (`prod-*`, `*`).
    #[serde(default)]
    pub connections: Vec<String>,
    /// Labels the connection must carry (all of them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Subjects or display names (any matches). Empty with empty `groups`: nobody.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Groups (any matches).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Restrict to humans or agents (empty: both).
    #[serde(default)]
    pub kinds: Vec<PrincipalKind>,
    /// The grant lapses at this instant.
    #[serde(default)]
    pub expires: Option<DateTime<Utc>>,
    /// Set on just-in-time grants: the grant is for the principal of this
    /// issuer whose subject is exactly one of `principals` (no globs, no
    /// display names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

/// A per-command rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique id, named in refusals and audit events.
    pub id: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// What happens when the rule matches.
    pub effect: Effect,
    /// Structural match (every listed field must match; empty fields match all).
    #[serde(default, rename = "match")]
    pub matches: Match,
    /// Optional CEL condition; the rule matches only when it is `true`.
    #[serde(default)]
    pub condition: Option<String>,
    /// Approval settings for `review`.
    #[serde(default)]
    pub review: Option<ReviewDoc>,
}

/// Structural part of a rule.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Protocols.
    #[serde(default)]
    pub protocols: Vec<Protocol>,
    /// Connection names or globs.
    #[serde(default)]
    pub connections: Vec<String>,
    /// Labels the connection must carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Subjects or display names.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Groups (any).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Human or agent.
    #[serde(default)]
    pub kinds: Vec<PrincipalKind>,
    /// Command classes (`select`, `ddl`, `exec`, …).
    #[serde(default)]
    pub commands: Vec<String>,
    /// Verbs (SQL keyword, HTTP method, kubectl verb, program name).
    #[serde(default)]
    pub verbs: Vec<String>,
}

/// Review settings as written in a document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewDoc {
    /// Groups whose members may approve.
    pub approvers: Vec<String>,
    /// Approvals needed.
    #[serde(default = "one")]
    pub quorum: u32,
    /// One approval from each listed group instead of a count.
    #[serde(default)]
    pub one_per_group: bool,
    /// Hold timeout (`90s`, `10m`, `1h`, or seconds).
    #[serde(default = "default_timeout")]
    pub timeout: Seconds,
    /// Longest approvers may let one approval cover the same statement
    /// fingerprint (or command) again, for the same principal on the same
    /// connection (`30m`; default 0: one execution).
    #[serde(default)]
    pub reuse_for: Seconds,
}

impl ReviewDoc {
    /// The review as decisions carry it.
    pub fn spec(&self) -> wicket_core::ReviewSpec {
        wicket_core::ReviewSpec {
            approver_groups: self.approvers.clone(),
            quorum: if self.one_per_group {
                self.approvers.len() as u32
            } else {
                self.quorum
            },
            one_per_group: self.one_per_group,
            timeout_seconds: self.timeout.0,
            reuse_seconds: self.reuse_for.0,
        }
    }
}

fn default_timeout() -> Seconds {
    Seconds(300)
}

/// A duration in whole seconds, written as `90s`, `10m`, `1h`, `1d` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seconds(pub u32);

impl Seconds {
    /// Parses `90s`, `10m`, `1h`, `1d` or a bare number of seconds.
    pub fn parse(s: &str) -> Result<Self, String> {
        wicket_core::parse_seconds(s).map(Seconds)
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", self.0))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Seconds(n)),
            Raw::S(s) => Seconds::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A custom content detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomDetector {
    /// Name used in `masking.detectors`.
    pub name: String,
    /// Regular expression (Rust `regex` syntax).
    pub regex: String,
}

#[cfg(test)]
mod tests {
    use super::Seconds;

    #[test]
    fn durations_parse() {
        for (s, n) in [
            ("90s", 90),
            ("10m", 600),
            ("1h", 3600),
            ("2d", 172_800),
            ("45", 45),
        ] {
            assert_eq!(Seconds::parse(s), Ok(Seconds(n)), "{s}");
        }
        for bad in ["", "m", "-1s", "1w", "99999999999h"] {
            assert!(Seconds::parse(bad).is_err(), "{bad}");
        }
    }
}
