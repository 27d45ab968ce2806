//! Validation of OIDC access tokens (JWT) into verified [`Principal`]s.
//!
//! - Issuer discovery (`/.well-known/openid-configuration`), whose `issuer`
//!   must equal the configured one.
//! - JWKS cached in memory and refetched when a token names an unknown `kid`,
//!   at most once per `jwks_min_refresh` (so a flood of bad tokens cannot turn
//!   into a flood of JWKS fetches).
//! - Algorithm allow-list (asymmetric only; never `none`, never HMAC).
//! - `iss`, `aud`, `exp`, `nbf` with a small leeway; `sub` required.
//! - Groups from a configurable claim; a rule tells agents from humans.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{Mutex, RwLock};
use wicket_core::{Principal, PrincipalKind};

/// How an agent is told from a human.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRule {
    /// A claim has a value (`wicket_kind=agent`); array claims match if they contain it.
    Claim {
        /// Claim name.
        name: String,
        /// Value.
        value: String,
    },
    /// Client-credentials tokens: `sub` equals `client_id` (or `azp`).
    ClientCredentials,
    /// Membership of a group.
    Group(String),
}

impl std::str::FromStr for AgentRule {
    type Err = String;
    /// `client-credentials`, `group:NAME` or `claim:NAME=VALUE`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "client-credentials" {
            return Ok(AgentRule::ClientCredentials);
        }
        if let Some(g) = s.strip_prefix("group:")
            && !g.is_empty()
        {
            return Ok(AgentRule::Group(g.into()));
        }
        if let Some((name, value)) = s.strip_prefix("claim:").and_then(|c| c.split_once('='))
            && !name.is_empty()
        {
            return Ok(AgentRule::Claim {
                name: name.into(),
                value: value.into(),
            });
        }
        Err(format!(
            "invalid agent rule `{s}` (expected client-credentials, group:NAME or claim:NAME=VALUE)"
        ))
    }
}

/// Validator settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Expected `iss`, exactly as the provider writes it.
    pub issuer: String,
    /// Accepted `aud` values (any). Empty disables the audience check, which
    /// is refused unless `allow_any_audience` is set.
    pub audiences: Vec<String>,
    /// Explicit opt-out of the audience check.
    pub allow_any_audience: bool,
    /// Claim holding the groups (array of strings or space-separated string).
    pub groups_claim: String,
    /// Allowed signature algorithms.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Rules marking a principal as an agent (any).
    pub agent_rules: Vec<AgentRule>,
    /// Minimum time between two JWKS fetches triggered by unknown `kid`s.
    pub jwks_min_refresh: Duration,
    /// JWKS is refetched at least this often even without unknown kids.
    pub jwks_max_age: Duration,
    /// Timeout of discovery and JWKS requests.
    pub http_timeout: Duration,
}

impl Config {
    /// Sensible defaults for `issuer` and `audience`.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Config {
            issuer: issuer.into(),
            audiences: vec![audience.into()],
            allow_any_audience: false,
            groups_claim: "groups".into(),
            algorithms: vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
                Algorithm::ES256,
                Algorithm::ES384,
                Algorithm::EdDSA,
            ],
            leeway: Duration::from_secs(30),
            agent_rules: vec![
                AgentRule::ClientCredentials,
                AgentRule::Claim {
                    name: "wicket_kind".into(),
                    value: "agent".into(),
                },
            ],
            jwks_min_refresh: Duration::from_secs(30),
            jwks_max_age: Duration::from_secs(3600),
            http_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a token was refused. The message is safe to show the caller: it never
/// contains the token or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("an OIDC access token is required")]
    Missing,
    /// Not a JWT.
    #[error("the access token is malformed")]
    Malformed,
    /// `alg` not on the allow-list (including `none` and HMAC).
    #[error("the access token's signature algorithm is not accepted")]
    Algorithm,
    /// No key with that `kid`, even after refreshing the JWKS.
    #[error("the access token was signed by an unknown key")]
    UnknownKey,
    /// Signature does not verify.
    #[error("the access token's signature is invalid")]
    Signature,
    /// `exp` in the past.
    #[error("the access token has expired")]
    Expired,
    /// `nbf` in the future.
    #[error("the access token is not valid yet")]
    NotYetValid,
    /// Wrong `iss`.
    #[error("the access token was issued by an untrusted issuer")]
    Issuer,
    /// Wrong `aud`.
    #[error("the access token is not meant for this service (audience)")]
    Audience,
    /// A required claim is missing or malformed.
    #[error("the access token lacks a valid `{0}` claim")]
    Claim(String),
    /// The provider could not be reached to fetch keys.
    #[error("the identity provider is unavailable")]
    Unavailable(String),
}

