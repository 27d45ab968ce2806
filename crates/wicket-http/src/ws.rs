//! WebSocket relay with masking: what the upstream sends is read frame by
//! frame, and each text message (and each binary message that is UTF-8
//! text without NUL bytes) is masked whole, like a response body: JSON by
//! the field rules and the detectors, anything else by the detectors. What
//! the client sends goes upstream as it is.
//!
//! Compressed frames could not be read, so when it masks the gate does not
//! offer the client's `Sec-WebSocket-Extensions` upstream, and refuses an
//! upstream that answers with one anyway. A message over [`MAX_MESSAGE`]
//! is not relayed: the client is told why (close code 1009) and the
//! connection ends, since it could not be masked.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wicket_sidecar::websocket::{self as ws, Frame, Opcode, Sender};

use crate::mask::{Plan, Tally};

/// The largest message masked (a fragmented message is held whole first).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// How a masked relay ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes from the client.
    pub bytes_in: u64,
    /// Bytes from the upstream.
    pub bytes_out: u64,
    /// Values masked, by detector or field rule.
    pub tally: Tally,
    /// Why it ended early, if it did.
    pub error: Option<String>,
}

/// Relays `client` ⇄ `upstream` until either side closes, masking the
/// upstream's messages with `plan`.
pub async fn relay_masked<C, U>(client: C, upstream: U, plan: Arc<Plan>) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let to_up = async {
        let n = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
        n.unwrap_or(0)
    };
    let to_client = async {
        let mut out = Relayed::default();
        let mut buf = BytesMut::with_capacity(16 * 1024);
        // The message being reassembled: its opcode and what came so far.
        let mut message: Option<(Opcode, BytesMut)> = None;
        loop {
            let frame = match ws::decode(&mut buf, Sender::Server, MAX_MESSAGE) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    buf.reserve(16 * 1024);
                    match ur.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            out.bytes_out += n as u64;
                            continue;
                        }
                    }
                }
                Err(e) => {
                    let why = format!("bad frame from the upstream: {e}");
                    refuse(&mut cw, &mut out, 1002, why).await;
                    break;
                }
            };
            // A protocol error: its close code and what went wrong.
            let bad = |why: &str| Err((1002, why.to_string()));
            let send = match frame.opcode {
                // Control frames may come between a message's fragments.
                op if op.is_control() => Ok(Some(frame)),
                Opcode::Text | Opcode::Binary if message.is_some() => {
                    bad("a new message inside a fragmented one")
                }
                Opcode::Text | Opcode::Binary if frame.fin => Ok(Some(mask_message(
                    &plan,
                    frame.opcode,
                    frame.payload,
                    &mut out.tally,
                ))),
                Opcode::Text | Opcode::Binary => {
                    message = Some((frame.opcode, BytesMut::from(&frame.payload[..])));
                    Ok(None)
                }
                _ => match message.as_mut() {
                    Some((_, held)) if held.len() + frame.payload.len() > MAX_MESSAGE => Err((
                        1009,
                        format!("a message over {MAX_MESSAGE} bytes cannot be masked"),
                    )),
                    Some((_, held)) => {
                        held.extend_from_slice(&frame.payload);
                        if frame.fin {
                            let (op, held) = message.take().expect("a message is held");
                            Ok(Some(mask_message(&plan, op, held.freeze(), &mut out.tally)))
                        } else {
                            Ok(None)
                        }
                    }
                    None => bad("a continuation frame outside a message"),
                },
            };
            let send = match send {
                Ok(send) => send,
                Err((code, why)) => {
                    refuse(&mut cw, &mut out, code, why).await;
                    break;
                }
            };
            if let Some(f) = send {
                let closing = f.opcode == Opcode::Close;
                let mut bytes = BytesMut::with_capacity(f.payload.len() + 14);
                ws::encode(&f, None, &mut bytes);
                if cw.write_all(&bytes).await.is_err() || cw.flush().await.is_err() {
                    break;
                }
                if closing {
                    break;
                }
            }
        }
        let _ = cw.shutdown().await;
        out
    };
    let (bytes_in, mut out) = tokio::join!(to_up, to_client);
    out.bytes_in = bytes_in;
    out
}

/// A whole message, masked when it is text.
fn mask_message(plan: &Plan, opcode: Opcode, payload: Bytes, tally: &mut Tally) -> Frame {
    let text = !payload.contains(&0) && std::str::from_utf8(&payload).is_ok();
    let payload = if text {
        Bytes::from(plan.mask_message(&payload, tally))
    } else {
        payload
    };
    Frame {
        fin: true,
        opcode,
        payload,
    }
}

/// Ends the client's side on an upstream the gate cannot relay masked:
/// a close frame with `code` and a reason, and `why` in the result.
async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, out: &mut Relayed, code: u16, why: String) {
    let reason = if code == 1009 {
        "wicket: message too large to mask"
    } else {
        "wicket: bad frame from the upstream"
    };
    let _ = close(w, code, reason).await;
    out.error = Some(why);
}

