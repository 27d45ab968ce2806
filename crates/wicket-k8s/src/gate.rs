//! The gate: TLS listener, authentication, sessions, decisions, and the
//! forwarding of ordinary (non-upgrade) requests.
//!
//! Sessions are per caller token: every request carrying the same token
//! shares one audit session (kubectl opens several connections per
//! command), which ends when the token expires, the caller is revoked, an
//! admin terminates it, or it sits idle for `idle_session`. Requests and
//! streams in flight end with it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use wicket_core::{AuditKind, Command, Decision, Effect};
use wicket_mask::Masker;
use wicket_sidecar::web::{self, SessionRefused, TokenSessions, Tracked};
use wicket_sidecar::{CallerTrace, LiveSession, Sidecar};

use crate::classify::{ApiRequest, classify};
use crate::redact::{self, JsonSplitter};
use crate::{CarriedReasoning, exec, spdy};

pub use wicket_sidecar::web::{Body, BoxError};

/// Where the gate's own credential for the API server comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// No bearer token (a client certificate in the upstream TLS config).
    None,
    /// A fixed token.
    Static(String),
    /// A file re-read every minute (projected service-account tokens rotate).
    File(PathBuf),
}

/// The API server.
#[derive(Clone)]
pub struct Upstream {
    /// `host:port` to dial.
    pub addr: String,
    /// Name its certificate is checked against.
    pub server_name: rustls::pki_types::ServerName<'static>,
    /// `Host` header value.
    pub authority: String,
    /// TLS settings (CA, optional client certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// Bearer token.
    pub token: TokenSource,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Gate settings.
#[derive(Debug, Clone)]
pub struct K8sConfig {
    /// The API server.
    pub upstream: Upstream,
    /// The gate's serving certificate.
    pub tls: Arc<rustls::ServerConfig>,
    /// Key for hashed masking.
    pub mask_key: Vec<u8>,
    /// Largest request body forwarded (the API server's own limit is 3 MiB).
    pub max_request_bytes: usize,
    /// Largest Secret response buffered for redaction (lists of Secrets).
    pub max_redact_bytes: usize,
    /// Largest WebSocket frame relayed on exec and attach.
    pub max_frame_bytes: usize,
    /// A session with no request for this long ends.
    pub idle_session: Duration,
    /// Prefix of the impersonated user name (`oidc:` to match an API
    /// server's own OIDC settings, for example).
    pub username_prefix: String,
    /// Prefix of impersonated group names.
    pub group_prefix: String,
}

impl K8sConfig {
    /// Settings with defaults for everything but the upstream and the certificate.
    pub fn new(upstream: Upstream, tls: Arc<rustls::ServerConfig>) -> K8sConfig {
        K8sConfig {
            upstream,
            tls,
            mask_key: Vec::new(),
            max_request_bytes: 3 * 1024 * 1024,
            max_redact_bytes: 64 * 1024 * 1024,
            max_frame_bytes: 4 * 1024 * 1024,
            idle_session: Duration::from_secs(15 * 60),
            username_prefix: String::new(),
            group_prefix: String::new(),
        }
    }
}

/// The gate, shared by every connection.
pub struct KubeGate {
    pub(crate) sidecar: Arc<Sidecar>,
    pub(crate) cfg: K8sConfig,
    sessions: Arc<TokenSessions>,
    masker: wicket_sidecar::masking::MaskerCache,
    token: std::sync::Mutex<(Option<Instant>, String)>,
}

impl std::fmt::Debug for KubeGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeGate")
            .field("upstream", &self.cfg.upstream)
            .finish()
    }
}

/// Per client connection: its address and its upstream connection (HTTP/1.1
/// serves one request at a time, so one upstream connection suffices).
struct Conn {
    client_addr: String,
    upstream: tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<Body>>>,
}

/// A full response.
fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(web::full(body))
        .expect("static response")
}

