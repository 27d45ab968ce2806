//! A real OpenSSH server for tests: `/usr/sbin/sshd` on a free loopback
//! port, for the user running the tests, with keys made by `ssh-keygen`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Makes an ed25519 key pair at `path` (and `path.pub`), without a passphrase.
pub fn keygen(path: &Path) {
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (openssh-client) runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A key pair's public half, as one `authorized_keys` or `known_hosts` line.
pub fn public_key(key: &Path) -> String {
    std::fs::read_to_string(key.with_extension("pub")).expect("the key's .pub file")
}

/// A running sshd; stopped when dropped.
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The user it lets in (the one running the tests).
    pub user: String,
    /// A `known_hosts` file pinning its host key.
    pub known_hosts: PathBuf,
}

impl Sshd {
    /// Starts sshd with its files in `dir`, authorising the public keys of
    /// `keys` (made with [`keygen`]) for the current user, with `extra`
    /// lines appended to its configuration (`Subsystem sftp internal-sftp`,
    /// …). Its log goes to `dir/sshd.log`. Waits until it listens.
    pub fn start(dir: &Path, keys: &[&Path], extra: &str) -> Sshd {
        let user = String::from_utf8(
            Command::new("id")
                .arg("-un")
                .output()
                .expect("id runs")
                .stdout,
        )
        .expect("a UTF-8 user name")
        .trim()
        .to_string();
        // sshd insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let host = dir.join("host_key");
        keygen(&host);
        let authorized: String = keys.iter().map(|k| public_key(k)).collect();
        std::fs::write(dir.join("authorized_keys"), authorized).expect("write authorized_keys");
        let port = crate::free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {dir}/sshd.pid\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin yes\nLogLevel ERROR\n{extra}",
                host = host.display(),
                dir = dir.display(),
            ),
        )
        .expect("write sshd_config");
        let log = std::fs::File::create(dir.join("sshd.log")).expect("create sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("sshd (openssh-server) runs");
        let mut sshd = Sshd {
            child,
            port,
            user,
            known_hosts: dir.join("known_hosts"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = sshd.child.try_wait() {
                panic!(
                    "sshd exited ({status}): {}",
                    std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "sshd did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(
            &sshd.known_hosts,
            format!("[127.0.0.1]:{port} {}", public_key(&host)),
        )
        .expect("write known_hosts");
        sshd
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
