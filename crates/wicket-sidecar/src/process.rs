//! The process around a gate: the crypto provider, the runtime (one thread
//! or several), logging, and the exit status.

use std::future::Future;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// The process flags every gate binary shares.
#[derive(Debug, Clone, clap::Args)]
pub struct ProcessArgs {
    /// Threads serving connections. 1 (the default) runs everything on one
    /// thread, as pgbouncer does: the least CPU per message and the lowest
    /// latency (no cross-thread wake-ups), and enough for a sidecar's share
    /// of a node. N > 1 spreads connections over N threads; 0 uses one per
    /// core.
    #[arg(long, env = "WICKET_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Log format: `text` or `json`.
    #[arg(long, env = "WICKET_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// File holding the key of keyed-hash masking (any bytes; give every
    /// gate of a connection the same file so hashes agree). Without it a
    /// random key is drawn at start: hashes then agree within this process.
    #[arg(long, env = "WICKET_MASK_KEY_FILE")]
    pub mask_key_file: Option<std::path::PathBuf>,
}

impl ProcessArgs {
    /// The keyed-hash masking key: the file's bytes, or 32 random bytes.
    pub fn mask_key(&self) -> Result<Vec<u8>, String> {
        match &self.mask_key_file {
            Some(f) => std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display())),
            None => {
                let mut k = vec![0u8; 32];
                aws_lc_rs::rand::fill(&mut k).map_err(|_| "no random source")?;
                Ok(k)
            }
        }
    }
}

/// Runs a gate binary's `run` on a runtime of `--worker-threads` threads
/// (1: the current thread only; 0: one per core), with logs (`WICKET_LOG`
/// filter, `text` or `json` format) on stderr. An error is printed as
/// `name: error` and exits with failure.
pub fn main<F, Fut>(name: &str, args: &ProcessArgs, run: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match args.worker_threads {
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
        if args.log_format == "json" {
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

/// Resolves on Ctrl-C or SIGTERM (the gate then drains).
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A secret kept in a file (a mounted Secret), without its trailing newline.
pub fn read_secret_file(f: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(f)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|e| format!("cannot read {}: {e}", f.display()))
}

/// The next client connection of a gate, or `None` once `shutdown`
/// resolves. Accept errors (out of descriptors, say) are logged and retried
/// after a pause; connections that arrive while the sidecar drains are
/// closed at once.
pub async fn next_connection<F: std::future::Future<Output = ()>>(
    listener: &tokio::net::TcpListener,
    shutdown: &mut std::pin::Pin<&mut F>,
    sidecar: &crate::Sidecar,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.as_mut() => return None,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if sidecar.is_draining() {
            continue;
        }
        let _ = stream.set_nodelay(true);
        return Some((stream, peer));
    }
}