/// A Kubernetes `Status` failure, which kubectl prints as
/// `Error from server (REASON): MESSAGE`.
pub fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    reply(code, "application/json", body.to_string())
}

/// The refusal of a denied request.
pub(crate) fn forbidden(d: &Decision) -> Response<Body> {
    status(StatusCode::FORBIDDEN, "Forbidden", &denial_message(d))
}

pub(crate) fn denial_message(d: &Decision) -> String {
    format!("wicket: denied by rule {}: {}", d.rule, d.reason)
}

/// Answers up to this size (with a `Content-Length`) are read whole before
/// they are sent on.
const SMALL_BODY: usize = 256 * 1024;

/// Request headers the gate consumes or sets itself (besides the
/// hop-by-hop ones).
const OWN: &[&str] = &[
    "content-length",
    "host",
    "authorization",
    "wicket-reasoning",
];

/// Copies the end-to-end headers of a request.
pub(crate) fn forwardable(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(h.len() + 4);
    for (k, v) in h {
        let n = k.as_str();
        if web::HOP_BY_HOP.contains(&n)
            || OWN.contains(&n)
            || n.starts_with("impersonate-")
            || n.starts_with("sec-websocket-")
        {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

/// Asks for JSON where the client accepts protobuf, so the gate can read
/// what comes back.
fn json_accept(h: &mut HeaderMap) {
    let Some(v) = h.get("accept").and_then(|v| v.to_str().ok()) else {
        return;
    };
    if !v.contains("protobuf") {
        return;
    }
    let kept: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|p| !p.contains("protobuf"))
        .collect();
    let value = if kept.is_empty() {
        "application/json".to_string()
    } else {
        kept.join(",")
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert("accept", v);
    }
}

/// Serves `listener` until `shutdown`; then stops accepting (the caller drains).
pub async fn serve(
    gate: Arc<KubeGate>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(gate.cfg.tls.clone());
    let sweeper = gate.sessions.sweep_forever();
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) =
        wicket_sidecar::process::next_connection(&listener, &mut shutdown, &gate.sidecar).await
    {
        let gate = gate.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let conn = Arc::new(Conn {
                client_addr: peer.to_string(),
                upstream: tokio::sync::Mutex::new(None),
            });
            let svc = service_fn(move |req| {
                let gate = gate.clone();
                let conn = conn.clone();
                async move { Ok::<_, std::convert::Infallible>(gate.handle(conn, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades()
                .await;
        });
    }
    sweeper.abort();
}

impl KubeGate {
    /// A gate over `sidecar`.
    pub fn new(sidecar: Arc<Sidecar>, cfg: K8sConfig) -> Arc<KubeGate> {
        Arc::new(KubeGate {
            sessions: Arc::new(TokenSessions::new(sidecar.clone(), cfg.idle_session)),
            sidecar,
            cfg,
            masker: Default::default(),
            token: std::sync::Mutex::new((None, String::new())),
        })
    }

    /// The detectors' masker under the current bundle.
    pub(crate) fn masker(&self) -> Option<Arc<Masker>> {
        self.masker.current(&self.sidecar, &self.cfg.mask_key)
    }

    /// Number of sessions the gate holds.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The session of a token, or the refusal to send.
    async fn session_for(
        &self,
        token: &str,
        client_addr: &str,
        client_app: &str,
    ) -> Result<Arc<LiveSession>, Response<Body>> {
        self.sessions
            .session_for(token, client_addr, || client_app.to_string())
            .await
            .map_err(|r| match r {
                SessionRefused::Unauthorized(e) => status(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    &format!("wicket: {e}"),
                ),
                SessionRefused::Forbidden(d) => forbidden(&d),
            })
    }

    /// The gate's bearer token for the API server.
    pub(crate) fn upstream_token(&self) -> Option<String> {
        match &self.cfg.upstream.token {
            TokenSource::None => None,
            TokenSource::Static(t) => Some(t.clone()),
            TokenSource::File(path) => {
                let mut g = self.token.lock().expect("token");
                let fresh = g.0.is_some_and(|at| at.elapsed() < Duration::from_secs(60));
                if !fresh {
                    match std::fs::read_to_string(path) {
                        Ok(t) => *g = (Some(Instant::now()), t.trim().to_string()),
                        Err(e) => {
                            tracing::error!(path = %path.display(), error = %e, "cannot read the upstream token")
                        }
                    }
                }
                Some(g.1.clone()).filter(|t| !t.is_empty())
            }
        }
    }

    /// The user and groups the API server is told the caller is.
    pub(crate) fn impersonation(&self, live: &LiveSession) -> (String, Vec<String>) {
        let p = &live.principal;
        let user = format!("{}{}", self.cfg.username_prefix, p.subject);
        let groups = p
            .groups
            .iter()
            .map(|g| format!("{}{g}", self.cfg.group_prefix))
            .collect();
        (user, groups)
    }

    /// Adds the gate's credential and the caller's impersonation headers.
    pub(crate) fn upstream_headers(
        &self,
        live: &LiveSession,
        h: &mut HeaderMap,
    ) -> Result<(), String> {
        if let Some(t) = self.upstream_token() {
            h.insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| "the upstream token is not a valid header value")?,
            );
        }
        let (user, groups) = self.impersonation(live);
        let bad = |what: &str| format!("the caller's {what} cannot be sent as a header");
        h.insert(
            "impersonate-user",
            HeaderValue::from_str(&user).map_err(|_| bad("name"))?,
        );
        for g in groups {
            h.append(
                "impersonate-group",
                HeaderValue::from_str(&g).map_err(|_| bad("group"))?,
            );
        }
        h.insert(
            "impersonate-extra-wicket-session",
            HeaderValue::from_str(&live.id).map_err(|_| bad("session id"))?,
        );
        h.insert(
            "host",
            HeaderValue::from_str(&self.cfg.upstream.authority)
                .map_err(|_| "bad upstream authority")?,
        );
        Ok(())
    }

    /// A new TLS connection to the API server.
    pub(crate) async fn dial(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let up = &self.cfg.upstream;
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&up.addr),
        )
        .await
        .map_err(|_| format!("connecting to the API server {} timed out", up.addr))?
        .map_err(|e| format!("cannot reach the API server {}: {e}", up.addr))?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(up.tls.clone())
            .connect(up.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS with the API server {} failed: {e}", up.addr))
    }

    async fn send_upstream(
        &self,
        conn: &Conn,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, String> {
        let mut slot = conn.upstream.lock().await;
        let reused = match slot.take() {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match reused {
            Some(s) => s,
            None => {
                let tls = self.dial().await?;
                let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| format!("HTTP with the API server failed: {e}"))?;
                tokio::spawn(async move {
                    let _ = c.await;
                });
                s
            }
        };
        let resp = sender.send_request(req).await;
        *slot = Some(sender);
        resp.map_err(|e| format!("the API server did not answer: {e}"))
    }

    /// The command as audited: its text with the detectors applied.
    fn command(&self, api: &ApiRequest) -> Command {
        let text = api.text();
        let text = match self.masker() {
            Some(m) => m.mask(&text).0.into_owned(),
            None => text,
        };
        Command {
            text,
            classification: api.classification(),
        }
    }

    /// The request's audit details: who the API server is told the caller
    /// is, the request's attributes, and `extra`.
    fn details(
        &self,
        live: &LiveSession,
        api: &ApiRequest,
        extra: &[(&str, String)],
    ) -> Vec<(String, String)> {
        let (user, groups) = self.impersonation(live);
        let mut d = vec![
            ("impersonate_user".to_string(), user),
            ("impersonate_groups".to_string(), groups.join(",")),
        ];
        for (k, v) in [
            ("group", &api.group),
            ("resource", &api.resource),
            ("subresource", &api.subresource),
            ("namespace", &api.namespace),
            ("name", &api.name),
        ] {
            if !v.is_empty() {
                d.push((k.into(), v.clone()));
            }
        }
        d.extend(extra.iter().map(|(k, v)| ((*k).to_string(), v.clone())));
        d
    }

    /// Decides a request (holding it for approval when policy says so) and
    /// records the decision; returns it with the command event's id.
    pub(crate) async fn decide(
        &self,
        live: &LiveSession,
        api: &ApiRequest,
        trace: &CallerTrace,
        details: &[(&str, String)],
        on_pending: impl FnOnce(&str),
    ) -> (Decision, String) {
        let details = self.details(live, api, details);
        self.sidecar
            .decide_and_record(
                live,
                self.command(api),
                trace,
                |id, _| on_pending(id),
                details,
            )
            .await
    }

    /// Records how a request ended.
    pub(crate) fn result(
        &self,
        live: &LiveSession,
        command_id: &str,
        details: &[(&str, String)],
        masked: &[(String, u64)],
    ) {
        let mut e = live.bare_event(AuditKind::CommandResult);
        e.details
            .insert("command_id".into(), command_id.to_string());
        for (k, v) in details {
            e.details.insert((*k).into(), v.clone());
        }
        for (k, n) in masked {
            if *n > 0 {
                e.masked.insert(k.clone(), *n);
            }
        }
        if let Err(err) = self.sidecar.record(e) {
            tracing::error!(error = %err, "cannot record a result");
        }
    }

    /// Whether policy lets this caller see Secret values (a rule allowing
    /// the command kind `secret_values`).
    fn may_reveal(&self, live: &LiveSession, api: &ApiRequest, trace: &CallerTrace) -> bool {
        let cmd = Command {
            text: format!("reveal {}", api.object()),
            classification: wicket_core::Classification {
                kind: "secret_values".into(),
                verb: api.verb.clone(),
                objects: vec![api.object()],
                risk: 60,
                ..Default::default()
            },
        };
        self.sidecar
            .evaluate(live, &cmd, trace.has_reasoning())
            .effect
            == Effect::Allow
    }

    async fn handle(self: Arc<Self>, conn: Arc<Conn>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        // Everything read from the headers is taken before the first await.
        let (bearer, client_app, trace, impersonate, upgrade) = {
            let h = req.headers();
            let bearer = web::bearer(h);
            let client_app = web::user_agent(h);
            let carried = bearer.as_deref().and_then(|b| CarriedReasoning::split(b).1);
            let trace = web::caller_trace(h, carried);
            let impersonate = h
                .keys()
                .find(|k| k.as_str().starts_with("impersonate-"))
                .map(|k| k.as_str().to_string());
            let upgrade = h
                .get("upgrade")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.to_ascii_lowercase());
            (bearer, client_app, trace, impersonate, upgrade)
        };
        let Some(bearer) = bearer else {
            return status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "wicket: send an OIDC access token as a bearer token (kubectl: use `wicket kube-credential`, see `wicket kube config`)",
            );
        };
        let token = CarriedReasoning::split(&bearer).0;
        let live = match self
            .session_for(token, &conn.client_addr, &client_app)
            .await
        {
            Ok(l) => l,
            Err(resp) => return resp,
        };
        let api = classify(req.method(), req.uri().path(), req.uri().query());
        if let Some(n) = req
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && n > self.cfg.max_request_bytes as u64
        {
            let d = Decision::deny(
                "request-too-large",
                format!(
                    "the request body is over the gate's limit of {} bytes",
                    self.cfg.max_request_bytes
                ),
            );
            self.decide_fixed(&live, &api, &trace, d);
            return too_large(self.cfg.max_request_bytes);
        }
        if api.kind() == "discovery" {
            // Discovery is metadata every client needs before anything else;
            // it is forwarded (under the caller's identity, never a claimed
            // one) without a decision. kubectl shows no message for a refused
            // discovery, so a forged impersonation is refused on the request
            // that follows.
            return match self.forward(&conn, &live, &api, req, None).await {
                Ok((resp, _)) => resp,
                Err(resp) => resp,
            };
        }
        if let Some(name) = impersonate {
            let d = Decision::deny(
                "impersonation",
                format!(
                    "the gate impersonates the verified caller itself; a request may not carry {name} (kubectl --as is not supported)"
                ),
            );
            let (d, _) = self.decide_fixed(&live, &api, &trace, d);
            return forbidden(&d);
        }
        match upgrade.as_deref() {
            Some("websocket") if matches!(api.kind(), "exec" | "port_forward") => {
                return exec::upgrade(self.clone(), live, api, trace, req);
            }
            Some("spdy/3.1") if matches!(api.kind(), "exec" | "port_forward") => {
                return spdy::upgrade(self.clone(), live, api, trace, req).await;
            }
            Some(_) | None if matches!(api.kind(), "exec" | "port_forward") => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "wicket: exec, attach and port-forward need a WebSocket or SPDY/3.1 upgrade",
                );
            }
            _ => {}
        }
        let reveal = api.resource == "secrets" && self.may_reveal(&live, &api, &trace);
        let mut extra = Vec::new();
        if api.resource == "secrets" {
            extra.push((
                "secret_values",
                if reveal { "shown" } else { "redacted" }.to_string(),
            ));
        }
        let (d, id) = self.decide(&live, &api, &trace, &extra, no_note).await;
        if d.effect != Effect::Allow {
            return forbidden(&d);
        }
        let transform = if api.resource == "secrets" && !reveal {
            Some(Transform::Redact {
                watch: api.verb == "watch",
            })
        } else if api.subresource == "log" {
            self.masker().map(Transform::MaskLines)
        } else {
            None
        };
        match self.forward(&conn, &live, &api, req, transform).await {
            Ok((resp, redacted)) => {
                let code = resp.status().as_u16();
                let gate = self.clone();
                let live2 = live.clone();
                let done = move |bytes: u64, complete: bool| {
                    gate.result(
                        &live2,
                        &id,
                        &[
                            ("status", code.to_string()),
                            ("bytes_out", bytes.to_string()),
                            ("duration_ms", started.elapsed().as_millis().to_string()),
                            ("complete", complete.to_string()),
                        ],
                        &[("secret_value".to_string(), redacted)],
                    );
                };
                let (parts, body) = resp.into_parts();
                let tracked = Tracked::new(body, live.guard.end_signal(), Box::new(done));
                Response::from_parts(parts, tracked.boxed_unsync())
            }
            Err(resp) => {
                self.result(
                    &live,
                    &id,
                    &[
                        ("status", resp.status().as_u16().to_string()),
                        ("duration_ms", started.elapsed().as_millis().to_string()),
                    ],
                    &[],
                );
                resp
            }
        }
    }

    /// Records a decision taken by the gate itself (no policy lookup).
    fn decide_fixed(
        &self,
        live: &LiveSession,
        api: &ApiRequest,
        trace: &CallerTrace,
        d: Decision,
    ) -> (Decision, String) {
        let details = self.details(live, api, &[]);
        self.sidecar
            .record_command(live, self.command(api), d, trace, None, details)
    }

    /// Forwards a request and returns the response with its body (transformed
    /// as asked), or a `Status` when the API server cannot be reached.
    async fn forward(
        &self,
        conn: &Conn,
        live: &LiveSession,
        api: &ApiRequest,
        req: Request<Incoming>,
        transform: Option<Transform>,
    ) -> Result<(Response<Body>, u64), Response<Body>> {
        let (parts, body) = req.into_parts();
        // A declared oversized body was refused in `handle`; a chunked one
        // is caught by `read_body`.
        let mut headers = forwardable(&parts.headers);
        if transform.is_some() {
            json_accept(&mut headers);
            if matches!(transform, Some(Transform::Redact { .. })) {
                headers.insert("accept", HeaderValue::from_static("application/json"));
                headers.remove("accept-encoding");
            }
        }
        self.upstream_headers(live, &mut headers).map_err(|e| {
            status(
                StatusCode::BAD_GATEWAY,
                "InternalError",
                &format!("wicket: {e}"),
            )
        })?;
        let uri = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let body: Body = if parts.method == Method::GET || parts.method == Method::HEAD {
            web::empty()
        } else {
            // Request bodies (objects, patches) are read whole before
            // anything reaches the API server, so an oversized one, declared
            // or chunked, is refused there and then; the bound is the API
            // server's own.
            let bytes = read_body(body, self.cfg.max_request_bytes).await?;
            web::full(bytes)
        };
        let mut up = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(body)
            .map_err(|e| {
                status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("wicket: {e}"),
                )
            })?;
        *up.headers_mut() = headers;
        let resp = match self.send_upstream(conn, up).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, object = %api.object(), "upstream request failed");
                return Err(status(
                    StatusCode::BAD_GATEWAY,
                    "InternalError",
                    &format!("wicket: {e}"),
                ));
            }
        };
        let (mut rparts, rbody) = resp.into_parts();
        for n in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
        ] {
            rparts.headers.remove(n);
        }
        let small = rparts
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n <= SMALL_BODY);
        let body = match (small, &transform) {
            // A small answer of known length is read whole, so the client
            // gets headers and body in one write (and one TLS record).
            (Some(_), None) => {
                let bytes = rbody.collect().await.map(|b| b.to_bytes()).map_err(|e| {
                    status(
                        StatusCode::BAD_GATEWAY,
                        "InternalError",
                        &format!("wicket: the API server's answer broke off: {e}"),
                    )
                })?;
                web::full(bytes)
            }
            _ => rbody.map_err(box_error).boxed_unsync(),
        };
        let (body, counts) = match transform {
            None => (body, 0),
            Some(t) => {
                if t.is_redact() && !is_json(&rparts.headers) && rparts.status.is_success() {
                    return Err(status(
                        StatusCode::BAD_GATEWAY,
                        "InternalError",
                        "wicket: the API server answered a Secret request with something other than JSON; refusing to pass it unredacted",
                    ));
                }
                if let Transform::Redact { watch: false } = &t {
                    rparts.headers.remove("content-length");
                    redact_whole(body, self.cfg.max_redact_bytes).await?
                } else {
                    rparts.headers.remove("content-length");
                    (stream_transform(body, t, self.cfg.max_redact_bytes), 0)
                }
            }
        };
        Ok((Response::from_parts(rparts, body), counts))
    }
}

