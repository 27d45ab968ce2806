//! Approval notifications: a signed generic webhook and a Slack-compatible
//! incoming-webhook message, sent when an approval is requested and when it
//! is approved, denied or expires.
//!
//! Delivery never blocks the decision path: each destination has its own
//! bounded queue and worker, a change is queued with `try_send` (dropped
//! with a warning when the queue is full), and the worker retries failures
//! with exponential backoff. Deliveries are at least once: a retry carries
//! the same `Wicket-Event-Id`, for receivers to drop duplicates.
//!
//! The generic webhook's body is JSON (`id`, `type`, `created_at`,
//! `approval`, `console_url`), signed with HMAC-SHA256 over
//! `"{timestamp}.{body}"` in `Wicket-Signature: t={timestamp},v1={hex}`;
//! a receiver recomputes it with the shared secret, compares in constant
//! time and refuses stale timestamps.

use std::time::Duration;

use aws_lc_rs::hmac;
use chrono::Utc;
use serde_json::json;
use tokio::sync::mpsc;
use wicket_core::{Approval, ApprovalState};

/// Changes waiting per destination before new ones are dropped.
const QUEUE: usize = 1024;
/// Attempts per delivery (the first and the retries).
const ATTEMPTS: u32 = 6;
/// The first retry's wait; each further one doubles, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// One attempt's time limit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where approval notifications go.
#[derive(Clone, Default)]
pub struct NotifyConfig {
    /// The generic webhook's URL.
    pub webhook_url: Option<String>,
    /// The generic webhook's HMAC key.
    pub webhook_secret: Option<Vec<u8>>,
    /// A Slack (or compatible) incoming-webhook URL. It is a secret: only its
    /// host is ever logged.
    pub slack_url: Option<String>,
    /// The console's base URL, for links (`{console}/approvals/{id}`).
    pub console_url: Option<String>,
}

impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("webhook_url", &self.webhook_url)
            .field("webhook_secret", &self.webhook_secret.as_ref().map(|_| "…"))
            .field("slack_url", &self.slack_url.as_deref().map(host))
            .field("console_url", &self.console_url)
            .finish()
    }
}

/// The kinds of destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Webhook,
    Slack,
}

/// Queues approval changes for their destinations.
#[derive(Clone, Default)]
pub struct Notifier {
    queues: Vec<(Kind, String, mpsc::Sender<Event>)>,
}

/// One notification, the same across retries.
#[derive(Clone, Debug)]
struct Event {
    id: String,
    kind: &'static str,
    approval: Approval,
}

impl Notifier {
    /// Starts a worker per configured destination. A generic webhook
    /// without a secret is refused: receivers could not tell ours from
    /// anyone's.
    pub fn start(cfg: NotifyConfig) -> Result<Notifier, String> {
        if cfg.webhook_url.is_none() && cfg.slack_url.is_none() {
            return Ok(Notifier::default());
        }
        let http = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("notification http client: {e}"))?;
        let mut queues = Vec::new();
        if let Some(url) = &cfg.webhook_url {
            let secret =
                cfg.webhook_secret.clone().filter(|s| !s.is_empty()).ok_or(
                    "--webhook-url needs --webhook-secret-file (the HMAC key it signs with)",
                )?;
            check_url(url, "--webhook-url")?;
            let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
            queues.push(spawn(
                Kind::Webhook,
                url.clone(),
                http.clone(),
                Some(key),
                cfg.console_url.clone(),
            ));
        }
        if let Some(url) = &cfg.slack_url {
            check_url(url, "--slack-webhook-url")?;
            queues.push(spawn(
                Kind::Slack,
                url.clone(),
                http.clone(),
                None,
                cfg.console_url.clone(),
            ));
        }
        for (kind, url, _) in &queues {
            tracing::info!(?kind, host = host(url), "approval notifications on");
        }
        Ok(Notifier { queues })
    }

    /// Queues the change of `a`, if it is one approvers hear about: a new
    /// request, or its decision or expiry (a vote short of quorum is not).
    pub fn approval(&self, a: &Approval) {
        let kind = match a.state {
            ApprovalState::Pending if a.votes.is_empty() => "approval.requested",
            ApprovalState::Approved => "approval.approved",
            ApprovalState::Denied => "approval.denied",
            ApprovalState::Expired => "approval.expired",
            ApprovalState::Pending => return,
        };
        let event = Event {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            approval: a.clone(),
        };
        for (k, url, tx) in &self.queues {
            if tx.try_send(event.clone()).is_err() {
                tracing::warn!(kind = ?k, host = host(url), approval = %a.id, event = kind,
                    "notification queue full or closed; this notification is dropped");
            }
        }
    }
}

