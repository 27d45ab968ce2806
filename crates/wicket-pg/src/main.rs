//! `wicket-pg`: the PostgreSQL gate binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use wicket_pg::upstream::{UpstreamConfig, UpstreamTls};
use wicket_pg::{PgConfig, PgGate};
use wicket_sidecar::{Sidecar, SidecarConfig};

/// Gate in front of one PostgreSQL server: OIDC identity, policy, approvals, audit.
#[derive(Debug, Parser)]
#[command(name = "wicket-pg", version)]
struct Args {
    /// Address clients connect to.
    #[arg(long, env = "WICKET_PG_LISTEN", default_value = "127.0.0.1:6432")]
    listen: SocketAddr,
    /// The PostgreSQL server (`host:port`).
    #[arg(long, env = "WICKET_PG_UPSTREAM", default_value = "127.0.0.1:5432")]
    upstream: String,
    /// Role the gate logs in as upstream.
    #[arg(long, env = "WICKET_PG_UPSTREAM_USER")]
    upstream_user: String,
    /// File holding that role's password (e.g. a mounted Secret).
    #[arg(long, env = "WICKET_PG_UPSTREAM_PASSWORD_FILE")]
    upstream_password_file: Option<PathBuf>,
    /// That role's password (prefer the file).
    #[arg(long, env = "WICKET_PG_UPSTREAM_PASSWORD", hide_env_values = true)]
    upstream_password: Option<String>,
    /// TLS to the server: `disable`, `prefer` (TLS when offered) or
    /// `require`. When TLS is used the server's certificate is verified.
    #[arg(long, env = "WICKET_PG_UPSTREAM_TLS", default_value = "disable", value_parser = ["disable", "prefer", "require"])]
    upstream_tls: String,
    /// CA certificate(s) (PEM) for the server's certificate; the system
    /// trust store when unset.
    #[arg(long, env = "WICKET_PG_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// Name the server's certificate must carry (default: the host of `--upstream`).
    #[arg(long, env = "WICKET_PG_UPSTREAM_SERVER_NAME")]
    upstream_server_name: Option<String>,
    /// Accept tokens as cleartext passwords from loopback clients without TLS.
    #[arg(long, env = "WICKET_PG_ALLOW_CLEARTEXT_LOOPBACK")]
    allow_cleartext_loopback: bool,
    /// Largest client message, in bytes.
    #[arg(long, env = "WICKET_PG_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024 * 1024)]
    max_message_bytes: usize,
    #[command(flatten)]
    process: wicket_sidecar::process::ProcessArgs,
    #[command(flatten)]
    sidecar: SidecarConfig,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let p = args.process.clone();
    wicket_sidecar::process::main("wicket-pg", &p, move || run(args))
}

async fn run(args: Args) -> Result<(), String> {
    let password = match (&args.upstream_password_file, &args.upstream_password) {
        (Some(f), _) => wicket_sidecar::process::read_secret_file(f)?,
        (None, Some(p)) => p.clone(),
        (None, None) => String::new(),
    };
    let upstream_tls = match args.upstream_tls.as_str() {
        "disable" => None,
        mode => {
            let host = match args.upstream.rsplit_once(':') {
                Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
                None => args.upstream.as_str(),
            };
            Some(UpstreamTls {
                config: wicket_sidecar::tls::client_config(args.upstream_ca.as_deref(), &[])?,
                server_name: args
                    .upstream_server_name
                    .clone()
                    .unwrap_or_else(|| host.to_string()),
                required: mode == "require",
            })
        }
    };
    let mask_key = args.process.mask_key()?;
    let client_tls = args.sidecar.server_tls(&[b"postgresql"])?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let sidecar = Sidecar::start(args.sidecar).await?;
    let gate = PgGate::new(
        sidecar.clone(),
        PgConfig {
            upstream: UpstreamConfig {
                addr: args.upstream,
                user: args.upstream_user,
                password,
                tls: upstream_tls,
            },
            tls: client_tls,
            allow_cleartext_loopback: args.allow_cleartext_loopback,
            max_message_bytes: args.max_message_bytes,
            startup_timeout: Duration::from_secs(10),
            mask_key,
        },
    );
    tracing::info!(listen = %args.listen, "wicket-pg serving");
    wicket_pg::serve(gate, listener, wicket_sidecar::process::shutdown_signal()).await;
    tracing::info!("draining");
    sidecar.drain().await;
    Ok(())
}
