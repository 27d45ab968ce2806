//! The gate: listener (HTTP/1.1 and HTTP/2, cleartext or TLS),
//! authentication, classification, decisions, and the streaming relay of
//! requests, responses and upgrades.
//!
//! Sessions are per caller token (every request carrying the same token
//! shares one audit session); each request is one `command` event (its
//! decision) and one `command_result` event (status, bytes, duration,
//! masking counts, optional captured bodies).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use wicket_core::{AuditKind, Command, Decision, Effect};
use wicket_policy::http::normalize_path;
use wicket_policy::jsonpath::JsonPath;
use wicket_sidecar::web::{
    self, Body, BoxError, SessionRefused, TokenSessions, Tracked, problem_with,
};
use wicket_sidecar::{CallerTrace, LiveSession, Sidecar};

use crate::classify::{HttpRequest, cap, field_value};
use crate::framing::Watched;
use crate::mask::{BodyKind, MaskJob, Plan, PlanCache, Tally, body_kind, mask_body, mask_whole};
use crate::upstream::{Credential, CredentialCache, Upstream};
use wicket_sidecar::login::{Login, LoginConfig, OWN_PREFIX, wants_login};

/// Gate settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Serve TLS with this (ALPN `h2` and `http/1.1`); `None`: cleartext
    /// (HTTP/1.1, and HTTP/2 by prior knowledge).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The credential added to upstream requests.
    pub credential: Credential,
    /// Key for hashed masking.
    pub mask_key: Vec<u8>,
    /// Largest request body relayed (a route may set its own).
    pub max_request_bytes: u64,
    /// Largest JSON request body read for its fields.
    pub max_inspect_bytes: usize,
    /// Largest JSON response parsed whole for masking.
    pub max_mask_bytes: usize,
    /// Bytes of each request and response body kept in the audit (masked); 0: none.
    pub capture_bytes: usize,
    /// A session with no request for this long ends.
    pub idle_session: Duration,
    /// A request body that sends nothing for this long is cut (slow clients).
    pub body_idle: Duration,
    /// How long a client may take to send a request's headers (slowloris).
    pub header_timeout: Duration,
    /// How long the upstream may take to start answering.
    pub upstream_timeout: Duration,
    /// Browser login (OIDC authorization code with PKCE, session cookie).
    pub login: Option<LoginConfig>,
}

