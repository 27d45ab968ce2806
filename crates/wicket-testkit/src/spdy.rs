//! Just enough SPDY/3.1 (the framing of draft-mbelshe-httpbis-spdy-00,
//! section 2) to serve kubectl's port-forward in the fake kube-apiserver.
//!
//! kubectl 1.31 and later tunnel port-forward's SPDY connection in
//! WebSocket binary messages (subprotocol `SPDY/3.1+portforward.k8s.io`):
//! the messages, concatenated, are the SPDY byte stream. For each local
//! connection kubectl opens an error stream, then a data stream (each a
//! SYN_STREAM it waits to see answered by a SYN_REPLY); bytes on the data
//! stream go to the pod's port.
//!
//! Header blocks are zlib streams compressed with the SPDY dictionary. The
//! fake never reads the client's (the error stream comes first), so it does
//! not know which port was asked for: every pod port is the fake's one echo
//! server. It answers with empty header blocks compressed without the
//! dictionary, which a zlib reader set up with the dictionary accepts (the
//! dictionary is only consulted when a stream says it used one).

use std::collections::HashMap;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::kube::Ws;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;

fn control(kind: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80, 0x03];
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(data);
    f
}

fn data_frame(stream: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut f = (stream & 0x7fff_ffff).to_be_bytes().to_vec();
    f.push(flags);
    f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(data);
    f
}

/// The server's header compressor: one zlib stream for the connection.
struct Headers(flate2::Compress);

impl Headers {
    /// An empty header block, as the next piece of the zlib stream.
    fn empty(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        let _ = self
            .0
            .compress_vec(&[0, 0, 0, 0], &mut out, flate2::FlushCompress::Sync);
        out
    }
}

/// Serves one tunnelled port-forward connection, every data stream to `target`.
pub async fn serve_port_forward(ws: Ws, target: std::net::SocketAddr) {
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if sink.send(Message::Binary(b.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut headers = Headers(flate2::Compress::new(flate2::Compression::fast(), true));
    let mut buf: Vec<u8> = Vec::new();
    let mut error_stream: Option<u32> = None;
    let mut targets: HashMap<u32, tokio::net::tcp::OwnedWriteHalf> = HashMap::new();
    'read: while let Some(Ok(msg)) = source.next().await {
        match msg {
            Message::Binary(b) => buf.extend_from_slice(&b),
            Message::Close(_) => break,
            _ => continue,
        }
        while buf.len() >= 8 {
            let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
            if buf.len() < 8 + len {
                break;
            }
            let frame: Vec<u8> = buf.drain(..8 + len).collect();
            let (head, body) = frame.split_at(8);
            if head[0] & 0x80 == 0 {
                let stream = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                let fin = head[4] & FLAG_FIN != 0;
                if let Some(w) = targets.get_mut(&stream)
                    && w.write_all(body).await.is_err()
                {
                    targets.remove(&stream);
                }
                if fin && let Some(mut w) = targets.remove(&stream) {
                    let _ = w.shutdown().await;
                }
                continue;
            }
            match u16::from_be_bytes([head[2], head[3]]) {
                SYN_STREAM if body.len() >= 4 => {
                    let stream =
                        u32::from_be_bytes([body[0], body[1], body[2], body[3]]) & 0x7fff_ffff;
                    let mut reply = stream.to_be_bytes().to_vec();
                    reply.extend_from_slice(&headers.empty());
                    if tx.send(control(SYN_REPLY, 0, &reply)).await.is_err() {
                        break 'read;
                    }
                    let Some(err_stream) = error_stream.take() else {
                        error_stream = Some(stream);
                        continue;
                    };
                    match tokio::net::TcpStream::connect(target).await {
                        Ok(tcp) => {
                            let (mut r, w) = tcp.into_split();
                            targets.insert(stream, w);
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                let mut b = vec![0u8; 32 * 1024];
                                loop {
                                    match r.read(&mut b).await {
                                        Ok(0) | Err(_) => break,
                                        Ok(n) => {
                                            if tx
                                                .send(data_frame(stream, 0, &b[..n]))
                                                .await
                                                .is_err()
                                            {
                                                return;
                                            }
                                        }
                                    }
                                }
                                let _ = tx.send(data_frame(stream, FLAG_FIN, &[])).await;
                                let _ = tx.send(data_frame(err_stream, FLAG_FIN, &[])).await;
                            });
                        }
                        Err(e) => {
                            let msg = format!("error forwarding to {target}: {e}");
                            let _ = tx.send(data_frame(err_stream, 0, msg.as_bytes())).await;
                            let _ = tx.send(data_frame(err_stream, FLAG_FIN, &[])).await;
                            let _ = tx.send(data_frame(stream, FLAG_FIN, &[])).await;
                        }
                    }
                }
                PING if tx.send(frame.clone()).await.is_err() => break 'read,
                RST_STREAM if body.len() >= 4 => {
                    let stream =
                        u32::from_be_bytes([body[0], body[1], body[2], body[3]]) & 0x7fff_ffff;
                    targets.remove(&stream);
                }
                GOAWAY => break 'read,
                _ => {}
            }
        }
    }
    // Closing the pod-side connections ends their readers, which hold
    // senders of `tx`; only then can the writer finish.
    drop(targets);
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_laid_out_as_spdy_3() {
        let f = control(SYN_REPLY, 0, &[0, 0, 0, 5]);
        assert_eq!(f, [0x80, 3, 0, 2, 0, 0, 0, 4, 0, 0, 0, 5]);
        let d = data_frame(5, FLAG_FIN, b"hi");
        assert_eq!(d, [0, 0, 0, 5, 1, 0, 0, 2, b'h', b'i']);
        let mut h = Headers(flate2::Compress::new(flate2::Compression::fast(), true));
        let first = h.empty();
        let second = h.empty();
        // One zlib stream: the header (0x78 …) only once, each block flushed.
        assert_eq!(first[0], 0x78);
        assert_ne!(second[0], 0x78);
        let mut d = flate2::Decompress::new(true);
        let mut out = Vec::with_capacity(16);
        d.decompress_vec(
            &[first, second].concat(),
            &mut out,
            flate2::FlushDecompress::Sync,
        )
        .unwrap();
        assert_eq!(out, [0u8; 8]);
    }
}
