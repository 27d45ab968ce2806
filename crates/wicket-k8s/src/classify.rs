//! What a Kubernetes API request is: the same attributes the API server's
//! own authorizer derives (verb, API group, resource, subresource,
//! namespace, name), plus the command of an exec and a risk score.
//!
//! Command kinds policy rules match on (`match.commands`):
//!
//! | kind | requests |
//! |---|---|
//! | `discovery` | `/api`, `/apis`, `/version`, `/openapi/…` and other non-resource reads |
//! | `read` | get, list, watch, and `pods/log` |
//! | `secret_read` | get, list, watch of `secrets` |
//! | `write` | create, update, patch |
//! | `delete` | delete, deletecollection |
//! | `exec` | `pods/exec`, `pods/attach` |
//! | `port_forward` | `pods/portforward` |
//! | `proxy` | `…/proxy` subresources |
//! | `rbac` | writes to `rbac.authorization.k8s.io` |
//! | `other` | other non-resource requests |
//!
//! Besides, the gate asks policy about `secret_values` before it shows the
//! values of a Secret: unless a rule allows that kind, values are redacted.

use hyper::Method;
use wicket_core::Classification;

/// A classified request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiRequest {
    /// Kubernetes verb (`get`, `list`, `watch`, `create`, `update`, `patch`,
    /// `delete`, `deletecollection`; `exec`, `attach`, `portforward` for
    /// those subresources; the lower-case method for non-resource paths).
    pub verb: String,
    /// API group (`""` for the core group).
    pub group: String,
    /// API version.
    pub version: String,
    /// Resource (plural), empty for non-resource requests.
    pub resource: String,
    /// Subresource (`exec`, `log`, `status`, …).
    pub subresource: String,
    /// Namespace, empty for cluster-scoped requests.
    pub namespace: String,
    /// Object name, empty for collections.
    pub name: String,
    /// For exec: the command (argv).
    pub command: Vec<String>,
    /// For port-forward: the ports.
    pub ports: Vec<String>,
    /// For exec and attach: a terminal was asked for.
    pub tty: bool,
    /// Whether stdin is attached.
    pub stdin: bool,
    /// Whether this is a non-resource request (discovery and the like).
    pub non_resource: bool,
    /// The request path.
    pub path: String,
}

impl ApiRequest {
    /// The policy command kind.
    pub fn kind(&self) -> &'static str {
        if self.non_resource {
            return if self.verb == "get" && is_discovery(&self.path) {
                "discovery"
            } else {
                "other"
            };
        }
        match (self.resource.as_str(), self.subresource.as_str()) {
            ("pods", "exec" | "attach") => return "exec",
            ("pods", "portforward") => return "port_forward",
            (_, "proxy") => return "proxy",
            ("pods", "log") => return "read",
            _ => {}
        }
        match self.verb.as_str() {
            "get" | "list" | "watch" if self.resource == "secrets" => "secret_read",
            "get" | "list" | "watch" => "read",
            "delete" | "deletecollection" => "delete",
            _ if self.group == "rbac.authorization.k8s.io" => "rbac",
            "create" | "update" | "patch" => "write",
            _ => "other",
        }
    }

    /// The object as policy and the audit name it:
    /// `NAMESPACE/RESOURCE[.GROUP]/NAME[/SUBRESOURCE]`, the namespace left
    /// out for cluster-scoped objects and the name for collections.
    pub fn object(&self) -> String {
        if self.non_resource {
            return self.path.clone();
        }
        let mut s = String::new();
        if !self.namespace.is_empty() {
            s.push_str(&self.namespace);
            s.push('/');
        }
        s.push_str(&self.reference());
        if !self.subresource.is_empty() {
            s.push('/');
            s.push_str(&self.subresource);
        }
        s
    }

    /// `RESOURCE[.GROUP][/NAME]`.
    fn reference(&self) -> String {
        let mut s = self.resource.clone();
        if !self.group.is_empty() {
            s.push('.');
            s.push_str(&self.group);
        }
        if !self.name.is_empty() {
            s.push('/');
            s.push_str(&self.name);
        }
        s
    }

    /// A kubectl-like line for the audit trail (`delete pods/web-0 -n default`,
    /// `exec pods/web-0 -n default -- ls -l`).
    pub fn text(&self) -> String {
        if self.non_resource {
            return format!("{} {}", self.verb.to_uppercase(), self.path);
        }
        let mut s = format!("{} {}", self.verb, self.reference());
        if !self.subresource.is_empty()
            && !matches!(self.verb.as_str(), "exec" | "attach" | "portforward")
        {
            s.push_str(&format!(" ({})", self.subresource));
        }
        if !self.namespace.is_empty() {
            s.push_str(" -n ");
            s.push_str(&self.namespace);
        }
        if !self.ports.is_empty() {
            s.push(' ');
            s.push_str(&self.ports.join(" "));
        }
        if !self.command.is_empty() {
            s.push_str(" -- ");
            s.push_str(&self.command.join(" "));
        }
        s
    }

    /// Risk 0–100.
    pub fn risk(&self) -> u32 {
        let base: u32 = match self.kind() {
            "discovery" => 0,
            "read" => 10,
            "other" => 20,
            "secret_read" => 50,
            "write" => 40,
            "port_forward" => 50,
            "proxy" => 50,
            "exec" => exec_risk(&self.command),
            "delete" if self.verb == "deletecollection" => 85,
            "delete" => 70,
            "rbac" => 90,
            _ => 50,
        };
        let mut r = base;
        if !self.non_resource
            && self.namespace.is_empty()
            && matches!(self.kind(), "write" | "delete")
        {
            r += 10; // cluster-scoped change
        }
        if self.resource == "namespaces" && self.kind() == "delete" {
            r = r.max(95);
        }
        if self.namespace == "kube-system" && !matches!(self.kind(), "read" | "discovery") {
            r += 10;
        }
        r.min(100)
    }

    /// The classification policy sees.
    pub fn classification(&self) -> Classification {
        Classification {
            kind: self.kind().to_string(),
            verb: self.verb.clone(),
            objects: vec![self.object()],
            argv: self.command.clone(),
            risk: self.risk(),
            fingerprint: String::new(),
        }
    }
}

