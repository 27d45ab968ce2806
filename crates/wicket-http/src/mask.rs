//! Response masking: field rules (JSON paths) and the detectors, applied to
//! JSON documents, JSON lines and server-sent events, and text.
//!
//! JSON documents up to a bound are parsed whole, masked, and written back;
//! everything else is masked as it streams, line by line (a line longer
//! than [`MAX_LINE`] is cut at a delimiter no detected value contains), so
//! a server-sent event leaves as soon as its lines arrive. gzip and deflate
//! bodies are decoded first; other encodings cannot be read and are refused
//! (the gate asks the upstream for `identity` whenever it masks).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hyper::body::Frame;
use serde_json::Value;
use wicket_mask::{Masker, Style};
use wicket_policy::HttpSpec;
use wicket_policy::http::Routes;
use wicket_policy::jsonpath::JsonPath;
use wicket_sidecar::Sidecar;
use wicket_sidecar::bundle::Bundle;
use wicket_sidecar::web::{self, Body, BoxError};

/// Longest line masked as one piece before it is cut.
pub const MAX_LINE: usize = 64 * 1024;

/// How many values each detector or field rule masked.
pub type Tally = BTreeMap<String, u64>;

/// What the current policy says about this connection's HTTP traffic.
pub struct Plan {
    /// The detectors (possibly none), also used for field rules' styles.
    pub masker: Arc<Masker>,
    /// Whether any detector is on.
    pub detectors: bool,
    /// Field rules.
    pub fields: Vec<(JsonPath, Style, String)>,
    /// Routes.
    pub routes: Routes,
    /// Selected headers and body fields.
    pub spec: HttpSpec,
    /// The connection's body fields, parsed.
    pub body_fields: Vec<(String, JsonPath)>,
    /// Each route's own body fields, parsed, by route name.
    pub route_fields: std::collections::HashMap<String, Vec<(String, JsonPath)>>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("detectors", &self.detectors)
            .field("fields", &self.fields.len())
            .finish_non_exhaustive()
    }
}

impl Plan {
    /// Whether responses are masked at all.
    pub fn masks(&self) -> bool {
        self.detectors || !self.fields.is_empty()
    }

    fn build(bundle: &Bundle, connection: &str, key: &[u8]) -> Result<Plan, String> {
        let policy = &bundle.policy;
        let conn = policy.connection(connection);
        let detectors = conn.is_some_and(|c| !c.masking.detectors.is_empty());
        let masker = wicket_sidecar::masking::builder(policy, connection, key)?
            .build()
            .map_err(|e| e.to_string())?;
        let mut fields = Vec::new();
        let mut spec = HttpSpec::default();
        if let Some(c) = conn {
            for f in &c.masking.fields {
                let path = JsonPath::parse(&f.path)?;
                let label = f
                    .path
                    .rsplit(['.', '['])
                    .next()
                    .unwrap_or("field")
                    .trim_matches(|c: char| !c.is_alphanumeric() && c != '_' && c != '-')
                    .to_string();
                let label = if label.is_empty() {
                    "field".into()
                } else {
                    label
                };
                fields.push((path, wicket_sidecar::masking::style(f.style), label));
            }
            spec = c.http.clone();
        }
        let parse = |paths: &[String]| {
            paths
                .iter()
                .map(|p| Ok((p.clone(), JsonPath::parse(p)?)))
                .collect::<Result<Vec<_>, String>>()
        };
        let body_fields = parse(&spec.body_fields)?;
        let route_fields = spec
            .routes
            .iter()
            .filter(|r| !r.body_fields.is_empty())
            .map(|r| Ok((r.name.clone(), parse(&r.body_fields)?)))
            .collect::<Result<_, String>>()?;
        Ok(Plan {
            masker: Arc::new(masker),
            detectors,
            fields,
            routes: Routes::new(&spec)?,
            spec,
            body_fields,
            route_fields,
        })
    }

    /// The fail-closed plan when policy cannot be compiled here: every
    /// detector on, no routes.
    pub(crate) fn mask_everything(key: &[u8]) -> Plan {
        Plan {
            masker: Arc::new(
                Masker::builder()
                    .hash_key(key)
                    .all(Style::Redact)
                    .build()
                    .expect("built-in detectors build"),
            ),
            detectors: true,
            fields: Vec::new(),
            routes: Routes::default(),
            spec: HttpSpec::default(),
            body_fields: Vec::new(),
            route_fields: Default::default(),
        }
    }

