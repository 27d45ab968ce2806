//! One client connection: startup, authentication, the upstream login, and
//! the gated relay.
//!
//! **Refusals keep the protocol in step.** A refused statement is not
//! answered by the sidecar out of band: it is replaced, in place, by a
//! statement that fails at parse time naming a one-off marker, and the
//! server's error for it is rewritten into ours (SQLSTATE 42501, naming the
//! rule). The error therefore arrives exactly where the server would have
//! put it, under pipelining too, and the server itself discards the rest of
//! the extended-protocol batch up to Sync as for any error.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use wicket_core::{AuditKind, Command, Decision, Effect, ReasoningTrace};
use wicket_sidecar::tls::Stream;
use wicket_sidecar::{ApprovalOutcome, OpenSession, Sidecar};

use crate::classify::{self, Statement};
use crate::codec::{self, CodecError, build};
use crate::mask;
use crate::reasoning;
use crate::results::{self, Expect, GuardedError, Outcome, Pending, Status, Tracker};
use crate::upstream::{self, UpstreamConfig};

/// Settings of the PostgreSQL gate.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// The upstream server and the sidecar's own login.
    pub upstream: UpstreamConfig,
    /// Accept the token as a cleartext password from loopback clients without TLS.
    pub allow_cleartext_loopback: bool,
    /// Client TLS (answers SSLRequest with `S`, and takes direct TLS).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Largest client message accepted.
    pub max_message_bytes: usize,
    /// Time a client has to finish startup and authentication.
    pub startup_timeout: Duration,
    /// Key of keyed-hash masking.
    pub mask_key: Vec<u8>,
}

/// Cancel keys handed to clients, mapped to the upstream backend's.
#[derive(Default)]
pub struct CancelMap {
    keys: Mutex<HashMap<(i32, i32), (i32, i32)>>,
}

/// Shared state of the PostgreSQL gate.
pub struct PgGate {
    /// Runtime.
    pub sidecar: Arc<Sidecar>,
    /// Settings.
    pub cfg: PgConfig,
    cancels: CancelMap,
    classifier: classify::Classifier,
    masking: mask::Masking,
}

impl PgGate {
    /// A gate over `sidecar`.
    pub fn new(sidecar: Arc<Sidecar>, cfg: PgConfig) -> Arc<PgGate> {
        let cfg_mask_key = cfg.mask_key.clone();
        Arc::new(PgGate {
            sidecar,
            cfg,
            cancels: CancelMap::default(),
            classifier: classify::Classifier::default(),
            masking: mask::Masking::new(cfg_mask_key),
        })
    }

    /// The masking plan of the current bundle, if it masks anything.
    fn mask_plan(&self) -> Option<Arc<mask::Plan>> {
        self.masking
            .plan(self.sidecar.bundles.current(), &self.sidecar.cfg.connection)
    }

