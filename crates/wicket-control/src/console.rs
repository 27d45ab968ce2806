//! The web console for approvers and auditors, served by the control
//! service on its own listener (`--console-listen`).
//!
//! People sign in with the organisation's identity provider (OIDC
//! authorization code with PKCE, [`wicket_sidecar::login`]); the session
//! cookie stands for their access token, which is validated on every
//! request like an admin API token, revocations included, and their groups
//! give the role: readers (auditors, approvers, admins) see approvals and
//! sessions, approvers and admins decide. The session is sealed into the
//! browser's cookies with a key the replicas share through the store, so
//! any replica serves it; a sign-out is recorded in the store and refused
//! by all of them.
//!
//! The page is static (HTML, script and style from this binary, no third
//! party) and reads a small JSON API; approval changes arrive live as
//! server-sent events (`/api/events`). Writes are `POST`s with JSON bodies
//! and a custom header (`X-Wicket-Csrf`), which a cross-site form cannot
//! send without a CORS preflight the console never grants.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::Code;
use wicket_core::{ApprovalState, Principal};
use wicket_sidecar::login::{Login, LoginConfig, OWN_PREFIX, wants_login};
use wicket_sidecar::web::{self, Body};

use crate::auth::Permission;
use crate::state::Control;

/// Largest request body (a vote's comment).
const MAX_BODY: usize = 16 * 1024;
/// Pause between keep-alive comments on the event stream.
const HEARTBEAT: Duration = Duration::from_secs(15);

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// The console's settings.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// The OIDC issuer people sign in with (the admin API's).
    pub issuer: String,
    /// The console's client id at the identity provider.
    pub client_id: String,
    /// Its secret, for a confidential client (PKCE is used either way).
    pub client_secret: Option<wicket_sidecar::secret::Secret>,
    /// The console's external base URL; the callback is `BASE/.wicket/callback`.
    pub public_url: url::Url,
}

/// The console: sign-in, pages and API.
pub struct Console {
    control: Arc<Control>,
    login: Login,
}

/// Name of the stored key that seals console sessions.
const SESSION_KEY: &str = "console-session-seal";

/// The secret every replica seals console sessions with: made by the
/// first replica to start, kept in the store.
async fn session_key(control: &Control) -> Result<String, String> {
    use base64::Engine as _;
    let mut fresh = [0u8; 32];
    aws_lc_rs::rand::fill(&mut fresh).map_err(|_| "no random source")?;
    control
        .store
        .key_or_insert(
            SESSION_KEY,
            &base64::engine::general_purpose::STANDARD.encode(fresh),
        )
        .await
        .map_err(|e| format!("cannot store the console's session key: {e}"))
}

