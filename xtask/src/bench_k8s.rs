//! `cargo xtask bench k8s`: `GET pod` latency and throughput (wrk) and a
//! 100 MB `kubectl exec` stdout stream, directly to the fake kube-apiserver
//! and through wicket-k8s (release builds; impersonation, policy, audit,
//! recording and masking on), in one run, with ratios.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::bench::{Stack, build_release, cpu_us, wrk};
use crate::util::{self, free_port, port_open, wait_for};

const POLICY: &str = "version: 1
connections:
  - name: bench-kube
    protocol: kubernetes
    masking: {detectors: [email, card, jwt, cloud_key, private_key]}
grants:
  - id: agents
    groups: [agents]
rules:
  - id: everything
    effect: allow
    match: {protocols: [kubernetes]}
";

fn kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> Result<(), String> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}\nusers:\n- name: u\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u, namespace: default}}\ncurrent-context: c\n",
        ca.display()
    );
    std::fs::write(path, text).map_err(|e| e.to_string())
}

/// Seconds for one `kubectl exec` that writes `bytes` of text to stdout.
fn exec_once(kubectl: &Path, cfg: &Path, home: &Path, bytes: u64) -> Result<f64, String> {
    use std::io::Read;
    let started = Instant::now();
    let mut child = Command::new(kubectl)
        .args(["exec", "web-0", "--", "sh", "-c"])
        .arg(format!(
            "yes 'kubectl exec benchmark line: the quick brown fox 0123456789' | head -c {bytes}"
        ))
        .env("KUBECONFIG", cfg)
        .env("HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("kubectl: {e}"))?;
    // The output is counted, not kept: collecting 100 MB into a growing
    // buffer costs this process as much CPU as kubectl spends, on the same
    // two cores the measured path runs on.
    let mut stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut stdout = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading kubectl's output: {e}")),
        }
    }
    let status = child.wait().map_err(|e| format!("kubectl: {e}"))?;
    let secs = started.elapsed().as_secs_f64();
    let errors = errors.join().unwrap_or_default();
    if !status.success() || got != bytes {
        return Err(format!(
            "kubectl exec returned {got} of {bytes} bytes: {errors}"
        ));
    }
    Ok(secs)
}

/// CPU seconds the whole machine has spent busy (not idle or waiting on
/// I/O), from `/proc/stat`.
fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    // USER_HZ is 100 on Linux.
    busy / 100.0
}

