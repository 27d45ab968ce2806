//! Secret values out of API responses.
//!
//! A Secret's `data` and `stringData` values are replaced (in a single
//! object, in a `…List`, in `Table` rows that carry objects, and in watch
//! events), and so is the `kubectl.kubernetes.io/last-applied-configuration`
//! annotation, which holds the applied values in plain text. Keys stay, so
//! `kubectl get secret -o yaml` still shows what the Secret holds.
//!
//! Watch streams are JSON objects one after another; [`JsonSplitter`] cuts
//! them apart as bytes arrive, so redaction streams with no buffering beyond
//! one event.

use base64::Engine as _;
use serde_json::Value;

/// What a redacted value reads as once base64-decoded.
pub const REDACTED: &str = "<redacted by wicket>";

/// The annotation `kubectl apply` writes, which copies the applied object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Redacts every Secret in `v`; returns how many values were replaced.
pub fn redact(v: &mut Value) -> u64 {
    let mut n = 0;
    let kind = v.get("kind").and_then(Value::as_str).map(str::to_string);
    match kind.as_deref() {
        Some("Secret") => n += redact_secret(v),
        Some("Table") => {
            if let Some(rows) = v.get_mut("rows").and_then(Value::as_array_mut) {
                for row in rows {
                    if let Some(o) = row.get_mut("object") {
                        n += redact(o);
                    }
                }
            }
        }
        Some(k) if k.ends_with("List") => {
            if let Some(items) = v.get_mut("items").and_then(Value::as_array_mut) {
                for item in items {
                    // Items of a typed list carry no kind; a SecretList's are Secrets.
                    if k == "SecretList"
                        || item.get("kind").and_then(Value::as_str) == Some("Secret")
                    {
                        n += redact_secret(item);
                    } else {
                        n += redact(item);
                    }
                }
            }
        }
        _ => {
            // A watch event: {"type": …, "object": …}.
            if v.get("type").is_some()
                && let Some(o) = v.get_mut("object")
            {
                n += redact(o);
            }
        }
    }
    n
}

fn redact_secret(s: &mut Value) -> u64 {
    let mut n = 0;
    let encoded = Value::String(base64::engine::general_purpose::STANDARD.encode(REDACTED));
    if let Some(data) = s.get_mut("data").and_then(Value::as_object_mut) {
        for (_, val) in data.iter_mut() {
            *val = encoded.clone();
            n += 1;
        }
    }
    if let Some(data) = s.get_mut("stringData").and_then(Value::as_object_mut) {
        for (_, val) in data.iter_mut() {
            *val = Value::String(REDACTED.into());
            n += 1;
        }
    }
    if let Some(a) = s
        .get_mut("metadata")
        .and_then(|m| m.get_mut("annotations"))
        .and_then(Value::as_object_mut)
        && let Some(val) = a.get_mut(LAST_APPLIED)
    {
        *val = Value::String(REDACTED.into());
        n += 1;
    }
    n
}

/// Cuts a stream of concatenated JSON values (watch events) into whole
/// values, whatever the chunking. Bounded: a value over `max` bytes is an error.
#[derive(Debug, Default)]
pub struct JsonSplitter {
    buf: Vec<u8>,
    /// Scan position, depth and string state carried between chunks.
    pos: usize,
    depth: u32,
    in_string: bool,
    escaped: bool,
    start: Option<usize>,
}

impl JsonSplitter {
    /// Feeds bytes; returns the values completed by them (each a byte
    /// slice of one JSON value, without the whitespace around it).
    pub fn push(&mut self, data: &[u8], max: usize) -> Result<Vec<Vec<u8>>, String> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut i = self.pos;
        while i < self.buf.len() {
            let b = self.buf[i];
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
            } else {
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => {
                        if self.depth == 0 {
                            self.start = Some(i);
                        }
                        self.depth += 1;
                    }
                    b'}' | b']' => {
                        if self.depth == 0 {
                            return Err("unbalanced JSON in a watch stream".into());
                        }
                        self.depth -= 1;
                        if self.depth == 0
                            && let Some(s) = self.start.take()
                        {
                            out.push(self.buf[s..=i].to_vec());
                        }
                    }
                    b' ' | b'\n' | b'\r' | b'\t' => {}
                    _ if self.depth == 0 => {
                        return Err("a watch stream holds a value that is not an object".into());
                    }
                    _ => {}
                }
            }
            i += 1;
        }
        // Drop what has been handed out.
        let keep_from = self.start.unwrap_or(i);
        self.buf.drain(..keep_from);
        self.pos = i - keep_from;
        if let Some(s) = self.start.as_mut() {
            *s = 0;
        }
        if self.buf.len() > max {
            return Err(format!("a watch event is over {max} bytes"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secret() -> Value {
        json!({"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "db",
            "annotations": {LAST_APPLIED: "{\"data\":{\"password\":\"aHVudGVyMg==\"}}", "other": "kept"}},
            "data": {"password": "aHVudGVyMg==", "user": "YXBw"}, "stringData": {"token": "plain"}})
    }

    #[test]
    fn a_secret_keeps_its_keys_and_loses_its_values() {
        let mut s = secret();
        assert_eq!(redact(&mut s), 4);
        let text = s.to_string();
        assert!(
            !text.contains("aHVudGVyMg") && !text.contains("plain"),
            "{text}"
        );
        assert_eq!(s["metadata"]["annotations"]["other"], "kept");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(s["data"]["password"].as_str().unwrap())
            .unwrap();
        assert_eq!(decoded, REDACTED.as_bytes());
    }

    #[test]
    fn lists_tables_and_watch_events_are_redacted() {
        let mut item = secret();
        item.as_object_mut().unwrap().remove("kind");
        let mut list = json!({"kind": "SecretList", "items": [item]});
        assert_eq!(redact(&mut list), 4);
        let mut table = json!({"kind": "Table", "rows": [{"cells": ["db"], "object": secret()}]});
        assert_eq!(redact(&mut table), 4);
        let mut event = json!({"type": "ADDED", "object": secret()});
        assert_eq!(redact(&mut event), 4);
        let mut table_event = json!({"type": "MODIFIED", "object": {"kind": "Table", "rows": [{"object": secret()}]}});
        assert_eq!(redact(&mut table_event), 4);
        let mut pod = json!({"kind": "Pod", "data": {"x": "y"}});
        assert_eq!(redact(&mut pod), 0);
    }

    #[test]
    fn the_splitter_finds_values_across_any_chunking() {
        let stream = br#"{"type":"ADDED","object":{"a":"}{\"x"}}
{"type":"DELETED","object":{"b":[1,2,{"c":"]"}]}}
"#;
        for cut in 1..stream.len() {
            let mut s = JsonSplitter::default();
            let mut got = s.push(&stream[..cut], 1 << 20).unwrap();
            got.extend(s.push(&stream[cut..], 1 << 20).unwrap());
            assert_eq!(got.len(), 2, "cut at {cut}");
            for g in &got {
                serde_json::from_slice::<Value>(g).unwrap();
            }
        }
        let mut s = JsonSplitter::default();
        assert!(s.push(b"{\"a\":\"", 4).is_err() || s.push(b"xxxxxxxx", 4).is_err());
        assert!(JsonSplitter::default().push(b"} ", 10).is_err());
    }
}
