//! The shared sidecar runtime.
//!
//! Every protocol sidecar (PostgreSQL, SSH, Kubernetes, HTTP) is a codec and
//! a relay on top of [`Sidecar`], which owns everything protocol-agnostic:
//!
//! - identity: [`Sidecar::authenticate`] validates the caller's OIDC token;
//! - policy: [`BundleStore`] watches the connection's bundle and caches it on
//!   disk; [`Sidecar::open_session`] and [`Sidecar::decide`] decide locally;
//! - audit: every event goes through the durable [`Spool`] first
//!   ([`Sidecar::record`]) and is streamed to the control service;
//! - approvals: [`Sidecar::request_approval`] holds a command until decided;
//! - lifecycle: the session [`Registry`] ends sessions on revocation, token
//!   expiry or terminate; `/metrics`, `/healthz`, `/readyz`; drain on SIGTERM.
//!
//! A session's life: authenticate → open_session (grant check, `session_start`
//! event) → per command: classify (protocol) → decide → forward, hold or refuse
//! → record → … → close (`session_end` event).

pub mod audit;
pub mod bundle;
pub mod client;
pub mod config;
pub mod http;
pub mod login;
pub mod masking;
pub mod memo;
pub mod metrics;
pub mod process;
pub mod recording;
pub mod secret;
pub mod session;
pub mod tls;
pub mod web;
pub mod websocket;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_stream::StreamExt;
use wicket_core::{AuditEvent, AuditKind, Command, Decision, Effect, Principal, ReasoningTrace};
use wicket_identity::{AuthError, Identity, Validator};
use wicket_policy::{Request, SessionDecision};
use wicket_proto::v1;
use wicket_proto::v1::approval_gate_service_client::ApprovalGateServiceClient;

pub use audit::{Spool, SpoolError};
pub use bundle::{Bundle, BundleStore};
pub use client::ControlClient;
pub use config::SidecarConfig;
pub use metrics::Metrics;
pub use session::{EndReason, Registry, SessionGuard};

/// The runtime one sidecar process shares across its sessions.
pub struct Sidecar {
    /// Settings.
    pub cfg: SidecarConfig,
    /// Control-plane channel.
    pub client: ControlClient,
    /// Policy bundle.
    pub bundles: BundleStore,
    /// Audit spool.
    pub spool: Arc<Spool>,
    /// Live sessions.
    pub sessions: Registry,
    /// Metrics.
    pub metrics: Metrics,
    validator: Validator,
    draining: AtomicBool,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("connection", &self.cfg.connection)
            .finish()
    }
}

/// A new event id: a UUIDv7 (time-ordered) whose random part is a random
/// per-process prefix and a counter, so ids stay unique without a system
/// call for fresh randomness per event (one per statement on the hot path).
pub fn event_id() -> String {
    static PREFIX: std::sync::OnceLock<[u8; 6]> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut p = [0u8; 6];
        if aws_lc_rs::rand::fill(&mut p).is_err() {
            // No randomness at all: fall back on time and pid, still unique per process.
            let t = Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64
                ^ u64::from(std::process::id());
            p.copy_from_slice(&t.to_be_bytes()[2..]);
        }
        p
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tail = [0u8; 10];
    tail[..6].copy_from_slice(prefix);
    tail[6..].copy_from_slice(&(n as u32).to_be_bytes());
    let ms = Utc::now().timestamp_millis().max(0) as u64;
    uuid::Builder::from_unix_timestamp_millis(ms, &tail)
        .into_uuid()
        .to_string()
}

/// A session that passed authentication and the grant check.
pub struct OpenSession {
    /// Session id (UUID v7).
    pub id: String,
    /// Who.
    pub principal: Principal,
    /// The grant that admitted it.
    pub grant: String,
    /// When the token expires.
    pub token_expires: DateTime<Utc>,
    /// Ends the session from outside.
    pub guard: SessionGuard,
    /// Client address.
    pub client_addr: String,
    /// Client program.
    pub client_app: String,
    connection: String,
    seq: AtomicU64,
    memo: memo::DecisionMemo,
}