/// A validated token.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// Who.
    pub principal: Principal,
    /// When the token stops being valid (sessions end then).
    pub expires_at: DateTime<Utc>,
    /// All claims, for logging decisions (never logged whole by Wicket).
    pub claims: Value,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

struct Keys {
    by_kid: HashMap<String, (DecodingKey, Option<KeyAlgorithm>)>,
    anonymous: Vec<(DecodingKey, Option<KeyAlgorithm>)>,
    fetched: Instant,
}

/// Validates access tokens of one issuer.
pub struct Validator {
    cfg: Config,
    http: reqwest::Client,
    jwks_uri: String,
    keys: RwLock<Keys>,
    refresh: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("issuer", &self.cfg.issuer)
            .field("jwks_uri", &self.jwks_uri)
            .finish()
    }
}

fn alg_of(k: KeyAlgorithm) -> Option<Algorithm> {
    Some(match k {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

impl Validator {
    /// Discovers the issuer and fetches its keys once.
    pub async fn discover(cfg: Config) -> Result<Validator, AuthError> {
        if cfg.audiences.is_empty() && !cfg.allow_any_audience {
            return Err(AuthError::Unavailable(
                "no audience configured; set one or explicitly allow any audience".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(cfg.http_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| AuthError::Unavailable(format!("http client: {e}")))?;
        let url = format!(
            "{}/.well-known/openid-configuration",
            cfg.issuer.trim_end_matches('/')
        );
        let disc: Discovery = fetch_json(&http, &url).await?;
        if disc.issuer != cfg.issuer {
            return Err(AuthError::Unavailable(format!(
                "discovery at {url} names issuer `{}`, expected `{}`",
                disc.issuer, cfg.issuer
            )));
        }
        let keys = fetch_keys(&http, &disc.jwks_uri).await?;
        Ok(Validator {
            cfg,
            http,
            jwks_uri: disc.jwks_uri,
            keys: RwLock::new(keys),
            refresh: Mutex::new(None),
        })
    }

    /// [`Validator::discover`], retried once a second while the provider comes
    /// up (at most `attempts` tries), for services that start beside it.
    pub async fn discover_with_retry(cfg: Config, attempts: u32) -> Result<Validator, String> {
        let mut attempt = 1;
        loop {
            match Validator::discover(cfg.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < attempts => {
                    tracing::warn!(issuer = %cfg.issuer, error = %e, attempt, "OIDC discovery failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(format!("OIDC discovery of {} failed: {e}", cfg.issuer)),
            }
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Refetches the JWKS unless that happened less than `jwks_min_refresh` ago.
    async fn refresh_keys(&self) -> Result<bool, AuthError> {
        let mut last = self.refresh.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.cfg.jwks_min_refresh) {
            return Ok(false);
        }
        *last = Some(Instant::now());
        let keys = fetch_keys(&self.http, &self.jwks_uri).await?;
        *self.keys.write().await = keys;
        Ok(true)
    }

    async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Option<DecodingKey>, AuthError> {
        let keys = self.keys.read().await;
        let fits = |ka: &Option<KeyAlgorithm>| ka.is_none_or(|k| alg_of(k) == Some(alg));
        Ok(match kid {
            Some(kid) => keys
                .by_kid
                .get(kid)
                .filter(|(_, ka)| fits(ka))
                .map(|(k, _)| k.clone()),
            None => {
                let mut c = keys.anonymous.iter().filter(|(_, ka)| fits(ka));
                match (c.next(), c.next()) {
                    (Some((k, _)), None) => Some(k.clone()),
                    _ => None,
                }
            }
        })
    }

    fn stale(&self, keys: &Keys) -> bool {
        keys.fetched.elapsed() > self.cfg.jwks_max_age
    }

    /// Validates a bearer token and returns who it belongs to.
    pub async fn validate(&self, token: &str) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > 16 * 1024 || token.split('.').count() != 3 {
            return Err(AuthError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            // A readable header whose `alg` we do not know (`none`, say) is
            // an algorithm refusal; anything else is malformed.
            if header_alg(token).is_some() {
                AuthError::Algorithm
            } else {
                AuthError::Malformed
            }
        })?;
        if !self.cfg.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        if self.stale(&*self.keys.read().await) {
            let _ = self.refresh_keys().await;
        }
        let kid = header.kid.as_deref();
        let key = match self.key_for(kid, header.alg).await? {
            Some(k) => k,
            None => {
                self.refresh_keys().await?;
                self.key_for(kid, header.alg)
                    .await?
                    .ok_or(AuthError::UnknownKey)?
            }
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.cfg.issuer]);
        if self.cfg.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.cfg.audiences);
        }
        v.leeway = self.cfg.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub", "iss"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => AuthError::Signature,
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidIssuer => AuthError::Issuer,
                K::InvalidAudience => AuthError::Audience,
                K::MissingRequiredClaim(c) => AuthError::Claim(c.clone()),
                K::InvalidClaimFormat(c) => AuthError::Claim(c.clone()),
                K::InvalidAlgorithm => AuthError::Algorithm,
                _ => AuthError::Malformed,
            }
        })?;
        self.identity(data.claims)
    }

    fn identity(&self, claims: Value) -> Result<Identity, AuthError> {
        let s = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let subject = s("sub");
        if subject.is_empty() {
            return Err(AuthError::Claim("sub".into()));
        }
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| AuthError::Claim("exp".into()))?;
        let expires_at = Utc
            .timestamp_opt(exp, 0)
            .single()
            .ok_or_else(|| AuthError::Claim("exp".into()))?;
        let groups = match claims.get(&self.cfg.groups_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|g| g.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| AuthError::Claim(self.cfg.groups_claim.clone()))?,
            Some(Value::String(g)) => g.split_whitespace().map(str::to_string).collect(),
            Some(_) => return Err(AuthError::Claim(self.cfg.groups_claim.clone())),
        };
        let client_id = match s("client_id") {
            c if c.is_empty() => s("azp"),
            c => c,
        };
        let display_name = ["email", "preferred_username", "name"]
            .iter()
            .map(|c| s(c))
            .find(|v| !v.is_empty())
            .unwrap_or_default();
        let is_agent = self.cfg.agent_rules.iter().any(|r| match r {
            AgentRule::ClientCredentials => !client_id.is_empty() && client_id == subject,
            AgentRule::Group(g) => groups.contains(g),
            AgentRule::Claim { name, value } => match claims.get(name) {
                Some(Value::String(v)) => v == value,
                Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(value)),
                Some(Value::Bool(b)) => b.to_string() == *value,
                _ => false,
            },
        });
        Ok(Identity {
            principal: Principal {
                subject,
                issuer: s("iss"),
                kind: if is_agent {
                    PrincipalKind::Agent
                } else {
                    PrincipalKind::Human
                },
                groups,
                display_name,
                client_id,
            },
            expires_at,
            claims,
        })
    }
}

