//! Shared state of the control service: the compiled policy, change
//! notification for bundle watchers, approval fan-out, and the news other
//! replicas on the same database announce.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{broadcast, watch};
use tonic::Status;
use wicket_core::{Approval, Principal, Vote};
use wicket_policy::{Policy, PolicyErrors};
use wicket_proto::convert;
use wicket_proto::v1;
use wicket_store::{Change, Store, StoreError};

use crate::auth::Authenticator;

/// Why a held command's approval was withdrawn.
const WITHDRAWN: &str =
    "withdrawn: the client went away before a decision, and the command was not run";

/// The policy in force.
pub struct Current {
    /// Stored version.
    pub version: u64,
    /// Compiled form.
    pub policy: Policy,
    /// Source text as applied.
    pub document: String,
}

/// Everything the services share.
pub struct Control {
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Caller checks.
    pub auth: Authenticator,
    policy: RwLock<Option<Arc<Current>>>,
    changes: watch::Sender<u64>,
    approvals: broadcast::Sender<Approval>,
    /// The SSH user CA.
    pub ssh_ca: crate::ssh_ca::SshCa,
    /// Signs audit seals and roots.
    pub notary: crate::notary::Notary,
    /// Where terminal recordings go.
    pub recordings: crate::recordings::Recordings,
    /// Ticks when audit events were stored (the exporters follow it).
    pub appended: watch::Sender<u64>,
    /// Longest SSH certificate lifetime, in seconds.
    pub ssh_cert_max_seconds: u64,
    notifier: crate::notify::Notifier,
}

/// A policy connection on the wire.
pub fn connection(spec: &wicket_policy::ConnectionSpec) -> v1::Connection {
    v1::Connection {
        name: spec.name.clone(),
        protocol: convert::protocol(spec.protocol) as i32,
        labels: spec.labels.clone().into_iter().collect(),
        upstream: spec.upstream.clone(),
        description: spec.description.clone(),
    }
}

/// A stored revocation on the wire.
pub fn revocation(r: &wicket_store::Revocation) -> v1::Revocation {
    v1::Revocation {
        issuer: r.issuer.clone(),
        subject: r.subject.clone(),
        reason: r.reason.clone(),
        revoked_at: Some(convert::ts(r.revoked_at)),
        until: r.until.map(convert::ts),
    }
}

/// Maps a storage error to a status, logging the detail.
pub fn storage(e: StoreError) -> Status {
    tracing::error!(error = %e, "storage error");
    Status::unavailable("storage unavailable; try again")
}

impl Control {
    /// Loads the current policy from the store.
    pub async fn new(
        store: Arc<dyn Store>,
        auth: Authenticator,
        ssh_ca: crate::ssh_ca::SshCa,
        notary: crate::notary::Notary,
        recordings: crate::recordings::Recordings,
        ssh_cert_max_seconds: u64,
        notifier: crate::notify::Notifier,
    ) -> Result<Arc<Control>, String> {
        let (changes, _) = watch::channel(Utc::now().timestamp_millis() as u64);
        let (approvals, _) = broadcast::channel(1024);
        let control = Arc::new(Control {
            store,
            auth,
            policy: RwLock::new(None),
            changes,
            approvals,
            ssh_ca,
            notary,
            recordings,
            appended: watch::channel(0).0,
            ssh_cert_max_seconds,
            notifier,
        });
        control.reload_policy().await?;
        Ok(control)
    }

