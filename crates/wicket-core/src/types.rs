//! Principals, connections, commands and decisions.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Protocol a sidecar gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// PostgreSQL wire protocol.
    Postgres,
    /// SSH.
    Ssh,
    /// Kubernetes API.
    Kubernetes,
    /// Plain HTTP services.
    Http,
}

impl Protocol {
    /// Every protocol, in a stable order.
    pub const ALL: [Protocol; 4] = [
        Protocol::Postgres,
        Protocol::Ssh,
        Protocol::Kubernetes,
        Protocol::Http,
    ];

    /// The lowercase name used in policy documents and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::Ssh => "ssh",
            Protocol::Kubernetes => "kubernetes",
            Protocol::Http => "http",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" | "pg" => Ok(Protocol::Postgres),
            "ssh" => Ok(Protocol::Ssh),
            "kubernetes" | "k8s" => Ok(Protocol::Kubernetes),
            "http" | "https" => Ok(Protocol::Http),
            other => Err(format!(
                "unknown protocol `{other}` (expected postgres, ssh, kubernetes or http)"
            )),
        }
    }
}

/// Whether a principal is a person or a non-human agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    /// A person.
    #[default]
    Human,
    /// An AI agent, a script or a service account.
    Agent,
}

impl PrincipalKind {
    /// `human` or `agent`.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Human => "human",
            PrincipalKind::Agent => "agent",
        }
    }
}

impl fmt::Display for PrincipalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PrincipalKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(PrincipalKind::Human),
            "agent" => Ok(PrincipalKind::Agent),
            other => Err(format!(
                "unknown principal kind `{other}` (expected human or agent)"
            )),
        }
    }
}

/// A verified caller, derived from a validated OIDC access token.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Principal {
    /// `sub` claim.
    pub subject: String,
    /// `iss` claim.
    pub issuer: String,
    /// Person or agent.
    pub kind: PrincipalKind,
    /// Groups from the configured groups claim.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Email or preferred username, when present.
    #[serde(default)]
    pub display_name: String,
    /// OAuth client that obtained the token.
    #[serde(default)]
    pub client_id: String,
}

impl Principal {
    /// Whether the principal is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// The name to show: display name if set, else subject.
    pub fn label(&self) -> &str {
        if self.display_name.is_empty() {
            &self.subject
        } else {
            &self.display_name
        }
    }
}

/// A protected resource reached through one sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// Unique name.
    pub name: String,
    /// Gated protocol.
    pub protocol: Protocol,
    /// Free-form labels rules can match on.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `host:port` of the upstream resource.
    #[serde(default)]
    pub upstream: String,
    /// Human description.
    #[serde(default)]
    pub description: String,
}

/// What a sidecar understood a command to be.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Classification {
    /// Command class, e.g. `select`, `ddl`, `exec`, `delete`.
    pub kind: String,
    /// Protocol verb (SQL keyword, HTTP method, kubectl verb, argv\[0\]).
    #[serde(default)]
    pub verb: String,
    /// Objects touched (tables, paths, resources).
    #[serde(default)]
    pub objects: Vec<String>,
    /// Parsed argv for shell-like commands.
    #[serde(default)]
    pub argv: Vec<String>,
    /// Risk score 0..=100.
    #[serde(default)]
    pub risk: u32,
    /// Statement fingerprint.
    #[serde(default)]
    pub fingerprint: String,
}

/// A command as a sidecar saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Command {
    /// Command text (masked where policy says so).
    pub text: String,
    /// Classification.
    pub classification: Classification,
}

/// One step of a structured reasoning trace.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReasoningStep {
    /// What the agent did or thought.
    pub description: String,
    /// Tool used, if any.
    #[serde(default)]
    pub tool: String,
    /// What it observed.
    #[serde(default)]
    pub observation: String,
}

