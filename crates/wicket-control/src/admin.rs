//! Admin-facing services.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wicket_core::{ApprovalState, Command, Principal};
use wicket_policy::{Policy, PolicyErrors, Request as DecideRequest};
use wicket_proto::convert;
use wicket_proto::v1;
use wicket_proto::v1::approval_admin_service_server::ApprovalAdminService;
use wicket_proto::v1::connection_admin_service_server::ConnectionAdminService;
use wicket_proto::v1::policy_admin_service_server::PolicyAdminService;
use wicket_proto::v1::principal_admin_service_server::PrincipalAdminService;
use wicket_proto::v1::session_admin_service_server::SessionAdminService;
use wicket_proto::v1::sidecar_admin_service_server::SidecarAdminService;
use wicket_store::{EventSearch, Revocation, SessionFilter, SessionRecord, SidecarRecord};

use crate::auth::{Permission, hash_secret};
use crate::sidecar::BoxStream;
use crate::state::{Control, connection, revocation, storage};

/// Most bytes of events in one page.
const PAGE_BYTES: usize = 3 << 20;

/// Implements the admin-facing services.
#[derive(Clone)]
pub struct AdminApi {
    /// Shared state.
    pub control: Arc<Control>,
}

fn policy_errors(e: &PolicyErrors) -> Vec<v1::PolicyError> {
    e.0.iter()
        .map(|e| v1::PolicyError {
            source_name: e.source_name.clone(),
            line: e.line,
            column: e.column,
            field: e.field.clone(),
            message: e.message.clone(),
        })
        .collect()
}

fn session(s: &SessionRecord) -> v1::Session {
    v1::Session {
        id: s.id.clone(),
        connection: s.connection.clone(),
        principal: Some((&s.principal).into()),
        started_at: Some(convert::ts(s.started_at)),
        ended_at: s.ended_at.map(convert::ts),
        state: s.state.clone(),
        end_reason: s.end_reason.clone(),
        command_count: s.command_count,
        client_addr: s.client_addr.clone(),
        client_app: s.client_app.clone(),
        hold: s.hold.clone(),
    }
}

fn sidecar(s: &SidecarRecord) -> v1::SidecarCredential {
    v1::SidecarCredential {
        id: s.id.clone(),
        name: s.name.clone(),
        connections: s.connections.clone(),
        created_at: Some(convert::ts(s.created_at)),
        revoked: s.revoked,
    }
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {max} bytes"
        )));
    }
    Ok(())
}

impl AdminApi {
    /// Wire events, with structured traces (attached by trace id) joined in.
    async fn with_traces(&self, mut events: Vec<wicket_core::AuditEvent>) -> Vec<v1::AuditEvent> {
        // Only what fits a page has its recording read back.
        let mut estimate = 0;
        let fits = events
            .iter()
            .position(|e| {
                estimate += 512
                    + e.details
                        .get("asciicast_len")
                        .and_then(|l| l.parse::<usize>().ok())
                        .unwrap_or(0);
                estimate > PAGE_BYTES
            })
            .unwrap_or(events.len())
            .max(1);
        events.truncate(fits);
        self.control.recordings.inline(&mut events).await;
        for e in &mut events {
            let trace_id = e.traceparent.split('-').nth(1).unwrap_or("").to_string();
            if wicket_core::ReasoningTrace::valid_trace_id(&trace_id)
                && let Ok(Some(t)) = self.control.store.get_trace(&trace_id).await
            {
                let inline = e.reasoning.take().map(|r| r.reasoning).unwrap_or_default();
                e.reasoning = Some(wicket_core::ReasoningTrace {
                    reasoning: if inline.is_empty() {
                        t.reasoning.clone()
                    } else {
                        inline
                    },
                    ..t
                });
            }
        }
        // A page stops short of 3 MiB (but holds one event at least), so a
        // client's default 4 MiB limit takes it, however large the
        // recordings in it; clients page on by the last event's seq.
        let mut out: Vec<v1::AuditEvent> = Vec::with_capacity(events.len());
        let mut bytes = 0;
        for e in &events {
            let wire: v1::AuditEvent = e.into();
            bytes += prost::Message::encoded_len(&wire);
            if bytes > PAGE_BYTES && !out.is_empty() {
                break;
            }
            out.push(wire);
        }
        out
    }