fn exec_risk(argv: &[String]) -> u32 {
    let first = argv
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .unwrap_or("");
    let joined = argv.join(" ");
    let destructive = [
        "rm ", "rm\t", "mkfs", "dd ", "shred", "kill ", "reboot", "shutdown",
    ];
    if destructive
        .iter()
        .any(|d| joined.contains(d) || first == d.trim())
    {
        return 90;
    }
    match first {
        "sh" | "bash" | "ash" | "dash" | "zsh" | "python" | "python3" | "perl" | "node" => 70,
        "" => 60,
        _ => 60,
    }
}

fn is_discovery(path: &str) -> bool {
    path == "/api"
        || path == "/apis"
        || path == "/version"
        || path.starts_with("/openapi/")
        || path == "/openapi"
        || path.starts_with("/api/") && path.trim_end_matches('/').matches('/').count() == 2
        || path.starts_with("/apis/") && path.trim_end_matches('/').matches('/').count() <= 3
        || path == "/healthz"
        || path == "/livez"
        || path == "/readyz"
}

fn query_pairs(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Classifies a request from its method, path and query, the way the API
/// server's request-info resolver does.
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> ApiRequest {
    let qs = query_pairs(query.unwrap_or(""));
    let flag = |k: &str| {
        qs.iter()
            .any(|(n, v)| n == k && matches!(v.as_str(), "true" | "1"))
    };
    let mut r = ApiRequest {
        path: path.to_string(),
        ..Default::default()
    };
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] if !rest.is_empty() => ("", v, rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (g, v, rest),
        _ => {
            r.non_resource = true;
            r.verb = method.as_str().to_lowercase();
            return r;
        }
    };
    r.group = group.to_string();
    r.version = version.to_string();
    let rest: &[&str] = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => {
            r.namespace = ns.to_string();
            tail
        }
        ["namespaces", ns] => {
            // The namespace object itself.
            r.resource = "namespaces".into();
            r.name = ns.to_string();
            &[]
        }
        other => other,
    };
    match rest {
        [] => {}
        [res] => r.resource = res.to_string(),
        [res, name] => {
            r.resource = res.to_string();
            r.name = name.to_string();
        }
        [res, name, sub, ..] => {
            r.resource = res.to_string();
            r.name = name.to_string();
            r.subresource = sub.to_string();
        }
    }
    r.verb = match *method {
        Method::GET | Method::HEAD => {
            if r.name.is_empty() {
                if flag("watch") { "watch" } else { "list" }
            } else if flag("watch") {
                "watch"
            } else {
                "get"
            }
        }
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => {
            if r.name.is_empty() {
                "deletecollection"
            } else {
                "delete"
            }
        }
        _ => "other",
    }
    .to_string();
    if r.resource == "pods" {
        match r.subresource.as_str() {
            "exec" | "attach" => {
                r.verb = r.subresource.clone();
                r.command = qs
                    .iter()
                    .filter(|(k, _)| k == "command")
                    .map(|(_, v)| v.clone())
                    .collect();
                r.tty = flag("tty");
                r.stdin = flag("stdin");
            }
            "portforward" => {
                r.verb = "portforward".into();
                r.ports = qs
                    .iter()
                    .filter(|(k, _)| k == "ports")
                    .map(|(_, v)| v.clone())
                    .collect();
            }
            _ => {}
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(m: Method, p: &str, q: Option<&str>) -> ApiRequest {
        classify(&m, p, q)
    }

    #[test]
    fn resource_requests_resolve_like_the_api_server() {
        let r = c(
            Method::GET,
            "/api/v1/namespaces/default/pods",
            Some("limit=500"),
        );
        assert_eq!(
            (r.verb.as_str(), r.resource.as_str(), r.namespace.as_str()),
            ("list", "pods", "default")
        );
        assert_eq!(r.kind(), "read");
        assert_eq!(r.object(), "default/pods");

        let r = c(
            Method::GET,
            "/api/v1/namespaces/default/pods",
            Some("watch=true&resourceVersion=5"),
        );
        assert_eq!(r.verb, "watch");

        let r = c(
            Method::DELETE,
            "/apis/apps/v1/namespaces/prod/deployments/web",
            None,
        );
        assert_eq!(
            (r.group.as_str(), r.version.as_str(), r.name.as_str()),
            ("apps", "v1", "web")
        );
        assert_eq!(r.kind(), "delete");
        assert_eq!(r.object(), "prod/deployments.apps/web");
        assert_eq!(r.risk(), 70);

        let r = c(Method::DELETE, "/api/v1/namespaces/prod", None);
        assert_eq!(
            (r.resource.as_str(), r.name.as_str(), r.namespace.as_str()),
            ("namespaces", "prod", "")
        );
        assert_eq!(r.risk(), 95);

        let r = c(Method::GET, "/api/v1/namespaces/default/secrets/db", None);
        assert_eq!(r.kind(), "secret_read");

        let r = c(
            Method::PATCH,
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/x",
            None,
        );
        assert_eq!(r.kind(), "rbac");
        assert!(r.risk() >= 90);

        let r = c(Method::DELETE, "/api/v1/namespaces/default/pods", None);
        assert_eq!(r.verb, "deletecollection");

        let r = c(
            Method::GET,
            "/api/v1/namespaces/default/pods/web-0/log",
            Some("follow=true"),
        );
        assert_eq!((r.subresource.as_str(), r.kind()), ("log", "read"));
    }

    #[test]
    fn exec_carries_its_command() {
        let r = c(
            Method::GET,
            "/api/v1/namespaces/default/pods/web-0/exec",
            Some(
                "command=sh&command=-c&command=rm+-rf+%2Fdata&container=app&stdin=true&stdout=true&tty=true",
            ),
        );
        assert_eq!(r.kind(), "exec");
        assert_eq!(r.command, vec!["sh", "-c", "rm -rf /data"]);
        assert!(r.tty && r.stdin);
        assert_eq!(r.risk(), 90);
        assert_eq!(r.text(), "exec pods/web-0 -n default -- sh -c rm -rf /data");
        let r = c(
            Method::POST,
            "/api/v1/namespaces/default/pods/web-0/exec",
            Some("command=ls"),
        );
        assert_eq!((r.kind(), r.risk()), ("exec", 60));
        let r = c(
            Method::GET,
            "/api/v1/namespaces/default/pods/web-0/portforward",
            Some("ports=8080"),
        );
        assert_eq!(
            (r.kind(), r.ports.as_slice()),
            ("port_forward", &["8080".to_string()][..])
        );
    }

    #[test]
    fn discovery_is_told_apart() {
        for p in [
            "/api",
            "/apis",
            "/api/v1",
            "/apis/apps/v1",
            "/version",
            "/openapi/v3",
            "/apis/apps",
        ] {
            let r = c(Method::GET, p, None);
            assert_eq!(r.kind(), "discovery", "{p}");
        }
        assert_eq!(c(Method::POST, "/api", None).kind(), "other");
        assert_eq!(c(Method::GET, "/metrics", None).kind(), "other");
    }
}
