//! Browser login for people: the OIDC authorization-code flow with PKCE,
//! ending in a session cookie that stands for the access token.
//!
//! A browser request (`GET`, `Accept: text/html`) without a bearer token is
//! sent to the identity provider; its answer comes back to
//! `/.wicket/callback`, where the gate exchanges the code for an access
//! token (which must validate like any bearer token), keeps the token in
//! memory, and sets an `HttpOnly`, `SameSite=Lax` cookie (`Secure` and
//! `__Host-` prefixed when the gate is reached over https) holding only a
//! random session id. `/.wicket/logout` forgets it. The cookie never
//! reaches the upstream, and the token never reaches the browser.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::web::{self, Body};
use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use crate::secret::{Secret, read_secret};

/// Path prefix of the gate's own endpoints.
pub const OWN_PREFIX: &str = "/.wicket/";

/// How long a login may take between the redirect and the callback.
const PENDING_TTL: Duration = Duration::from_secs(600);
/// Logins in flight kept at most (older ones are dropped first).
const MAX_PENDING: usize = 10_000;
/// Browser sessions kept at most.
const MAX_SESSIONS: usize = 100_000;

/// Browser login settings.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// The issuer (discovery document at `ISSUER/.well-known/openid-configuration`).
    pub issuer: String,
    /// The gate's OAuth client id at the identity provider.
    pub client_id: String,
    /// Its secret, for a confidential client (PKCE is used either way).
    pub client_secret: Option<Secret>,
    /// The gate's external base URL (`https://billing.example.com`); the
    /// callback is `BASE/.wicket/callback`.
    pub public_url: url::Url,
    /// Scopes asked for.
    pub scopes: String,
}

struct Pending {
    verifier: String,
    return_to: String,
    created: Instant,
}

struct Session {
    token: String,
    expires: Instant,
}

/// Endpoints from discovery.
#[derive(Clone)]
struct Endpoints {
    authorize: String,
    token: String,
}

/// The login flow and the browser sessions.
pub struct Login {
    cfg: LoginConfig,
    http: reqwest::Client,
    endpoints: tokio::sync::Mutex<Option<Endpoints>>,
    pending: Mutex<HashMap<String, Pending>>,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    secure: bool,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("client_id", &self.cfg.client_id)
            .finish_non_exhaustive()
    }
}

fn random(n: usize) -> String {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).expect("system randomness");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn sha256(s: &str) -> [u8; 32] {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes())
        .as_ref()
        .try_into()
        .expect("sha-256 is 32 bytes")
}

fn redirect(to: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::FOUND)
        .header("location", to)
        .header("cache-control", "no-store")
        .body(web::empty())
        .expect("static response")
}

/// Whether `to` is a path on this host: browsers read `//host` and `/\host`
/// as another host, and control characters can hide either.
fn local_path(to: &str) -> bool {
    to.starts_with('/')
        && !to.starts_with("//")
        && !to.starts_with("/\\")
        && !to.chars().any(|c| c.is_control())
}

/// Whether a request comes from a browser that can be sent to log in.
pub fn wants_login(method: &hyper::Method, h: &HeaderMap) -> bool {
    method == hyper::Method::GET
        && h.get("accept")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"))
}

