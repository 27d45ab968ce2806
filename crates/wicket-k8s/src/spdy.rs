//! exec, attach and port-forward over SPDY/3.1, as kubectl before
//! WebSockets (1.29 and older for exec and attach, 1.30 and older for
//! port-forward, or any kubectl with `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`)
//! speaks them.
//!
//! exec and attach are accepted at once, with the best stream protocol the
//! client offers (`v4.channel.k8s.io` first). While the request is decided
//! the gate answers the client's stream openings itself (SYN_REPLY on its
//! own header stream) and keeps what the client sends, so a hold can say
//! it waits (on stderr, or stdout with a terminal) and a refusal arrives
//! as the exec's failure status on the error stream, once every stream is
//! open. When allowed, the gate makes the same upgrade to the API server
//! with that protocol, replays the client's frames from the start, and
//! relays. The API server's header blocks are inflated and compressed
//! again into the gate's header stream (the client already reads that
//! one), and its answers to the streams the gate answered are dropped.
//!
//! The relay reads frames on their way: the client's SYN_STREAM header
//! blocks (one zlib stream per direction, see [`wicket_spdy`]) say which
//! stream is stdin, stdout, stderr, error or resize, so the session is
//! recorded and masked exactly as over WebSocket (the channel numbers are
//! the same). Text output is masked on its way to the client by rewriting
//! its DATA frame; kubectl's SPDY library (spdystream) does no flow
//! control, so a frame that changes length upsets no window.
//!
//! port-forward is decided before anything is upgraded (a refusal is a
//! plain `Status` 403), and its streams carry arbitrary TCP: they are
//! relayed as they are, and read on their way ([`crate::forward`]) so what
//! the forwarded connections carry is recorded.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wicket_core::Effect;
use wicket_sidecar::recording::Recorder;
use wicket_sidecar::{CallerTrace, LiveSession};
use wicket_spdy::{Deflater, FLAG_FIN, Frame, Inflater, MAX_LENGTH, kind};

use crate::classify::ApiRequest;
use crate::exec::{
    Carry, ClientIo, ClientRead, Halves, STATUS_BEFORE_CLOSE, Stats, Stream, Via, failure_status,
    mask_text, offered,
};
use crate::forward::Framing;
use crate::gate::{Body, KubeGate, denial_message, forbidden, forwardable, status};

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
    if api.kind() != "port_forward" {
        return accept_exec(gate, live, api, trace, req, &offered, details).await;
    }
    let (d, id) = gate
        .decide(&live, &api, &trace, &details, |_: &str| {})
        .await;
    if d.effect != Effect::Allow {
        return forbidden(&d);
    }
    let started = Instant::now();
    let Some(mut s) = stream(gate.clone(), live.clone(), api, trace, &req) else {
        gate.result(&live, &id, &[("error", "no upstream request".into())], &[]);
        return no_upstream_request();
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
        let (client_r, client_w) = tokio::io::split(hyper_util::rt::TokioIo::new(client));
        let (up_r, up_w) = tokio::io::split(upstream);
        s.opaque(
            id,
            started,
            Framing::Spdy,
            (ClientRead::new(client_r), client_w),
            (up_r, up_w),
        )
        .await;
    });
    switching(&agreed)
}

/// The answer when the upstream request cannot be built (logged).
fn no_upstream_request() -> Response<Body> {
    status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        "wicket: cannot build the upstream request",
    )
}

/// The 101 answer to a SPDY upgrade.
fn switching(protocol: &str) -> Response<Body> {
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "SPDY/3.1");
    if !protocol.is_empty() {
        resp = resp.header("x-stream-protocol-version", protocol);
    }
    resp.body(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    )
    .expect("static response")
}

/// The relay's state for a request, with the upstream request's headers
/// (credential and impersonation) set.
fn stream(
    gate: Arc<KubeGate>,
    live: Arc<LiveSession>,
    api: ApiRequest,
    trace: CallerTrace,
    req: &Request<Incoming>,
) -> Option<Stream> {
    let mut headers = forwardable(req.headers());
    if let Err(e) = gate.upstream_headers(&live, &mut headers) {
        tracing::error!(error = %e, "cannot build the upstream request");
        return None;
    }
    Some(Stream {
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
    })
}

/// Stream protocols of exec and attach the gate agrees to, best first (v4
/// carries the exit status as JSON).
const EXEC_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// How much of the client's stream the gate keeps while a decision is
/// pending (stdin typed during a hold); past it, the client waits.
const MAX_OPENING: usize = 1 << 20;

