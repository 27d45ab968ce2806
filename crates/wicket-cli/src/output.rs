//! Table and JSON output.

use serde_json::Value;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
    /// JSON Lines: one compact object per line (a list becomes its lines;
    /// `sessions show` prints the session's events, its recording).
    Jsonl,
}

/// Prints `v` as pretty JSON, or as JSON Lines.
pub fn json(format: Format, v: &Value) {
    match (format, v) {
        (Format::Jsonl, Value::Array(items)) => {
            for i in items {
                println!("{i}");
            }
        }
        (Format::Jsonl, v) => println!("{v}"),
        _ => println!("{}", serde_json::to_string_pretty(v).expect("json")),
    }
}

/// Prints rows as a table (headers first) or as a JSON array of objects.
pub fn rows(format: Format, headers: &[&str], rows: Vec<Vec<String>>, json: Value) {
    match format {
        Format::Json | Format::Jsonl => self::json(format, &json),
        Format::Table => {
            if rows.is_empty() {
                println!("(none)");
                return;
            }
            let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
            for r in &rows {
                for (i, c) in r.iter().enumerate() {
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
            let line = |cells: Vec<String>| {
                let mut s = String::new();
                for (i, c) in cells.iter().enumerate() {
                    if i + 1 == cells.len() {
                        s.push_str(c);
                    } else {
                        s.push_str(&format!("{c:<w$}  ", w = widths[i]));
                    }
                }
                println!("{}", s.trim_end());
            };
            line(headers.iter().map(|h| h.to_uppercase()).collect());
            for r in rows {
                line(r);
            }
        }
    }
}

/// Prints key/value pairs (table) or the JSON value.
pub fn record(format: Format, pairs: Vec<(&str, String)>, json: Value) {
    match format {
        Format::Json | Format::Jsonl => self::json(format, &json),
        Format::Table => {
            let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in pairs {
                println!("{k:<w$}  {v}");
            }
        }
    }
}

/// Shortens text for a table cell.
pub fn cell(s: &str, max: usize) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}
