//! The SQL store over SQLite or PostgreSQL.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use wicket_core::evidence::{
    ChainedEvent, Checkpoint, Deletion, GENESIS, Hash, Leaf, Root, Seal, hash_from, link,
};
use wicket_core::{Approval, ApprovalState, AuditEvent, AuditKind, ReasoningTrace};

use crate::migrate;
use crate::model::*;
use crate::{Change, Result, Store, StoreError};

enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A [`Store`] over SQLite or PostgreSQL.
pub struct SqlStore {
    pool: Pool,
    /// This replica's name in the change feed, so it skips its own news.
    origin: String,
}

/// The PostgreSQL channel replicas announce changes on.
const CHANNEL: &str = "wicket_changes";

/// A change as it goes over `NOTIFY`: `ORIGIN approval ID` or `ORIGIN bundle`.
fn change_payload(origin: &str, change: &Change) -> String {
    match change {
        Change::Approval(id) => format!("{origin} approval {id}"),
        Change::Bundle => format!("{origin} bundle"),
        Change::Resync => format!("{origin} resync"),
    }
}

/// A change another replica announced; `None` for our own, and for
/// anything unknown (a newer replica's kind of news).
fn parse_change(origin: &str, payload: &str) -> Option<Change> {
    let mut parts = payload.split(' ');
    if parts.next()? == origin {
        return None;
    }
    match (parts.next()?, parts.next(), parts.next()) {
        ("approval", Some(id), None) if !id.is_empty() => Some(Change::Approval(id.to_string())),
        ("bundle", None, None) => Some(Change::Bundle),
        ("resync", None, None) => Some(Change::Resync),
        _ => None,
    }
}

/// Runs `$body` with `$p` bound to whichever pool this store has. The body is
/// written once and compiled for both backends.
macro_rules! with_pool {
    ($self:expr, |$p:ident| $body:expr) => {
        match &$self.pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("domain types serialize")
}

fn parse<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn clamp_limit(limit: u32) -> i64 {
    match limit {
        0 => 100,
        n => i64::from(n.min(1000)),
    }
}

macro_rules! session_from_row {
    ($r:expr) => {{
        let r = $r;
        SessionRecord {
            id: r.try_get("id")?,
            connection: r.try_get("connection")?,
            principal: parse(&r.try_get::<String, _>("principal")?, "session principal")?,
            started_at: time(r.try_get("started_at")?),
            ended_at: r.try_get::<Option<i64>, _>("ended_at")?.map(time),
            state: r.try_get("state")?,
            end_reason: r.try_get("end_reason")?,
            command_count: r.try_get::<i64, _>("command_count")? as u64,
            client_addr: r.try_get("client_addr")?,
            client_app: r.try_get("client_app")?,
            hold: r.try_get("hold")?,
        }
    }};
}

macro_rules! sidecar_from_row {
    ($r:expr) => {{
        let r = $r;
        SidecarRecord {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            connections: parse(
                &r.try_get::<String, _>("connections")?,
                "sidecar connections",
            )?,
            secret_hash: r.try_get("secret_hash")?,
            created_at: time(r.try_get("created_at")?),
            revoked: r.try_get::<i64, _>("revoked")? != 0,
        }
    }};
}

const ROOT_COLS: &str = "seq, created_at, prev, root, leaves, signature, key_id";

macro_rules! root_from_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<Root, StoreError>(Root {
            seq: r.try_get::<i64, _>("seq")? as u64,
            created_at_ms: r.try_get("created_at")?,
            prev: hash_from(&r.try_get::<Vec<u8>, _>("prev")?).unwrap_or_default(),
            root: hash_from(&r.try_get::<Vec<u8>, _>("root")?).unwrap_or_default(),
            leaves: r.try_get::<i64, _>("leaves")? as u64,
            signature: r.try_get("signature")?,
            key_id: r.try_get("key_id")?,
        })
    }};
}

const SESSION_COLS: &str = "id, connection, principal, started_at, ended_at, state, end_reason, \
                            command_count, client_addr, client_app, hold";

/// Events per multi-row insert (9 parameters each, well under the
/// backends' bind-parameter limits).
const INSERT_CHUNK: usize = 256;
/// Sessions per multi-row statement of an ingest (up to 10 parameters
/// each).
const SESSION_CHUNK: usize = 256;

