//! `cargo xtask bench http`: wrk against the demo app directly, through an
//! nginx reverse proxy (keep-alive upstream pool, access log on; two
//! workers, then one), and
//! through wicket-http (release build; token validation, policy, audit on;
//! then again with response masking on), in one run, with ratios.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::bench::{Stack, build_release, cpu_us, latency_rounds, rounds_summary, rss_kb, wrk};
use crate::util::{self, free_port, port_open, wait_for};

const POLICY: &str = "version: 1
connections:
  - name: bench-api
    protocol: http
    http:
      routes:
        - {name: hello, methods: [GET], path: /hello}
  - name: bench-api-masked
    protocol: http
    masking:
      fields: [{path: '$..ssn'}]
      detectors: [email, card, jwt, cloud_key, private_key]
grants:
  - id: agents
    groups: [agents]
rules:
  - id: everything
    effect: allow
    match: {protocols: [http]}
";

/// Installs `package` with apt when `binary` is missing (as root).
fn ensure(binary: &str, package: &str) -> Result<(), String> {
    if Path::new(binary).exists() || util::have(binary) {
        return Ok(());
    }
    util::apt_install(&[package])
}

/// Starts nginx in front of `upstream_port`; returns its port.
fn start_nginx(
    stack: &mut Stack,
    dir: &Path,
    upstream_port: u16,
    workers: &str,
) -> Result<u16, String> {
    let port = free_port()?;
    let ndir = dir.join(format!("nginx-{workers}"));
    std::fs::create_dir_all(ndir.join("tmp")).map_err(|e| e.to_string())?;
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log {d}/access.log combined buffer=64k;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
           fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  keepalive_requests 1000000;\n\
           upstream app {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      proxy_set_header X-Forwarded-For $remote_addr;\n    }}\n  }}\n}}\n",
        d = ndir.display()
    );
    let conf_file = ndir.join("nginx.conf");
    std::fs::write(&conf_file, conf).map_err(|e| e.to_string())?;
    let nginx = if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx".to_string()
    } else {
        "nginx".to_string()
    };
    stack.kids.push(
        "nginx",
        Command::new(nginx)
            .arg("-c")
            .arg(&conf_file)
            .arg("-p")
            .arg(&ndir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nginx: {e}"))?,
    );
    wait_for(10, "nginx", || port_open(port))?;
    Ok(port)
}

/// Starts a wicket-http for `connection` in front of `upstream_port`;
/// returns its port and pid.
fn start_gate(
    stack: &mut Stack,
    connection: &str,
    upstream_port: u16,
) -> Result<(u16, u32), String> {
    let token = stack.sidecar_token(connection)?;
    let port = free_port()?;
    let gate = stack
        .sidecar_command("wicket-http", connection, &token)?
        .env("WICKET_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "WICKET_HTTP_UPSTREAM",
            format!("http://127.0.0.1:{upstream_port}"),
        )
        // One runtime thread (the sidecars' default); WICKET_BENCH_HTTP_THREADS=2
        // to match nginx's `worker_processes auto` on two cores.
        .env(
            "WICKET_WORKER_THREADS",
            std::env::var("WICKET_BENCH_HTTP_THREADS").unwrap_or_else(|_| "1".into()),
        )
        .spawn()
        .map_err(|e| format!("cannot start wicket-http: {e}"))?;
    let pid = gate.id();
    stack.kids.push("wicket-http", gate);
    wait_for(30, "wicket-http", || port_open(port))?;
    Ok((port, pid))
}