    /// Deletes the ended sessions whose connection's retention
    /// (`recording.retention_days`) has run out and that are not on legal
    /// hold, with their recordings; each leaves a signed deletion record.
    pub async fn apply_retention(&self) -> Result<Vec<String>, StoreError> {
        let Some(current) = self.current() else {
            return Ok(Vec::new());
        };
        let mut deleted = Vec::new();
        for c in &current.policy.document().connections {
            let Some(days) = c.recording.retention_days else {
                continue;
            };
            let before = Utc::now() - chrono::Duration::days(i64::from(days));
            let reason = format!("retention: {days} days on {}", c.name);
            loop {
                let batch = self.store.expired_sessions(&c.name, before, 500).await?;
                let mut progressed = false;
                for id in &batch {
                    if self.notary.delete(self.store.as_ref(), id, &reason).await? {
                        if let Err(e) = self.recordings.delete_session(id).await {
                            tracing::warn!(session = %id, error = %e, "cannot remove a deleted session's recording chunks");
                        }
                        tracing::info!(session = %id, connection = %c.name, days, "session deleted by retention");
                        deleted.push(id.clone());
                        progressed = true;
                    }
                }
                if batch.len() < 500 || !progressed {
                    break;
                }
            }
        }
        Ok(deleted)
    }

