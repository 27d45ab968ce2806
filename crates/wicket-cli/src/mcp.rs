//! `wicket mcp`: an MCP server (the official Rust SDK, `rmcp`) through which
//! an AI agent acts on Wicket connections with its own token.
//!
//! Every tool call goes through the connection's gate exactly as a native
//! client would (the PostgreSQL wire protocol to `wicket-pg`, HTTP to
//! `wicket-http`), so policy, approvals, masking, audit and recording are the
//! gate's own. `reasoning` is a required argument of every tool; the
//! optional `trace` (steps, confidence, sources) is attached to the control
//! service's trace API and joined to the command by its `traceparent`.
//!
//! Transports: stdio (the agent starts `wicket mcp`) and streamable HTTP
//! (`--listen`, path `/mcp`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    InitializeResult, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ServerCapabilities, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Value, json};

use crate::{Cli, CliError};

mod exec;
mod pg;
mod ssh;

/// `wicket mcp` arguments.
#[derive(Debug, clap::Args)]
pub struct McpArgs {
    /// A connection to offer, with its gate: `NAME=postgresql://HOST:PORT/DB`
    /// (wicket-pg; `?sslmode=verify-full&sslrootcert=CA` for TLS),
    /// `NAME=http://HOST:PORT` or `https://…` (wicket-http), or
    /// `NAME=k8s+https://HOST:PORT` (wicket-k8s), or
    /// `NAME=ssh://USER@HOST:PORT?known_hosts=FILE` (wicket-ssh, its host
    /// key pinned in FILE). For https, `?ca=FILE` names the CA that signed
    /// the gate's certificate. Repeat.
    #[arg(long = "gate", value_parser = gate, required = true)]
    pub gates: Vec<(String, String)>,
    /// `stdio` (the agent starts this command) or `http` (streamable HTTP).
    #[arg(long, default_value = "stdio", value_parser = ["stdio", "http"])]
    pub transport: String,
    /// Address of the streamable HTTP endpoint (`/mcp`).
    #[arg(long, default_value = "127.0.0.1:7490")]
    pub listen: SocketAddr,
    /// Most rows a query returns to the agent (the rest are counted).
    #[arg(long, default_value_t = 500)]
    pub max_rows: usize,
}

fn gate(s: &str) -> Result<(String, String), String> {
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=URL, got `{s}`"))?;
    let ok = [
        "postgresql://",
        "postgres://",
        "http://",
        "https://",
        "k8s+https://",
        "ssh://",
    ]
    .iter()
    .any(|p| url.starts_with(p));
    if name.is_empty() || !ok {
        return Err(format!(
            "expected NAME=postgresql://…, NAME=http(s)://…, NAME=k8s+https://… or NAME=ssh://…, got `{s}`"
        ));
    }
    Ok((name.to_string(), url.to_string()))
}

/// A connection the server offers.
#[derive(Debug, Clone)]
enum Gate {
    Postgres(pg::Target),
    Http(Web),
    Kubernetes(Web),
    Ssh(ssh::Target),
}

