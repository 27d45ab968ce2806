//! Audit events encoded once, where they are recorded.
//!
//! A sidecar encodes each audit event to protobuf as it spools it, keeps
//! those bytes (in memory while its backlog is small, on disk always) and
//! sends them as they are: a report is the events' encodings, each behind
//! the `ReportRequest.events` field key. Nothing is converted, re-encoded
//! or copied field by field on the way, which before was a third of a busy
//! sidecar's CPU.
//!
//! A command's result can travel inside its command (one stored row per
//! statement instead of two): protobuf merges concatenated encodings of a
//! message, so the result's details and masking counts are appended to the
//! command's bytes. [`encode_event`] encodes a result so that this part is
//! a suffix of its encoding.

use prost::Message;
use prost::bytes::BufMut;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status, Streaming};
use wicket_core as core;

use crate::v1;

/// What the spool keeps of an event it encoded with [`encode_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The event's id.
    pub id: String,
    /// For a command result: its command's id, and where (from the start of
    /// the encoding) the part merged into the command begins (the details
    /// but `command_id`, and the masking counts).
    pub result_of: Option<(String, usize)>,
    /// Whether a result may be merged into this event ([`takes_result`]).
    pub takes_result: bool,
}

/// Whether a result may be merged into `e`: a command without masking
/// counts of its own (merged counts replace, they do not add).
pub fn takes_result(e: &core::AuditEvent) -> bool {
    e.kind == core::AuditKind::Command && e.masked.is_empty()
}

/// Appends `e`'s protobuf encoding (an `AuditEvent`) to `buf`.
pub fn encode_event(mut e: core::AuditEvent, buf: &mut Vec<u8>) -> Encoded {
    let start = buf.len();
    let takes_result = takes_result(&e);
    let command_id = match e.kind {
        core::AuditKind::CommandResult => e.details.get("command_id").cloned(),
        _ => None,
    };
    let Some(command_id) = command_id else {
        let wire = v1::AuditEvent::from(e);
        wire.encode_raw(buf);
        return Encoded {
            id: wire.id,
            result_of: None,
            takes_result,
        };
    };
    let mut details = std::mem::take(&mut e.details);
    let masked = std::mem::take(&mut e.masked);
    details.remove("command_id");
    e.details.insert("command_id".into(), command_id.clone());
    let head = v1::AuditEvent::from(e);
    head.encode_raw(buf);
    let at = buf.len() - start;
    v1::AuditEvent {
        details: details.into_iter().collect(),
        masked: masked.into_iter().collect(),
        ..Default::default()
    }
    .encode_raw(buf);
    Encoded {
        id: head.id,
        result_of: Some((command_id, at)),
        takes_result,
    }
}

/// Appends a `details` entry to an encoded `AuditEvent` (a later entry of
/// the same key wins when it is decoded).
pub fn append_detail(buf: &mut Vec<u8>, key: &str, value: &str) {
    // details = 15, length-delimited; the entry: key = 1, value = 2.
    let entry = 1 + varint_len(key.len()) + key.len() + 1 + varint_len(value.len()) + value.len();
    buf.reserve(1 + varint_len(entry) + entry);
    buf.push((15 << 3) | 2);
    put_varint(buf, entry);
    buf.push((1 << 3) | 2);
    put_varint(buf, key.len());
    buf.extend_from_slice(key.as_bytes());
    buf.push((2 << 3) | 2);
    put_varint(buf, value.len());
    buf.extend_from_slice(value.as_bytes());
}

/// Decodes an encoded `AuditEvent`, without the checks the control service
/// applies (for a sidecar's own records: its replay and its rejects).
pub fn decode_event(bytes: &[u8]) -> Result<core::AuditEvent, String> {
    let wire = v1::AuditEvent::decode(bytes).map_err(|e| e.to_string())?;
    crate::convert::audit_event_unchecked(&wire)
}

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

fn put_varint(buf: &mut impl BufMut, mut n: usize) {
    while n >= 0x80 {
        buf.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    buf.put_u8(n as u8);
}

/// A `ReportRequest` of events already encoded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EncodedReport {
    /// Each event's `AuditEvent` encoding.
    pub events: Vec<Vec<u8>>,
}

impl EncodedReport {
    /// The report's encoding.
    pub fn encode(&self, buf: &mut impl BufMut) {
        for e in &self.events {
            buf.put_u8((1 << 3) | 2);
            put_varint(buf, e.len());
            buf.put_slice(e);
        }
    }

    /// The report as the control service reads it.
    pub fn decode(&self) -> Result<v1::ReportRequest, String> {
        let mut buf = Vec::new();
        self.encode(&mut buf);
        v1::ReportRequest::decode(buf.as_slice()).map_err(|e| e.to_string())
    }
}

/// The `Report` call's codec: encoded reports out, acknowledgements in.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReportCodec;

/// Writes an [`EncodedReport`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ReportEncoder;

