//! `wicket-control` binary.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wicket_control::Config;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cfg = Config::parse();
    let filter = EnvFilter::try_from_env("WICKET_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_format == "json" {
        sub.json().init();
    } else {
        sub.init();
    }
    let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wicket-control: cannot listen on {}: {e}", cfg.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    match wicket_control::run(cfg, listener, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wicket-control: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
