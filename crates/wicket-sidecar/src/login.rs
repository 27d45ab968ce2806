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
//!
//! Several processes behind one address (the control service's replicas,
//! the replicas of a gated application) cannot share that memory: with
//! [`LoginConfig::session_key`], the login in flight
//! and the session travel in the browser instead, sealed (AES-256-GCM)
//! with a key the processes share, so that any of them can finish a login
//! another started and serve its session. The token then reaches the
//! browser only encrypted; the session ends when the token expires, and
//! logging out clears the browser's cookies.

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
/// A sealed session is cut into cookies of at most this many characters
/// (browsers keep 4 KiB a cookie, name and attributes included)…
const COOKIE_CHUNK: usize = 3800;
/// …and at most this many of them.
const MAX_CHUNKS: usize = 4;

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
    /// A secret every process serving these logins shares (at least 32
    /// characters): logins in flight and sessions are then sealed into the
    /// browser's cookies with a key derived from it, so that any of the
    /// processes serves them. `None`: they live in this process.
    pub session_key: Option<Secret>,
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
    /// Set: logins and sessions are sealed into cookies instead.
    seal: Option<aws_lc_rs::aead::LessSafeKey>,
    secure: bool,
}

/// A login in flight, as sealed into the browser's login cookie.
#[derive(serde::Serialize, serde::Deserialize)]
struct SealedLogin {
    state: String,
    verifier: String,
    return_to: String,
    /// Unix seconds.
    created: i64,
}

/// A session, as sealed into the browser's session cookies.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SealedSession {
    /// Random: what a sign-out records, for the processes to refuse it.
    pub id: String,
    /// The access token.
    pub token: String,
    /// When it expires, Unix seconds.
    pub expires: i64,
}

impl SealedSession {
    /// When the session ends by itself (its token's expiry).
    pub fn until(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::from_timestamp(self.expires, 0)
    }
}

impl std::fmt::Debug for SealedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSession")
            .field("id", &self.id)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// Seals `plain` for `purpose` (bound as associated data, so that one
/// cookie cannot stand for another): base64url of nonce, ciphertext, tag.
fn seal(key: &aws_lc_rs::aead::LessSafeKey, purpose: &str, plain: &[u8]) -> Option<String> {
    use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).ok()?;
    let mut data = plain.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(purpose.as_bytes()),
        &mut data,
    )
    .ok()?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out))
}

/// `value` as JSON, sealed for `purpose`.
fn seal_json<T: serde::Serialize>(
    key: &aws_lc_rs::aead::LessSafeKey,
    purpose: &str,
    value: &T,
) -> Result<String, String> {
    serde_json::to_vec(value)
        .ok()
        .and_then(|plain| seal(key, purpose, &plain))
        .ok_or_else(|| format!("wicket: cannot seal the {purpose}"))
}

