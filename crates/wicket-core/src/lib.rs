//! Domain types shared by every Wicket crate.
//!
//! These are plain data: no I/O, no protobuf. `wicket-proto` converts them to
//! and from the wire form; `wicket-policy` decides over them; the control
//! service stores them.

mod approval;
mod audit;
pub mod carried;
mod error;
mod types;

pub use approval::{Approval, ApprovalRequest, ApprovalState, Vote};
pub use audit::{AuditEvent, AuditKind};
pub use error::{Error, ErrorKind};
pub use types::{
    Classification, Command, Connection, Decision, Effect, Principal, PrincipalKind, Protocol,
    ReasoningStep, ReasoningTrace, ReviewSpec,
};

/// The OpenSSH certificate extension that carries a [`Principal`] (as JSON)
/// in the SSH user certificates the control service signs and the SSH gate
/// accepts.
pub const SSH_PRINCIPAL_EXTENSION: &str = "wicket-principal@wicket.dev";
