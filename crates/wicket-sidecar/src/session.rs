//! Live sessions, so revocation, token expiry and an admin's terminate can
//! end them wherever they are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use wicket_core::Principal;

use crate::bundle::BundleStore;

/// Why a session was ended from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The access token expired.
    TokenExpired,
    /// The grant that allowed the session lapsed.
    GrantExpired,
    /// The principal was revoked.
    Revoked,
    /// An admin terminated the session.
    Terminated,
    /// The sidecar is shutting down.
    Shutdown,
}

impl EndReason {
    /// Human text, shown to the client.
    pub fn message(&self) -> &'static str {
        match self {
            EndReason::TokenExpired => "your access token expired; reconnect with a fresh one",
            EndReason::GrantExpired => "your access grant expired",
            EndReason::Revoked => "your access was revoked",
            EndReason::Terminated => "an administrator terminated this session",
            EndReason::Shutdown => "the gate is shutting down; reconnect shortly",
        }
    }

    /// Stable name for audit and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            EndReason::TokenExpired => "token_expired",
            EndReason::GrantExpired => "grant_expired",
            EndReason::Revoked => "revoked",
            EndReason::Terminated => "terminated",
            EndReason::Shutdown => "shutdown",
        }
    }
}

struct Entry {
    principal: Principal,
    token_expires: DateTime<Utc>,
    grant_expires: Option<DateTime<Utc>>,
    end: watch::Sender<Option<EndReason>>,
}

/// The registry of live sessions.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
}

/// A live session's handle: dropping it unregisters the session.
pub struct SessionGuard {
    /// Session id.
    pub id: String,
    /// Resolves when the session must end.
    pub ended: watch::Receiver<Option<EndReason>>,
    registry: Registry,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry
            .inner
            .lock()
            .expect("registry lock")
            .remove(&self.id);
    }
}

impl SessionGuard {
    /// Waits until the session must end, and says why.
    pub async fn wait_end(&mut self) -> EndReason {
        wait_end(self.ended.clone()).await
    }

    /// A future that resolves when the session must end, independent of the guard's borrow.
    pub fn end_signal(&self) -> impl std::future::Future<Output = EndReason> + Send + 'static {
        wait_end(self.ended.clone())
    }

    /// Why the session must end, if it must.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.ended.borrow().clone()
    }
}

async fn wait_end(mut rx: watch::Receiver<Option<EndReason>>) -> EndReason {
    loop {
        if let Some(r) = rx.borrow().clone() {
            return r;
        }
        if rx.changed().await.is_err() {
            return EndReason::Shutdown;
        }
    }
}

impl Registry {
    /// Registers a session.
    pub fn register(
        &self,
        id: String,
        principal: Principal,
        token_expires: DateTime<Utc>,
        grant_expires: Option<DateTime<Utc>>,
    ) -> SessionGuard {
        let (end, ended) = watch::channel(None);
        self.inner.lock().expect("registry lock").insert(
            id.clone(),
            Entry {
                principal,
                token_expires,
                grant_expires,
                end,
            },
        );
        SessionGuard {
            id,
            ended,
            registry: self.clone(),
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("registry lock").len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every session (shutdown).
    pub fn end_all(&self, reason: EndReason) {
        for e in self.inner.lock().expect("registry lock").values() {
            e.end.send_replace(Some(reason.clone()));
        }
    }

    /// Ends the sessions that must end at `now` under `bundles`' current bundle.
    pub fn sweep(&self, bundles: &BundleStore, now: DateTime<Utc>, grace: Duration) -> usize {
        let bundle = bundles.current();
        let grace = chrono::Duration::from_std(grace).unwrap_or_default();
        let mut ended = 0;
        for (id, e) in self.inner.lock().expect("registry lock").iter() {
            if e.end.borrow().is_some() {
                continue;
            }
            let reason = if bundle.as_ref().is_some_and(|b| b.terminated.contains(id)) {
                Some(EndReason::Terminated)
            } else if bundle
                .as_ref()
                .is_some_and(|b| b.is_revoked(&e.principal.issuer, &e.principal.subject))
            {
                Some(EndReason::Revoked)
            } else if now >= e.token_expires + grace {
                Some(EndReason::TokenExpired)
            } else if e.grant_expires.is_some_and(|g| now >= g) {
                Some(EndReason::GrantExpired)
            } else {
                None
            };
            if let Some(r) = reason {
                tracing::info!(session = %id, reason = r.as_str(), "ending session");
                e.end.send_replace(Some(r));
                ended += 1;
            }
        }
        ended
    }

    /// Sweeps on every bundle change and every second, forever.
    pub async fn enforce_forever(self, bundles: BundleStore, grace: Duration) {
        let mut changes = bundles.subscribe();
        loop {
            self.sweep(&bundles, Utc::now(), grace);
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
