//! `wicket-demo-idp`: the local identity provider of `cargo xtask demo`.
//!
//! Serves OIDC discovery, JWKS, client credentials and an auto-approving
//! device flow on loopback, and writes ready-made demo tokens as shell
//! `export` lines. For demos and tests only: it signs whatever it is asked.

use std::io::Write as _;

use wicket_testkit::arg;
use wicket_testkit::idp::{TestIdp, TokenSpec};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let listen = arg("--listen").unwrap_or_else(|| "127.0.0.1:7480".into());
    let audience = arg("--audience").unwrap_or_else(|| "wicket".into());
    let idp = TestIdp::start_on(&listen, &audience).await;
    // Behind a name (a compose service), tokens carry that name as issuer.
    if let Some(issuer) = arg("--issuer") {
        idp.set_issuer(&issuer);
    }
    let twelve_hours = 12 * 3600;
    let admin = TokenSpec {
        ttl_seconds: twelve_hours,
        ..TokenSpec::human("demo-admin", &["wicket-admins", "dba"])
    };
    let approver = TokenSpec {
        ttl_seconds: twelve_hours,
        ..TokenSpec::human("demo-approver", &["wicket-approvers", "dba"])
    };
    let agent = TokenSpec {
        ttl_seconds: twelve_hours,
        ..TokenSpec::agent("demo-agent", &["agents"])
    };
    idp.add_client("demo-agent", "demo-agent-secret", agent.clone());
    idp.set_device_user(admin.clone());
    let lines = [
        ("WICKET_OIDC_ISSUER", idp.issuer()),
        ("WICKET_ADMIN_TOKEN", idp.mint(&admin)),
        ("WICKET_APPROVER_TOKEN", idp.mint(&approver)),
        ("WICKET_AGENT_TOKEN", idp.mint(&agent)),
    ];
    let text: String = lines
        .iter()
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();
    match arg("--env-file") {
        Some(path) => {
            let mut f = std::fs::File::create(&path).unwrap_or_else(|e| {
                eprintln!("wicket-demo-idp: cannot write {path}: {e}");
                std::process::exit(1)
            });
            f.write_all(text.as_bytes()).expect("write env file");
        }
        None => print!("{text}"),
    }
    eprintln!("wicket-demo-idp: issuer {} ready", idp.issuer());
    idp.serve_forever().await;
}