/// Runs the benchmark.
pub fn http() -> Result<(), String> {
    ensure("wrk", "wrk")?;
    ensure("/usr/sbin/nginx", "nginx")?;
    let bin = build_release()?;
    let dir = util::root().join("target/bench-http");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut stack = Stack::start(&bin, &dir, POLICY)?;
    let app_port = free_port()?;
    stack.kids.push(
        "wicket-demo-app",
        Command::new(bin.join("wicket-demo-app"))
            .args([
                "--listen",
                &format!("127.0.0.1:{app_port}"),
                "--threads",
                "2",
            ])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_for(20, "the demo app", || port_open(app_port))?;
    let nginx_port = start_nginx(&mut stack, &dir, app_port, "auto")?;
    let nginx1_port = start_nginx(&mut stack, &dir, app_port, "1")?;
    let (gate_port, gate_pid) = start_gate(&mut stack, "bench-api", app_port)?;
    let (masked_port, masked_pid) = start_gate(&mut stack, "bench-api-masked", app_port)?;
    let secs: u32 = std::env::var("WICKET_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let agent = stack.agent.clone();
    let targets: [(&str, String, Option<&str>, Option<u32>); 5] = [
        ("direct", format!("http://127.0.0.1:{app_port}"), None, None),
        (
            "nginx",
            format!("http://127.0.0.1:{nginx_port}"),
            None,
            None,
        ),
        (
            "nginx, 1 worker",
            format!("http://127.0.0.1:{nginx1_port}"),
            None,
            None,
        ),
        (
            "wicket-http",
            format!("http://127.0.0.1:{gate_port}"),
            Some(&agent),
            Some(gate_pid),
        ),
        (
            "wicket-http, masking on",
            format!("http://127.0.0.1:{masked_port}"),
            Some(&agent),
            Some(masked_pid),
        ),
    ];
    let mut rss_idle = Vec::new();
    for (_, base, token, pid) in &targets {
        if let Some(pid) = pid {
            rss_idle.push(rss_kb(*pid));
        }
        // Warm up: connections, the gate's session and decision memo.
        wrk(&format!("{base}/hello"), *token, 4, 1)?;
    }
    util::step(&format!(
        "GET /hello ({{\"hello\":\"world\"}}): wrk at 1 and 32 connections, {secs} s each, direct / nginx / wicket-http"
    ));
    let mut rows = Vec::new();
    for conns in [1u32, 32] {
        for (name, base, token, pid) in &targets {
            let cpu0 = pid.map(cpu_us).unwrap_or(0);
            let control0 = cpu_us(stack.control_pid);
            let perf = pid.and_then(|p| {
                util::perf_record(p, &format!("{}-c{conns}", name.replace(' ', "-")), 5)
            });
            let control_perf = pid.and_then(|_| {
                util::perf_record(
                    stack.control_pid,
                    &format!("control-{}-c{conns}", name.replace(' ', "-")),
                    5,
                )
            });
            let r = wrk(&format!("{base}/hello"), *token, conns, secs)?;
            for mut p in perf.into_iter().chain(control_perf) {
                let _ = p.wait();
            }
            let requests = r.0 * f64::from(secs);
            let cpu = pid.map(|p| (cpu_us(p) - cpu0) as f64 / requests);
            let control = pid.map(|_| (cpu_us(stack.control_pid) - control0) as f64 / requests);
            rows.push((conns, *name, r, cpu, control));
        }
    }
    let customers = format!("http://127.0.0.1:{masked_port}/api/customers");
    let m = wrk(&customers, Some(&agent), 8, secs)?;
    let d = wrk(
        &format!("http://127.0.0.1:{app_port}/api/customers"),
        None,
        8,
        secs,
    )?;
    println!(
        "\nGET /hello (wrk, {secs} s each; wicket-http with token validation, policy and audit)"
    );
    println!(
        "{:<6} {:<24} {:>10} {:>9} {:>9} {:>13} {:>16}",
        "conns", "path", "rps", "p50 µs", "p99 µs", "gate CPU/req", "control CPU/req"
    );
    for (c, name, r, cpu, control) in &rows {
        println!(
            "{c:<6} {name:<24} {:>10.0} {:>9.0} {:>9.0} {:>13} {:>16}",
            r.0,
            r.1,
            r.2,
            cpu.map(|c| format!("{c:.0} µs")).unwrap_or_default(),
            control.map(|c| format!("{c:.0} µs")).unwrap_or_default()
        );
    }
    let find = |c: u32, n: &str| {
        rows.iter()
            .find(|(cc, nn, _, _, _)| *cc == c && *nn == n)
            .map(|(_, _, r, _, _)| *r)
            .expect("row")
    };
    let (d1, n1, g1) = (find(1, "direct"), find(1, "nginx"), find(1, "wicket-http"));
    let (n32, g32, m32) = (
        find(32, "nginx"),
        find(32, "wicket-http"),
        find(32, "wicket-http, masking on"),
    );
    let n32_1 = find(32, "nginx, 1 worker");
    // More interleaved one-connection rounds (5 s each): the target is
    // judged on the median added p50.
    let mut added = vec![(g1.1 - d1.1, n1.1 - d1.1)];
    for _ in 1..latency_rounds() {
        let p50 = |i: usize| -> Result<f64, String> {
            let (_, base, token, _) = &targets[i];
            Ok(wrk(&format!("{base}/hello"), *token, 1, 5)?.1)
        };
        let (d, n, g) = (p50(0)?, p50(1)?, p50(3)?);
        added.push((g - d, n - d));
    }
    let (gate, nginx, each) = rounds_summary(&added);
    println!(
        "added p50 at one connection: wicket-http {gate:.0} µs (target ≤ 100), nginx {nginx:.0} µs, medians of {} rounds (wicket-http each round: {each})",
        added.len(),
    );
    println!(
        "requests/s at 32 connections: wicket-http {:.2}× nginx (target ≥ 1.0), {:.2}× nginx with one worker; with masking on {:.2}× nginx",
        g32.0 / n32.0,
        g32.0 / n32_1.0,
        m32.0 / n32.0
    );
    println!(
        "GET /api/customers (JSON with emails, SSNs, cards) at 8 connections: direct {:.0} rps, masked through wicket-http {:.0} rps ({:.2}×)",
        d.0,
        m.0,
        m.0 / d.0
    );
    println!(
        "wicket-http RSS: {} KiB idle, {} KiB after the runs",
        rss_idle.first().copied().unwrap_or(0),
        rss_kb(gate_pid)
    );
    Ok(())
}
