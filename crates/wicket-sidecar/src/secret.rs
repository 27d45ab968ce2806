//! Secrets given to a process as a value or as a file (read when needed,
//! so a rotated file is picked up), never printed.

use std::path::PathBuf;

/// A secret: a fixed value or a file holding it.
#[derive(Clone)]
pub enum Secret {
    /// A fixed value.
    Value(String),
    /// A file.
    File(PathBuf),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Value(_) => f.write_str("Secret::Value(…)"),
            Secret::File(p) => write!(f, "Secret::File({})", p.display()),
        }
    }
}

/// Reads a secret (a file's contents without its final line break).
pub fn read_secret(secret: &Secret) -> Result<String, String> {
    match secret {
        Secret::Value(v) => Ok(v.clone()),
        Secret::File(p) => std::fs::read_to_string(p)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|e| format!("cannot read the secret in {}: {e}", p.display())),
    }
}
