//! The demo's Kubernetes part: the fake kube-apiserver of `wicket-testkit`
//! (no real API server can run here), wicket-k8s in front of it, and a
//! kubeconfig for the demo agent that gets its token from `wicket
//! kube-credential`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{Children, env_get, port_open, wait_for};

/// The demo cluster behind its gate.
pub struct DemoK8s {
    /// The gate's port.
    pub port: u16,
    /// The gate's metrics port.
    pub admin_port: u16,
    /// The fake API server's port.
    pub apiserver_port: u16,
    /// The agent's kubeconfig.
    pub kubeconfig: PathBuf,
}

/// The newest kubectl of the `kubectl` package, if installed.
pub fn kubectl() -> Option<PathBuf> {
    ["1.33", "1.32", "1.31", "1.30"]
        .iter()
        .map(|v| PathBuf::from(format!("/usr/lib/google-cloud-sdk/bin/kubectl.{v}")))
        .find(|p| p.exists())
}

/// Starts the fake API server and wicket-k8s, and writes the agent's kubeconfig.
pub fn start(
    dir: &Path,
    bin: &Path,
    env: &[(String, String)],
    control_url: &str,
    check: bool,
    kids: &mut Children,
) -> Result<DemoK8s, String> {
    let kdir = dir.join("kube");
    std::fs::create_dir_all(&kdir).map_err(|e| e.to_string())?;
    let [apiserver_port, port, admin_port] =
        crate::util::demo_ports(check, [7443, 6443, 9472], "the Kubernetes demo")?;
    let _ = std::fs::remove_file(kdir.join("gate.crt"));
    kids.spawn_logged(
        "wicket-fake-kube",
        Command::new(bin.join("wicket-fake-kube"))
            .args(["--listen", &format!("127.0.0.1:{apiserver_port}"), "--dir"])
            .arg(&kdir),
        &dir.join("fake-kube.log"),
    )?;
    wait_for(20, "the fake kube-apiserver", || {
        port_open(apiserver_port) && kdir.join("gate.crt").exists()
    })?;
    crate::demo::start_gate(
        dir,
        bin,
        env,
        control_url,
        ("wicket-k8s", "demo-cluster"),
        (port, admin_port),
        &[
            ("WICKET_K8S_LISTEN", format!("127.0.0.1:{port}")),
            (
                "WICKET_K8S_UPSTREAM",
                format!("https://127.0.0.1:{apiserver_port}"),
            ),
            (
                "WICKET_K8S_UPSTREAM_CA",
                kdir.join("ca.crt").display().to_string(),
            ),
            (
                "WICKET_K8S_UPSTREAM_TOKEN_FILE",
                kdir.join("token").display().to_string(),
            ),
            (
                "WICKET_TLS_CERT",
                kdir.join("gate.crt").display().to_string(),
            ),
            (
                "WICKET_TLS_KEY",
                kdir.join("gate.key").display().to_string(),
            ),
        ],
        kids,
    )?;
    // The agent's kubeconfig: kubectl runs `wicket kube-credential`, which
    // hands it the agent's token (demo only: a real agent's token comes
    // from `wicket login --client-credentials`, not from its kubeconfig).
    let kubeconfig = kdir.join("kubeconfig");
    let out = Command::new(bin.join("wicket"))
        .args([
            "kube",
            "config",
            "--server",
            &format!("https://127.0.0.1:{port}"),
            "--name",
            "demo",
            "--namespace",
            "default",
            "--certificate-authority",
        ])
        .arg(kdir.join("ca.crt"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--exec-env")
        .arg(format!(
            "WICKET_TOKEN={}",
            env_get(env, "WICKET_AGENT_TOKEN")
        ))
        .env("WICKET_OIDC_ISSUER", env_get(env, "WICKET_OIDC_ISSUER"))
        .output()
        .map_err(|e| format!("cannot run wicket kube config: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "wicket kube config failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(DemoK8s {
        port,
        admin_port,
        apiserver_port,
        kubeconfig,
    })
}

/// The demo agent's kubectl through wicket-k8s: a read, a redacted Secret,
/// an exec, and a refused one.
pub fn check(dir: &Path, k: &DemoK8s) -> Result<(), String> {
    let Some(kubectl) = kubectl() else {
        println!("(kubectl is not installed: skipping the Kubernetes demo check)");
        return Ok(());
    };
    let run = |args: &[&str]| {
        Command::new(&kubectl)
            .args(args)
            .env("KUBECONFIG", &k.kubeconfig)
            .env("HOME", dir.join("kube/home"))
            .env("WICKET_REASONING", "demo check")
            .env_remove("WICKET_TOKEN")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("kubectl: {e}"))
    };
    let fail = |what: &str, o: &std::process::Output| {
        Err(format!(
            "demo check: {what}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    };
    let pods = run(&["get", "pods"])?;
    if !String::from_utf8_lossy(&pods.stdout).contains("web-0") {
        return fail("kubectl get pods through wicket-k8s failed", &pods);
    }
    let secret = run(&[
        "get",
        "secret",
        "db-creds",
        "-o",
        "jsonpath={.data.password}",
    ])?;
    let value = String::from_utf8_lossy(&secret.stdout).to_string();
    if !secret.status.success() || value.is_empty() || value.contains("aHVudGVy") {
        return fail("the agent saw a Secret value", &secret);
    }
    let exec = run(&["exec", "web-0", "--", "echo", "hello from the pod"])?;
    if String::from_utf8_lossy(&exec.stdout).trim() != "hello from the pod" {
        return fail("kubectl exec through wicket-k8s failed", &exec);
    }
    let denied = run(&["exec", "web-0", "--", "rm", "-rf", "/data"])?;
    if denied.status.success()
        || !String::from_utf8_lossy(&denied.stderr).contains("no-destruction-in-pods")
    {
        return fail("a destructive exec was not refused", &denied);
    }
    Ok(())
}