/// Serves the console on `listener` for as long as the service runs.
/// Sign-ins and sessions are sealed into the browser's cookies with a key
/// the replicas share through the store, so that behind a load balancer
/// any replica finishes a sign-in another started and serves its session.
pub async fn spawn(
    control: Arc<Control>,
    cfg: ConsoleConfig,
    listener: TcpListener,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let login = Login::new(LoginConfig {
        issuer: cfg.issuer,
        client_id: cfg.client_id,
        client_secret: cfg.client_secret,
        public_url: cfg.public_url.clone(),
        scopes: "openid profile".into(),
        session_key: Some(wicket_sidecar::secret::Secret::Value(
            session_key(&control).await?,
        )),
    })?;
    let console = Arc::new(Console { control, login });
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        url = %cfg.public_url, "console serving");
    Ok(tokio::spawn(async move {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "console accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let console = console.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let console = console.clone();
                    async move { Ok::<_, Infallible>(console.handle(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }))
}

/// A problem response for a gRPC-style status.
fn from_status(s: &tonic::Status) -> Response<Body> {
    let status = match s.code() {
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    web::problem(status, "console", s.message())
}

fn with_headers(mut r: Response<Body>, content_type: &'static str) -> Response<Body> {
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static(content_type));
    secure(h);
    r
}

/// Headers every console response carries.
fn secure(h: &mut HeaderMap) {
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.entry("cache-control")
        .or_insert(HeaderValue::from_static("no-store"));
}

fn json_response(v: &Value) -> Response<Body> {
    with_headers(Response::new(web::full(v.to_string())), "application/json")
}

fn static_file(body: &'static str, content_type: &'static str) -> Response<Body> {
    with_headers(
        Response::new(web::full(Bytes::from_static(body.as_bytes()))),
        content_type,
    )
}

/// What the page needs to know of the signed-in person.
fn me(p: &Principal, control: &Control) -> Value {
    let can = |need| control.auth.check(p, need).is_ok();
    json!({
        "name": p.label(),
        "subject": p.subject,
        "can_read": can(Permission::Read),
        "can_decide": can(Permission::Decide),
        "can_admin": can(Permission::Admin),
    })
}

impl Console {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        if path.starts_with(OWN_PREFIX) {
            // A sign-out is recorded for every replica: the session itself
            // lives sealed in the browser, and a copy of its cookies must
            // not outlive it.
            if path == format!("{OWN_PREFIX}logout")
                && let Some(s) = self.login.sealed_session(req.headers())
                && let Some(until) = s.until()
                && let Err(e) = self.control.store.end_console_session(&s.id, until).await
            {
                return from_status(&crate::state::storage(e));
            }
            let auth = &self.control.auth;
            return self
                .login
                .serve(&path, &query, req.headers(), |token| async move {
                    auth.user_token(&token)
                        .await
                        .map(|id| id.expires_at)
                        .map_err(|s| s.message().to_string())
                })
                .await;
        }
        match path.as_str() {
            "/console.js" => return static_file(SCRIPT, "text/javascript; charset=utf-8"),
            "/console.css" => return static_file(STYLE, "text/css; charset=utf-8"),
            _ => {}
        }
        // Everything else is for signed-in readers (a session signed out
        // on any replica is none). The console's sessions are sealed
        // (`spawn` gives its login the shared key).
        let token = match self.login.sealed_session(req.headers()) {
            Some(s) => match self.control.store.console_session_ended(&s.id).await {
                Ok(false) => Some(s.token),
                Ok(true) => None,
                Err(e) => return from_status(&crate::state::storage(e)),
            },
            None => None,
        };
        let Some(token) = token else {
            if wants_login(req.method(), req.headers()) {
                let to = req
                    .uri()
                    .path_and_query()
                    .map_or("/".to_string(), |p| p.to_string());
                return self.login.start(&to).await;
            }
            return web::problem(
                StatusCode::UNAUTHORIZED,
                "console",
                "sign in first (open the console in a browser)",
            );
        };
        let who = match self.control.auth.user_token(&token).await {
            Ok(id) => id.principal,
            Err(s) => return from_status(&s),
        };
        if let Err(s) = self.control.auth.check(&who, Permission::Read) {
            return from_status(&s);
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        match (&method, segments.as_slice()) {
            (
                &Method::GET,
                [""] | ["approvals"] | ["approvals", _] | ["sessions"] | ["sessions", _],
            ) => static_file(PAGE, "text/html; charset=utf-8"),
            (&Method::GET, ["api", "me"]) => json_response(&me(&who, &self.control)),
            (&Method::GET, ["api", "approvals"]) => self.approvals(&query).await,
            (&Method::GET, ["api", "approvals", id]) => {
                match self.control.store.get_approval(id).await {
                    Ok(Some(a)) => json_response(&json!(a)),
                    Ok(None) => web::problem(StatusCode::NOT_FOUND, "console", "no such approval"),
                    Err(e) => from_status(&crate::state::storage(e)),
                }
            }
            (&Method::POST, ["api", "approvals", id, verb @ ("approve" | "deny")]) => {
                let id = id.to_string();
                let approve = *verb == "approve";
                self.vote(req, &who, &id, approve).await
            }
            (&Method::GET, ["api", "sessions"]) => self.sessions().await,
            (&Method::GET, ["api", "sessions", id]) => self.session(id).await,
            (&Method::GET, ["api", "events"]) => self.events(),
            _ => web::problem(StatusCode::NOT_FOUND, "console", "no such page"),
        }
    }

    async fn approvals(&self, query: &str) -> Response<Body> {
        let all =
            url::form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "state" && v == "all");
        let state = (!all).then_some(ApprovalState::Pending);
        match self.control.store.list_approvals(state, 200).await {
            Ok(list) => json_response(&json!(list)),
            Err(e) => from_status(&crate::state::storage(e)),
        }
    }

    async fn vote(
        &self,
        req: Request<Incoming>,
        who: &Principal,
        id: &str,
        approve: bool,
    ) -> Response<Body> {
        if req.headers().get("x-wicket-csrf").is_none() {
            return web::problem(
                StatusCode::FORBIDDEN,
                "console",
                "missing X-Wicket-Csrf header (votes come from the console page)",
            );
        }
        if let Err(s) = self.control.auth.check(who, Permission::Decide) {
            return from_status(&s);
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return web::problem(StatusCode::PAYLOAD_TOO_LARGE, "console", "body too large");
            }
        };
        let v: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return web::problem(
                    StatusCode::BAD_REQUEST,
                    "console",
                    &format!("bad JSON: {e}"),
                );
            }
        };
        let comment = v["comment"].as_str().unwrap_or("");
        if comment.len() > 4096 {
            return web::problem(StatusCode::BAD_REQUEST, "console", "comment too long");
        }
        let reuse = v["reuse_seconds"].as_u64().unwrap_or(0);
        let reuse = u32::try_from(reuse).unwrap_or(u32::MAX);
        if !approve && reuse > 0 {
            return web::problem(
                StatusCode::BAD_REQUEST,
                "console",
                "reuse applies to approvals only",
            );
        }
        match self.control.vote(id, who, approve, comment, reuse).await {
            Ok(a) => {
                tracing::info!(
                    approval = id,
                    by = who.label(),
                    approve,
                    "vote from the console"
                );
                json_response(&json!(a))
            }
            Err(s) => from_status(&s),
        }
    }

    async fn sessions(&self) -> Response<Body> {
        let filter = wicket_store::SessionFilter {
            limit: 200,
            ..Default::default()
        };
        match self.control.store.list_sessions(&filter).await {
            Ok(list) => json_response(&Value::Array(
                list.iter()
                    .map(|s| {
                        json!({
                            "id": s.id, "connection": s.connection, "principal": s.principal.label(),
                            "kind": s.principal.kind.as_str(),
                            "started_at": s.started_at, "ended_at": s.ended_at, "state": s.state,
                            "end_reason": s.end_reason, "commands": s.command_count,
                            "client_addr": s.client_addr, "client_app": s.client_app,
                        })
                    })
                    .collect(),
            )),
            Err(e) => from_status(&crate::state::storage(e)),
        }
    }

    async fn session(&self, id: &str) -> Response<Body> {
        let store = &self.control.store;
        let s = match store.get_session(id).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return web::problem(StatusCode::NOT_FOUND, "console", "no such session");
            }
            Err(e) => return from_status(&crate::state::storage(e)),
        };
        match store.list_events(id, 0, 1000).await {
            Ok(mut events) => {
                self.control.recordings.inline(&mut events).await;
                json_response(&json!({
                "id": s.id, "connection": s.connection, "principal": s.principal.label(),
                "started_at": s.started_at, "ended_at": s.ended_at, "state": s.state,
                "end_reason": s.end_reason, "events": events,
                }))
            }
            Err(e) => from_status(&crate::state::storage(e)),
        }
    }

    /// Approval changes as server-sent events, with a comment every
    /// [`HEARTBEAT`] so proxies keep the stream open.
    fn events(&self) -> Response<Body> {
        let mut changes = self.control.subscribe_approvals();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, web::BoxError>>(32);
        tokio::spawn(async move {
            let send = |s: String| tx.send(Ok(Frame::data(Bytes::from(s))));
            if send(": connected\n\n".into()).await.is_err() {
                return;
            }
            loop {
                let chunk = tokio::select! {
                    c = changes.recv() => match c {
                        Ok(a) => format!("event: approval\ndata: {}\n\n", json!(a)),
                        // Missed some: the page reloads the list.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            "event: resync\ndata: {}\n\n".to_string()
                        }
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(HEARTBEAT) => ": ping\n\n".to_string(),
                    _ = tx.closed() => return,
                };
                if send(chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(web::channel_body(rx));
        r.headers_mut()
            .insert("cache-control", HeaderValue::from_static("no-store"));
        with_headers(r, "text/event-stream")
    }
}
