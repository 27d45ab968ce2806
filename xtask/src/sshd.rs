//! A throwaway OpenSSH server (the demo host, and the benchmark's), with
//! the keys `ssh-keygen` makes: its host key, a key for the SSH gate and a
//! key for direct logins, both authorized for the user running it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{self, Children, port_open, wait_for};

/// A running `sshd`.
pub struct Sshd {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The account it logs in (the user running it).
    pub user: String,
    /// The gate's private key (authorized).
    pub gate_key: PathBuf,
    /// A key for direct logins (authorized).
    pub direct_key: PathBuf,
    /// A known_hosts file pinning its host key.
    pub known_hosts: PathBuf,
}

fn keygen(path: &Path) -> Result<(), String> {
    if path.exists() {
        return Ok(());
    }
    util::run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            &path.display().to_string(),
        ],
        &[],
    )
}

fn read(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// Starts `sshd` on `port` with its files in `dir`, as one of `kids`.
pub fn start(dir: &Path, port: u16, kids: &mut Children) -> Result<Sshd, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    // sshd's privilege separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let host = dir.join("host_key");
    let gate_key = dir.join("gate_key");
    let direct_key = dir.join("direct_key");
    for k in [&host, &gate_key, &direct_key] {
        keygen(k)?;
    }
    std::fs::write(
        dir.join("authorized_keys"),
        format!(
            "{}{}",
            read(&gate_key.with_extension("pub"))?,
            read(&direct_key.with_extension("pub"))?
        ),
    )
    .map_err(|e| e.to_string())?;
    if port_open(port) {
        return Err(format!("port {port} (for sshd) is already in use"));
    }
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {h}\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin yes\n\
             Subsystem sftp internal-sftp\nAllowTcpForwarding yes\nMaxSessions 64\n\
             MaxStartups 100\nLogLevel ERROR\n",
            h = host.display(),
            d = dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("sshd.log")).map_err(|e| e.to_string())?;
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f", &config.display().to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start sshd: {e}"))?;
    kids.push("sshd", child);
    wait_for(15, "sshd", || port_open(port))?;
    let known_hosts = dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{port} {}", read(&host.with_extension("pub"))?),
    )
    .map_err(|e| e.to_string())?;
    let user = String::from_utf8_lossy(
        &Command::new("id")
            .arg("-un")
            .output()
            .map_err(|e| e.to_string())?
            .stdout,
    )
    .trim()
    .to_string();
    Ok(Sshd {
        port,
        user,
        gate_key,
        direct_key,
        known_hosts,
    })
}

/// Writes an `SSH_ASKPASS` program at `path` that answers with `token`.
pub fn askpass(path: &Path, token: &str) -> Result<(), String> {
    std::fs::write(path, format!("#!/bin/sh\necho '{token}'\n")).map_err(|e| e.to_string())?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| e.to_string())
}
