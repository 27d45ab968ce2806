//! Real kubectl (1.27, 1.30, 1.33) through wicket-k8s to the fake
//! kube-apiserver of `wicket_testkit::kube`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use wicket_proto::v1;
use wicket_testkit::idp::TokenSpec;
use wicket_teststack::kube::{KUBECTL_VERSIONS, KubeStack};

const POLICY: &str = "
agents: {require_reasoning: true}
connections:
  - name: kube
    protocol: kubernetes
    masking: {detectors: [email]}
grants:
  - id: people
    groups: [ops, admins]
  - id: agents
    groups: [agents]
rules:
  - id: reads
    effect: allow
    match: {protocols: [kubernetes], commands: [read, secret_read, port_forward]}
  - id: admins-see-secrets
    effect: allow
    match: {commands: [secret_values], groups: [admins]}
  - id: exec
    effect: allow
    match: {commands: [exec]}
  - id: no-rm-in-pods
    description: nobody deletes files inside pods
    effect: deny
    match: {commands: [exec]}
    condition: \"command.argv.exists(a, a == 'rm' || a.startsWith('rm '))\"
  - id: deletes-need-approval
    effect: review
    match: {commands: [delete]}
    review: {approvers: [sre], timeout: 30s}
";

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{cmd:?} failed: {err}\n{out}");
    out
}

fn fails(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{cmd:?} should fail: {out}");
    err
}

