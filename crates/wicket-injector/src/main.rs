//! `wicket-injector`: the sidecar injection webhook binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wicket_injector::server;
use wicket_injector::settings::Settings;

/// Mutating admission webhook: adds a Wicket gate to pods annotated
/// `wicket.dev/inject: pg|ssh|k8s|http`.
#[derive(Debug, Parser)]
#[command(name = "wicket-injector", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
    /// `text` or `json` logs.
    #[arg(long, env = "WICKET_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks a deployment: the webhook answers over TLS and the control
    /// service reports SERVING (the Helm chart's `helm test`).
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// HTTPS listen address.
    #[arg(long, env = "WICKET_INJECTOR_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// The injector configuration (JSON; the chart's ConfigMap).
    #[arg(long, env = "WICKET_INJECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Serving certificate chain (PEM). Re-read when it changes.
    #[arg(long, env = "WICKET_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "WICKET_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The cluster's Kubernetes version (`v1.30.2`); decides native
    /// sidecars when the configuration says `auto`.
    #[arg(long, env = "WICKET_KUBERNETES_VERSION")]
    kubernetes_version: Option<String>,
    /// Seconds between looks at the certificate files.
    #[arg(long, env = "WICKET_TLS_RELOAD_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    tls_reload_seconds: u64,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The webhook's health URL (`https://wicket-injector.NS.svc/healthz`).
    #[arg(long)]
    injector: Option<String>,
    /// CA (PEM) that signed the webhook's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The control service's gRPC URL.
    #[arg(long)]
    control: Option<String>,
    /// CA (PEM) that signed the control service's certificate (https://).
    #[arg(long)]
    control_ca: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let process = wicket_sidecar::process::ProcessArgs {
        worker_threads: 2,
        log_format: args.log_format.clone(),
        mask_key_file: None,
    };
    wicket_sidecar::process::main("wicket-injector", &process, move || async move {
        match args.command {
            Some(Command::Check(c)) => check(c).await,
            None => serve(args.serve).await,
        }
    })
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let config = args
        .config
        .ok_or("give --config FILE (the injector configuration)")?;
    let text = std::fs::read_to_string(&config)
        .map_err(|e| format!("cannot read {}: {e}", config.display()))?;
    let mut settings = Settings::from_json(&text, &config.display().to_string())?;
    if args.kubernetes_version.is_some() {
        settings.kubernetes_version = args.kubernetes_version;
    }
    let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) else {
        return Err(
            "the API server calls webhooks over HTTPS: give --tls-cert and --tls-key".into(),
        );
    };
    let resolver = server::ReloadingCert::new(&cert, &key)?;
    tokio::spawn(
        resolver
            .clone()
            .watch(Duration::from_secs(args.tls_reload_seconds)),
    );
    let tls = server::tls_config(resolver)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(
        listen = %args.listen,
        native_sidecars = settings.native(),
        kubernetes = settings.kubernetes_version.as_deref().unwrap_or("unknown"),
        resources = settings.resources.len(),
        "wicket-injector serving"
    );
    server::serve(
        listener,
        tls,
        Arc::new(settings),
        wicket_sidecar::process::shutdown_signal(),
    )
    .await;
    tracing::info!("wicket-injector stopped");
    Ok(())
}

async fn check(args: CheckArgs) -> Result<(), String> {
    if args.injector.is_none() && args.control.is_none() {
        return Err("give --injector URL and/or --control URL".into());
    }
    if let Some(url) = &args.injector {
        let status = https_get(url, args.ca.as_deref()).await?;
        if status != 200 {
            return Err(format!("{url} answered {status}"));
        }
        println!("injector: {url} answered 200");
    }
    if let Some(url) = &args.control {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| format!("bad --control {url}: {e}"))?
            .connect_timeout(Duration::from_secs(10));
        if url.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &args.control_ca {
                let pem =
                    std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("TLS to {url}: {e}"))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot reach the control service at {url}: {e}"))?;
        let reply = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| format!("the control service's health check failed: {}", e.message()))?
            .into_inner();
        if reply.status != tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            return Err(format!(
                "the control service reports status {}",
                reply.status
            ));
        }
        println!("control: {url} is serving");
    }
    Ok(())
}

async fn https_get(url: &str, ca: Option<&std::path::Path>) -> Result<u16, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url}: the webhook serves https:// only"));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("{url} has no host"))?
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tls = wicket_sidecar::tls::client_config(ca, &[b"http/1.1"])?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| format!("{url}: connect timed out"))?
    .map_err(|e| format!("{url}: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("bad host {host}: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{url}: TLS failed: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(uri.path())
        .header("host", host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(resp.status().as_u16())
}
