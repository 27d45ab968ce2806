//! The real `wicket` binary against an in-process control service and IdP.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use wicket_proto::v1;
use wicket_testkit::idp::{TestIdp, TokenSpec};

const POLICY: &str = "connections:
  - name: orders-db
    protocol: postgres
    labels: {env: prod}
grants:
  - id: everyone
    groups: [dba, agents]
rules:
  - id: reads
    effect: allow
    match: {commands: [select]}
  - id: writes
    effect: review
    match: {commands: [update]}
    review: {approvers: [dba-leads], timeout: 30s}
";

struct Env {
    idp: TestIdp,
    control: String,
    dir: tempfile::TempDir,
    channel: Channel,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Env {
    start_on(None).await
}

/// A control service on `database` (default: SQLite in the scratch dir).
async fn start_on(database: Option<String>) -> Env {
    wicket_testkit::init_crypto();
    let idp = TestIdp::start("wicket").await;
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let database =
        database.unwrap_or_else(|| format!("sqlite:{}", dir.path().join("w.db").display()));
    let cfg = wicket_control::Config {
        max_message_bytes: 1 << 20,
        agent_rules: vec!["client-credentials".into()],
        recordings_dir: Some(dir.path().join("recordings")),
        // Roots and retention on demand only: the tests count them.
        audit_root_interval: 0,
        retention_interval: 0,
        ..wicket_control::Config::defaults(&idp.issuer(), &database, addr)
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(wicket_control::run(cfg, listener, async {
        let _ = rx.await;
    }));
    let control = format!("http://{addr}");
    let channel = loop {
        if let Ok(c) = Channel::from_shared(control.clone())
            .unwrap()
            .connect()
            .await
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    Env {
        idp,
        control,
        dir,
        channel,
        _stop: stop,
    }
}

impl Env {
    /// Runs `wicket ARGS` with a clean environment; `token` None uses the login cache.
    async fn wicket(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wicket"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WICKET_CONTROL", &self.control)
            .env("WICKET_CACHE_DIR", self.dir.path().join("cache"));
        if let Some(t) = token {
            cmd.env("WICKET_TOKEN", t);
        }
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    fn admin(&self) -> String {
        self.idp.mint(&TokenSpec::human("root", &["wicket-admins"]))
    }

    async fn sidecar_token(&self) -> String {
        let mut r = tonic::Request::new(v1::CreateSidecarCredentialRequest {
            name: "sc".into(),
            connections: vec!["orders-db".into()],
        });
        bearer(&mut r, &self.admin());
        v1::sidecar_admin_service_client::SidecarAdminServiceClient::new(self.channel.clone())
            .create_sidecar_credential(r)
            .await
            .unwrap()
            .into_inner()
            .token
    }
}

fn bearer<T>(r: &mut tonic::Request<T>, token: &str) {
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn ok(o: &Output) -> String {
    let (out, err) = text(o);
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {out}\nstderr: {err}",
        o.status
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_login_then_policy_commands() {
    let e = start().await;
    e.idp
        .set_device_user(TokenSpec::human("dana", &["wicket-admins"]));
    let issuer = e.idp.issuer();
    let out = e.wicket(None, &["login", "--issuer", &issuer]).await;
    let (_, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("enter the code WICK-ETDEMO"), "{err}");
    let cached = std::fs::read_dir(e.dir.path().join("cache"))
        .unwrap()
        .count();
    assert_eq!(cached, 2, "token file and issuer marker");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for f in std::fs::read_dir(e.dir.path().join("cache")).unwrap() {
            let f = f.unwrap();
            if f.file_name().to_string_lossy().starts_with("token-") {
                assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
            }
        }
    }

    let applied = ok(&e
        .wicket(
            None,
            &["policy", "apply", "-f", "policy.yaml", "-o", "json"],
        )
        .await);
    let v: serde_json::Value = serde_json::from_str(&applied).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["changed"], true);
    let got = ok(&e.wicket(None, &["policy", "get"]).await);
    assert_eq!(got, POLICY);

    let conns = ok(&e.wicket(None, &["connections", "list", "-o", "json"]).await);
    let v: serde_json::Value = serde_json::from_str(&conns).unwrap();
    assert_eq!(v[0]["name"], "orders-db");
    assert_eq!(v[0]["protocol"], "postgres");

    let explain = ok(&e
        .wicket(
            None,
            &[
                "policy",
                "explain",
                "-c",
                "orders-db",
                "--principal",
                "bot",
                "--group",
                "agents",
                "--agent",
                "--kind",
                "update",
            ],
        )
        .await);
    assert!(
        explain.contains("review") && explain.contains("writes"),
        "{explain}"
    );
    let explain = ok(&e
        .wicket(
            None,
            &[
                "policy",
                "explain",
                "-c",
                "orders-db",
                "--principal",
                "eve",
                "--kind",
                "select",
            ],
        )
        .await);
    assert!(explain.contains("no-grant"), "{explain}");

    // Bad YAML and bad CEL name file, line and field; exit code 1.
    std::fs::write(
        e.dir.path().join("bad.yaml"),
        "rules:\n  - id: x\n    effect: allow\n    condition: 'command.risk >'\n",
    )
    .unwrap();
    for sub in ["validate", "apply"] {
        let out = e.wicket(None, &["policy", sub, "-f", "bad.yaml"]).await;
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("bad.yaml:4:") && err.contains("rules[0].condition"),
            "{err}"
        );
    }
    std::fs::write(e.dir.path().join("bad2.yaml"), "rules: [\n").unwrap();
    let out = e
        .wicket(None, &["policy", "validate", "-f", "bad2.yaml"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("bad2.yaml:"), "{}", text(&out).1);

    // Logout forgets the token.
    ok(&e.wicket(None, &["logout"]).await);
    let out = e.wicket(None, &["connections", "list"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out).1.contains("wicket login"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_log_in_with_client_credentials_and_cannot_administer() {
    let e = start().await;
    e.idp
        .add_client("bot", "s3cret", TokenSpec::agent("bot", &["agents"]));
    let issuer = e.idp.issuer();
    let out = e
        .wicket(
            None,
            &[
                "login",
                "--issuer",
                &issuer,
                "--client-credentials",
                "--client-id",
                "bot",
                "--client-secret",
                "wrong",
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert!(text(&out).1.contains("invalid_client"));
    ok(&e
        .wicket(
            None,
            &[
                "login",
                "--issuer",
                &issuer,
                "--client-credentials",
                "--client-id",
                "bot",
                "--client-secret",
                "s3cret",
            ],
        )
        .await);
    let out = e
        .wicket(None, &["policy", "apply", "-f", "policy.yaml"])
        .await;
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out).1.contains("permission denied"),
        "{}",
        text(&out).1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_clear() {
    let e = start().await;
    let expired = e.idp.mint(&TokenSpec {
        ttl_seconds: -300,
        ..TokenSpec::human("root", &["wicket-admins"])
    });
    let out = e.wicket(Some(&expired), &["connections", "list"]).await;
    assert_eq!(out.status.code(), Some(3));
    let (_, err) = text(&out);
    assert!(err.contains("expired"), "{err}");
    assert!(
        !err.contains(&expired[..30]),
        "the token must not be echoed"
    );

    let out = e
        .wicket(
            Some(&e.admin()),
            &["--control", "http://127.0.0.1:1", "connections", "list"],
        )
        .await;
    assert_eq!(out.status.code(), Some(4));
    assert!(text(&out).1.contains("cannot reach the control service"));

    let out = e
        .wicket(Some(&e.admin()), &["policy", "apply", "-f", "missing.yaml"])
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("missing.yaml"));

    let out = e.wicket(Some(&e.admin()), &["policy", "get"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("no policy has been applied yet"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_and_sessions_from_the_cli() {
    let e = start().await;
    let admin = e.admin();
    ok(&e
        .wicket(Some(&admin), &["policy", "apply", "-f", "policy.yaml"])
        .await);
    let sc = e.sidecar_token().await;
    let bot = v1::Principal {
        subject: "bot".into(),
        issuer: e.idp.issuer(),
        kind: v1::PrincipalKind::Agent as i32,
        groups: vec!["agents".into()],
        ..Default::default()
    };

    // A sidecar reports a session and holds an UPDATE for approval.
    let now = wicket_proto::convert::ts(chrono::Utc::now());
    let ev = |id: &str, seq, kind: v1::AuditKind, text: &str| v1::AuditEvent {
        id: id.into(),
        session_id: "sess-42".into(),
        seq,
        time: Some(now),
        kind: kind as i32,
        connection: "orders-db".into(),
        principal: Some(bot.clone()),
        command: (!text.is_empty()).then(|| v1::Command {
            text: text.into(),
            classification: None,
        }),
        reasoning: Some(v1::ReasoningTrace {
            reasoning: "nightly cleanup of stale carts".into(),
            ..Default::default()
        }),
        client_app: "psql".into(),
        ..Default::default()
    };
    let mut r = tonic::Request::new(tokio_stream::iter(vec![v1::ReportRequest {
        events: vec![
            ev("e1", 1, v1::AuditKind::SessionStart, ""),
            ev(
                "e2",
                2,
                v1::AuditKind::Command,
                "SELECT count(*) FROM carts",
            ),
            v1::AuditEvent {
                details: [
                    ("command_id".to_string(), "e2".to_string()),
                    ("status".to_string(), "ok".to_string()),
                    ("rows".to_string(), "1".to_string()),
                    ("duration_us".to_string(), "1500".to_string()),
                ]
                .into(),
                principal: None,
                reasoning: None,
                ..ev("e3", 3, v1::AuditKind::CommandResult, "")
            },
        ],
    }]));
    bearer(&mut r, &sc);
    let mut acks = v1::audit_service_client::AuditServiceClient::new(e.channel.clone())
        .report(r)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().acked_ids.len(), 3);

    let hold = |rid: &str| {
        let mut r = tonic::Request::new(v1::ApprovalRequest {
            request_id: rid.into(),
            session_id: "sess-42".into(),
            connection: "orders-db".into(),
            principal: Some(bot.clone()),
            command: Some(v1::Command {
                text: "UPDATE carts SET state = 'stale'".into(),
                classification: Some(v1::Classification {
                    kind: "update".into(),
                    risk: 35,
                    ..Default::default()
                }),
            }),
            decision: Some(v1::DecisionInfo {
                effect: v1::Effect::Review as i32,
                rule: "writes".into(),
                reason: String::new(),
                review: Some(v1::ReviewSpec {
                    approver_groups: vec!["dba-leads".into()],
                    quorum: 1,
                    one_per_group: false,
                    timeout_seconds: 30,
                    reuse_seconds: 0,
                }),
            }),
            reasoning: Some(v1::ReasoningTrace {
                reasoning: "nightly cleanup of stale carts".into(),
                ..Default::default()
            }),
        });
        bearer(&mut r, &sc);
        r
    };
    let mut gate =
        v1::approval_gate_service_client::ApprovalGateServiceClient::new(e.channel.clone());
    let mut first = gate
        .request_approval(hold("r1"))
        .await
        .unwrap()
        .into_inner();
    let id1 = first.next().await.unwrap().unwrap().approval_id;
    let mut second = gate
        .request_approval(hold("r2"))
        .await
        .unwrap()
        .into_inner();
    let id2 = second.next().await.unwrap().unwrap().approval_id;

    let listed = ok(&e
        .wicket(Some(&admin), &["approvals", "list", "-o", "json"])
        .await);
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(
        v[0]["reasoning"]["reasoning"],
        "nightly cleanup of stale carts"
    );
    assert_eq!(v[0]["decision"]["rule"], "writes");
    assert_eq!(v[0]["command"]["risk"], 35);
    let table = ok(&e.wicket(Some(&admin), &["approvals", "list"]).await);
    assert!(
        table.contains("UPDATE carts") && table.contains("nightly cleanup"),
        "{table}"
    );

    let approver = e.idp.mint(&TokenSpec::human(
        "lead",
        &["wicket-approvers", "dba-leads"],
    ));
    let out = ok(&e
        .wicket(
            Some(&approver),
            &["approvals", "approve", &id1, "--comment", "fine"],
        )
        .await);
    assert!(out.contains("approved"), "{out}");
    assert_eq!(
        first.next().await.unwrap().unwrap().state,
        v1::ApprovalState::Approved as i32
    );
    let out = ok(&e
        .wicket(
            Some(&approver),
            &["approvals", "deny", &id2, "--reason", "not tonight"],
        )
        .await);
    assert!(out.contains("not tonight"), "{out}");
    let denied = second.next().await.unwrap().unwrap();
    assert_eq!(
        (denied.state, denied.reason.as_str()),
        (v1::ApprovalState::Denied as i32, "not tonight")
    );
    // Deciding twice is refused.
    let out = e
        .wicket(Some(&approver), &["approvals", "approve", &id2])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("already denied"));

    let sessions = ok(&e
        .wicket(Some(&admin), &["sessions", "list", "-o", "json"])
        .await);
    let v: serde_json::Value = serde_json::from_str(&sessions).unwrap();
    assert_eq!(v[0]["id"], "sess-42");
    assert_eq!(v[0]["commands"], 1);
    let show = ok(&e
        .wicket(Some(&admin), &["sessions", "show", "sess-42"])
        .await);
    assert!(
        show.contains("SELECT count(*) FROM carts") && show.contains("nightly cleanup"),
        "{show}"
    );
    // The result sits on its command's row.
    let row = show
        .lines()
        .find(|l| l.contains("SELECT count(*)"))
        .unwrap();
    assert!(row.contains("ok, 1 rows, 1.5 ms"), "{show}");
    assert!(!show.contains("command_result"), "{show}");
    // The recording as JSON Lines: one event per line, in order.
    let jsonl = ok(&e
        .wicket(
            Some(&admin),
            &["sessions", "show", "sess-42", "-o", "jsonl"],
        )
        .await);
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines
            .iter()
            .map(|l| l["kind"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["session_start", "command", "command_result"]
    );
    assert_eq!(lines[2]["details"]["rows"], "1");
    assert_eq!(lines[1]["session_id"], "sess-42");
    let show = ok(&e
        .wicket(Some(&admin), &["sessions", "show", "sess-42", "-o", "json"])
        .await);
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 3);
    let out = e.wicket(Some(&admin), &["sessions", "show", "nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    let _ = Path::new("");
}

/// `wicket access request` waits for approvers and prints the grant's end;
/// `wicket access list` shows it; limits and `approve --for` answer clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_requests_from_the_cli() {
    let e = std::sync::Arc::new(start().await);
    let admin = e.admin();
    let doc = format!(
        "{POLICY}access:\n  - id: oncall\n    connections: [orders-db]\n    groups: [oncall]\n    review: {{approvers: [dba-leads]}}\n    max: 1h\n"
    );
    std::fs::write(e.dir.path().join("jit.yaml"), doc).unwrap();
    ok(&e
        .wicket(Some(&admin), &["policy", "apply", "-f", "jit.yaml"])
        .await);
    let olga = e.idp.mint(&TokenSpec::human("olga", &["oncall"]));
    let lead = e.idp.mint(&TokenSpec::human(
        "lead",
        &["wicket-approvers", "dba-leads"],
    ));
    let ask = |dur: &str| {
        [
            "access",
            "request",
            "--connection",
            "orders-db",
            "--for",
            dur,
            "--reason",
            "incident 9",
        ]
        .map(String::from)
    };
    let args = ask("2h");
    let o = e
        .wicket(
            Some(&olga),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("at most 1 h"), "{:?}", text(&o));

    let waiting = {
        let (e, olga) = (e.clone(), olga.clone());
        tokio::spawn(async move {
            let args = ask("30m");
            e.wicket(
                Some(&olga),
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
            .await
        })
    };
    let id = loop {
        let listed = ok(&e
            .wicket(Some(&lead), &["approvals", "list", "-o", "json"])
            .await);
        let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
        if let Some(a) = v.as_array().unwrap().first() {
            assert_eq!(a["command"]["text"], "access to orders-db for 30 min");
            break a["id"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // An access approval covers itself only.
    let o = e
        .wicket(Some(&lead), &["approvals", "approve", &id, "--for", "10m"])
        .await;
    assert!(text(&o).1.contains("one execution only"), "{:?}", text(&o));
    ok(&e.wicket(Some(&lead), &["approvals", "approve", &id]).await);
    let o = waiting.await.unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("waiting for approval") && err.contains("oncall"),
        "{err}"
    );
    assert!(out.contains("until"), "{out}");
    let listed = ok(&e
        .wicket(Some(&olga), &["access", "list", "-o", "json"])
        .await);
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(v[0]["connection"], "orders-db");
    assert_eq!(v[0]["reason"], "incident 9");
    let o = e
        .wicket(Some(&olga), &["approvals", "approve", &id, "--for", "soon"])
        .await;
    assert_eq!(o.status.code(), Some(2), "a bad duration is a usage error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_login_writes_a_certificate_signed_by_the_control_ca() {
    let e = start().await;
    let token = e.idp.mint(&TokenSpec {
        ttl_seconds: 600,
        ..TokenSpec::human("ada", &["dba"])
    });
    let key = e.dir.path().join("ssh/id_ed25519");
    let key_arg = key.display().to_string();
    let o = e
        .wicket(
            Some(&token),
            &["ssh", "login", "--key", &key_arg, "-o", "json"],
        )
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cert = e.dir.path().join("ssh/id_ed25519-cert.pub");
    assert_eq!(out["certificate"], cert.display().to_string());
    // OpenSSH's own tool reads it: a user certificate for ada, with her
    // principal, valid no longer than her token.
    let listed = std::process::Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(&cert)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{text}");
    assert!(text.contains("user certificate"), "{text}");
    assert!(text.contains("wicket-principal@wicket.dev"), "{text}");
    assert!(text.contains("ada"), "{text}");
    let ca = out["ca_public_key"].as_str().unwrap();
    assert!(ca.starts_with("ssh-ed25519 "), "{ca}");
    assert!(
        text.contains(&ca.split_whitespace().nth(1).unwrap()[..20])
            || text.contains("ED25519-CERT"),
        "{text}"
    );
    // The key stays private; a second login reuses it.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o077,
        0
    );
    let before = std::fs::read(&key).unwrap();
    let o = e
        .wicket(Some(&token), &["ssh", "login", "--key", &key_arg])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&key).unwrap(), before);
    // Without a token: a clear refusal.
    let o = e
        .wicket(Some("not-a-token"), &["ssh", "login", "--key", &key_arg])
        .await;
    assert!(!o.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_recording_writes_an_asciicast_file() {
    let e = start().await;
    let admin = e.admin();
    let apply = e
        .wicket(Some(&admin), &["policy", "apply", "-f", "policy.yaml"])
        .await;
    assert!(
        apply.status.success(),
        "{}",
        String::from_utf8_lossy(&apply.stderr)
    );
    let sc = e.sidecar_token().await;
    let now = wicket_proto::convert::ts(chrono::Utc::now());
    let ev = |id: &str, seq, kind: v1::AuditKind, details: &[(&str, &str)]| v1::AuditEvent {
        id: id.into(),
        session_id: "sess-tty".into(),
        seq,
        time: Some(now),
        kind: kind as i32,
        connection: "orders-db".into(),
        principal: (seq == 1).then(|| v1::Principal {
            subject: "ada".into(),
            issuer: e.idp.issuer(),
            ..Default::default()
        }),
        details: details
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let header = r#"{"version":2,"width":80,"height":24,"env":{"TERM":"xterm"}}"#;
    let mut r = tonic::Request::new(tokio_stream::iter(vec![v1::ReportRequest {
        events: vec![
            ev("r1", 1, v1::AuditKind::SessionStart, &[]),
            ev(
                "r2",
                2,
                v1::AuditKind::Output,
                &[("channel", "0"), ("asciicast_header", header)],
            ),
            ev(
                "r3",
                3,
                v1::AuditKind::Output,
                &[
                    ("channel", "0"),
                    ("asciicast", "[0.1,\"o\",\"$ \"]\n[0.5,\"i\",\"ls\\r\"]\n"),
                ],
            ),
            ev(
                "r4",
                4,
                v1::AuditKind::Output,
                &[
                    ("channel", "0"),
                    ("asciicast", "[0.6,\"o\",\"ls\\r\\nnotes.txt\\r\\n\"]\n"),
                ],
            ),
        ],
    }]));
    bearer(&mut r, &sc);
    let mut acks = v1::audit_service_client::AuditServiceClient::new(e.channel.clone())
        .report(r)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().acked_ids.len(), 4);
    let cast = e.dir.path().join("s.cast");
    let cast_arg = cast.display().to_string();
    let o = e
        .wicket(
            Some(&admin),
            &["sessions", "recording", "sess-tty", "--out", &cast_arg],
        )
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&cast).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(lines[0], header);
    for l in &lines[1..] {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v[0].is_f64() && v[1].is_string() && v[2].is_string(), "{l}");
    }
    assert!(text.contains("notes.txt"));
    // A session without a recording says so.
    let o = e
        .wicket(Some(&admin), &["sessions", "recording", "no-such-session"])
        .await;
    assert!(!o.status.success());
}

/// Reports a session of `n` events through the sidecar audit API: a start,
/// commands `SELECT 2`…, and an end when `ended`; event ids are `{p}1`….
async fn report_session(e: &Env, sc: &str, session: &str, p: &str, n: u64, ended: bool) {
    let now = chrono::Utc::now();
    let events = (1..=n)
        .map(|seq| {
            let kind = match seq {
                1 => v1::AuditKind::SessionStart,
                s if s == n && ended => v1::AuditKind::SessionEnd,
                _ => v1::AuditKind::Command,
            };
            v1::AuditEvent {
                id: format!("{p}{seq}"),
                session_id: session.into(),
                seq,
                time: Some(wicket_proto::convert::ts(
                    now + chrono::Duration::milliseconds(seq as i64),
                )),
                kind: kind as i32,
                connection: "orders-db".into(),
                principal: Some(v1::Principal {
                    subject: "ada".into(),
                    issuer: e.idp.issuer(),
                    ..Default::default()
                }),
                command: (kind == v1::AuditKind::Command).then(|| v1::Command {
                    text: format!("SELECT {seq}"),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    let mut r = tonic::Request::new(tokio_stream::iter(vec![v1::ReportRequest { events }]));
    bearer(&mut r, sc);
    let mut acks = v1::audit_service_client::AuditServiceClient::new(e.channel.clone())
        .report(r)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        acks.next().await.unwrap().unwrap().acked_ids.len() as u64,
        n
    );
}

/// Runs SQL against the control service's database (the tampering).
async fn tamper(db: &str, sql: &[&str]) {
    use sqlx::Connection as _;
    if db.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(db).await.unwrap();
        for q in sql {
            sqlx::query(q).execute(&mut c).await.unwrap();
        }
    } else {
        let mut c = sqlx::PgConnection::connect(db).await.unwrap();
        for q in sql {
            sqlx::query(q).execute(&mut c).await.unwrap();
        }
    }
}

/// Reports a terminal session: a start, its recording's header and two
/// output events (one batch, so one chunk), an end; ids `{p}1`…`{p}5`.
async fn report_terminal(e: &Env, sc: &str, session: &str, p: &str) {
    let now = wicket_proto::convert::ts(chrono::Utc::now());
    let ev = |n: u64, kind: v1::AuditKind, details: &[(&str, &str)]| v1::AuditEvent {
        id: format!("{p}{n}"),
        session_id: session.into(),
        seq: n,
        time: Some(now),
        kind: kind as i32,
        connection: "orders-db".into(),
        principal: Some(v1::Principal {
            subject: "ada".into(),
            issuer: e.idp.issuer(),
            ..Default::default()
        }),
        details: details
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let header = r#"{"version":2,"width":80,"height":24}"#;
    let events = vec![
        ev(1, v1::AuditKind::SessionStart, &[]),
        ev(
            2,
            v1::AuditKind::Output,
            &[
                ("channel", "0"),
                ("asciicast_header", header),
                ("asciicast", "[0.1,\"o\",\"$ \"]\n"),
            ],
        ),
        ev(
            3,
            v1::AuditKind::Output,
            &[
                ("channel", "0"),
                ("asciicast", "[0.5,\"o\",\"ls\\r\\nnotes.txt\\r\\n\"]\n"),
            ],
        ),
        ev(4, v1::AuditKind::SessionEnd, &[]),
    ];
    let mut r = tonic::Request::new(tokio_stream::iter(vec![v1::ReportRequest { events }]));
    bearer(&mut r, sc);
    let mut acks = v1::audit_service_client::AuditServiceClient::new(e.channel.clone())
        .report(r)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().acked_ids.len(), 4);
}

/// Recomputes the stored chain of `session` from `from` on, after
/// changing those events' bodies: what a database writer can do, but not
/// sign. Reads the chain as the verifier does, writes with SQL.
async fn rewrite_tail(e: &Env, db: &str, session: &str, from: usize) {
    let mut r = tonic::Request::new(v1::GetAuditChainRequest {
        session_id: session.into(),
        after_index: 0,
        limit: 0,
    });
    bearer(&mut r, &e.admin());
    let chain = v1::audit_admin_service_client::AuditAdminServiceClient::new(e.channel.clone())
        .get_audit_chain(r)
        .await
        .unwrap()
        .into_inner()
        .events;
    let mut prev: [u8; 32] = chain[from - 2].hash.clone().try_into().unwrap();
    let mut updates = Vec::new();
    for ev in &chain[from - 1..] {
        let body = ev.body.replace("SELECT", "select");
        prev = wicket_core::evidence::link(&prev, ev.index, body.as_bytes());
        let hex: String = prev.iter().map(|b| format!("{b:02x}")).collect();
        let blob = if db.starts_with("sqlite:") {
            format!("X'{hex}'")
        } else {
            format!("'\\x{hex}'::bytea")
        };
        updates.push(format!(
            "UPDATE events SET body = '{}', hash = {blob} WHERE id = '{}'",
            body.replace('\'', "''"),
            ev.id
        ));
    }
    let refs: Vec<&str> = updates.iter().map(String::as_str).collect();
    tamper(db, &refs).await;
}

/// The tamper-evidence walk on one backend: intact records verify; each
/// kind of tampering is named.
async fn audit_verify_on(database: Option<String>) {
    let e = start_on(database.clone()).await;
    let db = database.unwrap_or_else(|| format!("sqlite:{}", e.dir.path().join("w.db").display()));
    let admin = e.admin();
    ok(&e
        .wicket(Some(&admin), &["policy", "apply", "-f", "policy.yaml"])
        .await);
    let sc = e.sidecar_token().await;
    for (session, p) in [
        ("s-intact", "i"),
        ("s-change", "c"),
        ("s-remove", "r"),
        ("s-move", "m"),
        ("s-rewrite", "w"),
        ("s-gone", "g"),
    ] {
        report_session(&e, &sc, session, p, 6, true).await;
    }
    report_session(&e, &sc, "s-live", "l", 3, false).await;
    for (session, p) in [("s-tty1", "t"), ("s-tty2", "u")] {
        report_terminal(&e, &sc, session, p).await;
    }

    // Sealed at its end; a live session is not sealed yet.
    let out = ok(&e
        .wicket(Some(&admin), &["audit", "verify", "s-intact"])
        .await);
    assert!(
        out.contains("intact") && out.contains("sealed at 6 events"),
        "{out}"
    );
    let out = ok(&e.wicket(Some(&admin), &["audit", "verify", "s-live"]).await);
    assert!(out.contains("not sealed yet"), "{out}");
    // A root covers every session, the live one included.
    let out = ok(&e.wicket(Some(&admin), &["audit", "root"]).await);
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.split_whitespace().nth(4) == Some("9")),
        "{out}"
    );
    let out = ok(&e.wicket(Some(&admin), &["audit", "verify", "s-live"]).await);
    assert!(out.contains("a root vouches for 3 events"), "{out}");
    // With the pinned key, everything verifies.
    let key = ok(&e.wicket(Some(&admin), &["audit", "key"]).await);
    assert!(key.starts_with("ssh-ed25519 "), "{key}");
    std::fs::write(e.dir.path().join("audit.pub"), &key).unwrap();
    let out = ok(&e
        .wicket(
            Some(&admin),
            &["audit", "verify", "--all", "--public-key", "audit.pub"],
        )
        .await);
    assert_eq!(out.matches(" intact ").count(), 9, "{out}");
    // The recordings were chunked out of the events, and play back.
    let rec = ok(&e
        .wicket(Some(&admin), &["sessions", "recording", "s-tty1"])
        .await);
    assert!(rec.contains("notes.txt"), "{rec}");
    let chunk = e.dir.path().join("recordings/s-tty1/0/t2.cast.zst");
    assert!(chunk.is_file());
    // A key that is not the audit key proves nothing.
    std::fs::write(
        e.dir.path().join("other.pub"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
    )
    .unwrap();
    let o = e
        .wicket(
            Some(&admin),
            &["audit", "verify", "s-intact", "--public-key", "other.pub"],
        )
        .await;
    assert_eq!(o.status.code(), Some(5), "{}", text(&o).0);

    // Each kind of tampering, named.
    tamper(
        &db,
        &["UPDATE events SET body = replace(body, 'SELECT 3', 'SELECT 33') WHERE id = 'c3'"],
    )
    .await;
    tamper(&db, &["DELETE FROM events WHERE id = 'r4'"]).await;
    tamper(
        &db,
        &["UPDATE events SET chain_index = CASE id WHEN 'm2' THEN 5 ELSE 2 END WHERE id IN ('m2', 'm5')"],
    )
    .await;
    rewrite_tail(&e, &db, "s-rewrite", 4).await;
    let verify = |s: &'static str| {
        let e = &e;
        let admin = admin.clone();
        async move {
            let o = e.wicket(Some(&admin), &["audit", "verify", s]).await;
            assert_eq!(o.status.code(), Some(5), "{s}: {:?}", text(&o));
            text(&o).0
        }
    };
    let out = verify("s-change").await;
    assert!(
        out.contains("TAMPERED") && out.contains("event #3 (c3) was changed"),
        "{out}"
    );
    let out = verify("s-remove").await;
    assert!(out.contains("event #4 was removed"), "{out}");
    let out = verify("s-move").await;
    assert!(
        out.contains("event #2 (m5) was moved: it was recorded as #5"),
        "{out}"
    );
    std::fs::write(&chunk, b"not what was recorded").unwrap();
    let out = verify("s-tty1").await;
    assert!(
        out.contains("the recording of event #2 (t2) was changed"),
        "{out}"
    );
    std::fs::remove_file(e.dir.path().join("recordings/s-tty2/0/u2.cast.zst")).unwrap();
    let out = verify("s-tty2").await;
    assert!(
        out.contains("the recording of event #2 (u2) was removed"),
        "{out}"
    );
    // Playing it says so rather than leaving a silent hole.
    let o = e
        .wicket(Some(&admin), &["sessions", "recording", "s-tty2"])
        .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o)
            .1
            .contains("event u2: the recording chunk is missing"),
        "{:?}",
        text(&o)
    );
    let out = verify("s-rewrite").await;
    assert!(out.contains("rewritten with recomputed hashes"), "{out}");
    // The intact ones still are.
    ok(&e
        .wicket(Some(&admin), &["audit", "verify", "s-intact"])
        .await);

    // A whole session removed: the root still names it.
    tamper(
        &db,
        &[
            "DELETE FROM events WHERE session_id = 's-gone'",
            "DELETE FROM audit_seals WHERE session_id = 's-gone'",
            "DELETE FROM sessions WHERE id = 's-gone'",
        ],
    )
    .await;
    let o = e.wicket(Some(&admin), &["audit", "verify", "--all"]).await;
    assert_eq!(o.status.code(), Some(5));
    let out = text(&o).0;
    assert!(
        out.contains("s-gone     TAMPERED  0       events #1 to #6 were removed"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().take(2).eq(["s-intact", "intact"])),
        "{out}"
    );
    // And hiding that by editing the root's list breaks the root.
    tamper(
        &db,
        &["DELETE FROM audit_root_leaves WHERE session_id = 's-gone'"],
    )
    .await;
    let o = e.wicket(Some(&admin), &["audit", "verify", "--all"]).await;
    assert_eq!(o.status.code(), Some(5));
    let out = text(&o).0;
    assert!(
        out.contains("root #1 names 9 sessions but 8 are stored"),
        "{out}"
    );
    // Auditors may read the trail; only admins sign roots on demand.
    let approver = e.idp.mint(&TokenSpec::human("ann", &["wicket-auditors"]));
    let o = e.wicket(Some(&approver), &["audit", "root"]).await;
    assert_eq!(o.status.code(), Some(3), "{:?}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_tampered_events_on_sqlite() {
    audit_verify_on(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_tampered_events_on_postgres() {
    use sqlx::Connection as _;
    let name = format!("audit_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&wicket_testkit::env::postgres_url())
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    audit_verify_on(Some(wicket_testkit::env::postgres_database_url(&name))).await;
}

/// `wicket sessions replay` plays terminal sessions at their pace (speed,
/// idle pauses cut), exports asciicast, prints other sessions as a
/// timeline; `wicket sessions search` finds events by text, principal,
/// connection, decision and time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_search_from_the_cli() {
    let e = start().await;
    let admin = e.admin();
    ok(&e
        .wicket(Some(&admin), &["policy", "apply", "-f", "policy.yaml"])
        .await);
    let sc = e.sidecar_token().await;
    let t0 = chrono::Utc::now() - chrono::Duration::seconds(60);
    let at = |ms: i64| {
        Some(wicket_proto::convert::ts(
            t0 + chrono::Duration::milliseconds(ms),
        ))
    };
    let bot = v1::Principal {
        subject: "bot".into(),
        issuer: e.idp.issuer(),
        kind: v1::PrincipalKind::Agent as i32,
        display_name: "Nightly Bot".into(),
        ..Default::default()
    };
    let base = |id: &str, session: &str, seq: u64, kind: v1::AuditKind| v1::AuditEvent {
        id: id.into(),
        session_id: session.into(),
        seq,
        time: at(seq as i64 * 1000),
        kind: kind as i32,
        connection: "orders-db".into(),
        principal: Some(bot.clone()),
        client_app: "psql".into(),
        ..Default::default()
    };
    let command = |id: &str, seq: u64, text: &str, effect: v1::Effect, rule: &str| v1::AuditEvent {
        command: Some(v1::Command {
            text: text.into(),
            classification: None,
        }),
        decision: Some(v1::DecisionInfo {
            effect: effect as i32,
            rule: rule.into(),
            ..Default::default()
        }),
        reasoning: Some(v1::ReasoningTrace {
            reasoning: "nightly cleanup of stale carts".into(),
            ..Default::default()
        }),
        ..base(id, "sess-q", seq, v1::AuditKind::Command)
    };
    let header = r#"{"version":2,"width":80,"height":24}"#;
    let output = |id: &str, seq: u64, details: &[(&str, &str)]| v1::AuditEvent {
        details: details
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..base(id, "sess-t", seq, v1::AuditKind::Output)
    };
    let events = vec![
        base("q1", "sess-q", 1, v1::AuditKind::SessionStart),
        command(
            "q2",
            2,
            "SELECT count(*) FROM carts",
            v1::Effect::Allow,
            "reads",
        ),
        v1::AuditEvent {
            details: [
                ("command_id".to_string(), "q2".to_string()),
                ("status".to_string(), "ok".to_string()),
                ("rows".to_string(), "1".to_string()),
            ]
            .into(),
            ..base("q3", "sess-q", 3, v1::AuditKind::CommandResult)
        },
        v1::AuditEvent {
            details: [
                ("approval".to_string(), "apr-7".to_string()),
                ("approval_outcome".to_string(), "approved".to_string()),
            ]
            .into(),
            ..command(
                "q4",
                4,
                "UPDATE carts SET state = 'stale'",
                v1::Effect::Allow,
                "writes",
            )
        },
        command("q5", 5, "DROP TABLE carts", v1::Effect::Deny, "no-ddl"),
        v1::AuditEvent {
            end_reason: "client_exit".into(),
            ..base("q6", "sess-q", 6, v1::AuditKind::SessionEnd)
        },
        base("t1", "sess-t", 1, v1::AuditKind::SessionStart),
        output("t2", 2, &[("channel", "0"), ("asciicast_header", header)]),
        // Output, then 30 s of nothing, then more output.
        output(
            "t3",
            3,
            &[
                ("channel", "0"),
                (
                    "asciicast",
                    "[0.1,\"o\",\"$ \"]\n[0.2,\"i\",\"ls\\r\"]\n[0.3,\"o\",\"ls\\r\\n\"]\n[30.3,\"o\",\"notes.txt\\r\\n\"]\n",
                ),
            ],
        ),
    ];
    let n = events.len();
    let mut r = tonic::Request::new(tokio_stream::iter(vec![v1::ReportRequest { events }]));
    bearer(&mut r, &sc);
    let mut acks = v1::audit_service_client::AuditServiceClient::new(e.channel.clone())
        .report(r)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().acked_ids.len(), n);

    // The terminal session plays what was shown (not what was typed), with
    // the 30 s pause cut to the idle limit and scaled by the speed.
    let timed = |args: &'static [&'static str]| {
        let e = &e;
        let admin = admin.clone();
        async move {
            let started = std::time::Instant::now();
            let out = ok(&e.wicket(Some(&admin), args).await);
            (out, started.elapsed().as_secs_f64())
        }
    };
    let (out, secs) = timed(&["sessions", "replay", "sess-t"]).await;
    assert_eq!(out, "$ ls\r\nnotes.txt\r\n");
    assert!(
        (2.2..6.0).contains(&secs),
        "0.3 s + the 2 s idle limit, took {secs}"
    );
    let (_, secs) = timed(&["sessions", "replay", "sess-t", "--speed", "4"]).await;
    assert!((0.55..2.0).contains(&secs), "2.3 s at 4x, took {secs}");
    let (_, secs) = timed(&[
        "sessions",
        "replay",
        "sess-t",
        "--idle-limit",
        "0",
        "--speed",
        "20",
    ])
    .await;
    assert!((1.5..4.0).contains(&secs), "30.3 s at 20x, took {secs}");
    let (cast, _) = timed(&["sessions", "replay", "sess-t", "--format", "asciicast"]).await;
    assert!(
        cast.starts_with(header) && cast.contains("[30.3,\"o\",\"notes.txt\\r\\n\"]"),
        "{cast}"
    );
    let o = e
        .wicket(
            Some(&admin),
            &["sessions", "replay", "sess-t", "--speed", "0"],
        )
        .await;
    assert_eq!(o.status.code(), Some(2));

    // The query session is a timeline: offsets, decisions and rules,
    // approvals, results, the reasoning once.
    let out = ok(&e
        .wicket(Some(&admin), &["sessions", "replay", "sess-q"])
        .await);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("sess-q") && lines[0].contains("Nightly Bot"),
        "{out}"
    );
    assert!(lines[1].starts_with("+    0.000s  session start"), "{out}");
    assert!(
        lines[2]
            .starts_with("+    1.000s  allow (reads)  SELECT count(*) FROM carts  → ok, 1 rows"),
        "{out}"
    );
    assert!(
        lines[3].trim() == "reasoning: nightly cleanup of stale carts",
        "{out}"
    );
    assert!(
        lines[4].contains(
            "allow (writes)  UPDATE carts SET state = 'stale'  [approval apr-7: approved]"
        ),
        "{out}"
    );
    assert!(
        lines[5].contains("deny (no-ddl)  DROP TABLE carts"),
        "{out}"
    );
    assert!(
        lines[6].starts_with("+    5.000s  session end (client_exit)"),
        "{out}"
    );
    assert_eq!(out.matches("reasoning:").count(), 1, "{out}");
    let o = e
        .wicket(
            Some(&admin),
            &["sessions", "replay", "sess-q", "--format", "terminal"],
        )
        .await;
    assert!(
        text(&o).1.contains("no terminal recording"),
        "{:?}",
        text(&o)
    );
    let json = ok(&e
        .wicket(
            Some(&admin),
            &["sessions", "replay", "sess-q", "-o", "json"],
        )
        .await);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[2]["approval_outcome"], "approved");
    assert_eq!(v[1]["result"], "ok, 1 rows");

    // Search.
    let ids = |args: &[&str]| {
        let mut a: Vec<String> = ["sessions", "search", "-o", "json"]
            .map(String::from)
            .to_vec();
        a.extend(args.iter().map(|s| s.to_string()));
        let e = &e;
        let admin = admin.clone();
        async move {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let out = ok(&e.wicket(Some(&admin), &a).await);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ids(&["CARTS"]).await, ["q5", "q4", "q2"]);
    assert_eq!(ids(&["--decision", "deny"]).await, ["q5"]);
    assert_eq!(ids(&["--decision", "approved"]).await, ["q4"]);
    assert_eq!(
        ids(&["carts", "--principal", "Nightly Bot"]).await,
        ["q5", "q4", "q2"]
    );
    assert!(ids(&["carts", "--principal", "someone"]).await.is_empty());
    assert!(ids(&["carts", "--connection", "other-db"]).await.is_empty());
    assert_eq!(
        ids(&["carts", "--since", "2h", "--until", "1s"])
            .await
            .len(),
        3
    );
    assert!(ids(&["carts", "--until", "2h"]).await.is_empty());
    assert_eq!(ids(&["--limit", "2"]).await.len(), 2);
    let table = ok(&e
        .wicket(Some(&admin), &["sessions", "search", "DROP"])
        .await);
    assert!(
        table.contains("sess-q") && table.contains("deny (no-ddl)"),
        "{table}"
    );
    let o = e
        .wicket(
            Some(&admin),
            &["sessions", "search", "--since", "last tuesday"],
        )
        .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("RFC 3339"), "{:?}", text(&o));
}

/// Retention deletes the ended sessions of a connection after its days,
/// with their recordings, but not those on legal hold; each deletion is
/// signed, so `audit verify --all` accepts it, and a session removed
/// without one is still caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_sessions_except_held_ones_and_verify_accepts_it() {
    let e = start().await;
    let admin = e.admin();
    let doc = POLICY.replace(
        "    labels: {env: prod}\n",
        "    labels: {env: prod}\n    recording: {retention_days: 1}\n",
    );
    std::fs::write(e.dir.path().join("retain.yaml"), doc).unwrap();
    ok(&e
        .wicket(Some(&admin), &["policy", "apply", "-f", "retain.yaml"])
        .await);
    let sc = e.sidecar_token().await;
    // Two sessions that ended three days ago (one with a recording), one today.
    let old = chrono::Utc::now() - chrono::Duration::days(3);
    for (session, p) in [("s-old1", "a"), ("s-old2", "b")] {
        let events: Vec<v1::AuditEvent> = (1..=3u64)
            .map(|seq| v1::AuditEvent {
                id: format!("{p}{seq}"),
                session_id: session.into(),
                seq,
                time: Some(wicket_proto::convert::ts(old)),
                kind: match seq {
                    1 => v1::AuditKind::SessionStart,
                    2 => v1::AuditKind::Output,
                    _ => v1::AuditKind::SessionEnd,
                } as i32,
                connection: "orders-db".into(),
                principal: Some(v1::Principal {
                    subject: "ada".into(),
                    issuer: e.idp.issuer(),
                    ..Default::default()
                }),
                details: if seq == 2 {
                    [
                        ("channel".to_string(), "0".to_string()),
                        (
                            "asciicast_header".to_string(),
                            r#"{"version":2,"width":80,"height":24}"#.to_string(),
                        ),
                        ("asciicast".to_string(), "[0.1,\"o\",\"old\"]\n".to_string()),
                    ]
                    .into()
                } else {
                    Default::default()
                },
                ..Default::default()
            })
            .collect();
        let mut r = tonic::Request::new(tokio_stream::iter(vec![v1::ReportRequest { events }]));
        bearer(&mut r, &sc);
        let mut acks = v1::audit_service_client::AuditServiceClient::new(e.channel.clone())
            .report(r)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(acks.next().await.unwrap().unwrap().acked_ids.len(), 3);
    }
    report_session(&e, &sc, "s-new", "n", 3, true).await;
    ok(&e.wicket(Some(&admin), &["audit", "root"]).await);
    assert!(e.dir.path().join("recordings/s-old1").is_dir());

    // A legal hold keeps s-old2; holding needs a reason and an admin.
    let o = e
        .wicket(
            Some(&admin),
            &["sessions", "hold", "s-old2", "--reason", " "],
        )
        .await;
    assert_eq!(o.status.code(), Some(2));
    let auditor = e.idp.mint(&TokenSpec::human("audra", &["wicket-auditors"]));
    let o = e
        .wicket(
            Some(&auditor),
            &["sessions", "hold", "s-old2", "--reason", "x"],
        )
        .await;
    assert_eq!(o.status.code(), Some(3));
    let o = e
        .wicket(
            Some(&admin),
            &["sessions", "hold", "s-old2", "--reason", "case 42"],
        )
        .await;
    assert!(text(&o).1.contains("held: case 42"), "{:?}", text(&o));
    let show = ok(&e
        .wicket(Some(&admin), &["sessions", "show", "s-old2"])
        .await);
    assert!(show.contains("legal hold  case 42"), "{show}");

    let out = ok(&e.wicket(Some(&admin), &["audit", "retention"]).await);
    assert_eq!(out.trim(), "deleted s-old1");
    let o = e
        .wicket(Some(&admin), &["sessions", "show", "s-old1"])
        .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(!e.dir.path().join("recordings/s-old1").exists());
    assert!(e.dir.path().join("recordings/s-old2").is_dir());
    ok(&e.wicket(Some(&admin), &["sessions", "show", "s-new"]).await);
    let out = ok(&e.wicket(Some(&admin), &["audit", "retention"]).await);
    assert_eq!(out.trim(), "No session is past its retention.");

    // The deletion is signed: verification accepts it.
    let out = ok(&e.wicket(Some(&admin), &["audit", "verify", "--all"]).await);
    let line = out.lines().find(|l| l.starts_with("s-old1")).unwrap();
    assert!(
        line.contains("deleted") && line.contains("retention: 1 days on orders-db"),
        "{out}"
    );
    let out = ok(&e.wicket(Some(&admin), &["audit", "verify", "s-old1"]).await);
    assert!(out.contains("deleted"), "{out}");

    // Released, it goes at the next pass.
    let o = e
        .wicket(Some(&admin), &["sessions", "release", "s-old2"])
        .await;
    assert!(text(&o).1.contains("released"), "{:?}", text(&o));
    let out = ok(&e.wicket(Some(&admin), &["audit", "retention"]).await);
    assert_eq!(out.trim(), "deleted s-old2");

    // Removing the deletion record leaves a session gone without a word.
    tamper(
        &format!("sqlite:{}", e.dir.path().join("w.db").display()),
        &["DELETE FROM audit_deletions WHERE session_id = 's-old1'"],
    )
    .await;
    let o = e.wicket(Some(&admin), &["audit", "verify", "--all"]).await;
    assert_eq!(o.status.code(), Some(5));
    assert!(text(&o).0.contains("s-old1"), "{:?}", text(&o));
}
