//! What the injector knows besides the pod: where the control service is,
//! which images to run, and the resources a deployment listed.
//!
//! The Helm chart renders this file (`config.json` in the injector's
//! ConfigMap) from its values, field for field: `resources` here is the
//! chart's `resources:` list, `sidecar` its `sidecar:` block. The container
//! an annotated pod gets is built from it by [`crate::inject`] alone, so the
//! chart and the injector cannot disagree about it.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// A gate protocol, as written in `wicket.dev/inject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `wicket-pg` in front of PostgreSQL.
    #[serde(alias = "postgres")]
    Pg,
    /// `wicket-ssh` in front of an SSH server.
    Ssh,
    /// `wicket-k8s` in front of the Kubernetes API.
    #[serde(alias = "kubernetes")]
    K8s,
    /// `wicket-http` in front of an HTTP service.
    Http,
}

impl Protocol {
    /// Every protocol, in the order messages list them.
    pub const ALL: [Protocol; 4] = [Protocol::Pg, Protocol::Ssh, Protocol::K8s, Protocol::Http];

    /// The annotation value (and image suffix): `pg`, `ssh`, `k8s`, `http`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Pg => "pg",
            Protocol::Ssh => "ssh",
            Protocol::K8s => "k8s",
            Protocol::Http => "http",
        }
    }

    /// The policy's name for it (`connections[].protocol`).
    pub fn policy_name(self) -> &'static str {
        match self {
            Protocol::Pg => "postgres",
            Protocol::Ssh => "ssh",
            Protocol::K8s => "kubernetes",
            Protocol::Http => "http",
        }
    }

    /// Parses an annotation value; the policy's names are accepted too.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s.trim() {
            "pg" | "postgres" | "postgresql" => Some(Protocol::Pg),
            "ssh" => Some(Protocol::Ssh),
            "k8s" | "kubernetes" => Some(Protocol::K8s),
            "http" => Some(Protocol::Http),
            _ => None,
        }
    }

    /// The port the gate listens on unless told.
    pub fn default_listen_port(self) -> u16 {
        match self {
            Protocol::Pg => 15432,
            Protocol::Ssh => 15022,
            Protocol::K8s => 16443,
            Protocol::Http => 18080,
        }
    }

    /// The resource's own port in the pod unless told (none for the
    /// Kubernetes API, which is reached at the in-cluster address).
    pub fn default_upstream_port(self) -> Option<u16> {
        match self {
            Protocol::Pg => Some(5432),
            Protocol::Ssh => Some(22),
            Protocol::K8s => None,
            Protocol::Http => Some(8080),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The injector's configuration (camelCase, as in Helm values).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// The control service the sidecars talk to.
    pub control: Control,
    /// The identity provider the sidecars trust.
    pub oidc: Oidc,
    /// Where the sidecar images come from.
    #[serde(default)]
    pub image: Image,
    /// Resources, security and ports of every injected container.
    #[serde(default)]
    pub sidecar: SidecarDefaults,
    /// `auto` (native sidecars from Kubernetes 1.29), `always` or `never`.
    #[serde(default)]
    pub native_sidecars: NativeSidecars,
    /// The cluster's version (`v1.30.2`, `1.29+`…), from the chart's
    /// `.Capabilities.KubeVersion`; `--kubernetes-version` overrides it.
    #[serde(default)]
    pub kubernetes_version: Option<String>,
    /// The resources the deployment lists (the chart's `resources:`).
    #[serde(default)]
    pub resources: Vec<Resource>,
}

/// Where the control service is.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Control {
    /// Its gRPC URL, e.g. `http://wicket-control.wicket.svc:7470`.
    pub url: String,
    /// A Secret (key `ca.crt`) in the pod's namespace holding the CA that
    /// signed the control service's certificate, for `https://` URLs.
    #[serde(default)]
    pub ca_secret: Option<String>,
}

/// The identity provider the sidecars trust.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Oidc {
    /// The issuer URL.
    pub issuer: String,
    /// The audience tokens must carry.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// The claim that lists groups.
    #[serde(default)]
    pub groups_claim: Option<String>,
    /// The rules that mark a token as an agent's (`--agent-rules`).
    #[serde(default)]
    pub agent_rules: Vec<String>,
}

fn default_audience() -> String {
    "wicket".into()
}

/// Image names: `<repository>/wicket-<protocol>:<tag>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Image {
    /// Registry and path before `wicket-<protocol>`.
    #[serde(default = "default_repository")]
    pub repository: String,
    /// The tag.
    #[serde(default = "default_tag")]
    pub tag: String,
    /// `IfNotPresent`, `Always` or `Never`.
    #[serde(default = "default_pull_policy")]
    pub pull_policy: String,
}

fn default_repository() -> String {
    "ghcr.io/wicket-dev".into()
}

fn default_tag() -> String {
    env!("CARGO_PKG_VERSION").into()
}

fn default_pull_policy() -> String {
    "IfNotPresent".into()
}

impl Default for Image {
    fn default() -> Self {
        Image {
            repository: default_repository(),
            tag: default_tag(),
            pull_policy: default_pull_policy(),
        }
    }
}

impl Image {
    /// The image of one gate.
    pub fn of(&self, p: Protocol) -> String {
        format!(
            "{}/wicket-{}:{}",
            self.repository.trim_end_matches('/'),
            p.as_str(),
            self.tag
        )
    }
}