impl Login {
    /// The flow for `cfg`.
    pub fn new(cfg: LoginConfig) -> Result<Login, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the login HTTP client: {e}"))?;
        let secure = cfg.public_url.scheme() == "https";
        Ok(Login {
            cfg,
            http,
            endpoints: tokio::sync::Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            secure,
        })
    }

    fn cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-wicket_session"
        } else {
            "wicket_session"
        }
    }

    fn callback_url(&self) -> String {
        format!(
            "{}{OWN_PREFIX}callback",
            self.cfg.public_url.as_str().trim_end_matches('/')
        )
    }

    async fn endpoints(&self) -> Result<Endpoints, String> {
        let mut g = self.endpoints.lock().await;
        if let Some(e) = g.as_ref() {
            return Ok(e.clone());
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let doc: serde_json::Value = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("cannot read the identity provider's discovery document: {e}"))?
            .json()
            .await
            .map_err(|e| format!("the identity provider's discovery document is not JSON: {e}"))?;
        let get = |k: &str| {
            doc[k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("the identity provider names no {k}"))
        };
        let e = Endpoints {
            authorize: get("authorization_endpoint")?,
            token: get("token_endpoint")?,
        };
        *g = Some(e.clone());
        Ok(e)
    }

    /// The access token a request's session cookie stands for, if any.
    pub fn token_from_cookie(&self, h: &HeaderMap) -> Option<String> {
        let id = cookie(h, self.cookie_name())?;
        let key = sha256(&id);
        let mut g = self.sessions.lock().expect("sessions");
        match g.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.token.clone()),
            Some(_) => {
                g.remove(&key);
                None
            }
            None => None,
        }
    }

    /// The `Cookie` header without the gate's own cookie (`None`: nothing left).
    pub fn strip_cookie(&self, value: &HeaderValue) -> Option<HeaderValue> {
        let s = value.to_str().ok()?;
        let name = self.cookie_name();
        let kept: Vec<&str> = s
            .split(';')
            .map(str::trim)
            .filter(|c| !c.is_empty() && c.split('=').next() != Some(name))
            .collect();
        if kept.is_empty() {
            return None;
        }
        HeaderValue::from_str(&kept.join("; ")).ok()
    }

    /// Sends the browser to the identity provider; it comes back to
    /// `return_to` (a path on this gate) once logged in.
    pub async fn start(&self, return_to: &str) -> Response<Body> {
        let ep = match self.endpoints().await {
            Ok(e) => e,
            Err(e) => {
                return web::problem(StatusCode::BAD_GATEWAY, "login", &format!("wicket: {e}"));
            }
        };
        let state = random(16);
        let verifier = random(32);
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha256(&verifier));
        {
            let mut g = self.pending.lock().expect("pending");
            g.retain(|_, p| p.created.elapsed() < PENDING_TTL);
            if g.len() >= MAX_PENDING
                && let Some(oldest) = g
                    .iter()
                    .min_by_key(|(_, p)| p.created)
                    .map(|(k, _)| k.clone())
            {
                g.remove(&oldest);
            }
            let return_to = if local_path(return_to) {
                return_to.to_string()
            } else {
                "/".to_string()
            };
            g.insert(
                state.clone(),
                Pending {
                    verifier,
                    return_to,
                    created: Instant::now(),
                },
            );
        }
        let mut url = match url::Url::parse(&ep.authorize) {
            Ok(u) => u,
            Err(e) => {
                return web::problem(
                    StatusCode::BAD_GATEWAY,
                    "login",
                    &format!(
                        "wicket: the identity provider's authorization endpoint is not a URL: {e}"
                    ),
                );
            }
        };
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("redirect_uri", &self.callback_url())
            .append_pair("scope", &self.cfg.scopes)
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        redirect(url.as_str())
    }

    /// Serves `/.wicket/…`: the callback and logout. `validate` checks the
    /// access token the code was exchanged for (and says when it expires).
    pub async fn serve<F, Fut>(
        &self,
        path: &str,
        query: &str,
        h: &HeaderMap,
        validate: F,
    ) -> Response<Body>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<chrono::DateTime<chrono::Utc>, String>>,
    {
        match path.strip_prefix(OWN_PREFIX) {
            Some("callback") => self.callback(query, validate).await,
            Some("logout") => {
                if let Some(id) = cookie(h, self.cookie_name()) {
                    self.sessions.lock().expect("sessions").remove(&sha256(&id));
                }
                let mut r = web::problem(StatusCode::OK, "logged-out", "wicket: logged out");
                if let Ok(v) = HeaderValue::from_str(&self.set_cookie("", 0)) {
                    r.headers_mut().insert("set-cookie", v);
                }
                r
            }
            Some("login") => {
                let to = url::form_urlencoded::parse(query.as_bytes())
                    .find(|(k, _)| k == "return_to")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_else(|| "/".into());
                self.start(&to).await
            }
            _ => web::problem(
                StatusCode::NOT_FOUND,
                "not-found",
                "wicket: no such gate endpoint",
            ),
        }
    }

    fn set_cookie(&self, value: &str, max_age: i64) -> String {
        format!(
            "{}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{}",
            self.cookie_name(),
            if self.secure { "; Secure" } else { "" }
        )
    }

    async fn callback<F, Fut>(&self, query: &str, validate: F) -> Response<Body>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<chrono::DateTime<chrono::Utc>, String>>,
    {
        let q: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let fail = |detail: String| {
            web::problem(
                StatusCode::UNAUTHORIZED,
                "login",
                &format!("wicket: {detail}"),
            )
        };
        if let Some(e) = q.get("error") {
            return fail(format!(
                "the identity provider refused the login: {e} {}",
                q.get("error_description").map(String::as_str).unwrap_or("")
            ));
        }
        let (Some(code), Some(state)) = (q.get("code"), q.get("state")) else {
            return fail("the login callback carries no code".into());
        };
        let Some(pending) = self.pending.lock().expect("pending").remove(state) else {
            return fail("this login expired or was already used; start again".into());
        };
        if pending.created.elapsed() > PENDING_TTL {
            return fail("this login expired; start again".into());
        }
        let ep = match self.endpoints().await {
            Ok(e) => e,
            Err(e) => {
                return web::problem(StatusCode::BAD_GATEWAY, "login", &format!("wicket: {e}"));
            }
        };
        let mut form = vec![
            ("grant_type", "authorization_code".to_string()),
            ("code", code.clone()),
            ("redirect_uri", self.callback_url()),
            ("client_id", self.cfg.client_id.clone()),
            ("code_verifier", pending.verifier),
        ];
        if let Some(secret) = &self.cfg.client_secret {
            match read_secret(secret) {
                Ok(s) => form.push(("client_secret", s)),
                Err(e) => {
                    return web::problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "login",
                        &format!("wicket: {e}"),
                    );
                }
            }
        }
        let resp = match self.http.post(&ep.token).form(&form).send().await {
            Ok(r) => r,
            Err(e) => {
                return web::problem(
                    StatusCode::BAD_GATEWAY,
                    "login",
                    &format!("wicket: cannot reach the identity provider's token endpoint: {e}"),
                );
            }
        };
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let Some(token) = body["access_token"]
            .as_str()
            .filter(|_| status.is_success())
        else {
            return fail(format!(
                "the identity provider did not issue a token: {}",
                body["error"].as_str().unwrap_or("no access_token")
            ));
        };
        let expires_at = match validate(token.to_string()).await {
            Ok(t) => t,
            Err(e) => return fail(e),
        };
        let secs = (expires_at - chrono::Utc::now()).num_seconds().max(0);
        let id = random(32);
        {
            let mut g = self.sessions.lock().expect("sessions");
            let now = Instant::now();
            g.retain(|_, s| s.expires > now);
            if g.len() >= MAX_SESSIONS {
                return web::problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "login",
                    "wicket: too many browser sessions; try again later",
                );
            }
            g.insert(
                sha256(&id),
                Session {
                    token: token.to_string(),
                    expires: now + Duration::from_secs(secs as u64),
                },
            );
        }
        let mut r = redirect(&pending.return_to);
        if let Ok(v) = HeaderValue::from_str(&self.set_cookie(&id, secs)) {
            r.headers_mut().insert("set-cookie", v);
        }
        r
    }
}