    pub(crate) async fn allow<T>(
        &self,
        req: &Request<T>,
        need: Permission,
    ) -> Result<Principal, Status> {
        self.control.auth.admin(req.metadata(), need).await
    }
}

#[tonic::async_trait]
impl ConnectionAdminService for AdminApi {
    async fn list_connections(
        &self,
        req: Request<v1::ListConnectionsRequest>,
    ) -> Result<Response<v1::ListConnectionsResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let connections = self
            .control
            .current()
            .map(|c| {
                c.policy
                    .document()
                    .connections
                    .iter()
                    .map(connection)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(v1::ListConnectionsResponse { connections }))
    }

    async fn get_connection(
        &self,
        req: Request<v1::GetConnectionRequest>,
    ) -> Result<Response<v1::Connection>, Status> {
        self.allow(&req, Permission::Read).await?;
        let name = &req.get_ref().name;
        let list = self
            .list_connections(Request::from_parts(
                req.metadata().clone(),
                Default::default(),
                v1::ListConnectionsRequest {},
            ))
            .await?
            .into_inner();
        list.connections
            .into_iter()
            .find(|c| &c.name == name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no connection `{name}`")))
    }
}

#[tonic::async_trait]
impl PolicyAdminService for AdminApi {
    async fn apply_policy(
        &self,
        req: Request<v1::ApplyPolicyRequest>,
    ) -> Result<Response<v1::ApplyPolicyResponse>, Status> {
        let who = self.allow(&req, Permission::Admin).await?;
        let r = req.get_ref();
        let source = if r.source_name.is_empty() {
            "<input>"
        } else {
            &r.source_name
        };
        match self
            .control
            .apply_policy(&r.document, source, who.label())
            .await?
        {
            Ok((version, sha256, changed)) => Ok(Response::new(v1::ApplyPolicyResponse {
                version,
                sha256,
                changed,
            })),
            Err(errors) => Err(Status::invalid_argument(format!(
                "policy refused:\n{errors}"
            ))),
        }
    }

    async fn get_policy(
        &self,
        req: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::GetPolicyResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let v = req.get_ref().version;
        let p = self
            .control
            .store
            .get_policy((v != 0).then_some(v))
            .await
            .map_err(storage)?
            .ok_or_else(|| {
                if v == 0 {
                    Status::not_found("no policy has been applied yet")
                } else {
                    Status::not_found(format!("no policy version {v}"))
                }
            })?;
        Ok(Response::new(v1::GetPolicyResponse {
            version: p.version,
            document: p.document,
            sha256: p.sha256,
            applied_by: p.applied_by,
            applied_at: Some(convert::ts(p.applied_at)),
        }))
    }

    async fn validate_policy(
        &self,
        req: Request<v1::ValidatePolicyRequest>,
    ) -> Result<Response<v1::ValidatePolicyResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let r = req.get_ref();
        let source = if r.source_name.is_empty() {
            "<input>"
        } else {
            &r.source_name
        };
        let errors = match wicket_policy::parse_and_compile(&r.document, source) {
            Ok(_) => Vec::new(),
            Err(e) => policy_errors(&e),
        };
        Ok(Response::new(v1::ValidatePolicyResponse {
            valid: errors.is_empty(),
            errors,
        }))
    }

    async fn explain_policy(
        &self,
        req: Request<v1::ExplainRequest>,
    ) -> Result<Response<v1::ExplainResponse>, Status> {
        let caller = self.allow(&req, Permission::Read).await?;
        let r = req.get_ref();
        let principal: Principal = r.principal.as_ref().map(Into::into).unwrap_or(caller);
        let command: Command = r.command.as_ref().map(Into::into).unwrap_or_default();
        let now = convert::from_ts(r.at.as_ref()).unwrap_or_else(Utc::now);
        let (owned, version);
        let current;
        let policy: &Policy = if r.document.is_empty() {
            current = self
                .control
                .current()
                .ok_or_else(|| Status::failed_precondition("no policy has been applied yet"))?;
            version = current.version;
            &current.policy
        } else {
            owned = wicket_policy::parse_and_compile(&r.document, "<explain>")
                .map_err(|e| Status::invalid_argument(format!("policy refused:\n{e}")))?;
            version = 0;
            &owned
        };
        let e = policy.explain(&DecideRequest {
            principal: &principal,
            connection: &r.connection,
            command: &command,
            has_reasoning: r.has_reasoning,
            now,
        });
        Ok(Response::new(v1::ExplainResponse {
            decision: Some((&e.decision).into()),
            matched: e
                .matched
                .iter()
                .map(|m| v1::RuleMatch {
                    rule: m.rule.clone(),
                    effect: convert::effect(m.effect) as i32,
                    note: m.note.clone(),
                })
                .collect(),
            grant: e.grant.unwrap_or_default(),
            policy_version: version,
        }))
    }
}

