//! The policy bundle of this sidecar's connection: watched from the control
//! service, kept in memory and on disk, so a sidecar restarted while the
//! control service is down still enforces the last good policy.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use wicket_policy::{Policy, PolicyDocument};
use wicket_proto::v1;
use wicket_proto::v1::bundle_service_client::BundleServiceClient;

use crate::client::{Backoff, ControlClient};

/// A compiled bundle.
pub struct Bundle {
    /// Bundle version from the control service.
    pub version: u64,
    /// SHA-256 of the policy JSON.
    pub sha256: String,
    /// The compiled policy (one connection).
    pub policy: Policy,
    /// Revoked principals, as `(issuer, subject)`.
    pub revoked: HashSet<(String, String)>,
    /// Sessions an admin terminated.
    pub terminated: HashSet<String>,
    /// Public keys (OpenSSH form) of the SSH user CAs to trust.
    pub ssh_user_cas: Vec<String>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("version", &self.version)
            .finish()
    }
}

impl Bundle {
    /// Whether `(issuer, subject)` is revoked.
    pub fn is_revoked(&self, issuer: &str, subject: &str) -> bool {
        !self.revoked.is_empty()
            && self
                .revoked
                .contains(&(issuer.to_string(), subject.to_string()))
    }
}

/// The on-disk form.
#[derive(Clone, Serialize, Deserialize)]
struct Stored {
    version: u64,
    sha256: String,
    policy: PolicyDocument,
    revoked: Vec<(String, String)>,
    terminated: Vec<String>,
    #[serde(default)]
    ssh_user_cas: Vec<String>,
}

fn compile(stored: Stored) -> Result<Bundle, String> {
    let policy = Policy::compile(stored.policy)
        .map_err(|e| format!("bundle policy does not compile: {e}"))?;
    Ok(Bundle {
        version: stored.version,
        sha256: stored.sha256,
        policy,
        revoked: stored.revoked.into_iter().collect(),
        terminated: stored.terminated.into_iter().collect(),
        ssh_user_cas: stored.ssh_user_cas,
    })
}

fn from_wire(b: &v1::PolicyBundle) -> Result<(Stored, Bundle), String> {
    let digest = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &b.policy_json,
    ));
    if digest != b.policy_sha256 {
        return Err("bundle checksum mismatch".into());
    }
    let policy: PolicyDocument = serde_json::from_slice(&b.policy_json)
        .map_err(|e| format!("bundle policy is not valid JSON: {e}"))?;
    let stored = Stored {
        version: b.version,
        sha256: b.policy_sha256.clone(),
        policy,
        revoked: b
            .revocations
            .iter()
            .map(|r| (r.issuer.clone(), r.subject.clone()))
            .collect(),
        terminated: b.terminated_sessions.clone(),
        ssh_user_cas: b.ssh_user_cas.clone(),
    };
    let bundle = compile(stored.clone())?;
    Ok((stored, bundle))
}

/// The current bundle, shared by every session.
#[derive(Clone)]
pub struct BundleStore {
    tx: Arc<watch::Sender<Option<Arc<Bundle>>>>,
    path: PathBuf,
}

impl BundleStore {
    /// Loads the cached bundle from `state_dir`, if any.
    pub fn open(state_dir: &Path, connection: &str) -> BundleStore {
        let path = state_dir.join(format!("bundle-{connection}.json"));
        let cached = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| serde_json::from_str::<Stored>(&s).ok())
            .and_then(|s| match compile(s) {
                Ok(b) => Some(Arc::new(b)),
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "ignoring cached bundle");
                    None
                }
            });
        if let Some(b) = &cached {
            tracing::info!(version = b.version, "loaded cached policy bundle");
        }
        let (tx, _) = watch::channel(cached);
        BundleStore {
            tx: Arc::new(tx),
            path,
        }
    }

    /// The bundle in force (None until the first one arrives or loads).
    pub fn current(&self) -> Option<Arc<Bundle>> {
        self.tx.borrow().clone()
    }

    /// Notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Bundle>>> {
        self.tx.subscribe()
    }

    fn install(&self, stored: &Stored, bundle: Bundle) {
        let tmp = self.path.with_extension("tmp");
        let written = serde_json::to_vec(stored)
            .map_err(|e| e.to_string())
            .and_then(|json| std::fs::write(&tmp, json).map_err(|e| e.to_string()))
            .and_then(|()| std::fs::rename(&tmp, &self.path).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot cache the policy bundle on disk");
        }
        tracing::info!(version = bundle.version, sha256 = %bundle.sha256, "policy bundle installed");
        self.tx.send_replace(Some(Arc::new(bundle)));
    }

    /// Watches the control service forever, reconnecting with backoff.
    pub async fn watch(self, client: ControlClient, connection: String, instance: String) {
        let mut backoff = Backoff::default();
        loop {
            let known = self.current().map(|b| b.version).unwrap_or(0);
            let req = client.req(v1::WatchBundleRequest {
                connection: connection.clone(),
                known_version: known,
                instance: instance.clone(),
            });
            match BundleServiceClient::new(client.channel.clone())
                .watch_bundle(req)
                .await
            {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    while let Some(msg) = stream.next().await {
                        match msg.map_err(|s| s.to_string()).and_then(|b| from_wire(&b)) {
                            Ok((stored, bundle)) => {
                                backoff.reset();
                                self.install(&stored, bundle);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "bundle stream error; keeping the last good bundle");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "cannot watch the policy bundle; keeping the last good one");
                }
            }
            backoff.wait().await;
        }
    }
}
