//! From an annotated pod to the same pod with its gate: the one place that
//! builds a Wicket sidecar container.
//!
//! Annotations (all optional but the first two):
//!
//! | annotation | meaning |
//! |---|---|
//! | `wicket.dev/inject` | `pg`, `ssh`, `k8s` or `http` |
//! | `wicket.dev/connection` | the connection (policy name, a `resources:` entry) |
//! | `wicket.dev/upstream-port` | the resource's port on the pod's loopback |
//! | `wicket.dev/upstream` | or a whole upstream (`host:port`, URL) |
//! | `wicket.dev/listen-port` | the gate's port |
//! | `wicket.dev/credentials-secret` | Secret holding the upstream credentials |
//! | `wicket.dev/tls-secret` | Secret (`tls.crt`, `tls.key`) the gate serves with |
//! | `wicket.dev/host-key-secret` | ssh: Secret (`ssh-privatekey`) holding the gate's host key |
//! | `wicket.dev/sidecar-secret` | Secret (`token`) with the gate's control credential |
//! | `wicket.dev/native-sidecar` | `true` / `false`, overriding the cluster default |
//!
//! The injector writes `wicket.dev/status: injected`; a pod carrying it, or
//! already holding a container of the gate's name, is left alone.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, Pod, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::settings::{Protocol, Resource, Settings};

/// Annotation naming the protocol to gate.
pub const INJECT: &str = "wicket.dev/inject";
/// Annotation naming the connection.
pub const CONNECTION: &str = "wicket.dev/connection";
/// Annotation: the resource's port on the pod's loopback.
pub const UPSTREAM_PORT: &str = "wicket.dev/upstream-port";
/// Annotation: a whole upstream address.
pub const UPSTREAM: &str = "wicket.dev/upstream";
/// Annotation: the gate's port.
pub const LISTEN_PORT: &str = "wicket.dev/listen-port";
/// Annotation: Secret with the upstream credentials.
pub const CREDENTIALS_SECRET: &str = "wicket.dev/credentials-secret";
/// Annotation: Secret with the gate's serving certificate.
pub const TLS_SECRET: &str = "wicket.dev/tls-secret";
/// Annotation: Secret with the SSH gate's host key, so that the key
/// clients pin outlives the pod.
pub const HOST_KEY_SECRET: &str = "wicket.dev/host-key-secret";
/// Annotation: Secret with the gate's control-service credential.
pub const SIDECAR_SECRET: &str = "wicket.dev/sidecar-secret";
/// Annotation: native sidecar or not, for this pod.
pub const NATIVE_SIDECAR: &str = "wicket.dev/native-sidecar";
/// Annotation the injector writes.
pub const STATUS: &str = "wicket.dev/status";

/// Where the injected container finds things.
const STATE_DIR: &str = "/var/lib/wicket";
const CONTROL_DIR: &str = "/var/run/wicket/control";
const CONTROL_CA_DIR: &str = "/var/run/wicket/control-ca";
const UPSTREAM_DIR: &str = "/var/run/wicket/upstream";
const TLS_DIR: &str = "/var/run/wicket/tls";
const HOST_KEY_DIR: &str = "/var/run/wicket/host-key";

/// What the injector decided for one pod.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing to do, and why.
    Skip(&'static str),
    /// The gate to add.
    Inject(Box<Injection>),
}

/// A gate to add to a pod: what was decided, and the container and volumes
/// that carry it out.
#[derive(Debug)]
pub struct Injection {
    /// What was decided.
    pub plan: Plan,
    /// The gate container ([`container`]).
    pub container: Container,
    /// Its volumes ([`volumes`]).
    pub volumes: Vec<Volume>,
}

