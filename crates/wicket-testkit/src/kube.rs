//! A fake kube-apiserver that speaks the real wire protocol, for tests with
//! real kubectl (no API server can be installed here).
//!
//! It serves HTTPS (a [`TestCa`] certificate) with a bearer token, and:
//! - discovery: `/version`, `/api`, `/apis` (plain and aggregated v2),
//!   `/api/v1`;
//! - pods, secrets, namespaces and events: get, list (with
//!   `fieldSelector=metadata.name=…`), watch (`?watch=true`, chunked JSON
//!   events), and `as=Table` responses the way kubectl asks for them;
//!   deleting a pod;
//! - `pods/log` with `follow`;
//! - `pods/exec` and `pods/attach` over WebSocket (`v5.channel.k8s.io`,
//!   `v4.channel.k8s.io`). exec runs the command for real, on this host,
//!   in the pod's directory: it is a test double, not a sandbox.
//! - `pods/portforward` over WebSocket (the channel protocol,
//!   `v4.channel.k8s.io` or `portforward.k8s.io`, as clients other than
//!   kubectl speak it, or `SPDY/3.1+portforward.k8s.io`, the
//!   SPDY streams tunnelled in WebSocket messages, see [`crate::spdy`]):
//!   every pod port is the fake's echo server ([`FakeKube::echo_addr`]).
//!
//! - the same over plain SPDY/3.1 (`v4.channel.k8s.io` for exec and attach,
//!   `portforward.k8s.io`), as kubectl before WebSockets speaks it.
//!
//! Every request is remembered with its impersonation headers
//! ([`FakeKube::seen`]) so tests can assert who the server was told the
//! caller is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::tls::TestCa;

/// A response body: whole or streamed.
type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// `Impersonate-User`, when sent.
    pub impersonate_user: Option<String>,
    /// `Impersonate-Group` values.
    pub impersonate_groups: Vec<String>,
    /// `Impersonate-Extra-*` headers (name after the prefix, value).
    pub impersonate_extra: Vec<(String, String)>,
    /// `Accept`.
    pub accept: String,
    /// For exec: the command.
    pub command: Vec<String>,
}

#[derive(Debug, Clone)]
struct Event {
    kind: &'static str,
    resource: String,
    namespace: String,
    object: Value,
}

/// One resource's objects by (namespace, name).
type Objects = BTreeMap<(String, String), Value>;

/// A served resource: name, kind, namespaced, verbs, short names.
type Resource = (
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
    &'static [&'static str],
);

struct State {
    token: String,
    rv: AtomicU64,
    /// resource -> (namespace, name) -> object
    objects: Mutex<BTreeMap<String, Objects>>,
    events: tokio::sync::broadcast::Sender<Event>,
    seen: Mutex<Vec<Seen>>,
    root: PathBuf,
    log_lines: Mutex<Vec<String>>,
    /// The echo server every forwarded pod port reaches.
    echo: SocketAddr,
}

/// The running fake.
pub struct FakeKube {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The CA that signed its certificate.
    pub ca: Arc<TestCa>,
    state: Arc<State>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for FakeKube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKube")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Everything the fake needs to start.
#[derive(Debug, Clone)]
pub struct FakeKubeOptions {
    /// Address to bind (`127.0.0.1:0` for any free port).
    pub listen: SocketAddr,
    /// The bearer token the fake accepts (the gate's service-account token).
    pub token: String,
    /// Directory exec runs in (one subdirectory per pod).
    pub root: PathBuf,
}

impl FakeKube {
    /// Starts the fake on a free loopback port with a random token, pods
    /// `web-0` and `db-0` in `default`, and the secret `db-creds`.
    pub async fn start(root: PathBuf) -> FakeKube {
        FakeKube::start_with(FakeKubeOptions {
            listen: "127.0.0.1:0".parse().expect("address"),
            token: format!("sa-{}", uuid::Uuid::new_v4().simple()),
            root,
        })
        .await
    }

