//! `cargo xtask bench pg`: pgbench select-only through nothing (direct),
//! through pgbouncer and through wicket-pg, in one run, with ratios; and the
//! sidecar's memory idle and with 1,000 idle client connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::peers::Postgres;
use crate::util::{self, Children, env_get, free_port, port_open, read_env_file, root, wait_for};

/// A 50-rule policy for the benchmark connection.
fn policy() -> String {
    let mut s = String::from(
        "version: 1\nconnections:\n  - name: bench-db\n    protocol: postgres\ngrants:\n  - id: agents\n    groups: [agents]\nrules:\n",
    );
    for i in 0..49 {
        let kind = ["insert", "update", "delete", "ddl", "copy"][i % 5];
        let effect = ["deny", "review"][i % 2];
        s.push_str(&format!("  - id: r{i}\n    effect: {effect}\n    match: {{commands: [{kind}], groups: [team-{i}]}}\n"));
        if effect == "review" {
            s.push_str("    review: {approvers: [dba]}\n");
        }
    }
    s.push_str("  - id: reads\n    effect: allow\n    match: {commands: [select]}\n    condition: command.risk < 50\n");
    s
}

struct Run {
    tps: f64,
    latency_ms: f64,
}

fn pgbench(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
    clients: u32,
    mode: &str,
    secs: u32,
) -> Result<Run, String> {
    let out = Command::new("pgbench")
        .args(["-S", "-n", "-M", mode, "-h", "127.0.0.1", "-U", user])
        .args([
            "-p",
            &port.to_string(),
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ])
        .args(["-T", &secs.to_string(), db])
        .env("PGPASSWORD", password)
        // Only the gate reads the reasoning; pgbouncer refuses an `options` parameter.
        .env(
            "PGOPTIONS",
            if user == "bench" {
                "-c wicket.reasoning=benchmark"
            } else {
                ""
            },
        )
        .output()
        .map_err(|e| format!("pgbench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!(
            "pgbench failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let find = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Ok(Run {
        tps: find("tps = ").ok_or_else(|| format!("no tps in: {text}"))?,
        latency_ms: find("latency average = ").unwrap_or(0.0),
    })
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let (user, system) = cpu_split_us(pid);
    user + system
}

/// The process doing the work: `pid`'s first child when `pid` is a
/// wrapper such as `runuser`, else `pid`.
fn worker(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(pid)
}

/// User and system CPU time a process has used, in microseconds.
fn cpu_split_us(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of stat, in clock ticks (100 Hz).
    (
        f.get(11).copied().unwrap_or(0) * 10_000,
        f.get(12).copied().unwrap_or(0) * 10_000,
    )
}

/// Opens a client connection and logs in (the token is the password); returns it idle.
fn login(port: u16, token: &str, db: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let mut body = vec![0, 3, 0, 0];
    for (k, v) in [("user", "bench"), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg.push(b'p');
    msg.extend_from_slice(&((token.len() + 5) as i32).to_be_bytes());
    msg.extend_from_slice(token.as_bytes());
    msg.push(0);
    s.write_all(&msg).map_err(|e| e.to_string())?;
    // Read until ReadyForQuery.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "closed during login: {}",
                String::from_utf8_lossy(&seen)
            ));
        }
        seen.extend_from_slice(&buf[..n]);
        if seen
            .windows(6)
            .any(|w| w[0] == b'Z' && w[1..5] == [0, 0, 0, 5])
        {
            return Ok(s);
        }
        if seen.first() == Some(&b'E') {
            return Err(format!("login refused: {}", String::from_utf8_lossy(&seen)));
        }
    }
}

fn start_pgbouncer(dir: &Path, pg: &Postgres) -> Result<(Child, u16), String> {
    let port = free_port()?;
    std::fs::write(
        dir.join("userlist.txt"),
        format!("\"postgres\" \"{}\"\n", pg.password()),
    )
    .map_err(|e| e.to_string())?;
    let ini = format!(
        "[databases]\n* = host=127.0.0.1 port={}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = plain\nauth_file = {}/userlist.txt\npool_mode = session\nmax_client_conn = 2000\ndefault_pool_size = 8\nlogfile = {}/pgbouncer.log\npidfile = {}/pgbouncer.pid\nunix_socket_dir =\n",
        pg.port,
        dir.display(),
        dir.display(),
        dir.display()
    );
    std::fs::write(dir.join("pgbouncer.ini"), ini).map_err(|e| e.to_string())?;
    let _ = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status();
    let mut cmd = if util::is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "pgbouncer"]);
        c
    } else {
        Command::new("pgbouncer")
    };
    let child = cmd
        .arg(dir.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start pgbouncer: {e}"))?;
    wait_for(10, "pgbouncer", || port_open(port))?;
    Ok((child, port))
}

