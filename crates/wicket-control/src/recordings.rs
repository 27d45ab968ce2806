//! The recordings store: terminal output leaves the audit events for
//! compressed chunks in a directory (or, later, an object store).
//!
//! Sidecars report terminal output as `output` audit events whose
//! `details.asciicast` holds asciicast v2 lines. Before a batch is stored,
//! the payloads of each session channel in it are joined into one chunk,
//! zstd-compressed and written durably (temporary file, fsync, rename);
//! each event then keeps only where its lines are: `asciicast_chunk` (the
//! chunk's key), `asciicast_offset`, `asciicast_len` and
//! `asciicast_sha256`. The audit hash chain covers those, so a changed or
//! missing chunk is caught by `wicket audit verify`. Memory is bounded by
//! a batch, however long the session; the chunk is written before the
//! events are stored and acknowledged, so an acknowledged recording is
//! never lost (a replayed batch rewrites the same chunk).
//!
//! Readers get the events back with `asciicast` filled in from the chunk
//! ([`Recordings::inline`]); a chunk that is gone or changed is reported
//! in `asciicast_error` instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// zstd level of recording chunks: the fastest. Chunks are compressed at
/// ingest, next to the gates on the same machine in small deployments, and
/// terminal output compresses well at any level.
const LEVEL: i32 = 1;

use object_store::ObjectStoreExt as _;
use wicket_core::{AuditEvent, AuditKind};

/// Where chunks go.
#[derive(Clone)]
pub enum Recordings {
    /// Kept inside the audit events, in the database.
    Inline,
    /// Compressed chunks under a directory.
    Dir(PathBuf),
    /// Compressed chunks in an S3-compatible bucket, under a prefix.
    Object {
        /// The bucket.
        store: std::sync::Arc<dyn object_store::ObjectStore>,
        /// Where in it (`s3://bucket/PREFIX`).
        prefix: String,
        /// The URL, for logs.
        url: String,
    },
}

impl std::fmt::Debug for Recordings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recordings::Inline => f.write_str("Inline"),
            Recordings::Dir(d) => f.debug_tuple("Dir").field(d).finish(),
            Recordings::Object { url, .. } => f.debug_tuple("Object").field(url).finish(),
        }
    }
}

fn io_error(e: object_store::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b))
}

/// A key part made safe for paths and object names: `[A-Za-z0-9._-]` kept
/// (a leading dot escaped), everything else `%XX`.
fn key_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() { "%".into() } else { out }
}

/// Whether `key` is one this store makes (three safe parts).
fn valid_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.%".contains(&b))
        })
        && key.ends_with(".cast.zst")
}

