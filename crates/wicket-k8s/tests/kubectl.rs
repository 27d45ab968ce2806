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
  - id: restarts-need-approval
    effect: review
    match: {commands: [exec]}
    condition: \"command.argv.exists(a, a.contains('restart'))\"
    review: {approvers: [sre], timeout: 30s}
  - id: admins-write
    effect: allow
    match: {commands: [write], groups: [admins]}
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

/// A person's token.
fn human(ks: &KubeStack, name: &str, groups: &[&str]) -> String {
    ks.stack.idp.mint(&TokenSpec::human(name, groups))
}

/// Runs a blocking kubectl off the runtime's threads.
/// Runs `cmd` with `input` on its stdin (then closed); its output.
fn with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("kubectl thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_verbs_work_through_the_gate() {
    let ks = KubeStack::start(POLICY).await;
    let ops = human(&ks, "olivia", &["ops"]);
    let admin = human(&ks, "ada", &["ops", "admins"]);
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
        let out = ok(k(&ops_cfg).args(["exec", "web-0", "--", "echo", "hello from the pod"]));
        assert_eq!(out, "hello from the pod\n", "{v}");
        let o = with_stdin(
            k(&ops_cfg).args(["exec", "-i", "web-0", "--", "cat"]),
            b"line one\nmail bob@example.org\n",
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{v}: exec -i failed");
        assert!(
            out.starts_with("line one\n") && !out.contains("bob@example.org"),
            "{v}: {out}"
        );
        // Megabytes of masked output (every line changes length): no
        // window or framing trouble over WebSocket or SPDY.
        let out = ok(k(&ops_cfg).args([
            "exec",
            "web-0",
            "--",
            "sh",
            "-c",
            "yes 'mail carol@example.com now' | head -n 100000",
        ]));
        assert_eq!(out.lines().count(), 100_000, "{v}");
        let leaked: Vec<&str> = out.lines().filter(|l| l.contains("carol@")).collect();
        assert!(
            leaked.is_empty(),
            "{v}: {} {:?}",
            leaked.len(),
            &leaked[..leaked.len().min(3)]
        );
        assert!(
            out.lines()
                .all(|l| l.starts_with("mail ") && l.ends_with(" now"))
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
    // kubectl 1.30 told to use SPDY (it speaks both) goes the same way.
    let o = with_stdin(
        ks.kubectl("1.30", &ops_cfg)
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
            .args(["exec", "-i", "web-0", "--", "cat", "-u"]),
        b"spdy from 1.30\nmail erin@example.net\n",
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "1.30 over SPDY failed");
    assert!(
        out.starts_with("spdy from 1.30\n") && !out.contains("erin@example.net"),
        "{out}"
    );
    let events = ks.stack.events().await;
    let commands: Vec<&v1::AuditEvent> = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Command as i32)
        .collect();
    assert!(
        commands.iter().any(|e| {
            e.command
                .as_ref()
                .is_some_and(|c| c.text.contains("cat -u"))
                && e.details
                    .get("subprotocol")
                    .is_some_and(|p| p.starts_with("SPDY/3.1"))
        }),
        "kubectl 1.30 with KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false went over SPDY"
    );
    // kubectl 1.27 ran its execs over SPDY, relayed and recorded like the rest.
    let spdy = commands
        .iter()
        .filter(|e| {
            e.details
                .get("subprotocol")
                .is_some_and(|p| p.starts_with("SPDY/3.1"))
        })
        .count();
    assert!(spdy >= 5, "kubectl 1.27's execs went over SPDY: {spdy}");
    // (A result is its own event, or merged into its command's.)
    assert!(
        events
            .iter()
            .any(|e| e.details.get("exit_code").map(String::as_str) == Some("3")),
        "the exit code is read from the error stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_and_followed_logs_stream_without_buffering() {
    let ks = KubeStack::start(POLICY).await;
    let ops = human(&ks, "olivia", &["ops"]);
    let cfg = ks.token_kubeconfig("ops", &ops);
    for v in KUBECTL_VERSIONS.iter().copied() {
        let mut watch = ks
            .kubectl(v, &cfg)
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
        assert!(l.unwrap().unwrap().contains("db-0"), "{v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        ks.kube.add_pod("default", &format!("late-{v}"));
        let v2 = v.to_string();
        let found = blocking(move || {
            lines
                .by_ref()
                .take(5)
                .map_while(Result::ok)
                .any(|l| l.contains(&format!("late-{v2}")))
        })
        .await;
        assert!(found, "the watch delivers a new pod while it streams");
        let _ = watch.kill();
        let _ = watch.wait();

        let mut logs = ks
            .kubectl(v, &cfg)
            .args(["logs", "-f", "web-0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(logs.stdout.take().unwrap()).lines();
        let (got, lines) = blocking(move || {
            let got: Vec<String> = lines.by_ref().take(3).map_while(Result::ok).collect();
            (got, lines)
        })
        .await;
        assert_eq!(got.len(), 3, "{v}");
        assert!(!got.join("\n").contains("alice@example.com"));
        ks.kube.log(&format!("late line {v} for carol@example.net"));
        let want = format!("late line {v} for");
        let late = blocking(move || {
            lines
                .take(10)
                .map_while(Result::ok)
                .find(|l| l.starts_with(&want))
        })
        .await
        .expect("the followed log delivers a new line");
        assert!(!late.contains("carol@"), "{late}");
        let _ = logs.kill();
        let _ = logs.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_denied_and_unexplained_requests_are_recorded_with_identity_and_trace() {
    let ks = KubeStack::start(POLICY).await;
    let ops = human(&ks, "olivia", &["ops"]);
    let sre = human(&ks, "sam", &["sre", "wicket-approvers"]);
    let agent = ks.stack.idp.mint(&TokenSpec::agent("bot", &["agents"]));
    let ops_cfg = ks.token_kubeconfig("ops", &ops);

    // An agent without reasoning is refused; with it (carried on the token
    // the way `wicket kube-credential` does), it gets through.
    let bare = ks.token_kubeconfig("agent-bare", &agent);
    let err = fails(ks.kubectl("1.33", &bare).args(["get", "pods"]));
    assert!(
        err.contains("Forbidden") && err.contains("require-reasoning"),
        "{err}"
    );
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let carried = wicket_k8s::CarriedReasoning {
        reasoning: "checking why web-0 restarts".into(),
        traceparent: traceparent.into(),
    };
    let explained = ks.token_kubeconfig("agent", &carried.attach(&agent));
    let out = ok(ks.kubectl("1.33", &explained).args(["get", "pods"]));
    assert!(out.contains("web-0"));

    // A held delete, approved: kubectl waits, then the pod is gone.
    let mut delete = ks.kubectl("1.33", &ops_cfg);
    delete.args(["delete", "pod", "db-0", "--wait=false"]);
    let run = blocking(move || delete.output().unwrap());
    let approve = ks.stack.decide_next(&sre, true, |a| {
        let cmd = a
            .request
            .as_ref()
            .and_then(|r| r.command.as_ref())
            .expect("command");
        assert_eq!(cmd.text, "delete pods/db-0 -n default");
    });
    let (o, ()) = tokio::join!(run, approve);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(!ks.kube.pods("default").contains(&"db-0".to_string()));

    // A held delete, denied: kubectl says why.
    let mut delete = ks.kubectl("1.33", &ops_cfg);
    delete.args(["delete", "pod", "web-0", "--wait=false"]);
    let run = blocking(move || delete.output().unwrap());
    let deny = ks.stack.decide_next(&sre, false, |_| {});
    let (o, ()) = tokio::join!(run, deny);
    let err = text(&o).1;
    assert!(
        !o.status.success() && err.contains("deletes-need-approval") && err.contains("denied"),
        "{err}"
    );
    assert!(ks.kube.pods("default").contains(&"web-0".to_string()));

    // A held delete whose kubectl goes away: withdrawn, never run.
    let mut delete = ks.kubectl("1.33", &ops_cfg);
    delete.args(["delete", "pod", "web-0", "--wait=false"]);
    ks.stack.kill_while_held(&sre, &mut delete).await;
    assert!(ks.kube.pods("default").contains(&"web-0".to_string()));

    // A held exec says it waits on the caller's terminal, then runs.
    let mut exec = ks.kubectl("1.33", &ops_cfg);
    exec.args(["exec", "web-0", "--", "sh", "-c", "echo restarted"]);
    let run = blocking(move || exec.output().unwrap());
    let approve = ks.stack.decide_next(&sre, true, |_| {});
    let (o, ()) = tokio::join!(run, approve);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out, "restarted\n");
    assert!(err.contains("waiting for approval"), "{err}");

    // Over SPDY (kubectl 1.27) too: the gate answers the client's streams
    // itself while the exec is held, and says so on stderr.
    let mut exec = ks.kubectl("1.27", &ops_cfg);
    exec.args([
        "exec",
        "web-0",
        "--",
        "sh",
        "-c",
        "echo restarted over spdy",
    ]);
    let run = blocking(move || exec.output().unwrap());
    let approve = ks.stack.decide_next(&sre, true, |_| {});
    let (o, ()) = tokio::join!(run, approve);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(text(&o).0, "restarted over spdy\n");
    assert!(
        text(&o).1.contains("waiting for approval"),
        "{}",
        text(&o).1
    );
    // And a denied one says why.
    let mut exec = ks.kubectl("1.27", &ops_cfg);
    exec.args(["exec", "web-0", "--", "sh", "-c", "echo restart never"]);
    let run = blocking(move || exec.output().unwrap());
    let deny = ks.stack.decide_next(&sre, false, |_| {});
    let (o, ()) = tokio::join!(run, deny);
    let err = text(&o).1;
    assert!(!o.status.success() && err.contains("denied"), "{err}");
    assert!(!text(&o).0.contains("never"));

    // A held exec whose kubectl goes away (WebSocket, then SPDY) is
    // withdrawn and never runs.
    let marks = ks.stack.dir.path().to_path_buf();
    for version in ["1.33", "1.27"] {
        let mark = marks.join(format!("restart-ran-{version}"));
        let mut exec = ks.kubectl(version, &ops_cfg);
        exec.args(["exec", "web-0", "--", "touch"]).arg(&mark);
        ks.stack.kill_while_held(&sre, &mut exec).await;
        assert!(
            !mark.exists(),
            "kubectl {version}: the held exec ran for nobody"
        );
    }

    // The audit trail: who (as impersonated), what, the decision, the trace.
    let events = ks.stack.events().await;
    let commands: Vec<&v1::AuditEvent> = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Command as i32)
        .collect();
    let rule = |e: &v1::AuditEvent| {
        e.decision
            .as_ref()
            .map(|d| d.rule.clone())
            .unwrap_or_default()
    };
    assert!(commands.iter().any(|e| rule(e) == "require-reasoning"));
    let traced = commands
        .iter()
        .find(|e| {
            e.reasoning
                .as_ref()
                .is_some_and(|r| r.reasoning == "checking why web-0 restarts")
        })
        .expect("the agent's reasoning is recorded");
    assert_eq!(
        traced.reasoning.as_ref().unwrap().trace_id,
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        traced.details.get("impersonate_user").map(String::as_str),
        Some("bot")
    );
    let deletes: Vec<_> = commands
        .iter()
        .filter(|e| rule(e) == "deletes-need-approval")
        .collect();
    let outcomes: Vec<&str> = deletes
        .iter()
        .filter_map(|e| e.details.get("approval_outcome").map(String::as_str))
        .collect();
    assert_eq!(outcomes, ["approved", "denied", "abandoned"]);
    let abandoned_execs = commands
        .iter()
        .filter(|e| e.details.get("approval_outcome").map(String::as_str) == Some("abandoned"))
        .filter(|e| rule(e) != "deletes-need-approval")
        .count();
    assert_eq!(abandoned_execs, 2, "both abandoned execs are recorded");
    assert!(
        deletes
            .iter()
            .all(|e| e.details.get("impersonate_user").map(String::as_str) == Some("olivia"))
    );
    // The API server saw the agent as itself.
    assert!(ks.kube.seen().iter().any(
        |s| s.impersonate_user.as_deref() == Some("bot") && s.impersonate_groups == ["agents"]
    ));
}

/// A raw TLS connection to the gate.
async fn connect(ks: &KubeStack) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = wicket_sidecar::tls::client_config(Some(&ks.ca_file), &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(ks.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// Everything the gate sends until it closes (or 10 s pass).
async fn read_all(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

/// Opens an exec WebSocket through the gate and sends `frames` raw.
async fn exec_with_frames(ks: &KubeStack, token: &str, frames: &[u8]) -> String {
    use tokio::io::AsyncWriteExt;
    let mut s = connect(ks).await;
    let req = format!(
        "GET /api/v1/namespaces/default/pods/web-0/exec?command=cat&stdin=true&stdout=true HTTP/1.1\r\n\
         Host: {}\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n",
        ks.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(frames).await.unwrap();
    String::from_utf8_lossy(&read_all(&mut s).await).into_owned()
}

/// Opens a SPDY exec through the gate and sends `frames` raw.
async fn spdy_exec_with(ks: &KubeStack, token: &str, frames: &[u8]) -> String {
    let exec = "exec?command=cat&stdin=true&stdout=true";
    spdy_upgrade_with(ks, token, exec, "v4.channel.k8s.io", frames).await
}

/// Sends `frames` on a SPDY upgrade of web-0's `subresource` (with its
/// query) speaking `protocol`; returns all the gate answered.
async fn spdy_upgrade_with(
    ks: &KubeStack,
    token: &str,
    subresource: &str,
    protocol: &str,
    frames: &[u8],
) -> String {
    use tokio::io::AsyncWriteExt;
    let mut s = connect(ks).await;
    let req = format!(
        "POST /api/v1/namespaces/default/pods/web-0/{subresource} HTTP/1.1\r\n\
         Host: {}\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n",
        ks.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(frames).await.unwrap();
    String::from_utf8_lossy(&read_all(&mut s).await).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_the_gate_carries_on() {
    let ks = KubeStack::start(POLICY).await;
    let ops = human(&ks, "olivia", &["ops"]);
    let admin = human(&ks, "ada", &["ops", "admins"]);
    let ops_cfg = ks.token_kubeconfig("ops", &ops);

    // Forged impersonation: kubectl --as sends Impersonate-User.
    let err = fails(
        ks.kubectl("1.33", &ops_cfg)
            .args(["get", "pods", "--as", "system:admin"]),
    );
    assert!(
        err.contains("impersonation") && err.contains("Forbidden"),
        "{err}"
    );
    assert!(
        ks.kube
            .seen()
            .iter()
            .all(|s| s.impersonate_user.as_deref() != Some("system:admin"))
    );

    // Bad and expired tokens.
    let bad = ks.token_kubeconfig("bad", "not-a-token");
    let err = fails(ks.kubectl("1.33", &bad).args(["get", "pods"]));
    assert!(
        err.contains("Unauthorized") || err.contains("logged in"),
        "{err}"
    );
    let expired = ks.stack.idp.mint(&TokenSpec {
        ttl_seconds: -60,
        ..TokenSpec::human("olivia", &["ops"])
    });
    let err = fails(
        ks.kubectl("1.33", &ks.token_kubeconfig("expired", &expired))
            .args(["get", "pods"]),
    );
    assert!(
        err.contains("Unauthorized") || err.contains("logged in"),
        "{err}"
    );

    // A huge body: refused before the API server sees it, declared or chunked.
    let big = ks.dir.join("big.json");
    std::fs::write(
        &big,
        format!("{{\"kind\":\"Pod\",\"x\":\"{}\"}}", "a".repeat(5 << 20)),
    )
    .unwrap();
    for chunked in [false, true] {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--cacert"]).arg(&ks.ca_file).args([
            "-H",
            &format!("Authorization: Bearer {admin}"),
            "-H",
            "Content-Type: application/json",
        ]);
        if chunked {
            curl.args(["-H", "Transfer-Encoding: chunked"]);
        }
        curl.args(["--data-binary", &format!("@{}", big.display())])
            .arg(format!("{}/api/v1/namespaces/default/pods", ks.url()));
        let out = ok(&mut curl);
        assert!(
            out.contains("\"code\":413") && out.contains("limit"),
            "chunked={chunked}: {out}"
        );
    }
    assert!(!ks.kube.seen().iter().any(|s| s.method == "POST"));

    // Malformed WebSocket frames: an unmasked client frame, reserved bits,
    // and a length of 2^40 bytes are refused without reading on.
    for frames in [
        vec![0x82u8, 0x03, 0, b'h', b'i'],
        vec![0xf2, 0x80, 1, 2, 3, 4],
        vec![0x82, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 4],
    ] {
        let reply = exec_with_frames(&ks, &ops, &frames).await;
        assert!(reply.starts_with("HTTP/1.1 101"), "{reply}");
    }
    // A good frame still works on a fresh stream: stdin "hi", then close stdin.
    let mut good = Vec::new();
    for payload in [&[0u8, b'h', b'i'][..], &[255, 0][..]] {
        let mut f = bytes::BytesMut::new();
        wicket_sidecar::websocket::encode(
            &wicket_sidecar::websocket::Frame::binary(payload.to_vec()),
            Some([7, 7, 7, 7]),
            &mut f,
        );
        good.extend_from_slice(&f);
    }
    let reply = exec_with_frames(&ks, &ops, &good).await;
    assert!(reply.contains("\u{1}hi"), "{reply:?}");

    // Malformed SPDY: a header block that is not zlib, a SPDY/2 frame, and
    // a frame of 16 MiB are refused without reading on; the relay records why.
    use wicket_spdy::{FLAG_FIN, Frame};
    for frames in [
        Frame::syn_stream(1, 0, b"not a zlib stream").raw().to_vec(),
        vec![0x80, 2, 0, 1, 0, 0, 0, 0],
        vec![0, 0, 0, 1, 0, 0xff, 0xff, 0xff],
    ] {
        let reply = spdy_exec_with(&ks, &ops, &frames).await;
        assert!(reply.starts_with("HTTP/1.1 101"), "{reply}");
    }
    // A well-formed SPDY exec of the same shape works.
    let mut deflater = wicket_spdy::Deflater::new();
    let mut good = Vec::new();
    for (id, t) in [(1, "error"), (3, "stdin"), (5, "stdout")] {
        let block = deflater.block(&[("streamtype", t)]);
        good.extend_from_slice(Frame::syn_stream(id, 0, &block).raw());
    }
    good.extend_from_slice(Frame::data(3, FLAG_FIN, b"spdy hi").raw());
    let reply = spdy_exec_with(&ks, &ops, &good).await;
    assert!(reply.contains("spdy hi"), "{reply:?}");
    // A port-forward is relayed as it is but read on its way: framing the
    // gate cannot read (so could not record) ends it instead.
    let reply = spdy_upgrade_with(
        &ks,
        &ops,
        "portforward",
        "portforward.k8s.io",
        &[0x80, 2, 0, 1, 0, 0, 0, 0],
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 101"), "{reply}");
    let mut events = ks.stack.events().await;
    let bad_spdy = |events: &[v1::AuditEvent]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| e.details.get("error"))
            .filter(|e| e.contains("bad SPDY"))
            .cloned()
            .collect()
    };
    for _ in 0..50 {
        if bad_spdy(&events).len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        events = ks.stack.events().await;
    }
    let errors = bad_spdy(&events);
    assert!(errors.len() >= 4, "{errors:?}");
    // And the gate carries on.
    let out = ok(ks.kubectl("1.33", &ops_cfg).args(["get", "pods"]));
    assert!(out.contains("web-0"));
    let events = ks.stack.events().await;
    assert!(
        events
            .iter()
            .any(|e| e.kind == v1::AuditKind::AuthFailure as i32)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_session_ends_its_exec_and_watch() {
    terminated_exec_ends("1.33").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_session_ends_its_spdy_exec() {
    terminated_exec_ends("1.27").await;
}

async fn terminated_exec_ends(version: &str) {
    let ks = KubeStack::start(POLICY).await;
    let ops = human(&ks, "olivia", &["ops"]);
    let cfg = ks.token_kubeconfig("ops", &ops);
    let mut exec = ks.kubectl(version, &cfg);
    exec.args(["exec", "web-0", "--", "sleep", "30"]);
    let started = std::time::Instant::now();
    let run = blocking(move || exec.output().unwrap());
    let terminate = async {
        let mut sessions = v1::session_admin_service_client::SessionAdminServiceClient::new(
            ks.stack.channel.clone(),
        );
        let admin = ks.stack.admin();
        let id = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let list = sessions
                .list_sessions(wicket_teststack::auth(
                    v1::ListSessionsRequest {
                        limit: 10,
                        ..Default::default()
                    },
                    &admin,
                ))
                .await
                .unwrap()
                .into_inner()
                .sessions;
            if let Some(s) = list.into_iter().next() {
                // Let the exec start before ending its session.
                tokio::time::sleep(Duration::from_millis(500)).await;
                break s.id;
            }
        };
        sessions
            .terminate_session(wicket_teststack::auth(
                v1::TerminateSessionRequest {
                    id,
                    reason: "incident response".into(),
                },
                &admin,
            ))
            .await
            .unwrap();
    };
    let (o, ()) = tokio::join!(run, terminate);
    assert!(!o.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the exec ended with its session"
    );
    assert!(text(&o).1.contains("wicket"), "{version}: {}", text(&o).1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_exec_is_recorded_as_asciicast() {
    let ks = KubeStack::start(POLICY).await;
    let ops = human(&ks, "olivia", &["ops"]);
    let cfg = ks.token_kubeconfig("ops", &ops);
    // 1.33 over WebSocket, 1.27 over SPDY.
    for v in ["1.33", "1.27"] {
        let kubectl = wicket_teststack::kube::kubectl_path(v);
        // `script` gives kubectl a terminal, so `-it` asks for a tty.
        let line = format!(
            "{} exec -it web-0 -- sh -c 'echo tty-ok-{v}; read x; echo got:$x; echo mail dave@example.com'",
            kubectl.display()
        );
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &line, "/dev/null"])
            .env("KUBECONFIG", &cfg)
            .env("HOME", ks.dir.join("home"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let o = blocking(move || {
            let mut child = cmd.spawn().unwrap();
            std::thread::sleep(Duration::from_millis(800));
            child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
            child.wait_with_output().unwrap()
        })
        .await;
        let (out, err) = text(&o);
        assert!(o.status.success(), "{v}: {err}{out}");
        assert!(
            out.contains(&format!("tty-ok-{v}")) && out.contains("got:abc"),
            "{v}: {out}"
        );
        assert!(
            !out.contains("dave@example.com"),
            "{v}: output is masked on the terminal too: {out}"
        );
    }
    let events = ks.stack.events().await;
    let outputs: Vec<&v1::AuditEvent> = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Output as i32)
        .collect();
    let header = outputs
        .iter()
        .find_map(|e| e.details.get("asciicast_header"))
        .expect("an asciicast header");
    let header: serde_json::Value = serde_json::from_str(header).unwrap();
    assert_eq!(header["version"], 2);
    assert!(header["width"].as_u64().unwrap() > 0);
    let cast: String = outputs
        .iter()
        .filter_map(|e| e.details.get("asciicast"))
        .cloned()
        .collect();
    let lines: Vec<serde_json::Value> = cast
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for v in ["1.33", "1.27"] {
        assert!(
            lines
                .iter()
                .any(|l| l[1] == "o" && l[2].as_str().unwrap().contains(&format!("tty-ok-{v}"))),
            "{v}'s session is recorded"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l[1] == "i" && l[2].as_str().unwrap().contains("abc"))
    );
    assert!(!cast.contains("dave@example.com"));
}

/// port-forward in the WebSocket channel protocol (clients other than
/// kubectl): relayed as it is, the forwarded bytes recorded and masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_in_the_channel_protocol_is_recorded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use wicket_sidecar::websocket::{self as ws, Frame, Sender};
    let ks = KubeStack::start(POLICY).await;
    let ops = human(&ks, "olivia", &["ops"]);
    let mut s = connect(&ks).await;
    let req = format!(
        "GET /api/v1/namespaces/default/pods/web-0/portforward?ports=8080 HTTP/1.1\r\n\
         Host: {}\r\nAuthorization: Bearer {ops}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n",
        ks.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let head = loop {
        assert!(s.read_buf(&mut buf).await.unwrap() > 0, "the gate closed");
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break String::from_utf8(buf.split_to(end + 4).to_vec()).unwrap();
        }
    };
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: v4.channel.k8s.io")
    );
    let sent = b"over channels, mail olga@example.com\n";
    let mut msg = vec![0u8];
    msg.extend_from_slice(sent);
    let mut out = bytes::BytesMut::new();
    ws::encode(&Frame::binary(msg), Some(ws::new_mask()), &mut out);
    s.write_all(&out).await.unwrap();
    // The port on each channel first, then the echo on the data channel.
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut echoed = Vec::new();
    while echoed.len() < sent.len() {
        while let Some(f) = ws::decode(&mut buf, Sender::Server, 1 << 20).unwrap() {
            if f.payload.first() == Some(&0) && got.iter().any(|m| m[0] == 0) {
                echoed.extend_from_slice(&f.payload[1..]);
            }
            got.push(f.payload.to_vec());
        }
        if echoed.len() < sent.len() {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf))
                .await
                .expect("the echo")
                .unwrap();
            assert!(n > 0, "the gate closed: {got:?}");
        }
    }
    assert_eq!(got[0], vec![0, 0x90, 0x1f], "port 8080 on the data channel");
    assert_eq!(
        got[1],
        vec![1, 0x90, 0x1f],
        "port 8080 on the error channel"
    );
    assert_eq!(echoed, sent, "the bytes arrive as they are");
    out.clear();
    ws::encode(&Frame::close(1000, ""), Some(ws::new_mask()), &mut out);
    s.write_all(&out).await.unwrap();
    let _ = s.shutdown().await;
    drop(s);
    let recorded = |events: &[v1::AuditEvent], kind: &str| {
        events
            .iter()
            .filter(|e| e.kind == v1::AuditKind::Output as i32)
            .filter_map(|e| e.details.get("asciicast"))
            .flat_map(|c| c.lines())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l[1] == kind)
            .filter_map(|l| l[2].as_str().map(str::to_string))
            .collect::<String>()
    };
    let mut events = ks.stack.events().await;
    for _ in 0..75 {
        if recorded(&events, "o").contains("over channels") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        events = ks.stack.events().await;
    }
    for kind in ["i", "o"] {
        let text = recorded(&events, kind);
        assert!(text.contains("over channels, mail "), "{kind}: {text:?}");
        assert!(
            !text.contains("olga@example.com"),
            "{kind}: masked: {text:?}"
        );
    }
    assert!(
        wicket_teststack::results(&events)
            .iter()
            .any(|e| e.details.get("ports").is_some_and(|p| p == "8080")),
        "the result names the port"
    );
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_runs_over_websocket_and_over_spdy() {
    let ks = KubeStack::start(POLICY).await;
    let ops = human(&ks, "olivia", &["ops"]);
    let cfg = ks.token_kubeconfig("ops", &ops);
    // 1.33 tunnels SPDY in a WebSocket; 1.30 and 1.27 speak plain SPDY.
    let runs = [
        ("1.33", None),
        ("1.30", Some("true")),
        ("1.30", None),
        ("1.27", None),
    ];
    for (n, (v, websockets)) in runs.iter().copied().enumerate() {
        let local = free_port();
        let mut pf = ks.kubectl(v, &cfg);
        pf.args(["port-forward", "pod/web-0", &format!("{local}:8080")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(on) = websockets {
            pf.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", on);
        }
        let mut child = pf.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        // The forwarded bytes arrive as they are (no masking on the wire).
        let sent = format!("forward {n} through the gate, mail olga@example.com\n");
        let echoed = blocking({
            let sent = sent.clone();
            move || {
                let mut line = String::new();
                out.read_line(&mut line).unwrap();
                assert!(line.starts_with("Forwarding from"), "{line}");
                let mut s = std::net::TcpStream::connect(("127.0.0.1", local)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(sent.as_bytes()).unwrap();
                let mut got = vec![0u8; sent.len()];
                std::io::Read::read_exact(&mut s, &mut got).unwrap();
                got
            }
        })
        .await;
        assert_eq!(echoed, sent.as_bytes(), "{v}");
        let _ = child.kill();
        let _ = child.wait();
    }
    // Each relay records its byte counts and the forwarded bytes, masked,
    // once both ends have closed: the client's as input, the pod's echo
    // as output.
    let cast = |events: &[v1::AuditEvent]| -> Vec<serde_json::Value> {
        events
            .iter()
            .filter(|e| e.kind == v1::AuditKind::Output as i32)
            .filter_map(|e| e.details.get("asciicast"))
            .flat_map(|c| {
                c.lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let recorded = |lines: &[serde_json::Value], kind: &str, n: usize| {
        let text: String = lines
            .iter()
            .filter(|l| l[1] == kind)
            .filter_map(|l| l[2].as_str())
            .collect();
        text.contains(&format!("forward {n} through the gate, mail "))
    };
    let mut events = ks.stack.events().await;
    for _ in 0..75 {
        let lines = cast(&events);
        if (0..runs.len()).all(|n| recorded(&lines, "i", n) && recorded(&lines, "o", n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        events = ks.stack.events().await;
    }
    let lines = cast(&events);
    for (n, (v, websockets)) in runs.iter().enumerate() {
        assert!(
            recorded(&lines, "i", n) && recorded(&lines, "o", n),
            "kubectl {v} (websockets {websockets:?}): the forwarded bytes are recorded both ways"
        );
    }
    assert!(
        !lines
            .iter()
            .any(|l| l.to_string().contains("olga@example.com")),
        "the recording is masked"
    );
    assert!(
        events
            .iter()
            .filter_map(|e| e.details.get("asciicast_header"))
            .any(|h| h.contains("port-forward 8080")),
        "the recording names the ports: {:?}",
        events
            .iter()
            .filter_map(|e| e.details.get("asciicast_header"))
            .collect::<Vec<_>>()
    );
    let forwards: Vec<&v1::AuditEvent> = events
        .iter()
        .filter(|e| {
            e.command
                .as_ref()
                .and_then(|c| c.classification.as_ref())
                .is_some_and(|c| c.kind == "port_forward")
        })
        .collect();
    assert!(
        forwards.len() >= 4,
        "every port-forward is decided and recorded"
    );
    assert!(
        forwards.iter().any(|e| e
            .details
            .get("subprotocol")
            .is_some_and(|p| p.contains("portforward.k8s.io") && p.starts_with("SPDY/3.1 ("))),
        "plain SPDY port-forward is relayed"
    );
    let moved: u64 = wicket_teststack::results(&events)
        .iter()
        .filter_map(|e| e.details.get("bytes_out"))
        .filter_map(|b| b.parse::<u64>().ok())
        .sum();
    assert!(moved > 0);
}
