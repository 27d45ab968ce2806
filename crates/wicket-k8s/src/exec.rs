//! exec, attach and port-forward over WebSocket.
//!
//! The client's upgrade is accepted at once (so a held command can say it
//! waits, on the caller's terminal); then the request is decided, and only
//! when allowed does the gate open its own WebSocket to the API server and
//! relay. exec and attach frames are decoded both ways: the channel byte
//! of the Kubernetes channel protocol (`v4.channel.k8s.io`,
//! `v5.channel.k8s.io`: 0 stdin, 1 stdout, 2 stderr, 3 status, 4 resize,
//! 255 close) says what each frame carries. stdin, stdout and stderr are
//! recorded as asciicast v2 (masked by the connection's detectors; without
//! a terminal, output past `CAPTURE_LIMIT` is counted, not recorded, as the
//! SSH gate does), the
//! status frame gives the exit code, and text output is masked on its way
//! to the client too (binary output, such as `kubectl cp`'s tar stream, is
//! masked only in the recording, so files arrive intact).
//!
//! A refusal reaches kubectl as a status frame, which it prints as an
//! error: a WebSocket that was accepted is not retried over SPDY.
//! port-forward's streams (`SPDY/3.1+portforward.k8s.io` tunnels SPDY
//! frames inside WebSocket messages) are relayed as they are, since they
//! carry arbitrary TCP, and read on their way ([`crate::forward`]) so the
//! forwarded connections' bytes are recorded too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Buf as _, Bytes, BytesMut};
use futures_util::FutureExt as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wicket_core::{AuditKind, Decision, Effect};
use wicket_sidecar::recording::{self, Recorder};
use wicket_sidecar::websocket::{self as ws, Frame, Opcode, Sender};
use wicket_sidecar::{CallerTrace, LiveSession};

use crate::classify::ApiRequest;
use crate::forward::{DataStreams, Framing, Tap};
use crate::gate::{Body, KubeGate, denial_message, forwardable, status};

/// Channel subprotocols the gate relays for exec and attach, best first.
const EXEC_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// Subprotocols relayed (opaquely) for port-forward.
const FORWARD_PROTOCOLS: &[&str] = &[
    "SPDY/3.1+portforward.k8s.io",
    "v4.channel.k8s.io",
    "portforward.k8s.io",
];