async fn close<W: AsyncWrite + Unpin>(w: &mut W, code: u16, reason: &str) -> std::io::Result<()> {
    let mut bytes = BytesMut::new();
    ws::encode(&Frame::close(code, reason), None, &mut bytes);
    w.write_all(&bytes).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        ws::encode(
            &Frame {
                fin,
                opcode,
                payload: Bytes::copy_from_slice(payload),
            },
            None,
            &mut b,
        );
        b.to_vec()
    }

    /// Runs the relay with every detector on; the upstream sends `from_up`
    /// and closes. Returns the frames the client got, and the relay's report.
    async fn relay(from_up: Vec<u8>) -> (Vec<Frame>, Relayed) {
        let (client, gate_client) = tokio::io::duplex(1 << 20);
        let (gate_up, upstream) = tokio::io::duplex(1 << 20);
        let plan = Arc::new(Plan::mask_everything(b"k"));
        let relay = tokio::spawn(relay_masked(gate_client, gate_up, plan));
        let (mut ur, mut uw) = tokio::io::split(upstream);
        // Written by a task of its own: the relay may stop reading early.
        let writer = tokio::spawn(async move {
            let _ = uw.write_all(&from_up).await;
            uw
        });
        let (mut cr, mut cw) = tokio::io::split(client);
        // What the client sends goes up untouched.
        let mut hello = BytesMut::new();
        ws::encode(
            &Frame {
                fin: true,
                opcode: Opcode::Text,
                payload: Bytes::from_static(b"card 4111 1111 1111 1111"),
            },
            Some([1, 2, 3, 4]),
            &mut hello,
        );
        cw.write_all(&hello).await.unwrap();
        let mut got_up = vec![0u8; hello.len()];
        ur.read_exact(&mut got_up).await.unwrap();
        assert_eq!(got_up, hello.to_vec());
        let mut raw = Vec::new();
        cr.read_to_end(&mut raw).await.unwrap();
        // The client goes away: the relay's other direction ends too.
        drop((cr, cw));
        let report = relay.await.unwrap();
        writer.abort();
        let mut buf = BytesMut::from(&raw[..]);
        let mut frames = Vec::new();
        while let Some(f) = ws::decode(&mut buf, Sender::Server, MAX_MESSAGE).unwrap() {
            frames.push(f);
        }
        assert!(buf.is_empty());
        (frames, report)
    }

    #[tokio::test]
    async fn text_messages_are_masked_whole_and_the_rest_passes() {
        let mut up = Vec::new();
        // A card number split across two fragments, a ping between them.
        up.extend(frame(false, Opcode::Text, b"card 4111 1111 "));
        up.extend(frame(true, Opcode::Ping, b"p"));
        up.extend(frame(
            true,
            Opcode::Continuation,
            b"1111 1111, mail ann@example.com",
        ));
        up.extend(frame(true, Opcode::Binary, &[0xff, 0, 1, 2]));
        up.extend(frame(true, Opcode::Binary, b"{\"ssn\": \"123-45-6789\"}"));
        up.extend(frame(true, Opcode::Close, &[3, 232]));
        let (frames, report) = relay(up).await;
        let ops: Vec<Opcode> = frames.iter().map(|f| f.opcode).collect();
        assert_eq!(
            ops,
            [
                Opcode::Ping,
                Opcode::Text,
                Opcode::Binary,
                Opcode::Binary,
                Opcode::Close
            ]
        );
        assert!(frames.iter().all(|f| f.fin));
        let text = std::str::from_utf8(&frames[1].payload).unwrap();
        assert!(!text.contains("4111"), "{text}");
        assert!(!text.contains("ann@example.com"), "{text}");
        assert!(text.starts_with("card "), "{text}");
        assert_eq!(
            &frames[2].payload[..],
            &[0xff, 0, 1, 2],
            "binary data intact"
        );
        let json = std::str::from_utf8(&frames[3].payload).unwrap();
        assert!(!json.contains("123-45-6789"), "{json}");
        assert_eq!(report.tally.get("card"), Some(&1));
        assert_eq!(report.tally.get("email"), Some(&1));
        assert_eq!(report.tally.get("ssn"), Some(&1));
        assert_eq!(report.error, None);
        assert!(report.bytes_in > 0 && report.bytes_out > 0);
    }

    #[tokio::test]
    async fn a_message_too_large_to_mask_ends_the_connection() {
        let mut up = Vec::new();
        let chunk = vec![b'a'; 4 * 1024 * 1024];
        up.extend(frame(false, Opcode::Text, &chunk));
        for _ in 0..4 {
            up.extend(frame(false, Opcode::Continuation, &chunk));
        }
        let (frames, report) = relay(up).await;
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].opcode, Opcode::Close);
        assert_eq!(&frames[0].payload[..2], &1009u16.to_be_bytes());
        assert!(report.error.unwrap().contains("cannot be masked"));
    }

    #[tokio::test]
    async fn a_bad_frame_from_the_upstream_ends_the_connection() {
        // A masked frame: servers never mask.
        let mut bad = BytesMut::new();
        ws::encode(&Frame::binary(&b"x"[..]), Some([1, 1, 1, 1]), &mut bad);
        let (frames, report) = relay(bad.to_vec()).await;
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].opcode, Opcode::Close);
        assert!(report.error.unwrap().contains("bad frame"));
    }
}