/// An HTTP-speaking gate: its base URL, and clients that trust its CA (an
/// HTTP one, and the TLS configuration exec's WebSocket uses).
#[derive(Debug, Clone)]
struct Web {
    base: String,
    client: reqwest::Client,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A TLS client configuration that trusts only the CA certificates in `ca`
/// (PEM): a gate's certificate is checked against its own CA. Built once
/// per gate.
fn tls_trusting(ca: &std::path::Path, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("cannot read {}: {e}", ca.display()))?
    {
        roots
            .add(c.map_err(|e| format!("{}: {e}", ca.display()))?)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

impl Web {
    /// `URL[?ca=FILE]`: the CA is taken out of the URL.
    fn parse(url: &str) -> Result<Web, String> {
        let mut u = url::Url::parse(url).map_err(|e| format!("bad gate URL {url}: {e}"))?;
        let ca = u
            .query_pairs()
            .find(|(k, _)| k == "ca")
            .map(|(_, v)| v.into_owned());
        u.set_query(None);
        let tls = ca
            .map(|ca| tls_trusting(std::path::Path::new(&ca), &[]))
            .transpose()?;
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(3600));
        if let Some(cfg) = &tls {
            b = b.use_preconfigured_tls((**cfg).clone());
        }
        Ok(Web {
            base: u.as_str().trim_end_matches('/').to_string(),
            client: b.build().map_err(|e| format!("HTTP client: {e}"))?,
            tls,
        })
    }
}

/// The MCP server: one per MCP session (stdio has one; HTTP one per client).
#[derive(Clone)]
struct Wicket {
    /// The token of `wicket mcp`'s user (stdio). Over HTTP each request
    /// brings its own (`Authorization: Bearer`), and this is `None`.
    token: Option<String>,
    gates: Arc<BTreeMap<String, Gate>>,
    control: Option<crate::commands::Client>,
    max_rows: usize,
}

impl std::fmt::Debug for Wicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wicket")
            .field("gates", &self.gates.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A control-service request carrying `token` as its bearer credential.
fn with_bearer<T>(msg: T, token: &str) -> Result<tonic::Request<T>, String> {
    let mut req = tonic::Request::new(msg);
    let auth = tonic::metadata::MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| "the token is not a valid header value".to_string())?;
    req.metadata_mut().insert("authorization", auth);
    Ok(req)
}

/// A tool's input schema: the arguments every tool shares (`connection`,
/// one of `names`; `reasoning`; `trace`) and its `own`, of which `required`
/// are required besides `connection` and `reasoning`.
fn schema(names: &[&String], own: Value, required: &[&str]) -> Arc<serde_json::Map<String, Value>> {
    let mut props = json!({
        "connection": {"type": "string", "enum": names, "description": "The Wicket connection to act on."},
        "reasoning": {"type": "string", "minLength": 1,
            "description": "Why you are doing this: recorded with the command, shown to approvers."},
        "trace": {"type": "object", "description": "Optional structured reasoning trace.",
            "properties": {
                "prompt": {"type": "string", "description": "The task you were given."},
                "steps": {"type": "array", "items": {"type": "object", "properties": {
                    "description": {"type": "string", "description": "What you did or concluded."},
                    "tool": {"type": "string", "description": "The tool used, if any."},
                    "observation": {"type": "string", "description": "What you observed."}},
                    "required": ["description"]}},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "sources": {"type": "array", "items": {"type": "string"}}}},
    });
    if let (Some(p), Value::Object(own)) = (props.as_object_mut(), own) {
        p.extend(own);
    }
    let mut all = vec!["connection", "reasoning"];
    all.extend_from_slice(required);
    match json!({"type": "object", "properties": props, "required": all,
                 "additionalProperties": false})
    {
        Value::Object(o) => Arc::new(o),
        _ => unreachable!("a literal object"),
    }
}

impl Wicket {
    fn names<'a>(
        &'a self,
        offered: Option<&std::collections::HashSet<String>>,
        kind: fn(&Gate) -> bool,
    ) -> Vec<&'a String> {
        self.gates
            .iter()
            .filter(|(n, g)| kind(g) && offered.is_none_or(|o| o.contains(*n)))
            .map(|(n, _)| n)
            .collect()
    }

    /// The connections `token`'s principal may use now (a policy grant or
    /// an access grant in force), or `None` when the control service cannot
    /// say: then every gate is listed, and the gates refuse what policy does.
    async fn granted(&self, token: &str) -> Option<std::collections::HashSet<String>> {
        let control = self.control.as_ref()?;
        let req = with_bearer(wicket_proto::v1::ListMyConnectionsRequest {}, token).ok()?;
        match wicket_proto::v1::access_service_client::AccessServiceClient::new(
            control.channel.clone(),
        )
        .list_my_connections(req)
        .await
        {
            Ok(r) => Some(
                r.into_inner()
                    .connections
                    .into_iter()
                    .map(|c| c.name)
                    .collect(),
            ),
            Err(e) => {
                eprintln!(
                    "wicket mcp: cannot ask the control service for your connections ({}); listing every --gate",
                    e.message()
                );
                None
            }
        }
    }

    fn tools(&self, offered: Option<&std::collections::HashSet<String>>) -> Vec<Tool> {
        let mut out = Vec::new();
        let pg = self.names(offered, |g| matches!(g, Gate::Postgres(_)));
        if !pg.is_empty() {
            out.push(Tool::new(
                "postgres_query",
                "Run SQL on a PostgreSQL connection through its Wicket gate. Policy may refuse it or hold it for a human's approval; sensitive columns come back masked. Returns the columns and rows of the last statement that returned rows, and each statement's command tag.",
                schema(
                    &pg,
                    json!({"sql": {"type": "string", "minLength": 1,
                        "description": "One SQL statement (or several, separated by semicolons)."}}),
                    &["sql"],
                ),
            ));
        }
        let http = self.names(offered, |g| matches!(g, Gate::Http(_)));
        if !http.is_empty() {
            out.push(Tool::new(
                "http_request",
                "Call an HTTP API through its Wicket gate. Policy may refuse the request or hold it for a human's approval; sensitive fields come back masked. Returns the status, content type and body.",
                schema(
                    &http,
                    json!({
                        "method": {"type": "string", "enum": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]},
                        "path": {"type": "string", "pattern": "^/",
                            "description": "Path and query, e.g. /api/customers?limit=10"},
                        "body": {"description": "JSON body (for POST, PUT, PATCH)."},
                    }),
                    &["method", "path"],
                ),
            ));
        }
        let hosts = self.names(offered, |g| matches!(g, Gate::Ssh(_)));
        if !hosts.is_empty() {
            out.push(Tool::new(
                "ssh_exec",
                "Run a command on a host through its Wicket SSH gate. Policy may refuse it or hold it for a human's approval; output is masked and recorded. Returns the exit code, stdout and stderr.",
                schema(
                    &hosts,
                    json!({"command": {"type": "string", "minLength": 1,
                        "description": "The shell command to run on the host."}}),
                    &["command"],
                ),
            ));
        }
        let k8s = self.names(offered, |g| matches!(g, Gate::Kubernetes(_)));
        if !k8s.is_empty() {
            out.push(Tool::new(
                "kubernetes_exec",
                "Run a command in a pod through the Kubernetes gate (kubectl exec, as yourself). Policy may refuse it or hold it for approval; output is masked and recorded. Returns the exit code, stdout and stderr.",
                schema(
                    &k8s,
                    json!({
                        "namespace": {"type": "string", "minLength": 1},
                        "pod": {"type": "string", "minLength": 1},
                        "container": {"type": "string",
                            "description": "Default: the pod's only or default container."},
                        "command": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                            "description": "The command and its arguments, e.g. [\"sh\", \"-c\", \"ls /data\"]."},
                    }),
                    &["namespace", "pod", "command"],
                ),
            ));
            out.push(Tool::new(
                "kubernetes_request",
                "Call the Kubernetes API through its Wicket gate, as yourself (the cluster's RBAC applies to you). Policy may refuse the request or hold it for a human's approval; Secret values come back redacted unless policy allows them. Returns the status and the JSON body.",
                schema(
                    &k8s,
                    json!({
                        "method": {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"]},
                        "path": {"type": "string", "pattern": "^/(api|apis)(/|$)",
                            "description": "A Kubernetes API path, e.g. /api/v1/namespaces/default/pods"},
                        "body": {"description": "The object (JSON) for POST, PUT and PATCH (merge patch)."},
                    }),
                    &["method", "path"],
                ),
            ));
        }
        out
    }

    /// Stores the structured trace and returns the `traceparent` that
    /// joins commands to it.
    async fn attach_trace(
        &self,
        token: &str,
        reasoning: &str,
        trace: Option<&Value>,
    ) -> Result<Option<String>, String> {
        let (Some(trace), Some(control)) = (trace, &self.control) else {
            return Ok(None);
        };
        let mut id = [0u8; 16];
        let mut span = [0u8; 8];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| "no randomness".to_string())?;
        aws_lc_rs::rand::fill(&mut span).map_err(|_| "no randomness".to_string())?;
        let trace_id = hex::encode(id);
        let steps = trace["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| wicket_proto::v1::ReasoningStep {
                description: s["description"].as_str().unwrap_or_default().into(),
                tool: s["tool"].as_str().unwrap_or_default().into(),
                observation: s["observation"].as_str().unwrap_or_default().into(),
            })
            .collect();
        let msg = wicket_proto::v1::AttachTraceRequest {
            trace: Some(wicket_proto::v1::ReasoningTrace {
                trace_id: trace_id.clone(),
                reasoning: reasoning.into(),
                prompt: trace["prompt"].as_str().unwrap_or_default().into(),
                steps,
                confidence: trace["confidence"].as_f64().unwrap_or_default(),
                sources: trace["sources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect(),
            }),
        };
        wicket_proto::v1::trace_service_client::TraceServiceClient::new(control.channel.clone())
            .attach(with_bearer(msg, token)?)
            .await
            .map_err(|e| {
                format!(
                    "the control service did not take the trace: {}",
                    e.message()
                )
            })?;
        Ok(Some(format!("00-{trace_id}-{}-01", hex::encode(span))))
    }
}

