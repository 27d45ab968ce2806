//! `wicket-k8s`: the Kubernetes API gate binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use wicket_k8s::{K8sConfig, KubeGate, TokenSource, Upstream};
use wicket_sidecar::{Sidecar, SidecarConfig};

/// The in-cluster service-account directory.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Gate in front of one kube-apiserver: OIDC identity, impersonation, policy,
/// approvals, recording, secret redaction, audit.
#[derive(Debug, Parser)]
#[command(name = "wicket-k8s", version)]
struct Args {
    /// Address clients (kubectl) connect to. TLS only: give --tls-cert and --tls-key.
    #[arg(long, env = "WICKET_K8S_LISTEN", default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// The API server's URL. Default: the in-cluster address
    /// (`KUBERNETES_SERVICE_HOST` / `KUBERNETES_SERVICE_PORT`).
    #[arg(long, env = "WICKET_K8S_UPSTREAM")]
    upstream: Option<String>,
    /// CA bundle that signed the API server's certificate (default: the
    /// in-cluster service-account CA, else the system's trust store).
    #[arg(long, env = "WICKET_K8S_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// File holding the gate's bearer token (default: the in-cluster
    /// service-account token). Re-read every minute.
    #[arg(long, env = "WICKET_K8S_UPSTREAM_TOKEN_FILE")]
    upstream_token_file: Option<PathBuf>,
    /// Client certificate (PEM) for the API server, instead of a token.
    #[arg(
        long,
        env = "WICKET_K8S_UPSTREAM_CLIENT_CERT",
        requires = "upstream_client_key"
    )]
    upstream_client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(
        long,
        env = "WICKET_K8S_UPSTREAM_CLIENT_KEY",
        requires = "upstream_client_cert"
    )]
    upstream_client_key: Option<PathBuf>,
    /// Prefix of the impersonated user name (e.g. `oidc:`).
    #[arg(long, env = "WICKET_K8S_USERNAME_PREFIX", default_value = "")]
    username_prefix: String,
    /// Prefix of impersonated group names.
    #[arg(long, env = "WICKET_K8S_GROUP_PREFIX", default_value = "")]
    group_prefix: String,
    /// Largest request body forwarded, in bytes.
    #[arg(long, env = "WICKET_K8S_MAX_REQUEST_BYTES", default_value_t = 3 * 1024 * 1024)]
    max_request_bytes: usize,
    /// Minutes a session may sit idle before it ends.
    #[arg(long, env = "WICKET_K8S_IDLE_MINUTES", default_value_t = 15)]
    idle_minutes: u64,
    #[command(flatten)]
    process: wicket_sidecar::process::ProcessArgs,
    #[command(flatten)]
    sidecar: SidecarConfig,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let p = args.process.clone();
    wicket_sidecar::process::main("wicket-k8s", &p, move || run(args))
}

/// The API server's address, from the flag or the in-cluster environment.
fn upstream_url(args: &Args) -> Result<url::Url, String> {
    let raw = match &args.upstream {
        Some(u) => u.clone(),
        None => match (
            std::env::var("KUBERNETES_SERVICE_HOST"),
            std::env::var("KUBERNETES_SERVICE_PORT"),
        ) {
            (Ok(h), Ok(p)) if h.contains(':') => format!("https://[{h}]:{p}"),
            (Ok(h), Ok(p)) => format!("https://{h}:{p}"),
            _ => return Err("give --upstream https://HOST:PORT (not running in a cluster)".into()),
        },
    };
    let url = url::Url::parse(&raw).map_err(|e| format!("bad --upstream {raw}: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!("--upstream must be https:// (got {raw})"));
    }
    Ok(url)
}

async fn run(args: Args) -> Result<(), String> {
    let url = upstream_url(&args)?;
    let host = url
        .host_str()
        .ok_or("--upstream has no host")?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let sa = PathBuf::from(SA_DIR);
    let ca = args
        .upstream_ca
        .clone()
        .or_else(|| Some(sa.join("ca.crt")).filter(|p| p.exists()));
    let identity = args
        .upstream_client_cert
        .as_deref()
        .zip(args.upstream_client_key.as_deref());
    let tls =
        wicket_sidecar::tls::client_config_with_identity(ca.as_deref(), identity, &[b"http/1.1"])?;
    let token = match (&args.upstream_token_file, identity) {
        (Some(f), _) => TokenSource::File(f.clone()),
        (None, Some(_)) => TokenSource::None,
        (None, None) if sa.join("token").exists() => TokenSource::File(sa.join("token")),
        (None, None) => {
            return Err("give the gate a credential for the API server: --upstream-token-file or --upstream-client-cert/--upstream-client-key".into());
        }
    };
    if let TokenSource::File(f) = &token {
        wicket_sidecar::process::read_secret_file(f)?;
    }
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("bad upstream host {host}: {e}"))?;
    let upstream = Upstream {
        addr: if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        },
        server_name,
        authority: url.authority().to_string(),
        tls,
        token,
    };
    let server_tls = args
        .sidecar
        .server_tls(&[b"http/1.1"])?
        .ok_or("wicket-k8s serves TLS only (kubectl sends no token over http): give --tls-cert and --tls-key")?;
    let mut cfg = K8sConfig::new(upstream, server_tls);
    cfg.mask_key = args.process.mask_key()?;
    cfg.username_prefix = args.username_prefix.clone();
    cfg.group_prefix = args.group_prefix.clone();
    cfg.max_request_bytes = args.max_request_bytes.max(1024);
    cfg.idle_session = Duration::from_secs(args.idle_minutes.max(1) * 60);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let sidecar = Sidecar::start(args.sidecar).await?;
    let gate = KubeGate::new(sidecar.clone(), cfg);
    tracing::info!(listen = %args.listen, upstream = %url, "wicket-k8s serving");
    wicket_k8s::serve(gate, listener, wicket_sidecar::process::shutdown_signal()).await;
    tracing::info!("draining");
    sidecar.drain().await;
    Ok(())
}
