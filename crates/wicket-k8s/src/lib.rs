//! `wicket-k8s`: the Kubernetes API gate.
//!
//! A TLS-serving reverse proxy in front of one kube-apiserver. Callers
//! (kubectl, client libraries) present an OIDC access token; the gate
//! validates it, classifies every request ([`classify`]), decides it by
//! policy (allow, deny with a `Status` 403 naming the rule, or hold for
//! approval), and forwards it with its own credentials plus
//! `Impersonate-User` / `Impersonate-Group` for the verified caller, so the
//! cluster's RBAC still applies per person or agent. exec and attach run
//! over WebSocket through [`exec`], or over SPDY/3.1 through [`spdy`] (older
//! kubectl), recorded (asciicast v2) and masked;
//! Secret values are redacted ([`redact`]) unless policy allows them.

pub mod classify;
pub mod exec;
mod forward;
pub mod gate;
pub mod redact;
pub mod spdy;

pub use gate::{K8sConfig, KubeGate, TokenSource, Upstream, serve};

pub use wicket_core::carried::{CarriedReasoning, REASONING_MARKER};
