//! Approval decision-to-sidecar latency (issue 8: "the waiting sidecar
//! learns the decision within 100 ms").
//!
//! A sidecar's approval stream asks for a held command's approval, an
//! approver approves it over the admin API, and the bench times from the
//! moment the `Approve` call is sent to the moment the waiting stream hears
//! `Approved` (so the figure includes the approver's round trip, the store
//! write and the fan-out). One thousand approvals each, in three setups: one
//! replica on SQLite, one on PostgreSQL, and two replicas on one PostgreSQL
//! with the sidecar on the first and the approver on the second (the
//! decision crosses by LISTEN/NOTIFY).
//!
//! `WICKET_BENCH_PG_URL` names an empty PostgreSQL database (`cargo xtask
//! bench approvals` starts one); without it only SQLite runs.
//! `WICKET_BENCH_APPROVALS` sets the count.

mod common;

use std::time::{Duration, Instant};

use common::replica;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use wicket_proto::v1;
use wicket_proto::v1::approval_admin_service_client::ApprovalAdminServiceClient;
use wicket_proto::v1::approval_gate_service_client::ApprovalGateServiceClient;
use wicket_testkit::idp::{TestIdp, TokenSpec};
use wicket_teststack::auth;

const POLICY: &str = r#"
connections:
  - name: orders-db
    protocol: postgres
grants:
  - id: bots
    principals: [bot-1]
rules:
  - id: writes
    effect: review
    match: {commands: [delete]}
    review: {approvers: [dba-leads], timeout: 60s}
"#;

/// A held DELETE's approval request, as a sidecar sends it.
fn held(n: usize, token: &str) -> tonic::Request<v1::ApprovalRequest> {
    auth(
        v1::ApprovalRequest {
            request_id: format!("bench-{n}-{}", uuid::Uuid::new_v4()),
            session_id: "bench-session".into(),
            connection: "orders-db".into(),
            principal: Some(v1::Principal {
                subject: "bot-1".into(),
                issuer: "https://idp".into(),
                kind: v1::PrincipalKind::Agent as i32,
                ..Default::default()
            }),
            command: Some(v1::Command {
                text: "DELETE FROM orders WHERE id = 1".into(),
                ..Default::default()
            }),
            decision: Some(v1::DecisionInfo {
                effect: v1::Effect::Review as i32,
                rule: "writes".into(),
                reason: String::new(),
                review: Some(v1::ReviewSpec {
                    approver_groups: vec!["dba-leads".into()],
                    quorum: 1,
                    one_per_group: false,
                    timeout_seconds: 60,
                    reuse_seconds: 0,
                }),
            }),
            reasoning: None,
        },
        token,
    )
}

/// Latencies of `count` approvals: requested on `waiting`, approved on `deciding`.
async fn run(
    idp: &TestIdp,
    waiting: &Channel,
    deciding: &Channel,
    count: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let token = common::prepare(idp, waiting, POLICY).await;
    let approver = idp.mint(&TokenSpec::human(
        "lead",
        &["wicket-approvers", "dba-leads"],
    ));
    let mut gate = ApprovalGateServiceClient::new(waiting.clone());
    let mut api = ApprovalAdminServiceClient::new(deciding.clone());
    let (mut to_sidecar, mut calls) = (Vec::new(), Vec::new());
    for n in 0..count {
        let mut stream = gate
            .request_approval(held(n, &token))
            .await
            .expect("approval request")
            .into_inner();
        let pending = stream.next().await.expect("pending").expect("pending");
        let t0 = Instant::now();
        let decide = api.approve(auth(
            v1::DecideRequest {
                id: pending.approval_id,
                comment: String::new(),
                reuse_seconds: 0,
            },
            &approver,
        ));
        let heard = async {
            let u = stream.next().await.expect("decision").expect("decision");
            assert_eq!(u.state, v1::ApprovalState::Approved as i32);
            t0.elapsed()
        };
        let (call, heard) = tokio::join!(
            async {
                decide.await.expect("approve");
                t0.elapsed()
            },
            heard
        );
        calls.push(call);
        to_sidecar.push(heard);
    }
    (to_sidecar, calls)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    wicket_testkit::init_crypto();
    let count: usize = std::env::var("WICKET_BENCH_APPROVALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let idp = TestIdp::start("wicket").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rows = Vec::new();
    let sqlite = format!("sqlite:{}", dir.path().join("bench.db").display());
    let one = replica(&idp, &sqlite).await;
    rows.push(("one replica, SQLite", run(&idp, &one, &one, count).await));
    match std::env::var("WICKET_BENCH_PG_URL") {
        Ok(pg) => {
            let a = replica(&idp, &pg).await;
            rows.push(("one replica, PostgreSQL", run(&idp, &a, &a, count).await));
            let b = replica(&idp, &pg).await;
            rows.push((
                "two replicas, PostgreSQL (waits on A, approved on B)",
                run(&idp, &a, &b, count).await,
            ));
        }
        Err(_) => println!("(WICKET_BENCH_PG_URL unset: PostgreSQL setups skipped)"),
    }
    println!(
        "\napproval decision to waiting sidecar, {count} approvals each (ms; from the Approve call)"
    );
    println!(
        "{:<56} {:>8} {:>8} {:>8}   {:>14}",
        "setup", "p50", "p99", "max", "Approve call p50"
    );
    for (name, (mut heard, mut calls)) in rows {
        let max = heard.iter().max().copied().unwrap_or_default();
        println!(
            "{name:<56} {:>8.2} {:>8.2} {:>8.2}   {:>14.2}",
            pct(&mut heard, 0.5),
            pct(&mut heard, 0.99),
            max.as_secs_f64() * 1e3,
            pct(&mut calls, 0.5)
        );
    }
    println!("target: the sidecar learns the decision within 100 ms");
}