#[tonic::async_trait]
impl ApprovalAdminService for AdminApi {
    async fn list_approvals(
        &self,
        req: Request<v1::ListApprovalsRequest>,
    ) -> Result<Response<v1::ListApprovalsResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let r = req.get_ref();
        let list = self
            .control
            .store
            .list_approvals(convert::from_approval_state(r.state), r.limit)
            .await
            .map_err(storage)?;
        Ok(Response::new(v1::ListApprovalsResponse {
            approvals: list.iter().map(Into::into).collect(),
        }))
    }

    async fn get_approval(
        &self,
        req: Request<v1::GetApprovalRequest>,
    ) -> Result<Response<v1::Approval>, Status> {
        self.allow(&req, Permission::Read).await?;
        let id = &req.get_ref().id;
        let a = self
            .control
            .store
            .get_approval(id)
            .await
            .map_err(storage)?
            .ok_or_else(|| Status::not_found(format!("no approval `{id}`")))?;
        Ok(Response::new((&a).into()))
    }

    async fn approve(
        &self,
        req: Request<v1::DecideRequest>,
    ) -> Result<Response<v1::Approval>, Status> {
        let who = self.allow(&req, Permission::Decide).await?;
        let r = req.get_ref();
        check_len("comment", &r.comment, 4096)?;
        let a = self
            .control
            .vote(&r.id, &who, true, &r.comment, r.reuse_seconds)
            .await?;
        Ok(Response::new((&a).into()))
    }

    async fn deny(
        &self,
        req: Request<v1::DecideRequest>,
    ) -> Result<Response<v1::Approval>, Status> {
        let who = self.allow(&req, Permission::Decide).await?;
        let r = req.get_ref();
        check_len("comment", &r.comment, 4096)?;
        if r.reuse_seconds > 0 {
            return Err(Status::invalid_argument(
                "reuse_seconds applies to approvals only",
            ));
        }
        let a = self.control.vote(&r.id, &who, false, &r.comment, 0).await?;
        Ok(Response::new((&a).into()))
    }

    type WatchApprovalsStream = BoxStream<v1::Approval>;

    async fn watch_approvals(
        &self,
        req: Request<v1::WatchApprovalsRequest>,
    ) -> Result<Response<Self::WatchApprovalsStream>, Status> {
        self.allow(&req, Permission::Read).await?;
        let mut updates = self.control.subscribe_approvals();
        let state = req.get_ref().pending_only.then_some(ApprovalState::Pending);
        let initial = self
            .control
            .store
            .list_approvals(state, 1000)
            .await
            .map_err(storage)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            for a in initial.iter().rev() {
                if tx.send(Ok(a.into())).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    u = updates.recv() => match u {
                        Ok(a) => if tx.send(Ok((&a).into())).await.is_err() { return },
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "approval watcher lagged");
                        }
                        Err(_) => return,
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl SessionAdminService for AdminApi {
    async fn list_sessions(
        &self,
        req: Request<v1::ListSessionsRequest>,
    ) -> Result<Response<v1::ListSessionsResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let r = req.get_ref();
        let filter = SessionFilter {
            connection: (!r.connection.is_empty()).then(|| r.connection.clone()),
            principal: (!r.principal.is_empty()).then(|| r.principal.clone()),
            active_only: r.active_only,
            limit: r.limit,
        };
        let list = self
            .control
            .store
            .list_sessions(&filter)
            .await
            .map_err(storage)?;
        Ok(Response::new(v1::ListSessionsResponse {
            sessions: list.iter().map(session).collect(),
        }))
    }

    async fn get_session(
        &self,
        req: Request<v1::GetSessionRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.allow(&req, Permission::Read).await?;
        let id = &req.get_ref().id;
        let s = self
            .control
            .store
            .get_session(id)
            .await
            .map_err(storage)?
            .ok_or_else(|| Status::not_found(format!("no session `{id}`")))?;
        Ok(Response::new(session(&s)))
    }

    async fn list_session_events(
        &self,
        req: Request<v1::ListSessionEventsRequest>,
    ) -> Result<Response<v1::ListSessionEventsResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let r = req.get_ref();
        let events = self
            .control
            .store
            .list_events(&r.session_id, r.after_seq, r.limit)
            .await
            .map_err(storage)?;
        Ok(Response::new(v1::ListSessionEventsResponse {
            events: self.with_traces(events).await,
        }))
    }

    async fn search_events(
        &self,
        req: Request<v1::SearchEventsRequest>,
    ) -> Result<Response<v1::ListSessionEventsResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let r = req.get_ref();
        for (field, value) in [
            ("text", &r.text),
            ("principal", &r.principal),
            ("connection", &r.connection),
        ] {
            check_len(field, value, 1024)?;
        }
        if !matches!(
            r.decision.as_str(),
            "" | "allow" | "review" | "deny" | "approved" | "denied" | "expired" | "covered"
        ) {
            return Err(Status::invalid_argument(format!(
                "unknown decision `{}`: use allow, review, deny, approved, denied, expired or covered",
                r.decision
            )));
        }
        let search = EventSearch {
            text: r.text.clone(),
            principal: r.principal.clone(),
            connection: r.connection.clone(),
            decision: r.decision.clone(),
            since: convert::from_ts(r.since.as_ref()),
            until: convert::from_ts(r.until.as_ref()),
            limit: r.limit,
        };
        let events = self
            .control
            .store
            .search_events(&search)
            .await
            .map_err(storage)?;
        Ok(Response::new(v1::ListSessionEventsResponse {
            events: self.with_traces(events).await,
        }))
    }

    async fn hold_session(
        &self,
        req: Request<v1::HoldSessionRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        let who = self.allow(&req, Permission::Admin).await?;
        let r = req.get_ref();
        check_len("reason", &r.reason, 1024)?;
        let s = self
            .control
            .store
            .set_hold(&r.id, r.reason.trim())
            .await
            .map_err(storage)?
            .ok_or_else(|| Status::not_found(format!("no session `{}`", r.id)))?;
        if r.reason.trim().is_empty() {
            tracing::info!(session = %r.id, by = %who.label(), "legal hold released");
        } else {
            tracing::info!(session = %r.id, by = %who.label(), reason = %r.reason, "legal hold placed");
        }
        Ok(Response::new(session(&s)))
    }

    async fn terminate_session(
        &self,
        req: Request<v1::TerminateSessionRequest>,
    ) -> Result<Response<v1::TerminateSessionResponse>, Status> {
        let who = self.allow(&req, Permission::Admin).await?;
        let r = req.get_ref();
        check_len("reason", &r.reason, 1024)?;
        let reason = if r.reason.is_empty() {
            format!("terminated by {}", who.label())
        } else {
            format!("terminated by {}: {}", who.label(), r.reason)
        };
        let s = self
            .control
            .store
            .terminate_session(&r.id, &reason)
            .await
            .map_err(storage)?
            .ok_or_else(|| Status::not_found(format!("no session `{}`", r.id)))?;
        if s.state == "ended" {
            return Err(Status::failed_precondition(format!(
                "session `{}` has already ended",
                r.id
            )));
        }
        tracing::info!(session = %r.id, by = who.label(), "session terminated");
        self.control.bundle_changed().await;
        Ok(Response::new(v1::TerminateSessionResponse {
            session: Some(session(&s)),
        }))
    }
}

