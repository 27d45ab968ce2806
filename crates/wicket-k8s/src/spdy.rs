//! exec, attach and port-forward over SPDY/3.1, as kubectl before
//! WebSockets (1.29 and older for exec and attach, 1.30 and older for
//! port-forward, or any kubectl with `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`)
//! speaks them.
//!
//! The request is decided before anything is upgraded: a SPDY client only
//! opens its streams after the 101, so there is no channel to say "waiting
//! for approval" on; a held exec simply waits, and a refusal is a plain
//! `Status` 403 that kubectl prints (`error: unable to upgrade connection:
//! wicket: denied by rule …`). When allowed, the gate makes the same
//! upgrade to the API server, answers the client with the API server's
//! agreed `X-Stream-Protocol-Version`, and relays.
//!
//! exec and attach are relayed frame by frame and read on the way: the
//! client's SYN_STREAM header blocks (one zlib stream per direction, see
//! [`wicket_spdy`]) say which stream is stdin, stdout, stderr, error or
//! resize, so the session is recorded and masked exactly as over
//! WebSocket (the channel numbers are the same). Text output is masked on
//! its way to the client by rewriting its DATA frame; kubectl's SPDY
//! library (spdystream) does no flow control, so a frame that changes
//! length upsets no window. port-forward's streams carry arbitrary TCP and
//! are relayed as they are, counted.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wicket_core::Effect;
use wicket_sidecar::recording::Recorder;
use wicket_sidecar::{CallerTrace, LiveSession};
use wicket_spdy::{FLAG_FIN, Frame, Inflater, MAX_LENGTH, kind};

use crate::classify::ApiRequest;
use crate::exec::{Carry, Halves, Stats, Stream, Via, mask_text, offered};
use crate::gate::{Body, KubeGate, forbidden, forwardable, status};

/// The channel number (as in the WebSocket channel protocol) of a stream's
/// `streamtype`.
fn channel(streamtype: &str) -> Option<u8> {
    match streamtype {
        "stdin" => Some(0),
        "stdout" => Some(1),
        "stderr" => Some(2),
        "error" => Some(3),
        "resize" => Some(4),
        _ => None,
    }
}

/// Decides a SPDY exec, attach or port-forward and, when allowed, upgrades
/// both sides and relays them in a task.
pub(crate) async fn upgrade(
    gate: Arc<KubeGate>,
    live: Arc<LiveSession>,
    api: ApiRequest,
    trace: CallerTrace,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let offered = offered(req.headers(), "x-stream-protocol-version");
    if offered.is_empty() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "wicket: a SPDY upgrade needs X-Stream-Protocol-Version",
        );
    }
    let details = [("subprotocol", format!("SPDY/3.1 ({})", offered.join(", ")))];
    let (d, id) = gate
        .decide(&live, &api, &trace, &details, |_: &str| {})
        .await;
    if d.effect != Effect::Allow {
        return forbidden(&d);
    }
    let started = Instant::now();
    let mut headers = forwardable(req.headers());
    if let Err(e) = gate.upstream_headers(&live, &mut headers) {
        tracing::error!(error = %e, "cannot build the upstream request");
        gate.result(&live, &id, &[("error", e.to_string())], &[]);
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "wicket: cannot build the upstream request",
        );
    }
    let mut s = Stream {
        gate,
        live,
        api,
        trace,
        proto: String::new(),
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        headers,
    };
    let (upstream, agreed) = match s.connect(Via::Spdy).await {
        Ok(u) => u,
        Err(msg) => {
            tracing::warn!(error = %msg, "SPDY upstream failed");
            s.gate.result(&s.live, &id, &[("error", msg.clone())], &[]);
            return status(
                StatusCode::BAD_GATEWAY,
                "InternalError",
                &format!("wicket: {msg}"),
            );
        }
    };
    let agreed = agreed
        .get("x-stream-protocol-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    s.proto = agreed.clone();
    let on_client = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(client) = on_client.await else {
            s.gate.result(
                &s.live,
                &id,
                &[("error", "the client did not upgrade".to_string())],
                &[],
            );
            return;
        };
        let client = hyper_util::rt::TokioIo::new(client);
        let (client_r, client_w) = tokio::io::split(client);
        let (up_r, up_w) = tokio::io::split(upstream);
        if s.api.kind() == "port_forward" {
            s.opaque(id, started, (client_r, client_w), (up_r, up_w))
                .await;
        } else {
            s.relay_spdy(id, started, (client_r, client_w), (up_r, up_w))
                .await;
        }
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "SPDY/3.1");
    if !agreed.is_empty() {
        resp = resp.header("x-stream-protocol-version", agreed);
    }
    resp.body(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    )
    .expect("static response")
}

