//! Generates the secretd.v1 Rust code with protox, so no system `protoc` is needed.
use prost::Message;
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "secretd/v1/secretd.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set; reflection needs it.
    std::fs::write(out.join("secretd_descriptor.bin"), fds.encode_to_vec())?;
    // Padded value-carrying messages, INVALID_ARGUMENT for malformed ones (src/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::SecretdCodec")
        .compile_fds(fds)?;
    Ok(())
}
