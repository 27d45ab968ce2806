//! A YAML loader that keeps where every value was written.
//!
//! The policy document is read into a `serde_json::Value` (so serde does the
//! typing) together with an index from field path (`rules[2].condition`) to
//! its line and column, so every validation error can name file, line and field.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Line and column (both 1-based) of a value in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
}

impl Pos {
    fn from_marker(m: &Marker) -> Self {
        Pos {
            line: m.line() as u32,
            column: m.col() as u32 + 1,
        }
    }
}

/// Field path to position.
#[derive(Debug, Default, Clone)]
pub struct Spans {
    map: HashMap<String, Pos>,
}

impl Spans {
    /// Position of `path`, or of its longest known prefix.
    pub fn find(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.map.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.map.get("").copied().unwrap_or_default(),
            }
        }
    }
}

/// A YAML document that could not be read.
#[derive(Debug, Clone)]
pub struct LoadError {
    /// Where.
    pub pos: Pos,
    /// Why.
    pub message: String,
}

enum Frame {
    Seq(Vec<Value>, String),
    Map(Map<String, Value>, String, Option<String>),
}

struct Builder {
    stack: Vec<Frame>,
    root: Option<Value>,
    spans: Spans,
    error: Option<LoadError>,
    docs: usize,
}

impl Builder {
    /// Path of the next value to be added at the current level, and, for
    /// mappings, whether the next scalar is a key.
    fn next_path(&self) -> String {
        match self.stack.last() {
            None => String::new(),
            Some(Frame::Seq(items, path)) => format!("{path}[{}]", items.len()),
            Some(Frame::Map(_, path, Some(key))) => {
                if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                }
            }
            Some(Frame::Map(_, path, None)) => path.clone(),
        }
    }

    fn fail(&mut self, mark: &Marker, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(LoadError {
                pos: Pos::from_marker(mark),
                message: message.into(),
            });
        }
    }

    fn push_value(&mut self, value: Value, mark: &Marker) {
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Seq(items, _)) => items.push(value),
            Some(Frame::Map(map, _, key)) => match key.take() {
                Some(k) => {
                    map.insert(k, value);
                }
                None => {
                    let key = match value {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => {
                            self.fail(mark, "mapping keys must be plain scalars");
                            return;
                        }
                    };
                    if map.contains_key(&key) {
                        self.fail(mark, format!("duplicate key `{key}`"));
                        return;
                    }
                    let Some(Frame::Map(_, path, slot)) = self.stack.last_mut() else {
                        return;
                    };
                    let full = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    self.spans.map.insert(full, Pos::from_marker(mark));
                    *slot = Some(key);
                }
            },
        }
    }

    fn expecting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map(_, _, None)))
    }
}

fn scalar(value: String, style: TScalarStyle, tagged_str: bool) -> Value {
    if tagged_str || !matches!(style, TScalarStyle::Plain) {
        return Value::String(value);
    }
    match value.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = value.strip_prefix(['-', '+']).unwrap_or(&value);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(i) = value.parse::<i64>()
    {
        return Value::Number(i.into());
    }
    let looks_float = value
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
        && value.bytes().any(|b| b.is_ascii_digit());
    if looks_float && let Some(n) = value.parse::<f64>().ok().and_then(Number::from_f64) {
        return Value::Number(n);
    }
    Value::String(value)
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::DocumentStart => {
                self.docs += 1;
                if self.docs > 1 {
                    self.fail(&mark, "only one YAML document is allowed per file");
                }
            }
            Event::Alias(_) => {
                self.fail(&mark, "YAML aliases are not supported in policy documents")
            }
            Event::Scalar(v, style, anchor, tag) => {
                if anchor != 0 {
                    self.fail(&mark, "YAML anchors are not supported in policy documents");
                    return;
                }
                let tagged_str = tag.as_ref().is_some_and(|t| t.suffix == "str");
                if !self.expecting_key() {
                    // A scalar value is located at the value itself.
                    let path = self.next_path();
                    self.spans.map.insert(path, Pos::from_marker(&mark));
                }
                self.push_value(scalar(v, style, tagged_str), &mark);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if anchor != 0 {
                    self.fail(&mark, "YAML anchors are not supported in policy documents");
                    return;
                }
                if self.expecting_key() {
                    self.fail(&mark, "mapping keys must be plain scalars");
                    return;
                }
                let path = self.next_path();
                self.spans
                    .map
                    .entry(path.clone())
                    .or_insert(Pos::from_marker(&mark));
                if matches!(ev, Event::SequenceStart(..)) {
                    self.stack.push(Frame::Seq(Vec::new(), path));
                } else {
                    self.stack.push(Frame::Map(Map::new(), path, None));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let value = match self.stack.pop() {
                    Some(Frame::Seq(items, _)) => Value::Array(items),
                    Some(Frame::Map(map, _, _)) => Value::Object(map),
                    None => return,
                };
                self.push_value(value, &mark);
            }
            _ => {}
        }
    }
}

/// Reads one YAML (or JSON) document into a JSON value and its spans.
pub fn load(source: &str) -> Result<(Value, Spans), LoadError> {
    let mut builder = Builder {
        stack: Vec::new(),
        root: None,
        spans: Spans::default(),
        error: None,
        docs: 0,
    };
    let mut parser = Parser::new_from_str(source);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(LoadError {
            pos: Pos::from_marker(e.marker()),
            message: e.info().to_string(),
        });
    }
    if let Some(e) = builder.error {
        return Err(e);
    }
    Ok((builder.root.unwrap_or(Value::Null), builder.spans))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_typed_and_located() {
        let src = "a: 1\nb:\n  - x\n  - 'true'\n  - true\nc: {d: 2.5, e: ~}\n";
        let (v, spans) = load(src).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": 1, "b": ["x", "true", true], "c": {"d": 2.5, "e": null}})
        );
        assert_eq!(spans.find("a").line, 1);
        assert_eq!(spans.find("b[1]").line, 4);
        assert_eq!(spans.find("b[2]").line, 5);
        assert_eq!(spans.find("c.d").line, 6);
        assert_eq!(spans.find("c.unknown.deeper").line, 6);
    }

    #[test]
    fn duplicate_keys_anchors_and_syntax_errors_are_refused() {
        assert!(
            load("a: 1\na: 2\n")
                .unwrap_err()
                .message
                .contains("duplicate key")
        );
        assert!(
            load("a: &x 1\nb: *x\n")
                .unwrap_err()
                .message
                .contains("anchors")
        );
        let e = load("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e:?}");
    }
}