/// The value of cookie `name` in a request.
fn cookie(h: &HeaderMap, name: &str) -> Option<String> {
    h.get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_returned_to() {
        assert!(local_path("/approvals?state=all"));
        for bad in [
            "https://evil.example/",
            "//evil.example",
            "/\\evil.example",
            "/\t/evil",
            "approvals",
            "",
        ] {
            assert!(!local_path(bad), "{bad:?}");
        }
    }

    fn login(url: &str) -> Login {
        Login::new(LoginConfig {
            issuer: "http://idp".into(),
            client_id: "gate".into(),
            client_secret: None,
            public_url: url::Url::parse(url).unwrap(),
            scopes: "openid".into(),
        })
        .unwrap()
    }

    #[test]
    fn the_gate_cookie_is_never_forwarded() {
        let l = login("http://gate");
        let v = HeaderValue::from_static("a=1; wicket_session=secret; b=2");
        assert_eq!(l.strip_cookie(&v).unwrap(), "a=1; b=2");
        let v = HeaderValue::from_static("wicket_session=secret");
        assert!(l.strip_cookie(&v).is_none());
        assert_eq!(login("https://gate").cookie_name(), "__Host-wicket_session");
        assert!(
            login("https://gate")
                .set_cookie("x", 5)
                .contains("; Secure")
        );
    }

    #[test]
    fn unknown_cookies_give_no_token() {
        let l = login("http://gate");
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("wicket_session=forged"));
        assert!(l.token_from_cookie(&h).is_none());
        assert!(wants_login(&hyper::Method::GET, &{
            let mut h = HeaderMap::new();
            h.insert("accept", HeaderValue::from_static("text/html,*/*"));
            h
        }));
    }
}
