//! The upstream service: a keep-alive connection pool (HTTP/1.1, or HTTP/2
//! by ALPN over TLS or by prior knowledge over cleartext) and the
//! credential the gate injects.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::Uri;
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use wicket_sidecar::web::Body;

// A secret the gate reads: given, or from a file re-read every minute
// (mounted Secrets rotate).
pub use wicket_sidecar::secret::{Secret, read_secret};

/// The credential the gate adds to every upstream request.
#[derive(Debug, Clone)]
pub enum Credential {
    /// None (a client certificate in the TLS settings, or an open upstream).
    None,
    /// `Authorization: Bearer …`.
    Bearer(Secret),
    /// `Authorization: Basic …` from `user:password`.
    Basic(Secret),
    /// A header of the given name (an API key).
    Header(HeaderName, Secret),
}

/// A header to add: name and (sensitive) value.
pub type CredentialHeader = (HeaderName, HeaderValue);

/// The credential's header, read fresh at most once a minute.
#[derive(Debug)]
pub struct CredentialCache {
    credential: Credential,
    cached: std::sync::Mutex<Option<(Instant, Option<CredentialHeader>)>>,
}

impl CredentialCache {
    /// Caches `credential`.
    pub fn new(credential: Credential) -> CredentialCache {
        CredentialCache {
            credential,
            cached: std::sync::Mutex::new(None),
        }
    }

    fn read(secret: &Secret) -> Result<String, String> {
        read_secret(secret)
    }

    fn build(&self) -> Result<Option<CredentialHeader>, String> {
        use base64::Engine as _;
        let bad = || "the upstream credential is not a valid header value".to_string();
        let header = match &self.credential {
            Credential::None => return Ok(None),
            Credential::Bearer(s) => (
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", Self::read(s)?.trim()),
            ),
            Credential::Basic(s) => (
                hyper::header::AUTHORIZATION,
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(Self::read(s)?.trim())
                ),
            ),
            Credential::Header(name, s) => (name.clone(), Self::read(s)?.trim().to_string()),
        };
        let mut value = HeaderValue::from_str(&header.1).map_err(|_| bad())?;
        value.set_sensitive(true);
        Ok(Some((header.0, value)))
    }

    /// The header to add (`None`: no credential). A file that cannot be
    /// read keeps the last good value; with none, the request fails.
    pub fn header(&self) -> Result<Option<CredentialHeader>, String> {
        let mut g = self.cached.lock().expect("credential");
        if let Some((at, h)) = g.as_ref()
            && at.elapsed() < Duration::from_secs(60)
        {
            return Ok(h.clone());
        }
        match self.build() {
            Ok(h) => {
                *g = Some((Instant::now(), h.clone()));
                Ok(h)
            }
            Err(e) => match g.as_ref() {
                Some((_, h)) => {
                    tracing::error!(error = %e, "keeping the last upstream credential");
                    Ok(h.clone())
                }
                None => Err(e),
            },
        }
    }
}

/// A connection to the upstream, cleartext or TLS.
pub enum UpConn {
    /// Cleartext TCP.
    Plain(TokioIo<TcpStream>),
    /// TLS.
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl hyper::rt::Read for UpConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpConn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpConn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_flush(cx),
            UpConn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpConn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpConn::Plain(s) => s.is_write_vectored(),
            UpConn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpConn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

impl Connection for UpConn {
    fn connected(&self) -> Connected {
        match self {
            UpConn::Plain(_) => Connected::new(),
            UpConn::Tls(s) => {
                if s.inner().get_ref().1.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

/// Dials the one upstream, whatever the request's URI says.
#[derive(Clone)]
pub struct Connector {
    addr: Arc<str>,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpConn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<UpConn>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _dst: Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&*me.addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {} timed out", me.addr),
                    )
                })??;
            let _ = tcp.set_nodelay(true);
            match me.tls {
                None => Ok(UpConn::Plain(TokioIo::new(tcp))),
                Some((cfg, name)) => {
                    let tls = tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, tcp)
                        .await?;
                    Ok(UpConn::Tls(Box::new(TokioIo::new(tls))))
                }
            }
        })
    }
}

