//! `wicket-ssh`: the SSH gate binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use russh::keys::{PrivateKey, PublicKey};
use wicket_sidecar::{Sidecar, SidecarConfig};
use wicket_ssh::{SshConfig, SshGate, UpstreamAuth, UpstreamConfig};

/// Gate in front of one SSH server: OIDC identity, policy, approvals, recording, audit.
#[derive(Debug, Parser)]
#[command(name = "wicket-ssh", version)]
struct Args {
    /// Address clients connect to.
    #[arg(long, env = "WICKET_SSH_LISTEN", default_value = "127.0.0.1:2222")]
    listen: SocketAddr,
    /// The SSH server (`host:port`).
    #[arg(long, env = "WICKET_SSH_UPSTREAM", default_value = "127.0.0.1:22")]
    upstream: String,
    /// Account the gate logs in as on the host.
    #[arg(long, env = "WICKET_SSH_UPSTREAM_USER")]
    upstream_user: String,
    /// The gate's private key for the host (OpenSSH format; e.g. a mounted Secret).
    #[arg(long, env = "WICKET_SSH_UPSTREAM_KEY_FILE")]
    upstream_key_file: Option<PathBuf>,
    /// File holding the account's password, when no key is used.
    #[arg(long, env = "WICKET_SSH_UPSTREAM_PASSWORD_FILE")]
    upstream_password_file: Option<PathBuf>,
    /// known_hosts file pinning the host's key (`[host]:port` for ports
    /// other than 22). Required: a host whose key is not pinned is refused.
    #[arg(long, env = "WICKET_SSH_KNOWN_HOSTS")]
    known_hosts: PathBuf,
    /// The gate's own host key (OpenSSH format). Created (Ed25519) when the
    /// file does not exist; default `<state-dir>/ssh_host_ed25519_key`.
    #[arg(long, env = "WICKET_SSH_HOST_KEY")]
    host_key: Option<PathBuf>,
    /// File of CA public keys (one per line, OpenSSH format) whose user
    /// certificates are accepted (`wicket ssh login`).
    #[arg(long, env = "WICKET_SSH_USER_CA")]
    user_ca: Option<PathBuf>,
    /// Seconds a client has to authenticate.
    #[arg(long, env = "WICKET_SSH_LOGIN_GRACE_SECONDS", default_value_t = 30)]
    login_grace_seconds: u64,
    /// Channels one connection may hold open.
    #[arg(long, env = "WICKET_SSH_MAX_CHANNELS", default_value_t = 32)]
    max_channels: usize,
    /// Connections that may be authenticating at once (more are dropped).
    #[arg(long, env = "WICKET_SSH_MAX_STARTUPS", default_value_t = 64)]
    max_startups: usize,
    #[command(flatten)]
    process: wicket_sidecar::process::ProcessArgs,
    #[command(flatten)]
    sidecar: SidecarConfig,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let p = args.process.clone();
    wicket_sidecar::process::main("wicket-ssh", &p, move || run(args))
}

/// Loads the host key, creating it (mode 0600) when missing.
fn host_key(path: &Path) -> Result<PrivateKey, String> {
    if path.exists() {
        return russh::keys::load_secret_key(path, None)
            .map_err(|e| format!("cannot load the host key {}: {e}", path.display()));
    }
    let key = PrivateKey::random(
        &mut russh::keys::key::safe_rng(),
        russh::keys::Algorithm::Ed25519,
    )
    .map_err(|e| format!("cannot create a host key: {e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    key.write_openssh_file(path, russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| format!("cannot write the host key {}: {e}", path.display()))?;
    // Clients pin this key: one that does not outlive the gate's state
    // (a pod's emptyDir) changes with every new pod, and they refuse it.
    tracing::warn!(path = %path.display(), "created a new host key; clients that pinned an earlier one will refuse it. Keep the key across restarts: give --host-key a persistent file (in Kubernetes, a Secret named by wicket.dev/host-key-secret)");
    Ok(key)
}

/// CA keys, one OpenSSH public key per line (blank lines and `#` comments skipped).
fn user_cas(path: &Path) -> Result<Vec<PublicKey>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            PublicKey::from_openssh(l).map_err(|e| format!("bad CA key in {}: {e}", path.display()))
        })
        .collect()
}

async fn run(args: Args) -> Result<(), String> {
    let auth = match (&args.upstream_key_file, &args.upstream_password_file) {
        (Some(k), _) => UpstreamAuth::Key(Arc::new(
            russh::keys::load_secret_key(k, None)
                .map_err(|e| format!("cannot load the upstream key {}: {e}", k.display()))?,
        )),
        (None, Some(p)) => UpstreamAuth::Password(wicket_sidecar::process::read_secret_file(p)?),
        (None, None) => {
            return Err(
                "give the gate a credential for the host: --upstream-key-file or --upstream-password-file"
                    .into(),
            );
        }
    };
    if !args.known_hosts.exists() {
        return Err(format!(
            "the known_hosts file {} does not exist; pin the host's key there (ssh-keyscan -p PORT HOST)",
            args.known_hosts.display()
        ));
    }
    let key_path = args
        .host_key
        .clone()
        .unwrap_or_else(|| args.sidecar.state_dir.join("ssh_host_ed25519_key"));
    let mut cfg = SshConfig::new(
        UpstreamConfig {
            addr: args.upstream.clone(),
            user: args.upstream_user.clone(),
            auth,
            known_hosts: args.known_hosts.clone(),
        },
        vec![host_key(&key_path)?],
    );
    if let Some(f) = &args.user_ca {
        cfg.user_cas = user_cas(f)?;
    }
    cfg.mask_key = args.process.mask_key()?;
    cfg.login_grace = Duration::from_secs(args.login_grace_seconds.max(1));
    cfg.max_channels = args.max_channels.max(1);
    cfg.max_startups = args.max_startups.max(1);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let sidecar = Sidecar::start(args.sidecar).await?;
    let gate = SshGate::new(sidecar.clone(), cfg);
    tracing::info!(listen = %args.listen, upstream = %args.upstream, "wicket-ssh serving");
    wicket_ssh::serve(gate, listener, wicket_sidecar::process::shutdown_signal()).await;
    tracing::info!("draining");
    sidecar.drain().await;
    Ok(())
}
