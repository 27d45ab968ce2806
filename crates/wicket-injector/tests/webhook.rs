//! The webhook on AdmissionReview fixtures shaped as the API server sends
//! them (`tests/fixtures`): the patch it answers is applied to the pod, and
//! the result must deserialise into k8s-openapi's `Pod` with the gate in it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use wicket_injector::review::{Verdict, answer};
use wicket_injector::settings::Settings;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn settings(version: &str) -> Settings {
    let doc = json!({
        "control": {"url": "http://wicket-control.wicket.svc:7470"},
        "oidc": {"issuer": "https://idp.example.com", "audience": "wicket",
                 "agentRules": ["client-credentials", "claim:wicket_kind=agent"]},
        "image": {"repository": "ghcr.io/wicket-dev", "tag": "0.1.0"},
        "kubernetesVersion": version,
        "resources": [
            {"name": "orders-db", "protocol": "pg", "namespace": "payments",
             "credentialsSecret": "orders-db-login", "tlsSecret": "orders-db-tls",
             "description": "Orders", "rules": []},
            {"name": "bastion", "protocol": "ssh", "hostKeySecret": "bastion-host-key"}
        ]
    });
    Settings::from_json(&doc.to_string(), "test").unwrap()
}

/// Answers `review` and returns the verdict and the pod after the patch.
fn run(review: &Value, s: &Settings) -> (Verdict, Value, Value) {
    let a = answer(review.to_string().as_bytes(), s).unwrap();
    let out: Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    let resp = out["response"].clone();
    assert_eq!(resp["uid"], review["request"]["uid"]);
    let mut pod = review["request"]["object"].clone();
    if let Some(p) = resp["patch"].as_str() {
        assert_eq!(resp["patchType"], "JSONPatch");
        let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, p).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
    }
    (a.verdict, pod, resp)
}

fn env(c: &Container) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .map(|e| {
            let v = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    let r = from.secret_key_ref.as_ref().unwrap();
                    format!("secret:{}/{}", r.name, r.key)
                }
                _ => String::new(),
            };
            (e.name.clone(), v)
        })
        .collect()
}

fn gate<'a>(pod: &'a Pod, name: &str) -> (&'a Container, bool) {
    let spec = pod.spec.as_ref().unwrap();
    if let Some(c) = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == name)
    {
        return (c, true);
    }
    (
        spec.containers.iter().find(|c| c.name == name).unwrap(),
        false,
    )
}

fn mounts(c: &Container) -> BTreeMap<String, (String, bool)> {
    c.volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            (
                m.name.clone(),
                (m.mount_path.clone(), m.read_only == Some(true)),
            )
        })
        .collect()
}

fn assert_hardened(c: &Container) {
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user, Some(65532));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let r = c.resources.as_ref().unwrap();
    let q =
        |m: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         k: &str| m.as_ref().unwrap()[k].0.clone();
    assert_eq!(q(&r.requests, "cpu"), "50m");
    assert_eq!(q(&r.requests, "memory"), "64Mi");
    assert_eq!(q(&r.limits, "memory"), "256Mi");
    assert_eq!(q(&r.limits, "cpu"), "1");
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    let live = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/healthz"));
}

fn ports(c: &Container) -> BTreeMap<String, i32> {
    c.ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect()
}

fn volume_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect()
}