    /// Masks a JSON value in place.
    pub fn mask_json(&self, v: &mut Value, tally: &mut Tally) {
        for (path, style, label) in &self.fields {
            let mut n = 0;
            path.for_each_mut(v, &mut |x| {
                if matches!(x, Value::Null) {
                    return;
                }
                let text = match &mut *x {
                    Value::String(s) => std::mem::take(s),
                    other => other.to_string(),
                };
                *x = Value::String(self.masker.mask_whole(&text, label, *style));
                n += 1;
            });
            if n > 0 {
                *tally.entry(format!("field:{path}")).or_default() += n;
            }
        }
        if self.detectors {
            self.detect_json(v, tally);
        }
    }

    fn detect_json(&self, v: &mut Value, tally: &mut Tally) {
        match v {
            Value::String(s) => {
                let (out, counts) = self.masker.mask(s);
                if counts.total() > 0 {
                    for (name, n) in counts.iter() {
                        *tally.entry(name.to_string()).or_default() += n;
                    }
                    *s = out.into_owned();
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| self.detect_json(x, tally)),
            Value::Object(o) => o.values_mut().for_each(|x| self.detect_json(x, tally)),
            _ => {}
        }
    }

    /// Masks text with the detectors.
    pub fn mask_text(&self, text: &str, tally: &mut Tally) -> String {
        if !self.detectors {
            return text.to_string();
        }
        let (out, counts) = self.masker.mask(text);
        for (name, n) in counts.iter() {
            *tally.entry(name.to_string()).or_default() += n;
        }
        out.into_owned()
    }

    /// Masks a WebSocket message: JSON by the field rules and the
    /// detectors, anything else by the detectors.
    pub fn mask_message(&self, message: &[u8], tally: &mut Tally) -> Vec<u8> {
        self.mask_document(message, tally)
    }

    /// Masks a whole JSON document (fields and detectors); one that is
    /// not JSON after all is masked as text.
    fn mask_document(&self, held: &[u8], tally: &mut Tally) -> Vec<u8> {
        match serde_json::from_slice::<Value>(held) {
            Ok(mut v) => {
                self.mask_json(&mut v, tally);
                serde_json::to_vec(&v).unwrap_or_default()
            }
            Err(_) => self.mask_line(held, BodyKind::Text, tally),
        }
    }

    /// Masks and takes the complete lines at the front of `held` (a line
    /// past [`MAX_LINE`] cut at a delimiter); with `all`, the rest too.
    fn mask_lines(
        &self,
        held: &mut Vec<u8>,
        kind: BodyKind,
        all: bool,
        tally: &mut Tally,
    ) -> Vec<u8> {
        let kind = line_kind(kind);
        let mut out = Vec::new();
        let mut at = 0;
        while at < held.len() {
            let cut = match cut_point(&held[at..]) {
                0 if all => held.len() - at,
                0 => break,
                n => n,
            };
            out.extend(self.mask_line(&held[at..at + cut], kind, tally));
            at += cut;
        }
        held.drain(..at);
        out
    }

    /// Masks one line of JSON lines or server-sent events: JSON is masked
    /// as JSON (fields and detectors), anything else as text.
    fn mask_line(&self, line: &[u8], kind: BodyKind, tally: &mut Tally) -> Vec<u8> {
        let text = String::from_utf8_lossy(line);
        let (prefix, payload) = match kind {
            BodyKind::EventStream => match text.strip_prefix("data:") {
                Some(rest) => ("data:", rest),
                None => ("", text.as_ref()),
            },
            _ => ("", text.as_ref()),
        };
        let body = payload.trim_end_matches(['\r', '\n']);
        let ending = &payload[body.len()..];
        let lead = &body[..body.len() - body.trim_start().len()];
        if (kind == BodyKind::JsonLines || !prefix.is_empty())
            && let Ok(mut v) = serde_json::from_str::<Value>(body)
        {
            self.mask_json(&mut v, tally);
            let mut out = String::with_capacity(line.len());
            out.push_str(prefix);
            out.push_str(lead);
            out.push_str(&v.to_string());
            out.push_str(ending);
            return out.into_bytes();
        }
        let masked = self.mask_text(&text, tally);
        masked.into_bytes()
    }
}

/// The plan compiled once per policy bundle.
#[derive(Default)]
pub struct PlanCache {
    cached: Mutex<Option<(Arc<Bundle>, Arc<Plan>)>>,
}

impl std::fmt::Debug for PlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanCache").finish_non_exhaustive()
    }
}

