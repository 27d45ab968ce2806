//! The content detectors a connection's `masking` policy names, compiled
//! into one [`Masker`] (every gate applies them to what it records and, where
//! its protocol allows, to what the client receives).

use wicket_mask::{Masker, Style};
use wicket_policy::{MaskStyle, Policy};

/// The masking engine's style for a policy style.
pub fn style(s: MaskStyle) -> Style {
    match s {
        MaskStyle::Redact => Style::Redact,
        MaskStyle::Partial => Style::Partial,
        MaskStyle::Hash => Style::Hash,
    }
}

/// The detectors of `connection` under `policy` (built-in names, or custom
/// detectors of the policy document) in the connection's style, keyed with
/// `key` for hashing; `None` when the connection names no detector.
pub fn detectors(policy: &Policy, connection: &str, key: &[u8]) -> Result<Option<Masker>, String> {
    let Some(conn) = policy.connection(connection) else {
        return Ok(None);
    };
    let spec = &conn.masking;
    if spec.detectors.is_empty() {
        return Ok(None);
    }
    builder(policy, connection, key)?
        .build()
        .map(Some)
        .map_err(|e| e.to_string())
}

/// A builder holding the detectors of `connection` (none when it names none).
pub fn builder(
    policy: &Policy,
    connection: &str,
    key: &[u8],
) -> Result<wicket_mask::MaskerBuilder, String> {
    let mut b = Masker::builder().hash_key(key);
    let Some(conn) = policy.connection(connection) else {
        return Ok(b);
    };
    let spec = &conn.masking;
    let hit_style = style(spec.style);
    for name in &spec.detectors {
        match name.parse::<wicket_mask::Entity>() {
            Ok(e) => b = b.detector(e, hit_style),
            Err(_) => {
                let custom = policy
                    .document()
                    .detectors
                    .iter()
                    .find(|d| &d.name == name)
                    .ok_or_else(|| format!("unknown detector `{name}`"))?;
                b = b.custom(&custom.name, &custom.regex, hit_style);
            }
        }
    }
    Ok(b)
}

/// A bundle and the masker compiled from it.
type Compiled = (
    std::sync::Arc<crate::Bundle>,
    Option<std::sync::Arc<Masker>>,
);

/// The connection's detectors compiled once per policy bundle: gates ask
/// for the current masker on every session and recompile only when a new
/// bundle arrived.
#[derive(Default)]
pub struct MaskerCache {
    cached: std::sync::Mutex<Option<Compiled>>,
}

impl std::fmt::Debug for MaskerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskerCache").finish_non_exhaustive()
    }
}

impl MaskerCache {
    /// The detectors' masker under the sidecar's current bundle (`None`: the
    /// connection names none). A masking policy that does not compile masks
    /// everything (fail closed).
    pub fn current(&self, sidecar: &crate::Sidecar, key: &[u8]) -> Option<std::sync::Arc<Masker>> {
        let bundle = sidecar.bundles.current()?;
        let mut g = self.cached.lock().expect("masker cache");
        if let Some((b, m)) = g.as_ref()
            && std::sync::Arc::ptr_eq(b, &bundle)
        {
            return m.clone();
        }
        let m = match detectors(&bundle.policy, &sidecar.cfg.connection, key) {
            Ok(m) => m.map(std::sync::Arc::new),
            Err(e) => {
                tracing::error!(error = %e, "masking policy does not compile in the gate; masking everything");
                Some(std::sync::Arc::new(
                    Masker::builder()
                        .all(wicket_mask::Style::Redact)
                        .build()
                        .expect("built-in detectors build"),
                ))
            }
        };
        *g = Some((bundle, m.clone()));
        m
    }
}
