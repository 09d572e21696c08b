//! Generated code for `secretd.v1` (see `proto/secretd/v1/secretd.proto`).
//!
//! `Secret.value` is the only field that ever carries a secret; the generated `Debug` of
//! `Secret` would print it, so code that logs protocol messages must not log `Secret`.

pub mod codec;

pub mod v1 {
    #![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    tonic::include_proto!("secretd.v1");

    /// Encoded `FileDescriptorSet`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("secretd_descriptor");
}