/// Runs the benchmark.
pub fn k8s() -> Result<(), String> {
    let kubectl =
        crate::demo_k8s::kubectl().ok_or("kubectl is not installed (apt-get install kubectl)")?;
    if !util::have("wrk") {
        return Err("wrk is not installed (apt-get install wrk)".into());
    }
    let bin = build_release()?;
    let dir = util::root().join("target/bench-k8s");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("home")).map_err(|e| e.to_string())?;
    // WICKET_BENCH_NO_MASK=1: the same connection without detectors, to see
    // what masking costs.
    let policy = if std::env::var_os("WICKET_BENCH_NO_MASK").is_some() {
        POLICY.replace(
            "    masking: {detectors: [email, card, jwt, cloud_key, private_key]}\n",
            "",
        )
    } else {
        POLICY.to_string()
    };
    let mut stack = Stack::start(&bin, &dir, &policy)?;
    let kdir = dir.join("kube");
    let api_port = free_port()?;
    stack.kids.push(
        "wicket-fake-kube",
        Command::new(bin.join("wicket-fake-kube"))
            .args(["--listen", &format!("127.0.0.1:{api_port}"), "--dir"])
            .arg(&kdir)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_for(20, "the fake kube-apiserver", || {
        port_open(api_port) && kdir.join("gate.key").exists()
    })?;
    let token = stack.sidecar_token("bench-kube")?;
    let gate_port = free_port()?;
    let gate = stack
        .sidecar_command("wicket-k8s", "bench-kube", &token)?
        .env("WICKET_K8S_LISTEN", format!("127.0.0.1:{gate_port}"))
        .env(
            "WICKET_K8S_UPSTREAM",
            format!("https://127.0.0.1:{api_port}"),
        )
        .env("WICKET_K8S_UPSTREAM_CA", kdir.join("ca.crt"))
        .env("WICKET_K8S_UPSTREAM_TOKEN_FILE", kdir.join("token"))
        .env("WICKET_TLS_CERT", kdir.join("gate.crt"))
        .env("WICKET_TLS_KEY", kdir.join("gate.key"))
        .spawn()
        .map_err(|e| format!("cannot start wicket-k8s: {e}"))?;
    let gate_pid = gate.id();
    stack.kids.push("wicket-k8s", gate);
    wait_for(30, "wicket-k8s", || port_open(gate_port))?;
    let sa = std::fs::read_to_string(kdir.join("token")).map_err(|e| e.to_string())?;
    let path = "/api/v1/namespaces/default/pods/web-0";
    let direct_url = format!("https://127.0.0.1:{api_port}{path}");
    let gate_url = format!("https://127.0.0.1:{gate_port}{path}");
    // Warm both (connections, the gate's session and decision memo).
    wrk(&direct_url, Some(sa.trim()), 1, 1)?;
    wrk(&gate_url, Some(&stack.agent), 1, 1)?;
    util::step(
        "GET pod: one connection (latency), then eight (throughput), direct and through wicket-k8s",
    );
    let mut rows = Vec::new();
    // WICKET_BENCH_K8S_GET=0: only the exec throughput.
    let get = std::env::var("WICKET_BENCH_K8S_GET").map_or(true, |v| v != "0");
    for conns in [1u32, 8].into_iter().filter(|_| get) {
        let d = wrk(&direct_url, Some(sa.trim()), conns, 10)?;
        let perf = util::perf_record(gate_pid, &format!("wicket-k8s-get-c{conns}"), 8);
        let cpu0 = cpu_us(gate_pid);
        let g = wrk(&gate_url, Some(&stack.agent), conns, 10)?;
        let cpu = cpu_us(gate_pid) - cpu0;
        if let Some(mut p) = perf {
            let _ = p.wait();
        }
        rows.push((conns, d, g, cpu as f64 / (g.0 * 10.0)));
    }
    let mb: u64 = std::env::var("WICKET_BENCH_EXEC_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let bytes = mb * 1024 * 1024;
    let direct_cfg = dir.join("direct.kubeconfig");
    let gate_cfg = dir.join("gate.kubeconfig");
    kubeconfig(
        &direct_cfg,
        &format!("https://127.0.0.1:{api_port}"),
        &kdir.join("ca.crt"),
        sa.trim(),
    )?;
    kubeconfig(
        &gate_cfg,
        &format!("https://127.0.0.1:{gate_port}"),
        &kdir.join("ca.crt"),
        &stack.agent,
    )?;
    // WICKET_BENCH_EXEC_RUNS: how many runs each way (the best counts;
    // one run takes well under a second and varies by a third here).
    let runs: usize = std::env::var("WICKET_BENCH_EXEC_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    util::step(&format!(
        "kubectl exec writing {mb} MB of text to stdout, {runs} times each way, interleaved"
    ));
    let (mut all_d, mut all_g) = (Vec::new(), Vec::new());
    // Busy CPU of the whole machine (all processes) during each side's
    // runs, and the gate's own.
    let (mut busy_d, mut busy_g, mut gate_cpu) = (0.0, 0.0, 0u64);
    // The control service stores what the gate recorded (only the gated
    // runs send it anything); it works on the same two cores.
    let control0 = cpu_us(stack.control_pid);
    let switches =
        |pid: u32| -> u64 { crate::bench::thread_switches(pid).iter().map(|t| t.1).sum() };
    let mut gate_switches = 0u64;
    for _ in 0..runs {
        let b0 = machine_busy_s();
        all_d.push(exec_once(&kubectl, &direct_cfg, &dir.join("home"), bytes)?);
        let b1 = machine_busy_s();
        let c0 = cpu_us(gate_pid);
        let s0 = switches(gate_pid);
        // The first gated run only (the profiler's own cost stays out of the rest).
        let perf = (all_g.is_empty())
            .then(|| util::perf_record(gate_pid, "wicket-k8s-exec", 4))
            .flatten();
        all_g.push(exec_once(&kubectl, &gate_cfg, &dir.join("home"), bytes)?);
        if let Some(mut p) = perf {
            let _ = p.wait();
        }
        gate_cpu += cpu_us(gate_pid) - c0;
        gate_switches += switches(gate_pid) - s0;
        busy_d += b1 - b0;
        busy_g += machine_busy_s() - b1;
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    let (best_d, best_g) = (best(&all_d), best(&all_g));
    println!("\nGET {path} (wrk, 10 s each)");
    println!(
        "{:<6} {:>12} {:>9} {:>9}   {:>12} {:>9} {:>9}   {:>10}",
        "conns", "direct rps", "p50 µs", "p99 µs", "gate rps", "p50 µs", "p99 µs", "gate CPU/req"
    );
    for (c, d, g, cpu) in &rows {
        // (rows is empty with WICKET_BENCH_K8S_GET=0)
        println!(
            "{c:<6} {:>12.0} {:>9.0} {:>9.0}   {:>12.0} {:>9.0} {:>9.0}   {:>8.0} µs",
            d.0, d.1, d.2, g.0, g.1, g.2, cpu
        );
    }
    if let [(_, d1, g1, _), (_, d8, g8, _)] = rows[..] {
        println!(
            "added p50 at one connection: {:.0} µs (target ≤ 200); throughput at eight: {:.2}× direct",
            g1.1 - d1.1,
            g8.0 / d8.0
        );
    }
    let (md, mg) = (mb as f64 / best_d, mb as f64 / best_g);
    let median = |v: &[f64]| crate::bench::median(v.to_vec());
    let (vd, vg) = (mb as f64 / median(&all_d), mb as f64 / median(&all_g));
    println!(
        "\nkubectl exec stdout, {mb} MB (whole command; best and median of {runs}; best {:.0} ms direct, {:.0} ms through the gate)",
        best_d * 1000.0,
        best_g * 1000.0
    );
    println!(
        "direct     {md:>6.1} MB/s (median {vd:.1})\nwicket-k8s {mg:>6.1} MB/s (median {vg:.1})\nratio {:.2} best, {:.2} median (target ≥ 0.8)",
        mg / md,
        vg / vd
    );
    let cores = |busy: f64, secs: &[f64]| busy / secs.iter().sum::<f64>();
    // Let the last recording batch arrive before reading the control's CPU.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let per_mb = |us: u64| us as f64 / 1000.0 / (mb as f64 * runs as f64);
    println!(
        "machine busy: {:.2} cores direct, {:.2} through the gate (of {}); CPU per MB: gate {:.1} ms, control service (storing the recording) {:.1} ms; gate thread switches per MB: {:.0}",
        cores(busy_d, &all_d),
        cores(busy_g, &all_g),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        per_mb(gate_cpu),
        per_mb(cpu_us(stack.control_pid) - control0),
        gate_switches as f64 / (mb as f64 * runs as f64),
    );
    Ok(())
}
