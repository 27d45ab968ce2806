//! Sidecar-facing services: bundle watch, audit report, approval gate, traces.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use wicket_core::{Approval, ApprovalState, AuditEvent, AuditKind, ReasoningTrace};
use wicket_proto::v1;
use wicket_proto::v1::approval_gate_service_server::ApprovalGateService;
use wicket_proto::v1::audit_service_server::AuditService;
use wicket_proto::v1::bundle_service_server::BundleService;
use wicket_proto::v1::trace_service_server::TraceService;

use crate::state::{Control, storage};

/// A boxed server stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How often a bundle watcher re-reads state written by other replicas.
pub(crate) const RESYNC: Duration = Duration::from_secs(5);

/// Most events accepted in one report batch.
const MAX_BATCH: usize = 1000;

/// Implements the sidecar-facing services.
#[derive(Clone)]
pub struct SidecarApi {
    /// Shared state.
    pub control: Arc<Control>,
}

#[tonic::async_trait]
impl BundleService for SidecarApi {
    type WatchBundleStream = BoxStream<v1::PolicyBundle>;

    async fn watch_bundle(
        &self,
        req: Request<v1::WatchBundleRequest>,
    ) -> Result<Response<Self::WatchBundleStream>, Status> {
        let connection = req.get_ref().connection.clone();
        let sidecar = self
            .control
            .auth
            .sidecar(req.metadata(), Some(&connection))
            .await?;
        // Fail fast on an unknown connection or a missing policy.
        let first = self.control.bundle(&connection).await?;
        tracing::info!(sidecar = %sidecar.name, %connection, instance = %req.get_ref().instance, "bundle watch opened");
        let (tx, rx) = mpsc::channel(4);
        let control = self.control.clone();
        tokio::spawn(async move {
            let mut changes = control.subscribe_changes();
            let mut last_sha = String::new();
            let mut last_version = 0u64;
            let mut next = Ok(first);
            loop {
                match next {
                    Ok(mut bundle) => {
                        let key = format!(
                            "{}|{:?}|{:?}",
                            bundle.policy_sha256, bundle.revocations, bundle.terminated_sessions
                        );
                        if key != last_sha {
                            bundle.version = bundle.version.max(last_version + 1);
                            last_version = bundle.version;
                            last_sha = key;
                            if tx.send(Ok(bundle)).await.is_err() {
                                break;
                            }
                        }
                    }
                    Err(status) => {
                        // The connection left the policy: tell the sidecar, end the stream.
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(RESYNC) => {}
                    _ = tx.closed() => break,
                }
                next = control.bundle(&connection).await;
            }
            tracing::info!(%connection, "bundle watch closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl AuditService for SidecarApi {
    type ReportStream = BoxStream<v1::ReportAck>;

    async fn report(
        &self,
        req: Request<Streaming<v1::ReportRequest>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let sidecar = self.control.auth.sidecar(req.metadata(), None).await?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let control = self.control.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let batch = match msg {
                    Ok(b) => b,
                    Err(status) => {
                        tracing::debug!(%status, "audit stream ended");
                        break;
                    }
                };
                if batch.events.len() > MAX_BATCH {
                    let _ = tx
                        .send(Err(Status::invalid_argument(format!(
                            "at most {MAX_BATCH} events per batch"
                        ))))
                        .await;
                    break;
                }
                let mut good: Vec<AuditEvent> = Vec::with_capacity(batch.events.len());
                let mut rejected = Vec::new();
                for wire in batch.events {
                    if !sidecar
                        .connections
                        .iter()
                        .any(|c| c == &wire.connection || c == "*")
                    {
                        rejected.push(v1::RejectedEvent {
                            reason: format!(
                                "sidecar `{}` is not registered for connection `{}`",
                                sidecar.name, wire.connection
                            ),
                            id: wire.id,
                        });
                        continue;
                    }
                    // Taken by value: the event's strings move into the
                    // stored event rather than being copied.
                    let id = wire.id.clone();
                    match AuditEvent::try_from(wire) {
                        Ok(e) => good.push(e),
                        Err(reason) => rejected.push(v1::RejectedEvent { id, reason }),
                    }
                }
                for r in &rejected {
                    tracing::warn!(sidecar = %sidecar.name, id = %r.id, reason = %r.reason, "audit event rejected");
                }
                // Terminal output goes to its chunk first: an acknowledged
                // recording is never lost.
                if let Err(e) = control.recordings.offload(&mut good).await {
                    tracing::error!(error = %e, "cannot write a recording chunk");
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "recording storage unavailable; try again",
                        )))
                        .await;
                    break;
                }
                // Nothing is acknowledged before it is stored.
                let acked = match control.store.append_events(&good).await {
                    Ok(ids) => ids,
                    Err(e) => {
                        let _ = tx.send(Err(storage(e))).await;
                        break;
                    }
                };
                control.appended.send_modify(|n| *n = n.wrapping_add(1));
                // A session that ended is sealed now; should that fail, the
                // next audit root covers it.
                for e in good.iter().filter(|e| e.kind == AuditKind::SessionEnd) {
                    if let Err(err) = control
                        .notary
                        .seal(control.store.as_ref(), &e.session_id)
                        .await
                    {
                        tracing::warn!(session = %e.session_id, error = %err, "cannot seal the session; the next audit root covers it");
                    }
                }
                if tx
                    .send(Ok(v1::ReportAck {
                        acked_ids: acked,
                        rejected,
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl ApprovalGateService for SidecarApi {
    type RequestApprovalStream = BoxStream<v1::ApprovalUpdate>;

    async fn request_approval(
        &self,
        req: Request<v1::ApprovalRequest>,
    ) -> Result<Response<Self::RequestApprovalStream>, Status> {
        let r = req.get_ref();
        self.control
            .auth
            .sidecar(req.metadata(), Some(&r.connection))
            .await?;
        if r.request_id.is_empty() || r.request_id.len() > 128 {
            return Err(Status::invalid_argument(
                "request_id must be 1..=128 characters",
            ));
        }
        let principal = r
            .principal
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("principal is required"))?;
        let decision: wicket_core::Decision = r
            .decision
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("decision is required"))?
            .into();
        if decision.effect != wicket_core::Effect::Review {
            return Err(Status::invalid_argument(
                "only review decisions are held for approval",
            ));
        }
        let timeout = decision
            .review
            .as_ref()
            .map(|r| r.timeout_seconds)
            .unwrap_or(300)
            .clamp(1, 7 * 86_400);
        let now = Utc::now();
        let principal: wicket_core::Principal = principal.into();
        let command: wicket_core::Command = r.command.as_ref().map(Into::into).unwrap_or_default();
        let reuse_key = reuse_key(&r.connection, &principal, &decision, &command);
        // An approver let an earlier approval cover this statement shape
        // (or command) for a while: approved at once, under that approval.
        if let Some(covering) = self
            .control
            .store
            .find_reusable(&reuse_key, now)
            .await
            .map_err(storage)?
        {
            let until = covering.reuse_until.unwrap_or(now);
            tracing::info!(approval = %covering.id, connection = %r.connection,
                rule = %decision.rule, until = %until.to_rfc3339(),
                "held command covered by an earlier approval");
            let mut update: v1::ApprovalUpdate = (&covering).into();
            update.reason = format!(
                "covered by approval {} until {}",
                covering.id,
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            return Ok(Response::new(Box::pin(tokio_stream::once(Ok(update)))));
        }
        let approval = Approval {
            id: uuid::Uuid::now_v7().to_string(),
            rev: 0,
            state: ApprovalState::Pending,
            request: wicket_core::ApprovalRequest {
                request_id: r.request_id.clone(),
                session_id: r.session_id.clone(),
                connection: r.connection.clone(),
                principal,
                command,
                decision,
                reasoning: r.reasoning.as_ref().map(ReasoningTrace::from),
                access_seconds: None,
            },
            votes: Vec::new(),
            created_at: now,
            expires_at: now + chrono::Duration::seconds(i64::from(timeout)),
            reason: String::new(),
            reuse_key,
            reuse_until: None,
        };
        let states = self.control.hold(approval, true).await?;
        Ok(Response::new(Box::pin(
            ReceiverStream::new(states).map(|a| Ok((&a).into())),
        )))
    }
}

#[tonic::async_trait]
impl TraceService for SidecarApi {
    async fn attach(
        &self,
        req: Request<v1::AttachTraceRequest>,
    ) -> Result<Response<v1::AttachTraceResponse>, Status> {
        // Sidecars attach traces they were given; a signed-in principal (an
        // agent's MCP server, say) may attach its own, but never replace an
        // existing one: trace ids are not secret, and another caller's trace
        // must stay as it was.
        let by_principal = if crate::auth::carries_sidecar_credential(req.metadata()) {
            self.control.auth.sidecar(req.metadata(), None).await?;
            false
        } else {
            self.control.auth.user(req.metadata()).await?;
            true
        };
        let trace: ReasoningTrace = req
            .get_ref()
            .trace
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("trace is required"))?
            .into();
        if !ReasoningTrace::valid_trace_id(&trace.trace_id) {
            return Err(Status::invalid_argument(
                "trace_id must be a W3C trace id: 32 lowercase hex digits, not all zero",
            ));
        }
        if by_principal
            && self
                .control
                .store
                .get_trace(&trace.trace_id)
                .await
                .map_err(storage)?
                .is_some()
        {
            return Err(Status::already_exists(format!(
                "trace {} exists; attach yours under a new trace id",
                trace.trace_id
            )));
        }
        self.control
            .store
            .put_trace(&trace)
            .await
            .map_err(storage)?;
        Ok(Response::new(v1::AttachTraceResponse {
            trace_id: trace.trace_id,
        }))
    }
}

/// What a later request must match to be covered by an approval of this
/// one: the connection, the principal, the rule and the statement
/// fingerprint (the command text where the gate has none), hashed; empty
/// when the rule lets an approval cover one execution only.
fn reuse_key(
    connection: &str,
    principal: &wicket_core::Principal,
    decision: &wicket_core::Decision,
    command: &wicket_core::Command,
) -> String {
    if decision
        .review
        .as_ref()
        .is_none_or(|r| r.reuse_seconds == 0)
    {
        return String::new();
    }
    let fingerprint = &command.classification.fingerprint;
    let what = if fingerprint.is_empty() {
        format!("text:{}", command.text)
    } else {
        format!("fingerprint:{fingerprint}")
    };
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in [
        connection,
        &principal.issuer,
        &principal.subject,
        &decision.rule,
        &what,
    ] {
        // Length-prefixed, so no two different tuples hash alike.
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finish().as_ref())
}