    /// Starts the fake with `opts`.
    pub async fn start_with(opts: FakeKubeOptions) -> FakeKube {
        let ca = Arc::new(TestCa::new("fake kube-apiserver CA"));
        let tls = tokio_rustls::TlsAcceptor::from(ca.issue(&[]).server_config(&[b"http/1.1"]));
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .expect("bind the fake apiserver");
        let addr = listener.local_addr().expect("address");
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let echo = echo_server().await;
        let state = Arc::new(State {
            echo,
            token: opts.token,
            rv: AtomicU64::new(100),
            objects: Mutex::new(BTreeMap::new()),
            events,
            seen: Mutex::new(Vec::new()),
            root: opts.root,
            log_lines: Mutex::new(vec![
                "starting web server on :8080".into(),
                "user alice@example.com signed in from 10.0.0.7".into(),
                "ready".into(),
            ]),
        });
        for ns in ["default", "kube-system"] {
            state.put("namespaces", "", namespace(ns));
        }
        for name in ["web-0", "db-0"] {
            state.put("pods", "default", pod("default", name));
        }
        state.put(
            "secrets",
            "default",
            secret(
                "default",
                "db-creds",
                &[("password", "hunter2-very-secret"), ("username", "app")],
            ),
        );
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    _ = stopped.changed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let st = st.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::convert::Infallible>(st.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        FakeKube {
            addr,
            ca,
            state,
            stop,
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The bearer token it accepts.
    pub fn token(&self) -> &str {
        &self.state.token
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("seen").clone()
    }

    /// Adds (or replaces) a running pod, notifying watchers.
    pub fn add_pod(&self, namespace: &str, name: &str) {
        self.state.put("pods", namespace, pod(namespace, name));
    }

    /// Names of the pods in `namespace`.
    pub fn pods(&self, namespace: &str) -> Vec<String> {
        let o = self.state.objects.lock().expect("objects");
        o.get("pods")
            .map(|m| {
                m.keys()
                    .filter(|(ns, _)| ns == namespace)
                    .map(|(_, n)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The echo server behind every forwarded pod port.
    pub fn echo_addr(&self) -> SocketAddr {
        self.state.echo
    }

    /// Appends a line to every pod's log (followers see it).
    pub fn log(&self, line: &str) {
        self.state
            .log_lines
            .lock()
            .expect("log")
            .push(line.to_string());
    }
}

/// A TCP server on loopback that sends back what it receives.
async fn echo_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the echo server");
    let addr = l.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn pod(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"app": name.split('-').next().unwrap_or(name)}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}], "nodeName": "node-1"},
        "status": {"phase": "Running", "podIP": "10.0.0.7", "hostIP": "10.0.1.1",
            "startTime": "2026-01-01T00:00:00Z",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "example/app:1",
                "imageID": "", "started": true, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}})
}

fn secret(ns: &str, name: &str, data: &[(&str, &str)]) -> Value {
    use base64::Engine as _;
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": ns, "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": "2026-01-01T00:00:00Z"},
        "data": data})
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("response")
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    full(
        status,
        "application/json",
        serde_json::to_vec(v).expect("json"),
    )
}

/// A `Status` failure, as the real server sends it.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// `(key, value)` pairs of a query string (percent-decoded).
fn query(uri: &hyper::Uri) -> Vec<(String, String)> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn q<'a>(qs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    qs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("true" | "1"))
}

/// The verbs of an ordinary namespaced object.
const OBJECT_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

const RESOURCES: &[Resource] = &[
    ("pods", "Pod", true, OBJECT_VERBS, &["po"]),
    ("pods/exec", "PodExecOptions", true, &["create", "get"], &[]),
    (
        "pods/attach",
        "PodAttachOptions",
        true,
        &["create", "get"],
        &[],
    ),
    ("pods/log", "Pod", true, &["get"], &[]),
    (
        "pods/portforward",
        "PodPortForwardOptions",
        true,
        &["create", "get"],
        &[],
    ),
    ("secrets", "Secret", true, OBJECT_VERBS, &[]),
    (
        "namespaces",
        "Namespace",
        false,
        &[
            "create", "delete", "get", "list", "patch", "update", "watch",
        ],
        &["ns"],
    ),
    (
        "events",
        "Event",
        true,
        &[
            "create", "delete", "get", "list", "patch", "update", "watch",
        ],
        &["ev"],
    ),
];