#[test]
fn a_postgres_pod_gets_a_native_sidecar_from_its_resource_entry() {
    let review = fixture("pg");
    let (verdict, after, resp) = run(&review, &settings("v1.30.4"));
    assert_eq!(resp["allowed"], true);
    assert!(
        matches!(verdict, Verdict::Injected(ref p) if p.native),
        "{verdict:?}"
    );
    let pod: Pod = serde_json::from_value(after.clone()).unwrap();
    let (c, native) = gate(&pod, "wicket-pg");
    assert!(native);
    // First init container, before the pod's own ones, and restartable.
    let inits = pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap();
    assert_eq!(inits[0].name, "wicket-pg");
    assert_eq!(inits[1].name, "init-schema");
    assert_eq!(c.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/wicket-dev/wicket-pg:0.1.0")
    );
    assert_hardened(c);
    assert_eq!(
        ports(c),
        BTreeMap::from([("wicket-pg".into(), 15432), ("wicket-admin".into(), 15090)])
    );
    let e = env(c);
    assert_eq!(e["WICKET_CONNECTION"], "orders-db");
    assert_eq!(e["WICKET_CONTROL"], "http://wicket-control.wicket.svc:7470");
    assert_eq!(
        e["WICKET_SIDECAR_TOKEN_FILE"],
        "/var/run/wicket/control/token"
    );
    assert_eq!(e["WICKET_OIDC_ISSUER"], "https://idp.example.com");
    assert_eq!(
        e["WICKET_AGENT_RULES"],
        "client-credentials,claim:wicket_kind=agent"
    );
    assert_eq!(e["WICKET_PG_LISTEN"], "0.0.0.0:15432");
    assert_eq!(e["WICKET_PG_UPSTREAM"], "127.0.0.1:5432");
    assert_eq!(
        e["WICKET_PG_UPSTREAM_USER"],
        "secret:orders-db-login/username"
    );
    assert_eq!(
        e["WICKET_PG_UPSTREAM_PASSWORD_FILE"],
        "/var/run/wicket/upstream/password"
    );
    assert_eq!(e["WICKET_TLS_CERT"], "/var/run/wicket/tls/tls.crt");
    assert_eq!(e["WICKET_ADMIN_LISTEN"], "0.0.0.0:15090");
    assert_eq!(
        mounts(c),
        BTreeMap::from([
            ("wicket-state".into(), ("/var/lib/wicket".into(), false)),
            (
                "wicket-control".into(),
                ("/var/run/wicket/control".into(), true)
            ),
            (
                "wicket-upstream".into(),
                ("/var/run/wicket/upstream".into(), true)
            ),
            ("wicket-tls".into(), ("/var/run/wicket/tls".into(), true)),
        ])
    );
    // The service-account volume the API server added stays first.
    assert_eq!(
        volume_names(&pod),
        [
            "kube-api-access-x7k2p",
            "wicket-state",
            "wicket-control",
            "wicket-upstream",
            "wicket-tls"
        ]
    );
    let vols = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    let secret = |n: &str| {
        vols.iter()
            .find(|v| v.name == n)
            .unwrap()
            .secret
            .as_ref()
            .unwrap()
            .secret_name
            .clone()
            .unwrap()
    };
    assert_eq!(secret("wicket-control"), "wicket-sidecar-orders-db");
    assert_eq!(secret("wicket-upstream"), "orders-db-login");
    assert_eq!(secret("wicket-tls"), "orders-db-tls");
    let state = vols.iter().find(|v| v.name == "wicket-state").unwrap();
    assert!(state.empty_dir.is_some());
    // The application container is untouched, the status annotation set,
    // and fields the API server sent survive the patch.
    assert_eq!(
        serde_json::to_value(&pod.spec.as_ref().unwrap().containers).unwrap(),
        serde_json::to_value(
            serde_json::from_value::<Pod>(review["request"]["object"].clone())
                .unwrap()
                .spec
                .unwrap()
                .containers
        )
        .unwrap()
    );
    assert_eq!(
        after["metadata"]["annotations"]["wicket.dev/status"],
        "injected"
    );
    assert_eq!(after["spec"]["preemptionPolicy"], "PreemptLowerPriority");
}