/// How to reach the upstream service.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    /// Its base URL (`http://…` or `https://…`, with an optional path prefix).
    pub url: url::Url,
    /// TLS settings for `https` (trust, ALPN, optional client certificate).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Speak HTTP/2 over cleartext by prior knowledge.
    pub h2c: bool,
    /// Idle connections kept per upstream.
    pub pool_idle: usize,
}

/// The upstream service and its pool.
pub struct Upstream {
    /// Where requests go (scheme, authority, path prefix).
    pub url: url::Url,
    /// `scheme://authority` of request URIs.
    pub origin: String,
    /// The base path, without a trailing slash (`""` for the root).
    pub prefix: String,
    /// The `Host` the upstream is sent.
    pub authority: HeaderValue,
    /// The pool.
    pub client: Client<Connector, Body>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A pool for `spec`.
    pub fn new(spec: UpstreamSpec) -> Result<Upstream, String> {
        let url = spec.url;
        let host = url
            .host_str()
            .ok_or("the upstream URL has no host")?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let port = url
            .port_or_known_default()
            .ok_or("the upstream URL has no port")?;
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let tls = match url.scheme() {
            "http" => None,
            "https" => {
                let cfg = spec.tls.ok_or("an https upstream needs TLS settings")?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("bad upstream host {host}: {e}"))?;
                Some((cfg, name))
            }
            s => {
                return Err(format!(
                    "the upstream URL must be http:// or https:// (got {s}://)"
                ));
            }
        };
        let connector = Connector {
            addr: addr.into(),
            tls,
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(spec.pool_idle)
            .http1_preserve_header_case(false)
            .http2_only(spec.h2c && url.scheme() == "http")
            .http2_adaptive_window(true);
        let client = b.build(connector);
        let authority = HeaderValue::from_str(url.authority())
            .map_err(|_| "the upstream URL's authority is not a valid Host")?;
        let origin = format!("{}://{}", url.scheme(), url.authority());
        let prefix = url.path().trim_end_matches('/').to_string();
        Ok(Upstream {
            url,
            origin,
            prefix,
            authority,
            client,
        })
    }

    /// The upstream URI of a request for `path_and_query` (already normalised).
    pub fn uri(&self, path: &str, query: &str) -> Result<Uri, String> {
        let mut s = String::with_capacity(
            self.origin.len() + self.prefix.len() + path.len() + query.len() + 1,
        );
        s.push_str(&self.origin);
        s.push_str(&self.prefix);
        s.push_str(path);
        if !query.is_empty() {
            s.push('?');
            s.push_str(query);
        }
        s.parse()
            .map_err(|e| format!("cannot form the upstream URI: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_become_headers() {
        let c = CredentialCache::new(Credential::Basic(Secret::Value("svc:pw".into())));
        let (n, v) = c.header().unwrap().unwrap();
        assert_eq!(n, hyper::header::AUTHORIZATION);
        assert_eq!(v.to_str().unwrap(), "Basic c3ZjOnB3");
        assert!(v.is_sensitive());
        let c = CredentialCache::new(Credential::Header(
            HeaderName::from_static("x-api-key"),
            Secret::Value("k1".into()),
        ));
        assert_eq!(c.header().unwrap().unwrap().1, "k1");
        let c = CredentialCache::new(Credential::Bearer(Secret::File("/nonexistent/x".into())));
        let e = c.header().unwrap_err();
        assert!(e.contains("/nonexistent/x"), "{e}");
        assert!(
            CredentialCache::new(Credential::None)
                .header()
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn upstream_uris_keep_the_prefix() {
        let up = Upstream::new(UpstreamSpec {
            url: url::Url::parse("http://127.0.0.1:8080/base/").unwrap(),
            tls: None,
            h2c: false,
            pool_idle: 4,
        })
        .unwrap();
        assert_eq!(
            up.uri("/a/b", "x=1").unwrap().to_string(),
            "http://127.0.0.1:8080/base/a/b?x=1"
        );
        assert!(
            Upstream::new(UpstreamSpec {
                url: url::Url::parse("ftp://h/").unwrap(),
                tls: None,
                h2c: false,
                pool_idle: 4
            })
            .is_err()
        );
    }
}