fn resource_list() -> Value {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .map(|(name, kind, namespaced, verbs, short)| {
            json!({"name": name, "singularName": if name.contains('/') { "".to_string() } else { kind.to_lowercase() },
                "namespaced": namespaced, "kind": kind, "verbs": verbs, "shortNames": short})
        })
        .collect();
    json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources})
}

/// Aggregated discovery (`apidiscovery.k8s.io/v2` or `v2beta1`) of the core group.
fn aggregated(version: &str) -> Value {
    let mut top: Vec<Value> = Vec::new();
    for (name, kind, namespaced, verbs, short) in RESOURCES.iter().filter(|r| !r.0.contains('/')) {
        let subs: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.0.starts_with(&format!("{name}/")))
            .map(|(sub, k, _, v, _)| {
                json!({"subresource": sub.split('/').nth(1), "responseKind": {"group": "", "version": "v1", "kind": k}, "verbs": v})
            })
            .collect();
        top.push(json!({"resource": name, "responseKind": {"group": "", "version": "v1", "kind": kind},
            "scope": if *namespaced { "Namespaced" } else { "Cluster" }, "singularResource": kind.to_lowercase(),
            "verbs": verbs, "shortNames": short, "subresources": subs}));
    }
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": format!("apidiscovery.k8s.io/{version}"), "metadata": {},
        "items": [{"metadata": {"creationTimestamp": null}, "versions": [{"version": "v1", "resources": top, "freshness": "Current"}]}]})
}

fn table_columns(resource: &str) -> Value {
    let cols: &[(&str, &str)] = match resource {
        "pods" => &[
            ("Name", "string"),
            ("Ready", "string"),
            ("Status", "string"),
            ("Restarts", "string"),
            ("Age", "string"),
        ],
        "secrets" => &[
            ("Name", "string"),
            ("Type", "string"),
            ("Data", "integer"),
            ("Age", "string"),
        ],
        "namespaces" => &[("Name", "string"), ("Status", "string"), ("Age", "string")],
        _ => &[("Name", "string"), ("Age", "string")],
    };
    Value::Array(
        cols.iter()
            .map(|(n, t)| {
                json!({"name": n, "type": t, "format": if *n == "Name" { "name" } else { "" }, "description": n, "priority": 0})
            })
            .collect(),
    )
}

fn table_row(resource: &str, o: &Value, include_object: bool) -> Value {
    let name = o["metadata"]["name"].clone();
    let cells = match resource {
        "pods" => json!([name, "1/1", o["status"]["phase"], "0", "5m"]),
        "secrets" => json!([
            name,
            o["type"],
            o["data"].as_object().map(|m| m.len()).unwrap_or(0),
            "5m"
        ]),
        "namespaces" => json!([name, "Active", "5m"]),
        _ => json!([name, "5m"]),
    };
    let object = if include_object {
        o.clone()
    } else {
        json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
    };
    json!({"cells": cells, "object": object})
}

fn table(resource: &str, objects: &[Value], rv: u64, include_object: bool) -> Value {
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": table_columns(resource),
        "rows": objects.iter().map(|o| table_row(resource, o, include_object)).collect::<Vec<_>>()})
}

