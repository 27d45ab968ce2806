//! `wicket mcp` driven by a real MCP client (the official Python SDK, PyPI
//! `mcp`, in the test venv) against real binaries: the demo identity
//! provider, `wicket-control` with the demo policy, and `wicket-pg` in front
//! of the test PostgreSQL. Every call goes through the gate, so what the
//! agent gets back and what `wicket sessions show` records are the gate's.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Kill, bin, root, wait_port};
use serde_json::Value;
use wicket_testkit::sshd::{Sshd, keygen};
use wicket_testkit::{env, free_port};

fn psql(url: &str, sql: &str) {
    let o = Command::new("psql")
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-q", "-d", url, "-c", sql])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn token(env_file: &Path, name: &str) -> String {
    std::fs::read_to_string(env_file)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("export {name}='")))
        .unwrap_or_else(|| panic!("{name} not in {}", env_file.display()))
        .trim_end_matches('\'')
        .to_string()
}

/// The gates of the stack: binary, connection, credential id.
const GATES: [(&str, &str, &str); 4] = [
    ("wicket-pg", "demo-db", "mcp-pg"),
    ("wicket-http", "demo-api", "mcp-http"),
    ("wicket-k8s", "demo-cluster", "mcp-k8s"),
    ("wicket-ssh", "demo-host", "mcp-ssh"),
];

/// The demo's control service and PostgreSQL gate, on free ports.
struct Stack {
    _procs: Kill,
    _sshd: Sshd,
    _dir: tempfile::TempDir,
    control: String,
    gate: u16,
    http_gate: u16,
    k8s_gate: u16,
    kube_ca: PathBuf,
    ssh_gate: u16,
    ssh_user: String,
    ssh_known_hosts: PathBuf,
    db: String,
    agent: String,
    approver: String,
    admin: String,
}

