//! End to end against a real, certified OpenID provider (npm `oidc-provider`,
//! started by `cargo xtask test`) and the real `wicket-control` and `wicket`
//! binaries (`WICKET_BIN_DIR`, built by `cargo xtask test`).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use wicket_core::PrincipalKind;
use wicket_identity::{AuthError, Config, Validator};
use wicket_testkit::env;

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env::require("WICKET_BIN_DIR")).join(name)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

async fn client_credentials(issuer: &str, id: &str, secret: &str) -> String {
    let resp: serde_json::Value = reqwest::Client::new()
        .post(format!("{issuer}/token"))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    resp["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{resp}"))
        .to_string()
}

#[tokio::test]
async fn validator_accepts_oidc_provider_tokens_and_refuses_tampering() {
    wicket_testkit::init_crypto();
    let issuer = env::oidc_issuer();
    let v = Validator::discover(Config::new(issuer.clone(), "wicket"))
        .await
        .unwrap();
    let agent = client_credentials(&issuer, "agent-bot", "agent-bot-secret").await;
    let id = v.validate(&agent).await.unwrap();
    assert_eq!(id.principal.subject, "agent-bot");
    assert_eq!(id.principal.issuer, issuer);
    assert_eq!(id.principal.kind, PrincipalKind::Agent);
    assert_eq!(id.principal.groups, ["agents"]);

    // Flip one character of the signature.
    let mut tampered = agent.clone().into_bytes();
    let i = tampered.len() - 5;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert_eq!(
        v.validate(&tampered).await.unwrap_err(),
        AuthError::Signature
    );

    // A validator for another audience refuses the same token.
    let other = Validator::discover(Config::new(issuer.clone(), "someone-else"))
        .await
        .unwrap();
    assert_eq!(
        other.validate(&agent).await.unwrap_err(),
        AuthError::Audience
    );
}

struct Control(Child);

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wicket(cache: &std::path::Path, control: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(bin("wicket"))
        .args(args)
        .current_dir(root())
        .env_remove("WICKET_TOKEN")
        .env("WICKET_CONTROL", control)
        .env("WICKET_CACHE_DIR", cache)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn control_and_cli_work_with_oidc_provider() {
    let issuer = env::oidc_issuer();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let control_url = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("control.log")).unwrap();
    let _control = Control(
        Command::new(bin("wicket-control"))
            .env("WICKET_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "WICKET_DATABASE_URL",
                format!("sqlite:{}", dir.path().join("w.db").display()),
            )
            .env("WICKET_OIDC_ISSUER", &issuer)
            .env("WICKET_POLICY_FILE", root().join("deploy/demo/policy.yaml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "wicket-control did not start:\n{}",
            std::fs::read_to_string(dir.path().join("control.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let admin_cache = dir.path().join("admin");
    let agent_cache = dir.path().join("agent");

    // Admin robot: client credentials against the real provider.
    let out = wicket(
        &admin_cache,
        &control_url,
        &[("WICKET_CLIENT_SECRET", "admin-bot-secret")],
        &[
            "login",
            "--issuer",
            &issuer,
            "--client-credentials",
            "--client-id",
            "admin-bot",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = wicket(
        &admin_cache,
        &control_url,
        &[],
        &[
            "policy",
            "apply",
            "-f",
            "deploy/demo/policy.yaml",
            "-o",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["changed"], false, "the policy file was loaded at start");
    let out = wicket(
        &admin_cache,
        &control_url,
        &[],
        &[
            "policy",
            "explain",
            "-c",
            "demo-db",
            "--principal",
            "agent-bot",
            "--agent",
            "--group",
            "agents",
            "--kind",
            "ddl",
            "--reasoning",
            "-o",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"]["effect"], "deny");
    assert_eq!(v["decision"]["rule"], "no-ddl-for-agents");
    let out = wicket(
        &admin_cache,
        &control_url,
        &[],
        &[
            "policy",
            "explain",
            "-c",
            "demo-db",
            "--principal",
            "agent-bot",
            "--agent",
            "--group",
            "agents",
            "--kind",
            "select",
            "-o",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"]["rule"], "require-reasoning");

    // Agent: signs in fine, but the admin API refuses it.
    let out = wicket(
        &agent_cache,
        &control_url,
        &[("WICKET_CLIENT_SECRET", "agent-bot-secret")],
        &[
            "login",
            "--issuer",
            &issuer,
            "--client-credentials",
            "--client-id",
            "agent-bot",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = wicket(&agent_cache, &control_url, &[], &["connections", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("permission denied"));

    // A wrong secret is refused by the provider, and said so.
    let out = wicket(
        &agent_cache,
        &control_url,
        &[("WICKET_CLIENT_SECRET", "nope")],
        &[
            "login",
            "--issuer",
            &issuer,
            "--client-credentials",
            "--client-id",
            "agent-bot",
        ],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("invalid_client"), "{}", stderr(&out));
}