/// Refuses what is not an http(s) URL, naming the flag (never the URL).
fn check_url(url: &str, flag: &str) -> Result<(), String> {
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(format!("{flag} must be an http:// or https:// URL")),
    }
}

/// The host of `url`, for logs (a Slack URL's path is its secret).
fn host(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn spawn(
    kind: Kind,
    url: String,
    http: reqwest::Client,
    key: Option<hmac::Key>,
    console: Option<String>,
) -> (Kind, String, mpsc::Sender<Event>) {
    let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
    let target = url.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let link = console
                .as_deref()
                .map(|c| approval_link(c, &ev.approval.id));
            let body = match kind {
                Kind::Webhook => webhook_body(&ev, link.as_deref()),
                Kind::Slack => slack_body(&ev, link.as_deref()),
            };
            deliver(&http, &target, kind, key.as_ref(), &ev, &body).await;
        }
    });
    (kind, url, tx)
}

/// Sends one notification, retrying with backoff; logs the outcome.
async fn deliver(
    http: &reqwest::Client,
    url: &str,
    kind: Kind,
    key: Option<&hmac::Key>,
    ev: &Event,
    body: &str,
) {
    let mut wait = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let mut req = http
            .post(url)
            .header("content-type", "application/json")
            .header("user-agent", concat!("wicket/", env!("CARGO_PKG_VERSION")))
            .header("wicket-event-id", &ev.id)
            .header("wicket-event-type", ev.kind);
        if let Some(key) = key {
            req = req.header(
                "wicket-signature",
                signature(key, Utc::now().timestamp(), body),
            );
        }
        let outcome = req.body(body.to_string()).send().await;
        let retry = match &outcome {
            Ok(r) if r.status().is_success() => {
                tracing::debug!(?kind, event = %ev.id, attempt, "notification delivered");
                return;
            }
            // Retrying cannot help a request the receiver refuses, except
            // when it asks for time.
            Ok(r) if r.status().is_client_error() && !matches!(r.status().as_u16(), 408 | 429) => {
                false
            }
            _ => true,
        };
        let why = match outcome {
            Ok(r) => format!("HTTP {}", r.status().as_u16()),
            // Without the URL: a Slack URL is a secret.
            Err(e) => e.without_url().to_string(),
        };
        if !retry || attempt == ATTEMPTS {
            tracing::warn!(?kind, host = host(url), event = %ev.id, approval = %ev.approval.id,
                attempt, error = %why, "notification not delivered; giving up");
            return;
        }
        tracing::info!(?kind, host = host(url), event = %ev.id, attempt, error = %why,
            retry_in_ms = wait.as_millis() as u64, "notification failed; retrying");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_BACKOFF);
    }
}

/// `t={timestamp},v1={hex HMAC-SHA256 of "{timestamp}.{body}"}`.
pub fn signature(key: &hmac::Key, timestamp: i64, body: &str) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body.as_bytes());
    format!("t={timestamp},v1={}", hex::encode(ctx.sign().as_ref()))
}

/// Where the console shows approval `id`.
fn approval_link(console: &str, id: &str) -> String {
    format!("{}/approvals/{id}", console.trim_end_matches('/'))
}

