//! Command-line and environment configuration of `wicket-control`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// The Wicket control service: policy, audit, approvals and sessions over gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "wicket-control", version)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "WICKET_LISTEN", default_value = "127.0.0.1:7470")]
    pub listen: SocketAddr,

    /// Database URL: `sqlite:PATH` (default, one file, WAL) or `postgres://…` (several replicas).
    #[arg(long, env = "WICKET_DATABASE_URL", default_value = "sqlite:wicket.db")]
    pub database_url: String,

    /// OIDC issuer whose access tokens the admin API accepts.
    #[arg(long, env = "WICKET_OIDC_ISSUER")]
    pub oidc_issuer: String,

    /// Accepted `aud` of access tokens.
    #[arg(long, env = "WICKET_OIDC_AUDIENCE", default_value = "wicket")]
    pub oidc_audience: String,

    /// Claim that carries group membership.
    #[arg(long, env = "WICKET_GROUPS_CLAIM", default_value = "groups")]
    pub groups_claim: String,

    /// Rules that mark a token as an agent's: `client-credentials`, `group:NAME`, `claim:NAME=VALUE`.
    #[arg(
        long = "agent-rule",
        env = "WICKET_AGENT_RULES",
        value_delimiter = ',',
        default_value = "client-credentials,claim:wicket_kind=agent"
    )]
    pub agent_rules: Vec<String>,

    /// Group whose members administer Wicket (everything).
    #[arg(long, env = "WICKET_ADMIN_GROUP", default_value = "wicket-admins")]
    pub admin_group: String,

    /// Group whose members may decide approvals (and read what they need to).
    #[arg(
        long,
        env = "WICKET_APPROVER_GROUP",
        default_value = "wicket-approvers"
    )]
    pub approver_group: String,

    /// Group whose members may read policy, sessions and audit.
    #[arg(long, env = "WICKET_AUDITOR_GROUP", default_value = "wicket-auditors")]
    pub auditor_group: String,

    /// Policy file applied at start when the store holds none (or an older one).
    #[arg(long, env = "WICKET_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,

    /// Sidecar credentials provisioned by a deployment (the Helm chart): a
    /// JSON file `{"sidecars": [{"id", "name", "connections", "secret_sha256"}]}`
    /// holding only the SHA-256 of each secret. Loaded at start: new ids are
    /// created, known ones take the file's name, connections and hash (a
    /// rotation); a revocation made with `wicket sidecars revoke` stays.
    #[arg(long, env = "WICKET_SIDECAR_CREDENTIALS_FILE")]
    pub sidecar_credentials_file: Option<PathBuf>,

    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "WICKET_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Server certificate (PEM) for TLS; both --tls-cert and --tls-key enable TLS.
    #[arg(long, env = "WICKET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Server private key (PEM).
    #[arg(long, env = "WICKET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The SSH user CA's private key (OpenSSH format). Without it the CA key
    /// is created once and kept in the database, shared by the replicas.
    #[arg(long, env = "WICKET_SSH_CA_KEY_FILE")]
    pub ssh_ca_key_file: Option<PathBuf>,

    /// The audit key signing session seals and roots (an OpenSSH Ed25519
    /// private key). Without it the key is created once and kept in the
    /// database, shared by the replicas; `wicket audit key` prints its
    /// public half for auditors to pin.
    #[arg(long, env = "WICKET_AUDIT_KEY_FILE")]
    pub audit_key_file: Option<PathBuf>,

    /// How often to sign an audit root over the sessions recorded since the
    /// last one (`24h`, `1h`, `90s`…), and once at start-up; `0` only on
    /// demand (`wicket audit root`).
    #[arg(long, env = "WICKET_AUDIT_ROOT_INTERVAL", default_value = "24h", value_parser = wicket_core::parse_seconds)]
    pub audit_root_interval: u32,

    /// How often to delete the sessions whose connection's retention
    /// (`recording.retention_days` in the policy) has run out, starting at
    /// start-up; `0` only on demand (`wicket audit retention`).
    #[arg(long, env = "WICKET_RETENTION_INTERVAL", default_value = "1h", value_parser = wicket_core::parse_seconds)]
    pub retention_interval: u32,

    /// Longest lifetime of an SSH user certificate, in seconds (it never
    /// outlives the token it was issued for).
    #[arg(long, env = "WICKET_SSH_CERT_MAX_SECONDS", default_value_t = 8 * 3600)]
    pub ssh_cert_max_seconds: u64,

    /// Generic approval webhook: JSON POSTed on each approval request,
    /// decision and expiry, signed with HMAC-SHA256 (`Wicket-Signature`).
    #[arg(long, env = "WICKET_WEBHOOK_URL", requires = "webhook_secret_file")]
    pub webhook_url: Option<String>,

    /// File holding the generic webhook's HMAC key (surrounding whitespace
    /// is trimmed).
    #[arg(long, env = "WICKET_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// Slack-compatible incoming-webhook URL for approval messages. The URL
    /// is a secret: prefer the environment variable to the flag.
    #[arg(long, env = "WICKET_SLACK_WEBHOOK_URL", hide_env_values = true)]
    pub slack_webhook_url: Option<String>,

    /// Directory for terminal recordings (zstd-compressed chunks). Default:
    /// `recordings/` beside a SQLite database file; on PostgreSQL (or an
    /// in-memory database) recordings stay in the audit events unless this
    /// is given: several replicas need it to be shared storage.
    #[arg(long, env = "WICKET_RECORDINGS_DIR", conflicts_with = "recordings_url")]
    pub recordings_dir: Option<PathBuf>,

    /// Keep terminal recordings in an S3-compatible bucket instead
    /// (`s3://bucket/prefix`), shared by the replicas. Credentials, region
    /// and endpoint come from the `AWS_*` environment (`AWS_ENDPOINT` and
    /// `AWS_ALLOW_HTTP=true` for a local server) or `--recordings-option`.
    #[arg(long, env = "WICKET_RECORDINGS_URL")]
    pub recordings_url: Option<String>,

    /// An object-store setting for `--recordings-url`, `KEY=VALUE`
    /// (`aws_endpoint=http://minio:9000`, `aws_region=eu-west-1`, …);
    /// repeatable. Prefer the environment for credentials.
    #[arg(long = "recordings-option", env = "WICKET_RECORDINGS_OPTIONS", hide_env_values = true, value_delimiter = ',', value_parser = key_value)]
    pub recordings_options: Vec<(String, String)>,

    /// Stream every audit event, in the order stored, as JSON Lines to this
    /// URL (`POST`, `application/x-ndjson`, batches; at least once: the
    /// receiver dedupes by event id).
    #[arg(long, env = "WICKET_EXPORT_JSONL_URL")]
    pub export_jsonl_url: Option<String>,

    /// File holding a bearer token for the JSON Lines endpoint.
    #[arg(
        long,
        env = "WICKET_EXPORT_JSONL_TOKEN_FILE",
        requires = "export_jsonl_url"
    )]
    pub export_jsonl_token_file: Option<PathBuf>,

    /// Send every audit event as an OpenTelemetry log record over OTLP/gRPC
    /// to this collector (`http://collector:4317`; `https://` verifies with
    /// the system's roots), at least once.
    #[arg(long, env = "WICKET_EXPORT_OTLP_ENDPOINT")]
    pub export_otlp_endpoint: Option<String>,

    /// Events per export batch.
    #[arg(long, env = "WICKET_EXPORT_BATCH", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub export_batch: u32,

    /// Serve the web console for approvers and auditors on this address.
    #[arg(long, env = "WICKET_CONSOLE_LISTEN")]
    pub console_listen: Option<SocketAddr>,

    /// The console's external base URL (its sign-in callback is
    /// `URL/.wicket/callback`, and notifications link to it); default
    /// `http://` and the console's listen address.
    #[arg(long, env = "WICKET_CONSOLE_URL")]
    pub console_url: Option<String>,

    /// The console's OAuth client id at the identity provider.
    #[arg(
        long,
        env = "WICKET_CONSOLE_CLIENT_ID",
        default_value = "wicket-console"
    )]
    pub console_client_id: String,

    /// File holding the console's client secret (a confidential client;
    /// PKCE is used either way).
    #[arg(long, env = "WICKET_CONSOLE_CLIENT_SECRET_FILE")]
    pub console_client_secret_file: Option<PathBuf>,

    /// Log format: `text` or `json`.
    #[arg(long, env = "WICKET_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// `KEY=VALUE`.
fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got `{s}`"))
}

/// One entry of `--sidecar-credentials-file`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionedSidecar {
    id: String,
    name: String,
    connections: Vec<String>,
    secret_sha256: String,
}

/// The whole `--sidecar-credentials-file`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionedSidecars {
    sidecars: Vec<ProvisionedSidecar>,
}

/// Parses and checks a sidecar credentials file (see
/// [`Config::sidecar_credentials_file`]); `name` is for messages.
pub fn provisioned_sidecars(
    text: &str,
    name: &str,
) -> Result<Vec<wicket_store::SidecarRecord>, String> {
    let doc: ProvisionedSidecars = serde_json::from_str(text)
        .map_err(|e| format!("{name} is not a sidecar credentials file: {e}"))?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(doc.sidecars.len());
    for (i, s) in doc.sidecars.into_iter().enumerate() {
        let at = format!("{name}: sidecars[{i}]");
        // Tokens are `wks_<id>_<secret>`: the id ends at the first `_`.
        if s.id.is_empty()
            || s.id.len() > 64
            || !s.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "{at}: id must be 1-64 letters, digits or dashes, got `{}`",
                s.id
            ));
        }
        if !seen.insert(s.id.clone()) {
            return Err(format!("{at}: id `{}` appears twice", s.id));
        }
        if s.name.trim().is_empty() || s.name.len() > 256 {
            return Err(format!("{at}: name must be 1-256 characters"));
        }
        if s.connections.is_empty() || s.connections.iter().any(|c| c.trim().is_empty()) {
            return Err(format!("{at}: at least one connection is required"));
        }
        if s.secret_sha256.len() != 64
            || !s
                .secret_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "{at}: secret_sha256 must be 64 lowercase hex digits"
            ));
        }
        out.push(wicket_store::SidecarRecord {
            id: s.id,
            name: s.name,
            connections: s.connections,
            secret_hash: s.secret_sha256,
            created_at: chrono::Utc::now(),
            revoked: false,
        });
    }
    Ok(out)
}

