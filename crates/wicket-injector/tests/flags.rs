//! Every environment variable the injector gives a gate is one that gate's
//! binary reads: a renamed flag breaks this test, not a cluster.

use serde_json::json;
use wicket_injector::inject::{Plan, container};
use wicket_injector::settings::{Protocol, Settings};

fn declared(files: &[&str]) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../");
    files
        .iter()
        .map(|f| std::fs::read_to_string(format!("{root}{f}")).unwrap())
        .collect()
}

#[test]
fn every_variable_a_gate_gets_is_a_flag_of_that_gate() {
    let s = Settings::from_json(
        &json!({
            "control": {"url": "https://wicket-control:7470", "caSecret": "wicket-control-ca"},
            "oidc": {"issuer": "https://idp", "groupsClaim": "roles", "agentRules": ["client-credentials"]},
        })
        .to_string(),
        "test",
    )
    .unwrap();
    for p in Protocol::ALL {
        let plan = Plan {
            protocol: p,
            connection: "c".into(),
            listen_port: p.default_listen_port(),
            upstream: Some("127.0.0.1:1".into()),
            credentials_secret: Some("creds".into()),
            tls_secret: Some("tls".into()),
            host_key_secret: (p == Protocol::Ssh).then(|| "host-key".into()),
            sidecar_secret: "wicket-sidecar-c".into(),
            native: true,
        };
        let c = container(&plan, &s);
        let source = declared(&[
            &format!("wicket-{p}/src/main.rs"),
            "wicket-sidecar/src/config.rs",
            "wicket-sidecar/src/process.rs",
        ]);
        for e in c.env.iter().flatten() {
            assert!(
                source.contains(&format!("env = \"{}\"", e.name)),
                "wicket-{p} has no flag reading {}",
                e.name
            );
        }
        // Paths the gate is pointed at are inside its mounts.
        let mounts: Vec<String> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.clone())
            .collect();
        for e in c.env.iter().flatten() {
            if let Some(v) = e.value.as_deref().filter(|v| v.starts_with('/')) {
                assert!(
                    mounts.iter().any(|m| v.starts_with(m.as_str())),
                    "{p}: {}={v} is outside the mounts {mounts:?}",
                    e.name
                );
            }
        }
    }
}
