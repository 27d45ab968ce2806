//! `wicket-fake-kube`: the fake kube-apiserver of `wicket_testkit::kube`, as
//! a process, for `cargo xtask demo` and `cargo xtask bench k8s`.
//!
//! `--dir DIR` receives `ca.crt` (the CA of its serving certificate),
//! `token` (the bearer token it accepts) and `gate.crt` / `gate.key` (a
//! certificate from the same CA for a gate in front of it, for `127.0.0.1`
//! and `localhost`); it prints `ready https://…` once it listens. For demos and benchmarks only: exec runs commands on this host.

use std::path::PathBuf;

use wicket_testkit::arg;
use wicket_testkit::kube::{FakeKube, FakeKubeOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let listen = arg("--listen").unwrap_or_else(|| "127.0.0.1:7443".into());
    let dir = PathBuf::from(arg("--dir").unwrap_or_else(|| ".".into()));
    let token = match std::fs::read_to_string(dir.join("token")) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => format!("sa-{}", uuid::Uuid::new_v4().simple()),
    };
    let kube = FakeKube::start_with(FakeKubeOptions {
        listen: listen.parse().expect("--listen HOST:PORT"),
        token: token.clone(),
        root: dir.join("pods"),
    })
    .await;
    std::fs::create_dir_all(&dir).expect("create --dir");
    std::fs::write(dir.join("ca.crt"), &kube.ca.cert_pem).expect("write ca.crt");
    std::fs::write(dir.join("token"), &token).expect("write token");
    kube.ca
        .issue(&[])
        .write(&dir, "gate")
        .expect("write gate.crt and gate.key");
    println!("ready {}", kube.url());
    let _ = tokio::signal::ctrl_c().await;
}
