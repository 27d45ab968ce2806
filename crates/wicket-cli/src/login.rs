//! `wicket login`: the OAuth 2.0 device authorization grant (RFC 8628) for
//! people, client credentials for agents; tokens cached per issuer.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::CliError;

/// A cached token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedToken {
    /// Issuer it came from.
    pub issuer: String,
    /// The access token.
    pub access_token: String,
    /// Unix seconds when it expires (0 if unknown).
    pub expires_at: i64,
}

#[derive(Deserialize)]
struct Discovery {
    token_endpoint: String,
    #[serde(default)]
    device_authorization_endpoint: Option<String>,
    #[serde(default)]
    token_endpoint_auth_methods_supported: Vec<String>,
}

#[derive(Deserialize)]
struct DeviceAuth {
    device_code: String,
    user_code: String,
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    #[serde(default = "five")]
    interval: u64,
    #[serde(default = "ten_minutes")]
    expires_in: u64,
}

fn five() -> u64 {
    5
}
fn ten_minutes() -> u64 {
    600
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// Directory of cached tokens (`$XDG_CACHE_HOME/wicket` or `~/.cache/wicket`).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WICKET_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("wicket");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("wicket")
}

fn cache_file(issuer: &str) -> PathBuf {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, issuer.as_bytes());
    cache_dir().join(format!("token-{}.json", &hex::encode(digest)[..16]))
}

/// Saves a token readable only by the user.
pub fn save(token: &CachedToken) -> Result<PathBuf, CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = cache_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::usage(format!("cannot create {}: {e}", dir.display())))?;
    let path = cache_file(&token.issuer);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| CliError::usage(format!("cannot write {}: {e}", tmp.display())))?;
    f.write_all(
        serde_json::to_string(token)
            .expect("token serializes")
            .as_bytes(),
    )
    .map_err(|e| CliError::usage(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| CliError::usage(format!("cannot write {}: {e}", path.display())))?;
    std::fs::write(cache_dir().join("issuer"), &token.issuer)
        .map_err(|e| CliError::usage(format!("cannot write issuer: {e}")))?;
    Ok(path)
}

/// The cached token for `issuer` (or for the last issuer logged in to).
pub fn load(issuer: Option<&str>) -> Option<CachedToken> {
    let issuer = match issuer {
        Some(i) => i.to_string(),
        None => std::fs::read_to_string(cache_dir().join("issuer")).ok()?,
    };
    let raw = std::fs::read_to_string(cache_file(issuer.trim())).ok()?;
    serde_json::from_str(&raw).ok()
}

/// Removes the cached token of `issuer` (or the last one).
pub fn logout(issuer: Option<&str>) -> Result<bool, CliError> {
    let Some(t) = load(issuer) else {
        return Ok(false);
    };
    std::fs::remove_file(cache_file(&t.issuer))
        .map_err(|e| CliError::usage(format!("cannot remove cached token: {e}")))?;
    Ok(true)
}

fn http() -> Result<reqwest::Client, CliError> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| CliError::usage(format!("http client: {e}")))
}

async fn discover(http: &reqwest::Client, issuer: &str) -> Result<Discovery, CliError> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let resp = http.get(&url).send().await.map_err(|e| {
        CliError::unavailable(format!("cannot reach the identity provider at {url}: {e}"))
    })?;
    if !resp.status().is_success() {
        return Err(CliError::unavailable(format!(
            "{url} answered HTTP {}",
            resp.status()
        )));
    }
    resp.json().await.map_err(|e| {
        CliError::unavailable(format!("{url} is not an OpenID discovery document: {e}"))
    })
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn finish(issuer: &str, t: TokenResponse) -> Result<CachedToken, CliError> {
    match t.access_token {
        Some(access_token) => Ok(CachedToken {
            issuer: issuer.to_string(),
            access_token,
            expires_at: t.expires_in.map(|s| now() + s).unwrap_or(0),
        }),
        None => Err(CliError::auth(format!(
            "the identity provider refused: {}{}",
            t.error.unwrap_or_else(|| "no access token".into()),
            t.error_description
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ))),
    }
}

/// Client credentials grant (agents and automation).
pub async fn client_credentials(
    issuer: &str,
    client_id: &str,
    client_secret: &str,
    resource: Option<&str>,
    scope: Option<&str>,
) -> Result<CachedToken, CliError> {
    let http = http()?;
    let d = discover(&http, issuer).await?;
    let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
    if let Some(r) = resource {
        form.push(("resource", r));
    }
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    let basic = d.token_endpoint_auth_methods_supported.is_empty()
        || d.token_endpoint_auth_methods_supported
            .iter()
            .any(|m| m == "client_secret_basic");
    let mut req = http.post(&d.token_endpoint);
    if basic {
        req = req.basic_auth(client_id, Some(client_secret));
    } else {
        form.push(("client_id", client_id));
        form.push(("client_secret", client_secret));
    }
    let resp = req
        .form(&form)
        .send()
        .await
        .map_err(|e| CliError::unavailable(format!("token request failed: {e}")))?;
    let t: TokenResponse = resp
        .json()
        .await
        .map_err(|e| CliError::unavailable(format!("bad token response: {e}")))?;
    finish(issuer, t)
}

/// Device authorization grant (people): prints a code to enter in a browser
/// and polls until the person approves.
pub async fn device(
    issuer: &str,
    client_id: &str,
    resource: Option<&str>,
    scope: &str,
) -> Result<CachedToken, CliError> {
    let http = http()?;
    let d = discover(&http, issuer).await?;
    let endpoint = d.device_authorization_endpoint.ok_or_else(|| {
        CliError::usage(format!(
            "{issuer} does not offer the device flow; agents can use --client-credentials"
        ))
    })?;
    let mut form = vec![("client_id", client_id), ("scope", scope)];
    if let Some(r) = resource {
        form.push(("resource", r));
    }
    let resp = http
        .post(&endpoint)
        .form(&form)
        .send()
        .await
        .map_err(|e| CliError::unavailable(format!("device authorization failed: {e}")))?;
    if !resp.status().is_success() {
        let body: TokenResponse = resp.json().await.unwrap_or(TokenResponse {
            access_token: None,
            expires_in: None,
            error: Some("device authorization refused".into()),
            error_description: None,
        });
        return finish(issuer, body);
    }
    let auth: DeviceAuth = resp
        .json()
        .await
        .map_err(|e| CliError::unavailable(format!("bad device authorization response: {e}")))?;
    eprintln!(
        "To sign in, open {} and enter the code {}",
        auth.verification_uri_complete
            .as_deref()
            .unwrap_or(&auth.verification_uri),
        auth.user_code
    );
    let deadline = now() + auth.expires_in as i64;
    let mut interval = auth.interval.max(1);
    loop {
        if now() > deadline {
            return Err(CliError::auth(
                "the device code expired before sign-in completed",
            ));
        }
        tokio::time::sleep(Duration::from_secs(interval)).await;
        let resp = http
            .post(&d.token_endpoint)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", auth.device_code.as_str()),
                ("client_id", client_id),
            ])
            .send()
            .await
            .map_err(|e| CliError::unavailable(format!("token request failed: {e}")))?;
        let t: TokenResponse = resp
            .json()
            .await
            .map_err(|e| CliError::unavailable(format!("bad token response: {e}")))?;
        match t.error.as_deref() {
            Some("authorization_pending") => continue,
            Some("slow_down") => interval += 5,
            _ => return finish(issuer, t),
        }
    }
}