#[tonic::async_trait]
impl PrincipalAdminService for AdminApi {
    async fn revoke_principal(
        &self,
        req: Request<v1::RevokePrincipalRequest>,
    ) -> Result<Response<v1::Revocation>, Status> {
        let who = self.allow(&req, Permission::Admin).await?;
        let r = req.get_ref();
        if r.subject.is_empty() || r.issuer.is_empty() {
            return Err(Status::invalid_argument("issuer and subject are required"));
        }
        check_len("subject", &r.subject, 512)?;
        check_len("reason", &r.reason, 1024)?;
        let now = Utc::now();
        let rev = Revocation {
            issuer: r.issuer.clone(),
            subject: r.subject.clone(),
            reason: r.reason.clone(),
            revoked_at: now,
            until: (r.duration_seconds > 0).then(|| {
                now + chrono::Duration::seconds(r.duration_seconds.min(10 * 365 * 86_400) as i64)
            }),
        };
        self.control.store.revoke(&rev).await.map_err(storage)?;
        tracing::info!(subject = %rev.subject, by = who.label(), "principal revoked");
        self.control.bundle_changed().await;
        Ok(Response::new(revocation(&rev)))
    }

    async fn list_revocations(
        &self,
        req: Request<v1::ListRevocationsRequest>,
    ) -> Result<Response<v1::ListRevocationsResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let list = self
            .control
            .store
            .list_revocations(Utc::now())
            .await
            .map_err(storage)?;
        Ok(Response::new(v1::ListRevocationsResponse {
            revocations: list.iter().map(revocation).collect(),
        }))
    }
}