impl Config {
    /// Where approval notifications go, with the webhook secret read.
    pub fn notifications(&self) -> Result<crate::notify::NotifyConfig, String> {
        let webhook_secret = match &self.webhook_secret_file {
            Some(path) => {
                let s = std::fs::read(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                Some(s.trim_ascii().to_vec())
            }
            None => None,
        };
        Ok(crate::notify::NotifyConfig {
            webhook_url: self.webhook_url.clone(),
            webhook_secret,
            slack_url: self.slack_webhook_url.clone(),
            console_url: self.console_base(),
        })
    }

    /// Where terminal recordings go.
    pub fn recordings(&self) -> Result<crate::recordings::Recordings, String> {
        use crate::recordings::Recordings;
        if let Some(url) = &self.recordings_url {
            return Recordings::object(url, &self.recordings_options);
        }
        if let Some(dir) = &self.recordings_dir {
            return Recordings::dir(dir);
        }
        match self.database_url.strip_prefix("sqlite:") {
            Some(path) if !path.contains(":memory:") => {
                let path = path
                    .split('?')
                    .next()
                    .unwrap_or(path)
                    .trim_start_matches("//");
                let parent = std::path::Path::new(path)
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                Recordings::dir(&parent.join("recordings"))
            }
            _ => Ok(Recordings::Inline),
        }
    }

    /// The audit export destinations configured, checked.
    pub fn exporters(&self) -> Result<Vec<crate::export::Exporter>, String> {
        let mut out = Vec::new();
        if let Some(url) = &self.export_jsonl_url {
            let token = match &self.export_jsonl_token_file {
                Some(path) => Some(
                    String::from_utf8(
                        std::fs::read(path)
                            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                            .trim_ascii()
                            .to_vec(),
                    )
                    .map_err(|_| format!("{} does not hold a text token", path.display()))?,
                ),
                None => None,
            };
            out.push(crate::export::Exporter {
                name: "jsonl",
                sink: crate::export::Sink::jsonl(url, token)?,
                batch: self.export_batch,
            });
        }
        if let Some(endpoint) = &self.export_otlp_endpoint {
            out.push(crate::export::Exporter {
                name: "otlp",
                sink: crate::export::Sink::otlp(endpoint)?,
                batch: self.export_batch,
            });
        }
        Ok(out)
    }

    /// The console's base URL, when there is a console to link to.
    pub fn console_base(&self) -> Option<String> {
        self.console_url
            .clone()
            .or_else(|| self.console_listen.map(|a| format!("http://{a}")))
    }

    /// The console's settings, when it is on.
    pub fn console(&self) -> Result<Option<crate::console::ConsoleConfig>, String> {
        let Some(base) = self.console_listen.and(self.console_base()) else {
            return Ok(None);
        };
        let public_url = url::Url::parse(&base)
            .map_err(|e| format!("--console-url `{base}` is not a URL: {e}"))?;
        Ok(Some(crate::console::ConsoleConfig {
            issuer: self.oidc_issuer.clone(),
            client_id: self.console_client_id.clone(),
            client_secret: self
                .console_client_secret_file
                .clone()
                .map(wicket_sidecar::secret::Secret::File),
            public_url,
        }))
    }

    /// The defaults every flag has, with the given issuer, database and
    /// listen address (for embedding the service, e.g. in tests).
    pub fn defaults(oidc_issuer: &str, database_url: &str, listen: SocketAddr) -> Config {
        let mut cfg = Config::parse_from(["wicket-control", "--oidc-issuer", oidc_issuer]);
        cfg.database_url = database_url.to_string();
        cfg.listen = listen;
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::Config;
    use crate::recordings::Recordings;

    #[test]
    fn recordings_live_beside_a_sqlite_file_unless_told() {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite:{}?mode=rwc", dir.path().join("w.db").display());
        let addr = "127.0.0.1:0".parse().unwrap();
        let mut cfg = Config::defaults("https://idp", &db, addr);
        match cfg.recordings().unwrap() {
            Recordings::Dir(d) => assert_eq!(d, dir.path().join("recordings")),
            other => panic!("{other:?}"),
        }
        assert!(dir.path().join("recordings").is_dir());
        cfg.database_url = "postgres://u@h/db".into();
        assert!(matches!(cfg.recordings().unwrap(), Recordings::Inline));
        cfg.database_url = "sqlite::memory:".into();
        assert!(matches!(cfg.recordings().unwrap(), Recordings::Inline));
        cfg.recordings_dir = Some(dir.path().join("elsewhere"));
        assert!(
            matches!(cfg.recordings().unwrap(), Recordings::Dir(d) if d.ends_with("elsewhere"))
        );
    }
}
