//! `wicket-ssh`: an SSH gate in front of one OpenSSH server.
//!
//! Clients (OpenSSH's `ssh`, `scp`, `sftp`, `rsync -e ssh`, any SSH library)
//! connect to the gate as to any SSH server. The gate:
//!
//! - authenticates the caller with an OIDC access token given as the
//!   password or as the answer to a keyboard-interactive prompt, or with a
//!   short-lived OpenSSH user certificate signed by the control service's
//!   CA (`wicket ssh login`);
//! - logs in upstream with a key (or password) only it holds, to a host
//!   whose key is pinned in a known_hosts file;
//! - relays session channels (pty, shell, exec, env, window changes,
//!   signals, exit status and signal), the `sftp` subsystem and `ssh -L`
//!   forwarding, deciding each exec command, each typed shell line, each
//!   file operation and each forward by policy (allow, deny, hold for
//!   approval);
//! - records terminals in asciicast v2, masked, and audits everything with
//!   the caller's identity and reasoning (`WICKET_REASONING`, `TRACEPARENT`
//!   env requests);
//! - ends sessions whose token or certificate expired or whose principal
//!   was revoked.
//!
//! Modules:
//! - `classify`: shell-wise parsing and risk classification of commands;
//! - `line`: command lines reconstructed from terminal input;
//! - `record`: asciicast v2 recording with masking;
//! - `sftp`: the SFTP protocol, followed and gated;
//! - `gate`: the SSH server, the upstream client and the channel relay;
//! - `cert`: user certificates.

pub mod cert;
pub mod classify;
pub mod gate;
pub mod line;
pub mod sftp;

pub use gate::{SshConfig, SshGate, UpstreamAuth, UpstreamConfig, serve};
