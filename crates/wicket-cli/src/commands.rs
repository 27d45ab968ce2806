//! The subcommands.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use wicket_proto::convert;
use wicket_proto::v1;
use wicket_proto::v1::approval_admin_service_client::ApprovalAdminServiceClient;
use wicket_proto::v1::connection_admin_service_client::ConnectionAdminServiceClient;
use wicket_proto::v1::policy_admin_service_client::PolicyAdminServiceClient;
use wicket_proto::v1::session_admin_service_client::SessionAdminServiceClient;

use crate::output::{self, Format, cell};
use crate::{Cli, CliError, Cmd, login};

/// `wicket login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// OIDC issuer URL.
    #[arg(long, env = "WICKET_OIDC_ISSUER")]
    issuer: String,
    /// OAuth client id.
    #[arg(long, env = "WICKET_CLIENT_ID", default_value = "wicket-cli")]
    client_id: String,
    /// Use the client credentials grant (agents, automation).
    #[arg(long)]
    client_credentials: bool,
    /// Client secret for --client-credentials (prefer the environment variable).
    #[arg(long, env = "WICKET_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// Resource indicator (RFC 8707) to ask the token for.
    #[arg(long, env = "WICKET_OIDC_RESOURCE")]
    resource: Option<String>,
    /// Scopes to request.
    #[arg(long, default_value = "openid")]
    scope: String,
}

/// `wicket policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Validate and apply a policy document.
    Apply {
        /// YAML file (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print the current (or a given) policy version.
    Get {
        /// Policy version (default: the current one).
        #[arg(value_name = "VERSION", default_value_t = 0)]
        number: u64,
    },
    /// Check a policy document without applying it.
    Validate {
        /// YAML file (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Explain the decision for a hypothetical principal and command.
    Explain(ExplainArgs),
}

/// `wicket policy explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Connection name.
    #[arg(long, short = 'c')]
    connection: String,
    /// Principal subject (default: you).
    #[arg(long)]
    principal: Option<String>,
    /// Groups of the principal (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// The principal is an agent.
    #[arg(long)]
    agent: bool,
    /// Command class (select, insert, ddl, exec, …).
    #[arg(long = "kind", default_value = "")]
    kind: String,
    /// Verb (SELECT, GET, kubectl verb, program).
    #[arg(long, default_value = "")]
    verb: String,
    /// Command text.
    #[arg(long, default_value = "")]
    text: String,
    /// Risk score 0..100.
    #[arg(long, default_value_t = 0)]
    risk: u32,
    /// Objects touched (repeatable).
    #[arg(long = "object")]
    objects: Vec<String>,
    /// The command carries a reasoning trace.
    #[arg(long)]
    reasoning: bool,
    /// Evaluate at this RFC 3339 time (default: now).
    #[arg(long)]
    at: Option<DateTime<Utc>>,
    /// Explain against this file instead of the applied policy.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
}

/// `wicket connections …`.
#[derive(Debug, Subcommand)]
pub enum ConnectionsCmd {
    /// List connections.
    List,
}

/// `wicket access …`.
#[derive(Debug, Subcommand)]
pub enum AccessCmd {
    /// Ask for access; waits until approvers decide (Ctrl-C stops waiting,
    /// the request stays).
    Request {
        /// Connection name.
        #[arg(long)]
        connection: String,
        /// How long the grant should last once approved (`30m`, `1h`).
        #[arg(long = "for", value_parser = wicket_core::parse_seconds)]
        duration: u32,
        /// Why you need it (approvers read it; it stays with the grant).
        #[arg(long)]
        reason: String,
    },
    /// Grants in force (yours; all of them for readers).
    List {
        /// Only this connection.
        #[arg(long)]
        connection: Option<String>,
    },
}

