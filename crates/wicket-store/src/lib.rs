//! Storage for the control service: one [`Store`] trait, one SQL
//! implementation over two sqlx backends.
//!
//! - SQLite (the default): one file in WAL mode, for a laptop or a small team.
//! - PostgreSQL: for several control replicas sharing state.
//!
//! Both run the same queries (`$N` placeholders work in both) through
//! [`SqlStore`]; schema differences live only in `migrations/<backend>/`.
//! Timestamps are stored as Unix milliseconds, structured values as JSON text.

mod migrate;
mod model;
mod sql;

use async_trait::async_trait;
use wicket_core::{Approval, ApprovalState, AuditEvent, ReasoningTrace};

pub use model::*;
pub use sql::SqlStore;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored value could not be decoded.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// An optimistic-concurrency update lost the race.
    #[error("concurrent update")]
    Conflict,
    /// A request the store cannot answer as asked.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The URL names no supported backend.
    #[error("unsupported database URL (expected sqlite:PATH or postgres://…)")]
    UnsupportedUrl,
}

/// Result alias.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Everything the control service stores.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new policy version unless `sha256` equals the current one.
    /// Returns the current version and whether it changed.
    async fn put_policy(
        &self,
        document: &str,
        sha256: &str,
        applied_by: &str,
    ) -> Result<(PolicyVersion, bool)>;
    /// A policy version, or the current one for `None`.
    async fn get_policy(&self, version: Option<u64>) -> Result<Option<PolicyVersion>>;

    /// Stores events durably, each once by id (replays are no-ops), and
    /// keeps the session rows in step. Returns the ids now stored.
    async fn append_events(&self, events: &[AuditEvent]) -> Result<Vec<String>>;
    /// Sessions, newest first.
    async fn list_sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionRecord>>;
    /// One session.
    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>>;
    /// Events of a session with `seq > after_seq`, in order.
    async fn list_events(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>>;
    /// Events matching `search`, newest first.
    async fn search_events(&self, search: &EventSearch) -> Result<Vec<AuditEvent>>;
    /// Marks a live session as terminating; returns it (None if unknown).
    async fn terminate_session(&self, id: &str, reason: &str) -> Result<Option<SessionRecord>>;
    /// Ids of sessions marked terminating and not yet ended.
    async fn terminating_sessions(&self) -> Result<Vec<String>>;

    /// Creates an approval, or returns the existing one with the same request id.
    async fn create_approval(&self, approval: &Approval) -> Result<Approval>;
    /// One approval.
    async fn get_approval(&self, id: &str) -> Result<Option<Approval>>;
    /// Approvals, newest first, optionally in one state.
    async fn list_approvals(
        &self,
        state: Option<ApprovalState>,
        limit: u32,
    ) -> Result<Vec<Approval>>;
    /// Saves an approval if nobody changed it since `approval.rev` was read;
    /// bumps `rev`. [`StoreError::Conflict`] otherwise.
    async fn update_approval(&self, approval: &mut Approval) -> Result<()>;
    /// An approved approval with `reuse_key` whose reuse time runs past
    /// `now` (the longest-running one), if any.
    async fn find_reusable(
        &self,
        reuse_key: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<Approval>>;

    /// Stores a just-in-time access grant (again: no change).
    async fn put_access_grant(&self, grant: &AccessGrant) -> Result<()>;
    /// Access grants in force at `now`, on one connection or all, soonest
    /// to lapse first.
    async fn list_access_grants(
        &self,
        connection: Option<&str>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<AccessGrant>>;

    /// Revokes (or re-revokes) a principal.
    async fn revoke(&self, revocation: &Revocation) -> Result<()>;
    /// Whether a principal is revoked at `now`.
    async fn is_revoked(
        &self,
        issuer: &str,
        subject: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool>;
    /// Revocations in force at `now`.
    async fn list_revocations(&self, now: chrono::DateTime<chrono::Utc>)
    -> Result<Vec<Revocation>>;

    /// Stores a sidecar credential.
    async fn create_sidecar(&self, sidecar: &SidecarRecord) -> Result<()>;
    /// Stores a sidecar credential provisioned outside the admin API (a
    /// deployment's credentials file): a new id is created; a known one gets
    /// the given name, connections and secret hash and keeps its creation
    /// time and revocation. Returns whether anything changed.
    async fn put_sidecar(&self, sidecar: &SidecarRecord) -> Result<bool>;
    /// One sidecar credential.
    async fn get_sidecar(&self, id: &str) -> Result<Option<SidecarRecord>>;
    /// All sidecar credentials.
    async fn list_sidecars(&self) -> Result<Vec<SidecarRecord>>;
    /// Revokes a sidecar credential.
    async fn revoke_sidecar(&self, id: &str) -> Result<Option<SidecarRecord>>;

    /// Stores (or replaces) a structured reasoning trace.
    async fn put_trace(&self, trace: &ReasoningTrace) -> Result<()>;
    /// A stored trace.
    async fn get_trace(&self, trace_id: &str) -> Result<Option<ReasoningTrace>>;

    /// The secret stored under `name`, storing `candidate` first when there
    /// is none (so replicas racing to create a key all end up with one).
    async fn key_or_insert(&self, name: &str, candidate: &str) -> Result<String>;

    /// Records that console session `id` was signed out; it would have
    /// ended by itself at `until` (rows past that are pruned).
    async fn end_console_session(
        &self,
        id: &str,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<()>;
    /// Whether console session `id` was signed out.
    async fn console_session_ended(&self, id: &str) -> Result<bool>;

    /// A session's stored chain events with `chain_index > after`, in
    /// chain order.
    async fn chain_events(
        &self,
        session_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<wicket_core::evidence::ChainedEvent>>;
    /// How many of a session's events predate the chain (stored before
    /// tamper evidence was enabled).
    async fn unchained_events(&self, session_id: &str) -> Result<u64>;
    /// A session's chain length and head (`None` for an unknown session;
    /// length 0 before its first chained event).
    async fn chain_head(
        &self,
        session_id: &str,
    ) -> Result<Option<(u64, wicket_core::evidence::Hash)>>;
    /// Stores (or replaces with a longer one) a session's seal.
    async fn put_seal(&self, session_id: &str, seal: &wicket_core::evidence::Seal) -> Result<()>;
    /// A session's seal.
    async fn get_seal(&self, session_id: &str) -> Result<Option<wicket_core::evidence::Seal>>;
    /// Sessions whose chain grew since the last root, as leaves (at most
    /// `limit`, by session id).
    async fn unrooted(&self, limit: u32) -> Result<Vec<wicket_core::evidence::Leaf>>;
    /// The newest root.
    async fn last_root(&self) -> Result<Option<wicket_core::evidence::Root>>;
    /// Stores a root and its leaves and marks those sessions rooted up to
    /// the leaf's length; [`StoreError::Conflict`] when another replica
    /// stored root `root.seq` first.
    async fn put_root(
        &self,
        root: &wicket_core::evidence::Root,
        leaves: &[wicket_core::evidence::Leaf],
    ) -> Result<()>;
    /// Roots with `seq > after`, oldest first.
    async fn list_roots(&self, after: u64, limit: u32) -> Result<Vec<wicket_core::evidence::Root>>;
    /// A root's leaves, by session id, with `session_id > after`.
    async fn root_leaves(
        &self,
        seq: u64,
        after: &str,
        limit: u32,
    ) -> Result<Vec<wicket_core::evidence::Leaf>>;
    /// Every session id after `after`, in id order.
    async fn session_ids(&self, after: &str, limit: u32) -> Result<Vec<String>>;
    /// What the roots say about one session: `(root seq, len, head)`.
    async fn checkpoints(&self, session_id: &str)
    -> Result<Vec<wicket_core::evidence::Checkpoint>>;

    /// Stored events after `position` in the order they were stored, as
    /// `(position, event as stored)`. Positions only grow, but on
    /// PostgreSQL a position can show up late (its transaction commits
    /// after a later one) or never (rolled back): see the exporter.
    async fn events_after(&self, position: i64, limit: u32) -> Result<Vec<(i64, String)>>;
    /// Takes (or keeps) the lease on export `name` for `owner` until
    /// `lease_until` (ms); returns the position exported so far, or `None`
    /// while another owner's lease runs.
    async fn export_claim(
        &self,
        name: &str,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<i64>>;
    /// Records `count` more events exported up to `position` and renews the
    /// lease; `false` when `owner` lost the lease meanwhile.
    async fn export_advance(
        &self,
        name: &str,
        owner: &str,
        position: i64,
        count: u64,
        lease_until: i64,
    ) -> Result<bool>;

    /// Puts a session under legal hold (`reason` non-empty) or releases it
    /// (empty); returns the session, `None` when unknown.
    async fn set_hold(&self, session_id: &str, reason: &str) -> Result<Option<SessionRecord>>;
    /// Ended sessions of `connection` that ended before `before` and are
    /// not held, oldest first.
    async fn expired_sessions(
        &self,
        connection: &str,
        before: chrono::DateTime<chrono::Utc>,
        limit: u32,
    ) -> Result<Vec<String>>;
    /// Deletes a session (its events, seal and row) and stores its signed
    /// deletion record, in one transaction; `false` when it is held (or
    /// gone) by then. Roots keep naming it: the record answers for it.
    async fn delete_session(&self, deletion: &wicket_core::evidence::Deletion) -> Result<bool>;
    /// A deleted session's deletion record.
    async fn get_deletion(
        &self,
        session_id: &str,
    ) -> Result<Option<wicket_core::evidence::Deletion>>;

    /// Whether the database answers.
    async fn ping(&self) -> Result<()>;

    /// Tells the other replicas on this database about `change`
    /// (PostgreSQL `NOTIFY`; nothing to tell on SQLite, which one replica
    /// serves).
    async fn announce(&self, change: &Change) -> Result<()>;
    /// The changes other replicas announce, as they come (PostgreSQL
    /// `LISTEN`, reconnecting by itself); `None` where the backend has no
    /// such feed.
    async fn follow(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Change>>>;
}

/// A change one control replica announces to the others sharing its
/// database, so that what they serve (waiting sidecars, bundle watchers,
/// consoles) follows within milliseconds rather than at their next poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An approval was created or changed (votes, decision, expiry).
    Approval(String),
    /// Something sidecar bundles carry changed: the policy, revocations,
    /// terminated sessions.
    Bundle,
    /// The feed was interrupted: anything may have changed meanwhile.
    Resync,
}

/// Opens the store at `url` (`sqlite:PATH`, `sqlite::memory:`, `postgres://…`)
/// and applies pending migrations.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn Store>> {
    Ok(std::sync::Arc::new(SqlStore::open(url).await?))
}
