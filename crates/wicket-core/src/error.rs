//! Errors with two faces: what the caller may see, and what operators need.

use std::fmt;

/// What went wrong, in terms every protocol can map to its own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No or bad credentials.
    Unauthenticated,
    /// Authenticated, but not allowed.
    PermissionDenied,
    /// The request itself is wrong.
    InvalidInput,
    /// The thing asked for does not exist.
    NotFound,
    /// A dependency is down; retry later.
    Unavailable,
    /// A bug or an unexpected condition; details only in logs.
    Internal,
}

impl ErrorKind {
    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An error with a message safe to show the caller and an optional internal
/// detail that only goes to logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// Kind.
    pub kind: ErrorKind,
    /// Safe to show the caller: never secrets or internals.
    pub user_message: String,
    /// For operators' logs only.
    pub internal: Option<String>,
}

impl Error {
    /// An error whose message the caller may see.
    pub fn new(kind: ErrorKind, user_message: impl Into<String>) -> Self {
        Error {
            kind,
            user_message: user_message.into(),
            internal: None,
        }
    }

    /// An internal error: the caller sees a generic message.
    pub fn internal(detail: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Internal,
            user_message: "internal error".into(),
            internal: Some(detail.into()),
        }
    }

    /// Adds an operator-only detail.
    pub fn with_internal(mut self, detail: impl Into<String>) -> Self {
        self.internal = Some(detail.into());
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.user_message)
    }
}

impl std::error::Error for Error {}
