//! The HTTP sidecar: a reverse proxy on hyper 1 in front of one HTTP
//! service.
//!
//! Callers authenticate with OIDC bearer tokens; the gate holds the
//! upstream's credential and injects it; every request is classified
//! (method, host, route, selected headers and JSON body fields), decided by
//! policy (allow, deny with an RFC 9457 problem, or hold for approval),
//! relayed with its body streaming both ways (HTTP/1.1 and HTTP/2 on both
//! sides, upgrades included), masked on its way back (JSON field rules and
//! the detectors, gzip and deflate decoded; WebSocket messages too), and
//! audited.

pub mod classify;
pub mod framing;
pub mod gate;
pub mod mask;
pub mod upstream;
pub mod ws;

pub use gate::{HttpConfig, HttpGate, problem, serve};
pub use upstream::{Credential, Secret, Upstream, UpstreamSpec};
pub use wicket_sidecar::login::LoginConfig;