/// Bytes of an oversized request body read and dropped before the 413 is
/// sent, so a client still uploading sees the answer rather than a reset.
const DRAIN_BYTES: u64 = 16 * 1024 * 1024;

/// Reads a request body of at most `max` bytes. A longer one is refused
/// (413) after the rest of it is read and dropped, up to [`DRAIN_BYTES`]
/// or five seconds: memory stays bounded by `max` either way.
async fn read_body(mut body: Incoming, max: usize) -> Result<Bytes, Response<Body>> {
    let mut buf = bytes::BytesMut::new();
    let mut over = false;
    let mut seen: u64 = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("wicket: cannot read the request body: {e}"),
            )
        })?;
        let Ok(d) = frame.into_data() else { continue };
        seen += d.len() as u64;
        if !over && buf.len() + d.len() > max {
            over = true;
            buf = bytes::BytesMut::new();
        }
        if over {
            if seen > max as u64 + DRAIN_BYTES || Instant::now() > deadline {
                break;
            }
        } else {
            buf.extend_from_slice(&d);
        }
    }
    if over {
        return Err(too_large(max));
    }
    Ok(buf.freeze())
}

fn too_large(max: usize) -> Response<Body> {
    status(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        &format!("wicket: the request body is over the gate's limit of {max} bytes"),
    )
}