impl HttpConfig {
    /// Defaults for everything.
    pub fn new() -> HttpConfig {
        HttpConfig {
            tls: None,
            credential: Credential::None,
            mask_key: Vec::new(),
            max_request_bytes: 2 << 30,
            max_inspect_bytes: 1 << 20,
            max_mask_bytes: 32 << 20,
            capture_bytes: 0,
            idle_session: Duration::from_secs(15 * 60),
            body_idle: Duration::from_secs(60),
            header_timeout: Duration::from_secs(30),
            upstream_timeout: Duration::from_secs(300),
            login: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig::new()
    }
}

/// The gate, shared by every connection.
pub struct HttpGate {
    sidecar: Arc<Sidecar>,
    cfg: HttpConfig,
    upstream: Upstream,
    credential: CredentialCache,
    sessions: Arc<TokenSessions>,
    plans: PlanCache,
    login: Option<Login>,
}

impl std::fmt::Debug for HttpGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpGate")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// A problem document (RFC 9457).
pub use wicket_sidecar::web::problem;

/// The refusal of a denied request: 403, naming the rule.
pub fn forbidden(d: &Decision) -> Response<Body> {
    problem_with(
        StatusCode::FORBIDDEN,
        "denied",
        &format!("wicket: denied by rule {}: {}", d.rule, d.reason),
        Some(&d.rule),
    )
}

/// Answers up to this size (with a `Content-Length`) are read whole before
/// they are sent on.
const SMALL_BODY: usize = 64 * 1024;

/// Headers about one hop, never forwarded either way.
const HOP: &[&str] = web::HOP_BY_HOP;

/// Request headers the gate consumes or sets itself.
const OWN: &[&str] = &[
    "host",
    "authorization",
    "wicket-reasoning",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

/// The names a `Connection` header lists (also hop-by-hop).
fn connection_listed(h: &HeaderMap) -> Vec<String> {
    h.get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The end-to-end request headers.
fn forwardable(h: &HeaderMap, upgrade: bool) -> HeaderMap {
    let listed = connection_listed(h);
    let mut out = HeaderMap::with_capacity(h.len() + 6);
    for (k, v) in h {
        let n = k.as_str();
        if HOP.contains(&n)
            || OWN.contains(&n)
            || n.starts_with("wicket-")
            || (listed.iter().any(|l| l == n) && !(upgrade && n == "upgrade"))
        {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

/// Strips hop-by-hop headers from a response (keeping an upgrade's own).
fn strip_response(h: &mut HeaderMap, upgraded: bool) {
    let listed = connection_listed(h);
    for n in HOP {
        if upgraded && (*n == "connection" || *n == "upgrade") {
            continue;
        }
        h.remove(*n);
    }
    if !upgraded {
        for n in listed {
            h.remove(n.as_str());
        }
    }
}

/// Serves `listener` until `shutdown`; then stops accepting (the caller drains).
pub async fn serve(
    gate: Arc<HttpGate>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = gate.cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let sweeper = gate.sessions.sweep_forever();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(gate.cfg.header_timeout)
        .max_headers(100)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(256)
        .max_pending_accept_reset_streams(50)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) =
        wicket_sidecar::process::next_connection(&listener, &mut shutdown, &gate.sidecar).await
    {
        let gate = gate.clone();
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let client_addr: Arc<str> = peer.to_string().into();
            let tls = acceptor.is_some();
            // The number of the first request with conflicting framing
            // (crate::framing), and of the request being answered.
            let conflict = Arc::new(AtomicU64::new(0));
            let nth = Arc::new(AtomicU64::new(0));
            let svc = {
                let gate = gate.clone();
                let conflict = conflict.clone();
                service_fn(move |req| {
                    let gate = gate.clone();
                    let addr = client_addr.clone();
                    let n = nth.fetch_add(1, Ordering::Relaxed) + 1;
                    // (HTTP/2 connections are not watched: `conflict` stays 0.)
                    let first_bad = conflict.load(Ordering::Relaxed);
                    let smuggled = first_bad != 0 && n >= first_bad;
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            gate.handle(&addr, tls, smuggled, req).await,
                        )
                    }
                })
            };
            match acceptor {
                None => {
                    let io = Watched::new(tcp, conflict);
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(io), svc)
                        .await;
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let io = Watched::new(stream, conflict);
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(io), svc)
                        .await;
                }
            }
        });
    }
    sweeper.abort();
}

/// Why a request with both `Content-Length` and `Transfer-Encoding` is
/// refused (see [`crate::framing`]).
const CONFLICTING_FRAMING: &str =
    "a request may not carry both Content-Length and Transfer-Encoding";