/// The gate one pod gets, resolved from its annotations, the resource
/// entry and the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The protocol.
    pub protocol: Protocol,
    /// The connection name.
    pub connection: String,
    /// The gate's port.
    pub listen_port: u16,
    /// The upstream, when one is set (the Kubernetes gate's default is the
    /// in-cluster API server).
    pub upstream: Option<String>,
    /// Secret with the upstream credentials.
    pub credentials_secret: Option<String>,
    /// Secret with the serving certificate.
    pub tls_secret: Option<String>,
    /// Secret with the SSH gate's host key.
    pub host_key_secret: Option<String>,
    /// Secret with the control credential.
    pub sidecar_secret: String,
    /// Native sidecar (init container, `restartPolicy: Always`).
    pub native: bool,
}

/// Whether `s` is an RFC 1123 label (Service, port and container names).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is an RFC 1123 subdomain (Secret names).
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The container name of a gate.
pub fn container_name(p: Protocol) -> String {
    format!("wicket-{p}")
}

fn port(annotations: &BTreeMap<String, String>, key: &str) -> Result<Option<u16>, String> {
    match annotations.get(key) {
        None => Ok(None),
        Some(v) => match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(Some(p)),
            _ => Err(format!("{key}: `{v}` is not a port (1-65535)")),
        },
    }
}

fn secret(
    annotations: &BTreeMap<String, String>,
    key: &str,
    default: Option<&String>,
) -> Result<Option<String>, String> {
    match annotations
        .get(key)
        .map(|s| s.trim().to_string())
        .or_else(|| default.cloned())
    {
        None => Ok(None),
        Some(s) if is_dns_subdomain(&s) => Ok(Some(s)),
        Some(s) => Err(format!("{key}: `{s}` is not a valid Secret name")),
    }
}

/// Resolves a pod's annotations into a [`Plan`]: `Ok(None)` when the pod
/// asks for nothing, `Err` (a denial) when it asks for something wrong.
pub fn plan(
    annotations: &BTreeMap<String, String>,
    namespace: &str,
    settings: &Settings,
) -> Result<Option<Plan>, String> {
    let Some(raw) = annotations.get(INJECT).map(|s| s.trim()) else {
        return Ok(None);
    };
    if raw.is_empty() || raw == "false" {
        return Ok(None);
    }
    let protocol = Protocol::parse(raw).ok_or_else(|| {
        format!(
            "{INJECT}: `{raw}` is not a Wicket gate; use one of {}",
            Protocol::ALL.map(Protocol::as_str).join(", ")
        )
    })?;
    let connection = annotations
        .get(CONNECTION)
        .map(|s| s.trim().to_string())
        .ok_or_else(|| {
            format!("{CONNECTION} is required: the connection this pod's resource is, as the policy names it")
        })?;
    if !is_dns_label(&connection) {
        return Err(format!(
            "{CONNECTION}: `{connection}` must be lowercase letters, digits and dashes (at most 63)"
        ));
    }
    let resource: Option<&Resource> = settings.resource(&connection);
    if let Some(r) = resource {
        if r.protocol != protocol {
            return Err(format!(
                "{INJECT}: `{protocol}`, but the resource `{connection}` is `{}`",
                r.protocol
            ));
        }
        if let Some(ns) = &r.namespace
            && ns != namespace
        {
            return Err(format!(
                "the resource `{connection}` belongs to namespace `{ns}`, not `{namespace}`"
            ));
        }
    }
    let listen_port = port(annotations, LISTEN_PORT)?
        .or(resource.and_then(|r| r.listen_port))
        .unwrap_or(protocol.default_listen_port());
    if listen_port == settings.sidecar.admin_port {
        return Err(format!(
            "{LISTEN_PORT}: {listen_port} is the gate's admin port (metrics and probes)"
        ));
    }
    let upstream = match (annotations.get(UPSTREAM), port(annotations, UPSTREAM_PORT)?) {
        (Some(u), _) => Some(u.trim().to_string()),
        (None, Some(p)) => Some(loopback(protocol, p)),
        (None, None) => resource.and_then(|r| r.upstream.clone()).or_else(|| {
            protocol
                .default_upstream_port()
                .map(|p| loopback(protocol, p))
        }),
    };
    if let Some(u) = &upstream
        && (u.is_empty() || u.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(format!("{UPSTREAM}: `{u}` is not an address"));
    }
    let credentials_secret = secret(
        annotations,
        CREDENTIALS_SECRET,
        resource.and_then(|r| r.credentials_secret.as_ref()),
    )?;
    let tls_secret = secret(
        annotations,
        TLS_SECRET,
        resource.and_then(|r| r.tls_secret.as_ref()),
    )?;
    let host_key_secret = secret(
        annotations,
        HOST_KEY_SECRET,
        resource.and_then(|r| r.host_key_secret.as_ref()),
    )?;
    if host_key_secret.is_some() && protocol != Protocol::Ssh {
        return Err(format!(
            "{HOST_KEY_SECRET} is for ssh gates only (a `{protocol}` gate has no host key)"
        ));
    }
    let default_sidecar = format!("wicket-sidecar-{connection}");
    let sidecar_secret = secret(
        annotations,
        SIDECAR_SECRET,
        Some(
            resource
                .and_then(|r| r.sidecar_secret.as_ref())
                .unwrap_or(&default_sidecar),
        ),
    )?
    .unwrap_or(default_sidecar);
    if protocol == Protocol::K8s && tls_secret.is_none() {
        return Err(format!(
            "{TLS_SECRET} is required for k8s: the Kubernetes gate serves TLS only (kubectl sends its token)"
        ));
    }
    let native = match annotations.get(NATIVE_SIDECAR).map(|s| s.trim()) {
        None => settings.native(),
        Some("true") => true,
        Some("false") => false,
        Some(v) => return Err(format!("{NATIVE_SIDECAR}: `{v}` is not true or false")),
    };
    Ok(Some(Plan {
        protocol,
        connection,
        listen_port,
        upstream,
        credentials_secret,
        tls_secret,
        host_key_secret,
        sidecar_secret,
        native,
    }))
}

