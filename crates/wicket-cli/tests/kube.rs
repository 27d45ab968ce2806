//! `wicket kube config` and `wicket kube-credential` with real kubectl
//! through wicket-k8s (to the fake kube-apiserver).

use std::process::Command;

use wicket_proto::v1;
use wicket_testkit::idp::TokenSpec;
use wicket_teststack::kube::KubeStack;

const POLICY: &str = "
agents: {require_reasoning: true}
connections:
  - name: kube
    protocol: kubernetes
grants:
  - id: agents
    groups: [agents]
rules:
  - id: reads
    effect: allow
    match: {protocols: [kubernetes], commands: [read]}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_gets_its_token_and_the_reasoning_from_the_credential_plugin() {
    let ks = KubeStack::start(POLICY).await;
    let agent = ks.stack.idp.mint(&TokenSpec::agent("bot", &["agents"]));
    let home = ks.dir.join("cli-home");
    std::fs::create_dir_all(&home).unwrap();
    let kubeconfig = home.join(".kube/config");
    let o = Command::new(env!("CARGO_BIN_EXE_wicket"))
        .env("HOME", &home)
        .env_remove("KUBECONFIG")
        .args([
            "kube",
            "config",
            "--server",
            &ks.url(),
            "--namespace",
            "default",
            "--certificate-authority",
        ])
        .arg(&ks.ca_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let written = std::fs::read_to_string(&kubeconfig).unwrap();
    let home = home.clone();
    assert!(
        written.contains("kube-credential") && !written.contains(&agent),
        "no token is written"
    );
    let agent_token = agent.clone();
    let kubectl = move |reasoning: Option<&str>| {
        let mut c = Command::new(wicket_teststack::kube::kubectl_path("1.33"));
        c.env("HOME", &home)
            .env_remove("KUBECONFIG")
            .env("WICKET_TOKEN", &agent_token)
            .env_remove("WICKET_REASONING")
            .args(["get", "pods"]);
        if let Some(r) = reasoning {
            c.env("WICKET_REASONING", r).env(
                "TRACEPARENT",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            );
        }
        c.output().unwrap()
    };
    let o = tokio::task::spawn_blocking(move || {
        (
            kubectl(None),
            kubectl(Some("listing pods for the weekly report")),
        )
    })
    .await
    .unwrap();
    let (without, with) = o;
    assert!(!without.status.success());
    assert!(String::from_utf8_lossy(&without.stderr).contains("require-reasoning"));
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    assert!(String::from_utf8_lossy(&with.stdout).contains("web-0"));
    let events = ks.stack.events().await;
    let traced = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Command as i32)
        .find_map(|e| {
            e.reasoning
                .as_ref()
                .filter(|r| r.reasoning == "listing pods for the weekly report")
        })
        .expect("the reasoning reached the audit trail");
    assert_eq!(traced.trace_id, "0af7651916cd43dd8448eb211c80319c");
}