fn start() -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Kill(Vec::new());
    // The database: the demo's sample data in a database of its own.
    let admin_url = env::postgres_url();
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let db = format!("mcp_{}_{n}", std::process::id());
    psql(&admin_url, &format!("DROP DATABASE IF EXISTS {db}"));
    psql(&admin_url, &format!("CREATE DATABASE {db}"));
    let mut db_url = url::Url::parse(&admin_url).unwrap();
    db_url.set_path(&db);
    psql(
        db_url.as_str(),
        &std::fs::read_to_string(root().join("deploy/demo/customers.sql")).unwrap(),
    );
    // The identity provider and its ready-made tokens.
    let idp_port = free_port();
    let env_file = dir.path().join("tokens.env");
    procs.0.push(
        Command::new(bin("wicket-demo-idp"))
            .args(["--listen", &format!("127.0.0.1:{idp_port}"), "--env-file"])
            .arg(&env_file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(idp_port, "wicket-demo-idp");
    let start = Instant::now();
    while !env_file.exists() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let issuer = format!("http://127.0.0.1:{idp_port}");
    // The control service, with the gate's credential provisioned by hash.
    let secret = format!("mcp-test-{}", std::process::id());
    let creds = dir.path().join("sidecars.json");
    std::fs::write(
        &creds,
        serde_json::json!({"sidecars": GATES.map(|(_, connection, id)| serde_json::json!(
            {"id": id, "name": id, "connections": [connection],
             "secret_sha256": sha256_hex(&secret)}))})
        .to_string(),
    )
    .unwrap();
    let control_port = free_port();
    let control = format!("http://127.0.0.1:{control_port}");
    procs.0.push(
        Command::new(bin("wicket-control"))
            .env("WICKET_LISTEN", format!("127.0.0.1:{control_port}"))
            .env(
                "WICKET_DATABASE_URL",
                format!("sqlite:{}", dir.path().join("w.db").display()),
            )
            .env("WICKET_OIDC_ISSUER", &issuer)
            .env("WICKET_POLICY_FILE", root().join("deploy/demo/policy.yaml"))
            .env("WICKET_SIDECAR_CREDENTIALS_FILE", &creds)
            .env("WICKET_AUDIT_ROOT_INTERVAL", "0")
            .env("WICKET_RETENTION_INTERVAL", "0")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(control_port, "wicket-control");
    // A gate of GATES, with what every gate needs.
    let gate_command = |binary: &str| {
        let (_, connection, id) = GATES.iter().find(|g| g.0 == binary).unwrap();
        let mut c = Command::new(bin(binary));
        c.env("WICKET_CONNECTION", connection)
            .env("WICKET_CONTROL", &control)
            .env("WICKET_SIDECAR_TOKEN", format!("wks_{id}_{secret}"))
            .env("WICKET_OIDC_ISSUER", &issuer)
            .env("WICKET_STATE_DIR", dir.path().join(format!("{id}-state")))
            .env("WICKET_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
            .stderr(Stdio::null());
        c
    };
    // The gate, logging in upstream as the test server's superuser.
    let pg = url::Url::parse(&admin_url).unwrap();
    let password = dir.path().join("upstream-password");
    std::fs::write(&password, pg.password().unwrap_or_default()).unwrap();
    let gate = free_port();
    procs.0.push(
        gate_command("wicket-pg")
            .env("WICKET_PG_LISTEN", format!("127.0.0.1:{gate}"))
            .env(
                "WICKET_PG_UPSTREAM",
                format!("{}:{}", pg.host_str().unwrap(), pg.port().unwrap()),
            )
            .env("WICKET_PG_UPSTREAM_USER", pg.username())
            .env("WICKET_PG_UPSTREAM_PASSWORD_FILE", &password)
            .env("WICKET_PG_ALLOW_CLEARTEXT_LOOPBACK", "true")
            .spawn()
            .unwrap(),
    );
    wait_port(gate, "wicket-pg");
    // The demo customer API behind wicket-http, with an API key only the
    // gate holds.
    let app = free_port();
    let key = dir.path().join("api-key");
    std::fs::write(&key, "demo-key-for-mcp").unwrap();
    procs.0.push(
        Command::new(bin("wicket-demo-app"))
            .args(["--listen", &format!("127.0.0.1:{app}"), "--api-key-file"])
            .arg(&key)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(app, "wicket-demo-app");
    let http_gate = free_port();
    procs.0.push(
        gate_command("wicket-http")
            .env("WICKET_HTTP_LISTEN", format!("127.0.0.1:{http_gate}"))
            .env("WICKET_HTTP_UPSTREAM", format!("http://127.0.0.1:{app}"))
            .env("WICKET_HTTP_UPSTREAM_HEADER", "X-Api-Key")
            .env("WICKET_HTTP_UPSTREAM_HEADER_FILE", &key)
            .spawn()
            .unwrap(),
    );
    wait_port(http_gate, "wicket-http");
    // The fake kube-apiserver behind wicket-k8s (it writes its CA, the
    // token it accepts and a certificate for the gate into `kdir`).
    let kdir = dir.path().join("kube");
    let apiserver = free_port();
    procs.0.push(
        Command::new(bin("wicket-fake-kube"))
            .args(["--listen", &format!("127.0.0.1:{apiserver}"), "--dir"])
            .arg(&kdir)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(apiserver, "wicket-fake-kube");
    let start = Instant::now();
    while !kdir.join("gate.key").exists() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let k8s_gate = free_port();
    procs.0.push(
        gate_command("wicket-k8s")
            .env("WICKET_K8S_LISTEN", format!("127.0.0.1:{k8s_gate}"))
            .env(
                "WICKET_K8S_UPSTREAM",
                format!("https://127.0.0.1:{apiserver}"),
            )
            .env("WICKET_K8S_UPSTREAM_CA", kdir.join("ca.crt"))
            .env("WICKET_K8S_UPSTREAM_TOKEN_FILE", kdir.join("token"))
            .env("WICKET_TLS_CERT", kdir.join("gate.crt"))
            .env("WICKET_TLS_KEY", kdir.join("gate.key"))
            .spawn()
            .unwrap(),
    );
    wait_port(k8s_gate, "wicket-k8s");
    // An OpenSSH server behind wicket-ssh; the gate's own host key is pinned
    // for the MCP client.
    let sdir = dir.path().join("ssh");
    std::fs::create_dir_all(&sdir).unwrap();
    let gate_key = sdir.join("gate_key");
    keygen(&gate_key);
    let sshd = Sshd::start(&sdir, &[&gate_key], "");
    let ssh_user = sshd.user.clone();
    let gate_host_key = sdir.join("gate_host_key");
    keygen(&gate_host_key);
    let ssh_gate = free_port();
    let ssh_known_hosts = sdir.join("gate_known_hosts");
    std::fs::write(
        &ssh_known_hosts,
        format!(
            "[127.0.0.1]:{ssh_gate} {}",
            std::fs::read_to_string(gate_host_key.with_extension("pub")).unwrap()
        ),
    )
    .unwrap();
    procs.0.push(
        gate_command("wicket-ssh")
            .env("WICKET_SSH_LISTEN", format!("127.0.0.1:{ssh_gate}"))
            .env("WICKET_SSH_UPSTREAM", sshd.addr())
            .env("WICKET_SSH_UPSTREAM_USER", &ssh_user)
            .env("WICKET_SSH_UPSTREAM_KEY_FILE", &gate_key)
            .env("WICKET_SSH_KNOWN_HOSTS", &sshd.known_hosts)
            .env("WICKET_SSH_HOST_KEY", &gate_host_key)
            .spawn()
            .unwrap(),
    );
    wait_port(ssh_gate, "wicket-ssh");
    Stack {
        ssh_gate,
        ssh_user,
        ssh_known_hosts,
        k8s_gate,
        kube_ca: kdir.join("ca.crt"),
        http_gate,
        _procs: procs,
        _sshd: sshd,
        control,
        gate,
        db,
        agent: token(&env_file, "WICKET_AGENT_TOKEN"),
        approver: token(&env_file, "WICKET_APPROVER_TOKEN"),
        admin: token(&env_file, "WICKET_ADMIN_TOKEN"),
        _dir: dir,
    }
}

fn sha256_hex(s: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn wicket(stack: &Stack, token: &str, args: &[&str]) -> String {
    let o = Command::new(bin("wicket"))
        .args(args)
        .env("WICKET_CONTROL", &stack.control)
        .env("WICKET_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "wicket {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn gates(s: &Stack) -> Vec<String> {
    vec![
        "--gate".into(),
        format!(
            "demo-db=postgresql://demo-agent@127.0.0.1:{}/{}",
            s.gate, s.db
        ),
        // A connection the agent has no grant on: not offered.
        "--gate".into(),
        format!(
            "payroll-db=postgresql://demo-agent@127.0.0.1:{}/{}",
            s.gate, s.db
        ),
        "--gate".into(),
        format!("demo-api=http://127.0.0.1:{}", s.http_gate),
        "--gate".into(),
        format!(
            "demo-host=ssh://{}@127.0.0.1:{}?known_hosts={}",
            s.ssh_user,
            s.ssh_gate,
            s.ssh_known_hosts.display()
        ),
        "--gate".into(),
        format!(
            "demo-cluster=k8s+https://127.0.0.1:{}?ca={}",
            s.k8s_gate,
            s.kube_ca.display()
        ),
    ]
}

/// The customers as the HTTP gate returns them to an agent: masked.
fn assert_masked_customers(http: &Value) {
    assert_eq!(http["isError"], false, "{http}");
    assert_eq!(http["structured"]["status"], 200, "{http}");
    let body = http["structured"]["body"].to_string();
    assert!(body.contains("Ada Lovelace"), "{body}");
    for secret in ["123-45-6789", "4111 1111 1111 1111", "ada@example.com"] {
        assert!(
            !body.contains(secret),
            "{secret} came back unmasked: {body}"
        );
    }
}

#[test]
fn an_agent_acts_through_wicket_mcp_with_the_official_sdk() {
    let s = start();
    let out = Command::new(env::require("WICKET_TEST_PYTHON"))
        .arg(root().join("tests/mcp/client.py"))
        .env("WICKET_BIN", bin("wicket"))
        .env("MCP_ARGS", serde_json::json!(gates(&s)).to_string())
        .env("WICKET_TOKEN", &s.agent)
        .env("WICKET_CONTROL", &s.control)
        .env("APPROVER_TOKEN", &s.approver)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));

    // The tool and its schema: reasoning required, a structured trace allowed.
    assert_eq!(v["server"], "wicket");
    let schema = &v["tools"]["postgres_query"];
    assert_eq!(
        schema["required"],
        serde_json::json!(["connection", "reasoning", "sql"])
    );
    assert_eq!(
        schema["properties"]["connection"]["enum"],
        serde_json::json!(["demo-db"])
    );
    assert!(schema["properties"]["trace"]["properties"]["steps"].is_object());

    // Allowed, and masked by the gate.
    let select = &v["select"];
    assert_eq!(select["isError"], false, "{select}");
    let rows = &select["structured"]["rows"];
    assert_eq!(
        select["structured"]["columns"],
        serde_json::json!(["id", "email", "ssn"])
    );
    assert_eq!(rows.as_array().unwrap().len(), 3, "{select}");
    assert_eq!(rows[0][1], "a***@example.com");
    assert_eq!(rows[0][2], "[redacted:ssn]");

    // Refused, naming the rule.
    let drop = &v["drop"];
    assert_eq!(drop["isError"], true, "{drop}");
    assert_eq!(drop["structured"]["error"]["sqlstate"], "42501", "{drop}");
    assert!(
        drop["structured"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refused by rule"),
        "{drop}"
    );

    // Without reasoning: rejected before it reaches the gate.
    let no = v["no_reasoning"].to_string();
    assert!(no.contains("reasoning"), "{no}");

    // Held: the agent hears that it waits (approval id and rule), an
    // approver approves, the statement completes.
    let delete = &v["delete"];
    assert_eq!(delete["isError"], false, "{delete}");
    assert_eq!(
        delete["structured"]["commands"],
        serde_json::json!(["DELETE 1"])
    );
    let approval = v["approval"]["id"].as_str().unwrap();
    let progress = v["progress"].to_string();
    assert!(
        progress.contains(approval) && progress.contains("waiting for approval"),
        "{progress}"
    );

    // HTTP, through wicket-http: masked fields.
    assert!(
        v["tools"]["http_request"]["required"]
            .to_string()
            .contains("reasoning")
    );
    assert_masked_customers(&v["http"]);

    // Kubernetes, through wicket-k8s as the agent: a list, a redacted
    // Secret, a held delete approved.
    let pods = &v["pods"];
    assert_eq!(pods["structured"]["status"], 200, "{pods}");
    assert!(
        pods["structured"]["body"].to_string().contains("web-0"),
        "{pods}"
    );
    let secret = v["secret"].to_string();
    assert!(
        secret.contains("db-creds") && !secret.contains("hunter2"),
        "{secret}"
    );
    assert_eq!(
        v["delete_pod"]["structured"]["status"], 200,
        "{}",
        v["delete_pod"]
    );
    assert_eq!(v["delete_pod_approval"]["connection"], "demo-cluster");

    // kubectl exec through the gate: exit code and both streams; a
    // destructive command refused, naming the rule.
    let exec = &v["exec"]["structured"];
    assert_eq!(exec["exit_code"], 3, "{}", v["exec"]);
    assert_eq!(exec["stdout"], "hello from web-0\n");
    assert_eq!(exec["stderr"], "warn\n");
    let refused = v["exec_refused"].to_string();
    assert!(
        refused.contains("403") && refused.contains("no-destruction-in-pods"),
        "{refused}"
    );

    // A command on the host through wicket-ssh; a destructive one refused.
    let ssh = &v["ssh"]["structured"];
    assert_eq!(ssh["exit_code"], 4, "{}", v["ssh"]);
    assert_eq!(ssh["stdout"], "hi from the host\n");
    assert_eq!(ssh["stderr"], "err\n");
    let refused = v["ssh_refused"].to_string();
    assert!(refused.contains("no-host-destruction"), "{refused}");

    // The audit: each call with its reasoning, the MCP client named.
    let sessions: Value =
        serde_json::from_str(&wicket(&s, &s.admin, &["sessions", "list", "-o", "json"])).unwrap();
    let mut seen = String::new();
    for session in sessions.as_array().unwrap() {
        let id = session["id"].as_str().unwrap();
        seen.push_str(&wicket(
            &s,
            &s.admin,
            &["sessions", "show", id, "-o", "json"],
        ));
    }
    for needle in [
        "listing customers to check their e-mail domains",
        "removing the duplicate customer 3 reported in OPS-43",
        "DROP TABLE customers",
        "wicket-mcp (e2e-agent 1.2.3)",
        "Which e-mail domains do our customers use?",
        "weekly report of customer plans",
        "db-0 is wedged; deleting it so it restarts",
        "checking what web-0 serves",
        "looking at the host",
    ] {
        assert!(
            seen.contains(needle),
            "`{needle}` is not in the audit:\n{seen}"
        );
    }
}

#[test]
fn streamable_http_clients_bring_their_own_token() {
    let s = start();
    let port = free_port();
    let server = Kill(vec![
        Command::new(bin("wicket"))
            .args([
                "mcp",
                "--transport",
                "http",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(gates(&s))
            .env("WICKET_CONTROL", &s.control)
            .env_remove("WICKET_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ]);
    wait_port(port, "wicket mcp --transport http");
    let out = Command::new(env::require("WICKET_TEST_PYTHON"))
        .arg(root().join("tests/mcp/client.py"))
        .env("MCP_URL", format!("http://127.0.0.1:{port}/mcp"))
        .env("WICKET_TOKEN", &s.agent)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["tools"],
        serde_json::json!([
            "http_request",
            "kubernetes_exec",
            "kubernetes_request",
            "postgres_query",
            "ssh_exec"
        ])
    );
    assert_masked_customers(&v["http"]);
    assert!(
        v["anonymous"].to_string().contains("Authorization: Bearer"),
        "{}",
        v["anonymous"]
    );
    let audit = wicket(&s, &s.admin, &["sessions", "list", "-o", "json"]);
    assert!(audit.contains("demo-agent"), "{audit}");
    drop(server);
}