impl SqlStore {
    /// Opens `sqlite:PATH` (created if missing; WAL, synchronous=FULL),
    /// `sqlite::memory:` or `postgres://…`, and migrates it.
    pub async fn open(url: &str) -> Result<SqlStore> {
        let pool = if url.starts_with("sqlite:") {
            let memory = url.contains(":memory:");
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(if memory {
                    SqliteJournalMode::Memory
                } else {
                    SqliteJournalMode::Wal
                })
                // An acknowledged audit event must survive a power cut.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(if memory { 1 } else { 4 })
                .min_connections(if memory { 1 } else { 0 })
                .idle_timeout(if memory {
                    None
                } else {
                    Some(Duration::from_secs(600))
                })
                .max_lifetime(if memory {
                    None
                } else {
                    Some(Duration::from_secs(3600))
                })
                .connect_with(opts)
                .await?;
            Pool::Sqlite(pool)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(10)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await?;
            Pool::Postgres(pool)
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let store = SqlStore {
            pool,
            origin: uuid::Uuid::new_v4().simple().to_string(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// Inserts a sidecar's row, `conflict` (an `ON CONFLICT` clause, or
    /// nothing) deciding what an existing id does; the rows written.
    async fn insert_sidecar(&self, s: &SidecarRecord, conflict: &str) -> Result<u64> {
        let sql = format!(
            "INSERT INTO sidecars (id, name, connections, secret_hash, created_at, revoked) \
             VALUES ($1, $2, $3, $4, $5, $6){conflict}"
        );
        with_pool!(self, |p| {
            let done = sqlx::query(&sql)
                .bind(&s.id)
                .bind(&s.name)
                .bind(json(&s.connections))
                .bind(&s.secret_hash)
                .bind(ms(s.created_at))
                .bind(i64::from(s.revoked))
                .execute(p)
                .await?;
            Ok(done.rows_affected())
        })
    }

    /// One attempt at [`Store::append_events`] leaving out the ids in
    /// `skip` (already stored). `Some(ids)` when other events of the batch
    /// turned out to be stored already: nothing was written.
    async fn append_once(
        &self,
        events: &[AuditEvent],
        skip: &std::collections::HashSet<String>,
    ) -> Result<Option<Vec<String>>> {
        // New events, each once (an id twice in one batch counts once).
        let mut seen = std::collections::HashSet::with_capacity(events.len());
        let fresh: Vec<&AuditEvent> = events
            .iter()
            .filter(|e| !skip.contains(&e.id) && seen.insert(e.id.as_str()))
            .collect();
        if fresh.is_empty() {
            return Ok(None);
        }
        // Sessions in order of appearance, with their command counts.
        let mut sessions: Vec<(&AuditEvent, i64)> = Vec::new();
        for e in &fresh {
            let commands = i64::from(e.kind == AuditKind::Command);
            match sessions
                .iter_mut()
                .find(|(s, _)| s.session_id == e.session_id)
            {
                Some((_, n)) => *n += commands,
                None => sessions.push((e, commands)),
            }
        }
        let lock = match self.pool {
            Pool::Sqlite(_) => "",
            Pool::Postgres(_) => " FOR UPDATE",
        };
        with_pool!(self, |p| {
            let mut tx = p.begin().await?;
            // Session rows first: on SQLite this write takes the database's
            // write lock, so reading the chain heads below cannot race
            // another writer; on PostgreSQL the rows are locked explicitly
            // (in id order, as every replica does). One statement per chunk
            // of sessions, not one per session: each statement is a round
            // trip to SQLite's worker thread.
            for chunk in sessions.chunks(SESSION_CHUNK) {
                let mut qb = sqlx::QueryBuilder::new(
                    "INSERT INTO sessions (id, connection, principal, principal_subject, started_at, state, \
                     end_reason, command_count, client_addr, client_app) ",
                );
                qb.push_values(chunk, |mut b, (e, _)| {
                    let principal = e.principal.clone().unwrap_or_default();
                    b.push_bind(e.session_id.as_str())
                        .push_bind(e.connection.as_str())
                        .push_bind(json(&principal))
                        .push_bind(principal.subject)
                        .push_bind(ms(e.time))
                        .push_bind("active")
                        .push_bind("")
                        .push_bind(0i64)
                        .push_bind(e.client_addr.as_str())
                        .push_bind(e.client_app.as_str());
                });
                qb.push(" ON CONFLICT (id) DO NOTHING");
                qb.build().execute(&mut *tx).await?;
            }
            let mut found: HashMap<String, (u64, Hash)> = HashMap::with_capacity(sessions.len());
            for chunk in sessions.chunks(SESSION_CHUNK) {
                let mut qb = sqlx::QueryBuilder::new(
                    "SELECT id, chain_len, chain_head FROM sessions WHERE id IN (",
                );
                let mut ids = qb.separated(", ");
                for (e, _) in chunk {
                    ids.push_bind(e.session_id.as_str());
                }
                qb.push(") ORDER BY id");
                qb.push(lock);
                for r in qb.build().fetch_all(&mut *tx).await? {
                    let len = r.try_get::<i64, _>("chain_len")? as u64;
                    let head = match r.try_get::<Option<Vec<u8>>, _>("chain_head")? {
                        Some(h) => hash_from(&h)
                            .ok_or_else(|| StoreError::Corrupt("session chain head".into()))?,
                        None => GENESIS,
                    };
                    found.insert(r.try_get::<String, _>("id")?, (len, head));
                }
            }
            let mut heads: Vec<(u64, Hash)> = Vec::with_capacity(sessions.len());
            for (e, _) in &sessions {
                heads.push(found.remove(&e.session_id).ok_or_else(|| {
                    StoreError::Corrupt(format!("session {} has no row", e.session_id))
                })?);
            }
            // Chain each event after its session's head.
            let mut rows: Vec<(&AuditEvent, String, i64, Hash)> = Vec::with_capacity(fresh.len());
            for e in &fresh {
                let k = sessions
                    .iter()
                    .position(|(s, _)| s.session_id == e.session_id)
                    .expect("every session was listed");
                let body = json(*e);
                let (len, head) = &mut heads[k];
                *len += 1;
                *head = link(head, *len, body.as_bytes());
                rows.push((e, body, *len as i64, *head));
            }
            // One multi-row insert per chunk (not one round trip per
            // event). Only the count of new rows comes back: RETURNING
            // streamed one row per event from SQLite's worker thread, a
            // thread switch each, a fifth of the ingest's CPU.
            let mut inserted = 0u64;
            for chunk in rows.chunks(INSERT_CHUNK) {
                let mut qb = sqlx::QueryBuilder::new(
                    "INSERT INTO events (id, session_id, seq, time, kind, connection, body, chain_index, hash) ",
                );
                qb.push_values(chunk, |mut b, (e, body, index, hash)| {
                    b.push_bind(e.id.as_str())
                        .push_bind(e.session_id.as_str())
                        .push_bind(e.seq as i64)
                        .push_bind(ms(e.time))
                        .push_bind(e.kind.as_str())
                        .push_bind(e.connection.as_str())
                        .push_bind(body.as_str())
                        .push_bind(*index)
                        .push_bind(&hash[..]);
                });
                qb.push(" ON CONFLICT (id) DO NOTHING");
                inserted += qb.build().execute(&mut *tx).await?.rows_affected();
            }
            if inserted < rows.len() as u64 {
                // Some were stored before (a replay): roll back, and name
                // them, so that the next attempt chains the others alone.
                tx.rollback().await?;
                let mut stored = Vec::new();
                for chunk in rows.chunks(INSERT_CHUNK) {
                    let mut qb = sqlx::QueryBuilder::new("SELECT id FROM events WHERE id IN (");
                    let mut ids = qb.separated(", ");
                    for (e, ..) in chunk {
                        ids.push_bind(e.id.as_str());
                    }
                    qb.push(")");
                    for r in qb.build().fetch_all(p).await? {
                        stored.push(r.try_get::<String, _>("id")?);
                    }
                }
                return Ok(Some(stored));
            }
            for e in &fresh {
                match e.kind {
                    AuditKind::SessionStart => {
                        let principal = e.principal.clone().unwrap_or_default();
                        sqlx::query(
                            "UPDATE sessions SET principal = $2, principal_subject = $3, started_at = $4, \
                             client_addr = $5, client_app = $6 WHERE id = $1",
                        )
                        .bind(&e.session_id)
                        .bind(json(&principal))
                        .bind(&principal.subject)
                        .bind(ms(e.time))
                        .bind(&e.client_addr)
                        .bind(&e.client_app)
                        .execute(&mut *tx)
                        .await?;
                    }
                    AuditKind::SessionEnd => {
                        sqlx::query(
                            "UPDATE sessions SET ended_at = $2, state = 'ended', end_reason = $3 WHERE id = $1",
                        )
                        .bind(&e.session_id)
                        .bind(ms(e.time))
                        .bind(&e.end_reason)
                        .execute(&mut *tx)
                        .await?;
                    }
                    _ => {}
                }
            }
            let updates: Vec<_> = sessions.iter().zip(&heads).collect();
            for chunk in updates.chunks(SESSION_CHUNK) {
                let mut qb =
                    sqlx::QueryBuilder::new("WITH v (id, added, chain_len, chain_head) AS (");
                qb.push_values(chunk, |mut b, ((e, n), (len, head))| {
                    b.push_bind(e.session_id.as_str())
                        .push_bind(*n)
                        .push_bind(*len as i64)
                        .push_bind(&head[..]);
                });
                qb.push(
                    ") UPDATE sessions SET command_count = command_count + v.added, \
                     chain_len = v.chain_len, chain_head = v.chain_head FROM v WHERE sessions.id = v.id",
                );
                qb.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(None)
        })
    }

    async fn migrate(&self) -> Result<()> {
        let (list, lock) = match self.pool {
            Pool::Sqlite(_) => (migrate::SQLITE, None),
            // Replicas starting together serialize on an advisory lock.
            Pool::Postgres(_) => (
                migrate::POSTGRES,
                Some("SELECT pg_advisory_xact_lock(7215830019)"),
            ),
        };
        with_pool!(self, |p| {
            let mut tx = p.begin().await?;
            if let Some(lock) = lock {
                sqlx::query(lock).execute(&mut *tx).await?;
            }
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )
            .execute(&mut *tx)
            .await?;
            let done: Vec<i64> = sqlx::query("SELECT version FROM schema_migrations")
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>(0))
                .collect::<std::result::Result<_, _>>()?;
            for (version, sql) in list {
                if done.contains(version) {
                    continue;
                }
                for stmt in migrate::statements(sql) {
                    sqlx::query(stmt).execute(&mut *tx).await?;
                }
                sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                    .bind(*version)
                    .bind(ms(Utc::now()))
                    .execute(&mut *tx)
                    .await?;
                tracing::info!(backend = self.backend(), version, "applied migration");
            }
            tx.commit().await?;
            Ok(())
        })
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn put_policy(
        &self,
        document: &str,
        sha256: &str,
        applied_by: &str,
    ) -> Result<(PolicyVersion, bool)> {
        with_pool!(self, |p| {
            let mut tx = p.begin().await?;
            let current = sqlx::query(
                "SELECT version, document, sha256, applied_by, applied_at FROM policies ORDER BY version DESC LIMIT 1",
            )
            .fetch_optional(&mut *tx)
            .await?;
            let mut next = 1i64;
            if let Some(r) = current {
                let version: i64 = r.try_get("version")?;
                if r.try_get::<String, _>("sha256")? == sha256 {
                    let v = PolicyVersion {
                        version: version as u64,
                        document: r.try_get("document")?,
                        sha256: sha256.to_string(),
                        applied_by: r.try_get("applied_by")?,
                        applied_at: time(r.try_get("applied_at")?),
                    };
                    return Ok((v, false));
                }
                next = version + 1;
            }
            let now = Utc::now();
            sqlx::query(
                "INSERT INTO policies (version, document, sha256, applied_by, applied_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(next)
            .bind(document)
            .bind(sha256)
            .bind(applied_by)
            .bind(ms(now))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok((
                PolicyVersion {
                    version: next as u64,
                    document: document.to_string(),
                    sha256: sha256.to_string(),
                    applied_by: applied_by.to_string(),
                    applied_at: time(ms(now)),
                },
                true,
            ))
        })
    }

    async fn get_policy(&self, version: Option<u64>) -> Result<Option<PolicyVersion>> {
        let v = version.map(|v| v as i64).unwrap_or(0);
        with_pool!(self, |p| {
            let row = sqlx::query(
                "SELECT version, document, sha256, applied_by, applied_at FROM policies \
                 WHERE ($1 = 0 OR version = $1) ORDER BY version DESC LIMIT 1",
            )
            .bind(v)
            .fetch_optional(p)
            .await?;
            row.map(|r| {
                Ok(PolicyVersion {
                    version: r.try_get::<i64, _>("version")? as u64,
                    document: r.try_get("document")?,
                    sha256: r.try_get("sha256")?,
                    applied_by: r.try_get("applied_by")?,
                    applied_at: time(r.try_get("applied_at")?),
                })
            })
            .transpose()
        })
    }

    async fn append_events(&self, events: &[AuditEvent]) -> Result<Vec<String>> {
        // Optimistic: assume every event is new (the common case), and
        // chain them. An event stored before (a spool replay) would leave a
        // hole in the chain, so such an attempt is rolled back and redone
        // without it.
        let mut stored = std::collections::HashSet::new();
        for _ in 0..4 {
            match self.append_once(events, &stored).await? {
                None => return Ok(events.iter().map(|e| e.id.clone()).collect()),
                Some(replayed) => stored.extend(replayed),
            }
        }
        Err(StoreError::Conflict)
    }

    async fn list_sessions(&self, f: &SessionFilter) -> Result<Vec<SessionRecord>> {
        let sql = format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE ($1 = '' OR connection = $1) \
             AND ($2 = '' OR principal_subject = $2) AND ($3 = 0 OR ended_at IS NULL) \
             ORDER BY started_at DESC, id LIMIT $4"
        );
        with_pool!(self, |p| {
            let rows = sqlx::query(&sql)
                .bind(f.connection.clone().unwrap_or_default())
                .bind(f.principal.clone().unwrap_or_default())
                .bind(i64::from(f.active_only))
                .bind(clamp_limit(f.limit))
                .fetch_all(p)
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(session_from_row!(r));
            }
            Ok(out)
        })
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>> {
        let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE id = $1");
        with_pool!(self, |p| {
            match sqlx::query(&sql).bind(id).fetch_optional(p).await? {
                Some(r) => Ok(Some(session_from_row!(&r))),
                None => Ok(None),
            }
        })
    }

    async fn list_events(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>> {
        with_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT body FROM events WHERE session_id = $1 AND seq > $2 ORDER BY seq, time LIMIT $3",
            )
            .bind(session_id)
            .bind(after_seq as i64)
            .bind(clamp_limit(limit))
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| parse(&r.try_get::<String, _>("body")?, "event"))
                .collect()
        })
    }

    async fn search_events(&self, q: &EventSearch) -> Result<Vec<AuditEvent>> {
        // LIKE patterns with the user's `%`, `_` and `\` taken literally.
        let like = |s: &str| {
            let mut p = String::with_capacity(s.len() + 2);
            p.push('%');
            for c in s.to_lowercase().chars() {
                if matches!(c, '%' | '_' | '\\') {
                    p.push('\\');
                }
                p.push(c);
            }
            p.push('%');
            p
        };
        let text = if q.text.is_empty() {
            String::new()
        } else {
            like(&q.text)
        };
        // Matched in the stored JSON, whose shape serde fixes.
        let decision = match q.decision.as_str() {
            "" => String::new(),
            e @ ("allow" | "review" | "deny") => format!("%\"decision\":{{\"effect\":\"{e}\"%"),
            o @ ("approved" | "denied" | "expired" | "covered") => {
                format!("%\"approval_outcome\":\"{o}\"%")
            }
            other => {
                return Err(StoreError::Invalid(format!(
                    "unknown decision `{other}` (allow, review, deny, approved, denied, expired, covered)"
                )));
            }
        };
        with_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT body FROM events WHERE ($1 = '' OR lower(body) LIKE $1 ESCAPE '\\') \
                 AND ($2 = '' OR connection = $2) \
                 AND ($3 = '' OR session_id IN (SELECT id FROM sessions WHERE principal_subject = $3 \
                      OR principal LIKE $4 ESCAPE '\\')) \
                 AND ($5 = '' OR body LIKE $5) \
                 AND ($6 = 0 OR time >= $6) AND ($7 = 0 OR time < $7) \
                 ORDER BY time DESC, id LIMIT $8",
            )
            .bind(&text)
            .bind(&q.connection)
            .bind(&q.principal)
            .bind(format!(
                "%\"display_name\":{}%",
                serde_json::to_string(&q.principal).unwrap_or_default()
            ))
            .bind(&decision)
            .bind(q.since.map(ms).unwrap_or(0))
            .bind(q.until.map(ms).unwrap_or(0))
            .bind(clamp_limit(q.limit))
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| parse(&r.try_get::<String, _>("body")?, "event"))
                .collect()
        })
    }

    async fn terminate_session(&self, id: &str, reason: &str) -> Result<Option<SessionRecord>> {
        with_pool!(self, |p| {
            sqlx::query(
                "UPDATE sessions SET state = 'terminating', end_reason = $2 WHERE id = $1 AND ended_at IS NULL",
            )
            .bind(id)
            .bind(reason)
            .execute(p)
            .await?;
            Ok::<(), StoreError>(())
        })?;
        self.get_session(id).await
    }

    async fn terminating_sessions(&self) -> Result<Vec<String>> {
        with_pool!(self, |p| {
            let rows =
                sqlx::query("SELECT id FROM sessions WHERE state = 'terminating' ORDER BY id")
                    .fetch_all(p)
                    .await?;
            rows.iter()
                .map(|r| r.try_get::<String, _>("id").map_err(StoreError::from))
                .collect()
        })
    }

    async fn create_approval(&self, a: &Approval) -> Result<Approval> {
        with_pool!(self, |p| {
            sqlx::query(
                "INSERT INTO approvals (id, request_id, rev, state, body, created_at, expires_at, reuse_key, reuse_until) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (request_id) DO NOTHING",
            )
            .bind(&a.id)
            .bind(&a.request.request_id)
            .bind(a.rev)
            .bind(a.state.as_str())
            .bind(json(a))
            .bind(ms(a.created_at))
            .bind(ms(a.expires_at))
            .bind(&a.reuse_key)
            .bind(a.reuse_until.map(ms))
            .execute(p)
            .await?;
            let r = sqlx::query("SELECT body FROM approvals WHERE request_id = $1")
                .bind(&a.request.request_id)
                .fetch_one(p)
                .await?;
            parse(&r.try_get::<String, _>("body")?, "approval")
        })
    }

    async fn get_approval(&self, id: &str) -> Result<Option<Approval>> {
        with_pool!(self, |p| {
            let r = sqlx::query("SELECT body FROM approvals WHERE id = $1")
                .bind(id)
                .fetch_optional(p)
                .await?;
            r.map(|r| parse(&r.try_get::<String, _>("body")?, "approval"))
                .transpose()
        })
    }

    async fn list_approvals(
        &self,
        state: Option<ApprovalState>,
        limit: u32,
    ) -> Result<Vec<Approval>> {
        let state = state.map(|s| s.as_str()).unwrap_or("");
        with_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT body FROM approvals WHERE ($1 = '' OR state = $1) ORDER BY created_at DESC, id LIMIT $2",
            )
            .bind(state)
            .bind(clamp_limit(limit))
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| parse(&r.try_get::<String, _>("body")?, "approval"))
                .collect()
        })
    }

    async fn update_approval(&self, a: &mut Approval) -> Result<()> {
        let old = a.rev;
        a.rev += 1;
        let body = json(a);
        let changed = with_pool!(self, |p| {
            sqlx::query(
                "UPDATE approvals SET rev = $3, state = $4, body = $5, reuse_until = $6 WHERE id = $1 AND rev = $2",
            )
            .bind(&a.id)
            .bind(old)
            .bind(a.rev)
            .bind(a.state.as_str())
            .bind(&body)
            .bind(a.reuse_until.map(ms))
            .execute(p)
            .await?
            .rows_affected()
        });
        if changed == 1 {
            Ok(())
        } else {
            a.rev = old;
            Err(StoreError::Conflict)
        }
    }

    async fn find_reusable(&self, reuse_key: &str, now: DateTime<Utc>) -> Result<Option<Approval>> {
        if reuse_key.is_empty() {
            return Ok(None);
        }
        with_pool!(self, |p| {
            let r = sqlx::query(
                "SELECT body FROM approvals WHERE reuse_key = $1 AND state = 'approved' \
                 AND reuse_until > $2 ORDER BY reuse_until DESC LIMIT 1",
            )
            .bind(reuse_key)
            .bind(ms(now))
            .fetch_optional(p)
            .await?;
            r.map(|r| parse(&r.try_get::<String, _>("body")?, "approval"))
                .transpose()
        })
    }

    async fn revoke(&self, r: &Revocation) -> Result<()> {
        with_pool!(self, |p| {
            sqlx::query(
                "INSERT INTO revocations (issuer, subject, reason, revoked_at, until) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (issuer, subject) DO UPDATE SET reason = excluded.reason, \
                 revoked_at = excluded.revoked_at, until = excluded.until",
            )
            .bind(&r.issuer)
            .bind(&r.subject)
            .bind(&r.reason)
            .bind(ms(r.revoked_at))
            .bind(r.until.map(ms))
            .execute(p)
            .await?;
            Ok(())
        })
    }

    async fn is_revoked(&self, issuer: &str, subject: &str, now: DateTime<Utc>) -> Result<bool> {
        with_pool!(self, |p| {
            let row = sqlx::query(
                "SELECT 1 FROM revocations WHERE issuer = $1 AND subject = $2 \
                 AND (until IS NULL OR until > $3)",
            )
            .bind(issuer)
            .bind(subject)
            .bind(ms(now))
            .fetch_optional(p)
            .await?;
            Ok(row.is_some())
        })
    }

    async fn put_access_grant(&self, g: &AccessGrant) -> Result<()> {
        with_pool!(self, |p| {
            sqlx::query(
                "INSERT INTO access_grants (id, approval_id, issuer, subject, label, connection, reason, granted_at, until) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&g.id)
            .bind(&g.approval_id)
            .bind(&g.issuer)
            .bind(&g.subject)
            .bind(&g.label)
            .bind(&g.connection)
            .bind(&g.reason)
            .bind(ms(g.granted_at))
            .bind(ms(g.until))
            .execute(p)
            .await?;
            Ok(())
        })
    }

    async fn list_access_grants(
        &self,
        connection: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<AccessGrant>> {
        with_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT id, approval_id, issuer, subject, label, connection, reason, granted_at, until \
                 FROM access_grants WHERE ($1 = '' OR connection = $1) AND until > $2 ORDER BY until, id",
            )
            .bind(connection.unwrap_or(""))
            .bind(ms(now))
            .fetch_all(p)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(AccessGrant {
                    id: r.try_get("id")?,
                    approval_id: r.try_get("approval_id")?,
                    issuer: r.try_get("issuer")?,
                    subject: r.try_get("subject")?,
                    label: r.try_get("label")?,
                    connection: r.try_get("connection")?,
                    reason: r.try_get("reason")?,
                    granted_at: time(r.try_get("granted_at")?),
                    until: time(r.try_get("until")?),
                });
            }
            Ok(out)
        })
    }

    async fn list_revocations(&self, now: DateTime<Utc>) -> Result<Vec<Revocation>> {
        with_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT issuer, subject, reason, revoked_at, until FROM revocations \
                 WHERE until IS NULL OR until > $1 ORDER BY issuer, subject",
            )
            .bind(ms(now))
            .fetch_all(p)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(Revocation {
                    issuer: r.try_get("issuer")?,
                    subject: r.try_get("subject")?,
                    reason: r.try_get("reason")?,
                    revoked_at: time(r.try_get("revoked_at")?),
                    until: r.try_get::<Option<i64>, _>("until")?.map(time),
                });
            }
            Ok(out)
        })
    }

    async fn create_sidecar(&self, s: &SidecarRecord) -> Result<()> {
        self.insert_sidecar(s, "").await.map(|_| ())
    }

    async fn put_sidecar(&self, s: &SidecarRecord) -> Result<bool> {
        let changed = self
            .insert_sidecar(
                s,
                " ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
                 connections = excluded.connections, secret_hash = excluded.secret_hash \
                 WHERE sidecars.name <> excluded.name OR sidecars.connections <> excluded.connections \
                 OR sidecars.secret_hash <> excluded.secret_hash",
            )
            .await?;
        Ok(changed > 0)
    }

    async fn get_sidecar(&self, id: &str) -> Result<Option<SidecarRecord>> {
        with_pool!(self, |p| {
            match sqlx::query("SELECT * FROM sidecars WHERE id = $1")
                .bind(id)
                .fetch_optional(p)
                .await?
            {
                Some(r) => Ok(Some(sidecar_from_row!(&r))),
                None => Ok(None),
            }
        })
    }

    async fn list_sidecars(&self) -> Result<Vec<SidecarRecord>> {
        with_pool!(self, |p| {
            let rows = sqlx::query("SELECT * FROM sidecars ORDER BY created_at, id")
                .fetch_all(p)
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(sidecar_from_row!(r));
            }
            Ok(out)
        })
    }

    async fn revoke_sidecar(&self, id: &str) -> Result<Option<SidecarRecord>> {
        with_pool!(self, |p| {
            sqlx::query("UPDATE sidecars SET revoked = 1 WHERE id = $1")
                .bind(id)
                .execute(p)
                .await?;
            Ok::<(), StoreError>(())
        })?;
        self.get_sidecar(id).await
    }

    async fn put_trace(&self, t: &ReasoningTrace) -> Result<()> {
        with_pool!(self, |p| {
            sqlx::query(
                "INSERT INTO traces (trace_id, body, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (trace_id) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
            )
            .bind(&t.trace_id)
            .bind(json(t))
            .bind(ms(Utc::now()))
            .execute(p)
            .await?;
            Ok(())
        })
    }

    async fn get_trace(&self, trace_id: &str) -> Result<Option<ReasoningTrace>> {
        with_pool!(self, |p| {
            let r = sqlx::query("SELECT body FROM traces WHERE trace_id = $1")
                .bind(trace_id)
                .fetch_optional(p)
                .await?;
            r.map(|r| parse(&r.try_get::<String, _>("body")?, "trace"))
                .transpose()
        })
    }

    async fn key_or_insert(&self, name: &str, candidate: &str) -> Result<String> {
        with_pool!(self, |p| {
            sqlx::query(
                "INSERT INTO keys (name, secret, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(candidate)
            .bind(ms(Utc::now()))
            .execute(p)
            .await?;
            let r = sqlx::query("SELECT secret FROM keys WHERE name = $1")
                .bind(name)
                .fetch_one(p)
                .await?;
            Ok(r.try_get::<String, _>("secret")?)
        })
    }

    async fn end_console_session(&self, id: &str, until: DateTime<Utc>) -> Result<()> {
        with_pool!(self, |p| {
            let mut tx = p.begin().await?;
            sqlx::query("DELETE FROM console_logouts WHERE until < $1")
                .bind(ms(Utc::now()))
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO console_logouts (id, until) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .bind(ms(until))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    async fn console_session_ended(&self, id: &str) -> Result<bool> {
        with_pool!(self, |p| {
            let r = sqlx::query("SELECT 1 FROM console_logouts WHERE id = $1")
                .bind(id)
                .fetch_optional(p)
                .await?;
            Ok(r.is_some())
        })
    }

    async fn chain_events(
        &self,
        session_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ChainedEvent>> {
        with_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT id, body, chain_index, hash FROM events \
                 WHERE session_id = $1 AND chain_index > $2 ORDER BY chain_index, id LIMIT $3",
            )
            .bind(session_id)
            .bind(after as i64)
            .bind(clamp_limit(limit))
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(ChainedEvent {
                        index: r.try_get::<i64, _>("chain_index")? as u64,
                        id: r.try_get("id")?,
                        body: r.try_get("body")?,
                        // A hash of the wrong size is reported as a broken
                        // link by the verifier, not as a storage error.
                        hash: r
                            .try_get::<Option<Vec<u8>>, _>("hash")?
                            .as_deref()
                            .and_then(hash_from)
                            .unwrap_or_default(),
                    })
                })
                .collect()
        })
    }

    async fn unchained_events(&self, session_id: &str) -> Result<u64> {
        with_pool!(self, |p| {
            let r = sqlx::query(
                "SELECT COUNT(*) AS n FROM events WHERE session_id = $1 AND chain_index IS NULL",
            )
            .bind(session_id)
            .fetch_one(p)
            .await?;
            Ok(r.try_get::<i64, _>("n")? as u64)
        })
    }

    async fn chain_head(&self, session_id: &str) -> Result<Option<(u64, Hash)>> {
        with_pool!(self, |p| {
            let Some(r) = sqlx::query("SELECT chain_len, chain_head FROM sessions WHERE id = $1")
                .bind(session_id)
                .fetch_optional(p)
                .await?
            else {
                return Ok(None);
            };
            let head = r
                .try_get::<Option<Vec<u8>>, _>("chain_head")?
                .as_deref()
                .and_then(hash_from)
                .unwrap_or(GENESIS);
            Ok(Some((r.try_get::<i64, _>("chain_len")? as u64, head)))
        })
    }

    async fn put_seal(&self, session_id: &str, seal: &Seal) -> Result<()> {
        with_pool!(self, |p| {
            sqlx::query(
                "INSERT INTO audit_seals (session_id, len, head, sealed_at, signature, key_id) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (session_id) DO UPDATE SET \
                 len = excluded.len, head = excluded.head, sealed_at = excluded.sealed_at, \
                 signature = excluded.signature, key_id = excluded.key_id \
                 WHERE audit_seals.len <= excluded.len",
            )
            .bind(session_id)
            .bind(seal.len as i64)
            .bind(&seal.head[..])
            .bind(seal.sealed_at_ms)
            .bind(&seal.signature[..])
            .bind(&seal.key_id)
            .execute(p)
            .await?;
            Ok(())
        })
    }

    async fn get_seal(&self, session_id: &str) -> Result<Option<Seal>> {
        with_pool!(self, |p| {
            let Some(r) = sqlx::query(
                "SELECT len, head, sealed_at, signature, key_id FROM audit_seals WHERE session_id = $1",
            )
            .bind(session_id)
            .fetch_optional(p)
            .await?
            else {
                return Ok(None);
            };
            Ok(Some(Seal {
                len: r.try_get::<i64, _>("len")? as u64,
                head: hash_from(&r.try_get::<Vec<u8>, _>("head")?).unwrap_or_default(),
                sealed_at_ms: r.try_get("sealed_at")?,
                signature: r.try_get("signature")?,
                key_id: r.try_get("key_id")?,
            }))
        })
    }

    async fn unrooted(&self, limit: u32) -> Result<Vec<Leaf>> {
        with_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT id, chain_len, chain_head FROM sessions WHERE chain_len > rooted_len \
                 ORDER BY id LIMIT $1",
            )
            .bind(i64::from(limit.max(1)))
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(Leaf {
                        session_id: r.try_get("id")?,
                        len: r.try_get::<i64, _>("chain_len")? as u64,
                        head: r
                            .try_get::<Option<Vec<u8>>, _>("chain_head")?
                            .as_deref()
                            .and_then(hash_from)
                            .unwrap_or(GENESIS),
                    })
                })
                .collect()
        })
    }

    async fn last_root(&self) -> Result<Option<Root>> {
        with_pool!(self, |p| {
            let r = sqlx::query(&format!(
                "SELECT {ROOT_COLS} FROM audit_roots ORDER BY seq DESC LIMIT 1"
            ))
            .fetch_optional(p)
            .await?;
            r.map(|r| root_from_row!(&r)).transpose()
        })
    }

    async fn put_root(&self, root: &Root, leaves: &[Leaf]) -> Result<()> {
        with_pool!(self, |p| {
            let mut tx = p.begin().await?;
            let done = sqlx::query(
                "INSERT INTO audit_roots (seq, created_at, prev, root, leaves, signature, key_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (seq) DO NOTHING",
            )
            .bind(root.seq as i64)
            .bind(root.created_at_ms)
            .bind(&root.prev[..])
            .bind(&root.root[..])
            .bind(root.leaves as i64)
            .bind(&root.signature[..])
            .bind(&root.key_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done == 0 {
                return Err(StoreError::Conflict);
            }
            for chunk in leaves.chunks(INSERT_CHUNK) {
                let mut qb = sqlx::QueryBuilder::new(
                    "INSERT INTO audit_root_leaves (root_seq, session_id, len, head) ",
                );
                qb.push_values(chunk, |mut b, l| {
                    b.push_bind(root.seq as i64)
                        .push_bind(l.session_id.as_str())
                        .push_bind(l.len as i64)
                        .push_bind(&l.head[..]);
                });
                qb.build().execute(&mut *tx).await?;
            }
            for l in leaves {
                sqlx::query(
                    "UPDATE sessions SET rooted_len = $2 WHERE id = $1 AND rooted_len < $2",
                )
                .bind(&l.session_id)
                .bind(l.len as i64)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    async fn list_roots(&self, after: u64, limit: u32) -> Result<Vec<Root>> {
        with_pool!(self, |p| {
            let rows = sqlx::query(&format!(
                "SELECT {ROOT_COLS} FROM audit_roots WHERE seq > $1 ORDER BY seq LIMIT $2"
            ))
            .bind(after as i64)
            .bind(clamp_limit(limit))
            .fetch_all(p)
            .await?;
            rows.iter().map(|r| root_from_row!(r)).collect()
        })
    }

    async fn root_leaves(&self, seq: u64, after: &str, limit: u32) -> Result<Vec<Leaf>> {
        with_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT session_id, len, head FROM audit_root_leaves \
                 WHERE root_seq = $1 AND session_id > $2 ORDER BY session_id LIMIT $3",
            )
            .bind(seq as i64)
            .bind(after)
            .bind(clamp_limit(limit))
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(Leaf {
                        session_id: r.try_get("session_id")?,
                        len: r.try_get::<i64, _>("len")? as u64,
                        head: hash_from(&r.try_get::<Vec<u8>, _>("head")?).unwrap_or_default(),
                    })
                })
                .collect()
        })
    }

    async fn session_ids(&self, after: &str, limit: u32) -> Result<Vec<String>> {
        with_pool!(self, |p| {
            let rows = sqlx::query("SELECT id FROM sessions WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after)
                .bind(clamp_limit(limit))
                .fetch_all(p)
                .await?;
            rows.iter()
                .map(|r| Ok(r.try_get::<String, _>("id")?))
                .collect()
        })
    }

    async fn checkpoints(&self, session_id: &str) -> Result<Vec<Checkpoint>> {
        with_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT root_seq, len, head FROM audit_root_leaves WHERE session_id = $1 ORDER BY root_seq",
            )
            .bind(session_id)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(Checkpoint {
                        root_seq: r.try_get::<i64, _>("root_seq")? as u64,
                        len: r.try_get::<i64, _>("len")? as u64,
                        head: hash_from(&r.try_get::<Vec<u8>, _>("head")?).unwrap_or_default(),
                    })
                })
                .collect()
        })
    }

    async fn events_after(&self, position: i64, limit: u32) -> Result<Vec<(i64, String)>> {
        let sql = match self.pool {
            // SQLite writers take turns, so rowids appear in commit order.
            Pool::Sqlite(_) => {
                "SELECT rowid AS pos, body FROM events WHERE rowid > $1 ORDER BY rowid LIMIT $2"
            }
            Pool::Postgres(_) => {
                "SELECT pos, body FROM events WHERE pos > $1 ORDER BY pos LIMIT $2"
            }
        };
        with_pool!(self, |p| {
            let rows = sqlx::query(sql)
                .bind(position)
                .bind(i64::from(limit.clamp(1, 10_000)))
                .fetch_all(p)
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get::<i64, _>("pos")?, r.try_get::<String, _>("body")?)))
                .collect()
        })
    }

    async fn export_claim(
        &self,
        name: &str,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<i64>> {
        with_pool!(self, |p| {
            sqlx::query(
                "INSERT INTO export_cursors (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .execute(p)
            .await?;
            let r = sqlx::query(
                "UPDATE export_cursors SET owner = $2, lease_until = $3 \
                 WHERE name = $1 AND (owner = $2 OR owner = '' OR lease_until < $4) RETURNING position",
            )
            .bind(name)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .fetch_optional(p)
            .await?;
            r.map(|r| Ok(r.try_get::<i64, _>("position")?)).transpose()
        })
    }

    async fn export_advance(
        &self,
        name: &str,
        owner: &str,
        position: i64,
        count: u64,
        lease_until: i64,
    ) -> Result<bool> {
        with_pool!(self, |p| {
            let done = sqlx::query(
                "UPDATE export_cursors SET position = $3, exported = exported + $4, lease_until = $5 \
                 WHERE name = $1 AND owner = $2",
            )
            .bind(name)
            .bind(owner)
            .bind(position)
            .bind(count as i64)
            .bind(lease_until)
            .execute(p)
            .await?
            .rows_affected();
            Ok(done == 1)
        })
    }

    async fn set_hold(&self, session_id: &str, reason: &str) -> Result<Option<SessionRecord>> {
        with_pool!(self, |p| {
            sqlx::query("UPDATE sessions SET hold = $2 WHERE id = $1")
                .bind(session_id)
                .bind(reason)
                .execute(p)
                .await?;
            Ok::<(), StoreError>(())
        })?;
        self.get_session(session_id).await
    }

    async fn expired_sessions(
        &self,
        connection: &str,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<String>> {
        with_pool!(self, |p| {
            let rows = sqlx::query(
                "SELECT id FROM sessions WHERE connection = $1 AND ended_at IS NOT NULL \
                 AND ended_at < $2 AND hold = '' ORDER BY ended_at, id LIMIT $3",
            )
            .bind(connection)
            .bind(ms(before))
            .bind(clamp_limit(limit))
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| Ok(r.try_get::<String, _>("id")?))
                .collect()
        })
    }

    async fn delete_session(&self, d: &Deletion) -> Result<bool> {
        with_pool!(self, |p| {
            let mut tx = p.begin().await?;
            // The hold is checked in the same transaction that deletes.
            let gone = sqlx::query("DELETE FROM sessions WHERE id = $1 AND hold = ''")
                .bind(&d.session_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone == 0 {
                return Ok(false);
            }
            sqlx::query(
                "INSERT INTO audit_deletions (session_id, len, head, deleted_at, reason, signature, key_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&d.session_id)
            .bind(d.len as i64)
            .bind(&d.head[..])
            .bind(d.deleted_at_ms)
            .bind(&d.reason)
            .bind(&d.signature[..])
            .bind(&d.key_id)
            .execute(&mut *tx)
            .await?;
            for sql in [
                "DELETE FROM events WHERE session_id = $1",
                "DELETE FROM audit_seals WHERE session_id = $1",
            ] {
                sqlx::query(sql)
                    .bind(&d.session_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    async fn get_deletion(&self, session_id: &str) -> Result<Option<Deletion>> {
        with_pool!(self, |p| {
            let Some(r) = sqlx::query(
                "SELECT session_id, len, head, deleted_at, reason, signature, key_id \
                 FROM audit_deletions WHERE session_id = $1",
            )
            .bind(session_id)
            .fetch_optional(p)
            .await?
            else {
                return Ok(None);
            };
            Ok(Some(Deletion {
                session_id: r.try_get("session_id")?,
                len: r.try_get::<i64, _>("len")? as u64,
                head: hash_from(&r.try_get::<Vec<u8>, _>("head")?).unwrap_or_default(),
                deleted_at_ms: r.try_get("deleted_at")?,
                reason: r.try_get("reason")?,
                signature: r.try_get("signature")?,
                key_id: r.try_get("key_id")?,
            }))
        })
    }

    async fn ping(&self) -> Result<()> {
        with_pool!(self, |p| {
            sqlx::query("SELECT 1").execute(p).await?;
            Ok(())
        })
    }

    async fn announce(&self, change: &Change) -> Result<()> {
        let Pool::Postgres(p) = &self.pool else {
            return Ok(());
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(change_payload(&self.origin, change))
            .execute(p)
            .await?;
        Ok(())
    }

    async fn follow(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Change>>> {
        let Pool::Postgres(p) = &self.pool else {
            return Ok(None);
        };
        let mut listener = PgListener::connect_with(p).await?;
        listener.listen(CHANNEL).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let origin = self.origin.clone();
        tokio::spawn(async move {
            // Whether news may have been missed since the last delivery.
            let mut lost = false;
            loop {
                let next = tokio::select! {
                    n = listener.try_recv() => n,
                    _ = tx.closed() => return,
                };
                match next {
                    Ok(Some(n)) => {
                        if std::mem::take(&mut lost) && tx.send(Change::Resync).await.is_err() {
                            return;
                        }
                        if let Some(c) = parse_change(&origin, n.payload())
                            && tx.send(c).await.is_err()
                        {
                            return;
                        }
                    }
                    // The connection dropped; the next call reconnects and
                    // listens again, but whatever was sent meanwhile is gone.
                    Ok(None) => {
                        tracing::warn!("change feed connection lost; reconnecting");
                        if tx.send(Change::Resync).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if !lost {
                            tracing::warn!(error = %e, "change feed unavailable; retrying");
                        }
                        lost = true;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(Some(rx))
    }
}

#[cfg(test)]
mod change_tests {
    use super::*;

    #[test]
    fn changes_round_trip_and_our_own_are_skipped() {
        for c in [
            Change::Approval("0193-ab".into()),
            Change::Bundle,
            Change::Resync,
        ] {
            let wire = change_payload("me", &c);
            assert_eq!(parse_change("other", &wire), Some(c));
            assert_eq!(parse_change("me", &wire), None, "our own news");
        }
        for junk in [
            "",
            "x",
            "x approval",
            "x approval a b",
            "x nonsense",
            "x bundle extra",
        ] {
            assert_eq!(parse_change("me", junk), None, "{junk:?}");
        }
    }
}
