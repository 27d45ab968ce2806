//! Settings every sidecar shares; each sidecar binary flattens these into
//! its own command line (`#[command(flatten)]`), so every flag also has a
//! `WICKET_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Shared sidecar settings.
#[derive(Debug, Clone, Args)]
pub struct SidecarConfig {
    /// Control service URL.
    #[arg(
        long = "control",
        env = "WICKET_CONTROL",
        default_value = "http://127.0.0.1:7470"
    )]
    pub control: String,

    /// CA certificate (PEM) to verify an https:// control service.
    #[arg(long = "control-ca-cert", env = "WICKET_CONTROL_CA_CERT")]
    pub control_ca_cert: Option<PathBuf>,

    /// This sidecar's credential (`wks_…`), issued by an admin. Prefer the file form.
    #[arg(
        long = "sidecar-token",
        env = "WICKET_SIDECAR_TOKEN",
        hide_env_values = true
    )]
    pub sidecar_token: Option<String>,

    /// File holding the sidecar credential (e.g. a mounted Kubernetes Secret).
    #[arg(long = "sidecar-token-file", env = "WICKET_SIDECAR_TOKEN_FILE")]
    pub sidecar_token_file: Option<PathBuf>,

    /// The connection this sidecar gates (a name in the policy).
    #[arg(long = "connection", env = "WICKET_CONNECTION")]
    pub connection: String,

    /// Directory for the cached policy bundle and the audit spool.
    #[arg(
        long = "state-dir",
        env = "WICKET_STATE_DIR",
        default_value = "wicket-state"
    )]
    pub state_dir: PathBuf,

    /// Largest size of the audit spool on disk; when full, new commands are
    /// refused (unless the connection's policy says otherwise).
    #[arg(long = "spool-max-bytes", env = "WICKET_SPOOL_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub spool_max_bytes: u64,

    /// OIDC issuer whose access tokens callers present.
    #[arg(long = "oidc-issuer", env = "WICKET_OIDC_ISSUER")]
    pub oidc_issuer: String,

    /// Accepted `aud`.
    #[arg(
        long = "oidc-audience",
        env = "WICKET_OIDC_AUDIENCE",
        default_value = "wicket"
    )]
    pub oidc_audience: String,

    /// Claim that carries groups.
    #[arg(
        long = "groups-claim",
        env = "WICKET_GROUPS_CLAIM",
        default_value = "groups"
    )]
    pub groups_claim: String,

    /// Rules marking agents (`client-credentials`, `group:NAME`, `claim:NAME=VALUE`).
    #[arg(
        long = "agent-rule",
        env = "WICKET_AGENT_RULES",
        value_delimiter = ',',
        default_value = "client-credentials,claim:wicket_kind=agent"
    )]
    pub agent_rules: Vec<String>,

    /// Seconds a session may outlive its token before it is ended.
    #[arg(
        long = "token-grace-seconds",
        env = "WICKET_TOKEN_GRACE_SECONDS",
        default_value_t = 0
    )]
    pub token_grace_seconds: u64,

    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(
        long = "admin-listen",
        env = "WICKET_ADMIN_LISTEN",
        default_value = "127.0.0.1:9470"
    )]
    pub admin_listen: SocketAddr,

    /// Certificate chain (PEM, leaf first) the sidecar presents to its
    /// clients; with `--tls-key`, turns client TLS on.
    #[arg(long = "tls-cert", env = "WICKET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of `--tls-cert`.
    #[arg(long = "tls-key", env = "WICKET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve TLS with a certificate made at start for these names (comma
    /// separated DNS names or IPs), self-signed and never written to disk:
    /// for trials (the compose quickstart), where clients encrypt without
    /// verifying. Its fingerprint is logged. Use --tls-cert in production.
    #[arg(
        long = "tls-self-signed",
        env = "WICKET_TLS_SELF_SIGNED",
        value_delimiter = ',',
        conflicts_with_all = ["tls_cert", "tls_key"]
    )]
    pub tls_self_signed: Vec<String>,

    /// Seconds to let live sessions finish after SIGTERM.
    #[arg(
        long = "drain-seconds",
        env = "WICKET_DRAIN_SECONDS",
        default_value_t = 30
    )]
    pub drain_seconds: u64,
}

impl SidecarConfig {
    /// The sidecar credential, from the flag/env or the file.
    pub fn token(&self) -> Result<String, String> {
        if let Some(t) = &self.sidecar_token
            && !t.trim().is_empty()
        {
            return Ok(t.trim().to_string());
        }
        match &self.sidecar_token_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("cannot read sidecar token file {}: {e}", p.display())),
            None => Err(
                "no sidecar credential: set WICKET_SIDECAR_TOKEN or WICKET_SIDECAR_TOKEN_FILE"
                    .into(),
            ),
        }
    }

    /// The client-facing TLS settings, if `--tls-cert` and `--tls-key` are set.
    pub fn server_tls(
        &self,
        alpn: &[&[u8]],
    ) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => crate::tls::server_config(c, k, alpn).map(Some),
            (None, None) if !self.tls_self_signed.is_empty() => {
                let (cfg, fingerprint) = crate::tls::self_signed(&self.tls_self_signed, alpn)?;
                tracing::warn!(
                    names = %self.tls_self_signed.join(","),
                    sha256 = %fingerprint,
                    "serving a self-signed certificate made at start (clients cannot verify it; use --tls-cert in production)"
                );
                Ok(Some(cfg))
            }
            (None, None) => Ok(None),
            _ => Err("--tls-cert and --tls-key go together".into()),
        }
    }

    /// Drain timeout.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }
}
