//! Table-driven tests of the evaluator: precedence, defaults, expiry, agents
//! without reasoning, CEL errors.

use chrono::{DateTime, TimeZone, Utc};
use wicket_core::{Classification, Command, Effect, Principal, PrincipalKind};
use wicket_policy::{Policy, Request, SessionDecision, parse_and_compile};

const POLICY: &str = r#"
version: 1
defaults:
  effect: deny
  review: { approvers: [dba-leads], timeout: 5m }
agents:
  require_reasoning: true
connections:
  - name: orders-db
    protocol: postgres
    upstream: 127.0.0.1:5432
    labels: { env: prod, team: payments }
  - name: scratch-db
    protocol: postgres
    labels: { env: dev }
    require_reasoning: false
  - name: web
    protocol: http
    labels: { env: prod }
grants:
  - id: dba-prod
    groups: [dba]
    labels: { env: prod }
  - id: bot-orders
    principals: [reporting-bot]
    kinds: [agent]
    connections: [orders-db]
  - id: everyone-dev
    groups: [engineering]
    connections: ["scratch-*"]
  - id: expired
    principals: [carol]
    connections: ["*"]
    expires: 2026-01-01T00:00:00Z
  - id: temp-carol
    principals: [carol]
    connections: [orders-db]
    expires: 2026-06-01T00:00:00Z
rules:
  - id: reads
    effect: allow
    match: { commands: [select, show] }
  - id: writes-need-review
    effect: review
    match: { commands: [insert, update, delete], protocols: [postgres] }
    review: { approvers: [dba-leads, security], one_per_group: true, timeout: 10m }
  - id: no-ddl-in-prod
    description: DDL is never run by hand in prod
    effect: deny
    match: { commands: [ddl], labels: { env: prod } }
  - id: ddl-dev
    effect: allow
    match: { commands: [ddl], connections: [scratch-db] }
  - id: risky-agents
    effect: deny
    match: { kinds: [agent] }
    condition: command.risk > 70
  - id: night-writes
    effect: deny
    match: { commands: [update] }
    condition: 'now.getHours() < 6 && principal.kind == "human"'
  - id: broken-condition
    effect: allow
    match: { verbs: [BROKEN] }
    condition: 'command.objects[5] == "x"'
  - id: non-bool-condition
    effect: allow
    match: { verbs: [NONBOOL] }
    condition: 'command.risk + 1'
  - id: http-gets
    effect: allow
    match: { protocols: [http], verbs: [GET] }
"#;

/// (principal, connection, command, has_reasoning, time, expected effect, expected rule)
type Case<'a> = (
    &'a Principal,
    &'a str,
    Command,
    bool,
    DateTime<Utc>,
    Effect,
    &'a str,
);

fn policy() -> Policy {
    parse_and_compile(POLICY, "policy.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn human(sub: &str, groups: &[&str]) -> Principal {
    Principal {
        subject: sub.into(),
        issuer: "https://idp.example".into(),
        kind: PrincipalKind::Human,
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..Default::default()
    }
}

fn agent(sub: &str) -> Principal {
    Principal {
        kind: PrincipalKind::Agent,
        ..human(sub, &[])
    }
}

fn cmd(kind: &str, verb: &str, risk: u32) -> Command {
    Command {
        text: format!("{verb} ..."),
        classification: Classification {
            kind: kind.into(),
            verb: verb.into(),
            risk,
            ..Default::default()
        },
    }
}

fn at(h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 10, h, 0, 0).unwrap()
}