fn is_json(h: &HeaderMap) -> bool {
    h.get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// How a response body is changed on its way back.
enum Transform {
    /// Redact Secret values (`watch`: a stream of events).
    Redact { watch: bool },
    /// Mask each line with the detectors (`pods/log`).
    MaskLines(Arc<Masker>),
}

impl Transform {
    fn is_redact(&self) -> bool {
        matches!(self, Transform::Redact { .. })
    }
}

async fn redact_whole(mut body: Body, max: usize) -> Result<(Body, u64), Response<Body>> {
    let unreadable = |why: String| {
        status(
            StatusCode::BAD_GATEWAY,
            "InternalError",
            &format!("wicket: cannot read the API server's answer for redaction: {why}"),
        )
    };
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| unreadable(e.to_string()))?;
        if let Ok(d) = frame.into_data() {
            if bytes.len() + d.len() > max {
                return Err(unreadable(format!("it is over {max} bytes")));
            }
            bytes.extend_from_slice(&d);
        }
    }
    let mut v: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => {
            return Err(status(
                StatusCode::BAD_GATEWAY,
                "InternalError",
                "wicket: the API server's answer is not JSON; refusing to pass a Secret unredacted",
            ));
        }
    };
    let n = redact::redact(&mut v);
    let out = serde_json::to_vec(&v).unwrap_or_default();
    Ok((
        Full::new(Bytes::from(out))
            .map_err(|never| match never {})
            .boxed_unsync(),
        n,
    ))
}

