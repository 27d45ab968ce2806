//! `kubernetes_exec`: `kubectl exec` through the Kubernetes gate, over
//! WebSocket (`v5.channel.k8s.io`), with the agent's token and reasoning.

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::Web;

/// Output kept per stream at most (the rest is counted).
const MAX_OUTPUT: usize = 1 << 20;

fn percent(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Runs the command; the result holds `exit_code`, `stdout`, `stderr`.
pub async fn run(
    web: &Web,
    token: &str,
    args: &Value,
    reasoning: &str,
    app: &str,
    traceparent: Option<&str>,
) -> Result<Value, String> {
    let ns = args["namespace"].as_str().unwrap_or_default();
    let pod = args["pod"].as_str().unwrap_or_default();
    let command: Vec<&str> = args["command"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if ns.is_empty() || pod.is_empty() || command.is_empty() {
        return Err("namespace, pod and command are required".into());
    }
    let mut query = String::from("stdout=true&stderr=true");
    for c in &command {
        query.push_str("&command=");
        query.push_str(&percent(c));
    }
    if let Some(c) = args["container"].as_str().filter(|c| !c.is_empty()) {
        query.push_str("&container=");
        query.push_str(&percent(c));
    }
    let base = url::Url::parse(&web.base).map_err(|e| e.to_string())?;
    let host = base
        .host_str()
        .ok_or("the gate URL has no host")?
        .to_string();
    let port = base.port_or_known_default().unwrap_or(443);
    let url = format!(
        "wss://{host}:{port}/api/v1/namespaces/{}/pods/{}/exec?{query}",
        percent(ns),
        percent(pod)
    );
    let mut req = url
        .into_client_request()
        .map_err(|e| format!("bad exec request: {e}"))?;
    let h = req.headers_mut();
    let header = |v: &str| {
        v.parse::<tokio_tungstenite::tungstenite::http::HeaderValue>()
            .map_err(|_| "a header value is not valid".to_string())
    };
    h.insert("authorization", header(&format!("Bearer {token}"))?);
    h.insert("sec-websocket-protocol", header("v5.channel.k8s.io")?);
    h.insert(
        "wicket-reasoning",
        header(&reasoning.replace(['\r', '\n'], " "))?,
    );
    h.insert("user-agent", header(app)?);
    if let Some(tp) = traceparent {
        h.insert("traceparent", header(tp)?);
    }
    // TLS to the gate, verified against its CA.
    let cfg = web
        .tls
        .clone()
        .ok_or("give the Kubernetes gate's CA: k8s+https://HOST:PORT?ca=FILE")?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot reach the gate at {host}:{port}: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("bad host {host}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS to the gate failed: {e}"))?;
    let (mut ws, resp) = match tokio_tungstenite::client_async(req, tls).await {
        Ok(x) => x,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            // A refusal: the gate's Status, naming the rule.
            let status = r.status().as_u16();
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
            return Ok(json!({"exit_code": -1, "status": status, "error": body,
                             "stdout": "", "stderr": ""}));
        }
        Err(e) => return Err(format!("exec through the gate failed: {e}")),
    };
    let _ = resp;
    let (mut stdout, mut stderr, mut dropped) = (Vec::new(), Vec::new(), 0usize);
    let mut status = Value::Null;
    while let Some(msg) = ws.next().await {
        let data = match msg {
            Ok(Message::Binary(b)) => b,
            Ok(Message::Close(_)) => break,
            Ok(_) => continue,
            Err(e) => return Err(format!("the exec stream broke: {e}")),
        };
        let Some((&channel, payload)) = data.split_first() else {
            continue;
        };
        let sink = match channel {
            1 => &mut stdout,
            2 => &mut stderr,
            3 => {
                status = serde_json::from_slice(payload).unwrap_or(Value::Null);
                continue;
            }
            _ => continue,
        };
        let room = MAX_OUTPUT.saturating_sub(sink.len());
        sink.extend_from_slice(&payload[..payload.len().min(room)]);
        dropped += payload.len().saturating_sub(room);
    }
    // v5's status: Success, or NonZeroExitCode with the code as a cause.
    let exit_code = match status["status"].as_str() {
        Some("Success") => 0,
        _ => status["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == "ExitCode")
            .and_then(|c| c["message"].as_str())
            .and_then(|m| m.parse::<i64>().ok())
            .unwrap_or(-1),
    };
    let mut out = json!({
        "exit_code": exit_code,
        "stdout": String::from_utf8_lossy(&stdout),
        "stderr": String::from_utf8_lossy(&stderr),
    });
    if exit_code != 0 && !status.is_null() {
        out["status"] = status;
    }
    if dropped > 0 {
        out["bytes_not_shown"] = json!(dropped);
    }
    Ok(out)
}
