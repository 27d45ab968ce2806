//! The `wicket-demo-idp` binary serves discovery and writes usable demo tokens.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_idp_writes_tokens_and_serves_discovery() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("idp.env");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_wicket-demo-idp"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--env-file"])
        .arg(&env_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env_file.exists() {
        assert!(Instant::now() < deadline, "no env file");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let text = std::fs::read_to_string(&env_file).unwrap();
    for var in [
        "WICKET_OIDC_ISSUER",
        "WICKET_ADMIN_TOKEN",
        "WICKET_APPROVER_TOKEN",
        "WICKET_AGENT_TOKEN",
    ] {
        assert!(
            text.contains(&format!("export {var}='")),
            "{var} missing:\n{text}"
        );
    }
    assert!(text.contains(&format!("http://127.0.0.1:{port}")));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /.well-known/openid-configuration HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("device_authorization_endpoint"));
}

/// Kills the child even when an assertion fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
