//! The JSON path subset policy uses for field rules and request-body
//! fields: `$`, `.name`, `['name']`, `[N]`, `[*]`, `.*` and `..name`
//! (any depth). Enough to name a field wherever it sits, small enough to
//! have no surprises.

use serde_json::Value;

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// A member of an object.
    Key(String),
    /// An element of an array.
    Index(usize),
    /// Every member or element.
    Any,
    /// A member of that name at any depth below.
    Descend(String),
}

/// A parsed JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    steps: Vec<Step>,
    source: String,
}

impl std::fmt::Display for JsonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-' || c == '$' || c == '@'
}

impl JsonPath {
    /// Parses a path, or says what is wrong with it.
    pub fn parse(src: &str) -> Result<JsonPath, String> {
        let bad = |why: &str| format!("`{src}` is not a JSON path: {why}");
        let mut rest = src
            .strip_prefix('$')
            .ok_or_else(|| bad("it must start with `$`"))?;
        let mut steps = Vec::new();
        let name_end = |s: &str| s.find(|c: char| !is_name_char(c)).unwrap_or(s.len());
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("..") {
                let n = name_end(r);
                if n == 0 {
                    return Err(bad("`..` must be followed by a member name"));
                }
                steps.push(Step::Descend(r[..n].to_string()));
                rest = &r[n..];
            } else if let Some(r) = rest.strip_prefix('.') {
                if let Some(r2) = r.strip_prefix('*') {
                    steps.push(Step::Any);
                    rest = r2;
                    continue;
                }
                let n = name_end(r);
                if n == 0 {
                    return Err(bad("`.` must be followed by a member name"));
                }
                steps.push(Step::Key(r[..n].to_string()));
                rest = &r[n..];
            } else if let Some(r) = rest.strip_prefix('[') {
                let close = r.find(']').ok_or_else(|| bad("unclosed `[`"))?;
                let inner = r[..close].trim();
                let step = if inner == "*" {
                    Step::Any
                } else if let Some(q) = inner
                    .strip_prefix('\'')
                    .and_then(|s| s.strip_suffix('\''))
                    .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                {
                    Step::Key(q.to_string())
                } else {
                    Step::Index(
                        inner
                            .parse()
                            .map_err(|_| bad("a bracket holds `*`, an index or a quoted name"))?,
                    )
                };
                steps.push(step);
                rest = &r[close + 1..];
            } else {
                return Err(bad("expected `.`, `..` or `[` after a step"));
            }
        }
        Ok(JsonPath {
            steps,
            source: src.to_string(),
        })
    }

    /// Calls `f` on every value the path selects in `v`.
    pub fn for_each_mut(&self, v: &mut Value, f: &mut dyn FnMut(&mut Value)) {
        walk_mut(&self.steps, v, f);
    }

    /// The values the path selects in `v`.
    pub fn select<'a>(&self, v: &'a Value) -> Vec<&'a Value> {
        let mut out = Vec::new();
        walk(&self.steps, v, &mut out);
        out
    }
}

fn walk_mut(steps: &[Step], v: &mut Value, f: &mut dyn FnMut(&mut Value)) {
    let Some((step, rest)) = steps.split_first() else {
        f(v);
        return;
    };
    match step {
        Step::Key(k) => {
            if let Some(child) = v.as_object_mut().and_then(|o| o.get_mut(k)) {
                walk_mut(rest, child, f);
            }
        }
        Step::Index(i) => {
            if let Some(child) = v.as_array_mut().and_then(|a| a.get_mut(*i)) {
                walk_mut(rest, child, f);
            }
        }
        Step::Any => match v {
            Value::Object(o) => o.values_mut().for_each(|c| walk_mut(rest, c, f)),
            Value::Array(a) => a.iter_mut().for_each(|c| walk_mut(rest, c, f)),
            _ => {}
        },
        Step::Descend(k) => descend_mut(k, rest, v, f),
    }
}

fn descend_mut(k: &str, rest: &[Step], v: &mut Value, f: &mut dyn FnMut(&mut Value)) {
    match v {
        Value::Object(o) => {
            for (name, child) in o.iter_mut() {
                if name == k {
                    walk_mut(rest, child, f);
                } else {
                    descend_mut(k, rest, child, f);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| descend_mut(k, rest, c, f)),
        _ => {}
    }
}

fn walk<'a>(steps: &[Step], v: &'a Value, out: &mut Vec<&'a Value>) {
    let Some((step, rest)) = steps.split_first() else {
        out.push(v);
        return;
    };
    match step {
        Step::Key(k) => {
            if let Some(c) = v.get(k) {
                walk(rest, c, out);
            }
        }
        Step::Index(i) => {
            if let Some(c) = v.get(i) {
                walk(rest, c, out);
            }
        }
        Step::Any => match v {
            Value::Object(o) => o.values().for_each(|c| walk(rest, c, out)),
            Value::Array(a) => a.iter().for_each(|c| walk(rest, c, out)),
            _ => {}
        },
        Step::Descend(k) => descend(k, rest, v, out),
    }
}

fn descend<'a>(k: &str, rest: &[Step], v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(o) => {
            for (name, child) in o {
                if name == k {
                    walk(rest, child, out);
                } else {
                    descend(k, rest, child, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| descend(k, rest, c, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn picked(path: &str, v: &Value) -> Vec<Value> {
        JsonPath::parse(path)
            .unwrap()
            .select(v)
            .into_iter()
            .cloned()
            .collect()
    }

    #[test]
    fn paths_select_what_they_name() {
        let v = json!({"user": {"email": "a@x", "name": "A"},
            "items": [{"email": "b@x"}, {"email": "c@x", "deep": {"email": "d@x"}}],
            "odd key": 1});
        assert_eq!(picked("$.user.email", &v), vec![json!("a@x")]);
        assert_eq!(picked("$['user']['name']", &v), vec![json!("A")]);
        assert_eq!(
            picked("$.items[*].email", &v),
            vec![json!("b@x"), json!("c@x")]
        );
        assert_eq!(picked("$.items[1].email", &v), vec![json!("c@x")]);
        assert_eq!(picked("$..email", &v).len(), 4);
        assert_eq!(picked("$['odd key']", &v), vec![json!(1)]);
        assert_eq!(picked("$.user.*", &v).len(), 2);
        assert_eq!(picked("$", &v), vec![v.clone()]);
        assert!(picked("$.nope.email", &v).is_empty());
    }

    #[test]
    fn mutation_reaches_every_selected_value() {
        let mut v = json!({"a": [{"ssn": "1"}, {"ssn": "2"}], "b": {"ssn": "3"}});
        let mut n = 0;
        JsonPath::parse("$..ssn")
            .unwrap()
            .for_each_mut(&mut v, &mut |x| {
                *x = json!("***");
                n += 1;
            });
        assert_eq!(n, 3);
        assert_eq!(
            v,
            json!({"a": [{"ssn": "***"}, {"ssn": "***"}], "b": {"ssn": "***"}})
        );
    }

    #[test]
    fn bad_paths_are_refused() {
        for p in ["user.email", "$.", "$..", "$[", "$[x]", "$.a b", "$a"] {
            assert!(JsonPath::parse(p).is_err(), "{p}");
        }
    }
}
