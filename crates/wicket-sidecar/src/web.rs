//! What the HTTP-speaking gates (Kubernetes, HTTP) share: sessions keyed by
//! the caller's bearer token, the body type, a response body that reports
//! how it ended, and the reading of credentials and reasoning from headers.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, SizeHint};
use hyper::header::HeaderMap;
use wicket_core::Decision;
use wicket_core::carried::CarriedReasoning;

use crate::{CallerTrace, EndReason, LiveSession, Sidecar};

/// Errors inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response a gate builds.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Headers about one hop (RFC 9110 7.6.1, and HTTP/2's upgrade header),
/// never forwarded either way; a `Connection` header may name more.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// A body of fixed bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An RFC 9457 problem (`application/problem+json`): `urn:wicket:problem:KIND`
/// with the detail; a 401 also says `WWW-Authenticate: Bearer`.
pub fn problem(status: hyper::StatusCode, kind: &str, detail: &str) -> hyper::Response<Body> {
    problem_with(status, kind, detail, None)
}

/// [`problem`], naming the rule that decided it when there is one.
pub fn problem_with(
    status: hyper::StatusCode,
    kind: &str,
    detail: &str,
    rule: Option<&str>,
) -> hyper::Response<Body> {
    let mut body = serde_json::json!({
        "type": format!("urn:wicket:problem:{kind}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    if let Some(r) = rule {
        body["rule"] = serde_json::json!(r);
    }
    let mut resp = hyper::Response::builder()
        .status(status)
        .header("content-type", "application/problem+json")
        .header("cache-control", "no-store")
        .body(full(body.to_string()))
        .expect("static response");
    if status == hyper::StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            "www-authenticate",
            hyper::header::HeaderValue::from_static("Bearer realm=\"wicket\""),
        );
    }
    resp
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// The bearer token of an `Authorization` header, if any.
pub fn bearer(h: &HeaderMap) -> Option<String> {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest)
        })
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
}

/// The client program named by `User-Agent` (capped).
pub fn user_agent(h: &HeaderMap) -> String {
    h.get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

/// The caller's reasoning: `Wicket-Reasoning` and `traceparent` headers
/// (percent-encoded values are decoded), else what was carried on the token.
pub fn caller_trace(h: &HeaderMap, carried: Option<CarriedReasoning>) -> CallerTrace {
    let header = |n: &str| {
        h.get(n).map(|v| {
            let s = String::from_utf8_lossy(v.as_bytes()).into_owned();
            if s.contains('%') {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or(s)
            } else {
                s
            }
        })
    };
    let carried = carried.unwrap_or_default();
    CallerTrace {
        reasoning: header("wicket-reasoning")
            .or_else(|| Some(carried.reasoning.clone()).filter(|r| !r.is_empty())),
        traceparent: header("traceparent")
            .or_else(|| Some(carried.traceparent.clone()).filter(|r| !r.is_empty())),
    }
}

/// Why no session could be had for a token.
#[derive(Debug, Clone)]
pub enum SessionRefused {
    /// The token did not validate (the message says why, never the token).
    Unauthorized(String),
    /// The token is fine but no grant admits the caller (or the gate drains).
    Forbidden(Decision),
}

/// A session and when it last served a request.
struct Cached {
    live: Arc<LiveSession>,
    last_used: AtomicI64,
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Sessions keyed by the SHA-256 of the caller's token: every request with
/// the same token shares one audit session, which ends when the token
/// expires, the caller is revoked, an admin terminates it, or it sits idle.
pub struct TokenSessions {
    sidecar: Arc<Sidecar>,
    idle: Duration,
    map: std::sync::Mutex<HashMap<[u8; 32], Arc<Cached>>>,
}

impl std::fmt::Debug for TokenSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSessions")
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl TokenSessions {
    /// Sessions on `sidecar` that end after `idle` without a request.
    pub fn new(sidecar: Arc<Sidecar>, idle: Duration) -> TokenSessions {
        TokenSessions {
            sidecar,
            idle,
            map: Default::default(),
        }
    }

    /// Ends idle sessions and forgets ended ones.
    pub fn sweep(&self) {
        let idle = self.idle.as_secs() as i64;
        let now = now_secs();
        let mut g = self.map.lock().expect("sessions");
        g.retain(|_, c| {
            c.live.guard.end_reason().is_none() && now - c.last_used.load(Ordering::Relaxed) < idle
        });
    }

    /// Sweeps every 15 s until the returned task is aborted.
    pub fn sweep_forever(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                me.sweep();
            }
        })
    }

    /// Number of sessions held.
    pub fn len(&self) -> usize {
        self.map.lock().expect("sessions").len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The session of a token: the cached one, or a new one once the token
    /// validates and a grant admits it (`client_app` names the client
    /// program then; it is not asked for on the cached path).
    pub async fn session_for(
        &self,
        token: &str,
        client_addr: &str,
        client_app: impl FnOnce() -> String,
    ) -> Result<Arc<LiveSession>, SessionRefused> {
        let key: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("sha-256 is 32 bytes");
        let now = now_secs();
        {
            let mut g = self.map.lock().expect("sessions");
            if let Some(c) = g.get(&key) {
                if c.live.guard.end_reason().is_none() && c.live.token_expires.timestamp() > now {
                    c.last_used.store(now, Ordering::Relaxed);
                    return Ok(c.live.clone());
                }
                g.remove(&key);
            }
        }
        let identity = self
            .sidecar
            .authenticate(token, client_addr)
            .await
            .map_err(|e| SessionRefused::Unauthorized(e.to_string()))?;
        let session = self
            .sidecar
            .open_session(&identity, client_addr, &client_app())
            .map_err(SessionRefused::Forbidden)?;
        let live = Arc::new(LiveSession::new(session, self.sidecar.clone()));
        self.map.lock().expect("sessions").insert(
            key,
            Arc::new(Cached {
                live: live.clone(),
                last_used: AtomicI64::new(now),
            }),
        );
        Ok(live)
    }
}

