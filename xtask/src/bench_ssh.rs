//! `cargo xtask bench ssh`: a 200 MB scp (up and down) and a 10,000-line
//! interactive echo, directly to an OpenSSH server, through an OpenSSH
//! ProxyJump hop, and through wicket-ssh (release build, recording and
//! audit on), in one run, with ratios; then a 1 GB terminal session
//! recorded through wicket-ssh, its chunks counted and the record verified.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::bench::{Stack, build_release, cpu_us, rss_kb};
use crate::util::{self, free_port, port_open, wait_for};

const POLICY: &str = "version: 1
connections:
  - name: bench-ssh
    protocol: ssh
    masking: {detectors: [email, card, jwt, cloud_key, private_key]}
grants:
  - id: agents
    groups: [agents]
rules:
  - id: no-destroy
    effect: deny
    match: {commands: [destroy, disk, firewall]}
  - id: everything-else
    effect: allow
    match: {protocols: [ssh]}
";

/// Measures keystroke echo through `ssh -tt … cat` under a pty for each
/// route (commands separated by `---`), interleaved key by key so every
/// route sees the same machine: argv[1] lines of one key and Enter each;
/// prints `p50 p99 max` in µs per route, one line each.
const ECHO: &str = r#"
import os, pty, select, sys, time
n = int(sys.argv[1])
cmds, cur = [], []
for a in sys.argv[2:]:
    if a == '---':
        cmds.append(cur); cur = []
    else:
        cur.append(a)
cmds.append(cur)
ttys = []
for cmd in cmds:
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    ttys.append([pid, fd, b''])
def wait_for(t, want, timeout):
    deadline = time.monotonic() + timeout
    while want not in t[2]:
        left = deadline - time.monotonic()
        r, _, _ = select.select([t[1]], [], [], max(0.0, left))
        if not r:
            sys.exit('timed out waiting for %r; got %r' % (want, t[2][-300:]))
        t[2] += os.read(t[1], 65536)
    t[2] = t[2][t[2].index(want) + len(want):]
for t in ttys:
    os.write(t[1], b'ready\r')
for t in ttys:
    wait_for(t, b'ready\r\n', 60)
    wait_for(t, b'ready\r\n', 60)
keys = [[] for _ in ttys]
for i in range(n):
    for j, t in enumerate(ttys):
        s = time.perf_counter()
        os.write(t[1], b'k')
        wait_for(t, b'k', 10)
        keys[j].append(time.perf_counter() - s)
        os.write(t[1], b'\r')
        wait_for(t, b'k\r\n', 10)
for t in ttys:
    os.write(t[1], b'\x04')
    try:
        os.waitpid(t[0], 0)
    except ChildProcessError:
        pass
for k in keys:
    k.sort()
    us = lambda q: int(k[min(len(k) - 1, int(q * len(k)))] * 1e6)
    print(us(0.5), us(0.99), int(k[-1] * 1e6))
"#;

struct Route {
    name: &'static str,
    /// `ssh`/`scp` options that reach the host this way.
    opts: Vec<String>,
    env: Vec<(String, String)>,
    target: String,
}

fn common() -> Vec<String> {
    [
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "LogLevel=ERROR",
    ]
    .iter()
    .flat_map(|o| ["-o".to_string(), o.to_string()])
    .collect()
}