/// The protocols a client offers in header `name` (comma-separated, the
/// header possibly repeated).
pub(crate) fn offered(h: &hyper::HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Accepts a WebSocket exec, attach or port-forward and serves it in a task.
pub(crate) fn upgrade(
    gate: Arc<KubeGate>,
    live: Arc<LiveSession>,
    api: ApiRequest,
    trace: CallerTrace,
    req: Request<Incoming>,
) -> Response<Body> {
    let h = req.headers();
    let Some(key) = h.get("sec-websocket-key").and_then(|v| v.to_str().ok()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "wicket: a WebSocket upgrade needs Sec-WebSocket-Key",
        );
    };
    if h.get("sec-websocket-version").and_then(|v| v.to_str().ok()) != Some("13") {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "wicket: only WebSocket version 13 is supported",
        );
    }
    let forward = api.kind() == "port_forward";
    let supported = if forward {
        FORWARD_PROTOCOLS
    } else {
        EXEC_PROTOCOLS
    };
    let offers = offered(h, "sec-websocket-protocol");
    let Some(proto) = offers
        .iter()
        .find(|o| supported.contains(&o.as_str()))
        .cloned()
    else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!(
                "wicket: none of the offered subprotocols ({}) is relayed; this gate speaks {}",
                offers.join(", "),
                supported.join(", ")
            ),
        );
    };
    let accept = ws::accept_key(key);
    let mut headers = forwardable(h);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let proto_reply = proto.clone();
    tokio::spawn(async move {
        let Ok(client) = hyper::upgrade::on(req).await else {
            return;
        };
        let client = TokioIo::new(client);
        if let Err(e) = gate.upstream_headers(&live, &mut headers) {
            tracing::error!(error = %e, "cannot build the upstream request");
            return;
        }
        let s = Stream {
            gate,
            live,
            api,
            trace,
            proto,
            method: hyper::Method::GET,
            path,
            headers,
        };
        s.run(client).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .header("sec-websocket-protocol", proto_reply)
        .body(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static response")
}

/// An upgraded connection, either side.
pub(crate) type ClientIo = TokioIo<hyper::upgrade::Upgraded>;

/// The read and write halves of an upgraded connection.
pub(crate) type Halves = (
    tokio::io::ReadHalf<ClientIo>,
    tokio::io::WriteHalf<ClientIo>,
);

/// The client's side of a relay: its read half (led by what was read
/// from it while its command was held) and its write half.
pub(crate) type ClientHalves = (ClientRead, tokio::io::WriteHalf<ClientIo>);

/// The client's read half, led by the bytes read from it while its command
/// waited for a decision (read only to notice that the client went away;
/// they are relayed first, in order).
pub(crate) struct ClientRead {
    ahead: Bytes,
    inner: tokio::io::ReadHalf<ClientIo>,
}

impl ClientRead {
    /// The read half with nothing read ahead.
    pub(crate) fn new(inner: tokio::io::ReadHalf<ClientIo>) -> ClientRead {
        ClientRead {
            ahead: Bytes::new(),
            inner,
        }
    }
}

impl tokio::io::AsyncRead for ClientRead {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.ahead.is_empty() {
            let n = me.ahead.len().min(buf.remaining());
            buf.put_slice(&me.ahead[..n]);
            me.ahead.advance(n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

/// How much a client may send ahead while its stream waits for a decision
/// (read meanwhile only to notice that it went away).
const HELD_READ_AHEAD: usize = 1024 * 1024;

/// How a stream reaches the API server.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// A WebSocket with the client's subprotocol.
    WebSocket,
    /// SPDY/3.1, with the client's `X-Stream-Protocol-Version` offers.
    Spdy,
}

/// One exec, attach or port-forward being relayed.
pub(crate) struct Stream {
    pub(crate) gate: Arc<KubeGate>,
    pub(crate) live: Arc<LiveSession>,
    pub(crate) api: ApiRequest,
    pub(crate) trace: CallerTrace,
    /// The WebSocket subprotocol, or the SPDY stream protocol once agreed.
    pub(crate) proto: String,
    pub(crate) method: hyper::Method,
    pub(crate) path: String,
    /// The upstream request's headers (credentials and impersonation set).
    pub(crate) headers: hyper::HeaderMap,
}

/// The `Status` failure an exec's error channel (WebSocket channel 3, the
/// SPDY error stream) carries; kubectl prints its message.
pub(crate) fn failure_status(reason: &str, message: &str, code: u16) -> String {
    json!({"metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
        .to_string()
}

/// How long a refusal's status goes before the close: kubectl now and then
/// drops a status that arrives in the same read as the close (its error
/// stream is torn down before it is decoded) and exits 0 as if the command
/// had run. kubectl waits for the close, so the pause is what a refusal costs.
pub(crate) const STATUS_BEFORE_CLOSE: Duration = Duration::from_millis(100);

/// A status frame (channel 3) carrying a `Status` failure.
fn failure_frame(reason: &str, message: &str, code: u16) -> Frame {
    let mut p = vec![3u8];
    p.extend_from_slice(failure_status(reason, message, code).as_bytes());
    Frame::binary(p)
}

/// Writes frames to the client as a server (unmasked).
async fn send(w: &mut tokio::io::WriteHalf<ClientIo>, frames: &[Frame]) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    for f in frames {
        ws::encode(f, None, &mut buf);
    }
    w.write_all(&buf).await?;
    w.flush().await
}

impl Stream {
    fn tty_channel(&self) -> u8 {
        if self.api.tty { 1 } else { 2 }
    }

    async fn run(self, client: ClientIo) {
        let started = Instant::now();
        let (client_r, mut client_w) = tokio::io::split(client);
        // A hold says so on the caller's terminal while it waits.
        let (note_tx, mut note_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let rule_ch = self.tty_channel();
        let details = [("subprotocol", self.proto.clone())];
        let decide = self
            .gate
            .decide(&self.live, &self.api, &self.trace, &details, {
                move |id: &str| {
                    let _ = note_tx.send(id.to_string());
                }
            });
        tokio::pin!(decide);
        let exec = self.api.kind() == "exec";
        let note = |approval: &str| {
            let msg = format!(
                "wicket: waiting for approval {approval}; an approver can allow or deny it\r\n"
            );
            let mut p = vec![rule_ch];
            p.extend_from_slice(msg.as_bytes());
            Frame::binary(p)
        };
        // The client is read while its stream waits: if it goes away, the
        // hold is dropped here (recorded as refused, the approval withdrawn)
        // instead of running for nobody once approved.
        let mut client_r = client_r;
        let mut ahead = BytesMut::new();
        let (d, id) = loop {
            tokio::select! {
                // The note first: a quick approval must not overtake it.
                biased;
                Some(approval) = note_rx.recv() => {
                    if exec {
                        let _ = send(&mut client_w, &[note(&approval)]).await;
                    }
                }
                r = &mut decide => break r,
                r = client_r.read_buf(&mut ahead), if ahead.len() < HELD_READ_AHEAD => {
                    if matches!(r, Ok(0) | Err(_)) {
                        return;
                    }
                }
            }
        };
        let client_r = ClientRead {
            ahead: ahead.freeze(),
            inner: client_r,
        };
        while let Ok(approval) = note_rx.try_recv() {
            if exec {
                let _ = send(&mut client_w, &[note(&approval)]).await;
            }
        }
        if d.effect != Effect::Allow {
            self.refuse(&mut client_w, &d).await;
            return;
        }
        let upstream = match self.connect(Via::WebSocket).await {
            Ok((u, _)) => u,
            Err(msg) => {
                tracing::warn!(error = %msg, "exec upstream failed");
                let _ = send(
                    &mut client_w,
                    &[
                        failure_frame("InternalError", &format!("wicket: {msg}"), 502),
                        Frame::close(1000, ""),
                    ],
                )
                .await;
                self.gate.result(&self.live, &id, &[("error", msg)], &[]);
                return;
            }
        };
        let (up_r, up_w) = tokio::io::split(upstream);
        if self.api.kind() == "port_forward" {
            let framing = Framing::of_websocket(&self.proto);
            self.opaque(id, started, framing, (client_r, client_w), (up_r, up_w))
                .await;
            return;
        }
        self.relay(id, started, (client_r, client_w), (up_r, up_w))
            .await;
    }

    /// Relays port-forward's bytes as they are (they carry arbitrary TCP,
    /// not a terminal), reading them on their way ([`Tap`]) to record what
    /// the forwarded connections carry (asciicast: the client's bytes as
    /// input, the pod's as output, masked, each way up to
    /// [`recording::CAPTURE_LIMIT`], then counted), and records the result.
    pub(crate) async fn opaque(
        &self,
        id: String,
        started: Instant,
        framing: Framing,
        client: ClientHalves,
        up: Halves,
    ) {
        let ((mut client_r, mut client_w), (mut up_r, mut up_w)) = (client, up);
        let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
        let recorder = Mutex::new(self.gate.recorder(self.gate.masker()));
        let header_sent = std::sync::atomic::AtomicBool::new(false);
        let stats = Mutex::new(Stats::default());
        let streams = DataStreams::default();
        let max = self.gate.cfg.max_frame_bytes;
        let (mut tap_in, mut tap_out) = (
            Tap::new(framing, true, max, streams.clone()),
            Tap::new(framing, false, max, streams.clone()),
        );
        // The ports asked for in the request and those the client's
        // streams named (kubectl names them per stream only).
        let ports = || {
            let mut p: Vec<String> = self.api.ports.clone();
            p.extend(streams.lock().expect("streams").ports.iter().cloned());
            p.sort();
            p.dedup();
            p.join(",")
        };
        // The header once, with the first data either way (the pod may
        // speak first), by when the client's streams have named the ports.
        let start = |data: &[Bytes]| {
            if !data.is_empty() && !header_sent.load(Ordering::Acquire) {
                let command = format!("port-forward {}", ports());
                self.start_recording_as(&recorder, &header_sent, 80, 24, &command);
            }
        };
        let mut input_recorded = 0u64;
        let mut record_in = |bytes: &[u8]| {
            let mut data = Vec::new();
            tap_in.feed(bytes, &mut data)?;
            start(&data);
            for d in data {
                if input_recorded < recording::CAPTURE_LIMIT {
                    input_recorded += d.len() as u64;
                    self.client_data(0, &d, &recorder, &header_sent, &stats);
                }
            }
            Ok(())
        };
        let mut record_out = |bytes: &[u8]| {
            let mut data = Vec::new();
            tap_out.feed(bytes, &mut data)?;
            start(&data);
            for d in data {
                self.server_data(1, &d, &[], &recorder, &header_sent, &stats);
            }
            Ok(())
        };
        let a = pipe(&mut client_r, &mut up_w, &sent, &mut record_in);
        let b = pipe(&mut up_r, &mut client_w, &received, &mut record_out);
        tokio::pin!(a, b);
        // Once one side has closed, the other gets a few seconds to
        // finish, so a peer that never closes cannot hold the relay.
        let grace = Duration::from_secs(5);
        let both = async {
            let e = tokio::select! {
                e = &mut a => e.or(tokio::time::timeout(grace, &mut b).await.ok().flatten()),
                e = &mut b => e.or(tokio::time::timeout(grace, &mut a).await.ok().flatten()),
            };
            e.map_or(Ok(()), Err)
        };
        // Both directions are `both`; nothing else to wait for.
        let (error, _) = self.drive(std::future::pending(), both, &recorder).await;
        self.flush_recording(&recorder, true);
        let (sent, received) = (
            sent.load(Ordering::Relaxed),
            received.load(Ordering::Relaxed),
        );
        let mut details = vec![
            ("bytes_in", sent.to_string()),
            ("bytes_out", received.to_string()),
            ("duration_ms", started.elapsed().as_millis().to_string()),
        ];
        let ports = ports();
        if !ports.is_empty() {
            details.push(("ports", ports));
        }
        if let Some(e) = error {
            tracing::warn!(error = %e, "port-forward ended: its streams could not be read");
            details.push(("error", e));
        }
        self.gate.result(&self.live, &id, &details, &[]);
    }

    /// Refuses the stream: the failure status, then, after
    /// [`STATUS_BEFORE_CLOSE`], the close.
    async fn refuse(&self, w: &mut tokio::io::WriteHalf<ClientIo>, d: &Decision) {
        if send(w, &[failure_frame("Forbidden", &denial_message(d), 403)])
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(STATUS_BEFORE_CLOSE).await;
        let _ = send(w, &[Frame::close(1000, "")]).await;
    }

    /// Opens the gate's own stream to the API server (a WebSocket, or a
    /// SPDY upgrade), and returns it with the API server's 101 headers.
    pub(crate) async fn connect(&self, via: Via) -> Result<(ClientIo, hyper::HeaderMap), String> {
        let tls = self.gate.dial().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP with the API server failed: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(&self.path)
            .body(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| e.to_string())?;
        let h = req.headers_mut();
        *h = self.headers.clone();
        let v = |s: &str| hyper::header::HeaderValue::from_str(s).map_err(|e| e.to_string());
        h.insert("connection", v("Upgrade")?);
        let key = match via {
            Via::WebSocket => {
                let mut nonce = [0u8; 16];
                aws_lc_rs::rand::fill(&mut nonce).map_err(|_| "no random source")?;
                let key = base64::engine::general_purpose::STANDARD.encode(nonce);
                h.insert("upgrade", v("websocket")?);
                h.insert("sec-websocket-version", v("13")?);
                h.insert("sec-websocket-key", v(&key)?);
                h.insert("sec-websocket-protocol", v(&self.proto)?);
                key
            }
            Via::Spdy => {
                h.insert("upgrade", v("SPDY/3.1")?);
                String::new()
            }
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("the API server did not answer the upgrade: {e}"))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let code = resp.status();
            let body = Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(300).collect());
            return Err(format!(
                "the API server refused the stream ({code}): {message}"
            ));
        }
        if via == Via::WebSocket {
            let accept = resp
                .headers()
                .get("sec-websocket-accept")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if accept != ws::accept_key(&key) {
                return Err("the API server's WebSocket accept key is wrong".into());
            }
        }
        let headers = resp.headers().clone();
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| format!("the API server's upgrade failed: {e}"))?;
        Ok((TokioIo::new(up), headers))
    }

    /// Relays exec or attach frames both ways, recording and masking.
    async fn relay(&self, id: String, started: Instant, client: ClientHalves, up: Halves) {
        let (mut client_r, mut client_w) = client;
        let (mut up_r, mut up_w) = up;
        let masker = self.gate.masker();
        let recorder = Arc::new(Mutex::new(self.gate.recorder(masker.clone())));
        let max = self.gate.cfg.max_frame_bytes;
        let header_sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(Stats::default()));

        let to_up = async {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut channel = 0u8;
            loop {
                loop {
                    match ws::decode(&mut buf, Sender::Client, max) {
                        Ok(Some(f)) => {
                            if matches!(f.opcode, Opcode::Binary | Opcode::Text) {
                                channel = f.payload.first().copied().unwrap_or(0);
                                self.client_data(
                                    channel,
                                    &f.payload[1.min(f.payload.len())..],
                                    &recorder,
                                    &header_sent,
                                    &stats,
                                );
                            } else if f.opcode == Opcode::Continuation {
                                self.client_data(
                                    channel,
                                    &f.payload,
                                    &recorder,
                                    &header_sent,
                                    &stats,
                                );
                            }
                            let mut out = BytesMut::with_capacity(f.payload.len() + 14);
                            ws::encode(&f, Some(ws::new_mask()), &mut out);
                            if up_w.write_all(&out).await.is_err() {
                                return Err("the API server closed the stream".to_string());
                            }
                            if f.opcode == Opcode::Close {
                                return Ok(());
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Err(format!("bad frame from the client: {e}")),
                    }
                }
                match client_r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {}
                }
            }
        };
        // The API server's frames go through a pipeline: decoded as they
        // arrive, masked on a blocking thread (masking is the costly step,
        // and a second core can take it), then recorded and written to the
        // client in order.
        let (jobs_tx, mut jobs_rx) = tokio::sync::mpsc::channel::<Job>(4);
        let read_up = async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut channel = 1u8;
            // Only worth holding output back when something masks it.
            let mut carry = Carry::new(masker.is_some(), self.api.tty);
            loop {
                let mut outs = Vec::new();
                let mut eof = false;
                buf.reserve(64 * 1024);
                tokio::select! {
                    r = up_r.read_buf(&mut buf) => match r {
                        Ok(0) | Err(_) => eof = true,
                        Ok(_) => {
                            // Take what else is already there, so one job
                            // masks up to COALESCE bytes: each job costs two
                            // thread switches, and TLS hands over 16 KiB at a time.
                            while !eof && buf.len() < COALESCE {
                                buf.reserve(64 * 1024);
                                match up_r.read_buf(&mut buf).now_or_never() {
                                    Some(Ok(0) | Err(_)) => eof = true,
                                    Some(Ok(_)) => {}
                                    None => break,
                                }
                            }
                        }
                    },
                    _ = carry.due() => flush_carry(&mut carry, &mut outs),
                }
                let mut closed = false;
                while !closed {
                    match ws::decode(&mut buf, Sender::Server, max) {
                        Ok(Some(f)) => {
                            let data = match f.opcode {
                                Opcode::Binary | Opcode::Text => {
                                    channel = f.payload.first().copied().unwrap_or(0);
                                    Some(f.payload.slice(1.min(f.payload.len())..))
                                }
                                Opcode::Continuation => Some(f.payload.clone()),
                                Opcode::Close => {
                                    closed = true;
                                    None
                                }
                                _ => None,
                            };
                            let data = match data {
                                // Whole output messages go through the carry.
                                Some(d)
                                    if f.fin
                                        && f.opcode == Opcode::Binary
                                        && matches!(channel, 1 | 2) =>
                                {
                                    match carry.take(channel, &d, false) {
                                        None => Some(d),
                                        Some(pieces) => {
                                            push_output(&mut outs, channel, pieces);
                                            continue;
                                        }
                                    }
                                }
                                d => {
                                    // Held output goes before anything else (the status, the close).
                                    flush_carry(&mut carry, &mut outs);
                                    d
                                }
                            };
                            outs.push(Out {
                                frame: f,
                                lead: None,
                                more: false,
                                channel,
                                raw: data,
                                masked: Vec::new(),
                            });
                        }
                        Ok(None) => break,
                        Err(e) => return Err(format!("bad frame from the API server: {e}")),
                    }
                }
                if eof {
                    flush_carry(&mut carry, &mut outs);
                }
                if outs.is_empty() {
                    if eof {
                        return Ok(());
                    }
                    continue;
                }
                let job = match masker.clone() {
                    Some(m)
                        if outs
                            .iter()
                            .any(|o| o.raw.is_some() && matches!(o.channel, 1 | 2)) =>
                    {
                        Job::Masking(tokio::task::spawn_blocking(move || mask_outs(outs, &m)))
                    }
                    _ => Job::Ready(outs),
                };
                if jobs_tx.send(job).await.is_err() || closed || eof {
                    return Ok(());
                }
            }
        };
        let write_client = async {
            while let Some(job) = jobs_rx.recv().await {
                let outs = match job {
                    Job::Ready(o) => o,
                    Job::Masking(h) => h.await.map_err(|e| format!("masking failed: {e}"))?,
                };
                for o in &outs {
                    if let Some(raw) = &o.raw {
                        self.server_data(
                            o.channel,
                            raw,
                            &o.masked,
                            &recorder,
                            &header_sent,
                            &stats,
                        );
                    }
                }
                let (chunks, closed) = encode_outs(outs);
                if write_all_vectored(&mut client_w, chunks).await.is_err()
                    || client_w.flush().await.is_err()
                {
                    return Err("the client went away".to_string());
                }
                if closed {
                    return Ok(());
                }
            }
            Ok(())
        };
        let to_client = async {
            let (r, w) = tokio::join!(read_up, write_client);
            w.and(r)
        };
        let (error, end_note) = self.drive(to_up, to_client, &recorder).await;
        if let Some(e) = &error {
            tracing::debug!(error = %e, "exec stream ended");
        }
        if let Some(note) = end_note {
            let _ = send(
                &mut client_w,
                &[
                    failure_frame("Forbidden", &format!("wicket: {note}"), 403),
                    Frame::close(1000, ""),
                ],
            )
            .await;
        }
        let _ = client_w.shutdown().await;
        let _ = up_w.shutdown().await;
        self.finish(&id, started, &recorder, &stats, error, end_note);
    }

    /// Runs a relay's two directions until the output ends, a direction
    /// fails, or the session ends (stdin may end first; the output runs on
    /// until the command ends), flushing the recording as it goes. Returns
    /// the error and why the session ended, if it did.
    pub(crate) async fn drive(
        &self,
        to_up: impl std::future::Future<Output = Result<(), String>>,
        to_client: impl std::future::Future<Output = Result<(), String>>,
        recorder: &Mutex<Option<Recorder>>,
    ) -> (Option<String>, Option<&'static str>) {
        tokio::pin!(to_up);
        tokio::pin!(to_client);
        let ended = self.live.guard.end_signal();
        tokio::pin!(ended);
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        let mut up_done = false;
        loop {
            tokio::select! {
                r = &mut to_up, if !up_done => {
                    up_done = true;
                    if let Err(e) = r {
                        return (Some(e), None);
                    }
                }
                r = &mut to_client => return (r.err(), None),
                reason = &mut ended => return (None, Some(reason.message())),
                _ = ticker.tick() => self.flush_recording(recorder, false),
            }
        }
    }

    /// Records the end of an exec or attach: the last of the recording and
    /// the result (bytes, duration, exit code, why it ended).
    pub(crate) fn finish(
        &self,
        id: &str,
        started: Instant,
        recorder: &Mutex<Option<Recorder>>,
        stats: &Mutex<Stats>,
        error: Option<String>,
        end_note: Option<&str>,
    ) {
        self.flush_recording(recorder, true);
        let st = stats.lock().expect("stats").clone();
        let mut details = vec![
            ("bytes_in", st.bytes_in.to_string()),
            ("bytes_out", st.bytes_out.to_string()),
            ("duration_ms", started.elapsed().as_millis().to_string()),
        ];
        if let Some(code) = st.exit_code {
            details.push(("exit_code", code.to_string()));
        }
        if let Some(e) = error {
            details.push(("error", e));
        }
        if let Some(n) = end_note {
            details.push(("ended", n.to_string()));
        }
        self.gate.result(&self.live, id, &details, &st.masked);
    }

    pub(crate) fn start_recording(
        &self,
        recorder: &Mutex<Option<Recorder>>,
        header_sent: &std::sync::atomic::AtomicBool,
        cols: u32,
        rows: u32,
    ) {
        self.start_recording_as(
            recorder,
            header_sent,
            cols,
            rows,
            &self.api.command.join(" "),
        );
    }

    /// [`Self::start_recording`] naming `command` in the header.
    fn start_recording_as(
        &self,
        recorder: &Mutex<Option<Recorder>>,
        header_sent: &std::sync::atomic::AtomicBool,
        cols: u32,
        rows: u32,
        command: &str,
    ) {
        if header_sent.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        if recorder.lock().expect("recorder").is_none() {
            return;
        }
        let header = recording::header(
            cols,
            rows,
            if self.api.tty { "xterm" } else { "none" },
            Some(command),
        );
        self.record_output_event("asciicast_header", header, &[]);
    }

    fn record_output_event(&self, key: &str, value: String, masked: &[(String, u64)]) {
        let mut e = self.live.bare_event(AuditKind::Output);
        e.details.insert("channel".into(), self.channel_name());
        e.details.insert(key.into(), value);
        for (k, n) in masked {
            e.masked.insert(k.clone(), *n);
        }
        if let Err(err) = self.gate.sidecar.record(e) {
            tracing::error!(error = %err, "cannot record exec output");
        }
    }

    fn channel_name(&self) -> String {
        format!("{} {}/{}", self.api.verb, self.api.namespace, self.api.name)
    }

    pub(crate) fn flush_recording(&self, recorder: &Mutex<Option<Recorder>>, force: bool) {
        let mut g = recorder.lock().expect("recorder");
        let Some(r) = g.as_mut() else { return };
        if force {
            r.finish();
        } else {
            r.tick(Duration::from_millis(500));
        }
        if let Some(batch) = r.take_batch(force) {
            let counts: Vec<(String, u64)> = std::mem::take(&mut r.counts)
                .iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect();
            drop(g);
            self.record_output_event("asciicast", batch, &counts);
        }
    }

    /// What the client sent on `channel`.
    pub(crate) fn client_data(
        &self,
        channel: u8,
        data: &[u8],
        recorder: &Mutex<Option<Recorder>>,
        header_sent: &std::sync::atomic::AtomicBool,
        stats: &Mutex<Stats>,
    ) {
        match channel {
            0 => {
                stats.lock().expect("stats").bytes_in += data.len() as u64;
                self.start_recording(recorder, header_sent, 80, 24);
                if let Some(r) = recorder.lock().expect("recorder").as_mut() {
                    r.input(data, false);
                }
            }
            4 => {
                #[derive(serde::Deserialize)]
                struct Size {
                    #[serde(rename = "Width")]
                    width: u32,
                    #[serde(rename = "Height")]
                    height: u32,
                }
                if let Ok(s) = serde_json::from_slice::<Size>(data) {
                    if !header_sent.load(std::sync::atomic::Ordering::Acquire) {
                        self.start_recording(recorder, header_sent, s.width, s.height);
                    } else if let Some(r) = recorder.lock().expect("recorder").as_mut() {
                        r.resize(s.width, s.height);
                    }
                }
            }
            _ => {}
        }
    }

    /// Accounts for what the API server sent on `channel` (`raw`, before
    /// masking; `masked`, what live masking replaced): recording, byte
    /// counts, and the exit status.
    pub(crate) fn server_data(
        &self,
        channel: u8,
        raw: &Bytes,
        masked: &[(String, u64)],
        recorder: &Mutex<Option<Recorder>>,
        header_sent: &std::sync::atomic::AtomicBool,
        stats: &Mutex<Stats>,
    ) {
        match channel {
            1 | 2 => {
                self.start_recording(recorder, header_sent, 80, 24);
                if let Some(r) = recorder.lock().expect("recorder").as_mut()
                    && (self.api.tty || r.output_bytes < recording::CAPTURE_LIMIT)
                {
                    r.output(raw);
                }
                // A full batch goes now, not at the next tick: under
                // sustained output batches (and memory) stay small.
                self.flush_recording(recorder, false);
                let mut st = stats.lock().expect("stats");
                st.bytes_out += raw.len() as u64;
                for (k, n) in masked {
                    match st.masked.iter_mut().find(|(name, _)| name == k) {
                        Some((_, c)) => *c += n,
                        None => st.masked.push((k.clone(), *n)),
                    }
                }
            }
            3 => {
                let mut st = stats.lock().expect("stats");
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) {
                    st.exit_code = Some(match v["status"].as_str() {
                        Some("Success") => 0,
                        _ => v["details"]["causes"]
                            .as_array()
                            .and_then(|c| c.iter().find(|c| c["reason"] == "ExitCode"))
                            .and_then(|c| c["message"].as_str())
                            .and_then(|m| m.parse().ok())
                            .unwrap_or(-1),
                    });
                }
            }
            _ => {}
        }
    }
}

/// Copies `r` to `w` until `r` ends, counting bytes into `n`, then shuts
/// `w` down so the far end sees the close (port-forward's relay). `tap`
/// reads each read first; bytes it cannot read are not relayed, and its
/// error ends the copy and is returned.
async fn pipe<R, W>(
    r: &mut R,
    w: &mut W,
    n: &AtomicU64,
    tap: &mut impl FnMut(&[u8]) -> Result<(), String>,
) -> Option<String>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 32 * 1024];
    let mut error = None;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                if let Err(e) = tap(&buf[..k]) {
                    error = Some(e);
                    break;
                }
                if w.write_all(&buf[..k]).await.is_err() || w.flush().await.is_err() {
                    break;
                }
                n.fetch_add(k as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = w.shutdown().await;
    error
}

