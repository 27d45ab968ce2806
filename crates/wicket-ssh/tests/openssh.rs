//! OpenSSH's own client tools through wicket-ssh to a real `sshd` (each
//! test starts its own, on a free port, with keys made by `ssh-keygen`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use wicket_proto::v1;
use wicket_ssh::{SshConfig, SshGate, UpstreamAuth, UpstreamConfig};
use wicket_testkit::idp::TokenSpec;
use wicket_teststack::Stack;

const POLICY: &str = "
agents: {require_reasoning: true}
connections:
  - name: ssh
    protocol: ssh
    masking: {detectors: [email, card]}
grants:
  - id: people
    groups: [ops]
  - id: agents
    groups: [agents]
rules:
  - id: no-destroy
    description: nobody wipes system paths or disks through the gate
    effect: deny
    match: {commands: [destroy, disk, firewall]}
  - id: no-forbidden-files
    effect: deny
    match: {verbs: [touch]}
    condition: \"command.objects.exists(o, o.contains('forbidden'))\"
  - id: hold-touch
    effect: review
    match: {verbs: [touch]}
    review: {approvers: [sre], timeout: 30s}
  - id: no-protected-removal
    effect: deny
    match: {commands: [sftp], verbs: [remove]}
    condition: \"command.objects.exists(o, o.contains('protected'))\"
  - id: forwards-stay-local
    effect: deny
    match: {commands: [forward], verbs: [direct-tcpip]}
    condition: \"!command.objects.all(o, o.startsWith('127.0.0.1:'))\"
  - id: agents-keep-to-their-side
    description: agents may not forward the host's ports back or lend their keys
    effect: deny
    match: {commands: [forward], verbs: [tcpip-forward, agent], kinds: [agent]}
  - id: everything-else
    effect: allow
    match: {protocols: [ssh]}
";

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

use wicket_testkit::sshd::keygen;

/// A real `sshd` on a free port, logging in the user running the tests,
/// with two keys it authorizes.
struct Sshd {
    server: wicket_testkit::sshd::Sshd,
    /// The gate's key (authorized on the host).
    gate_key: PathBuf,
    /// A key for direct logins (the reference).
    direct_key: PathBuf,
}

impl std::ops::Deref for Sshd {
    type Target = wicket_testkit::sshd::Sshd;
    fn deref(&self) -> &Self::Target {
        &self.server
    }
}

fn start_sshd(dir: &Path) -> Sshd {
    let gate_key = dir.join("gate_key");
    let direct_key = dir.join("direct_key");
    keygen(&gate_key);
    keygen(&direct_key);
    let server = wicket_testkit::sshd::Sshd::start(
        dir,
        &[&gate_key, &direct_key],
        "Subsystem sftp internal-sftp\nAllowTcpForwarding yes\n\
         AcceptEnv LANG LC_* WICKET_TEST_*\nMaxSessions 64\nMaxStartups 100\n",
    );
    Sshd {
        server,
        gate_key,
        direct_key,
    }
}

struct Env {
    stack: Stack,
    sshd: Sshd,
    gate_port: u16,
    dir: PathBuf,
}

async fn start() -> Env {
    start_with(|_| {}).await
}

