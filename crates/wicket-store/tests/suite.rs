//! One storage suite, run against SQLite and against a real PostgreSQL
//! (`WICKET_TEST_PG_URL`, started by `cargo xtask test`).

use std::sync::Arc;

use chrono::{Duration, Utc};
use wicket_core::*;
use wicket_store::*;

async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("wicket.db").display());
    (open(&url).await.unwrap(), dir)
}

async fn postgres() -> (Arc<dyn Store>, ()) {
    use sqlx::Connection as _;
    let admin = std::env::var("WICKET_TEST_PG_URL").expect(
        "WICKET_TEST_PG_URL is not set: run the suite with `cargo xtask test`, which starts PostgreSQL",
    );
    let name = format!("store_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    (open(&url).await.unwrap(), ())
}

fn principal(sub: &str) -> Principal {
    Principal {
        subject: sub.into(),
        issuer: "https://idp".into(),
        kind: PrincipalKind::Agent,
        groups: vec!["g".into()],
        ..Default::default()
    }
}

fn event(id: &str, session: &str, seq: u64, kind: AuditKind) -> AuditEvent {
    AuditEvent {
        id: id.into(),
        session_id: session.into(),
        seq,
        time: Utc::now() + Duration::milliseconds(seq as i64),
        kind,
        connection: "db".into(),
        principal: Some(principal("bot")),
        command: (kind == AuditKind::Command).then(|| Command {
            text: format!("SELECT {seq}"),
            ..Default::default()
        }),
        client_addr: "127.0.0.1:5000".into(),
        ..Default::default()
    }
}

async fn policies(s: Arc<dyn Store>) {
    assert!(s.get_policy(None).await.unwrap().is_none());
    let (v1, changed) = s.put_policy("a: 1", "sha-a", "alice").await.unwrap();
    assert!(changed);
    assert_eq!(v1.version, 1);
    let (same, changed) = s.put_policy("a: 1", "sha-a", "bob").await.unwrap();
    assert!(!changed);
    assert_eq!(same.version, 1);
    assert_eq!(same.applied_by, "alice");
    let (v2, _) = s.put_policy("a: 2", "sha-b", "bob").await.unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(s.get_policy(None).await.unwrap().unwrap().document, "a: 2");
    assert_eq!(
        s.get_policy(Some(1)).await.unwrap().unwrap().document,
        "a: 1"
    );
    assert!(s.get_policy(Some(9)).await.unwrap().is_none());
}

async fn events_are_idempotent_and_drive_sessions(s: Arc<dyn Store>) {
    let batch = vec![
        event("e1", "s1", 1, AuditKind::SessionStart),
        event("e2", "s1", 2, AuditKind::Command),
        event("e3", "s1", 3, AuditKind::Command),
    ];
    assert_eq!(s.append_events(&batch).await.unwrap(), ["e1", "e2", "e3"]);
    // A replay (e.g. from a sidecar spool) stores nothing twice.
    assert_eq!(s.append_events(&batch).await.unwrap(), ["e1", "e2", "e3"]);
    let sess = s.get_session("s1").await.unwrap().unwrap();
    assert_eq!(sess.command_count, 2);
    assert_eq!(sess.state, "active");
    assert_eq!(sess.principal.subject, "bot");
    assert_eq!(sess.client_addr, "127.0.0.1:5000");
    let evs = s.list_events("s1", 0, 0).await.unwrap();
    assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(evs[1], batch[1]);
    assert_eq!(s.list_events("s1", 2, 0).await.unwrap().len(), 1);

    // Terminate, then the sidecar reports the end.
    let t = s
        .terminate_session("s1", "admin said so")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.state, "terminating");
    assert_eq!(s.terminating_sessions().await.unwrap(), ["s1"]);
    let mut end = event("e4", "s1", 4, AuditKind::SessionEnd);
    end.end_reason = "terminated".into();
    s.append_events(&[end]).await.unwrap();
    let sess = s.get_session("s1").await.unwrap().unwrap();
    assert_eq!(sess.state, "ended");
    assert_eq!(sess.end_reason, "terminated");
    assert!(sess.ended_at.is_some());
    assert!(s.terminating_sessions().await.unwrap().is_empty());

    // Events arriving before their session start still make a session.
    s.append_events(&[event("e9", "s2", 2, AuditKind::Command)])
        .await
        .unwrap();
    s.append_events(&[event("e8", "s2", 1, AuditKind::SessionStart)])
        .await
        .unwrap();
    let s2 = s.get_session("s2").await.unwrap().unwrap();
    assert_eq!(s2.command_count, 1);
    let f = SessionFilter {
        active_only: true,
        ..Default::default()
    };
    let active: Vec<_> = s
        .list_sessions(&f)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(active, ["s2"]);
    let f = SessionFilter {
        principal: Some("bot".into()),
        connection: Some("db".into()),
        ..Default::default()
    };
    assert_eq!(s.list_sessions(&f).await.unwrap().len(), 2);
    let f = SessionFilter {
        principal: Some("nobody".into()),
        ..Default::default()
    };
    assert!(s.list_sessions(&f).await.unwrap().is_empty());
}

