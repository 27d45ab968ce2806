//! The webhook's HTTPS server: `POST /mutate` (AdmissionReview),
//! `GET /healthz`, `/readyz` and `/metrics`.
//!
//! The serving certificate is re-read when its files change (a rotated
//! Secret, cert-manager), so a rotation needs no restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;

use crate::review::{Verdict, answer};
use crate::settings::Settings;

/// Largest AdmissionReview accepted (a pod is at most about 1.5 MiB in etcd;
/// the review carries it once for CREATE).
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// Counters served at `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    injected: AtomicU64,
    skipped: AtomicU64,
    denied: AtomicU64,
    invalid: AtomicU64,
}

impl Metrics {
    fn render(&self) -> String {
        let mut out = String::from(
            "# HELP wicket_injector_reviews_total AdmissionReviews answered, by result.\n\
             # TYPE wicket_injector_reviews_total counter\n",
        );
        for (result, n) in [
            ("injected", &self.injected),
            ("skipped", &self.skipped),
            ("denied", &self.denied),
            ("invalid", &self.invalid),
        ] {
            out.push_str(&format!(
                "wicket_injector_reviews_total{{result=\"{result}\"}} {}\n",
                n.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// A certificate resolver that re-reads its PEM files when they change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Vec<u8>, Arc<CertifiedKey>)>,
}

fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

fn load(cert: &Path, key: &Path) -> Result<(Vec<u8>, Arc<CertifiedKey>), String> {
    let cert_pem =
        std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let key_pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot parse certificates in {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("no PEM certificate in {}", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, der, &provider())
        .map_err(|e| format!("the TLS certificate and key do not fit together: {e}"))?;
    let mut stamp = cert_pem;
    stamp.extend_from_slice(&key_pem);
    Ok((stamp, Arc::new(certified)))
}

impl ReloadingCert {
    /// Loads `cert` (chain, leaf first) and `key` (PEM).
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<ReloadingCert>, String> {
        Ok(Arc::new(ReloadingCert {
            cert: cert.into(),
            key: key.into(),
            current: RwLock::new(load(cert, key)?),
        }))
    }

    /// Re-reads the files; `Ok(true)` when the certificate changed. A
    /// broken pair (half-written rotation) keeps the last good one.
    pub fn reload(&self) -> Result<bool, String> {
        let (stamp, key) = load(&self.cert, &self.key)?;
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        if cur.0 == stamp {
            return Ok(false);
        }
        *cur = (stamp, key);
        Ok(true)
    }

    /// Re-reads the files every `every`, logging changes and errors.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "serving certificate not reloaded; keeping the last good one")
                }
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .1
                .clone(),
        )
    }
}

/// The rustls server configuration over a reloading certificate.
pub fn tls_config(cert: Arc<ReloadingCert>) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Answers one HTTP request.
pub async fn handle(
    req: Request<Incoming>,
    settings: &Settings,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    let text = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz" | "/readyz") => reply(StatusCode::OK, text, "ok\n"),
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (&Method::POST, "/mutate") => {
            let json = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            if !json {
                metrics.invalid.fetch_add(1, Ordering::Relaxed);
                return reply(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    text,
                    "send an AdmissionReview as application/json\n",
                );
            }
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    metrics.invalid.fetch_add(1, Ordering::Relaxed);
                    let too_big = e
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some();
                    return if too_big {
                        reply(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            text,
                            format!("an AdmissionReview is at most {MAX_BODY} bytes\n"),
                        )
                    } else {
                        reply(StatusCode::BAD_REQUEST, text, "the body did not arrive\n")
                    };
                }
            };
            match answer(&body, settings) {
                Ok(a) => {
                    match &a.verdict {
                        Verdict::Injected(plan) => {
                            metrics.injected.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(uid = %a.uid, pod = %a.pod, protocol = %plan.protocol,
                                connection = %plan.connection, native = plan.native, "gate injected");
                        }
                        Verdict::Skipped(why) => {
                            metrics.skipped.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(uid = %a.uid, pod = %a.pod, why, "left unchanged");
                        }
                        Verdict::Denied(why) => {
                            metrics.denied.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(uid = %a.uid, pod = %a.pod, reason = %why, "pod denied");
                        }
                    }
                    reply(StatusCode::OK, "application/json", a.body)
                }
                Err(e) => {
                    metrics.invalid.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "malformed admission request");
                    reply(StatusCode::BAD_REQUEST, text, format!("{e}\n"))
                }
            }
        }
        (_, "/mutate") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "POST an AdmissionReview\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, text, "not found\n"),
    }
}

/// Serves until `shutdown` resolves, then lets requests in flight finish
/// (at most ten seconds).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    settings: Arc<Settings>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let metrics = Arc::new(Metrics::default());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut set = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        let metrics = metrics.clone();
        while set.try_join_next().is_some() {}
        set.spawn(async move {
            connection(stream, peer, acceptor, settings, metrics).await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while set.join_next().await.is_some() {}
    })
    .await;
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let svc = hyper::service::service_fn(move |req| {
        let settings = settings.clone();
        let metrics = metrics.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, &settings, &metrics).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), svc);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
