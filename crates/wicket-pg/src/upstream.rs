//! The sidecar's own login to the upstream PostgreSQL server, with
//! credentials only it holds (SCRAM-SHA-256, md5 or cleartext).

use std::num::NonZeroU32;

use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wicket_sidecar::tls::Stream;

use crate::codec::{self, build};

/// Upstream login settings.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// `host:port`.
    pub addr: String,
    /// Role the sidecar logs in as.
    pub user: String,
    /// Its password (never logged).
    pub password: String,
    /// TLS to the server; `None` for plain TCP.
    pub tls: Option<UpstreamTls>,
}

/// TLS to the upstream server. The server's certificate is always verified
/// (chain and name) when TLS is used.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Trust roots and protocol settings.
    pub config: std::sync::Arc<rustls::ClientConfig>,
    /// Name the certificate must carry (DNS name or IP address).
    pub server_name: String,
    /// Fail when the server does not offer TLS (otherwise fall back to plain).
    pub required: bool,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field(
                "tls",
                &self.tls.as_ref().map(|t| (&t.server_name, t.required)),
            )
            .finish()
    }
}

/// What the server said while logging in, to replay to the client.
pub struct Hello {
    /// `ParameterStatus` messages, encoded.
    pub parameters: Vec<Bytes>,
    /// Backend pid and secret key (for CancelRequest).
    pub backend_key: (i32, i32),
    /// Transaction status of the first ReadyForQuery.
    pub status: u8,
}

/// Why the upstream login failed (safe to show the client: no secrets).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Not reachable.
    #[error("cannot reach the database server: {0}")]
    Connect(std::io::Error),
    /// The server refused the login; `code` is its SQLSTATE.
    #[error("the database server refused the gate's login: {message}")]
    Refused {
        /// SQLSTATE.
        code: String,
        /// Server message.
        message: String,
    },
    /// TLS to the server failed or was not offered when required.
    #[error("TLS to the database server failed: {0}")]
    Tls(String),
    /// Something else.
    #[error("database server login failed: {0}")]
    Protocol(String),
}

fn protocol(e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Protocol(e.to_string())
}

fn md5_password(user: &str, password: &str, salt: &[u8]) -> String {
    use md5::{Digest, Md5};
    let inner = hex::encode(Md5::digest(format!("{password}{user}").as_bytes()));
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex::encode(h.finalize()))
}

struct Scram {
    client_first_bare: String,
    nonce: String,
    password: String,
    auth_message: String,
    salted: Vec<u8>,
}

impl Scram {
    fn new(password: &str) -> Scram {
        let mut raw = [0u8; 18];
        let _ = aws_lc_rs::rand::fill(&mut raw);
        let nonce = base64::engine::general_purpose::STANDARD.encode(raw);
        Scram {
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            password: password.to_string(),
            auth_message: String::new(),
            salted: Vec::new(),
        }
    }

    fn initial(&self) -> Bytes {
        let first = format!("n,,{}", self.client_first_bare);
        let mut b = BytesMut::new();
        b.extend_from_slice(b"SCRAM-SHA-256\0");
        b.put_i32(first.len() as i32);
        b.extend_from_slice(first.as_bytes());
        build::password(&b)
    }

    fn respond(&mut self, server_first: &str) -> Result<Bytes, UpstreamError> {
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in server_first.split(',') {
            match part.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v.to_string()),
                Some(("s=", v)) => salt = base64::engine::general_purpose::STANDARD.decode(v).ok(),
                Some(("i=", v)) => iterations = v.parse::<u32>().ok().and_then(NonZeroU32::new),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(protocol("malformed SCRAM server-first message"));
        };
        if !nonce.starts_with(&self.nonce) || iterations.get() > 10_000_000 {
            return Err(protocol(
                "SCRAM server nonce or iteration count is not acceptable",
            ));
        }
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            self.password.as_bytes(),
            &mut salted,
        );
        let client_key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &salted), b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
            self.auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(signature.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        self.salted = salted.to_vec();
        let msg = format!(
            "{without_proof},p={}",
            base64::engine::general_purpose::STANDARD.encode(proof)
        );
        Ok(build::password(msg.as_bytes()))
    }

    fn verify(&self, server_final: &str) -> Result<(), UpstreamError> {
        let server_key = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &self.salted),
            b"Server Key",
        );
        let expected = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            self.auth_message.as_bytes(),
        );
        let given = server_final
            .strip_prefix("v=")
            .and_then(|v| {
                base64::engine::general_purpose::STANDARD
                    .decode(v.trim_end_matches('\0'))
                    .ok()
            })
            .ok_or_else(|| protocol("malformed SCRAM server-final message"))?;
        #[allow(deprecated)]
        aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_ref(), &given)
            .map_err(|_| protocol("the database server's SCRAM signature is wrong"))
    }
}

