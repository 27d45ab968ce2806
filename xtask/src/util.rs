//! Small process helpers.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

/// Prints a step header.
pub fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// Workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root with extra environment; error on non-zero exit.
pub fn run(program: &str, args: &[&str], env: &[(String, String)]) -> Result<(), String> {
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// A free loopback TCP port.
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Whether we run as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// GETs `http://127.0.0.1:port/path` and returns whether it answered 200.
pub fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")
}

/// Waits up to `secs` for `check` to hold.
pub fn wait_for(secs: u64, what: &str, mut check: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(format!("{what} did not become ready within {secs}s"))
}

/// Totals of `cargo test` result lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests ignored.
    pub ignored: u64,
}

/// Runs `cargo test …`, echoing its output, and adds up its `test result:` lines.
pub fn run_tests(args: &[&str], env: &[(String, String)]) -> (Result<(), String>, Totals) {
    use std::io::{BufRead, BufReader};
    let mut totals = Totals::default();
    let child = Command::new("cargo")
        .args(args)
        .current_dir(root())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (Err(format!("cannot run cargo: {e}")), totals),
    };
    // Read in a thread: a process a test leaked may hold the pipe open after
    // cargo exits, and that must not hang the run.
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("{line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let mut count = |line: &str| {
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |what: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(what))
                    .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            totals.passed += num(" passed");
            totals.failed += num(" failed");
            totals.ignored += num(" ignored");
        }
    };
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(line) => count(&line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(_)) = child.try_wait() {
                    // Drain what is already there, then stop waiting.
                    loop {
                        match rx.recv_timeout(std::time::Duration::from_millis(500)) {
                            Ok(line) => count(&line),
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                eprintln!(
                                    "xtask: warning: a process started by the tests still holds their output open"
                                );
                                break;
                            }
                        }
                    }
                    break;
                }
            }
        }
    }
    let status = child.wait();
    let result = match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`cargo {}` failed ({s})", args.join(" "))),
        Err(e) => Err(format!("cargo: {e}")),
    };
    (result, totals)
}

/// Child processes killed (and reaped) when dropped, with names for messages.
#[derive(Default)]
pub struct Children(pub Vec<(String, std::process::Child)>);

/// The demo's ports: `fixed` (the documented ones), or free ones for
/// `--check`; an error names `what` if one is already taken.
pub fn demo_ports<const N: usize>(
    check: bool,
    fixed: [u16; N],
    what: &str,
) -> Result<[u16; N], String> {
    let mut ports = fixed;
    if check {
        for p in &mut ports {
            *p = free_port()?;
        }
    }
    for p in ports {
        if port_open(p) {
            return Err(format!(
                "port {p} (for {what}) is already in use: is another `cargo xtask demo` running?"
            ));
        }
    }
    Ok(ports)
}

impl Children {
    /// Stops these children even when this process ends without unwinding
    /// (`kill`, SIGHUP from a closed terminal; Ctrl-C reaches the whole
    /// process group anyway): a watchdog shell polls for this process once a
    /// second and, when it is gone, sends the children SIGTERM, SIGKILL three
    /// seconds later, then runs `after` (shell). The watchdog is a child
    /// itself, stopped first when this process exits normally, so it never
    /// signals a pid that has been reused since.
    pub fn stop_with_this_process(&mut self, after: &str) -> Result<(), String> {
        let pids: Vec<String> = self.0.iter().map(|(_, c)| c.id().to_string()).collect();
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
             kill -TERM {pids} 2>/dev/null; sleep 3; kill -KILL {pids} 2>/dev/null; {after}",
            me = std::process::id(),
            pids = pids.join(" "),
        );
        let watchdog = std::process::Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the cleanup watchdog: {e}"))?;
        self.0.insert(0, ("cleanup watchdog".to_string(), watchdog));
        Ok(())
    }

    /// Adds a child.
    pub fn push(&mut self, name: &str, child: std::process::Child) {
        self.0.push((name.to_string(), child));
    }

    /// Starts `cmd` as `name` with stdout and stderr in the file `log`.
    pub fn spawn_logged(
        &mut self,
        name: &str,
        cmd: &mut std::process::Command,
        log: &std::path::Path,
    ) -> Result<(), String> {
        let f = std::fs::File::create(log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(f.try_clone().map_err(|e| e.to_string())?)
            .stderr(f)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        self.push(name, child);
        Ok(())
    }
}

impl Drop for Children {
    /// Asks every child to stop (SIGTERM, so a master process such as
    /// nginx's takes its workers along), waits up to three seconds, then
    /// kills what is left.
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        for (_, c) in &mut self.0 {
            while matches!(c.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether something listens on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// The `export K='V'` lines of a shell env file.
pub fn read_env_file(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    Ok(std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect())
}

/// The value of `key` in `env` (empty if absent).
pub fn env_get(env: &[(String, String)], key: &str) -> String {
    env.iter()
        .find(|(n, _)| n == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// Installs Debian packages (as root; otherwise says what to install).
pub fn apt_install(packages: &[&str]) -> Result<(), String> {
    if packages.is_empty() {
        return Ok(());
    }
    if !is_root() {
        return Err(format!(
            "missing packages {packages:?}: install them (apt-get install {}) or run as root",
            packages.join(" ")
        ));
    }
    step(&format!("apt-get install {}", packages.join(" ")));
    run("apt-get", &["update", "-qq"], &[])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(packages);
    run(
        "apt-get",
        &args,
        &[("DEBIAN_FRONTEND".into(), "noninteractive".into())],
    )
}

/// With `WICKET_BENCH_PERF` set, a CPU profile of process `pid` for `secs`
/// seconds (perf, `cpu-clock` samples with DWARF call graphs, so it works on
/// machines without hardware counters), written to
/// `target/bench-perf/NAME.data` for `perf report -i`. Wait on the returned
/// child after the load; `None` when profiling is off or perf is missing.
pub fn perf_record(pid: u32, name: &str, secs: u32) -> Option<std::process::Child> {
    std::env::var_os("WICKET_BENCH_PERF")?;
    let dir = root().join("target/bench-perf");
    std::fs::create_dir_all(&dir).ok()?;
    let out = dir.join(format!("{name}.data"));
    let child = Command::new("perf")
        .args(["record", "-e", "cpu-clock", "--call-graph", "dwarf,16384"])
        .args(["-F", "999", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string(), "--", "sleep", &secs.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match child {
        Ok(c) => {
            eprintln!("profiling pid {pid} into {}", out.display());
            Some(c)
        }
        Err(e) => {
            eprintln!("WICKET_BENCH_PERF is set but perf cannot start: {e}");
            None
        }
    }
}
