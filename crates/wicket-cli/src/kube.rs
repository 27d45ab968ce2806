//! `wicket kube-credential` (a kubectl exec credential plugin) and
//! `wicket kube config` (writes a kubeconfig entry that uses it).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use wicket_core::carried::CarriedReasoning;
use yaml_rust2::{Yaml, YamlEmitter, YamlLoader};

use crate::Cli;
use crate::CliError;
use crate::commands::caller_token;

/// `wicket kube-credential`.
#[derive(Debug, Args)]
pub struct CredentialArgs {}

/// `wicket kube …`.
#[derive(Debug, Subcommand)]
pub enum KubeCmd {
    /// Add (or update) a cluster, user and context in a kubeconfig so
    /// kubectl reaches a wicket-k8s gate with your Wicket token, fetched by
    /// `wicket kube-credential` on every kubectl run (no token is written).
    Config(ConfigArgs),
}

/// `wicket kube config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The gate's URL (`https://HOST:PORT`).
    #[arg(long)]
    pub server: String,
    /// CA certificate (PEM) of the gate's serving certificate; embedded.
    #[arg(long)]
    pub certificate_authority: Option<PathBuf>,
    /// Name of the cluster, user and context entries.
    #[arg(long, default_value = "wicket")]
    pub name: String,
    /// Default namespace of the context.
    #[arg(long)]
    pub namespace: Option<String>,
    /// The kubeconfig to write (default: the first file in $KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Leave the current context alone.
    #[arg(long)]
    pub no_switch: bool,
    /// `NAME=VALUE` set for the credential plugin (e.g. `WICKET_CACHE_DIR`
    /// for a second identity). Repeatable.
    #[arg(long = "exec-env", value_name = "NAME=VALUE")]
    pub exec_env: Vec<String>,
}

/// The `exp` claim of a JWT, if the token is one.
fn jwt_expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?["exp"].as_i64()
}