/// Accepts a SPDY exec or attach at once, answering the client's stream
/// openings itself, so a hold can say it waits (on stderr, or stdout with
/// a terminal) and a refusal arrives as the exec's failure status; once
/// allowed, the gate upgrades to the API server with the same protocol,
/// replays what the client sent, and relays.
async fn accept_exec(
    gate: Arc<KubeGate>,
    live: Arc<LiveSession>,
    api: ApiRequest,
    trace: CallerTrace,
    mut req: Request<Incoming>,
    offered: &[String],
    details: [(&'static str, String); 1],
) -> Response<Body> {
    let Some(proto) = EXEC_PROTOCOLS
        .iter()
        .find(|p| offered.iter().any(|o| o == *p))
    else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!(
                "wicket: none of the offered stream protocols ({}) is relayed; this gate speaks {}",
                offered.join(", "),
                EXEC_PROTOCOLS.join(", ")
            ),
        );
    };
    let Some(mut s) = stream(gate, live, api, trace, &req) else {
        return no_upstream_request();
    };
    s.proto = proto.to_string();
    s.headers.insert(
        "x-stream-protocol-version",
        hyper::header::HeaderValue::from_static(proto),
    );
    // The streams kubectl opens for this request, error first.
    let flag = |name: &str| {
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .any(|(k, v)| k == name && matches!(v.as_ref(), "true" | "1"))
    };
    let tty = flag("tty");
    let expected = 1
        + usize::from(flag("stdin"))
        + usize::from(flag("stdout"))
        + usize::from(flag("stderr") && !tty)
        + usize::from(tty && *proto != "v2.channel.k8s.io" && *proto != "channel.k8s.io");
    let on_client = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(client) = on_client.await else {
            return;
        };
        let (client_r, client_w) = tokio::io::split(hyper_util::rt::TokioIo::new(client));
        s.open_exec(details, expected, (client_r, client_w)).await;
    });
    switching(proto)
}

/// The client's side of a SPDY exec while the API server is not reached
/// yet: the gate answers its stream openings and keeps what it sends.
struct Opening {
    /// Client bytes not yet taken as frames.
    buf: BytesMut,
    /// Every frame the client sent (but pings), for the API server.
    replay: BytesMut,
    inflater: Inflater,
    /// The gate's header stream to the client, used on for the relay.
    deflater: Deflater,
    streams: HashMap<u32, u8>,
    /// Streams the gate answered itself.
    replied: HashSet<u32>,
}

impl Opening {
    /// Takes the whole frames in `buf`: answers SYN_STREAMs and pings, and
    /// keeps the rest for the API server. Returns what to send the client.
    fn absorb(&mut self, max: usize) -> Result<BytesMut, String> {
        let mut out = BytesMut::new();
        while let Some(f) = Frame::decode(&mut self.buf, max)
            .map_err(|e| format!("bad SPDY from the client: {e}"))?
        {
            match f.kind() {
                Some(kind::SYN_STREAM) => {
                    let h = self
                        .inflater
                        .headers(f.header_block().unwrap_or_default())
                        .map_err(|e| format!("bad SPDY from the client: {e}"))?;
                    if let Some(sid) = f.stream() {
                        if let Some(ch) = h.get("streamtype").and_then(channel) {
                            self.streams.insert(sid, ch);
                        }
                        self.replied.insert(sid);
                        out.extend_from_slice(
                            Frame::syn_reply(sid, 0, &self.deflater.block(&[])).raw(),
                        );
                    }
                }
                Some(kind::HEADERS) => {
                    self.inflater
                        .headers(f.header_block().unwrap_or_default())
                        .map_err(|e| format!("bad SPDY from the client: {e}"))?;
                }
                Some(kind::PING) => {
                    out.extend_from_slice(f.raw());
                    continue;
                }
                _ => {}
            }
            self.replay.extend_from_slice(f.raw());
        }
        Ok(out)
    }

    /// The stream carrying `channel`, once the client opened it.
    fn stream_of(&self, channel: u8) -> Option<u32> {
        stream_of(&self.streams, channel)
    }
}

/// The stream carrying `channel` in a map of stream id → channel.
fn stream_of(streams: &HashMap<u32, u8>, channel: u8) -> Option<u32> {
    streams
        .iter()
        .find(|(_, c)| **c == channel)
        .map(|(id, _)| *id)
}

/// The last frame of the error stream `sid`: a `Status` failure.
fn failure(sid: u32, reason: &str, message: &str, code: u16) -> Frame {
    Frame::data(
        sid,
        FLAG_FIN,
        failure_status(reason, message, code).as_bytes(),
    )
}