async fn start_with(tune: impl FnOnce(&mut SshConfig)) -> Env {
    let stack = Stack::start("ssh", POLICY).await;
    let dir = stack.dir.path().join("ssh");
    std::fs::create_dir_all(&dir).unwrap();
    let sshd = start_sshd(&dir);
    let mut cfg = SshConfig::new(
        UpstreamConfig {
            addr: format!("127.0.0.1:{}", sshd.port),
            user: sshd.user.clone(),
            auth: UpstreamAuth::Key(Arc::new(
                russh::keys::load_secret_key(&sshd.gate_key, None).unwrap(),
            )),
            known_hosts: sshd.known_hosts.clone(),
        },
        vec![
            russh::keys::PrivateKey::random(
                &mut russh::keys::key::safe_rng(),
                russh::keys::Algorithm::Ed25519,
            )
            .unwrap(),
        ],
    );
    cfg.mask_key = b"test mask key".to_vec();
    tune(&mut cfg);
    let gate = SshGate::new(stack.sidecar.clone(), cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gate_port = listener.local_addr().unwrap().port();
    tokio::spawn(wicket_ssh::serve(gate, listener, std::future::pending()));
    let askpass = dir.join("askpass");
    std::fs::write(&askpass, "#!/bin/sh\ncat \"$WICKET_TEST_TOKEN_FILE\"\n").unwrap();
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    Env {
        stack,
        sshd,
        gate_port,
        dir,
    }
}

/// Options every client tool gets (`-o` form, for ssh, scp, sftp and rsync).
fn client_opts() -> Vec<String> {
    [
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "LogLevel=ERROR",
        "PubkeyAuthentication=no",
        "PreferredAuthentications=password",
        "NumberOfPasswordPrompts=1",
        "SendEnv=WICKET_REASONING",
        "SendEnv=TRACEPARENT",
        "ConnectTimeout=20",
    ]
    .iter()
    .flat_map(|o| ["-o".to_string(), o.to_string()])
    .collect()
}

impl Env {
    fn token(&self, spec: &TokenSpec) -> PathBuf {
        let t = self.stack.idp.mint(spec);
        let f = self.dir.join(format!("token-{}", free_port()));
        std::fs::write(&f, t).unwrap();
        f
    }

    fn human(&self) -> PathBuf {
        self.token(&TokenSpec::human("ada", &["ops"]))
    }

    fn agent(&self) -> PathBuf {
        self.token(&TokenSpec::agent("deploy-bot", &["agents"]))
    }

    /// A client tool with the token answered at the password prompt.
    fn tool(&self, program: &str, token: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("SSH_ASKPASS", self.dir.join("askpass"))
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .env("WICKET_TEST_TOKEN_FILE", token)
            .env_remove("WICKET_REASONING")
            .stdin(Stdio::null());
        c
    }

    fn ssh(&self, token: &Path, args: &[&str]) -> Command {
        let mut c = self.tool("ssh", token);
        c.args(["-p", &self.gate_port.to_string()])
            .args(client_opts())
            .args(args.iter().copied().take_while(|a| *a != "--"))
            .arg("bot@127.0.0.1")
            .args(args.iter().copied().skip_while(|a| *a != "--").skip(1));
        c
    }

    /// ssh straight to the host with the direct key (the reference).
    fn direct(&self, command: &str) -> Output {
        let user = format!("{}@127.0.0.1", self.sshd.user);
        run(&mut key_ssh(
            self.sshd.port,
            &self.sshd.direct_key,
            &user,
            command,
        ))
    }

    fn remote(&self) -> String {
        "bot@127.0.0.1".to_string()
    }
}

/// `ssh` with only the key at `key` (and the certificate beside it), no prompts.
fn key_ssh(port: u16, key: &Path, target: &str, command: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-p", &port.to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg(target)
        .arg(command)
        .stdin(Stdio::null());
    c
}

fn sha256(path: &Path) -> String {
    let o = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn random_file(path: &Path, mb: usize) {
    let o = run(Command::new("head")
        .args(["-c", &format!("{}", mb << 20), "/dev/urandom"])
        .stdout(std::fs::File::create(path).unwrap()));
    assert!(o.status.success());
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn kinds(events: &[v1::AuditEvent], kind: v1::AuditKind) -> Vec<&v1::AuditEvent> {
    events.iter().filter(|e| e.kind == kind as i32).collect()
}

fn command_text(e: &v1::AuditEvent) -> &str {
    e.command.as_ref().map(|c| c.text.as_str()).unwrap_or("")
}

// One thread, as the gate runs by default: a relay that blocks one
// direction while waiting on the other deadlocks here.
#[tokio::test(flavor = "current_thread")]
async fn openssh_tools_work_whole_through_the_gate() {
    let e = Arc::new(start().await);
    let token = e.human();

    // exec: output and exit codes.
    let o = {
        let e = e.clone();
        let t = token.clone();
        blocking(move || run(&mut e.ssh(&t, &["--", "echo hello; echo oops >&2; exit 3"]))).await
    };
    let (so, se) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{so}\n{se}");
    assert_eq!(so, "hello\n");
    assert_eq!(se, "oops\n");

    // Other env requests reach the host (its AcceptEnv decides); the
    // reasoning variables stay with the gate.
    let o = {
        let e = e.clone();
        let t = token.clone();
        blocking(move || {
            let mut c = e.ssh(
                &t,
                &[
                    "-o",
                    "SendEnv=WICKET_TEST_COLOR",
                    "--",
                    "echo color=$WICKET_TEST_COLOR reason=$WICKET_REASONING",
                ],
            );
            c.env("WICKET_TEST_COLOR", "teal")
                .env("WICKET_REASONING", "kept by the gate");
            run(&mut c)
        })
        .await
    };
    assert_eq!(text(&o).0, "color=teal reason=\n", "{:?}", text(&o));

    // A command killed by a signal ends the same way as on a direct login.
    let (gated, direct) = {
        let e = e.clone();
        let t = token.clone();
        blocking(move || {
            (
                run(&mut e.ssh(&t, &["--", "kill -TERM $$"])),
                e.direct("kill -TERM $$"),
            )
        })
        .await
    };
    assert_eq!(
        gated.status.code(),
        direct.status.code(),
        "{:?} vs {:?}",
        text(&gated),
        text(&direct)
    );

    // An interactive shell under a pty.
    let o = {
        let e = e.clone();
        let t = token.clone();
        blocking(move || {
            let mut c = e.ssh(&t, &["-tt", "--"]);
            c.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = c.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            stdin.write_all(b"tty; echo answer=$((6*7))\n").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            stdin.write_all(b"exit 0\n").unwrap();
            child.wait_with_output().unwrap()
        })
        .await
    };
    let (so, se) = text(&o);
    assert!(so.contains("answer=42"), "{so}\n{se}");
    assert!(so.contains("/dev/pts/"), "{so}");
    assert_eq!(o.status.code(), Some(0), "{so}\n{se}");

    // scp (SFTP and legacy), sftp batch mode, rsync, both ways: 200 MB with
    // scp's default (SFTP) mode, 16 MB for the others.
    let work = e.dir.join("files");
    std::fs::create_dir_all(&work).unwrap();
    let big = work.join("big.bin");
    random_file(&big, 200);
    let src = work.join("src.bin");
    random_file(&src, 16);
    let want = sha256(&src);
    let remote_dir = e.dir.join("remote");
    std::fs::create_dir_all(&remote_dir).unwrap();
    let port = e.gate_port.to_string();
    for (i, legacy) in [false, true].into_iter().enumerate() {
        let up = remote_dir.join(format!("up{i}.bin"));
        let back = work.join(format!("back{i}.bin"));
        let file = if legacy { src.clone() } else { big.clone() };
        let want = sha256(&file);
        let (o1, o2) = {
            let e = e.clone();
            let t = token.clone();
            let (src, up, back, port) = (file.clone(), up.clone(), back.clone(), port.clone());
            blocking(move || {
                let scp = |from: String, to: String| {
                    let mut c = e.tool("scp", &t);
                    c.args(["-P", &port, "-q"]).args(client_opts());
                    if legacy {
                        c.arg("-O");
                    }
                    run(c.arg(from).arg(to))
                };
                let o1 = scp(
                    src.display().to_string(),
                    format!("{}:{}", e.remote(), up.display()),
                );
                let o2 = scp(
                    format!("{}:{}", e.remote(), up.display()),
                    back.display().to_string(),
                );
                (o1, o2)
            })
            .await
        };
        assert!(
            o1.status.success(),
            "scp up (legacy {legacy}): {:?}",
            text(&o1)
        );
        assert!(
            o2.status.success(),
            "scp down (legacy {legacy}): {:?}",
            text(&o2)
        );
        assert_eq!(sha256(&up), want);
        assert_eq!(sha256(&back), want);
        let _ = std::fs::remove_file(&up);
        let _ = std::fs::remove_file(&back);
    }
    let batch = work.join("batch");
    std::fs::write(
        &batch,
        format!(
            "mkdir {r}/d\nput {src} {r}/d/s.bin\nrename {r}/d/s.bin {r}/d/t.bin\nls {r}/d\nget {r}/d/t.bin {w}/t.bin\nrm {r}/d/t.bin\nrmdir {r}/d\n",
            r = remote_dir.display(),
            src = src.display(),
            w = work.display()
        ),
    )
    .unwrap();
    let o = {
        let e = e.clone();
        let t = token.clone();
        let (batch, port) = (batch.clone(), port.clone());
        blocking(move || {
            let mut c = e.tool("sftp", &t);
            // `-b` turns on BatchMode (no prompts); the token is the password.
            c.args(["-P", &port, "-o", "BatchMode=no"])
                .args(client_opts())
                .arg("-b")
                .arg(&batch)
                .arg(e.remote());
            run(&mut c)
        })
        .await
    };
    assert!(o.status.success(), "sftp: {:?}", text(&o));
    assert_eq!(sha256(&work.join("t.bin")), want);
    assert!(!remote_dir.join("d").exists());
    let o = {
        let e = e.clone();
        let t = token.clone();
        let (src, dst, port) = (src.clone(), remote_dir.join("rsynced.bin"), port.clone());
        blocking(move || {
            let rsh = format!("ssh -p {port} {}", client_opts().join(" "));
            let mut c = e.tool("rsync", &t);
            c.args(["-a", "-e", &rsh])
                .arg(&src)
                .arg(format!("{}:{}", e.remote(), dst.display()));
            run(&mut c)
        })
        .await
    };
    assert!(o.status.success(), "rsync: {:?}", text(&o));
    assert_eq!(sha256(&remote_dir.join("rsynced.bin")), want);

    // ssh -N -L carries traffic to a local service; other destinations are refused.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let local = free_port();
    let mut fwd = e
        .ssh(
            &token,
            &["-N", "-L", &format!("{local}:127.0.0.1:{echo_port}"), "--"],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let got = {
        let payload = payload.clone();
        blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", local)) {
                    let p = payload.clone();
                    let mut w = s.try_clone().unwrap();
                    let writer = std::thread::spawn(move || {
                        w.write_all(&p).unwrap();
                        w.shutdown(std::net::Shutdown::Write).unwrap();
                    });
                    let mut got = Vec::new();
                    let _ = s.read_to_end(&mut got);
                    writer.join().unwrap();
                    if !got.is_empty() {
                        return got;
                    }
                }
                if std::time::Instant::now() > deadline {
                    return Vec::new();
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .await
    };
    let _ = fwd.kill();
    let fwd_out = fwd.wait_with_output().unwrap();
    assert_eq!(got.len(), payload.len(), "{:?}", text(&fwd_out));
    assert!(got == payload);
    // A destination policy does not allow is refused at the channel open.
    let elsewhere = free_port();
    let mut fwd = e
        .ssh(
            &token,
            &[
                "-N",
                "-L",
                &format!("{elsewhere}:localhost:{echo_port}"),
                "--",
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let got = blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", elsewhere)) {
                let _ = s.write_all(b"hello");
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got);
                return got;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ssh -L never listened"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await;
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert!(got.is_empty(), "a refused forward carried data");

    let events = e.stack.events().await;
    let cmds = kinds(&events, v1::AuditKind::Command);
    assert!(
        cmds.iter()
            .any(|c| command_text(c) == "echo hello; echo oops >&2; exit 3")
    );
    assert!(
        cmds.iter()
            .any(|c| command_text(c).starts_with("forward localhost:")
                && c.decision.as_ref().unwrap().rule == "forwards-stay-local")
    );
    assert!(
        cmds.iter()
            .any(|c| command_text(c).starts_with("forward 127.0.0.1:"))
    );
    assert!(
        cmds.iter()
            .any(|c| command_text(c).starts_with("rename ") && command_text(c).ends_with("t.bin"))
    );
    assert!(cmds.iter().any(|c| command_text(c).starts_with("remove ")));
    let results = wicket_teststack::results(&events);
    assert!(
        results
            .iter()
            .any(|r| r.details.get("exit_status").map(String::as_str) == Some("3")),
        "exit status recorded"
    );
    assert!(
        results
            .iter()
            .any(|r| r.details.get("bytes_written").map(String::as_str)
                == Some(&(200u64 << 20).to_string())),
        "sftp byte counts recorded"
    );
    let starts = kinds(&events, v1::AuditKind::SessionStart);
    assert!(
        starts
            .iter()
            .all(|s| s.principal.as_ref().unwrap().subject == "ada")
    );
}

/// The asciicast of each recorded channel of the session, assembled from
/// its `output` events.
fn casts(events: &[v1::AuditEvent]) -> Vec<String> {
    let mut by_channel: std::collections::BTreeMap<(String, String), String> = Default::default();
    for ev in kinds(events, v1::AuditKind::Output) {
        let key = (ev.session_id.clone(), ev.details["channel"].clone());
        let cast = by_channel.entry(key).or_default();
        if let Some(h) = ev.details.get("asciicast_header") {
            cast.insert_str(0, &format!("{h}\n"));
        }
        if let Some(lines) = ev.details.get("asciicast") {
            cast.push_str(lines);
        }
    }
    by_channel.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_decides_commands_lines_and_files_and_everything_is_recorded() {
    let e = Arc::new(start().await);
    let agent = e.agent();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let ssh = {
        let e = e.clone();
        let agent = agent.clone();
        move |reasoning: Option<&str>, args: &[&str]| {
            let mut c = e.ssh(&agent, args);
            if let Some(r) = reasoning {
                c.env("WICKET_REASONING", r).env("TRACEPARENT", traceparent);
            }
            c
        }
    };

    // An agent without reasoning is refused; with it, the command runs.
    let o = run(&mut ssh(None, &["--", "uptime"]));
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(126), "{se}");
    assert!(se.contains("reasoning"), "{se}");
    let o = run(&mut ssh(
        Some("check the load before the deploy"),
        &["--", "uptime"],
    ));
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));

    // A destructive command is denied: message on stderr, exit status 126.
    let o = run(&mut ssh(
        Some("clean up"),
        &["--", "rm -rf /boot/wicket-test-nonexistent"],
    ));
    let (_, se) = text(&o);
    assert_eq!(o.status.code(), Some(126), "{se}");
    assert!(se.contains("denied by rule no-destroy"), "{se}");

    // A held command runs once approved, and is refused when denied.
    let approver = e
        .stack
        .idp
        .mint(&TokenSpec::human("lead", &["wicket-approvers", "sre"]));
    for approve in [true, false] {
        let target = e.dir.join(format!("touched-{approve}"));
        let mut cmd = ssh(
            Some("mark the host as drained"),
            &["--", &format!("touch {}", target.display())],
        );
        let held = tokio::task::spawn_blocking(move || run(&mut cmd));
        e.stack
            .decide_next(&approver, approve, |a| {
                let r = a.request.as_ref().unwrap();
                assert_eq!(
                    r.reasoning.as_ref().unwrap().reasoning,
                    "mark the host as drained"
                );
                assert!(r.command.as_ref().unwrap().text.starts_with("touch "));
            })
            .await;
        let o = held.await.unwrap();
        let (_, se) = text(&o);
        assert!(se.contains("waiting for approval"), "{se}");
        assert_eq!(target.exists(), approve, "{se}");
        assert_eq!(o.status.code(), Some(if approve { 0 } else { 126 }), "{se}");
    }

    // A client that goes away while its command is held never has it run:
    // the approval is withdrawn and the command recorded as refused.
    let target = e.dir.join("touched-after-leaving");
    let mut held = ssh(
        Some("mark the host as drained"),
        &["--", &format!("touch {}", target.display())],
    );
    let abandoned = e.stack.kill_while_held(&approver, &mut held).await;
    assert!(
        !target.exists(),
        "the held command ran after its client left"
    );

    // In an interactive shell a denied line never reaches the host; the
    // session goes on.
    let forbidden_pty = e.dir.join("forbidden-pty");
    let forbidden_paste = e.dir.join("forbidden-paste");
    let o = {
        let forbidden_pty = forbidden_pty.clone();
        let forbidden_paste = forbidden_paste.clone();
        let mut c = ssh(Some("inspect the host"), &["-tt", "--"]);
        blocking(move || {
            c.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = c.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            for line in [
                "echo mail ada@example.com\n".to_string(),
                "rm -rf /boot/wicket-test-nonexistent\n".to_string(),
                format!("touch {}\n", forbidden_pty.display()),
                // A bracketed paste of two lines runs (or not) as one.
                format!(
                    "\x1b[200~touch {}\necho pasted-ran\x1b[201~\r",
                    forbidden_paste.display()
                ),
                "echo after=$((1+1))\n".to_string(),
                "exit\n".to_string(),
            ] {
                std::thread::sleep(Duration::from_millis(400));
                stdin.write_all(line.as_bytes()).unwrap();
            }
            child.wait_with_output().unwrap()
        })
        .await
    };
    let (so, se) = text(&o);
    assert!(so.contains("denied by rule no-destroy"), "{so}\n{se}");
    assert!(
        so.contains("denied by rule no-forbidden-files"),
        "{so}\n{se}"
    );
    assert!(so.contains("after=2"), "{so}\n{se}");
    assert!(!forbidden_pty.exists(), "a denied line ran");
    assert!(!forbidden_paste.exists(), "a denied paste ran");
    assert!(!so.contains("\rpasted-ran\r\n"), "a denied paste ran: {so}");

    // Without a terminal (`ssh host < script`), a line is held until it is
    // decided: bytes sent to a shell's stdin cannot be taken back. A last
    // line without a newline is decided at EOF.
    let (f1, f2) = (e.dir.join("forbidden-piped"), e.dir.join("forbidden-last"));
    let script = format!(
        "echo one\ntouch {}\necho two\ntouch {}",
        f1.display(),
        f2.display()
    );
    let o = {
        let mut c = ssh(Some("scripted check"), &["-T", "--"]);
        blocking(move || {
            c.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = c.spawn().unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        })
        .await
    };
    let (so, se) = text(&o);
    assert_eq!(so, "one\ntwo\n", "{se}");
    assert_eq!(
        se.matches("denied by rule no-forbidden-files").count(),
        2,
        "{se}"
    );
    assert!(!f1.exists() && !f2.exists(), "a denied line ran");

    // A protected file cannot be removed over SFTP; the refusal names the rule.
    let remote = e.dir.join("remote");
    std::fs::create_dir_all(&remote).unwrap();
    std::fs::write(remote.join("protected.txt"), "keep me").unwrap();
    let batch = e.dir.join("batch");
    std::fs::write(
        &batch,
        format!(
            "-rm {}/protected.txt\nls {}\n",
            remote.display(),
            remote.display()
        ),
    )
    .unwrap();
    let o = {
        let e = e.clone();
        let human = e.human();
        blocking(move || {
            let mut c = e.tool("sftp", &human);
            c.args(["-P", &e.gate_port.to_string(), "-o", "BatchMode=no"])
                .args(client_opts())
                .arg("-b")
                .arg(&batch)
                .arg(e.remote());
            run(&mut c)
        })
        .await
    };
    let (so, se) = text(&o);
    assert!(remote.join("protected.txt").exists(), "{so}\n{se}");
    assert!(se.contains("Permission denied"), "{so}\n{se}");

    let events = e.stack.events().await;
    let cmds = kinds(&events, v1::AuditKind::Command);
    let find = |t: &str| {
        cmds.iter()
            .find(|c| command_text(c).contains(t))
            .unwrap_or_else(|| panic!("no command {t}"))
    };
    let up = find("uptime");
    let decision = |c: &v1::AuditEvent| c.decision.as_ref().unwrap().rule.clone();
    let reasoned = cmds
        .iter()
        .find(|c| command_text(c) == "uptime" && c.reasoning.is_some())
        .unwrap();
    let r = reasoned.reasoning.as_ref().unwrap();
    assert_eq!(r.reasoning, "check the load before the deploy");
    assert_eq!(r.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(reasoned.traceparent, traceparent);
    assert_eq!(reasoned.principal.as_ref().unwrap().subject, "deploy-bot");
    assert!(decision(up).contains("reasoning") || up.reasoning.is_some());
    let left = find("touched-after-leaving");
    assert_eq!(
        left.details.get("approval_outcome").map(String::as_str),
        Some("abandoned"),
        "{left:?}"
    );
    assert_eq!(left.details.get("approval"), Some(&abandoned));
    assert_eq!(
        left.decision.as_ref().unwrap().effect,
        v1::Effect::Deny as i32
    );
    let rm = find("rm -rf /boot/wicket-test-nonexistent");
    assert_eq!(decision(rm), "no-destroy");
    assert_eq!(
        rm.command
            .as_ref()
            .unwrap()
            .classification
            .as_ref()
            .unwrap()
            .kind,
        "destroy"
    );
    assert!(
        cmds.iter()
            .any(|c| command_text(c) == "echo mail [redacted:email]"),
        "typed lines are recorded, masked"
    );
    assert!(
        cmds.iter()
            .all(|c| !command_text(c).contains("ada@example.com"))
    );
    assert!(
        cmds.iter()
            .any(|c| c.details.get("approval_outcome").map(String::as_str) == Some("approved"))
    );
    assert!(
        cmds.iter()
            .any(|c| c.details.get("approval_outcome").map(String::as_str) == Some("denied"))
    );
    assert_eq!(decision(find("remove ")), "no-protected-removal");

    // The terminal recording plays in asciinema, masked.
    let shell_cast = casts(&events)
        .into_iter()
        .find(|c| c.contains("after=2"))
        .expect("a recording of the shell");
    assert!(!shell_cast.contains("ada@example.com"), "{shell_cast}");
    let file = e.dir.join("shell.cast");
    std::fs::write(&file, &shell_cast).unwrap();
    // asciinema's own reader (Debian's asciinema package) loads it.
    let reader = [
        "import sys",
        "from asciinema.asciicast import open_from_url",
        "with open_from_url(sys.argv[1]) as cast:",
        "    assert cast.v2_header['width'] > 0",
        "    last = 0",
        "    for t, code, data in cast.events():",
        "        assert t >= last and code in 'oir'",
        "        last = t",
        "        if code == 'o':",
        "            sys.stdout.write(data)",
    ]
    .join("\n");
    let o = run(Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(reader)
        .arg(&file));
    let (so, se) = text(&o);
    assert!(o.status.success(), "asciinema cat: {se}\n{shell_cast}");
    assert!(so.contains("after=2"), "{so}");
    assert!(so.contains("[redacted:email]"), "{so}");
    assert!(so.contains("denied by rule no-destroy"), "{so}");
}

/// Accepts any host key (the test's own gate).
struct AnyHost;

impl russh::client::Handler for AnyHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Reads from `s` until the peer closes, or fails after `limit`.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_cleanly_and_sessions_end_from_outside() {
    use tokio::io::AsyncWriteExt;
    let e = Arc::new(
        start_with(|c| {
            c.login_grace = Duration::from_secs(2);
            c.max_channels = 4;
        })
        .await,
    );
    let addr = ("127.0.0.1", e.gate_port);

    // Wrong, expired and foreign tokens: refused, and audited.
    for bad in [
        "not-a-token".to_string(),
        e.stack.idp.mint(&TokenSpec {
            ttl_seconds: -60,
            ..TokenSpec::human("ada", &["ops"])
        }),
        e.stack
            .idp
            .mint_with_foreign_key(&TokenSpec::human("ada", &["ops"])),
    ] {
        let f = e.dir.join("bad-token");
        std::fs::write(&f, bad).unwrap();
        let o = run(&mut e.ssh(&f, &["--", "true"]));
        let (_, se) = text(&o);
        assert_eq!(o.status.code(), Some(255), "{se}");
        assert!(se.contains("Permission denied"), "{se}");
    }
    assert!(e.stack.sidecar.metrics.encode().contains("auth_failures"));

    // A client that stalls in the key exchange is disconnected after the grace time.
    let mut stall = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut stall, Duration::from_secs(6)).await);
    let mut stall = tokio::net::TcpStream::connect(addr).await.unwrap();
    stall.write_all(b"SSH-2.0-staller\r\n").await.unwrap();
    assert!(closed_within(&mut stall, Duration::from_secs(6)).await);
    // Garbage after the version line ends the connection, nothing else.
    let mut junk = tokio::net::TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"SSH-2.0-junk\r\n").await.unwrap();
    let noise: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = junk.write_all(&noise).await;
    assert!(closed_within(&mut junk, Duration::from_secs(6)).await);

    // A flood of channel opens: a bounded number is served, the rest refused.
    let token = e.stack.idp.mint(&TokenSpec::human("ada", &["ops"]));
    let mut h = russh::client::connect(Arc::new(russh::client::Config::default()), addr, AnyHost)
        .await
        .unwrap();
    assert!(
        h.authenticate_password("bot", &token)
            .await
            .unwrap()
            .success()
    );
    let mut opened = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        match h.channel_open_session().await {
            Ok(c) => opened.push(c),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(opened.len(), 4);
    assert_eq!(refused, 36);
    drop(opened);
    let _ = h
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;

    // The gate still serves.
    let human = e.human();
    let o = run(&mut e.ssh(&human, &["--", "echo still here"]));
    assert_eq!(text(&o).0, "still here\n", "{:?}", text(&o));

    // A live session ends when its token expires…
    let short = e.token(&TokenSpec {
        ttl_seconds: 3,
        ..TokenSpec::human("ada", &["ops"])
    });
    let started = std::time::Instant::now();
    let o = {
        let mut c = e.ssh(&short, &["--", "sleep 30"]);
        blocking(move || run(&mut c)).await
    };
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        text(&o)
    );
    assert!(text(&o).1.contains("expired"), "{:?}", text(&o));

    // …and when its principal is revoked.
    let mut c = e.ssh(&human, &["--", "sleep 30"]);
    let live = tokio::task::spawn_blocking(move || run(&mut c));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    v1::principal_admin_service_client::PrincipalAdminServiceClient::new(e.stack.channel.clone())
        .revoke_principal(wicket_teststack::auth(
            v1::RevokePrincipalRequest {
                issuer: e.stack.idp.issuer(),
                subject: "ada".into(),
                reason: "left the team".into(),
                duration_seconds: 0,
            },
            &e.stack.admin(),
        ))
        .await
        .unwrap();
    let o = tokio::time::timeout(Duration::from_secs(20), live)
        .await
        .expect("the revoked session ended")
        .unwrap();
    assert!(text(&o).1.contains("revoked"), "{:?}", text(&o));
    let o = run(&mut e.ssh(&human, &["--", "true"]));
    assert_eq!(o.status.code(), Some(255), "{:?}", text(&o));

    // A session's end is recorded once its channels are done (the host may
    // take a few seconds to close a channel whose command still runs).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = e.stack.events().await;
        let ends: Vec<String> = kinds(&events, v1::AuditKind::SessionEnd)
            .iter()
            .map(|e| e.end_reason.clone())
            .collect();
        if ends.iter().any(|r| r == "token_expired") && ends.iter().any(|r| r == "revoked") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ends:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Signs `user_key`'s public key with `ca` using OpenSSH's `ssh-keygen`.
fn sign_cert(ca: &Path, user_key: &Path, principal: &str, validity: &str) {
    let o = run(Command::new("ssh-keygen").args([
        "-q",
        "-s",
        ca.to_str().unwrap(),
        "-I",
        "ada",
        "-n",
        "bot",
        "-V",
        validity,
        "-O",
        &format!("extension:wicket-principal@wicket.dev={principal}"),
        user_key.with_extension("pub").to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{:?}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_certificates_from_the_trusted_ca_log_in_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let other_ca = dir.path().join("other_ca");
    keygen(&ca);
    keygen(&other_ca);
    let ca_pub = russh::keys::load_public_key(ca.with_extension("pub")).unwrap();
    let e = Arc::new(start_with(move |c| c.user_cas = vec![ca_pub]).await);
    let principal = serde_json::json!({
        "subject": "ada", "issuer": e.stack.idp.issuer(), "kind": "human",
        "groups": ["ops"], "display_name": "ada@example.test", "client_id": "wicket-cli",
    })
    .to_string();
    let login = |key: &Path| {
        run(&mut key_ssh(
            e.gate_port,
            key,
            "bot@127.0.0.1",
            "echo certified",
        ))
    };
    let cases = [
        ("good", &ca, "-5m:+1h", true),
        ("expired", &ca, "20200101:20200102", false),
        ("foreign", &other_ca, "-5m:+1h", false),
    ];
    for (name, signer, validity, ok) in cases {
        let key = dir.path().join(name);
        keygen(&key);
        sign_cert(signer, &key, &principal, validity);
        let o = login(&key);
        let (so, se) = text(&o);
        if ok {
            assert_eq!(so, "certified\n", "{name}: {se}");
        } else {
            assert_eq!(o.status.code(), Some(255), "{name}: {so}{se}");
            assert!(se.contains("Permission denied"), "{name}: {se}");
        }
    }
    // A session on a certificate ends when the certificate expires.
    let short = dir.path().join("short");
    keygen(&short);
    sign_cert(&ca, &short, &principal, "-1m:+4s");
    let started = std::time::Instant::now();
    let o = {
        let mut c = key_ssh(e.gate_port, &short, "bot@127.0.0.1", "sleep 30");
        blocking(move || run(&mut c)).await
    };
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        text(&o)
    );
    assert!(text(&o).1.contains("expired"), "{:?}", text(&o));
    // A plain key (no certificate) is not a credential.
    let o = login(&e.sshd.direct_key);
    assert_eq!(o.status.code(), Some(255));
    // `wicket ssh login`'s path: the control service signs the key for the
    // token's principal; the gate trusts that CA through its bundle.
    let key = dir.path().join("from-control");
    keygen(&key);
    let token = e.stack.idp.mint(&TokenSpec {
        ttl_seconds: 300,
        ..TokenSpec::human("ada", &["ops"])
    });
    let signed =
        v1::credential_service_client::CredentialServiceClient::new(e.stack.channel.clone())
            .sign_ssh_key(wicket_teststack::auth(
                v1::SignSshKeyRequest {
                    public_key: std::fs::read_to_string(key.with_extension("pub")).unwrap(),
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
    let valid_before = signed.valid_before.unwrap().seconds;
    let now = chrono::Utc::now().timestamp();
    assert!(
        valid_before <= now + 300 && valid_before > now + 200,
        "expires with the token"
    );
    let mut cert_path = key.clone().into_os_string();
    cert_path.push("-cert.pub");
    std::fs::write(&cert_path, signed.certificate).unwrap();
    let o = login(&key);
    assert_eq!(text(&o).0, "certified\n", "{:?}", text(&o));
    let events = e.stack.events().await;
    let starts = kinds(&events, v1::AuditKind::SessionStart);
    assert_eq!(starts.len(), 3);
    assert_eq!(starts[0].principal.as_ref().unwrap().subject, "ada");
    assert!(
        kinds(&events, v1::AuditKind::Command)
            .iter()
            .any(|c| command_text(c) == "echo certified")
    );
}

/// A TCP echo service on a free loopback port.
async fn echo_service() -> u16 {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// Sends `payload` to `port` (retrying until something listens) and returns the echo.
fn round_trip(port: u16, payload: &[u8], limit: Duration) -> Vec<u8> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.write_all(payload).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            if !got.is_empty() {
                return got;
            }
        }
        if std::time::Instant::now() > deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_and_agent_forwarding_follow_policy() {
    let e = Arc::new(start().await);
    let human = e.human();
    let agent = e.agent();

    // ssh -R: allowed for people, carries traffic from the host's side back.
    let echo = echo_service().await;
    let remote = free_port();
    let mut fwd = e
        .ssh(
            &human,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("{remote}:127.0.0.1:{echo}"),
                "--",
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let got =
        blocking(move || round_trip(remote, b"through the back door", Duration::from_secs(15)))
            .await;
    let _ = fwd.kill();
    let out = fwd.wait_with_output().unwrap();
    assert_eq!(got, b"through the back door", "{:?}", text(&out));
    // …and refused for agents.
    let o = {
        let mut c = e.ssh(
            &agent,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("{}:127.0.0.1:{echo}", free_port()),
                "--",
            ],
        );
        blocking(move || run(&mut c)).await
    };
    assert_eq!(o.status.code(), Some(255), "{:?}", text(&o));
    assert!(text(&o).1.contains("forwarding failed"), "{:?}", text(&o));

    // ssh -A: the host reaches the caller's agent only when policy allows.
    let sock = e.dir.join("agent.sock");
    let mut ssh_agent = Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "ssh-agent did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = run(Command::new("ssh-add")
        .arg(&e.sshd.direct_key)
        .env("SSH_AUTH_SOCK", &sock));
    assert!(o.status.success(), "{:?}", text(&o));
    let listed = |token: &Path, reasoning: bool| {
        let mut c = e.ssh(token, &["-A", "--", "ssh-add -l"]);
        c.env("SSH_AUTH_SOCK", &sock);
        if reasoning {
            c.env("WICKET_REASONING", "deploy from the host");
        }
        run(&mut c)
    };
    let o = listed(&human, false);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("ED25519"), "{:?}", text(&o));
    let o = listed(&agent, true);
    assert!(!o.status.success(), "{:?}", text(&o));
    assert!(!text(&o).0.contains("ED25519"), "{:?}", text(&o));
    let _ = ssh_agent.kill();
    let _ = ssh_agent.wait();

    let events = e.stack.events().await;
    let cmds = kinds(&events, v1::AuditKind::Command);
    let decided = |t: &str, who: &str| {
        cmds.iter()
            .filter(|c| command_text(c).starts_with(t))
            .filter(|c| {
                events.iter().any(|s| {
                    s.session_id == c.session_id
                        && s.principal.as_ref().is_some_and(|p| p.subject == who)
                })
            })
            .map(|c| c.decision.as_ref().unwrap().effect)
            .collect::<Vec<_>>()
    };
    let allow = v1::Effect::Allow as i32;
    assert!(decided("remote forward", "ada").iter().all(|e| *e == allow));
    assert!(!decided("remote forward", "ada").is_empty());
    assert!(
        decided("remote forward", "deploy-bot")
            .iter()
            .all(|e| *e != allow)
    );
    assert!(
        decided("agent forwarding", "ada")
            .iter()
            .all(|e| *e == allow)
    );
    assert_eq!(decided("agent forwarding", "deploy-bot").len(), 1);
    assert!(
        decided("agent forwarding", "deploy-bot")
            .iter()
            .all(|e| *e != allow)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_key_is_not_the_pinned_one_is_refused() {
    let e = start_with(|c| {
        // Pin another key for the host.
        let other = c.upstream.known_hosts.with_file_name("other_known_hosts");
        let fake = c.upstream.known_hosts.with_file_name("fake_host_key");
        keygen(&fake);
        let line = std::fs::read_to_string(&c.upstream.known_hosts).unwrap();
        let host = line.split_whitespace().next().unwrap().to_string();
        let key = std::fs::read_to_string(fake.with_extension("pub")).unwrap();
        std::fs::write(&other, format!("{host} {key}")).unwrap();
        c.upstream.known_hosts = other;
    })
    .await;
    let token = e.human();
    // At the default log level, ssh prints why the channel did not open.
    let mut c = e.tool("ssh", &token);
    c.args(["-p", &e.gate_port.to_string(), "-o", "LogLevel=INFO"])
        .args(client_opts())
        .arg(e.remote())
        .arg("echo should not run");
    let o = run(&mut c);
    let (so, se) = text(&o);
    assert_ne!(o.status.code(), Some(0), "{so}{se}");
    assert!(!so.contains("should not run"));
    assert!(se.contains("SSH handshake with the host failed"), "{se}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_tokens_arrive_in_parts_at_the_keyboard_interactive_prompt() {
    let e = start().await;
    // Many groups make a token longer than the 1,023 bytes OpenSSH reads at
    // a prompt (tokens of real identity providers often are).
    let mut groups: Vec<String> = (0..60)
        .map(|i| format!("team-with-a-long-name-{i:03}"))
        .collect();
    groups.push("ops".into());
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    let token = e.token(&TokenSpec::human("ada", &groups));
    assert!(std::fs::read_to_string(&token).unwrap().len() > 2 * 1023);
    // What `wicket ssh askpass PROMPT` does: part N for "… part N: ".
    let parts = e.dir.join("askpass-parts");
    std::fs::write(
        &parts,
        "#!/bin/sh\nt=$(cat \"$WICKET_TEST_TOKEN_FILE\")\ncase \"$1\" in\n  *'part '*) n=$(printf '%s' \"$1\" | sed 's/.*part \\([0-9]*\\).*/\\1/') ;;\n  *) n=1 ;;\nesac\nprintf '%s\\n' \"$t\" | cut -c \"$(( (n - 1) * 1023 + 1 ))-$(( n * 1023 ))\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&parts, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut c = e.tool("ssh", &token);
    c.env("SSH_ASKPASS", &parts)
        .args(["-p", &e.gate_port.to_string()])
        .args(["-o", "PreferredAuthentications=keyboard-interactive"])
        .args(client_opts())
        .arg(e.remote())
        .arg("echo in");
    let o = blocking(move || run(&mut c)).await;
    assert_eq!(text(&o).0, "in\n", "{:?}", text(&o));
    // Through the password method the client cuts it: refused, not mangled into a login.
    let o = run(&mut e.ssh(&token, &["--", "echo in"]));
    assert_eq!(o.status.code(), Some(255), "{:?}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paramiko_works_through_the_gate() {
    let e = start().await;
    let python = wicket_testkit::env::require("WICKET_TEST_PYTHON");
    let token = e
        .stack
        .idp
        .mint(&TokenSpec::agent("deploy-bot", &["agents"]));
    let script = format!("{}/tests/paramiko_client.py", env!("CARGO_MANIFEST_DIR"));
    let target = e.dir.join("from-paramiko.bin");
    let mut c = Command::new(python);
    c.arg(script)
        .arg("127.0.0.1")
        .arg(e.gate_port.to_string())
        .arg(token)
        .arg(&target);
    let o = blocking(move || run(&mut c)).await;
    let (so, se) = text(&o);
    assert!(o.status.success(), "{so}{se}");
    let seen: serde_json::Value = serde_json::from_str(so.trim()).unwrap();
    assert_eq!(seen["exec_out"], "hello\n");
    assert_eq!(seen["exec_status"], 4);
    assert_eq!(seen["denied_status"], 126);
    assert!(
        seen["denied_err"].as_str().unwrap().contains("no-destroy"),
        "{seen}"
    );
    assert_eq!(seen["sftp_size"], 300_000);
    assert_eq!(seen["sftp_back"], 300_000);
    assert_eq!(seen["shell"], true);
    assert_eq!(seen["resized"], true, "{seen}");
    // The recording has the resize (written when the channel's task ends,
    // a moment after the client left).
    let recorded = |events: &[v1::AuditEvent]| {
        kinds(events, v1::AuditKind::Output).iter().any(|o| {
            o.details
                .get("asciicast")
                .is_some_and(|l| l.contains("\"r\",\"101x41\""))
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !recorded(&e.stack.events().await) {
        assert!(
            std::time::Instant::now() < deadline,
            "no resize event recorded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