/// `wicket approvals …`.
#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// List approvals (pending by default).
    List {
        /// pending, approved, denied, expired or all.
        #[arg(long, default_value = "pending")]
        state: String,
    },
    /// Approve a held command.
    Approve {
        /// Approval id.
        id: String,
        /// Comment.
        #[arg(long, default_value = "")]
        comment: String,
        /// Also approve the same statement shape (pg_query fingerprint) or
        /// command from the same principal on the same connection for this
        /// long (`30m`, `2h`; at most the rule's `reuse_for`).
        #[arg(long = "for", value_parser = wicket_core::parse_seconds, default_value = "0")]
        reuse: u32,
    },
    /// Deny a held command.
    Deny {
        /// Approval id.
        id: String,
        /// Reason, shown to the requester.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// `wicket sidecars …`.
#[derive(Debug, Subcommand)]
pub enum SidecarsCmd {
    /// Issue a credential for a sidecar; the token is printed once.
    Create {
        /// Name (for humans and logs).
        #[arg(long)]
        name: String,
        /// Connections the sidecar serves (repeatable; `*` for all).
        #[arg(long = "connection", required = true)]
        connections: Vec<String>,
    },
    /// List credentials (never their secrets).
    List,
    /// Revoke a credential.
    Revoke {
        /// Credential id.
        id: String,
    },
}

/// `wicket sessions …`.
#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// List sessions, newest first.
    List {
        /// Only this connection.
        #[arg(long)]
        connection: Option<String>,
        /// Only this principal (subject).
        #[arg(long)]
        principal: Option<String>,
        /// Only live sessions.
        #[arg(long)]
        active: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show a session and its events.
    Show {
        /// Session id.
        id: String,
    },
    /// Play a session back: a terminal session in this terminal at its
    /// own pace (`--speed`, pauses cut to `--idle-limit`); query, HTTP and
    /// Kubernetes sessions as a timeline of commands with their decisions,
    /// approvals, results and reasoning.
    Replay(crate::replay::ReplayArgs),
    /// Search events across sessions (text, principal, connection,
    /// decision, time range), newest first.
    Search(crate::replay::SearchArgs),
    /// Put a session under legal hold: retention keeps it until released.
    Hold {
        /// Session id.
        id: String,
        /// Why (a case, a ticket): recorded and shown.
        #[arg(long)]
        reason: String,
    },
    /// Release a session's legal hold (retention applies again).
    Release {
        /// Session id.
        id: String,
    },
    /// Write a session's terminal recording as asciicast v2 (play it with
    /// `asciinema play FILE`).
    Recording {
        /// Session id.
        id: String,
        /// The channel to write, when the session recorded several.
        #[arg(long)]
        channel: Option<String>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Every event of session `id`, in order.
pub(crate) async fn session_events(
    c: &Client,
    api: &mut wicket_proto::v1::session_admin_service_client::SessionAdminServiceClient<Channel>,
    id: &str,
) -> Result<Vec<v1::AuditEvent>, CliError> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = api
            .list_session_events(c.req(v1::ListSessionEventsRequest {
                session_id: id.to_string(),
                after_seq: after,
                limit: 1000,
            }))
            .await?
            .into_inner()
            .events;
        // A page can be short of the limit (it stops before 3 MiB): only an
        // empty one ends the session.
        let done = page.is_empty();
        after = page.last().map(|e| e.seq).unwrap_or(after);
        events.extend(page);
        if done {
            return Ok(events);
        }
    }
}

fn read_file(path: &PathBuf) -> Result<(String, String), CliError> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::usage(format!("cannot read stdin: {e}")))?;
        return Ok((s, "<stdin>".into()));
    }
    let s = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
    Ok((s, path.display().to_string()))
}

#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) channel: Channel,
    token: String,
}