fn webhook_body(ev: &Event, link: Option<&str>) -> String {
    json!({
        "id": ev.id,
        "type": ev.kind,
        "created_at": Utc::now().to_rfc3339(),
        "approval": ev.approval,
        "console_url": link,
    })
    .to_string()
}

/// A Slack incoming-webhook message: a summary line (also the fallback
/// `text`), the command, the reasoning, and a link to decide in the console.
fn slack_body(ev: &Event, link: Option<&str>) -> String {
    let a = &ev.approval;
    let r = &a.request;
    let who = r.principal.label();
    let headline = match a.state {
        ApprovalState::Pending => format!(
            "{who} wants to run a {} on {} (held by rule {}, risk {})",
            if r.command.classification.kind.is_empty() {
                "command"
            } else {
                &r.command.classification.kind
            },
            r.connection,
            r.decision.rule,
            r.command.classification.risk
        ),
        ApprovalState::Approved => format!(
            "Approved: {who}'s command on {} (by {})",
            r.connection,
            deciders(a)
        ),
        ApprovalState::Denied => format!(
            "Denied: {who}'s command on {} (by {}{})",
            r.connection,
            deciders(a),
            if a.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", a.reason)
            }
        ),
        ApprovalState::Expired => format!(
            "Expired: nobody decided {who}'s command on {} in time",
            r.connection
        ),
    };
    let mut blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": slack_escape(&headline)}}),
        json!({"type": "section", "text": {"type": "mrkdwn",
            "text": format!("```{}```", slack_escape(&clip(&r.command.text, 2500)))}}),
    ];
    if let Some(t) = &r.reasoning
        && !t.reasoning.is_empty()
    {
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn",
            "text": format!("Reasoning: {}", slack_escape(&clip(&t.reasoning, 1500)))}]}));
    }
    if let Some(link) = link {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn",
        "text": format!("<{link}|{}>", if a.state == ApprovalState::Pending {
            "Review in the Wicket console"
        } else {
            "Open in the Wicket console"
        })}}));
    }
    let text = match link {
        Some(link) => format!("{headline} {link}"),
        None => headline,
    };
    json!({"text": text, "blocks": blocks}).to_string()
}

/// Who voted on a decided approval.
fn deciders(a: &Approval) -> String {
    let names: Vec<&str> = a.votes.iter().map(|v| v.approver.as_str()).collect();
    if names.is_empty() {
        "nobody".into()
    } else {
        names.join(", ")
    }
}

/// Slack's three control characters, escaped as its docs ask.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// At most `max` characters of `s`, marked when cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2's key and data, split as "{t}.{body}".
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let sig = signature(&key, 1700000000, "what do ya want for nothing?");
        let mut want = hmac::Context::with_key(&key);
        want.update(b"1700000000.what do ya want for nothing?");
        assert_eq!(
            sig,
            format!("t=1700000000,v1={}", hex::encode(want.sign().as_ref()))
        );
        assert!(
            hmac::verify(
                &key,
                b"1700000000.what do ya want for nothing?",
                &hex::decode(sig.split("v1=").nth(1).unwrap()).unwrap()
            )
            .is_ok()
        );
    }

    #[test]
    fn secrets_stay_out_of_logs_and_urls_are_checked() {
        let cfg = NotifyConfig {
            webhook_url: Some("https://hooks.example/in".into()),
            webhook_secret: Some(b"s3cret".to_vec()),
            slack_url: Some("https://hooks.slack.com/services/T0/B0/XYZSECRET".into()),
            console_url: None,
        };
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("XYZSECRET"),
            "{shown}"
        );
        assert!(check_url("ftp://x/y", "--webhook-url").is_err());
        assert!(check_url("not a url", "--webhook-url").is_err());
        assert!(check_url("http://127.0.0.1:9/hook", "--webhook-url").is_ok());
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(slack_escape("<a & b>"), "&lt;a &amp; b&gt;");
    }
}