fn loopback(p: Protocol, port: u16) -> String {
    match p {
        Protocol::Http => format!("http://127.0.0.1:{port}"),
        Protocol::K8s => format!("https://127.0.0.1:{port}"),
        Protocol::Pg | Protocol::Ssh => format!("127.0.0.1:{port}"),
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: None,
            }),
            ..Default::default()
        }),
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn quantities(m: &BTreeMap<String, String>) -> Option<BTreeMap<String, Quantity>> {
    (!m.is_empty()).then(|| {
        m.iter()
            .map(|(k, v)| (k.clone(), Quantity(v.clone())))
            .collect()
    })
}

fn probe(path: &str, port: u16, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(port)),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// The gate container for `plan`.
pub fn container(plan: &Plan, settings: &Settings) -> Container {
    let p = plan.protocol;
    let admin = settings.sidecar.admin_port;
    let mut vars = vec![
        env("WICKET_CONNECTION", &plan.connection),
        env("WICKET_CONTROL", &settings.control.url),
        env("WICKET_SIDECAR_TOKEN_FILE", format!("{CONTROL_DIR}/token")),
        env("WICKET_STATE_DIR", STATE_DIR),
        env("WICKET_OIDC_ISSUER", &settings.oidc.issuer),
        env("WICKET_OIDC_AUDIENCE", &settings.oidc.audience),
        env("WICKET_ADMIN_LISTEN", format!("0.0.0.0:{admin}")),
        env("WICKET_LOG_FORMAT", &settings.sidecar.log_format),
    ];
    if let Some(claim) = &settings.oidc.groups_claim {
        vars.push(env("WICKET_GROUPS_CLAIM", claim));
    }
    if !settings.oidc.agent_rules.is_empty() {
        vars.push(env(
            "WICKET_AGENT_RULES",
            settings.oidc.agent_rules.join(","),
        ));
    }
    if settings.control.ca_secret.is_some() {
        vars.push(env(
            "WICKET_CONTROL_CA_CERT",
            format!("{CONTROL_CA_DIR}/ca.crt"),
        ));
    }
    if plan.tls_secret.is_some() {
        vars.push(env("WICKET_TLS_CERT", format!("{TLS_DIR}/tls.crt")));
        vars.push(env("WICKET_TLS_KEY", format!("{TLS_DIR}/tls.key")));
    }
    let listen = format!("0.0.0.0:{}", plan.listen_port);
    let upstream = plan.upstream.clone();
    let creds = plan.credentials_secret.as_deref();
    // Each gate's own flags; credentials follow the standard Secret types'
    // keys (basic-auth: username/password; ssh-auth: ssh-privatekey; a
    // bearer token: token).
    match p {
        Protocol::Pg => {
            vars.push(env("WICKET_PG_LISTEN", listen));
            vars.extend(upstream.map(|u| env("WICKET_PG_UPSTREAM", u)));
            if let Some(s) = creds {
                vars.push(env_from_secret("WICKET_PG_UPSTREAM_USER", s, "username"));
                vars.push(env(
                    "WICKET_PG_UPSTREAM_PASSWORD_FILE",
                    format!("{UPSTREAM_DIR}/password"),
                ));
            }
        }
        Protocol::Ssh => {
            vars.push(env("WICKET_SSH_LISTEN", listen));
            vars.extend(upstream.map(|u| env("WICKET_SSH_UPSTREAM", u)));
            if let Some(s) = creds {
                vars.push(env_from_secret("WICKET_SSH_UPSTREAM_USER", s, "username"));
                vars.push(env(
                    "WICKET_SSH_UPSTREAM_KEY_FILE",
                    format!("{UPSTREAM_DIR}/ssh-privatekey"),
                ));
                vars.push(env(
                    "WICKET_SSH_KNOWN_HOSTS",
                    format!("{UPSTREAM_DIR}/known_hosts"),
                ));
            }
            // Without it the gate makes a key in its state volume, which
            // a new pod does not have: clients would see the key change.
            if plan.host_key_secret.is_some() {
                vars.push(env(
                    "WICKET_SSH_HOST_KEY",
                    format!("{HOST_KEY_DIR}/ssh-privatekey"),
                ));
            }
        }
        Protocol::K8s => {
            vars.push(env("WICKET_K8S_LISTEN", listen));
            vars.extend(upstream.map(|u| env("WICKET_K8S_UPSTREAM", u)));
            if creds.is_some() {
                vars.push(env(
                    "WICKET_K8S_UPSTREAM_TOKEN_FILE",
                    format!("{UPSTREAM_DIR}/token"),
                ));
            }
        }
        Protocol::Http => {
            vars.push(env("WICKET_HTTP_LISTEN", listen));
            // Every replica of the application mounts the same control
            // credential: browser logins (when turned on) are sealed with a
            // key derived from it, so that any replica serves them.
            vars.push(env(
                "WICKET_HTTP_LOGIN_SESSION_KEY_FILE",
                format!("{CONTROL_DIR}/token"),
            ));
            vars.extend(upstream.map(|u| env("WICKET_HTTP_UPSTREAM", u)));
            if creds.is_some() {
                vars.push(env(
                    "WICKET_HTTP_UPSTREAM_BEARER_FILE",
                    format!("{UPSTREAM_DIR}/token"),
                ));
            }
        }
    }
    for (k, v) in &settings.sidecar.env {
        if !vars.iter().any(|e| &e.name == k) {
            vars.push(env(k, v));
        }
    }
    let mut mounts = vec![
        mount("wicket-state", STATE_DIR, false),
        mount("wicket-control", CONTROL_DIR, true),
    ];
    if settings.control.ca_secret.is_some() {
        mounts.push(mount("wicket-control-ca", CONTROL_CA_DIR, true));
    }
    if creds.is_some() {
        mounts.push(mount("wicket-upstream", UPSTREAM_DIR, true));
    }
    if plan.tls_secret.is_some() {
        mounts.push(mount("wicket-tls", TLS_DIR, true));
    }
    if plan.host_key_secret.is_some() {
        mounts.push(mount("wicket-host-key", HOST_KEY_DIR, true));
    }
    let res = &settings.sidecar.resources;
    Container {
        name: container_name(p),
        image: Some(settings.image.of(p)),
        image_pull_policy: Some(settings.image.pull_policy.clone()),
        ports: Some(vec![
            ContainerPort {
                name: Some(container_name(p)),
                container_port: i32::from(plan.listen_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("wicket-admin".into()),
                container_port: i32::from(admin),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        env: Some(vars),
        volume_mounts: Some(mounts),
        readiness_probe: Some(probe("/readyz", admin, 5)),
        liveness_probe: Some(probe("/healthz", admin, 10)),
        resources: Some(ResourceRequirements {
            requests: quantities(&res.requests),
            limits: quantities(&res.limits),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(settings.sidecar.run_as_user),
            run_as_group: Some(settings.sidecar.run_as_user),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        restart_policy: plan.native.then(|| "Always".into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            // Readable by the gate's non-root user; only this container
            // mounts it.
            default_mode: Some(0o444),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The volumes `plan` needs.
pub fn volumes(plan: &Plan, settings: &Settings) -> Vec<Volume> {
    let mut v = vec![
        Volume {
            name: "wicket-state".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: None,
                size_limit: Some(Quantity(settings.sidecar.state_size_limit.clone())),
            }),
            ..Default::default()
        },
        secret_volume("wicket-control", &plan.sidecar_secret),
    ];
    if let Some(ca) = &settings.control.ca_secret {
        v.push(secret_volume("wicket-control-ca", ca));
    }
    if let Some(s) = &plan.credentials_secret {
        v.push(secret_volume("wicket-upstream", s));
    }
    if let Some(s) = &plan.tls_secret {
        v.push(secret_volume("wicket-tls", s));
    }
    if let Some(s) = &plan.host_key_secret {
        v.push(secret_volume("wicket-host-key", s));
    }
    v
}

/// Decides for one pod and, when it asks for a gate that fits it, returns
/// the gate. `Err` is a denial, with the reason.
pub fn decide(pod: &Pod, namespace: &str, settings: &Settings) -> Result<Outcome, String> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if annotations.get(STATUS).map(String::as_str) == Some("injected") {
        return Ok(Outcome::Skip("already injected"));
    }
    let Some(plan) = plan(&annotations, namespace, settings)? else {
        return Ok(Outcome::Skip("not annotated"));
    };
    let Some(spec) = &pod.spec else {
        return Err("the pod has no spec".into());
    };
    let name = container_name(plan.protocol);
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    let all = || spec.containers.iter().chain(inits);
    if all().any(|c| c.name == name) {
        return Ok(Outcome::Skip("the gate's container is already there"));
    }
    let admin = settings.sidecar.admin_port;
    for c in all() {
        for p in c.ports.as_deref().unwrap_or_default() {
            if p.container_port == i32::from(plan.listen_port)
                || p.container_port == i32::from(admin)
            {
                return Err(format!(
                    "port {} is already used by container `{}`; choose another with {LISTEN_PORT}",
                    p.container_port, c.name
                ));
            }
            if p.name
                .as_deref()
                .is_some_and(|n| n == name || n == "wicket-admin")
            {
                return Err(format!(
                    "container `{}` already has a port named `{}`",
                    c.name,
                    p.name.as_deref().unwrap_or_default()
                ));
            }
        }
    }
    let volumes = volumes(&plan, settings);
    for v in spec.volumes.as_deref().unwrap_or_default() {
        if volumes.iter().any(|w| w.name == v.name) {
            return Err(format!(
                "the pod already has a volume named `{}`, which the gate needs",
                v.name
            ));
        }
    }
    if plan.protocol == Protocol::K8s
        && plan.credentials_secret.is_none()
        && spec.automount_service_account_token == Some(false)
    {
        return Err(format!(
            "the k8s gate needs a credential for the API server: the pod's service-account token (automountServiceAccountToken is false) or {CREDENTIALS_SECRET}"
        ));
    }
    Ok(Outcome::Inject(Box::new(Injection {
        container: container(&plan, settings),
        plan,
        volumes,
    })))
}