/// What the gate did on the client's side before the relay.
struct Opened {
    /// The client's frames so far (then any partial one), for the API server.
    initial: BytesMut,
    /// The gate's header stream to the client.
    deflater: Deflater,
    /// Streams the gate answered itself (the API server's answers are dropped).
    replied: HashSet<u32>,
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
        stream_of(&self.streams.lock().expect("streams"), channel)
    }

    fn channel(&self, stream: Option<u32>) -> Option<u8> {
        let id = stream?;
        self.streams.lock().expect("streams").get(&id).copied()
    }
}

/// Writes a `Status` to the client on the error stream, half-closes the
/// output streams, and closes the connection after [`STATUS_BEFORE_CLOSE`]
/// (kubectl prints the status).
async fn fail(
    o: &Opening,
    w: &mut tokio::io::WriteHalf<ClientIo>,
    reason: &str,
    message: &str,
    code: u16,
) {
    let mut out = BytesMut::new();
    if let Some(sid) = o.stream_of(3) {
        out.extend_from_slice(failure(sid, reason, message, code).raw());
    }
    for ch in [1, 2] {
        if let Some(sid) = o.stream_of(ch) {
            out.extend_from_slice(Frame::data(sid, FLAG_FIN, &[]).raw());
        }
    }
    let _ = w.write_all(&out).await;
    let _ = w.flush().await;
    tokio::time::sleep(STATUS_BEFORE_CLOSE).await;
    let _ = w.shutdown().await;
}

