//! `ssh_exec`: a command through the SSH gate, with the agent's token as
//! the password and the reasoning as `WICKET_REASONING` (as `ssh -o
//! SendEnv=WICKET_REASONING` gives it). The gate's host key is pinned.

use std::path::PathBuf;
use std::sync::Arc;

use russh::ChannelMsg;
use serde_json::{Value, json};

/// Output kept per stream at most (the rest is counted).
const MAX_OUTPUT: usize = 1 << 20;

/// Where an SSH gate is.
#[derive(Debug, Clone)]
pub struct Target {
    host: String,
    port: u16,
    user: String,
    known_hosts: PathBuf,
}

impl Target {
    /// Parses `ssh://USER@HOST[:PORT]?known_hosts=FILE` (the gate's key
    /// must be in FILE: the token is the password).
    pub fn parse(url: &str) -> Result<Target, String> {
        let u = url::Url::parse(url).map_err(|e| format!("bad gate URL {url}: {e}"))?;
        let known_hosts = u
            .query_pairs()
            .find(|(k, _)| k == "known_hosts")
            .map(|(_, v)| PathBuf::from(v.into_owned()))
            .ok_or_else(|| format!("{url}: give the gate's pinned host key: ?known_hosts=FILE"))?;
        if u.username().is_empty() {
            return Err(format!(
                "{url}: name the user to log in as (ssh://USER@HOST)"
            ));
        }
        Ok(Target {
            host: u
                .host_str()
                .ok_or_else(|| format!("{url} has no host"))?
                .trim_matches(|c| c == '[' || c == ']')
                .to_string(),
            port: u.port().unwrap_or(22),
            user: u.username().to_string(),
            known_hosts,
        })
    }
}

struct Pinned {
    host: String,
    port: u16,
    known_hosts: PathBuf,
}

impl russh::client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        Ok(matches!(
            russh::keys::check_known_hosts_path(&self.host, self.port, key, &self.known_hosts),
            Ok(true)
        ))
    }
}

/// Runs `command`; `notice` hears the gate's notes on stderr (an approval
/// wait) as they come. The result holds `exit_code`, `stdout`, `stderr`.
pub async fn run(
    t: &Target,
    token: &str,
    command: &str,
    reasoning: &str,
    traceparent: Option<&str>,
    notice: impl Fn(String),
) -> Result<Value, String> {
    let config = Arc::new(russh::client::Config {
        inactivity_timeout: None,
        ..Default::default()
    });
    let handler = Pinned {
        host: t.host.clone(),
        port: t.port,
        known_hosts: t.known_hosts.clone(),
    };
    let mut session = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        russh::client::connect(config, (t.host.as_str(), t.port), handler),
    )
    .await
    .map_err(|_| format!("connecting to the gate at {}:{} timed out", t.host, t.port))?
    .map_err(|e| match e {
        russh::Error::UnknownKey => format!(
            "the gate's host key is not the one pinned in {}",
            t.known_hosts.display()
        ),
        e => format!("cannot reach the gate at {}:{}: {e}", t.host, t.port),
    })?;
    let auth = session
        .authenticate_password(&t.user, token)
        .await
        .map_err(|e| format!("login failed: {e}"))?;
    if !auth.success() {
        return Err("the gate refused the token (expired, revoked, or no grant)".into());
    }
    let mut channel = session
        .channel_open_session()
        .await
        .map_err(|e| format!("cannot open a session: {e}"))?;
    channel
        .set_env(
            false,
            "WICKET_REASONING",
            reasoning.replace(['\r', '\n'], " "),
        )
        .await
        .map_err(|e| e.to_string())?;
    if let Some(tp) = traceparent {
        channel
            .set_env(false, "TRACEPARENT", tp)
            .await
            .map_err(|e| e.to_string())?;
    }
    channel
        .exec(true, command)
        .await
        .map_err(|e| format!("exec failed: {e}"))?;
    let (mut stdout, mut stderr, mut dropped) = (Vec::new(), Vec::new(), 0usize);
    let mut exit_code: Option<i64> = None;
    let mut signal = None;
    let keep = |sink: &mut Vec<u8>, data: &[u8], dropped: &mut usize| {
        let room = MAX_OUTPUT.saturating_sub(sink.len());
        sink.extend_from_slice(&data[..data.len().min(room)]);
        *dropped += data.len().saturating_sub(room);
    };
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } => keep(&mut stdout, &data, &mut dropped),
            ChannelMsg::ExtendedData { data, .. } => {
                let text = String::from_utf8_lossy(&data);
                if text.contains("waiting for approval") {
                    notice(text.trim().to_string());
                }
                keep(&mut stderr, &data, &mut dropped);
            }
            ChannelMsg::ExitStatus { exit_status } => exit_code = Some(i64::from(exit_status)),
            ChannelMsg::ExitSignal { signal_name, .. } => signal = Some(format!("{signal_name:?}")),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    let mut out = json!({
        "exit_code": exit_code.unwrap_or(-1),
        "stdout": String::from_utf8_lossy(&stdout),
        "stderr": String::from_utf8_lossy(&stderr),
    });
    if let Some(s) = signal {
        out["signal"] = json!(s);
    }
    if dropped > 0 {
        out["bytes_not_shown"] = json!(dropped);
    }
    Ok(out)
}
