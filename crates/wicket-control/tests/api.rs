//! The control service end to end over gRPC: an in-process IdP, SQLite (and
//! PostgreSQL for the replica-safe parts), real tonic clients.

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};
use wicket_proto::v1;
use wicket_proto::v1::approval_admin_service_client::ApprovalAdminServiceClient;
use wicket_proto::v1::approval_gate_service_client::ApprovalGateServiceClient;
use wicket_proto::v1::audit_service_client::AuditServiceClient;
use wicket_proto::v1::bundle_service_client::BundleServiceClient;
use wicket_proto::v1::connection_admin_service_client::ConnectionAdminServiceClient;
use wicket_proto::v1::policy_admin_service_client::PolicyAdminServiceClient;
use wicket_proto::v1::principal_admin_service_client::PrincipalAdminServiceClient;
use wicket_proto::v1::session_admin_service_client::SessionAdminServiceClient;
use wicket_proto::v1::sidecar_admin_service_client::SidecarAdminServiceClient;
use wicket_proto::v1::trace_service_client::TraceServiceClient;
use wicket_testkit::idp::{TestIdp, TokenSpec};

const POLICY: &str = r#"
connections:
  - name: orders-db
    protocol: postgres
    upstream: 127.0.0.1:5432
    labels: {env: prod}
  - name: web
    protocol: http
grants:
  - id: dbas
    groups: [dba]
  - id: bots
    principals: [bot-1]
    connections: [orders-db]
access:
  - id: breakglass
    connections: [orders-db]
    groups: [oncall]
    review: {approvers: [dba-leads], timeout: 1m}
    max: 2h
rules:
  - id: reads
    effect: allow
    match: {commands: [select]}
  - id: no-drops
    effect: deny
    match: {commands: [ddl]}
  - id: writes
    effect: review
    match: {commands: [update, delete]}
    review: {approvers: [dba-leads], timeout: 2s}
"#;

struct Harness {
    idp: TestIdp,
    channel: Channel,
    admin: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    r
}

async fn start_with(database_url: Option<String>) -> Harness {
    start_replica(TestIdp::start("wicket").await, database_url).await
}

/// A control service trusting `idp` (replicas of one deployment share it).
async fn start_replica(idp: TestIdp, database_url: Option<String>) -> Harness {
    start_tuned(idp, database_url, |_| {}).await
}

