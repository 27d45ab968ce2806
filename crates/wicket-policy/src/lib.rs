//! The Wicket policy model and its evaluator.
//!
//! Pure: no I/O, no clock reads except through the `now` a caller passes in.
//! A [`PolicyDocument`] is parsed from YAML with [`parse`], checked and
//! compiled into a [`Policy`], which decides sessions ([`Policy::authorize_session`])
//! and commands ([`Policy::decide`]) and explains itself ([`Policy::explain`]).
//!
//! Decision order for a command:
//! 1. no unexpired grant for the principal on the connection: deny (`no-grant`);
//! 2. an agent without a reasoning trace where reasoning is required: deny (`require-reasoning`);
//! 3. every rule whose match and CEL condition hold; the most restrictive effect
//!    wins (deny over review over allow), the first such rule in document order
//!    is named; a condition that fails to evaluate counts as a matching deny;
//! 4. no rule matched: `defaults.effect` (deny unless set).

mod compile;
mod error;
mod eval;
pub mod glob;
pub mod http;
pub mod jsonpath;
mod model;
mod yaml;

pub use compile::{BUILTIN_DETECTORS, Policy, parse, parse_and_compile};
pub use error::{PolicyError, PolicyErrors};
pub use eval::{Explanation, Request, RuleMatch, SessionDecision};
pub use model::*;
pub use yaml::Pos;

/// Variables a CEL condition may use.
pub const CEL_VARIABLES: &[&str] = &["principal", "connection", "command", "has_reasoning", "now"];