/// What [`seal`] sealed for `purpose`; `None` for anything else.
fn unseal(key: &aws_lc_rs::aead::LessSafeKey, purpose: &str, text: &str) -> Option<Vec<u8>> {
    use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()?;
    if raw.len() < NONCE_LEN {
        return None;
    }
    let (nonce, sealed) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut data = sealed.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut data)
        .ok()?;
    Some(plain.to_vec())
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
        let key = match &cfg.session_key {
            None => None,
            Some(secret) => {
                let text = read_secret(secret)?;
                if text.trim().len() < 32 {
                    return Err(
                        "the login session key must be at least 32 characters (openssl rand -base64 32)"
                            .into(),
                    );
                }
                // Its own key, whatever else the secret is used for.
                Some(sha256(&format!("wicket login sessions\0{text}")))
            }
        };
        let login = Login {
            cfg,
            http,
            endpoints: tokio::sync::Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            seal: None,
            secure,
        };
        match key {
            Some(k) => login.sealed(&k),
            None => Ok(login),
        }
    }

    /// Keeps logins in flight and sessions in the browser, sealed with
    /// `key` (32 bytes), instead of in this process: every process given
    /// the same key serves the same sessions.
    fn sealed(mut self, key: &[u8]) -> Result<Login, String> {
        let unbound = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key)
            .map_err(|_| "the session sealing key must be 32 bytes".to_string())?;
        self.seal = Some(aws_lc_rs::aead::LessSafeKey::new(unbound));
        Ok(self)
    }

    fn cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-wicket_session"
        } else {
            "wicket_session"
        }
    }

    fn login_cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-wicket_login"
        } else {
            "wicket_login"
        }
    }

    /// The name of the `i`th cookie of a sealed session.
    fn chunk_name(&self, i: usize) -> String {
        match i {
            0 => self.cookie_name().to_string(),
            i => format!("{}_{i}", self.cookie_name()),
        }
    }

    /// Whether `name` is one of the gate's own cookies.
    fn is_own_cookie(&self, name: &str) -> bool {
        name == self.login_cookie_name() || (0..MAX_CHUNKS).any(|i| name == self.chunk_name(i))
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
        if self.seal.is_some() {
            return self.sealed_session(h).map(|s| s.token);
        }
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

    /// The request's sealed session, when it has a live one (with its id,
    /// for a sign-out that every process then refuses); `None` without
    /// one, or when sessions are not sealed.
    pub fn sealed_session(&self, h: &HeaderMap) -> Option<SealedSession> {
        let key = self.seal.as_ref()?;
        let mut text = String::new();
        for i in 0..MAX_CHUNKS {
            match cookie(h, &self.chunk_name(i)) {
                Some(part) => text.push_str(&part),
                None => break,
            }
        }
        let plain = unseal(key, "session", &text)?;
        let s: SealedSession = serde_json::from_slice(&plain).ok()?;
        (s.expires > chrono::Utc::now().timestamp()).then_some(s)
    }

    /// The `Cookie` header without the gate's own cookie (`None`: nothing left).
    pub fn strip_cookie(&self, value: &HeaderValue) -> Option<HeaderValue> {
        let s = value.to_str().ok()?;
        let kept: Vec<&str> = s
            .split(';')
            .map(str::trim)
            .filter(|c| {
                !c.is_empty() && !c.split('=').next().is_some_and(|n| self.is_own_cookie(n))
            })
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
        let return_to = if local_path(return_to) {
            return_to.to_string()
        } else {
            "/".to_string()
        };
        // Sealed: the login travels in the browser, for whichever process
        // the callback reaches.
        let mut login_cookie = None;
        if let Some(key) = &self.seal {
            let login = SealedLogin {
                state: state.clone(),
                verifier,
                return_to,
                created: chrono::Utc::now().timestamp(),
            };
            let sealed = match seal_json(key, "login", &login) {
                Ok(s) => s,
                Err(e) => return web::problem(StatusCode::INTERNAL_SERVER_ERROR, "login", &e),
            };
            login_cookie = Some(self.cookie(
                self.login_cookie_name(),
                &sealed,
                PENDING_TTL.as_secs() as i64,
            ));
        } else {
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
        with_cookies(redirect(url.as_str()), login_cookie)
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
            Some("callback") => self.callback(query, h, validate).await,
            Some("logout") => {
                if let Some(id) = cookie(h, self.cookie_name()) {
                    self.sessions.lock().expect("sessions").remove(&sha256(&id));
                }
                with_cookies(
                    web::problem(StatusCode::OK, "logged-out", "wicket: logged out"),
                    self.session_cookies(&[], 0),
                )
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
        self.cookie(self.cookie_name(), value, max_age)
    }

    /// `Set-Cookie` values for every cookie a session may take: `chunks`
    /// in order (for `max_age` seconds), the other names cleared.
    fn session_cookies<'a>(
        &'a self,
        chunks: &'a [&str],
        max_age: i64,
    ) -> impl Iterator<Item = String> + 'a {
        (0..MAX_CHUNKS).map(move |i| match chunks.get(i) {
            Some(c) => self.cookie(&self.chunk_name(i), c, max_age),
            None => self.cookie(&self.chunk_name(i), "", 0),
        })
    }

    /// A `Set-Cookie` value for the gate's cookie `name`.
    fn cookie(&self, name: &str, value: &str, max_age: i64) -> String {
        format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{}",
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The login a callback finishes: from this process's memory, or
    /// unsealed from the browser's login cookie (its state must be the
    /// callback's: the login started in this browser).
    fn take_pending(&self, state: &str, h: &HeaderMap) -> Result<Pending, String> {
        let expired = || "this login expired or was already used; start again".to_string();
        let Some(key) = &self.seal else {
            let p = self
                .pending
                .lock()
                .expect("pending")
                .remove(state)
                .ok_or_else(expired)?;
            return if p.created.elapsed() > PENDING_TTL {
                Err("this login expired; start again".into())
            } else {
                Ok(p)
            };
        };
        let login: SealedLogin = cookie(h, self.login_cookie_name())
            .and_then(|c| unseal(key, "login", &c))
            .and_then(|plain| serde_json::from_slice(&plain).ok())
            .ok_or_else(|| {
                "this browser started no login here (cookies off, or it expired); start again"
                    .to_string()
            })?;
        if aws_lc_rs::constant_time::verify_slices_are_equal(
            login.state.as_bytes(),
            state.as_bytes(),
        )
        .is_err()
        {
            return Err(expired());
        }
        let age = chrono::Utc::now().timestamp() - login.created;
        if !(0..=PENDING_TTL.as_secs() as i64).contains(&age) {
            return Err("this login expired; start again".into());
        }
        Ok(Pending {
            verifier: login.verifier,
            return_to: login.return_to,
            created: Instant::now(),
        })
    }

    async fn callback<F, Fut>(&self, query: &str, h: &HeaderMap, validate: F) -> Response<Body>
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
        let pending = match self.take_pending(state, h) {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
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
        if let Some(key) = &self.seal {
            return self.seal_session(key, token, expires_at, secs, &pending.return_to);
        }
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
        with_cookies(redirect(&pending.return_to), [self.set_cookie(&id, secs)])
    }

    /// The end of a sealed login: the session sealed into as many cookies
    /// as it takes (the cookies of a longer earlier session cleared), the
    /// login cookie cleared, and the browser sent on.
    fn seal_session(
        &self,
        key: &aws_lc_rs::aead::LessSafeKey,
        token: &str,
        expires_at: chrono::DateTime<chrono::Utc>,
        secs: i64,
        return_to: &str,
    ) -> Response<Body> {
        let session = SealedSession {
            id: random(16),
            token: token.to_string(),
            expires: expires_at.timestamp(),
        };
        let sealed = match seal_json(key, "session", &session) {
            Ok(s) => s,
            Err(e) => return web::problem(StatusCode::INTERNAL_SERVER_ERROR, "login", &e),
        };
        let chunks: Vec<&str> = sealed
            .as_bytes()
            .chunks(COOKIE_CHUNK)
            .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
            .collect();
        if chunks.len() > MAX_CHUNKS {
            return web::problem(
                StatusCode::UNAUTHORIZED,
                "login",
                &format!(
                    "wicket: the identity provider's access token ({} bytes) is too large to keep in browser cookies; ask for fewer claims in it",
                    token.len()
                ),
            );
        }
        let login_cleared = self.cookie(self.login_cookie_name(), "", 0);
        with_cookies(
            redirect(return_to),
            std::iter::once(login_cleared).chain(self.session_cookies(&chunks, secs)),
        )
    }
}

/// `r` with a `Set-Cookie` header for each of `cookies`.
fn with_cookies(
    mut r: Response<Body>,
    cookies: impl IntoIterator<Item = String>,
) -> Response<Body> {
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append("set-cookie", v);
        }
    }
    r
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
            session_key: None,
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

    /// The `Cookie` header a browser sends back after `r`'s `Set-Cookie`s.
    fn cookies_after(r: &Response<Body>) -> HeaderMap {
        let jar: Vec<String> = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
            .filter(|c| !c.ends_with('='))
            .collect();
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_str(&jar.join("; ")).unwrap());
        h
    }

    #[test]
    fn sealed_sessions_are_read_by_any_process_with_the_key_only() {
        let key = [7u8; 32];
        let a = login("https://console").sealed(&key).unwrap();
        let b = login("https://console").sealed(&key).unwrap();
        let other = login("https://console").sealed(&[8u8; 32]).unwrap();
        assert!(login("https://console").sealed(&[1u8; 16]).is_err());
        let k = a.seal.as_ref().unwrap();
        let later = chrono::Utc::now() + chrono::Duration::minutes(5);
        // A token too long for one cookie is cut into several, each within
        // what browsers keep, and read back whole by another process.
        for len in [900, 9000] {
            let token = "t".repeat(len);
            let r = a.seal_session(k, &token, later, 300, "/approvals");
            assert_eq!(r.status(), StatusCode::FOUND);
            for v in r.headers().get_all("set-cookie") {
                let v = v.to_str().unwrap();
                assert!(v.len() < 4000, "{}", v.len());
                assert!(
                    v.contains("HttpOnly") && v.contains("; Secure") && v.starts_with("__Host-")
                );
            }
            let h = cookies_after(&r);
            assert_eq!(b.token_from_cookie(&h).as_deref(), Some(token.as_str()));
            assert!(other.token_from_cookie(&h).is_none(), "another key");
            // Nothing of it reaches an upstream.
            assert!(b.strip_cookie(&h["cookie"]).is_none());
        }
        // Expired: no token.
        let past = chrono::Utc::now() - chrono::Duration::seconds(1);
        let r = a.seal_session(k, "old", past, 0, "/");
        assert!(b.token_from_cookie(&cookies_after(&r)).is_none());
        // Larger than the cookies can carry: refused, saying why.
        let r = a.seal_session(k, &"t".repeat(20_000), later, 300, "/");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        // A sealed login does not pass for a session, nor a tampered one.
        let login_seal = seal(k, "login", b"{}").unwrap();
        assert!(unseal(k, "session", &login_seal).is_none());
        let mut bytes = login_seal.into_bytes();
        bytes[20] ^= 1;
        assert!(unseal(k, "login", std::str::from_utf8(&bytes).unwrap()).is_none());
    }

    #[test]
    fn a_shared_secret_seals_sessions_every_replica_reads() {
        let with = |key: &str| {
            Login::new(LoginConfig {
                session_key: Some(Secret::Value(key.into())),
                ..login("http://app").cfg
            })
        };
        let err = with("short").unwrap_err();
        assert!(err.contains("at least 32 characters"), "{err}");
        let shared = "a secret every replica of the app mounts";
        let (a, b) = (with(shared).unwrap(), with(shared).unwrap());
        let other = with("another secret, also long enough to be used").unwrap();
        let later = chrono::Utc::now() + chrono::Duration::minutes(5);
        let r = a.seal_session(a.seal.as_ref().unwrap(), "tok", later, 300, "/");
        let h = cookies_after(&r);
        assert_eq!(b.token_from_cookie(&h).as_deref(), Some("tok"));
        assert!(other.token_from_cookie(&h).is_none());
        // Without a secret, sessions stay in the process.
        assert!(login("http://app").seal.is_none());
    }

    #[test]
    fn a_sealed_login_is_finished_only_by_the_browser_that_started_it() {
        let key = [9u8; 32];
        let a = login("http://console").sealed(&key).unwrap();
        let b = login("http://console").sealed(&key).unwrap();
        let sealed = SealedLogin {
            state: "s1".into(),
            verifier: "v".into(),
            return_to: "/approvals".into(),
            created: chrono::Utc::now().timestamp(),
        };
        let c = seal(
            a.seal.as_ref().unwrap(),
            "login",
            &serde_json::to_vec(&sealed).unwrap(),
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "cookie",
            HeaderValue::from_str(&format!("wicket_login={c}")).unwrap(),
        );
        let p = b.take_pending("s1", &h).unwrap();
        assert_eq!(
            (p.verifier.as_str(), p.return_to.as_str()),
            ("v", "/approvals")
        );
        assert!(b.take_pending("s2", &h).is_err(), "another login's state");
        assert!(
            b.take_pending("s1", &HeaderMap::new()).is_err(),
            "no cookie"
        );
        let old = SealedLogin {
            created: chrono::Utc::now().timestamp() - 3600,
            ..sealed
        };
        let c = seal(
            a.seal.as_ref().unwrap(),
            "login",
            &serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        h.insert(
            "cookie",
            HeaderValue::from_str(&format!("wicket_login={c}")).unwrap(),
        );
        match b.take_pending("s1", &h) {
            Err(e) => assert!(e.contains("expired"), "{e}"),
            Ok(_) => panic!("an hour-old login was finished"),
        }
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