/// Opens a connection to the server, negotiating TLS (SSLRequest) when
/// configured. Used for logins and for cancel requests alike.
pub async fn open(cfg: &UpstreamConfig) -> Result<Stream, UpstreamError> {
    let mut tcp = TcpStream::connect(&cfg.addr)
        .await
        .map_err(UpstreamError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &cfg.tls else {
        return Ok(Stream::Plain(tcp));
    };
    let mut req = BytesMut::with_capacity(8);
    req.put_i32(8);
    req.put_i32(codec::SSL_REQUEST);
    tcp.write_all(&req).await.map_err(UpstreamError::Connect)?;
    let answer = tcp.read_u8().await.map_err(UpstreamError::Connect)?;
    match answer {
        b'S' => Stream::Plain(tcp)
            .connect(tls.config.clone(), &tls.server_name)
            .await
            .map_err(|e| UpstreamError::Tls(e.to_string())),
        b'N' if !tls.required => Ok(Stream::Plain(tcp)),
        b'N' => Err(UpstreamError::Tls(
            "the database server does not accept TLS connections".into(),
        )),
        other => Err(UpstreamError::Tls(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}

/// Connects and logs in to `database`, forwarding `extra` startup parameters.
pub async fn connect(
    cfg: &UpstreamConfig,
    database: &str,
    extra: &[(String, String)],
) -> Result<(Stream, Hello), UpstreamError> {
    let mut s = open(cfg).await?;
    let mut params: Vec<(&str, &str)> = vec![("user", &cfg.user), ("database", database)];
    params.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    s.write_all(&build::startup(&params))
        .await
        .map_err(protocol)?;
    let mut scram: Option<Scram> = None;
    let mut hello = Hello {
        parameters: Vec::new(),
        backend_key: (0, 0),
        status: b'I',
    };
    loop {
        let m = codec::read_message(&mut s, 1 << 20)
            .await
            .map_err(protocol)?;
        match m.tag {
            b'R' => {
                if m.body.len() < 4 {
                    return Err(protocol("short authentication message"));
                }
                let code = i32::from_be_bytes([m.body[0], m.body[1], m.body[2], m.body[3]]);
                let rest = &m.body[4..];
                let reply = match code {
                    0 => None,
                    3 => Some(build::password(format!("{}\0", cfg.password).as_bytes())),
                    5 => {
                        let hashed = md5_password(
                            &cfg.user,
                            &cfg.password,
                            rest.get(..4).unwrap_or_default(),
                        );
                        Some(build::password(format!("{hashed}\0").as_bytes()))
                    }
                    10 => {
                        let mechanisms = String::from_utf8_lossy(rest);
                        if !mechanisms.split('\0').any(|m| m == "SCRAM-SHA-256") {
                            return Err(protocol("the server offers no SCRAM-SHA-256"));
                        }
                        let sc = Scram::new(&cfg.password);
                        let first = sc.initial();
                        scram = Some(sc);
                        Some(first)
                    }
                    11 => {
                        let sc = scram
                            .as_mut()
                            .ok_or_else(|| protocol("unexpected SASL continue"))?;
                        Some(sc.respond(&String::from_utf8_lossy(rest))?)
                    }
                    12 => {
                        let sc = scram
                            .as_ref()
                            .ok_or_else(|| protocol("unexpected SASL final"))?;
                        sc.verify(&String::from_utf8_lossy(rest))?;
                        None
                    }
                    other => {
                        return Err(protocol(format!(
                            "unsupported authentication method {other}"
                        )));
                    }
                };
                if let Some(r) = reply {
                    s.write_all(&r).await.map_err(protocol)?;
                }
            }
            b'S' => hello.parameters.push(m.encode()),
            b'K' if m.body.len() >= 8 => {
                let b = &m.body;
                hello.backend_key = (
                    i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                    i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                );
            }
            b'Z' => {
                hello.status = m.body.first().copied().unwrap_or(b'I');
                return Ok((s, hello));
            }
            b'E' => {
                let f = codec::error_fields(&m.body);
                let get = |c: u8| {
                    f.iter()
                        .find(|(k, _)| *k == c)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                return Err(UpstreamError::Refused {
                    code: get(b'C'),
                    message: get(b'M'),
                });
            }
            b'N' | b'v' => {}
            other => {
                return Err(protocol(format!(
                    "unexpected message {:?} during login",
                    other as char
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn md5_matches_postgres() {
        // md5(md5("secret" + "alice") + salt), as PostgreSQL computes it.
        let got = super::md5_password("alice", "secret", &[1, 2, 3, 4]);
        assert_eq!(got.len(), 35);
        assert!(got.starts_with("md5"));
    }
}
