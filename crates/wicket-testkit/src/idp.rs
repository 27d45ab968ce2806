//! An in-process OpenID provider for tests and the demo.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Claims of a token to mint.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// `sub`.
    pub subject: String,
    /// `groups`.
    pub groups: Vec<String>,
    /// `client_id` / `azp`; for agents by default equal to the subject.
    pub client_id: String,
    /// Mark the token as an agent's (`wicket_kind: agent`).
    pub agent: bool,
    /// Lifetime from now; negative for an already expired token.
    pub ttl_seconds: i64,
    /// `nbf` offset from now (positive: not yet valid).
    pub nbf_offset_seconds: i64,
    /// `aud`; defaults to the IdP's audience.
    pub audience: Option<String>,
    /// `email`.
    pub email: Option<String>,
}

impl TokenSpec {
    /// A person in `groups`.
    pub fn human(subject: &str, groups: &[&str]) -> Self {
        TokenSpec {
            subject: subject.into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            client_id: "wicket-cli".into(),
            agent: false,
            ttl_seconds: 3600,
            nbf_offset_seconds: 0,
            audience: None,
            email: Some(format!("{subject}@example.test")),
        }
    }

    /// An agent (client-credentials style: `sub` equals `client_id`).
    pub fn agent(client_id: &str, groups: &[&str]) -> Self {
        TokenSpec {
            subject: client_id.into(),
            client_id: client_id.into(),
            agent: true,
            email: None,
            ..TokenSpec::human(client_id, groups)
        }
    }
}

struct Key {
    kid: String,
    encoding: EncodingKey,
    jwk: Jwk,
}

fn new_key(kid: &str) -> Key {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .expect("P-256 key generation");
    let encoding = EncodingKey::from_ec_der(pkcs8.as_ref());
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256).expect("jwk");
    jwk.common.key_id = Some(kid.into());
    Key {
        kid: kid.into(),
        encoding,
        jwk,
    }
}

/// An authorization code issued to a browser (authorization-code flow).
struct Code {
    redirect_uri: String,
    challenge: String,
    client_id: String,
    spec: TokenSpec,
}

struct Device {
    polls: u32,
    spec: TokenSpec,
}

struct State {
    issuer: String,
    audience: String,
    keys: Vec<Key>,
    /// Keys served in the JWKS (by kid); signing uses the last key.
    published: Vec<String>,
    clients: HashMap<String, (String, TokenSpec)>,
    device_user: TokenSpec,
    devices: HashMap<String, Device>,
    codes: HashMap<String, Code>,
    jwks_fetches: u64,
    next_kid: u32,
}

/// An in-process OpenID provider on 127.0.0.1.
#[derive(Clone)]
pub struct TestIdp {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
}

impl TestIdp {
    /// Starts the provider on an ephemeral port. Tokens carry `aud = audience`.
    pub async fn start(audience: &str) -> TestIdp {
        TestIdp::start_on("127.0.0.1:0", audience).await
    }

    /// Starts the provider on `bind` (e.g. `127.0.0.1:8089`).
    pub async fn start_on(bind: &str, audience: &str) -> TestIdp {
        let listener = TcpListener::bind(bind).await.expect("bind test idp");
        let addr = listener.local_addr().expect("local addr");
        let issuer = format!("http://{addr}");
        let state = Arc::new(Mutex::new(State {
            issuer,
            audience: audience.into(),
            keys: vec![new_key("k1")],
            published: vec!["k1".into()],
            clients: HashMap::new(),
            device_user: TokenSpec::human("demo-admin", &["wicket-admins"]),
            devices: HashMap::new(),
            codes: HashMap::new(),
            jwks_fetches: 0,
            next_kid: 2,
        }));
        let idp = TestIdp { state, addr };
        let served = idp.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let idp = served.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let idp = idp.clone();
                        async move { Ok::<_, hyper::Error>(idp.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        idp
    }

    /// Issuer URL (`http://127.0.0.1:PORT`).
    pub fn issuer(&self) -> String {
        self.state.lock().unwrap().issuer.clone()
    }

    /// Serves and signs as `issuer` (a public URL, e.g. a compose service
    /// name) instead of the address it listens on.
    pub fn set_issuer(&self, issuer: &str) {
        self.state.lock().unwrap().issuer = issuer.trim_end_matches('/').to_string();
    }

    /// The audience tokens carry.
    pub fn audience(&self) -> String {
        self.state.lock().unwrap().audience.clone()
    }

    /// Socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> u64 {
        self.state.lock().unwrap().jwks_fetches
    }

    /// Registers a confidential client for the client-credentials grant.
    pub fn add_client(&self, client_id: &str, secret: &str, spec: TokenSpec) {
        self.state
            .lock()
            .unwrap()
            .clients
            .insert(client_id.into(), (secret.into(), spec));
    }

    /// Sets who "logs in" through the device flow (approved on the second poll).
    pub fn set_device_user(&self, spec: TokenSpec) {
        self.state.lock().unwrap().device_user = spec;
    }

    /// Adds a new signing key and publishes it; with `retire_old`, the old
    /// keys leave the JWKS. Returns the new kid.
    pub fn rotate_key(&self, retire_old: bool) -> String {
        let mut s = self.state.lock().unwrap();
        let kid = format!("k{}", s.next_kid);
        s.next_kid += 1;
        s.keys.push(new_key(&kid));
        if retire_old {
            s.published.clear();
        }
        s.published.push(kid.clone());
        kid
    }

    /// Mints a signed access token.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        let s = self.state.lock().unwrap();
        let key = s.keys.last().expect("a key");
        sign(&s, key, spec)
    }

