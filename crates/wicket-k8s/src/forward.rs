//! Reading port-forward's streams on their way, so that what they carry
//! is recorded.
//!
//! port-forward is relayed as it is (the bytes of a forwarded TCP
//! connection must arrive intact), but a [`Tap`] on each direction reads
//! the same bytes first and hands back the data they carry, for the
//! recording. Three framings reach the gate:
//!
//! - plain SPDY/3.1 (kubectl 1.30 and older): the client opens a `data`
//!   and an `error` stream per forwarded connection (SYN_STREAM, with
//!   `streamtype` and `port` in its zlib-compressed header block); DATA
//!   frames on the data stream carry the connection's bytes both ways;
//! - the same SPDY, tunnelled in WebSocket messages
//!   (`SPDY/3.1+portforward.k8s.io`, kubectl 1.31 and newer): the
//!   messages' payloads, end to end, are the SPDY byte stream;
//! - the WebSocket channel protocol (`v4.channel.k8s.io`,
//!   `portforward.k8s.io`, other clients): channel `2k` carries the data
//!   of the `k`-th requested port, `2k + 1` its errors, and the API
//!   server's first two bytes on each channel name the port.
//!
//! What cannot be read is not relayed: a tap's error ends the relay
//! (nothing is relayed unrecorded).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use wicket_sidecar::websocket::{self as ws, Opcode, Sender};
use wicket_spdy::{Frame, Inflater, kind};

/// How a port-forward's bytes are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// SPDY/3.1 frames.
    Spdy,
    /// SPDY/3.1 frames carried in WebSocket messages.
    WebSocketSpdy,
    /// The WebSocket channel protocol.
    WebSocketChannels,
}

impl Framing {
    /// The framing of a WebSocket port-forward that agreed on `protocol`.
    pub(crate) fn of_websocket(protocol: &str) -> Framing {
        if protocol.starts_with("SPDY/") {
            Framing::WebSocketSpdy
        } else {
            Framing::WebSocketChannels
        }
    }
}

/// What the client's SPDY streams said: which carry data, and the ports
/// they name. Both directions' taps read it (the client's tap sees a
/// stream opened before the API server can answer on it).
#[derive(Debug, Default)]
pub(crate) struct Streams {
    /// Data streams, by id.
    pub data: HashSet<u32>,
    /// Ports the streams named.
    pub ports: BTreeSet<String>,
}

/// [`Streams`], shared by a relay's two taps.
pub(crate) type DataStreams = Arc<Mutex<Streams>>;

/// Reads one direction of a port-forward.
pub(crate) struct Tap {
    framing: Framing,
    from_client: bool,
    max: usize,
    /// WebSocket bytes not yet a whole frame.
    ws: BytesMut,
    /// SPDY bytes not yet a whole frame.
    spdy: BytesMut,
    /// The client's header blocks (one zlib stream); the API server's
    /// blocks are not needed.
    inflater: Option<Inflater>,
    streams: DataStreams,
    /// The channel of the WebSocket message being read.
    channel: u8,
    /// Port bytes still to skip at the start of each channel (the API
    /// server's side).
    port_bytes: HashMap<u8, usize>,
}

impl Tap {
    /// A tap on the client's side (`from_client`) or the API server's,
    /// refusing frames over `max` bytes; the two taps of one relay share
    /// `streams`.
    pub(crate) fn new(
        framing: Framing,
        from_client: bool,
        max: usize,
        streams: DataStreams,
    ) -> Tap {
        Tap {
            framing,
            from_client,
            max,
            ws: BytesMut::new(),
            spdy: BytesMut::new(),
            inflater: from_client.then(Inflater::new),
            streams,
            channel: 0,
            port_bytes: HashMap::new(),
        }
    }