impl State {
    fn next_rv(&self) -> u64 {
        self.rv.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn put(&self, resource: &str, ns: &str, mut object: Value) {
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let existed = self
            .objects
            .lock()
            .expect("objects")
            .entry(resource.to_string())
            .or_default()
            .insert((ns.to_string(), name), object.clone())
            .is_some();
        let _ = self.events.send(Event {
            kind: if existed { "MODIFIED" } else { "ADDED" },
            resource: resource.to_string(),
            namespace: ns.to_string(),
            object,
        });
    }

    fn list(&self, resource: &str, ns: Option<&str>, name: Option<&str>) -> Vec<Value> {
        let o = self.objects.lock().expect("objects");
        o.get(resource)
            .map(|m| {
                m.iter()
                    .filter(|((n, nm), _)| {
                        ns.is_none_or(|x| x == n) && name.is_none_or(|x| x == nm)
                    })
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let h = req.headers();
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let qs = query(req.uri());
        let mut seen = Seen {
            method: req.method().to_string(),
            uri: req.uri().to_string(),
            impersonate_user: get("impersonate-user"),
            impersonate_groups: h
                .get_all("impersonate-group")
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect(),
            impersonate_extra: h
                .iter()
                .filter_map(|(k, v)| {
                    let k = k.as_str().strip_prefix("impersonate-extra-")?;
                    Some((k.to_string(), v.to_str().ok()?.to_string()))
                })
                .collect(),
            accept: get("accept").unwrap_or_default(),
            command: command_params(&qs),
        };
        let authorized = get("authorization")
            .is_some_and(|a| a.strip_prefix("Bearer ").is_some_and(|t| t == self.token));
        if !authorized {
            seen.command.clear();
            self.seen.lock().expect("seen").push(seen);
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        self.seen.lock().expect("seen").push(seen.clone());
        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let accept = seen.accept.clone();
        match (req.method(), segs.as_slice()) {
            (&Method::GET, ["version"]) => json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-wicket-fake",
                    "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
                    "platform": "linux/amd64"}),
            ),
            (&Method::GET, ["api"]) => {
                if let Some(v) = wants_aggregated(&accept) {
                    return discovery_response(v, &aggregated(v));
                }
                json_response(
                    StatusCode::OK,
                    &json!({"kind": "APIVersions", "versions": ["v1"],
                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}),
                )
            }
            (&Method::GET, ["apis"]) => {
                if let Some(v) = wants_aggregated(&accept) {
                    let none = json!({"kind": "APIGroupDiscoveryList",
                        "apiVersion": format!("apidiscovery.k8s.io/{v}"), "metadata": {}, "items": []});
                    return discovery_response(v, &none);
                }
                json_response(
                    StatusCode::OK,
                    &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
                )
            }
            (&Method::GET, ["api", "v1"]) => json_response(StatusCode::OK, &resource_list()),
            (_, ["api", "v1", rest @ ..]) => {
                let (ns, rest): (Option<&str>, &[&str]) = match rest {
                    ["namespaces", ns, r @ ..] if !r.is_empty() => (Some(ns), r),
                    r => (None, r),
                };
                match rest {
                    [resource] => self.collection(&req, resource, ns, &qs, &accept).await,
                    [resource, name] => self.object(req.method(), resource, ns, name, &accept),
                    ["pods", name, "log"] => self.logs(ns.unwrap_or("default"), name, &qs),
                    ["pods", name, sub @ ("exec" | "attach")] => {
                        self.stream(req, ns.unwrap_or("default"), name, sub, &qs)
                    }
                    ["pods", name, "portforward"] => {
                        self.stream(req, ns.unwrap_or("default"), name, "portforward", &qs)
                    }
                    _ => status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                }
            }
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            ),
        }
    }

