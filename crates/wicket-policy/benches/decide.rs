//! Decision latency for a 200-rule policy (`cargo xtask bench policy`).
//!
//! Criterion reports the mean; a second pass times 200,000 single decisions
//! and prints p50 / p99 / p99.9 against the 20 µs p99 target.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::Criterion;
use wicket_core::{Classification, Command, Principal, PrincipalKind};
use wicket_policy::{Policy, Request, parse_and_compile};

/// 20 connections, 20 grants, 200 rules: a fifth with CEL conditions.
fn policy_200() -> Policy {
    let mut s = String::from("version: 1\nconnections:\n");
    for c in 0..20 {
        let env = if c % 2 == 0 { "prod" } else { "dev" };
        writeln!(
            s,
            "  - name: db-{c}\n    protocol: postgres\n    labels: {{env: {env}, team: t{}}}",
            c % 5
        )
        .unwrap();
    }
    s.push_str("grants:\n");
    for g in 0..20 {
        writeln!(
            s,
            "  - id: g{g}\n    groups: [team-{g}]\n    connections: [db-{g}]"
        )
        .unwrap();
    }
    s.push_str("rules:\n");
    let kinds = ["select", "insert", "update", "delete", "ddl"];
    for r in 0..200 {
        let effect = ["allow", "deny", "review"][r % 3];
        write!(
            s,
            "  - id: r{r}\n    effect: {effect}\n    match: {{commands: [{}], groups: [team-{}]}}\n",
            kinds[r % 5],
            r % 20
        )
        .unwrap();
        if effect == "review" {
            s.push_str("    review: {approvers: [leads]}\n");
        }
        if r % 5 == 0 {
            writeln!(
                s,
                "    condition: 'command.risk > {} && principal.kind == \"agent\" && connection.labels.env == \"prod\"'",
                r % 100
            )
            .unwrap();
        }
    }
    parse_and_compile(&s, "bench.yaml").expect("bench policy compiles")
}

fn main() {
    let policy = policy_200();
    let principal = Principal {
        subject: "agent-7".into(),
        issuer: "https://idp".into(),
        kind: PrincipalKind::Agent,
        groups: vec!["team-0".into(), "team-4".into()],
        ..Default::default()
    };
    let command = Command {
        text: "SELECT * FROM orders WHERE id = $1".into(),
        classification: Classification {
            kind: "select".into(),
            verb: "SELECT".into(),
            objects: vec!["public.orders".into()],
            risk: 42,
            ..Default::default()
        },
    };
    let now = Utc::now();
    let req = Request {
        principal: &principal,
        connection: "db-0",
        command: &command,
        has_reasoning: true,
        now,
    };
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    c.bench_function("decide/200-rules", |b| {
        b.iter(|| black_box(policy.decide(black_box(&req))))
    });

    let n = 200_000;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        black_box(policy.decide(black_box(&req)));
        samples.push(t.elapsed());
    }
    samples.sort();
    let q = |p: f64| samples[((n as f64 * p) as usize).min(n - 1)];
    let p99 = q(0.99);
    println!(
        "policy decide, 200 rules, {n} decisions: p50 {:?}  p99 {:?}  p99.9 {:?}  (target p99 <= 20µs: {})",
        q(0.5),
        p99,
        q(0.999),
        if p99 <= Duration::from_micros(20) {
            "met"
        } else {
            "MISSED"
        }
    );
    c.final_summary();
}