impl PlanCache {
    /// The plan under the sidecar's current bundle (`None`: no bundle yet).
    pub fn current(&self, sidecar: &Sidecar, key: &[u8]) -> Option<Arc<Plan>> {
        let bundle = sidecar.bundles.current()?;
        let mut g = self.cached.lock().expect("plan cache");
        if let Some((b, p)) = g.as_ref()
            && Arc::ptr_eq(b, &bundle)
        {
            return Some(p.clone());
        }
        let plan = match Plan::build(&bundle, &sidecar.cfg.connection, key) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "the connection's HTTP policy does not compile in the gate; masking everything");
                Plan::mask_everything(key)
            }
        };
        let plan = Arc::new(plan);
        *g = Some((bundle, plan.clone()));
        Some(plan)
    }
}

/// How a response body is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// A JSON document.
    Json,
    /// JSON lines (`application/x-ndjson`, `application/jsonl`).
    JsonLines,
    /// Server-sent events.
    EventStream,
    /// Text (masked line by line with the detectors).
    Text,
    /// Binary: passed on as it is.
    Binary,
}

/// The kind of a body of `content_type`.
pub fn body_kind(content_type: Option<&str>) -> BodyKind {
    let Some(ct) = content_type else {
        return BodyKind::Text;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => BodyKind::Json,
        "application/x-ndjson" | "application/jsonl" | "application/json-seq" => {
            BodyKind::JsonLines
        }
        "text/event-stream" => BodyKind::EventStream,
        e if e.ends_with("+json") => BodyKind::Json,
        e if e.starts_with("text/")
            || e.ends_with("+xml")
            || matches!(
                e,
                "application/xml"
                    | "application/javascript"
                    | "application/x-www-form-urlencoded"
                    | "application/graphql"
                    | "application/yaml"
                    | "application/csv"
            ) =>
        {
            BodyKind::Text
        }
        "" => BodyKind::Text,
        _ => BodyKind::Binary,
    }
}

/// A content decoder for gzip or deflate.
enum Decoder {
    Identity,
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
}

/// Input fed to a decoder at once (bounds what one write can inflate to).
const DECODE_SLICE: usize = 8 * 1024;

