//! Reasoning traces carried inside SQL: sqlcommenter-style comments
//! `/*reasoning='…',traceparent='…'*/` (URL-encoded values) and the
//! `wicket.reasoning` setting (`SET wicket.reasoning = '…'`, or
//! `PGOPTIONS='-c wicket.reasoning=…'` at connect).

/// Key/value pairs of the sqlcommenter comments in `sql`.
pub fn comment_tags(sql: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = sql;
    while let Some(start) = rest.find("/*") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("*/") else { break };
        for pair in after[..end].trim().split(',') {
            if let Some((k, v)) = pair.split_once('=') {
                let v = v.trim().trim_matches('\'');
                out.push((k.trim().to_string(), url_decode(v)));
            }
        }
        rest = &after[end + 2..];
    }
    out
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `-c wicket.reasoning=…` in a startup `options` string.
pub fn from_options(options: &str) -> Option<String> {
    // Words split on spaces, where a backslash escapes the next character (libpq's rule).
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next()?
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_string()
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_string()
        } else {
            continue;
        };
        if let Some(v) = setting.strip_prefix("wicket.reasoning=") {
            return Some(v.to_string());
        }
    }
    None
}

/// The value of `SET [SESSION|LOCAL] wicket.reasoning = '…'` / `TO '…'`.
pub fn from_set(statement: &str) -> Option<String> {
    let lower = statement.to_ascii_lowercase();
    let pos = lower.find("wicket.reasoning")?;
    let rest = statement[pos + "wicket.reasoning".len()..].trim_start();
    let rest = rest
        .strip_prefix('=')
        .or_else(|| {
            rest.get(..2)
                .filter(|p| p.eq_ignore_ascii_case("to"))
                .map(|_| &rest[2..])
        })?
        .trim();
    let v = rest.trim_end_matches(';').trim();
    Some(v.trim_matches('\'').replace("''", "'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlcommenter_tags() {
        let t = comment_tags(
            "SELECT 1 /*reasoning='checking%20late%20orders',traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/",
        );
        assert_eq!(t[0], ("reasoning".into(), "checking late orders".into()));
        assert_eq!(t[1].0, "traceparent");
        assert!(comment_tags("SELECT 1").is_empty());
        assert!(comment_tags("SELECT 1 /* unterminated").is_empty());
        assert_eq!(url_decode("a%2"), "a%2");
    }

    #[test]
    fn settings() {
        assert_eq!(
            from_options("-c wicket.reasoning=nightly\\ report").as_deref(),
            Some("nightly report")
        );
        assert_eq!(
            from_options("-cwicket.reasoning=x -c statement_timeout=5").as_deref(),
            Some("x")
        );
        assert_eq!(from_options("-c statement_timeout=5"), None);
        assert_eq!(
            from_set("SET wicket.reasoning = 'it''s late'").as_deref(),
            Some("it's late")
        );
        assert_eq!(
            from_set("set session wicket.reasoning to 'x';").as_deref(),
            Some("x")
        );
        assert_eq!(from_set("SET search_path = x"), None);
    }
}