/// The 400 for such a request (from `principal`, when known); the
/// connection closes after it.
fn framing_refused(client_addr: &str, principal: Option<&str>) -> Response<Body> {
    tracing::warn!(client = %client_addr, principal = principal.unwrap_or("-"), "refused a request with both Content-Length and Transfer-Encoding (request smuggling?); closing the connection");
    let mut r = problem_with(
        StatusCode::BAD_REQUEST,
        "bad-framing",
        &format!("wicket: {CONFLICTING_FRAMING}"),
        Some("bad-framing"),
    );
    r.headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// What the request's body became before forwarding.
enum Inspected {
    /// Nothing was read: stream it.
    Stream,
    /// Read whole (to classify its fields): forward these bytes.
    Read(Bytes),
}

/// How a request was decided.
struct Decided {
    decision: Decision,
    command_id: String,
}

impl HttpGate {
    /// A gate over `sidecar`, relaying to `upstream`.
    pub fn new(
        sidecar: Arc<Sidecar>,
        upstream: Upstream,
        cfg: HttpConfig,
    ) -> Result<Arc<HttpGate>, String> {
        let login = cfg.login.clone().map(Login::new).transpose()?;
        Ok(Arc::new(HttpGate {
            login,
            sessions: Arc::new(TokenSessions::new(sidecar.clone(), cfg.idle_session)),
            credential: CredentialCache::new(cfg.credential.clone()),
            sidecar,
            upstream,
            plans: PlanCache::default(),
            cfg,
        }))
    }

    /// Number of sessions the gate holds.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Answers one request; `bad_framing` when it (or one before it on the
    /// connection) carried both `Content-Length` and `Transfer-Encoding`.
    async fn handle(
        self: Arc<Self>,
        client_addr: &str,
        tls: bool,
        bad_framing: bool,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let started = Instant::now();
        let h = req.headers();
        if bad_framing && web::bearer(h).is_none() {
            // No one to attribute it to: refused at once. With a token it
            // is refused below, once the caller is known, and audited.
            return framing_refused(client_addr, None);
        }
        if let Some(login) = &self.login
            && req.uri().path().starts_with(OWN_PREFIX)
        {
            let sidecar = self.sidecar.clone();
            let addr = client_addr.to_string();
            let validate = |t: String| async move {
                sidecar
                    .authenticate(&t, &addr)
                    .await
                    .map(|i| i.expires_at)
                    .map_err(|e| e.to_string())
            };
            return login
                .serve(
                    req.uri().path(),
                    req.uri().query().unwrap_or(""),
                    h,
                    validate,
                )
                .await;
        }
        let token = match (web::bearer(h), &self.login) {
            (Some(t), _) => t,
            (None, Some(login)) => match login.token_from_cookie(h) {
                Some(t) => t,
                None if wants_login(req.method(), h) => {
                    let to = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/");
                    return login.start(to).await;
                }
                None => {
                    return problem(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "wicket: send an OIDC access token (Authorization: Bearer …), or log in with a browser at /.wicket/login",
                    );
                }
            },
            (None, None) => {
                return problem(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "wicket: send an OIDC access token (Authorization: Bearer …)",
                );
            }
        };
        let trace = web::caller_trace(h, None);
        let live = match self
            .sessions
            .session_for(&token, client_addr, || web::user_agent(h))
            .await
        {
            Ok(l) => l,
            Err(SessionRefused::Unauthorized(e)) => {
                return problem(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    &format!("wicket: {e}"),
                );
            }
            Err(SessionRefused::Forbidden(d)) => return forbidden(&d),
        };
        let Some(plan) = self.plans.current(&self.sidecar, &self.cfg.mask_key) else {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-policy",
                "wicket: this gate has no policy yet; try again once it reached the control service",
            );
        };
        let mut api = self.describe(&req, &plan);
        if bad_framing {
            // Refused and audited under the caller (a request without a
            // valid token got its 401 above); hyper closes the connection.
            api.path = cap(req.uri().path());
            let d = Decision::deny("bad-framing", CONFLICTING_FRAMING);
            self.record_fixed(&live, &plan, &api, &trace, &d);
            return framing_refused(client_addr, Some(live.principal.label()));
        }
        let path = match normalize_path(req.uri().path()) {
            Ok(p) => p,
            Err(e) => {
                api.path = cap(req.uri().path());
                let d = Decision::deny("bad-path", e.to_string());
                self.record_fixed(&live, &plan, &api, &trace, &d);
                return problem_with(
                    StatusCode::BAD_REQUEST,
                    "bad-path",
                    &format!("wicket: {e}"),
                    Some("bad-path"),
                );
            }
        };
        api.path = path;
        api.route = plan.routes.find(&api.method, &api.host, &api.path).cloned();
        let max_body = api
            .route
            .as_ref()
            .and_then(|r| r.max_body_bytes)
            .unwrap_or(self.cfg.max_request_bytes);
        if let Some(n) = req
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && n > max_body
        {
            let d = Decision::deny(
                "request-too-large",
                format!("the request body is over this route's limit of {max_body} bytes"),
            );
            self.record_fixed(&live, &plan, &api, &trace, &d);
            return problem_with(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                &format!("wicket: {}", d.reason),
                Some(&d.rule),
            );
        }
        let (parts, body) = req.into_parts();
        let mut req = Request::from_parts(parts, ());
        let (inspected, body) = match self.inspect(&plan, &mut api, &req, body).await {
            Ok(x) => x,
            Err((status, d)) => {
                self.record_fixed(&live, &plan, &api, &trace, &d);
                return problem_with(
                    status,
                    if status == StatusCode::PAYLOAD_TOO_LARGE {
                        "too-large"
                    } else {
                        "bad-body"
                    },
                    &format!("wicket: {}", d.reason),
                    Some(&d.rule),
                );
            }
        };
        let decided = self.decide(&live, &plan, &api, &trace).await;
        if decided.decision.effect != Effect::Allow {
            return forbidden(&decided.decision);
        }
        let client_upgrade = if api.upgrade.is_some() {
            Some(hyper::upgrade::on(&mut req))
        } else {
            None
        };
        let state = Arc::new(BodyState::default());
        let capture = self.cfg.capture_bytes;
        let up_body: Body = match (inspected, body) {
            (Inspected::Read(bytes), _) => {
                state.seen.store(bytes.len() as u64, Ordering::Relaxed);
                if capture > 0 {
                    state.capture(&bytes, capture);
                }
                web::full(bytes)
            }
            (Inspected::Stream, Some(b)) if !b.is_end_stream() => RequestBody {
                inner: b,
                state: state.clone(),
                max: max_body,
                capture,
                idle: self.cfg.body_idle,
                sleep: Box::pin(tokio::time::sleep(self.cfg.body_idle)),
            }
            .boxed_unsync(),
            _ => web::empty(),
        };
        let up = match self.upstream_request(&live, &plan, &api, &req, tls, client_addr, up_body) {
            Ok(r) => r,
            Err(e) => {
                return self.failed(
                    &live,
                    &decided,
                    StatusCode::BAD_GATEWAY,
                    "upstream",
                    &format!("wicket: {e}"),
                );
            }
        };
        let resp = match tokio::time::timeout(
            self.cfg.upstream_timeout,
            self.upstream.client.request(up),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let (status, kind, msg) = if state.over.load(Ordering::Relaxed) {
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too-large",
                        format!(
                            "wicket: the request body is over this route's limit of {max_body} bytes"
                        ),
                    )
                } else if state.stalled.load(Ordering::Relaxed) {
                    (
                        StatusCode::REQUEST_TIMEOUT,
                        "slow-client",
                        format!(
                            "wicket: the request body stalled for {} s",
                            self.cfg.body_idle.as_secs()
                        ),
                    )
                } else {
                    tracing::warn!(error = %error_chain(&e), "upstream request failed");
                    (
                        StatusCode::BAD_GATEWAY,
                        "upstream",
                        format!("wicket: the upstream did not answer: {}", error_chain(&e)),
                    )
                };
                self.result(
                    &live,
                    &decided,
                    &[
                        ("status", status.as_u16().to_string()),
                        ("bytes_in", state.seen.load(Ordering::Relaxed).to_string()),
                        ("duration_ms", started.elapsed().as_millis().to_string()),
                    ],
                    &Tally::new(),
                    None,
                );
                return problem(status, kind, &msg);
            }
            Err(_) => {
                return self.failed(
                    &live,
                    &decided,
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    &format!(
                        "wicket: the upstream did not answer within {} s",
                        self.cfg.upstream_timeout.as_secs()
                    ),
                );
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return self.upgraded(live, decided, resp, client_upgrade, plan, started);
        }
        self.respond(live, plan, decided, &req, resp, state, started)
            .await
    }

    /// Method, host, query, upgrade and selected headers of a request.
    fn describe<B>(&self, req: &Request<B>, plan: &Plan) -> HttpRequest {
        let h = req.headers();
        let host = h
            .get("host")
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        let host = strip_port(host).to_ascii_lowercase();
        let upgrade = if connection_listed(h).iter().any(|t| t == "upgrade") {
            h.get("upgrade")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_ascii_lowercase())
        } else {
            None
        };
        let headers = plan
            .spec
            .headers
            .iter()
            .filter_map(|name| {
                let v = h.get(name.as_str())?;
                Some((
                    name.to_ascii_lowercase(),
                    cap(&String::from_utf8_lossy(v.as_bytes())),
                ))
            })
            .collect();
        HttpRequest {
            method: req.method().as_str().to_ascii_uppercase(),
            host,
            path: String::new(),
            query: req.uri().query().unwrap_or("").to_string(),
            route: None,
            headers,
            fields: Vec::new(),
            upgrade,
        }
    }

    /// Reads a JSON request body whose fields policy selects, or leaves
    /// the body to stream. Refusals come back as a status and a decision.
    async fn inspect(
        &self,
        plan: &Plan,
        api: &mut HttpRequest,
        req: &Request<()>,
        body: Incoming,
    ) -> Result<(Inspected, Option<Incoming>), (StatusCode, Decision)> {
        let route_fields: &[(String, JsonPath)] = api
            .route
            .as_ref()
            .and_then(|r| plan.route_fields.get(&r.name))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let conn_fields = &plan.body_fields;
        if (route_fields.is_empty() && conn_fields.is_empty()) || body.is_end_stream() {
            return Ok((Inspected::Stream, Some(body)));
        }
        let is_json = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| body_kind(Some(ct)) == BodyKind::Json);
        let strict = !route_fields.is_empty();
        if !is_json && !strict {
            return Ok((Inspected::Stream, Some(body)));
        }
        let max = self.cfg.max_inspect_bytes;
        let bytes = read_bounded(body, max, self.cfg.body_idle).await.map_err(|e| {
            let d = match e {
                ReadError::TooLarge => Decision::deny(
                    "request-too-large",
                    format!("policy reads this request's JSON fields, and its body is over the gate's limit of {max} bytes for that"),
                ),
                ReadError::Broken(e) => Decision::deny("bad-body", format!("cannot read the request body: {e}")),
            };
            let status = if d.rule == "request-too-large" {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            (status, d)
        })?;
        let v: serde_json::Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) if bytes.is_empty() => serde_json::Value::Null,
            Err(e) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    Decision::deny(
                        "bad-body",
                        format!(
                            "policy reads this route's JSON body fields, and the body is not JSON: {e}"
                        ),
                    ),
                ));
            }
        };
        for (f, path) in conn_fields.iter().chain(route_fields) {
            for value in path.select(&v) {
                api.fields.push((f.clone(), field_value(value)));
            }
        }
        Ok((Inspected::Read(bytes), None))
    }

    /// The command as audited: its text with the detectors applied.
    fn command(plan: &Plan, api: &HttpRequest) -> Command {
        Command {
            text: plan.mask_text(&api.text(), &mut Tally::new()),
            classification: api.classification(),
        }
    }

    /// The request's own audit details.
    fn details(api: &HttpRequest) -> Vec<(String, String)> {
        let mut d = vec![
            ("method".to_string(), api.method.clone()),
            ("host".to_string(), api.host.clone()),
        ];
        if let Some(r) = &api.route {
            d.push(("route".into(), r.name.clone()));
        }
        if let Some(u) = &api.upgrade {
            d.push(("upgrade".into(), u.clone()));
        }
        d
    }

    /// Decides a request (holding it for approval when policy says so) and
    /// records the decision.
    async fn decide(
        &self,
        live: &LiveSession,
        plan: &Plan,
        api: &HttpRequest,
        trace: &CallerTrace,
    ) -> Decided {
        let on_pending = |id: &str, d: &Decision| tracing::info!(approval = id, rule = %d.rule, "request held for approval");
        let (decision, command_id) = self
            .sidecar
            .decide_and_record(
                live,
                Self::command(plan, api),
                trace,
                on_pending,
                Self::details(api),
            )
            .await;
        Decided {
            decision,
            command_id,
        }
    }

    /// Records a refusal taken by the gate itself (no policy lookup).
    fn record_fixed(
        &self,
        live: &LiveSession,
        plan: &Plan,
        api: &HttpRequest,
        trace: &CallerTrace,
        d: &Decision,
    ) {
        self.sidecar.record_command(
            live,
            Self::command(plan, api),
            d.clone(),
            trace,
            None,
            Self::details(api),
        );
    }

    /// Records how a request ended.
    fn result(
        &self,
        live: &LiveSession,
        decided: &Decided,
        details: &[(&str, String)],
        masked: &Tally,
        captured: Option<(String, String)>,
    ) {
        let mut e = live.bare_event(AuditKind::CommandResult);
        e.details
            .insert("command_id".into(), decided.command_id.clone());
        for (k, v) in details {
            e.details.insert((*k).into(), v.clone());
        }
        for (k, n) in masked {
            if *n > 0 {
                e.masked.insert(k.clone(), *n);
            }
        }
        if let Some((req, resp)) = captured {
            if !req.is_empty() {
                e.details.insert("request_body".into(), req);
            }
            if !resp.is_empty() {
                e.details.insert("response_body".into(), resp);
            }
        }
        if let Err(err) = self.sidecar.record(e) {
            tracing::error!(error = %err, "cannot record a result");
        }
    }

    /// Records a request that failed after its decision (no answer from
    /// the upstream, an unmaskable answer…) and returns the problem to send.
    fn failed(
        &self,
        live: &LiveSession,
        decided: &Decided,
        status: StatusCode,
        kind: &str,
        detail: &str,
    ) -> Response<Body> {
        self.result(
            live,
            decided,
            &[("status", status.as_u16().to_string())],
            &Tally::new(),
            None,
        );
        problem(status, kind, detail)
    }

    /// The upstream request: end-to-end headers, the gate's credential,
    /// forwarding headers, and the normalised path.
    #[allow(clippy::too_many_arguments)]
    fn upstream_request(
        &self,
        live: &LiveSession,
        plan: &Plan,
        api: &HttpRequest,
        req: &Request<()>,
        tls: bool,
        client_addr: &str,
        body: Body,
    ) -> Result<Request<Body>, String> {
        let h = req.headers();
        let mut headers = forwardable(h, api.upgrade.is_some());
        if let Some(u) = &api.upgrade {
            headers.insert("connection", HeaderValue::from_static("upgrade"));
            headers.insert(
                "upgrade",
                HeaderValue::from_str(u).map_err(|_| "bad upgrade header")?,
            );
            // Compressed messages could not be masked: offer no extension.
            if plan.masks() {
                headers.remove("sec-websocket-extensions");
            }
        }
        if let Some(login) = &self.login {
            // The gate's session cookie stays here.
            let all: Vec<&str> = h
                .get_all("cookie")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            headers.remove("cookie");
            if !all.is_empty()
                && let Ok(joined) = HeaderValue::from_str(&all.join("; "))
                && let Some(v) = login.strip_cookie(&joined)
            {
                headers.insert("cookie", v);
            }
        }
        if let Some((name, value)) = self.credential.header()? {
            headers.insert(name, value);
        }
        let ip = client_addr
            .rsplit_once(':')
            .map(|(ip, _)| ip.trim_matches(|c| c == '[' || c == ']'))
            .unwrap_or(client_addr);
        let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert("x-forwarded-for", v);
        }
        headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
        if let Ok(v) = HeaderValue::from_str(&api.host) {
            headers.insert("x-forwarded-host", v);
        }
        if let Ok(v) = HeaderValue::from_str(&live.id) {
            headers.insert(HeaderName::from_static("wicket-session"), v);
        }
        if plan.masks() {
            // The gate must read what comes back.
            headers.insert("accept-encoding", HeaderValue::from_static("identity"));
        }
        headers.insert("host", self.upstream.authority.clone());
        if let Some(n) = h.get("content-length")
            && api.fields.is_empty()
        {
            headers.insert("content-length", n.clone());
        }
        let uri = self.upstream.uri(&api.path, &api.query)?;
        let mut up = Request::builder()
            .method(req.method().clone())
            .uri(uri)
            .body(body)
            .map_err(|e| format!("cannot form the upstream request: {e}"))?;
        *up.headers_mut() = headers;
        Ok(up)
    }

    /// Relays an upgraded connection both ways: a WebSocket with its
    /// upstream's messages masked when policy masks ([`crate::ws`]), any
    /// other protocol as it is.
    fn upgraded(
        self: Arc<Self>,
        live: Arc<LiveSession>,
        decided: Decided,
        mut resp: Response<Incoming>,
        client: Option<hyper::upgrade::OnUpgrade>,
        plan: Arc<Plan>,
        started: Instant,
    ) -> Response<Body> {
        let Some(client) = client else {
            return self.failed(
                &live,
                &decided,
                StatusCode::BAD_GATEWAY,
                "upstream",
                "wicket: the upstream switched protocols on a request that asked for no upgrade",
            );
        };
        let websocket = resp
            .headers()
            .get("upgrade")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let mask = plan.masks().then_some(plan);
        if mask.is_some() && !websocket {
            return self.failed(
                &live,
                &decided,
                StatusCode::BAD_GATEWAY,
                "upstream",
                "wicket: this connection masks responses, and only WebSocket upgrades can be masked",
            );
        }
        if mask.is_some() && resp.headers().contains_key("sec-websocket-extensions") {
            return self.failed(
                &live,
                &decided,
                StatusCode::BAD_GATEWAY,
                "upstream",
                "wicket: the upstream chose a WebSocket extension it was not offered; compressed messages cannot be masked",
            );
        }
        let upstream = hyper::upgrade::on(&mut resp);
        let (mut parts, _) = resp.into_parts();
        strip_response(&mut parts.headers, true);
        let gate = self.clone();
        tokio::spawn(async move {
            let (c, u) = match tokio::join!(client, upstream) {
                (Ok(c), Ok(u)) => (c, u),
                _ => {
                    gate.result(
                        &live,
                        &decided,
                        &[("status", "101".into()), ("complete", "false".into())],
                        &Tally::new(),
                        None,
                    );
                    return;
                }
            };
            let mut c = TokioIo::new(c);
            let mut u = TokioIo::new(u);
            let ended = live.guard.end_signal();
            let relayed = async {
                match mask {
                    Some(plan) => crate::ws::relay_masked(c, u, plan).await,
                    None => match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        Ok((a, b)) => crate::ws::Relayed {
                            bytes_in: a,
                            bytes_out: b,
                            ..Default::default()
                        },
                        Err(e) => crate::ws::Relayed {
                            error: Some(e.to_string()),
                            ..Default::default()
                        },
                    },
                }
            };
            let r = tokio::select! {
                r = relayed => r,
                _ = ended => crate::ws::Relayed {
                    error: Some("the session ended".into()),
                    ..Default::default()
                },
            };
            let mut details = vec![
                ("status", "101".to_string()),
                ("bytes_in", r.bytes_in.to_string()),
                ("bytes_out", r.bytes_out.to_string()),
                ("duration_ms", started.elapsed().as_millis().to_string()),
                ("complete", r.error.is_none().to_string()),
            ];
            if let Some(e) = r.error {
                details.push(("error", e));
            }
            gate.result(&live, &decided, &details, &r.tally, None);
        });
        Response::from_parts(parts, web::empty())
    }

    /// The client's response: masked where policy masks, tracked to its end.
    #[allow(clippy::too_many_arguments)]
    async fn respond(
        self: Arc<Self>,
        live: Arc<LiveSession>,
        plan: Arc<Plan>,
        decided: Decided,
        req: &Request<()>,
        resp: Response<Incoming>,
        state: Arc<BodyState>,
        started: Instant,
    ) -> Response<Body> {
        let (mut parts, body) = resp.into_parts();
        strip_response(&mut parts.headers, false);
        let code = parts.status;
        let mut body: Body = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
        let kind = body_kind(
            parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
        );
        let has_body = req.method() != Method::HEAD
            && code != StatusCode::NO_CONTENT
            && code != StatusCode::NOT_MODIFIED;
        let small = parts
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n <= SMALL_BODY);
        let masks = plan.masks() && has_body && kind != BodyKind::Binary;
        let mut tally: Option<Arc<Mutex<Tally>>> = None;
        let whole = small.is_some() && has_body;
        let encoding = parts
            .headers
            .get("content-encoding")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let max_json = self.cfg.max_mask_bytes;
        let unmaskable = |e: String| {
            self.failed(
                &live,
                &decided,
                StatusCode::BAD_GATEWAY,
                "unmaskable",
                &format!("wicket: {e}"),
            )
        };
        if whole {
            // A small answer of known length is read whole (and masked in
            // place), so the client gets head and body in one write.
            let bytes = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return self.failed(
                        &live,
                        &decided,
                        StatusCode::BAD_GATEWAY,
                        "upstream",
                        &format!("wicket: the upstream's answer broke off: {e}"),
                    );
                }
            };
            body = if masks {
                match mask_whole(&plan, &bytes, kind, encoding.as_deref(), max_json) {
                    Ok((out, t)) => {
                        tally = Some(Arc::new(Mutex::new(t)));
                        web::full(out)
                    }
                    Err(e) => return unmaskable(e),
                }
            } else {
                web::full(bytes)
            };
        } else if masks {
            let job = MaskJob {
                plan: plan.clone(),
                kind,
                encoding,
                max_json,
            };
            match mask_body(body, job) {
                Ok((b, t)) => {
                    body = b;
                    tally = Some(t);
                }
                Err(e) => return unmaskable(e),
            }
        }
        if masks {
            // The client gets the masked body, decoded: the upstream's
            // length, encoding and validators no longer describe it.
            for h in ["content-length", "content-encoding", "etag", "content-md5"] {
                parts.headers.remove(h);
            }
            if let Some(n) = body.size_hint().exact()
                && let Ok(v) = HeaderValue::from_str(&n.to_string())
            {
                parts.headers.insert("content-length", v);
            }
        }
        let capture = self.cfg.capture_bytes;
        let captured: Option<Arc<Mutex<Vec<u8>>>> = (capture > 0).then(Default::default);
        if let Some(buf) = &captured {
            let buf = buf.clone();
            body = body
                .map_frame(move |f| {
                    if let Some(d) = f.data_ref() {
                        let mut b = buf.lock().expect("capture");
                        let room = capture.saturating_sub(b.len());
                        b.extend_from_slice(&d[..d.len().min(room)]);
                    }
                    f
                })
                .boxed_unsync();
        }
        let gate = self.clone();
        let live2 = live.clone();
        let done = move |bytes: u64, complete: bool| {
            let masked = tally
                .map(|t| t.lock().expect("tally").clone())
                .unwrap_or_default();
            let captured = captured.map(|c| {
                let mut scratch = Tally::new();
                let req = state.captured(&plan, &mut scratch);
                let resp = String::from_utf8_lossy(&c.lock().expect("capture")).into_owned();
                (req, resp)
            });
            gate.result(
                &live2,
                &decided,
                &[
                    ("status", code.as_u16().to_string()),
                    ("bytes_in", state.seen.load(Ordering::Relaxed).to_string()),
                    ("bytes_out", bytes.to_string()),
                    ("duration_ms", started.elapsed().as_millis().to_string()),
                    ("complete", complete.to_string()),
                ],
                &masked,
                captured,
            );
        };
        let tracked = if whole {
            Tracked::whole(body, Box::new(done))
        } else {
            Tracked::new(body, live.guard.end_signal(), Box::new(done))
        };
        Response::from_parts(parts, tracked.boxed_unsync())
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The error and its causes, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What the request body did on its way up.
#[derive(Default)]
struct BodyState {
    seen: AtomicU64,
    over: AtomicBool,
    stalled: AtomicBool,
    captured: Mutex<Vec<u8>>,
}

