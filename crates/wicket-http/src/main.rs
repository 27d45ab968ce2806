//! `wicket-http`: the HTTP gate binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use wicket_http::{Credential, HttpConfig, HttpGate, Secret, Upstream, UpstreamSpec};
use wicket_sidecar::{Sidecar, SidecarConfig};

/// Gate in front of one HTTP service: OIDC identity, policy per request,
/// approvals, response masking, injected upstream credentials, audit.
#[derive(Debug, Parser)]
#[command(name = "wicket-http", version)]
struct Args {
    /// Address clients connect to (TLS when --tls-cert and --tls-key are given).
    #[arg(long, env = "WICKET_HTTP_LISTEN", default_value = "127.0.0.1:8480")]
    listen: SocketAddr,
    /// The upstream service's base URL (`http://…` or `https://…`, with an
    /// optional path prefix).
    #[arg(long, env = "WICKET_HTTP_UPSTREAM")]
    upstream: String,
    /// CA bundle for an https upstream (default: the system's trust store).
    #[arg(long, env = "WICKET_HTTP_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// Client certificate (PEM) the gate shows an https upstream.
    #[arg(
        long,
        env = "WICKET_HTTP_UPSTREAM_CLIENT_CERT",
        requires = "upstream_client_key"
    )]
    upstream_client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(
        long,
        env = "WICKET_HTTP_UPSTREAM_CLIENT_KEY",
        requires = "upstream_client_cert"
    )]
    upstream_client_key: Option<PathBuf>,
    /// Speak HTTP/2 to a cleartext upstream (prior knowledge). An https
    /// upstream gets HTTP/2 whenever it offers it by ALPN.
    #[arg(long, env = "WICKET_HTTP_UPSTREAM_H2C")]
    upstream_h2c: bool,
    /// File holding a bearer token sent upstream as `Authorization: Bearer`.
    #[arg(long, env = "WICKET_HTTP_UPSTREAM_BEARER_FILE", group = "cred")]
    upstream_bearer_file: Option<PathBuf>,
    /// File holding `user:password` sent upstream as `Authorization: Basic`.
    #[arg(long, env = "WICKET_HTTP_UPSTREAM_BASIC_FILE", group = "cred")]
    upstream_basic_file: Option<PathBuf>,
    /// Header carrying an API key upstream (with --upstream-header-file).
    #[arg(
        long,
        env = "WICKET_HTTP_UPSTREAM_HEADER",
        requires = "upstream_header_file",
        group = "cred"
    )]
    upstream_header: Option<String>,
    /// File holding that header's value.
    #[arg(
        long,
        env = "WICKET_HTTP_UPSTREAM_HEADER_FILE",
        requires = "upstream_header"
    )]
    upstream_header_file: Option<PathBuf>,
    /// Largest request body relayed, in bytes (a route's `max_body_bytes` overrides).
    #[arg(long, env = "WICKET_HTTP_MAX_REQUEST_BYTES", default_value_t = 2 << 30)]
    max_request_bytes: u64,
    /// Largest JSON request body read for the body fields policy selects.
    #[arg(long, env = "WICKET_HTTP_MAX_INSPECT_BYTES", default_value_t = 1 << 20)]
    max_inspect_bytes: usize,
    /// Largest JSON response parsed whole for field masking.
    #[arg(long, env = "WICKET_HTTP_MAX_MASK_BYTES", default_value_t = 32 << 20)]
    max_mask_bytes: usize,
    /// Bytes of each request and response body kept, masked, in the audit (0: none).
    #[arg(long, env = "WICKET_HTTP_CAPTURE_BYTES", default_value_t = 0)]
    capture_bytes: usize,
    /// Minutes a session may sit idle before it ends.
    #[arg(long, env = "WICKET_HTTP_IDLE_MINUTES", default_value_t = 15)]
    idle_minutes: u64,
    /// Seconds a request body may stall before it is cut.
    #[arg(long, env = "WICKET_HTTP_BODY_IDLE_SECONDS", default_value_t = 60)]
    body_idle_seconds: u64,
    /// Seconds a client may take to send a request's headers.
    #[arg(long, env = "WICKET_HTTP_HEADER_TIMEOUT_SECONDS", default_value_t = 30)]
    header_timeout_seconds: u64,
    /// Seconds the upstream may take to start answering.
    #[arg(
        long,
        env = "WICKET_HTTP_UPSTREAM_TIMEOUT_SECONDS",
        default_value_t = 300
    )]
    upstream_timeout_seconds: u64,
    /// Idle upstream connections kept for reuse.
    #[arg(long, env = "WICKET_HTTP_POOL_IDLE", default_value_t = 64)]
    pool_idle: usize,
    /// Browser login: the gate's OAuth client id at the identity provider
    /// (with --public-url). Browsers without a token are sent to log in.
    #[arg(long, env = "WICKET_HTTP_LOGIN_CLIENT_ID", requires = "public_url")]
    login_client_id: Option<String>,
    /// File holding that client's secret (a confidential client; PKCE is used either way).
    #[arg(long, env = "WICKET_HTTP_LOGIN_CLIENT_SECRET_FILE")]
    login_client_secret_file: Option<PathBuf>,
    /// File holding a secret (at least 32 characters) that every replica
    /// of this gate shares: browser logins and sessions are then sealed
    /// into the browser's cookies, so that any replica serves them.
    /// Without it they live in this process (one replica, or sticky
    /// sessions). Sign-out then clears the browser's cookies only.
    #[arg(long, env = "WICKET_HTTP_LOGIN_SESSION_KEY_FILE")]
    login_session_key_file: Option<PathBuf>,
    /// Scopes the browser login asks for.
    #[arg(long, env = "WICKET_HTTP_LOGIN_SCOPES", default_value = "openid")]
    login_scopes: String,
    /// The gate's external base URL (`https://billing.example.com`); the
    /// login callback is PUBLIC_URL/.wicket/callback.
    #[arg(long, env = "WICKET_HTTP_PUBLIC_URL")]
    public_url: Option<String>,
    #[command(flatten)]
    process: wicket_sidecar::process::ProcessArgs,
    #[command(flatten)]
    sidecar: SidecarConfig,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let p = args.process.clone();
    wicket_sidecar::process::main("wicket-http", &p, move || run(args))
}

