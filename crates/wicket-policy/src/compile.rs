//! Parsing, validation and compilation of policy documents.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use aws_lc_rs::digest;
use chrono::{DateTime, Utc};
use wicket_core::{Effect, Protocol, ReviewSpec};

use crate::error::{PolicyError, PolicyErrors};
use crate::glob;
use crate::model::{ConnectionSpec, Grant, Match, PolicyDocument, ReviewDoc, Rule};
use crate::yaml::{self, Spans};

/// Built-in content detector names (implemented by `wicket-mask`).
pub const BUILTIN_DETECTORS: &[&str] = &[
    "email",
    "card",
    "ssn",
    "iban",
    "phone",
    "ipv4",
    "ipv6",
    "jwt",
    "cloud_key",
    "private_key",
];

/// Names that macros bind (`list.exists(x, …)`, `all`, `exists_one`, `map`,
/// `filter`): not unknown variables. A name only looking bound (inside a
/// string) merely skips this check; at run time an unknown variable is a
/// CEL error, which denies.
fn macro_variables(src: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for m in ["all(", "exists(", "exists_one(", "map(", "filter("] {
        let mut rest = src;
        while let Some(i) = rest.find(m) {
            let after = &rest[i + m.len()..];
            let preceded_by_dot = rest[..i].trim_end().ends_with('.');
            if preceded_by_dot && let Some((name, _)) = after.split_once(',') {
                let name = name.trim();
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    out.push(name);
                }
            }
            rest = after;
        }
    }
    out
}

/// A compiled rule.
pub(crate) struct CompiledRule {
    pub(crate) condition: Option<cel::Program>,
    pub(crate) review: Option<ReviewSpec>,
}

/// A validated, compiled policy, ready to decide.
pub struct Policy {
    pub(crate) doc: PolicyDocument,
    pub(crate) rules: Vec<CompiledRule>,
    /// Connection name to its index in `doc.connections`.
    pub(crate) connections: HashMap<String, usize>,
    /// For each connection (by index), the rules that can match it, in order.
    pub(crate) candidates: Vec<Vec<usize>>,
    pub(crate) env: Arc<cel::Env>,
    /// Top-level variables any condition reads: only these are put in a
    /// condition's context (building the others costs time per decision).
    pub(crate) cel_vars: std::collections::HashSet<String>,
    /// Whether some condition may read `command.text` (names it, or uses
    /// `command` other than as `command.<field>`).
    reads_command_text: bool,
    sha256: String,
}

/// Whether a CEL source may read `command.text`: every use of the name
/// `command` is `command.<field>` with another field, or it may. Conservative
/// (a `command` inside a string literal counts too).
fn reads_command_text(src: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for (i, _) in src.match_indices("command") {
        let prev = src[..i].trim_end().chars().next_back();
        let after = &src[i + "command".len()..];
        let glued = src[..i].chars().next_back().is_some_and(word);
        if glued || prev == Some('.') || after.starts_with(word) {
            continue; // part of another name, or a field called `command`
        }
        let Some(field) = after.trim_start().strip_prefix('.') else {
            return true; // the whole map: `command == …`, `command[…]`, macros
        };
        let name: String = field
            .trim_start()
            .chars()
            .take_while(|c| word(*c))
            .collect();
        // Macros over the map (`command.exists(k, …)`) count as whole reads.
        let macros = ["all", "exists", "exists_one", "map", "filter", "text"];
        if name.is_empty() || macros.contains(&name.as_str()) {
            return true;
        }
    }
    false
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("sha256", &self.sha256)
            .field("connections", &self.doc.connections.len())
            .field("rules", &self.doc.rules.len())
            .finish()
    }
}

struct Checker<'a> {
    source: &'a str,
    spans: Option<&'a Spans>,
    errors: Vec<PolicyError>,
}