#[test]
fn each_protocol_gets_its_gate_with_its_credentials() {
    let s = settings("v1.29.0");
    let cases = [
        (
            "ssh",
            "wicket-ssh",
            15022,
            vec![
                ("WICKET_SSH_LISTEN", "0.0.0.0:15022"),
                ("WICKET_SSH_UPSTREAM", "127.0.0.1:2022"),
                ("WICKET_SSH_UPSTREAM_USER", "secret:bastion-login/username"),
                (
                    "WICKET_SSH_UPSTREAM_KEY_FILE",
                    "/var/run/wicket/upstream/ssh-privatekey",
                ),
                (
                    "WICKET_SSH_KNOWN_HOSTS",
                    "/var/run/wicket/upstream/known_hosts",
                ),
                (
                    "WICKET_SSH_HOST_KEY",
                    "/var/run/wicket/host-key/ssh-privatekey",
                ),
                ("WICKET_CONNECTION", "bastion"),
            ],
        ),
        (
            "k8s",
            "wicket-k8s",
            16443,
            vec![
                ("WICKET_K8S_LISTEN", "0.0.0.0:16443"),
                ("WICKET_TLS_KEY", "/var/run/wicket/tls/tls.key"),
                ("WICKET_CONNECTION", "prod-cluster"),
            ],
        ),
        (
            "http",
            "wicket-http",
            8443,
            vec![
                ("WICKET_HTTP_LISTEN", "0.0.0.0:8443"),
                (
                    "WICKET_HTTP_LOGIN_SESSION_KEY_FILE",
                    "/var/run/wicket/control/token",
                ),
                ("WICKET_HTTP_UPSTREAM", "http://127.0.0.1:9000"),
                (
                    "WICKET_HTTP_UPSTREAM_BEARER_FILE",
                    "/var/run/wicket/upstream/token",
                ),
                ("WICKET_CONNECTION", "billing-api"),
            ],
        ),
    ];
    for (name, container, port, want) in cases {
        let (verdict, after, resp) = run(&fixture(name), &s);
        assert_eq!(resp["allowed"], true, "{name}: {resp}");
        assert!(matches!(verdict, Verdict::Injected(_)), "{name}");
        let pod: Pod = serde_json::from_value(after).unwrap();
        let (c, native) = gate(&pod, container);
        assert!(native, "{name}: 1.29 has native sidecars");
        assert_hardened(c);
        assert_eq!(ports(c)[container], port, "{name}");
        let e = env(c);
        for (k, v) in want {
            assert_eq!(e.get(k).map(String::as_str), Some(v), "{name}: {k}");
        }
        // The SSH gate's host key comes from its Secret, so that the key
        // clients pinned survives the pod; other gates have none.
        let host_key = pod
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "wicket-host-key");
        if name == "ssh" {
            let secret = host_key.and_then(|v| v.secret.as_ref()).unwrap();
            assert_eq!(secret.secret_name.as_deref(), Some("bastion-host-key"));
            assert_eq!(
                mounts(c)["wicket-host-key"],
                ("/var/run/wicket/host-key".to_string(), true)
            );
        } else {
            assert!(host_key.is_none(), "{name}");
            assert!(!e.contains_key("WICKET_SSH_HOST_KEY"));
        }
        // The Kubernetes gate reaches the in-cluster API with the pod's
        // service account: no upstream flag, no upstream secret.
        if name == "k8s" {
            assert!(!e.contains_key("WICKET_K8S_UPSTREAM"));
            assert!(!mounts(c).contains_key("wicket-upstream"));
        }
    }
}