impl BodyState {
    fn capture(&self, d: &[u8], max: usize) {
        let mut b = self.captured.lock().expect("capture");
        let room = max.saturating_sub(b.len());
        b.extend_from_slice(&d[..d.len().min(room)]);
    }

    /// The captured request body, masked.
    fn captured(&self, plan: &Plan, tally: &mut Tally) -> String {
        let b = self.captured.lock().expect("capture");
        if b.is_empty() {
            return String::new();
        }
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&b) {
            plan.mask_json(&mut v, tally);
            return v.to_string();
        }
        plan.mask_text(&String::from_utf8_lossy(&b), tally)
    }
}

/// A streamed request body: counted, bounded, and cut when the client
/// stalls.
struct RequestBody {
    inner: Incoming,
    state: Arc<BodyState>,
    max: u64,
    capture: usize,
    idle: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let n = this.state.seen.fetch_add(d.len() as u64, Ordering::Relaxed)
                        + d.len() as u64;
                    if n > this.max {
                        this.state.over.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(
                            "the request body is over the gate's limit".into()
                        )));
                    }
                    if this.capture > 0 {
                        this.state.capture(d, this.capture);
                    }
                }
                this.sleep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + this.idle);
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.sleep.as_mut().poll(cx).is_ready() {
                    this.state.stalled.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(
                        "the client stopped sending the request body".into()
                    )));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

enum ReadError {
    TooLarge,
    Broken(String),
}

/// Reads a whole body of at most `max` bytes, with `idle` between frames.
async fn read_bounded(mut body: Incoming, max: usize, idle: Duration) -> Result<Bytes, ReadError> {
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(ReadError::Broken("the client stopped sending it".into())),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ReadError::Broken(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(d) = frame.into_data() {
            if buf.len() + d.len() > max {
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(&d);
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_own_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("authorization", HeaderValue::from_static("Bearer caller"));
        h.insert("wicket-reasoning", HeaderValue::from_static("why"));
        h.insert("wicket-session", HeaderValue::from_static("forged"));
        h.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        let out = forwardable(&h, false);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["traceparent", "accept"]);
    }

    #[test]
    fn problems_are_rfc9457() {
        let d = Decision::deny("no-deletes", "deleting is not allowed");
        let r = forbidden(&d);
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let r = problem(StatusCode::UNAUTHORIZED, "unauthorized", "x");
        assert!(r.headers().contains_key("www-authenticate"));
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("api.internal:8080"), "api.internal");
        assert_eq!(strip_port("api.internal"), "api.internal");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