impl Checker<'_> {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let field = field.into();
        let pos = self.spans.map(|s| s.find(&field)).unwrap_or_default();
        self.errors.push(PolicyError {
            source_name: self.source.to_string(),
            line: pos.line,
            column: pos.column,
            field,
            message: message.into(),
        });
    }

    fn check_id(&mut self, field: String, id: &str, seen: &mut HashSet<String>, what: &str) {
        let ok = !id.is_empty()
            && id.len() <= 128
            && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            self.err(
                field,
                format!("invalid {what} `{id}`: use letters, digits, `-`, `_` and `.`"),
            );
        } else if !seen.insert(id.to_string()) {
            self.err(field, format!("duplicate {what} `{id}`"));
        }
    }

    fn check_connection_refs(&mut self, field: String, refs: &[String], known: &HashSet<String>) {
        for (i, r) in refs.iter().enumerate() {
            if !r.contains('*') && !known.contains(r) {
                self.err(
                    format!("{field}[{i}]"),
                    format!("unknown connection `{r}` (not defined under `connections`)"),
                );
            }
        }
    }

    fn review(&mut self, field: String, doc: &ReviewDoc) -> ReviewSpec {
        if doc.approvers.is_empty() {
            self.err(
                format!("{field}.approvers"),
                "at least one approver group is required",
            );
        }
        if doc.quorum == 0 {
            self.err(format!("{field}.quorum"), "quorum must be at least 1");
        }
        if doc.one_per_group && doc.quorum > 1 && doc.quorum as usize != doc.approvers.len() {
            self.err(
                format!("{field}.quorum"),
                "with one_per_group the quorum is one approval per listed group; leave quorum unset",
            );
        }
        if doc.reuse_for.0 > 7 * 86_400 {
            self.err(
                format!("{field}.reuse_for"),
                "reuse_for must be at most 7d (0, the default, means each approval covers one execution)",
            );
        }
        if doc.timeout.0 == 0 || doc.timeout.0 > 7 * 86_400 {
            self.err(
                format!("{field}.timeout"),
                "timeout must be between 1s and 7d",
            );
        }
        doc.spec()
    }

    fn condition(&mut self, field: String, src: &str, env: &cel::Env) -> Option<cel::Program> {
        if src.trim().is_empty() {
            self.err(
                field,
                "condition is empty; remove it or write a CEL expression",
            );
            return None;
        }
        match env.compile(src) {
            Err(e) => {
                let msg = e.to_string().replace('\n', " ");
                self.err(field, format!("invalid CEL: {}", msg.trim()));
                None
            }
            Ok(program) => {
                let refs = program.references();
                let bound = macro_variables(src);
                let unknown: Vec<&str> = refs
                    .variables()
                    .into_iter()
                    .filter(|v| !crate::CEL_VARIABLES.contains(v) && !bound.contains(v))
                    .collect();
                if !unknown.is_empty() {
                    self.err(
                        field,
                        format!(
                            "unknown variable(s) {} in CEL condition (known: {})",
                            unknown.join(", "),
                            crate::CEL_VARIABLES.join(", ")
                        ),
                    );
                    return None;
                }
                Some(program)
            }
        }
    }
}

/// Parses a YAML or JSON policy document. `source_name` appears in errors.
pub fn parse(source: &str, source_name: &str) -> Result<(PolicyDocument, Spans), PolicyErrors> {
    let one = |line, column, field: String, message: String| {
        PolicyErrors(vec![PolicyError {
            source_name: source_name.to_string(),
            line,
            column,
            field,
            message,
        }])
    };
    let (value, spans) =
        yaml::load(source).map_err(|e| one(e.pos.line, e.pos.column, String::new(), e.message))?;
    if value.is_null() {
        return Err(one(1, 1, String::new(), "the document is empty".into()));
    }
    let doc: PolicyDocument = serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        let pos = spans.find(&field);
        one(pos.line, pos.column, field, e.into_inner().to_string())
    })?;
    Ok((doc, spans))
}

/// Parses and compiles in one step.
pub fn parse_and_compile(source: &str, source_name: &str) -> Result<Policy, PolicyErrors> {
    let (doc, spans) = parse(source, source_name)?;
    Policy::compile_with_spans(doc, source_name, Some(&spans))
}

fn could_match(m: &Match, c: &ConnectionSpec) -> bool {
    (m.protocols.is_empty() || m.protocols.contains(&c.protocol))
        && glob::any(&m.connections, &c.name)
        && m.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v))
}