#[test]
fn older_clusters_get_a_regular_container_and_annotations_override() {
    let (_, after, _) = run(&fixture("pg"), &settings("v1.28.9-eks-036c24b"));
    let pod: Pod = serde_json::from_value(after).unwrap();
    let (c, native) = gate(&pod, "wicket-pg");
    assert!(!native);
    assert_eq!(c.restart_policy, None);
    assert_eq!(
        pod.spec.as_ref().unwrap().containers.last().unwrap().name,
        "wicket-pg"
    );
    // An unknown version is the classic form too (it works everywhere).
    let (_, after, _) = run(&fixture("pg"), &settings("unknown"));
    assert!(!gate(&serde_json::from_value(after).unwrap(), "wicket-pg").1);
    // The pod's own annotation wins, both ways.
    let mut review = fixture("pg");
    review["request"]["object"]["metadata"]["annotations"]["wicket.dev/native-sidecar"] =
        json!("true");
    let (_, after, _) = run(&review, &settings("v1.28.0"));
    assert!(gate(&serde_json::from_value(after).unwrap(), "wicket-pg").1);
    review["request"]["object"]["metadata"]["annotations"]["wicket.dev/native-sidecar"] =
        json!("false");
    let (_, after, _) = run(&review, &settings("v1.31.0"));
    assert!(!gate(&serde_json::from_value(after).unwrap(), "wicket-pg").1);
    // A pod without init containers gets the list created.
    let mut review = fixture("k8s");
    assert!(
        review["request"]["object"]["spec"]
            .get("initContainers")
            .is_none()
    );
    review["request"]["object"]["metadata"]["annotations"]["wicket.dev/native-sidecar"] =
        json!("true");
    let (_, after, _) = run(&review, &settings("v1.33.0"));
    assert_eq!(after["spec"]["initContainers"][0]["name"], "wicket-k8s");
}