/// Callback run once when a body ends: bytes sent, and whether it ran to
/// its end.
pub type Done = Box<dyn FnOnce(u64, bool) + Send>;

/// A body that counts what it passes, breaks off when the session ends,
/// and reports once when done (or dropped).
pub struct Tracked {
    inner: Body,
    bytes: u64,
    ended: Option<Pin<Box<dyn Future<Output = EndReason> + Send>>>,
    done: Option<Done>,
}

impl Tracked {
    /// Wraps `inner`; `ended` resolves when the session ends.
    pub fn new(
        inner: Body,
        ended: impl Future<Output = EndReason> + Send + 'static,
        done: Done,
    ) -> Tracked {
        Tracked {
            inner,
            bytes: 0,
            ended: Some(Box::pin(ended)),
            done: Some(done),
        }
    }

    /// Wraps a body already in memory, which leaves in one go: nothing to
    /// break off when the session ends.
    pub fn whole(inner: Body, done: Done) -> Tracked {
        Tracked {
            inner,
            bytes: 0,
            ended: None,
            done: Some(done),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            done(self.bytes, complete);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(ended) = this.ended.as_mut()
            && let Poll::Ready(reason) = ended.as_mut().poll(cx)
        {
            this.finish(false);
            return Poll::Ready(Some(Err(format!("wicket: {}", reason.message()).into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                // A body that knows it is done is not polled again (hyper
                // checks `is_end_stream`): it ran to its end now.
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body from a poll function (no extra crate for one adapter).
pub fn body_from_poll<T>(
    f: impl FnMut(&mut Context<'_>) -> Poll<Option<T>> + Send + Unpin + 'static,
) -> Body
where
    T: Into<Result<Frame<Bytes>, BoxError>> + 'static,
{
    struct S<F>(F);
    impl<F, T> hyper::body::Body for S<F>
    where
        F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin,
        T: Into<Result<Frame<Bytes>, BoxError>>,
    {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            (self.get_mut().0)(cx).map(|o| o.map(Into::into))
        }
    }
    S(f).boxed_unsync()
}

/// The next data chunk of a body (trailers skipped); `None` at its end.
pub async fn next_data(body: &mut Body) -> Option<Result<Bytes, BoxError>> {
    loop {
        match body.frame().await? {
            Err(e) => return Some(Err(e)),
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    return Some(Ok(d));
                }
            }
        }
    }
}

/// A body fed by a channel of frames (a transforming task's output).
pub fn channel_body(mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>) -> Body {
    body_from_poll(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer(&h).as_deref(), Some("abc"));
        h.insert("authorization", HeaderValue::from_static("bearer  abc "));
        assert_eq!(bearer(&h).as_deref(), Some("abc"));
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn reasoning_headers_are_decoded() {
        let mut h = HeaderMap::new();
        h.insert(
            "wicket-reasoning",
            HeaderValue::from_static("checking%20the%20user"),
        );
        let t = caller_trace(&h, None);
        assert_eq!(t.reasoning.as_deref(), Some("checking the user"));
        assert!(t.traceparent.is_none());
    }
}