/// Output frames at least this long may have their incomplete last line
/// held back; shorter ones (a terminal's echo of a key, a prompt) are not,
/// unless they continue a held line.
const HOLD_FROM: usize = 256;
/// How much upstream output one masking job takes at most, when that much
/// is already waiting.
const COALESCE: usize = 256 * 1024;
/// The longest incomplete line held back.
const MAX_CARRY: usize = 16 * 1024;
/// How long held output waits for the rest of its line, with a terminal
/// (someone may be reading it) and without (a program reads it).
const CARRY_WAIT: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(1));

/// Output held back from the client so that a value split between two
/// frames (an e-mail address across a 32 KiB read boundary) is masked
/// whole: the bytes after the last newline of an output frame of
/// [`HOLD_FROM`] bytes or more wait for the next frame of the same channel,
/// for at most [`CARRY_WAIT`]: 250 ms with a terminal, 1 s without (on a
/// loaded two-core machine a producer
/// pauses for tens of milliseconds mid-stream; a prompt printed right
/// after bulk output arrives that much later). Short frames (a terminal's
/// echo of a key) are not held, nor an incomplete line over [`MAX_CARRY`]
/// bytes, nor anything when nothing masks it; anything held goes out
/// before the exit status or the close.
pub(crate) struct Carry {
    on: bool,
    wait: Duration,
    /// Per channel (stdout, stderr): bytes after the last newline sent.
    held: [Vec<u8>; 2],
    since: Option<tokio::time::Instant>,
}

