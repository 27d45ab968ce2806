//! Deciding sessions and commands.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use wicket_core::{Command, Decision, Effect, Principal, PrincipalKind};

use crate::compile::Policy;
use crate::glob;
use crate::model::{ConnectionSpec, Grant, Match};

/// A command to decide.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Verified caller.
    pub principal: &'a Principal,
    /// Connection name.
    pub connection: &'a str,
    /// The classified command.
    pub command: &'a Command,
    /// Whether the caller sent a reasoning trace.
    pub has_reasoning: bool,
    /// Evaluation time.
    pub now: DateTime<Utc>,
}

/// Whether a session may open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionDecision {
    /// A grant allows it, possibly until `expires`.
    Allowed {
        /// Grant id.
        grant: String,
        /// When the grant lapses (the session must end then).
        expires: Option<DateTime<Utc>>,
    },
    /// Refused.
    Denied(Decision),
}

/// One rule that matched, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    /// Rule id.
    pub rule: String,
    /// Its effect (deny for a condition that failed to evaluate).
    pub effect: Effect,
    /// Extra detail, e.g. a CEL error.
    pub note: String,
}

/// A decision with its reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The decision.
    pub decision: Decision,
    /// Every rule that matched, in document order.
    pub matched: Vec<RuleMatch>,
    /// The grant that allows the session, if any.
    pub grant: Option<String>,
}

pub(crate) fn principal_matches(patterns: &[String], p: &Principal) -> bool {
    patterns.is_empty()
        || patterns.iter().any(|pat| {
            glob::matches(pat, &p.subject)
                || (!p.display_name.is_empty() && glob::matches(pat, &p.display_name))
        })
}

fn groups_match(groups: &[String], p: &Principal) -> bool {
    groups.is_empty() || groups.iter().any(|g| p.in_group(g))
}

fn kinds_match(kinds: &[PrincipalKind], p: &Principal) -> bool {
    kinds.is_empty() || kinds.contains(&p.kind)
}

fn grant_allows(g: &Grant, p: &Principal, c: &ConnectionSpec, now: DateTime<Utc>) -> bool {
    let who = match &g.issuer {
        Some(issuer) => *issuer == p.issuer && g.principals.contains(&p.subject),
        None => {
            (!g.principals.is_empty() && principal_matches(&g.principals, p))
                || (!g.groups.is_empty() && groups_match(&g.groups, p))
        }
    };
    who && kinds_match(&g.kinds, p)
        && glob::any(&g.connections, &c.name)
        && g.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v))
        && g.expires.is_none_or(|e| now < e)
}

fn case_insensitive_any(list: &[String], value: &str) -> bool {
    list.is_empty() || list.iter().any(|v| v.eq_ignore_ascii_case(value))
}

fn structural_match(m: &Match, req: &Request<'_>) -> bool {
    principal_matches(&m.principals, req.principal)
        && groups_match(&m.groups, req.principal)
        && kinds_match(&m.kinds, req.principal)
        && case_insensitive_any(&m.commands, &req.command.classification.kind)
        && case_insensitive_any(&m.verbs, &req.command.classification.verb)
}

fn strings(v: &[String]) -> cel::Value {
    cel::Value::from(v.to_vec())
}

fn context<'a>(policy: &Policy, req: &Request<'_>, conn: &ConnectionSpec) -> cel::Context<'a, 'a> {
    let p = req.principal;
    let cls = &req.command.classification;
    let mut ctx = cel::Context::with_env(policy.env.clone());
    let wants = |v: &str| policy.cel_vars.contains(v);
    if wants("principal") {
        let principal: HashMap<String, cel::Value> = HashMap::from([
            ("subject".to_string(), p.subject.as_str().into()),
            ("issuer".to_string(), p.issuer.as_str().into()),
            ("kind".to_string(), p.kind.as_str().into()),
            ("groups".to_string(), strings(&p.groups)),
            ("name".to_string(), p.label().into()),
            ("client_id".to_string(), p.client_id.as_str().into()),
        ]);
        ctx.add_variable_from_value("principal", principal);
    }
    if wants("connection") {
        let labels: HashMap<String, cel::Value> = conn
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().into()))
            .collect();
        let connection: HashMap<String, cel::Value> = HashMap::from([
            ("name".to_string(), conn.name.as_str().into()),
            ("protocol".to_string(), conn.protocol.as_str().into()),
            ("labels".to_string(), labels.into()),
        ]);
        ctx.add_variable_from_value("connection", connection);
    }
    if wants("command") {
        let command: HashMap<String, cel::Value> = HashMap::from([
            ("kind".to_string(), cls.kind.as_str().into()),
            ("verb".to_string(), cls.verb.as_str().into()),
            ("objects".to_string(), strings(&cls.objects)),
            ("argv".to_string(), strings(&cls.argv)),
            ("risk".to_string(), cel::Value::Int(i64::from(cls.risk))),
            ("text".to_string(), req.command.text.as_str().into()),
            ("fingerprint".to_string(), cls.fingerprint.as_str().into()),
        ]);
        ctx.add_variable_from_value("command", command);
    }
    if wants("has_reasoning") {
        ctx.add_variable_from_value("has_reasoning", req.has_reasoning);
    }
    if wants("now") {
        ctx.add_variable_from_value("now", cel::Value::Timestamp(req.now.fixed_offset()));
    }
    ctx
}

