//! Audit ingest: events per second the control service stores (durably,
//! each acknowledged only once stored) from four concurrent sidecar
//! streams, as the sidecars' reporter sends them: batches of 256 events,
//! at most four unacknowledged per stream. Into SQLite (a file, WAL,
//! synchronous=FULL) and, with `WICKET_BENCH_PG_URL`, PostgreSQL.
//! Issue 9's target: at least 50,000 events/s on this 2-core machine.
//!
//! `WICKET_BENCH_AUDIT_EVENTS` sets the total (default 200,000).

mod common;

use std::time::Instant;

use tokio_stream::StreamExt;
use tonic::transport::Channel;
use wicket_proto::v1;
use wicket_proto::v1::audit_service_client::AuditServiceClient;
use wicket_testkit::idp::TestIdp;
use wicket_teststack::auth;

const POLICY: &str = "connections:\n  - name: orders-db\n    protocol: postgres\n";
const STREAMS: usize = 4;
const BATCH: usize = 256;
const IN_FLIGHT: usize = 4;
/// Commands per session before the next session starts.
const PER_SESSION: u64 = 500;

/// The `n`th event of stream `s`: each session starts, then runs commands
/// with results, as a database gate reports them.
fn event(s: usize, n: u64) -> v1::AuditEvent {
    let session = format!("bench-{s}-{}", n / PER_SESSION);
    let seq = n % PER_SESSION + 1;
    let now = wicket_proto::convert::ts(chrono::Utc::now());
    let mut e = v1::AuditEvent {
        id: uuid::Uuid::now_v7().to_string(),
        session_id: session,
        seq,
        time: Some(now),
        connection: "orders-db".into(),
        client_addr: "10.1.2.3:51234".into(),
        client_app: "psql".into(),
        ..Default::default()
    };
    if seq == 1 {
        e.kind = v1::AuditKind::SessionStart as i32;
        e.principal = Some(v1::Principal {
            subject: format!("agent-{s}"),
            issuer: "https://idp.example".into(),
            kind: v1::PrincipalKind::Agent as i32,
            ..Default::default()
        });
    } else if seq.is_multiple_of(2) {
        e.kind = v1::AuditKind::Command as i32;
        e.command = Some(v1::Command {
            text: format!("SELECT id, name, email FROM customers WHERE id = {n}"),
            classification: Some(v1::Classification {
                kind: "select".into(),
                verb: "SELECT".into(),
                objects: vec!["customers".into()],
                risk: 10,
                ..Default::default()
            }),
        });
        e.decision = Some(v1::DecisionInfo {
            effect: v1::Effect::Allow as i32,
            rule: "reads".into(),
            ..Default::default()
        });
        e.reasoning = Some(v1::ReasoningTrace {
            reasoning: "look up the customer named in ticket 4711".into(),
            ..Default::default()
        });
    } else {
        e.kind = v1::AuditKind::CommandResult as i32;
        e.details = [("rows", "1"), ("duration_us", "412")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }
    e
}

/// Sends `count` events on one stream; returns how many were acknowledged.
async fn stream(channel: Channel, token: String, s: usize, count: u64) -> usize {
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::ReportRequest>(IN_FLIGHT);
    let mut acks = AuditServiceClient::new(channel)
        .report(auth(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &token,
        ))
        .await
        .expect("report stream")
        .into_inner();
    let batches: Vec<Vec<v1::AuditEvent>> = (0..count)
        .map(|n| event(s, n))
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(<[v1::AuditEvent]>::to_vec)
        .collect();
    let total = batches.len();
    let mut sent = 0;
    let mut acked_batches = 0;
    let mut acked = 0;
    let mut batches = batches.into_iter();
    while acked_batches < total {
        while sent - acked_batches < IN_FLIGHT && sent < total {
            let events = batches.next().expect("a batch");
            tx.send(v1::ReportRequest { events }).await.expect("send");
            sent += 1;
        }
        let ack = acks.next().await.expect("an ack").expect("stored");
        assert!(ack.rejected.is_empty(), "{:?}", ack.rejected);
        acked += ack.acked_ids.len();
        acked_batches += 1;
    }
    acked
}

/// Events per second into the replica behind `channel`.
async fn run(idp: &TestIdp, channel: &Channel, total: u64) -> f64 {
    let token = common::prepare(idp, channel, POLICY).await;
    let per = total / STREAMS as u64;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..STREAMS)
        .map(|s| tokio::spawn(stream(channel.clone(), token.clone(), s, per)))
        .collect();
    let mut stored = 0;
    for t in tasks {
        stored += t.await.expect("stream");
    }
    assert_eq!(
        stored as u64,
        per * STREAMS as u64,
        "every event acknowledged once"
    );
    stored as f64 / t0.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    wicket_testkit::init_crypto();
    let total: u64 = std::env::var("WICKET_BENCH_AUDIT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let idp = TestIdp::start("wicket").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rows = Vec::new();
    let sqlite = format!("sqlite:{}", dir.path().join("audit.db").display());
    let one = common::replica(&idp, &sqlite).await;
    rows.push((
        "SQLite (file, WAL, synchronous=FULL)",
        run(&idp, &one, total).await,
    ));
    match std::env::var("WICKET_BENCH_PG_URL") {
        Ok(pg) => {
            let c = common::replica(&idp, &pg).await;
            rows.push(("PostgreSQL", run(&idp, &c, total).await));
        }
        Err(_) => println!("(WICKET_BENCH_PG_URL unset: PostgreSQL skipped)"),
    }
    println!(
        "\naudit ingest, {total} events from {STREAMS} concurrent sidecar streams \
         (batches of {BATCH}, {IN_FLIGHT} in flight each)"
    );
    for (name, rate) in rows {
        println!(
            "{name:<40} {rate:>10.0} events/s  (target >= 50,000: {})",
            if rate >= 50_000.0 { "met" } else { "MISSED" }
        );
    }
}
