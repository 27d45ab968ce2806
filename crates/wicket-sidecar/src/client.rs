//! The gRPC channel to the control service, with the sidecar credential.

use std::path::Path;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A lazily connecting channel plus the credential to put on every call.
#[derive(Clone)]
pub struct ControlClient {
    /// The channel (reconnects by itself).
    pub channel: Channel,
    token: MetadataValue<tonic::metadata::Ascii>,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlClient")
    }
}

impl ControlClient {
    /// A client for `url`; nothing is dialled until the first call.
    pub fn new(url: &str, token: &str, ca_cert: Option<&Path>) -> Result<ControlClient, String> {
        let mut ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("invalid control URL `{url}`: {e}"))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = ca_cert {
                let pem =
                    std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            ep = ep.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
        }
        let token = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            "the sidecar credential contains characters not allowed in a header".to_string()
        })?;
        Ok(ControlClient {
            channel: ep.connect_lazy(),
            token,
        })
    }

    /// Wraps a message with the credential.
    pub fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("authorization", self.token.clone());
        r
    }
}

/// Exponential backoff from 200 ms to 10 s.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(200))
    }
}

impl Backoff {
    /// Sleeps, then doubles the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
    }

    /// Back to the shortest delay.
    pub fn reset(&mut self) {
        self.0 = Duration::from_millis(200);
    }
}
