//! The shared runtime against a real control service (in-process) and IdP.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use wicket_core::{AuditKind, Classification, Command, Effect};
use wicket_proto::v1;
use wicket_sidecar::{ApprovalOutcome, EndReason, Sidecar, SidecarConfig};
use wicket_testkit::idp::{TestIdp, TokenSpec};

const POLICY: &str = "
agents: {require_reasoning: true}
connections:
  - name: db
    protocol: postgres
grants:
  - id: agents
    groups: [agents]
rules:
  - id: reads
    effect: allow
    match: {commands: [select]}
  - id: drops
    effect: deny
    match: {commands: [ddl]}
  - id: writes
    effect: review
    match: {commands: [delete]}
    review: {approvers: [dba], timeout: 20s}
";

struct Control {
    addr: SocketAddr,
    db: String,
    task: tokio::task::JoinHandle<()>,
}

impl Control {
    async fn start(idp: &TestIdp, db: &str, addr: Option<SocketAddr>) -> Control {
        let listener =
            tokio::net::TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()))
                .await
                .unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = wicket_control::Config {
            max_message_bytes: 4 << 20,
            agent_rules: vec!["client-credentials".into()],
            ..wicket_control::Config::defaults(&idp.issuer(), db, addr)
        };
        let task = tokio::spawn(async move {
            wicket_control::run(cfg, listener, std::future::pending())
                .await
                .unwrap();
        });
        let c = Control {
            addr,
            db: db.to_string(),
            task,
        };
        c.channel().await;
        c
    }

    async fn channel(&self) -> Channel {
        loop {
            if let Ok(c) = Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the service the hard way: every connection drops.
    fn kill(self) -> (SocketAddr, String) {
        self.task.abort();
        (self.addr, self.db)
    }
}

fn auth<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    r
}