/// The ExecCredential kubectl reads from the plugin's stdout.
pub fn credential(cli: &Cli, _args: &CredentialArgs) -> Result<(), CliError> {
    let token = caller_token(cli)?;
    let api_version = std::env::var("KUBERNETES_EXEC_INFO")
        .ok()
        .and_then(|i| serde_json::from_str::<Value>(&i).ok())
        .and_then(|v| v["apiVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| "client.authentication.k8s.io/v1".into());
    let carried = CarriedReasoning {
        reasoning: std::env::var("WICKET_REASONING").unwrap_or_default(),
        traceparent: std::env::var("TRACEPARENT").unwrap_or_default(),
    };
    let mut status = json!({"token": carried.attach(&token)});
    if let Some(exp) = jwt_expiry(&token)
        && let Some(t) = chrono::DateTime::from_timestamp(exp, 0)
    {
        status["expirationTimestamp"] =
            Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    let out = json!({"apiVersion": api_version, "kind": "ExecCredential", "status": status});
    println!("{out}");
    Ok(())
}

fn default_kubeconfig() -> PathBuf {
    if let Ok(k) = std::env::var("KUBECONFIG")
        && let Some(first) = std::env::split_paths(&k).next()
        && !first.as_os_str().is_empty()
    {
        return first;
    }
    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".kube/config")
}

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(s.clone())),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

fn to_yaml(v: &Value) -> Yaml {
    match v {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(a) => Yaml::Array(a.iter().map(to_yaml).collect()),
        Value::Object(o) => Yaml::Hash(
            o.iter()
                .map(|(k, v)| (Yaml::String(k.clone()), to_yaml(v)))
                .collect(),
        ),
    }
}

/// Replaces the entry called `name` in the list `key` (or appends it).
fn upsert(doc: &mut Value, key: &str, name: &str, entry: Value) {
    if !doc[key].is_array() {
        doc[key] = json!([]);
    }
    let list = doc[key].as_array_mut().expect("array");
    match list.iter_mut().find(|e| e["name"] == name) {
        Some(e) => *e = entry,
        None => list.push(entry),
    }
}

/// The kubeconfig after adding the entries.
pub fn merged(existing: Option<&str>, args: &ConfigArgs, wicket: &Path) -> Result<Value, CliError> {
    let mut doc = match existing.filter(|t| !t.trim().is_empty()) {
        None => json!({"apiVersion": "v1", "kind": "Config", "preferences": {}}),
        Some(text) => {
            let docs = YamlLoader::load_from_str(text)
                .map_err(|e| CliError::usage(format!("the kubeconfig is not valid YAML: {e}")))?;
            let v = docs.first().map(to_json).unwrap_or(Value::Null);
            if !v.is_object() {
                return Err(CliError::usage("the kubeconfig is not a YAML mapping"));
            }
            v
        }
    };
    let mut cluster = json!({"server": args.server});
    match &args.certificate_authority {
        Some(ca) => {
            let pem = std::fs::read(ca)
                .map_err(|e| CliError::usage(format!("cannot read {}: {e}", ca.display())))?;
            cluster["certificate-authority-data"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(pem));
        }
        None if !args.server.starts_with("https://") => {
            return Err(CliError::usage(
                "--server must be https:// (kubectl sends no token over plain http)",
            ));
        }
        None => {}
    }
    let mut exec = json!({
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": wicket.to_string_lossy(),
        "args": ["kube-credential"],
        "interactiveMode": "Never",
        "provideClusterInfo": false,
    });
    let mut env = Vec::new();
    if let Ok(issuer) = std::env::var("WICKET_OIDC_ISSUER") {
        env.push(json!({"name": "WICKET_OIDC_ISSUER", "value": issuer}));
    }
    for pair in &args.exec_env {
        let (name, value) = pair
            .split_once('=')
            .filter(|(n, _)| !n.is_empty())
            .ok_or_else(|| CliError::usage(format!("--exec-env wants NAME=VALUE, not `{pair}`")))?;
        env.retain(|e| e["name"] != name);
        env.push(json!({"name": name, "value": value}));
    }
    if !env.is_empty() {
        exec["env"] = Value::Array(env);
    }
    let mut context = json!({"cluster": args.name, "user": args.name});
    if let Some(ns) = &args.namespace {
        context["namespace"] = Value::String(ns.clone());
    }
    let name = &args.name;
    upsert(
        &mut doc,
        "clusters",
        name,
        json!({"name": name, "cluster": cluster}),
    );
    upsert(
        &mut doc,
        "users",
        name,
        json!({"name": name, "user": {"exec": exec}}),
    );
    upsert(
        &mut doc,
        "contexts",
        name,
        json!({"name": name, "context": context}),
    );
    if !args.no_switch || doc["current-context"].as_str().is_none_or(str::is_empty) {
        doc["current-context"] = Value::String(name.clone());
    }
    Ok(doc)
}

/// `wicket kube config`.
pub fn config(args: &ConfigArgs) -> Result<(), CliError> {
    let path = args.kubeconfig.clone().unwrap_or_else(default_kubeconfig);
    let existing = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(CliError::usage(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let wicket = std::env::current_exe()
        .map_err(|e| CliError::usage(format!("cannot find this program's path: {e}")))?;
    let doc = merged(existing.as_deref(), args, &wicket)?;
    let mut text = String::new();
    YamlEmitter::new(&mut text)
        .dump(&to_yaml(&doc))
        .map_err(|e| CliError::usage(format!("cannot write YAML: {e}")))?;
    text.push('\n');
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::usage(format!("cannot create {}: {e}", dir.display())))?;
    }
    write_private(&path, &text)?;
    eprintln!(
        "Wrote context `{}` to {} (kubectl gets your token from `wicket kube-credential`)",
        args.name,
        path.display()
    );
    Ok(())
}

fn write_private(path: &Path, text: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("wicket-tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(&tmp)
        .map_err(|e| CliError::usage(format!("cannot write {}: {e}", tmp.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| CliError::usage(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| CliError::usage(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ConfigArgs {
        ConfigArgs {
            server: "https://127.0.0.1:6443".into(),
            certificate_authority: None,
            name: "wicket".into(),
            namespace: Some("default".into()),
            kubeconfig: None,
            no_switch: false,
            exec_env: vec!["WICKET_CACHE_DIR=/tmp/agent".into()],
        }
    }

    #[test]
    fn a_new_kubeconfig_uses_the_credential_plugin() {
        let doc = merged(None, &args(), Path::new("/usr/bin/wicket")).unwrap();
        assert_eq!(doc["current-context"], "wicket");
        let exec = &doc["users"][0]["user"]["exec"];
        assert_eq!(exec["command"], "/usr/bin/wicket");
        assert_eq!(exec["args"][0], "kube-credential");
        assert_eq!(exec["apiVersion"], "client.authentication.k8s.io/v1");
        assert_eq!(doc["contexts"][0]["context"]["namespace"], "default");
        assert!(
            exec["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "WICKET_CACHE_DIR" && e["value"] == "/tmp/agent")
        );
        assert!(!doc.to_string().contains("token\""));
    }

    #[test]
    fn an_existing_kubeconfig_keeps_its_other_entries() {
        let existing = "apiVersion: v1\nkind: Config\ncurrent-context: prod\nclusters:\n- name: prod\n  cluster:\n    server: https://prod:6443\n- name: wicket\n  cluster:\n    server: https://old:1\nusers:\n- name: prod\n  user:\n    token: abc\ncontexts:\n- name: prod\n  context:\n    cluster: prod\n    user: prod\n";
        let mut a = args();
        a.no_switch = true;
        let doc = merged(Some(existing), &a, Path::new("/w")).unwrap();
        assert_eq!(doc["current-context"], "prod");
        let clusters = doc["clusters"].as_array().unwrap();
        assert_eq!(clusters.len(), 2);
        assert_eq!(clusters[1]["cluster"]["server"], "https://127.0.0.1:6443");
        assert_eq!(doc["users"][0]["user"]["token"], "abc");
        let mut text = String::new();
        YamlEmitter::new(&mut text).dump(&to_yaml(&doc)).unwrap();
        let back = to_json(&YamlLoader::load_from_str(&text).unwrap()[0]);
        assert_eq!(back, doc);
        assert!(merged(Some("- a list"), &a, Path::new("/w")).is_err());
    }

    #[test]
    fn the_expiry_comes_from_the_jwt() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":1900000000}"#);
        assert_eq!(jwt_expiry(&format!("h.{payload}.s")), Some(1_900_000_000));
        assert_eq!(jwt_expiry("opaque"), None);
    }
}
