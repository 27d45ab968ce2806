//! The SPDY/3.1 side of the fake kube-apiserver (framing from
//! [`wicket_spdy`]), for what kubectl ran over SPDY before WebSockets:
//!
//! - exec and attach (kubectl ≤ 1.29, or `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`):
//!   an HTTP/1.1 upgrade to `SPDY/3.1` with `X-Stream-Protocol-Version`
//!   `v4.channel.k8s.io`. kubectl opens one stream per channel, named by
//!   its `streamtype` header (`error`, `stdin`, `stdout`, `stderr`,
//!   `resize`), each a SYN_STREAM it waits to see answered by a SYN_REPLY.
//!   Once every stream the request asked for is open the command runs; at
//!   its end the error stream carries its `Status` (JSON, v4) and the
//!   output streams are half-closed, as the kubelet does.
//! - port-forward: plain (`portforward.k8s.io`, kubectl ≤ 1.30) or tunnelled
//!   in WebSocket binary messages (`SPDY/3.1+portforward.k8s.io`, kubectl
//!   1.31 and later), where the messages, concatenated, are the SPDY byte
//!   stream. For each local connection kubectl opens an `error` stream and a
//!   `data` stream (headers `port` and `requestid`); bytes on the data
//!   stream go to the pod's port, which is the fake's one echo server
//!   whatever the port.

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use wicket_spdy::{Deflater, FLAG_FIN, Frame, Inflater, kind};

use crate::kube::{Exec, Ws};

/// Frames in, frames out, and the task writing them.
struct Session {
    frames: mpsc::Receiver<Frame>,
    out: mpsc::Sender<Frame>,
    writer: tokio::task::JoinHandle<()>,
}

const MAX_FRAME: usize = 1 << 20;

impl Session {
    /// A SPDY session on an upgraded HTTP/1.1 connection.
    fn plain(io: hyper::upgrade::Upgraded) -> Session {
        let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
        let (in_tx, frames) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                while let Ok(Some(f)) = Frame::decode(&mut buf, MAX_FRAME) {
                    if in_tx.send(f).await.is_err() {
                        return;
                    }
                }
                match r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        let (out, mut out_rx) = mpsc::channel::<Frame>(64);
        let writer = tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if w.write_all(f.raw()).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        });
        Session {
            frames,
            out,
            writer,
        }
    }

    /// A SPDY session tunnelled in WebSocket binary messages.
    fn tunnelled(ws: Ws) -> Session {
        let (mut sink, mut source) = ws.split();
        let (in_tx, frames) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            while let Some(Ok(msg)) = source.next().await {
                match msg {
                    Message::Binary(b) => buf.extend_from_slice(&b),
                    Message::Close(_) => break,
                    _ => continue,
                }
                while let Ok(Some(f)) = Frame::decode(&mut buf, MAX_FRAME) {
                    if in_tx.send(f).await.is_err() {
                        return;
                    }
                }
            }
        });
        let (out, mut out_rx) = mpsc::channel::<Frame>(64);
        let writer = tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if sink
                    .send(Message::Binary(f.raw().to_vec().into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        Session {
            frames,
            out,
            writer,
        }
    }

    /// Waits for the writer to flush what was sent.
    async fn finish(self) {
        let Session { out, writer, .. } = self;
        drop(out);
        let _ = writer.await;
    }
}

/// Answers a SYN_STREAM and returns its headers.
async fn accept(
    f: &Frame,
    inflater: &mut Inflater,
    deflater: &mut Deflater,
    out: &mpsc::Sender<Frame>,
) -> Option<(u32, wicket_spdy::Headers)> {
    let id = f.stream()?;
    let headers = inflater.headers(f.header_block()?).ok()?;
    out.send(Frame::syn_reply(id, 0, &deflater.block(&[])))
        .await
        .ok()?;
    Some((id, headers))
}

/// What an exec or attach request asked for.
pub(crate) struct ExecRequest {
    /// The pod's directory.
    pub dir: PathBuf,
    /// The command (`cat` for attach).
    pub command: Vec<String>,
    /// `tty=true`.
    pub tty: bool,
    /// `stdin=true`.
    pub stdin: bool,
    /// `stdout=true`.
    pub stdout: bool,
    /// `stderr=true`.
    pub stderr: bool,
}