    /// Reads `bytes` (the next ones of this direction) and adds the
    /// forwarded connections' data they complete to `data`.
    pub(crate) fn feed(&mut self, bytes: &[u8], data: &mut Vec<Bytes>) -> Result<(), String> {
        if self.framing == Framing::Spdy {
            self.spdy.extend_from_slice(bytes);
            return self.spdy_frames(data);
        }
        self.ws.extend_from_slice(bytes);
        let sender = if self.from_client {
            Sender::Client
        } else {
            Sender::Server
        };
        while let Some(f) =
            ws::decode(&mut self.ws, sender, self.max).map_err(|e| format!("bad frame: {e}"))?
        {
            let first = match f.opcode {
                Opcode::Binary | Opcode::Text => true,
                Opcode::Continuation => false,
                _ => continue,
            };
            if self.framing == Framing::WebSocketSpdy {
                self.spdy.extend_from_slice(&f.payload);
                self.spdy_frames(data)?;
                continue;
            }
            let mut payload = f.payload;
            if first {
                let Some(&c) = payload.first() else { continue };
                self.channel = c;
                payload = payload.slice(1..);
            }
            // Odd channels carry errors, not the connection's bytes.
            if self.channel % 2 == 1 {
                continue;
            }
            if !self.from_client {
                let skip = self.port_bytes.entry(self.channel).or_insert(2);
                let n = (*skip).min(payload.len());
                *skip -= n;
                payload = payload.slice(n..);
            }
            if !payload.is_empty() {
                data.push(payload);
            }
        }
        Ok(())
    }