fn credential(args: &Args) -> Result<Credential, String> {
    let check =
        |p: &PathBuf| wicket_sidecar::process::read_secret_file(p).map(|_| Secret::File(p.clone()));
    Ok(if let Some(p) = &args.upstream_bearer_file {
        Credential::Bearer(check(p)?)
    } else if let Some(p) = &args.upstream_basic_file {
        Credential::Basic(check(p)?)
    } else if let (Some(name), Some(p)) = (&args.upstream_header, &args.upstream_header_file) {
        let name = hyper::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("--upstream-header `{name}` is not a header name"))?;
        Credential::Header(name, check(p)?)
    } else {
        Credential::None
    })
}

async fn run(args: Args) -> Result<(), String> {
    let url = url::Url::parse(&args.upstream)
        .map_err(|e| format!("bad --upstream {}: {e}", args.upstream))?;
    let tls = if url.scheme() == "https" {
        let identity = args
            .upstream_client_cert
            .as_deref()
            .zip(args.upstream_client_key.as_deref());
        Some(wicket_sidecar::tls::client_config_with_identity(
            args.upstream_ca.as_deref(),
            identity,
            &[b"h2", b"http/1.1"],
        )?)
    } else {
        None
    };
    let upstream = Upstream::new(UpstreamSpec {
        url: url.clone(),
        tls,
        h2c: args.upstream_h2c,
        pool_idle: args.pool_idle,
    })?;
    let mut cfg = HttpConfig::new();
    cfg.tls = args.sidecar.server_tls(&[b"h2", b"http/1.1"])?;
    cfg.credential = credential(&args)?;
    cfg.mask_key = args.process.mask_key()?;
    cfg.max_request_bytes = args.max_request_bytes;
    cfg.max_inspect_bytes = args.max_inspect_bytes.max(1024);
    cfg.max_mask_bytes = args.max_mask_bytes.max(64 * 1024);
    cfg.capture_bytes = args.capture_bytes;
    cfg.idle_session = Duration::from_secs(args.idle_minutes.max(1) * 60);
    cfg.body_idle = Duration::from_secs(args.body_idle_seconds.max(1));
    cfg.header_timeout = Duration::from_secs(args.header_timeout_seconds.max(1));
    cfg.upstream_timeout = Duration::from_secs(args.upstream_timeout_seconds.max(1));
    if let Some(client_id) = &args.login_client_id {
        let public = args.public_url.as_deref().unwrap_or_default();
        let public_url =
            url::Url::parse(public).map_err(|e| format!("bad --public-url {public}: {e}"))?;
        let client_secret = args
            .login_client_secret_file
            .as_ref()
            .map(|p| wicket_sidecar::process::read_secret_file(p).map(|_| Secret::File(p.clone())))
            .transpose()?;
        cfg.login = Some(wicket_http::LoginConfig {
            issuer: args.sidecar.oidc_issuer.clone(),
            client_id: client_id.clone(),
            client_secret,
            public_url,
            scopes: args.login_scopes.clone(),
            session_key: args
                .login_session_key_file
                .as_ref()
                .map(|p| Secret::File(p.clone())),
        });
    }
    if cfg.tls.is_none() && !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "serving cleartext HTTP on a non-loopback address: bearer tokens cross the network in the clear; give --tls-cert and --tls-key");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let sidecar = Sidecar::start(args.sidecar).await?;
    let gate = HttpGate::new(sidecar.clone(), upstream, cfg)?;
    tracing::info!(listen = %args.listen, upstream = %url, "wicket-http serving");
    wicket_http::serve(gate, listener, wicket_sidecar::process::shutdown_signal()).await;
    tracing::info!("draining");
    sidecar.drain().await;
    Ok(())
}