impl Stream {
    /// Decides an accepted SPDY exec while answering the client's stream
    /// openings; then refuses it on the error stream, or relays it.
    async fn open_exec(
        self,
        details: [(&'static str, String); 1],
        expected: usize,
        client: Halves,
    ) {
        let (mut client_r, mut client_w) = client;
        let max = self.gate.cfg.max_frame_bytes.min(MAX_LENGTH);
        let mut o = Opening {
            buf: BytesMut::with_capacity(16 * 1024),
            replay: BytesMut::new(),
            inflater: Inflater::new(),
            deflater: Deflater::new(),
            streams: HashMap::new(),
            replied: HashSet::new(),
        };
        let (note_tx, mut note_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let decide = self.gate.decide(
            &self.live,
            &self.api,
            &self.trace,
            &details,
            move |id: &str| {
                let _ = note_tx.send(id.to_string());
            },
        );
        tokio::pin!(decide);
        let note_ch = if self.api.tty { 1 } else { 2 };
        let mut notes: Vec<String> = Vec::new();
        // Why the client can no longer be read, if it cannot.
        let mut stopped: Option<String> = None;
        let (d, id) = loop {
            tokio::select! {
                // The note first: a quick approval must not overtake it.
                biased;
                Some(approval) = note_rx.recv() => notes.push(approval),
                r = &mut decide => break r,
                r = client_r.read_buf(&mut o.buf),
                    if stopped.is_none() && o.replay.len() < MAX_OPENING => match r {
                    // Gone while held: the hold is dropped here (recorded as
                    // refused, the approval withdrawn), never run for nobody.
                    Ok(0) | Err(_) => return,
                    Ok(_) => match o.absorb(max) {
                        Ok(out) => {
                            if !out.is_empty() && client_w.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => stopped = Some(e),
                    },
                },
            }
            if let Some(sid) = o.stream_of(note_ch) {
                for approval in notes.drain(..) {
                    let msg = format!(
                        "wicket: waiting for approval {approval}; an approver can allow or deny it\r\n"
                    );
                    let _ = client_w
                        .write_all(Frame::data(sid, 0, msg.as_bytes()).raw())
                        .await;
                }
            }
        };
        // A refusal goes on the error stream once kubectl has opened all
        // its streams (it waits for each to be answered, and reports a
        // timeout rather than the status while one is not).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stopped.is_none() && d.effect != Effect::Allow && o.streams.len() < expected {
            match tokio::time::timeout_at(deadline, client_r.read_buf(&mut o.buf)).await {
                Ok(Ok(n)) if n > 0 => match o.absorb(max) {
                    Ok(out) => {
                        let _ = client_w.write_all(&out).await;
                    }
                    Err(e) => stopped = Some(e),
                },
                _ => break,
            }
        }
        if let Some(why) = stopped {
            self.gate.result(&self.live, &id, &[("error", why)], &[]);
            let _ = client_w.shutdown().await;
            return;
        }
        if d.effect != Effect::Allow {
            fail(&o, &mut client_w, "Forbidden", &denial_message(&d), 403).await;
            return;
        }
        let started = Instant::now();
        let upstream = match self.connect(Via::Spdy).await {
            Ok((u, _)) => u,
            Err(msg) => {
                tracing::warn!(error = %msg, "SPDY upstream failed");
                fail(
                    &o,
                    &mut client_w,
                    "InternalError",
                    &format!("wicket: {msg}"),
                    502,
                )
                .await;
                self.gate.result(&self.live, &id, &[("error", msg)], &[]);
                return;
            }
        };
        let (up_r, up_w) = tokio::io::split(upstream);
        // The API server sees the client's frames from the start (its
        // header blocks are one zlib stream); the relay reads them again.
        let mut initial = std::mem::take(&mut o.replay);
        initial.extend_from_slice(&o.buf);
        let opened = Opened {
            initial,
            deflater: o.deflater,
            replied: o.replied,
        };
        self.relay_spdy(id, started, (client_r, client_w), (up_r, up_w), opened)
            .await;
    }

    /// Relays an exec or attach SPDY connection, recording and masking.
    async fn relay_spdy(
        &self,
        id: String,
        started: Instant,
        client: Halves,
        up: Halves,
        opened: Opened,
    ) {
        let ((mut client_r, mut client_w), (mut up_r, mut up_w)) = (client, up);
        let Opened {
            initial,
            mut deflater,
            replied,
        } = opened;
        let masker = self.gate.masker();
        let shared = Shared {
            streams: Mutex::new(HashMap::new()),
            recorder: Mutex::new(self.gate.recorder(masker.clone())),
            header_sent: AtomicBool::new(false),
            stats: Mutex::new(Stats::default()),
        };
        let max = self.gate.cfg.max_frame_bytes.min(MAX_LENGTH);
        let to_up = async {
            let mut inflater = Inflater::new();
            let mut buf = initial;
            buf.reserve(64 * 1024);
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
        // recorded, masked (text output), and framed again unless it is
        // `original`'s data unchanged.
        let emit = |ch: u8,
                    sid: u32,
                    flags: u8,
                    raw: Bytes,
                    original: Option<&Frame>,
                    out: &mut BytesMut| {
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
            if let (None, Some(f)) = (&masked, original) {
                out.extend_from_slice(f.raw());
                return;
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
                    emit(ch, sid, 0, Bytes::from(data), None, out);
                }
            }
        };
        let to_client = async {
            let mut up_inflater = Inflater::new();
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
                        Some(ch @ (1 | 2)) => match carry.take(ch, &f.body_bytes(), f.fin()) {
                            None => emit(ch, sid, f.flags(), f.body_bytes(), Some(&f), &mut out),
                            Some(pieces) if pieces.is_empty() => {
                                if f.fin() {
                                    emit(ch, sid, f.flags(), Bytes::new(), None, &mut out)
                                }
                            }
                            Some(mut pieces) => {
                                // One DATA frame still (frames are copied
                                // into `out` anyway): kubectl writes each
                                // one to its stdout on its own.
                                let data = if pieces.len() == 1 {
                                    pieces.remove(0)
                                } else {
                                    Bytes::from(pieces.concat())
                                };
                                emit(ch, sid, f.flags(), data, None, &mut out);
                            }
                        },
                        Some(ch) => {
                            // Held output goes before the exit status.
                            flush(&mut carry, &mut out);
                            emit(ch, sid, f.flags(), f.body_bytes(), Some(&f), &mut out);
                        }
                        None => {
                            // Pings and replies pass held output by; what
                            // ends streams does not.
                            if matches!(f.kind(), Some(kind::RST_STREAM | kind::GOAWAY)) {
                                flush(&mut carry, &mut out);
                            }
                            let (Some(k), Some(block)) = (f.kind(), f.header_block()) else {
                                out.extend_from_slice(f.raw());
                                continue;
                            };
                            // The client reads the gate's header stream: the
                            // API server's blocks are inflated (all of them,
                            // in order) and compressed again, and its answers
                            // to streams the gate answered are dropped.
                            let h = up_inflater
                                .headers(block)
                                .map_err(|e| format!("bad SPDY from the API server: {e}"))?;
                            if k == kind::SYN_REPLY
                                && f.stream().is_some_and(|s| replied.contains(&s))
                            {
                                continue;
                            }
                            let pairs: Vec<(&str, &str)> =
                                h.0.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                            let body = f.body();
                            let mut again = body[..body.len() - block.len()].to_vec();
                            again.extend_from_slice(&deflater.block(&pairs));
                            out.extend_from_slice(Frame::control(k, f.flags(), &again).raw());
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
                let f = failure(sid, "Forbidden", &format!("wicket: {note}"), 403);
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
