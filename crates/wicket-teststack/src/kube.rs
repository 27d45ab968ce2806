//! The Kubernetes gate between real kubectl and the fake kube-apiserver of
//! `wicket_testkit::kube`, for end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use wicket_k8s::{K8sConfig, KubeGate, TokenSource, Upstream};
use wicket_testkit::kube::FakeKube;
use wicket_testkit::tls::TestCa;

use crate::Stack;

/// The kubectl versions tests run, as installed by the `kubectl` package.
pub const KUBECTL_VERSIONS: &[&str] = &["1.27", "1.30", "1.33"];

/// A kubectl binary of `version` (`kubectl.1.33`, found on PATH or where
/// Google's package installs it).
pub fn kubectl_path(version: &str) -> PathBuf {
    let name = format!("kubectl.{version}");
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/lib/google-cloud-sdk/bin"])
    {
        let p = Path::new(dir).join(&name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed (the `kubectl` package ships kubectl.1.27 … kubectl.1.33)");
}

/// A gate under test with its fake API server.
pub struct KubeStack {
    /// Identity provider, control service and sidecar runtime.
    pub stack: Stack,
    /// The fake API server behind the gate.
    pub kube: FakeKube,
    /// The gate.
    pub gate: Arc<KubeGate>,
    /// Where the gate listens.
    pub addr: std::net::SocketAddr,
    /// CA file of the gate's serving certificate.
    pub ca_file: PathBuf,
    /// Scratch directory (kubeconfigs, HOME).
    pub dir: PathBuf,
}

impl std::fmt::Debug for KubeStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStack")
            .field("addr", &self.addr)
            .finish()
    }
}

impl KubeStack {
    /// Starts everything for connection `kube` under `policy`.
    pub async fn start(policy: &str) -> KubeStack {
        KubeStack::start_with(policy, |_| {}).await
    }

    /// [`KubeStack::start`], with the gate's settings adjusted by `tune`.
    pub async fn start_with(policy: &str, tune: impl FnOnce(&mut K8sConfig)) -> KubeStack {
        let stack = Stack::start("kube", policy).await;
        let dir = stack.dir.path().join("kube");
        std::fs::create_dir_all(dir.join("home")).expect("dirs");
        let kube = FakeKube::start(dir.join("pods")).await;
        let kube_ca = dir.join("apiserver-ca.crt");
        std::fs::write(&kube_ca, &kube.ca.cert_pem).expect("write CA");
        let ca = TestCa::new("wicket-k8s test CA");
        let ca_file = dir.join("gate-ca.crt");
        std::fs::write(&ca_file, &ca.cert_pem).expect("write CA");
        let tls =
            wicket_sidecar::tls::client_config(Some(&kube_ca), &[b"http/1.1"]).expect("client TLS");
        let mut cfg = K8sConfig::new(
            Upstream {
                addr: kube.addr.to_string(),
                server_name: rustls::pki_types::ServerName::try_from("127.0.0.1".to_string())
                    .expect("name"),
                authority: kube.addr.to_string(),
                tls,
                token: TokenSource::Static(kube.token().to_string()),
            },
            ca.issue(&[]).server_config(&[b"http/1.1"]),
        );
        cfg.mask_key = b"test mask key".to_vec();
        tune(&mut cfg);
        let gate = KubeGate::new(stack.sidecar.clone(), cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(wicket_k8s::serve(
            gate.clone(),
            listener,
            std::future::pending(),
        ));
        KubeStack {
            stack,
            kube,
            gate,
            addr,
            ca_file,
            dir,
        }
    }

    /// `https://127.0.0.1:PORT` of the gate.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Writes a kubeconfig for the gate with `user` (a kubeconfig `user:`
    /// mapping, e.g. `{token: …}` or `{exec: …}`), named `name`.
    pub fn kubeconfig(&self, name: &str, user: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gate\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user: {user}\ncontexts:\n- name: c\n  context: {{cluster: gate, user: u, namespace: default}}\ncurrent-context: c\n",
            self.url(),
            self.ca_file.display()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// A kubeconfig using a fixed bearer token.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        self.kubeconfig(name, &format!("{{token: \"{token}\"}}"))
    }

    /// kubectl `version` against `kubeconfig`, with its own HOME (discovery cache).
    pub fn kubectl(&self, version: &str, kubeconfig: &Path) -> Command {
        let mut c = Command::new(kubectl_path(version));
        c.env("KUBECONFIG", kubeconfig)
            .env("HOME", self.dir.join("home").join(version))
            .env_remove("KUBECTL_REMOTE_COMMAND_WEBSOCKETS")
            .arg("--request-timeout=60s");
        c
    }
}
