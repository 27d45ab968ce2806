//! `wicket-injector`: a mutating admission webhook that adds a Wicket gate
//! to every pod annotated `wicket.dev/inject: pg|ssh|k8s|http`, the way
//! Vault's agent injector and Linkerd add theirs.
//!
//! - [`settings`]: the control service, images and the deployment's
//!   resources (rendered by the Helm chart from its values).
//! - [`inject`]: annotations to a [`inject::Plan`], and the one function
//!   that builds the gate container ([`inject::container`]).
//! - [`review`]: AdmissionReview in, AdmissionReview with a JSON Patch (or
//!   a denial saying why) out.
//! - [`server`]: HTTPS with a certificate that reloads on rotation.

pub mod inject;
pub mod review;
pub mod server;
pub mod settings;

pub use settings::{Protocol, Settings};