impl Recordings {
    /// The store for `dir`, created if missing.
    pub fn dir(dir: &Path) -> Result<Recordings, String> {
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "cannot create the recordings directory {}: {e}",
                dir.display()
            )
        })?;
        Ok(Recordings::Dir(dir.to_path_buf()))
    }

    /// Chunks in the S3-compatible bucket of `url` (`s3://bucket/prefix`),
    /// configured from the `AWS_*` environment (credentials, region,
    /// `AWS_ENDPOINT` for a non-AWS server, `AWS_ALLOW_HTTP`) and then
    /// `options` (`aws_endpoint=…` and the other object_store keys).
    pub fn object(url: &str, options: &[(String, String)]) -> Result<Recordings, String> {
        use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
        let parsed =
            url::Url::parse(url).map_err(|e| format!("invalid recordings URL `{url}`: {e}"))?;
        if !matches!(parsed.scheme(), "s3" | "s3a") {
            return Err(format!(
                "the recordings URL must be s3://bucket/prefix, not `{url}`"
            ));
        }
        let mut b = AmazonS3Builder::from_env().with_url(url);
        for (k, v) in options {
            let key: AmazonS3ConfigKey = k
                .parse()
                .map_err(|e| format!("unknown recordings store option `{k}`: {e}"))?;
            b = b.with_config(key, v);
        }
        let store = b
            .build()
            .map_err(|e| format!("cannot set up the recordings bucket {url}: {e}"))?;
        Ok(Recordings::Object {
            store: std::sync::Arc::new(store),
            prefix: parsed.path().trim_matches('/').to_string(),
            url: url.to_string(),
        })
    }

    fn object_path(prefix: &str, key: &str) -> object_store::path::Path {
        let mut parts: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
        parts.extend(key.split('/'));
        object_store::path::Path::from_iter(parts)
    }

    async fn put(&self, key: &str, bytes: Vec<u8>) -> std::io::Result<()> {
        let root = match self {
            Recordings::Inline => return Ok(()),
            Recordings::Object { store, prefix, .. } => {
                store
                    .put(&Self::object_path(prefix, key), bytes.into())
                    .await
                    .map_err(io_error)?;
                return Ok(());
            }
            Recordings::Dir(root) => root,
        };
        let path = root.join(key);
        let tmp = path.with_extension(format!("tmp.{}", uuid::Uuid::new_v4().simple()));
        tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename itself must survive a power cut.
            if let Some(parent) = path.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Removes every chunk of a session.
    pub async fn delete_session(&self, session_id: &str) -> std::io::Result<()> {
        let root = match self {
            Recordings::Inline => return Ok(()),
            Recordings::Object { store, prefix, .. } => {
                use futures_util::TryStreamExt as _;
                let under = Self::object_path(prefix, &key_part(session_id));
                let found: Vec<_> = store
                    .list(Some(&under))
                    .map_ok(|m| m.location)
                    .try_collect()
                    .await
                    .map_err(io_error)?;
                for path in found {
                    match store.delete(&path).await {
                        Err(object_store::Error::NotFound { .. }) | Ok(()) => {}
                        Err(e) => return Err(io_error(e)),
                    }
                }
                return Ok(());
            }
            Recordings::Dir(root) => root,
        };
        let dir = root.join(key_part(session_id));
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// A chunk's recorded lines, decompressed; `None` when it is gone.
    pub async fn get(&self, key: &str) -> std::io::Result<Option<Vec<u8>>> {
        if !valid_key(key) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a recording chunk key",
            ));
        }
        let root = match self {
            Recordings::Inline => return Ok(None),
            Recordings::Object { store, prefix, .. } => {
                let z = match store.get(&Self::object_path(prefix, key)).await {
                    Ok(got) => got.bytes().await.map_err(io_error)?,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(io_error(e)),
                };
                return tokio::task::spawn_blocking(move || {
                    zstd::stream::decode_all(&z[..]).map(Some)
                })
                .await
                .map_err(std::io::Error::other)?;
            }
            Recordings::Dir(root) => root,
        };
        let path = root.join(key);
        tokio::task::spawn_blocking(move || match std::fs::read(&path) {
            Ok(z) => zstd::stream::decode_all(&z[..]).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Moves the terminal output of `events` into chunks (one per session
    /// channel in the batch), leaving where it went in each event.
    pub async fn offload(&self, events: &mut [AuditEvent]) -> std::io::Result<()> {
        if matches!(self, Recordings::Inline) {
            return Ok(());
        }
        // (session, channel, the events whose lines go into its chunk).
        let mut chunks: Vec<(String, String, Vec<usize>)> = Vec::new();
        for (i, e) in events.iter().enumerate() {
            if e.kind != AuditKind::Output {
                continue;
            }
            if !e.details.contains_key("asciicast") {
                continue;
            }
            let channel = e.details.get("channel").cloned().unwrap_or_default();
            let at = match chunks
                .iter()
                .position(|(s, c, _)| *s == e.session_id && *c == channel)
            {
                Some(at) => at,
                None => {
                    chunks.push((e.session_id.clone(), channel, Vec::new()));
                    chunks.len() - 1
                }
            };
            chunks[at].2.push(i);
        }
        for (session, channel, members) in chunks {
            // Keyed by the first event's id: a replayed batch writes the
            // same chunk again.
            let key = format!(
                "{}/{}/{}.cast.zst",
                key_part(&session),
                key_part(&channel),
                key_part(&events[members[0]].id)
            );
            let mut joined = Vec::new();
            for &i in &members {
                let e = &mut events[i];
                let lines = e.details.remove("asciicast").unwrap_or_default();
                e.details.insert("asciicast_chunk".into(), key.clone());
                e.details
                    .insert("asciicast_offset".into(), joined.len().to_string());
                e.details
                    .insert("asciicast_len".into(), lines.len().to_string());
                e.details
                    .insert("asciicast_sha256".into(), sha256_hex(lines.as_bytes()));
                joined.extend_from_slice(lines.as_bytes());
            }
            let compressed =
                tokio::task::spawn_blocking(move || zstd::bulk::compress(&joined, LEVEL))
                    .await
                    .map_err(std::io::Error::other)??;
            self.put(&key, compressed).await?;
        }
        Ok(())
    }

    /// Fills `asciicast` back in from the chunks (each read once).
    pub async fn inline(&self, events: &mut [AuditEvent]) {
        let mut cache: HashMap<String, Result<Option<Vec<u8>>, String>> = HashMap::new();
        for e in events.iter_mut() {
            let Some(key) = e.details.get("asciicast_chunk").cloned() else {
                continue;
            };
            if !cache.contains_key(&key) {
                let got = self.get(&key).await.map_err(|err| err.to_string());
                // Only the chunk in use is kept.
                cache.clear();
                cache.insert(key.clone(), got);
            }
            let num = |k: &str| e.details.get(k).and_then(|v| v.parse::<usize>().ok());
            let (offset, len) = (num("asciicast_offset"), num("asciicast_len"));
            let result = match (&cache[&key], offset, len) {
                (Ok(Some(chunk)), Some(o), Some(l)) => match chunk.get(o..o.saturating_add(l)) {
                    Some(slice)
                        if Some(sha256_hex(slice).as_str())
                            == e.details.get("asciicast_sha256").map(String::as_str) =>
                    {
                        String::from_utf8(slice.to_vec())
                            .map_err(|_| "the recording chunk was changed".to_string())
                    }
                    _ => Err("the recording chunk was changed".to_string()),
                },
                (Ok(None), ..) => Err("the recording chunk is missing".to_string()),
                (Err(err), ..) => Err(format!("the recording chunk cannot be read: {err}")),
                _ => Err("the event's recording reference is malformed".to_string()),
            };
            match result {
                Ok(lines) => {
                    e.details.insert("asciicast".into(), lines);
                }
                Err(why) => {
                    tracing::warn!(event = %e.id, chunk = %key, error = %why, "recording chunk unusable");
                    e.details.insert("asciicast_error".into(), why);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(id: &str, session: &str, channel: &str, lines: &str) -> AuditEvent {
        AuditEvent {
            id: id.into(),
            session_id: session.into(),
            kind: AuditKind::Output,
            details: [
                ("channel".to_string(), channel.to_string()),
                ("asciicast".to_string(), lines.to_string()),
            ]
            .into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn output_goes_to_chunks_and_comes_back_checked() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recordings::dir(dir.path()).unwrap();
        let mut batch = vec![
            output("e1", "../s/1", "0", "[0.1,\"o\",\"a\"]\n"),
            AuditEvent {
                id: "e2".into(),
                session_id: "../s/1".into(),
                kind: AuditKind::Command,
                ..Default::default()
            },
            output("e3", "../s/1", "0", "[0.2,\"o\",\"b\"]\n"),
            output("e4", "../s/1", "exec 1", "[0.3,\"o\",\"c\"]\n"),
        ];
        let original = batch.clone();
        r.offload(&mut batch).await.unwrap();
        assert!(batch.iter().all(|e| !e.details.contains_key("asciicast")));
        let key = batch[0].details["asciicast_chunk"].clone();
        assert_eq!(key, "%2E.%2Fs%2F1/0/e1.cast.zst");
        assert_eq!(batch[2].details["asciicast_chunk"], key);
        assert_eq!(batch[2].details["asciicast_offset"], "14");
        assert_eq!(
            batch[3].details["asciicast_chunk"],
            "%2E.%2Fs%2F1/exec%201/e4.cast.zst"
        );
        // Stays inside the directory whatever the session id.
        assert!(dir.path().join(&key).is_file());
        let mut back = batch.clone();
        r.inline(&mut back).await;
        for (b, o) in back.iter().zip(&original) {
            assert_eq!(b.details.get("asciicast"), o.details.get("asciicast"));
        }
        // A changed chunk is caught, not served.
        let z = zstd::bulk::compress(b"[0.1,\"o\",\"X\"]\n[0.2,\"o\",\"b\"]\n", 3).unwrap();
        std::fs::write(dir.path().join(&key), z).unwrap();
        let mut changed = batch.clone();
        r.inline(&mut changed).await;
        assert_eq!(
            changed[0].details["asciicast_error"],
            "the recording chunk was changed"
        );
        assert_eq!(changed[2].details["asciicast"], "[0.2,\"o\",\"b\"]\n");
        std::fs::remove_file(dir.path().join(&key)).unwrap();
        let mut gone = batch.clone();
        r.inline(&mut gone).await;
        assert_eq!(
            gone[0].details["asciicast_error"],
            "the recording chunk is missing"
        );
        // Keys from events never reach outside the directory.
        let mut evil = batch[0].clone();
        evil.details
            .insert("asciicast_chunk".into(), "../../etc/passwd".into());
        let mut evil = [evil];
        r.inline(&mut evil).await;
        assert!(evil[0].details["asciicast_error"].contains("cannot be read"));
    }
}
