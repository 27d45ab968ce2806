//! The HTTP gate in front of the demo app of `wicket_testkit::httpapp`, for
//! end-to-end tests.

use std::path::PathBuf;
use std::sync::Arc;

use wicket_http::{Credential, HttpConfig, HttpGate, Secret, Upstream, UpstreamSpec};
use wicket_testkit::httpapp::DemoApp;
use wicket_testkit::tls::TestCa;

use crate::Stack;

/// The API key the demo app demands and only the gate holds.
pub const APP_KEY: &str = "app-key-held-by-the-gate";

/// A gate under test with its upstream app.
pub struct HttpStack {
    /// Identity provider, control service and sidecar runtime.
    pub stack: Stack,
    /// The app behind the gate.
    pub app: DemoApp,
    /// The gate.
    pub gate: Arc<HttpGate>,
    /// Where the gate listens (cleartext: HTTP/1.1 and h2c).
    pub addr: std::net::SocketAddr,
    /// Where the same gate listens with TLS (h2 and http/1.1 by ALPN).
    pub tls_addr: std::net::SocketAddr,
    /// CA file of the TLS listener's certificate.
    pub ca_file: PathBuf,
}

impl std::fmt::Debug for HttpStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStack")
            .field("addr", &self.addr)
            .finish()
    }
}

impl HttpStack {
    /// Starts everything for connection `api` under `policy`.
    pub async fn start(policy: &str) -> HttpStack {
        HttpStack::start_with(policy, |_| {}).await
    }

    /// [`HttpStack::start`], with the gate's settings adjusted by `tune`.
    pub async fn start_with(policy: &str, tune: impl FnOnce(&mut HttpConfig)) -> HttpStack {
        HttpStack::start_opts(policy, false, tune).await
    }

    /// [`HttpStack::start_with`]; `h2c`: the gate speaks HTTP/2 to the app.
    pub async fn start_opts(
        policy: &str,
        h2c: bool,
        tune: impl FnOnce(&mut HttpConfig),
    ) -> HttpStack {
        let stack = Stack::start("api", policy).await;
        let app = DemoApp::start(
            "127.0.0.1:0",
            Some(("x-api-key".into(), APP_KEY.into())),
            true,
        )
        .await;
        let upstream = Upstream::new(UpstreamSpec {
            url: url::Url::parse(&app.url()).expect("url"),
            tls: None,
            h2c,
            pool_idle: 16,
        })
        .expect("upstream");
        let mut cfg = HttpConfig::new();
        cfg.credential = Credential::Header(
            hyper::header::HeaderName::from_static("x-api-key"),
            Secret::Value(APP_KEY.into()),
        );
        cfg.mask_key = b"test mask key".to_vec();
        tune(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        if let Some(l) = &mut cfg.login {
            l.issuer = stack.idp.issuer();
            l.public_url = url::Url::parse(&format!("http://{addr}")).expect("url");
        }
        let ca = TestCa::new("wicket-http test CA");
        let ca_file = stack.dir.path().join("http-ca.crt");
        std::fs::write(&ca_file, &ca.cert_pem).expect("write CA");
        let mut tls_cfg = cfg.clone();
        tls_cfg.tls = Some(ca.issue(&[]).server_config(&[b"h2", b"http/1.1"]));
        let gate = HttpGate::new(stack.sidecar.clone(), upstream, cfg).expect("gate");
        let tls_upstream = Upstream::new(UpstreamSpec {
            url: url::Url::parse(&app.url()).expect("url"),
            tls: None,
            h2c: false,
            pool_idle: 16,
        })
        .expect("upstream");
        let tls_gate = HttpGate::new(stack.sidecar.clone(), tls_upstream, tls_cfg).expect("gate");
        tokio::spawn(wicket_http::serve(
            gate.clone(),
            listener,
            std::future::pending(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let tls_addr = listener.local_addr().expect("addr");
        tokio::spawn(wicket_http::serve(
            tls_gate,
            listener,
            std::future::pending(),
        ));
        HttpStack {
            stack,
            app,
            gate,
            addr,
            tls_addr,
            ca_file,
        }
    }

    /// [`HttpStack::start`] with browser login on (client `wicket-http`,
    /// public URL = the cleartext listener), sessions kept in the gate or,
    /// with `session_key`, sealed into the browser's cookies.
    pub async fn start_login(
        policy: &str,
        session_key: Option<wicket_sidecar::secret::Secret>,
    ) -> HttpStack {
        // The issuer and the public URL are filled in once known.
        HttpStack::start_opts(policy, false, |c| {
            c.login = Some(wicket_http::LoginConfig {
                issuer: String::new(),
                client_id: "wicket-http".into(),
                client_secret: None,
                public_url: url::Url::parse("http://127.0.0.1/").expect("url"),
                scopes: "openid".into(),
                session_key,
            });
        })
        .await
    }

    /// `http://127.0.0.1:PORT` of the gate.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://localhost:PORT` of the gate's TLS listener.
    pub fn tls_url(&self) -> String {
        format!("https://localhost:{}", self.tls_addr.port())
    }
}