impl Carry {
    /// A carry for a stream with or without a terminal, that holds
    /// nothing back when `on` is false.
    pub(crate) fn new(on: bool, tty: bool) -> Carry {
        Carry {
            on,
            wait: if tty { CARRY_WAIT.0 } else { CARRY_WAIT.1 },
            held: [Vec::new(), Vec::new()],
            since: None,
        }
    }

    /// What to send now of `data` on `channel` (1 or 2): what was held
    /// before it, then it, less the incomplete line now held; `None` when
    /// that is `data` itself (nothing was held, nothing is), so the frame
    /// goes as it is. `end`: the channel ends, hold nothing.
    ///
    /// What to send comes in pieces, each to go as one frame, and each
    /// made of whole lines but for the last piece when nothing is held:
    /// the held bytes joined to `data`'s first line (a copy of one line),
    /// then the rest of `data` up to its last newline, which is a slice of
    /// `data`, not a copy (this is most of a busy stream's output). No
    /// pieces: everything is held.
    pub(crate) fn take(&mut self, channel: u8, data: &Bytes, end: bool) -> Option<Vec<Bytes>> {
        let i = usize::from(channel == 2);
        let before = self.held[i].len();
        let total = before + data.len();
        // Held bytes hold no newline: the cut is after the data's last one.
        let last = memchr::memrchr(b'\n', data);
        let cut = last.map_or(0, |p| before + p + 1);
        let hold = self.on
            && !end
            && (data.len() >= HOLD_FROM || before > 0)
            && cut < total
            && total - cut <= MAX_CARRY;
        if before == 0 && !hold {
            return None;
        }
        let upto = match (hold, last) {
            (true, Some(p)) => p + 1,
            (true, None) => 0,
            (false, _) => data.len(),
        };
        let mut pieces = Vec::with_capacity(2);
        let mut rest = data.slice(..upto);
        if before > 0 && (upto > 0 || !hold) {
            let first = memchr::memchr(b'\n', &rest).map_or(rest.len(), |p| p + 1);
            let mut joined = std::mem::take(&mut self.held[i]);
            joined.extend_from_slice(&rest[..first]);
            pieces.push(Bytes::from(joined));
            rest = rest.slice(first..);
        }
        if !rest.is_empty() {
            pieces.push(rest);
        }
        if hold {
            self.held[i].extend_from_slice(&data[upto..]);
        }
        if self.held.iter().all(Vec::is_empty) {
            self.since = None;
        } else if self.since.is_none() {
            self.since = Some(tokio::time::Instant::now());
        }
        Some(pieces)
    }