    /// Serves one client connection to the end.
    pub async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let mut client = Some(Stream::Plain(tcp));
        let started =
            tokio::time::timeout(self.cfg.startup_timeout, self.negotiate(&mut client, peer)).await;
        let (session, upstream, reasoning, database) = match started {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "startup failed");
                return;
            }
            Err(_) => {
                if let Some(c) = client.as_mut() {
                    let _ = Self::fatal(c, "08P01", "startup did not complete in time").await;
                }
                return;
            }
        };
        let Some(client) = client else { return };
        self.relay(client, upstream, session, reasoning, database)
            .await;
    }

    /// TLS (on SSLRequest, or direct TLS as PostgreSQL 17 clients may open
    /// with), then startup and authentication.
    async fn negotiate(
        &self,
        client: &mut Option<Stream>,
        peer: SocketAddr,
    ) -> Result<Option<(OpenSession, Stream, Option<String>, String)>, CodecError> {
        if let (Some(tls), Some(Stream::Plain(tcp))) = (&self.cfg.tls, client.as_ref()) {
            // A TLS record (handshake, 0x16) where a startup length would be.
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await? == 1 && first[0] == 0x16 {
                let plain = client.take().ok_or(CodecError::Closed)?;
                *client = Some(plain.accept(tls.clone()).await?);
            }
        }
        loop {
            let c = client.as_mut().ok_or(CodecError::Closed)?;
            match self.startup(c, peer).await? {
                Startup::Tls => {
                    let tls = self.cfg.tls.clone().ok_or(CodecError::Closed)?;
                    let plain = client.take().ok_or(CodecError::Closed)?;
                    *client = Some(plain.accept(tls).await?);
                }
                Startup::Done(s) => return Ok(s),
            }
        }
    }

    async fn fatal(client: &mut Stream, code: &str, message: &str) -> std::io::Result<()> {
        send(
            client,
            &build::error(b'E', "FATAL", code, message, None, None),
        )
        .await
    }

    /// Startup and authentication. `Ok(None)`: the connection ended normally
    /// (cancel request, refused login already answered).
    async fn startup(&self, client: &mut Stream, peer: SocketAddr) -> Result<Startup, CodecError> {
        let params = loop {
            let body = match codec::read_startup(client).await {
                Ok(b) => b,
                Err(CodecError::Length(n)) => {
                    Self::fatal(
                        client,
                        "08P01",
                        &format!("invalid startup packet length {n}"),
                    )
                    .await?;
                    return Ok(Startup::Done(None));
                }
                Err(e) => return Err(e),
            };
            let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            match code {
                codec::SSL_REQUEST if self.cfg.tls.is_some() && !client.is_tls() => {
                    send(client, b"S").await?;
                    return Ok(Startup::Tls);
                }
                codec::SSL_REQUEST | codec::GSSENC_REQUEST => send(client, b"N").await?,
                codec::CANCEL_REQUEST if body.len() >= 12 => {
                    let pid = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                    let key = i32::from_be_bytes([body[8], body[9], body[10], body[11]]);
                    self.cancel(pid, key).await;
                    return Ok(Startup::Done(None));
                }
                codec::PROTOCOL_V3 => match codec::startup_params(&body) {
                    Some(p) => break p,
                    None => {
                        Self::fatal(client, "08P01", "malformed startup packet").await?;
                        return Ok(Startup::Done(None));
                    }
                },
                other => {
                    Self::fatal(
                        client,
                        "0A000",
                        &format!(
                            "unsupported frontend protocol {}.{}",
                            other >> 16,
                            other & 0xffff
                        ),
                    )
                    .await?;
                    return Ok(Startup::Done(None));
                }
            }
        };
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let user = get("user").unwrap_or_default();
        if get("replication").is_some_and(|r| r != "false" && r != "0") {
            Self::fatal(
                client,
                "28000",
                "replication connections are not allowed through the gate",
            )
            .await?;
            return Ok(Startup::Done(None));
        }
        if !(client.is_tls() || (peer.ip().is_loopback() && self.cfg.allow_cleartext_loopback)) {
            Self::fatal(
                client,
                "28000",
                "refusing to take an access token as a cleartext password over an unencrypted connection",
            )
            .await?;
            return Ok(Startup::Done(None));
        }
        send(client, &build::auth(3, &[])).await?;
        let m = codec::read_message(client, 64 * 1024).await?;
        if m.tag != b'p' {
            Self::fatal(client, "08P01", "expected a password message").await?;
            return Ok(Startup::Done(None));
        }
        let token = String::from_utf8_lossy(m.body.strip_suffix(b"\0").unwrap_or(&m.body))
            .trim()
            .to_string();
        let addr = peer.to_string();
        let identity = match self.sidecar.authenticate(&token, &addr).await {
            Ok(i) => i,
            Err(e) => {
                let msg = format!("password authentication failed for user \"{user}\": {e}");
                Self::fatal(client, "28P01", &msg).await?;
                return Ok(Startup::Done(None));
            }
        };
        let app = get("application_name").unwrap_or_default();
        let session = match self.sidecar.open_session(&identity, &addr, &app) {
            Ok(s) => s,
            Err(d) => {
                Self::fatal(
                    client,
                    "28000",
                    &format!("access refused by rule `{}`: {}", d.rule, d.reason),
                )
                .await?;
                return Ok(Startup::Done(None));
            }
        };
        let database = get("database").unwrap_or_else(|| user.clone());
        let extra: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "replication"))
            .cloned()
            .collect();
        let (upstream, hello) = match upstream::connect(&self.cfg.upstream, &database, &extra).await
        {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "upstream login failed");
                let code = match &e {
                    upstream::UpstreamError::Refused { code, .. } if code == "3D000" => "3D000",
                    _ => "08006",
                };
                Self::fatal(client, code, &e.to_string()).await?;
                self.end(&session, "upstream_login_failed");
                return Ok(Startup::Done(None));
            }
        };
        let mut out = BytesMut::new();
        out.extend_from_slice(&build::auth(0, &[]));
        for p in &hello.parameters {
            out.extend_from_slice(p);
        }
        let mut minted = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut minted);
        let ours = (
            i32::from_be_bytes([minted[0], minted[1], minted[2], minted[3]]) & 0x7fff_ffff,
            i32::from_be_bytes([minted[4], minted[5], minted[6], minted[7]]),
        );
        self.cancels
            .keys
            .lock()
            .expect("cancel map")
            .insert(ours, hello.backend_key);
        out.extend_from_slice(&build::backend_key(ours.0, ours.1));
        out.extend_from_slice(&build::ready(hello.status));
        send(client, &out).await?;
        // `-c wicket.reasoning=…` in `options` (PGOPTIONS), or the setting as its
        // own startup parameter (asyncpg's server_settings).
        let reasoning = get("options")
            .and_then(|o| reasoning::from_options(&o))
            .or_else(|| get("wicket.reasoning"));
        tracing::info!(session = %session.id, principal = %session.principal.label(), %peer, app = %app, "session opened");
        Ok(Startup::Done(Some((
            session, upstream, reasoning, database,
        ))))
    }

    async fn cancel(&self, pid: i32, key: i32) {
        let target = self
            .cancels
            .keys
            .lock()
            .expect("cancel map")
            .get(&(pid, key))
            .copied();
        let Some((upid, ukey)) = target else { return };
        if let Ok(mut s) = upstream::open(&self.cfg.upstream).await {
            let mut b = BytesMut::with_capacity(16);
            b.put_i32(16);
            b.put_i32(codec::CANCEL_REQUEST);
            b.put_i32(upid);
            b.put_i32(ukey);
            let _ = send(&mut s, &b).await;
        }
    }

    fn end(&self, session: &OpenSession, reason: &str) {
        let mut e = session.event(AuditKind::SessionEnd);
        e.end_reason = reason.to_string();
        if let Err(err) = self.sidecar.record(e) {
            tracing::error!(error = %err, "cannot record session end");
        }
    }

    async fn relay(
        self: Arc<Self>,
        client: Stream,
        upstream: Stream,
        session: OpenSession,
        reasoning: Option<String>,
        database: String,
    ) {
        let end_signal = session.guard.end_signal();
        let (mut client_r, client_w) = tokio::io::split(client);
        let (mut up_r, mut up_w) = tokio::io::split(upstream);
        let client_w = Arc::new(tokio::sync::Mutex::new(client_w));
        let markers: Arc<Markers> = Arc::default();
        let tracker: Arc<Mutex<Tracker>> = Arc::default();
        // Row shapes by statement and result formats (masking only).
        let shapes: Arc<mask::Shapes> = Arc::default();

        // Server → client, rewriting the errors of refused statements.
        let down = {
            let client_w = client_w.clone();
            let markers = markers.clone();
            let tracker = tracker.clone();
            let session = &session;
            let me = &self;
            let database = &database;
            let shapes = shapes.clone();
            async move {
                let mut buf = BytesMut::with_capacity(64 * 1024);
                let mut done = Vec::new();
                let mut shape: Arc<mask::Shape> = Arc::default();
                let mut copy: Option<Arc<mask::CopyPlan>> = None;
                loop {
                    match up_r.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let plan = me.mask_plan();
                    if let Some(plan) = &plan {
                        let tables = me.masking.unresolved(database, &buf);
                        if !tables.is_empty() {
                            me.masking
                                .resolve(plan, &me.cfg.upstream, database, &tables)
                                .await;
                        }
                    }
                    let masking = plan.as_deref().map(|plan| Masker {
                        plan,
                        masking: &me.masking,
                        database,
                        shape: &mut shape,
                        shapes: &shapes,
                        copy: &mut copy,
                    });
                    let out = downstream(&mut buf, &markers, &tracker, &mut done, masking);
                    if !out.is_empty() && send(&mut *client_w.lock().await, &out).await.is_err() {
                        return;
                    }
                    for o in done.drain(..) {
                        me.record_result(session, o);
                    }
                }
            }
        };

        // Client → server, gating each statement.
        let mut state = GateState {
            reasoning,
            traceparent: None,
            prepared: HashMap::new(),
            sql_prepared: HashMap::new(),
            portals: HashMap::new(),
        };
        let up = async {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                match client_r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return "client_closed",
                    Ok(_) => {}
                }
                let mut out = BytesMut::new();
                loop {
                    if buf.len() < 5 {
                        break;
                    }
                    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as i64;
                    if len < 4 || len as u64 > self.cfg.max_message_bytes as u64 {
                        let msg = format!("message length {len} is outside the accepted range");
                        let _ = send_locked(
                            &client_w,
                            &build::error(b'E', "FATAL", "08P01", &msg, None, None),
                        )
                        .await;
                        return "protocol_violation";
                    }
                    if buf.len() < 1 + len as usize {
                        buf.reserve(1 + len as usize - buf.len());
                        break;
                    }
                    let raw = buf.split_to(1 + len as usize).freeze();
                    let tag = raw[0];
                    let body = raw.slice(5..);
                    // What to forward, and the reply it will get (for the results).
                    let (fwd, expect) = match tag {
                        b'Q' | b'P' => {
                            if tag == b'P' {
                                // A statement parsed again may return other columns.
                                let mut pos = 0;
                                shapes.forget(&codec::cstr(&body, &mut pos).unwrap_or_default());
                            }
                            // Flush what came before, so held statements never delay it.
                            if !out.is_empty() && send(&mut up_w, &out).await.is_err() {
                                return "upstream_closed";
                            }
                            out.clear();
                            // A COPY of a table to the client: its rows are
                            // masked by column, from the table's layout.
                            if tag == b'Q'
                                && let Some(plan) = self.mask_plan()
                                && let Some(copy) = copy_of(&body)
                            {
                                let cp = self
                                    .masking
                                    .copy_plan(&plan, &self.cfg.upstream, &database, copy)
                                    .await;
                                tracker
                                    .lock()
                                    .expect("tracker")
                                    .push(Expect::Copy(Arc::new(cp)));
                            }
                            let gated = self.gate(
                                tag, &body, &raw, &session, &mut state, &client_w, &markers,
                                &database,
                            );
                            tokio::pin!(gated);
                            // While a statement is held (or its masking
                            // looked up), the client is still read: what it
                            // sends meanwhile waits in `buf`, and if it goes
                            // away the hold is dropped (recorded as refused)
                            // rather than run for nobody.
                            let (fwd, expect) = loop {
                                tokio::select! {
                                    biased;
                                    r = &mut gated => break r,
                                    n = client_r.read_buf(&mut buf), if buf.len() < HELD_READ_AHEAD => {
                                        if matches!(n, Ok(0) | Err(_)) {
                                            return "client_closed";
                                        }
                                    }
                                }
                            };
                            (fwd, Some(expect))
                        }
                        b'B' => {
                            let mut pos = 0;
                            let portal = codec::cstr(&body, &mut pos).unwrap_or_default();
                            let stmt = codec::cstr(&body, &mut pos).unwrap_or_default();
                            if state.portals.len() >= MAX_PREPARED {
                                state.portals.clear();
                            }
                            let formats = bind_result_formats(&body).unwrap_or_default();
                            state.portals.insert(portal, (stmt, formats));
                            (raw, Some(Expect::Ack))
                        }
                        b'E' => {
                            let (fwd, pending) =
                                self.gate_execute(&body, &raw, &session, &state, &markers);
                            // With masking on, the rows must be read in the
                            // formats Bind asked for: a shape known for this
                            // statement and formats, or else the server
                            // describes the portal first (a reply the client
                            // never sees).
                            if self.mask_plan().is_some() && fwd == raw {
                                let mut pos = 0;
                                let portal = codec::cstr(&body, &mut pos).unwrap_or_default();
                                let key = state.portals.get(&portal).cloned();
                                let known = key
                                    .as_ref()
                                    .and_then(|k| shapes.get(k, self.masking.generation()));
                                let expect = match (known, key) {
                                    (Some(shape), _) => Expect::Shape(shape),
                                    (None, key) => {
                                        out.extend_from_slice(&describe_portal(&portal));
                                        Expect::Describe(Some(key.unwrap_or_default()))
                                    }
                                };
                                tracker.lock().expect("tracker").push(expect);
                            }
                            (fwd, Some(Expect::Execute(pending)))
                        }
                        b'C' => {
                            let mut pos = 1;
                            let name = codec::cstr(&body, &mut pos).unwrap_or_default();
                            match body.first() {
                                Some(b'S') => {
                                    state.prepared.remove(&name);
                                    shapes.forget(&name);
                                }
                                Some(b'P') => {
                                    state.portals.remove(&name);
                                }
                                _ => {}
                            }
                            (raw, Some(Expect::Ack))
                        }
                        b'F' => {
                            // FunctionCall reaches any function by OID: decided like a
                            // statement of kind `function_call`, refused unless allowed.
                            let (fwd, pending) =
                                self.gate_function_call(&body, &raw, &session, &state, &markers);
                            (fwd, Some(Expect::Query([pending].into())))
                        }
                        b'X' => {
                            out.extend_from_slice(&raw);
                            let _ = send(&mut up_w, &out).await;
                            return "client_quit";
                        }
                        b'D' => (raw, Some(Expect::Describe(None))),
                        b'S' => (raw, Some(Expect::Sync)),
                        // Flush, CopyData, CopyDone, CopyFail: no reply of their own.
                        _ => (raw, None),
                    };
                    if let Some(e) = expect {
                        tracker.lock().expect("tracker").push(e);
                    }
                    out.extend_from_slice(&fwd);
                }
                if !out.is_empty() && send(&mut up_w, &out).await.is_err() {
                    return "upstream_closed";
                }
            }
        };

        let reason = tokio::select! {
            r = up => r.to_string(),
            _ = down => "upstream_closed".to_string(),
            r = end_signal => {
                let _ = send_locked(&client_w, &build::error(b'E', "FATAL", if r == wicket_sidecar::EndReason::Shutdown { "57P01" } else { "28000" }, r.message(), None, None))
                    .await;
                r.as_str().to_string()
            }
        };
        let _ = client_w.lock().await.shutdown().await;
        tracing::info!(session = %session.id, reason = %reason, "session closed");
        self.end(&session, &reason);
    }

    /// The masked column a statement would leak under strict masking,
    /// directly or through views (followed four deep); a view that cannot
    /// be looked up counts as a leak (fail closed).
    async fn strict_leak(&self, plan: &mask::Plan, database: &str, sql: &str) -> Option<String> {
        let (leak, relations) = crate::strict::analyze(plan, sql, true);
        if leak.is_some() {
            return leak;
        }
        let mut todo: Vec<(String, String, u8)> =
            relations.into_iter().map(|(s, n)| (s, n, 0)).collect();
        while let Some((schema, name, depth)) = todo.pop() {
            match self
                .masking
                .view_definition(&self.cfg.upstream, database, &schema, &name)
                .await
            {
                Ok(Some(def)) => {
                    let (leak, relations) = crate::strict::analyze(plan, &def, false);
                    if let Some(col) = leak {
                        return Some(format!("{col} (through view {name})"));
                    }
                    if depth < 4 {
                        todo.extend(relations.into_iter().map(|(s, n)| (s, n, depth + 1)));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot look up a relation for strict masking");
                    return Some(format!("(relation {name} could not be checked)"));
                }
            }
        }
        None
    }

    /// Decides a `Query` or `Parse` and returns the bytes to forward.
    #[allow(clippy::too_many_arguments)]
    async fn gate(
        &self,
        tag: u8,
        body: &Bytes,
        raw: &Bytes,
        session: &OpenSession,
        state: &mut GateState,
        client_w: &ClientWriter,
        markers: &Arc<Markers>,
        database: &str,
    ) -> (Bytes, Expect) {
        let refused = || {
            if tag == b'P' {
                Expect::Ack
            } else {
                Expect::Query([None].into())
            }
        };
        let mut pos = 0;
        let (name, sql) = if tag == b'P' {
            let name = codec::cstr(body, &mut pos).unwrap_or_default();
            (Some(name), codec::cstr(body, &mut pos).unwrap_or_default())
        } else {
            (None, codec::cstr(body, &mut pos).unwrap_or_default())
        };
        let started = Instant::now();
        for (k, v) in reasoning::comment_tags(&sql) {
            match k.as_str() {
                "reasoning" => state.reasoning = Some(v),
                "traceparent" => state.traceparent = Some(v),
                _ => {}
            }
        }
        let statements = match self.classifier.classify(&sql) {
            Ok(mut s) => {
                // `EXECUTE p` is what `PREPARE p AS …` prepared.
                for st in &mut s {
                    let prepared = st
                        .flags
                        .iter()
                        .find_map(|f| f.strip_prefix("execute:"))
                        .and_then(|name| state.sql_prepared.get(name));
                    if let Some(p) = prepared {
                        st.class = p.class.clone();
                        st.flags.extend(
                            p.flags
                                .iter()
                                .filter(|f| !f.starts_with("prepare:"))
                                .cloned(),
                        );
                    }
                }
                s
            }
            Err(e) => {
                let d = Decision::deny(
                    "unparseable",
                    format!("the gate could not parse this statement: {e}"),
                );
                self.audit(session, &sql, None, &d, state, None, started);
                // The server's own parser has the last word on the error the
                // client sees; a guard in front makes sure nothing runs.
                let (fwd, shift, nonce) =
                    self.refuse_guarded(tag, body, name.as_deref(), &d, markers, Some(&sql));
                let expect = Expect::Guarded {
                    shift,
                    nonce,
                    query: tag == b'Q',
                };
                return (fwd, expect);
            }
        };
        // `SET wicket.reasoning` gives the reasoning for the rest of the
        // session, starting with itself (and the statements sent with it):
        // the statement that answers "say why" is not refused for not saying.
        for st in &statements {
            if st.class.kind == "set"
                && let Some(r) = reasoning::from_set(&st.text)
            {
                state.reasoning = Some(r);
            }
        }
        let has_reasoning = state
            .reasoning
            .as_deref()
            .is_some_and(|r| !r.trim().is_empty());
        // The most restrictive decision over the statements wins.
        let mut worst: Option<(Decision, usize)> = None;
        let mut decisions = Vec::with_capacity(statements.len());
        let strict = self.mask_plan().filter(|p| p.strict);
        for (i, st) in statements.iter().enumerate() {
            let cmd = command(st);
            let mut d = self.sidecar.decide(session, &cmd, has_reasoning);
            let leak = match &strict {
                Some(plan) if d.effect != Effect::Deny => {
                    self.strict_leak(plan, database, &st.text).await
                }
                _ => None,
            };
            if let Some(col) = leak {
                d = Decision::deny(
                    "masking-strict",
                    format!(
                        "the result would derive from masked column {col}; strict masking allows it \
                         only as the column itself (not in expressions, whole rows, subqueries, CTEs, \
                         set operations or functions)"
                    ),
                );
            }
            if worst.as_ref().is_none_or(|(w, _)| d.effect > w.effect) {
                worst = Some((d.clone(), i));
            }
            decisions.push(d);
        }
        // PREPARE names what a later EXECUTE runs (that EXECUTE is decided
        // as what it runs).
        for st in &statements {
            if let Some(name) = st.flags.iter().find_map(|f| f.strip_prefix("prepare:")) {
                if state.sql_prepared.len() >= MAX_PREPARED {
                    state.sql_prepared.clear();
                }
                state.sql_prepared.insert(name.to_string(), st.clone());
            }
        }
        let Some((decision, _)) = worst else {
            return (raw.clone(), refused()); // empty query: one EmptyQueryResponse
        };
        let outcome = match decision.effect {
            Effect::Allow => None,
            Effect::Deny => Some(decision.clone()),
            Effect::Review => {
                let mut classification = statements[0].class.clone();
                // The whole query's shape: an approval that covers this
                // fingerprint again must not cover other statements sent
                // along with it.
                classification.fingerprint = classify::fingerprint(&sql);
                // The approval record, like the audit record, holds masked text.
                let text = match self.mask_plan() {
                    Some(plan) => plan.mask_text(&sql),
                    None => sql.clone(),
                };
                let cmd = Command {
                    text,
                    classification,
                };
                let trace = self.trace(state);
                let client_w = client_w.clone();
                let notice_rule = decision.rule.clone();
                let (tx, rx) = tokio::sync::oneshot::channel::<String>();
                let notify = async move {
                    if let Ok(id) = rx.await {
                        let msg = format!("waiting for approval {id} (rule {notice_rule})");
                        let _ = send_locked(
                            &client_w,
                            &build::error(b'N', "NOTICE", "01000", &msg, None, None),
                        )
                        .await;
                    }
                };
                let wait = self.sidecar.request_approval(
                    session,
                    &cmd,
                    &decision,
                    trace.as_ref(),
                    move |id| {
                        let _ = tx.send(id.to_string());
                    },
                    // The client went away while held (the relay stopped
                    // waiting): recorded as refused, never run.
                    |id| {
                        let (d, approval) = wicket_sidecar::abandoned(decision.clone(), id);
                        let approval = approval.as_ref().map(|(o, id)| (*o, id.as_str()));
                        self.audit(
                            session,
                            &sql,
                            statements.first(),
                            &d,
                            state,
                            approval,
                            started,
                        );
                    },
                );
                let (result, ()) = tokio::join!(wait, notify);
                match result {
                    ApprovalOutcome::Approved { id, covered } => {
                        if let Some(name) = &name {
                            remember(state, name, &statements, Some(id));
                            return (raw.clone(), Expect::Ack);
                        }
                        let pending = self.audit_all(
                            session,
                            &statements,
                            &decisions,
                            state,
                            Some((if covered { "covered" } else { "approved" }, &id)),
                            started,
                        );
                        return (raw.clone(), Expect::Query(pending));
                    }
                    ApprovalOutcome::Denied { id, reason } => Some(Decision::deny(
                        decision.rule.clone(),
                        format!("approval {id} was denied: {reason}"),
                    )),
                    ApprovalOutcome::Expired { id } => Some(Decision::deny(
                        decision.rule.clone(),
                        format!("approval {id} expired before anyone decided"),
                    )),
                    ApprovalOutcome::Unavailable(e) => Some(Decision::deny(
                        decision.rule.clone(),
                        format!("approval could not be obtained: {e}"),
                    )),
                }
            }
        };
        match outcome {
            // A parsed statement is recorded when it is executed.
            None if name.is_some() => {
                remember(state, name.as_deref().unwrap_or(""), &statements, None);
                (raw.clone(), Expect::Ack)
            }
            None => {
                let pending =
                    self.audit_all(session, &statements, &decisions, state, None, started);
                (raw.clone(), Expect::Query(pending))
            }
            Some(d) => {
                self.audit(session, &sql, statements.first(), &d, state, None, started);
                (
                    self.refuse(tag, body, name.as_deref(), &d, markers),
                    refused(),
                )
            }
        }
    }

    /// Decides an `Execute` again (policy, revocation or grants may have
    /// changed since `Parse`) and records the execution.
    fn gate_execute(
        &self,
        body: &Bytes,
        raw: &Bytes,
        session: &OpenSession,
        state: &GateState,
        markers: &Arc<Markers>,
    ) -> (Bytes, Option<Pending>) {
        let started = Instant::now();
        let mut pos = 0;
        let portal = codec::cstr(body, &mut pos).unwrap_or_default();
        let Some(prepared) = state
            .portals
            .get(&portal)
            .and_then(|(s, _)| state.prepared.get(s))
        else {
            // Not ours to judge (a portal the server will not know either, or a
            // statement refused at Parse): the server answers it.
            return (raw.clone(), None);
        };
        let st = &prepared.statement;
        let has_reasoning = state
            .reasoning
            .as_deref()
            .is_some_and(|r| !r.trim().is_empty());
        let mut d = self.sidecar.decide(session, &command(st), has_reasoning);
        // A statement approved at Parse runs on that approval.
        if d.effect == Effect::Review && prepared.approval.is_some() {
            d.effect = Effect::Allow;
        }
        let approval = prepared.approval.as_deref().map(|id| ("approved", id));
        match d.effect {
            Effect::Allow => {
                let id = self.audit(session, &st.text, Some(st), &d, state, approval, started);
                (
                    raw.clone(),
                    Some(Pending {
                        command_id: id,
                        started: Instant::now(),
                    }),
                )
            }
            _ => {
                let d = if d.effect == Effect::Review {
                    Decision::deny(
                        d.rule,
                        "this statement now needs approval; prepare it again",
                    )
                } else {
                    d
                };
                self.audit(session, &st.text, Some(st), &d, state, None, started);
                let nonce = mark_refusal(markers, &d);
                let mut b = BytesMut::new();
                b.extend_from_slice(nonce.as_bytes());
                b.put_u8(0);
                b.extend_from_slice(body.get(pos..).unwrap_or_default());
                let msg = codec::Message {
                    tag: b'E',
                    body: b.freeze(),
                };
                (msg.encode(), None)
            }
        }
    }

    fn gate_function_call(
        &self,
        body: &Bytes,
        raw: &Bytes,
        session: &OpenSession,
        state: &GateState,
        markers: &Arc<Markers>,
    ) -> (Bytes, Option<Pending>) {
        let started = Instant::now();
        let oid = body
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0);
        let st = Statement {
            text: format!("<function call, oid {oid}>"),
            class: wicket_core::Classification {
                kind: "function_call".into(),
                verb: "FUNCTION CALL".into(),
                risk: 70,
                ..Default::default()
            },
            flags: Vec::new(),
        };
        let has_reasoning = state
            .reasoning
            .as_deref()
            .is_some_and(|r| !r.trim().is_empty());
        let mut d = self.sidecar.decide(session, &command(&st), has_reasoning);
        if d.effect == Effect::Review {
            d = Decision::deny(d.rule, "function calls cannot be held for approval");
        }
        let id = self.audit(session, &st.text, Some(&st), &d, state, None, started);
        if d.effect == Effect::Allow {
            let pending = Pending {
                command_id: id,
                started: Instant::now(),
            };
            (raw.clone(), Some(pending))
        } else {
            (self.refuse(b'Q', body, None, &d, markers), None)
        }
    }

    fn trace(&self, state: &GateState) -> Option<ReasoningTrace> {
        let trace_id = state
            .traceparent
            .as_deref()
            .and_then(|t| t.split('-').nth(1))
            .unwrap_or("")
            .to_string();
        state.reasoning.as_ref().map(|r| ReasoningTrace {
            trace_id,
            reasoning: r.clone(),
            ..Default::default()
        })
    }

    fn audit_all(
        &self,
        session: &OpenSession,
        statements: &[Statement],
        decisions: &[Decision],
        state: &GateState,
        approval: Option<(&str, &str)>,
        started: Instant,
    ) -> VecDeque<Option<Pending>> {
        statements
            .iter()
            .zip(decisions)
            .map(|(st, d)| {
                let id = self.audit(session, &st.text, Some(st), d, state, approval, started);
                Some(Pending {
                    command_id: id,
                    started: Instant::now(),
                })
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        session: &OpenSession,
        text: &str,
        st: Option<&Statement>,
        d: &Decision,
        state: &GateState,
        approval: Option<(&str, &str)>,
        started: Instant,
    ) -> String {
        let mut e = session.event(AuditKind::Command);
        // The record holds only masked values: detectors apply to the text.
        let text = match self.mask_plan() {
            Some(plan) => plan.mask_text(text),
            None => text.to_string(),
        };
        e.command = Some(Command {
            text,
            classification: st.map(|s| s.class.clone()).unwrap_or_default(),
        });
        e.decision = Some(d.clone());
        e.reasoning = self.trace(state);
        e.traceparent = state.traceparent.clone().unwrap_or_default();
        if let Some(s) = st
            && !s.flags.is_empty()
        {
            e.details.insert("flags".into(), s.flags.join(","));
        }
        if let Some((outcome, id)) = approval {
            e.details.insert("approval".into(), id.to_string());
            e.details
                .insert("approval_outcome".into(), outcome.to_string());
        }
        e.details.insert(
            "decide_us".into(),
            started.elapsed().as_micros().to_string(),
        );
        let id = e.id.clone();
        if let Err(err) = self.sidecar.record(e) {
            tracing::error!(error = %err, "cannot record a statement");
        }
        id
    }

    /// Records how a statement ended.
    fn record_result(&self, session: &OpenSession, o: Outcome) {
        let mut e = session.bare_event(AuditKind::CommandResult);
        let d = &mut e.details;
        d.insert("command_id".into(), o.pending.command_id);
        d.insert("duration_us".into(), o.duration_us.to_string());
        if let Some(rows) = o.rows {
            d.insert("rows".into(), rows.to_string());
        }
        let status = match o.status {
            Status::Ok => "ok",
            Status::Suspended => "suspended",
            Status::Skipped => "skipped",
            Status::Error { code, message } => {
                d.insert("sqlstate".into(), code);
                d.insert("error".into(), message);
                "error"
            }
        };
        d.insert("status".into(), status.into());
        e.masked = o.masked.into_iter().collect();
        if let Err(err) = self.sidecar.record(e) {
            tracing::error!(error = %err, "cannot record a statement result");
        }
    }

    /// The in-place replacement of a refused `Query` or `Parse`.
    fn refuse(
        &self,
        tag: u8,
        body: &Bytes,
        name: Option<&str>,
        d: &Decision,
        markers: &Arc<Markers>,
    ) -> Bytes {
        self.refuse_guarded(tag, body, name, d, markers, None).0
    }

    /// [`Self::refuse`], optionally with the client's `text` after the
    /// guard statement; returns the bytes, the guard's length in characters
    /// and the marker.
    fn refuse_guarded(
        &self,
        tag: u8,
        body: &Bytes,
        name: Option<&str>,
        d: &Decision,
        markers: &Arc<Markers>,
        text: Option<&str>,
    ) -> (Bytes, usize, String) {
        let nonce = mark_refusal(markers, d);
        let guard = format!("SELECT 1 FROM \"{nonce}\"");
        let shift = guard.len() + 1;
        let sql = match text {
            Some(t) => format!("{guard};{t}"),
            None => guard,
        };
        if tag == b'Q' {
            return (build::query(&sql), shift, nonce);
        }
        // Parse: keep the statement name and the declared parameter types.
        let mut pos = 0;
        let _ = codec::cstr(body, &mut pos);
        let _ = codec::cstr(body, &mut pos);
        let rest = body.get(pos..).unwrap_or_default();
        let mut b = BytesMut::new();
        b.extend_from_slice(name.unwrap_or("").as_bytes());
        b.put_u8(0);
        b.extend_from_slice(sql.as_bytes());
        b.put_u8(0);
        b.extend_from_slice(rest);
        let msg = codec::Message {
            tag: b'P',
            body: b.freeze(),
        };
        (msg.encode(), shift, nonce)
    }
}

/// What startup ended with.
#[allow(clippy::large_enum_variant)] // built once per connection, moved once
enum Startup {
    /// The client asked for TLS and gets it: start over on the TLS stream.
    Tls,
    /// A session (or `None`: the connection ended, already answered).
    Done(Option<(OpenSession, Stream, Option<String>, String)>),
}

/// The client's half for writing, shared by the relay and approval notices.
type ClientWriter = Arc<tokio::sync::Mutex<WriteHalf<Stream>>>;

/// [`send`] on the shared client writer.
async fn send_locked(w: &ClientWriter, bytes: &[u8]) -> std::io::Result<()> {
    send(&mut *w.lock().await, bytes).await
}

/// Writes `bytes` and flushes (TLS buffers records until flushed).
async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

struct GateState {
    reasoning: Option<String>,
    traceparent: Option<String>,
    /// Statements allowed at Parse, by name, for the decision and audit at Execute.
    prepared: HashMap<String, Prepared>,
    /// SQL-level prepared statements (`PREPARE name AS …`), by name.
    sql_prepared: HashMap<String, Statement>,
    /// Portal name to statement name (from Bind).
    portals: HashMap<String, results::ShapeKey>,
}

/// A statement the client parsed and the gate allowed.
struct Prepared {
    statement: Statement,
    /// Approval that let it through, if it was held.
    approval: Option<String>,
}

/// Most named statements tracked per session (a client that never closes
/// them cannot grow the gate's memory without bound).
const MAX_PREPARED: usize = 10_000;
/// How much a client may send ahead while one of its statements is held
/// (read meanwhile only to notice that it went away); past this, its
/// socket is left unread until the hold ends.
const HELD_READ_AHEAD: usize = 1024 * 1024;

fn remember(state: &mut GateState, name: &str, statements: &[Statement], approval: Option<String>) {
    if state.prepared.len() >= MAX_PREPARED && !state.prepared.contains_key(name) {
        state.prepared.clear();
    }
    if let Some(st) = statements.first() {
        state.prepared.insert(
            name.to_string(),
            Prepared {
                statement: st.clone(),
                approval,
            },
        );
    }
}

/// Registers a one-off marker whose server error is to be rewritten into
/// `42501` naming the rule of `d`; returns the marker.
/// A refusal waiting for its server error: SQLSTATE and message to put in
/// its place, and when it was made.
struct Marker {
    code: String,
    message: String,
    at: Instant,
}

/// Refusals in flight, by marker.
type Markers = Mutex<HashMap<String, Marker>>;

/// Markers older than this are dropped whenever no reply is awaited (their
/// statement was discarded by an earlier error and will never answer).
const STALE_MARKER: Duration = Duration::from_secs(10);

fn mark_refusal(markers: &Markers, d: &Decision) -> String {
    let nonce = format!("wicket_refused_{}", uuid::Uuid::new_v4().simple());
    let message = format!("refused by rule `{}`: {}", d.rule, d.reason);
    markers.lock().expect("markers").insert(
        nonce.clone(),
        Marker {
            code: "42501".into(),
            message,
            at: Instant::now(),
        },
    );
    nonce
}

fn command(st: &Statement) -> Command {
    Command {
        text: st.text.clone(),
        classification: st.class.clone(),
    }
}

/// Takes the whole server messages out of `buf` and returns what the client
/// gets: the same bytes, but for errors answering refused statements, which
/// become ours (42501 naming the rule), and the server's own syntax errors
/// for guarded statements, whose position is put back. Every message also
/// goes through the result tracker; finished statements land in `done`.
/// What the downstream relay needs to mask (when the policy masks anything).
struct Masker<'a> {
    plan: &'a mask::Plan,
    masking: &'a mask::Masking,
    database: &'a str,
    shape: &'a mut Arc<mask::Shape>,
    shapes: &'a mask::Shapes,
    copy: &'a mut Option<Arc<mask::CopyPlan>>,
}