impl OpenSession {
    /// A new event of this session that carries no copy of the session's
    /// principal and client (the session's `session_start` has them): for
    /// high-volume events such as command results.
    pub fn bare_event(&self, kind: AuditKind) -> AuditEvent {
        AuditEvent {
            id: event_id(),
            session_id: self.id.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time: Utc::now(),
            kind,
            connection: self.connection.clone(),
            ..Default::default()
        }
    }

    /// A new event of this session with the next sequence number.
    pub fn event(&self, kind: AuditKind) -> AuditEvent {
        AuditEvent {
            id: event_id(),
            session_id: self.id.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time: Utc::now(),
            kind,
            connection: self.connection.clone(),
            principal: Some(self.principal.clone()),
            client_addr: self.client_addr.clone(),
            client_app: self.client_app.clone(),
            ..Default::default()
        }
    }
}

/// How a held command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Approved: run it.
    Approved {
        /// Approval id.
        id: String,
        /// Approved at once by an earlier approval that covers the same
        /// statement shape or command for a while (never held).
        covered: bool,
    },
    /// Denied by an approver.
    Denied {
        /// Approval id.
        id: String,
        /// The approver's reason.
        reason: String,
    },
    /// Nobody decided in time.
    Expired {
        /// Approval id.
        id: String,
    },
    /// The control service could not be asked (fail closed: refuse).
    Unavailable(String),
}

/// Calls `on_abandon` with the approval id when dropped while armed: a hold
/// whose future was dropped before a decision.
struct Abandon<F: FnOnce(Option<String>)> {
    on_abandon: Option<F>,
    id: Option<String>,
}

impl<F: FnOnce(Option<String>)> Drop for Abandon<F> {
    fn drop(&mut self) {
        if let Some(f) = self.on_abandon.take() {
            tracing::info!(approval = ?self.id, "the client went away while its command was held; refused");
            f(self.id.take());
        }
    }
}

/// What a caller said about why it acts: free-text reasoning and a W3C
/// `traceparent`, however its protocol carries them.
#[derive(Debug, Default, Clone)]
pub struct CallerTrace {
    /// The reasoning text.
    pub reasoning: Option<String>,
    /// The W3C `traceparent` value.
    pub traceparent: Option<String>,
}

impl CallerTrace {
    /// Whether non-blank reasoning was given.
    pub fn has_reasoning(&self) -> bool {
        self.reasoning
            .as_deref()
            .is_some_and(|r| !r.trim().is_empty())
    }

    /// The trace as recorded (`None` when the caller gave neither part).
    pub fn reasoning_trace(&self) -> Option<ReasoningTrace> {
        let trace_id = self
            .traceparent
            .as_deref()
            .and_then(|t| t.split('-').nth(1))
            .filter(|t| ReasoningTrace::valid_trace_id(t))
            .unwrap_or("")
            .to_string();
        if self.reasoning.is_none() && trace_id.is_empty() {
            return None;
        }
        Some(ReasoningTrace {
            trace_id,
            reasoning: self.reasoning.clone().unwrap_or_default(),
            ..Default::default()
        })
    }
}

/// Why a held command whose client went away was refused.
pub const ABANDONED: &str =
    "the client went away while the command waited for approval; it was not run";

/// The decision a held command ends with when its client went away while
/// it waited (`held` is the review decision that held it), and the
/// approval's outcome (`abandoned`) and id, if one was made, for the audit.
pub fn abandoned(held: Decision, id: Option<String>) -> (Decision, Option<(&'static str, String)>) {
    (
        Decision::deny(held.rule, ABANDONED),
        id.map(|id| ("abandoned", id)),
    )
}

impl ApprovalOutcome {
    /// The decision a held command ends with (`held` is the review decision
    /// that held it), and the approval's outcome and id for the audit event.
    pub fn into_decision(self, held: Decision) -> (Decision, Option<(&'static str, String)>) {
        match self {
            ApprovalOutcome::Approved { id, covered } => (
                Decision {
                    effect: Effect::Allow,
                    ..held
                },
                Some((if covered { "covered" } else { "approved" }, id)),
            ),
            ApprovalOutcome::Denied { id, reason } => (
                Decision::deny(
                    held.rule,
                    if reason.is_empty() {
                        "an approver denied this command".to_string()
                    } else {
                        format!("an approver denied this command: {reason}")
                    },
                ),
                Some(("denied", id)),
            ),
            ApprovalOutcome::Expired { id } => (
                Decision::deny(held.rule, "nobody approved this command in time"),
                Some(("expired", id)),
            ),
            ApprovalOutcome::Unavailable(e) => (
                Decision::deny(held.rule, format!("approval unavailable: {e}")),
                None,
            ),
        }
    }
}

/// An open session shared by everything that serves it (channels, requests,
/// streams); `session_end` is recorded when the last holder lets go, so it
/// comes after every event of the session.
pub struct LiveSession {
    session: OpenSession,
    sidecar: Arc<Sidecar>,
}

impl LiveSession {
    /// Wraps a session opened on `sidecar`.
    pub fn new(session: OpenSession, sidecar: Arc<Sidecar>) -> LiveSession {
        LiveSession { session, sidecar }
    }
}

impl std::fmt::Debug for LiveSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSession")
            .field("id", &self.session.id)
            .finish()
    }
}