    /// Applies retention every `interval`.
    pub async fn retention(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.apply_retention().await {
                tracing::warn!(error = %e, "retention did not run; retrying at the next interval");
            }
        }
    }

    /// Signs an audit root every `interval` over the sessions whose chain
    /// grew since the last one (and once at start-up for what an earlier
    /// run left).
    pub async fn audit_roots(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.notary.make_roots(self.store.as_ref()).await {
                tracing::warn!(error = %e, "cannot sign an audit root; retrying at the next interval");
            }
        }
    }

    /// The policy in force, if any was applied.
    pub fn current(&self) -> Option<Arc<Current>> {
        self.policy.read().expect("policy lock").clone()
    }

    /// Reloads the policy if the store holds a newer version (another replica
    /// may have applied it). Returns whether it changed.
    pub async fn reload_policy(&self) -> Result<bool, String> {
        let stored = self
            .store
            .get_policy(None)
            .await
            .map_err(|e| format!("cannot read policy: {e}"))?;
        let Some(stored) = stored else {
            return Ok(false);
        };
        if self.current().is_some_and(|c| c.version >= stored.version) {
            return Ok(false);
        }
        let policy = wicket_policy::parse_and_compile(&stored.document, "stored policy")
            .map_err(|e| format!("stored policy v{} does not compile: {e}", stored.version))?;
        *self.policy.write().expect("policy lock") = Some(Arc::new(Current {
            version: stored.version,
            policy,
            document: stored.document,
        }));
        self.notify();
        Ok(true)
    }

    /// Validates, stores and activates a policy document.
    pub async fn apply_policy(
        &self,
        document: &str,
        source_name: &str,
        applied_by: &str,
    ) -> Result<Result<(u64, String, bool), PolicyErrors>, Status> {
        let policy = match wicket_policy::parse_and_compile(document, source_name) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let sha = policy.sha256().to_string();
        let (version, changed) = self
            .store
            .put_policy(document, &sha, applied_by)
            .await
            .map_err(storage)?;
        if changed {
            *self.policy.write().expect("policy lock") = Some(Arc::new(Current {
                version: version.version,
                policy,
                document: document.to_string(),
            }));
            tracing::info!(version = version.version, sha256 = %sha, by = applied_by, "policy applied");
            self.bundle_changed().await;
        }
        Ok(Ok((version.version, sha, changed)))
    }

    /// Tells bundle watchers that something they carry changed.
    pub fn notify(&self) {
        self.changes.send_modify(|g| {
            *g = (*g + 1).max(Utc::now().timestamp_millis() as u64);
        });
    }

    /// Subscribes to change notifications (the value is the bundle generation).
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Subscribes to approval changes.
    pub fn subscribe_approvals(&self) -> broadcast::Receiver<Approval> {
        self.approvals.subscribe()
    }

    /// Publishes an approval change to this replica's waiters.
    pub fn publish_approval(&self, a: &Approval) {
        let _ = self.approvals.send(a.clone());
    }

    /// An approval this replica created or changed: its own waiters hear
    /// now, the other replicas' through the store's change feed, and
    /// approvers through the notification hooks (queued, never waited on).
    pub async fn approval_changed(&self, a: &Approval) {
        self.publish_approval(a);
        self.notifier.approval(a);
        self.announce(Change::Approval(a.id.clone())).await;
    }

    /// Something bundles carry changed here (policy, revocations,
    /// terminations): this replica's bundle watchers and the others' hear.
    pub async fn bundle_changed(&self) {
        self.notify();
        self.announce(Change::Bundle).await;
    }

    /// Announces a change to the other replicas. A failure is logged, not
    /// returned: the change is stored, and the others pick it up at their
    /// next poll.
    async fn announce(&self, change: Change) {
        if let Err(e) = self.store.announce(&change).await {
            tracing::warn!(error = %e, ?change, "could not announce a change to other replicas");
        }
    }

    /// Follows the changes other replicas announce, for as long as the
    /// service runs (returns at once where the store has no feed).
    pub async fn follow_replicas(self: Arc<Self>) {
        let mut feed = loop {
            match self.store.follow().await {
                Ok(Some(feed)) => break feed,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow other replicas yet; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        tracing::info!("following changes announced by other replicas");
        while let Some(change) = feed.recv().await {
            match change {
                Change::Approval(id) => match self.store.get_approval(&id).await {
                    Ok(Some(a)) => self.publish_approval(&a),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot read an announced approval"),
                },
                Change::Bundle => self.resync_bundles().await,
                Change::Resync => {
                    self.resync_bundles().await;
                    if let Ok(pending) = self
                        .store
                        .list_approvals(Some(wicket_core::ApprovalState::Pending), 1000)
                        .await
                    {
                        for a in &pending {
                            self.publish_approval(a);
                        }
                    }
                }
            }
        }
    }

    /// Picks up another replica's policy, revocations and terminations.
    async fn resync_bundles(&self) {
        if let Err(e) = self.reload_policy().await {
            tracing::warn!(error = %e, "policy reload failed");
        }
        self.notify();
    }

    /// The bundle for one connection, as of now.
    pub async fn bundle(&self, connection: &str) -> Result<v1::PolicyBundle, Status> {
        let generation = *self.changes.borrow();
        let current = self
            .current()
            .ok_or_else(|| Status::failed_precondition("no policy has been applied yet"))?;
        let mut doc = current.policy.bundle_for(connection).ok_or_else(|| {
            Status::not_found(format!(
                "connection `{connection}` is not defined in the policy"
            ))
        })?;
        let now = Utc::now();
        // Just-in-time grants in force, for exactly their principal.
        for g in self
            .store
            .list_access_grants(Some(connection), now)
            .await
            .map_err(storage)?
        {
            doc.grants.push(wicket_policy::Grant {
                id: g.id,
                description: format!("just-in-time access ({}): {}", g.approval_id, g.reason),
                connections: vec![connection.to_string()],
                labels: Default::default(),
                principals: vec![g.subject],
                groups: Vec::new(),
                kinds: Vec::new(),
                expires: Some(g.until),
                issuer: Some(g.issuer),
            });
        }
        let spec = &doc.connections[0];
        let json = serde_json::to_vec(&doc).map_err(|e| Status::internal(e.to_string()))?;
        let sha = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &json));
        let revocations = self
            .store
            .list_revocations(now)
            .await
            .map_err(storage)?
            .iter()
            .map(revocation)
            .collect();
        let terminated = self.store.terminating_sessions().await.map_err(storage)?;
        Ok(v1::PolicyBundle {
            version: generation,
            connection: Some(self::connection(spec)),
            policy_json: json,
            policy_sha256: sha,
            revocations,
            terminated_sessions: terminated,
            issued_at: Some(convert::ts(now)),
            ssh_user_cas: vec![self.ssh_ca.public().to_string()],
        })
    }

    /// Records a vote, retrying on concurrent updates. `reuse_seconds`: how
    /// long a yes lets the approval cover the same fingerprint again (at
    /// most what the rule allows).
    pub async fn vote(
        &self,
        id: &str,
        voter: &Principal,
        approve: bool,
        comment: &str,
        reuse_seconds: u32,
    ) -> Result<Approval, Status> {
        for _ in 0..8 {
            let mut a = self
                .store
                .get_approval(id)
                .await
                .map_err(storage)?
                .ok_or_else(|| Status::not_found(format!("no approval `{id}`")))?;
            let allowed = a
                .request
                .decision
                .review
                .as_ref()
                .map_or(0, |r| r.reuse_seconds);
            if reuse_seconds > allowed {
                return Err(Status::invalid_argument(if allowed == 0 {
                    format!(
                        "rule `{}` lets an approval cover one execution only",
                        a.request.decision.rule
                    )
                } else {
                    format!(
                        "rule `{}` lets an approval cover repeats for at most {allowed} s",
                        a.request.decision.rule
                    )
                }));
            }
            let now = Utc::now();
            let vote = Vote {
                approver: voter.label().to_string(),
                approver_subject: voter.subject.clone(),
                approver_issuer: voter.issuer.clone(),
                approver_groups: voter.groups.clone(),
                approve,
                comment: comment.to_string(),
                at: now,
                reuse_seconds,
            };
            let result = a.cast(vote, now);
            if a.state == wicket_core::ApprovalState::Expired || result.is_ok() {
                match self.store.update_approval(&mut a).await {
                    Ok(()) => {
                        // An approved access request becomes its grant
                        // before anyone hears of the approval.
                        if a.state == wicket_core::ApprovalState::Approved
                            && let Some(secs) = a.request.access_seconds
                        {
                            self.grant_access(&a, secs, now).await?;
                        }
                        self.approval_changed(&a).await
                    }
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(storage(e)),
                }
            }
            return match result {
                Ok(_) => {
                    tracing::info!(
                        approval = id,
                        by = voter.label(),
                        approve,
                        state = a.state.as_str(),
                        "vote recorded"
                    );
                    Ok(a)
                }
                Err(msg) => Err(Status::failed_precondition(msg)),
            };
        }
        Err(Status::aborted("too many concurrent votes; try again"))
    }

    /// Stores a new approval request (or finds the one with its request id)
    /// and follows it: the returned channel gets its state now and at every
    /// change until it is final (decided here or on another replica, or
    /// expired at its time). Dropping the receiver stops following, and with
    /// `withdraw_if_abandoned` also withdraws the approval if still pending.
    pub async fn hold(
        self: &Arc<Self>,
        approval: Approval,
        withdraw_if_abandoned: bool,
    ) -> Result<tokio::sync::mpsc::Receiver<Approval>, Status> {
        // Subscribe before storing so no decision can slip between the two.
        let mut updates = self.subscribe_approvals();
        let stored = self
            .store
            .create_approval(&approval)
            .await
            .map_err(storage)?;
        if stored.id == approval.id {
            tracing::info!(approval = %stored.id, connection = %stored.request.connection,
                rule = %stored.request.decision.rule, "approval requested");
            self.approval_changed(&stored).await;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let control = self.clone();
        tokio::spawn(async move {
            let id = stored.id.clone();
            let mut last = stored;
            // Whether the requester stopped waiting before the end.
            let gone = 'follow: {
                if tx.send(last.clone()).await.is_err() {
                    break 'follow true;
                }
                while !last.state.is_final() {
                    let until = (last.expires_at - Utc::now()).to_std().unwrap_or_default();
                    tokio::select! {
                        u = updates.recv() => match u {
                            Ok(a) if a.id == id && a.rev > last.rev => last = a,
                            Ok(_) => continue,
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                if let Ok(Some(a)) = control.store.get_approval(&id).await { last = a }
                            }
                            Err(_) => break,
                        },
                        _ = tokio::time::sleep(until) => {
                            match control.expire(&id).await {
                                Ok(Some(a)) => last = a,
                                _ => break,
                            }
                        }
                        // Decisions taken on another replica whose news was lost.
                        _ = tokio::time::sleep(crate::sidecar::RESYNC) => {
                            match control.store.get_approval(&id).await {
                                Ok(Some(a)) if a.rev != last.rev => last = a,
                                _ => continue,
                            }
                        }
                        _ = tx.closed() => break 'follow true,
                    }
                    if tx.send(last.clone()).await.is_err() {
                        break 'follow true;
                    }
                }
                false
            };
            // The requester stopped waiting while it was pending: a gate
            // whose client went away never runs the command, so approvers
            // are no longer asked.
            if gone && withdraw_if_abandoned && !last.state.is_final() {
                let _ = control.withdraw(&id, WITHDRAWN).await;
            }
        });
        Ok(rx)
    }

    /// Stores the grant of an approved access request and sends it to the
    /// connection's sidecars.
    async fn grant_access(
        &self,
        a: &Approval,
        secs: u32,
        now: chrono::DateTime<Utc>,
    ) -> Result<(), Status> {
        let r = &a.request;
        let grant = wicket_store::AccessGrant {
            id: format!("jit-{}", a.id),
            approval_id: a.id.clone(),
            issuer: r.principal.issuer.clone(),
            subject: r.principal.subject.clone(),
            label: r.principal.label().to_string(),
            connection: r.connection.clone(),
            reason: r
                .reasoning
                .as_ref()
                .map(|t| t.reasoning.clone())
                .unwrap_or_default(),
            granted_at: now,
            until: now + chrono::Duration::seconds(i64::from(secs)),
        };
        self.store.put_access_grant(&grant).await.map_err(storage)?;
        tracing::info!(grant = %grant.id, principal = %grant.label, connection = %grant.connection,
            until = %grant.until.to_rfc3339(), "just-in-time access granted");
        self.bundle_changed().await;
        Ok(())
    }

    /// Withdraws a pending approval whose requester stopped waiting
    /// (recorded as expired with `reason`); `None` when there is none.
    pub async fn withdraw(&self, id: &str, reason: &str) -> Result<Option<Approval>, Status> {
        self.change_approval(id, |a| {
            let withdrawn = a.withdraw(reason);
            if withdrawn {
                tracing::info!(approval = %id, "approval withdrawn: {reason}");
            }
            withdrawn
        })
        .await
    }

    /// Marks an approval expired if due, saving and publishing the change.
    pub async fn expire(&self, id: &str) -> Result<Option<Approval>, Status> {
        self.change_approval(id, |a| a.expire_if_due(Utc::now()))
            .await
    }

    /// Applies `change` to the stored approval `id` and, when it says it
    /// changed something, saves and publishes it, retrying on a concurrent
    /// update; returns the approval as it now is (`None`: no such approval).
    async fn change_approval(
        &self,
        id: &str,
        change: impl Fn(&mut Approval) -> bool,
    ) -> Result<Option<Approval>, Status> {
        for _ in 0..8 {
            let Some(mut a) = self.store.get_approval(id).await.map_err(storage)? else {
                return Ok(None);
            };
            if !change(&mut a) {
                return Ok(Some(a));
            }
            match self.store.update_approval(&mut a).await {
                Ok(()) => {
                    self.approval_changed(&a).await;
                    return Ok(Some(a));
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(storage(e)),
            }
        }
        Err(Status::aborted("approval keeps changing"))
    }

    /// Background upkeep: picks up policy applied by other replicas and
    /// expires approvals whose waiting sidecar went away.
    pub async fn upkeep(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Err(e) = self.reload_policy().await {
                tracing::warn!(error = %e, "policy reload failed");
            }
            match self
                .store
                .list_approvals(Some(wicket_core::ApprovalState::Pending), 1000)
                .await
            {
                Ok(pending) => {
                    for a in pending.iter().filter(|a| a.expires_at <= Utc::now()) {
                        let _ = self.expire(&a.id).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "approval sweep failed"),
            }
        }
    }
}