/// Settings every injected container shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarDefaults {
    /// Port of `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "default_admin_port")]
    pub admin_port: u16,
    /// Requests and limits (`cpu`, `memory`).
    #[serde(default = "default_resources")]
    pub resources: Requirements,
    /// The user id the gate runs as.
    #[serde(default = "default_uid")]
    pub run_as_user: i64,
    /// Size limit of the state volume (bundle cache and audit spool).
    #[serde(default = "default_state_size")]
    pub state_size_limit: String,
    /// `text` or `json` logs.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Extra environment for every gate (e.g. `WICKET_LOG`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_admin_port() -> u16 {
    15090
}

fn default_uid() -> i64 {
    65532
}

fn default_state_size() -> String {
    "1Gi".into()
}

fn default_log_format() -> String {
    "json".into()
}

impl Default for SidecarDefaults {
    fn default() -> Self {
        SidecarDefaults {
            admin_port: default_admin_port(),
            resources: default_resources(),
            run_as_user: default_uid(),
            state_size_limit: default_state_size(),
            log_format: default_log_format(),
            env: BTreeMap::new(),
        }
    }
}

/// Container resource requests and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Requested quantities by resource name.
    #[serde(default)]
    pub requests: BTreeMap<String, String>,
    /// Limits by resource name.
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
}

fn default_resources() -> Requirements {
    let q = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    Requirements {
        requests: q(&[("cpu", "50m"), ("memory", "64Mi")]),
        limits: q(&[("cpu", "1"), ("memory", "256Mi")]),
    }
}

/// When injected gates are native sidecars (init containers with
/// `restartPolicy: Always`, Kubernetes 1.29 and later).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NativeSidecars {
    /// From Kubernetes 1.29 (an unknown version gets the classic form).
    #[default]
    Auto,
    /// Always native.
    Always,
    /// Always a regular container.
    Never,
}

/// One resource of the deployment (the chart's `resources:` entry).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    /// The connection name (the policy's `connections[].name`).
    pub name: String,
    /// The gate protocol.
    pub protocol: Protocol,
    /// The namespace of the pods that hold it.
    #[serde(default)]
    pub namespace: Option<String>,
    /// What the gate forwards to: `host:port` (`pg`, `ssh`), a URL (`http`,
    /// `k8s`). Default: the resource's port on the pod's loopback.
    #[serde(default)]
    pub upstream: Option<String>,
    /// The gate's port.
    #[serde(default)]
    pub listen_port: Option<u16>,
    /// Secret with the upstream credentials.
    #[serde(default)]
    pub credentials_secret: Option<String>,
    /// Secret (`kubernetes.io/tls`) with the gate's serving certificate.
    #[serde(default)]
    pub tls_secret: Option<String>,
    /// ssh: Secret (`kubernetes.io/ssh-auth`, key `ssh-privatekey`) with
    /// the gate's host key.
    #[serde(default)]
    pub host_key_secret: Option<String>,
    /// Secret with the gate's control-service credential (default
    /// `wicket-sidecar-<name>`, which the chart creates).
    #[serde(default)]
    pub sidecar_secret: Option<String>,
    /// Free-form fields the chart uses for the connection and policy
    /// (description, labels, masking, rules); the injector ignores them.
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_json::Value>,
}

impl Settings {
    /// Parses `config.json`.
    pub fn from_json(text: &str, name: &str) -> Result<Settings, String> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let s: Settings = serde::Deserialize::deserialize(de)
            .map_err(|e| format!("{name}: not an injector configuration: {e}"))?;
        s.check().map_err(|e| format!("{name}: {e}"))?;
        Ok(s)
    }

    fn check(&self) -> Result<(), String> {
        if !(self.control.url.starts_with("http://") || self.control.url.starts_with("https://")) {
            return Err(format!(
                "control.url must be http:// or https://, got `{}`",
                self.control.url
            ));
        }
        if self.oidc.issuer.is_empty() {
            return Err("oidc.issuer is required".into());
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.resources {
            if !crate::inject::is_dns_label(&r.name) {
                return Err(format!(
                    "resources: `{}` is not a valid name (lowercase letters, digits and dashes, at most 63)",
                    r.name
                ));
            }
            if !seen.insert(&r.name) {
                return Err(format!("resources: `{}` is listed twice", r.name));
            }
        }
        Ok(())
    }

    /// The resource called `name`.
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }

    /// Whether gates are native sidecars on this cluster.
    pub fn native(&self) -> bool {
        match self.native_sidecars {
            NativeSidecars::Always => true,
            NativeSidecars::Never => false,
            NativeSidecars::Auto => self
                .kubernetes_version
                .as_deref()
                .and_then(minor_version)
                .is_some_and(|(major, minor)| major > 1 || minor >= 29),
        }
    }
}

/// `(major, minor)` of a Kubernetes version string (`v1.30.2`,
/// `1.29+`, `v1.31.0-eks-1234`, `1.28`).
pub fn minor_version(v: &str) -> Option<(u32, u32)> {
    let v = v.trim().trim_start_matches('v');
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((major, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_as_clusters_report_them() {
        assert_eq!(minor_version("v1.30.2"), Some((1, 30)));
        assert_eq!(minor_version("1.29+"), Some((1, 29)));
        assert_eq!(minor_version("v1.28.9-eks-036c24b"), Some((1, 28)));
        assert_eq!(minor_version("1.33"), Some((1, 33)));
        assert_eq!(minor_version("latest"), None);
        assert_eq!(minor_version(""), None);
    }
}