#[tonic::async_trait]
impl SidecarAdminService for AdminApi {
    async fn create_sidecar_credential(
        &self,
        req: Request<v1::CreateSidecarCredentialRequest>,
    ) -> Result<Response<v1::CreateSidecarCredentialResponse>, Status> {
        let who = self.allow(&req, Permission::Admin).await?;
        let r = req.get_ref();
        if r.name.is_empty() || r.connections.is_empty() {
            return Err(Status::invalid_argument(
                "name and at least one connection are required",
            ));
        }
        check_len("name", &r.name, 256)?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| Status::internal("no randomness"))?;
        let secret = hex::encode(secret);
        let record = SidecarRecord {
            id: id.clone(),
            name: r.name.clone(),
            connections: r.connections.clone(),
            secret_hash: hash_secret(&secret),
            created_at: Utc::now(),
            revoked: false,
        };
        self.control
            .store
            .create_sidecar(&record)
            .await
            .map_err(storage)?;
        tracing::info!(sidecar = %r.name, id = %id, by = who.label(), "sidecar credential created");
        Ok(Response::new(v1::CreateSidecarCredentialResponse {
            credential: Some(sidecar(&record)),
            token: format!("wks_{id}_{secret}"),
        }))
    }

    async fn list_sidecar_credentials(
        &self,
        req: Request<v1::ListSidecarCredentialsRequest>,
    ) -> Result<Response<v1::ListSidecarCredentialsResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let list = self.control.store.list_sidecars().await.map_err(storage)?;
        Ok(Response::new(v1::ListSidecarCredentialsResponse {
            credentials: list.iter().map(sidecar).collect(),
        }))
    }

    async fn revoke_sidecar_credential(
        &self,
        req: Request<v1::RevokeSidecarCredentialRequest>,
    ) -> Result<Response<v1::SidecarCredential>, Status> {
        self.allow(&req, Permission::Admin).await?;
        let id = &req.get_ref().id;
        let s = self
            .control
            .store
            .revoke_sidecar(id)
            .await
            .map_err(storage)?
            .ok_or_else(|| Status::not_found(format!("no sidecar credential `{id}`")))?;
        Ok(Response::new(sidecar(&s)))
    }
}

#[tonic::async_trait]
impl wicket_proto::v1::credential_service_server::CredentialService for AdminApi {
    async fn sign_ssh_key(
        &self,
        req: Request<v1::SignSshKeyRequest>,
    ) -> Result<Response<v1::SignSshKeyResponse>, Status> {
        let identity = self.control.auth.user(req.metadata()).await?;
        let (certificate, until) = self.control.ssh_ca.sign(
            &req.get_ref().public_key,
            &identity.principal,
            identity.expires_at,
            self.control.ssh_cert_max_seconds,
        )?;
        tracing::info!(
            principal = %identity.principal.label(),
            valid_before = %until,
            "signed an SSH user certificate"
        );
        Ok(Response::new(v1::SignSshKeyResponse {
            certificate,
            ca_public_key: self.control.ssh_ca.public().to_string(),
            valid_before: Some(convert::ts(until)),
        }))
    }
}
