//! Domain types shared by every Wicket crate.
//!
//! These are plain data: no I/O, no protobuf. `wicket-proto` converts them to
//! and from the wire form; `wicket-policy` decides over them; the control
//! service stores them.

mod approval;
mod audit;
pub mod carried;
mod error;
pub mod evidence;
mod types;

pub use approval::{Approval, ApprovalRequest, ApprovalState, Vote};
pub use audit::{AuditEvent, AuditKind};
pub use error::{Error, ErrorKind};
pub use types::{
    Classification, Command, Connection, Decision, Effect, Principal, PrincipalKind, Protocol,
    ReasoningStep, ReasoningTrace, ReviewSpec,
};

/// Parses a duration written as `90s`, `10m`, `1h`, `1d` or a bare number
/// of seconds (as policy documents and the CLI take them).
pub fn parse_seconds(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid duration `{s}` (expected e.g. 90s, 10m, 1h)"))
}

/// The OpenSSH certificate extension that carries a [`Principal`] (as JSON)
/// in the SSH user certificates the control service signs and the SSH gate
/// accepts.
pub const SSH_PRINCIPAL_EXTENSION: &str = "wicket-principal@wicket.dev";

#[cfg(test)]
mod duration_tests {
    #[test]
    fn durations_parse_with_units() {
        assert_eq!(super::parse_seconds("90"), Ok(90));
        assert_eq!(super::parse_seconds("30m"), Ok(1800));
        assert_eq!(super::parse_seconds("2h"), Ok(7200));
        assert_eq!(super::parse_seconds("1d"), Ok(86_400));
        assert!(super::parse_seconds("5w").is_err());
        assert!(super::parse_seconds("m").is_err());
        assert!(super::parse_seconds("99999999d").is_err());
    }
}