fn downstream(
    buf: &mut BytesMut,
    markers: &Markers,
    tracker: &Mutex<Tracker>,
    done: &mut Vec<Outcome>,
    mut masking: Option<Masker<'_>>,
) -> Bytes {
    let mut t = tracker.lock().expect("tracker");
    let mut m = markers.lock().expect("markers");
    let mut out = BytesMut::new();
    let (mut run, mut at) = (0, 0);
    let mut tally = mask::Tally::new();
    while buf.len() >= at + 5 {
        let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
        if len < 4 || buf.len() < at + 1 + len {
            break;
        }
        let tag = buf[at];
        let body = &buf[at + 5..at + 1 + len];
        let finished = done.len();
        let guarded = t.on_server(tag, body, done);
        if tag == b'Z' && t.is_idle() && !m.is_empty() {
            m.retain(|_, mk| mk.at.elapsed() < STALE_MARKER);
        }
        // The answer to the gate's own Describe never reaches the client.
        let swallow = if matches!(tag, b'T' | b'n') {
            t.take_swallow()
        } else {
            None
        };
        let mut replacement = swallow.is_some().then(Bytes::new);
        let announced = t.take_shape();
        let announced_copy = t.take_copy();
        if tag == b'E'
            && (guarded.is_some() || !m.is_empty())
            && let Some(r) = rewrite_error(body, guarded, &mut m)
        {
            replacement = Some(r);
        } else if let Some(mk) = masking.as_mut() {
            if let Some(shape) = announced {
                *mk.shape = shape;
            }
            if announced_copy.is_some() {
                *mk.copy = announced_copy;
            }
            let masked = match tag {
                b'T' => {
                    *mk.shape = Arc::new(mk.masking.shape(mk.plan, mk.database, body));
                    if let Some(key) = swallow {
                        mk.shapes
                            .put(key, mk.shape.clone(), mk.masking.generation());
                    }
                    None
                }
                b'D' => mask::data_row(mk.plan, mk.shape, body, &mut tally),
                b'E' | b'N' => mask::notice(mk.plan, tag, body, &mut tally),
                b'A' => mask::notification(mk.plan, body, &mut tally),
                b'd' => match mk.copy.as_deref() {
                    Some(cp) => mask::copy_row(mk.plan, cp, body, &mut tally),
                    None => mask::copy_data(mk.plan, body, &mut tally),
                },
                b'c' | b'Z' => {
                    *mk.copy = None;
                    None
                }
                b'C' => {
                    // DDL may rename, move, add or drop masked columns.
                    if [&b"ALTER"[..], b"CREATE", b"DROP"]
                        .iter()
                        .any(|p| body.starts_with(p))
                    {
                        mk.masking.invalidate();
                    }
                    None
                }
                _ => None,
            };
            replacement = replacement.or(masked);
        }
        if done.len() > finished && !tally.is_empty() {
            done[finished].masked = std::mem::take(&mut tally).into_iter().collect();
        }
        if let Some(replacement) = replacement {
            if out.is_empty() {
                out.reserve(buf.len());
            }
            out.extend_from_slice(&buf[run..at]);
            out.extend_from_slice(&replacement);
            run = at + 1 + len;
        }
        at += 1 + len;
    }
    let whole = buf.split_to(at);
    let fwd = if run == 0 {
        whole.freeze()
    } else {
        out.extend_from_slice(&whole[run..]);
        out.freeze()
    };
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(64 * 1024);
    }
    fwd
}