/// The caller's token: `--token`/`WICKET_TOKEN`, else the login cache.
pub(crate) fn caller_token(cli: &Cli) -> Result<String, CliError> {
    match &cli.token {
        Some(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => {
            let cached = login::load(std::env::var("WICKET_OIDC_ISSUER").ok().as_deref())
                .ok_or_else(|| {
                    CliError::auth("not logged in: run `wicket login` or set WICKET_TOKEN")
                })?;
            if cached.expires_at != 0 && cached.expires_at <= Utc::now().timestamp() {
                return Err(CliError::auth(format!(
                    "your token from {} has expired: run `wicket login` again",
                    cached.issuer
                )));
            }
            Ok(cached.access_token)
        }
    }
}

impl Client {
    pub(crate) async fn connect(cli: &Cli) -> Result<Client, CliError> {
        let token = caller_token(cli)?;
        Client::connect_with(cli, token).await
    }

    /// A channel without a token of its own (calls carry their caller's).
    pub(crate) async fn connect_anonymous(cli: &Cli) -> Result<Client, CliError> {
        Client::connect_with(cli, String::new()).await
    }

    async fn connect_with(cli: &Cli, token: String) -> Result<Client, CliError> {
        let mut ep = Endpoint::from_shared(cli.control.clone())
            .map_err(|e| CliError::usage(format!("invalid --control URL `{}`: {e}", cli.control)))?
            .connect_timeout(std::time::Duration::from_secs(5));
        if cli.control.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &cli.ca_cert {
                let pem = std::fs::read(ca)
                    .map_err(|e| CliError::usage(format!("cannot read {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            ep = ep
                .tls_config(tls)
                .map_err(|e| CliError::usage(format!("TLS: {e}")))?;
        } else if !is_loopback(&cli.control) {
            eprintln!(
                "wicket: warning: sending your token over plain http to {}",
                cli.control
            );
        }
        let channel = ep.connect().await.map_err(|e| {
            CliError::unavailable(format!(
                "cannot reach the control service at {}: {e}\nhint: is wicket-control running? (see `cargo xtask demo`)",
                cli.control
            ))
        })?;
        Ok(Client { channel, token })
    }

    pub(crate) fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = MetadataValue::try_from(format!("Bearer {}", self.token)) {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }
}

fn is_loopback(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    matches!(host, "127.0.0.1" | "localhost" | "[")
        || host.starts_with("127.")
        || url.contains("://[::1]")
}

pub(crate) fn time(t: Option<&prost_types::Timestamp>) -> String {
    convert::from_ts(t)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

pub(crate) fn effect(e: i32) -> &'static str {
    convert::from_effect(e).as_str()
}

fn state(s: i32) -> &'static str {
    convert::from_approval_state(s)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}

fn principal_json(p: Option<&v1::Principal>) -> Value {
    match p {
        None => Value::Null,
        Some(p) => json!({
            "subject": p.subject, "issuer": p.issuer, "display_name": p.display_name,
            "kind": if p.kind == v1::PrincipalKind::Agent as i32 { "agent" } else { "human" },
            "groups": p.groups,
        }),
    }
}

pub(crate) fn principal_label(p: Option<&v1::Principal>) -> String {
    p.map(|p| {
        if p.display_name.is_empty() {
            p.subject.clone()
        } else {
            p.display_name.clone()
        }
    })
    .unwrap_or_default()
}

/// `command`, `session_start`, … for an audit kind.
pub(crate) fn kind_name(k: i32) -> String {
    v1::AuditKind::try_from(k)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("AUDIT_KIND_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

/// The reasoning of a trace, or its prompt when it has none.
pub(crate) fn reasoning_text(r: Option<&v1::ReasoningTrace>) -> String {
    r.map(|r| {
        if r.reasoning.is_empty() {
            r.prompt.clone()
        } else {
            r.reasoning.clone()
        }
    })
    .unwrap_or_default()
}

pub(crate) fn command_json(c: Option<&v1::Command>) -> Value {
    match c {
        None => Value::Null,
        Some(c) => {
            let k = c.classification.clone().unwrap_or_default();
            json!({"text": c.text, "kind": k.kind, "verb": k.verb, "objects": k.objects, "risk": k.risk})
        }
    }
}

pub(crate) fn reasoning_json(r: Option<&v1::ReasoningTrace>) -> Value {
    match r {
        None => Value::Null,
        Some(r) => json!({
            "trace_id": r.trace_id, "reasoning": r.reasoning, "prompt": r.prompt,
            "steps": r.steps.iter().map(|s| json!({"description": s.description, "tool": s.tool, "observation": s.observation})).collect::<Vec<_>>(),
            "confidence": r.confidence, "sources": r.sources,
        }),
    }
}

pub(crate) fn decision_json(d: Option<&v1::DecisionInfo>) -> Value {
    match d {
        None => Value::Null,
        Some(d) => json!({
            "effect": effect(d.effect), "rule": d.rule, "reason": d.reason,
            "review": d.review.as_ref().map(|r| json!({
                "approver_groups": r.approver_groups, "quorum": r.quorum,
                "one_per_group": r.one_per_group, "timeout_seconds": r.timeout_seconds,
            })),
        }),
    }
}

fn approval_json(a: &v1::Approval) -> Value {
    let r = a.request.clone().unwrap_or_default();
    json!({
        "id": a.id, "state": state(a.state), "connection": r.connection, "session_id": r.session_id,
        "principal": principal_json(r.principal.as_ref()),
        "command": command_json(r.command.as_ref()),
        "decision": decision_json(r.decision.as_ref()),
        "reasoning": reasoning_json(r.reasoning.as_ref()),
        "votes": a.votes.iter().map(|v| json!({"approver": v.approver, "approve": v.approve, "comment": v.comment, "at": time(v.at.as_ref())})).collect::<Vec<_>>(),
        "created_at": time(a.created_at.as_ref()), "expires_at": time(a.expires_at.as_ref()), "reason": a.reason,
    })
}

fn session_json(s: &v1::Session) -> Value {
    json!({
        "id": s.id, "connection": s.connection, "principal": principal_json(s.principal.as_ref()),
        "state": s.state, "started_at": time(s.started_at.as_ref()), "ended_at": time(s.ended_at.as_ref()),
        "end_reason": s.end_reason, "commands": s.command_count, "client_addr": s.client_addr, "client_app": s.client_app,
        "hold": s.hold,
    })
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let fmt = cli.output;
    match &cli.command {
        Cmd::Login(a) => {
            let token = if a.client_credentials {
                let secret = a.client_secret.as_deref().ok_or_else(|| {
                    CliError::usage("--client-credentials needs a secret: set WICKET_CLIENT_SECRET")
                })?;
                login::client_credentials(
                    &a.issuer,
                    &a.client_id,
                    secret,
                    a.resource.as_deref(),
                    None,
                )
                .await?
            } else {
                login::device(&a.issuer, &a.client_id, a.resource.as_deref(), &a.scope).await?
            };
            let path = login::save(&token)?;
            let until = chrono::DateTime::from_timestamp(token.expires_at, 0)
                .map(|t| format!(" until {}", t.format("%Y-%m-%d %H:%M UTC")))
                .unwrap_or_default();
            eprintln!(
                "Signed in to {}{until}; token cached in {}",
                token.issuer,
                path.display()
            );
            Ok(())
        }
        Cmd::Logout { issuer } => {
            if login::logout(issuer.as_deref())? {
                eprintln!("Signed out.");
            } else {
                eprintln!("No cached token.");
            }
            Ok(())
        }
        Cmd::Policy(p) => policy(&cli, fmt, p).await,
        Cmd::Connections(ConnectionsCmd::List) => {
            let c = Client::connect(&cli).await?;
            let list = ConnectionAdminServiceClient::new(c.channel.clone())
                .list_connections(c.req(v1::ListConnectionsRequest {}))
                .await?
                .into_inner()
                .connections;
            let protocol = |p: i32| convert::from_protocol(p).map(|p| p.as_str()).unwrap_or("?");
            let rows = list
                .iter()
                .map(|c| {
                    let sorted: std::collections::BTreeMap<_, _> = c.labels.iter().collect();
                    let labels: Vec<String> =
                        sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![
                        c.name.clone(),
                        protocol(c.protocol).into(),
                        c.upstream.clone(),
                        labels.join(","),
                    ]
                })
                .collect();
            let json = list
                .iter()
                .map(|c| json!({"name": c.name, "protocol": protocol(c.protocol), "upstream": c.upstream, "labels": c.labels, "description": c.description}))
                .collect();
            output::rows(
                fmt,
                &["name", "protocol", "upstream", "labels"],
                rows,
                Value::Array(json),
            );
            Ok(())
        }
        Cmd::Approvals(a) => approvals(&cli, fmt, a).await,
        Cmd::Access(a) => access(&cli, fmt, a).await,
        Cmd::Sessions(s) => sessions(&cli, fmt, s).await,
        Cmd::Audit(a) => crate::audit::run(&cli, fmt, a).await,
        Cmd::Sidecars(s) => sidecars(&cli, fmt, s).await,
        Cmd::Ssh(s) => ssh(&cli, fmt, s).await,
        Cmd::Kube(crate::kube::KubeCmd::Config(a)) => crate::kube::config(a),
        Cmd::KubeCredential(a) => crate::kube::credential(&cli, a),
        Cmd::Mcp(a) => crate::mcp::run(&cli, a).await,
    }
}

/// `wicket ssh …`.
#[derive(Debug, Subcommand)]
pub enum SshCmd {
    /// Get a short-lived SSH certificate for your key, signed by the control
    /// service's CA, so plain `ssh -i KEY` reaches any wicket-ssh gate. It
    /// carries who you are (from your `wicket login` token) and expires with
    /// that token. The key is created (Ed25519) when missing.
    Login {
        /// Private key to certify; the certificate is written next to it as
        /// `<KEY>-cert.pub`, where `ssh` finds it.
        #[arg(long, default_value = "~/.wicket/ssh/id_ed25519")]
        key: String,
    },
    /// Answer the SSH gate's password prompt with your token, for
    /// `SSH_ASKPASS=wicket-askpass` style use (set `SSH_ASKPASS` to a script
    /// running `wicket ssh askpass "$1"`, and `SSH_ASKPASS_REQUIRE=force`).
    /// OpenSSH reads at most 1,023 bytes per prompt, so a longer token is
    /// given in parts: the gate asks `… part N:` and this prints part N.
    /// Any other prompt (a host key question) is not answered.
    Askpass {
        /// The prompt ssh shows.
        prompt: String,
    },
}

/// The part of `token` a gate prompt asks for (`None`: not a token prompt).
fn askpass_part(token: &str, prompt: &str) -> Option<String> {
    const PART: usize = 1023;
    if !prompt.contains("Wicket access token") && !prompt.to_lowercase().contains("password") {
        return None;
    }
    let n = prompt
        .split("part ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let bytes = token.as_bytes();
    let start = (n - 1) * PART;
    if start > bytes.len() {
        return Some(String::new());
    }
    let end = (start + PART).min(bytes.len());
    Some(String::from_utf8_lossy(&bytes[start..end]).into_owned())
}

fn expand_home(path: &str) -> std::path::PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(rest)
        }
        None => std::path::PathBuf::from(path),
    }
}

/// The public half of the key at `key`, creating the key (Ed25519, mode
/// 0600) when the file does not exist.
fn ssh_key_pair(key: &std::path::Path) -> Result<String, CliError> {
    let public = key.with_extension(match key.extension() {
        Some(e) => format!("{}.pub", e.to_string_lossy()),
        None => "pub".into(),
    });
    if !key.exists() {
        if let Some(dir) = key.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| CliError::usage(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut seed = [0u8; 32];
        aws_lc_rs::rand::fill(&mut seed).map_err(|_| CliError::usage("no random source"))?;
        let private = ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed));
        private
            .write_openssh_file(key, ssh_key::LineEnding::LF)
            .map_err(|e| CliError::usage(format!("cannot write {}: {e}", key.display())))?;
        let line = private
            .public_key()
            .to_openssh()
            .map_err(|e| CliError::usage(e.to_string()))?;
        std::fs::write(&public, format!("{line} wicket\n"))
            .map_err(|e| CliError::usage(format!("cannot write {}: {e}", public.display())))?;
        eprintln!("Created the key {}", key.display());
    }
    std::fs::read_to_string(&public).map_err(|e| {
        CliError::usage(format!(
            "cannot read the public key {}: {e} (give --key a key whose .pub file is next to it)",
            public.display()
        ))
    })
}

async fn ssh(cli: &Cli, fmt: Format, cmd: &SshCmd) -> Result<(), CliError> {
    use wicket_proto::v1::credential_service_client::CredentialServiceClient;
    match cmd {
        SshCmd::Askpass { prompt } => {
            let token = caller_token(cli)?;
            match askpass_part(&token, prompt) {
                Some(part) => {
                    println!("{part}");
                    Ok(())
                }
                None => Err(CliError::usage(format!(
                    "not a Wicket token prompt: {prompt}"
                ))),
            }
        }
        SshCmd::Login { key } => {
            let key = expand_home(key);
            let public_key = ssh_key_pair(&key)?;
            let c = Client::connect(cli).await?;
            let r = CredentialServiceClient::new(c.channel.clone())
                .sign_ssh_key(c.req(v1::SignSshKeyRequest { public_key }))
                .await?
                .into_inner();
            let cert = {
                let mut name = key.clone().into_os_string();
                name.push("-cert.pub");
                std::path::PathBuf::from(name)
            };
            std::fs::write(&cert, format!("{}\n", r.certificate.trim()))
                .map_err(|e| CliError::usage(format!("cannot write {}: {e}", cert.display())))?;
            let until = time(r.valid_before.as_ref());
            match fmt {
                Format::Json | Format::Jsonl => output::json(
                    fmt,
                    &json!({"key": key.display().to_string(), "certificate": cert.display().to_string(), "valid_before": until, "ca_public_key": r.ca_public_key}),
                ),
                Format::Table => {
                    println!("Certificate {} valid until {until}.", cert.display());
                    println!("Connect with: ssh -i {} -p PORT USER@GATE", key.display());
                    println!(
                        "For plain `ssh`, add `IdentityFile {}` under your gates' Host entries in \
                         ~/.ssh/config, or certify ssh's own key: wicket ssh login --key ~/.ssh/id_ed25519",
                        key.display()
                    );
                }
            }
            Ok(())
        }
    }
}

async fn sidecars(cli: &Cli, fmt: Format, cmd: &SidecarsCmd) -> Result<(), CliError> {
    use wicket_proto::v1::sidecar_admin_service_client::SidecarAdminServiceClient;
    let c = Client::connect(cli).await?;
    let mut api = SidecarAdminServiceClient::new(c.channel.clone());
    let cred_json = |s: &v1::SidecarCredential| json!({"id": s.id, "name": s.name, "connections": s.connections, "created_at": time(s.created_at.as_ref()), "revoked": s.revoked});
    match cmd {
        SidecarsCmd::Create { name, connections } => {
            let r = api
                .create_sidecar_credential(c.req(v1::CreateSidecarCredentialRequest {
                    name: name.clone(),
                    connections: connections.clone(),
                }))
                .await?
                .into_inner();
            let cred = r.credential.unwrap_or_default();
            match fmt {
                Format::Json | Format::Jsonl => {
                    let mut j = cred_json(&cred);
                    j["token"] = Value::String(r.token);
                    output::json(fmt, &j);
                }
                Format::Table => {
                    eprintln!(
                        "Created sidecar credential {} for {}; the token is shown once:",
                        cred.id,
                        cred.connections.join(", ")
                    );
                    println!("{}", r.token);
                }
            }
        }
        SidecarsCmd::List => {
            let list = api
                .list_sidecar_credentials(c.req(v1::ListSidecarCredentialsRequest {}))
                .await?
                .into_inner()
                .credentials;
            let rows = list
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.name.clone(),
                        s.connections.join(","),
                        time(s.created_at.as_ref()),
                        s.revoked.to_string(),
                    ]
                })
                .collect();
            output::rows(
                fmt,
                &["id", "name", "connections", "created", "revoked"],
                rows,
                Value::Array(list.iter().map(cred_json).collect()),
            );
        }
        SidecarsCmd::Revoke { id } => {
            let s = api
                .revoke_sidecar_credential(
                    c.req(v1::RevokeSidecarCredentialRequest { id: id.clone() }),
                )
                .await?
                .into_inner();
            output::record(
                fmt,
                vec![("id", s.id.clone()), ("revoked", s.revoked.to_string())],
                cred_json(&s),
            );
        }
    }
    Ok(())
}

