//! `wicket`: the command-line client of the Wicket control service.

mod audit;
mod commands;
mod kube;
mod login;
mod mcp;
mod output;
mod replay;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use output::Format;

/// An error for the user, with an exit code by kind.
#[derive(Debug)]
pub struct CliError {
    code: u8,
    message: String,
}

impl CliError {
    /// Bad usage or local problem (exit 2).
    pub fn usage(m: impl Into<String>) -> Self {
        CliError {
            code: 2,
            message: m.into(),
        }
    }
    /// Authentication or permission (exit 3).
    pub fn auth(m: impl Into<String>) -> Self {
        CliError {
            code: 3,
            message: m.into(),
        }
    }
    /// Something unreachable (exit 4).
    pub fn unavailable(m: impl Into<String>) -> Self {
        CliError {
            code: 4,
            message: m.into(),
        }
    }
    /// A record failed verification (exit 5).
    pub fn tampered(m: impl Into<String>) -> Self {
        CliError {
            code: 5,
            message: m.into(),
        }
    }
    /// Refused by the server, not found, invalid (exit 1).
    pub fn failed(m: impl Into<String>) -> Self {
        CliError {
            code: 1,
            message: m.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let msg = s.message().to_string();
        match s.code() {
            Code::Unauthenticated => CliError::auth(format!(
                "not authenticated: {msg}\nhint: run `wicket login`, or set WICKET_TOKEN"
            )),
            Code::PermissionDenied => CliError::auth(format!("permission denied: {msg}")),
            Code::Unavailable => {
                CliError::unavailable(format!("control service unavailable: {msg}"))
            }
            Code::NotFound => CliError::failed(format!("not found: {msg}")),
            Code::InvalidArgument | Code::FailedPrecondition => CliError::failed(msg),
            other => CliError::failed(format!("{other:?}: {msg}")),
        }
    }
}

/// Wicket: privileged access for humans and AI agents, gated, approved and recorded.
#[derive(Debug, Parser)]
#[command(name = "wicket", version, propagate_version = true)]
pub struct Cli {
    /// Control service URL (http:// or https://).
    #[arg(
        long,
        global = true,
        env = "WICKET_CONTROL",
        default_value = "http://127.0.0.1:7470"
    )]
    pub control: String,

    /// Access token (default: the one cached by `wicket login`).
    #[arg(long, global = true, env = "WICKET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// CA certificate (PEM) to verify an https:// control service.
    #[arg(long, global = true, env = "WICKET_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    pub output: Format,

    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Sign in: device flow for people, --client-credentials for agents.
    Login(commands::LoginArgs),
    /// Forget the cached token.
    Logout {
        /// Issuer (default: the last one signed in to).
        #[arg(long, env = "WICKET_OIDC_ISSUER")]
        issuer: Option<String>,
    },
    /// Policy documents.
    #[command(subcommand)]
    Policy(commands::PolicyCmd),
    /// Protected connections.
    #[command(subcommand)]
    Connections(commands::ConnectionsCmd),
    /// Held commands waiting for approval.
    #[command(subcommand)]
    Approvals(commands::ApprovalsCmd),
    /// Just-in-time access: ask for a time-bound grant on a connection.
    #[command(subcommand)]
    Access(commands::AccessCmd),
    /// Recorded sessions.
    #[command(subcommand)]
    Sessions(commands::SessionsCmd),
    /// Tamper evidence: verify recorded sessions against the signed audit
    /// trail.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Sidecar credentials.
    #[command(subcommand)]
    Sidecars(commands::SidecarsCmd),
    /// SSH through the SSH gate.
    #[command(subcommand)]
    Ssh(commands::SshCmd),
    /// kubectl through the Kubernetes gate.
    #[command(subcommand)]
    Kube(kube::KubeCmd),
    /// kubectl exec credential plugin: prints an ExecCredential holding your
    /// token (with WICKET_REASONING and TRACEPARENT from the environment
    /// attached for the gate). `wicket kube config` sets kubectl up to run it.
    KubeCredential(kube::CredentialArgs),
    /// An MCP server for AI agents: tools that act on connections through
    /// their gates, with your token, reasoning required.
    Mcp(mcp::McpArgs),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match commands::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wicket: error: {e}");
            ExitCode::from(e.code)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
