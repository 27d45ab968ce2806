//! Prometheus metrics of a sidecar, served on `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

/// The metrics every sidecar exports.
pub struct Metrics {
    registry: Registry,
    /// Sessions opened, by outcome (`opened`, `refused`).
    pub sessions: Family<Labels, Counter>,
    /// Live sessions.
    pub sessions_active: Gauge,
    /// Commands decided, by effect and rule.
    pub commands: Family<Labels, Counter>,
    /// Authentication failures, by reason.
    pub auth_failures: Family<Labels, Counter>,
    /// Audit events waiting in the spool.
    pub spool_events: Gauge,
    /// Bytes of audit spool on disk.
    pub spool_bytes: Gauge,
    /// Version of the policy bundle in force (0: none).
    pub bundle_version: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wicket");
        let m = Metrics {
            sessions: Family::default(),
            sessions_active: Gauge::default(),
            commands: Family::default(),
            auth_failures: Family::default(),
            spool_events: Gauge::default(),
            spool_bytes: Gauge::default(),
            bundle_version: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("sessions", "Sessions by outcome", m.sessions.clone());
        registry.register(
            "sessions_active",
            "Live sessions",
            m.sessions_active.clone(),
        );
        registry.register(
            "commands",
            "Commands decided, by effect and rule",
            m.commands.clone(),
        );
        registry.register(
            "auth_failures",
            "Authentication failures by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "audit_spool_events",
            "Audit events not yet acknowledged",
            m.spool_events.clone(),
        );
        registry.register(
            "audit_spool_bytes",
            "Bytes of audit spool on disk",
            m.spool_bytes.clone(),
        );
        registry.register(
            "bundle_version",
            "Version of the policy bundle in force",
            m.bundle_version.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// A label set from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