impl Decoder {
    /// The decoder for a `Content-Encoding`, or why there is none.
    fn for_encoding(enc: Option<&str>) -> Result<Decoder, String> {
        match enc.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("identity") => Ok(Decoder::Identity),
            Some("gzip") | Some("x-gzip") => {
                Ok(Decoder::Gzip(flate2::write::GzDecoder::new(Vec::new())))
            }
            Some("deflate") => Ok(Decoder::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))),
            Some(other) => Err(format!(
                "the upstream answered in `{other}` encoding, which the gate cannot read to mask"
            )),
        }
    }

    /// Decodes a chunk, handing the output to `out` in bounded pieces.
    fn feed(&mut self, data: &[u8], out: &mut dyn FnMut(Vec<u8>)) -> Result<(), String> {
        let err = |e: std::io::Error| format!("the upstream's compressed body is corrupt: {e}");
        match self {
            Decoder::Identity => out(data.to_vec()),
            Decoder::Gzip(d) => {
                for piece in data.chunks(DECODE_SLICE) {
                    d.write_all(piece).map_err(err)?;
                    out(std::mem::take(d.get_mut()));
                }
            }
            Decoder::Zlib(d) => {
                for piece in data.chunks(DECODE_SLICE) {
                    d.write_all(piece).map_err(err)?;
                    out(std::mem::take(d.get_mut()));
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<u8>, String> {
        let err = |e: std::io::Error| format!("the upstream's compressed body is corrupt: {e}");
        match self {
            Decoder::Identity => Ok(Vec::new()),
            Decoder::Gzip(d) => d.finish().map_err(err),
            Decoder::Zlib(d) => d.finish().map_err(err),
        }
    }
}

/// Where a text stream may be cut when a line grows past [`MAX_LINE`]:
/// bytes no detected value contains.
fn cut_point(buf: &[u8]) -> usize {
    if let Some(i) = buf.iter().rposition(|b| *b == b'\n') {
        return i + 1;
    }
    if buf.len() < MAX_LINE {
        return 0;
    }
    match buf.iter().rposition(|b| {
        matches!(
            b,
            b' ' | b'\t' | b',' | b'"' | b'<' | b'>' | b'{' | b'}' | b'[' | b']'
        )
    }) {
        Some(i) if i > 0 => i + 1,
        _ => {
            // No delimiter in a whole line: cut on a UTF-8 boundary.
            let mut end = MAX_LINE;
            while end > 0 && (buf[end] & 0xC0) == 0x80 {
                end -= 1;
            }
            end.max(1)
        }
    }
}

/// What masking a body needs from the response headers.
#[derive(Debug)]
pub struct MaskJob {
    /// The plan.
    pub plan: Arc<Plan>,
    /// The body's kind.
    pub kind: BodyKind,
    /// Its `Content-Encoding`.
    pub encoding: Option<String>,
    /// Largest JSON document parsed whole.
    pub max_json: usize,
}

/// Masks `body` as it streams; returns the masked body and the tally that
/// fills as it goes. Errors (a corrupt encoding, an oversized document
/// under field rules) end the body with an error: the client sees a cut
/// response, never an unmasked one.
pub fn mask_body(mut body: Body, job: MaskJob) -> Result<(Body, Arc<Mutex<Tally>>), String> {
    let mut decoder = Decoder::for_encoding(job.encoding.as_deref())?;
    let tally = Arc::new(Mutex::new(Tally::new()));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let t2 = tally.clone();
    tokio::spawn(async move {
        let plan = job.plan;
        let mut kind = job.kind;
        let mut held: Vec<u8> = Vec::new();
        let send = |tx: &tokio::sync::mpsc::Sender<_>, v: Vec<u8>| {
            let tx = tx.clone();
            async move {
                if v.is_empty() {
                    return true;
                }
                tx.send(Ok(Frame::data(Bytes::from(v)))).await.is_ok()
            }
        };
        let fail = |tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>, e: String| async move {
            tracing::warn!(error = %e, "response masking failed; the response is cut");
            let _ = tx.send(Err(e.into())).await;
        };
        while let Some(data) = web::next_data(&mut body).await {
            let data = match data {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let mut decoded = Vec::new();
            if let Err(e) = decoder.feed(&data, &mut |d| decoded.extend_from_slice(&d)) {
                fail(tx, e).await;
                return;
            }
            held.extend_from_slice(&decoded);
            if kind == BodyKind::Json {
                if held.len() <= job.max_json {
                    continue;
                }
                if !plan.fields.is_empty() {
                    fail(
                        tx,
                        format!(
                            "a JSON answer over {} bytes cannot be masked by field rules",
                            job.max_json
                        ),
                    )
                    .await;
                    return;
                }
                // Too large to parse whole and no field rules: the detectors
                // mask it as streamed text.
                kind = BodyKind::Text;
            }
            let out = plan.mask_lines(&mut held, kind, false, &mut t2.lock().expect("tally"));
            if !send(&tx, out).await {
                return;
            }
        }
        match decoder.finish() {
            Ok(rest) => held.extend(rest),
            Err(e) => {
                fail(tx, e).await;
                return;
            }
        }
        let out = {
            let mut tally = t2.lock().expect("tally");
            if kind == BodyKind::Json {
                plan.mask_document(&held, &mut tally)
            } else {
                plan.mask_lines(&mut held, kind, true, &mut tally)
            }
        };
        send(&tx, out).await;
    });
    Ok((web::channel_body(rx), tally))
}

/// Masks a whole body already in memory (a small answer): decoded, then
/// masked as its kind says.
pub fn mask_whole(
    plan: &Plan,
    data: &[u8],
    kind: BodyKind,
    encoding: Option<&str>,
    max_json: usize,
) -> Result<(Vec<u8>, Tally), String> {
    let mut decoder = Decoder::for_encoding(encoding)?;
    let mut held = Vec::new();
    decoder.feed(data, &mut |d| held.extend_from_slice(&d))?;
    held.extend(decoder.finish()?);
    let mut tally = Tally::new();
    if kind == BodyKind::Json && held.len() <= max_json {
        let out = plan.mask_document(&held, &mut tally);
        return Ok((out, tally));
    }
    if kind == BodyKind::Json && !plan.fields.is_empty() {
        return Err(format!(
            "a JSON answer over {max_json} bytes cannot be masked by field rules"
        ));
    }
    let out = plan.mask_lines(&mut held, kind, true, &mut tally);
    Ok((out, tally))
}

fn line_kind(kind: BodyKind) -> BodyKind {
    if kind == BodyKind::Json {
        BodyKind::Text
    } else {
        kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use serde_json::json;

    fn plan(fields: &[&str], detectors: bool) -> Plan {
        let mut b = Masker::builder().hash_key(b"k");
        if detectors {
            b = b.detector(wicket_mask::Entity::Email, Style::Redact);
        }
        Plan {
            masker: Arc::new(b.build().unwrap()),
            detectors,
            fields: fields
                .iter()
                .map(|f| (JsonPath::parse(f).unwrap(), Style::Partial, "f".to_string()))
                .collect(),
            routes: Routes::default(),
            spec: HttpSpec::default(),
            body_fields: Vec::new(),
            route_fields: Default::default(),
        }
    }

    #[test]
    fn json_fields_and_detectors_are_masked() {
        let p = plan(&["$..ssn"], true);
        let mut v = json!({"items": [{"ssn": "123-45-6789", "note": "mail bob@example.com"}], "ssn": 123456789});
        let mut t = Tally::new();
        p.mask_json(&mut v, &mut t);
        let s = v.to_string();
        assert!(
            !s.contains("123-45") && !s.contains("bob@example.com"),
            "{s}"
        );
        assert!(s.contains("6789"), "partial keeps the last four: {s}");
        assert_eq!(t.get("field:$..ssn"), Some(&2));
        assert_eq!(t.get("email"), Some(&1));
    }

    #[test]
    fn kinds_follow_the_content_type() {
        assert_eq!(
            body_kind(Some("application/json; charset=utf-8")),
            BodyKind::Json
        );
        assert_eq!(body_kind(Some("application/problem+json")), BodyKind::Json);
        assert_eq!(body_kind(Some("text/event-stream")), BodyKind::EventStream);
        assert_eq!(body_kind(Some("application/x-ndjson")), BodyKind::JsonLines);
        assert_eq!(body_kind(Some("text/html")), BodyKind::Text);
        assert_eq!(body_kind(Some("image/png")), BodyKind::Binary);
        assert_eq!(body_kind(None), BodyKind::Text);
    }

    #[test]
    fn event_stream_data_lines_are_masked_as_json() {
        let p = plan(&["$.email"], false);
        let mut t = Tally::new();
        let out = p.mask_line(
            b"data: {\"email\":\"bob@example.com\"}\n",
            BodyKind::EventStream,
            &mut t,
        );
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("data: {") && s.ends_with("}\n"), "{s}");
        assert!(!s.contains("bob@example"), "{s}");
        let out = p.mask_line(b"event: update\n", BodyKind::EventStream, &mut t);
        assert_eq!(out, b"event: update\n");
    }

    #[test]
    fn long_lines_are_cut_at_delimiters() {
        let mut buf = vec![b'a'; MAX_LINE + 10];
        buf[100] = b' ';
        assert_eq!(cut_point(&buf), 101);
        assert_eq!(cut_point(b"abc"), 0);
        assert_eq!(cut_point(b"ab\ncd"), 3);
        let no_delim = "é".repeat(MAX_LINE);
        let c = cut_point(no_delim.as_bytes());
        assert!(no_delim.is_char_boundary(c));
    }

    #[tokio::test]
    async fn gzip_bodies_are_decoded_and_masked() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(br#"{"user":"bob@example.com"}"#).unwrap();
        let gz = enc.finish().unwrap();
        let (body, tally) = mask_body(
            web::full(gz),
            MaskJob {
                plan: Arc::new(plan(&[], true)),
                kind: BodyKind::Json,
                encoding: Some("gzip".into()),
                max_json: 1 << 20,
            },
        )
        .unwrap();
        let out = body.collect().await.unwrap().to_bytes();
        let s = String::from_utf8(out.to_vec()).unwrap();
        assert!(s.contains("[redacted:email]"), "{s}");
        assert_eq!(tally.lock().unwrap().get("email"), Some(&1));
        let err = Decoder::for_encoding(Some("br")).err().unwrap();
        assert!(err.contains("br"));
    }

    #[tokio::test]
    async fn corrupt_gzip_cuts_the_body() {
        let (body, _) = mask_body(
            web::full(b"not gzip at all".to_vec()),
            MaskJob {
                plan: Arc::new(plan(&[], true)),
                kind: BodyKind::Text,
                encoding: Some("gzip".into()),
                max_json: 1 << 20,
            },
        )
        .unwrap();
        assert!(body.collect().await.is_err());
    }
}