/// Checks `args` against the parts of the tool's schema that matter here:
/// required arguments present and not empty, no unknown ones, strings where
/// strings go, and `enum` values.
fn check_arguments(tool: &Tool, args: &Value) -> Result<(), String> {
    let schema = &tool.input_schema;
    let props = schema
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for r in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let missing = match args.get(r) {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.trim().is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            Some(_) => false,
        };
        if missing {
            return Err(if r == "reasoning" {
                "`reasoning` is required: say why you are making this call".into()
            } else {
                format!("`{r}` is required")
            });
        }
    }
    for (k, v) in args.as_object().into_iter().flatten() {
        let Some(p) = props.get(k) else {
            return Err(format!("unknown argument `{k}`"));
        };
        if p["type"] == "string" && !v.is_string() {
            return Err(format!("`{k}` must be a string"));
        }
        if let Some(allowed) = p["enum"].as_array()
            && !allowed.contains(v)
        {
            return Err(format!(
                "`{k}` must be one of {}",
                Value::Array(allowed.clone())
            ));
        }
    }
    Ok(())
}

/// A tool's answer: its structured result, marked as an error when the
/// command failed or was refused (`ok` false); a text error when the call
/// could not be made.
fn respond(result: Result<(Value, bool), String>) -> CallToolResponse {
    CallToolResponse::Complete(match result {
        Ok((out, true)) => CallToolResult::structured(out),
        Ok((out, false)) => CallToolResult::structured_error(out),
        Err(e) => CallToolResult::error(vec![ContentBlock::text(e)]),
    })
}