/// As [`start_replica`], with settings changed by `tune`.
async fn start_tuned(
    idp: TestIdp,
    database_url: Option<String>,
    tune: impl FnOnce(&mut wicket_control::Config),
) -> Harness {
    wicket_testkit::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let database_url =
        database_url.unwrap_or_else(|| format!("sqlite:{}", dir.path().join("w.db").display()));
    let (addr, stop) = spawn_control(&idp.issuer(), &database_url, tune).await;
    let channel = loop {
        if let Ok(c) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let admin = idp.mint(&TokenSpec::human("root", &["wicket-admins"]));
    Harness {
        idp,
        channel,
        admin,
        _dir: dir,
        _stop: stop,
    }
}

/// Starts a control service (another replica, when `database_url` is
/// shared) on a free port; it runs until the sender is dropped.
async fn spawn_control(
    issuer: &str,
    database_url: &str,
    tune: impl FnOnce(&mut wicket_control::Config),
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = wicket_control::Config {
        max_message_bytes: 256 * 1024,
        agent_rules: vec!["client-credentials".into()],
        ..wicket_control::Config::defaults(issuer, database_url, addr)
    };
    tune(&mut cfg);
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        wicket_control::run(cfg, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (addr, stop)
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Harness {
    fn policy(&self) -> PolicyAdminServiceClient<Channel> {
        PolicyAdminServiceClient::new(self.channel.clone())
    }

    async fn apply(&self, doc: &str) -> v1::ApplyPolicyResponse {
        self.policy()
            .apply_policy(with_token(
                v1::ApplyPolicyRequest {
                    document: doc.into(),
                    source_name: "policy.yaml".into(),
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn sidecar_token(&self, connections: &[&str]) -> String {
        SidecarAdminServiceClient::new(self.channel.clone())
            .create_sidecar_credential(with_token(
                v1::CreateSidecarCredentialRequest {
                    name: "pg-sidecar".into(),
                    connections: connections.iter().map(|c| c.to_string()).collect(),
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .token
    }
}

fn principal(sub: &str) -> v1::Principal {
    v1::Principal {
        subject: sub.into(),
        issuer: "https://idp".into(),
        kind: v1::PrincipalKind::Agent as i32,
        ..Default::default()
    }
}

fn command(kind: &str) -> v1::Command {
    v1::Command {
        text: format!("{kind} something"),
        classification: Some(v1::Classification {
            kind: kind.into(),
            verb: kind.to_uppercase(),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn admin_calls_need_a_valid_token_and_the_right_group() {
    let h = start_with(None).await;
    h.apply(POLICY).await;
    let c = ConnectionAdminServiceClient::new(h.channel.clone());
    let list = |t: Option<String>| {
        let mut c = c.clone();
        async move {
            let req = match t {
                Some(t) => with_token(v1::ListConnectionsRequest {}, &t),
                None => Request::new(v1::ListConnectionsRequest {}),
            };
            c.list_connections(req).await
        }
    };
    let human = TokenSpec::human("alice", &["wicket-admins"]);
    let cases: Vec<(Option<String>, Code)> = vec![
        (None, Code::Unauthenticated),
        (Some("garbage".into()), Code::Unauthenticated),
        (
            Some(h.idp.mint(&TokenSpec {
                ttl_seconds: -60,
                ..human.clone()
            })),
            Code::Unauthenticated,
        ),
        (
            Some(h.idp.mint_with_foreign_key(&human)),
            Code::Unauthenticated,
        ),
        (Some(h.idp.mint_alg_none(&human)), Code::Unauthenticated),
        (
            Some(h.idp.mint(&TokenSpec::human("nobody", &["sales"]))),
            Code::PermissionDenied,
        ),
        (Some("wks_abc_def".into()), Code::PermissionDenied),
    ];
    for (i, (token, code)) in cases.into_iter().enumerate() {
        let err = list(token).await.unwrap_err();
        assert_eq!(err.code(), code, "case {i}: {}", err.message());
    }
    let ok = list(Some(h.admin.clone())).await.unwrap().into_inner();
    assert_eq!(ok.connections.len(), 2);

    // Auditors and approvers read; only admins write.
    let auditor = h
        .idp
        .mint(&TokenSpec::human("audrey", &["wicket-auditors"]));
    let approver = h
        .idp
        .mint(&TokenSpec::human("april", &["wicket-approvers"]));
    assert!(list(Some(auditor.clone())).await.is_ok());
    assert!(list(Some(approver.clone())).await.is_ok());
    for t in [&auditor, &approver] {
        let err = h
            .policy()
            .apply_policy(with_token(
                v1::ApplyPolicyRequest {
                    document: POLICY.into(),
                    source_name: String::new(),
                },
                t,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("wicket-admins"), "{}", err.message());
    }
    let err = ApprovalAdminServiceClient::new(h.channel.clone())
        .approve(with_token(
            v1::DecideRequest {
                id: "x".into(),
                comment: String::new(),
                reuse_seconds: 0,
            },
            &auditor,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A revoked admin loses the admin API at once.
    let mallory = h.idp.mint(&TokenSpec::human("mallory", &["wicket-admins"]));
    assert!(list(Some(mallory.clone())).await.is_ok());
    PrincipalAdminServiceClient::new(h.channel.clone())
        .revoke_principal(with_token(
            v1::RevokePrincipalRequest {
                issuer: h.idp.issuer(),
                subject: "mallory".into(),
                reason: "left the company".into(),
                duration_seconds: 0,
            },
            &h.admin,
        ))
        .await
        .unwrap();
    let err = list(Some(mallory)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("revoked"));
    // ...and nothing said leaks the token.
    let bad = h.idp.mint(&TokenSpec {
        ttl_seconds: -60,
        ..human
    });
    let err = list(Some(bad.clone())).await.unwrap_err();
    assert!(!err.message().contains(&bad[..20]));
}

#[tokio::test]
async fn oversized_messages_are_rejected_and_the_server_lives_on() {
    let h = start_with(None).await;
    let huge = "#".repeat(512 * 1024);
    let err = h
        .policy()
        .validate_policy(with_token(
            v1::ValidatePolicyRequest {
                document: huge,
                source_name: String::new(),
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    h.apply(POLICY).await;
}

#[tokio::test]
async fn policy_apply_validate_get_and_explain() {
    let h = start_with(None).await;
    let first = h.apply(POLICY).await;
    assert_eq!(first.version, 1);
    assert!(first.changed);
    let again = h.apply(POLICY).await;
    assert_eq!(again.version, 1);
    assert!(!again.changed);

    let bad =
        format!("{POLICY}  - id: broken\n    effect: allow\n    condition: 'command.risk >'\n");
    let err = h
        .policy()
        .apply_policy(with_token(
            v1::ApplyPolicyRequest {
                document: bad.clone(),
                source_name: "bad.yaml".into(),
            },
            &h.admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("bad.yaml:34:"), "{}", err.message());
    assert!(
        err.message().contains("rules[3].condition"),
        "{}",
        err.message()
    );
    let v = h
        .policy()
        .validate_policy(with_token(
            v1::ValidatePolicyRequest {
                document: bad,
                source_name: "bad.yaml".into(),
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert_eq!(
        (v.errors[0].line, v.errors[0].field.as_str()),
        (34, "rules[3].condition")
    );

    let got = h
        .policy()
        .get_policy(with_token(v1::GetPolicyRequest { version: 0 }, &h.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.version, 1);
    assert_eq!(got.document, POLICY);
    assert_eq!(got.applied_by, "root@example.test");

    let explain = |kind: &str, sub: &str| {
        let mut p = h.policy();
        let req = with_token(
            v1::ExplainRequest {
                principal: Some(v1::Principal {
                    groups: vec!["dba".into()],
                    ..principal(sub)
                }),
                connection: "orders-db".into(),
                command: Some(command(kind)),
                has_reasoning: true,
                ..Default::default()
            },
            &h.admin,
        );
        async move { p.explain_policy(req).await.unwrap().into_inner() }
    };
    let e = explain("ddl", "carol").await;
    let d = e.decision.unwrap();
    assert_eq!(
        (d.effect, d.rule.as_str()),
        (v1::Effect::Deny as i32, "no-drops")
    );
    assert_eq!(e.grant, "dbas");
    assert_eq!(e.policy_version, 1);
    let d = explain("update", "carol").await.decision.unwrap();
    assert_eq!(
        (d.effect, d.rule.as_str()),
        (v1::Effect::Review as i32, "writes")
    );
    assert_eq!(d.review.unwrap().approver_groups, ["dba-leads"]);
}

#[tokio::test]
async fn sidecar_credentials_provisioned_by_a_file_authenticate() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecars.json");
    let write = |secret: &str| {
        std::fs::write(
            &file,
            serde_json::json!({"sidecars": [{
                "id": "orders-db-1", "name": "orders-db",
                "connections": ["orders-db"],
                "secret_sha256": wicket_control::auth::hash_secret(secret),
            }]})
            .to_string(),
        )
        .unwrap()
    };
    let refused = |h: &Harness, token: &str| {
        let mut c = BundleServiceClient::new(h.channel.clone());
        let req = with_token(
            v1::WatchBundleRequest {
                connection: "orders-db".into(),
                known_version: 0,
                instance: String::new(),
            },
            token,
        );
        async move { c.watch_bundle(req).await.unwrap_err().code() }
    };
    write("first-secret");
    let db = format!("sqlite:{}", dir.path().join("w.db").display());
    let path = file.clone();
    let h = start_tuned(TestIdp::start("wicket").await, Some(db.clone()), |c| {
        c.sidecar_credentials_file = Some(path)
    })
    .await;
    h.apply(POLICY).await;
    let mut watch = watch_orders_db(&h, "wks_orders-db-1_first-secret").await;
    assert!(watch.next().await.unwrap().is_ok());
    assert_eq!(
        refused(&h, "wks_orders-db-1_wrong").await,
        Code::Unauthenticated
    );
    drop((watch, h));

    // A rotated secret (a new file, the same database): the old one is refused.
    write("second-secret");
    let path = file.clone();
    let h = start_tuned(TestIdp::start("wicket").await, Some(db), |c| {
        c.sidecar_credentials_file = Some(path)
    })
    .await;
    let mut watch = watch_orders_db(&h, "wks_orders-db-1_second-secret").await;
    assert!(watch.next().await.unwrap().is_ok());
    assert_eq!(
        refused(&h, "wks_orders-db-1_first-secret").await,
        Code::Unauthenticated
    );

    // A malformed file is refused with a message naming the file and entry.
    for (doc, says) in [
        (
            r#"{"sidecars": [{"id": "a_b", "name": "x", "connections": ["c"], "secret_sha256": "00"}]}"#,
            "id must be",
        ),
        (
            r#"{"sidecars": [{"id": "a", "name": "x", "connections": [], "secret_sha256": "00"}]}"#,
            "at least one connection",
        ),
        (
            r#"{"sidecars": [{"id": "a", "name": "x", "connections": ["c"], "secret_sha256": "XYZ"}]}"#,
            "secret_sha256",
        ),
        (r#"{"sidecar": []}"#, "not a sidecar credentials file"),
    ] {
        let e = wicket_control::config::provisioned_sidecars(doc, "f.json").unwrap_err();
        assert!(e.contains(says) && e.contains("f.json"), "{e}");
    }
}

#[tokio::test]
async fn principals_attach_their_own_traces_but_never_replace_one() {
    let h = start_with(None).await;
    h.apply(POLICY).await;
    let sidecar = h.sidecar_token(&["orders-db"]).await;
    let agent = h.idp.mint(&TokenSpec::agent("bot", &["agents"]));
    let attach = |token: String, id: &'static str, prompt: &'static str| {
        let mut c = TraceServiceClient::new(h.channel.clone());
        async move {
            c.attach(with_token(
                v1::AttachTraceRequest {
                    trace: Some(v1::ReasoningTrace {
                        trace_id: id.into(),
                        prompt: prompt.into(),
                        ..Default::default()
                    }),
                },
                &token,
            ))
            .await
        }
    };
    let id = "0af7651916cd43dd8448eb211c80319c";
    attach(agent.clone(), id, "mine").await.unwrap();
    let again = attach(agent.clone(), id, "changed").await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    assert!(
        again.message().contains("new trace id"),
        "{}",
        again.message()
    );
    // A sidecar may still replace it (it relays what its caller sent).
    attach(sidecar, id, "relayed").await.unwrap();
    // No token, or a bad one: refused.
    let bad = attach("nope".into(), "1af7651916cd43dd8448eb211c80319c", "x")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn principals_list_the_connections_they_may_use() {
    let h = start_with(None).await;
    let mine = |token: String| {
        let mut c =
            wicket_proto::v1::access_service_client::AccessServiceClient::new(h.channel.clone());
        async move {
            c.list_my_connections(with_token(v1::ListMyConnectionsRequest {}, &token))
                .await
                .map(|r| {
                    r.into_inner()
                        .connections
                        .into_iter()
                        .map(|c| (c.name, c.grant))
                        .collect::<Vec<_>>()
                })
        }
    };
    let bot = h.idp.mint(&TokenSpec::agent("bot-1", &["agents"]));
    // Before any policy: nothing.
    assert!(mine(bot.clone()).await.unwrap().is_empty());
    h.apply(POLICY).await;
    assert_eq!(
        mine(bot).await.unwrap(),
        [("orders-db".to_string(), "bots".to_string())]
    );
    let dba = h.idp.mint(&TokenSpec::human("dana", &["dba"]));
    assert_eq!(
        mine(dba).await.unwrap(),
        [
            ("orders-db".to_string(), "dbas".to_string()),
            ("web".to_string(), "dbas".to_string())
        ]
    );
    let nobody = h.idp.mint(&TokenSpec::agent("stranger", &["agents"]));
    assert!(mine(nobody).await.unwrap().is_empty());
    assert_eq!(
        mine("bad".into()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn sidecars_watch_bundles_report_events_and_wait_for_approvals() {
    let h = start_with(None).await;
    h.apply(POLICY).await;
    let token = h.sidecar_token(&["orders-db"]).await;

    // Scope and credential checks.
    let mut bundles = BundleServiceClient::new(h.channel.clone());
    let watch = |conn: &str, t: &str| {
        with_token(
            v1::WatchBundleRequest {
                connection: conn.into(),
                known_version: 0,
                instance: "test".into(),
            },
            t,
        )
    };
    assert_eq!(
        bundles
            .watch_bundle(watch("web", &token))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let forged = format!("{}x", &token);
    assert_eq!(
        bundles
            .watch_bundle(watch("orders-db", &forged))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        bundles
            .watch_bundle(watch("orders-db", &h.admin))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    let mut stream = bundles
        .watch_bundle(watch("orders-db", &token))
        .await
        .unwrap()
        .into_inner();
    let b1 = stream.next().await.unwrap().unwrap();
    let doc: wicket_policy::PolicyDocument = serde_json::from_slice(&b1.policy_json).unwrap();
    assert_eq!(doc.connections.len(), 1);
    assert_eq!(doc.rules.len(), 3);
    assert!(wicket_policy::Policy::compile(doc).is_ok());

    // A policy change and a revocation reach the watcher.
    h.apply(&POLICY.replace("timeout: 2s", "timeout: 3s")).await;
    let b2 = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(b2.version > b1.version);
    assert_ne!(b2.policy_sha256, b1.policy_sha256);
    PrincipalAdminServiceClient::new(h.channel.clone())
        .revoke_principal(with_token(
            v1::RevokePrincipalRequest {
                issuer: "https://idp".into(),
                subject: "bot-1".into(),
                reason: "compromised".into(),
                duration_seconds: 0,
            },
            &h.admin,
        ))
        .await
        .unwrap();
    let b3 = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(b3.version > b2.version);
    assert_eq!(b3.revocations[0].subject, "bot-1");

    // Audit events are acknowledged by id, replays too, foreign connections rejected.
    let ev = |id: &str, seq: u64, kind: v1::AuditKind, conn: &str| v1::AuditEvent {
        id: id.into(),
        session_id: "sess-1".into(),
        seq,
        time: Some(wicket_proto::convert::ts(chrono::Utc::now())),
        kind: kind as i32,
        connection: conn.into(),
        principal: Some(principal("bot-1")),
        command: Some(command("select")),
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        reasoning: Some(v1::ReasoningTrace {
            reasoning: "checking late orders".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let batch = v1::ReportRequest {
        events: vec![
            ev("e1", 1, v1::AuditKind::SessionStart, "orders-db"),
            ev("e2", 2, v1::AuditKind::Command, "orders-db"),
            ev("e3", 3, v1::AuditKind::Command, "web"),
            v1::AuditEvent {
                kind: 0,
                ..ev("e4", 4, v1::AuditKind::Command, "orders-db")
            },
        ],
    };
    let mut audit = AuditServiceClient::new(h.channel.clone());
    let out = tokio_stream::iter(vec![batch.clone(), batch]);
    let mut acks = audit
        .report(with_token(out, &token))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let ack = acks.next().await.unwrap().unwrap();
        assert_eq!(ack.acked_ids, ["e1", "e2"]);
        let rejected: Vec<_> = ack.rejected.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(rejected, ["e3", "e4"]);
    }
    TraceServiceClient::new(h.channel.clone())
        .attach(with_token(
            v1::AttachTraceRequest {
                trace: Some(v1::ReasoningTrace {
                    trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                    prompt: "Which orders are late?".into(),
                    confidence: 0.7,
                    ..Default::default()
                }),
            },
            &token,
        ))
        .await
        .unwrap();
    let mut sessions = SessionAdminServiceClient::new(h.channel.clone());
    let s = sessions
        .get_session(with_token(
            v1::GetSessionRequest {
                id: "sess-1".into(),
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.command_count, s.state.as_str()), (1, "active"));
    let evs = sessions
        .list_session_events(with_token(
            v1::ListSessionEventsRequest {
                session_id: "sess-1".into(),
                after_seq: 0,
                limit: 0,
            },
            &h.admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(evs.len(), 2);
    let r = evs[1].reasoning.as_ref().unwrap();
    assert_eq!(
        (r.reasoning.as_str(), r.prompt.as_str()),
        ("checking late orders", "Which orders are late?")
    );

    // Terminate reaches the watcher.
    sessions
        .terminate_session(with_token(
            v1::TerminateSessionRequest {
                id: "sess-1".into(),
                reason: "test".into(),
            },
            &h.admin,
        ))
        .await
        .unwrap();
    let b4 = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(b4.terminated_sessions, ["sess-1"]);

    // Approval: requested by the sidecar, self-approval refused, approved by an approver.
    let approve_req = |rid: &str| with_token(held(rid, principal("bot-1"), "update", 2), &token);
    let mut gate = ApprovalGateServiceClient::new(h.channel.clone());
    let mut updates = gate
        .request_approval(approve_req("req-1"))
        .await
        .unwrap()
        .into_inner();
    let pending = updates.next().await.unwrap().unwrap();
    assert_eq!(pending.state, v1::ApprovalState::Pending as i32);
    let mut approvals = ApprovalAdminServiceClient::new(h.channel.clone());
    let outsider = h.idp.mint(&TokenSpec::human("olly", &["wicket-approvers"]));
    let err = approvals
        .approve(with_token(
            v1::DecideRequest {
                id: pending.approval_id.clone(),
                comment: String::new(),
                reuse_seconds: 0,
            },
            &outsider,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("dba-leads"));
    let approver = h.idp.mint(&TokenSpec::human(
        "lead",
        &["wicket-approvers", "dba-leads"],
    ));
    let t0 = std::time::Instant::now();
    approvals
        .approve(with_token(
            v1::DecideRequest {
                id: pending.approval_id.clone(),
                comment: "ok".into(),
                reuse_seconds: 0,
            },
            &approver,
        ))
        .await
        .unwrap();
    let decided = updates.next().await.unwrap().unwrap();
    let latency = t0.elapsed();
    assert_eq!(decided.state, v1::ApprovalState::Approved as i32);
    assert!(
        latency < Duration::from_millis(500),
        "decision took {latency:?}"
    );
    assert!(updates.next().await.is_none(), "stream ends once decided");

    // Same request id: re-attaches to the decided approval.
    let mut again = gate
        .request_approval(approve_req("req-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.next().await.unwrap().unwrap().state,
        v1::ApprovalState::Approved as i32
    );

    // Nobody decides: expired after the hold timeout.
    let mut updates = gate
        .request_approval(approve_req("req-2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        updates.next().await.unwrap().unwrap().state,
        v1::ApprovalState::Pending as i32
    );
    let expired = tokio::time::timeout(Duration::from_secs(4), updates.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(expired.state, v1::ApprovalState::Expired as i32);
}

#[tokio::test]
async fn self_approval_is_refused() {
    let h = start_with(None).await;
    h.apply(POLICY).await;
    let token = h.sidecar_token(&["*"]).await;
    let me = TokenSpec::human("dora", &["dba", "dba-leads", "wicket-approvers"]);
    let mut gate = ApprovalGateServiceClient::new(h.channel.clone());
    let mut updates = gate
        .request_approval(with_token(
            held(
                "r",
                v1::Principal {
                    subject: "dora".into(),
                    issuer: h.idp.issuer(),
                    ..Default::default()
                },
                "delete",
                60,
            ),
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let id = updates.next().await.unwrap().unwrap().approval_id;
    let err = ApprovalAdminServiceClient::new(h.channel.clone())
        .approve(with_token(
            v1::DecideRequest {
                id,
                comment: String::new(),
                reuse_seconds: 0,
            },
            &h.idp.mint(&me),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("own request"));
}

#[tokio::test]
async fn runs_on_postgres_too() {
    let h = start_with(Some(postgres_database().await)).await;
    assert_eq!(h.apply(POLICY).await.version, 1);
    let token = h.sidecar_token(&["orders-db"]).await;
    let mut stream = watch_orders_db(&h, &token).await;
    assert!(stream.next().await.unwrap().is_ok());
}

/// A held DELETE's approval request from sidecar credential `token`.
fn held_delete(rid: &str, token: &str) -> Request<v1::ApprovalRequest> {
    with_token(
        v1::ApprovalRequest {
            reasoning: Some(v1::ReasoningTrace {
                reasoning: "clean up the duplicate order <#42>".into(),
                ..Default::default()
            }),
            ..held(rid, principal("bot-1"), "delete", 60)
        },
        token,
    )
}

/// A held command's approval request as a sidecar sends it: a `kind`
/// statement by `who`, held by rule `writes` (approvers `dba-leads`) for
/// `timeout` seconds.
fn held(rid: &str, who: v1::Principal, kind: &str, timeout: u32) -> v1::ApprovalRequest {
    v1::ApprovalRequest {
        request_id: rid.into(),
        session_id: "sess-1".into(),
        connection: "orders-db".into(),
        principal: Some(who),
        command: Some(command(kind)),
        decision: Some(v1::DecisionInfo {
            effect: v1::Effect::Review as i32,
            rule: "writes".into(),
            reason: String::new(),
            review: Some(v1::ReviewSpec {
                approver_groups: vec!["dba-leads".into()],
                quorum: 1,
                one_per_group: false,
                timeout_seconds: timeout,
                reuse_seconds: 0,
            }),
        }),
        reasoning: None,
    }
}

/// Requests an approval, approves it as a `dba-leads` member, and returns
/// its id and how long the waiting stream took to hear the decision.
async fn request_and_approve(h: &Harness, rid: &str, token: &str) -> (String, Duration) {
    let mut waiting = ApprovalGateServiceClient::new(h.channel.clone())
        .request_approval(held_delete(rid, token))
        .await
        .unwrap()
        .into_inner();
    let id = waiting.next().await.unwrap().unwrap().approval_id;
    let lead = h.idp.mint(&TokenSpec::human(
        "lead",
        &["wicket-approvers", "dba-leads"],
    ));
    let t0 = std::time::Instant::now();
    ApprovalAdminServiceClient::new(h.channel.clone())
        .approve(with_token(
            v1::DecideRequest {
                id: id.clone(),
                comment: "fine".into(),
                reuse_seconds: 0,
            },
            &lead,
        ))
        .await
        .unwrap();
    let decided = waiting.next().await.unwrap().unwrap();
    assert_eq!(decided.state, v1::ApprovalState::Approved as i32);
    (id, t0.elapsed())
}

/// Approval requests and decisions reach a signed generic webhook (retried
/// after failures, same event id) and a Slack-compatible hook with a link
/// to the console.
#[tokio::test]
async fn approvals_are_announced_to_a_signed_webhook_and_slack() {
    use wicket_testkit::hook::HookServer;
    let hook = HookServer::start(&[500, 503]).await;
    let slack = HookServer::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.key");
    std::fs::write(&secret, "topsecret\n").unwrap();
    let (hook_url, slack_url) = (hook.url(), slack.url());
    let h = start_tuned(TestIdp::start("wicket").await, None, |c| {
        c.webhook_url = Some(hook_url);
        c.webhook_secret_file = Some(secret);
        c.slack_webhook_url = Some(slack_url);
        c.console_url = Some("https://wicket.example/console/".into());
    })
    .await;
    h.apply(POLICY).await;
    let token = h.sidecar_token(&["orders-db"]).await;
    let (id, _) = request_and_approve(&h, "n-1", &token).await;

    // The request failed twice (500, 503) and was retried; then the approval.
    let got = hook.wait_for(4, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 4, "{got:#?}");
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 503, 200, 200]);
    let ids: Vec<&str> = got
        .iter()
        .map(|r| r.header("wicket-event-id").unwrap())
        .collect();
    assert!(
        ids[0] == ids[1] && ids[1] == ids[2],
        "a retry keeps its event id"
    );
    assert_ne!(ids[2], ids[3]);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"topsecret");
    for r in &got {
        let sig = r.header("wicket-signature").unwrap();
        let (t, v1) = sig
            .strip_prefix("t=")
            .and_then(|s| s.split_once(",v1="))
            .unwrap();
        let mut signed = format!("{t}.").into_bytes();
        signed.extend_from_slice(&r.body);
        aws_lc_rs::hmac::verify(&key, &signed, &hex::decode(v1).unwrap())
            .expect("the signature verifies with the shared secret");
        assert!((chrono::Utc::now().timestamp() - t.parse::<i64>().unwrap()).abs() < 60);
    }
    let requested = got[2].json();
    assert_eq!(requested["type"], "approval.requested");
    assert_eq!(
        got[2].header("wicket-event-type"),
        Some("approval.requested")
    );
    assert_eq!(requested["approval"]["id"], id.as_str());
    assert_eq!(requested["approval"]["state"], "pending");
    assert_eq!(
        requested["approval"]["request"]["command"]["text"],
        "delete something"
    );
    assert_eq!(
        requested["approval"]["request"]["reasoning"]["reasoning"],
        "clean up the duplicate order <#42>"
    );
    assert_eq!(
        requested["console_url"],
        format!("https://wicket.example/console/approvals/{id}")
    );
    let approved = got[3].json();
    assert_eq!(approved["type"], "approval.approved");
    assert_eq!(
        approved["approval"]["votes"][0]["approver"],
        "lead@example.test"
    );

    let msgs = slack.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(msgs.len(), 2);
    assert!(msgs.iter().all(|m| m.header("wicket-signature").is_none()));
    let first = msgs[0].json();
    let text = first["text"].as_str().unwrap();
    assert!(
        text.contains("bot-1") && text.contains("orders-db") && text.contains("writes"),
        "{text}"
    );
    let blocks = first["blocks"].to_string();
    assert!(blocks.contains("delete something"), "{blocks}");
    assert!(
        blocks.contains("&lt;#42&gt;"),
        "Slack's control characters escaped: {blocks}"
    );
    assert!(
        blocks.contains(&format!(
            "<https://wicket.example/console/approvals/{id}|Review"
        )),
        "{blocks}"
    );
    assert!(
        msgs[1].json()["text"]
            .as_str()
            .unwrap()
            .starts_with("Approved:")
    );
}

/// An approver may let one approval cover the same statement fingerprint
/// from the same principal on the same connection for a while, within the
/// rule's `reuse_for`; anything else is held again.
#[tokio::test]
async fn an_approval_can_cover_a_statement_fingerprint_for_a_while() {
    let h = start_with(None).await;
    h.apply(POLICY).await;
    let token = h.sidecar_token(&["orders-db"]).await;
    let lead = h.idp.mint(&TokenSpec::human(
        "lead",
        &["wicket-approvers", "dba-leads"],
    ));
    // A DELETE of fingerprint `fp`, by `who`, under a rule allowing `reuse` s.
    let ask = |rid: &str, who: &str, fp: &str, reuse: u32| {
        let mut r = held(rid, principal(who), "delete", 60);
        let cmd = r.command.as_mut().unwrap();
        cmd.text = format!("DELETE FROM orders WHERE id = {rid}");
        cmd.classification.as_mut().unwrap().fingerprint = fp.into();
        r.decision
            .as_mut()
            .unwrap()
            .review
            .as_mut()
            .unwrap()
            .reuse_seconds = reuse;
        with_token(r, &token)
    };
    let mut gate = ApprovalGateServiceClient::new(h.channel.clone());
    let mut api = ApprovalAdminServiceClient::new(h.channel.clone());
    let mut first_of = async |req| {
        let mut s = gate.request_approval(req).await.unwrap().into_inner();
        (s.next().await.unwrap().unwrap(), s)
    };
    let decide = |id: &str, reuse: u32| {
        with_token(
            v1::DecideRequest {
                id: id.into(),
                comment: String::new(),
                reuse_seconds: reuse,
            },
            &lead,
        )
    };

    let (pending, mut waiting) = first_of(ask("1", "bot-1", "fp-a", 1800)).await;
    assert_eq!(pending.state, v1::ApprovalState::Pending as i32);
    let err = api
        .approve(decide(&pending.approval_id, 3600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("at most 1800 s"),
        "{}",
        err.message()
    );
    let approved = api
        .approve(decide(&pending.approval_id, 600))
        .await
        .unwrap()
        .into_inner();
    assert!(approved.reuse_until.is_some());
    assert_eq!(
        waiting.next().await.unwrap().unwrap().state,
        v1::ApprovalState::Approved as i32
    );

    // Same fingerprint, other constants: approved at once, under the first approval.
    let (covered, mut rest) = first_of(ask("2", "bot-1", "fp-a", 1800)).await;
    assert_eq!(covered.state, v1::ApprovalState::Approved as i32);
    assert_eq!(covered.approval_id, pending.approval_id);
    assert!(
        covered.reason.contains("covered by approval"),
        "{}",
        covered.reason
    );
    assert!(rest.next().await.is_none(), "nothing more to wait for");

    // Another statement, another principal, or a rule that no longer allows reuse: held.
    for (rid, who, fp, reuse) in [
        ("3", "bot-1", "fp-b", 1800),
        ("4", "bot-2", "fp-a", 1800),
        ("5", "bot-1", "fp-a", 0),
    ] {
        // The stream is kept while deciding: a dropped one withdraws its approval.
        let (p, _waiting) = first_of(ask(rid, who, fp, reuse)).await;
        assert_eq!(p.state, v1::ApprovalState::Pending as i32, "request {rid}");
        if rid == "5" {
            let err = api.approve(decide(&p.approval_id, 60)).await.unwrap_err();
            assert!(
                err.message().contains("one execution only"),
                "{}",
                err.message()
            );
        }
        if rid == "3" {
            // Covered for one second only.
            api.approve(decide(&p.approval_id, 1)).await.unwrap();
        }
    }
    let (again, _) = first_of(ask("6", "bot-1", "fp-b", 1800)).await;
    assert_eq!(
        again.state,
        v1::ApprovalState::Approved as i32,
        "within the second"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (later, _waiting) = first_of(ask("7", "bot-1", "fp-b", 1800)).await;
    assert_eq!(
        later.state,
        v1::ApprovalState::Pending as i32,
        "the cover ran out"
    );
    let err = api
        .deny(with_token(
            v1::DecideRequest {
                id: later.approval_id,
                comment: "no".into(),
                reuse_seconds: 60,
            },
            &lead,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// Just-in-time access: asked for under an access rule, approved, carried in
/// the connection's bundle for exactly that principal until it lapses.
#[tokio::test]
async fn just_in_time_access_is_approved_carried_and_lapses() {
    use wicket_proto::v1::access_service_client::AccessServiceClient;
    let h = start_with(None).await;
    h.apply(POLICY).await;
    let token = h.sidecar_token(&["orders-db"]).await;
    let olga = h.idp.mint(&TokenSpec::human("olga", &["oncall"]));
    let stranger = h.idp.mint(&TokenSpec::human("sam", &["sales"]));
    let lead = h.idp.mint(&TokenSpec::human(
        "lead",
        &["wicket-approvers", "dba-leads"],
    ));
    let mut access = AccessServiceClient::new(h.channel.clone());
    let ask = |secs: u32, reason: &str, who: &str| {
        with_token(
            v1::AccessRequest {
                connection: "orders-db".into(),
                duration_seconds: secs,
                reason: reason.into(),
            },
            who,
        )
    };
    // Refusals: too long, no reason, nobody's rule, unknown connection.
    for (req, code, says) in [
        (
            ask(3 * 3600, "incident", &olga),
            Code::InvalidArgument,
            "at most 2 h",
        ),
        (ask(60, "  ", &olga), Code::InvalidArgument, "say why"),
        (
            ask(60, "curious", &stranger),
            Code::PermissionDenied,
            "no access rule",
        ),
    ] {
        let err = access.request_access(req).await.unwrap_err();
        assert_eq!(err.code(), code);
        assert!(err.message().contains(says), "{}", err.message());
    }
    let mut nowhere = ask(60, "x", &olga);
    nowhere.get_mut().connection = "nope".into();
    assert_eq!(
        access.request_access(nowhere).await.unwrap_err().code(),
        Code::NotFound
    );

    let mut bundles = watch_orders_db(&h, &token).await;
    let before = bundles.next().await.unwrap().unwrap();
    assert!(!String::from_utf8_lossy(&before.policy_json).contains("jit-"));

    let mut updates = access
        .request_access(ask(3, "incident 4711: replica lag", &olga))
        .await
        .unwrap()
        .into_inner();
    let pending = updates.next().await.unwrap().unwrap();
    assert_eq!(pending.state, v1::ApprovalState::Pending as i32);
    assert_eq!(pending.rule, "breakglass");
    // Approvers see it like a held command, with the reason as reasoning.
    let mut api = ApprovalAdminServiceClient::new(h.channel.clone());
    let seen = api
        .get_approval(with_token(
            v1::GetApprovalRequest {
                id: pending.approval_id.clone(),
            },
            &lead,
        ))
        .await
        .unwrap()
        .into_inner();
    let req = seen.request.unwrap();
    assert_eq!(req.command.unwrap().text, "access to orders-db for 3 s");
    assert_eq!(
        req.reasoning.unwrap().reasoning,
        "incident 4711: replica lag"
    );
    api.approve(with_token(
        v1::DecideRequest {
            id: pending.approval_id.clone(),
            comment: "go".into(),
            reuse_seconds: 0,
        },
        &lead,
    ))
    .await
    .unwrap();
    let granted = updates.next().await.unwrap().unwrap();
    assert_eq!(granted.state, v1::ApprovalState::Approved as i32);
    let until = wicket_proto::convert::from_ts(granted.until.as_ref()).unwrap();
    let left = until - chrono::Utc::now();
    assert!(left > chrono::Duration::zero() && left <= chrono::Duration::seconds(3));

    // Olga now has the connection, by her access grant, until then.
    let olgas = access
        .list_my_connections(with_token(v1::ListMyConnectionsRequest {}, &olga))
        .await
        .unwrap()
        .into_inner()
        .connections;
    assert_eq!(olgas.len(), 1);
    assert_eq!(olgas[0].name, "orders-db");
    assert!(olgas[0].until.is_some());

    // The bundle now grants exactly olga (by issuer and subject) until then.
    let with = tokio::time::timeout(Duration::from_secs(2), bundles.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&with.policy_json).unwrap();
    let jit = doc["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == format!("jit-{}", pending.approval_id))
        .expect("the access grant is in the bundle");
    assert_eq!(jit["principals"], serde_json::json!(["olga"]));
    assert_eq!(jit["issuer"], h.idp.issuer());
    assert!(jit["expires"].is_string());

    let list = |who: &str| {
        let mut access = access.clone();
        let who = who.to_string();
        async move {
            access
                .list_access_grants(with_token(v1::ListAccessGrantsRequest::default(), &who))
                .await
                .unwrap()
                .into_inner()
                .grants
        }
    };
    assert_eq!(list(&olga).await.len(), 1, "her own");
    assert_eq!(list(&stranger).await.len(), 0, "not someone else's");
    assert_eq!(list(&lead).await[0].reason, "incident 4711: replica lag");
    tokio::time::sleep(left.to_std().unwrap() + Duration::from_millis(200)).await;
    assert!(list(&lead).await.is_empty(), "lapsed");
}

/// Signs `who` in to the console at `base` the way a browser does (curl
/// following the redirects through the identity provider); returns the
/// session cookie (`name=value`).
async fn console_login(h: &Harness, base: &str, who: TokenSpec) -> String {
    h.idp.set_device_user(who);
    let jar = h._dir.path().join(format!("jar-{}", uuid::Uuid::new_v4()));
    let (j, url) = (jar.clone(), format!("{base}/approvals"));
    let o = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-L", "-c"])
            .arg(&j)
            .arg("-b")
            .arg(&j)
            .args(["-H", "Accept: text/html", "-w", "\n%{http_code}", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let page = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        page.contains("<title>Wicket console</title>") && page.ends_with("200"),
        "{page}"
    );
    let jar = std::fs::read_to_string(&jar).unwrap();
    assert!(
        jar.contains("#HttpOnly_"),
        "the session cookie is HttpOnly: {jar}"
    );
    let line = jar.lines().find(|l| l.contains("wicket_session")).unwrap();
    let f: Vec<&str> = line.split('\t').collect();
    format!("{}={}", f[5], f[6])
}

/// Two console replicas behind one address (one store): a sign-in the
/// first starts, the second finishes; either serves the session after; a
/// session sealed with another deployment's key is not accepted.
#[tokio::test]
async fn console_replicas_share_sign_ins_and_sessions() {
    let (port_a, port_b) = (free_port(), free_port());
    let (base_a, base_b) = (
        format!("http://127.0.0.1:{port_a}"),
        format!("http://127.0.0.1:{port_b}"),
    );
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", db.path().join("shared.db").display());
    // Both replicas answer for one public URL (a load balancer's, here A's).
    let public = base_a.clone();
    let h = start_tuned(TestIdp::start("wicket").await, Some(url.clone()), |c| {
        c.console_listen = Some(format!("127.0.0.1:{port_a}").parse().unwrap());
        c.console_url = Some(public.clone());
    })
    .await;
    let (_, _stop_b) = spawn_control(&h.idp.issuer(), &url, |c| {
        c.console_listen = Some(format!("127.0.0.1:{port_b}").parse().unwrap());
        c.console_url = Some(public.clone());
    })
    .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let set_cookies = |r: &reqwest::Response| -> Vec<String> {
        r.headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
            .filter(|c| !c.ends_with('='))
            .collect()
    };
    // A browser's request: `url` with `cookie`.
    let get = |url: &str, cookie: &str| http.get(url).header("cookie", cookie.to_string()).send();
    // B starts the sign-in…
    let started = loop {
        match http
            .get(format!("{base_b}/approvals"))
            .header("accept", "text/html")
            .send()
            .await
        {
            Ok(r) => break r,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(started.status(), 302);
    let login_cookie = set_cookies(&started).join("; ");
    assert!(login_cookie.starts_with("wicket_login="), "{login_cookie}");
    h.idp
        .set_device_user(TokenSpec::human("lead", &["wicket-approvers"]));
    let at_idp = http
        .get(started.headers()["location"].to_str().unwrap())
        .send()
        .await
        .unwrap();
    let callback = at_idp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        callback.starts_with(&format!("{public}/.wicket/callback?")),
        "{callback}"
    );
    // …and A, where the identity provider sends the browser back, ends it.
    let done = get(&callback, &login_cookie).await.unwrap();
    assert_eq!(done.status(), 302, "{:?}", done.text().await);
    let session = set_cookies(&done).join("; ");
    assert!(session.starts_with("wicket_session="), "{session}");
    // Without the login cookie (another browser), the same callback fails.
    let r = http.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), 401);
    for base in [&base_a, &base_b] {
        let me: serde_json::Value = get(&format!("{base}/api/me"), &session)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(me["subject"], "lead", "{base}: {me}");
        assert_eq!(me["can_decide"], true);
    }
    // A forged or foreign session is no session.
    let r = get(
        &format!("{base_b}/api/me"),
        "wicket_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    // Signing out clears the session's cookies.
    let out = get(&format!("{base_b}/.wicket/logout"), &session)
        .await
        .unwrap();
    let cleared: Vec<&str> = out
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        cleared
            .iter()
            .any(|c| c.starts_with("wicket_session=;") && c.contains("Max-Age=0")),
        "{cleared:?}"
    );
    // A copy of the cookies kept from before is refused by every replica.
    for base in [&base_a, &base_b] {
        let r = get(&format!("{base}/api/me"), &session).await.unwrap();
        assert_eq!(r.status(), 401, "{base}");
    }
}

/// The console: sign-in through the identity provider, pending approvals
/// with their reasoning, a live event stream, votes that need the CSRF
/// header and the approver role, and a held command released by a vote.
#[tokio::test]
async fn the_console_shows_and_decides_approvals() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let h = start_tuned(TestIdp::start("wicket").await, None, |c| {
        c.console_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    h.apply(POLICY).await;
    let token = h.sidecar_token(&["orders-db"]).await;
    let http = reqwest::Client::new();
    // Not signed in: the API says so; a browser is sent to sign in.
    let r = http
        .get(format!("{base}/api/approvals"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{base}/approvals"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with(&h.idp.issuer())
    );

    let lead = console_login(
        &h,
        &base,
        TokenSpec::human("lead", &["wicket-approvers", "dba-leads"]),
    )
    .await;
    let auditor = console_login(&h, &base, TokenSpec::human("audra", &["wicket-auditors"])).await;
    let get = |path: &str, cookie: &str| {
        http.get(format!("{base}{path}"))
            .header("cookie", cookie)
            .send()
    };
    let me: serde_json::Value = get("/api/me", &lead).await.unwrap().json().await.unwrap();
    assert_eq!(
        (me["can_read"].as_bool(), me["can_decide"].as_bool()),
        (Some(true), Some(true))
    );
    let me: serde_json::Value = get("/api/me", &auditor)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["can_decide"], false);

    // A held command appears, with its reasoning, and the page is locked down.
    let mut events = get("/api/events", &lead).await.unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut waiting = ApprovalGateServiceClient::new(h.channel.clone())
        .request_approval(held_delete("c-1", &token))
        .await
        .unwrap()
        .into_inner();
    let id = waiting.next().await.unwrap().unwrap().approval_id;
    let list: serde_json::Value = get("/api/approvals", &auditor)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(
        list[0]["request"]["reasoning"]["reasoning"],
        "clean up the duplicate order <#42>"
    );
    let page = get("/", &lead).await.unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let js = get("/console.js", &lead)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!js.contains("innerHTML"), "values are set as text only");

    // Votes: the CSRF header and the approver role are required.
    let vote = |cookie: &str, csrf: bool, verb: &str| {
        let mut r = http
            .post(format!("{base}/api/approvals/{id}/{verb}"))
            .header("cookie", cookie)
            .header("content-type", "application/json")
            .body(r#"{"comment":"checked in the console"}"#);
        if csrf {
            r = r.header("x-wicket-csrf", "1");
        }
        r.send()
    };
    assert_eq!(vote(&lead, false, "approve").await.unwrap().status(), 403);
    assert_eq!(vote(&auditor, true, "approve").await.unwrap().status(), 403);
    let r = vote(&lead, true, "approve").await.unwrap();
    assert_eq!(r.status(), 200);
    let decided = waiting.next().await.unwrap().unwrap();
    assert_eq!(decided.state, v1::ApprovalState::Approved as i32);
    assert_eq!(decided.votes[0].comment, "checked in the console");
    assert_eq!(
        vote(&lead, true, "deny").await.unwrap().status(),
        409,
        "already decided"
    );

    // The event stream carried the request and the decision.
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !seen.contains("\"approved\"") {
        let chunk = tokio::time::timeout_at(deadline, events.chunk())
            .await
            .expect("events arrive")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        seen.contains("event: approval") && seen.contains(&id),
        "{seen}"
    );

    // Sessions are listed for readers.
    let sessions = get("/api/sessions", &auditor).await.unwrap();
    assert_eq!(sessions.status(), 200);
    // Signing out ends the cookie's session.
    get("/.wicket/logout", &lead).await.unwrap();
    assert_eq!(get("/api/me", &lead).await.unwrap().status(), 401);
}

/// A terminal session's recording plays in the console, in a real browser
/// (Debian's chromium driven by Playwright), for a read-only auditor.
#[tokio::test]
async fn the_console_replays_terminal_recordings_in_a_browser() {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser/replay.mjs");
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists()
            && script
                .with_file_name("node_modules/playwright-core")
                .exists(),
        "chromium and playwright-core are missing: `cargo xtask test` installs them"
    );
    let port = free_port();
    let h = start_tuned(TestIdp::start("wicket").await, None, |c| {
        c.console_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    h.apply(POLICY).await;
    let token = h.sidecar_token(&["orders-db"]).await;
    // A shell session as the SSH gate records it: a header, then output
    // lines (with a colour, a clear screen and a cursor move) and input.
    let header = r#"{"version":2,"width":40,"height":6}"#;
    let lines = [
        r#"[0.1,"o","$ "]"#,
        r#"[0.4,"i","ls\r"]"#,
        r#"[0.5,"o","ls\r\n\u001b[1;34mnotes.txt\u001b[0m\r\n$ "]"#,
        r#"[3.0,"o","\u001b[2J\u001b[Hclear\r\n$ top\u001b[3;1Hbottom line"]"#,
    ];
    let ev =
        |id: &str, seq: u64, kind: v1::AuditKind, details: Vec<(&str, String)>| v1::AuditEvent {
            id: id.into(),
            session_id: "sess-tty".into(),
            seq,
            time: Some(wicket_proto::convert::ts(chrono::Utc::now())),
            kind: kind as i32,
            connection: "orders-db".into(),
            principal: Some(principal("ada")),
            details: details
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ..Default::default()
        };
    let events = vec![
        ev("t1", 1, v1::AuditKind::SessionStart, vec![]),
        ev(
            "t2",
            2,
            v1::AuditKind::Output,
            vec![("channel", "0".into()), ("asciicast_header", header.into())],
        ),
        ev(
            "t3",
            3,
            v1::AuditKind::Output,
            vec![
                ("channel", "0".into()),
                (
                    "asciicast",
                    lines.iter().map(|l| format!("{l}\n")).collect(),
                ),
            ],
        ),
    ];
    let mut acks = AuditServiceClient::new(h.channel.clone())
        .report(with_token(
            tokio_stream::iter(vec![v1::ReportRequest { events }]),
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().acked_ids.len(), 3);

    h.idp
        .set_device_user(TokenSpec::human("audra", &["wicket-auditors"]));
    let o = tokio::process::Command::new("node")
        .arg(&script)
        .args([
            &format!("http://127.0.0.1:{port}"),
            "sess-tty",
            "bottom line",
        ])
        .output()
        .await
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{out}\n{err}");
    let screen: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // The screen after the clear: the old lines are gone, the cursor move
    // put the last text on the third row, and no escape codes show.
    assert_eq!(
        screen["screen"].as_str().unwrap().trim_end(),
        "clear\n$ top\nbottom line",
        "{out}"
    );
}

/// A quorum of two: the first approval leaves the command waiting, the
/// second releases it; one approval from each listed group when the rule
/// says so.
#[tokio::test]
async fn quorum_needs_every_approval_it_names() {
    let h = start_with(None).await;
    h.apply(POLICY).await;
    let token = h.sidecar_token(&["orders-db"]).await;
    let mut api = ApprovalAdminServiceClient::new(h.channel.clone());
    let approve = |id: &str, who: &str| {
        with_token(
            v1::DecideRequest {
                id: id.into(),
                comment: String::new(),
                reuse_seconds: 0,
            },
            &h.idp.mint(&TokenSpec::human(
                who,
                &["wicket-approvers", "dba-leads", "security"],
            )),
        )
    };
    for one_per_group in [false, true] {
        let mut req = held(
            &format!("q-{one_per_group}"),
            principal("bot-1"),
            "delete",
            60,
        );
        let review = req.decision.as_mut().unwrap().review.as_mut().unwrap();
        review.quorum = 2;
        if one_per_group {
            review.approver_groups = vec!["dba-leads".into(), "security".into()];
            review.one_per_group = true;
        }
        let mut waiting = ApprovalGateServiceClient::new(h.channel.clone())
            .request_approval(with_token(req, &token))
            .await
            .unwrap()
            .into_inner();
        let id = waiting.next().await.unwrap().unwrap().approval_id;
        let first = api.approve(approve(&id, "ann")).await.unwrap().into_inner();
        assert_eq!(first.state, v1::ApprovalState::Pending as i32);
        // The same approver again does not count twice.
        let again = api.approve(approve(&id, "ann")).await.unwrap_err();
        assert!(
            again.message().contains("already voted"),
            "{}",
            again.message()
        );
        let update = waiting.next().await.unwrap().unwrap();
        assert_eq!(
            update.state,
            v1::ApprovalState::Pending as i32,
            "one vote is not enough"
        );
        assert_eq!(update.votes.len(), 1);
        api.approve(approve(&id, "ben")).await.unwrap();
        let done = waiting.next().await.unwrap().unwrap();
        assert_eq!(done.state, v1::ApprovalState::Approved as i32);
        assert_eq!(done.votes.len(), 2);
    }
}

/// A notification endpoint that is down delays no decision.
#[tokio::test]
async fn a_dead_webhook_never_slows_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.key");
    std::fs::write(&secret, "k").unwrap();
    // A port nobody listens on: every attempt fails at once, and retries wait.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", dead.local_addr().unwrap());
    drop(dead);
    let h = start_tuned(TestIdp::start("wicket").await, None, |c| {
        c.webhook_url = Some(url);
        c.webhook_secret_file = Some(secret);
    })
    .await;
    h.apply(POLICY).await;
    let token = h.sidecar_token(&["orders-db"]).await;
    for n in 0..3 {
        let (_, took) = request_and_approve(&h, &format!("d-{n}"), &token).await;
        assert!(took < Duration::from_millis(500), "decision took {took:?}");
    }
}

/// A sidecar's bundle watch on `orders-db`.
async fn watch_orders_db(h: &Harness, token: &str) -> tonic::Streaming<v1::PolicyBundle> {
    BundleServiceClient::new(h.channel.clone())
        .watch_bundle(with_token(
            v1::WatchBundleRequest {
                connection: "orders-db".into(),
                known_version: 0,
                instance: String::new(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
}

/// A fresh PostgreSQL database for one test.
async fn postgres_database() -> String {
    use sqlx::Connection as _;
    let name = format!("control_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&wicket_testkit::env::postgres_url())
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    wicket_testkit::env::postgres_database_url(&name)
}

/// Two replicas on one PostgreSQL: a decision taken on one reaches the
/// sidecar waiting on the other, and a policy applied on one reaches the
/// other's bundle watchers, both well inside the replicas' 5 s poll (so by
/// the LISTEN/NOTIFY feed).
#[tokio::test]
async fn two_replicas_on_postgres_share_approvals_and_policy() {
    let url = postgres_database().await;
    let a = start_with(Some(url.clone())).await;
    let b = start_replica(a.idp.clone(), Some(url)).await;
    a.apply(POLICY).await;
    let token = a.sidecar_token(&["orders-db"]).await;

    // The sidecar waits on A; the approver answers on B.
    let approver = a.idp.mint(&TokenSpec::human(
        "lead",
        &["wicket-approvers", "dba-leads"],
    ));
    let mut on_b = ApprovalAdminServiceClient::new(b.channel.clone());
    for (rid, approve) in [("r-approve", true), ("r-deny", false)] {
        let mut waiting = ApprovalGateServiceClient::new(a.channel.clone())
            .request_approval(held_delete(rid, &token))
            .await
            .unwrap()
            .into_inner();
        let pending = waiting.next().await.unwrap().unwrap();
        assert_eq!(pending.state, v1::ApprovalState::Pending as i32);
        let decide = v1::DecideRequest {
            id: pending.approval_id.clone(),
            comment: "checked the ticket".into(),
            reuse_seconds: 0,
        };
        let t0 = std::time::Instant::now();
        if approve {
            on_b.approve(with_token(decide, &approver)).await.unwrap();
        } else {
            on_b.deny(with_token(decide, &approver)).await.unwrap();
        }
        let decided = tokio::time::timeout(Duration::from_secs(3), waiting.next())
            .await
            .expect("the decision reaches the other replica's sidecar")
            .unwrap()
            .unwrap();
        let latency = t0.elapsed();
        let want = if approve {
            v1::ApprovalState::Approved
        } else {
            v1::ApprovalState::Denied
        };
        assert_eq!(decided.state, want as i32);
        assert_eq!(decided.votes[0].comment, "checked the ticket");
        assert!(
            latency < Duration::from_secs(1),
            "cross-replica decision took {latency:?} (the poll is 5 s)"
        );
    }

    // A bundle watcher on A sees the policy B applies, and a revocation B records.
    let mut bundles = watch_orders_db(&a, &token).await;
    let first = bundles.next().await.unwrap().unwrap();
    let changed = POLICY.replace("timeout: 2s", "timeout: 3s");
    let t0 = std::time::Instant::now();
    assert_eq!(b.apply(&changed).await.version, 2);
    let next = tokio::time::timeout(Duration::from_secs(3), bundles.next())
        .await
        .expect("B's policy reaches A's watcher")
        .unwrap()
        .unwrap();
    assert_ne!(next.policy_sha256, first.policy_sha256);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    PrincipalAdminServiceClient::new(b.channel.clone())
        .revoke_principal(with_token(
            v1::RevokePrincipalRequest {
                issuer: "https://idp".into(),
                subject: "bot-1".into(),
                reason: "left".into(),
                duration_seconds: 0,
            },
            &b.admin,
        ))
        .await
        .unwrap();
    let revoked = tokio::time::timeout(Duration::from_secs(3), bundles.next())
        .await
        .expect("B's revocation reaches A's watcher")
        .unwrap()
        .unwrap();
    assert!(revoked.revocations.iter().any(|r| r.subject == "bot-1"));
}

#[tokio::test]
async fn standard_grpc_tools_can_explore_it() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let h = start_with(None).await;
    let mut health = HealthClient::new(h.channel.clone());
    for service in [
        "",
        "wicket.v1.BundleService",
        "wicket.v1.PolicyAdminService",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(h.channel.clone())
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        replies.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "wicket.v1.BundleService",
        "wicket.v1.AuditService",
        "wicket.v1.ApprovalGateService",
        "wicket.v1.TraceService",
        "wicket.v1.PolicyAdminService",
        "wicket.v1.SessionAdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

/// `n` audit events over two sessions: starts, commands (every fifth
/// refused, with reasoning and a traceparent) and ends.
fn export_events(n: usize) -> Vec<v1::AuditEvent> {
    let now = chrono::Utc::now();
    (0..n)
        .map(|i| {
            let session = format!("exp-{}", i % 2);
            let seq = (i / 2) as u64 + 1;
            let kind = if seq == 1 {
                v1::AuditKind::SessionStart
            } else {
                v1::AuditKind::Command
            };
            let refused = i % 5 == 4;
            v1::AuditEvent {
                id: format!("ev-{i:04}"),
                session_id: session,
                seq,
                time: Some(wicket_proto::convert::ts(
                    now + chrono::Duration::milliseconds(i as i64),
                )),
                kind: kind as i32,
                connection: "orders-db".into(),
                principal: Some(principal("bot")),
                command: (kind == v1::AuditKind::Command).then(|| v1::Command {
                    text: format!("SELECT {i}"),
                    classification: None,
                }),
                decision: (kind == v1::AuditKind::Command).then(|| v1::DecisionInfo {
                    effect: if refused {
                        v1::Effect::Deny
                    } else {
                        v1::Effect::Allow
                    } as i32,
                    rule: if refused { "no-ddl" } else { "reads" }.into(),
                    ..Default::default()
                }),
                reasoning: Some(v1::ReasoningTrace {
                    reasoning: format!("step {i}"),
                    ..Default::default()
                }),
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                ..Default::default()
            }
        })
        .collect()
}

async fn report_all(h: &Harness, token: &str, events: Vec<v1::AuditEvent>) -> Duration {
    let n = events.len();
    let started = std::time::Instant::now();
    let batches: Vec<v1::ReportRequest> = events
        .chunks(100)
        .map(|c| v1::ReportRequest { events: c.to_vec() })
        .collect();
    let mut acks = AuditServiceClient::new(h.channel.clone())
        .report(with_token(tokio_stream::iter(batches), token))
        .await
        .unwrap()
        .into_inner();
    let mut acked = 0;
    while acked < n {
        acked += acks.next().await.unwrap().unwrap().acked_ids.len();
    }
    started.elapsed()
}

/// Every stored event reaches a JSON Lines endpoint and an OTLP/gRPC
/// collector (the OpenTelemetry project's own Python code), in order,
/// through refusals (retried: at least once), as log records carrying the
/// principal, decision, reasoning and trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_are_exported_as_json_lines_and_otlp_logs() {
    export_on(None).await;
}

/// The same on PostgreSQL, where positions come from a sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_are_exported_from_postgres_too() {
    export_on(Some(postgres_database().await)).await;
}

async fn export_on(database: Option<String>) {
    use tokio::io::AsyncBufReadExt as _;
    let hook = wicket_testkit::hook::HookServer::start(&[503, 503]).await;
    let python = wicket_testkit::env::require("WICKET_TEST_PYTHON");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp_receiver.py");
    let mut receiver = tokio::process::Command::new(python)
        .arg(script)
        .arg("1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the OTLP receiver starts")
        .unwrap()
        .unwrap();
    let port = first.strip_prefix("PORT ").expect("PORT line").to_string();
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "s3cret-export-token\n").unwrap();
    let (url, token_path) = (hook.url(), token_file.path().to_path_buf());
    let h = start_tuned(TestIdp::start("wicket").await, database, move |c| {
        c.export_jsonl_url = Some(format!("{url}/audit"));
        c.export_jsonl_token_file = Some(token_path);
        c.export_otlp_endpoint = Some(format!("http://127.0.0.1:{port}"));
        c.export_batch = 50;
    })
    .await;
    let token = h.sidecar_token(&["orders-db"]).await;
    let events = export_events(120);
    report_all(&h, &token, events.clone()).await;

    // JSON Lines: three batches of 50, 50, 20 after two refusals.
    let got = hook.wait_for(5, Duration::from_secs(30)).await;
    assert_eq!(
        got.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 503, 200, 200, 200]
    );
    assert_eq!(got[0].body, got[2].body, "the refused batch is sent again");
    let mut ids = Vec::new();
    for r in &got[2..] {
        assert!(r.path.ends_with("/audit"), "{}", r.path);
        assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
        assert_eq!(
            r.header("authorization"),
            Some("Bearer s3cret-export-token")
        );
        for line in std::str::from_utf8(&r.body).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            ids.push(v["id"].as_str().unwrap().to_string());
        }
    }
    let sent: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, sent, "every event, once, in the order stored");

    // OTLP: one refusal, then every event as a log record.
    let mut records = Vec::new();
    let mut refused = 0;
    while records.len() < 120 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the collector hears every event")
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["refused"] == true {
            refused += 1;
        } else {
            records.push(v);
        }
    }
    assert_eq!(refused, 1);
    let attr = |r: &serde_json::Value, key: &str| -> Option<String> {
        r["attributes"]
            .as_array()?
            .iter()
            .find(|a| a["key"] == key)
            .map(|a| {
                let v = &a["value"];
                v["stringValue"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v["intValue"].to_string().trim_matches('"').to_string())
            })
    };
    let otlp_ids: Vec<String> = records
        .iter()
        .map(|r| attr(r, "wicket.event.id").unwrap())
        .collect();
    assert_eq!(otlp_ids, sent);
    let denied = &records[4];
    assert_eq!(denied["body"]["stringValue"], "SELECT 4");
    assert_eq!(denied["severityText"], "WARN");
    assert_eq!(denied["severityNumber"], "SEVERITY_NUMBER_WARN");
    assert_eq!(
        attr(denied, "wicket.decision.effect").as_deref(),
        Some("deny")
    );
    assert_eq!(
        attr(denied, "wicket.decision.rule").as_deref(),
        Some("no-ddl")
    );
    assert_eq!(attr(denied, "enduser.id").as_deref(), Some("bot"));
    assert_eq!(attr(denied, "wicket.reasoning").as_deref(), Some("step 4"));
    assert_eq!(attr(denied, "wicket.session.id").as_deref(), Some("exp-0"));
    assert_eq!(attr(denied, "wicket.event.seq").as_deref(), Some("3"));
    let stored: serde_json::Value =
        serde_json::from_str(&attr(denied, "wicket.event").unwrap()).unwrap();
    assert_eq!(stored["id"], "ev-0004");
    // Protobuf JSON gives bytes as base64: the traceparent's ids.
    assert_eq!(denied["traceId"], "S/kvNXezTaajzpKdDg5HNg==");
    assert_eq!(denied["spanId"], "APBnqgupArc=");
    assert_eq!(denied["eventName"], "wicket.audit.command");
    assert!(denied["timeUnixNano"].as_str().unwrap().len() >= 19);
    assert_eq!(records[1]["severityText"], "INFO");
    assert_eq!(records[0]["scope"], "wicket.audit");
    assert_eq!(
        records[0]["resource"]["attributes"][0]["value"]["stringValue"],
        "wicket-control"
    );
}

/// A destination that never answers delays only the export: the
/// sidecars' audit stream is acknowledged as fast as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_export_destination_never_stalls_the_audit_stream() {
    // Accepts connections and never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = black_hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = black_hole.accept().await {
            held.push(s);
        }
    });
    let h = start_tuned(TestIdp::start("wicket").await, None, move |c| {
        c.export_jsonl_url = Some(format!("http://{addr}/audit"));
        c.export_otlp_endpoint = Some(format!("http://{addr}"));
    })
    .await;
    let token = h.sidecar_token(&["orders-db"]).await;
    let took = report_all(&h, &token, export_events(3000)).await;
    assert!(took < Duration::from_secs(10), "acknowledged in {took:?}");
}

/// A long terminal session: 64 MiB of output in 32 KiB events (as the
/// SSH gate batches them) goes to compressed chunks, one per reported
/// batch, and reads back whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_terminal_session_is_recorded_in_compressed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    let rec_cfg = rec.clone();
    let h = start_tuned(TestIdp::start("wicket").await, None, move |c| {
        c.recordings_dir = Some(rec_cfg);
        c.max_message_bytes = 4 << 20;
    })
    .await;
    let token = h.sidecar_token(&["orders-db"]).await;
    const EVENTS: usize = 2048;
    const PER_BATCH: usize = 64;
    let line = |i: usize| {
        // 32 KiB of varied terminal output per event.
        let text: String = (0..32 * 1024 / 64)
            .map(|j| format!("{:0>62x}\r\n", (i * 1000 + j) * 2_654_435_761usize))
            .collect();
        format!(
            "[{}.5,\"o\",{}]\n",
            i,
            serde_json::to_string(&text).unwrap()
        )
    };
    let mut expected = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut raw = 0usize;
    let batches: Vec<v1::ReportRequest> = (0..EVENTS / PER_BATCH)
        .map(|b| v1::ReportRequest {
            events: (0..PER_BATCH)
                .map(|k| {
                    let i = b * PER_BATCH + k;
                    let lines = line(i);
                    expected.update(lines.as_bytes());
                    raw += lines.len();
                    v1::AuditEvent {
                        id: format!("long-{i:05}"),
                        session_id: "long".into(),
                        seq: i as u64 + 1,
                        time: Some(wicket_proto::convert::ts(chrono::Utc::now())),
                        kind: v1::AuditKind::Output as i32,
                        connection: "orders-db".into(),
                        principal: Some(principal("bot")),
                        details: [
                            ("channel".to_string(), "0".to_string()),
                            ("asciicast".to_string(), lines),
                        ]
                        .into(),
                        ..Default::default()
                    }
                })
                .collect(),
        })
        .collect();
    let mut acks = AuditServiceClient::new(h.channel.clone())
        .report(with_token(tokio_stream::iter(batches), &token))
        .await
        .unwrap()
        .into_inner();
    let mut acked = 0;
    while acked < EVENTS {
        acked += acks.next().await.unwrap().unwrap().acked_ids.len();
    }
    assert!(raw > 64 << 20);
    // One chunk per batch, compressed.
    let chunks: Vec<_> = std::fs::read_dir(rec.join("long/0"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    assert_eq!(chunks.len(), EVENTS / PER_BATCH);
    let stored: u64 = chunks.iter().sum();
    assert!(stored < raw as u64 / 2, "{stored} bytes on disk for {raw}");
    // Read back page by page: whole and in order.
    let mut got = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    // Pages fit the default 4 MiB message limit, however large the events.
    let mut sessions = SessionAdminServiceClient::new(h.channel.clone());
    let (mut after, mut n) = (0, 0);
    loop {
        let page = sessions
            .list_session_events(with_token(
                v1::ListSessionEventsRequest {
                    session_id: "long".into(),
                    after_seq: after,
                    limit: 200,
                },
                &h.admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .events;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            assert!(
                !e.details.contains_key("asciicast_error"),
                "{:?}",
                e.details
            );
            got.update(e.details["asciicast"].as_bytes());
            n += 1;
        }
    }
    assert_eq!(n, EVENTS);
    assert_eq!(got.finish().as_ref(), expected.finish().as_ref());
}

/// A local S3-compatible server (moto, from PyPI) on a free port, with
/// bucket `bucket` made; killed on drop.
async fn s3_server(bucket: &str) -> (tokio::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let python = wicket_testkit::env::require("WICKET_TEST_PYTHON");
    let child = tokio::process::Command::new(python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.put(format!("{endpoint}/{bucket}")).send().await
            && r.status().is_success()
        {
            return (child, endpoint);
        }
        assert!(std::time::Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Recordings in an S3-compatible bucket: written at ingest, read back
/// checked, a removed object reported as missing, a session's objects
/// removed together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_live_in_an_s3_compatible_bucket() {
    let (_moto, endpoint) = s3_server("wicket-rec").await;
    let options: Vec<(String, String)> = [
        ("aws_endpoint", endpoint.as_str()),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
        ("aws_region", "us-east-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let opts = options.clone();
    let h = start_tuned(TestIdp::start("wicket").await, None, move |c| {
        c.recordings_url = Some("s3://wicket-rec/team-a/recordings".into());
        c.recordings_options = opts;
    })
    .await;
    let token = h.sidecar_token(&["orders-db"]).await;
    let output = |id: &str, seq: u64, lines: &str| v1::AuditEvent {
        id: id.into(),
        session_id: "s3-sess".into(),
        seq,
        time: Some(wicket_proto::convert::ts(chrono::Utc::now())),
        kind: v1::AuditKind::Output as i32,
        connection: "orders-db".into(),
        principal: Some(principal("bot")),
        details: [
            ("channel".to_string(), "0".to_string()),
            ("asciicast".to_string(), lines.to_string()),
        ]
        .into(),
        ..Default::default()
    };
    let mut acks = AuditServiceClient::new(h.channel.clone())
        .report(with_token(
            tokio_stream::iter(vec![
                v1::ReportRequest {
                    events: vec![output("o1", 1, "[0.1,\"o\",\"one\"]\n")],
                },
                v1::ReportRequest {
                    events: vec![output("o2", 2, "[0.2,\"o\",\"two\"]\n")],
                },
            ]),
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut acked = 0;
    while acked < 2 {
        acked += acks.next().await.unwrap().unwrap().acked_ids.len();
    }
    let listing = reqwest::get(format!("{endpoint}/wicket-rec?list-type=2&prefix=team-a/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listing.contains("<Key>team-a/recordings/s3-sess/0/o1.cast.zst</Key>")
            && listing.contains("<Key>team-a/recordings/s3-sess/0/o2.cast.zst</Key>"),
        "{listing}"
    );
    let read = || async {
        SessionAdminServiceClient::new(h.channel.clone())
            .list_session_events(with_token(
                v1::ListSessionEventsRequest {
                    session_id: "s3-sess".into(),
                    after_seq: 0,
                    limit: 10,
                },
                &h.admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .events
    };
    let events = read().await;
    assert_eq!(events[0].details["asciicast"], "[0.1,\"o\",\"one\"]\n");
    assert_eq!(events[1].details["asciicast"], "[0.2,\"o\",\"two\"]\n");
    // An object removed behind our back (by another S3 client) is
    // reported, not skipped.
    {
        use object_store::ObjectStoreExt as _;
        let mut b = object_store::aws::AmazonS3Builder::new().with_bucket_name("wicket-rec");
        for (k, v) in &options {
            b = b.with_config(k.parse().unwrap(), v);
        }
        b.build()
            .unwrap()
            .delete(&object_store::path::Path::from(
                "team-a/recordings/s3-sess/0/o2.cast.zst",
            ))
            .await
            .unwrap();
    }
    let events = read().await;
    assert_eq!(events[0].details["asciicast"], "[0.1,\"o\",\"one\"]\n");
    assert_eq!(
        events[1].details["asciicast_error"],
        "the recording chunk is missing"
    );
    // Retention removes a session's objects together.
    let store = wicket_control::recordings::Recordings::object(
        "s3://wicket-rec/team-a/recordings",
        &options,
    )
    .unwrap();
    store.delete_session("s3-sess").await.unwrap();
    let listing = reqwest::get(format!("{endpoint}/wicket-rec?list-type=2&prefix=team-a/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!listing.contains("<Key>"), "{listing}");
}