async fn policy(cli: &Cli, fmt: Format, cmd: &PolicyCmd) -> Result<(), CliError> {
    let c = Client::connect(cli).await?;
    let mut api = PolicyAdminServiceClient::new(c.channel.clone());
    match cmd {
        PolicyCmd::Apply { file } => {
            let (document, source_name) = read_file(file)?;
            let r = api
                .apply_policy(c.req(v1::ApplyPolicyRequest {
                    document,
                    source_name,
                }))
                .await?
                .into_inner();
            let msg = if r.changed {
                "applied"
            } else {
                "unchanged (same as the current version)"
            };
            output::record(
                fmt,
                vec![
                    ("version", r.version.to_string()),
                    ("sha256", r.sha256.clone()),
                    ("result", msg.into()),
                ],
                json!({"version": r.version, "sha256": r.sha256, "changed": r.changed}),
            );
        }
        PolicyCmd::Get { number } => {
            let r = api
                .get_policy(c.req(v1::GetPolicyRequest { version: *number }))
                .await?
                .into_inner();
            match fmt {
                Format::Table => {
                    eprintln!(
                        "# version {} applied by {} at {}",
                        r.version,
                        r.applied_by,
                        time(r.applied_at.as_ref())
                    );
                    print!("{}", r.document);
                    if !r.document.ends_with('\n') {
                        println!();
                    }
                }
                Format::Json | Format::Jsonl => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "version": r.version, "sha256": r.sha256, "applied_by": r.applied_by,
                        "applied_at": time(r.applied_at.as_ref()), "document": r.document,
                    }))
                    .expect("json")
                ),
            }
        }
        PolicyCmd::Validate { file } => {
            let (document, source_name) = read_file(file)?;
            let r = api
                .validate_policy(c.req(v1::ValidatePolicyRequest {
                    document,
                    source_name: source_name.clone(),
                }))
                .await?
                .into_inner();
            if fmt != Format::Table {
                let errors: Vec<Value> = r.errors.iter().map(|e| json!({"file": e.source_name, "line": e.line, "column": e.column, "field": e.field, "message": e.message})).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"valid": r.valid, "errors": errors}))
                        .expect("json")
                );
            } else if r.valid {
                println!("{source_name}: valid");
            } else {
                for e in &r.errors {
                    let field = if e.field.is_empty() {
                        String::new()
                    } else {
                        format!(" {}:", e.field)
                    };
                    eprintln!(
                        "{}:{}:{}:{field} {}",
                        e.source_name, e.line, e.column, e.message
                    );
                }
            }
            if !r.valid {
                return Err(CliError::failed(format!(
                    "{} error(s) in {source_name}",
                    r.errors.len()
                )));
            }
        }
        PolicyCmd::Explain(a) => {
            let document = match &a.file {
                Some(f) => read_file(f)?.0,
                None => String::new(),
            };
            let principal = a.principal.as_ref().map(|s| v1::Principal {
                subject: s.clone(),
                issuer: String::new(),
                kind: if a.agent {
                    v1::PrincipalKind::Agent
                } else {
                    v1::PrincipalKind::Human
                } as i32,
                groups: a.groups.clone(),
                display_name: String::new(),
                client_id: String::new(),
            });
            let r = api
                .explain_policy(c.req(v1::ExplainRequest {
                    principal,
                    connection: a.connection.clone(),
                    command: Some(v1::Command {
                        text: a.text.clone(),
                        classification: Some(v1::Classification {
                            kind: a.kind.clone(),
                            verb: a.verb.clone(),
                            objects: a.objects.clone(),
                            argv: Vec::new(),
                            risk: a.risk,
                            fingerprint: String::new(),
                        }),
                    }),
                    has_reasoning: a.reasoning,
                    at: a.at.map(convert::ts),
                    document,
                }))
                .await?
                .into_inner();
            let d = r.decision.clone().unwrap_or_default();
            let matched: Vec<String> = r
                .matched
                .iter()
                .map(|m| {
                    let note = if m.note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", m.note)
                    };
                    format!("{}={}{note}", m.rule, effect(m.effect))
                })
                .collect();
            let mut pairs = vec![
                ("decision", effect(d.effect).to_string()),
                ("rule", d.rule.clone()),
                ("reason", d.reason.clone()),
                (
                    "grant",
                    if r.grant.is_empty() {
                        "(none)".into()
                    } else {
                        r.grant.clone()
                    },
                ),
                (
                    "matched",
                    if matched.is_empty() {
                        "(none)".into()
                    } else {
                        matched.join(", ")
                    },
                ),
            ];
            if let Some(rv) = &d.review {
                pairs.push((
                    "approvers",
                    format!(
                        "{} (quorum {}, timeout {}s)",
                        rv.approver_groups.join(", "),
                        rv.quorum,
                        rv.timeout_seconds
                    ),
                ));
            }
            pairs.push((
                "policy",
                if r.policy_version == 0 {
                    "file".into()
                } else {
                    format!("v{}", r.policy_version)
                },
            ));
            output::record(
                fmt,
                pairs,
                json!({
                    "decision": decision_json(Some(&d)), "grant": r.grant, "policy_version": r.policy_version,
                    "matched": r.matched.iter().map(|m| json!({"rule": m.rule, "effect": effect(m.effect), "note": m.note})).collect::<Vec<_>>(),
                }),
            );
        }
    }
    Ok(())
}

