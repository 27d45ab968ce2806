//! Just-in-time access (`AccessService`): a principal asks for a
//! time-bound grant on a connection under one of the policy's `access`
//! rules; the request is an approval like a held command's (same approvers,
//! quorum, console, notifications), and once approved its grant is stored,
//! carried in the connection's bundle for exactly that principal, and
//! lapses by itself: the sidecars end the sessions it opened then.

use chrono::Utc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wicket_core::{
    Approval, ApprovalRequest, ApprovalState, Classification, Command, Decision, Effect,
    ReasoningTrace,
};
use wicket_proto::convert;
use wicket_proto::v1;
use wicket_proto::v1::access_service_server::AccessService;

use crate::admin::AdminApi;
use crate::auth::Permission;
use crate::sidecar::BoxStream;
use crate::state::storage;

/// Longest reason kept.
const MAX_REASON: usize = 1024;

/// `90 s`, `15 min`, `2 h`: a duration as people read it.
fn human(secs: u32) -> String {
    match secs {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

fn grant(g: &wicket_store::AccessGrant) -> v1::AccessGrant {
    v1::AccessGrant {
        id: g.id.clone(),
        approval_id: g.approval_id.clone(),
        principal: g.label.clone(),
        issuer: g.issuer.clone(),
        subject: g.subject.clone(),
        connection: g.connection.clone(),
        reason: g.reason.clone(),
        granted_at: Some(convert::ts(g.granted_at)),
        until: Some(convert::ts(g.until)),
    }
}

#[tonic::async_trait]
impl AccessService for AdminApi {
    type RequestAccessStream = BoxStream<v1::AccessUpdate>;

    async fn request_access(
        &self,
        req: Request<v1::AccessRequest>,
    ) -> Result<Response<Self::RequestAccessStream>, Status> {
        let who = self.control.auth.user(req.metadata()).await?.principal;
        let r = req.into_inner();
        let reason = r.reason.trim();
        if reason.is_empty() {
            return Err(Status::invalid_argument(
                "say why you need access (--reason): approvers read it",
            ));
        }
        if reason.len() > MAX_REASON {
            return Err(Status::invalid_argument(format!(
                "the reason is longer than {MAX_REASON} bytes"
            )));
        }
        if r.duration_seconds == 0 {
            return Err(Status::invalid_argument("ask for a duration (--for 1h)"));
        }
        let current = self
            .control
            .current()
            .ok_or_else(|| Status::failed_precondition("no policy has been applied yet"))?;
        if current.policy.connection(&r.connection).is_none() {
            return Err(Status::not_found(format!(
                "connection `{}` is not defined in the policy",
                r.connection
            )));
        }
        let rule = current
            .policy
            .access_rule(&r.connection, &who)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "no access rule lets {} ask for access to `{}`",
                    who.label(),
                    r.connection
                ))
            })?;
        if r.duration_seconds > rule.max.0 {
            return Err(Status::invalid_argument(format!(
                "access rule `{}` grants at most {}",
                rule.id,
                human(rule.max.0)
            )));
        }
        let review = rule.review.spec();
        let now = Utc::now();
        let approval = Approval {
            id: uuid::Uuid::now_v7().to_string(),
            rev: 0,
            state: ApprovalState::Pending,
            request: ApprovalRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                session_id: String::new(),
                connection: r.connection.clone(),
                principal: who,
                command: Command {
                    text: format!(
                        "access to {} for {}",
                        r.connection,
                        human(r.duration_seconds)
                    ),
                    classification: Classification {
                        kind: "access".into(),
                        verb: "ACCESS".into(),
                        objects: vec![r.connection.clone()],
                        ..Default::default()
                    },
                },
                decision: Decision {
                    effect: Effect::Review,
                    rule: rule.id.clone(),
                    reason: rule.description.clone(),
                    review: Some(wicket_core::ReviewSpec {
                        reuse_seconds: 0,
                        ..review.clone()
                    }),
                },
                reasoning: Some(ReasoningTrace {
                    reasoning: reason.to_string(),
                    ..Default::default()
                }),
                access_seconds: Some(r.duration_seconds),
            },
            votes: Vec::new(),
            created_at: now,
            expires_at: now + chrono::Duration::seconds(i64::from(review.timeout_seconds)),
            reason: String::new(),
            reuse_key: String::new(),
            reuse_until: None,
        };
        // An access request stands whether or not its requester still waits.
        let states = self.control.hold(approval, false).await?;
        let control = self.control.clone();
        let updates = ReceiverStream::new(states).then(move |a| {
            let control = control.clone();
            async move {
                let until = if a.state == ApprovalState::Approved {
                    control
                        .store
                        .list_access_grants(Some(&a.request.connection), Utc::now())
                        .await
                        .map_err(storage)?
                        .into_iter()
                        .find(|g| g.approval_id == a.id)
                        .map(|g| convert::ts(g.until))
                } else {
                    None
                };
                Ok(v1::AccessUpdate {
                    approval_id: a.id.clone(),
                    state: convert::approval_state(a.state) as i32,
                    rule: a.request.decision.rule.clone(),
                    reason: a.reason.clone(),
                    until,
                })
            }
        });
        Ok(Response::new(Box::pin(updates)))
    }

    async fn list_access_grants(
        &self,
        req: Request<v1::ListAccessGrantsRequest>,
    ) -> Result<Response<v1::ListAccessGrantsResponse>, Status> {
        // Readers see every grant; anyone else their own.
        let me = self.control.auth.user(req.metadata()).await?.principal;
        let reader = self
            .control
            .auth
            .admin(req.metadata(), Permission::Read)
            .await
            .is_ok();
        let r = req.get_ref();
        let connection = (!r.connection.is_empty()).then_some(r.connection.as_str());
        let grants = self
            .control
            .store
            .list_access_grants(connection, Utc::now())
            .await
            .map_err(storage)?
            .iter()
            .filter(|g| reader || (g.issuer == me.issuer && g.subject == me.subject))
            .map(grant)
            .collect();
        Ok(Response::new(v1::ListAccessGrantsResponse { grants }))
    }

    async fn list_my_connections(
        &self,
        req: Request<v1::ListMyConnectionsRequest>,
    ) -> Result<Response<v1::ListMyConnectionsResponse>, Status> {
        let me = self.control.auth.user(req.metadata()).await?.principal;
        let now = Utc::now();
        let Some(current) = self.control.current() else {
            return Ok(Response::new(v1::ListMyConnectionsResponse::default()));
        };
        let policy = &current.policy;
        // Just-in-time grants in force, by connection (the longest wins).
        let mut jit: std::collections::HashMap<String, &wicket_store::AccessGrant> =
            std::collections::HashMap::new();
        let grants = self
            .control
            .store
            .list_access_grants(None, now)
            .await
            .map_err(storage)?;
        for g in grants
            .iter()
            .filter(|g| g.issuer == me.issuer && g.subject == me.subject)
        {
            let e = jit.entry(g.connection.clone()).or_insert(g);
            if g.until > e.until {
                *e = g;
            }
        }
        let mut out = Vec::new();
        for c in &policy.document().connections {
            let (grant, until) = match policy.authorize_session(&me, &c.name, now) {
                wicket_policy::SessionDecision::Allowed { grant, expires } => (grant, expires),
                wicket_policy::SessionDecision::Denied(_) => match jit.get(&c.name) {
                    Some(g) => (g.id.clone(), Some(g.until)),
                    None => continue,
                },
            };
            out.push(v1::MyConnection {
                name: c.name.clone(),
                protocol: convert::protocol(c.protocol) as i32,
                description: c.description.clone(),
                grant,
                until: until.map(convert::ts),
            });
        }
        Ok(Response::new(v1::ListMyConnectionsResponse {
            connections: out,
        }))
    }
}