impl Policy {
    /// Whether `principal` may open a session on `connection` at `now`.
    pub fn authorize_session(
        &self,
        principal: &Principal,
        connection: &str,
        now: DateTime<Utc>,
    ) -> SessionDecision {
        let Some(conn) = self.connection(connection) else {
            return SessionDecision::Denied(Decision::deny(
                "unknown-connection",
                format!("connection `{connection}` is not defined in the policy"),
            ));
        };
        // Among several grants, the one that lasts longest wins.
        let best = self
            .doc
            .grants
            .iter()
            .filter(|g| grant_allows(g, principal, conn, now))
            .max_by_key(|g| g.expires.unwrap_or(DateTime::<Utc>::MAX_UTC));
        match best {
            Some(g) => SessionDecision::Allowed {
                grant: g.id.clone(),
                expires: g.expires,
            },
            None => SessionDecision::Denied(Decision::deny(
                "no-grant",
                format!(
                    "{} has no grant on connection `{connection}`",
                    principal.label()
                ),
            )),
        }
    }

    /// Decides a command. See the crate docs for the order of checks.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        self.evaluate(req, false).decision
    }

    /// Decides a command and lists every rule that matched.
    pub fn explain(&self, req: &Request<'_>) -> Explanation {
        self.evaluate(req, true)
    }

    fn evaluate(&self, req: &Request<'_>, all: bool) -> Explanation {
        let grant = match self.authorize_session(req.principal, req.connection, req.now) {
            SessionDecision::Allowed { grant, .. } => grant,
            SessionDecision::Denied(decision) => {
                return Explanation {
                    decision,
                    matched: Vec::new(),
                    grant: None,
                };
            }
        };
        let ci = self.connections[req.connection];
        let conn = &self.doc.connections[ci];
        let require_reasoning = conn
            .require_reasoning
            .unwrap_or(self.doc.agents.require_reasoning);
        if require_reasoning && req.principal.kind == PrincipalKind::Agent && !req.has_reasoning {
            return Explanation {
                decision: Decision::deny(
                    "require-reasoning",
                    format!(
                        "agents must send a reasoning trace on connection `{}`",
                        conn.name
                    ),
                ),
                matched: Vec::new(),
                grant: Some(grant),
            };
        }
        let mut ctx: Option<cel::Context<'_, '_>> = None;
        let mut matched = Vec::new();
        let mut best: Option<(usize, Effect, String)> = None;
        for &ri in &self.candidates[ci] {
            let rule = &self.doc.rules[ri];
            if !structural_match(&rule.matches, req) {
                continue;
            }
            let (effect, note) = match &self.rules[ri].condition {
                None => (rule.effect, String::new()),
                Some(program) => {
                    let ctx = ctx.get_or_insert_with(|| context(self, req, conn));
                    match program.execute(ctx) {
                        Ok(cel::Value::Bool(true)) => (rule.effect, String::new()),
                        Ok(cel::Value::Bool(false)) => continue,
                        Ok(other) => (
                            Effect::Deny,
                            format!("condition returned {other:?}, not a bool: counted as deny"),
                        ),
                        Err(e) => (
                            Effect::Deny,
                            format!("condition failed ({e}): counted as deny"),
                        ),
                    }
                }
            };
            if all {
                matched.push(RuleMatch {
                    rule: rule.id.clone(),
                    effect,
                    note: note.clone(),
                });
            }
            if best.as_ref().is_none_or(|(_, e, _)| effect > *e) {
                best = Some((ri, effect, note));
            }
            if effect == Effect::Deny && !all {
                break;
            }
        }
        let decision = match best {
            None => Decision {
                effect: self.doc.defaults.effect,
                rule: "default".into(),
                reason: format!(
                    "no rule matched; the default effect is {}",
                    self.doc.defaults.effect
                ),
                review: if self.doc.defaults.effect == Effect::Review {
                    self.doc
                        .defaults
                        .review
                        .as_ref()
                        .map(crate::model::ReviewDoc::spec)
                } else {
                    None
                },
            },
            Some((ri, effect, note)) => {
                let rule = &self.doc.rules[ri];
                let mut reason = if rule.description.is_empty() {
                    format!("rule `{}`", rule.id)
                } else {
                    format!("rule `{}`: {}", rule.id, rule.description)
                };
                if !note.is_empty() {
                    reason = format!("{reason} ({note})");
                }
                Decision {
                    effect,
                    rule: rule.id.clone(),
                    reason,
                    review: if effect == Effect::Review {
                        self.rules[ri].review.clone()
                    } else {
                        None
                    },
                }
            }
        };
        Explanation {
            decision,
            matched,
            grant: Some(grant),
        }
    }
}