    /// Resolves when held output has waited long enough (never when none is held).
    pub(crate) async fn due(&self) {
        match self.since {
            Some(t) => tokio::time::sleep_until(t + self.wait).await,
            None => std::future::pending().await,
        }
    }

    /// Everything held, by channel.
    pub(crate) fn flush(&mut self) -> Vec<(u8, Vec<u8>)> {
        self.since = None;
        let mut out = Vec::new();
        for (i, ch) in [(0, 1u8), (1, 2u8)] {
            let h = std::mem::take(&mut self.held[i]);
            if !h.is_empty() {
                out.push((ch, h));
            }
        }
        out
    }
}

/// Writes `chunks` in order with vectored writes (TLS takes several slices
/// into one record, so the payloads are not first copied together).
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: Vec<Bytes>,
) -> std::io::Result<()> {
    let mut chunks: std::collections::VecDeque<Bytes> =
        chunks.into_iter().filter(|c| !c.is_empty()).collect();
    while !chunks.is_empty() {
        let mut n = {
            let slices: Vec<std::io::IoSlice<'_>> = chunks
                .iter()
                .take(64)
                .map(|c| std::io::IoSlice::new(c))
                .collect();
            w.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(first) = chunks.front_mut() else {
                break;
            };
            if n >= first.len() {
                n -= first.len();
                chunks.pop_front();
            } else {
                first.advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

/// Queues what `carry` holds as output frames.
fn flush_carry(carry: &mut Carry, outs: &mut Vec<Out>) {
    for (ch, data) in carry.flush() {
        outs.push(Out::data(ch, Bytes::from(data)));
    }
}

/// Adds `pieces` of one output frame the carry cut to `outs`, as one
/// message still: each message costs the client a write, and the pieces
/// go out under one header (see `Out::more`).
fn push_output(outs: &mut Vec<Out>, channel: u8, pieces: Vec<Bytes>) {
    let n = pieces.len();
    outs.extend(pieces.into_iter().enumerate().map(|(k, p)| Out {
        more: k + 1 < n,
        ..Out::data(channel, p)
    }));
}

/// The WebSocket bytes of `outs`: headers here, payloads sent from where
/// they are, the pieces of a message (`Out::more`) under one header; and
/// whether they close the stream.
fn encode_outs(outs: Vec<Out>) -> (Vec<Bytes>, bool) {
    let mut heads = BytesMut::with_capacity(14 * outs.len());
    let mut chunks = Vec::with_capacity(2 * outs.len());
    let mut closed = false;
    // Payload bytes of each message, its pieces together.
    let mut sizes = Vec::with_capacity(outs.len());
    let mut run = 0;
    for o in &outs {
        run += o.frame.payload.len();
        if !o.more {
            sizes.push(run);
            run = 0;
        }
    }
    let mut sizes = sizes.into_iter();
    let mut inside = false;
    for o in outs {
        closed |= o.frame.opcode == Opcode::Close;
        if !inside {
            let len = sizes.next().unwrap_or(run) + usize::from(o.lead.is_some());
            ws::encode_header(&o.frame, len, &mut heads);
            heads.extend(o.lead);
            chunks.push(heads.split().freeze());
        }
        inside = o.more;
        chunks.push(o.frame.payload);
    }
    (chunks, closed)
}

/// A frame from the API server on its way to the client.
struct Out {
    /// The frame as it will be sent (masked once the job ran).
    frame: Frame,
    /// The channel byte, when it is sent between the frame's header and
    /// its payload rather than being the payload's first byte (output the
    /// gate cut or masked: its data is sent from where it is).
    lead: Option<u8>,
    /// Whether the next `Out` is the rest of this one's message (pieces of
    /// one frame the carry cut): they are sent as one frame, under this
    /// one's header and channel byte.
    more: bool,
    /// Its channel (a continuation carries its message's).
    channel: u8,
    /// Its data before masking (without the channel byte), for data frames.
    raw: Option<Bytes>,
    /// What masking replaced in it.
    masked: Vec<(String, u64)>,
}

impl Out {
    /// A whole output message of `data` on `channel`.
    fn data(channel: u8, data: Bytes) -> Out {
        Out {
            frame: Frame::binary(data.clone()),
            lead: Some(channel),
            more: false,
            channel,
            raw: Some(data),
            masked: Vec::new(),
        }
    }
}

/// Frames ready to write, or being masked.
enum Job {
    Ready(Vec<Out>),
    Masking(tokio::task::JoinHandle<Vec<Out>>),
}

/// Masks `raw` when it is text (valid UTF-8 without NUL bytes) and the
/// masker replaced something in it: the masked text and what was replaced.
pub(crate) fn mask_text(
    m: &wicket_mask::Masker,
    raw: &[u8],
) -> Option<(String, Vec<(String, u64)>)> {
    // memchr's vectorised search: the slice's own `contains` went a word
    // at a time, and was a tenth of the masking cost.
    if memchr::memchr(0, raw).is_some() {
        return None;
    }
    let text = std::str::from_utf8(raw).ok()?;
    let (masked, counts) = m.mask(text);
    if counts.total() == 0 {
        return None;
    }
    Some((
        masked.into_owned(),
        counts.iter().map(|(k, n)| (k.to_string(), n)).collect(),
    ))
}

/// Masks the text output frames of `outs` (stdout and stderr). Binary data
/// (NUL bytes, invalid UTF-8) is left intact for the client and masked in
/// the recording.
fn mask_outs(mut outs: Vec<Out>, m: &wicket_mask::Masker) -> Vec<Out> {
    for o in &mut outs {
        let Some(raw) = &o.raw else { continue };
        if !matches!(o.channel, 1 | 2) {
            continue;
        }
        let Some((masked, counts)) = mask_text(m, raw) else {
            continue;
        };
        o.masked = counts;
        // A message's first frame starts with its channel byte.
        if o.frame.opcode != Opcode::Continuation {
            o.lead = Some(o.channel);
        }
        o.frame.payload = Bytes::from(masked.into_bytes());
    }
    outs
}

/// What an exec or attach moved, for its result.
#[derive(Debug, Default, Clone)]
pub(crate) struct Stats {
    bytes_in: u64,
    bytes_out: u64,
    exit_code: Option<i64>,
    masked: Vec<(String, u64)>,
}

impl KubeGate {
    /// A recorder masking with `masker`, when the connection records.
    pub(crate) fn recorder(&self, masker: Option<Arc<wicket_mask::Masker>>) -> Option<Recorder> {
        self.recording_enabled().then(|| Recorder::new(masker))
    }

    /// Whether the connection records terminal output.
    pub(crate) fn recording_enabled(&self) -> bool {
        let Some(b) = self.sidecar.bundles.current() else {
            return true;
        };
        b.policy
            .connection(&self.sidecar.cfg.connection)
            .is_none_or(|c| c.recording.enabled && c.recording.capture_output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `take` sends of `data`, its pieces joined.
    fn take(c: &mut Carry, channel: u8, data: &[u8], end: bool) -> Option<Vec<u8>> {
        let pieces = c.take(channel, &Bytes::copy_from_slice(data), end)?;
        Some(pieces.concat())
    }

    #[test]
    fn bulk_output_holds_its_incomplete_last_line_for_the_next_frame() {
        let mut c = Carry::new(true, false);
        let mut first = "x".repeat(1000);
        first.push_str("\nmail carol@exa");
        let sent = take(&mut c, 1, first.as_bytes(), false).unwrap();
        assert_eq!(sent.len(), 1001, "up to and with the newline");
        assert_eq!(sent, first.as_bytes()[..1001], "nothing held before");
        let sent = take(&mut c, 1, b"mple.com now\n", false).unwrap();
        assert_eq!(sent, b"mail carol@example.com now\n");
        assert!(c.flush().is_empty());
    }

    #[test]
    fn the_pieces_of_a_frame_go_out_as_one_message() {
        let mut outs = Vec::new();
        let bulk = Bytes::from_static(b"line two\nline three\n");
        push_output(
            &mut outs,
            1,
            vec![Bytes::from_static(b"held\n"), bulk.clone()],
        );
        push_output(&mut outs, 2, vec![Bytes::from_static(b"oops\n")]);
        outs.push(Out::data(1, Bytes::from_static(b"last\n")));
        let (chunks, closed) = encode_outs(outs);
        assert!(!closed);
        assert!(
            chunks.iter().any(|c| c.as_ptr() == bulk.as_ptr()),
            "the bulk is sent from where it is"
        );
        let mut wire = BytesMut::from(&chunks.concat()[..]);
        let mut got = Vec::new();
        while let Some(f) = ws::decode(&mut wire, Sender::Server, 1 << 20).unwrap() {
            assert!(f.fin && f.opcode == Opcode::Binary);
            got.push(f.payload.to_vec());
        }
        assert!(wire.is_empty());
        assert_eq!(
            got,
            vec![
                b"\x01held\nline two\nline three\n".to_vec(),
                b"\x02oops\n".to_vec(),
                b"\x01last\n".to_vec(),
            ]
        );
    }

    #[test]
    fn pieces_are_whole_lines_and_the_bulk_is_not_copied() {
        let mut c = Carry::new(true, false);
        let mut first = vec![b'x'; HOLD_FROM];
        first.extend_from_slice(b"\nhe");
        let first = Bytes::from(first);
        let pieces = c.take(1, &first, false).unwrap();
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0], first[..HOLD_FROM + 1]);
        assert_eq!(pieces[0].as_ptr(), first.as_ptr(), "a slice of the frame");
        let second = Bytes::from_static(b"ld\nline two\nline three\npart");
        let pieces = c.take(1, &second, false).unwrap();
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0], "held\n", "the held line, completed");
        assert_eq!(pieces[1], "line two\nline three\n");
        assert_eq!(
            pieces[1].as_ptr(),
            second[3..].as_ptr(),
            "a slice of the frame"
        );
        // No newline: all of it waits, nothing to send yet.
        assert!(
            c.take(1, &Bytes::from_static(b"-more"), false)
                .unwrap()
                .is_empty()
        );
        assert_eq!(c.flush(), vec![(1, b"part-more".to_vec())]);
        // The end: what was held, then the data, nothing kept.
        let mut c = Carry::new(true, false);
        c.take(1, &first, false);
        let pieces = c.take(1, &Bytes::from_static(b"llo\nbye"), true).unwrap();
        assert_eq!(pieces, ["hello\n", "bye"]);
        assert!(c.flush().is_empty());
    }

    #[test]
    fn long_lines_ends_and_unmasked_output_are_not_held() {
        let mut c = Carry::new(true, false);
        // A key's echo or a prompt passes at once.
        assert_eq!(take(&mut c, 1, b"$ ", false), None, "sent as it is");
        // A short frame continuing a held line joins it.
        let mut first = vec![b'x'; HOLD_FROM];
        first.extend_from_slice(b"\n$ ");
        assert_eq!(take(&mut c, 1, &first, false).unwrap().len(), HOLD_FROM + 1);
        assert!(take(&mut c, 1, b"l", false).unwrap().is_empty());
        assert_eq!(take(&mut c, 1, b"s\n", false).unwrap(), b"$ ls\n");
        let blob = vec![7u8; MAX_CARRY + 1];
        assert_eq!(take(&mut c, 2, &blob, false), None);
        let mut tail = vec![b'a'; 100];
        tail.extend_from_slice(b"\nend");
        assert_eq!(take(&mut c, 1, &tail, true), None);
        // A line longer than MAX_CARRY is not held.
        let mut long = vec![b'\n'];
        long.extend(vec![b'b'; MAX_CARRY + 1]);
        assert_eq!(take(&mut c, 1, &long, false), None);
        // Nothing is held when no masker runs.
        let mut off = Carry::new(false, false);
        assert_eq!(take(&mut off, 1, &tail, false), None);
    }

    #[test]
    fn flush_gives_each_channel_its_held_bytes() {
        let mut c = Carry::new(true, false);
        let mut a = vec![b'a'; HOLD_FROM];
        a.extend_from_slice(b"\nout-tail");
        let mut b = vec![b'b'; HOLD_FROM];
        b.extend_from_slice(b"\nerr-tail");
        take(&mut c, 1, &a, false);
        take(&mut c, 2, &b, false);
        assert_eq!(
            c.flush(),
            vec![(1, b"out-tail".to_vec()), (2, b"err-tail".to_vec())]
        );
    }
}