/// The result-column format codes of a Bind message (the bytes after its
/// parameters), which decide how rows come back.
fn bind_result_formats(body: &[u8]) -> Option<Bytes> {
    let mut pos = 0;
    codec::cstr(body, &mut pos)?;
    codec::cstr(body, &mut pos)?;
    let be16 = |at: usize| {
        body.get(at..at + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
    };
    let formats = be16(pos)?.max(0) as usize;
    pos += 2 + 2 * formats;
    let params = be16(pos)?.max(0) as usize;
    pos += 2;
    for _ in 0..params {
        let len = body
            .get(pos..pos + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))?;
        pos += 4 + len.max(0) as usize;
    }
    Some(Bytes::copy_from_slice(body.get(pos..)?))
}

/// The COPY of a table to the client a Query starts with, if any.
fn copy_of(body: &[u8]) -> Option<mask::CopyOut> {
    let mut pos = 0;
    let sql = codec::cstr(body, &mut pos)?;
    let head = sql.trim_start().get(..4)?;
    if !head.eq_ignore_ascii_case("copy") {
        return None;
    }
    mask::copy_out(&sql)
}

/// A Describe of `portal` (the gate's own, for masking).
fn describe_portal(portal: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(portal.len() + 7);
    b.put_u8(b'D');
    b.put_i32((portal.len() + 6) as i32);
    b.put_u8(b'P');
    b.extend_from_slice(portal.as_bytes());
    b.put_u8(0);
    b.freeze()
}