fn approval(id: &str, request_id: &str) -> Approval {
    Approval {
        id: id.into(),
        rev: 0,
        state: ApprovalState::Pending,
        request: ApprovalRequest {
            request_id: request_id.into(),
            session_id: "s1".into(),
            connection: "db".into(),
            principal: principal("bot"),
            decision: Decision {
                effect: Effect::Review,
                rule: "writes".into(),
                reason: String::new(),
                review: Some(ReviewSpec::default()),
            },
            ..Default::default()
        },
        votes: vec![],
        created_at: Utc::now(),
        expires_at: Utc::now() + Duration::seconds(60),
        reason: String::new(),
        reuse_key: String::new(),
        reuse_until: None,
    }
}

async fn approvals_are_idempotent_and_optimistic(s: Arc<dyn Store>) {
    let a = s.create_approval(&approval("a1", "req-1")).await.unwrap();
    // Same request id: the existing approval comes back.
    let again = s.create_approval(&approval("a2", "req-1")).await.unwrap();
    assert_eq!(again.id, "a1");
    let mut first = a.clone();
    let mut second = a.clone();
    first.state = ApprovalState::Approved;
    s.update_approval(&mut first).await.unwrap();
    assert_eq!(first.rev, 1);
    second.state = ApprovalState::Denied;
    assert!(matches!(
        s.update_approval(&mut second).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(second.rev, 0);
    let got = s.get_approval("a1").await.unwrap().unwrap();
    assert_eq!(got.state, ApprovalState::Approved);
    s.create_approval(&approval("a3", "req-3")).await.unwrap();
    let pending = s
        .list_approvals(Some(ApprovalState::Pending), 0)
        .await
        .unwrap();
    assert_eq!(
        pending.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        ["a3"]
    );
    assert_eq!(s.list_approvals(None, 0).await.unwrap().len(), 2);
    assert!(s.get_approval("nope").await.unwrap().is_none());

    // Reuse: only an approved approval with the key, while its time runs.
    let now = Utc::now();
    let mut r = approval("a4", "req-4");
    r.reuse_key = "key-1".into();
    let mut r = s.create_approval(&r).await.unwrap();
    assert!(
        s.find_reusable("key-1", now).await.unwrap().is_none(),
        "pending"
    );
    r.state = ApprovalState::Approved;
    r.reuse_until = Some(now + Duration::seconds(60));
    s.update_approval(&mut r).await.unwrap();
    assert_eq!(
        s.find_reusable("key-1", now).await.unwrap().map(|a| a.id),
        Some("a4".to_string())
    );
    assert!(s.find_reusable("key-2", now).await.unwrap().is_none());
    assert!(s.find_reusable("", now).await.unwrap().is_none());
    assert!(
        s.find_reusable("key-1", now + Duration::seconds(61))
            .await
            .unwrap()
            .is_none(),
        "past its time"
    );
}

async fn access_grants(s: Arc<dyn Store>) {
    // Stored to the millisecond.
    let now = chrono::DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap();
    let grant = |id: &str, conn: &str, secs: i64| AccessGrant {
        id: id.into(),
        approval_id: format!("ap-{id}"),
        issuer: "iss".into(),
        subject: "bot".into(),
        label: "bot".into(),
        connection: conn.into(),
        reason: "incident 42".into(),
        granted_at: now,
        until: now + Duration::seconds(secs),
    };
    s.put_access_grant(&grant("g1", "db", 60)).await.unwrap();
    s.put_access_grant(&grant("g1", "db", 999)).await.unwrap(); // again: unchanged
    s.put_access_grant(&grant("g2", "db", 30)).await.unwrap();
    s.put_access_grant(&grant("g3", "other", 60)).await.unwrap();
    let on_db = s.list_access_grants(Some("db"), now).await.unwrap();
    assert_eq!(
        on_db.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
        ["g2", "g1"]
    );
    assert_eq!(on_db[1], grant("g1", "db", 60));
    assert_eq!(s.list_access_grants(None, now).await.unwrap().len(), 3);
    let later = now + Duration::seconds(45);
    assert_eq!(
        s.list_access_grants(Some("db"), later).await.unwrap().len(),
        1
    );
}

async fn revocations_sidecars_traces(s: Arc<dyn Store>) {
    let now = Utc::now();
    let r = Revocation {
        issuer: "iss".into(),
        subject: "mallory".into(),
        reason: "left".into(),
        revoked_at: now,
        until: None,
    };
    s.revoke(&r).await.unwrap();
    s.revoke(&Revocation {
        subject: "temp".into(),
        until: Some(now + Duration::seconds(1)),
        ..r.clone()
    })
    .await
    .unwrap();
    assert_eq!(s.list_revocations(now).await.unwrap().len(), 2);
    assert!(s.is_revoked("iss", "temp", now).await.unwrap());
    assert!(
        !s.is_revoked("iss", "temp", now + Duration::seconds(5))
            .await
            .unwrap()
    );
    assert!(
        s.is_revoked("iss", "mallory", now + Duration::seconds(5))
            .await
            .unwrap()
    );
    assert!(!s.is_revoked("other-iss", "mallory", now).await.unwrap());
    assert_eq!(
        s.list_revocations(now + Duration::seconds(5))
            .await
            .unwrap(),
        [r.clone()].map(|mut r| {
            r.revoked_at =
                chrono::TimeZone::timestamp_millis_opt(&Utc, r.revoked_at.timestamp_millis())
                    .unwrap();
            r
        })
    );

    let sc = SidecarRecord {
        id: "sc1".into(),
        name: "pg-orders".into(),
        connections: vec!["db".into()],
        secret_hash: "abc".into(),
        created_at: now,
        revoked: false,
    };
    s.create_sidecar(&sc).await.unwrap();
    assert_eq!(
        s.get_sidecar("sc1").await.unwrap().unwrap().connections,
        ["db"]
    );
    assert!(s.revoke_sidecar("sc1").await.unwrap().unwrap().revoked);
    assert_eq!(s.list_sidecars().await.unwrap().len(), 1);
    // A provisioned credential: new, unchanged, rotated; a revocation stays.
    let provisioned = SidecarRecord {
        id: "sc2".into(),
        name: "orders-db".into(),
        connections: vec!["orders-db".into()],
        secret_hash: "h1".into(),
        created_at: now,
        revoked: false,
    };
    assert!(s.put_sidecar(&provisioned).await.unwrap());
    assert!(!s.put_sidecar(&provisioned).await.unwrap());
    let rotated = SidecarRecord {
        secret_hash: "h2".into(),
        ..provisioned.clone()
    };
    assert!(s.put_sidecar(&rotated).await.unwrap());
    assert_eq!(
        s.get_sidecar("sc2").await.unwrap().unwrap().secret_hash,
        "h2"
    );
    assert!(
        s.put_sidecar(&SidecarRecord {
            secret_hash: "h3".into(),
            ..sc.clone()
        })
        .await
        .unwrap()
    );
    let kept = s.get_sidecar("sc1").await.unwrap().unwrap();
    assert!(kept.revoked && kept.secret_hash == "h3");

    let t = ReasoningTrace {
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        prompt: "find late orders".into(),
        confidence: 0.8,
        ..Default::default()
    };
    s.put_trace(&t).await.unwrap();
    let t2 = ReasoningTrace {
        confidence: 0.9,
        ..t.clone()
    };
    s.put_trace(&t2).await.unwrap();
    assert_eq!(s.get_trace(&t.trace_id).await.unwrap().unwrap(), t2);
    s.ping().await.unwrap();
}

async fn keys_are_created_once(s: Arc<dyn Store>) {
    assert_eq!(
        s.key_or_insert("ssh_user_ca", "first").await.unwrap(),
        "first"
    );
    // A later (or racing) candidate loses to the stored key.
    assert_eq!(
        s.key_or_insert("ssh_user_ca", "second").await.unwrap(),
        "first"
    );
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.key_or_insert("other", &format!("k{i}")).await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for r in racers {
        got.push(r.await.unwrap());
    }
    assert!(got.windows(2).all(|w| w[0] == w[1]), "{got:?}");
}

async fn console_sign_outs_are_kept_until_the_session_would_end(s: Arc<dyn Store>) {
    let now = chrono::Utc::now();
    let hour = chrono::Duration::hours(1);
    assert!(!s.console_session_ended("c1").await.unwrap());
    s.end_console_session("c1", now + hour).await.unwrap();
    // Twice (a second click, another replica) is the same.
    s.end_console_session("c1", now + hour).await.unwrap();
    assert!(s.console_session_ended("c1").await.unwrap());
    // One whose token has expired anyway goes with the next sign-out.
    s.end_console_session("c0", now - chrono::Duration::seconds(1))
        .await
        .unwrap();
    s.end_console_session("c2", now + hour).await.unwrap();
    assert!(!s.console_session_ended("c0").await.unwrap());
    assert!(s.console_session_ended("c2").await.unwrap());
    assert!(s.console_session_ended("c1").await.unwrap());
}

async fn events_are_hash_chained_and_rooted(s: Arc<dyn Store>) {
    use wicket_core::evidence::*;
    let all: Vec<AuditEvent> = (1..=6)
        .map(|i| {
            let kind = match i {
                1 => AuditKind::SessionStart,
                6 => AuditKind::SessionEnd,
                _ => AuditKind::Command,
            };
            event(&format!("c{i}"), "chain", i, kind)
        })
        .collect();
    s.append_events(&all[..3]).await.unwrap();
    // A replayed batch that also carries new events: the replayed ones are
    // acknowledged, not chained twice; the chain has no hole.
    assert_eq!(
        s.append_events(&all[1..]).await.unwrap(),
        ["c2", "c3", "c4", "c5", "c6"]
    );
    let chain = s.chain_events("chain", 0, 0).await.unwrap();
    assert_eq!(
        chain
            .iter()
            .map(|e| (e.index, e.id.as_str()))
            .collect::<Vec<_>>(),
        [
            (1, "c1"),
            (2, "c2"),
            (3, "c3"),
            (4, "c4"),
            (5, "c5"),
            (6, "c6")
        ]
    );
    let mut prev = GENESIS;
    for e in &chain {
        prev = link(&prev, e.index, e.body.as_bytes());
        assert_eq!(prev, e.hash, "event {} chains from the one before", e.index);
        // The stored body is the event.
        let parsed: AuditEvent = serde_json::from_str(&e.body).unwrap();
        assert_eq!(parsed.id, e.id);
    }
    assert_eq!(s.chain_head("chain").await.unwrap(), Some((6, prev)));
    assert_eq!(s.chain_events("chain", 4, 0).await.unwrap().len(), 2);
    assert_eq!(s.unchained_events("chain").await.unwrap(), 0);
    assert_eq!(
        s.get_session("chain").await.unwrap().unwrap().command_count,
        4
    );

    // Seals: stored, replaced only by a longer one.
    let seal = Seal {
        len: 6,
        head: prev,
        sealed_at_ms: 5,
        signature: vec![1; 64],
        key_id: "k".into(),
    };
    s.put_seal("chain", &seal).await.unwrap();
    let shorter = Seal {
        len: 2,
        ..seal.clone()
    };
    s.put_seal("chain", &shorter).await.unwrap();
    assert_eq!(s.get_seal("chain").await.unwrap(), Some(seal));
    assert_eq!(s.get_seal("nope").await.unwrap(), None);

    // Roots take the sessions whose chain grew, once.
    s.append_events(&[event("o1", "other", 1, AuditKind::SessionStart)])
        .await
        .unwrap();
    let leaves = s.unrooted(100).await.unwrap();
    assert_eq!(
        leaves
            .iter()
            .map(|l| (l.session_id.as_str(), l.len))
            .collect::<Vec<_>>(),
        [("chain", 6), ("other", 1)]
    );
    assert_eq!(s.last_root().await.unwrap(), None);
    let root = Root {
        seq: 1,
        created_at_ms: 9,
        prev: GENESIS,
        root: merkle_root(&leaves.iter().map(Leaf::hash).collect::<Vec<_>>()),
        leaves: 2,
        signature: vec![2; 64],
        key_id: "k".into(),
    };
    s.put_root(&root, &leaves).await.unwrap();
    assert!(matches!(
        s.put_root(&root, &leaves).await,
        Err(StoreError::Conflict)
    ));
    assert!(s.unrooted(100).await.unwrap().is_empty());
    assert_eq!(s.last_root().await.unwrap(), Some(root.clone()));
    assert_eq!(s.list_roots(0, 0).await.unwrap(), [root]);
    assert_eq!(s.root_leaves(1, "", 0).await.unwrap(), leaves);
    assert_eq!(s.root_leaves(1, "chain", 0).await.unwrap(), leaves[1..]);
    assert_eq!(
        s.checkpoints("chain").await.unwrap(),
        [Checkpoint {
            root_seq: 1,
            len: 6,
            head: prev
        }]
    );
    s.append_events(&[event("o2", "other", 2, AuditKind::Command)])
        .await
        .unwrap();
    assert_eq!(s.session_ids("", 0).await.unwrap(), ["chain", "other"]);
    assert_eq!(s.session_ids("chain", 0).await.unwrap(), ["other"]);
    let again = s.unrooted(100).await.unwrap();
    assert_eq!(
        again
            .iter()
            .map(|l| (l.session_id.as_str(), l.len))
            .collect::<Vec<_>>(),
        [("other", 2)]
    );
}

async fn events_are_searchable(s: Arc<dyn Store>) {
    let mut evs = Vec::new();
    for (i, (session, sub, text, effect, outcome)) in [
        ("q1", "ada", "SELECT * FROM customers", Effect::Allow, ""),
        (
            "q1",
            "ada",
            "DELETE FROM orders WHERE id = 7",
            Effect::Allow,
            "approved",
        ),
        ("q2", "bob", "DROP TABLE customers", Effect::Deny, ""),
        ("q2", "bob", "SELECT 100% _literal_", Effect::Allow, ""),
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = event(&format!("q{i}"), session, i as u64 + 1, AuditKind::Command);
        e.principal = Some(Principal {
            display_name: format!("{sub} the agent"),
            ..principal(sub)
        });
        e.command = Some(Command {
            text: text.into(),
            ..Default::default()
        });
        e.decision = Some(Decision {
            effect,
            rule: "r".into(),
            ..Default::default()
        });
        if !outcome.is_empty() {
            e.details.insert("approval_outcome".into(), outcome.into());
        }
        if session == "q2" {
            e.connection = "other-db".into();
        }
        evs.push(e);
    }
    s.append_events(&evs).await.unwrap();
    let ids = |found: Vec<AuditEvent>| found.into_iter().map(|e| e.id).collect::<Vec<_>>();
    let q = |f: fn(&mut EventSearch)| {
        let mut q = EventSearch::default();
        f(&mut q);
        q
    };
    // Newest first; text is case-insensitive; wildcards are literal.
    assert_eq!(
        ids(s
            .search_events(&q(|q| q.text = "customers".into()))
            .await
            .unwrap()),
        ["q2", "q0"]
    );
    assert_eq!(
        ids(s
            .search_events(&q(|q| q.text = "drop TABLE".into()))
            .await
            .unwrap()),
        ["q2"]
    );
    assert_eq!(
        ids(s
            .search_events(&q(|q| q.text = "100% _lit".into()))
            .await
            .unwrap()),
        ["q3"]
    );
    assert!(
        s.search_events(&q(|q| q.text = "1_0%".into()))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(s
            .search_events(&q(|q| q.principal = "bob".into()))
            .await
            .unwrap()),
        ["q3", "q2"]
    );
    assert_eq!(
        ids(s
            .search_events(&q(|q| q.principal = "ada the agent".into()))
            .await
            .unwrap()),
        ["q1", "q0"]
    );
    assert_eq!(
        ids(s
            .search_events(&q(|q| q.connection = "other-db".into()))
            .await
            .unwrap()),
        ["q3", "q2"]
    );
    assert_eq!(
        ids(s
            .search_events(&q(|q| q.decision = "deny".into()))
            .await
            .unwrap()),
        ["q2"]
    );
    assert_eq!(
        ids(s
            .search_events(&q(|q| q.decision = "approved".into()))
            .await
            .unwrap()),
        ["q1"]
    );
    assert!(matches!(
        s.search_events(&q(|q| q.decision = "maybe".into())).await,
        Err(StoreError::Invalid(_))
    ));
    let t1 = evs[1].time;
    let mut between = EventSearch {
        since: Some(t1),
        until: Some(evs[3].time),
        ..Default::default()
    };
    assert_eq!(ids(s.search_events(&between).await.unwrap()), ["q2", "q1"]);
    between.limit = 1;
    assert_eq!(ids(s.search_events(&between).await.unwrap()), ["q2"]);
}

async fn events_are_exported_in_store_order_under_a_lease(s: Arc<dyn Store>) {
    s.append_events(&[
        event("x1", "ex", 1, AuditKind::SessionStart),
        event("x2", "ex", 2, AuditKind::Command),
    ])
    .await
    .unwrap();
    s.append_events(&[event("x3", "ex", 3, AuditKind::Command)])
        .await
        .unwrap();
    let all = s.events_after(0, 100).await.unwrap();
    let ids: Vec<String> = all
        .iter()
        .map(|(_, b)| serde_json::from_str::<AuditEvent>(b).unwrap().id)
        .collect();
    assert_eq!(ids, ["x1", "x2", "x3"]);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(s.events_after(all[0].0, 1).await.unwrap(), all[1..2]);
    assert!(s.events_after(all[2].0, 10).await.unwrap().is_empty());

    // One owner at a time; the lease passes on when it runs out.
    assert_eq!(
        s.export_claim("jsonl", "a", 1000, 2000).await.unwrap(),
        Some(0)
    );
    assert_eq!(
        s.export_claim("jsonl", "b", 1500, 2500).await.unwrap(),
        None
    );
    assert!(
        s.export_advance("jsonl", "a", all[1].0, 2, 3000)
            .await
            .unwrap()
    );
    assert!(
        !s.export_advance("jsonl", "b", all[2].0, 1, 3000)
            .await
            .unwrap()
    );
    assert_eq!(
        s.export_claim("jsonl", "b", 3001, 4000).await.unwrap(),
        Some(all[1].0)
    );
    assert!(
        !s.export_advance("jsonl", "a", all[2].0, 1, 5000)
            .await
            .unwrap()
    );
    // Another export keeps its own position.
    assert_eq!(
        s.export_claim("otlp", "a", 3001, 4000).await.unwrap(),
        Some(0)
    );
}

async fn retention_deletes_unheld_sessions_with_a_record(s: Arc<dyn Store>) {
    use wicket_core::evidence::Deletion;
    let old = Utc::now() - Duration::days(3);
    for id in ["old1", "old2"] {
        let mut start = event(&format!("{id}-1"), id, 1, AuditKind::SessionStart);
        let mut end = event(&format!("{id}-2"), id, 2, AuditKind::SessionEnd);
        start.time = old;
        end.time = old;
        s.append_events(&[start, end]).await.unwrap();
    }
    s.append_events(&[
        event("new-1", "new", 1, AuditKind::SessionStart),
        event("new-2", "new", 2, AuditKind::SessionEnd),
    ])
    .await
    .unwrap();
    let held = s.set_hold("old2", "litigation 42").await.unwrap().unwrap();
    assert_eq!(held.hold, "litigation 42");
    assert!(s.set_hold("nope", "x").await.unwrap().is_none());
    let cutoff = Utc::now() - Duration::days(1);
    assert_eq!(s.expired_sessions("db", cutoff, 0).await.unwrap(), ["old1"]);
    assert!(
        s.expired_sessions("other", cutoff, 0)
            .await
            .unwrap()
            .is_empty()
    );
    let (len, head) = s.chain_head("old1").await.unwrap().unwrap();
    let d = Deletion {
        session_id: "old1".into(),
        len,
        head,
        deleted_at_ms: 7,
        reason: "retention: 1 days".into(),
        signature: vec![3; 64],
        key_id: "k".into(),
    };
    assert!(s.delete_session(&d).await.unwrap());
    assert!(s.get_session("old1").await.unwrap().is_none());
    assert!(s.list_events("old1", 0, 0).await.unwrap().is_empty());
    assert_eq!(s.get_deletion("old1").await.unwrap(), Some(d));
    // A held session is not deleted, even when asked.
    let d2 = Deletion {
        session_id: "old2".into(),
        len: 2,
        head: [0; 32],
        deleted_at_ms: 7,
        reason: "r".into(),
        signature: vec![],
        key_id: "k".into(),
    };
    assert!(!s.delete_session(&d2).await.unwrap());
    assert!(s.get_session("old2").await.unwrap().is_some());
    assert!(s.get_deletion("old2").await.unwrap().is_none());
    s.set_hold("old2", "").await.unwrap();
    assert_eq!(s.expired_sessions("db", cutoff, 0).await.unwrap(), ["old2"]);
}

/// One batch interleaving sessions, one of them with a chain already and
/// the others new: each session's chain continues from its own head, its
/// command count grows by its own commands.
async fn a_batch_of_many_sessions_chains_each_on_its_own(s: Arc<dyn Store>) {
    use wicket_core::evidence::*;
    s.append_events(&[
        event("m0", "old", 1, AuditKind::SessionStart),
        event("m1", "old", 2, AuditKind::Command),
    ])
    .await
    .unwrap();
    let mut batch = Vec::new();
    for i in 0..30u64 {
        let session = ["old", "new-a", "new-b"][i as usize % 3];
        let kind = if i < 3 && session != "old" {
            AuditKind::SessionStart
        } else {
            AuditKind::Command
        };
        batch.push(event(&format!("n{i}"), session, 10 + i, kind));
    }
    let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
    assert_eq!(s.append_events(&batch).await.unwrap(), ids);
    for (session, len, commands) in [("old", 12, 11), ("new-a", 10, 9), ("new-b", 10, 9)] {
        let chain = s.chain_events(session, 0, 0).await.unwrap();
        assert_eq!(
            chain.iter().map(|e| e.index).collect::<Vec<_>>(),
            (1..=len).collect::<Vec<u64>>(),
            "{session}"
        );
        let mut prev = GENESIS;
        for e in &chain {
            prev = link(&prev, e.index, e.body.as_bytes());
            assert_eq!(prev, e.hash, "{session}: event {} chains on", e.index);
        }
        assert_eq!(s.chain_head(session).await.unwrap(), Some((len, prev)));
        let sess = s.get_session(session).await.unwrap().unwrap();
        assert_eq!(sess.command_count, commands, "{session}");
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            use super::*;
            $( #[tokio::test] async fn $name() { let (s, _dir) = sqlite().await; super::$name(s).await; } )*
        }
        mod on_postgres {
            use super::*;
            $( #[tokio::test] async fn $name() { let (s, _g) = postgres().await; super::$name(s).await; } )*
        }
    };
}

suite!(
    policies,
    events_are_idempotent_and_drive_sessions,
    approvals_are_idempotent_and_optimistic,
    revocations_sidecars_traces,
    access_grants,
    keys_are_created_once,
    console_sign_outs_are_kept_until_the_session_would_end,
    events_are_hash_chained_and_rooted,
    a_batch_of_many_sessions_chains_each_on_its_own,
    events_are_searchable,
    events_are_exported_in_store_order_under_a_lease,
    retention_deletes_unheld_sessions_with_a_record,
);

#[tokio::test]
async fn sqlite_file_survives_reopen_and_uses_wal() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("w.db").display());
    {
        let s = open(&url).await.unwrap();
        s.put_policy("x", "sha", "me").await.unwrap();
    }
    let s = open(&url).await.unwrap();
    assert_eq!(s.get_policy(None).await.unwrap().unwrap().document, "x");
    assert!(dir.path().join("w.db-wal").exists());
    assert!(matches!(
        open("mysql://x").await,
        Err(StoreError::UnsupportedUrl)
    ));
}