    async fn collection(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        resource: &str,
        ns: Option<&str>,
        qs: &[(String, String)],
        accept: &str,
    ) -> Response<Body> {
        if !RESOURCES.iter().any(|r| r.0 == resource) {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        if req.method() != Method::GET {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the fake only reads collections",
            );
        }
        let name = q(qs, "fieldSelector").and_then(|f| f.strip_prefix("metadata.name="));
        let as_table = accept.contains("as=Table");
        let include_object = q(qs, "includeObject") == Some("Object");
        if truthy(q(qs, "watch")) {
            let since: u64 = q(qs, "resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut rx = self.events.subscribe();
            let initial: Vec<Value> = if since == 0 {
                self.list(resource, ns, name)
            } else {
                Vec::new()
            };
            let resource = resource.to_string();
            let ns = ns.map(str::to_string);
            let name = name.map(str::to_string);
            let (tx, body_rx) =
                tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
            tokio::spawn(async move {
                let encode = |kind: &str, o: &Value| {
                    let object = if as_table {
                        table(&resource, std::slice::from_ref(o), 0, include_object)
                    } else {
                        o.clone()
                    };
                    let mut line =
                        serde_json::to_vec(&json!({"type": kind, "object": object})).expect("json");
                    line.push(b'\n');
                    Ok(Frame::data(Bytes::from(line)))
                };
                for o in &initial {
                    if tx.send(encode("ADDED", o)).await.is_err() {
                        return;
                    }
                }
                loop {
                    let ev = tokio::select! {
                        e = rx.recv() => match e { Ok(e) => e, Err(_) => return },
                        _ = tx.closed() => return,
                    };
                    if ev.resource != resource
                        || ns.as_deref().is_some_and(|n| n != ev.namespace)
                        || name
                            .as_deref()
                            .is_some_and(|n| ev.object["metadata"]["name"] != n)
                    {
                        continue;
                    }
                    if tx.send(encode(ev.kind, &ev.object)).await.is_err() {
                        return;
                    }
                }
            });
            let stream = tokio_stream_from(body_rx);
            return Response::builder()
                .status(StatusCode::OK)
                .header(
                    "content-type",
                    if as_table {
                        "application/json;as=Table;v=v1;g=meta.k8s.io"
                    } else {
                        "application/json"
                    },
                )
                .header("transfer-encoding", "chunked")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("response");
        }
        let items = self.list(resource, ns, name);
        let rv = self.rv.load(Ordering::SeqCst);
        if as_table {
            let mut r = json_response(StatusCode::OK, &table(resource, &items, rv, include_object));
            r.headers_mut().insert(
                "content-type",
                "application/json;as=Table;v=v1;g=meta.k8s.io"
                    .parse()
                    .expect("header"),
            );
            return r;
        }
        let kind = RESOURCES
            .iter()
            .find(|r| r.0 == resource)
            .map(|r| r.1)
            .unwrap_or("List");
        json_response(
            StatusCode::OK,
            &json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
        )
    }

    fn object(
        &self,
        method: &Method,
        resource: &str,
        ns: Option<&str>,
        name: &str,
        accept: &str,
    ) -> Response<Body> {
        let (ns, name) = if resource == "namespaces" {
            (Some(""), name)
        } else {
            (ns, name)
        };
        let found = self.list(resource, ns, Some(name)).into_iter().next();
        let Some(o) = found else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{resource} \"{name}\" not found"),
            );
        };
        match *method {
            Method::GET => {
                if accept.contains("as=Table") {
                    let rv = self.rv.load(Ordering::SeqCst);
                    return json_response(StatusCode::OK, &table(resource, &[o], rv, false));
                }
                json_response(StatusCode::OK, &o)
            }
            Method::DELETE => {
                let key = (ns.unwrap_or("").to_string(), name.to_string());
                self.objects
                    .lock()
                    .expect("objects")
                    .get_mut(resource)
                    .map(|m| m.remove(&key));
                let _ = self.events.send(Event {
                    kind: "DELETED",
                    resource: resource.to_string(),
                    namespace: key.0,
                    object: o.clone(),
                });
                json_response(StatusCode::OK, &o)
            }
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the fake only reads and deletes objects",
            ),
        }
    }

    fn logs(self: &Arc<Self>, ns: &str, name: &str, qs: &[(String, String)]) -> Response<Body> {
        if self.list("pods", Some(ns), Some(name)).is_empty() {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("pods \"{name}\" not found"),
            );
        }
        let follow = truthy(q(qs, "follow"));
        let st = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
        tokio::spawn(async move {
            let mut sent = 0usize;
            loop {
                let lines: Vec<String> = st.log_lines.lock().expect("log")[sent..].to_vec();
                sent += lines.len();
                for l in lines {
                    if tx
                        .send(Ok(Frame::data(Bytes::from(format!("{l}\n")))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if !follow {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/plain")
            .header("transfer-encoding", "chunked")
            .body(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
            .expect("response")
    }

    fn stream(
        self: &Arc<Self>,
        req: Request<Incoming>,
        ns: &str,
        name: &str,
        sub: &str,
        qs: &[(String, String)],
    ) -> Response<Body> {
        if self.list("pods", Some(ns), Some(name)).is_empty() {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("pods \"{name}\" not found"),
            );
        }
        let h = req.headers();
        let upgrade = h
            .get("upgrade")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if upgrade == "spdy/3.1" {
            return self.spdy_stream(req, ns, name, sub, qs);
        }
        if upgrade != "websocket" {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!(
                    "the fake apiserver serves {sub} over WebSocket or SPDY/3.1 (got upgrade `{upgrade}`)"
                ),
            );
        }
        let offered = offered(h, "sec-websocket-protocol");
        let protocols: &[&str] = if sub == "portforward" {
            &[
                PORT_FORWARD_PROTOCOL,
                "v4.channel.k8s.io",
                "portforward.k8s.io",
            ]
        } else {
            &["v5.channel.k8s.io", "v4.channel.k8s.io"]
        };
        let Some(proto) = protocols
            .iter()
            .copied()
            .find(|p| offered.iter().any(|o| o == p))
        else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "no supported channel subprotocol offered",
            );
        };
        let Some(key) = h.get("sec-websocket-key").and_then(|v| v.to_str().ok()) else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "missing Sec-WebSocket-Key",
            );
        };
        let accept = ws_accept(key.as_bytes());
        let tty = truthy(q(qs, "tty"));
        let stdin = truthy(q(qs, "stdin"));
        let command = exec_command(sub, qs);
        let dir = self.root.join(ns).join(name);
        let v5 = proto.starts_with("v5");
        let forward = sub == "portforward";
        let channels = forward && proto != PORT_FORWARD_PROTOCOL;
        let ports: Vec<u16> = qs
            .iter()
            .filter(|(k, _)| k == "ports")
            .flat_map(|(_, v)| v.split(','))
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        let echo = self.echo;
        tokio::spawn(async move {
            let Ok(io) = hyper::upgrade::on(req).await else {
                return;
            };
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(io),
                Role::Server,
                None,
            )
            .await;
            if channels {
                channel_port_forward(ws, ports, echo).await;
            } else if forward {
                crate::spdy::serve_port_forward(ws, echo).await;
            } else {
                run_exec(ws, dir, command, tty, stdin, v5).await;
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .header("sec-websocket-protocol", proto)
            .body(BodyExt::boxed(
                Full::new(Bytes::new()).map_err(|never| match never {}),
            ))
            .expect("response")
    }
}

impl State {
    /// exec, attach or port-forward over plain SPDY/3.1 (see [`crate::spdy`]).
    fn spdy_stream(
        self: &Arc<Self>,
        req: Request<Incoming>,
        ns: &str,
        name: &str,
        sub: &str,
        qs: &[(String, String)],
    ) -> Response<Body> {
        let offered = offered(req.headers(), "x-stream-protocol-version");
        let forward = sub == "portforward";
        let wanted = if forward {
            "portforward.k8s.io"
        } else {
            "v4.channel.k8s.io"
        };
        if !offered.iter().any(|o| o == wanted) {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!("the fake apiserver speaks {wanted} over SPDY; offered: {offered:?}"),
            );
        }
        let exec = crate::spdy::ExecRequest {
            dir: self.root.join(ns).join(name),
            command: exec_command(sub, qs),
            tty: truthy(q(qs, "tty")),
            stdin: truthy(q(qs, "stdin")),
            stdout: truthy(q(qs, "stdout")),
            stderr: truthy(q(qs, "stderr")),
        };
        let echo = self.echo;
        tokio::spawn(async move {
            let Ok(io) = hyper::upgrade::on(req).await else {
                return;
            };
            if forward {
                crate::spdy::serve_plain_port_forward(io, echo).await;
            } else {
                crate::spdy::serve_exec(io, exec).await;
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "Upgrade")
            .header("upgrade", "SPDY/3.1")
            .header("x-stream-protocol-version", wanted)
            .body(BodyExt::boxed(
                Full::new(Bytes::new()).map_err(|never| match never {}),
            ))
            .expect("response")
    }
}

/// The `command` query parameters, in order.
fn command_params(qs: &[(String, String)]) -> Vec<String> {
    qs.iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect()
}

/// What an exec runs; attach runs `cat`.
fn exec_command(sub: &str, qs: &[(String, String)]) -> Vec<String> {
    if sub == "attach" {
        return vec!["cat".into()];
    }
    command_params(qs)
}

/// The protocols a client offers in header `name` (comma-separated).
fn offered(h: &hyper::HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .collect()
}

/// The `Sec-WebSocket-Accept` of a `Sec-WebSocket-Key` (RFC 6455).
pub(crate) fn ws_accept(key: &[u8]) -> String {
    use base64::Engine as _;
    let mut d = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    d.update(key);
    d.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(d.finish().as_ref())
}

/// An aggregated discovery answer with the content type kubectl checks.
fn discovery_response(version: &str, body: &Value) -> Response<Body> {
    let mut r = json_response(StatusCode::OK, body);
    r.headers_mut().insert(
        "content-type",
        format!("application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList")
            .parse()
            .expect("header"),
    );
    r
}

/// The WebSocket subprotocol kubectl (1.31 and later) tunnels port-forward's
/// SPDY streams in.
pub const PORT_FORWARD_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// Which aggregated discovery version `accept` asks for, if any.
fn wants_aggregated(accept: &str) -> Option<&'static str> {
    if !accept.contains("as=APIGroupDiscoveryList") {
        return None;
    }
    if accept.contains("v=v2;") || accept.contains("v=v2,") || accept.ends_with("v=v2") {
        Some("v2")
    } else if accept.contains("v=v2beta1") {
        Some("v2beta1")
    } else {
        None
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + Sync + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Ends the stream with a normal closure (status 1000), as the real server does.
async fn close<S: futures_util::Sink<Message> + Unpin>(sink: &mut S) {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    let _ = sink.close().await;
}

/// The server side of an upgraded WebSocket.
pub(crate) type Ws = tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// port-forward in the WebSocket channel protocol, as the kubelet speaks
/// it to clients other than kubectl: the `k`-th port of the request on
/// channels `2k` (data) and `2k + 1` (errors), each opened by the port
/// (two bytes, little-endian) from this side; every port reaches `target`.
async fn channel_port_forward(ws: Ws, ports: Vec<u16>, target: SocketAddr) {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let mut writers = Vec::new();
    // Channels are one byte: 128 ports at most.
    for (k, port) in ports.iter().enumerate().take(128) {
        let data = (2 * k) as u8;
        for ch in [data, data + 1] {
            let [lo, hi] = port.to_le_bytes();
            if sink.send(Message::binary(vec![ch, lo, hi])).await.is_err() {
                return;
            }
        }
        let Ok(tcp) = tokio::net::TcpStream::connect(target).await else {
            return;
        };
        let (mut r, w) = tcp.into_split();
        writers.push(w);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = r.read(&mut buf).await {
                let mut m = vec![data];
                m.extend_from_slice(&buf[..n]);
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let send = async {
        while let Some(m) = rx.recv().await {
            if sink.send(Message::binary(m)).await.is_err() {
                break;
            }
        }
    };
    let receive = async {
        while let Some(Ok(m)) = stream.next().await {
            match m {
                Message::Binary(b) if b.len() > 1 && b[0] % 2 == 0 => {
                    if let Some(w) = writers.get_mut(usize::from(b[0] / 2))
                        && w.write_all(&b[1..]).await.is_err()
                    {
                        break;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::select! {
        _ = send => {}
        _ = receive => {}
    }
}

/// A command running for exec or attach, its output read into a channel.
pub(crate) struct Exec {
    /// The command's stdin, while open.
    pub stdin: Option<tokio::process::ChildStdin>,
    /// Output as it comes: (1 stdout or 2 stderr; 1 for both with a tty, data).
    pub out: tokio::sync::mpsc::Receiver<(u8, Vec<u8>)>,
    child: tokio::process::Child,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Exec {
    /// Starts `command` in `dir`; on failure, the `Status` to send instead.
    pub(crate) fn spawn(
        dir: &std::path::Path,
        command: &[String],
        tty: bool,
    ) -> Result<Exec, Value> {
        if command.is_empty() {
            return Err(json!({"metadata": {}, "status": "Failure",
                "message": "you must specify at least one command for the container",
                "reason": "BadRequest", "code": 400}));
        }
        let _ = std::fs::create_dir_all(dir);
        let mut cmd = tokio::process::Command::new(&command[0]);
        cmd.args(&command[1..])
            .current_dir(dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            json!({"metadata": {}, "status": "Failure",
                "message": format!("exec: \"{}\": {e}", command[0]), "reason": "InternalError", "code": 500})
        })?;
        let (tx, out) = tokio::sync::mpsc::channel(64);
        let mut readers = Vec::new();
        let pipes: [(Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>, u8); 2] = [
            (child.stdout.take().map(|s| Box::new(s) as _), 1),
            (
                child.stderr.take().map(|s| Box::new(s) as _),
                if tty { 1 } else { 2 },
            ),
        ];
        for (pipe, ch) in pipes {
            let Some(mut pipe) = pipe else { continue };
            let tx = tx.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match pipe.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tx.send((ch, buf[..n].to_vec())).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }));
        }
        Ok(Exec {
            stdin: child.stdin.take(),
            out,
            child,
            readers,
        })
    }

    /// Waits for the command (after its output ended) and returns its `Status`.
    pub(crate) async fn status(&mut self) -> Value {
        let code = self
            .child
            .wait()
            .await
            .ok()
            .and_then(|s| s.code())
            .unwrap_or(-1);
        if code == 0 {
            json!({"metadata": {}, "status": "Success"})
        } else {
            json!({"metadata": {}, "status": "Failure",
                "message": format!("command terminated with non-zero exit code: exit status {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
        }
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// Runs one exec (or attach) session over the channel protocol.
async fn run_exec(
    ws: Ws,
    dir: PathBuf,
    command: Vec<String>,
    tty: bool,
    want_stdin: bool,
    v5: bool,
) {
    let (mut sink, mut source) = ws.split();
    let status_frame = |v: &Value| -> Message {
        Message::Binary(
            [vec![3u8], serde_json::to_vec(v).expect("json")]
                .concat()
                .into(),
        )
    };
    let mut exec = match Exec::spawn(&dir, &command, tty) {
        Ok(e) => e,
        Err(status) => {
            let _ = sink.send(status_frame(&status)).await;
            close(&mut sink).await;
            return;
        }
    };
    let mut child_in = exec.stdin.take().filter(|_| want_stdin);
    let input = async {
        while let Some(Ok(msg)) = source.next().await {
            let data = match msg {
                Message::Binary(b) => b.to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            match data.first() {
                Some(0) => {
                    if let Some(w) = child_in.as_mut()
                        && w.write_all(&data[1..]).await.is_err()
                    {
                        child_in = None;
                    }
                }
                // v5: "close stdin".
                Some(255) if v5 && data.get(1) == Some(&0) => child_in = None,
                _ => {}
            }
        }
        child_in = None;
        std::future::pending::<()>().await;
    };
    let output = async {
        while let Some((ch, data)) = exec.out.recv().await {
            let mut m = Vec::with_capacity(data.len() + 1);
            m.push(ch);
            m.extend_from_slice(&data);
            if sink.send(Message::Binary(m.into())).await.is_err() {
                break;
            }
        }
        let status = exec.status().await;
        let _ = sink.send(status_frame(&status)).await;
        close(&mut sink).await;
    };
    tokio::select! {
        _ = input => {}
        _ = output => {}
    }
}