fn grant_could_match(g: &Grant, c: &ConnectionSpec) -> bool {
    glob::any(&g.connections, &c.name) && g.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v))
}

impl Policy {
    /// Checks and compiles a document that has no source positions (e.g. a bundle).
    pub fn compile(doc: PolicyDocument) -> Result<Policy, PolicyErrors> {
        Policy::compile_with_spans(doc, "<bundle>", None)
    }

    /// Checks and compiles a document; errors carry positions from `spans`.
    pub fn compile_with_spans(
        doc: PolicyDocument,
        source_name: &str,
        spans: Option<&Spans>,
    ) -> Result<Policy, PolicyErrors> {
        let mut ck = Checker {
            source: source_name,
            spans,
            errors: Vec::new(),
        };
        let env = Arc::new(cel::Env::stdlib());
        if doc.version != 1 {
            ck.err(
                "version",
                format!("unsupported version {} (expected 1)", doc.version),
            );
        }
        let mut names = HashSet::new();
        let mut detectors: HashSet<&str> = BUILTIN_DETECTORS.iter().copied().collect();
        let mut seen = HashSet::new();
        for (i, d) in doc.detectors.iter().enumerate() {
            ck.check_id(
                format!("detectors[{i}].name"),
                &d.name,
                &mut seen,
                "detector name",
            );
            if BUILTIN_DETECTORS.contains(&d.name.as_str()) {
                ck.err(
                    format!("detectors[{i}].name"),
                    format!("`{}` is a built-in detector name", d.name),
                );
            }
            if let Err(e) = regex::Regex::new(&d.regex) {
                ck.err(
                    format!("detectors[{i}].regex"),
                    format!("invalid regex: {e}"),
                );
            }
            detectors.insert(&d.name);
        }
        for (i, c) in doc.connections.iter().enumerate() {
            ck.check_id(
                format!("connections[{i}].name"),
                &c.name,
                &mut names,
                "connection name",
            );
            for (j, col) in c.masking.columns.iter().enumerate() {
                let parts = col.column.split('.').count();
                if parts != 3 || col.column.split('.').any(str::is_empty) {
                    ck.err(
                        format!("connections[{i}].masking.columns[{j}].column"),
                        format!("`{}` is not schema.table.column", col.column),
                    );
                }
            }
            for (j, f) in c.masking.fields.iter().enumerate() {
                if let Err(e) = crate::jsonpath::JsonPath::parse(&f.path) {
                    ck.err(format!("connections[{i}].masking.fields[{j}].path"), e);
                }
            }
            let h = &c.http;
            let has_http =
                !h.routes.is_empty() || !h.headers.is_empty() || !h.body_fields.is_empty();
            if has_http && c.protocol != Protocol::Http {
                ck.err(
                    format!("connections[{i}].http"),
                    "only http connections have routes, headers and body fields",
                );
            }
            for (j, f) in h.body_fields.iter().enumerate() {
                if let Err(e) = crate::jsonpath::JsonPath::parse(f) {
                    ck.err(format!("connections[{i}].http.body_fields[{j}]"), e);
                }
            }
            for (j, name) in h.headers.iter().enumerate() {
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    ck.err(
                        format!("connections[{i}].http.headers[{j}]"),
                        format!("`{name}` is not a header name"),
                    );
                } else if matches!(
                    name.to_ascii_lowercase().as_str(),
                    "authorization" | "cookie" | "proxy-authorization"
                ) {
                    ck.err(
                        format!("connections[{i}].http.headers[{j}]"),
                        format!("`{name}` carries credentials and is never recorded"),
                    );
                }
            }
            let mut route_names = HashSet::new();
            for (j, r) in h.routes.iter().enumerate() {
                ck.check_id(
                    format!("connections[{i}].http.routes[{j}].name"),
                    &r.name,
                    &mut route_names,
                    "route name",
                );
                if let Err(e) = crate::http::PathPattern::parse(&r.path) {
                    ck.err(format!("connections[{i}].http.routes[{j}].path"), e);
                }
                for (k, m) in r.methods.iter().enumerate() {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                        ck.err(
                            format!("connections[{i}].http.routes[{j}].methods[{k}]"),
                            format!("`{m}` is not an HTTP method"),
                        );
                    }
                }
                if r.risk.is_some_and(|x| x > 100) {
                    ck.err(
                        format!("connections[{i}].http.routes[{j}].risk"),
                        "risk is 0..=100",
                    );
                }
                for (k, f) in r.body_fields.iter().enumerate() {
                    if let Err(e) = crate::jsonpath::JsonPath::parse(f) {
                        ck.err(
                            format!("connections[{i}].http.routes[{j}].body_fields[{k}]"),
                            e,
                        );
                    }
                }
            }
            for (j, d) in c.masking.detectors.iter().enumerate() {
                if !detectors.contains(d.as_str()) {
                    ck.err(
                        format!("connections[{i}].masking.detectors[{j}]"),
                        format!(
                            "unknown detector `{d}` (built-in: {}; or define it under `detectors`)",
                            BUILTIN_DETECTORS.join(", ")
                        ),
                    );
                }
            }
        }
        let mut seen = HashSet::new();
        for (i, g) in doc.grants.iter().enumerate() {
            ck.check_id(format!("grants[{i}].id"), &g.id, &mut seen, "grant id");
            ck.check_connection_refs(format!("grants[{i}].connections"), &g.connections, &names);
            if g.principals.is_empty() && g.groups.is_empty() {
                ck.err(
                    format!("grants[{i}]"),
                    "a grant needs `principals` or `groups` (it would grant nobody)",
                );
            }
        }
        let mut seen = HashSet::new();
        for (i, a) in doc.access.iter().enumerate() {
            let field = format!("access[{i}]");
            ck.check_id(format!("{field}.id"), &a.id, &mut seen, "access rule id");
            ck.check_connection_refs(format!("{field}.connections"), &a.connections, &names);
            if a.connections.is_empty() {
                ck.err(
                    format!("{field}.connections"),
                    "name at least one connection",
                );
            }
            if a.principals.is_empty() && a.groups.is_empty() {
                ck.err(
                    field.clone(),
                    "an access rule needs `principals` or `groups` (nobody could ask)",
                );
            }
            if a.max.0 == 0 || a.max.0 > 7 * 86_400 {
                ck.err(format!("{field}.max"), "max must be between 1s and 7d");
            }
            ck.review(format!("{field}.review"), &a.review);
        }
        let default_review = doc
            .defaults
            .review
            .as_ref()
            .map(|r| ck.review("defaults.review".into(), r));
        if doc.defaults.effect == Effect::Review && default_review.is_none() {
            ck.err(
                "defaults.effect",
                "a default of review needs `defaults.review.approvers`",
            );
        }
        let mut seen = HashSet::new();
        let mut rules = Vec::with_capacity(doc.rules.len());
        for (i, r) in doc.rules.iter().enumerate() {
            let Rule {
                id,
                effect,
                matches,
                condition,
                review,
                ..
            } = r;
            ck.check_id(format!("rules[{i}].id"), id, &mut seen, "rule id");
            ck.check_connection_refs(
                format!("rules[{i}].match.connections"),
                &matches.connections,
                &names,
            );
            let condition = condition
                .as_deref()
                .and_then(|c| ck.condition(format!("rules[{i}].condition"), c, &env));
            let review = match (effect, review) {
                (Effect::Review, Some(doc)) => Some(ck.review(format!("rules[{i}].review"), doc)),
                (Effect::Review, None) => {
                    if default_review.is_none() {
                        ck.err(
                            format!("rules[{i}].effect"),
                            "a review rule needs `review.approvers` (or `defaults.review`)",
                        );
                    }
                    default_review.clone()
                }
                (_, Some(_)) => {
                    ck.err(
                        format!("rules[{i}].review"),
                        "`review` is only allowed with effect: review",
                    );
                    None
                }
                (_, None) => None,
            };
            rules.push(CompiledRule { condition, review });
        }
        if !ck.errors.is_empty() {
            return Err(PolicyErrors(ck.errors));
        }
        let connections = doc
            .connections
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        let candidates = doc
            .connections
            .iter()
            .map(|c| {
                doc.rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| could_match(&r.matches, c))
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        let json = serde_json::to_vec(&doc).expect("policy documents serialize");
        let sha256 = hex::encode(digest::digest(&digest::SHA256, &json));
        let cel_vars = rules
            .iter()
            .filter_map(|r| r.condition.as_ref())
            .flat_map(|p| {
                p.references()
                    .variables()
                    .into_iter()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        let reads_command_text = doc
            .rules
            .iter()
            .filter_map(|r| r.condition.as_deref())
            .any(reads_command_text);
        Ok(Policy {
            doc,
            rules,
            connections,
            candidates,
            env,
            cel_vars,
            reads_command_text,
            sha256,
        })
    }

    /// Whether a decision may depend on the command's text (some condition
    /// reads `command.text`); when not, commands that differ only in their
    /// text are decided alike.
    pub fn reads_command_text(&self) -> bool {
        self.reads_command_text
    }

    /// Until when every decision taken at `now` stays the same for the same
    /// request under this policy: `None` when a condition reads the clock
    /// (`now`), else the next moment a grant expires (grants are the only
    /// other thing time changes).
    pub fn decisions_stable_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.cel_vars.contains("now") {
            return None;
        }
        Some(
            self.doc
                .grants
                .iter()
                .filter_map(|g| g.expires)
                .filter(|e| *e > now)
                .min()
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        )
    }

    /// The document this policy was compiled from.
    pub fn document(&self) -> &PolicyDocument {
        &self.doc
    }

    /// SHA-256 (hex) of the canonical JSON form of the document.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The connection named `name`.
    pub fn connection(&self, name: &str) -> Option<&ConnectionSpec> {
        self.connections
            .get(name)
            .map(|&i| &self.doc.connections[i])
    }

    /// The first access rule that lets `principal` ask for just-in-time
    /// access to `connection`.
    pub fn access_rule(
        &self,
        connection: &str,
        principal: &wicket_core::Principal,
    ) -> Option<&crate::model::AccessRule> {
        self.doc.access.iter().find(|a| {
            glob::any(&a.connections, connection)
                && ((!a.principals.is_empty()
                    && crate::eval::principal_matches(&a.principals, principal))
                    || (!a.groups.is_empty() && a.groups.iter().any(|g| principal.in_group(g))))
                && (a.kinds.is_empty() || a.kinds.contains(&principal.kind))
        })
    }

    /// The part of the document one connection's sidecar needs: that
    /// connection, the grants and rules that can apply to it, and the defaults.
    pub fn bundle_for(&self, name: &str) -> Option<PolicyDocument> {
        let &ci = self.connections.get(name)?;
        let conn = &self.doc.connections[ci];
        let mut out = PolicyDocument {
            version: self.doc.version,
            defaults: self.doc.defaults.clone(),
            agents: self.doc.agents.clone(),
            connections: vec![conn.clone()],
            grants: Vec::new(),
            rules: Vec::new(),
            detectors: self.doc.detectors.clone(),
            access: Vec::new(),
        };
        out.grants = self
            .doc
            .grants
            .iter()
            .filter(|g| grant_could_match(g, conn))
            .map(|g| Grant {
                connections: vec![name.to_string()],
                ..g.clone()
            })
            .collect();
        out.rules = self.candidates[ci]
            .iter()
            .map(|&i| {
                let mut r = self.doc.rules[i].clone();
                r.matches.connections = vec![name.to_string()];
                r
            })
            .collect();
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::reads_command_text;

    #[test]
    fn command_text_reads_are_found() {
        for src in [
            "command.text.contains('x')",
            "command . text == ''",
            "command == {}",
            "command['text'] == ''",
            "command.exists(k, k == 'text')",
            "has(command.text)",
            "x && command",
        ] {
            assert!(reads_command_text(src), "{src}");
        }
        for src in [
            "command.risk < 50",
            "command.kind == 'select' && 'x' in command.objects",
            "principal.groups.exists(g, g == 'dba')",
            "subcommand.text == ''",
            "x.command == 1",
            "has_reasoning",
        ] {
            assert!(!reads_command_text(src), "{src}");
        }
    }
}
