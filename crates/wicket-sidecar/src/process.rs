//! The process around a gate: the crypto provider, the runtime (one thread
//! or several), logging, and the exit status.

use std::future::Future;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Runs a gate binary's `run` on a runtime of `worker_threads` threads (1:
/// the current thread only; 0: one per core), with logs (`WICKET_LOG`
/// filter, `text` or `json` format) on stderr. An error is printed as
/// `name: error` and exits with failure.
pub fn main<F, Fut>(name: &str, worker_threads: usize, log_format: &str, run: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                b.worker_threads(n);
            }
            b.enable_all().build()
        }
    };
    let rt = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let filter =
            EnvFilter::try_from_env("WICKET_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
        let sub = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        if log_format == "json" {
            sub.json().init();
        } else {
            sub.init();
        }
        match run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