/// The caller's own account of why it runs a command.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReasoningTrace {
    /// W3C trace id (32 lowercase hex digits).
    #[serde(default)]
    pub trace_id: String,
    /// Free-text reasoning sent inline.
    #[serde(default)]
    pub reasoning: String,
    /// The prompt or task given to the agent.
    #[serde(default)]
    pub prompt: String,
    /// Steps.
    #[serde(default)]
    pub steps: Vec<ReasoningStep>,
    /// Confidence in \[0, 1\].
    #[serde(default)]
    pub confidence: f64,
    /// Sources relied on.
    #[serde(default)]
    pub sources: Vec<String>,
}

impl ReasoningTrace {
    /// Whether the trace says anything at all.
    pub fn is_present(&self) -> bool {
        !self.reasoning.trim().is_empty()
            || !self.prompt.trim().is_empty()
            || !self.steps.is_empty()
    }

    /// Whether `id` is a valid, non-zero W3C trace id.
    pub fn valid_trace_id(id: &str) -> bool {
        id.len() == 32
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && id.bytes().any(|b| b != b'0')
    }
}

/// A policy effect, ordered from least to most restrictive.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Run the command.
    Allow,
    /// Hold it for human approval.
    Review,
    /// Refuse it.
    #[default]
    Deny,
}

impl Effect {
    /// `allow`, `review` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Review => "review",
            Effect::Deny => "deny",
        }
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a held command gets approved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewSpec {
    /// Groups whose members may approve.
    pub approver_groups: Vec<String>,
    /// Number of approvals needed.
    pub quorum: u32,
    /// One approval from each listed group instead of a plain count.
    #[serde(default)]
    pub one_per_group: bool,
    /// Hold timeout; past it the command is refused.
    pub timeout_seconds: u32,
    /// Longest an approval may cover the same statement fingerprint (or
    /// the same command) again, for the same principal and connection; 0:
    /// each approval covers one execution.
    #[serde(default)]
    pub reuse_seconds: u32,
}

impl Default for ReviewSpec {
    fn default() -> Self {
        ReviewSpec {
            approver_groups: Vec::new(),
            quorum: 1,
            one_per_group: false,
            timeout_seconds: 300,
            reuse_seconds: 0,
        }
    }
}

/// A decision and the rule behind it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Decision {
    /// Effect.
    pub effect: Effect,
    /// Rule id, or a built-in reason (`default-deny`, `no-grant`, `require-reasoning`, …).
    pub rule: String,
    /// Human-readable explanation.
    pub reason: String,
    /// For review: how to approve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewSpec>,
}

impl Decision {
    /// A deny decision from a built-in reason.
    pub fn deny(rule: impl Into<String>, reason: impl Into<String>) -> Self {
        Decision {
            effect: Effect::Deny,
            rule: rule.into(),
            reason: reason.into(),
            review: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects_order_by_restrictiveness() {
        assert!(Effect::Allow < Effect::Review);
        assert!(Effect::Review < Effect::Deny);
        assert_eq!(
            [Effect::Review, Effect::Allow, Effect::Deny].iter().max(),
            Some(&Effect::Deny)
        );
    }

    #[test]
    fn protocol_round_trips_through_text_and_json() {
        for p in Protocol::ALL {
            assert_eq!(p.as_str().parse::<Protocol>().unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{p}\""));
        }
        assert!("ftp".parse::<Protocol>().unwrap_err().contains("ftp"));
    }

    #[test]
    fn trace_ids_follow_w3c() {
        assert!(ReasoningTrace::valid_trace_id(
            "4bf92f3577b34da6a3ce929d0e0e4736"
        ));
        assert!(!ReasoningTrace::valid_trace_id(
            "00000000000000000000000000000000"
        ));
        assert!(!ReasoningTrace::valid_trace_id(
            "4BF92F3577B34DA6A3CE929D0E0E4736"
        ));
        assert!(!ReasoningTrace::valid_trace_id("4bf92f"));
    }
}
