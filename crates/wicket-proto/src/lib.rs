//! Generated protobuf and gRPC code for the Wicket contract.
//!
//! **Architecture Invariant:** this is the only crate that knows protobuf.
//! Other crates convert to and from `wicket-core` domain types at their edges.
#![allow(
    missing_docs,
    clippy::large_enum_variant,
    clippy::doc_lazy_continuation
)]

pub mod convert;
pub mod report;

/// `wicket.v1` package.
pub mod v1 {
    tonic::include_proto!("wicket.v1");
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("wicket_descriptor");

pub use prost_types::Timestamp;