impl Encoder for ReportEncoder {
    type Item = EncodedReport;
    type Error = Status;

    fn encode(&mut self, item: EncodedReport, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst);
        Ok(())
    }
}

type AckCodec = tonic_prost::ProstCodec<v1::ReportRequest, v1::ReportAck>;

/// Reads a `ReportAck`.
#[derive(Debug)]
pub struct AckDecoder(<AckCodec as Codec>::Decoder);

impl Decoder for AckDecoder {
    type Item = v1::ReportAck;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<v1::ReportAck>, Status> {
        self.0.decode(src)
    }
}

impl Codec for ReportCodec {
    type Encode = EncodedReport;
    type Decode = v1::ReportAck;
    type Encoder = ReportEncoder;
    type Decoder = AckDecoder;

    fn encoder(&mut self) -> ReportEncoder {
        ReportEncoder
    }

    fn decoder(&mut self) -> AckDecoder {
        AckDecoder(AckCodec::default().decoder())
    }
}

/// Opens `AuditService.Report` with reports already encoded: the same call
/// as the generated client's `report`, on the same wire.
pub async fn report(
    channel: tonic::transport::Channel,
    request: impl tonic::IntoStreamingRequest<Message = EncodedReport>,
) -> Result<Response<Streaming<v1::ReportAck>>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("the control service is not ready: {e}")))?;
    let mut req: Request<_> = request.into_streaming_request();
    req.extensions_mut()
        .insert(tonic::GrpcMethod::new("wicket.v1.AuditService", "Report"));
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/wicket.v1.AuditService/Report");
    grpc.streaming(req, path, ReportCodec).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn event(kind: core::AuditKind, id: &str) -> core::AuditEvent {
        core::AuditEvent {
            id: id.into(),
            session_id: "s1".into(),
            seq: 3,
            kind,
            connection: "db".into(),
            command: Some(core::Command {
                text: "SELECT 1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_encoded_event_decodes_to_the_event() {
        let mut e = event(core::AuditKind::Command, "c1");
        e.details.insert("é".into(), "x".repeat(300));
        let mut buf = vec![9, 9];
        let got = encode_event(e.clone(), &mut buf);
        assert_eq!(got.id, "c1");
        assert!(got.takes_result);
        assert_eq!(got.result_of, None);
        assert_eq!(decode_event(&buf[2..]).unwrap(), e);
    }

    #[test]
    fn a_result_merges_into_its_command_by_concatenation() {
        let mut cmd = event(core::AuditKind::Command, "c1");
        cmd.details.insert("rule".into(), "r".into());
        let mut res = event(core::AuditKind::CommandResult, "r1");
        res.command = None;
        res.details = BTreeMap::from([
            ("command_id".to_string(), "c1".to_string()),
            ("rows".to_string(), "3".to_string()),
            ("rule".to_string(), "result wins".to_string()),
        ]);
        res.masked.insert("email".into(), 2);

        let mut r = Vec::new();
        let enc = encode_event(res.clone(), &mut r);
        let (command, at) = enc.result_of.clone().unwrap();
        assert_eq!(command, "c1");
        assert!(!enc.takes_result);
        // Whole, the result is itself.
        assert_eq!(decode_event(&r).unwrap(), res);

        let mut c = Vec::new();
        encode_event(cmd.clone(), &mut c);
        c.extend_from_slice(&r[at..]);
        append_detail(&mut c, "result_id", "r1");
        let merged = decode_event(&c).unwrap();
        let mut want = cmd;
        want.details.insert("rows".into(), "3".into());
        want.details.insert("rule".into(), "result wins".into());
        want.details.insert("result_id".into(), "r1".into());
        want.masked.insert("email".into(), 2);
        assert_eq!(merged, want);
    }

    #[test]
    fn a_command_with_masking_counts_takes_no_result() {
        let mut cmd = event(core::AuditKind::Command, "c1");
        cmd.masked.insert("card".into(), 1);
        assert!(!encode_event(cmd, &mut Vec::new()).takes_result);
    }

    #[test]
    fn long_details_get_multi_byte_lengths() {
        let mut buf = Vec::new();
        encode_event(event(core::AuditKind::Command, "c1"), &mut buf);
        let long = "v".repeat(70_000);
        append_detail(&mut buf, "k", &long);
        assert_eq!(decode_event(&buf).unwrap().details["k"], long);
    }

    #[test]
    fn a_report_is_its_events_under_the_events_field() {
        let events = ["a", "b", "c"].map(|id| {
            let mut b = Vec::new();
            encode_event(event(core::AuditKind::Command, id), &mut b);
            b
        });
        let report = EncodedReport {
            events: events.to_vec(),
        };
        let wire = report.decode().unwrap();
        let ids: Vec<_> = wire.events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(
            wire.events[1],
            v1::AuditEvent::from(event(core::AuditKind::Command, "b"))
        );
    }
}