impl std::ops::Deref for LiveSession {
    type Target = OpenSession;
    fn deref(&self) -> &OpenSession {
        &self.session
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        let reason = self
            .session
            .guard
            .end_reason()
            .map(|r| r.as_str().to_string())
            .unwrap_or_else(|| "client_closed".into());
        let mut e = self.session.event(AuditKind::SessionEnd);
        e.end_reason = reason;
        if let Err(err) = self.sidecar.record(e) {
            tracing::error!(error = %err, "cannot record session end");
        }
    }
}

impl Sidecar {
    /// Starts the runtime: loads the cached bundle and the spool, discovers
    /// the identity provider, and spawns the bundle watch, the audit
    /// reporter, the session sweeper and the admin endpoints.
    pub async fn start(cfg: SidecarConfig) -> Result<Arc<Sidecar>, String> {
        let token = cfg.token()?;
        let client = ControlClient::new(&cfg.control, &token, cfg.control_ca_cert.as_deref())?;
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| format!("cannot create state dir {}: {e}", cfg.state_dir.display()))?;
        let bundles = BundleStore::open(&cfg.state_dir, &cfg.connection);
        let spool = Spool::open(&cfg.state_dir.join("spool"), cfg.spool_max_bytes)
            .map_err(|e| format!("cannot open the audit spool: {e}"))?;
        let mut icfg =
            wicket_identity::Config::new(cfg.oidc_issuer.clone(), cfg.oidc_audience.clone());
        icfg.groups_claim = cfg.groups_claim.clone();
        icfg.agent_rules = cfg
            .agent_rules
            .iter()
            .map(|r| r.parse())
            .collect::<Result<_, _>>()?;
        let validator = Validator::discover_with_retry(icfg, 16).await?;
        let admin = tokio::net::TcpListener::bind(cfg.admin_listen)
            .await
            .map_err(|e| {
                format!(
                    "cannot listen on {} (admin endpoints): {e}",
                    cfg.admin_listen
                )
            })?;
        let sc = Arc::new(Sidecar {
            client: client.clone(),
            bundles: bundles.clone(),
            spool: spool.clone(),
            sessions: Registry::default(),
            metrics: Metrics::default(),
            validator,
            draining: AtomicBool::new(false),
            cfg,
        });
        let instance = format!("{}-{}", sc.cfg.connection, std::process::id());
        tokio::spawn(
            bundles
                .clone()
                .watch(client.clone(), sc.cfg.connection.clone(), instance),
        );
        tokio::spawn(spool.clone().report_forever(client));
        tokio::spawn(spool.sync_forever());
        tokio::spawn(
            sc.sessions
                .clone()
                .enforce_forever(bundles, Duration::from_secs(sc.cfg.token_grace_seconds)),
        );
        tokio::spawn(http::serve(sc.clone(), admin));
        Ok(sc)
    }

    /// Why the sidecar is not ready, if it is not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::Relaxed) {
            Some("draining")
        } else if self.bundles.current().is_none() {
            Some("no policy bundle yet")
        } else {
            None
        }
    }

    /// Updates gauges before a scrape.
    pub fn refresh_gauges(&self) {
        self.metrics.sessions_active.set(self.sessions.len() as i64);
        self.metrics.spool_events.set(self.spool.unacked() as i64);
        self.metrics.spool_bytes.set(self.spool.bytes() as i64);
        self.metrics.bundle_version.set(
            self.bundles
                .current()
                .map(|b| b.version as i64)
                .unwrap_or(0),
        );
    }

    /// Validates a caller's token. Failures are counted and audited (never the token).
    pub async fn authenticate(
        &self,
        token: &str,
        client_addr: &str,
    ) -> Result<Identity, AuthError> {
        let result = self.validator.validate(token).await;
        if let Err(e) = &result {
            let reason = format!("{e:?}");
            let reason = reason.split('(').next().unwrap_or("").to_lowercase();
            self.metrics
                .auth_failures
                .get_or_create(&metrics::labels(&[("reason", &reason)]))
                .inc();
            let event = AuditEvent {
                id: uuid::Uuid::now_v7().to_string(),
                session_id: format!("auth-{}", uuid::Uuid::now_v7()),
                seq: 1,
                time: Utc::now(),
                kind: AuditKind::AuthFailure,
                connection: self.cfg.connection.clone(),
                client_addr: client_addr.to_string(),
                details: [("reason".to_string(), e.to_string())].into(),
                ..Default::default()
            };
            if let Err(e) = self.spool.append(event) {
                tracing::error!(error = %e, "cannot record an authentication failure");
            }
        }
        result
    }

    /// Checks the grant and opens a session (recording `session_start`).
    pub fn open_session(
        &self,
        identity: &Identity,
        client_addr: &str,
        client_app: &str,
    ) -> Result<OpenSession, Decision> {
        let refuse = |d: Decision| {
            self.metrics
                .sessions
                .get_or_create(&metrics::labels(&[("outcome", "refused")]))
                .inc();
            Err(d)
        };
        if self.draining.load(Ordering::Relaxed) {
            return refuse(Decision::deny("draining", EndReason::Shutdown.message()));
        }
        let Some(bundle) = self.bundles.current() else {
            return refuse(Decision::deny(
                "no-policy",
                "this gate has no policy yet; try again once it reached the control service",
            ));
        };
        let p = &identity.principal;
        if bundle.is_revoked(&p.issuer, &p.subject) {
            return refuse(Decision::deny(
                "revoked",
                format!("{} has been revoked", p.label()),
            ));
        }
        let (grant, grant_expires) =
            match bundle
                .policy
                .authorize_session(p, &self.cfg.connection, Utc::now())
            {
                SessionDecision::Allowed { grant, expires } => (grant, expires),
                SessionDecision::Denied(d) => return refuse(d),
            };
        let id = uuid::Uuid::now_v7().to_string();
        let guard =
            self.sessions
                .register(id.clone(), p.clone(), identity.expires_at, grant_expires);
        let session = OpenSession {
            id,
            principal: p.clone(),
            grant,
            token_expires: identity.expires_at,
            guard,
            client_addr: client_addr.to_string(),
            client_app: client_app.to_string(),
            connection: self.cfg.connection.clone(),
            seq: AtomicU64::new(0),
            memo: memo::DecisionMemo::default(),
        };
        let mut start = session.event(AuditKind::SessionStart);
        start.details.insert("grant".into(), session.grant.clone());
        if let Err(e) = self.spool.append(start) {
            return refuse(Decision::deny("audit-unavailable", e.to_string()));
        }
        self.metrics
            .sessions
            .get_or_create(&metrics::labels(&[("outcome", "opened")]))
            .inc();
        Ok(session)
    }

    /// What policy says of `command` for this session, without counting
    /// it as a command or remembering it: for a gate's own questions to
    /// policy (may this caller see Secret values?), not for commands.
    pub fn evaluate(
        &self,
        session: &OpenSession,
        command: &Command,
        has_reasoning: bool,
    ) -> Decision {
        let bundle = match self.bundle_for(session) {
            Ok(b) => b,
            Err(d) => return d,
        };
        self.ask(&bundle, session, command, has_reasoning, Utc::now())
    }

    /// The current bundle, unless there is none or the session's principal
    /// has been revoked (then the refusal).
    fn bundle_for(&self, session: &OpenSession) -> Result<Arc<Bundle>, Decision> {
        let bundle = self
            .bundles
            .current()
            .ok_or_else(|| Decision::deny("no-policy", "this gate has no policy"))?;
        if bundle.is_revoked(&session.principal.issuer, &session.principal.subject) {
            return Err(Decision::deny("revoked", "your access was revoked"));
        }
        Ok(bundle)
    }

    /// The policy's decision, uncounted and unremembered.
    fn ask(
        &self,
        bundle: &Bundle,
        session: &OpenSession,
        command: &Command,
        has_reasoning: bool,
        now: DateTime<Utc>,
    ) -> Decision {
        bundle.policy.decide(&Request {
            principal: &session.principal,
            connection: &self.cfg.connection,
            command,
            has_reasoning,
            now,
        })
    }

    /// Decides a command locally.
    pub fn decide(
        &self,
        session: &OpenSession,
        command: &Command,
        has_reasoning: bool,
    ) -> Decision {
        let bundle = match self.bundle_for(session) {
            Ok(b) => b,
            Err(d) => return d,
        };
        let now = Utc::now();
        let (mut d, counter) = match session.memo.get(&bundle, command, has_reasoning, now) {
            Some(hit) => hit,
            None => {
                let d = self.ask(&bundle, session, command, has_reasoning, now);
                let counter = self.commands_counter(&d);
                session
                    .memo
                    .put(&bundle, command, has_reasoning, now, &d, &counter);
                (d, counter)
            }
        };
        let refuse_full = bundle
            .policy
            .connection(&self.cfg.connection)
            .is_none_or(|c| c.recording.refuse_when_spool_full);
        if d.effect != Effect::Deny && refuse_full && self.spool.is_full() {
            d = Decision::deny(
                "audit-spool-full",
                "the audit spool is full; commands are refused until it drains",
            );
            self.commands_counter(&d).inc();
        } else {
            counter.inc();
        }
        d
    }

    fn commands_counter(&self, d: &Decision) -> prometheus_client::metrics::counter::Counter {
        self.metrics
            .commands
            .get_or_create(&metrics::labels(&[
                ("effect", d.effect.as_str()),
                ("rule", &d.rule),
            ]))
            .clone()
    }

    /// Writes an audit event to the spool (and from there to the control service).
    pub fn record(&self, event: AuditEvent) -> Result<(), SpoolError> {
        self.spool.append(event)
    }

    /// Records a command's decision event; an allowed command whose record
    /// cannot be written is refused (nothing runs unaudited).
    pub fn record_decision(&self, event: AuditEvent, d: Decision) -> Decision {
        match self.record(event) {
            Ok(()) => d,
            Err(err) => {
                tracing::error!(error = %err, "cannot record a command");
                if d.effect == Effect::Allow {
                    Decision::deny(
                        "audit-unavailable",
                        format!("the audit trail is unavailable: {err}"),
                    )
                } else {
                    d
                }
            }
        }
    }

    /// Records a command's decision as its `command` event: the command,
    /// the decision, the caller's reasoning and trace, an approval's outcome
    /// and id, and the gate's `details`. Returns the decision (an allowed
    /// command whose record cannot be written is refused) and the event's id.
    pub fn record_command(
        &self,
        session: &OpenSession,
        cmd: Command,
        d: Decision,
        trace: &CallerTrace,
        approval: Option<(&'static str, String)>,
        details: impl IntoIterator<Item = (String, String)>,
    ) -> (Decision, String) {
        let mut e = session.event(AuditKind::Command);
        e.command = Some(cmd);
        e.decision = Some(d.clone());
        e.reasoning = trace.reasoning_trace();
        e.traceparent = trace.traceparent.clone().unwrap_or_default();
        if let Some((outcome, id)) = approval {
            e.details.insert("approval".into(), id);
            e.details.insert("approval_outcome".into(), outcome.into());
        }
        e.details.extend(details);
        let id = e.id.clone();
        (self.record_decision(e, d), id)
    }

    /// Decides a command, holding it for approval when policy says so
    /// (`on_pending` gets the approval id, once it exists, and the decision
    /// that held it), and records it ([`Sidecar::record_command`]).
    pub async fn decide_and_record(
        &self,
        session: &OpenSession,
        cmd: Command,
        trace: &CallerTrace,
        on_pending: impl FnOnce(&str, &Decision),
        details: impl IntoIterator<Item = (String, String)> + Clone,
    ) -> (Decision, String) {
        let mut d = self.decide(session, &cmd, trace.has_reasoning());
        let mut approval = None;
        if d.effect == Effect::Review {
            let reasoning = trace.reasoning_trace();
            let held = d.clone();
            let outcome = self
                .request_approval(
                    session,
                    &cmd,
                    &d,
                    reasoning.as_ref(),
                    |id| on_pending(id, &d),
                    // Dropped while held (the client went away): recorded
                    // as refused, never run.
                    |id| {
                        let (d, approval) = abandoned(held, id);
                        self.record_command(
                            session,
                            cmd.clone(),
                            d,
                            trace,
                            approval,
                            details.clone(),
                        );
                    },
                )
                .await;
            (d, approval) = outcome.into_decision(d);
        }
        self.record_command(session, cmd, d, trace, approval, details)
    }

    /// Holds a command for approval: `on_pending` is called with the approval
    /// id once it exists; resolves when it is decided, expires, or cannot be asked.
    /// If the hold is dropped before that (the client went away: its
    /// connection's future is dropped, or the gate stops waiting for it),
    /// `on_abandon` is called with the approval id, if one was made, so the
    /// gate can record the command as refused; the control service then
    /// withdraws the request, so nobody approves a command no one waits for.
    pub async fn request_approval(
        &self,
        session: &OpenSession,
        command: &Command,
        decision: &Decision,
        reasoning: Option<&ReasoningTrace>,
        on_pending: impl FnOnce(&str),
        on_abandon: impl FnOnce(Option<String>),
    ) -> ApprovalOutcome {
        // Armed until the hold ends here; dropped with it otherwise.
        let mut guard = Abandon {
            on_abandon: Some(on_abandon),
            id: None,
        };
        let timeout = decision
            .review
            .as_ref()
            .map(|r| r.timeout_seconds)
            .unwrap_or(300);
        let req = self.client.req(v1::ApprovalRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            session_id: session.id.clone(),
            connection: self.cfg.connection.clone(),
            principal: Some((&session.principal).into()),
            command: Some(command.into()),
            decision: Some(decision.into()),
            reasoning: reasoning.map(Into::into),
        });
        let deadline = Duration::from_secs(u64::from(timeout) + 5);
        let wait = async {
            let mut stream = ApprovalGateServiceClient::new(self.client.channel.clone())
                .request_approval(req)
                .await
                .map_err(|s| format!("cannot request approval: {}", s.message()))?
                .into_inner();
            let mut on_pending = Some(on_pending);
            while let Some(update) = stream.next().await {
                let u = update.map_err(|s| format!("approval stream failed: {}", s.message()))?;
                match v1::ApprovalState::try_from(u.state) {
                    Ok(v1::ApprovalState::Pending) => {
                        if let Some(f) = on_pending.take() {
                            guard.id = Some(u.approval_id.clone());
                            f(&u.approval_id);
                        }
                    }
                    Ok(v1::ApprovalState::Approved) => {
                        // Approved before it was ever pending: an earlier
                        // approval covers it.
                        return Ok(ApprovalOutcome::Approved {
                            id: u.approval_id,
                            covered: on_pending.is_some(),
                        });
                    }
                    Ok(v1::ApprovalState::Denied) => {
                        return Ok(ApprovalOutcome::Denied {
                            id: u.approval_id,
                            reason: u.reason,
                        });
                    }
                    _ => return Ok(ApprovalOutcome::Expired { id: u.approval_id }),
                }
            }
            Err("the approval stream ended before a decision".to_string())
        };
        let outcome = match tokio::time::timeout(deadline, wait).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => ApprovalOutcome::Unavailable(e),
            Err(_) => ApprovalOutcome::Unavailable("no decision before the hold timeout".into()),
        };
        guard.on_abandon = None;
        outcome
    }

    /// Stops accepting sessions, ends live ones after `drain_seconds`, and
    /// waits (bounded) for the spool to reach the control service.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.cfg.drain();
        while !self.sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.sessions.end_all(EndReason::Shutdown);
        let flush = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.spool.unacked() > 0 && tokio::time::Instant::now() < flush {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.spool.sync();
    }

    /// Whether the sidecar is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod id_tests {
    #[test]
    fn event_ids_are_unique_uuid_v7() {
        let ids: Vec<String> = (0..100_000).map(|_| super::event_id()).collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        let u = uuid::Uuid::parse_str(&ids[0]).unwrap();
        assert_eq!(u.get_version_num(), 7);
    }
}