/// `(out, exit code 0)`, for the tools that run a command.
fn exited(out: Value) -> (Value, bool) {
    let ok = out["exit_code"] == 0;
    (out, ok)
}

impl Wicket {
    /// Where a gate's notes (an approval wait) go: to the client as
    /// progress, when it asked for progress.
    fn notices(&self, context: &RequestContext<RoleServer>) -> impl Fn(String) + use<> {
        let peer = context.peer.clone();
        let progress = context.meta.get_progress_token();
        let step = Arc::new(std::sync::atomic::AtomicU32::new(0));
        move |text: String| {
            let (Some(token), peer) = (progress.clone(), peer.clone()) else {
                return;
            };
            let n = step.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            tokio::spawn(async move {
                let _ = peer
                    .notify_progress(
                        ProgressNotificationParam::new(token, f64::from(n)).with_message(text),
                    )
                    .await;
            });
        }
    }

    /// The caller's token: over HTTP the request's `Authorization: Bearer`,
    /// over stdio ours.
    fn caller_token(&self, context: &RequestContext<RoleServer>) -> Result<String, McpError> {
        match context.extensions.get::<hyper::http::request::Parts>() {
            Some(parts) => parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    McpError::invalid_request(
                        "send your access token: Authorization: Bearer <token>",
                        None,
                    )
                }),
            None => self
                .token
                .clone()
                .ok_or_else(|| McpError::internal_error("wicket mcp has no token", None)),
        }
    }
}

