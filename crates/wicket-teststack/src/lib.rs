//! A gate's surroundings for its end-to-end tests: the test identity
//! provider, a control service on SQLite with a policy applied, a sidecar
//! credential, and a started sidecar runtime for one connection. The gate
//! itself (PostgreSQL, SSH, …) is the test's own.

pub mod http;
pub mod kube;

use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use wicket_proto::v1;
use wicket_sidecar::{Sidecar, SidecarConfig};
use wicket_testkit::idp::{TestIdp, TokenSpec};

/// `msg` with a bearer token.
pub fn auth<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).expect("token is ASCII"),
    );
    r
}

/// A running control service, identity provider and sidecar runtime.
pub struct Stack {
    /// The identity provider.
    pub idp: TestIdp,
    /// A channel to the control service.
    pub channel: Channel,
    /// The sidecar runtime (for the gate under test).
    pub sidecar: Arc<Sidecar>,
    /// The control service's settings.
    pub control_cfg: wicket_control::Config,
    /// The control service's task (abort it to take the service down).
    pub control: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Scratch directory (database, state); removed on drop.
    pub dir: tempfile::TempDir,
}

/// Starts the control service on `listener` with `cfg`.
pub fn spawn_control(
    cfg: wicket_control::Config,
    listener: tokio::net::TcpListener,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = wicket_control::run(cfg, listener, std::future::pending()).await;
    })
}