#[test]
fn injection_is_idempotent() {
    let s = settings("v1.30.0");
    for name in ["pg", "ssh", "k8s", "http"] {
        let review = fixture(name);
        let (_, once, _) = run(&review, &s);
        let mut again = review.clone();
        again["request"]["object"] = once.clone();
        let (verdict, twice, resp) = run(&again, &s);
        assert_eq!(resp["allowed"], true);
        assert!(resp.get("patch").is_none(), "{name}: {resp}");
        assert_eq!(verdict, Verdict::Skipped("already injected"));
        assert_eq!(once, twice);
        // Without the status annotation, the existing container still stops
        // a second gate.
        again["request"]["object"]["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("wicket.dev/status");
        let (verdict, _, resp) = run(&again, &s);
        assert!(resp.get("patch").is_none());
        assert_eq!(
            verdict,
            Verdict::Skipped("the gate's container is already there")
        );
    }
}

#[test]
fn pods_that_ask_for_nothing_and_updates_pass_unchanged() {
    let s = settings("v1.30.0");
    let (verdict, after, resp) = run(&fixture("plain"), &s);
    assert_eq!(resp["allowed"], true);
    assert!(resp.get("patch").is_none());
    assert_eq!(verdict, Verdict::Skipped("not annotated"));
    assert_eq!(after, fixture("plain")["request"]["object"]);
    let mut update = fixture("pg");
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = update["request"]["object"].clone();
    let (verdict, _, resp) = run(&update, &s);
    assert_eq!(resp["allowed"], true);
    assert_eq!(verdict, Verdict::Skipped("not a CREATE"));
    let mut off = fixture("pg");
    off["request"]["object"]["metadata"]["annotations"]["wicket.dev/inject"] = json!("false");
    assert_eq!(run(&off, &s).0, Verdict::Skipped("not annotated"));
}

fn denied(review: &Value, s: &Settings) -> String {
    let (verdict, _, resp) = run(review, s);
    assert_eq!(resp["allowed"], false, "{resp}");
    assert!(resp.get("patch").is_none());
    assert_eq!(resp["status"]["code"], 403);
    let msg = resp["status"]["message"].as_str().unwrap().to_string();
    assert_eq!(verdict, Verdict::Denied(msg.clone()));
    msg
}

#[test]
fn wrong_requests_are_denied_saying_why() {
    let s = settings("v1.30.0");
    let with = |k: &str, v: Value| {
        let mut r = fixture("pg");
        r["request"]["object"]["metadata"]["annotations"][k] = v;
        r
    };
    let cases = [
        (
            with("wicket.dev/inject", json!("mysql")),
            "`mysql` is not a Wicket gate; use one of pg, ssh, k8s, http",
        ),
        (
            with("wicket.dev/listen-port", json!("70000")),
            "wicket.dev/listen-port: `70000` is not a port",
        ),
        (
            with("wicket.dev/upstream-port", json!("five")),
            "wicket.dev/upstream-port: `five` is not a port",
        ),
        (
            with("wicket.dev/listen-port", json!("5432")),
            "port 5432 is already used by container `postgres`",
        ),
        (
            with("wicket.dev/listen-port", json!("15090")),
            "the gate's admin port",
        ),
        (
            with("wicket.dev/connection", json!("Orders_DB")),
            "must be lowercase letters",
        ),
        (
            with("wicket.dev/credentials-secret", json!("bad/secret")),
            "not a valid Secret name",
        ),
        (
            with("wicket.dev/host-key-secret", json!("orders-db-host-key")),
            "wicket.dev/host-key-secret is for ssh gates only",
        ),
        (
            with("wicket.dev/native-sidecar", json!("maybe")),
            "not true or false",
        ),
        (
            with("wicket.dev/inject", json!("ssh")),
            "`ssh`, but the resource `orders-db` is `pg`",
        ),
        (
            with("wicket.dev/upstream", json!("db host:5432")),
            "is not an address",
        ),
    ];
    for (review, says) in cases {
        let msg = denied(&review, &s);
        assert!(msg.contains(says), "{msg} should say {says}");
    }
    let mut no_conn = fixture("pg");
    no_conn["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("wicket.dev/connection");
    assert!(denied(&no_conn, &s).contains("wicket.dev/connection is required"));
    let mut other_ns = fixture("pg");
    other_ns["request"]["namespace"] = json!("staging");
    assert!(denied(&other_ns, &s).contains("belongs to namespace `payments`, not `staging`"));
    let mut no_tls = fixture("k8s");
    no_tls["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("wicket.dev/tls-secret");
    assert!(denied(&no_tls, &s).contains("serves TLS only"));
    let mut no_sa = fixture("k8s");
    no_sa["request"]["object"]["spec"]["automountServiceAccountToken"] = json!(false);
    assert!(denied(&no_sa, &s).contains("automountServiceAccountToken is false"));
    let mut taken = fixture("pg");
    taken["request"]["object"]["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "wicket-state", "emptyDir": {}}));
    assert!(denied(&taken, &s).contains("already has a volume named `wicket-state`"));
    assert!(
        denied(&fixture("deployment"), &s).contains("only mutates pods, not apps/v1 Deployment")
    );
    let mut broken = fixture("pg");
    broken["request"]["object"]["spec"]["containers"] = json!("not a list");
    assert!(denied(&broken, &s).contains("not a valid pod"));
}

#[test]
fn bodies_that_are_not_reviews_are_errors_not_panics() {
    let s = settings("v1.30.0");
    let mut beta = fixture("pg");
    beta["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut no_request = fixture("pg");
    no_request.as_object_mut().unwrap().remove("request");
    let mut no_uid = fixture("pg");
    no_uid["request"].as_object_mut().unwrap().remove("uid");
    for (body, says) in [
        (b"".to_vec(), "not an AdmissionReview"),
        (b"{\"apiVersion\":".to_vec(), "not an AdmissionReview"),
        (vec![0xff, 0xfe, 0x00], "not an AdmissionReview"),
        (b"[1,2,3]".to_vec(), "not an AdmissionReview"),
        (
            beta.to_string().into_bytes(),
            "expected an admission.k8s.io/v1 AdmissionReview",
        ),
        (no_request.to_string().into_bytes(), "carries no request"),
        (no_uid.to_string().into_bytes(), "not an AdmissionReview"),
    ] {
        let e = answer(&body, &s).unwrap_err();
        assert!(e.contains(says), "{e}");
    }
    // Deep nesting and huge strings are errors or answers, never a crash.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(answer(deep.as_bytes(), &s).is_err());
    let mut huge = fixture("pg");
    huge["request"]["object"]["metadata"]["annotations"]["wicket.dev/connection"] =
        json!("x".repeat(1 << 20));
    assert!(denied(&huge, &s).contains("must be lowercase letters"));
}