    /// Mints a token signed by a key that is not in the JWKS but claims a published kid.
    pub fn mint_with_foreign_key(&self, spec: &TokenSpec) -> String {
        let s = self.state.lock().unwrap();
        let mut foreign = new_key("foreign");
        foreign.kid = s.keys.last().expect("a key").kid.clone();
        sign(&s, &foreign, spec)
    }

    /// An unsigned token (`alg: none`).
    pub fn mint_alg_none(&self, spec: &TokenSpec) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let s = self.state.lock().unwrap();
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(claims(&s, spec).to_string());
        format!("{header}.{body}.")
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        if method == Method::GET && path == "/auth" {
            return self.authorize(req.uri().query().unwrap_or(""));
        }
        let basic = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.decode(b).ok()
            })
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| {
                s.split_once(':')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            });
        let body = crate::body_bytes(req).await;
        let mut form: HashMap<String, String> =
            url::form_urlencoded::parse(&body).into_owned().collect();
        if let Some((id, secret)) = basic {
            form.insert("client_id".into(), id);
            form.insert("client_secret".into(), secret);
        }
        let (status, value) = match (method, path.as_str()) {
            (Method::GET, "/.well-known/openid-configuration") => {
                let iss = self.issuer();
                (
                    StatusCode::OK,
                    json!({
                        "issuer": iss,
                        "jwks_uri": format!("{iss}/jwks"),
                        "token_endpoint": format!("{iss}/token"),
                        "device_authorization_endpoint": format!("{iss}/device/code"),
                        "authorization_endpoint": format!("{iss}/auth"),
                        "grant_types_supported": ["client_credentials", "urn:ietf:params:oauth:grant-type:device_code", "authorization_code"],
                        "code_challenge_methods_supported": ["S256"],
                        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
                        "id_token_signing_alg_values_supported": ["ES256"],
                        "response_types_supported": ["code"],
                        "subject_types_supported": ["public"],
                    }),
                )
            }
            (Method::GET, "/jwks") => {
                let mut s = self.state.lock().unwrap();
                s.jwks_fetches += 1;
                let keys = s
                    .keys
                    .iter()
                    .filter(|k| s.published.contains(&k.kid))
                    .map(|k| k.jwk.clone())
                    .collect();
                (
                    StatusCode::OK,
                    serde_json::to_value(JwkSet { keys }).unwrap(),
                )
            }
            (Method::POST, "/device/code") => {
                let code = uuid::Uuid::new_v4().to_string();
                let mut s = self.state.lock().unwrap();
                let spec = s.device_user.clone();
                s.devices.insert(code.clone(), Device { polls: 0, spec });
                let iss = s.issuer.clone();
                (
                    StatusCode::OK,
                    json!({
                        "device_code": code,
                        "user_code": "WICK-ETDEMO",
                        "verification_uri": format!("{iss}/device"),
                        "verification_uri_complete": format!("{iss}/device?user_code=WICK-ETDEMO"),
                        "expires_in": 300,
                        "interval": 1,
                    }),
                )
            }
            (Method::POST, "/token") => self.token(&form),
            _ => (StatusCode::NOT_FOUND, json!({"error": "not_found"})),
        };
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("cache-control", "no-store")
            .body(Full::new(Bytes::from(value.to_string())))
            .expect("response")
    }

    fn token(&self, form: &HashMap<String, String>) -> (StatusCode, Value) {
        let grant = form.get("grant_type").map(String::as_str).unwrap_or("");
        let bad = |e: &str| (StatusCode::BAD_REQUEST, json!({"error": e}));
        let spec = match grant {
            "client_credentials" => {
                let id = form.get("client_id").cloned().unwrap_or_default();
                let secret = form.get("client_secret").cloned().unwrap_or_default();
                let s = self.state.lock().unwrap();
                match s.clients.get(&id) {
                    Some((want, spec)) if *want == secret => spec.clone(),
                    _ => return (StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"})),
                }
            }
            "urn:ietf:params:oauth:grant-type:device_code" => {
                let code = form.get("device_code").cloned().unwrap_or_default();
                let mut s = self.state.lock().unwrap();
                let Some(dev) = s.devices.get_mut(&code) else {
                    return bad("expired_token");
                };
                dev.polls += 1;
                if dev.polls < 2 {
                    return bad("authorization_pending");
                }
                let spec = dev.spec.clone();
                s.devices.remove(&code);
                spec
            }
            "authorization_code" => {
                let code = form.get("code").cloned().unwrap_or_default();
                let Some(c) = self.state.lock().unwrap().codes.remove(&code) else {
                    return bad("invalid_grant");
                };
                let verifier = form.get("code_verifier").cloned().unwrap_or_default();
                let digest =
                    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
                let computed = {
                    use base64::Engine as _;
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
                };
                if form.get("redirect_uri") != Some(&c.redirect_uri)
                    || form.get("client_id") != Some(&c.client_id)
                    || computed != c.challenge
                {
                    return bad("invalid_grant");
                }
                c.spec
            }
            _ => return bad("unsupported_grant_type"),
        };
        let token = self.mint(&spec);
        (
            StatusCode::OK,
            json!({"access_token": token, "token_type": "Bearer", "expires_in": spec.ttl_seconds}),
        )
    }

    /// The authorization endpoint: the browser user (the device-flow user)
    /// "logs in" at once and is sent back with a code (PKCE S256 required).
    fn authorize(&self, query: &str) -> Response<Full<Bytes>> {
        let q: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let (Some(redirect), Some(state), Some(challenge), Some(client_id)) = (
            q.get("redirect_uri"),
            q.get("state"),
            q.get("code_challenge"),
            q.get("client_id"),
        ) else {
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(Full::new(Bytes::from_static(b"invalid_request")))
                .expect("response");
        };
        let code = uuid::Uuid::new_v4().simple().to_string();
        let mut s = self.state.lock().unwrap();
        let spec = s.device_user.clone();
        s.codes.insert(
            code.clone(),
            Code {
                redirect_uri: redirect.clone(),
                challenge: challenge.clone(),
                client_id: client_id.clone(),
                spec,
            },
        );
        let mut to = url::Url::parse(redirect).expect("redirect_uri is a URL");
        to.query_pairs_mut()
            .append_pair("code", &code)
            .append_pair("state", state);
        Response::builder()
            .status(StatusCode::FOUND)
            .header("location", to.as_str())
            .body(Full::new(Bytes::new()))
            .expect("response")
    }

    /// Runs until the process is interrupted (for the demo binary).
    pub async fn serve_forever(&self) {
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
}

fn claims(s: &State, spec: &TokenSpec) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut c = json!({
        "iss": s.issuer,
        "sub": spec.subject,
        "aud": spec.audience.clone().unwrap_or_else(|| s.audience.clone()),
        "iat": now,
        "nbf": now + spec.nbf_offset_seconds,
        "exp": now + spec.ttl_seconds,
        "jti": uuid::Uuid::new_v4().to_string(),
        "client_id": spec.client_id,
        "azp": spec.client_id,
        "groups": spec.groups,
    });
    if spec.agent {
        c["wicket_kind"] = json!("agent");
    }
    if let Some(e) = &spec.email {
        c["email"] = json!(e);
    }
    c
}

fn sign(s: &State, key: &Key, spec: &TokenSpec) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    header.typ = Some("at+jwt".into());
    jsonwebtoken::encode(&header, &claims(s, spec), &key.encoding).expect("sign token")
}