    fn spdy_frames(&mut self, data: &mut Vec<Bytes>) -> Result<(), String> {
        while let Some(f) =
            Frame::decode(&mut self.spdy, self.max).map_err(|e| format!("bad SPDY: {e}"))?
        {
            if f.is_control() {
                // Every block of the client's is inflated, in order: they
                // share one zlib stream.
                if let (Some(inflater), Some(block)) = (self.inflater.as_mut(), f.header_block()) {
                    let h = inflater
                        .headers(block)
                        .map_err(|e| format!("bad SPDY headers: {e}"))?;
                    if f.kind() == Some(kind::SYN_STREAM)
                        && h.get("streamtype") == Some("data")
                        && let Some(s) = f.stream()
                    {
                        let mut st = self.streams.lock().expect("streams");
                        st.data.insert(s);
                        if let Some(p) = h.get("port").filter(|p| {
                            !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
                        }) {
                            st.ports.insert(p.to_string());
                        }
                    }
                }
                continue;
            }
            let ours = f
                .stream()
                .is_some_and(|s| self.streams.lock().expect("streams").data.contains(&s));
            if ours && !f.body().is_empty() {
                data.push(f.body_bytes());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wicket_sidecar::websocket::Frame as WsFrame;
    use wicket_spdy::Deflater;

    fn fed(tap: &mut Tap, bytes: &[u8]) -> Vec<u8> {
        let mut data = Vec::new();
        // One byte at a time: frames split anywhere still read the same.
        for b in bytes {
            tap.feed(std::slice::from_ref(b), &mut data).unwrap();
        }
        data.concat()
    }

    fn ws(frame: &WsFrame, from_client: bool) -> Vec<u8> {
        let mut out = BytesMut::new();
        ws::encode(frame, from_client.then(ws::new_mask), &mut out);
        out.to_vec()
    }

    /// A client's SPDY opening of a data stream and an error stream, then
    /// data on each.
    fn spdy_client() -> Vec<u8> {
        let mut d = Deflater::new();
        let mut out = Vec::new();
        let error = d.block(&[
            ("streamtype", "error"),
            ("port", "8080"),
            ("requestid", "0"),
        ]);
        let data = d.block(&[("streamtype", "data"), ("port", "8080"), ("requestid", "0")]);
        out.extend_from_slice(Frame::syn_stream(1, 0, &error).raw());
        out.extend_from_slice(Frame::syn_stream(3, 0, &data).raw());
        out.extend_from_slice(Frame::data(1, 0, b"not data").raw());
        out.extend_from_slice(Frame::data(3, 0, b"GET / HTTP/1.1\r\n").raw());
        out.extend_from_slice(Frame::data(3, 0, b"\r\n").raw());
        out
    }

    fn spdy_server() -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(Frame::syn_reply(3, 0, &Deflater::new().block(&[("k", "v")])).raw());
        out.extend_from_slice(Frame::data(1, 0, b"an error").raw());
        out.extend_from_slice(Frame::data(3, 0, b"HTTP/1.1 200 OK\r\n").raw());
        out
    }

    #[test]
    fn spdy_data_streams_are_read_both_ways() {
        let streams = DataStreams::default();
        let mut up = Tap::new(Framing::Spdy, true, 1 << 20, streams.clone());
        let mut down = Tap::new(Framing::Spdy, false, 1 << 20, streams.clone());
        assert_eq!(fed(&mut up, &spdy_client()), b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(fed(&mut down, &spdy_server()), b"HTTP/1.1 200 OK\r\n");
        let st = streams.lock().unwrap();
        assert_eq!(st.data, HashSet::from([3]));
        assert_eq!(st.ports, BTreeSet::from(["8080".to_string()]));
    }

    #[test]
    fn spdy_in_websocket_messages_is_read_across_message_boundaries() {
        let streams = DataStreams::default();
        let mut up = Tap::new(Framing::WebSocketSpdy, true, 1 << 20, streams.clone());
        let mut down = Tap::new(Framing::WebSocketSpdy, false, 1 << 20, streams);
        // Messages cut the SPDY stream anywhere.
        let client = spdy_client();
        let (a, b) = client.split_at(client.len() / 2 + 3);
        let mut wire = ws(&WsFrame::binary(Bytes::copy_from_slice(a)), true);
        let ping = WsFrame {
            fin: true,
            opcode: Opcode::Ping,
            payload: Bytes::new(),
        };
        wire.extend(ws(&ping, true));
        wire.extend(ws(&WsFrame::binary(Bytes::copy_from_slice(b)), true));
        assert_eq!(fed(&mut up, &wire), b"GET / HTTP/1.1\r\n\r\n");
        let server = ws(&WsFrame::binary(Bytes::from(spdy_server())), false);
        assert_eq!(fed(&mut down, &server), b"HTTP/1.1 200 OK\r\n");
    }

    #[test]
    fn channel_protocol_data_is_read_without_ports_or_errors() {
        let mut up = Tap::new(
            Framing::WebSocketChannels,
            true,
            1 << 20,
            DataStreams::default(),
        );
        let mut down = Tap::new(
            Framing::WebSocketChannels,
            false,
            1 << 20,
            DataStreams::default(),
        );
        let msg = |c: u8, d: &[u8], client: bool| {
            let mut p = vec![c];
            p.extend_from_slice(d);
            ws(&WsFrame::binary(Bytes::from(p)), client)
        };
        let mut wire = msg(0, b"hello ", true);
        wire.extend(msg(0, b"there", true));
        assert_eq!(fed(&mut up, &wire), b"hello there");
        // The API server names the port first, on each channel.
        let mut wire = msg(0, &[0x90, 0x1f], false);
        wire.extend(msg(1, &[0x90, 0x1f], false));
        wire.extend(msg(0, b"answer", false));
        wire.extend(msg(1, b"an error", false));
        wire.extend(msg(2, &[0x50, 0x00, b'!'], false));
        assert_eq!(fed(&mut down, &wire), b"answer!");
    }

    #[test]
    fn bad_framing_is_an_error() {
        let mut t = Tap::new(Framing::Spdy, true, 64, DataStreams::default());
        let mut data = Vec::new();
        // A SPDY/2 control frame.
        assert!(t.feed(&[0x80, 2, 0, 1, 0, 0, 0, 0], &mut data).is_err());
        let mut t = Tap::new(
            Framing::WebSocketChannels,
            false,
            64,
            DataStreams::default(),
        );
        let big = ws(&WsFrame::binary(Bytes::from(vec![0u8; 100])), false);
        assert!(t.feed(&big, &mut data).is_err(), "over the frame limit");
    }
}