/// Serves one exec or attach over plain SPDY (`v4.channel.k8s.io`).
pub(crate) async fn serve_exec(io: hyper::upgrade::Upgraded, req: ExecRequest) {
    let mut s = Session::plain(io);
    let mut inflater = Inflater::new();
    let mut deflater = Deflater::new();
    // The streams kubectl opens for these options, error first.
    let expected = 1
        + usize::from(req.stdin)
        + usize::from(req.stdout)
        + usize::from(req.stderr && !req.tty)
        + usize::from(req.tty);
    let mut streams: HashMap<String, u32> = HashMap::new();
    while streams.len() < expected {
        let Some(f) = s.frames.recv().await else {
            return;
        };
        match f.kind() {
            Some(kind::SYN_STREAM) => {
                let Some((id, h)) = accept(&f, &mut inflater, &mut deflater, &s.out).await else {
                    return;
                };
                let t = h.get("streamtype").unwrap_or_default().to_string();
                streams.insert(t, id);
            }
            Some(kind::PING) => {
                let _ = s.out.send(f).await;
            }
            _ => {}
        }
    }
    let (Some(&error), stdout, stderr) = (
        streams.get("error"),
        streams.get("stdout").copied(),
        streams.get("stderr").copied(),
    ) else {
        return;
    };
    let stdin = streams.get("stdin").copied();
    let status =
        |v: &serde_json::Value| Frame::data(error, FLAG_FIN, &serde_json::to_vec(v).expect("json"));
    let mut exec = match Exec::spawn(&req.dir, &req.command, req.tty) {
        Ok(e) => e,
        Err(v) => {
            let _ = s.out.send(status(&v)).await;
            s.finish().await;
            return;
        }
    };
    let mut child_in = exec.stdin.take().filter(|_| stdin.is_some());
    let out = s.out.clone();
    let mut frames = std::mem::replace(&mut s.frames, mpsc::channel(1).1);
    let input = async {
        while let Some(f) = frames.recv().await {
            match f.kind() {
                None if f.stream() == stdin => {
                    if let Some(w) = child_in.as_mut()
                        && w.write_all(f.body()).await.is_err()
                    {
                        child_in = None;
                    }
                    if f.fin() {
                        child_in = None;
                    }
                }
                Some(kind::PING) => {
                    let _ = out.send(f).await;
                }
                Some(kind::RST_STREAM) if f.stream() == stdin => child_in = None,
                Some(kind::GOAWAY) => break,
                _ => {}
            }
        }
        child_in = None;
        std::future::pending::<()>().await;
    };
    let output = async {
        while let Some((ch, data)) = exec.out.recv().await {
            let Some(id) = (if ch == 2 { stderr } else { stdout }) else {
                continue;
            };
            if s.out.send(Frame::data(id, 0, &data)).await.is_err() {
                return;
            }
        }
        let v = exec.status().await;
        let _ = s.out.send(status(&v)).await;
        for id in [stdout, stderr].into_iter().flatten() {
            let _ = s.out.send(Frame::data(id, FLAG_FIN, &[])).await;
        }
    };
    tokio::select! {
        _ = input => {}
        _ = output => {}
    }
    s.finish().await;
}

/// Serves one plain SPDY port-forward connection (`portforward.k8s.io`).
pub(crate) async fn serve_plain_port_forward(
    io: hyper::upgrade::Upgraded,
    target: std::net::SocketAddr,
) {
    port_forward(Session::plain(io), target).await;
}

/// Serves one tunnelled port-forward connection, every data stream to `target`.
pub async fn serve_port_forward(ws: Ws, target: std::net::SocketAddr) {
    port_forward(Session::tunnelled(ws), target).await;
}

async fn port_forward(mut s: Session, target: std::net::SocketAddr) {
    let mut inflater = Inflater::new();
    let mut deflater = Deflater::new();
    // requestid → the error stream of that forwarded connection.
    let mut errors: HashMap<String, u32> = HashMap::new();
    let mut targets: HashMap<u32, tokio::net::tcp::OwnedWriteHalf> = HashMap::new();
    while let Some(f) = s.frames.recv().await {
        match f.kind() {
            None => {
                let Some(stream) = f.stream() else { continue };
                if let Some(w) = targets.get_mut(&stream)
                    && w.write_all(f.body()).await.is_err()
                {
                    targets.remove(&stream);
                }
                if f.fin()
                    && let Some(mut w) = targets.remove(&stream)
                {
                    let _ = w.shutdown().await;
                }
            }
            Some(kind::SYN_STREAM) => {
                let Some((stream, h)) = accept(&f, &mut inflater, &mut deflater, &s.out).await
                else {
                    break;
                };
                let request = h.get("requestid").unwrap_or_default().to_string();
                if h.get("streamtype") == Some("error") {
                    errors.insert(request, stream);
                    continue;
                }
                let Some(err_stream) = errors.remove(&request) else {
                    continue;
                };
                let tx = s.out.clone();
                match tokio::net::TcpStream::connect(target).await {
                    Ok(tcp) => {
                        let (mut r, w) = tcp.into_split();
                        targets.insert(stream, w);
                        tokio::spawn(async move {
                            let mut b = vec![0u8; 32 * 1024];
                            loop {
                                match r.read(&mut b).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if tx.send(Frame::data(stream, 0, &b[..n])).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                            }
                            let _ = tx.send(Frame::data(stream, FLAG_FIN, &[])).await;
                            let _ = tx.send(Frame::data(err_stream, FLAG_FIN, &[])).await;
                        });
                    }
                    Err(e) => {
                        let msg = format!("error forwarding to {target}: {e}");
                        let _ = tx.send(Frame::data(err_stream, 0, msg.as_bytes())).await;
                        let _ = tx.send(Frame::data(err_stream, FLAG_FIN, &[])).await;
                        let _ = tx.send(Frame::data(stream, FLAG_FIN, &[])).await;
                    }
                }
            }
            Some(kind::PING) if s.out.send(f.clone()).await.is_err() => break,
            Some(kind::RST_STREAM) => {
                if let Some(stream) = f.stream() {
                    targets.remove(&stream);
                }
            }
            Some(kind::GOAWAY) => break,
            _ => {}
        }
    }
    // Closing the pod-side connections ends their readers, which hold
    // senders of the output; only then can the writer finish.
    drop(targets);
    s.finish().await;
}