fn timed(mut c: Command) -> Result<f64, String> {
    let t = Instant::now();
    let o = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{c:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{c:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn scp(r: &Route, from: &str, to: &str) -> Command {
    let mut c = Command::new("scp");
    c.arg("-q").args(&r.opts).arg(from).arg(to);
    c.envs(r.env.iter().map(|(k, v)| (k, v)));
    c
}

fn sha(path: &Path) -> String {
    Command::new("sha256sum")
        .arg(path)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split(' ')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

/// Runs the SSH benchmark.
pub fn ssh() -> Result<(), String> {
    if !Path::new("/usr/sbin/sshd").exists() {
        return Err(
            "the SSH benchmark needs OpenSSH's server (apt-get install openssh-server)".into(),
        );
    }
    let bin = build_release()?;
    let dir = std::env::temp_dir().join(format!("wicket-bench-ssh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = run(&bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(bin: &Path, dir: &Path) -> Result<(), String> {
    let mb: usize = std::env::var("WICKET_BENCH_SSH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let lines: usize = std::env::var("WICKET_BENCH_SSH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut stack = Stack::start(bin, dir, POLICY)?;
    let sshd = crate::sshd::start(&dir.join("sshd"), free_port()?, &mut stack.kids)?;
    let token = stack.sidecar_token("bench-ssh")?;
    let gate_port = free_port()?;
    let gate = stack
        .sidecar_command("wicket-ssh", "bench-ssh", &token)?
        .env("WICKET_SSH_LISTEN", format!("127.0.0.1:{gate_port}"))
        .env(
            "WICKET_WORKER_THREADS",
            std::env::var("WICKET_BENCH_SSH_THREADS").unwrap_or_else(|_| "1".into()),
        )
        .env("WICKET_SSH_UPSTREAM", format!("127.0.0.1:{}", sshd.port))
        .env("WICKET_SSH_UPSTREAM_USER", &sshd.user)
        .env("WICKET_SSH_UPSTREAM_KEY_FILE", &sshd.gate_key)
        .env("WICKET_SSH_KNOWN_HOSTS", &sshd.known_hosts)
        .env("WICKET_LOG", "info")
        .stderr(
            std::fs::File::create(std::env::temp_dir().join("wicket-bench-ssh-gate.log"))
                .map_err(|e| e.to_string())?,
        )
        .spawn()
        .map_err(|e| format!("cannot start wicket-ssh: {e}"))?;
    let gate_pid = gate.id();
    stack.kids.push("wicket-ssh", gate);
    wait_for(30, "wicket-ssh", || port_open(gate_port))?;
    let askpass = dir.join("askpass");
    crate::sshd::askpass(&askpass, &stack.agent)?;
    let key = sshd.direct_key.display().to_string();
    let direct = Route {
        name: "direct",
        opts: [
            common(),
            vec![
                "-i".into(),
                key.clone(),
                "-o".into(),
                "IdentitiesOnly=yes".into(),
                "-o".into(),
                "BatchMode=yes".into(),
                "-P".into(),
                sshd.port.to_string(),
            ],
        ]
        .concat(),
        env: vec![],
        target: format!("{}@127.0.0.1", sshd.user),
    };
    let jump = Route {
        name: "OpenSSH ProxyJump",
        opts: [
            direct.opts.clone(),
            vec![
                "-o".into(),
                format!(
                    "ProxyCommand=ssh -i {key} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -p {} -W %h:%p {}@127.0.0.1",
                    sshd.port, sshd.user
                ),
            ],
        ]
        .concat(),
        env: vec![],
        target: direct.target.clone(),
    };
    let gated = Route {
        name: "wicket-ssh",
        opts: [
            common(),
            vec![
                "-o".into(),
                "PubkeyAuthentication=no".into(),
                "-o".into(),
                "PreferredAuthentications=password".into(),
                "-P".into(),
                gate_port.to_string(),
            ],
        ]
        .concat(),
        env: vec![
            ("SSH_ASKPASS".into(), askpass.display().to_string()),
            ("SSH_ASKPASS_REQUIRE".into(), "force".into()),
        ],
        target: "bench@127.0.0.1".into(),
    };
    let src = dir.join("payload.bin");
    util::run(
        "sh",
        &[
            "-c",
            &format!("head -c {}M /dev/urandom > {}", mb, src.display()),
        ],
        &[],
    )?;
    let want = sha(&src);
    util::step(&format!("scp of {mb} MB, up and down, three ways"));
    let mut rows = Vec::new();
    for r in [&direct, &jump, &gated] {
        let remote = dir.join(format!("up-{}.bin", r.name.replace(' ', "-")));
        let back = dir.join(format!("down-{}.bin", r.name.replace(' ', "-")));
        let cpu0 = cpu_us(gate_pid);
        let up = timed(scp(
            r,
            &src.display().to_string(),
            &format!("{}:{}", r.target, remote.display()),
        ))?;
        let down = timed(scp(
            r,
            &format!("{}:{}", r.target, remote.display()),
            &back.display().to_string(),
        ))?;
        let cpu = cpu_us(gate_pid) - cpu0;
        if sha(&remote) != want || sha(&back) != want {
            return Err(format!("{}: the copy differs from the original", r.name));
        }
        let _ = std::fs::remove_file(&remote);
        let _ = std::fs::remove_file(&back);
        rows.push((r.name, mb as f64 / up, mb as f64 / down, cpu));
    }
    util::step(&format!(
        "interactive echo: {lines} lines (a key and Enter) under a pty, three ways, interleaved key by key"
    ));
    let script = dir.join("echo.py");
    std::fs::write(&script, ECHO).map_err(|e| e.to_string())?;
    let mut c = Command::new("python3");
    c.arg(&script).arg(lines.to_string());
    for (i, r) in [&direct, &jump, &gated].into_iter().enumerate() {
        if i > 0 {
            c.arg("---");
        }
        c.arg("ssh").arg("-tt");
        // scp's -P is ssh's -p.
        let opts: Vec<String> = r
            .opts
            .iter()
            .map(|o| if o == "-P" { "-p".into() } else { o.clone() })
            .collect();
        c.args(&opts).arg(&r.target).arg("cat");
        c.envs(r.env.iter().map(|(k, v)| (k, v)));
    }
    let o = c.output().map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!(
            "echo: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let mut echoes = Vec::new();
    for (name, line) in ["direct", "OpenSSH ProxyJump", "wicket-ssh"]
        .into_iter()
        .zip(text.lines())
    {
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() != 3 {
            return Err(format!("echo: unexpected output {text}"));
        }
        echoes.push((name, v[0], v[1], v[2]));
    }
    if echoes.len() != 3 {
        return Err(format!("echo: unexpected output {text}"));
    }
    println!("\nscp {mb} MB (MB/s; wicket-ssh CPU during its own run)");
    println!("{:<20} {:>10} {:>10}", "route", "up", "down");
    for (name, up, down, _) in &rows {
        println!("{name:<20} {up:>10.1} {down:>10.1}");
    }
    let (d, j, g) = (&rows[0], &rows[1], &rows[2]);
    println!(
        "wicket-ssh ÷ direct: up {:.2}, down {:.2} (target ≥ 0.7); ÷ ProxyJump: up {:.2}, down {:.2}",
        g.1 / d.1,
        g.2 / d.2,
        g.1 / j.1,
        g.2 / j.2
    );
    println!(
        "wicket-ssh CPU for {} MB moved twice: {:.2} s",
        mb,
        g.3 as f64 / 1e6
    );
    println!("\nkeystroke echo under a pty ({lines} keys; µs)");
    println!("{:<20} {:>8} {:>8} {:>8}", "route", "p50", "p99", "max");
    for (name, p50, p99, max) in &echoes {
        println!("{name:<20} {p50:>8} {p99:>8} {max:>8}");
    }
    println!(
        "added p99 by wicket-ssh: {} µs over direct (target ≤ 1000), {} µs over ProxyJump",
        echoes[2].2 as i64 - echoes[0].2 as i64,
        echoes[2].2 as i64 - echoes[1].2 as i64
    );
    long_recording(&stack, &gated, gate_pid)
}

/// A terminal session printing `WICKET_BENCH_SSH_RECORD_MB` (1024) MB of
/// text through wicket-ssh: time, the gate's and the control service's
/// peak memory, the chunks written, and `wicket audit verify` over all of
/// it.
fn long_recording(stack: &Stack, gated: &Route, gate_pid: u32) -> Result<(), String> {
    let mb: usize = std::env::var("WICKET_BENCH_SSH_RECORD_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    util::step(&format!(
        "a {mb} MB terminal session through wicket-ssh, recorded"
    ));
    let opts: Vec<String> = gated
        .opts
        .iter()
        .map(|o| if o == "-P" { "-p".into() } else { o.clone() })
        .collect();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let running = peak.clone();
        let control = stack.control_pid;
        std::thread::spawn(move || {
            let (mut g, mut c) = (0, 0);
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                g = g.max(rss_kb(gate_pid));
                c = c.max(rss_kb(control));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            (g, c)
        })
    };
    let started = Instant::now();
    let o = Command::new("ssh")
        .arg("-tt")
        .args(&opts)
        .arg(&gated.target)
        .arg(format!("base64 -w 100 /dev/urandom | head -c {mb}M; echo"))
        .envs(gated.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    if !o.status.success() {
        return Err(format!(
            "the long session failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    // Wait until the session's end (its last event) is stored.
    let deadline = Instant::now() + std::time::Duration::from_secs(600);
    let mut last;
    let id = loop {
        let out = stack.wicket(&[
            "sessions",
            "list",
            "--connection",
            "bench-ssh",
            "-o",
            "jsonl",
        ])?;
        // One compact object per line, keys in order: no JSON parser needed.
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        last = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        // The newest session is this one.
        let ended = text
            .lines()
            .next()
            .filter(|l| l.contains("\"state\":\"ended\""))
            .and_then(|l| l.split("\"id\":\"").nth(1))
            .and_then(|rest| rest.split('"').next())
            .map(str::to_string);
        if let Some(id) = ended.filter(|_| {
            stack
                .dir()
                .join("recordings")
                .read_dir()
                .map(|d| d.count() > 0)
                .unwrap_or(false)
        }) {
            break id;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the long session's record did not arrive in 10 minutes; sessions:\n{last}"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let drained = started.elapsed().as_secs_f64();
    peak.store(false, std::sync::atomic::Ordering::Relaxed);
    let (gate_peak, control_peak) = sampler.join().map_err(|_| "sampler")?;
    let (mut chunks, mut bytes) = (0u64, 0u64);
    let mut stack_dirs = vec![stack.dir().join("recordings")];
    while let Some(d) = stack_dirs.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| e.to_string())?.flatten() {
            let m = e.metadata().map_err(|e| e.to_string())?;
            if m.is_dir() {
                stack_dirs.push(e.path());
            } else {
                chunks += 1;
                bytes += m.len();
            }
        }
    }
    let v0 = Instant::now();
    let verify = stack.wicket(&["audit", "verify", &id])?;
    let vsecs = v0.elapsed().as_secs_f64();
    let verdict = String::from_utf8_lossy(&verify.stdout).to_string();
    println!(
        "
recorded terminal session of {mb} MB through wicket-ssh"
    );
    println!(
        "session {:.1} s ({:.0} MB/s), recorded and stored after {:.1} s",
        secs,
        mb as f64 / secs,
        drained
    );
    println!(
        "{chunks} recording chunks, {:.1} MB on disk ({:.1}% of the output)",
        bytes as f64 / 1e6,
        bytes as f64 / (mb as f64 * 1048576.0) * 100.0
    );
    println!(
        "peak RSS: wicket-ssh {:.1} MB, wicket-control {:.1} MB",
        gate_peak as f64 / 1024.0,
        control_peak as f64 / 1024.0
    );
    println!(
        "wicket audit verify (every chunk read back and hashed): {:.1} s, {}",
        vsecs,
        if verify.status.success() {
            "intact"
        } else {
            "FAILED"
        }
    );
    if !verify.status.success() {
        return Err(format!(
            "audit verify failed: {verdict}{}",
            String::from_utf8_lossy(&verify.stderr)
        ));
    }
    Ok(())
}