/// The client's version of a server error, if it differs.
fn rewrite_error(
    body: &[u8],
    guarded: Option<GuardedError>,
    markers: &mut HashMap<String, Marker>,
) -> Option<Bytes> {
    let fields = codec::error_fields(body);
    let get = |c: u8| {
        fields
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.as_str())
    };
    let text = get(b'M').unwrap_or("");
    let refusal = |code: &str, message: &str| {
        build::error(
            b'E',
            "ERROR",
            code,
            message,
            None,
            Some("ask an approver, or see `wicket policy explain`"),
        )
    };
    // A refused statement's marker failed: our refusal instead.
    if let Some(key) = markers.keys().find(|k| text.contains(k.as_str())).cloned() {
        let m = markers.remove(&key)?;
        return Some(refusal(&m.code, &m.message));
    }
    let g = guarded?;
    let refused = markers.remove(&g.nonce);
    let position = get(b'P').and_then(|p| p.parse::<usize>().ok());
    // A Query's guard only fails by naming its marker (handled above): any
    // other error is the server's parser rejecting the client's text. A
    // Parse that the server could parse fails for holding two statements,
    // an error without a position.
    match position.or(g.query.then_some(0)) {
        Some(0) => Some(
            codec::Message {
                tag: b'E',
                body: Bytes::copy_from_slice(body),
            }
            .encode(),
        ),
        // The server's parser rejected the client's text: its own error,
        // with the position in the client's text.
        Some(p) => {
            let mut b = BytesMut::new();
            for (k, v) in &fields {
                b.put_u8(*k);
                if *k == b'P' {
                    b.extend_from_slice(p.saturating_sub(g.shift).max(1).to_string().as_bytes());
                } else {
                    b.extend_from_slice(v.as_bytes());
                }
                b.put_u8(0);
            }
            b.put_u8(0);
            Some(
                codec::Message {
                    tag: b'E',
                    body: b.freeze(),
                }
                .encode(),
            )
        }
        // Anything else (the server parsed what we could not): refused.
        None => {
            let (code, message) = refused.map(|m| (m.code, m.message)).unwrap_or_else(|| {
                (
                    "42501".into(),
                    "refused: the gate could not parse this statement".into(),
                )
            });
            Some(refusal(&code, &message))
        }
    }
}