/// Runs a blocking kubectl off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("kubectl thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_verbs_work_through_the_gate() {
    let ks = KubeStack::start(POLICY).await;
    let ops = ks.stack.idp.mint(&TokenSpec::human("olivia", &["ops"]));
    let admin = ks
        .stack
        .idp
        .mint(&TokenSpec::human("ada", &["ops", "admins"]));
    let ops_cfg = ks.token_kubeconfig("ops", &ops);
    let admin_cfg = ks.token_kubeconfig("admin", &admin);
    let src = ks.dir.join("src.txt");
    std::fs::write(&src, "file through kubectl cp\n").unwrap();
    for v in KUBECTL_VERSIONS {
        let k = |cfg: &std::path::Path| ks.kubectl(v, cfg);
        let out = ok(k(&ops_cfg).args(["get", "pods"]));
        assert!(
            out.contains("web-0") && out.contains("Running"),
            "{v}: {out}"
        );
        let out = ok(k(&ops_cfg).args(["get", "pod", "web-0", "-o", "json"]));
        assert!(out.contains("\"name\": \"web-0\""), "{v}: {out}");
        let out = ok(k(&ops_cfg).args(["describe", "pod", "web-0"]));
        assert!(out.contains("Name:") && out.contains("web-0"), "{v}: {out}");
        // Log lines are masked by the connection's detectors.
        let out = ok(k(&ops_cfg).args(["logs", "web-0"]));
        assert!(
            out.contains("signed in") && !out.contains("alice@example.com"),
            "{v}: {out}"
        );
        // Secret values: redacted for ops, shown to admins.
        let out = ok(k(&ops_cfg).args(["get", "secret", "db-creds", "-o", "yaml"]));
        assert!(
            out.contains("password:") && !out.contains("aHVudGVyMi12ZXJ5LXNlY3JldA=="),
            "{v}: {out}"
        );
        let out = ok(k(&ops_cfg).args(["get", "secrets", "-o", "json"]));
        assert!(!out.contains("aHVudGVyMi12ZXJ5LXNlY3JldA=="), "{v}: {out}");
        let out = ok(k(&admin_cfg).args(["get", "secret", "db-creds", "-o", "yaml"]));
        assert!(out.contains("aHVudGVyMi12ZXJ5LXNlY3JldA=="), "{v}: {out}");
        if *v == "1.27" {
            // kubectl 1.27 speaks SPDY only: refused, with what to do instead.
            let err = fails(k(&ops_cfg).args(["exec", "web-0", "--", "echo", "hi"]));
            assert!(err.contains("kubectl 1.30 or newer"), "{v}: {err}");
            continue;
        }
        let out = ok(k(&ops_cfg).args(["exec", "web-0", "--", "echo", "hello from the pod"]));
        assert_eq!(out, "hello from the pod\n", "{v}");
        let mut child = k(&ops_cfg)
            .args(["exec", "-i", "web-0", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"line one\nmail bob@example.org\n")
            .unwrap();
        let o = child.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{v}: exec -i failed");
        assert!(
            out.starts_with("line one\n") && !out.contains("bob@example.org"),
            "{v}: {out}"
        );
        let o = k(&ops_cfg)
            .args(["exec", "web-0", "--", "sh", "-c", "exit 3"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(3), "{v}: {}", text(&o).1);
        // kubectl cp both ways (tar over exec), bytes intact.
        let got = ks.dir.join(format!("got-{v}.txt"));
        ok(k(&ops_cfg).args([
            "cp",
            &format!("web-0:{}", src.display()),
            &got.display().to_string(),
        ]));
        assert_eq!(
            std::fs::read_to_string(&got).unwrap(),
            "file through kubectl cp\n"
        );
        let up = ks.dir.join(format!("up-{v}.txt"));
        ok(k(&ops_cfg).args([
            "cp",
            &src.display().to_string(),
            &format!("web-0:{}", up.display()),
        ]));
        assert_eq!(
            std::fs::read_to_string(&up).unwrap(),
            "file through kubectl cp\n"
        );
        // A denied exec names the rule.
        let err = fails(k(&ops_cfg).args(["exec", "web-0", "--", "rm", "-rf", "/tmp/x"]));
        assert!(err.contains("no-rm-in-pods"), "{v}: {err}");
    }
    // The API server was told who the caller is, never more.
    let seen = ks.kube.seen();
    assert!(
        seen.iter().all(|s| s.impersonate_user.is_some()),
        "every request impersonates"
    );
    assert!(seen.iter().any(
        |s| s.impersonate_user.as_deref() == Some("olivia") && s.impersonate_groups == ["ops"]
    ));
    // Secrets are always read as JSON, so they can be redacted.
    assert!(
        seen.iter()
            .filter(|s| s.uri.contains("/secrets"))
            .all(|s| s.accept == "application/json")
    );
    // Every exec was recorded, with its output masked.
    let events = ks.stack.events().await;
    let outputs: String = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Output as i32)
        .filter_map(|e| e.details.get("asciicast"))
        .cloned()
        .collect();
    assert!(outputs.contains("hello from the pod"), "{outputs}");
    assert!(outputs.contains("line one") && !outputs.contains("bob@example.org"));
    let commands: Vec<&v1::AuditEvent> = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Command as i32)
        .collect();
    assert!(
        commands
            .iter()
            .any(|e| e.details.get("impersonate_user").map(String::as_str) == Some("olivia"))
    );
    let spdy = commands
        .iter()
        .filter(|e| {
            e.decision
                .as_ref()
                .is_some_and(|d| d.rule == "spdy-refused")
        })
        .count();
    assert!(spdy >= 1, "the SPDY refusal is audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_and_followed_logs_stream_without_buffering() {
    let ks = KubeStack::start(POLICY).await;
    let ops = ks.stack.idp.mint(&TokenSpec::human("olivia", &["ops"]));
    let cfg = ks.token_kubeconfig("ops", &ops);
    let mut watch = ks
        .kubectl("1.33", &cfg)
        .args(["get", "pods", "-w", "--no-headers"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = blocking(move || {
        let l = lines.next();
        (l, lines)
    })
    .await;
    let (l, mut lines) = first;
    assert!(l.unwrap().unwrap().contains("db-0"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    ks.kube.add_pod("default", "late-1");
    let found = blocking(move || {
        lines
            .by_ref()
            .take(5)
            .map_while(Result::ok)
            .any(|l| l.contains("late-1"))
    })
    .await;
    assert!(found, "the watch delivers a new pod while it streams");
    let _ = watch.kill();

    let mut logs = ks
        .kubectl("1.33", &cfg)
        .args(["logs", "-f", "web-0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(logs.stdout.take().unwrap()).lines();
    let (got, mut lines) = blocking(move || {
        let got: Vec<String> = lines.by_ref().take(3).map_while(Result::ok).collect();
        (got, lines)
    })
    .await;
    assert_eq!(got.len(), 3);
    assert!(!got.join("\n").contains("alice@example.com"));
    ks.kube.log("late line for carol@example.net");
    let late = blocking(move || lines.next().and_then(Result::ok))
        .await
        .unwrap();
    assert!(
        late.starts_with("late line for") && !late.contains("carol@"),
        "{late}"
    );
    let _ = logs.kill();
}