async fn setup(idp: &TestIdp, control: &Control) -> String {
    let admin = idp.mint(&TokenSpec::human("root", &["wicket-admins"]));
    let ch = control.channel().await;
    v1::policy_admin_service_client::PolicyAdminServiceClient::new(ch.clone())
        .apply_policy(auth(
            v1::ApplyPolicyRequest {
                document: POLICY.into(),
                source_name: "p.yaml".into(),
            },
            &admin,
        ))
        .await
        .unwrap();
    v1::sidecar_admin_service_client::SidecarAdminServiceClient::new(ch)
        .create_sidecar_credential(auth(
            v1::CreateSidecarCredentialRequest {
                name: "pg".into(),
                connections: vec!["db".into()],
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .token
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn config(idp: &TestIdp, control: SocketAddr, token: &str, state: &Path) -> SidecarConfig {
    SidecarConfig {
        control: format!("http://{control}"),
        control_ca_cert: None,
        sidecar_token: Some(token.into()),
        sidecar_token_file: None,
        connection: "db".into(),
        state_dir: state.to_path_buf(),
        spool_max_bytes: 64 << 20,
        oidc_issuer: idp.issuer(),
        oidc_audience: "wicket".into(),
        groups_claim: "groups".into(),
        agent_rules: vec!["client-credentials".into()],
        token_grace_seconds: 0,
        admin_listen: free_addr(),
        drain_seconds: 1,
        tls_cert: None,
        tls_key: None,
        tls_self_signed: Vec::new(),
    }
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cmd(kind: &str) -> Command {
    Command {
        text: format!("{kind} …"),
        classification: Classification {
            kind: kind.into(),
            ..Default::default()
        },
    }
}

/// Events recorded while the control service is down.
const OUTAGE_EVENTS: usize = 50;

async fn count_events(control: &Control, idp: &TestIdp, session: &str) -> usize {
    let admin = idp.mint(&TokenSpec::human("root", &["wicket-admins"]));
    let mut api =
        v1::session_admin_service_client::SessionAdminServiceClient::new(control.channel().await);
    let (mut total, mut after) = (0, 0);
    loop {
        let page = api
            .list_session_events(auth(
                v1::ListSessionEventsRequest {
                    session_id: session.into(),
                    after_seq: after,
                    limit: 1000,
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .events;
        total += page.len();
        match page.last() {
            Some(last) if page.len() == 1000 => after = last.seq,
            _ => return total,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_bundle_enforced_and_audit_delivered_exactly_once_across_outages() {
    wicket_testkit::init_crypto();
    let idp = TestIdp::start("wicket").await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("control.db").display());
    let control = Control::start(&idp, &db, None).await;
    let token = setup(&idp, &control).await;
    let state = dir.path().join("state");
    let sc = Sidecar::start(config(&idp, control.addr, &token, &state))
        .await
        .unwrap();
    until("the first bundle", 10, || sc.bundles.current().is_some()).await;
    assert!(sc.not_ready().is_none());

    let agent = sc
        .authenticate(
            &idp.mint(&TokenSpec::agent("bot", &["agents"])),
            "127.0.0.1:1",
        )
        .await
        .unwrap();
    let session = sc.open_session(&agent, "127.0.0.1:1", "psql").unwrap();
    assert_eq!(
        sc.decide(&session, &cmd("select"), true).effect,
        Effect::Allow
    );
    assert_eq!(
        sc.decide(&session, &cmd("select"), false).rule,
        "require-reasoning"
    );
    assert_eq!(sc.decide(&session, &cmd("ddl"), true).rule, "drops");

    // The control service dies. Decisions go on from the cached bundle, events pile up in the spool.
    let (addr, db) = control.kill();
    for _ in 0..OUTAGE_EVENTS {
        let mut e = session.event(AuditKind::Command);
        e.command = Some(cmd("select"));
        e.decision = Some(sc.decide(&session, &cmd("select"), true));
        sc.record(e).unwrap();
    }
    assert!(sc.spool.unacked() >= OUTAGE_EVENTS);

    // A second sidecar process on the same state dir, started while control is down, enforces too.
    let restarted = Sidecar::start(config(&idp, addr, &token, &state))
        .await
        .unwrap();
    let b = restarted
        .bundles
        .current()
        .expect("bundle loaded from disk");
    assert_eq!(b.policy.connection("db").unwrap().name, "db");
    let s2 = restarted
        .open_session(&agent, "127.0.0.1:2", "psql")
        .unwrap();
    assert_eq!(restarted.decide(&s2, &cmd("ddl"), true).rule, "drops");

    // Control comes back: every event arrives, exactly once, even though both
    // processes replay the same spool.
    let control = Control::start(&idp, &db, Some(addr)).await;
    until("the spool to drain", 30, || {
        sc.spool.unacked() == 0 && restarted.spool.unacked() == 0
    })
    .await;
    assert_eq!(
        count_events(&control, &idp, &session.id).await,
        OUTAGE_EVENTS + 1,
        "session_start + the commands"
    );
    assert!(std::fs::read_dir(state.join("spool")).unwrap().count() <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_terminate_and_expiry_end_sessions() {
    wicket_testkit::init_crypto();
    let idp = TestIdp::start("wicket").await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("control.db").display());
    let control = Control::start(&idp, &db, None).await;
    let token = setup(&idp, &control).await;
    let sc = Sidecar::start(config(&idp, control.addr, &token, &dir.path().join("s")))
        .await
        .unwrap();
    until("the first bundle", 10, || sc.bundles.current().is_some()).await;
    let admin = idp.mint(&TokenSpec::human("root", &["wicket-admins"]));

    let bot = sc
        .authenticate(&idp.mint(&TokenSpec::agent("bot", &["agents"])), "x")
        .await
        .unwrap();
    let mut s1 = sc.open_session(&bot, "x", "psql").unwrap();
    let other = sc
        .authenticate(&idp.mint(&TokenSpec::agent("other", &["agents"])), "x")
        .await
        .unwrap();
    let mut s2 = sc.open_session(&other, "x", "psql").unwrap();
    let short = sc
        .authenticate(
            &idp.mint(&TokenSpec {
                ttl_seconds: 2,
                ..TokenSpec::agent("short", &["agents"])
            }),
            "x",
        )
        .await
        .unwrap();
    let mut s3 = sc.open_session(&short, "x", "psql").unwrap();
    // Let the session starts reach the control service (terminate needs the session row).
    until("session rows", 10, || sc.spool.unacked() == 0).await;

    let ch = control.channel().await;
    v1::principal_admin_service_client::PrincipalAdminServiceClient::new(ch.clone())
        .revoke_principal(auth(
            v1::RevokePrincipalRequest {
                issuer: idp.issuer(),
                subject: "bot".into(),
                reason: "test".into(),
                duration_seconds: 0,
            },
            &admin,
        ))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), s1.guard.wait_end())
        .await
        .unwrap();
    assert_eq!(r, EndReason::Revoked);
    assert_eq!(
        sc.open_session(&bot, "x", "psql").err().unwrap().rule,
        "revoked"
    );

    v1::session_admin_service_client::SessionAdminServiceClient::new(ch)
        .terminate_session(auth(
            v1::TerminateSessionRequest {
                id: s2.id.clone(),
                reason: "test".into(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), s2.guard.wait_end())
        .await
        .unwrap();
    assert_eq!(r, EndReason::Terminated);

    let r = tokio::time::timeout(Duration::from_secs(5), s3.guard.wait_end())
        .await
        .unwrap();
    assert_eq!(r, EndReason::TokenExpired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_commands_wait_for_a_decision() {
    wicket_testkit::init_crypto();
    let idp = TestIdp::start("wicket").await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("control.db").display());
    let control = Control::start(&idp, &db, None).await;
    let token = setup(&idp, &control).await;
    let cfg = config(&idp, control.addr, &token, &dir.path().join("s"));
    let admin_addr = cfg.admin_listen;
    let sc: Arc<Sidecar> = Sidecar::start(cfg).await.unwrap();
    until("the first bundle", 10, || sc.bundles.current().is_some()).await;
    let bot = sc
        .authenticate(&idp.mint(&TokenSpec::agent("bot", &["agents"])), "x")
        .await
        .unwrap();
    let session = sc.open_session(&bot, "x", "psql").unwrap();
    let delete = cmd("delete");
    let d = sc.decide(&session, &delete, true);
    assert_eq!(d.effect, Effect::Review);

    let approver = idp.mint(&TokenSpec::human("lead", &["wicket-approvers", "dba"]));
    let ch = control.channel().await;
    for (approve, want) in [(true, "approved"), (false, "denied")] {
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let decide = {
            let ch = ch.clone();
            let approver = approver.clone();
            tokio::spawn(async move {
                let id = rx.await.unwrap();
                let mut api =
                    v1::approval_admin_service_client::ApprovalAdminServiceClient::new(ch);
                let req = auth(
                    v1::DecideRequest {
                        id,
                        comment: "because".into(),
                        reuse_seconds: 0,
                    },
                    &approver,
                );
                if approve {
                    api.approve(req).await.unwrap()
                } else {
                    api.deny(req).await.unwrap()
                };
            })
        };
        let outcome = sc
            .request_approval(
                &session,
                &delete,
                &d,
                None,
                move |id| {
                    let _ = tx.send(id.to_string());
                },
                |_| panic!("a decided hold is not abandoned"),
            )
            .await;
        decide.await.unwrap();
        match (want, outcome) {
            ("approved", ApprovalOutcome::Approved { .. }) => {}
            ("denied", ApprovalOutcome::Denied { reason, .. }) => assert_eq!(reason, "because"),
            (w, o) => panic!("wanted {w}, got {o:?}"),
        }
    }

    // A hold dropped before a decision (its client went away) calls back
    // with the approval's id, and the control service withdraws it.
    let (pending_tx, pending_rx) = tokio::sync::oneshot::channel::<String>();
    let abandoned = std::sync::Mutex::new(None);
    {
        let hold = sc.request_approval(
            &session,
            &delete,
            &d,
            None,
            move |id| {
                let _ = pending_tx.send(id.to_string());
            },
            |id| *abandoned.lock().unwrap() = Some(id),
        );
        tokio::select! {
            _ = hold => panic!("decided without an approver"),
            id = pending_rx => { id.unwrap(); }
        }
    }
    let id = abandoned
        .lock()
        .unwrap()
        .clone()
        .expect("on_abandon was called")
        .expect("with the approval id");
    let mut api = v1::approval_admin_service_client::ApprovalAdminServiceClient::new(ch.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let a = api
            .get_approval(auth(v1::GetApprovalRequest { id: id.clone() }, &approver))
            .await
            .unwrap()
            .into_inner();
        if a.state == v1::ApprovalState::Expired as i32 {
            assert!(a.reason.contains("withdrawn"), "{a:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not withdrawn: {a:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Admin endpoints.
    let body = http_get(admin_addr, "/metrics").await;
    assert!(body.contains("wicket_commands_total"), "{body}");
    assert!(body.contains("wicket_bundle_version"), "{body}");
    assert!(http_get(admin_addr, "/readyz").await.contains("ready"));
    assert!(http_get(admin_addr, "/healthz").await.contains("ok"));
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