/// Connects to `addr`, retrying until the service listens.
pub async fn connect(addr: &str) -> Channel {
    loop {
        if let Ok(c) = Channel::from_shared(format!("http://{addr}"))
            .expect("address")
            .connect()
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Stack {
    /// Everything for a gate of `connection` under `policy`; returns once
    /// the sidecar holds the policy bundle.
    pub async fn start(connection: &str, policy: &str) -> Stack {
        Stack::start_tuned(connection, policy, |_| {}).await
    }

    /// [`Stack::start`] with the control service's settings changed by `tune`.
    pub async fn start_tuned(
        connection: &str,
        policy: &str,
        tune: impl FnOnce(&mut wicket_control::Config),
    ) -> Stack {
        wicket_testkit::init_crypto();
        let idp = TestIdp::start("wicket").await;
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let control_addr = listener.local_addr().expect("addr");
        let mut cfg = wicket_control::Config {
            max_message_bytes: 4 << 20,
            agent_rules: vec!["client-credentials".into()],
            ..wicket_control::Config::defaults(
                &idp.issuer(),
                &format!("sqlite:{}", dir.path().join("c.db").display()),
                control_addr,
            )
        };
        tune(&mut cfg);
        let control_cfg = cfg.clone();
        let control = spawn_control(cfg, listener);
        let channel = connect(&control_addr.to_string()).await;
        let admin = idp.mint(&TokenSpec::human("root", &["wicket-admins"]));
        v1::policy_admin_service_client::PolicyAdminServiceClient::new(channel.clone())
            .apply_policy(auth(
                v1::ApplyPolicyRequest {
                    document: policy.into(),
                    source_name: "p".into(),
                },
                &admin,
            ))
            .await
            .expect("policy applies");
        let token =
            v1::sidecar_admin_service_client::SidecarAdminServiceClient::new(channel.clone())
                .create_sidecar_credential(auth(
                    v1::CreateSidecarCredentialRequest {
                        name: connection.into(),
                        connections: vec![connection.into()],
                    },
                    &admin,
                ))
                .await
                .expect("sidecar credential")
                .into_inner()
                .token;
        let sidecar = Sidecar::start(SidecarConfig {
            control: format!("http://{control_addr}"),
            control_ca_cert: None,
            sidecar_token: Some(token),
            sidecar_token_file: None,
            connection: connection.into(),
            state_dir: dir.path().join("state"),
            spool_max_bytes: 512 << 20,
            oidc_issuer: idp.issuer(),
            oidc_audience: "wicket".into(),
            groups_claim: "groups".into(),
            agent_rules: vec!["client-credentials".into()],
            token_grace_seconds: 0,
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            drain_seconds: 1,
            tls_cert: None,
            tls_key: None,
            tls_self_signed: Vec::new(),
        })
        .await
        .expect("sidecar starts");
        while sidecar.bundles.current().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Stack {
            idp,
            channel,
            sidecar,
            control_cfg,
            control: std::sync::Mutex::new(Some(control)),
            dir,
        }
    }

    /// A token of an administrator.
    pub fn admin(&self) -> String {
        self.idp.mint(&TokenSpec::human("root", &["wicket-admins"]))
    }

    /// Waits (up to 30 s) until every audit event reached the control service.
    pub async fn drained(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.sidecar.spool.unacked() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the audit spool did not drain"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every audit event of every session, in order per session.
    pub async fn events(&self) -> Vec<v1::AuditEvent> {
        self.drained().await;
        let admin = self.admin();
        let mut sessions =
            v1::session_admin_service_client::SessionAdminServiceClient::new(self.channel.clone());
        let list = sessions
            .list_sessions(auth(
                v1::ListSessionsRequest {
                    limit: 1000,
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .expect("sessions")
            .into_inner()
            .sessions;
        let mut all = Vec::new();
        for s in &list {
            let mut after = 0;
            loop {
                let page = sessions
                    .list_session_events(auth(
                        v1::ListSessionEventsRequest {
                            session_id: s.id.clone(),
                            after_seq: after,
                            limit: 1000,
                        },
                        &admin,
                    ))
                    .await
                    .expect("events")
                    .into_inner()
                    .events;
                // A page can be short of the limit (it stops before 3 MiB):
                // only an empty one ends the session.
                let n = page.len();
                after = page.last().map(|l| l.seq).unwrap_or(after);
                all.extend(page);
                if n == 0 {
                    break;
                }
            }
        }
        all
    }

    /// Every stored session's audit chain checked against its seal with
    /// the control service's audit key (after the spool drained).
    pub async fn audit_reports(&self) -> Vec<wicket_core::evidence::SessionReport> {
        use wicket_core::evidence::{ChainVerifier, ChainedEvent, Seal};
        self.drained().await;
        let admin = self.admin();
        let mut api =
            v1::audit_admin_service_client::AuditAdminServiceClient::new(self.channel.clone());
        let key = api
            .get_audit_key(auth(v1::GetAuditKeyRequest {}, &admin))
            .await
            .expect("audit key")
            .into_inner()
            .raw;
        let ids = api
            .list_audit_sessions(auth(
                v1::ListAuditSessionsRequest {
                    after_session: String::new(),
                    limit: 1000,
                },
                &admin,
            ))
            .await
            .expect("sessions")
            .into_inner()
            .session_ids;
        let mut reports = Vec::new();
        for id in ids {
            let mut v = ChainVerifier::new(&id);
            let mut after = 0;
            let seal = loop {
                let page = api
                    .get_audit_chain(auth(
                        v1::GetAuditChainRequest {
                            session_id: id.clone(),
                            after_index: after,
                            limit: 1000,
                        },
                        &admin,
                    ))
                    .await
                    .expect("chain")
                    .into_inner();
                for e in &page.events {
                    v.push(&ChainedEvent::from(e));
                }
                match page.events.last() {
                    Some(e) if page.events.len() >= 1000 => after = e.index,
                    _ => {
                        break page.seal.map(Seal::from);
                    }
                }
            };
            reports.push(v.finish(seal.as_ref(), &[], &key));
        }
        reports
    }

    /// Starts `client` (output discarded), waits until its command is held,
    /// kills it, and returns once the approval is withdrawn
    /// ([`Stack::withdrawn_after_leaving`]) and a moment has passed in
    /// which a wrongly kept hold could have run. Returns the approval's id.
    pub async fn kill_while_held(
        &self,
        approver: &str,
        client: &mut std::process::Command,
    ) -> String {
        let mut child = client
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the client starts");
        let id = self
            .withdrawn_after_leaving(approver, || child.kill().expect("kill the client"))
            .await;
        let _ = child.wait();
        tokio::time::sleep(Duration::from_millis(300)).await;
        id
    }

    /// Waits (up to 30 s) for a pending approval, as `approver` sees them.
    pub async fn next_pending(&self, approver: &str) -> v1::Approval {
        let mut api = v1::approval_admin_service_client::ApprovalAdminServiceClient::new(
            self.channel.clone(),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let list = api
                .list_approvals(auth(
                    v1::ListApprovalsRequest {
                        state: v1::ApprovalState::Pending as i32,
                        limit: 10,
                    },
                    approver,
                ))
                .await
                .expect("approvals")
                .into_inner()
                .approvals;
            if let Some(a) = list.into_iter().next() {
                return a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no approval request arrived"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the next pending approval (as `approver`), checks it with
    /// `check`, and approves or denies it.
    pub async fn decide_next(
        &self,
        approver: &str,
        approve: bool,
        check: impl FnOnce(&v1::Approval),
    ) {
        self.decide_next_for(approver, approve, 0, check).await
    }

    /// Waits for the next pending approval, runs `leave` (the client that
    /// asked goes away), then waits until the control service has withdrawn
    /// it (expired, with a reason that says so) and checks that an approver
    /// can no longer approve it. Returns the approval's id.
    pub async fn withdrawn_after_leaving(&self, approver: &str, leave: impl FnOnce()) -> String {
        let mut api = v1::approval_admin_service_client::ApprovalAdminServiceClient::new(
            self.channel.clone(),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let id = self.next_pending(approver).await.id;
        leave();
        let a = loop {
            let a = api
                .get_approval(auth(v1::GetApprovalRequest { id: id.clone() }, approver))
                .await
                .expect("approval")
                .into_inner();
            if a.state != v1::ApprovalState::Pending as i32 {
                break a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the approval stayed pending after its client went away"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(a.state, v1::ApprovalState::Expired as i32, "{a:?}");
        assert!(a.reason.contains("withdrawn"), "{a:?}");
        let late = api
            .approve(auth(
                v1::DecideRequest {
                    id: id.clone(),
                    comment: "too late".into(),
                    reuse_seconds: 0,
                },
                approver,
            ))
            .await;
        assert!(late.is_err(), "a withdrawn approval was approved: {late:?}");
        id
    }

    /// As [`Stack::decide_next`]; an approval also covers the same
    /// statement shape for `reuse_seconds`.
    pub async fn decide_next_for(
        &self,
        approver: &str,
        approve: bool,
        reuse_seconds: u32,
        check: impl FnOnce(&v1::Approval),
    ) {
        let mut api = v1::approval_admin_service_client::ApprovalAdminServiceClient::new(
            self.channel.clone(),
        );
        let approval = self.next_pending(approver).await;
        check(&approval);
        let req = auth(
            v1::DecideRequest {
                id: approval.id.clone(),
                comment: "not today".into(),
                reuse_seconds,
            },
            approver,
        );
        if approve {
            api.approve(req).await.expect("approve");
        } else {
            api.deny(req).await.expect("deny");
        }
    }
}

/// Every command's result among `events`: its own `command_result` event,
/// or the command event itself when the reporter sent the result inside it
/// (its details then hold the result's, with `result_id`). Which form a
/// result takes depends on whether it was ready before its command was
/// reported, so tests must take both.
pub fn results(events: &[v1::AuditEvent]) -> Vec<&v1::AuditEvent> {
    events
        .iter()
        .filter(|e| {
            e.kind == v1::AuditKind::CommandResult as i32
                || (e.kind == v1::AuditKind::Command as i32 && e.details.contains_key("result_id"))
        })
        .collect()
}