impl ServerHandler for Wicket {
    fn get_info(&self) -> InitializeResult {
        let mut info = InitializeResult::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = Implementation::new("wicket", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(
            "Wicket gates privileged access. Every tool needs `reasoning`: say why, in a sentence. \
             A call may be refused (the error names the policy rule) or held until a human approves it."
                .into(),
        );
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        // Only the connections the caller has a grant for.
        let offered = match self.caller_token(&context) {
            Ok(token) => self.granted(&token).await,
            Err(_) => None,
        };
        Ok(ListToolsResult::with_all_items(
            self.tools(offered.as_ref()),
        ))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tools(None).into_iter().find(|t| t.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let token = self.caller_token(&context)?;
        let args = Value::Object(request.arguments.clone().unwrap_or_default());
        let Some(tool) = self.get_tool(&request.name) else {
            return Err(McpError::invalid_params(
                format!("no tool `{}`", request.name),
                None,
            ));
        };
        check_arguments(&tool, &args).map_err(|e| McpError::invalid_params(e, None))?;
        // Checked above: present and not blank.
        let reasoning = args["reasoning"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string();
        let name = args["connection"].as_str().unwrap_or_default();
        let Some(gate) = self.gates.get(name) else {
            return Err(McpError::invalid_params(
                format!("unknown connection `{name}`"),
                None,
            ));
        };
        let client = context
            .peer
            .peer_info()
            .map(|i| format!("{} {}", i.client_info.name, i.client_info.version));
        let app = format!(
            "wicket-mcp ({})",
            client.as_deref().unwrap_or("unknown client")
        );
        let traceparent = match self
            .attach_trace(&token, &reasoning, args.get("trace"))
            .await
        {
            Ok(t) => t,
            Err(e) => return Ok(respond(Err(e))),
        };
        match (request.name.as_ref(), gate) {
            ("postgres_query", Gate::Postgres(target)) => {
                let sql = args["sql"].as_str().unwrap_or_default();
                let notices = self.notices(&context);
                let call = pg::Call {
                    sql,
                    token: &token,
                    reasoning: &reasoning,
                    app: &app,
                    traceparent: traceparent.as_deref(),
                    max_rows: self.max_rows,
                };
                Ok(respond(
                    pg::run(target, call, notices)
                        .await
                        .map(|out| (out.json(), out.error.is_none())),
                ))
            }
            ("ssh_exec", Gate::Ssh(target)) => {
                let command = args["command"].as_str().unwrap_or_default();
                let notices = self.notices(&context);
                let run = ssh::run(
                    target,
                    &token,
                    command,
                    &reasoning,
                    traceparent.as_deref(),
                    notices,
                );
                Ok(respond(run.await.map(exited)))
            }
            ("kubernetes_exec", Gate::Kubernetes(web)) => {
                let run = exec::run(web, &token, &args, &reasoning, &app, traceparent.as_deref());
                Ok(respond(run.await.map(exited)))
            }
            ("http_request", Gate::Http(web)) | ("kubernetes_request", Gate::Kubernetes(web)) => {
                let call = web.call(&token, &args, &reasoning, &app, traceparent.as_deref());
                Ok(respond(call.await))
            }
            (tool, _) => Err(McpError::invalid_params(
                format!("`{name}` is not a connection of tool `{tool}`"),
                None,
            )),
        }
    }
}

impl Web {
    async fn call(
        &self,
        token: &str,
        args: &Value,
        reasoning: &str,
        app: &str,
        traceparent: Option<&str>,
    ) -> Result<(Value, bool), String> {
        let method = args["method"].as_str().unwrap_or("GET");
        let path = args["path"].as_str().unwrap_or("/");
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| format!("bad method {method}"))?;
        let url = format!("{}{path}", self.base);
        let mut req = self
            .client
            .request(method.clone(), &url)
            .bearer_auth(token)
            .header("wicket-reasoning", reasoning.replace(['\r', '\n'], " "))
            .header("user-agent", app);
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        if let Some(body) = args.get("body").filter(|b| !b.is_null()) {
            req = req.json(body);
            if method == reqwest::Method::PATCH && path.starts_with("/api") {
                req = req.header("content-type", "application/merge-patch+json");
            }
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach the gate at {}: {e}", self.base))?;
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| format!("the response broke off: {e}"))?;
        const MAX: usize = 1 << 20;
        let truncated = bytes.len() > MAX;
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
        let body = if ctype.contains("json") {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        } else {
            Value::String(text)
        };
        let out =
            json!({"status": status, "content_type": ctype, "body": body, "truncated": truncated});
        Ok((out, status < 400))
    }
}

/// Runs `wicket mcp`.
pub async fn run(cli: &Cli, args: &McpArgs) -> Result<(), CliError> {
    // Over HTTP every client brings its own token; over stdio it is ours.
    let token = match args.transport.as_str() {
        "stdio" => Some(crate::commands::caller_token(cli)?),
        _ => None,
    };
    let mut gates = BTreeMap::new();
    for (name, url) in &args.gates {
        let g = if url.starts_with("ssh://") {
            Gate::Ssh(ssh::Target::parse(url).map_err(CliError::usage)?)
        } else if let Some(k8s) = url.strip_prefix("k8s+") {
            Gate::Kubernetes(Web::parse(k8s).map_err(CliError::usage)?)
        } else if url.starts_with("http") {
            Gate::Http(Web::parse(url).map_err(CliError::usage)?)
        } else {
            Gate::Postgres(pg::Target::parse(url).map_err(CliError::usage)?)
        };
        if gates.insert(name.clone(), g).is_some() {
            return Err(CliError::usage(format!("--gate {name} is given twice")));
        }
    }
    // The control service takes structured traces; without it, calls with a
    // `trace` say so.
    let control = crate::commands::Client::connect_anonymous(cli).await.ok();
    let server = Wicket {
        token,
        gates: Arc::new(gates),
        control,
        max_rows: args.max_rows,
    };
    match args.transport.as_str() {
        "stdio" => {
            let running = server
                .serve(rmcp::transport::stdio())
                .await
                .map_err(|e| CliError::usage(format!("MCP over stdio: {e}")))?;
            running
                .waiting()
                .await
                .map_err(|e| CliError::usage(format!("MCP over stdio: {e}")))?;
            Ok(())
        }
        _ => http(server, args.listen).await,
    }
}

async fn http(server: Wicket, listen: SocketAddr) -> Result<(), CliError> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::usage(format!("cannot listen on {listen}: {e}")))?;
    eprintln!("wicket mcp: streamable HTTP on http://{listen}/mcp");
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(|e| CliError::usage(format!("accept: {e}")))?;
        let service = service.clone();
        tokio::spawn(async move {
            let svc = hyper_util::service::TowerToHyperService::new(service);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Wicket {
        let mut gates = BTreeMap::new();
        gates.insert(
            "db".to_string(),
            Gate::Postgres(pg::Target::parse("postgresql://a@127.0.0.1:1/d").unwrap()),
        );
        Wicket {
            token: Some("t".into()),
            gates: Arc::new(gates),
            control: None,
            max_rows: 10,
        }
    }

    #[test]
    fn arguments_are_checked_against_the_schema() {
        let tool = server().get_tool("postgres_query").unwrap();
        let ok = json!({"connection": "db", "reasoning": "why", "sql": "SELECT 1"});
        assert_eq!(check_arguments(&tool, &ok), Ok(()));
        for (args, says) in [
            (
                json!({"connection": "db", "sql": "SELECT 1"}),
                "`reasoning` is required",
            ),
            (
                json!({"connection": "db", "reasoning": "  ", "sql": "SELECT 1"}),
                "`reasoning` is required",
            ),
            (
                json!({"connection": "db", "reasoning": "why"}),
                "`sql` is required",
            ),
            (
                json!({"connection": "other", "reasoning": "why", "sql": "x"}),
                "must be one of",
            ),
            (
                json!({"connection": "db", "reasoning": "why", "sql": 1}),
                "must be a string",
            ),
            (
                json!({"connection": "db", "reasoning": "why", "sql": "x", "db": "y"}),
                "unknown argument `db`",
            ),
        ] {
            let e = check_arguments(&tool, &args).unwrap_err();
            assert!(e.contains(says), "{args}: {e}");
        }
    }

    #[test]
    fn gates_are_parsed_with_their_pins() {
        assert!(gate("db=postgresql://h/d").is_ok());
        assert!(
            gate("db=mysql://h/d")
                .unwrap_err()
                .contains("expected NAME=")
        );
        assert!(gate("=http://h").is_err());
        assert!(
            ssh::Target::parse("ssh://u@h:22")
                .unwrap_err()
                .contains("known_hosts")
        );
        assert!(
            pg::Target::parse("postgresql://h/d?sslmode=require")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(
            pg::Target::parse("postgresql://h/")
                .unwrap_err()
                .contains("no database")
        );
    }
}
