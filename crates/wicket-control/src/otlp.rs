//! The few OpenTelemetry protocol messages the audit export sends: an
//! `ExportLogsServiceRequest` of log records (OTLP/gRPC,
//! `opentelemetry.proto.collector.logs.v1.LogsService/Export`). Written
//! from the protocol's field numbers rather than pulling the OpenTelemetry
//! SDK into the build for five messages.

#![allow(missing_docs)]

use wicket_core::{AuditEvent, Effect};

/// The gRPC method.
pub const EXPORT_PATH: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportLogsServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_logs: Vec<ResourceLogs>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportLogsServiceResponse {
    #[prost(message, optional, tag = "1")]
    pub partial_success: Option<ExportLogsPartialSuccess>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportLogsPartialSuccess {
    #[prost(int64, tag = "1")]
    pub rejected_log_records: i64,
    #[prost(string, tag = "2")]
    pub error_message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceLogs {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_logs: Vec<ScopeLogs>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeLogs {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub log_records: Vec<LogRecord>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LogRecord {
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    #[prost(fixed64, tag = "11")]
    pub observed_time_unix_nano: u64,
    #[prost(int32, tag = "2")]
    pub severity_number: i32,
    #[prost(string, tag = "3")]
    pub severity_text: String,
    #[prost(message, optional, tag = "5")]
    pub body: Option<AnyValue>,
    #[prost(message, repeated, tag = "6")]
    pub attributes: Vec<KeyValue>,
    #[prost(fixed32, tag = "8")]
    pub flags: u32,
    #[prost(bytes = "vec", tag = "9")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "10")]
    pub span_id: Vec<u8>,
    #[prost(string, tag = "12")]
    pub event_name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    #[prost(oneof = "any_value::Value", tags = "1, 3")]
    pub value: Option<any_value::Value>,
}

pub mod any_value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(string, tag = "1")]
        StringValue(String),
        #[prost(int64, tag = "3")]
        IntValue(i64),
    }
}

const SEVERITY_INFO: i32 = 9;
const SEVERITY_WARN: i32 = 13;

fn text(s: impl Into<String>) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::StringValue(s.into())),
    })
}

fn attr(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: text(value),
    }
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One audit event as a log record: the event's time, `WARN` for refusals
/// and holds (`INFO` otherwise), the command (or the event kind) as body,
/// the W3C trace and span of its `traceparent`, and attributes for the
/// who, what and why, with the event as stored in `wicket.event`.
pub fn log_record(e: &AuditEvent, stored: &str, observed_nanos: u64) -> LogRecord {
    let effect = e.decision.as_ref().map(|d| d.effect);
    let warn = matches!(effect, Some(Effect::Deny | Effect::Review));
    let mut attributes = vec![
        attr("wicket.event.id", e.id.clone()),
        attr("wicket.event.kind", e.kind.as_str()),
        attr("wicket.session.id", e.session_id.clone()),
        attr("wicket.connection", e.connection.clone()),
        KeyValue {
            key: "wicket.event.seq".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(e.seq as i64)),
            }),
        },
    ];
    if let Some(p) = &e.principal {
        attributes.push(attr("enduser.id", p.subject.clone()));
        attributes.push(attr("wicket.principal.issuer", p.issuer.clone()));
        attributes.push(attr("wicket.principal.kind", p.kind.as_str()));
    }
    if let Some(d) = &e.decision {
        attributes.push(attr("wicket.decision.effect", d.effect.as_str()));
        attributes.push(attr("wicket.decision.rule", d.rule.clone()));
    }
    if let Some(r) = &e.reasoning
        && !r.reasoning.is_empty()
    {
        attributes.push(attr("wicket.reasoning", r.reasoning.clone()));
    }
    if !e.client_addr.is_empty() {
        attributes.push(attr("client.address", e.client_addr.clone()));
    }
    for key in ["approval", "approval_outcome"] {
        if let Some(v) = e.details.get(key) {
            attributes.push(attr(&format!("wicket.{key}"), v.clone()));
        }
    }
    attributes.push(attr("wicket.event", stored));
    // traceparent: version-traceid-spanid-flags.
    let parts: Vec<&str> = e.traceparent.split('-').collect();
    let (trace_id, span_id, flags) = match parts.as_slice() {
        [_, t, s, f] => (
            hex_bytes(t).filter(|b| b.len() == 16).unwrap_or_default(),
            hex_bytes(s).filter(|b| b.len() == 8).unwrap_or_default(),
            hex_bytes(f).and_then(|b| b.first().copied()).unwrap_or(0),
        ),
        _ => (Vec::new(), Vec::new(), 0),
    };
    let body = match &e.command {
        Some(c) if !c.text.is_empty() => c.text.clone(),
        _ => e.kind.as_str().to_string(),
    };
    LogRecord {
        time_unix_nano: e.time.timestamp_nanos_opt().unwrap_or(0).max(0) as u64,
        observed_time_unix_nano: observed_nanos,
        severity_number: if warn { SEVERITY_WARN } else { SEVERITY_INFO },
        severity_text: if warn { "WARN" } else { "INFO" }.into(),
        body: text(body),
        attributes,
        flags: u32::from(flags),
        trace_id: if span_id.is_empty() {
            Vec::new()
        } else {
            trace_id
        },
        span_id,
        event_name: format!("wicket.audit.{}", e.kind.as_str()),
    }
}

/// A request carrying `records`, from `wicket-control`.
pub fn request(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![attr("service.name", "wicket-control")],
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "wicket.audit".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                log_records: records,
            }],
        }],
    }
}