/// The `alg` of a JWT header, read without trusting anything else in it.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine as _;
    let head = token.split('.').next()?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    v.get("alg")?.as_str().map(str::to_string)
}

async fn fetch_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> Result<T, AuthError> {
    let resp = http
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| AuthError::Unavailable(format!("GET {url}: {e}")))?;
    if !resp.status().is_success() {
        return Err(AuthError::Unavailable(format!(
            "GET {url}: HTTP {}",
            resp.status()
        )));
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| AuthError::Unavailable(format!("GET {url}: {e}")))?;
    if bytes.len() > 1024 * 1024 {
        return Err(AuthError::Unavailable(format!(
            "GET {url}: response too large"
        )));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| AuthError::Unavailable(format!("GET {url}: invalid JSON: {e}")))
}

async fn fetch_keys(http: &reqwest::Client, url: &str) -> Result<Keys, AuthError> {
    let set: JwkSet = fetch_json(http, url).await?;
    let mut keys = Keys {
        by_kid: HashMap::new(),
        anonymous: Vec::new(),
        fetched: Instant::now(),
    };
    for jwk in &set.keys {
        if matches!(
            jwk.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        ) {
            continue;
        }
        // Symmetric keys never verify access tokens here.
        if matches!(
            jwk.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        ) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            tracing::warn!(kid = ?jwk.common.key_id, "skipping unusable JWK");
            continue;
        };
        let alg = jwk.common.key_algorithm;
        match &jwk.common.key_id {
            Some(kid) => {
                keys.by_kid.insert(kid.clone(), (key.clone(), alg));
                keys.anonymous.push((key, alg));
            }
            None => keys.anonymous.push((key, alg)),
        }
    }
    tracing::debug!(url, keys = keys.anonymous.len(), "fetched JWKS");
    Ok(keys)
}