#[test]
fn decisions() {
    let p = policy();
    let alice = human("alice", &["dba"]);
    let eng = human("erin", &["engineering"]);
    let bot = agent("reporting-bot");
    let carol = human("carol", &[]);
    // (principal, connection, command, has_reasoning, time, effect, rule)
    let cases: Vec<Case> = vec![
        // grants
        (
            &eng,
            "orders-db",
            cmd("select", "SELECT", 0),
            false,
            at(12),
            Effect::Deny,
            "no-grant",
        ),
        (
            &alice,
            "nowhere",
            cmd("select", "SELECT", 0),
            false,
            at(12),
            Effect::Deny,
            "unknown-connection",
        ),
        (
            &alice,
            "orders-db",
            cmd("select", "SELECT", 0),
            false,
            at(12),
            Effect::Allow,
            "reads",
        ),
        (
            &eng,
            "scratch-db",
            cmd("ddl", "CREATE", 0),
            false,
            at(12),
            Effect::Allow,
            "ddl-dev",
        ),
        // expiry: temp-carol valid until June, "expired" never counts
        (
            &carol,
            "orders-db",
            cmd("select", "SELECT", 0),
            false,
            at(12),
            Effect::Allow,
            "reads",
        ),
        (
            &carol,
            "scratch-db",
            cmd("select", "SELECT", 0),
            false,
            at(12),
            Effect::Deny,
            "no-grant",
        ),
        (
            &carol,
            "orders-db",
            cmd("select", "SELECT", 0),
            false,
            Utc.with_ymd_and_hms(2026, 7, 1, 12, 0, 0).unwrap(),
            Effect::Deny,
            "no-grant",
        ),
        // precedence: most restrictive wins, first such rule named
        (
            &alice,
            "orders-db",
            cmd("ddl", "DROP", 0),
            false,
            at(12),
            Effect::Deny,
            "no-ddl-in-prod",
        ),
        (
            &alice,
            "orders-db",
            cmd("insert", "INSERT", 0),
            false,
            at(12),
            Effect::Review,
            "writes-need-review",
        ),
        (
            &alice,
            "orders-db",
            cmd("update", "UPDATE", 0),
            false,
            at(3),
            Effect::Deny,
            "night-writes",
        ),
        (
            &alice,
            "orders-db",
            cmd("update", "UPDATE", 0),
            false,
            at(12),
            Effect::Review,
            "writes-need-review",
        ),
        // defaults
        (
            &alice,
            "orders-db",
            cmd("copy", "COPY", 0),
            false,
            at(12),
            Effect::Deny,
            "default",
        ),
        (
            &alice,
            "web",
            cmd("request", "GET", 0),
            false,
            at(12),
            Effect::Allow,
            "http-gets",
        ),
        (
            &alice,
            "web",
            cmd("request", "DELETE", 0),
            false,
            at(12),
            Effect::Deny,
            "default",
        ),
        // agents and reasoning
        (
            &bot,
            "orders-db",
            cmd("select", "SELECT", 10),
            false,
            at(12),
            Effect::Deny,
            "require-reasoning",
        ),
        (
            &bot,
            "orders-db",
            cmd("select", "SELECT", 10),
            true,
            at(12),
            Effect::Allow,
            "reads",
        ),
        (
            &bot,
            "orders-db",
            cmd("select", "SELECT", 90),
            true,
            at(12),
            Effect::Deny,
            "risky-agents",
        ),
        // CEL errors count as deny
        (
            &alice,
            "orders-db",
            cmd("call", "BROKEN", 0),
            false,
            at(12),
            Effect::Deny,
            "broken-condition",
        ),
        (
            &alice,
            "orders-db",
            cmd("call", "NONBOOL", 0),
            false,
            at(12),
            Effect::Deny,
            "non-bool-condition",
        ),
    ];
    for (i, (who, conn, command, reasoning, now, effect, rule)) in cases.into_iter().enumerate() {
        let req = Request {
            principal: who,
            connection: conn,
            command: &command,
            has_reasoning: reasoning,
            now,
        };
        let d = p.decide(&req);
        assert_eq!(
            (d.effect, d.rule.as_str()),
            (effect, rule),
            "case {i}: {} on {conn}: {:?} ({})",
            who.subject,
            command.classification.verb,
            d.reason
        );
        // explain agrees with decide
        assert_eq!(p.explain(&req).decision, d, "case {i}");
    }
}

#[test]
fn review_carries_approval_settings() {
    let p = policy();
    let alice = human("alice", &["dba"]);
    let c = cmd("delete", "DELETE", 0);
    let d = p.decide(&Request {
        principal: &alice,
        connection: "orders-db",
        command: &c,
        has_reasoning: false,
        now: at(12),
    });
    let review = d.review.expect("review spec");
    assert_eq!(review.approver_groups, ["dba-leads", "security"]);
    assert!(review.one_per_group);
    assert_eq!(review.quorum, 2);
    assert_eq!(review.timeout_seconds, 600);
}

#[test]
fn explain_lists_every_matching_rule() {
    let p = policy();
    let bot = agent("reporting-bot");
    let c = cmd("select", "SELECT", 95);
    let e = p.explain(&Request {
        principal: &bot,
        connection: "orders-db",
        command: &c,
        has_reasoning: true,
        now: at(12),
    });
    let names: Vec<_> = e
        .matched
        .iter()
        .map(|m| (m.rule.as_str(), m.effect))
        .collect();
    assert_eq!(
        names,
        [("reads", Effect::Allow), ("risky-agents", Effect::Deny)]
    );
    assert_eq!(e.grant.as_deref(), Some("bot-orders"));
    assert_eq!(e.decision.rule, "risky-agents");
}

