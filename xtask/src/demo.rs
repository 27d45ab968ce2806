//! `cargo xtask demo`: Wicket's main job on the embedded default.
//!
//! Starts a local demo identity provider and the control service on a SQLite
//! file with the demo policy (`deploy/demo/policy.yaml`), writes
//! `target/demo/env`, shows a first decision, and keeps running until Ctrl-C.
//! `--check` does the same on free ports, verifies it, and exits.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{self, Children, env_get, port_open, read_env_file, root, wait_for};

fn wicket(bin: &Path, env: &[(String, String)], args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin.join("wicket"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .map_err(|e| format!("cannot run wicket: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!(
            "`wicket {}` failed: {}{}",
            args.join(" "),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(stdout)
}

/// Runs the demo.
pub fn run(args: &[String]) -> Result<(), String> {
    let check = args.iter().any(|a| a == "--check");
    if !args.iter().any(|a| a == "--no-build") {
        util::step("building wicket-control, wicket and the demo identity provider");
        util::run("cargo", &["build", "--quiet", "--workspace", "--bins"], &[])?;
    }
    let root = root();
    let bin = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("debug");
    let dir = root.join(if check {
        "target/demo-check"
    } else {
        "target/demo"
    });
    if check {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let [idp_port, control_port, console_port] = util::demo_ports(
        check,
        [7480, 7470, 7471],
        "the demo identity provider and wicket-control",
    )?;
    let mut kids = Children::default();
    let idp_env = dir.join("idp.env");
    let _ = std::fs::remove_file(&idp_env);
    kids.spawn_logged(
        "wicket-demo-idp",
        Command::new(bin.join("wicket-demo-idp"))
            .args(["--listen", &format!("127.0.0.1:{idp_port}"), "--env-file"])
            .arg(&idp_env),
        &dir.join("idp.log"),
    )?;
    wait_for(20, "the demo identity provider", || {
        idp_env.exists() && port_open(idp_port)
    })?;
    let mut env = read_env_file(&idp_env)?;
    let get = env_get;
    let control_url = format!("http://127.0.0.1:{control_port}");
    let db = dir.join("wicket.db");
    kids.spawn_logged(
        "wicket-control",
        Command::new(bin.join("wicket-control"))
            .env("WICKET_LISTEN", format!("127.0.0.1:{control_port}"))
            .env("WICKET_CONSOLE_LISTEN", format!("127.0.0.1:{console_port}"))
            .env("WICKET_CONSOLE_CLIENT_ID", "wicket-console")
            .env("WICKET_DATABASE_URL", format!("sqlite:{}", db.display()))
            .env("WICKET_OIDC_ISSUER", get(&env, "WICKET_OIDC_ISSUER"))
            .env("WICKET_POLICY_FILE", root.join("deploy/demo/policy.yaml")),
        &dir.join("control.log"),
    )?;
    if let Err(e) = wait_for(30, "wicket-control", || port_open(control_port)) {
        let log = std::fs::read_to_string(dir.join("control.log")).unwrap_or_default();
        return Err(format!("{e}\n{log}"));
    }
    env.push(("WICKET_CONTROL".into(), control_url.clone()));
    let console_url = format!("http://127.0.0.1:{console_port}");
    env.push(("WICKET_CONSOLE_URL".into(), console_url.clone()));
    env.push(("WICKET_TOKEN".into(), get(&env, "WICKET_ADMIN_TOKEN")));
    let env_path = dir.join("env");
    // The demo database behind its gate.
    util::step("starting the demo PostgreSQL and wicket-pg in front of it");
    let pg = crate::peers::Postgres::start(if check { 0 } else { 7432 })?;
    pg.psql("postgres", "CREATE DATABASE demo")?;
    pg.psql("demo", include_str!("../../deploy/demo/customers.sql"))?;
    let upstream_pw = dir.join("upstream-password");
    std::fs::write(&upstream_pw, pg.password()).map_err(|e| e.to_string())?;
    let [pg_port, pg_admin_port] = util::demo_ports(check, [6432, 9470], "wicket-pg")?;
    start_gate(
        &dir,
        &bin,
        &env,
        &control_url,
        ("wicket-pg", "demo-db"),
        (pg_port, pg_admin_port),
        &[
            ("WICKET_PG_LISTEN", format!("127.0.0.1:{pg_port}")),
            ("WICKET_PG_UPSTREAM", format!("127.0.0.1:{}", pg.port)),
            ("WICKET_PG_UPSTREAM_USER", "postgres".into()),
            (
                "WICKET_PG_UPSTREAM_PASSWORD_FILE",
                upstream_pw.display().to_string(),
            ),
            ("WICKET_PG_ALLOW_CLEARTEXT_LOOPBACK", "true".into()),
        ],
        &mut kids,
    )?;
    let pg_url = |user: &str, token: &str| {
        format!("postgresql://{user}:{token}@127.0.0.1:{pg_port}/demo?sslmode=disable")
    };
    let agent_url = pg_url("demo-agent", &get(&env, "WICKET_AGENT_TOKEN"));
    let admin_url = pg_url("demo-admin", &get(&env, "WICKET_ADMIN_TOKEN"));
    env.push(("WICKET_PG_URL".into(), agent_url.clone()));
    env.push(("WICKET_PG_ADMIN_URL".into(), admin_url));
    let ssh = if std::path::Path::new("/usr/sbin/sshd").exists() {
        util::step("starting the demo OpenSSH server and wicket-ssh in front of it");
        let s = start_ssh(&dir, &bin, &env, &control_url, check, &mut kids)?;
        env.push(("WICKET_SSH_HOST".into(), "127.0.0.1".into()));
        env.push(("WICKET_SSH_PORT".into(), s.port.to_string()));
        env.push(("WICKET_SSH_USER".into(), "demo".into()));
        Some(s)
    } else {
        println!("(no OpenSSH server here: apt-get install openssh-server for the SSH gate demo)");
        None
    };
    util::step("starting the demo Kubernetes API (a fake apiserver) and wicket-k8s in front of it");
    let k8s = crate::demo_k8s::start(&dir, &bin, &env, &control_url, check, &mut kids)?;
    env.push((
        "WICKET_KUBECONFIG".into(),
        k8s.kubeconfig.display().to_string(),
    ));
    util::step("starting the demo customer API and wicket-http in front of it");
    let http = crate::demo_http::start(&dir, &bin, &env, &control_url, check, &mut kids)?;
    env.push(("WICKET_HTTP_URL".into(), http.url()));
    let mut file =
        String::from("# Written by `cargo xtask demo`. Use with: source target/demo/env\n");
    for (k, v) in &env {
        file.push_str(&format!("export {k}='{v}'\n"));
    }
    file.push_str(&format!("export PATH='{}':\"$PATH\"\n", bin.display()));
    std::fs::write(&env_path, file)
        .map_err(|e| format!("cannot write {}: {e}", env_path.display()))?;
    let wicket_env: Vec<(String, String)> = env.clone();
    let connections = wicket(&bin, &wicket_env, &["connections", "list"])?;
    let explain = wicket(
        &bin,
        &wicket_env,
        &[
            "policy",
            "explain",
            "-c",
            "demo-db",
            "--principal",
            "demo-agent",
            "--agent",
            "--group",
            "agents",
            "--kind",
            "delete",
            "--verb",
            "DELETE",
            "--reasoning",
            "--text",
            "DELETE FROM orders WHERE id = 42",
        ],
    )?;
    println!(
        "\nWicket is running on the embedded default (SQLite: {}).\n",
        db.display()
    );
    println!("  control service (gRPC)   {control_url}");
    println!("  approver console         {console_url}  (signs you in as the demo admin)");
    println!(
        "  identity provider (OIDC) {}",
        get(&env, "WICKET_OIDC_ISSUER")
    );
    println!("  environment              {}\n", env_path.display());
    println!("Connections:\n{connections}");
    println!("Would the demo agent's DELETE run?\n{explain}");
    println!(
        "  PostgreSQL gate          127.0.0.1:{pg_port} (wicket-pg; metrics on 127.0.0.1:{pg_admin_port})\n"
    );
    if let Some(s) = &ssh {
        println!(
            "  SSH gate                 127.0.0.1:{} (wicket-ssh; metrics on 127.0.0.1:{}) -> OpenSSH on 127.0.0.1:{}\n",
            s.port, s.admin_port, s.sshd_port
        );
    }
    println!(
        "  Kubernetes gate          127.0.0.1:{} (wicket-k8s; metrics on 127.0.0.1:{}) -> fake kube-apiserver on 127.0.0.1:{}\n",
        k8s.port, k8s.admin_port, k8s.apiserver_port
    );
    println!(
        "  HTTP gate                {} (wicket-http; metrics on 127.0.0.1:{}) -> demo customer API on 127.0.0.1:{}\n",
        http.url(),
        http.admin_port,
        http.app_port
    );
    println!("Try it yourself:");
    println!("  source {}", env_path.display());
    println!(
        "  PGOPTIONS='-c wicket.reasoning=counting\\ customers' psql \"$WICKET_PG_URL\" -c 'SELECT count(*) FROM customers'"
    );
    println!(
        "  PGOPTIONS='-c wicket.reasoning=looking' psql \"$WICKET_PG_URL\" -c 'SELECT * FROM customers'   # masked"
    );
    println!(
        "  PGOPTIONS='-c wicket.reasoning=cleanup' psql \"$WICKET_PG_URL\" -c 'DROP TABLE customers'   # refused"
    );
    println!(
        "  PGOPTIONS='-c wicket.reasoning=fix' psql \"$WICKET_PG_URL\" -c 'DELETE FROM customers WHERE id = 3'   # held:"
    );
    println!(
        "  WICKET_TOKEN=$WICKET_APPROVER_TOKEN wicket approvals approve <id>   # in another shell"
    );
    println!("  wicket policy get");
    println!(
        "  wicket policy explain -c demo-db --principal demo-agent --agent --group agents --kind select"
    );
    if ssh.is_some() {
        println!(
            "  SSH_ASKPASS={} SSH_ASKPASS_REQUIRE=force WICKET_REASONING='checking load' ssh -o SendEnv=WICKET_REASONING -p $WICKET_SSH_PORT $WICKET_SSH_USER@$WICKET_SSH_HOST uptime",
            dir.join("ssh/askpass-agent").display()
        );
    }
    if let Some(kubectl) = crate::demo_k8s::kubectl() {
        let k = kubectl.display();
        println!("  WICKET_REASONING='checking pods' {k} --kubeconfig $WICKET_KUBECONFIG get pods");
        println!(
            "  WICKET_REASONING='reading config' {k} --kubeconfig $WICKET_KUBECONFIG get secret db-creds -o yaml   # redacted"
        );
        println!(
            "  WICKET_REASONING='cleanup' {k} --kubeconfig $WICKET_KUBECONFIG delete pod db-0   # held for approval"
        );
    }
    println!(
        "  curl -H \"Authorization: Bearer $WICKET_AGENT_TOKEN\" -H 'Wicket-Reasoning: weekly report' $WICKET_HTTP_URL/api/customers   # masked"
    );
    println!(
        "  curl -X DELETE -H \"Authorization: Bearer $WICKET_AGENT_TOKEN\" -H 'Wicket-Reasoning: cleanup' $WICKET_HTTP_URL/api/customers/3   # held for approval"
    );
    println!("  wicket approvals list");
    println!("  wicket sessions list\n");
    if check {
        for want in ["demo-db", "postgres"] {
            if !connections.contains(want) {
                return Err(format!(
                    "demo check: `wicket connections list` lacks {want}:\n{connections}"
                ));
            }
        }
        if !explain.contains("review") || !explain.contains("writes-need-approval") {
            return Err(format!("demo check: unexpected explanation:\n{explain}"));
        }
        let denied = Command::new(bin.join("wicket"))
            .args(["policy", "apply", "-f", "Cargo.toml"])
            .current_dir(&root)
            .envs(wicket_env.iter().map(|(k, v)| (k, v)))
            .env("WICKET_TOKEN", get(&env, "WICKET_AGENT_TOKEN"))
            .output()
            .map_err(|e| e.to_string())?;
        if denied.status.code() != Some(3) {
            return Err("demo check: an agent token was not refused the admin API".into());
        }
        let psql = |sql: &str, reasoning: &str| {
            Command::new("psql")
                .args(["-X", "-A", "-t", &agent_url, "-c", sql])
                .env("PGOPTIONS", format!("-c wicket.reasoning={reasoning}"))
                .output()
                .map_err(|e| format!("psql: {e}"))
        };
        let read = psql("SELECT count(*) FROM customers", "demo")?;
        if String::from_utf8_lossy(&read.stdout).trim() != "3" {
            return Err(format!(
                "demo check: SELECT through wicket-pg failed: {}",
                String::from_utf8_lossy(&read.stderr)
            ));
        }
        let all = psql("SELECT * FROM customers ORDER BY id", "demo")?;
        let rows = String::from_utf8_lossy(&all.stdout).to_string();
        let raw = [
            "ada@example.com",
            "078-05-1120",
            "4111 1111 1111 1111",
            "219-09-9999",
        ];
        if !all.status.success()
            || raw.iter().any(|v| rows.contains(v))
            || !rows.contains("a***@example.com")
        {
            return Err(format!(
                "demo check: SELECT * was not masked: {rows}{}",
                String::from_utf8_lossy(&all.stderr)
            ));
        }
        // The same through psycopg 3 (text and binary) and asyncpg, where the
        // test venv exists (`cargo xtask test` makes it).
        let python = crate::peers::python();
        if python.exists() {
            let drivers = Command::new(&python)
                .arg(root.join("deploy/demo/check_drivers.py"))
                .arg(&agent_url)
                .output()
                .map_err(|e| format!("python: {e}"))?;
            if !drivers.status.success() {
                return Err(format!(
                    "demo check: drivers saw unmasked rows: {}{}",
                    String::from_utf8_lossy(&drivers.stdout),
                    String::from_utf8_lossy(&drivers.stderr)
                ));
            }
        }
        let drop = psql("DROP TABLE customers", "demo")?;
        if !String::from_utf8_lossy(&drop.stderr).contains("refused by rule `no-ddl-for-agents`") {
            return Err(format!(
                "demo check: DROP was not refused: {}",
                String::from_utf8_lossy(&drop.stderr)
            ));
        }
        if let Some(s) = &ssh {
            check_ssh(&dir, s)?;
        }
        crate::demo_k8s::check(&dir, &k8s)?;
        crate::demo_http::check(&env, &http)?;
        wait_for(15, "the demo session in `wicket sessions list`", || {
            wicket(
                &bin,
                &wicket_env,
                &["sessions", "list", "--connection", "demo-db", "-o", "json"],
            )
            .is_ok_and(|s| s.contains("SELECT") || s.contains("demo-agent"))
        })?;
        println!("demo check passed");
        return Ok(());
    }
    // Killed rather than interrupted, the demo still stops what it started.
    kids.stop_with_this_process(&pg.stop_script())?;
    println!("Press Ctrl-C to stop.");
    loop {
        std::thread::sleep(Duration::from_millis(500));
        for (name, c) in &mut kids.0 {
            if let Ok(Some(status)) = c.try_wait() {
                return Err(format!(
                    "{name} exited ({status}); see the logs in {}",
                    dir.display()
                ));
            }
        }
    }
}

/// The demo host: an OpenSSH server and the gate in front of it.
struct DemoSsh {
    port: u16,
    admin_port: u16,
    sshd_port: u16,
}

fn start_ssh(
    dir: &Path,
    bin: &Path,
    env: &[(String, String)],
    control_url: &str,
    check: bool,
    kids: &mut Children,
) -> Result<DemoSsh, String> {
    let sdir = dir.join("ssh");
    let [sshd_port, port, admin_port] =
        util::demo_ports(check, [7422, 2222, 9471], "the SSH demo")?;
    let sshd = crate::sshd::start(&sdir, sshd_port, kids)?;
    let (gate_key, known_hosts, user) = (&sshd.gate_key, &sshd.known_hosts, &sshd.user);
    start_gate(
        dir,
        bin,
        env,
        control_url,
        ("wicket-ssh", "demo-host"),
        (port, admin_port),
        &[
            ("WICKET_SSH_LISTEN", format!("127.0.0.1:{port}")),
            ("WICKET_SSH_UPSTREAM", format!("127.0.0.1:{sshd_port}")),
            ("WICKET_SSH_UPSTREAM_USER", user.to_string()),
            (
                "WICKET_SSH_UPSTREAM_KEY_FILE",
                gate_key.display().to_string(),
            ),
            ("WICKET_SSH_KNOWN_HOSTS", known_hosts.display().to_string()),
        ],
        kids,
    )?;
    // Password prompts answered with the demo tokens (as an agent's SSH_ASKPASS would).
    for (who, var) in [
        ("agent", "WICKET_AGENT_TOKEN"),
        ("admin", "WICKET_ADMIN_TOKEN"),
    ] {
        crate::sshd::askpass(&sdir.join(format!("askpass-{who}")), &env_get(env, var))?;
    }
    Ok(DemoSsh {
        port,
        admin_port,
        sshd_port,
    })
}

/// Starts gate `name` (a sidecar binary) for `connection` with the common
/// settings (control service, a new sidecar credential, state directory,
/// identity provider, admin listener) plus `extra`, logging to
/// `DIR/NAME.log`, and waits until it listens on `port`.
#[allow(clippy::too_many_arguments)]
pub fn start_gate(
    dir: &Path,
    bin: &Path,
    env: &[(String, String)],
    control_url: &str,
    (name, connection): (&str, &str),
    (port, admin_port): (u16, u16),
    extra: &[(&str, String)],
    kids: &mut Children,
) -> Result<(), String> {
    let short = name.trim_start_matches("wicket-");
    let token = wicket(
        bin,
        env,
        &[
            "sidecars",
            "create",
            "--name",
            &format!("demo-{short}"),
            "--connection",
            connection,
        ],
    )?
    .trim()
    .to_string();
    let log_path = dir.join(format!("{name}.log"));
    kids.spawn_logged(
        name,
        Command::new(bin.join(name))
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .env("WICKET_CONTROL", control_url)
            .env("WICKET_SIDECAR_TOKEN", &token)
            .env("WICKET_CONNECTION", connection)
            .env("WICKET_STATE_DIR", dir.join(format!("{short}-state")))
            .env("WICKET_OIDC_ISSUER", env_get(env, "WICKET_OIDC_ISSUER"))
            .env("WICKET_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
        &log_path,
    )?;
    if let Err(e) = wait_for(30, name, || port_open(port)) {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        return Err(format!("{e}\n{log}"));
    }
    Ok(())
}

/// The demo agent's commands through wicket-ssh: one allowed, one refused.
fn check_ssh(dir: &Path, s: &DemoSsh) -> Result<(), String> {
    let ssh = |cmd: &str| {
        Command::new("ssh")
            .args(["-p", &s.port.to_string()])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "PreferredAuthentications=password",
                "-o",
                "SendEnv=WICKET_REASONING",
            ])
            .arg("demo@127.0.0.1")
            .arg(cmd)
            .env("SSH_ASKPASS", dir.join("ssh/askpass-agent"))
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("WICKET_REASONING", "demo check")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("ssh: {e}"))
    };
    let ok = ssh("echo hello from the demo host")?;
    if String::from_utf8_lossy(&ok.stdout).trim() != "hello from the demo host" {
        return Err(format!(
            "demo check: ssh through wicket-ssh failed: {}",
            String::from_utf8_lossy(&ok.stderr)
        ));
    }
    let denied = ssh("rm -rf /etc/wicket-demo-nonexistent")?;
    if denied.status.code() != Some(126)
        || !String::from_utf8_lossy(&denied.stderr).contains("denied by rule")
    {
        return Err(format!(
            "demo check: a destructive command was not refused: {}",
            String::from_utf8_lossy(&denied.stderr)
        ));
    }
    Ok(())
}
