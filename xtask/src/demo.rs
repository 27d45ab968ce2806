//! `cargo xtask demo`: Wicket's main job on the embedded default.
//!
//! Starts a local demo identity provider and the control service on a SQLite
//! file with the demo policy (`deploy/demo/policy.yaml`), writes
//! `target/demo/env`, shows a first decision, and keeps running until Ctrl-C.
//! `--check` does the same on free ports, verifies it, and exits.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{self, Children, env_get, free_port, port_open, read_env_file, root, wait_for};

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
    let (idp_port, control_port) = if check {
        (free_port()?, free_port()?)
    } else {
        (7480, 7470)
    };
    for (port, what) in [
        (idp_port, "the demo identity provider"),
        (control_port, "wicket-control"),
    ] {
        if port_open(port) {
            return Err(format!(
                "port {port} (for {what}) is already in use: is another `cargo xtask demo` running?"
            ));
        }
    }
    let mut kids = Children::default();
    let idp_env = dir.join("idp.env");
    let _ = std::fs::remove_file(&idp_env);
    let idp_log = std::fs::File::create(dir.join("idp.log")).map_err(|e| e.to_string())?;
    let child = Command::new(bin.join("wicket-demo-idp"))
        .args(["--listen", &format!("127.0.0.1:{idp_port}"), "--env-file"])
        .arg(&idp_env)
        .stdin(Stdio::null())
        .stdout(idp_log.try_clone().map_err(|e| e.to_string())?)
        .stderr(idp_log)
        .spawn()
        .map_err(|e| format!("cannot start wicket-demo-idp: {e}"))?;
    kids.push("wicket-demo-idp", child);
    wait_for(20, "the demo identity provider", || {
        idp_env.exists() && port_open(idp_port)
    })?;
    let mut env = read_env_file(&idp_env)?;
    let get = env_get;
    let control_url = format!("http://127.0.0.1:{control_port}");
    let db = dir.join("wicket.db");
    let control_log = std::fs::File::create(dir.join("control.log")).map_err(|e| e.to_string())?;
    let child = Command::new(bin.join("wicket-control"))
        .env("WICKET_LISTEN", format!("127.0.0.1:{control_port}"))
        .env("WICKET_DATABASE_URL", format!("sqlite:{}", db.display()))
        .env("WICKET_OIDC_ISSUER", get(&env, "WICKET_OIDC_ISSUER"))
        .env("WICKET_POLICY_FILE", root.join("deploy/demo/policy.yaml"))
        .stdin(Stdio::null())
        .stdout(control_log.try_clone().map_err(|e| e.to_string())?)
        .stderr(control_log)
        .spawn()
        .map_err(|e| format!("cannot start wicket-control: {e}"))?;
    kids.push("wicket-control", child);
    if let Err(e) = wait_for(30, "wicket-control", || port_open(control_port)) {
        let log = std::fs::read_to_string(dir.join("control.log")).unwrap_or_default();
        return Err(format!("{e}\n{log}"));
    }
    env.push(("WICKET_CONTROL".into(), control_url.clone()));
    env.push(("WICKET_TOKEN".into(), get(&env, "WICKET_ADMIN_TOKEN")));
    let env_path = dir.join("env");
    // The demo database behind its gate.
    util::step("starting the demo PostgreSQL and wicket-pg in front of it");
    let pg = crate::peers::Postgres::start(if check { 0 } else { 7432 })?;
    pg.psql("postgres", "CREATE DATABASE demo")?;
    pg.psql(
        "demo",
        "CREATE TABLE customers (id int PRIMARY KEY, name text, email text, ssn text, card text); \
         INSERT INTO customers VALUES \
         (1, 'Ada Lovelace', 'ada@example.com', '078-05-1120', '4111 1111 1111 1111'), \
         (2, 'Alan Turing', 'alan@example.com', '219-09-9999', '5500 0000 0000 0004'), \
         (3, 'Grace Hopper', 'grace@example.com', '457-55-5462', '3400 0000 0000 009')",
    )?;
    let upstream_pw = dir.join("upstream-password");
    std::fs::write(&upstream_pw, pg.password()).map_err(|e| e.to_string())?;
    let admin_env: Vec<(String, String)> = env.clone();
    let sidecar_token = wicket(
        &bin,
        &admin_env,
        &[
            "sidecars",
            "create",
            "--name",
            "demo-pg",
            "--connection",
            "demo-db",
        ],
    )?
    .trim()
    .to_string();
    let (pg_port, pg_admin_port) = if check {
        (free_port()?, free_port()?)
    } else {
        (6432, 9470)
    };
    for port in [pg_port, pg_admin_port] {
        if port_open(port) {
            return Err(format!("port {port} (for wicket-pg) is already in use"));
        }
    }
    let pg_log = std::fs::File::create(dir.join("wicket-pg.log")).map_err(|e| e.to_string())?;
    let child = Command::new(bin.join("wicket-pg"))
        .env("WICKET_PG_LISTEN", format!("127.0.0.1:{pg_port}"))
        .env("WICKET_PG_UPSTREAM", format!("127.0.0.1:{}", pg.port))
        .env("WICKET_PG_UPSTREAM_USER", "postgres")
        .env("WICKET_PG_UPSTREAM_PASSWORD_FILE", &upstream_pw)
        .env("WICKET_PG_ALLOW_CLEARTEXT_LOOPBACK", "true")
        .env("WICKET_CONTROL", &control_url)
        .env("WICKET_SIDECAR_TOKEN", &sidecar_token)
        .env("WICKET_CONNECTION", "demo-db")
        .env("WICKET_STATE_DIR", dir.join("pg-state"))
        .env("WICKET_OIDC_ISSUER", get(&env, "WICKET_OIDC_ISSUER"))
        .env("WICKET_ADMIN_LISTEN", format!("127.0.0.1:{pg_admin_port}"))
        .stdin(Stdio::null())
        .stdout(pg_log.try_clone().map_err(|e| e.to_string())?)
        .stderr(pg_log)
        .spawn()
        .map_err(|e| format!("cannot start wicket-pg: {e}"))?;
    kids.push("wicket-pg", child);
    if let Err(e) = wait_for(30, "wicket-pg", || port_open(pg_port)) {
        let log = std::fs::read_to_string(dir.join("wicket-pg.log")).unwrap_or_default();
        return Err(format!("{e}\n{log}"));
    }
    let pg_url = |user: &str, token: &str| {
        format!("postgresql://{user}:{token}@127.0.0.1:{pg_port}/demo?sslmode=disable")
    };
    let agent_url = pg_url("demo-agent", &get(&env, "WICKET_AGENT_TOKEN"));
    let admin_url = pg_url("demo-admin", &get(&env, "WICKET_ADMIN_TOKEN"));
    env.push(("WICKET_PG_URL".into(), agent_url.clone()));
    env.push(("WICKET_PG_ADMIN_URL".into(), admin_url));
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