#[test]
fn sessions_need_a_live_grant_and_report_its_expiry() {
    let p = policy();
    let carol = human("carol", &[]);
    match p.authorize_session(&carol, "orders-db", at(12)) {
        SessionDecision::Allowed { grant, expires } => {
            assert_eq!(grant, "temp-carol");
            assert_eq!(
                expires,
                Some(Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap())
            );
        }
        other => panic!("{other:?}"),
    }
    // A grant for agents only does not admit a human with the same subject.
    let fake_bot = human("reporting-bot", &[]);
    assert!(matches!(
        p.authorize_session(&fake_bot, "orders-db", at(12)),
        SessionDecision::Denied(d) if d.rule == "no-grant"
    ));
}

#[test]
fn bundles_keep_decisions_identical() {
    let p = policy();
    let doc = p.bundle_for("orders-db").unwrap();
    assert_eq!(doc.connections.len(), 1);
    assert!(
        doc.rules
            .iter()
            .all(|r| r.id != "ddl-dev" && r.id != "http-gets")
    );
    let json = serde_json::to_vec(&doc).unwrap();
    let back: wicket_policy::PolicyDocument = serde_json::from_slice(&json).unwrap();
    let b = Policy::compile(back).unwrap();
    let alice = human("alice", &["dba"]);
    let bot = agent("reporting-bot");
    for (who, c, r) in [
        (&alice, cmd("ddl", "DROP", 0), false),
        (&alice, cmd("insert", "INSERT", 0), false),
        (&bot, cmd("select", "SELECT", 95), true),
        (&bot, cmd("select", "SELECT", 5), false),
    ] {
        let req = Request {
            principal: who,
            connection: "orders-db",
            command: &c,
            has_reasoning: r,
            now: at(12),
        };
        assert_eq!(p.decide(&req), b.decide(&req));
    }
}

/// Conditions see every variable, also inside macros (the evaluator only
/// builds the variables some condition reads).
#[test]
fn conditions_see_every_variable_they_name() {
    for (condition, expect) in [
        (
            "connection.labels.env == 'prod' && connection.protocol == 'postgres'",
            true,
        ),
        ("has_reasoning", true),
        (
            "principal.groups.exists(g, g == 'dba') && principal.name == 'alice'",
            true,
        ),
        (
            "command.objects.exists(o, o == 'public.t') && command.risk == 5",
            true,
        ),
        ("now.getHours() == 12", true),
        ("[1, 2].all(x, principal.kind == 'agent')", false),
    ] {
        let doc = format!(
            "version: 1\nconnections:\n  - name: db\n    protocol: postgres\n    labels: {{env: prod}}\n\
             grants:\n  - id: g\n    groups: [dba]\nrules:\n  - id: c\n    effect: allow\n    condition: \"{condition}\"\n"
        );
        let p = parse_and_compile(&doc, "t.yaml").unwrap();
        let mut command = cmd("select", "SELECT", 5);
        command.classification.objects = vec!["public.t".into()];
        let d = p.decide(&Request {
            principal: &human("alice", &["dba"]),
            connection: "db",
            command: &command,
            has_reasoning: true,
            now: at(12),
        });
        assert_eq!(d.effect == Effect::Allow, expect, "{condition}: {d:?}");
    }
}

/// A just-in-time grant (issuer set) is for exactly one issuer and subject:
/// no glob, no display name, no other issuer; and it lapses.
#[test]
fn issuer_bound_grants_match_one_principal_exactly() {
    let doc = r#"
connections:
  - name: db
    protocol: postgres
grants:
  - id: jit-1
    principals: ["temp*"]
    issuer: https://idp.example
    expires: 2030-01-01T00:00:00Z
access:
  - id: contractors
    connections: [db]
    groups: [contractors]
    review: {approvers: [dba]}
"#;
    let p = parse_and_compile(doc, "jit.yaml").unwrap();
    let now = Utc.with_ymd_and_hms(2029, 6, 1, 0, 0, 0).unwrap();
    let allowed = |who: &Principal, at| {
        matches!(
            p.authorize_session(who, "db", at),
            SessionDecision::Allowed { .. }
        )
    };
    let exact = human("temp*", &[]);
    assert!(allowed(&exact, now));
    assert!(!allowed(&human("temporary", &[]), now), "no glob");
    let other_issuer = Principal {
        issuer: "https://elsewhere".into(),
        ..exact.clone()
    };
    assert!(!allowed(&other_issuer, now));
    let named = Principal {
        display_name: "temp*".into(),
        ..human("mallory", &[])
    };
    assert!(!allowed(&named, now), "not by display name");
    let later = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 1).unwrap();
    assert!(!allowed(&exact, later), "lapsed");
    // The access rule is found for its groups and connections only.
    assert_eq!(
        p.access_rule("db", &human("c", &["contractors"]))
            .map(|a| a.id.as_str()),
        Some("contractors")
    );
    assert!(p.access_rule("db", &human("c", &["sales"])).is_none());
    assert!(
        p.access_rule("other", &human("c", &["contractors"]))
            .is_none()
    );
}
