//! Test support for Wicket.
//!
//! - [`idp::TestIdp`]: an in-process OpenID provider (discovery, JWKS, token
//!   endpoint with client credentials and the device flow) that mints ES256
//!   access tokens, for unit and integration tests and for the demo.
//! - [`env`]: access to the real peers `cargo xtask test` starts (PostgreSQL,
//!   the npm `oidc-provider`).
//! - [`sshd::Sshd`]: a real OpenSSH server on a free port, for the user
//!   running the tests.

pub mod env;
pub mod hook;
pub mod httpapp;
pub mod idp;
pub mod kube;
pub mod spdy;
pub mod sshd;
pub mod tls;

/// Installs aws-lc-rs as the process's rustls provider (idempotent).
/// Call at the top of every test that touches TLS.
pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A request's whole body (empty when it breaks off: the fakes answer what
/// they got).
pub(crate) async fn body_bytes(req: hyper::Request<hyper::body::Incoming>) -> bytes::Bytes {
    use http_body_util::BodyExt as _;
    req.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

/// A loopback port free right now, for a child process to listen on (it
/// may be taken before the child binds it; tests wait for the listener).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The value after `name` on the command line (`--listen ADDR`), for the
/// small helper binaries.
pub fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args();
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
    }
    None
}