/// What both directions of a SPDY relay share.
struct Shared {
    /// stream id → channel, from the client's SYN_STREAMs.
    streams: Mutex<HashMap<u32, u8>>,
    recorder: Mutex<Option<Recorder>>,
    header_sent: AtomicBool,
    stats: Mutex<Stats>,
}

impl Shared {
    /// The stream carrying `channel`.
    fn stream_of(&self, channel: u8) -> Option<u32> {
        let streams = self.streams.lock().expect("streams");
        streams
            .iter()
            .find(|(_, c)| **c == channel)
            .map(|(id, _)| *id)
    }

    fn channel(&self, stream: Option<u32>) -> Option<u8> {
        let id = stream?;
        self.streams.lock().expect("streams").get(&id).copied()
    }
}

impl Stream {
    /// Relays an exec or attach SPDY connection, recording and masking.
    async fn relay_spdy(&self, id: String, started: Instant, client: Halves, up: Halves) {
        let ((mut client_r, mut client_w), (mut up_r, mut up_w)) = (client, up);
        let masker = self.gate.masker();
        let shared = Shared {
            streams: Mutex::new(HashMap::new()),
            recorder: Mutex::new(
                self.gate
                    .recording_enabled()
                    .then(|| Recorder::new(masker.clone())),
            ),
            header_sent: AtomicBool::new(false),
            stats: Mutex::new(Stats::default()),
        };
        let max = self.gate.cfg.max_frame_bytes.min(MAX_LENGTH);
        let to_up = async {
            let mut inflater = Inflater::new();
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut out = BytesMut::with_capacity(64 * 1024);
            loop {
                loop {
                    let f = match Frame::decode(&mut buf, max) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => return Err(format!("bad SPDY from the client: {e}")),
                    };
                    match f.kind() {
                        Some(kind::SYN_STREAM) => {
                            let h = inflater
                                .headers(f.header_block().unwrap_or_default())
                                .map_err(|e| format!("bad SPDY from the client: {e}"))?;
                            if let (Some(sid), Some(ch)) =
                                (f.stream(), h.get("streamtype").and_then(channel))
                            {
                                shared.streams.lock().expect("streams").insert(sid, ch);
                            }
                        }
                        // Every header block goes through the inflater, in
                        // order: they are one zlib stream.
                        Some(kind::HEADERS) => {
                            inflater
                                .headers(f.header_block().unwrap_or_default())
                                .map_err(|e| format!("bad SPDY from the client: {e}"))?;
                        }
                        None => {
                            if let Some(ch) = shared.channel(f.stream()) {
                                self.client_data(
                                    ch,
                                    f.body(),
                                    &shared.recorder,
                                    &shared.header_sent,
                                    &shared.stats,
                                );
                            }
                        }
                        _ => {}
                    }
                    out.extend_from_slice(f.raw());
                }
                if !out.is_empty() {
                    if up_w.write_all(&out).await.is_err() {
                        return Err("the API server closed the stream".to_string());
                    }
                    out.clear();
                }
                match client_r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {}
                }
            }
        };
        // What the API server sent on a channel, on its way to the client:
        // recorded, masked (text output), framed again.
        let emit = |ch: u8, sid: u32, flags: u8, raw: Bytes, out: &mut BytesMut| {
            let masked = match (&masker, ch) {
                (Some(m), 1 | 2) => mask_text(m, &raw),
                _ => None,
            };
            self.server_data(
                ch,
                &raw,
                masked.as_ref().map(|(_, c)| c.as_slice()).unwrap_or(&[]),
                &shared.recorder,
                &shared.header_sent,
                &shared.stats,
            );
            if ch == 3 {
                // The exit status is the exec's last word: the recording
                // is complete before kubectl sees it.
                self.flush_recording(&shared.recorder, true);
            }
            let data = masked.as_ref().map(|(t, _)| t.as_bytes()).unwrap_or(&raw);
            let mut chunks = data.chunks(MAX_LENGTH).peekable();
            if chunks.peek().is_none() {
                out.extend_from_slice(Frame::data(sid, flags, &[]).raw());
            }
            while let Some(c) = chunks.next() {
                let last = chunks.peek().is_none();
                let flags = if last { flags } else { flags & !FLAG_FIN };
                out.extend_from_slice(Frame::data(sid, flags, c).raw());
            }
        };
        let flush = |carry: &mut Carry, out: &mut BytesMut| {
            for (ch, data) in carry.flush() {
                if let Some(sid) = shared.stream_of(ch) {
                    emit(ch, sid, 0, Bytes::from(data), out);
                }
            }
        };
        let to_client = async {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut out = BytesMut::with_capacity(64 * 1024);
            let mut carry = Carry::new(masker.is_some(), self.api.tty);
            loop {
                loop {
                    let f = match Frame::decode(&mut buf, max) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => return Err(format!("bad SPDY from the API server: {e}")),
                    };
                    let ch = if f.is_control() {
                        None
                    } else {
                        shared.channel(f.stream())
                    };
                    let sid = f.stream().unwrap_or_default();
                    match ch {
                        Some(ch @ (1 | 2)) => {
                            let data = carry.take(ch, f.body(), f.fin());
                            if !data.is_empty() || f.fin() {
                                emit(ch, sid, f.flags(), Bytes::from(data), &mut out);
                            }
                        }
                        Some(ch) => {
                            // Held output goes before the exit status.
                            flush(&mut carry, &mut out);
                            emit(ch, sid, f.flags(), f.body_bytes(), &mut out);
                        }
                        None => {
                            // Pings and replies pass held output by; what
                            // ends streams does not.
                            if matches!(f.kind(), Some(kind::RST_STREAM | kind::GOAWAY)) {
                                flush(&mut carry, &mut out);
                            }
                            out.extend_from_slice(f.raw());
                        }
                    }
                }
                if !out.is_empty() {
                    if client_w.write_all(&out).await.is_err() || client_w.flush().await.is_err() {
                        return Err("the client went away".to_string());
                    }
                    out.clear();
                }
                tokio::select! {
                    r = up_r.read_buf(&mut buf) => match r {
                        Ok(0) | Err(_) => {
                            flush(&mut carry, &mut out);
                            let _ = client_w.write_all(&out).await;
                            return Ok(());
                        }
                        Ok(_) => {}
                    },
                    _ = carry.due() => flush(&mut carry, &mut out),
                }
            }
        };
        let (error, end_note) = self.drive(to_up, to_client, &shared.recorder).await;
        if let Some(e) = &error {
            tracing::debug!(error = %e, "SPDY exec stream ended");
        }
        if let Some(note) = end_note {
            // The error stream carries why, as a Status kubectl prints.
            if let Some(sid) = shared.stream_of(3) {
                let body = serde_json::json!({"metadata": {}, "status": "Failure",
                    "message": format!("wicket: {note}"), "reason": "Forbidden", "code": 403});
                let f = Frame::data(sid, FLAG_FIN, body.to_string().as_bytes());
                let _ = client_w.write_all(f.raw()).await;
                let _ = client_w.flush().await;
            }
        }
        let _ = client_w.shutdown().await;
        let _ = up_w.shutdown().await;
        self.finish(
            &id,
            started,
            &shared.recorder,
            &shared.stats,
            error,
            end_note,
        );
    }
}