/// Runs the PostgreSQL benchmark.
pub fn pg() -> Result<(), String> {
    if !util::have("pgbouncer") {
        util::step("apt-get install pgbouncer (the reference pooler)");
        util::run(
            "apt-get",
            &["install", "-y", "-qq", "pgbouncer"],
            &[("DEBIAN_FRONTEND".into(), "noninteractive".into())],
        )?;
    }
    util::step("building release binaries");
    util::run(
        "cargo",
        &[
            "build",
            "--release",
            "--quiet",
            "-p",
            "wicket-pg",
            "-p",
            "wicket-control",
            "-p",
            "wicket-testkit",
            "-p",
            "wicket-cli",
            "--bins",
        ],
        &[],
    )?;
    let bin = root().join("target/release");
    let dir = std::env::temp_dir().join(format!("wicket-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    util::step("starting PostgreSQL (max_connections raised for the idle-connection test)");
    let pg = Postgres::start_with(
        0,
        &["-c", "max_connections=1200", "-c", "shared_buffers=256MB"],
    )?;
    pg.psql("postgres", "CREATE DATABASE bench")?;
    let init = Command::new("pgbench")
        .args([
            "-i",
            "-q",
            "-s",
            "10",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
            &pg.port.to_string(),
            "bench",
        ])
        .env("PGPASSWORD", pg.password())
        .output()
        .map_err(|e| e.to_string())?;
    if !init.status.success() {
        return Err(format!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        ));
    }
    let mut kids = Children::default();
    // Identity provider, control service, policy, sidecar credential.
    let idp_port = free_port()?;
    let env_file = dir.join("idp.env");
    kids.push(
        "wicket-demo-idp",
        Command::new(bin.join("wicket-demo-idp"))
            .args(["--listen", &format!("127.0.0.1:{idp_port}"), "--env-file"])
            .arg(&env_file)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_for(20, "identity provider", || {
        env_file.exists() && port_open(idp_port)
    })?;
    let env = read_env_file(&env_file)?;
    let get = |k: &str| env_get(&env, k);
    let control_port = free_port()?;
    std::fs::write(dir.join("policy.yaml"), policy()).map_err(|e| e.to_string())?;
    let control = Command::new(bin.join("wicket-control"))
        .env("WICKET_LISTEN", format!("127.0.0.1:{control_port}"))
        .env(
            "WICKET_DATABASE_URL",
            format!("sqlite:{}", dir.join("control.db").display()),
        )
        .env("WICKET_OIDC_ISSUER", get("WICKET_OIDC_ISSUER"))
        .env("WICKET_POLICY_FILE", dir.join("policy.yaml"))
        .env("WICKET_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let control_pid = control.id();
    kids.push("wicket-control", control);
    wait_for(30, "wicket-control", || port_open(control_port))?;
    let out = Command::new(bin.join("wicket"))
        .args([
            "sidecars",
            "create",
            "--name",
            "bench",
            "--connection",
            "bench-db",
        ])
        .env("WICKET_CONTROL", format!("http://127.0.0.1:{control_port}"))
        .env("WICKET_TOKEN", get("WICKET_ADMIN_TOKEN"))
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "cannot create a sidecar credential: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let sidecar_token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::write(dir.join("pw"), pg.password()).map_err(|e| e.to_string())?;
    let gate_port = free_port()?;
    let gate = Command::new(bin.join("wicket-pg"))
        .env("WICKET_PG_LISTEN", format!("127.0.0.1:{gate_port}"))
        .env(
            "WICKET_WORKER_THREADS",
            std::env::var("WICKET_BENCH_PG_THREADS").unwrap_or_else(|_| "1".into()),
        )
        .env("WICKET_PG_UPSTREAM", format!("127.0.0.1:{}", pg.port))
        .env("WICKET_PG_UPSTREAM_USER", "postgres")
        .env("WICKET_PG_UPSTREAM_PASSWORD_FILE", dir.join("pw"))
        .env("WICKET_PG_ALLOW_CLEARTEXT_LOOPBACK", "true")
        .env("WICKET_CONTROL", format!("http://127.0.0.1:{control_port}"))
        .env("WICKET_SIDECAR_TOKEN", &sidecar_token)
        .env("WICKET_CONNECTION", "bench-db")
        .env("WICKET_STATE_DIR", dir.join("state"))
        .env("WICKET_OIDC_ISSUER", get("WICKET_OIDC_ISSUER"))
        .env("WICKET_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()?))
        .env("WICKET_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let gate_pid = gate.id();
    kids.push("wicket-pg", gate);
    wait_for(30, "wicket-pg", || port_open(gate_port))?;
    let (bouncer, bouncer_port) = start_pgbouncer(&dir, &pg)?;
    let bouncer_pid = worker(bouncer.id());
    kids.push("pgbouncer", bouncer);
    let agent = get("WICKET_AGENT_TOKEN");
    // Warm up (connections, the bundle, caches).
    pgbench(gate_port, "bench", &agent, "bench", 1, "simple", 2)?;
    let idle_rss = rss_kb(gate_pid);

    util::step("pgbench -S, 10 s per run (direct | pgbouncer | wicket-pg)");
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "run", "direct tps", "pgbouncer", "wicket-pg", "wicket/dir", "wicket/pgb"
    );
    let mut c1_added = Vec::new();
    let mut cpu = Vec::new();
    for mode in ["simple", "prepared"] {
        for clients in [1u32, 4] {
            let d = pgbench(
                pg.port,
                "postgres",
                pg.password(),
                "bench",
                clients,
                mode,
                10,
            )?;
            let bouncer_cpu = cpu_us(bouncer_pid);
            let b = pgbench(
                bouncer_port,
                "postgres",
                pg.password(),
                "bench",
                clients,
                mode,
                10,
            )?;
            let bouncer_cpu = (cpu_us(bouncer_pid) - bouncer_cpu) as f64 / (b.tps * 10.0).max(1.0);
            let (gate_cpu, control_cpu) = (cpu_split_us(gate_pid), cpu_us(control_pid));
            let w = pgbench(gate_port, "bench", &agent, "bench", clients, mode, 10)?;
            let txs = (w.tps * 10.0).max(1.0);
            cpu.push((
                format!("-M {mode} -c{clients}"),
                bouncer_cpu,
                (cpu_split_us(gate_pid).0 - gate_cpu.0) as f64 / txs,
                (cpu_split_us(gate_pid).1 - gate_cpu.1) as f64 / txs,
                (cpu_us(control_pid) - control_cpu) as f64 / txs,
            ));
            println!(
                "{:<22} {:>12.0} {:>12.0} {:>12.0} {:>10.2} {:>10.2}",
                format!("-M {mode} -c{clients}"),
                d.tps,
                b.tps,
                w.tps,
                w.tps / d.tps,
                w.tps / b.tps
            );
            if clients == 1 {
                c1_added.push((
                    mode,
                    (w.latency_ms - d.latency_ms) * 1000.0,
                    d.latency_ms,
                    w.latency_ms,
                ));
            }
        }
    }
    for (mode, added_us, d, w) in c1_added {
        println!(
            "added latency at -c1 ({mode}): {added_us:.0} µs (direct {d:.3} ms, wicket-pg {w:.3} ms; target <= 50 µs)"
        );
    }
    for (run, bouncer, user, system, control) in cpu {
        println!(
            "CPU per transaction ({run}): pgbouncer {bouncer:.0} µs, wicket-pg {:.0} µs ({user:.0} user, {system:.0} system), wicket-control (audit ingest) {control:.0} µs",
            user + system
        );
    }
    util::step("sidecar memory");
    let mut idle = Vec::new();
    for i in 0..1000 {
        match login(gate_port, &agent, "bench") {
            Ok(s) => idle.push(s),
            Err(e) => return Err(format!("idle connection {i}: {e}")),
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let busy_rss = rss_kb(gate_pid);
    println!(
        "wicket-pg RSS idle: {:.1} MB (target <= 20 MB)",
        idle_rss as f64 / 1024.0
    );
    println!(
        "wicket-pg RSS with {} idle client connections: {:.1} MB (target <= 100 MB)",
        idle.len(),
        busy_rss as f64 / 1024.0
    );
    drop(idle);
    drop(kids);
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