/// Transforms a streamed body chunk by chunk in a task; ends the output
/// with an error (the client sees a cut stream) when the input is bad.
fn stream_transform(mut body: Body, t: Transform, max: usize) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(8);
    tokio::spawn(async move {
        let mut splitter = JsonSplitter::default();
        let mut line: Vec<u8> = Vec::new();
        while let Some(data) = web::next_data(&mut body).await {
            let data = match data {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let out: Result<Vec<u8>, String> = match &t {
                Transform::Redact { .. } => splitter.push(&data, max).map(|values| {
                    let mut out = Vec::new();
                    for v in values {
                        match serde_json::from_slice::<serde_json::Value>(&v) {
                            Ok(mut v) => {
                                redact::redact(&mut v);
                                out.extend_from_slice(&serde_json::to_vec(&v).unwrap_or_default());
                                out.push(b'\n');
                            }
                            Err(_) => return Vec::new(),
                        }
                    }
                    out
                }),
                Transform::MaskLines(m) => {
                    line.extend_from_slice(&data);
                    let cut = line
                        .iter()
                        .rposition(|b| *b == b'\n')
                        .map(|i| i + 1)
                        .unwrap_or(0);
                    let whole: Vec<u8> = if cut > 0 {
                        line.drain(..cut).collect()
                    } else if line.len() > 64 * 1024 {
                        std::mem::take(&mut line)
                    } else {
                        Vec::new()
                    };
                    let text = String::from_utf8_lossy(&whole);
                    Ok(m.mask(&text).0.into_owned().into_bytes())
                }
            };
            match out {
                Ok(o) if o.is_empty() => {}
                Ok(o) => {
                    if tx.send(Ok(Frame::data(Bytes::from(o)))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
        if let Transform::MaskLines(m) = &t
            && !line.is_empty()
        {
            let text = String::from_utf8_lossy(&line);
            let _ = tx
                .send(Ok(Frame::data(Bytes::from(m.mask(&text).0.into_owned()))))
                .await;
        }
    });
    web::channel_body(rx)
}

/// No note while a plain request is held (HTTP has nowhere to say it).
fn no_note(_approval: &str) {}

fn box_error(e: hyper::Error) -> BoxError {
    Box::new(e)
}