async fn access(cli: &Cli, fmt: Format, cmd: &AccessCmd) -> Result<(), CliError> {
    use tokio_stream::StreamExt as _;
    use wicket_proto::v1::access_service_client::AccessServiceClient;
    let c = Client::connect(cli).await?;
    let mut api = AccessServiceClient::new(c.channel.clone());
    match cmd {
        AccessCmd::Request {
            connection,
            duration,
            reason,
        } => {
            let mut updates = api
                .request_access(c.req(v1::AccessRequest {
                    connection: connection.clone(),
                    duration_seconds: *duration,
                    reason: reason.clone(),
                }))
                .await?
                .into_inner();
            while let Some(u) = updates.next().await {
                let u = u?;
                match convert::from_approval_state(u.state) {
                    Some(wicket_core::ApprovalState::Pending) => eprintln!(
                        "waiting for approval {} (access rule {})",
                        u.approval_id, u.rule
                    ),
                    Some(wicket_core::ApprovalState::Approved) => {
                        output::record(
                            fmt,
                            vec![
                                ("approval", u.approval_id.clone()),
                                ("connection", connection.clone()),
                                ("until", time(u.until.as_ref())),
                            ],
                            json!({"approval": u.approval_id, "state": "approved",
                                "connection": connection, "until": time(u.until.as_ref())}),
                        );
                        return Ok(());
                    }
                    Some(s) => {
                        return Err(CliError::failed(format!(
                            "access {} {}{}",
                            u.approval_id,
                            s.as_str(),
                            if u.reason.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", u.reason)
                            }
                        )));
                    }
                    None => return Err(CliError::failed("unknown approval state")),
                }
            }
            Err(CliError::unavailable(
                "the control service stopped answering before a decision",
            ))
        }
        AccessCmd::List { connection } => {
            let grants = api
                .list_access_grants(c.req(v1::ListAccessGrantsRequest {
                    connection: connection.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner()
                .grants;
            let rows = grants
                .iter()
                .map(|g| {
                    vec![
                        g.id.clone(),
                        g.principal.clone(),
                        g.connection.clone(),
                        time(g.until.as_ref()),
                        cell(&g.reason, 40),
                    ]
                })
                .collect();
            let json = grants
                .iter()
                .map(|g| {
                    json!({"id": g.id, "approval": g.approval_id, "principal": g.principal,
                    "issuer": g.issuer, "subject": g.subject, "connection": g.connection,
                    "reason": g.reason, "granted_at": time(g.granted_at.as_ref()),
                    "until": time(g.until.as_ref())})
                })
                .collect();
            output::rows(
                fmt,
                &["id", "principal", "connection", "until", "reason"],
                rows,
                Value::Array(json),
            );
            Ok(())
        }
    }
}

async fn approvals(cli: &Cli, fmt: Format, cmd: &ApprovalsCmd) -> Result<(), CliError> {
    let c = Client::connect(cli).await?;
    let mut api = ApprovalAdminServiceClient::new(c.channel.clone());
    let show = |a: &v1::Approval| {
        let r = a.request.clone().unwrap_or_default();
        let d = r.decision.clone().unwrap_or_default();
        output::record(
            fmt,
            vec![
                ("id", a.id.clone()),
                ("state", state(a.state).into()),
                ("principal", principal_label(r.principal.as_ref())),
                ("connection", r.connection.clone()),
                (
                    "command",
                    r.command
                        .as_ref()
                        .map(|c| c.text.clone())
                        .unwrap_or_default(),
                ),
                ("rule", d.rule.clone()),
                (
                    "votes",
                    a.votes
                        .iter()
                        .map(|v| {
                            format!(
                                "{} {}",
                                v.approver,
                                if v.approve { "approved" } else { "denied" }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                ("reason", a.reason.clone()),
            ],
            approval_json(a),
        );
    };
    match cmd {
        ApprovalsCmd::List { state: wanted } => {
            let st = match wanted.as_str() {
                "all" => v1::ApprovalState::Unspecified,
                "pending" => v1::ApprovalState::Pending,
                "approved" => v1::ApprovalState::Approved,
                "denied" => v1::ApprovalState::Denied,
                "expired" => v1::ApprovalState::Expired,
                other => {
                    return Err(CliError::usage(format!(
                        "unknown state `{other}` (pending, approved, denied, expired, all)"
                    )));
                }
            };
            let list = api
                .list_approvals(c.req(v1::ListApprovalsRequest {
                    state: st as i32,
                    limit: 200,
                }))
                .await?
                .into_inner()
                .approvals;
            let rows = list
                .iter()
                .map(|a| {
                    let r = a.request.clone().unwrap_or_default();
                    let d = r.decision.clone().unwrap_or_default();
                    let risk = r
                        .command
                        .as_ref()
                        .and_then(|c| c.classification.as_ref())
                        .map(|k| k.risk)
                        .unwrap_or(0);
                    vec![
                        a.id.clone(),
                        state(a.state).into(),
                        principal_label(r.principal.as_ref()),
                        r.connection.clone(),
                        d.rule.clone(),
                        risk.to_string(),
                        cell(
                            &r.command
                                .as_ref()
                                .map(|c| c.text.clone())
                                .unwrap_or_default(),
                            48,
                        ),
                        cell(
                            &r.reasoning
                                .as_ref()
                                .map(|t| t.reasoning.clone())
                                .unwrap_or_default(),
                            40,
                        ),
                    ]
                })
                .collect();
            output::rows(
                fmt,
                &[
                    "id",
                    "state",
                    "principal",
                    "connection",
                    "rule",
                    "risk",
                    "command",
                    "reasoning",
                ],
                rows,
                Value::Array(list.iter().map(approval_json).collect()),
            );
        }
        ApprovalsCmd::Approve { id, comment, reuse } => {
            let a = api
                .approve(c.req(v1::DecideRequest {
                    id: id.clone(),
                    comment: comment.clone(),
                    reuse_seconds: *reuse,
                }))
                .await?
                .into_inner();
            show(&a);
        }
        ApprovalsCmd::Deny { id, reason } => {
            let a = api
                .deny(c.req(v1::DecideRequest {
                    id: id.clone(),
                    comment: reason.clone(),
                    reuse_seconds: 0,
                }))
                .await?
                .into_inner();
            show(&a);
        }
    }
    Ok(())
}

async fn sessions(cli: &Cli, fmt: Format, cmd: &SessionsCmd) -> Result<(), CliError> {
    match cmd {
        SessionsCmd::Replay(a) => return crate::replay::replay(cli, fmt, a).await,
        SessionsCmd::Search(a) => return crate::replay::search(cli, fmt, a).await,
        _ => {}
    }
    let c = Client::connect(cli).await?;
    let mut api = SessionAdminServiceClient::new(c.channel.clone());
    match cmd {
        SessionsCmd::List {
            connection,
            principal,
            active,
            limit,
        } => {
            let list = api
                .list_sessions(c.req(v1::ListSessionsRequest {
                    connection: connection.clone().unwrap_or_default(),
                    principal: principal.clone().unwrap_or_default(),
                    active_only: *active,
                    limit: *limit,
                }))
                .await?
                .into_inner()
                .sessions;
            let rows = list
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.connection.clone(),
                        principal_label(s.principal.as_ref()),
                        s.state.clone(),
                        time(s.started_at.as_ref()),
                        s.command_count.to_string(),
                        s.client_app.clone(),
                    ]
                })
                .collect();
            output::rows(
                fmt,
                &[
                    "id",
                    "connection",
                    "principal",
                    "state",
                    "started",
                    "commands",
                    "client",
                ],
                rows,
                Value::Array(list.iter().map(session_json).collect()),
            );
        }
        // Answered above.
        SessionsCmd::Replay(_) | SessionsCmd::Search(_) => {}
        SessionsCmd::Hold { id, reason } => {
            if reason.trim().is_empty() {
                return Err(CliError::usage("--reason must say why the session is held"));
            }
            let s = api
                .hold_session(c.req(v1::HoldSessionRequest {
                    id: id.clone(),
                    reason: reason.clone(),
                }))
                .await?
                .into_inner();
            eprintln!("Session {} held: {}", s.id, s.hold);
        }
        SessionsCmd::Release { id } => {
            let s = api
                .hold_session(c.req(v1::HoldSessionRequest {
                    id: id.clone(),
                    reason: String::new(),
                }))
                .await?
                .into_inner();
            eprintln!("Session {} released; retention applies to it again.", s.id);
        }
        SessionsCmd::Recording { id, channel, out } => {
            let events = session_events(&c, &mut api, id).await?;
            let cast =
                crate::replay::cast_of(id, &events, channel.as_deref())?.ok_or_else(|| {
                    CliError::usage(format!("session {id} has no terminal recording"))
                })?;
            let text = format!("{}\n{}", cast.header, cast.lines);
            match out {
                Some(path) => std::fs::write(path, text).map_err(|e| {
                    CliError::usage(format!("cannot write {}: {e}", path.display()))
                })?,
                None => print!("{text}"),
            }
        }
        SessionsCmd::Show { id } => {
            let s = api
                .get_session(c.req(v1::GetSessionRequest { id: id.clone() }))
                .await?
                .into_inner();
            let events = session_events(&c, &mut api, id).await?;
            let kind = kind_name;
            match fmt {
                Format::Json | Format::Jsonl => {
                    let evs: Vec<Value> = events
                        .iter()
                        .map(|e| json!({
                            "id": e.id, "session_id": e.session_id, "seq": e.seq, "time": time(e.time.as_ref()), "kind": kind(e.kind),
                            "command": command_json(e.command.as_ref()), "decision": decision_json(e.decision.as_ref()),
                            "reasoning": reasoning_json(e.reasoning.as_ref()), "traceparent": e.traceparent,
                            "masked": e.masked, "details": e.details, "end_reason": e.end_reason,
                        }))
                        .collect();
                    if fmt == Format::Jsonl {
                        // The session's recording: one event per line, in order.
                        output::json(fmt, &Value::Array(evs));
                    } else {
                        let mut j = session_json(&s);
                        j["events"] = Value::Array(evs);
                        output::json(fmt, &j);
                    }
                }
                Format::Table => {
                    output::record(
                        fmt,
                        vec![
                            ("session", s.id.clone()),
                            ("connection", s.connection.clone()),
                            ("principal", principal_label(s.principal.as_ref())),
                            ("state", s.state.clone()),
                            ("started", time(s.started_at.as_ref())),
                            ("ended", time(s.ended_at.as_ref())),
                            ("end reason", s.end_reason.clone()),
                            ("legal hold", s.hold.clone()),
                            (
                                "client",
                                format!("{} {}", s.client_app, s.client_addr)
                                    .trim()
                                    .to_string(),
                            ),
                        ],
                        Value::Null,
                    );
                    println!();
                    // Each command's result (rows, duration, error) on its own row.
                    // (A result reported together with its command is inside it.)
                    let results: std::collections::HashMap<&str, String> = events
                        .iter()
                        .filter_map(|e| {
                            if e.kind == v1::AuditKind::CommandResult as i32 {
                                Some((
                                    e.details.get("command_id")?.as_str(),
                                    result_cell(&e.details),
                                ))
                            } else if e.details.contains_key("status") {
                                Some((e.id.as_str(), result_cell(&e.details)))
                            } else {
                                None
                            }
                        })
                        .collect();
                    let rows = events
                        .iter()
                        .filter(|e| e.kind != v1::AuditKind::CommandResult as i32)
                        .map(|e| {
                            let d = e.decision.clone().unwrap_or_default();
                            vec![
                                e.seq.to_string(),
                                time(e.time.as_ref()),
                                kind(e.kind),
                                if e.decision.is_some() {
                                    format!("{} ({})", effect(d.effect), d.rule)
                                } else {
                                    String::new()
                                },
                                cell(
                                    &e.command
                                        .as_ref()
                                        .map(|c| c.text.clone())
                                        .unwrap_or_default(),
                                    50,
                                ),
                                results.get(e.id.as_str()).cloned().unwrap_or_default(),
                                cell(&reasoning_text(e.reasoning.as_ref()), 50),
                            ]
                        })
                        .collect();
                    output::rows(
                        fmt,
                        &[
                            "seq",
                            "time",
                            "event",
                            "decision",
                            "command",
                            "result",
                            "reasoning",
                        ],
                        rows,
                        Value::Null,
                    );
                }
            }
        }
    }
    Ok(())
}

/// `ok, 3 rows, 1.2 ms` / `error 22012: division by zero` for a table cell.
pub(crate) fn result_cell(d: &std::collections::HashMap<String, String>) -> String {
    let ms = d
        .get("duration_us")
        .and_then(|u| u.parse::<f64>().ok())
        .map(|u| format!("{:.1} ms", u / 1000.0))
        .unwrap_or_default();
    match d.get("status").map(String::as_str) {
        Some("error") => cell(
            &format!(
                "error {}: {}",
                d.get("sqlstate").map(String::as_str).unwrap_or(""),
                d.get("error").map(String::as_str).unwrap_or("")
            ),
            40,
        ),
        Some(status) => {
            let mut parts = vec![status.to_string()];
            if let Some(r) = d.get("rows") {
                parts.push(format!("{r} rows"));
            }
            if !ms.is_empty() {
                parts.push(ms);
            }
            parts.join(", ")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod askpass_tests {
    #[test]
    fn long_tokens_are_given_in_parts_and_other_prompts_unanswered() {
        let token: String = (0..2500)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let p1 = super::askpass_part(&token, "Password (Wicket access token): ").unwrap();
        let p2 = super::askpass_part(&token, "Password (Wicket access token, part 2): ").unwrap();
        let p3 = super::askpass_part(&token, "Password (Wicket access token, part 3): ").unwrap();
        assert_eq!((p1.len(), p2.len(), p3.len()), (1023, 1023, 454));
        assert_eq!(format!("{p1}{p2}{p3}"), token);
        assert_eq!(
            super::askpass_part(&token, "bot@gate's password: ").unwrap(),
            p1
        );
        assert!(
            super::askpass_part(
                &token,
                "Are you sure you want to continue connecting (yes/no)? "
            )
            .is_none()
        );
    }
}
